//! `tether-bench`: end-to-end throughput and dispatch latency of a real
//! Tether server (in-process, loopback gRPC, durable embedded store in a temp
//! dir, fsync on every commit by default) with real SDK agents.
//!
//! Prints human-readable lines, then one JSON object as the last line.

// The summary's json! literal has more keys than the default limit expands.
#![recursion_limit = "256"]

mod env;
mod phases;
mod probe;

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::Context as _;
use clap::Parser;
use futures::future::{FutureExt as _, LocalBoxFuture};
use serde_json::json;

use crate::env::{Env, EnvConfig, OutputWork};
use crate::phases::{Enqueue, Fanout, Latency, Logs, Throughput};

/// Benchmarks a Tether server end to end: batched and unbatched enqueue
/// throughput until every job SUCCEEDED, dispatch latency at a fixed rate,
/// log throughput, event fan-out to WatchQueue watchers, and peak RSS.
#[derive(Parser, Debug)]
#[command(name = "tether-bench", version)]
struct Args {
    /// Jobs per throughput measurement.
    #[arg(long, default_value_t = 20_000)]
    jobs: u64,
    /// Agents (SDK, in-process, one Connect stream each).
    #[arg(long, default_value_t = 4)]
    agents: u32,
    /// Slots per agent.
    #[arg(long, default_value_t = 4)]
    slots: u32,
    /// Jobs per second in the latency measurement.
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// Length of the latency measurement in seconds.
    #[arg(long, default_value_t = 10)]
    latency_secs: u64,
    /// Unrecorded jobs sent on the latency schedule before measuring.
    #[arg(long, default_value_t = 500)]
    warmup_jobs: u64,
    /// Repeat every measurement this often, each on a fresh server and
    /// store; the JSON reports medians.
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// Sync the store only every Nth commit (EmbeddedOptions.sync); for
    /// comparison only. Default: fsync every commit.
    #[arg(long, value_name = "N")]
    unsafe_sync_every: Option<u32>,
    /// The engine's group-commit window under heavy load in milliseconds
    /// (EngineConfig.busy_commit_interval; default: the engine's default).
    #[arg(long, value_name = "MS")]
    commit_interval_ms: Option<u64>,
    /// The engine's commit window after a small commit in milliseconds
    /// (EngineConfig.commit_interval; default 0: commit at once).
    #[arg(long, value_name = "MS")]
    idle_commit_interval_ms: Option<u64>,
    /// Jobs per BatchEnqueueJobs call.
    #[arg(long, default_value_t = 500)]
    batch_size: usize,
    /// Concurrent BatchEnqueueJobs tasks.
    #[arg(long, default_value_t = 4)]
    batch_clients: usize,
    /// Concurrent EnqueueJob tasks.
    #[arg(long, default_value_t = 64)]
    unbatched_clients: usize,
    /// HTTP/2 connections the enqueuing tasks share.
    #[arg(long, default_value_t = 4)]
    channels: usize,
    /// Worker threads of the server's runtime (default: CPUs).
    #[arg(long)]
    server_threads: Option<usize>,
    /// Worker threads of the agents' runtime (default: CPUs).
    #[arg(long)]
    agent_threads: Option<usize>,
    /// Worker threads of the enqueuing clients' runtime (default: CPUs).
    #[arg(long)]
    client_threads: Option<usize>,
    /// Hand the server the bare store instead of the pass-through that
    /// counts commits.
    #[arg(long)]
    no_store_probe: bool,
    /// Jobs of the single-client phase: one client awaiting each EnqueueJob.
    #[arg(long, default_value_t = 3000)]
    single_jobs: u64,
    /// Jobs of the backlog phase: queued with no agent to take them.
    #[arg(long, default_value_t = 20_000)]
    backlog_jobs: u64,
    /// Store of the measured server. `dynamodb` makes fresh tables per run
    /// at --dynamodb-endpoint (credentials from the AWS chain: for DynamoDB
    /// Local any, e.g. AWS_ACCESS_KEY_ID=local AWS_SECRET_ACCESS_KEY=local
    /// AWS_REGION=us-east-1).
    #[arg(long, value_enum, default_value = "embedded")]
    store: tether_server::config::StoreKind,
    /// DynamoDB endpoint for --store dynamodb (e.g. DynamoDB Local's).
    #[arg(long, value_name = "URL")]
    dynamodb_endpoint: Option<String>,
    /// Output of the logs phase in MiB: one agent (SDK handler calling
    /// JobContext::log) writes it over --log-jobs dashboard jobs.
    #[arg(long, default_value_t = 200)]
    log_mib: u64,
    /// Dashboard jobs the logs phase splits its output over, one follower
    /// each; a job's share must fit the output cap (--max-job-output-mib).
    #[arg(long, default_value_t = 16)]
    log_jobs: u64,
    /// Slots of the logs phase's agent: how many of its jobs write at once.
    #[arg(long, default_value_t = 1)]
    log_slots: u32,
    /// Bytes per JobContext::log call in the logs phase.
    #[arg(long, default_value_t = 64 * 1024)]
    log_chunk: usize,
    /// The server's output cap per dashboard job in MiB for the logs phase
    /// (EngineConfig.max_job_output_bytes; default: the server's, 16 MiB).
    #[arg(long, value_name = "MIB")]
    max_job_output_mib: Option<u64>,
    /// WatchQueue streams of the fanout phase, each on its own connection.
    #[arg(long, default_value_t = 100)]
    fanout_watchers: usize,
    /// Jobs per second the fanout phase enqueues (in BatchEnqueueJobs calls
    /// every 10 ms) while the watchers watch.
    #[arg(long, default_value_t = 1000)]
    fanout_rate: u64,
    /// Length of the fanout phase's load in seconds.
    #[arg(long, default_value_t = 15)]
    fanout_secs: u64,
    /// Skip measurements: any of batched, unbatched, single, backlog,
    /// latency, logs, fanout.
    #[arg(long, value_delimiter = ',')]
    skip: Vec<String>,
}

