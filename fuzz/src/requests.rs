//! Target `decode_requests`: the first byte picks a request message of
//! tether.v1 ([`KINDS`], modulo its length), the rest is that message's
//! protobuf encoding. A message that decodes goes through the same
//! conversion and validation as in its handler (`grpc::queue_service`,
//! `grpc::agent_service`), without the engine call.

use prost::Message;
use tether::v1 as pb;
use tether_server::domain::{validate, DomainError, DomainResult, DEFAULT_POOL};
use tether_server::engine::{AgentInbound, HelloInfo};
use tether_server::grpc::convert;
use tether_server::grpc::page_token::{self, Listing};
use tether_server::grpc::stream_messages::{hello_in, inbound_in, truncate, MAX_LOG_CHUNK};

use crate::checks::{accepted_spec, validation_error};

/// Every request message the server takes, in the order of their selector
/// byte (append new ones at the end: the committed seeds start with it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    EnqueueJob,
    BatchEnqueueJobs,
    GetQueuedJob,
    ListQueuedJobs,
    CancelQueuedJob,
    ClaimJob,
    StartJob,
    CompleteJob,
    FailJob,
    RenewLease,
    ListDeadLetters,
    RedriveDeadLetter,
    GetQueueStats,
    WatchQueue,
    RegisterAgent,
    GetAgent,
    ListAgents,
    Heartbeat,
    UpdateAgentStatus,
    DrainAgent,
    DeregisterAgent,
    CreateAgentPool,
    GetAgentPool,
    ListAgentPools,
    UpdateAgentPool,
    DeleteAgentPool,
    GetPoolScalingSignal,
    Connect,
}

pub const KINDS: [Kind; 28] = [
    Kind::EnqueueJob,
    Kind::BatchEnqueueJobs,
    Kind::GetQueuedJob,
    Kind::ListQueuedJobs,
    Kind::CancelQueuedJob,
    Kind::ClaimJob,
    Kind::StartJob,
    Kind::CompleteJob,
    Kind::FailJob,
    Kind::RenewLease,
    Kind::ListDeadLetters,
    Kind::RedriveDeadLetter,
    Kind::GetQueueStats,
    Kind::WatchQueue,
    Kind::RegisterAgent,
    Kind::GetAgent,
    Kind::ListAgents,
    Kind::Heartbeat,
    Kind::UpdateAgentStatus,
    Kind::DrainAgent,
    Kind::DeregisterAgent,
    Kind::CreateAgentPool,
    Kind::GetAgentPool,
    Kind::ListAgentPools,
    Kind::UpdateAgentPool,
    Kind::DeleteAgentPool,
    Kind::GetPoolScalingSignal,
    Kind::Connect,
];

impl Kind {
    pub fn selector(self) -> u8 {
        KINDS.iter().position(|k| *k == self).expect("every kind is listed") as u8
    }
}

/// The input of the target for one request.
pub fn input(kind: Kind, message: &impl Message) -> Vec<u8> {
    let mut out = vec![kind.selector()];
    message.encode(&mut out).expect("a Vec grows");
    out
}

