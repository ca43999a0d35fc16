//! WatchEvents end to end: job, deployment and agent changes through a real
//! agent, each once and in order; a watcher that resumes from any cursor
//! gets exactly the rest; an expired cursor gets a reset; a quiet stream
//! gets keep-alives; bad requests get precise statuses. Runs on either
//! backend (`TETHER_TEST_STORE`).

use std::collections::BTreeMap;
use std::time::Duration;

use tether::v1 as pb;
use tether::v1::dashboard_service_client::DashboardServiceClient;
use tether_agent_sdk::shell::ShellHandler;
use tether_agent_sdk::{Agent, AgentConfig, AgentHandle};
use tether_tests::{epoch, DataDir, Options, TestServer, WAIT};
use tonic::transport::Channel;
use tonic::{Code, Streaming};

use pb::watch_events_response::Event;

type Dashboard = DashboardServiceClient<Channel>;

/// Keep-alives every second: a quiet stream shows one soon.
fn engine() -> tether_server::engine::EngineConfig {
    tether_server::engine::EngineConfig {
        watch_keep_alive: Duration::from_secs(1),
        ..tether_tests::test_engine_config()
    }
}

async fn spawn_agent(server: &TestServer, name: &str) -> AgentHandle {
    let config = AgentConfig::new(server.url.clone(), name.to_string()).with_slots(2);
    let agent = Agent::new(config, ShellHandler::default());
    let handle = agent.handle();
    tokio::spawn(agent.run(futures::future::pending()));
    tokio::time::timeout(WAIT, handle.wait_connected()).await.expect("in time").expect("connected");
    handle
}

async fn watch(d: &mut Dashboard, kinds: &[pb::EventKind], cursor: &str) -> Streaming<pb::WatchEventsResponse> {
    let request = pb::WatchEventsRequest { kinds: kinds.iter().map(|k| *k as i32).collect(), cursor: cursor.into() };
    d.watch_events(request).await.expect("watch").into_inner()
}

async fn next(watch: &mut Streaming<pb::WatchEventsResponse>) -> pb::WatchEventsResponse {
    tokio::time::timeout(WAIT, watch.message())
        .await
        .expect("a message in time")
        .expect("watch ok")
        .expect("watch open")
}

/// The next change, past keep-alives.
async fn next_change(watch: &mut Streaming<pb::WatchEventsResponse>) -> pb::WatchEventsResponse {
    loop {
        let message = next(watch).await;
        if !matches!(message.event, Some(Event::KeepAlive(_))) {
            return message;
        }
    }
}

/// A change's identity: what it is about and what it says, without times.
fn key(message: &pb::WatchEventsResponse) -> String {
    match &message.event {
        Some(Event::Job(j)) => {
            format!("job {} {}->{} attempt {}", j.job_id, j.previous_queued_state, j.queued_state, j.attempt)
        }
        Some(Event::Deployment(d)) => format!("deployment {} {}->{}", d.deployment_id, d.from_state, d.to_state),
        Some(Event::Agent(a)) => {
            let agent = a.agent.as_ref().expect("agent");
            format!(
                "agent {} {}/{} -> {}/{}",
                agent.id, a.previous_health, a.previous_scheduling_status, agent.health, agent.scheduling_status
            )
        }
        other => format!("{other:?}"),
    }
}

/// Each job's, deployment's and agent's changes form one chain: every
/// change starts where the one before it ended. A change missed or sent
/// twice breaks it.
fn assert_chained(messages: &[pb::WatchEventsResponse]) {
    let mut jobs: BTreeMap<String, i32> = BTreeMap::new();
    let mut deployments: BTreeMap<String, i32> = BTreeMap::new();
    let mut agents: BTreeMap<String, (i32, i32)> = BTreeMap::new();
    for m in messages {
        match &m.event {
            Some(Event::Job(j)) => {
                let before = jobs.insert(j.job_id.clone(), j.queued_state).unwrap_or(0);
                assert_eq!(j.previous_queued_state, before, "job chain broken at {}", key(m));
            }
            Some(Event::Deployment(d)) => {
                let before = deployments.insert(d.deployment_id.clone(), d.to_state).unwrap_or(0);
                assert_eq!(d.from_state, before, "deployment chain broken at {}", key(m));
            }
            Some(Event::Agent(a)) => {
                let agent = a.agent.as_ref().expect("agent");
                let now = (agent.health, agent.scheduling_status);
                let before = agents.insert(agent.id.clone(), now).unwrap_or((0, 0));
                assert_eq!(
                    (a.previous_health, a.previous_scheduling_status),
                    before,
                    "agent chain broken at {}",
                    key(m)
                );
            }
            other => panic!("not a change: {other:?}"),
        }
    }
}

