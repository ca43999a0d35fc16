//! The messages between the engine and its callers: what an agent session
//! sends in and gets pushed, and the views the engine hands out.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;

use crate::domain::{Agent, AttemptRef, Job, JobState, Metrics, Priority};

/// A message the engine pushes to a connected agent.
#[derive(Debug, Clone)]
pub enum AgentPush {
    Assign(Box<Job>),
    Cancel {
        job: AttemptRef,
        reason: String,
    },
    Drain {
        reason: String,
    },
    /// Move the stream to another replica (protocol 3 and later).
    Reconnect {
        reason: String,
    },
    UpdateAck {
        job: AttemptRef,
        accepted: bool,
        reason: String,
    },
}

/// How an attempt ended, as the agent reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Succeeded,
    FailedRetryable,
    FailedPermanent,
    Cancelled,
}

/// A message an agent sends on its stream after Hello.
#[derive(Debug, Clone)]
pub enum AgentInbound {
    Heartbeat {
        metrics: Metrics,
        running: Vec<AttemptRef>,
        draining: bool,
    },
    /// `started`: an accepted assignment that also began running (the
    /// lean form of an ack followed by `Started`).
    AssignmentAck {
        job: AttemptRef,
        accepted: bool,
        started: bool,
        reason: String,
    },
    Started {
        job: AttemptRef,
    },
    Progress {
        job: AttemptRef,
        percent: f64,
        message: String,
    },
    Log {
        job: AttemptRef,
        stderr: bool,
        data: Bytes,
        sequence: u64,
        /// When the agent read it (its clock), if it said.
        agent_time: Option<std::time::SystemTime>,
    },
    Finished {
        job: AttemptRef,
        outcome: Outcome,
        result: Bytes,
        error: String,
        /// The command's non-zero exit code, if it ran and exited.
        exit_code: Option<i32>,
    },
}

/// The validated Hello of an agent.
#[derive(Debug, Clone)]
pub struct HelloInfo {
    pub name: String,
    pub pool: String,
    pub labels: BTreeMap<String, String>,
    pub slots: u32,
    pub version: String,
    pub running: Vec<AttemptRef>,
    /// Whether the agent wants every accepted start answered (older
    /// protocol); otherwise only refused starts are.
    pub answer_starts: bool,
    /// Whether the agent understands Reconnect (protocol 3 and later).
    pub reconnects: bool,
}

/// The engine's answer to a Hello.
#[derive(Debug, Clone)]
pub struct WelcomeInfo {
    pub agent_id: String,
    pub session_id: u64,
    pub heartbeat_interval: Duration,
    pub lease_duration: Duration,
    pub reconnect_grace: Duration,
    pub resumed: Vec<AttemptRef>,
    pub abandoned: Vec<AttemptRef>,
}

/// A state change of a job, published after it is durable.
#[derive(Debug, Clone)]
pub struct JobEvent {
    pub job: Arc<Job>,
    pub previous: Option<JobState>,
}

/// Queue statistics.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueStats {
    pub by_state: Vec<(JobState, u64)>,
    pub queued_by_priority: Vec<(Priority, u64)>,
    pub oldest_queued_age: Duration,
}

/// One stored metrics sample.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricsSample {
    pub time: SystemTime,
    pub metrics: Metrics,
}

/// An agent as the engine sees it now.
#[derive(Debug, Clone)]
pub struct AgentView {
    pub agent: Agent,
    pub connected: bool,
    pub running: Vec<AttemptRef>,
    pub metrics_history: Vec<MetricsSample>,
}

/// What a unary claimer asks for.
#[derive(Debug, Clone)]
pub struct ClaimRequest {
    pub worker_id: String,
    pub queue: Option<String>,
    pub pool: String,
    pub labels: BTreeMap<String, String>,
}

/// A page of agents.
#[derive(Debug, Clone)]
pub struct AgentPage {
    pub agents: Vec<AgentView>,
    pub next_after: Option<String>,
}

/// The answer to a unary heartbeat.
#[derive(Debug, Clone, PartialEq)]
pub struct HeartbeatAnswer {
    pub heartbeat_interval: Duration,
    /// Reported attempts that are no longer the agent's.
    pub abandoned: Vec<AttemptRef>,
    pub drain: bool,
}

/// What a replica tells its peers once the write behind it applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerNotice {
    /// A job became ready, or changed while another replica's agent may
    /// hold it (e.g. it was cancelled).
    Job(WakeJob),
    /// An operator changed an agent's stored record (drain, cordon,
    /// deregister): the replica holding its stream applies it.
    Agent(String),
}

/// A job that became ready on one replica, for its peers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WakeJob {
    pub id: String,
    pub pool: String,
}
