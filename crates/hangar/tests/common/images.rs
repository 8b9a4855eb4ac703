//! Image fixtures: calls to `/v1/images` (NDJSON answers), a Debian base image bootstrapped
//! through the API (fast after the first time on a host, thanks to the bootstrap cache), builds
//! of a directory, and hand-made OCI layouts and archives.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{json, Value};

use super::{require, Server};

/// The answer to an image operation: the HTTP status, the progress lines, and the final
/// `image` or `error` object (or, for a 4xx/5xx before the stream, the error body's `error`).
#[derive(Debug)]
pub struct ImageOp {
    pub status: u16,
    pub progress: Vec<String>,
    pub image: Option<Value>,
    pub error: Option<Value>,
}

impl ImageOp {
    /// The image, or a panic showing the error and the last progress lines.
    pub fn image(&self) -> &Value {
        self.image.as_ref().unwrap_or_else(|| {
            panic!(
                "image operation failed (HTTP {}): {}\nprogress (last 40 lines):\n{}",
                self.status,
                self.error
                    .as_ref()
                    .map(|e| e.to_string())
                    .unwrap_or_default(),
                self.progress[self.progress.len().saturating_sub(40)..].join("\n")
            )
        })
    }

    /// The error's message, or a panic if the operation succeeded.
    pub fn error_message(&self) -> String {
        let e = self
            .error
            .as_ref()
            .unwrap_or_else(|| panic!("expected an error, got {:?}", self.image));
        e["message"].as_str().unwrap_or_default().to_string()
    }

    pub fn error_code(&self) -> String {
        self.error
            .as_ref()
            .map(|e| e["code"].as_str().unwrap_or_default().to_string())
            .unwrap_or_default()
    }
}

/// Fails (never skips) unless the tools an image build needs are installed.
pub fn require_image_tools() {
    require("buildah", "buildah");
    require("tar", "tar");
}

/// POSTs `body` to an image endpoint and reads the NDJSON answer to its end.
pub fn image_call(server: &Server, path: &str, content_type: &str, body: &[u8]) -> ImageOp {
    let mut child = Command::new("curl")
        .args([
            "-sS",
            "-N",
            "--max-time",
            "900",
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
        ])
        .args(["-X", "POST", "-H"])
        .arg(format!("content-type: {content_type}"))
        .args(["-H", &server.auth()])
        .args(["--data-binary", "@-"])
        .arg(server.url(path))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("curl runs");
    let mut stdin = child.stdin.take().unwrap();
    let body = body.to_vec();
    let writer = std::thread::spawn(move || {
        // The server may refuse the upload before reading all of it.
        let _ = stdin.write_all(&body);
    });
    let out = child.wait_with_output().unwrap();
    let _ = writer.join();
    assert!(
        out.status.success(),
        "curl POST {path} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').unwrap();
    let status: u16 = status.trim().parse().unwrap();
    let mut op = ImageOp {
        status,
        progress: Vec::new(),
        image: None,
        error: None,
    };
    if status != 200 {
        let v: Value = serde_json::from_str(body)
            .unwrap_or_else(|e| panic!("HTTP {status} with a non-JSON body ({e}): {body}"));
        op.error = Some(v["error"].clone());
        return op;
    }
    for line in body.lines().filter(|l| !l.trim().is_empty()) {
        let v: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not an NDJSON line ({e}): {line}"));
        if let Some(p) = v.get("progress") {
            op.progress.push(p.as_str().unwrap_or_default().to_string());
        } else if let Some(i) = v.get("image") {
            op.image = Some(i.clone());
        } else if let Some(e) = v.get("error") {
            op.error = Some(e.clone());
        } else {
            panic!("unexpected line: {line}");
        }
    }
    assert!(
        op.image.is_some() != op.error.is_some(),
        "the stream must end with exactly one image or error: {body}"
    );
    op
}

/// Bootstraps `debian:bookworm` with `packages` through the API (cached host-wide after the
/// first time) and returns its `ImageInfo`.
pub fn debian_base(server: &Server, packages: &[&str]) -> Value {
    require_image_tools();
    require("debootstrap", "debootstrap");
    let body = json!({"image": "debian:bookworm", "packages": packages});
    let op = image_call(
        server,
        "/v1/images/bootstrap",
        "application/json",
        &serde_json::to_vec(&body).unwrap(),
    );
    op.image().clone()
}

/// A tar of `dir` (its contents at the archive's top).
pub fn tar_dir(dir: &Path) -> Vec<u8> {
    let out = Command::new("tar")
        .arg("-C")
        .arg(dir)
        .args(["-cf", "-", "."])
        .output()
        .expect("tar runs");
    assert!(
        out.status.success(),
        "tar: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Builds the context directory `dir` (with its `Dockerfile`) as `name` through the API.
pub fn build(server: &Server, dir: &Path, name: &str) -> ImageOp {
    require_image_tools();
    image_call(
        server,
        &format!("/v1/images/build?name={name}"),
        "application/x-tar",
        &tar_dir(dir),
    )
}

/// Writes `files` (path → content) into a new temp directory: a build context.
pub fn context(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("hangar-context-")
        .tempdir()
        .unwrap();
    for (path, content) in files {
        let p = dir.path().join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    }
    dir
}

/// The OCI layout directory of a stored image (what `POST /v1/sandboxes` takes as `image`):
/// the layout under `<data>/images/oci` whose manifest digest is the image id.
pub fn layout_of(server: &Server, image_id: &str) -> PathBuf {
    let oci = server.data.path().join("images/oci");
    for e in std::fs::read_dir(&oci).unwrap().flatten() {
        let index = e.path().join("index.json");
        let Ok(text) = std::fs::read_to_string(&index) else {
            continue;
        };
        let v: Value = serde_json::from_str(&text).unwrap();
        if v["manifests"][0]["digest"] == image_id {
            return e.path();
        }
    }
    panic!("no OCI layout for {image_id} under {}", oci.display());
}

/// The images `GET /v1/images` lists.
pub fn list(server: &Server) -> Vec<Value> {
    let r = server.call("GET", "/v1/images", None);
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["images"].as_array().cloned().unwrap_or_default()
}

fn sha256_hex(bytes: &[u8]) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("sha256sum runs");
    let mut stdin = child.stdin.take().unwrap();
    let data = bytes.to_vec();
    let w = std::thread::spawn(move || stdin.write_all(&data));
    let out = child.wait_with_output().unwrap();
    w.join().unwrap().unwrap();
    String::from_utf8_lossy(&out.stdout)[..64].to_string()
}

/// Writes an OCI image layout with one uncompressed layer (the tar of `rootfs`) and `config`
/// (the image config's `config` object) into `dir`.
pub fn write_oci_layout(rootfs: &Path, config: Value, dir: &Path) {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |bytes: &[u8]| -> String {
        let hex = sha256_hex(bytes);
        std::fs::write(blobs.join(&hex), bytes).unwrap();
        format!("sha256:{hex}")
    };
    let layer = tar_dir(rootfs);
    let layer_digest = put(&layer);
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    }))
    .unwrap();
    let config_digest = put(&config);
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest, "size": layer.len()}],
    }))
    .unwrap();
    let manifest_digest = put(&manifest);
    std::fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest_digest, "size": manifest.len()}],
        }))
        .unwrap(),
    )
    .unwrap();
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
}

