//! WatchEvents' stream: a task that reads the job log and the activity log
//! from the watcher's position (one cursor string naming a position in
//! every shard of both) and sends each change of a watched kind with the
//! position after it. The job log is read through this replica's log tail
//! once caught up (`crate::tail`); the activity log (a few changes a
//! second) directly, after this replica's activity commits and, on a
//! shared store, every poll interval. A quiet stream gets keep-alives; a
//! position past the retention gets a reset and the stream goes on from
//! the present.

use std::time::SystemTime;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use pb::watch_events_response::Event as Sent;
use tether::v1 as pb;

use super::convert;
use super::status::to_status;
use super::watch::{in_time_order, READ_BATCH};
use super::{dashboard_convert, deploy_convert, event_cursor};
use crate::activity::{AgentChange, Change};
use crate::domain::dashboard::{DashboardStatus, DASHBOARD_QUEUE};
use crate::domain::{DomainError, DomainResult, Health};
use crate::engine::{store_error, AgentView, EngineHandle};
use crate::store::{ActivityEvent, Event, EventCursor, LogRead, Store};
use crate::tail::Follower;
use tether::time::to_timestamp;

/// As many as there are kinds (the proto's rule).
const MAX_KINDS: usize = 3;

/// Responses buffered for a slow client before the task waits for it.
const BUFFER: usize = 64;

/// Which kinds a watcher wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kinds {
    pub jobs: bool,
    pub deployments: bool,
    pub agents: bool,
}

impl Kinds {
    /// The kinds of a request; none named means all.
    pub fn of(field: &str, values: &[i32]) -> DomainResult<Kinds> {
        if values.is_empty() {
            return Ok(Kinds { jobs: true, deployments: true, agents: true });
        }
        if values.len() > MAX_KINDS {
            return Err(DomainError::invalid(field, format!("must name at most {MAX_KINDS} kinds")));
        }
        let mut kinds = Kinds { jobs: false, deployments: false, agents: false };
        for (i, &value) in values.iter().enumerate() {
            match pb::EventKind::try_from(value) {
                Ok(pb::EventKind::Job) => kinds.jobs = true,
                Ok(pb::EventKind::Deployment) => kinds.deployments = true,
                Ok(pb::EventKind::Agent) => kinds.agents = true,
                Ok(pb::EventKind::Unspecified) => {
                    return Err(DomainError::invalid(format!("{field}[{i}]"), "must be a kind, not unspecified"))
                }
                Err(_) => return Err(DomainError::invalid(format!("{field}[{i}]"), format!("unknown kind {value}"))),
            }
        }
        Ok(kinds)
    }

    fn activity(self) -> bool {
        self.deployments || self.agents
    }
}

/// A position in every shard of both logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    jobs: EventCursor,
    activity: EventCursor,
}

impl Position {
    /// The cursor string: the job log's shards, then the activity log's.
    pub fn encode(&self) -> String {
        let mut positions = self.jobs.positions.clone();
        positions.extend_from_slice(&self.activity.positions);
        event_cursor::encode(&EventCursor { positions })
    }

    /// The position in `text` (`None` when empty: from now), for `store`'s
    /// layout.
    pub fn decode(field: &str, text: &str, store: &dyn Store) -> DomainResult<Option<Position>> {
        let Some(mut cursor) = event_cursor::decode(field, text)? else { return Ok(None) };
        let jobs = store.event_shards() as usize;
        if cursor.positions.len() != jobs + store.activity_shards() as usize {
            return Err(DomainError::invalid(
                field,
                "is not a WatchEvents cursor of a server with this store; watch without a cursor",
            ));
        }
        let activity = cursor.positions.split_off(jobs);
        Ok(Some(Position { jobs: cursor, activity: EventCursor { positions: activity } }))
    }

    async fn present(store: &dyn Store) -> DomainResult<Position> {
        Ok(Position {
            jobs: store.event_heads().await.map_err(store_error)?,
            activity: store.activity_heads().await.map_err(store_error)?,
        })
    }

