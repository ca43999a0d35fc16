//! A swarm of raw protocol-v2 agents on one `tether server` process: how
//! the dispatcher and the server's memory scale with the fleet.
//!
//! Each run starts a server, connects N agents (1 slot each, a heartbeat
//! every 5 s, finishing every job at once) over M shared HTTP/2 connections
//! (or one connection each), and measures
//!
//! - server memory per agent (resident set before and after connecting),
//! - jobs placed per second: batches of 1,000 enqueued back to back until
//!   every job reached an agent,
//! - the share of those jobs the busiest agent took,
//! - dispatch latency p50/p99 (enqueue sent → assignment received) under a
//!   steady flow of single enqueues,
//! - how long a `/metrics` scrape takes (the engine answers it in one pass),
//! - with `--backlog N`, server memory per queued job (N jobs no agent can
//!   take, queued last).
//!
//! Prints one JSON object per run, then one with the medians.
//!
//! `cargo run --release -p tether-bench --bin tether-swarm-bench -- --agents 10000 --connections 64 --runs 3`

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use clap::Parser;
use hdrhistogram::Histogram;
use serde_json::json;
use tether::v1 as pb;
use tether::v1::agent_service_client::AgentServiceClient;
use tether::v1::queue_service_client::QueueServiceClient;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::{mpsc, Notify};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

#[derive(Parser)]
struct Args {
    /// The `tether` binary to measure [default: next to this one].
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// Agents to connect per run.
    #[arg(long, default_value_t = 10_000)]
    agents: usize,
    /// HTTP/2 connections the agents share; 0: one connection per agent.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Batches of 1,000 jobs in the placement measurement.
    #[arg(long, default_value_t = 20)]
    batches: usize,
    /// Jobs per second in the steady-flow measurement.
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// Length of the steady-flow measurement in seconds.
    #[arg(long, default_value_t = 5)]
    steady_secs: u64,
    /// Jobs queued before the agents connect, on a label no agent has, to
    /// measure the server's memory per queued job (0: skip).
    #[arg(long, default_value_t = 0)]
    backlog: usize,
    /// Runs, each on a fresh server; the last line has the medians.
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

const BATCH: usize = 1000;
const HEARTBEAT: Duration = Duration::from_secs(5);

fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).context("reading /proc status")?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).ok_or_else(|| anyhow!("no VmRSS"))?;
    let kib: u64 = line.split_whitespace().nth(1).ok_or_else(|| anyhow!("bad VmRSS"))?.parse()?;
    Ok(kib * 1024)
}

