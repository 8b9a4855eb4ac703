//! The VMM behind the `vm` driver, and its one implementation so far: QEMU's `microvm` machine.
//!
//! [`Vmm`] is the whole surface the driver uses — launch, snapshot, restore, stop — so that
//! Firecracker or Cloud Hypervisor can be added next to [`Qemu`] without touching the driver.
//! Every VM is described by one [`VmSpec`], and QEMU's command line is built from it by one
//! function for both a cold boot and a restore: a restore must see exactly the devices the
//! snapshot was taken with.
//!
//! Memory snapshots keep guest RAM in a file (`memory-backend-file`, `share=on`) and migrate
//! only the device state (`x-ignore-shared`), so suspend writes kilobytes and resume maps the
//! same file again: the guest's processes continue where they stopped.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::cmd::{self, CmdError};

/// How a VM's vCPUs run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Hardware virtualisation.
    Kvm,
    /// QEMU's binary translator: correct everywhere, many times slower.
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// Everything that defines one VM. Paths must be absolute (a daemonised QEMU runs in `/`).
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// A name for process listings and the pid check (`hangar-<sandbox id>`).
    pub name: String,
    pub accel: Accel,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub cmdline: String,
    /// Guest RAM; kept across suspend.
    pub ram: PathBuf,
    /// `(serial, image file, read-only)` per virtio disk.
    pub disks: Vec<(String, PathBuf, bool)>,
    /// `(port name, unix socket QEMU listens on)` per virtio-serial port.
    pub ports: Vec<(String, PathBuf)>,
    pub qmp: PathBuf,
    pub pidfile: PathBuf,
    /// The serial console, appended to across boots and restores.
    pub console: PathBuf,
    /// The host cgroup limits QEMU runs under (see `cgroup.rs`), if any.
    pub limits: Option<super::cgroup::Limits>,
}

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("starting the VMM")]
    Launch(#[source] CmdError),
    #[error("talking to the VMM's control socket {path}")]
    Control {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the VMM refused {command}: {message}")]
    Refused { command: String, message: String },
    #[error("{0}")]
    Snapshot(String),
}

/// A virtual machine monitor: how VMs are started, snapshotted, restored and stopped.
pub trait Vmm: Send + Sync {
    fn name(&self) -> &'static str;
    /// The VMM's version, for `hangar doctor` and for keying cached probe results.
    fn version(&self) -> Option<String>;
    /// Boots `vm`; returns once the VMM runs detached (the guest is still booting).
    fn launch(&self, vm: &VmSpec) -> Result<(), VmmError>;
    /// Pauses `vm`, writes its device state to `state` (RAM stays in [`VmSpec::ram`]) and ends
    /// the VMM. The guest must have flushed what it needs on disk.
    fn snapshot(&self, vm: &VmSpec, state: &Path) -> Result<(), VmmError>;
    /// Starts a VMM on the same spec from `state` and the RAM file, and lets the guest continue.
    fn restore(&self, vm: &VmSpec, state: &Path) -> Result<(), VmmError>;
    /// The VMM's pid, if it runs.
    fn pid(&self, vm: &VmSpec) -> Option<i32>;
    /// Ends the VMM at once and waits until it is gone. Idempotent.
    fn kill(&self, vm: &VmSpec);
}

pub struct Qemu {
    binary: PathBuf,
    /// `binary` with its links resolved: what `/proc/<pid>/exe` of its processes shows.
    exe: PathBuf,
}

impl Qemu {
    pub fn new(binary: PathBuf) -> Qemu {
        let exe = std::fs::canonicalize(&binary).unwrap_or_else(|_| binary.clone());
        Qemu { binary, exe }
    }

    /// `qemu-system-x86_64` on `PATH`, if installed.
    pub fn find() -> Option<Qemu> {
        cmd::which("qemu-system-x86_64").map(Qemu::new)
    }

    /// The command line for `vm`; `incoming` waits for a snapshot instead of booting.
    pub fn command(&self, vm: &VmSpec, incoming: bool) -> Command {
        let mut c = Command::new(&self.binary);
        let p = |p: &Path| p.to_string_lossy().replace(',', ",,");
        c.args(["-name", &vm.name]);
        c.args(["-M", "microvm,memory-backend=mem"]);
        match vm.accel {
            Accel::Kvm => c.args(["-accel", "kvm", "-cpu", "host"]),
            // The translation cache defaults to 1 GiB per VM; 256 MiB bounds it.
            Accel::Tcg => c.args(["-accel", "tcg,tb-size=256", "-cpu", "max"]),
        };
        c.args(["-smp", &vm.vcpus.to_string()]);
        c.args(["-m", &format!("{}M", vm.memory_mib)]);
        c.arg("-object").arg(format!(
            "memory-backend-file,id=mem,size={}M,mem-path={},share=on",
            vm.memory_mib,
            p(&vm.ram)
        ));
        c.args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ]);
        // Confinement. QEMU opens every file and socket it needs as root, then drops to
        // `nobody` (`-runas`) under its own seccomp filter (no obsolete or resource-control
        // system calls; `spawn` and `elevateprivileges` must stay allowed because
        // `-daemonize` forks and calls setsid), in network and IPC namespaces of its own (see
        // `pre_exec` below): an escape from the guest lands in an unprivileged process that
        // cannot reach Hangar's API or any other host network service.
        c.args([
            "-sandbox",
            "on,obsolete=deny,resourcecontrol=deny",
            "-runas",
            VMM_USER,
        ]);
        let namespaces = vmm_namespaces().map(|(net, ipc)| {
            use std::os::fd::AsRawFd;
            (net.as_raw_fd(), ipc.as_raw_fd())
        });
        // SAFETY: setns(2) and unshare(2) are async-signal-safe and act on this (forked)
        // process only; the descriptors outlive the spawn (they are static).
        unsafe {
            use std::os::unix::process::CommandExt;
            c.pre_exec(move || match namespaces {
                Some((net, ipc)) => {
                    for (fd, kind) in [(net, libc::CLONE_NEWNET), (ipc, libc::CLONE_NEWIPC)] {
                        if libc::setns(fd, kind) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    Ok(())
                }
                None => nix::sched::unshare(
                    nix::sched::CloneFlags::CLONE_NEWNET | nix::sched::CloneFlags::CLONE_NEWIPC,
                )
                .map_err(std::io::Error::from),
            });
        }
        c.arg("-chardev")
            .arg(format!("file,id=console,path={},append=on", p(&vm.console)));
        c.args(["-serial", "chardev:console"]);
        c.arg("-kernel").arg(&vm.kernel);
        c.arg("-initrd").arg(&vm.initrd);
        c.arg("-append").arg(&vm.cmdline);
        for (i, (serial, file, readonly)) in vm.disks.iter().enumerate() {
            // A writable disk is handed over as descriptors (an fd set with a read-write and a
            // read-only one): QEMU, no longer root, reopens it read-only when a snapshot
            // deactivates it, and could not open the file by its path.
            let file = if *readonly {
                p(file)
            } else {
                let set = i + 1;
                let (rw, ro) = disk_fds(i);
                c.args(["-add-fd", &format!("fd={rw},set={set}")]);
                c.args(["-add-fd", &format!("fd={ro},set={set}")]);
                format!("/dev/fdset/{set}")
            };
            c.arg("-drive").arg(format!(
                "id=disk{i},file={file},format=raw,if=none,readonly={}",
                if *readonly { "on" } else { "off" }
            ));
            c.arg("-device")
                .arg(format!("virtio-blk-device,drive=disk{i},serial={serial}"));
        }
        // Pages the guest frees are handed back (punched out of the RAM file), so a memory
        // snapshot is what the guest uses, not everything it ever touched.
        c.args(["-device", "virtio-balloon-device,free-page-reporting=on"]);
        if !vm.ports.is_empty() {
            c.args(["-device", "virtio-serial-device"]);
        }
        for (i, (name, sock)) in vm.ports.iter().enumerate() {
            c.arg("-chardev").arg(format!(
                "socket,id=port{i},path={},server=on,wait=off",
                p(sock)
            ));
            c.arg("-device")
                .arg(format!("virtserialport,chardev=port{i},name={name}"));
        }
        c.arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", p(&vm.qmp)));
        c.arg("-pidfile").arg(&vm.pidfile);
        c.arg("-daemonize");
        if incoming {
            c.args(["-incoming", "defer"]);
        }
        c
    }

    fn start(&self, vm: &VmSpec, incoming: bool) -> Result<(), VmmError> {
        // Sockets of a previous run would make QEMU fail to bind.
        for (_, sock) in &vm.ports {
            let _ = std::fs::remove_file(sock);
        }
        let _ = std::fs::remove_file(&vm.qmp);
        let _ = std::fs::remove_file(&vm.pidfile);
        // The writable disks' descriptors, placed at the numbers `command` names.
        let mut handed = Vec::new();
        for (i, (_, file, readonly)) in vm.disks.iter().enumerate() {
            if *readonly {
                continue;
            }
            let open = |write: bool| {
                std::fs::OpenOptions::new()
                    .read(true)
                    .write(write)
                    .open(file)
                    .map_err(|e| {
                        VmmError::Launch(CmdError::Spawn {
                            program: format!("opening {}", file.display()),
                            source: e,
                        })
                    })
            };
            let (rw, ro) = disk_fds(i);
            handed.push((open(true)?, rw));
            handed.push((open(false)?, ro));
        }
        let mut c = self.command(vm, incoming);
        if let Some(limits) = vm.limits {
            let procs = super::cgroup::Cgroup::of(&vm.name)
                .create(limits)
                .map_err(|e| {
                    VmmError::Launch(CmdError::Spawn {
                        program: "creating the VM's cgroup".into(),
                        source: e,
                    })
                })?;
            // SAFETY: `join` only opens and writes (async-signal-safe), as pre_exec requires.
            unsafe {
                use std::os::unix::process::CommandExt;
                c.pre_exec(move || super::cgroup::Cgroup::join(&procs));
            }
        }
        let fds: Vec<(i32, i32)> = handed
            .iter()
            .map(|(f, to)| (std::os::fd::AsRawFd::as_raw_fd(f), *to))
            .collect();
        // SAFETY: dup2 and fcntl are async-signal-safe and act on this (forked) process only.
        unsafe {
            use std::os::unix::process::CommandExt;
            c.pre_exec(move || {
                for &(from, to) in &fds {
                    if from == to {
                        let flags = libc::fcntl(to, libc::F_GETFD);
                        libc::fcntl(to, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
                    } else if libc::dup2(from, to) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        // With -daemonize the foreground process exits once the VM runs (sockets bound), or
        // with the error that kept it from starting.
        let r = cmd::run(&mut c).map_err(VmmError::Launch);
        drop(handed);
        r.map(|_| ())
    }
}

impl Vmm for Qemu {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn version(&self) -> Option<String> {
        let out = cmd::run(Command::new(&self.binary).arg("--version")).ok()?;
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .map(str::to_owned)
    }

    fn launch(&self, vm: &VmSpec) -> Result<(), VmmError> {
        self.start(vm, false)
    }

    fn snapshot(&self, vm: &VmSpec, state: &Path) -> Result<(), VmmError> {
        let mut qmp = Qmp::connect(&vm.qmp)?;
        qmp.execute(
            "migrate-set-capabilities",
            json!({"capabilities": [{"capability": "x-ignore-shared", "state": true}]}),
        )?;
        qmp.execute("stop", json!({}))?;
        if let Err(e) = save_device_state(&mut qmp, state) {
            // The guest is paused, not lost: whatever failed, let it run again (on a fresh
            // connection if this one is what failed).
            let _ = qmp.execute("migrate_cancel", json!({}));
            if qmp.execute("cont", json!({})).is_err() {
                if let Ok(mut again) = Qmp::connect(&vm.qmp) {
                    let _ = again.execute("cont", json!({}));
                }
            }
            return Err(e);
        }
        let pid = self.pid(vm);
        // QEMU answers `quit` and closes the socket as it exits.
        let _ = qmp.execute("quit", json!({}));
        if let Some(pid) = pid {
            if !crate::reaper::wait_reaped(pid, Duration::from_secs(10)) {
                self.kill(vm);
            }
        }
        super::cgroup::Cgroup::of(&vm.name).remove();
        Ok(())
    }

    fn restore(&self, vm: &VmSpec, state: &Path) -> Result<(), VmmError> {
        self.start(vm, true)?;
        let result = (|| {
            let mut qmp = Qmp::connect(&vm.qmp)?;
            qmp.execute(
                "migrate-set-capabilities",
                json!({"capabilities": [{"capability": "x-ignore-shared", "state": true}]}),
            )?;
            let file = std::fs::File::open(state)
                .map_err(|e| VmmError::Snapshot(format!("opening {}: {e}", state.display())))?;
            qmp.pass_fd(MIGRATION_FD, &file)?;
            qmp.execute(
                "migrate-incoming",
                json!({ "uri": format!("fd:{MIGRATION_FD}") }),
            )?;
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let r = qmp.execute("query-status", json!({}))?;
                match r.get("status").and_then(Value::as_str) {
                    Some("inmigrate") if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(1))
                    }
                    Some("inmigrate") => {
                        return Err(VmmError::Snapshot(
                            "loading the device state took over 60 s".into(),
                        ))
                    }
                    _ => break,
                }
            }
            qmp.execute("cont", json!({}))?;
            Ok(())
        })();
        if result.is_err() {
            self.kill(vm);
        }
        result
    }

    fn pid(&self, vm: &VmSpec) -> Option<i32> {
        let pid: i32 = std::fs::read_to_string(&vm.pidfile)
            .ok()?
            .trim()
            .parse()
            .ok()?;
        // The pid file outlives the process; make sure the pid is still this VM's QEMU (and
        // not a zombie waiting for the reaper).
        // Both the executable and the `-name` argument, so that a pid reused by another
        // process (a `grep` naming the sandbox, say) is never taken for it.
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
        if exe != self.exe {
            return None;
        }
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let mut args = cmdline.split(|b| *b == 0);
        let ours = args.any(|arg| arg == b"-name") && args.next() == Some(vm.name.as_bytes());
        (ours && !crate::reaper::is_zombie(pid)).then_some(pid)
    }

    fn kill(&self, vm: &VmSpec) {
        if let Some(pid) = self.pid(vm) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            crate::reaper::wait_reaped(pid, Duration::from_secs(10));
        }
        let _ = std::fs::remove_file(&vm.pidfile);
        let _ = std::fs::remove_file(&vm.qmp);
        for (_, sock) in &vm.ports {
            let _ = std::fs::remove_file(sock);
        }
        super::cgroup::Cgroup::of(&vm.name).remove();
    }
}

/// With the VM stopped: migrates its device state into `state` and waits until it is written.
fn save_device_state(qmp: &mut Qmp, state: &Path) -> Result<(), VmmError> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(state)
        .map_err(|e| VmmError::Snapshot(format!("creating {}: {e}", state.display())))?;
    qmp.pass_fd(MIGRATION_FD, &file)?;
    qmp.execute("migrate", json!({ "uri": format!("fd:{MIGRATION_FD}") }))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = qmp.execute("query-migrate", json!({}))?;
        match r.get("status").and_then(Value::as_str) {
            Some("completed") => return Ok(()),
            Some("failed") | Some("cancelled") => {
                let why = r
                    .get("error-desc")
                    .and_then(Value::as_str)
                    .unwrap_or("no reason given");
                return Err(VmmError::Snapshot(format!(
                    "saving the device state failed: {why}"
                )));
            }
            _ if Instant::now() > deadline => {
                return Err(VmmError::Snapshot(
                    "saving the device state took over 60 s".into(),
                ))
            }
            _ => std::thread::sleep(Duration::from_millis(1)),
        }
    }
}

