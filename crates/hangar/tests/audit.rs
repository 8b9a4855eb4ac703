//! The audit trail: every change is recorded with who, what, when and the request id, and
//! `hangar audit verify` finds an edited, removed or reordered record by its position. The
//! tampering is done on the real SQLite file, with Python's sqlite3, while Hangar runs.

mod common;

use std::process::Command;

use serde_json::{json, Value};

use common::agents::{cli, http};
use common::{require, Rootfs, Server};

fn sql(server: &Server, statement: &str) -> String {
    let db = server.data.path().join("hangar.db");
    let out = Command::new("python3")
        .args([
            "-c",
            "import sqlite3, sys, json\n\
             c = sqlite3.connect(sys.argv[1], timeout=10)\n\
             rows = c.execute(sys.argv[2]).fetchall()\n\
             c.commit()\n\
             print(json.dumps(rows))",
        ])
        .arg(&db)
        .arg(statement)
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "{statement}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn verify(server: &Server) -> (bool, String) {
    let out = cli(server, &["audit", "verify"]);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn records(server: &Server, args: &[&str]) -> Vec<Value> {
    let mut all = vec!["audit", "ls", "--json"];
    all.extend_from_slice(args);
    let out = cli(server, &all);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["records"].as_array().unwrap().clone()
}

#[test]
fn the_audit_trail_records_changes_and_shows_tampering() {
    require("crun", "crun");
    require("python3", "python3");
    let rootfs = Rootfs::busybox();
    let server = Server::start();

    // Changes, each answered with its request id.
    let body = json!({"driver": "container", "image": rootfs.path()}).to_string();
    let created = http(
        &server,
        "POST",
        "/v1/sandboxes",
        &[("x-request-id", "req-mine-1")],
        Some(body.as_bytes()),
    );
    assert_eq!(created.status, 201, "{}", created.text());
    assert_eq!(created.header("x-request-id"), Some("req-mine-1"));
    let id = created.json()["id"].as_str().unwrap().to_owned();
    let exec = http(
        &server,
        "POST",
        &format!("/v1/sandboxes/{id}/exec"),
        &[],
        Some(br#"{"cmd": ["sh", "-c", "echo hi"]}"#),
    );
    assert_eq!(exec.status, 200, "{}", exec.text());
    let exec_id = exec.header("x-request-id").unwrap().to_owned();
    assert!(exec_id.starts_with("req_"), "{exec_id}");
    let put = http(
        &server,
        "PUT",
        &format!("/v1/sandboxes/{id}/files/content?path=/tmp/x"),
        &[("content-type", "application/octet-stream")],
        Some(b"data"),
    );
    assert!(put.status < 300, "{}", put.text());
    // A refused change is recorded too (who tried what), with its status.
    let bad = http(
        &server,
        "POST",
        "/v1/agents/ghost/versions",
        &[("x-agent-user-id", "mallory")],
        Some(b"{not json"),
    );
    assert_eq!(bad.status, 400);
    // Reads that change nothing are not.
    assert_eq!(server.call("GET", "/v1/sandboxes", None).status, 200);
    server.delete(&id);

    let all = records(&server, &[]);
    let actions: Vec<&str> = all.iter().map(|r| r["action"].as_str().unwrap()).collect();
    assert_eq!(
        actions,
        [
            "sandbox.create",
            "sandbox.exec",
            "sandbox.files.write",
            "agent.deploy",
            "sandbox.delete"
        ],
        "{all:#?}"
    );
    assert_eq!(all[0]["request_id"], "req-mine-1");
    let admin = server.key();
    let admin_id = admin.split('_').nth(1).unwrap();
    assert_eq!(all[0]["actor"], format!("key:{admin_id}"));
    assert_eq!(all[0]["detail"]["status"], 201);
    assert_eq!(all[1]["request_id"], exec_id.as_str());
    assert_eq!(all[1]["detail"]["sandbox"], id.as_str());
    assert_eq!(all[3]["actor"], format!("key:{admin_id} as user:mallory"));
    assert_eq!(all[3]["agent"], "ghost");
    assert_eq!(all[3]["detail"]["status"], 400);
    assert!(all.iter().all(|r| r["at"].as_str().unwrap().ends_with('Z')));
    let ghost = records(&server, &["--agent", "ghost"]);
    assert_eq!(ghost.len(), 1);
    // The trail is the operator's.
    let r = http(
        &server,
        "GET",
        "/v1/audit",
        &[("x-agent-user-id", "mallory")],
        None,
    );
    assert_eq!(r.status, 403);
    for bad in [
        "/v1/audit?limit=ten",
        "/v1/audit?after=-x",
        "/v1/audit?agnet=ghost",
    ] {
        let r = http(&server, "GET", bad, &[], None);
        assert_eq!(r.status, 400, "{bad}: {}", r.text());
        assert!(r.json()["error"]["message"].is_string());
    }

    let (ok, text) = verify(&server);
    assert!(ok, "{text}");
    assert!(text.contains("whole: 5 records"), "{text}");

    // Edited: found at its position.
    let original = sql(&server, "SELECT detail FROM audit WHERE seq = 2");
    sql(
        &server,
        r#"UPDATE audit SET detail = '{"method":"POST","path":"/v1/sandboxes/x/exec","status":500}' WHERE seq = 2"#,
    );
    let (ok, text) = verify(&server);
    assert!(!ok);
    assert!(
        text.contains("broken at record 2") && text.contains("edited"),
        "{text}"
    );
    let original: Vec<String> = serde_json::from_str::<Vec<Vec<String>>>(&original)
        .unwrap()
        .remove(0);
    sql(
        &server,
        &format!(
            "UPDATE audit SET detail = '{}' WHERE seq = 2",
            original[0].replace('\'', "''")
        ),
    );
    assert!(verify(&server).0, "restored");

    // Reordered: records 3 and 4 swap places.
    sql(&server, "UPDATE audit SET seq = -3 WHERE seq = 3");
    sql(&server, "UPDATE audit SET seq = 3 WHERE seq = 4");
    sql(&server, "UPDATE audit SET seq = 4 WHERE seq = -3");
    let (ok, text) = verify(&server);
    assert!(!ok);
    assert!(text.contains("broken at record 3"), "{text}");
    sql(&server, "UPDATE audit SET seq = -3 WHERE seq = 3");
    sql(&server, "UPDATE audit SET seq = 3 WHERE seq = 4");
    sql(&server, "UPDATE audit SET seq = 4 WHERE seq = -3");
    assert!(verify(&server).0, "restored");

    // Removed, in the middle and at the end.
    sql(&server, "DELETE FROM audit WHERE seq = 5");
    let (ok, text) = verify(&server);
    assert!(!ok);
    assert!(
        text.contains("broken at record 5") && text.contains("missing"),
        "{text}"
    );
    sql(&server, "DELETE FROM audit WHERE seq = 2");
    let (ok, text) = verify(&server);
    assert!(!ok);
    assert!(text.contains("broken at record 2"), "{text}");
}
