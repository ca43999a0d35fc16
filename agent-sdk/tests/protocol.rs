//! The Connect stream contract, driven step by step by a scripted server.

mod common;

use std::time::Duration;

use common::*;
use tether::v1::*;
use tether_agent_sdk::AgentError;

fn outcome(f: &JobFinished) -> JobOutcome {
    JobOutcome::try_from(f.outcome).unwrap_or(JobOutcome::Unspecified)
}

#[tokio::test]
async fn hello_carries_config_and_welcome_connects() {
    let mut server = ScriptedServer::start().await;
    let (handler, _controls) = TestHandler::new();
    let mut agent = TestAgent::spawn(TestAgent::config(&server), handler);

    let mut s = server.accept().await;
    let hello = s.hello().await;
    assert_eq!(hello.credential, "secret");
    assert_eq!(hello.name, "agent-a");
    assert_eq!(hello.pool, "pool-1");
    assert_eq!(hello.labels.get("zone").map(String::as_str), Some("eu"));
    assert_eq!(hello.slots, 4);
    assert_eq!(hello.version, "test/1");
    assert_eq!(
        (hello.min_protocol_version, hello.max_protocol_version),
        (tether::PROTOCOL_VERSION_MIN, tether::PROTOCOL_VERSION_MAX)
    );
    assert!(hello.running_jobs.is_empty());
    assert!(!agent.handle.state().connected, "connected before Welcome");

    s.welcome("agent-7", Duration::from_millis(20));
    assert_eq!(agent.handle.wait_connected().await.expect("connected"), "agent-7");
    assert_eq!(agent.handle.agent_id().as_deref(), Some("agent-7"));

    // The first heartbeat goes out right after the Welcome, then one per
    // interval; both carry metrics.
    for _ in 0..2 {
        let hb = s.next_any().await;
        let Some(connect_request::Message::Heartbeat(hb)) = hb else { panic!("expected heartbeat, got {hb:?}") };
        let m = hb.metrics.expect("metrics");
        assert!(m.memory_total_bytes > 0 && m.memory_used_bytes <= m.memory_total_bytes, "{m:?}");
        assert!(hb.running_jobs.is_empty());
        assert!(!hb.draining);
    }

    // Idle shutdown: announce draining, then close.
    agent.shutdown();
    s.draining_heartbeat().await;
    s.until_closed().await;
    drop(s);
    agent.result().await.expect("clean exit");
}

#[tokio::test]
async fn assignment_runs_and_reports_result() {
    let mut server = ScriptedServer::start().await;
    let (handler, _controls) = TestHandler::new();
    let agent = TestAgent::spawn(TestAgent::config(&server), handler);
    let (mut s, _) = server.accept_welcomed("a1").await;

    let j1 = job("j1");
    s.assign_and_start(&j1, "ok:hello").await;
    let f = s.expect_finished().await;
    assert_eq!((f.job.as_ref(), outcome(&f), &f.result[..]), (Some(&j1), JobOutcome::Succeeded, &b"hello"[..]));
    s.ack(&j1, true);

    let j2 = job("j2");
    s.assign_and_start(&j2, "fail").await;
    let f = s.expect_finished().await;
    assert_eq!((outcome(&f), f.error.as_str(), f.exit_code), (JobOutcome::FailedPermanent, "bad input", 7));
    s.ack(&j2, true);

    let j3 = job("j3");
    s.assign_and_start(&j3, "panic").await;
    let f = s.expect_finished().await;
    assert_eq!(outcome(&f), JobOutcome::FailedRetryable);
    assert!(f.error.contains("handler exploded"), "{}", f.error);
    s.ack(&j3, true);

    agent.handle.drain();
    s.until_closed().await;
    assert_eq!(agent.handle.running_jobs(), 0);
    drop(s);
    agent.result().await.expect("clean exit");
}

