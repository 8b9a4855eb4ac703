//! What this host can run, and why not: the facts behind `hangar doctor` and behind what
//! `auto` resolves to.

use std::path::Path;
use std::process::Command;

use hangar_proto::sandbox::DriverKind;
use serde::Serialize;

use crate::cmd;
use crate::vm::probe::VmProbe;
use crate::vm::qemu::Accel;

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    pub detail: String,
    /// What to do when the check fails.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DriverProbe {
    pub driver: DriverKind,
    pub available: bool,
    /// Why not, or a note on what it gives.
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct HostProbe {
    pub checks: Vec<Check>,
    pub drivers: Vec<DriverProbe>,
    /// What `auto` resolves to, if any driver works.
    pub auto: Option<DriverKind>,
}

impl HostProbe {
    pub fn available(&self, kind: DriverKind) -> Result<(), String> {
        match self.drivers.iter().find(|d| d.driver == kind) {
            Some(d) if d.available => Ok(()),
            Some(d) => Err(format!(
                "driver {kind} is not available on this host: {}",
                d.detail
            )),
            None => Err(format!("driver {kind} is not available on this host")),
        }
    }
}

fn check(name: &str, ok: bool, detail: impl Into<String>, fix: &str) -> Check {
    Check {
        name: name.into(),
        ok,
        detail: detail.into(),
        fix: (!ok).then(|| fix.to_string()),
    }
}

fn version(program: &str, arg: &str) -> Option<String> {
    let out = cmd::run(Command::new(program).arg(arg)).ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .map(str::to_owned)
}

/// Probes the host; `vm` is what the `vm` driver's own probe found (see `vm::probe`).
pub fn probe_host(vm: &VmProbe) -> HostProbe {
    let root = nix::unistd::geteuid().is_root();
    let filesystems = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
    let overlay = filesystems.lines().any(|l| l.ends_with("\toverlay"));
    let mkfs = cmd::which("mkfs.ext4").is_some();
    let loopdev = Path::new("/dev/loop-control").exists();
    let v1 = |c: &str| Path::new("/sys/fs/cgroup").join(c).join("tasks").exists();
    let v2 = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
    let cgroups = v2 || (v1("memory") && v1("pids") && v1("cpu"));
    let runsc = version("runsc", "--version");
    let crun = version("crun", "--version");
    let nft = cmd::which("nft").is_some();

    let checks = vec![
        check(
            "root",
            root,
            if root { "running as root" } else { "not root" },
            "run `hangar serve` as root: sandboxes need mounts, namespaces and cgroups",
        ),
        check(
            "overlayfs",
            overlay,
            if overlay {
                "supported"
            } else {
                "missing from /proc/filesystems"
            },
            "load the overlay module (`modprobe overlay`)",
        ),
        check(
            "mkfs.ext4",
            mkfs,
            if mkfs { "found" } else { "not found" },
            "apt-get install e2fsprogs",
        ),
        check(
            "loop devices",
            loopdev,
            if loopdev {
                "/dev/loop-control present"
            } else {
                "/dev/loop-control missing"
            },
            "load the loop module (`modprobe loop`)",
        ),
        check(
            "cgroups",
            cgroups,
            if v2 {
                "cgroup v2"
            } else if cgroups {
                "cgroup v1 (memory, cpu, pids)"
            } else {
                "memory/cpu/pids controllers not mounted"
            },
            "mount the cgroup controllers (cgroup v2, or v1 memory, cpu and pids)",
        ),
        check(
            "runsc",
            runsc.is_some(),
            runsc.clone().unwrap_or_else(|| "not found".into()),
            "apt-get install runsc",
        ),
        check(
            "crun",
            crun.is_some(),
            crun.clone().unwrap_or_else(|| "not found".into()),
            "apt-get install crun",
        ),
        check(
            "qemu",
            vm.available,
            vm.detail.clone(),
            vm.fix.as_deref().unwrap_or(""),
        ),
        check(
            "kvm",
            vm.accel == Accel::Kvm,
            format!("{}{}", vm.kvm, if vm.cached { " (cached probe result)" } else { "" }),
            "the vm driver runs on TCG here (slow); on a host with hardware virtualisation (VT-x/AMD-V, or nested virtualisation enabled) it runs on KVM",
        ),
        check(
            "nftables",
            nft,
            if nft { "nft found" } else { "nft not found" },
            "apt-get install nftables (not needed yet: sandboxes have no network route at all)",
        ),
    ];
    let base = root && overlay && mkfs && loopdev;
    let base_why = || {
        checks
            .iter()
            .filter(|c| {
                !c.ok
                    && ["root", "overlayfs", "mkfs.ext4", "loop devices"].contains(&c.name.as_str())
            })
            .map(|c| format!("{}: {}", c.name, c.detail))
            .collect::<Vec<_>>()
            .join("; ")
    };
    let gvisor_ok = base && runsc.is_some();
    let vm_ok = root && mkfs && vm.available;
    let container_ok = base && crun.is_some() && cgroups;
    let drivers = vec![
        DriverProbe {
            driver: DriverKind::Vm,
            available: vm_ok,
            detail: if vm_ok {
                format!("{}; suspend keeps memory and files", vm.detail)
            } else if !vm.available {
                vm.detail.clone()
            } else {
                base_why()
            },
        },
        DriverProbe {
            driver: DriverKind::Gvisor,
            available: gvisor_ok,
            detail: if gvisor_ok {
                "gVisor user-space kernel; suspend keeps memory and files".into()
            } else if runsc.is_none() {
                "runsc not found (apt-get install runsc)".into()
            } else {
                base_why()
            },
        },
        DriverProbe {
            driver: DriverKind::Container,
            available: container_ok,
            detail: if container_ok {
                "namespaces and cgroups only: the weakest isolation; suspend keeps files, not processes".into()
            } else if crun.is_none() {
                "crun not found (apt-get install crun)".into()
            } else if !cgroups {
                "cgroup controllers missing".into()
            } else {
                base_why()
            },
        },
    ];
    // A VM is the strongest isolation, but under TCG each boot costs seconds: only with KVM
    // is it the default.
    let auto = if vm_ok && vm.accel == Accel::Kvm {
        Some(DriverKind::Vm)
    } else if gvisor_ok {
        Some(DriverKind::Gvisor)
    } else if container_ok {
        Some(DriverKind::Container)
    } else if vm_ok {
        Some(DriverKind::Vm)
    } else {
        None
    };
    HostProbe {
        checks,
        drivers,
        auto,
    }
}
