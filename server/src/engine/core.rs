//! The engine task: its state, its loop, and the group-commit machinery
//! that makes every effect wait for the writes it depends on.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use super::FastMap;
use std::sync::Arc;
use std::time::SystemTime;

use futures::future::BoxFuture;
use tether::time::later;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::JoinHandle;

use super::agent_table::{AgentTable, Filed};
use super::config::EngineConfig;
use super::ready::{ReadyEntry, ReadySet};
use super::types::{AgentEvent, AgentPush, JobEvent, MetricsSample};
use super::Command;
use crate::clock::Clock;
use crate::domain::{Agent, DomainError, DomainResult, Health, Job, JobState, Pool, Priority};
use crate::store::{Store, StoreError, StoreResult, Write, WriteOutcome, COUNTER_FENCING, COUNTER_SEQ};

/// Something to do once the batch it belongs to is durable.
pub(crate) enum Effect {
    Reply(Box<dyn FnOnce(DomainResult<()>) + Send + Sync>),
    Push { agent_id: String, session_id: u64, push: AgentPush },
    Event(JobEvent),
}

/// Writes not yet handed to the store, and their effects.
#[derive(Default)]
pub(crate) struct Pending {
    pub writes: Vec<Write>,
    /// Index in `writes` of the write of each job (by its unique `seq`), to
    /// coalesce transitions of one job within a batch into one write.
    pub by_job: FastMap<u64, usize>,
    pub effects: Vec<Effect>,
    pub max_seq: u64,
    pub max_token: u64,
}

/// An agent session: the sender of its pushes.
pub(crate) struct Session {
    pub id: u64,
    pub pushes: mpsc::UnboundedSender<AgentPush>,
    /// Answer accepted starts too (older protocol), not only refused ones.
    pub answer_starts: bool,
}

/// An attempt assigned to an agent and not yet reported finished.
#[derive(Debug, Clone)]
pub(crate) struct InFlight {
    pub job_id: String,
    pub attempt: u32,
    pub acked: bool,
}

/// An agent with its live state.
pub(crate) struct AgentEntry {
    pub agent: Agent,
    pub session: Option<Session>,
    /// Fencing token -> attempt, for every attempt that holds a slot.
    pub in_flight: FastMap<u64, InFlight>,
    /// Draining (operator order or the agent's own): no new work.
    pub draining: bool,
    /// False after the agent rejected an assignment, until its next heartbeat.
    pub accepting: bool,
    pub disconnected_at: Option<SystemTime>,
    pub history: VecDeque<MetricsSample>,
    /// When the next heartbeat is due at the latest.
    pub next_check: Option<SystemTime>,
    /// The check queued in `health_checks` for this agent: never after
    /// `next_check` (a later deadline requeues it when it fires).
    pub queued_check: Option<SystemTime>,
    /// Heartbeats missed in a row.
    pub missed: u32,
    /// When the agent was last given a job (the engine's assignment
    /// count): ties among equally free agents go to the least recent, so
    /// work spreads instead of landing on whichever agent is listed last.
    pub last_assigned: u64,
    /// The id, shared with the free-agent index.
    pub key: Arc<str>,
    /// Where the free-agent index holds this entry, if it takes work.
    pub filed: Option<Filed>,
}

impl AgentEntry {
    /// Whether `r` names an attempt assigned to this agent and not finished.
    /// The whole reference must match, so one agent's session cannot act on
    /// another agent's attempt. (Who may open a session as which agent is
    /// the auth layer's to decide.)
    pub fn holds(&self, r: &crate::domain::AttemptRef) -> bool {
        self.in_flight.get(&r.fencing_token).is_some_and(|f| f.job_id == r.job_id && f.attempt == r.attempt)
    }

    pub fn free_slots(&self) -> usize {
        (self.agent.slots as usize).saturating_sub(self.in_flight.len())
    }

    /// Whether the dispatcher may give it new work now.
    pub fn takes_work(&self) -> bool {
        self.session.is_some()
            && self.accepting
            && !self.draining
            && self.agent.scheduling == crate::domain::SchedulingStatus::Active
            && matches!(self.agent.health, Health::Registering | Health::Healthy | Health::Degraded)
            && self.free_slots() > 0
    }

