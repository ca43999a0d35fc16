//! A scripted, in-process AgentService for driving the SDK step by step,
//! and a test handler whose jobs the test controls.

#![allow(dead_code)]

use std::collections::{BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use tether::v1::agent_service_server::{AgentService, AgentServiceServer};
use tether::v1::*;
use tether_agent_sdk::{
    Agent, AgentConfig, AgentError, AgentHandle, JobContext, JobResult, LogStream, ReconnectPolicy,
};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::{TcpListenerStream, UnboundedReceiverStream};
use tonic::{Request, Response, Status, Streaming};

/// Upper bound on any single wait; a hang fails the test instead of
/// blocking the suite. Never used to sequence anything.
pub const WAIT: Duration = Duration::from_secs(10);

pub type In = connect_request::Message;
pub type Out = connect_response::Message;

/// One Connect stream as the server sees it.
pub struct ServerSession {
    inbound: Streaming<ConnectRequest>,
    outbound: mpsc::UnboundedSender<Result<ConnectResponse, Status>>,
}

impl ServerSession {
    /// The next message from the agent, heartbeats included; `None` once
    /// the agent closed its side.
    pub async fn next_any(&mut self) -> Option<In> {
        match tokio::time::timeout(WAIT, self.inbound.message()).await {
            Err(_) => panic!("no message from the agent within {WAIT:?}"),
            Ok(Ok(Some(m))) => Some(m.message.expect("empty ConnectRequest")),
            Ok(Ok(None)) | Ok(Err(_)) => None,
        }
    }

    /// The next non-heartbeat message.
    pub async fn next(&mut self) -> Option<In> {
        loop {
            match self.next_any().await {
                Some(In::Heartbeat(_)) => continue,
                other => return other,
            }
        }
    }

    /// The next heartbeat, skipping anything else.
    pub async fn next_heartbeat(&mut self) -> Heartbeat {
        loop {
            match self.next_any().await {
                Some(In::Heartbeat(h)) => return h,
                Some(_) => continue,
                None => panic!("stream ended while waiting for a heartbeat"),
            }
        }
    }

    /// The first heartbeat announcing draining; earlier heartbeats are
    /// skipped, anything else is a failure.
    pub async fn draining_heartbeat(&mut self) -> Heartbeat {
        loop {
            match self.next_any().await {
                Some(In::Heartbeat(h)) if h.draining => return h,
                Some(In::Heartbeat(_)) => continue,
                other => panic!("expected a draining heartbeat, got {other:?}"),
            }
        }
    }

    pub async fn hello(&mut self) -> Hello {
        match self.next_any().await {
            Some(In::Hello(h)) => h,
            other => panic!("expected Hello, got {other:?}"),
        }
    }

    pub async fn expect_assignment_ack(&mut self) -> AssignmentAck {
        match self.next().await {
            Some(In::AssignmentAck(a)) => a,
            other => panic!("expected AssignmentAck, got {other:?}"),
        }
    }

    pub async fn expect_started(&mut self) -> JobRef {
        match self.next().await {
            Some(In::JobStarted(s)) => s.job.expect("JobStarted without job"),
            other => panic!("expected JobStarted, got {other:?}"),
        }
    }

    pub async fn expect_finished(&mut self) -> JobFinished {
        match self.next().await {
            Some(In::JobFinished(f)) => f,
            other => panic!("expected JobFinished, got {other:?}"),
        }
    }

    /// Waits until the agent closes its side, returning what came before.
    pub async fn until_closed(&mut self) -> Vec<In> {
        let mut seen = Vec::new();
        while let Some(m) = self.next_any().await {
            seen.push(m);
        }
        seen
    }

    pub fn send(&self, m: Out) {
        let _ = self.outbound.send(Ok(ConnectResponse { message: Some(m) }));
    }

    pub fn welcome(&self, agent_id: &str, heartbeat: Duration) {
        self.welcome_with(Welcome {
            agent_id: agent_id.into(),
            protocol_version: 1,
            heartbeat_interval: Some(tether::time::to_duration(heartbeat)),
            lease_duration: Some(tether::time::to_duration(Duration::from_secs(30))),
            reconnect_grace: Some(tether::time::to_duration(Duration::from_secs(30))),
            ..Default::default()
        });
    }

    pub fn welcome_with(&self, w: Welcome) {
        self.send(Out::Welcome(w));
    }

    pub fn assign(&self, job: &JobRef, payload: &str) {
        self.send(Out::Assignment(assignment(job, payload)));
    }

    pub fn ack(&self, job: &JobRef, accepted: bool) {
        self.send(Out::JobUpdateAck(JobUpdateAck { job: Some(job.clone()), accepted, reason: String::new() }));
    }

    /// Runs an assignment through ack and start (acking the start).
    pub async fn assign_and_start(&mut self, job: &JobRef, payload: &str) {
        self.assign(job, payload);
        let ack = self.expect_assignment_ack().await;
        assert_eq!((ack.job.as_ref(), ack.accepted), (Some(job), true), "{ack:?}");
        assert_eq!(&self.expect_started().await, job);
        self.ack(job, true);
    }
}

pub fn assignment(job: &JobRef, payload: &str) -> Assignment {
    Assignment {
        job: Some(job.clone()),
        queue: "q".into(),
        payload: Bytes::from(payload.to_owned()),
        priority: Priority::Normal as i32,
        max_attempts: 3,
        ..Default::default()
    }
}

pub fn job(id: &str) -> JobRef {
    JobRef { job_id: id.into(), attempt: 1, fencing_token: 42 }
}

/// The scripted server: every Connect becomes a [`ServerSession`], or is
/// refused with the next queued status.
pub struct ScriptedServer {
    pub addr: SocketAddr,
    sessions: mpsc::UnboundedReceiver<ServerSession>,
    refusals: Arc<Mutex<VecDeque<Status>>>,
    connects: watch::Receiver<usize>,
    _server: JoinHandle<()>,
}

impl ScriptedServer {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let (tx, sessions) = mpsc::unbounded_channel();
        let refusals = Arc::new(Mutex::new(VecDeque::new()));
        let (connects_tx, connects) = watch::channel(0);
        let svc = Svc { sessions: tx, refusals: refusals.clone(), connects: connects_tx };
        // serve_with_incoming skips the server's own nodelay setting.
        let incoming = TcpListenerStream::new(listener).map(|conn| {
            conn.inspect(|c| {
                let _ = c.set_nodelay(true);
            })
        });
        let server = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(AgentServiceServer::new(svc))
                .serve_with_incoming(incoming)
                .await;
        });
        Self { addr, sessions, refusals, connects, _server: server }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Refuses the next Connect with `status`.
    pub fn refuse_next(&self, status: Status) {
        self.refusals.lock().expect("lock").push_back(status);
    }

    pub fn refusals_left(&self) -> usize {
        self.refusals.lock().expect("lock").len()
    }

    /// Connects received so far, refused ones included.
    pub fn connects(&self) -> usize {
        *self.connects.borrow()
    }

    /// Waits until `n` Connects (refused ones included) have arrived.
    pub async fn wait_connects(&self, n: usize) {
        let mut rx = self.connects.clone();
        tokio::time::timeout(WAIT, rx.wait_for(|&c| c >= n))
            .await
            .expect("too few Connects within the wait")
            .expect("server gone");
    }

    pub async fn accept(&mut self) -> ServerSession {
        tokio::time::timeout(WAIT, self.sessions.recv())
            .await
            .expect("no Connect within the wait")
            .expect("server gone")
    }

    /// Whether a Connect arrived that no [`accept`](Self::accept) took yet.
    /// Connects are sequential, so once the agent is connected elsewhere
    /// any earlier attempt here has already been queued.
    pub fn has_pending_connect(&mut self) -> bool {
        self.sessions.try_recv().is_ok()
    }

    /// Accepts a stream, checks its Hello, welcomes it.
    pub async fn accept_welcomed(&mut self, agent_id: &str) -> (ServerSession, Hello) {
        let mut s = self.accept().await;
        let hello = s.hello().await;
        s.welcome(agent_id, Duration::from_secs(60));
        (s, hello)
    }
}

