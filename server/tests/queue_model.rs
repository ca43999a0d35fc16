//! A property test of the queue engine against a reference model.
//!
//! Random sequences of operations (enqueue, claim, start, complete, fail,
//! renew, stale-token calls, cancel, redrive, clock moves, lease expiry and
//! restarts) drive a real engine over a real embedded store with a manual
//! clock. A small model predicts every reply (which job a claim returns, the
//! state after each transition, attempt numbers, fencing tokens, versions,
//! the events published) and after every operation the stored jobs and the
//! statistics are compared with it.
//!
//! Retry backoff has random jitter: the model checks that the ready time of
//! a requeued job lies in [d/2, d] (d = base * 2^(attempt-1), capped) and
//! then adopts it, so every later claim is predicted exactly.

use std::cmp::Reverse;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use tether_server::clock::ManualClock;
use tether_server::domain::{
    AttemptRef, DomainError, DomainResult, Failure, Job, JobSpec, JobState, Priority, RetryPolicy, Routing,
};
use tether_server::engine::{ClaimRequest, EngineConfig, EngineHandle, JobEvent};
use tether_server::store::embedded::{EmbeddedOptions, EmbeddedStore};
use tether_server::store::{JobFilter, Store};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

/// Upper bound for any single wait; a test that hits it failed.
const WAIT: Duration = Duration::from_secs(30);
const QUEUES: [&str; 2] = ["alpha", "beta"];
const POOL: &str = "default";
/// Leases far longer than the clock moves in a case (at most 60 steps of
/// 5 s), so they end only when a test step expires them on purpose.
const LEASE: Duration = Duration::from_secs(3600);
const BACKOFF_BASE: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(4);
const GRACE: Duration = Duration::from_secs(5);
const CANCEL_REASON: &str = "cancelled by operator";
const EXPIRED: &str = "lease expired";

fn t0() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

// ---------------------------------------------------------------------------
// Operations

#[derive(Debug, Clone, Copy)]
enum Action {
    Start,
    Complete,
    Fail,
    Renew,
}

#[derive(Debug, Clone)]
enum Op {
    Enqueue {
        queue: usize,
        priority: Priority,
        max_attempts: u32,
        key: Option<u8>,
        delay_ms: Option<u64>,
    },
    /// Several jobs in one call; keys may repeat within it.
    EnqueueBatch {
        items: Vec<(usize, Priority, u32, Option<u8>)>,
    },
    Claim {
        queue: Option<usize>,
    },
    /// On the idx-th (mod) claimed or running job, with its current attempt.
    Start {
        idx: usize,
    },
    Complete {
        idx: usize,
    },
    Fail {
        idx: usize,
        retryable: bool,
    },
    Renew {
        idx: usize,
    },
    /// On a claimed or running job with a wrong token (or attempt): refused.
    Stale {
        idx: usize,
        action: Action,
        wrong_attempt: bool,
    },
    /// With the reference of an attempt that is over: refused.
    OldAttempt {
        idx: usize,
        action: Action,
    },
    /// On the idx-th (mod) job of any state.
    Cancel {
        idx: usize,
    },
    CancelMissing,
    /// On the idx-th (mod) dead letter, or with `any` of any job.
    Redrive {
        idx: usize,
        any: bool,
    },
    Advance {
        ms: u64,
    },
    /// Moves the clock past every lease and waits for the engine to fail
    /// the attempts.
    ExpireLeases,
    /// Stops the engine and starts a new one on the same store.
    Restart,
}

fn priority() -> impl Strategy<Value = Priority> {
    prop_oneof![Just(Priority::Low), Just(Priority::Normal), Just(Priority::High), Just(Priority::Critical)]
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![Just(Action::Start), Just(Action::Complete), Just(Action::Fail), Just(Action::Renew)]
}

