//! The client side of the link to `hangar-init`: HTTP/1.1 over the sandbox's `control.sock`,
//! authenticated with the sandbox's secret. The protocol is in `hangar_proto::init`.
//!
//! The run directory is writable from inside the sandbox, so the socket path is checked to
//! be a socket (not a symlink planted by the agent) before every connect.

use std::os::unix::fs::FileTypeExt;
use std::path::PathBuf;

use bytes::{Bytes, BytesMut};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;

use hangar_proto::init::{InitExecEvent, InitHealth};
use hangar_proto::sandbox::ExecRequest;
use hangar_proto::ErrorBody;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// A request body streamed to `hangar-init`.
pub type LinkBody = UnsyncBoxBody<Bytes, BoxError>;

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("sandbox is not reachable: {0}")]
    Connect(String),
    #[error("talking to hangar-init: {0}")]
    Http(String),
    /// `hangar-init` answered with an error; its status and body are the caller's to relay.
    #[error("{}", .body.error.message)]
    Status { status: StatusCode, body: ErrorBody },
    #[error("unreadable answer from hangar-init: {0}")]
    Decode(String),
    #[error("hangar-init did not answer {0} within {1:?}")]
    Timeout(&'static str, std::time::Duration),
}

/// How long the lifecycle calls may take: a sandbox that does not answer (a hung or hostile
/// guest) must not hold its suspend or its readiness check for ever.
const HEALTH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
const SUSPEND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

/// The files operations of `hangar-init`'s control API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileOp {
    Read,
    /// Replace the file with the request body.
    Write,
    Remove {
        recursive: bool,
    },
    /// The entry, and a directory's entries.
    Stat,
    /// Create the directory and its parents.
    Mkdir,
}

#[derive(Debug, Clone)]
pub struct InitLink {
    socket: PathBuf,
    secret: String,
}

impl InitLink {
    pub fn new(socket: PathBuf, secret: String) -> InitLink {
        InitLink { socket, secret }
    }

    /// Sends one request on a fresh connection (a unix connect costs microseconds, and a
    /// connection per request keeps no host socket open between calls, which gVisor's
    /// checkpoint needs).
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: LinkBody,
    ) -> Result<Response<Incoming>, LinkError> {
        let stream = connect_no_follow(&self.socket).await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| LinkError::Http(e.to_string()))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "init link connection ended");
            }
        });
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "hangar-init")
            .header(
                hyper::header::AUTHORIZATION,
                format!("Bearer {}", self.secret),
            )
            .body(body)
            .map_err(|e| LinkError::Http(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| LinkError::Http(e.to_string()))?;
        if resp.status().is_client_error() || resp.status().is_server_error() {
            let status = resp.status();
            let bytes = read_capped(resp.into_body()).await?;
            let body = serde_json::from_slice(&bytes).unwrap_or_else(|_| {
                ErrorBody::new(
                    "sandbox_error",
                    String::from_utf8_lossy(&bytes).trim().to_string(),
                )
            });
            return Err(LinkError::Status { status, body });
        }
        Ok(resp)
    }

    async fn json<T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: LinkBody,
    ) -> Result<T, LinkError> {
        let resp = self.request(method, path, body).await?;
        let bytes = read_capped(resp.into_body()).await?;
        serde_json::from_slice(&bytes).map_err(|e| LinkError::Decode(e.to_string()))
    }

    pub async fn health(&self) -> Result<InitHealth, LinkError> {
        tokio::time::timeout(HEALTH_TIMEOUT, self.json(Method::GET, "/health", empty()))
            .await
            .map_err(|_| LinkError::Timeout("GET /health", HEALTH_TIMEOUT))?
    }

    /// Asks `hangar-init` to sync and close every host socket before a memory checkpoint.
    pub async fn suspend(&self) -> Result<(), LinkError> {
        tokio::time::timeout(SUSPEND_TIMEOUT, async {
            let resp = self.request(Method::POST, "/suspend", empty()).await?;
            read_capped(resp.into_body()).await?;
            Ok(())
        })
        .await
        .map_err(|_| LinkError::Timeout("POST /suspend", SUSPEND_TIMEOUT))?
    }

    /// Sets the sandbox's wall clock to `now` (a VM's clock stands still while it is
    /// suspended).
    pub async fn set_clock(&self, now: std::time::SystemTime) -> Result<(), LinkError> {
        let since = now
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let body = serde_json::to_vec(&hangar_proto::init::SetClock {
            unix_nanos: since.as_nanos() as u64,
        })
        .expect("serialises");
        tokio::time::timeout(HEALTH_TIMEOUT, async {
            let resp = self.request(Method::POST, "/clock", full(body)).await?;
            read_capped(resp.into_body()).await?;
            Ok(())
        })
        .await
        .map_err(|_| LinkError::Timeout("POST /clock", HEALTH_TIMEOUT))?
    }

    /// Replaces the sandbox's session token file.
    pub async fn set_token(&self, token: &str) -> Result<(), LinkError> {
        tokio::time::timeout(HEALTH_TIMEOUT, async {
            let resp = self
                .request(Method::PUT, "/token", full(token.to_owned()))
                .await?;
            read_capped(resp.into_body()).await?;
            Ok(())
        })
        .await
        .map_err(|_| LinkError::Timeout("PUT /token", HEALTH_TIMEOUT))?
    }

    /// A files operation on `path` inside the sandbox; the answer (status, streamed body) is
    /// the caller's to relay.
    pub async fn files(
        &self,
        op: FileOp,
        path: &str,
        body: LinkBody,
    ) -> Result<Response<Incoming>, LinkError> {
        let q = hangar_proto::encode_query(path);
        let (method, uri) = match op {
            FileOp::Read => (Method::GET, format!("/files/content?path={q}")),
            FileOp::Write => (Method::PUT, format!("/files/content?path={q}")),
            FileOp::Remove { recursive } => (
                Method::DELETE,
                format!("/files/content?path={q}&recursive={recursive}"),
            ),
            FileOp::Stat => (Method::GET, format!("/files?path={q}")),
            FileOp::Mkdir => (Method::POST, format!("/files/mkdir?path={q}")),
        };
        self.request(method, &uri, body).await
    }

    /// Starts a process; the events arrive as the process produces output.
    pub async fn exec(&self, req: &ExecRequest) -> Result<ExecStream, LinkError> {
        let body = serde_json::to_vec(req).expect("exec request serialises");
        let resp = self.request(Method::POST, "/exec", full(body)).await?;
        Ok(ExecStream {
            body: resp.into_body(),
            buf: BytesMut::new(),
            done: false,
        })
    }
}

