//! PID 1 of a microVM (the `vm` driver): turns the kernel's initramfs into the sandbox.
//!
//! The kernel starts `/init` (this binary) from an initramfs that holds the modules to load,
//! in order, and `init.json`. [`setup`] mounts the kernel filesystems, loads the modules, finds
//! the two disks by their serial numbers (the image, read-only; the session volume), overlays
//! them, moves into the overlay as `/`, and opens the virtio-serial port that carries every link
//! to the host. After that `hangar-init` runs exactly as in the other drivers, with `/run/hangar`
//! a tmpfs of the guest's own and the port multiplexed onto its sockets (see `startup`).
//!
//! Any failure here is fatal: the error goes to the serial console (which the host shows as
//! the tail of a failed boot) and the VM powers off.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hangar_proto::init::vm::{
    CONFIG_IN_INITRD, GUEST_ENV, IMAGE_SERIAL, LINK_PORT, MODULES_DIR, MODULES_ORDER, PROBE_OK,
    VOLUME_SERIAL,
};
use hangar_proto::init::{VmGuest, INIT_CONFIG_FILE, RUN_DIR_IN_SANDBOX};
use nix::mount::{mount, MsFlags};

/// How long the disks and the port may take to appear once their drivers are loaded.
const DEVICE_WAIT: Duration = Duration::from_secs(5);

/// What the guest runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A sandbox.
    Sandbox,
    /// Proves that the kernel boots and the modules load, then powers off.
    Probe,
    /// Like `Probe`, but stays up doing nothing: the benchmark's raw VM, which it snapshots
    /// and restores with nothing of Hangar in between.
    Park,
}

/// The guest mode, when this process is PID 1 of a Hangar microVM.
pub fn mode() -> Option<Mode> {
    if std::process::id() != 1 {
        return None;
    }
    match std::env::var(GUEST_ENV).ok()?.as_str() {
        "vm" => Some(Mode::Sandbox),
        "probe" => Some(Mode::Probe),
        "park" => Some(Mode::Park),
        _ => None,
    }
}

/// The guest after [`setup`]: `/` is the sandbox's overlay, `init.json` is in the run directory.
pub struct Guest {
    /// The virtio-serial port of the links, opened once (a port cannot be opened twice).
    pub port: File,
}

#[derive(Debug)]
pub struct SetupError(String);

impl std::fmt::Display for SetupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn fail(what: impl std::fmt::Display, e: impl std::fmt::Display) -> SetupError {
    SetupError(format!("{what}: {e}"))
}

/// Prepares the VM (see the module documentation). In [`Mode::Probe`] it never returns.
pub fn setup(mode: Mode) -> Result<Guest, SetupError> {
    let t0 = Instant::now();
    mount_kernel_filesystems(Path::new("/"))?;
    load_modules()?;
    match mode {
        Mode::Sandbox => {}
        Mode::Probe => {
            println!("{PROBE_OK}");
            power_off();
        }
        Mode::Park => {
            println!("{PROBE_OK}");
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
    }
    let volume = wait_for(DEVICE_WAIT, || disk_by_serial(VOLUME_SERIAL))
        .ok_or_else(|| fail("the session volume", "no virtio disk with that serial"))?;
    let image = wait_for(DEVICE_WAIT, || disk_by_serial(IMAGE_SERIAL))
        .ok_or_else(|| fail("the image disk", "no virtio disk with that serial"))?;
    for d in ["/mnt/image", "/mnt/vol", "/mnt/root"] {
        std::fs::create_dir_all(d).map_err(|e| fail(d, e))?;
    }
    mount_image(&image, Path::new("/mnt/image"))?;
    mount_fs(
        &volume,
        "/mnt/vol",
        "ext4",
        MsFlags::MS_NODEV | MsFlags::MS_NOSUID,
        "noinit_itable",
    )?;
    for d in ["/mnt/vol/upper", "/mnt/vol/work"] {
        std::fs::create_dir_all(d).map_err(|e| fail(d, e))?;
    }
    mount(
        Some("overlay"),
        "/mnt/root",
        Some("overlay"),
        MsFlags::MS_NODEV | MsFlags::MS_NOSUID,
        Some("lowerdir=/mnt/image,upperdir=/mnt/vol/upper,workdir=/mnt/vol/work"),
    )
    .map_err(|e| fail("mounting the overlay root", e))?;
    let config = std::fs::read(Path::new("/").join(CONFIG_IN_INITRD))
        .map_err(|e| fail(format!("reading /{CONFIG_IN_INITRD}"), e))?;
    let port = wait_for(DEVICE_WAIT, || port_by_name(LINK_PORT)).ok_or_else(|| {
        fail(
            "the link port",
            format!("no virtio-serial port named {LINK_PORT}"),
        )
    })?;
    let port = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&port)
        .map_err(|e| fail(port.display(), e))?;
    free_initramfs();
    switch_root(Path::new("/mnt/root"))?;
    let run = Path::new(RUN_DIR_IN_SANDBOX);
    std::fs::create_dir_all(run).map_err(|e| fail(run.display(), e))?;
    mount(
        Some("tmpfs"),
        run,
        Some("tmpfs"),
        MsFlags::MS_NODEV | MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("mode=0755,size=16m"),
    )
    .map_err(|e| fail("mounting /run/hangar", e))?;
    write_private(&run.join(INIT_CONFIG_FILE), &config)?;
    let pts = Path::new("/dev/pts");
    std::fs::create_dir_all(pts).map_err(|e| fail(pts.display(), e))?;
    mount(
        Some("devpts"),
        pts,
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    )
    .map_err(|e| fail("mounting /dev/pts", e))?;
    let shm = Path::new("/dev/shm");
    std::fs::create_dir_all(shm).map_err(|e| fail(shm.display(), e))?;
    mount(
        Some("shm"),
        shm,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    )
    .map_err(|e| fail("mounting /dev/shm", e))?;
    log!("guest ready in {:?}", t0.elapsed());
    Ok(Guest { port })
}