fn op() -> impl Strategy<Value = Op> {
    let idx = 0..64usize;
    prop_oneof![
        7 => (0..QUEUES.len(), priority(), 1..=3u32, proptest::option::of(0..4u8),
              proptest::option::weighted(0.2, 0..3000u64))
            .prop_map(|(queue, priority, max_attempts, key, delay_ms)| Op::Enqueue {
                queue, priority, max_attempts, key, delay_ms
            }),
        2 => proptest::collection::vec(
                (0..QUEUES.len(), priority(), 1..=3u32, proptest::option::weighted(0.8, 0..3u8)),
                2..=3,
            )
            .prop_map(|items| Op::EnqueueBatch { items }),
        8 => proptest::option::weighted(0.3, 0..QUEUES.len()).prop_map(|queue| Op::Claim { queue }),
        2 => idx.clone().prop_map(|idx| Op::Start { idx }),
        2 => idx.clone().prop_map(|idx| Op::Complete { idx }),
        5 => (idx.clone(), any::<bool>()).prop_map(|(idx, retryable)| Op::Fail { idx, retryable }),
        1 => idx.clone().prop_map(|idx| Op::Renew { idx }),
        1 => (idx.clone(), action(), any::<bool>())
            .prop_map(|(idx, action, wrong_attempt)| Op::Stale { idx, action, wrong_attempt }),
        1 => (idx.clone(), action()).prop_map(|(idx, action)| Op::OldAttempt { idx, action }),
        2 => idx.clone().prop_map(|idx| Op::Cancel { idx }),
        1 => Just(Op::CancelMissing),
        2 => (idx, proptest::bool::weighted(0.2)).prop_map(|(idx, any)| Op::Redrive { idx, any }),
        3 => (0..5000u64).prop_map(|ms| Op::Advance { ms }),
        1 => Just(Op::ExpireLeases),
        1 => Just(Op::Restart),
    ]
}

// ---------------------------------------------------------------------------
// The model

#[derive(Debug, Clone)]
struct MJob {
    id: String,
    seq: u64,
    spec: JobSpec,
    state: JobState,
    attempt: u32,
    token: u64,
    worker: String,
    version: u64,
    create_time: SystemTime,
    update_time: SystemTime,
    ready_time: SystemTime,
    lease: Option<SystemTime>,
    finish_time: Option<SystemTime>,
    result: Bytes,
    /// Exact text, or for expiry a fragment the text contains.
    last_error: String,
    /// A queued job the engine certainly holds as dispatchable (not
    /// delayed): the lower bound of `oldest_queued_age` rests on these.
    surely_ready: bool,
}

impl MJob {
    fn attempt_ref(&self) -> AttemptRef {
        AttemptRef { job_id: self.id.clone(), attempt: self.attempt, fencing_token: self.token }
    }
}

/// An expected job event: (job id, previous state, new state).
type Ev = (String, Option<JobState>, JobState);

struct Model {
    now: SystemTime,
    /// In seq order.
    jobs: Vec<MJob>,
    next_seq: u64,
    /// Fencing tokens are per job: a claim takes the job's token plus one,
    /// but never less than a floor that jumps at every (re)start past every
    /// token issued before. The floor is learned from the first claim after
    /// a start (`floor_exact`); until then it is only known to exceed
    /// `max_issued`.
    floor: u64,
    floor_exact: bool,
    max_issued: u64,
    keys: HashMap<(usize, u8), usize>,
    /// References of attempts that are over.
    old_attempts: Vec<AttemptRef>,
}

impl Model {
    fn new(now: SystemTime) -> Model {
        Model {
            now,
            jobs: Vec::new(),
            next_seq: 1,
            floor: 1,
            floor_exact: false,
            max_issued: 0,
            keys: HashMap::new(),
            old_attempts: Vec::new(),
        }
    }

    /// Indexes of claimed or running jobs, in seq order.
    fn active(&self) -> Vec<usize> {
        (0..self.jobs.len()).filter(|&i| self.jobs[i].state.is_active()).collect()
    }

    fn pick_active(&self, idx: usize) -> Option<usize> {
        let active = self.active();
        (!active.is_empty()).then(|| active[idx % active.len()])
    }

    /// The job a claim must return: highest priority, then lowest seq, among
    /// queued jobs whose ready time has come.
    fn claimable(&self, queue: Option<usize>) -> Option<usize> {
        (0..self.jobs.len())
            .filter(|&i| {
                let j = &self.jobs[i];
                j.state == JobState::Queued
                    && j.ready_time <= self.now
                    && queue.is_none_or(|q| QUEUES[q] == j.spec.queue)
            })
            .min_by_key(|&i| (Reverse(self.jobs[i].spec.priority), self.jobs[i].seq))
    }

    /// A transition of job `i` to `state` at `now`; returns its event.
    fn transition(&mut self, i: usize, state: JobState) -> Ev {
        let now = self.now;
        let j = &mut self.jobs[i];
        let previous = j.state;
        if previous.is_active() && !state.is_active() {
            self.old_attempts.push(j.attempt_ref());
            j.lease = None;
        }
        j.state = state;
        j.version += 1;
        j.update_time = now;
        if state != JobState::Queued {
            j.surely_ready = false;
        }
        if state.is_terminal() || state == JobState::DeadLettered {
            j.finish_time = Some(now);
        }
        (j.id.clone(), Some(previous), state)
    }