/// Everything one run measured.
struct Run {
    batched: Option<(Throughput, Cpu)>,
    unbatched: Option<(Throughput, Cpu)>,
    single: Option<(Throughput, Cpu)>,
    backlog: Option<f64>,
    latency: Option<(Latency, Cpu)>,
    logs: Option<Logs>,
    fanout: Option<(Fanout, Cpu)>,
    peak_rss_bytes: u64,
}

type Cpu = BTreeMap<String, f64>;

// mimalloc: the job path allocates many small objects; glibc malloc's
// consolidation showed up at ~10% of CPU in profiles.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    anyhow::ensure!(args.runs >= 1, "--runs must be >= 1");
    anyhow::ensure!(args.jobs >= 1, "--jobs must be >= 1");
    anyhow::ensure!((1..=1000).contains(&args.batch_size), "--batch-size must be 1-1000");
    anyhow::ensure!(args.log_jobs >= 1 && args.log_mib >= 1, "--log-jobs and --log-mib must be >= 1");
    anyhow::ensure!(args.log_slots >= 1, "--log-slots must be >= 1");
    anyhow::ensure!(
        (1..=tether_agent_sdk::MAX_LOG_CHUNK).contains(&args.log_chunk),
        "--log-chunk must be 1-{}",
        tether_agent_sdk::MAX_LOG_CHUNK
    );
    anyhow::ensure!(args.fanout_watchers >= 1, "--fanout-watchers must be >= 1");
    anyhow::ensure!((100..=100_000).contains(&args.fanout_rate), "--fanout-rate must be 100-100000");
    anyhow::ensure!(args.fanout_secs >= 1, "--fanout-secs must be >= 1");
    let log_bytes_per_job = args.log_mib.saturating_mul(1 << 20) / args.log_jobs;
    let log_cap = args.max_job_output_mib.map(|mib| mib.saturating_mul(1 << 20));
    let cap = log_cap.unwrap_or(tether_server::engine::EngineConfig::default().max_job_output_bytes);
    anyhow::ensure!(
        log_bytes_per_job <= cap,
        "a logs job's share ({log_bytes_per_job} bytes) exceeds the output cap ({cap} bytes): raise --log-jobs or \
         --max-job-output-mib"
    );
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    let config = EnvConfig {
        agents: args.agents,
        slots: args.slots,
        sync_every: args.unsafe_sync_every,
        commit_interval: args.commit_interval_ms.map(std::time::Duration::from_millis),
        idle_commit_interval: args.idle_commit_interval_ms.map(std::time::Duration::from_millis),
        server_threads: args.server_threads.unwrap_or(cpus),
        agent_threads: args.agent_threads.unwrap_or(cpus),
        probe_store: !args.no_store_probe,
        store: args.store,
        dynamodb_endpoint: args.dynamodb_endpoint.clone(),
        output: None,
        max_job_output_bytes: None,
    };
    // The logs phase: one agent whose handler writes output.
    let log_config = EnvConfig {
        agents: 1,
        slots: args.log_slots,
        output: Some(OutputWork { bytes_per_job: log_bytes_per_job, chunk: args.log_chunk }),
        max_job_output_bytes: log_cap,
        ..config.clone()
    };
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.client_threads.unwrap_or(cpus))
        .thread_name("cli-worker")
        .enable_all()
        .build()
        .context("build client runtime")?;
    let base = Instant::now();

    let probe_dir = tempfile::Builder::new().prefix("tether-bench-fsync-").tempdir().context("create temp dir")?;
    let (fsync_p50_us, fsync_p99_us) = probe::fsync_probe(probe_dir.path(), 200, false)?;
    let (fsync_in_place_p50_us, fsync_in_place_p99_us) = probe::fsync_probe(probe_dir.path(), 200, true)?;
    drop(probe_dir);

    println!(
        "tether-bench: {} jobs, {} agents x {} slots, latency {} jobs/s for {} s, {} run(s), {} CPUs, store sync: {}",
        args.jobs,
        args.agents,
        args.slots,
        args.rate,
        args.latency_secs,
        args.runs,
        cpus,
        match args.unsafe_sync_every {
            Some(n) => format!("every {n}th commit (UNSAFE)"),
            None => "fsync every commit".into(),
        }
    );
    println!(
        "raw fsync (4 KiB appended + fdatasync) in the temp dir: p50 {fsync_p50_us:.0} us, p99 {fsync_p99_us:.0} us"
    );
    println!(
        "raw fsync (4 KiB written in place + fdatasync, as the store's journal) in the temp dir: p50 \
         {fsync_in_place_p50_us:.0} us, p99 {fsync_in_place_p99_us:.0} us"
    );

    let skip = |name: &str| args.skip.iter().any(|s| s == name);
    let mut runs = Vec::with_capacity(args.runs);
    for r in 1..=args.runs {
        let hwm_reset = probe::reset_peak_rss();
        let batched = if skip("batched") {
            None
        } else {
            let how = Enqueue::Batched { size: args.batch_size, clients: args.batch_clients };
            Some(measure(&client_rt, &config, base, |env| {
                phases::throughput(env, args.jobs, how, args.channels).boxed_local()
            })?)
        };
        if let Some((t, cpu)) = &batched {
            print_throughput(r, "batched", t, cpu);
        }
        let unbatched = if skip("unbatched") {
            None
        } else {
            let how = Enqueue::Single { clients: args.unbatched_clients };
            Some(measure(&client_rt, &config, base, |env| {
                phases::throughput(env, args.jobs, how, args.channels).boxed_local()
            })?)
        };
        if let Some((t, cpu)) = &unbatched {
            print_throughput(r, "unbatched", t, cpu);
        }
        let single = if skip("single") {
            None
        } else {
            let how = Enqueue::Single { clients: 1 };
            Some(measure(&client_rt, &config, base, |env| {
                phases::throughput(env, args.single_jobs, how, 1).boxed_local()
            })?)
        };
        if let Some((t, cpu)) = &single {
            print_throughput(r, "single", t, cpu);
        }
        let backlog = if skip("backlog") {
            None
        } else {
            let (bytes, _) =
                measure(&client_rt, &config, base, |env| phases::backlog(env, args.backlog_jobs).boxed_local())?;
            println!("run {r}:   backlog: {} queued jobs cost {bytes:.0} bytes of RSS each", args.backlog_jobs);
            Some(bytes)
        };
        let latency = if skip("latency") {
            None
        } else {
            Some(measure(&client_rt, &config, base, |env| {
                phases::latency(env, args.rate, args.latency_secs, args.warmup_jobs, args.channels).boxed_local()
            })?)
        };
        if let Some((l, cpu)) = &latency {
            print_latency(r, l, cpu);
        }
        let logs = if skip("logs") {
            None
        } else {
            let (logs, _) = measure(&client_rt, &log_config, base, |env| {
                phases::logs(env, args.log_jobs, log_bytes_per_job).boxed_local()
            })?;
            print_logs(r, &logs, &args, cap);
            Some(logs)
        };
        let fanout = if skip("fanout") {
            None
        } else {
            Some(measure(&client_rt, &config, base, |env| {
                phases::fanout(env, args.fanout_watchers, args.fanout_rate, args.fanout_secs).boxed_local()
            })?)
        };
        if let Some((f, cpu)) = &fanout {
            print_fanout(r, f, cpu);
        }
        let peak_rss_bytes = probe::peak_rss_bytes()?;
        println!(
            "run {r}: peak RSS {:.1} MiB (VmHWM of the whole process: server, store, agents and clients{})",
            peak_rss_bytes as f64 / (1024.0 * 1024.0),
            if hwm_reset { "; reset at the start of the run" } else { "; cumulative, reset unsupported" }
        );
        runs.push(Run { batched, unbatched, single, backlog, latency, logs, fanout, peak_rss_bytes });
    }
    client_rt.shutdown_timeout(std::time::Duration::from_secs(5));

    let fsync = Fsync { p50_us: fsync_p50_us, p99_us: fsync_p99_us, in_place_p50_us: fsync_in_place_p50_us };
    let summary = summarize(&runs, &args, &fsync);
    println!("{summary}");
    Ok(())
}

