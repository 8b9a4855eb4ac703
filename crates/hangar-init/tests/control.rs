//! Runs the real `hangar-init` binary as an ordinary process (not PID 1) with its run directory
//! and files root in a temporary directory, and drives its control API over `control.sock`
//! with a real HTTP/1.1 client.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::UnixStream;

const SECRET: &str = "test-secret-123";

/// One running `hangar-init`; stopped with SIGTERM (then SIGKILL) when dropped.
struct Init {
    child: Child,
    dir: tempfile::TempDir,
}

impl Init {
    fn start() -> Init {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        let root = dir.path().join("root");
        std::fs::create_dir_all(&run).unwrap();
        std::fs::create_dir_all(&root).unwrap();
        let config = json!({
            "secret": SECRET,
            "agent": {"argv": ["sleep", "600"]},
            "agent_port": 8088,
            "defaults": {"env": {"FROM_IMAGE": "yes"}, "user": "", "cwd": "/"},
        });
        std::fs::write(run.join("init.json"), config.to_string()).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_hangar-init"))
            .env("HANGAR_RUN_DIR", &run)
            .env("HANGAR_FILES_ROOT", &root)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let init = Init { child, dir };
        init.wait_for(|| init.socket().exists());
        assert!(
            !run.join("init.json").exists(),
            "init.json must be removed after reading"
        );
        init
    }

