//! Prometheus metrics: the process-wide recorder, the job-event consumer
//! that feeds counters and histograms, and the `/metrics` HTTP endpoint that
//! refreshes gauges from the engine at scrape time.
//!
//! The recorder is installed only when a metrics listener is configured;
//! without one every `metrics::` call in the server is a no-op. Counters are
//! process-wide (one server per process in production; servers sharing a
//! process in tests add up).

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Counter, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio::sync::broadcast::error::RecvError;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::domain::{Health, JobState, Priority};
use crate::engine::{EngineHandle, JobEvent};

pub const JOBS_ENQUEUED: &str = "tether_jobs_enqueued_total";
pub const JOBS_FINISHED: &str = "tether_jobs_finished_total";
pub const DISPATCH_LATENCY: &str = "tether_dispatch_latency_seconds";
pub const EVENTS_DROPPED: &str = "tether_metrics_events_dropped_total";
pub const STORE_COMMIT: &str = "tether_store_commit_seconds";
pub const STORE_CHECKPOINTS: &str = "tether_store_checkpoints_total";
pub const AGENT_STREAMS: &str = "tether_agent_streams";
pub const QUEUE_JOBS: &str = "tether_queue_jobs";
pub const QUEUED_JOBS_BY_PRIORITY: &str = "tether_queue_queued_jobs";
pub const OLDEST_QUEUED_AGE: &str = "tether_queue_oldest_queued_age_seconds";
pub const AGENTS: &str = "tether_agents";
pub const SERVING: &str = "tether_serving";
pub const AGENT_STREAMS_REFUSED: &str = "tether_agent_streams_refused_total";

const LATENCY_BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
const COMMIT_BUCKETS: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];
/// How often histogram samples are folded into buckets between scrapes.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

static RECORDER: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();

/// Installs the process-wide Prometheus recorder on first use and returns
/// its handle (the same one on every later call).
pub fn install() -> anyhow::Result<PrometheusHandle> {
    let installed = RECORDER.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(DISPATCH_LATENCY.into()), LATENCY_BUCKETS)
            .and_then(|b| b.set_buckets_for_metric(Matcher::Full(STORE_COMMIT.into()), COMMIT_BUCKETS))
            .map_err(|e| e.to_string())?;
        let handle = builder.install_recorder().map_err(|e| e.to_string())?;
        describe();
        Ok(handle)
    });
    installed.clone().map_err(|e| anyhow::anyhow!("installing the metrics recorder: {e}"))
}

fn describe() {
    describe_counter!(JOBS_ENQUEUED, "Jobs enqueued (new jobs, not idempotent repeats).");
    describe_counter!(JOBS_FINISHED, "Jobs that reached a terminal state, by state.");
    describe_histogram!(DISPATCH_LATENCY, Unit::Seconds, "Time from enqueue to the first claim of a job (attempt 1).");
    describe_counter!(EVENTS_DROPPED, "Job events the metrics consumer missed because it lagged.");
    describe_histogram!(STORE_COMMIT, Unit::Seconds, "Duration of one store commit (a group of batches).");
    describe_counter!(
        STORE_CHECKPOINTS,
        "Durable commits of the embedded store's database file (its journal starts again after each)."
    );
    describe_gauge!(AGENT_STREAMS, "Open agent Connect streams.");
    describe_gauge!(QUEUE_JOBS, "Jobs by state (all queues), refreshed at scrape time.");
    describe_gauge!(QUEUED_JOBS_BY_PRIORITY, "Queued jobs by priority, refreshed at scrape time.");
    describe_gauge!(OLDEST_QUEUED_AGE, Unit::Seconds, "Age of the oldest queued job.");
    describe_gauge!(AGENTS, "Agents by health and connection, refreshed at scrape time.");
    describe_gauge!(SERVING, "1 while the engine serves, 0 after a store failure or during shutdown.");
    describe_counter!(
        AGENT_STREAMS_REFUSED,
        "Agent Connect streams refused because the server held --max-agent-streams."
    );
    describe_counter!(
        crate::listener::ACCEPT_ERRORS,
        "Failed accepts of connections, by kind (resources: out of file descriptors or memory; the server backs off)."
    );
    describe_counter!(
        crate::store::dynamodb::request_metrics::REQUESTS,
        "DynamoDB requests by operation (each may take several attempts)."
    );
    describe_counter!(
        crate::store::dynamodb::request_metrics::ATTEMPTS,
        "DynamoDB attempts by operation and result (ok, throttled, condition_failed, conflict, transaction_cancelled, client_error, server_error, no_response); attempts minus requests are retries."
    );
    describe_counter!(
        "tether_store_conflicts_total",
        "Job writes that lost a race with another replica's write of the same job (claims included)."
    );
    describe_counter!(
        "tether_claims_lost_total",
        "Claims for an agent of this replica that lost a race with another replica (the job went elsewhere; the assignment was never pushed)."
    );
    gauge!(AGENT_STREAMS).increment(0.0); // shown as 0 before the first agent
}

pub fn state_label(state: JobState) -> &'static str {
    match state {
        JobState::Queued => "queued",
        JobState::Claimed => "claimed",
        JobState::Running => "running",
        JobState::Succeeded => "succeeded",
        JobState::Failed => "failed",
        JobState::DeadLettered => "dead_lettered",
        JobState::Cancelled => "cancelled",
    }
}

pub fn priority_label(priority: Priority) -> &'static str {
    match priority {
        Priority::Low => "low",
        Priority::Normal => "normal",
        Priority::High => "high",
        Priority::Critical => "critical",
    }
}