/// Runs one measurement on a fresh server, store and agents, and returns it
/// with the CPU time each thread group used during it.
fn measure<T, F>(
    client_rt: &tokio::runtime::Runtime,
    config: &EnvConfig,
    base: Instant,
    f: F,
) -> anyhow::Result<(T, Cpu)>
where
    F: for<'a> FnOnce(&'a Env) -> LocalBoxFuture<'a, anyhow::Result<T>>,
{
    let mut env = client_rt.block_on(Env::start(config, base))?;
    let result = client_rt.block_on(async {
        let before = probe::cpu_by_group();
        let value = f(&env).await?;
        let cpu = probe::cpu_since(&probe::cpu_by_group(), &before);
        Ok::<_, anyhow::Error>((value, cpu))
    });
    let stopped = client_rt.block_on(env.stop());
    env.shutdown_runtimes();
    let value = result?;
    stopped?;
    Ok(value)
}

fn cpu_line(cpu: &Cpu, wall: f64) -> String {
    let total: f64 = cpu.values().sum();
    let parts: Vec<String> =
        cpu.iter().filter(|(_, v)| **v > 0.0).map(|(k, v)| format!("{k} {v:.2}s ({:.0}%)", 100.0 * v / wall)).collect();
    format!("CPU {total:.2}s over {wall:.2}s wall [{}]", parts.join(", "))
}

