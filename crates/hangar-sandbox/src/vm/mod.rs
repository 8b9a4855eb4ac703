//! The `vm` driver: every sandbox in its own microVM (QEMU `microvm`; KVM where it works,
//! else TCG), with memory snapshots for suspend.
//!
//! A VM boots Debian's cloud kernel with an initramfs that Hangar builds once per kernel
//! ([`initramfs`]): `hangar-init` as `/init` plus the modules it loads. Its disks are the
//! image, read-only and shared ([`disk`]), and the session volume; `hangar-init` overlays
//! them in the guest. Its one link to the host is a virtio-serial port multiplexed by
//! `hangar-mux`; [`bridge`] serves `control.sock`, `agent.sock` and `egress.sock` on the host
//! over it, so nothing above the driver can tell a VM from a container.
//!
//! Guest RAM is a file in the sandbox directory. Suspend syncs the guest, has the VMM save
//! the device state (kilobytes) and exit; resume starts a VMM on the same RAM file and state,
//! and every process continues. A suspended VM is files only: no process, no memory.
//!
//! The VMM sits behind [`qemu::Vmm`]; QEMU is its only implementation so far.

pub mod baseline;
pub mod bridge;
pub mod cgroup;
pub mod disk;
pub mod initramfs;
pub mod probe;
pub mod qemu;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hangar_proto::init::vm::{CONFIG_IN_INITRD, IMAGE_SERIAL, LINK_PORT, VOLUME_SERIAL};
use hangar_proto::sandbox::{CheckpointMode, DriverKind};
use serde::{Deserialize, Serialize};

use crate::driver::{Driver, DriverError, Recovered, Resumed, SandboxSpec, Suspended};
use crate::link::InitLink;
use bridge::{Bridge, BridgePaths};
use initramfs::Kernel;
use qemu::{Accel, VmSpec, Vmm};

/// Probes the `vm` driver on this host (see [`probe`]), caching the KVM probe host-wide.
pub fn probe_vm(
    data_dir: &Path,
    kernel: Option<&Path>,
    init_binary: &Path,
    force: Option<Accel>,
) -> probe::VmProbe {
    let cache = if nix::unistd::geteuid().is_root() {
        PathBuf::from("/var/cache/hangar/vm-probe.json")
    } else {
        data_dir.join("vm").join("probe.json")
    };
    probe::probe(&probe::ProbeInput {
        data_dir,
        kernel,
        init_binary,
        force,
        cache,
    })
}

/// The least memory a VM boots in: the kernel, and the initramfs unpacked from the initrd.
const MIN_MEMORY_MIB: u64 = 128;

/// Marks a device-state file as complete (a suspend that died half-way is never restored);
/// holds the host's boot id.
const COMPLETE: &str = "hangar-complete";
/// Marks a snapshot whose files are on disk (restorable after a host crash too).
const DURABLE: &str = "hangar-durable";
/// How long the first link connection may take: the whole boot (about 2.5 s under TCG), as
/// long as the manager waits for the sandbox to be ready.
const BOOT_LINK_TIMEOUT: Duration = crate::manager::READY_TIMEOUT;

/// How the `vm` driver is set up.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Hangar's data directory: image disks, initramfs builds, and the default kernel.
    pub data_dir: PathBuf,
    /// A guest kernel to use instead of the one the install script fetched.
    pub kernel: Option<PathBuf>,
    /// The accelerator, as probed (see [`probe`]).
    pub accel: Accel,
}

/// What a VM was booted with, kept next to it: a restore must use exactly the same.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Boot {
    accel: Accel,
    cmdline: String,
    vcpus: u32,
    memory_mib: u64,
    kernel: PathBuf,
    image_disk: PathBuf,
}

pub struct VmDriver {
    vmm: Arc<dyn Vmm>,
    cfg: VmConfig,
    /// The kernel and its initramfs, resolved on first use.
    assets: Mutex<Option<(Kernel, PathBuf)>>,
    bridges: Mutex<HashMap<String, Bridge>>,
    /// One lock per image whose disk is being built, so that sessions of a new image starting
    /// together build it once.
    building: Mutex<HashMap<String, Arc<Mutex<()>>>>,
}

impl VmDriver {
    pub fn new(vmm: Arc<dyn Vmm>, cfg: VmConfig) -> VmDriver {
        VmDriver {
            vmm,
            cfg,
            assets: Mutex::new(None),
            bridges: Mutex::new(HashMap::new()),
            building: Mutex::new(HashMap::new()),
        }
    }

