//! Receiving uploads: a build context (a tar, optionally gzipped, unpacked into a temp
//! directory) or an image archive (kept as a file).
//!
//! The tar comes from a client, so every entry is checked before it touches the disk: only
//! relative paths of plain components, only files, directories, symlinks and hard links to
//! other entries; no devices or FIFOs; no more bytes than the limit, compressed or not.
//! Writing through a symlink that an earlier entry planted is refused by `tar`'s
//! `unpack_in`, which checks that every parent directory resolves inside the destination.
//! On any error the temp directory is removed: nothing is left behind.

use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tar::EntryType;
use tokio::io::{AsyncRead, AsyncWriteExt};

use crate::{is_plain_relative, Images};

/// Why an upload was refused. Every variant but `Io` is the client's to fix.
#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    #[error("the upload is larger than the server's limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("refusing tar entry {path:?}: {reason}")]
    Unsafe { path: String, reason: &'static str },
    #[error("the build context is not a readable tar archive: {0}")]
    BadTar(#[source] io::Error),
    #[error("the build context has no Dockerfile at {0:?}; pass the right one with `--file`")]
    NoDockerfile(String),
    #[error(
        "invalid Dockerfile path {0:?}: it must be relative to the build context, without `..`"
    )]
    BadDockerfile(String),
    #[error("reading the upload")]
    Read(#[source] io::Error),
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
}

impl ContextError {
    /// A stable code for the API's error body.
    pub fn code(&self) -> &'static str {
        match self {
            ContextError::TooLarge { .. } => "too_large",
            ContextError::Io { .. } => "internal",
            _ => "invalid_request",
        }
    }
}

/// An unpacked build context; its directory is removed when this is dropped.
pub struct BuildContext {
    tmp: tempfile::TempDir,
}

impl BuildContext {
    /// The context directory (what `buildah build` is given).
    pub fn dir(&self) -> PathBuf {
        self.tmp.path().join("ctx")
    }

    /// Scratch space beside (not inside) the context, removed with it.
    pub(crate) fn scratch(&self) -> &Path {
        self.tmp.path()
    }

    /// The Dockerfile at `rel` in the context, which must be a regular file there.
    pub fn dockerfile(&self, rel: &str) -> Result<PathBuf, ContextError> {
        if !is_plain_relative(Path::new(rel)) {
            return Err(ContextError::BadDockerfile(rel.to_string()));
        }
        let path = self.dir().join(rel);
        // symlink_metadata: a Dockerfile that is a symlink could point out of the context.
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_file() => Ok(path),
            _ => Err(ContextError::NoDockerfile(rel.to_string())),
        }
    }
}

/// An uploaded archive on disk; removed when this is dropped.
pub struct Upload {
    _tmp: tempfile::TempDir,
    pub path: PathBuf,
}

impl Images {
    /// Unpacks a tar (plain or gzip) of a build context from `body`, refusing unsafe entries
    /// and anything over `limit` bytes.
    pub async fn receive_context<R>(
        &self,
        body: R,
        limit: u64,
    ) -> Result<BuildContext, ContextError>
    where
        R: AsyncRead + Send + Unpin + 'static,
    {
        let root = self.tmp_dir().map_err(|e| ContextError::Io {
            what: e.to_string(),
            source: io::Error::other("cannot create the temp directory"),
        })?;
        let reader = tokio_util::io::SyncIoBridge::new(body);
        tokio::task::spawn_blocking(move || unpack_context(reader, &root, limit))
            .await
            .map_err(|e| ContextError::Io {
                what: "unpacking the build context".into(),
                source: io::Error::other(e.to_string()),
            })?
    }

