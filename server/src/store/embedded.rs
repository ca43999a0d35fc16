//! The embedded store: one redb file, written by one thread that groups the
//! batches of concurrent callers into a single transaction (group commit,
//! `writer`). A batch is acknowledged only after its group is durable in the
//! journal (`journal`), so acknowledged writes survive `kill -9` and power
//! loss. Reads see every applied group, a moment before it is acknowledged
//! (memory is authoritative on this exclusive store anyway), except the
//! event log, which a cursor reads only up to what was acknowledged.

use std::fmt::Display;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::thread;

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::oneshot;

use super::activity::ActivityGroup;
use super::codec::{decode, decode_job, priority_from_code, skip_corrupt, state_from_code, FORMAT_V1};
use super::events::{EventGroup, LogGroup};
use super::{
    check_record_writes, ActivityEvent, AgentFilter, CountRow, EventCursor, EventRead, JobFilter, LogChunk, LogRead,
    Page, QueuedEntry, Record, RecordOrder, Store, StoreError, StoreResult, Trimmed, Write, WriteOutcome,
};
use crate::domain::{Agent, Job, JobState, Pool};

mod journal;
mod schema;
mod writer;
pub use schema::{StoredSchema, RELEASE, SCHEMA_VERSION, UNVERSIONED};

const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("jobs");
/// (state code, seq) -> QueuedEntry of the job in that state.
const STATE_INDEX: TableDefinition<(u8, u64), &[u8]> = TableDefinition::new("jobs_by_state");
/// (queue, idempotency key) -> job id.
const IDEMPOTENCY: TableDefinition<(&str, &str), &str> = TableDefinition::new("idempotency_keys");
/// (queue, state code, priority code) -> count.
const COUNTS: TableDefinition<(&str, u8, u8), u64> = TableDefinition::new("job_counts");
/// (job id, attempt, sequence) -> LogChunk.
const LOGS: TableDefinition<(&str, u32, u64), &[u8]> = TableDefinition::new("job_logs");
const AGENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("agents");
/// (pool, name) -> agent id.
const AGENT_NAMES: TableDefinition<(&str, &str), &str> = TableDefinition::new("agent_names");
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");
const POOLS: TableDefinition<&str, &[u8]> = TableDefinition::new("pools");
/// (collection, id) -> Record (codec-encoded, whole).
const RECORDS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("records");
/// The job event log, one shard: last seq of a group -> EventGroup.
const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("job_events");
/// Counters of the event log: the last seq written, and the last trimmed.
const EVENT_HEAD: &str = "event_head";
const EVENT_LOW_WATER: &str = "event_low_water";
/// The activity log, one shard: last seq of a group -> ActivityGroup.
const ACTIVITY: TableDefinition<u64, &[u8]> = TableDefinition::new("activity_log");
const ACTIVITY_HEAD: &str = "activity_head";
const ACTIVITY_LOW_WATER: &str = "activity_low_water";

/// One of the store's two logs (`super::events`, `super::activity`): its
/// table and the counter of its low-water mark.
#[derive(Clone, Copy)]
struct LogTables {
    table: TableDefinition<'static, u64, &'static [u8]>,
    low_water: &'static str,
    name: &'static str,
}

const JOB_LOG: LogTables = LogTables { table: EVENTS, low_water: EVENT_LOW_WATER, name: "event group" };
const ACTIVITY_LOG: LogTables = LogTables { table: ACTIVITY, low_water: ACTIVITY_LOW_WATER, name: "activity group" };

/// Each log's head as far as it was acknowledged: cursors read no further
/// (see `writer::Writer`).
#[derive(Debug, Default)]
struct AckedHeads {
    jobs: AtomicU64,
    activity: AtomicU64,
}

/// redb's page cache (read cache and write buffer). redb's default, 1 GiB,
/// let a live server keep every page it wrote (~330 bytes per queued job);
/// the pages a commit touches are few and recent, and the OS caches the
/// file besides.
const CACHE_BYTES: usize = 32 << 20;

/// How the store syncs commits to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    /// Every group is synced (to the journal) before it is acknowledged
    /// (the default).
    Always,
    /// Groups are synced only every `n`th time: faster, but a crash can lose
    /// acknowledged writes. For benchmarks and throwaway setups only.
    EveryNth(u32),
}

/// Options of the embedded store.
#[derive(Debug, Clone)]
pub struct EmbeddedOptions {
    pub sync: SyncMode,
    /// Most caller batches grouped into one transaction.
    pub max_group: usize,
}

impl Default for EmbeddedOptions {
    fn default() -> Self {
        EmbeddedOptions { sync: SyncMode::Always, max_group: 512 }
    }
}

/// The embedded, single-file store.
pub struct EmbeddedStore {
    db: Arc<Database>,
    /// `None` only while dropping.
    writer: Option<std_mpsc::Sender<writer::WriteRequest>>,
    writer_thread: Option<thread::JoinHandle<()>>,
    path: PathBuf,
    heads: Arc<AckedHeads>,
}

