//! The data plane: each agent's stable endpoint, `/agents/{name}/…`, relayed to the agent
//! of the caller's session through its sandbox's `agent.sock`.
//!
//! Routing follows DESIGN.md, first match wins: `agent_session_id` (body or query), the
//! `x-agent-session-id` header, the session that made `previous_response_id`, the session
//! bound to `conversation`, else a new session. Every answer carries `x-agent-session-id`.
//! Bodies are relayed frame by frame as they arrive: an SSE stream reaches the client event
//! by event. Only an agent's JSON answer to `POST /responses` is read whole, for its `id`
//! (which is how a later `previous_response_id` finds the session).

use std::collections::HashMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex as StdMutex};
use std::task::{Context, Poll};

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::Response;
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming};
use hyper::client::conn::http1::SendRequest;

use hangar_agents::{Agents, ErrorSource, Lease, Route};
use hangar_proto::agent::{INVOCATION_HEADER, SESSION_HEADER};
use hangar_store::RefKind;

use crate::agents::asserted_user;
use crate::{ApiError, AppState};

/// The largest request body the data plane reads whole (to route it).
const MAX_REQUEST: usize = 32 * 1024 * 1024;
/// The largest JSON answer read whole for its response id; larger ones are relayed as is.
const MAX_CAPTURE: usize = 16 * 1024 * 1024;
/// Until issue 6 brings authentication, callers without `x-agent-user-id` share this key.
pub const ANONYMOUS: &str = "anonymous";

pub(crate) fn user_of(headers: &HeaderMap) -> Result<String, ApiError> {
    Ok(asserted_user(headers)?.unwrap_or_else(|| ANONYMOUS.to_owned()))
}

fn header_session(headers: &HeaderMap) -> Option<String> {
    headers
        .get(SESSION_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
        .map(str::to_owned)
}

pub(crate) async fn read_limited(body: Body) -> Result<Bytes, ApiError> {
    match http_body_util::Limited::new(body, MAX_REQUEST)
        .collect()
        .await
    {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("request body exceeds {MAX_REQUEST} bytes"),
        )),
        Err(e) => Err(ApiError::bad_request(format!(
            "reading the request body: {e}"
        ))),
    }
}

/// `POST /agents/{name}/responses`.
pub async fn responses(
    State(st): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    req: Request,
) -> Result<Response, ApiError> {
    let (mut parts, body) = req.into_parts();
    let user = user_of(&parts.headers)?;
    let body = read_limited(body).await?;
    let json: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("the body is not valid JSON: {e}")))?;
    let obj = json
        .as_object()
        .ok_or_else(|| ApiError::bad_request("the body must be a JSON object"))?;
    let str_field = |k: &str| obj.get(k).and_then(|v| v.as_str()).map(str::to_owned);
    let route = Route {
        session_id: str_field("agent_session_id")
            .or_else(|| q.get("agent_session_id").cloned())
            .or_else(|| header_session(&parts.headers)),
        previous_response_id: str_field("previous_response_id"),
        conversation: match obj.get("conversation") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Object(o)) => {
                o.get("id").and_then(|v| v.as_str()).map(str::to_owned)
            }
            _ => None,
        },
    };
    let (lease, _created) = st.agents.route(&name, &user, &route).await?;
    let (guard, whose) = guarded(&st, &lease, &mut parts.headers).await;
    let capture = Capture {
        agents: st.agents.clone(),
        agent: name,
        isolation_key: user,
        session: lease.session_id.clone(),
        span: tracing::Span::current(),
    };
    let resp = forward(
        &st.pool,
        lease,
        parts.method,
        "/responses",
        parts.uri.query(),
        &parts.headers,
        Outbound::Buffered(body),
        Some(capture),
    )
    .await?;
    Ok(crate::guard::answer(&st, guard, whose, resp).await)
}

