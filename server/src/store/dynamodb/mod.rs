//! The DynamoDB store: the same [`Store`] contract as the embedded store,
//! over eight tables (`docs/dynamodb.md`). Every job write is conditional on
//! the stored version, so the table, not a process, decides which of two
//! racing writers wins; a failed condition comes back as a
//! [`WriteOutcome`], never as an error.
//!
//! A batch's writes to different items run concurrently; writes to one item
//! run in batch order, so a batch still applies "in order" for every item,
//! and a handle's writes that log events run one at a time per event shard
//! (`events.rs`).

mod errors;
mod events;
#[cfg(any(test, feature = "conformance"))]
pub mod faults;
mod items;
#[cfg(any(test, feature = "conformance"))]
pub mod local;
pub mod membership;
mod reads;
pub mod request_metrics;
mod shard_batch;
pub mod tables;
mod writes;

#[cfg(test)]
mod tests_on_local;

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region};
use aws_sdk_dynamodb::Client;
use futures::future::try_join_all;
use futures::stream::{self, StreamExt, TryStreamExt};

pub use self::events::TTL_GRACE as EVENT_TTL_GRACE;
pub use self::items::MAX_ITEM_BYTES;
use self::items::{compose, key_of, s, SHARDS};
use self::reads::{decode_record, Walk};
pub use self::tables::TableNames;
use super::{
    check_record_writes, AgentFilter, CountRow, EventCursor, EventRead, JobFilter, LogChunk, Ownership, Page,
    QueuedEntry, Record, RecordOrder, Store, StoreError, StoreLimits, StoreResult, Trimmed, Write, WriteOutcome,
};
use crate::domain::{Agent, Job, JobState, Pool};

/// Items written at once by one batch (DynamoDB Local and on-demand tables
/// both take this without throttling).
const WRITE_CONCURRENCY: usize = 32;

/// Where the tables are and how to reach them.
#[derive(Debug, Clone, Default)]
pub struct DynamoConfig {
    /// An endpoint URL (DynamoDB Local); default: the region's endpoint.
    pub endpoint: Option<String>,
    /// Prepended to every table name, so several deployments share an account.
    pub table_prefix: String,
    /// Default: the standard chain (AWS_REGION, profile, instance metadata).
    pub region: Option<String>,
}

/// The DynamoDB store (cheap to clone: the SDK client is shared).
#[derive(Clone)]
pub struct DynamoStore {
    client: Client,
    tables: TableNames,
    /// The event shards' heads as this handle last saw them (clones share
    /// them; another handle is another replica).
    heads: std::sync::Arc<events::Heads>,
    /// How long event items are kept before DynamoDB's TTL may delete them
    /// (the retention; [`EVENT_TTL_GRACE`] is added).
    event_ttl: Duration,
}

impl DynamoStore {
    /// Applies the writes `indices` of `batch`: one chain per item, in batch
    /// order within it (the first write of a log sequence wins), chains
    /// concurrently.
    async fn apply_chains(&self, batch: &[Write], indices: Vec<usize>) -> StoreResult<Vec<(usize, WriteOutcome)>> {
        let mut chains: Vec<Vec<usize>> = Vec::new();
        let mut chain_of: HashMap<String, usize> = HashMap::new();
        for i in indices {
            let next = chains.len();
            let chain = *chain_of.entry(item_of(&batch[i])).or_insert(next);
            if chain == next {
                chains.push(Vec::new());
            }
            chains[chain].push(i);
        }
        let done = stream::iter(chains)
            .map(|chain| async move {
                let mut done = Vec::with_capacity(chain.len());
                for i in chain {
                    done.push((i, self.apply(&batch[i]).await?));
                }
                Ok::<_, StoreError>(done)
            })
            .buffer_unordered(WRITE_CONCURRENCY)
            .try_collect::<Vec<Vec<(usize, WriteOutcome)>>>()
            .await?;
        Ok(done.into_iter().flatten().collect())
    }