#[tokio::test]
async fn progress_and_logs_are_chunked_and_sequenced() {
    let mut server = ScriptedServer::start().await;
    let (handler, _controls) = TestHandler::new();
    let _agent = TestAgent::spawn(TestAgent::config(&server), handler);
    let (mut s, _) = server.accept_welcomed("a1").await;

    let j = job("logger");
    s.assign_and_start(&j, "log").await;
    match s.next().await {
        Some(connect_request::Message::JobProgress(p)) => {
            assert_eq!((p.job.as_ref(), p.percent, p.message.as_str()), (Some(&j), 50.0, "half"))
        }
        other => panic!("expected progress, got {other:?}"),
    }
    let mut logs = Vec::new();
    let finished = loop {
        match s.next().await {
            Some(connect_request::Message::JobLog(l)) => logs.push(l),
            Some(connect_request::Message::JobFinished(f)) => break f,
            other => panic!("unexpected {other:?}"),
        }
    };
    let shape: Vec<_> = logs.iter().map(|l| (l.sequence, l.stream, l.data.len())).collect();
    let (out, err) = (LogStream::Stdout as i32, LogStream::Stderr as i32);
    assert_eq!(shape, vec![(0, out, 65536), (1, out, 65536), (2, out, LOG_BYTES - 131072), (3, err, 5)]);
    assert_eq!(outcome(&finished), JobOutcome::Succeeded);
}

#[tokio::test]
async fn cancel_reaches_the_handler_and_reports_cancelled() {
    let mut server = ScriptedServer::start().await;
    let (handler, mut controls) = TestHandler::new();
    let _agent = TestAgent::spawn(TestAgent::config(&server), handler);
    let (mut s, _) = server.accept_welcomed("a1").await;

    let j = job("c1");
    s.assign_and_start(&j, "wait-cancel").await;
    assert_eq!(controls.event().await, Event::Started("c1".into()));
    s.send(connect_response::Message::Cancel(Cancel { job: Some(j.clone()), reason: "user".into() }));
    assert_eq!(controls.event().await, Event::SawCancel("c1".into()));
    let f = s.expect_finished().await;
    assert_eq!((f.job.as_ref(), outcome(&f)), (Some(&j), JobOutcome::Cancelled));
}

#[tokio::test]
async fn timeout_cancels_the_handler_and_fails_retryable() {
    let mut server = ScriptedServer::start().await;
    let (handler, mut controls) = TestHandler::new();
    let _agent = TestAgent::spawn(TestAgent::config(&server), handler);
    let (mut s, _) = server.accept_welcomed("a1").await;

    let j = job("t1");
    let mut a = assignment(&j, "wait-cancel");
    a.timeout = Some(tether::time::to_duration(Duration::from_millis(30)));
    s.send(connect_response::Message::Assignment(a));
    assert!(s.expect_assignment_ack().await.accepted);
    s.expect_started().await;
    assert_eq!(controls.event().await, Event::Started("t1".into()));
    assert_eq!(controls.event().await, Event::SawCancel("t1".into()));
    let f = s.expect_finished().await;
    assert_eq!(outcome(&f), JobOutcome::FailedRetryable);
    assert!(f.error.contains("timed out"), "{}", f.error);
}

#[tokio::test]
async fn duplicate_assignment_is_acked_but_not_run_twice() {
    let mut server = ScriptedServer::start().await;
    let (handler, mut controls) = TestHandler::new();
    let _agent = TestAgent::spawn(TestAgent::config(&server), handler);
    let (mut s, _) = server.accept_welcomed("a1").await;

    let j = job("d1");
    s.assign_and_start(&j, "block").await;
    assert_eq!(controls.event().await, Event::Started("d1".into()));

    // Re-sent while running: acked again, no second JobStarted.
    s.assign(&j, "block");
    let ack = s.expect_assignment_ack().await;
    assert!(ack.accepted);
    controls.release("d1");
    let f = s.expect_finished().await;
    assert_eq!((outcome(&f), &f.result[..]), (JobOutcome::Succeeded, &b"released"[..]));

    // Re-sent after it finished but before its result was acked: acked,
    // and the result is sent again rather than the job re-run.
    s.assign(&j, "block");
    assert!(s.expect_assignment_ack().await.accepted);
    let again = s.expect_finished().await;
    assert_eq!(again, f);
    s.ack(&j, true);
    s.ack(&j, true);
    assert_eq!(controls.runs(), 1);
}

