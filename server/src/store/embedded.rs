//! The embedded store: one redb file, written by one thread that groups the
//! batches of concurrent callers into a single transaction and a single disk
//! sync (group commit). A batch is acknowledged only after its transaction
//! is durable, so acknowledged writes survive `kill -9` and power loss.

use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::thread;

use async_trait::async_trait;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::oneshot;

use super::codec::{
    decode, decode_job, encode, encode_into, encode_job_into, priority_code, priority_from_code, skip_corrupt,
    state_from_code, FORMAT_V1,
};
use super::events::EventGroup;
use super::{
    AgentFilter, CountRow, Event, EventCursor, EventRead, JobFilter, LogChunk, Page, QueuedEntry, Store, StoreError,
    StoreResult, Transition, Trimmed, Write, WriteOutcome,
};
use crate::domain::{Agent, Job, JobState, Pool, Priority};

mod schema;
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
/// The job event log, one shard: last seq of a group -> EventGroup.
const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("job_events");
/// Counters of the event log: the last seq written, and the last trimmed.
const EVENT_HEAD: &str = "event_head";
const EVENT_LOW_WATER: &str = "event_low_water";

/// redb's page cache (read cache and write buffer). redb's default, 1 GiB,
/// let a live server keep every page it wrote (~330 bytes per queued job);
/// the pages a commit touches are few and recent, and the OS caches the
/// file besides.
const CACHE_BYTES: usize = 32 << 20;

/// How the store syncs commits to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    /// Every commit is synced before it is acknowledged (the default).
    Always,
    /// Commits are synced only every `n`th time: faster, but a crash can lose
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

enum WriteRequest {
    Batch {
        batch: Vec<Write>,
        reply: oneshot::Sender<StoreResult<Vec<WriteOutcome>>>,
    },
    /// The retention task's trim: on the writer thread, the only writer.
    Trim {
        before: std::time::SystemTime,
        limit: usize,
        reply: oneshot::Sender<StoreResult<Trimmed>>,
    },
}

/// The embedded, single-file store.
pub struct EmbeddedStore {
    db: Arc<Database>,
    /// `None` only while dropping.
    writer: Option<std_mpsc::Sender<WriteRequest>>,
    writer_thread: Option<thread::JoinHandle<()>>,
    path: PathBuf,
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
            txn.commit().map_err(io_err)?;
        }
        let db = Arc::new(db);
        let (writer, requests) = std_mpsc::channel();
        let writer_db = db.clone();
        let writer_thread = thread::Builder::new()
            .name("tether-store-writer".into())
            .spawn(move || writer_loop(&writer_db, &requests, &options))
            .map_err(io_err)?;
        Ok(EmbeddedStore { db, writer: Some(writer), writer_thread: Some(writer_thread), path })
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

fn writer_loop(db: &Database, requests: &std_mpsc::Receiver<WriteRequest>, options: &EmbeddedOptions) {
    let mut commits: u64 = 0;
    let mut cache = MetaCache::default();
    while let Ok(first) = requests.recv() {
        let mut group = Vec::new();
        let mut next = Some(first);
        while let Some(request) = next.take() {
            match request {
                WriteRequest::Batch { batch, reply } => group.push(BatchRequest { batch, reply }),
                WriteRequest::Trim { before, limit, reply } => {
                    // Rare (the retention task): in a transaction of its own.
                    let trimmed = trim_events(db, before, limit);
                    if let Err(e) = &trimmed {
                        tracing::error!(error = %e, "trimming the event log failed");
                    }
                    let _ = reply.send(trimmed);
                }
            }
            if group.len() < options.max_group {
                next = requests.try_recv().ok();
            }
        }
        if group.is_empty() {
            continue;
        }
        commits += 1;
        let durable = match options.sync {
            SyncMode::Always => true,
            SyncMode::EveryNth(n) => commits.is_multiple_of(u64::from(n.max(1))),
        };
        let started = std::time::Instant::now();
        let applied = apply_group(db, &group, durable, &mut cache);
        if applied.is_err() {
            // The cache may hold writes of the failed transaction.
            cache.clear();
        }
        metrics::histogram!("tether_store_commit_seconds").record(started.elapsed());
        match applied {
            Ok(outcomes) => {
                for (request, outcome) in group.into_iter().zip(outcomes) {
                    let _ = request.reply.send(Ok(outcome));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "store commit failed");
                for request in group {
                    let _ = request.reply.send(Err(e.clone()));
                }
            }
        }
    }
}

struct BatchRequest {
    batch: Vec<Write>,
    reply: oneshot::Sender<StoreResult<Vec<WriteOutcome>>>,
}

