//! Translation between DashboardService messages and domain types.

use std::collections::BTreeMap;
use std::time::SystemTime;

use tether::time::{to_duration, to_timestamp};
use tether::v1 as pb;

use super::convert::{self, priority_out, state_out};
use crate::domain::dashboard::{DashboardSpec, DashboardStatus, ShellCommand, DASHBOARD_QUEUE};
use crate::domain::waiting::{WaitKind, WaitReason};
use crate::domain::{validate, DomainError, DomainResult, Job, JobSpec, JobState};

pub const MAX_JOB_NAME: usize = 256;
pub const MAX_COMMAND: usize = 64 * 1024;
pub const MAX_ENV: usize = 64;
pub const MAX_ENV_NAME: usize = 128;
pub const MAX_ENV_VALUE: usize = 4096;
pub const MAX_WORKING_DIR: usize = 4096;
pub const MAX_REQUESTER: usize = 256;
pub const MAX_LOG_FILTER: usize = 1024;
/// Who asked, when a request names no one.
pub const ANONYMOUS: &str = "anonymous";

fn at_most(field: &str, value: &str, max: usize) -> DomainResult<()> {
    if value.len() > max {
        return Err(DomainError::invalid(field, format!("must be at most {max} bytes")));
    }
    Ok(())
}

/// The requester a request names, or [`ANONYMOUS`].
pub fn requester_in(field: &str, value: &str) -> DomainResult<String> {
    at_most(field, value, MAX_REQUESTER)?;
    Ok(if value.is_empty() { ANONYMOUS.to_string() } else { value.to_string() })
}

/// An optional idempotency key.
pub fn idempotency_key_in(field: &str, value: &str) -> DomainResult<Option<String>> {
    at_most(field, value, validate::MAX_IDEMPOTENCY_KEY)?;
    Ok((!value.is_empty()).then(|| value.to_string()))
}

/// The most secrets a job has.
pub const MAX_SECRETS: usize = 32;

