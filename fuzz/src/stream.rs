//! Target `stream_handler`: one agent session per input against a real
//! engine (embedded store, manual clock), built once per process.
//!
//! # Input
//!
//! A sequence of length-delimited `ConnectRequest`s, read until the first
//! one that does not decode (at most [`MAX_EVENTS`]):
//!
//! - a `Hello` (re)connects: validated by `hello_in`, then opened with
//!   `EngineHandle::connect`. If the input does not start with a Hello, or
//!   its first Hello is refused, a fixed valid Hello opens the session. A
//!   later Hello is a reconnect of the same agent on a new stream (opened
//!   before the old one is reported closed, as when a connection is lost);
//!   one that is refused is skipped (the real server refuses that stream).
//! - any other message goes through `inbound_in` with the protocol of the
//!   session; refused ones are skipped (the real server closes the stream);
//!   valid ones go to `EngineHandle::inbound` in batches, as the server
//!   forwards a burst.
//! - a `ConnectRequest` with no message moves the manual clock: by the
//!   value of its first (unknown) varint field in milliseconds, else 1 s, at
//!   most [`MAX_TICK`] per tick and [`MAX_ADVANCE`] per input. Heartbeat
//!   checks, lease expiry, timeouts, retry backoff and the reconnect grace
//!   all run on this clock.
//!
//! Job references: the fuzzer cannot guess job ids (UUIDv7), so a `JobRef`
//! whose `job_id` starts with [`MARKER`] names an attempt the session was
//! assigned (`"@0"` the first, `"@1"` the second, ... modulo their number;
//! `"@"` the first), and an `attempt` or `fencing_token` of 0 in it takes the
//! real value (non-zero ones are kept: stale and foreign tokens).
//!
//! # Per input
//!
//! Connect, enqueue [`jobs`] (so assignments exist), play the events, render
//! every push with `push_out` (and check it), report the session closed,
//! cancel the input's jobs, and check the engine still serves: its task is
//! alive, `stats` answers, it has not stopped serving writes, and no job is
//! left queued, claimed or running.
//!
//! Agent names: each input's agent is one of [`AGENT_NAMES`] (picked by the
//! input's length; the fuzzed Hello's own name is validated, then replaced),
//! so inputs reconnect agents that earlier inputs left with jobs in flight
//! and sessions in their grace period: the resume and reconcile paths run,
//! and the number of agents stays bounded.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, UNIX_EPOCH};

use prost::Message;
use tether::v1 as pb;
use tether::v1::connect_request::Message as M;
use tether_server::clock::ManualClock;
use tether_server::domain::{AttemptRef, DomainError, JobSpec, JobState};
use tether_server::engine::{AgentInbound, AgentPush, EngineConfig, EngineHandle, HelloInfo, QueueStats};
use tether_server::grpc::convert;
use tether_server::store::embedded::{EmbeddedOptions, EmbeddedStore};
use tether_server::store::Store;
use tokio::sync::mpsc;

use crate::checks;
use crate::requests;

/// Names the sessions' agents take.
pub const AGENT_NAMES: [&str; 4] = ["fuzz-agent-0", "fuzz-agent-1", "fuzz-agent-2", "fuzz-agent-3"];
/// Most events read from one input.
pub const MAX_EVENTS: usize = 256;
/// Longest clock step of one tick.
pub const MAX_TICK: Duration = Duration::from_secs(2 * 24 * 3600);
/// Most the clock moves during one input.
pub const MAX_ADVANCE: Duration = Duration::from_secs(3 * 24 * 3600);
/// Starts a `JobRef.job_id` that names an assigned attempt.
pub const MARKER: char = '@';
/// The field number a seed's tick uses for its milliseconds (any unknown
/// varint field works).
pub const TICK_FIELD: u32 = 15;
/// Messages forwarded in one engine command at most (as the server does).
const INBOUND_BATCH: usize = 64;
/// Longest an input may take before it counts as a hang.
const INPUT_DEADLINE: Duration = Duration::from_secs(8);

