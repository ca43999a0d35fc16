//! QueueService end to end over the unary worker path: ordering, routing,
//! fencing, retries, dead letters, cancel, idempotency, scheduling and input
//! validation. Time is a manual clock.

use std::time::Duration;

use tether::time::{to_duration, to_timestamp};
use tether::v1 as pb;
use tether::v1::queue_service_client::QueueServiceClient;
use tether_tests::{epoch, job, state, wait_for_event, DataDir, TestServer};
use tonic::transport::Channel;
use tonic::Code;

async fn enqueue(q: &mut QueueServiceClient<Channel>, req: pb::EnqueueJobRequest) -> pb::QueuedJob {
    q.enqueue_job(req).await.expect("enqueue").into_inner().job.expect("job")
}

async fn claim(q: &mut QueueServiceClient<Channel>, labels: &[(&str, &str)]) -> Option<pb::QueuedJob> {
    q.claim_job(pb::ClaimJobRequest {
        worker_id: "worker-1".into(),
        labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        ..Default::default()
    })
    .await
    .expect("claim")
    .into_inner()
    .job
}

fn with_priority(name: &str, p: pb::Priority) -> pb::EnqueueJobRequest {
    pb::EnqueueJobRequest { priority: p as i32, ..job("q", name) }
}

fn payload(job: &pb::QueuedJob) -> String {
    String::from_utf8_lossy(&job.payload).into_owned()
}

#[tokio::test]
async fn claims_follow_priority_then_fifo() {
    let dir = DataDir::new();
    let server = TestServer::start_manual(&dir).await;
    let mut q = server.queue().await;
    use pb::Priority::*;
    for (name, p) in
        [("l1", Low), ("n1", Normal), ("c1", Critical), ("n2", Unspecified), ("h1", High), ("c2", Critical)]
    {
        enqueue(&mut q, with_priority(name, p)).await;
    }
    let mut order = Vec::new();
    while let Some(j) = claim(&mut q, &[]).await {
        order.push(payload(&j));
    }
    assert_eq!(order, ["c1", "c2", "h1", "n1", "n2", "l1"]);
}

#[tokio::test]
async fn labels_and_pools_route_jobs() {
    let dir = DataDir::new();
    let server = TestServer::start_manual(&dir).await;
    let mut q = server.queue().await;
    let gpu = pb::EnqueueJobRequest {
        routing: Some(pb::Routing { pool: String::new(), required_labels: [("gpu".into(), "a100".into())].into() }),
        ..job("q", "gpu-job")
    };
    let other_pool = pb::EnqueueJobRequest {
        routing: Some(pb::Routing { pool: "arm".into(), ..Default::default() }),
        ..job("q", "arm-job")
    };
    let unknown = q.enqueue_job(other_pool.clone()).await.expect_err("pools must exist");
    assert_eq!(unknown.code(), Code::NotFound);
    assert!(unknown.message().contains("routing.pool"), "{}", unknown.message());
    let mut agents = server.agents().await;
    agents
        .create_agent_pool(pb::CreateAgentPoolRequest {
            pool: Some(pb::AgentPool { name: "arm".into(), ..Default::default() }),
        })
        .await
        .expect("create pool");
    enqueue(&mut q, gpu).await;
    enqueue(&mut q, other_pool).await;
    assert!(claim(&mut q, &[]).await.is_none(), "a worker without the label gets nothing");
    assert!(claim(&mut q, &[("gpu", "h100")]).await.is_none(), "label values must match");
    let got = claim(&mut q, &[("gpu", "a100"), ("os", "linux")]).await.expect("gpu job");
    assert_eq!(payload(&got), "gpu-job");
    let arm = q
        .claim_job(pb::ClaimJobRequest { worker_id: "w".into(), pool: "arm".into(), ..Default::default() })
        .await
        .expect("claim")
        .into_inner()
        .job
        .expect("arm job");
    assert_eq!(payload(&arm), "arm-job");
}

