use hangar_sandbox::SandboxError;
use hangar_store::StoreError;

/// Who an error is down to, as `x-platform-error-source` tells the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorSource {
    /// Hangar itself (a runtime or store failure, no capacity).
    Platform,
    /// The request (unknown agent or session, bad body).
    User,
    /// The agent (it did not become ready, crashed, or could not be reached).
    Upstream,
}

impl ErrorSource {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorSource::Platform => "platform",
            ErrorSource::User => "user",
            ErrorSource::Upstream => "upstream",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AgentsError {
    /// Unknown agent, version, session or response — or one that belongs to another
    /// isolation key, which must look the same.
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Conflict(String),
    /// No room on this node: every sandbox slot is busy.
    #[error("{0}")]
    Capacity(String),
    /// The agent did not become ready, or its sandbox failed.
    #[error("{0}")]
    Agent(String),
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// Hangar itself failed (a key that does not open, a token that cannot be signed).
    #[error("{0}")]
    Internal(String),
}

impl AgentsError {
    pub fn source_of_error(&self) -> ErrorSource {
        match self {
            AgentsError::NotFound(_) | AgentsError::Invalid(_) | AgentsError::Conflict(_) => {
                ErrorSource::User
            }
            AgentsError::Agent(_) => ErrorSource::Upstream,
            AgentsError::Store(e) if e.is_user_error() => ErrorSource::User,
            AgentsError::Sandbox(SandboxError::Invalid(_) | SandboxError::NotFound(_)) => {
                ErrorSource::User
            }
            _ => ErrorSource::Platform,
        }
    }
}