fn print_throughput(run: usize, name: &str, t: &Throughput, cpu: &Cpu) {
    let commits = t.store.commits.max(1) as f64;
    println!(
        "run {run}: {name:>9}: {} jobs in {:.3} s = {:.0} jobs/s (all SUCCEEDED per GetQueueStats after {:.3} s; enqueue done after {:.3} s)",
        t.jobs,
        t.elapsed.as_secs_f64(),
        t.jobs_per_sec(),
        t.elapsed_confirmed.as_secs_f64(),
        t.enqueue_elapsed.as_secs_f64(),
    );
    println!(
        "run {run}: {name:>9}: store {} commits = {:.0} commits/s, {:.1} job writes/commit, {:.2} job writes/job, commit p50 {:.0} us p99 {:.0} us; {}",
        t.store.commits,
        t.store.commits as f64 / t.elapsed.as_secs_f64(),
        t.store.job_writes as f64 / commits,
        t.store.job_writes as f64 / t.jobs as f64,
        t.commit_p50_us,
        t.commit_p99_us,
        cpu_line(cpu, t.elapsed.as_secs_f64()),
    );
    if let Some(single) = t.single {
        println!(
            "run {run}: {name:>9}: acknowledgement p50 {:.0} us; a health check's round trip p50 {:.0} us",
            single.ack_p50_us, single.round_trip_p50_us
        );
    }
}

fn ms(h: &hdrhistogram::Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1e6
}

