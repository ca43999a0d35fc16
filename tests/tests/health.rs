//! Agent health, scheduling status, pools and scaling signals, end to end
//! with a manual clock and raw protocol agents (heartbeats sent by hand).

use std::time::Duration;

use tether::v1 as pb;
use tether::v1::agent_service_client::AgentServiceClient;
use tether::v1::connect_request::Message as Up;
use tether_tests::{epoch, hello, job, wait_until, DataDir, RawAgent, TestServer};
use tonic::transport::Channel;
use tonic::Code;

// The test engine config: heartbeat interval 500 ms, so a heartbeat is
// missed 750 ms after the last one, and every 500 ms after that.
const FIRST_MISS: Duration = Duration::from_millis(800);
const NEXT_MISS: Duration = Duration::from_millis(500);

async fn get(agents: &mut AgentServiceClient<Channel>, id: &str) -> pb::Agent {
    agents.get_agent(pb::GetAgentRequest { id: id.into() }).await.expect("get agent").into_inner().agent.expect("agent")
}

async fn health_of(server: &TestServer, id: &str) -> pb::AgentHealth {
    let mut agents = server.agents().await;
    pb::AgentHealth::try_from(get(&mut agents, id).await.health).unwrap_or(pb::AgentHealth::Unspecified)
}

async fn wait_health(server: &TestServer, id: &str, want: pb::AgentHealth) {
    wait_until(&format!("agent {id} to be {want:?}"), || async { health_of(server, id).await == want }).await;
}

fn metrics(memory_share: f64) -> pb::AgentMetrics {
    pb::AgentMetrics {
        cpu_percent: 12.0,
        memory_used_bytes: (memory_share * 1000.0) as u64,
        memory_total_bytes: 1000,
        disk_used_bytes: 10,
        disk_total_bytes: 100,
        running_jobs: 0,
    }
}

async fn heartbeat(agent: &RawAgent, memory_share: f64) {
    agent
        .send(Up::Heartbeat(pb::Heartbeat {
            metrics: Some(metrics(memory_share)),
            running_jobs: vec![],
            draining: false,
        }))
        .await;
}

#[tokio::test]
async fn health_follows_heartbeats_pressure_and_the_stream() {
    let dir = DataDir::new();
    let server = TestServer::start_manual(&dir).await;
    let agent = RawAgent::connect(&server, hello("h1", 1)).await.expect("connect");
    let id = agent.agent_id.clone();
    assert_eq!(health_of(&server, &id).await, pb::AgentHealth::Registering);

    heartbeat(&agent, 0.5).await;
    wait_health(&server, &id, pb::AgentHealth::Healthy).await;

    server.advance(FIRST_MISS);
    wait_health(&server, &id, pb::AgentHealth::Degraded).await;
    let mut agents = server.agents().await;
    assert_eq!(get(&mut agents, &id).await.health_reason, "missed 1 heartbeat");
    server.advance(NEXT_MISS);
    wait_until("a second missed heartbeat", || async {
        let mut agents = server.agents().await;
        get(&mut agents, &id).await.health_reason == "missed 2 heartbeats"
    })
    .await;
    assert_eq!(health_of(&server, &id).await, pb::AgentHealth::Degraded);
    server.advance(NEXT_MISS);
    wait_health(&server, &id, pb::AgentHealth::Unhealthy).await;

    heartbeat(&agent, 0.5).await;
    wait_health(&server, &id, pb::AgentHealth::Healthy).await;
    heartbeat(&agent, 0.99).await;
    wait_health(&server, &id, pb::AgentHealth::Degraded).await;
    assert_eq!(get(&mut agents, &id).await.health_reason, "memory 99% used");

    agent.kill();
    wait_until("the stream to be gone", || async { !get(&mut server.agents().await, &id).await.connected }).await;
    server.advance(Duration::from_secs(6));
    wait_health(&server, &id, pb::AgentHealth::Offline).await;

    let gone = agents.deregister_agent(pb::DeregisterAgentRequest { id: id.clone() }).await.expect("deregister");
    assert_eq!(gone.into_inner().agent.map(|a| a.health), Some(pb::AgentHealth::Terminated as i32));
}