/// Each subject's changes, in the order they came.
fn by_subject(messages: &[pb::WatchEventsResponse]) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for m in messages {
        let subject = match &m.event {
            Some(Event::Job(j)) => format!("job {}", j.job_id),
            Some(Event::Deployment(d)) => format!("deployment {}", d.deployment_id),
            Some(Event::Agent(a)) => format!("agent {}", a.agent.as_ref().map_or("", |x| x.id.as_str())),
            other => panic!("not a change: {other:?}"),
        };
        out.entry(subject).or_default().push(key(m));
    }
    out
}

fn succeeded_deployment(m: &pb::WatchEventsResponse) -> bool {
    matches!(&m.event, Some(Event::Deployment(d)) if d.to_state == pb::DeploymentState::Succeeded as i32)
}

#[tokio::test]
async fn job_deployment_and_agent_changes_arrive_once_in_order_and_a_resumed_watcher_gets_exactly_the_rest() {
    let dir = DataDir::new();
    let server = TestServer::start(&dir, Options { engine: Some(engine()), ..Default::default() }).await;
    let mut d = server.dashboard().await;
    let mut all = watch(&mut d, &[], "").await;
    let agent = spawn_agent(&server, "watched").await;
    let env = pb::PutEnvironmentRequest { name: "staging".into(), pool: "default".into(), ..Default::default() };
    d.put_environment(env).await.expect("environment");
    let job = d
        .create_job(pb::CreateJobRequest { name: "build".into(), command: "echo built".into(), ..Default::default() })
        .await
        .expect("create")
        .into_inner()
        .job
        .expect("job");
    let rollout = pb::RolloutSpec { command: "echo deployed".into(), ..Default::default() };
    let deployment = d
        .create_deployment(pb::CreateDeploymentRequest {
            service: "api".into(),
            version: "1.0".into(),
            environment: "staging".into(),
            rollout: Some(rollout),
            requested_by: "ann".into(),
            reason: "ship".into(),
        })
        .await
        .expect("deploy")
        .into_inner()
        .deployment
        .expect("deployment");

    // Until the job and the deployment both succeeded.
    let success = pb::QueuedJobState::Succeeded as i32;
    let mut seen = Vec::new();
    while !(seen.iter().any(|m: &pb::WatchEventsResponse| {
        matches!(&m.event, Some(Event::Job(j)) if j.job_id == job.id && j.queued_state == success)
    }) && seen.iter().any(succeeded_deployment))
    {
        seen.push(next_change(&mut all).await);
    }
    assert_chained(&seen);
    let keys: Vec<String> = seen.iter().map(key).collect();
    // The agent registered, with its id.
    let registered = seen.iter().find_map(|m| match &m.event {
        Some(Event::Agent(a)) if a.previous_health == 0 => a.agent.clone(),
        _ => None,
    });
    assert_eq!(registered.map(|a| a.name), Some("watched".to_string()), "{keys:#?}");
    // The job went from its creation to success, with its statuses.
    let job_statuses: Vec<i32> = seen
        .iter()
        .filter_map(|m| match &m.event {
            Some(Event::Job(j)) if j.job_id == job.id => Some(j.status),
            _ => None,
        })
        .collect();
    assert_eq!(job_statuses.first(), Some(&(pb::JobStatus::Pending as i32)), "{keys:#?}");
    assert_eq!(job_statuses.last(), Some(&(pb::JobStatus::Success as i32)), "{keys:#?}");
    // The deployment's whole path, as its audit trail holds it.
    let path: Vec<(i32, i32)> = seen
        .iter()
        .filter_map(|m| match &m.event {
            Some(Event::Deployment(e)) if e.deployment_id == deployment.id => Some((e.from_state, e.to_state)),
            _ => None,
        })
        .collect();
    use pb::DeploymentState as S;
    let ran = [
        (S::Unspecified, S::Pending),
        (S::Pending, S::Queued),
        (S::Queued, S::InProgress),
        (S::InProgress, S::Succeeded),
    ];
    assert_eq!(path, ran.map(|(a, b)| (a as i32, b as i32)), "{keys:#?}");
    // No secrets, no job other than dashboard jobs: a plain queued job
    // enqueued now is not sent.
    let mut q = server.queue().await;
    q.enqueue_job(tether_tests::job("plain", "x")).await.expect("enqueue");

    // From every cursor, a new watcher gets exactly the changes after it,
    // each subject's in the same order (the order across subjects is not
    // promised: a live stream sends each log's changes as they come).
    for from in [0, 1, seen.len() / 2, seen.len() - 1] {
        let mut resumed = watch(&mut d, &[], &seen[from].cursor).await;
        let mut got = Vec::new();
        while got.len() < seen.len() - from - 1 {
            got.push(next_change(&mut resumed).await);
        }
        assert_eq!(by_subject(&got), by_subject(&seen[from + 1..]), "resumed after message {from}");
    }
    // Nothing more happened to jobs and deployments: past the last change
    // only keep-alives come (agents are left out: a loaded machine may
    // change their health at any time), and the keep-alive's cursor
    // resumes with nothing missed.
    let mut tail = watch(&mut d, &[pb::EventKind::Job, pb::EventKind::Deployment], &seen[seen.len() - 1].cursor).await;
    let quiet = next(&mut tail).await;
    assert!(matches!(quiet.event, Some(Event::KeepAlive(_))), "{:?}", key(&quiet));
    let mut after_quiet = watch(&mut d, &[pb::EventKind::Agent], &quiet.cursor).await;
    agent.drain();
    let mut agent_changes = Vec::new();
    loop {
        let m = next_change(&mut after_quiet).await;
        let draining = matches!(&m.event, Some(Event::Agent(a))
            if a.agent.as_ref().is_some_and(|x| x.scheduling_status == pb::AgentSchedulingStatus::Draining as i32));
        agent_changes.push(m);
        if draining {
            break;
        }
    }
    let mut chained: Vec<_> = seen.iter().filter(|m| matches!(m.event, Some(Event::Agent(_)))).cloned().collect();
    chained.extend(agent_changes);
    assert_chained(&chained);
}

