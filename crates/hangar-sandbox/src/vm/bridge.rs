//! The host side of a microVM's links: `control.sock` and `agent.sock` in the sandbox's run
//! directory, each connection carried into the guest as one stream of the multiplexed link
//! port, and the guest's egress streams carried out to `egress.sock`. To its callers a VM's
//! sockets are the same as any other sandbox's.
//!
//! The link is reconnected whenever it drops while the VM runs (a protocol error, or Hangar
//! restarting and adopting the VM); every stream of the old connection is reset then, as a
//! restarted runtime would. The sockets are bound once the first connection is up, so that
//! `control.sock` existing means the guest answers.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hangar_mux::{HostLink, HostOptions};
use hangar_proto::init::vm::{TARGET_AGENT, TARGET_CONTROL, TARGET_EGRESS};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

/// How long a connection accepted while the link is down waits for it to come back.
const RELINK_WAIT: Duration = Duration::from_secs(10);

/// Where a bridge connects and listens.
#[derive(Debug, Clone)]
pub struct BridgePaths {
    /// QEMU's socket for the link port.
    pub port: PathBuf,
    pub control: PathBuf,
    pub agent: PathBuf,
    pub egress: PathBuf,
}

/// A running bridge; dropping it stops it and removes its sockets.
pub struct Bridge {
    task: JoinHandle<()>,
    paths: BridgePaths,
}

impl Drop for Bridge {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.paths.control);
        let _ = std::fs::remove_file(&self.paths.agent);
    }
}

impl Bridge {
    /// Starts bridging on `runtime`. `connect_timeout` bounds how long the first connection
    /// may take (the guest boots meanwhile); `alive` says whether the VM still runs, so that a
    /// bridge of a dead VM ends instead of reconnecting for ever.
    pub fn start(
        runtime: &tokio::runtime::Handle,
        paths: BridgePaths,
        connect_timeout: Duration,
        alive: Arc<dyn Fn() -> bool + Send + Sync>,
    ) -> Bridge {
        let task = runtime.spawn(run(paths.clone(), connect_timeout, alive));
        Bridge { task, paths }
    }
}

fn options(connect_timeout: Duration) -> HostOptions {
    HostOptions {
        connect_timeout,
        hello_timeout: connect_timeout,
        accept: vec![TARGET_EGRESS.to_owned()],
        ..HostOptions::default()
    }
}

async fn run(
    paths: BridgePaths,
    connect_timeout: Duration,
    alive: Arc<dyn Fn() -> bool + Send + Sync>,
) {
    let (current, watch) = watch::channel::<Option<Arc<HostLink>>>(None);
    // Every task holding the link lives in one of these sets, so that aborting this task
    // (dropping the `Bridge`) ends them all and closes the connection to QEMU, which serves
    // one client at a time.
    let mut tasks = JoinSet::new();
    let mut first = true;
    let mut drops = 0u32;
    loop {
        let timeout = if first {
            connect_timeout
        } else {
            Duration::from_secs(5)
        };
        let t0 = std::time::Instant::now();
        let link = match HostLink::connect(&paths.port, options(timeout)).await {
            Ok(l) => {
                tracing::debug!(port = %paths.port.display(), took = ?t0.elapsed(), "VM link up");
                Arc::new(l)
            }
            Err(e) => {
                if !alive() {
                    tracing::debug!(port = %paths.port.display(), "the VM is gone; bridge stops");
                    break;
                }
                tracing::warn!(port = %paths.port.display(), error = %e, "cannot connect the VM's link port; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if first {
            first = false;
            for (path, target) in [
                (&paths.control, TARGET_CONTROL),
                (&paths.agent, TARGET_AGENT),
            ] {
                let _ = std::fs::remove_file(path);
                match UnixListener::bind(path) {
                    Ok(l) => {
                        tasks.spawn(serve(l, target, watch.clone()));
                    }
                    Err(e) => {
                        tracing::error!(path = %path.display(), error = %e, "cannot bind the VM's socket");
                        return;
                    }
                }
            }
        }
        let up = std::time::Instant::now();
        current.send_replace(Some(link.clone()));
        let mut epoch = JoinSet::new();
        epoch.spawn(egress(link.clone(), paths.egress.clone()));
        let why = link.closed().await;
        current.send_replace(None);
        drop(epoch);
        link.close();
        drop(link);
        if !alive() {
            break;
        }
        // A guest that breaks the protocol on purpose must not make the host spin: back off
        // while links keep dropping soon after they came up, and say so only now and then.
        if up.elapsed() < Duration::from_secs(1) {
            drops = drops.saturating_add(1);
        } else {
            drops = 0;
        }
        if drops.is_power_of_two() || drops == 0 {
            tracing::info!(port = %paths.port.display(), reason = ?why, drops, "the VM's link dropped; reconnecting");
        }
        let pause = Duration::from_millis(50u64 << drops.min(7));
        tokio::time::sleep(pause.min(Duration::from_secs(5))).await;
    }
    drop(tasks);
    let _ = std::fs::remove_file(&paths.control);
    let _ = std::fs::remove_file(&paths.agent);
}

/// Accepts host connections to one socket and carries each into the guest.
async fn serve(
    listener: UnixListener,
    target: &'static str,
    link: watch::Receiver<Option<Arc<HostLink>>>,
) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let mut link = link.clone();
                    conns.spawn(async move {
                        // The watch's guard must not be held across the copy.
                        let current = match tokio::time::timeout(
                            RELINK_WAIT,
                            link.wait_for(Option::is_some),
                        )
                        .await
                        {
                            Ok(Ok(guard)) => guard.clone(),
                            _ => None,
                        };
                        if let Some(l) = current {
                            carry(stream, &l, target).await;
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accepting on a VM socket");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = conns.join_next() => {}
        }
    }
}

async fn carry(mut stream: UnixStream, link: &HostLink, target: &str) {
    match link.open(target).await {
        Ok(mut guest) => {
            let _ = tokio::io::copy_bidirectional(&mut stream, &mut guest).await;
        }
        Err(e) => tracing::debug!(target, error = %e, "cannot open a stream into the VM"),
    }
}

/// Carries the guest's egress streams to the sandbox's egress proxy.
async fn egress(link: Arc<HostLink>, socket: PathBuf) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            opened = link.accept() => {
                let Some((_, mut guest)) = opened else { return };
                let socket = socket.clone();
                conns.spawn(async move {
                    if let Ok(mut host) = UnixStream::connect(&socket).await {
                        let _ = tokio::io::copy_bidirectional(&mut guest, &mut host).await;
                    }
                });
            }
            Some(_) = conns.join_next() => {}
        }
    }
}
