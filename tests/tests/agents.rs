//! Agents on the Connect stream, end to end: the reference shell handler,
//! cancel, drain, a killed agent's jobs requeued with the next attempt and
//! its late result refused, and a reconnect within the grace period resuming
//! a job without running it again.

use std::sync::Arc;
use std::time::Duration;

use tether::v1 as pb;
use tether::v1::connect_response::Message as Down;
use tether_agent_sdk::shell::ShellHandler;
use tether_agent_sdk::{Agent, AgentConfig, JobContext, JobResult};
use tether_tests::{
    agent_connected, hello, job, state, wait_for_event, wait_until, DataDir, Options, RawAgent, TestServer, WAIT,
};
use tokio::sync::{mpsc, Notify};

fn spawn_agent<H: tether_agent_sdk::JobHandler>(
    server: &TestServer,
    name: &str,
    slots: u32,
    handler: H,
) -> (tether_agent_sdk::AgentHandle, tokio::task::JoinHandle<Result<(), tether_agent_sdk::AgentError>>) {
    let agent = Agent::new(AgentConfig::new(server.url.clone(), name).with_slots(slots), handler);
    let handle = agent.handle();
    let task = tokio::spawn(agent.run(futures::future::pending()));
    (handle, task)
}

#[tokio::test]
async fn shell_jobs_run_on_the_reference_handler() {
    let dir = DataDir::new();
    let server = TestServer::start(&dir, Options::default()).await;
    let (handle, _task) = spawn_agent(&server, "shell", 2, ShellHandler::default());
    tokio::time::timeout(WAIT, handle.wait_connected()).await.expect("in time").expect("connected");
    let mut q = server.queue().await;
    let mut watch = q
        .watch_queue(pb::WatchQueueRequest { queue: "sh".into(), ..Default::default() })
        .await
        .expect("watch")
        .into_inner();

    let ok = q
        .enqueue_job(job("sh", r#"{"command": "echo hi; echo oops >&2"}"#))
        .await
        .expect("enqueue")
        .into_inner()
        .job
        .expect("job");
    let done = wait_for_event(&mut watch, |j| j.id == ok.id && state(j) == pb::QueuedJobState::Succeeded).await;
    assert_eq!(String::from_utf8_lossy(&done.result).trim(), "hi");

    // A command that exits non-zero has failed: FAILED at once, one attempt
    // of the default three used, the exit code in the error.
    let bad = q.enqueue_job(job("sh", "ls /nonexistent-dir")).await.expect("enqueue").into_inner().job.expect("job");
    let failed = wait_for_event(&mut watch, |j| j.id == bad.id && state(j) == pb::QueuedJobState::Failed).await;
    assert_eq!((failed.attempt, failed.max_attempts), (1, 3));
    assert!(failed.last_error.contains("code 2"), "the exit code is reported: {}", failed.last_error);

    // A job that asks for retries of exit code 3 gets them, then is
    // dead-lettered once its attempts are spent; exit code 4 is not retried.
    let retry_policy = Some(pb::RetryPolicy { any_failure: false, exit_codes: vec![3] });
    let flaky = pb::EnqueueJobRequest { max_attempts: 2, retry_policy: retry_policy.clone(), ..job("sh", "exit 3") };
    let flaky = q.enqueue_job(flaky).await.expect("enqueue").into_inner().job.expect("job");
    let dead = wait_for_event(&mut watch, |j| j.id == flaky.id && state(j) == pb::QueuedJobState::DeadLettered).await;
    assert_eq!(dead.attempt, 2, "retried once, then dead-lettered");
    let other = pb::EnqueueJobRequest { max_attempts: 2, retry_policy, ..job("sh", "exit 4") };
    let other = q.enqueue_job(other).await.expect("enqueue").into_inner().job.expect("job");
    let failed = wait_for_event(&mut watch, |j| j.id == other.id && state(j) == pb::QueuedJobState::Failed).await;
    assert_eq!(failed.attempt, 1, "an exit code the policy does not list is not retried");
}

#[tokio::test]
async fn cancel_stops_a_running_job() {
    let dir = DataDir::new();
    let server = TestServer::start(&dir, Options::default()).await;
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel();
    let handler = move |ctx: JobContext| {
        let seen = seen_tx.clone();
        async move {
            ctx.cancelled().await;
            let _ = seen.send(ctx.job_id().to_string());
            JobResult::Cancelled
        }
    };
    let (handle, _task) = spawn_agent(&server, "canceller", 1, handler);
    tokio::time::timeout(WAIT, handle.wait_connected()).await.expect("in time").expect("connected");
    let mut q = server.queue().await;
    let mut watch = q.watch_queue(pb::WatchQueueRequest::default()).await.expect("watch").into_inner();
    let j = q.enqueue_job(job("q", "block")).await.expect("enqueue").into_inner().job.expect("job");
    wait_for_event(&mut watch, |e| e.id == j.id && state(e) == pb::QueuedJobState::Running).await;
    let cancelled = q
        .cancel_queued_job(pb::CancelQueuedJobRequest { id: j.id.clone(), reason: "stop".into() })
        .await
        .expect("cancel")
        .into_inner()
        .job
        .expect("job");
    assert_eq!(state(&cancelled), pb::QueuedJobState::Cancelled);
    let seen = tokio::time::timeout(WAIT, seen_rx.recv()).await.expect("the handler saw the cancel");
    assert_eq!(seen, Some(j.id.clone()));
    // The freed slot takes the next job.
    let next = q.enqueue_job(job("q", "next")).await.expect("enqueue").into_inner().job.expect("job");
    wait_for_event(&mut watch, |e| e.id == next.id && state(e) == pb::QueuedJobState::Running).await;
    let stored =
        q.get_queued_job(pb::GetQueuedJobRequest { id: j.id }).await.expect("get").into_inner().job.expect("job");
    assert_eq!(state(&stored), pb::QueuedJobState::Cancelled, "the late report does not overwrite the cancel");
}

#[tokio::test]
async fn drain_finishes_running_jobs_and_takes_no_new_ones() {
    let dir = DataDir::new();
    let server = TestServer::start(&dir, Options::default()).await;
    let release = Arc::new(Notify::new());
    let gate = release.clone();
    let handler = move |_ctx: JobContext| {
        let gate = gate.clone();
        async move {
            gate.notified().await;
            JobResult::success("drained")
        }
    };
    let (handle, task) = spawn_agent(&server, "drainer", 2, handler);
    let agent_id = tokio::time::timeout(WAIT, handle.wait_connected()).await.expect("in time").expect("connected");
    let mut q = server.queue().await;
    let mut watch = q.watch_queue(pb::WatchQueueRequest::default()).await.expect("watch").into_inner();
    let running = q.enqueue_job(job("q", "first")).await.expect("enqueue").into_inner().job.expect("job");
    wait_for_event(&mut watch, |e| e.id == running.id && state(e) == pb::QueuedJobState::Running).await;

    let mut agents = server.agents().await;
    let drained = agents
        .drain_agent(pb::DrainAgentRequest { id: agent_id.clone(), reason: "maintenance".into() })
        .await
        .expect("drain")
        .into_inner()
        .agent
        .expect("agent");
    assert_eq!(drained.scheduling_status, pb::AgentSchedulingStatus::Draining as i32);
    let waiting = q.enqueue_job(job("q", "second")).await.expect("enqueue").into_inner().job.expect("job");
    assert_eq!(state(&waiting), pb::QueuedJobState::Queued, "a draining agent gets no new work");

    release.notify_one();
    wait_for_event(&mut watch, |e| e.id == running.id && state(e) == pb::QueuedJobState::Succeeded).await;
    let result = tokio::time::timeout(WAIT, task).await.expect("the agent leaves after draining").expect("join");
    assert!(result.is_ok(), "{result:?}");
    let still =
        q.get_queued_job(pb::GetQueuedJobRequest { id: waiting.id }).await.expect("get").into_inner().job.expect("job");
    assert_eq!(state(&still), pb::QueuedJobState::Queued);
}

#[tokio::test]
async fn a_killed_agents_job_is_requeued_and_its_late_result_refused() {
    let dir = DataDir::new();
    let server = TestServer::start_manual(&dir).await;
    let mut q = server.queue().await;
    let mut watch = q.watch_queue(pb::WatchQueueRequest::default()).await.expect("watch").into_inner();
    let mut doomed = RawAgent::connect(&server, hello("doomed", 1)).await.expect("connect");
    let doomed_id = doomed.agent_id.clone();
    let j = q.enqueue_job(job("q", "x")).await.expect("enqueue").into_inner().job.expect("job");
    let assignment = doomed.next_assignment().await;
    let first = assignment.job.expect("job ref");
    assert_eq!((first.job_id.as_str(), first.attempt), (j.id.as_str(), 1));
    doomed.accept_and_start(&first).await;
    wait_for_event(&mut watch, |e| e.id == j.id && state(e) == pb::QueuedJobState::Running).await;

    doomed.kill();
    wait_until("the server to notice the broken stream", || async { !agent_connected(&server, &doomed_id).await })
        .await;
    server.advance(Duration::from_secs(6)); // past the 5 s reconnect grace
    let requeued = wait_for_event(&mut watch, |e| e.id == j.id && state(e) == pb::QueuedJobState::Queued).await;
    assert_eq!(requeued.attempt, 1);
    assert!(requeued.last_error.contains("lost"), "{}", requeued.last_error);

    // The agent comes back too late: its job is abandoned and its result refused.
    let mut late = RawAgent::connect(&server, pb::Hello { running_jobs: vec![first.clone()], ..hello("doomed", 1) })
        .await
        .expect("reconnect");
    assert_eq!(late.welcome.abandoned_jobs, vec![first.clone()]);
    assert!(late.welcome.resumed_jobs.is_empty());
    late.finish(&first, pb::JobOutcome::Succeeded, "late").await;
    let ack = late.next_ack().await;
    assert!(!ack.accepted, "a stale result is refused");

    // After the backoff the job runs again as attempt 2 (here on the same agent).
    server.advance(Duration::from_secs(10));
    let second = late.next_assignment().await.job.expect("job ref");
    assert_eq!((second.job_id.as_str(), second.attempt), (j.id.as_str(), 2));
    assert!(second.fencing_token > first.fencing_token);
}

#[tokio::test]
async fn a_reconnect_within_grace_resumes_without_a_rerun() {
    let dir = DataDir::new();
    let server = TestServer::start_manual(&dir).await;
    let mut q = server.queue().await;
    let mut watch = q.watch_queue(pb::WatchQueueRequest::default()).await.expect("watch").into_inner();
    let mut agent = RawAgent::connect(&server, hello("flaky-net", 1)).await.expect("connect");
    let agent_id = agent.agent_id.clone();
    let j = q.enqueue_job(job("q", "x")).await.expect("enqueue").into_inner().job.expect("job");
    let r = agent.next_assignment().await.job.expect("job ref");
    agent.accept_and_start(&r).await;
    wait_for_event(&mut watch, |e| e.id == j.id && state(e) == pb::QueuedJobState::Running).await;

    agent.kill();
    wait_until("the server to notice the broken stream", || async { !agent_connected(&server, &agent_id).await }).await;
    server.advance(Duration::from_secs(3)); // inside the 5 s grace

    let mut back = RawAgent::connect(&server, pb::Hello { running_jobs: vec![r.clone()], ..hello("flaky-net", 1) })
        .await
        .expect("reconnect");
    assert_eq!(back.agent_id, agent_id, "the same name is the same agent");
    assert_eq!(back.welcome.resumed_jobs, vec![r.clone()]);
    server.advance(Duration::from_secs(10)); // the old grace would have ended by now
    back.finish(&r, pb::JobOutcome::Succeeded, "once").await;
    let ack = back.next_ack().await;
    assert!(ack.accepted, "{}", ack.reason);
    let done = wait_for_event(&mut watch, |e| e.id == j.id && !matches!(state(e), pb::QueuedJobState::Running)).await;
    assert_eq!((state(&done), done.attempt), (pb::QueuedJobState::Succeeded, 1), "no second attempt ran");
    assert_eq!(&done.result[..], b"once");
    // Nothing else was sent to the agent: the next message it gets is a
    // fresh assignment (once a heartbeat shows it alive after the clock
    // jump).
    back.send(pb::connect_request::Message::Heartbeat(pb::Heartbeat::default())).await;
    wait_until("the agent to be healthy again", || async {
        let mut agents = server.agents().await;
        agents
            .get_agent(pb::GetAgentRequest { id: agent_id.clone() })
            .await
            .map(|r| r.into_inner().agent.is_some_and(|a| a.health == pb::AgentHealth::Healthy as i32))
            .unwrap_or(false)
    })
    .await;
    let next = q.enqueue_job(job("q", "y")).await.expect("enqueue").into_inner().job.expect("job");
    match back.next().await {
        Down::Assignment(a) => assert_eq!(a.job.map(|r| r.job_id), Some(next.id)),
        other => panic!("unexpected message {other:?}"),
    }
}

#[tokio::test]
async fn the_report_owed_after_a_cancel_is_acknowledged() {
    let dir = DataDir::new();
    let server = TestServer::start_manual(&dir).await;
    let mut q = server.queue().await;
    let mut agent = RawAgent::connect(&server, hello("obedient", 1)).await.expect("connect");
    let j = q.enqueue_job(job("q", "x")).await.expect("enqueue").into_inner().job.expect("job");
    let r = agent.next_assignment().await.job.expect("job ref");
    agent.accept_and_start(&r).await;
    assert!(agent.next_ack().await.accepted, "the start is acknowledged");
    q.cancel_queued_job(pb::CancelQueuedJobRequest { id: j.id.clone(), reason: "stop".into() }).await.expect("cancel");
    match agent.next().await {
        Down::Cancel(c) => assert_eq!(c.job, Some(r.clone())),
        other => panic!("expected a cancel, got {other:?}"),
    }
    agent.finish(&r, pb::JobOutcome::Cancelled, "").await;
    let ack = agent.next_ack().await;
    assert!(ack.accepted, "the owed report is accepted: {}", ack.reason);
    let stored =
        q.get_queued_job(pb::GetQueuedJobRequest { id: j.id }).await.expect("get").into_inner().job.expect("job");
    assert_eq!(state(&stored), pb::QueuedJobState::Cancelled);
}

#[tokio::test]
async fn protocol_v2_answers_only_refused_starts() {
    let dir = DataDir::new();
    let server = TestServer::start_manual(&dir).await;
    let mut q = server.queue().await;
    let mut watch = q.watch_queue(pb::WatchQueueRequest::default()).await.expect("watch").into_inner();
    let mut agent =
        RawAgent::connect(&server, pb::Hello { max_protocol_version: 2, ..hello("lean", 1) }).await.expect("connect");
    assert_eq!(agent.welcome.protocol_version, 2);

    // The start rides on the AssignmentAck and is not answered; the result is.
    let j = q.enqueue_job(job("q", "x")).await.expect("enqueue").into_inner().job.expect("job");
    let r = agent.next_assignment().await.job.expect("job ref");
    agent.accept_started(&r).await;
    wait_for_event(&mut watch, |e| e.id == j.id && state(e) == pb::QueuedJobState::Running).await;
    agent.finish(&r, pb::JobOutcome::Succeeded, "ok").await;
    match agent.next().await {
        Down::JobUpdateAck(ack) => assert_eq!((ack.job.as_ref(), ack.accepted), (Some(&r), true), "{ack:?}"),
        other => panic!("the first answer must be the result's ack, got {other:?}"),
    }
    wait_for_event(&mut watch, |e| e.id == j.id && state(e) == pb::QueuedJobState::Succeeded).await;

    // A start of an attempt the agent does not hold is refused, in either form.
    let stale = pb::JobRef { fencing_token: r.fencing_token + 1000, ..r.clone() };
    agent.send(pb::connect_request::Message::JobStarted(pb::JobStarted { job: Some(stale.clone()) })).await;
    let ack = agent.next_ack().await;
    assert_eq!((ack.job.as_ref(), ack.accepted), (Some(&stale), false), "{ack:?}");

    // A version 1 agent still gets every start answered.
    let mut v1 = RawAgent::connect(&server, hello("chatty", 1)).await.expect("connect");
    assert_eq!(v1.welcome.protocol_version, 1);
    let lean_id = agent.agent_id.clone();
    drop(agent);
    wait_until("the server to notice the lean agent left", || async { !agent_connected(&server, &lean_id).await })
        .await;
    let j2 = q.enqueue_job(job("q", "y")).await.expect("enqueue").into_inner().job.expect("job");
    let r2 = v1.next_assignment().await.job.expect("job ref");
    assert_eq!(r2.job_id, j2.id);
    v1.accept_and_start(&r2).await;
    let ack = v1.next_ack().await;
    assert_eq!((ack.job.as_ref(), ack.accepted), (Some(&r2), true), "{ack:?}");
}

#[tokio::test]
async fn a_start_refused_after_a_cancel_frees_the_slot() {
    let dir = DataDir::new();
    let server = TestServer::start_manual(&dir).await;
    let mut q = server.queue().await;
    let mut agent = RawAgent::connect(&server, pb::Hello { max_protocol_version: 2, ..hello("slow-starter", 1) })
        .await
        .expect("connect");
    let j1 = q.enqueue_job(job("q", "x")).await.expect("enqueue").into_inner().job.expect("job");
    let r1 = agent.next_assignment().await.job.expect("job ref");
    // Cancelled before the agent got to start it.
    q.cancel_queued_job(pb::CancelQueuedJobRequest { id: j1.id.clone(), reason: "changed my mind".into() })
        .await
        .expect("cancel");
    agent.accept_started(&r1).await;
    let ack = agent.next_ack().await;
    assert_eq!((ack.job.as_ref(), ack.accepted), (Some(&r1), false), "{ack:?}");
    // The agent stops the attempt and reports nothing more; its only slot
    // is free for the next job.
    let j2 = q.enqueue_job(job("q", "y")).await.expect("enqueue").into_inner().job.expect("job");
    let r2 = agent.next_assignment().await.job.expect("job ref");
    assert_eq!(r2.job_id, j2.id);
}

#[tokio::test]
async fn work_spreads_over_equally_free_agents() {
    // Three idle one-slot agents and jobs that arrive one at a time: each
    // agent gets one in turn, not the same agent every time.
    let dir = DataDir::new();
    let server = TestServer::start_manual(&dir).await;
    let mut agents = Vec::new();
    for name in ["spread-a", "spread-b", "spread-c"] {
        agents.push(RawAgent::connect(&server, hello(name, 1)).await.expect("connect"));
    }
    let mut q = server.queue().await;
    let mut watch = q
        .watch_queue(pb::WatchQueueRequest {
            queue: "spread".into(),
            states: vec![pb::QueuedJobState::Claimed as i32],
            ..Default::default()
        })
        .await
        .expect("watch")
        .into_inner();
    let mut takers = Vec::new();
    for round in 0..6 {
        let created = q.enqueue_job(job("spread", &format!("job {round}"))).await.expect("enqueue").into_inner();
        let id = created.job.expect("job").id;
        // The claim names the agent; that agent runs it to the end.
        let claimed = wait_for_event(&mut watch, |j| j.id == id).await;
        let i = agents.iter().position(|a| a.agent_id == claimed.worker_id).expect("one of ours");
        let r = agents[i].next_assignment().await.job.expect("job ref");
        agents[i].accept_and_start(&r).await;
        agents[i].finish(&r, pb::JobOutcome::Succeeded, "ok").await;
        loop {
            if let pb::connect_response::Message::JobUpdateAck(ack) = agents[i].next().await {
                if ack.job.as_ref() == Some(&r) && ack.accepted {
                    break;
                }
            }
        }
        takers.push(i);
    }
    let mut counts = [0; 3];
    for i in &takers {
        counts[*i] += 1;
    }
    assert_eq!(counts, [2, 2, 2], "takers in order: {takers:?}");
}

#[tokio::test]
async fn a_stopping_server_asks_protocol_3_agents_to_reconnect_and_turns_new_streams_away() {
    let dir = DataDir::new();
    let mut server = TestServer::start(&dir, Options::default()).await;
    let mut v3 = RawAgent::connect(&server, pb::Hello { max_protocol_version: 3, ..hello("current", 1) })
        .await
        .expect("protocol 3");
    assert_eq!(v3.welcome.protocol_version, 3);
    let mut v2 = RawAgent::connect(&server, pb::Hello { max_protocol_version: 2, ..hello("older", 1) })
        .await
        .expect("protocol 2");
    assert_eq!(v2.welcome.protocol_version, 2);

    server.begin_stop();
    match v3.next().await {
        Down::Reconnect(r) => assert!(r.reason.contains("stopping"), "{r:?}"),
        other => panic!("expected a Reconnect, got {other:?}"),
    }
    // While its agents move away, the server turns new streams away.
    let late = RawAgent::connect(&server, pb::Hello { max_protocol_version: 3, ..hello("late", 1) }).await;
    let refused = late.err().expect("a new stream is refused while the server stops");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("stopping"), "{refused:?}");
    // The moved agent closes its stream; the server then drains. The older
    // agent is never sent a Reconnect: its stream just ends.
    drop(v3);
    assert_eq!(v2.next_or_end().await, None, "protocol 2 gets no Reconnect");
    server.stop().await;
}
