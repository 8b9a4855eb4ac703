//! Outbound TCP from inside an operator's network namespace (`network.attach: NAME` in
//! agent.yaml, i.e. `/run/netns/NAME` as made by `ip netns add NAME`), for the egress proxy,
//! which itself runs in the host's namespace.
//!
//! A socket belongs to the namespace of the thread that created it, and keeps it for life: once
//! made it can be connected, read and written from any thread. So each [`NetnsConnector`] owns
//! one dedicated OS thread that enters the namespace once and then only creates sockets on
//! request; the connection itself is made on the caller's tokio runtime. Name lookups, which
//! may block for seconds, run on short-lived threads of their own (see
//! [`NetnsConnector::lookup`]).
//!
//! This module must never call `setns` on a thread it did not start itself: a tokio worker that
//! changed namespace would silently carry every later task's sockets into it.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use nix::errno::Errno;
use nix::sched::{setns, CloneFlags};
use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
use nix::sys::statfs::{fstatfs, NSFS_MAGIC};
use nix::unistd::{gettid, Pid};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{oneshot, Semaphore};

/// Where `ip netns add NAME` mounts the namespace.
const NETNS_DIR: &str = "/run/netns";
/// Lookups one namespace may have in flight at once; more wait for a slot. Each holds a thread.
const MAX_LOOKUPS: usize = 16;

/// Makes TCP connections from inside one named network namespace. Clones share one namespace
/// thread, which exits when the last clone is dropped.
#[derive(Clone)]
pub struct NetnsConnector {
    inner: Arc<Inner>,
}

struct Inner {
    name: String,
    /// The namespace itself, kept open so that lookup threads can enter it and so that it
    /// outlives an `ip netns del` for as long as sandboxes use it.
    fd: OwnedFd,
    /// Device and inode of the namespace, which tell a re-created namespace of the same name
    /// from this one.
    id: (u64, u64),
    /// The namespace thread's id, for diagnostics (`/proc/PID/task/TID`).
    tid: Pid,
    sockets: mpsc::Sender<SocketRequest>,
    lookups: Arc<Semaphore>,
}

/// A request to the namespace thread for a fresh, unconnected, non-blocking TCP socket.
struct SocketRequest {
    family: AddressFamily,
    reply: oneshot::Sender<io::Result<OwnedFd>>,
}

impl std::fmt::Debug for NetnsConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetnsConnector")
            .field("name", &self.inner.name)
            .field("thread", &self.inner.tid.as_raw())
            .finish_non_exhaustive()
    }
}

impl NetnsConnector {
    /// Opens `/run/netns/NAME` and starts its namespace thread. The error says what is wrong
    /// with the name or the namespace and what to do about it.
    pub fn open(name: &str) -> Result<NetnsConnector, String> {
        validate_name(name)?;
        NetnsConnector::open_path(name, &netns_path(name))
    }