    /// Whether the agent counts as capacity of its pool (for scaling).
    pub fn counts_for_capacity(&self) -> bool {
        (self.session.is_some() || self.next_check.is_some())
            && self.agent.scheduling == crate::domain::SchedulingStatus::Active
            && matches!(self.agent.health, Health::Registering | Health::Healthy | Health::Degraded)
    }
}

pub(crate) struct Engine {
    pub store: Arc<dyn Store>,
    pub clock: Arc<dyn Clock>,
    pub config: EngineConfig,
    pub events: broadcast::Sender<JobEvent>,
    pub agent_events: broadcast::Sender<AgentEvent>,
    serving: watch::Sender<bool>,
    pub next_seq: u64,
    pub next_token: u64,
    pub ready: ReadySet,
    /// Claimed and running jobs, full records.
    pub active: FastMap<String, Job>,
    /// (lease end or run deadline, job id) of every active job.
    pub deadlines: BTreeSet<(SystemTime, String)>,
    /// Jobs per queue, then per (state, priority): keyed so a transition
    /// finds its counters by `&str`, without allocating.
    pub counts: FastMap<String, FastMap<(JobState, Priority), u64>>,
    pub agents: AgentTable,
    /// Live (not terminated) agents by (pool, name).
    pub agent_names: FastMap<(String, String), String>,
    /// Live agent ids per pool.
    pub pool_agents: FastMap<String, Vec<String>>,
    /// (grace end, agent id) of disconnected agents holding jobs.
    pub grace: BTreeSet<(SystemTime, String)>,
    /// (heartbeat deadline, agent id).
    pub health_checks: BTreeSet<(SystemTime, String)>,
    pub pools: BTreeMap<String, Pool>,
    pub next_session: u64,
    /// Assignments made so far (orders agents by when they last got work).
    pub assignments: u64,
    /// Idempotency keys of created jobs whose batch is not yet committed.
    pub uncommitted_keys: FastMap<(String, String), (Box<Job>, u64)>,
    pub pending: Pending,
    /// Number of the batch `pending` will become.
    pub batch_no: u64,
    in_flight_effects: Vec<Effect>,
    /// Assignments of the current command burst, sent when the burst ends:
    /// handed over back to back, a session's stream writes them in one go
    /// instead of one socket write per assignment.
    /// Each push names its session, so one replaced or closed during the
    /// burst (e.g. drained and deregistered) gets nothing after its end.
    outbox: Vec<(String, u64, AgentPush)>,
    /// `pending.by_job` of the batch being committed: jobs whose last write
    /// is not durable yet, which the store cannot tell about.
    committing_jobs: FastMap<u64, usize>,
    failed: Option<String>,
}

/// How far the fencing token counter jumps at start-up.
const FENCING_GAP: u64 = 1 << 32;

type CommitFuture = BoxFuture<'static, StoreResult<Vec<WriteOutcome>>>;

