//! DashboardService jobs end to end: a job's life through a real agent (the
//! reference shell handler) with its attempts and history, exit codes,
//! cancel pushed to the running agent, retry as a linked new job, listing
//! with filters and pages that neither skip nor repeat while jobs arrive,
//! and precise statuses for bad input. Runs on either backend
//! (`TETHER_TEST_STORE`).

use std::collections::BTreeSet;
use std::time::Duration;

use tether::time::to_timestamp;
use tether::v1 as pb;
use tether::v1::dashboard_service_client::DashboardServiceClient;
use tether_agent_sdk::shell::ShellHandler;
use tether_agent_sdk::{Agent, AgentConfig, AgentHandle};
use tether_tests::{epoch, job, wait_for_event, DataDir, Options, TestServer, WAIT};
use tonic::transport::Channel;
use tonic::Code;

const QUEUE: &str = "tether.jobs";

fn spawn_shell_agent(server: &TestServer, name: &str) -> AgentHandle {
    let agent = Agent::new(AgentConfig::new(server.url.clone(), name).with_slots(2), ShellHandler::default());
    let handle = agent.handle();
    tokio::spawn(agent.run(futures::future::pending()));
    handle
}

fn create(name: &str, command: &str) -> pb::CreateJobRequest {
    pb::CreateJobRequest { name: name.into(), command: command.into(), ..Default::default() }
}

async fn create_job(d: &mut DashboardServiceClient<Channel>, req: pb::CreateJobRequest) -> pb::Job {
    d.create_job(req).await.expect("create").into_inner().job.expect("job")
}

async fn get_job(d: &mut DashboardServiceClient<Channel>, id: &str) -> pb::Job {
    d.get_job(pb::GetJobRequest { id: id.into() }).await.expect("get").into_inner().job.expect("job")
}

/// Polls GetJob until the job has `want` (for changes a manual clock
/// makes the server do on its own: only a query shows them).
async fn wait_status(d: &DashboardServiceClient<Channel>, id: &str, want: pb::JobStatus, what: &str) {
    tether_tests::wait_until(what, || {
        let mut d = d.clone();
        let id = id.to_string();
        async move {
            d.get_job(pb::GetJobRequest { id })
                .await
                .is_ok_and(|r| r.into_inner().job.is_some_and(|j| j.status == want as i32))
        }
    })
    .await;
}

fn status(job: &pb::Job) -> pb::JobStatus {
    pb::JobStatus::try_from(job.status).unwrap_or(pb::JobStatus::Unspecified)
}

fn to_state(t: &pb::JobTransition) -> pb::QueuedJobState {
    pb::QueuedJobState::try_from(t.to_state).unwrap_or(pb::QueuedJobState::Unspecified)
}

/// Waits until the job's queued job reaches `state` (the dashboard job's
/// record changes in the same write).
async fn wait_state(
    watch: &mut tonic::Streaming<pb::WatchQueueResponse>,
    id: &str,
    state: pb::QueuedJobState,
) -> pb::QueuedJob {
    wait_for_event(watch, |j| j.id == id && j.state == state as i32).await
}

async fn watch(server: &TestServer) -> tonic::Streaming<pb::WatchQueueResponse> {
    let mut q = server.queue().await;
    q.watch_queue(pb::WatchQueueRequest { queue: QUEUE.into(), ..Default::default() })
        .await
        .expect("watch")
        .into_inner()
}

