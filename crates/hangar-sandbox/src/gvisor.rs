//! The `gvisor` driver: `runsc` (gVisor) on an OCI bundle whose root is a host overlay.
//!
//! The sandbox runs on gVisor's user-space kernel with `--network=none` (loopback only) and
//! `--host-uds=all`, so that `hangar-init` can bind its sockets in the host run directory.
//! Suspend is a memory checkpoint: processes continue where they were after resume.
//! gVisor cannot checkpoint while a host socket is open, so `hangar-init` is asked to close
//! its sockets first and told (`SIGUSR2`) to bind them again after the restore.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use hangar_proto::sandbox::{CheckpointMode, DriverKind};

use crate::cmd::{self, CmdError};
use crate::container::console;
use crate::driver::{Driver, DriverError, Resumed, SandboxSpec, Suspended};
use crate::link::InitLink;
use crate::mounts;
use crate::oci::{self, Flavor};

const RUNSC_ROOT: &str = "/run/hangar-runsc";
/// Written into the checkpoint directory once `runsc checkpoint` has succeeded, so that a
/// half-written image (Hangar died mid-suspend) is never restored.
const COMPLETE: &str = "hangar-complete";

#[derive(Default)]
pub struct GvisorDriver;

impl GvisorDriver {
    pub fn new() -> GvisorDriver {
        GvisorDriver
    }

    fn runsc(&self) -> Command {
        let mut c = Command::new("runsc");
        c.args([
            "--root",
            RUNSC_ROOT,
            "--network=none",
            "--host-uds=all",
            "--overlay2=none",
        ]);
        // For diagnosing the runtime itself: runsc's own debug logs, one file per command.
        if let Some(dir) = std::env::var_os("HANGAR_RUNSC_DEBUG_LOG") {
            let mut arg = std::ffi::OsString::from("--debug-log=");
            arg.push(dir);
            arg.push("/");
            c.arg("--debug").arg(arg);
        }
        c
    }

    fn status(&self, id: &str) -> Option<String> {
        self.state(id).map(|(status, _)| status)
    }

    /// The container's status and the pid of its sandbox process.
    fn state(&self, id: &str) -> Option<(String, i32)> {
        let out = cmd::run(self.runsc().args(["state", id])).ok()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let status = v.get("status").and_then(|s| s.as_str())?.to_owned();
        Some((
            status,
            v.get("pid").and_then(|p| p.as_i64()).unwrap_or(-1) as i32,
        ))
    }

    fn delete(&self, id: &str) {
        let _ = cmd::run(self.runsc().args(["delete", "-force", id]));
    }

    /// Whether runsc has a record of `id` (its state file is `<id>_sandbox:<id>.state`).
    /// Checking costs nothing; `runsc delete` of an unknown id costs a runsc start.
    fn known(&self, id: &str) -> bool {
        Path::new(RUNSC_ROOT)
            .join(format!("{id}_sandbox:{id}.state"))
            .exists()
    }

    /// Removes a leftover record of `id` (from a crash) so that `run`/`restore` can use the id.
    fn clear(&self, id: &str) {
        if self.known(id) {
            self.delete(id);
        }
    }

    /// Runs a runsc command that starts a detached sandbox. Its stdio goes to the console log:
    /// the sandbox inherits it, and a pipe would keep the caller waiting for ever.
    fn launch(&self, sb: &SandboxSpec, args: &[&str]) -> Result<(), CmdError> {
        let log = console(sb).map_err(|e| CmdError::Spawn {
            program: "runsc".into(),
            source: std::io::Error::other(e),
        })?;
        let mut c = self.runsc();
        c.args(args).arg(&sb.layout.id);
        let out = cmd::status(
            c.stdin(Stdio::null())
                .stdout(log.try_clone().map_err(|source| CmdError::Spawn {
                    program: "runsc".into(),
                    source,
                })?)
                .stderr(log),
        )
        .map_err(|source| CmdError::Spawn {
            program: "runsc".into(),
            source,
        })?;
        if !out.success() {
            return Err(CmdError::Failed {
                program: format!("runsc {}", args[0]),
                status: out.to_string(),
                stderr: crate::driver::log_tail(&sb.layout.console_log(), 5),
            });
        }
        Ok(())
    }

