//! A fault layer around the SDK client for tests: it lets a request reach
//! DynamoDB and then replaces the reply with a retryable error, as a lost
//! reply or a throttled one looks to the client. The SDK then retries a
//! write that was in fact applied, which the store must recognise.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use aws_sdk_dynamodb::config::interceptors::BeforeDeserializationInterceptorContextMut;
use aws_sdk_dynamodb::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::orchestrator::Metadata;
use aws_smithy_types::body::SdkBody;

/// Which error replaces the reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// HTTP 500 InternalServerError: the write applied, the reply was lost.
    LostReply,
    /// HTTP 400 ThrottlingException after the write applied.
    Throttled,
}

/// Replaces the replies of the next `remaining` calls of `operation`
/// (e.g. "PutItem", "TransactWriteItems") with `fault`.
#[derive(Debug, Clone)]
pub struct FaultLayer {
    operation: &'static str,
    fault: Fault,
    remaining: Arc<AtomicU32>,
    injected: Arc<AtomicU32>,
}

impl FaultLayer {
    pub fn new(operation: &'static str, fault: Fault, times: u32) -> FaultLayer {
        FaultLayer {
            operation,
            fault,
            remaining: Arc::new(AtomicU32::new(times)),
            injected: Arc::new(AtomicU32::new(0)),
        }
    }

    /// Faults injected so far.
    pub fn injected(&self) -> u32 {
        self.injected.load(Ordering::SeqCst)
    }

    /// Arms the layer for `times` more calls.
    pub fn arm(&self, times: u32) {
        self.remaining.store(times, Ordering::SeqCst);
    }
}

impl Intercept for FaultLayer {
    fn name(&self) -> &'static str {
        "tether-fault-layer"
    }

    fn modify_before_deserialization(
        &self,
        context: &mut BeforeDeserializationInterceptorContextMut<'_>,
        _components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let ours = cfg.load::<Metadata>().is_some_and(|m| m.name() == self.operation);
        let applied = context.response().status().is_success();
        if !ours || !applied {
            return Ok(());
        }
        let armed = self.remaining.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok();
        if !armed {
            return Ok(());
        }
        self.injected.fetch_add(1, Ordering::SeqCst);
        let (status, kind) = match self.fault {
            Fault::LostReply => (500u16, "InternalServerError"),
            Fault::Throttled => (400u16, "ThrottlingException"),
        };
        let response = context.response_mut();
        *response.status_mut() = status.try_into()?;
        let body = format!(
            r#"{{"__type":"com.amazonaws.dynamodb.v20120810#{kind}","message":"injected by the fault layer"}}"#
        );
        *response.body_mut() = SdkBody::from(body);
        Ok(())
    }
}
