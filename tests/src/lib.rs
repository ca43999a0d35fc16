//! Shared helpers for the end-to-end tests: a real server on an ephemeral
//! port over a real embedded store, gRPC clients, and a raw stream agent for
//! protocol-level tests.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tether::v1 as pb;
use tether::v1::agent_service_client::AgentServiceClient;
use tether::v1::queue_service_client::QueueServiceClient;
use tether_server::clock::{Clock, ManualClock, SystemClock};
use tether_server::cluster::ClusterConfig;
use tether_server::engine::EngineConfig;
use tether_server::server::{serve, Operability, ServerParts};
use tether_server::store::dynamodb::local as dynamodb_local;
use tether_server::store::dynamodb::{tables, DynamoStore, TableNames};
use tether_server::store::embedded::{EmbeddedOptions, EmbeddedStore};
use tether_server::store::membership::Membership;
use tether_server::store::Store;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic::Streaming;

/// The store test servers use. `TETHER_TEST_STORE=dynamodb` runs a suite on
/// DynamoDB Local (started as `tether_server::store::dynamodb::local` says);
/// anything else, or unset, on the embedded store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Embedded,
    Dynamodb,
}

pub fn backend() -> Backend {
    match std::env::var("TETHER_TEST_STORE").as_deref() {
        Ok("dynamodb") => Backend::Dynamodb,
        Ok("embedded") | Err(_) => Backend::Embedded,
        Ok(other) => panic!("TETHER_TEST_STORE={other:?}: use embedded or dynamodb"),
    }
}

/// The DynamoDB tables standing for a data directory: one prefix per
/// directory, so a restarted server finds what the last one wrote.
async fn dynamo_store_for(dir: &Path) -> DynamoStore {
    let name: String = dir
        .file_name()
        .map(|n| n.to_string_lossy().chars().filter(|c| c.is_ascii_alphanumeric()).collect())
        .unwrap_or_default();
    let prefix = format!("e2e-{name}-");
    let client = dynamodb_local::client();
    if let Err(e) = tables::create_tables(&client, &TableNames::new(&prefix)).await {
        panic!("creating tables on DynamoDB Local: {e}");
    }
    DynamoStore::with_client(client, &prefix)
}

/// The secrets key of every test server.
pub const TEST_SECRETS_KEY: [u8; 32] = [0x5e; 32];

