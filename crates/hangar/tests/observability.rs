//! `/metrics`: Prometheus text that Prometheus's own parser reads, whose counters move as
//! requests are made and sandboxes are created, suspended and resumed.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::{json, Value};

use common::agents::{agent_dir, deploy, http, http_anonymous, respond, BASE_PACKAGES};
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