    fn advance(&mut self, item: &Item) {
        match item {
            Item::Job(event) => self.jobs.advance_to(event.shard, event.seq),
            Item::Activity(event) => self.activity.advance_to(event.shard, event.seq),
        }
    }
}

/// One entry read from either log.
#[derive(Debug)]
enum Item {
    Job(Box<Event>),
    Activity(ActivityEvent),
}

impl Item {
    /// Entries of one shard keep their order; this names the shard.
    fn shard(&self) -> (bool, u32) {
        match self {
            Item::Job(e) => (false, e.shard),
            Item::Activity(e) => (true, e.shard),
        }
    }

    fn time(&self) -> SystemTime {
        match self {
            Item::Job(e) => e.job.update_time,
            Item::Activity(e) => e.activity.time,
        }
    }
}

/// Up to [`READ_BATCH`] activity entries per shard after `at`, and
/// whether the read may have stopped short. `None`: trimmed past `at`.
async fn read_activity(store: &dyn Store, at: &EventCursor) -> DomainResult<Option<(Vec<Item>, bool)>> {
    match store.read_activity(at, READ_BATCH).await.map_err(store_error)? {
        LogRead::Events { events, .. } => {
            let full = events.len() >= READ_BATCH;
            Ok(Some((events.into_iter().map(Item::Activity).collect(), full)))
        }
        LogRead::Expired => Ok(None),
        LogRead::Unknown => Err(ahead()),
    }
}

fn ahead() -> DomainError {
    DomainError::invalid("cursor", "is ahead of this server's logs: it was not issued by this server")
}

/// Where a watch starts: its first reads are done before the call answers,
/// so a cursor that is invalid is the call's status.
pub struct Start {
    kinds: Kinds,
    position: Position,
    items: Vec<Item>,
    /// The job log's reader (`None` when jobs are not watched).
    jobs: Option<Follower>,
    /// This replica's activity commits (`None` when no activity kind is
    /// watched).
    activity: Option<watch::Receiver<u64>>,
    /// Activity is left to read at once (the last read stopped short).
    activity_more: bool,
    /// Why the stream starts with a reset, if it does.
    reset: Option<String>,
}

pub async fn start(engine: &EngineHandle, kinds: Kinds, from: Option<Position>) -> DomainResult<Start> {
    let store = engine.store().as_ref();
    // Subscribed before the first reads: a change committed after them is
    // not missed.
    let activity = kinds.activity().then(|| engine.subscribe_activity());
    let mut jobs = kinds.jobs.then(|| engine.follow_log(EventCursor::default()));
    let Some(from) = from else {
        let present = Position::present(store).await?;
        if let Some(jobs) = jobs.as_mut() {
            jobs.read_to(present.jobs.clone(), false);
        }
        return Ok(Start {
            kinds,
            position: present,
            items: Vec::new(),
            jobs,
            activity,
            activity_more: false,
            reset: None,
        });
    };
    let mut start =
        Start { kinds, position: from, items: Vec::new(), jobs: None, activity, activity_more: false, reset: None };
    let mut items = Vec::new();
    let mut expired = false;
    if let Some(jobs) = jobs.as_mut() {
        match engine.read_events("cursor", &start.position.jobs, READ_BATCH).await {
            Ok((events, next)) => {
                jobs.read_to(next, events.len() >= READ_BATCH);
                items.extend(events.into_iter().map(|e| Item::Job(Box::new(e))));
            }
            Err(DomainError::Expired(_)) => expired = true,
            Err(e) => return Err(e),
        }
    }
    if kinds.activity() && !expired {
        match read_activity(store, &start.position.activity).await? {
            Some((read, full)) => {
                items.extend(read);
                start.activity_more = full;
            }
            None => expired = true,
        }
    }
    if expired {
        // From the present (read only now: a resumed watch rarely needs it),
        // after a reset.
        start.position = Position::present(store).await?;
        if let Some(jobs) = jobs.as_mut() {
            jobs.read_to(start.position.jobs.clone(), false);
        }
        start.activity_more = false;
        start.reset = Some(expired_reason(engine));
    } else {
        start.items = in_time_order(items, Item::shard, Item::time);
    }
    start.jobs = jobs;
    Ok(start)
}

