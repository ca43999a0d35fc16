//! The dashboard job: a named unit of CI/CD work (what to run, where, who
//! asked). It runs as one queued job in [`DASHBOARD_QUEUE`] and is stored
//! inside that job's record, so its status, its attempts and its history
//! change in the same write as the queued job they follow: nothing can
//! drift between the two, on either backend.

use std::collections::BTreeMap;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::job::{Job, JobSpec, JobState};

/// The queue dashboard jobs are enqueued in.
pub const DASHBOARD_QUEUE: &str = "tether.jobs";

/// The most steps a job keeps; older ones are dropped (and counted) so a job
/// with many attempts cannot outgrow a store item (DynamoDB's 400 KB: with
/// the largest payload and result, steps get ~40 KB).
pub const MAX_STEPS: usize = 100;

/// The longest reason a step keeps (the job's full last error is its own
/// field).
pub const MAX_STEP_REASON: usize = 256;

/// The longest actor and agent id a step keeps (ids are UUIDs; a unary
/// worker's id is the caller's text).
pub const MAX_STEP_NAME: usize = 64;

/// The most bytes a job's steps may take (estimated from their parts): with
/// the largest payload, result, error and labels a DynamoDB item still
/// stays under 400 KB.
pub const MAX_STEPS_BYTES: usize = 16 * 1024;

/// The actor of changes the server makes itself (lease expiry, timeouts).
pub const SYSTEM_ACTOR: &str = "tether";

/// What the requester asked for besides what to run (which is the queued
/// job's payload, see [`ShellCommand`]); never changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DashboardSpec {
    /// A display name, not unique.
    pub name: String,
    /// Who asked for the job.
    pub requested_by: String,
    /// The job this one re-runs (RetryJob), if any.
    pub retry_of: Option<String>,
}

/// What a dashboard job runs: its queued job's payload, the JSON object the
/// reference agent reads (`agent-sdk/src/shell.rs`). Kept only there, so a
/// record holds it once.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ShellCommand {
    pub command: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub workdir: String,
    /// Its secrets: names only; the values are sealed in a store record
    /// and sent in the Assignment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secrets: Option<SecretRef>,
}

/// Where a job's sealed secrets are, and their names.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SecretRef {
    /// The id of the record holding them sealed.
    #[serde(rename = "ref")]
    pub reference: String,
    pub names: Vec<String>,
}

impl ShellCommand {
    pub fn to_payload(&self) -> Vec<u8> {
        // A struct of strings always serializes.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The command a payload holds; a payload that is not one (the job was
    /// enqueued into the dashboard's queue by hand) reads as its text.
    pub fn from_payload(payload: &[u8]) -> ShellCommand {
        serde_json::from_slice(payload).unwrap_or_else(|_| ShellCommand {
            command: String::from_utf8_lossy(payload).into_owned(),
            ..Default::default()
        })
    }
}

/// A dashboard job's part of its queued job's record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DashboardJob {
    pub spec: DashboardSpec,
    /// Every state change, oldest first, at most [`MAX_STEPS`].
    pub steps: Vec<JobStep>,
    /// Steps dropped from the front to keep [`MAX_STEPS`] and
    /// [`MAX_STEPS_BYTES`].
    pub dropped_steps: u32,
    /// Output bytes stored for the job, every attempt together.
    pub output_bytes: u64,
    /// Output reached the cap: its marker is stored, the rest dropped.
    pub output_truncated: bool,
}

/// What becomes of a chunk of a dashboard job's output under its cap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputFate {
    /// Stored as it is.
    Keep,
    /// The cap is reached by it: its first `keep` bytes are stored, then
    /// the marker.
    Truncate { keep: usize, marker: String },
    /// Dropped (the marker is stored already).
    Drop,
}

