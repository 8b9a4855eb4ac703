//! Hangar's HTTP API (the control plane under `/v1`), as an axum router.
//!
//! Handlers parse requests into typed calls on the services (`Sandboxes`) and turn their
//! errors into JSON error bodies in one place ([`error::ApiError`]). This crate holds no
//! state of its own and never touches a runtime directly.

mod agents;
mod audit;
mod auth;
mod dataplane;
mod error;
mod guard;
mod identity;
mod idp;
mod images;
mod mapping;
mod sandboxes;
mod stats;
mod telemetry;
mod ui;

use axum::routing::{get, post};
use axum::Router;
use hangar_sandbox::Sandboxes;

pub use audit::{Audit, REQUEST_ID_HEADER};
pub use auth::{Caller, Keys, Oidc, Role};
pub use dataplane::ADDED_DONE;
pub use error::ApiError;
pub use identity::internal_service;
pub use idp::IdentityProviders;
/// The JWT algorithms `IdentityProviders::verify_jwt` takes.
pub use jsonwebtoken::Algorithm as JwtAlgorithm;
pub use mapping::Channels;
pub use stats::Stats;

#[derive(Clone)]
pub struct AppState {
    pub sandboxes: Sandboxes,
    pub images: hangar_build::Images,
    pub agents: hangar_agents::Agents,
    /// Kept-alive connections to agents.
    pub pool: std::sync::Arc<dataplane::AgentPool>,
    /// The audit trail.
    pub audit: std::sync::Arc<Audit>,
    /// API keys.
    pub keys: std::sync::Arc<Keys>,
    /// Identity providers' keys and tokens (OIDC end users, the Activity channel).
    pub idp: std::sync::Arc<IdentityProviders>,
    /// The mapped protocols' per-conversation state.
    pub channels: std::sync::Arc<Channels>,
    /// The largest file upload accepted, in bytes.
    pub max_upload: u64,
    /// The server's metrics (`/metrics`).
    pub metrics: std::sync::Arc<hangar_metrics::Metrics>,
    /// The data directory (the host's disk figures in `/metrics`).
    pub data_dir: std::path::PathBuf,
    /// Recent data-plane requests per agent and version (the dashboard's rates and latencies).
    pub stats: std::sync::Arc<Stats>,
    /// The trace store's queue; `None` with `hangar serve --tracing off`.
    pub telemetry: Option<hangar_telemetry::Telemetry>,
}

/// Session operations, under `/v1/sessions/{id}` and `/v1/agents/{name}/sessions/{id}`.
fn session_routes() -> Router<AppState> {
    Router::new()
        .route("/", get(agents::get_session).delete(agents::delete_session))
        .route("/suspend", post(agents::suspend_session))
        .route("/resume", post(agents::resume_session))
        .route("/exec", post(agents::exec))
        .route("/logs", get(agents::logs))
        .route("/egress", get(agents::session_egress))
        .route("/events", get(agents::session_events))
        .route(
            "/files/content",
            get(agents::read_file)
                .put(agents::write_file)
                .delete(agents::delete_file),
        )
        .route("/files", get(agents::stat_file))
        .route("/files/mkdir", post(agents::mkdir))
}

