//! An OCI image layout made by the real `buildah` (`buildah push IMG oci:DIR`, zstd layers, a
//! whiteout in the upper layer) runs as a sandbox: the image's Entrypoint is the agent process
//! (reached through `agent.sock`), its Env, WorkingDir and User apply to exec, deleted files
//! stay deleted, and the unpacked layers are shared by every sandbox of the image.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{require, Rootfs, Server};
use serde_json::json;

fn buildah(storage: &Path, args: &[&str]) -> String {
    let out = Command::new("buildah")
        .args(["--storage-driver", "vfs", "--root"])
        .arg(storage.join("root"))
        .arg("--runroot")
        .arg(storage.join("run"))
        .args(args)
        .env("BUILDAH_ISOLATION", "chroot")
        .output()
        .expect("buildah runs");
    assert!(
        out.status.success(),
        "buildah {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Builds a two-layer image from the busybox root filesystem and pushes it to an OCI layout.
fn build_image(rootfs: &Path, work: &Path) -> std::path::PathBuf {
    let tar = work.join("rootfs.tar");
    assert!(Command::new("tar")
        .arg("-C")
        .arg(rootfs)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()
        .unwrap()
        .success());
    let st = work.join("storage");
    let c = buildah(&st, &["from", "scratch"]);
    buildah(&st, &["add", &c, tar.to_str().unwrap(), "/"]);
    buildah(
        &st,
        &[
            "config",
            "--entrypoint",
            r#"["/bin/httpd", "-f", "-p", "127.0.0.1:8088", "-h", "/www"]"#,
            "--env",
            "GREETING=hello from the image",
            "--workingdir",
            "/home/agent",
            "--user",
            "agent",
            &c,
        ],
    );
    buildah(&st, &["commit", "-q", &c, "hangar-test-base:1"]);
    // A second layer on top: deleting a file there makes a whiteout.
    let c = buildah(&st, &["from", "hangar-test-base:1"]);
    buildah(
        &st,
        &[
            "run",
            "--user",
            "root",
            &c,
            "--",
            "sh",
            "-c",
            "rm /bin/vi && mkdir -p /www && echo served-by-agent > /www/index.html",
        ],
    );
    buildah(&st, &["commit", "-q", &c, "hangar-test-agent:1"]);
    let layout = work.join("oci");
    buildah(
        &st,
        &[
            "push",
            "-q",
            "--compression-format",
            "zstd",
            "hangar-test-agent:1",
            &format!("oci:{}", layout.display()),
        ],
    );
    layout
}

#[test]
fn oci_layout_from_buildah_runs_as_a_sandbox() {
    require("buildah", "buildah");
    require("runsc", "runsc");
    let rootfs = Rootfs::busybox();
    let work = tempfile::Builder::new()
        .prefix("hangar-oci-")
        .tempdir()
        .unwrap();
    let layout = build_image(rootfs.path(), work.path());
    let s = Server::start();

    let a = s.create(json!({"image": layout}));
    assert_eq!(
        s.sh(&a, "id -u; pwd; echo $GREETING"),
        "1000\n/home/agent\nhello from the image\n"
    );
    let r = s.exec(&a, &["ls", "/bin/vi"]);
    assert_ne!(
        r["exit_code"], 0,
        "a file deleted by the upper layer is visible: {r}"
    );
    assert_eq!(s.sh(&a, "ls /bin/sh"), "/bin/sh\n");

    // The image's Entrypoint is the agent process; agent.sock reaches its port.
    let sock = s
        .data
        .path()
        .join("sandboxes")
        .join(&a)
        .join("run/agent.sock");
    let deadline = Instant::now() + Duration::from_secs(10);
    let body = loop {
        let out = Command::new("curl")
            .args(["-s", "--unix-socket"])
            .arg(&sock)
            .arg("http://agent/index.html")
            .output()
            .unwrap();
        if out.status.success() && !out.stdout.is_empty() {
            break String::from_utf8_lossy(&out.stdout).into_owned();
        }
        assert!(
            Instant::now() < deadline,
            "the agent never answered on agent.sock"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(body, "served-by-agent\n");

    // Layers are unpacked once and shared.
    let layers = s.data.path().join("images/layers/sha256");
    let count = || {
        std::fs::read_dir(&layers)
            .unwrap()
            .filter(|e| e.as_ref().unwrap().path().is_dir())
            .count()
    };
    assert_eq!(count(), 2);
    let b = s.create(json!({"image": layout}));
    assert_eq!(
        count(),
        2,
        "a second sandbox of the same image unpacked its layers again"
    );
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let shared = mounts
        .lines()
        .filter(|l| l.contains(layers.to_str().unwrap()))
        .count();
    assert_eq!(
        shared, 2,
        "both sandboxes' overlays should use the shared layers"
    );
    s.delete(&a);
    s.delete(&b);
}
