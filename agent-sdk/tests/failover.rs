//! Several server endpoints: failover to the next one, resuming running
//! jobs there, without backing off past a live endpoint.

mod common;

use std::time::Duration;

use common::*;
use tether::v1::*;

fn outcome(f: &JobFinished) -> JobOutcome {
    JobOutcome::try_from(f.outcome).unwrap_or(JobOutcome::Unspecified)
}

/// A Welcome resuming every job the Hello listed, as a replica does.
fn welcome_resuming(s: &ServerSession, hello: &Hello) {
    s.welcome_with(Welcome {
        agent_id: "a1".into(),
        protocol_version: 1,
        heartbeat_interval: Some(tether::time::to_duration(Duration::from_secs(60))),
        resumed_jobs: hello.running_jobs.clone(),
        ..Default::default()
    });
}

/// Runs `job` to its result on `s` (a stream that resumed it), acks it,
/// drains the agent and checks it exits cleanly.
async fn finish_on(mut s: ServerSession, agent: TestAgent, controls: &Controls, j: &JobRef) {
    controls.release(&j.job_id);
    let f = s.expect_finished().await;
    assert_eq!((f.job.as_ref(), outcome(&f)), (Some(j), JobOutcome::Succeeded));
    s.ack(j, true);
    agent.handle.drain();
    s.until_closed().await;
    drop(s);
    agent.result().await.expect("clean exit");
}

#[tokio::test]
async fn broken_stream_fails_over_and_the_running_job_reports_to_the_next_server() {
    let (mut first, mut second) = (ScriptedServer::start().await, ScriptedServer::start().await);
    let (handler, mut controls) = TestHandler::new();
    let config = TestAgent::config(&first).with_fallback_server(second.url());
    let agent = TestAgent::spawn(config, handler);

    let (mut s, hello) = first.accept_welcomed("a1").await;
    assert!(hello.running_jobs.is_empty());
    assert_eq!(agent.handle.wait_connected().await.expect("connected"), "a1");
    assert_eq!(agent.handle.server(), Some(first.url()));
    let j = job("long");
    s.assign_and_start(&j, "block").await;
    assert_eq!(controls.event().await, Event::Started("long".into()));

    // The first replica goes away mid-job.
    drop(s);
    let mut s = second.accept().await;
    let hello = s.hello().await;
    assert_eq!(hello.running_jobs, vec![j.clone()]);
    assert_eq!(hello.name, "agent-a");
    welcome_resuming(&s, &hello);
    agent.handle.wait_sessions(2).await.expect("reconnected");
    assert_eq!(agent.handle.server(), Some(second.url()));
    assert!(!first.has_pending_connect(), "went back to the first server");

    // The resumed job keeps running (renewed on the new stream), was not
    // run again, and reports to the second server.
    assert_eq!(s.next_heartbeat().await.running_jobs, vec![j.clone()]);
    finish_on(s, agent, &controls, &j).await;
    assert_eq!(controls.runs(), 1);
}

#[tokio::test]
async fn refused_reconnect_fails_over_and_the_next_hello_lists_the_running_job() {
    let (mut first, mut second) = (ScriptedServer::start().await, ScriptedServer::start().await);
    let mut third = ScriptedServer::start().await;
    let (handler, mut controls) = TestHandler::new();
    // Three endpoints: the second refuses (a replica shutting down), the
    // third takes over.
    let config = TestAgent::config(&first).with_servers([first.url(), second.url(), third.url()]);
    let agent = TestAgent::spawn(config, handler);

    let (mut s, _) = first.accept_welcomed("a1").await;
    let j = job("work");
    s.assign_and_start(&j, "block").await;
    assert_eq!(controls.event().await, Event::Started("work".into()));

    second.refuse_next(tonic::Status::unavailable("shutting down"));
    drop(s);
    let mut s = third.accept().await;
    assert_eq!(second.refusals_left(), 0, "the second server was not tried first");
    assert!(!first.has_pending_connect() && !second.has_pending_connect());
    let hello = s.hello().await;
    assert_eq!(hello.running_jobs, vec![j.clone()]);
    welcome_resuming(&s, &hello);
    agent.handle.wait_sessions(2).await.expect("reconnected");
    assert_eq!(agent.handle.server(), Some(third.url()));
    finish_on(s, agent, &controls, &j).await;
}

