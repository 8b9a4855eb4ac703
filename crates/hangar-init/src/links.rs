//! The host sockets: binding `control.sock` and `agent.sock`, forwarding `agent.sock` to the
//! agent's port, and tunnelling the in-sandbox proxy port to the host's `egress.sock`.
//!
//! gVisor cannot checkpoint while any host socket is open, so everything that holds one belongs
//! to the current [`Generation`]: [`HostSockets::suspend`] cancels it and waits for those tasks to
//! end, and [`HostSockets::bind`] starts a new one after the restore. While suspended, nothing
//! here may open a host socket. The proxy's TCP listener lives on the sandbox's own loopback, but
//! it is closed and bound again with the rest (see [`HostSockets::bind`]).

use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use axum::Router;
use hangar_proto::init::{AGENT_SOCKET, CONTROL_SOCKET, EGRESS_SOCKET, PROXY_PORT};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::control;

/// How long [`HostSockets::suspend`] waits for forwarded connections to close.
const SUSPEND_DEADLINE: Duration = Duration::from_secs(2);

/// Everything holding a host socket while the sandbox is running.
#[derive(Clone)]
struct Generation {
    /// Cancels the `agent.sock` listener and every forwarded connection (agent and egress).
    links: CancellationToken,
    /// Cancels the `control.sock` listener and closes control connections gracefully.
    control: CancellationToken,
    /// The listener tasks and forwarded connections; control connections are not tracked,
    /// since `POST /suspend` itself runs in one.
    tasks: TaskTracker,
}

pub struct HostSockets {
    run_dir: PathBuf,
    agent_port: u16,
    /// Whether [`HostSockets::suspend`] must let go of the sockets: gVisor's checkpoint needs
    /// it; a microVM's snapshot does not (its sockets are the guest's own, and the host side
    /// reconnects through the link port).
    release_on_suspend: bool,
    current: Mutex<Option<Generation>>,
}

impl HostSockets {
    pub fn new(run_dir: PathBuf, agent_port: u16) -> HostSockets {
        HostSockets {
            run_dir,
            agent_port,
            release_on_suspend: true,
            current: Mutex::new(None),
        }
    }

    /// Sockets that stay bound across a suspend (see `release_on_suspend`).
    pub fn kept_on_suspend(mut self) -> HostSockets {
        self.release_on_suspend = false;
        self
    }

    fn socket_path(&self, name: &str) -> PathBuf {
        self.run_dir.join(name)
    }

    /// Binds `control.sock` and `agent.sock` and serves them. Does nothing if already bound.
    pub fn bind(&self, router: Router) -> std::io::Result<()> {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if current.is_some() {
            log!("sockets are already bound");
            return Ok(());
        }
        let control_listener = bind_unix(&self.socket_path(CONTROL_SOCKET))?;
        let agent_listener = bind_unix(&self.socket_path(AGENT_SOCKET))?;
        let gen = Generation {
            links: CancellationToken::new(),
            control: CancellationToken::new(),
            tasks: TaskTracker::new(),
        };
        gen.tasks.spawn(control::serve(
            control_listener,
            router,
            gen.control.clone(),
        ));
        gen.tasks.spawn(serve_agent_sock(
            agent_listener,
            self.agent_port,
            gen.clone(),
        ));
        // The proxy's listener is a sandbox-loopback socket, not a host one, but this gVisor
        // refuses to checkpoint a listening TCP endpoint that epoll is watching ("endpoint
        // still has waiters upon save"), so it belongs to the generation too.
        // `HANGAR_PROXY_PORT` moves the proxy, for running hangar-init outside its sandbox
        // (tests) next to another instance.
        let port = std::env::var("HANGAR_PROXY_PORT")
            .ok()
            .and_then(|p| p.parse().ok())
            .unwrap_or(PROXY_PORT);
        match bind_proxy(port) {
            Ok(listener) => {
                gen.tasks.spawn(serve_proxy(
                    listener,
                    self.socket_path(EGRESS_SOCKET),
                    gen.clone(),
                ));
            }
            // Outside a sandbox (tests) the port may be taken; the agent just has no egress then.
            Err(e) => log!("cannot serve the proxy on 127.0.0.1:{port}: {e}"),
        }
        *current = Some(gen);
        log!("serving {} and {}", CONTROL_SOCKET, AGENT_SOCKET);
        Ok(())
    }

