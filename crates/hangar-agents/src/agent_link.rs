//! HTTP/1.1 to an agent through its sandbox's `agent.sock` (each connection is forwarded by
//! `hangar-init` to the agent's port on the sandbox's loopback).

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Empty;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

use hangar_sandbox::LinkError;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Opens one HTTP/1.1 connection to the agent. The connection task ends when the returned
/// sender is dropped and its last answer has been read.
pub async fn connect<B>(socket: &Path) -> Result<SendRequest<B>, LinkError>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let stream = hangar_sandbox::link::connect_no_follow(socket).await?;
    let (sender, conn) = hyper::client::conn::http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| LinkError::Http(e.to_string()))?;
    tokio::spawn(async move {
        // Upgrades (WebSocket) keep the connection after the HTTP exchange.
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "agent connection ended");
        }
    });
    Ok(sender)
}

/// `GET path` on the agent; the status, or why there was none.
pub async fn probe(socket: &Path, path: &str) -> Result<u16, String> {
    let mut sender = connect::<Empty<Bytes>>(socket)
        .await
        .map_err(|e| e.to_string())?;
    let req = hyper::Request::get(path)
        .header(hyper::header::HOST, "localhost")
        .body(Empty::new())
        .expect("static request");
    let resp = tokio::time::timeout(Duration::from_secs(5), sender.send_request(req))
        .await
        .map_err(|_| format!("GET {path} took more than 5 s"))?
        .map_err(|e| e.to_string())?;
    Ok(resp.status().as_u16())
}

/// Waits until the agent answers `GET /readiness` (or, if it has no such route, `GET
/// /liveness`) with 200. `check` is consulted every half second and may end the wait early
/// (the agent process failed to start, the sandbox died).
pub async fn wait_ready<F, Fut>(
    socket: &Path,
    timeout: Duration,
    mut check: F,
) -> Result<(), String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let started = Instant::now();
    let mut last;
    let mut next_check = started + Duration::from_millis(500);
    let mut delay = Duration::from_millis(2);
    loop {
        match probe(socket, "/readiness").await {
            Ok(200) => return Ok(()),
            Ok(404) => match probe(socket, "/liveness").await {
                Ok(200) => return Ok(()),
                Ok(s) => last = format!("GET /readiness answered 404, GET /liveness {s}"),
                Err(e) => last = e,
            },
            Ok(s) => last = format!("GET /readiness answered {s}"),
            Err(e) => last = e,
        }
        if started.elapsed() >= timeout {
            return Err(format!(
                "the agent was not ready after {:.1} s ({last})",
                started.elapsed().as_secs_f64()
            ));
        }
        if Instant::now() >= next_check {
            next_check = Instant::now() + Duration::from_millis(500);
            check().await?;
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(50));
    }
}
