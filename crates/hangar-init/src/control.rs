//! The control API on `control.sock`: routing, authentication, and the HTTP/1.1 connection loop.
//!
//! Handlers parse the request and hand it to `exec`, `files`, `agent` or `links`; they hold no
//! logic of their own. Every request must carry the bearer secret, compared in constant time;
//! this module must never log or echo the secret. Connections are served by hand (not
//! `axum::serve`) so that `POST /suspend` can close every one of them, which gVisor's checkpoint
//! requires.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use hangar_proto::init::{InitConfig, InitHealth};
use hangar_proto::sandbox::ExecRequest;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;

use crate::agent::Agent;
use crate::error::ApiError;
use crate::links::HostSockets;
use crate::reaper::Reaper;
use crate::{exec, files, spawn};

/// How long a control connection may take to finish its current response once suspend began.
const CLOSE_DEADLINE: Duration = Duration::from_secs(1);

/// What the handlers share.
pub struct App {
    pub config: Arc<InitConfig>,
    pub reaper: Arc<Reaper>,
    pub agent: Arc<Agent>,
    pub sockets: Arc<HostSockets>,
    /// The directory the files API treats as `/` (always `/` in a sandbox).
    pub files_root: PathBuf,
    /// Where users are looked up and commands found (always `/` in a sandbox).
    pub users_root: PathBuf,
    /// The run directory, where the session token file is kept.
    pub run_dir: PathBuf,
}

pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/exec", post(exec_handler))
        .route("/files", get(stat))
        .route("/files/content", get(read).put(write).delete(delete))
        .route("/files/mkdir", post(mkdir))
        .route("/suspend", post(suspend))
        .route("/clock", post(set_clock))
        .route("/token", axum::routing::put(set_token))
        .fallback(|| async { ApiError::not_found("no such endpoint") })
        .layer(middleware::from_fn_with_state(app.clone(), authenticate))
        .with_state(app)
}

/// Compares in time that depends only on the lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn authenticate(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
        .unwrap_or_default();
    if app.config.secret.is_empty() || !constant_time_eq(presented, app.config.secret.as_bytes()) {
        return ApiError::unauthorized().into_response();
    }
    next.run(req).await
}

async fn health(State(app): State<Arc<App>>) -> Json<InitHealth> {
    Json(InitHealth {
        ok: true,
        agent: app.agent.status(),
    })
}

/// Parses an exec body into a request; the errors name what to fix.
pub fn parse_exec(body: &[u8]) -> Result<ExecRequest, ApiError> {
    let req: ExecRequest = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid exec request: {e}")))?;
    if req.cmd.is_empty() {
        return Err(ApiError::bad_request("cmd must not be empty"));
    }
    Ok(req)
}

async fn exec_handler(State(app): State<Arc<App>>, body: Bytes) -> Result<Response, ApiError> {
    let req = parse_exec(&body)?;
    let plan = spawn::plan(
        req.cmd,
        &app.config.defaults,
        req.user.as_deref(),
        req.cwd.as_deref(),
        &req.env,
        &app.users_root,
    )?;
    // A timeout of 0 means none, like an absent one.
    let timeout = req.timeout_s.filter(|&t| t > 0).map(Duration::from_secs);
    let running = exec::start(&app.reaper, &plan, req.stdin, timeout)?;
    let stream = futures_util::stream::unfold(running.lines, |mut rx| async move {
        rx.recv()
            .await
            .map(|line| (Ok::<_, std::convert::Infallible>(line), rx))
    });
    let mut resp = Body::from_stream(stream).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    Ok(resp)
}

struct PathQuery {
    path: Option<String>,
    recursive: Option<String>,
}

impl PathQuery {
    fn path(&self) -> Result<&str, ApiError> {
        self.path
            .as_deref()
            .ok_or_else(|| ApiError::new(StatusCode::BAD_REQUEST, "invalid_path", "missing ?path="))
    }
    fn recursive(&self) -> Result<bool, ApiError> {
        match self.recursive.as_deref() {
            None | Some("false") | Some("0") => Ok(false),
            Some("true") | Some("1") => Ok(true),
            Some(other) => Err(ApiError::bad_request(format!(
                "recursive must be true or false, not {other:?}"
            ))),
        }
    }
}

type PathParams = Query<BTreeMap<String, String>>;