fn expired_reason(engine: &EngineHandle) -> String {
    format!(
        "changes after the cursor are older than the event retention ({}) and were trimmed",
        crate::config::format_duration(engine.watch_settings().retention)
    )
}

/// Spawns the task; the stream ends when the client goes, at shutdown, or
/// with an error status.
pub fn spawn(
    engine: EngineHandle,
    start: Start,
    stopping: CancellationToken,
) -> mpsc::Receiver<Result<pb::WatchEventsResponse, Status>> {
    let (tx, rx) = mpsc::channel(BUFFER);
    tokio::spawn(async move {
        tokio::select! {
            () = run(&engine, start, &tx) => {}
            () = stopping.cancelled() => {}
            () = tx.closed() => {}
        }
    });
    rx
}

/// What the task does next.
enum Next {
    Items(Vec<Item>),
    /// The position was trimmed (the watcher fell behind the retention).
    Expired,
    KeepAlive,
    /// The engine or its log tail stopped.
    Closed,
    /// A wake-up noted; nothing to send yet.
    Nothing,
}

/// The job log's next events for a watcher of jobs; never for another.
async fn next_jobs(jobs: Option<&mut Follower>, engine: &EngineHandle) -> DomainResult<Next> {
    let Some(jobs) = jobs else { return std::future::pending().await };
    match jobs.next(engine, "cursor").await {
        Ok(Some(events)) => Ok(Next::Items(events.into_iter().map(|e| Item::Job(Box::new(e))).collect())),
        Ok(None) => Ok(Next::Closed),
        Err(DomainError::Expired(_)) => Ok(Next::Expired),
        Err(e) => Err(e),
    }
}

/// Waits for this replica's next activity commit; never for a watcher of
/// jobs only. False when the engine is gone. (`changed` marks every commit
/// so far as seen, and only when it returns: one read answers them all,
/// and a wait cut short loses none.)
async fn activity_commit(wake: Option<&mut watch::Receiver<u64>>) -> bool {
    let Some(wake) = wake else { return std::future::pending().await };
    wake.changed().await.is_ok()
}