    fn claim(&mut self, i: usize, worker: &str) -> Ev {
        let now = self.now;
        let token = (self.jobs[i].token + 1).max(self.floor);
        self.max_issued = self.max_issued.max(token);
        let ev = self.transition(i, JobState::Claimed);
        let j = &mut self.jobs[i];
        j.attempt += 1;
        j.token = token;
        j.worker = worker.to_string();
        j.lease = Some(now + LEASE);
        ev
    }

    /// A failed attempt: if `retried` (its retry policy retries the failure)
    /// requeued with backoff while attempts remain, else dead-lettered;
    /// failed otherwise. Returns the event and, when
    /// requeued, the window the ready time must fall in.
    fn fail(&mut self, i: usize, retried: bool, error: &str) -> (Ev, Option<(SystemTime, SystemTime)>) {
        let j = &self.jobs[i];
        let attempt = j.attempt;
        if retried && attempt < j.spec.max_attempts {
            let (lo, hi) = backoff_bounds(attempt);
            let window = (self.now + lo, self.now + hi);
            let ev = self.transition(i, JobState::Queued);
            self.jobs[i].last_error = error.to_string();
            (ev, Some(window))
        } else {
            let state = if retried { JobState::DeadLettered } else { JobState::Failed };
            let ev = self.transition(i, state);
            self.jobs[i].last_error = error.to_string();
            (ev, None)
        }
    }

    fn count(&self, queue: Option<&str>, pred: impl Fn(&MJob) -> bool) -> u64 {
        self.jobs.iter().filter(|j| queue.is_none_or(|q| q == j.spec.queue) && pred(j)).count() as u64
    }
}

fn backoff_bounds(attempt: u32) -> (Duration, Duration) {
    let exp = attempt.saturating_sub(1).min(30);
    let full = BACKOFF_BASE.saturating_mul(1u32 << exp).min(BACKOFF_MAX);
    (full / 2, full)
}

// ---------------------------------------------------------------------------
// The engine under test

struct Harness {
    dir: PathBuf,
    clock: ManualClock,
    engine: EngineHandle,
    task: JoinHandle<()>,
    store: Weak<EmbeddedStore>,
    events: broadcast::Receiver<JobEvent>,
}

fn engine_config() -> EngineConfig {
    EngineConfig {
        reconnect_grace: GRACE,
        backoff_base: BACKOFF_BASE,
        backoff_max: BACKOFF_MAX,
        ..EngineConfig::default()
    }
}

impl Harness {
    async fn start(dir: &Path, clock: ManualClock) -> Harness {
        let store = Arc::new(EmbeddedStore::open(dir, EmbeddedOptions::default()).expect("open store"));
        let weak = Arc::downgrade(&store);
        let (engine, task) = EngineHandle::start(store as Arc<dyn Store>, Arc::new(clock.clone()), engine_config())
            .await
            .expect("start");
        let events = engine.subscribe();
        Harness { dir: dir.to_path_buf(), clock, engine, task, store: weak, events }
    }

    /// Stops the engine and starts a new one on the same store and clock.
    async fn restart(self) -> Harness {
        let (dir, clock) = (self.dir.clone(), self.clock.clone());
        self.stop().await;
        Harness::start(&dir, clock).await
    }

    /// Shuts the engine down and waits until its store is closed.
    async fn stop(self) {
        self.engine.shutdown().await;
        tokio::time::timeout(WAIT, self.task).await.expect("engine stops in time").expect("engine task");
        drop(self.engine);
        assert!(self.store.upgrade().is_none(), "the store is still open after shutdown");
    }

    /// Every event published since the last call.
    fn drain_events(&mut self) -> Result<Vec<Ev>, TestCaseError> {
        let mut out = Vec::new();
        loop {
            match self.events.try_recv() {
                Ok(event) => out.push((event.job.id.clone(), event.previous, event.job.state)),
                Err(broadcast::error::TryRecvError::Empty) => return Ok(out),
                Err(e) => return Err(TestCaseError::fail(format!("event stream: {e}"))),
            }
        }
    }
}

fn is_precondition<T: std::fmt::Debug>(result: &DomainResult<T>) -> bool {
    matches!(result, Err(DomainError::FailedPrecondition(_)))
}

