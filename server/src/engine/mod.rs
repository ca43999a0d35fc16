//! The queue engine and dispatcher: one task owns every piece of mutable
//! scheduling state (ready jobs, leases, agent sessions) and is driven by
//! commands from the gRPC layer. Its writes are grouped into batches; a
//! batch is committed while the next one accumulates (group commit), and the
//! effects of a batch (replies, pushes to agents, watch events) run only once
//! the batch is durable.

mod agent_sync;
mod agent_table;
mod agents;
mod config;
mod core;
mod explain;
mod fetch;
mod health;
mod job_key;
mod leaving;
mod output;
mod pools;
mod queue;
mod ready;
mod retention;
mod sweep;
mod types;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::task::JoinHandle;

pub use config::{
    EngineConfig, DEFAULT_EVENT_RETENTION, DEFAULT_MAX_JOB_OUTPUT_BYTES, MAX_EVENT_RETENTION, MIN_EVENT_RETENTION,
};
pub use pools::PoolField;
pub use types::{
    AgentInbound, AgentPage, AgentPush, AgentView, ClaimRequest, HeartbeatAnswer, HelloInfo, JobEvent, MetricsSample,
    Outcome, PeerNotice, QueueStats, WakeJob, WelcomeInfo,
};

use crate::clock::Clock;
use crate::domain::dashboard::{Actor, DashboardSpec};
use crate::domain::waiting::WaitFacts;
use crate::domain::{
    AttemptRef, DomainError, DomainResult, Failure, Health, Job, JobSpec, Metrics, Pool, ScalingSignal,
    SchedulingStatus,
};
use crate::store::{
    CountRow, Event, EventCursor, EventRead, JobFilter, Ownership, Page, QueuedEntry, Store, StoreError,
};

type Reply<T> = oneshot::Sender<DomainResult<T>>;

/// The engine's hash maps: keys include client-chosen strings, so the hasher
/// is seeded per process (no HashDoS), and it is much faster than SipHash.
pub(crate) type FastMap<K, V> = std::collections::HashMap<K, V, ahash::RandomState>;

/// A job to enqueue.
#[derive(Debug, Clone, PartialEq)]
pub struct NewJob {
    pub spec: JobSpec,
    /// Set for a dashboard job (CreateJob).
    pub dashboard: Option<Box<DashboardSpec>>,
}

