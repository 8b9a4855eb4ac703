//! The one place where errors become HTTP responses: `{"error": {"code", "message"}}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use hangar_proto::ErrorBody;
use hangar_sandbox::{LinkError, SandboxError};

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub body: ErrorBody,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            body: ErrorBody::new(code, message),
        }
    }
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }
}

impl From<SandboxError> for ApiError {
    fn from(e: SandboxError) -> Self {
        match e {
            SandboxError::NotFound(_) => {
                ApiError::new(StatusCode::NOT_FOUND, "not_found", e.to_string())
            }
            SandboxError::Invalid(m) => ApiError::bad_request(m),
            SandboxError::Conflict(m) => ApiError::new(StatusCode::CONFLICT, "conflict", m),
            SandboxError::Unavailable(m) => {
                ApiError::new(StatusCode::BAD_REQUEST, "driver_unavailable", m)
            }
            SandboxError::Link(LinkError::Status { status, body }) => ApiError { status, body },
            SandboxError::Link(e) => {
                tracing::warn!(error = %e, "sandbox link failed");
                ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "sandbox_unreachable",
                    e.to_string(),
                )
            }
            SandboxError::Internal(m) => {
                tracing::error!(error = %m, "internal error");
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", m)
            }
        }
    }
}

impl From<LinkError> for ApiError {
    fn from(e: LinkError) -> Self {
        SandboxError::Link(e).into()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body)).into_response()
    }
}
