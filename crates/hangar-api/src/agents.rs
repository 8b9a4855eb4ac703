//! `/v1/agents` (agents, versions, traffic, sessions) and `/v1/sessions/{id}` (session
//! operations; session ids are unique across agents).
//!
//! A control-plane request may carry `x-agent-user-id`: it then sees only that isolation
//! key's sessions (another key's session is 404, exactly like one that does not exist).
//! Without it, the caller is the operator and sees every session.

use std::collections::HashMap;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;

use hangar_proto::agent::{
    AgentList, CreateSession, DeployRequest, SessionList, TrafficSplit, VersionList, USER_HEADER,
};

use crate::sandboxes::{self, parse_json, PathQuery};

mod logs;
use crate::{ApiError, AppState};
pub use logs::logs;

/// The isolation key a caller asserts, if any.
pub(crate) fn asserted_user(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    match headers.get(USER_HEADER) {
        None => Ok(None),
        Some(v) => {
            let v = v
                .to_str()
                .map_err(|_| ApiError::bad_request(format!("{USER_HEADER} must be ASCII")))?;
            if v.is_empty() || v.len() > 256 {
                return Err(ApiError::bad_request(format!(
                    "{USER_HEADER} must be 1 to 256 characters"
                )));
            }
            Ok(Some(v.to_owned()))
        }
    }
}

pub async fn list_agents(State(st): State<AppState>) -> Result<Json<AgentList>, ApiError> {
    Ok(Json(AgentList {
        agents: st.agents.agents().await?,
    }))
}

pub async fn get_agent(
    State(st): State<AppState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    Ok(Json(st.agents.agent(&name).await?).into_response())
}

