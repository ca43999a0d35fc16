//! Drives the CLI end to end (argument parsing, gRPC, rendering, exit codes)
//! against a small in-process fake of QueueService, so the client side is
//! covered before and independently of the real server. The end-to-end
//! tests against the real server live in the workspace's `tests/` crate.

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use clap::Parser;
use tether::v1::queue_service_server::{QueueService, QueueServiceServer};
use tether::v1::*;
use tokio::sync::{mpsc, Notify};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status};

#[derive(Parser, Debug)]
struct Cli {
    #[command(flatten)]
    global: tether_cli::GlobalArgs,
    #[command(subcommand)]
    command: tether_cli::Command,
}

#[derive(Default)]
struct State {
    jobs: HashMap<String, QueuedJob>,
    next_id: u64,
    watchers: Vec<mpsc::Sender<Result<WatchQueueResponse, Status>>>,
    last_enqueue: Option<EnqueueJobRequest>,
    /// When set, EnqueueJob stores the job in this state but answers with it
    /// QUEUED and sends no event: the job "finished" before the CLI watched.
    finish_silently_as: Option<QueuedJobState>,
}

#[derive(Clone, Default)]
struct Fake {
    state: Arc<Mutex<State>>,
    watch_opened: Arc<Notify>,
}

impl Fake {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn insert(&self, job: QueuedJob) {
        self.lock().jobs.insert(job.id.clone(), job);
    }

    /// Moves a job to `state` and tells every watcher.
    async fn set_state(&self, id: &str, state: QueuedJobState) {
        let (event, watchers) = {
            let mut s = self.lock();
            let Some(job) = s.jobs.get_mut(id) else {
                panic!("no job {id}");
            };
            let previous_state = job.state;
            job.state = state as i32;
            job.attempt = job.attempt.max(1);
            job.worker_id = "agent-1".into();
            let event = WatchQueueResponse { job: Some(job.clone()), previous_state, dropped: 0 };
            (event, s.watchers.clone())
        };
        for w in watchers {
            let _ = w.send(Ok(event.clone())).await;
        }
    }
}

fn unimplemented<T>() -> Result<Response<T>, Status> {
    Err(Status::unimplemented("not in the fake"))
}

#[tonic::async_trait]
impl QueueService for Fake {
    async fn enqueue_job(&self, request: Request<EnqueueJobRequest>) -> Result<Response<EnqueueJobResponse>, Status> {
        let request = request.into_inner();
        let mut s = self.lock();
        s.next_id += 1;
        let job = QueuedJob {
            id: format!("job-{}", s.next_id),
            queue: request.queue.clone(),
            payload: request.payload.clone(),
            priority: request.priority.max(Priority::Normal as i32),
            max_attempts: if request.max_attempts == 0 { 3 } else { request.max_attempts },
            state: QueuedJobState::Queued as i32,
            create_time: Some(tether::time::to_timestamp(std::time::SystemTime::now())),
            ..Default::default()
        };
        let mut stored = job.clone();
        if let Some(state) = s.finish_silently_as {
            stored.state = state as i32;
        }
        s.jobs.insert(job.id.clone(), stored);
        s.last_enqueue = Some(request);
        Ok(Response::new(EnqueueJobResponse { job: Some(job), created: true }))
    }

    async fn batch_enqueue_jobs(
        &self,
        _: Request<BatchEnqueueJobsRequest>,
    ) -> Result<Response<BatchEnqueueJobsResponse>, Status> {
        unimplemented()
    }

    async fn get_queued_job(
        &self,
        request: Request<GetQueuedJobRequest>,
    ) -> Result<Response<GetQueuedJobResponse>, Status> {
        let id = request.into_inner().id;
        match self.lock().jobs.get(&id) {
            Some(job) => Ok(Response::new(GetQueuedJobResponse { job: Some(job.clone()) })),
            None => Err(Status::not_found(format!("job {id} not found"))),
        }
    }

    async fn list_queued_jobs(
        &self,
        request: Request<ListQueuedJobsRequest>,
    ) -> Result<Response<ListQueuedJobsResponse>, Status> {
        // Pages of two, ordered by id; the token is the index to start at.
        let request = request.into_inner();
        let mut jobs: Vec<QueuedJob> = self.lock().jobs.values().cloned().collect();
        jobs.sort_by(|a, b| a.id.cmp(&b.id));
        let start: usize = request.page_token.parse().unwrap_or(0);
        let end = (start + 2).min(jobs.len());
        let next_page_token = if end < jobs.len() { end.to_string() } else { String::new() };
        Ok(Response::new(ListQueuedJobsResponse { jobs: jobs[start.min(end)..end].to_vec(), next_page_token }))
    }

    async fn cancel_queued_job(
        &self,
        request: Request<CancelQueuedJobRequest>,
    ) -> Result<Response<CancelQueuedJobResponse>, Status> {
        let request = request.into_inner();
        let mut s = self.lock();
        let Some(job) = s.jobs.get_mut(&request.id) else {
            return Err(Status::not_found("no such job"));
        };
        if job.state == QueuedJobState::Succeeded as i32 {
            return Err(Status::failed_precondition("job already succeeded"));
        }
        job.state = QueuedJobState::Cancelled as i32;
        job.last_error = request.reason;
        Ok(Response::new(CancelQueuedJobResponse { job: Some(job.clone()) }))
    }

