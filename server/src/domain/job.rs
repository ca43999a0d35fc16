//! The queued job: its specification, its state machine and its attempts.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// Dispatch priority; the derived order is the dispatch order (higher first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Priority {
    Low,
    Normal,
    High,
    Critical,
}

impl Priority {
    pub const ALL: [Priority; 4] = [Priority::Critical, Priority::High, Priority::Normal, Priority::Low];
}

/// The lifecycle state of a queued job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum JobState {
    Queued,
    Claimed,
    Running,
    Succeeded,
    Failed,
    DeadLettered,
    Cancelled,
}

impl JobState {
    pub const ALL: [JobState; 7] = [
        JobState::Queued,
        JobState::Claimed,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::DeadLettered,
        JobState::Cancelled,
    ];

    /// Claimed or running: the job is leased to a worker.
    pub fn is_active(self) -> bool {
        matches!(self, JobState::Claimed | JobState::Running)
    }

    /// No further transition happens (dead letters can still be redriven).
    pub fn is_terminal(self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Failed | JobState::Cancelled)
    }

    /// A stable small number, used in storage keys.
    pub fn code(self) -> u8 {
        match self {
            JobState::Queued => 1,
            JobState::Claimed => 2,
            JobState::Running => 3,
            JobState::Succeeded => 4,
            JobState::Failed => 5,
            JobState::DeadLettered => 6,
            JobState::Cancelled => 7,
        }
    }
}

/// Where a job may run.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Routing {
    pub pool: String,
    pub required_labels: BTreeMap<String, String>,
}

impl Routing {
    /// Whether an agent of `pool` with `labels` may run the job.
    pub fn matches(&self, pool: &str, labels: &BTreeMap<String, String>) -> bool {
        self.pool == pool && self.required_labels.iter().all(|(k, v)| labels.get(k) == Some(v))
    }
}

/// Which failures of an attempt get another attempt (while attempts
/// remain). Attempts that were lost without a result (agent gone, lease
/// expired) are always retried; see [`Failure`].
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RetryPolicy {
    /// Retry every failure the worker calls retryable, and timeouts.
    pub any_failure: bool,
    /// Retry a command that exited with one of these codes.
    pub exit_codes: BTreeSet<i32>,
}

impl RetryPolicy {
    /// Retry everything retryable: what jobs stored before retry policies
    /// existed were enqueued under.
    pub fn any() -> RetryPolicy {
        RetryPolicy { any_failure: true, exit_codes: BTreeSet::new() }
    }

    /// Whether `failure` gets another attempt (if attempts remain).
    pub fn retries(&self, failure: Failure) -> bool {
        match failure {
            Failure::Lost => true,
            Failure::Reported { retryable: false, .. } => false,
            Failure::Reported { retryable: true, exit_code: Some(code) } => {
                self.any_failure || self.exit_codes.contains(&code)
            }
            Failure::Reported { retryable: true, exit_code: None } | Failure::TimedOut => self.any_failure,
        }
    }
}

/// How an attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The worker reported a failure; `exit_code` is the command's non-zero
    /// exit code, if the job was a command that ran.
    Reported { retryable: bool, exit_code: Option<i32> },
    /// The attempt ran past the job's timeout.
    TimedOut,
    /// The attempt ended without a result: its lease expired, its agent was
    /// lost or deregistered, or the agent gave it up.
    Lost,
}

/// What the submitter asked for; never changes after enqueue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    pub queue: String,
    pub payload: Bytes,
    pub priority: Priority,
    pub routing: Routing,
    pub max_attempts: u32,
    pub lease_duration: Duration,
    pub timeout: Option<Duration>,
    pub idempotency_key: Option<String>,
    pub not_before: Option<SystemTime>,
    pub retry: RetryPolicy,
}

/// Identifies one attempt of one job.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AttemptRef {
    pub job_id: String,
    pub attempt: u32,
    pub fencing_token: u64,
}

/// A job as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub id: String,
    /// Global enqueue order; FIFO within a priority follows it.
    pub seq: u64,
    pub spec: JobSpec,
    pub state: JobState,
    pub attempt: u32,
    pub fencing_token: u64,
    pub worker_id: String,
    pub create_time: SystemTime,
    pub update_time: SystemTime,
    /// When a queued job becomes dispatchable.
    pub ready_time: SystemTime,
    pub lease_expire_time: Option<SystemTime>,
    /// When the current attempt's timeout ends, if it has one.
    pub run_deadline: Option<SystemTime>,
    pub result: Bytes,
    pub last_error: String,
    pub finish_time: Option<SystemTime>,
    /// Bumped by every stored write; conditional writes compare it.
    pub version: u64,
    /// Set for a job created through the dashboard (CreateJob): what it
    /// runs, who asked, and its history.
    pub dashboard: Option<Box<super::dashboard::DashboardJob>>,
}

impl Job {
    /// A new queued job.
    pub fn new(id: String, seq: u64, spec: JobSpec, now: SystemTime) -> Job {
        let ready_time = spec.not_before.map_or(now, |t| t.max(now));
        Job {
            id,
            seq,
            spec,
            state: JobState::Queued,
            attempt: 0,
            fencing_token: 0,
            worker_id: String::new(),
            create_time: now,
            update_time: now,
            ready_time,
            lease_expire_time: None,
            run_deadline: None,
            result: Bytes::new(),
            last_error: String::new(),
            finish_time: None,
            version: 0,
            dashboard: None,
        }
    }

    /// The current attempt's reference.
    pub fn attempt_ref(&self) -> AttemptRef {
        AttemptRef { job_id: self.id.clone(), attempt: self.attempt, fencing_token: self.fencing_token }
    }

    /// Whether `r` names the current attempt of this (active) job.
    pub fn is_current(&self, r: &AttemptRef) -> bool {
        self.state.is_active() && self.attempt == r.attempt && self.fencing_token == r.fencing_token
    }

    /// Ends the job in a terminal (or dead-lettered) state at `now`.
    pub fn finish(&mut self, state: JobState, now: SystemTime) {
        self.state = state;
        self.finish_time = Some(now);
        self.lease_expire_time = None;
        self.run_deadline = None;
    }

    /// Puts the job back in the queue, dispatchable from `ready_time`.
    pub fn requeue(&mut self, ready_time: SystemTime) {
        self.state = JobState::Queued;
        self.ready_time = ready_time;
        self.lease_expire_time = None;
        self.run_deadline = None;
        self.finish_time = None;
    }

    /// Why the stored job cannot be handled, if it cannot: a spec outside
    /// today's limits (e.g. written before they were enforced) or a time the
    /// wire cannot carry. Such a job is quarantined (dead-lettered with this
    /// reason) instead of being dispatched.
    pub fn defect(&self) -> Option<String> {
        if let Err(e) = super::validate::job_spec(&self.spec) {
            return Some(format!("quarantined: its stored spec is invalid ({e})"));
        }
        let latest = tether::time::latest();
        let times = [Some(self.create_time), Some(self.ready_time), self.lease_expire_time, self.run_deadline];
        if times.into_iter().flatten().any(|t| t > latest) {
            return Some("quarantined: it holds a time after 9999-12-31".to_string());
        }
        None
    }

    /// The earliest time the engine must look at this job again: lease end or
    /// run deadline for active jobs.
    pub fn next_deadline(&self) -> Option<SystemTime> {
        match (self.lease_expire_time, self.run_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}