pub async fn delete_agent(
    State(st): State<AppState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    st.agents.delete_agent(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn deploy(
    State(st): State<AppState>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    hangar_proto::agent::valid_agent_name(&name).map_err(ApiError::bad_request)?;
    let req: DeployRequest = parse_json(&body)?;
    let v = st.agents.deploy(&name, req).await?;
    let status = if v.unchanged {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((status, Json(v)).into_response())
}

pub async fn versions(
    State(st): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<VersionList>, ApiError> {
    Ok(Json(VersionList {
        versions: st.agents.versions(&name).await?,
    }))
}

pub async fn get_traffic(
    State(st): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<TrafficSplit>, ApiError> {
    Ok(Json(TrafficSplit {
        weights: st.agents.agent(&name).await?.traffic,
    }))
}

pub async fn set_traffic(
    State(st): State<AppState>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Json<TrafficSplit>, ApiError> {
    let split: TrafficSplit = parse_json(&body)?;
    st.agents.set_traffic(&name, &split.weights).await?;
    get_traffic(State(st), Path(name)).await
}

pub async fn create_session(
    State(st): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req: CreateSession = parse_json(&body)?;
    if let Some(user) = asserted_user(&headers)? {
        if user != req.isolation_key {
            return Err(ApiError::bad_request(format!(
                "isolation_key differs from {USER_HEADER}"
            )));
        }
    }
    let s = st
        .agents
        .create_session(&name, &req.isolation_key, req.version)
        .await?;
    Ok((StatusCode::CREATED, Json(s)).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionsQuery {
    isolation_key: Option<String>,
}

pub async fn list_sessions(
    State(st): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<SessionsQuery>,
    headers: HeaderMap,
) -> Result<Json<SessionList>, ApiError> {
    let key = match (asserted_user(&headers)?, q.isolation_key) {
        (Some(user), Some(k)) if user != k => {
            return Err(ApiError::bad_request(format!(
                "isolation_key differs from {USER_HEADER}"
            )))
        }
        (user, k) => user.or(k),
    };
    Ok(Json(SessionList {
        sessions: st.agents.sessions(&name, key.as_deref()).await?,
    }))
}

/// `{id}` from `/v1/sessions/{id}/…` or `/v1/agents/{name}/sessions/{id}/…`; with a name, the
/// session must be that agent's.
struct SessionRef {
    id: String,
    user: Option<String>,
}

async fn session_ref(
    st: &AppState,
    params: &HashMap<String, String>,
    headers: &HeaderMap,
) -> Result<SessionRef, ApiError> {
    let id = params
        .get("id")
        .cloned()
        .ok_or_else(|| ApiError::bad_request("missing session id"))?;
    let user = asserted_user(headers)?;
    if let Some(name) = params.get("name") {
        if &st.agents.session_agent(&id, user.as_deref()).await? != name {
            return Err(hangar_agents::AgentsError::NotFound(format!("no session {id:?}")).into());
        }
    }
    Ok(SessionRef { id, user })
}

pub async fn get_session(
    State(st): State<AppState>,
    Path(params): Path<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let r = session_ref(&st, &params, &headers).await?;
    Ok(Json(st.agents.session(&r.id, r.user.as_deref()).await?).into_response())
}

pub async fn delete_session(
    State(st): State<AppState>,
    Path(params): Path<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let r = session_ref(&st, &params, &headers).await?;
    st.agents.delete_session(&r.id, r.user.as_deref()).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn suspend_session(
    State(st): State<AppState>,
    Path(params): Path<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let r = session_ref(&st, &params, &headers).await?;
    Ok(Json(st.agents.suspend_session(&r.id, r.user.as_deref()).await?).into_response())
}

pub async fn resume_session(
    State(st): State<AppState>,
    Path(params): Path<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let r = session_ref(&st, &params, &headers).await?;
    Ok(Json(st.agents.resume_session(&r.id, r.user.as_deref()).await?).into_response())
}

pub async fn exec(
    State(st): State<AppState>,
    Path(params): Path<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let r = session_ref(&st, &params, &headers).await?;
    let (lease, sandbox) = st.agents.sandbox_of(&r.id, r.user.as_deref()).await?;
    let resp = sandboxes::exec(State(st.clone()), Path(sandbox), headers, body).await?;
    Ok(held(resp, lease))
}

/// The response with `lease` held until its body has been sent: a streamed exec or a large
/// download keeps the session from being suspended under it.
fn held(resp: Response, lease: hangar_agents::Lease) -> Response {
    struct Held {
        body: Body,
        _lease: hangar_agents::Lease,
    }
    impl hyper::body::Body for Held {
        type Data = Bytes;
        type Error = axum::Error;
        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, axum::Error>>> {
            std::pin::Pin::new(&mut self.body).poll_frame(cx)
        }
        fn is_end_stream(&self) -> bool {
            self.body.is_end_stream()
        }
        fn size_hint(&self) -> hyper::body::SizeHint {
            self.body.size_hint()
        }
    }
    let (parts, body) = resp.into_parts();
    Response::from_parts(
        parts,
        Body::new(Held {
            body,
            _lease: lease,
        }),
    )
}

/// Which files operation a session files route is.
#[derive(Clone, Copy)]
enum FilesRoute {
    Read,
    Stat,
    Mkdir,
    Delete,
}

async fn files(
    st: AppState,
    params: HashMap<String, String>,
    q: PathQuery,
    headers: HeaderMap,
    route: FilesRoute,
) -> Result<Response, ApiError> {
    let r = session_ref(&st, &params, &headers).await?;
    let (lease, sandbox) = st.agents.sandbox_of(&r.id, r.user.as_deref()).await?;
    let (st, id, q) = (State(st.clone()), Path(sandbox), Query(q));
    let resp = match route {
        FilesRoute::Read => sandboxes::read_file(st, id, q).await,
        FilesRoute::Stat => sandboxes::stat_file(st, id, q).await,
        FilesRoute::Mkdir => sandboxes::mkdir(st, id, q).await,
        FilesRoute::Delete => sandboxes::delete_file(st, id, q).await,
    }?;
    Ok(held(resp, lease))
}

pub async fn read_file(
    State(st): State<AppState>,
    Path(p): Path<HashMap<String, String>>,
    Query(q): Query<PathQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    files(st, p, q, headers, FilesRoute::Read).await
}

pub async fn stat_file(
    State(st): State<AppState>,
    Path(p): Path<HashMap<String, String>>,
    Query(q): Query<PathQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    files(st, p, q, headers, FilesRoute::Stat).await
}

pub async fn mkdir(
    State(st): State<AppState>,
    Path(p): Path<HashMap<String, String>>,
    Query(q): Query<PathQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    files(st, p, q, headers, FilesRoute::Mkdir).await
}

pub async fn delete_file(
    State(st): State<AppState>,
    Path(p): Path<HashMap<String, String>>,
    Query(q): Query<PathQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    files(st, p, q, headers, FilesRoute::Delete).await
}

pub async fn write_file(
    State(st): State<AppState>,
    Path(params): Path<HashMap<String, String>>,
    Query(q): Query<PathQuery>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let r = session_ref(&st, &params, &headers).await?;
    let (lease, sandbox) = st.agents.sandbox_of(&r.id, r.user.as_deref()).await?;
    let resp =
        sandboxes::write_file(State(st.clone()), Path(sandbox), Query(q), headers, body).await?;
    Ok(held(resp, lease))
}

/// Secrets are the operator's: a caller acting as one end user never sees or sets them.
fn operator_only(headers: &HeaderMap) -> Result<(), ApiError> {
    if asserted_user(headers)?.is_some() {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("secrets are managed by operators, not as an end user ({USER_HEADER})"),
        ));
    }
    Ok(())
}

pub async fn list_secrets(
    State(st): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    operator_only(&headers)?;
    let secrets = st.agents.secrets(&name).await?;
    Ok(Json(serde_json::json!({ "secrets": secrets })).into_response())
}

/// `PUT /v1/agents/{name}/secrets/{secret}`: the body is the value, as is.
pub async fn put_secret(
    State(st): State<AppState>,
    Path((name, secret)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    operator_only(&headers)?;
    let hosts: Vec<String> = q
        .get("hosts")
        .map(|h| {
            h.split(',')
                .map(str::trim)
                .filter(|h| !h.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    let info = st.agents.set_secret(&name, &secret, &body, &hosts).await?;
    Ok(Json(info).into_response())
}

pub async fn delete_secret(
    State(st): State<AppState>,
    Path((name, secret)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    operator_only(&headers)?;
    st.agents.delete_secret(&name, &secret).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The id of the session the path names, once it is known to exist and be the caller's.
async fn owned_session(
    st: &AppState,
    params: &HashMap<String, String>,
    headers: &HeaderMap,
) -> Result<String, ApiError> {
    let r = session_ref(st, params, headers).await?;
    st.agents.session(&r.id, r.user.as_deref()).await?;
    Ok(r.id)
}

/// `GET …/sessions/{id}/egress`: the connections the session's sandbox made or tried.
pub async fn session_egress(
    State(st): State<AppState>,
    Path(params): Path<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = owned_session(&st, &params, &headers).await?;
    let egress = st
        .agents
        .store()
        .egress(None, Some(&id), 10_000)
        .await
        .map_err(hangar_agents::AgentsError::from)?;
    Ok(Json(serde_json::json!({ "egress": egress })).into_response())
}

/// `GET /v1/sessions/{id}/events`: the session's state changes and resumes, oldest first.
pub async fn session_events(
    State(st): State<AppState>,
    Path(params): Path<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = owned_session(&st, &params, &headers).await?;
    let events = st
        .agents
        .store()
        .session_events(&id, 10_000)
        .await
        .map_err(hangar_agents::AgentsError::from)?;
    Ok(Json(serde_json::json!({ "events": events })).into_response())
}