    /// A client from the standard AWS configuration chain (credentials,
    /// region), with retries of throttling, timeouts and 5xx (jittered
    /// exponential backoff) and bounded attempt times.
    pub async fn client(config: &DynamoConfig) -> Client {
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .retry_config(RetryConfig::standard().with_max_attempts(8).with_initial_backoff(Duration::from_millis(20)))
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(3))
                    .operation_attempt_timeout(Duration::from_secs(5))
                    .operation_timeout(Duration::from_secs(30))
                    .build(),
            );
        if let Some(region) = &config.region {
            loader = loader.region(Region::new(region.clone()));
        }
        if let Some(endpoint) = &config.endpoint {
            loader = loader.endpoint_url(endpoint);
        }
        Client::new(&loader.load().await)
    }

    /// Connects and checks that every table exists (the connectivity check).
    pub async fn connect(config: &DynamoConfig) -> StoreResult<DynamoStore> {
        let store = DynamoStore::with_client(Self::client(config).await, &config.table_prefix);
        store.check().await?;
        Ok(store)
    }

    /// A store over an existing client (its requests counted, see
    /// `request_metrics`); nothing is checked.
    pub fn with_client(client: Client, table_prefix: &str) -> DynamoStore {
        let counted = client.config().to_builder().interceptor(request_metrics::RequestMetrics).build();
        DynamoStore {
            client: Client::from_conf(counted),
            tables: TableNames::new(table_prefix),
            heads: events::shared_heads(),
            event_ttl: crate::engine::DEFAULT_EVENT_RETENTION,
        }
    }

    /// Sets the event retention the TTL of new event items follows (the
    /// server's `--event-retention`).
    pub fn with_event_retention(mut self, retention: Duration) -> DynamoStore {
        self.event_ttl = retention;
        self
    }

    /// Whether the tables are reachable and active.
    pub async fn check(&self) -> StoreResult<()> {
        tables::check_tables(&self.client, &self.tables).await
    }

    pub fn tables(&self) -> &TableNames {
        &self.tables
    }

    pub fn sdk_client(&self) -> &Client {
        &self.client
    }
}

/// The item a write touches: writes to one item keep their batch order.
fn item_of(write: &Write) -> String {
    match write {
        Write::CreateJob { job, .. } => compose(&["job", &job.id]),
        Write::UpdateJob { job, .. } => compose(&["job", &job.id]),
        Write::PutAgent(agent) => compose(&["agent", &agent.id]),
        Write::CreatePool(pool) | Write::PutPool(pool) => compose(&["pool", &pool.name]),
        Write::DeletePool { name } => compose(&["pool", name]),
        Write::AppendLog(chunk) => compose(&["log", &chunk.job_id]),
        Write::RaiseCounter { name, .. } => compose(&["counter", name]),
        Write::PutRecord { record, .. } => compose(&["record", &record.collection, &record.id]),
        Write::Logged { write, .. } => item_of(write),
    }
}

/// Log items as chunks (log records of any format this release reads).
fn decode_logs(items: &[items::Item]) -> StoreResult<Vec<LogChunk>> {
    items
        .iter()
        .map(|item| {
            items::check_schema(item)?;
            crate::store::codec::decode_log(items::get_b(item, "b")?)
        })
        .collect()
}

#[async_trait]
impl Store for DynamoStore {
    async fn write(&self, batch: Vec<Write>) -> StoreResult<Vec<WriteOutcome>> {
        // Writes of one batch run concurrently: refuse a malformed one
        // before any of them is sent.
        check_record_writes(&batch)?;
        items::check_record_sizes(&batch)?;
        // Job writes that log events go by event shard, several per
        // transaction (`shard_batch.rs`), when they are their job's only
        // write in the batch (the engine's always are: it coalesces them).
        let mut writes_per_job: HashMap<&str, usize> = HashMap::new();
        for write in &batch {
            if let Write::CreateJob { job, .. } | Write::UpdateJob { job, .. } = write {
                *writes_per_job.entry(job.id.as_str()).or_default() += 1;
            }
        }
        let mut by_shard: Vec<Vec<(usize, &Write)>> = vec![Vec::new(); SHARDS as usize];
        let mut alone = Vec::with_capacity(batch.len());
        for (i, write) in batch.iter().enumerate() {
            match write {
                Write::CreateJob { job, events } | Write::UpdateJob { job, events, .. }
                    if !events.is_empty() && writes_per_job.get(job.id.as_str()) == Some(&1) =>
                {
                    by_shard[items::shard_of(&job.id) as usize].push((i, write));
                }
                _ => alone.push(i),
            }
        }
        // Job output first: a reader that sees a job ended must find all of
        // the output sent before its result (an agent sends its output
        // first, and the engine puts both in the same batch). Log writes
        // are idempotent, so applying them ahead of the rest is safe.
        let (logs, alone): (Vec<usize>, Vec<usize>) =
            alone.into_iter().partition(|&i| matches!(batch[i], Write::AppendLog(_)));
        let logged = self.apply_chains(&batch, logs).await?;
        let sharded = try_join_all(
            by_shard
                .into_iter()
                .enumerate()
                .filter(|(_, writes)| !writes.is_empty())
                .map(|(shard, writes)| self.apply_shard(shard as u32, writes)),
        );
        let chained = self.apply_chains(&batch, alone);
        let (sharded, chained) = futures::future::try_join(sharded, chained).await?;
        let mut outcomes = vec![WriteOutcome::Applied; batch.len()];
        for (i, outcome) in sharded.into_iter().flatten().chain(chained).chain(logged) {
            outcomes[i] = outcome;
        }
        Ok(outcomes)
    }