#[tokio::test]
async fn stale_fencing_tokens_are_refused() {
    let dir = DataDir::new();
    let server = TestServer::start_manual(&dir).await;
    let mut q = server.queue().await;
    enqueue(&mut q, job("q", "x")).await;
    let j = claim(&mut q, &[]).await.expect("claimed");
    assert_eq!(j.attempt, 1);
    assert_eq!(state(&j), pb::QueuedJobState::Claimed);
    let started = q
        .start_job(pb::StartJobRequest { id: j.id.clone(), attempt: 1, fencing_token: j.fencing_token })
        .await
        .expect("start")
        .into_inner()
        .job
        .expect("job");
    assert_eq!(state(&started), pb::QueuedJobState::Running);
    let renewed = q
        .renew_lease(pb::RenewLeaseRequest {
            id: j.id.clone(),
            attempt: 1,
            fencing_token: j.fencing_token,
            lease_duration: Some(to_duration(Duration::from_secs(120))),
        })
        .await
        .expect("renew")
        .into_inner()
        .job
        .expect("job");
    assert_eq!(renewed.lease_expire_time, Some(to_timestamp(epoch() + Duration::from_secs(120))));
    let stale = q
        .complete_job(pb::CompleteJobRequest {
            id: j.id.clone(),
            attempt: 1,
            fencing_token: j.fencing_token + 1,
            result: Default::default(),
        })
        .await
        .expect_err("a wrong token is refused");
    assert_eq!(stale.code(), Code::FailedPrecondition);
    let done = q
        .complete_job(pb::CompleteJobRequest {
            id: j.id.clone(),
            attempt: 1,
            fencing_token: j.fencing_token,
            result: "ok".into(),
        })
        .await
        .expect("complete")
        .into_inner()
        .job
        .expect("job");
    assert_eq!(state(&done), pb::QueuedJobState::Succeeded);
    let again = q
        .fail_job(pb::FailJobRequest {
            id: j.id.clone(),
            attempt: 1,
            fencing_token: j.fencing_token,
            error: "late".into(),
            retryable: true,
            exit_code: 0,
        })
        .await
        .expect_err("a finished attempt takes no result");
    assert_eq!(again.code(), Code::FailedPrecondition);
    let stored =
        q.get_queued_job(pb::GetQueuedJobRequest { id: j.id }).await.expect("get").into_inner().job.expect("job");
    assert_eq!(state(&stored), pb::QueuedJobState::Succeeded);
    assert_eq!(&stored.result[..], b"ok");
}

#[tokio::test]
async fn retries_back_off_then_dead_letter_and_redrive() {
    let dir = DataDir::new();
    let server = TestServer::start_manual(&dir).await;
    let mut q = server.queue().await;
    let retry_policy = Some(pb::RetryPolicy { any_failure: true, exit_codes: vec![] });
    let created = enqueue(&mut q, pb::EnqueueJobRequest { max_attempts: 2, retry_policy, ..job("q", "flaky") }).await;
    for attempt in 1..=2 {
        let j = claim(&mut q, &[]).await.expect("claimable");
        assert_eq!((j.id.as_str(), j.attempt), (created.id.as_str(), attempt));
        let failed = q
            .fail_job(pb::FailJobRequest {
                id: j.id.clone(),
                attempt,
                fencing_token: j.fencing_token,
                error: format!("boom {attempt}"),
                retryable: true,
                exit_code: 0,
            })
            .await
            .expect("fail")
            .into_inner()
            .job
            .expect("job");
        if attempt == 1 {
            assert_eq!(state(&failed), pb::QueuedJobState::Queued);
            let ready = failed.ready_time.as_ref().and_then(tether::time::from_timestamp);
            assert!(ready > Some(epoch()), "a retry waits for its backoff");
            assert!(claim(&mut q, &[]).await.is_none(), "not before the backoff ends");
            server.advance(Duration::from_secs(10));
        } else {
            assert_eq!(state(&failed), pb::QueuedJobState::DeadLettered);
            assert_eq!(failed.last_error, "boom 2");
        }
    }
    let dead = q.list_dead_letters(pb::ListDeadLettersRequest::default()).await.expect("list").into_inner().jobs;
    assert_eq!(dead.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(), [created.id.as_str()]);
    let redriven = q
        .redrive_dead_letter(pb::RedriveDeadLetterRequest { id: created.id.clone() })
        .await
        .expect("redrive")
        .into_inner()
        .job
        .expect("job");
    assert_eq!((state(&redriven), redriven.attempt), (pb::QueuedJobState::Queued, 0));
    let j = claim(&mut q, &[]).await.expect("claimable after redrive");
    q.complete_job(pb::CompleteJobRequest {
        id: j.id.clone(),
        attempt: j.attempt,
        fencing_token: j.fencing_token,
        result: Default::default(),
    })
    .await
    .expect("complete");
    let again = q.redrive_dead_letter(pb::RedriveDeadLetterRequest { id: created.id }).await.expect_err("not dead");
    assert_eq!(again.code(), Code::FailedPrecondition);
}

