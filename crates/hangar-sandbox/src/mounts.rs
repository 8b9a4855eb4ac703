//! Host mounts for drivers whose sandbox root is a host overlayfs: the volume on a loop
//! device, and the overlay of the image layers (read-only, shared) under the volume's
//! `upper` directory (the sandbox's writable layer).

use std::path::Path;

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::cmd;
use crate::driver::{DriverError, SandboxSpec};

/// Whether something is mounted exactly at `path`.
pub fn is_mounted(path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = path.to_string_lossy();
    info.lines()
        .any(|l| l.split(' ').nth(4).map(unescape).as_deref() == Some(&*want))
}

fn unescape(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// Mounts the volume and the overlay root; a no-op for what is mounted already.
pub fn mount_rootfs(sb: &SandboxSpec) -> Result<(), DriverError> {
    let l = sb.layout;
    let vol = l.volume_mount();
    std::fs::create_dir_all(&vol).map_err(DriverError::Rootfs)?;
    if !is_mounted(&vol) {
        mount_volume(&l.volume_image(), &vol)?;
    }
    let upper = vol.join("upper");
    let work = vol.join("work");
    for d in [&upper, &work] {
        std::fs::create_dir_all(d).map_err(DriverError::Rootfs)?;
    }
    let rootfs = l.rootfs();
    std::fs::create_dir_all(&rootfs).map_err(DriverError::Rootfs)?;
    if is_mounted(&rootfs) {
        return Ok(());
    }
    let lower: Vec<String> = sb
        .image
        .layers
        .iter()
        .rev()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.join(":"),
        upper.display(),
        work.display()
    );
    mount(
        Some("overlay"),
        &rootfs,
        Some("overlay"),
        MsFlags::MS_NODEV | MsFlags::MS_NOSUID,
        Some(opts.as_str()),
    )
    .map_err(|e| DriverError::Mount {
        what: "the overlay root",
        source: cmd::CmdError::Failed {
            program: "mount overlay".into(),
            status: e.to_string(),
            stderr: opts.clone(),
        },
    })?;
    Ok(())
}

/// Mounts the ext4 volume image at `target` through a loop device.
fn mount_volume(image: &Path, target: &Path) -> Result<(), DriverError> {
    let fail = |e: std::io::Error| DriverError::Mount {
        what: "the volume",
        source: cmd::CmdError::Failed {
            program: "mount".into(),
            status: e.to_string(),
            stderr: image.display().to_string(),
        },
    };
    let (dev, _held) = crate::loopdev::attach(image).map_err(fail)?;
    // `noinit_itable`: the image was made with lazy inode tables; initialising them in the
    // background would fill the sparse file with zeros for nothing.
    mount(
        Some(&dev),
        target,
        Some("ext4"),
        MsFlags::MS_NODEV | MsFlags::MS_NOSUID,
        Some("noinit_itable"),
    )
    .map_err(|e| fail(e.into()))
}

/// Unmounts the overlay root and the volume (which frees its loop device). Idempotent.
pub fn unmount_rootfs(sb: &SandboxSpec) -> Result<(), DriverError> {
    let l = sb.layout;
    for p in [l.rootfs(), l.volume_mount()] {
        unmount(&p)?;
    }
    Ok(())
}

fn unmount(p: &Path) -> Result<(), DriverError> {
    // A mount can be stacked more than once after a crash: unmount until nothing is left. A
    // runtime process that is still exiting can hold it for a moment: wait for it rather than
    // detach lazily, because a volume that is still mounted somewhere must never be mounted a
    // second time (two ext4 instances on one image corrupt it).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while is_mounted(p) {
        match umount2(p, MntFlags::empty()) {
            Ok(()) => {}
            Err(nix::errno::Errno::EBUSY) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(nix::errno::Errno::EINVAL) => return Ok(()),
            Err(e) => {
                return Err(DriverError::Other(format!(
                    "unmounting {}: {e}",
                    p.display()
                )))
            }
        }
    }
    Ok(())
}