#[tokio::test]
async fn a_job_runs_on_a_real_agent_with_its_attempts_and_history() {
    let dir = DataDir::new();
    let server = TestServer::start(&dir, Options::default()).await;
    let agent = spawn_shell_agent(&server, "runner");
    let agent_id = tokio::time::timeout(WAIT, agent.wait_connected()).await.expect("in time").expect("connected");
    let mut events = watch(&server).await;
    let mut d = server.dashboard().await;

    let req = pb::CreateJobRequest {
        env: [("GREETING".to_string(), "hello".to_string())].into(),
        working_dir: "/".into(),
        requested_by: "ann".into(),
        ..create("greet", "printf '%s from %s' \"$GREETING\" \"$(pwd)\"")
    };
    let created = d.create_job(req).await.expect("create").into_inner();
    assert!(created.created);
    let job = created.job.expect("job");
    assert_eq!((job.name.as_str(), job.requested_by.as_str()), ("greet", "ann"));
    assert_eq!(job.env.get("GREETING").map(String::as_str), Some("hello"));
    assert_eq!(job.max_attempts, 3);

    let done = wait_state(&mut events, &job.id, pb::QueuedJobState::Succeeded).await;
    assert_eq!(String::from_utf8_lossy(&done.result), "hello from /", "the agent ran the command with its env and dir");
    let job = get_job(&mut d, &job.id).await;
    assert_eq!(status(&job), pb::JobStatus::Success);
    assert!(job.finish_time.is_some());
    assert_eq!(job.attempts.len(), 1);
    let attempt = &job.attempts[0];
    assert_eq!((attempt.attempt, attempt.agent_id.as_str()), (1, agent_id.as_str()));
    assert_eq!(attempt.outcome, pb::QueuedJobState::Succeeded as i32);
    assert!(attempt.claim_time.is_some() && attempt.start_time.is_some() && attempt.end_time.is_some());
    assert_eq!(attempt.exit_code, None);
    let path: Vec<_> = job.transitions.iter().map(to_state).collect();
    use pb::QueuedJobState as S;
    assert_eq!(path, [S::Queued, S::Claimed, S::Running, S::Succeeded]);
    assert_eq!(job.transitions[0].actor, "user:ann", "the creation is the requester's");
    assert_eq!(job.transitions[1].actor, "tether", "the dispatcher claimed it");
    assert_eq!(job.transitions[0].from_state, S::Unspecified as i32);
    assert_eq!(job.transitions[3].actor, format!("agent:{agent_id}"), "the result is the agent's");
    for pair in job.transitions.windows(2) {
        assert_eq!(pair[0].to_state, pair[1].from_state, "each change starts where the last ended");
    }
}

#[tokio::test]
async fn a_failed_command_keeps_its_exit_code_and_a_retry_is_a_linked_new_job() {
    let dir = DataDir::new();
    let server = TestServer::start(&dir, Options::default()).await;
    let agent = spawn_shell_agent(&server, "runner");
    tokio::time::timeout(WAIT, agent.wait_connected()).await.expect("in time").expect("connected");
    let mut events = watch(&server).await;
    let mut d = server.dashboard().await;

    let job = create_job(&mut d, create("flaky", "echo broken >&2; exit 7")).await;
    wait_state(&mut events, &job.id, pb::QueuedJobState::Failed).await;
    let failed = get_job(&mut d, &job.id).await;
    assert_eq!(status(&failed), pb::JobStatus::Failed);
    assert_eq!(failed.attempts.len(), 1, "a failed command is not retried");
    assert_eq!(failed.attempts[0].exit_code, Some(7));
    assert!(failed.attempts[0].reason.contains('7'), "{}", failed.attempts[0].reason);
    let last = failed.transitions.last().expect("transitions");
    assert_eq!((last.exit_code, to_state(last)), (Some(7), pb::QueuedJobState::Failed));

    let retried = d
        .retry_job(pb::RetryJobRequest { id: job.id.clone(), requested_by: "bob".into(), ..Default::default() })
        .await
        .expect("retry")
        .into_inner()
        .job
        .expect("job");
    assert_ne!(retried.id, job.id);
    assert_eq!(
        (retried.retry_of.as_str(), retried.requested_by.as_str(), retried.name.as_str()),
        (job.id.as_str(), "bob", "flaky")
    );
    assert_eq!(retried.command, failed.command);
    wait_state(&mut events, &retried.id, pb::QueuedJobState::Failed).await;

    // A job that has not ended cannot be retried.
    let waiting = pb::CreateJobRequest {
        routing: Some(pb::Routing { pool: String::new(), required_labels: [("os".into(), "plan9".into())].into() }),
        ..create("stuck", "true")
    };
    let waiting = create_job(&mut d, waiting).await;
    assert_eq!(status(&waiting), pb::JobStatus::Pending);
    let refused = d.retry_job(pb::RetryJobRequest { id: waiting.id, ..Default::default() }).await.expect_err("refused");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{}", refused.message());
}

