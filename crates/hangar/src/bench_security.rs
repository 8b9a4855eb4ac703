//! `hangar bench security`: what authentication adds to a data-plane request (an API key, an
//! OIDC JWT) and what the egress proxy adds to an HTTP request, each against its baseline in
//! the same run.
//!
//! - **Authentication, in process**: `Keys::check` (the API key's SHA-256 and a map lookup)
//!   and `IdentityProviders::verify_jwt` (an ES256 signature and the claims, keys cached), the
//!   exact code the auth layer runs.
//! - **Authentication, end to end**: `POST /agents/{agent}/responses` through Hangar with the
//!   API key and with a JWT, against the same request sent to the agent's `agent.sock`. The
//!   JWTs come from a small OIDC provider this command serves itself (Hangar's own issuer
//!   code, on `--oidc-listen`), so the server must be started with
//!   `--oidc-issuer http://ADDR --oidc-audience http://ADDR`.
//! - **Egress proxy, in process**: an HTTP GET through the proxy's code (policy, connect,
//!   splice, the record of the connection) on a unix socket, as a sandbox's requests arrive,
//!   against the same GET sent straight to the server over TCP; and a 4 KiB POST through the
//!   proxy with the data-loss guardrails reading its body.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::Args;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use hangar_proto::agent::{Session, SESSION_HEADER, USER_HEADER};

use crate::bench_agents::{stats, tcp_conn, unix_conn};
use crate::client::Client;

#[derive(Args)]
pub struct SecurityBench {
    /// A deployed agent that answers `POST /responses` (e.g. examples/notes).
    #[arg(long)]
    agent: String,
    /// Where this command serves its OIDC provider; the server must trust it
    /// (`--oidc-issuer http://ADDR --oidc-audience http://ADDR`).
    #[arg(long, default_value = "127.0.0.1:7099")]
    oidc_listen: std::net::SocketAddr,
    /// Requests per path for the end-to-end figures.
    #[arg(long, default_value_t = 500)]
    requests: usize,
    /// Hangar's data directory (to reach the agent directly through its agent.sock).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// One `/responses` call on a kept-alive connection with these credentials; its latency.
async fn one(
    sender: &mut SendRequest<Full<Bytes>>,
    path: &str,
    auth: Option<&str>,
    user: Option<&str>,
    session: &str,
    body: &Bytes,
) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let mut req = hyper::Request::post(path)
        .header("host", "localhost")
        .header("content-type", "application/json")
        .header(SESSION_HEADER, session);
    if let Some(a) = auth {
        req = req.header("authorization", a);
    }
    if let Some(u) = user {
        req = req.header(USER_HEADER, u);
    }
    sender.ready().await?;
    let resp = sender
        .send_request(req.body(Full::new(body.clone()))?)
        .await?;
    let status = resp.status();
    let text = resp.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        bail!(
            "{path} answered {status}: {}",
            String::from_utf8_lossy(&text)
        );
    }
    Ok(t.elapsed())
}

/// The OIDC provider the end-to-end JWT figures use: Hangar's issuer code over a scratch
/// store, serving its discovery document and keys.
async fn provider(
    listen: std::net::SocketAddr,
    scratch: &std::path::Path,
) -> anyhow::Result<(Arc<hangar_agents::Identity>, String)> {
    let issuer = format!("http://{listen}");
    let store = hangar_store::Store::open(&scratch.join("provider.db")).await?;
    let key = hangar_agents::SecretKey::load_or_create(&scratch.join("provider.key"))?;
    let identity = Arc::new(hangar_agents::Identity::new(
        store,
        key,
        hangar_agents::IdentityConfig {
            session_ttl: Duration::from_secs(3600),
            ..hangar_agents::IdentityConfig::new(issuer.clone())
        },
    ));
    // The first token makes the signing key, which the key set then lists.
    identity.session_token("bench", 1, "bench", "bench").await?;
    let (disc, jwks) = (identity.discovery(), identity.jwks().await?);
    let app = axum::Router::new()
        .route(
            "/.well-known/openid-configuration",
            axum::routing::get(move || std::future::ready(axum::Json(disc.clone()))),
        )
        .route(
            "/.well-known/jwks.json",
            axum::routing::get(move || std::future::ready(axum::Json(jwks.clone()))),
        );
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("serving the bench's OIDC provider on {listen}"))?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((identity, issuer))
}

