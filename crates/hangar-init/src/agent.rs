//! Runs the agent process and restarts it with exponential backoff when it exits.
//!
//! The agent's stdout and stderr are pipes that [`crate::output`] turns into timestamped lines on
//! the console, which Hangar captures in the sandbox's log. The supervisor never gives up: a
//! missing executable is reported as `failed` and retried, because the user may fix it by
//! writing the file. It must never restart the agent once shutdown began.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hangar_proto::init::{AgentState, AgentStatus, InitConfig};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio_util::sync::CancellationToken;

use crate::output::Output;
use crate::reaper::Reaper;
use crate::spawn;

const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// A run at least this long counts as healthy and resets the backoff.
const HEALTHY_RUN: Duration = Duration::from_secs(30);

pub struct Agent {
    status: Mutex<AgentStatus>,
    stop: CancellationToken,
}

/// The delay before the next start, given the previous delay and how long the last run lasted.
pub fn next_backoff(previous: Option<Duration>, ran: Duration) -> Duration {
    match previous {
        _ if ran >= HEALTHY_RUN => FIRST_BACKOFF,
        None => FIRST_BACKOFF,
        Some(d) => (d * 2).min(MAX_BACKOFF),
    }
}

impl Agent {
    pub fn new(configured: bool) -> Arc<Agent> {
        let state = if configured {
            AgentState::Restarting
        } else {
            AgentState::None
        };
        Arc::new(Agent {
            status: Mutex::new(AgentStatus {
                state,
                pid: None,
                restarts: 0,
                last_exit: None,
                last_error: None,
            }),
            stop: CancellationToken::new(),
        })
    }

    pub fn status(&self) -> AgentStatus {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn update(&self, f: impl FnOnce(&mut AgentStatus)) {
        f(&mut self.status.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// Supervises the agent until [`Agent::shutdown`]. Its stdout and stderr go to `output`, or
    /// are init's own without it.
    pub async fn supervise(
        self: Arc<Self>,
        config: Arc<InitConfig>,
        reaper: Arc<Reaper>,
        users_root: PathBuf,
        output: Option<Arc<Output>>,
    ) {
        let Some(spec) = config.agent.clone() else {
            return;
        };
        let mut backoff: Option<Duration> = None;
        loop {
            if self.stop.is_cancelled() {
                return;
            }
            let started = Instant::now();
            let plan = spawn::plan(
                spec.argv.clone(),
                &config.defaults,
                None,
                None,
                &Default::default(),
                &users_root,
            )
            .map_err(|e| e.to_string());
            let spawned = plan.and_then(|plan| {
                let stdin = spawn::empty_stdin().map_err(|e| e.to_string())?;
                let (stdout, stderr) = match &output {
                    Some(o) => o.stdio().map_err(|e| e.to_string())?,
                    None => (Stdio::inherit(), Stdio::inherit()),
                };
                spawn::spawn(&reaper, &plan, stdin, stdout, stderr).map_err(|e| e.to_string())
            });
            match spawned {
                Ok((child, exited)) => {
                    let pid = child.id();
                    drop(child);
                    log!("agent started (pid {pid})");
                    self.update(|s| {
                        s.state = AgentState::Running;
                        s.pid = Some(pid);
                        s.last_error = None;
                    });
                    let code = exited.await.unwrap_or(-1);
                    log!(
                        "agent exited with {code} after {:.1}s",
                        started.elapsed().as_secs_f64()
                    );
                    self.update(|s| {
                        s.state = AgentState::Restarting;
                        s.pid = None;
                        s.last_exit = Some(code);
                    });
                }
                Err(e) => {
                    log!("agent cannot start: {e}");
                    self.update(|s| {
                        s.state = AgentState::Failed;
                        s.last_error = Some(e);
                    });
                }
            }
            let delay = next_backoff(backoff, started.elapsed());
            backoff = Some(delay);
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.stop.cancelled() => return,
            }
            self.update(|s| s.restarts += 1);
        }
    }

    /// Stops restarting, sends `SIGTERM` to the agent's process group and waits up to `grace`
    /// for it to exit. Returns whether it exited.
    pub async fn shutdown(&self, grace: Duration) -> bool {
        self.stop.cancel();
        let Some(pid) = self.status().pid else {
            return true;
        };
        let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        // Shutdown is not a hot path; polling keeps the status the single source of truth.
        while Instant::now() < deadline {
            if self.status().pid.is_none() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_caps_and_resets() {
        let quick = Duration::from_millis(5);
        let mut d = None;
        let mut seen = vec![];
        for _ in 0..9 {
            let next = next_backoff(d, quick);
            seen.push(next.as_millis());
            d = Some(next);
        }
        assert_eq!(seen, [200, 400, 800, 1600, 3200, 6400, 10000, 10000, 10000]);
        assert_eq!(next_backoff(d, Duration::from_secs(31)), FIRST_BACKOFF);
    }
}
