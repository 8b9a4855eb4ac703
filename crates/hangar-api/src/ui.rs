//! The dashboard at `/ui`: static assets compiled into the binary.

use axum::Router;

use crate::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
}