#[tokio::test]
async fn unhealthy_and_cordoned_agents_get_nothing() {
    let dir = DataDir::new();
    let server = TestServer::start_manual(&dir).await;
    let mut agents = server.agents().await;
    let mut healthy = RawAgent::connect(&server, hello("healthy", 4)).await.expect("connect");
    let silent = RawAgent::connect(&server, hello("silent", 4)).await.expect("connect");
    let cordoned = RawAgent::connect(&server, hello("cordoned", 4)).await.expect("connect");
    for a in [&healthy, &silent, &cordoned] {
        heartbeat(a, 0.1).await;
        wait_health(&server, &a.agent_id, pb::AgentHealth::Healthy).await;
    }
    let status = agents
        .update_agent_status(pb::UpdateAgentStatusRequest {
            id: cordoned.agent_id.clone(),
            scheduling_status: pb::AgentSchedulingStatus::Cordoned as i32,
            reason: "kernel upgrade".into(),
        })
        .await
        .expect("cordon")
        .into_inner()
        .agent
        .expect("agent");
    assert_eq!(status.scheduling_status, pb::AgentSchedulingStatus::Cordoned as i32);

    // Only `silent` misses heartbeats until it is UNHEALTHY.
    let mut elapsed = Duration::ZERO;
    for step in [FIRST_MISS, NEXT_MISS, NEXT_MISS] {
        server.advance(step);
        elapsed += step;
        for a in [&healthy, &cordoned] {
            heartbeat(a, 0.1).await;
        }
        wait_until("the heartbeats to land", || async {
            let mut agents = server.agents().await;
            let h = get(&mut agents, &healthy.agent_id).await;
            let c = get(&mut agents, &cordoned.agent_id).await;
            let now = tether::time::to_timestamp(epoch() + elapsed);
            h.last_seen_time == Some(now) && c.last_seen_time == Some(now)
        })
        .await;
    }
    wait_health(&server, &silent.agent_id, pb::AgentHealth::Unhealthy).await;
    assert_eq!(health_of(&server, &healthy.agent_id).await, pb::AgentHealth::Healthy);

    let mut q = server.queue().await;
    for i in 0..4 {
        q.enqueue_job(job("q", &format!("j{i}"))).await.expect("enqueue");
    }
    for _ in 0..4 {
        healthy.next_assignment().await;
    }
    for a in [&silent, &cordoned] {
        assert!(get(&mut agents, &a.agent_id).await.running_jobs.is_empty(), "{} got work", a.agent_id);
    }
    // A fifth job waits: the only agent taking work is full.
    let fifth = q.enqueue_job(job("q", "j4")).await.expect("enqueue").into_inner().job.expect("job");
    assert_eq!(fifth.state, pb::QueuedJobState::Queued as i32);

    // Uncordoning gives the waiting job to the now-active agent.
    let mut cordoned = cordoned;
    agents
        .update_agent_status(pb::UpdateAgentStatusRequest {
            id: cordoned.agent_id.clone(),
            scheduling_status: pb::AgentSchedulingStatus::Active as i32,
            reason: String::new(),
        })
        .await
        .expect("uncordon");
    assert_eq!(cordoned.next_assignment().await.job.map(|j| j.job_id), Some(fifth.id));
}

