//! Writes the seed corpus of both targets to `corpus/<target>/seed-*`:
//! valid requests, boundary values (times at and past protobuf's range,
//! limits plus one, unknown enum numbers, huge strings) and whole agent
//! sessions. Stale `seed-*` files are removed; other files (regression
//! inputs added by hand) are kept.
//!
//!     cargo run --manifest-path fuzz/Cargo.toml --bin make-seeds

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use bytes::Bytes;
use prost_types::{Duration, FieldMask, Timestamp};
use tether::time::{MAX_DURATION_SECONDS, MAX_TIMESTAMP_SECONDS, MIN_TIMESTAMP_SECONDS};
use tether::v1 as pb;
use tether::v1::connect_request::Message as M;
use tether_fuzz::requests::{input, Kind};
use tether_fuzz::stream::{assigned, fixed_hello, frame, tick};
use tether_server::grpc::page_token::{self, Listing};

fn dur(seconds: i64, nanos: i32) -> Option<Duration> {
    Some(Duration { seconds, nanos })
}

fn ts(seconds: i64, nanos: i32) -> Option<Timestamp> {
    Some(Timestamp { seconds, nanos })
}

/// Label maps of the seeds hold one entry each: a map is encoded in its
/// hash order, and the generator's output should not change between runs.
fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    assert!(pairs.len() <= 1, "one label per seed map");
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn enqueue(queue: &str) -> pb::EnqueueJobRequest {
    pb::EnqueueJobRequest { queue: queue.into(), ..Default::default() }
}

fn full_enqueue() -> pb::EnqueueJobRequest {
    pb::EnqueueJobRequest {
        queue: "builds".into(),
        payload: Bytes::from_static(b"{\"cmd\":\"make\"}"),
        priority: pb::Priority::High as i32,
        routing: Some(pb::Routing { pool: "gpu".into(), required_labels: labels(&[("zone", "a")]) }),
        max_attempts: 5,
        lease_duration: dur(60, 0),
        timeout: dur(3600, 500_000_000),
        idempotency_key: "build-42".into(),
        not_before: ts(1_767_225_600, 0),
        retry_policy: Some(pb::RetryPolicy { any_failure: false, exit_codes: vec![1, 2, 137] }),
    }
}

fn job_ref(id: &str, attempt: u32, token: u64) -> Option<pb::JobRef> {
    Some(pb::JobRef { job_id: id.into(), attempt, fencing_token: token })
}

fn pool(name: &str, min: u32, max: u32, desired: u32) -> Option<pb::AgentPool> {
    Some(pb::AgentPool {
        name: name.into(),
        description: "seed pool".into(),
        min_size: min,
        max_size: max,
        desired_size: desired,
        default_labels: labels(&[("team", "ci")]),
        ..Default::default()
    })
}

fn hello(name: &str, min: u32, max: u32) -> pb::Hello {
    pb::Hello {
        name: name.into(),
        pool: "default".into(),
        labels: labels(&[("os", "linux")]),
        slots: 4,
        version: "1.2.3".into(),
        min_protocol_version: min,
        max_protocol_version: max,
        ..Default::default()
    }
}

fn connect(m: M) -> pb::ConnectRequest {
    pb::ConnectRequest { message: Some(m) }
}

