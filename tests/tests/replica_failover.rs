//! Two real `tether server` processes sharing one set of DynamoDB tables
//! (DynamoDB Local), and SDK agents given both. The replica the agents are
//! connected to is killed with SIGKILL while every agent slot runs a job:
//! nothing acknowledged is lost, the agents fail over to the other replica
//! and their running attempts resume there (none runs again), and every job
//! succeeds exactly once.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tether::v1 as pb;
use tether::v1::queue_service_client::QueueServiceClient;
use tether_agent_sdk::{Agent, AgentConfig, JobContext, JobResult};
use tether_server::store::dynamodb::local as dynamodb_local;
use tether_server::store::dynamodb::{tables, TableNames};
use tether_tests::{job, wait_until, WAIT};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStderr, Command};
use tokio::sync::{watch, Notify};
use tonic::transport::{Channel, Endpoint};

const JOBS: usize = 120;
const AGENTS: usize = 4;
const SLOTS: u32 = 2;
const QUEUE: &str = "failover";

/// The `tether` binary of this build (beside the test binaries' `deps/`).
fn tether_binary() -> PathBuf {
    if let Ok(path) = std::env::var("TETHER_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe.parent().and_then(|deps| deps.parent()).expect("target directory");
    dir.join(format!("tether{}", std::env::consts::EXE_SUFFIX))
}

/// A replica process; SIGKILLed when dropped.
struct Replica {
    child: Child,
    addr: SocketAddr,
}

impl Replica {
    async fn start(prefix: &str) -> Replica {
        let mut child = Command::new(tether_binary())
            .arg("server")
            .args(["--store", "dynamodb"])
            .args(["--dynamodb-endpoint", &dynamodb_local::endpoint()])
            .args(["--dynamodb-table-prefix", prefix])
            .args(["--listen", "127.0.0.1:0"])
            .args(["--log-format", "json"])
            .env("TETHER_LOG", "info")
            .env("AWS_ACCESS_KEY_ID", "local")
            .env("AWS_SECRET_ACCESS_KEY", "local")
            .env("AWS_REGION", "us-east-1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn the tether binary (built by cargo test --workspace)");
        let stderr = child.stderr.take().expect("piped stderr");
        let mut replica = Replica { child, addr: SocketAddr::from(([0, 0, 0, 0], 0)) };
        replica.addr = tokio::time::timeout(WAIT, listening_addr(stderr)).await.expect("the replica starts in time");
        replica
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    async fn queue(&self) -> QueueServiceClient<Channel> {
        let channel = Endpoint::from_shared(self.url()).expect("url").connect().await.expect("connect");
        QueueServiceClient::new(channel)
    }

    async fn kill9(&mut self) {
        self.child.start_kill().expect("SIGKILL");
        let _ = self.child.wait().await;
    }
}

/// Reads the log until the "tether server listening" line and returns its
/// address; the rest of the log is drained in the background.
async fn listening_addr(stderr: ChildStderr) -> SocketAddr {
    let mut lines = BufReader::new(stderr).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let Ok(entry) = serde_json::from_str::<serde_json::Value>(&line) else { continue };
        if entry["fields"]["message"] == "tether server listening" {
            let addr = entry["fields"]["addr"].as_str().expect("addr field").parse().expect("an address");
            tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
            return addr;
        }
    }
    panic!("the server exited before listening");
}

fn count(stats: &pb::GetQueueStatsResponse, s: pb::QueuedJobState) -> u64 {
    stats.by_state.iter().find(|c| c.state == s as i32).map_or(0, |c| c.count)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_of_a_killed_replica_resume_their_jobs_on_another_and_nothing_reruns() {
    let prefix = dynamodb_local::unique_prefix("failover");
    if let Err(e) = tables::create_tables(&dynamodb_local::client(), &TableNames::new(&prefix)).await {
        panic!("creating tables on DynamoDB Local: {e}");
    }
    let mut a = Replica::start(&prefix).await;
    let b = Replica::start(&prefix).await;

    // Every run of every attempt, and a gate the handlers wait at until the
    // kill is done.
    let runs: Arc<Mutex<HashMap<(String, u32), u32>>> = Arc::default();
    let running = Arc::new(AtomicUsize::new(0));
    let all_busy = Arc::new(Notify::new());
    let (open, gate) = watch::channel(false);
    let mut handles = Vec::new();
    for i in 0..AGENTS {
        let (runs, running, all_busy, gate) = (runs.clone(), running.clone(), all_busy.clone(), gate.clone());
        let handler = move |ctx: JobContext| {
            let (runs, running, all_busy, mut gate) = (runs.clone(), running.clone(), all_busy.clone(), gate.clone());
            async move {
                *runs
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .entry((ctx.job_id().to_string(), ctx.attempt()))
                    .or_insert(0) += 1;
                if running.fetch_add(1, Ordering::SeqCst) + 1 == AGENTS * SLOTS as usize {
                    all_busy.notify_one();
                }
                let _ = gate.wait_for(|open| *open).await;
                JobResult::success("")
            }
        };
        // Every agent starts on A and fails over to B.
        let config = AgentConfig::new(a.url(), format!("mover-{i}")).with_fallback_server(b.url()).with_slots(SLOTS);
        let agent = Agent::new(config, handler);
        handles.push(agent.handle());
        tokio::spawn(agent.run(futures::future::pending()));
    }
    for h in &handles {
        tokio::time::timeout(WAIT, h.wait_connected()).await.expect("in time").expect("connected");
    }

    let busy = all_busy.notified();
    tokio::pin!(busy);
    busy.as_mut().enable();
    let mut q = a.queue().await;
    for chunk in 0..JOBS / 40 {
        let requests = (0..40).map(|i| job(QUEUE, &format!("{}", chunk * 40 + i))).collect();
        q.batch_enqueue_jobs(pb::BatchEnqueueJobsRequest { requests }).await.expect("enqueue (acknowledged)");
    }
    tokio::time::timeout(WAIT, busy).await.expect("every slot runs a job");

    a.kill9().await;
    // The agents notice, move to B and resume; then the jobs may finish.
    for h in &handles {
        let on_b = b.url();
        wait_until("the agents to fail over to B", || {
            let h = h.clone();
            let on_b = on_b.clone();
            async move { h.server().as_deref() == Some(on_b.as_str()) }
        })
        .await;
    }
    open.send(true).expect("open the gate");

    let mut q = b.queue().await;
    wait_until("every job to succeed", || {
        let mut q = q.clone();
        async move {
            let stats = q.get_queue_stats(pb::GetQueueStatsRequest { queue: QUEUE.into() }).await;
            stats.is_ok_and(|s| count(&s.into_inner(), pb::QueuedJobState::Succeeded) == JOBS as u64)
        }
    })
    .await;
    let stats = q.get_queue_stats(pb::GetQueueStatsRequest { queue: QUEUE.into() }).await.expect("stats").into_inner();
    assert_eq!(count(&stats, pb::QueuedJobState::Succeeded), JOBS as u64, "nothing acknowledged was lost");

    let runs = runs.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let twice: Vec<_> = runs.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "attempts that ran twice: {twice:?}");
    assert_eq!(runs.len(), JOBS, "every job ran once");
    assert!(runs.keys().all(|(_, attempt)| *attempt == 1), "the jobs running at the kill resumed, none ran again");
}
