//! Hangar as its agents' token issuer: the OpenID discovery document and key set (public, on
//! Hangar's listener and at `http://hangar.internal` inside sandboxes) and the RFC 8693 token
//! exchange, which only a sandbox reaches, through its own egress proxy: the connection
//! itself says which sandbox asks, so a session token that leaked out of its sandbox is
//! worth nothing anywhere else.

use axum::extract::{Extension, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use serde::Deserialize;
use serde_json::json;

use hangar_agents::identity::OBO_TTL_DEFAULT;
use hangar_agents::ExchangeError;
use hangar_sandbox::egress::{InternalService, Prefixed};

use crate::error::ApiError;
use crate::AppState;

pub const GRANT_TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
pub const TOKEN_TYPE_JWT: &str = "urn:ietf:params:oauth:token-type:jwt";
pub const TOKEN_TYPE_ACCESS: &str = "urn:ietf:params:oauth:token-type:access_token";

/// The sandbox a request to `hangar.internal` came from (set by the proxy's connection).
#[derive(Debug, Clone)]
pub struct FromSandbox(pub String);

fn identity(st: &AppState) -> Result<&std::sync::Arc<hangar_agents::Identity>, ApiError> {
    st.agents.identity().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "this server issues no tokens (hangar serve --issuer)",
        )
    })
}

pub async fn openid_configuration(State(st): State<AppState>) -> Result<Response, ApiError> {
    Ok(Json(identity(&st)?.discovery()).into_response())
}

pub async fn jwks(State(st): State<AppState>) -> Result<Response, ApiError> {
    let set = identity(&st)?.jwks().await?;
    let mut resp = Json(set).into_response();
    resp.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=60"),
    );
    Ok(resp)
}

/// The token request's form (RFC 8693 section 2.1).
#[derive(Debug, Deserialize)]
pub struct ExchangeForm {
    grant_type: Option<String>,
    subject_token: Option<String>,
    subject_token_type: Option<String>,
    audience: Option<String>,
    resource: Option<String>,
    scope: Option<String>,
    requested_token_type: Option<String>,
    actor_token: Option<String>,
}

fn oauth_error(status: StatusCode, code: &str, description: &str) -> Response {
    let mut resp = (
        status,
        Json(json!({"error": code, "error_description": description})),
    )
        .into_response();
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

pub async fn token(
    State(st): State<AppState>,
    Extension(FromSandbox(sandbox)): Extension<FromSandbox>,
    form: Result<Form<ExchangeForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    let bad = |d: &str| oauth_error(StatusCode::BAD_REQUEST, "invalid_request", d);
    let Ok(Form(f)) = form else {
        return bad("the body must be an application/x-www-form-urlencoded token request");
    };
    if f.grant_type.as_deref() != Some(GRANT_TOKEN_EXCHANGE) {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            &format!("grant_type must be {GRANT_TOKEN_EXCHANGE}"),
        );
    }
    let Some(subject) = f.subject_token.as_deref() else {
        return bad("subject_token is required: the session token in $HANGAR_TOKEN_FILE");
    };
    if !matches!(
        f.subject_token_type.as_deref(),
        Some(TOKEN_TYPE_JWT | TOKEN_TYPE_ACCESS)
    ) {
        return bad(&format!(
            "subject_token_type must be {TOKEN_TYPE_JWT} or {TOKEN_TYPE_ACCESS}"
        ));
    }
    if f.actor_token.is_some() {
        return bad("actor_token is not accepted: the agent of the session token is the actor");
    }
    if f.requested_token_type
        .as_deref()
        .is_some_and(|t| t != TOKEN_TYPE_ACCESS && t != TOKEN_TYPE_JWT)
    {
        return bad(&format!(
            "requested_token_type must be {TOKEN_TYPE_ACCESS} or {TOKEN_TYPE_JWT}"
        ));
    }
    let audience = match (f.audience.as_deref(), f.resource.as_deref()) {
        (Some(a), None) | (None, Some(a)) => a,
        (Some(a), Some(r)) if a == r => a,
        _ => {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_target",
                "name exactly one audience (audience or resource)",
            )
        }
    };
    let scope = f.scope.as_deref().filter(|s| !s.is_empty());
    let result = st
        .agents
        .exchange_token(&sandbox, subject, audience, scope, OBO_TTL_DEFAULT)
        .await;
    let (agent, session) = st.agents.session_of_sandbox(&sandbox).unzip();
    let audit = |action: &str, detail: serde_json::Value| hangar_store::AuditEntry {
        actor: format!("sandbox:{sandbox}"),
        action: action.into(),
        agent: agent.clone(),
        session: session.clone(),
        request_id: None,
        detail,
    };
    match result {
        Ok((token, claims)) => {
            st.audit
                .record(audit(
                    "token.exchange",
                    json!({"audience": audience, "sub": claims.isolation_key, "scope": scope}),
                ))
                .await;
            let mut body = json!({
                "access_token": token,
                "issued_token_type": TOKEN_TYPE_ACCESS,
                "token_type": "Bearer",
                "expires_in": OBO_TTL_DEFAULT.as_secs(),
            });
            if let Some(s) = scope {
                body["scope"] = s.into();
            }
            let mut resp = Json(body).into_response();
            resp.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            resp
        }
        Err(e) => {
            let shown: String = audience.chars().take(200).collect();
            st.audit
                .record(audit(
                    "token.exchange.refused",
                    json!({"audience": shown, "reason": e.to_string()}),
                ))
                .await;
            match e {
                ExchangeError::Grant(d) => {
                    oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", &d)
                }
                ExchangeError::Target(d) => {
                    oauth_error(StatusCode::BAD_REQUEST, "invalid_target", &d)
                }
                ExchangeError::Unavailable(d) => oauth_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "temporarily_unavailable",
                    &d,
                ),
            }
        }
    }
}

/// What a sandbox reaches at `http://hangar.internal`.
fn internal_router(state: AppState) -> Router {
    Router::new()
        .route("/oauth2/token", post(token))
        .route(
            "/.well-known/openid-configuration",
            get(openid_configuration),
        )
        .route("/.well-known/jwks.json", get(jwks))
        .layer(axum::extract::DefaultBodyLimit::max(64 * 1024))
        // The agent's own spans (its OTEL_EXPORTER_OTLP_ENDPOINT points here); batches are
        // larger than the other requests.
        .route(
            "/v1/traces",
            post(crate::telemetry::receive_internal).layer(axum::extract::DefaultBodyLimit::max(
                crate::telemetry::MAX_OTLP,
            )),
        )
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                "hangar.internal serves /oauth2/token, /v1/traces and /.well-known/",
            )
        })
        .with_state(state)
}

/// The egress proxy's hook for connections to `hangar.internal`: HTTP/1.1 on the sandbox's
/// own connection, each request tagged with the sandbox.
pub fn internal_service(state: AppState) -> InternalService {
    let router = internal_router(state);
    std::sync::Arc::new(move |sandbox: String, conn: Prefixed| {
        let router = router.clone().layer(Extension(FromSandbox(sandbox)));
        Box::pin(async move {
            let service = TowerToHyperService::new(router);
            let served = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(30))
                .serve_connection(TokioIo::new(conn), service)
                .await;
            if let Err(e) = served {
                tracing::info!(error = %e, "a hangar.internal connection ended");
            }
        })
    })
}