/// A request to the engine task.
pub(crate) enum Command {
    Enqueue {
        jobs: Vec<NewJob>,
        reply: Reply<Vec<(Job, bool)>>,
    },
    Cancel {
        id: String,
        reason: String,
        actor: Actor,
        reply: Reply<Job>,
    },
    WaitFacts {
        id: String,
        pool: String,
        reply: Reply<WaitFacts>,
    },
    Claim {
        request: ClaimRequest,
        reply: Reply<Option<Job>>,
    },
    Start {
        job: AttemptRef,
        reply: Reply<Job>,
    },
    Complete {
        job: AttemptRef,
        result: Bytes,
        reply: Reply<Job>,
    },
    Fail {
        job: AttemptRef,
        error: String,
        failure: Failure,
        reply: Reply<Job>,
    },
    Renew {
        job: AttemptRef,
        lease: Option<Duration>,
        reply: Reply<Job>,
    },
    Redrive {
        id: String,
        reply: Reply<Job>,
    },
    Stats {
        queue: Option<String>,
        /// Counts read from a shared store, instead of the engine's own.
        rows: Option<Vec<CountRow>>,
        reply: Reply<QueueStats>,
    },
    Connect {
        hello: HelloInfo,
        pushes: mpsc::UnboundedSender<AgentPush>,
        reply: Reply<WelcomeInfo>,
    },
    Inbound {
        agent_id: String,
        session_id: u64,
        messages: Vec<AgentInbound>,
    },
    Disconnected {
        agent_id: String,
        session_id: u64,
    },
    RegisterAgent {
        hello: HelloInfo,
        reply: Reply<(AgentView, bool)>,
    },
    GetAgent {
        id: String,
        reply: Reply<AgentView>,
    },
    ListAgents {
        filter: AgentListFilter,
        reply: Reply<AgentPage>,
    },
    /// Agents tallied by (health, connected), for the metrics gauges.
    AgentCounts {
        reply: Reply<Vec<(Health, bool, u64)>>,
    },
    DrainAgent {
        id: String,
        reason: String,
        reply: Reply<AgentView>,
    },
    DeregisterAgent {
        id: String,
        reply: Reply<AgentView>,
    },
    Heartbeat {
        agent_id: String,
        metrics: Metrics,
        running: Vec<AttemptRef>,
        reply: Reply<HeartbeatAnswer>,
    },
    UpdateStatus {
        id: String,
        status: SchedulingStatus,
        reason: String,
        reply: Reply<AgentView>,
    },
    CreatePool {
        pool: Pool,
        reply: Reply<Pool>,
    },
    /// A pool this replica created on a shared store (its conditional
    /// write applied).
    PoolCreated {
        pool: Box<Pool>,
    },
    GetPool {
        name: String,
        reply: Reply<Pool>,
    },
    ListPools {
        after: Option<String>,
        limit: usize,
        reply: Reply<(Vec<Pool>, Option<String>)>,
    },
    UpdatePool {
        pool: Pool,
        fields: Vec<PoolField>,
        reply: Reply<Pool>,
    },
    DeletePool {
        name: String,
        reply: Reply<Pool>,
    },
    Scaling {
        name: String,
        reply: Reply<ScalingSignal>,
    },
    Shutdown {
        reply: oneshot::Sender<()>,
    },
    /// The replica is going away: see `Engine::leave`.
    Leave {
        reply: oneshot::Sender<watch::Receiver<usize>>,
    },
    /// A reader found the stored job defective: quarantine it if the engine
    /// still holds it queued or active.
    Inspect {
        id: String,
    },
    /// A peer's wake-up: jobs that became ready there.
    Wake {
        jobs: Vec<WakeJob>,
        agents: Vec<String>,
        reply: Reply<u32>,
    },
    /// An agent read again after a peer said an operator changed it.
    AgentRefreshed {
        agent: Box<crate::domain::Agent>,
    },
    /// A job read again from a shared store after a conflict.
    Refreshed {
        job: Box<Job>,
    },
    /// Records of queued jobs the dispatcher read for its agents (shared
    /// store, see `fetch.rs`).
    Fetched {
        ids: Vec<String>,
        jobs: crate::store::StoreResult<Vec<Job>>,
    },
    /// What a sweep of a shared store found: queued jobs (some enqueued
    /// through other replicas) and active ones (some whose replica died),
    /// as the store held them at `read_at` or later.
    Sweep {
        queued: Vec<QueuedEntry>,
        active: Vec<Job>,
        pools: Vec<Pool>,
        read_at: std::time::SystemTime,
    },
}

impl Command {
    /// Who makes the changes the command causes. The dispatcher's own
    /// claims and quarantines are the server's whatever command led to them
    /// (see `assign`, `quarantine`).
    fn actor(&self) -> Actor {
        match self {
            Command::Cancel { actor, .. } => actor.clone(),
            Command::Inbound { .. } | Command::Heartbeat { .. } | Command::Connect { .. } => Actor::Agent,
            Command::Claim { .. }
            | Command::Start { .. }
            | Command::Complete { .. }
            | Command::Fail { .. }
            | Command::Renew { .. } => Actor::Worker,
            Command::Enqueue { .. }
            | Command::Redrive { .. }
            | Command::DrainAgent { .. }
            | Command::DeregisterAgent { .. }
            | Command::UpdateStatus { .. }
            | Command::RegisterAgent { .. }
            | Command::CreatePool { .. }
            | Command::UpdatePool { .. }
            | Command::DeletePool { .. } => Actor::Operator,
            Command::WaitFacts { .. }
            | Command::Stats { .. }
            | Command::Disconnected { .. }
            | Command::GetAgent { .. }
            | Command::ListAgents { .. }
            | Command::AgentCounts { .. }
            | Command::PoolCreated { .. }
            | Command::GetPool { .. }
            | Command::ListPools { .. }
            | Command::Scaling { .. }
            | Command::Shutdown { .. }
            | Command::Leave { .. }
            | Command::Inspect { .. }
            | Command::Wake { .. }
            | Command::AgentRefreshed { .. }
            | Command::Refreshed { .. }
            | Command::Fetched { .. }
            | Command::Sweep { .. } => Actor::System,
        }
    }
}

/// Which agents ListAgents returns.
#[derive(Debug, Clone, Default)]
pub struct AgentListFilter {
    pub pool: Option<String>,
    pub health: Vec<Health>,
    pub labels: BTreeMap<String, String>,
    pub after_id: Option<String>,
    pub limit: usize,
}

