//! Test fixtures: a real `hangar serve` on a random port with its own data directory, a real
//! HTTP client (curl), and a busybox root filesystem to run. Everything a fixture creates is
//! removed when it is dropped.

#![allow(dead_code)]

pub mod agents;
pub mod channel;
pub mod images;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Fails (never skips) with what to install when a test needs something missing.
pub fn require(program: &str, package: &str) {
    let found = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .any(|d| d.join(program).is_file());
    assert!(found, "this test needs `{program}`: apt-get install {package} (or run scripts/install-host-deps.sh)");
}

/// The `vm` driver's needs: QEMU, mkfs.erofs and the guest kernel the install script fetches.
#[allow(dead_code)]
pub fn require_vm() {
    require("qemu-system-x86_64", "qemu-system-x86");
    require("mkfs.erofs", "erofs-utils");
    assert!(
        Path::new("/var/lib/hangar/vm/kernels/current/vmlinuz").is_file(),
        "this test needs the vm driver's guest kernel: run scripts/install-host-deps.sh"
    );
}

pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root (sandboxes need mounts, namespaces and cgroups); run it as root"
    );
}

fn bin_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_hangar"))
        .parent()
        .unwrap()
        .to_path_buf()
}

pub fn init_binary() -> PathBuf {
    let p = bin_dir().join("hangar-init");
    assert!(
        p.is_file(),
        "{} is missing: run `cargo build --workspace --bins` first (scripts/test.sh does)",
        p.display()
    );
    p
}

/// A busybox root filesystem in a temp dir, with passwd/group and a non-root user.
pub struct Rootfs {
    pub dir: tempfile::TempDir,
}