/// A `docker save` style archive of the same single-layer image.
pub fn write_docker_archive(rootfs: &Path, config: Value, tag: &str, out: &Path) {
    let work = tempfile::tempdir().unwrap();
    let layer = tar_dir(rootfs);
    let layer_hex = sha256_hex(&layer);
    std::fs::create_dir(work.path().join(&layer_hex)).unwrap();
    std::fs::write(work.path().join(&layer_hex).join("layer.tar"), &layer).unwrap();
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{layer_hex}")]},
    }))
    .unwrap();
    let config_hex = sha256_hex(&config);
    std::fs::write(work.path().join(format!("{config_hex}.json")), &config).unwrap();
    std::fs::write(
        work.path().join("manifest.json"),
        serde_json::to_vec(&json!([{
            "Config": format!("{config_hex}.json"),
            "RepoTags": [tag],
            "Layers": [format!("{layer_hex}/layer.tar")],
        }]))
        .unwrap(),
    )
    .unwrap();
    std::fs::write(out, tar_dir(work.path())).unwrap();
}

/// A tar with one entry whose name is written as given, `..` and all (tar tools refuse to
/// write such archives). `kind`: b'0' file, b'3' char device, b'6' FIFO.
pub fn raw_tar(entries: &[(&str, u8, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, kind, data) in entries {
        let mut h = [0u8; 512];
        h[..name.len()].copy_from_slice(name.as_bytes());
        h[100..107].copy_from_slice(b"0000644");
        h[108..115].copy_from_slice(b"0000000");
        h[116..123].copy_from_slice(b"0000000");
        h[124..135].copy_from_slice(format!("{:011o}", data.len()).as_bytes());
        h[136..147].copy_from_slice(b"00000000000");
        h[156] = *kind;
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|&b| b as u32).sum();
        h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
        out.extend_from_slice(&h);
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.resize(out.len() + 1024, 0);
    out
}

/// Builds `dir` as `name` and returns the image's id and its OCI layout directory (what
/// `POST /v1/sandboxes` takes as `image`), panicking with the build's output on failure.
pub fn build_layout(server: &Server, dir: &Path, name: &str) -> (String, PathBuf) {
    let op = build(server, dir, name);
    let id = op.image()["id"].as_str().unwrap().to_string();
    let layout = layout_of(server, &id);
    (id, layout)
}
