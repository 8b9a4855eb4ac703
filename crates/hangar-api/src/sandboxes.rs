//! `/v1/sandboxes`: create, list, get, delete, exec, files, suspend, resume.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use http_body_util::BodyExt;
use serde::Deserialize;

use hangar_proto::init::InitExecEvent;
use hangar_proto::sandbox::{CreateSandbox, ExecEvent, ExecRequest, ExecResult, SandboxList};
use hangar_sandbox::link::{self, FileOp, LinkError};

use crate::{ApiError, AppState};

/// Parses a JSON body into `T`, with the serde message (which names the field and position).
pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))
}

pub async fn doctor(State(st): State<AppState>) -> Json<hangar_sandbox::HostProbe> {
    Json(st.sandboxes.probe().clone())
}

pub async fn create(State(st): State<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let req: CreateSandbox = parse_json(&body)?;
    if !req.image.starts_with('/') {
        return Err(ApiError::bad_request(format!(
            "image must be an absolute path, not {:?}",
            req.image
        )));
    }
    let sb = st.sandboxes.create(req).await?;
    Ok((StatusCode::CREATED, Json(sb)).into_response())
}

pub async fn list(State(st): State<AppState>) -> Json<SandboxList> {
    Json(SandboxList {
        sandboxes: st.sandboxes.list().await,
    })
}

pub async fn get(State(st): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    Ok(Json(st.sandboxes.get(&id).await?).into_response())
}

/// `GET /v1/sandboxes/{id}/egress`: the connections the sandbox made or tried.
pub async fn egress(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    st.sandboxes.get(&id).await?;
    let egress = st
        .agents
        .store()
        .egress(Some(&id), None, 10_000)
        .await
        .map_err(hangar_agents::AgentsError::from)?;
    Ok(Json(serde_json::json!({ "egress": egress })).into_response())
}

