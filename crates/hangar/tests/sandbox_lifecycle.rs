//! Per driver, through the HTTP API against the real runtime: create → exec → write a file →
//! suspend → resume → read the file → (gvisor) a counter kept counting → delete, and nothing
//! is left behind.

mod common;

use common::{assert_nothing_left, require, Rootfs, Server};
use serde_json::json;

const COUNTER: &str = "sh -c 'i=0; while true; do i=$((i+1)); echo $i > /tmp/counter; sleep 0.05; done' >/dev/null 2>&1 &";

/// The counter's value. The writer truncates the file before each write (`echo > file`), so
/// a read can land between the two and see it empty: read again then.
fn counter(s: &Server, id: &str) -> u64 {
    for _ in 0..50 {
        if let Ok(n) = s.sh(id, "cat /tmp/counter").trim().parse() {
            return n;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    panic!("/tmp/counter stayed empty");
}

/// Waits (bounded) until the counter is past `above`: a loaded machine may take a while to
/// schedule a background process, so no fixed sleep decides the outcome.
fn counter_past(s: &Server, id: &str, above: u64) -> Option<u64> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while std::time::Instant::now() < deadline {
        let v = s.exec(id, &["cat", "/tmp/counter"]);
        if let Ok(n) = v["stdout"].as_str().unwrap_or("").trim().parse::<u64>() {
            if n > above {
                return Some(n);
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    None
}

/// What each driver keeps across suspend.
fn expected_mode(driver: &str) -> &'static str {
    match driver {
        "gvisor" | "vm" => "memory",
        _ => "filesystem",
    }
}

fn lifecycle(driver: &str) {
    let rootfs = Rootfs::busybox();
    let s = Server::start();
    let id =
        s.create(json!({"driver": driver, "image": rootfs.path(), "resources": {"disk_mib": 64}}));
    let sb = s.call("GET", &format!("/v1/sandboxes/{id}"), None).json();
    assert_eq!(sb["driver"], driver);
    assert_eq!(sb["state"], "running");

    let out = s.exec(&id, &["sh", "-c", "echo hi; echo err >&2; exit 3"]);
    assert_eq!(out["stdout"], "hi\n");
    assert_eq!(out["stderr"], "err\n");
    assert_eq!(out["exit_code"], 3);

    let w = s.raw(
        "PUT",
        &format!("/v1/sandboxes/{id}/files/content?path=/home/agent/notes.txt"),
        b"remember the milk\n",
    );
    assert_eq!(w.status, 200, "{}", w.text());
    s.sh(
        &id,
        "mkdir -p /var/lib/app && echo written-by-exec > /var/lib/app/state",
    );
    // This runsc now and then crashes a process it restores (about 1 in 100; Hangar then starts
    // the sandbox again on its files and says so in `last_resume`). That is runsc's fault, not
    // a regression, so one such resume is retried; a second in a row fails the test.
    let mut attempt = 0;
    let before = loop {
        attempt += 1;
        s.sh(&id, "rm -f /tmp/counter");
        s.sh(&id, COUNTER);
        let before = counter_past(&s, &id, 2).expect("the background counter never counted");

        let sus = s.call("POST", &format!("/v1/sandboxes/{id}/suspend"), None);
        assert_eq!(sus.status, 200, "{}", sus.text());
        let sus = sus.json();
        assert_eq!(sus["state"], "suspended");
        let cp = &sus["checkpoint"];
        assert_eq!(cp["mode"], expected_mode(driver));
        assert!(cp["bytes"].as_u64().unwrap() > 0);
        assert!(cp["hash"].as_str().unwrap().starts_with("sha256:"));
        // While suspended nothing of it runs and exec is refused with a clear conflict.
        let r = s.call(
            "POST",
            &format!("/v1/sandboxes/{id}/exec"),
            Some(&json!({"cmd": ["true"]})),
        );
        assert_eq!(r.status, 409, "{}", r.text());

        if driver == "vm" {
            // A VM's clock stands still while it is suspended; Hangar sets it on resume.
            std::thread::sleep(std::time::Duration::from_secs(3));
        }
        let res = s.call("POST", &format!("/v1/sandboxes/{id}/resume"), None);
        assert_eq!(res.status, 200, "{}", res.text());
        assert_eq!(res.json()["state"], "running");
        let last = res.json()["last_resume"].clone();
        let expected = expected_mode(driver);
        if last["mode"] != expected && attempt < 2 {
            eprintln!(
                "runsc did not restore this time ({}); trying once more",
                last["note"]
            );
            continue;
        }
        assert_eq!(last["mode"], expected, "{last}");
        break before;
    };
    let r = s.call(
        "GET",
        &format!("/v1/sandboxes/{id}/files/content?path=/home/agent/notes.txt"),
        None,
    );
    assert_eq!((r.status, r.text().as_str()), (200, "remember the milk\n"));
    assert_eq!(s.sh(&id, "cat /var/lib/app/state"), "written-by-exec\n");

    let guest_now: u64 = s.sh(&id, "date +%s").trim().parse().unwrap();
    let host_now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        guest_now.abs_diff(host_now) <= 2,
        "the sandbox's clock is off by {} s after resume",
        guest_now as i64 - host_now as i64
    );

    let after = counter(&s, &id);
    if expected_mode(driver) == "memory" {
        // The process survived: it continues from where it was, not from 1.
        assert!(after >= before, "counter went back: {before} -> {after}");
        assert!(
            counter_past(&s, &id, after).is_some(),
            "counter stopped counting after resume"
        );
    } else {
        // Files only: the counter's last value is there, its process is not.
        std::thread::sleep(std::time::Duration::from_millis(300));
        assert_eq!(
            counter(&s, &id),
            after,
            "a process survived a filesystem-only suspend"
        );
    }

    let listing = s
        .call(
            "GET",
            &format!("/v1/sandboxes/{id}/files?path=/home/agent"),
            None,
        )
        .json();
    assert_eq!(listing["type"], "dir");
    assert!(listing["entries"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["name"] == "notes.txt" && e["size"] == 18));

    s.delete(&id);
    assert_eq!(
        s.call("GET", &format!("/v1/sandboxes/{id}"), None).status,
        404
    );
    assert_nothing_left(&s, &id);
}

#[test]
fn container_lifecycle() {
    require("crun", "crun");
    lifecycle("container");
}

#[test]
fn gvisor_lifecycle() {
    require("runsc", "runsc");
    lifecycle("gvisor");
}

#[test]
fn vm_lifecycle() {
    common::require_vm();
    lifecycle("vm");
}

/// The agent process is the image's command (or the sandbox's `command`); when it exits it is
/// started again, with backoff.
#[test]
fn agent_process_restarts_when_it_exits() {
    require("crun", "crun");
    let rootfs = Rootfs::busybox();
    let s = Server::start();
    let id = s.create(json!({
        "driver": "container", "image": rootfs.path(),
        "command": ["sh", "-c", "echo start >> /tmp/starts; sleep 0.1; exit 3"],
    }));
    let starts = || -> usize {
        let v = s.exec(&id, &["sh", "-c", "wc -l < /tmp/starts"]);
        v["stdout"]
            .as_str()
            .unwrap_or("")
            .trim()
            .parse()
            .unwrap_or(0)
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while starts() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the agent was not started again after it exited"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // With backoff (0.2 s, 0.4 s, 0.8 s, …) a second more brings a few starts, not the ten a
    // 0.1 s agent restarted at once would make.
    let seen = starts();
    std::thread::sleep(std::time::Duration::from_secs(1));
    let more = starts() - seen;
    assert!(more <= 4, "{more} restarts in one second: no backoff");
    s.delete(&id);
}

/// When this runsc cannot checkpoint a sandbox (a listening TCP socket watched by epoll, as
/// asyncio, Node and Go servers have), suspend still succeeds: processes stop, files stay,
/// and the checkpoint says so.
#[test]
fn gvisor_suspend_falls_back_to_files_when_the_checkpoint_fails() {
    require("runsc", "runsc");
    let rootfs = Rootfs::busybox();
    let s = Server::start();
    let id = s.create(json!({"driver": "gvisor", "image": rootfs.path()}));
    // A second hangar-init inside is a convenient epoll server on a TCP port.
    s.sh(
        &id,
        r#"mkdir -p /tmp/x && echo keep > /data &&
           echo '{"secret":"x","agent":null,"agent_port":9,"defaults":{"env":{},"user":"","cwd":""}}' > /tmp/x/init.json &&
           (HANGAR_PROXY_PORT=3129 HANGAR_RUN_DIR=/tmp/x /.hangar/hangar-init > /dev/null 2>&1 &) ; sleep 0.5"#,
    );
    let r = s.call("POST", &format!("/v1/sandboxes/{id}/suspend"), None);
    assert_eq!(r.status, 200, "{}", r.text());
    let cp = r.json()["checkpoint"].clone();
    assert_eq!(cp["mode"], "filesystem", "{cp}");
    assert!(cp["note"].as_str().unwrap().contains("epoll"), "{cp}");
    let r = s.call("POST", &format!("/v1/sandboxes/{id}/resume"), None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["last_resume"]["mode"], "filesystem");
    assert_eq!(s.sh(&id, "cat /data"), "keep\n");
    s.delete(&id);
}
