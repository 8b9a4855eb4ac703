//! Every protocol on every agent: AG-UI and the Activity Protocol mapped onto an agent's
//! `/responses`, and `hangar check`, the OpenResponses conformance suite. AG-UI runs are read
//! by `tests/py/agui_run.py`, which validates each event with the AG-UI SDK's own models; the
//! Bot Framework is played by `tests/py/fake_channel.py` (real RS256 JWTs minted with PyJWT,
//! a token endpoint, a connector that records replies), on loopback.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use common::agents::{
    agent_dir, cli, deploy, http, http_anonymous, repo_dir, tests_dir, HResp, BASE_PACKAGES,
};
use common::channel::{Channel, APP_ID};
use common::images::debian_base;
use common::{venv_python, Server};

/// One AG-UI run through `agui_run.py`; its summary (events, text, tool calls, violations).
fn agui(server: &Server, agent: &str, user: &str, input: &Value) -> Value {
    let out = Command::new(venv_python())
        .arg(tests_dir().join("py/agui_run.py"))
        .arg(server.url(&format!("/agents/{agent}/ag-ui")))
        .args(["--user", user, "--input", &input.to_string()])
        .env("HANGAR_API_KEY", server.key())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let summary: Value =
        serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap_or_else(|e| {
            panic!(
                "agui_run.py printed no summary ({e}):\n{stdout}\n{}\nserver log:\n{}",
                String::from_utf8_lossy(&out.stderr),
                server.log()
            )
        });
    assert!(
        out.status.success(),
        "the AG-UI stream broke the protocol: {}\n{summary:#}",
        summary["errors"]
    );
    summary
}

/// A message activity from a Teams-like channel.
fn activity(channel: &Channel, conversation: &str, id: &str, text: &str) -> Value {
    json!({
        "type": "message",
        "id": id,
        "channelId": "msteams",
        "serviceUrl": channel.url("/"),
        "from": {"id": "29:user-alice", "name": "Alice", "aadObjectId": "aad-alice"},
        "recipient": {"id": "28:bot", "name": "notes"},
        "conversation": {"id": conversation},
        "locale": "en-US",
        "text": text,
    })
}

fn post_activity(server: &Server, agent: &str, token: Option<&str>, body: &Value) -> HResp {
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![];
    if let Some(a) = &auth {
        headers.push(("authorization", a.as_str()));
    }
    http_anonymous(
        server,
        "POST",
        &format!("/agents/{agent}/api/messages"),
        &headers,
        Some(&serde_json::to_vec(body).unwrap()),
    )
}

/// A copy of an example with `extra` appended to its agent.yaml.
fn example_with(name: &str, extra: &str) -> tempfile::TempDir {
    let src = repo_dir().join("examples").join(name);
    let dir = tempfile::Builder::new()
        .prefix("hangar-example-")
        .tempdir()
        .unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), dir.path().join(e.file_name())).unwrap();
        }
    }
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(dir.path().join("agent.yaml"))
        .unwrap();
    f.write_all(extra.as_bytes()).unwrap();
    dir
}

/// The run's event types, repeats collapsed (`CONTENT` ×3 is one `CONTENT`).
fn kinds(run: &Value) -> Vec<String> {
    let mut out: Vec<String> = vec![];
    for t in run["types"].as_array().unwrap() {
        let t = t.as_str().unwrap();
        if out.last().map(String::as_str) != Some(t) {
            out.push(t.to_owned());
        }
    }
    out
}

fn session_count(server: &Server, agent: &str) -> usize {
    server
        .call("GET", &format!("/v1/agents/{agent}/sessions"), None)
        .json()["sessions"]
        .as_array()
        .unwrap()
        .len()
}

