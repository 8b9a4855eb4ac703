//! The audit trail at the API: every change and every session access is recorded with who,
//! what, when and the request's id — a change before its answer leaves, a call to an agent
//! beside its answer (`record`, a route layer, so that
//! the route's template names the action). The trail itself is in the store, hash-chained; the
//! position and hash of its last record are also kept in `<data>/audit-head`, so that records
//! removed from its end are noticed too.
//!
//! The actor is the API key (`key:<id>`), with the end user it named (`key:<id> as
//! user:<u>`), or `channel` for an Activity Protocol call the channel's own token carried.

use std::collections::HashMap;
use std::path::PathBuf;

use axum::extract::{MatchedPath, Query, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use hangar_proto::agent::{SESSION_HEADER, USER_HEADER};
use hangar_store::{AuditEntry, AuditFilter, ChainBreak, Store};

use crate::{ApiError, AppState};

pub const REQUEST_ID_HEADER: &str = "x-request-id";

pub struct Audit {
    store: Store,
    head: PathBuf,
    /// Appends run one at a time: each chains on the last.
    lock: tokio::sync::Mutex<()>,
    /// Records written beside their answers and not yet appended.
    pending: std::sync::atomic::AtomicUsize,
}

impl Audit {
    pub fn new(store: Store, data_dir: &std::path::Path) -> Audit {
        Audit {
            store,
            head: data_dir.join("audit-head"),
            lock: tokio::sync::Mutex::new(()),
            pending: Default::default(),
        }
    }

    /// Appends a record beside the answer (the caller does not wait for it).
    pub fn record_soon(self: &std::sync::Arc<Self>, entry: AuditEntry) {
        use std::sync::atomic::Ordering;
        self.pending.fetch_add(1, Ordering::AcqRel);
        let me = self.clone();
        tokio::spawn(async move {
            me.record(entry).await;
            me.pending.fetch_sub(1, Ordering::AcqRel);
        });
    }

    /// Waits (at most `limit`) until every record written beside its answer is appended:
    /// `hangar serve` does before it exits, so that none is lost.
    pub async fn drain(&self, limit: std::time::Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while self.pending.load(std::sync::atomic::Ordering::Acquire) > 0 {
            if tokio::time::Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        true
    }

    /// Appends a record. A failure is logged, never the caller's: the action happened.
    pub async fn record(&self, entry: AuditEntry) {
        let _one = self.lock.lock().await;
        match self
            .store
            .append_audit(&entry, &hangar_agents::now_rfc3339())
            .await
        {
            Ok(r) => {
                let tmp = self.head.with_extension("tmp");
                let write = std::fs::write(&tmp, format!("{} {}\n", r.seq, r.hash))
                    .and_then(|()| std::fs::rename(&tmp, &self.head));
                if let Err(e) = write {
                    tracing::error!(error = %e, "cannot write the audit head");
                }
            }
            Err(e) => {
                tracing::error!(error = %e, action = %entry.action, "cannot append to the audit trail")
            }
        }
    }

    /// The whole chain checked, and its end against the recorded head.
    pub async fn verify(&self) -> Result<Result<(i64, i64, String), ChainBreak>, ApiError> {
        let _one = self.lock.lock().await;
        let chain = self.store.verify_audit().await.map_err(|e| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
        })?;
        let Ok((count, last, hash)) = chain else {
            return Ok(chain);
        };
        let head = std::fs::read_to_string(&self.head).unwrap_or_default();
        let mut parts = head.split_whitespace();
        if let (Some(seq), Some(head_hash)) = (
            parts.next().and_then(|s| s.parse::<i64>().ok()),
            parts.next(),
        ) {
            if seq > last {
                return Ok(Err(ChainBreak {
                    seq: last + 1,
                    problem: format!(
                        "records {}..={seq} are missing: the trail ends at {last}, but it had reached {seq}",
                        last + 1
                    ),
                }));
            }
            if seq == last && head_hash != hash {
                return Ok(Err(ChainBreak {
                    seq,
                    problem: format!("record {seq} is not the one last written"),
                }));
            }
        }
        Ok(Ok((count, last, hash)))
    }
}

/// The action a request is, by method and route; `None` for reads that change nothing and
/// touch no session's contents.
fn action_for(method: &Method, route: &str) -> Option<String> {
    let m = method.as_str();
    let a = match (m, route) {
        (_, r) if r.starts_with("/agents/{name}/") => {
            let protocol = match r.trim_start_matches("/agents/{name}/") {
                "ag-ui" => "ag-ui",
                "api/messages" => "activity",
                p if p.starts_with("invocations") => "invocations",
                _ => "responses",
            };
            return Some(format!("session.invoke.{protocol}"));
        }
        ("GET", "/v1/sandboxes/{id}/files/content") => "sandbox.files.read",
        ("GET", r) if r.ends_with("/files/content") => "session.files.read",
        ("GET", r) if r.ends_with("/logs") => "session.logs",
        ("GET" | "HEAD", _) => return None,
        // Spans are telemetry, not changes.
        ("POST", "/v1/traces") => return None,
        ("POST", "/v1/images/build") => "image.build",
        ("POST", "/v1/images/import") => "image.import",
        ("POST", "/v1/images/bootstrap") => "image.bootstrap",
        ("POST", "/v1/sandboxes") => "sandbox.create",
        ("DELETE", "/v1/sandboxes/{id}") => "sandbox.delete",
        (_, r) if r.starts_with("/v1/sandboxes/{id}/") => {
            return Some(format!("sandbox.{}", verb(m, r)));
        }
        ("DELETE", "/v1/agents/{name}") => "agent.delete",
        ("POST", "/v1/agents/{name}/versions") => "agent.deploy",
        ("PUT", "/v1/agents/{name}/traffic") => "agent.traffic",
        ("POST", "/v1/agents/{name}/sessions") => "session.create",
        ("PUT", "/v1/agents/{name}/secrets/{secret}") => "secret.set",
        ("DELETE", "/v1/agents/{name}/secrets/{secret}") => "secret.delete",
        ("DELETE", r) if r.ends_with("/sessions/{id}") => "session.delete",
        (_, r) if r.contains("/sessions/{id}/") => {
            return Some(format!("session.{}", verb(m, r)));
        }
        _ => return Some(format!("{} {route}", m.to_ascii_lowercase())),
    };
    Some(a.to_owned())
}

/// `exec`, `suspend`, `files.write`, … from a session or sandbox route.
fn verb(method: &str, route: &str) -> String {
    let tail = route.rsplit("{id}/").next().unwrap_or(route);
    match (method, tail) {
        ("PUT", "files/content") => "files.write".into(),
        ("DELETE", "files/content") => "files.delete".into(),
        (_, "files/mkdir") => "files.mkdir".into(),
        (_, t) => t.replace('/', "."),
    }
}

fn request_id(headers: &HeaderMap) -> String {
    match headers.get(REQUEST_ID_HEADER).and_then(|v| v.to_str().ok()) {
        Some(v) if !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()) => {
            v.to_owned()
        }
        _ => {
            let mut id = [0u8; 12];
            getrandom::getrandom(&mut id).expect("the OS random source works");
            format!("req_{}", hex::encode(id))
        }
    }
}