/// Whether the message is an agent now in `health`, after another health.
fn agent_became(m: &pb::WatchEventsResponse, health: pb::AgentHealth) -> bool {
    matches!(&m.event, Some(Event::Agent(a))
        if a.previous_health != 0 && a.agent.as_ref().is_some_and(|x| x.health == health as i32))
}

#[tokio::test]
async fn an_agent_connected_when_the_server_stopped_keeps_one_chain_across_the_restart() {
    let dir = DataDir::new();
    let options = Options { engine: Some(engine()), ..Default::default() };
    let server = TestServer::start(&dir, options.clone()).await;
    let mut d = server.dashboard().await;
    let mut w = watch(&mut d, &[pb::EventKind::Agent], "").await;
    let agent = tether_tests::RawAgent::connect(&server, tether_tests::hello("restarted", 1)).await.expect("connect");
    let registered = next_change(&mut w).await;
    drop(w);
    // Its stream ends as the server stops (within the reconnect grace, so
    // it is not marked offline before).
    drop(agent);
    server.stop().await;
    let server = TestServer::start(&dir, options).await;
    let mut d = server.dashboard().await;
    let mut w = watch(&mut d, &[pb::EventKind::Agent], &registered.cursor).await;
    let again = tether_tests::RawAgent::connect(&server, tether_tests::hello("restarted", 1)).await.expect("connect");
    again.send(pb::connect_request::Message::Heartbeat(pb::Heartbeat::default())).await;
    let mut all = vec![registered];
    loop {
        let m = next_change(&mut w).await;
        let back = agent_became(&m, pb::AgentHealth::Healthy);
        all.push(m);
        if back {
            break;
        }
    }
    // Each change starts where the one before ended, across the restart.
    assert_chained(&all);
    let keys: Vec<String> = all.iter().map(key).collect();
    let offline = all.iter().any(|m| agent_became(m, pb::AgentHealth::Offline));
    match tether_tests::backend() {
        // This process owned the store: its agents went offline with it.
        tether_tests::Backend::Embedded => assert!(offline, "{keys:#?}"),
        // Replicas share it: another replica may hold the agent, so a
        // restarted one does not say it is offline.
        tether_tests::Backend::Dynamodb => assert!(!offline, "{keys:#?}"),
    }
}

#[tokio::test]
async fn kinds_filter_what_is_sent() {
    let dir = DataDir::new();
    let server = TestServer::start(&dir, Options { engine: Some(engine()), ..Default::default() }).await;
    let mut d = server.dashboard().await;
    let mut jobs_only = watch(&mut d, &[pb::EventKind::Job], "").await;
    let mut agents_only = watch(&mut d, &[pb::EventKind::Agent], "").await;
    let _agent = spawn_agent(&server, "filtered").await;
    let job = d
        .create_job(pb::CreateJobRequest { name: "n".into(), command: "true".into(), ..Default::default() })
        .await
        .expect("create")
        .into_inner()
        .job
        .expect("job");
    let first_job = next_change(&mut jobs_only).await;
    assert!(matches!(&first_job.event, Some(Event::Job(j)) if j.job_id == job.id), "{}", key(&first_job));
    let first_agent = next_change(&mut agents_only).await;
    assert!(matches!(&first_agent.event, Some(Event::Agent(_))), "{}", key(&first_agent));
    // Each keeps to its kind until the job ended.
    loop {
        let m = next_change(&mut jobs_only).await;
        let Some(Event::Job(j)) = &m.event else { panic!("{}", key(&m)) };
        if j.status == pb::JobStatus::Success as i32 {
            break;
        }
    }
}