#[tokio::test]
async fn permanent_failures_do_not_retry() {
    let dir = DataDir::new();
    let server = TestServer::start_manual(&dir).await;
    let mut q = server.queue().await;
    enqueue(&mut q, job("q", "bad")).await;
    let j = claim(&mut q, &[]).await.expect("claimed");
    let failed = q
        .fail_job(pb::FailJobRequest {
            id: j.id,
            attempt: 1,
            fencing_token: j.fencing_token,
            error: "bad input".into(),
            retryable: false,
            exit_code: 0,
        })
        .await
        .expect("fail")
        .into_inner()
        .job
        .expect("job");
    assert_eq!(state(&failed), pb::QueuedJobState::Failed);
}

#[tokio::test]
async fn expired_leases_requeue_with_the_next_attempt() {
    let dir = DataDir::new();
    let server = TestServer::start_manual(&dir).await;
    let mut q = server.queue().await;
    let mut watch = q.watch_queue(pb::WatchQueueRequest::default()).await.expect("watch").into_inner();
    let req = pb::EnqueueJobRequest { lease_duration: Some(to_duration(Duration::from_secs(5))), ..job("q", "x") };
    let created = enqueue(&mut q, req).await;
    let first = claim(&mut q, &[]).await.expect("claimed");
    server.advance(Duration::from_secs(6));
    let requeued =
        wait_for_event(&mut watch, |j| j.id == created.id && state(j) == pb::QueuedJobState::Queued && j.attempt == 1)
            .await;
    assert!(requeued.last_error.contains("lease expired"), "{}", requeued.last_error);
    let late = q
        .complete_job(pb::CompleteJobRequest {
            id: first.id.clone(),
            attempt: 1,
            fencing_token: first.fencing_token,
            result: Default::default(),
        })
        .await
        .expect_err("the expired attempt's result is refused");
    assert_eq!(late.code(), Code::FailedPrecondition);
    server.advance(Duration::from_secs(10));
    let second = claim(&mut q, &[]).await.expect("claimable again");
    assert_eq!(second.attempt, 2);
    assert!(second.fencing_token > first.fencing_token);
}

#[tokio::test]
async fn timeouts_end_attempts() {
    let dir = DataDir::new();
    let server = TestServer::start_manual(&dir).await;
    let mut q = server.queue().await;
    let mut watch = q
        .watch_queue(pb::WatchQueueRequest { queue: "q".into(), ..Default::default() })
        .await
        .expect("watch")
        .into_inner();
    // A timeout is a failure of the attempt: final by default, retried
    // with a retry policy that retries any failure.
    let req = |retry_policy| pb::EnqueueJobRequest {
        timeout: Some(to_duration(Duration::from_secs(10))),
        lease_duration: Some(to_duration(Duration::from_secs(60))),
        retry_policy,
        ..job("q", "slow")
    };
    let plain = enqueue(&mut q, req(None)).await;
    let retried = enqueue(&mut q, req(Some(pb::RetryPolicy { any_failure: true, exit_codes: vec![] }))).await;
    claim(&mut q, &[]).await.expect("claimed");
    claim(&mut q, &[]).await.expect("claimed");
    server.advance(Duration::from_secs(11));
    let mut outcomes = std::collections::HashMap::new();
    while outcomes.len() < 2 {
        let j =
            wait_for_event(&mut watch, |j| (j.id == plain.id || j.id == retried.id) && !j.last_error.is_empty()).await;
        assert!(j.last_error.contains("timed out"), "{}", j.last_error);
        outcomes.insert(j.id.clone(), state(&j));
    }
    assert_eq!(outcomes[&plain.id], pb::QueuedJobState::Failed);
    assert_eq!(outcomes[&retried.id], pb::QueuedJobState::Queued);
}