fn decode<M: Message + Default>(body: &[u8]) -> Option<M> {
    M::decode(body).ok()
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let Some((&selector, body)) = data.split_first() else { return };
    match KINDS[selector as usize % KINDS.len()] {
        Kind::EnqueueJob => decode(body).iter().for_each(enqueue),
        Kind::BatchEnqueueJobs => decode(body).iter().for_each(batch_enqueue),
        Kind::GetQueuedJob => decode(body).iter().for_each(|r: &pb::GetQueuedJobRequest| id("id", &r.id)),
        Kind::ListQueuedJobs => decode(body).iter().for_each(list_queued),
        Kind::CancelQueuedJob => decode(body).iter().for_each(cancel),
        Kind::ClaimJob => decode(body).iter().for_each(claim),
        Kind::StartJob => {
            decode(body).iter().for_each(|r: &pb::StartJobRequest| attempt(&r.id, r.attempt, r.fencing_token))
        }
        Kind::CompleteJob => decode(body).iter().for_each(complete),
        Kind::FailJob => decode(body).iter().for_each(fail),
        Kind::RenewLease => decode(body).iter().for_each(renew),
        Kind::ListDeadLetters => decode(body).iter().for_each(list_dead_letters),
        Kind::RedriveDeadLetter => decode(body).iter().for_each(|r: &pb::RedriveDeadLetterRequest| id("id", &r.id)),
        Kind::GetQueueStats => {
            decode(body).iter().for_each(|r: &pb::GetQueueStatsRequest| name_filter("queue", &r.queue))
        }
        Kind::WatchQueue => decode(body).iter().for_each(|r: &pb::WatchQueueRequest| {
            let _ = checked(states("states", &r.states), false);
            name_filter("queue", &r.queue);
            watch_cursor(&r.cursor);
        }),
        Kind::RegisterAgent => decode(body).iter().for_each(register),
        Kind::GetAgent => decode(body).iter().for_each(|r: &pb::GetAgentRequest| id("id", &r.id)),
        Kind::ListAgents => decode(body).iter().for_each(list_agents),
        Kind::Heartbeat => decode(body).iter().for_each(heartbeat),
        Kind::UpdateAgentStatus => decode(body).iter().for_each(update_status),
        Kind::DrainAgent => decode(body).iter().for_each(|r: &pb::DrainAgentRequest| {
            id("id", &r.id);
            text("reason", &r.reason);
        }),
        Kind::DeregisterAgent => decode(body).iter().for_each(|r: &pb::DeregisterAgentRequest| id("id", &r.id)),
        Kind::CreateAgentPool => decode(body).iter().for_each(create_pool),
        Kind::GetAgentPool => decode(body).iter().for_each(|r: &pb::GetAgentPoolRequest| name("name", &r.name)),
        Kind::ListAgentPools => decode(body).iter().for_each(|r: &pb::ListAgentPoolsRequest| {
            page_size(r.page_size);
            page_token(Listing::Pools, &r.page_token);
        }),
        Kind::UpdateAgentPool => decode(body).iter().for_each(update_pool),
        Kind::DeleteAgentPool => decode(body).iter().for_each(|r: &pb::DeleteAgentPoolRequest| name("name", &r.name)),
        Kind::GetPoolScalingSignal => {
            decode(body).iter().for_each(|r: &pb::GetPoolScalingSignalRequest| name("name", &r.name))
        }
        Kind::Connect => decode(body).into_iter().for_each(connect),
    }
}

/// Checks the error of a validation result; returns the value.
fn checked<T>(result: DomainResult<T>, precondition: bool) -> Option<T> {
    match result {
        Ok(v) => Some(v),
        Err(e) => {
            validation_error(&e, precondition);
            None
        }
    }
}

fn id(field: &str, value: &str) {
    if let Some(v) = checked(convert::required(field, value), false) {
        assert_eq!(v, value);
        assert!(!v.is_empty() && v.len() <= convert::MAX_ID);
    }
}

fn truncated(s: &str) {
    let t = truncate(s.to_string());
    assert!(t.len() <= validate::MAX_ERROR_LEN, "truncate left {} bytes", t.len());
    assert!(s.starts_with(&t), "truncate did not keep a prefix");
    if s.len() <= validate::MAX_ERROR_LEN {
        assert_eq!(t, s);
    }
}

const LISTINGS: [Listing; 4] = [Listing::Jobs, Listing::DeadLetters, Listing::Agents, Listing::Pools];

/// A page token of `listing`: one it accepts names a cursor that the server
/// would issue again as a token of that listing, and no other listing
/// accepts it.
fn page_token(listing: Listing, token: &str) {
    let decoded = checked(page_token::decode(listing, token), false);
    if let Some(Some(cursor)) = &decoded {
        assert_eq!(page_token::decode(listing, &page_token::encode(listing, Some(cursor))), Ok(Some(cursor.clone())));
        for other in LISTINGS.into_iter().filter(|l| *l != listing) {
            assert!(page_token::decode(other, token).is_err(), "a {listing:?} token is also a {other:?} token");
        }
    }
    if matches!(listing, Listing::Jobs | Listing::DeadLetters) {
        if let Some(Some(seq)) = checked(page_token::decode_seq(listing, token), false) {
            assert!(matches!(decoded, Some(Some(_))), "decode_seq took a token decode refuses");
            assert_eq!(page_token::decode_seq(listing, &page_token::encode_seq(listing, Some(seq))), Ok(Some(seq)));
        }
    }
    assert_eq!(page_token::encode(listing, None), "");
}

