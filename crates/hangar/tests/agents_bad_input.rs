//! Bad input to deploy, traffic and sessions gets a clear error and changes nothing.

mod common;

use serde_json::json;

use common::agents::{agent_dir, cli, deploy, http, BASE_PACKAGES};
use common::images::debian_base;
use common::Server;

fn agents(server: &Server) -> serde_json::Value {
    server.call("GET", "/v1/agents", None).json()["agents"].clone()
}

#[test]
fn bad_agent_yaml_and_failing_builds_create_nothing() {
    let server = Server::start();

    // A mistyped key: the error names the file, the line and the likely key.
    let dir = agent_dir(
        "probe",
        "name: probe\nbuild: { dockerfile: Dockerfile }\nidle_timout: 5m\n",
    );
    let out = cli(&server, &["deploy", dir.path().to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("agent.yaml:3"), "{err}");
    assert!(
        err.contains("idle_timout") && err.contains("idle_timeout"),
        "{err}"
    );

    // A value of the wrong kind, and one out of range.
    for (yaml, needle) in [
        (
            "name: probe\nbuild: { dockerfile: Dockerfile }\nresources: { memory: lots }\n",
            "resources.memory",
        ),
        (
            "name: probe\nbuild: { dockerfile: Dockerfile }\nisolation: docker\n",
            "isolation",
        ),
        ("name: Probe!\nbuild: { dockerfile: Dockerfile }\n", "name"),
        (
            "name: probe\nbuild: { dockerfile: Dockerfile, image: x }\n",
            "only one",
        ),
        ("name: probe\nbuild: [\n", "agent.yaml"),
    ] {
        let dir = agent_dir("probe", yaml);
        let out = cli(&server, &["deploy", dir.path().to_str().unwrap()]);
        assert!(!out.status.success(), "{yaml:?} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{yaml:?}: {err}");
    }
    assert_eq!(agents(&server), json!([]));

    // A Dockerfile whose step fails: the error shows that step's output.
    debian_base(&server, &BASE_PACKAGES);
    let dir = agent_dir("probe", "name: probe\nbuild: { dockerfile: Dockerfile }\n");
    std::fs::write(
        dir.path().join("Dockerfile"),
        "FROM debian:bookworm\nRUN echo the-step-says-hello && exit 3\n",
    )
    .unwrap();
    let out = cli(&server, &["deploy", dir.path().to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("the-step-says-hello"), "{err}");
    assert_eq!(agents(&server), json!([]));

    // A Dockerfile missing altogether.
    std::fs::remove_file(dir.path().join("Dockerfile")).unwrap();
    let out = cli(&server, &["deploy", dir.path().to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Dockerfile"));
    assert_eq!(agents(&server), json!([]));
}

#[test]
fn bad_api_requests_change_nothing() {
    let server = Server::start();
    debian_base(&server, &BASE_PACKAGES);
    let dir = agent_dir(
        "probe",
        "name: probe\nbuild: { dockerfile: Dockerfile }\nisolation: container\nresources: { disk: 64Mi }\n",
    );
    let v = deploy(&server, dir.path(), &[]);
    let image = v["version"]["image"].as_str().unwrap().to_owned();
    let spec = v["version"]["spec"].clone();

    // Deploy requests that are wrong in some way.
    for (path, body, status) in [
        (
            "/v1/agents/probe/versions",
            json!({"image": image, "spec": spec, "extra": 1}),
            400,
        ),
        (
            "/v1/agents/other/versions",
            json!({"image": image, "spec": spec}),
            400,
        ),
        (
            "/v1/agents/probe/versions",
            json!({"image": "sha256:00", "spec": spec}),
            404,
        ),
        (
            "/v1/agents/probe/versions",
            json!({"image": image, "spec": spec, "traffic": 101}),
            400,
        ),
        (
            "/v1/agents/Bad_Name/versions",
            json!({"image": image, "spec": spec}),
            400,
        ),
    ] {
        let r = server.call("POST", path, Some(&body));
        assert_eq!(r.status, status, "POST {path} {body}: {}", r.text());
        assert!(r.json()["error"]["message"].as_str().is_some());
    }
    // A share meant for another version number is refused before anything is built.
    for t in ["5=10", "2=101", "lots"] {
        let out = cli(
            &server,
            &["deploy", dir.path().to_str().unwrap(), "--traffic", t],
        );
        assert!(!out.status.success(), "--traffic {t} was accepted");
        assert!(String::from_utf8_lossy(&out.stderr).contains("--traffic"));
    }
    let r = server.raw("POST", "/v1/agents/probe/versions", b"{\"image\": ");
    assert_eq!(r.status, 400);
    let after = server.call("GET", "/v1/agents/probe/versions", None).json();
    assert_eq!(after["versions"].as_array().unwrap().len(), 1);

    // Traffic that does not add up, or names a version that does not exist.
    for weights in [
        json!({"1": 90}),
        json!({"1": 50, "7": 50}),
        json!({"1": -10, "2": 110}),
    ] {
        let r = server.call(
            "PUT",
            "/v1/agents/probe/traffic",
            Some(&json!({"weights": weights})),
        );
        assert!(
            r.status == 400 || r.status == 404,
            "{weights}: {}",
            r.text()
        );
    }
    assert_eq!(
        server.call("GET", "/v1/agents/probe/traffic", None).json()["weights"],
        json!({"1": 100})
    );
    let out = cli(&server, &["traffic", "set", "probe", "1=abc"]);
    assert!(!out.status.success());

    // Sessions of agents or versions that do not exist.
    for (path, body, status) in [
        (
            "/v1/agents/nobody/sessions",
            json!({"isolation_key": "a"}),
            404,
        ),
        (
            "/v1/agents/probe/sessions",
            json!({"isolation_key": "a", "version": 9}),
            404,
        ),
        (
            "/v1/agents/probe/sessions",
            json!({"isolation_key": ""}),
            400,
        ),
        (
            "/v1/agents/probe/sessions",
            json!({"isolation_key": "a", "colour": "red"}),
            400,
        ),
    ] {
        let r = server.call("POST", path, Some(&body));
        assert_eq!(r.status, status, "POST {path} {body}: {}", r.text());
    }
    assert_eq!(
        server.call("GET", "/v1/agents/probe/sessions", None).json()["sessions"],
        json!([])
    );
    assert_eq!(
        server.call("GET", "/v1/sandboxes", None).json()["sandboxes"],
        json!([])
    );
    for path in [
        "/v1/sessions/sess_nope",
        "/v1/agents/nobody",
        "/v1/agents/nobody/versions",
    ] {
        let r = http(&server, "GET", path, &[], None);
        assert_eq!(r.status, 404, "{path}");
        assert_eq!(r.header("x-platform-error-source"), Some("user"));
    }
    // Deleting the agent removes it, its versions and sessions.
    let r = server.call(
        "POST",
        "/v1/agents/probe/sessions",
        Some(&json!({"isolation_key": "a"})),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(server.call("DELETE", "/v1/agents/probe", None).status, 204);
    assert_eq!(agents(&server), json!([]));
    assert_eq!(
        server.call("GET", "/v1/sandboxes", None).json()["sandboxes"],
        json!([])
    );
}
