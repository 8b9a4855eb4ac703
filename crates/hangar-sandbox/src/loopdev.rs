//! Loop devices, attached with `LOOP_CONFIGURE` directly rather than through `mount -o loop`:
//! the ioctl path is a fraction of a millisecond where spawning mount(8) costs several, and
//! volume mounting is on the path of every sandbox start.
//!
//! The device is attached with `LO_FLAGS_AUTOCLEAR`, so it detaches by itself when the
//! filesystem on it is unmounted: nothing here needs to remember it.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LO_FLAGS_AUTOCLEAR: u32 = 4;

/// `struct loop_info64` from `<linux/loop.h>`.
#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

/// `struct loop_config` from `<linux/loop.h>`.
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

/// How long `attach` waits for a previous attachment of the same image to go away.
const ATTACHED_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Attaches `image` to a free loop device and returns the device's path. The returned file
/// keeps the device open; drop it once the filesystem is mounted.
pub fn attach(image: &Path) -> std::io::Result<(PathBuf, File)> {
    // Still mounted somewhere: a mount namespace of the stopped sandbox that the kernel has
    // not torn down yet (it does so asynchronously, slower on a busy host). The device
    // detaches itself (autoclear) once that last mount is gone; wait for it a while, since
    // mounting the same ext4 image twice would corrupt it.
    let deadline = std::time::Instant::now() + ATTACHED_WAIT;
    while let Some(dev) = attached_to(image)? {
        if std::time::Instant::now() >= deadline {
            return Err(std::io::Error::other(format!(
                "{} is still attached to {} after {ATTACHED_WAIT:?}; its previous mount is in use",
                image.display(),
                dev.display()
            )));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let backing = OpenOptions::new().read(true).write(true).open(image)?;
    let control = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/loop-control")?;
    // Another process may take the same free device between the two ioctls; try again then.
    for _ in 0..16 {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a device number.
        let n = unsafe { libc::ioctl(control.as_raw_fd(), LOOP_CTL_GET_FREE) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let path = PathBuf::from(format!("/dev/loop{n}"));
        let dev = OpenOptions::new().read(true).write(true).open(&path)?;
        // SAFETY: LoopConfig is plain old data; all-zero is a valid value for every field.
        let mut cfg: LoopConfig = unsafe { std::mem::zeroed() };
        cfg.fd = backing.as_raw_fd() as u32;
        cfg.info.lo_flags = LO_FLAGS_AUTOCLEAR;
        // SAFETY: `cfg` is a valid loop_config that outlives the call; the kernel only reads it.
        let r = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CONFIGURE, &cfg as *const LoopConfig) };
        if r == 0 {
            return Ok((path, dev));
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EBUSY) {
            return Err(err);
        }
    }
    Err(std::io::Error::other(
        "no free loop device after 16 attempts",
    ))
}

/// The loop device `image` is attached to, if any.
fn attached_to(image: &Path) -> std::io::Result<Option<PathBuf>> {
    let image = std::fs::canonicalize(image)?;
    let Ok(dir) = std::fs::read_dir("/sys/block") else {
        return Ok(None);
    };
    for entry in dir.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().starts_with("loop") {
            continue;
        }
        if let Ok(backing) = std::fs::read_to_string(entry.path().join("loop/backing_file")) {
            if Path::new(backing.trim_end()) == image {
                return Ok(Some(Path::new("/dev").join(name)));
            }
        }
    }
    Ok(None)
}