#[tokio::test]
async fn reconnect_resends_unacked_results_and_lists_running_jobs() {
    let mut server = ScriptedServer::start().await;
    let (handler, controls) = TestHandler::new();
    let agent = TestAgent::spawn(TestAgent::config(&server), handler);
    let (mut s, _) = server.accept_welcomed("a1").await;

    let (quick, slow) = (job("quick"), job("slow"));
    s.assign(&quick, "ok:done");
    s.assign(&slow, "block");
    // The two jobs run concurrently: collect until both are accounted for.
    let (mut quick_result, mut slow_started) = (None, false);
    while quick_result.is_none() || !slow_started {
        match s.next().await {
            Some(connect_request::Message::AssignmentAck(a)) => assert!(a.accepted),
            Some(connect_request::Message::JobStarted(st)) => slow_started |= st.job.as_ref() == Some(&slow),
            Some(connect_request::Message::JobFinished(f)) => quick_result = Some(f),
            other => panic!("unexpected {other:?}"),
        }
    }
    let quick_result = quick_result.expect("quick finished");
    assert_eq!(quick_result.job.as_ref(), Some(&quick));

    // The server drops the stream without acking anything.
    drop(s);
    let mut s = server.accept().await;
    let hello = s.hello().await;
    assert!(hello.running_jobs.contains(&slow), "{:?}", hello.running_jobs);
    s.welcome_with(Welcome {
        agent_id: "a1".into(),
        protocol_version: 1,
        heartbeat_interval: Some(tether::time::to_duration(Duration::from_secs(60))),
        resumed_jobs: hello.running_jobs.clone(),
        ..Default::default()
    });
    assert_eq!(agent.handle.wait_sessions(2).await.expect("reconnected"), "a1");
    assert_eq!(s.expect_finished().await, quick_result);
    s.ack(&quick, true);

    // The resumed job still runs and reports on the new stream.
    let hb = s.next_heartbeat().await;
    assert_eq!(hb.running_jobs, vec![slow.clone()]);
    controls.release("slow");
    let f = s.expect_finished().await;
    assert_eq!((f.job.as_ref(), outcome(&f)), (Some(&slow), JobOutcome::Succeeded));
    s.ack(&slow, true);
    assert_eq!(controls.runs(), 2);

    agent.handle.drain();
    s.until_closed().await;
    drop(s);
    agent.result().await.expect("clean exit");
}

#[tokio::test]
async fn abandoned_job_is_cancelled_and_its_result_dropped() {
    let mut server = ScriptedServer::start().await;
    let (handler, mut controls) = TestHandler::new();
    let agent = TestAgent::spawn(TestAgent::config(&server), handler);
    let (mut s, _) = server.accept_welcomed("a1").await;

    let j = job("gone");
    s.assign_and_start(&j, "wait-cancel").await;
    assert_eq!(controls.event().await, Event::Started("gone".into()));
    drop(s);

    let mut s = server.accept().await;
    let hello = s.hello().await;
    assert_eq!(hello.running_jobs, vec![j.clone()]);
    s.welcome_with(Welcome {
        agent_id: "a1".into(),
        protocol_version: 1,
        heartbeat_interval: Some(tether::time::to_duration(Duration::from_secs(60))),
        abandoned_jobs: vec![j.clone()],
        ..Default::default()
    });
    assert_eq!(controls.event().await, Event::SawCancel("gone".into()));

    // Draining completes without ever reporting the abandoned attempt.
    agent.handle.drain();
    let rest = s.until_closed().await;
    assert!(
        !rest.iter().any(|m| matches!(m, connect_request::Message::JobFinished(_))),
        "abandoned result was sent: {rest:?}"
    );
    drop(s);
    agent.result().await.expect("clean exit");
}

