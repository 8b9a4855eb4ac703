//! Authentication: every endpoint but `/healthz` needs an API key; roles decide what a key may
//! do; only a key with `assert-user` may name the end user, and a key without it is an end
//! user of its own. `hangar serve` makes the admin key in its data directory (0600), where the
//! CLI finds it.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};

use serde_json::{json, Value};

use common::agents::{http, http_anonymous};
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