/// One state change of a dashboard job's queued job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobStep {
    pub time: SystemTime,
    /// `None` when the job was created.
    pub from: Option<JobState>,
    pub to: JobState,
    pub attempt: u32,
    /// The agent or worker of the attempt.
    pub worker_id: String,
    /// Who made the change: a requester, `agent:<id>`, `worker:<id>` or
    /// [`SYSTEM_ACTOR`].
    pub actor: String,
    /// Why (an error, a cancel reason); empty when the change says enough.
    pub reason: String,
    pub exit_code: Option<i32>,
}

/// Who makes the changes of the operation being handled.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Actor {
    /// The server itself: lease expiry, timeouts, lost agents.
    #[default]
    System,
    /// A QueueService or AgentService caller, who names no one.
    Operator,
    /// The agent holding the job, over its stream.
    Agent,
    /// A unary worker holding the job.
    Worker,
    /// A named requester.
    Named(String),
}

impl Actor {
    /// The actor as a step records it.
    pub fn describe(&self, job: &Job) -> String {
        match self {
            Actor::System => SYSTEM_ACTOR.to_string(),
            Actor::Operator => "operator".to_string(),
            Actor::Agent => format!("agent:{}", job.worker_id),
            Actor::Worker => format!("worker:{}", job.worker_id),
            Actor::Named(name) => requester_actor(name),
        }
    }
}

/// A requester as an actor: prefixed, so no requester can pass for the
/// server, an operator or an agent.
pub fn requester_actor(name: &str) -> String {
    format!("user:{name}")
}

/// The dashboard's status of a job: the queued job's state, coarser.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DashboardStatus {
    Pending,
    Running,
    Success,
    Failed,
    Cancelled,
}

impl DashboardStatus {
    pub const ALL: [DashboardStatus; 5] = [
        DashboardStatus::Pending,
        DashboardStatus::Running,
        DashboardStatus::Success,
        DashboardStatus::Failed,
        DashboardStatus::Cancelled,
    ];

    pub fn of(state: JobState) -> DashboardStatus {
        match state {
            JobState::Queued => DashboardStatus::Pending,
            JobState::Claimed | JobState::Running => DashboardStatus::Running,
            JobState::Succeeded => DashboardStatus::Success,
            JobState::Failed | JobState::DeadLettered => DashboardStatus::Failed,
            JobState::Cancelled => DashboardStatus::Cancelled,
        }
    }

    /// The queued-job states a status covers (for listing by status).
    pub fn states(self) -> &'static [JobState] {
        match self {
            DashboardStatus::Pending => &[JobState::Queued],
            DashboardStatus::Running => &[JobState::Claimed, JobState::Running],
            DashboardStatus::Success => &[JobState::Succeeded],
            DashboardStatus::Failed => &[JobState::Failed, JobState::DeadLettered],
            DashboardStatus::Cancelled => &[JobState::Cancelled],
        }
    }
}

/// One attempt of a dashboard job, as its steps tell it.
#[derive(Debug, Clone, PartialEq)]
pub struct AttemptView {
    pub attempt: u32,
    pub worker_id: String,
    /// When the attempt was claimed.
    pub claim_time: Option<SystemTime>,
    /// When the agent reported it started.
    pub start_time: Option<SystemTime>,
    pub end_time: Option<SystemTime>,
    /// The state the attempt ended in (QUEUED for an attempt that will be
    /// retried); `None` while it runs.
    pub outcome: Option<JobState>,
    pub exit_code: Option<i32>,
    pub reason: String,
}

impl DashboardJob {
    pub fn new(spec: DashboardSpec) -> DashboardJob {
        DashboardJob { spec, steps: Vec::new(), dropped_steps: 0, output_bytes: 0, output_truncated: false }
    }