#[tokio::test]
async fn not_before_delays_dispatch() {
    let dir = DataDir::new();
    let server = TestServer::start_manual(&dir).await;
    let mut q = server.queue().await;
    let req = pb::EnqueueJobRequest {
        not_before: Some(to_timestamp(epoch() + Duration::from_secs(60))),
        ..job("q", "later")
    };
    enqueue(&mut q, req).await;
    assert!(claim(&mut q, &[]).await.is_none());
    server.advance(Duration::from_secs(59));
    assert!(claim(&mut q, &[]).await.is_none());
    server.advance(Duration::from_secs(1));
    assert_eq!(claim(&mut q, &[]).await.map(|j| payload(&j)), Some("later".into()));
}

#[tokio::test]
async fn cancel_queued_jobs() {
    let dir = DataDir::new();
    let server = TestServer::start_manual(&dir).await;
    let mut q = server.queue().await;
    let j = enqueue(&mut q, job("q", "x")).await;
    let cancelled = q
        .cancel_queued_job(pb::CancelQueuedJobRequest { id: j.id.clone(), reason: "not needed".into() })
        .await
        .expect("cancel")
        .into_inner()
        .job
        .expect("job");
    assert_eq!(state(&cancelled), pb::QueuedJobState::Cancelled);
    assert!(claim(&mut q, &[]).await.is_none(), "a cancelled job is never dispatched");
    let again = q
        .cancel_queued_job(pb::CancelQueuedJobRequest { id: j.id, reason: String::new() })
        .await
        .expect_err("finished");
    assert_eq!(again.code(), Code::FailedPrecondition);
    let missing = q
        .cancel_queued_job(pb::CancelQueuedJobRequest { id: "nope".into(), reason: String::new() })
        .await
        .expect_err("missing");
    assert_eq!(missing.code(), Code::NotFound);
}

#[tokio::test]
async fn idempotency_keys_deduplicate() {
    let dir = DataDir::new();
    let server = TestServer::start_manual(&dir).await;
    let mut q = server.queue().await;
    let req = pb::EnqueueJobRequest { idempotency_key: "build-42".into(), ..job("q", "same") };
    let first = q.enqueue_job(req.clone()).await.expect("first").into_inner();
    let second = q.enqueue_job(req.clone()).await.expect("second").into_inner();
    assert!(first.created);
    assert!(!second.created);
    assert_eq!(first.job.map(|j| j.id), second.job.map(|j| j.id));
    let different = pb::EnqueueJobRequest { payload: "other".as_bytes().to_vec().into(), ..req.clone() };
    let err = q.enqueue_job(different).await.expect_err("same key, other payload");
    assert_eq!(err.code(), Code::AlreadyExists);
    // Within one batch, a repeated key refers to the first job.
    let batch = q
        .batch_enqueue_jobs(pb::BatchEnqueueJobsRequest {
            requests: vec![
                pb::EnqueueJobRequest { idempotency_key: "k2".into(), ..job("q", "b") },
                pb::EnqueueJobRequest { idempotency_key: "k2".into(), ..job("q", "b") },
            ],
        })
        .await
        .expect("batch")
        .into_inner();
    assert_eq!(batch.created, [true, false]);
    assert_eq!(batch.jobs[0].id, batch.jobs[1].id);
    let stats = q.get_queue_stats(pb::GetQueueStatsRequest { queue: "q".into() }).await.expect("stats").into_inner();
    let queued = stats.by_state.iter().find(|s| s.state == pb::QueuedJobState::Queued as i32).map(|s| s.count);
    assert_eq!(queued, Some(2));
}

