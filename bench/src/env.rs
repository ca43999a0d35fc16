//! One measurement's world: a fresh server over a fresh durable store on its
//! own runtime, and a fleet of SDK agents on theirs.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use async_trait::async_trait;
use bytes::Bytes;
use hdrhistogram::Histogram;
use tether::v1 as pb;
use tether::v1::queue_service_client::QueueServiceClient;
use tether_agent_sdk::{Agent, AgentConfig, AgentError, AgentHandle, JobContext, JobHandler, JobResult, LogStream};
use tether_server::clock::{Clock, SystemClock};
use tether_server::config::StoreKind;
use tether_server::engine::EngineConfig;
use tether_server::server::{serve, ServerParts};
use tether_server::store::dynamodb::{tables, DynamoConfig, DynamoStore, TableNames};
use tether_server::store::embedded::{EmbeddedOptions, EmbeddedStore, SyncMode};
use tether_server::store::hooked::HookedStore;
use tether_server::store::Store;
use tokio::runtime::Runtime;
use tokio::sync::{oneshot, Notify};
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint};

use crate::probe::{ns_histogram, CommitProbe, StoreCounters};

/// The queue every benchmark job goes to.
pub const QUEUE: &str = "bench";

/// Longest wait for start-up and shutdown steps.
const STEP_WAIT: Duration = Duration::from_secs(30);

/// Settings of one world.
#[derive(Clone, Debug)]
pub struct EnvConfig {
    pub agents: u32,
    pub slots: u32,
    pub sync_every: Option<u32>,
    pub commit_interval: Option<std::time::Duration>,
    pub idle_commit_interval: Option<std::time::Duration>,
    pub server_threads: usize,
    pub agent_threads: usize,
    pub probe_store: bool,
    /// Where the server keeps its data; DynamoDB gets fresh tables per run.
    pub store: StoreKind,
    pub dynamodb_endpoint: Option<String>,
    /// What the agents' handler does; `None`: report to the sink and
    /// succeed at once.
    pub output: Option<OutputWork>,
    /// EngineConfig.max_job_output_bytes; `None`: the engine's default.
    pub max_job_output_bytes: Option<u64>,
}

/// A handler that writes output as fast as the SDK takes it.
#[derive(Clone, Copy, Debug)]
pub struct OutputWork {
    /// Output bytes every job writes.
    pub bytes_per_job: u64,
    /// Bytes per `JobContext::log` call.
    pub chunk: usize,
}

/// Writes `bytes_per_job` bytes of text lines to stdout through
/// `JobContext::log`, `chunk` bytes a call, then succeeds.
struct WriteOutput {
    bytes_per_job: u64,
    /// One chunk of output, shared by every call (no copy per call).
    chunk: Bytes,
    sink: Arc<Sink>,
}

impl WriteOutput {
    fn new(work: OutputWork, sink: Arc<Sink>) -> WriteOutput {
        // Numbered 64-byte lines, as a build log might print.
        let mut text = Vec::with_capacity(work.chunk + 64);
        let mut line = 0u64;
        while text.len() < work.chunk.max(1) {
            text.extend_from_slice(
                format!("tether-bench output line {line:>10} ...........................\n").as_bytes(),
            );
            line += 1;
        }
        text.truncate(work.chunk.max(1));
        WriteOutput { bytes_per_job: work.bytes_per_job, chunk: Bytes::from(text), sink }
    }
}

#[async_trait]
impl JobHandler for WriteOutput {
    async fn run(&self, job: JobContext) -> JobResult {
        let mut left = self.bytes_per_job;
        while left > 0 {
            if job.is_cancelled() {
                return JobResult::Cancelled;
            }
            let n = usize::try_from(left).unwrap_or(usize::MAX).min(self.chunk.len());
            job.log(LogStream::Stdout, self.chunk.slice(..n)).await;
            left -= n as u64;
        }
        self.sink.on_job(job.payload());
        JobResult::Succeeded { result: Bytes::new() }
    }
}

/// The measured store, wrapped in the commit probe when asked.
fn probed<S: Store>(store: S, probe: bool, counters: &Arc<StoreCounters>) -> Arc<dyn Store> {
    if probe {
        Arc::new(HookedStore { inner: store, hook: CommitProbe { counters: counters.clone() } })
    } else {
        Arc::new(store)
    }
}

/// Fresh, empty tables for one run.
async fn fresh_dynamo(endpoint: Option<String>) -> anyhow::Result<DynamoStore> {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let prefix = format!("bench-{}-{nanos}-", std::process::id());
    let config = DynamoConfig { endpoint, table_prefix: prefix.clone(), region: None };
    let client = DynamoStore::client(&config).await;
    tables::create_tables(&client, &TableNames::new(&prefix)).await.map_err(|e| anyhow!("create tables: {e}"))?;
    Ok(DynamoStore::with_client(client, &prefix))
}