#[tokio::test]
async fn cancel_reaches_the_running_agent_and_is_recorded() {
    let dir = DataDir::new();
    let server = TestServer::start(&dir, Options::default()).await;
    let agent = spawn_shell_agent(&server, "runner");
    tokio::time::timeout(WAIT, agent.wait_connected()).await.expect("in time").expect("connected");
    let mut events = watch(&server).await;
    let mut d = server.dashboard().await;

    let job = create_job(&mut d, create("long", "sleep 600")).await;
    wait_state(&mut events, &job.id, pb::QueuedJobState::Running).await;
    assert_eq!(status(&get_job(&mut d, &job.id).await), pb::JobStatus::Running);
    let cancelled = d
        .cancel_job(pb::CancelJobRequest {
            id: job.id.clone(),
            reason: "wrong branch".into(),
            requested_by: "carol".into(),
        })
        .await
        .expect("cancel")
        .into_inner()
        .job
        .expect("job");
    assert_eq!(status(&cancelled), pb::JobStatus::Cancelled);
    let last = cancelled.transitions.last().expect("transitions");
    assert_eq!((last.actor.as_str(), last.reason.as_str()), ("user:carol", "wrong branch"));
    assert_eq!(cancelled.attempts[0].outcome, pb::QueuedJobState::Cancelled as i32);

    // The agent was told: its slot frees and the next job runs at once
    // (the agent has 2 slots; one more sleeper fills the other).
    let filler = create_job(&mut d, create("filler", "sleep 600")).await;
    let next = create_job(&mut d, create("next", "true")).await;
    wait_state(&mut events, &next.id, pb::QueuedJobState::Succeeded).await;
    d.cancel_job(pb::CancelJobRequest { id: filler.id, ..Default::default() }).await.expect("cancel filler");

    let again =
        d.cancel_job(pb::CancelJobRequest { id: job.id.clone(), ..Default::default() }).await.expect_err("ended");
    assert_eq!(again.code(), Code::FailedPrecondition, "{}", again.message());
    let stored = get_job(&mut d, &job.id).await;
    assert_eq!(
        stored.transitions.last().map(|t| t.actor.as_str()),
        Some("user:carol"),
        "the late report changes nothing"
    );
}

#[tokio::test]
async fn list_jobs_filters_and_pages_without_skips_or_repeats_while_jobs_arrive() {
    let dir = DataDir::new();
    let server = TestServer::start_manual(&dir).await;
    let mut agents = server.agents().await;
    agents
        .create_agent_pool(pb::CreateAgentPoolRequest {
            pool: Some(pb::AgentPool { name: "linux".into(), ..Default::default() }),
        })
        .await
        .expect("create pool");
    let mut d = server.dashboard().await;
    let mut ann_in_linux = BTreeSet::new();
    for i in 0..45 {
        let pool = if i % 3 == 0 { "linux" } else { "default" };
        let requester = if i % 2 == 0 { "ann" } else { "bob" };
        let req = pb::CreateJobRequest {
            requested_by: requester.into(),
            routing: Some(pb::Routing { pool: pool.into(), ..Default::default() }),
            ..create(&format!("job-{i}"), "true")
        };
        let job = create_job(&mut d, req).await;
        if pool == "linux" && requester == "ann" {
            ann_in_linux.insert(job.id);
        }
        server.advance(Duration::from_secs(1));
    }
    // Nobody enqueues into the dashboard's queue by hand (its payloads
    // name sealed secrets, its idempotency keys deployments).
    let refused = server.queue().await.enqueue_job(job(QUEUE, "by hand")).await.expect_err("reserved");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused:?}");
    let batch = pb::BatchEnqueueJobsRequest { requests: vec![job("q", "fine"), job("tether.other", "no")] };
    let refused = server.queue().await.batch_enqueue_jobs(batch).await.expect_err("reserved");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(refused.message().contains("requests[1].queue"), "{}", refused.message());

    let filter =
        pb::ListJobsRequest { pool: "linux".into(), requested_by: "ann".into(), page_size: 3, ..Default::default() };
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = d
            .list_jobs(pb::ListJobsRequest { page_token: token.clone(), ..filter.clone() })
            .await
            .expect("list")
            .into_inner();
        assert!(page.jobs.len() <= 3);
        for j in &page.jobs {
            assert_eq!((j.routing.as_ref().map(|r| r.pool.as_str()), j.requested_by.as_str()), (Some("linux"), "ann"));
        }
        seen.extend(page.jobs.into_iter().map(|j| (j.create_time.map(|t| t.seconds), j.id)));
        // Jobs that arrive while paging sort before the first page.
        let req = pb::CreateJobRequest {
            requested_by: "ann".into(),
            routing: Some(pb::Routing { pool: "linux".into(), ..Default::default() }),
            ..create("late", "true")
        };
        create_job(&mut d, req).await;
        pages += 1;
        assert!(pages < 50, "the listing ends");
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let ids: Vec<_> = seen.iter().map(|(_, id)| id.clone()).collect();
    let unique: BTreeSet<_> = ids.iter().cloned().collect();
    assert_eq!(unique.len(), ids.len(), "no job is listed twice");
    assert_eq!(unique, ann_in_linux, "every matching job that existed is listed, and only those");
    let times: Vec<_> = seen.iter().map(|(t, _)| *t).collect();
    assert!(times.windows(2).all(|w| w[0] >= w[1]), "newest first: {times:?}");

    // Status and creation-time filters.
    let pending = pb::ListJobsRequest {
        statuses: vec![pb::JobStatus::Pending as i32],
        create_time_after: Some(to_timestamp(epoch() + Duration::from_secs(40))),
        create_time_before: Some(to_timestamp(epoch() + Duration::from_secs(43))),
        ..Default::default()
    };
    let page = d.list_jobs(pending).await.expect("list").into_inner();
    let names: Vec<_> = page.jobs.iter().map(|j| j.name.as_str()).collect();
    assert_eq!(names, ["job-42", "job-41", "job-40"]);
    let none = pb::ListJobsRequest { statuses: vec![pb::JobStatus::Success as i32], ..Default::default() };
    assert!(d.list_jobs(none).await.expect("list").into_inner().jobs.is_empty());
}