/// Deletes the groups older than `before` from the front of the log (at
/// most `limit`) and raises the low-water mark past them, in one
/// transaction.
fn trim_events(db: &Database, before: std::time::SystemTime, limit: usize) -> StoreResult<Trimmed> {
    let txn = db.begin_write().map_err(io_err)?;
    let mut trimmed = Trimmed::default();
    {
        let mut events = txn.open_table(EVENTS).map_err(io_err)?;
        let mut counters = txn.open_table(COUNTERS).map_err(io_err)?;
        let mut low_water = None;
        let mut old = Vec::new();
        for row in events.iter().map_err(io_err)? {
            let (key, value) = row.map_err(io_err)?;
            if old.len() >= limit {
                trimmed.more = true;
                break;
            }
            // A group that does not decode is trimmed by its position: the
            // groups after it are younger only if it was.
            let young = match decode::<EventGroup>(value.value()) {
                Ok(group) => group.time() >= before,
                Err(_) => false,
            };
            if young {
                break;
            }
            old.push(key.value());
        }
        for seq in &old {
            events.remove(*seq).map_err(io_err)?;
            low_water = Some(*seq);
        }
        if let Some(seq) = low_water {
            let current = counters.get(EVENT_LOW_WATER).map_err(io_err)?.map(|v| v.value()).unwrap_or(0);
            counters.insert(EVENT_LOW_WATER, seq.max(current)).map_err(io_err)?;
        }
        trimmed.groups = old.len() as u64;
    }
    txn.commit().map_err(io_err)?;
    Ok(trimmed)
}

fn apply_group(
    db: &Database,
    group: &[BatchRequest],
    durable: bool,
    cache: &mut MetaCache,
) -> StoreResult<Vec<Vec<WriteOutcome>>> {
    let mut txn = db.begin_write().map_err(io_err)?;
    if !durable {
        txn.set_durability(Durability::None).map_err(io_err)?;
    }
    let mut outcomes = Vec::with_capacity(group.len());
    {
        let mut tables = Tables {
            jobs: txn.open_table(JOBS).map_err(io_err)?,
            state_index: txn.open_table(STATE_INDEX).map_err(io_err)?,
            idempotency: txn.open_table(IDEMPOTENCY).map_err(io_err)?,
            logs: txn.open_table(LOGS).map_err(io_err)?,
            agents: txn.open_table(AGENTS).map_err(io_err)?,
            agent_names: txn.open_table(AGENT_NAMES).map_err(io_err)?,
            counters: txn.open_table(COUNTERS).map_err(io_err)?,
            pools: txn.open_table(POOLS).map_err(io_err)?,
            events: txn.open_table(EVENTS).map_err(io_err)?,
            event_head: None,
            count_deltas: Vec::new(),
            buf: Vec::new(),
            entry_buf: Vec::new(),
            cache,
        };
        for request in group {
            let mut batch_outcomes = Vec::with_capacity(request.batch.len());
            for write in &request.batch {
                batch_outcomes.push(tables.apply(write)?);
            }
            outcomes.push(batch_outcomes);
        }
        if let Some(head) = tables.event_head {
            tables.counters.insert(EVENT_HEAD, head).map_err(io_err)?;
        }
        let mut counts = txn.open_table(COUNTS).map_err(io_err)?;
        for (queue, state, priority, delta) in tables.count_deltas.drain(..) {
            if delta == 0 {
                continue;
            }
            let key = (queue.as_str(), state, priority);
            let current = counts.get(key).map_err(io_err)?.map(|v| v.value()).unwrap_or(0);
            let next = (current as i64 + delta).max(0) as u64;
            if next == 0 {
                counts.remove(key).map_err(io_err)?;
            } else {
                counts.insert(key, next).map_err(io_err)?;
            }
        }
    }
    txn.commit().map_err(io_err)?;
    Ok(outcomes)
}

struct Tables<'txn> {
    jobs: redb::Table<'txn, &'static str, &'static [u8]>,
    state_index: redb::Table<'txn, (u8, u64), &'static [u8]>,
    idempotency: redb::Table<'txn, (&'static str, &'static str), &'static str>,
    logs: redb::Table<'txn, (&'static str, u32, u64), &'static [u8]>,
    agents: redb::Table<'txn, &'static str, &'static [u8]>,
    agent_names: redb::Table<'txn, (&'static str, &'static str), &'static str>,
    counters: redb::Table<'txn, &'static str, u64>,
    pools: redb::Table<'txn, &'static str, &'static [u8]>,
    events: redb::Table<'txn, u64, &'static [u8]>,
    /// The event log's head in this transaction, once read (one read per
    /// transaction that logs anything; stored when it commits).
    event_head: Option<u64>,
    /// Count changes of this transaction: few distinct keys (queues x
    /// states x priorities touched), so a list beats hashing a string per
    /// transition.
    count_deltas: Vec<(String, u8, u8, i64)>,
    /// Reused encode buffers (one job record, one index entry at a time).
    buf: Vec<u8>,
    entry_buf: Vec<u8>,
    cache: &'txn mut MetaCache,
}