/// The guardrails on the answers of `lease`'s session, and whose answer it is. With
/// guardrails the answer must come uncompressed (they read it): `Accept-Encoding` goes.
async fn guarded(
    st: &AppState,
    lease: &Lease,
    headers: &mut HeaderMap,
) -> (Option<Arc<hangar_agents::OutputGuard>>, crate::guard::Whose) {
    let guard = st.agents.output_guard(lease).await;
    if guard.is_some() {
        headers.remove(header::ACCEPT_ENCODING);
    }
    (
        guard,
        crate::guard::Whose {
            agent: lease.agent.clone(),
            session: lease.session_id.clone(),
            request_id: headers
                .get(crate::REQUEST_ID_HEADER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
        },
    )
}

/// `GET|DELETE /agents/{name}/responses/{id}`, `POST …/{id}/cancel`, `GET …/{id}/input_items`:
/// to the session that made the response.
pub async fn response_op(
    State(st): State<AppState>,
    Path(params): Path<HashMap<String, String>>,
    req: Request,
) -> Result<Response, ApiError> {
    let (name, id) = (params["name"].clone(), params["id"].clone());
    let (mut parts, body) = req.into_parts();
    let user = user_of(&parts.headers)?;
    let suffix = match parts.uri.path().rsplit('/').next() {
        Some("cancel") => "/cancel",
        Some("input_items") => "/input_items",
        _ => "",
    };
    let body = read_limited(body).await?;
    let lease = st.agents.route_response(&name, &user, &id).await?;
    let (guard, whose) = guarded(&st, &lease, &mut parts.headers).await;
    let path = format!("/responses/{}{suffix}", percent_encode_segment(&id));
    let resp = forward(
        &st.pool,
        lease,
        parts.method,
        &path,
        parts.uri.query(),
        &parts.headers,
        Outbound::Buffered(body),
        None,
    )
    .await?;
    Ok(crate::guard::answer(&st, guard, whose, resp).await)
}

fn percent_encode_segment(s: &str) -> String {
    hangar_proto::encode_query(s).replace('/', "%2F")
}

/// `POST /agents/{name}/invocations` (and `GET /agents/{name}/invocations_ws`, a WebSocket):
/// the body is relayed as it streams.
pub async fn invocations(
    State(st): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    mut req: Request,
) -> Result<Response, ApiError> {
    let user = user_of(req.headers())?;
    let route = Route {
        session_id: q
            .get("agent_session_id")
            .cloned()
            .or_else(|| header_session(req.headers())),
        ..Route::default()
    };
    let invocation = match req.headers().get(INVOCATION_HEADER) {
        Some(v) if !v.is_empty() && v.len() <= 256 => v.clone(),
        Some(_) => {
            return Err(ApiError::bad_request(format!(
                "{INVOCATION_HEADER} must be 1 to 256 characters"
            )))
        }
        None => {
            let mut id = [0u8; 12];
            getrandom::getrandom(&mut id).expect("the OS random source works");
            HeaderValue::from_str(&format!("inv_{}", hex::encode(id))).expect("ASCII")
        }
    };
    req.headers_mut().insert(
        HeaderName::from_static(INVOCATION_HEADER),
        invocation.clone(),
    );
    let (lease, _) = st.agents.route(&name, &user, &route).await?;
    let path = req
        .uri()
        .path()
        .rsplit('/')
        .next()
        .unwrap_or("invocations")
        .to_owned();
    let path = format!("/{path}");
    let mut resp = if path == "/invocations_ws" {
        if st
            .agents
            .output_guard(&lease)
            .await
            .is_some_and(|g| g.action != hangar_proto::agent::OutputAction::Off)
        {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "guardrails",
                "this agent's guardrails inspect its answers, which they cannot do on a WebSocket; use POST /invocations",
            ));
        }
        upgrade(lease, &mut req, &path).await?
    } else {
        let (mut parts, body) = req.into_parts();
        let (guard, whose) = guarded(&st, &lease, &mut parts.headers).await;
        let resp = forward(
            &st.pool,
            lease,
            parts.method,
            &path,
            parts.uri.query(),
            &parts.headers,
            Outbound::Streamed(body),
            None,
        )
        .await?;
        crate::guard::answer(&st, guard, whose, resp).await
    };
    resp.headers_mut()
        .insert(HeaderName::from_static(INVOCATION_HEADER), invocation);
    Ok(resp)
}

const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    header::HOST,
];

fn copy_headers(from: &HeaderMap, to: &mut HeaderMap) {
    for (k, v) in from {
        if !HOP_BY_HOP.contains(k) && k.as_str() != "keep-alive" && k.as_str() != "proxy-connection"
        {
            to.append(k.clone(), v.clone());
        }
    }
}

