//! `hangar bench gateway` and `hangar bench sessions`: the data plane against the agent
//! reached directly, and the first-request latency of new and suspended sessions.
//!
//! The baseline for the gateway is the same request sent straight to the agent through its
//! sandbox's `agent.sock` (the only way into a sandbox from the host), on the same machine
//! in the same run, so that the difference is what Hangar adds.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::Args;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::Method;
use hyper_util::rt::TokioIo;
use serde_json::json;

use hangar_proto::agent::{Session, SESSION_HEADER, USER_HEADER};

use crate::client::Client;

#[derive(Args)]
pub struct GatewayBench {
    /// A deployed agent that answers `POST /responses` (e.g. examples/notes).
    #[arg(long)]
    agent: String,
    /// Sequential requests per path for the latency figures.
    #[arg(long, default_value_t = 500)]
    requests: usize,
    /// Concurrent clients for the throughput figure.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// How long each throughput run lasts, in seconds.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Hangar's data directory (to reach the agent directly through its agent.sock).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct SessionsBench {
    /// A deployed agent; its `isolation` decides the driver measured.
    #[arg(long)]
    agent: String,
    #[arg(long, default_value_t = 10)]
    runs: usize,
    #[arg(long)]
    json: bool,
}

pub(crate) fn stats(mut v: Vec<f64>) -> serde_json::Value {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let p = |q: f64| {
        if v.is_empty() {
            f64::NAN
        } else {
            v[((v.len() as f64 - 1.0) * q).round() as usize]
        }
    };
    json!({"n": v.len(), "p50_ms": p(0.5), "p95_ms": p(0.95), "p99_ms": p(0.99)})
}

pub(crate) async fn tcp_conn(authority: &str) -> anyhow::Result<SendRequest<Full<Bytes>>> {
    let s = tokio::net::TcpStream::connect(authority).await?;
    s.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

pub(crate) async fn unix_conn(path: &std::path::Path) -> anyhow::Result<SendRequest<Full<Bytes>>> {
    let s = tokio::net::UnixStream::connect(path)
        .await
        .with_context(|| format!("connecting to {}", path.display()))?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

/// A request as `user` naming no session (so Hangar picks or makes one) on a new connection:
/// the status, the session it landed in, and the answer.
pub(crate) async fn first_request(
    authority: &str,
    path: &str,
    user: &str,
    body: &Bytes,
) -> anyhow::Result<(hyper::StatusCode, Option<String>, Bytes)> {
    let mut conn = tcp_conn(authority).await?;
    let req = hyper::Request::post(path)
        .header("host", "localhost")
        .header("authorization", crate::client::auth_header())
        .header("content-type", "application/json")
        .header(USER_HEADER, user)
        .body(Full::new(body.clone()))?;
    let resp = conn.send_request(req).await?;
    let session = resp
        .headers()
        .get(SESSION_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let status = resp.status();
    let text = resp.into_body().collect().await?.to_bytes();
    Ok((status, session, text))
}

/// One small `/responses` call on a kept-alive connection; its latency.
async fn one(
    sender: &mut SendRequest<Full<Bytes>>,
    path: &str,
    session: &str,
    body: &Bytes,
) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let req = hyper::Request::builder()
        .method(Method::POST)
        .uri(path)
        .header("host", "localhost")
        .header("authorization", crate::client::auth_header())
        .header("content-type", "application/json")
        .header(SESSION_HEADER, session)
        .header(USER_HEADER, "bench")
        .body(Full::new(body.clone()))?;
    sender.ready().await?;
    let resp = sender.send_request(req).await?;
    let status = resp.status();
    let _ = resp.into_body().collect().await?;
    if !status.is_success() {
        bail!("{path} answered {status}");
    }
    Ok(t.elapsed())
}

pub(crate) struct Target {
    /// `None`: Hangar over TCP; `Some`: the agent's socket.
    pub socket: Option<PathBuf>,
    pub authority: String,
    pub path: String,
}

impl Target {
    async fn conn(&self) -> anyhow::Result<SendRequest<Full<Bytes>>> {
        match &self.socket {
            Some(p) => unix_conn(p).await,
            None => tcp_conn(&self.authority).await,
        }
    }
}

pub(crate) async fn latency(
    t: &Target,
    session: &str,
    body: &Bytes,
    n: usize,
) -> anyhow::Result<Vec<f64>> {
    let mut conn = t.conn().await?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let d = match one(&mut conn, &t.path, session, body).await {
            Ok(d) => d,
            // The agent may close kept-alive connections; reconnect and count that request.
            Err(_) => {
                conn = t.conn().await?;
                one(&mut conn, &t.path, session, body).await?
            }
        };
        out.push(d.as_secs_f64() * 1000.0);
    }
    Ok(out)
}

pub(crate) async fn throughput(
    t: &std::sync::Arc<Target>,
    session: &str,
    body: &Bytes,
    clients: usize,
    secs: u64,
) -> anyhow::Result<(f64, usize)> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..clients {
        let (t, session, body) = (t.clone(), session.to_owned(), body.clone());
        tasks.spawn(async move {
            let mut done = 0usize;
            let mut errors = 0usize;
            let mut conn = t.conn().await?;
            while Instant::now() < deadline {
                match one(&mut conn, &t.path, &session, &body).await {
                    Ok(_) => done += 1,
                    Err(_) => {
                        errors += 1;
                        conn = t.conn().await?;
                    }
                }
            }
            anyhow::Ok((done, errors))
        });
    }
    let t0 = Instant::now();
    let (mut done, mut errors) = (0, 0);
    while let Some(r) = tasks.join_next().await {
        let (d, e) = r??;
        done += d;
        errors += e;
    }
    Ok((done as f64 / t0.elapsed().as_secs_f64(), errors))
}

