//! Hangar's HTTP API (the control plane under `/v1`), as an axum router.
//!
//! Handlers parse requests into typed calls on the services (`Sandboxes`) and turn their
//! errors into JSON error bodies in one place ([`error::ApiError`]). This crate holds no
//! state of its own and never touches a runtime directly.

mod error;
mod images;
mod sandboxes;

use axum::routing::{get, post};
use axum::Router;
use hangar_sandbox::Sandboxes;

pub use error::ApiError;

#[derive(Clone)]
pub struct AppState {
    pub sandboxes: Sandboxes,
    pub images: hangar_build::Images,
    pub agents: hangar_agents::Agents,
    /// The largest file upload accepted, in bytes.
    pub max_upload: u64,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route(
            "/healthz",
            get(|| async { axum::Json(serde_json::json!({"ok": true})) }),
        )
        .route("/v1/doctor", get(sandboxes::doctor))
        // images.rs: build, import, bootstrap, list.
        // (routes for /v1/images go here)
        .route(
            "/v1/sandboxes",
            post(sandboxes::create).get(sandboxes::list),
        )
        .route(
            "/v1/sandboxes/{id}",
            get(sandboxes::get).delete(sandboxes::delete),
        )
        .route("/v1/sandboxes/{id}/exec", post(sandboxes::exec))
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
        .fallback(|| async {
            ApiError::new(
                axum::http::StatusCode::NOT_FOUND,
                "not_found",
                "no such endpoint",
            )
        })
        .with_state(state)
}
