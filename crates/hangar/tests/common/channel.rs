//! The fake Bot Framework channel / OIDC provider (`tests/py/fake_channel.py`) on loopback,
//! for the protocol and identity tests.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::agents::tests_dir;
use super::{venv_python, Server};

/// The bot's app id the fake channel's tokens are for, in the tests.
pub const APP_ID: &str = "11111111-2222-3333-4444-555555555555";

/// The fake Bot Framework channel, stopped when dropped.
pub struct Channel {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Channel {
    pub fn start() -> Channel {
        let dir = tempfile::tempdir().unwrap();
        let port_file = dir.path().join("port");
        let child = Command::new(venv_python())
            .arg(tests_dir().join("py/fake_channel.py"))
            .arg(&port_file)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let port = loop {
            if let Ok(p) = std::fs::read_to_string(&port_file) {
                break p.trim().parse().unwrap();
            }
            assert!(Instant::now() < deadline, "fake_channel.py did not start");
            std::thread::sleep(Duration::from_millis(50));
        };
        Channel {
            child,
            port,
            _dir: dir,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn curl(&self, method: &str, path: &str, body: Option<&Value>) -> Value {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--max-time", "30", "-X", method, &self.url(path)]);
        if let Some(b) = body {
            cmd.args(["-H", "content-type: application/json", "-d", &b.to_string()]);
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success());
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// A channel token; `claims` adjusts it (aud, serviceurl, iss, exp_in, alg, key).
    pub fn token(&self, claims: Value) -> String {
        self.curl("POST", "/sign", Some(&claims))["token"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    pub fn recorded(&self) -> Vec<Value> {
        self.curl("GET", "/recorded", None)
            .as_array()
            .unwrap()
            .clone()
    }

    /// Waits for `n` replies to reach the connector.
    pub fn replies(&self, n: usize, server: &Server) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let replies: Vec<Value> = self
                .recorded()
                .into_iter()
                .filter(|r| r["kind"] == "reply")
                .collect();
            if replies.len() >= n {
                return replies;
            }
            assert!(
                Instant::now() < deadline,
                "the connector got {} replies, not {n}: {replies:#?}\nserver log:\n{}",
                replies.len(),
                server.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `channels.activity` for an agent.yaml, pointing at this channel.
    pub fn yaml(&self, extra: &str) -> String {
        format!(
            "channels:\n  activity:\n    app_id: \"{APP_ID}\"\n    openid_metadata: {}\n    token_endpoint: {}\n{extra}",
            self.url("/openid"),
            self.url("/token")
        )
    }
}

impl Drop for Channel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
