//! Bad input gets a clear 4xx and changes nothing: malformed and unknown fields, missing or
//! relative images, unknown drivers, path traversal and symlinks out of the sandbox, missing
//! executables, oversized uploads, unknown sandboxes.

mod common;

use std::process::{Command, Stdio};

use common::{require, Rootfs, Server};
use serde_json::json;

fn error_of(r: &common::Resp) -> (String, String) {
    let v = r.json();
    (
        v["error"]["code"].as_str().unwrap_or("").to_string(),
        v["error"]["message"].as_str().unwrap_or("").to_string(),
    )
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    require("crun", "crun");
    let rootfs = Rootfs::busybox();
    let s = Server::start_with(&["--max-upload-mib", "1"]);
    let image = rootfs.path().to_str().unwrap();
    let colon = rootfs.path().join("with:colon");
    std::fs::create_dir(&colon).unwrap();

    let cases = [
        (s.raw("POST", "/v1/sandboxes", b"{not json"), "invalid request body"),
        (s.call("POST", "/v1/sandboxes", Some(&json!({"image": image, "imgae": 1}))), "unknown field `imgae`"),
        (s.call("POST", "/v1/sandboxes", Some(&json!({"image": "/no/such/image"}))), "/no/such/image"),
        (s.call("POST", "/v1/sandboxes", Some(&json!({"image": "relative/path"}))), "absolute"),
        (s.call("POST", "/v1/sandboxes", Some(&json!({"image": colon}))), "':'"),
        // The host's own directories are not root filesystems a sandbox may get.
        (s.call("POST", "/v1/sandboxes", Some(&json!({"image": "/"}))), "--rootfs-root"),
        (s.call("POST", "/v1/sandboxes", Some(&json!({"image": "/etc"}))), "--rootfs-root"),
        (s.call("POST", "/v1/sandboxes", Some(&json!({"image": "/tmp"}))), "--rootfs-root"),
        (s.call("POST", "/v1/sandboxes", Some(&json!({"image": image, "driver": "hyperdrive"}))), "hyperdrive"),
        (s.call("POST", "/v1/sandboxes", Some(&json!({"image": image, "resources": {"memory_mib": 1}}))), "memory_mib"),
        (
            s.call("POST", "/v1/sandboxes", Some(&json!({"image": image, "egress": {"policy": "allowlist", "allow": ["http://x"]}}))),
            "http://x",
        ),
    ];
    for (r, needle) in &cases {
        assert_eq!(r.status, 400, "{}", r.text());
        let (code, message) = error_of(r);
        assert!(!code.is_empty(), "no error code: {}", r.text());
        assert!(
            message.contains(needle),
            "{message:?} should mention {needle:?}"
        );
    }
    assert_eq!(
        s.call("GET", "/v1/sandboxes", None).json()["sandboxes"],
        json!([]),
        "a bad create left a sandbox"
    );
    assert!(
        std::fs::read_dir(s.data.path().join("sandboxes"))
            .unwrap()
            .next()
            .is_none(),
        "a bad create left files"
    );

    let r = s.call("GET", "/v1/sandboxes/sb-000000000000", None);
    assert_eq!((r.status, error_of(&r).0.as_str()), (404, "not_found"));

    let id = s.create(json!({"driver": "container", "image": image}));
    let files = |q: &str| format!("/v1/sandboxes/{id}/files/content?path={q}");

    // Traversal and paths out of the sandbox root.
    for bad in [
        "/tmp/../etc/passwd",
        "relative.txt",
        "/proc/1/environ",
        "/run/hangar/control.sock",
    ] {
        let r = s.call("GET", &files(bad), None);
        assert_eq!(r.status, 400, "{bad}: {}", r.text());
        let r = s.raw("PUT", &files(bad), b"x");
        assert_eq!(r.status, 400, "{bad}: {}", r.text());
    }
    // A symlink that climbs out of the root is refused; one to the sandbox's own /etc is the
    // sandbox's file, never the host's.
    std::fs::write("/tmp/hangar-host-only-file", "host secret").unwrap();
    s.sh(&id, "ln -s ../../../../../../tmp/hangar-host-only-file /tmp/climb && ln -s /etc/passwd /tmp/abs");
    let r = s.call("GET", &files("/tmp/climb"), None);
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(!r.text().contains("host secret"));
    let r = s.call("GET", &files("/tmp/abs"), None);
    assert_eq!(r.status, 200);
    assert!(
        r.text().contains("agent:x:1000"),
        "not the sandbox's own /etc/passwd: {}",
        r.text()
    );

    // A missing executable and an empty command.
    let r = s.call(
        "POST",
        &format!("/v1/sandboxes/{id}/exec"),
        Some(&json!({"cmd": ["/no/such/binary"]})),
    );
    assert_eq!(r.status, 404, "{}", r.text());
    assert!(error_of(&r).1.contains("/no/such/binary"));
    let r = s.call(
        "POST",
        &format!("/v1/sandboxes/{id}/exec"),
        Some(&json!({"cmd": []})),
    );
    assert_eq!(r.status, 400, "{}", r.text());

    // Oversized uploads, with and without a declared length, are refused and leave no file.
    let big = vec![b'x'; 2 * 1024 * 1024];
    let r = s.raw("PUT", &files("/tmp/big"), &big);
    assert_eq!(r.status, 413, "{}", r.text());
    let mut curl = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-X",
            "PUT",
            "-H",
            "Transfer-Encoding: chunked",
            "--data-binary",
            "@-",
        ])
        .args(["-H", &s.auth()])
        .arg(s.url(&files("/tmp/big")))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(curl.stdin.as_mut().unwrap(), &big).unwrap();
    drop(curl.stdin.take());
    let out = curl.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "413");
    let r = s.exec(&id, &["sh", "-c", "ls /tmp/big* 2>/dev/null | wc -l"]);
    assert_eq!(r["stdout"], "0\n", "an oversized upload left a file");

    // Suspended: files and exec say so instead of failing obscurely.
    assert_eq!(
        s.call("POST", &format!("/v1/sandboxes/{id}/suspend"), None)
            .status,
        200
    );
    let r = s.call("GET", &files("/etc/passwd"), None);
    assert_eq!(r.status, 409, "{}", r.text());
    s.delete(&id);
}
