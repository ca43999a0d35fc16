//! Drives the CLI end to end (argument parsing, gRPC, rendering, exit codes)
//! against a small in-process fake of QueueService, AgentService (agents
//! and pools) and DashboardService (WatchEvents), so the client side is
//! covered before and independently of the real server. The end-to-end
//! tests against the real server live in the workspace's `tests/` crate.

use std::collections::{BTreeMap, HashMap};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use clap::Parser;
use tether::v1::agent_service_server::{AgentService, AgentServiceServer};
use tether::v1::dashboard_service_server::{DashboardService, DashboardServiceServer};
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
    agents: BTreeMap<String, Agent>,
    pools: BTreeMap<String, AgentPool>,
    last_pool_create: Option<CreateAgentPoolRequest>,
    last_pool_update: Option<UpdateAgentPoolRequest>,
    last_status: Option<UpdateAgentStatusRequest>,
    /// GetPoolScalingSignal calls so far; each answer queues one more job,
    /// so `--watch` samples differ.
    scaling_calls: u64,
    /// When set, GetPoolScalingSignal fails with UNAVAILABLE on these call
    /// numbers (1-based).
    scaling_unavailable_on: Vec<u64>,
    /// The last WatchEventsRequest.
    last_watch_events: Option<WatchEventsRequest>,
    /// When set, WatchEvents ends with this status after its script, rather
    /// than OK.
    watch_events_fail_with: Option<Status>,
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
            let event = WatchQueueResponse { job: Some(job.clone()), previous_state, ..Default::default() };
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

/// The fake's pool checks: min <= desired <= max, as the server does.
fn check_pool(p: &AgentPool) -> Result<(), Status> {
    if p.min_size > p.max_size || p.desired_size < p.min_size || p.desired_size > p.max_size {
        return Err(Status::invalid_argument(format!(
            "pool.desired_size: {} is outside [min_size, max_size] = [{}, {}]",
            p.desired_size, p.min_size, p.max_size
        )));
    }
    Ok(())
}

impl Fake {
    fn insert_agent(&self, agent: Agent) {
        self.lock().agents.insert(agent.id.clone(), agent);
    }

    fn insert_pool(&self, name: &str) {
        let pool = AgentPool { name: name.into(), max_size: 100_000, ..Default::default() };
        self.lock().pools.insert(name.into(), pool);
    }

    fn agent_response(&self, id: &str, change: impl FnOnce(&mut Agent)) -> Result<Agent, Status> {
        let mut s = self.lock();
        let agent = s.agents.get_mut(id).ok_or_else(|| Status::not_found(format!("agent {id} not found")))?;
        change(agent);
        Ok(agent.clone())
    }

    fn pool(&self, name: &str) -> Result<AgentPool, Status> {
        self.lock().pools.get(name).cloned().ok_or_else(|| Status::not_found(format!("pool {name:?} not found")))
    }
}

#[tonic::async_trait]
impl AgentService for Fake {
    type ConnectStream = ReceiverStream<Result<ConnectResponse, Status>>;

    async fn connect(
        &self,
        _: Request<tonic::Streaming<ConnectRequest>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        unimplemented()
    }

    async fn register_agent(
        &self,
        _: Request<RegisterAgentRequest>,
    ) -> Result<Response<RegisterAgentResponse>, Status> {
        unimplemented()
    }

    async fn get_agent(&self, request: Request<GetAgentRequest>) -> Result<Response<GetAgentResponse>, Status> {
        let agent = self.agent_response(&request.into_inner().id, |_| {})?;
        Ok(Response::new(GetAgentResponse { agent: Some(agent) }))
    }

    async fn list_agents(&self, request: Request<ListAgentsRequest>) -> Result<Response<ListAgentsResponse>, Status> {
        let request = request.into_inner();
        let agents = self
            .lock()
            .agents
            .values()
            .filter(|a| request.pool.is_empty() || a.pool == request.pool)
            .filter(|a| request.health.is_empty() || request.health.contains(&a.health))
            .cloned()
            .collect();
        Ok(Response::new(ListAgentsResponse { agents, next_page_token: String::new() }))
    }

    async fn heartbeat(&self, _: Request<HeartbeatRequest>) -> Result<Response<HeartbeatResponse>, Status> {
        unimplemented()
    }

    async fn update_agent_status(
        &self,
        request: Request<UpdateAgentStatusRequest>,
    ) -> Result<Response<UpdateAgentStatusResponse>, Status> {
        let request = request.into_inner();
        let status = request.scheduling_status;
        let agent = self.agent_response(&request.id, |a| a.scheduling_status = status)?;
        self.lock().last_status = Some(request);
        Ok(Response::new(UpdateAgentStatusResponse { agent: Some(agent) }))
    }

    async fn drain_agent(&self, request: Request<DrainAgentRequest>) -> Result<Response<DrainAgentResponse>, Status> {
        let agent = self.agent_response(&request.into_inner().id, |a| {
            a.scheduling_status = AgentSchedulingStatus::Draining as i32;
        })?;
        Ok(Response::new(DrainAgentResponse { agent: Some(agent) }))
    }