    async fn get_job(&self, id: &str) -> StoreResult<Option<Job>> {
        self.read_job(id).await
    }

    async fn get_jobs(&self, ids: &[String]) -> StoreResult<Vec<Job>> {
        self.read_jobs(ids).await
    }

    async fn find_by_idempotency_key(&self, queue: &str, key: &str) -> StoreResult<Option<Job>> {
        self.job_by_key(queue, key).await
    }

    async fn list_jobs(&self, filter: &JobFilter, before_seq: Option<u64>, limit: usize) -> StoreResult<Page<Job>> {
        let states = if filter.states.is_empty() { JobState::ALL.to_vec() } else { filter.states.clone() };
        let queue = filter.queue.clone();
        self.list_by_state(&states, Walk::NewestBefore(before_seq), limit, |job| {
            queue.as_ref().is_none_or(|q| *q == job.spec.queue)
        })
        .await
    }

    async fn list_dead_letters(
        &self,
        queue: Option<&str>,
        after_seq: Option<u64>,
        limit: usize,
    ) -> StoreResult<Page<Job>> {
        self.list_by_state(&[JobState::DeadLettered], Walk::OldestAfter(after_seq), limit, |job| {
            queue.is_none_or(|q| q == job.spec.queue)
        })
        .await
    }

    async fn load_queued(&self) -> StoreResult<Vec<QueuedEntry>> {
        Ok(self.all_in_states(&[JobState::Queued]).await?.iter().map(QueuedEntry::of).collect())
    }

    async fn load_active(&self) -> StoreResult<Vec<Job>> {
        self.all_in_states(&[JobState::Claimed, JobState::Running]).await
    }

    async fn queued_after(&self, after_seq: u64, limit: usize) -> StoreResult<(Vec<QueuedEntry>, Option<u64>)> {
        let per_shard = limit.div_ceil(SHARDS as usize);
        let (jobs, next) = self.oldest_per_shard(JobState::Queued, after_seq, per_shard).await?;
        Ok((jobs.iter().map(QueuedEntry::of).collect(), next))
    }

    async fn counts(&self) -> StoreResult<Vec<CountRow>> {
        self.sum_counts().await
    }

    async fn logs_after(&self, job_id: &str, attempt: u32, after: u64) -> StoreResult<Vec<LogChunk>> {
        decode_logs(&self.query_logs_after(job_id, attempt, after).await?)
    }

    async fn logs(&self, job_id: &str, attempt: u32) -> StoreResult<Vec<LogChunk>> {
        let items =
            self.query_partition(&self.tables.logs, "attempt", s(compose(&[job_id, &attempt.to_string()]))).await?;
        decode_logs(&items)
    }

    async fn get_agent(&self, id: &str) -> StoreResult<Option<Agent>> {
        match self.get_item(&self.tables.agents, key_of("id", id), "agent").await? {
            Some(item) => decode_record(&item).map(Some),
            None => Ok(None),
        }
    }

    async fn find_agent_by_name(&self, pool: &str, name: &str) -> StoreResult<Option<Agent>> {
        let out = self
            .client
            .query()
            .table_name(&self.tables.agents)
            .index_name(tables::BY_NAME)
            .key_condition_expression("pool_name = :p")
            .expression_attribute_values(":p", s(compose(&[pool, name])))
            .send()
            .await
            .map_err(|e| errors::classify("Query agents by_name", e))?;
        match out.items().first() {
            Some(item) => decode_record(item).map(Some),
            None => Ok(None),
        }
    }