    /// Restores the memory checkpoint in `dir` and has hangar-init bind its sockets again.
    fn restore(&self, sb: &SandboxSpec, dir: &Path) -> Result<(), CmdError> {
        let t0 = std::time::Instant::now();
        let io = |e: DriverError| CmdError::Spawn {
            program: "runsc restore".into(),
            source: std::io::Error::other(e.to_string()),
        };
        mounts::mount_rootfs(sb).map_err(io)?;
        oci::write_bundle(sb, Flavor::Runsc).map_err(io)?;
        self.clear(&sb.layout.id);
        let prepared = t0.elapsed();
        let bundle = sb.layout.bundle();
        self.launch(
            sb,
            &[
                "restore",
                "-detach",
                "-bundle",
                &bundle.to_string_lossy(),
                "-image-path",
                &dir.to_string_lossy(),
            ],
        )?;
        let restored = t0.elapsed();
        self.rebind(sb)?;
        tracing::debug!(sandbox = %sb.layout.id, ?prepared, ?restored, total = ?t0.elapsed(), "gvisor resume");
        Ok(())
    }

    /// Suspends without memory when `runsc checkpoint` failed: this runsc cannot save some
    /// states (e.g. a listening TCP socket that epoll watches: "endpoint still has waiters upon
    /// save"), and a failed checkpoint may take the sandbox down. hangar-init synced the
    /// filesystems before the attempt, so the files are safe either way: stop what still runs
    /// and keep the files, like the container driver.
    fn suspend_files(&self, sb: &SandboxSpec, why: &str) -> Result<Suspended, DriverError> {
        let id = &sb.layout.id;
        tracing::warn!(sandbox = %id, error = %why, "memory checkpoint failed; suspending with files only");
        if self.status(id).as_deref() == Some("running") {
            let _ = cmd::run(self.runsc().args(["kill", id, "TERM"]));
            let deadline = std::time::Instant::now() + Duration::from_secs(12);
            while std::time::Instant::now() < deadline
                && self.status(id).as_deref() == Some("running")
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = cmd::run(self.runsc().args(["kill", id, "KILL"]));
        }
        self.delete(id);
        let _ = std::fs::remove_dir_all(sb.layout.checkpoint());
        mounts::unmount_rootfs(sb)?;
        Ok(Suspended {
            mode: CheckpointMode::Filesystem,
            note: Some(format!(
                "the memory checkpoint failed, so processes were stopped and files kept ({why})"
            )),
        })
    }