/// The caller's credentials are Hangar's business: they never reach the agent (an untrusted
/// sandbox could replay them).
fn strip_credentials(headers: &mut HeaderMap) {
    headers.remove(header::AUTHORIZATION);
    headers.remove("x-api-key");
}

fn upstream_error(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(
        StatusCode::BAD_GATEWAY,
        "agent_unreachable",
        format!("the agent did not answer: {e}"),
    )
    .with_source(ErrorSource::Upstream)
}

fn session_value(lease: &Lease) -> HeaderValue {
    HeaderValue::from_str(&lease.session_id).expect("session ids are ASCII")
}

/// Kept-alive HTTP/1.1 connections to agents, per `agent.sock`, so that a request does not
/// pay for a new connection into the sandbox (a unix connect on the host, a TCP connect
/// inside, a new thread in the agent's server). Connections die with their sandbox's links
/// (suspend closes them all); a dead one is noticed and dropped when taken.
#[derive(Default)]
pub struct AgentPool {
    idle: StdMutex<HashMap<PathBuf, Vec<SendRequest<Body>>>>,
}

/// Idle connections kept per agent socket.
const POOL_PER_SOCKET: usize = 16;

impl AgentPool {
    fn take(&self, socket: &std::path::Path) -> Option<SendRequest<Body>> {
        let mut idle = self.idle.lock().unwrap();
        let list = idle.get_mut(socket)?;
        while let Some(s) = list.pop() {
            if !s.is_closed() && s.is_ready() {
                return Some(s);
            }
        }
        idle.remove(socket);
        None
    }

    fn put(&self, socket: PathBuf, sender: SendRequest<Body>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap();
        if idle.len() > 4096 {
            // Sandboxes come and go; forget the sockets whose connections all died.
            idle.retain(|_, l| {
                l.retain(|s| !s.is_closed());
                !l.is_empty()
            });
        }
        let list = idle.entry(socket).or_default();
        if list.len() < POOL_PER_SOCKET {
            list.push(sender);
        }
    }
}

/// A request body: buffered ones may be sent again on a fresh connection if a kept-alive
/// one turns out to be closed; streamed ones always get a fresh connection.
pub(crate) enum Outbound {
    Buffered(Bytes),
    Streamed(Body),
}

/// Whether the connection may carry another request after this answer.
fn reusable(headers: &HeaderMap) -> bool {
    !headers
        .get(header::CONNECTION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().contains("close"))
}