    async fn list_agents(&self, filter: &AgentFilter, after_id: Option<&str>, limit: usize) -> StoreResult<Vec<Agent>> {
        let mut agents: Vec<Agent> = Vec::new();
        for item in self.scan_all(&self.tables.agents).await? {
            let id = items::get_s(&item, "id").unwrap_or("?").to_string();
            if let Some(agent) = super::codec::skip_corrupt(format_args!("agent {id}"), decode_record::<Agent>(&item))?
            {
                let wanted = after_id.is_none_or(|a| agent.id.as_str() > a)
                    && filter.pool.as_ref().is_none_or(|p| *p == agent.pool)
                    && filter.labels.iter().all(|(k, v)| agent.labels.get(k) == Some(v));
                if wanted {
                    agents.push(agent);
                }
            }
        }
        agents.sort_by(|a, b| a.id.cmp(&b.id));
        agents.truncate(limit);
        Ok(agents)
    }

    async fn list_pools(&self) -> StoreResult<Vec<Pool>> {
        let mut pools = Vec::new();
        for item in self.scan_all(&self.tables.pools).await? {
            let name = items::get_s(&item, "name").unwrap_or("?").to_string();
            if let Some(pool) = super::codec::skip_corrupt(format_args!("pool {name}"), decode_record::<Pool>(&item))? {
                pools.push(pool);
            }
        }
        pools.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(pools)
    }

    async fn get_record(&self, collection: &str, id: &str) -> StoreResult<Option<Record>> {
        self.read_control_record(collection, id).await
    }

    async fn list_records(
        &self,
        collection: &str,
        order: RecordOrder,
        start_after: Option<&str>,
        limit: usize,
    ) -> StoreResult<Vec<Record>> {
        self.query_control_records(collection, order, start_after, limit).await
    }

    fn event_shards(&self) -> u32 {
        SHARDS
    }

    async fn event_heads(&self) -> StoreResult<EventCursor> {
        self.heads(events::Log::Jobs).await
    }

    async fn read_events(&self, after: &EventCursor, limit: usize) -> StoreResult<EventRead> {
        self.events_after::<crate::store::events::EventGroup>(events::Log::Jobs, after, limit).await
    }

    fn activity_shards(&self) -> u32 {
        SHARDS
    }

    async fn activity_heads(&self) -> StoreResult<EventCursor> {
        self.heads(events::Log::Activity).await
    }

    async fn read_activity(
        &self,
        after: &EventCursor,
        limit: usize,
    ) -> StoreResult<crate::store::LogRead<crate::store::ActivityEvent>> {
        self.events_after::<crate::store::activity::ActivityGroup>(events::Log::Activity, after, limit).await
    }

    async fn trim_events(&self, before: std::time::SystemTime, limit: usize) -> StoreResult<Trimmed> {
        self.trim_shards(before, limit).await
    }

    /// A job item must stay under DynamoDB's 400 KB with its payload, its
    /// result and the rest of its record (labels, errors: at most ~60 KB).
    fn limits(&self) -> StoreLimits {
        StoreLimits { max_payload_bytes: 192 * 1024, max_result_bytes: 128 * 1024 }
    }

    /// Replicas share the tables; conditional writes arbitrate.
    fn ownership(&self) -> Ownership {
        Ownership::Shared
    }

    async fn counter(&self, name: &'static str) -> StoreResult<u64> {
        let key = HashMap::from([("pk".to_string(), s("counter")), ("sk".to_string(), s(name))]);
        match self.get_item(&self.tables.meta, key, "counter").await? {
            Some(item) => items::get_n(&item, "v"),
            None => Ok(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    mod conformance_suite {
        crate::store_conformance_suite!(
            |case: &'static str| async move { (super::local::fresh_store(case).await, ()) }
        );
    }

    #[test]
    fn writes_to_one_item_share_a_chain_and_others_do_not() {
        let job = |id: &str| crate::store::conformance::job(id, 1, "q", None);
        assert_eq!(item_of(&Write::create(job("a"))), item_of(&Write::update(job("a"), 1)));
        assert_ne!(item_of(&Write::create(job("a"))), item_of(&Write::create(job("b"))));
        assert_ne!(item_of(&Write::DeletePool { name: "a".into() }), item_of(&Write::create(job("a"))));
        let record = |collection: &str, id: &str, version: u64| Write::PutRecord {
            record: crate::store::Record {
                collection: collection.into(),
                id: id.into(),
                version,
                body: Default::default(),
            },
            expected_version: version - 1,
        };
        assert_eq!(item_of(&record("env", "a", 1)), item_of(&record("env", "a", 2)));
        assert_ne!(item_of(&record("env", "ab", 1)), item_of(&record("enva", "b", 1)));
        assert_ne!(item_of(&record("job", "a", 1)), item_of(&Write::create(job("a"))));
    }
}
