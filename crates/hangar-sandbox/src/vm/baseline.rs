//! The raw VMM underneath the `vm` driver, timed for `hangar bench sandbox --driver vm`: a boot
//! to `/init` (modules loaded) and a restore of a parked VM, on the same kernel, initramfs and
//! accelerator as the driver's VMs, with nothing of Hangar in between.

use std::path::Path;
use std::time::{Duration, Instant};

use hangar_proto::init::vm::PROBE_OK;

use super::initramfs::{self, Kernel};
use super::qemu::{Accel, Qemu, VmSpec, Vmm};

/// One boot and one restore.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// From starting QEMU to the guest's `/init` saying it runs.
    pub boot: Duration,
    /// From starting a QEMU on the snapshot to the guest running again.
    pub restore: Duration,
}

/// Times one raw boot and restore in `work` (a directory of its own, removed by the caller).
pub fn sample(
    data_dir: &Path,
    kernel: Option<&Path>,
    init_binary: &Path,
    accel: Accel,
    memory_mib: u64,
    work: &Path,
) -> Result<Sample, String> {
    let qemu = Qemu::find().ok_or("qemu-system-x86_64 not found")?;
    let kernel = Kernel::locate(kernel, data_dir).map_err(|e| crate::error_chain(&e))?;
    let initrd = initramfs::build(init_binary, &kernel, &data_dir.join("vm"))
        .map_err(|e| crate::error_chain(&e))?;
    let spec = VmSpec {
        name: format!("hangar-baseline-{}", std::process::id()),
        accel,
        vcpus: 1,
        memory_mib,
        kernel: kernel.vmlinuz.clone(),
        initrd,
        cmdline: super::cmdline(accel, "park"),
        ram: work.join("ram"),
        disks: vec![],
        ports: vec![],
        qmp: work.join("qmp.sock"),
        pidfile: work.join("qemu.pid"),
        console: work.join("console.log"),
        limits: None,
    };
    let _ = std::fs::remove_file(&spec.ram);
    let _ = std::fs::remove_file(&spec.console);
    let result = (|| {
        let t = Instant::now();
        qemu.launch(&spec).map_err(|e| crate::error_chain(&e))?;
        loop {
            if std::fs::read_to_string(&spec.console)
                .unwrap_or_default()
                .contains(PROBE_OK)
            {
                break;
            }
            if qemu.pid(&spec).is_none() || t.elapsed() > Duration::from_secs(60) {
                return Err(format!(
                    "the raw VM did not reach /init: {}",
                    crate::driver::log_tail(&spec.console, 5)
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let boot = t.elapsed();
        let state = work.join("state");
        qemu.snapshot(&spec, &state)
            .map_err(|e| crate::error_chain(&e))?;
        let t = Instant::now();
        qemu.restore(&spec, &state)
            .map_err(|e| crate::error_chain(&e))?;
        let restore = t.elapsed();
        Ok(Sample { boot, restore })
    })();
    qemu.kill(&spec);
    result
}