#[tokio::test]
async fn an_expired_cursor_gets_a_reset_then_the_present() {
    let dir = DataDir::new();
    let clock = tether_server::clock::ManualClock::new(epoch());
    let engine = tether_server::engine::EngineConfig {
        event_retention: Duration::from_secs(60),
        event_trim_interval: Duration::from_secs(1),
        ..engine()
    };
    let options = Options { clock: Some(clock.clone()), engine: Some(engine), ..Default::default() };
    let server = TestServer::start(&dir, options).await;
    let mut d = server.dashboard().await;
    let mut w = watch(&mut d, &[pb::EventKind::Job], "").await;
    let create = |name: &str| pb::CreateJobRequest { name: name.into(), command: "true".into(), ..Default::default() };
    d.create_job(create("old")).await.expect("create");
    d.create_job(create("older")).await.expect("create");
    let old_cursor = next_change(&mut w).await.cursor;
    drop(w);
    // Past the retention the retention task trims them; the cursor is then
    // answered with a reset, never with a silent skip.
    clock.advance(Duration::from_secs(120));
    let deadline = tokio::time::Instant::now() + WAIT;
    let (reset, mut after) = loop {
        let mut w = watch(&mut d, &[pb::EventKind::Job], &old_cursor).await;
        let first = next(&mut w).await;
        if matches!(first.event, Some(Event::Reset(_))) {
            break (first, w);
        }
        assert!(tokio::time::Instant::now() < deadline, "the events were never trimmed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let Some(Event::Reset(why)) = &reset.event else { unreachable!() };
    assert!(why.reason.contains("retention"), "{why:?}");
    // The stream goes on from the present: the next job is the next change.
    let new = d.create_job(create("new")).await.expect("create").into_inner().job.expect("job");
    let m = next_change(&mut after).await;
    assert!(matches!(&m.event, Some(Event::Job(j)) if j.job_id == new.id), "{}", key(&m));
    // And the reset's cursor resumes there too.
    let mut from_reset = watch(&mut d, &[pb::EventKind::Job], &reset.cursor).await;
    let m = next_change(&mut from_reset).await;
    assert!(matches!(&m.event, Some(Event::Job(j)) if j.job_id == new.id), "{}", key(&m));
}

#[tokio::test]
async fn bad_watch_requests_get_precise_statuses() {
    let dir = DataDir::new();
    let server = TestServer::start(&dir, Options { engine: Some(engine()), ..Default::default() }).await;
    let mut d = server.dashboard().await;
    let mut q = server.queue().await;
    // A WatchQueue cursor is another log's layout.
    let mut wq = q.watch_queue(pb::WatchQueueRequest::default()).await.expect("watch queue").into_inner();
    q.enqueue_job(tether_tests::job("q", "1")).await.expect("enqueue");
    let queue_cursor = wq.message().await.expect("ok").expect("open").cursor;
    let cases: Vec<(&str, pb::WatchEventsRequest, &str)> = vec![
        ("unspecified kind", pb::WatchEventsRequest { kinds: vec![0], ..Default::default() }, "kinds[0]"),
        ("unknown kind", pb::WatchEventsRequest { kinds: vec![1, 99], ..Default::default() }, "kinds[1]"),
        ("too many kinds", pb::WatchEventsRequest { kinds: vec![1, 2, 3, 1], ..Default::default() }, "kinds"),
        ("garbage cursor", pb::WatchEventsRequest { cursor: "garbage!".into(), ..Default::default() }, "cursor"),
        ("WatchQueue cursor", pb::WatchEventsRequest { cursor: queue_cursor, ..Default::default() }, "cursor"),
        ("huge cursor", pb::WatchEventsRequest { cursor: "A".repeat(100_000), ..Default::default() }, "cursor"),
    ];
    for (what, request, field) in cases {
        let status = d.watch_events(request).await.expect_err(what);
        assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
        assert_eq!(tether_tests::violated_fields(&status), [field], "{what}: {status:?}");
    }
    // A cursor ahead of the log (a valid one of this layout, moved on).
    let present = next(&mut watch(&mut d, &[], "").await).await.cursor;
    let ahead = tether_server::grpc::event_cursor::decode("c", &present).expect("decode").expect("cursor");
    let ahead = tether_server::store::EventCursor { positions: ahead.positions.iter().map(|p| p + 1000).collect() };
    let request =
        pb::WatchEventsRequest { cursor: tether_server::grpc::event_cursor::encode(&ahead), ..Default::default() };
    let status = d.watch_events(request).await.expect_err("ahead");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
}