/// `TETHER_FUZZ_TRACE=1` prints what each input does (to read a crash or
/// a seed; far too slow for fuzzing).
fn tracing_on() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("TETHER_FUZZ_TRACE").is_some_and(|v| v == "1"))
}

macro_rules! trace {
    ($($arg:tt)*) => {
        if tracing_on() {
            eprintln!($($arg)*);
        }
    };
}

/// One step of an input.
#[derive(Debug, Clone)]
pub enum Event {
    Message(M),
    Tick(Duration),
}

/// Reads an input.
pub fn parse(data: &[u8]) -> Vec<Event> {
    let mut events = Vec::new();
    let mut rest = data;
    while !rest.is_empty() && events.len() < MAX_EVENTS {
        let frame = rest;
        match pb::ConnectRequest::decode_length_delimited(&mut rest) {
            Ok(pb::ConnectRequest { message: Some(m) }) => events.push(Event::Message(m)),
            Ok(pb::ConnectRequest { message: None }) => {
                events.push(Event::Tick(tick_length(&frame[..frame.len() - rest.len()])))
            }
            Err(_) => break,
        }
    }
    events
}

/// The clock step of a message-less frame (length prefix included).
fn tick_length(mut frame: &[u8]) -> Duration {
    let default = Duration::from_secs(1);
    if prost::encoding::decode_varint(&mut frame).is_err() {
        return default;
    }
    let millis = match prost::encoding::decode_key(&mut frame) {
        Ok((_, prost::encoding::WireType::Varint)) => prost::encoding::decode_varint(&mut frame).ok(),
        _ => None,
    };
    millis.map_or(default, |ms| Duration::from_millis(ms).min(MAX_TICK))
}

/// The frame of one message (for seeds).
pub fn frame(message: M) -> Vec<u8> {
    pb::ConnectRequest { message: Some(message) }.encode_length_delimited_to_vec()
}

/// The frame of a clock step (for seeds).
pub fn tick(millis: u64) -> Vec<u8> {
    let mut body = Vec::new();
    prost::encoding::encode_key(TICK_FIELD, prost::encoding::WireType::Varint, &mut body);
    prost::encoding::encode_varint(millis, &mut body);
    let mut out = Vec::new();
    prost::encoding::encode_varint(body.len() as u64, &mut out);
    out.extend(body);
    out
}

/// A reference to the `index`th assigned attempt (for seeds).
pub fn assigned(index: u8) -> pb::JobRef {
    pb::JobRef { job_id: format!("{MARKER}{index}"), attempt: 0, fencing_token: 0 }
}

/// The Hello used when the input has no acceptable first one.
pub fn fixed_hello(protocol: u32) -> pb::Hello {
    pb::Hello {
        name: "fuzz-agent".into(),
        slots: 2,
        version: "fuzz".into(),
        min_protocol_version: tether::PROTOCOL_VERSION_MIN,
        max_protocol_version: protocol,
        ..Default::default()
    }
}

/// The jobs every session is offered: a retried one with a timeout, and a
/// single-attempt one with a short lease.
pub fn jobs() -> Vec<pb::EnqueueJobRequest> {
    vec![
        pb::EnqueueJobRequest {
            queue: "fuzz".into(),
            payload: bytes::Bytes::from_static(b"first"),
            max_attempts: 3,
            timeout: Some(prost_types::Duration { seconds: 60, nanos: 0 }),
            retry_policy: Some(pb::RetryPolicy { any_failure: true, exit_codes: vec![3] }),
            ..Default::default()
        },
        pb::EnqueueJobRequest {
            queue: "fuzz".into(),
            payload: bytes::Bytes::from_static(b"second"),
            priority: pb::Priority::High as i32,
            max_attempts: 1,
            lease_duration: Some(prost_types::Duration { seconds: 5, nanos: 0 }),
            ..Default::default()
        },
    ]
}

struct Fixture {
    runtime: tokio::runtime::Runtime,
    engine: EngineHandle,
    task: tokio::task::JoinHandle<()>,
    clock: ManualClock,
    specs: Vec<JobSpec>,
    inputs: AtomicU64,
}