#[allow(clippy::too_many_arguments)]
pub(crate) async fn forward(
    pool: &Arc<AgentPool>,
    lease: Lease,
    method: Method,
    path: &str,
    query: Option<&str>,
    headers: &HeaderMap,
    body: Outbound,
    capture: Option<Capture>,
) -> Result<Response, ApiError> {
    let session = session_value(&lease);
    crate::telemetry::leased(&lease);
    let proxy = crate::telemetry::proxy_span(method.as_str(), path);
    let uri = match query {
        Some(q) => format!("{path}?{q}"),
        None => path.to_owned(),
    };
    let build = |body: Body| -> Result<hyper::Request<Body>, ApiError> {
        let mut req = hyper::Request::builder()
            .method(method.clone())
            .uri(uri.as_str())
            .body(body)
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        copy_headers(headers, req.headers_mut());
        strip_credentials(req.headers_mut());
        req.headers_mut()
            .insert(header::HOST, HeaderValue::from_static("localhost"));
        req.headers_mut()
            .insert(HeaderName::from_static(SESSION_HEADER), session.clone());
        // After the caller's headers: the agent's parent span is Hangar's call to it.
        crate::telemetry::inject(&proxy, req.headers_mut());
        Ok(req)
    };
    let (sender, resp) = match body {
        Outbound::Buffered(bytes) => {
            let pooled = match pool.take(&lease.socket) {
                Some(mut s) => match s.try_send_request(build(Body::from(bytes.clone()))?).await {
                    Ok(resp) => Some((s, resp)),
                    Err(mut e) => {
                        if e.take_message().is_none() {
                            // The request may have reached the agent: never send it twice.
                            return Err(upstream_error(e.into_error()));
                        }
                        // Closed by the agent while idle, before the request left: try anew.
                        tracing::debug!(error = %e.error(), "kept-alive agent connection was closed");
                        None
                    }
                },
                None => None,
            };
            match pooled {
                Some(p) => p,
                None => {
                    let mut s = hangar_agents::connect::<Body>(&lease.socket)
                        .await
                        .map_err(upstream_error)?;
                    let resp = s
                        .send_request(build(Body::from(bytes))?)
                        .await
                        .map_err(upstream_error)?;
                    (s, resp)
                }
            }
        }
        Outbound::Streamed(body) => {
            let mut s = hangar_agents::connect::<Body>(&lease.socket)
                .await
                .map_err(upstream_error)?;
            let resp = s.send_request(build(body)?).await.map_err(upstream_error)?;
            (s, resp)
        }
    };
    let keep = reusable(resp.headers()).then(|| Keep {
        pool: pool.clone(),
        socket: lease.socket.clone(),
        sender,
    });
    let (parts, body) = resp.into_parts();
    proxy.record(
        "http.response.status_code",
        i64::from(parts.status.as_u16()),
    );
    let mut out_headers = HeaderMap::new();
    copy_headers(&parts.headers, &mut out_headers);
    out_headers.insert(HeaderName::from_static(SESSION_HEADER), session);
    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let mut body = body;
    let mut prefix = None;
    let sniff = match capture {
        Some(c) if parts.status.is_success() && content_type.starts_with("application/json") => {
            // A JSON answer is one object: read it whole (bounded) for its id. One larger
            // than that is relayed as it is, without its id noted.
            let mut buf = bytes::BytesMut::new();
            let mut whole = true;
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(upstream_error)?;
                if let Ok(data) = frame.into_data() {
                    buf.extend_from_slice(&data);
                    if buf.len() > MAX_CAPTURE {
                        whole = false;
                        break;
                    }
                }
            }
            if whole {
                let bytes = buf.freeze();
                if let Ok(answer) = serde_json::from_slice::<serde_json::Value>(&bytes) {
                    crate::telemetry::record_usage(&c.span, &answer);
                    if let Some(id) = answer.get("id").and_then(|i| i.as_str()) {
                        c.remember(id.to_owned()).await;
                    }
                }
                if let Some(k) = keep {
                    k.pool.put(k.socket, k.sender);
                }
                let version = crate::audit::AgentVersion(lease.version);
                drop(lease);
                let mut resp = Response::new(Body::from(bytes));
                resp.extensions_mut().insert(version);
                *resp.status_mut() = parts.status;
                out_headers.remove(header::CONTENT_LENGTH);
                *resp.headers_mut() = out_headers;
                return Ok(resp);
            }
            prefix = Some(buf.freeze());
            None
        }
        Some(c) if content_type.starts_with("text/event-stream") => Some(Sniffer {
            capture: c,
            line: Vec::new(),
            done: false,
            usage: false,
        }),
        _ => None,
    };
    let watch = (sniff.is_some() && parts.status.is_success()).then(DoneWatch::default);
    if watch.is_some() {
        // The stream may grow by a `[DONE]`: its length is no longer the agent's.
        out_headers.remove(header::CONTENT_LENGTH);
    }
    let version = crate::audit::AgentVersion(lease.version);
    let mut resp = Response::new(Body::new(Relay {
        body,
        _lease: lease,
        _span: proxy,
        sniff,
        watch,
        held: None,
        prefix,
        keep,
    }));
    *resp.status_mut() = parts.status;
    *resp.headers_mut() = out_headers;
    resp.extensions_mut().insert(version);
    Ok(resp)
}