    /// Counts a chunk of `len` bytes of output against `cap` and says
    /// what to store.
    pub fn take_output(&mut self, len: usize, cap: u64) -> OutputFate {
        if self.output_truncated {
            return OutputFate::Drop;
        }
        let total = self.output_bytes.saturating_add(len as u64);
        if total <= cap {
            self.output_bytes = total;
            return OutputFate::Keep;
        }
        self.output_truncated = true;
        let keep = usize::try_from(cap.saturating_sub(self.output_bytes)).unwrap_or(len).min(len);
        let marker = format!(
            "\n[tether: output truncated: this job's output reached its cap of {cap} bytes; the rest was dropped]\n"
        );
        self.output_bytes = self.output_bytes.saturating_add((keep + marker.len()) as u64);
        OutputFate::Truncate { keep, marker }
    }

    /// Records the change that left `job` as it is, from `from`, made by
    /// `actor`; `exit_code` is that of the attempt it ends, if any.
    pub fn record(&mut self, job: &Job, from: Option<JobState>, actor: &str, exit_code: Option<i32>) {
        let ends_attempt = from.is_some_and(JobState::is_active) && !job.state.is_active();
        let reason = match job.state {
            JobState::Queued if from.is_none() => "",
            JobState::Queued | JobState::Failed | JobState::DeadLettered | JobState::Cancelled => &job.last_error,
            _ => "",
        };
        self.steps.push(JobStep {
            time: job.update_time,
            from,
            to: job.state,
            attempt: job.attempt,
            worker_id: short_name(&job.worker_id),
            actor: short_name(actor),
            reason: truncated(reason, MAX_STEP_REASON).to_string(),
            exit_code: exit_code.filter(|_| ends_attempt),
        });
        let mut bytes: usize = self.steps.iter().map(JobStep::estimated_bytes).sum();
        let mut drop = 0;
        while self.steps.len() - drop > MAX_STEPS || (bytes > MAX_STEPS_BYTES && self.steps.len() - drop > 1) {
            bytes -= self.steps[drop].estimated_bytes();
            drop += 1;
        }
        if drop > 0 {
            self.steps.drain(..drop);
            self.dropped_steps = self.dropped_steps.saturating_add(drop as u32);
        }
    }

    /// The attempts its steps tell of, oldest first: each claim opens one
    /// (attempt numbers may repeat: a redriven job counts again from 1),
    /// and the first step that leaves the active states closes it.
    pub fn attempts(&self) -> Vec<AttemptView> {
        let mut out: Vec<AttemptView> = Vec::new();
        for step in &self.steps {
            let open = out.last().is_some_and(|a| a.outcome.is_none());
            let opens = match step.to {
                JobState::Claimed => true,
                // A start without its claim (dropped with older steps).
                JobState::Running => !open,
                _ => false,
            };
            if opens {
                out.push(AttemptView {
                    attempt: step.attempt,
                    worker_id: step.worker_id.clone(),
                    claim_time: (step.to == JobState::Claimed).then_some(step.time),
                    start_time: None,
                    end_time: None,
                    outcome: None,
                    exit_code: None,
                    reason: String::new(),
                });
            }
            let Some(a) = out.last_mut().filter(|a| a.outcome.is_none()) else { continue };
            if step.to == JobState::Running {
                a.start_time = Some(step.time);
            } else if step.from.is_some_and(JobState::is_active) && !step.to.is_active() {
                a.end_time = Some(step.time);
                a.outcome = Some(step.to);
                a.exit_code = step.exit_code;
                a.reason = step.reason.clone();
            }
        }
        out
    }
}

impl JobStep {
    /// About how many bytes the step takes stored (its strings plus a bound
    /// on the rest).
    fn estimated_bytes(&self) -> usize {
        self.worker_id.len() + self.actor.len() + self.reason.len() + 48
    }
}

/// Which dashboard jobs a listing returns, beyond status (which the store
/// query applies).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobListFilter {
    pub pool: Option<String>,
    pub requested_by: Option<String>,
    /// Created at or after.
    pub created_after: Option<SystemTime>,
    /// Created before.
    pub created_before: Option<SystemTime>,
}