#[tokio::test]
async fn stats_and_listing() {
    let dir = DataDir::new();
    let server = TestServer::start_manual(&dir).await;
    let mut q = server.queue().await;
    let requests = (0..25)
        .map(|i| with_priority(&format!("j{i}"), if i < 5 { pb::Priority::High } else { pb::Priority::Low }))
        .collect();
    q.batch_enqueue_jobs(pb::BatchEnqueueJobsRequest { requests }).await.expect("batch");
    enqueue(&mut q, job("other", "o")).await;
    server.advance(Duration::from_secs(30));
    let stats = q.get_queue_stats(pb::GetQueueStatsRequest { queue: "q".into() }).await.expect("stats").into_inner();
    let by_priority: Vec<(i32, u64)> = stats.queued_by_priority.iter().map(|p| (p.priority, p.count)).collect();
    assert!(by_priority.contains(&(pb::Priority::High as i32, 5)));
    assert!(by_priority.contains(&(pb::Priority::Low as i32, 20)));
    assert_eq!(stats.oldest_queued_age, Some(to_duration(Duration::from_secs(30))));

    let mut ids = Vec::new();
    let mut token = String::new();
    loop {
        let page = q
            .list_queued_jobs(pb::ListQueuedJobsRequest {
                queue: "q".into(),
                page_size: 10,
                page_token: token,
                ..Default::default()
            })
            .await
            .expect("list")
            .into_inner();
        ids.extend(page.jobs.into_iter().map(|j| payload(&j)));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(ids.len(), 25);
    assert_eq!(ids.first().map(String::as_str), Some("j24"), "newest first");
}

#[tokio::test]
async fn bad_input_gets_precise_statuses() {
    let dir = DataDir::new();
    let server = TestServer::start_manual(&dir).await;
    let mut q = server.queue().await;
    let unknown_enum = q.enqueue_job(pb::EnqueueJobRequest { priority: 99, ..job("q", "x") }).await.expect_err("enum");
    assert_eq!(unknown_enum.code(), Code::InvalidArgument);
    assert!(unknown_enum.message().contains("priority"), "{}", unknown_enum.message());

    let empty = q.enqueue_job(job("", "x")).await.expect_err("empty queue");
    assert_eq!(empty.code(), Code::InvalidArgument);
    assert!(empty.message().contains("queue"), "{}", empty.message());

    let big = pb::EnqueueJobRequest { payload: vec![b'x'; 1024 * 1024 + 1].into(), ..job("q", "") };
    let big = q.enqueue_job(big).await.expect_err("oversize");
    assert_eq!(big.code(), Code::InvalidArgument);
    assert!(big.message().contains("payload"), "{}", big.message());

    let batch = q
        .batch_enqueue_jobs(pb::BatchEnqueueJobsRequest { requests: vec![job("q", "ok"), job("bad queue", "x")] })
        .await
        .expect_err("bad batch");
    assert_eq!(batch.code(), Code::InvalidArgument);
    assert!(batch.message().contains("requests[1].queue"), "{}", batch.message());
    let stats = q.get_queue_stats(pb::GetQueueStatsRequest::default()).await.expect("stats").into_inner();
    assert!(stats.by_state.iter().all(|s| s.count == 0), "a refused batch enqueues nothing");

    let state_filter = q
        .list_queued_jobs(pb::ListQueuedJobsRequest { states: vec![42], ..Default::default() })
        .await
        .expect_err("unknown state");
    assert_eq!(state_filter.code(), Code::InvalidArgument);
    assert!(state_filter.message().contains("states[0]"), "{}", state_filter.message());

    let no_worker = q.claim_job(pb::ClaimJobRequest::default()).await.expect_err("worker id");
    assert_eq!(no_worker.code(), Code::InvalidArgument);
    assert!(no_worker.message().contains("worker_id"));

    let missing = q.get_queued_job(pb::GetQueuedJobRequest { id: "nope".into() }).await.expect_err("missing");
    assert_eq!(missing.code(), Code::NotFound);

    let negative = q
        .enqueue_job(pb::EnqueueJobRequest {
            lease_duration: Some(prost_types::Duration { seconds: -1, nanos: 0 }),
            ..job("q", "x")
        })
        .await
        .expect_err("negative lease");
    assert_eq!(negative.code(), Code::InvalidArgument);
    assert!(negative.message().contains("lease_duration"));

    let token =
        q.start_job(pb::StartJobRequest { id: "x".into(), attempt: 1, fencing_token: 0 }).await.expect_err("token");
    assert!(token.message().contains("fencing_token"));
}

#[tokio::test]
async fn watch_streams_state_changes() {
    let dir = DataDir::new();
    let server = TestServer::start_manual(&dir).await;
    let mut q = server.queue().await;
    let mut watch = q
        .watch_queue(pb::WatchQueueRequest {
            queue: "w".into(),
            states: vec![pb::QueuedJobState::Succeeded as i32],
            ..Default::default()
        })
        .await
        .expect("watch")
        .into_inner();
    enqueue(&mut q, job("other", "ignored")).await;
    let created = enqueue(&mut q, job("w", "x")).await;
    let j = q
        .claim_job(pb::ClaimJobRequest { worker_id: "w".into(), queue: "w".into(), ..Default::default() })
        .await
        .expect("claim")
        .into_inner()
        .job
        .expect("job");
    q.complete_job(pb::CompleteJobRequest {
        id: j.id,
        attempt: 1,
        fencing_token: j.fencing_token,
        result: Default::default(),
    })
    .await
    .expect("complete");
    let event = wait_for_event(&mut watch, |_| true).await;
    assert_eq!((state(&event), event.id), (pb::QueuedJobState::Succeeded, created.id));
}

#[tokio::test]
async fn fencing_tokens_of_a_job_only_grow_across_restarts() {
    let dir = DataDir::new();
    let server = TestServer::start_manual(&dir).await;
    let mut q = server.queue().await;
    let retried = pb::EnqueueJobRequest {
        retry_policy: Some(pb::RetryPolicy { any_failure: true, ..Default::default() }),
        ..job("q", "flaky")
    };
    let id = enqueue(&mut q, retried).await.id;
    let first = claim(&mut q, &[]).await.expect("claimed");
    q.fail_job(pb::FailJobRequest {
        id: id.clone(),
        attempt: first.attempt,
        fencing_token: first.fencing_token,
        error: "flaky".into(),
        retryable: true,
        exit_code: 1,
    })
    .await
    .expect("fail, to be retried");
    server.stop().await;
    let server = TestServer::start_manual(&dir).await;
    server.advance(Duration::from_secs(60)); // past the retry backoff
    let mut q = server.queue().await;
    let second = claim(&mut q, &[]).await.expect("claimed again after restart");
    assert_eq!(second.id, id);
    assert_eq!(second.attempt, 2);
    assert!(second.fencing_token > first.fencing_token, "{} then {}", first.fencing_token, second.fencing_token);
    if tether_tests::backend() == tether_tests::Backend::Embedded {
        // There an assignment is pushed before its claim is durable, so a
        // restart skips far past every token that may have been handed out.
        assert!(
            second.fencing_token >= first.fencing_token + (1 << 32),
            "{} then {}",
            first.fencing_token,
            second.fencing_token
        );
    }
}

/// The store's limits (DynamoDB's are below the wire limits) hold before
/// anything is written: an oversize payload or result is INVALID_ARGUMENT
/// naming the field, and the job is unchanged.
#[tokio::test]
async fn payloads_and_results_beyond_the_stores_limits_are_refused() {
    use tether_server::store::Store as _;
    let store = tether_server::store::dynamodb::local::fresh_store("limits").await;
    let limits = store.limits();
    let dir = DataDir::new();
    let options = tether_tests::Options {
        clock: Some(tether_server::clock::ManualClock::new(epoch())),
        store: Some(std::sync::Arc::new(store)),
        ..Default::default()
    };
    let server = TestServer::start(&dir, options).await;
    let mut q = server.queue().await;
    let sized = |n: usize| pb::EnqueueJobRequest { payload: vec![b'x'; n].into(), ..job("limits", "") };

    let err = q.enqueue_job(sized(limits.max_payload_bytes + 1)).await.expect_err("too large for the store");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("payload") && err.message().contains("store"), "{}", err.message());
    let batch = pb::BatchEnqueueJobsRequest { requests: vec![sized(1), sized(limits.max_payload_bytes + 1)] };
    let err = q.batch_enqueue_jobs(batch).await.expect_err("one oversize request refuses the batch");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("requests[1].payload"), "{}", err.message());
    assert!(claim(&mut q, &[]).await.is_none(), "nothing of the refused batch was enqueued");

    enqueue(&mut q, sized(limits.max_payload_bytes)).await;
    let j = claim(&mut q, &[]).await.expect("the job at the limit");
    let complete = |result: Vec<u8>| pb::CompleteJobRequest {
        id: j.id.clone(),
        attempt: j.attempt,
        fencing_token: j.fencing_token,
        result: result.into(),
    };
    let err = q.complete_job(complete(vec![b'r'; limits.max_result_bytes + 1])).await.expect_err("result too large");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("result") && err.message().contains("store"), "{}", err.message());
    let get = pb::GetQueuedJobRequest { id: j.id.clone() };
    let stored = q.get_queued_job(get.clone()).await.expect("get").into_inner().job.expect("job");
    assert_eq!(state(&stored), pb::QueuedJobState::Claimed, "the refused result changed nothing");
    q.complete_job(complete(vec![b'r'; limits.max_result_bytes])).await.expect("a result at the limit");
    let stored = q.get_queued_job(get).await.expect("get").into_inner().job.expect("job");
    assert_eq!(state(&stored), pb::QueuedJobState::Succeeded);
    assert_eq!(stored.result.len(), limits.max_result_bytes);
}