/// Applies what the guest enforces itself: every process of the VM, this one included, runs
/// in one cgroup whose `pids.max` is the sandbox's limit (root in the guest cannot lift it
/// without leaving that cgroup, which the limit is not meant to survive: the VM is the
/// isolation boundary, this is resource accounting).
pub fn apply_limits(limits: &VmGuest) {
    let root = Path::new("/sys/fs/cgroup");
    let result = (|| -> Result<(), SetupError> {
        std::fs::create_dir_all(root).map_err(|e| fail(root.display(), e))?;
        mount(
            Some("cgroup2"),
            root,
            Some("cgroup2"),
            MsFlags::MS_NODEV | MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            None::<&str>,
        )
        .map_err(|e| fail("mounting cgroup2", e))?;
        let write = |p: PathBuf, v: String| std::fs::write(&p, v).map_err(|e| fail(p.display(), e));
        write(root.join("cgroup.subtree_control"), "+pids +memory".into())?;
        let sandbox = root.join("sandbox");
        std::fs::create_dir_all(&sandbox).map_err(|e| fail(sandbox.display(), e))?;
        write(sandbox.join("pids.max"), limits.pids_max.to_string())?;
        // A process that grows past the guest's memory is killed by the cgroup, at once,
        // rather than leaving the whole guest to thrash its page cache until the kernel's
        // global OOM killer finally acts (minutes, under TCG). PID 1 is never chosen.
        if let Some(max) = memory_max() {
            write(sandbox.join("memory.max"), max.to_string())?;
        }
        write(sandbox.join("cgroup.procs"), std::process::id().to_string())
    })();
    if let Err(e) = result {
        log!("cannot apply the guest's limits: {e}");
    }
}

/// The guest's memory less what its kernel and `hangar-init` need to stay responsive.
fn memory_max() -> Option<u64> {
    const RESERVE: u64 = 16 << 20;
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    (kib * 1024).checked_sub(RESERVE).filter(|m| *m >= RESERVE)
}

/// Powers the VM off (QEMU runs with `-no-reboot`, so it exits).
pub fn power_off() -> ! {
    nix::unistd::sync();
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    // Only reached if the kernel refused; PID 1 exiting panics the kernel, which also ends it.
    std::process::exit(1)
}

fn mount_kernel_filesystems(root: &Path) -> Result<(), SetupError> {
    let fs: [(&str, &str, MsFlags, Option<&str>); 3] = [
        ("dev", "devtmpfs", MsFlags::MS_NOSUID, Some("mode=0755")),
        (
            "proc",
            "proc",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            None,
        ),
        (
            "sys",
            "sysfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            None,
        ),
    ];
    for (dir, kind, flags, data) in fs {
        let target = root.join(dir);
        std::fs::create_dir_all(&target).map_err(|e| fail(target.display(), e))?;
        mount(Some(kind), &target, Some(kind), flags, data)
            .map_err(|e| fail(format!("mounting {}", target.display()), e))?;
    }
    Ok(())
}