    fn vm_dir(sb: &SandboxSpec) -> PathBuf {
        sb.layout.dir.join("vm")
    }

    /// The kernel and the initramfs for `init_binary`, built once.
    fn assets(&self, init_binary: &Path) -> Result<(Kernel, PathBuf), DriverError> {
        let mut assets = self.assets.lock().unwrap_or_else(|e| e.into_inner());
        // Another Hangar on the same data directory may have replaced the build.
        if let Some(a) = assets.as_ref().filter(|(_, initrd)| initrd.exists()) {
            return Ok(a.clone());
        }
        let kernel = Kernel::locate(self.cfg.kernel.as_deref(), &self.cfg.data_dir)
            .map_err(|e| DriverError::Other(crate::error_chain(&e)))?;
        let initrd = initramfs::build(init_binary, &kernel, &self.cfg.data_dir.join("vm"))
            .map_err(|e| DriverError::Other(crate::error_chain(&e)))?;
        *assets = Some((kernel.clone(), initrd.clone()));
        Ok((kernel, initrd))
    }

    fn image_disk(&self, image: &hangar_image::Image) -> Result<PathBuf, DriverError> {
        let lock = self
            .building
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(image.id.clone())
            .or_default()
            .clone();
        let _building = lock.lock().unwrap_or_else(|e| e.into_inner());
        let disk = disk::image_disk(image, &self.cfg.data_dir.join("vm").join("images"))
            .map_err(|e| DriverError::Other(crate::error_chain(&e)));
        self.building
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&image.id);
        disk
    }

    fn spec(&self, sb: &SandboxSpec, boot: &Boot) -> VmSpec {
        let vm = Self::vm_dir(sb);
        VmSpec {
            name: format!("hangar-{}", sb.layout.id),
            accel: boot.accel,
            vcpus: boot.vcpus,
            memory_mib: boot.memory_mib,
            kernel: boot.kernel.clone(),
            initrd: vm.join("initrd"),
            cmdline: boot.cmdline.clone(),
            ram: vm.join("ram"),
            disks: vec![
                (VOLUME_SERIAL.into(), sb.layout.volume_image(), false),
                (IMAGE_SERIAL.into(), boot.image_disk.clone(), true),
            ],
            ports: vec![(LINK_PORT.into(), vm.join("link.sock"))],
            qmp: vm.join("qmp.sock"),
            pidfile: vm.join("qemu.pid"),
            console: sb.layout.console_log(),
            limits: Some(cgroup::Limits {
                cpus: sb.resources.cpus,
                // Guest RAM plus QEMU's own: device emulation, and under TCG its translation
                // cache (256 MiB at most, see qemu.rs).
                memory_bytes: (boot.memory_mib
                    + match boot.accel {
                        Accel::Kvm => 128,
                        Accel::Tcg => 384,
                    })
                    * 1024
                    * 1024,
            }),
        }
    }

    fn boot_file(sb: &SandboxSpec) -> PathBuf {
        Self::vm_dir(sb).join("boot.json")
    }

    /// What the VM was booted with; `None` before its first boot.
    fn booted(&self, sb: &SandboxSpec) -> Option<Boot> {
        serde_json::from_slice(&std::fs::read(Self::boot_file(sb)).ok()?).ok()
    }

    /// A spec for stopping whatever runs, even if the boot record is gone.
    fn any_spec(&self, sb: &SandboxSpec) -> VmSpec {
        let boot = self.booted(sb).unwrap_or(Boot {
            accel: self.cfg.accel,
            cmdline: String::new(),
            vcpus: 1,
            memory_mib: sb.resources.memory_mib,
            kernel: PathBuf::new(),
            image_disk: PathBuf::new(),
        });
        self.spec(sb, &boot)
    }

    fn cold_start(&self, sb: &SandboxSpec) -> Result<(), DriverError> {
        let vm = Self::vm_dir(sb);
        std::fs::create_dir_all(&vm).map_err(|e| at(&vm, e))?;
        let (kernel, initramfs) = self.assets(&sb.init_dir.join("hangar-init"))?;
        let image_disk = self.image_disk(sb.image)?;
        let boot = Boot {
            accel: self.cfg.accel,
            cmdline: cmdline(self.cfg.accel, "vm"),
            vcpus: (sb.resources.cpus.ceil() as u32).max(1),
            memory_mib: sb.resources.memory_mib,
            kernel: kernel.vmlinuz.clone(),
            image_disk,
        };
        // This boot's initramfs: Hangar's, with init.json appended as a second archive (the
        // kernel unpacks both). Never on the command line, which the agent can read.
        let config = serde_json::to_vec(sb.init).expect("init config serialises");
        let extra = initramfs::config_archive(&[(CONFIG_IN_INITRD, &config, 0o600)]);
        let initrd = vm.join("initrd");
        write_private_copy(&initramfs, &extra, &initrd).map_err(|e| at(&initrd, e))?;
        // A cold start begins with fresh memory.
        let _ = std::fs::remove_file(vm.join("ram"));
        let _ = std::fs::remove_dir_all(sb.layout.checkpoint());
        std::fs::write(
            Self::boot_file(sb),
            serde_json::to_vec(&boot).expect("boot record serialises"),
        )
        .map_err(|e| at(&Self::boot_file(sb), e))?;
        let spec = self.spec(sb, &boot);
        self.vmm
            .launch(&spec)
            .map_err(|e| DriverError::Other(boot_failure(&e, &spec.console)))?;
        self.start_bridge(sb, &spec, BOOT_LINK_TIMEOUT);
        Ok(())
    }

    fn start_bridge(&self, sb: &SandboxSpec, spec: &VmSpec, timeout: Duration) {
        let vmm = self.vmm.clone();
        let probe_spec = spec.clone();
        let bridge = Bridge::start(
            &tokio::runtime::Handle::current(),
            BridgePaths {
                port: spec.ports[0].1.clone(),
                control: sb.layout.control_socket(),
                agent: sb.layout.agent_socket(),
                egress: sb.layout.egress_socket(),
            },
            timeout,
            Arc::new(move || vmm.pid(&probe_spec).is_some()),
        );
        self.bridges
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(sb.layout.id.clone(), bridge);
    }

    /// Sets the restored guest's clock, which stood still while it was suspended.
    fn sync_clock(&self, sb: &SandboxSpec) {
        let sock = sb.layout.control_socket();
        wait_for_file(&sock, Duration::from_secs(10));
        let link = InitLink::new(sock, sb.init.secret.clone());
        if let Err(e) =
            tokio::runtime::Handle::current().block_on(link.set_clock(std::time::SystemTime::now()))
        {
            tracing::warn!(sandbox = %sb.layout.id, error = %e, "cannot set the restored guest's clock");
        }
    }

    fn stop_bridge(&self, sb: &SandboxSpec) {
        let bridge = self
            .bridges
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&sb.layout.id);
        drop(bridge);
    }

    fn restore(&self, sb: &SandboxSpec, boot: &Boot) -> Result<(), DriverError> {
        let spec = self.spec(sb, boot);
        let state = sb.layout.checkpoint().join("state");
        self.vmm
            .restore(&spec, &state)
            .map_err(|e| DriverError::Other(crate::error_chain(&e)))?;
        self.start_bridge(sb, &spec, Duration::from_secs(10));
        Ok(())
    }
}