    fn open_path(name: &str, path: &Path) -> Result<NetnsConnector, String> {
        let file = File::open(path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => format!(
                "network namespace {name:?} does not exist ({} is missing): create it with `ip netns add {name}`",
                path.display()
            ),
            _ => format!("cannot open network namespace {}: {e}", path.display()),
        })?;
        let fs = fstatfs(&file).map_err(|e| format!("cannot inspect {}: {e}", path.display()))?;
        if fs.filesystem_type() != NSFS_MAGIC {
            // What a reboot or a lost bind mount leaves behind: the plain file `ip` mounts onto.
            return Err(format!(
                "{} is not a namespace (nothing is mounted there): recreate it with `ip netns add {name}`",
                path.display()
            ));
        }
        let meta = file
            .metadata()
            .map_err(|e| format!("cannot inspect {}: {e}", path.display()))?;
        let fd = OwnedFd::from(file);
        let thread_fd = fd
            .try_clone()
            .map_err(|e| format!("cannot duplicate {}: {e}", path.display()))?;
        let (sockets, requests) = mpsc::channel();
        let (started_tx, started) = mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("hangar-netns".into())
            .spawn(move || serve_sockets(thread_fd, requests, started_tx))
            .map_err(|e| format!("cannot start a thread for network namespace {name:?}: {e}"))?;
        let tid = match started.recv() {
            Ok(Ok(tid)) => tid,
            Ok(Err(e)) => return Err(enter_error(path, e)),
            Err(_) => {
                return Err(format!(
                    "the thread for network namespace {name:?} stopped while starting"
                ))
            }
        };
        tracing::debug!(
            netns = name,
            tid = tid.as_raw(),
            "network namespace thread started"
        );
        Ok(NetnsConnector {
            inner: Arc::new(Inner {
                name: name.to_owned(),
                fd,
                id: (meta.dev(), meta.ino()),
                tid,
                sockets,
                lookups: Arc::new(Semaphore::new(MAX_LOOKUPS)),
            }),
        })
    }

    /// The namespace's name, as in `/run/netns/NAME`.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Resolves `host` from inside the namespace, as `getaddrinfo` would there. An IP literal is
    /// returned as is, without a thread.
    ///
    /// The namespace changes only the network, not the files: `/etc/hosts`,
    /// `/etc/nsswitch.conf` and `/etc/resolv.conf` are still the host's (`ip netns exec` would
    /// bind-mount `/etc/netns/NAME/resolv.conf`; this does not). A nameserver on the host's
    /// loopback (such as systemd-resolved's 127.0.0.53) is the namespace's own loopback here,
    /// and a lookup that goes through a daemon's Unix socket (nscd, `nss-resolve`) is answered
    /// by that daemon in the host's namespace.
    ///
    /// Each lookup runs on a short-lived thread that enters the namespace itself, so a slow or
    /// unanswered DNS query never holds up another sandbox's lookup or connection; at most
    /// `MAX_LOOKUPS` (16) run at once per namespace. A caller that gives up (a timeout) leaves
    /// the thread to finish on its own, still holding its slot.
    pub async fn lookup(&self, host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(vec![SocketAddr::new(ip, port)]);
        }
        let slot = self
            .inner
            .lookups
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| self.gone())?;
        let (reply, result) = oneshot::channel();
        let inner = self.inner.clone();
        let host = host.to_owned();
        std::thread::Builder::new()
            .name("hangar-netns-dns".into())
            .spawn(move || {
                let found = setns(&inner.fd, CloneFlags::CLONE_NEWNET)
                    .map_err(io::Error::from)
                    .and_then(|()| (host.as_str(), port).to_socket_addrs())
                    .map(Iterator::collect);
                let _ = reply.send(found);
                drop(slot);
            })?;
        result.await.map_err(|_| self.gone())?
    }

    /// Connects to the first of `addrs` that accepts, from inside the namespace, trying them in
    /// order; `timeout` bounds the whole call. Fails with the last address's error, or with
    /// `TimedOut` once the time is up.
    pub async fn connect(&self, addrs: &[SocketAddr], timeout: Duration) -> io::Result<TcpStream> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut last = None;
        for &addr in addrs {
            match tokio::time::timeout_at(deadline, self.connect_one(addr)).await {
                Ok(Ok(stream)) => return Ok(stream),
                Ok(Err(e)) => last = Some(e),
                Err(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("timed out connecting to {addr}"),
                    ))
                }
            }
        }
        Err(last.unwrap_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "no addresses to connect to")
        }))
    }

    async fn connect_one(&self, addr: SocketAddr) -> io::Result<TcpStream> {
        let family = match addr {
            SocketAddr::V4(_) => AddressFamily::Inet,
            SocketAddr::V6(_) => AddressFamily::Inet6,
        };
        let (reply, fd) = oneshot::channel();
        self.inner
            .sockets
            .send(SocketRequest { family, reply })
            .map_err(|_| self.gone())?;
        let fd = fd.await.map_err(|_| self.gone())??;
        // The socket was created non-blocking, as tokio requires.
        TcpSocket::from_std_stream(std::net::TcpStream::from(fd))
            .connect(addr)
            .await
    }

    fn gone(&self) -> io::Error {
        io::Error::other(format!(
            "the thread for network namespace {:?} has stopped",
            self.inner.name
        ))
    }
}

/// The namespace thread: enters the namespace once, reports how that went, then creates a
/// socket per request until every connector is dropped. Nothing here may block: one thread
/// serves every sandbox attached to the namespace.
fn serve_sockets(
    fd: OwnedFd,
    requests: mpsc::Receiver<SocketRequest>,
    started: mpsc::SyncSender<Result<Pid, Errno>>,
) {
    if let Err(e) = setns(&fd, CloneFlags::CLONE_NEWNET) {
        let _ = started.send(Err(e));
        return;
    }
    drop(fd);
    let _ = started.send(Ok(gettid()));
    drop(started);
    while let Ok(req) = requests.recv() {
        let created = socket(
            req.family,
            SockType::Stream,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(io::Error::from);
        // A caller that gave up has dropped its receiver; the socket is then closed here.
        let _ = req.reply.send(created);
    }
}

fn enter_error(path: &Path, e: Errno) -> String {
    match e {
        Errno::EINVAL => format!("{} is not a network namespace", path.display()),
        Errno::EPERM => format!(
            "cannot enter network namespace {}: it needs CAP_SYS_ADMIN (run Hangar as root)",
            path.display()
        ),
        e => format!("cannot enter network namespace {}: {e}", path.display()),
    }
}

fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// Accepts the names `ip netns add` makes files for and nothing that could leave `/run/netns`.
fn validate_name(name: &str) -> Result<(), String> {
    let ok = (1..=64).contains(&name.len())
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid network namespace name {name:?}: expected 1 to 64 characters of A-Z, a-z, 0-9, \
             '_', '.' and '-' (not \".\" or \"..\"), the NAME of `ip netns add NAME`"
        ))
    }
}

