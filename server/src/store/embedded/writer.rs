//! The embedded store's writer thread, the only writer of the database: it
//! groups the batches of concurrent callers into one transaction (group
//! commit), journals the group and acknowledges it once the journal is
//! synced (see [`super::journal`]); checkpoints make the database itself
//! durable and restart the journal.

use std::sync::atomic::Ordering;
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::Duration;

use redb::{Database, Durability, ReadableDatabase, ReadableTable};
use tokio::sync::oneshot;

use super::journal::{Appended, Journal, RawRecord};
use super::{
    io_err, AckedHeads, EmbeddedOptions, LogTables, SyncMode, ACTIVITY, ACTIVITY_HEAD, ACTIVITY_LOG, AGENTS,
    AGENT_NAMES, COUNTERS, COUNTS, EVENTS, EVENT_HEAD, IDEMPOTENCY, JOBS, JOB_LOG, LOGS, POOLS, RECORDS, STATE_INDEX,
};
use crate::domain::{Job, JobState, Priority};
use crate::store::activity::{Activity, ActivityGroup};
use crate::store::codec::{decode, decode_job, encode, encode_into, encode_job_into, priority_code};
use crate::store::events::{EventGroup, LogGroup};
use crate::store::{QueuedEntry, Record, StoreError, StoreResult, Transition, Trimmed, Write, WriteOutcome};

/// The counter holding the seq of the last group the database applied.
pub(super) const JOURNAL_SEQ: &str = "journal_seq";

/// A group of at least this many writes skips the journal and is committed
/// durably: under load (the engine widens its own commit window after
/// commits this large) a journal record of ~0.25 MiB plus the checkpoints
/// it brings cost more than the sync it saves; measured, batched
/// throughput fell ~10% with every group journaled.
const DIRECT_COMMIT_WRITES: usize = 64;

/// A journal that has records is checkpointed after the writer has been
/// idle this long, so a restart after a quiet spell replays nothing.
const IDLE_CHECKPOINT: Duration = Duration::from_secs(1);

pub(super) enum WriteRequest {
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

struct BatchRequest {
    batch: Vec<Write>,
    reply: oneshot::Sender<StoreResult<Vec<WriteOutcome>>>,
}

/// The writer's state between groups.
pub(super) struct Writer {
    db: std::sync::Arc<Database>,
    options: EmbeddedOptions,
    /// `None` after the journal failed: every group is then a durable
    /// database commit, as slow as that is.
    journal: Option<Journal>,
    /// The seq of the last group applied.
    seq: u64,
    /// The event log's head after the last group applied, and as readers
    /// may see it: only what was acknowledged (a crash loses what was
    /// applied but not yet synced, and the log would then reuse its
    /// sequence numbers under a cursor a watcher already holds). The same
    /// for the activity log.
    event_head: u64,
    activity_head: u64,
    acknowledged: Arc<AckedHeads>,
    /// Groups since the start, for [`SyncMode::EveryNth`].
    commits: u64,
    cache: MetaCache,
}

impl Writer {
    /// Brings the database up to what was acknowledged: replays the
    /// journal's records it lacks, then checkpoints.
    pub fn recover(
        db: Arc<Database>,
        options: EmbeddedOptions,
        journal: Journal,
        records: Vec<RawRecord>,
        acknowledged: Arc<AckedHeads>,
    ) -> StoreResult<Writer> {
        let (applied, event_head, activity_head) = {
            let txn = db.begin_read().map_err(io_err)?;
            let counters = txn.open_table(COUNTERS).map_err(io_err)?;
            let read = |key: &str| counters.get(key).map(|v| v.map(|v| v.value()).unwrap_or(0)).map_err(io_err);
            (read(JOURNAL_SEQ)?, read(EVENT_HEAD)?, read(ACTIVITY_HEAD)?)
        };
        let mut writer = Writer {
            db,
            options,
            journal: Some(journal),
            seq: applied,
            event_head,
            activity_head,
            acknowledged,
            commits: 0,
            cache: MetaCache::default(),
        };
        let replay = super::journal::to_replay(records, applied)?;
        if !replay.is_empty() {
            tracing::info!(groups = replay.len(), "replaying the store journal");
        }
        for raw in replay {
            let record = raw.decode()?;
            let batches: Vec<&[Write]> = record.batches.iter().map(Vec::as_slice).collect();
            let applied = apply_group(&writer.db, &batches, record.seq, Durability::None, &mut writer.cache)?;
            writer.seq = record.seq;
            writer.event_head = applied.event_head.unwrap_or(writer.event_head);
            writer.activity_head = applied.activity_head.unwrap_or(writer.activity_head);
        }
        writer.checkpoint()?;
        writer.acknowledge();
        Ok(writer)
    }