/// The descriptor numbers (read-write, read-only) disk `i` is handed to QEMU at; far above
/// anything the spawning process has open at the time of the exec.
fn disk_fds(i: usize) -> (i32, i32) {
    (200 + 2 * i as i32, 201 + 2 * i as i32)
}

/// The network and IPC namespaces every QEMU runs in: empty ones (only a loopback that is
/// down), made once. Making a network namespace per VM costs tens of milliseconds on every
/// boot and restore; joining one costs nothing. `None` if they cannot be made, and then each
/// QEMU makes its own.
fn vmm_namespaces() -> Option<&'static (std::os::fd::OwnedFd, std::os::fd::OwnedFd)> {
    static NS: std::sync::OnceLock<Option<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)>> =
        std::sync::OnceLock::new();
    NS.get_or_init(|| {
        // unshare(2) of these applies to the calling thread only: a thread of its own makes
        // them, and the open descriptors keep them alive after it ends.
        std::thread::spawn(|| {
            nix::sched::unshare(
                nix::sched::CloneFlags::CLONE_NEWNET | nix::sched::CloneFlags::CLONE_NEWIPC,
            )
            .ok()?;
            let open = |kind: &str| {
                std::fs::File::open(format!("/proc/thread-self/ns/{kind}"))
                    .ok()
                    .map(std::os::fd::OwnedFd::from)
            };
            Some((open("net")?, open("ipc")?))
        })
        .join()
        .ok()
        .flatten()
    })
    .as_ref()
}

