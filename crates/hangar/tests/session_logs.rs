//! A session's logs, end to end: an agent in a gVisor sandbox prints on stdout and stderr;
//! the logs API (curl, plain and SSE) and the real `hangar sessions logs -f` see its lines
//! stamped and tagged, follow them across a suspend and resume and across rotations, resume
//! after a `Last-Event-ID`, stop when the session is deleted, and never show one end user's
//! logs to another.

mod common;

use std::io::BufRead;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use common::agents::{agent_dir, deploy, http, BASE_PACKAGES};
use common::images::debian_base;
use common::{require, Server};

fn chatty_yaml(extra: &str) -> String {
    format!(
        "name: chatty\nbuild: {{ dockerfile: Dockerfile }}\nisolation: gvisor\n\
         resources: {{ cpus: 1, memory: 256Mi, disk: 64Mi }}\nidle_timeout: 15m\n\
         startup_timeout: 60s\n{extra}"
    )
}

/// Asks the agent to print `body` (`lines`, `stream`, `raw`) in session `session` (a new one
/// when `None`); returns the session and the agent's pid.
fn print(server: &Server, session: Option<&str>, body: Value) -> (String, u64) {
    let mut headers = vec![("x-agent-user-id", "alice")];
    if let Some(s) = session {
        headers.push(("x-agent-session-id", s));
    }
    let r = http(
        server,
        "POST",
        "/agents/chatty/invocations",
        &headers,
        Some(&serde_json::to_vec(&body).unwrap()),
    );
    assert_eq!(
        r.status,
        200,
        "invocation failed: {}\nserver log:\n{}",
        r.text(),
        server.log()
    );
    let session = r.header("x-agent-session-id").unwrap().to_owned();
    (session, r.json()["pid"].as_u64().unwrap())
}

/// One event of an SSE answer.
#[derive(Debug, Clone, PartialEq)]
struct Event {
    id: Option<u64>,
    event: Option<String>,
    data: Value,
}

/// The events of an SSE answer's lines.
fn events(lines: &[String]) -> Vec<Event> {
    let mut out = Vec::new();
    let (mut id, mut event, mut data) = (None, None, None);
    for l in lines {
        if l.is_empty() {
            if let Some(d) = data.take() {
                out.push(Event {
                    id: id.take(),
                    event: event.take(),
                    data: serde_json::from_str(d).unwrap_or_else(|e| panic!("{e}: {d}")),
                });
            }
            (id, event) = (None, None);
        } else if let Some(v) = l.strip_prefix("id: ") {
            id = Some(v.parse().unwrap());
        } else if let Some(v) = l.strip_prefix("event: ") {
            event = Some(v.to_owned());
        } else if let Some(v) = l.strip_prefix("data: ") {
            data = Some(v);
        } else {
            assert!(l.starts_with(':'), "not SSE: {l:?}");
        }
    }
    out
}

