//! The in-sandbox guard: an OOM killer for sandbox kernels without their own.
//!
//! gVisor's sentry is one host process under one cgroup: when a process inside allocates past
//! the limit, the host kills the whole sandbox. The guard watches the sandbox's own accounting
//! (`/proc/meminfo`) and kills the largest process as usage crosses the memory limit, so that
//! the sandbox and its agent live on. It never kills PID 1 (itself). (The pids limit needs no
//! guard: gVisor enforces RLIMIT_NPROC at fork, which the driver sets.)
//!
//! A single system call that fills hundreds of MiB at once (e.g. `dd bs=300M`) can outrun a
//! poll; the cgroup's headroom for the sentry absorbs most, and past it the host kills the
//! whole sandbox, which the host and other sandboxes survive.

use std::time::Duration;

use hangar_proto::init::GuardLimits;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// How often usage is read: rarely while far from the limit (every read is a system call into
/// gVisor's sentry, costly under the ptrace platform, and idle sandboxes must stay idle), and
/// every few milliseconds close to it.
fn interval(used: u64, limit: u64) -> Duration {
    match used.saturating_mul(100) / limit.max(1) {
        0..=49 => Duration::from_millis(100),
        50..=74 => Duration::from_millis(20),
        _ => Duration::from_millis(5),
    }
}

/// Used memory in bytes per `/proc/meminfo` (MemTotal - MemAvailable).
pub fn used_bytes(meminfo: &str) -> Option<u64> {
    let field = |name: &str| {
        meminfo
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some(field("MemTotal:")?.saturating_sub(field("MemAvailable:")?) * 1024)
}

/// A process as the guard sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proc {
    pub pid: i32,
    pub rss_pages: u64,
}

/// Parses `/proc/PID/stat`: the command may contain spaces and parentheses, so fields are
/// counted from the last `)`.
pub fn parse_stat(pid: i32, stat: &str) -> Option<Proc> {
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the command: state is field 3, rss field 24 (1-based).
    Some(Proc {
        pid,
        rss_pages: fields.get(21)?.parse().ok()?,
    })
}

fn processes() -> Vec<Proc> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != 1)
        .filter_map(|pid| {
            parse_stat(
                pid,
                &std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?,
            )
        })
        .collect()
}

/// Runs for ever, as a task on the runtime: one thread fewer to checkpoint and restore (this
/// gVisor's restore crashes a restored process now and then, about 1 in 100 here).
pub async fn run(limits: GuardLimits) {
    let limit = limits.memory_mib * 1024 * 1024;
    let mut wait = Duration::from_millis(100);
    loop {
        tokio::time::sleep(wait).await;
        if let Some(used) = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .as_deref()
            .and_then(used_bytes)
        {
            wait = interval(used, limit);
            if used > limit {
                if let Some(p) = processes().into_iter().max_by_key(|p| p.rss_pages) {
                    log!(
                        "out of memory ({} MiB used, limit {} MiB): killing pid {}",
                        used >> 20,
                        limits.memory_mib,
                        p.pid
                    );
                    let _ = kill(Pid::from_raw(p.pid), Signal::SIGKILL);
                    // Give the kernel a moment to free it before measuring again.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn polls_faster_near_the_limit() {
        assert_eq!(interval(10, 100), Duration::from_millis(100));
        assert_eq!(interval(60, 100), Duration::from_millis(20));
        assert_eq!(interval(99, 100), Duration::from_millis(5));
        assert_eq!(interval(200, 100), Duration::from_millis(5));
    }

    #[test]
    fn meminfo() {
        let m = "MemTotal:         262144 kB\nMemFree:          250720 kB\nMemAvailable:     200000 kB\n";
        assert_eq!(used_bytes(m), Some((262_144 - 200_000) * 1024));
        assert_eq!(used_bytes("MemTotal: 5 kB\n"), None);
    }

    #[test]
    fn stat_with_odd_command() {
        let s = "42 (a) b (c)) S 1 42 42 0 -1 4194304 100 0 0 0 1 2 0 0 20 0 1 0 777 1234567 89 18446744073709551615";
        assert_eq!(
            parse_stat(42, s),
            Some(Proc {
                pid: 42,
                rss_pages: 89
            })
        );
        assert_eq!(parse_stat(1, "garbage"), None);
    }
}
