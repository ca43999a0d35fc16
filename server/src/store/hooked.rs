//! A store that forwards every call to another one and runs each commit
//! through a hook, so measuring or holding commits (benchmarks, fault
//! tests) never re-implements the whole trait.

use async_trait::async_trait;

use super::{
    AgentFilter, CountRow, JobFilter, LogChunk, Ownership, Page, QueuedEntry, Record, RecordOrder, Store, StoreLimits,
    StoreResult, Write, WriteOutcome,
};
use crate::domain::{Agent, Job, Pool};

/// What a [`HookedStore`] does around every commit.
#[async_trait]
pub trait WriteHook: Send + Sync + 'static {
    /// Commits `batch` to `inner`, with whatever the hook adds around it.
    async fn write(&self, inner: &dyn Store, batch: Vec<Write>) -> StoreResult<Vec<WriteOutcome>>;
}

/// `inner` with every commit going through `hook`; reads are forwarded.
pub struct HookedStore<S, H> {
    pub inner: S,
    pub hook: H,
}

#[async_trait]
impl<S: Store, H: WriteHook> Store for HookedStore<S, H> {
    async fn write(&self, batch: Vec<Write>) -> StoreResult<Vec<WriteOutcome>> {
        self.hook.write(&self.inner, batch).await
    }

    async fn get_job(&self, id: &str) -> StoreResult<Option<Job>> {
        self.inner.get_job(id).await
    }

    async fn get_jobs(&self, ids: &[String]) -> StoreResult<Vec<Job>> {
        self.inner.get_jobs(ids).await
    }

    async fn find_by_idempotency_key(&self, queue: &str, key: &str) -> StoreResult<Option<Job>> {
        self.inner.find_by_idempotency_key(queue, key).await
    }

    async fn list_jobs(&self, filter: &JobFilter, before_seq: Option<u64>, limit: usize) -> StoreResult<Page<Job>> {
        self.inner.list_jobs(filter, before_seq, limit).await
    }

    async fn list_dead_letters(
        &self,
        queue: Option<&str>,
        after_seq: Option<u64>,
        limit: usize,
    ) -> StoreResult<Page<Job>> {
        self.inner.list_dead_letters(queue, after_seq, limit).await
    }

    async fn load_queued(&self) -> StoreResult<Vec<QueuedEntry>> {
        self.inner.load_queued().await
    }

    async fn load_active(&self) -> StoreResult<Vec<Job>> {
        self.inner.load_active().await
    }

    async fn counts(&self) -> StoreResult<Vec<CountRow>> {
        self.inner.counts().await
    }

    async fn logs_after(&self, job_id: &str, attempt: u32, after: u64) -> StoreResult<Vec<LogChunk>> {
        self.inner.logs_after(job_id, attempt, after).await
    }

    async fn logs(&self, job_id: &str, attempt: u32) -> StoreResult<Vec<LogChunk>> {
        self.inner.logs(job_id, attempt).await
    }

    async fn get_agent(&self, id: &str) -> StoreResult<Option<Agent>> {
        self.inner.get_agent(id).await
    }

    async fn find_agent_by_name(&self, pool: &str, name: &str) -> StoreResult<Option<Agent>> {
        self.inner.find_agent_by_name(pool, name).await
    }

    async fn list_agents(&self, filter: &AgentFilter, after_id: Option<&str>, limit: usize) -> StoreResult<Vec<Agent>> {
        self.inner.list_agents(filter, after_id, limit).await
    }

    async fn list_pools(&self) -> StoreResult<Vec<Pool>> {
        self.inner.list_pools().await
    }

    async fn get_record(&self, collection: &str, id: &str) -> StoreResult<Option<Record>> {
        self.inner.get_record(collection, id).await
    }

    async fn list_records(
        &self,
        collection: &str,
        order: RecordOrder,
        start_after: Option<&str>,
        limit: usize,
    ) -> StoreResult<Vec<Record>> {
        self.inner.list_records(collection, order, start_after, limit).await
    }

    async fn counter(&self, name: &'static str) -> StoreResult<u64> {
        self.inner.counter(name).await
    }

    async fn queued_after(&self, after_seq: u64, limit: usize) -> StoreResult<(Vec<QueuedEntry>, Option<u64>)> {
        self.inner.queued_after(after_seq, limit).await
    }

    fn event_shards(&self) -> u32 {
        self.inner.event_shards()
    }

    async fn event_heads(&self) -> StoreResult<super::EventCursor> {
        self.inner.event_heads().await
    }

    async fn read_events(&self, after: &super::EventCursor, limit: usize) -> StoreResult<super::EventRead> {
        self.inner.read_events(after, limit).await
    }

    async fn trim_events(&self, before: std::time::SystemTime, limit: usize) -> StoreResult<super::Trimmed> {
        self.inner.trim_events(before, limit).await
    }

    fn activity_shards(&self) -> u32 {
        self.inner.activity_shards()
    }

    async fn activity_heads(&self) -> StoreResult<super::EventCursor> {
        self.inner.activity_heads().await
    }

    async fn read_activity(
        &self,
        after: &super::EventCursor,
        limit: usize,
    ) -> StoreResult<super::LogRead<super::ActivityEvent>> {
        self.inner.read_activity(after, limit).await
    }

    fn limits(&self) -> StoreLimits {
        self.inner.limits()
    }

    fn ownership(&self) -> Ownership {
        self.inner.ownership()
    }
}
