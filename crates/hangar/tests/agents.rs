//! Agents, versions, sessions and the data plane, end to end: the real CLI deploys a real
//! Dockerfile (buildah) onto a real `hangar serve`; requests go through curl or a raw TCP
//! client to an agent in a gVisor or crun sandbox.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use common::agents::{agent_dir, cli, deploy, http, respond, wait_state, BASE_PACKAGES};
use common::images::debian_base;
use common::Server;

fn probe_yaml(extra: &str) -> String {
    format!(
        "name: probe\nbuild: {{ dockerfile: Dockerfile }}\nresources: {{ cpus: 1, memory: 256Mi, disk: 64Mi }}\nstartup_timeout: 60s\nenv: {{ GREETING: hello }}\n{extra}"
    )
}

/// The probe's report of itself, from a JSON `/responses` answer.
fn probe(r: &common::agents::HResp) -> Value {
    assert_eq!(r.status, 200, "HTTP {}: {}", r.status, r.text());
    r.json()["probe"].clone()
}

fn session_of(r: &common::agents::HResp) -> String {
    r.header("x-agent-session-id")
        .unwrap_or_else(|| panic!("no x-agent-session-id on HTTP {}: {}", r.status, r.text()))
        .to_owned()
}

/// Sends `req` over a fresh TCP connection and returns what came back with the time each
/// chunk arrived.
fn raw_exchange(server: &Server, req: &[u8]) -> Vec<(Duration, Vec<u8>)> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let t0 = Instant::now();
    s.write_all(req).unwrap();
    let mut chunks = vec![];
    let mut buf = [0u8; 65536];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => chunks.push((t0.elapsed(), buf[..n].to_vec())),
            Err(e) => panic!("reading the answer: {e}"),
        }
    }
    chunks
}