struct Svc {
    sessions: mpsc::UnboundedSender<ServerSession>,
    refusals: Arc<Mutex<VecDeque<Status>>>,
    connects: watch::Sender<usize>,
}

type ConnectStream = Pin<Box<dyn Stream<Item = Result<ConnectResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AgentService for Svc {
    type ConnectStream = ConnectStream;

    async fn connect(&self, request: Request<Streaming<ConnectRequest>>) -> Result<Response<ConnectStream>, Status> {
        self.connects.send_modify(|c| *c += 1);
        if let Some(status) = self.refusals.lock().expect("lock").pop_front() {
            return Err(status);
        }
        let (outbound, rx) = mpsc::unbounded_channel();
        let _ = self.sessions.send(ServerSession { inbound: request.into_inner(), outbound });
        Ok(Response::new(Box::pin(UnboundedReceiverStream::new(rx))))
    }

    async fn register_agent(
        &self,
        _: Request<RegisterAgentRequest>,
    ) -> Result<Response<RegisterAgentResponse>, Status> {
        Err(Status::unimplemented("scripted"))
    }
    async fn get_agent(&self, _: Request<GetAgentRequest>) -> Result<Response<GetAgentResponse>, Status> {
        Err(Status::unimplemented("scripted"))
    }
    async fn list_agents(&self, _: Request<ListAgentsRequest>) -> Result<Response<ListAgentsResponse>, Status> {
        Err(Status::unimplemented("scripted"))
    }
    async fn heartbeat(&self, _: Request<HeartbeatRequest>) -> Result<Response<HeartbeatResponse>, Status> {
        Err(Status::unimplemented("scripted"))
    }
    async fn update_agent_status(
        &self,
        _: Request<UpdateAgentStatusRequest>,
    ) -> Result<Response<UpdateAgentStatusResponse>, Status> {
        Err(Status::unimplemented("scripted"))
    }
    async fn drain_agent(&self, _: Request<DrainAgentRequest>) -> Result<Response<DrainAgentResponse>, Status> {
        Err(Status::unimplemented("scripted"))
    }
    async fn deregister_agent(
        &self,
        _: Request<DeregisterAgentRequest>,
    ) -> Result<Response<DeregisterAgentResponse>, Status> {
        Err(Status::unimplemented("scripted"))
    }
    async fn create_agent_pool(
        &self,
        _: Request<CreateAgentPoolRequest>,
    ) -> Result<Response<CreateAgentPoolResponse>, Status> {
        Err(Status::unimplemented("scripted"))
    }
    async fn get_agent_pool(&self, _: Request<GetAgentPoolRequest>) -> Result<Response<GetAgentPoolResponse>, Status> {
        Err(Status::unimplemented("scripted"))
    }
    async fn list_agent_pools(
        &self,
        _: Request<ListAgentPoolsRequest>,
    ) -> Result<Response<ListAgentPoolsResponse>, Status> {
        Err(Status::unimplemented("scripted"))
    }
    async fn update_agent_pool(
        &self,
        _: Request<UpdateAgentPoolRequest>,
    ) -> Result<Response<UpdateAgentPoolResponse>, Status> {
        Err(Status::unimplemented("scripted"))
    }
    async fn delete_agent_pool(
        &self,
        _: Request<DeleteAgentPoolRequest>,
    ) -> Result<Response<DeleteAgentPoolResponse>, Status> {
        Err(Status::unimplemented("scripted"))
    }
    async fn get_pool_scaling_signal(
        &self,
        _: Request<GetPoolScalingSignalRequest>,
    ) -> Result<Response<GetPoolScalingSignalResponse>, Status> {
        Err(Status::unimplemented("scripted"))
    }
}

