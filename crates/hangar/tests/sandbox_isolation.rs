//! Isolation through the HTTP API against the real runtimes: one sandbox cannot see another's
//! files or reach its ports, no sandbox reaches Hangar's API or any host port, egress follows
//! the policy (`none`, `allowlist`), and `hangar-init`'s control API wants the secret.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::Command;

use common::{require, Rootfs, Server};
use serde_json::{json, Value};

/// A stand-in for the outside world: an HTTP server on the host's loopback that answers
/// every request with `body`. It serves a bounded number of connections, then stops.
fn outside_server(body: &'static str) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming().take(20) {
            let Ok(mut c) = conn else { continue };
            let mut buf = [0u8; 4096];
            let _ = c.read(&mut buf);
            let _ = write!(
                c,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    port
}

fn run(s: &Server, id: &str, script: &str) -> Value {
    s.exec(id, &["sh", "-c", script])
}

fn isolation(driver: &str) {
    let rootfs = Rootfs::busybox();
    let s = Server::start();
    let outside = outside_server("hello from outside");
    let other = outside_server("must not be reached");
    let a = s.create(json!({"driver": driver, "image": rootfs.path()}));
    let b = s.create(json!({
        "driver": driver, "image": rootfs.path(),
        "egress": {"policy": "allowlist", "allow": [format!("localhost:{outside}")]},
    }));

    // Files: B does not see what A wrote.
    s.sh(&a, "echo a-secret > /tmp/secret-a");
    let r = run(&s, &b, "cat /tmp/secret-a");
    assert_ne!(r["exit_code"], 0, "B read A's file: {r}");

    // Ports: A serves on its loopback; A reaches it, B does not.
    s.sh(
        &a,
        "mkdir -p /www && echo served-by-a > /www/index.html && httpd -p 127.0.0.1:9000 -h /www",
    );
    assert_eq!(
        s.sh(&a, "wget -q -Y off -O - http://127.0.0.1:9000/"),
        "served-by-a\n"
    );
    let r = run(
        &s,
        &b,
        "timeout 10 wget -q -Y off -O - http://127.0.0.1:9000/",
    );
    assert_ne!(r["exit_code"], 0, "B reached A's port: {r}");

    // No route to the host: neither Hangar's API nor the outside server directly.
    for id in [&a, &b] {
        for port in [s.port, outside] {
            let r = run(
                &s,
                id,
                &format!("timeout 10 wget -q -Y off -O - http://127.0.0.1:{port}/healthz"),
            );
            assert_ne!(
                r["exit_code"], 0,
                "{id} reached host port {port} without the proxy: {r}"
            );
        }
        // Only loopback in the sandbox's network namespace.
        let ifaces = s.sh(
            id,
            "cat /proc/net/dev | tail -n +3 | cut -d: -f1 | tr -d ' '",
        );
        assert_eq!(ifaces.trim(), "lo", "{id} has more than loopback: {ifaces}");
    }

    // Egress `none`: the proxy refuses everything with a clear 403.
    let r = run(
        &s,
        &a,
        &format!("timeout 10 wget -q -O - http://localhost:{outside}/ 2>&1"),
    );
    assert_ne!(r["exit_code"], 0);
    assert!(
        r["stdout"].as_str().unwrap().contains("403"),
        "expected a 403 from the proxy: {r}"
    );

    // Egress `allowlist`: the listed host answers (plain HTTP and a CONNECT tunnel); anything
    // else, Hangar's API included, is refused.
    assert_eq!(
        s.sh(&b, &format!("wget -q -O - http://localhost:{outside}/")),
        "hello from outside"
    );
    let tunnel = s.sh(
        &b,
        &format!(
            "printf 'CONNECT localhost:{outside} HTTP/1.1\\r\\nHost: localhost:{outside}\\r\\n\\r\\nGET / HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n' | timeout 3 nc 127.0.0.1 3128; true"
        ),
    );
    // (Under gVisor busybox nc lingers after the server closes; `timeout` ends it.)
    assert!(
        tunnel.starts_with("HTTP/1.1 200 Connection Established"),
        "{tunnel}"
    );
    assert!(tunnel.ends_with("hello from outside"), "{tunnel}");
    for port in [other, s.port] {
        let r = run(
            &s,
            &b,
            &format!("timeout 10 wget -q -O - http://localhost:{port}/ 2>&1"),
        );
        assert_ne!(
            r["exit_code"], 0,
            "allowlist let localhost:{port} through: {r}"
        );
        assert!(r["stdout"].as_str().unwrap().contains("403"), "{r}");
    }

    // Every connection through the proxy is recorded per sandbox (and in the audit trail):
    // what was allowed with its bytes, what was refused and why.
    let egress = |id: &str, want: usize| -> Vec<Value> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let list = s
                .call("GET", &format!("/v1/sandboxes/{id}/egress"), None)
                .json()["egress"]
                .as_array()
                .unwrap()
                .clone();
            if list.len() >= want || std::time::Instant::now() > deadline {
                return list;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    };
    let of_b = egress(&b, 4);
    let allowed: Vec<&Value> = of_b.iter().filter(|e| e["allowed"] == true).collect();
    assert_eq!(allowed.len(), 2, "the GET and the tunnel: {of_b:#?}");
    for e in &allowed {
        assert_eq!(e["host"], "localhost");
        assert_eq!(e["port"], outside);
        assert!(
            e["bytes_in"].as_u64().unwrap() > 0 && e["bytes_out"].as_u64().unwrap() > 0,
            "{e}"
        );
    }
    for port in [other, s.port] {
        assert!(
            of_b.iter()
                .any(|e| e["allowed"] == false && e["port"] == port && e["reason"].is_string()),
            "no refusal of localhost:{port} recorded: {of_b:#?}"
        );
    }
    let of_a = egress(&a, 1);
    assert!(of_a.iter().all(|e| e["allowed"] == false), "{of_a:#?}");
    assert_eq!(of_a.len(), 1, "{of_a:#?}");
    // (Each is audited just after it is listed: wait for the last.)
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let (denied, audit) = loop {
        let audit = s.call("GET", "/v1/audit", None).json();
        let denied = audit["records"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["action"] == "egress.denied")
            .count();
        if denied >= 3 || std::time::Instant::now() > deadline {
            break (denied, audit);
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert_eq!(denied, 3, "{audit:#}");

    // No host devices: crun has no CAP_MKNOD and a device cgroup refusing all but the usual
    // few; gVisor's device nodes are its own. Either way the host's disk is not readable.
    let r = run(
        &s,
        &a,
        "mknod /tmp/disk b 8 0 && head -c 512 /tmp/disk | wc -c | grep -qx 512",
    );
    assert_ne!(r["exit_code"], 0, "read a host block device: {r}");
    if driver == "container" {
        assert_ne!(
            run(&s, &a, "mknod /tmp/disk2 b 8 0")["exit_code"],
            0,
            "mknod worked under crun"
        );
    }
    // On crun, no new namespaces or mounts either (seccomp).
    if driver == "container" {
        for cmd in [
            "unshare -m true",
            "unshare -U true",
            "mount -t tmpfs none /mnt",
        ] {
            let r = run(&s, &a, cmd);
            assert_ne!(r["exit_code"], 0, "{cmd:?} worked in the sandbox: {r}");
        }
    }
    assert_eq!(
        s.sh(&a, "echo ok > /dev/null && head -c 4 /dev/zero | wc -c"),
        "4\n"
    );

    // hangar-init's control API wants the sandbox's secret.
    let sock = s
        .data
        .path()
        .join("sandboxes")
        .join(&a)
        .join("run/control.sock");
    for auth in [None, Some("Authorization: Bearer wrong")] {
        let mut c = Command::new("curl");
        c.args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--unix-socket",
        ])
        .arg(&sock);
        if let Some(h) = auth {
            c.args(["-H", h]);
        }
        let out = c.arg("http://sandbox/health").output().unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "401",
            "control API answered without the secret"
        );
    }

    s.delete(&a);
    s.delete(&b);
}

#[test]
fn container_isolation() {
    require("crun", "crun");
    isolation("container");
}

#[test]
fn gvisor_isolation() {
    require("runsc", "runsc");
    isolation("gvisor");
}

/// A microVM has no network device at all; its link port opens nothing on the host but the
/// sandbox's own egress proxy.
#[test]
fn vm_isolation() {
    common::require_vm();
    isolation("vm");
}