#[tokio::test]
async fn degraded_agents_get_work_only_when_no_healthy_one_matches() {
    let dir = DataDir::new();
    let server = TestServer::start_manual(&dir).await;
    let mut agents = server.agents().await;
    let mut healthy = RawAgent::connect(&server, hello("plain", 1)).await.expect("connect");
    let gpu_hello = pb::Hello { labels: [("gpu".into(), "yes".into())].into(), ..hello("gpu", 8) };
    let mut degraded = RawAgent::connect(&server, gpu_hello).await.expect("connect");
    heartbeat(&healthy, 0.1).await;
    heartbeat(&degraded, 0.99).await;
    wait_health(&server, &healthy.agent_id, pb::AgentHealth::Healthy).await;
    wait_health(&server, &degraded.agent_id, pb::AgentHealth::Degraded).await;

    let mut q = server.queue().await;
    let plain = q.enqueue_job(job("q", "plain")).await.expect("enqueue").into_inner().job.expect("job");
    assert_eq!(
        healthy.next_assignment().await.job.map(|j| j.job_id),
        Some(plain.id),
        "healthy first, even with fewer free slots"
    );
    let gpu_job = pb::EnqueueJobRequest {
        routing: Some(pb::Routing { pool: String::new(), required_labels: [("gpu".into(), "yes".into())].into() }),
        ..job("q", "gpu")
    };
    let gpu = q.enqueue_job(gpu_job).await.expect("enqueue").into_inner().job.expect("job");
    assert_eq!(degraded.next_assignment().await.job.map(|j| j.job_id), Some(gpu.id), "the only match, though degraded");
    // Healthy agent full: the next plain job may go to the degraded agent.
    let spill = q.enqueue_job(job("q", "spill")).await.expect("enqueue").into_inner().job.expect("job");
    assert_eq!(degraded.next_assignment().await.job.map(|j| j.job_id), Some(spill.id));
    assert_eq!(get(&mut agents, &healthy.agent_id).await.running_jobs.len(), 1);
}

#[tokio::test]
async fn unary_heartbeats_keep_leases() {
    let dir = DataDir::new();
    let server = TestServer::start_manual(&dir).await;
    let mut agents = server.agents().await;
    let registered = agents
        .register_agent(pb::RegisterAgentRequest {
            name: "unary".into(),
            pool: String::new(),
            labels: Default::default(),
            slots: 2,
        })
        .await
        .expect("register")
        .into_inner();
    assert!(registered.created);
    let id = registered.agent.expect("agent").id;
    let again = agents
        .register_agent(pb::RegisterAgentRequest {
            name: "unary".into(),
            pool: String::new(),
            labels: Default::default(),
            slots: 2,
        })
        .await
        .expect("register again")
        .into_inner();
    assert!(!again.created);

    let mut q = server.queue().await;
    let req = pb::EnqueueJobRequest {
        lease_duration: Some(tether::time::to_duration(Duration::from_secs(5))),
        ..job("q", "x")
    };
    q.enqueue_job(req).await.expect("enqueue");
    let claimed = q
        .claim_job(pb::ClaimJobRequest { worker_id: id.clone(), ..Default::default() })
        .await
        .expect("claim")
        .into_inner()
        .job
        .expect("job");
    let r = pb::JobRef { job_id: claimed.id.clone(), attempt: claimed.attempt, fencing_token: claimed.fencing_token };
    let stale = pb::JobRef { fencing_token: claimed.fencing_token + 100, ..r.clone() };
    for _ in 0..3 {
        server.advance(Duration::from_secs(4));
        let answer = agents
            .heartbeat(pb::HeartbeatRequest {
                agent_id: id.clone(),
                credential: String::new(),
                metrics: Some(metrics(0.2)),
                running_jobs: vec![r.clone(), stale.clone()],
            })
            .await
            .expect("heartbeat")
            .into_inner();
        assert_eq!(answer.abandoned_jobs, vec![stale.clone()]);
        assert!(!answer.drain);
    }
    // 12 s after the claim, a 5 s lease is alive thanks to the heartbeats.
    let job = q
        .get_queued_job(pb::GetQueuedJobRequest { id: claimed.id.clone() })
        .await
        .expect("get")
        .into_inner()
        .job
        .expect("job");
    assert_eq!((job.state, job.attempt), (pb::QueuedJobState::Claimed as i32, 1));
    assert_eq!(health_of(&server, &id).await, pb::AgentHealth::Healthy);

    let unknown = agents
        .heartbeat(pb::HeartbeatRequest { agent_id: "nobody".into(), ..Default::default() })
        .await
        .expect_err("unknown agent");
    assert_eq!(unknown.code(), Code::NotFound);
}

