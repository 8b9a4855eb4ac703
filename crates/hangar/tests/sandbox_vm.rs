//! What only the `vm` driver has: a guest that cannot boot says why (the VMM's error, or the
//! tail of the serial console), and leaves nothing behind; `hangar doctor` reports the VMM,
//! the accelerator and the probe.

mod common;

use common::{require_vm, Rootfs, Server};
use serde_json::json;

const KERNEL: &str = "/var/lib/hangar/vm/kernels/current/vmlinuz";

/// Creates a vm sandbox that must fail; returns the error message.
fn failed_create(s: &Server, rootfs: &Rootfs) -> String {
    let r = s.call(
        "POST",
        "/v1/sandboxes",
        Some(&json!({"driver": "vm", "image": rootfs.path(), "resources": {"disk_mib": 32}})),
    );
    assert_eq!(r.status, 500, "{}", r.text());
    let msg = r.json()["error"]["message"].as_str().unwrap().to_owned();
    // Nothing is left: no sandbox, no directory, no VMM.
    assert_eq!(
        s.call("GET", "/v1/sandboxes", None).json()["sandboxes"],
        json!([])
    );
    let dirs: Vec<_> = std::fs::read_dir(s.data.path().join("sandboxes"))
        .unwrap()
        .flatten()
        .collect();
    assert!(dirs.is_empty(), "sandbox directories left: {dirs:?}");
    let ps = std::process::Command::new("ps")
        .args(["-eo", "args"])
        .output()
        .unwrap();
    let ps = String::from_utf8_lossy(&ps.stdout);
    assert!(
        !ps.lines()
            .any(|l| l.contains("qemu-system") && l.contains(&*s.data.path().to_string_lossy())),
        "a QEMU of this server is still running:\n{ps}"
    );
    msg
}

#[test]
fn a_guest_that_cannot_boot_says_why() {
    require_vm();
    let rootfs = Rootfs::busybox();
    let dir = tempfile::tempdir().unwrap();

    // Not a kernel at all: the VMM refuses it, and its reason is the error.
    let garbage = dir.path().join("garbage/vmlinuz");
    std::fs::create_dir_all(garbage.parent().unwrap()).unwrap();
    std::fs::write(&garbage, vec![0x5a; 64 * 1024]).unwrap();
    let s = Server::start_with(&["--vm-kernel", garbage.to_str().unwrap()]);
    let msg = failed_create(&s, &rootfs);
    assert!(
        msg.contains("the VM did not start") && msg.contains("kernel"),
        "{msg}"
    );
    drop(s);

    // A real kernel without its modules: it boots, but the guest finds no virtio disks. The
    // error carries the serial console's tail, where the guest said so.
    let bare = dir.path().join("bare/vmlinuz");
    std::fs::create_dir_all(bare.parent().unwrap()).unwrap();
    std::fs::copy(KERNEL, &bare).unwrap();
    let s = Server::start_with(&["--vm-kernel", bare.to_str().unwrap()]);
    let msg = failed_create(&s, &rootfs);
    assert!(msg.contains("console:"), "{msg}");
    assert!(
        msg.contains("the guest cannot start") && msg.contains("no virtio disk"),
        "{msg}"
    );
}

#[test]
fn doctor_reports_the_vm_driver() {
    require_vm();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hangar"))
        .args(["doctor", "--json"])
        .env("HANGAR_INIT", common::init_binary())
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    let vm = v["drivers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["driver"] == "vm")
        .unwrap();
    assert_eq!(vm["available"], true, "{v}");
    let detail = vm["detail"].as_str().unwrap();
    assert!(detail.contains("QEMU microvm on"), "{detail}");
    let kvm = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "kvm")
        .unwrap();
    // Either KVM works, or the check says why not (this build machine: PVM, so TCG).
    if kvm["ok"] == true {
        assert!(detail.contains("KVM"), "{detail}");
        assert_eq!(v["auto"], "vm");
    } else {
        assert!(detail.contains("TCG"), "{detail}");
        assert!(!kvm["detail"].as_str().unwrap().is_empty());
        assert_ne!(v["auto"], "vm");
    }
}

/// QEMU is confined: it runs as `nobody` under its own seccomp filter, in a network namespace
/// of its own (an escape from the guest reaches neither Hangar's API nor the host's network),
/// and an image's disk is readable by root only.
#[test]
fn the_vmm_runs_confined() {
    require_vm();
    let rootfs = Rootfs::busybox();
    let s = Server::start();
    let id =
        s.create(json!({"driver": "vm", "image": rootfs.path(), "resources": {"disk_mib": 32}}));
    let pid = std::fs::read_to_string(
        s.data
            .path()
            .join("sandboxes")
            .join(&id)
            .join("vm/qemu.pid"),
    )
    .unwrap();
    let pid = pid.trim();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no {name} in {status}"))
            .split_whitespace()
            .nth(1)
            .unwrap()
            .to_owned()
    };
    assert_eq!(field("Uid:"), "65534", "QEMU is not running as nobody");
    assert_eq!(field("Seccomp:"), "2", "QEMU has no seccomp filter");
    let ns = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/net")).unwrap();
    assert_ne!(
        ns(pid),
        ns("self"),
        "QEMU shares the host's network namespace"
    );
    for entry in std::fs::read_dir(s.data.path().join("vm/images")).unwrap() {
        use std::os::unix::fs::PermissionsExt;
        let mode = entry.unwrap().metadata().unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "an image disk is readable by others");
    }
    // And the VM works as nobody: a snapshot and a restore (which reopen the volume).
    let r = s.call("POST", &format!("/v1/sandboxes/{id}/suspend"), None);
    assert_eq!(r.status, 200, "{}", r.text());
    let r = s.call("POST", &format!("/v1/sandboxes/{id}/resume"), None);
    assert_eq!(r.json()["last_resume"]["mode"], "memory", "{}", r.text());
    assert_eq!(s.sh(&id, "echo ok"), "ok\n");
    s.delete(&id);
}

/// Resources a VM cannot have are refused up front, clearly, and create nothing.
#[test]
fn resources_a_vm_cannot_have_are_refused() {
    require_vm();
    let rootfs = Rootfs::busybox();
    let s = Server::start();
    for (resources, expect) in [
        (json!({"memory_mib": 64}), "memory_mib >= 128"),
        (json!({"cpus": 200}), "more than this host's"),
    ] {
        let r = s.call(
            "POST",
            "/v1/sandboxes",
            Some(&json!({"driver": "vm", "image": rootfs.path(), "resources": resources})),
        );
        assert_eq!(r.status, 400, "{}", r.text());
        let msg = r.json()["error"]["message"].as_str().unwrap().to_owned();
        assert!(msg.contains(expect), "{msg}");
    }
    assert_eq!(
        s.call("GET", "/v1/sandboxes", None).json()["sandboxes"],
        json!([])
    );
    assert_eq!(
        std::fs::read_dir(s.data.path().join("sandboxes"))
            .unwrap()
            .count(),
        0
    );
}
