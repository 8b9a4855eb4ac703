//! The session token file: the agent's identity, kept current by Hangar through `PUT /token`.
//!
//! The file is replaced atomically (a temporary file renamed over it), so a reader sees either
//! the old token or the new one, never half of one. Every process of the sandbox may read it:
//! the sandbox is one trust domain, and its agent is who the token names.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use hangar_proto::init::{MAX_TOKEN, TOKEN_FILE};

/// Whether `token` looks like a compact JWT: bounded, and only base64url characters and dots.
pub fn valid(token: &[u8]) -> Result<(), String> {
    if token.is_empty() || token.len() > MAX_TOKEN {
        return Err(format!("a token must be 1 to {MAX_TOKEN} bytes"));
    }
    if !token
        .iter()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        || token.iter().filter(|&&b| b == b'.').count() != 2
    {
        return Err("a token must be a compact JWT (three base64url parts)".into());
    }
    Ok(())
}

/// Writes `token` to the token file in `run_dir`.
pub fn write(run_dir: &Path, token: &[u8]) -> std::io::Result<()> {
    let path = run_dir.join(TOKEN_FILE);
    let tmp = run_dir.join(format!(".{TOKEN_FILE}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)?;
    f.write_all(token)?;
    drop(f);
    std::fs::rename(&tmp, &path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_compact_jwts_are_written() {
        assert!(valid(b"eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln").is_ok());
        for bad in [
            &b""[..],
            b"a.b",
            b"a.b.c.d",
            b"a.b.c\n",
            b"../x.y.z",
            b"a b.c.d",
        ] {
            assert!(valid(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_token_is_replaced_whole() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), b"a.b.c").unwrap();
        write(dir.path(), b"d.e.f").unwrap();
        let path = dir.path().join(TOKEN_FILE);
        assert_eq!(std::fs::read(&path).unwrap(), b"d.e.f");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o644
        );
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