    /// Lets go of every host socket: stops both listeners, aborts every forwarded connection,
    /// removes the socket files, and asks control connections to close after their current
    /// response. Returns once everything but those control connections is closed.
    pub async fn suspend(&self) {
        if !self.release_on_suspend {
            return;
        }
        let Some(gen) = self
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        else {
            return;
        };
        gen.links.cancel();
        gen.control.cancel();
        gen.tasks.close();
        if tokio::time::timeout(SUSPEND_DEADLINE, gen.tasks.wait())
            .await
            .is_err()
        {
            log!("some forwarded connections did not close within {SUSPEND_DEADLINE:?}");
        }
        for name in [CONTROL_SOCKET, AGENT_SOCKET] {
            let _ = std::fs::remove_file(self.socket_path(name));
        }
        log!("suspended: host sockets closed");
    }

    /// Removes the socket files (at exit).
    pub fn remove_files(&self) {
        for name in [CONTROL_SOCKET, AGENT_SOCKET] {
            let _ = std::fs::remove_file(self.socket_path(name));
        }
    }
}

/// Binds a unix socket at `path`, replacing a stale socket file.
fn bind_unix(path: &Path) -> std::io::Result<UnixListener> {
    let _ = std::fs::remove_file(path);
    UnixListener::bind(path)
        .map_err(|e| std::io::Error::new(e.kind(), format!("binding {}: {e}", path.display())))
}

/// Binds the proxy's TCP port on the sandbox's loopback.
fn bind_proxy(port: u16) -> std::io::Result<TcpListener> {
    let listener = std::net::TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))?;
    listener.set_nonblocking(true)?;
    TcpListener::from_std(listener)
}