impl JobListFilter {
    pub fn accepts(&self, job: &Job) -> bool {
        let Some(d) = job.dashboard.as_deref() else { return false };
        self.pool.as_ref().is_none_or(|p| *p == job.spec.routing.pool)
            && self.requested_by.as_ref().is_none_or(|r| *r == d.spec.requested_by)
            && self.created_after.is_none_or(|t| job.create_time >= t)
            && self.created_before.is_none_or(|t| job.create_time < t)
    }
}

/// What re-running an ended dashboard job enqueues: its spec again (with
/// `idempotency_key`, none else) and a dashboard part that links back.
pub fn rerun(
    old: &Job,
    requested_by: String,
    idempotency_key: Option<String>,
) -> Result<(JobSpec, DashboardSpec), String> {
    let Some(d) = old.dashboard.as_deref() else { return Err(format!("job {} is not a dashboard job", old.id)) };
    if !old.state.is_terminal() && old.state != JobState::DeadLettered {
        return Err(format!("job {} has not ended; cancel it first or wait for it", old.id));
    }
    let spec = JobSpec { idempotency_key, not_before: None, ..old.spec.clone() };
    let dashboard = DashboardSpec { name: d.spec.name.clone(), requested_by, retry_of: Some(old.id.clone()) };
    Ok((spec, dashboard))
}

/// A name a step keeps: as it is up to [`MAX_STEP_NAME`] bytes; longer, cut
/// and marked with a checksum of the whole, so two long names that share
/// their start stay apart.
fn short_name(name: &str) -> String {
    if name.len() <= MAX_STEP_NAME {
        return name.to_string();
    }
    let mark = format!("~{:08x}", crc32fast::hash(name.as_bytes()));
    format!("{}{mark}", truncated(name, MAX_STEP_NAME - mark.len()))
}