fn request_seeds() -> BTreeMap<String, Vec<u8>> {
    let mut s = BTreeMap::new();
    let mut add = |name: &str, bytes: Vec<u8>| {
        assert!(s.insert(name.to_string(), bytes).is_none(), "seed {name} twice");
    };
    use Kind as K;

    // EnqueueJob: valid, boundaries, refusals.
    add("enqueue-minimal", input(K::EnqueueJob, &enqueue("q")));
    add("enqueue-full", input(K::EnqueueJob, &full_enqueue()));
    add(
        "enqueue-timeout-i64-max",
        input(K::EnqueueJob, &pb::EnqueueJobRequest { timeout: dur(i64::MAX, 0), ..enqueue("q") }),
    );
    add(
        "enqueue-timeout-30-days",
        input(K::EnqueueJob, &pb::EnqueueJobRequest { timeout: dur(30 * 24 * 3600, 0), ..enqueue("q") }),
    );
    add(
        "enqueue-timeout-30-days-1ns",
        input(K::EnqueueJob, &pb::EnqueueJobRequest { timeout: dur(30 * 24 * 3600, 1), ..enqueue("q") }),
    );
    add(
        "enqueue-timeout-duration-max",
        input(
            K::EnqueueJob,
            &pb::EnqueueJobRequest { timeout: dur(MAX_DURATION_SECONDS, 999_999_999), ..enqueue("q") },
        ),
    );
    add("enqueue-timeout-zero", input(K::EnqueueJob, &pb::EnqueueJobRequest { timeout: dur(0, 0), ..enqueue("q") }));
    add(
        "enqueue-not-before-2-62",
        input(K::EnqueueJob, &pb::EnqueueJobRequest { not_before: ts(1 << 62, 0), ..enqueue("q") }),
    );
    add(
        "enqueue-not-before-latest",
        input(
            K::EnqueueJob,
            &pb::EnqueueJobRequest { not_before: ts(MAX_TIMESTAMP_SECONDS, 999_999_999), ..enqueue("q") },
        ),
    );
    add(
        "enqueue-not-before-earliest",
        input(K::EnqueueJob, &pb::EnqueueJobRequest { not_before: ts(MIN_TIMESTAMP_SECONDS, 0), ..enqueue("q") }),
    );
    add(
        "enqueue-not-before-bad-nanos",
        input(K::EnqueueJob, &pb::EnqueueJobRequest { not_before: ts(0, -1), ..enqueue("q") }),
    );
    add(
        "enqueue-lease-unnormalized",
        input(K::EnqueueJob, &pb::EnqueueJobRequest { lease_duration: dur(1, 1_000_000_000), ..enqueue("q") }),
    );
    add(
        "enqueue-lease-negative",
        input(K::EnqueueJob, &pb::EnqueueJobRequest { lease_duration: dur(-1, -1), ..enqueue("q") }),
    );
    add(
        "enqueue-lease-1h",
        input(K::EnqueueJob, &pb::EnqueueJobRequest { lease_duration: dur(3600, 0), ..enqueue("q") }),
    );
    add(
        "enqueue-lease-i64-min",
        input(K::EnqueueJob, &pb::EnqueueJobRequest { lease_duration: dur(i64::MIN, 0), ..enqueue("q") }),
    );
    add("enqueue-unknown-priority", input(K::EnqueueJob, &pb::EnqueueJobRequest { priority: 42, ..enqueue("q") }));
    add("enqueue-negative-priority", input(K::EnqueueJob, &pb::EnqueueJobRequest { priority: -1, ..enqueue("q") }));
    add("enqueue-max-attempts-101", input(K::EnqueueJob, &pb::EnqueueJobRequest { max_attempts: 101, ..enqueue("q") }));
    add("enqueue-empty-queue", input(K::EnqueueJob, &pb::EnqueueJobRequest::default()));
    add("enqueue-huge-queue", input(K::EnqueueJob, &enqueue(&"q".repeat(20_000))));
    add("enqueue-queue-129", input(K::EnqueueJob, &enqueue(&"q".repeat(129))));
    add("enqueue-queue-unicode", input(K::EnqueueJob, &enqueue("qüeue")));
    add(
        "enqueue-idempotency-257",
        input(K::EnqueueJob, &pb::EnqueueJobRequest { idempotency_key: "k".repeat(257), ..enqueue("q") }),
    );
    add(
        "enqueue-label-value-257",
        input(
            K::EnqueueJob,
            &pb::EnqueueJobRequest {
                routing: Some(pb::Routing { pool: String::new(), required_labels: labels(&[("k", &"v".repeat(257))]) }),
                ..enqueue("q")
            },
        ),
    );
    add(
        "enqueue-exit-codes-65",
        input(
            K::EnqueueJob,
            &pb::EnqueueJobRequest {
                retry_policy: Some(pb::RetryPolicy { any_failure: true, exit_codes: (1..=65).collect() }),
                ..enqueue("q")
            },
        ),
    );
    add(
        "enqueue-exit-code-zero",
        input(
            K::EnqueueJob,
            &pb::EnqueueJobRequest {
                retry_policy: Some(pb::RetryPolicy { any_failure: false, exit_codes: vec![0, i32::MIN, i32::MAX] }),
                ..enqueue("q")
            },
        ),
    );
    add(
        "batch-mixed",
        input(
            K::BatchEnqueueJobs,
            &pb::BatchEnqueueJobsRequest { requests: vec![enqueue("a"), full_enqueue(), enqueue("bad queue")] },
        ),
    );
    add("batch-empty", input(K::BatchEnqueueJobs, &pb::BatchEnqueueJobsRequest::default()));

    // The other QueueService requests.
    add(
        "get-job",
        input(K::GetQueuedJob, &pb::GetQueuedJobRequest { id: "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b".into() }),
    );
    add("get-job-id-257", input(K::GetQueuedJob, &pb::GetQueuedJobRequest { id: "i".repeat(257) }));
    add(
        "list-jobs",
        input(
            K::ListQueuedJobs,
            &pb::ListQueuedJobsRequest {
                queue: "q".into(),
                states: vec![1, 2, 3],
                page_size: 50,
                page_token: page_token::encode_seq(Listing::Jobs, Some(12345)),
            },
        ),
    );
    add(
        "list-jobs-bad",
        input(
            K::ListQueuedJobs,
            &pb::ListQueuedJobsRequest {
                queue: String::new(),
                states: vec![0, 99],
                page_size: -1,
                page_token: page_token::encode(Listing::Jobs, Some("18446744073709551616")),
            },
        ),
    );
    add(
        "list-jobs-plus-token",
        input(
            K::ListQueuedJobs,
            &pb::ListQueuedJobsRequest {
                page_token: page_token::encode(Listing::Jobs, Some("+5")),
                ..Default::default()
            },
        ),
    );
    add(
        "list-jobs-foreign-token",
        input(
            K::ListQueuedJobs,
            &pb::ListQueuedJobsRequest {
                page_token: page_token::encode(Listing::Pools, Some("gpu")),
                ..Default::default()
            },
        ),
    );
    add(
        "cancel",
        input(K::CancelQueuedJob, &pb::CancelQueuedJobRequest { id: "j".into(), reason: "no longer needed".into() }),
    );
    add(
        "claim",
        input(
            K::ClaimJob,
            &pb::ClaimJobRequest {
                worker_id: "w1".into(),
                queue: "q".into(),
                pool: "gpu".into(),
                labels: labels(&[("zone", "a")]),
            },
        ),
    );
    add(
        "claim-bad-label",
        input(
            K::ClaimJob,
            &pb::ClaimJobRequest { worker_id: "w1".into(), labels: labels(&[("bad key", "v")]), ..Default::default() },
        ),
    );
    add("start", input(K::StartJob, &pb::StartJobRequest { id: "j".into(), attempt: 1, fencing_token: 4_294_967_296 }));
    add(
        "start-attempt-zero",
        input(K::StartJob, &pb::StartJobRequest { id: "j".into(), attempt: 0, fencing_token: 1 }),
    );
    add(
        "complete",
        input(
            K::CompleteJob,
            &pb::CompleteJobRequest { id: "j".into(), attempt: 1, fencing_token: 7, result: Bytes::from_static(b"ok") },
        ),
    );
    add(
        "fail",
        input(
            K::FailJob,
            &pb::FailJobRequest {
                id: "j".into(),
                attempt: 2,
                fencing_token: u64::MAX,
                error: "exit 3".into(),
                retryable: true,
                exit_code: 3,
            },
        ),
    );
    add(
        "renew",
        input(
            K::RenewLease,
            &pb::RenewLeaseRequest {
                id: "j".into(),
                attempt: 1,
                fencing_token: 1,
                lease_duration: dur(0, 500_000_000),
            },
        ),
    );
    add(
        "renew-lease-max",
        input(
            K::RenewLease,
            &pb::RenewLeaseRequest {
                id: "j".into(),
                attempt: 1,
                fencing_token: 1,
                lease_duration: dur(i64::MAX, 999_999_999),
            },
        ),
    );
    add(
        "dead-letters",
        input(
            K::ListDeadLetters,
            &pb::ListDeadLettersRequest {
                queue: "q".into(),
                page_size: 1000,
                page_token: page_token::encode_seq(Listing::DeadLetters, Some(7)),
            },
        ),
    );
    add("redrive", input(K::RedriveDeadLetter, &pb::RedriveDeadLetterRequest { id: "j".into() }));
    add("stats", input(K::GetQueueStats, &pb::GetQueueStatsRequest { queue: "q".into() }));
    add("watch", input(K::WatchQueue, &pb::WatchQueueRequest { queue: "q".into(), states: vec![4, 5, 0], cursor: "ZXYBAQA".into() }));

    // AgentService unary requests.
    add(
        "register",
        input(
            K::RegisterAgent,
            &pb::RegisterAgentRequest {
                name: "a1".into(),
                pool: "gpu".into(),
                labels: labels(&[("os", "linux")]),
                slots: 8,
            },
        ),
    );
    add(
        "register-slots-0",
        input(K::RegisterAgent, &pb::RegisterAgentRequest { name: "a1".into(), slots: 0, ..Default::default() }),
    );
    add(
        "register-slots-1025",
        input(K::RegisterAgent, &pb::RegisterAgentRequest { name: "a 1".into(), slots: 1025, ..Default::default() }),
    );
    add("get-agent", input(K::GetAgent, &pb::GetAgentRequest { id: "agent".into() }));
    add(
        "list-agents",
        input(
            K::ListAgents,
            &pb::ListAgentsRequest {
                pool: "gpu".into(),
                health: vec![1, 2, 7, 99],
                page_size: 10,
                page_token: page_token::encode(Listing::Agents, Some("0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b")),
                ..Default::default()
            },
        ),
    );
    add(
        "heartbeat",
        input(
            K::Heartbeat,
            &pb::HeartbeatRequest {
                agent_id: "agent".into(),
                metrics: Some(pb::AgentMetrics {
                    cpu_percent: f64::NAN,
                    memory_used_bytes: u64::MAX,
                    ..Default::default()
                }),
                running_jobs: vec![
                    pb::JobRef { job_id: "j".into(), attempt: 1, fencing_token: 1 },
                    pb::JobRef::default(),
                ],
                ..Default::default()
            },
        ),
    );
    add(
        "update-status",
        input(
            K::UpdateAgentStatus,
            &pb::UpdateAgentStatusRequest { id: "agent".into(), scheduling_status: 2, reason: "maintenance".into() },
        ),
    );
    add(
        "update-status-unicode-reason",
        input(
            K::UpdateAgentStatus,
            &pb::UpdateAgentStatusRequest { id: "agent".into(), scheduling_status: 99, reason: "é".repeat(8193) },
        ),
    );
    add("drain", input(K::DrainAgent, &pb::DrainAgentRequest { id: "agent".into(), reason: "scale down".into() }));
    add("deregister", input(K::DeregisterAgent, &pb::DeregisterAgentRequest { id: "agent".into() }));
    add("create-pool", input(K::CreateAgentPool, &pb::CreateAgentPoolRequest { pool: pool("gpu", 1, 10, 2) }));
    add("create-pool-defaults", input(K::CreateAgentPool, &pb::CreateAgentPoolRequest { pool: pool("gpu", 3, 0, 0) }));
    add(
        "create-pool-min-over-max",
        input(K::CreateAgentPool, &pb::CreateAgentPoolRequest { pool: pool("gpu", u32::MAX, 5, 1) }),
    );
    add("get-pool", input(K::GetAgentPool, &pb::GetAgentPoolRequest { name: "gpu".into() }));
    add(
        "list-pools",
        input(
            K::ListAgentPools,
            &pb::ListAgentPoolsRequest { page_size: 2, page_token: page_token::encode(Listing::Pools, Some("a")) },
        ),
    );
    add(
        "update-pool",
        input(
            K::UpdateAgentPool,
            &pb::UpdateAgentPoolRequest {
                pool: pool("gpu", 0, 20, 5),
                update_mask: Some(FieldMask {
                    paths: vec!["description".into(), "maxSize".into(), "desired_size".into()],
                }),
            },
        ),
    );
    add(
        "update-pool-bad-mask",
        input(
            K::UpdateAgentPool,
            &pb::UpdateAgentPoolRequest { pool: None, update_mask: Some(FieldMask { paths: vec!["name".into()] }) },
        ),
    );
    add("delete-pool", input(K::DeleteAgentPool, &pb::DeleteAgentPoolRequest { name: "gpu".into() }));
    add("scaling", input(K::GetPoolScalingSignal, &pb::GetPoolScalingSignalRequest { name: "gpu".into() }));

    // Connect stream messages, one at a time.
    let r = || job_ref("j", 1, 1);
    add("connect-hello", input(K::Connect, &connect(M::Hello(hello("a1", 1, 2)))));
    add(
        "connect-hello-running",
        input(
            K::Connect,
            &connect(M::Hello(pb::Hello {
                running_jobs: vec![pb::JobRef { job_id: "j".into(), attempt: 1, fencing_token: 9 }],
                ..hello("a1", 2, 2)
            })),
        ),
    );
    add("connect-hello-no-common-version", input(K::Connect, &connect(M::Hello(hello("a1", 3, 5)))));
    add("connect-hello-min-over-max", input(K::Connect, &connect(M::Hello(hello("a1", 2, 1)))));
    add("connect-hello-u32-max", input(K::Connect, &connect(M::Hello(hello("a1", u32::MAX, u32::MAX)))));
    add(
        "connect-heartbeat",
        input(
            K::Connect,
            &connect(M::Heartbeat(pb::Heartbeat {
                metrics: Some(pb::AgentMetrics { cpu_percent: f64::INFINITY, ..Default::default() }),
                running_jobs: vec![pb::JobRef { job_id: "j".into(), attempt: 1, fencing_token: 1 }],
                draining: true,
            })),
        ),
    );
    add(
        "connect-ack-started",
        input(
            K::Connect,
            &connect(M::AssignmentAck(pb::AssignmentAck {
                job: r(),
                accepted: true,
                reason: String::new(),
                started: true,
            })),
        ),
    );
    add("connect-started-no-job", input(K::Connect, &connect(M::JobStarted(pb::JobStarted { job: None }))));
    add(
        "connect-progress-nan",
        input(
            K::Connect,
            &connect(M::JobProgress(pb::JobProgress { job: r(), percent: f64::NAN, message: "x".repeat(16_385) })),
        ),
    );
    add(
        "connect-log",
        input(
            K::Connect,
            &connect(M::JobLog(pb::JobLog {
                job: r(),
                stream: 2,
                data: Bytes::from_static(b"line\n"),
                sequence: u64::MAX,
                time: Some(prost_types::Timestamp { seconds: 1_700_000_000, nanos: 0 }),
            })),
        ),
    );
    add(
        "connect-log-unknown-stream",
        input(K::Connect, &connect(M::JobLog(pb::JobLog { job: r(), stream: 0, data: Bytes::new(), sequence: 0, time: None }))),
    );
    add(
        "connect-finished",
        input(
            K::Connect,
            &connect(M::JobFinished(pb::JobFinished {
                job: r(),
                outcome: 2,
                result: Bytes::from_static(b"partial"),
                error: "failed".into(),
                exit_code: -1,
            })),
        ),
    );
    add(
        "connect-finished-unknown-outcome",
        input(K::Connect, &connect(M::JobFinished(pb::JobFinished { job: r(), outcome: 99, ..Default::default() }))),
    );
    add("connect-empty", input(K::Connect, &pb::ConnectRequest { message: None }));
    s
}