impl Engine {
    /// Rebuilds the engine's state from the store, without reading terminal
    /// jobs or the payloads of queued ones.
    pub async fn load(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        config: EngineConfig,
        events: broadcast::Sender<JobEvent>,
        agent_events: broadcast::Sender<AgentEvent>,
        serving: watch::Sender<bool>,
    ) -> Result<Engine, StoreError> {
        let now = clock.now();
        let next_seq = store.counter(COUNTER_SEQ).await? + 1;
        // Assignments are pushed before their claim is durable, so tokens
        // issued just before a crash may be missing from the store. Skipping
        // far ahead guarantees they are never issued again: far fewer than
        // FENCING_GAP claims can be in flight between two commits.
        let next_token = store.counter(COUNTER_FENCING).await? + FENCING_GAP;
        let mut counts = FastMap::default();
        for row in store.counts().await? {
            counts.entry(row.queue).or_insert_with(FastMap::default).insert((row.state, row.priority), row.count);
        }
        let mut ready = ReadySet::default();
        // Queued jobs whose ready time no timestamp can carry: quarantined
        // once the engine exists (they would never be dispatched).
        let mut unreadable = Vec::new();
        for entry in store.load_queued().await? {
            if entry.ready_time > tether::time::latest() {
                unreadable.push(entry.id);
                continue;
            }
            ready.insert(ReadyEntry::from_stored(entry), now);
        }
        let mut pools: BTreeMap<String, Pool> =
            store.list_pools().await?.into_iter().map(|p| (p.name.clone(), p)).collect();
        if !pools.contains_key(crate::domain::DEFAULT_POOL) {
            let pool = Pool::default_pool(now);
            store.write(vec![Write::PutPool(Box::new(pool.clone()))]).await?;
            pools.insert(pool.name.clone(), pool);
        }
        let mut engine = Engine {
            store: store.clone(),
            clock,
            config,
            events,
            agent_events,
            serving,
            next_seq,
            next_token,
            ready,
            active: FastMap::default(),
            deadlines: BTreeSet::new(),
            counts,
            agents: AgentTable::default(),
            agent_names: FastMap::default(),
            pool_agents: FastMap::default(),
            grace: BTreeSet::new(),
            health_checks: BTreeSet::new(),
            pools,
            next_session: 1,
            assignments: 0,
            uncommitted_keys: FastMap::default(),
            pending: Pending::default(),
            batch_no: 1,
            in_flight_effects: Vec::new(),
            outbox: Vec::new(),
            committing_jobs: FastMap::default(),
            failed: None,
        };
        let mut after: Option<String> = None;
        loop {
            let page = store.list_agents(&Default::default(), after.as_deref(), 1000).await?;
            let Some(last) = page.last() else { break };
            after = Some(last.id.clone());
            for mut agent in page {
                if agent.health != Health::Terminated {
                    agent.health = Health::Offline;
                    engine.agent_names.insert((agent.pool.clone(), agent.name.clone()), agent.id.clone());
                    engine.pool_agents.entry(agent.pool.clone()).or_default().push(agent.id.clone());
                }
                engine.agents.insert(AgentEntry::new(agent));
            }
        }
        for id in unreadable {
            if let Some(job) = store.get_job(&id).await? {
                engine.quarantine(job, "quarantined: its ready time is after 9999-12-31".to_string());
            }
        }
        // Active jobs keep their leases, extended by the reconnect grace so
        // their agents can come back and resume them after a restart.
        for mut job in store.load_active().await? {
            if let Some(reason) = job.defect() {
                engine.quarantine(job, reason);
                continue;
            }
            let floor = later(now, engine.config.reconnect_grace);
            job.lease_expire_time = Some(job.lease_expire_time.map_or(floor, |t| t.max(floor)));
            if let Some(mut entry) = engine.agents.get_mut(&job.worker_id) {
                entry
                    .in_flight
                    .insert(job.fencing_token, InFlight { job_id: job.id.clone(), attempt: job.attempt, acked: true });
                if entry.disconnected_at.is_none() {
                    entry.disconnected_at = Some(now);
                    engine.grace.insert((later(now, engine.config.reconnect_grace), entry.agent.id.clone()));
                }
            }
            engine.track_deadline(&job, None);
            engine.active.insert(job.id.clone(), job);
        }
        tracing::info!(
            queued = engine.ready.len(),
            active = engine.active.len(),
            agents = engine.agents.len(),
            "engine state loaded"
        );
        Ok(engine)
    }

