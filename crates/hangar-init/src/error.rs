//! The control API's one error type, turned into an [`ErrorBody`] response at the edge.
//!
//! Client errors carry a message written for the caller; internal errors are logged in full and
//! answered with a short message. It must never put the secret in a message.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use hangar_proto::ErrorBody;

use crate::resolve::ResolveError;
use crate::spawn::SpawnError;
use crate::users::UserError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }
    pub fn conflict(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, "conflict", message)
    }
    pub fn unauthorized() -> ApiError {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or wrong bearer secret",
        )
    }
    /// Logs `what` with its cause and answers 500 without the details.
    pub fn internal(what: &str, cause: impl std::fmt::Display) -> ApiError {
        log!("{what}: {cause}");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("{what} failed; see the sandbox log"),
        )
    }
    /// Maps an I/O error on `path` to 404 / 409 / 400 / 500.
    pub fn io(what: &str, path: &str, e: std::io::Error) -> ApiError {
        use std::io::ErrorKind::*;
        match e.kind() {
            NotFound => ApiError::not_found(format!("{path:?} does not exist")),
            NotADirectory => {
                ApiError::conflict(format!("a component of {path:?} is not a directory"))
            }
            IsADirectory => ApiError::conflict(format!("{path:?} is a directory")),
            DirectoryNotEmpty => {
                ApiError::conflict(format!("{path:?} is not empty; pass recursive=true"))
            }
            AlreadyExists => ApiError::conflict(format!("{path:?} already exists")),
            PermissionDenied => ApiError::bad_request(format!("permission denied: {path:?}")),
            _ => ApiError::internal(&format!("{what} {path:?}"), e),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(ErrorBody::new(self.code, self.message))).into_response()
    }
}

impl From<ResolveError> for ApiError {
    fn from(e: ResolveError) -> ApiError {
        match e {
            ResolveError::Io(e) => ApiError::internal("resolving path", e),
            e => ApiError::new(StatusCode::BAD_REQUEST, "invalid_path", e.to_string()),
        }
    }
}

impl From<SpawnError> for ApiError {
    fn from(e: SpawnError) -> ApiError {
        match e {
            SpawnError::NotFound(_) | SpawnError::MissingInterpreter(_) => {
                ApiError::not_found(e.to_string())
            }
            SpawnError::NotExecutable(..)
            | SpawnError::IdentityDenied(..)
            | SpawnError::BadCwd(_) => ApiError::bad_request(e.to_string()),
            SpawnError::ProcessLimit => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "process_limit",
                e.to_string(),
            ),
            SpawnError::Io(e) => ApiError::internal("starting process", e),
        }
    }
}

impl From<UserError> for ApiError {
    fn from(e: UserError) -> ApiError {
        ApiError::bad_request(e.to_string())
    }
}