impl Drop for EmbeddedStore {
    fn drop(&mut self) {
        // Closing the channel ends the writer after its last group; joining
        // it releases the file lock before the store is reopened.
        self.writer.take();
        if let Some(thread) = self.writer_thread.take() {
            let _ = thread.join();
        }
    }
}

/// Up to about `limit` events of `log` after `after`, none past `head`.
fn read_log<G: LogGroup>(
    db: &Database,
    log: LogTables,
    head: u64,
    after: u64,
    limit: usize,
) -> StoreResult<LogRead<G::Event>> {
    let txn = db.begin_read().map_err(io_err)?;
    let counters = txn.open_table(COUNTERS).map_err(io_err)?;
    let low_water = counters.get(log.low_water).map_err(io_err)?.map(|v| v.value()).unwrap_or(0);
    if after > head {
        return Ok(LogRead::Unknown);
    }
    if after < low_water {
        return Ok(LogRead::Expired);
    }
    if after == head {
        return Ok(LogRead::Events { events: Vec::new(), next: EventCursor { positions: vec![after] } });
    }
    let table = txn.open_table(log.table).map_err(io_err)?;
    let mut events = Vec::new();
    let mut position = after;
    for row in table.range(after.saturating_add(1)..=head).map_err(io_err)? {
        if events.len() >= limit.max(1) {
            break;
        }
        let (key, value) = row.map_err(io_err)?;
        let group: G =
            decode(value.value()).map_err(|e| StoreError::Corrupt(format!("{} {}: {e}", log.name, key.value())))?;
        // Sequence numbers are dense: a hole is a trimmed group.
        if group.first_seq() > position + 1 {
            return Ok(LogRead::Expired);
        }
        group.events_after(0, position, &mut events);
        position = key.value();
    }
    Ok(LogRead::Events { events, next: EventCursor { positions: vec![position] } })
}

fn io_err(e: impl Display) -> StoreError {
    StoreError::Io(e.to_string())
}

impl EmbeddedStore {
    /// Opens (or creates) the store under `dir`. A store of a newer schema
    /// version than [`SCHEMA_VERSION`] is refused before anything else is
    /// read ([`StoreError::NewerSchema`]); an older one is migrated first.
    pub fn open(dir: &Path, options: EmbeddedOptions) -> StoreResult<EmbeddedStore> {
        std::fs::create_dir_all(dir).map_err(|e| io_err(format!("create {}: {e}", dir.display())))?;
        let path = dir.join("tether.redb");
        let db = redb::Builder::new().set_cache_size(CACHE_BYTES).create(&path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => StoreError::InUse(dir.display().to_string()),
            e => io_err(format!("open {}: {e}", path.display())),
        })?;
        schema::check_and_migrate(&db, &path.display().to_string())?;
        {
            let txn = db.begin_write().map_err(io_err)?;
            // Creates the tables of a new store and records this release as
            // the last writer.
            schema::stamp(&txn, SCHEMA_VERSION)?;
            txn.open_table(JOBS).map_err(io_err)?;
            txn.open_table(STATE_INDEX).map_err(io_err)?;
            txn.open_table(IDEMPOTENCY).map_err(io_err)?;
            txn.open_table(COUNTS).map_err(io_err)?;
            txn.open_table(LOGS).map_err(io_err)?;
            txn.open_table(AGENTS).map_err(io_err)?;
            txn.open_table(AGENT_NAMES).map_err(io_err)?;
            txn.open_table(COUNTERS).map_err(io_err)?;
            txn.open_table(POOLS).map_err(io_err)?;
            txn.open_table(EVENTS).map_err(io_err)?;
            txn.open_table(RECORDS).map_err(io_err)?;
            txn.open_table(ACTIVITY).map_err(io_err)?;
            txn.commit().map_err(io_err)?;
        }
        let db = Arc::new(db);
        let (journal, records) = journal::Journal::open(dir)?;
        let heads = Arc::new(AckedHeads::default());
        let recovered = writer::Writer::recover(db.clone(), options, journal, records, heads.clone())?;
        let (writer, requests) = std_mpsc::channel();
        let writer_thread = thread::Builder::new()
            .name("tether-store-writer".into())
            .spawn(move || recovered.run(&requests))
            .map_err(io_err)?;
        Ok(EmbeddedStore { db, writer: Some(writer), writer_thread: Some(writer_thread), path, heads })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn read<T, F>(&self, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Database) -> StoreResult<T> + Send + 'static,
    {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db)).await.map_err(|e| io_err(format!("read task: {e}")))?
    }
}

/// The job id of a state-index entry: an encoded [`QueuedEntry`] (starts
/// with the format byte; every entry written before this layout) or the bare
/// id (job ids are UUID strings, which never start with that byte).
fn index_id(value: &[u8]) -> StoreResult<String> {
    if value.first() == Some(&FORMAT_V1) {
        return decode::<QueuedEntry>(value).map(|entry| entry.id);
    }
    std::str::from_utf8(value)
        .map(str::to_string)
        .map_err(|_| StoreError::Corrupt("state index entry is neither a queued entry nor a job id".into()))
}

