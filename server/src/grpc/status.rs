//! The one table from domain errors to gRPC statuses. Every status also
//! carries `google.rpc` details any client can decode: an `ErrorInfo` with a
//! stable reason (domain `tether.v1`) and, for invalid input, a `BadRequest`
//! naming the field.

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::domain::DomainError;

/// The `ErrorInfo.domain` of every Tether error.
pub const ERROR_DOMAIN: &str = "tether.v1";

/// Converts a domain error to the status a client sees.
pub fn to_status(error: DomainError) -> Status {
    let (code, reason, mut details) = match &error {
        DomainError::InvalidArgument { field, reason } => (
            Code::InvalidArgument,
            "INVALID_FIELD",
            ErrorDetails::with_bad_request_violation(field.clone(), reason.clone()),
        ),
        DomainError::NotFound { kind, id } => {
            let mut details = ErrorDetails::new();
            details.set_resource_info(*kind, id.clone(), "", "");
            (Code::NotFound, "NOT_FOUND", details)
        }
        DomainError::Missing(_) => (Code::NotFound, "REFERENCE_NOT_FOUND", ErrorDetails::new()),
        DomainError::AlreadyExists(_) => (Code::AlreadyExists, "ALREADY_EXISTS", ErrorDetails::new()),
        DomainError::FailedPrecondition(_) => (Code::FailedPrecondition, "FAILED_PRECONDITION", ErrorDetails::new()),
        DomainError::Conflict(_) => (Code::Aborted, "CONFLICT", ErrorDetails::new()),
        DomainError::ResourceExhausted(_) => (Code::ResourceExhausted, "LIMIT_EXCEEDED", ErrorDetails::new()),
        DomainError::Expired(_) => (Code::OutOfRange, "CURSOR_EXPIRED", ErrorDetails::new()),
        DomainError::Unavailable(_) => (Code::Unavailable, "UNAVAILABLE", ErrorDetails::new()),
        DomainError::Internal(_) => (Code::Internal, "INTERNAL", ErrorDetails::new()),
        // Non-exhaustive: a new kind is an internal error until mapped.
        #[allow(unreachable_patterns)]
        _ => (Code::Internal, "INTERNAL", ErrorDetails::new()),
    };
    details.set_error_info(reason, ERROR_DOMAIN, HashMap::<String, String>::new());
    Status::with_error_details(code, error.to_string(), details)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_argument_names_the_field_in_message_and_details() {
        let status = to_status(DomainError::invalid("queue", "must not be empty"));
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(status.message(), "invalid queue: must not be empty");
        let details = status.get_error_details();
        let violations = details.bad_request().map(|b| b.field_violations.clone()).unwrap_or_default();
        assert_eq!(violations.len(), 1);
        assert_eq!((violations[0].field.as_str(), violations[0].description.as_str()), ("queue", "must not be empty"));
        assert_eq!(details.error_info().map(|i| i.reason.as_str()), Some("INVALID_FIELD"));
    }

    #[test]
    fn stale_tokens_are_failed_precondition() {
        let status = to_status(DomainError::FailedPrecondition("stale".into()));
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert_eq!(status.get_error_details().error_info().map(|i| i.domain.as_str()), Some(ERROR_DOMAIN));
    }
}
