//! Crash recovery of the real `tether` binary: the server is killed with
//! SIGKILL while several clients enqueue as fast as they can, then restarted
//! on the same data directory. Every acknowledged job must be there exactly
//! once, with its payload, and its idempotency key must still lead to it.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tether::v1 as pb;
use tether::v1::queue_service_client::QueueServiceClient;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStderr, Command};
use tokio::sync::Notify;
use tonic::transport::{Channel, Endpoint};

/// Upper bound for any single wait; a test that hits it failed.
const WAIT: Duration = Duration::from_secs(60);
/// Concurrent enqueuers.
const ENQUEUERS: usize = 8;
/// Acknowledged enqueues before the kill.
const ACKS_BEFORE_KILL: usize = 2_000;
const QUEUE: &str = "crash";

/// A running `tether server` child process; killed (SIGKILL) when dropped,
/// so a failing test never leaves a server behind.
struct ServerProcess {
    child: Child,
    addr: SocketAddr,
}

impl ServerProcess {
    /// Starts the binary on a port-0 listener and waits for its
    /// "tether server listening" log line to learn the bound address.
    async fn start(data_dir: &Path) -> ServerProcess {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tether"))
            .arg("server")
            .args(["--listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--log-format", "json"])
            .env("TETHER_LOG", "info")
            .env_remove("TETHER_UNSAFE_SYNC_EVERY")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn the tether binary");
        let stderr = child.stderr.take().expect("piped stderr");
        // Build the guard first so the child dies if waiting for the address
        // panics.
        let mut server = ServerProcess { child, addr: SocketAddr::from(([0, 0, 0, 0], 0)) };
        server.addr =
            tokio::time::timeout(WAIT, listening_addr(stderr)).await.expect("the server logs its address in time");
        server
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    async fn client(&self) -> QueueServiceClient<Channel> {
        let channel = Endpoint::from_shared(self.url())
            .expect("url")
            .tcp_nodelay(true)
            .connect_timeout(WAIT)
            .connect()
            .await
            .expect("connect");
        QueueServiceClient::new(channel)
    }

    /// SIGKILL, then reap the process so its file lock is released.
    async fn kill9(&mut self) {
        self.child.start_kill().expect("send SIGKILL");
        let status = tokio::time::timeout(WAIT, self.child.wait()).await.expect("the server dies").expect("wait");
        assert!(!status.success(), "a killed server does not exit cleanly: {status:?}");
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// Reads JSON log lines until the listening line, then keeps draining stderr
/// in the background so the server never blocks on a full pipe.
async fn listening_addr(stderr: ChildStderr) -> SocketAddr {
    let mut lines = BufReader::new(stderr).lines();
    while let Some(line) = lines.next_line().await.expect("read server stderr") {
        let Ok(record) = serde_json::from_str::<serde_json::Value>(&line) else { continue };
        let fields = &record["fields"];
        if fields["message"].as_str() != Some("tether server listening") {
            continue;
        }
        let addr = fields["addr"].as_str().unwrap_or_else(|| panic!("no addr in {line}"));
        let addr: SocketAddr = addr.parse().unwrap_or_else(|e| panic!("bad addr {addr:?}: {e}"));
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        return addr;
    }
    panic!("the server exited before it listened");
}

fn request(key: &str) -> pb::EnqueueJobRequest {
    pb::EnqueueJobRequest {
        queue: QUEUE.into(),
        payload: format!("payload of {key}").into_bytes().into(),
        idempotency_key: key.into(),
        ..Default::default()
    }
}

/// Shared progress of the enqueuers.
struct Progress {
    acks: AtomicUsize,
    sent: AtomicUsize,
    enough: Notify,
    stop: AtomicBool,
}

/// Enqueues `t{task}-{n}` for n = 0, 1, … until a call fails (the server
/// died) or `stop` is set; returns the acknowledged (key, job id) pairs.
async fn enqueuer(
    task: usize,
    mut client: QueueServiceClient<Channel>,
    progress: Arc<Progress>,
) -> Vec<(String, String)> {
    let mut acked = Vec::new();
    for n in 0.. {
        if progress.stop.load(Ordering::SeqCst) {
            break;
        }
        let key = format!("t{task}-{n}");
        progress.sent.fetch_add(1, Ordering::SeqCst);
        let response = match client.enqueue_job(request(&key)).await {
            Ok(r) => r.into_inner(),
            Err(_) => break, // unacknowledged: may or may not exist
        };
        assert!(response.created, "{key} is new, so it must be created");
        let job = response.job.expect("job in response");
        assert_eq!(job.idempotency_key, key);
        acked.push((key, job.id));
        if progress.acks.fetch_add(1, Ordering::SeqCst) + 1 == ACKS_BEFORE_KILL {
            progress.enough.notify_one();
        }
    }
    acked
}

fn queued_count(stats: &pb::GetQueueStatsResponse) -> u64 {
    stats.by_state.iter().filter(|s| s.state == pb::QueuedJobState::Queued as i32).map(|s| s.count).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_during_enqueue_loses_no_acknowledged_job() {
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = ServerProcess::start(dir.path()).await;

    let progress = Arc::new(Progress {
        acks: AtomicUsize::new(0),
        sent: AtomicUsize::new(0),
        enough: Notify::new(),
        stop: AtomicBool::new(false),
    });
    let mut tasks = Vec::new();
    for task in 0..ENQUEUERS {
        let client = server.client().await;
        tasks.push(tokio::spawn(enqueuer(task, client, progress.clone())));
    }
    tokio::time::timeout(WAIT, progress.enough.notified()).await.expect("enough acknowledgements in time");
    server.kill9().await;
    // Enqueuers end on their first failed call; `stop` ends any that is
    // between calls.
    progress.stop.store(true, Ordering::SeqCst);
    let mut acked: Vec<(String, String)> = Vec::new();
    for task in tasks {
        acked.extend(tokio::time::timeout(WAIT, task).await.expect("enqueuers stop").expect("enqueuer ok"));
    }
    let sent = progress.sent.load(Ordering::SeqCst);
    assert!(acked.len() >= ACKS_BEFORE_KILL, "{} acks", acked.len());
    let killed_at = started.elapsed();

    let server = ServerProcess::start(dir.path()).await;
    let mut q = server.client().await;

    // Every acknowledged job is there with its payload, and its key still
    // names it: enqueueing it again creates nothing.
    for (key, id) in &acked {
        let job = q
            .get_queued_job(pb::GetQueuedJobRequest { id: id.clone() })
            .await
            .unwrap_or_else(|e| panic!("acknowledged job {key} ({id}) is missing after the crash: {e}"))
            .into_inner()
            .job
            .expect("job");
        assert_eq!(job.id, *id);
        assert_eq!(job.idempotency_key, *key);
        assert_eq!(job.payload, request(key).payload, "payload of {key}");
        assert_eq!(job.state, pb::QueuedJobState::Queued as i32, "{key} is still queued");
        assert_eq!(job.attempt, 0);
        let again = q.enqueue_job(request(key)).await.expect("re-enqueue").into_inner();
        assert!(!again.created, "{key} was created twice");
        assert_eq!(again.job.expect("job").id, *id, "{key} names another job after the crash");
    }

    // The whole store: no duplicate ids or keys, consistent with the stats.
    let mut ids = HashSet::new();
    let mut keys: HashMap<String, String> = HashMap::new();
    let mut page_token = String::new();
    loop {
        let page = q
            .list_queued_jobs(pb::ListQueuedJobsRequest { page_size: 1000, page_token, ..Default::default() })
            .await
            .expect("list")
            .into_inner();
        for job in page.jobs {
            assert!(ids.insert(job.id.clone()), "job {} is listed twice", job.id);
            assert_eq!(job.state, pb::QueuedJobState::Queued as i32);
            assert_eq!(job.payload, request(&job.idempotency_key).payload, "payload of {}", job.idempotency_key);
            if let Some(other) = keys.insert(job.idempotency_key.clone(), job.id.clone()) {
                panic!("key {} is held by jobs {other} and {}", job.idempotency_key, job.id);
            }
        }
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    let stats = q.get_queue_stats(pb::GetQueueStatsRequest::default()).await.expect("stats").into_inner();
    let all: u64 = stats.by_state.iter().map(|s| s.count).sum();
    assert_eq!(queued_count(&stats), ids.len() as u64, "stats agree with the listing");
    assert_eq!(all, ids.len() as u64, "no job is in another state");
    assert!(ids.len() >= acked.len(), "{} jobs < {} acknowledged", ids.len(), acked.len());
    assert!(ids.len() <= sent, "{} jobs > {} requests sent", ids.len(), sent);
    eprintln!(
        "crash_recovery: {} acknowledged, {} sent, {} present after restart; killed after {:?}, total {:?}",
        acked.len(),
        sent,
        ids.len(),
        killed_at,
        started.elapsed()
    );
}