fn print_latency(run: usize, l: &Latency, cpu: &Cpu) {
    println!(
        "run {run}:   latency: {} jobs at {}/s, scheduled send -> handler start: p50 {:.3} ms, p99 {:.3} ms, p999 {:.3} ms, max {:.3} ms",
        l.jobs,
        l.rate,
        ms(&l.dispatch, 0.5),
        ms(&l.dispatch, 0.99),
        ms(&l.dispatch, 0.999),
        l.dispatch.max() as f64 / 1e6,
    );
    println!(
        "run {run}:   latency: EnqueueJob reply p50 {:.3} ms p99 {:.3} ms; pacer lag p50 {:.3} ms p99 {:.3} ms; store {} commits ({:.0}/s), commit p50 {:.0} us p99 {:.0} us; {}",
        ms(&l.ack, 0.5),
        ms(&l.ack, 0.99),
        ms(&l.pacer_lag, 0.5),
        ms(&l.pacer_lag, 0.99),
        l.store.commits,
        l.store.commits as f64 / l.elapsed.as_secs_f64(),
        l.commit_p50_us,
        l.commit_p99_us,
        cpu_line(cpu, l.elapsed.as_secs_f64()),
    );
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn print_logs(run: usize, l: &Logs, args: &Args, cap: u64) {
    println!(
        "run {run}:      logs: {:.1} MiB in {} dashboard jobs of {:.2} MiB (cap {:.0} MiB), {} at a time, from one SDK agent in {} B log calls: stored {:.1} MiB/s (WatchQueue saw the last job end after {:.3} s), followers received {:.1} MiB/s (last stream ended after {:.3} s); server CPU {:.4} s/MiB",
        mib(l.written),
        l.jobs,
        mib(l.written / l.jobs.max(1)),
        mib(cap),
        args.log_slots,
        args.log_chunk,
        l.stored_mib_per_sec(),
        l.stored_elapsed.as_secs_f64(),
        l.followed_mib_per_sec(),
        l.followed_elapsed.as_secs_f64(),
        l.server_cpu_sec_per_mib(),
    );
    let commits = l.store.commits.max(1) as f64;
    println!(
        "run {run}:      logs: store {} commits = {:.0} commits/s, {:.1} writes/commit, {:.2} MiB/commit, commit p50 {:.0} us p99 {:.0} us; {}",
        l.store.commits,
        l.store.commits as f64 / l.stored_elapsed.as_secs_f64().max(f64::MIN_POSITIVE),
        l.store.writes as f64 / commits,
        mib(l.stored) / commits,
        l.commit_p50_us,
        l.commit_p99_us,
        cpu_line(&l.cpu, l.followed_elapsed.as_secs_f64()),
    );
}

/// CPU microseconds of the server's threads (its runtime, where gRPC, the
/// engine, the watchers' tasks and their store reads run, and the store's
/// writer thread) per event delivered to a watcher, over the whole phase.
fn server_cpu_us_per_event(f: &Fanout, cpu: &Cpu) -> f64 {
    let server: f64 = ["server", "store-writer"].iter().filter_map(|g| cpu.get(*g)).sum();
    server * 1e6 / (f.received.iter().sum::<u64>() as f64).max(1.0)
}

fn print_fanout(run: usize, f: &Fanout, cpu: &Cpu) {
    println!(
        "run {run}:    fanout: {} WatchQueue watchers (queue {}, every state, skip_payload, one connection each) while {} jobs were enqueued at {}/s for {:.0} s: enqueued {:.0} jobs/s (last ack after {:.3} s), ran {:.0} jobs/s (last handler after {:.3} s)",
        f.watchers,
        env::QUEUE,
        f.jobs,
        f.target_rate,
        f.scheduled.as_secs_f64(),
        f.enqueue_per_sec(),
        f.enqueue_elapsed.as_secs_f64(),
        f.jobs_per_sec(),
        f.run_elapsed.as_secs_f64(),
    );
    println!(
        "run {run}:    fanout: update_time -> received: p50 {:.3} ms, p99 {:.3} ms, p999 {:.3} ms, max {:.3} ms; {:.0} events/s delivered in total (last after {:.3} s); every watcher received all {} changes the log holds ({:.2} per job)",
        f.delivery_ms(0.5),
        f.delivery_ms(0.99),
        f.delivery_ms(0.999),
        f.delivery.max() as f64 / 1e6,
        f.events_per_sec(),
        f.delivered_elapsed.as_secs_f64(),
        f.logged,
        f.logged as f64 / f.jobs.max(1) as f64,
    );
    println!(
        "run {run}:    fanout: server CPU {:.2} us per delivered event; producer tick lag p50 {:.3} ms p99 {:.3} ms; store {} commits ({:.0}/s), commit p50 {:.0} us p99 {:.0} us; {}",
        server_cpu_us_per_event(f, cpu),
        ms(&f.pacer_lag, 0.5),
        ms(&f.pacer_lag, 0.99),
        f.store.commits,
        f.store.commits as f64 / f.run_elapsed.as_secs_f64().max(f64::MIN_POSITIVE),
        f.commit_p50_us,
        f.commit_p99_us,
        cpu_line(cpu, f.delivered_elapsed.as_secs_f64()),
    );
}

fn median(mut values: Vec<f64>) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    Some(if n % 2 == 1 { values[n / 2] } else { (values[n / 2 - 1] + values[n / 2]) / 2.0 })
}

