//! `hangar bench tracing`: what tracing costs the gateway. The same agent and session are
//! measured through `hangar serve --tracing on` and `--tracing off` (the OpenTelemetry layer
//! left out entirely), alternating servers on one data directory in rounds, with the agent
//! reached directly through its `agent.sock` in every round as the baseline.

use std::path::PathBuf;
use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::Args;
use serde_json::json;

use crate::bench_agents::{first_request, latency, stats, throughput, Target};

#[derive(Args)]
pub struct TracingBench {
    /// A deployed agent that answers `POST /responses` (e.g. examples/notes).
    #[arg(long)]
    agent: String,
    /// The data directory of the agent; no server may be running on it (the bench starts
    /// its own, in turn with tracing on and off).
    #[arg(long, env = "HANGAR_DATA_DIR")]
    data_dir: PathBuf,
    /// Sequential requests per mode (and for the baseline), over all rounds.
    #[arg(long, default_value_t = 1000)]
    requests: usize,
    /// Rounds of on / off / direct.
    #[arg(long, default_value_t = 4)]
    rounds: usize,
    /// Concurrent clients for the throughput figure.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// How long each throughput run lasts, in seconds.
    #[arg(long, default_value_t = 3)]
    seconds: u64,
    /// Where the bench's servers listen.
    #[arg(long, default_value = "127.0.0.1:7391")]
    listen: String,
    #[arg(long)]
    json: bool,
}

/// `hangar serve` on the bench's data directory, stopped (sandboxes kept) when dropped.
struct Serve(std::process::Child);

impl Serve {
    async fn start(b: &TracingBench, tracing: &str) -> anyhow::Result<Serve> {
        let child = std::process::Command::new(std::env::current_exe()?)
            .args([
                "serve",
                "--listen",
                &b.listen,
                "--tracing",
                tracing,
                "--data-dir",
            ])
            .arg(&b.data_dir)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .context("starting hangar serve")?;
        let mut serve = Serve(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(s) = tokio::net::TcpStream::connect(&b.listen).await {
                drop(s);
                return Ok(serve);
            }
            if let Some(st) = serve.0.try_wait()? {
                bail!("hangar serve --tracing {tracing} exited: {st}");
            }
            if Instant::now() > deadline {
                bail!(
                    "hangar serve --tracing {tracing} did not listen on {}",
                    b.listen
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn stop(mut self) -> anyhow::Result<()> {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
        self.0.wait()?;
        Ok(())
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let _ = self.0.wait();
        }
    }
}

pub async fn run(b: TracingBench) -> anyhow::Result<ExitCode> {
    if std::env::var_os("HANGAR_API_KEY").is_none()
        && std::env::var_os("HANGAR_DATA_DIR").map(PathBuf::from) != Some(b.data_dir.clone())
    {
        bail!("set HANGAR_DATA_DIR to the data directory (its admin key signs the requests)");
    }
    if tokio::net::TcpStream::connect(&b.listen).await.is_ok() {
        bail!("something already listens on {}; pass --listen", b.listen);
    }
    let body = Bytes::from_static(br#"{"input": "hello", "stream": false}"#);
    let path = format!("/agents/{}/responses", b.agent);
    let per_round = (b.requests / b.rounds.max(1)).max(1);

    // The session, made (or found) through a first server.
    let serve = Serve::start(&b, "on").await?;
    let (status, session, text) = first_request(&b.listen, &path, "bench", &body).await?;
    let Some(session) = session.filter(|_| status.is_success()) else {
        bail!(
            "the first request failed ({status}): {}",
            String::from_utf8_lossy(&text)
        );
    };
    let sandbox = crate::client::Client::new(&format!("http://{}", b.listen))?
        .json::<hangar_proto::agent::Session>(
            hyper::Method::GET,
            &format!("/v1/sessions/{session}"),
            None,
        )
        .await?
        .sandbox
        .context("the session has no sandbox")?;
    serve.stop()?;
    let direct = Arc::new(Target {
        socket: Some(
            b.data_dir
                .join("sandboxes")
                .join(&sandbox)
                .join("run/agent.sock"),
        ),
        authority: b.listen.clone(),
        path: "/responses".into(),
    });
    let hangar = Arc::new(Target {
        socket: None,
        authority: b.listen.clone(),
        path,
    });

    let (mut on, mut off, mut raw) = (vec![], vec![], vec![]);
    let (mut on_rps, mut off_rps, mut raw_rps) = (vec![], vec![], vec![]);
    for round in 0..b.rounds {
        eprintln!("round {}/{}…", round + 1, b.rounds);
        // Which server goes first alternates, so that drift does not favour one.
        let order = if round % 2 == 0 {
            ["on", "off"]
        } else {
            ["off", "on"]
        };
        for mode in order {
            let serve = Serve::start(&b, mode).await?;
            latency(&hangar, &session, &body, 20).await?;
            let lat = latency(&hangar, &session, &body, per_round).await?;
            let (rps, errors) =
                throughput(&hangar, &session, &body, b.concurrency, b.seconds).await?;
            if errors > 0 {
                bail!("{errors} requests failed through hangar serve --tracing {mode}");
            }
            let (l, r) = if mode == "on" {
                (&mut on, &mut on_rps)
            } else {
                (&mut off, &mut off_rps)
            };
            l.extend(lat);
            r.push(rps);
            serve.stop()?;
        }
        raw.extend(latency(&direct, &session, &body, per_round).await?);
        raw_rps.push(
            throughput(&direct, &session, &body, b.concurrency, b.seconds)
                .await?
                .0,
        );
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let (on_s, off_s, raw_s) = (stats(on), stats(off), stats(raw));
    let p = |s: &serde_json::Value, k: &str| s[k].as_f64().unwrap_or(f64::NAN);
    let out = json!({
        "agent": b.agent,
        "session": session,
        "tracing_on": on_s,
        "tracing_off": off_s,
        "direct": raw_s,
        "tracing_added_p50_ms": p(&on_s, "p50_ms") - p(&off_s, "p50_ms"),
        "tracing_added_p99_ms": p(&on_s, "p99_ms") - p(&off_s, "p99_ms"),
        "throughput": {
            "clients": b.concurrency,
            "on_rps": mean(&on_rps), "off_rps": mean(&off_rps), "direct_rps": mean(&raw_rps),
            "on_over_off": mean(&on_rps) / mean(&off_rps),
        },
    });
    if b.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("tracing overhead on agent {} (session {session})", b.agent);
    for (name, s) in [
        ("direct (agent.sock)", &raw_s),
        ("--tracing off", &off_s),
        ("--tracing on", &on_s),
    ] {
        println!(
            "  {name:<20} p50 {:.3} ms  p99 {:.3} ms",
            p(s, "p50_ms"),
            p(s, "p99_ms")
        );
    }
    println!(
        "  tracing adds         p50 {:+.3} ms  p99 {:+.3} ms",
        p(&on_s, "p50_ms") - p(&off_s, "p50_ms"),
        p(&on_s, "p99_ms") - p(&off_s, "p99_ms")
    );
    println!(
        "  throughput, {} clients: direct {:.0} req/s, off {:.0} req/s, on {:.0} req/s ({:.3}× off)",
        b.concurrency,
        mean(&raw_rps),
        mean(&off_rps),
        mean(&on_rps),
        mean(&on_rps) / mean(&off_rps)
    );
    Ok(ExitCode::SUCCESS)
}