#[tokio::test]
async fn metrics_history_is_bounded() {
    let dir = DataDir::new();
    let server = TestServer::start_manual(&dir).await;
    let agent = RawAgent::connect(&server, hello("chatty", 1)).await.expect("connect");
    for i in 0..70 {
        heartbeat(&agent, f64::from(i) / 100.0).await;
    }
    let mut agents = server.agents().await;
    wait_until("every heartbeat to land", || async {
        get(&mut server.agents().await, &agent.agent_id).await.metrics.map(|m| m.memory_used_bytes) == Some(690)
    })
    .await;
    let a = get(&mut agents, &agent.agent_id).await;
    assert_eq!(a.metrics_history.len(), 60);
    assert_eq!(a.metrics_history.last().and_then(|s| s.metrics.as_ref()).map(|m| m.memory_used_bytes), Some(690));
}

#[tokio::test]
async fn pools_crud_and_scaling_signals() {
    let dir = DataDir::new();
    let server = TestServer::start_manual(&dir).await;
    let mut agents = server.agents().await;
    let pool = |name: &str, min: u32, max: u32| pb::AgentPool {
        name: name.into(),
        description: format!("{name} runners"),
        min_size: min,
        max_size: max,
        default_labels: [("tier".into(), name.into())].into(),
        ..Default::default()
    };
    let created = agents
        .create_agent_pool(pb::CreateAgentPoolRequest { pool: Some(pool("ci", 1, 4)) })
        .await
        .expect("create")
        .into_inner()
        .pool
        .expect("pool");
    assert_eq!((created.min_size, created.max_size, created.desired_size), (1, 4, 1));
    let dup =
        agents.create_agent_pool(pb::CreateAgentPoolRequest { pool: Some(pool("ci", 1, 4)) }).await.expect_err("dup");
    assert_eq!(dup.code(), Code::AlreadyExists);
    let bad = agents
        .create_agent_pool(pb::CreateAgentPoolRequest { pool: Some(pool("bad", 5, 3)) })
        .await
        .expect_err("min > max");
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.message().contains("min_size"), "{}", bad.message());

    // Empty pool: the minimum.
    let signal = agents
        .get_pool_scaling_signal(pb::GetPoolScalingSignalRequest { name: "ci".into() })
        .await
        .expect("signal")
        .into_inner();
    assert_eq!((signal.desired_agents, signal.current_agents, signal.queued_jobs), (1, 0, 0));

    // Busy pool: 2 agents × 2 slots, all running, 6 more waiting: 10 jobs
    // need 5 agents, clamped to max 4.
    let mut runners = Vec::new();
    for name in ["r1", "r2"] {
        let a = RawAgent::connect(&server, pb::Hello { pool: "ci".into(), ..hello(name, 2) }).await.expect("connect");
        heartbeat(&a, 0.1).await;
        wait_health(&server, &a.agent_id, pb::AgentHealth::Healthy).await;
        runners.push(a);
    }
    let labelled = get(&mut agents, &runners[0].agent_id).await;
    assert_eq!(labelled.labels.get("tier").map(String::as_str), Some("ci"), "pool default labels apply");
    let mut q = server.queue().await;
    for i in 0..10 {
        let req = pb::EnqueueJobRequest {
            routing: Some(pb::Routing { pool: "ci".into(), ..Default::default() }),
            ..job("q", &format!("c{i}"))
        };
        q.enqueue_job(req).await.expect("enqueue");
    }
    let signal = agents
        .get_pool_scaling_signal(pb::GetPoolScalingSignalRequest { name: "ci".into() })
        .await
        .expect("signal")
        .into_inner();
    assert_eq!(
        (signal.desired_agents, signal.current_agents, signal.queued_jobs, signal.running_jobs, signal.slots_per_agent),
        (4, 2, 6, 4, 2)
    );
    // Raising max lets the signal ask for all 5.
    let updated = agents
        .update_agent_pool(pb::UpdateAgentPoolRequest {
            pool: Some(pb::AgentPool { name: "ci".into(), max_size: 10, ..Default::default() }),
            update_mask: Some(prost_types::FieldMask { paths: vec!["max_size".into()] }),
        })
        .await
        .expect("update")
        .into_inner()
        .pool
        .expect("pool");
    assert_eq!((updated.max_size, updated.description.as_str()), (10, "ci runners"), "only masked fields change");
    let signal = agents
        .get_pool_scaling_signal(pb::GetPoolScalingSignalRequest { name: "ci".into() })
        .await
        .expect("signal")
        .into_inner();
    assert_eq!(signal.desired_agents, 5);
    let bad_mask = agents
        .update_agent_pool(pb::UpdateAgentPoolRequest {
            pool: Some(pb::AgentPool { name: "ci".into(), ..Default::default() }),
            update_mask: Some(prost_types::FieldMask { paths: vec!["name".into()] }),
        })
        .await
        .expect_err("name is not updatable");
    assert!(bad_mask.message().contains("update_mask.paths[0]"), "{}", bad_mask.message());

    let busy =
        agents.delete_agent_pool(pb::DeleteAgentPoolRequest { name: "ci".into() }).await.expect_err("live agents");
    assert_eq!(busy.code(), Code::FailedPrecondition);
    let default =
        agents.delete_agent_pool(pb::DeleteAgentPoolRequest { name: "default".into() }).await.expect_err("default");
    assert_eq!(default.code(), Code::FailedPrecondition);
    agents.create_agent_pool(pb::CreateAgentPoolRequest { pool: Some(pool("spare", 0, 2)) }).await.expect("create");
    agents.delete_agent_pool(pb::DeleteAgentPoolRequest { name: "spare".into() }).await.expect("delete an idle pool");
    let missing = agents.get_agent_pool(pb::GetAgentPoolRequest { name: "spare".into() }).await.expect_err("deleted");
    assert_eq!(missing.code(), Code::NotFound);
    let names: Vec<String> = agents
        .list_agent_pools(pb::ListAgentPoolsRequest::default())
        .await
        .expect("list")
        .into_inner()
        .pools
        .into_iter()
        .map(|p| p.name)
        .collect();
    assert_eq!(names, ["ci", "default"]);
}

