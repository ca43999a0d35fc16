//! Translation between wire messages and domain types, with validation of
//! every field that comes from the wire.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use tether::time::{duration_in as wire_duration, timestamp_in, to_duration, to_timestamp, TimeError};
use tether::v1 as pb;

use crate::domain::validate::{self, DEFAULT_LEASE, DEFAULT_MAX_ATTEMPTS};
use crate::domain::{
    Agent, AttemptRef, DomainError, DomainResult, Health, JobSpec, JobState, Metrics, Pool, Priority, RetryPolicy,
    Routing, ScalingSignal, SchedulingStatus, DEFAULT_POOL,
};
use crate::engine::{AgentView, PoolField, QueueStats};

// ---- enums -----------------------------------------------------------------

/// Decodes a priority; unspecified means NORMAL.
pub fn priority_in(field: &str, value: i32) -> DomainResult<Priority> {
    match pb::Priority::try_from(value) {
        Ok(pb::Priority::Unspecified) | Ok(pb::Priority::Normal) => Ok(Priority::Normal),
        Ok(pb::Priority::Low) => Ok(Priority::Low),
        Ok(pb::Priority::High) => Ok(Priority::High),
        Ok(pb::Priority::Critical) => Ok(Priority::Critical),
        Err(_) => Err(DomainError::invalid(field, format!("unknown priority value {value}"))),
    }
}

pub fn priority_out(p: Priority) -> pb::Priority {
    match p {
        Priority::Low => pb::Priority::Low,
        Priority::Normal => pb::Priority::Normal,
        Priority::High => pb::Priority::High,
        Priority::Critical => pb::Priority::Critical,
    }
}

/// Decodes a state filter value; unspecified and unknown values are refused.
pub fn state_in(field: &str, value: i32) -> DomainResult<JobState> {
    match pb::QueuedJobState::try_from(value) {
        Ok(pb::QueuedJobState::Queued) => Ok(JobState::Queued),
        Ok(pb::QueuedJobState::Claimed) => Ok(JobState::Claimed),
        Ok(pb::QueuedJobState::Running) => Ok(JobState::Running),
        Ok(pb::QueuedJobState::Succeeded) => Ok(JobState::Succeeded),
        Ok(pb::QueuedJobState::Failed) => Ok(JobState::Failed),
        Ok(pb::QueuedJobState::DeadLettered) => Ok(JobState::DeadLettered),
        Ok(pb::QueuedJobState::Cancelled) => Ok(JobState::Cancelled),
        Ok(pb::QueuedJobState::Unspecified) => {
            Err(DomainError::invalid(field, "QUEUED_JOB_STATE_UNSPECIFIED is not a state"))
        }
        Err(_) => Err(DomainError::invalid(field, format!("unknown state value {value}"))),
    }
}

pub fn state_out(s: JobState) -> pb::QueuedJobState {
    match s {
        JobState::Queued => pb::QueuedJobState::Queued,
        JobState::Claimed => pb::QueuedJobState::Claimed,
        JobState::Running => pb::QueuedJobState::Running,
        JobState::Succeeded => pb::QueuedJobState::Succeeded,
        JobState::Failed => pb::QueuedJobState::Failed,
        JobState::DeadLettered => pb::QueuedJobState::DeadLettered,
        JobState::Cancelled => pb::QueuedJobState::Cancelled,
    }
}

pub fn health_in(field: &str, value: i32) -> DomainResult<Health> {
    match pb::AgentHealth::try_from(value) {
        Ok(pb::AgentHealth::Registering) => Ok(Health::Registering),
        Ok(pb::AgentHealth::Healthy) => Ok(Health::Healthy),
        Ok(pb::AgentHealth::Degraded) => Ok(Health::Degraded),
        Ok(pb::AgentHealth::Unhealthy) => Ok(Health::Unhealthy),
        Ok(pb::AgentHealth::Offline) => Ok(Health::Offline),
        Ok(pb::AgentHealth::Terminated) => Ok(Health::Terminated),
        Ok(pb::AgentHealth::Unspecified) => {
            Err(DomainError::invalid(field, "AGENT_HEALTH_UNSPECIFIED is not a health state"))
        }
        Err(_) => Err(DomainError::invalid(field, format!("unknown health value {value}"))),
    }
}