/// `TETHER_TEST_LOG=<filter>` (e.g. `tether_server=info`) prints the
/// servers' logs with the test's output, to see why a test failed.
fn init_log() {
    if let Ok(filter) = std::env::var("TETHER_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    }
}

/// Upper bound for any single wait in a test; a test that hits it failed.
pub const WAIT: Duration = Duration::from_secs(60);

/// How to start a test server.
#[derive(Clone, Default)]
pub struct Options {
    /// Drive time by hand; `None` uses the system clock.
    pub clock: Option<ManualClock>,
    pub engine: Option<EngineConfig>,
    /// Cap on agent streams (default 1000).
    pub max_agent_streams: Option<usize>,
    /// Serve this store instead of an embedded store in the data directory.
    pub store: Option<Arc<dyn Store>>,
    /// Join the replicas announced here (wake-ups between replicas).
    pub membership: Option<Arc<dyn Membership>>,
}

/// Operator extras for a test server (see [`TestServer::start_with`]).
#[derive(Clone, Default)]
pub struct Extras {
    /// Serve Prometheus metrics on a port-0 listener ([`TestServer::metrics_addr`]).
    pub metrics: bool,
    /// Origins allowed by CORS for gRPC-Web.
    pub cors_allow_origins: Vec<String>,
}

/// A running server.
pub struct TestServer {
    pub addr: SocketAddr,
    pub url: String,
    pub clock: Option<ManualClock>,
    /// Where `/metrics` is served, when asked for.
    pub metrics_addr: Option<SocketAddr>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

/// A temporary data directory that outlives server restarts.
pub struct DataDir(tempfile::TempDir);

impl DataDir {
    pub fn new() -> DataDir {
        DataDir(tempfile::tempdir().expect("tempdir"))
    }

    pub fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Default for DataDir {
    fn default() -> Self {
        DataDir::new()
    }
}

/// Engine settings for tests: short backoff so manual clocks advance little.
pub fn test_engine_config() -> EngineConfig {
    EngineConfig {
        heartbeat_interval: Duration::from_millis(500),
        reconnect_grace: Duration::from_secs(5),
        backoff_base: Duration::from_secs(1),
        backoff_max: Duration::from_secs(8),
        ..EngineConfig::default()
    }
}

impl TestServer {
    /// Starts a server on 127.0.0.1:0 over a store in `dir`.
    pub async fn start(dir: &DataDir, options: Options) -> TestServer {
        Self::start_at(dir.path().to_path_buf(), options).await
    }

    /// [`TestServer::start`] with a manual clock at [`epoch`] and the test
    /// engine settings.
    pub async fn start_manual(dir: &DataDir) -> TestServer {
        Self::start(dir, Options { clock: Some(ManualClock::new(epoch())), ..Options::default() }).await
    }

    pub async fn start_at(dir: PathBuf, options: Options) -> TestServer {
        Self::start_with(dir, options, Extras::default()).await
    }

    /// Starts a server with a metrics endpoint and/or CORS.
    pub async fn start_with(dir: PathBuf, options: Options, extras: Extras) -> TestServer {
        init_log();
        let metrics_listener = match extras.metrics {
            true => Some(tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind metrics")),
            false => None,
        };
        let metrics_addr = metrics_listener.as_ref().map(|l| l.local_addr().expect("metrics addr"));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let store: Arc<dyn Store> = match options.store.clone() {
            Some(store) => store,
            None => match backend() {
                Backend::Embedded => {
                    Arc::new(EmbeddedStore::open(&dir, EmbeddedOptions::default()).expect("open store"))
                }
                Backend::Dynamodb => Arc::new(dynamo_store_for(&dir).await),
            },
        };
        let clock: Arc<dyn Clock> = match &options.clock {
            Some(c) => Arc::new(c.clone()),
            None => Arc::new(SystemClock),
        };
        let parts = ServerParts {
            store,
            clock,
            engine: options.engine.unwrap_or_else(test_engine_config),
            max_agent_streams: options.max_agent_streams.unwrap_or(1000),
            ops: Operability { metrics_listener, cors_allow_origins: extras.cors_allow_origins },
            // Peers learn of each other within a fifth of a second.
            cluster: options.membership.clone().map(|m| ClusterConfig {
                heartbeat: Duration::from_millis(200),
                ..ClusterConfig::new(m, format!("http://{addr}"))
            }),
            // One key for every test server, so replicas share it.
            secrets: tether_server::secrets::SecretsKey::from_bytes(&TEST_SECRETS_KEY).ok().map(Arc::new),
        };
        let (shutdown, stop) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, parts, async move {
            let _ = stop.await;
        }));
        TestServer {
            addr,
            url: format!("http://{addr}"),
            clock: options.clock,
            metrics_addr,
            shutdown: Some(shutdown),
            task: Some(task),
        }
    }

    pub async fn channel(&self) -> Channel {
        Endpoint::from_shared(self.url.clone()).expect("url").tcp_nodelay(true).connect().await.expect("connect")
    }

    pub async fn queue(&self) -> QueueServiceClient<Channel> {
        QueueServiceClient::new(self.channel().await)
    }

    pub async fn dashboard(&self) -> tether::v1::dashboard_service_client::DashboardServiceClient<Channel> {
        tether::v1::dashboard_service_client::DashboardServiceClient::new(self.channel().await)
    }

    pub async fn agents(&self) -> AgentServiceClient<Channel> {
        AgentServiceClient::new(self.channel().await)
    }

    /// Moves the manual clock.
    pub fn advance(&self, by: Duration) {
        self.clock.as_ref().expect("this server has no manual clock").advance(by);
    }

    /// Graceful shutdown; waits until the server has stopped.
    pub async fn stop(mut self) {
        self.stop_inner().await;
    }

    /// Waits for the server to end on its own (e.g. its engine died) and
    /// returns how it ended.
    pub async fn ended(mut self) -> anyhow::Result<()> {
        let task = self.task.take().expect("the server task");
        tokio::time::timeout(WAIT, task).await.expect("the server ends in time").expect("join")
    }

    /// Starts a graceful shutdown without waiting for it; [`Self::stop`]
    /// then waits for the server to finish.
    pub fn begin_stop(&mut self) {
        if let Some(s) = self.shutdown.take() {
            let _ = s.send(());
        }
    }

    async fn stop_inner(&mut self) {
        self.begin_stop();
        if let Some(task) = self.task.take() {
            let result = tokio::time::timeout(WAIT, task).await.expect("server stops in time").expect("join");
            result.expect("server ran cleanly");
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(s) = self.shutdown.take() {
            let _ = s.send(());
        }
    }
}

/// A start time for manual clocks.
pub fn epoch() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

/// An enqueue request with a payload.
pub fn job(queue: &str, payload: &str) -> pb::EnqueueJobRequest {
    pb::EnqueueJobRequest { queue: queue.into(), payload: payload.as_bytes().to_vec().into(), ..Default::default() }
}

/// An agent speaking the raw Connect protocol, for protocol-level tests.
pub struct RawAgent {
    pub agent_id: String,
    pub welcome: pb::Welcome,
    outbound: mpsc::Sender<pb::ConnectRequest>,
    inbound: Streaming<pb::ConnectResponse>,
}

pub fn hello(name: &str, slots: u32) -> pb::Hello {
    pb::Hello {
        name: name.into(),
        pool: "default".into(),
        slots,
        version: "test".into(),
        min_protocol_version: 1,
        max_protocol_version: 1,
        ..Default::default()
    }
}

impl RawAgent {
    pub async fn connect(server: &TestServer, hello: pb::Hello) -> Result<RawAgent, tonic::Status> {
        let (outbound, rx) = mpsc::channel(1024);
        outbound
            .send(pb::ConnectRequest { message: Some(pb::connect_request::Message::Hello(hello)) })
            .await
            .expect("send hello");
        let mut client = server.agents().await;
        let mut inbound = client.connect(ReceiverStream::new(rx)).await?.into_inner();
        let first = inbound.message().await?.ok_or_else(|| tonic::Status::internal("no welcome"))?;
        match first.message {
            Some(pb::connect_response::Message::Welcome(welcome)) => {
                Ok(RawAgent { agent_id: welcome.agent_id.clone(), welcome, outbound, inbound })
            }
            other => Err(tonic::Status::internal(format!("expected a welcome, got {other:?}"))),
        }
    }

    pub async fn send(&self, message: pb::connect_request::Message) {
        self.outbound.send(pb::ConnectRequest { message: Some(message) }).await.expect("send");
    }

    /// The next message from the server (panics after [`WAIT`]).
    pub async fn next(&mut self) -> pb::connect_response::Message {
        let message = tokio::time::timeout(WAIT, self.inbound.message())
            .await
            .expect("a server message in time")
            .expect("stream ok")
            .expect("stream open");
        message.message.expect("message set")
    }

    /// The next message from the server, or `None` once the stream has
    /// ended (either way; panics after [`WAIT`]).
    pub async fn next_or_end(&mut self) -> Option<pb::connect_response::Message> {
        let message = tokio::time::timeout(WAIT, self.inbound.message()).await.expect("a server message in time");
        message.ok().flatten().map(|m| m.message.expect("message set"))
    }

    /// Waits for the next assignment, skipping other messages.
    pub async fn next_assignment(&mut self) -> pb::Assignment {
        loop {
            if let pb::connect_response::Message::Assignment(a) = self.next().await {
                return a;
            }
        }
    }

    /// Waits for the ack of an update about `job_id`.
    pub async fn next_ack(&mut self) -> pb::JobUpdateAck {
        loop {
            if let pb::connect_response::Message::JobUpdateAck(a) = self.next().await {
                return a;
            }
        }
    }

    /// Accepts and starts an assignment in one message (protocol version 2).
    pub async fn accept_started(&self, job: &pb::JobRef) {
        self.send(pb::connect_request::Message::AssignmentAck(pb::AssignmentAck {
            job: Some(job.clone()),
            accepted: true,
            reason: String::new(),
            started: true,
        }))
        .await;
    }

    pub async fn accept_and_start(&self, job: &pb::JobRef) {
        self.send(pb::connect_request::Message::AssignmentAck(pb::AssignmentAck {
            job: Some(job.clone()),
            accepted: true,
            reason: String::new(),
            started: false,
        }))
        .await;
        self.send(pb::connect_request::Message::JobStarted(pb::JobStarted { job: Some(job.clone()) })).await;
    }

    pub async fn finish(&self, job: &pb::JobRef, outcome: pb::JobOutcome, result: &str) {
        self.send(pb::connect_request::Message::JobFinished(pb::JobFinished {
            job: Some(job.clone()),
            outcome: outcome as i32,
            result: result.as_bytes().to_vec().into(),
            error: String::new(),
            exit_code: 0,
        }))
        .await;
    }

    /// Drops the stream as a crashed agent would.
    pub fn kill(self) {}
}

/// Waits on a watch stream until `pred` holds for a job event.
pub async fn wait_for_event(
    watch: &mut Streaming<pb::WatchQueueResponse>,
    mut pred: impl FnMut(&pb::QueuedJob) -> bool,
) -> pb::QueuedJob {
    loop {
        let event = tokio::time::timeout(WAIT, watch.message())
            .await
            .expect("an event in time")
            .expect("watch ok")
            .expect("watch open");
        if let Some(job) = event.job {
            if pred(&job) {
                return job;
            }
        }
    }
}

pub fn state(job: &pb::QueuedJob) -> pb::QueuedJobState {
    pb::QueuedJobState::try_from(job.state).unwrap_or(pb::QueuedJobState::Unspecified)
}

/// Polls `condition` until it holds, failing the test after [`WAIT`]. For
/// state the server exposes only by query (e.g. an agent's connection).
pub async fn wait_until<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while !condition().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Whether the server sees the agent connected.
pub async fn agent_connected(server: &TestServer, agent_id: &str) -> bool {
    let mut agents = server.agents().await;
    agents
        .get_agent(pb::GetAgentRequest { id: agent_id.to_string() })
        .await
        .map(|r| r.into_inner().agent.is_some_and(|a| a.connected))
        .unwrap_or(false)
}

/// One HTTP/1.1 exchange on a fresh connection: the response head and body.
pub async fn http1(
    addr: SocketAddr,
    request: http::Request<http_body_util::Full<bytes::Bytes>>,
) -> (http::response::Parts, bytes::Bytes) {
    use http_body_util::BodyExt;
    let exchange = async {
        let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.expect("handshake");
        tokio::spawn(conn);
        let response = sender.send_request(request).await.expect("response");
        let (parts, body) = response.into_parts();
        (parts, body.collect().await.expect("body").to_bytes())
    };
    tokio::time::timeout(WAIT, exchange).await.expect("an HTTP answer in time")
}

/// The Prometheus text of the server's `/metrics`.
pub async fn scrape(server: &TestServer) -> String {
    let addr = server.metrics_addr.expect("metrics enabled");
    let request = http::Request::get("/metrics")
        .header("host", addr.to_string())
        .body(http_body_util::Full::default())
        .expect("request");
    let (parts, body) = http1(addr, request).await;
    assert_eq!(parts.status, http::StatusCode::OK);
    let content_type = parts.headers.get("content-type").expect("content type").to_str().expect("ascii");
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    String::from_utf8(body.to_vec()).expect("utf-8")
}

/// The value of the sample `name_and_labels` (exactly as rendered).
pub fn sample(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let (key, value) = line.rsplit_once(' ')?;
        (key == name_and_labels).then(|| value.parse().expect("a number"))
    })
}

/// A codec that sends and receives message bytes as they are: for frames
/// no generated client would send.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = bytes::Bytes;
    type Decode = bytes::Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }

    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = bytes::Bytes;
    type Error = tonic::Status;

    fn encode(&mut self, item: bytes::Bytes, dst: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), tonic::Status> {
        bytes::BufMut::put(dst, item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = bytes::Bytes;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<bytes::Bytes>, tonic::Status> {
        let n = bytes::Buf::remaining(src);
        Ok(Some(bytes::Buf::copy_to_bytes(src, n)))
    }
}

/// The `google.rpc.BadRequest` field names of a status.
pub fn violated_fields(status: &tonic::Status) -> Vec<String> {
    use tonic_types::StatusExt;
    status
        .get_error_details()
        .bad_request()
        .map(|b| b.field_violations.iter().map(|v| v.field.clone()).collect())
        .unwrap_or_default()
}