    async fn claim_job(&self, _: Request<ClaimJobRequest>) -> Result<Response<ClaimJobResponse>, Status> {
        unimplemented()
    }

    async fn start_job(&self, _: Request<StartJobRequest>) -> Result<Response<StartJobResponse>, Status> {
        unimplemented()
    }

    async fn complete_job(&self, _: Request<CompleteJobRequest>) -> Result<Response<CompleteJobResponse>, Status> {
        unimplemented()
    }

    async fn fail_job(&self, _: Request<FailJobRequest>) -> Result<Response<FailJobResponse>, Status> {
        unimplemented()
    }

    async fn renew_lease(&self, _: Request<RenewLeaseRequest>) -> Result<Response<RenewLeaseResponse>, Status> {
        unimplemented()
    }

    async fn list_dead_letters(
        &self,
        _: Request<ListDeadLettersRequest>,
    ) -> Result<Response<ListDeadLettersResponse>, Status> {
        unimplemented()
    }

    async fn redrive_dead_letter(
        &self,
        _: Request<RedriveDeadLetterRequest>,
    ) -> Result<Response<RedriveDeadLetterResponse>, Status> {
        unimplemented()
    }

    async fn get_queue_stats(
        &self,
        _: Request<GetQueueStatsRequest>,
    ) -> Result<Response<GetQueueStatsResponse>, Status> {
        Ok(Response::new(GetQueueStatsResponse {
            by_state: vec![StateCount { state: QueuedJobState::Queued as i32, count: 3 }],
            queued_by_priority: vec![PriorityCount { priority: Priority::High as i32, count: 3 }],
            oldest_queued_age: Some(prost_types::Duration { seconds: 65, nanos: 0 }),
        }))
    }

    type WatchQueueStream = ReceiverStream<Result<WatchQueueResponse, Status>>;

    async fn watch_queue(&self, _: Request<WatchQueueRequest>) -> Result<Response<Self::WatchQueueStream>, Status> {
        let (tx, rx) = mpsc::channel(16);
        self.lock().watchers.push(tx);
        self.watch_opened.notify_one();
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Starts the fake on an ephemeral port; returns it and its URL.
async fn start() -> (Fake, String) {
    let fake = Fake::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let service = QueueServiceServer::new(fake.clone());
    tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await;
    });
    (fake, format!("http://{addr}"))
}

struct Run {
    code: ExitCode,
    out: String,
    err: String,
}

async fn cli(server: &str, args: &[&str]) -> Run {
    let argv = ["tether", "--server", server].into_iter().chain(args.iter().copied());
    let parsed = Cli::try_parse_from(argv).expect("valid arguments");
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = tether_cli::run_with(&parsed.global, parsed.command, &mut out, &mut err)
        .await
        .expect("run returns an exit code");
    Run { code, out: String::from_utf8(out).expect("utf8 stdout"), err: String::from_utf8(err).expect("utf8 stderr") }
}

#[tokio::test]
async fn enqueue_prints_the_id_and_sends_the_flags() {
    let (fake, url) = start().await;
    let run = cli(
        &url,
        &[
            "queue",
            "enqueue",
            "--queue",
            "builds",
            "--command",
            "echo hi",
            "--priority",
            "critical",
            "--require-label",
            "os=linux",
            "--timeout",
            "10m",
            "--not-before",
            "+1h",
        ],
    )
    .await;
    assert_eq!(run.code, ExitCode::SUCCESS, "{}", run.err);
    assert_eq!(run.out, "job-1\n");
    let sent = fake.lock().last_enqueue.clone().expect("enqueued");
    assert_eq!(sent.queue, "builds");
    assert_eq!(&sent.payload[..], br#"{"command":"echo hi"}"#);
    assert_eq!(sent.priority, Priority::Critical as i32);
    assert_eq!(sent.routing.expect("routing").required_labels["os"], "linux");
    assert_eq!(sent.timeout.map(|d| d.seconds), Some(600));
    assert!(sent.not_before.is_some());
}

#[tokio::test]
async fn enqueue_wait_follows_the_watch_to_success() {
    let (fake, url) = start().await;
    let driver = {
        let fake = fake.clone();
        async move {
            fake.watch_opened.notified().await;
            fake.set_state("job-1", QueuedJobState::Running).await;
            fake.set_state("job-1", QueuedJobState::Succeeded).await;
        }
    };
    let (run, ()) = tokio::join!(cli(&url, &["queue", "enqueue", "--payload", "x", "--wait"]), driver);
    assert_eq!(run.code, ExitCode::SUCCESS, "{}", run.err);
    assert!(run.out.contains("succeeded"), "{}", run.out);
    assert!(run.out.contains("agent-1"), "{}", run.out);
}

#[tokio::test]
async fn wait_exits_1_when_the_job_fails() {
    let (fake, url) = start().await;
    fake.insert(QueuedJob {
        id: "j".into(),
        queue: "q".into(),
        state: QueuedJobState::Running as i32,
        ..Default::default()
    });
    let driver = {
        let fake = fake.clone();
        async move {
            fake.watch_opened.notified().await;
            fake.set_state("j", QueuedJobState::DeadLettered).await;
        }
    };
    let (run, ()) = tokio::join!(cli(&url, &["queue", "wait", "j", "--output", "json"]), driver);
    assert_eq!(run.code, ExitCode::FAILURE, "{}", run.err);
    let v: serde_json::Value = serde_json::from_str(&run.out).expect("json");
    assert_eq!(v["job"]["state"], "QUEUED_JOB_STATE_DEAD_LETTERED");
}

#[tokio::test]
async fn wait_rechecks_a_job_that_finished_before_the_watch() {
    let (fake, url) = start().await;
    fake.lock().finish_silently_as = Some(QueuedJobState::Succeeded);
    // No event is ever sent: only the GetQueuedJob after opening the watch
    // can see the job is done. A hang here is the race the re-check closes.
    let run = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        cli(&url, &["queue", "enqueue", "--payload", "x", "--wait"]),
    )
    .await
    .expect("did not hang");
    assert_eq!(run.code, ExitCode::SUCCESS, "{}", run.err);
}