/// Serves the HTTP proxy port: each connection is spliced to `egress.sock`, where Hangar
/// parses the request and applies the egress policy.
async fn serve_proxy(listener: TcpListener, egress: PathBuf, gen: Generation) {
    loop {
        let conn = tokio::select! {
            c = listener.accept() => c,
            _ = gen.links.cancelled() => return,
        };
        match conn {
            Ok((tcp, _)) => {
                let egress = egress.clone();
                gen.tasks
                    .spawn(splice_cancellable(gen.links.clone(), tcp, async move {
                        UnixStream::connect(&egress).await
                    }));
            }
            Err(e) => {
                log!("proxy accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn serve_agent_sock(listener: UnixListener, port: u16, gen: Generation) {
    loop {
        let conn = tokio::select! {
            c = listener.accept() => c,
            _ = gen.links.cancelled() => return,
        };
        match conn {
            Ok((unix, _)) => {
                gen.tasks
                    .spawn(splice_cancellable(gen.links.clone(), unix, async move {
                        TcpStream::connect(SocketAddr::from((Ipv4Addr::LOCALHOST, port))).await
                    }));
            }
            Err(e) => {
                log!("agent.sock accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// A socket that can leave tokio for blocking I/O.
trait IntoFd {
    fn into_fd(self) -> std::io::Result<OwnedFd>;
}

impl IntoFd for TcpStream {
    fn into_fd(self) -> std::io::Result<OwnedFd> {
        Ok(self.into_std()?.into())
    }
}

impl IntoFd for UnixStream {
    fn into_fd(self) -> std::io::Result<OwnedFd> {
        Ok(self.into_std()?.into())
    }
}

/// Copies bytes both ways, on two blocking threads. When `b` (the agent, or Hangar's egress
/// proxy) has sent its last byte the exchange is over and both sockets are closed; when `a`
/// (the caller) is done sending, `b` is told so with a shutdown and its answer is still
/// relayed to the end. `cancel` shuts both sockets down, which ends both threads.
///
/// Blocking reads, not tokio's: under gVisor the edge-triggered readiness for a peer's FIN
/// is sometimes never delivered, so an async copy can wait forever on a connection the agent
/// has closed (an SSE stream with `Connection: close` then never ends for the caller). A
/// blocking `read` returns 0 at a FIN whatever epoll does.
async fn splice<A: IntoFd, B: IntoFd>(cancel: &CancellationToken, a: A, b: B) {
    use std::os::fd::AsRawFd;
    let fds = (|| -> std::io::Result<_> {
        let (a, b) = (a.into_fd()?, b.into_fd()?);
        for fd in [&a, &b] {
            // tokio leaves its sockets non-blocking.
            let flags = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL)?;
            let flags =
                nix::fcntl::OFlag::from_bits_truncate(flags) - nix::fcntl::OFlag::O_NONBLOCK;
            nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(flags))?;
        }
        let files = (
            std::fs::File::from(a.try_clone()?),
            std::fs::File::from(a.try_clone()?),
            std::fs::File::from(b.try_clone()?),
            std::fs::File::from(b.try_clone()?),
        );
        Ok((a, b, files))
    })();
    let (a, b, (a_read, mut a_write, b_read, mut b_write)) = match fds {
        Ok(f) => f,
        Err(e) => {
            log!("forwarding: {e}");
            return;
        }
    };
    let shut = |fd: &OwnedFd, how| {
        // SAFETY: `fd` is open (owned here) for as long as this runs.
        unsafe { libc::shutdown(fd.as_raw_fd(), how) };
    };
    let (up_done, up_rx) = tokio::sync::oneshot::channel::<()>();
    let (down_done, mut down_rx) = tokio::sync::oneshot::channel::<()>();
    let b_for_up = b.try_clone();
    let up = std::thread::Builder::new()
        .name("splice-up".into())
        .spawn(move || {
            let mut a_read = a_read;
            let _ = std::io::copy(&mut a_read, &mut b_write);
            if let Ok(b) = &b_for_up {
                // SAFETY: as above; `b` is a dup owned by this thread.
                unsafe { libc::shutdown(b.as_raw_fd(), libc::SHUT_WR) };
            }
            drop((a_read, b_write, b_for_up));
            let _ = up_done.send(());
        });
    if let Err(e) = up {
        // Out of threads (the sandbox's pids limit): refuse this connection.
        log!("forwarding: cannot start a thread: {e}");
        shut(&a, libc::SHUT_RDWR);
        shut(&b, libc::SHUT_RDWR);
        return;
    }
    let down = std::thread::Builder::new()
        .name("splice-down".into())
        .spawn(move || {
            let mut b_read = b_read;
            let _ = std::io::copy(&mut b_read, &mut a_write);
            drop((b_read, a_write));
            let _ = down_done.send(());
        });
    if let Err(e) = down {
        log!("forwarding: cannot start a thread: {e}");
        shut(&a, libc::SHUT_RDWR);
        shut(&b, libc::SHUT_RDWR);
        let _ = up_rx.await;
        return;
    }
    let down_finished = tokio::select! {
        _ = cancel.cancelled() => false,
        _ = &mut down_rx => true,
    };
    // The answer is complete (or the links are being cut): end both directions, and wait
    // until the threads have closed their copies so that no host socket outlives this task.
    shut(&a, libc::SHUT_RDWR);
    shut(&b, libc::SHUT_RDWR);
    if !down_finished {
        let _ = down_rx.await;
    }
    let _ = up_rx.await;
}

/// Connects the other side with `connect` and copies bytes both ways until either side closes
/// or `cancel` fires, which drops (closes) both sockets. A failed connect just closes `a`.
async fn splice_cancellable<A, B, F>(cancel: CancellationToken, a: A, connect: F)
where
    A: IntoFd,
    B: IntoFd,
    F: std::future::Future<Output = std::io::Result<B>>,
{
    let b = tokio::select! {
        biased;
        _ = cancel.cancelled() => return,
        b = connect => b,
    };
    match b {
        Ok(b) => splice(&cancel, a, b).await,
        // The agent not listening yet is normal while it starts.
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
        Err(e) => log!("forwarding: cannot connect: {e}"),
    }
}