fn check(server: &Server, agent: &str) -> (bool, String) {
    let out = cli(server, &["check", agent]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn set_secret(server: &Server, agent: &str, name: &str, value: &str) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_hangar"))
        .args(["secrets", "set", agent, name])
        .env("HANGAR_URL", server.url(""))
        .env("HANGAR_API_KEY", server.key())
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{value}\n").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn notes_speaks_ag_ui_activity_and_passes_hangar_check() {
    let server = Server::start();
    debian_base(&server, &BASE_PACKAGES);
    let channel = Channel::start();
    let dir = example_with("notes", &channel.yaml("    client_secret: bot-secret\n"));
    deploy(&server, dir.path(), &[]);
    set_secret(&server, "notes", "bot-secret", "s3cret-value");
    let listed = cli(&server, &["secrets", "ls", "notes", "--json"]);
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(
        listed.contains("bot-secret") && !listed.contains("s3cret"),
        "{listed}"
    );

    // ---- hangar check: the conformance suite passes, tool calling included.
    let (ok, text) = check(&server, "notes");
    assert!(ok, "hangar check notes failed:\n{text}");
    assert!(text.contains("pass  tool calling"), "{text}");
    assert!(text.contains("pass  streaming"), "{text}");

    // ---- AG-UI: a run, then the same thread again (same session, the notes are there).
    let first = agui(
        &server,
        "notes",
        "alice",
        &json!({"threadId": "t1", "runId": "r1", "messages": [
            {"id": "u1", "role": "user", "content": "note: buy milk"}
        ], "tools": [], "context": [], "state": {}, "forwardedProps": {}}),
    );
    assert_eq!(
        kinds(&first),
        [
            "RUN_STARTED",
            "TEXT_MESSAGE_START",
            "TEXT_MESSAGE_CONTENT",
            "TEXT_MESSAGE_END",
            "RUN_FINISHED"
        ],
        "{first:#}"
    );
    assert_eq!(first["text"], "noted (1 notes)");
    let assistant_id = first["events"][1]["messageId"].as_str().unwrap().to_owned();
    let second = agui(
        &server,
        "notes",
        "alice",
        &json!({"threadId": "t1", "runId": "r2", "messages": [
            {"id": "u1", "role": "user", "content": "note: buy milk"},
            {"id": assistant_id, "role": "assistant", "content": "noted (1 notes)"},
            {"id": "u2", "role": "user", "content": "what are my notes?"}
        ]}),
    );
    assert_eq!(
        second["session"], first["session"],
        "the thread keeps its session"
    );
    assert_eq!(second["text"], "buy milk");
    // Another user's thread of the same name is another session.
    let bob = agui(
        &server,
        "notes",
        "bob",
        &json!({"threadId": "t1", "runId": "r1", "messages": [{"id": "u1", "role": "user", "content": "list"}]}),
    );
    assert_ne!(bob["session"], first["session"]);
    assert_eq!(bob["text"], "no notes yet");

    // A run with tools: the agent calls one; its result comes back in the next run.
    let tools = json!([{"name": "get_weather", "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]);
    let call = agui(
        &server,
        "notes",
        "alice",
        &json!({"threadId": "t2", "runId": "r1", "tools": tools, "messages": [
            {"id": "w1", "role": "user", "content": "What is the weather? Use get_weather with city=Paris."}
        ]}),
    );
    assert_eq!(
        kinds(&call),
        [
            "RUN_STARTED",
            "TOOL_CALL_START",
            "TOOL_CALL_ARGS",
            "TOOL_CALL_END",
            "RUN_FINISHED"
        ],
        "{call:#}"
    );
    let tc = &call["tool_calls"][0];
    assert_eq!(tc["name"], "get_weather");
    assert_eq!(
        serde_json::from_str::<Value>(tc["args"].as_str().unwrap()).unwrap(),
        json!({"city": "Paris"})
    );
    let parent = call["events"][1]["parentMessageId"]
        .as_str()
        .unwrap()
        .to_owned();
    let result = agui(
        &server,
        "notes",
        "alice",
        &json!({"threadId": "t2", "runId": "r2", "tools": tools, "messages": [
            {"id": "w1", "role": "user", "content": "What is the weather? Use get_weather with city=Paris."},
            {"id": parent, "role": "assistant", "toolCalls": [{"id": tc["id"], "type": "function", "function": {"name": "get_weather", "arguments": tc["args"]}}]},
            {"id": "w2", "role": "tool", "toolCallId": tc["id"], "content": "{\"temperature_c\": 21}"}
        ]}),
    );
    assert_eq!(
        result["text"], "get_weather returned: {\"temperature_c\": 21}",
        "{result:#}"
    );
    assert_eq!(result["session"], call["session"]);

    // Bad AG-UI input is a 400 before any stream, and makes no session.
    let before = session_count(&server, "notes");
    for bad in [
        &b"{not json"[..],
        br#"{"threadId": "x"}"#,
        br#"{"threadId": "", "runId": "r", "messages": []}"#,
    ] {
        let r = http(
            &server,
            "POST",
            "/agents/notes/ag-ui",
            &[("x-agent-user-id", "carol")],
            Some(bad),
        );
        assert_eq!(r.status, 400, "{}", r.text());
        assert!(r.json()["error"]["message"].is_string());
    }
    assert_eq!(session_count(&server, "notes"), before);
    // Without an end user there is no AG-UI (thread ids are guessable).
    let r = http(
        &server,
        "POST",
        "/agents/notes/ag-ui",
        &[],
        Some(br#"{"threadId": "t1", "runId": "r9", "messages": [{"id": "x", "role": "user", "content": "list"}]}"#),
    );
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(session_count(&server, "notes"), before);

    // ---- Activity Protocol, expectReplies: a note added in one activity is listed later.
    let service_url = channel.url("/");
    let token = channel.token(json!({"aud": APP_ID, "serviceurl": service_url}));
    let mut a1 = activity(&channel, "a:conv-1", "act-1", "note: pay rent");
    a1["deliveryMode"] = json!("expectReplies");
    let r = post_activity(&server, "notes", Some(&token), &a1);
    assert_eq!(r.status, 200, "{}\n{}", r.text(), server.log());
    let replies = r.json()["activities"].clone();
    let reply = &replies[0];
    assert_eq!(reply["type"], "message");
    assert_eq!(reply["text"], "noted (1 notes)");
    assert_eq!(reply["replyToId"], "act-1");
    assert_eq!(reply["from"], a1["recipient"]);
    assert_eq!(reply["recipient"], a1["from"]);
    assert_eq!(reply["conversation"], a1["conversation"]);
    assert_eq!(reply["channelId"], "msteams");
    assert_eq!(reply["serviceUrl"], service_url);
    let mut a2 = activity(&channel, "a:conv-1", "act-2", "list");
    a2["deliveryMode"] = json!("expectReplies");
    let r2 = post_activity(&server, "notes", Some(&token), &a2);
    assert_eq!(
        r2.json()["activities"][0]["text"],
        "pay rent",
        "{}",
        r2.text()
    );
    assert_eq!(
        r2.header("x-agent-session-id"),
        r.header("x-agent-session-id")
    );

    // Asynchronous: 202 at once, then a typing activity and the reply at the connector,
    // sent with the bot's token (client credentials with the secret).
    let a3 = activity(&channel, "a:conv-1", "act-3;x@y", "note: call mom");
    let t0 = Instant::now();
    let r3 = post_activity(&server, "notes", Some(&token), &a3);
    assert_eq!(r3.status, 202, "{}", r3.text());
    assert!(t0.elapsed() < Duration::from_secs(5));
    let replies = channel.replies(2, &server);
    assert_eq!(replies[0]["body"]["type"], "typing", "{replies:#?}");
    let reply = &replies[1];
    assert_eq!(
        reply["path"], "/v3/conversations/a%3Aconv-1/activities/act-3%3Bx%40y",
        "{reply:#}"
    );
    assert_eq!(reply["authorization"], format!("Bearer bot-token-{APP_ID}"));
    assert!(reply["content_type"]
        .as_str()
        .unwrap()
        .starts_with("application/json"));
    assert_eq!(reply["body"]["text"], "noted (2 notes)");
    assert_eq!(reply["body"]["replyToId"], "act-3;x@y");
    assert_eq!(reply["body"]["recipient"], a3["from"]);
    let token_req = channel
        .recorded()
        .into_iter()
        .find(|r| r["kind"] == "token")
        .expect("a token request");
    assert_eq!(
        token_req["form"],
        json!({"grant_type": "client_credentials", "client_id": APP_ID, "client_secret": "s3cret-value",
               "scope": "https://api.botframework.com/.default"})
    );

    // conversationUpdate and other types are acknowledged, and reach no agent.
    let before = session_count(&server, "notes");
    let mut update = activity(&channel, "a:conv-9", "act-9", "");
    update["type"] = json!("conversationUpdate");
    update["membersAdded"] = json!([{"id": "28:bot"}]);
    let r = post_activity(&server, "notes", Some(&token), &update);
    assert_eq!(r.status, 202, "{}", r.text());

    // Bad credentials are 401 and change nothing.
    let bad_tokens = [
        ("no token", None),
        (
            "alg none",
            Some(channel.token(json!({"aud": APP_ID, "serviceurl": service_url, "alg": "none"}))),
        ),
        (
            "another audience",
            Some(channel.token(json!({"aud": "someone-else", "serviceurl": service_url}))),
        ),
        (
            "expired",
            Some(channel.token(json!({"aud": APP_ID, "serviceurl": service_url, "exp_in": -900}))),
        ),
        (
            "another issuer",
            Some(channel.token(
                json!({"aud": APP_ID, "serviceurl": service_url, "iss": "https://evil.example"}),
            )),
        ),
        (
            "an unknown key",
            Some(channel.token(json!({"aud": APP_ID, "serviceurl": service_url, "key": "other"}))),
        ),
        (
            "HS256",
            Some(channel.token(json!({"aud": APP_ID, "serviceurl": service_url, "alg": "HS256"}))),
        ),
        (
            "another serviceUrl",
            Some(channel.token(json!({"aud": APP_ID, "serviceurl": "https://evil.example/"}))),
        ),
        ("not a JWT", Some("garbage".to_owned())),
    ];
    let recorded = channel.recorded().len();
    // A key endorsed for other channels does not sign for this one.
    let mut webchat = activity(&channel, "a:conv-x", "act-x", "note: forged");
    webchat["channelId"] = json!("webchat");
    let r = post_activity(&server, "notes", Some(&token), &webchat);
    assert_eq!(r.status, 401, "{}", r.text());
    assert!(r.text().contains("endorsed"), "{}", r.text());
    for (what, token) in &bad_tokens {
        let r = post_activity(
            &server,
            "notes",
            token.as_deref(),
            &activity(&channel, "a:conv-x", "act-x", "note: forged"),
        );
        assert_eq!(r.status, 401, "{what}: {}", r.text());
        assert_eq!(r.json()["error"]["code"], "unauthorized", "{what}");
    }
    assert_eq!(
        session_count(&server, "notes"),
        before,
        "a refused activity made a session"
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        channel.recorded().len(),
        recorded,
        "a refused activity was answered"
    );
    let r = post_activity(&server, "notes", Some(&token), &{
        let mut a = activity(&channel, "a:conv-1", "act-4", "list");
        a["deliveryMode"] = json!("expectReplies");
        a
    });
    assert!(!r.text().contains("forged"), "{}", r.text());

    // A valid token without a serviceurl claim is accepted; nothing vouches for its
    // serviceUrl, so the bot's token would not go there (expectReplies needs none).
    let plain = channel.token(json!({"aud": APP_ID}));
    let mut a = activity(&channel, "a:conv-1", "act-5", "list");
    a["deliveryMode"] = json!("expectReplies");
    let r = post_activity(&server, "notes", Some(&plain), &a);
    assert_eq!(r.status, 200, "{}", r.text());
    // An invoke wants an answer of its own: not mapped.
    let mut invoke = activity(&channel, "a:conv-1", "act-6", "");
    invoke["type"] = json!("invoke");
    invoke["name"] = json!("adaptiveCard/action");
    let r = post_activity(&server, "notes", Some(&token), &invoke);
    assert_eq!(r.status, 501, "{}", r.text());
    // A serviceUrl that is not https (or this machine) is refused before anything runs.
    let mut far = activity(&channel, "a:conv-1", "act-7", "list");
    far["serviceUrl"] = json!("http://example.com/");
    let far_token = channel.token(json!({"aud": APP_ID, "serviceurl": "http://example.com/"}));
    let r = post_activity(&server, "notes", Some(&far_token), &far);
    assert_eq!(r.status, 400, "{}", r.text());
}

/// Mapped streams stay streams: with an agent that pauses between events, the first AG-UI
/// event and the Activity `typing` leave Hangar long before the agent's stream ends.
#[test]
fn mapped_streams_stay_streams() {
    let server = Server::start();
    debian_base(&server, &BASE_PACKAGES);
    let channel = Channel::start();
    let yaml = format!(
        "name: probe\nbuild: {{ dockerfile: Dockerfile }}\nisolation: gvisor\nresources: {{ cpus: 1, memory: 256Mi, disk: 64Mi }}\nstartup_timeout: 30s\n{}",
        channel.yaml("    anonymous: true\n")
    );
    let dir = agent_dir("probe", &yaml);
    deploy(&server, dir.path(), &[]);
    // Warm the session so that the timing is the stream's, not a cold start's.
    let warm = agui(
        &server,
        "probe",
        "alice",
        &json!({"threadId": "s", "runId": "r0", "messages": [{"id": "m0", "role": "user", "content": "hi"}]}),
    );
    let run = agui(
        &server,
        "probe",
        "alice",
        &json!({"threadId": "s", "runId": "r1", "messages": [{"id": "m1", "role": "user", "content": "slow please"}]}),
    );
    assert_eq!(run["session"], warm["session"]);
    let first = run["events"][0]["t"].as_f64().unwrap();
    let content = run["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["type"] == "TEXT_MESSAGE_CONTENT")
        .unwrap()["t"]
        .as_f64()
        .unwrap();
    let end = run["end"].as_f64().unwrap();
    assert!(
        end - first > 1.2 && end - content > 1.2,
        "AG-UI was buffered: {run:#}"
    );

    // Activity, anonymous (allowed by this agent's config): typing comes while the agent
    // still streams; the reply when it is done; no bot token is sent for an anonymous call.
    let r = post_activity(
        &server,
        "probe",
        None,
        &activity(&channel, "c-slow", "a1", "slow please"),
    );
    assert_eq!(r.status, 202, "{}", r.text());
    let replies = channel.replies(2, &server);
    assert_eq!(replies[0]["body"]["type"], "typing");
    let gap = replies[1]["t"].as_f64().unwrap() - replies[0]["t"].as_f64().unwrap();
    assert!(
        gap > 1.2,
        "typing came only {gap:.2} s before the reply: {replies:#?}"
    );
    assert!(replies[1]["authorization"].is_null(), "{replies:#?}");
    assert!(replies[1]["body"]["text"]
        .as_str()
        .unwrap()
        .contains("slow please"));
}

/// `hangar check` fails a broken agent with precise messages.
#[test]
fn hangar_check_fails_a_broken_agent_precisely() {
    let server = Server::start();
    debian_base(&server, &BASE_PACKAGES);
    let dir: &Path = &tests_dir().join("agents/broken");
    deploy(&server, dir, &[]);
    let (ok, text) = check(&server, "broken");
    assert!(!ok, "the broken agent passed:\n{text}");
    for needle in [
        "FAIL  basic",
        "FAIL  streaming",
        "created_at",
        "status",
        "the stream does not end with `data: [DONE]`",
        "no terminal event",
        "response.output_text.delta for output item 0, never added",
        "sequence_number 2 after 3",
    ] {
        assert!(text.contains(needle), "no {needle:?} in:\n{text}");
    }
    let out = cli(&server, &["check", "broken", "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["passed"], false);
    assert_eq!(v["cases"][0]["case"], "basic");
}
