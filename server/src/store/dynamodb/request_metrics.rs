//! Counts every DynamoDB request and every attempt of it, by operation and
//! by what the attempt came to, so an operator sees retries, throttling,
//! failed conditions and transaction conflicts per replica (each replica is
//! one process with its own `/metrics`). Attempts minus requests are the
//! SDK's retries.

use aws_sdk_dynamodb::config::interceptors::{BeforeTransmitInterceptorContextMut, FinalizerInterceptorContextRef};
use aws_sdk_dynamodb::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::orchestrator::{HttpResponse, Metadata};

/// Requests by operation (one per call, however many attempts).
pub const REQUESTS: &str = "tether_dynamodb_requests_total";
/// Attempts by operation and result.
pub const ATTEMPTS: &str = "tether_dynamodb_attempts_total";

/// The interceptor that counts; installed on every client the store uses.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestMetrics;

impl Intercept for RequestMetrics {
    fn name(&self) -> &'static str {
        "tether-request-metrics"
    }

    // Once per request, after the operation is known (it is not yet before
    // serialization).
    fn modify_before_retry_loop(
        &self,
        _context: &mut BeforeTransmitInterceptorContextMut<'_>,
        _components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        metrics::counter!(REQUESTS, "operation" => operation(cfg)).increment(1);
        Ok(())
    }

    fn read_after_attempt(
        &self,
        context: &FinalizerInterceptorContextRef<'_>,
        _components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        metrics::counter!(ATTEMPTS, "operation" => operation(cfg), "result" => result_of(context.response()))
            .increment(1);
        Ok(())
    }
}

fn operation(cfg: &ConfigBag) -> String {
    cfg.load::<Metadata>().map_or_else(|| "unknown".to_string(), |m| m.name().to_string())
}

/// What one attempt came to, read from its HTTP response (DynamoDB names
/// the error type in the JSON body of a 400).
pub fn result_of(response: Option<&HttpResponse>) -> &'static str {
    let Some(response) = response else {
        // Timed out or never reached DynamoDB.
        return "no_response";
    };
    let status = response.status().as_u16();
    if (200..300).contains(&status) {
        return "ok";
    }
    if status >= 500 {
        return "server_error";
    }
    let body = response.body().bytes().unwrap_or_default();
    let names = |needle: &str| body.windows(needle.len()).any(|w| w == needle.as_bytes());
    if names("ThrottlingException") || names("ProvisionedThroughputExceeded") || names("RequestLimitExceeded") {
        "throttled"
    } else if names("ConditionalCheckFailed") {
        "condition_failed"
    } else if names("TransactionConflict") || names("TransactionInProgress") {
        "conflict"
    } else if names("TransactionCanceled") {
        "transaction_cancelled"
    } else {
        "client_error"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_smithy_types::body::SdkBody;

    fn response(status: u16, body: &str) -> HttpResponse {
        HttpResponse::new(status.try_into().expect("status"), SdkBody::from(body.to_string()))
    }

    #[test]
    fn attempts_are_classed_by_status_and_error_type() {
        let error = |kind: &str| response(400, &format!(r#"{{"__type":"com.amazonaws.dynamodb.v20120810#{kind}"}}"#));
        assert_eq!(result_of(None), "no_response");
        assert_eq!(result_of(Some(&response(200, "{}"))), "ok");
        assert_eq!(result_of(Some(&response(500, ""))), "server_error");
        assert_eq!(result_of(Some(&response(503, ""))), "server_error");
        assert_eq!(result_of(Some(&error("ThrottlingException"))), "throttled");
        assert_eq!(result_of(Some(&error("ProvisionedThroughputExceededException"))), "throttled");
        assert_eq!(result_of(Some(&error("ConditionalCheckFailedException"))), "condition_failed");
        assert_eq!(result_of(Some(&error("TransactionConflictException"))), "conflict");
        assert_eq!(result_of(Some(&error("TransactionCanceledException"))), "transaction_cancelled");
        assert_eq!(result_of(Some(&error("ValidationException"))), "client_error");
    }
}