/// The unprivileged user QEMU runs as once it has opened its files.
const VMM_USER: &str = "nobody";

/// The name under which a snapshot's file descriptor is handed to QEMU.
const MIGRATION_FD: &str = "hangar-migration";

/// A QMP connection: one JSON object per line each way, asynchronous events interleaved.
struct Qmp {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects (waiting briefly for the socket, which QEMU binds as it starts) and leaves
    /// capabilities negotiation mode.
    fn connect(path: &Path) -> Result<Qmp, VmmError> {
        let io = |source| VmmError::Control {
            path: path.to_owned(),
            source,
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => return Err(io(e)),
                Err(_) => std::thread::sleep(Duration::from_millis(2)),
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(io)?;
        let writer = stream.try_clone().map_err(io)?;
        let mut qmp = Qmp {
            path: path.to_owned(),
            reader: BufReader::new(stream),
            writer,
        };
        qmp.read()?; // the greeting
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    fn read(&mut self) -> Result<Value, VmmError> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(|source| VmmError::Control {
                path: self.path.clone(),
                source,
            })?;
        if n == 0 {
            return Err(VmmError::Control {
                path: self.path.clone(),
                source: std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the VMM closed its control socket",
                ),
            });
        }
        serde_json::from_str(&line).map_err(|e| VmmError::Control {
            path: self.path.clone(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        })
    }

    /// Hands `file` to QEMU under `name` (`getfd`, with the descriptor attached to the message).
    fn pass_fd(&mut self, name: &str, file: &std::fs::File) -> Result<(), VmmError> {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
        use std::os::fd::AsRawFd;
        let mut bytes = serde_json::to_vec(&json!({
            "execute": "getfd",
            "arguments": { "fdname": name },
        }))
        .expect("json serialises");
        bytes.push(b'\n');
        let fds = [file.as_raw_fd()];
        sendmsg::<()>(
            self.writer.as_raw_fd(),
            &[std::io::IoSlice::new(&bytes)],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            None,
        )
        .map_err(|e| VmmError::Control {
            path: self.path.clone(),
            source: e.into(),
        })?;
        self.answer("getfd")?;
        Ok(())
    }

    /// Runs `command` and returns its `return` value, skipping events.
    fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, VmmError> {
        let mut msg = json!({ "execute": command });
        if arguments.as_object().is_some_and(|a| !a.is_empty()) {
            msg["arguments"] = arguments;
        }
        let mut bytes = serde_json::to_vec(&msg).expect("json serialises");
        bytes.push(b'\n');
        self.writer
            .write_all(&bytes)
            .map_err(|source| VmmError::Control {
                path: self.path.clone(),
                source,
            })?;
        self.answer(command)
    }

    /// Reads up to the answer of `command`, skipping events.
    fn answer(&mut self, command: &str) -> Result<Value, VmmError> {
        loop {
            let v = self.read()?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(VmmError::Refused {
                    command: command.to_owned(),
                    message: e
                        .get("desc")
                        .and_then(Value::as_str)
                        .unwrap_or("unknown error")
                        .to_owned(),
                });
            }
            // An event ({"event": ...}): not the answer.
        }
    }
}