    fn run_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }
    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }
    fn socket(&self) -> PathBuf {
        self.run_dir().join("control.sock")
    }

    fn wait_for(&self, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill() on the pid of our own child process.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// Sends a request and returns the status and the whole body.
    async fn call(
        &self,
        method: Method,
        uri: &str,
        auth: bool,
        body: impl Into<Bytes>,
    ) -> (StatusCode, Bytes) {
        let stream = UnixStream::connect(self.socket()).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(uri)
            .header("host", "init");
        if auth {
            req = req.header("authorization", format!("Bearer {SECRET}"));
        }
        let resp = sender
            .send_request(req.body(Full::new(body.into())).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        (status, resp.into_body().collect().await.unwrap().to_bytes())
    }

    async fn json(&self, method: Method, uri: &str, body: Value) -> (StatusCode, Value) {
        let (status, bytes) = self.call(method, uri, true, body.to_string()).await;
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    /// Runs an exec and returns (stdout, stderr, exit event).
    async fn exec(&self, req: Value) -> (String, String, Value) {
        let (status, body) = self
            .call(Method::POST, "/exec", true, req.to_string())
            .await;
        assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
        let b64 = base64::engine::general_purpose::STANDARD;
        let (mut out, mut err, mut exit) = (Vec::new(), Vec::new(), Value::Null);
        for line in body.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            let event: Value = serde_json::from_slice(line).unwrap();
            if let Some(s) = event.get("stdout") {
                out.extend(b64.decode(s.as_str().unwrap()).unwrap());
            } else if let Some(s) = event.get("stderr") {
                err.extend(b64.decode(s.as_str().unwrap()).unwrap());
            } else {
                exit = event["exit"].clone();
            }
        }
        (
            String::from_utf8(out).unwrap(),
            String::from_utf8(err).unwrap(),
            exit,
        )
    }
}

impl Drop for Init {
    fn drop(&mut self) {
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn alive(pid: u64) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

#[tokio::test]
async fn control_api() {
    let init = Init::start();

    // Authentication.
    let (status, body) = init.call(Method::GET, "/health", false, "").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["error"]["code"], "unauthorized");

    // The agent runs.
    init.wait_for(|| std::fs::read_dir(init.run_dir()).is_ok());
    let mut agent_pid = 0;
    for _ in 0..100 {
        let (status, health) = init.json(Method::GET, "/health", Value::Null).await;
        assert_eq!(status, StatusCode::OK);
        if health["agent"]["state"] == "running" {
            agent_pid = health["agent"]["pid"].as_u64().unwrap();
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(agent_pid > 0 && alive(agent_pid), "agent never ran");

    // Exec.
    let (out, err, exit) = init.exec(json!({"cmd": ["echo", "hi"]})).await;
    assert_eq!((out.as_str(), err.as_str()), ("hi\n", ""));
    assert_eq!(exit, json!({"exit_code": 0, "timed_out": false}));

    let (out, _, exit) = init
        .exec(
            json!({"cmd": ["sh", "-c", "cat; echo \"$FROM_IMAGE $X $HTTP_PROXY\" >&2; exit 3"],
                      "stdin": "in", "env": {"X": "x"}}),
        )
        .await;
    assert_eq!(out, "in");
    assert_eq!(exit["exit_code"], 3);
    let (_, err, _) = init.exec(json!({"cmd": ["sh", "-c", "echo \"$FROM_IMAGE $X $HTTP_PROXY\" >&2"], "env": {"X": "x"}})).await;
    assert_eq!(err, "yes x http://127.0.0.1:3128\n");

    let (_, _, exit) = init.exec(json!({"cmd": ["sh", "-c", "kill -9 $$"]})).await;
    assert_eq!(exit["exit_code"], 137);

    let (status, body) = init
        .json(
            Method::POST,
            "/exec",
            json!({"cmd": ["no-such-binary-xyz"]}),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"]["code"], "not_found");
    assert_eq!(
        body["error"]["message"],
        "executable not found: \"no-such-binary-xyz\""
    );

    let (status, _) = init
        .json(
            Method::POST,
            "/exec",
            json!({"cmd": ["true"], "cwd": "/no/such/dir"}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, body) = init
        .json(
            Method::POST,
            "/exec",
            json!({"cmd": ["true"], "user": "nosuchuser"}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"]["message"], "unknown user \"nosuchuser\"");

    let started = Instant::now();
    let (_, _, exit) = init
        .exec(json!({"cmd": ["sleep", "30"], "timeout_s": 1}))
        .await;
    assert_eq!(exit, json!({"exit_code": 137, "timed_out": true}));
    assert!(started.elapsed() < Duration::from_secs(5));

    // A background job holding the pipes does not hold the exec open.
    let started = Instant::now();
    let (out, _, exit) = init
        .exec(json!({"cmd": ["sh", "-c", "sleep 5 & echo started"]}))
        .await;
    assert_eq!(
        (out.as_str(), exit["exit_code"].as_i64()),
        ("started\n", Some(0))
    );
    assert!(started.elapsed() < Duration::from_secs(2));

    // Round trip of `true`.
    let started = Instant::now();
    for _ in 0..20 {
        init.exec(json!({"cmd": ["true"]})).await;
    }
    eprintln!("exec of true: {:?} per round trip", started.elapsed() / 20);

    // Files.
    let (status, entry) = init
        .json(Method::POST, "/files/mkdir?path=/work/sub", Value::Null)
        .await;
    assert_eq!(
        (status, entry["type"].as_str()),
        (StatusCode::OK, Some("dir"))
    );
    let (status, body) = init
        .call(
            Method::PUT,
            "/files/content?path=/work/sub/a.txt",
            true,
            "hello",
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let entry: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        (entry["name"].as_str(), entry["size"].as_u64()),
        (Some("a.txt"), Some(5))
    );
    assert_eq!(
        std::fs::read_to_string(init.root().join("work/sub/a.txt")).unwrap(),
        "hello"
    );
    let (status, body) = init
        .call(Method::GET, "/files/content?path=/work/sub/a.txt", true, "")
        .await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"hello"[..]));
    let (status, stat) = init
        .json(Method::GET, "/files?path=/work", Value::Null)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(stat["type"], "dir");
    assert_eq!(stat["entries"][0]["name"], "sub");
    let (status, _) = init
        .call(Method::GET, "/files/content?path=/work", true, "")
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    let (status, body) = init
        .json(Method::GET, "/files?path=/work/../etc", Value::Null)
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_path"))
    );
    let (status, _) = init
        .call(Method::GET, "/files/content?path=/run/hangar/x", true, "")
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = init
        .call(Method::DELETE, "/files/content?path=/work", true, "")
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    let (status, _) = init
        .call(
            Method::DELETE,
            "/files/content?path=/work&recursive=true",
            true,
            "",
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert!(!init.root().join("work").exists());
    let (status, _) = init
        .call(Method::DELETE, "/files/content?path=/work", true, "")
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = init
        .call(Method::GET, "/files/content?path=/work/sub/a.txt", true, "")
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Suspend lets go of every socket in the run directory; SIGUSR2 binds them again.
    let (status, body) = init.json(Method::POST, "/suspend", Value::Null).await;
    assert_eq!((status, body), (StatusCode::OK, json!({})));
    assert!(!init.socket().exists());
    let run = init.run_dir().display().to_string();
    init.wait_for(|| {
        !std::fs::read_to_string("/proc/net/unix")
            .unwrap()
            .contains(&run)
    });
    init.signal(libc::SIGUSR2);
    init.wait_for(|| init.socket().exists());
    let (status, _) = init.json(Method::GET, "/health", Value::Null).await;
    assert_eq!(status, StatusCode::OK);

    // SIGTERM stops the agent too.
    drop(init);
    let deadline = Instant::now() + Duration::from_secs(5);
    while alive(agent_pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!alive(agent_pid), "agent survived shutdown");
}
