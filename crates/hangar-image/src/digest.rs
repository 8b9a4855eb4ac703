//! Content digests: parsing `sha256:<hex>` and hashing blobs while they stream past.
//!
//! It must never accept a digest whose hex part is anything but 64 lower-case hex digits, because that
//! hex becomes a path component in the layout and in the store, and a loose parse would let an image
//! name a path of its choosing.

use std::fmt;
use std::io::{self, Read};

use sha2::{Digest as _, Sha256};

/// A validated `sha256:<64 hex digits>` digest; `Display` prints it in that form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sha256Digest {
    hex: String,
}

impl Sha256Digest {
    /// Returns `None` for any other algorithm or a malformed hex part.
    pub(crate) fn parse(digest: &str) -> Option<Sha256Digest> {
        let hex = digest.strip_prefix("sha256:")?;
        let well_formed =
            hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        well_formed.then(|| Sha256Digest {
            hex: hex.to_owned(),
        })
    }

    pub(crate) fn hex(&self) -> &str {
        &self.hex
    }
}

impl fmt::Display for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex)
    }
}

/// Hashes and counts every byte read through it, so a blob is verified in the same pass that consumes it.
pub(crate) struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    len: u64,
}

impl<R: Read> HashingReader<R> {
    pub(crate) fn new(inner: R) -> HashingReader<R> {
        HashingReader {
            inner,
            hasher: Sha256::new(),
            len: 0,
        }
    }

    /// Reads what is left so the digest covers the whole blob, even where the consumer stopped early
    /// (a tar archive ends at its zero blocks; padding and skippable frames may follow).
    pub(crate) fn finish(mut self) -> io::Result<(String, u64)> {
        io::copy(&mut self, &mut io::sink())?;
        Ok((hex::encode(self.hasher.finalize()), self.len))
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_accepts_only_sha256_with_64_lower_hex() {
        let good = format!("sha256:{}", "a1".repeat(32));
        assert_eq!(Sha256Digest::parse(&good).unwrap().to_string(), good);
        for bad in [
            "sha256:".to_owned(),
            format!("sha512:{}", "a1".repeat(32)),
            format!("sha256:{}", "A1".repeat(32)),
            format!("sha256:{}", "a1".repeat(31)),
            format!("sha256:../{}", "a".repeat(61)),
        ] {
            assert_eq!(Sha256Digest::parse(&bad), None, "{bad}");
        }
    }

    #[test]
    fn hashing_reader_covers_unread_tail() {
        let mut reader = HashingReader::new(&b"hello world"[..]);
        let mut first = [0u8; 5];
        reader.read_exact(&mut first).unwrap();
        let (hex, len) = reader.finish().unwrap();
        assert_eq!(len, 11);
        assert_eq!(hex, hex::encode(Sha256::digest(b"hello world")));
    }
}