    /// Saves an uploaded image archive to a temp file, refusing anything over `limit` bytes.
    pub async fn receive_upload<R>(&self, body: R, limit: u64) -> Result<Upload, ContextError>
    where
        R: AsyncRead + Send + Unpin + 'static,
    {
        let io_err = |what: &str| {
            let what = what.to_string();
            move |source| ContextError::Io { what, source }
        };
        let root = self.tmp_dir().map_err(|e| ContextError::Io {
            what: e.to_string(),
            source: io::Error::other("cannot create the temp directory"),
        })?;
        let tmp = tempfile::Builder::new()
            .prefix("upload-")
            .tempdir_in(&root)
            .map_err(io_err("creating an upload directory"))?;
        let path = tmp.path().join("archive.tar");
        let mut file = tokio::fs::File::create(&path)
            .await
            .map_err(io_err("creating the upload file"))?;
        let mut limited = tokio::io::AsyncReadExt::take(body, limit + 1);
        let n = tokio::io::copy(&mut limited, &mut file)
            .await
            .map_err(ContextError::Read)?;
        if n > limit {
            return Err(ContextError::TooLarge { limit });
        }
        file.flush().await.map_err(io_err("writing the upload"))?;
        Ok(Upload { _tmp: tmp, path })
    }
}

/// Unpacks into a new temp directory under `root`.
pub(crate) fn unpack_context(
    body: impl Read,
    root: &Path,
    limit: u64,
) -> Result<BuildContext, ContextError> {
    let tmp = tempfile::Builder::new()
        .prefix("context-")
        .tempdir_in(root)
        .map_err(|source| ContextError::Io {
            what: format!("creating a temp directory in {}", root.display()),
            source,
        })?;
    let ctx = BuildContext { tmp };
    std::fs::create_dir(ctx.dir()).map_err(|source| ContextError::Io {
        what: "creating the context directory".into(),
        source,
    })?;
    let over = Arc::new(AtomicBool::new(false));
    let mut raw = BufReader::new(Limited::new(body, limit, over.clone()));
    let head = raw.fill_buf().map_err(|e| {
        if over.load(Ordering::Relaxed) {
            ContextError::TooLarge { limit }
        } else {
            ContextError::Read(e)
        }
    })?;
    let gzip = head.starts_with(&[0x1f, 0x8b]);
    let inner: Box<dyn Read> = if gzip {
        Box::new(Limited::new(
            flate2::read::MultiGzDecoder::new(raw),
            limit,
            over.clone(),
        ))
    } else {
        Box::new(raw)
    };
    let result = unpack_entries(inner, &ctx.dir());
    if over.load(Ordering::Relaxed) {
        return Err(ContextError::TooLarge { limit });
    }
    result?;
    Ok(ctx)
}

fn unpack_entries(reader: impl Read, dest: &Path) -> Result<(), ContextError> {
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    archive.set_preserve_mtime(true);
    archive.set_overwrite(true);
    archive.set_unpack_xattrs(false);
    for entry in archive.entries().map_err(ContextError::BadTar)? {
        let mut entry = entry.map_err(ContextError::BadTar)?;
        let path = entry.path().map_err(ContextError::BadTar)?.into_owned();
        let shown = path.display().to_string();
        let unsafe_entry = |reason| ContextError::Unsafe {
            path: shown.clone(),
            reason,
        };
        if path.components().all(|c| c == std::path::Component::CurDir) {
            continue; // "./": the context directory itself
        }
        if !is_plain_relative(&path) {
            return Err(unsafe_entry(
                "paths must be relative and must not contain `..`",
            ));
        }
        match entry.header().entry_type() {
            EntryType::Regular
            | EntryType::Continuous
            | EntryType::Directory
            | EntryType::Symlink => {}
            EntryType::Link => {
                let target = entry
                    .link_name()
                    .map_err(ContextError::BadTar)?
                    .unwrap_or_default();
                if !is_plain_relative(&target) {
                    return Err(unsafe_entry(
                        "a hard link must point to another entry of the archive",
                    ));
                }
            }
            EntryType::Char | EntryType::Block => {
                return Err(unsafe_entry("device files are not allowed"))
            }
            EntryType::Fifo => return Err(unsafe_entry("FIFOs are not allowed")),
            _ => return Err(unsafe_entry("unsupported entry type")),
        }
        let unpacked = entry.unpack_in(dest).map_err(|e| {
            // tar reports an entry that would land outside `dest` (through a symlink) as
            // an error whose message says so.
            if e.to_string().contains("outside of") {
                unsafe_entry("it would be written outside the context (through a symlink)")
            } else {
                ContextError::BadTar(e)
            }
        })?;
        if !unpacked {
            return Err(unsafe_entry("it would be written outside the context"));
        }
    }
    Ok(())
}

