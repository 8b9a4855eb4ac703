//! `hangar serve` killed and started again with sandboxes running and suspended: every
//! sandbox is usable afterwards, with its files (and on gvisor its processes).

mod common;

use common::{assert_nothing_left, require, Rootfs, Server};
use serde_json::json;

fn restart(driver: &str) {
    let rootfs = Rootfs::busybox();
    let mut s = Server::start();
    let running = s.create(json!({"driver": driver, "image": rootfs.path()}));
    let suspended = s.create(json!({"driver": driver, "image": rootfs.path()}));
    s.sh(&running, "echo kept-running > /data.txt");
    s.sh(&suspended, "echo kept-suspended > /data.txt");
    assert_eq!(
        s.call("POST", &format!("/v1/sandboxes/{suspended}/suspend"), None)
            .status,
        200
    );

    s.restart();

    let list = s.call("GET", "/v1/sandboxes", None).json();
    let state = |id: &str| {
        list["sandboxes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["id"] == id)
            .map(|x| x["state"].clone())
    };
    assert_eq!(
        state(&running),
        Some(json!("running")),
        "{list}\n{}",
        s.log()
    );
    assert_eq!(state(&suspended), Some(json!("suspended")), "{list}");
    assert_eq!(s.sh(&running, "cat /data.txt"), "kept-running\n");
    let r = s.call("POST", &format!("/v1/sandboxes/{suspended}/resume"), None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(s.sh(&suspended, "cat /data.txt"), "kept-suspended\n");
    // Egress proxying works again after the restart (the policy refuses, clearly).
    let r = s.exec(
        &running,
        &[
            "sh",
            "-c",
            "timeout 10 wget -q -O - http://example.org/ 2>&1",
        ],
    );
    assert!(
        r["stdout"].as_str().unwrap().contains("403"),
        "egress proxy not back after restart: {r}"
    );

    for id in [&running, &suspended] {
        s.delete(id);
        assert_nothing_left(&s, id);
    }
}

#[test]
fn container_restart() {
    require("crun", "crun");
    restart("container");
}

#[test]
fn gvisor_restart() {
    require("runsc", "runsc");
    restart("gvisor");
}

#[test]
fn vm_restart() {
    common::require_vm();
    restart("vm");
}
