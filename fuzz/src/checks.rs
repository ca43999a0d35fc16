//! Invariants shared by both targets.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tether::time::{duration_in, later, latest, timestamp_in, to_timestamp};
use tether::v1 as pb;
use tether_server::domain::{validate, DomainError, Job, JobSpec, JobState};
use tether_server::engine::AgentPush;
use tether_server::grpc::convert::{self, job_out};
use tether_server::grpc::status::to_status;
use tether_server::grpc::stream_messages::push_out;

/// An error of a pure validation function: `InvalidArgument` naming a field
/// (with a reason), or, where `precondition` allows it (the protocol
/// negotiation of a Hello), `FailedPrecondition`. Anything else (not found,
/// unavailable, internal) cannot come from checking one message.
pub fn validation_error(e: &DomainError, precondition: bool) {
    match e {
        DomainError::InvalidArgument { field, reason } => {
            assert!(!field.is_empty(), "InvalidArgument without a field: {e:?}");
            assert!(!reason.is_empty(), "InvalidArgument without a reason: {e:?}");
        }
        DomainError::FailedPrecondition(message) if precondition => {
            assert!(!message.is_empty(), "FailedPrecondition without a message")
        }
        other => panic!("validation produced a {other:?}"),
    }
    status_of(e);
}

/// An error of an engine call made with fuzzed input: anything a client may
/// see, except `Internal` (a bug or a corrupted store) and `Unavailable`
/// unless `unavailable` allows it (the store failed or the engine stopped).
pub fn engine_error(e: &DomainError, unavailable: bool) {
    match e {
        DomainError::Internal(_) => panic!("the engine reported an internal error: {e}"),
        DomainError::Unavailable(_) if !unavailable => panic!("the engine became unavailable: {e}"),
        _ => {}
    }
    status_of(e);
}

/// Most bytes a status may carry in its message and details: what gRPC
/// clients take as trailing metadata by default (grpc-core's soft limit is
/// 8 KiB; past it the client sees RESOURCE_EXHAUSTED or a reset stream, not
/// the error). Errors name fields and limits, not what was sent.
pub const MAX_STATUS_BYTES: usize = 8 * 1024;

/// The status mapping must take every error, with the error's text, in a
/// status a client can receive.
fn status_of(e: &DomainError) {
    let status = to_status(e.clone());
    assert_eq!(status.message(), e.to_string());
    let size = status.message().len() + status.details().len();
    assert!(
        size <= MAX_STATUS_BYTES,
        "a {:?} status of {size} bytes (message {}, details {}; limit {MAX_STATUS_BYTES}): {:.200}...",
        status.code(),
        status.message().len(),
        status.details().len(),
        status.message()
    );
    if matches!(e, DomainError::InvalidArgument { .. }) {
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
    }
}

/// A timestamp the server sends must be valid protobuf, at or after 1970.
pub fn wire_timestamp(what: &str, ts: &prost_types::Timestamp) -> SystemTime {
    timestamp_in(ts).unwrap_or_else(|e| panic!("{what}: the server sent an invalid timestamp {ts:?}: {e}"))
}

/// A duration the server sends must be valid protobuf and not negative.
pub fn wire_duration(what: &str, d: &prost_types::Duration) -> Duration {
    duration_in(d).unwrap_or_else(|e| panic!("{what}: the server sent an invalid duration {d:?}: {e}"))
}

/// A job reference the server sends must be one an agent can send back.
pub fn wire_job_ref(what: &str, r: Option<&pb::JobRef>) {
    if let Err(e) = convert::job_ref_in(what, r) {
        panic!("{what}: the server sent a job reference its own validation refuses ({e}): {r:?}");
    }
}

/// Every time and enum of a `QueuedJob` the server renders.
pub fn wire_job(j: &pb::QueuedJob) {
    let times = [
        ("create_time", &j.create_time),
        ("update_time", &j.update_time),
        ("ready_time", &j.ready_time),
        ("lease_expire_time", &j.lease_expire_time),
        ("finish_time", &j.finish_time),
    ];
    for (what, ts) in times {
        if let Some(ts) = ts {
            wire_timestamp(what, ts);
        }
    }
    let durations = [("lease_duration", &j.lease_duration), ("timeout", &j.timeout)];
    for (what, d) in durations {
        if let Some(d) = d {
            wire_duration(what, d);
        }
    }
    assert!(
        pb::Priority::try_from(j.priority).is_ok_and(|p| p != pb::Priority::Unspecified),
        "priority {}",
        j.priority
    );
    assert!(
        pb::QueuedJobState::try_from(j.state).is_ok_and(|s| s != pb::QueuedJobState::Unspecified),
        "state {}",
        j.state
    );
}