/// Relays a WebSocket (or any HTTP upgrade) to the agent and splices the two connections.
async fn upgrade(lease: Lease, req: &mut Request, path: &str) -> Result<Response, ApiError> {
    let client_upgrade = hyper::upgrade::on(&mut *req);
    let session = session_value(&lease);
    crate::telemetry::leased(&lease);
    let mut sender = hangar_agents::connect::<Body>(&lease.socket)
        .await
        .map_err(upstream_error)?;
    let uri = match req.uri().query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_owned(),
    };
    let mut out = hyper::Request::builder()
        .method(req.method().clone())
        .uri(uri)
        .body(Body::empty())
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    for (k, v) in req.headers() {
        if k != header::HOST {
            out.headers_mut().append(k.clone(), v.clone());
        }
    }
    strip_credentials(out.headers_mut());
    out.headers_mut()
        .insert(header::HOST, HeaderValue::from_static("localhost"));
    out.headers_mut()
        .insert(HeaderName::from_static(SESSION_HEADER), session.clone());
    crate::telemetry::inject(&tracing::Span::current(), out.headers_mut());
    let mut resp = sender.send_request(out).await.map_err(upstream_error)?;
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        let (parts, body) = resp.into_parts();
        let mut r = Response::new(Body::new(body));
        *r.status_mut() = parts.status;
        copy_headers(&parts.headers, r.headers_mut());
        r.headers_mut()
            .insert(HeaderName::from_static(SESSION_HEADER), session);
        return Ok(r);
    }
    let agent_upgrade = hyper::upgrade::on(&mut resp);
    let mut r = Response::new(Body::empty());
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    *r.headers_mut() = resp.headers().clone();
    r.headers_mut()
        .insert(HeaderName::from_static(SESSION_HEADER), session);
    tokio::spawn(async move {
        let _lease = lease;
        let (client, agent) = match tokio::join!(client_upgrade, agent_upgrade) {
            (Ok(c), Ok(a)) => (c, a),
            (c, a) => {
                tracing::debug!(client = ?c.err(), agent = ?a.err(), "upgrade failed");
                return;
            }
        };
        let mut client = hyper_util::rt::TokioIo::new(client);
        let mut agent = hyper_util::rt::TokioIo::new(agent);
        if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut agent).await {
            tracing::debug!(error = %e, "websocket relay ended");
        }
    });
    Ok(r)
}

/// Remembers which session made a response.
#[derive(Clone)]
pub(crate) struct Capture {
    pub agents: Agents,
    pub agent: String,
    pub isolation_key: String,
    pub session: String,
    /// The request's `invoke_agent` span (the response's id and usage go on it).
    pub span: tracing::Span,
}

impl Capture {
    async fn remember(&self, response_id: String) {
        self.span.record("gen_ai.response.id", response_id.as_str());
        if let Err(e) = self
            .agents
            .remember(
                &self.agent,
                &self.isolation_key,
                RefKind::Response,
                &response_id,
                &self.session,
            )
            .await
        {
            tracing::warn!(error = %e, response = %response_id, "cannot record the response's session");
        }
    }
}

