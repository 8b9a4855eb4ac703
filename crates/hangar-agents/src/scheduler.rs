//! The scheduler: scale to zero after each agent's `idle_timeout`, delete sessions past
//! their `session_retention`, and keep the store's `last_activity` up to date.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use hangar_proto::agent::SessionState;

use crate::Agents;

pub(crate) async fn run(agents: Agents) {
    let mut tick = tokio::time::interval(agents.inner.cfg.tick);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_flush = Instant::now();
    loop {
        tick.tick().await;
        idle_pass(&agents).await;
        retention_pass(&agents).await;
        token_pass(&agents).await;
        if last_flush.elapsed() >= FLUSH_EVERY {
            last_flush = Instant::now();
            flush_pass(&agents).await;
        }
    }
}

/// How often last activity goes to the store. It only matters after a restart of `hangar
/// serve` (the scheduler works from memory; a suspension flushes its session first), so a
/// busy node does not write every active session twice a second.
const FLUSH_EVERY: Duration = Duration::from_secs(10);

/// Renews the session tokens of running sessions before they expire.
async fn token_pass(agents: &Agents) {
    if agents.identity().is_none() {
        return;
    }
    for live in agents.all_live() {
        if live.state() == SessionState::Running {
            agents.renew_token(&live).await;
        }
    }
}

async fn flush_pass(agents: &Agents) {
    for live in agents.all_live() {
        if live.dirty.load(Ordering::Acquire) {
            if let Err(e) = agents.flush_activity(&live).await {
                tracing::warn!(session = %live.id, error = %e, "cannot record last activity");
            }
        }
    }
}

async fn idle_pass(agents: &Agents) {
    for live in agents.all_live() {
        if live.state() != SessionState::Running || live.inflight.load(Ordering::Acquire) != 0 {
            continue;
        }
        let Ok(info) = agents.version_info(&live.agent, live.version).await else {
            continue;
        };
        let idle = SystemTime::now()
            .duration_since(live.last_activity())
            .unwrap_or_default();
        if idle < info.spec.idle_timeout.0 {
            continue;
        }
        // Each suspension runs on its own so that one slow checkpoint does not hold up the
        // others; the session's lock keeps them from overlapping.
        let agents = agents.clone();
        let timeout = info.spec.idle_timeout.0;
        tokio::spawn(async move {
            match agents.suspend_if_idle(&live, Some(timeout)).await {
                Ok(Some(())) => {
                    agents.count_idle_suspension(&live.agent);
                    tracing::info!(session = %live.id, idle = ?idle, "idle session scaled to zero")
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(session = %live.id, error = %e, "cannot suspend idle session")
                }
            }
        });
    }
}

async fn retention_pass(agents: &Agents) {
    for live in agents.all_live() {
        if live.inflight.load(Ordering::Acquire) != 0
            || matches!(
                live.state(),
                SessionState::Creating | SessionState::Resuming | SessionState::Suspending
            )
        {
            continue;
        }
        let Ok(info) = agents.version_info(&live.agent, live.version).await else {
            continue;
        };
        let since = SystemTime::now()
            .duration_since(live.last_activity())
            .unwrap_or_default();
        if since < info.spec.session_retention.0 {
            continue;
        }
        match agents
            .delete_if_expired(&live, info.spec.session_retention.0)
            .await
        {
            Ok(true) => {
                tracing::info!(session = %live.id, agent = %live.agent, since = ?since, "session retention expired; deleted it")
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(session = %live.id, error = %e, "cannot delete expired session")
            }
        }
    }
}