/// What an update needs to know of the stored version of a job.
#[derive(Debug, Clone)]
struct JobMeta {
    version: u64,
    state: JobState,
    seq: u64,
    priority: Priority,
    queue: String,
}

impl JobMeta {
    fn of(job: &Job) -> JobMeta {
        JobMeta {
            version: job.version,
            state: job.state,
            seq: job.seq,
            priority: job.spec.priority,
            queue: job.spec.queue.clone(),
        }
    }
}

/// The stored meta of recently written, unfinished jobs. The writer thread is
/// the only writer, so the cache is exact; it spares each update a read and
/// a decode of the old record. Cleared when a transaction fails.
#[derive(Default)]
struct MetaCache {
    jobs: ahash::AHashMap<String, JobMeta>,
}

/// Entries kept at most (~130 bytes each, so at most ~8 MiB): enough for
/// every job in flight; a deeper backlog's jobs are read when dispatched.
const META_CACHE_LIMIT: usize = 65_536;

impl MetaCache {
    fn get(&self, id: &str) -> Option<&JobMeta> {
        self.jobs.get(id)
    }

    fn record(&mut self, job: &Job) {
        if job.state.is_terminal() {
            self.jobs.remove(&job.id);
            return;
        }
        if let Some(meta) = self.jobs.get_mut(&job.id) {
            // In place: no key or queue name allocated per update.
            meta.version = job.version;
            meta.state = job.state;
            meta.seq = job.seq;
            meta.priority = job.spec.priority;
            if meta.queue != job.spec.queue {
                meta.queue.clone_from(&job.spec.queue);
            }
            return;
        }
        if self.jobs.len() >= META_CACHE_LIMIT {
            self.jobs.clear();
        }
        self.jobs.insert(job.id.clone(), JobMeta::of(job));
    }

    fn clear(&mut self) {
        self.jobs.clear();
    }
}