fn session(parts: Vec<Vec<u8>>) -> Vec<u8> {
    parts.concat()
}

fn ack(index: u8, accepted: bool, started: bool) -> Vec<u8> {
    frame(M::AssignmentAck(pb::AssignmentAck {
        job: Some(assigned(index)),
        accepted,
        reason: if accepted { String::new() } else { "busy".into() },
        started,
    }))
}

fn started(index: u8) -> Vec<u8> {
    frame(M::JobStarted(pb::JobStarted { job: Some(assigned(index)) }))
}

fn finished(index: u8, outcome: pb::JobOutcome, exit_code: i32) -> Vec<u8> {
    frame(M::JobFinished(pb::JobFinished {
        job: Some(assigned(index)),
        outcome: outcome as i32,
        result: Bytes::from_static(b"done"),
        error: if outcome == pb::JobOutcome::Succeeded { String::new() } else { "it broke".into() },
        exit_code,
    }))
}

fn log(index: u8, sequence: u64) -> Vec<u8> {
    frame(M::JobLog(pb::JobLog {
        job: Some(assigned(index)),
        stream: pb::LogStream::Stdout as i32,
        data: Bytes::from_static(b"compiling...\n"),
        sequence,
        time: None,
    }))
}

fn progress(index: u8, percent: f64) -> Vec<u8> {
    frame(M::JobProgress(pb::JobProgress { job: Some(assigned(index)), percent, message: "half way".into() }))
}