impl Rootfs {
    pub fn busybox() -> Rootfs {
        require("busybox", "busybox-static");
        let busybox = ["/bin/busybox", "/usr/bin/busybox"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .unwrap();
        let dir = tempfile::Builder::new()
            .prefix("hangar-rootfs-")
            .tempdir()
            .unwrap();
        let root = dir.path();
        for d in [
            "bin",
            "etc",
            "tmp",
            "root",
            "home/agent",
            "proc",
            "sys",
            "dev",
            "run",
        ] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        std::fs::copy(busybox, root.join("bin/busybox")).unwrap();
        let list = Command::new(root.join("bin/busybox"))
            .arg("--list")
            .output()
            .unwrap();
        for name in String::from_utf8_lossy(&list.stdout).lines() {
            if name != "busybox" {
                std::os::unix::fs::symlink("busybox", root.join("bin").join(name)).unwrap();
            }
        }
        std::fs::write(
            root.join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\nagent:x:1000:1000:agent:/home/agent:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(root.join("etc/group"), "root:x:0:\nagent:x:1000:\n").unwrap();
        std::fs::set_permissions(
            root.join("tmp"),
            std::os::unix::fs::PermissionsExt::from_mode(0o1777),
        )
        .unwrap();
        Command::new("chown")
            .args(["1000:1000"])
            .arg(root.join("home/agent"))
            .status()
            .unwrap();
        Rootfs { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

pub struct Server {
    pub data: tempfile::TempDir,
    pub port: u16,
    child: Option<Child>,
    extra: Vec<String>,
    env: Vec<(String, String)>,
}

pub struct Resp {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

impl Server {
    pub fn start() -> Server {
        Server::start_with(&[])
    }

    pub fn start_with(extra: &[&str]) -> Server {
        Server::start_with_env(extra, &[])
    }

    /// `hangar serve` with extra flags and environment variables.
    pub fn start_with_env(extra: &[&str], env: &[(&str, &str)]) -> Server {
        require_root();
        require("curl", "curl");
        require("mkfs.ext4", "e2fsprogs");
        let data = tempfile::Builder::new()
            .prefix("hangar-data-")
            .tempdir()
            .unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut s = Server {
            data,
            port,
            child: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.data.path().join("serve.log"))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_hangar"))
            .args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{}", self.port),
                "--data-dir",
            ])
            .arg(self.data.path())
            .arg("--init")
            .arg(init_binary())
            .args(&self.extra)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", "info,hangar_sandbox=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self
                .try_call("GET", "/healthz", None)
                .is_some_and(|r| r.status == 200)
            {
                return;
            }
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("hangar serve exited ({st}):\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("hangar serve did not answer /healthz:\n{}", self.log());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data.path().join("serve.log")).unwrap_or_default()
    }

    /// The admin API key `hangar serve` made in its data directory.
    pub fn key(&self) -> String {
        std::fs::read_to_string(self.data.path().join("admin-key"))
            .unwrap_or_else(|e| panic!("no admin-key in the data directory: {e}\n{}", self.log()))
            .trim()
            .to_owned()
    }

    /// `Authorization: …` with the admin key, for curl's `-H`.
    pub fn auth(&self) -> String {
        format!("authorization: Bearer {}", self.key())
    }

    /// Kills the server abruptly (sandboxes keep running) and starts it again.
    pub fn restart(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.spawn();
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn try_call(&self, method: &str, path: &str, body: Option<&[u8]>) -> Option<Resp> {
        let mut cmd = Command::new("curl");
        cmd.args([
            "-sS",
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
            "-X",
            method,
            "--max-time",
            "120",
        ]);
        if body.is_some() {
            cmd.args([
                "-H",
                "content-type: application/json",
                "--data-binary",
                "@-",
            ]);
        }
        if path != "/healthz" {
            cmd.args(["-H", &self.auth()]);
        }
        cmd.arg(self.url(path))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = cmd.spawn().ok()?;
        let mut stdin = child.stdin.take().unwrap();
        if let Some(b) = body {
            stdin.write_all(b).ok()?;
        }
        drop(stdin);
        let out = child.wait_with_output().ok()?;
        if !out.status.success() {
            return None;
        }
        let pos = out.stdout.iter().rposition(|&b| b == b'\n')?;
        let status = std::str::from_utf8(&out.stdout[pos + 1..])
            .ok()?
            .trim()
            .parse()
            .ok()?;
        Some(Resp {
            status,
            body: out.stdout[..pos].to_vec(),
        })
    }

    pub fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Resp {
        let bytes = body.map(|b| serde_json::to_vec(b).unwrap());
        self.try_call(method, path, bytes.as_deref())
            .unwrap_or_else(|| panic!("{method} {path} failed to connect"))
    }

    pub fn raw(&self, method: &str, path: &str, body: &[u8]) -> Resp {
        self.try_call(method, path, Some(body))
            .unwrap_or_else(|| panic!("{method} {path} failed to connect"))
    }

    /// Creates a sandbox and returns its id, panicking with the server's answer on failure.
    pub fn create(&self, body: Value) -> String {
        let r = self.call("POST", "/v1/sandboxes", Some(&body));
        assert_eq!(
            r.status,
            201,
            "create failed: {}\nserver log:\n{}",
            r.text(),
            self.log()
        );
        r.json()["id"].as_str().unwrap().to_string()
    }

    pub fn exec(&self, id: &str, cmd: &[&str]) -> Value {
        let r = self.call(
            "POST",
            &format!("/v1/sandboxes/{id}/exec"),
            Some(&json!({"cmd": cmd})),
        );
        assert_eq!(r.status, 200, "exec {cmd:?} failed: {}", r.text());
        r.json()
    }

    /// Runs `sh -c script` and returns stdout, asserting exit 0.
    pub fn sh(&self, id: &str, script: &str) -> String {
        let v = self.exec(id, &["sh", "-c", script]);
        assert_eq!(v["exit_code"], 0, "{script:?} failed: {v}");
        v["stdout"].as_str().unwrap().to_string()
    }

    pub fn delete(&self, id: &str) {
        let r = self.call("DELETE", &format!("/v1/sandboxes/{id}"), None);
        assert_eq!(r.status, 204, "delete failed: {}", r.text());
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Delete whatever the test left so that nothing outlives it.
        if let Some(r) = self.try_call("GET", "/v1/sandboxes", None) {
            if let Ok(v) = serde_json::from_slice::<Value>(&r.body) {
                for sb in v["sandboxes"].as_array().cloned().unwrap_or_default() {
                    let _ = self.try_call(
                        "DELETE",
                        &format!("/v1/sandboxes/{}", sb["id"].as_str().unwrap_or("")),
                        None,
                    );
                }
            }
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Everything a deleted sandbox must not leave behind: its directory, its mounts, its
/// runtime state, its cgroups and its processes.
pub fn assert_nothing_left(server: &Server, id: &str) {
    assert!(
        !server.data.path().join("sandboxes").join(id).exists(),
        "sandbox directory left behind"
    );
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(id),
        "mounts left behind:\n{}",
        mounts
            .lines()
            .filter(|l| l.contains(id))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // No QEMU: its command line names the sandbox (`-name hangar-<id>`), caught below.
    for root in ["/run/hangar-crun", "/run/hangar-runsc"] {
        assert!(
            !Path::new(root).join(id).exists(),
            "runtime state left in {root}"
        );
    }
    for cg in ["cpu/hangar-vm", "memory/hangar-vm", "hangar-vm"] {
        let dir = Path::new("/sys/fs/cgroup")
            .join(cg)
            .join(format!("hangar-{id}"));
        assert!(!dir.exists(), "VM cgroup {} left behind", dir.display());
    }
    for cg in ["memory", "pids", "cpu"] {
        assert!(
            !Path::new("/sys/fs/cgroup")
                .join(cg)
                .join("hangar")
                .join(id)
                .exists(),
            "{cg} cgroup left behind"
        );
    }
    let ps = Command::new("ps").args(["-eo", "args"]).output().unwrap();
    let ps = String::from_utf8_lossy(&ps.stdout);
    assert!(
        !ps.lines().any(|l| l.contains(id)),
        "processes left behind:\n{}",
        ps.lines()
            .filter(|l| l.contains(id))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// The tests' Python venv (the `openai` and AG-UI SDKs, PyJWT), made once and reused.
pub fn venv_python() -> PathBuf {
    let out = Command::new("sh")
        .arg(agents::tests_dir().join("py/setup-venv.sh"))
        .output()
        .expect("sh runs");
    assert!(
        out.status.success(),
        "creating the tests' Python venv failed (needs python3-venv: apt-get install python3-venv, \
         and PyPI): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("bin/python")
}
