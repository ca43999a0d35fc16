//! The measurements. Each runs against a fresh [`Env`].

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use bytes::Bytes;
use hdrhistogram::Histogram;
use tether::v1 as pb;
use tether::v1::dashboard_service_client::DashboardServiceClient;
use tether::v1::queue_service_client::QueueServiceClient;
use tonic::transport::Channel;

use crate::env::{wait_succeeded, Env, QUEUE};
use crate::probe::{self, ns_histogram, StoreSnapshot};

/// Longest a phase may take once its jobs are sent.
pub const PHASE_WAIT: Duration = Duration::from_secs(120);

/// How the enqueue side of a throughput phase works.
#[derive(Clone, Copy, Debug)]
pub enum Enqueue {
    /// BatchEnqueueJobs of `size` jobs from `clients` concurrent tasks.
    Batched { size: usize, clients: usize },
    /// EnqueueJob from `clients` concurrent tasks.
    Single { clients: usize },
}

/// What a throughput phase measured.
#[derive(Debug, Clone)]
pub struct Throughput {
    pub jobs: u64,
    /// First enqueue to the last handler run.
    pub elapsed: Duration,
    /// First enqueue to GetQueueStats showing every job SUCCEEDED.
    pub elapsed_confirmed: Duration,
    /// First enqueue to the last enqueue acknowledged.
    pub enqueue_elapsed: Duration,
    pub store: StoreSnapshot,
    pub commit_p50_us: f64,
    pub commit_p99_us: f64,
    /// One client awaiting each enqueue: the median acknowledgement, and
    /// the median round trip of a health check on the same channel just
    /// before (loopback, HTTP/2 and gRPC, no engine or store).
    pub single: Option<SingleClient>,
}

#[derive(Debug, Clone, Copy)]
pub struct SingleClient {
    pub ack_p50_us: f64,
    pub round_trip_p50_us: f64,
}

/// Health checks measured one after another.
const ROUND_TRIPS: usize = 500;

async fn round_trip_p50_us(channel: Channel) -> anyhow::Result<f64> {
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let mut hist = ns_histogram();
    for _ in 0..ROUND_TRIPS {
        let start = Instant::now();
        health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.context("health check")?;
        hist.saturating_record(start.elapsed().as_nanos() as u64);
    }
    Ok(hist.value_at_quantile(0.5) as f64 / 1e3)
}

impl Throughput {
    pub fn jobs_per_sec(&self) -> f64 {
        self.jobs as f64 / self.elapsed.as_secs_f64()
    }
}

async fn connect_all(env: &Env, channels: usize) -> anyhow::Result<(Vec<QueueServiceClient<Channel>>, Channel)> {
    let mut clients = Vec::with_capacity(channels);
    let first = env.channel().await?;
    clients.push(QueueServiceClient::new(first.clone()));
    for _ in 1..channels.max(1) {
        clients.push(QueueServiceClient::new(env.channel().await?));
    }
    Ok((clients, first))
}

fn job(payload: Bytes) -> pb::EnqueueJobRequest {
    pb::EnqueueJobRequest { queue: QUEUE.into(), payload, ..Default::default() }
}