#[tokio::test]
async fn bad_requests_get_precise_statuses() {
    let dir = DataDir::new();
    let server = TestServer::start_manual(&dir).await;
    let mut d = server.dashboard().await;
    let code = |r: Result<tonic::Response<pb::GetJobResponse>, tonic::Status>| r.expect_err("refused").code();

    assert_eq!(code(d.get_job(pb::GetJobRequest { id: "nope".into() }).await), Code::NotFound);
    assert_eq!(code(d.get_job(pb::GetJobRequest { id: String::new() }).await), Code::InvalidArgument);
    let queued = server.queue().await.enqueue_job(job("q", "x")).await.expect("enqueue").into_inner().job.expect("job");
    let not_dashboard = d.get_job(pb::GetJobRequest { id: queued.id.clone() }).await.expect_err("not a dashboard job");
    assert_eq!(not_dashboard.code(), Code::NotFound);
    assert!(not_dashboard.message().contains("dashboard job"), "{}", not_dashboard.message());
    let cancel = d.cancel_job(pb::CancelJobRequest { id: queued.id, ..Default::default() }).await.expect_err("refused");
    assert_eq!(cancel.code(), Code::NotFound);

    let unknown_pool = pb::CreateJobRequest {
        routing: Some(pb::Routing { pool: "nowhere".into(), ..Default::default() }),
        ..create("x", "true")
    };
    let refused = d.create_job(unknown_pool).await.expect_err("unknown pool");
    assert_eq!(refused.code(), Code::NotFound);
    assert!(refused.message().contains("routing.pool"), "{}", refused.message());
    for (req, field) in [
        (create("", "true"), "name"),
        (create("x", ""), "command"),
        (pb::CreateJobRequest { max_attempts: 1000, ..create("x", "true") }, "max_attempts"),
        (pb::CreateJobRequest { priority: 42, ..create("x", "true") }, "priority"),
        (
            pb::CreateJobRequest {
                timeout: Some(prost_types::Duration { seconds: -1, nanos: 0 }),
                ..create("x", "true")
            },
            "timeout",
        ),
        (pb::CreateJobRequest { command: "x".repeat(70_000), ..create("x", "") }, "command"),
    ] {
        let refused = d.create_job(req).await.expect_err("invalid");
        assert_eq!(refused.code(), Code::InvalidArgument, "{field}: {}", refused.message());
        assert_eq!(tether_tests::violated_fields(&refused), [field], "{}", refused.message());
    }
    for statuses in [vec![0], vec![99], vec![1, 2, 3, 4, 5, 1]] {
        let refused = d.list_jobs(pb::ListJobsRequest { statuses, ..Default::default() }).await.expect_err("invalid");
        assert_eq!(refused.code(), Code::InvalidArgument, "{}", refused.message());
    }
    let foreign = pb::ListJobsRequest { page_token: "bm9wZQ".into(), ..Default::default() };
    assert_eq!(d.list_jobs(foreign).await.expect_err("foreign token").code(), Code::InvalidArgument);
    // A queue listing's token is not a dashboard listing's.
    let mut q = server.queue().await;
    for _ in 0..2 {
        q.enqueue_job(job("q", "y")).await.expect("enqueue");
    }
    let queue_page =
        q.list_queued_jobs(pb::ListQueuedJobsRequest { page_size: 1, ..Default::default() }).await.expect("list");
    let token = queue_page.into_inner().next_page_token;
    assert!(!token.is_empty());
    let crossed = pb::ListJobsRequest { page_token: token, ..Default::default() };
    assert_eq!(d.list_jobs(crossed).await.expect_err("a queue token").code(), Code::InvalidArgument);

    // Idempotency: the same request returns the same job; another request
    // with the key is refused.
    let keyed = pb::CreateJobRequest { idempotency_key: "k1".into(), ..create("x", "true") };
    let first = d.create_job(keyed.clone()).await.expect("create").into_inner();
    let again = d.create_job(keyed.clone()).await.expect("create").into_inner();
    assert!(first.created && !again.created);
    assert_eq!(first.job.map(|j| j.id), again.job.map(|j| j.id));
    let other = pb::CreateJobRequest { command: "false".into(), ..keyed };
    assert_eq!(d.create_job(other).await.expect_err("key taken").code(), Code::AlreadyExists);
}