/// The route layer: names the request (`x-request-id`, the caller's or a new one), runs it,
/// and records what it did.
pub async fn record(
    State(st): State<AppState>,
    route: Option<MatchedPath>,
    mut req: Request,
    next: Next,
) -> Response {
    // Data-plane latency as the caller sees it, to the answer's headers (a stream's body
    // goes on after this layer returns).
    let started = std::time::Instant::now();
    let id = request_id(req.headers());
    let id_value = HeaderValue::from_str(&id).expect("checked ASCII");
    req.headers_mut()
        .insert(HeaderName::from_static(REQUEST_ID_HEADER), id_value.clone());
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let route = route.map(|r| r.as_str().to_owned()).unwrap_or_default();
    let user = req
        .headers()
        .get(USER_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let actor = match (req.extensions().get::<crate::Caller>(), user) {
        // A key that named an end user; not a key or a signed-in user that is its own.
        (Some(c), Some(u))
            if u != c.id && c.id.split_once(':').map(|(_, me)| me) != Some(u.as_str()) =>
        {
            format!("{} as user:{u}", c.actor())
        }
        (Some(c), _) => c.actor(),
        // The Activity endpoint's channel token, checked by its handler.
        (None, Some(u)) => format!("user:{u}"),
        (None, None) => "channel".to_owned(),
    };
    let params = path_params(&route, &path);
    let action = action_for(&method, &route);
    // Every call to an agent is a trace (or a span of the caller's).
    let invoke = action
        .as_deref()
        .and_then(|a| a.strip_prefix("session.invoke."))
        .map(|protocol| {
            let agent = params
                .iter()
                .find(|(k, _)| k == "name")
                .map_or("", |(_, v)| v.as_str());
            crate::telemetry::invoke_span(agent, protocol, req.headers())
        });
    let mut resp = match &invoke {
        Some(span) => {
            use tracing::Instrument;
            next.run(req).instrument(span.clone()).await
        }
        None => next.run(req).await,
    };
    let elapsed = started.elapsed();
    if let Some(span) = &invoke {
        crate::telemetry::finished(span, resp.status());
    }
    resp.headers_mut()
        .insert(HeaderName::from_static(REQUEST_ID_HEADER), id_value);
    let Some(action) = action else {
        return resp;
    };
    let session = resp
        .headers()
        .get(SESSION_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| {
            params
                .iter()
                .find(|(k, v)| k == "id" && v.starts_with("sess_"))
                .map(|(_, v)| v.clone())
        });
    let agent = params
        .iter()
        .find(|(k, _)| k == "name")
        .map(|(_, v)| v.clone());
    let mut detail =
        json!({"method": method.as_str(), "path": path, "status": resp.status().as_u16()});
    if let Some((_, sb)) = params
        .iter()
        .find(|(k, v)| k == "id" && !v.starts_with("sess_"))
    {
        detail["sandbox"] = json!(sb);
    }
    if let Some((_, s)) = params.iter().find(|(k, _)| k == "secret") {
        detail["secret"] = json!(s);
    }
    let entry = AuditEntry {
        actor,
        action,
        agent,
        session,
        request_id: Some(id),
        detail,
    };
    if let Some(protocol) = entry.action.strip_prefix("session.invoke.") {
        let version = resp.extensions().get::<AgentVersion>().map(|v| v.0);
        let agent = entry.agent.as_deref().unwrap_or_default();
        let status = resp.status().as_u16();
        st.metrics.request(agent, version, protocol, status);
        st.metrics
            .request_duration(agent, version, protocol, elapsed.as_secs_f64());
        st.stats.request(agent, version, status, elapsed);
    }
    if entry.action.starts_with("session.invoke.") {
        // A call to an agent is on the hot path: its record is written beside the answer
        // (appends still happen one at a time, in the order they were made).
        st.audit.record_soon(entry);
    } else {
        // A change is recorded before its answer says it happened.
        st.audit.record(entry).await;
    }
    resp
}

/// The version of the agent that answered a data-plane request (a response extension, for
/// the metrics).
#[derive(Debug, Clone, Copy)]
pub struct AgentVersion(pub i64);

/// `{param}` segments of a route template matched against the path.
fn path_params(route: &str, path: &str) -> Vec<(String, String)> {
    route
        .split('/')
        .zip(path.split('/'))
        .filter_map(|(t, p)| {
            let name = t.strip_prefix('{')?.strip_suffix('}')?;
            let value = percent_encoding::percent_decode_str(p)
                .decode_utf8_lossy()
                .into_owned();
            Some((name.to_owned(), value))
        })
        .collect()
}

fn operator_only(headers: &HeaderMap) -> Result<(), ApiError> {
    if headers.contains_key(USER_HEADER) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("the audit trail is the operator's, not an end user's ({USER_HEADER})"),
        ));
    }
    Ok(())
}

