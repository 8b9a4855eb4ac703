//! Traces in the API: the `invoke_agent` span of every data-plane request and its
//! `proxy_request` child, W3C trace context into the agent's request, OTLP/HTTP in at
//! `/v1/traces`, and the trace store out at `GET /v1/traces[/{id}]`.
//!
//! Span names and attributes follow the OpenTelemetry GenAI agent-span conventions; the
//! name is Hangar's `invoke_agent {name}:{version}`, which the conventions allow.

use axum::body::Bytes;
use axum::extract::{Extension, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use hangar_agents::Lease;
use hangar_telemetry::{otlp, Origin};
use opentelemetry::trace::TraceContextExt as _;
use serde::Deserialize;
use sha2::Digest;
use tracing::field::Empty;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::error::ApiError;
use crate::identity::FromSandbox;
use crate::AppState;

/// The target of the spans Hangar exports (the OpenTelemetry layer keeps `hangar*` targets).
pub const TARGET: &str = "hangar::trace";

/// The largest OTLP request taken, compressed or not.
pub const MAX_OTLP: usize = 4 * 1024 * 1024;

struct Extract<'a>(&'a HeaderMap);

impl opentelemetry::propagation::Extractor for Extract<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

struct Inject<'a>(&'a mut HeaderMap);

impl opentelemetry::propagation::Injector for Inject<'_> {
    fn set(&mut self, key: &str, value: String) {
        // Replaces the caller's copy: the agent's parent is Hangar's span.
        if let (Ok(k), Ok(v)) = (
            HeaderName::from_bytes(key.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            self.0.insert(k, v);
        }
    }
}

/// The span of one data-plane request, a child of the caller's `traceparent` if it sent one.
/// Its name gets the version once the request has a session ([`leased`]).
pub fn invoke_span(agent: &str, protocol: &str, headers: &HeaderMap) -> Span {
    let span = tracing::info_span!(
        target: TARGET,
        "invoke_agent",
        otel.name = %format!("invoke_agent {agent}"),
        otel.kind = "client",
        otel.status_code = Empty,
        gen_ai.operation.name = "invoke_agent",
        gen_ai.provider.name = "hangar",
        gen_ai.agent.name = %agent,
        gen_ai.agent.id = Empty,
        gen_ai.agent.version = Empty,
        gen_ai.conversation.id = Empty,
        gen_ai.response.id = Empty,
        gen_ai.usage.input_tokens = Empty,
        gen_ai.usage.output_tokens = Empty,
        hangar.protocol = %protocol,
        hangar.session.id = Empty,
        hangar.isolation_key.sha256 = Empty,
        http.response.status_code = Empty,
        error.type = Empty,
        trace_id = Empty,
    );
    if span.is_disabled() {
        return span;
    }
    let parent = opentelemetry::global::get_text_map_propagator(|p| p.extract(&Extract(headers)));
    let _ = span.set_parent(parent);
    let trace_id = span.context().span().span_context().trace_id();
    if trace_id != opentelemetry::trace::TraceId::INVALID {
        // For the logs written inside the request (`--log-format json` carries it).
        span.record("trace_id", tracing::field::display(trace_id));
    }
    span
}

/// Names the request's version, session and (hashed) end user on its `invoke_agent` span.
pub fn leased(lease: &Lease) {
    let span = Span::current();
    if span.is_disabled() {
        return;
    }
    let id = format!("{}:{}", lease.agent, lease.version);
    span.context()
        .span()
        .update_name(format!("invoke_agent {id}"));
    span.record("gen_ai.agent.id", id.as_str());
    span.record("gen_ai.agent.version", lease.version.to_string().as_str());
    // A session is Hangar's conversation: the same one answers every turn of it.
    span.record("gen_ai.conversation.id", lease.session_id.as_str());
    span.record("hangar.session.id", lease.session_id.as_str());
    let key = hex::encode(sha2::Sha256::digest(lease.isolation_key().as_bytes()));
    span.record("hangar.isolation_key.sha256", key.as_str());
}

/// The answer's status on the span; 5xx marks it failed.
pub fn finished(span: &Span, status: StatusCode) {
    span.record("http.response.status_code", i64::from(status.as_u16()));
    if status.is_server_error() {
        span.record("error.type", status.as_str());
        span.record("otel.status_code", "error");
    }
}

/// The span of the call to the agent; it lasts as long as the answer's body.
pub fn proxy_span(method: &str, path: &str) -> Span {
    tracing::info_span!(
        target: TARGET,
        "proxy_request",
        otel.name = %format!("{method} {path}"),
        otel.kind = "client",
        http.request.method = %method,
        url.path = %path,
        server.address = "agent.sock",
        http.response.status_code = Empty,
    )
}

/// Puts `span`'s context (`traceparent`, `tracestate`, `baggage`) into the agent's request.
pub fn inject(span: &Span, headers: &mut HeaderMap) {
    if span.is_disabled() {
        return;
    }
    let cx = span.context();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, &mut Inject(headers)));
}