#[tokio::test]
async fn list_all_follows_every_page() {
    let (fake, url) = start().await;
    for i in 1..=5 {
        fake.insert(QueuedJob {
            id: format!("j{i}"),
            queue: "q".into(),
            state: QueuedJobState::Queued as i32,
            ..Default::default()
        });
    }
    let first = cli(&url, &["queue", "list"]).await;
    assert_eq!(first.code, ExitCode::SUCCESS, "{}", first.err);
    assert_eq!(first.out.lines().count(), 3, "{}", first.out); // header + 2
    assert!(first.err.contains("--page-token 2"), "{}", first.err);

    let all = cli(&url, &["queue", "list", "--all", "--output", "json"]).await;
    assert_eq!(all.code, ExitCode::SUCCESS, "{}", all.err);
    let v: serde_json::Value = serde_json::from_str(&all.out).expect("json");
    assert_eq!(v["jobs"].as_array().map(Vec::len), Some(5));
    assert!(v.get("nextPageToken").is_none());
}

#[tokio::test]
async fn errors_print_code_message_and_hint() {
    let (fake, url) = start().await;
    let run = cli(&url, &["queue", "get", "nope"]).await;
    assert_eq!(run.code, ExitCode::FAILURE);
    assert!(run.out.is_empty());
    assert_eq!(run.err, "error: NOT_FOUND: job nope not found\nhint: check the job id with `tether queue list`\n");

    fake.insert(QueuedJob { id: "done".into(), state: QueuedJobState::Succeeded as i32, ..Default::default() });
    let run = cli(&url, &["queue", "cancel", "done"]).await;
    assert_eq!(run.code, ExitCode::FAILURE);
    assert!(run.err.starts_with("error: FAILED_PRECONDITION: job already succeeded\nhint: "), "{}", run.err);

    let run = cli(&url, &["queue", "redrive", "x"]).await;
    assert!(run.err.starts_with("error: UNIMPLEMENTED: "), "{}", run.err);
}

#[tokio::test]
async fn get_cancel_and_stats_render() {
    let (fake, url) = start().await;
    fake.insert(QueuedJob {
        id: "j".into(),
        queue: "q".into(),
        payload: bytes::Bytes::from_static(b"echo hello"),
        state: QueuedJobState::Queued as i32,
        ..Default::default()
    });
    let get = cli(&url, &["queue", "get", "j"]).await;
    assert!(get.out.contains("echo hello"), "{}", get.out);
    let cancel = cli(&url, &["queue", "cancel", "j", "--reason", "oops"]).await;
    assert_eq!(cancel.out, "job j cancelled\n");
    let stats = cli(&url, &["queue", "stats"]).await;
    assert!(stats.out.contains("Oldest queued: 1m5s"), "{}", stats.out);
}

#[tokio::test]
async fn unreachable_server_says_how_to_start_it() {
    // Bind and drop a listener to get a port nobody listens on.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let url = format!("http://127.0.0.1:{port}");
    let run = cli(&url, &["agents", "list"]).await;
    assert_eq!(run.code, ExitCode::FAILURE);
    assert!(run.err.starts_with("error: UNAVAILABLE: "), "{}", run.err);
    assert!(run.err.contains(&url), "{}", run.err);
    assert!(run.err.contains("`tether server`"), "{}", run.err);
}

#[tokio::test]
async fn bad_server_url_is_a_usage_error() {
    let run = cli("http://bad host", &["queue", "stats"]).await;
    assert_eq!(run.code, ExitCode::from(2));
    assert!(run.err.starts_with("error: invalid --server"), "{}", run.err);
}