/// A watch cursor: one that is accepted is exactly what the server would
/// encode for it (one spelling per position), within the length limit.
fn watch_cursor(text: &str) {
    use tether_server::grpc::event_cursor;
    if let Some(Some(cursor)) = checked(event_cursor::decode("cursor", text), false) {
        assert!(text.len() <= event_cursor::MAX_CURSOR);
        assert_eq!(event_cursor::encode(&cursor), text, "a second spelling of a cursor was accepted");
    }
}

/// An optional name filter: empty is none, anything else a valid name.
fn name_filter(field: &str, value: &str) {
    if let Some(filter) = checked(convert::name_filter(field, value), false) {
        assert_eq!(filter.is_none(), value.is_empty());
        assert!(filter.is_none_or(|f| f == value && validate::name(field, &f, validate::MAX_NAME).is_ok()));
    }
}

/// A required name.
fn name(field: &str, value: &str) {
    if let Some(n) = checked(convert::name_in(field, value), false) {
        assert_eq!(n, value);
        assert!(!n.is_empty() && n.len() <= validate::MAX_NAME);
    }
}

/// Free text with a limit: kept whole or refused.
fn text(field: &str, value: &str) {
    if let Some(t) = checked(convert::text_in(field, value.to_string()), false) {
        assert_eq!(t, value);
        assert!(t.len() <= validate::MAX_ERROR_LEN);
    } else {
        assert!(value.len() > validate::MAX_ERROR_LEN, "text_in refused {} bytes", value.len());
    }
}

fn states(field: &str, values: &[i32]) -> DomainResult<Vec<tether_server::domain::JobState>> {
    values.iter().enumerate().map(|(i, s)| convert::state_in(&format!("{field}[{i}]"), *s)).collect()
}

fn labels(field: &str, labels: &std::collections::HashMap<String, String>) {
    if let Some(out) = checked(convert::labels_in(field, labels), false) {
        assert_eq!(out.len(), labels.len());
        assert!(out.len() <= validate::MAX_LABELS);
        for (k, v) in &out {
            assert_eq!(labels.get(k), Some(v));
            assert!(validate::name("key", k, validate::MAX_LABEL_LEN).is_ok());
            assert!(v.len() <= validate::MAX_LABEL_LEN);
        }
    }
}

// ---- QueueService ------------------------------------------------------------

fn enqueue(req: &pb::EnqueueJobRequest) {
    if let Some(spec) = checked(convert::job_spec_in(req), false) {
        assert_eq!(spec.queue, req.queue);
        let priority = checked(convert::priority_in("priority", req.priority), false);
        assert_eq!(priority, Some(spec.priority));
        if req.priority != pb::Priority::Unspecified as i32 {
            assert_eq!(convert::priority_out(spec.priority) as i32, req.priority);
        }
        if req.routing.as_ref().is_none_or(|r| r.pool.is_empty()) {
            assert_eq!(spec.routing.pool, DEFAULT_POOL);
        }
        accepted_spec(&spec);
    }
}

fn batch_enqueue(req: &pb::BatchEnqueueJobsRequest) {
    // As BatchEnqueueJobs: the size first, then every request, named.
    if req.requests.is_empty() || req.requests.len() > validate::MAX_BATCH {
        return;
    }
    for (i, r) in req.requests.iter().enumerate() {
        let prefix = format!("requests[{i}].");
        match convert::job_spec_in(r).map_err(|e| e.under(&prefix)) {
            Ok(spec) => accepted_spec(&spec),
            Err(e) => {
                validation_error(&e, false);
                if let DomainError::InvalidArgument { field, .. } = &e {
                    assert!(field.starts_with(&prefix) && field.len() > prefix.len(), "batch field {field:?}");
                }
            }
        }
    }
}

fn list_queued(req: &pb::ListQueuedJobsRequest) {
    name_filter("queue", &req.queue);
    if let Some(states) = checked(states("states", &req.states), false) {
        assert_eq!(states.len(), req.states.len());
    }
    page_size(req.page_size);
    page_token(Listing::Jobs, &req.page_token);
}

fn page_size(value: i32) {
    if let Some(n) = checked(validate::page_size("page_size", value), false) {
        assert!((1..=validate::MAX_PAGE_SIZE).contains(&n), "page size {n}");
    }
}