    pub async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let mut committing: Option<JoinHandle<StoreResult<Vec<WriteOutcome>>>> = None;
        let mut shutdown: Option<tokio::sync::oneshot::Sender<()>> = None;
        // A commit starts as soon as none is in flight (`commit_interval`
        // is zero by default), so at light load an acknowledgement waits
        // only for its own fsync; writes arriving meanwhile form the next
        // group. After a big commit (heavy load) the next one waits
        // `busy_commit_interval`: a commit costs the writer ~0.3 ms of CPU
        // plus ~6 us per write, so spacing them out then makes groups
        // bigger and coalesces more transitions of one job. Only
        // acknowledgements wait for it; dispatch does not.
        let started = tokio::time::Instant::now();
        let mut last_commit = started.checked_sub(self.config.commit_interval).unwrap_or(started);
        let mut window = self.config.commit_interval;
        // The clock timer is kept while its deadline stays the same, so a
        // burst of commands does not re-arm a timer per loop.
        let mut timer: Option<(SystemTime, BoxFuture<'static, ()>)> = None;
        loop {
            self.flush_outbox();
            let mut linger = None;
            if committing.is_none() {
                let due = last_commit.checked_add(window).unwrap_or(last_commit);
                if self.pending.writes.is_empty() || shutdown.is_some() || tokio::time::Instant::now() >= due {
                    let writes = self.pending.writes.len();
                    committing = self.submit();
                    if committing.is_some() {
                        last_commit = tokio::time::Instant::now();
                        window = if writes >= self.config.busy_commit_writes {
                            self.config.busy_commit_interval
                        } else {
                            self.config.commit_interval
                        };
                    }
                } else {
                    linger = Some(due);
                }
            }
            if let Some(reply) = shutdown.take() {
                if committing.is_none() && self.pending.writes.is_empty() {
                    let _ = self.serving.send(false);
                    let _ = reply.send(());
                    return;
                }
                shutdown = Some(reply);
            }
            let wake = self.next_wake().filter(|_| shutdown.is_none());
            if timer.as_ref().map(|(t, _)| *t) != wake {
                timer = wake.map(|t| (t, self.clock.sleep_until(t)));
            }
            tokio::select! {
                biased;
                done = wait_commit(&mut committing) => {
                    committing = None;
                    self.finish_commit(done);
                }
                command = commands.recv(), if shutdown.is_none() => {
                    let Some(command) = command else { shutdown = Some(tokio::sync::oneshot::channel().0); continue };
                    if let Command::Shutdown { reply } = command {
                        let _ = self.serving.send(false);
                        shutdown = Some(reply);
                        continue;
                    }
                    self.handle(command).await;
                    // Take what else is queued so it joins the same batch.
                    for _ in 0..4096 {
                        match commands.try_recv() {
                            Ok(Command::Shutdown { reply }) => {
                                let _ = self.serving.send(false);
                                shutdown = Some(reply);
                                break;
                            }
                            Ok(command) => self.handle(command).await,
                            Err(_) => break,
                        }
                    }
                }
                () = wait_timer(&mut timer) => {
                    timer = None;
                    self.on_timer().await;
                }
                () = linger_until(linger) => {}
            }
        }
    }

    /// Hands the pending batch to the store, or runs its effects at once if
    /// it has no writes.
    fn submit(&mut self) -> Option<JoinHandle<StoreResult<Vec<WriteOutcome>>>> {
        if self.pending.writes.is_empty() {
            let effects = std::mem::take(&mut self.pending.effects);
            self.run_effects(effects, Ok(()));
            return None;
        }
        let mut pending = std::mem::take(&mut self.pending);
        if pending.max_seq > 0 {
            pending.writes.push(Write::RaiseCounter { name: COUNTER_SEQ, value: pending.max_seq });
        }
        if pending.max_token > 0 {
            pending.writes.push(Write::RaiseCounter { name: COUNTER_FENCING, value: pending.max_token });
        }
        self.in_flight_effects = pending.effects;
        self.committing_jobs = pending.by_job;
        self.batch_no += 1;
        let store = self.store.clone();
        let writes = pending.writes;
        let commit: CommitFuture = Box::pin(async move { store.write(writes).await });
        Some(tokio::spawn(commit))
    }

    fn finish_commit(&mut self, done: StoreResult<Vec<WriteOutcome>>) {
        let committed = self.batch_no - 1;
        self.uncommitted_keys.retain(|_, (_, batch)| *batch > committed);
        let effects = std::mem::take(&mut self.in_flight_effects);
        self.committing_jobs.clear();
        let result = match done {
            Ok(outcomes) => match outcomes.iter().find(|o| **o != WriteOutcome::Applied) {
                None => Ok(()),
                Some(conflict) => Err(format!("store refused an engine write: {conflict:?}")),
            },
            Err(e) => Err(e.to_string()),
        };
        match result {
            Ok(()) => self.run_effects(effects, Ok(())),
            Err(reason) => {
                // The in-memory state is now ahead of the store; refuse all
                // further writes rather than acknowledge anything unsafe.
                tracing::error!(%reason, "store commit failed; the engine stops serving writes");
                let _ = self.serving.send(false);
                self.failed = Some(reason.clone());
                self.run_effects(effects, Err(DomainError::Unavailable(reason)));
            }
        }
    }