/// The connectors of every namespace in use, opened on first use and shared, so that all the
/// sandboxes attached to one namespace share one thread.
#[derive(Debug, Default)]
pub struct Netns {
    open: Mutex<HashMap<String, NetnsConnector>>,
}

impl Netns {
    pub fn new() -> Netns {
        Netns::default()
    }

    /// The connector for namespace `name`, opened if this is its first use. A namespace that
    /// was deleted since is an error, and one that was re-created under the same name is opened
    /// afresh; sandboxes already holding the old connector keep the namespace they started with.
    pub fn get(&self, name: &str) -> Result<NetnsConnector, String> {
        validate_name(name)?;
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = open.get(name) {
            let current = std::fs::metadata(netns_path(name)).map(|m| (m.dev(), m.ino()));
            if current.is_ok_and(|id| id == c.inner.id) {
                return Ok(c.clone());
            }
            open.remove(name);
        }
        let c = NetnsConnector::open(name)?;
        open.insert(name.to_owned(), c.clone());
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const WAIT: Duration = Duration::from_secs(5);

    fn require_root() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test needs root: it creates network namespaces with `ip netns add`"
        );
    }

    fn ip(args: &[&str]) {
        crate::cmd::run(Command::new("ip").args(args)).unwrap();
    }

    /// A fresh namespace with loopback up and `10.213.X.1` on it, deleted on drop.
    struct TestNs {
        name: String,
        addr: IpAddr,
    }

    impl TestNs {
        fn new() -> TestNs {
            require_root();
            let mut random = [0u8; 5];
            getrandom::getrandom(&mut random).unwrap();
            let name = format!("hangar-t-{}", hex::encode(&random[..4]));
            ip(&["netns", "add", &name]);
            let ns = TestNs {
                addr: IpAddr::from([10, 213, random[4], 1]),
                name,
            };
            // This kernel has no dummy interfaces; an address on the namespace's own loopback
            // exists only inside it just the same.
            ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
            ip(&[
                "-n",
                &ns.name,
                "addr",
                "add",
                &format!("{}/32", ns.addr),
                "dev",
                "lo",
            ]);
            ns
        }

        /// Binds `addrs` inside the namespace, from a thread of the test's own.
        fn listen(&self, addrs: Vec<SocketAddr>) -> Vec<tokio::net::TcpListener> {
            let file = File::open(netns_path(&self.name)).unwrap();
            let bound = std::thread::spawn(move || {
                setns(&file, CloneFlags::CLONE_NEWNET).unwrap();
                addrs
                    .into_iter()
                    .map(|a| std::net::TcpListener::bind(a).unwrap())
                    .collect::<Vec<_>>()
            })
            .join()
            .unwrap();
            bound
                .into_iter()
                .map(|l| {
                    l.set_nonblocking(true).unwrap();
                    tokio::net::TcpListener::from_std(l).unwrap()
                })
                .collect()
        }
    }

    impl Drop for TestNs {
        fn drop(&mut self) {
            let _ = crate::cmd::run(Command::new("ip").args(["netns", "del", &self.name]));
        }
    }

    /// Answers every connection with `greeting`, then echoes what it reads.
    fn serve(listener: tokio::net::TcpListener, greeting: &'static [u8]) {
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                tokio::spawn(async move {
                    conn.write_all(greeting).await?;
                    let mut buf = [0u8; 64];
                    loop {
                        let n = conn.read(&mut buf).await?;
                        if n == 0 {
                            return Ok::<_, io::Error>(());
                        }
                        conn.write_all(&buf[..n]).await?;
                    }
                });
            }
        });
    }

    /// Reads the greeting, then checks that bytes round-trip; returns the greeting.
    async fn talk(mut s: TcpStream, greeting_len: usize) -> String {
        let mut greeting = vec![0u8; greeting_len];
        tokio::time::timeout(WAIT, s.read_exact(&mut greeting))
            .await
            .unwrap()
            .unwrap();
        s.write_all(b"ping").await.unwrap();
        let mut back = [0u8; 4];
        tokio::time::timeout(WAIT, s.read_exact(&mut back))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&back, b"ping");
        String::from_utf8(greeting).unwrap()
    }

    fn thread_alive(tid: Pid) -> bool {
        Path::new(&format!("/proc/self/task/{tid}")).exists()
    }

    fn wait_thread_gone(tid: Pid) {
        let deadline = std::time::Instant::now() + WAIT;
        while thread_alive(tid) {
            assert!(
                std::time::Instant::now() < deadline,
                "namespace thread {tid} still running"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connects_from_inside_the_namespace_only() {
        let ns = TestNs::new();
        // The host's loopback and the namespace's get a listener on the same port, each
        // greeting differently, so a connection shows which one it reached.
        let host_lo = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let lo_port = host_lo.local_addr().unwrap().port();
        host_lo.set_nonblocking(true).unwrap();
        serve(tokio::net::TcpListener::from_std(host_lo).unwrap(), b"host");
        let ns_lo: SocketAddr = ([127, 0, 0, 1], lo_port).into();
        let mut listeners = ns.listen(vec![SocketAddr::new(ns.addr, 0), ns_lo]);
        let inside = listeners[0].local_addr().unwrap();
        serve(listeners.remove(1), b"namespace");
        serve(listeners.remove(0), b"inside");

        let c = NetnsConnector::open(&ns.name).unwrap();
        let s = c.connect(&[inside], WAIT).await.unwrap();
        assert_eq!(talk(s, 6).await, "inside");
        let direct = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(inside)).await;
        assert!(
            !matches!(direct, Ok(Ok(_))),
            "{inside} is reachable from the host's namespace"
        );

        let s = c.connect(&[ns_lo], WAIT).await.unwrap();
        assert_eq!(talk(s, 9).await, "namespace");
        let s = tokio::time::timeout(WAIT, TcpStream::connect(ns_lo))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(talk(s, 4).await, "host");

        // Addresses are tried in order; the last error is the one returned.
        let refused = SocketAddr::new(ns.addr, 1);
        let s = c.connect(&[refused, ns_lo], WAIT).await.unwrap();
        assert_eq!(talk(s, 9).await, "namespace");
        let e = c.connect(&[refused], WAIT).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused, "{e}");
        let e = c.connect(&[], WAIT).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}");

        // Lookups: literals as they are, names through the host's /etc/hosts.
        let found = tokio::time::timeout(WAIT, c.lookup("localhost", lo_port))
            .await
            .unwrap()
            .unwrap();
        assert!(found.contains(&ns_lo), "{found:?}");
        let s = c.connect(&found, WAIT).await.unwrap();
        assert_eq!(talk(s, 9).await, "namespace");
        assert_eq!(
            c.lookup(&ns.addr.to_string(), 80).await.unwrap(),
            vec![SocketAddr::new(ns.addr, 80)]
        );
        assert_eq!(
            c.lookup("::1", 443).await.unwrap(),
            vec!["[::1]:443".parse().unwrap()]
        );
        assert!(
            tokio::time::timeout(WAIT, c.lookup("no-such-host.invalid", 80))
                .await
                .unwrap()
                .is_err()
        );
    }

    #[test]
    fn open_explains_bad_names_and_missing_namespaces() {
        for bad in ["", ".", "..", "../x", "a/b", "a b", "x\0", &"n".repeat(65)] {
            let e = NetnsConnector::open(bad).unwrap_err();
            assert!(e.contains("invalid network namespace name"), "{bad:?}: {e}");
            assert!(Netns::new().get(bad).is_err(), "{bad:?}");
        }
        for good in ["a", "blue-net_1.0", &"n".repeat(64)] {
            validate_name(good).unwrap();
        }

        let e = NetnsConnector::open("hangar-t-missing").unwrap_err();
        assert!(
            e.contains("/run/netns/hangar-t-missing")
                && e.contains("`ip netns add hangar-t-missing`"),
            "{e}"
        );

        let plain = tempfile::NamedTempFile::new().unwrap();
        let e = NetnsConnector::open_path("x", plain.path()).unwrap_err();
        assert!(e.contains("is not a namespace"), "{e}");
        let e = NetnsConnector::open_path("x", Path::new("/proc/self/ns/uts")).unwrap_err();
        assert!(e.contains("is not a network namespace"), "{e}");
    }

    #[test]
    fn one_thread_per_namespace_until_the_last_connector_goes() {
        let ns = TestNs::new();
        let reg = Netns::new();
        let a = reg.get(&ns.name).unwrap();
        let b = reg.get(&ns.name).unwrap();
        assert!(Arc::ptr_eq(&a.inner, &b.inner));
        let old = a.inner.tid;
        assert!(thread_alive(old));

        // Re-created under the same name: a new namespace, a new connector.
        ip(&["netns", "del", &ns.name]);
        ip(&["netns", "add", &ns.name]);
        let c = reg.get(&ns.name).unwrap();
        assert!(!Arc::ptr_eq(&a.inner, &c.inner));
        assert!(thread_alive(old), "the old namespace's users still hold it");
        drop((a, b));
        wait_thread_gone(old);

        ip(&["netns", "del", &ns.name]);
        let e = reg.get(&ns.name).unwrap_err();
        assert!(e.contains("ip netns add"), "{e}");
        let tid = c.inner.tid;
        drop((c, reg));
        wait_thread_gone(tid);
    }
}