/// The usage an OpenResponses (or Chat Completions) object reports, on `span`.
pub fn record_usage(span: &Span, response: &serde_json::Value) {
    let usage = &response["usage"];
    let tokens = |a: &str, b: &str| usage[a].as_i64().or_else(|| usage[b].as_i64());
    if let Some(n) = tokens("input_tokens", "prompt_tokens") {
        span.record("gen_ai.usage.input_tokens", n);
    }
    if let Some(n) = tokens("output_tokens", "completion_tokens") {
        span.record("gen_ai.usage.output_tokens", n);
    }
}

/// Traces are the operator's: they hold every user's requests.
fn operator_only(headers: &HeaderMap) -> Result<(), ApiError> {
    if headers.contains_key(hangar_proto::agent::USER_HEADER) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "traces are the operator's, not an end user's ({})",
                hangar_proto::agent::USER_HEADER
            ),
        ));
    }
    Ok(())
}

fn trace_store(st: &AppState) -> Result<&hangar_store::TraceStore, ApiError> {
    telemetry(st)?.store().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "starting",
            "the trace store is not open yet",
        )
    })
}

fn telemetry(st: &AppState) -> Result<&hangar_telemetry::Telemetry, ApiError> {
    st.telemetry.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "tracing_off",
            "tracing is off on this server (hangar serve --tracing off)",
        )
    })
}

/// Takes an OTLP/HTTP trace request from `origin`, answering as the OTLP spec says.
fn take(st: &AppState, origin: Origin, headers: &HeaderMap, body: &Bytes) -> Response {
    let telemetry = match telemetry(st) {
        Ok(t) => t,
        Err(e) => return e.into_response(),
    };
    let text = |h: header::HeaderName| headers.get(h).and_then(|v| v.to_str().ok());
    let (request, format) = match otlp::decode(
        text(header::CONTENT_TYPE),
        text(header::CONTENT_ENCODING),
        body,
        MAX_OTLP,
    ) {
        Ok(r) => r,
        Err(e @ otlp::DecodeError::MediaType(_)) | Err(e @ otlp::DecodeError::Encoding(_)) => {
            return ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                e.to_string(),
            )
            .into_response()
        }
        Err(e @ otlp::DecodeError::TooLarge(_)) => {
            return ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", e.to_string())
                .into_response()
        }
        Err(e) => return ApiError::bad_request(e.to_string()).into_response(),
    };
    if !request.resource_spans.is_empty() && telemetry.accept(origin, request).is_err() {
        let mut r = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "busy",
            "the trace queue is full; retry later",
        )
        .into_response();
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("2"));
        return r;
    }
    let (content_type, body) = otlp::success(format);
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

/// `POST /v1/traces` on Hangar's listener: spans from agents that run elsewhere (a key).
pub async fn receive(State(st): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    take(&st, Origin::Caller, &headers, &body)
}

/// `POST http://hangar.internal/v1/traces`: an agent's spans, attributed to the session its
/// sandbox serves (whatever the spans claim).
pub async fn receive_internal(
    State(st): State<AppState>,
    Extension(FromSandbox(sandbox)): Extension<FromSandbox>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let origin = match st.agents.session_of_sandbox(&sandbox) {
        Some((agent, session)) => Origin::Agent {
            agent,
            session: Some(session),
        },
        None => {
            return ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "this sandbox serves no session; its spans are not taken",
            )
            .into_response()
        }
    };
    take(&st, origin, &headers, &body)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    agent: Option<String>,
    session: Option<String>,
    /// Only traces that started before this (microseconds since the epoch): the next page.
    before_us: Option<i64>,
    limit: Option<i64>,
}

/// `GET /v1/traces?agent=&session=&before_us=&limit=`: recent traces, newest first.
pub async fn list(
    State(st): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Result<Response, ApiError> {
    operator_only(&headers)?;
    let store = trace_store(&st)?;
    let limit = q.limit.unwrap_or(50);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::bad_request("limit must be 1 to 1000"));
    }
    let traces = store
        .traces(&hangar_store::TraceFilter {
            agent: q.agent.as_deref(),
            session: q.session.as_deref(),
            before_us: q.before_us,
            limit,
        })
        .await
        .map_err(internal)?;
    Ok(axum::Json(serde_json::json!({ "traces": traces })).into_response())
}

/// `GET /v1/traces/{trace_id}`: every span of a trace, in start order.
pub async fn get(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path(trace_id): Path<String>,
) -> Result<Response, ApiError> {
    operator_only(&headers)?;
    let store = trace_store(&st)?;
    let id = trace_id.to_ascii_lowercase();
    if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ApiError::bad_request(
            "a trace id is 32 hexadecimal characters",
        ));
    }
    let spans = store.trace(&id).await.map_err(internal)?;
    if spans.is_empty() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no trace {id} (traces are kept for a while, then dropped)"),
        ));
    }
    Ok(axum::Json(serde_json::json!({ "trace_id": id, "spans": spans })).into_response())
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        format!("reading traces: {e}"),
    )
}
