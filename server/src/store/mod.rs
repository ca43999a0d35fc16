//! Storage: one trait at the level of domain writes (conditional job
//! transitions, idempotent creation) and reads, with one conformance suite
//! that every backend must pass.
//!
//! Every write in a [`Store::write`] batch is conditional on its own and
//! reports its own [`WriteOutcome`]; the batch as a whole is durable when the
//! call returns. Backends may group batches from concurrent callers into one
//! disk sync (group commit).

use std::collections::BTreeMap;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::domain::{Agent, Job, JobState, Pool, Priority, Routing};
pub use activity::{Activity, ActivityEvent, ActivityKind};
pub use events::{Event, EventCursor, EventRead, LogRead, Transition, Trimmed};

pub mod activity;
pub(crate) mod codec;
#[cfg(any(test, feature = "conformance"))]
pub mod conformance;
pub mod dynamodb;
pub mod embedded;
pub mod events;
pub mod hooked;
mod legacy;
pub mod membership;

/// A storage failure. Conflicts are not errors: they are outcomes.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("storage I/O failed: {0}")]
    Io(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("the store is closed")]
    Closed,
    /// Another process owns the store (the embedded store is exclusive).
    #[error("{0} is in use by another tether server (only one process may own a data directory)")]
    InUse(String),
    /// The backend throttled, timed out or failed transiently (after the
    /// client's own retries).
    #[error("the store is unavailable: {0}")]
    Unavailable(String),
    /// The backend refused the request and will refuse it again: a missing
    /// table, an item over its size limit, a malformed request.
    #[error("the store refused the request: {0}")]
    Rejected(String),
    /// The store was written by a newer release, in a schema version this
    /// one does not know; nothing of it was read.
    #[error(
        "{location} holds store schema version {found} (last written by {written_by}); this release reads \
         store schema versions up to {supported}: run a newer tether (stores are not downgraded)"
    )]
    NewerSchema { location: String, found: u64, supported: u64, written_by: String },
}

impl StoreError {
    /// Whether trying again later may succeed (I/O hiccups); corrupt data,
    /// a closed store or one owned by another process will not change.
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Io(_) | StoreError::Unavailable(_))
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// One conditional write. Serializable because the embedded store journals
/// the writes it acknowledged before they reach its database file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Write {
    /// Inserts a new job (its `version` must be 1). Refused if the id exists
    /// or if its queue's idempotency key is already taken. Its `events`
    /// (state changes, oldest first) are appended to the event log in the
    /// same commit, or not at all.
    CreateJob {
        #[serde(with = "job_record")]
        job: Box<Job>,
        events: Vec<Transition>,
    },
    /// Replaces a job if its stored version is `expected_version`. The new
    /// record's version is at least `expected_version + 1` (several
    /// transitions of one batch coalesce into one write). Its `events` are
    /// appended to the event log in the same commit, or not at all; a write
    /// without a state change carries none.
    UpdateJob {
        #[serde(with = "job_record")]
        job: Box<Job>,
        expected_version: u64,
        events: Vec<Transition>,
    },
    /// Inserts or replaces an agent.
    PutAgent(Box<Agent>),
    /// Inserts a pool; refused (`IdExists`) if one of its name exists.
    CreatePool(Box<Pool>),
    /// Inserts or replaces a pool.
    PutPool(Box<Pool>),
    /// Deletes a pool (no-op if missing).
    DeletePool { name: String },
    /// Stores a log chunk; a chunk whose key exists is ignored. Journaled
    /// as a versioned log record ([`codec::encode_log`]), so a later change
    /// of the chunk's layout is read by [`codec::decode_log`] alone.
    AppendLog(#[serde(with = "log_record")] LogChunk),
    /// Raises a named high-water mark (never lowers it).
    RaiseCounter {
        #[serde(with = "counter_name")]
        name: CounterName,
        value: u64,
    },
    /// Inserts (`expected_version` 0: refused with `IdExists` if the key is
    /// taken) or replaces (refused with `VersionConflict` unless the stored
    /// version is `expected_version`) a record. The record's own `version`
    /// must be `expected_version + 1`, its collection and id not empty: a
    /// batch where they are not is refused whole (`Rejected`), before
    /// anything of it is written. A write of exactly the stored record (its
    /// version and body) may report `Applied` rather than its conflict on
    /// DynamoDB: it cannot be told from a retry whose first reply was lost.
    ///
    /// Last, and new variants after it: the journal holds writes by their
    /// variant's index (postcard), so the older ones keep theirs.
    PutRecord { record: Record, expected_version: u64 },
    /// Applies `write`, a [`Write::PutAgent`] or a [`Write::PutRecord`],
    /// and appends `activity` (at least one entry, all of one subject) to
    /// the activity log in the same commit, or neither: the outcome is the
    /// inner write's. Any other inner write, or empty or mixed activity,
    /// refuses the batch whole (`Rejected`).
    Logged { write: Box<Write>, activity: Vec<Activity> },
}

