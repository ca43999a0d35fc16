//! The SDK's error type and the one place that decides which gRPC codes are
//! worth a reconnect.

use tonic::Code;

/// Why [`Agent::run`](crate::Agent::run) stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// The configuration cannot work (bad URL, no name, zero slots, ...).
    #[error("invalid agent configuration: {0}")]
    InvalidConfig(String),
    /// The server refused the agent for a reason a retry will not fix
    /// (bad Hello, no common protocol version, bad credential, ...).
    #[error("server rejected the agent: {0}")]
    Rejected(tonic::Status),
    /// The server broke the protocol in a way a retry will not fix.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The transport could not be set up.
    #[error("transport error: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The agent has stopped (returned by waits on a stopped agent).
    #[error("the agent has stopped")]
    Stopped,
}

/// Whether a status ending a Connect stream (or refusing to open one) is
/// transient, so the agent reconnects with backoff instead of giving up.
///
/// Everything not listed here (INVALID_ARGUMENT, FAILED_PRECONDITION,
/// UNAUTHENTICATED, PERMISSION_DENIED, NOT_FOUND, UNIMPLEMENTED, ...) means
/// the server refused *this agent*, and retrying would only hammer it.
pub fn is_retryable(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable
            | Code::DeadlineExceeded
            | Code::ResourceExhausted
            | Code::Aborted
            | Code::Internal
            | Code::Unknown
            | Code::Cancelled
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_not_retryable() {
        for code in [
            Code::InvalidArgument,
            Code::FailedPrecondition,
            Code::Unauthenticated,
            Code::PermissionDenied,
            Code::Unimplemented,
        ] {
            assert!(!is_retryable(code), "{code:?}");
        }
        for code in [Code::Unavailable, Code::Internal, Code::Cancelled, Code::Unknown] {
            assert!(is_retryable(code), "{code:?}");
        }
    }
}