    pub fn run(mut self, requests: &std_mpsc::Receiver<WriteRequest>) {
        loop {
            let pending = self.journal.as_ref().is_some_and(|j| !j.is_empty());
            let first = if pending {
                match requests.recv_timeout(IDLE_CHECKPOINT) {
                    Ok(request) => request,
                    Err(std_mpsc::RecvTimeoutError::Timeout) => {
                        self.checkpoint_logged();
                        continue;
                    }
                    Err(std_mpsc::RecvTimeoutError::Disconnected) => break,
                }
            } else {
                match requests.recv() {
                    Ok(request) => request,
                    Err(_) => break,
                }
            };
            let mut group = Vec::new();
            let mut next = Some(first);
            while let Some(request) = next.take() {
                match request {
                    WriteRequest::Batch { batch, reply } => group.push(BatchRequest { batch, reply }),
                    WriteRequest::Trim { before, limit, reply } => {
                        // Rare (the retention task): in a transaction of its
                        // own, durable, so also a checkpoint.
                        let trimmed = trim_events(&self.db, before, limit);
                        match &trimmed {
                            Ok(_) => {
                                self.checkpointed();
                                self.acknowledge();
                            }
                            Err(e) => tracing::error!(error = %e, "trimming the event log failed"),
                        }
                        let _ = reply.send(trimmed);
                    }
                }
                if group.len() < self.options.max_group {
                    next = requests.try_recv().ok();
                }
            }
            if !group.is_empty() {
                self.commit(group);
            }
        }
        // A clean stop leaves the journal empty.
        self.checkpoint_logged();
    }

