//! Regression tests for defects found by trying the server as a hostile
//! client would: out-of-range times, jobs stored before limits existed,
//! agents acting on other agents' jobs, protocol errors mid-stream, events
//! that were not state changes, refused streams nobody saw, an engine that
//! died and left a zombie.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use prost::Message;
use tether::v1 as pb;
use tether::v1::connect_request::Message as Up;
use tether::v1::connect_response::Message as Down;
use tether_server::domain::{Job, JobSpec, Priority, RetryPolicy, Routing};
use tether_server::store::embedded::{EmbeddedOptions, EmbeddedStore};
use tether_server::store::hooked::{HookedStore, WriteHook};
use tether_server::store::{Store, StoreResult, Write, WriteOutcome};
use tether_tests::{
    epoch, hello, job, sample, scrape, state, violated_fields, wait_for_event, DataDir, Extras, Options, RawAgent,
    RawCodec, TestServer, WAIT,
};
use tonic::Code;

fn invalid(status: &tonic::Status, field: &str) {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(violated_fields(status), vec![field.to_string()], "{status:?}");
}

async fn get(server: &TestServer, id: &str) -> pb::QueuedJob {
    let mut q = server.queue().await;
    q.get_queued_job(pb::GetQueuedJobRequest { id: id.into() }).await.expect("get").into_inner().job.expect("job")
}

#[tokio::test]
async fn out_of_range_times_are_refused_with_the_field_named() {
    let dir = DataDir::new();
    let server = TestServer::start_manual(&dir).await;
    let mut q = server.queue().await;
    // The poison pill: a timeout no clock can add.
    let d = |seconds| Some(prost_types::Duration { seconds, nanos: 0 });
    for (timeout, why) in [(i64::MAX, "i64::MAX"), (1_000_000_000_000_000, "10^15 s"), (30 * 24 * 3600 + 1, "31 days")]
    {
        let err = q.enqueue_job(pb::EnqueueJobRequest { timeout: d(timeout), ..job("huge", "x") }).await;
        invalid(&err.expect_err(why), "timeout");
    }
    let err = q.enqueue_job(pb::EnqueueJobRequest { lease_duration: d(i64::MIN), ..job("huge", "x") }).await;
    invalid(&err.expect_err("negative lease"), "lease_duration");
    let ts = |seconds, nanos| Some(prost_types::Timestamp { seconds, nanos });
    for (not_before, why) in [(ts(1 << 62, 0), "2^62 s"), (ts(253_402_300_800, 0), "year 10000"), (ts(0, -1), "nanos")]
    {
        let err = q.enqueue_job(pb::EnqueueJobRequest { not_before, ..job("huge", "x") }).await;
        invalid(&err.expect_err(why), "not_before");
    }
    let err = q.renew_lease(pb::RenewLeaseRequest {
        id: "j".into(),
        attempt: 1,
        fencing_token: 1,
        lease_duration: d(i64::MAX),
    });
    invalid(&err.await.expect_err("renew"), "lease_duration");
    let batch = pb::BatchEnqueueJobsRequest {
        requests: vec![job("huge", "ok"), pb::EnqueueJobRequest { timeout: d(i64::MAX), ..job("huge", "x") }],
    };
    invalid(&q.batch_enqueue_jobs(batch).await.expect_err("batch"), "requests[1].timeout");

    // Inside the ranges: the longest timeout, the last valid instant, and a
    // time before 1970 (in the past: dispatchable now).
    for req in [
        pb::EnqueueJobRequest { timeout: d(30 * 24 * 3600), ..job("huge", "long") },
        pb::EnqueueJobRequest { not_before: ts(253_402_300_799, 999_999_999), ..job("huge", "late") },
        pb::EnqueueJobRequest { not_before: ts(-62_135_596_800, 0), ..job("huge", "early") },
    ] {
        q.enqueue_job(req).await.expect("in range");
    }
    // And the engine still dispatches: two ready jobs, one far in the future.
    let worker = |n: &str| pb::ClaimJobRequest { worker_id: n.into(), queue: "huge".into(), ..Default::default() };
    for n in ["a", "b"] {
        let claimed = q.claim_job(worker(n)).await.expect("claim").into_inner().job.expect("a ready job");
        assert_eq!(state(&claimed), pb::QueuedJobState::Claimed);
    }
    assert!(q.claim_job(worker("c")).await.expect("claim").into_inner().job.is_none(), "not before year 9999");
}