#[tokio::test]
async fn dashboard_jobs_survive_a_restart() {
    let dir = DataDir::new();
    let id = {
        let server = TestServer::start_manual(&dir).await;
        let mut d = server.dashboard().await;
        let req = pb::CreateJobRequest { requested_by: "ann".into(), ..create("kept", "make") };
        let job = create_job(&mut d, req).await;
        server.stop().await;
        job.id
    };
    let server = TestServer::start_manual(&dir).await;
    let mut d = server.dashboard().await;
    let job = get_job(&mut d, &id).await;
    assert_eq!((job.name.as_str(), job.command.as_str(), job.requested_by.as_str()), ("kept", "make", "ann"));
    assert_eq!(job.transitions.len(), 1);
}

fn pending(job: &pb::Job) -> (pb::WaitKind, pb::PendingReason) {
    let reason = job.pending_reason.clone().expect("a pending job says why it waits");
    (pb::WaitKind::try_from(reason.kind).unwrap_or(pb::WaitKind::Unspecified), reason)
}

#[tokio::test]
async fn a_pending_job_says_why_it_waits() {
    let dir = DataDir::new();
    let server = TestServer::start_manual(&dir).await;
    let mut d = server.dashboard().await;

    let first = create_job(&mut d, create("first", "true")).await;
    let (kind, reason) = pending(&get_job(&mut d, &first.id).await);
    assert_eq!(kind, pb::WaitKind::NoAgentInPool);
    assert_eq!(reason.summary, "no agent of pool \"default\" is connected");
    assert_eq!(reason.jobs_ahead, Some(0));

    // One agent with one slot takes the first job; the next waits for it.
    let mut raw = tether_tests::hello("linux-1", 1);
    raw.labels = [("os".to_string(), "linux".to_string())].into();
    let mut agent = tether_tests::RawAgent::connect(&server, raw).await.expect("connect");
    let assignment = agent.next_assignment().await;
    assert_eq!(assignment.job.as_ref().map(|r| r.job_id.as_str()), Some(first.id.as_str()));
    let second = create_job(&mut d, create("second", "true")).await;
    let third = create_job(&mut d, create("third", "true")).await;
    let (kind, reason) = pending(&get_job(&mut d, &third.id).await);
    assert_eq!(kind, pb::WaitKind::AgentsBusy);
    assert_eq!((reason.matching_agents, reason.busy_slots, reason.total_slots), (1, 1, 1));
    assert_eq!(reason.jobs_ahead, Some(1), "the second job is ahead of it");
    assert_eq!(pending(&get_job(&mut d, &second.id).await).1.jobs_ahead, Some(0));

    // Labels no agent has are named.
    let gpu = pb::CreateJobRequest {
        routing: Some(pb::Routing {
            pool: String::new(),
            required_labels: [("os".to_string(), "linux".to_string()), ("gpu".to_string(), "a100".to_string())].into(),
        }),
        ..create("gpu", "true")
    };
    let gpu = create_job(&mut d, gpu).await;
    let (kind, reason) = pending(&get_job(&mut d, &gpu.id).await);
    assert_eq!(kind, pb::WaitKind::NoAgentWithLabels);
    assert_eq!(reason.missing_labels, [("gpu".to_string(), "a100".to_string())].into());
    assert_eq!(reason.pool_agents, 1);

    // A cordoned agent takes no work.
    let mut agents = server.agents().await;
    agents
        .update_agent_status(pb::UpdateAgentStatusRequest {
            id: agent.agent_id.clone(),
            scheduling_status: pb::AgentSchedulingStatus::Cordoned as i32,
            reason: "maintenance".into(),
        })
        .await
        .expect("cordon");
    let (kind, reason) = pending(&get_job(&mut d, &second.id).await);
    assert_eq!(kind, pb::WaitKind::AgentsUnavailable);
    assert_eq!(reason.cordoned_agents, 1);
    assert!(reason.summary.contains("1 cordoned"), "{}", reason.summary);

    // The agent goes away and its grace ends: the first job's lost attempt
    // is retried after a backoff, until a time it names.
    let agent_id = agent.agent_id.clone();
    agent.kill();
    tether_tests::wait_until("the agent is seen gone", || async {
        !tether_tests::agent_connected(&server, &agent_id).await
    })
    .await;
    server.advance(Duration::from_secs(6));
    wait_status(&d, &first.id, pb::JobStatus::Pending, "the lost attempt is requeued").await;
    let requeued = get_job(&mut d, &first.id).await;
    let (kind, reason) = pending(&requeued);
    assert_eq!(kind, pb::WaitKind::RetryBackoff, "{}", reason.summary);
    assert!(reason.wait_until.is_some());
    assert_eq!(reason.jobs_ahead, None, "not dispatchable yet");
    assert_eq!(requeued.attempts[0].outcome, pb::QueuedJobState::Queued as i32);
    assert_eq!(requeued.transitions.last().map(|t| t.actor.as_str()), Some("tether"), "the server requeued it");
    // Ended and running jobs carry no pending reason.
    d.cancel_job(pb::CancelJobRequest { id: third.id.clone(), ..Default::default() }).await.expect("cancel");
    assert!(get_job(&mut d, &third.id).await.pending_reason.is_none());
}