pub async fn delete(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    st.sandboxes.delete(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn suspend(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    Ok(Json(st.sandboxes.suspend(&id).await?).into_response())
}

pub async fn resume(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    Ok(Json(st.sandboxes.resume(&id).await?).into_response())
}

fn decode(b64: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap_or_default()
}

pub async fn exec(
    State(st): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req: ExecRequest = parse_json(&body)?;
    let mut stream = st.sandboxes.exec(&id, &req).await?;
    let streaming = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/x-ndjson"));
    if streaming {
        let events = futures_util::stream::unfold(stream, |mut s| async move {
            let ev = s.next().await?;
            let line = match ev {
                Ok(ev) => {
                    let ev = match ev {
                        InitExecEvent::Stdout(d) => {
                            ExecEvent::Stdout(String::from_utf8_lossy(&decode(&d)).into_owned())
                        }
                        InitExecEvent::Stderr(d) => {
                            ExecEvent::Stderr(String::from_utf8_lossy(&decode(&d)).into_owned())
                        }
                        InitExecEvent::Exit {
                            exit_code,
                            timed_out,
                        } => ExecEvent::Exit {
                            exit_code,
                            timed_out,
                        },
                    };
                    let mut line = serde_json::to_vec(&ev).expect("event serialises");
                    line.push(b'\n');
                    line
                }
                Err(e) => {
                    let mut line =
                        serde_json::to_vec(&serde_json::json!({"error": e.to_string()})).unwrap();
                    line.push(b'\n');
                    line
                }
            };
            Some((Ok::<_, std::convert::Infallible>(Bytes::from(line)), s))
        });
        return Ok((
            [(header::CONTENT_TYPE, "application/x-ndjson")],
            Body::from_stream(events),
        )
            .into_response());
    }
    // Collected answers are bounded: a command's output is the sandbox's to choose, and
    // Hangar's memory is every tenant's. The streamed form has no such limit.
    const MAX_COLLECTED: usize = 16 << 20;
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let mut truncated = false;
    let mut keep = |buf: &mut Vec<u8>, chunk: Vec<u8>| {
        let room = MAX_COLLECTED.saturating_sub(buf.len());
        truncated |= chunk.len() > room;
        buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
    };
    let mut result = None;
    while let Some(ev) = stream.next().await {
        match ev? {
            InitExecEvent::Stdout(d) => keep(&mut out, decode(&d)),
            InitExecEvent::Stderr(d) => keep(&mut err, decode(&d)),
            InitExecEvent::Exit {
                exit_code,
                timed_out,
            } => result = Some((exit_code, timed_out)),
        }
    }
    let (exit_code, timed_out) = result.ok_or_else(|| {
        ApiError::from(LinkError::Decode(
            "the exec stream ended without an exit status".into(),
        ))
    })?;
    Ok(Json(ExecResult {
        exit_code,
        stdout: String::from_utf8_lossy(&out).into_owned(),
        stderr: String::from_utf8_lossy(&err).into_owned(),
        timed_out,
        truncated,
    })
    .into_response())
}

#[derive(Deserialize)]
pub struct PathQuery {
    path: Option<String>,
    #[serde(default)]
    recursive: bool,
}

impl PathQuery {
    fn path(&self) -> Result<&str, ApiError> {
        self.path
            .as_deref()
            .ok_or_else(|| ApiError::bad_request("missing query parameter \"path\""))
    }
}

/// Relays `hangar-init`'s answer (status, content type, streamed body) to the client.
fn relay(resp: hyper::Response<hyper::body::Incoming>) -> Response {
    let (parts, body) = resp.into_parts();
    let mut out = Response::new(Body::new(body));
    *out.status_mut() = parts.status;
    for h in [header::CONTENT_TYPE, header::CONTENT_LENGTH] {
        if let Some(v) = parts.headers.get(&h) {
            out.headers_mut().insert(h, v.clone());
        }
    }
    out
}

async fn files_call(
    st: &AppState,
    id: &str,
    op: FileOp,
    q: &PathQuery,
) -> Result<Response, ApiError> {
    let link = st.sandboxes.running_link(id).await?;
    Ok(relay(link.files(op, q.path()?, link::empty()).await?))
}

pub async fn read_file(
    State(st): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<PathQuery>,
) -> Result<Response, ApiError> {
    files_call(&st, &id, FileOp::Read, &q).await
}

pub async fn stat_file(
    State(st): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<PathQuery>,
) -> Result<Response, ApiError> {
    files_call(&st, &id, FileOp::Stat, &q).await
}

pub async fn mkdir(
    State(st): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<PathQuery>,
) -> Result<Response, ApiError> {
    files_call(&st, &id, FileOp::Mkdir, &q).await
}

pub async fn delete_file(
    State(st): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<PathQuery>,
) -> Result<Response, ApiError> {
    files_call(
        &st,
        &id,
        FileOp::Remove {
            recursive: q.recursive,
        },
        &q,
    )
    .await
}

pub async fn write_file(
    State(st): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<PathQuery>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("upload exceeds the limit of {} bytes", st.max_upload),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > st.max_upload) {
        return Err(too_large());
    }
    let path = q.path()?;
    // A body without a length is counted as it streams; crossing the limit aborts the
    // upload, and hangar-init then discards its temporary file, so nothing changes.
    let tripped = Arc::new(AtomicBool::new(false));
    let flag = tripped.clone();
    let limited = http_body_util::Limited::new(body, st.max_upload as usize).map_err(move |e| {
        flag.store(true, Ordering::Relaxed);
        e
    });
    let link = st.sandboxes.running_link(&id).await?;
    match link
        .files(FileOp::Write, path, limited.boxed_unsync())
        .await
    {
        Ok(resp) => Ok(relay(resp)),
        Err(_) if tripped.load(Ordering::Relaxed) => Err(too_large()),
        Err(e) => Err(e.into()),
    }
}