#[tokio::test]
async fn unreachable_first_server_does_not_delay_the_second_by_a_backoff() {
    let mut live = ScriptedServer::start().await;
    let (handler, _controls) = TestHandler::new();
    // Any backoff before the live server would outlast the accept's wait.
    let config =
        TestAgent::config(&live).with_servers([unreachable_url().await, live.url()]).with_reconnect(glacial_backoff());
    let agent = TestAgent::spawn(config, handler);

    let (s, _) = live.accept_welcomed("a1").await;
    assert_eq!(agent.handle.wait_connected().await.expect("connected"), "a1");
    assert_eq!(agent.handle.server(), Some(live.url()));
    agent.handle.drain();
    drop(s);
    agent.result().await.expect("clean exit");
}

#[tokio::test]
async fn refusing_first_server_does_not_delay_the_second_by_a_backoff() {
    let (refusing, mut live) = (ScriptedServer::start().await, ScriptedServer::start().await);
    refusing.refuse_next(tonic::Status::unavailable("starting up"));
    let (handler, _controls) = TestHandler::new();
    let config = TestAgent::config(&refusing).with_fallback_server(live.url()).with_reconnect(glacial_backoff());
    let agent = TestAgent::spawn(config, handler);

    // First the refusing server, then the live one.
    let (s, _) = live.accept_welcomed("a1").await;
    assert_eq!(refusing.refusals_left(), 0);
    agent.handle.wait_connected().await.expect("connected");
    agent.handle.drain();
    drop(s);
    agent.result().await.expect("clean exit");
}

#[tokio::test]
async fn a_failed_round_backs_off_then_starts_over_at_the_first_server() {
    let (first, mut second) = (ScriptedServer::start().await, ScriptedServer::start().await);
    for _ in 0..10 {
        first.refuse_next(tonic::Status::unavailable("down"));
    }
    second.refuse_next(tonic::Status::unavailable("down"));
    let (handler, _controls) = TestHandler::new();
    let agent = TestAgent::spawn(TestAgent::config(&first).with_fallback_server(second.url()), handler);

    // Round 1: first refuses, second refuses; backoff; round 2: first
    // refuses, second accepts. Nothing retries the first in between.
    let (s, _) = second.accept_welcomed("a1").await;
    assert_eq!((first.connects(), second.connects()), (2, 2));
    assert_eq!(first.refusals_left(), 8);
    agent.handle.wait_connected().await.expect("connected");
    agent.handle.drain();
    drop(s);
    agent.result().await.expect("clean exit");
}

#[tokio::test]
async fn dead_servers_are_tried_once_per_round_not_in_a_tight_loop() {
    let (first, second) = (ScriptedServer::start().await, ScriptedServer::start().await);
    for server in [&first, &second] {
        for _ in 0..10 {
            server.refuse_next(tonic::Status::unavailable("down"));
        }
    }
    let (handler, _controls) = TestHandler::new();
    let config = TestAgent::config(&first).with_fallback_server(second.url()).with_reconnect(glacial_backoff());
    let mut agent = TestAgent::spawn(config, handler);

    // The first refuses: on to the second at once. The second refuses: the
    // round is over, so the agent backs off (here past the test's end)
    // before the first again, having tried each server once.
    first.wait_connects(1).await;
    second.wait_connects(1).await;
    // Let the agent run on (a tight loop would connect again meanwhile).
    for _ in 0..200 {
        tokio::task::yield_now().await;
    }
    assert_eq!((first.connects(), second.connects()), (1, 1));

    // A shutdown ends the wait.
    agent.shutdown();
    agent.result().await.expect("an idle agent shut down while backing off returns Ok");
    assert_eq!((first.connects(), second.connects()), (1, 1));
}

#[tokio::test]
async fn single_server_reconnects_to_itself_as_before() {
    let mut server = ScriptedServer::start().await;
    let (handler, mut controls) = TestHandler::new();
    let config = TestAgent::config(&server);
    assert_eq!(config.servers().collect::<Vec<_>>(), [server.url()]);
    let agent = TestAgent::spawn(config, handler);

    let (mut s, _) = server.accept_welcomed("a1").await;
    let j = job("solo");
    s.assign_and_start(&j, "block").await;
    assert_eq!(controls.event().await, Event::Started("solo".into()));

    // A refused reconnect is retried on the same server after the backoff.
    server.refuse_next(tonic::Status::unavailable("restarting"));
    drop(s);
    let mut s = server.accept().await;
    assert_eq!(server.refusals_left(), 0);
    let hello = s.hello().await;
    assert_eq!(hello.running_jobs, vec![j.clone()]);
    welcome_resuming(&s, &hello);
    agent.handle.wait_sessions(2).await.expect("reconnected");
    assert_eq!(agent.handle.server(), Some(server.url()));
    finish_on(s, agent, &controls, &j).await;
}