static FIXTURE: OnceLock<Fixture> = OnceLock::new();

fn fixture() -> &'static Fixture {
    FIXTURE.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a tokio runtime");
        // On tmpfs where there is one: every commit syncs (the default
        // options), which costs nothing there. The directory is removed
        // once the store is open (the open file lives on), so nothing is
        // left behind however the process ends.
        let shm = std::path::Path::new("/dev/shm");
        let dir = match shm.is_dir() {
            true => tempfile::Builder::new().prefix("tether-fuzz-").tempdir_in(shm),
            false => tempfile::Builder::new().prefix("tether-fuzz-").tempdir(),
        }
        .expect("a temporary directory");
        let store = EmbeddedStore::open(dir.path(), EmbeddedOptions::default()).expect("the embedded store opens");
        let _ = dir.close();
        let store: Arc<dyn Store> = Arc::new(store);
        let clock = ManualClock::new(UNIX_EPOCH + Duration::from_secs(1_767_225_600));
        let (engine, task) = runtime
            .block_on(EngineHandle::start(store, Arc::new(clock.clone()), engine_config()))
            .expect("the engine starts");
        let specs = jobs().iter().map(|r| convert::job_spec_in(r).expect("the fixed jobs are valid")).collect();
        Fixture { runtime, engine, task, clock, specs, inputs: AtomicU64::new(0) }
    })
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let f = fixture();
    f.inputs.fetch_add(1, Ordering::Relaxed);
    let events = parse(data);
    let name = AGENT_NAMES[data.len() % AGENT_NAMES.len()].to_string();
    let protocol = if data.len().is_multiple_of(3) { 1 } else { tether::PROTOCOL_VERSION_MAX };
    f.runtime.block_on(async {
        let session = Run {
            f,
            name,
            current: None,
            closed: Vec::new(),
            known: Vec::new(),
            jobs: Vec::new(),
            batch: Vec::new(),
            advanced: Duration::ZERO,
        };
        match tokio::time::timeout(INPUT_DEADLINE, session.play(events, protocol)).await {
            Ok(()) => {}
            Err(_) => panic!("an input took more than {INPUT_DEADLINE:?}: the engine hangs"),
        }
    });
    assert!(!f.task.is_finished(), "the engine task ended");
    assert!(*f.engine.serving().borrow(), "the engine stopped serving");
}

struct Session {
    agent_id: String,
    session_id: u64,
    protocol: u32,
    pushes: mpsc::UnboundedReceiver<AgentPush>,
}

struct Run {
    f: &'static Fixture,
    name: String,
    current: Option<Session>,
    /// Replaced sessions, still read for pushes.
    closed: Vec<Session>,
    /// Attempts assigned to this input's agent, in order.
    known: Vec<AttemptRef>,
    /// The ids of this input's jobs.
    jobs: Vec<String>,
    batch: Vec<AgentInbound>,
    advanced: Duration,
}

impl Run {
    async fn play(mut self, events: Vec<Event>, protocol: u32) {
        let mut events = events.into_iter().peekable();
        let first = match events.peek() {
            Some(Event::Message(M::Hello(h))) => Some(h.clone()),
            _ => None,
        };
        if first.is_some() {
            events.next();
        }
        let connected = match first {
            Some(h) => self.connect(&h).await,
            None => false,
        };
        if !connected {
            assert!(self.connect(&fixed_hello(protocol)).await, "the fixed hello was refused");
        }
        self.enqueue().await;
        for event in events {
            match event {
                Event::Message(m) => self.message(m).await,
                Event::Tick(d) => self.tick(d).await,
            }
        }
        self.finish().await;
    }

    /// Waits until the effects of every earlier command (pushes, replies)
    /// ran: RegisterAgent of an existing agent writes nothing and answers
    /// after the commit of everything before it.
    async fn barrier(&self) {
        let hello = HelloInfo {
            name: "fuzz-barrier".into(),
            pool: tether_server::domain::DEFAULT_POOL.into(),
            labels: Default::default(),
            slots: 1,
            version: String::new(),
            running: Vec::new(),
            answer_starts: true,
            reconnects: false,
        };
        if let Err(e) = self.f.engine.register_agent(hello).await {
            panic!("the engine refused a registration it always takes: {e}");
        }
    }