fn check_job(got: &Job, want: &MJob, ctx: &str) -> Result<(), TestCaseError> {
    let who = format!("{ctx}: job seq {}", want.seq);
    prop_assert_eq!(&got.id, &want.id, "{}: id", who);
    prop_assert_eq!(got.seq, want.seq, "{}: seq", who);
    prop_assert_eq!(&got.spec, &want.spec, "{}: spec", who);
    prop_assert_eq!(got.state, want.state, "{}: state", who);
    prop_assert_eq!(got.attempt, want.attempt, "{}: attempt", who);
    prop_assert_eq!(got.fencing_token, want.token, "{}: fencing token", who);
    prop_assert_eq!(&got.worker_id, &want.worker, "{}: worker", who);
    prop_assert_eq!(got.version, want.version, "{}: version", who);
    prop_assert_eq!(got.create_time, want.create_time, "{}: create time", who);
    prop_assert_eq!(got.update_time, want.update_time, "{}: update time", who);
    prop_assert_eq!(got.ready_time, want.ready_time, "{}: ready time", who);
    prop_assert_eq!(got.lease_expire_time, want.lease, "{}: lease", who);
    prop_assert_eq!(got.run_deadline, None, "{}: run deadline", who);
    prop_assert_eq!(got.finish_time, want.finish_time, "{}: finish time", who);
    prop_assert_eq!(&got.result, &want.result, "{}: result", who);
    if want.last_error == EXPIRED {
        prop_assert!(got.last_error.contains(EXPIRED), "{}: last error {:?}", who, got.last_error);
    } else {
        prop_assert_eq!(&got.last_error, &want.last_error, "{}: last error", who);
    }
    Ok(())
}

/// A reply that must be the model's job `i`.
fn check_reply(reply: DomainResult<Job>, m: &Model, i: usize, ctx: &str) -> Result<Job, TestCaseError> {
    match reply {
        Ok(job) => {
            check_job(&job, &m.jobs[i], ctx)?;
            Ok(job)
        }
        Err(e) => Err(TestCaseError::fail(format!("{ctx}: expected job seq {} but got error {e}", m.jobs[i].seq))),
    }
}

/// The ready time of a requeued job lies in its backoff window; the model
/// adopts it.
fn adopt_ready_time(
    m: &mut Model,
    i: usize,
    got: &Job,
    (lo, hi): (SystemTime, SystemTime),
    ctx: &str,
) -> Result<(), TestCaseError> {
    prop_assert!(
        lo <= got.ready_time && got.ready_time <= hi,
        "{}: retry of job seq {} ready at {:?}, outside the backoff window [{:?}, {:?}]",
        ctx,
        m.jobs[i].seq,
        got.ready_time,
        lo,
        hi
    );
    m.jobs[i].ready_time = got.ready_time;
    Ok(())
}

fn sorted_events(mut evs: Vec<Ev>) -> Vec<Ev> {
    evs.sort_by(|a, b| a.0.cmp(&b.0));
    evs
}

async fn verify(h: &Harness, m: &Model, ctx: &str) -> Result<(), TestCaseError> {
    for want in &m.jobs {
        let got = h.engine.get_job(&want.id).await;
        let got = got.map_err(|e| TestCaseError::fail(format!("{ctx}: get job seq {}: {e}", want.seq)))?;
        check_job(&got, want, ctx)?;
    }
    let scopes = std::iter::once(None).chain(QUEUES.iter().map(|q| Some(*q)));
    for queue in scopes {
        let stats = h.engine.stats(queue.map(str::to_string)).await.map_err(|e| TestCaseError::fail(e.to_string()))?;
        for (state, n) in &stats.by_state {
            let want = m.count(queue, |j| j.state == *state);
            prop_assert_eq!(*n, want, "{}: stats({:?}) count of {:?}", ctx, queue, state);
        }
        prop_assert_eq!(stats.by_state.len(), JobState::ALL.len());
        for (priority, n) in &stats.queued_by_priority {
            let want = m.count(queue, |j| j.state == JobState::Queued && j.spec.priority == *priority);
            prop_assert_eq!(*n, want, "{}: stats({:?}) queued at {:?}", ctx, queue, priority);
        }
        // The oldest dispatchable job: the engine promotes due jobs on its
        // own timer, so only bounds are certain.
        let age = stats.oldest_queued_age;
        let in_scope = |j: &&MJob| j.state == JobState::Queued && queue.is_none_or(|q| q == j.spec.queue);
        let oldest_due = m.jobs.iter().filter(in_scope).filter(|j| j.ready_time <= m.now).map(|j| j.create_time).min();
        let oldest_sure = m.jobs.iter().filter(in_scope).filter(|j| j.surely_ready).map(|j| j.create_time).min();
        match oldest_due {
            None => prop_assert_eq!(age, Duration::ZERO, "{}: stats({:?}) oldest queued age", ctx, queue),
            Some(t) => {
                let most = m.now.duration_since(t).unwrap_or_default();
                prop_assert!(age <= most, "{}: stats({:?}) oldest age {:?} > {:?}", ctx, queue, age, most);
            }
        }
        if let Some(t) = oldest_sure {
            let least = m.now.duration_since(t).unwrap_or_default();
            prop_assert!(age >= least, "{}: stats({:?}) oldest age {:?} < {:?}", ctx, queue, age, least);
        }
    }
    Ok(())
}

