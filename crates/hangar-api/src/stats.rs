//! Recent data-plane requests per agent and version, for the dashboard: request rate,
//! errors and latency percentiles without a Prometheus server.

use axum::extract::State;
use axum::Json;

use crate::AppState;

/// Per agent and version, a short window of request counts and latencies.
#[derive(Debug, Default)]
pub struct Stats {}

/// `GET /v1/stats`.
pub async fn get(State(_st): State<AppState>) -> Json<serde_json::Value> {
    Json(serde_json::json!({"agents": []}))
}