    /// Renders and checks every push received so far.
    async fn settle(&mut self) {
        self.barrier().await;
        let Run { current, closed, known, .. } = self;
        for s in current.iter_mut().chain(closed.iter_mut()) {
            while let Ok(push) = s.pushes.try_recv() {
                trace!("  push to session {}: {push:?}", s.session_id);
                if let Some(r) = checks::push(push) {
                    known.push(r);
                }
            }
        }
    }

    fn resolve(&self, r: &mut pb::JobRef) {
        let Some(rest) = r.job_id.strip_prefix(MARKER) else { return };
        if self.known.is_empty() {
            return;
        }
        let index = rest.bytes().next().map_or(0, |b| b.wrapping_sub(b'0') as usize) % self.known.len();
        let k = &self.known[index];
        r.job_id = k.job_id.clone();
        if r.attempt == 0 {
            r.attempt = k.attempt;
        }
        if r.fencing_token == 0 {
            r.fencing_token = k.fencing_token;
        }
    }

    fn resolve_message(&self, m: &mut M) {
        let refs: Vec<&mut pb::JobRef> = match m {
            M::Hello(h) => h.running_jobs.iter_mut().collect(),
            M::Heartbeat(h) => h.running_jobs.iter_mut().collect(),
            M::AssignmentAck(a) => a.job.iter_mut().collect(),
            M::JobStarted(s) => s.job.iter_mut().collect(),
            M::JobProgress(p) => p.job.iter_mut().collect(),
            M::JobLog(l) => l.job.iter_mut().collect(),
            M::JobFinished(f) => f.job.iter_mut().collect(),
        };
        for r in refs {
            self.resolve(r);
        }
    }

    /// Opens a session with `hello`; false if it was refused.
    async fn connect(&mut self, hello: &pb::Hello) -> bool {
        let mut m = M::Hello(hello.clone());
        self.resolve_message(&mut m);
        let M::Hello(hello) = m else { unreachable!() };
        let Some((mut info, protocol)) = requests::hello(&hello) else {
            trace!("hello refused: {hello:?}");
            return false;
        };
        info.name = self.name.clone();
        let running = info.running.clone();
        let (pushes, received) = mpsc::unbounded_channel();
        let welcome = match self.f.engine.connect(info, pushes).await {
            Ok(welcome) => welcome,
            Err(e) => {
                trace!("connect refused: {e}");
                checks::engine_error(&e, false);
                return false;
            }
        };
        trace!(
            "connected: agent {} session {} protocol {protocol}, resumed {:?}, abandoned {:?}",
            welcome.agent_id,
            welcome.session_id,
            welcome.resumed,
            welcome.abandoned
        );
        assert_eq!(
            welcome.resumed.len() + welcome.abandoned.len(),
            running.len(),
            "every listed job is resumed or abandoned"
        );
        for r in welcome.resumed.iter().chain(&welcome.abandoned) {
            assert!(running.contains(r), "the welcome names a job the hello did not list: {r:?}");
            checks::wire_job_ref("welcome job", Some(&convert::job_ref_out(r)));
        }
        for d in [welcome.heartbeat_interval, welcome.lease_duration, welcome.reconnect_grace] {
            checks::wire_duration("welcome", &tether::time::to_duration(d));
        }
        let new = Session { agent_id: welcome.agent_id, session_id: welcome.session_id, protocol, pushes: received };
        if let Some(old) = self.current.replace(new) {
            assert_eq!(
                old.agent_id,
                self.current.as_ref().map_or("", |s| s.agent_id.as_str()),
                "a reconnect under the same name made a new agent"
            );
            self.f.engine.disconnected(old.agent_id.clone(), old.session_id).await;
            self.closed.push(old);
        }
        self.settle().await;
        true
    }

