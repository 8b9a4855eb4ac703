//! Images end to end, against the real buildah and debootstrap: a Debian base bootstrapped
//! with python3, a Dockerfile built `FROM` it and run as a sandbox, a rebuild answered from
//! the cache, build failures that show the failing step's output, imports of OCI and docker
//! archives, and uploads that are refused before anything is written.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::images::{self as img, ImageOp};
use common::{require, Rootfs, Server};
use serde_json::{json, Value};

/// A build context with the host's static busybox at `/bin/busybox` (no base image needed).
fn busybox_context(dockerfile: &str) -> tempfile::TempDir {
    require("busybox", "busybox-static");
    let dir = img::context(&[("Dockerfile", dockerfile)]);
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap();
    std::fs::copy(busybox, dir.path().join("busybox")).unwrap();
    dir
}

fn hangar_cli(server: &Server, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_hangar"))
        .args(args)
        .env("HANGAR_URL", server.url(""))
        .env("HANGAR_API_KEY", server.key())
        .output()
        .expect("hangar runs")
}

fn listed<'a>(images: &'a [Value], id: &Value) -> Option<&'a Value> {
    images.iter().find(|i| i["id"] == *id)
}

#[test]
fn bootstrap_build_run_and_rebuild_from_cache() {
    let server = Server::start();
    let t = Instant::now();
    let base = img::debian_base(&server, &common::agents::BASE_PACKAGES);
    eprintln!("bootstrap: {:?}", t.elapsed());
    assert_eq!(base["name"], "debian:bookworm");
    assert!(base["size"].as_u64().unwrap() > 10 << 20, "{base}");

    let ctx = img::context(&[
        (
            "Dockerfile",
            "FROM debian:bookworm\nCOPY app.py /app/app.py\nRUN python3 /app/app.py > /built.txt\n",
        ),
        ("app.py", "print('built by hangar')\n"),
    ]);
    let t = Instant::now();
    let first = img::build(&server, ctx.path(), "hello-py");
    eprintln!("first build: {:?}", t.elapsed());
    let image = first.image().clone();
    assert_eq!(image["name"], "hello-py");
    assert!(
        first.progress.iter().any(|l| l.contains("STEP 3/3: RUN")),
        "buildah's progress is streamed: {:?}",
        first.progress
    );
    let images = img::list(&server);
    assert!(listed(&images, &base["id"]).is_some(), "{images:?}");
    assert_eq!(listed(&images, &image["id"]).unwrap()["name"], "hello-py");

    // The image runs as a sandbox, with python3 and what the RUN step wrote.
    let layout = img::layout_of(&server, image["id"].as_str().unwrap());
    let id = server.create(json!({"image": layout, "driver": "container"}));
    let out = server.sh(
        &id,
        "cat /built.txt && python3 -c 'import sys; print(sys.version_info[0])'",
    );
    assert_eq!(out, "built by hangar\n3\n");
    server.delete(&id);

    // Unchanged Dockerfile and context: the same image, near-instantly.
    let started = Instant::now();
    let again = img::build(&server, ctx.path(), "hello-py");
    let took = started.elapsed();
    eprintln!("cached rebuild: {took:?}");
    assert_eq!(again.image()["id"], image["id"]);
    assert!(
        took < Duration::from_secs(5),
        "a cached rebuild took {took:?}"
    );

    // The CLI builds the same directory to the same image and lists it.
    let out = hangar_cli(
        &server,
        &[
            "images",
            "build",
            ctx.path().to_str().unwrap(),
            "--name",
            "hello-py",
            "--json",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cli_image: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(cli_image["id"], image["id"]);
    let out = hangar_cli(&server, &["images", "ls", "--json"]);
    assert!(out.status.success());
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(listed(list["images"].as_array().unwrap(), &image["id"]).is_some());

    // A changed context is built again, into a new image.
    std::fs::write(ctx.path().join("app.py"), "print('changed')\n").unwrap();
    let t = Instant::now();
    let changed = img::build(&server, ctx.path(), "hello-py");
    eprintln!("build after a change: {:?}", t.elapsed());
    assert_ne!(changed.image()["id"], image["id"]);
    let images = img::list(&server);
    assert_eq!(
        listed(&images, &changed.image()["id"]).unwrap()["name"],
        "hello-py"
    );
}

#[test]
fn failing_step_shows_its_output() {
    let server = Server::start();
    let ctx = busybox_context(
        "FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"sh\", \"-c\", \"echo marker-from-the-failing-step; exit 3\"]\n",
    );
    let op = img::build(&server, ctx.path(), "broken");
    assert_eq!(op.status, 200);
    assert_eq!(op.error_code(), "build_failed", "{op:?}");
    let msg = op.error_message();
    assert!(msg.contains("marker-from-the-failing-step"), "{msg}");
    assert!(msg.contains("exit status 3"), "{msg}");
    assert!(img::list(&server).is_empty(), "nothing is registered");
}

#[test]
fn unknown_base_fails_fast_with_a_hint() {
    let server = Server::start();
    let ctx = img::context(&[(
        "Dockerfile",
        "FROM example.org/nowhere/nothing:1\nRUN true\n",
    )]);
    let started = Instant::now();
    let op = img::build(&server, ctx.path(), "orphan");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(op.error_code(), "base_image_missing", "{op:?}");
    let msg = op.error_message();
    assert!(msg.contains("example.org/nowhere/nothing:1"), "{msg}");
    assert!(msg.contains("hangar images bootstrap"), "{msg}");
    assert!(msg.contains("hangar images import"), "{msg}");
}

/// A busybox root filesystem as an image config: `sh` as its command.
fn busybox_config() -> Value {
    json!({"Cmd": ["/bin/sh"], "Env": ["PATH=/bin", "FROM_IMPORT=yes"]})
}

#[test]
fn imports_oci_archives_layouts_and_docker_archives() {
    img::require_image_tools();
    let server = Server::start();
    let rootfs = Rootfs::busybox();
    let work = tempfile::tempdir().unwrap();

    // An OCI archive, uploaded.
    let layout = work.path().join("layout");
    img::write_oci_layout(rootfs.path(), busybox_config(), &layout);
    let archive = img::tar_dir(&layout);
    let op = img::image_call(
        &server,
        "/v1/images/import?name=imported-oci:1",
        "application/x-tar",
        &archive,
    );
    let oci = op.image().clone();
    assert_eq!(oci["name"], "imported-oci:1");
    let listed_oci = listed(&img::list(&server), &oci["id"]).cloned().unwrap();
    assert_eq!(listed_oci["name"], "imported-oci:1");
    let id = server.create(json!({
        "image": img::layout_of(&server, oci["id"].as_str().unwrap()),
        "driver": "container",
    }));
    assert_eq!(
        server.sh(&id, "echo $FROM_IMPORT; busybox true && echo ok"),
        "yes\nok\n"
    );
    server.delete(&id);

    // It is in buildah's storage too: a Dockerfile builds FROM it.
    let ctx = img::context(&[(
        "Dockerfile",
        "FROM imported-oci:1\nRUN [\"/bin/busybox\", \"sh\", \"-c\", \"echo layered > /layered.txt\"]\n",
    )]);
    let built = img::build(&server, ctx.path(), "on-imported");
    let id = server.create(json!({
        "image": img::layout_of(&server, built.image()["id"].as_str().unwrap()),
        "driver": "container",
    }));
    assert_eq!(server.sh(&id, "cat /layered.txt"), "layered\n");
    server.delete(&id);

    // A layout directory on the server's host, by path.
    let op = img::image_call(
        &server,
        "/v1/images/import?name=imported-layout",
        "application/json",
        &serde_json::to_vec(&json!({"path": layout})).unwrap(),
    );
    assert_eq!(op.image()["name"], "imported-layout");

    // A docker archive (`docker save`), through the CLI.
    let docker = work.path().join("docker.tar");
    img::write_docker_archive(rootfs.path(), busybox_config(), "saved/busybox:2", &docker);
    let out = hangar_cli(
        &server,
        &[
            "images",
            "import",
            docker.to_str().unwrap(),
            "--name",
            "imported-docker",
            "--json",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let docker_image: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(docker_image["name"], "imported-docker");
    let id = server.create(json!({
        "image": img::layout_of(&server, docker_image["id"].as_str().unwrap()),
        "driver": "container",
    }));
    assert_eq!(server.sh(&id, "echo $FROM_IMPORT"), "yes\n");
    server.delete(&id);

    // Not an image: refused with what was wrong.
    let op = img::image_call(
        &server,
        "/v1/images/import",
        "application/x-tar",
        &img::raw_tar(&[("hello.txt", b'0', b"hi")]),
    );
    assert_eq!(op.error_code(), "not_an_image", "{op:?}");
}

/// Everything under `<data>/buildah/tmp` (uploads and contexts being unpacked).
fn leftovers(server: &Server) -> Vec<String> {
    let tmp = server.data.path().join("buildah/tmp");
    std::fs::read_dir(&tmp)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn refused(op: &ImageOp, status: u16, needle: &str) {
    assert_eq!(op.status, status, "{op:?}");
    let msg = op.error_message();
    assert!(msg.contains(needle), "{needle:?} not in {msg:?}");
}

#[test]
fn unsafe_or_bad_uploads_are_refused_and_leave_nothing() {
    img::require_image_tools();
    let server = Server::start_with(&["--max-upload-mib", "1"]);
    let dockerfile: &[u8] = b"FROM scratch\n";
    let build = |name: &str, tar: Vec<u8>| {
        img::image_call(
            &server,
            &format!("/v1/images/build?name={name}"),
            "application/x-tar",
            &tar,
        )
    };
    for (entry, kind, needle) in [
        ("../x", b'0', "../x"),
        ("sub/../../x", b'0', "sub/../../x"),
        ("/etc/hangar-test-abs", b'0', "must be relative"),
        ("dev-node", b'3', "device"),
        ("fifo", b'6', "FIFO"),
    ] {
        let op = build(
            "refused",
            img::raw_tar(&[("Dockerfile", b'0', dockerfile), (entry, kind, b"x")]),
        );
        refused(&op, 400, needle);
    }
    let op = build("refused", img::raw_tar(&[("NotADockerfile", b'0', b"x")]));
    refused(&op, 400, "no Dockerfile");
    let op = build("BadName", img::raw_tar(&[("Dockerfile", b'0', dockerfile)]));
    refused(&op, 400, "invalid image name");
    let big = vec![b'x'; 2 << 20];
    let op = build(
        "big",
        img::raw_tar(&[("Dockerfile", b'0', dockerfile), ("big", b'0', &big)]),
    );
    refused(&op, 413, "limit");
    let op = img::image_call(&server, "/v1/images/import", "application/x-tar", &big);
    refused(&op, 413, "limit");
    let op = img::image_call(
        &server,
        "/v1/images/bootstrap",
        "application/json",
        br#"{"image": "ubuntu:jammy"}"#,
    );
    refused(&op, 400, "only Debian");
    let op = img::image_call(
        &server,
        "/v1/images/bootstrap",
        "application/json",
        br#"{"image": "debian:bookworm", "pakages": ["python3"]}"#,
    );
    refused(&op, 400, "pakages");

    assert!(!server.data.path().join("buildah/x").exists());
    assert!(!server.data.path().join("x").exists());
    assert!(!Path::new("/etc/hangar-test-abs").exists());
    assert_eq!(
        leftovers(&server),
        Vec::<String>::new(),
        "temp files left behind"
    );
    assert!(img::list(&server).is_empty());
}