/// A versioned document of the control plane's own state (environments,
/// releases, deployments, rollouts), keyed by (collection, id). The body
/// is the owning module's encoding; the store only compares versions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub collection: String,
    pub id: String,
    /// 1 when created, one more per replacement.
    pub version: u64,
    pub body: Bytes,
}

/// The order of a record listing (by id, bytewise).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordOrder {
    Ascending,
    Descending,
}

/// A counter's name. An alias, not `&'static str` written out, because
/// serde would make a field of that type borrow from the record it is read
/// from for `'static`.
pub type CounterName = &'static str;

/// A counter's name as a record holds it: a `&'static str` cannot borrow
/// from a record, so only the known names read back.
mod counter_name {
    use serde::de::Error as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(name: &&'static str, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(name)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<&'static str, D::Error> {
        let name = String::deserialize(deserializer)?;
        super::counter_by_name(&name).ok_or_else(|| D::Error::custom(format!("unknown counter {name:?}")))
    }
}

/// The known counter of this name.
fn counter_by_name(name: &str) -> Option<CounterName> {
    [COUNTER_SEQ, COUNTER_FENCING].into_iter().find(|known| *known == name)
}

/// A log chunk inside a journaled write, as a versioned log record.
mod log_record {
    use serde::de::Error as _;
    use serde::ser::Error as _;
    use serde::{Deserialize, Deserializer, Serializer};

    use super::LogChunk;

    pub fn serialize<S: Serializer>(chunk: &LogChunk, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(&super::codec::encode_log(chunk).map_err(S::Error::custom)?)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<LogChunk, D::Error> {
        let bytes = <std::borrow::Cow<'de, [u8]>>::deserialize(deserializer)?;
        super::codec::decode_log(&bytes).map_err(D::Error::custom)
    }
}

/// A job inside a journaled write, as a versioned job record (the format
/// byte and layout of [`codec::encode_job_into`]): a later change of the
/// job's layout is then read by [`codec::decode_job`] alone.
mod job_record {
    use serde::de::Error as _;
    use serde::ser::Error as _;
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::domain::Job;

    pub fn serialize<S: Serializer>(job: &Job, serializer: S) -> Result<S::Ok, S::Error> {
        let mut buf = Vec::new();
        super::codec::encode_job_into(&mut buf, job).map_err(S::Error::custom)?;
        serializer.serialize_bytes(&buf)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Box<Job>, D::Error> {
        let bytes = <std::borrow::Cow<'de, [u8]>>::deserialize(deserializer)?;
        super::codec::decode_job(&bytes).map(Box::new).map_err(D::Error::custom)
    }
}

/// Refuses a batch holding a record write whose version does not follow
/// its expected version, or whose collection or id is empty (DynamoDB
/// keys cannot be): a caller's bug, refused before anything of the batch
/// is written (on the embedded store it would otherwise fail the commit of
/// every batch grouped with it).
pub(crate) fn check_record_writes(batch: &[Write]) -> StoreResult<()> {
    for write in batch {
        let write = match write {
            Write::Logged { write, activity } => {
                check_logged(write, activity)?;
                write.as_ref()
            }
            other => other,
        };
        if let Write::PutRecord { record, expected_version } = write {
            if record.collection.is_empty() || record.id.is_empty() {
                return Err(StoreError::Rejected(format!(
                    "record {:?}/{:?}: a record's collection and id must not be empty",
                    record.collection, record.id
                )));
            }
            if expected_version.checked_add(1) != Some(record.version) {
                return Err(StoreError::Rejected(format!(
                    "record {}/{}: version {} does not follow expected version {expected_version} (a \
                     record's version is the one it replaces plus one)",
                    record.collection, record.id, record.version
                )));
            }
        }
    }
    Ok(())
}

fn check_logged(write: &Write, activity: &[Activity]) -> StoreResult<()> {
    if !matches!(write, Write::PutAgent(_) | Write::PutRecord { .. }) {
        return Err(StoreError::Rejected("only an agent or a record write carries activity".into()));
    }
    let Some(first) = activity.first() else {
        return Err(StoreError::Rejected("a logged write carries at least one activity entry".into()));
    };
    if first.subject.is_empty() || activity.iter().any(|a| a.subject != first.subject) {
        return Err(StoreError::Rejected(
            "the activity of one write is of one subject, named (it picks the shard)".into(),
        ));
    }
    Ok(())
}

impl Write {
    /// The agent it stores, logged or not.
    pub fn agent(&self) -> Option<&Agent> {
        match self {
            Write::PutAgent(agent) => Some(agent),
            Write::Logged { write, .. } => write.agent(),
            _ => None,
        }
    }