/// The largest JSON answer or NDJSON line accepted from a sandbox: the other side is under
/// the control of untrusted code, and Hangar's memory is every tenant's.
const MAX_ANSWER: usize = 1 << 20;

async fn read_capped(body: Incoming) -> Result<Bytes, LinkError> {
    http_body_util::Limited::new(body, MAX_ANSWER)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| LinkError::Http(format!("answer from the sandbox: {e}")))
}

/// Connects to the unix socket at `path` without following a symlink there: the run directory
/// is writable from inside the sandbox, and a symlink planted in place of `control.sock` must
/// not lead Hangar (and the sandbox's secret) to another socket on the host. The socket is
/// opened with `O_PATH | O_NOFOLLOW`, checked, and connected to through `/proc/self/fd`.
pub async fn connect_no_follow(path: &std::path::Path) -> Result<UnixStream, LinkError> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| LinkError::Connect(e.to_string()))?;
    let meta = file
        .metadata()
        .map_err(|e| LinkError::Connect(e.to_string()))?;
    if !meta.file_type().is_socket() {
        return Err(LinkError::Connect(format!(
            "{} is not a socket",
            path.file_name().unwrap_or_default().to_string_lossy()
        )));
    }
    use std::os::fd::AsRawFd;
    let via = format!("/proc/self/fd/{}", file.as_raw_fd());
    let stream = UnixStream::connect(&via)
        .await
        .map_err(|e| LinkError::Connect(e.to_string()));
    drop(file);
    stream
}

pub fn empty() -> LinkBody {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

pub fn full(bytes: impl Into<Bytes>) -> LinkBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// The NDJSON event stream of one exec.
pub struct ExecStream {
    body: Incoming,
    buf: BytesMut,
    done: bool,
}

impl ExecStream {
    /// The next event, or `None` at the end of the stream.
    pub async fn next(&mut self) -> Option<Result<InitExecEvent, LinkError>> {
        loop {
            if let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                let line = self.buf.split_to(pos + 1);
                let line = &line[..line.len() - 1];
                if line.is_empty() {
                    continue;
                }
                return Some(
                    serde_json::from_slice(line).map_err(|e| LinkError::Decode(e.to_string())),
                );
            }
            if self.done {
                return None;
            }
            match self.body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf.extend_from_slice(&data);
                        if self.buf.len() > MAX_ANSWER && !self.buf.contains(&b'\n') {
                            self.done = true;
                            self.buf.clear();
                            return Some(Err(LinkError::Decode(
                                "an exec event line is too long".into(),
                            )));
                        }
                    }
                }
                Some(Err(e)) => return Some(Err(LinkError::Http(e.to_string()))),
                None => {
                    self.done = true;
                    if !self.buf.is_empty() {
                        self.buf.extend_from_slice(b"\n");
                    }
                }
            }
        }
    }
}
