//! The errors of the domain, independent of any transport.

/// What went wrong with a request; the gRPC layer maps each kind to a status.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum DomainError {
    /// A request field is invalid.
    #[error("invalid {field}: {reason}")]
    InvalidArgument { field: String, reason: String },
    /// The named thing does not exist.
    #[error("{kind} {id:?} not found")]
    NotFound { kind: &'static str, id: String },
    /// A referenced thing does not exist; the message says which and where.
    #[error("{0}")]
    Missing(String),
    /// It exists already in a different form.
    #[error("{0}")]
    AlreadyExists(String),
    /// The system is not in a state that allows the request (e.g. a stale
    /// fencing token, or cancelling a finished job).
    #[error("{0}")]
    FailedPrecondition(String),
    /// Another replica changed the same thing first (a lost race on a
    /// shared store); reading it again and retrying may succeed.
    #[error("conflict: {0}")]
    Conflict(String),
    /// A limit was reached.
    #[error("{0}")]
    ResourceExhausted(String),
    /// A position the server no longer holds: a watch cursor older than the
    /// event retention. The client starts again from the present.
    #[error("{0}")]
    Expired(String),
    /// The store failed or the server is shutting down; retry later.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// A bug or a corrupted store.
    #[error("internal error: {0}")]
    Internal(String),
}

impl DomainError {
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        DomainError::InvalidArgument { field: field.into(), reason: reason.into() }
    }

    /// The same error about a field nested under `prefix` (e.g. the
    /// `requests[3].` of a batch), so field names are only built on failure.
    pub fn under(self, prefix: &str) -> Self {
        match self {
            DomainError::InvalidArgument { field, reason } => {
                DomainError::InvalidArgument { field: format!("{prefix}{field}"), reason }
            }
            DomainError::ResourceExhausted(message) => DomainError::ResourceExhausted(format!("{prefix}{message}")),
            other => other,
        }
    }

    pub fn job_not_found(id: &str) -> Self {
        DomainError::NotFound { kind: "job", id: id.to_string() }
    }

    pub fn agent_not_found(id: &str) -> Self {
        DomainError::NotFound { kind: "agent", id: id.to_string() }
    }
}

pub type DomainResult<T> = Result<T, DomainError>;
