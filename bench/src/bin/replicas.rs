//! Cross-replica dispatch latency: two replicas share one set of DynamoDB
//! tables (fresh per run); agents connect only to replica B while a client
//! enqueues single jobs on replica A at a steady rate. Measured: the time
//! from sending an enqueue to A until the handler of an agent of B starts
//! the job (a wake-up from A to B, B's read and its conditional claim),
//! and the store writes per job across both replicas.
//!
//! `cargo run --release -p tether-bench --bin tether-replicas-bench --
//!  --dynamodb-endpoint http://127.0.0.1:PORT` prints one JSON line.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use async_trait::async_trait;
use clap::Parser;
use hdrhistogram::Histogram;
use tether::v1 as pb;
use tether::v1::queue_service_client::QueueServiceClient;
use tether_agent_sdk::{Agent, AgentConfig, JobContext, JobResult};
use tether_server::clock::SystemClock;
use tether_server::cluster::ClusterConfig;
use tether_server::engine::EngineConfig;
use tether_server::server::{serve, ServerParts};
use tether_server::store::dynamodb::{tables, DynamoConfig, DynamoStore, TableNames};
use tether_server::store::hooked::{HookedStore, WriteHook};
use tether_server::store::membership::Membership;
use tether_server::store::{Store, StoreResult, Write, WriteOutcome};
use tokio::sync::{oneshot, Notify};
use tonic::transport::Endpoint;

#[derive(Parser, Debug)]
#[command(about = "Cross-replica dispatch latency on DynamoDB (Local)")]
struct Args {
    /// DynamoDB endpoint (e.g. DynamoDB Local).
    #[arg(long)]
    dynamodb_endpoint: String,
    /// Jobs to measure.
    #[arg(long, default_value_t = 500)]
    jobs: u64,
    /// Enqueues per second on replica A.
    #[arg(long, default_value_t = 50)]
    rate: u64,
    /// Agents on replica B (4 slots each).
    #[arg(long, default_value_t = 2)]
    agents: u32,
    /// Jobs enqueued before measuring (connections and caches warm up).
    #[arg(long, default_value_t = 50)]
    warmup: u64,
}

/// Counts the writes each replica sends to the store.
struct CountWrites(Arc<AtomicU64>);

#[async_trait]
impl WriteHook for CountWrites {
    async fn write(&self, inner: &dyn Store, batch: Vec<Write>) -> StoreResult<Vec<WriteOutcome>> {
        self.0.fetch_add(batch.len() as u64, Ordering::Relaxed);
        inner.write(batch).await
    }
}