/// Enqueues `jobs` no-op jobs as fast as the server takes them and waits
/// until the agents ran them all.
pub async fn throughput(env: &Env, jobs: u64, how: Enqueue, channels: usize) -> anyhow::Result<Throughput> {
    let (clients, first_channel) = connect_all(env, channels).await?;
    let round_trip = match how {
        Enqueue::Single { .. } => Some(round_trip_p50_us(first_channel).await?),
        Enqueue::Batched { .. } => None,
    };
    let acks = Arc::new(Mutex::new(ns_histogram()));
    let mut stats_client = clients[0].clone();
    env.sink.expect(jobs);
    let store_before = env.counters.snapshot();
    let _ = env.counters.take_latency();
    let next = Arc::new(AtomicU64::new(0));

    let start = Instant::now();
    let deadline = tokio::time::Instant::now() + PHASE_WAIT;
    let (tasks, size) = match how {
        Enqueue::Batched { size, clients: n } => (n, size.max(1) as u64),
        Enqueue::Single { clients: n } => (n, 1),
    };
    let mut enqueuers = Vec::with_capacity(tasks);
    for t in 0..tasks.max(1) {
        let mut client = clients[t % clients.len()].clone();
        let next = next.clone();
        let acks = acks.clone();
        enqueuers.push(tokio::spawn(async move {
            loop {
                let first = next.fetch_add(size, Ordering::Relaxed);
                if first >= jobs {
                    return Ok::<_, anyhow::Error>(());
                }
                let n = size.min(jobs - first);
                if matches!(how, Enqueue::Single { .. }) {
                    let sent = Instant::now();
                    client.enqueue_job(job(Bytes::new())).await.context("EnqueueJob")?;
                    let took = sent.elapsed().as_nanos() as u64;
                    acks.lock().unwrap_or_else(|e| e.into_inner()).saturating_record(took);
                } else {
                    let requests = (0..n).map(|_| job(Bytes::new())).collect();
                    let reply = client
                        .batch_enqueue_jobs(pb::BatchEnqueueJobsRequest { requests })
                        .await
                        .context("BatchEnqueueJobs")?
                        .into_inner();
                    if reply.jobs.len() as u64 != n {
                        bail!("BatchEnqueueJobs returned {} jobs for {n}", reply.jobs.len());
                    }
                }
            }
        }));
    }
    for task in enqueuers {
        tokio::time::timeout_at(deadline, task)
            .await
            .context("timed out waiting for the enqueuers")?
            .context("enqueue task")??;
    }
    let enqueue_elapsed = start.elapsed();
    env.sink.wait_done(deadline).await?;
    let elapsed = start.elapsed();
    let confirmed = wait_succeeded(&mut stats_client, jobs, deadline).await?;
    let store = env.counters.snapshot().since(store_before);
    let commit = env.counters.take_latency();
    Ok(Throughput {
        jobs,
        elapsed,
        elapsed_confirmed: confirmed - start,
        enqueue_elapsed,
        store,
        commit_p50_us: commit.value_at_quantile(0.5) as f64 / 1e3,
        commit_p99_us: commit.value_at_quantile(0.99) as f64 / 1e3,
        single: round_trip.map(|round_trip_p50_us| SingleClient {
            ack_p50_us: acks.lock().unwrap_or_else(|e| e.into_inner()).value_at_quantile(0.5) as f64 / 1e3,
            round_trip_p50_us,
        }),
    })
}

/// What the latency phase measured.
#[derive(Debug, Clone)]
pub struct Latency {
    pub jobs: u64,
    pub rate: u64,
    /// Scheduled send to handler start.
    pub dispatch: Histogram<u64>,
    /// Scheduled send to EnqueueJob reply.
    pub ack: Histogram<u64>,
    /// Scheduled send to the moment the pacer thread sent (pacer lateness).
    pub pacer_lag: Histogram<u64>,
    pub store: StoreSnapshot,
    pub elapsed: Duration,
    pub commit_p50_us: f64,
    pub commit_p99_us: f64,
}