/// The longest prefix of `s` of at most `max` bytes that ends on a
/// character boundary.
fn truncated(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{JobSpec, Priority, RetryPolicy, Routing};
    use bytes::Bytes;
    use std::time::Duration;

    fn job() -> Job {
        let spec = JobSpec {
            queue: DASHBOARD_QUEUE.into(),
            payload: Bytes::new(),
            priority: Priority::Normal,
            routing: Routing::default(),
            max_attempts: 3,
            lease_duration: Duration::from_secs(30),
            timeout: None,
            idempotency_key: None,
            not_before: None,
            retry: RetryPolicy::any(),
        };
        Job::new("j".into(), 1, spec, SystemTime::UNIX_EPOCH)
    }

    fn dashboard() -> DashboardJob {
        DashboardJob::new(DashboardSpec { name: "build".into(), requested_by: "ann".into(), retry_of: None })
    }

    fn at(job: &mut Job, secs: u64) {
        job.update_time = SystemTime::UNIX_EPOCH + Duration::from_secs(secs);
    }

    #[test]
    fn attempts_are_read_from_the_steps() {
        let mut d = dashboard();
        let mut j = job();
        d.record(&j, None, "user:ann", None);
        for (attempt, worker) in [(1, "a1"), (2, "a2")] {
            j.attempt = attempt;
            j.worker_id = worker.into();
            j.state = JobState::Claimed;
            at(&mut j, u64::from(attempt) * 10);
            d.record(&j, Some(JobState::Queued), SYSTEM_ACTOR, None);
            j.state = JobState::Running;
            at(&mut j, u64::from(attempt) * 10 + 1);
            d.record(&j, Some(JobState::Claimed), "agent:a", Some(9));
            let exit_code = if attempt == 1 {
                j.last_error = "exit 2".into();
                j.state = JobState::Queued;
                Some(2)
            } else {
                j.last_error = String::new();
                j.state = JobState::Succeeded;
                None
            };
            at(&mut j, u64::from(attempt) * 10 + 5);
            d.record(&j, Some(JobState::Running), "agent:a", exit_code);
        }
        let attempts = d.attempts();
        assert_eq!(attempts.len(), 2);
        assert_eq!(attempts[0].worker_id, "a1");
        assert_eq!(attempts[0].outcome, Some(JobState::Queued));
        assert_eq!(attempts[0].exit_code, Some(2));
        assert_eq!(attempts[0].reason, "exit 2");
        assert_eq!(attempts[0].start_time, Some(SystemTime::UNIX_EPOCH + Duration::from_secs(11)));
        assert_eq!(attempts[1].outcome, Some(JobState::Succeeded));
        assert_eq!(attempts[1].exit_code, None);
        assert_eq!(attempts[1].end_time, Some(SystemTime::UNIX_EPOCH + Duration::from_secs(25)));
        assert_eq!(d.steps[0].actor, "user:ann");
        assert_eq!(d.steps.len(), 7);
        assert_eq!(d.steps[2].exit_code, None, "only a step that ends an attempt keeps an exit code");
    }

    #[test]
    fn a_redriven_job_counts_its_attempts_again_and_they_stay_apart() {
        let mut d = dashboard();
        let mut j = job();
        d.record(&j, None, "user:ann", None);
        for (worker, end) in [("a1", JobState::DeadLettered), ("a2", JobState::Succeeded)] {
            // Redrive resets the attempt number.
            j.attempt = 1;
            j.worker_id = worker.into();
            j.state = JobState::Claimed;
            d.record(&j, Some(JobState::Queued), SYSTEM_ACTOR, None);
            j.state = end;
            d.record(&j, Some(JobState::Claimed), "agent:x", None);
            if end == JobState::DeadLettered {
                j.state = JobState::Queued;
                j.attempt = 0;
                d.record(&j, Some(JobState::DeadLettered), "operator", None);
            }
        }
        let attempts = d.attempts();
        let seen: Vec<_> = attempts.iter().map(|a| (a.attempt, a.worker_id.as_str(), a.outcome)).collect();
        assert_eq!(seen, [(1, "a1", Some(JobState::DeadLettered)), (1, "a2", Some(JobState::Succeeded))]);
    }

    #[test]
    fn a_refused_assignment_ends_its_attempt() {
        let mut d = dashboard();
        let mut j = job();
        j.attempt = 2;
        j.worker_id = "a".into();
        j.state = JobState::Claimed;
        d.record(&j, Some(JobState::Queued), SYSTEM_ACTOR, None);
        // The server takes the attempt back (its number with it).
        j.attempt = 1;
        j.state = JobState::Queued;
        j.last_error = "refused".into();
        d.record(&j, Some(JobState::Claimed), "agent:a", None);
        let attempts = d.attempts();
        assert_eq!(attempts.len(), 1);
        assert_eq!((attempts[0].attempt, attempts[0].outcome), (2, Some(JobState::Queued)));
        assert_eq!(attempts[0].reason, "refused");
    }

    #[test]
    fn long_names_are_cut_and_steps_fit_their_byte_budget() {
        let mut d = dashboard();
        let mut j = job();
        j.worker_id = "w".repeat(256);
        j.last_error = "e".repeat(10_000);
        for i in 0..MAX_STEPS {
            j.state = if i % 2 == 0 { JobState::Claimed } else { JobState::Queued };
            d.record(&j, Some(JobState::Running), &"x".repeat(300), None);
        }
        assert!(d.steps.iter().all(|s| s.worker_id.len() == MAX_STEP_NAME && s.actor.len() == MAX_STEP_NAME));
        // Two long names sharing their first 64 bytes stay apart.
        let long = "r".repeat(70);
        assert_ne!(short_name(&long), short_name(&format!("{long}-impostor")));
        assert_eq!(short_name("user:ann"), "user:ann");
        let bytes: usize = d.steps.iter().map(JobStep::estimated_bytes).sum();
        assert!(bytes <= MAX_STEPS_BYTES, "{bytes}");
        assert!(d.steps.len() < MAX_STEPS);
        assert_eq!(d.dropped_steps as usize + d.steps.len(), MAX_STEPS);
        // And what is kept encodes within the budget (the estimate bounds it).
        let encoded = postcard::to_allocvec(&d).expect("encode");
        assert!(encoded.len() <= MAX_STEPS_BYTES + 1024, "{}", encoded.len());
    }

    #[test]
    fn output_past_the_cap_leaves_one_marker() {
        let mut d = dashboard();
        assert_eq!(d.take_output(60, 100), OutputFate::Keep);
        assert_eq!(d.take_output(30, 100), OutputFate::Keep);
        let OutputFate::Truncate { keep, marker } = d.take_output(25, 100) else { panic!("a marker") };
        assert_eq!(keep, 10, "what fits the cap is kept");
        assert!(marker.contains("truncated") && marker.contains("100 bytes"), "{marker}");
        assert_eq!(d.take_output(1, 100), OutputFate::Drop);
        assert_eq!(d.take_output(0, 100), OutputFate::Drop);
        assert!(d.output_truncated);
    }

    #[test]
    fn a_rerun_needs_an_ended_job_and_links_back() {
        let mut j = job();
        j.dashboard = Some(Box::new(dashboard()));
        j.spec.idempotency_key = Some("old-key".into());
        assert!(rerun(&j, "bob".into(), None).is_err(), "a pending job is not re-run");
        j.state = JobState::DeadLettered;
        let (spec, d) = rerun(&j, "bob".into(), Some("k2".into())).expect("rerun");
        assert_eq!((spec.idempotency_key.as_deref(), spec.payload), (Some("k2"), j.spec.payload.clone()));
        assert_eq!((d.name.as_str(), d.requested_by.as_str(), d.retry_of.as_deref()), ("build", "bob", Some("j")));
    }

    #[test]
    fn steps_are_capped_and_the_dropped_ones_counted() {
        let mut d = dashboard();
        let mut j = job();
        for i in 0..(MAX_STEPS + 5) {
            j.state = if i % 2 == 0 { JobState::Claimed } else { JobState::Queued };
            d.record(&j, Some(JobState::Queued), SYSTEM_ACTOR, None);
        }
        assert_eq!(d.steps.len(), MAX_STEPS);
        assert_eq!(d.dropped_steps, 5);
    }

    #[test]
    fn a_long_reason_is_cut_on_a_character_boundary() {
        let mut d = dashboard();
        let mut j = job();
        j.last_error = "é".repeat(MAX_STEP_REASON);
        j.state = JobState::Failed;
        d.record(&j, Some(JobState::Running), SYSTEM_ACTOR, None);
        let reason = &d.steps[0].reason;
        assert!(reason.len() <= MAX_STEP_REASON && reason.len() >= MAX_STEP_REASON - 1, "{}", reason.len());
        assert!(reason.chars().all(|c| c == 'é'));
    }

    #[test]
    fn the_command_round_trips_through_the_payload() {
        let cmd = ShellCommand {
            command: "make \"all\"\n".into(),
            env: [("CI".to_string(), "1".to_string())].into(),
            workdir: "/src".into(),
            secrets: Some(SecretRef { reference: "r1".into(), names: vec!["TOKEN".into()] }),
        };
        assert_eq!(ShellCommand::from_payload(&cmd.to_payload()), cmd);
        assert!(String::from_utf8_lossy(&cmd.to_payload()).contains(r#""secrets":{"ref":"r1","names":["TOKEN"]}"#));
        let bare = ShellCommand { command: "ls".into(), ..Default::default() };
        assert_eq!(bare.to_payload(), br#"{"command":"ls"}"#);
        assert_eq!(ShellCommand::from_payload(b"echo hi").command, "echo hi");
    }

    #[test]
    fn every_state_has_one_status() {
        for state in JobState::ALL {
            let status = DashboardStatus::of(state);
            assert!(status.states().contains(&state));
            let covering = DashboardStatus::ALL.iter().filter(|s| s.states().contains(&state)).count();
            assert_eq!(covering, 1, "{state:?}");
        }
    }
}
