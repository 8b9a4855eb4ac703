//! Authentication: every endpoint but `/healthz` needs an API key; roles decide what a key may
//! do; only a key with `assert-user` may name the end user, and a key without it is an end
//! user of its own. `hangar serve` makes the admin key in its data directory (0600), where the
//! CLI finds it.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};

use serde_json::{json, Value};

use common::agents::{agent_dir, deploy, http, http_anonymous, BASE_PACKAGES};
use common::channel::Channel;
use common::images::debian_base;
use common::{require, Rootfs, Server};

fn new_key(server: &Server, body: Value) -> (String, String) {
    let r = http(
        server,
        "POST",
        "/v1/keys",
        &[],
        Some(body.to_string().as_bytes()),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let v = r.json();
    (
        v["id"].as_str().unwrap().to_owned(),
        v["key"].as_str().unwrap().to_owned(),
    )
}

#[test]
fn api_keys_authenticate_and_roles_authorise() {
    require("crun", "crun");
    let rootfs = Rootfs::busybox();
    let server = Server::start();

    // The admin key: in the data directory, readable by root only; the CLI finds it there.
    let file = server.data.path().join("admin-key");
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let out = Command::new(env!("CARGO_BIN_EXE_hangar"))
        .args(["keys", "ls", "--json"])
        .env("HANGAR_URL", server.url(""))
        .env("HANGAR_DATA_DIR", server.data.path())
        .env_remove("HANGAR_API_KEY")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed["keys"][0]["role"], "admin");
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains(&server.key()),
        "a key was shown again"
    );

    // No key, a wrong key: 401 everywhere but /healthz, and nothing happens.
    let body = json!({"driver": "container", "image": rootfs.path()}).to_string();
    for headers in [
        vec![],
        vec![("authorization", "Bearer hk_0000_ffff")],
        vec![("x-api-key", "nope")],
    ] {
        for (method, path) in [
            ("GET", "/v1/sandboxes"),
            ("POST", "/v1/sandboxes"),
            ("GET", "/v1/agents"),
            ("POST", "/agents/notes/responses"),
            ("GET", "/v1/audit"),
            ("GET", "/v1/keys"),
        ] {
            let r = http_anonymous(&server, method, path, &headers, Some(body.as_bytes()));
            assert_eq!(
                r.status,
                401,
                "{method} {path} with {headers:?}: {}",
                r.text()
            );
            assert_eq!(r.json()["error"]["code"], "unauthorized");
            assert!(r.header("www-authenticate").is_some());
        }
    }
    assert!(
        server.call("GET", "/v1/sandboxes", None).json()["sandboxes"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        http_anonymous(&server, "GET", "/healthz", &[], None).status,
        200
    );

    // Roles: an invoker may only call agents; a deployer may not manage keys, secrets or
    // read the audit trail.
    let (_, invoker) = new_key(&server, json!({"name": "app", "role": "invoker"}));
    let bearer = format!("Bearer {invoker}");
    for (method, path) in [
        ("GET", "/v1/agents"),
        ("POST", "/v1/sandboxes"),
        ("GET", "/v1/keys"),
    ] {
        let r = http(
            &server,
            method,
            path,
            &[("authorization", &bearer)],
            Some(body.as_bytes()),
        );
        assert_eq!(r.status, 403, "{method} {path} as invoker: {}", r.text());
    }
    // An invoker reaches the data plane (an unknown agent is its 404, not a 401/403)...
    let r = http(
        &server,
        "POST",
        "/agents/ghost/responses",
        &[("authorization", &bearer)],
        Some(br#"{"input": "x"}"#),
    );
    assert_eq!(r.status, 404, "{}", r.text());
    // ... but may not name an end user without assert-user.
    let r = http(
        &server,
        "POST",
        "/agents/ghost/responses",
        &[("authorization", &bearer), ("x-agent-user-id", "alice")],
        Some(br#"{"input": "x"}"#),
    );
    assert_eq!(r.status, 403, "{}", r.text());
    assert!(r.text().contains("assert-user"), "{}", r.text());
    let (_, asserting) = new_key(
        &server,
        json!({"name": "gateway", "role": "invoker", "assert_user": true}),
    );
    let r = http(
        &server,
        "POST",
        "/agents/ghost/responses",
        &[("x-api-key", &asserting), ("x-agent-user-id", "alice")],
        Some(br#"{"input": "x"}"#),
    );
    assert_eq!(r.status, 404, "{}", r.text());

    let (deployer_id, deployer) = new_key(&server, json!({"name": "ci", "role": "deployer"}));
    let dbear = format!("Bearer {deployer}");
    let r = http(
        &server,
        "POST",
        "/v1/sandboxes",
        &[("authorization", &dbear)],
        Some(body.as_bytes()),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_owned();
    for (method, path) in [
        ("GET", "/v1/audit"),
        ("GET", "/v1/keys"),
        ("PUT", "/v1/agents/x/secrets/y"),
    ] {
        let r = http(
            &server,
            method,
            path,
            &[("authorization", &dbear)],
            Some(b"v"),
        );
        assert_eq!(r.status, 403, "{method} {path} as deployer: {}", r.text());
    }
    // The audit trail names the key that acted.
    let audit = server.call("GET", "/v1/audit", None).json();
    let created = audit["records"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["action"] == "sandbox.create")
        .unwrap()
        .clone();
    assert_eq!(created["actor"], format!("key:{deployer_id}"));

    // Revoked: 401 at once.
    let r = http(
        &server,
        "DELETE",
        &format!("/v1/keys/{deployer_id}"),
        &[],
        None,
    );
    assert_eq!(r.status, 204, "{}", r.text());
    let r = http(
        &server,
        "GET",
        "/v1/sandboxes",
        &[("authorization", &dbear)],
        None,
    );
    assert_eq!(r.status, 401);
    // Bad key requests change nothing.
    for bad in [
        &br#"{"name": "x", "role": "root"}"#[..],
        br#"{"name": "", "role": "admin"}"#,
        b"{",
    ] {
        let r = http(&server, "POST", "/v1/keys", &[], Some(bad));
        assert_eq!(r.status, 400, "{}", r.text());
    }
    server.delete(&id);

    // A restart keeps the admin key (and every other).
    let mut server = server;
    let before = server.key();
    server.restart();
    assert_eq!(server.key(), before);
    assert_eq!(server.call("GET", "/v1/keys", None).status, 200);
}

/// End users signed in with an OpenID Connect provider call agents with its JWTs: the token's
/// `sub` is the isolation key, and a bad token of any kind is 401.
#[test]
fn oidc_tokens_authenticate_end_users_on_the_data_plane() {
    let channel = Channel::start();
    let issuer = channel.url("");
    let server = Server::start_with(&["--oidc-issuer", &issuer, "--oidc-audience", "hangar-test"]);
    debian_base(&server, &BASE_PACKAGES);
    let yaml = "name: probe\nbuild: { dockerfile: Dockerfile }\nisolation: gvisor\nresources: { cpus: 1, memory: 256Mi, disk: 64Mi }\nstartup_timeout: 30s\n";
    let dir = agent_dir("probe", yaml);
    deploy(&server, dir.path(), &[]);
    let token = |claims: Value| channel.token(claims);
    let good = |sub: &str| token(json!({"aud": "hangar-test", "iss": issuer, "sub": sub}));
    let call = |t: &str, path: &str, body: &Value| {
        http(
            &server,
            "POST",
            path,
            &[("authorization", &format!("Bearer {t}"))],
            Some(body.to_string().as_bytes()),
        )
    };

    // Alice's token: her session.
    let alice = good("alice");
    let r = call(&alice, "/agents/probe/responses", &json!({"input": "hi"}));
    assert_eq!(r.status, 200, "{}\n{}", r.text(), server.log());
    let session = r.header("x-agent-session-id").unwrap().to_owned();
    let resp_id = r.json()["id"].as_str().unwrap().to_owned();
    let again = call(
        &alice,
        "/agents/probe/responses",
        &json!({"input": "hi", "previous_response_id": resp_id}),
    );
    assert_eq!(again.header("x-agent-session-id"), Some(session.as_str()));
    // Bob's token cannot reach it by any name.
    let bob = good("bob");
    for body in [
        json!({"input": "x", "agent_session_id": session}),
        json!({"input": "x", "previous_response_id": resp_id}),
    ] {
        let r = call(&bob, "/agents/probe/responses", &body);
        assert_eq!(r.status, 404, "{body}: {}", r.text());
    }
    let r = call(
        &bob,
        &format!("/agents/probe/invocations?agent_session_id={session}"),
        &json!({}),
    );
    assert_eq!(r.status, 404, "{}", r.text());
    // A signed-in user may not name another.
    let r = http(
        &server,
        "POST",
        "/agents/probe/responses",
        &[
            ("authorization", &format!("Bearer {bob}")),
            ("x-agent-user-id", "alice"),
        ],
        Some(br#"{"input": "x"}"#),
    );
    assert_eq!(r.status, 403, "{}", r.text());

    // Forged, expired, wrong audience, wrong issuer, unsigned and HMAC-with-the-public-key
    // tokens: 401, and no session is made.
    let sessions = || {
        server.call("GET", "/v1/agents/probe/sessions", None).json()["sessions"]
            .as_array()
            .unwrap()
            .len()
    };
    let before = sessions();
    for (what, t) in [
        (
            "forged",
            token(json!({"aud": "hangar-test", "iss": issuer, "sub": "alice", "key": "other"})),
        ),
        (
            "expired",
            token(json!({"aud": "hangar-test", "iss": issuer, "sub": "alice", "exp_in": -900})),
        ),
        (
            "not yet valid",
            token(json!({"aud": "hangar-test", "iss": issuer, "sub": "alice", "nbf_in": 900})),
        ),
        (
            "another audience",
            token(json!({"aud": "someone-else", "iss": issuer, "sub": "alice"})),
        ),
        (
            "another issuer",
            token(json!({"aud": "hangar-test", "iss": "https://evil.example", "sub": "alice"})),
        ),
        (
            "alg none",
            token(json!({"aud": "hangar-test", "iss": issuer, "sub": "alice", "alg": "none"})),
        ),
        (
            "HS256 with the public key",
            token(json!({"aud": "hangar-test", "iss": issuer, "sub": "alice", "alg": "HS256"})),
        ),
        (
            "no sub",
            token(json!({"aud": "hangar-test", "iss": issuer})),
        ),
        ("garbage", "a.b.c".to_owned()),
    ] {
        let r = call(
            &t,
            "/agents/probe/responses",
            &json!({"input": "x", "agent_session_id": session}),
        );
        assert_eq!(r.status, 401, "{what}: {}", r.text());
        assert_eq!(r.json()["error"]["code"], "unauthorized", "{what}");
    }
    assert_eq!(sessions(), before);
    // The control plane takes API keys only.
    let r = http(
        &server,
        "GET",
        "/v1/agents",
        &[("authorization", &format!("Bearer {alice}"))],
        None,
    );
    assert_eq!(r.status, 401, "{}", r.text());
    // The audit trail names the signed-in user (a call's record is written beside its
    // answer, so it may land a moment later).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let audit = loop {
        let audit = server.call("GET", "/v1/audit", None).json();
        let found = audit["records"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["actor"] == "oidc:alice");
        if found || std::time::Instant::now() > deadline {
            break audit;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert!(
        audit["records"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["actor"] == "oidc:alice"),
        "{audit:#}"
    );
}