/// The next watch message, failing the test after the usual wait.
async fn next_change(watch: &mut tonic::Streaming<pb::WatchQueueResponse>) -> pb::WatchQueueResponse {
    tokio::time::timeout(tether_tests::WAIT, watch.message())
        .await
        .expect("a change in time")
        .expect("watch ok")
        .expect("watch open")
}

async fn watch_from(
    q: &mut QueueServiceClient<Channel>,
    queue: &str,
    cursor: &str,
) -> tonic::Streaming<pb::WatchQueueResponse> {
    q.watch_queue(pb::WatchQueueRequest { queue: queue.into(), cursor: cursor.into(), ..Default::default() })
        .await
        .expect("watch")
        .into_inner()
}

/// Claims and completes one job of queue `queue` through the unary path.
async fn run_one(q: &mut QueueServiceClient<Channel>, queue: &str) -> String {
    let j = q
        .claim_job(pb::ClaimJobRequest { worker_id: "w".into(), queue: queue.into(), ..Default::default() })
        .await
        .expect("claim")
        .into_inner()
        .job
        .expect("a job");
    q.complete_job(pb::CompleteJobRequest {
        id: j.id.clone(),
        attempt: j.attempt,
        fencing_token: j.fencing_token,
        ..Default::default()
    })
    .await
    .expect("complete");
    j.id
}