/// Watches an SSE stream for the first event that names the response (`response.created`).
struct Sniffer {
    capture: Capture,
    line: Vec<u8>,
    /// The response's id was found.
    done: bool,
    /// Its usage was found (in the terminal event).
    usage: bool,
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The longest SSE line looked at for a response id (`response.created` is small; a longer
/// line is some other event).
const MAX_SNIFF_LINE: usize = 64 * 1024;

impl Sniffer {
    /// The response id, if this chunk completes the line that names it.
    fn feed(&mut self, data: &[u8]) -> Option<String> {
        let mut found = None;
        for &b in data {
            if self.done && self.usage {
                break;
            }
            if b != b'\n' {
                if self.line.len() < MAX_SNIFF_LINE {
                    self.line.push(b);
                }
                continue;
            }
            let line = std::mem::take(&mut self.line);
            let Some(payload) = line.strip_prefix(b"data:") else {
                continue;
            };
            // Only the events that matter are parsed: the first naming the response, and
            // the terminal one (with the usage).
            let terminal = contains(payload, b"\"response.completed\"")
                || contains(payload, b"\"response.incomplete\"")
                || contains(payload, b"\"response.failed\"");
            if self.done && !terminal {
                continue;
            }
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(payload) else {
                continue;
            };
            let Some(response) = v.get("response") else {
                continue;
            };
            if terminal && !self.usage {
                self.usage = true;
                crate::telemetry::record_usage(&self.capture.span, response);
            }
            if !self.done {
                if let Some(id) = response.get("id").and_then(|i| i.as_str()) {
                    self.done = true;
                    found = Some(id.to_owned());
                }
            }
        }
        found
    }
}

/// OpenResponses streams end with `data: [DONE]` after the terminal event; OpenAI's and
/// Foundry's do not send it. The stable endpoint speaks OpenResponses, so a stream that
/// completed without it gets it from Hangar, after a comment saying so (which clients
/// ignore and `hangar check` reports). A stream cut short gets nothing: that is not a
/// completed response.
#[derive(Default)]
struct DoneWatch {
    /// The start and the end of the current line (the `type` is near one of them).
    head: Vec<u8>,
    tail: std::collections::VecDeque<u8>,
    /// The line is longer than `head` and `tail` together.
    long: bool,
    /// A terminal event's line was seen; it counts once a blank line dispatches it.
    terminal_line: bool,
    terminal: bool,
    done: bool,
    /// The last line ended was blank (the stream stands between events).
    at_blank: bool,
    after_cr: bool,
}

/// The marker `hangar check` looks for.
pub const ADDED_DONE: &str = ": hangar: the agent's stream ended without data: [DONE]; added\n";

impl DoneWatch {
    const KEEP: usize = 256;

    fn feed(&mut self, data: &[u8]) {
        for &b in data {
            let cr_lf = self.after_cr && b == b'\n';
            self.after_cr = b == b'\r';
            if cr_lf {
                continue;
            }
            if b == b'\n' || b == b'\r' {
                self.end_line();
            } else {
                self.at_blank = false;
                if self.head.len() < Self::KEEP {
                    self.head.push(b);
                } else {
                    if self.tail.len() == Self::KEEP {
                        self.tail.pop_front();
                        self.long = true;
                    }
                    self.tail.push_back(b);
                }
            }
        }
    }

    fn end_line(&mut self) {
        let mut line = std::mem::take(&mut self.head);
        let tail: Vec<u8> = std::mem::take(&mut self.tail).into();
        if std::mem::take(&mut self.long) {
            line.push(b' ');
        }
        line.extend_from_slice(&tail);
        self.at_blank = line.is_empty();
        if self.at_blank {
            if self.terminal_line {
                self.terminal = true;
            }
            return;
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end();
        if let Some(data) = text.strip_prefix("data:") {
            let data = data.trim_start();
            if data == "[DONE]" {
                self.done = true;
            } else if data.starts_with('{') {
                let compact: String = data.chars().filter(|c| !c.is_whitespace()).collect();
                if [
                    "\"type\":\"response.completed\"",
                    "\"type\":\"response.failed\"",
                    "\"type\":\"response.incomplete\"",
                ]
                .iter()
                .any(|t| compact.contains(t))
                {
                    self.terminal_line = true;
                }
            }
        } else if let Some(event) = text.strip_prefix("event:") {
            if matches!(
                event.trim(),
                "response.completed" | "response.failed" | "response.incomplete"
            ) {
                self.terminal_line = true;
            }
        }
    }

    fn owes_done(&self) -> bool {
        self.terminal && !self.done
    }

    /// What to append at the end of the stream, if anything. Only a terminal event the
    /// stream completed (a blank line after it) earns a `[DONE]`: one cut off mid-event is not
    /// a completed response.
    fn missing_done(self) -> Option<Bytes> {
        if !self.owes_done() {
            return None;
        }
        let sep = if self.at_blank && self.head.is_empty() {
            ""
        } else {
            "\n"
        };
        Some(Bytes::from(format!("{sep}{ADDED_DONE}data: [DONE]\n\n")))
    }
}

type Pending = Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// The agent's answer body, relayed frame by frame; holds the session's lease until the
/// last frame, so that the session is not suspended in the middle of a stream.
struct Relay {
    body: Incoming,
    _lease: Lease,
    /// The call's span ends with its answer's body.
    _span: tracing::Span,
    sniff: Option<Sniffer>,
    /// Watches an OpenResponses stream for its closing `data: [DONE]`.
    watch: Option<DoneWatch>,
    /// The frame that named the response, held back until the response's session is
    /// recorded: a client that answers `response.created` at once with a follow-up
    /// `previous_response_id` must find it.
    held: Option<(Pending, Frame<Bytes>)>,
    /// What was already read of the answer, sent first.
    prefix: Option<Bytes>,
    /// The connection, back to the pool once the answer has been read to its end.
    keep: Option<Keep>,
}

struct Keep {
    pool: Arc<AgentPool>,
    socket: PathBuf,
    sender: SendRequest<Body>,
}

impl Relay {
    fn release(&mut self) {
        if let Some(k) = self.keep.take() {
            k.pool.put(k.socket, k.sender);
        }
    }
}

impl hyper::body::Body for Relay {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        if let Some(prefix) = this.prefix.take() {
            return Poll::Ready(Some(Ok(Frame::data(prefix))));
        }
        if let Some((pending, _)) = this.held.as_mut() {
            if pending.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let (_, frame) = this.held.take().expect("held");
            return Poll::Ready(Some(Ok(frame)));
        }
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(w)) = (frame.data_ref(), this.watch.as_mut()) {
                    w.feed(data);
                }
                let id = match (frame.data_ref(), this.sniff.as_mut()) {
                    (Some(data), Some(sniff)) => sniff.feed(data),
                    _ => None,
                };
                // hyper stops polling a body that says it has ended: give the connection
                // back now rather than at a `None` that may never be asked for.
                if this.body.is_end_stream() {
                    this.release();
                }
                if let (Some(id), Some(sniff)) = (id, this.sniff.as_ref()) {
                    let capture = sniff.capture.clone();
                    let mut pending: Pending = Box::pin(async move { capture.remember(id).await });
                    if pending.as_mut().poll(cx).is_pending() {
                        this.held = Some((pending, frame));
                        return Poll::Pending;
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                this.release();
                if let Some(done) = this.watch.take().and_then(|w| w.missing_done()) {
                    return Poll::Ready(Some(Ok(Frame::data(done))));
                }
                Poll::Ready(None)
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_none()
            && self.held.is_none()
            && self.watch.as_ref().is_none_or(|w| !w.owes_done())
            && self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        let inner = self.body.size_hint();
        let extra = self.prefix.as_ref().map_or(0, |p| p.len() as u64)
            + self
                .held
                .as_ref()
                .map_or(0, |(_, f)| f.data_ref().map_or(0, |d| d.len() as u64));
        let mut hint = hyper::body::SizeHint::new();
        hint.set_lower(inner.lower() + extra);
        match inner.upper() {
            Some(upper) if self.watch.is_none() => hint.set_upper(upper + extra),
            _ => {}
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn appended(chunks: &[&str]) -> Option<String> {
        let mut w = DoneWatch::default();
        for c in chunks {
            w.feed(c.as_bytes());
        }
        w.missing_done()
            .map(|b| String::from_utf8(b.to_vec()).unwrap())
    }

    #[test]
    fn done_is_added_only_after_a_terminal_event_without_it() {
        let completed = "event: response.completed\ndata: {\"type\": \"response.completed\", \"response\": {}}\n\n";
        assert_eq!(
            appended(&[completed]).as_deref(),
            Some(&*format!("{ADDED_DONE}data: [DONE]\n\n"))
        );
        assert_eq!(appended(&[completed, "data: [DONE]\n\n"]), None);
        // Split anywhere, CRLF, no `event:` line: the same.
        let crlf = "data: {\"type\":\"response.failed\"}\r\n\r\n";
        for cut in 0..crlf.len() {
            assert!(
                appended(&[&crlf[..cut], &crlf[cut..]]).is_some(),
                "cut {cut}"
            );
        }
        // A stream cut short is not completed: nothing is added.
        assert_eq!(
            appended(&["data: {\"type\":\"response.output_text.delta\"}\n\n"]),
            None
        );
        // A terminal event cut off before its blank line was never delivered: nothing.
        assert_eq!(
            appended(&["data: {\"type\":\"response.completed\"}\n"]),
            None
        );
        assert_eq!(appended(&["data: {\"type\":\"response.completed\"}"]), None);
        // A long line whose `type` comes last (as pydantic writes it) is still seen.
        let long = format!(
            "data: {{\"response\": {{\"pad\": \"{}\"}}, \"sequence_number\": 9, \"type\": \"response.completed\"}}\n\n",
            "x".repeat(100_000)
        );
        assert!(appended(&[&long]).is_some());
    }
}