/// `Ok(None)` for a record that does not decode (logged, with `what` it
/// is), so one bad record cannot stop a start-up or a listing; I/O errors
/// stay errors.
/// The job an index entry names, skipping what does not decode.
fn read_indexed(
    jobs: &impl ReadableTable<&'static str, &'static [u8]>,
    key: (u8, u64),
    value: &[u8],
) -> StoreResult<Option<Job>> {
    let Some(id) = skip_corrupt(format_args!("state index entry {key:?}"), index_id(value))? else {
        return Ok(None);
    };
    Ok(skip_corrupt(format_args!("job {id}"), read_job(jobs, &id))?.flatten())
}

/// The keys of `collection`'s records after `start_after` in `order`.
/// `after_collection` is the collection's name followed by a NUL, the
/// least string greater than it: `(after_collection, "")` is above every
/// key of the collection and below every key of any other (tuples compare
/// element by element), so no other collection's record is in range, not
/// even one whose name extends this one's.
fn record_bounds<'a>(
    collection: &'a str,
    after_collection: &'a str,
    order: RecordOrder,
    start_after: Option<&'a str>,
) -> (Bound<RecordKey<'a>>, Bound<RecordKey<'a>>) {
    let first = Bound::Included((collection, ""));
    let end = Bound::Excluded((after_collection, ""));
    match (order, start_after) {
        (_, None) => (first, end),
        (RecordOrder::Ascending, Some(id)) => (Bound::Excluded((collection, id)), end),
        (RecordOrder::Descending, Some(id)) => (first, Bound::Excluded((collection, id))),
    }
}

/// Up to `limit` records of `rows`, skipping (logged) those that do not
/// decode, as the other listings do.
fn decode_records<'a>(
    rows: impl Iterator<Item = Result<RecordRow<'a>, redb::StorageError>>,
    limit: usize,
) -> StoreResult<Vec<Record>> {
    let mut out = Vec::new();
    for row in rows {
        if out.len() >= limit {
            break;
        }
        let (key, value) = row.map_err(io_err)?;
        let (collection, id) = key.value();
        if let Some(record) = skip_corrupt(format_args!("record {collection}/{id}"), decode(value.value()))? {
            out.push(record);
        }
    }
    Ok(out)
}

/// A key of [`RECORDS`]: (collection, id).
type RecordKey<'a> = (&'a str, &'a str);

/// A row of [`RECORDS`] as a range yields it.
type RecordRow<'a> = (redb::AccessGuard<'a, (&'static str, &'static str)>, redb::AccessGuard<'a, &'static [u8]>);

fn read_job(jobs: &impl ReadableTable<&'static str, &'static [u8]>, id: &str) -> StoreResult<Option<Job>> {
    match jobs.get(id).map_err(io_err)? {
        Some(bytes) => decode_job(bytes.value()).map(Some),
        None => Ok(None),
    }
}