/// Sends EnqueueJob at a fixed `rate` for `secs` seconds from a dedicated
/// pacer thread (schedule-based: every latency is measured from its
/// scheduled send time, so a stalled sender cannot hide latency), after
/// `warmup` unrecorded jobs on the same schedule.
pub async fn latency(env: &Env, rate: u64, secs: u64, warmup: u64, channels: usize) -> anyhow::Result<Latency> {
    if rate == 0 {
        bail!("--rate must be > 0");
    }
    let (clients, _) = connect_all(env, channels).await?;
    let mut stats_client = clients[0].clone();
    let measured = rate * secs;
    let total = warmup + measured;
    env.sink.expect(total);
    let base = env.sink.base;
    let ack = Arc::new(Mutex::new(ns_histogram()));
    let failures = Arc::new(AtomicU64::new(0));
    let answered = Arc::new(AtomicU64::new(0));
    let first_error: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    let runtime = tokio::runtime::Handle::current();

    let warm_end = Arc::new(tokio::sync::Notify::new());
    let pacer = {
        let (ack, failures, answered, first_error, warm_end) =
            (ack.clone(), failures.clone(), answered.clone(), first_error.clone(), warm_end.clone());
        std::thread::Builder::new()
            .name("pacer".into())
            .spawn(move || {
                // Sleep precisely: the default 50 us timer slack would add
                // up to 50 us of pacer lag to every measured latency.
                // SAFETY: prctl(PR_SET_TIMERSLACK) only changes this thread.
                unsafe {
                    libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0);
                }
                let mut lag = ns_histogram();
                let start = Instant::now() + Duration::from_millis(5);
                for i in 0..total {
                    let scheduled = start + Duration::from_nanos(i * 1_000_000_000 / rate);
                    let now = Instant::now();
                    if scheduled > now {
                        std::thread::sleep(scheduled - now);
                    }
                    let record = i >= warmup;
                    if i == warmup {
                        warm_end.notify_one();
                    }
                    let sent_ns = (scheduled - base).as_nanos() as u64;
                    if record {
                        lag.saturating_record((Instant::now() - scheduled).as_nanos().max(1) as u64);
                    }
                    let mut payload = Vec::with_capacity(9);
                    payload.push(u8::from(record));
                    payload.extend_from_slice(&sent_ns.to_le_bytes());
                    let mut client = clients[i as usize % clients.len()].clone();
                    let (ack, failures, answered, first_error) =
                        (ack.clone(), failures.clone(), answered.clone(), first_error.clone());
                    runtime.spawn(async move {
                        let reply = client.enqueue_job(job(payload.into())).await;
                        answered.fetch_add(1, Ordering::Release);
                        match reply {
                            Ok(_) if record => {
                                let took = (base.elapsed().as_nanos() as u64).saturating_sub(sent_ns);
                                ack.lock().unwrap_or_else(|e| e.into_inner()).saturating_record(took.max(1));
                            }
                            Ok(_) => {}
                            Err(status) => {
                                failures.fetch_add(1, Ordering::Relaxed);
                                first_error.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(status.to_string());
                            }
                        }
                    });
                }
                lag
            })
            .context("spawn pacer thread")?
    };
    // Store counters cover the measured part only.
    if warmup > 0 {
        tokio::time::timeout(PHASE_WAIT, warm_end.notified()).await.context("timed out in the warm-up")?;
    }
    let store_before = env.counters.snapshot();
    let _ = env.counters.take_latency();
    let measure_start = Instant::now();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs) + PHASE_WAIT;
    let pacer_lag = tokio::task::spawn_blocking(move || pacer.join())
        .await
        .context("join pacer")?
        .map_err(|_| anyhow::anyhow!("pacer thread panicked"))?;
    // Every EnqueueJob answered (the pacer only spawned the calls).
    while answered.load(Ordering::Acquire) < total {
        if tokio::time::Instant::now() >= deadline {
            bail!("timed out: {} of {total} EnqueueJob calls answered", answered.load(Ordering::Acquire));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let failed = failures.load(Ordering::Relaxed);
    if failed > 0 {
        let first = first_error.lock().unwrap_or_else(|e| e.into_inner()).clone().unwrap_or_default();
        bail!("{failed} EnqueueJob calls failed; first: {first}");
    }
    env.sink.wait_done(deadline).await?;
    let elapsed = measure_start.elapsed();
    wait_succeeded(&mut stats_client, total, deadline).await?;
    let store = env.counters.snapshot().since(store_before);
    let commit = env.counters.take_latency();
    let dispatch = env.sink.latency.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let ack = ack.lock().unwrap_or_else(|e| e.into_inner()).clone();
    if dispatch.len() != measured {
        bail!("recorded {} dispatch latencies, expected {measured}", dispatch.len());
    }
    Ok(Latency {
        jobs: measured,
        rate,
        dispatch,
        ack,
        pacer_lag,
        store,
        elapsed,
        commit_p50_us: commit.value_at_quantile(0.5) as f64 / 1e3,
        commit_p99_us: commit.value_at_quantile(0.99) as f64 / 1e3,
    })
}

/// Enqueues `jobs` jobs that no agent can take (a pool of their own) and
/// returns the growth of the process's resident set per queued job: what a
/// backlog costs the server while it is live (not after a restart).
pub async fn backlog(env: &Env, jobs: u64) -> anyhow::Result<f64> {
    let (mut clients, _) = connect_all(env, 1).await?;
    let channel = tonic::transport::Endpoint::from_shared(env.url.clone())?.connect().await?;
    let mut agents = tether::v1::agent_service_client::AgentServiceClient::new(channel);
    let pool = pb::AgentPool { name: "bench-backlog".into(), ..Default::default() };
    agents.create_agent_pool(pb::CreateAgentPoolRequest { pool: Some(pool) }).await.context("CreateAgentPool")?;
    let routing = Some(pb::Routing { pool: "bench-backlog".into(), required_labels: Default::default() });
    let client = &mut clients[0];
    // A first batch, so what every server pays once is in the baseline.
    let batch = |n: u64| pb::BatchEnqueueJobsRequest {
        requests: (0..n).map(|_| pb::EnqueueJobRequest { routing: routing.clone(), ..job(Bytes::new()) }).collect(),
    };
    client.batch_enqueue_jobs(batch(500)).await.context("BatchEnqueueJobs")?;
    let before = crate::probe::rss_bytes()?;
    let mut sent = 0;
    while sent < jobs {
        let n = (jobs - sent).min(500);
        client.batch_enqueue_jobs(batch(n)).await.context("BatchEnqueueJobs")?;
        sent += n;
    }
    let after = crate::probe::rss_bytes()?;
    Ok(after.saturating_sub(before) as f64 / jobs.max(1) as f64)
}

/// Longest the log phase may take once its jobs are created.
const LOG_WAIT: Duration = Duration::from_secs(600);

/// What the log phase measured.
#[derive(Debug, Clone)]
pub struct Logs {
    pub jobs: u64,
    /// Output bytes the agent's handlers wrote.
    pub written: u64,
    /// Output bytes the server stored: every job's output read back
    /// (StreamJobLogs without follow) after the measurement.
    pub stored: u64,
    /// Bytes the followers received.
    pub received: u64,
    /// First CreateJob to the moment WatchQueue reported the last job's
    /// end: the event is read from the durable event log, written in the
    /// commit that ends the job, which comes after (or is) the commit of the
    /// output the agent sent before the result.
    pub stored_elapsed: Duration,
    /// First CreateJob to the end of the last follower's stream.
    pub followed_elapsed: Duration,
    pub store: StoreSnapshot,
    pub commit_p50_us: f64,
    pub commit_p99_us: f64,
    /// CPU seconds per thread group from the first CreateJob to the end of
    /// the last follower's stream.
    pub cpu: BTreeMap<String, f64>,
}

const MIB: f64 = 1024.0 * 1024.0;

impl Logs {
    pub fn stored_mib_per_sec(&self) -> f64 {
        self.stored as f64 / MIB / self.stored_elapsed.as_secs_f64().max(f64::MIN_POSITIVE)
    }

    pub fn followed_mib_per_sec(&self) -> f64 {
        self.received as f64 / MIB / self.followed_elapsed.as_secs_f64().max(f64::MIN_POSITIVE)
    }

    /// CPU seconds of the server's threads (its runtime, where gRPC, the
    /// engine and store reads run, and the store's writer thread) per MiB
    /// written.
    pub fn server_cpu_sec_per_mib(&self) -> f64 {
        let server: f64 = ["server", "store-writer"].iter().filter_map(|g| self.cpu.get(*g)).sum();
        server / (self.written as f64 / MIB).max(f64::MIN_POSITIVE)
    }
}

/// The queue of dashboard jobs.
const DASHBOARD_QUEUE: &str = "tether.jobs";

/// Creates `jobs` dashboard jobs (queue tether.jobs) that the env's agent
/// runs with a handler writing `bytes_per_job` bytes of output each as fast
/// as the SDK takes them, and follows every job's output from the start
/// (StreamJobLogs with follow, one connection per follower) until its
/// stream ends. The env must run agents with [`OutputWork`].
///
/// [`OutputWork`]: crate::env::OutputWork
pub async fn logs(env: &Env, jobs: u64, bytes_per_job: u64) -> anyhow::Result<Logs> {
    let control = env.channel().await?;
    let mut dashboard = DashboardServiceClient::new(control.clone());
    // Every job's end, from now: the server fixes the start of the watch
    // before it answers the call.
    let ends = QueueServiceClient::new(control)
        .watch_queue(pb::WatchQueueRequest {
            queue: DASHBOARD_QUEUE.into(),
            states: [
                pb::QueuedJobState::Succeeded,
                pb::QueuedJobState::Failed,
                pb::QueuedJobState::DeadLettered,
                pb::QueuedJobState::Cancelled,
            ]
            .into_iter()
            .map(|s| s as i32)
            .collect(),
            skip_payload: true,
            ..Default::default()
        })
        .await
        .context("WatchQueue")?
        .into_inner();
    // One connection per follower, as separate viewers would have.
    let mut channels = Vec::new();
    for _ in 0..jobs {
        channels.push(env.channel().await?);
    }
    let store_before = env.counters.snapshot();
    let _ = env.counters.take_latency();
    let deadline = tokio::time::Instant::now() + LOG_WAIT;

    let cpu_before = probe::cpu_by_group();
    let start = Instant::now();
    let ended = tokio::spawn(last_end(ends, jobs));
    let mut ids = Vec::with_capacity(channels.len());
    let mut followers = Vec::with_capacity(channels.len());
    for (i, channel) in channels.into_iter().enumerate() {
        let job = dashboard
            .create_job(pb::CreateJobRequest {
                name: format!("bench-logs-{i}"),
                command: "tether-bench: write output".into(),
                ..Default::default()
            })
            .await
            .context("CreateJob")?
            .into_inner()
            .job
            .context("CreateJob returned no job")?;
        followers.push(tokio::spawn(follow(channel, job.id.clone())));
        ids.push(job.id);
    }
    let mut received = 0;
    let mut followed_end = start;
    for follower in followers {
        let (bytes, ended) = tokio::time::timeout_at(deadline, follower)
            .await
            .context("timed out waiting for the followers")?
            .context("follower task")??;
        received += bytes;
        followed_end = followed_end.max(ended);
    }
    // A follower's stream ends only after its job has ended: the watch has
    // seen every end by now, or is about to.
    let stored_end = tokio::time::timeout_at(deadline, ended)
        .await
        .context("timed out waiting for the jobs' ends")?
        .context("watch task")??;
    let cpu = probe::cpu_since(&probe::cpu_by_group(), &cpu_before);
    let followed_elapsed = followed_end - start;
    let store = env.counters.snapshot().since(store_before);
    let commit = env.counters.take_latency();

    // After the measurement: how each job ended, and what was stored.
    let mut stored = 0u64;
    for id in &ids {
        let job = dashboard
            .get_job(pb::GetJobRequest { id: id.clone() })
            .await
            .context("GetJob")?
            .into_inner()
            .job
            .context("GetJob returned no job")?;
        if job.status != pb::JobStatus::Success as i32 {
            bail!("job {id} ended with status {} ({})", job.status, job.error);
        }
        let mut chunks = dashboard
            .stream_job_logs(pb::StreamJobLogsRequest { id: id.clone(), ..Default::default() })
            .await
            .context("StreamJobLogs")?
            .into_inner();
        while let Some(chunk) = chunks.message().await.context("StreamJobLogs stream")? {
            stored += chunk.data.len() as u64;
        }
    }
    let written = jobs * bytes_per_job;
    if stored != written {
        bail!("the server stored {stored} output bytes; the handlers wrote {written}");
    }
    if received != stored {
        bail!("the followers received {received} bytes; the server stored {stored}");
    }
    Ok(Logs {
        jobs,
        written,
        stored,
        received,
        stored_elapsed: stored_end - start,
        followed_elapsed,
        store,
        commit_p50_us: commit.value_at_quantile(0.5) as f64 / 1e3,
        commit_p99_us: commit.value_at_quantile(0.99) as f64 / 1e3,
        cpu,
    })
}

/// Waits for `jobs` ends of jobs on a WatchQueue stream; returns when the
/// last arrived.
async fn last_end(mut ends: tonic::Streaming<pb::WatchQueueResponse>, jobs: u64) -> anyhow::Result<Instant> {
    for _ in 0..jobs {
        ends.message().await.context("WatchQueue stream")?.context("WatchQueue ended early")?;
    }
    Ok(Instant::now())
}

/// Follows a job's output from its start until the stream ends; returns
/// the bytes received and when the stream ended.
async fn follow(channel: Channel, id: String) -> anyhow::Result<(u64, Instant)> {
    let mut client = DashboardServiceClient::new(channel);
    let mut stream = client
        .stream_job_logs(pb::StreamJobLogsRequest { id, follow: true, ..Default::default() })
        .await
        .context("StreamJobLogs (follow)")?
        .into_inner();
    let mut bytes = 0u64;
    while let Some(chunk) = stream.message().await.context("StreamJobLogs (follow) stream")? {
        bytes += chunk.data.len() as u64;
    }
    Ok((bytes, Instant::now()))
}

/// What the fan-out phase measured.
#[derive(Debug, Clone)]
pub struct Fanout {
    pub watchers: usize,
    /// Jobs enqueued (and run to SUCCEEDED).
    pub jobs: u64,
    /// The rate the producer was asked for, jobs/s.
    pub target_rate: u64,
    /// The producer's schedule: `jobs` / `target_rate`.
    pub scheduled: Duration,
    /// First enqueue to the last BatchEnqueueJobs acknowledged.
    pub enqueue_elapsed: Duration,
    /// First enqueue to the last handler run.
    pub run_elapsed: Duration,
    /// First enqueue to the last event reaching the last watcher.
    pub delivered_elapsed: Duration,
    /// State changes of the bench's jobs in the server's event log, read
    /// back from the store after the run: what every watcher must receive.
    pub logged: u64,
    /// Events each watcher received (all equal to `logged`, or the phase
    /// fails).
    pub received: Vec<u64>,
    /// Receive time minus the event's update_time (the engine's time of the
    /// change, stamped before the commit that makes it durable), over every
    /// event of every watcher, ns.
    pub delivery: Histogram<u64>,
    /// How late the producer's ticks fired (tokio::time::interval), ns.
    pub pacer_lag: Histogram<u64>,
    pub store: StoreSnapshot,
    pub commit_p50_us: f64,
    pub commit_p99_us: f64,
}

impl Fanout {
    /// Jobs acknowledged per second of the enqueue side.
    pub fn enqueue_per_sec(&self) -> f64 {
        self.jobs as f64 / self.enqueue_elapsed.as_secs_f64().max(f64::MIN_POSITIVE)
    }

    /// Jobs run per second, first enqueue to the last handler run.
    pub fn jobs_per_sec(&self) -> f64 {
        self.jobs as f64 / self.run_elapsed.as_secs_f64().max(f64::MIN_POSITIVE)
    }

    /// Events received by all watchers together per second, first enqueue
    /// to the last delivery.
    pub fn events_per_sec(&self) -> f64 {
        self.received.iter().sum::<u64>() as f64 / self.delivered_elapsed.as_secs_f64().max(f64::MIN_POSITIVE)
    }

    /// Delivery latency at quantile `q`, ms.
    pub fn delivery_ms(&self, q: f64) -> f64 {
        self.delivery.value_at_quantile(q) as f64 / 1e6
    }
}

/// How often the fan-out producer sends one BatchEnqueueJobs call.
const FANOUT_TICK: Duration = Duration::from_millis(10);

/// Opens `watchers` WatchQueue streams (queue `QUEUE`, every state,
/// skip_payload; each on its own connection), then enqueues `rate` jobs/s
/// for `secs` seconds (BatchEnqueueJobs of `rate / 100` jobs every 10 ms,
/// each call spawned on its tick so a slow acknowledgement does not hold
/// the schedule back) that the env's agents run; records, for every event
/// every watcher receives, its receive time minus the event's update_time.
/// Fails unless every watcher received exactly the changes the event log
/// holds for the bench's jobs.
pub async fn fanout(env: &Env, watchers: usize, rate: u64, secs: u64) -> anyhow::Result<Fanout> {
    let per_tick = rate * FANOUT_TICK.as_millis() as u64 / 1000;
    if per_tick == 0 || per_tick > 1000 {
        bail!("the fan-out rate must be 100-100000 jobs/s (1-1000 jobs per 10 ms tick)");
    }
    let ticks = (secs * 1000 / FANOUT_TICK.as_millis() as u64).max(1);
    let jobs = ticks * per_tick;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut streams = Vec::with_capacity(watchers);
    let mut seen = Vec::with_capacity(watchers);
    for _ in 0..watchers {
        // Every change from now: the server fixes the start of the watch
        // before it answers the call.
        let stream = QueueServiceClient::new(env.channel().await?)
            .watch_queue(pb::WatchQueueRequest { queue: QUEUE.into(), skip_payload: true, ..Default::default() })
            .await
            .context("WatchQueue")?
            .into_inner();
        let count = Arc::new(AtomicU64::new(0));
        seen.push(count.clone());
        streams.push((stream, count));
    }
    let (mut producer, _) = connect_all(env, 1).await?;
    let producer = producer.remove(0);
    let mut stats_client = producer.clone();
    env.sink.expect(jobs);
    let store_before = env.counters.snapshot();
    let _ = env.counters.take_latency();
    let tasks: Vec<_> =
        streams.into_iter().map(|(stream, count)| tokio::spawn(watch(stream, count, stop_rx.clone()))).collect();

    let start = Instant::now();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs) + PHASE_WAIT;
    let mut interval = tokio::time::interval(FANOUT_TICK);
    let mut pacer_lag = ns_histogram();
    let mut calls = Vec::with_capacity(ticks as usize);
    for _ in 0..ticks {
        let scheduled = interval.tick().await;
        pacer_lag.saturating_record((tokio::time::Instant::now() - scheduled).as_nanos().max(1) as u64);
        let mut client = producer.clone();
        let requests = (0..per_tick).map(|_| job(Bytes::new())).collect();
        calls.push(tokio::spawn(async move {
            let reply = client
                .batch_enqueue_jobs(pb::BatchEnqueueJobsRequest { requests })
                .await
                .context("BatchEnqueueJobs")?
                .into_inner();
            if reply.jobs.len() as u64 != per_tick {
                bail!("BatchEnqueueJobs returned {} jobs for {per_tick}", reply.jobs.len());
            }
            Ok::<_, anyhow::Error>(Instant::now())
        }));
    }
    let mut enqueue_end = start;
    for call in calls {
        let acked = tokio::time::timeout_at(deadline, call)
            .await
            .context("timed out waiting for BatchEnqueueJobs")?
            .context("enqueue task")??;
        enqueue_end = enqueue_end.max(acked);
    }
    env.sink.wait_done(deadline).await?;
    let run_elapsed = start.elapsed();
    wait_succeeded(&mut stats_client, jobs, deadline).await?;
    let store = env.counters.snapshot().since(store_before);
    let commit = env.counters.take_latency();

    // What every watcher must receive: the log's changes of the bench's
    // jobs (the store is fresh, so the whole log is this phase's).
    let (logged, logged_succeeded) = logged_changes(env).await?;
    // Every change is committed by now; wait for the watchers to have them.
    loop {
        let behind = seen.iter().filter(|n| n.load(Ordering::Acquire) < logged).count();
        // A watcher whose stream failed stops early: its join says why.
        if behind == 0 || tasks.iter().any(tokio::task::JoinHandle::is_finished) {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            let least = seen.iter().map(|n| n.load(Ordering::Acquire)).min().unwrap_or(0);
            bail!("timed out: {behind} of {watchers} watchers received fewer than the log's {logged} changes (least {least})");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // A moment for anything extra (a duplicate) to arrive, then stop.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let _ = stop_tx.send(true);
    let mut delivery = ns_histogram();
    let mut received = Vec::with_capacity(watchers);
    let mut delivered_end = start;
    for task in tasks {
        let seen = tokio::time::timeout_at(deadline, task)
            .await
            .context("timed out stopping the watchers")?
            .context("watcher task")??;
        delivery.add(&seen.latency).context("merge histograms")?;
        received.push(seen.events);
        delivered_end = delivered_end.max(seen.last);
    }
    if let Some(wrong) = received.iter().find(|&&n| n != logged) {
        bail!("a watcher received {wrong} changes; the event log holds {logged} for the bench's jobs");
    }
    if logged_succeeded != jobs {
        bail!("the event log holds {logged_succeeded} changes into SUCCEEDED for {jobs} jobs");
    }
    Ok(Fanout {
        watchers,
        jobs,
        target_rate: rate,
        scheduled: FANOUT_TICK * ticks as u32,
        enqueue_elapsed: enqueue_end - start,
        run_elapsed,
        delivered_elapsed: delivered_end - start,
        logged,
        received,
        delivery,
        pacer_lag,
        store,
        commit_p50_us: commit.value_at_quantile(0.5) as f64 / 1e3,
        commit_p99_us: commit.value_at_quantile(0.99) as f64 / 1e3,
    })
}

/// The state changes of `QUEUE`'s jobs in the server's event log (all of
/// it: the store is the phase's own), and how many of them are into
/// SUCCEEDED.
async fn logged_changes(env: &Env) -> anyhow::Result<(u64, u64)> {
    use tether_server::store::{EventCursor, EventRead};
    let mut cursor = EventCursor::start(env.store.event_shards());
    let (mut changes, mut succeeded) = (0u64, 0u64);
    loop {
        match env.store.read_events(&cursor, 10_000).await.context("read the event log")? {
            EventRead::Events { events, next } => {
                if events.is_empty() {
                    return Ok((changes, succeeded));
                }
                for event in events.iter().filter(|e| e.job.spec.queue == QUEUE) {
                    changes += 1;
                    succeeded += u64::from(event.job.state == tether_server::domain::JobState::Succeeded);
                }
                cursor = next;
            }
            other => bail!("reading the event log from its start: {other:?}"),
        }
    }
}

/// What one watcher received.
struct Seen {
    events: u64,
    latency: Histogram<u64>,
    /// When the last event arrived.
    last: Instant,
}

/// Receives changes until `stop`: counts them (`count`, live) and records
/// receive time minus update_time per change.
async fn watch(
    mut stream: tonic::Streaming<pb::WatchQueueResponse>,
    count: Arc<AtomicU64>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<Seen> {
    let mut seen = Seen { events: 0, latency: ns_histogram(), last: Instant::now() };
    loop {
        let message = tokio::select! {
            biased;
            _ = stop.wait_for(|stop| *stop) => return Ok(seen),
            message = stream.message() => message.context("WatchQueue stream")?,
        };
        let Some(change) = message else { bail!("WatchQueue ended early") };
        let received = std::time::SystemTime::now();
        seen.last = Instant::now();
        let time = change.job.as_ref().and_then(|j| j.update_time).context("a change without update_time")?;
        let nanos = u32::try_from(time.nanos).context("update_time nanos")?;
        let time = std::time::UNIX_EPOCH + Duration::new(u64::try_from(time.seconds).context("update_time")?, nanos);
        let took = received.duration_since(time).unwrap_or_default();
        seen.latency.saturating_record((took.as_nanos() as u64).max(1));
        if change.dropped != 0 {
            bail!("WatchQueue reported {} dropped changes", change.dropped);
        }
        seen.events += 1;
        count.store(seen.events, Ordering::Release);
    }
}
