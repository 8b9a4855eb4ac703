//! The session volume: a sparse ext4 image per sandbox whose size is the disk limit.
//!
//! Every driver keeps the sandbox's writable layer in this one file, so suspend, resume,
//! hashing and deletion work the same way everywhere. Host-mounting drivers mount it with
//! a loop device; the `vm` driver hands it to the guest as a disk.

use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::cmd::{self, CmdError};

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("creating the volume image")]
    Create(#[source] std::io::Error),
    #[error("formatting the volume")]
    Format(#[source] CmdError),
}

/// Creates a sparse ext4 image of `size_mib` MiB at `path`: a copy of a template formatted
/// once per size in `templates` (copying the few hundred KiB of a fresh filesystem's metadata
/// is faster than running mkfs on the path of every sandbox start).
pub fn create(path: &Path, size_mib: u64, templates: &Path) -> Result<(), VolumeError> {
    let template = templates.join(format!("ext4-{size_mib}m.img"));
    if !template.exists() {
        std::fs::create_dir_all(templates).map_err(VolumeError::Create)?;
        // Format under a unique name, then rename: concurrent creators never see half a template.
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = templates.join(format!(
            ".ext4-{size_mib}m.{}.{seq}.tmp",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&tmp);
        format(&tmp, size_mib)?;
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(VolumeError::Create)?;
        std::fs::rename(&tmp, &template).map_err(VolumeError::Create)?;
    }
    copy_sparse(&template, path).map_err(VolumeError::Create)
}

fn format(path: &Path, size_mib: u64) -> Result<(), VolumeError> {
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(VolumeError::Create)?;
    file.set_len(size_mib * 1024 * 1024)
        .map_err(VolumeError::Create)?;
    drop(file);
    // No reserved blocks: the sandbox owns the whole volume, so a full volume is ENOSPC for
    // the agent, not for root only. Lazy table initialisation keeps the image sparse; the
    // volume is mounted with `noinit_itable` so the kernel does not fill it in later.
    cmd::run(
        Command::new("mkfs.ext4")
            .args([
                "-q",
                "-F",
                "-m",
                "0",
                "-E",
                "lazy_itable_init=1,lazy_journal_init=1,nodiscard",
            ])
            .arg(path),
    )
    .map_err(VolumeError::Format)?;
    Ok(())
}

/// Copies the data extents of sparse file `from` into a new file `to` of the same length.
fn copy_sparse(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let src = std::fs::File::open(from)?;
    let dst = OpenOptions::new().write(true).create_new(true).open(to)?;
    let len = src.metadata()?.len() as i64;
    dst.set_len(len as u64)?;
    let mut pos: i64 = 0;
    while pos < len {
        // SAFETY: plain lseek on a descriptor we own; the result is checked.
        let data = unsafe { libc::lseek(src.as_raw_fd(), pos, libc::SEEK_DATA) };
        if data < 0 {
            break; // ENXIO: only a hole is left
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(src.as_raw_fd(), data, libc::SEEK_HOLE) };
        let end = if hole < 0 { len } else { hole };
        let (mut off_in, mut off_out) = (data, data);
        while off_in < end {
            // SAFETY: both descriptors are open; the offsets are valid i64s owned by this frame.
            let n = unsafe {
                libc::copy_file_range(
                    src.as_raw_fd(),
                    &mut off_in,
                    dst.as_raw_fd(),
                    &mut off_out,
                    (end - off_in) as usize,
                    0,
                )
            };
            if n < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if n == 0 {
                break;
            }
        }
        pos = end;
    }
    Ok(())
}

/// Bytes the file really occupies on disk (sparse files count only their data).
pub fn allocated_bytes(path: &Path) -> u64 {
    std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

/// Feeds the data extents of a sparse file (offset and bytes) into `hasher`, skipping holes,
/// so that hashing a mostly empty 1 GiB volume reads only what was written.
pub fn hash_sparse(path: &Path, hasher: &mut Sha256) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut file = std::fs::File::open(path)?;
    let len = file.metadata()?.len() as i64;
    let fd = file.as_raw_fd();
    let mut pos: i64 = 0;
    let mut buf = vec![0u8; 1 << 20];
    while pos < len {
        // SAFETY: plain lseek on a descriptor we own; the result is checked.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            break; // ENXIO: no more data after pos
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let end = if hole < 0 { len } else { hole };
        hasher.update(data.to_le_bytes());
        file.seek(SeekFrom::Start(data as u64))?;
        let mut left = (end - data) as usize;
        while left > 0 {
            let n = file.read(&mut buf[..left.min(1 << 20)])?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            left -= n;
        }
        pos = end;
    }
    Ok(())
}