#[tokio::test]
async fn a_job_whose_attempts_are_lost_ends_failed_and_can_only_be_retried() {
    let dir = DataDir::new();
    let server = TestServer::start_manual(&dir).await;
    let mut d = server.dashboard().await;
    let mut q = server.queue().await;
    let job = create_job(&mut d, pb::CreateJobRequest { max_attempts: 1, ..create("lost", "true") }).await;
    let claimed = q
        .claim_job(pb::ClaimJobRequest { worker_id: "w1".into(), queue: QUEUE.into(), ..Default::default() })
        .await
        .expect("claim")
        .into_inner()
        .job
        .expect("a job");
    assert_eq!(claimed.id, job.id);
    // Its lease runs out: the one attempt is lost and the job dead-lettered.
    // (Past the lease and the tolerated clock skew of a shared store.)
    server.advance(Duration::from_secs(40));
    wait_status(&d, &job.id, pb::JobStatus::Failed, "the lease expires").await;
    let failed = get_job(&mut d, &job.id).await;
    assert_eq!(failed.queued_state, pb::QueuedJobState::DeadLettered as i32);
    assert_eq!(failed.attempts.len(), 1);
    assert_eq!(failed.attempts[0].outcome, pb::QueuedJobState::DeadLettered as i32);
    let ends = failed.transitions.last().expect("transitions");
    assert_eq!((ends.actor.as_str(), ends.attempt), ("tether", 1), "the server ended it");
    assert_eq!(failed.transitions[1].actor, "worker:w1", "the worker claimed it");

    // FAILED has ended: cancel is refused, retry is not; a repeated retry
    // with its idempotency key gives the same new job.
    // (On a shared store the reaping write can still be committing when
    // GetJob reads it: the cancel is then UNAVAILABLE, retryable.)
    let deadline = tokio::time::Instant::now() + WAIT;
    let refused = loop {
        let err =
            d.cancel_job(pb::CancelJobRequest { id: job.id.clone(), ..Default::default() }).await.expect_err("ended");
        if err.code() != Code::Unavailable || tokio::time::Instant::now() > deadline {
            break err;
        }
        tokio::task::yield_now().await;
    };
    assert_eq!(refused.code(), Code::FailedPrecondition, "{}", refused.message());
    // Nor is it redriven behind the dashboard's back (a retry would run too).
    let redrive =
        q.redrive_dead_letter(pb::RedriveDeadLetterRequest { id: job.id.clone() }).await.expect_err("refused");
    assert_eq!(redrive.code(), Code::FailedPrecondition, "{}", redrive.message());
    let retry = pb::RetryJobRequest { id: job.id.clone(), idempotency_key: "again-1".into(), ..Default::default() };
    let first = d.retry_job(retry.clone()).await.expect("retry").into_inner();
    let second = d.retry_job(retry).await.expect("retry").into_inner();
    assert!(first.created && !second.created);
    assert_eq!(first.job.map(|j| j.id), second.job.map(|j| j.id));

    // A key repeated with another name or requester is another request.
    let keyed = pb::CreateJobRequest { idempotency_key: "k".into(), ..create("one", "true") };
    d.create_job(keyed.clone()).await.expect("create");
    let renamed = pb::CreateJobRequest { name: "two".into(), ..keyed.clone() };
    assert_eq!(d.create_job(renamed).await.expect_err("taken").code(), Code::AlreadyExists);
    let other_requester = pb::CreateJobRequest { requested_by: "eve".into(), ..keyed };
    assert_eq!(d.create_job(other_requester).await.expect_err("taken").code(), Code::AlreadyExists);
}

