//! The queued job: its specification, its state machine and its attempts.

use std::collections::BTreeMap;
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

    /// The earliest time the engine must look at this job again: lease end or
    /// run deadline for active jobs.
    pub fn next_deadline(&self) -> Option<SystemTime> {
        match (self.lease_expire_time, self.run_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}
