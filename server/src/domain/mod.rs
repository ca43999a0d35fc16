//! Domain types shared by the engine, the store and the gRPC layer. Nothing
//! here knows about tonic or about a particular store.

pub mod agent;
pub mod dashboard;
pub mod deploy;
pub mod error;
pub mod job;
pub mod pool;
pub mod summary;
pub mod validate;
pub mod waiting;

pub use agent::{Agent, Health, Metrics, SchedulingStatus};
pub use error::{DomainError, DomainResult};
pub use job::{AttemptRef, Failure, Job, JobSpec, JobState, Priority, RetryPolicy, Routing};
pub use pool::{Pool, ScalingSignal};

/// The pool used when none is named.
pub const DEFAULT_POOL: &str = "default";