async fn next_log(stream: &mut tonic::Streaming<pb::StreamJobLogsResponse>) -> Option<pb::StreamJobLogsResponse> {
    tokio::time::timeout(WAIT, stream.message()).await.expect("a log message in time").expect("log stream ok")
}

#[tokio::test]
async fn logs_are_followed_live_resumed_from_a_cursor_and_filtered() {
    let dir = DataDir::new();
    let server = TestServer::start(&dir, Options::default()).await;
    let agent = spawn_shell_agent(&server, "runner");
    tokio::time::timeout(WAIT, agent.wait_connected()).await.expect("in time").expect("connected");
    let mut d = server.dashboard().await;
    let gate = tempfile::tempdir().expect("tempdir");
    let release = gate.path().join("go");
    // The job prints, then waits for the test, then prints more: a follower
    // must see the first line while the job still runs.
    let command = format!(
        "echo first; echo 'warn: early' >&2; while [ ! -e {} ]; do sleep 0.01; done; echo second; echo 'warn: late'",
        release.display()
    );
    let job = create_job(&mut d, create("talker", &command)).await;
    let follow = pb::StreamJobLogsRequest { id: job.id.clone(), follow: true, ..Default::default() };
    let mut live = d.stream_job_logs(follow.clone()).await.expect("follow").into_inner();
    let mut seen = String::new();
    let mut last_cursor = String::new();
    while !seen.contains("first") {
        let chunk = next_log(&mut live).await.expect("the job still runs: the stream is open");
        assert_eq!(chunk.attempt, 1);
        seen.push_str(&String::from_utf8_lossy(&chunk.data));
        last_cursor = chunk.cursor;
    }
    assert_eq!(status(&get_job(&mut d, &job.id).await), pb::JobStatus::Running, "output arrives before the job ends");
    // A second follower starts from the cursor the first one holds, then the
    // job goes on; the first follower disconnects.
    let mut resumed = d
        .stream_job_logs(pb::StreamJobLogsRequest { cursor: last_cursor.clone(), ..follow.clone() })
        .await
        .expect("resume")
        .into_inner();
    drop(live);
    std::fs::write(&release, b"").expect("release the job");
    let mut rest = Vec::new();
    while let Some(chunk) = next_log(&mut resumed).await {
        rest.push(chunk);
    }
    let rest_text: String = rest.iter().map(|c| String::from_utf8_lossy(&c.data).into_owned()).collect();
    assert!(rest_text.contains("second") && rest_text.contains("warn: late"), "{rest_text:?}");
    assert!(!rest_text.contains("first"), "nothing before the cursor is sent again: {rest_text:?}");
    assert_eq!(status(&get_job(&mut d, &job.id).await), pb::JobStatus::Success, "the stream ended with the job");

    // The whole history without follow: every chunk once, offsets adding up.
    let all: Vec<_> = {
        let mut s = d
            .stream_job_logs(pb::StreamJobLogsRequest { id: job.id.clone(), ..Default::default() })
            .await
            .expect("history")
            .into_inner();
        let mut v = Vec::new();
        while let Some(chunk) = next_log(&mut s).await {
            v.push(chunk);
        }
        v
    };
    let mut expected_offset = 0;
    for chunk in &all {
        assert_eq!(chunk.offset, expected_offset);
        expected_offset += chunk.data.len() as u64;
        assert!(chunk.receive_time.is_some());
    }
    let text: String = all.iter().map(|c| String::from_utf8_lossy(&c.data).into_owned()).collect();
    for line in ["first", "warn: early", "second", "warn: late"] {
        assert_eq!(text.matches(line).count(), 1, "{line} once in {text:?}");
    }
    assert!(all.iter().any(|c| c.stream == pb::LogStream::Stderr as i32));

    // Filtered: only the lines with the text, with their offsets.
    let filtered = pb::StreamJobLogsRequest { id: job.id.clone(), filter: "warn:".into(), ..Default::default() };
    let mut s = d.stream_job_logs(filtered).await.expect("filtered").into_inner();
    let mut lines = Vec::new();
    while let Some(chunk) = next_log(&mut s).await {
        assert_eq!(chunk.line_offsets.len(), String::from_utf8_lossy(&chunk.data).matches("warn:").count());
        for at in &chunk.line_offsets {
            let at = *at as usize;
            assert!(text.as_bytes()[at..].starts_with(b"warn:"), "offset {at} starts a matching line");
        }
        lines.push(String::from_utf8_lossy(&chunk.data).into_owned());
    }
    assert_eq!(lines.concat(), "warn: early\nwarn: late\n");

    // Bad requests.
    let unknown = d.stream_job_logs(pb::StreamJobLogsRequest { id: "nope".into(), ..Default::default() }).await;
    assert_eq!(unknown.err().map(|e| e.code()), Some(Code::NotFound));
    let foreign = pb::StreamJobLogsRequest { id: job.id.clone(), cursor: "bm9wZQ".into(), ..Default::default() };
    assert_eq!(d.stream_job_logs(foreign).await.err().map(|e| e.code()), Some(Code::InvalidArgument));
    let long = pb::StreamJobLogsRequest { id: job.id.clone(), filter: "x".repeat(2000), ..Default::default() };
    assert_eq!(d.stream_job_logs(long).await.err().map(|e| e.code()), Some(Code::InvalidArgument));
}

