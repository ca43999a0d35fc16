//! Operations that read a job from the store while a newer state of it is
//! still waiting for its commit must not write over that newer state.
//!
//! A store whose commits can be held makes the window deterministic.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use tether_server::clock::ManualClock;
use tether_server::domain::{AttemptRef, DomainError, Failure, JobSpec, JobState, Priority, RetryPolicy, Routing};
use tether_server::engine::{ClaimRequest, EngineConfig, EngineHandle, HelloInfo};
use tether_server::store::embedded::{EmbeddedOptions, EmbeddedStore};
use tether_server::store::hooked::{HookedStore, WriteHook};
use tether_server::store::{Store, StoreResult, Write, WriteOutcome};
use tokio::sync::Semaphore;

/// Upper bound for any single wait; a test that hits it failed.
const WAIT: Duration = Duration::from_secs(30);

/// Holds commits while closed.
#[derive(Clone)]
struct Gate(Arc<Semaphore>);

impl Gate {
    fn close(&self) {
        self.0.forget_permits(usize::MAX >> 4);
    }

    fn open(&self) {
        self.0.add_permits(1 << 20);
    }
}

#[async_trait]
impl WriteHook for Gate {
    async fn write(&self, inner: &dyn Store, batch: Vec<Write>) -> StoreResult<Vec<WriteOutcome>> {
        drop(self.0.acquire().await);
        inner.write(batch).await
    }
}

/// An engine on an embedded store whose commits the returned gate holds.
async fn gated_engine() -> (EngineHandle, Gate, Arc<HookedStore<EmbeddedStore, Gate>>, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let gate = Gate(Arc::new(Semaphore::new(1 << 20)));
    let store = Arc::new(HookedStore {
        inner: EmbeddedStore::open(dir.path(), EmbeddedOptions::default()).expect("open store"),
        hook: gate.clone(),
    });
    let clock = ManualClock::new(SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000));
    let (engine, _task) =
        EngineHandle::start(store.clone() as Arc<dyn Store>, Arc::new(clock), EngineConfig::default())
            .await
            .expect("start");
    (engine, gate, store, dir)
}

fn spec() -> JobSpec {
    JobSpec {
        queue: "q".into(),
        payload: Bytes::from_static(b"x"),
        priority: Priority::Normal,
        routing: Routing { pool: "default".into(), required_labels: Default::default() },
        max_attempts: 1,
        lease_duration: Duration::from_secs(3600),
        timeout: None,
        idempotency_key: None,
        not_before: None,
        retry: RetryPolicy::any(),
    }
}

/// Polls `fut` once, so its command is queued to the engine (commands are
/// handled in the order they are sent), and keeps it for its reply later.
async fn send<F: Future + Unpin>(mut fut: F) -> F {
    std::future::poll_fn(|cx: &mut Context<'_>| {
        assert!(Pin::new(&mut fut).poll(cx).is_pending(), "the reply should wait for the held commit");
        Poll::Ready(())
    })
    .await;
    fut
}

#[tokio::test]
async fn a_redrive_does_not_write_over_a_newer_uncommitted_state() {
    let (engine, gate, store, _dir) = gated_engine().await;

    // A dead-lettered job, committed.
    let job = engine.enqueue(vec![spec()]).await.expect("enqueue").remove(0).0;
    let claim = ClaimRequest { worker_id: "w".into(), queue: None, pool: "default".into(), labels: Default::default() };
    let claimed = engine.claim(claim).await.expect("claim").expect("a job");
    let r = AttemptRef { job_id: job.id.clone(), attempt: claimed.attempt, fencing_token: claimed.fencing_token };
    let dead =
        engine.fail(r, "boom".into(), Failure::Reported { retryable: true, exit_code: None }).await.expect("fail");
    assert_eq!(dead.state, JobState::DeadLettered);

    // With commits held: redrive it, then cancel it. The job is now
    // CANCELLED in memory, the store still says DEAD_LETTERED.
    gate.close();
    let redriven = send(Box::pin(engine.redrive(job.id.clone()))).await;
    let cancelled = send(Box::pin(engine.cancel(job.id.clone(), "no".into()))).await;
    // A second redrive must not requeue it from the stale stored state.
    let again = tokio::time::timeout(WAIT, engine.redrive(job.id.clone())).await.expect("an answer");
    assert!(matches!(again, Err(DomainError::Unavailable(_))), "{again:?}");

    gate.open();
    tokio::time::timeout(WAIT, redriven).await.expect("redrive answered").expect("redrive");
    let cancelled = tokio::time::timeout(WAIT, cancelled).await.expect("cancel answered").expect("cancel");
    assert_eq!(cancelled.state, JobState::Cancelled);
    let stored = store.get_job(&job.id).await.expect("get").expect("stored");
    assert_eq!(stored.state, JobState::Cancelled, "the cancellation stands");
}

/// A session whose reader is gone (its Connect failed after the engine
/// opened it) ends at the first push it cannot take, as a broken stream
/// would: the agent is no longer shown connected, and the job pushed to it
/// is not stranded on it past the grace period.
#[tokio::test]
async fn a_session_nobody_reads_ends_at_its_first_push() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Arc::new(EmbeddedStore::open(dir.path(), EmbeddedOptions::default()).expect("open store"));
    let clock = ManualClock::new(SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000));
    let (engine, _task) =
        EngineHandle::start(store as Arc<dyn Store>, Arc::new(clock), EngineConfig::default()).await.expect("start");
    let (pushes, unread) = tokio::sync::mpsc::unbounded_channel();
    let hello = HelloInfo {
        name: "ghost".into(),
        pool: "default".into(),
        labels: Default::default(),
        slots: 1,
        version: "test".into(),
        running: Vec::new(),
        answer_starts: false,
        reconnects: false,
    };
    let welcome = engine.connect(hello, pushes).await.expect("connect");
    assert!(engine.get_agent(welcome.agent_id.clone()).await.expect("agent").connected);
    drop(unread);
    // The job is assigned to the only agent; its push finds no reader.
    engine.enqueue(vec![spec()]).await.expect("enqueue");
    let view = engine.get_agent(welcome.agent_id.clone()).await.expect("agent");
    assert!(!view.connected, "the unread session ended");
}

/// A watcher that starts while a change is made but not yet committed
/// reads the log from a head without it, and must still be woken when it
/// commits (the engine's per-change broadcast goes only to receivers that
/// existed when the change was made; here there were none).
#[tokio::test]
async fn a_watcher_that_starts_during_a_commit_is_woken_by_it() {
    let (engine, gate, _store, _dir) = gated_engine().await;
    gate.close();
    let enqueued = send(Box::pin(engine.enqueue(vec![spec()]))).await;
    // What a watch from now does: subscribe, then read the head.
    let mut wake = engine.subscribe_log();
    let head = engine.event_heads().await.expect("heads");
    gate.open();
    let job = tokio::time::timeout(WAIT, enqueued).await.expect("answered").expect("enqueue").remove(0).0;
    tokio::time::timeout(WAIT, wake.changed()).await.expect("woken by the commit").expect("engine alive");
    let (events, _) = engine.read_events("cursor", &head, 10).await.expect("read");
    assert_eq!(events.iter().map(|e| e.job.id.as_str()).collect::<Vec<_>>(), [job.id.as_str()]);
}