struct Replica {
    url: String,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

async fn replica(client: aws_sdk_dynamodb::Client, prefix: &str, writes: Arc<AtomicU64>) -> anyhow::Result<Replica> {
    let dynamo = Arc::new(DynamoStore::with_client(client, prefix));
    let store: Arc<dyn Store> = Arc::new(HookedStore { inner: DynamoStore::clone(&dynamo), hook: CountWrites(writes) });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.context("bind")?;
    let url = format!("http://{}", listener.local_addr()?);
    let membership: Arc<dyn Membership> = dynamo;
    let parts = ServerParts {
        store,
        clock: Arc::new(SystemClock),
        engine: EngineConfig::default(),
        max_agent_streams: 1000,
        ops: Default::default(),
        cluster: Some(ClusterConfig {
            heartbeat: Duration::from_millis(500),
            ..ClusterConfig::new(membership, url.clone())
        }),
        secrets: None,
    };
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(serve(listener, parts, async move {
        let _ = stopped.await;
    }));
    Ok(Replica { url, stop: Some(stop), task })
}

impl Replica {
    async fn shutdown(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.await.context("join")?
    }
}

/// Where handlers report: latency from the send time in the payload.
struct Sink {
    base: Instant,
    latency: Mutex<Histogram<u64>>,
    started: AtomicU64,
    target: u64,
    done: Notify,
}

impl Sink {
    fn on_job(&self, payload: &[u8]) {
        if payload.len() == 9 && payload[0] == 1 {
            let mut sent = [0u8; 8];
            sent.copy_from_slice(&payload[1..]);
            let now = self.base.elapsed().as_nanos() as u64;
            let took = now.saturating_sub(u64::from_le_bytes(sent)).max(1);
            self.latency.lock().unwrap_or_else(|e| e.into_inner()).saturating_record(took);
        }
        if self.started.fetch_add(1, Ordering::AcqRel) + 1 == self.target {
            self.done.notify_one();
        }
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let prefix = format!("replicas-bench-{}-{nanos}-", std::process::id());
    let config =
        DynamoConfig { endpoint: Some(args.dynamodb_endpoint.clone()), table_prefix: prefix.clone(), region: None };
    let client = DynamoStore::client(&config).await;
    tables::create_tables(&client, &TableNames::new(&prefix)).await.map_err(|e| anyhow!("create tables: {e}"))?;

    let writes = Arc::new(AtomicU64::new(0));
    let b = replica(client.clone(), &prefix, writes.clone()).await?;
    let a = replica(client.clone(), &prefix, writes.clone()).await?;
    // Both must know each other before A's wake-ups can reach B.
    let members = DynamoStore::with_client(client.clone(), &prefix);
    let known = async {
        loop {
            if members.replicas().await.map(|r| r.len() >= 2).unwrap_or(false) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // One more heartbeat, so the replica announced first has read the other.
        tokio::time::sleep(Duration::from_millis(600)).await;
    };
    tokio::time::timeout(Duration::from_secs(30), known).await.context("replicas announce themselves")?;

    let total = args.warmup + args.jobs;
    let sink = Arc::new(Sink {
        base: Instant::now(),
        latency: Mutex::new(Histogram::new_with_bounds(1, 100_000_000_000, 3)?),
        started: AtomicU64::new(0),
        target: total,
        done: Notify::new(),
    });
    let mut agents = Vec::new();
    for i in 0..args.agents {
        let sink = sink.clone();
        let handler = move |ctx: JobContext| {
            sink.on_job(ctx.payload());
            async { JobResult::success("") }
        };
        let agent = Agent::new(AgentConfig::new(b.url.clone(), format!("bench-b-{i}")).with_slots(4), handler);
        let handle = agent.handle();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(agent.run(async move {
            let _ = stopped.await;
        }));
        tokio::time::timeout(Duration::from_secs(30), handle.wait_connected())
            .await
            .context("agent connects")?
            .map_err(|e| anyhow!("agent: {e}"))?;
        agents.push((stop, task));
    }

    let channel = Endpoint::from_shared(a.url.clone())?.tcp_nodelay(true).connect().await?;
    let writes_before = writes.load(Ordering::Relaxed);
    let done = sink.done.notified();
    tokio::pin!(done);
    done.as_mut().enable();
    let period = Duration::from_nanos(1_000_000_000 / args.rate.max(1));
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut sends = Vec::new();
    for n in 0..total {
        ticks.tick().await;
        let mut payload = vec![u8::from(n >= args.warmup)];
        payload.extend_from_slice(&(sink.base.elapsed().as_nanos() as u64).to_le_bytes());
        let mut q = QueueServiceClient::new(channel.clone());
        sends.push(tokio::spawn(async move {
            q.enqueue_job(pb::EnqueueJobRequest {
                queue: "bench".into(),
                payload: payload.into(),
                ..Default::default()
            })
            .await
            .map(|_| ())
        }));
    }
    for send in sends {
        send.await?.map_err(|s| anyhow!("enqueue: {s}"))?;
    }
    if tokio::time::timeout(Duration::from_secs(120), done).await.is_err() {
        bail!("timed out: {} of {total} jobs started", sink.started.load(Ordering::Acquire));
    }
    // Let the last results commit before counting writes.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let store_writes = writes.load(Ordering::Relaxed) - writes_before;

    for (stop, task) in agents {
        let _ = stop.send(());
        let _ = task.await;
    }
    a.shutdown().await?;
    b.shutdown().await?;
    let _ = tables::delete_tables(&client, &TableNames::new(&prefix)).await;

    let h = sink.latency.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let ms = |q: f64| (h.value_at_quantile(q) as f64 / 1e6 * 100.0).round() / 100.0;
    let line = serde_json::json!({
        "bench": "cross_replica_dispatch",
        "store": "dynamodb",
        "jobs": args.jobs,
        "rate_per_sec": args.rate,
        "agents_on_b": args.agents,
        "cross_replica_dispatch_p50_ms": ms(0.5),
        "cross_replica_dispatch_p99_ms": ms(0.99),
        "cross_replica_dispatch_max_ms": (h.max() as f64 / 1e6 * 100.0).round() / 100.0,
        "store_writes_per_job": ((store_writes as f64 / total as f64) * 100.0).round() / 100.0,
    });
    println!("{line}");
    Ok(())
}