/// The guest kernel's command line. `HANGAR_GUEST` is not a kernel parameter, so the kernel
/// hands it to `/init`'s environment.
///
/// Under TCG the kernel calibrates its TSC against the PIT, which fails when the host is busy
/// ("Unable to calibrate against PIT"); the guest then waits for a timer tick that never
/// comes and hangs at boot. The guest's TSC is the host's (TCG reads the host counter), so
/// its frequency is measured on the host and handed over (`tsc_early_khz`), and the clocksource
/// watchdog, which has no reference clock on `microvm`, is told to trust it.
pub fn cmdline(accel: Accel, guest: &str) -> String {
    let mut c = String::from("console=ttyS0 quiet panic=-1 random.trust_cpu=on");
    if accel == Accel::Tcg {
        if let Some(khz) = host_tsc_khz() {
            c.push_str(&format!(" tsc_early_khz={khz} tsc=reliable"));
        }
    }
    c.push_str(&format!(" HANGAR_GUEST={guest}"));
    c
}

/// The host's TSC frequency in kHz, measured once against the monotonic clock (rounded to
/// 1 MHz so that the command line does not vary between measurements).
fn host_tsc_khz() -> Option<u64> {
    static KHZ: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *KHZ.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            let mut samples: Vec<u64> = (0..3)
                .map(|_| {
                    let t0 = std::time::Instant::now();
                    // SAFETY: RDTSC has no preconditions on x86_64.
                    let c0 = unsafe { core::arch::x86_64::_rdtsc() };
                    std::thread::sleep(Duration::from_millis(20));
                    // SAFETY: as above.
                    let c1 = unsafe { core::arch::x86_64::_rdtsc() };
                    let ns = t0.elapsed().as_nanos() as u64;
                    c1.wrapping_sub(c0).saturating_mul(1_000_000) / ns.max(1)
                })
                .collect();
            samples.sort_unstable();
            Some((samples[1] + 500) / 1000 * 1000).filter(|&k| k > 0)
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            None
        }
    })
}