/// Listings agree with the model: every job newest first (in pages), per
/// queue and state, and the dead letters oldest first.
async fn verify_listings(h: &Harness, m: &Model) -> Result<(), TestCaseError> {
    let fail = |e: DomainError| TestCaseError::fail(format!("listing: {e}"));
    for limit in [1000, 3] {
        let mut ids = Vec::new();
        let mut before = None;
        loop {
            let page = h.engine.list_jobs(&JobFilter::default(), before, limit).await.map_err(fail)?;
            prop_assert!(page.items.len() <= limit);
            ids.extend(page.items.iter().map(|j| j.id.clone()));
            match page.next {
                Some(n) => before = Some(n),
                None => break,
            }
        }
        let want: Vec<String> = m.jobs.iter().rev().map(|j| j.id.clone()).collect();
        prop_assert_eq!(ids, want, "list_jobs with pages of {}", limit);
    }
    for (q, queue) in QUEUES.iter().enumerate() {
        for state in [JobState::Queued, JobState::DeadLettered, JobState::Succeeded] {
            let filter = JobFilter { queue: Some(queue.to_string()), states: vec![state, JobState::Cancelled] };
            let page = h.engine.list_jobs(&filter, None, 1000).await.map_err(fail)?;
            let got: Vec<String> = page.items.iter().map(|j| j.id.clone()).collect();
            let want: Vec<String> = m
                .jobs
                .iter()
                .rev()
                .filter(|j| j.spec.queue == QUEUES[q] && (j.state == state || j.state == JobState::Cancelled))
                .map(|j| j.id.clone())
                .collect();
            prop_assert_eq!(got, want, "list_jobs of {} in {:?}", queue, state);
        }
    }
    let dead = h.engine.list_dead_letters(None, None, 1000).await.map_err(fail)?;
    let got: Vec<String> = dead.items.iter().map(|j| j.id.clone()).collect();
    let want: Vec<String> = m.jobs.iter().filter(|j| j.state == JobState::DeadLettered).map(|j| j.id.clone()).collect();
    prop_assert_eq!(got, want, "dead letters");
    Ok(())
}

fn spec(
    queue: usize,
    priority: Priority,
    max_attempts: u32,
    key: Option<u8>,
    not_before: Option<SystemTime>,
    step: usize,
) -> JobSpec {
    let payload = match key {
        Some(k) => format!("job-{}-key-{k}", QUEUES[queue]),
        None => format!("job-{step}"),
    };
    JobSpec {
        queue: QUEUES[queue].to_string(),
        payload: Bytes::from(payload),
        priority,
        routing: Routing { pool: POOL.to_string(), required_labels: Default::default() },
        max_attempts,
        lease_duration: LEASE,
        timeout: None,
        idempotency_key: key.map(|k| format!("key-{k}")),
        not_before,
        retry: if max_attempts.is_multiple_of(2) { RetryPolicy::any() } else { RetryPolicy::default() },
    }
}