/// A job as an older release would have stored it, with no limit checked.
fn stored_job(id: &str, seq: u64, queue: &str) -> Job {
    let spec = JobSpec {
        queue: queue.into(),
        payload: Bytes::from_static(b"{\"command\":\"true\"}"),
        priority: Priority::Normal,
        routing: Routing { pool: "default".into(), required_labels: Default::default() },
        max_attempts: 3,
        lease_duration: Duration::from_secs(30),
        timeout: None,
        idempotency_key: None,
        not_before: None,
        retry: RetryPolicy::default(),
    };
    let mut job = Job::new(id.into(), seq, spec, epoch());
    job.version = 1;
    job
}

#[tokio::test]
async fn stored_poison_pills_are_quarantined_and_every_listing_renders() {
    let dir = DataDir::new();
    {
        let store = EmbeddedStore::open(dir.path(), EmbeddedOptions::default()).expect("open");
        let mut timeout = stored_job("poison-timeout", 1, "poison");
        timeout.spec.timeout = Some(Duration::from_secs(i64::MAX as u64));
        let mut ready = stored_job("poison-ready", 2, "poison");
        ready.ready_time = SystemTime::UNIX_EPOCH + Duration::from_secs(1 << 62);
        let mut created = stored_job("poison-created", 3, "poison");
        created.create_time = SystemTime::UNIX_EPOCH + Duration::from_secs(1 << 62);
        let good = stored_job("good", 4, "poison");
        // Never claimed: found by a listing.
        let mut listed = stored_job("poison-listed", 5, "listed");
        listed.spec.lease_duration = Duration::from_secs(u64::MAX / 4);
        let writes = [timeout, ready, created, good, listed].into_iter().map(Write::create).collect();
        let outcomes = store.write(writes).await.expect("write");
        assert!(outcomes.iter().all(|o| *o == WriteOutcome::Applied));
    }
    let server = TestServer::start_manual(&dir).await;
    let mut q = server.queue().await;
    // Claims skip (and quarantine) what cannot be dispatched.
    let claim = || pb::ClaimJobRequest { worker_id: "w".into(), queue: "poison".into(), ..Default::default() };
    let claimed = q.claim_job(claim()).await.expect("claim").into_inner().job.expect("the good job");
    assert_eq!(claimed.id, "good");
    assert!(q.claim_job(claim()).await.expect("claim again").into_inner().job.is_none());
    for id in ["poison-timeout", "poison-ready", "poison-created"] {
        let j = get(&server, id).await;
        assert_eq!(state(&j), pb::QueuedJobState::DeadLettered, "{id}");
        assert!(j.last_error.starts_with("quarantined"), "{id}: {}", j.last_error);
    }
    // A redrive cannot put a quarantined job back in the queue.
    let redrive = q.redrive_dead_letter(pb::RedriveDeadLetterRequest { id: "poison-timeout".into() }).await;
    assert_eq!(redrive.expect_err("still defective").code(), Code::FailedPrecondition);
    // Every listed job has in-range times, so any client can render it.
    let listed = q.list_queued_jobs(pb::ListQueuedJobsRequest::default()).await.expect("list").into_inner().jobs;
    assert_eq!(listed.len(), 5);
    // Reading a defective queued job quarantines it too.
    tether_tests::wait_until("the listed poison pill is quarantined", || async {
        state(&get(&server, "poison-listed").await) == pb::QueuedJobState::DeadLettered
    })
    .await;
    for j in &listed {
        let times = [&j.create_time, &j.update_time, &j.ready_time, &j.lease_expire_time, &j.finish_time];
        for t in times.into_iter().flatten() {
            assert!(tether::time::timestamp_in(t).is_ok(), "{}: {t:?}", j.id);
        }
        for d in [&j.timeout, &j.lease_duration].into_iter().flatten() {
            assert!(tether::time::duration_in(d).is_ok(), "{}: {d:?}", j.id);
        }
    }
    // A restart finds nothing to fail on.
    server.stop().await;
    let server = TestServer::start_manual(&dir).await;
    let mut q = server.queue().await;
    q.enqueue_job(job("poison", "after")).await.expect("serving after a restart");
}