#[tokio::test]
async fn watch_resumes_from_a_cursor_after_a_disconnect_missing_nothing_and_repeating_nothing() {
    use pb::QueuedJobState::{Claimed, Queued, Succeeded};
    let dir = DataDir::new();
    let server = TestServer::start_manual(&dir).await;
    let mut q = server.queue().await;
    let mut watch = watch_from(&mut q, "r", "").await;
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(enqueue(&mut q, job("r", &format!("{i}"))).await.id);
    }
    // Read two changes, keep the second's cursor, go away.
    let one = next_change(&mut watch).await;
    let two = next_change(&mut watch).await;
    // Changes of different jobs have no order between them (on DynamoDB they
    // are in different shards): which job came first does not matter.
    let first = one.job.as_ref().expect("job");
    let i = ids.iter().position(|id| *id == first.id).expect("one of ours");
    assert_eq!(first.payload, i.to_string().into_bytes(), "the payload is read back");
    let mut bare = q
        .watch_queue(pb::WatchQueueRequest {
            queue: "r".into(),
            cursor: one.cursor.clone(),
            skip_payload: true,
            ..Default::default()
        })
        .await
        .expect("watch")
        .into_inner();
    let bare_two = next_change(&mut bare).await;
    assert!(bare_two.job.as_ref().is_some_and(|j| j.payload.is_empty()), "skip_payload leaves it out");
    drop(bare);
    assert_eq!(one.dropped, 0);
    assert!(!two.cursor.is_empty() && two.cursor != one.cursor);
    let read: Vec<_> = [&one, &two].iter().map(|c| c.job.as_ref().expect("job").id.clone()).collect();
    drop(watch);

    // While nobody watches: two jobs run, another queue's job and two more
    // of this queue are enqueued.
    let ran = [run_one(&mut q, "r").await, run_one(&mut q, "r").await];
    enqueue(&mut q, job("other", "not watched")).await;
    for i in 3..5 {
        ids.push(enqueue(&mut q, job("r", &format!("{i}"))).await.id);
    }
    let mut expected: std::collections::BTreeMap<String, Vec<pb::QueuedJobState>> = Default::default();
    for id in &ids {
        if !read.contains(id) {
            expected.entry(id.clone()).or_default().push(Queued);
        }
    }
    for id in &ran {
        expected.entry(id.clone()).or_default().extend([Claimed, Succeeded]);
    }
    let total: usize = expected.values().map(Vec::len).sum();

    let mut resumed = watch_from(&mut q, "r", &two.cursor).await;
    let mut got: std::collections::BTreeMap<String, Vec<pb::QueuedJobState>> = Default::default();
    let mut cursors = std::collections::HashSet::new();
    for _ in 0..total {
        let change = next_change(&mut resumed).await;
        let job = change.job.expect("job");
        assert_eq!(job.queue, "r", "the queue filter holds");
        assert!(cursors.insert(change.cursor), "each change has its own cursor");
        got.entry(job.id.clone()).or_default().push(state(&job));
    }
    // Exactly the changes after the cursor, each job's in order.
    assert_eq!(got, expected);
    // Nothing twice or extra: the next change is a new one.
    let later = enqueue(&mut q, job("r", "later")).await;
    assert_eq!(next_change(&mut resumed).await.job.expect("job").id, later.id);
}