/// Runs one operation on engine and model; returns the events expected.
async fn step(h: &mut Harness, m: &mut Model, step: usize, op: &Op, ctx: &str) -> Result<Vec<Ev>, TestCaseError> {
    let mut events = Vec::new();
    match op {
        Op::Enqueue { queue, priority, max_attempts, key, delay_ms } => {
            let not_before = delay_ms.map(|ms| m.now + Duration::from_millis(ms));
            let specs = vec![(*queue, spec(*queue, *priority, *max_attempts, *key, not_before, step))];
            enqueue(h, m, specs, &mut events, ctx).await?;
        }
        Op::EnqueueBatch { items } => {
            let specs = items
                .iter()
                .enumerate()
                .map(|(n, &(queue, priority, max_attempts, key))| {
                    (queue, spec(queue, priority, max_attempts, key, None, step * 10 + n))
                })
                .collect();
            enqueue(h, m, specs, &mut events, ctx).await?;
        }
        Op::Claim { queue } => {
            let worker = format!("worker-{step}");
            let request = ClaimRequest {
                worker_id: worker.clone(),
                queue: queue.map(|q| QUEUES[q].to_string()),
                pool: POOL.to_string(),
                labels: Default::default(),
            };
            let reply = h.engine.claim(request).await.map_err(|e| TestCaseError::fail(format!("{ctx}: {e}")))?;
            // The claim promotes every due job.
            let now = m.now;
            for j in m.jobs.iter_mut().filter(|j| j.state == JobState::Queued && j.ready_time <= now) {
                j.surely_ready = true;
            }
            match (m.claimable(*queue), reply) {
                (None, None) => {}
                (None, Some(job)) => {
                    return Err(TestCaseError::fail(format!(
                        "{ctx}: nothing is claimable but the claim returned seq {} ({:?}, attempt {})",
                        job.seq, job.spec.priority, job.attempt
                    )))
                }
                (Some(i), None) => {
                    return Err(TestCaseError::fail(format!(
                        "{ctx}: the claim returned nothing, expected seq {}",
                        m.jobs[i].seq
                    )))
                }
                (Some(i), Some(job)) => {
                    prop_assert_eq!(
                        job.seq,
                        m.jobs[i].seq,
                        "{}: claimed the wrong job ({:?} vs expected {:?})",
                        ctx,
                        job.spec.priority,
                        m.jobs[i].spec.priority
                    );
                    if !m.floor_exact {
                        prop_assert!(
                            job.fencing_token > m.max_issued,
                            "{}: fencing token {} is not above every token issued before the start ({})",
                            ctx,
                            job.fencing_token,
                            m.max_issued
                        );
                        m.floor = job.fencing_token;
                        m.floor_exact = true;
                    }
                    events.push(m.claim(i, &worker));
                    check_job(&job, &m.jobs[i], ctx)?;
                }
            }
        }
        Op::Start { idx } => {
            let Some(i) = m.pick_active(*idx) else { return Ok(events) };
            let reply = h.engine.start_job(m.jobs[i].attempt_ref()).await;
            if m.jobs[i].state == JobState::Claimed {
                events.push(m.transition(i, JobState::Running));
            }
            check_reply(reply, m, i, ctx)?;
        }
        Op::Complete { idx } => {
            let Some(i) = m.pick_active(*idx) else { return Ok(events) };
            let result = Bytes::from(format!("result-{step}"));
            let reply = h.engine.complete(m.jobs[i].attempt_ref(), result.clone()).await;
            events.push(m.transition(i, JobState::Succeeded));
            m.jobs[i].result = result;
            check_reply(reply, m, i, ctx)?;
        }
        Op::Fail { idx, retryable } => {
            let Some(i) = m.pick_active(*idx) else { return Ok(events) };
            let error = format!("error-{step}");
            let failure = Failure::Reported { retryable: *retryable, exit_code: None };
            let reply = h.engine.fail(m.jobs[i].attempt_ref(), error.clone(), failure).await;
            // Jobs with an even max_attempts retry every failure; the others
            // (no retry policy) fail at once.
            let retried = *retryable && m.jobs[i].spec.retry.any_failure;
            let (ev, window) = m.fail(i, retried, &error);
            events.push(ev);
            if let (Some(window), Ok(job)) = (window, &reply) {
                adopt_ready_time(m, i, job, window, ctx)?;
            }
            check_reply(reply, m, i, ctx)?;
        }
        Op::Renew { idx } => {
            let Some(i) = m.pick_active(*idx) else { return Ok(events) };
            let reply = h.engine.renew(m.jobs[i].attempt_ref(), None).await;
            // A renewal changes no state, so it publishes no event.
            let state = m.jobs[i].state;
            let _ = m.transition(i, state);
            m.jobs[i].lease = Some(m.now + LEASE);
            check_reply(reply, m, i, ctx)?;
        }
        Op::Stale { idx, action, wrong_attempt } => {
            let Some(i) = m.pick_active(*idx) else { return Ok(events) };
            let mut r = m.jobs[i].attempt_ref();
            if *wrong_attempt {
                r.attempt += 1;
            } else {
                r.fencing_token += 1;
            }
            let refused = act(h, *action, r, step).await;
            prop_assert!(refused, "{}: a stale reference was accepted", ctx);
        }
        Op::OldAttempt { idx, action } => {
            if m.old_attempts.is_empty() {
                return Ok(events);
            }
            let r = m.old_attempts[idx % m.old_attempts.len()].clone();
            let refused = act(h, *action, r.clone(), step).await;
            prop_assert!(refused, "{}: the finished attempt {:?} was accepted", ctx, r);
        }
        Op::Cancel { idx } => {
            if m.jobs.is_empty() {
                return Ok(events);
            }
            let i = idx % m.jobs.len();
            let reply = h.engine.cancel(m.jobs[i].id.clone(), String::new()).await;
            if m.jobs[i].state.is_terminal() {
                prop_assert!(is_precondition(&reply), "{}: cancel of a {:?} job: {:?}", ctx, m.jobs[i].state, reply);
            } else {
                events.push(m.transition(i, JobState::Cancelled));
                m.jobs[i].last_error = CANCEL_REASON.to_string();
                check_reply(reply, m, i, ctx)?;
            }
        }
        Op::CancelMissing => {
            let reply = h.engine.cancel("no-such-job".into(), String::new()).await;
            prop_assert!(matches!(reply, Err(DomainError::NotFound { .. })), "{}: {:?}", ctx, reply);
            let reply = h.engine.redrive("no-such-job".into()).await;
            prop_assert!(matches!(reply, Err(DomainError::NotFound { .. })), "{}: {:?}", ctx, reply);
        }
        Op::Redrive { idx, any } => {
            let dead: Vec<usize> = (0..m.jobs.len()).filter(|&i| m.jobs[i].state == JobState::DeadLettered).collect();
            let i = if !*any && !dead.is_empty() {
                dead[idx % dead.len()]
            } else if !m.jobs.is_empty() {
                idx % m.jobs.len()
            } else {
                return Ok(events);
            };
            let reply = h.engine.redrive(m.jobs[i].id.clone()).await;
            if m.jobs[i].state == JobState::DeadLettered {
                events.push(m.transition(i, JobState::Queued));
                let now = m.now;
                let j = &mut m.jobs[i];
                j.attempt = 0;
                j.ready_time = now;
                j.finish_time = None;
                j.surely_ready = true;
                check_reply(reply, m, i, ctx)?;
            } else {
                prop_assert!(is_precondition(&reply), "{}: redrive of a {:?} job: {:?}", ctx, m.jobs[i].state, reply);
            }
        }
        Op::Advance { ms } => {
            let by = Duration::from_millis(*ms);
            m.now += by;
            h.clock.advance(by);
        }
        Op::ExpireLeases => {
            let active = m.active();
            let Some(last) = active.iter().filter_map(|&i| m.jobs[i].lease).max() else { return Ok(events) };
            let by = last.duration_since(m.now).unwrap_or_default();
            m.now += by;
            h.clock.advance(by);
            // The engine fails the attempts on its own timer; wait for the
            // events of all of them.
            let mut seen: HashMap<String, Arc<Job>> = HashMap::new();
            while seen.len() < active.len() {
                let event = tokio::time::timeout(WAIT, h.events.recv())
                    .await
                    .map_err(|_| TestCaseError::fail(format!("{ctx}: expiry events did not come")))?
                    .map_err(|e| TestCaseError::fail(format!("{ctx}: events: {e}")))?;
                prop_assert!(
                    active.iter().any(|&i| m.jobs[i].id == event.job.id),
                    "{}: unexpected event of {} ({:?} -> {:?})",
                    ctx,
                    event.job.seq,
                    event.previous,
                    event.job.state
                );
                prop_assert!(event.previous.is_some_and(JobState::is_active), "{}: event {:?}", ctx, event.previous);
                prop_assert!(seen.insert(event.job.id.clone(), event.job.clone()).is_none(), "{}: two events", ctx);
            }
            for &i in &active {
                let (_, window) = m.fail(i, true, EXPIRED);
                let job = seen[&m.jobs[i].id].clone();
                if let Some(window) = window {
                    adopt_ready_time(m, i, &job, window, ctx)?;
                }
                check_job(&job, &m.jobs[i], ctx)?;
            }
        }
        Op::Restart => {
            // Done by run_case, which owns the harness; the model's part:
            m.floor_exact = false;
            let now = m.now;
            for j in &mut m.jobs {
                j.surely_ready = j.state == JobState::Queued && j.ready_time <= now;
                // Loading extends leases to at least the reconnect grace;
                // the leases here are far longer, so nothing changes.
                if let Some(lease) = j.lease {
                    prop_assert!(lease >= now + GRACE, "{}: the test's leases must outlast restarts", ctx);
                }
            }
        }
    }
    Ok(events)
}