#[tokio::test]
async fn bad_agent_input_gets_precise_statuses() {
    let dir = DataDir::new();
    let server = TestServer::start_manual(&dir).await;
    let mut agents = server.agents().await;
    let zero = agents
        .register_agent(pb::RegisterAgentRequest { name: "a".into(), slots: 0, ..Default::default() })
        .await
        .expect_err("no slots");
    assert_eq!(zero.code(), Code::InvalidArgument);
    assert!(zero.message().contains("slots"));
    let pool = agents
        .register_agent(pb::RegisterAgentRequest {
            name: "a".into(),
            slots: 1,
            pool: "nope".into(),
            ..Default::default()
        })
        .await
        .expect_err("unknown pool");
    assert_eq!(pool.code(), Code::NotFound);
    let hello_pool = RawAgent::connect(&server, pb::Hello { pool: "nope".into(), ..hello("x", 1) }).await.err();
    assert_eq!(hello_pool.map(|s| s.code()), Some(Code::NotFound));
    let versions =
        RawAgent::connect(&server, pb::Hello { min_protocol_version: 9, max_protocol_version: 10, ..hello("x", 1) })
            .await
            .err();
    assert_eq!(versions.map(|s| s.code()), Some(Code::FailedPrecondition));
    let status = agents
        .update_agent_status(pb::UpdateAgentStatusRequest {
            id: "a".into(),
            scheduling_status: 42,
            reason: String::new(),
        })
        .await
        .expect_err("unknown status");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("scheduling_status"));
    let health = agents
        .list_agents(pb::ListAgentsRequest { health: vec![17], ..Default::default() })
        .await
        .expect_err("unknown health");
    assert!(health.message().contains("health[0]"));
}