fn round(v: Option<f64>, digits: i32) -> serde_json::Value {
    match v {
        Some(v) => {
            let f = 10f64.powi(digits);
            json!((v * f).round() / f)
        }
        None => serde_json::Value::Null,
    }
}

/// The raw fsync probes of the run.
struct Fsync {
    p50_us: f64,
    p99_us: f64,
    in_place_p50_us: f64,
}

fn summarize(runs: &[Run], args: &Args, fsync: &Fsync) -> serde_json::Value {
    let single_client = |r: &Run| r.single.as_ref().and_then(|(t, _)| t.single);
    let of = |f: &dyn Fn(&Run) -> Option<f64>| median(runs.iter().filter_map(f).collect());
    let tp = |r: &Option<(Throughput, Cpu)>| r.as_ref().map(|(t, _)| t.jobs_per_sec());
    let lat = |r: &Run, q: f64| r.latency.as_ref().map(|(l, _)| ms(&l.dispatch, q));
    let per_commit = |r: &Option<(Throughput, Cpu)>| {
        r.as_ref().map(|(t, _)| t.store.job_writes as f64 / t.store.commits.max(1) as f64)
    };
    // Store writes (each a conditional request or transaction on DynamoDB)
    // per job run to the end.
    let per_job = |r: &Option<(Throughput, Cpu)>| r.as_ref().map(|(t, _)| t.store.writes as f64 / t.jobs.max(1) as f64);
    let commits_per_sec =
        |r: &Option<(Throughput, Cpu)>| r.as_ref().map(|(t, _)| t.store.commits as f64 / t.elapsed.as_secs_f64());
    // One client awaiting each enqueue: acknowledgements per second.
    let single = |r: &Run| {
        r.single.as_ref().map(|(t, _)| t.jobs as f64 / t.enqueue_elapsed.as_secs_f64().max(f64::MIN_POSITIVE))
    };
    let fan = |r: &Run, f: &dyn Fn(&Fanout) -> f64| r.fanout.as_ref().map(|(x, _)| f(x));
    let runs_json: Vec<serde_json::Value> = runs
        .iter()
        .map(|r| {
            json!({
                "jobs_per_sec": round(tp(&r.batched), 0),
                "unbatched_jobs_per_sec": round(tp(&r.unbatched), 0),
                "single_client_enqueue_per_sec": round(single(r), 0),
                "p50_ms": round(lat(r, 0.5), 3),
                "p99_ms": round(lat(r, 0.99), 3),
                "p999_ms": round(lat(r, 0.999), 3),
                "log_stored_mib_per_sec": round(r.logs.as_ref().map(Logs::stored_mib_per_sec), 1),
                "log_followed_mib_per_sec": round(r.logs.as_ref().map(Logs::followed_mib_per_sec), 1),
                "log_server_cpu_sec_per_mib": round(r.logs.as_ref().map(Logs::server_cpu_sec_per_mib), 4),
                "fanout_delivery_p50_ms": round(fan(r, &|f| f.delivery_ms(0.5)), 3),
                "fanout_delivery_p99_ms": round(fan(r, &|f| f.delivery_ms(0.99)), 3),
                "fanout_events_per_sec": round(fan(r, &Fanout::events_per_sec), 0),
                "fanout_jobs_per_sec": round(fan(r, &Fanout::jobs_per_sec), 0),
                "peak_rss_bytes": r.peak_rss_bytes,
            })
        })
        .collect();
    json!({
        "jobs_per_sec": round(of(&|r| tp(&r.batched)), 0),
        "unbatched_jobs_per_sec": round(of(&|r| tp(&r.unbatched)), 0),
        "single_client_enqueue_per_sec": round(of(&single), 0),
        "single_client_ack_mean_us": round(of(&|r| single(r).map(|rate| 1e6 / rate)), 1),
        "single_client_ack_p50_us": round(of(&|r| single_client(r).map(|s| s.ack_p50_us)), 1),
        "loopback_round_trip_p50_us": round(of(&|r| single_client(r).map(|s| s.round_trip_p50_us)), 1),
        // What an acknowledgement costs beyond one round trip and one sync
        // of the journal's kind (the bound: 150 us).
        "single_client_ack_excess_us": round(
            of(&|r| single_client(r).map(|s| s.ack_p50_us - s.round_trip_p50_us - fsync.in_place_p50_us)),
            1
        ),
        "rss_per_queued_job_bytes": round(of(&|r| r.backlog), 0),
        "p50_ms": round(of(&|r| lat(r, 0.5)), 3),
        "p99_ms": round(of(&|r| lat(r, 0.99)), 3),
        "p999_ms": round(of(&|r| lat(r, 0.999)), 3),
        "peak_rss_bytes": of(&|r| Some(r.peak_rss_bytes as f64)).map(|v| v as u64),
        "peak_rss_bytes_max": runs.iter().map(|r| r.peak_rss_bytes).max(),
        "enqueue_ack_p50_ms": round(of(&|r| r.latency.as_ref().map(|(l, _)| ms(&l.ack, 0.5))), 3),
        "enqueue_ack_p99_ms": round(of(&|r| r.latency.as_ref().map(|(l, _)| ms(&l.ack, 0.99))), 3),
        "batched_commits_per_sec": round(of(&|r| commits_per_sec(&r.batched)), 0),
        "batched_job_writes_per_commit": round(of(&|r| per_commit(&r.batched)), 1),
        "batched_store_writes_per_job": round(of(&|r| per_job(&r.batched)), 2),
        "unbatched_commits_per_sec": round(of(&|r| commits_per_sec(&r.unbatched)), 0),
        "unbatched_job_writes_per_commit": round(of(&|r| per_commit(&r.unbatched)), 1),
        "log_stored_mib_per_sec": round(of(&|r| r.logs.as_ref().map(Logs::stored_mib_per_sec)), 1),
        "log_followed_mib_per_sec": round(of(&|r| r.logs.as_ref().map(Logs::followed_mib_per_sec)), 1),
        "log_server_cpu_sec_per_mib": round(of(&|r| r.logs.as_ref().map(Logs::server_cpu_sec_per_mib)), 4),
        "log_wall_secs": round(of(&|r| r.logs.as_ref().map(|l| l.followed_elapsed.as_secs_f64())), 3),
        "log_mib": args.log_mib,
        "log_jobs": args.log_jobs,
        "log_slots": args.log_slots,
        "fanout_delivery_p50_ms": round(of(&|r| fan(r, &|f| f.delivery_ms(0.5))), 3),
        "fanout_delivery_p99_ms": round(of(&|r| fan(r, &|f| f.delivery_ms(0.99))), 3),
        "fanout_delivery_max_ms": round(of(&|r| fan(r, &|f| f.delivery.max() as f64 / 1e6)), 3),
        "fanout_events_per_sec": round(of(&|r| fan(r, &Fanout::events_per_sec)), 0),
        "fanout_enqueued_per_sec": round(of(&|r| fan(r, &Fanout::enqueue_per_sec)), 0),
        "fanout_jobs_per_sec": round(of(&|r| fan(r, &Fanout::jobs_per_sec)), 0),
        "fanout_server_cpu_us_per_event": round(
            of(&|r| r.fanout.as_ref().map(|(f, cpu)| server_cpu_us_per_event(f, cpu))),
            2
        ),
        "fanout_changes_per_job": round(of(&|r| fan(r, &|f| f.logged as f64 / f.jobs.max(1) as f64)), 2),
        "fanout_watchers": args.fanout_watchers,
        "fanout_rate": args.fanout_rate,
        "fanout_secs": args.fanout_secs,
        "fsync_p50_us": round(Some(fsync.p50_us), 0),
        "fsync_p99_us": round(Some(fsync.p99_us), 0),
        "fsync_in_place_p50_us": round(Some(fsync.in_place_p50_us), 0),
        "jobs": args.jobs,
        "agents": args.agents,
        "slots": args.slots,
        "rate": args.rate,
        "latency_secs": args.latency_secs,
        "store": format!("{:?}", args.store).to_lowercase(),
        "sync": match args.unsafe_sync_every { Some(n) => format!("every_{n}"), None => "always".into() },
        "runs": runs_json,
    })
}
