//! The dashboard at `/ui` in a real browser: a real `hangar serve`, a gVisor agent with two
//! versions and two users' sessions, and Debian's headless Chromium driven by Playwright
//! (`py/dashboard.py`), which signs in, reads the fleet, changes the traffic split in the
//! editor, tails a session's log live and browses its files. Screenshots are left in
//! `target/test-artifacts/ui/`.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use serde_json::{json, Value};

use common::agents::{
    agent_dir, deploy, http, http_anonymous, repo_dir, respond, tests_dir, BASE_PACKAGES,
};
use common::images::debian_base;
use common::{venv_python, Server};

const CHROMIUM: &str = "/usr/bin/chromium";

fn yaml(variant: u32) -> String {
    format!(
        "name: dash\ndescription: Keeps a note per request\nbuild: {{ dockerfile: Dockerfile }}\n\
         isolation: gvisor\nresources: {{ cpus: 1, memory: 256Mi, disk: 64Mi }}\n\
         startup_timeout: 60s\nenv: {{ VARIANT: \"{variant}\" }}\n"
    )
}

fn traffic(server: &Server) -> Value {
    let r = server.call("GET", "/v1/agents/dash/traffic", None);
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["weights"].clone()
}

#[test]
fn dashboard_in_headless_chromium() {
    assert!(
        Path::new(CHROMIUM).is_file(),
        "this test drives Debian's Chromium at {CHROMIUM}: apt-get install chromium \
         (or run scripts/install-host-deps.sh)"
    );
    let server = Server::start();

    // The shell is public and locked down; the data behind it is not public.
    let r = http_anonymous(&server, "GET", "/ui/", &[], None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("text/html; charset=utf-8"));
    assert!(r
        .header("content-security-policy")
        .is_some_and(|c| c.starts_with("default-src 'self'")));
    assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
    assert_eq!(r.header("cache-control"), Some("no-cache"));
    let r = http_anonymous(&server, "GET", "/ui/nope.js", &[], None);
    assert_eq!(r.status, 404);
    let r = http_anonymous(&server, "GET", "/v1/stats", &[], None);
    assert_eq!(r.status, 401, "{}", r.text());
    // Fleet statistics are for deployers and admins, and not for a caller acting as a user.
    let r = server.call(
        "POST",
        "/v1/keys",
        Some(&json!({"name": "an app", "role": "invoker"})),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let invoker = format!("Bearer {}", r.json()["key"].as_str().unwrap());
    let r = http(
        &server,
        "GET",
        "/v1/stats",
        &[("authorization", &invoker)],
        None,
    );
    assert_eq!(r.status, 403, "{}", r.text());
    let r = http(
        &server,
        "GET",
        "/v1/stats",
        &[("x-agent-user-id", "alice")],
        None,
    );
    assert_eq!(r.status, 403, "{}", r.text());

    // Two versions of an agent; the second takes no traffic yet.
    debian_base(&server, &BASE_PACKAGES);
    let dir = agent_dir("dash", &yaml(1));
    deploy(&server, dir.path(), &[]);
    std::fs::write(dir.path().join("agent.yaml"), yaml(2)).unwrap();
    deploy(&server, dir.path(), &[]);
    assert_eq!(traffic(&server), json!({"1": 100, "2": 0}));

    // Alice's session with a few requests, and one of Bob's.
    let r = respond(&server, "dash", "alice", &json!({"input": "first"}));
    assert_eq!(r.status, 200, "{}\n{}", r.text(), server.log());
    let session = r.header("x-agent-session-id").unwrap().to_owned();
    for i in 0..4 {
        let body = json!({"input": format!("note {i}"), "agent_session_id": session});
        let r = respond(&server, "dash", "alice", &body);
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let r = respond(&server, "dash", "bob", &json!({"input": "hello"}));
    assert_eq!(r.status, 200, "{}", r.text());
    let r = server.call("GET", "/v1/stats?agent=dash", None);
    assert_eq!(r.status, 200, "{}", r.text());
    let stats = r.json();
    let v1 = stats["agents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["version"] == 1)
        .unwrap_or_else(|| panic!("no figures for dash v1: {stats}"));
    assert_eq!(v1["requests"], 6, "{stats}");
    assert!(v1["p50_ms"].as_f64().unwrap() > 0.0, "{stats}");
    assert_eq!(stats["total"]["series"].as_array().unwrap().len(), 60);

    // The browser.
    let out = repo_dir().join("target/test-artifacts/ui");
    std::fs::create_dir_all(&out).unwrap();
    for shot in [
        "fleet.png",
        "agent.png",
        "session.png",
        "trace.png",
        "failure.png",
    ] {
        let _ = std::fs::remove_file(out.join(shot));
    }
    let started = Instant::now();
    let run = Command::new(venv_python())
        .arg(tests_dir().join("py/dashboard.py"))
        .args(["--url", &server.url("/ui/")])
        .args(["--key", &server.key()])
        .args(["--agent", "dash", "--session", &session])
        .args(["--user", "alice", "--other-user", "bob"])
        .args(["--log-line", "dash-agent v1 served request #1 input=first"])
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        run.status.success(),
        "the dashboard driver failed (screenshots in {}):\n{stderr}\n{stdout}\nserver log:\n{}",
        out.display(),
        server.log()
    );
    eprintln!(
        "dashboard driver: {:.1} s: {stdout}",
        started.elapsed().as_secs_f64()
    );
    let done: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert!(done["latency_chart"]["points"].as_u64().unwrap() >= 3);
    // The first request's trace: invoke_agent, create_session, start_sandbox and the call.
    assert!(done["trace_spans"].as_u64().unwrap() >= 4, "{done}");
    assert!(done["timeline_events"].as_u64().unwrap() >= 2, "{done}");

    // The editor's save is the API's truth.
    assert_eq!(traffic(&server), json!({"1": 30, "2": 70}));
    for shot in ["fleet.png", "agent.png", "session.png", "trace.png"] {
        let meta = std::fs::metadata(out.join(shot))
            .unwrap_or_else(|e| panic!("no screenshot {shot}: {e}"));
        assert!(meta.len() > 10_000, "{shot} is {} bytes", meta.len());
    }
}
