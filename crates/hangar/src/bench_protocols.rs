//! `hangar bench protocols`: what each mapped protocol adds over a streamed `/responses` call
//! on the same session, through the same Hangar, in the same run: time to the first event and
//! to the end, p50 and p95. The agent must implement `/responses`; the Activity figures need
//! an Activity channel that accepts anonymous calls (`channels.activity.anonymous: true`).

use std::process::ExitCode;
use std::time::Instant;

use anyhow::bail;
use bytes::Bytes;
use clap::Args;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use serde_json::{json, Value};

use hangar_proto::agent::{SESSION_HEADER, USER_HEADER};

use crate::bench_agents::{stats, tcp_conn};

#[derive(Args)]
pub struct ProtocolsBench {
    /// A deployed agent that implements `/responses` (e.g. examples/notes).
    #[arg(long)]
    agent: String,
    /// Calls per protocol (interleaved with the direct calls they are compared with).
    #[arg(long, default_value_t = 200)]
    requests: usize,
    #[arg(long)]
    json: bool,
}

const USER: &str = "bench-protocols";

/// One POST on a kept-alive connection: (time to the first body bytes, total, session).
async fn timed(
    conn: &mut SendRequest<Full<Bytes>>,
    path: &str,
    user: &str,
    session: Option<&str>,
    body: &Value,
) -> anyhow::Result<(f64, f64, Option<String>)> {
    let mut req = hyper::Request::post(path)
        .header("host", "localhost")
        .header("authorization", crate::client::auth_header())
        .header("content-type", "application/json")
        .header(USER_HEADER, user);
    if let Some(s) = session {
        req = req.header(SESSION_HEADER, s);
    }
    let req = req.body(Full::new(Bytes::from(serde_json::to_vec(body)?)))?;
    let t = Instant::now();
    conn.ready().await?;
    let resp = conn.send_request(req).await?;
    let status = resp.status();
    let session = resp
        .headers()
        .get(SESSION_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut body = resp.into_body();
    let mut first = None;
    let mut text = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            if first.is_none() && !data.is_empty() {
                first = Some(t.elapsed());
            }
            if text.len() < 4096 {
                text.extend_from_slice(&data);
            }
        }
    }
    let total = t.elapsed();
    if !status.is_success() {
        bail!(
            "{path} answered {status}: {}",
            String::from_utf8_lossy(&text)
        );
    }
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
    Ok((ms(first.unwrap_or(total)), ms(total), session))
}

/// A protocol's figures against the direct calls made between its own.
struct Series {
    first: Vec<f64>,
    total: Vec<f64>,
    direct_first: Vec<f64>,
    direct_total: Vec<f64>,
}

impl Series {
    fn new() -> Series {
        Series {
            first: vec![],
            total: vec![],
            direct_first: vec![],
            direct_total: vec![],
        }
    }

    fn report(self) -> Value {
        let (f, t, df, dt) = (
            stats(self.first),
            stats(self.total),
            stats(self.direct_first),
            stats(self.direct_total),
        );
        let added = |a: &Value, b: &Value, k: &str| a[k].as_f64().unwrap() - b[k].as_f64().unwrap();
        json!({
            "first_event": f, "total": t,
            "direct_first_event": df, "direct_total": dt,
            "added_first_event_p50_ms": added(&f, &df, "p50_ms"),
            "added_first_event_p95_ms": added(&f, &df, "p95_ms"),
            "added_total_p50_ms": added(&t, &dt, "p50_ms"),
            "added_total_p95_ms": added(&t, &dt, "p95_ms"),
        })
    }
}

pub async fn run(url: &str, b: ProtocolsBench) -> anyhow::Result<ExitCode> {
    let authority = url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    let responses = format!("/agents/{}/responses", b.agent);
    let direct_body = json!({"input": "hello", "stream": true});
    let mut conn = tcp_conn(&authority).await?;
    let mut results = serde_json::Map::new();

    // AG-UI: each run a new user message on one thread (one session).
    let agui_path = format!("/agents/{}/ag-ui", b.agent);
    let agui_body = |i: usize| {
        json!({"threadId": "bench", "runId": format!("r{i}"),
               "messages": [{"id": format!("m{i}"), "role": "user", "content": "hello"}]})
    };
    let (_, _, session) = timed(&mut conn, &agui_path, USER, None, &agui_body(0)).await?;
    let session = session.ok_or_else(|| anyhow::anyhow!("AG-UI answered without a session"))?;
    eprintln!("ag-ui on session {session}: {} runs…", b.requests);
    let mut s = Series::new();
    for i in 0..b.requests + 10 {
        let (f, t, _) = timed(&mut conn, &agui_path, USER, None, &agui_body(i + 1)).await?;
        let (df, dt, _) = timed(&mut conn, &responses, USER, Some(&session), &direct_body).await?;
        if i >= 10 {
            s.first.push(f);
            s.total.push(t);
            s.direct_first.push(df);
            s.direct_total.push(dt);
        }
    }
    results.insert("ag-ui".into(), s.report());

    // Activity, expectReplies (the answer is one JSON body: first byte ≈ end).
    let activity_path = format!("/agents/{}/api/messages", b.agent);
    let activity = |i: usize| {
        json!({"type": "message", "id": format!("a{i}"), "channelId": "bench",
               "deliveryMode": "expectReplies",
               "from": {"id": USER}, "recipient": {"id": "bot"},
               "conversation": {"id": "bench"}, "text": "hello"})
    };
    match timed(&mut conn, &activity_path, USER, None, &activity(0)).await {
        Err(e) => {
            eprintln!("activity skipped: {e}");
            results.insert("activity".into(), json!({"skipped": e.to_string()}));
        }
        Ok((_, _, session)) => {
            let session =
                session.ok_or_else(|| anyhow::anyhow!("Activity answered without a session"))?;
            eprintln!("activity on session {session}: {} turns…", b.requests);
            let mut s = Series::new();
            for i in 0..b.requests + 10 {
                let (f, t, _) =
                    timed(&mut conn, &activity_path, USER, None, &activity(i + 1)).await?;
                // The Activity user is the channel's (`{channelId}:{from.id}`).
                let (df, dt, _) = timed(
                    &mut conn,
                    &responses,
                    &format!("bench:{USER}"),
                    Some(&session),
                    &direct_body,
                )
                .await?;
                if i >= 10 {
                    s.first.push(f);
                    s.total.push(t);
                    s.direct_first.push(df);
                    s.direct_total.push(dt);
                }
            }
            results.insert("activity".into(), s.report());
        }
    }

    let out = json!({"agent": b.agent, "requests": b.requests, "protocols": results});
    if b.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "mapped protocols on agent {} ({} calls each, against a streamed /responses on the same session)",
        b.agent, b.requests
    );
    for (name, r) in &results {
        if r.get("skipped").is_some() {
            println!("  {name:<9} skipped: {}", r["skipped"]);
            continue;
        }
        let p = |k: &str, q: &str| r[k][q].as_f64().unwrap_or(f64::NAN);
        println!(
            "  {name:<9} first event p50 {:.2} ms (direct {:.2}), p95 {:.2} ms (direct {:.2}); total p50 {:.2} ms (direct {:.2}), p95 {:.2} ms (direct {:.2})",
            p("first_event", "p50_ms"),
            p("direct_first_event", "p50_ms"),
            p("first_event", "p95_ms"),
            p("direct_first_event", "p95_ms"),
            p("total", "p50_ms"),
            p("direct_total", "p50_ms"),
            p("total", "p95_ms"),
            p("direct_total", "p95_ms"),
        );
    }
    Ok(ExitCode::SUCCESS)
}