struct Server {
    child: Child,
    url: String,
    metrics: std::net::SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

async fn start_server(bin: &PathBuf, agents: usize) -> anyhow::Result<Server> {
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    let metrics: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let child = Command::new(bin)
        .args(["server", "--listen", &format!("127.0.0.1:{port}"), "--max-agent-streams", &(agents + 10).to_string()])
        .args(["--metrics-listen", &metrics.to_string()])
        .arg("--data-dir")
        .arg(dir.path())
        .env("TETHER_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let server = Server { child, url: format!("http://127.0.0.1:{port}"), metrics, _dir: dir };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(channel) = Endpoint::from_shared(server.url.clone())?.connect().await {
            let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
            if health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.is_ok() {
                return Ok(server);
            }
        }
        if Instant::now() > deadline {
            bail!("the server did not start");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What the agents saw, shared by all of them.
struct Tally {
    base: Instant,
    assigned: AtomicU64,
    /// Jobs each agent was given.
    per_agent: Vec<AtomicU64>,
    /// Dispatch latency in µs of jobs enqueued while `recording`.
    latency: Mutex<Histogram<u64>>,
    /// Payloads at or after this mark (µs since `base`) are recorded.
    record_from_us: AtomicU64,
    reached: Notify,
    target: AtomicU64,
}

impl Tally {
    fn on_assignment(&self, agent: usize, payload: &[u8]) {
        if let Some(count) = self.per_agent.get(agent) {
            count.fetch_add(1, Ordering::Relaxed);
        }
        let sent_us = payload.get(..8).and_then(|b| b.try_into().ok()).map_or(0, u64::from_le_bytes);
        let now_us = self.base.elapsed().as_micros() as u64;
        if sent_us >= self.record_from_us.load(Ordering::Relaxed) {
            let mut h = self.latency.lock().unwrap_or_else(|e| e.into_inner());
            let _ = h.record(now_us.saturating_sub(sent_us).max(1));
        }
        let n = self.assigned.fetch_add(1, Ordering::SeqCst) + 1;
        if n >= self.target.load(Ordering::SeqCst) {
            self.reached.notify_waiters();
        }
    }

    async fn wait_assigned(&self, total: u64, limit: Duration) -> anyhow::Result<()> {
        self.target.store(total, Ordering::SeqCst);
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let reached = self.reached.notified();
            tokio::pin!(reached);
            reached.as_mut().enable();
            if self.assigned.load(Ordering::SeqCst) >= total {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, reached).await.is_err() {
                bail!("only {} of {total} jobs reached an agent", self.assigned.load(Ordering::SeqCst));
            }
        }
    }

    fn payload(&self) -> bytes::Bytes {
        bytes::Bytes::copy_from_slice(&(self.base.elapsed().as_micros() as u64).to_le_bytes())
    }
}

fn outbound(message: pb::connect_request::Message) -> pb::ConnectRequest {
    pb::ConnectRequest { message: Some(message) }
}

/// Connects one raw agent and runs it: every assignment is acknowledged
/// as started and finished at once; a heartbeat goes out every 5 s.
async fn run_agent(channel: Channel, index: usize, tally: Arc<Tally>) -> anyhow::Result<()> {
    let (tx, rx) = mpsc::channel(8);
    let hello = pb::Hello {
        name: format!("swarm-{index}"),
        pool: "default".into(),
        slots: 1,
        version: "swarm".into(),
        min_protocol_version: 2,
        max_protocol_version: 2,
        ..Default::default()
    };
    tx.send(outbound(pb::connect_request::Message::Hello(hello))).await?;
    let mut inbound = AgentServiceClient::new(channel).connect(ReceiverStream::new(rx)).await?.into_inner();
    match inbound.message().await?.and_then(|m| m.message) {
        Some(pb::connect_response::Message::Welcome(_)) => {}
        other => bail!("expected a welcome, got {other:?}"),
    }
    tokio::spawn(async move {
        // Heartbeats spread over the interval instead of all at once.
        let offset = HEARTBEAT.mul_f64((index % 1000) as f64 / 1000.0);
        let mut beat = tokio::time::interval_at(tokio::time::Instant::now() + offset, HEARTBEAT);
        loop {
            tokio::select! {
                _ = beat.tick() => {
                    let heartbeat = pb::Heartbeat { metrics: Some(Default::default()), ..Default::default() };
                    if tx.send(outbound(pb::connect_request::Message::Heartbeat(heartbeat))).await.is_err() {
                        return;
                    }
                }
                message = inbound.message() => {
                    let Ok(Some(message)) = message else { return };
                    if let Some(pb::connect_response::Message::Assignment(a)) = message.message {
                        tally.on_assignment(index, &a.payload);
                        let ack = pb::AssignmentAck { job: a.job.clone(), accepted: true, started: true, ..Default::default() };
                        let finished = pb::JobFinished {
                            job: a.job,
                            outcome: pb::JobOutcome::Succeeded as i32,
                            ..Default::default()
                        };
                        if tx.send(outbound(pb::connect_request::Message::AssignmentAck(ack))).await.is_err()
                            || tx.send(outbound(pb::connect_request::Message::JobFinished(finished))).await.is_err()
                        {
                            return;
                        }
                    }
                }
            }
        }
    });
    Ok(())
}

async fn channel(url: &str) -> anyhow::Result<Channel> {
    Ok(Endpoint::from_shared(url.to_string())?.connect().await?)
}

/// Fetches `/metrics` and returns how long it took.
async fn scrape(addr: std::net::SocketAddr) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n").await?;
    let mut body = Vec::new();
    stream.read_to_end(&mut body).await?;
    if !body.starts_with(b"HTTP/1.1 200") {
        bail!("/metrics answered {:?}", String::from_utf8_lossy(&body[..body.len().min(40)]));
    }
    Ok(started.elapsed())
}

/// Queues `n` jobs of 100-byte payloads that no agent can take.
async fn enqueue_backlog(queue: &mut QueueServiceClient<Channel>, n: usize) -> anyhow::Result<()> {
    let mut left = n;
    while left > 0 {
        let count = left.min(BATCH);
        let requests = (0..count)
            .map(|_| pb::EnqueueJobRequest {
                queue: "backlog".into(),
                payload: bytes::Bytes::from_static(&[7u8; 100]),
                routing: Some(pb::Routing {
                    pool: "default".into(),
                    required_labels: [("backlog".to_string(), "nobody".to_string())].into(),
                }),
                ..Default::default()
            })
            .collect();
        queue.batch_enqueue_jobs(pb::BatchEnqueueJobsRequest { requests }).await?;
        left -= count;
    }
    Ok(())
}

fn job(payload: bytes::Bytes) -> pb::EnqueueJobRequest {
    pb::EnqueueJobRequest { queue: "swarm".into(), payload, ..Default::default() }
}

async fn run(bin: &PathBuf, args: &Args) -> anyhow::Result<serde_json::Value> {
    let server = start_server(bin, args.agents).await?;
    let pid = server.child.id();
    let tally = Arc::new(Tally {
        base: Instant::now(),
        assigned: AtomicU64::new(0),
        per_agent: (0..args.agents + 1).map(|_| AtomicU64::new(0)).collect(),
        latency: Mutex::new(Histogram::new_with_bounds(1, 60_000_000, 3)?),
        record_from_us: AtomicU64::new(u64::MAX),
        reached: Notify::new(),
        target: AtomicU64::new(u64::MAX),
    });
    // One agent first, so what every process pays once (the first
    // connection's buffers, the agent table) is in the baseline.
    run_agent(channel(&server.url).await?, args.agents, tally.clone()).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_bytes(pid)?;
    let shared: Vec<Channel> = {
        let mut v = Vec::new();
        for _ in 0..args.connections {
            v.push(channel(&server.url).await?);
        }
        v
    };
    for chunk in (0..args.agents).collect::<Vec<_>>().chunks(200) {
        let mut connects = Vec::new();
        for &i in chunk {
            let ch = match shared.get(i % shared.len().max(1)) {
                Some(ch) if !shared.is_empty() => ch.clone(),
                _ => channel(&server.url).await?,
            };
            connects.push(run_agent(ch, i, tally.clone()));
        }
        for result in futures::future::join_all(connects).await {
            result?;
        }
    }
    // Settle: welcomes written, heartbeat checks armed.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss_bytes(pid)?;
    let per_agent_bytes = after.saturating_sub(before) / args.agents as u64;

    let mut queue = QueueServiceClient::new(channel(&server.url).await?);
    // Placement: batches back to back; done when every job reached an agent.
    let total = (args.batches * BATCH) as u64;
    let started = Instant::now();
    for _ in 0..args.batches {
        let requests = (0..BATCH).map(|_| job(tally.payload())).collect();
        queue.batch_enqueue_jobs(pb::BatchEnqueueJobsRequest { requests }).await?;
    }
    tally.wait_assigned(total, Duration::from_secs(300)).await?;
    let placed_per_sec = total as f64 / started.elapsed().as_secs_f64();
    let counts: Vec<u64> = tally.per_agent[..args.agents].iter().map(|c| c.swap(0, Ordering::Relaxed)).collect();
    let busiest = counts.iter().copied().max().unwrap_or(0);
    let agents_used = counts.iter().filter(|c| **c > 0).count();

    // Steady flow: single enqueues on a fixed schedule.
    tally.record_from_us.store(tally.base.elapsed().as_micros() as u64, Ordering::SeqCst);
    let steady = args.rate * args.steady_secs;
    let already = tally.assigned.load(Ordering::SeqCst);
    let interval = Duration::from_secs_f64(1.0 / args.rate.max(1) as f64);
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut sends = tokio::task::JoinSet::new();
    for _ in 0..steady {
        tick.tick().await;
        let mut q = queue.clone();
        let payload = tally.payload();
        sends.spawn(async move { q.enqueue_job(job(payload)).await.map(|_| ()) });
    }
    while let Some(sent) = sends.join_next().await {
        sent??;
    }
    tally.wait_assigned(already + steady, Duration::from_secs(120)).await?;
    let latency = tally.latency.lock().unwrap_or_else(|e| e.into_inner()).clone();

    let mut scrapes = Vec::new();
    for _ in 0..5 {
        scrapes.push(scrape(server.metrics).await?.as_secs_f64() * 1000.0);
    }
    scrapes.sort_by(f64::total_cmp);
    // Last, so unplaceable jobs do not sit in the ready set while the
    // dispatcher is measured.
    let backlog_bytes_per_job = if args.backlog > 0 {
        // Warm the enqueue path first, so the baseline holds what any
        // process pays once (buffers, the queue's counters, store caches).
        enqueue_backlog(&mut queue, BATCH).await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = rss_bytes(pid)?;
        enqueue_backlog(&mut queue, args.backlog).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        Some(rss_bytes(pid)?.saturating_sub(before) / args.backlog as u64)
    } else {
        None
    };
    Ok(json!({
        "agents": args.agents,
        "connections": if args.connections == 0 { args.agents } else { args.connections },
        "rss_before": before,
        "rss_after": after,
        "bytes_per_agent": per_agent_bytes,
        "backlog_jobs": args.backlog,
        "rss_per_queued_job_bytes": backlog_bytes_per_job,
        "placed_per_sec": placed_per_sec.round(),
        "busiest_agent_share": busiest as f64 / total as f64,
        "agents_used": agents_used,
        "dispatch_p50_ms": latency.value_at_quantile(0.5) as f64 / 1000.0,
        "dispatch_p99_ms": latency.value_at_quantile(0.99) as f64 / 1000.0,
        "metrics_scrape_ms_p50": scrapes[scrapes.len() / 2],
        "metrics_scrape_ms_max": scrapes[scrapes.len() - 1],
    }))
}

fn median(runs: &[serde_json::Value], key: &str) -> serde_json::Value {
    let mut values: Vec<f64> = runs.iter().filter_map(|r| r[key].as_f64()).collect();
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).map_or(serde_json::Value::Null, |v| json!(v))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let bin = match &args.server_bin {
        Some(bin) => bin.clone(),
        None => std::env::current_exe()?.with_file_name("tether"),
    };
    // The bench holds up to one connection per agent.
    let _ = tether_server::listener::raise_fd_limit();
    let mut runs = Vec::new();
    for run_no in 0..args.runs {
        let mut result = run(&bin, &args).await?;
        result["run"] = json!(run_no);
        println!("{result}");
        runs.push(result);
    }
    let keys = [
        "bytes_per_agent",
        "rss_per_queued_job_bytes",
        "placed_per_sec",
        "busiest_agent_share",
        "dispatch_p50_ms",
        "dispatch_p99_ms",
        "metrics_scrape_ms_p50",
    ];
    let mut summary = serde_json::Map::new();
    summary.insert("agents".into(), json!(args.agents));
    summary.insert("connections".into(), json!(if args.connections == 0 { args.agents } else { args.connections }));
    summary.insert("runs".into(), json!(args.runs));
    for key in keys {
        summary.insert(format!("median_{key}"), median(&runs, key));
    }
    println!("{}", serde_json::Value::Object(summary));
    Ok(())
}