fn lines_of(bytes: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(bytes)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// A GET of the session's logs as `user`, with extra headers.
fn logs(server: &Server, session: &str, query: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let mut h = vec![("x-agent-user-id", "alice")];
    h.extend_from_slice(headers);
    let r = http(
        server,
        "GET",
        &format!("/v1/sessions/{session}/logs?{query}"),
        &h,
        None,
    );
    (r.status, r.text())
}

fn sse(server: &Server, session: &str, query: &str, headers: &[(&str, &str)]) -> Vec<Event> {
    let (status, body) = logs(server, session, &format!("format=sse&{query}"), headers);
    assert_eq!(status, 200, "{body}");
    events(&lines_of(body.as_bytes()))
}

fn texts(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .map(|e| e.data["line"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// A process that follows a log; its stdout lines are collected as they come.
struct Follower {
    name: &'static str,
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Follower {
    fn spawn(name: &'static str, mut cmd: Command) -> Follower {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let collect = |pipe: Box<dyn std::io::Read + Send>| {
            let lines = Arc::new(Mutex::new(Vec::new()));
            let sink = lines.clone();
            std::thread::spawn(move || {
                let mut r = std::io::BufReader::new(pipe);
                let mut buf = Vec::new();
                while r.read_until(b'\n', &mut buf).unwrap_or(0) > 0 {
                    let l = String::from_utf8_lossy(&buf);
                    sink.lock()
                        .unwrap()
                        .push(l.trim_end_matches('\n').to_owned());
                    buf.clear();
                }
            });
            lines
        };
        let lines = collect(Box::new(child.stdout.take().unwrap()));
        let stderr = collect(Box::new(child.stderr.take().unwrap()));
        Follower {
            name,
            child,
            lines,
            stderr,
        }
    }

    /// `curl -N` of the session's logs as SSE, following.
    fn curl(server: &Server, session: &str, user: &str) -> Follower {
        let mut c = Command::new("curl");
        c.args(["-sS", "-N", "-H", "accept: text/event-stream", "-H"])
            .arg(server.auth())
            .args(["-H", &format!("x-agent-user-id: {user}")])
            .arg(server.url(&format!("/v1/sessions/{session}/logs?follow=true")));
        Follower::spawn("curl -N", c)
    }

    /// `hangar sessions logs SESSION -f --json …`.
    fn cli(server: &Server, session: &str, extra: &[&str]) -> Follower {
        let mut c = Command::new(env!("CARGO_BIN_EXE_hangar"));
        c.args(["sessions", "logs", session, "-f", "--json"])
            .args(extra)
            .env("HANGAR_URL", server.url(""))
            .env("HANGAR_API_KEY", server.key());
        Follower::spawn("hangar sessions logs -f", c)
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// The lines as JSON objects: SSE events' data, or the CLI's JSON lines.
    fn records(&self) -> Vec<Value> {
        let lines = self.lines();
        if lines.iter().any(|l| l.starts_with("data: ")) {
            return events(&lines)
                .into_iter()
                .filter(|e| e.event.is_none())
                .map(|e| {
                    let mut d = e.data;
                    d["id"] = json!(e.id);
                    d
                })
                .collect();
        }
        lines
            .iter()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }

    /// Waits until a record whose `line` is `text` arrives, and returns it.
    fn wait_line(&mut self, text: &str, secs: u64) -> Value {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(r) = self.records().into_iter().find(|r| r["line"] == text) {
                return r;
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!(
                    "{} exited ({st}) before {text:?}:\n{}\nstderr:\n{}",
                    self.name,
                    self.lines().join("\n"),
                    self.stderr.lock().unwrap().join("\n")
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} did not see {text:?} within {secs} s; it saw:\n{}",
                self.name,
                self.lines().join("\n")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn wait_exit(&mut self, secs: u64) -> ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                // Let the reader threads take the last lines.
                std::thread::sleep(Duration::from_millis(100));
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "{} still runs {secs} s after the session was deleted",
                self.name
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `2026-11-27T10:00:00.123Z`
fn is_stamp(s: &str) -> bool {
    s.len() == 24 && s.ends_with('Z') && humantime::parse_rfc3339(s).is_ok()
}

#[test]
fn session_logs_are_stamped_followed_resumed_and_kept_across_gvisor_suspend() {
    require("runsc", "runsc");
    let mut server = Server::start();
    debian_base(&server, &BASE_PACKAGES);
    let dir = agent_dir("chatty", &chatty_yaml(""));
    deploy(&server, dir.path(), &[]);
    let (s, pid) = print(&server, None, json!({"lines": ["first words"]}));

    // Plain text: every line stamped and tagged by its stream.
    let (status, text) = logs(&server, &s, "", &[]);
    assert_eq!(status, 200, "{text}");
    let tagged = |stream: &str, line: &str| {
        text.lines().any(|l| {
            l.split_once(' ')
                .is_some_and(|(ts, rest)| is_stamp(ts) && rest == format!("{stream} {line}"))
        })
    };
    assert!(tagged("stdout", "chatty listening on 8088"), "{text}");
    assert!(tagged("stderr", "chatty says hello on stderr"), "{text}");
    assert!(tagged("stdout", "first words"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.contains(" hangar-init: agent started (pid ")),
        "{text}"
    );

    // Another end user's key sees no such session, followed or not, under either path.
    for path in [
        format!("/v1/sessions/{s}/logs"),
        format!("/v1/sessions/{s}/logs?follow=true&format=sse"),
        format!("/v1/agents/chatty/sessions/{s}/logs?follow=true"),
    ] {
        let r = http(
            &server,
            "GET",
            &path,
            &[("x-agent-user-id", "mallory")],
            None,
        );
        assert_eq!(r.status, 404, "{path}: {}", r.text());
        assert!(!r.text().contains("chatty"), "{}", r.text());
    }

    // Two followers: curl -N on the SSE endpoint and the real CLI.
    let mut curl = Follower::curl(&server, &s, "alice");
    let mut cli = Follower::cli(&server, &s, &[]);
    curl.wait_line("first words", 30);
    cli.wait_line("first words", 30);

    print(&server, Some(&s), json!({"lines": ["marker out"]}));
    print(
        &server,
        Some(&s),
        json!({"lines": ["marker err"], "stream": "stderr"}),
    );
    print(&server, Some(&s), json!({"raw": hex(b"bad \xff byte\n")}));
    for f in [&mut curl, &mut cli] {
        let out = f.wait_line("marker out", 30);
        assert_eq!(out["stream"], "stdout", "{out}");
        assert!(is_stamp(out["ts"].as_str().unwrap()), "{out}");
        assert!(out["id"].as_u64().unwrap() > 0, "{out}");
        assert_eq!(f.wait_line("marker err", 30)["stream"], "stderr");
        assert_eq!(f.wait_line("bad \u{fffd} byte", 30)["stream"], "stdout");
    }

    // SSE, whole: one event per line, ids increasing; Last-Event-ID resumes after a line.
    let all = sse(&server, &s, "tail_bytes=0", &[]);
    assert!(all.windows(2).all(|w| w[0].id < w[1].id), "{all:?}");
    let out = all.iter().find(|e| e.data["line"] == "marker out").unwrap();
    let id = out.id.unwrap().to_string();
    let resumed = sse(&server, &s, "", &[("last-event-id", &id)]);
    assert_eq!(
        resumed,
        all.iter()
            .filter(|e| e.id > out.id)
            .cloned()
            .collect::<Vec<_>>()
    );
    assert_eq!(texts(&resumed)[0], "marker err");

    // Filters: since a stamp, one stream, the last lines.
    let err = all.iter().find(|e| e.data["line"] == "marker err").unwrap();
    let since = sse(
        &server,
        &s,
        &format!("since={}", err.data["ts"].as_str().unwrap()),
        &[],
    );
    assert_eq!(texts(&since)[0], "marker err", "{since:?}");
    assert!(!texts(&since).contains(&"marker out".to_owned()));
    let stderr = sse(&server, &s, "stream=stderr&tail_bytes=0", &[]);
    assert!(stderr.iter().all(|e| e.data["stream"] == "stderr"));
    assert_eq!(
        texts(&stderr),
        ["chatty says hello on stderr", "marker err"]
    );
    assert_eq!(
        texts(&sse(&server, &s, "tail=2&stream=stdout", &[])),
        ["marker out", "bad \u{fffd} byte"]
    );
    let out = common::agents::cli(&server, &["sessions", "logs", &s, "--tail", "1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(last.ends_with(" stdout bad \u{fffd} byte\n"), "{last:?}");
    assert_eq!(last.lines().count(), 1, "{last}");

    // A line before a suspend and one after the resume, from the same process (the memory
    // checkpoint kept it): both are in the log and both followers see them.
    print(&server, Some(&s), json!({"lines": ["before suspend"]}));
    let r = server.call("POST", &format!("/v1/sessions/{s}/suspend"), None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json()["checkpoint"]["mode"],
        "memory",
        "{}\nserver log:\n{}",
        r.text(),
        server.log()
    );
    let r = server.call("POST", &format!("/v1/sessions/{s}/resume"), None);
    assert_eq!(r.status, 200, "{}", r.text());
    let (_, after_pid) = print(&server, Some(&s), json!({"lines": ["after resume"]}));
    assert_eq!(
        after_pid, pid,
        "the memory checkpoint kept the agent process"
    );
    for f in [&mut curl, &mut cli] {
        f.wait_line("before suspend", 30);
        f.wait_line("after resume", 30);
    }
    let all = texts(&sse(&server, &s, "tail_bytes=0&stream=stdout", &[]));
    let at = |t: &str| all.iter().position(|l| l == t);
    assert!(
        at("before suspend") < at("after resume") && at("before suspend").is_some(),
        "{all:?}"
    );
    // The followers saw every line once.
    let seen: Vec<String> = curl
        .records()
        .iter()
        .map(|d| d["line"].as_str().unwrap_or_default().to_owned())
        .collect();
    for w in [
        "first words",
        "marker out",
        "marker err",
        "before suspend",
        "after resume",
    ] {
        assert_eq!(seen.iter().filter(|l| *l == w).count(), 1, "{w}: {seen:?}");
    }

    // A restart of `hangar serve` drops the connections; the sandbox runs on and the CLI
    // reconnects, resuming after the last line it showed (nothing twice).
    server.restart();
    curl.wait_exit(20);
    let (_, restarted_pid) = print(&server, Some(&s), json!({"lines": ["after restart"]}));
    assert_eq!(restarted_pid, pid, "the sandbox outlived the server");
    cli.wait_line("after restart", 60);
    let seen: Vec<Value> = cli.records();
    for w in ["first words", "after resume", "after restart"] {
        assert_eq!(
            seen.iter().filter(|r| r["line"] == w).count(),
            1,
            "{w}: {seen:?}"
        );
    }
    let mut curl = Follower::curl(&server, &s, "alice");
    curl.wait_line("after restart", 30);

    // Deleting the session ends both followers.
    let r = server.call("DELETE", &format!("/v1/sessions/{s}"), None);
    assert_eq!(r.status, 204, "{}", r.text());
    assert!(curl.wait_exit(20).success());
    assert!(
        curl.lines().iter().any(|l| l == "event: end"),
        "{:?}",
        curl.lines()
    );
    assert!(cli.wait_exit(20).success());
    assert!(
        cli.stderr
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("was deleted")),
        "{:?}",
        cli.stderr.lock().unwrap()
    );
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The numbers of the noise lines a follower received, and how many are missing between the
/// first and the last.
fn noise(records: &[Value]) -> (Vec<u64>, usize) {
    let nums: Vec<u64> = records
        .iter()
        .filter_map(|r| {
            r["line"]
                .as_str()?
                .strip_prefix("noise ")?
                .split(' ')
                .next()?
                .parse()
                .ok()
        })
        .collect();
    let (Some(first), Some(last)) = (nums.first(), nums.last()) else {
        return (nums, 0);
    };
    let distinct: std::collections::BTreeSet<u64> = nums.iter().copied().collect();
    let missing = (last - first + 1) as usize - distinct.len();
    (nums, missing)
}

#[test]
fn session_logs_rotate_under_a_noisy_agent_and_followers_keep_up() {
    const CAP_KIB: u64 = 32;
    require("runsc", "runsc");
    let server = Server::start_with(&["--console-log-max-kib", &CAP_KIB.to_string()]);
    debian_base(&server, &BASE_PACKAGES);
    let dir = agent_dir("chatty", &chatty_yaml("env: { NOISE: '1' }\n"));
    deploy(&server, dir.path(), &[]);
    let (s, _) = print(&server, None, json!({"lines": ["start"]}));
    let sandbox = server
        .call("GET", &format!("/v1/sessions/{s}"), None)
        .json()["sandbox"]
        .as_str()
        .unwrap()
        .to_owned();
    let log = server
        .data
        .path()
        .join("sandboxes")
        .join(&sandbox)
        .join("console.log");
    let rotated = log.with_file_name("console.log.1");
    let offset = log.with_file_name("console.log.offset");

    let mut curl = Follower::curl(&server, &s, "alice");
    let mut cli = Follower::cli(&server, &s, &["--stream", "stdout"]);
    curl.wait_line("start", 30);
    cli.wait_line("start", 30);

    // Until several rotations have happened, the log stays near its bound.
    let cap = CAP_KIB * 1024;
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut rotated_bytes = 0;
    while rotated_bytes < 5 * cap {
        assert!(
            Instant::now() < deadline,
            "only {rotated_bytes} bytes rotated in 120 s\nserver log:\n{}",
            server.log()
        );
        // What the agent writes in one rotation period (~30 KB/s here), with room to spare.
        let slack = 96 * 1024;
        for f in [&log, &rotated] {
            if let Ok(m) = std::fs::metadata(f) {
                assert!(
                    m.len() <= cap + slack,
                    "{} is {} bytes",
                    f.display(),
                    m.len()
                );
            }
        }
        rotated_bytes = std::fs::read_to_string(&offset)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        std::thread::sleep(Duration::from_millis(200));
    }
    for f in [&log, &rotated] {
        let bytes = std::fs::read(f).unwrap();
        assert!(!bytes.contains(&0), "{} has a hole of NULs", f.display());
    }

    // Both followers kept receiving across the rotations, in order, losing at most a line
    // per rotation (copy-truncate's window) and none in practice.
    print(&server, Some(&s), json!({"lines": ["end of noise check"]}));
    curl.wait_line("end of noise check", 30);
    cli.wait_line("end of noise check", 30);
    for f in [&curl, &cli] {
        let records = f.records();
        let (nums, missing) = noise(&records);
        assert!(
            nums.windows(2).all(|w| w[0] < w[1]),
            "{}: out of order or repeated",
            f.name
        );
        let span = nums.last().unwrap() - nums.first().unwrap();
        eprintln!(
            "{}: followed noise lines {}..={} ({missing} missing) while {rotated_bytes} bytes were rotated",
            f.name,
            nums.first().unwrap(),
            nums.last().unwrap()
        );
        let lines_per_rotation = cap / 170;
        assert!(
            span > 4 * lines_per_rotation,
            "{}: only {span} noise lines followed",
            f.name
        );
        assert!(missing <= 5, "{}: {missing} noise lines missing", f.name);
        if f.name.starts_with("hangar") {
            assert!(records.iter().all(|r| r["stream"] == "stdout"));
        }
    }

    let r = server.call("DELETE", &format!("/v1/sessions/{s}"), None);
    assert_eq!(r.status, 204, "{}", r.text());
    assert!(curl.wait_exit(20).success());
    assert!(cli.wait_exit(20).success());
}