/// A local HTTP server answering every request with a short body, one request per connection.
async fn origin() -> anyhow::Result<std::net::SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let _ = s.set_nodelay(true);
                let mut buf = vec![0u8; 16 * 1024];
                let mut seen = Vec::new();
                // Read the head and, if any, the body its Content-Length announces.
                loop {
                    let Ok(n) = s.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    seen.extend_from_slice(&buf[..n]);
                    if let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&seen[..end]).to_ascii_lowercase();
                        let len: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse().ok())
                            .unwrap_or(0);
                        if seen.len() >= end + 4 + len {
                            break;
                        }
                    }
                }
                let _ = s
                    .write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                    )
                    .await;
                let _ = s.shutdown().await;
            });
        }
    });
    Ok(addr)
}

/// Sends `request` on `conn` and reads the answer to its end.
async fn exchange<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut conn: S,
    request: &[u8],
) -> anyhow::Result<()> {
    conn.write_all(request).await?;
    let mut answer = Vec::new();
    conn.read_to_end(&mut answer).await?;
    if !answer.starts_with(b"HTTP/1.1 200") {
        bail!("answered {}", String::from_utf8_lossy(&answer));
    }
    Ok(())
}

pub async fn run(url: &str, b: SecurityBench) -> anyhow::Result<ExitCode> {
    let c = Client::new(url)?;
    let authority = url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    let scratch = tempfile::tempdir()?;
    // The provider's key is kept between runs: the server caches the keys it fetched.
    let provider_dir =
        std::env::temp_dir().join(format!("hangar-bench-oidc-{}", b.oidc_listen.port()));
    std::fs::create_dir_all(&provider_dir)?;
    let (identity, issuer) = provider(b.oidc_listen, &provider_dir).await?;
    let (jwt, _) = identity.session_token("bench", 1, "bench", "bench").await?;
    let key = crate::client::api_key().context("no API key (HANGAR_API_KEY or the admin-key)")?;

    // Authentication in process: the auth layer's own calls.
    let keys = hangar_api::Keys::open(
        hangar_store::Store::open(&scratch.path().join("keys.db")).await?,
        None,
    )
    .await
    .map_err(|e| anyhow::anyhow!(e))?;
    let made = keys
        .create("bench", hangar_api::Role::Invoker, false)
        .await
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let mut key_check = Vec::new();
    for _ in 0..20_000 {
        let t = Instant::now();
        std::hint::black_box(keys.check(std::hint::black_box(&made.key)));
        key_check.push(ms(t.elapsed()));
    }
    let idp = hangar_api::IdentityProviders::new().map_err(|e| anyhow::anyhow!(e))?;
    let discovery = format!("{issuer}/.well-known/openid-configuration");
    let algs = [jsonwebtoken_es256()];
    idp.verify_jwt(&discovery, &issuer, &issuer, &algs, &jwt)
        .await
        .map_err(|e| anyhow::anyhow!("the bench's own JWT was refused: {e:?}"))?;
    let mut jwt_check = Vec::new();
    for _ in 0..5_000 {
        let t = Instant::now();
        let r = idp
            .verify_jwt(&discovery, &issuer, &issuer, &algs, &jwt)
            .await;
        jwt_check.push(ms(t.elapsed()));
        std::hint::black_box(r.is_ok());
    }

    // End to end: the agent's socket, Hangar with the API key, Hangar with the JWT.
    let path = format!("/agents/{}/responses", b.agent);
    let body = Bytes::from_static(br#"{"input": "hello", "stream": false}"#);
    let bearer_key = format!("Bearer {key}");
    let bearer_jwt = format!("Bearer {jwt}");
    // The JWT's user is its `sub`; the API-key calls assert the same user, so both reach
    // one session.
    let user = "agent:bench";
    let mut conn = tcp_conn(&authority).await?;
    let first = hyper::Request::post(&path)
        .header("host", "localhost")
        .header("content-type", "application/json")
        .header("authorization", &bearer_jwt)
        .body(Full::new(body.clone()))?;
    let resp = conn.send_request(first).await?;
    let status = resp.status();
    let session = resp
        .headers()
        .get(SESSION_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let text = resp.into_body().collect().await?.to_bytes();
    let Some(session) = session.filter(|_| status.is_success()) else {
        bail!(
            "a request with the bench's JWT failed ({status}): {}\n\
             start the server with --oidc-issuer {issuer} --oidc-audience {issuer}",
            String::from_utf8_lossy(&text)
        );
    };
    let s: Session = c
        .json(hyper::Method::GET, &format!("/v1/sessions/{session}"), None)
        .await?;
    let sandbox = s.sandbox.context("the session has no sandbox")?;
    let socket = b
        .data_dir
        .clone()
        .unwrap_or_else(crate::default_data_dir)
        .join("sandboxes")
        .join(&sandbox)
        .join("run/agent.sock");
    let mut direct = unix_conn(&socket)
        .await
        .context("pass the server's --data-dir")?;
    let mut with_key = tcp_conn(&authority).await?;
    let mut with_jwt = tcp_conn(&authority).await?;
    let (mut raw, mut via_key, mut via_jwt) = (vec![], vec![], vec![]);
    eprintln!("end to end: {} requests per path, interleaved…", b.requests);
    for i in 0..b.requests + 20 {
        let d = one(&mut direct, "/responses", None, None, &session, &body).await?;
        let k = one(
            &mut with_key,
            &path,
            Some(&bearer_key),
            Some(user),
            &session,
            &body,
        )
        .await?;
        let j = one(
            &mut with_jwt,
            &path,
            Some(&bearer_jwt),
            None,
            &session,
            &body,
        )
        .await?;
        if i >= 20 {
            raw.push(ms(d));
            via_key.push(ms(k));
            via_jwt.push(ms(j));
        }
    }

    // The egress proxy, in process.
    let origin = origin().await?;
    let egress = hangar_proto::sandbox::Egress {
        policy: hangar_proto::sandbox::EgressPolicyKind::Allowlist,
        allow: vec![origin.to_string()],
        attach: None,
    };
    let sock = scratch.path().join("egress.sock");
    let policy = hangar_sandbox::egress::EgressPolicy::new(&egress, vec![])
        .map_err(|e| anyhow::anyhow!(e))?;
    let guarded = policy
        .clone()
        .with_dlp(Some(&hangar_proto::sandbox::EgressDlp {
            detectors: ["card_number", "private_key", "cloud_key", "email"]
                .map(String::from)
                .to_vec(),
            patterns: Default::default(),
        }))
        .map_err(|e| anyhow::anyhow!(e))?;
    let (log, mut reports) = tokio::sync::mpsc::channel(4096);
    tokio::spawn(async move { while reports.recv().await.is_some() {} });
    let shared = hangar_sandbox::egress::Shared {
        log: Some(log),
        ..Default::default()
    };
    let sock_dlp = scratch.path().join("egress-dlp.sock");
    tokio::spawn(hangar_sandbox::egress::serve(
        tokio::net::UnixListener::bind(&sock)?,
        Arc::new(policy),
        "bench".into(),
        shared.clone(),
    ));
    tokio::spawn(hangar_sandbox::egress::serve(
        tokio::net::UnixListener::bind(&sock_dlp)?,
        Arc::new(guarded),
        "bench".into(),
        shared,
    ));
    let direct_get = format!("GET / HTTP/1.1\r\nHost: {origin}\r\nConnection: close\r\n\r\n");
    let proxied_get = format!("GET http://{origin}/ HTTP/1.1\r\nHost: {origin}\r\n\r\n");
    let payload = "lorem ipsum dolor sit amet ".repeat(4096 / 27 + 1);
    let proxied_post = format!(
        "POST http://{origin}/upload HTTP/1.1\r\nHost: {origin}\r\nContent-Length: {}\r\n\r\n{payload}",
        payload.len()
    );
    let direct_post = proxied_post.replacen(&format!("http://{origin}"), "", 1);
    let (mut e_raw, mut e_proxy, mut e_raw_post, mut e_dlp) = (vec![], vec![], vec![], vec![]);
    eprintln!("egress: {} requests per path, interleaved…", b.requests);
    for i in 0..b.requests + 20 {
        let t = Instant::now();
        let s = tokio::net::TcpStream::connect(origin).await?;
        s.set_nodelay(true)?;
        exchange(s, direct_get.as_bytes()).await?;
        let d = t.elapsed();
        let t = Instant::now();
        exchange(
            tokio::net::UnixStream::connect(&sock).await?,
            proxied_get.as_bytes(),
        )
        .await?;
        let p = t.elapsed();
        let t = Instant::now();
        let s = tokio::net::TcpStream::connect(origin).await?;
        s.set_nodelay(true)?;
        exchange(s, direct_post.as_bytes()).await?;
        let dp = t.elapsed();
        let t = Instant::now();
        exchange(
            tokio::net::UnixStream::connect(&sock_dlp).await?,
            proxied_post.as_bytes(),
        )
        .await?;
        let g = t.elapsed();
        if i >= 20 {
            e_raw.push(ms(d));
            e_proxy.push(ms(p));
            e_raw_post.push(ms(dp));
            e_dlp.push(ms(g));
        }
    }

    let added = |a: &Value, b: &Value, k: &str| a[k].as_f64().unwrap() - b[k].as_f64().unwrap();
    let (raw, via_key, via_jwt) = (stats(raw), stats(via_key), stats(via_jwt));
    let (e_raw, e_proxy, e_raw_post, e_dlp) = (
        stats(e_raw),
        stats(e_proxy),
        stats(e_raw_post),
        stats(e_dlp),
    );
    let out = json!({
        "auth_in_process": {"api_key": stats(key_check), "jwt_es256": stats(jwt_check)},
        "end_to_end": {
            "agent": b.agent,
            "direct": raw, "api_key": via_key, "jwt": via_jwt,
            "jwt_over_api_key_p50_ms": added(&via_jwt, &via_key, "p50_ms"),
            "jwt_over_api_key_p99_ms": added(&via_jwt, &via_key, "p99_ms"),
        },
        "egress": {
            "direct_get": e_raw, "proxy_get": e_proxy,
            "added_p50_ms": added(&e_proxy, &e_raw, "p50_ms"),
            "added_p99_ms": added(&e_proxy, &e_raw, "p99_ms"),
            "direct_post_4k": e_raw_post, "proxy_post_4k_dlp": e_dlp,
            "dlp_added_p50_ms": added(&e_dlp, &e_raw_post, "p50_ms"),
            "dlp_added_p99_ms": added(&e_dlp, &e_raw_post, "p99_ms"),
        },
    });
    if b.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(ExitCode::SUCCESS);
    }
    let row = |name: &str, v: &Value| {
        println!(
            "  {name:<34} p50 {:>8.3} ms  p99 {:>8.3} ms",
            v["p50_ms"].as_f64().unwrap(),
            v["p99_ms"].as_f64().unwrap()
        )
    };
    println!("authentication, in process:");
    row("API key check", &out["auth_in_process"]["api_key"]);
    row(
        "JWT (ES256) check, keys cached",
        &out["auth_in_process"]["jwt_es256"],
    );
    println!("data plane, agent {} (session {session}):", b.agent);
    row("direct (agent.sock)", &raw);
    row("through Hangar, API key", &via_key);
    row("through Hangar, JWT", &via_jwt);
    println!("egress proxy, HTTP request to a local server:");
    row("GET, direct", &e_raw);
    row("GET, through the proxy", &e_proxy);
    row("4 KiB POST, direct", &e_raw_post);
    row("4 KiB POST, proxy + guardrails", &e_dlp);
    Ok(ExitCode::SUCCESS)
}

fn jsonwebtoken_es256() -> hangar_api::JwtAlgorithm {
    hangar_api::JwtAlgorithm::ES256
}