/// Query strings are parsed by hand so a bad one gets an [`hangar_proto::ErrorBody`].
fn path_query(q: PathParams) -> PathQuery {
    let mut q = q.0;
    PathQuery {
        path: q.remove("path"),
        recursive: q.remove("recursive"),
    }
}

async fn stat(State(app): State<Arc<App>>, q: PathParams) -> Result<Response, ApiError> {
    let q = path_query(q);
    Ok(Json(files::stat(&app.files_root, q.path()?).await?).into_response())
}

async fn read(State(app): State<Arc<App>>, q: PathParams) -> Result<Response, ApiError> {
    let q = path_query(q);
    let (len, body) = files::read(&app.files_root, q.path()?).await?;
    let mut resp = body.into_response();
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    Ok(resp)
}

async fn write(
    State(app): State<Arc<App>>,
    q: PathParams,
    body: Body,
) -> Result<Response, ApiError> {
    let q = path_query(q);
    Ok(
        Json(files::write(&app.files_root, q.path()?, body, files::MAX_UPLOAD).await?)
            .into_response(),
    )
}

async fn delete(State(app): State<Arc<App>>, q: PathParams) -> Result<Response, ApiError> {
    let q = path_query(q);
    files::delete(&app.files_root, q.path()?, q.recursive()?).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn mkdir(State(app): State<Arc<App>>, q: PathParams) -> Result<Response, ApiError> {
    let q = path_query(q);
    Ok(Json(files::mkdir(&app.files_root, q.path()?).await?).into_response())
}

async fn suspend(State(app): State<Arc<App>>) -> Response {
    // Flush the overlay's upper directory before the host snapshots it.
    tokio::task::spawn_blocking(nix::unistd::sync).await.ok();
    app.sockets.suspend().await;
    // `Connection: close` makes hyper close this connection right after the response.
    let mut resp = Json(serde_json::json!({})).into_response();
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// Replaces the session token file with a fresh token.
async fn set_token(State(app): State<Arc<App>>, body: Bytes) -> Result<Response, ApiError> {
    crate::token::valid(&body).map_err(ApiError::bad_request)?;
    let dir = app.run_dir.clone();
    tokio::task::spawn_blocking(move || crate::token::write(&dir, &body))
        .await
        .map_err(|e| ApiError::internal("writing the token", e))?
        .map_err(|e| ApiError::internal("writing the token", e))?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Sets the wall clock: a microVM restored from a snapshot wakes up with the time it was
/// suspended at.
async fn set_clock(body: Bytes) -> Result<Response, ApiError> {
    let req: hangar_proto::init::SetClock = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("invalid clock request: {e}")))?;
    let ts = libc::timespec {
        tv_sec: (req.unix_nanos / 1_000_000_000) as libc::time_t,
        tv_nsec: (req.unix_nanos % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: clock_settime reads the timespec we own.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "clock",
            format!("cannot set the clock: {e}"),
        ));
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Accepts control connections until `stop`, then asks every connection to close after its
/// current response (and drops it after [`CLOSE_DEADLINE`]).
pub async fn serve(listener: UnixListener, router: Router, stop: CancellationToken) {
    loop {
        let stream = tokio::select! {
            c = listener.accept() => match c {
                Ok((s, _)) => s,
                Err(e) => {
                    log!("control.sock accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => return,
        };
        let service = TowerToHyperService::new(router.clone());
        let stop = stop.clone();
        tokio::spawn(async move {
            let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(CLOSE_DEADLINE, conn).await;
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_compare() {
        assert!(constant_time_eq(b"s3cret", b"s3cret"));
        assert!(!constant_time_eq(b"s3cret", b"s3creT"));
        assert!(!constant_time_eq(b"s3cret", b"s3cre"));
        assert!(!constant_time_eq(b"", b"x"));
    }

    #[test]
    fn exec_bodies() {
        assert_eq!(parse_exec(br#"{"cmd":["true"]}"#).unwrap().cmd, ["true"]);
        assert!(parse_exec(br#"{"cmd":[]}"#)
            .unwrap_err()
            .message
            .contains("must not be empty"));
        assert!(parse_exec(br#"{"cmd":["x"],"tiemout_s":1}"#)
            .unwrap_err()
            .message
            .contains("tiemout_s"));
    }
}