#[tokio::test]
async fn protocol_v2_starts_in_the_assignment_ack_and_settles_on_one_ack() {
    let mut server = ScriptedServer::start().await;
    let (handler, mut controls) = TestHandler::new();
    let agent = TestAgent::spawn(TestAgent::config(&server), handler);
    let mut s = server.accept().await;
    s.hello().await;
    s.welcome_with(Welcome {
        agent_id: "a1".into(),
        protocol_version: 2,
        heartbeat_interval: Some(tether::time::to_duration(Duration::from_secs(60))),
        ..Default::default()
    });

    // Ack and start in one message, no JobStarted, and the result settles
    // with the single ack the server owes (drain ends only once it has).
    let j = job("lean");
    s.assign(&j, "ok:done");
    let ack = s.expect_assignment_ack().await;
    assert_eq!((ack.job.as_ref(), ack.accepted, ack.started), (Some(&j), true, true), "{ack:?}");
    assert_eq!(controls.event().await, Event::Started("lean".into()));
    let f = s.expect_finished().await;
    assert_eq!((f.job.as_ref(), outcome(&f)), (Some(&j), JobOutcome::Succeeded));
    s.ack(&j, true);

    // A refused start means the attempt is stale: the job is stopped and
    // its result never reported.
    let stale = JobRef { job_id: "stale".into(), attempt: 1, fencing_token: 43 };
    s.assign(&stale, "wait-cancel");
    let ack = s.expect_assignment_ack().await;
    assert!(ack.accepted && ack.started, "{ack:?}");
    assert_eq!(controls.event().await, Event::Started("stale".into()));
    s.ack(&stale, false);
    assert_eq!(controls.event().await, Event::SawCancel("stale".into()));

    agent.handle.drain();
    let rest = s.until_closed().await;
    assert!(
        !rest
            .iter()
            .any(|m| matches!(m, connect_request::Message::JobFinished(_) | connect_request::Message::JobStarted(_))),
        "unexpected report after the refusal: {rest:?}"
    );
    drop(s);
    agent.result().await.expect("clean exit");
}

#[tokio::test]
async fn server_drain_finishes_running_job_then_closes() {
    let mut server = ScriptedServer::start().await;
    let (handler, mut controls) = TestHandler::new();
    let agent = TestAgent::spawn(TestAgent::config(&server), handler);
    let (mut s, _) = server.accept_welcomed("a1").await;

    let j = job("long");
    s.assign_and_start(&j, "block").await;
    assert_eq!(controls.event().await, Event::Started("long".into()));
    s.send(connect_response::Message::Drain(Drain { reason: "maintenance".into() }));
    let hb = s.draining_heartbeat().await;
    assert_eq!(hb.running_jobs, vec![j.clone()]);
    assert!(agent.handle.state().draining);

    // Work that still arrives is refused.
    let late = job("late");
    s.assign(&late, "ok:x");
    let ack = s.expect_assignment_ack().await;
    assert_eq!((ack.job.as_ref(), ack.accepted), (Some(&late), false));

    controls.release("long");
    let f = s.expect_finished().await;
    assert_eq!((f.job.as_ref(), outcome(&f)), (Some(&j), JobOutcome::Succeeded));
    // Not gone before its last result is acknowledged.
    assert!(!agent.handle.state().stopped);
    s.ack(&j, true);
    s.until_closed().await;
    drop(s);
    agent.result().await.expect("drain returns Ok");
    assert_eq!(controls.runs(), 1);
}

#[tokio::test]
async fn shutdown_drains_running_jobs_first() {
    let mut server = ScriptedServer::start().await;
    let (handler, mut controls) = TestHandler::new();
    let mut agent = TestAgent::spawn(TestAgent::config(&server), handler);
    let (mut s, _) = server.accept_welcomed("a1").await;

    let j = job("work");
    s.assign_and_start(&j, "block").await;
    assert_eq!(controls.event().await, Event::Started("work".into()));
    agent.shutdown();
    s.draining_heartbeat().await;
    controls.release("work");
    assert_eq!(outcome(&s.expect_finished().await), JobOutcome::Succeeded);
    s.ack(&j, true);
    s.until_closed().await;
    drop(s);
    agent.result().await.expect("clean exit");
}

#[tokio::test]
async fn transient_errors_retry_and_refusals_are_fatal() {
    let server = ScriptedServer::start().await;
    server.refuse_next(tonic::Status::unavailable("starting up"));
    server.refuse_next(tonic::Status::resource_exhausted("busy"));
    server.refuse_next(tonic::Status::unauthenticated("bad credential"));
    let (handler, _controls) = TestHandler::new();
    let agent = TestAgent::spawn(TestAgent::config(&server), handler);
    match agent.result().await {
        Err(AgentError::Rejected(status)) => {
            assert_eq!(status.code(), tonic::Code::Unauthenticated)
        }
        other => panic!("expected rejection, got {other:?}"),
    }
    assert_eq!(server.refusals_left(), 0);
}

#[tokio::test]
async fn unsupported_protocol_version_is_fatal() {
    let mut server = ScriptedServer::start().await;
    let (handler, _controls) = TestHandler::new();
    let agent = TestAgent::spawn(TestAgent::config(&server), handler);
    let mut s = server.accept().await;
    s.hello().await;
    s.welcome_with(Welcome { agent_id: "a1".into(), protocol_version: 99, ..Default::default() });
    assert!(matches!(agent.result().await, Err(AgentError::Protocol(_))));
}