async fn run(engine: &EngineHandle, start: Start, tx: &mpsc::Sender<Result<pb::WatchEventsResponse, Status>>) {
    let Start { kinds, mut position, mut items, mut jobs, mut activity, activity_more, reset } = start;
    let settings = engine.watch_settings();
    let store = engine.store().as_ref();
    let send = |event: Sent, position: &Position| {
        tx.send(Ok(pb::WatchEventsResponse { event: Some(event), cursor: position.encode() }))
    };
    if let Some(reason) = reset {
        if send(Sent::Reset(pb::EventsReset { reason }), &position).await.is_err() {
            return;
        }
    }
    let mut quiet_since = Instant::now();
    let mut last_activity_read = Instant::now();
    // Activity to read at once: the first read stopped short.
    let mut activity_due = activity_more;
    let mut poll_at = Instant::now() + settings.poll.unwrap_or_default();
    loop {
        for item in std::mem::take(&mut items) {
            position.advance(&item);
            let Some(event) = response_of(kinds, &item) else { continue };
            if send(event, &position).await.is_err() {
                return;
            }
            quiet_since = Instant::now();
        }
        // Activity is read once due: after a wake-up of this replica's
        // activity commits or the poll (shared store), no sooner than the
        // least read interval after the last read. The wake-up and the poll
        // deadline are kept across turns, so a turn won by the job log
        // loses neither.
        let watched = activity.is_some();
        let read_at = settings.min_read_interval.map_or(last_activity_read, |least| last_activity_read + least);
        let next = tokio::select! {
            next = next_jobs(jobs.as_mut(), engine) => next,
            woken = activity_commit(activity.as_mut()), if watched && !activity_due => {
                activity_due = woken;
                if woken { Ok(Next::Nothing) } else { Ok(Next::Closed) }
            }
            () = tokio::time::sleep_until(poll_at), if watched && settings.poll.is_some() => {
                activity_due = true;
                poll_at = Instant::now() + settings.poll.unwrap_or_default();
                Ok(Next::Nothing)
            }
            () = tokio::time::sleep_until(read_at), if activity_due => {
                last_activity_read = Instant::now();
                match read_activity(store, &position.activity).await {
                    Ok(Some((read, full))) => {
                        // A full read leaves more to read at once.
                        activity_due = full;
                        Ok(Next::Items(read))
                    }
                    Ok(None) => Ok(Next::Expired),
                    Err(e) => Err(e),
                }
            }
            () = tokio::time::sleep_until(quiet_since + settings.keep_alive) => Ok(Next::KeepAlive),
        };
        match next {
            Ok(Next::Items(read)) => items = in_time_order(read, Item::shard, Item::time),
            Ok(Next::KeepAlive) => {
                let now = to_timestamp(SystemTime::now());
                if send(Sent::KeepAlive(pb::KeepAlive { time: Some(now) }), &position).await.is_err() {
                    return;
                }
                quiet_since = Instant::now();
            }
            Ok(Next::Closed) => return,
            Ok(Next::Nothing) => {}
            Ok(Next::Expired) => {
                let present = match Position::present(store).await {
                    Ok(present) => present,
                    Err(e) => {
                        let _ = tx.send(Err(to_status(e))).await;
                        return;
                    }
                };
                if let Some(jobs) = jobs.as_mut() {
                    jobs.read_to(present.jobs.clone(), false);
                }
                activity_due = false;
                position = present;
                if send(Sent::Reset(pb::EventsReset { reason: expired_reason(engine) }), &position).await.is_err() {
                    return;
                }
                quiet_since = Instant::now();
            }
            Err(e) => {
                let _ = tx.send(Err(to_status(e))).await;
                return;
            }
        }
    }
}

/// What a watcher of `kinds` is sent for `item`, if anything: job events
/// are of dashboard jobs only.
fn response_of(kinds: Kinds, item: &Item) -> Option<Sent> {
    match item {
        Item::Job(event) => {
            (kinds.jobs && event.job.spec.queue == DASHBOARD_QUEUE).then(|| Sent::Job(job_event(event)))
        }
        Item::Activity(event) => match Change::of(&event.activity) {
            Ok(Change::Agent(change)) => kinds.agents.then(|| Sent::Agent(agent_event(&change, event.activity.time))),
            Ok(Change::Deployment(change)) => kinds
                .deployments
                .then(|| Sent::Deployment(deploy_convert::event_out(&change.deployment, &change.event))),
            Err(e) => {
                tracing::error!(seq = event.seq, shard = event.shard, error = %e, "an activity entry does not decode");
                None
            }
        },
    }
}

fn job_event(event: &Event) -> pb::JobEvent {
    let job = &event.job;
    pb::JobEvent {
        job_id: job.id.clone(),
        status: dashboard_convert::status_out(DashboardStatus::of(job.state)) as i32,
        queued_state: convert::state_out(job.state) as i32,
        previous_queued_state: event.previous.map_or(0, |s| convert::state_out(s) as i32),
        attempt: job.attempt,
        agent_id: job.worker_id.clone(),
        error: job.last_error.clone(),
        time: Some(to_timestamp(job.update_time)),
    }
}

fn agent_event(change: &AgentChange, time: SystemTime) -> pb::AgentEvent {
    let agent = &change.agent;
    let connected =
        matches!(agent.health, Health::Registering | Health::Healthy | Health::Degraded | Health::Unhealthy);
    let view = AgentView { agent: agent.clone(), connected, running: Vec::new(), metrics_history: Vec::new() };
    pb::AgentEvent {
        agent: Some(convert::agent_out(&view)),
        previous_health: change.previous.map_or(0, |(h, _)| convert::health_out(h) as i32),
        previous_scheduling_status: change.previous.map_or(0, |(_, s)| convert::scheduling_out(s) as i32),
        time: Some(to_timestamp(time)),
    }
}
