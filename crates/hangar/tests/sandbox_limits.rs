//! Limits verified from inside the sandbox, per driver: a memory hog is killed inside its
//! sandbox, a fork bomb is contained, a full volume is ENOSPC, the CPU quota is in place —
//! and the sandbox, its neighbour and the host carry on.

mod common;

use common::{require, Rootfs, Server};
use serde_json::json;

/// How a driver's CPU limit shows: a cgroup quota on the host, or the VM's vCPU count.
enum Cpu {
    Quota(fn(&str) -> std::path::PathBuf),
    Vcpus,
}

fn limits(driver: &str, cpu: Cpu) {
    let rootfs = Rootfs::busybox();
    let s = Server::start();
    let resources = json!({"cpus": 0.5, "memory_mib": 128, "disk_mib": 32, "pids": 32});
    let a = s.create(json!({"driver": driver, "image": rootfs.path(), "resources": resources}));
    let b = s.create(json!({"driver": driver, "image": rootfs.path()}));

    // Memory: a process that grows past the limit is killed (137); the sandbox lives on.
    // A VM's RAM is a shared file mapping on the host's disk: with the dirty pages earlier tests
    // left still being written back, the hog's page faults wait on that writeback (a TCG guest
    // at half a core was seen to take over curl's 120 s that way after the whole suite, and
    // ~30 s alone). Writing them back first measures the sandbox, not the suite's leftovers.
    nix::unistd::sync();
    let r = s.exec(
        &a,
        &[
            "sh",
            "-c",
            "head -c 314572800 /dev/zero | tail -n 1 > /dev/null",
        ],
    );
    assert_eq!(r["exit_code"], 137, "memory hog was not OOM-killed: {r}");
    assert_eq!(s.sh(&a, "echo alive"), "alive\n");

    // Pids: forks past the limit fail; a fork bomb is contained and cleaned up on timeout.
    let r = s.exec(&a, &["sh", "-c", "for i in $(seq 100); do sleep 1 & done"]);
    assert!(
        r["stderr"].as_str().unwrap().contains("can't fork"),
        "100 forks under a limit of 32: {r}"
    );
    std::thread::sleep(std::time::Duration::from_millis(1500)); // the sleeps end
    let bomb = s.call(
        "POST",
        &format!("/v1/sandboxes/{a}/exec"),
        Some(&json!({"cmd": ["sh", "-c", "f() { f | f & }; f; sleep 60"], "timeout_s": 3})),
    );
    assert_eq!(bomb.status, 200, "{}", bomb.text());
    assert_eq!(bomb.json()["timed_out"], true);
    assert_eq!(
        s.sh(&a, "echo alive"),
        "alive\n",
        "sandbox unusable after a fork bomb"
    );

    // Disk: the volume size is the limit, seen as ENOSPC inside; freeing space works.
    let r = s.exec(&a, &["sh", "-c", "dd if=/dev/zero of=/fill bs=1M count=64"]);
    assert_ne!(r["exit_code"], 0);
    assert!(
        r["stderr"]
            .as_str()
            .unwrap()
            .contains("No space left on device"),
        "{r}"
    );
    assert_eq!(
        s.sh(&a, "rm /fill && echo ok > /small && cat /small"),
        "ok\n"
    );

    match cpu {
        // CPU: the quota is in the sandbox's cgroup.
        Cpu::Quota(cgroup) => {
            let quota = std::fs::read_to_string(cgroup(&a).join("cpu.cfs_quota_us")).unwrap();
            assert_eq!(quota.trim(), "50000", "cpus 0.5 should be 50 ms per 100 ms");
        }
        // CPU: a VM gets whole vCPUs, at least one, and its QEMU a host quota of `cpus`.
        Cpu::Vcpus => {
            let n = s.sh(&a, "grep -c ^processor /proc/cpuinfo");
            assert_eq!(n.trim(), "1", "cpus 0.5 should be one vCPU");
            let v1 = std::path::PathBuf::from(format!(
                "/sys/fs/cgroup/cpu/hangar-vm/hangar-{a}/cpu.cfs_quota_us"
            ));
            let quota = if v1.exists() {
                std::fs::read_to_string(v1).unwrap()
            } else {
                std::fs::read_to_string(format!("/sys/fs/cgroup/hangar-vm/hangar-{a}/cpu.max"))
                    .expect("the VM's QEMU has no cgroup")
            };
            assert!(
                quota.starts_with("50000"),
                "cpus 0.5 should be 50 ms per 100 ms: {quota}"
            );
            // And the memory limit is the VM's RAM.
            let mem = s.sh(&a, "grep MemTotal /proc/meminfo");
            let kib: u64 = mem.split_whitespace().nth(1).unwrap().parse().unwrap();
            assert!(kib <= 128 * 1024 && kib > 64 * 1024, "{mem}");
        }
    }

    // The neighbour and the host carried on throughout.
    assert_eq!(s.sh(&b, "echo neighbour"), "neighbour\n");
    assert_eq!(s.call("GET", "/healthz", None).status, 200);
    s.delete(&a);
    s.delete(&b);
}

#[test]
fn container_limits() {
    require("crun", "crun");
    limits(
        "container",
        Cpu::Quota(|id| format!("/sys/fs/cgroup/cpu/hangar/{id}").into()),
    );
}

#[test]
fn gvisor_limits() {
    require("runsc", "runsc");
    limits(
        "gvisor",
        Cpu::Quota(|id| format!("/sys/fs/cgroup/cpu/{id}").into()),
    );
}

#[test]
fn vm_limits() {
    common::require_vm();
    limits("vm", Cpu::Vcpus);
}