    fn commit(&mut self, group: Vec<BatchRequest>) {
        self.commits += 1;
        let sync = match self.options.sync {
            SyncMode::Always => true,
            SyncMode::EveryNth(n) => self.commits.is_multiple_of(u64::from(n.max(1))),
        };
        let started = std::time::Instant::now();
        let batches: Vec<&[Write]> = group.iter().map(|r| r.batch.as_slice()).collect();
        // A large group shares a durable commit's fixed cost among many
        // writes; journaling it too would only write it twice.
        let writes: usize = batches.iter().map(|b| b.len()).sum();
        // Only when this commit syncs: an unsynced group (`EveryNth`) left
        // out of the journal would be a gap in its numbering, and a replay
        // would stop there, before the groups after it.
        let direct = self.journal.is_none() || (sync && writes >= DIRECT_COMMIT_WRITES);
        let durability = if direct && sync { Durability::Immediate } else { Durability::None };
        let applied = match self.seq.checked_add(1) {
            Some(seq) => apply_group(&self.db, &batches, seq, durability, &mut self.cache).map(|a| (seq, a)),
            None => Err(StoreError::Corrupt("the store journal's group numbers are exhausted".into())),
        };
        let result = match applied {
            Ok((seq, applied)) => {
                self.seq = seq;
                self.event_head = applied.event_head.unwrap_or(self.event_head);
                self.activity_head = applied.activity_head.unwrap_or(self.activity_head);
                let durable = if direct {
                    if matches!(durability, Durability::Immediate) {
                        self.checkpointed();
                    }
                    Ok(())
                } else {
                    self.make_durable(&batches, sync)
                };
                if let Err(e) = &durable {
                    // What the journal holds is unknown now (a record may be
                    // missing before the next): give it up; every commit is
                    // then a durable database commit, or fails.
                    tracing::error!(error = %e, "the store journal failed; every commit now syncs the database file");
                    self.journal = None;
                }
                durable.map(|()| applied.outcomes)
            }
            Err(e) => {
                // The cache may hold writes of the failed transaction.
                self.cache.clear();
                Err(e)
            }
        };
        drop(batches);
        metrics::histogram!(crate::telemetry::STORE_COMMIT).record(started.elapsed());
        match result {
            Ok(outcomes) => {
                self.acknowledge();
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

    /// Journals the group just applied (group `self.seq`) and syncs it if
    /// `sync`; without a journal the commit itself was durable.
    fn make_durable(&mut self, batches: &[&[Write]], sync: bool) -> StoreResult<()> {
        let Some(journal) = self.journal.as_mut() else { return Ok(()) };
        let mut appended = journal.append(self.seq, batches);
        if matches!(appended, Ok(Appended::Full)) {
            self.checkpoint()?;
            let Some(journal) = self.journal.as_mut() else { return Ok(()) };
            appended = journal.append(self.seq, batches);
        }
        match appended? {
            Appended::Written if sync => self.journal.as_ref().map_or(Ok(()), Journal::sync),
            Appended::Written => Ok(()),
            // A checkpoint makes this group durable with the rest.
            Appended::TooLarge | Appended::Full => self.checkpoint(),
            Appended::Unencodable(why) => {
                tracing::warn!(error = %why, "a group does not encode for the store journal; checkpointing instead");
                self.checkpoint()
            }
        }
    }

    /// Lets readers see the logs up to what was acknowledged.
    fn acknowledge(&self) {
        self.acknowledged.jobs.store(self.event_head, Ordering::Release);
        self.acknowledged.activity.store(self.activity_head, Ordering::Release);
    }

    /// A durable database commit: everything applied so far is then in the
    /// database file, and the journal starts again.
    fn checkpoint(&mut self) -> StoreResult<()> {
        let mut txn = self.db.begin_write().map_err(io_err)?;
        txn.set_durability(Durability::Immediate).map_err(io_err)?;
        {
            let mut counters = txn.open_table(COUNTERS).map_err(io_err)?;
            counters.insert(JOURNAL_SEQ, self.seq).map_err(io_err)?;
        }
        txn.commit().map_err(io_err)?;
        self.checkpointed();
        Ok(())
    }

    fn checkpoint_logged(&mut self) {
        if let Err(e) = self.checkpoint() {
            tracing::error!(error = %e, "store checkpoint failed; the journal keeps its records");
        }
    }

    /// After any durable database commit (a checkpoint, a large group, a
    /// trim): everything applied is in the file; the journal starts again.
    fn checkpointed(&mut self) {
        metrics::counter!(crate::telemetry::STORE_CHECKPOINTS).increment(1);
        if let Some(journal) = self.journal.as_mut() {
            journal.restart();
        }
    }
}

/// Deletes the groups older than `before` from the front of both logs (at
/// most `limit` each) and raises their low-water marks past them, in one
/// transaction.
fn trim_events(db: &Database, before: std::time::SystemTime, limit: usize) -> StoreResult<Trimmed> {
    let mut txn = db.begin_write().map_err(io_err)?;
    // Durable, so also a checkpoint of every group before it.
    txn.set_durability(Durability::Immediate).map_err(io_err)?;
    let jobs = trim_log::<EventGroup>(&txn, JOB_LOG, before, limit)?;
    let activity = trim_log::<ActivityGroup>(&txn, ACTIVITY_LOG, before, limit)?;
    txn.commit().map_err(io_err)?;
    Ok(jobs.and(activity))
}

fn trim_log<G: LogGroup>(
    txn: &redb::WriteTransaction,
    log: LogTables,
    before: std::time::SystemTime,
    limit: usize,
) -> StoreResult<Trimmed> {
    let mut trimmed = Trimmed::default();
    let mut groups = txn.open_table(log.table).map_err(io_err)?;
    let mut counters = txn.open_table(COUNTERS).map_err(io_err)?;
    let mut old = Vec::new();
    for row in groups.iter().map_err(io_err)? {
        let (key, value) = row.map_err(io_err)?;
        if old.len() >= limit {
            trimmed.more = true;
            break;
        }
        // A group that does not decode is trimmed by its position: the
        // groups after it are younger only if it was.
        let young = match decode::<G>(value.value()) {
            Ok(group) => group.time() >= before,
            Err(_) => false,
        };
        if young {
            break;
        }
        old.push(key.value());
    }
    let mut low_water = None;
    for seq in &old {
        groups.remove(*seq).map_err(io_err)?;
        low_water = Some(*seq);
    }
    if let Some(seq) = low_water {
        let current = counters.get(log.low_water).map_err(io_err)?.map(|v| v.value()).unwrap_or(0);
        counters.insert(log.low_water, seq.max(current)).map_err(io_err)?;
    }
    trimmed.groups = old.len() as u64;
    Ok(trimmed)
}

/// Applies the batches in one transaction, recording `seq` as the last
/// group the database holds; synced to disk only if `durability` says so.
/// What a group did.
struct Applied {
    outcomes: Vec<Vec<WriteOutcome>>,
    /// The event log's head, if the group logged events.
    event_head: Option<u64>,
    /// The activity log's head, if the group logged activity.
    activity_head: Option<u64>,
}

fn apply_group(
    db: &Database,
    batches: &[&[Write]],
    seq: u64,
    durability: Durability,
    cache: &mut MetaCache,
) -> StoreResult<Applied> {
    let mut txn = db.begin_write().map_err(io_err)?;
    txn.set_durability(durability).map_err(io_err)?;
    let mut outcomes = Vec::with_capacity(batches.len());
    let (event_head, activity_head);
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
            records: txn.open_table(RECORDS).map_err(io_err)?,
            activity: txn.open_table(ACTIVITY).map_err(io_err)?,
            event_head: None,
            activity_head: None,
            count_deltas: Vec::new(),
            buf: Vec::new(),
            entry_buf: Vec::new(),
            cache,
        };
        for batch in batches {
            let mut batch_outcomes = Vec::with_capacity(batch.len());
            for write in *batch {
                batch_outcomes.push(tables.apply(write)?);
            }
            outcomes.push(batch_outcomes);
        }
        event_head = tables.event_head;
        if let Some(head) = event_head {
            tables.counters.insert(EVENT_HEAD, head).map_err(io_err)?;
        }
        activity_head = tables.activity_head;
        if let Some(head) = activity_head {
            tables.counters.insert(ACTIVITY_HEAD, head).map_err(io_err)?;
        }
        tables.counters.insert(JOURNAL_SEQ, seq).map_err(io_err)?;
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
    Ok(Applied { outcomes, event_head, activity_head })
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
    records: redb::Table<'txn, (&'static str, &'static str), &'static [u8]>,
    activity: redb::Table<'txn, u64, &'static [u8]>,
    /// The event log's head in this transaction, once read (one read per
    /// transaction that logs anything; stored when it commits).
    event_head: Option<u64>,
    /// The same for the activity log.
    activity_head: Option<u64>,
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
                    let bytes = crate::store::codec::encode_log(chunk)?;
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
            Write::PutRecord { record, expected_version } => self.put_record(record, *expected_version),
            Write::Logged { write, activity } => {
                let outcome = self.apply(write)?;
                if outcome == WriteOutcome::Applied {
                    self.log_activity(activity)?;
                }
                Ok(outcome)
            }
        }
    }