const HEALTHS: [Health; 6] =
    [Health::Registering, Health::Healthy, Health::Degraded, Health::Unhealthy, Health::Offline, Health::Terminated];

pub fn health_label(health: Health) -> &'static str {
    match health {
        Health::Registering => "registering",
        Health::Healthy => "healthy",
        Health::Degraded => "degraded",
        Health::Unhealthy => "unhealthy",
        Health::Offline => "offline",
        Health::Terminated => "terminated",
    }
}

/// Counts job events into counters and the dispatch-latency histogram. It
/// subscribes at once, so it sees every event published after this call.
pub fn spawn_job_metrics(engine: &EngineHandle) -> JoinHandle<()> {
    let mut events = engine.subscribe();
    tokio::spawn(async move {
        let counters = JobCounters::register();
        loop {
            match events.recv().await {
                Ok(event) => counters.record(&event),
                Err(RecvError::Lagged(missed)) => counters.dropped.increment(missed),
                Err(RecvError::Closed) => break,
            }
        }
    })
}

/// Handles registered once, so an event costs a few atomic adds.
struct JobCounters {
    enqueued: Counter,
    succeeded: Counter,
    failed: Counter,
    dead_lettered: Counter,
    cancelled: Counter,
    dispatch: metrics::Histogram,
    dropped: Counter,
}

impl JobCounters {
    fn register() -> JobCounters {
        let finished = |state: JobState| counter!(JOBS_FINISHED, "state" => state_label(state));
        JobCounters {
            enqueued: counter!(JOBS_ENQUEUED),
            succeeded: finished(JobState::Succeeded),
            failed: finished(JobState::Failed),
            dead_lettered: finished(JobState::DeadLettered),
            cancelled: finished(JobState::Cancelled),
            dispatch: histogram!(DISPATCH_LATENCY),
            dropped: counter!(EVENTS_DROPPED),
        }
    }

    fn record(&self, event: &JobEvent) {
        let job = &event.job;
        if event.previous.is_none() {
            self.enqueued.increment(1);
        }
        if event.previous == Some(job.state) {
            return;
        }
        match job.state {
            JobState::Claimed if job.attempt == 1 => {
                let waited = job.update_time.duration_since(job.create_time).unwrap_or_default();
                self.dispatch.record(waited.as_secs_f64());
            }
            JobState::Succeeded => self.succeeded.increment(1),
            JobState::Failed => self.failed.increment(1),
            JobState::DeadLettered => self.dead_lettered.increment(1),
            JobState::Cancelled => self.cancelled.increment(1),
            _ => {}
        }
    }
}

/// Counts one open agent stream while it lives (moved into the stream).
pub struct AgentStreamGuard(metrics::Gauge);

impl AgentStreamGuard {
    pub fn open() -> AgentStreamGuard {
        let gauge = gauge!(AGENT_STREAMS);
        gauge.increment(1.0);
        AgentStreamGuard(gauge)
    }
}

impl Drop for AgentStreamGuard {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

struct Scraper {
    engine: EngineHandle,
    handle: PrometheusHandle,
}

impl Scraper {
    /// Sets the gauges that mirror engine state. A stopped engine leaves
    /// them as they were (only `tether_serving` drops to 0).
    async fn refresh(&self) {
        let serving = *self.engine.serving().borrow();
        gauge!(SERVING).set(if serving { 1.0 } else { 0.0 });
        if !serving {
            return;
        }
        if let Ok(stats) = self.engine.stats(None).await {
            for state in JobState::ALL {
                let n = stats.by_state.iter().find(|(s, _)| *s == state).map_or(0, |(_, n)| *n);
                gauge!(QUEUE_JOBS, "state" => state_label(state)).set(n as f64);
            }
            for priority in Priority::ALL {
                let n = stats.queued_by_priority.iter().find(|(p, _)| *p == priority).map_or(0, |(_, n)| *n);
                gauge!(QUEUED_JOBS_BY_PRIORITY, "priority" => priority_label(priority)).set(n as f64);
            }
            gauge!(OLDEST_QUEUED_AGE).set(stats.oldest_queued_age.as_secs_f64());
        }
        // One pass over the agents in the engine, nothing copied: paging
        // through agent views sorted and cloned every agent per scrape.
        let Ok(tally) = self.engine.agent_counts().await else { return };
        let mut counts = [[0u64; 2]; HEALTHS.len()];
        for (health, connected, n) in tally {
            if let Some(i) = HEALTHS.iter().position(|h| *h == health) {
                counts[i][usize::from(connected)] += n;
            }
        }
        for (i, health) in HEALTHS.iter().enumerate() {
            for (connected, label) in [(0, "false"), (1, "true")] {
                gauge!(AGENTS, "health" => health_label(*health), "connected" => label)
                    .set(counts[i][connected] as f64);
            }
        }
    }
}

async fn scrape(State(scraper): State<Arc<Scraper>>) -> impl IntoResponse {
    scraper.refresh().await;
    ([(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], scraper.handle.render())
}

/// Serves `GET /metrics` on `listener` until `stop` is cancelled.
pub async fn serve_metrics(
    listener: TcpListener,
    engine: EngineHandle,
    handle: PrometheusHandle,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let upkeep = {
        let handle = handle.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(UPKEEP_EVERY);
            loop {
                tokio::select! {
                    _ = every.tick() => handle.run_upkeep(),
                    () = stop.cancelled() => break,
                }
            }
        })
    };
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "metrics listening on /metrics");
    }
    let router = Router::new().route("/metrics", get(scrape)).with_state(Arc::new(Scraper { engine, handle }));
    let result = axum::serve(listener, router).with_graceful_shutdown(stop.cancelled_owned()).await;
    upkeep.abort();
    result
}
