//! Whether this host can run the `vm` driver, and on which accelerator.
//!
//! `/dev/kvm` existing is not enough: nested or paravirtualised KVM (PVM) may accept a VM
//! and then crawl or die on the first unusual instruction. So KVM counts only when a probe
//! VM — the real kernel and initramfs, `HANGAR_GUEST=probe` — boots to `/init` and powers
//! off within [`PROBE_LIMIT`]. Else the driver runs on TCG: correct, many times slower. The
//! probe's result is cached host-wide, keyed by everything it depends on.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hangar_proto::init::vm::PROBE_OK;
use serde::{Deserialize, Serialize};

use super::initramfs::{self, Kernel};
use super::qemu::{Accel, Qemu, VmSpec, Vmm};

/// How long a probe boot on KVM may take (a KVM boot to `/init` takes well under a second).
const PROBE_LIMIT: Duration = Duration::from_secs(6);

/// What was found.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmProbe {
    /// The driver can run (QEMU, a kernel and mkfs.erofs are there).
    pub available: bool,
    /// Why not, or what it runs on.
    pub detail: String,
    /// What to do when it is not available.
    pub fix: Option<String>,
    /// KVM when the probe boot succeeded, TCG otherwise.
    pub accel: Accel,
    /// What the KVM probe found (or why it was not tried).
    pub kvm: String,
    /// Whether `kvm` came from the cache.
    #[serde(default)]
    pub cached: bool,
}

/// What the probe needs.
pub struct ProbeInput<'a> {
    pub data_dir: &'a Path,
    pub kernel: Option<&'a Path>,
    pub init_binary: &'a Path,
    /// Forces an accelerator instead of probing (`--vm-accel`).
    pub force: Option<Accel>,
    /// Where the result is cached.
    pub cache: PathBuf,
}

pub fn probe(input: &ProbeInput) -> VmProbe {
    let unavailable = |detail: String, fix: &str| VmProbe {
        available: false,
        detail,
        fix: Some(fix.into()),
        accel: Accel::Tcg,
        kvm: "not tried".into(),
        cached: false,
    };
    let Some(qemu) = Qemu::find() else {
        return unavailable(
            "qemu-system-x86_64 not found".into(),
            "apt-get install qemu-system-x86",
        );
    };
    if crate::cmd::which("mkfs.erofs").is_none() {
        return unavailable("mkfs.erofs not found".into(), "apt-get install erofs-utils");
    }
    let kernel = match Kernel::locate(input.kernel, input.data_dir) {
        Ok(k) => k,
        Err(e) => return unavailable(
            crate::error_chain(&e),
            "run scripts/install-host-deps.sh (it fetches the guest kernel), or pass --vm-kernel",
        ),
    };
    let version = qemu.version().unwrap_or_else(|| "unknown".into());
    let (accel, kvm, cached) = match input.force {
        Some(a) => (a, format!("{} forced by configuration", a.as_str()), false),
        None => kvm_probe(&qemu, &version, &kernel, input),
    };
    VmProbe {
        available: true,
        detail: format!(
            "QEMU microvm on {} ({version}; kernel {})",
            match accel {
                Accel::Kvm => "KVM",
                Accel::Tcg => "TCG, no hardware virtualisation: correct but slow",
            },
            kernel.release,
        ),
        fix: None,
        accel,
        kvm,
        cached,
    }
}

#[derive(Serialize, Deserialize)]
struct Cached {
    key: String,
    ok: bool,
    detail: String,
}

/// Probes KVM, or answers from the cache.
fn kvm_probe(
    qemu: &Qemu,
    version: &str,
    kernel: &Kernel,
    input: &ProbeInput,
) -> (Accel, String, bool) {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        return (Accel::Tcg, format!("/dev/kvm cannot be opened: {e}"), false);
    }
    let key = cache_key(version, kernel);
    if let Some(c) = std::fs::read(&input.cache)
        .ok()
        .and_then(|b| serde_json::from_slice::<Cached>(&b).ok())
        .filter(|c| c.key == key)
    {
        return (if c.ok { Accel::Kvm } else { Accel::Tcg }, c.detail, true);
    }
    let (ok, detail) = match boot_probe(qemu, kernel, input) {
        Ok(took) => (true, format!("a probe VM booted on KVM in {took:?}")),
        Err(why) => (false, format!("KVM is present but unusable: {why}")),
    };
    if let Some(dir) = input.cache.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let _ = std::fs::write(
        &input.cache,
        serde_json::to_vec(&Cached {
            key,
            ok,
            detail: detail.clone(),
        })
        .expect("serialises"),
    );
    (if ok { Accel::Kvm } else { Accel::Tcg }, detail, false)
}

fn cache_key(version: &str, kernel: &Kernel) -> String {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(&kernel.vmlinuz)
        .map(|m| format!("{}:{}", m.size(), m.mtime()))
        .unwrap_or_default();
    let host = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    format!(
        "{version}|{}|{meta}|{host}|{}",
        kernel.vmlinuz.display(),
        env!("CARGO_PKG_VERSION")
    )
}

/// Boots a probe VM on KVM; the time it took to power off, or why it did not.
fn boot_probe(qemu: &Qemu, kernel: &Kernel, input: &ProbeInput) -> Result<Duration, String> {
    let initrd = initramfs::build(input.init_binary, kernel, &input.data_dir.join("vm"))
        .map_err(|e| crate::error_chain(&e))?;
    let dir = tempdir_in(&input.data_dir.join("vm"))?;
    let spec = VmSpec {
        name: format!("hangar-probe-{}", std::process::id()),
        accel: Accel::Kvm,
        vcpus: 1,
        memory_mib: 128,
        kernel: kernel.vmlinuz.clone(),
        initrd,
        cmdline: super::cmdline(Accel::Kvm, "probe"),
        ram: dir.join("ram"),
        disks: vec![],
        ports: vec![],
        qmp: dir.join("qmp.sock"),
        pidfile: dir.join("qemu.pid"),
        console: dir.join("console.log"),
        limits: None,
    };
    let t0 = Instant::now();
    let result = (|| {
        qemu.launch(&spec).map_err(|e| match e {
            // QEMU's own words, without the command line.
            super::qemu::VmmError::Launch(crate::cmd::CmdError::Failed { stderr, .. }) => {
                format!(
                    "QEMU failed: {}",
                    stderr.lines().next().unwrap_or("").trim()
                )
            }
            e => crate::error_chain(&e),
        })?;
        loop {
            let console = std::fs::read_to_string(&spec.console).unwrap_or_default();
            if console.contains(PROBE_OK) {
                return Ok(t0.elapsed());
            }
            if qemu.pid(&spec).is_none() {
                let tail = crate::driver::log_tail(&spec.console, 3);
                return Err(format!("the probe VM stopped before /init ran: {tail}"));
            }
            if t0.elapsed() > PROBE_LIMIT {
                return Err(format!(
                    "the probe VM did not reach /init within {PROBE_LIMIT:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    })();
    qemu.kill(&spec);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn tempdir_in(parent: &Path) -> Result<PathBuf, String> {
    let dir = parent.join(format!(".probe-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(dir)
}