impl EmbeddedStore {
    /// The chunks of one attempt from sequence `first` on: one range read.
    async fn logs_from(&self, job_id: &str, attempt: u32, first: u64) -> StoreResult<Vec<LogChunk>> {
        let job_id = job_id.to_string();
        self.read(move |db| {
            let txn = db.begin_read().map_err(io_err)?;
            let logs = txn.open_table(LOGS).map_err(io_err)?;
            let mut out = Vec::new();
            for row in
                logs.range((job_id.as_str(), attempt, first)..=(job_id.as_str(), attempt, u64::MAX)).map_err(io_err)?
            {
                let (_, value) = row.map_err(io_err)?;
                out.push(super::codec::decode_log(value.value())?);
            }
            Ok(out)
        })
        .await
    }
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn write(&self, batch: Vec<Write>) -> StoreResult<Vec<WriteOutcome>> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        check_record_writes(&batch)?;
        let (reply, outcome) = oneshot::channel();
        let writer = self.writer.as_ref().ok_or(StoreError::Closed)?;
        writer.send(writer::WriteRequest::Batch { batch, reply }).map_err(|_| StoreError::Closed)?;
        outcome.await.map_err(|_| StoreError::Closed)?
    }

    async fn event_heads(&self) -> StoreResult<EventCursor> {
        Ok(EventCursor { positions: vec![self.heads.jobs.load(Ordering::Acquire)] })
    }

    async fn read_events(&self, after: &EventCursor, limit: usize) -> StoreResult<EventRead> {
        after.check_shards(1)?;
        // Loaded before the read: the groups up to it are in the database.
        let head = self.heads.jobs.load(Ordering::Acquire);
        let after = after.positions[0];
        self.read(move |db| read_log::<EventGroup>(db, JOB_LOG, head, after, limit)).await
    }

    fn activity_shards(&self) -> u32 {
        1
    }

    async fn activity_heads(&self) -> StoreResult<EventCursor> {
        Ok(EventCursor { positions: vec![self.heads.activity.load(Ordering::Acquire)] })
    }

    async fn read_activity(&self, after: &EventCursor, limit: usize) -> StoreResult<LogRead<ActivityEvent>> {
        after.check_shards(1)?;
        let head = self.heads.activity.load(Ordering::Acquire);
        let after = after.positions[0];
        self.read(move |db| read_log::<ActivityGroup>(db, ACTIVITY_LOG, head, after, limit)).await
    }

    async fn trim_events(&self, before: std::time::SystemTime, limit: usize) -> StoreResult<Trimmed> {
        let (reply, outcome) = oneshot::channel();
        let writer = self.writer.as_ref().ok_or(StoreError::Closed)?;
        writer.send(writer::WriteRequest::Trim { before, limit, reply }).map_err(|_| StoreError::Closed)?;
        outcome.await.map_err(|_| StoreError::Closed)?
    }

    async fn get_job(&self, id: &str) -> StoreResult<Option<Job>> {
        let id = id.to_string();
        self.read(move |db| {
            let txn = db.begin_read().map_err(io_err)?;
            read_job(&txn.open_table(JOBS).map_err(io_err)?, &id)
        })
        .await
    }

    async fn find_by_idempotency_key(&self, queue: &str, key: &str) -> StoreResult<Option<Job>> {
        let (queue, key) = (queue.to_string(), key.to_string());
        self.read(move |db| {
            let txn = db.begin_read().map_err(io_err)?;
            let keys = txn.open_table(IDEMPOTENCY).map_err(io_err)?;
            let Some(id) = keys.get((queue.as_str(), key.as_str())).map_err(io_err)? else {
                return Ok(None);
            };
            read_job(&txn.open_table(JOBS).map_err(io_err)?, id.value())
        })
        .await
    }

    async fn list_jobs(&self, filter: &JobFilter, before_seq: Option<u64>, limit: usize) -> StoreResult<Page<Job>> {
        let filter = filter.clone();
        self.read(move |db| {
            let txn = db.begin_read().map_err(io_err)?;
            let index = txn.open_table(STATE_INDEX).map_err(io_err)?;
            let jobs = txn.open_table(JOBS).map_err(io_err)?;
            let states = if filter.states.is_empty() { JobState::ALL.to_vec() } else { filter.states.clone() };
            let end = before_seq.unwrap_or(u64::MAX);
            // Merge the per-state index ranges, newest (highest seq) first.
            let mut ranges = Vec::new();
            for state in states {
                ranges.push(index.range((state.code(), 0)..(state.code(), end)).map_err(io_err)?.rev().peekable());
            }
            let mut items = Vec::new();
            let mut last_seq = None;
            loop {
                let mut best: Option<(usize, u64)> = None;
                for (i, range) in ranges.iter_mut().enumerate() {
                    if let Some(Ok((key, _))) = range.peek() {
                        let seq = key.value().1;
                        if best.is_none_or(|(_, b)| seq > b) {
                            best = Some((i, seq));
                        }
                    } else if let Some(Err(_)) = range.peek() {
                        if let Some(Err(e)) = range.next() {
                            return Err(io_err(e));
                        }
                    }
                }
                let Some((i, seq)) = best else { break };
                let Some(Ok((key, value))) = ranges[i].next() else { break };
                let Some(job) = read_indexed(&jobs, key.value(), value.value())? else { continue };
                if filter.queue.as_ref().is_some_and(|q| *q != job.spec.queue) {
                    continue;
                }
                if items.len() == limit {
                    return Ok(Page { items, next: last_seq });
                }
                items.push(job);
                last_seq = Some(seq);
            }
            Ok(Page { items, next: None })
        })
        .await
    }

    async fn list_dead_letters(
        &self,
        queue: Option<&str>,
        after_seq: Option<u64>,
        limit: usize,
    ) -> StoreResult<Page<Job>> {
        let queue = queue.map(str::to_string);
        self.read(move |db| {
            let txn = db.begin_read().map_err(io_err)?;
            let index = txn.open_table(STATE_INDEX).map_err(io_err)?;
            let jobs = txn.open_table(JOBS).map_err(io_err)?;
            let code = JobState::DeadLettered.code();
            let start = after_seq.map_or(0, |s| s.saturating_add(1));
            let mut items = Vec::new();
            let mut last_seq = None;
            for row in index.range((code, start)..=(code, u64::MAX)).map_err(io_err)? {
                let (key, value) = row.map_err(io_err)?;
                let Some(job) = read_indexed(&jobs, key.value(), value.value())? else { continue };
                if queue.as_ref().is_some_and(|q| *q != job.spec.queue) {
                    continue;
                }
                if items.len() == limit {
                    return Ok(Page { items, next: last_seq });
                }
                items.push(job);
                last_seq = Some(key.value().1);
            }
            Ok(Page { items, next: None })
        })
        .await
    }

    async fn load_queued(&self) -> StoreResult<Vec<QueuedEntry>> {
        self.read(|db| {
            let txn = db.begin_read().map_err(io_err)?;
            let index = txn.open_table(STATE_INDEX).map_err(io_err)?;
            let code = JobState::Queued.code();
            let mut out = Vec::new();
            for row in index.range((code, 0)..=(code, u64::MAX)).map_err(io_err)? {
                let (key, value) = row.map_err(io_err)?;
                let what = format_args!("queued entry {:?}", key.value());
                if let Some(entry) = skip_corrupt(what, decode(value.value()))? {
                    out.push(entry);
                }
            }
            Ok(out)
        })
        .await
    }

    async fn load_active(&self) -> StoreResult<Vec<Job>> {
        self.read(|db| {
            let txn = db.begin_read().map_err(io_err)?;
            let index = txn.open_table(STATE_INDEX).map_err(io_err)?;
            let jobs = txn.open_table(JOBS).map_err(io_err)?;
            let mut out = Vec::new();
            for state in [JobState::Claimed, JobState::Running] {
                let code = state.code();
                for row in index.range((code, 0)..=(code, u64::MAX)).map_err(io_err)? {
                    let (key, value) = row.map_err(io_err)?;
                    match read_indexed(&jobs, key.value(), value.value())? {
                        Some(job) => out.push(job),
                        None => tracing::error!(entry = ?key.value(), "the state index names a job that is missing or unreadable"),
                    }
                }
            }
            Ok(out)
        })
        .await
    }

    async fn counts(&self) -> StoreResult<Vec<CountRow>> {
        self.read(|db| {
            let txn = db.begin_read().map_err(io_err)?;
            let counts = txn.open_table(COUNTS).map_err(io_err)?;
            let mut out = Vec::new();
            for row in counts.iter().map_err(io_err)? {
                let (key, value) = row.map_err(io_err)?;
                let (queue, state, priority) = key.value();
                let what = format_args!("count row ({queue:?}, {state}, {priority})");
                let codes = state_from_code(state).and_then(|s| Ok((s, priority_from_code(priority)?)));
                if let Some((state, priority)) = skip_corrupt(what, codes)? {
                    out.push(CountRow { queue: queue.to_string(), state, priority, count: value.value() });
                }
            }
            Ok(out)
        })
        .await
    }

    async fn logs(&self, job_id: &str, attempt: u32) -> StoreResult<Vec<LogChunk>> {
        self.logs_from(job_id, attempt, 0).await
    }

    async fn logs_after(&self, job_id: &str, attempt: u32, after: u64) -> StoreResult<Vec<LogChunk>> {
        match after.checked_add(1) {
            Some(first) => self.logs_from(job_id, attempt, first).await,
            None => Ok(Vec::new()),
        }
    }

    async fn get_agent(&self, id: &str) -> StoreResult<Option<Agent>> {
        let id = id.to_string();
        self.read(move |db| {
            let txn = db.begin_read().map_err(io_err)?;
            let agents = txn.open_table(AGENTS).map_err(io_err)?;
            let value = agents.get(id.as_str()).map_err(io_err)?;
            value.map(|v| decode(v.value())).transpose()
        })
        .await
    }

    async fn find_agent_by_name(&self, pool: &str, name: &str) -> StoreResult<Option<Agent>> {
        let (pool, name) = (pool.to_string(), name.to_string());
        self.read(move |db| {
            let txn = db.begin_read().map_err(io_err)?;
            let names = txn.open_table(AGENT_NAMES).map_err(io_err)?;
            let Some(id) = names.get((pool.as_str(), name.as_str())).map_err(io_err)? else {
                return Ok(None);
            };
            let agents = txn.open_table(AGENTS).map_err(io_err)?;
            let value = agents.get(id.value()).map_err(io_err)?;
            value.map(|v| decode(v.value())).transpose()
        })
        .await
    }

    async fn list_agents(&self, filter: &AgentFilter, after_id: Option<&str>, limit: usize) -> StoreResult<Vec<Agent>> {
        let filter = filter.clone();
        let after = after_id.map(str::to_string);
        self.read(move |db| {
            let txn = db.begin_read().map_err(io_err)?;
            let agents = txn.open_table(AGENTS).map_err(io_err)?;
            let mut out = Vec::new();
            let rows = match &after {
                Some(a) => agents.range::<&str>((std::ops::Bound::Excluded(a.as_str()), std::ops::Bound::Unbounded)),
                None => agents.range::<&str>(..),
            }
            .map_err(io_err)?;
            for row in rows {
                let (key, value) = row.map_err(io_err)?;
                let Some(agent) = skip_corrupt(format_args!("agent {}", key.value()), decode::<Agent>(value.value()))?
                else {
                    continue;
                };
                if filter.pool.as_ref().is_some_and(|p| *p != agent.pool) {
                    continue;
                }
                if !filter.labels.iter().all(|(k, v)| agent.labels.get(k) == Some(v)) {
                    continue;
                }
                out.push(agent);
                if out.len() == limit {
                    break;
                }
            }
            Ok(out)
        })
        .await
    }

    async fn list_pools(&self) -> StoreResult<Vec<Pool>> {
        self.read(|db| {
            let txn = db.begin_read().map_err(io_err)?;
            let pools = txn.open_table(POOLS).map_err(io_err)?;
            let mut out = Vec::new();
            for row in pools.iter().map_err(io_err)? {
                let (key, value) = row.map_err(io_err)?;
                if let Some(pool) = skip_corrupt(format_args!("pool {}", key.value()), decode(value.value()))? {
                    out.push(pool);
                }
            }
            Ok(out)
        })
        .await
    }

    async fn get_record(&self, collection: &str, id: &str) -> StoreResult<Option<Record>> {
        let (collection, id) = (collection.to_string(), id.to_string());
        self.read(move |db| {
            let txn = db.begin_read().map_err(io_err)?;
            let records = txn.open_table(RECORDS).map_err(io_err)?;
            let value = records.get((collection.as_str(), id.as_str())).map_err(io_err)?;
            value.map(|v| decode(v.value())).transpose()
        })
        .await
    }

    async fn list_records(
        &self,
        collection: &str,
        order: RecordOrder,
        start_after: Option<&str>,
        limit: usize,
    ) -> StoreResult<Vec<Record>> {
        let (collection, start_after) = (collection.to_string(), start_after.map(str::to_string));
        self.read(move |db| {
            let txn = db.begin_read().map_err(io_err)?;
            let records = txn.open_table(RECORDS).map_err(io_err)?;
            let after_collection = format!("{collection}\0");
            let bounds = record_bounds(&collection, &after_collection, order, start_after.as_deref());
            let rows = records.range::<(&str, &str)>(bounds).map_err(io_err)?;
            match order {
                RecordOrder::Ascending => decode_records(rows, limit),
                RecordOrder::Descending => decode_records(rows.rev(), limit),
            }
        })
        .await
    }

    async fn counter(&self, name: &'static str) -> StoreResult<u64> {
        self.read(move |db| {
            let txn = db.begin_read().map_err(io_err)?;
            let counters = txn.open_table(COUNTERS).map_err(io_err)?;
            Ok(counters.get(name).map_err(io_err)?.map(|v| v.value()).unwrap_or(0))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::codec::JOB_FORMAT_V2;
    use crate::store::conformance;

    mod conformance_suite {
        use super::*;

        crate::store_conformance_suite!(|_case: &'static str| async {
            let dir = tempfile::tempdir().expect("tempdir");
            let store = EmbeddedStore::open(dir.path(), EmbeddedOptions::default()).expect("open");
            (store, dir)
        });
    }

    #[test]
    fn a_second_owner_of_one_directory_is_refused_with_a_clear_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let _first = EmbeddedStore::open(dir.path(), EmbeddedOptions::default()).expect("open");
        let second = EmbeddedStore::open(dir.path(), EmbeddedOptions::default()).err().expect("refused");
        assert!(matches!(second, StoreError::InUse(_)), "{second:?}");
        assert!(second.to_string().contains("in use by another tether server"), "{second}");
        assert!(!second.is_retryable());
    }

    #[tokio::test]
    async fn acknowledged_writes_survive_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = EmbeddedStore::open(dir.path(), EmbeddedOptions::default()).expect("open");
            let job = conformance::job("a", 1, "q", Some("key"));
            let outcomes = store.write(vec![Write::create(job)]).await.expect("write");
            assert_eq!(outcomes, vec![WriteOutcome::Applied]);
        }
        let store = EmbeddedStore::open(dir.path(), EmbeddedOptions::default()).expect("reopen");
        assert_eq!(store.get_job("a").await.expect("get").map(|j| j.spec.queue), Some("q".into()));
        assert!(store.find_by_idempotency_key("q", "key").await.expect("find").is_some());
    }

    /// The files of a live store, copied as a crash would leave them: what
    /// the OS holds of them, without whatever the process kept in memory.
    fn crash_image(from: &Path) -> tempfile::TempDir {
        let image = tempfile::tempdir().expect("tempdir");
        for name in ["tether.redb", journal::FILE_NAME] {
            std::fs::copy(from.join(name), image.path().join(name)).expect("copy");
        }
        image
    }

    #[tokio::test]
    async fn acknowledged_writes_survive_a_crash_through_the_journal() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = EmbeddedStore::open(dir.path(), EmbeddedOptions::default()).expect("open");
        let mut job = conformance::job("a", 1, "q", Some("key"));
        assert_eq!(store.write(vec![Write::create(job.clone())]).await.expect("write"), vec![WriteOutcome::Applied]);
        for version in 2..=40 {
            let mut next = job.clone();
            next.version = version;
            next.attempt = version as u32;
            let outcome = store.write(vec![Write::update(next.clone(), version - 1)]).await.expect("write");
            assert_eq!(outcome, vec![WriteOutcome::Applied]);
            job = next;
        }
        let pool = Pool { name: "p".into(), ..Pool::default_pool(std::time::UNIX_EPOCH) };
        store.write(vec![Write::PutPool(Box::new(pool.clone()))]).await.expect("write");
        // A group large enough to skip the journal (a durable commit), then
        // journaled ones again.
        let many: Vec<Write> =
            (0..70).map(|i| Write::create(conformance::job(&format!("m{i}"), 100 + i, "q", None))).collect();
        assert_eq!(store.write(many).await.expect("write"), vec![WriteOutcome::Applied; 70]);
        store.write(vec![Write::create(conformance::job("after", 200, "q", None))]).await.expect("write");
        let image = crash_image(dir.path());
        drop(store);
        let recovered = EmbeddedStore::open(image.path(), EmbeddedOptions::default()).expect("open the image");
        assert_eq!(recovered.get_job("a").await.expect("get"), Some(job), "every acknowledged update");
        assert!(recovered.find_by_idempotency_key("q", "key").await.expect("find").is_some());
        assert_eq!(recovered.list_pools().await.expect("pools").iter().filter(|p| p.name == "p").count(), 1);
        assert!(recovered.get_job("m69").await.expect("get").is_some());
        assert!(recovered.get_job("after").await.expect("get").is_some());
        // Replayed and checkpointed: the journal is empty and the next
        // writes continue the same sequence.
        let mut next = recovered.get_job("a").await.expect("get").expect("job");
        next.version = 41;
        assert_eq!(recovered.write(vec![Write::update(next, 40)]).await.expect("write"), vec![WriteOutcome::Applied]);
        let again = crash_image(image.path());
        drop(recovered);
        let reopened = EmbeddedStore::open(again.path(), EmbeddedOptions::default()).expect("open");
        assert_eq!(reopened.get_job("a").await.expect("get").map(|j| j.version), Some(41));
    }

    #[tokio::test]
    async fn acknowledged_record_writes_survive_a_crash_through_the_journal() {
        use crate::store::conformance::{put_record, record};
        let dir = tempfile::tempdir().expect("tempdir");
        let store = EmbeddedStore::open(dir.path(), EmbeddedOptions::default()).expect("open");
        let latest = record("env", "prod", 2, "v2");
        for written in [record("env", "prod", 1, "v1"), latest.clone(), record("env", "dev", 1, "d1")] {
            assert_eq!(store.write(vec![put_record(&written)]).await.expect("write"), [WriteOutcome::Applied]);
        }
        let image = crash_image(dir.path());
        drop(store);
        let recovered = EmbeddedStore::open(image.path(), EmbeddedOptions::default()).expect("open the image");
        assert_eq!(recovered.get_record("env", "prod").await.expect("get"), Some(latest));
        let listed = recovered.list_records("env", RecordOrder::Ascending, None, 10).await.expect("list");
        assert_eq!(listed.iter().map(|r| (r.id.as_str(), r.version)).collect::<Vec<_>>(), [("dev", 1), ("prod", 2)]);
        // The replayed versions are the ones later writes are checked against.
        let stale = record("env", "prod", 2, "stale");
        let outcome = recovered.write(vec![put_record(&stale)]).await.expect("write");
        assert_eq!(outcome, [WriteOutcome::VersionConflict { current_version: Some(2) }]);
    }

    #[tokio::test]
    async fn a_store_that_syncs_only_every_nth_group_replays_what_the_os_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let options = EmbeddedOptions { sync: SyncMode::EveryNth(1000), ..EmbeddedOptions::default() };
        let store = EmbeddedStore::open(dir.path(), options.clone()).expect("open");
        store.write(vec![Write::create(conformance::job("first", 1, "q", None))]).await.expect("write");
        let many: Vec<Write> =
            (0..70).map(|i| Write::create(conformance::job(&format!("m{i}"), 10 + i, "q", None))).collect();
        store.write(many).await.expect("write");
        store.write(vec![Write::create(conformance::job("last", 100, "q", None))]).await.expect("write");
        let image = crash_image(dir.path());
        drop(store);
        // A power loss may lose unsynced groups in this mode; a crashed
        // process leaves them with the OS, and every one is replayed: the
        // large group is journaled too (left out, it would be a gap that
        // ends the replay before `last`).
        let reopened = EmbeddedStore::open(image.path(), options).expect("opens");
        for id in ["first", "m69", "last"] {
            assert!(reopened.get_job(id).await.expect("get").is_some(), "{id}");
        }
    }

    #[tokio::test]
    async fn a_journal_that_skips_acknowledged_groups_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = EmbeddedStore::open(dir.path(), EmbeddedOptions::default()).expect("open");
        store.write(vec![Write::create(conformance::job("a", 1, "q", None))]).await.expect("write");
        let image = crash_image(dir.path());
        drop(store);
        // The database as it was before it held any group, the journal
        // starting later than that.
        let path = image.path().join(journal::FILE_NAME);
        let mut bytes = std::fs::read(&path).expect("read");
        let seq = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes")) + 5;
        let len = u32::from_le_bytes(bytes[0..4].try_into().expect("4 bytes")) as usize;
        let run = u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes"));
        let crc = journal::checksum(seq, run, &bytes[24..24 + len]);
        bytes[4..8].copy_from_slice(&crc.to_le_bytes());
        bytes[8..16].copy_from_slice(&seq.to_le_bytes());
        std::fs::write(&path, &bytes).expect("write");
        let refused = EmbeddedStore::open(image.path(), EmbeddedOptions::default()).err().expect("refused");
        assert!(matches!(refused, StoreError::Corrupt(_)), "{refused:?}");
        assert!(refused.to_string().contains("acknowledged writes are missing"), "{refused}");
    }

    #[test]
    fn index_entries_of_both_layouts_name_their_job() {
        let job = conformance::job("0190-job", 7, "q", None);
        let queued = crate::store::codec::encode(&QueuedEntry::of(&job)).expect("encode");
        assert_eq!(index_id(&queued).expect("queued entry"), "0190-job");
        assert_eq!(index_id(b"0190-job").expect("bare id"), "0190-job");
        assert!(matches!(index_id(&[0xff, 0xfe]), Err(StoreError::Corrupt(_))));
    }

    #[tokio::test]
    async fn corrupt_records_are_reported_not_panicked_on() {
        assert!(matches!(decode_job(&[]), Err(StoreError::Corrupt(_))));
        assert!(matches!(decode_job(&[9, 1, 2]), Err(StoreError::Corrupt(m)) if m.contains("newer")));
        assert!(matches!(decode_job(&[FORMAT_V1, 0xff]), Err(StoreError::Corrupt(_))));
        assert!(matches!(decode_job(&[JOB_FORMAT_V2, 0xff]), Err(StoreError::Corrupt(_))));
    }

    #[tokio::test]
    async fn records_that_do_not_decode_are_skipped_by_start_up_and_listings() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = EmbeddedStore::open(dir.path(), EmbeddedOptions::default()).expect("open");
        let good = conformance::job("good", 1, "q", None);
        let mut active = conformance::job("active", 2, "q", None);
        active.state = JobState::Running;
        let writes = vec![Write::create(good), Write::create(active)];
        assert_eq!(store.write(writes).await.expect("write"), vec![WriteOutcome::Applied; 2]);
        {
            let txn = store.db.begin_write().expect("txn");
            {
                let mut jobs = txn.open_table(JOBS).expect("jobs");
                jobs.insert("broken", [JOB_FORMAT_V2, 0xff, 0xff].as_slice()).expect("insert");
                let mut index = txn.open_table(STATE_INDEX).expect("index");
                // A queued entry that does not decode, an active entry naming
                // the broken job, one naming a missing job.
                index.insert((JobState::Queued.code(), 90), [FORMAT_V1, 0xff].as_slice()).expect("insert");
                index.insert((JobState::Running.code(), 91), b"broken".as_slice()).expect("insert");
                index.insert((JobState::Running.code(), 92), b"missing".as_slice()).expect("insert");
                let mut counts = txn.open_table(COUNTS).expect("counts");
                counts.insert(("q", 99, 1), 5).expect("insert");
                let mut agents = txn.open_table(AGENTS).expect("agents");
                agents.insert("garbled", [FORMAT_V1, 0xff].as_slice()).expect("insert");
            }
            txn.commit().expect("commit");
        }
        let queued = store.load_queued().await.expect("load queued");
        assert_eq!(queued.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(), ["good"]);
        let active = store.load_active().await.expect("load active");
        assert_eq!(active.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(), ["active"]);
        assert!(store.counts().await.expect("counts").iter().all(|r| r.count < 5));
        assert!(store.list_agents(&AgentFilter::default(), None, 10).await.expect("agents").is_empty());
        let listed = store.list_jobs(&JobFilter::default(), None, 10).await.expect("list");
        assert_eq!(listed.items.len(), 2);
        assert!(matches!(store.get_job("broken").await, Err(StoreError::Corrupt(_))), "a direct read says so");
    }

    #[tokio::test]
    async fn jobs_stored_by_the_previous_format_are_read_and_keep_retrying_every_failure() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut job = conformance::job("old", 3, "q", None);
        job.version = 1;
        {
            let store = EmbeddedStore::open(dir.path(), EmbeddedOptions::default()).expect("open");
            // Written as the previous release wrote it.
            let mut record = vec![FORMAT_V1];
            record.extend(super::super::legacy::fixture::encode_v1(&job));
            let txn = store.db.begin_write().expect("txn");
            txn.open_table(JOBS).expect("jobs").insert("old", record.as_slice()).expect("insert");
            txn.commit().expect("commit");
        }
        let store = EmbeddedStore::open(dir.path(), EmbeddedOptions::default()).expect("reopen");
        let read = store.get_job("old").await.expect("get").expect("present");
        assert_eq!(read.spec.retry, crate::domain::RetryPolicy::any());
        let mut expected = job.clone();
        expected.spec.retry = crate::domain::RetryPolicy::any();
        assert_eq!(read, expected);
        // An update rewrites it in today's format.
        let mut next = read.clone();
        next.version = 2;
        let outcome = store.write(vec![Write::update(next, 1)]).await;
        assert_eq!(outcome.expect("write"), vec![WriteOutcome::Applied]);
        assert_eq!(store.get_job("old").await.expect("get").map(|j| j.version), Some(2));
    }
}