#[test]
fn data_plane_routes_streams_and_relays_every_endpoint() {
    let server = Server::start();
    debian_base(&server, &BASE_PACKAGES);
    let dir = agent_dir("probe", &probe_yaml("isolation: gvisor\n"));
    let v = deploy(&server, dir.path(), &[]);
    assert_eq!(v["version"]["number"], 1);
    assert_eq!(v["traffic"], json!({"1": 100}));

    // A first request makes a session and reaches its agent with Hangar's environment.
    let r = respond(&server, "probe", "alice", &json!({"input": "hi"}));
    let s = session_of(&r);
    let p = probe(&r);
    assert_eq!(p["session"], s);
    assert_eq!(p["header_session"], s);
    assert_eq!(p["version"], "1");
    assert_eq!(p["agent"], "probe");
    assert_eq!(p["agent_id"], "probe:1");
    // Unset on purpose: azure-ai-agentserver takes any value for Foundry's cloud.
    assert_eq!(p["hosting"], Value::Null);
    assert_eq!(p["hangar_session"], s);
    assert_eq!(p["port"], "8088");
    assert_eq!(p["greeting"], "hello");
    assert_eq!(p["count"], 1);
    let first_id = r.json()["id"].as_str().unwrap().to_owned();

    // Every way of naming the session lands in it.
    let r = respond(
        &server,
        "probe",
        "alice",
        &json!({"input": "again", "previous_response_id": first_id}),
    );
    assert_eq!(session_of(&r), s);
    assert_eq!(probe(&r)["count"], 2);
    let r = respond(
        &server,
        "probe",
        "alice",
        &json!({"input": "x", "agent_session_id": s}),
    );
    assert_eq!(probe(&r)["session"], s);
    let r = http(
        &server,
        "POST",
        "/agents/probe/responses",
        &[("x-agent-user-id", "alice"), ("x-agent-session-id", &s)],
        Some(br#"{"input": "y"}"#),
    );
    assert_eq!(probe(&r)["session"], s);
    assert_eq!(probe(&r)["count"], 4);

    // A conversation gets its own session, and keeps it.
    let r = respond(
        &server,
        "probe",
        "alice",
        &json!({"input": "c1", "conversation": "conv-1"}),
    );
    let conv = session_of(&r);
    assert_ne!(conv, s);
    let r = respond(
        &server,
        "probe",
        "alice",
        &json!({"input": "c2", "conversation": {"id": "conv-1"}}),
    );
    assert_eq!(session_of(&r), conv);
    assert_eq!(probe(&r)["count"], 2);

    // SSE is relayed event by event: the first event arrives long before the last.
    let body = json!({"input": "stream", "stream": true, "agent_session_id": s, "metadata": {"delay": "0.5"}}).to_string();
    let req = format!(
        "POST /agents/probe/responses HTTP/1.1\r\nhost: x\r\n{}\r\nx-agent-user-id: alice\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        server.auth(),
        body.len()
    );
    let chunks = raw_exchange(&server, req.as_bytes());
    let all: Vec<u8> = chunks.iter().flat_map(|(_, c)| c.clone()).collect();
    let text = String::from_utf8_lossy(&all);
    assert!(
        text.contains("x-agent-session-id: ") || text.contains("X-Agent-Session-Id"),
        "{text}"
    );
    assert!(text.contains("data: [DONE]"), "{text}");
    let first = chunks
        .iter()
        .scan(Vec::new(), |acc, (t, c)| {
            acc.extend_from_slice(c);
            Some((
                *t,
                String::from_utf8_lossy(acc).contains("response.created"),
            ))
        })
        .find(|(_, seen)| *seen)
        .map(|(t, _)| t)
        .expect("response.created arrives");
    let last = chunks.last().unwrap().0;
    assert!(
        last > first + Duration::from_millis(1200),
        "the stream was buffered: first event at {first:?}, end at {last:?}"
    );
    let streamed_id = text
        .split("\"id\": \"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap()
        .to_owned();

    // The response operations reach the session that made the response — streamed ones too.
    for (method, path) in [
        ("GET", format!("/agents/probe/responses/{first_id}")),
        ("GET", format!("/agents/probe/responses/{streamed_id}")),
        ("POST", format!("/agents/probe/responses/{first_id}/cancel")),
        ("DELETE", format!("/agents/probe/responses/{first_id}")),
    ] {
        let r = http(
            &server,
            method,
            &path,
            &[("x-agent-user-id", "alice")],
            None,
        );
        assert_eq!(r.status, 200, "{method} {path}: {}", r.text());
        assert_eq!(r.json()["session"], s, "{method} {path}");
        assert_eq!(session_of(&r), s);
        // Another user: as if the response did not exist.
        let r = http(&server, method, &path, &[("x-agent-user-id", "bob")], None);
        assert_eq!(r.status, 404, "{method} {path} as bob: {}", r.text());
        assert_eq!(r.header("x-platform-error-source"), Some("user"));
    }

    // Invocations: streamed through, session by query or header.
    let r = http(
        &server,
        "POST",
        &format!("/agents/probe/invocations?agent_session_id={s}&x=1"),
        &[("x-agent-user-id", "alice"), ("content-type", "text/plain")],
        Some(b"payload"),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["echo"], "payload");
    assert_eq!(r.json()["session"], s);
    assert!(r.json()["query"].as_str().unwrap().contains("x=1"));
    // Each invocation has an id: Hangar's when the caller gives none, else the caller's;
    // the agent sees it and the answer carries it.
    let made = r.header("x-agent-invocation-id").unwrap().to_owned();
    assert!(made.starts_with("inv_"), "{made}");
    assert_eq!(r.json()["header_invocation"], made);
    let r = http(
        &server,
        "POST",
        "/agents/probe/invocations",
        &[
            ("x-agent-user-id", "alice"),
            ("x-agent-session-id", &s),
            ("x-agent-invocation-id", "inv-mine-1"),
        ],
        Some(b"again"),
    );
    assert_eq!(r.header("x-agent-invocation-id"), Some("inv-mine-1"));
    assert_eq!(r.json()["header_invocation"], "inv-mine-1");
    // The caller's API key stays with Hangar.
    assert_eq!(r.json()["header_credentials"], json!([]), "{}", r.text());
    assert_eq!(r.json()["session"], s);

    // The WebSocket is spliced through to the session's agent.
    let key = "dGhlIHNhbXBsZSBub25jZQ==";
    let req = format!(
        "GET /agents/probe/invocations_ws HTTP/1.1\r\nhost: x\r\n{}\r\nx-agent-user-id: alice\r\nx-agent-session-id: {s}\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-key: {key}\r\nsec-websocket-version: 13\r\n\r\n",
        server.auth()
    );
    let mut sock = std::net::TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    sock.write_all(req.as_bytes()).unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        sock.read_exact(&mut b).unwrap();
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head).to_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("x-agent-invocation-id: inv_"), "{head}");
    assert!(
        head.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{head}"
    );
    let mask = [1u8, 2, 3, 4];
    let msg = b"ping";
    let mut frame = vec![0x81, 0x80 | msg.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(msg.iter().enumerate().map(|(i, c)| c ^ mask[i % 4]));
    sock.write_all(&frame).unwrap();
    let mut hdr = [0u8; 2];
    sock.read_exact(&mut hdr).unwrap();
    let mut payload = vec![0u8; (hdr[1] & 0x7f) as usize];
    sock.read_exact(&mut payload).unwrap();
    assert_eq!(String::from_utf8_lossy(&payload), format!("ping from {s}"));

    // Errors say whose they are.
    let r = respond(&server, "nobody", "alice", &json!({"input": "x"}));
    assert_eq!(r.status, 404);
    assert_eq!(r.header("x-platform-error-source"), Some("user"));
    let r = http(
        &server,
        "POST",
        "/agents/probe/responses",
        &[
            ("x-agent-user-id", "alice"),
            ("x-agent-session-id", "sess_000000000000000000000000"),
        ],
        Some(b"{}"),
    );
    assert_eq!(r.status, 404);
    assert_eq!(r.header("x-platform-error-source"), Some("user"));
    let r = http(
        &server,
        "POST",
        "/agents/probe/responses",
        &[("x-agent-user-id", "alice")],
        Some(b"{not json"),
    );
    assert_eq!(r.status, 400);
    assert_eq!(r.header("x-platform-error-source"), Some("user"));
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("JSON"));
    let big = vec![b' '; 33 * 1024 * 1024];
    let r = http(
        &server,
        "POST",
        "/agents/probe/responses",
        &[("x-agent-user-id", "alice")],
        Some(&big),
    );
    assert_eq!(r.status, 413, "{}", r.text());

    // A JSON answer too large to read whole is relayed as it is.
    let r = respond(
        &server,
        "probe",
        "alice",
        &json!({"input": "big", "agent_session_id": s}),
    );
    assert_eq!(r.status, 200);
    assert_eq!(
        r.body.len(),
        17 * 1048576 + "{\"id\": \"\", \"pad\": \"\"}".len() + 21,
        "{}",
        r.body.len()
    );
    assert!(r.text().ends_with("xx\"}"));

    // An agent process that dies is restarted, and the session shows it.
    let pid = probe(&respond(
        &server,
        "probe",
        "alice",
        &json!({"input": "pid", "agent_session_id": s}),
    ))["pid"]
        .clone();
    let r = server.call(
        "POST",
        &format!("/v1/sessions/{s}/exec"),
        Some(&json!({"cmd": ["sh", "-c", format!("kill -9 {pid}")]})),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = server
            .call("GET", &format!("/v1/sessions/{s}"), None)
            .json();
        if v["agent_process"]["restarts"].as_u64().unwrap_or(0) >= 1
            && v["agent_process"]["state"] == "running"
        {
            assert_eq!(v["agent_process"]["last_exit"], 137, "{v}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the agent was not restarted: {v}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let p = loop {
        let r = respond(
            &server,
            "probe",
            "alice",
            &json!({"input": "after", "agent_session_id": s}),
        );
        if r.status == 200 {
            break probe(&r);
        }
        assert!(
            Instant::now() < deadline,
            "the restarted agent does not answer: {}",
            r.text()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_ne!(p["pid"], pid);
    assert!(
        p["count"].as_u64().unwrap() > 4,
        "the workspace is the same: {p}"
    );

    // Nothing above made a session it should not have.
    let list = server.call("GET", "/v1/agents/probe/sessions", None).json();
    assert_eq!(list["sessions"].as_array().unwrap().len(), 2, "{list}");
}

#[test]
fn isolation_keys_never_see_each_others_sessions() {
    let server = Server::start();
    debian_base(&server, &BASE_PACKAGES);
    let dir = agent_dir("probe", &probe_yaml("isolation: gvisor\n"));
    deploy(&server, dir.path(), &[]);
    let r = respond(
        &server,
        "probe",
        "alice",
        &json!({"input": "mine", "conversation": "alice-conv"}),
    );
    let s = session_of(&r);
    let resp_id = r.json()["id"].as_str().unwrap().to_owned();
    let bob = [("x-agent-user-id", "bob")];

    // Control plane: bob gets 404 for everything about alice's session.
    for (method, path, body) in [
        ("GET", format!("/v1/sessions/{s}"), None),
        ("GET", format!("/v1/agents/probe/sessions/{s}"), None),
        (
            "POST",
            format!("/v1/sessions/{s}/exec"),
            Some(r#"{"cmd": ["cat", "/root/count"]}"#),
        ),
        (
            "GET",
            format!("/v1/sessions/{s}/files/content?path=/root/count"),
            None,
        ),
        ("GET", format!("/v1/sessions/{s}/files?path=/root"), None),
        (
            "PUT",
            format!("/v1/sessions/{s}/files/content?path=/root/count"),
            Some("999"),
        ),
        ("GET", format!("/v1/sessions/{s}/logs"), None),
        ("GET", format!("/v1/sessions/{s}/egress"), None),
        ("POST", format!("/v1/sessions/{s}/suspend"), None),
        ("POST", format!("/v1/sessions/{s}/resume"), None),
        ("DELETE", format!("/v1/sessions/{s}"), None),
    ] {
        let r = http(&server, method, &path, &bob, body.map(str::as_bytes));
        assert_eq!(r.status, 404, "{method} {path} as bob: {}", r.text());
        // Exactly what a session that does not exist looks like.
        let missing = path.replace(&s, "sess_ffffffffffffffffffffffff");
        let r2 = http(&server, method, &missing, &bob, body.map(str::as_bytes));
        assert_eq!(r2.status, 404);
        assert_eq!(
            r.json()["error"]["message"]
                .as_str()
                .unwrap()
                .replace(&s, "X"),
            r2.json()["error"]["message"]
                .as_str()
                .unwrap()
                .replace("sess_ffffffffffffffffffffffff", "X")
        );
    }
    // Data plane: naming alice's session, response or conversation as bob.
    for body in [
        json!({"input": "x", "agent_session_id": s}),
        json!({"input": "x", "previous_response_id": resp_id}),
    ] {
        let r = respond(&server, "probe", "bob", &body);
        assert_eq!(r.status, 404, "{body} as bob: {}", r.text());
        assert_eq!(r.header("x-platform-error-source"), Some("user"));
    }
    let r = http(
        &server,
        "POST",
        "/agents/probe/responses",
        &[("x-agent-user-id", "bob"), ("x-agent-session-id", &s)],
        Some(br#"{"input": "x"}"#),
    );
    assert_eq!(r.status, 404);
    let r = http(
        &server,
        "POST",
        &format!("/agents/probe/invocations?agent_session_id={s}"),
        &bob,
        Some(b"x"),
    );
    assert_eq!(r.status, 404);
    let listed = server
        .call("GET", "/v1/agents/probe/sessions?isolation_key=bob", None)
        .json();
    assert_eq!(listed["sessions"], json!([]));
    // Conversation ids are per user: bob's "alice-conv" is bob's own new conversation, and
    // neither reveals nor reaches alice's.
    let r = respond(
        &server,
        "probe",
        "bob",
        &json!({"input": "x", "conversation": "alice-conv"}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let bobs = session_of(&r);
    assert_ne!(bobs, s);
    assert_eq!(probe(&r)["count"], 1);

    // Alice's session is untouched and still hers.
    let r = http(
        &server,
        "GET",
        &format!("/v1/sessions/{s}/files/content?path=/root/count"),
        &[("x-agent-user-id", "alice")],
        None,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), "1");
    let r = respond(
        &server,
        "probe",
        "alice",
        &json!({"input": "x", "agent_session_id": s}),
    );
    assert_eq!(probe(&r)["count"], 2);
    let r = respond(
        &server,
        "probe",
        "alice",
        &json!({"input": "x", "conversation": "alice-conv"}),
    );
    assert_eq!(session_of(&r), s);
    assert_eq!(probe(&r)["count"], 3);
}

#[test]
fn idle_sessions_scale_to_zero_and_resume_with_files_and_processes() {
    let server = Server::start();
    debian_base(&server, &BASE_PACKAGES);
    let dir = agent_dir(
        "probe",
        &probe_yaml("isolation: gvisor\nidle_timeout: 2s\n"),
    );
    deploy(&server, dir.path(), &[]);
    let r = respond(&server, "probe", "alice", &json!({"input": "one"}));
    let s = session_of(&r);
    let pid = probe(&r)["pid"].clone();

    let v = wait_state(&server, &s, "suspended", 60);
    let mode = v["checkpoint"]["mode"]
        .as_str()
        .unwrap_or_else(|| panic!("no checkpoint: {v}\nserver log:\n{}", server.log()))
        .to_owned();
    assert!(
        v["checkpoint"]["hash"]
            .as_str()
            .unwrap()
            .starts_with("sha256:"),
        "{v}"
    );

    // A request to the suspended session resumes it transparently.
    let r = respond(
        &server,
        "probe",
        "alice",
        &json!({"input": "two", "agent_session_id": s}),
    );
    assert_eq!(session_of(&r), s);
    let p = probe(&r);
    assert_eq!(p["count"], 2, "the workspace survived");
    if mode == "memory" {
        assert_eq!(p["pid"], pid, "a memory checkpoint keeps the agent process");
    }

    // Through the CLI: suspend now, then exec resumes it.
    let out = cli(&server, &["sessions", "suspend", &s]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        server
            .call("GET", &format!("/v1/sessions/{s}"), None)
            .json()["state"],
        "suspended"
    );
    let out = cli(
        &server,
        &["sessions", "exec", &s, "--", "cat", "/root/count"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "2");
    let out = cli(&server, &["sessions", "logs", &s]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("probe listening"));
    let out = cli(&server, &["sessions", "ls", "probe", "--json"]);
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list["sessions"][0]["id"], s);
    let out = cli(&server, &["sessions", "rm", &s]);
    assert!(out.status.success());
    assert_eq!(
        server
            .call("GET", &format!("/v1/sessions/{s}"), None)
            .status,
        404
    );
}

#[test]
fn container_sessions_resume_with_files_after_idle() {
    let server = Server::start();
    debian_base(&server, &BASE_PACKAGES);
    let dir = agent_dir(
        "probe",
        &probe_yaml("isolation: container\nidle_timeout: 1s\n"),
    );
    deploy(&server, dir.path(), &[]);
    let r = respond(&server, "probe", "alice", &json!({"input": "one"}));
    let s = session_of(&r);
    let v = wait_state(&server, &s, "suspended", 60);
    assert_eq!(v["checkpoint"]["mode"], "filesystem");
    let r = respond(
        &server,
        "probe",
        "alice",
        &json!({"input": "two", "agent_session_id": s}),
    );
    assert_eq!(probe(&r)["count"], 2);
}

/// On the vm driver a session scales to zero with a memory snapshot: the agent process that
/// answers after the resume is the same one (same pid), a listening socket and all.
#[test]
fn vm_sessions_resume_with_the_agent_process_running() {
    common::require_vm();
    let server = Server::start();
    debian_base(&server, &BASE_PACKAGES);
    let dir = agent_dir("probe", &probe_yaml("isolation: vm\nidle_timeout: 2s\n"));
    deploy(&server, dir.path(), &[]);
    let r = respond(&server, "probe", "alice", &json!({"input": "one"}));
    let s = session_of(&r);
    let first = probe(&r);
    let v = wait_state(&server, &s, "suspended", 60);
    assert_eq!(v["checkpoint"]["mode"], "memory", "{v}");
    let r = respond(
        &server,
        "probe",
        "alice",
        &json!({"input": "two", "agent_session_id": s}),
    );
    assert_eq!(session_of(&r), s);
    let p = probe(&r);
    assert_eq!(p["count"], 2, "the workspace survived");
    assert_eq!(p["pid"], first["pid"], "the agent process survived");
    let v = server
        .call("GET", &format!("/v1/sessions/{s}"), None)
        .json();
    assert_eq!(v["state"], "idle", "{v}");
    let sb = server
        .call(
            "GET",
            &format!("/v1/sandboxes/{}", v["sandbox"].as_str().unwrap()),
            None,
        )
        .json();
    assert_eq!(sb["last_resume"]["mode"], "memory", "{sb}");
}

#[test]
fn traffic_split_assigns_new_sessions_by_weight_and_keeps_them() {
    // A small node cap: sessions beyond it are suspended least-recently-used first.
    let server = Server::start_with(&["--max-running", "3"]);
    debian_base(&server, &BASE_PACKAGES);
    let dir = agent_dir("probe", &probe_yaml("isolation: container\n"));
    deploy(&server, dir.path(), &[]);
    // The same image and agent.yaml again: nothing new.
    let again = deploy(&server, dir.path(), &[]);
    assert_eq!(again["version"]["number"], 1);
    assert_eq!(again["version"]["unchanged"], true);
    std::fs::write(
        dir.path().join("agent.yaml"),
        probe_yaml(
            "isolation: container
",
        )
        .replace("hello", "hello again"),
    )
    .unwrap();
    let v2 = deploy(&server, dir.path(), &[]);
    assert_eq!(v2["version"]["number"], 2);
    assert_eq!(v2["traffic"], json!({"1": 100, "2": 0}));
    let out = cli(&server, &["traffic", "set", "probe", "1=90", "2=10"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut by_version = [0usize; 3];
    let mut sessions = vec![];
    for i in 0..200 {
        let r = server.call(
            "POST",
            "/v1/agents/probe/sessions",
            Some(&json!({"isolation_key": format!("user-{i}")})),
        );
        assert_eq!(r.status, 201, "{}\n{}", r.text(), server.log());
        let v = r.json();
        by_version[v["version"].as_u64().unwrap() as usize] += 1;
        sessions.push((
            v["id"].as_str().unwrap().to_owned(),
            v["version"].as_i64().unwrap(),
        ));
    }
    // 10% of 200: mean 20, standard deviation 4.2; these bounds fail once in ~10^4 runs.
    assert!(
        (6..=36).contains(&by_version[2]),
        "version 2 got {} of 200 sessions",
        by_version[2]
    );
    let running = server.call("GET", "/v1/sandboxes", None).json()["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["state"] == "running")
        .count();
    assert!(running <= 3, "{running} sandboxes run past the cap of 3");

    // Each session keeps its version (and its sandbox says so), even after a suspension.
    for (id, version) in sessions
        .iter()
        .step_by(25)
        .chain(sessions.iter().filter(|(_, v)| *v == 2).take(2))
    {
        let r = server.call(
            "POST",
            &format!("/v1/sessions/{id}/exec"),
            Some(&json!({"cmd": ["printenv", "FOUNDRY_AGENT_VERSION"]})),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(
            r.json()["stdout"].as_str().unwrap().trim(),
            version.to_string()
        );
        let v = server
            .call("GET", &format!("/v1/sessions/{id}"), None)
            .json();
        assert_eq!(v["version"], *version);
    }
    // Changing the split changes nothing for existing sessions.
    let out = cli(&server, &["traffic", "set", "probe", "2=100", "1=0"]);
    assert!(out.status.success());
    let (id, version) = &sessions[0];
    let r = http(
        &server,
        "POST",
        "/agents/probe/responses",
        &[("x-agent-user-id", "user-0"), ("x-agent-session-id", id)],
        Some(br#"{"input": "x"}"#),
    );
    assert_eq!(probe(&r)["version"], version.to_string());
    // A bad split is refused and changes nothing.
    let r = server.call(
        "PUT",
        "/v1/agents/probe/traffic",
        Some(&json!({"weights": {"1": 50, "2": 30}})),
    );
    assert_eq!(r.status, 400);
    let t = server.call("GET", "/v1/agents/probe/traffic", None).json();
    assert_eq!(t["weights"], json!({"1": 0, "2": 100}));
}

#[test]
fn restart_keeps_agents_versions_traffic_and_sessions() {
    let mut server = Server::start();
    debian_base(&server, &BASE_PACKAGES);
    let dir = agent_dir("probe", &probe_yaml("isolation: gvisor\n"));
    deploy(&server, dir.path(), &[]);
    deploy(&server, dir.path(), &["--traffic", "2=10"]);
    let r = respond(&server, "probe", "alice", &json!({"input": "a"}));
    let running = session_of(&r);
    let running_version = probe(&r)["version"].clone();
    let r = respond(&server, "probe", "bob", &json!({"input": "b"}));
    let suspended = session_of(&r);
    let resp_id = r.json()["id"].as_str().unwrap().to_owned();
    let r = server.call("POST", &format!("/v1/sessions/{suspended}/suspend"), None);
    assert_eq!(r.status, 200, "{}", r.text());
    let before = server.call("GET", "/v1/agents/probe", None).json();

    server.restart();

    let after = server.call("GET", "/v1/agents/probe", None).json();
    assert_eq!(after["versions"], json!([1, 2]));
    assert_eq!(after["traffic"], json!({"1": 90, "2": 10}));
    assert_eq!(after["versions"], before["versions"]);
    assert_eq!(
        server
            .call("GET", &format!("/v1/sessions/{suspended}"), None)
            .json()["state"],
        "suspended"
    );
    let r = respond(
        &server,
        "probe",
        "alice",
        &json!({"input": "again", "agent_session_id": running}),
    );
    assert_eq!(probe(&r)["count"], 2);
    assert_eq!(probe(&r)["version"], running_version);
    let r = respond(
        &server,
        "probe",
        "bob",
        &json!({"input": "again", "previous_response_id": resp_id}),
    );
    assert_eq!(session_of(&r), suspended);
    assert_eq!(probe(&r)["count"], 2);
}

#[test]
fn an_agent_that_never_gets_ready_fails_its_session_with_its_log() {
    let server = Server::start();
    debian_base(&server, &BASE_PACKAGES);
    let dir = agent_dir(
        "probe",
        "name: probe\nbuild: { dockerfile: Dockerfile }\nisolation: container\nstartup_timeout: 3s\nenv: { NEVER_READY: '1' }\n",
    );
    deploy(&server, dir.path(), &[]);
    let t0 = Instant::now();
    let r = respond(&server, "probe", "alice", &json!({"input": "x"}));
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(r.header("x-platform-error-source"), Some("upstream"));
    let msg = r.json()["error"]["message"].as_str().unwrap().to_owned();
    assert!(msg.contains("not ready"), "{msg}");
    // The agent's log is for the operator, not for the end user who made the request.
    assert!(!msg.contains("probe listening"), "{msg}");
    assert!(t0.elapsed() < Duration::from_secs(30));
    let list = server.call("GET", "/v1/agents/probe/sessions", None).json();
    let s = &list["sessions"][0];
    assert_eq!(s["state"], "failed", "{list}");
    assert!(s["error"].as_str().unwrap().contains("not ready"));
    assert!(
        s["error"].as_str().unwrap().contains("probe listening"),
        "the agent's log is in the session's error: {s}"
    );
    // Its sandbox is gone; the failed session says why until it is deleted.
    assert_eq!(
        server.call("GET", "/v1/sandboxes", None).json()["sandboxes"],
        json!([])
    );
}

#[test]
fn expired_sessions_are_deleted_with_their_volumes() {
    let server = Server::start();
    debian_base(&server, &BASE_PACKAGES);
    let dir = agent_dir(
        "probe",
        &probe_yaml("isolation: container\nidle_timeout: 1s\nsession_retention: 4s\n"),
    );
    deploy(&server, dir.path(), &[]);
    let r = respond(&server, "probe", "alice", &json!({"input": "x"}));
    let s = session_of(&r);
    let sandbox = server
        .call("GET", &format!("/v1/sessions/{s}"), None)
        .json()["sandbox"]
        .as_str()
        .unwrap()
        .to_owned();
    wait_state(&server, &s, "suspended", 30);
    let deadline = Instant::now() + Duration::from_secs(30);
    while server
        .call("GET", &format!("/v1/sessions/{s}"), None)
        .status
        != 404
    {
        assert!(
            Instant::now() < deadline,
            "session {s} outlived its retention"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        server
            .call("GET", &format!("/v1/sandboxes/{sandbox}"), None)
            .status,
        404
    );
    common::assert_nothing_left(&server, &sandbox);
    // Its response ids are forgotten with it.
    let r = respond(
        &server,
        "probe",
        "alice",
        &json!({"input": "x", "previous_response_id": r.json()["id"]}),
    );
    assert_eq!(r.status, 404, "{}", r.text());
}
