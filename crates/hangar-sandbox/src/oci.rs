//! The OCI runtime bundle shared by the `container` and `gvisor` drivers: `hangar-init` as
//! PID 1, the overlay root, `/run/hangar` and `/.hangar` bind mounts, namespaces and limits.
//!
//! Nothing else from the host is mounted into a sandbox: adding a mount here widens what
//! untrusted code can see, so each one must be named in DESIGN.md.

use std::collections::HashSet;
use std::path::PathBuf;

use oci_spec::runtime::{
    Arch, Capability, LinuxBuilder, LinuxCapabilitiesBuilder, LinuxCpuBuilder, LinuxDeviceCgroup,
    LinuxDeviceCgroupBuilder, LinuxDeviceType, LinuxMemoryBuilder, LinuxNamespaceType,
    LinuxPidsBuilder, LinuxResourcesBuilder, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompBuilder,
    LinuxSyscallBuilder, Mount, MountBuilder, PosixRlimitBuilder, PosixRlimitType, ProcessBuilder,
    RootBuilder, Spec, UserBuilder,
};

use crate::driver::{DriverError, SandboxSpec};

/// Which runtime reads the bundle; they differ in what they support.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    Crun,
    Runsc,
}

/// Memory for gVisor's own processes (sentry and gofer), on top of the sandbox's limit.
pub const GVISOR_OVERHEAD_MIB: u64 = 96;

/// The capabilities of a process in the sandbox: Docker's default set without MKNOD (with
/// the device cgroup below, a device node is useless anyway; without it, one is the host). `hangar-init` needs
/// SETUID/SETGID to run the agent as the image's user and the file ones to serve the files API.
const CAPS: &[Capability] = &[
    Capability::Chown,
    Capability::DacOverride,
    Capability::Fsetid,
    Capability::Fowner,
    Capability::NetRaw,
    Capability::Setgid,
    Capability::Setuid,
    Capability::Setfcap,
    Capability::Setpcap,
    Capability::NetBindService,
    Capability::SysChroot,
    Capability::Kill,
    Capability::AuditWrite,
];

pub fn write_bundle(sb: &SandboxSpec, flavor: Flavor) -> Result<(), DriverError> {
    let spec = build_spec(sb, flavor)
        .map_err(|e| DriverError::Other(format!("building the OCI spec: {e}")))?;
    let dir = sb.layout.bundle();
    std::fs::create_dir_all(&dir).map_err(DriverError::Bundle)?;
    let tmp = dir.join("config.json.tmp");
    std::fs::write(
        &tmp,
        serde_json::to_vec_pretty(&spec).expect("spec serialises"),
    )
    .map_err(DriverError::Bundle)?;
    std::fs::rename(&tmp, dir.join("config.json")).map_err(DriverError::Bundle)?;
    Ok(())
}

fn build_spec(sb: &SandboxSpec, flavor: Flavor) -> Result<Spec, oci_spec::OciSpecError> {
    let caps: HashSet<Capability> = CAPS.iter().copied().collect();
    let capabilities = LinuxCapabilitiesBuilder::default()
        .bounding(caps.clone())
        .effective(caps.clone())
        .permitted(caps)
        .build()?;
    let process = ProcessBuilder::default()
        .terminal(false)
        .user(UserBuilder::default().uid(0u32).gid(0u32).build()?)
        .args(vec![format!(
            "{}/hangar-init",
            hangar_proto::init::INIT_DIR_IN_SANDBOX
        )])
        .env(vec![
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
        ])
        .cwd("/")
        .no_new_privileges(true)
        .capabilities(capabilities)
        // The open-files limit is inherited from `hangar serve`, whose limit the operator sets.
        // gVisor enforces RLIMIT_NPROC at fork, root included (no CAP_SYS_RESOURCE here): it is
        // the sandbox's pids limit there, since the host's pids cgroup only sees the sentry.
        .rlimits(match flavor {
            Flavor::Crun => Vec::new(),
            Flavor::Runsc => vec![PosixRlimitBuilder::default()
                .typ(PosixRlimitType::RlimitNproc)
                .hard(sb.resources.pids)
                .soft(sb.resources.pids)
                .build()?],
        })
        .build()?;

    let mut mounts: Vec<Mount> = oci_spec::runtime::get_default_mounts();
    if flavor == Flavor::Runsc {
        // gVisor provides its own /sys and cgroup view; the default cgroup mount is not
        // something it accepts from a bundle.
        mounts.retain(|m| m.destination() != &PathBuf::from("/sys/fs/cgroup"));
    }
    mounts.push(bind(
        sb.layout.run_dir(),
        hangar_proto::init::RUN_DIR_IN_SANDBOX,
        false,
    )?);
    mounts.push(bind(
        sb.init_dir.to_path_buf(),
        hangar_proto::init::INIT_DIR_IN_SANDBOX,
        true,
    )?);

    let r = sb.resources;
    // Under gVisor the cgroup holds the sentry and the gofer as well as the sandbox's
    // processes, and under the ptrace platform each guest process costs about eight host
    // threads (measured: 100 processes, 814 pids) and the sentry adds threads of its own under
    // load; the guest's own limits are
    // enforced inside by hangar-init's guard, the cgroup only bounds the whole.
    let (memory_mib, pids) = match flavor {
        Flavor::Crun => (r.memory_mib, r.pids),
        Flavor::Runsc => (r.memory_mib + GVISOR_OVERHEAD_MIB, r.pids * 16 + 1024),
    };
    let memory = (memory_mib * 1024 * 1024) as i64;
    let period = 100_000u64;
    let resources = LinuxResourcesBuilder::default()
        .devices(device_rules()?)
        .memory(
            LinuxMemoryBuilder::default()
                .limit(memory)
                .swap(memory)
                .build()?,
        )
        .cpu(
            LinuxCpuBuilder::default()
                .period(period)
                .quota((r.cpus * period as f64) as i64)
                .build()?,
        )
        .pids(LinuxPidsBuilder::default().limit(pids as i64).build()?)
        .build()?;
    let namespaces = oci_spec::runtime::get_default_namespaces()
        .into_iter()
        // cgroup v1 hosts (this one) and gVisor both do without a cgroup namespace.
        .filter(|n| n.typ() != LinuxNamespaceType::Cgroup)
        .collect::<Vec<_>>();
    let mut linux = LinuxBuilder::default()
        .namespaces(namespaces)
        .resources(resources)
        .masked_paths(oci_spec::runtime::get_default_maskedpaths())
        .readonly_paths(oci_spec::runtime::get_default_readonly_paths());
    if flavor == Flavor::Crun {
        linux = linux
            .seccomp(seccomp()?)
            .cgroups_path(PathBuf::from(format!("/hangar/{}", sb.layout.id)));
    }
    let mut spec = Spec::default();
    spec.set_hostname(Some("sandbox".into()))
        .set_process(Some(process))
        .set_root(Some(
            RootBuilder::default()
                .path(sb.layout.rootfs())
                .readonly(false)
                .build()?,
        ))
        .set_mounts(Some(mounts))
        .set_linux(Some(linux.build()?));
    Ok(spec)
}

