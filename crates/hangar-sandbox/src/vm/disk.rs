//! The image as a read-only disk: one erofs file per image, built once from the image's
//! layers and shared (QEMU `readonly=on`) by every VM of that image.
//!
//! The layers are merged by the host kernel (a read-only overlay mount, so whiteouts are
//! applied exactly as the other drivers see them) and `mkfs.erofs` packs the merged tree.

use std::path::{Path, PathBuf};
use std::process::Command;

use hangar_image::Image;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use sha2::{Digest, Sha256};

use crate::cmd::{self, CmdError};

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("preparing {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("merging the image layers")]
    Merge(#[source] nix::Error),
    #[error("packing the image disk (is erofs-utils installed? apt-get install erofs-utils)")]
    Pack(#[source] CmdError),
}

/// The image's disk under `dir`, built if it is not there yet. Concurrent callers for the same
/// image may both build; the rename makes one of them win whole.
pub fn image_disk(image: &Image, dir: &Path) -> Result<PathBuf, DiskError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| DiskError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    // An image's disk holds every file of the image, including those the image itself keeps
    // from other users: only root may read them (QEMU opens them before dropping to nobody).
    use std::os::unix::fs::PermissionsExt;
    for d in [dir, dir.parent().unwrap_or(dir)] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700)).map_err(io(d))?;
    }
    let disk = dir.join(format!("{}.erofs", key(image)));
    if disk.exists() {
        return Ok(disk);
    }
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(".build-{}-{seq}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    let result = build(image, &tmp, &disk);
    if tmp.join("root").exists() {
        let _ = umount2(&tmp.join("root"), MntFlags::MNT_DETACH);
    }
    let _ = std::fs::remove_dir_all(&tmp);
    result.map(|()| disk)
}

fn build(image: &Image, tmp: &Path, disk: &Path) -> Result<(), DiskError> {
    let source = if image.layers.len() == 1 {
        image.layers[0].clone()
    } else {
        let root = tmp.join("root");
        std::fs::create_dir_all(&root).map_err(|source| DiskError::Io {
            path: root.clone(),
            source,
        })?;
        let lower: Vec<String> = image
            .layers
            .iter()
            .rev()
            .map(|p| p.to_string_lossy().into_owned())
            .collect();
        mount(
            Some("overlay"),
            &root,
            Some("overlay"),
            MsFlags::MS_RDONLY,
            Some(format!("lowerdir={}", lower.join(":")).as_str()),
        )
        .map_err(DiskError::Merge)?;
        root
    };
    let out = tmp.join("disk.erofs");
    cmd::run(
        Command::new("mkfs.erofs")
            .arg("--quiet")
            .arg(&out)
            .arg(&source),
    )
    .map_err(DiskError::Pack)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o600)).map_err(|source| {
        DiskError::Io {
            path: out.clone(),
            source,
        }
    })?;
    std::fs::rename(&out, disk).map_err(|source| DiskError::Io {
        path: disk.to_owned(),
        source,
    })
}

/// Names the disk after the image's content. Layers in the store are content-addressed and
/// immutable, so their paths say it all; a plain root filesystem directory can change under
/// the same path, so its tree's metadata is part of the key.
fn key(image: &Image) -> String {
    let mut h = Sha256::new();
    h.update(image.id.as_bytes());
    for layer in &image.layers {
        h.update(layer.as_os_str().as_encoded_bytes());
        h.update([0]);
    }
    if image.id.starts_with("rootfs:") {
        for layer in &image.layers {
            fingerprint(layer, &mut h);
        }
    }
    hex::encode(&h.finalize()[..12])
}

/// Every path's name, size, mode and modification time under `dir`, in a stable order.
fn fingerprint(dir: &Path, h: &mut Sha256) {
    use std::os::unix::fs::MetadataExt;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        let mut entries: Vec<_> = rd.flatten().collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let Ok(m) = e.path().symlink_metadata() else {
                continue;
            };
            h.update(e.path().as_os_str().as_encoded_bytes());
            h.update(m.size().to_le_bytes());
            h.update(m.mode().to_le_bytes());
            h.update(m.mtime().to_le_bytes());
            h.update(m.mtime_nsec().to_le_bytes());
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
}