/// A CreateJob request's secrets, checked: names as env's and not also in
/// env, values bounded and without NUL bytes.
pub fn secrets_in(req: &pb::CreateJobRequest) -> DomainResult<BTreeMap<String, String>> {
    if req.secrets.len() > MAX_SECRETS {
        return Err(DomainError::invalid(
            "secrets",
            format!("holds {} secrets; the limit is {MAX_SECRETS}", req.secrets.len()),
        ));
    }
    for (name, value) in &req.secrets {
        let field = validate::entry_field("secrets", name);
        validate::name("", name, MAX_ENV_NAME).map_err(|e| e.under(&field))?;
        at_most(&field, value, MAX_ENV_VALUE)?;
        if value.contains('\0') {
            return Err(DomainError::invalid(field, "must not contain a NUL byte (no process can be given one)"));
        }
        if req.env.contains_key(name) {
            return Err(DomainError::invalid(field, "is also set in env; a name is either a secret or not"));
        }
    }
    Ok(req.secrets.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
}

/// A CreateJob request as the queued job it runs as and its dashboard part
/// (its secrets are checked by [`secrets_in`] and sealed by the caller).
pub fn create_in(req: &pb::CreateJobRequest) -> DomainResult<(JobSpec, DashboardSpec)> {
    if req.name.is_empty() {
        return Err(DomainError::invalid("name", "is required"));
    }
    at_most("name", &req.name, MAX_JOB_NAME)?;
    if req.command.is_empty() {
        return Err(DomainError::invalid("command", "is required"));
    }
    at_most("command", &req.command, MAX_COMMAND)?;
    if req.env.len() > MAX_ENV {
        return Err(DomainError::invalid("env", format!("holds {} variables; the limit is {MAX_ENV}", req.env.len())));
    }
    for (key, value) in &req.env {
        validate::name("", key, MAX_ENV_NAME).map_err(|e| e.under(&validate::entry_field("env", key)))?;
        at_most(&validate::entry_field("env", key), value, MAX_ENV_VALUE)?;
    }
    at_most("working_dir", &req.working_dir, MAX_WORKING_DIR)?;
    // No process can be given a NUL byte in its command, environment or
    // directory: such a job could never run.
    let no_nul = |field: String, value: &str| match value.contains('\0') {
        true => Err(DomainError::invalid(field, "must not contain a NUL byte (no process can be given one)")),
        false => Ok(()),
    };
    no_nul("command".into(), &req.command)?;
    no_nul("working_dir".into(), &req.working_dir)?;
    for (key, value) in &req.env {
        no_nul(validate::entry_field("env", key), value)?;
    }
    let requested_by = requester_in("requested_by", &req.requested_by)?;
    let command = ShellCommand {
        command: req.command.clone(),
        env: req.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect::<BTreeMap<_, _>>(),
        workdir: req.working_dir.clone(),
        secrets: None,
    };
    let payload = command.to_payload();
    if payload.len() > validate::MAX_PAYLOAD_BYTES {
        return Err(too_large(payload.len(), validate::MAX_PAYLOAD_BYTES));
    }
    // The queue's own checks, with the queue's field names (which are the
    // same as this request's: routing, priority, timeout, max_attempts,
    // idempotency_key).
    let enqueue = pb::EnqueueJobRequest {
        queue: DASHBOARD_QUEUE.to_string(),
        payload: payload.into(),
        priority: req.priority,
        routing: req.routing.clone(),
        max_attempts: req.max_attempts,
        lease_duration: None,
        timeout: req.timeout,
        idempotency_key: req.idempotency_key.clone(),
        not_before: None,
        retry_policy: None,
    };
    let spec = convert::job_spec_in(&enqueue)?;
    let dashboard = DashboardSpec { name: req.name.clone(), requested_by, retry_of: None };
    Ok((spec, dashboard))
}

/// The error for a command whose payload exceeds `limit` bytes.
pub fn too_large(len: usize, limit: usize) -> DomainError {
    DomainError::invalid(
        "command",
        format!("with env and working_dir encodes to {len} bytes; this server's store holds at most {limit}"),
    )
}

pub fn status_in(field: &str, value: i32) -> DomainResult<DashboardStatus> {
    match pb::JobStatus::try_from(value) {
        Ok(pb::JobStatus::Pending) => Ok(DashboardStatus::Pending),
        Ok(pb::JobStatus::Running) => Ok(DashboardStatus::Running),
        Ok(pb::JobStatus::Success) => Ok(DashboardStatus::Success),
        Ok(pb::JobStatus::Failed) => Ok(DashboardStatus::Failed),
        Ok(pb::JobStatus::Cancelled) => Ok(DashboardStatus::Cancelled),
        Ok(pb::JobStatus::Unspecified) => Err(DomainError::invalid(field, "must be a status, not unspecified")),
        Err(_) => Err(DomainError::invalid(field, format!("unknown job status value {value}"))),
    }
}

pub fn status_out(status: DashboardStatus) -> pb::JobStatus {
    match status {
        DashboardStatus::Pending => pb::JobStatus::Pending,
        DashboardStatus::Running => pb::JobStatus::Running,
        DashboardStatus::Success => pb::JobStatus::Success,
        DashboardStatus::Failed => pb::JobStatus::Failed,
        DashboardStatus::Cancelled => pb::JobStatus::Cancelled,
    }
}

/// The queued-job states the statuses of a ListJobs request cover; empty
/// means all.
pub fn states_of(field: &str, statuses: &[i32]) -> DomainResult<Vec<JobState>> {
    let statuses = convert::distinct(field, statuses, DashboardStatus::ALL.len(), status_in)?;
    Ok(statuses.into_iter().flat_map(|s| s.states().iter().copied()).collect())
}

/// A stored dashboard job on the wire; `None` for a queued job that is not
/// one.
pub fn job_out(job: &Job) -> Option<pb::Job> {
    let dashboard = job.dashboard.as_deref()?;
    let command = ShellCommand::from_payload(&job.spec.payload);
    let optional_time = |t: Option<SystemTime>| t.map(to_timestamp);
    Some(pb::Job {
        id: job.id.clone(),
        name: dashboard.spec.name.clone(),
        status: status_out(DashboardStatus::of(job.state)) as i32,
        queued_state: state_out(job.state) as i32,
        command: command.command,
        env: command.env.into_iter().collect(),
        working_dir: command.workdir,
        routing: Some(pb::Routing {
            pool: job.spec.routing.pool.clone(),
            required_labels: job.spec.routing.required_labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        }),
        priority: priority_out(job.spec.priority) as i32,
        timeout: job.spec.timeout.map(to_duration),
        max_attempts: job.spec.max_attempts,
        requested_by: dashboard.spec.requested_by.clone(),
        retry_of: dashboard.spec.retry_of.clone().unwrap_or_default(),
        create_time: Some(to_timestamp(job.create_time)),
        update_time: Some(to_timestamp(job.update_time)),
        finish_time: optional_time(job.finish_time),
        error: job.last_error.clone(),
        secret_names: command.secrets.map(|s| s.names).unwrap_or_default(),
        attempts: dashboard
            .attempts()
            .into_iter()
            .map(|a| pb::JobAttempt {
                attempt: a.attempt,
                agent_id: a.worker_id,
                claim_time: optional_time(a.claim_time),
                start_time: optional_time(a.start_time),
                end_time: optional_time(a.end_time),
                outcome: a.outcome.map_or(pb::QueuedJobState::Unspecified, state_out) as i32,
                exit_code: a.exit_code,
                reason: a.reason,
            })
            .collect(),
        transitions: dashboard
            .steps
            .iter()
            .map(|s| pb::JobTransition {
                time: Some(to_timestamp(s.time)),
                from_state: s.from.map_or(pb::QueuedJobState::Unspecified, state_out) as i32,
                to_state: state_out(s.to) as i32,
                attempt: s.attempt,
                agent_id: s.worker_id.clone(),
                actor: s.actor.clone(),
                reason: s.reason.clone(),
                exit_code: s.exit_code,
            })
            .collect(),
        dropped_transitions: dashboard.dropped_steps,
        idempotency_key: job.spec.idempotency_key.clone().unwrap_or_default(),
        pending_reason: None,
    })
}

pub fn pending_reason_out(r: &WaitReason) -> pb::PendingReason {
    pb::PendingReason {
        kind: match r.kind {
            WaitKind::NotBefore => pb::WaitKind::NotBefore,
            WaitKind::RetryBackoff => pb::WaitKind::RetryBackoff,
            WaitKind::NoAgentInPool => pb::WaitKind::NoAgentInPool,
            WaitKind::NoAgentWithLabels => pb::WaitKind::NoAgentWithLabels,
            WaitKind::AgentsUnavailable => pb::WaitKind::AgentsUnavailable,
            WaitKind::AgentsBusy => pb::WaitKind::AgentsBusy,
            WaitKind::Dispatching => pb::WaitKind::Dispatching,
        } as i32,
        summary: r.summary.clone(),
        wait_until: r.until.map(to_timestamp),
        missing_labels: r.missing_labels.iter().cloned().collect(),
        pool_agents: r.pool_agents,
        matching_agents: r.matching_agents,
        cordoned_agents: r.cordoned_agents,
        draining_agents: r.draining_agents,
        unhealthy_agents: r.unhealthy_agents,
        busy_slots: r.busy_slots,
        total_slots: r.total_slots,
        jobs_ahead: r.position.map(|p| p.ahead),
        jobs_ahead_at_least: r.position.is_some_and(|p| p.capped),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> pb::CreateJobRequest {
        pb::CreateJobRequest { name: "build".into(), command: "make".into(), ..Default::default() }
    }

    #[test]
    fn a_create_request_becomes_a_queued_job_in_the_dashboard_queue() {
        let mut req = request();
        req.env.insert("CI".into(), "1".into());
        req.working_dir = "/src".into();
        let (spec, dashboard) = create_in(&req).expect("valid");
        assert_eq!(spec.queue, DASHBOARD_QUEUE);
        assert_eq!(spec.max_attempts, validate::DEFAULT_MAX_ATTEMPTS);
        assert_eq!(&spec.payload[..], br#"{"command":"make","env":{"CI":"1"},"workdir":"/src"}"#);
        assert_eq!(dashboard.requested_by, ANONYMOUS);
    }

    #[test]
    fn bad_fields_are_named() {
        let field = |req: pb::CreateJobRequest| match create_in(&req) {
            Err(DomainError::InvalidArgument { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        assert_eq!(field(pb::CreateJobRequest { name: String::new(), ..request() }), "name");
        assert_eq!(field(pb::CreateJobRequest { command: String::new(), ..request() }), "command");
        assert_eq!(field(pb::CreateJobRequest { name: "n".repeat(MAX_JOB_NAME + 1), ..request() }), "name");
        let mut bad_env = request();
        bad_env.env.insert("A B".into(), "1".into());
        assert_eq!(field(bad_env), "env[\"A B\"]");
        assert_eq!(field(pb::CreateJobRequest { max_attempts: 101, ..request() }), "max_attempts");
        assert_eq!(field(pb::CreateJobRequest { priority: 99, ..request() }), "priority");
        assert_eq!(field(pb::CreateJobRequest { requested_by: "r".repeat(300), ..request() }), "requested_by");
        assert_eq!(field(pb::CreateJobRequest { command: "echo \0".into(), ..request() }), "command");
        assert_eq!(field(pb::CreateJobRequest { working_dir: "/tmp\0".into(), ..request() }), "working_dir");
        let mut nul_env = request();
        nul_env.env.insert("A".into(), "x\0".into());
        assert_eq!(field(nul_env), "env[\"A\"]");
    }

    #[test]
    fn statuses_are_checked() {
        assert!(status_in("statuses[0]", 0).is_err());
        assert!(status_in("statuses[0]", 77).is_err());
        let states = states_of("statuses", &[pb::JobStatus::Failed as i32]).expect("valid");
        assert_eq!(states, [JobState::Failed, JobState::DeadLettered]);
    }
}
