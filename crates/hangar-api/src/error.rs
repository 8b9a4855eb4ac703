//! The one place where errors become HTTP responses: `{"error": {"code", "message"}}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use hangar_agents::{AgentsError, ErrorSource};
use hangar_proto::agent::ERROR_SOURCE_HEADER;
use hangar_proto::ErrorBody;
use hangar_sandbox::{LinkError, SandboxError};

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub body: ErrorBody,
    /// `x-platform-error-source`; by default `user` for 4xx and `platform` otherwise.
    pub source: Option<ErrorSource>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            body: ErrorBody::new(code, message),
            source: None,
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
            SandboxError::Link(LinkError::Status { status, body }) => ApiError {
                status,
                body,
                source: None,
            },
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

impl From<AgentsError> for ApiError {
    fn from(e: AgentsError) -> Self {
        let source = e.source_of_error();
        let mut err = match e {
            AgentsError::NotFound(m) => ApiError::new(StatusCode::NOT_FOUND, "not_found", m),
            AgentsError::Invalid(m) => ApiError::bad_request(m),
            AgentsError::Conflict(m) => ApiError::new(StatusCode::CONFLICT, "conflict", m),
            AgentsError::Capacity(m) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "no_capacity", m)
            }
            AgentsError::Agent(m) => ApiError::new(StatusCode::BAD_GATEWAY, "agent_failed", m),
            AgentsError::Sandbox(e) => e.into(),
            AgentsError::Store(e) if e.is_user_error() => {
                let status = match e {
                    hangar_store::StoreError::InvalidTraffic(_) => StatusCode::BAD_REQUEST,
                    _ => StatusCode::NOT_FOUND,
                };
                ApiError::new(status, "invalid_request", e.to_string())
            }
            AgentsError::Store(e) => {
                tracing::error!(error = ?e, "store failed");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    hangar_sandbox::error_chain(&e),
                )
            }
            AgentsError::Internal(m) => {
                tracing::error!(error = %m, "internal error");
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", m)
            }
        };
        err.source = Some(source);
        err
    }
}

impl ApiError {
    pub fn with_source(mut self, source: ErrorSource) -> ApiError {
        self.source = Some(source);
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let source = self.source.unwrap_or(if self.status.is_client_error() {
            ErrorSource::User
        } else {
            ErrorSource::Platform
        });
        (
            self.status,
            [(ERROR_SOURCE_HEADER, source.as_str())],
            axum::Json(self.body),
        )
            .into_response()
    }
}
