//! The one table from domain errors to gRPC statuses.

use tonic::{Code, Status};

use crate::domain::DomainError;

/// Converts a domain error to the status a client sees.
pub fn to_status(error: DomainError) -> Status {
    let code = match &error {
        DomainError::InvalidArgument { .. } => Code::InvalidArgument,
        DomainError::NotFound { .. } | DomainError::Missing(_) => Code::NotFound,
        DomainError::AlreadyExists(_) => Code::AlreadyExists,
        DomainError::FailedPrecondition(_) => Code::FailedPrecondition,
        DomainError::ResourceExhausted(_) => Code::ResourceExhausted,
        DomainError::Unavailable(_) => Code::Unavailable,
        DomainError::Internal(_) => Code::Internal,
        // Non-exhaustive: a new kind is an internal error until mapped.
        #[allow(unreachable_patterns)]
        _ => Code::Internal,
    };
    Status::new(code, error.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_argument_names_the_field() {
        let status = to_status(DomainError::invalid("queue", "must not be empty"));
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(status.message(), "invalid queue: must not be empty");
    }

    #[test]
    fn stale_tokens_are_failed_precondition() {
        let status = to_status(DomainError::FailedPrecondition("stale".into()));
        assert_eq!(status.code(), Code::FailedPrecondition);
    }
}