/// Waits until `path` exists; false after `limit`.
fn wait_for_file(path: &Path, limit: Duration) -> bool {
    let deadline = std::time::Instant::now() + limit;
    while !path.exists() {
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    true
}

/// An I/O error on `path`, naming it.
fn at(path: &Path, e: std::io::Error) -> DriverError {
    DriverError::Other(format!("{}: {e}", path.display()))
}

/// This boot of the host (`/proc/sys/kernel/random/boot_id`).
fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// Whether `dir` holds a snapshot that may be restored: complete, and either taken on this
/// boot of the host or known to be on disk.
fn restorable(dir: &Path) -> bool {
    match std::fs::read_to_string(dir.join(COMPLETE)) {
        Ok(boot) => dir.join(DURABLE).exists() || (!boot.is_empty() && boot == boot_id()),
        Err(_) => false,
    }
}

/// Flushes a snapshot's files to disk off the suspend's path, then marks it durable.
fn make_durable(files: Vec<PathBuf>, dir: PathBuf) {
    let flush = move || {
        for f in &files {
            std::fs::File::open(f)?.sync_all()?;
        }
        std::fs::write(dir.join(DURABLE), b"")?;
        std::fs::File::open(&dir)?.sync_all()
    };
    let _ = std::thread::Builder::new()
        .name("vm-durable".into())
        .spawn(move || {
            if let Err(e) = flush() {
                tracing::debug!(error = %e, "a snapshot was not flushed (resumed or deleted first?)");
            }
        });
}

/// A VMM that would not start, with what the guest printed (it may have got that far).
fn boot_failure(e: &qemu::VmmError, console: &Path) -> String {
    let tail = crate::driver::log_tail(console, 15);
    if tail.is_empty() {
        format!("the VM did not start: {}", crate::error_chain(e))
    } else {
        format!(
            "the VM did not start: {}; serial console:\n{tail}",
            crate::error_chain(e)
        )
    }
}

/// Writes `base` followed by `extra` to `dest`, readable by the owner only.
fn write_private_copy(base: &Path, extra: &[u8], dest: &Path) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(dest);
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dest)?;
    std::io::copy(&mut std::fs::File::open(base)?, &mut out)?;
    out.write_all(extra)
}

impl Driver for VmDriver {
    fn kind(&self) -> DriverKind {
        DriverKind::Vm
    }

    fn start(&self, sb: &SandboxSpec) -> Result<(), DriverError> {
        self.cold_start(sb)
    }

