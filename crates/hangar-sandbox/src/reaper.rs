//! Hangar as a child subreaper: the runtimes' daemons (`runsc`'s sandbox and gofer, `crun`'s
//! container init) are orphaned by design and would otherwise wait for the host's PID 1 to
//! reap them. Where PID 1 reaps lazily (seen here: ~1.2 s), every `runsc delete` after a
//! checkpoint waits that long. Adopting them makes stop and suspend independent of the host.
//!
//! Once installed, one thread owns `waitpid(-1)` for the whole process: every child must be
//! spawned through [`spawn`] so that its exit status reaches its waiter instead of being
//! reaped as an orphan. Nothing else in Hangar may wait for a child.

use std::collections::HashMap;
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, ExitStatus};
use std::sync::mpsc;
use std::sync::{Condvar, Mutex, OnceLock};

struct Reaper {
    waiters: Mutex<HashMap<i32, mpsc::Sender<ExitStatus>>>,
    /// Signalled when a child is spawned, so the thread stops idling on ECHILD.
    spawned: Condvar,
}

static REAPER: OnceLock<Reaper> = OnceLock::new();

/// Makes this process a child subreaper and starts the reaping thread. Idempotent.
pub fn install() -> std::io::Result<()> {
    if REAPER.get().is_some() {
        return Ok(());
    }
    // SAFETY: prctl with PR_SET_CHILD_SUBREAPER takes an integer argument and touches no memory.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if REAPER
        .set(Reaper {
            waiters: Mutex::new(HashMap::new()),
            spawned: Condvar::new(),
        })
        .is_err()
    {
        return Ok(());
    }
    std::thread::Builder::new()
        .name("hangar-reaper".into())
        .spawn(reap_loop)?;
    Ok(())
}

fn reap_loop() {
    let r = REAPER.get().expect("installed before the thread starts");
    loop {
        let mut raw = 0;
        // SAFETY: waitpid writes the status into `raw`, a valid i32.
        let pid = unsafe { libc::waitpid(-1, &mut raw, 0) };
        if pid > 0 {
            if let Some(tx) = r
                .waiters
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&pid)
            {
                let _ = tx.send(ExitStatus::from_raw(raw));
            }
            continue;
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ECHILD) {
            // No children at all: sleep until one is spawned (adopted orphans only ever
            // arrive while their parent, our child, exists, so this misses none).
            let guard = r.waiters.lock().unwrap_or_else(|e| e.into_inner());
            let _ = r
                .spawned
                .wait_timeout(guard, std::time::Duration::from_millis(200))
                .unwrap();
        }
    }
}

/// Spawns `cmd`; its exit status arrives on the returned channel. Without an installed reaper
/// (the CLI), the caller waits with `Child::wait` as usual: `None` is returned for the channel.
pub fn spawn(cmd: &mut Command) -> std::io::Result<(Child, Option<mpsc::Receiver<ExitStatus>>)> {
    let Some(r) = REAPER.get() else {
        return Ok((cmd.spawn()?, None));
    };
    // Holding the lock across spawn and registration means the reaper cannot take this
    // child's status before its waiter is in the map.
    let mut waiters = r.waiters.lock().unwrap_or_else(|e| e.into_inner());
    let child = cmd.spawn()?;
    let (tx, rx) = mpsc::channel();
    waiters.insert(child.id() as i32, tx);
    drop(waiters);
    r.spawned.notify_all();
    Ok((child, Some(rx)))
}

/// Whether `pid` has exited but not been reaped (or cannot be read at all).
pub fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next().map(|st| st == "Z"))
        })
        .unwrap_or(true)
}

/// Waits until process `pid` is gone — exited and reaped (by this process's reaper thread, or
/// by the host's PID 1 for an orphan that outlived an earlier Hangar); false after `limit`.
/// Reaped matters: a zombie still counts as a member of its cgroup, and runtimes that poll a
/// pid (`runsc delete`) see it as alive.
pub fn wait_reaped(pid: i32, limit: std::time::Duration) -> bool {
    if pid <= 0 {
        return true;
    }
    let deadline = std::time::Instant::now() + limit;
    let proc = std::path::PathBuf::from(format!("/proc/{pid}"));
    while proc.exists() {
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    true
}

/// Waits for a child from [`spawn`].
pub fn wait(
    mut child: Child,
    rx: Option<mpsc::Receiver<ExitStatus>>,
) -> std::io::Result<ExitStatus> {
    match rx {
        Some(rx) => rx
            .recv()
            .map_err(|_| std::io::Error::other("the reaper thread stopped")),
        None => child.wait(),
    }
}
