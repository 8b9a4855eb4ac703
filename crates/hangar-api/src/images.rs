//! `/v1/images`: list, build (uploaded context), import (path or uploaded archive), bootstrap.
//!
//! Long operations answer 200 with an NDJSON stream: `{"progress": "..."}` lines as the work
//! goes, then one `{"image": ImageInfo}` or `{"error": {"code", "message"}}`. Everything that
//! can be checked before the work starts (the name, the upload, the Dockerfile's presence) is
//! answered with a 4xx before the stream. The work runs in its own task: a client that goes
//! away does not leave a half-made image behind.

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use hangar_build::{BootstrapSpec, BuildRequest, ContextError, ImageError, Images, Progress};
use hangar_proto::agent::{ImageInfo, ImageList};
use hangar_proto::ErrorDetail;

use crate::{ApiError, AppState};

/// One line of an image operation's NDJSON answer.
#[derive(Debug, Serialize)]
#[serde(rename_all = "snake_case")]
enum ImageEvent {
    Progress(String),
    Image(ImageInfo),
    Error(ErrorDetail),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuildQuery {
    name: String,
    #[serde(default = "default_dockerfile")]
    dockerfile: String,
}

fn default_dockerfile() -> String {
    "Dockerfile".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportQuery {
    name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ImportPath {
    path: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BootstrapBody {
    image: String,
    #[serde(default)]
    packages: Vec<String>,
    #[serde(default)]
    mirror: Option<String>,
}

impl From<ImageError> for ApiError {
    fn from(e: ImageError) -> Self {
        if e.is_user_error() {
            ApiError::new(StatusCode::BAD_REQUEST, e.code(), e.to_string())
        } else {
            tracing::error!(error = ?e, "image operation failed");
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                e.code(),
                hangar_sandbox::error_chain(&e),
            )
        }
    }
}

impl From<ContextError> for ApiError {
    fn from(e: ContextError) -> Self {
        let status = match &e {
            ContextError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ContextError::Io { .. } => {
                tracing::error!(error = ?e, "receiving an upload failed");
                StatusCode::INTERNAL_SERVER_ERROR
            }
            _ => StatusCode::BAD_REQUEST,
        };
        ApiError::new(status, e.code(), hangar_sandbox::error_chain(&e))
    }
}

fn detail(e: &ImageError) -> ErrorDetail {
    if !e.is_user_error() {
        tracing::error!(error = ?e, "image operation failed");
    }
    ErrorDetail {
        code: e.code().to_string(),
        message: hangar_sandbox::error_chain(e),
    }
}

pub async fn list(State(st): State<AppState>) -> Result<Json<ImageList>, ApiError> {
    Ok(Json(ImageList {
        images: st.images.list().await?,
    }))
}

/// The request body as an `AsyncRead`, for streaming uploads to disk.
fn body_reader(body: Body) -> impl tokio::io::AsyncRead + Send + Unpin + 'static {
    tokio_util::io::StreamReader::new(
        body.into_data_stream()
            .map_err(|e| std::io::Error::other(e.to_string())),
    )
}

pub async fn build(
    State(st): State<AppState>,
    Query(q): Query<BuildQuery>,
    body: Body,
) -> Result<Response, ApiError> {
    hangar_build::validate_name(&q.name)?;
    let context = st
        .images
        .receive_context(body_reader(body), st.max_upload)
        .await?;
    context.dockerfile(&q.dockerfile)?;
    let req = BuildRequest {
        context,
        dockerfile: q.dockerfile,
        name: q.name,
    };
    Ok(stream(st.images, move |images, progress| async move {
        images.build(req, &progress).await
    }))
}

pub async fn import(
    State(st): State<AppState>,
    Query(q): Query<ImportQuery>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    if let Some(name) = &q.name {
        hangar_build::validate_name(name)?;
    }
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if json {
        let bytes: Bytes = axum::body::to_bytes(body, 64 * 1024)
            .await
            .map_err(|e| ApiError::bad_request(format!("reading the request body: {e}")))?;
        let req: ImportPath = serde_json::from_slice(&bytes)
            .map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))?;
        if !req.path.starts_with('/') {
            return Err(ApiError::bad_request(format!(
                "path must be absolute (a path on the server's host), not {:?}",
                req.path
            )));
        }
        let path = std::path::PathBuf::from(req.path);
        return Ok(stream(st.images, move |images, progress| async move {
            images.import(&path, q.name.as_deref(), &progress).await
        }));
    }
    let upload = st
        .images
        .receive_upload(body_reader(body), st.max_upload)
        .await?;
    Ok(stream(st.images, move |images, progress| async move {
        // The upload (and its temp directory) lives until the import is done.
        let path = upload.path.clone();
        let r = images.import(&path, q.name.as_deref(), &progress).await;
        drop(upload);
        // The client knows its archive, not the server's temp file.
        r.map_err(|e| match e {
            ImageError::NotAnImage { reason, .. } => ImageError::NotAnImage {
                path: "the uploaded archive".into(),
                reason,
            },
            e => e,
        })
    }))
}

pub async fn bootstrap(State(st): State<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let req: BootstrapBody = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))?;
    let spec = BootstrapSpec::parse(&req.image, &req.packages, req.mirror.as_deref())?;
    Ok(stream(st.images, move |images, progress| async move {
        images.bootstrap(&spec, &progress).await
    }))
}

/// Runs `work` in its own task and answers with its progress and result as NDJSON.
fn stream<F, Fut>(images: Images, work: F) -> Response
where
    F: FnOnce(Images, Progress) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<ImageInfo, ImageError>> + Send + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel::<String>();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let result = work(images, Progress::new(tx)).await;
        let _ = done_tx.send(result);
    });
    let lines = futures_util::stream::unfold((rx, Some(done_rx)), |(mut rx, done)| async move {
        let event = match rx.recv().await {
            Some(line) => ImageEvent::Progress(line),
            None => {
                // Progress ends when the work drops its sender, i.e. when it is done.
                let result = done?.await.unwrap_or_else(|_| {
                    Err(ImageError::Invalid("the operation was cancelled".into()))
                });
                let ev = match result {
                    Ok(info) => ImageEvent::Image(info),
                    Err(e) => ImageEvent::Error(detail(&e)),
                };
                return Some((line(&ev), (rx, None)));
            }
        };
        Some((line(&event), (rx, done)))
    });
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(lines.map(Ok::<_, std::convert::Infallible>)),
    )
        .into_response()
}

fn line(ev: &ImageEvent) -> Bytes {
    let mut v = serde_json::to_vec(ev).expect("events serialise");
    v.push(b'\n');
    Bytes::from(v)
}