/// Enqueues a batch. The model: a key already used with another request,
/// in the store or earlier in the batch, refuses the whole batch and writes
/// nothing; a key used with the same request names the job it made.
async fn enqueue(
    h: &mut Harness,
    m: &mut Model,
    specs: Vec<(usize, JobSpec)>,
    events: &mut Vec<Ev>,
    ctx: &str,
) -> Result<(), TestCaseError> {
    let reply = h.engine.enqueue(specs.iter().map(|(_, s)| s.clone()).collect()).await;
    // Resolve every key first.
    let mut holders: HashMap<(usize, String), JobSpec> = HashMap::new();
    let mut conflict = false;
    for (queue, spec) in &specs {
        let Some(key) = &spec.idempotency_key else { continue };
        let known = key_index(key).and_then(|k| m.keys.get(&(*queue, k))).map(|&i| m.jobs[i].spec.clone());
        let holder = holders.entry((*queue, key.clone())).or_insert_with(|| known.unwrap_or_else(|| spec.clone()));
        conflict |= holder != spec;
    }
    if conflict {
        prop_assert!(
            matches!(reply, Err(DomainError::AlreadyExists(_))),
            "{}: a key reused with another request must refuse the batch, got {:?}",
            ctx,
            reply.map(|jobs| jobs.iter().map(|(j, created)| (j.seq, *created)).collect::<Vec<_>>())
        );
        return Ok(());
    }
    let jobs = reply.map_err(|e| TestCaseError::fail(format!("{ctx}: {e}")))?;
    prop_assert_eq!(jobs.len(), specs.len(), "{}: one job per request", ctx);
    for ((queue, spec), (job, created)) in specs.into_iter().zip(jobs) {
        let key = spec.idempotency_key.as_deref().and_then(key_index);
        if let Some(&i) = key.and_then(|k| m.keys.get(&(queue, k))) {
            prop_assert!(!created, "{}: a known key created a job", ctx);
            check_job(&job, &m.jobs[i], ctx)?;
            continue;
        }
        prop_assert!(created, "{}: a new job was not created", ctx);
        let now = m.now;
        let ready_time = spec.not_before.map_or(now, |t| t.max(now));
        let mjob = MJob {
            id: job.id.clone(),
            seq: m.next_seq,
            spec,
            state: JobState::Queued,
            attempt: 0,
            token: 0,
            worker: String::new(),
            version: 1,
            create_time: now,
            update_time: now,
            ready_time,
            lease: None,
            finish_time: None,
            result: Bytes::new(),
            last_error: String::new(),
            surely_ready: ready_time <= now,
        };
        m.next_seq += 1;
        check_job(&job, &mjob, ctx)?;
        if let Some(k) = key {
            m.keys.insert((queue, k), m.jobs.len());
        }
        events.push((job.id.clone(), None, JobState::Queued));
        m.jobs.push(mjob);
    }
    Ok(())
}