/// A URL nothing listens on: connects to it are refused at once.
pub async fn unreachable_url() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    drop(listener);
    format!("http://{addr}")
}

/// A reconnect policy whose first delay alone outlasts any test's [`WAIT`]:
/// a test that waits one fails instead of passing slowly.
pub fn glacial_backoff() -> ReconnectPolicy {
    ReconnectPolicy {
        initial_backoff: Duration::from_secs(3600),
        max_backoff: Duration::from_secs(3600),
        multiplier: 2.0,
        jitter: 0.0,
    }
}

/// What the test handler tells the test.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Started(String),
    SawCancel(String),
}

/// A handler driven by the payload:
/// - `ok:TEXT` succeeds with TEXT;
/// - `block` waits until the test releases the job id (or it is cancelled);
/// - `wait-cancel` waits for cancellation and returns `Cancelled`;
/// - `log` reports progress and 150 KiB of stdout, then succeeds;
/// - `fail` fails permanently with exit code 7;
/// - `panic` panics.
#[derive(Clone)]
pub struct TestHandler {
    pub events: mpsc::UnboundedSender<Event>,
    pub released: watch::Receiver<BTreeSet<String>>,
    pub runs: Arc<AtomicUsize>,
}

pub struct Controls {
    pub events: mpsc::UnboundedReceiver<Event>,
    release: watch::Sender<BTreeSet<String>>,
    pub runs: Arc<AtomicUsize>,
}