#[tokio::test]
async fn output_past_the_cap_is_cut_with_one_marker() {
    let dir = DataDir::new();
    let engine =
        tether_server::engine::EngineConfig { max_job_output_bytes: 100, ..tether_tests::test_engine_config() };
    let server = TestServer::start(&dir, Options { engine: Some(engine), ..Options::default() }).await;
    let agent = spawn_shell_agent(&server, "runner");
    tokio::time::timeout(WAIT, agent.wait_connected()).await.expect("in time").expect("connected");
    let mut events = watch(&server).await;
    let mut d = server.dashboard().await;
    // 30 lines of 10 bytes, well past the 100-byte cap.
    let job = create_job(&mut d, create("loud", "for i in $(seq 1 30); do echo 'line-0000'; done")).await;
    wait_state(&mut events, &job.id, pb::QueuedJobState::Succeeded).await;
    let mut s = d
        .stream_job_logs(pb::StreamJobLogsRequest { id: job.id.clone(), ..Default::default() })
        .await
        .expect("logs")
        .into_inner();
    let mut text = String::new();
    while let Some(chunk) = next_log(&mut s).await {
        text.push_str(&String::from_utf8_lossy(&chunk.data));
    }
    let (kept, marker) = text.split_once("\n[tether: output truncated").expect("the marker");
    assert_eq!(kept.len(), 100, "exactly the cap is kept before the marker: {text:?}");
    assert!(kept.starts_with("line-0000\nline-0000"), "{kept:?}");
    assert_eq!(text.matches("output truncated").count(), 1, "one marker: {text:?}");
    assert!(marker.contains("cap of 100 bytes"), "{marker:?}");
    assert_eq!(status(&get_job(&mut d, &job.id).await), pb::JobStatus::Success, "the job itself is unaffected");
}

#[tokio::test]
async fn a_follower_ends_with_a_job_that_ends_without_more_output() {
    let dir = DataDir::new();
    let server = TestServer::start(&dir, Options::default()).await;
    let agent = spawn_shell_agent(&server, "runner");
    tokio::time::timeout(WAIT, agent.wait_connected()).await.expect("in time").expect("connected");
    let mut d = server.dashboard().await;
    let gate = tempfile::tempdir().expect("tempdir");
    let release = gate.path().join("go");
    let command = format!("echo hello; while [ ! -e {} ]; do sleep 0.01; done", release.display());
    let job = create_job(&mut d, create("quiet-end", &command)).await;
    let follow = pb::StreamJobLogsRequest { id: job.id.clone(), follow: true, ..Default::default() };
    let mut live = d.stream_job_logs(follow).await.expect("follow").into_inner();
    let first = next_log(&mut live).await.expect("the first line while the job runs");
    assert_eq!(&first.data[..], b"hello\n");
    std::fs::write(&release, b"").expect("release the job");
    // The job ends with no more output: the stream must end with it.
    assert!(next_log(&mut live).await.is_none(), "the stream ends when the job does");
    assert_eq!(status(&get_job(&mut d, &job.id).await), pb::JobStatus::Success);
}
