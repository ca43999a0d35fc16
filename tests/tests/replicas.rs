//! Several server replicas sharing one set of DynamoDB tables (on DynamoDB
//! Local, started by the test command): the store's conditional writes are
//! the only arbiter. Jobs enqueued through one replica reach agents of
//! another; every attempt runs on exactly one agent; an agent whose replica
//! stopped resumes its attempt on another without a rerun; a lease left by a
//! stopped replica is reaped by another.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tether::v1 as pb;
use tether_agent_sdk::{Agent, AgentConfig, JobContext, JobResult, ReconnectPolicy};
use tether_server::clock::ManualClock;
use tether_server::engine::EngineConfig;
use tether_server::store::dynamodb::faults::{Fault, FaultLayer};
use tether_server::store::dynamodb::local as dynamodb_local;
use tether_server::store::dynamodb::{tables, DynamoStore, TableNames};
use tether_server::store::membership::Membership;
use tether_tests::{
    epoch, hello, job, sample, scrape, state, test_engine_config, wait_for_event, wait_until, DataDir, Extras, Options,
    RawAgent, TestServer, WAIT,
};
use tokio::sync::Notify;

/// Sweeps every 100 ms (a lost wake-up costs at most that), and reaps
/// another replica's expired lease 200 ms after it ended.
fn replica_config() -> EngineConfig {
    EngineConfig {
        sweep_interval: Duration::from_millis(100),
        clock_skew_tolerance: Duration::from_millis(200),
        ..test_engine_config()
    }
}

/// Fresh tables, and a way to start replicas over them.
struct Cluster {
    prefix: String,
    _dirs: Vec<DataDir>,
}

impl Cluster {
    async fn new(what: &str) -> Cluster {
        let prefix = dynamodb_local::unique_prefix(what);
        if let Err(e) = tables::create_tables(&dynamodb_local::client(), &TableNames::new(&prefix)).await {
            panic!("creating tables on DynamoDB Local: {e}");
        }
        Cluster { prefix, _dirs: Vec::new() }
    }

    /// A replica with its own DynamoDB client over the shared tables, in the
    /// cluster's membership.
    async fn replica(&mut self) -> TestServer {
        self.replica_with(replica_config()).await
    }

    async fn replica_with(&mut self, engine: EngineConfig) -> TestServer {
        self.start(engine, true).await
    }

    /// A replica that sends and gets no wake-ups: only sweeps move work.
    async fn loner(&mut self) -> TestServer {
        self.start(replica_config(), false).await
    }

    async fn start(&mut self, engine: EngineConfig, member: bool) -> TestServer {
        self.start_on(dynamodb_local::client(), engine, member).await
    }

    /// A replica that sends and gets no wake-ups, on a clock of its own.
    async fn loner_on(&mut self, engine: EngineConfig, clock: ManualClock) -> TestServer {
        self.loner_on_client(dynamodb_local::client(), engine, clock).await
    }

    async fn loner_on_client(
        &mut self,
        client: aws_sdk_dynamodb::Client,
        engine: EngineConfig,
        clock: ManualClock,
    ) -> TestServer {
        let store = Arc::new(DynamoStore::with_client(client, &self.prefix));
        let dir = DataDir::new();
        let path = dir.path().to_path_buf();
        self._dirs.push(dir);
        let options = Options { store: Some(store), engine: Some(engine), clock: Some(clock), ..Options::default() };
        TestServer::start_at(path, options).await
    }

    /// A replica whose store uses `client` (e.g. one with a fault layer).
    async fn start_on(&mut self, client: aws_sdk_dynamodb::Client, engine: EngineConfig, member: bool) -> TestServer {
        let store = Arc::new(DynamoStore::with_client(client, &self.prefix));
        let dir = DataDir::new();
        let path = dir.path().to_path_buf();
        self._dirs.push(dir);
        let membership: Option<Arc<dyn Membership>> = if member { Some(store.clone()) } else { None };
        let options = Options { store: Some(store), membership, engine: Some(engine), ..Options::default() };
        TestServer::start_at(path, options).await
    }

    /// Waits until `count` replicas are announced. A replica announces itself
    /// after reading its peers, so each listed one knows those before it.
    async fn wait_for_members(&self, count: usize) {
        let store = DynamoStore::with_client(dynamodb_local::client(), &self.prefix);
        wait_until("the replicas to announce themselves", || async {
            store.replicas().await.map(|r| r.len() >= count).unwrap_or(false)
        })
        .await;
    }
}

async fn watch_succeeded(server: &TestServer, queue: &str) -> tonic::Streaming<pb::WatchQueueResponse> {
    let mut q = server.queue().await;
    q.watch_queue(pb::WatchQueueRequest {
        queue: queue.into(),
        states: vec![pb::QueuedJobState::Succeeded as i32],
        // The job's id and state are all these watchers need.
        skip_payload: true,
        ..Default::default()
    })
    .await
    .expect("watch")
    .into_inner()
}