fn heartbeat(running: &[u8], draining: bool) -> Vec<u8> {
    frame(M::Heartbeat(pb::Heartbeat {
        metrics: Some(pb::AgentMetrics {
            cpu_percent: 12.5,
            memory_used_bytes: 1 << 30,
            memory_total_bytes: 4 << 30,
            disk_used_bytes: 10,
            disk_total_bytes: 100,
            running_jobs: running.len() as u32,
        }),
        running_jobs: running.iter().map(|i| assigned(*i)).collect(),
        draining,
    }))
}

fn hello_frame(protocol: u32, running: Vec<pb::JobRef>) -> Vec<u8> {
    frame(M::Hello(pb::Hello { running_jobs: running, ..fixed_hello(protocol) }))
}

fn stream_seeds() -> BTreeMap<String, Vec<u8>> {
    use pb::JobOutcome as O;
    let mut s = BTreeMap::new();
    let mut add = |name: &str, bytes: Vec<u8>| {
        assert!(s.insert(name.to_string(), bytes).is_none(), "seed {name} twice");
    };
    add(
        "session-lean",
        session(vec![
            hello_frame(2, vec![]),
            ack(0, true, true),
            log(0, 1),
            progress(0, 50.0),
            heartbeat(&[0], false),
            finished(0, O::Succeeded, 0),
            ack(1, true, false),
            started(1),
            finished(1, O::FailedRetryable, 3),
        ]),
    );
    add(
        "session-v1",
        session(vec![
            hello_frame(1, vec![]),
            ack(0, true, false),
            started(0),
            heartbeat(&[0], false),
            finished(0, O::Succeeded, 0),
            finished(0, O::Succeeded, 0),
            ack(1, true, false),
            started(1),
            finished(1, O::FailedPermanent, 1),
        ]),
    );
    add(
        "session-reject",
        session(vec![
            hello_frame(2, vec![]),
            ack(0, false, false),
            ack(1, false, false),
            heartbeat(&[], false),
            ack(2, true, true),
        ]),
    );
    add(
        "session-retry-exit-code",
        session(vec![
            hello_frame(2, vec![]),
            ack(0, true, true),
            finished(0, O::FailedRetryable, 3),
            tick(2_000),
            heartbeat(&[], false),
            ack(2, true, true),
            finished(2, O::Succeeded, 0),
        ]),
    );
    add(
        "session-lease-expiry",
        session(vec![
            hello_frame(2, vec![]),
            ack(0, true, true),
            ack(1, true, true),
            tick(31_000),
            heartbeat(&[0, 1], false),
            finished(1, O::Succeeded, 0),
        ]),
    );
    add(
        "session-timeout",
        session(vec![
            hello_frame(2, vec![]),
            ack(0, true, true),
            heartbeat(&[0], false),
            tick(25_000),
            heartbeat(&[0], false),
            tick(25_000),
            heartbeat(&[0], false),
            tick(25_000),
            finished(0, O::Succeeded, 0),
        ]),
    );
    add(
        "session-reconnect-resume",
        session(vec![
            hello_frame(2, vec![]),
            ack(0, true, true),
            hello_frame(2, vec![assigned(0), assigned(1)]),
            heartbeat(&[0, 1], false),
            finished(0, O::Succeeded, 0),
        ]),
    );
    add(
        "session-reconnect-stale-token",
        session(vec![
            hello_frame(1, vec![]),
            ack(0, true, false),
            hello_frame(2, vec![pb::JobRef { job_id: "@0".into(), attempt: 0, fencing_token: 999 }]),
            started(0),
            finished(0, O::Succeeded, 0),
        ]),
    );
    add(
        "session-missed-heartbeats",
        session(vec![
            hello_frame(2, vec![]),
            ack(0, true, true),
            tick(8_000),
            tick(8_000),
            tick(8_000),
            heartbeat(&[0], false),
            finished(0, O::Cancelled, 0),
        ]),
    );
    add(
        "session-drain",
        session(vec![
            hello_frame(2, vec![]),
            heartbeat(&[], true),
            ack(0, true, true),
            finished(0, O::Succeeded, 0),
            heartbeat(&[], false),
        ]),
    );
    add("session-no-hello", session(vec![heartbeat(&[0], false), ack(0, true, true), finished(0, O::Succeeded, 0)]));
    add(
        "session-refused-hello",
        session(vec![
            frame(M::Hello(pb::Hello { slots: 0, ..fixed_hello(2) })),
            ack(0, true, true),
            finished(0, O::Succeeded, 0),
        ]),
    );
    add(
        "session-foreign-refs",
        session(vec![
            hello_frame(2, vec![]),
            frame(M::JobStarted(pb::JobStarted { job: job_ref("nope", 1, 1) })),
            frame(M::JobFinished(pb::JobFinished {
                job: Some(pb::JobRef { job_id: "@0".into(), attempt: 7, fencing_token: 12345 }),
                outcome: O::Succeeded as i32,
                ..Default::default()
            })),
            frame(M::JobFinished(pb::JobFinished {
                job: job_ref("nope", 1, 1),
                outcome: O::Succeeded as i32,
                ..Default::default()
            })),
        ]),
    );
    add(
        "session-huge-tick",
        session(vec![
            hello_frame(2, vec![]),
            ack(0, true, true),
            tick(u64::MAX),
            tick(u64::MAX),
            heartbeat(&[0], false),
        ]),
    );
    add(
        "session-second-slot",
        session(vec![
            hello_frame(2, vec![]),
            ack(1, true, true),
            log(1, 1),
            log(1, 2),
            finished(1, O::Succeeded, 0),
            ack(0, true, true),
            finished(0, O::FailedPermanent, 2),
        ]),
    );
    s
}

fn write(dir: &Path, seeds: &BTreeMap<String, Vec<u8>>) -> std::io::Result<usize> {
    std::fs::create_dir_all(dir)?;
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let stale = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("seed-"))
            .is_some_and(|n| !seeds.contains_key(n));
        if stale {
            std::fs::remove_file(&path)?;
        }
    }
    let mut total = 0;
    for (name, bytes) in seeds {
        std::fs::write(dir.join(format!("seed-{name}")), bytes)?;
        total += bytes.len();
    }
    Ok(total)
}

fn main() -> std::io::Result<()> {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    for (target, seeds) in [("decode_requests", request_seeds()), ("stream_handler", stream_seeds())] {
        let bytes = write(&corpus.join(target), &seeds)?;
        println!("{target}: {} seeds, {bytes} bytes", seeds.len());
    }
    Ok(())
}
