//! `/metrics`: Prometheus text that Prometheus's own parser reads, whose counters move as
//! requests are made and sandboxes are created, suspended and resumed.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::{json, Value};

use common::agents::{agent_dir, cli, deploy, http, http_anonymous, respond, BASE_PACKAGES};
use common::images::debian_base;
use common::{venv_python, Server};

/// `/metrics`, parsed: every sample.
fn scrape(server: &Server) -> Vec<Value> {
    let r = http(server, "GET", "/metrics", &[], None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        r.header("content-type")
            .is_some_and(|c| c.starts_with("text/plain; version=0.0.4")),
        "{:?}",
        r.header("content-type")
    );
    let mut p = Command::new(venv_python())
        .arg(common::agents::tests_dir().join("py/parse_metrics.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    p.stdin.take().unwrap().write_all(&r.body).unwrap();
    let out = p.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the Prometheus parser refused /metrics: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        r.text()
    );
    serde_json::from_slice::<Value>(&out.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

/// The value of the sample `name` whose labels include `labels` (0 if there is none).
fn value(samples: &[Value], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s["name"] == name)
        .filter(|s| labels.iter().all(|(k, v)| s["labels"][k] == *v))
        .map(|s| s["value"].as_f64().unwrap())
        .sum()
}

#[test]
fn metrics_parse_and_move_with_requests_and_sandboxes() {
    let server = Server::start();
    debian_base(&server, &BASE_PACKAGES);
    let yaml = "name: probe\nbuild: { dockerfile: Dockerfile }\nisolation: gvisor\n\
                resources: { cpus: 1, memory: 256Mi, disk: 64Mi }\nstartup_timeout: 60s\n";
    let dir = agent_dir("probe", yaml);
    deploy(&server, dir.path(), &[]);

    // Like the rest of the API, /metrics needs a key.
    let r = http_anonymous(&server, "GET", "/metrics", &[], None);
    assert_eq!(r.status, 401, "{}", r.text());

    let before = scrape(&server);
    let ok = [
        ("agent", "probe"),
        ("version", "1"),
        ("protocol", "responses"),
        ("status", "200"),
    ];
    assert_eq!(value(&before, "hangar_requests_total", &ok), 0.0);

    let r = respond(&server, "probe", "alice", &json!({"input": "one"}));
    assert_eq!(r.status, 200, "{}", r.text());
    let session = r.header("x-agent-session-id").unwrap().to_owned();
    for _ in 0..2 {
        let r = respond(
            &server,
            "probe",
            "alice",
            &json!({"input": "again", "agent_session_id": session}),
        );
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let r = http(
        &server,
        "POST",
        "/agents/probe/invocations",
        &[
            ("x-agent-user-id", "alice"),
            ("x-agent-session-id", &session),
        ],
        Some(b"{}"),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let r = http(
        &server,
        "POST",
        "/agents/probe/responses",
        &[("x-agent-user-id", "alice")],
        Some(b"not json"),
    );
    assert_eq!(r.status, 400);

    let after = scrape(&server);
    assert_eq!(value(&after, "hangar_requests_total", &ok), 3.0);
    assert_eq!(
        value(
            &after,
            "hangar_requests_total",
            &[
                ("agent", "probe"),
                ("protocol", "invocations"),
                ("status", "200")
            ]
        ),
        1.0
    );
    assert_eq!(
        value(
            &after,
            "hangar_requests_total",
            &[("agent", "probe"), ("status", "400")]
        ),
        1.0
    );
    let sessions: f64 = ["running", "idle"]
        .iter()
        .map(|st| {
            value(
                &after,
                "hangar_sessions",
                &[("agent", "probe"), ("state", st)],
            )
        })
        .sum();
    assert_eq!(sessions, 1.0, "{after:?}");
    let created = [("driver", "gvisor"), ("operation", "create")];
    assert_eq!(
        value(&after, "hangar_sandbox_operation_seconds_count", &created),
        1.0
    );
    assert!(value(&after, "hangar_sandbox_operation_seconds_sum", &created) > 0.0);
    assert!(value(&after, "hangar_host_memory_bytes", &[("kind", "total")]) > 0.0);
    assert!(value(&after, "hangar_host_cpu_seconds_total", &[("kind", "busy")]) > 0.0);
    assert!(value(&after, "hangar_disk_bytes", &[("kind", "sandboxes")]) > 0.0);
    // The running sandbox's memory and the CPU time sandboxes used, from their cgroups.
    assert!(value(&after, "hangar_host_memory_bytes", &[("kind", "sandboxes")]) > 1e6);
    assert!(
        value(
            &after,
            "hangar_host_cpu_seconds_total",
            &[("kind", "sandboxes")]
        ) > 0.0
    );
    assert_eq!(
        value(&after, "hangar_sandboxes", &[("state", "running")]),
        1.0
    );

    // A suspension and a resumption are timed; the session's state follows.
    let r = server.call("POST", &format!("/v1/sessions/{session}/suspend"), None);
    assert_eq!(r.status, 200, "{}", r.text());
    let suspended = scrape(&server);
    assert_eq!(
        value(
            &suspended,
            "hangar_sessions",
            &[("agent", "probe"), ("state", "suspended")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &suspended,
            "hangar_sandbox_operation_seconds_count",
            &[("driver", "gvisor"), ("operation", "suspend")]
        ),
        1.0
    );
    let r = respond(
        &server,
        "probe",
        "alice",
        &json!({"input": "back", "agent_session_id": session}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let resumed = scrape(&server);
    assert_eq!(
        value(
            &resumed,
            "hangar_sandbox_operation_seconds_count",
            &[("driver", "gvisor"), ("operation", "resume")]
        ),
        1.0
    );
    assert_eq!(value(&resumed, "hangar_requests_total", &ok), 4.0);
}

/// `--log-format json`: every line Hangar logs is one JSON object with its time, level,
/// source and message.
#[test]
fn json_logs_are_one_object_per_line() {
    let server = Server::start_with(&["--log-format", "json"]);
    let r = server.call("GET", "/v1/agents", None);
    assert_eq!(r.status, 200, "{}", r.text());
    let log = server.log();
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty());
    let mut serving = false;
    for line in lines {
        let v: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {line}\nwhole log:\n{log}"));
        for key in ["timestamp", "level", "target", "message"] {
            assert!(v.get(key).is_some(), "no {key} in {line}");
        }
        serving |= v["message"] == "hangar serving" && v["listen"].is_string();
    }
    assert!(serving, "{log}");
}

/// A real OTLP receiver (Python, opentelemetry-proto) that appends every span it is sent to
/// a file, as JSON lines.
struct Receiver {
    child: std::process::Child,
    out: tempfile::NamedTempFile,
    port: u16,
}

impl Receiver {
    fn start() -> Receiver {
        let out = tempfile::NamedTempFile::new().unwrap();
        let mut child = Command::new(venv_python())
            .arg(common::agents::tests_dir().join("py/otlp_receiver.py"))
            .arg(out.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        let port = line
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("the OTLP receiver did not start: {line:?}"));
        Receiver { child, out, port }
    }

    fn spans(&self) -> Vec<Value> {
        std::fs::read_to_string(self.out.path())
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// The first span `pred` accepts, waiting up to 20 s for it.
    fn wait(&self, what: &str, server: &Server, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let spans = self.spans();
            if let Some(s) = spans.iter().find(|s| pred(s)) {
                return s.clone();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the OTLP receiver got no {what}; it got:\n{}\nserver log:\n{}",
                spans
                    .iter()
                    .map(|s| s.to_string())
                    .collect::<Vec<_>>()
                    .join("\n"),
                server.log()
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sha256_hex(s: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(s.as_bytes()))
}

/// Hangar's `invoke_agent` spans reach a real OTLP receiver with the GenAI attributes and
/// children for the session's creation, its resume and the call; the agent gets a
/// `traceparent` of the same trace and its own spans, sent to Hangar, join it in the trace
/// API (and are forwarded); the session's events tell its story; JSON logs carry trace ids.
#[test]
fn traces_follow_a_request_into_the_agent_and_out_over_otlp() {
    let receiver = Receiver::start();
    let endpoint = format!("http://127.0.0.1:{}", receiver.port);
    let server = Server::start_with_env(
        &["--log-format", "json"],
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)],
    );
    debian_base(&server, &BASE_PACKAGES);
    let yaml = "name: traced\nbuild: { dockerfile: Dockerfile }\nisolation: gvisor\n\
                resources: { cpus: 1, memory: 256Mi, disk: 64Mi }\nstartup_timeout: 60s\n";
    let dir = agent_dir("traced", yaml);
    deploy(&server, dir.path(), &[]);

    // The caller's trace context: Hangar's span is its child, and the baggage goes through.
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let traceparent = format!("00-{trace}-{caller_span}-01");
    let r = http(
        &server,
        "POST",
        "/agents/traced/responses",
        &[
            ("x-agent-user-id", "alice"),
            ("traceparent", &traceparent),
            ("baggage", "tenant=acme"),
        ],
        Some(br#"{"input": "trace"}"#),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let answer = r.json();
    let session = r.header("x-agent-session-id").unwrap().to_owned();
    let response_id = answer["id"].as_str().unwrap().to_owned();
    let got = answer["traceparent"]
        .as_str()
        .expect("the agent got no traceparent");
    let parts: Vec<&str> = got.split('-').collect();
    assert_eq!(parts.len(), 4, "{got}");
    assert_eq!(
        parts[1], trace,
        "the agent's traceparent is not of the caller's trace"
    );
    assert_ne!(
        parts[2], caller_span,
        "the agent's parent must be Hangar's span"
    );
    assert_eq!(answer["baggage"], "tenant=acme");
    assert_eq!(answer["otel_endpoint"], "http://hangar.internal");
    assert_eq!(answer["sent"]["status"], 200, "{answer}");

    let invoke = receiver.wait("invoke_agent span", &server, |s| {
        s["trace_id"] == trace && s["name"] == "invoke_agent traced:1"
    });
    assert_eq!(invoke["parent_span_id"], caller_span);
    assert_eq!(invoke["kind"], 3, "SPAN_KIND_CLIENT");
    assert_eq!(invoke["resource"]["service.name"], "hangar");
    let a = &invoke["attributes"];
    assert_eq!(a["gen_ai.operation.name"], "invoke_agent", "{invoke}");
    assert_eq!(a["gen_ai.provider.name"], "hangar");
    assert_eq!(a["gen_ai.agent.name"], "traced");
    assert_eq!(a["gen_ai.agent.id"], "traced:1");
    assert_eq!(a["gen_ai.agent.version"], "1");
    assert_eq!(a["gen_ai.conversation.id"], session.as_str());
    assert_eq!(a["gen_ai.response.id"], response_id.as_str());
    assert_eq!(a["gen_ai.usage.input_tokens"], 11);
    assert_eq!(a["gen_ai.usage.output_tokens"], 7);
    assert_eq!(a["hangar.session.id"], session.as_str());
    assert_eq!(
        a["hangar.isolation_key.sha256"],
        sha256_hex("alice").as_str()
    );
    assert_eq!(a["http.response.status_code"], 200);
    assert!(
        !invoke.to_string().contains("\"alice\""),
        "the end user appears in clear: {invoke}"
    );
    let invoke_id = invoke["span_id"].as_str().unwrap().to_owned();
    let child = |name: &'static str, parent: String| {
        let trace = trace.to_owned();
        move |s: &Value| {
            s["trace_id"] == trace && s["name"] == name && s["parent_span_id"] == parent
        }
    };
    let created = receiver.wait(
        "create_session span",
        &server,
        child("create_session", invoke_id.clone()),
    );
    assert_eq!(created["attributes"]["hangar.session.id"], session.as_str());
    let start = receiver.wait(
        "start_sandbox span",
        &server,
        child(
            "start_sandbox",
            created["span_id"].as_str().unwrap().to_owned(),
        ),
    );
    assert_eq!(start["attributes"]["hangar.driver"], "gvisor");
    let proxy = receiver.wait(
        "proxy span",
        &server,
        child("POST /responses", invoke_id.clone()),
    );
    assert_eq!(
        parts[2],
        proxy["span_id"].as_str().unwrap(),
        "the agent's parent is the proxied call"
    );

    // The agent's own span, sent to Hangar, is forwarded, labelled with its session.
    let tool = receiver.wait("the agent's span, forwarded", &server, |s| {
        s["trace_id"] == trace && s["name"] == "agent tool call"
    });
    assert_eq!(tool["parent_span_id"], parts[2]);
    assert_eq!(tool["resource"]["hangar.session.id"], session.as_str());
    assert_eq!(tool["resource"]["hangar.agent.name"], "traced");

    // The trace API has the whole trace, the agent's span under Hangar's call.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let spans = loop {
        let r = server.call("GET", &format!("/v1/traces/{trace}"), None);
        let v = r.json();
        let spans = v["spans"].as_array().cloned().unwrap_or_default();
        if spans.iter().any(|s| s["name"] == "agent tool call")
            && spans.iter().any(|s| s["name"] == "invoke_agent traced:1")
        {
            break spans;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the trace API lacks spans: {v}\n{}",
            server.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    let agent_span = spans
        .iter()
        .find(|s| s["name"] == "agent tool call")
        .unwrap();
    assert_eq!(agent_span["parent_span_id"], parts[2]);
    assert_eq!(agent_span["service"], "traced");
    assert_eq!(agent_span["attributes"]["tool.name"], "lookup");
    let r = server.call("GET", &format!("/v1/traces?session={session}"), None);
    assert_eq!(r.status, 200, "{}", r.text());
    let listed = r.json();
    let first = &listed["traces"][0];
    assert_eq!(first["trace_id"], trace, "{listed}");
    assert_eq!(first["name"], "invoke_agent traced:1");
    assert_eq!(first["session_id"], session.as_str());
    assert!(first["spans"].as_i64().unwrap() >= 5, "{first}");
    // The CLI reads the same: the list, and the trace as a tree with the agent's span under
    // Hangar's call.
    let out = cli(&server, &["traces", "ls", "--session", &session, "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed["traces"][0]["trace_id"], trace);
    let out = cli(&server, &["traces", "show", trace]);
    let shown = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        shown.starts_with("invoke_agent traced:1  [hangar]"),
        "{shown}"
    );
    assert!(
        shown
            .lines()
            .any(|l| l.starts_with("    agent tool call  [traced]")),
        "{shown}"
    );
    // Traces are the operator's; bad ids are refused.
    let r = http(
        &server,
        "GET",
        "/v1/traces",
        &[("x-agent-user-id", "alice")],
        None,
    );
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(server.call("GET", "/v1/traces/nothex", None).status, 400);
    assert_eq!(
        server
            .call("GET", &format!("/v1/traces/{}", "0".repeat(32)), None)
            .status,
        404
    );

    // A suspended session's next request is a trace with a resume in it.
    let r = server.call("POST", &format!("/v1/sessions/{session}/suspend"), None);
    assert_eq!(r.status, 200, "{}", r.text());
    let r = respond(
        &server,
        "traced",
        "alice",
        &json!({"input": "again", "agent_session_id": session}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let second = r.json()["traceparent"].as_str().unwrap().to_owned();
    let second_trace = second.split('-').nth(1).unwrap().to_owned();
    assert_ne!(
        second_trace, trace,
        "a request without a traceparent starts a trace"
    );
    let invoke2 = receiver.wait("the second invoke_agent span", &server, |s| {
        s["trace_id"] == second_trace.as_str() && s["name"] == "invoke_agent traced:1"
    });
    assert_eq!(invoke2["parent_span_id"], Value::Null);
    let resume = receiver.wait("resume_session span", &server, |s| {
        s["trace_id"] == second_trace.as_str()
            && s["name"] == "resume_session"
            && s["parent_span_id"] == invoke2["span_id"]
    });
    let restore = receiver.wait("restore_sandbox span", &server, |s| {
        s["trace_id"] == second_trace.as_str()
            && s["name"] == "restore_sandbox"
            && s["parent_span_id"] == resume["span_id"]
    });
    let mode = restore["attributes"]["hangar.resume.mode"]
        .as_str()
        .unwrap();
    assert!(mode == "memory" || mode == "filesystem", "{restore}");

    // The session's events: created, ran, suspended, resumed (and how).
    let r = server.call("GET", &format!("/v1/sessions/{session}/events"), None);
    assert_eq!(r.status, 200, "{}", r.text());
    let kinds: Vec<String> = r.json()["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        kinds,
        [
            "creating",
            "running",
            "suspending",
            "suspended",
            "resuming",
            "restored",
            "running"
        ],
        "{}",
        r.text()
    );
    let r = http(
        &server,
        "GET",
        &format!("/v1/sessions/{session}/events"),
        &[("x-agent-user-id", "bob")],
        None,
    );
    assert_eq!(r.status, 404, "another user sees the session: {}", r.text());

    // Hangar's JSON log lines inside the request carry its trace id.
    let log = server.log();
    let traced_line = log.lines().find(|l| {
        serde_json::from_str::<Value>(l).is_ok_and(|v| {
            v["message"] == "session created"
                && v["spans"]
                    .as_array()
                    .is_some_and(|s| s.iter().any(|s| s["trace_id"] == trace))
        })
    });
    assert!(
        traced_line.is_some(),
        "no log line carries the trace id:\n{log}"
    );

    // OTLP into Hangar's own listener: protobuf needs a key and a right media type.
    let r = http(
        &server,
        "POST",
        "/v1/traces",
        &[("content-type", "text/plain")],
        Some(b"x"),
    );
    assert_eq!(r.status, 415, "{}", r.text());
    let r = http(
        &server,
        "POST",
        "/v1/traces",
        &[("content-type", "application/x-protobuf")],
        Some(b"\xff\xff\xff"),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    let r = http(
        &server,
        "POST",
        "/v1/traces",
        &[("content-type", "application/json")],
        Some(b"{}"),
    );
    assert_eq!((r.status, r.text()), (200, "{}".to_owned()));
    let r = http_anonymous(
        &server,
        "POST",
        "/v1/traces",
        &[("content-type", "application/json")],
        Some(b"{}"),
    );
    assert_eq!(r.status, 401);
}
