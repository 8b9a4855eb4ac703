//! The example agents, deployed from `examples/` with the real CLI and driven with the real
//! `openai` Python SDK through Hangar's stable endpoint.

mod common;

use std::process::Command;

use serde_json::{json, Value};

use common::agents::{cli, deploy, http, repo_dir, tests_dir, wait_state, BASE_PACKAGES};
use common::images::debian_base;
use common::{venv_python, Server};

/// Runs a client script from `tests/py` and returns the JSON line it prints last.
fn py(server: &Server, script: &str, args: &[&str]) -> Value {
    let out = Command::new(venv_python())
        .arg(tests_dir().join("py").join(script))
        .args(args)
        .env("HANGAR_API_KEY", server.key())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script} {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or(""))
        .unwrap_or_else(|e| panic!("{script} printed no JSON summary ({e}):\n{stdout}"))
}

#[test]
fn notes_through_the_openai_sdk_keeps_its_notes_across_suspension() {
    let server = Server::start();
    debian_base(&server, &BASE_PACKAGES);
    let v = deploy(&server, &repo_dir().join("examples/notes"), &[]);
    assert_eq!(v["version"]["number"], 1);
    let base = server.url("/agents/notes");

    // responses.create, responses.stream and previous_response_id, all in one session.
    let alice = py(
        &server,
        "openai_notes.py",
        &[&base, "--user", "alice", "--expect-fresh", "--tag", "a"],
    );
    let session = alice["session_id"].as_str().unwrap().to_owned();
    assert!(session.starts_with("sess_"), "{alice}");
    for s in alice["session_ids"].as_array().unwrap() {
        assert_eq!(
            s,
            &json!(session),
            "every request landed in the same session: {alice}"
        );
    }
    // SSE through the gateway: strict event order, sequence numbers, [DONE], and not buffered.
    let sse = py(
        &server,
        "check_sse.py",
        &[
            &base,
            "--delay-ms",
            "150",
            "--header",
            "x-agent-user-id: alice",
            "--header",
            &format!("x-agent-session-id: {session}"),
        ],
    );
    assert_eq!(sse["ok"], true);

    // Another user starts from nothing: their own session.
    let bob = py(
        &server,
        "openai_notes.py",
        &[&base, "--user", "bob", "--expect-fresh", "--tag", "b"],
    );
    assert_ne!(bob["session_id"], alice["session_id"]);

    // Suspend alice's session; the next message resumes it, and the notes are still there.
    let out = cli(&server, &["sessions", "suspend", &session]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_state(&server, &session, "suspended", 5);
    let out = cli(
        &server,
        &[
            "invoke",
            "notes",
            "what are my notes?",
            "--session",
            &session,
            "--user",
            "alice",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer = String::from_utf8_lossy(&out.stdout);
    for note in alice["notes"].as_array().unwrap() {
        assert!(
            answer.contains(note.as_str().unwrap()),
            "{note} missing from {answer:?}"
        );
    }
    assert!(
        !answer.contains("b-"),
        "bob's notes leaked into alice's: {answer}"
    );
    let s = server
        .call("GET", &format!("/v1/sessions/{session}"), None)
        .json();
    assert_eq!(s["state"], "idle", "{s}");
    // The notes file is in the session's workspace.
    let r = http(
        &server,
        "GET",
        &format!("/v1/sessions/{session}/files/content?path=/root/notes.txt"),
        &[("x-agent-user-id", "alice")],
        None,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.text().lines().count(),
        alice["notes"].as_array().unwrap().len()
    );
}

#[test]
fn foundry_echo_runs_unmodified_behind_the_gateway() {
    let server = Server::start();
    debian_base(&server, &BASE_PACKAGES);
    deploy(&server, &repo_dir().join("examples/foundry-echo"), &[]);
    let base = server.url("/agents/foundry-echo");
    let r = py(
        &server,
        "openai_echo.py",
        &[&base, "--user", "alice", "--same-session"],
    );
    assert_eq!(r["ok"], true, "{r}");
    let sessions = r["session_ids"].as_array().unwrap();
    assert!(sessions[0].as_str().unwrap().starts_with("sess_"), "{r}");
    assert_eq!(sessions[0], sessions[1]);

    // The conformance suite passes: the agent sends no `[DONE]` (the Foundry package does
    // not), which Hangar's endpoint adds, and `hangar check` says so as a warning.
    let out = cli(&server, &["check", "foundry-echo"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "hangar check foundry-echo failed:\n{text}"
    );
    assert!(text.contains("Hangar's endpoint adds it"), "{text}");
}