#[tokio::test]
async fn invalid_config_fails_fast() {
    let server = ScriptedServer::start().await;
    let (handler, _controls) = TestHandler::new();
    let agent = TestAgent::spawn(TestAgent::config(&server).with_slots(0), handler);
    assert!(matches!(agent.result().await, Err(AgentError::InvalidConfig(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_jobs_flow_through_all_slots() {
    const JOBS: usize = 2000;
    let mut server = ScriptedServer::start().await;
    let agent = TestAgent::spawn(TestAgent::config(&server), |job: tether_agent_sdk::JobContext| async move {
        tether_agent_sdk::JobResult::success(job.payload().clone())
    });
    let mut s = server.accept().await;
    let slots = s.hello().await.slots as usize;
    s.welcome("a1", Duration::from_millis(20));
    let mut heartbeats = 0;
    let started = std::time::Instant::now();

    // Credit-based flow, as the server does it: one assignment per free slot.
    let mut next = 0;
    let mut in_flight = 0;
    let mut finished = 0;
    while finished < JOBS {
        while in_flight < slots && next < JOBS {
            s.assign(&job(&format!("n{next}")), "x");
            next += 1;
            in_flight += 1;
        }
        match s.next_any().await {
            Some(connect_request::Message::Heartbeat(_)) => heartbeats += 1,
            Some(connect_request::Message::AssignmentAck(a)) => assert!(a.accepted, "{a:?}"),
            Some(connect_request::Message::JobStarted(st)) => s.ack(st.job.as_ref().expect("ref"), true),
            Some(connect_request::Message::JobFinished(f)) => {
                assert_eq!((outcome(&f), &f.result[..]), (JobOutcome::Succeeded, &b"x"[..]));
                s.ack(f.job.as_ref().expect("ref"), true);
                in_flight -= 1;
                finished += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let took = started.elapsed();
    eprintln!("{JOBS} jobs in {took:?} ({:.0} jobs/s), {heartbeats} heartbeats", JOBS as f64 / took.as_secs_f64());
    // The flood of assignments must not starve the heartbeat: the first
    // goes out at once, the next one interval later.
    if took > Duration::from_millis(100) {
        assert!(heartbeats >= 2, "{heartbeats} heartbeats in {took:?}");
    }

    agent.handle.drain();
    s.until_closed().await;
    drop(s);
    agent.result().await.expect("clean exit");
}

#[tokio::test]
async fn shell_handler_streams_output_and_reports_exit_code() {
    let mut server = ScriptedServer::start().await;
    let agent = TestAgent::spawn(TestAgent::config(&server), tether_agent_sdk::shell::ShellHandler::default());
    let (mut s, _) = server.accept_welcomed("a1").await;

    let j = job("sh");
    s.assign_and_start(&j, "echo hi; echo err >&2; exit 3").await;
    let mut out = std::collections::BTreeMap::<i32, Vec<u8>>::new();
    let f = loop {
        match s.next().await {
            Some(connect_request::Message::JobLog(l)) => out.entry(l.stream).or_default().extend_from_slice(&l.data),
            Some(connect_request::Message::JobFinished(f)) => break f,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(out.get(&(LogStream::Stdout as i32)).map(Vec::as_slice), Some(&b"hi\n"[..]));
    assert_eq!(out.get(&(LogStream::Stderr as i32)).map(Vec::as_slice), Some(&b"err\n"[..]));
    assert_eq!((outcome(&f), f.exit_code), (JobOutcome::FailedRetryable, 3));
    s.ack(&j, true);

    let j = job("sh2");
    s.assign_and_start(&j, r#"{"command": "printf \"$X\"", "env": {"X": "from-env"}}"#).await;
    let f = loop {
        match s.next().await {
            Some(connect_request::Message::JobLog(_)) => continue,
            Some(connect_request::Message::JobFinished(f)) => break f,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!((outcome(&f), &f.result[..]), (JobOutcome::Succeeded, &b"from-env"[..]));
    s.ack(&j, true);
    agent.handle.drain();
    s.until_closed().await;
    drop(s);
    agent.result().await.expect("clean exit");
}