/// `GET /v1/audit?agent=&session=&after=&limit=`.
pub async fn list(
    State(st): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let number = |k: &str| -> Result<Option<i64>, ApiError> {
        q.get(k)
            .map(|v| {
                v.parse::<i64>().map_err(|_| {
                    ApiError::bad_request(format!("{k} must be a whole number, not {v:?}"))
                })
            })
            .transpose()
    };
    let (after, limit) = (number("after")?, number("limit")?);
    if let Some(k) = q
        .keys()
        .find(|k| !["agent", "session", "after", "limit"].contains(&k.as_str()))
    {
        return Err(ApiError::bad_request(format!(
            "unknown query parameter {k:?}; expected agent, session, after, limit"
        )));
    }
    operator_only(&headers)?;
    let limit = limit.unwrap_or(1000).clamp(1, 10_000);
    let records = st
        .audit
        .store
        .audit(&AuditFilter {
            agent: q.get("agent").cloned(),
            session: q.get("session").cloned(),
            after,
            limit,
        })
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    Ok(Json(json!({ "records": records })).into_response())
}

/// `GET /v1/audit/verify`.
pub async fn verify(State(st): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    operator_only(&headers)?;
    Ok(Json(match st.audit.verify().await? {
        Ok((count, seq, hash)) => {
            json!({"ok": true, "records": count, "last": {"seq": seq, "hash": hash}})
        }
        Err(b) => json!({"ok": false, "break": b}),
    })
    .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions_are_named_from_routes() {
        let a = |m: Method, r: &str| action_for(&m, r);
        assert_eq!(
            a(Method::POST, "/v1/agents/{name}/versions").as_deref(),
            Some("agent.deploy")
        );
        assert_eq!(
            a(Method::POST, "/v1/sessions/{id}/exec").as_deref(),
            Some("session.exec")
        );
        assert_eq!(
            a(Method::PUT, "/v1/agents/{name}/sessions/{id}/files/content").as_deref(),
            Some("session.files.write")
        );
        assert_eq!(
            a(Method::GET, "/v1/sessions/{id}/files/content").as_deref(),
            Some("session.files.read")
        );
        assert_eq!(
            a(Method::GET, "/v1/sessions/{id}/logs").as_deref(),
            Some("session.logs")
        );
        assert_eq!(
            a(Method::DELETE, "/v1/sessions/{id}").as_deref(),
            Some("session.delete")
        );
        assert_eq!(
            a(Method::POST, "/v1/sandboxes/{id}/suspend").as_deref(),
            Some("sandbox.suspend")
        );
        assert_eq!(
            a(Method::POST, "/agents/{name}/ag-ui").as_deref(),
            Some("session.invoke.ag-ui")
        );
        assert_eq!(
            a(Method::GET, "/agents/{name}/responses/{id}").as_deref(),
            Some("session.invoke.responses")
        );
        assert_eq!(a(Method::GET, "/v1/agents"), None);
        assert_eq!(a(Method::GET, "/v1/sessions/{id}"), None);
        assert_eq!(
            path_params(
                "/v1/agents/{name}/secrets/{secret}",
                "/v1/agents/notes/secrets/bot%2Dx"
            ),
            [
                ("name".to_owned(), "notes".to_owned()),
                ("secret".to_owned(), "bot-x".to_owned())
            ]
        );
    }
}