impl Tables<'_> {
    fn apply(&mut self, write: &Write) -> StoreResult<WriteOutcome> {
        match write {
            Write::CreateJob { job, events } => {
                let outcome = self.create_job(job)?;
                self.log_if_applied(&outcome, job, events)?;
                Ok(outcome)
            }
            Write::UpdateJob { job, expected_version, events } => {
                let outcome = self.update_job(job, *expected_version)?;
                self.log_if_applied(&outcome, job, events)?;
                Ok(outcome)
            }
            Write::PutAgent(agent) => {
                let bytes = encode(agent.as_ref())?;
                self.agents.insert(agent.id.as_str(), bytes.as_slice()).map_err(io_err)?;
                self.agent_names
                    .insert((agent.pool.as_str(), agent.name.as_str()), agent.id.as_str())
                    .map_err(io_err)?;
                Ok(WriteOutcome::Applied)
            }
            Write::CreatePool(pool) => {
                if self.pools.get(pool.name.as_str()).map_err(io_err)?.is_some() {
                    return Ok(WriteOutcome::IdExists);
                }
                let bytes = encode(pool.as_ref())?;
                self.pools.insert(pool.name.as_str(), bytes.as_slice()).map_err(io_err)?;
                Ok(WriteOutcome::Applied)
            }
            Write::PutPool(pool) => {
                let bytes = encode(pool.as_ref())?;
                self.pools.insert(pool.name.as_str(), bytes.as_slice()).map_err(io_err)?;
                Ok(WriteOutcome::Applied)
            }
            Write::DeletePool { name } => {
                self.pools.remove(name.as_str()).map_err(io_err)?;
                Ok(WriteOutcome::Applied)
            }
            Write::AppendLog(chunk) => {
                let key = (chunk.job_id.as_str(), chunk.attempt, chunk.sequence);
                if self.logs.get(key).map_err(io_err)?.is_none() {
                    let bytes = encode(chunk)?;
                    self.logs.insert(key, bytes.as_slice()).map_err(io_err)?;
                }
                Ok(WriteOutcome::Applied)
            }
            Write::RaiseCounter { name, value } => {
                let current = self.counters.get(*name).map_err(io_err)?.map(|v| v.value()).unwrap_or(0);
                if *value > current {
                    self.counters.insert(*name, *value).map_err(io_err)?;
                }
                Ok(WriteOutcome::Applied)
            }
        }
    }

    /// Appends a job write's events to the log, in the job write's
    /// transaction: only if the job write applied.
    fn log_if_applied(&mut self, outcome: &WriteOutcome, job: &Job, events: &[Transition]) -> StoreResult<()> {
        if *outcome != WriteOutcome::Applied || events.is_empty() {
            return Ok(());
        }
        let head = match self.event_head {
            Some(head) => head,
            None => self.counters.get(EVENT_HEAD).map_err(io_err)?.map(|v| v.value()).unwrap_or(0),
        };
        let Some(group) = EventGroup::of(job, events, head + 1) else { return Ok(()) };
        encode_into(&mut self.entry_buf, &group)?;
        self.events.insert(group.last_seq(), self.entry_buf.as_slice()).map_err(io_err)?;
        self.event_head = Some(group.last_seq());
        Ok(())
    }

    fn count(&mut self, queue: &str, state: JobState, priority: Priority, delta: i64) {
        let (state, priority) = (state.code(), priority_code(priority));
        match self.count_deltas.iter_mut().find(|(q, s, p, _)| q == queue && *s == state && *p == priority) {
            Some(row) => row.3 += delta,
            None => self.count_deltas.push((queue.to_string(), state, priority, delta)),
        }
    }

    /// A queued job's index entry carries what start-up needs to rebuild
    /// the ready set without reading the job; any other state's carries
    /// just the job id (see [`index_id`]).
    fn index(&mut self, job: &Job) -> StoreResult<()> {
        let value = if job.state == JobState::Queued {
            encode_into(&mut self.entry_buf, &QueuedEntry::of(job))?;
            self.entry_buf.as_slice()
        } else {
            job.id.as_bytes()
        };
        self.state_index.insert((job.state.code(), job.seq), value).map_err(io_err)?;
        Ok(())
    }

    fn create_job(&mut self, job: &Job) -> StoreResult<WriteOutcome> {
        // Insert first and undo in the (never expected) conflicts: one tree
        // walk per create instead of a lookup and an insert.
        encode_job_into(&mut self.buf, job)?;
        let previous =
            self.jobs.insert(job.id.as_str(), self.buf.as_slice()).map_err(io_err)?.map(|old| old.value().to_vec());
        if let Some(old) = previous {
            self.jobs.insert(job.id.as_str(), old.as_slice()).map_err(io_err)?;
            return Ok(WriteOutcome::IdExists);
        }
        if let Some(key) = &job.spec.idempotency_key {
            let k = (job.spec.queue.as_str(), key.as_str());
            let taken = self.idempotency.get(k).map_err(io_err)?.map(|existing| existing.value().to_string());
            if let Some(existing_job_id) = taken {
                self.jobs.remove(job.id.as_str()).map_err(io_err)?;
                return Ok(WriteOutcome::IdempotencyKeyTaken { existing_job_id });
            }
            self.idempotency.insert(k, job.id.as_str()).map_err(io_err)?;
        }
        self.index(job)?;
        self.count(&job.spec.queue, job.state, job.spec.priority, 1);
        self.cache.record(job);
        Ok(WriteOutcome::Applied)
    }

    fn update_job(&mut self, job: &Job, expected_version: u64) -> StoreResult<WriteOutcome> {
        // The stored meta, with its queue only when it is not the job's own
        // (it never is in practice: the spec does not change).
        let old = match self.cache.get(&job.id) {
            Some(m) => {
                let queue = (m.queue != job.spec.queue).then(|| m.queue.clone());
                (m.version, m.state, m.seq, m.priority, queue)
            }
            None => match self.jobs.get(job.id.as_str()).map_err(io_err)? {
                Some(bytes) => {
                    let m = JobMeta::of(&decode_job(bytes.value())?);
                    (m.version, m.state, m.seq, m.priority, Some(m.queue))
                }
                None => return Ok(WriteOutcome::VersionConflict { current_version: None }),
            },
        };
        let (version, state, seq, priority, queue) = old;
        if version != expected_version {
            return Ok(WriteOutcome::VersionConflict { current_version: Some(version) });
        }
        encode_job_into(&mut self.buf, job)?;
        self.jobs.insert(job.id.as_str(), self.buf.as_slice()).map_err(io_err)?;
        self.state_index.remove((state.code(), seq)).map_err(io_err)?;
        self.index(job)?;
        if state != job.state || priority != job.spec.priority {
            self.count(queue.as_deref().unwrap_or(&job.spec.queue), state, priority, -1);
            self.count(&job.spec.queue, job.state, job.spec.priority, 1);
        }
        self.cache.record(job);
        Ok(WriteOutcome::Applied)
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

fn read_job(jobs: &impl ReadableTable<&'static str, &'static [u8]>, id: &str) -> StoreResult<Option<Job>> {
    match jobs.get(id).map_err(io_err)? {
        Some(bytes) => decode_job(bytes.value()).map(Some),
        None => Ok(None),
    }
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn write(&self, batch: Vec<Write>) -> StoreResult<Vec<WriteOutcome>> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let (reply, outcome) = oneshot::channel();
        let writer = self.writer.as_ref().ok_or(StoreError::Closed)?;
        writer.send(WriteRequest::Batch { batch, reply }).map_err(|_| StoreError::Closed)?;
        outcome.await.map_err(|_| StoreError::Closed)?
    }

    async fn event_heads(&self) -> StoreResult<EventCursor> {
        self.read(|db| {
            let txn = db.begin_read().map_err(io_err)?;
            let counters = txn.open_table(COUNTERS).map_err(io_err)?;
            let head = counters.get(EVENT_HEAD).map_err(io_err)?.map(|v| v.value()).unwrap_or(0);
            Ok(EventCursor { positions: vec![head] })
        })
        .await
    }

    async fn read_events(&self, after: &EventCursor, limit: usize) -> StoreResult<EventRead> {
        after.check_shards(1)?;
        let after = after.positions[0];
        self.read(move |db| {
            let txn = db.begin_read().map_err(io_err)?;
            let counters = txn.open_table(COUNTERS).map_err(io_err)?;
            let head = counters.get(EVENT_HEAD).map_err(io_err)?.map(|v| v.value()).unwrap_or(0);
            let low_water = counters.get(EVENT_LOW_WATER).map_err(io_err)?.map(|v| v.value()).unwrap_or(0);
            if after > head {
                return Ok(EventRead::Unknown);
            }
            if after < low_water {
                return Ok(EventRead::Expired);
            }
            let events_table = txn.open_table(EVENTS).map_err(io_err)?;
            let mut events: Vec<Event> = Vec::new();
            let mut position = after;
            for row in events_table.range(after.saturating_add(1)..).map_err(io_err)? {
                if events.len() >= limit.max(1) {
                    break;
                }
                let (key, value) = row.map_err(io_err)?;
                let group: EventGroup = decode(value.value())
                    .map_err(|e| StoreError::Corrupt(format!("event group {}: {e}", key.value())))?;
                // Sequence numbers are dense: a hole is a trimmed group.
                if group.first_seq > position + 1 {
                    return Ok(EventRead::Expired);
                }
                group.events_after(0, position, &mut events);
                position = key.value();
            }
            Ok(EventRead::Events { events, next: EventCursor { positions: vec![position] } })
        })
        .await
    }

    async fn trim_events(&self, before: std::time::SystemTime, limit: usize) -> StoreResult<Trimmed> {
        let (reply, outcome) = oneshot::channel();
        let writer = self.writer.as_ref().ok_or(StoreError::Closed)?;
        writer.send(WriteRequest::Trim { before, limit, reply }).map_err(|_| StoreError::Closed)?;
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
        let job_id = job_id.to_string();
        self.read(move |db| {
            let txn = db.begin_read().map_err(io_err)?;
            let logs = txn.open_table(LOGS).map_err(io_err)?;
            let mut out = Vec::new();
            for row in
                logs.range((job_id.as_str(), attempt, 0)..=(job_id.as_str(), attempt, u64::MAX)).map_err(io_err)?
            {
                let (_, value) = row.map_err(io_err)?;
                out.push(decode(value.value())?);
            }
            Ok(out)
        })
        .await
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

    #[test]
    fn the_meta_cache_is_bounded_and_forgets_finished_jobs() {
        let mut cache = MetaCache::default();
        let mut job = crate::store::conformance::job("j", 1, "q", None);
        for i in 0..=META_CACHE_LIMIT {
            job.id = format!("j{i}");
            cache.record(&job);
        }
        assert!(cache.jobs.len() <= META_CACHE_LIMIT);
        assert!(cache.get(&job.id).is_some());
        job.state = JobState::Succeeded;
        cache.record(&job);
        assert!(cache.get(&job.id).is_none());
    }

    #[test]
    fn index_entries_of_both_layouts_name_their_job() {
        let job = conformance::job("0190-job", 7, "q", None);
        let queued = encode(&QueuedEntry::of(&job)).expect("encode");
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