/// The device cgroup: nothing but the character devices every program expects. Without the
/// deny-all rule first, a cgroup v1 device controller inherits "allow everything" and root in
/// the sandbox could open the host's disks.
fn device_rules() -> Result<Vec<LinuxDeviceCgroup>, oci_spec::OciSpecError> {
    let mut rules = vec![LinuxDeviceCgroupBuilder::default()
        .allow(false)
        .access("rwm")
        .build()?];
    // (major, minor): null, zero, full, random, urandom, tty, ptmx, and every pty slave.
    for (major, minor) in [
        (1, Some(3)),
        (1, Some(5)),
        (1, Some(7)),
        (1, Some(8)),
        (1, Some(9)),
        (5, Some(0)),
        (5, Some(2)),
        (136, None),
    ] {
        let mut b = LinuxDeviceCgroupBuilder::default()
            .allow(true)
            .typ(LinuxDeviceType::C)
            .major(major)
            .access("rwm");
        if let Some(m) = minor {
            b = b.minor(m);
        }
        rules.push(b.build()?);
    }
    Ok(rules)
}

/// System calls a sandboxed process never needs and that widen the kernel surface it can reach
/// (new namespaces, mounts, keyrings, BPF, kernel modules, clocks, …): refused with EPERM.
/// gVisor implements its own system calls and needs none of this.
const DENIED_SYSCALLS: &[&str] = &[
    "acct",
    "add_key",
    "bpf",
    "clock_adjtime",
    "clock_settime",
    "delete_module",
    "fanotify_init",
    "finit_module",
    "fsconfig",
    "fsmount",
    "fsopen",
    "fspick",
    "init_module",
    "iopl",
    "ioperm",
    "kexec_file_load",
    "kexec_load",
    "keyctl",
    "lookup_dcookie",
    "mount",
    "mount_setattr",
    "move_mount",
    "name_to_handle_at",
    "open_by_handle_at",
    "open_tree",
    "perf_event_open",
    "pivot_root",
    "quotactl",
    "reboot",
    "request_key",
    "setns",
    "settimeofday",
    "adjtimex",
    "swapoff",
    "swapon",
    "syslog",
    "umount2",
    "unshare",
    "uselib",
    "userfaultfd",
    "vhangup",
];

fn seccomp() -> Result<LinuxSeccomp, oci_spec::OciSpecError> {
    let denied = LinuxSyscallBuilder::default()
        .names(
            DENIED_SYSCALLS
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>(),
        )
        .action(LinuxSeccompAction::ScmpActErrno)
        .errno_ret(libc::EPERM as u32)
        .build()?;
    LinuxSeccompBuilder::default()
        .default_action(LinuxSeccompAction::ScmpActAllow)
        // Every ABI of the machine, or a 32-bit entry point would skip the rules.
        .architectures(vec![
            Arch::ScmpArchX86_64,
            Arch::ScmpArchX86,
            Arch::ScmpArchX32,
        ])
        .syscalls(vec![denied])
        .build()
}

fn bind(source: PathBuf, dest: &str, readonly: bool) -> Result<Mount, oci_spec::OciSpecError> {
    let mut options = vec![
        "rbind".to_string(),
        "nosuid".to_string(),
        "nodev".to_string(),
    ];
    options.push(if readonly { "ro" } else { "rw" }.to_string());
    MountBuilder::default()
        .destination(dest)
        .typ("bind")
        .source(source)
        .options(options)
        .build()
}