    async fn enqueue(&mut self) {
        let jobs = match self.f.engine.enqueue(self.f.specs.clone()).await {
            Ok(jobs) => jobs,
            Err(e) => panic!("the engine refused the fixed jobs: {e}"),
        };
        for (job, created) in jobs {
            assert!(created, "a job without an idempotency key was not created");
            assert_eq!(job.defect(), None);
            checks::wire_job(&convert::job_out(&job));
            self.jobs.push(job.id);
        }
        self.settle().await;
    }

    async fn message(&mut self, mut m: M) {
        if let M::Hello(h) = m {
            self.flush().await;
            self.connect(&h).await;
            return;
        }
        let Some(protocol) = self.current.as_ref().map(|s| s.protocol) else { return };
        self.resolve_message(&mut m);
        trace!("message: {m:?}");
        if let Some(inbound) = requests::inbound(m, protocol) {
            trace!("  inbound: {inbound:?}");
            self.batch.push(inbound);
            if self.batch.len() >= INBOUND_BATCH {
                self.flush().await;
            }
        }
    }

    async fn flush(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let Some(s) = &self.current else { return };
        let batch = std::mem::take(&mut self.batch);
        if let Err(e) = self.f.engine.inbound(s.agent_id.clone(), s.session_id, batch).await {
            panic!("the engine stopped taking stream messages: {e}");
        }
        self.settle().await;
    }

    async fn tick(&mut self, d: Duration) {
        self.flush().await;
        let d = d.min(MAX_ADVANCE.saturating_sub(self.advanced));
        if d.is_zero() {
            return;
        }
        self.advanced += d;
        trace!("tick {d:?}");
        self.f.clock.advance(d);
        // The timer and the first barrier race; the second one comes after
        // what the timer did.
        self.barrier().await;
        self.settle().await;
    }

    async fn finish(mut self) {
        self.flush().await;
        self.settle().await;
        if let Some(s) = &self.current {
            self.f.engine.disconnected(s.agent_id.clone(), s.session_id).await;
        }
        for id in std::mem::take(&mut self.jobs) {
            self.cancel(id).await;
        }
        self.settle().await;
        let stats = match self.f.engine.stats(None).await {
            Ok(stats) => stats,
            Err(e) => panic!("the engine does not answer stats: {e}"),
        };
        left_over(&stats);
    }

    /// Cancels one of the input's jobs; a job that is mid-write is retried.
    async fn cancel(&mut self, id: String) {
        for _ in 0..10 {
            match self.f.engine.cancel(id.clone(), "fuzz input done".into()).await {
                Ok(job) => {
                    trace!("cancelled {id} (attempt {})", job.attempt);
                    assert_eq!(job.state, JobState::Cancelled);
                    checks::wire_job(&convert::job_out(&job));
                    return;
                }
                Err(DomainError::Unavailable(_)) => self.barrier().await,
                Err(e @ DomainError::FailedPrecondition(_)) => {
                    trace!("not cancelled {id}: {e}");
                    checks::engine_error(&e, false);
                    return;
                }
                Err(e) => panic!("cancelling job {id} of this input failed: {e}"),
            }
        }
        panic!("job {id} stayed 'changing state' through 10 commits");
    }
}

/// With every input's jobs cancelled, none is left queued or leased.
fn left_over(stats: &QueueStats) {
    for (state, n) in &stats.by_state {
        if matches!(state, JobState::Queued | JobState::Claimed | JobState::Running) {
            assert_eq!(*n, 0, "{n} job(s) left {state:?} after every job was cancelled: {stats:?}");
        }
    }
    checks::wire_duration("oldest_queued_age", &tether::time::to_duration(stats.oldest_queued_age));
}

/// How many inputs this process ran (for the tests).
pub fn inputs_run() -> u64 {
    FIXTURE.get().map_or(0, |f| f.inputs.load(Ordering::Relaxed))
}

/// The engine's settings: the defaults, with group commit off (the commit
/// window is real time: here it only sleeps, and makes coverage depend on
/// timing).
fn engine_config() -> EngineConfig {
    EngineConfig { commit_interval: Duration::ZERO, busy_commit_interval: Duration::ZERO, ..EngineConfig::default() }
}