    async fn deregister_agent(
        &self,
        request: Request<DeregisterAgentRequest>,
    ) -> Result<Response<DeregisterAgentResponse>, Status> {
        let agent = self.agent_response(&request.into_inner().id, |a| {
            a.health = AgentHealth::Terminated as i32;
            a.health_reason = "deregistered".into();
            a.connected = false;
        })?;
        Ok(Response::new(DeregisterAgentResponse { agent: Some(agent) }))
    }

    async fn create_agent_pool(
        &self,
        request: Request<CreateAgentPoolRequest>,
    ) -> Result<Response<CreateAgentPoolResponse>, Status> {
        let request = request.into_inner();
        let mut pool = request.pool.clone().ok_or_else(|| Status::invalid_argument("pool: is required"))?;
        if pool.max_size == 0 {
            pool.max_size = 100_000;
        }
        pool.desired_size = pool.desired_size.max(pool.min_size);
        check_pool(&pool)?;
        pool.create_time = Some(tether::time::to_timestamp(std::time::SystemTime::now()));
        pool.update_time = pool.create_time;
        let mut s = self.lock();
        if s.pools.contains_key(&pool.name) {
            return Err(Status::already_exists(format!("pool {:?} already exists", pool.name)));
        }
        s.pools.insert(pool.name.clone(), pool.clone());
        s.last_pool_create = Some(request);
        Ok(Response::new(CreateAgentPoolResponse { pool: Some(pool) }))
    }

    async fn get_agent_pool(
        &self,
        request: Request<GetAgentPoolRequest>,
    ) -> Result<Response<GetAgentPoolResponse>, Status> {
        Ok(Response::new(GetAgentPoolResponse { pool: Some(self.pool(&request.into_inner().name)?) }))
    }

    async fn list_agent_pools(
        &self,
        request: Request<ListAgentPoolsRequest>,
    ) -> Result<Response<ListAgentPoolsResponse>, Status> {
        // Pages of two, by name; the token is the last name of the page.
        let request = request.into_inner();
        let s = self.lock();
        let rest: Vec<AgentPool> =
            s.pools.values().filter(|p| p.name.as_str() > request.page_token.as_str()).cloned().collect();
        let pools: Vec<AgentPool> = rest.iter().take(2).cloned().collect();
        let next_page_token =
            if rest.len() > 2 { pools.last().map(|p| p.name.clone()).unwrap_or_default() } else { String::new() };
        Ok(Response::new(ListAgentPoolsResponse { pools, next_page_token }))
    }

    async fn update_agent_pool(
        &self,
        request: Request<UpdateAgentPoolRequest>,
    ) -> Result<Response<UpdateAgentPoolResponse>, Status> {
        let request = request.into_inner();
        let new = request.pool.clone().ok_or_else(|| Status::invalid_argument("pool: is required"))?;
        let mask = request.update_mask.clone().ok_or_else(|| Status::invalid_argument("update_mask: is required"))?;
        let mut pool = self.pool(&new.name)?;
        for path in &mask.paths {
            match path.as_str() {
                "description" => pool.description = new.description.clone(),
                "min_size" => pool.min_size = new.min_size,
                "max_size" => pool.max_size = new.max_size,
                "desired_size" => pool.desired_size = new.desired_size,
                "default_labels" => pool.default_labels = new.default_labels.clone(),
                other => return Err(Status::invalid_argument(format!("{other:?} is not an updatable field"))),
            }
        }
        check_pool(&pool)?;
        let mut s = self.lock();
        s.pools.insert(pool.name.clone(), pool.clone());
        s.last_pool_update = Some(request);
        Ok(Response::new(UpdateAgentPoolResponse { pool: Some(pool) }))
    }

    async fn delete_agent_pool(
        &self,
        request: Request<DeleteAgentPoolRequest>,
    ) -> Result<Response<DeleteAgentPoolResponse>, Status> {
        let name = request.into_inner().name;
        let pool = self.pool(&name)?;
        let mut s = self.lock();
        let live = s.agents.values().filter(|a| a.pool == name && a.health != AgentHealth::Terminated as i32).count();
        if live > 0 {
            return Err(Status::failed_precondition(format!(
                "pool {name:?} has {live} live agent(s); deregister them first"
            )));
        }
        s.pools.remove(&name);
        Ok(Response::new(DeleteAgentPoolResponse { pool: Some(pool) }))
    }