/// A health filter: each health at most once.
pub fn health_filter_in(field: &str, values: &[i32]) -> DomainResult<Vec<Health>> {
    distinct(field, values, 6, health_in)
}

/// A filter of enum values: at most `max` entries (one per value), each
/// decoded by `decode` with its index named; repeats are dropped.
pub fn distinct<T: PartialEq>(
    field: &str,
    values: &[i32],
    max: usize,
    decode: impl Fn(&str, i32) -> DomainResult<T>,
) -> DomainResult<Vec<T>> {
    if values.len() > max {
        return Err(DomainError::invalid(field, format!("lists {} values; there are only {max}", values.len())));
    }
    let mut out = Vec::with_capacity(values.len());
    for (i, v) in values.iter().enumerate() {
        let value = decode(&format!("{field}[{i}]"), *v)?;
        if !out.contains(&value) {
            out.push(value);
        }
    }
    Ok(out)
}

pub fn health_out(h: Health) -> pb::AgentHealth {
    match h {
        Health::Registering => pb::AgentHealth::Registering,
        Health::Healthy => pb::AgentHealth::Healthy,
        Health::Degraded => pb::AgentHealth::Degraded,
        Health::Unhealthy => pb::AgentHealth::Unhealthy,
        Health::Offline => pb::AgentHealth::Offline,
        Health::Terminated => pb::AgentHealth::Terminated,
    }
}

pub fn scheduling_out(s: SchedulingStatus) -> pb::AgentSchedulingStatus {
    match s {
        SchedulingStatus::Active => pb::AgentSchedulingStatus::Active,
        SchedulingStatus::Cordoned => pb::AgentSchedulingStatus::Cordoned,
        SchedulingStatus::Draining => pb::AgentSchedulingStatus::Draining,
        SchedulingStatus::OutOfService => pb::AgentSchedulingStatus::OutOfService,
    }
}

// ---- small fields ------------------------------------------------------------

/// Longest id accepted in a request.
pub const MAX_ID: usize = validate::MAX_NAME * 2;

/// A required id field.
pub fn required(field: &str, value: &str) -> DomainResult<String> {
    if value.is_empty() {
        return Err(DomainError::invalid(field, "is required"));
    }
    if value.len() > MAX_ID {
        return Err(DomainError::invalid(field, format!("must be at most {MAX_ID} bytes")));
    }
    Ok(value.to_string())
}

/// An optional filter string: empty means none.
pub fn optional(value: &str) -> Option<String> {
    (!value.is_empty()).then(|| value.to_string())
}

pub fn pool_name_in(field: &str, value: &str) -> DomainResult<String> {
    if value.is_empty() {
        return Ok(DEFAULT_POOL.to_string());
    }
    validate::name(field, value, validate::MAX_NAME)?;
    Ok(value.to_string())
}