/// Loads the initramfs's modules in the order the host resolved. A module the kernel has
/// already (built in, or loaded) is fine.
fn load_modules() -> Result<(), SetupError> {
    let order = match std::fs::read_to_string(Path::new("/").join(MODULES_ORDER)) {
        Ok(o) => o,
        // A kernel with everything built in needs no modules.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(fail(MODULES_ORDER, e)),
    };
    let dir = Path::new("/").join(MODULES_DIR);
    let none = CString::default();
    for name in order.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let path = dir.join(name);
        let file = File::open(&path).map_err(|e| fail(path.display(), e))?;
        match nix::kmod::finit_module(file.as_fd(), &none, nix::kmod::ModuleInitFlags::empty()) {
            Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
            Err(e) => return Err(fail(format!("loading module {name}"), e)),
        }
    }
    Ok(())
}

fn wait_for<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `/dev/vdX` of the virtio disk whose `serial=` is `serial`.
fn disk_by_serial(serial: &str) -> Option<PathBuf> {
    for entry in std::fs::read_dir("/sys/block").ok()?.flatten() {
        let name = entry.file_name();
        let Ok(s) = std::fs::read_to_string(entry.path().join("serial")) else {
            continue;
        };
        if s.trim() == serial {
            let dev = Path::new("/dev").join(&name);
            return dev.exists().then_some(dev);
        }
    }
    None
}

/// `/dev/vportNpM` of the port named `name`. Port numbers move with the number of virtio
/// devices, names do not.
fn port_by_name(name: &str) -> Option<PathBuf> {
    for entry in std::fs::read_dir("/sys/class/virtio-ports").ok()?.flatten() {
        let Ok(n) = std::fs::read_to_string(entry.path().join("name")) else {
            continue;
        };
        if n.trim() == name {
            let dev = Path::new("/dev").join(entry.file_name());
            return dev.exists().then_some(dev);
        }
    }
    None
}

fn mount_fs(
    dev: &Path,
    target: &str,
    kind: &str,
    flags: MsFlags,
    data: &str,
) -> Result<(), SetupError> {
    mount(Some(dev), target, Some(kind), flags, Some(data)).map_err(|e| {
        fail(
            format!("mounting {} ({kind}) at {target}", dev.display()),
            e,
        )
    })
}

/// The image disk is erofs (what the driver builds) or ext4 (a fallback it may build).
fn mount_image(dev: &Path, target: &Path) -> Result<(), SetupError> {
    let flags = MsFlags::MS_RDONLY | MsFlags::MS_NODEV;
    let erofs = mount(Some(dev), target, Some("erofs"), flags, None::<&str>);
    if erofs.is_ok() {
        return Ok(());
    }
    mount(Some(dev), target, Some("ext4"), flags, Some("noload")).map_err(|e| {
        fail(
            format!("mounting the image {}", dev.display()),
            format!("erofs: {}, ext4: {e}", erofs.unwrap_err()),
        )
    })
}

/// Removes what the initramfs no longer needs (its memory is the guest's): the modules, the
/// configuration and this binary's file (the running process keeps its pages).
fn free_initramfs() {
    let _ = std::fs::remove_dir_all(Path::new("/").join(MODULES_DIR));
    if let Some(dir) = Path::new("/").join(CONFIG_IN_INITRD).parent() {
        let _ = std::fs::remove_dir_all(dir);
    }
    let _ = std::fs::remove_file("/init");
}

/// Makes `new_root` the root: moves the kernel filesystems into it, moves it over `/`, and
/// changes root (the initramfs way; `pivot_root` does not work on the initial rootfs).
fn switch_root(new_root: &Path) -> Result<(), SetupError> {
    for dir in ["dev", "proc", "sys"] {
        let target = new_root.join(dir);
        std::fs::create_dir_all(&target).map_err(|e| fail(target.display(), e))?;
        mount(
            Some(Path::new("/").join(dir).as_path()),
            &target,
            None::<&str>,
            MsFlags::MS_MOVE,
            None::<&str>,
        )
        .map_err(|e| fail(format!("moving /{dir}"), e))?;
    }
    std::env::set_current_dir(new_root).map_err(|e| fail(new_root.display(), e))?;
    mount(
        Some(new_root),
        "/",
        None::<&str>,
        MsFlags::MS_MOVE,
        None::<&str>,
    )
    .map_err(|e| fail("moving the root", e))?;
    nix::unistd::chroot(".").map_err(|e| fail("chroot", e))?;
    std::env::set_current_dir("/").map_err(|e| fail("chdir /", e))?;
    Ok(())
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), SetupError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(bytes))
        .map_err(|e| fail(path.display(), e))
}