    async fn get_pool_scaling_signal(
        &self,
        request: Request<GetPoolScalingSignalRequest>,
    ) -> Result<Response<GetPoolScalingSignalResponse>, Status> {
        let pool = self.pool(&request.into_inner().name)?;
        let mut s = self.lock();
        s.scaling_calls += 1;
        let call = s.scaling_calls;
        if s.scaling_unavailable_on.contains(&call) {
            return Err(Status::unavailable("restarting"));
        }
        let current_agents = s.agents.values().filter(|a| a.pool == pool.name).count() as u32;
        let queued_jobs = 4 * call;
        let desired_agents = (queued_jobs.div_ceil(4) as u32).clamp(pool.min_size, pool.max_size);
        Ok(Response::new(GetPoolScalingSignalResponse {
            desired_agents,
            current_agents,
            queued_jobs,
            running_jobs: 0,
            slots_per_agent: 4,
            min_size: pool.min_size,
            max_size: pool.max_size,
            compute_time: Some(tether::time::to_timestamp(std::time::SystemTime::now())),
        }))
    }
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

/// 2030-01-02T03:04:05Z, the time of the first scripted event.
const EVENTS_START: i64 = 1_893_553_445;

fn at(offset: i64) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp { seconds: EVENTS_START + offset, nanos: 0 })
}

/// What the fake's WatchEvents sends, in order, before it ends: a job, a
/// deployment and an agent change, a keep-alive (the cursor unchanged) and
/// a reset.
fn watch_events_script() -> Vec<WatchEventsResponse> {
    use tether::v1::watch_events_response::Event;
    let message = |event, cursor: &str| WatchEventsResponse { event: Some(event), cursor: cursor.into() };
    vec![
        message(
            Event::Job(JobEvent {
                job_id: "j-1".into(),
                status: JobStatus::Running as i32,
                queued_state: QueuedJobState::Claimed as i32,
                previous_queued_state: QueuedJobState::Queued as i32,
                attempt: 1,
                agent_id: "a-1".into(),
                error: String::new(),
                time: at(0),
            }),
            "c1",
        ),
        message(
            Event::Deployment(DeploymentEvent {
                deployment_id: "api/d-1".into(),
                service: "api".into(),
                environment: "staging".into(),
                version: "1.0".into(),
                time: at(1),
                actor: "user:ann".into(),
                from_state: DeploymentState::Pending as i32,
                to_state: DeploymentState::Queued as i32,
                job_id: "j-2".into(),
                reason: "release train".into(),
            }),
            "c2",
        ),
        message(
            Event::Agent(AgentEvent {
                agent: Some(Agent {
                    id: "a-1".into(),
                    name: "runner-1".into(),
                    pool: "builds".into(),
                    health: AgentHealth::Healthy as i32,
                    scheduling_status: AgentSchedulingStatus::Active as i32,
                    ..Default::default()
                }),
                previous_health: AgentHealth::Registering as i32,
                previous_scheduling_status: AgentSchedulingStatus::Active as i32,
                time: at(2),
            }),
            "c3",
        ),
        message(Event::KeepAlive(KeepAlive { time: at(17) }), "c3"),
        message(Event::Reset(EventsReset { reason: "the cursor is older than the event retention".into() }), "c4"),
    ]
}

#[tonic::async_trait]
impl DashboardService for Fake {
    async fn create_job(&self, _: Request<CreateJobRequest>) -> Result<Response<CreateJobResponse>, Status> {
        unimplemented()
    }

    async fn get_job(&self, _: Request<GetJobRequest>) -> Result<Response<GetJobResponse>, Status> {
        unimplemented()
    }

    async fn list_jobs(&self, _: Request<ListJobsRequest>) -> Result<Response<ListJobsResponse>, Status> {
        unimplemented()
    }

    async fn cancel_job(&self, _: Request<CancelJobRequest>) -> Result<Response<CancelJobResponse>, Status> {
        unimplemented()
    }

    async fn retry_job(&self, _: Request<RetryJobRequest>) -> Result<Response<RetryJobResponse>, Status> {
        unimplemented()
    }

    type StreamJobLogsStream = ReceiverStream<Result<StreamJobLogsResponse, Status>>;

    async fn stream_job_logs(
        &self,
        _: Request<StreamJobLogsRequest>,
    ) -> Result<Response<Self::StreamJobLogsStream>, Status> {
        unimplemented()
    }

    async fn put_environment(
        &self,
        _: Request<PutEnvironmentRequest>,
    ) -> Result<Response<PutEnvironmentResponse>, Status> {
        unimplemented()
    }

    async fn list_environments(
        &self,
        _: Request<ListEnvironmentsRequest>,
    ) -> Result<Response<ListEnvironmentsResponse>, Status> {
        unimplemented()
    }

    async fn create_deployment(
        &self,
        _: Request<CreateDeploymentRequest>,
    ) -> Result<Response<CreateDeploymentResponse>, Status> {
        unimplemented()
    }

    async fn get_deployment(
        &self,
        _: Request<GetDeploymentRequest>,
    ) -> Result<Response<GetDeploymentResponse>, Status> {
        unimplemented()
    }

    async fn list_deployments(
        &self,
        _: Request<ListDeploymentsRequest>,
    ) -> Result<Response<ListDeploymentsResponse>, Status> {
        unimplemented()
    }

    async fn promote_deployment(
        &self,
        _: Request<PromoteDeploymentRequest>,
    ) -> Result<Response<PromoteDeploymentResponse>, Status> {
        unimplemented()
    }