/// Where agents report what they ran. Shared by every handler of a world.
pub struct Sink {
    /// Handler runs so far.
    pub completed: AtomicU64,
    /// `done` fires once `completed` reaches this.
    pub target: AtomicU64,
    pub done: Notify,
    /// Zero point of the timestamps carried in latency payloads.
    pub base: Instant,
    /// Scheduled-send to handler-start latency, ns.
    pub latency: Mutex<Histogram<u64>>,
}

impl Sink {
    fn new(base: Instant) -> Sink {
        Sink {
            completed: AtomicU64::new(0),
            target: AtomicU64::new(u64::MAX),
            done: Notify::new(),
            base,
            latency: Mutex::new(ns_histogram()),
        }
    }

    /// Called at the start of every handler run. A latency payload is a
    /// flag byte (1 = record, 0 = warm-up) and the scheduled send time in
    /// ns since `base`, little-endian.
    fn on_job(&self, payload: &[u8]) {
        if payload.len() == 9 && payload[0] == 1 {
            let now = self.base.elapsed().as_nanos() as u64;
            let mut sent = [0u8; 8];
            sent.copy_from_slice(&payload[1..]);
            let sent = u64::from_le_bytes(sent);
            let mut h = self.latency.lock().unwrap_or_else(|e| e.into_inner());
            h.saturating_record(now.saturating_sub(sent).max(1));
        }
        let n = self.completed.fetch_add(1, Ordering::AcqRel) + 1;
        if n == self.target.load(Ordering::Acquire) {
            // notify_one keeps a permit if nobody waits yet: no lost wake-up.
            self.done.notify_one();
        }
    }

    /// Sets the number of handler runs `wait_done` waits for.
    pub fn expect(&self, total: u64) {
        self.target.store(total, Ordering::Release);
        if self.completed.load(Ordering::Acquire) >= total {
            self.done.notify_one();
        }
    }

    /// Waits until `completed` reaches the target, at most until `deadline`.
    pub async fn wait_done(&self, deadline: tokio::time::Instant) -> anyhow::Result<()> {
        loop {
            let target = self.target.load(Ordering::Acquire);
            let completed = self.completed.load(Ordering::Acquire);
            if completed >= target {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, self.done.notified()).await.is_err() {
                bail!("timed out: agents ran {completed} of {target} jobs");
            }
        }
    }
}

/// A running server plus agents.
pub struct Env {
    pub url: String,
    pub sink: Arc<Sink>,
    pub counters: Arc<StoreCounters>,
    /// The server's store (as the engine has it), for reading back what a
    /// phase left in it.
    pub store: Arc<dyn Store>,
    server_rt: Option<Runtime>,
    agent_rt: Option<Runtime>,
    server_stop: Option<oneshot::Sender<()>>,
    server_task: Option<JoinHandle<anyhow::Result<()>>>,
    agent_stops: Vec<oneshot::Sender<()>>,
    agent_tasks: Vec<JoinHandle<Result<(), AgentError>>>,
    _dir: tempfile::TempDir,
}