    fn run_effects(&mut self, effects: Vec<Effect>, result: DomainResult<()>) {
        for effect in effects {
            match effect {
                Effect::Reply(reply) => reply(result.clone()),
                Effect::Push { agent_id, session_id, push } => {
                    if result.is_ok() {
                        self.push_now(&agent_id, session_id, push);
                    }
                }
                Effect::Event(event) => {
                    if result.is_ok() {
                        let _ = self.events.send(event);
                    }
                }
            }
        }
    }

    pub fn push_now(&self, agent_id: &str, session_id: u64, push: AgentPush) {
        if let Some(session) = self.agents.get(agent_id).and_then(|a| a.session.as_ref()) {
            if session.id == session_id {
                let _ = session.pushes.send(push);
            }
        }
    }

    /// Pushes to an agent's current session at the end of this command
    /// burst, without waiting for a commit.
    pub fn push_soon(&mut self, agent_id: &str, push: AgentPush) {
        if let Some(session) = self.agents.get(agent_id).and_then(|a| a.session.as_ref()) {
            self.outbox.push((agent_id.to_string(), session.id, push));
        }
    }

    fn flush_outbox(&mut self) {
        let outbox = std::mem::take(&mut self.outbox);
        for (agent_id, session_id, push) in outbox {
            self.push_now(&agent_id, session_id, push);
        }
    }

    /// Whether the job with `seq` has a write that is not durable yet: the
    /// store still holds an older state of it.
    pub fn write_in_flight(&self, seq: u64) -> bool {
        self.pending.by_job.contains_key(&seq) || self.committing_jobs.contains_key(&seq)
    }

    /// Error for write commands once the store failed.
    pub fn check_writable(&self) -> DomainResult<()> {
        match &self.failed {
            Some(reason) => {
                Err(DomainError::Unavailable(format!("store failed earlier ({reason}); restart the server")))
            }
            None => Ok(()),
        }
    }