pub async fn gateway(url: &str, b: GatewayBench) -> anyhow::Result<ExitCode> {
    let c = Client::new(url)?;
    let authority = url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    let data_dir = b.data_dir.unwrap_or_else(crate::default_data_dir);
    let body = Bytes::from_static(br#"{"input": "hello", "stream": false}"#);
    // A session to measure on.
    let path = format!("/agents/{}/responses", b.agent);
    let (status, session, text) = first_request(&authority, &path, "bench", &body).await?;
    let Some(session) = session.filter(|_| status.is_success()) else {
        bail!(
            "the first request failed ({status}): {}",
            String::from_utf8_lossy(&text)
        );
    };
    let s: Session = c
        .json(Method::GET, &format!("/v1/sessions/{session}"), None)
        .await?;
    let sandbox = s.sandbox.context("the session has no sandbox")?;
    let socket = data_dir
        .join("sandboxes")
        .join(&sandbox)
        .join("run/agent.sock");
    if !socket.exists() {
        bail!(
            "{} does not exist: pass the server's --data-dir",
            socket.display()
        );
    }
    let hangar = std::sync::Arc::new(Target {
        socket: None,
        authority: authority.clone(),
        path: path.clone(),
    });
    let direct = std::sync::Arc::new(Target {
        socket: Some(socket),
        authority,
        path: "/responses".into(),
    });
    eprintln!("warming up…");
    latency(&direct, &session, &body, 20).await?;
    latency(&hangar, &session, &body, 20).await?;
    eprintln!(
        "latency: {} sequential requests each, interleaved in rounds…",
        b.requests
    );
    let (mut via, mut raw) = (vec![], vec![]);
    let rounds = 5;
    for _ in 0..rounds {
        raw.extend(latency(&direct, &session, &body, b.requests / rounds).await?);
        via.extend(latency(&hangar, &session, &body, b.requests / rounds).await?);
    }
    let (raw_s, via_s) = (stats(raw), stats(via));
    eprintln!(
        "throughput: {} clients for {} s each…",
        b.concurrency, b.seconds
    );
    let (raw_rps, raw_err) = throughput(&direct, &session, &body, b.concurrency, b.seconds).await?;
    let (via_rps, via_err) = throughput(&hangar, &session, &body, b.concurrency, b.seconds).await?;
    let added = |k: &str| via_s[k].as_f64().unwrap() - raw_s[k].as_f64().unwrap();
    let out = json!({
        "agent": b.agent,
        "session": session,
        "direct": raw_s,
        "hangar": via_s,
        "added_p50_ms": added("p50_ms"),
        "added_p99_ms": added("p99_ms"),
        "throughput": {
            "clients": b.concurrency,
            "direct_rps": raw_rps, "direct_errors": raw_err,
            "hangar_rps": via_rps, "hangar_errors": via_err,
            "ratio": via_rps / raw_rps,
        },
    });
    if b.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!("gateway overhead on agent {} (session {session})", b.agent);
        println!(
            "  direct (agent.sock):  p50 {:.3} ms  p99 {:.3} ms",
            raw_s["p50_ms"].as_f64().unwrap(),
            raw_s["p99_ms"].as_f64().unwrap()
        );
        println!(
            "  through Hangar:       p50 {:.3} ms  p99 {:.3} ms",
            via_s["p50_ms"].as_f64().unwrap(),
            via_s["p99_ms"].as_f64().unwrap()
        );
        println!(
            "  added:                p50 {:.3} ms  p99 {:.3} ms",
            added("p50_ms"),
            added("p99_ms")
        );
        println!(
            "  throughput, {} clients: direct {:.0} req/s, Hangar {:.0} req/s ({:.2}×), errors {}/{}",
            b.concurrency,
            raw_rps,
            via_rps,
            via_rps / raw_rps,
            raw_err,
            via_err
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn sessions(url: &str, b: SessionsBench) -> anyhow::Result<ExitCode> {
    let c = Client::new(url)?;
    let authority = url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    let body = Bytes::from_static(br#"{"input": "hello"}"#);
    let path = format!("/agents/{}/responses", b.agent);
    let (mut fresh, mut resumed, mut modes) = (vec![], vec![], vec![]);
    let mut created = vec![];
    let result = async {
        for i in 0..b.runs {
            eprint!("\rrun {}/{}", i + 1, b.runs);
            // New session: the first request creates it and waits for the agent.
            let t = Instant::now();
            let (status, session, text) =
                first_request(&authority, &path, &format!("bench-{i}"), &body).await?;
            fresh.push(t.elapsed().as_secs_f64() * 1000.0);
            let Some(session) = session.filter(|_| status.is_success()) else {
                bail!(
                    "a new session failed ({status}): {}",
                    String::from_utf8_lossy(&text)
                );
            };
            created.push(session.clone());
            // Suspended session: the first request resumes it.
            let s: Session = c
                .json(
                    Method::POST,
                    &format!("/v1/sessions/{session}/suspend"),
                    None,
                )
                .await?;
            if let Some(cp) = s.checkpoint {
                modes.push(serde_json::to_value(cp.mode)?);
            }
            let mut conn = tcp_conn(&authority).await?;
            let req = hyper::Request::post(&path)
                .header("host", "localhost")
                .header("authorization", crate::client::auth_header())
                .header("authorization", crate::client::auth_header())
                .header("content-type", "application/json")
                .header(USER_HEADER, format!("bench-{i}"))
                .header(SESSION_HEADER, &session)
                .body(Full::new(body.clone()))?;
            let t = Instant::now();
            let resp = conn.send_request(req).await?;
            let status = resp.status();
            let _ = resp.into_body().collect().await?;
            resumed.push(t.elapsed().as_secs_f64() * 1000.0);
            if !status.is_success() {
                bail!("a resumed session failed ({status})");
            }
        }
        eprintln!();
        anyhow::Ok(())
    }
    .await;
    for s in &created {
        let _ = c
            .call(Method::DELETE, &format!("/v1/sessions/{s}"), None)
            .await;
    }
    result?;
    let out = json!({
        "agent": b.agent,
        "new_session": stats(fresh),
        "resumed_session": stats(resumed),
        "checkpoint_modes": modes,
    });
    if b.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!("first request on agent {} ({} runs)", b.agent, b.runs);
        for (k, label) in [
            ("new_session", "new session (create + ready)"),
            ("resumed_session", "suspended session (resume)"),
        ] {
            println!(
                "  {label:<30} p50 {:.1} ms  p95 {:.1} ms",
                out[k]["p50_ms"].as_f64().unwrap(),
                out[k]["p95_ms"].as_f64().unwrap()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