    async fn rollback_deployment(
        &self,
        _: Request<RollbackDeploymentRequest>,
    ) -> Result<Response<RollbackDeploymentResponse>, Status> {
        unimplemented()
    }

    async fn list_deployment_events(
        &self,
        _: Request<ListDeploymentEventsRequest>,
    ) -> Result<Response<ListDeploymentEventsResponse>, Status> {
        unimplemented()
    }

    async fn get_summary(&self, _: Request<GetSummaryRequest>) -> Result<Response<GetSummaryResponse>, Status> {
        unimplemented()
    }

    type WatchEventsStream = ReceiverStream<Result<WatchEventsResponse, Status>>;

    /// Sends [`watch_events_script`], then ends (OK, or with
    /// `watch_events_fail_with`). A cursor the fake did not issue is
    /// refused, as the server refuses it.
    async fn watch_events(
        &self,
        request: Request<WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let request = request.into_inner();
        if request.cursor.starts_with("bogus") {
            return Err(Status::invalid_argument("cursor: is not a cursor this server issued"));
        }
        let fail_with = {
            let mut s = self.lock();
            s.last_watch_events = Some(request);
            s.watch_events_fail_with.clone()
        };
        let script = watch_events_script();
        let (tx, rx) = mpsc::channel(script.len() + 1);
        for message in script {
            let _ = tx.try_send(Ok(message));
        }
        if let Some(status) = fail_with {
            let _ = tx.try_send(Err(status));
        }
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Starts the fake on an ephemeral port; returns it and its URL.
async fn start() -> (Fake, String) {
    let fake = Fake::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let service = QueueServiceServer::new(fake.clone());
    let agents = AgentServiceServer::new(fake.clone());
    let dashboard = DashboardServiceServer::new(fake.clone());
    tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(service)
            .add_service(agents)
            .add_service(dashboard)
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

// ---------------------------------------------------------------------------
// Pools.

#[tokio::test]
async fn pools_create_get_list_and_delete() {
    let (fake, url) = start().await;
    let run = cli(
        &url,
        &["pools", "create", "gpu", "--description", "CUDA runners", "--min", "1", "--max", "8", "--label", "gpu=a100"],
    )
    .await;
    assert_eq!(run.code, ExitCode::SUCCESS, "{}", run.err);
    assert_eq!(run.out, "pool gpu created: min 1, desired 1, max 8\n");
    let sent = fake.lock().last_pool_create.clone().expect("created").pool.expect("pool");
    assert_eq!((sent.min_size, sent.desired_size, sent.max_size), (1, 0, 8));
    assert_eq!(sent.description, "CUDA runners");
    assert_eq!(sent.default_labels["gpu"], "a100");

    let get = cli(&url, &["pools", "get", "gpu"]).await;
    assert_eq!(get.code, ExitCode::SUCCESS, "{}", get.err);
    for want in ["Name:", "gpu", "CUDA runners", "Max size:", "gpu=a100", "Created:"] {
        assert!(get.out.contains(want), "{want} in {}", get.out);
    }
    let get = cli(&url, &["pools", "get", "gpu", "--output", "json"]).await;
    let v: serde_json::Value = serde_json::from_str(&get.out).expect("json");
    assert_eq!(v["pool"]["maxSize"], 8);
    assert_eq!(v["pool"]["defaultLabels"]["gpu"], "a100");

    let list = cli(&url, &["pools", "list"]).await;
    assert_eq!(list.code, ExitCode::SUCCESS, "{}", list.err);
    let lines: Vec<&str> = list.out.lines().collect();
    assert_eq!(lines.len(), 2, "{}", list.out);
    assert!(lines[0].starts_with("NAME"), "{}", list.out);
    assert!(lines[1].starts_with("gpu "), "{}", list.out);

    let delete = cli(&url, &["pools", "delete", "gpu"]).await;
    assert_eq!(delete.code, ExitCode::SUCCESS, "{}", delete.err);
    assert_eq!(delete.out, "pool gpu deleted\n");
    assert!(fake.lock().pools.is_empty());
    let empty = cli(&url, &["pools", "list"]).await;
    assert_eq!(empty.code, ExitCode::SUCCESS, "{}", empty.err);
    assert!(empty.out.is_empty(), "{}", empty.out);
    assert_eq!(empty.err, "no pools found\n");
}

#[tokio::test]
async fn pools_list_all_follows_every_page() {
    let (fake, url) = start().await;
    for name in ["a", "b", "c", "d", "e"] {
        fake.insert_pool(name);
    }
    let first = cli(&url, &["pools", "list", "--limit", "2"]).await;
    assert_eq!(first.out.lines().count(), 3, "{}", first.out);
    assert!(first.err.contains("--page-token b"), "{}", first.err);
    let next = cli(&url, &["pools", "list", "--page-token", "b", "--output", "json"]).await;
    let v: serde_json::Value = serde_json::from_str(&next.out).expect("json");
    assert_eq!(v["pools"][0]["name"], "c");
    assert_eq!(v["nextPageToken"], "d");
    let all = cli(&url, &["pools", "list", "--all", "--output", "json"]).await;
    let v: serde_json::Value = serde_json::from_str(&all.out).expect("json");
    let names: Vec<&str> = v["pools"].as_array().expect("pools").iter().filter_map(|p| p["name"].as_str()).collect();
    assert_eq!(names, ["a", "b", "c", "d", "e"]);
    assert!(v.get("nextPageToken").is_none());
}

#[tokio::test]
async fn pools_update_sends_a_mask_of_exactly_the_flags_given() {
    let (fake, url) = start().await;
    let run = cli(&url, &["pools", "create", "gpu", "--description", "keep me", "--label", "a=1"]).await;
    assert_eq!(run.code, ExitCode::SUCCESS, "{}", run.err);

    let run = cli(&url, &["pools", "update", "gpu", "--desired", "3", "--min", "2"]).await;
    assert_eq!(run.code, ExitCode::SUCCESS, "{}", run.err);
    assert_eq!(run.out, "pool gpu updated (min_size, desired_size): min 2, desired 3, max 100000\n");
    let sent = fake.lock().last_pool_update.clone().expect("updated");
    assert_eq!(sent.update_mask.expect("mask").paths, ["min_size", "desired_size"]);
    let pool = fake.pool("gpu").expect("pool");
    assert_eq!(pool.description, "keep me", "fields outside the mask stay");
    assert_eq!(pool.default_labels["a"], "1");

    let run = cli(&url, &["pools", "update", "gpu", "--label", "b=2", "--output", "json"]).await;
    assert_eq!(run.code, ExitCode::SUCCESS, "{}", run.err);
    let v: serde_json::Value = serde_json::from_str(&run.out).expect("json");
    assert_eq!(v["pool"]["defaultLabels"], serde_json::json!({"b": "2"}));
    assert_eq!(
        fake.lock().last_pool_update.clone().expect("sent").update_mask.expect("mask").paths,
        ["default_labels"]
    );

    let run = cli(&url, &["pools", "update", "gpu", "--clear-labels", "--description", ""]).await;
    assert_eq!(run.code, ExitCode::SUCCESS, "{}", run.err);
    let sent = fake.lock().last_pool_update.clone().expect("updated");
    assert_eq!(sent.update_mask.expect("mask").paths, ["description", "default_labels"]);
    let pool = fake.pool("gpu").expect("pool");
    assert!(pool.default_labels.is_empty() && pool.description.is_empty(), "{pool:?}");
    assert_eq!(pool.min_size, 2);
}

#[tokio::test]
async fn pools_bad_sizes_are_usage_errors_and_never_sent() {
    let (fake, url) = start().await;
    fake.insert_pool("gpu");
    let run = cli(&url, &["pools", "update", "gpu", "--min", "5", "--max", "2"]).await;
    assert_eq!(run.code, ExitCode::from(2));
    assert_eq!(run.err, "error: --min 5 is greater than --max 2\n");
    assert!(fake.lock().last_pool_update.is_none());
    let run = cli(&url, &["pools", "create", "cpu", "--min", "3", "--desired", "1"]).await;
    assert_eq!(run.code, ExitCode::from(2));
    assert!(fake.lock().last_pool_create.is_none());
    // Refusals only the server can make (against stored values) come back
    // as INVALID_ARGUMENT.
    let run = cli(&url, &["pools", "update", "gpu", "--desired", "7", "--max", "7"]).await;
    assert_eq!(run.code, ExitCode::SUCCESS, "{}", run.err);
    let run = cli(&url, &["pools", "update", "gpu", "--max", "3"]).await;
    assert_eq!(run.code, ExitCode::FAILURE);
    assert!(run.err.starts_with("error: INVALID_ARGUMENT: pool.desired_size"), "{}", run.err);
}

#[tokio::test]
async fn pool_errors_print_pool_hints() {
    let (fake, url) = start().await;
    let run = cli(&url, &["pools", "get", "nope"]).await;
    assert_eq!(run.code, ExitCode::FAILURE);
    assert_eq!(run.err, "error: NOT_FOUND: pool \"nope\" not found\nhint: list pools with `tether pools list`\n");
    let run = cli(&url, &["pools", "scaling", "nope"]).await;
    assert!(run.err.contains("`tether pools list`"), "{}", run.err);

    fake.insert_pool("gpu");
    let run = cli(&url, &["pools", "create", "gpu"]).await;
    assert_eq!(run.code, ExitCode::FAILURE);
    assert!(run.err.starts_with("error: ALREADY_EXISTS: "), "{}", run.err);
    assert!(run.err.contains("`tether pools update`"), "{}", run.err);

    fake.insert_agent(Agent {
        id: "a-1".into(),
        pool: "gpu".into(),
        health: AgentHealth::Healthy as i32,
        ..Default::default()
    });
    let run = cli(&url, &["pools", "delete", "gpu"]).await;
    assert_eq!(run.code, ExitCode::FAILURE);
    assert!(run.err.starts_with("error: FAILED_PRECONDITION: pool \"gpu\" has 1 live agent(s)"), "{}", run.err);
    assert!(run.err.contains("deregister its agents first"), "{}", run.err);
    assert!(run.out.is_empty());

    // After deregistering the agent, the delete goes through.
    let run = cli(&url, &["agents", "deregister", "a-1"]).await;
    assert_eq!(run.code, ExitCode::SUCCESS, "{}", run.err);
    let run = cli(&url, &["pools", "delete", "gpu"]).await;
    assert_eq!(run.code, ExitCode::SUCCESS, "{}", run.err);
}

#[tokio::test]
async fn pools_scaling_shows_the_signal_and_its_inputs() {
    let (fake, url) = start().await;
    fake.insert_pool("gpu");
    fake.insert_agent(Agent { id: "a-1".into(), pool: "gpu".into(), ..Default::default() });
    let run = cli(&url, &["pools", "scaling", "gpu"]).await;
    assert_eq!(run.code, ExitCode::SUCCESS, "{}", run.err);
    let row = |name: &str| -> String {
        let line = run.out.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("{name} in {}", run.out));
        line[name.len()..].trim().to_string()
    };
    assert_eq!(row("Pool:"), "gpu");
    assert_eq!(row("Desired agents:"), "1");
    assert_eq!(row("Current agents:"), "1");
    assert_eq!(row("Change:"), "none");
    assert_eq!(row("Queued jobs:"), "4");
    assert_eq!(row("Running jobs:"), "0");
    assert_eq!(row("Slots per agent:"), "4");
    assert_eq!(row("Min size:"), "0");
    assert_eq!(row("Max size:"), "100000");
    assert!(row("Computed:").contains("ago)"), "{}", run.out);

    let json = cli(&url, &["pools", "scaling", "gpu", "--output", "json"]).await;
    let v: serde_json::Value = serde_json::from_str(&json.out).expect("json");
    assert_eq!(v["queuedJobs"], "8");
    assert_eq!(v["desiredAgents"], 2);
}

/// Runs `args` (a `--watch`) for `for_ms`, then drops it as Ctrl-C would
/// end it, and returns what it printed so far.
async fn watch_for(url: &str, args: &[&str], for_ms: u64) -> (String, String) {
    let argv = ["tether", "--server", url].into_iter().chain(args.iter().copied());
    let parsed = Cli::try_parse_from(argv).expect("valid arguments");
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let ran = tokio::time::timeout(
        std::time::Duration::from_millis(for_ms),
        tether_cli::run_with(&parsed.global, parsed.command, &mut out, &mut err),
    )
    .await;
    assert!(ran.is_err(), "--watch ended by itself: {ran:?}");
    (String::from_utf8(out).expect("utf8"), String::from_utf8(err).expect("utf8"))
}

#[tokio::test]
async fn pools_scaling_watch_requeries_until_stopped() {
    let (fake, url) = start().await;
    fake.insert_pool("gpu");
    // Call 2 fails the way a restarting server does: noted, then retried.
    fake.lock().scaling_unavailable_on = vec![2];
    let (out, err) = watch_for(&url, &["pools", "scaling", "gpu", "--watch", "--interval", "50ms"], 1000).await;
    let samples: Vec<&str> = out.split("\n\n").collect();
    assert!(samples.len() >= 3, "{out}");
    assert!(samples[0].contains("Queued jobs:"), "{out}");
    // Not a terminal: appended, never the clear-screen sequence.
    assert!(!out.contains('\x1b'), "{out:?}");
    assert!(err.starts_with("refresh failed (UNAVAILABLE: restarting); retrying\n"), "{err}");
    assert!(fake.lock().scaling_calls >= 4);

    let (out, _) =
        watch_for(&url, &["pools", "scaling", "gpu", "--watch", "--interval", "50ms", "--output", "json"], 800).await;
    let lines: Vec<serde_json::Value> =
        out.lines().map(|l| serde_json::from_str(l).expect("one JSON object per line")).collect();
    assert!(lines.len() >= 3, "{out}");
    let queued: Vec<u64> =
        lines.iter().map(|v| v["queuedJobs"].as_str().expect("queued").parse().expect("n")).collect();
    assert!(queued.windows(2).all(|w| w[0] < w[1]), "fresh samples each time: {queued:?}");
}

#[tokio::test]
async fn pools_scaling_watch_stops_on_a_refusal() {
    let (fake, url) = start().await;
    fake.insert_pool("gpu");
    let stopper = {
        let fake = fake.clone();
        async move {
            tokio::time::sleep(std::time::Duration::from_millis(150)).await;
            fake.lock().pools.clear();
        }
    };
    let (run, ()) = tokio::join!(cli(&url, &["pools", "scaling", "gpu", "--watch", "--interval", "50ms"]), stopper);
    assert_eq!(run.code, ExitCode::FAILURE);
    assert!(run.out.contains("Desired agents:"), "{}", run.out);
    assert!(run.err.starts_with("error: NOT_FOUND: "), "{}", run.err);
}

// ---------------------------------------------------------------------------
// Agents.

fn sample_agent(id: &str) -> Agent {
    Agent {
        id: id.into(),
        name: format!("runner-{id}"),
        pool: "gpu".into(),
        slots: 4,
        health: AgentHealth::Degraded as i32,
        health_reason: "missed 2 heartbeats".into(),
        scheduling_status: AgentSchedulingStatus::Active as i32,
        connected: true,
        ..Default::default()
    }
}

#[tokio::test]
async fn agents_get_and_list_show_the_health_reason() {
    let (fake, url) = start().await;
    fake.insert_agent(sample_agent("a-1"));
    fake.insert_agent(Agent {
        health: AgentHealth::Healthy as i32,
        health_reason: String::new(),
        ..sample_agent("a-2")
    });

    let get = cli(&url, &["agents", "get", "a-1"]).await;
    assert_eq!(get.code, ExitCode::SUCCESS, "{}", get.err);
    let reason = get.out.lines().find(|l| l.starts_with("Health reason:")).expect("reason row");
    assert!(reason.ends_with("missed 2 heartbeats"), "{}", get.out);
    let json = cli(&url, &["agents", "get", "a-1", "--output", "json"]).await;
    let v: serde_json::Value = serde_json::from_str(&json.out).expect("json");
    assert_eq!(v["agent"]["healthReason"], "missed 2 heartbeats");

    let list = cli(&url, &["agents", "list"]).await;
    assert_eq!(list.code, ExitCode::SUCCESS, "{}", list.err);
    let lines: Vec<&str> = list.out.lines().collect();
    assert_eq!(lines.len(), 3, "{}", list.out);
    assert!(lines[0].ends_with("REASON"), "{}", list.out);
    assert!(lines[1].ends_with("missed 2 heartbeats"), "{}", list.out);
    assert!(lines[2].ends_with(" -"), "{}", list.out);

    let filtered = cli(&url, &["agents", "list", "--health", "healthy", "--output", "json"]).await;
    let v: serde_json::Value = serde_json::from_str(&filtered.out).expect("json");
    assert_eq!(v["agents"].as_array().map(Vec::len), Some(1));
    assert_eq!(v["agents"][0]["id"], "a-2");
}

#[tokio::test]
async fn agents_cordon_uncordon_drain_and_deregister() {
    let (fake, url) = start().await;
    fake.insert_agent(sample_agent("a-1"));

    let run = cli(&url, &["agents", "cordon", "a-1", "--reason", "bad disk"]).await;
    assert_eq!(run.code, ExitCode::SUCCESS, "{}", run.err);
    assert_eq!(run.out, "agent a-1 (runner-a-1) is cordoned: it takes no new jobs\n");
    let sent = fake.lock().last_status.clone().expect("status sent");
    assert_eq!(sent.scheduling_status, AgentSchedulingStatus::Cordoned as i32);
    assert_eq!(sent.reason, "bad disk");

    let run = cli(&url, &["agents", "uncordon", "a-1", "--output", "json"]).await;
    assert_eq!(run.code, ExitCode::SUCCESS, "{}", run.err);
    let v: serde_json::Value = serde_json::from_str(&run.out).expect("json");
    assert_eq!(v["agent"]["schedulingStatus"], "AGENT_SCHEDULING_STATUS_ACTIVE");

    let run = cli(&url, &["agents", "drain", "a-1"]).await;
    assert_eq!(run.code, ExitCode::SUCCESS, "{}", run.err);
    assert!(run.out.starts_with("agent a-1 (runner-a-1) is draining"), "{}", run.out);

    let run = cli(&url, &["agents", "deregister", "a-1"]).await;
    assert_eq!(run.code, ExitCode::SUCCESS, "{}", run.err);
    assert!(run.out.contains("is deregistered"), "{}", run.out);
    assert_eq!(fake.lock().agents["a-1"].health, AgentHealth::Terminated as i32);

    let run = cli(&url, &["agents", "cordon", "nope"]).await;
    assert_eq!(run.code, ExitCode::FAILURE);
    assert_eq!(run.err, "error: NOT_FOUND: agent nope not found\nhint: check the agent id with `tether agents list`\n");
}

// ---------------------------------------------------------------------------
// Watch.

/// The lines `tether watch` prints for [`watch_events_script`]'s changes.
const WATCH_LINES: [&str; 3] = [
    "2030-01-02T03:04:05Z job j-1 queued -> claimed (status running, attempt 1, agent a-1)",
    "2030-01-02T03:04:06Z deployment api/d-1 1.0 staging pending -> queued by user:ann: release train",
    "2030-01-02T03:04:07Z agent builds/runner-1 healthy/active (was registering/active)",
];

const WATCH_RESET: &str = "reset: the cursor is older than the event retention; continuing from the present";

#[tokio::test]
async fn watch_prints_a_line_per_change_and_notes_a_reset_on_stderr() {
    let (fake, url) = start().await;
    let run = cli(&url, &["watch", "--kind", "job", "--kind", "agent,deployment"]).await;
    assert_eq!(run.code, ExitCode::SUCCESS, "{}", run.err);
    // The keep-alive prints nothing; the reset goes to stderr only.
    assert_eq!(run.out.lines().collect::<Vec<_>>(), WATCH_LINES, "{}", run.out);
    assert_eq!(run.err, format!("{WATCH_RESET}\n"));
    let sent = fake.lock().last_watch_events.clone().expect("watched");
    assert_eq!(sent.kinds, [EventKind::Job as i32, EventKind::Agent as i32, EventKind::Deployment as i32]);
    assert_eq!(sent.cursor, "");

    // --show-cursor: every line ends with the cursor to resume from.
    let run = cli(&url, &["watch", "--kind", "deployment", "--cursor", "c0", "--show-cursor"]).await;
    assert_eq!(run.code, ExitCode::SUCCESS, "{}", run.err);
    let want: Vec<String> =
        WATCH_LINES.iter().zip(["c1", "c2", "c3"]).map(|(l, c)| format!("{l} cursor={c}")).collect();
    assert_eq!(run.out.lines().collect::<Vec<_>>(), want, "{}", run.out);
    assert_eq!(run.err, format!("{WATCH_RESET} cursor=c4\n"));
    let sent = fake.lock().last_watch_events.clone().expect("watched");
    assert_eq!((sent.kinds, sent.cursor.as_str()), (vec![EventKind::Deployment as i32], "c0"));
}

#[tokio::test]
async fn watch_json_prints_every_message_as_a_json_line() {
    let (fake, url) = start().await;
    let run = cli(&url, &["watch", "--output", "json"]).await;
    assert_eq!(run.code, ExitCode::SUCCESS, "{}", run.err);
    assert!(fake.lock().last_watch_events.clone().expect("watched").kinds.is_empty(), "no --kind: every kind");
    let lines: Vec<serde_json::Value> =
        run.out.lines().map(|l| serde_json::from_str(l).expect("one JSON object per line")).collect();
    assert_eq!(lines.len(), 5, "{}", run.out);
    let cursors: Vec<&str> = lines.iter().filter_map(|v| v["cursor"].as_str()).collect();
    assert_eq!(cursors, ["c1", "c2", "c3", "c3", "c4"]);
    assert_eq!(lines[0]["job"]["jobId"], "j-1");
    assert_eq!(lines[0]["job"]["status"], "JOB_STATUS_RUNNING");
    assert_eq!(lines[0]["job"]["previousQueuedState"], "QUEUED_JOB_STATE_QUEUED");
    assert_eq!(lines[0]["job"]["queuedState"], "QUEUED_JOB_STATE_CLAIMED");
    assert_eq!(lines[0]["job"]["time"], "2030-01-02T03:04:05Z");
    assert_eq!(lines[1]["deployment"]["deploymentId"], "api/d-1");
    assert_eq!(lines[1]["deployment"]["toState"], "DEPLOYMENT_STATE_QUEUED");
    assert_eq!(lines[2]["agent"]["agent"]["name"], "runner-1");
    assert_eq!(lines[2]["agent"]["previousHealth"], "AGENT_HEALTH_REGISTERING");
    assert_eq!(lines[3]["keepAlive"]["time"], "2030-01-02T03:04:22Z");
    assert_eq!(lines[4]["reset"]["reason"], "the cursor is older than the event retention");
    // stdout holds only JSON; the reset is noted on stderr too.
    assert_eq!(run.err, format!("{WATCH_RESET}\n"));
}

#[tokio::test]
async fn watch_fails_with_the_status_and_the_cursor_to_resume_from() {
    let (fake, url) = start().await;
    fake.lock().watch_events_fail_with = Some(Status::unavailable("server stopping"));
    let run = cli(&url, &["watch"]).await;
    assert_eq!(run.code, ExitCode::FAILURE);
    assert_eq!(run.out.lines().collect::<Vec<_>>(), WATCH_LINES, "{}", run.out);
    let err: Vec<&str> = run.err.lines().collect();
    assert_eq!(err.first().copied(), Some(WATCH_RESET), "{}", run.err);
    assert_eq!(err.get(1).copied(), Some("error: UNAVAILABLE: server stopping"), "{}", run.err);
    assert!(err[2].starts_with("hint: is the server running at"), "{}", run.err);
    assert_eq!(err.last().copied(), Some("(while watching events; resume with --cursor c4)"), "{}", run.err);

    // A refused call: the status alone, nothing printed.
    let run = cli(&url, &["watch", "--cursor", "bogus"]).await;
    assert_eq!(run.code, ExitCode::FAILURE);
    assert!(run.out.is_empty(), "{}", run.out);
    assert_eq!(
        run.err,
        "error: INVALID_ARGUMENT: cursor: is not a cursor this server issued\n\
         hint: the server refused a value; check the flags with `--help`\n"
    );
}
