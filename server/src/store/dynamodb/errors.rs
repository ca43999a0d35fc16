//! DynamoDB SDK errors classed as retryable or terminal. The SDK has already
//! retried throttling, 5xx and timeouts with jittered backoff by the time an
//! error reaches here; what is left is reported, not hidden.

use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};

use crate::store::StoreError;

/// Error codes that another attempt later may get past.
const RETRYABLE_CODES: &[&str] = &[
    "ThrottlingException",
    "ProvisionedThroughputExceededException",
    "RequestLimitExceeded",
    "InternalServerError",
    "ServiceUnavailable",
    "TransactionConflictException",
    "TransactionInProgressException",
    "LimitExceededException",
];

/// Classes an SDK error of operation `op`.
pub fn classify<E, R>(op: &str, err: SdkError<E, R>) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug,
{
    match &err {
        SdkError::TimeoutError(_) => StoreError::Unavailable(format!("{op}: timed out")),
        SdkError::DispatchFailure(failure) => {
            StoreError::Unavailable(format!("{op}: could not reach DynamoDB: {:?}", failure.as_connector_error()))
        }
        SdkError::ResponseError(_) => StoreError::Unavailable(format!("{op}: unreadable response: {err}")),
        SdkError::ServiceError(service) => {
            let e = service.err();
            let code = e.code().unwrap_or("unknown");
            let message = e.message().unwrap_or("");
            if RETRYABLE_CODES.contains(&code) {
                StoreError::Unavailable(format!("{op}: {code}: {message}"))
            } else if code == "ResourceNotFoundException" {
                StoreError::Rejected(format!(
                    "{op}: {message} (create the tables with `tether dynamodb create-tables`)"
                ))
            } else {
                StoreError::Rejected(format!("{op}: {code}: {message}"))
            }
        }
        _ => StoreError::Unavailable(format!("{op}: {err}")),
    }
}

/// Whether a transaction's cancellation reason means another transaction
/// held one of its items (worth another try), not a failed condition.
pub fn is_conflict_code(code: Option<&str>) -> bool {
    matches!(code, Some("TransactionConflict" | "ThrottlingError" | "ProvisionedThroughputExceeded"))
}

/// Whether a conditional request failed its condition (an outcome, not an
/// error, for the caller to interpret).
pub fn condition_failed<E: ProvideErrorMetadata, R>(err: &SdkError<E, R>) -> bool {
    err.as_service_error().and_then(ProvideErrorMetadata::code) == Some("ConditionalCheckFailedException")
}