    /// A create without events (tests, tools).
    pub fn create(job: Job) -> Write {
        Write::CreateJob { job: Box::new(job), events: Vec::new() }
    }

    /// An update without events (tests, tools).
    pub fn update(job: Job, expected_version: u64) -> Write {
        Write::UpdateJob { job: Box::new(job), expected_version, events: Vec::new() }
    }
}

/// What happened to one write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOutcome {
    Applied,
    /// The condition failed: the job is missing or has another version.
    VersionConflict {
        current_version: Option<u64>,
    },
    /// CreateJob whose id, or CreatePool whose name, already exists.
    IdExists,
    /// CreateJob whose idempotency key belongs to another job.
    IdempotencyKeyTaken {
        existing_job_id: String,
    },
}

/// A chunk of a job attempt's output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogChunk {
    pub job_id: String,
    pub attempt: u32,
    pub sequence: u64,
    pub stderr: bool,
    pub data: Bytes,
    /// When the server received it.
    pub time: SystemTime,
    /// When the agent read it, by the agent's clock, if it said (agents
    /// of earlier releases do not).
    pub agent_time: Option<SystemTime>,
}

/// The compact form of a queued job loaded at start-up: enough to route and
/// order it without loading its payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueuedEntry {
    pub id: String,
    pub seq: u64,
    pub queue: String,
    pub priority: Priority,
    pub routing: Routing,
    pub ready_time: SystemTime,
    pub create_time: SystemTime,
}

impl QueuedEntry {
    pub fn of(job: &Job) -> QueuedEntry {
        QueuedEntry {
            id: job.id.clone(),
            seq: job.seq,
            queue: job.spec.queue.clone(),
            priority: job.spec.priority,
            routing: job.spec.routing.clone(),
            ready_time: job.ready_time,
            create_time: job.create_time,
        }
    }
}

/// Which jobs a listing returns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobFilter {
    /// Only this queue.
    pub queue: Option<String>,
    /// Only these states; empty means all.
    pub states: Vec<JobState>,
}

/// One page of a listing; `next` resumes after the last item.
#[derive(Debug, Clone, PartialEq)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next: Option<u64>,
}

/// Job counts of one (queue, state, priority).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CountRow {
    pub queue: String,
    pub state: JobState,
    pub priority: Priority,
    pub count: u64,
}

/// Agent listing filter.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentFilter {
    pub pool: Option<String>,
    pub labels: BTreeMap<String, String>,
}

/// What one stored job may hold on this backend; requests beyond it are
/// refused with a precise error before anything is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreLimits {
    pub max_payload_bytes: usize,
    pub max_result_bytes: usize,
}

impl Default for StoreLimits {
    fn default() -> Self {
        StoreLimits {
            max_payload_bytes: crate::domain::validate::MAX_PAYLOAD_BYTES,
            max_result_bytes: crate::domain::validate::MAX_RESULT_BYTES,
        }
    }
}

/// Who holds the authoritative state of a store's data: decided by the
/// backend, it sets how the engine uses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ownership {
    /// One process owns the store (a file lock): its memory is
    /// authoritative and the store is its journal, so an assignment may be
    /// pushed before its claim is durable and a failed condition is a bug.
    Exclusive,
    /// Several replicas share the store: its conditional writes are the only
    /// arbiter, an assignment is pushed only after its claim applied, and a
    /// failed condition is a normal outcome (another replica got there
    /// first) returned to the operation that caused it.
    Shared,
}

/// Counter names.
pub const COUNTER_SEQ: &str = "job_seq";
pub const COUNTER_FENCING: &str = "fencing_token";