async fn get(server: &TestServer, id: &str) -> pb::QueuedJob {
    let mut q = server.queue().await;
    q.get_queued_job(pb::GetQueuedJobRequest { id: id.into() }).await.expect("get").into_inner().job.expect("job")
}

fn count(stats: &pb::GetQueueStatsResponse, s: pb::QueuedJobState) -> u64 {
    stats.by_state.iter().find(|c| c.state == s as i32).map_or(0, |c| c.count)
}

/// (job id, attempt) -> the (agent, fencing token) of every run of it.
type Runs = HashMap<(String, u32), Vec<(usize, u64)>>;

#[derive(Default)]
struct Ledger {
    runs: Mutex<Runs>,
    /// (watching replica, job id) -> SUCCEEDED events seen.
    succeeded: Mutex<HashMap<(usize, String), usize>>,
    done: AtomicUsize,
    all_done: Notify,
}

async fn every_job_runs_exactly_once_on(replica_count: usize) {
    const JOBS: usize = 2_000;
    const AGENTS: usize = 8;
    const QUEUE: &str = "replicas";
    let mut cluster = Cluster::new(&format!("x{replica_count}")).await;
    let mut replicas = Vec::new();
    for _ in 0..replica_count {
        replicas.push(cluster.replica().await);
    }
    let ledger = Arc::new(Ledger::default());

    // Every SUCCEEDED transition is logged with its write, whichever replica
    // wrote it, and every replica's watch reads the shared log: each watch
    // sees each job succeed exactly once.
    let mut watchers = Vec::new();
    for (r, server) in replicas.iter().enumerate() {
        let mut watch = watch_succeeded(server, QUEUE).await;
        let ledger = ledger.clone();
        watchers.push(tokio::spawn(async move {
            while let Ok(Some(event)) = watch.message().await {
                assert_eq!(event.dropped, 0, "the watch kept up");
                let Some(job) = event.job else { continue };
                let seen = {
                    let mut succeeded = ledger.succeeded.lock().unwrap_or_else(|e| e.into_inner());
                    let n = succeeded.entry((r, job.id)).or_insert(0);
                    *n += 1;
                    *n
                };
                if seen == 1 && ledger.done.fetch_add(1, Ordering::SeqCst) + 1 == JOBS * replica_count {
                    ledger.all_done.notify_waiters();
                }
            }
        }));
    }

    let mut agents = Vec::new();
    for i in 0..AGENTS {
        let ledger = ledger.clone();
        let handler = move |ctx: JobContext| {
            let ledger = ledger.clone();
            async move {
                let key = (ctx.job_id().to_string(), ctx.attempt());
                ledger
                    .runs
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .entry(key)
                    .or_default()
                    .push((i, ctx.fencing_token()));
                JobResult::success("")
            }
        };
        let url = replicas[i % replica_count].url.clone();
        let agent = Agent::new(AgentConfig::new(url, format!("agent-{i}")).with_slots(2), handler);
        agents.push(agent.handle());
        tokio::spawn(agent.run(futures::future::pending()));
    }
    for a in &agents {
        tokio::time::timeout(WAIT, a.wait_connected()).await.expect("in time").expect("connected");
    }

    let done = ledger.all_done.notified();
    tokio::pin!(done);
    done.as_mut().enable();
    // Everything is enqueued through the first replica.
    let mut q = replicas[0].queue().await;
    for chunk in 0..JOBS / 200 {
        let requests = (0..200).map(|i| job(QUEUE, &format!("{}", chunk * 200 + i))).collect();
        q.batch_enqueue_jobs(pb::BatchEnqueueJobsRequest { requests }).await.expect("enqueue");
    }
    if ledger.done.load(Ordering::SeqCst) < JOBS * replica_count {
        tokio::time::timeout(Duration::from_secs(600), done).await.expect("every job succeeded, seen by every watch");
    }

    let runs = ledger.runs.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let twice: Vec<_> = runs.iter().filter(|(_, r)| r.len() > 1).collect();
    assert!(twice.is_empty(), "attempts run more than once: {twice:?}");
    let jobs: HashSet<&String> = runs.keys().map(|(id, _)| id).collect();
    assert_eq!(jobs.len(), JOBS, "every job ran");
    assert!(runs.keys().all(|(_, attempt)| *attempt == 1), "no attempt was lost and run again");
    let succeeded = ledger.succeeded.lock().unwrap_or_else(|e| e.into_inner()).clone();
    assert_eq!(succeeded.len(), JOBS * replica_count, "every watch saw every job succeed");
    assert!(succeeded.values().all(|n| *n == 1), "a watch saw a job succeed twice");
    // Jobs enqueued on the first replica reached agents of the others.
    let elsewhere = runs.values().flatten().filter(|(agent, _)| agent % replica_count != 0).count();
    assert!(elsewhere > 0, "no job enqueued on one replica ran on an agent of another");
    println!(
        "{replica_count} replicas: {elsewhere} of {JOBS} jobs ran on agents of replicas other than the enqueuing one"
    );

    // Every replica reads the same counts from the store.
    for server in &replicas {
        let mut q = server.queue().await;
        let stats =
            q.get_queue_stats(pb::GetQueueStatsRequest { queue: QUEUE.into() }).await.expect("stats").into_inner();
        assert_eq!(count(&stats, pb::QueuedJobState::Succeeded), JOBS as u64);
        let unfinished = count(&stats, pb::QueuedJobState::Queued)
            + count(&stats, pb::QueuedJobState::Claimed)
            + count(&stats, pb::QueuedJobState::Running);
        assert_eq!(unfinished, 0);
    }
    for w in watchers {
        w.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_run_every_job_exactly_once() {
    every_job_runs_exactly_once_on(2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_run_every_job_exactly_once() {
    every_job_runs_exactly_once_on(3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_enqueued_on_one_replica_reaches_an_idle_agent_on_another() {
    let mut cluster = Cluster::new("reach").await;
    let a = cluster.replica().await;
    let b = cluster.replica().await;
    let mut agent = RawAgent::connect(&b, hello("on-b", 1)).await.expect("connect to b");
    let mut watch = watch_succeeded(&b, "reach").await;

    let mut q = a.queue().await;
    let enqueued = q.enqueue_job(job("reach", "hello")).await.expect("enqueue on a").into_inner().job.expect("job");
    let assignment = agent.next_assignment().await;
    let r = assignment.job.clone().expect("job ref");
    assert_eq!(r.job_id, enqueued.id);
    assert_eq!(r.attempt, 1);
    agent.accept_and_start(&r).await;
    agent.finish(&r, pb::JobOutcome::Succeeded, "done").await;
    let done = wait_for_event(&mut watch, |j| j.id == enqueued.id).await;
    assert_eq!(state(&done), pb::QueuedJobState::Succeeded);
    // Replica A reads the outcome from the shared store.
    let seen_on_a = get(&a, &enqueued.id).await;
    assert_eq!(state(&seen_on_a), pb::QueuedJobState::Succeeded);
    assert_eq!(seen_on_a.result.as_ref(), b"done");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wake_up_carries_a_job_to_an_idle_agent_on_another_replica_without_a_sweep() {
    // No sweep runs during the test: only a wake-up can move the job.
    let quiet = EngineConfig { sweep_interval: Duration::from_secs(3600), ..replica_config() };
    let mut cluster = Cluster::new("wake").await;
    let b = cluster.replica_with(quiet.clone()).await;
    cluster.wait_for_members(1).await;
    let a = cluster.replica_with(quiet).await;
    cluster.wait_for_members(2).await;
    let mut agent = RawAgent::connect(&b, hello("idle-on-b", 1)).await.expect("connect to b");

    let mut q = a.queue().await;
    for n in 0..3 {
        let enqueued =
            q.enqueue_job(job("wake", &format!("{n}"))).await.expect("enqueue on a").into_inner().job.expect("job");
        let r = agent.next_assignment().await.job.expect("job ref");
        assert_eq!(r.job_id, enqueued.id, "job {n} reached the agent on b");
        agent.accept_and_start(&r).await;
        agent.finish(&r, pb::JobOutcome::Succeeded, "").await;
        assert!(agent.next_ack().await.accepted);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_through_one_replica_reaches_the_agent_on_another_without_a_sweep() {
    // No sweep runs during the test: only the wake-up the cancel sends can
    // tell replica B.
    let quiet = EngineConfig { sweep_interval: Duration::from_secs(3600), ..replica_config() };
    let mut cluster = Cluster::new("cancel").await;
    let b = cluster.replica_with(quiet.clone()).await;
    cluster.wait_for_members(1).await;
    let a = cluster.replica_with(quiet).await;
    cluster.wait_for_members(2).await;
    let mut agent = RawAgent::connect(&b, hello("busy-on-b", 1)).await.expect("connect to b");
    let mut on_b = b.queue().await;
    let enqueued = on_b.enqueue_job(job("cancel", "long")).await.expect("enqueue").into_inner().job.expect("job");
    let r = agent.next_assignment().await.job.expect("job ref");
    agent.accept_and_start(&r).await;
    assert!(agent.next_ack().await.accepted, "the start is durable");

    let mut on_a = a.queue().await;
    let cancelled = on_a
        .cancel_queued_job(pb::CancelQueuedJobRequest { id: enqueued.id.clone(), reason: "stop it".into() })
        .await
        .expect("cancel through a")
        .into_inner()
        .job
        .expect("job");
    assert_eq!(state(&cancelled), pb::QueuedJobState::Cancelled);
    loop {
        match agent.next().await {
            pb::connect_response::Message::Cancel(c) => {
                assert_eq!(c.job.as_ref(), Some(&r), "{c:?}");
                break;
            }
            pb::connect_response::Message::Assignment(a) => panic!("unexpected assignment {a:?}"),
            _ => {}
        }
    }
    agent.finish(&r, pb::JobOutcome::Cancelled, "").await;
    assert!(agent.next_ack().await.accepted, "the cancelled attempt's report is taken");
    assert_eq!(state(&get(&b, &enqueued.id).await), pb::QueuedJobState::Cancelled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_and_deregister_through_one_replica_reach_the_agent_on_another() {
    let quiet = EngineConfig { sweep_interval: Duration::from_secs(3600), ..replica_config() };
    let mut cluster = Cluster::new("drain").await;
    let b = cluster.replica_with(quiet.clone()).await;
    cluster.wait_for_members(1).await;
    let a = cluster.replica_with(quiet).await;
    cluster.wait_for_members(2).await;
    // The agent registers on B after A started: A knows it only from the store.
    let mut agent = RawAgent::connect(&b, hello("held-by-b", 1)).await.expect("connect to b");
    let id = agent.agent_id.clone();
    let mut on_a = a.agents().await;
    let seen = on_a.get_agent(pb::GetAgentRequest { id: id.clone() }).await.expect("get through a").into_inner();
    assert_eq!(seen.agent.as_ref().map(|a| a.name.as_str()), Some("held-by-b"));
    // Both replicas list it: connected to B, not to A.
    let listed = |list: pb::ListAgentsResponse| {
        list.agents.iter().find(|a| a.id == id).map(|a| a.connected).expect("the agent is listed")
    };
    let through_a = on_a.list_agents(pb::ListAgentsRequest::default()).await.expect("list through a").into_inner();
    assert!(!listed(through_a), "a holds no stream of it");
    let through_b =
        b.agents().await.list_agents(pb::ListAgentsRequest::default()).await.expect("list through b").into_inner();
    assert!(listed(through_b), "b holds its stream");

    let drained = on_a
        .drain_agent(pb::DrainAgentRequest { id: id.clone(), reason: "maintenance".into() })
        .await
        .expect("drain through a")
        .into_inner()
        .agent
        .expect("agent");
    assert_eq!(drained.scheduling_status, pb::AgentSchedulingStatus::Draining as i32);
    // Replica B pushes the Drain, told by A's notice alone (no sweeps run).
    loop {
        match agent.next().await {
            pb::connect_response::Message::Drain(_) => break,
            pb::connect_response::Message::Assignment(a) => panic!("unexpected assignment {a:?}"),
            _ => {}
        }
    }

    on_a.deregister_agent(pb::DeregisterAgentRequest { id: id.clone() }).await.expect("deregister through a");
    let mut on_b = b.agents().await;
    wait_until("replica b to see the agent deregistered", || {
        let (mut on_b, id) = (on_b.clone(), id.clone());
        async move {
            on_b.get_agent(pb::GetAgentRequest { id })
                .await
                .is_ok_and(|r| r.into_inner().agent.is_some_and(|a| a.health == pb::AgentHealth::Terminated as i32))
        }
    })
    .await;
    let stored = on_b.get_agent(pb::GetAgentRequest { id }).await.expect("get through b").into_inner();
    assert!(!stored.agent.is_some_and(|a| a.connected), "b let the deregistered agent's stream go");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweeps_find_a_ready_job_behind_a_thousand_delayed_ones() {
    // Sweeps read a bounded window of the queue (64 jobs per shard); each
    // resumes where the last stopped, so jobs behind it are found too.
    let mut cluster = Cluster::new("window").await;
    let a = cluster.loner().await;
    let b = cluster.loner().await;
    let mut q = a.queue().await;
    let later = std::time::SystemTime::now() + Duration::from_secs(3600);
    let requests = (0..1000)
        .map(|i| pb::EnqueueJobRequest { not_before: Some(later.into()), ..job("window", &format!("{i}")) })
        .collect();
    q.batch_enqueue_jobs(pb::BatchEnqueueJobsRequest { requests }).await.expect("enqueue delayed jobs");
    let ready = q.enqueue_job(job("window", "now")).await.expect("enqueue").into_inner().job.expect("job");
    let mut agent = RawAgent::connect(&b, hello("behind", 1)).await.expect("connect to b");
    let r = agent.next_assignment().await.job.expect("job ref");
    assert_eq!(r.job_id, ready.id, "the ready job, not a delayed one");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swept_job_whose_read_failed_is_read_again_and_runs() {
    // B learns of A's job only from its sweep, so it must read the job's
    // record before dispatching it; every attempt of its first read is
    // throttled. The job goes back to B's ready set and the next sweep's
    // dispatch reads it again.
    let mut cluster = Cluster::new("refetch").await;
    let a = cluster.loner().await;
    let throttle = FaultLayer::new("BatchGetItem", Fault::Throttled, 4);
    let client = dynamodb_local::client_with_faults(throttle.clone());
    let b = cluster.start_on(client, replica_config(), false).await;
    let mut agent = RawAgent::connect(&b, hello("reader", 1)).await.expect("connect to b");
    let mut q = a.queue().await;
    let enqueued = q.enqueue_job(job("refetch", "work")).await.expect("enqueue").into_inner().job.expect("job");
    let r = agent.next_assignment().await.job.expect("job ref");
    assert_eq!(r.job_id, enqueued.id);
    assert_eq!(r.attempt, 1);
    assert_eq!(throttle.injected(), 4, "the first read failed on every attempt the client makes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_created_on_one_replica_is_known_to_another_at_once() {
    let mut cluster = Cluster::new("pools").await;
    let a = cluster.replica().await;
    let b = cluster.replica().await;
    let mut agents_a = a.agents().await;
    agents_a
        .create_agent_pool(pb::CreateAgentPoolRequest {
            pool: Some(pb::AgentPool { name: "gpu".into(), max_size: 4, ..Default::default() }),
        })
        .await
        .expect("create the pool on a");
    // B learns it when a request names it, before any sweep.
    let mut q = b.queue().await;
    let request = pb::EnqueueJobRequest {
        routing: Some(pb::Routing { pool: "gpu".into(), ..Default::default() }),
        ..job("pools", "on gpu")
    };
    let enqueued = q.enqueue_job(request).await.expect("enqueue on b into a's pool").into_inner().job.expect("job");
    let mut gpu = hello("gpu-agent", 1);
    gpu.pool = "gpu".into();
    let mut agent = RawAgent::connect(&b, gpu).await.expect("an agent of a's pool connects to b");
    assert_eq!(agent.next_assignment().await.job.expect("job ref").job_id, enqueued.id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_name_is_created_once_across_replicas() {
    // Sweeps off: B has not heard of A's pool when it is asked to create
    // the same name; the store refuses the second create.
    let mut cluster = Cluster::new("onepool").await;
    let quiet = EngineConfig { sweep_interval: Duration::from_secs(3600), ..replica_config() };
    let a = cluster.start(quiet.clone(), false).await;
    let b = cluster.start(quiet, false).await;
    async fn create(server: &TestServer, name: &str, max_size: u32) -> Result<pb::AgentPool, tonic::Status> {
        let pool = pb::AgentPool { name: name.into(), max_size, ..Default::default() };
        let created = server.agents().await.create_agent_pool(pb::CreateAgentPoolRequest { pool: Some(pool) }).await?;
        created.into_inner().pool.ok_or_else(|| tonic::Status::internal("no pool in the reply"))
    }
    create(&a, "builders", 4).await.expect("the first create");
    let second = create(&b, "builders", 8).await.expect_err("a second create of the name");
    assert_eq!(second.code(), tonic::Code::AlreadyExists, "{second:?}");
    let mut agents_b = b.agents().await;
    let pool = agents_b
        .get_agent_pool(pb::GetAgentPoolRequest { name: "builders".into() })
        .await
        .expect("b reads the pool")
        .into_inner()
        .pool
        .expect("pool");
    assert_eq!(pool.max_size, 4, "the first create's pool, untouched");

    // Two creates of another name at the same time: one wins.
    let (x, y) = tokio::join!(create(&a, "racers", 1), create(&b, "racers", 2));
    let code = |r: Result<pb::AgentPool, tonic::Status>| r.map_or_else(|e| e.code(), |_| tonic::Code::Ok);
    let codes = [code(x), code(y)];
    let mut sorted = codes;
    sorted.sort_by_key(|c| *c as i32);
    assert_eq!(sorted, [tonic::Code::Ok, tonic::Code::AlreadyExists], "{codes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_naming_unknown_pools_read_the_pools_at_most_once_per_sweep_interval() {
    // Every Scan of this replica's client is counted (each is throttled on
    // all 4 attempts the test client makes, so the read fails).
    let mut cluster = Cluster::new("unknownpools").await;
    let scans = FaultLayer::new("Scan", Fault::Throttled, 0);
    let client = dynamodb_local::client_with_faults(scans.clone());
    let config = EngineConfig { sweep_interval: Duration::from_secs(60), ..replica_config() };
    let clock = ManualClock::new(epoch());
    let server = cluster.loner_on_client(client, config, clock).await;
    let mut agents = server.agents().await;
    // Started (its start-up reads the pools): the default pool is known.
    agents.get_agent_pool(pb::GetAgentPoolRequest { name: "default".into() }).await.expect("the default pool");
    scans.arm(u32::MAX);
    let at_start = scans.injected();
    for name in ["made-up-1", "made-up-2", "made-up-3"] {
        let err = agents.get_agent_pool(pb::GetAgentPoolRequest { name: name.into() }).await.expect_err("no such pool");
        assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
    }
    assert_eq!(scans.injected() - at_start, 4, "one read of the pools (4 attempts), not one per request");
    server.advance(Duration::from_secs(61));
    let err = agents.get_agent_pool(pb::GetAgentPoolRequest { name: "made-up-4".into() }).await.expect_err("no pool");
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert!(scans.injected() - at_start > 4, "read again once the interval passed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_resumes_its_attempt_on_another_replica_without_a_rerun() {
    let mut cluster = Cluster::new("resume").await;
    let a = cluster.replica().await;
    let b = cluster.replica().await;
    let mut on_a = RawAgent::connect(&a, hello("mover", 1)).await.expect("connect to a");
    let mut q = a.queue().await;
    let enqueued = q.enqueue_job(job("resume", "work")).await.expect("enqueue").into_inner().job.expect("job");
    let r = on_a.next_assignment().await.job.expect("job ref");
    on_a.accept_and_start(&r).await;
    // The start is durable once its answer (protocol 1) arrives.
    let ack = on_a.next_ack().await;
    assert!(ack.accepted, "{ack:?}");
    let agent_id = on_a.agent_id.clone();

    // Replica A goes away; the agent reconnects to B, still running the job.
    a.stop().await;
    drop(on_a);
    let mut moved = hello("mover", 1);
    moved.running_jobs = vec![r.clone()];
    let mut on_b = RawAgent::connect(&b, moved).await.expect("connect to b");
    assert_eq!(on_b.agent_id, agent_id, "the same agent, found by its pool and name");
    assert_eq!(on_b.welcome.resumed_jobs, vec![r.clone()], "{:?}", on_b.welcome);
    assert!(on_b.welcome.abandoned_jobs.is_empty());

    let mut watch = watch_succeeded(&b, "resume").await;
    on_b.finish(&r, pb::JobOutcome::Succeeded, "finished after the move").await;
    let ack = on_b.next_ack().await;
    assert!(ack.accepted, "{ack:?}");
    let done = wait_for_event(&mut watch, |j| j.id == enqueued.id).await;
    assert_eq!(state(&done), pb::QueuedJobState::Succeeded);
    assert_eq!(done.attempt, 1, "the attempt was not run again");
    assert_eq!(done.fencing_token, r.fencing_token);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_left_by_a_stopped_replica_is_reaped_by_another() {
    let mut cluster = Cluster::new("reap").await;
    let a = cluster.replica().await;
    let b = cluster.replica().await;
    let mut on_a = RawAgent::connect(&a, hello("doomed", 1)).await.expect("connect to a");
    let mut q = a.queue().await;
    let request = pb::EnqueueJobRequest {
        lease_duration: Some(prost_types::Duration { seconds: 1, nanos: 0 }),
        max_attempts: 3,
        ..job("reap", "work")
    };
    let enqueued = q.enqueue_job(request).await.expect("enqueue").into_inner().job.expect("job");
    let first = on_a.next_assignment().await.job.expect("job ref");
    on_a.accept_and_start(&first).await;
    assert!(on_a.next_ack().await.accepted);
    a.stop().await;
    drop(on_a);

    // Nobody renews the lease: B reaps it and gives the job, as attempt 2
    // with a higher fencing token, to its own agent.
    let mut on_b = RawAgent::connect(&b, hello("rescuer", 1)).await.expect("connect to b");
    let second = on_b.next_assignment().await.job.expect("job ref");
    assert_eq!(second.job_id, enqueued.id);
    assert_eq!(second.attempt, 2);
    assert!(second.fencing_token > first.fencing_token);
    let reaped = get(&b, &enqueued.id).await;
    assert!(reaped.last_error.contains("lease expired"), "{}", reaped.last_error);

    // The first attempt's report is refused everywhere now.
    let mut late = hello("doomed", 1);
    late.running_jobs = vec![first.clone()];
    let zombie = RawAgent::connect(&b, late).await.expect("connect");
    assert_eq!(zombie.welcome.abandoned_jobs, vec![first.clone()]);
    let mut q = b.queue().await;
    let refused = q
        .complete_job(pb::CompleteJobRequest {
            id: first.job_id.clone(),
            attempt: first.attempt,
            fencing_token: first.fencing_token,
            result: Default::default(),
        })
        .await
        .expect_err("a stale attempt is refused");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused:?}");
}

/// Replicas' clocks differ by less than `clock_skew_tolerance`: one whose
/// clock runs ahead does not reap a dead replica's lease while it is still
/// alive by the holder's clock, and reaps it once it ended more than the
/// tolerance ago by its own. Clocks are injected; sweeps run when they move.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_clock_runs_ahead_reaps_a_lease_only_after_it_ended() {
    let skew = Duration::from_millis(1500);
    let lease = Duration::from_secs(10);
    let config = EngineConfig {
        sweep_interval: Duration::from_millis(100),
        clock_skew_tolerance: Duration::from_secs(2),
        // The agents here do not heartbeat while the clocks jump.
        heartbeat_interval: Duration::from_secs(3600),
        ..test_engine_config()
    };
    let mut cluster = Cluster::new("skew").await;
    // B's and C's clocks run 1.5 s ahead of A's.
    let a = cluster.loner_on(config.clone(), ManualClock::new(epoch())).await;
    let b = cluster.loner_on(config.clone(), ManualClock::new(epoch() + skew)).await;
    let c = cluster.loner_on(config, ManualClock::new(epoch() + skew)).await;

    let mut on_a = RawAgent::connect(&a, hello("holder", 1)).await.expect("connect to a");
    let request = pb::EnqueueJobRequest {
        lease_duration: Some(prost_types::Duration { seconds: lease.as_secs() as i64, nanos: 0 }),
        max_attempts: 3,
        ..job("skew", "held")
    };
    let held = a.queue().await.enqueue_job(request).await.expect("enqueue").into_inner().job.expect("job");
    let first = on_a.next_assignment().await.job.expect("job ref");
    assert_eq!(first.job_id, held.id);
    on_a.accept_and_start(&first).await;
    assert!(on_a.next_ack().await.accepted);
    // A dies with the lease: it ends 10 s after the claim by A's clock.
    drop(on_a);
    a.stop().await;

    let mut on_b = RawAgent::connect(&b, hello("rescuer", 1)).await.expect("connect to b");
    // A job only B's sweep can bring to B's agent: its arrival shows the
    // sweep after the jump was read and handled.
    let marker = c.queue().await.enqueue_job(job("skew", "marker")).await.expect("enqueue").into_inner().job;
    let marker = marker.expect("job");

    // 0.1 s before the lease ends (by A's clock), B's clock says 1.4 s
    // after: within the tolerance, so B leaves the lease alone.
    b.advance(lease - Duration::from_millis(100));
    let swept = on_b.next_assignment().await.job.expect("job ref");
    assert_eq!(swept.job_id, marker.id, "the sweep brought the marker, not the held job");
    let still = get(&b, &held.id).await;
    assert_eq!((state(&still), still.attempt), (pb::QueuedJobState::Running, 1), "a live lease was reaped");
    on_b.accept_and_start(&swept).await;
    assert!(on_b.next_ack().await.accepted);
    on_b.finish(&swept, pb::JobOutcome::Succeeded, "done").await;
    wait_until("the marker to succeed", || async {
        state(&get(&b, &marker.id).await) == pb::QueuedJobState::Succeeded
    })
    .await;

    // 0.9 s after it ended by A's clock (2.4 s by B's): B reaps it.
    b.advance(Duration::from_secs(1));
    wait_until("b to reap the lease", || async {
        let job = get(&b, &held.id).await;
        state(&job) == pb::QueuedJobState::Queued && job.last_error.contains("lease expired")
    })
    .await;
    // Its retry backoff runs on B's clock.
    b.advance(Duration::from_secs(10));
    let second = on_b.next_assignment().await.job.expect("job ref");
    assert_eq!((second.job_id.as_str(), second.attempt), (held.id.as_str(), 2));
    assert!(second.fencing_token > first.fencing_token);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_replica_moves_its_agents_to_another_before_it_drains() {
    let mut cluster = Cluster::new("move").await;
    let mut a = cluster.replica().await;
    let b = cluster.replica().await;
    let runs = Arc::new(Mutex::new(Vec::new()));
    let release = Arc::new(Notify::new());
    let handler = {
        let (runs, release) = (runs.clone(), release.clone());
        move |ctx: JobContext| {
            let (runs, release) = (runs.clone(), release.clone());
            async move {
                runs.lock().unwrap_or_else(|e| e.into_inner()).push((ctx.attempt(), ctx.fencing_token()));
                release.notified().await;
                JobResult::success("moved")
            }
        }
    };
    // A backoff of an hour: only a Reconnect (which moves at once to the
    // other server) gets this agent to B within the test.
    let hour = Duration::from_secs(3600);
    let patient = ReconnectPolicy { initial_backoff: hour, max_backoff: hour, ..ReconnectPolicy::default() };
    let config = AgentConfig::new(a.url.clone(), "mover")
        .with_fallback_server(b.url.clone())
        .with_slots(1)
        .with_reconnect(patient);
    let agent = Agent::new(config, handler);
    let handle = agent.handle();
    tokio::spawn(agent.run(futures::future::pending()));
    tokio::time::timeout(WAIT, handle.wait_connected()).await.expect("in time").expect("connected");
    assert_eq!(handle.server(), Some(a.url.clone()));

    let mut q = a.queue().await;
    let enqueued = q.enqueue_job(job("move", "work")).await.expect("enqueue").into_inner().job.expect("job");
    wait_until("the job to start", || async { !runs.lock().unwrap_or_else(|e| e.into_inner()).is_empty() }).await;

    // A is told to stop while the job runs: the agent moves to B at once and
    // takes its running attempt with it.
    a.begin_stop();
    tokio::time::timeout(WAIT, handle.wait_sessions(2)).await.expect("moved in time").expect("moved");
    assert_eq!(handle.server(), Some(b.url.clone()));
    a.stop().await;

    let mut watch = watch_succeeded(&b, "move").await;
    release.notify_one();
    let done = wait_for_event(&mut watch, |j| j.id == enqueued.id).await;
    assert_eq!(state(&done), pb::QueuedJobState::Succeeded);
    let runs = runs.lock().unwrap_or_else(|e| e.into_inner()).clone();
    assert_eq!(runs, vec![(1, done.fencing_token)], "one run, as attempt 1, under the token B finished it with");
    assert_eq!(done.attempt, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamodb_requests_and_retries_are_counted_by_operation_and_result() {
    let prefix = dynamodb_local::unique_prefix("counted");
    if let Err(e) = tables::create_tables(&dynamodb_local::client(), &TableNames::new(&prefix)).await {
        panic!("creating tables on DynamoDB Local: {e}");
    }
    // Every create is a transaction; the next two are throttled after they
    // applied, so the SDK retries them (and the store recognises them).
    let throttle = FaultLayer::new("TransactWriteItems", Fault::Throttled, 0);
    let client = dynamodb_local::client_with_faults(throttle.clone());
    let store = Arc::new(DynamoStore::with_client(client, &prefix));
    let dir = DataDir::new();
    let options = Options { store: Some(store), engine: Some(replica_config()), ..Options::default() };
    let server =
        TestServer::start_with(dir.path().to_path_buf(), options, Extras { metrics: true, ..Extras::default() }).await;
    throttle.arm(2);
    let mut q = server.queue().await;
    for i in 0..3 {
        q.enqueue_job(job("counted", &format!("job {i}"))).await.expect("enqueue");
    }
    assert_eq!(throttle.injected(), 2);
    // The recorder is process-wide: other tests' requests may add to these.
    let text = scrape(&server).await;
    let of = |result: &str| {
        sample(
            &text,
            &format!("tether_dynamodb_attempts_total{{operation=\"TransactWriteItems\",result=\"{result}\"}}"),
        )
        .unwrap_or(0.0)
    };
    assert!(of("throttled") >= 2.0, "{text}");
    assert!(of("ok") >= 1.0, "{text}");
    let requests = sample(&text, "tether_dynamodb_requests_total{operation=\"TransactWriteItems\"}").expect(&text);
    assert!(requests >= 3.0, "{text}");
    server.stop().await;
}

/// The event log is the store's: a watcher on replica B sees every change
/// of a job enqueued through and run on replica A, in order, and resumes on
/// A from a cursor B sent, missing nothing and repeating nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_on_one_replica_sees_jobs_enqueued_and_run_on_another() {
    let mut cluster = Cluster::new("watch").await;
    let a = cluster.replica().await;
    let b = cluster.replica().await;
    let mut agent = RawAgent::connect(&a, hello("on-a", 1)).await.expect("connect to a");
    let mut on_b = b.queue().await;
    let mut watch = on_b
        .watch_queue(pb::WatchQueueRequest { queue: "cross".into(), ..Default::default() })
        .await
        .expect("watch on b")
        .into_inner();

    let mut q = a.queue().await;
    let enqueued = q.enqueue_job(job("cross", "hello")).await.expect("enqueue on a").into_inner().job.expect("job");
    let r = agent.next_assignment().await.job.expect("job ref");
    agent.accept_and_start(&r).await;
    agent.finish(&r, pb::JobOutcome::Succeeded, "done").await;

    use pb::QueuedJobState::{Claimed, Queued, Running, Succeeded, Unspecified};
    let mut seen = Vec::new();
    while seen.last().map(|(s, _, _)| *s) != Some(Succeeded) {
        let event = tokio::time::timeout(WAIT, watch.message()).await.expect("in time").expect("ok").expect("open");
        let job = event.job.expect("job");
        assert_eq!(job.id, enqueued.id);
        let previous = pb::QueuedJobState::try_from(event.previous_state).expect("state");
        seen.push((state(&job), previous, event.cursor));
    }
    let states: Vec<_> = seen.iter().map(|(s, p, _)| (*s, *p)).collect();
    assert_eq!(
        states,
        [(Queued, Unspecified), (Claimed, Queued), (Running, Claimed), (Succeeded, Running)],
        "every change, in order"
    );
    // A cursor B sent resumes on A: after the claim, exactly the rest.
    let mut on_a = a.queue().await;
    let mut resumed = on_a
        .watch_queue(pb::WatchQueueRequest { queue: "cross".into(), cursor: seen[1].2.clone(), ..Default::default() })
        .await
        .expect("resume on a")
        .into_inner();
    for expected in [Running, Succeeded] {
        let event = tokio::time::timeout(WAIT, resumed.message()).await.expect("in time").expect("ok").expect("open");
        assert_eq!(state(&event.job.expect("job")), expected);
    }
    // Nothing twice: the next change seen is a new job's creation.
    let next = q.enqueue_job(job("cross", "again")).await.expect("enqueue").into_inner().job.expect("job");
    let event = tokio::time::timeout(WAIT, resumed.message()).await.expect("in time").expect("ok").expect("open");
    assert_eq!(event.job.expect("job").id, next.id);
}