/// Whether the engine can serve: false once the store failed or shutdown
/// began.
pub type Serving = watch::Receiver<bool>;

/// A cheap, cloneable handle to the engine task.
#[derive(Clone)]
pub struct EngineHandle {
    commands: mpsc::Sender<Command>,
    events: broadcast::Sender<JobEvent>,
    log_written: watch::Sender<u64>,
    output_written: watch::Sender<u64>,
    activity_written: watch::Sender<u64>,
    store: Arc<dyn Store>,
    serving: Serving,
    watch: WatchSettings,
    tail: crate::tail::JobLogTail,
}

/// What a watcher of the event log needs to know.
#[derive(Debug, Clone, Copy)]
pub struct WatchSettings {
    /// How long events are kept.
    pub retention: std::time::Duration,
    /// How often an idle watcher reads the log: only on a shared store,
    /// where other replicas' changes do not wake it.
    pub poll: Option<std::time::Duration>,
    /// The least time between two reads of a watcher that has caught up
    /// (shared store: a busy replica commits every few ms, and each read
    /// is 8 requests or more; the embedded store reads locally).
    pub min_read_interval: Option<std::time::Duration>,
    /// How long a WatchEvents stream stays quiet before a keep-alive.
    pub keep_alive: std::time::Duration,
}

/// [`WatchSettings::min_read_interval`] on a shared store.
const SHARED_WATCH_READ_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

impl EngineHandle {
    /// Loads the engine's state from `store` and starts its task.
    pub async fn start(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        config: EngineConfig,
    ) -> Result<(EngineHandle, JoinHandle<()>), StoreError> {
        Self::start_with_peers(store, clock, config, None).await
    }