pub fn labels_in(
    field: &str,
    labels: &std::collections::HashMap<String, String>,
) -> DomainResult<BTreeMap<String, String>> {
    validate::labels(field, labels.iter())?;
    Ok(labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
}

/// A duration from the wire: `None` when unset; refused (naming `field`)
/// when negative, unnormalized or outside protobuf's range.
pub fn duration_in(field: &str, value: Option<&prost_types::Duration>) -> DomainResult<Option<Duration>> {
    match value {
        None => Ok(None),
        Some(d) => wire_duration(d).map(Some).map_err(|e| DomainError::invalid(field, time_reason(e, "duration"))),
    }
}

/// A timestamp from the wire: any valid protobuf timestamp; one before 1970
/// becomes the epoch (callers only take times where the past means "now").
pub fn timestamp_in_field(field: &str, value: Option<&prost_types::Timestamp>) -> DomainResult<Option<SystemTime>> {
    match value {
        None => Ok(None),
        Some(ts) => match timestamp_in(ts) {
            Ok(t) => Ok(Some(t)),
            Err(TimeError::Negative) => Ok(Some(SystemTime::UNIX_EPOCH)),
            Err(e) => Err(DomainError::invalid(field, time_reason(e, "timestamp"))),
        },
    }
}

fn time_reason(e: TimeError, kind: &str) -> String {
    match e {
        TimeError::OutOfRange if kind == "timestamp" => {
            "is not a valid timestamp: seconds must lie in years 1 to 9999 (-62135596800..=253402300799)".to_string()
        }
        TimeError::OutOfRange => {
            "is not a valid duration: seconds must be at most 315576000000 (10,000 years)".to_string()
        }
        TimeError::NanosOutOfRange => format!("is not a valid {kind}: nanos must be between 0 and 999999999"),
        other => format!("{other}"),
    }
}

/// A (job id, attempt, fencing token) of the unary calls.
pub fn attempt_in(id: &str, attempt: u32, fencing_token: u64) -> DomainResult<AttemptRef> {
    let job_id = required("id", id)?;
    if attempt == 0 {
        return Err(DomainError::invalid("attempt", "is required (attempts count from 1)"));
    }
    if fencing_token == 0 {
        return Err(DomainError::invalid("fencing_token", "is required"));
    }
    Ok(AttemptRef { job_id, attempt, fencing_token })
}

/// A `JobRef` of the stream: every part is required.
pub fn job_ref_in(field: &str, r: Option<&pb::JobRef>) -> DomainResult<AttemptRef> {
    let r = r.ok_or_else(|| DomainError::invalid(field, "is required"))?;
    if r.job_id.is_empty() {
        return Err(DomainError::invalid(format!("{field}.job_id"), "is required"));
    }
    if r.job_id.len() > MAX_ID {
        return Err(DomainError::invalid(format!("{field}.job_id"), format!("must be at most {MAX_ID} bytes")));
    }
    if r.attempt == 0 {
        return Err(DomainError::invalid(format!("{field}.attempt"), "is required (attempts count from 1)"));
    }
    if r.fencing_token == 0 {
        return Err(DomainError::invalid(format!("{field}.fencing_token"), "is required"));
    }
    Ok(AttemptRef { job_id: r.job_id.clone(), attempt: r.attempt, fencing_token: r.fencing_token })
}

pub fn job_ref_out(r: &AttemptRef) -> pb::JobRef {
    pb::JobRef { job_id: r.job_id.clone(), attempt: r.attempt, fencing_token: r.fencing_token }
}

// ---- jobs ----------------------------------------------------------------

/// Validates an enqueue request. Field names are the request's own; a batch
/// prefixes them with [`DomainError::under`] (only on failure: no name is
/// built per request).
pub fn job_spec_in(req: &pb::EnqueueJobRequest) -> DomainResult<JobSpec> {
    let priority = priority_in("priority", req.priority)?;
    let routing = match &req.routing {
        None => Routing { pool: DEFAULT_POOL.to_string(), required_labels: BTreeMap::new() },
        Some(r) => Routing {
            pool: if r.pool.is_empty() { DEFAULT_POOL.to_string() } else { r.pool.clone() },
            required_labels: r.required_labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        },
    };
    let spec = JobSpec {
        queue: req.queue.clone(),
        payload: req.payload.clone(),
        priority,
        routing,
        max_attempts: if req.max_attempts == 0 { DEFAULT_MAX_ATTEMPTS } else { req.max_attempts },
        lease_duration: duration_in("lease_duration", req.lease_duration.as_ref())?.unwrap_or(DEFAULT_LEASE),
        timeout: duration_in("timeout", req.timeout.as_ref())?,
        idempotency_key: (!req.idempotency_key.is_empty()).then(|| req.idempotency_key.clone()),
        not_before: timestamp_in_field("not_before", req.not_before.as_ref())?,
        retry: retry_policy_in(req.retry_policy.as_ref())?,
    };
    validate::job_spec(&spec)?;
    Ok(spec)
}

fn retry_policy_in(policy: Option<&pb::RetryPolicy>) -> DomainResult<RetryPolicy> {
    let Some(p) = policy else { return Ok(RetryPolicy::default()) };
    if p.exit_codes.len() > validate::MAX_RETRY_EXIT_CODES {
        // Checked before collecting: the list may be huge.
        return Err(DomainError::invalid(
            "retry_policy.exit_codes",
            format!("lists {} codes; the limit is {}", p.exit_codes.len(), validate::MAX_RETRY_EXIT_CODES),
        ));
    }
    if let Some(i) = p.exit_codes.iter().position(|&c| c == 0) {
        return Err(DomainError::invalid(
            format!("retry_policy.exit_codes[{i}]"),
            "0 is success, not a failure to retry",
        ));
    }
    Ok(RetryPolicy { any_failure: p.any_failure, exit_codes: p.exit_codes.iter().copied().collect() })
}

pub fn retry_policy_out(policy: &RetryPolicy) -> Option<pb::RetryPolicy> {
    (*policy != RetryPolicy::default()).then(|| pb::RetryPolicy {
        any_failure: policy.any_failure,
        exit_codes: policy.exit_codes.iter().copied().collect(),
    })
}

pub fn job_out(job: &crate::domain::Job) -> pb::QueuedJob {
    pb::QueuedJob {
        id: job.id.clone(),
        queue: job.spec.queue.clone(),
        payload: job.spec.payload.clone(),
        priority: priority_out(job.spec.priority) as i32,
        routing: Some(pb::Routing {
            pool: job.spec.routing.pool.clone(),
            required_labels: job.spec.routing.required_labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        }),
        max_attempts: job.spec.max_attempts,
        lease_duration: Some(to_duration(job.spec.lease_duration)),
        timeout: job.spec.timeout.map(to_duration),
        idempotency_key: job.spec.idempotency_key.clone().unwrap_or_default(),
        state: state_out(job.state) as i32,
        attempt: job.attempt,
        fencing_token: job.fencing_token,
        worker_id: job.worker_id.clone(),
        create_time: Some(to_timestamp(job.create_time)),
        update_time: Some(to_timestamp(job.update_time)),
        ready_time: (job.state == JobState::Queued).then(|| to_timestamp(job.ready_time)),
        lease_expire_time: job.lease_expire_time.map(to_timestamp),
        result: job.result.clone(),
        last_error: job.last_error.clone(),
        finish_time: job.finish_time.map(to_timestamp),
        retry_policy: retry_policy_out(&job.spec.retry),
    }
}

pub fn stats_out(stats: &QueueStats) -> pb::GetQueueStatsResponse {
    pb::GetQueueStatsResponse {
        by_state: stats
            .by_state
            .iter()
            .map(|(s, n)| pb::StateCount { state: state_out(*s) as i32, count: *n })
            .collect(),
        queued_by_priority: stats
            .queued_by_priority
            .iter()
            .map(|(p, n)| pb::PriorityCount { priority: priority_out(*p) as i32, count: *n })
            .collect(),
        oldest_queued_age: Some(to_duration(stats.oldest_queued_age)),
    }
}

// ---- agents ----------------------------------------------------------------

pub fn metrics_in(m: Option<&pb::AgentMetrics>) -> Metrics {
    m.map(|m| Metrics {
        cpu_percent: if m.cpu_percent.is_finite() { m.cpu_percent.clamp(0.0, 100_000.0) } else { 0.0 },
        memory_used_bytes: m.memory_used_bytes,
        memory_total_bytes: m.memory_total_bytes,
        disk_used_bytes: m.disk_used_bytes,
        disk_total_bytes: m.disk_total_bytes,
        running_jobs: m.running_jobs,
    })
    .unwrap_or_default()
}

pub fn metrics_out(m: &Metrics) -> pb::AgentMetrics {
    pb::AgentMetrics {
        cpu_percent: m.cpu_percent,
        memory_used_bytes: m.memory_used_bytes,
        memory_total_bytes: m.memory_total_bytes,
        disk_used_bytes: m.disk_used_bytes,
        disk_total_bytes: m.disk_total_bytes,
        running_jobs: m.running_jobs,
    }
}

pub fn slots_in(field: &str, slots: u32) -> DomainResult<u32> {
    if slots == 0 || slots > validate::MAX_SLOTS {
        return Err(DomainError::invalid(field, format!("must be between 1 and {}", validate::MAX_SLOTS)));
    }
    Ok(slots)
}

pub fn agent_out(view: &AgentView) -> pb::Agent {
    let a: &Agent = &view.agent;
    pb::Agent {
        id: a.id.clone(),
        name: a.name.clone(),
        pool: a.pool.clone(),
        labels: a.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        slots: a.slots,
        health: health_out(a.health) as i32,
        scheduling_status: scheduling_out(a.scheduling) as i32,
        connected: view.connected,
        version: a.version.clone(),
        running_jobs: view.running.iter().map(job_ref_out).collect(),
        metrics: Some(metrics_out(&a.metrics)),
        metrics_history: view
            .metrics_history
            .iter()
            .map(|s| pb::AgentMetricsSample {
                time: Some(to_timestamp(s.time)),
                metrics: Some(metrics_out(&s.metrics)),
            })
            .collect(),
        create_time: Some(to_timestamp(a.create_time)),
        last_seen_time: Some(to_timestamp(a.last_seen_time)),
        health_reason: a.health_reason.clone(),
    }
}

pub fn scheduling_in(field: &str, value: i32) -> DomainResult<SchedulingStatus> {
    match pb::AgentSchedulingStatus::try_from(value) {
        Ok(pb::AgentSchedulingStatus::Active) => Ok(SchedulingStatus::Active),
        Ok(pb::AgentSchedulingStatus::Cordoned) => Ok(SchedulingStatus::Cordoned),
        Ok(pb::AgentSchedulingStatus::Draining) => Ok(SchedulingStatus::Draining),
        Ok(pb::AgentSchedulingStatus::OutOfService) => Ok(SchedulingStatus::OutOfService),
        Ok(pb::AgentSchedulingStatus::Unspecified) => Err(DomainError::invalid(field, "is required")),
        Err(_) => Err(DomainError::invalid(field, format!("unknown scheduling status {value}"))),
    }
}

/// A pool from the wire; `max_size` 0 means the largest allowed.
pub fn pool_in(field: &str, pool: Option<&pb::AgentPool>, creating: bool) -> DomainResult<Pool> {
    let p = pool.ok_or_else(|| DomainError::invalid(field, "is required"))?;
    validate::name(&format!("{field}.name"), &p.name, validate::MAX_NAME)?;
    if p.description.len() > crate::domain::pool::MAX_DESCRIPTION {
        return Err(DomainError::invalid(
            format!("{field}.description"),
            format!("must be at most {} bytes", crate::domain::pool::MAX_DESCRIPTION),
        ));
    }
    for (name, size) in [("min_size", p.min_size), ("max_size", p.max_size), ("desired_size", p.desired_size)] {
        if size > crate::domain::pool::MAX_POOL_SIZE {
            return Err(DomainError::invalid(
                format!("{field}.{name}"),
                format!("must be at most {}", crate::domain::pool::MAX_POOL_SIZE),
            ));
        }
        // The sizes bound each other where max_size is set (0 on create
        // means the largest allowed).
        if name != "max_size" && p.max_size != 0 && size > p.max_size {
            return Err(DomainError::invalid(
                format!("{field}.{name}"),
                format!("{size} exceeds max_size {}", p.max_size),
            ));
        }
    }
    let mut max_size = p.max_size;
    if creating && max_size == 0 {
        max_size = crate::domain::pool::MAX_POOL_SIZE;
    }
    let mut desired_size = p.desired_size;
    if creating && desired_size < p.min_size {
        desired_size = p.min_size;
    }
    Ok(Pool {
        name: p.name.clone(),
        description: p.description.clone(),
        min_size: p.min_size,
        max_size,
        desired_size,
        default_labels: labels_in(&format!("{field}.default_labels"), &p.default_labels)?,
        create_time: std::time::SystemTime::UNIX_EPOCH,
        update_time: std::time::SystemTime::UNIX_EPOCH,
    })
}

pub fn pool_out(p: &Pool) -> pb::AgentPool {
    pb::AgentPool {
        name: p.name.clone(),
        description: p.description.clone(),
        min_size: p.min_size,
        max_size: p.max_size,
        desired_size: p.desired_size,
        default_labels: p.default_labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        create_time: Some(to_timestamp(p.create_time)),
        update_time: Some(to_timestamp(p.update_time)),
    }
}

pub fn pool_fields_in(mask: Option<&prost_types::FieldMask>) -> DomainResult<Vec<PoolField>> {
    let mask = mask.ok_or_else(|| DomainError::invalid("update_mask", "is required"))?;
    if mask.paths.is_empty() {
        return Err(DomainError::invalid("update_mask.paths", "must name at least one field"));
    }
    mask.paths
        .iter()
        .enumerate()
        .map(|(i, path)| match path.as_str() {
            "description" => Ok(PoolField::Description),
            "min_size" | "minSize" => Ok(PoolField::MinSize),
            "max_size" | "maxSize" => Ok(PoolField::MaxSize),
            "desired_size" | "desiredSize" => Ok(PoolField::DesiredSize),
            "default_labels" | "defaultLabels" => Ok(PoolField::DefaultLabels),
            other => Err(DomainError::invalid(
                format!("update_mask.paths[{i}]"),
                format!(
                    "{} is not an updatable field (description, min_size, max_size, desired_size, default_labels)",
                    validate::shown(other)
                ),
            )),
        })
        .collect()
}

pub fn scaling_out(s: &ScalingSignal, now: std::time::SystemTime) -> pb::GetPoolScalingSignalResponse {
    pb::GetPoolScalingSignalResponse {
        desired_agents: s.desired_agents,
        current_agents: s.current_agents,
        queued_jobs: s.queued_jobs,
        running_jobs: s.running_jobs,
        slots_per_agent: s.slots_per_agent,
        min_size: s.min_size,
        max_size: s.max_size,
        compute_time: Some(to_timestamp(now)),
    }
}

/// An optional name filter (queue, pool): empty means none; otherwise a
/// name as [`validate::name`] defines it.
pub fn name_filter(field: &str, value: &str) -> DomainResult<Option<String>> {
    if value.is_empty() {
        return Ok(None);
    }
    validate::name(field, value, validate::MAX_NAME)?;
    Ok(Some(value.to_string()))
}

/// A required name naming a pool (or other named thing) to look up.
pub fn name_in(field: &str, value: &str) -> DomainResult<String> {
    validate::name(field, value, validate::MAX_NAME)?;
    Ok(value.to_string())
}

/// Free text with a documented limit (reasons): longer is refused.
pub fn text_in(field: &str, value: String) -> DomainResult<String> {
    if value.len() > validate::MAX_ERROR_LEN {
        return Err(DomainError::invalid(field, format!("must be at most {} bytes", validate::MAX_ERROR_LEN)));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_priority_is_refused_with_its_field() {
        let err = priority_in("priority", 42).err();
        assert_eq!(err, Some(DomainError::invalid("priority", "unknown priority value 42")));
        assert_eq!(priority_in("priority", 0).ok(), Some(Priority::Normal));
    }

    #[test]
    fn enqueue_defaults() {
        let req = pb::EnqueueJobRequest { queue: "q".into(), ..Default::default() };
        let spec = job_spec_in(&req).ok();
        let spec = spec.as_ref();
        assert_eq!(spec.map(|s| s.max_attempts), Some(DEFAULT_MAX_ATTEMPTS));
        assert_eq!(spec.map(|s| s.lease_duration), Some(DEFAULT_LEASE));
        assert_eq!(spec.map(|s| s.routing.pool.as_str()), Some(DEFAULT_POOL));
    }

    #[test]
    fn enqueue_rejects_bad_fields() {
        let empty = pb::EnqueueJobRequest::default();
        assert!(matches!(job_spec_in(&empty), Err(DomainError::InvalidArgument { field, .. }) if field == "queue"));
        let big = pb::EnqueueJobRequest {
            queue: "q".into(),
            payload: vec![0u8; validate::MAX_PAYLOAD_BYTES + 1].into(),
            ..Default::default()
        };
        assert!(matches!(job_spec_in(&big), Err(DomainError::InvalidArgument { field, .. }) if field == "payload"));
        let lease = pb::EnqueueJobRequest {
            queue: "q".into(),
            lease_duration: Some(prost_types::Duration { seconds: -5, nanos: 0 }),
            ..Default::default()
        };
        assert!(
            matches!(job_spec_in(&lease).map_err(|e| e.under("requests[3].")), Err(DomainError::InvalidArgument { field, .. }) if field == "requests[3].lease_duration")
        );
    }
}