/// What a spec that `job_spec_in` accepted must satisfy: the domain
/// validation agrees, a job made from it at any representable time has no
/// defect, renders valid wire times through every state, and its rendering
/// is accepted again as the same spec.
pub fn accepted_spec(spec: &JobSpec) {
    if let Err(e) = validate::job_spec(spec) {
        panic!("job_spec_in accepted a spec that validate::job_spec refuses ({e}): {spec:?}");
    }
    let nows = [
        UNIX_EPOCH,
        UNIX_EPOCH + Duration::from_secs(1_767_225_600), // 2026-01-01
        latest() - Duration::from_secs(3600),
        latest(),
    ];
    for (seq, now) in nows.into_iter().enumerate() {
        let mut job = Job::new(format!("job-{seq}"), seq as u64 + 1, spec.clone(), now);
        assert_eq!(job.defect(), None, "a new job of an accepted spec is defective (now {now:?}): {job:?}");
        let wire = job_out(&job);
        wire_job(&wire);
        assert_eq!(wire.ready_time.as_ref().map(|t| wire_timestamp("ready_time", t)), Some(job.ready_time));
        assert_eq!(wire.create_time.as_ref().map(|t| wire_timestamp("create_time", t)), Some(now));
        assert_eq!(wire.lease_duration.as_ref().map(|d| wire_duration("lease_duration", d)), Some(spec.lease_duration));
        assert_eq!(wire.timeout.as_ref().map(|d| wire_duration("timeout", d)), spec.timeout);
        if seq == 1 {
            resubmitted(spec, &wire);
        }

        // Claimed the way the engine claims: leased from now, with the
        // attempt's deadline (both saturate at the latest timestamp).
        job.state = JobState::Claimed;
        job.attempt = 1;
        job.fencing_token = 1 << 32;
        job.worker_id = "agent".into();
        job.lease_expire_time = Some(later(now, spec.lease_duration));
        job.run_deadline = spec.timeout.map(|t| later(now, t));
        assert_eq!(job.defect(), None, "a claimed job of an accepted spec is defective: {job:?}");
        wire_job(&job_out(&job));
        assigned(&job);

        job.finish(JobState::Succeeded, now);
        wire_job(&job_out(&job));
    }
}

/// The rendering of an accepted spec, sent back as an enqueue request, is
/// accepted as the same spec (what a client that copies a job gets).
fn resubmitted(spec: &JobSpec, wire: &pb::QueuedJob) {
    let again = pb::EnqueueJobRequest {
        queue: wire.queue.clone(),
        payload: wire.payload.clone(),
        priority: wire.priority,
        routing: wire.routing.clone(),
        max_attempts: wire.max_attempts,
        lease_duration: wire.lease_duration,
        timeout: wire.timeout,
        idempotency_key: wire.idempotency_key.clone(),
        not_before: spec.not_before.map(to_timestamp),
        retry_policy: wire.retry_policy.clone(),
    };
    match convert::job_spec_in(&again) {
        Ok(back) => assert_eq!(&back, spec, "a rendered job does not read back as its spec"),
        Err(e) => panic!("a rendered job is refused as an enqueue request ({e}): {again:?}"),
    }
}

/// An assignment of `job` as pushed to an agent.
fn assigned(job: &Job) {
    let Some(pb::connect_response::Message::Assignment(a)) = push_out(AgentPush::Assign(Box::new(job.clone()))).message
    else {
        panic!("push_out of an assignment is not an Assignment");
    };
    wire_job_ref("assignment.job", a.job.as_ref());
    if let Some(ts) = &a.lease_expire_time {
        wire_timestamp("assignment.lease_expire_time", ts);
    }
    if let Some(d) = &a.timeout {
        wire_duration("assignment.timeout", d);
    }
}

/// A push of the engine, rendered; returns the assigned attempt, if any.
pub fn push(push: AgentPush) -> Option<tether_server::domain::AttemptRef> {
    let assigned_ref = match &push {
        AgentPush::Assign(job) => {
            assert_eq!(job.defect(), None, "the engine dispatched a defective job: {job:?}");
            assert!(job.state.is_active(), "the engine assigned a job that is {:?}", job.state);
            Some(job.attempt_ref())
        }
        _ => None,
    };
    let out = push_out(push);
    use pb::connect_response::Message as M;
    match out.message {
        Some(M::Assignment(a)) => {
            wire_job_ref("assignment.job", a.job.as_ref());
            if let Some(ts) = &a.lease_expire_time {
                wire_timestamp("assignment.lease_expire_time", ts);
            }
            if let Some(d) = &a.timeout {
                wire_duration("assignment.timeout", d);
            }
        }
        Some(M::Cancel(c)) => wire_job_ref("cancel.job", c.job.as_ref()),
        Some(M::JobUpdateAck(a)) => wire_job_ref("job_update_ack.job", a.job.as_ref()),
        Some(M::Drain(_)) | Some(M::Reconnect(_)) => {}
        Some(M::Welcome(_)) | None => panic!("push_out rendered no push message"),
    }
    assigned_ref
}