/// The storage interface. Implementations must pass
/// the conformance suite (`store_conformance_suite!`).
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Applies each write conditionally, in order; durable on return.
    async fn write(&self, batch: Vec<Write>) -> StoreResult<Vec<WriteOutcome>>;

    async fn get_job(&self, id: &str) -> StoreResult<Option<Job>>;
    /// The jobs of `ids` that exist and decode (a corrupt one is logged
    /// and left out, so it cannot hide the others), each once, in no
    /// particular order, each as strongly read as `get_job`. Backends with
    /// a batched read override it.
    async fn get_jobs(&self, ids: &[String]) -> StoreResult<Vec<Job>> {
        let mut unique: Vec<&String> = ids.iter().collect();
        unique.sort();
        unique.dedup();
        let mut jobs = Vec::with_capacity(unique.len());
        for id in unique {
            let read = self.get_job(id).await;
            if let Some(job) = codec::skip_corrupt(format_args!("job {id}"), read)?.flatten() {
                jobs.push(job);
            }
        }
        Ok(jobs)
    }
    /// The job holding `key` in `queue`, if any.
    async fn find_by_idempotency_key(&self, queue: &str, key: &str) -> StoreResult<Option<Job>>;
    /// Jobs newest first, resuming before `before_seq`.
    async fn list_jobs(&self, filter: &JobFilter, before_seq: Option<u64>, limit: usize) -> StoreResult<Page<Job>>;
    /// Dead letters oldest first, resuming after `after_seq`.
    async fn list_dead_letters(
        &self,
        queue: Option<&str>,
        after_seq: Option<u64>,
        limit: usize,
    ) -> StoreResult<Page<Job>>;
    /// Every queued job in compact form (start-up).
    async fn load_queued(&self) -> StoreResult<Vec<QueuedEntry>>;
    /// Every claimed or running job (start-up, and sweeps of shared stores).
    async fn load_active(&self) -> StoreResult<Vec<Job>>;
    /// Queued jobs after `after_seq` in seq order, at most about `limit`
    /// (a sweep's bounded look at the ready index: it costs the same
    /// however long the queue), and where the next look resumes (`None`:
    /// nothing beyond them, start over).
    async fn queued_after(&self, after_seq: u64, limit: usize) -> StoreResult<(Vec<QueuedEntry>, Option<u64>)> {
        let mut queued: Vec<QueuedEntry> =
            self.load_queued().await?.into_iter().filter(|e| e.seq > after_seq).collect();
        queued.sort_by_key(|e| e.seq);
        let more = queued.len() > limit;
        queued.truncate(limit);
        let next = if more { queued.last().map(|e| e.seq) } else { None };
        Ok((queued, next))
    }
    /// Counts of every (queue, state, priority) with a non-zero count.
    async fn counts(&self) -> StoreResult<Vec<CountRow>>;
    /// The log chunks of one attempt, in sequence order.
    async fn logs(&self, job_id: &str, attempt: u32) -> StoreResult<Vec<LogChunk>>;
    /// The log chunks of one attempt after sequence `after`, in order (a
    /// follower's read of what is new, without the chunks it sent).
    /// Backends with a range read override it.
    async fn logs_after(&self, job_id: &str, attempt: u32, after: u64) -> StoreResult<Vec<LogChunk>> {
        let mut chunks = self.logs(job_id, attempt).await?;
        chunks.retain(|c| c.sequence > after);
        Ok(chunks)
    }

    async fn get_agent(&self, id: &str) -> StoreResult<Option<Agent>>;
    async fn find_agent_by_name(&self, pool: &str, name: &str) -> StoreResult<Option<Agent>>;
    /// Agents ordered by id, resuming after `after_id`.
    async fn list_agents(&self, filter: &AgentFilter, after_id: Option<&str>, limit: usize) -> StoreResult<Vec<Agent>>;

    /// Every pool, by name.
    async fn list_pools(&self) -> StoreResult<Vec<Pool>>;

    /// One record, as strongly read as `get_job`.
    async fn get_record(&self, collection: &str, id: &str) -> StoreResult<Option<Record>>;
    /// Up to `limit` records of a collection in `order` of id, starting
    /// after `start_after` in that order (exclusive), strongly read.
    async fn list_records(
        &self,
        collection: &str,
        order: RecordOrder,
        start_after: Option<&str>,
        limit: usize,
    ) -> StoreResult<Vec<Record>>;

    /// A high-water mark; 0 if never raised.
    async fn counter(&self, name: &'static str) -> StoreResult<u64>;

    /// Shards of the event log: a cursor names a position in each.
    fn event_shards(&self) -> u32 {
        1
    }
    /// The cursor of the present: every shard's last event.
    async fn event_heads(&self) -> StoreResult<EventCursor>;
    /// Up to about `limit` events after `after` per shard (whole groups).
    /// A cursor of another shard count is refused (`Rejected`).
    async fn read_events(&self, after: &EventCursor, limit: usize) -> StoreResult<EventRead>;
    /// Trims events whose group is older than `before` from the front of
    /// every shard of both logs (jobs, activity), at most about `limit`
    /// groups per log per call, and raises the low-water marks past them.
    async fn trim_events(&self, before: SystemTime, limit: usize) -> StoreResult<Trimmed>;

    /// Shards of the activity log (no default: a wrapper that forgot it
    /// would break every cursor of a store with several).
    fn activity_shards(&self) -> u32;
    /// The activity log's present.
    async fn activity_heads(&self) -> StoreResult<EventCursor>;
    /// Up to about `limit` activity entries after `after` per shard (whole
    /// groups), as [`Store::read_events`] reads the job log.
    async fn read_activity(&self, after: &EventCursor, limit: usize) -> StoreResult<LogRead<ActivityEvent>>;

    /// The sizes a job record may reach on this backend.
    fn limits(&self) -> StoreLimits {
        StoreLimits::default()
    }

    /// Whether one process owns the data or several replicas share it.
    fn ownership(&self) -> Ownership {
        Ownership::Exclusive
    }
}
