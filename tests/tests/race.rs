//! 16 SDK agents × 4 slots and 8 unary claimers race over 10,000 jobs: every
//! job runs exactly once per attempt and none is lost.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tether::v1 as pb;
use tether_agent_sdk::{Agent, AgentConfig, JobContext, JobResult};
use tether_tests::{DataDir, Options, TestServer, WAIT};
use tokio::sync::Notify;

const JOBS: usize = 10_000;
const AGENTS: usize = 16;
const SLOTS: u32 = 4;
const CLAIMERS: usize = 8;

#[derive(Default)]
struct Ledger {
    /// (job id, attempt) -> how many times it ran.
    runs: Mutex<HashMap<(String, u32), u32>>,
    finished: AtomicUsize,
    all_done: Notify,
}

impl Ledger {
    fn record(&self, job_id: &str, attempt: u32) {
        let mut runs = self.runs.lock().unwrap_or_else(|e| e.into_inner());
        *runs.entry((job_id.to_string(), attempt)).or_insert(0) += 1;
    }

    fn finished(&self) {
        if self.finished.fetch_add(1, Ordering::SeqCst) + 1 >= JOBS {
            self.all_done.notify_waiters();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_and_unary_claimers_run_every_job_exactly_once() {
    let dir = DataDir::new();
    let server = TestServer::start(&dir, Options::default()).await;
    let ledger = Arc::new(Ledger::default());
    let stop = Arc::new(AtomicBool::new(false));

    let mut handles = Vec::new();
    for i in 0..AGENTS {
        let ledger = ledger.clone();
        let handler = move |ctx: JobContext| {
            let ledger = ledger.clone();
            async move {
                ledger.record(ctx.job_id(), ctx.attempt());
                JobResult::success("")
            }
        };
        let agent = Agent::new(AgentConfig::new(server.url.clone(), format!("racer-{i}")).with_slots(SLOTS), handler);
        handles.push(agent.handle());
        tokio::spawn(agent.run(futures::future::pending()));
    }
    for h in &handles {
        tokio::time::timeout(WAIT, h.wait_connected()).await.expect("in time").expect("connected");
    }

    // Completions are counted from the server's point of view: the watch
    // sees every SUCCEEDED transition.
    let mut q = server.queue().await;
    let mut watch = q
        .watch_queue(pb::WatchQueueRequest {
            queue: "race".into(),
            states: vec![pb::QueuedJobState::Succeeded as i32],
            ..Default::default()
        })
        .await
        .expect("watch")
        .into_inner();
    let counter = ledger.clone();
    let watcher = tokio::spawn(async move {
        let mut seen = std::collections::HashSet::new();
        while seen.len() < JOBS {
            let Ok(Some(event)) = watch.message().await else { break };
            assert_eq!(event.dropped, 0, "the watch kept up");
            if let Some(job) = event.job {
                assert!(seen.insert(job.id), "a job succeeded twice");
                counter.finished();
            }
        }
        seen
    });

    let mut claimers = Vec::new();
    for c in 0..CLAIMERS {
        let mut q = server.queue().await;
        let ledger = ledger.clone();
        let stop = stop.clone();
        claimers.push(tokio::spawn(async move {
            let mut completed = 0usize;
            while !stop.load(Ordering::SeqCst) {
                let claim = pb::ClaimJobRequest {
                    worker_id: format!("claimer-{c}"),
                    queue: "race".into(),
                    ..Default::default()
                };
                let Some(job) = q.claim_job(claim).await.expect("claim").into_inner().job else {
                    // Pacing only: the agents usually hold every job.
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    continue;
                };
                ledger.record(&job.id, job.attempt);
                q.complete_job(pb::CompleteJobRequest {
                    id: job.id,
                    attempt: job.attempt,
                    fencing_token: job.fencing_token,
                    result: Default::default(),
                })
                .await
                .expect("complete");
                completed += 1;
            }
            completed
        }));
    }

    let done = ledger.all_done.notified();
    tokio::pin!(done);
    done.as_mut().enable();
    for chunk in 0..(JOBS / 500) {
        let requests = (0..500)
            .map(|i| pb::EnqueueJobRequest {
                queue: "race".into(),
                payload: format!("{}", chunk * 500 + i).into_bytes().into(),
                ..Default::default()
            })
            .collect();
        q.batch_enqueue_jobs(pb::BatchEnqueueJobsRequest { requests }).await.expect("enqueue");
    }
    if ledger.finished.load(Ordering::SeqCst) < JOBS {
        tokio::time::timeout(Duration::from_secs(300), done).await.expect("every job finished");
    }
    stop.store(true, Ordering::SeqCst);
    let mut by_claimers = 0;
    for c in claimers {
        by_claimers += c.await.expect("claimer");
    }

    let runs = ledger.runs.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let twice: Vec<_> = runs.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "attempts that ran more than once: {twice:?}");
    let jobs: std::collections::HashSet<&String> = runs.keys().map(|(id, _)| id).collect();
    assert_eq!(jobs.len(), JOBS, "every job ran");
    assert!(runs.keys().all(|(_, attempt)| *attempt == 1), "no attempt was lost and retried");

    let stats = q.get_queue_stats(pb::GetQueueStatsRequest { queue: "race".into() }).await.expect("stats").into_inner();
    let count = |s: pb::QueuedJobState| stats.by_state.iter().find(|c| c.state == s as i32).map_or(0, |c| c.count);
    assert_eq!(count(pb::QueuedJobState::Succeeded), JOBS as u64);
    assert_eq!(
        count(pb::QueuedJobState::Queued) + count(pb::QueuedJobState::Claimed) + count(pb::QueuedJobState::Running),
        0
    );
    // The watcher's own assertions count: its task is awaited.
    let seen =
        tokio::time::timeout(Duration::from_secs(60), watcher).await.expect("the watcher ends").expect("watcher");
    assert_eq!(seen.len(), JOBS, "the watch saw every success once");
    println!("claimers completed {by_claimers} of {JOBS} jobs; agents the rest");
}