fn cancel(req: &pb::CancelQueuedJobRequest) {
    id("id", &req.id);
    text("reason", &req.reason);
}

fn claim(req: &pb::ClaimJobRequest) {
    id("worker_id", &req.worker_id);
    name_filter("queue", &req.queue);
    if let Some(pool) = checked(convert::pool_name_in("pool", &req.pool), false) {
        assert!(validate::name("pool", &pool, validate::MAX_NAME).is_ok());
        assert!(pool == req.pool || (req.pool.is_empty() && pool == DEFAULT_POOL));
    }
    labels("labels", &req.labels);
}

fn attempt(id: &str, attempt: u32, token: u64) {
    if let Some(r) = checked(convert::attempt_in(id, attempt, token), false) {
        assert!(r.attempt >= 1 && r.fencing_token >= 1 && !r.job_id.is_empty());
        let wire = convert::job_ref_out(&r);
        assert_eq!(convert::job_ref_in("job", Some(&wire)), Ok(r));
    }
}

fn complete(req: &pb::CompleteJobRequest) {
    attempt(&req.id, req.attempt, req.fencing_token);
}

fn fail(req: &pb::FailJobRequest) {
    attempt(&req.id, req.attempt, req.fencing_token);
    text("error", &req.error);
}

fn renew(req: &pb::RenewLeaseRequest) {
    attempt(&req.id, req.attempt, req.fencing_token);
    if let Some(Some(d)) = checked(convert::duration_in("lease_duration", req.lease_duration.as_ref()), false) {
        let back = tether::time::to_duration(d);
        assert_eq!(tether::time::duration_in(&back), Ok(d));
    }
}

fn list_dead_letters(req: &pb::ListDeadLettersRequest) {
    page_size(req.page_size);
    page_token(Listing::DeadLetters, &req.page_token);
    name_filter("queue", &req.queue);
}

// ---- AgentService ------------------------------------------------------------

fn register(req: &pb::RegisterAgentRequest) {
    let _ = checked(validate::name("name", &req.name, validate::MAX_NAME), false);
    let _ = checked(convert::pool_name_in("pool", &req.pool), false);
    labels("labels", &req.labels);
    if let Some(slots) = checked(convert::slots_in("slots", req.slots), false) {
        assert!((1..=validate::MAX_SLOTS).contains(&slots));
    }
}

fn list_agents(req: &pb::ListAgentsRequest) {
    name_filter("pool", &req.pool);
    page_token(Listing::Agents, &req.page_token);
    for (i, h) in req.health.iter().enumerate() {
        if let Some(health) = checked(convert::health_in(&format!("health[{i}]"), *h), false) {
            assert_eq!(convert::health_out(health) as i32, *h);
        }
    }
    labels("labels", &req.labels);
    page_size(req.page_size);
}

fn heartbeat(req: &pb::HeartbeatRequest) {
    id("agent_id", &req.agent_id);
    for (i, r) in req.running_jobs.iter().enumerate() {
        let _ = checked(convert::job_ref_in(&format!("running_jobs[{i}]"), Some(r)), false);
    }
    metrics(req.metrics.as_ref());
}

fn metrics(m: Option<&pb::AgentMetrics>) {
    let out = convert::metrics_in(m);
    assert!(out.cpu_percent.is_finite() && (0.0..=100_000.0).contains(&out.cpu_percent), "cpu {}", out.cpu_percent);
}

fn update_status(req: &pb::UpdateAgentStatusRequest) {
    id("id", &req.id);
    if let Some(s) = checked(convert::scheduling_in("scheduling_status", req.scheduling_status), false) {
        assert_eq!(convert::scheduling_out(s) as i32, req.scheduling_status);
    }
    text("reason", &req.reason);
}

fn create_pool(req: &pb::CreateAgentPoolRequest) {
    if let Some(pool) = checked(convert::pool_in("pool", req.pool.as_ref(), true), false) {
        assert!(pool.desired_size >= pool.min_size, "a created pool wants fewer than its minimum");
        assert!(pool.max_size > 0);
        if pool.validate().is_ok() {
            // What the server renders reads back as the same pool.
            let wire = convert::pool_out(&pool);
            assert_eq!(convert::pool_in("pool", Some(&wire), false), Ok(pool));
        }
    }
}