    /// Appends a write's activity to its log, in the write's transaction.
    fn log_activity(&mut self, activity: &[Activity]) -> StoreResult<()> {
        let head = match self.activity_head {
            Some(head) => head,
            None => self.counters.get(ACTIVITY_HEAD).map_err(io_err)?.map(|v| v.value()).unwrap_or(0),
        };
        let group = ActivityGroup { first_seq: head + 1, entries: activity.to_vec() };
        encode_into(&mut self.entry_buf, &group)?;
        self.activity.insert(group.last_seq(), self.entry_buf.as_slice()).map_err(io_err)?;
        self.activity_head = Some(group.last_seq());
        Ok(())
    }

    /// Inserts (`expected_version` 0) or replaces a record on condition of
    /// its stored version. That `record.version` follows `expected_version`
    /// was checked before the batch reached the writer.
    fn put_record(&mut self, record: &Record, expected_version: u64) -> StoreResult<WriteOutcome> {
        let key = (record.collection.as_str(), record.id.as_str());
        let stored = match self.records.get(key).map_err(io_err)? {
            Some(bytes) => Some(decode::<Record>(bytes.value())?.version),
            None => None,
        };
        match (expected_version, stored) {
            (0, Some(_)) => return Ok(WriteOutcome::IdExists),
            (0, None) => {}
            (expected, Some(current)) if current == expected => {}
            (_, current_version) => return Ok(WriteOutcome::VersionConflict { current_version }),
        }
        encode_into(&mut self.buf, record)?;
        self.records.insert(key, self.buf.as_slice()).map_err(io_err)?;
        Ok(WriteOutcome::Applied)
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