    fn suspend(&self, sb: &SandboxSpec, link: &InitLink) -> Result<Suspended, DriverError> {
        let t0 = std::time::Instant::now();
        let boot = self
            .booted(sb)
            .ok_or_else(|| DriverError::Other("the VM has no boot record".into()))?;
        let spec = self.spec(sb, &boot);
        // The guest flushes its files to the volume. A guest that does not answer is
        // snapshotted all the same: its memory and device state are complete without the
        // flush, and only a later cold start on the files would miss what it had not written.
        let note = match tokio::runtime::Handle::current().block_on(link.suspend()) {
            Ok(()) => None,
            Err(e) => {
                tracing::warn!(sandbox = %sb.layout.id, error = %e, "the guest did not sync before its snapshot");
                Some(format!(
                    "the guest did not sync its files first ({e}); its memory holds what it had not written"
                ))
            }
        };
        let synced = t0.elapsed();
        self.stop_bridge(sb);
        let dir = sb.layout.checkpoint();
        let saved = (|| {
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir)
                .map_err(|e| DriverError::Other(format!("creating {}: {e}", dir.display())))?;
            self.vmm.snapshot(&spec, &dir.join("state")).map_err(|e| {
                DriverError::Checkpoint(crate::cmd::CmdError::Failed {
                    program: self.vmm.name().into(),
                    status: "snapshot failed".into(),
                    stderr: crate::error_chain(&e),
                })
            })?;
            // Valid at once on this boot of the host (the page cache holds it); valid after a
            // host crash only once it is on disk, which a thread sees to (`DURABLE`).
            std::fs::write(dir.join(COMPLETE), boot_id())
                .map_err(|e| DriverError::Other(format!("writing {}: {e}", dir.display())))
        })();
        if let Err(e) = saved {
            let _ = std::fs::remove_dir_all(&dir);
            if self.vmm.pid(&spec).is_some() {
                // Still running (the snapshot was refused): it stays as it was, reachable.
                self.start_bridge(sb, &spec, Duration::from_secs(10));
            }
            return Err(e);
        }
        make_durable(
            vec![
                Self::vm_dir(sb).join("ram"),
                dir.join("state"),
                sb.layout.volume_image(),
            ],
            dir.clone(),
        );
        tracing::debug!(sandbox = %sb.layout.id, ?synced, total = ?t0.elapsed(), "vm suspend");
        Ok(Suspended {
            mode: CheckpointMode::Memory,
            note,
        })
    }

    fn resume(&self, sb: &SandboxSpec) -> Result<Resumed, DriverError> {
        let dir = sb.layout.checkpoint();
        let boot = self.booted(sb);
        let ram = Self::vm_dir(sb).join("ram");
        let (Some(boot), true, true) = (boot, restorable(&dir), ram.exists()) else {
            self.cold_start(sb)?;
            return Ok(Resumed::Filesystem { note: None });
        };
        // Used at most once: a snapshot restored and then run on must never be restored again
        // (its RAM file has moved on), whatever happens from here.
        std::fs::remove_file(dir.join(COMPLETE))
            .map_err(|e| DriverError::Other(format!("consuming the snapshot: {e}")))?;
        let t0 = std::time::Instant::now();
        match self.restore(sb, &boot) {
            Ok(()) => {
                tracing::debug!(sandbox = %sb.layout.id, took = ?t0.elapsed(), "vm restored");
                let _ = std::fs::remove_dir_all(&dir);
                self.sync_clock(sb);
                Ok(Resumed::Memory)
            }
            Err(e) => {
                let note = format!(
                    "the memory snapshot could not be restored ({e}); restarted on its files"
                );
                tracing::warn!(sandbox = %sb.layout.id, error = %e, "restore failed; booting afresh on the files");
                self.stop_bridge(sb);
                self.vmm.kill(&self.spec(sb, &boot));
                let kept = sb.layout.dir.join("checkpoint.failed");
                let _ = std::fs::remove_dir_all(&kept);
                let _ = std::fs::rename(&dir, &kept);
                self.cold_start(sb)?;
                Ok(Resumed::Filesystem { note: Some(note) })
            }
        }
    }

    fn destroy(&self, sb: &SandboxSpec) -> Result<(), DriverError> {
        self.stop_bridge(sb);
        self.vmm.kill(&self.any_spec(sb));
        Ok(())
    }

    fn check_resources(&self, r: &hangar_proto::sandbox::Resources) -> Result<(), String> {
        if r.memory_mib < MIN_MEMORY_MIB {
            return Err(format!(
                "the vm driver needs memory_mib >= {MIN_MEMORY_MIB} (the guest kernel and its initramfs live in it), not {}",
                r.memory_mib
            ));
        }
        let host = std::thread::available_parallelism().map_or(1, |n| n.get());
        let vcpus = r.cpus.ceil() as usize;
        if vcpus > host {
            return Err(format!(
                "cpus {} would give the VM {vcpus} vCPUs, more than this host's {host}",
                r.cpus
            ));
        }
        Ok(())
    }

    fn kept_files(&self, sb: &SandboxSpec) -> Vec<PathBuf> {
        vec![Self::vm_dir(sb).join("ram")]
    }

    fn alive(&self, sb: &SandboxSpec) -> bool {
        self.vmm.pid(&self.any_spec(sb)).is_some()
    }

    fn recover(&self, sb: &SandboxSpec) -> Result<Recovered, DriverError> {
        if let Some(boot) = self.booted(sb) {
            let spec = self.spec(sb, &boot);
            if self.vmm.pid(&spec).is_some() {
                self.start_bridge(sb, &spec, Duration::from_secs(10));
                // The bridge binds control.sock once the guest answers on the link.
                if wait_for_file(&sb.layout.control_socket(), Duration::from_secs(10)) {
                    return Ok(Recovered::Adopted);
                }
                tracing::warn!(sandbox = %sb.layout.id, "the running VM does not answer; restarting it");
            }
        }
        self.destroy(sb)?;
        Ok(Recovered::Stopped)
    }
}
