//! Agent identity end to end, against real gVisor sandboxes, real network namespaces and a
//! real JWT library (PyJWT, the way a tool or an MCP server would check Hangar's tokens):
//!
//! - each session's sandbox holds a session token in `$HANGAR_TOKEN_FILE` (never in its
//!   environment), signed by its agent's key, renewed before it expires and after a resume;
//! - the sandbox exchanges it at `http://hangar.internal/oauth2/token` (RFC 8693) for an
//!   on-behalf-of token of its own user, verifiable against `/.well-known/jwks.json`, and can
//!   get none for another user (another session's token, a forged one, an unsigned one);
//! - a secret bound to a host reaches that host in a header through the egress proxy, and is
//!   nowhere in the sandbox;
//! - `network.attach` sends egress out through a network namespace the operator named;
//! - guardrails redact or withhold answers that carry card numbers, e-mail addresses or custom
//!   patterns, and refuse egress requests whose bodies do, each hit audited.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use common::agents::{agent_dir, cli, deploy, http_anonymous, respond, BASE_PACKAGES};
use common::images::debian_base;
use common::{require, venv_python, Server};

fn run(cmd: &str) {
    let out = Command::new("sh").args(["-c", cmd]).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace the test made, deleted (with its veth pair) when dropped.
struct Netns {
    name: String,
}

impl Netns {
    fn new(tag: &str) -> Netns {
        let name = format!("hgt-{tag}-{}", std::process::id() % 100000);
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        run(&format!(
            "ip netns add {name} && ip -n {name} link set lo up"
        ));
        Netns { name }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A namespace reached from the host over a veth pair (`10.213.{n}.0/30`, its end `.2`,
/// which is returned); the pair goes with the namespace.
fn routed_netns(tag: &str, n: u32) -> (Netns, String) {
    let ns = Netns::new(tag);
    let (host_if, ns_if) = (format!("hgh{tag}{n}"), format!("hgn{tag}{n}"));
    let _ = Command::new("ip")
        .args(["link", "del", &host_if])
        .stderr(Stdio::null())
        .status();
    run(&format!(
        "ip link add {host_if} type veth peer name {ns_if} && ip link set {ns_if} netns {ns} && \
         ip addr add 10.213.{n}.1/30 dev {host_if} && ip link set {host_if} up && \
         ip -n {ns} addr add 10.213.{n}.2/30 dev {ns_if} && ip -n {ns} link set {ns_if} up",
        ns = ns.name
    ));
    (ns, format!("10.213.{n}.2"))
}

/// A process killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The recording server (`py/recording_server.py`) at `addr:port` inside `ns`; it answers
/// `body` and logs each request to the returned file.
fn recording_server(ns: &Netns, addr: &str, port: u16, body: &str) -> (Proc, std::path::PathBuf) {
    let log = std::env::temp_dir().join(format!("{}-{port}.jsonl", ns.name));
    let _ = std::fs::remove_file(&log);
    let child = Command::new("ip")
        .args(["netns", "exec", &ns.name, "python3"])
        .arg(common::agents::tests_dir().join("py/recording_server.py"))
        .args([addr, &port.to_string()])
        .arg(&log)
        .arg(body)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let proc = Proc(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let up = Command::new("ip")
            .args(["netns", "exec", &ns.name, "python3", "-c"])
            .arg(format!(
                "import socket; socket.create_connection(('{addr}', {port}), timeout=1)"
            ))
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success();
        if up {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the recording server did not start"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    (proc, log)
}

fn recorded(log: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Runs Python inside a session's sandbox (with the agent's environment) and returns
/// (exit code, stdout, stderr).
fn py(server: &Server, session: &str, script: &str) -> (i64, String, String) {
    let r = server.call(
        "POST",
        &format!("/v1/sessions/{session}/exec"),
        Some(&json!({"cmd": ["python3", "-c", script]})),
    );
    assert_eq!(r.status, 200, "exec failed: {}", r.text());
    let v = r.json();
    (
        v["exit_code"].as_i64().unwrap(),
        v["stdout"].as_str().unwrap().to_owned(),
        v["stderr"].as_str().unwrap().to_owned(),
    )
}

/// In the sandbox: POST a token request to hangar.internal through the proxy; prints the
/// status and the JSON answer.
const EXCHANGE: &str = r#"
import json, os, sys, urllib.parse, urllib.request, urllib.error
token = sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] else open(os.environ["HANGAR_TOKEN_FILE"]).read()
form = {
    "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
    "subject_token": token,
    "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
    "audience": os.environ.get("AUD", "https://tools.example"),
}
req = urllib.request.Request(os.environ["HANGAR_TOKEN_ENDPOINT"], data=urllib.parse.urlencode(form).encode())
try:
    with urllib.request.urlopen(req, timeout=20) as r:
        print(r.status, r.read().decode())
except urllib.error.HTTPError as e:
    print(e.code, e.read().decode())
"#;

fn exchange(server: &Server, session: &str, token: &str) -> (u16, Value) {
    let script = format!(
        "import sys; sys.argv = ['x', {token:?}]\n{EXCHANGE}",
        token = token
    );
    let (code, out, err) = py(server, session, &script);
    assert_eq!(code, 0, "the exchange script failed: {out}{err}");
    let (status, body) = out.trim().split_once(' ').unwrap();
    (status.parse().unwrap(), serde_json::from_str(body).unwrap())
}

/// Verifies `token` with PyJWT against the server's published keys.
fn verify(server: &Server, audience: &str, token: &str) -> Result<Value, String> {
    let out = Command::new(venv_python())
        .arg(common::agents::tests_dir().join("py/verify_jwt.py"))
        .arg(server.url("/.well-known/jwks.json"))
        .arg(server.url(""))
        .arg(audience)
        .arg(token)
        .output()
        .unwrap();
    if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Sends every new session to version 2.
fn all_traffic_to_v2(server: &Server) {
    let r = server.call(
        "PUT",
        "/v1/agents/probe/traffic",
        Some(&json!({"weights": {"1": 0, "2": 100}})),
    );
    assert_eq!(r.status, 200, "{}", r.text());
}

fn session_of(r: &common::agents::HResp) -> String {
    assert_eq!(r.status, 200, "{}", r.text());
    r.header("x-agent-session-id").unwrap().to_owned()
}

fn token_file(server: &Server, session: &str) -> String {
    let (code, out, err) = py(
        server,
        session,
        "import os; print(open(os.environ['HANGAR_TOKEN_FILE']).read())",
    );
    assert_eq!(code, 0, "{err}");
    out.trim().to_owned()
}

fn claims_unverified(token: &str) -> Value {
    use base64::Engine;
    let part = token.split('.').nth(1).unwrap();
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(part)
            .unwrap(),
    )
    .unwrap()
}

#[test]
fn agents_have_identities_tokens_on_behalf_of_users_and_secrets_they_never_see() {
    require("runsc", "runsc");
    require("ip", "iproute2");
    let python = venv_python();
    assert!(python.exists());

    // The outside: a service behind a veth pair in a namespace of its own (the host routes
    // to it), and an operator's namespace that the host has no route into.
    let n = 1 + std::process::id() % 120;
    let (outside, service) = routed_netns("out", n);
    let (_svc, svc_log) = recording_server(&outside, &service, 8080, "hello from the service");
    let corp = Netns::new("corp");
    run(&format!(
        "ip -n {c} addr add 10.214.{n}.1/32 dev lo",
        c = corp.name
    ));
    let corp_addr = format!("10.214.{n}.1");
    let (_corp_svc, corp_log) = recording_server(&corp, &corp_addr, 8081, "hello from corp");

    // A TLS service too, with a certificate from a CA of the test's own, which `hangar serve`
    // trusts through SSL_CERT_FILE: the proxy originates TLS for injected secrets.
    require("openssl", "openssl");
    let pki = tempfile::tempdir().unwrap();
    run(&format!(
        "cd {dir} && openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
           -keyout ca.key -out ca.pem -days 1 -subj /CN=hangar-test-ca 2>/dev/null && \
         openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout srv.key \
           -out srv.csr -subj /CN=service 2>/dev/null && \
         printf 'subjectAltName=IP:{service}\\nbasicConstraints=CA:FALSE\\n' > ext && \
         openssl x509 -req -in srv.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out srv.pem \
           -days 1 -extfile ext 2>/dev/null",
        dir = pki.path().display()
    ));
    let tls_log = std::env::temp_dir().join(format!("{}-8443.jsonl", outside.name));
    let _ = std::fs::remove_file(&tls_log);
    let _tls_svc = Proc(
        Command::new("ip")
            .args(["netns", "exec", &outside.name, "python3"])
            .arg(common::agents::tests_dir().join("py/recording_server.py"))
            .args([service.as_str(), "8443"])
            .arg(&tls_log)
            .arg("hello over tls")
            .arg(pki.path().join("srv.pem"))
            .arg(pki.path().join("srv.key"))
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let ca = pki.path().join("ca.pem");
    let server = Server::start_with_env(
        &["--session-token-ttl", "12s", "--netns", &corp.name],
        &[("SSL_CERT_FILE", ca.to_str().unwrap())],
    );
    debian_base(&server, &BASE_PACKAGES);
    let yaml = format!(
        "name: probe\nbuild: {{ dockerfile: Dockerfile }}\nisolation: gvisor\n\
         resources: {{ cpus: 1, memory: 256Mi, disk: 64Mi }}\nstartup_timeout: 60s\n\
         network:\n  egress: allowlist\n  allow: [\"{service}:8080\", \"{service}:8443\"]\n  inject:\n    \
         - {{ secret: api-key, hosts: [\"{service}:8080\"], tls: false }}\n    \
         - {{ secret: api-key, hosts: [\"{service}:8443\"], header: X-Api-Key }}\n"
    );
    let dir = agent_dir("probe", &yaml);
    deploy(&server, dir.path(), &[]);
    let set_secret = |host: &str| {
        let mut set = Command::new(env!("CARGO_BIN_EXE_hangar"))
            .args(["secrets", "set", "probe", "api-key", "--host", host])
            .args(["--host", &format!("{service}:8443")])
            .env("HANGAR_URL", server.url(""))
            .env("HANGAR_API_KEY", server.key())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        set.stdin
            .take()
            .unwrap()
            .write_all(b"sk-live-4f9a1c")
            .unwrap();
        let out = set.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    set_secret(&format!("{service}:8080"));

    let alice = session_of(&respond(&server, "probe", "alice", &json!({"input": "hi"})));
    let bob = session_of(&respond(&server, "probe", "bob", &json!({"input": "hi"})));

    // Hangar is an issuer: discovery and keys, without credentials.
    let disc = http_anonymous(
        &server,
        "GET",
        "/.well-known/openid-configuration",
        &[],
        None,
    );
    assert_eq!(disc.status, 200, "{}", disc.text());
    let disc = disc.json();
    assert_eq!(disc["issuer"], server.url(""));
    assert_eq!(disc["jwks_uri"], server.url("/.well-known/jwks.json"));
    let jwks = http_anonymous(&server, "GET", "/.well-known/jwks.json", &[], None).json();
    assert_eq!(jwks["keys"].as_array().unwrap().len(), 1, "{jwks}");
    assert_eq!(jwks["keys"][0]["alg"], "ES256");
    assert!(
        jwks["keys"][0].get("d").is_none(),
        "a private key is published: {jwks}"
    );

    // The session token: in the file, valid against the JWKS, naming agent, version,
    // session and user; never in the environment.
    let token = token_file(&server, &alice);
    let v = verify(&server, &server.url(""), &token).expect("the session token verifies");
    let c = &v["claims"];
    assert_eq!(c["sub"], "agent:probe");
    assert_eq!(c["session_id"], alice.as_str());
    assert_eq!(c["isolation_key"], "alice");
    assert_eq!(c["agent_version"], 1);
    assert_eq!(c["token_use"], "session");
    assert_eq!(v["header"]["kid"], jwks["keys"][0]["kid"]);
    let (_, env, _) = py(
        &server,
        &alice,
        "import os; print('\\n'.join(f'{k}={v}' for k, v in os.environ.items()))",
    );
    assert!(!env.contains(&token), "the token is in the environment");
    assert!(env.contains("HANGAR_TOKEN_FILE=/run/hangar/token"), "{env}");
    assert!(env.contains("HANGAR_TOKEN_ENDPOINT=http://hangar.internal/oauth2/token"));

    // On-behalf-of: the sandbox's own token gives a token for its user, for the audience.
    let (status, answer) = exchange(&server, &alice, "");
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["token_type"], "Bearer");
    assert_eq!(
        answer["issued_token_type"],
        "urn:ietf:params:oauth:token-type:access_token"
    );
    let obo = answer["access_token"].as_str().unwrap();
    let v = verify(&server, "https://tools.example", obo).expect("the OBO token verifies");
    assert_eq!(v["claims"]["sub"], "alice");
    assert_eq!(v["claims"]["act"]["sub"], "agent:probe");
    assert_eq!(v["claims"]["aud"], "https://tools.example");
    assert_eq!(v["claims"]["token_use"], "obo");
    assert!(
        verify(&server, "https://other.example", obo).is_err(),
        "the OBO token passed for another audience"
    );
    assert!(
        verify(&server, &server.url(""), obo).is_err(),
        "an OBO token passed for a session token's audience"
    );

    // No token for another user: bob's session token presented from alice's sandbox, a token
    // whose user was changed, an unsigned one, an OBO token, garbage.
    let bobs = token_file(&server, &bob);
    let (status, answer) = exchange(&server, &alice, &bobs);
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["error"], "invalid_grant");
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut forged_claims = claims_unverified(&token);
    forged_claims["isolation_key"] = "bob".into();
    let parts: Vec<&str> = token.split('.').collect();
    let forged = format!(
        "{}.{}.{}",
        parts[0],
        b64.encode(forged_claims.to_string()),
        parts[2]
    );
    let unsigned = format!(
        "{}.{}.",
        b64.encode(r#"{"alg":"none","typ":"JWT"}"#),
        b64.encode(forged_claims.to_string())
    );
    for bad in [forged.as_str(), unsigned.as_str(), obo, "not-a-jwt"] {
        let (status, answer) = exchange(&server, &alice, bad);
        assert_eq!(status, 400, "{bad}: {answer}");
        assert_eq!(answer["error"], "invalid_grant", "{answer}");
    }
    // Hangar itself is no audience.
    let (code, out, err) = py(
        &server,
        &alice,
        &format!(
            "import os\nos.environ['AUD'] = {:?}\n{EXCHANGE}",
            server.url("")
        ),
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with("400") && out.contains("invalid_target"),
        "{out}"
    );
    // The exchange is not on Hangar's own listener.
    let outside_exchange = http_anonymous(&server, "POST", "/oauth2/token", &[], Some(b"x=y"));
    assert_eq!(outside_exchange.status, 404, "{}", outside_exchange.text());
    let r = server.raw("POST", "/oauth2/token", b"x=y");
    assert_eq!(r.status, 404, "{}", r.text());

    // The injected secret: the agent calls the bound host without it, the host gets it.
    let call = format!(
        "import urllib.request\nreq = urllib.request.Request('http://{service}:8080/v1/models', headers={{'Authorization': 'Bearer fake', 'Host': 'paste.example'}})\nprint(urllib.request.urlopen(req, timeout=20).read().decode())"
    );
    let (code, out, err) = py(&server, &alice, &call);
    assert_eq!((code, out.trim()), (0, "hello from the service"), "{err}");
    let got = recorded(&svc_log);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["path"], "/v1/models");
    assert_eq!(got[0]["headers"]["authorization"], "Bearer sk-live-4f9a1c");
    // The URL's host, not the one the sandbox wrote: the secret goes where it is bound.
    assert_eq!(got[0]["headers"]["host"], format!("{service}:8080"));
    // Over TLS that the proxy makes (the agent speaks plain HTTP to its proxy): verified
    // against the CA Hangar trusts, the secret in the header the binding names.
    let (code, out, err) = py(
        &server,
        &alice,
        &format!("import urllib.request\nprint(urllib.request.urlopen('http://{service}:8443/secure', timeout=20).read().decode())"),
    );
    assert_eq!((code, out.trim()), (0, "hello over tls"), "{err}");
    let got_tls = recorded(&tls_log);
    assert_eq!(got_tls.len(), 1, "{got_tls:?}");
    assert_eq!(got_tls[0]["headers"]["x-api-key"], "sk-live-4f9a1c");
    assert_eq!(got_tls[0]["path"], "/secure");
    // The admin who set the secret decides where it may go: bound elsewhere, agent.yaml's
    // binding no longer sends it.
    set_secret("api.other.example");
    let (code, out, err) = py(&server, &alice, &call.replace("print(urllib", "import urllib.error\ntry:\n    print(urllib").replace(".read().decode())", ".read().decode())\nexcept urllib.error.HTTPError as e:\n    print(e.code, e.read().decode())"));
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with("502") && out.contains("may be sent to"),
        "{out}"
    );
    assert_eq!(
        recorded(&svc_log).len(),
        1,
        "the secret went to a host it is not bound to"
    );
    set_secret(&format!("{service}:8080"));
    let (code, out, _) = py(
        &server,
        &alice,
        "import glob, os\nneedle = ('sk-live-' + '4f9a1c').encode()\nhits = []\nfor p in glob.glob('/proc/[0-9]*/environ') + glob.glob('/proc/[0-9]*/cmdline'):\n    try:\n        if needle in open(p, 'rb').read(): hits.append(p)\n    except OSError: pass\nfor top in ['/run', '/root', '/tmp', '/app', '/etc', '/home', '/var', '/.hangar']:\n    for d, _, fs in os.walk(top):\n        for f in fs:\n            try:\n                if needle in open(os.path.join(d, f), 'rb').read(): hits.append(os.path.join(d, f))\n            except OSError: pass\nprint(hits)",
    );
    assert_eq!(
        (code, out.trim()),
        (0, "[]"),
        "the secret is inside the sandbox"
    );

    // Renewal: with a 12 s token, the file holds a new one within ~8 s.
    let deadline = Instant::now() + Duration::from_secs(30);
    let renewed = loop {
        let now = token_file(&server, &alice);
        if now != token {
            break now;
        }
        assert!(
            Instant::now() < deadline,
            "the session token was not renewed"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(
        claims_unverified(&renewed)["exp"].as_u64() > claims_unverified(&token)["exp"].as_u64()
    );
    verify(&server, &server.url(""), &renewed).expect("the renewed token verifies");

    // Suspended past its token's life and resumed from memory: the token is current again.
    let r = server.call("POST", &format!("/v1/sessions/{alice}/suspend"), None);
    assert_eq!(r.status, 200, "{}", r.text());
    std::thread::sleep(Duration::from_secs(13));
    let r = server.call("POST", &format!("/v1/sessions/{alice}/resume"), None);
    assert_eq!(r.status, 200, "{}", r.text());
    let state = r.json()["state"].as_str().unwrap().to_owned();
    assert!(state == "running" || state == "idle", "{state}");
    let after = token_file(&server, &alice);
    if let Err(e) = verify(&server, &server.url(""), &after) {
        panic!(
            "the token after a resume is not in date: {e}\nserver log:\n{}",
            server.log()
        );
    }
    let (status, answer) = exchange(&server, &alice, "");
    assert_eq!(status, 200, "{answer}");

    // The trail has the exchanges, granted and refused.
    let out = cli(&server, &["audit", "ls", "--json", "--session", &alice]);
    let trail: Value = serde_json::from_slice(&out.stdout).unwrap();
    let actions: Vec<&str> = trail["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["action"].as_str().unwrap())
        .collect();
    assert!(actions.contains(&"token.exchange"), "{actions:?}");
    assert!(actions.contains(&"token.exchange.refused"), "{actions:?}");

    // network.attach: a version whose egress leaves through the operator's namespace reaches
    // the service there, which the host's own network cannot.
    let yaml = format!(
        "name: probe\nbuild: {{ dockerfile: Dockerfile }}\nisolation: gvisor\n\
         resources: {{ cpus: 1, memory: 256Mi, disk: 64Mi }}\nstartup_timeout: 60s\n\
         network:\n  egress: allowlist\n  allow: [\"{corp_addr}:8081\"]\n  attach: {}\n",
        corp.name
    );
    // Only namespaces the operator named may be attached to.
    let other = agent_dir("probe", &yaml.replace(&corp.name, &outside.name));
    let out = cli(&server, &["deploy", other.path().to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--netns"), "{err}");
    let dir = agent_dir("probe", &yaml);
    deploy(&server, dir.path(), &[]);
    all_traffic_to_v2(&server);
    let carol = session_of(&respond(&server, "probe", "carol", &json!({"input": "hi"})));
    let fetch = |session: &str, url: &str| {
        py(
            &server,
            session,
            &format!(
                "import urllib.request, urllib.error\ntry:\n    print(urllib.request.urlopen('{url}', timeout=20).read().decode())\nexcept urllib.error.HTTPError as e:\n    print(e.code, e.read().decode())\nexcept Exception as e:\n    print('failed', e)"
            ),
        )
        .1
    };
    assert_eq!(
        fetch(&carol, &format!("http://{corp_addr}:8081/attached")).trim(),
        "hello from corp"
    );
    assert_eq!(recorded(&corp_log).len(), 1);
    // Alice's sandbox (no attach, and not allowed there) cannot; nor can carol's reach the
    // service outside her namespace; nor a direct connection bypassing the proxy.
    let denied = fetch(&alice, &format!("http://{corp_addr}:8081/"));
    assert!(denied.starts_with("403"), "{denied}");
    let denied = fetch(&carol, &format!("http://{service}:8080/"));
    assert!(denied.starts_with("403"), "{denied}");
    let (_, direct, _) = py(
        &server,
        &carol,
        &format!("import socket\ntry:\n    socket.create_connection(('{corp_addr}', 8081), timeout=5); print('connected')\nexcept OSError as e:\n    print('refused', e)"),
    );
    assert!(direct.starts_with("refused"), "{direct}");
    assert_eq!(recorded(&corp_log).len(), 1);
    assert_eq!(recorded(&svc_log).len(), 1);
    let r = server.call("GET", &format!("/v1/sessions/{carol}/egress"), None);
    let egress = r.json();
    let attached = egress["egress"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["host"] == corp_addr.as_str() && e["allowed"] == true);
    assert!(attached, "{egress}");
}

/// Whether the test card's digits are in `text`, whatever separates them. A bare `4111` is not
/// evidence: ids and hashes (the audit trail is full of them) hold it by chance.
fn has_card(text: &str) -> bool {
    let digits: String = text.chars().filter(char::is_ascii_digit).collect();
    digits.contains("41111111")
}

/// Answers with a card number, an e-mail address or a ticket id are redacted (whole JSON,
/// streams, invocations) or withheld, egress bodies with them are refused before they leave,
/// and every hit is in the audit trail.
#[test]
fn guardrails_redact_or_withhold_answers_and_refuse_egress_bodies() {
    require("runsc", "runsc");
    require("ip", "iproute2");
    let n = 121 + std::process::id() % 120;
    let (outside, service) = routed_netns("dlp", n);
    let (_svc, svc_log) = recording_server(&outside, &service, 8080, "stored");

    let server = Server::start();
    debian_base(&server, &BASE_PACKAGES);
    let yaml = |output: &str| {
        format!(
            "name: probe\nbuild: {{ dockerfile: Dockerfile }}\nisolation: gvisor\n\
             resources: {{ cpus: 1, memory: 256Mi, disk: 64Mi }}\nstartup_timeout: 60s\n\
             network: {{ egress: allowlist, allow: [\"{service}:8080\"] }}\n\
             guardrails:\n  detectors: [card_number, email]\n  patterns: {{ ticket: \"TKT-[0-9]{{6}}\" }}\n  output: {output}\n"
        )
    };
    let dir = agent_dir("probe", &yaml("redact"));
    deploy(&server, dir.path(), &[]);
    let leaky = "pay 4111 1111 1111 1111, mail bob@example.com about TKT-123456";
    let marks = [
        "[REDACTED:card_number]",
        "[REDACTED:email]",
        "[REDACTED:ticket]",
    ];

    // A whole answer: still JSON, every hit redacted.
    let r = respond(&server, "probe", "alice", &json!({"input": leaky}));
    assert_eq!(r.status, 200, "{}", r.text());
    let alice = r.header("x-agent-session-id").unwrap().to_owned();
    let text = r.json()["output"][0]["content"][0]["text"]
        .as_str()
        .unwrap()
        .to_owned();
    for m in marks {
        assert!(text.contains(m), "{m} missing from {text}");
    }
    assert!(!has_card(&r.text()), "the card leaked: {}", r.text());
    for secret in ["bob@example.com", "TKT-123456"] {
        assert!(!r.text().contains(secret), "{secret} leaked: {}", r.text());
    }

    // A stream: the same, in the agent's order, closed with [DONE].
    let r = respond(
        &server,
        "probe",
        "alice",
        &json!({"input": leaky, "stream": true}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let body = r.text();
    assert!(
        !has_card(&body) && !body.contains("bob@example.com"),
        "{body}"
    );
    let mut deltas = String::new();
    let mut seqs = vec![];
    for line in body.lines().filter_map(|l| l.strip_prefix("data: ")) {
        if line == "[DONE]" {
            continue;
        }
        let v: Value = serde_json::from_str(line).unwrap();
        seqs.push(v["sequence_number"].as_u64().unwrap());
        if let Some(d) = v["delta"].as_str() {
            deltas.push_str(d);
        }
    }
    assert_eq!(seqs, [0, 1, 2, 3], "{body}");
    for m in marks {
        assert!(deltas.contains(m), "{m} missing from the deltas {deltas}");
    }
    assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");

    // Invocations (any body) too.
    let r = common::agents::http(
        &server,
        "POST",
        "/agents/probe/invocations",
        &[("x-agent-user-id", "alice")],
        Some(format!("note: {leaky}").as_bytes()),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.json()["echo"]
        .as_str()
        .unwrap()
        .contains("[REDACTED:card_number]"));
    assert!(!has_card(&r.text()), "{}", r.text());

    // Egress: a body with a hit never leaves; a clean one does.
    let post = |body: &str| {
        py(
            &server,
            &alice,
            &format!(
                "import urllib.request, urllib.error\nreq = urllib.request.Request('http://{service}:8080/upload', data={body:?}.encode())\ntry:\n    print(urllib.request.urlopen(req, timeout=20).status)\nexcept urllib.error.HTTPError as e:\n    print(e.code, e.read().decode())"
            ),
        )
        .1
    };
    let refused = post("card=4111-1111-1111-1111");
    assert!(refused.starts_with("403"), "{refused}");
    assert!(refused.contains("card_number"), "{refused}");
    assert!(
        recorded(&svc_log).is_empty(),
        "the body reached the service"
    );
    // A card split across the chunks of a chunked body is still found.
    let (_, chunked, _) = py(
        &server,
        &alice,
        &format!(
            "import socket\ns = socket.create_connection(('127.0.0.1', 3128))\ns.sendall(b'POST http://{service}:8080/c HTTP/1.1\\r\\nTransfer-Encoding: chunked\\r\\n\\r\\n9\\r\\n4111 1111\\r\\na\\r\\n 1111 1111\\r\\n0\\r\\n\\r\\n')\nprint(s.recv(200).decode().splitlines()[0])"
        ),
    );
    assert!(chunked.starts_with("HTTP/1.1 403"), "{chunked}");
    assert!(
        recorded(&svc_log).is_empty(),
        "the chunked body reached the service"
    );
    assert_eq!(post("nothing to see").trim(), "200");
    let got = recorded(&svc_log);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["body"], "nothing to see");

    // Every hit is audited, with where it was and what was found (never the value).
    let out = cli(&server, &["audit", "ls", "--json", "--session", &alice]);
    let trail: Value = serde_json::from_slice(&out.stdout).unwrap();
    let hits: Vec<&Value> = trail["records"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["action"] == "dlp.hit")
        .collect();
    assert!(
        hits.iter().any(|h| h["detail"]["where"] == "output"),
        "{trail}"
    );
    assert!(
        hits.iter().any(|h| h["detail"]["where"] == "egress"
            && h["detail"]["detectors"] == json!(["card_number"])),
        "{trail}"
    );
    assert!(!has_card(&trail.to_string()), "a value is in the trail");

    // `output: block` withholds the answer instead.
    let dir = agent_dir("probe", &yaml("block"));
    deploy(&server, dir.path(), &[]);
    all_traffic_to_v2(&server);
    let r = respond(&server, "probe", "bob", &json!({"input": leaky}));
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "output_blocked");
    assert!(!has_card(&r.text()));
    let r = respond(
        &server,
        "probe",
        "bob",
        &json!({"input": leaky, "stream": true}),
    );
    let body = r.text();
    assert!(body.contains("output_blocked"), "{body}");
    assert!(
        !has_card(&body) && !body.contains("bob@example.com"),
        "{body}"
    );
    let r = respond(&server, "probe", "bob", &json!({"input": "all clean"}));
    assert_eq!(r.status, 200, "{}", r.text());

    // A bad detector is refused at deploy, naming it.
    let bad = yaml("redact").replace("TKT-[0-9]{6}", "TKT-[0-9");
    let dir = agent_dir("probe", &bad);
    let out = cli(&server, &["deploy", dir.path().to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ticket"), "{err}");
}
