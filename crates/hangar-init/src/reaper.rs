//! The one place that calls `waitpid`: reaps every child and orphan, and hands the exit status of
//! processes `hangar-init` spawned itself to whoever waits for them.
//!
//! As PID 1 every orphan in the sandbox becomes our child and must be reaped, but a blind
//! `waitpid(-1)` would also steal the statuses of the agent and exec processes. So children are
//! spawned only through [`Reaper::spawn`], which registers the pid under the same lock the reaper
//! holds while it waits; a status is never collected before its pid is registered. Nothing else
//! in this crate may call `wait`/`waitpid` or use `tokio::process`.

use std::collections::{HashMap, HashSet};
use std::process::{Child, Command};
use std::sync::Mutex;

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::oneshot;

/// Exit statuses are reported as shells do: the exit code, or 128 + the signal number.
pub type ExitCode = i32;

#[derive(Default)]
pub struct Reaper {
    waiting: Mutex<HashMap<i32, oneshot::Sender<ExitCode>>>,
    /// Every process group (= session) ever started, for the shutdown of a non-PID-1 init.
    groups: Mutex<HashSet<i32>>,
}

impl Reaper {
    pub fn new() -> Reaper {
        Reaper::default()
    }

    /// Spawns `cmd` and returns the child (for its pipes; never wait on it) and a receiver of its
    /// exit code.
    pub fn spawn(
        &self,
        cmd: &mut Command,
    ) -> std::io::Result<(Child, oneshot::Receiver<ExitCode>)> {
        // Holding the lock across the fork keeps `reap` from collecting the status first.
        let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        let child = cmd.spawn()?;
        let (tx, rx) = oneshot::channel();
        waiting.insert(child.id() as i32, tx);
        self.groups
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(child.id() as i32);
        Ok((child, rx))
    }

    /// The process groups of every child spawned through [`Reaper::spawn`] (each child leads its
    /// own session), including those whose leader exited but whose background jobs may live on.
    /// Only for a shutdown outside PID 1, where `kill(-1)` is not an option: pids may have been
    /// reused in a long run.
    pub fn spawned_groups(&self) -> Vec<i32> {
        self.groups
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .copied()
            .collect()
    }

    /// Collects every exited child without blocking.
    pub fn reap(&self) {
        let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let (pid, code) = match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => (pid, code),
                Ok(WaitStatus::Signaled(pid, sig, _)) => (pid, 128 + sig as i32),
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
                Ok(_) => continue,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    log!("waitpid: {e}");
                    return;
                }
            };
            if let Some(tx) = waiting.remove(&pid.as_raw()) {
                // The waiter may have gone away (e.g. a dropped exec stream); that is fine.
                let _ = tx.send(code);
            }
        }
    }

    /// Installs the `SIGCHLD` handler and reaps on every signal from then on. Call it before
    /// spawning anything.
    pub fn start(self: &std::sync::Arc<Self>) -> std::io::Result<()> {
        let mut sigchld = signal(SignalKind::child())?;
        let me = self.clone();
        tokio::spawn(async move {
            // A child may have exited before the handler was installed.
            me.reap();
            while sigchld.recv().await.is_some() {
                me.reap();
            }
        });
        Ok(())
    }
}
