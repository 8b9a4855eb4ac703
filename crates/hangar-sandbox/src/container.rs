//! The `container` driver: `crun` on an OCI bundle whose root is a host overlay.
//!
//! Namespaces, cgroup v1 limits and a reduced capability set; the weakest isolation of the
//! three drivers and the fastest to start. Suspend keeps files only: the processes are
//! stopped and the agent's command starts again on resume.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hangar_proto::sandbox::{CheckpointMode, DriverKind};

use crate::cmd;
use crate::driver::{Driver, DriverError, Resumed, SandboxSpec, Suspended};
use crate::link::InitLink;
use crate::mounts;
use crate::oci::{self, Flavor};

/// crun's state directory for Hangar's containers, apart from any other user of crun.
const CRUN_ROOT: &str = "/run/hangar-crun";

pub struct ContainerDriver {
    /// crun refuses cgroup "hybrid" hosts (v1 controllers plus an empty v2 hierarchy at
    /// `/sys/fs/cgroup/unified`); each crun call then runs in a private mount namespace
    /// without that mount, which crun sees as plain cgroup v1.
    hide_unified: bool,
}

impl Default for ContainerDriver {
    fn default() -> Self {
        Self::new()
    }
}

impl ContainerDriver {
    pub fn new() -> ContainerDriver {
        ContainerDriver {
            hide_unified: mounts::is_mounted(Path::new("/sys/fs/cgroup/unified")),
        }
    }

    /// A `crun` command with Hangar's state root, set up to run on this host's cgroups.
    pub fn crun_command(&self) -> Command {
        let mut c = Command::new("crun");
        c.args(["--root", CRUN_ROOT]);
        if self.hide_unified {
            // SAFETY: runs in the forked child before exec; it only makes raw syscalls
            // (unshare, mount, umount2), which are async-signal-safe, and allocates nothing.
            unsafe {
                c.pre_exec(|| {
                    use nix::mount::{mount, umount2, MntFlags, MsFlags};
                    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)?;
                    mount(
                        None::<&str>,
                        "/",
                        None::<&str>,
                        MsFlags::MS_REC | MsFlags::MS_SLAVE,
                        None::<&str>,
                    )?;
                    umount2("/sys/fs/cgroup/unified", MntFlags::MNT_DETACH)?;
                    Ok(())
                });
            }
        }
        c
    }

    fn status(&self, id: &str) -> Option<String> {
        let out = cmd::run(self.crun_command().args(["state", id])).ok()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        v.get("status").and_then(|s| s.as_str()).map(str::to_owned)
    }

    fn run(&self, sb: &SandboxSpec) -> Result<(), DriverError> {
        let t0 = Instant::now();
        mounts::mount_rootfs(sb)?;
        let mounted = t0.elapsed();
        sb.write_init_config()?;
        oci::write_bundle(sb, Flavor::Crun)?;
        // A record left by a crash would make `run` fail with "container already exists".
        if Path::new(CRUN_ROOT).join(&sb.layout.id).exists() {
            let _ = cmd::run(self.crun_command().args(["delete", "-f", &sb.layout.id]));
        }
        let deleted = t0.elapsed();
        let log = console(sb)?;
        let mut c = self.crun_command();
        c.args(["run", "-d", "--bundle"])
            .arg(sb.layout.bundle())
            .arg(&sb.layout.id);
        c.stdout(log.try_clone().map_err(DriverError::Rootfs)?)
            .stderr(log);
        let out = cmd::output(c.stdin(Stdio::null()))
            .map_err(|e| DriverError::Other(format!("cannot run crun: {e}")))?;
        if !out.status.success() {
            return Err(DriverError::Start(cmd::CmdError::Failed {
                program: "crun run".into(),
                status: out.status.to_string(),
                stderr: crate::driver::log_tail(&sb.layout.console_log(), 5),
            }));
        }
        tracing::debug!(sandbox = %sb.layout.id, ?mounted, ?deleted, ran = ?t0.elapsed(), "crun run");
        Ok(())
    }

    fn stop(&self, id: &str) {
        if self.status(id).as_deref() == Some("running") {
            // hangar-init stops the agent gracefully, syncs and exits on SIGTERM.
            let _ = cmd::run(self.crun_command().args(["kill", id, "TERM"]));
            let deadline = Instant::now() + Duration::from_secs(12);
            while Instant::now() < deadline && self.status(id).as_deref() == Some("running") {
                std::thread::sleep(Duration::from_millis(5));
            }
            let _ = cmd::run(self.crun_command().args(["kill", "--all", id, "KILL"]));
        }
        let _ = cmd::run(self.crun_command().args(["delete", "-f", id]));
    }
}

/// Opens the sandbox's console log for appending; the runtime hands it to `hangar-init`.
pub(crate) fn console(sb: &SandboxSpec) -> Result<std::fs::File, DriverError> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(sb.layout.console_log())
        .map_err(DriverError::Rootfs)
}

impl Driver for ContainerDriver {
    fn kind(&self) -> DriverKind {
        DriverKind::Container
    }

    fn start(&self, sb: &SandboxSpec) -> Result<(), DriverError> {
        self.run(sb)
    }

    fn suspend(&self, sb: &SandboxSpec, _link: &InitLink) -> Result<Suspended, DriverError> {
        self.stop(&sb.layout.id);
        // Unmounting flushes the volume; what remains is the volume image alone.
        mounts::unmount_rootfs(sb)?;
        Ok(Suspended {
            mode: CheckpointMode::Filesystem,
            note: None,
        })
    }

    fn resume(&self, sb: &SandboxSpec) -> Result<Resumed, DriverError> {
        self.run(sb)?;
        Ok(Resumed::Filesystem { note: None })
    }

    fn destroy(&self, sb: &SandboxSpec) -> Result<(), DriverError> {
        self.stop(&sb.layout.id);
        mounts::unmount_rootfs(sb)
    }

    fn alive(&self, sb: &SandboxSpec) -> bool {
        self.status(&sb.layout.id).as_deref() == Some("running")
    }
}
