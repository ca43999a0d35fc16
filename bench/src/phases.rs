//! The three measurements. Each runs against a fresh [`Env`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use bytes::Bytes;
use hdrhistogram::Histogram;
use tether::v1 as pb;
use tether::v1::queue_service_client::QueueServiceClient;
use tonic::transport::Channel;

use crate::env::{wait_succeeded, Env, QUEUE};
use crate::probe::{ns_histogram, StoreSnapshot};

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