    /// Tells the restored hangar-init to bind its sockets again, until `control.sock` is back.
    /// Right after `restore -detach` returns, the sandbox may not take signals yet ("sandbox is
    /// not running"), and a signal can be lost while it settles; both are retried.
    fn rebind(&self, sb: &SandboxSpec) -> Result<(), CmdError> {
        // Generous: on a busy host (a TCG microVM next door takes a core) a restored
        // hangar-init was seen to need more than 5 s to bind again.
        let deadline = std::time::Instant::now() + Duration::from_secs(12);
        let sock = sb.layout.control_socket();
        loop {
            let sent = cmd::run(self.runsc().args(["kill", &sb.layout.id, "USR2"]));
            if sent.is_err() && self.status(&sb.layout.id).as_deref() == Some("stopped") {
                return Err(CmdError::Failed {
                    program: "runsc restore".into(),
                    status: "stopped".into(),
                    stderr: "the restored sandbox stopped at once".into(),
                });
            }
            let next = std::time::Instant::now() + Duration::from_millis(250);
            while std::time::Instant::now() < next {
                if sock.exists() {
                    return Ok(());
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            if std::time::Instant::now() > deadline {
                return sent.and(Err(CmdError::Failed {
                    program: "runsc kill USR2".into(),
                    status: "timeout".into(),
                    stderr: "hangar-init did not bind its sockets after the restore".into(),
                }));
            }
        }
    }

    fn cold_start(&self, sb: &SandboxSpec) -> Result<(), DriverError> {
        mounts::mount_rootfs(sb)?;
        sb.write_init_config()?;
        oci::write_bundle(sb, Flavor::Runsc)?;
        self.clear(&sb.layout.id);
        let bundle = sb.layout.bundle();
        self.launch(
            sb,
            &["run", "-detach", "-bundle", &bundle.to_string_lossy()],
        )
        .map_err(DriverError::Start)
    }
}

/// A short reason from `runsc checkpoint`'s error (which ends in a goroutine dump).
fn checkpoint_failure(stderr: &str) -> String {
    if stderr.contains("still has waiters upon save") {
        return "this runsc cannot save a listening TCP socket that epoll watches".into();
    }
    if stderr.contains("bound host socket") {
        return "a unix socket on the host side was still open".into();
    }
    let first = stderr
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("unknown error");
    first.chars().take(200).collect()
}

impl Driver for GvisorDriver {
    fn kind(&self) -> DriverKind {
        DriverKind::Gvisor
    }

    fn start(&self, sb: &SandboxSpec) -> Result<(), DriverError> {
        self.cold_start(sb)
    }

    fn suspend(&self, sb: &SandboxSpec, link: &InitLink) -> Result<Suspended, DriverError> {
        let id = &sb.layout.id;
        let t0 = std::time::Instant::now();
        let sandbox_pid = self.state(id).map(|(_, pid)| pid).unwrap_or(-1);
        let handle = tokio::runtime::Handle::current();
        handle
            .block_on(link.suspend())
            .map_err(|e| DriverError::Link(e.to_string()))?;
        let prepared = t0.elapsed();
        let dir = sb.layout.checkpoint();
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(DriverError::Rootfs)?;
        // hangar-init closes its last host socket right after answering; a checkpoint that
        // starts in that instant fails with "bound host socket" and is simply tried again.
        let mut attempt = 0;
        loop {
            // The reason for a failure sits in the middle of a long dump: read it whole.
            let r = match cmd::output(
                self.runsc()
                    .args(["checkpoint", "-image-path"])
                    .arg(&dir)
                    .arg(id)
                    .stdin(std::process::Stdio::null())
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::piped()),
            ) {
                Ok(out) if out.status.success() => Ok(()),
                Ok(out) => Err(checkpoint_failure(&String::from_utf8_lossy(&out.stderr))),
                Err(e) => Err(e.to_string()),
            };
            match r {
                Ok(_) => break,
                Err(e) if attempt < 20 && self.status(id).as_deref() == Some("running") => {
                    tracing::debug!(sandbox = %id, error = %e, "checkpoint refused, retrying");
                    attempt += 1;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return self.suspend_files(sb, &e),
            }
        }
        let checkpointed = t0.elapsed();
        std::fs::write(dir.join(COMPLETE), b"").map_err(DriverError::Rootfs)?;
        // `runsc delete` polls slowly for a sandbox process that has not gone yet; it exits
        // right after the checkpoint (and the reaper collects it), so wait for that here.
        crate::reaper::wait_reaped(sandbox_pid, Duration::from_secs(3));
        self.delete(id);
        mounts::unmount_rootfs(sb)?;
        tracing::debug!(sandbox = %id, ?prepared, ?checkpointed, total = ?t0.elapsed(), attempts = attempt + 1, "gvisor suspend");
        Ok(Suspended {
            mode: CheckpointMode::Memory,
            note: None,
        })
    }

    fn resume(&self, sb: &SandboxSpec) -> Result<Resumed, DriverError> {
        let dir = sb.layout.checkpoint();
        if !dir.join(COMPLETE).exists() {
            // Nothing to restore (a checkpoint never completed): start afresh on the same files.
            self.cold_start(sb)?;
            return Ok(Resumed::Filesystem { note: None });
        }
        match self.restore(sb, &dir) {
            Ok(()) => {
                let _ = std::fs::remove_dir_all(&dir);
                Ok(Resumed::Memory)
            }
            Err(e) => {
                // This runsc occasionally restores a process that then crashes (seen: a
                // segfault in a restored thread). The files are intact, so the sandbox comes
                // back on them rather than not at all; the checkpoint is kept for diagnosis.
                let note = format!(
                    "the memory checkpoint could not be restored ({e}); restarted on its files"
                );
                tracing::warn!(sandbox = %sb.layout.id, error = %e, "restore failed; starting afresh on the files");
                let _ = cmd::run(self.runsc().args(["kill", &sb.layout.id, "KILL"]));
                self.delete(&sb.layout.id);
                let kept = sb.layout.dir.join("checkpoint.failed");
                let _ = std::fs::remove_dir_all(&kept);
                let _ = std::fs::rename(&dir, &kept);
                self.cold_start(sb)?;
                Ok(Resumed::Filesystem { note: Some(note) })
            }
        }
    }

    fn destroy(&self, sb: &SandboxSpec) -> Result<(), DriverError> {
        let id = &sb.layout.id;
        if self.status(id).as_deref() == Some("running") {
            let _ = cmd::run(self.runsc().args(["kill", id, "KILL"]));
        }
        self.delete(id);
        mounts::unmount_rootfs(sb)
    }

    fn alive(&self, sb: &SandboxSpec) -> bool {
        self.status(&sb.layout.id).as_deref() == Some("running")
    }
}