fn key_index(key: &str) -> Option<u8> {
    key.strip_prefix("key-")?.parse().ok()
}

/// Start, complete, fail or renew with `r`; true if refused as a failed
/// precondition.
async fn act(h: &Harness, action: Action, r: AttemptRef, step: usize) -> bool {
    match action {
        Action::Start => is_precondition(&h.engine.start_job(r).await),
        Action::Complete => is_precondition(&h.engine.complete(r, Bytes::from(format!("late-{step}"))).await),
        Action::Fail => is_precondition(
            &h.engine.fail(r, format!("late-{step}"), Failure::Reported { retryable: true, exit_code: None }).await,
        ),
        Action::Renew => is_precondition(&h.engine.renew(r, Some(Duration::from_secs(60))).await),
    }
}

async fn run_case(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().map_err(|e| TestCaseError::fail(e.to_string()))?;
    let mut h = Harness::start(dir.path(), ManualClock::new(t0())).await;
    let mut m = Model::new(t0());
    for (n, op) in ops.iter().enumerate() {
        let ctx = format!("step {n} {op:?}");
        if let Op::Restart = op {
            h = h.restart().await;
        }
        let expected = step(&mut h, &mut m, n, op, &ctx).await?;
        let got = h.drain_events()?;
        prop_assert_eq!(sorted_events(got), sorted_events(expected), "{}: events", ctx);
        verify(&h, &m, &ctx).await?;
    }
    verify_listings(&h, &m).await?;
    h.stop().await;
    Ok(())
}

proptest! {
    // 48 cases unless PROPTEST_CASES asks for more (or fewer).
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(48),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn queue_engine_matches_the_model(ops in proptest::collection::vec(op(), 1..60)) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        runtime.block_on(run_case(ops))?;
    }
}

/// Found by the property test: a batch repeating a key with a different
/// request was refused, yet the jobs before the repeat were written.
#[test]
fn batch_repeating_a_key_with_another_request_writes_nothing() {
    let ops = vec![
        Op::EnqueueBatch { items: vec![(0, Priority::Low, 1, Some(1)), (0, Priority::Low, 2, Some(1))] },
        Op::Claim { queue: None },
    ];
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    if let Err(e) = runtime.block_on(run_case(ops)) {
        panic!("{e}");
    }
}