fn update_pool(req: &pb::UpdateAgentPoolRequest) {
    if let Some(fields) = checked(convert::pool_fields_in(req.update_mask.as_ref()), false) {
        assert_eq!(fields.len(), req.update_mask.as_ref().map_or(0, |m| m.paths.len()));
    }
    if let Some(pool) = checked(convert::pool_in("pool", req.pool.as_ref(), false), false) {
        let p = req.pool.as_ref().expect("a pool was given");
        assert_eq!((pool.min_size, pool.max_size, pool.desired_size), (p.min_size, p.max_size, p.desired_size));
    }
}

/// A stream message: a Hello as the first message, anything else as a
/// later one under both protocol versions.
fn connect(req: pb::ConnectRequest) {
    use pb::connect_request::Message as M;
    match req.message {
        None => {}
        Some(M::Hello(h)) => {
            hello(&h);
        }
        Some(message) => {
            match &message {
                M::AssignmentAck(a) => truncated(&a.reason),
                M::JobProgress(p) => truncated(&p.message),
                M::JobFinished(f) => truncated(&f.error),
                _ => {}
            }
            for protocol in tether::PROTOCOL_VERSION_MIN..=tether::PROTOCOL_VERSION_MAX {
                inbound(message.clone(), protocol);
            }
            // A Hello after the first message is refused.
            let again = inbound_in(M::Hello(pb::Hello::default()), tether::PROTOCOL_VERSION_MAX);
            assert!(matches!(again, Err(DomainError::InvalidArgument { .. })));
        }
    }
}

/// Validates a Hello; what it accepts holds to the limits.
pub fn hello(h: &pb::Hello) -> Option<(HelloInfo, u32)> {
    let (info, protocol) = checked(hello_in(h), true)?;
    assert!((tether::PROTOCOL_VERSION_MIN..=tether::PROTOCOL_VERSION_MAX).contains(&protocol));
    assert!(protocol >= h.min_protocol_version && protocol <= h.max_protocol_version, "protocol {protocol}");
    assert_eq!(info.answer_starts, protocol < tether::PROTOCOL_LEAN_STARTS);
    assert!((1..=validate::MAX_SLOTS).contains(&info.slots));
    assert!(validate::name("name", &info.name, validate::MAX_NAME).is_ok());
    assert!(validate::name("pool", &info.pool, validate::MAX_NAME).is_ok());
    assert_eq!(info.running.len(), h.running_jobs.len());
    assert!(info.running.iter().all(|r| r.attempt >= 1 && r.fencing_token >= 1 && !r.job_id.is_empty()));
    Some((info, protocol))
}

/// Converts a later stream message; what it accepts holds to the limits.
pub fn inbound(message: pb::connect_request::Message, protocol: u32) -> Option<AgentInbound> {
    let out = checked(inbound_in(message, protocol), false)?;
    let r = |r: &tether_server::domain::AttemptRef| {
        assert!(r.attempt >= 1 && r.fencing_token >= 1 && !r.job_id.is_empty() && r.job_id.len() <= convert::MAX_ID)
    };
    match &out {
        AgentInbound::Heartbeat { metrics, running, .. } => {
            assert!(metrics.cpu_percent.is_finite() && (0.0..=100_000.0).contains(&metrics.cpu_percent));
            running.iter().for_each(r);
        }
        AgentInbound::AssignmentAck { job, accepted, started, reason } => {
            r(job);
            assert!(!started || (*accepted && protocol >= tether::PROTOCOL_LEAN_STARTS));
            assert!(reason.len() <= validate::MAX_ERROR_LEN);
        }
        AgentInbound::Started { job } => r(job),
        AgentInbound::Progress { job, percent, message } => {
            r(job);
            assert!((0.0..=100.0).contains(percent), "percent {percent}");
            assert!(message.len() <= validate::MAX_ERROR_LEN);
        }
        AgentInbound::Log { job, data, .. } => {
            r(job);
            assert!(data.len() <= MAX_LOG_CHUNK);
        }
        AgentInbound::Finished { job, result, exit_code, .. } => {
            r(job);
            assert!(result.len() <= validate::MAX_RESULT_BYTES);
            assert_ne!(*exit_code, Some(0));
        }
    }
    Some(out)
}
