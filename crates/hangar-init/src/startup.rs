//! Startup and shutdown of PID 1: reads the configuration, prepares the sandbox, starts every
//! task, and on `SIGTERM`/`SIGINT` stops the agent gracefully and everything else forcibly.
//!
//! When it is not PID 1 (tests), it must never signal processes it did not start: `kill(-1)`
//! is only used as PID 1, where "everything" is exactly the sandbox.

use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};

use crate::agent::Agent;
use crate::config::{self, Paths};
use crate::control::{self, App};
use crate::guest::{self, Guest};
use crate::links::HostSockets;
use crate::reaper::Reaper;

/// How long the agent gets between `SIGTERM` and `SIGKILL`.
const AGENT_GRACE: Duration = Duration::from_secs(10);

/// Runs `hangar-init`; returns the process exit code.
pub fn main() -> i32 {
    // In a microVM, PID 1 first has to make the sandbox out of the initramfs.
    let guest = match guest::mode() {
        Some(mode) => match guest::setup(mode) {
            Ok(g) => Some(g),
            Err(e) => {
                log!("the guest cannot start: {e}");
                guest::power_off();
            }
        },
        None => None,
    };
    let paths = Paths::from_env();
    let config = match config::load(&paths.run_dir) {
        Ok(c) => Arc::new(c),
        Err(e) => {
            log!("{e}");
            if guest.is_some() {
                guest::power_off();
            }
            return 1;
        }
    };
    if let Some(limits) = &config.vm {
        guest::apply_limits(limits);
    }
    let pid1 = std::process::id() == 1;
    if let Err(e) = loopback_up() {
        log!("cannot bring up lo: {e}");
    }
    if pid1 && !std::path::Path::new("/dev/shm").exists() {
        if let Err(e) = std::fs::create_dir_all("/dev/shm") {
            log!("cannot create /dev/shm: {e}");
        }
    }
    let guest_mode = guest.is_some();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            log!("cannot start the runtime: {e}");
            return 1;
        }
    };
    let code = runtime.block_on(run(paths, config, pid1, guest));
    if guest_mode {
        // PID 1 of a VM must not exit (the kernel would panic): the VM ends here.
        guest::power_off();
    }
    code
}

async fn run(
    paths: Paths,
    config: Arc<hangar_proto::init::InitConfig>,
    pid1: bool,
    guest: Option<Guest>,
) -> i32 {
    let reaper = Arc::new(Reaper::new());
    if let Err(e) = reaper.start() {
        log!("cannot handle SIGCHLD: {e}");
        return 1;
    }
    let (mut sigterm, mut sigint, mut sigusr2) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::user_defined2()),
    ) {
        (Ok(a), Ok(b), Ok(c)) => (a, b, c),
        _ => {
            log!("cannot install signal handlers");
            return 1;
        }
    };
    let agent = Agent::new(config.agent.is_some());
    let sockets = HostSockets::new(paths.run_dir.clone(), config.agent_port);
    let sockets = Arc::new(if guest.is_some() {
        sockets.kept_on_suspend()
    } else {
        sockets
    });
    let app = Arc::new(App {
        config: config.clone(),
        reaper: reaper.clone(),
        agent: agent.clone(),
        sockets: sockets.clone(),
        files_root: paths.files_root.clone(),
        users_root: "/".into(),
        run_dir: paths.run_dir.clone(),
    });
    // The agent finds its identity in place from its first instruction on.
    if let Some(token) = &config.token {
        if let Err(e) = crate::token::write(&paths.run_dir, token.as_bytes()) {
            log!("cannot write the session token: {e}");
        }
    }
    let router = control::router(app);
    if let Some(limits) = config.guard {
        tokio::spawn(crate::guard::run(limits));
    }
    if let Err(e) = sockets.bind(router.clone()) {
        log!("{e}");
        return 1;
    }
    // The host reaches the sockets through the link port only once they are bound.
    let _link = match guest {
        Some(g) => match crate::guest_link::start(g.port, paths.run_dir.clone(), config.agent_port)
        {
            Ok(link) => Some(link),
            Err(e) => {
                log!("cannot serve the link port: {e}");
                return 1;
            }
        },
        None => None,
    };
    // The agent's output goes through pipes, stamped line by line; without them it still runs,
    // writing to the console as it is.
    let output = match config.agent {
        Some(_) => match crate::output::Output::start() {
            Ok(o) => Some(Arc::new(o)),
            Err(e) => {
                log!("cannot pipe the agent's output; it writes to the console unstamped: {e}");
                None
            }
        },
        None => None,
    };
    tokio::spawn(
        agent
            .clone()
            .supervise(config.clone(), reaper.clone(), "/".into(), output),
    );
    log!("ready (pid {})", std::process::id());

    loop {
        tokio::select! {
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            _ = sigusr2.recv() => {
                log!("SIGUSR2: binding sockets again");
                if let Err(e) = sockets.bind(router.clone()) {
                    log!("{e}");
                }
            }
        }
    }

    log!("stopping");
    if !agent.shutdown(AGENT_GRACE).await {
        log!("agent did not exit within {AGENT_GRACE:?}; killing it");
    }
    if pid1 {
        // As PID 1, -1 means every other process in the sandbox (and nothing outside it).
        let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
    } else {
        for pid in reaper.spawned_groups() {
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
    sockets.remove_files();
    nix::unistd::sync();
    log!("stopped");
    0
}

/// Sets `IFF_UP` on `lo`: the sandbox's network namespace starts with loopback down, and the
/// proxy and `agent.sock` forwarding both need it.
fn loopback_up() -> std::io::Result<()> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // SAFETY: socket() has no memory-safety preconditions; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a freshly created descriptor that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads the name and writes the flags of the `ifreq` we own.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just filled `ifru_flags`, the active member after SIOCGIFFLAGS.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    if flags & libc::IFF_UP as libc::c_short != 0 {
        return Ok(());
    }
    req.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
    // SAFETY: SIOCSIFFLAGS reads the `ifreq` we own.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