/// Two raw agents: `a` holds a running job that `b` cannot match.
async fn two_agents(server: &TestServer) -> (RawAgent, RawAgent, pb::JobRef) {
    let mut a_hello = hello("a", 1);
    a_hello.labels.insert("only".into(), "a".into());
    let mut a = RawAgent::connect(server, a_hello).await.expect("a connects");
    let b = RawAgent::connect(server, hello("b", 1)).await.expect("b connects");
    let mut q = server.queue().await;
    let routing = pb::Routing { pool: String::new(), required_labels: [("only".into(), "a".into())].into() };
    q.enqueue_job(pb::EnqueueJobRequest { routing: Some(routing), ..job("owned", "x") }).await.expect("enqueue");
    let assignment = a.next_assignment().await;
    let r = assignment.job.expect("job ref");
    a.accept_and_start(&r).await;
    assert!(matches!(a.next().await, Down::JobUpdateAck(ack) if ack.accepted), "v1 answers the start");
    (a, b, r)
}

#[tokio::test]
async fn an_agent_cannot_act_on_another_agents_job() {
    let dir = DataDir::new();
    let server = TestServer::start_manual(&dir).await;
    let (mut a, mut b, r) = two_agents(&server).await;
    let before = get(&server, &r.job_id).await;
    assert_eq!((state(&before), before.worker_id.as_str()), (pb::QueuedJobState::Running, a.agent_id.as_str()));

    // Every message kind that names a job, sent by B with A's full JobRef
    // (readable through GetQueuedJob).
    let ack = |accepted, started| {
        Up::AssignmentAck(pb::AssignmentAck { job: Some(r.clone()), accepted, started, reason: "mine now".into() })
    };
    b.send(ack(false, false)).await;
    b.send(ack(true, true)).await;
    b.send(Up::JobStarted(pb::JobStarted { job: Some(r.clone()) })).await;
    b.send(Up::JobProgress(pb::JobProgress { job: Some(r.clone()), percent: 50.0, message: "b".into() })).await;
    let log = pb::JobLog {
        job: Some(r.clone()),
        stream: pb::LogStream::Stdout as i32,
        data: "b wrote".into(),
        ..Default::default()
    };
    b.send(Up::JobLog(log)).await;
    b.send(Up::Heartbeat(pb::Heartbeat { running_jobs: vec![r.clone()], ..Default::default() })).await;
    for outcome in [pb::JobOutcome::FailedPermanent, pb::JobOutcome::Succeeded, pb::JobOutcome::Cancelled] {
        b.finish(&r, outcome, "forged").await;
    }
    // B's start and its three results are refused; nothing else is
    // answered. The last answer comes after every earlier message of B was
    // handled and committed.
    let mut refusals = 0;
    while refusals < 4 {
        match b.next().await {
            Down::JobUpdateAck(ack) => {
                assert!(!ack.accepted, "{ack:?}");
                assert!(ack.reason.contains("not assigned to this agent"), "{}", ack.reason);
                refusals += 1;
            }
            Down::Assignment(a) => panic!("B was given the job: {a:?}"),
            _ => {}
        }
    }
    let after = get(&server, &r.job_id).await;
    assert_eq!(state(&after), pb::QueuedJobState::Running);
    assert_eq!(
        (after.attempt, after.fencing_token, after.worker_id.as_str()),
        (r.attempt, r.fencing_token, a.agent_id.as_str())
    );
    assert_eq!(after.lease_expire_time, before.lease_expire_time, "B's heartbeat renewed nothing");

    // A's own result is the one that counts.
    a.finish(&r, pb::JobOutcome::Succeeded, "real").await;
    loop {
        if let Down::JobUpdateAck(ack) = a.next().await {
            assert!(ack.accepted, "{ack:?}");
            break;
        }
    }
    let done = get(&server, &r.job_id).await;
    assert_eq!((state(&done), &done.result[..]), (pb::QueuedJobState::Succeeded, &b"real"[..]));
    drop((a, b));
    server.stop().await;
    // B's log chunk was not stored. (The store is free once the last
    // session task, ending with its connection, lets go of it.)
    let deadline = tokio::time::Instant::now() + WAIT;
    let store = loop {
        match EmbeddedStore::open(dir.path(), EmbeddedOptions::default()) {
            Ok(store) => break store,
            Err(e) => assert!(tokio::time::Instant::now() < deadline, "reopen: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(store.logs(&r.job_id, r.attempt).await.expect("logs").is_empty());
}

#[tokio::test]
async fn a_jobref_must_match_whole_not_by_token_alone() {
    let dir = DataDir::new();
    let server = TestServer::start_manual(&dir).await;
    let (mut a, _b, r) = two_agents(&server).await;
    // A itself names its token with another attempt or another job: refused.
    for forged in [
        pb::JobRef { attempt: r.attempt + 1, ..r.clone() },
        pb::JobRef { job_id: "some-other-job".into(), ..r.clone() },
    ] {
        a.finish(&forged, pb::JobOutcome::Succeeded, "forged").await;
        loop {
            if let Down::JobUpdateAck(ack) = a.next().await {
                assert!(!ack.accepted, "{forged:?}: {ack:?}");
                break;
            }
        }
    }
    assert_eq!(state(&get(&server, &r.job_id).await), pb::QueuedJobState::Running);
}

/// Opens a raw Connect stream, sends a hello then `frames` (each a message
/// body, sent as it is), then half-closes if `close`, and returns the
/// messages received and how the stream ended.
async fn raw_connect(
    server: &TestServer,
    frames: Vec<Bytes>,
    close: bool,
) -> (Vec<pb::ConnectResponse>, tonic::Status) {
    let channel = server.channel().await;
    let mut grpc = tonic::client::Grpc::new(channel).max_encoding_message_size(64 << 20);
    grpc.ready().await.expect("ready");
    let hello = pb::ConnectRequest { message: Some(Up::Hello(hello("raw", 1))) }.encode_to_vec();
    let sent = futures::stream::iter(std::iter::once(Bytes::from(hello)).chain(frames));
    // Kept open unless asked: the server's status, not our close, ends it.
    let outbound = if close { sent.boxed() } else { sent.chain(futures::stream::pending()).boxed() };
    let path = http::uri::PathAndQuery::from_static("/tether.v1.AgentService/Connect");
    let mut inbound =
        grpc.streaming(tonic::Request::new(outbound), path, RawCodec).await.expect("connect").into_inner();
    let mut received = Vec::new();
    loop {
        match tokio::time::timeout(WAIT, inbound.message()).await.expect("an answer in time") {
            Ok(Some(bytes)) => received.push(pb::ConnectResponse::decode(bytes).expect("a response")),
            Ok(None) => return (received, tonic::Status::ok("")),
            Err(status) => return (received, status),
        }
    }
}

fn frame(message: Up) -> Bytes {
    pb::ConnectRequest { message: Some(message) }.encode_to_vec().into()
}

#[tokio::test]
async fn protocol_errors_end_the_stream_with_their_own_status() {
    let dir = DataDir::new();
    let server = TestServer::start_manual(&dir).await;
    let r = pb::JobRef { job_id: "j".into(), attempt: 1, fencing_token: 1 };
    let log = |data: usize, stream: i32| {
        frame(Up::JobLog(pb::JobLog {
            job: Some(r.clone()),
            stream,
            data: vec![b'x'; data].into(),
            ..Default::default()
        }))
    };
    let cases: Vec<(&str, Bytes, Code, Option<&str>)> = vec![
        ("a 5 MiB message", log(5 << 20, 1), Code::ResourceExhausted, None),
        ("an undecodable frame", Bytes::from_static(&[0x0a, 0xff, 0xff, 0xff]), Code::Internal, None),
        ("a 65 KiB log chunk", log(65 << 10, 1), Code::InvalidArgument, Some("job_log.data")),
        ("an unknown log stream", log(1, 99), Code::InvalidArgument, Some("job_log.stream")),
        ("a second hello", frame(Up::Hello(hello("raw", 1))), Code::InvalidArgument, Some("hello")),
        ("an empty message", Bytes::new(), Code::InvalidArgument, None),
        (
            "attempt 0",
            frame(Up::JobStarted(pb::JobStarted { job: Some(pb::JobRef { attempt: 0, ..r.clone() }) })),
            Code::InvalidArgument,
            Some("job_started.job.attempt"),
        ),
    ];
    for (what, bad, code, field) in cases {
        let (received, status) = raw_connect(&server, vec![bad], false).await;
        assert!(matches!(received.first().and_then(|m| m.message.as_ref()), Some(Down::Welcome(_))), "{what}");
        assert_eq!(status.code(), code, "{what}: {status:?}");
        if let Some(field) = field {
            assert_eq!(violated_fields(&status), vec![field.to_string()], "{what}: {status:?}");
        }
    }
    // A clean close still ends with OK, and the server still serves.
    let (_, status) = raw_connect(&server, vec![frame(Up::Heartbeat(Default::default()))], true).await;
    assert_eq!(status.code(), Code::Ok, "{status:?}");
    let mut q = server.queue().await;
    q.enqueue_job(job("q", "still serving")).await.expect("serving");
}

#[tokio::test]
async fn watch_events_are_state_changes_only() {
    let dir = DataDir::new();
    let server = TestServer::start_manual(&dir).await;
    let mut q = server.queue().await;
    let mut watch = q
        .watch_queue(pb::WatchQueueRequest { queue: "w".into(), ..Default::default() })
        .await
        .expect("watch")
        .into_inner();
    let created = q.enqueue_job(job("w", "x")).await.expect("enqueue").into_inner().job.expect("job");
    let c = q
        .claim_job(pb::ClaimJobRequest { worker_id: "w".into(), queue: "w".into(), ..Default::default() })
        .await
        .expect("claim")
        .into_inner()
        .job
        .expect("claimed");
    for _ in 0..3 {
        let renew = pb::RenewLeaseRequest {
            id: c.id.clone(),
            attempt: 1,
            fencing_token: c.fencing_token,
            lease_duration: None,
        };
        q.renew_lease(renew).await.expect("renew");
    }
    let complete =
        pb::CompleteJobRequest { id: c.id.clone(), attempt: 1, fencing_token: c.fencing_token, result: Bytes::new() };
    q.complete_job(complete).await.expect("complete");
    let mut seen = Vec::new();
    loop {
        let event = tokio::time::timeout(WAIT, watch.message()).await.expect("in time").expect("ok").expect("open");
        let job = event.job.expect("job");
        assert_eq!(job.id, created.id);
        assert_ne!(event.previous_state, job.state, "an event is a change");
        seen.push((event.previous_state, job.state));
        if state(&job) == pb::QueuedJobState::Succeeded {
            break;
        }
    }
    use pb::QueuedJobState as S;
    assert_eq!(
        seen,
        vec![
            (S::Unspecified as i32, S::Queued as i32),
            (S::Queued as i32, S::Claimed as i32),
            (S::Claimed as i32, S::Succeeded as i32)
        ]
    );
}

#[tokio::test]
async fn refused_agent_streams_are_counted() {
    let dir = DataDir::new();
    let options = Options { max_agent_streams: Some(1), ..Options::default() };
    let server =
        TestServer::start_with(dir.path().to_path_buf(), options, Extras { metrics: true, ..Default::default() }).await;
    let before = sample(&scrape(&server).await, "tether_agent_streams_refused_total").unwrap_or(0.0);
    let _first = RawAgent::connect(&server, hello("first", 1)).await.expect("the first stream");
    let refused = RawAgent::connect(&server, hello("second", 1)).await.err().expect("refused");
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(refused.message().contains("maximum of 1 agent streams"), "{}", refused.message());
    let after = sample(&scrape(&server).await, "tether_agent_streams_refused_total");
    assert_eq!(after, Some(before + 1.0));
}

/// Panics in the commit of the batch after it is armed.
#[derive(Clone, Default)]
struct PanicOnCommit(Arc<AtomicBool>);

#[async_trait]
impl WriteHook for PanicOnCommit {
    async fn write(&self, inner: &dyn Store, batch: Vec<Write>) -> StoreResult<Vec<WriteOutcome>> {
        if self.0.load(Ordering::SeqCst) {
            panic!("injected panic in a commit");
        }
        inner.write(batch).await
    }
}

#[tokio::test]
async fn an_engine_that_dies_stops_the_server_instead_of_leaving_a_zombie() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let dir = DataDir::new();
    let hook = PanicOnCommit::default();
    let store = HookedStore {
        inner: EmbeddedStore::open(dir.path(), EmbeddedOptions::default()).expect("open"),
        hook: hook.clone(),
    };
    let options = Options { store: Some(Arc::new(store)), ..Options::default() };
    let server = TestServer::start(&dir, options).await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(server.channel().await);
    let mut statuses = health
        .watch(tonic_health::pb::HealthCheckRequest { service: String::new() })
        .await
        .expect("watch health")
        .into_inner();
    let first = statuses.message().await.expect("ok").expect("a status");
    assert_eq!(first.status, ServingStatus::Serving as i32);
    let mut q = server.queue().await;
    q.enqueue_job(job("q", "fine")).await.expect("before the fault");

    hook.0.store(true, Ordering::SeqCst);
    let failed = q.enqueue_job(job("q", "boom")).await.expect_err("the commit panics");
    assert!(matches!(failed.code(), Code::Unavailable | Code::Cancelled | Code::Unknown), "{failed:?}");
    let next = tokio::time::timeout(WAIT, statuses.message()).await.expect("in time");
    let status = next.expect("the health stream answers").expect("a status");
    assert_eq!(status.status, ServingStatus::NotServing as i32, "health says so before the server goes");
    let ended = server.ended().await;
    let error = ended.expect_err("the server ends with an error");
    assert!(format!("{error:#}").contains("injected panic"), "{error:#}");
}

#[tokio::test]
async fn renewals_and_heartbeats_of_the_owner_still_work() {
    // The ownership checks must not refuse the rightful agent: its
    // heartbeat renews its lease.
    let dir = DataDir::new();
    let server = TestServer::start_manual(&dir).await;
    let (a, _b, r) = two_agents(&server).await;
    let before = get(&server, &r.job_id).await.lease_expire_time.expect("leased");
    server.advance(Duration::from_secs(10));
    a.send(Up::Heartbeat(pb::Heartbeat { running_jobs: vec![r.clone()], ..Default::default() })).await;
    let mut q = server.queue().await;
    let mut watch = q.watch_queue(pb::WatchQueueRequest::default()).await.expect("watch").into_inner();
    // No event for a renewal: poll the stored lease instead.
    tether_tests::wait_until("the lease is renewed", || {
        let server = &server;
        let id = r.job_id.clone();
        async move { get(server, &id).await.lease_expire_time.is_some_and(|t| t.seconds > before.seconds) }
    })
    .await;
    // And past the old lease end the job is still A's.
    server.advance(Duration::from_secs(25));
    a.finish(&r, pb::JobOutcome::Succeeded, "ok").await;
    let done = wait_for_event(&mut watch, |j| j.id == r.job_id && state(j) == pb::QueuedJobState::Succeeded).await;
    assert_eq!(done.attempt, 1);
}

#[tokio::test]
async fn findings_of_the_rules_probe_stay_fixed() {
    let dir = DataDir::new();
    let server = TestServer::start_manual(&dir).await;
    let mut q = server.queue().await;
    let mut agents = server.agents().await;
    // A 1 MiB label key: refused naming the entry, with the key cut so the
    // status fits in its headers.
    let labels = [("k".repeat(1 << 20), "v".to_string())].into();
    let err = q
        .claim_job(pb::ClaimJobRequest { worker_id: "w".into(), labels, ..Default::default() })
        .await
        .expect_err("huge key");
    assert_eq!(err.code(), Code::InvalidArgument);
    let fields = violated_fields(&err);
    assert!(fields.len() == 1 && fields[0].starts_with("labels[\"kkk") && fields[0].len() < 100, "{fields:?}");
    // Page tokens this server did not issue, for every listing.
    let err = q.list_queued_jobs(pb::ListQueuedJobsRequest { page_token: "12".into(), ..Default::default() }).await;
    invalid(&err.expect_err("raw cursor"), "page_token");
    let err = q.list_dead_letters(pb::ListDeadLettersRequest { page_token: "x".into(), ..Default::default() }).await;
    invalid(&err.expect_err("garbage"), "page_token");
    let err = agents.list_agents(pb::ListAgentsRequest { page_token: "agent-1".into(), ..Default::default() }).await;
    invalid(&err.expect_err("raw id"), "page_token");
    let err = agents.list_agent_pools(pb::ListAgentPoolsRequest { page_token: "default".into(), ..Default::default() });
    invalid(&err.await.expect_err("raw name"), "page_token");
    // A token of one listing is not one of another.
    agents
        .register_agent(pb::RegisterAgentRequest { name: "a".into(), slots: 1, ..Default::default() })
        .await
        .expect("a");
    agents
        .register_agent(pb::RegisterAgentRequest { name: "b".into(), slots: 1, ..Default::default() })
        .await
        .expect("b");
    let page = agents.list_agents(pb::ListAgentsRequest { page_size: 1, ..Default::default() }).await.expect("page");
    let token = page.into_inner().next_page_token;
    assert!(!token.is_empty());
    let next = agents.list_agents(pb::ListAgentsRequest { page_token: token.clone(), ..Default::default() }).await;
    assert_eq!(next.expect("its own listing").into_inner().agents.len(), 1);
    let err = q.list_queued_jobs(pb::ListQueuedJobsRequest { page_token: token, ..Default::default() }).await;
    invalid(&err.expect_err("another listing's token"), "page_token");
    // Filters that cannot be names.
    let err = q.get_queue_stats(pb::GetQueueStatsRequest { queue: "no such/queue".into() }).await;
    invalid(&err.expect_err("queue filter"), "queue");
    let err = agents.get_agent_pool(pb::GetAgentPoolRequest { name: "a b".into() }).await;
    invalid(&err.expect_err("pool name"), "name");
    // Exit code 0 in a retry policy, named by its index.
    let retry_policy = Some(pb::RetryPolicy { any_failure: false, exit_codes: vec![75, 0] });
    let err = q.enqueue_job(pb::EnqueueJobRequest { retry_policy, ..job("q", "x") }).await;
    invalid(&err.expect_err("exit code 0"), "retry_policy.exit_codes[1]");
    // Reasons over 16 KiB are refused, not cut silently.
    let err = agents.drain_agent(pb::DrainAgentRequest { id: "a".into(), reason: "r".repeat(16 * 1024 + 1) }).await;
    invalid(&err.expect_err("long reason"), "reason");
}

#[tokio::test]
async fn findings_of_the_fuzzers_stay_fixed() {
    let dir = DataDir::new();
    let server = TestServer::start_manual(&dir).await;
    let mut agents = server.agents().await;
    // An unknown field-mask path of 9000 bytes: refused, and the status
    // does not grow with it (it travels in HTTP/2 trailers).
    let request = pb::UpdateAgentPoolRequest {
        pool: Some(pb::AgentPool { name: "default".into(), ..Default::default() }),
        update_mask: Some(prost_types::FieldMask { paths: vec!["x".repeat(9000)] }),
    };
    let err = agents.update_agent_pool(request).await.expect_err("unknown path");
    invalid(&err, "update_mask.paths[0]");
    assert!(err.message().len() < 512, "{} bytes: {}", err.message().len(), err.message());
    assert!(err.details().len() < 1024, "{} bytes of details", err.details().len());

    // An agent's error at the 16 KiB limit plus an exit code is stored
    // within the limit.
    let mut agent = RawAgent::connect(&server, hello("long-error", 1)).await.expect("connect");
    let mut q = server.queue().await;
    q.enqueue_job(job("q", "x")).await.expect("enqueue");
    let r = agent.next_assignment().await.job.expect("job ref");
    agent.accept_and_start(&r).await;
    agent
        .send(Up::JobFinished(pb::JobFinished {
            job: Some(r.clone()),
            outcome: pb::JobOutcome::FailedRetryable as i32,
            result: Bytes::new(),
            error: "e".repeat(16 * 1024),
            exit_code: 3,
        }))
        .await;
    // The result's acknowledgement follows its commit.
    loop {
        if let Down::JobUpdateAck(ack) = agent.next().await {
            if ack.job.as_ref() == Some(&r) && ack.accepted {
                break;
            }
        }
    }
    let failed = get(&server, &r.job_id).await;
    assert_eq!(state(&failed), pb::QueuedJobState::Failed);
    assert!(failed.last_error.len() <= 16 * 1024, "{} bytes", failed.last_error.len());
    assert!(failed.last_error.ends_with("(exit code 3)"), "the exit code is kept");
}

#[tokio::test]
async fn findings_of_the_review_stay_fixed() {
    let dir = DataDir::new();
    let server = TestServer::start_manual(&dir).await;
    let mut q = server.queue().await;

    // A reconnect listing a token the agent holds, but under another
    // attempt: abandoned, and the real (unacknowledged) assignment is sent
    // again instead of being shielded by the colliding token.
    let mut agent = RawAgent::connect(&server, hello("collide", 1)).await.expect("connect");
    q.enqueue_job(job("q", "x")).await.expect("enqueue");
    let r = agent.next_assignment().await.job.expect("job ref");
    agent.kill();
    let forged = pb::JobRef { attempt: r.attempt + 1, ..r.clone() };
    let mut again_hello = hello("collide", 1);
    again_hello.running_jobs = vec![forged.clone()];
    let mut again = RawAgent::connect(&server, again_hello).await.expect("reconnect");
    assert_eq!(again.welcome.abandoned_jobs, vec![forged]);
    assert_eq!(again.next_assignment().await.job, Some(r.clone()), "the assignment is sent again");

    // A start riding on an ack for an attempt the agent does not hold is
    // refused (protocol v2), not silently ignored.
    let mut v2 = hello("lean", 1);
    v2.max_protocol_version = 2;
    let mut lean = RawAgent::connect(&server, v2).await.expect("v2 agent");
    let foreign = pb::JobRef { job_id: "not-yours".into(), attempt: 1, fencing_token: 99 };
    lean.accept_started(&foreign).await;
    loop {
        if let Down::JobUpdateAck(ack) = lean.next().await {
            assert_eq!(ack.job, Some(foreign.clone()));
            assert!(!ack.accepted, "{ack:?}");
            break;
        }
    }

    // Repeated states are read once; more entries than states are refused.
    let queued = pb::QueuedJobState::Claimed as i32;
    let listed = q
        .list_queued_jobs(pb::ListQueuedJobsRequest { states: vec![queued; 7], ..Default::default() })
        .await
        .expect("list")
        .into_inner()
        .jobs;
    assert_eq!(listed.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(), vec![r.job_id.as_str()], "once each");
    let err = q.list_queued_jobs(pb::ListQueuedJobsRequest { states: vec![queued; 8], ..Default::default() }).await;
    invalid(&err.expect_err("eight states"), "states");
}

#[tokio::test]
async fn a_stored_pool_with_min_above_max_cannot_stop_the_engine() {
    let dir = DataDir::new();
    {
        let store = EmbeddedStore::open(dir.path(), EmbeddedOptions::default()).expect("open");
        let mut pool = tether_server::domain::Pool::default_pool(epoch());
        pool.name = "odd".into();
        pool.min_size = 10;
        pool.max_size = 2;
        store.write(vec![Write::PutPool(Box::new(pool))]).await.expect("write");
    }
    let server = TestServer::start_manual(&dir).await;
    let mut agents = server.agents().await;
    let signal = agents
        .get_pool_scaling_signal(pb::GetPoolScalingSignalRequest { name: "odd".into() })
        .await
        .expect("a signal")
        .into_inner();
    assert_eq!(signal.desired_agents, 10, "the larger bound wins");
    let mut q = server.queue().await;
    q.enqueue_job(job("q", "still serving")).await.expect("serving");
}