impl Env {
    /// Starts a server over a store in a new temp dir, and the agents; waits
    /// until every agent is connected. Call from the client runtime.
    pub async fn start(config: &EnvConfig, base: Instant) -> anyhow::Result<Env> {
        let dir = tempfile::Builder::new().prefix("tether-bench-").tempdir().context("create temp dir")?;
        let server_rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.server_threads)
            .thread_name("srv-worker")
            .enable_all()
            .build()
            .context("build server runtime")?;
        let agent_rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.agent_threads)
            .thread_name("agt-worker")
            .enable_all()
            .build()
            .context("build agent runtime")?;

        let options = EmbeddedOptions {
            sync: match config.sync_every {
                Some(n) => SyncMode::EveryNth(n),
                None => SyncMode::Always,
            },
            ..EmbeddedOptions::default()
        };
        let counters = Arc::new(StoreCounters::default());
        *counters.commit_ns.lock().unwrap_or_else(|e| e.into_inner()) = Some(ns_histogram());
        let store = match config.store {
            StoreKind::Embedded => {
                let embedded = EmbeddedStore::open(dir.path(), options).map_err(|e| anyhow!("open store: {e}"))?;
                probed(embedded, config.probe_store, &counters)
            }
            StoreKind::Dynamodb => {
                probed(fresh_dynamo(config.dynamodb_endpoint.clone()).await?, config.probe_store, &counters)
            }
        };

        // Bound here so the address is known before the server runs.
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").context("bind 127.0.0.1:0")?;
        std_listener.set_nonblocking(true).context("set listener non-blocking")?;
        let addr = std_listener.local_addr().context("listener address")?;
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let parts = ServerParts {
            store: store.clone(),
            clock,
            engine: EngineConfig {
                busy_commit_interval: config.commit_interval.unwrap_or(EngineConfig::default().busy_commit_interval),
                commit_interval: config.idle_commit_interval.unwrap_or(EngineConfig::default().commit_interval),
                max_job_output_bytes: config
                    .max_job_output_bytes
                    .unwrap_or(EngineConfig::default().max_job_output_bytes),
                ..EngineConfig::default()
            },
            max_agent_streams: 1000,
            ops: Default::default(),
            cluster: None,
            secrets: None,
        };
        let (server_stop, stop) = oneshot::channel::<()>();
        let server_task = server_rt.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(std_listener)?;
            serve(listener, parts, async move {
                let _ = stop.await;
            })
            .await
        });
        let url = format!("http://{addr}");

        let sink = Arc::new(Sink::new(base));
        let mut env = Env {
            url: url.clone(),
            sink: sink.clone(),
            counters,
            store,
            server_rt: Some(server_rt),
            agent_rt: None,
            server_stop: Some(server_stop),
            server_task: Some(server_task),
            agent_stops: Vec::new(),
            agent_tasks: Vec::new(),
            _dir: dir,
        };

        let mut handles: Vec<AgentHandle> = Vec::new();
        for i in 0..config.agents {
            let agent_config = AgentConfig::new(url.clone(), format!("bench-{i}")).with_slots(config.slots);
            let agent = match config.output {
                None => {
                    let agent_sink = sink.clone();
                    Agent::new(agent_config, move |job: JobContext| {
                        agent_sink.on_job(job.payload());
                        async { JobResult::Succeeded { result: Bytes::new() } }
                    })
                }
                Some(work) => Agent::new(agent_config, WriteOutput::new(work, sink.clone())),
            };
            handles.push(agent.handle());
            let (stop_tx, stop_rx) = oneshot::channel::<()>();
            env.agent_stops.push(stop_tx);
            env.agent_tasks.push(agent_rt.spawn(agent.run(async move {
                let _ = stop_rx.await;
            })));
        }
        env.agent_rt = Some(agent_rt);
        for (i, handle) in handles.iter().enumerate() {
            tokio::time::timeout(STEP_WAIT, handle.wait_connected())
                .await
                .with_context(|| format!("agent bench-{i} did not connect within {STEP_WAIT:?}"))?
                .with_context(|| format!("agent bench-{i} stopped before connecting"))?;
        }
        Ok(env)
    }

    /// A new HTTP/2 connection to the server.
    pub async fn channel(&self) -> anyhow::Result<Channel> {
        Endpoint::from_shared(self.url.clone())
            .context("server url")?
            .tcp_nodelay(true)
            .connect()
            .await
            .with_context(|| format!("connect to {}", self.url))
    }

    /// Drains the agents and stops the server gracefully. Call from the
    /// client runtime, then drop `self` outside any runtime.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        for stop in self.agent_stops.drain(..) {
            let _ = stop.send(());
        }
        for (i, task) in self.agent_tasks.drain(..).enumerate() {
            match tokio::time::timeout(STEP_WAIT, task).await {
                Err(_) => bail!("agent bench-{i} did not drain within {STEP_WAIT:?}"),
                Ok(joined) => joined.context("agent task")?.with_context(|| format!("agent bench-{i} failed"))?,
            }
        }
        if let Some(stop) = self.server_stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.server_task.take() {
            tokio::time::timeout(STEP_WAIT, task)
                .await
                .map_err(|_| anyhow!("server did not stop within {STEP_WAIT:?}"))?
                .context("server task")?
                .context("server")?;
        }
        Ok(())
    }

    /// Releases the runtimes; call outside any async context.
    pub fn shutdown_runtimes(&mut self) {
        if let Some(rt) = self.agent_rt.take() {
            rt.shutdown_timeout(Duration::from_secs(5));
        }
        if let Some(rt) = self.server_rt.take() {
            rt.shutdown_timeout(Duration::from_secs(5));
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        // If a phase failed, the runtimes still hold tasks; dropping them
        // inside a runtime would panic, so shut them down in the background.
        if let Some(rt) = self.agent_rt.take() {
            rt.shutdown_background();
        }
        if let Some(rt) = self.server_rt.take() {
            rt.shutdown_background();
        }
    }
}

/// Jobs of `QUEUE` in state SUCCEEDED, per GetQueueStats.
pub async fn succeeded(client: &mut QueueServiceClient<Channel>) -> anyhow::Result<u64> {
    let stats =
        client.get_queue_stats(pb::GetQueueStatsRequest { queue: QUEUE.into() }).await.context("GetQueueStats")?;
    Ok(stats
        .into_inner()
        .by_state
        .iter()
        .find(|c| c.state == pb::QueuedJobState::Succeeded as i32)
        .map_or(0, |c| c.count))
}

/// Polls GetQueueStats until `n` jobs succeeded; returns when that was seen.
pub async fn wait_succeeded(
    client: &mut QueueServiceClient<Channel>,
    n: u64,
    deadline: tokio::time::Instant,
) -> anyhow::Result<Instant> {
    loop {
        let seen = succeeded(client).await?;
        if seen >= n {
            if seen > n {
                bail!("GetQueueStats counts {seen} SUCCEEDED jobs, expected {n}");
            }
            return Ok(Instant::now());
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("timed out: GetQueueStats counts {seen} of {n} jobs SUCCEEDED");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}