    /// Replies with `value` once the current batch is durable.
    pub fn reply_after_commit<T: Send + Sync + 'static>(&mut self, reply: super::Reply<T>, value: DomainResult<T>) {
        match value {
            Err(e) => {
                let _ = reply.send(Err(e));
            }
            Ok(value) => self.pending.effects.push(Effect::Reply(Box::new(move |result| {
                let _ = reply.send(result.map(|()| value));
            }))),
        }
    }

    /// Pushes to an agent session once the current batch is durable.
    pub fn push_after_commit(&mut self, agent_id: &str, push: AgentPush) {
        if let Some(session) = self.agents.get(agent_id).and_then(|a| a.session.as_ref()) {
            self.pending.effects.push(Effect::Push { agent_id: agent_id.to_string(), session_id: session.id, push });
        }
    }

    /// Queues the write of a job's new state (coalesced with an earlier write
    /// of the same job in this batch), updates counts and emits its event.
    pub fn persist(&mut self, job: &mut Job, previous: Option<JobState>) {
        self.stamp(job, previous);
        self.queue_write(Box::new(job.clone()), previous.is_none());
    }

    /// Like [`Engine::persist`] for a job the engine lets go of (it
    /// finished): the write takes the record itself instead of a copy.
    pub fn persist_last(&mut self, mut job: Job, previous: JobState) {
        self.stamp(&mut job, Some(previous));
        self.queue_write(Box::new(job), false);
    }

    fn stamp(&mut self, job: &mut Job, previous: Option<JobState>) {
        job.update_time = self.clock.now();
        job.version += 1;
        let per_queue = match self.counts.get_mut(job.spec.queue.as_str()) {
            Some(per_queue) => per_queue,
            None => self.counts.entry(job.spec.queue.clone()).or_default(),
        };
        if let Some(prev) = previous {
            if let Some(n) = per_queue.get_mut(&(prev, job.spec.priority)) {
                *n = n.saturating_sub(1);
            }
        }
        *per_queue.entry((job.state, job.spec.priority)).or_insert(0) += 1;
        self.pending.max_seq = self.pending.max_seq.max(job.seq);
        self.pending.max_token = self.pending.max_token.max(job.fencing_token);
        // An event is a state change; a renewal or a coalesced rewrite in the
        // same state is not one.
        if self.events.receiver_count() > 0 && previous != Some(job.state) {
            self.pending.effects.push(Effect::Event(JobEvent { job: Arc::new(job.clone()), previous }));
        }
    }

    fn queue_write(&mut self, record: Box<Job>, create: bool) {
        match self.pending.by_job.get(&record.seq) {
            Some(&i) => match &mut self.pending.writes[i] {
                Write::CreateJob(stored) | Write::UpdateJob { job: stored, .. } => *stored = record,
                _ => {}
            },
            None => {
                self.pending.by_job.insert(record.seq, self.pending.writes.len());
                let write = if create {
                    Write::CreateJob(record)
                } else {
                    let expected_version = record.version - 1;
                    Write::UpdateJob { job: record, expected_version }
                };
                self.pending.writes.push(write);
            }
        }
    }

    /// Queues a non-job write (agents, logs).
    pub fn persist_other(&mut self, write: Write) {
        self.pending.writes.push(write);
    }

    /// Keeps `deadlines` in step with an active job's lease and timeout.
    pub fn track_deadline(&mut self, job: &Job, old: Option<SystemTime>) {
        if let Some(old) = old {
            self.deadlines.remove(&(old, job.id.clone()));
        }
        if job.state.is_active() {
            if let Some(t) = job.next_deadline() {
                self.deadlines.insert((t, job.id.clone()));
            }
        }
    }

    fn next_wake(&self) -> Option<SystemTime> {
        [
            self.ready.next_due(),
            self.deadlines.first().map(|(t, _)| *t),
            self.grace.first().map(|(t, _)| *t),
            self.health_checks.first().map(|(t, _)| *t),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    async fn on_timer(&mut self) {
        let now = self.clock.now();
        if self.failed.is_some() {
            return;
        }
        for pool in self.ready.promote_due(now) {
            self.dispatch_pool(&pool).await;
        }
        self.expire_deadlines(now).await;
        self.expire_grace(now).await;
        self.check_heartbeats(now);
    }

    async fn handle(&mut self, command: Command) {
        match command {
            Command::Enqueue { specs, reply } => {
                let result = match self.check_writable() {
                    Ok(()) => self.enqueue(specs).await,
                    Err(e) => Err(e),
                };
                self.reply_after_commit(reply, result);
            }
            Command::Cancel { id, reason, reply } => {
                let result = self.guarded(|e| Box::pin(e.cancel(id, reason))).await;
                self.reply_after_commit(reply, result);
            }
            Command::Claim { request, reply } => {
                let result = self.guarded(|e| Box::pin(e.claim_unary(request))).await;
                self.reply_after_commit(reply, result);
            }
            Command::Start { job, reply } => {
                let result = self.check_writable().and_then(|()| self.start_attempt(&job));
                self.reply_after_commit(reply, result);
            }
            Command::Complete { job, result: output, reply } => {
                let result = self.check_writable().and_then(|()| self.complete_attempt(&job, output));
                self.reply_after_commit(reply, result);
            }
            Command::Fail { job, error, failure, reply } => {
                let result = self.check_writable().and_then(|()| self.fail_reported(&job, error, failure));
                self.reply_after_commit(reply, result);
            }
            Command::Renew { job, lease, reply } => {
                let result = self.check_writable().and_then(|()| self.renew(&job, lease));
                self.reply_after_commit(reply, result);
            }
            Command::Redrive { id, reply } => {
                let result = self.guarded(|e| Box::pin(e.redrive(id))).await;
                self.reply_after_commit(reply, result);
            }
            Command::Stats { queue, reply } => {
                let _ = reply.send(Ok(self.stats(queue.as_deref())));
            }
            Command::Connect { hello, pushes, reply } => {
                let result = match self.check_writable() {
                    Ok(()) => self.connect(hello, pushes).await,
                    Err(e) => Err(e),
                };
                self.reply_after_commit(reply, result);
            }
            Command::Inbound { agent_id, session_id, messages } => {
                for message in messages {
                    if self.failed.is_some() {
                        break;
                    }
                    self.inbound(&agent_id, session_id, message).await;
                }
            }
            Command::Disconnected { agent_id, session_id } => self.disconnected(&agent_id, session_id),
            Command::RegisterAgent { hello, reply } => {
                let result = self.check_writable().and_then(|()| self.register(hello));
                self.reply_after_commit(reply, result);
            }
            Command::GetAgent { id, reply } => {
                let _ = reply.send(self.agent_view(&id));
            }
            Command::ListAgents { filter, reply } => {
                let _ = reply.send(Ok(self.list_agents(&filter)));
            }
            Command::AgentCounts { reply } => {
                let _ = reply.send(Ok(self.agent_counts()));
            }
            Command::DrainAgent { id, reason, reply } => {
                let result = self.check_writable().and_then(|()| self.drain(&id, reason));
                self.reply_after_commit(reply, result);
            }
            Command::DeregisterAgent { id, reply } => {
                let result = self.check_writable().and_then(|()| self.deregister(&id));
                self.reply_after_commit(reply, result);
            }
            Command::Heartbeat { agent_id, metrics, running, reply } => {
                let result = match self.check_writable() {
                    Ok(()) => self.unary_heartbeat(&agent_id, metrics, running).await,
                    Err(e) => Err(e),
                };
                self.reply_after_commit(reply, result);
            }
            Command::UpdateStatus { id, status, reason, reply } => {
                let result = match self.check_writable() {
                    Ok(()) => self.update_status(&id, status, reason).await,
                    Err(e) => Err(e),
                };
                self.reply_after_commit(reply, result);
            }
            Command::CreatePool { pool, reply } => {
                let result = self.check_writable().and_then(|()| self.create_pool(pool));
                self.reply_after_commit(reply, result);
            }
            Command::GetPool { name, reply } => {
                let _ = reply.send(self.get_pool(&name));
            }
            Command::ListPools { after, limit, reply } => {
                let _ = reply.send(Ok(self.list_pools(after.as_deref(), limit)));
            }
            Command::UpdatePool { pool, fields, reply } => {
                let result = self.check_writable().and_then(|()| self.update_pool(pool, &fields));
                self.reply_after_commit(reply, result);
            }
            Command::DeletePool { name, reply } => {
                let result = self.check_writable().and_then(|()| self.delete_pool(&name));
                self.reply_after_commit(reply, result);
            }
            Command::Scaling { name, reply } => {
                let _ = reply.send(self.scaling_signal(&name));
            }
            Command::Shutdown { reply } => {
                let _ = reply.send(());
            }
            Command::Inspect { id } => self.inspect(&id).await,
        }
    }

    async fn guarded<'a, T>(
        &'a mut self,
        op: impl FnOnce(&'a mut Engine) -> BoxFuture<'a, DomainResult<T>>,
    ) -> DomainResult<T> {
        self.check_writable()?;
        op(self).await
    }
}

impl AgentEntry {
    pub fn new(agent: Agent) -> AgentEntry {
        AgentEntry {
            session: None,
            in_flight: FastMap::default(),
            draining: false,
            accepting: true,
            disconnected_at: None,
            key: Arc::from(agent.id.as_str()),
            agent,
            filed: None,
            history: VecDeque::new(),
            next_check: None,
            queued_check: None,
            missed: 0,
            last_assigned: 0,
        }
    }
}

/// Resolves when the armed clock timer fires, or never without one.
async fn wait_timer(timer: &mut Option<(SystemTime, BoxFuture<'static, ()>)>) {
    match timer {
        Some((_, sleep)) => sleep.await,
        None => futures::future::pending().await,
    }
}

/// Resolves at `deadline`, or never without one.
async fn linger_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(t) => tokio::time::sleep_until(t).await,
        None => futures::future::pending().await,
    }
}

async fn wait_commit(
    committing: &mut Option<JoinHandle<StoreResult<Vec<WriteOutcome>>>>,
) -> StoreResult<Vec<WriteOutcome>> {
    match committing.as_mut() {
        Some(handle) => match handle.await {
            Ok(result) => result,
            // A panic while committing is the engine's own: carried on here
            // so the server's supervisor sees the engine die (and exits)
            // instead of a process that stays up unable to write.
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => Err(StoreError::Io(format!("commit task failed: {e}"))),
        },
        None => futures::future::pending().await,
    }
}