/// `GET /metrics`: Prometheus text, with sessions and the host as they are now.
async fn metrics(
    axum::extract::State(st): axum::extract::State<AppState>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let sessions = st.agents.session_counts();
    let sandboxes = st.sandboxes.counts().await;
    let dir = st.data_dir.clone();
    let mut host = tokio::task::spawn_blocking(move || hangar_metrics::host_stats(&dir))
        .await
        .unwrap_or_default();
    host.sandboxes = sandboxes;
    let text = st.metrics.encode(&sessions, &host);
    (
        [(
            axum::http::header::CONTENT_TYPE,
            hangar_metrics::CONTENT_TYPE,
        )],
        text,
    )
        .into_response()
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route(
            "/healthz",
            get(|| async { axum::Json(serde_json::json!({"ok": true})) }),
        )
        .route(
            "/.well-known/openid-configuration",
            get(identity::openid_configuration),
        )
        .route("/.well-known/jwks.json", get(identity::jwks))
        .route("/v1/doctor", get(sandboxes::doctor))
        .route("/metrics", get(metrics))
        .route("/v1/stats", get(stats::get))
        .route(
            "/v1/traces",
            get(telemetry::list)
                .post(telemetry::receive)
                .layer(axum::extract::DefaultBodyLimit::max(telemetry::MAX_OTLP)),
        )
        .route("/v1/traces/{trace_id}", get(telemetry::get))
        // images.rs: build, import, bootstrap, list.
        .route("/v1/images", get(images::list))
        .route("/v1/images/build", post(images::build))
        .route("/v1/images/import", post(images::import))
        .route("/v1/images/bootstrap", post(images::bootstrap))
        .route(
            "/v1/sandboxes",
            post(sandboxes::create).get(sandboxes::list),
        )
        .route(
            "/v1/sandboxes/{id}",
            get(sandboxes::get).delete(sandboxes::delete),
        )
        .route("/v1/sandboxes/{id}/exec", post(sandboxes::exec))
        .route("/v1/sandboxes/{id}/egress", get(sandboxes::egress))
        .route("/v1/sandboxes/{id}/suspend", post(sandboxes::suspend))
        .route("/v1/sandboxes/{id}/resume", post(sandboxes::resume))
        .route(
            "/v1/sandboxes/{id}/files/content",
            get(sandboxes::read_file)
                .put(sandboxes::write_file)
                .delete(sandboxes::delete_file),
        )
        .route("/v1/sandboxes/{id}/files", get(sandboxes::stat_file))
        .route("/v1/sandboxes/{id}/files/mkdir", post(sandboxes::mkdir))
        .route("/v1/agents", get(agents::list_agents))
        .route(
            "/v1/agents/{name}",
            get(agents::get_agent).delete(agents::delete_agent),
        )
        .route(
            "/v1/agents/{name}/versions",
            get(agents::versions).post(agents::deploy),
        )
        .route(
            "/v1/agents/{name}/traffic",
            get(agents::get_traffic).put(agents::set_traffic),
        )
        .route("/v1/agents/{name}/secrets", get(agents::list_secrets))
        .route(
            "/v1/agents/{name}/secrets/{secret}",
            axum::routing::put(agents::put_secret).delete(agents::delete_secret),
        )
        .route(
            "/v1/agents/{name}/sessions",
            get(agents::list_sessions).post(agents::create_session),
        )
        .nest("/v1/agents/{name}/sessions/{id}", session_routes())
        .nest("/v1/sessions/{id}", session_routes())
        .route("/agents/{name}/responses", post(dataplane::responses))
        .route(
            "/agents/{name}/responses/{id}",
            get(dataplane::response_op).delete(dataplane::response_op),
        )
        .route(
            "/agents/{name}/responses/{id}/cancel",
            post(dataplane::response_op),
        )
        .route(
            "/agents/{name}/responses/{id}/input_items",
            get(dataplane::response_op),
        )
        .route("/agents/{name}/invocations", post(dataplane::invocations))
        .route("/agents/{name}/ag-ui", post(mapping::agui::run))
        .route(
            "/agents/{name}/api/messages",
            post(mapping::activity::messages),
        )
        .route("/agents/{name}/invocations_ws", get(dataplane::invocations))
        .route("/v1/audit", get(audit::list))
        .route("/v1/audit/verify", get(audit::verify))
        .route("/v1/keys", post(auth::create).get(auth::list))
        .route("/v1/keys/{id}", axum::routing::delete(auth::revoke))
        // Outermost last: a request is authenticated, then recorded.
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            audit::record,
        ))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::authenticate,
        ))
        .fallback(|| async {
            ApiError::new(
                axum::http::StatusCode::NOT_FOUND,
                "not_found",
                "no such endpoint",
            )
        })
        // The dashboard's static shell (no data in it; its API calls carry the key).
        .merge(ui::router())
        .with_state(state)
}
