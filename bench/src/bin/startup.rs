//! Start-up benchmark: fills an embedded store with many jobs (most of them
//! finished, some queued, some running), then measures how long the engine
//! takes to load and how much memory loading adds. The engine must not read
//! finished jobs or queued payloads at start-up.
//!
//! `cargo run --release -p tether-bench --bin tether-startup-bench -- --jobs 1000000`

// mimalloc, as in the server binary.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use clap::Parser;
use tether_server::clock::SystemClock;
use tether_server::domain::{Job, JobSpec, JobState, Priority, Routing};
use tether_server::engine::{EngineConfig, EngineHandle};
use tether_server::store::embedded::{EmbeddedOptions, EmbeddedStore};
use tether_server::store::{Store, Write, WriteOutcome, COUNTER_SEQ};

#[derive(Parser)]
struct Args {
    /// Jobs in the store.
    #[arg(long, default_value_t = 1_000_000)]
    jobs: u64,
    /// Of which this many are still queued.
    #[arg(long, default_value_t = 10_000)]
    queued: u64,
    /// And this many are running.
    #[arg(long, default_value_t = 100)]
    running: u64,
    /// Jobs written per store transaction while filling.
    #[arg(long, default_value_t = 20_000)]
    fill_batch: u64,
    /// Load the engine this many times (medians reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|kb| kb.parse::<u64>().ok()).map(|kb| kb * 1024))
        })
        .unwrap_or(0)
}

fn job(seq: u64, state: JobState, now: SystemTime) -> Job {
    let spec = JobSpec {
        queue: format!("q{}", seq % 8),
        payload: Bytes::from(format!("{{\"command\":\"echo job {seq}\"}}")),
        priority: [Priority::Low, Priority::Normal, Priority::High, Priority::Critical][(seq % 4) as usize],
        routing: Routing { pool: "default".into(), required_labels: Default::default() },
        max_attempts: 3,
        lease_duration: Duration::from_secs(30),
        timeout: None,
        idempotency_key: None,
        not_before: None,
        retry: Default::default(),
    };
    let mut job = Job::new(tether_server::ids::new_id(now), seq, spec, now);
    job.state = state;
    job.version = 1;
    if state.is_active() {
        job.attempt = 1;
        job.fencing_token = seq;
        job.worker_id = "gone-agent".into();
        job.lease_expire_time = Some(now + Duration::from_secs(30));
    }
    if state == JobState::Succeeded {
        job.attempt = 1;
        job.fencing_token = seq;
        job.result = Bytes::from_static(b"ok");
        job.finish_time = Some(now);
    }
    job
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let now = SystemTime::now();
    {
        let store = EmbeddedStore::open(dir.path(), EmbeddedOptions::default())?;
        let fill = Instant::now();
        let mut seq = 1;
        while seq <= args.jobs {
            let end = (seq + args.fill_batch).min(args.jobs + 1);
            let mut writes = Vec::with_capacity((end - seq) as usize + 1);
            for s in seq..end {
                let state = if s <= args.queued {
                    JobState::Queued
                } else if s <= args.queued + args.running {
                    JobState::Running
                } else {
                    JobState::Succeeded
                };
                writes.push(Write::create(job(s, state, now)));
            }
            writes.push(Write::RaiseCounter { name: COUNTER_SEQ, value: end - 1 });
            let outcomes = store.write(writes).await?;
            anyhow::ensure!(outcomes.iter().all(|o| *o == WriteOutcome::Applied), "fill write refused");
            seq = end;
        }
        let size = std::fs::metadata(store.path())?.len();
        println!(
            "filled {} jobs ({} queued, {} running) in {:.1} s; store file {:.0} MiB",
            args.jobs,
            args.queued,
            args.running,
            fill.elapsed().as_secs_f64(),
            size as f64 / (1 << 20) as f64
        );
    }
    let mut times = Vec::new();
    let mut rss_added = Vec::new();
    for run in 1..=args.runs {
        let before = rss_bytes();
        let start = Instant::now();
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir.path(), EmbeddedOptions::default())?);
        let (engine, task) = EngineHandle::start(store, Arc::new(SystemClock), EngineConfig::default()).await?;
        let stats = engine.stats(None).await.map_err(|e| anyhow::anyhow!("{e}"))?;
        let elapsed = start.elapsed();
        let added = rss_bytes().saturating_sub(before);
        let queued = stats.by_state.iter().find(|(s, _)| *s == JobState::Queued).map_or(0, |(_, n)| *n);
        let succeeded = stats.by_state.iter().find(|(s, _)| *s == JobState::Succeeded).map_or(0, |(_, n)| *n);
        anyhow::ensure!(queued == args.queued, "expected {} queued, engine counts {queued}", args.queued);
        println!(
            "run {run}: open + load + first answer in {:.3} s; RSS +{:.1} MiB; engine sees {queued} queued, {succeeded} succeeded",
            elapsed.as_secs_f64(),
            added as f64 / (1 << 20) as f64
        );
        times.push(elapsed.as_secs_f64());
        rss_added.push(added);
        engine.shutdown().await;
        let _ = task.await;
    }
    times.sort_by(f64::total_cmp);
    rss_added.sort();
    let median_s = times[times.len() / 2];
    let median_rss = rss_added[rss_added.len() / 2];
    println!(
        "{{\"jobs\":{},\"queued\":{},\"running\":{},\"startup_s_median\":{median_s:.3},\"startup_rss_added_bytes_median\":{median_rss}}}",
        args.jobs, args.queued, args.running
    );
    Ok(())
}
