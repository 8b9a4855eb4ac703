//! Fixtures for agents and sessions: deploy through the real CLI, call the data plane with
//! curl (headers included), and the test agents in `tests/agents/`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;

use super::Server;

/// The base image every example and test agent builds on (one bootstrap cache for all).
pub const BASE_PACKAGES: [&str; 2] = ["python3", "python3-venv"];

pub struct HResp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HResp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "not JSON ({e}), HTTP {}: {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One HTTP request with curl, returning status, headers and body; with the admin key unless
/// `headers` carry credentials of their own.
pub fn http(
    server: &Server,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> HResp {
    curl(server, method, path, headers, body, true)
}

/// [`http`] without any credentials.
pub fn http_anonymous(
    server: &Server,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> HResp {
    curl(server, method, path, headers, body, false)
}

fn curl(
    server: &Server,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
    admin: bool,
) -> HResp {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "-i", "-X", method, "--max-time", "180"]);
    for (k, v) in headers {
        cmd.args(["-H", &format!("{k}: {v}")]);
    }
    // The admin key, unless the test speaks for itself (another key, a channel token, none).
    if admin
        && !headers.iter().any(|(k, _)| {
            k.eq_ignore_ascii_case("authorization") || k.eq_ignore_ascii_case("x-api-key")
        })
    {
        cmd.args(["-H", &server.auth()]);
    }
    if body.is_some() {
        if !headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        {
            cmd.args(["-H", "content-type: application/json"]);
        }
        cmd.args(["--data-binary", "@-"]);
    }
    cmd.arg(server.url(path))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("curl runs");
    let mut stdin = child.stdin.take().unwrap();
    if let Some(b) = body {
        stdin.write_all(b).unwrap();
    }
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "curl {method} {path} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse_http(&out.stdout)
}

fn parse_http(raw: &[u8]) -> HResp {
    let mut rest = raw;
    loop {
        let end = rest
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("an HTTP head");
        let head = String::from_utf8_lossy(&rest[..end]).into_owned();
        rest = &rest[end + 4..];
        let mut lines = head.lines();
        let status: u16 = lines
            .next()
            .unwrap()
            .split_whitespace()
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        if status == 100 {
            continue;
        }
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_lowercase(), v.trim().to_owned()))
            .collect();
        return HResp {
            status,
            headers,
            body: rest.to_vec(),
        };
    }
}

/// Runs the `hangar` CLI against `server`.
pub fn cli(server: &Server, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hangar"))
        .args(args)
        .env("HANGAR_URL", server.url(""))
        .env("HANGAR_API_KEY", server.key())
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// `hangar deploy DIR --json`, asserting success; the deployed version.
pub fn deploy(server: &Server, dir: &Path, extra: &[&str]) -> Value {
    let mut args = vec!["deploy", dir.to_str().unwrap(), "--json"];
    args.extend_from_slice(extra);
    let out = cli(server, &args);
    assert!(
        out.status.success(),
        "hangar deploy {} failed:\n{}\nserver log:\n{}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr),
        server.log()
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "deploy --json printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

pub fn tests_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests")
}

pub fn repo_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf()
}

/// A copy of the test agent `name` (in `tests/agents/`) with its own `agent.yaml`.
pub fn agent_dir(name: &str, agent_yaml: &str) -> tempfile::TempDir {
    let src = tests_dir().join("agents").join(name);
    let dir = tempfile::Builder::new()
        .prefix("hangar-agent-")
        .tempdir()
        .unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.path().join(e.file_name())).unwrap();
    }
    std::fs::write(dir.path().join("agent.yaml"), agent_yaml).unwrap();
    dir
}

/// `POST /agents/{agent}/responses` with a JSON body, as `user`.
pub fn respond(server: &Server, agent: &str, user: &str, body: &Value) -> HResp {
    http(
        server,
        "POST",
        &format!("/agents/{agent}/responses"),
        &[("x-agent-user-id", user)],
        Some(&serde_json::to_vec(body).unwrap()),
    )
}

/// Polls a session until it reaches `state`, panicking after `secs`.
pub fn wait_state(server: &Server, id: &str, state: &str, secs: u64) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        let r = server.call("GET", &format!("/v1/sessions/{id}"), None);
        let v = r.json();
        if v["state"] == state {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "session {id} did not become {state} in {secs} s: {v}\nserver log:\n{}",
            server.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}