impl Controls {
    pub fn release(&self, job_id: &str) {
        self.release.send_modify(|s| {
            s.insert(job_id.to_owned());
        });
    }

    pub async fn event(&mut self) -> Event {
        tokio::time::timeout(WAIT, self.events.recv())
            .await
            .expect("no handler event within the wait")
            .expect("handler gone")
    }

    pub fn runs(&self) -> usize {
        self.runs.load(Ordering::SeqCst)
    }
}

pub const LOG_BYTES: usize = 150 * 1024;

impl TestHandler {
    pub fn new() -> (Self, Controls) {
        let (events_tx, events) = mpsc::unbounded_channel();
        let (release, released) = watch::channel(BTreeSet::new());
        let runs = Arc::new(AtomicUsize::new(0));
        (Self { events: events_tx, released, runs: runs.clone() }, Controls { events, release, runs })
    }
}

#[tonic::async_trait]
impl tether_agent_sdk::JobHandler for TestHandler {
    async fn run(&self, job: JobContext) -> JobResult {
        self.runs.fetch_add(1, Ordering::SeqCst);
        let id = job.job_id().to_owned();
        let _ = self.events.send(Event::Started(id.clone()));
        let payload = String::from_utf8_lossy(job.payload()).into_owned();
        if let Some(text) = payload.strip_prefix("ok:") {
            return JobResult::success(text.to_owned());
        }
        match payload.as_str() {
            "block" => {
                let mut released = self.released.clone();
                tokio::select! {
                    _ = released.wait_for(|s| s.contains(&id)) => JobResult::success("released"),
                    _ = job.cancelled() => {
                        let _ = self.events.send(Event::SawCancel(id));
                        JobResult::Cancelled
                    }
                }
            }
            "wait-cancel" => {
                job.cancelled().await;
                let _ = self.events.send(Event::SawCancel(id));
                JobResult::Cancelled
            }
            "log" => {
                job.progress(50.0, "half").await;
                job.log(LogStream::Stdout, Bytes::from(vec![b'x'; LOG_BYTES])).await;
                job.log(LogStream::Stderr, Bytes::from_static(b"warn\n")).await;
                JobResult::success("logged")
            }
            "fail" => JobResult::Failed { error: "bad input".into(), retryable: false, exit_code: Some(7) },
            "panic" => panic!("handler exploded"),
            other => JobResult::permanent(format!("unknown test payload {other:?}")),
        }
    }
}

/// A running agent under test.
pub struct TestAgent {
    pub handle: AgentHandle,
    pub run: JoinHandle<Result<(), AgentError>>,
    shutdown: Option<oneshot::Sender<()>>,
}

impl TestAgent {
    pub fn config(server: &ScriptedServer) -> AgentConfig {
        AgentConfig::new(server.url(), "agent-a")
            .with_pool("pool-1")
            .with_label("zone", "eu")
            .with_slots(4)
            .with_credential("secret")
            .with_version("test/1")
            .with_reconnect(ReconnectPolicy {
                initial_backoff: Duration::from_millis(1),
                max_backoff: Duration::from_millis(20),
                multiplier: 2.0,
                jitter: 0.1,
            })
    }

    pub fn spawn<H: tether_agent_sdk::JobHandler>(config: AgentConfig, handler: H) -> Self {
        let agent = Agent::new(config, handler);
        let handle = agent.handle();
        let (tx, rx) = oneshot::channel::<()>();
        let run = tokio::spawn(agent.run(async move {
            let _ = rx.await;
        }));
        Self { handle, run, shutdown: Some(tx) }
    }

    /// Resolves the shutdown future passed to `run`.
    pub fn shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    pub async fn result(self) -> Result<(), AgentError> {
        tokio::time::timeout(WAIT, self.run).await.expect("run did not return").expect("run panicked")
    }
}
