//! Replica membership on a shared store: each replica announces its address
//! with an expiry and renews it; peers are the replicas whose announcement
//! has not expired. Used only for wake-ups, so a stale or missing entry
//! costs latency (the sweep still finds the work), never correctness.

use std::time::SystemTime;

use async_trait::async_trait;

use super::StoreResult;

/// A replica as its peers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replica {
    pub id: String,
    /// Where its gRPC port is reached (`http://host:port`).
    pub address: String,
    /// Until when the announcement holds unless renewed.
    pub expires: SystemTime,
}

#[async_trait]
pub trait Membership: Send + Sync + 'static {
    /// Creates or renews this replica's announcement.
    async fn announce(&self, replica: &Replica) -> StoreResult<()>;
    /// Removes this replica's announcement (a clean stop).
    async fn leave(&self, id: &str) -> StoreResult<()>;
    /// Every announcement, expired or not (callers compare with their clock).
    async fn replicas(&self) -> StoreResult<Vec<Replica>>;
}