/// A reader that fails once more than `limit` bytes have been read, and says so in `over`.
struct Limited<R> {
    inner: R,
    left: u64,
    over: Arc<AtomicBool>,
}

impl<R> Limited<R> {
    fn new(inner: R, limit: u64, over: Arc<AtomicBool>) -> Self {
        Limited {
            inner,
            left: limit,
            over,
        }
    }
}

impl<R: Read> Read for Limited<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n as u64 > self.left {
            self.over.store(true, Ordering::Relaxed);
            return Err(io::Error::other("upload too large"));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tar with one entry whose name is written raw (the `tar` crate refuses to write `..`).
    fn raw_tar(name: &str, kind: u8, data: &[u8]) -> Vec<u8> {
        let mut h = [0u8; 512];
        h[..name.len()].copy_from_slice(name.as_bytes());
        h[100..107].copy_from_slice(b"0000644");
        h[108..115].copy_from_slice(b"0000000");
        h[116..123].copy_from_slice(b"0000000");
        h[124..135].copy_from_slice(format!("{:011o}", data.len()).as_bytes());
        h[136..147].copy_from_slice(b"00000000000");
        h[156] = kind;
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|&b| b as u32).sum();
        h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
        let mut out = h.to_vec();
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512 + 1024, 0);
        out
    }

    fn check(tar: &[u8], limit: u64) -> Result<(tempfile::TempDir, BuildContext), ContextError> {
        let root = tempfile::tempdir().unwrap();
        let r = unpack_context(tar, root.path(), limit);
        if r.is_err() {
            assert_eq!(
                std::fs::read_dir(root.path()).unwrap().count(),
                0,
                "left behind after an error"
            );
        }
        r.map(|ctx| (root, ctx))
    }

    #[test]
    fn entries() {
        let (_root, ok) = check(&raw_tar("Dockerfile", b'0', b"FROM scratch\n"), 1 << 20).unwrap();
        assert!(ok.dockerfile("Dockerfile").is_ok());
        assert!(matches!(
            ok.dockerfile("../Dockerfile"),
            Err(ContextError::BadDockerfile(_))
        ));
        assert!(matches!(
            ok.dockerfile("nope"),
            Err(ContextError::NoDockerfile(_))
        ));
        for (name, kind) in [
            ("../x", b'0'),
            ("a/../../x", b'0'),
            ("/etc/x", b'0'),
            ("dev", b'3'),
            ("fifo", b'6'),
        ] {
            let e = check(&raw_tar(name, kind, b"x"), 1 << 20)
                .err()
                .unwrap_or_else(|| panic!("{name} accepted"));
            assert!(matches!(e, ContextError::Unsafe { .. }), "{name}: {e}");
        }
        let e = check(&raw_tar("big", b'0', &[7; 4096]), 1000)
            .err()
            .unwrap();
        assert!(matches!(e, ContextError::TooLarge { .. }), "{e}");
    }

    #[test]
    fn symlink_escape() {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(EntryType::Symlink);
        h.set_size(0);
        b.append_link(&mut h, "link", "/tmp").unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_size(1);
        h.set_mode(0o644);
        b.append_data(&mut h, "link/escaped-by-hangar-test", &b"x"[..])
            .unwrap();
        let tar = b.into_inner().unwrap();
        let e = check(&tar, 1 << 20).err().unwrap();
        assert!(matches!(e, ContextError::Unsafe { .. }), "{e}");
        assert!(!Path::new("/tmp/escaped-by-hangar-test").exists());
    }
}
