//! The host cgroup a VM's QEMU runs in. The guest's limits are the VM's own (RAM, vCPUs), but
//! vCPUs are whole: a sandbox with `cpus: 0.5` gets one vCPU, which without this could use a
//! whole host core, and QEMU's own memory (device emulation, TCG's translation cache) would
//! count nowhere. So QEMU is started inside `hangar-vm/<id>`: a CPU quota of exactly `cpus`,
//! and a memory limit of the guest's RAM plus QEMU's overhead. cgroup v2, or v1 `cpu` and
//! `memory` hierarchies.

use std::ffi::CString;
use std::path::{Path, PathBuf};

const ROOT: &str = "/sys/fs/cgroup";
const GROUP: &str = "hangar-vm";
const PERIOD_US: u64 = 100_000;

/// A VM's cgroup directories (one on v2; `cpu` and `memory` on v1).
#[derive(Debug, Clone)]
pub struct Cgroup {
    dirs: Vec<PathBuf>,
}

/// The limits to apply.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub cpus: f64,
    pub memory_bytes: u64,
}

fn v2() -> bool {
    Path::new(ROOT).join("cgroup.controllers").exists()
}

impl Cgroup {
    /// The cgroup of VM `id` (nothing is created yet).
    pub fn of(id: &str) -> Cgroup {
        let dirs = if v2() {
            vec![Path::new(ROOT).join(GROUP).join(id)]
        } else {
            ["cpu", "memory"]
                .iter()
                .map(|c| Path::new(ROOT).join(c).join(GROUP).join(id))
                .collect()
        };
        Cgroup { dirs }
    }

    /// Creates the cgroup with `limits`. Returns what a child must write to join it (see
    /// [`Cgroup::join`]).
    pub fn create(&self, limits: Limits) -> std::io::Result<Vec<CString>> {
        let quota = ((limits.cpus * PERIOD_US as f64).round() as u64).max(1000);
        if v2() {
            // The controllers must be enabled on the way down.
            let parent = Path::new(ROOT).join(GROUP);
            std::fs::create_dir_all(&parent)?;
            for dir in [Path::new(ROOT), parent.as_path()] {
                std::fs::write(dir.join("cgroup.subtree_control"), "+cpu +memory")?;
            }
            let dir = &self.dirs[0];
            std::fs::create_dir_all(dir)?;
            std::fs::write(dir.join("cpu.max"), format!("{quota} {PERIOD_US}"))?;
            std::fs::write(dir.join("memory.max"), limits.memory_bytes.to_string())?;
        } else {
            for dir in &self.dirs {
                std::fs::create_dir_all(dir)?;
                if dir.starts_with(Path::new(ROOT).join("cpu")) {
                    std::fs::write(dir.join("cpu.cfs_period_us"), PERIOD_US.to_string())?;
                    std::fs::write(dir.join("cpu.cfs_quota_us"), quota.to_string())?;
                } else {
                    std::fs::write(
                        dir.join("memory.limit_in_bytes"),
                        limits.memory_bytes.to_string(),
                    )?;
                }
            }
        }
        self.dirs
            .iter()
            .map(|d| {
                CString::new(d.join("cgroup.procs").as_os_str().as_encoded_bytes())
                    .map_err(std::io::Error::other)
            })
            .collect()
    }

    /// Moves the calling process into the cgroup: for a `pre_exec` hook, between fork and
    /// exec, so it only opens and writes.
    ///
    /// # Safety
    /// Async-signal-safe: no allocation, only open(2), write(2) and close(2).
    pub unsafe fn join(procs: &[CString]) -> std::io::Result<()> {
        for p in procs {
            let fd = libc::open(p.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let n = libc::write(fd, b"0".as_ptr().cast(), 1);
            libc::close(fd);
            if n != 1 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    }

    /// Removes the cgroup once nothing runs in it. Idempotent. A QEMU that is gone may still
    /// be a zombie that counts as a member until it is reaped — by the host's PID 1 when it
    /// outlived the Hangar that started it, which can take a second or more — so a busy cgroup
    /// is retried for a while.
    pub fn remove(&self) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        for dir in &self.dirs {
            loop {
                match std::fs::remove_dir(dir) {
                    Err(e)
                        if e.raw_os_error() == Some(libc::EBUSY)
                            && std::time::Instant::now() < deadline =>
                    {
                        std::thread::sleep(std::time::Duration::from_millis(10));
                    }
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        tracing::warn!(cgroup = %dir.display(), error = %e, "cannot remove a VM's cgroup");
                        break;
                    }
                    _ => break,
                }
            }
        }
    }
}