    /// [`EngineHandle::start`] for a replica with peers: jobs that become
    /// ready with no free agent here are sent to `wakes` once durable.
    pub async fn start_with_peers(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        config: EngineConfig,
        wakes: Option<mpsc::UnboundedSender<PeerNotice>>,
    ) -> Result<(EngineHandle, JoinHandle<()>), StoreError> {
        let (commands, receiver) = mpsc::channel(config.command_capacity);
        let (events, _) = broadcast::channel(8192);
        let (log_written, _) = watch::channel(0u64);
        let (output_written, _) = watch::channel(0u64);
        let (activity_written, _) = watch::channel(0u64);
        let (serving_tx, serving) = watch::channel(true);
        let sweep_interval = config.sweep_interval;
        let (retention, trim_interval) = (config.event_retention, config.event_trim_interval);
        let shared = store.ownership() == Ownership::Shared;
        let watch = WatchSettings {
            retention,
            poll: shared.then_some(config.event_poll_interval),
            min_read_interval: shared.then_some(SHARED_WATCH_READ_INTERVAL),
            keep_alive: config.watch_keep_alive,
        };
        let channels = core::Channels {
            events: events.clone(),
            log_written: log_written.clone(),
            output_written: output_written.clone(),
            activity_written: activity_written.clone(),
            serving: serving_tx,
            commands: commands.downgrade(),
            wakes,
        };
        let engine = core::Engine::load(store.clone(), clock.clone(), config, channels).await?;
        tokio::spawn(retention::run(Arc::downgrade(&store), clock.clone(), retention, trim_interval, serving.clone()));
        if store.ownership() == Ownership::Shared {
            tokio::spawn(sweep::run(store.clone(), clock, sweep_interval, commands.downgrade()));
        }
        let task = tokio::spawn(engine.run(receiver));
        let tail = crate::tail::JobLogTail::spawn(store.clone(), log_written.subscribe(), watch);
        let handle = EngineHandle {
            commands,
            events,
            log_written,
            output_written,
            activity_written,
            store,
            serving,
            watch,
            tail,
        };
        Ok((handle, task))
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> DomainResult<T> {
        let (reply, answer) = oneshot::channel();
        self.commands.send(make(reply)).await.map_err(|_| DomainError::Unavailable("the engine has stopped".into()))?;
        answer.await.map_err(|_| DomainError::Unavailable("the engine has stopped".into()))?
    }

    pub async fn enqueue(&self, specs: Vec<JobSpec>) -> DomainResult<Vec<(Job, bool)>> {
        let jobs = specs.into_iter().map(|spec| NewJob { spec, dashboard: None }).collect();
        self.call(|reply| Command::Enqueue { jobs, reply }).await
    }

    /// Enqueues one dashboard job; false when its idempotency key matched
    /// an existing job (returned instead).
    pub async fn create_dashboard_job(&self, spec: JobSpec, dashboard: DashboardSpec) -> DomainResult<(Job, bool)> {
        let jobs = vec![NewJob { spec, dashboard: Some(Box::new(dashboard)) }];
        let mut created = self.call(|reply| Command::Enqueue { jobs, reply }).await?;
        created.pop().ok_or_else(|| DomainError::Internal("enqueue returned no job".into()))
    }

    pub async fn cancel(&self, id: String, reason: String) -> DomainResult<Job> {
        self.call(|reply| Command::Cancel { id, reason, actor: Actor::Operator, reply }).await
    }

    /// What the dispatcher knows about why a queued job of `pool` waits.
    pub async fn wait_facts(&self, id: String, pool: String) -> DomainResult<WaitFacts> {
        self.call(|reply| Command::WaitFacts { id, pool, reply }).await
    }

    /// Cancels a job on behalf of a named requester (recorded in a
    /// dashboard job's steps).
    pub async fn cancel_as(&self, id: String, reason: String, actor: String) -> DomainResult<Job> {
        self.call(|reply| Command::Cancel { id, reason, actor: Actor::Named(actor), reply }).await
    }

    pub async fn claim(&self, request: ClaimRequest) -> DomainResult<Option<Job>> {
        self.call(|reply| Command::Claim { request, reply }).await
    }

    pub async fn start_job(&self, job: AttemptRef) -> DomainResult<Job> {
        self.call(|reply| Command::Start { job, reply }).await
    }

    pub async fn complete(&self, job: AttemptRef, result: Bytes) -> DomainResult<Job> {
        self.call(|reply| Command::Complete { job, result, reply }).await
    }

    pub async fn fail(&self, job: AttemptRef, error: String, failure: Failure) -> DomainResult<Job> {
        self.call(|reply| Command::Fail { job, error, failure, reply }).await
    }

    pub async fn renew(&self, job: AttemptRef, lease: Option<Duration>) -> DomainResult<Job> {
        self.call(|reply| Command::Renew { job, lease, reply }).await
    }

    /// Hands the engine a peer's wake-up; returns how many jobs it will try.
    /// A peer's notice: jobs that became ready or changed there, and
    /// agents whose stored record an operator changed there.
    pub async fn wake(&self, jobs: Vec<WakeJob>, agents: Vec<String>) -> DomainResult<u32> {
        self.call(|reply| Command::Wake { jobs, agents, reply }).await
    }

    pub async fn redrive(&self, id: String) -> DomainResult<Job> {
        self.call(|reply| Command::Redrive { id, reply }).await
    }

    pub async fn stats(&self, queue: Option<String>) -> DomainResult<QueueStats> {
        // On a shared store the engine counts only its own writes; the
        // store's counts are everyone's.
        let rows = match self.store.ownership() {
            Ownership::Shared => Some(self.store.counts().await.map_err(store_error)?),
            Ownership::Exclusive => None,
        };
        self.call(|reply| Command::Stats { queue, rows, reply }).await
    }

    /// Opens an agent session; pushes for it arrive on `pushes`.
    pub async fn connect(
        &self,
        hello: HelloInfo,
        pushes: mpsc::UnboundedSender<AgentPush>,
    ) -> DomainResult<WelcomeInfo> {
        self.call(|reply| Command::Connect { hello, pushes, reply }).await
    }

    /// Forwards one message of a session. Waits while the engine is busy,
    /// which slows the agent's stream down (backpressure).
    /// Hands the engine messages of one session, in order.
    pub async fn inbound(&self, agent_id: String, session_id: u64, messages: Vec<AgentInbound>) -> DomainResult<()> {
        self.commands
            .send(Command::Inbound { agent_id, session_id, messages })
            .await
            .map_err(|_| DomainError::Unavailable("the engine has stopped".into()))
    }

    /// Tells the engine a session's stream ended.
    pub async fn disconnected(&self, agent_id: String, session_id: u64) {
        let _ = self.commands.send(Command::Disconnected { agent_id, session_id }).await;
    }

    pub async fn register_agent(&self, hello: HelloInfo) -> DomainResult<(AgentView, bool)> {
        self.call(|reply| Command::RegisterAgent { hello, reply }).await
    }

    pub async fn get_agent(&self, id: String) -> DomainResult<AgentView> {
        self.call(|reply| Command::GetAgent { id, reply }).await
    }

    pub async fn list_agents(&self, filter: AgentListFilter) -> DomainResult<AgentPage> {
        self.call(|reply| Command::ListAgents { filter, reply }).await
    }

    /// Agents per (health, connected) in one pass, without copying any agent.
    pub async fn agent_counts(&self) -> DomainResult<Vec<(Health, bool, u64)>> {
        self.call(|reply| Command::AgentCounts { reply }).await
    }

    pub async fn drain_agent(&self, id: String, reason: String) -> DomainResult<AgentView> {
        self.call(|reply| Command::DrainAgent { id, reason, reply }).await
    }

    pub async fn deregister_agent(&self, id: String) -> DomainResult<AgentView> {
        self.call(|reply| Command::DeregisterAgent { id, reply }).await
    }

    pub async fn heartbeat(
        &self,
        agent_id: String,
        metrics: Metrics,
        running: Vec<AttemptRef>,
    ) -> DomainResult<HeartbeatAnswer> {
        self.call(|reply| Command::Heartbeat { agent_id, metrics, running, reply }).await
    }

    pub async fn update_status(&self, id: String, status: SchedulingStatus, reason: String) -> DomainResult<AgentView> {
        self.call(|reply| Command::UpdateStatus { id, status, reason, reply }).await
    }

    pub async fn create_pool(&self, pool: Pool) -> DomainResult<Pool> {
        self.call(|reply| Command::CreatePool { pool, reply }).await
    }

    pub async fn get_pool(&self, name: String) -> DomainResult<Pool> {
        self.call(|reply| Command::GetPool { name, reply }).await
    }

    pub async fn list_pools(&self, after: Option<String>, limit: usize) -> DomainResult<(Vec<Pool>, Option<String>)> {
        self.call(|reply| Command::ListPools { after, limit, reply }).await
    }

    pub async fn update_pool(&self, pool: Pool, fields: Vec<PoolField>) -> DomainResult<Pool> {
        self.call(|reply| Command::UpdatePool { pool, fields, reply }).await
    }

    pub async fn delete_pool(&self, name: String) -> DomainResult<Pool> {
        self.call(|reply| Command::DeletePool { name, reply }).await
    }

    pub async fn scaling_signal(&self, name: String) -> DomainResult<ScalingSignal> {
        self.call(|reply| Command::Scaling { name, reply }).await
    }

    /// Wakes (`changed`) after every commit of this replica that added to
    /// the activity log (the engine's agent changes, and deployments, which
    /// call [`EngineHandle::activity_committed`]).
    pub fn subscribe_activity(&self) -> watch::Receiver<u64> {
        self.activity_written.subscribe()
    }

    /// Tells activity readers a write outside the engine added to the
    /// activity log.
    pub fn activity_committed(&self) {
        self.activity_written.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Stops the engine after committing every pending write.
    pub async fn shutdown(&self) {
        let (reply, done) = oneshot::channel();
        if self.commands.send(Command::Shutdown { reply }).await.is_ok() {
            let _ = done.await;
        }
    }

    /// Stops giving this replica's agents work and, once what is pending
    /// is durable, tells those that understand it to reconnect elsewhere.
    /// Returns once every such stream has closed or `within` has passed;
    /// the number still open is returned.
    pub async fn leave(&self, within: Duration) -> usize {
        let (reply, told) = oneshot::channel();
        if self.commands.send(Command::Leave { reply }).await.is_err() {
            return 0;
        }
        let Ok(mut open) = told.await else { return 0 };
        let _ = tokio::time::timeout(within, open.wait_for(|n| *n == 0)).await;
        let left = *open.borrow();
        left
    }

    /// Every job state change from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<JobEvent> {
        self.events.subscribe()
    }

    /// Wakes (`changed`) after every commit that added to the event log
    /// from now on, including changes made before this call and committed
    /// after it.
    pub fn subscribe_log(&self) -> watch::Receiver<u64> {
        self.log_written.subscribe()
    }

    /// Wakes (`changed`) after every commit that stored job output from now
    /// on (this replica's agents' output).
    pub fn subscribe_output(&self) -> watch::Receiver<u64> {
        self.output_written.subscribe()
    }

    /// The stored output of one attempt of a job, in sequence order.
    pub async fn logs(&self, job_id: &str, attempt: u32) -> DomainResult<Vec<crate::store::LogChunk>> {
        self.store.logs(job_id, attempt).await.map_err(store_error)
    }

    /// One attempt's chunks after sequence `after`.
    pub async fn logs_after(
        &self,
        job_id: &str,
        attempt: u32,
        after: u64,
    ) -> DomainResult<Vec<crate::store::LogChunk>> {
        self.store.logs_after(job_id, attempt, after).await.map_err(store_error)
    }

    /// Whether the engine serves (false after a store failure or shutdown).
    pub fn serving(&self) -> Serving {
        self.serving.clone()
    }

    /// A job as last acknowledged (read from the store).
    pub async fn get_job(&self, id: &str) -> DomainResult<Job> {
        let job = self.store.get_job(id).await.map_err(store_error)?.ok_or_else(|| DomainError::job_not_found(id))?;
        self.report_defects(std::slice::from_ref(&job));
        Ok(job)
    }

    pub async fn list_jobs(
        &self,
        filter: &JobFilter,
        before_seq: Option<u64>,
        limit: usize,
    ) -> DomainResult<Page<Job>> {
        let page = self.store.list_jobs(filter, before_seq, limit).await.map_err(store_error)?;
        self.report_defects(&page.items);
        Ok(page)
    }

    pub async fn list_dead_letters(
        &self,
        queue: Option<&str>,
        after_seq: Option<u64>,
        limit: usize,
    ) -> DomainResult<Page<Job>> {
        self.store.list_dead_letters(queue, after_seq, limit).await.map_err(store_error)
    }

    /// Tells the engine about read jobs it should quarantine (queued or
    /// active ones that cannot be handled). Best effort: a busy engine
    /// finds them when it dispatches them anyway.
    fn report_defects(&self, jobs: &[Job]) {
        for job in jobs {
            let live = job.state == crate::domain::JobState::Queued || job.state.is_active();
            if live && job.defect().is_some() {
                let _ = self.commands.try_send(Command::Inspect { id: job.id.clone() });
            }
        }
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub fn watch_settings(&self) -> WatchSettings {
        self.watch
    }

    /// A reader of the job log from `position` that shares this replica's
    /// reads of it with every other watcher once it has caught up.
    pub fn follow_log(&self, position: EventCursor) -> crate::tail::Follower {
        crate::tail::Follower::new(&self.tail, position)
    }

    /// The event log's shard count (a cursor names a position in each).
    pub fn event_shards(&self) -> u32 {
        self.store.event_shards()
    }

    /// The cursor of the present.
    pub async fn event_heads(&self) -> DomainResult<EventCursor> {
        self.store.event_heads().await.map_err(store_error)
    }

    /// Events after `cursor`. A cursor this store did not issue is
    /// INVALID_ARGUMENT naming `field`; one older than the retention is
    /// [`DomainError::Expired`].
    pub async fn read_events(
        &self,
        field: &str,
        cursor: &EventCursor,
        limit: usize,
    ) -> DomainResult<(Vec<Event>, EventCursor)> {
        cursor.check_shards(self.store.event_shards()).map_err(|_| {
            DomainError::invalid(field, "was issued by a server with another store; watch without a cursor")
        })?;
        match self.store.read_events(cursor, limit).await.map_err(store_error)? {
            EventRead::Events { events, next } => Ok((events, next)),
            EventRead::Unknown => Err(DomainError::invalid(
                field,
                "is ahead of this server's event log: it was not issued by this server",
            )),
            EventRead::Expired => Err(DomainError::Expired(format!(
                "{field} is older than the event retention ({}): the events after it were trimmed; watch again \
                 without a cursor (from now) and read the current state with ListQueuedJobs",
                crate::config::format_duration(self.watch.retention)
            ))),
        }
    }
}

/// A store failure as the caller sees it: corrupt data is an internal
/// error (retrying will not help), anything else is worth a retry.
pub(crate) fn store_error(e: StoreError) -> DomainError {
    match e {
        StoreError::Corrupt(_) | StoreError::Rejected(_) => DomainError::Internal(e.to_string()),
        _ => DomainError::Unavailable(e.to_string()),
    }
}