#[tokio::test]
async fn watch_cursors_that_were_not_issued_here_are_invalid_argument() {
    use tether_server::grpc::event_cursor;
    use tether_server::store::EventCursor;
    let dir = DataDir::new();
    let server = TestServer::start_manual(&dir).await;
    let mut q = server.queue().await;
    let mut watch = watch_from(&mut q, "", "").await;
    enqueue(&mut q, job("a", "x")).await;
    let good = next_change(&mut watch).await.cursor;
    let shards = match tether_tests::backend() {
        tether_tests::Backend::Embedded => 1,
        tether_tests::Backend::Dynamodb => 8,
    };
    let other_backend = event_cursor::encode(&EventCursor { positions: vec![0; 9 - shards] });
    let ahead = event_cursor::encode(&EventCursor { positions: vec![1 << 40; shards] });
    let cases = [
        ("garbage", "not a cursor!".to_string()),
        ("truncated", good[..good.len() - 2].to_string()),
        ("huge", "A".repeat(1 << 20)),
        ("just too long", "A".repeat(513)),
        ("another backend's", other_backend),
        ("ahead of the log", ahead),
        ("a page token", "am9iczo1".into()),
    ];
    for (what, cursor) in cases {
        let status = q
            .watch_queue(pb::WatchQueueRequest { cursor, ..Default::default() })
            .await
            .expect_err(&format!("a {what} cursor is refused"));
        assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
        assert_eq!(tether_tests::violated_fields(&status), ["cursor"], "{what}: {status:?}");
    }
    // The good one still works.
    watch_from(&mut q, "", &good).await;
}

#[tokio::test]
async fn a_watch_cursor_older_than_the_retention_is_out_of_range_not_skipped() {
    let dir = DataDir::new();
    let clock = tether_server::clock::ManualClock::new(epoch());
    let engine = tether_server::engine::EngineConfig {
        event_retention: Duration::from_secs(60),
        event_trim_interval: Duration::from_secs(1),
        ..tether_tests::test_engine_config()
    };
    let options = tether_tests::Options { clock: Some(clock.clone()), engine: Some(engine), ..Default::default() };
    let server = TestServer::start(&dir, options).await;
    let mut q = server.queue().await;
    let mut watch = watch_from(&mut q, "old", "").await;
    enqueue(&mut q, job("old", "1")).await;
    enqueue(&mut q, job("old", "2")).await;
    let after_first = next_change(&mut watch).await.cursor;
    let after_second = next_change(&mut watch).await.cursor;
    drop(watch);
    // Past the retention the retention task trims both; the cursor between
    // them is then answered OUT_OF_RANGE, never with a silent skip.
    clock.advance(Duration::from_secs(120));
    let deadline = tokio::time::Instant::now() + tether_tests::WAIT;
    let status = loop {
        let request = pb::WatchQueueRequest { cursor: after_first.clone(), ..Default::default() };
        match q.watch_queue(request).await {
            Err(status) => break status,
            Ok(_) => {
                assert!(tokio::time::Instant::now() < deadline, "the events were never trimmed");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(status.message().contains("retention"), "{status:?}");
    let details = tonic_types::StatusExt::get_error_details(&status);
    assert_eq!(details.error_info().map(|i| i.reason.as_str()), Some("CURSOR_EXPIRED"));
    // A cursor at the present is not: it waits for the next change.
    let mut fresh = watch_from(&mut q, "old", &after_second).await;
    let third = enqueue(&mut q, job("old", "3")).await;
    assert_eq!(next_change(&mut fresh).await.job.expect("job").id, third.id);
}
