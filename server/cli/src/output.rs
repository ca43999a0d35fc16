//! Rendering of responses: human tables (comfy-table) and canonical
//! protobuf JSON (prost-reflect).
//!
//! Everything writes to a `&mut dyn Write` and takes "now" as an argument,
//! so the output of a command can be captured and compared in tests.

use std::io::Write;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, Context as _};
use comfy_table::{presets, ContentArrangement, Table};
use prost_reflect::{DescriptorPool, DynamicMessage, SerializeOptions};
use tether::v1::{
    Agent, AgentHealth, AgentPool, AgentSchedulingStatus, Deployment, DeploymentEvent, DeploymentState,
    DeploymentTrigger, Environment, GetPoolScalingSignalResponse, GetQueueStatsResponse, Job, JobAttempt, JobStatus,
    JobTransition, Priority, QueuedJob, QueuedJobState, WaitKind, WatchEventsResponse,
};

/// A generated message with its fully-qualified protobuf name, which JSON
/// rendering needs to find the message's descriptor. (The generated code is
/// built without `prost::Name`, so the names are listed here.)
pub trait ProtoName: prost::Message {
    /// The fully-qualified name, e.g. `tether.v1.QueuedJob`.
    const FULL_NAME: &'static str;
}

macro_rules! proto_names {
    ($($ty:ident),* $(,)?) => {
        $(impl ProtoName for tether::v1::$ty {
            const FULL_NAME: &'static str = concat!("tether.v1.", stringify!($ty));
        })*
    };
}

proto_names!(
    QueuedJob,
    EnqueueJobResponse,
    GetQueuedJobResponse,
    ListQueuedJobsResponse,
    CancelQueuedJobResponse,
    GetQueueStatsResponse,
    ListDeadLettersResponse,
    RedriveDeadLetterResponse,
    WatchQueueResponse,
    Agent,
    GetAgentResponse,
    ListAgentsResponse,
    DrainAgentResponse,
    UpdateAgentStatusResponse,
    DeregisterAgentResponse,
    AgentPool,
    CreateAgentPoolResponse,
    GetAgentPoolResponse,
    ListAgentPoolsResponse,
    UpdateAgentPoolResponse,
    DeleteAgentPoolResponse,
    GetPoolScalingSignalResponse,
    Job,
    CreateJobResponse,
    GetJobResponse,
    ListJobsResponse,
    CancelJobResponse,
    RetryJobResponse,
    StreamJobLogsResponse,
    Environment,
    PutEnvironmentResponse,
    ListEnvironmentsResponse,
    GetSummaryResponse,
    Deployment,
    CreateDeploymentResponse,
    GetDeploymentResponse,
    ListDeploymentsResponse,
    PromoteDeploymentResponse,
    RollbackDeploymentResponse,
    ListDeploymentEventsResponse,
    WatchEventsResponse,
);

/// The descriptor pool of every tether.v1 message, decoded once.
fn descriptor_pool() -> anyhow::Result<&'static DescriptorPool> {
    static POOL: OnceLock<Result<DescriptorPool, String>> = OnceLock::new();
    POOL.get_or_init(|| DescriptorPool::decode(tether::FILE_DESCRIPTOR_SET).map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| anyhow!("cannot decode the tether.v1 descriptor set: {e}"))
}

/// Renders a message as pretty canonical protobuf JSON (camelCase names,
/// enums by name, 64-bit integers as strings, RFC 3339 timestamps, durations
/// like `"30s"`, bytes as base64, default values omitted) — the same JSON
/// grpcurl and every other protobuf runtime produce.
///
/// The message is re-encoded and decoded as a `DynamicMessage` because the
/// generated types carry no serde support; the descriptor set is the source
/// of truth for names.
pub fn to_json<M: ProtoName>(msg: &M) -> anyhow::Result<String> {
    render_json(msg, true)
}

/// Like [`to_json`], on one line: for streams of objects (JSON Lines), such
/// as `pools scaling --watch --output json`.
pub fn to_json_line<M: ProtoName>(msg: &M) -> anyhow::Result<String> {
    render_json(msg, false)
}

fn render_json<M: ProtoName>(msg: &M, pretty: bool) -> anyhow::Result<String> {
    let pool = descriptor_pool()?;
    let desc = pool
        .get_message_by_name(M::FULL_NAME)
        .with_context(|| format!("message {} is not in the descriptor set", M::FULL_NAME))?;
    let dynamic = DynamicMessage::decode(desc, msg.encode_to_vec().as_slice())
        .with_context(|| format!("cannot re-decode a {}", M::FULL_NAME))?;
    let options = SerializeOptions::new();
    let bytes = if pretty {
        let mut ser = serde_json::Serializer::pretty(Vec::new());
        dynamic.serialize_with_options(&mut ser, &options).map(|()| ser.into_inner())
    } else {
        let mut ser = serde_json::Serializer::new(Vec::new());
        dynamic.serialize_with_options(&mut ser, &options).map(|()| ser.into_inner())
    }
    .with_context(|| format!("cannot serialize a {} as JSON", M::FULL_NAME))?;
    String::from_utf8(bytes).context("JSON output is not UTF-8")
}

/// Writes [`to_json`] of `msg` and a newline.
pub fn write_json<M: ProtoName>(out: &mut dyn Write, msg: &M) -> anyhow::Result<()> {
    writeln!(out, "{}", to_json(msg)?)?;
    Ok(())
}

// ---------------------------------------------------------------------------
// Small formatters.

/// The short lower-case name of a job state (`dead-lettered`); an enum value
/// this build does not know (a newer server) shows as `unknown(N)` rather
/// than being mistaken for another state.
pub fn state_name(value: i32) -> String {
    match QueuedJobState::try_from(value) {
        Ok(QueuedJobState::Unspecified) => "unspecified".into(),
        Ok(QueuedJobState::Queued) => "queued".into(),
        Ok(QueuedJobState::Claimed) => "claimed".into(),
        Ok(QueuedJobState::Running) => "running".into(),
        Ok(QueuedJobState::Succeeded) => "succeeded".into(),
        Ok(QueuedJobState::Failed) => "failed".into(),
        Ok(QueuedJobState::DeadLettered) => "dead-lettered".into(),
        Ok(QueuedJobState::Cancelled) => "cancelled".into(),
        Err(_) => format!("unknown({value})"),
    }
}

/// The short lower-case name of a dashboard job status (`success`).
pub fn job_status_name(value: i32) -> String {
    match JobStatus::try_from(value) {
        Ok(JobStatus::Unspecified) => "unspecified".into(),
        Ok(JobStatus::Pending) => "pending".into(),
        Ok(JobStatus::Running) => "running".into(),
        Ok(JobStatus::Success) => "success".into(),
        Ok(JobStatus::Failed) => "failed".into(),
        Ok(JobStatus::Cancelled) => "cancelled".into(),
        Err(_) => format!("unknown({value})"),
    }
}

/// The short lower-case name of a deployment state (`in-progress`).
pub fn deployment_state_name(value: i32) -> String {
    match DeploymentState::try_from(value) {
        Ok(DeploymentState::Unspecified) => "unspecified".into(),
        Ok(DeploymentState::Pending) => "pending".into(),
        Ok(DeploymentState::Queued) => "queued".into(),
        Ok(DeploymentState::InProgress) => "in-progress".into(),
        Ok(DeploymentState::Succeeded) => "succeeded".into(),
        Ok(DeploymentState::Failed) => "failed".into(),
        Ok(DeploymentState::RolledBack) => "rolled-back".into(),
        Ok(DeploymentState::Superseded) => "superseded".into(),
        Err(_) => format!("unknown({value})"),
    }
}

/// The short lower-case name of why a deployment was made
/// (`auto-rollback`).
pub fn deployment_trigger_name(value: i32) -> String {
    match DeploymentTrigger::try_from(value) {
        Ok(DeploymentTrigger::Unspecified) => "unspecified".into(),
        Ok(DeploymentTrigger::Create) => "create".into(),
        Ok(DeploymentTrigger::Promote) => "promote".into(),
        Ok(DeploymentTrigger::Rollback) => "rollback".into(),
        Ok(DeploymentTrigger::AutoRollback) => "auto-rollback".into(),
        Err(_) => format!("unknown({value})"),
    }
}

/// The short lower-case name of why a pending job waits, for when the
/// server sent no summary.
pub fn wait_kind_name(value: i32) -> String {
    match WaitKind::try_from(value) {
        Ok(WaitKind::Unspecified) => "unspecified".into(),
        Ok(WaitKind::NotBefore) => "not before its start time".into(),
        Ok(WaitKind::RetryBackoff) => "retry backoff".into(),
        Ok(WaitKind::NoAgentInPool) => "no agent in its pool".into(),
        Ok(WaitKind::NoAgentWithLabels) => "no agent with its labels".into(),
        Ok(WaitKind::AgentsUnavailable) => "matching agents take no work".into(),
        Ok(WaitKind::AgentsBusy) => "matching agents are busy".into(),
        Ok(WaitKind::Dispatching) => "dispatching".into(),
        Err(_) => format!("unknown({value})"),
    }
}

/// The short lower-case name of a priority.
pub fn priority_name(value: i32) -> String {
    match Priority::try_from(value) {
        Ok(Priority::Unspecified) => "unspecified".into(),
        Ok(Priority::Low) => "low".into(),
        Ok(Priority::Normal) => "normal".into(),
        Ok(Priority::High) => "high".into(),
        Ok(Priority::Critical) => "critical".into(),
        Err(_) => format!("unknown({value})"),
    }
}

/// The short lower-case name of an agent health.
pub fn health_name(value: i32) -> String {
    match AgentHealth::try_from(value) {
        Ok(AgentHealth::Unspecified) => "unspecified".into(),
        Ok(AgentHealth::Registering) => "registering".into(),
        Ok(AgentHealth::Healthy) => "healthy".into(),
        Ok(AgentHealth::Degraded) => "degraded".into(),
        Ok(AgentHealth::Unhealthy) => "unhealthy".into(),
        Ok(AgentHealth::Offline) => "offline".into(),
        Ok(AgentHealth::Terminated) => "terminated".into(),
        Err(_) => format!("unknown({value})"),
    }
}

/// The short lower-case name of an agent scheduling status.
pub fn scheduling_status_name(value: i32) -> String {
    match AgentSchedulingStatus::try_from(value) {
        Ok(AgentSchedulingStatus::Unspecified) => "unspecified".into(),
        Ok(AgentSchedulingStatus::Active) => "active".into(),
        Ok(AgentSchedulingStatus::Cordoned) => "cordoned".into(),
        Ok(AgentSchedulingStatus::Draining) => "draining".into(),
        Ok(AgentSchedulingStatus::OutOfService) => "out-of-service".into(),
        Err(_) => format!("unknown({value})"),
    }
}

/// A compact age with at most two units: `42s`, `5m12s`, `3h4m`, `2d3h`.
pub fn format_age(d: Duration) -> String {
    let secs = d.as_secs();
    let (days, hours, mins, s) = (secs / 86_400, (secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    let two = |a: u64, ua: &str, b: u64, ub: &str| {
        if b == 0 {
            format!("{a}{ua}")
        } else {
            format!("{a}{ua}{b}{ub}")
        }
    };
    if days > 0 {
        two(days, "d", hours, "h")
    } else if hours > 0 {
        two(hours, "h", mins, "m")
    } else if mins > 0 {
        two(mins, "m", s, "s")
    } else if secs > 0 {
        format!("{secs}s")
    } else {
        format!("{}ms", d.subsec_millis())
    }
}

/// The time since `ts`, or `-` when unset or in the future.
fn age_since(ts: Option<&prost_types::Timestamp>, now: SystemTime) -> String {
    ts.and_then(tether::time::from_timestamp)
        .and_then(|t| now.duration_since(t).ok())
        .map(format_age)
        .unwrap_or_else(|| "-".into())
}

/// An absolute time with a relative hint: `2030-01-02T03:04:05Z (5m ago)`.
pub fn format_time(ts: &prost_types::Timestamp, now: SystemTime) -> String {
    let Some(t) = tether::time::from_timestamp(ts) else {
        return format!("invalid ({}s, {}ns)", ts.seconds, ts.nanos);
    };
    let abs = humantime::format_rfc3339_seconds(t);
    match now.duration_since(t) {
        Ok(ago) => format!("{abs} ({} ago)", format_age(ago)),
        Err(e) => format!("{abs} (in {})", format_age(e.duration())),
    }
}

/// A protobuf duration as `30s`, `10m`; `-` if malformed.
pub fn format_duration(d: &prost_types::Duration) -> String {
    match tether::time::from_duration(d) {
        Some(d) if d.is_zero() => "0s".into(),
        Some(d) => humantime::format_duration(d).to_string().replace(' ', ""),
        None => "-".into(),
    }
}

/// Payload or result bytes for a table: the text itself when it is printable
/// UTF-8 (newlines and tabs allowed), otherwise a note with the size, since
/// raw binary would garble the terminal.
pub fn format_bytes_field(b: &[u8]) -> String {
    match std::str::from_utf8(b) {
        Ok(s) if s.chars().all(|c| !c.is_control() || matches!(c, '\n' | '\t' | '\r')) => s.to_string(),
        _ => format!("<{} bytes of binary data; use --output json>", b.len()),
    }
}

/// A byte count as `512 B`, `1.5 KiB`, `8.0 GiB`.
pub fn format_size(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// A point in time as RFC 3339 to the second, for table cells; `-` when
/// unset.
fn format_instant(ts: Option<&prost_types::Timestamp>) -> String {
    match ts {
        None => "-".into(),
        Some(ts) => match tether::time::from_timestamp(ts) {
            Some(t) => humantime::format_rfc3339_seconds(t).to_string(),
            None => format!("invalid ({}s, {}ns)", ts.seconds, ts.nanos),
        },
    }
}

/// Labels as `a=1, b=2`, sorted for stable output; `-` when empty.
fn format_labels(labels: &std::collections::HashMap<String, String>) -> String {
    if labels.is_empty() {
        return "-".into();
    }
    let mut pairs: Vec<_> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    pairs.sort();
    pairs.join(", ")
}

fn or_dash(s: &str) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s.to_string()
    }
}

// ---------------------------------------------------------------------------
// Tables.

/// A borderless, kubectl-style table: easy to read and to `grep`/`awk`.
fn list_table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(presets::NOTHING).set_content_arrangement(ContentArrangement::Disabled).set_header(header.to_vec());
    t
}

/// Writes a table without the leading pad and trailing blanks comfy-table
/// leaves around each cell.
fn write_table(out: &mut dyn Write, mut table: Table) -> std::io::Result<()> {
    for col in table.column_iter_mut() {
        col.set_padding((0, 3));
    }
    for line in table.to_string().lines() {
        writeln!(out, "{}", line.trim_end())?;
    }
    Ok(())
}

/// A two-column `Key:  value` table for one object.
fn details_table(rows: Vec<(&str, String)>) -> Table {
    let mut t = Table::new();
    t.load_preset(presets::NOTHING).set_content_arrangement(ContentArrangement::Disabled);
    for (k, v) in rows {
        t.add_row(vec![format!("{k}:"), v]);
    }
    t
}

/// Writes jobs as a list table: ID, QUEUE, STATE, PRIORITY, ATTEMPT, AGE,
/// WORKER.
pub fn write_jobs_table(out: &mut dyn Write, jobs: &[QueuedJob], now: SystemTime) -> std::io::Result<()> {
    let mut t = list_table(&["ID", "QUEUE", "STATE", "PRIORITY", "ATTEMPT", "AGE", "WORKER"]);
    for j in jobs {
        t.add_row(vec![
            j.id.clone(),
            j.queue.clone(),
            state_name(j.state),
            priority_name(j.priority),
            format!("{}/{}", j.attempt, j.max_attempts),
            age_since(j.create_time.as_ref(), now),
            or_dash(&j.worker_id),
        ]);
    }
    write_table(out, t)
}

/// Which failures a job retries, in words.
fn format_retry(policy: Option<&tether::v1::RetryPolicy>) -> String {
    match policy {
        Some(p) if p.any_failure => "any failure".to_string(),
        Some(p) if !p.exit_codes.is_empty() => {
            let codes: Vec<String> = p.exit_codes.iter().map(i32::to_string).collect();
            format!("exit codes {}", codes.join(", "))
        }
        _ => "lost attempts only".to_string(),
    }
}

/// Writes every field of one job as a key/value table; optional fields that
/// are unset are left out.
pub fn write_job_details(out: &mut dyn Write, j: &QueuedJob, now: SystemTime) -> std::io::Result<()> {
    let routing = j.routing.clone().unwrap_or_default();
    let mut rows = vec![
        ("ID", j.id.clone()),
        ("Queue", j.queue.clone()),
        ("State", state_name(j.state)),
        ("Priority", priority_name(j.priority)),
        ("Pool", if routing.pool.is_empty() { "default".into() } else { routing.pool.clone() }),
        ("Required labels", format_labels(&routing.required_labels)),
        ("Attempt", format!("{} of {}", j.attempt, j.max_attempts)),
    ];
    if j.fencing_token != 0 {
        rows.push(("Fencing token", j.fencing_token.to_string()));
    }
    if !j.worker_id.is_empty() {
        rows.push(("Worker", j.worker_id.clone()));
    }
    if let Some(d) = &j.lease_duration {
        rows.push(("Lease", format_duration(d)));
    }
    rows.push(("Timeout", j.timeout.as_ref().map(format_duration).unwrap_or_else(|| "none".into())));
    rows.push(("Retry", format_retry(j.retry_policy.as_ref())));
    if !j.idempotency_key.is_empty() {
        rows.push(("Idempotency key", j.idempotency_key.clone()));
    }
    for (name, ts) in [
        ("Created", &j.create_time),
        ("Updated", &j.update_time),
        ("Ready", &j.ready_time),
        ("Lease expires", &j.lease_expire_time),
        ("Finished", &j.finish_time),
    ] {
        if let Some(ts) = ts {
            rows.push((name, format_time(ts, now)));
        }
    }
    if !j.last_error.is_empty() {
        rows.push(("Last error", j.last_error.clone()));
    }
    rows.push(("Payload", format_bytes_field(&j.payload)));
    if !j.result.is_empty() {
        rows.push(("Result", format_bytes_field(&j.result)));
    }
    write_table(out, details_table(rows))
}

/// The pool a dashboard job runs in; an empty pool is the server's default.
fn job_pool(j: &Job) -> String {
    match j.routing.as_ref().map(|r| r.pool.as_str()) {
        None | Some("") => "default".into(),
        Some(pool) => pool.to_string(),
    }
}

/// Writes dashboard jobs as a list table: ID, NAME, STATUS, POOL,
/// REQUESTED BY, AGE.
pub fn write_dashboard_jobs_table(out: &mut dyn Write, jobs: &[Job], now: SystemTime) -> std::io::Result<()> {
    let mut t = list_table(&["ID", "NAME", "STATUS", "POOL", "REQUESTED BY", "AGE"]);
    for j in jobs {
        t.add_row(vec![
            j.id.clone(),
            j.name.clone(),
            job_status_name(j.status),
            job_pool(j),
            or_dash(&j.requested_by),
            age_since(j.create_time.as_ref(), now),
        ]);
    }
    write_table(out, t)
}

/// Writes one dashboard job: its fields as a key/value table, then a
/// `waiting:` line while it is pending, its attempts and its history.
pub fn write_dashboard_job_details(out: &mut dyn Write, j: &Job, now: SystemTime) -> std::io::Result<()> {
    let routing = j.routing.clone().unwrap_or_default();
    let mut rows = vec![
        ("ID", j.id.clone()),
        ("Name", j.name.clone()),
        ("Status", job_status_name(j.status)),
        ("Queued state", state_name(j.queued_state)),
        ("Command", j.command.clone()),
        ("Env", format_labels(&j.env)),
        ("Workdir", if j.working_dir.is_empty() { "- (the agent's)".into() } else { j.working_dir.clone() }),
        ("Pool", job_pool(j)),
        ("Required labels", format_labels(&routing.required_labels)),
        ("Priority", priority_name(j.priority)),
        ("Timeout", j.timeout.as_ref().map(format_duration).unwrap_or_else(|| "none".into())),
        ("Max attempts", j.max_attempts.to_string()),
        ("Requested by", or_dash(&j.requested_by)),
    ];
    if !j.retry_of.is_empty() {
        rows.push(("Retry of", j.retry_of.clone()));
    }
    if !j.idempotency_key.is_empty() {
        rows.push(("Idempotency key", j.idempotency_key.clone()));
    }
    for (name, ts) in [("Created", &j.create_time), ("Updated", &j.update_time), ("Finished", &j.finish_time)] {
        if let Some(ts) = ts {
            rows.push((name, format_time(ts, now)));
        }
    }
    if !j.error.is_empty() {
        rows.push(("Error", j.error.clone()));
    }
    write_table(out, details_table(rows))?;

    if let Some(reason) = &j.pending_reason {
        let summary = if reason.summary.is_empty() { wait_kind_name(reason.kind) } else { reason.summary.clone() };
        writeln!(out, "waiting: {summary}")?;
    }

    writeln!(out)?;
    if j.attempts.is_empty() {
        writeln!(out, "no attempts yet")?;
    } else {
        write_attempts_table(out, &j.attempts)?;
    }

    writeln!(out)?;
    if j.dropped_transitions > 0 {
        writeln!(out, "({} older changes are not kept)", j.dropped_transitions)?;
    }
    write_history_table(out, &j.transitions)
}

/// What an attempt came to: `running` while it runs, `retried` when the job
/// went back to the queue, else the state it left the job in.
fn attempt_outcome(a: &JobAttempt) -> String {
    match QueuedJobState::try_from(a.outcome) {
        Ok(QueuedJobState::Unspecified) if a.end_time.is_none() => "running".into(),
        Ok(QueuedJobState::Unspecified) => "-".into(),
        Ok(QueuedJobState::Queued) => "retried".into(),
        _ => state_name(a.outcome),
    }
}

/// Writes a job's attempts: ATTEMPT, AGENT, STARTED, ENDED, OUTCOME,
/// EXIT CODE, REASON (last, since it is free text).
fn write_attempts_table(out: &mut dyn Write, attempts: &[JobAttempt]) -> std::io::Result<()> {
    let mut t = list_table(&["ATTEMPT", "AGENT", "STARTED", "ENDED", "OUTCOME", "EXIT CODE", "REASON"]);
    for a in attempts {
        t.add_row(vec![
            a.attempt.to_string(),
            or_dash(&a.agent_id),
            format_instant(a.start_time.as_ref()),
            format_instant(a.end_time.as_ref()),
            attempt_outcome(a),
            a.exit_code.map_or_else(|| "-".into(), |c| c.to_string()),
            or_dash(&a.reason),
        ]);
    }
    write_table(out, t)
}

/// Writes a job's state changes, oldest first: TIME, FROM → TO, ATTEMPT,
/// ACTOR, REASON (last, since it is free text).
fn write_history_table(out: &mut dyn Write, transitions: &[JobTransition]) -> std::io::Result<()> {
    let mut t = list_table(&["TIME", "FROM → TO", "ATTEMPT", "ACTOR", "REASON"]);
    for tr in transitions {
        let from =
            if tr.from_state == QueuedJobState::Unspecified as i32 { "-".into() } else { state_name(tr.from_state) };
        let mut reason = tr.reason.clone();
        if let Some(code) = tr.exit_code {
            if !reason.contains(&code.to_string()) {
                reason = if reason.is_empty() {
                    format!("exit code {code}")
                } else {
                    format!("{reason} (exit code {code})")
                };
            }
        }
        t.add_row(vec![
            format_instant(tr.time.as_ref()),
            format!("{from} → {}", state_name(tr.to_state)),
            if tr.attempt == 0 { "-".into() } else { tr.attempt.to_string() },
            or_dash(&tr.actor),
            or_dash(&reason),
        ]);
    }
    write_table(out, t)
}

/// Writes deployments as a list table: ID, VERSION, ENVIRONMENT, STATE,
/// TRIGGER, JOB, REQUESTED BY, AGE.
pub fn write_deployments_table(
    out: &mut dyn Write,
    deployments: &[Deployment],
    now: SystemTime,
) -> std::io::Result<()> {
    let mut t = list_table(&["ID", "VERSION", "ENVIRONMENT", "STATE", "TRIGGER", "JOB", "REQUESTED BY", "AGE"]);
    for d in deployments {
        t.add_row(vec![
            d.id.clone(),
            d.version.clone(),
            d.environment.clone(),
            deployment_state_name(d.state),
            deployment_trigger_name(d.trigger),
            or_dash(&d.job_id),
            or_dash(&d.requested_by),
            age_since(d.create_time.as_ref(), now),
        ]);
    }
    write_table(out, t)
}

/// Writes every field of one deployment, its release's rollout spec
/// included, as a key/value table; links and times that are unset are left
/// out.
pub fn write_deployment_details(out: &mut dyn Write, d: &Deployment, now: SystemTime) -> std::io::Result<()> {
    let rollout = d.rollout.clone().unwrap_or_default();
    let mut rows = vec![
        ("ID", d.id.clone()),
        ("Service", d.service.clone()),
        ("Version", d.version.clone()),
        ("Environment", d.environment.clone()),
        ("State", deployment_state_name(d.state)),
        ("Trigger", deployment_trigger_name(d.trigger)),
    ];
    if !d.promoted_from.is_empty() {
        rows.push(("Promoted from", d.promoted_from.clone()));
    }
    if !d.rollback_of.is_empty() {
        rows.push(("Rollback of", d.rollback_of.clone()));
    }
    rows.extend([
        ("Job", if d.job_id.is_empty() { "- (not started)".into() } else { d.job_id.clone() }),
        ("Requested by", or_dash(&d.requested_by)),
        ("Reason", or_dash(&d.reason)),
        ("Command", rollout.command.clone()),
        ("Vars", format_labels(&rollout.env)),
        (
            "Workdir",
            if rollout.working_dir.is_empty() { "- (the agent's)".into() } else { rollout.working_dir.clone() },
        ),
        ("Required labels", format_labels(&rollout.labels)),
        ("Timeout", rollout.timeout.as_ref().map(format_duration).unwrap_or_else(|| "none".into())),
        ("Max attempts", rollout.max_attempts.to_string()),
    ]);
    for (name, ts) in [("Created", &d.create_time), ("Updated", &d.update_time), ("Finished", &d.finish_time)] {
        if let Some(ts) = ts {
            rows.push((name, format_time(ts, now)));
        }
    }
    if !d.error.is_empty() {
        rows.push(("Error", d.error.clone()));
    }
    write_table(out, details_table(rows))
}

/// Writes deployment events as a list table: TIME, DEPLOYMENT, VERSION,
/// ENVIRONMENT, FROM → TO, ACTOR, JOB, REASON (last, since it is free text).
pub fn write_deployment_events_table(out: &mut dyn Write, events: &[DeploymentEvent]) -> std::io::Result<()> {
    let mut t = list_table(&["TIME", "DEPLOYMENT", "VERSION", "ENVIRONMENT", "FROM → TO", "ACTOR", "JOB", "REASON"]);
    for e in events {
        let from = if e.from_state == DeploymentState::Unspecified as i32 {
            "-".into()
        } else {
            deployment_state_name(e.from_state)
        };
        t.add_row(vec![
            format_instant(e.time.as_ref()),
            e.deployment_id.clone(),
            e.version.clone(),
            e.environment.clone(),
            format!("{from} → {}", deployment_state_name(e.to_state)),
            or_dash(&e.actor),
            or_dash(&e.job_id),
            or_dash(&e.reason),
        ]);
    }
    write_table(out, t)
}

/// Writes environments as a list table: NAME, POOL, PROMOTE TO,
/// AUTO ROLLBACK, AGE.
pub fn write_environments_table(
    out: &mut dyn Write,
    environments: &[Environment],
    now: SystemTime,
) -> std::io::Result<()> {
    let mut t = list_table(&["NAME", "POOL", "PROMOTE TO", "AUTO ROLLBACK", "AGE"]);
    for e in environments {
        t.add_row(vec![
            e.name.clone(),
            e.pool.clone(),
            or_dash(&e.promote_to),
            if e.auto_rollback { "yes" } else { "no" }.to_string(),
            age_since(e.create_time.as_ref(), now),
        ]);
    }
    write_table(out, t)
}

/// Writes queue statistics: counts by state, queued counts by priority
/// (highest first), and the age of the oldest waiting job.
pub fn write_stats(out: &mut dyn Write, stats: &GetQueueStatsResponse) -> std::io::Result<()> {
    let mut by_state = stats.by_state.clone();
    by_state.sort_by_key(|s| s.state);
    let mut t = list_table(&["STATE", "COUNT"]);
    for s in &by_state {
        t.add_row(vec![state_name(s.state), s.count.to_string()]);
    }
    write_table(out, t)?;
    writeln!(out)?;

    let mut by_priority = stats.queued_by_priority.clone();
    by_priority.sort_by_key(|p| std::cmp::Reverse(p.priority));
    let mut t = list_table(&["PRIORITY", "QUEUED"]);
    for p in &by_priority {
        t.add_row(vec![priority_name(p.priority), p.count.to_string()]);
    }
    write_table(out, t)?;
    writeln!(out)?;

    let oldest = stats
        .oldest_queued_age
        .as_ref()
        .and_then(tether::time::from_duration)
        .filter(|d| !d.is_zero())
        .map(format_age)
        .unwrap_or_else(|| "- (nothing waiting)".into());
    writeln!(out, "Oldest queued: {oldest}")
}

/// Writes agents as a list table: ID, NAME, POOL, HEALTH, STATUS, SLOTS,
/// RUNNING, CONNECTED, LAST SEEN, REASON (why the agent has its health; last,
/// since it is free text).
pub fn write_agents_table(out: &mut dyn Write, agents: &[Agent], now: SystemTime) -> std::io::Result<()> {
    let mut t =
        list_table(&["ID", "NAME", "POOL", "HEALTH", "STATUS", "SLOTS", "RUNNING", "CONNECTED", "LAST SEEN", "REASON"]);
    for a in agents {
        t.add_row(vec![
            a.id.clone(),
            a.name.clone(),
            a.pool.clone(),
            health_name(a.health),
            scheduling_status_name(a.scheduling_status),
            a.slots.to_string(),
            a.running_jobs.len().to_string(),
            if a.connected { "yes" } else { "no" }.to_string(),
            age_since(a.last_seen_time.as_ref(), now),
            or_dash(&a.health_reason),
        ]);
    }
    write_table(out, t)
}

/// Writes every field of one agent as a key/value table.
pub fn write_agent_details(out: &mut dyn Write, a: &Agent, now: SystemTime) -> std::io::Result<()> {
    let mut rows = vec![
        ("ID", a.id.clone()),
        ("Name", a.name.clone()),
        ("Pool", a.pool.clone()),
        ("Labels", format_labels(&a.labels)),
        ("Health", health_name(a.health)),
        ("Health reason", or_dash(&a.health_reason)),
        ("Status", scheduling_status_name(a.scheduling_status)),
        ("Connected", if a.connected { "yes" } else { "no" }.into()),
        ("Version", or_dash(&a.version)),
        ("Slots", a.slots.to_string()),
    ];
    let running = if a.running_jobs.is_empty() {
        "none".to_string()
    } else {
        a.running_jobs.iter().map(|r| format!("{} (attempt {})", r.job_id, r.attempt)).collect::<Vec<_>>().join("\n")
    };
    rows.push(("Running jobs", running));
    if let Some(m) = &a.metrics {
        rows.push(("CPU", format!("{:.1}%", m.cpu_percent)));
        rows.push(("Memory", format!("{} / {}", format_size(m.memory_used_bytes), format_size(m.memory_total_bytes))));
        rows.push(("Disk", format!("{} / {}", format_size(m.disk_used_bytes), format_size(m.disk_total_bytes))));
    }
    for (name, ts) in [("Created", &a.create_time), ("Last seen", &a.last_seen_time)] {
        if let Some(ts) = ts {
            rows.push((name, format_time(ts, now)));
        }
    }
    write_table(out, details_table(rows))
}

/// Labels as `a=1,b=2` (no spaces, so a list row stays one field per
/// column), sorted; `-` when empty.
fn format_labels_compact(labels: &std::collections::HashMap<String, String>) -> String {
    format_labels(labels).replace(", ", ",")
}

/// Writes pools as a list table: NAME, MIN, DESIRED, MAX, DEFAULT LABELS,
/// AGE, DESCRIPTION (last, since it is free text).
pub fn write_pools_table(out: &mut dyn Write, pools: &[AgentPool], now: SystemTime) -> std::io::Result<()> {
    let mut t = list_table(&["NAME", "MIN", "DESIRED", "MAX", "DEFAULT LABELS", "AGE", "DESCRIPTION"]);
    for p in pools {
        t.add_row(vec![
            p.name.clone(),
            p.min_size.to_string(),
            p.desired_size.to_string(),
            p.max_size.to_string(),
            format_labels_compact(&p.default_labels),
            age_since(p.create_time.as_ref(), now),
            or_dash(&p.description),
        ]);
    }
    write_table(out, t)
}

/// Writes every field of one pool as a key/value table.
pub fn write_pool_details(out: &mut dyn Write, p: &AgentPool, now: SystemTime) -> std::io::Result<()> {
    let mut rows = vec![
        ("Name", p.name.clone()),
        ("Description", or_dash(&p.description)),
        ("Min size", p.min_size.to_string()),
        ("Desired size", p.desired_size.to_string()),
        ("Max size", p.max_size.to_string()),
        ("Default labels", format_labels(&p.default_labels)),
    ];
    for (name, ts) in [("Created", &p.create_time), ("Updated", &p.update_time)] {
        if let Some(ts) = ts {
            rows.push((name, format_time(ts, now)));
        }
    }
    write_table(out, details_table(rows))
}

/// What the scaling signal asks of the autoscaler: `add 2 agents`,
/// `remove 1 agent`, or `none`.
pub fn scaling_change(s: &GetPoolScalingSignalResponse) -> String {
    let plural = |n: u32| if n == 1 { "agent" } else { "agents" };
    match s.desired_agents.cmp(&s.current_agents) {
        std::cmp::Ordering::Greater => {
            let n = s.desired_agents - s.current_agents;
            format!("add {n} {}", plural(n))
        }
        std::cmp::Ordering::Less => {
            let n = s.current_agents - s.desired_agents;
            format!("remove {n} {}", plural(n))
        }
        std::cmp::Ordering::Equal => "none".into(),
    }
}

/// Writes a pool's scaling signal and its inputs as a key/value table.
pub fn write_scaling(
    out: &mut dyn Write,
    pool: &str,
    s: &GetPoolScalingSignalResponse,
    now: SystemTime,
) -> std::io::Result<()> {
    let rows = vec![
        ("Pool", pool.to_string()),
        ("Desired agents", s.desired_agents.to_string()),
        ("Current agents", s.current_agents.to_string()),
        ("Change", scaling_change(s)),
        ("Queued jobs", s.queued_jobs.to_string()),
        ("Running jobs", s.running_jobs.to_string()),
        ("Slots per agent", s.slots_per_agent.to_string()),
        ("Min size", s.min_size.to_string()),
        ("Max size", s.max_size.to_string()),
        ("Computed", s.compute_time.as_ref().map(|t| format_time(t, now)).unwrap_or_else(|| "-".into())),
    ];
    write_table(out, details_table(rows))
}

// ---------------------------------------------------------------------------
// Event lines.

/// Free text (an error, a reason) on one line: runs of whitespace, line
/// breaks included, become one space.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// One change of `tether watch` as a line: its time, its kind, what
/// changed and how, e.g. `2030-01-02T03:04:05Z job j-1 queued -> claimed
/// (status running, attempt 1, agent a-1)`. `None` for what is not a
/// change: a keep-alive, a reset (`tether watch` reports it on stderr) or a
/// kind of event this build does not know.
pub fn format_watch_event(response: &WatchEventsResponse) -> Option<String> {
    use tether::v1::watch_events_response::Event;
    let line = match response.event.as_ref()? {
        Event::Job(e) => {
            let mut details = vec![format!("status {}", job_status_name(e.status))];
            if e.attempt > 0 {
                details.push(format!("attempt {}", e.attempt));
            }
            if !e.agent_id.is_empty() {
                details.push(format!("agent {}", e.agent_id));
            }
            let mut line = format!(
                "{} job {} {} -> {} ({})",
                format_instant(e.time.as_ref()),
                e.job_id,
                from_state(e.previous_queued_state, QueuedJobState::Unspecified as i32, state_name),
                state_name(e.queued_state),
                details.join(", ")
            );
            // The job's last error stays on it through later changes: show
            // it where it is news, when the job ends badly or an attempt
            // goes back to the queue.
            let ended_badly = [JobStatus::Failed as i32, JobStatus::Cancelled as i32].contains(&e.status);
            let requeued = e.queued_state == QueuedJobState::Queued as i32
                && e.previous_queued_state != QueuedJobState::Unspecified as i32;
            if (ended_badly || requeued) && !e.error.trim().is_empty() {
                line.push_str(&format!(": {}", one_line(&e.error)));
            }
            line
        }
        Event::Deployment(e) => {
            let mut line = format!(
                "{} deployment {} {} {} {} -> {}",
                format_instant(e.time.as_ref()),
                e.deployment_id,
                e.version,
                e.environment,
                from_state(e.from_state, DeploymentState::Unspecified as i32, deployment_state_name),
                deployment_state_name(e.to_state)
            );
            if !e.actor.is_empty() {
                line.push_str(&format!(" by {}", e.actor));
            }
            if !e.reason.trim().is_empty() {
                line.push_str(&format!(": {}", one_line(&e.reason)));
            }
            line
        }
        Event::Agent(e) => {
            let default = Agent::default();
            let a = e.agent.as_ref().unwrap_or(&default);
            let name = if a.name.is_empty() { a.id.clone() } else { format!("{}/{}", a.pool, a.name) };
            let before = if e.previous_health == AgentHealth::Unspecified as i32 {
                "registered".to_string()
            } else {
                format!(
                    "was {}/{}",
                    health_name(e.previous_health),
                    scheduling_status_name(e.previous_scheduling_status)
                )
            };
            let mut line = format!(
                "{} agent {name} {}/{} ({before})",
                format_instant(e.time.as_ref()),
                health_name(a.health),
                scheduling_status_name(a.scheduling_status)
            );
            if !a.health_reason.trim().is_empty() {
                line.push_str(&format!(": {}", one_line(&a.health_reason)));
            }
            line
        }
        Event::KeepAlive(_) | Event::Reset(_) => return None,
    };
    Some(line)
}

/// The state a change started from; `-` when it is a creation
/// (`unspecified`), as `deploy history` shows it.
fn from_state(value: i32, unspecified: i32, name: fn(i32) -> String) -> String {
    if value == unspecified {
        "-".into()
    } else {
        name(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;
    use tether::v1::{AgentMetrics, JobRef, PriorityCount, Routing, StateCount};

    const NOW_SECS: i64 = 1_893_553_445; // 2030-01-02T03:04:05Z

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(NOW_SECS as u64)
    }

    fn ts(secs: i64) -> Option<prost_types::Timestamp> {
        Some(prost_types::Timestamp { seconds: secs, nanos: 0 })
    }

    pub(crate) fn sample_job() -> QueuedJob {
        QueuedJob {
            id: "job-1".into(),
            queue: "builds".into(),
            payload: bytes::Bytes::from_static(br#"{"command":"echo hi"}"#),
            priority: Priority::High as i32,
            routing: Some(Routing {
                pool: "linux".into(),
                required_labels: [("arch".to_string(), "arm64".to_string())].into(),
            }),
            max_attempts: 3,
            lease_duration: Some(prost_types::Duration { seconds: 30, nanos: 0 }),
            timeout: None,
            idempotency_key: String::new(),
            state: QueuedJobState::Running as i32,
            attempt: 1,
            fencing_token: 7,
            worker_id: "agent-9".into(),
            create_time: ts(NOW_SECS - 312),
            update_time: ts(NOW_SECS - 5),
            ready_time: None,
            lease_expire_time: ts(NOW_SECS + 25),
            result: bytes::Bytes::new(),
            last_error: String::new(),
            finish_time: None,
            retry_policy: Some(tether::v1::RetryPolicy { any_failure: false, exit_codes: vec![75] }),
        }
    }

    #[test]
    fn queued_job_renders_as_canonical_json() {
        let json = to_json(&sample_job()).expect("renders");
        let v: serde_json::Value = serde_json::from_str(&json).expect("valid JSON");
        assert_eq!(v["id"], "job-1");
        assert_eq!(v["queue"], "builds");
        // Enums by name, camelCase fields, 64-bit integers as strings.
        assert_eq!(v["state"], "QUEUED_JOB_STATE_RUNNING");
        assert_eq!(v["priority"], "PRIORITY_HIGH");
        assert_eq!(v["fencingToken"], "7");
        assert_eq!(v["maxAttempts"], 3);
        assert_eq!(v["workerId"], "agent-9");
        assert_eq!(v["routing"]["requiredLabels"]["arch"], "arm64");
        // Well-known types in their JSON forms.
        assert_eq!(v["leaseDuration"], "30s");
        assert_eq!(v["createTime"], "2030-01-02T02:58:53Z");
        // Bytes as base64.
        assert_eq!(v["payload"], "eyJjb21tYW5kIjoiZWNobyBoaSJ9");
        // Defaults are omitted.
        assert!(v.get("idempotencyKey").is_none());
        assert!(v.get("result").is_none());
        assert!(v.get("timeout").is_none());
        // Pretty-printed.
        assert!(json.contains("\n  \"id\": \"job-1\""), "{json}");
    }

    #[test]
    fn response_wrappers_render_as_json() {
        let resp = tether::v1::EnqueueJobResponse { job: Some(sample_job()), created: true };
        let v: serde_json::Value = serde_json::from_str(&to_json(&resp).expect("renders")).expect("valid JSON");
        assert_eq!(v["created"], true);
        assert_eq!(v["job"]["id"], "job-1");
        let empty = tether::v1::ListQueuedJobsResponse::default();
        assert_eq!(to_json(&empty).expect("renders"), "{}");
    }

    #[test]
    fn every_named_message_is_in_the_descriptor_set() {
        let pool = descriptor_pool().expect("decodes");
        for name in [
            <QueuedJob as ProtoName>::FULL_NAME,
            <Agent as ProtoName>::FULL_NAME,
            <tether::v1::DeregisterAgentResponse as ProtoName>::FULL_NAME,
            <tether::v1::WatchQueueResponse as ProtoName>::FULL_NAME,
            <AgentPool as ProtoName>::FULL_NAME,
            <tether::v1::CreateAgentPoolResponse as ProtoName>::FULL_NAME,
            <tether::v1::GetAgentPoolResponse as ProtoName>::FULL_NAME,
            <tether::v1::ListAgentPoolsResponse as ProtoName>::FULL_NAME,
            <tether::v1::UpdateAgentPoolResponse as ProtoName>::FULL_NAME,
            <tether::v1::DeleteAgentPoolResponse as ProtoName>::FULL_NAME,
            <GetPoolScalingSignalResponse as ProtoName>::FULL_NAME,
            <Job as ProtoName>::FULL_NAME,
            <tether::v1::CreateJobResponse as ProtoName>::FULL_NAME,
            <tether::v1::GetJobResponse as ProtoName>::FULL_NAME,
            <tether::v1::ListJobsResponse as ProtoName>::FULL_NAME,
            <tether::v1::CancelJobResponse as ProtoName>::FULL_NAME,
            <tether::v1::RetryJobResponse as ProtoName>::FULL_NAME,
            <Environment as ProtoName>::FULL_NAME,
            <tether::v1::PutEnvironmentResponse as ProtoName>::FULL_NAME,
            <tether::v1::ListEnvironmentsResponse as ProtoName>::FULL_NAME,
            <Deployment as ProtoName>::FULL_NAME,
            <tether::v1::CreateDeploymentResponse as ProtoName>::FULL_NAME,
            <tether::v1::GetDeploymentResponse as ProtoName>::FULL_NAME,
            <tether::v1::ListDeploymentsResponse as ProtoName>::FULL_NAME,
            <tether::v1::PromoteDeploymentResponse as ProtoName>::FULL_NAME,
            <tether::v1::RollbackDeploymentResponse as ProtoName>::FULL_NAME,
            <tether::v1::ListDeploymentEventsResponse as ProtoName>::FULL_NAME,
            <WatchEventsResponse as ProtoName>::FULL_NAME,
        ] {
            assert!(pool.get_message_by_name(name).is_some(), "{name}");
        }
    }

    #[test]
    fn job_table_has_the_expected_columns() {
        let mut out = Vec::new();
        write_jobs_table(&mut out, &[sample_job()], now()).expect("writes");
        let text = String::from_utf8(out).expect("utf8");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        let header: Vec<&str> = lines[0].split_whitespace().collect();
        assert_eq!(header, ["ID", "QUEUE", "STATE", "PRIORITY", "ATTEMPT", "AGE", "WORKER"]);
        let row: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(row, ["job-1", "builds", "running", "high", "1/3", "5m12s", "agent-9"]);
    }

    #[test]
    fn job_details_show_payload_text_and_times() {
        let mut job = sample_job();
        job.result = bytes::Bytes::from_static(&[0, 159, 146, 150]);
        let mut out = Vec::new();
        write_job_details(&mut out, &job, now()).expect("writes");
        let text = String::from_utf8(out).expect("utf8");
        assert!(text.contains(r#"{"command":"echo hi"}"#), "{text}");
        assert!(text.contains("<4 bytes of binary data"), "{text}");
        assert!(text.contains("arch=arm64"), "{text}");
        assert!(text.contains("2030-01-02T03:04:30Z (in 25s)"), "{text}");
        assert!(text.contains("Timeout:"), "{text}");
        assert!(!text.contains("Idempotency key"), "{text}");
    }

    #[test]
    fn stats_are_sorted_and_show_the_oldest_age() {
        let stats = GetQueueStatsResponse {
            by_state: vec![
                StateCount { state: QueuedJobState::Running as i32, count: 2 },
                StateCount { state: QueuedJobState::Queued as i32, count: 5 },
            ],
            queued_by_priority: vec![
                PriorityCount { priority: Priority::Low as i32, count: 1 },
                PriorityCount { priority: Priority::Critical as i32, count: 4 },
            ],
            oldest_queued_age: Some(prost_types::Duration { seconds: 90, nanos: 0 }),
        };
        let mut out = Vec::new();
        write_stats(&mut out, &stats).expect("writes");
        let text = String::from_utf8(out).expect("utf8");
        let queued = text.find("queued").expect("queued row");
        let running = text.find("running").expect("running row");
        assert!(queued < running, "{text}");
        let critical = text.find("critical").expect("critical row");
        let low = text.find("low").expect("low row");
        assert!(critical < low, "{text}");
        assert!(text.ends_with("Oldest queued: 1m30s\n"), "{text}");
    }

    #[test]
    fn agent_tables_render() {
        let agent = Agent {
            id: "a-1".into(),
            name: "runner-1".into(),
            pool: "linux".into(),
            slots: 4,
            health: AgentHealth::Healthy as i32,
            scheduling_status: AgentSchedulingStatus::Cordoned as i32,
            connected: true,
            running_jobs: vec![JobRef { job_id: "job-1".into(), attempt: 2, fencing_token: 9 }],
            metrics: Some(AgentMetrics {
                cpu_percent: 12.5,
                memory_used_bytes: 3 << 30,
                memory_total_bytes: 8 << 30,
                ..Default::default()
            }),
            last_seen_time: ts(NOW_SECS - 3),
            ..Default::default()
        };
        let mut out = Vec::new();
        write_agents_table(&mut out, std::slice::from_ref(&agent), now()).expect("writes");
        let text = String::from_utf8(out).expect("utf8");
        let row: Vec<&str> = text.lines().nth(1).expect("row").split_whitespace().collect();
        assert_eq!(row, ["a-1", "runner-1", "linux", "healthy", "cordoned", "4", "1", "yes", "3s", "-"]);
        let mut out = Vec::new();
        write_agent_details(&mut out, &agent, now()).expect("writes");
        let text = String::from_utf8(out).expect("utf8");
        assert!(text.contains("Health reason:"), "{text}");
        assert!(text.contains("job-1 (attempt 2)"), "{text}");
        assert!(text.contains("3.0 GiB / 8.0 GiB"), "{text}");
        assert!(text.contains("12.5%"), "{text}");
    }

    #[test]
    fn agent_health_reason_is_shown() {
        let agent = Agent {
            id: "a-2".into(),
            health: AgentHealth::Degraded as i32,
            health_reason: "missed 2 heartbeats".into(),
            ..Default::default()
        };
        let mut out = Vec::new();
        write_agents_table(&mut out, std::slice::from_ref(&agent), now()).expect("writes");
        let text = String::from_utf8(out).expect("utf8");
        let header = text.lines().next().expect("header");
        assert!(header.trim_end().ends_with("REASON"), "{text}");
        assert!(text.lines().nth(1).expect("row").ends_with("missed 2 heartbeats"), "{text}");
        let mut out = Vec::new();
        write_agent_details(&mut out, &agent, now()).expect("writes");
        let text = String::from_utf8(out).expect("utf8");
        let line = text.lines().find(|l| l.starts_with("Health reason:")).expect("reason row");
        assert!(line.ends_with("missed 2 heartbeats"), "{text}");
    }

    fn sample_pool() -> AgentPool {
        AgentPool {
            name: "gpu".into(),
            description: "CUDA runners".into(),
            min_size: 1,
            max_size: 10,
            desired_size: 3,
            default_labels: [("gpu".to_string(), "a100".to_string()), ("arch".to_string(), "x86".to_string())].into(),
            create_time: ts(NOW_SECS - 3600),
            update_time: ts(NOW_SECS - 60),
        }
    }

    #[test]
    fn pool_tables_render() {
        let mut out = Vec::new();
        write_pools_table(&mut out, &[sample_pool()], now()).expect("writes");
        let text = String::from_utf8(out).expect("utf8");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        let header: Vec<&str> = lines[0].split("   ").map(str::trim).filter(|c| !c.is_empty()).collect();
        assert_eq!(header, ["NAME", "MIN", "DESIRED", "MAX", "DEFAULT LABELS", "AGE", "DESCRIPTION"]);
        let row: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(row, ["gpu", "1", "3", "10", "arch=x86,gpu=a100", "1h", "CUDA", "runners"]);

        let mut out = Vec::new();
        write_pool_details(&mut out, &sample_pool(), now()).expect("writes");
        let text = String::from_utf8(out).expect("utf8");
        assert!(text.contains("arch=x86, gpu=a100"), "{text}");
        assert!(text.contains("(1m ago)"), "{text}");
        let v: serde_json::Value = serde_json::from_str(&to_json(&sample_pool()).expect("json")).expect("valid");
        assert_eq!(v["minSize"], 1);
        assert_eq!(v["defaultLabels"]["gpu"], "a100");
    }

    #[test]
    fn scaling_signal_renders() {
        let mut s = GetPoolScalingSignalResponse {
            desired_agents: 5,
            current_agents: 3,
            queued_jobs: 12,
            running_jobs: 8,
            slots_per_agent: 4,
            min_size: 1,
            max_size: 10,
            compute_time: ts(NOW_SECS),
        };
        let mut out = Vec::new();
        write_scaling(&mut out, "gpu", &s, now()).expect("writes");
        let text = String::from_utf8(out).expect("utf8");
        for want in ["Pool:", "gpu", "Desired agents:", "add 2 agents", "Queued jobs:", "12", "Slots per agent:"] {
            assert!(text.contains(want), "{want} in {text}");
        }
        assert!(text.contains("2030-01-02T03:04:05Z"), "{text}");
        s.current_agents = 6;
        assert_eq!(scaling_change(&s), "remove 1 agent");
        s.current_agents = 5;
        assert_eq!(scaling_change(&s), "none");
        let line = to_json_line(&s).expect("json");
        assert!(!line.contains('\n'), "{line}");
        let v: serde_json::Value = serde_json::from_str(&line).expect("valid");
        assert_eq!(v["queuedJobs"], "12");
        assert_eq!(v["desiredAgents"], 5);
    }

    fn sample_dashboard_job() -> Job {
        use QueuedJobState as S;
        let step = |secs: i64, from: S, to: S, attempt: u32, actor: &str, reason: &str, exit_code: Option<i32>| {
            JobTransition {
                time: ts(secs),
                from_state: from as i32,
                to_state: to as i32,
                attempt,
                agent_id: if attempt > 0 { "agent-9".into() } else { String::new() },
                actor: actor.into(),
                reason: reason.into(),
                exit_code,
            }
        };
        Job {
            id: "j-1".into(),
            name: "build and test".into(),
            status: JobStatus::Failed as i32,
            queued_state: S::Failed as i32,
            command: "make test".into(),
            env: [("CI".to_string(), "1".to_string())].into(),
            routing: Some(Routing { pool: "linux".into(), required_labels: Default::default() }),
            priority: Priority::Normal as i32,
            max_attempts: 3,
            requested_by: "ann".into(),
            create_time: ts(NOW_SECS - 600),
            update_time: ts(NOW_SECS - 60),
            finish_time: ts(NOW_SECS - 60),
            error: "exit status 2".into(),
            attempts: vec![JobAttempt {
                attempt: 1,
                agent_id: "agent-9".into(),
                claim_time: ts(NOW_SECS - 590),
                start_time: ts(NOW_SECS - 589),
                end_time: ts(NOW_SECS - 60),
                outcome: S::Failed as i32,
                exit_code: Some(2),
                reason: "exit status 2".into(),
            }],
            transitions: vec![
                step(NOW_SECS - 600, S::Unspecified, S::Queued, 0, "ann", "", None),
                step(NOW_SECS - 590, S::Queued, S::Claimed, 1, "tether", "", None),
                step(NOW_SECS - 589, S::Claimed, S::Running, 1, "agent:agent-9", "", None),
                step(NOW_SECS - 60, S::Running, S::Failed, 1, "agent:agent-9", "tests failed", Some(2)),
            ],
            ..Default::default()
        }
    }

    #[test]
    fn dashboard_job_tables_render() {
        let job = sample_dashboard_job();
        let mut out = Vec::new();
        write_dashboard_jobs_table(&mut out, std::slice::from_ref(&job), now()).expect("writes");
        let text = String::from_utf8(out).expect("utf8");
        let lines: Vec<&str> = text.lines().collect();
        let header: Vec<&str> = lines[0].split("   ").map(str::trim).filter(|c| !c.is_empty()).collect();
        assert_eq!(header, ["ID", "NAME", "STATUS", "POOL", "REQUESTED BY", "AGE"]);
        let row: Vec<&str> = lines[1].split("   ").map(str::trim).filter(|c| !c.is_empty()).collect();
        assert_eq!(row, ["j-1", "build and test", "failed", "linux", "ann", "10m"]);

        let mut out = Vec::new();
        write_dashboard_job_details(&mut out, &job, now()).expect("writes");
        let text = String::from_utf8(out).expect("utf8");
        for want in ["Name:", "build and test", "Status:", "Queued state:", "make test", "CI=1", "Requested by:", "ann"]
        {
            assert!(text.contains(want), "{want} in {text}");
        }
        assert!(text.contains("Error:"), "{text}");
        assert!(!text.contains("Retry of"), "{text}");
        assert!(!text.contains("waiting:"), "not pending: {text}");
        let attempt = text.lines().find(|l| l.starts_with("1 ")).expect("attempt row");
        let cells: Vec<&str> = attempt.split_whitespace().collect();
        assert_eq!(cells[..6], ["1", "agent-9", "2030-01-02T02:54:16Z", "2030-01-02T03:03:05Z", "failed", "2"]);
        assert!(text.contains("- → queued"), "{text}");
        let last = text.lines().last().expect("history");
        assert!(last.contains("running → failed") && last.contains("agent:agent-9"), "{text}");
        assert!(last.ends_with("tests failed (exit code 2)"), "{text}");
    }

    #[test]
    fn a_pending_job_says_why_it_waits() {
        let job = Job {
            id: "j-2".into(),
            status: JobStatus::Pending as i32,
            queued_state: QueuedJobState::Queued as i32,
            pending_reason: Some(tether::v1::PendingReason {
                kind: WaitKind::NoAgentInPool as i32,
                summary: "no agent of pool \"gpu\" is connected".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut out = Vec::new();
        write_dashboard_job_details(&mut out, &job, now()).expect("writes");
        let text = String::from_utf8(out).expect("utf8");
        assert!(text.contains("\nwaiting: no agent of pool \"gpu\" is connected\n"), "{text}");
        assert!(text.contains("no attempts yet"), "{text}");
        assert!(text.contains("Workdir:") && text.contains("- (the agent's)"), "{text}");
        let bare = Job {
            pending_reason: Some(tether::v1::PendingReason { kind: WaitKind::AgentsBusy as i32, ..Default::default() }),
            ..job
        };
        let mut out = Vec::new();
        write_dashboard_job_details(&mut out, &bare, now()).expect("writes");
        assert!(String::from_utf8(out).expect("utf8").contains("waiting: matching agents are busy"));
    }

    #[test]
    fn dashboard_jobs_render_as_json() {
        let resp = tether::v1::GetJobResponse { job: Some(sample_dashboard_job()) };
        let v: serde_json::Value = serde_json::from_str(&to_json(&resp).expect("renders")).expect("valid JSON");
        assert_eq!(v["job"]["status"], "JOB_STATUS_FAILED");
        assert_eq!(v["job"]["queuedState"], "QUEUED_JOB_STATE_FAILED");
        assert_eq!(v["job"]["attempts"][0]["exitCode"], 2);
        assert_eq!(v["job"]["transitions"][3]["toState"], "QUEUED_JOB_STATE_FAILED");
    }

    #[test]
    fn unknown_enum_values_are_not_mislabelled() {
        assert_eq!(job_status_name(42), "unknown(42)");
        assert_eq!(wait_kind_name(42), "unknown(42)");
        assert_eq!(state_name(42), "unknown(42)");
        assert_eq!(priority_name(-1), "unknown(-1)");
        assert_eq!(health_name(99), "unknown(99)");
        assert_eq!(scheduling_status_name(99), "unknown(99)");
        assert_eq!(deployment_state_name(99), "unknown(99)");
        assert_eq!(deployment_trigger_name(99), "unknown(99)");
    }

    fn sample_deployment() -> Deployment {
        Deployment {
            id: "api/2".into(),
            service: "api".into(),
            version: "v2".into(),
            environment: "production".into(),
            state: DeploymentState::RolledBack as i32,
            trigger: DeploymentTrigger::Promote as i32,
            job_id: "j-7".into(),
            requested_by: "ann".into(),
            reason: "green in staging".into(),
            promoted_from: "api/1".into(),
            rollback_of: String::new(),
            rollout: Some(tether::v1::RolloutSpec {
                command: "./deploy.sh".into(),
                env: [("REGION".to_string(), "eu".to_string())].into(),
                working_dir: String::new(),
                labels: Default::default(),
                timeout: Some(prost_types::Duration { seconds: 600, nanos: 0 }),
                max_attempts: 3,
            }),
            create_time: ts(NOW_SECS - 600),
            update_time: ts(NOW_SECS - 60),
            finish_time: ts(NOW_SECS - 300),
            error: "rolled back to v1".into(),
        }
    }

    #[test]
    fn deployment_tables_render() {
        let d = sample_deployment();
        let mut out = Vec::new();
        write_deployments_table(&mut out, std::slice::from_ref(&d), now()).expect("writes");
        let text = String::from_utf8(out).expect("utf8");
        let lines: Vec<&str> = text.lines().collect();
        let header: Vec<&str> = lines[0].split("   ").map(str::trim).filter(|c| !c.is_empty()).collect();
        assert_eq!(header, ["ID", "VERSION", "ENVIRONMENT", "STATE", "TRIGGER", "JOB", "REQUESTED BY", "AGE"]);
        let row: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(row, ["api/2", "v2", "production", "rolled-back", "promote", "j-7", "ann", "10m"]);

        let mut out = Vec::new();
        write_deployment_details(&mut out, &d, now()).expect("writes");
        let text = String::from_utf8(out).expect("utf8");
        let value = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{key}:")))
                .map(str::trim)
                .unwrap_or_else(|| panic!("{key} in {text}"))
                .to_string()
        };
        assert_eq!(value("State"), "rolled-back");
        assert_eq!(value("Promoted from"), "api/1");
        assert_eq!(value("Vars"), "REGION=eu");
        assert_eq!(value("Timeout"), "10m");
        assert_eq!(value("Workdir"), "- (the agent's)");
        assert_eq!(value("Error"), "rolled back to v1");
        assert!(!text.contains("Rollback of"), "unset links are left out: {text}");
        let pending = Deployment { job_id: String::new(), finish_time: None, error: String::new(), ..d };
        let mut out = Vec::new();
        write_deployment_details(&mut out, &pending, now()).expect("writes");
        let text = String::from_utf8(out).expect("utf8");
        assert!(text.contains("- (not started)") && !text.contains("Finished:") && !text.contains("Error:"), "{text}");
    }

    #[test]
    fn deployment_events_and_environments_render() {
        let event = |from: DeploymentState, to: DeploymentState, actor: &str, job: &str, reason: &str| {
            tether::v1::DeploymentEvent {
                deployment_id: "api/2".into(),
                service: "api".into(),
                environment: "production".into(),
                version: "v2".into(),
                time: ts(NOW_SECS - 60),
                actor: actor.into(),
                from_state: from as i32,
                to_state: to as i32,
                job_id: job.into(),
                reason: reason.into(),
            }
        };
        let events = [
            event(DeploymentState::Unspecified, DeploymentState::Pending, "user:ann", "", ""),
            event(DeploymentState::Succeeded, DeploymentState::RolledBack, "user:bob", "j-7", "errors up"),
        ];
        let mut out = Vec::new();
        write_deployment_events_table(&mut out, &events).expect("writes");
        let text = String::from_utf8(out).expect("utf8");
        let rows: Vec<Vec<&str>> =
            text.lines().map(|l| l.split("   ").map(str::trim).filter(|c| !c.is_empty()).collect()).collect();
        assert_eq!(rows[0], ["TIME", "DEPLOYMENT", "VERSION", "ENVIRONMENT", "FROM → TO", "ACTOR", "JOB", "REASON"]);
        assert_eq!(rows[1][1..], ["api/2", "v2", "production", "- → pending", "user:ann", "-", "-"]);
        assert_eq!(rows[2][4..], ["succeeded → rolled-back", "user:bob", "j-7", "errors up"]);
        assert_eq!(rows[2][0], "2030-01-02T03:03:05Z");

        let environments = [
            Environment {
                name: "production".into(),
                pool: "linux".into(),
                create_time: ts(NOW_SECS - 3600),
                ..Default::default()
            },
            Environment {
                name: "staging".into(),
                pool: "linux".into(),
                promote_to: "production".into(),
                auto_rollback: true,
                create_time: ts(NOW_SECS - 60),
                ..Default::default()
            },
        ];
        let mut out = Vec::new();
        write_environments_table(&mut out, &environments, now()).expect("writes");
        let text = String::from_utf8(out).expect("utf8");
        let rows: Vec<Vec<&str>> = text.lines().map(|l| l.split_whitespace().collect()).collect();
        assert_eq!(rows[1], ["production", "linux", "-", "no", "1h"]);
        assert_eq!(rows[2], ["staging", "linux", "production", "yes", "1m"]);

        let resp = tether::v1::RollbackDeploymentResponse {
            deployment: Some(sample_deployment()),
            rolled_back_version: "v3".into(),
        };
        let v: serde_json::Value = serde_json::from_str(&to_json(&resp).expect("renders")).expect("valid JSON");
        assert_eq!(v["rolledBackVersion"], "v3");
        assert_eq!(v["deployment"]["state"], "DEPLOYMENT_STATE_ROLLED_BACK");
        assert_eq!(v["deployment"]["trigger"], "DEPLOYMENT_TRIGGER_PROMOTE");
        assert_eq!(v["deployment"]["rollout"]["timeout"], "600s");
    }

    #[test]
    fn small_formatters() {
        assert_eq!(format_age(Duration::from_millis(250)), "250ms");
        assert_eq!(format_age(Duration::from_secs(42)), "42s");
        assert_eq!(format_age(Duration::from_secs(300)), "5m");
        assert_eq!(format_age(Duration::from_secs(3 * 3600 + 240)), "3h4m");
        assert_eq!(format_age(Duration::from_secs(2 * 86_400 + 3 * 3600)), "2d3h");
        assert_eq!(format_size(512), "512 B");
        assert_eq!(format_size(1536), "1.5 KiB");
        assert_eq!(format_duration(&prost_types::Duration { seconds: 90, nanos: 0 }), "1m30s");
        assert_eq!(format_bytes_field(b"line 1\nline 2"), "line 1\nline 2");
        assert!(format_bytes_field(b"\x1b[31mred").starts_with("<8 bytes"));
    }

    #[test]
    fn watch_events_read_as_one_line_each() {
        use tether::v1::watch_events_response::Event;
        use tether::v1::{AgentEvent, EventsReset, JobEvent, KeepAlive};
        let line = |event| format_watch_event(&WatchEventsResponse { event: Some(event), cursor: "c".into() });

        // A creation starts from `-`; a pending job has no attempt or agent.
        let created = JobEvent {
            job_id: "j-1".into(),
            status: JobStatus::Pending as i32,
            queued_state: QueuedJobState::Queued as i32,
            time: ts(NOW_SECS),
            ..Default::default()
        };
        assert_eq!(
            line(Event::Job(created.clone())).as_deref(),
            Some("2030-01-02T03:04:05Z job j-1 - -> queued (status pending)")
        );
        // The last error shows where it is news: an attempt back in the
        // queue, a job that failed; not on the next claim.
        let requeued = JobEvent {
            previous_queued_state: QueuedJobState::Running as i32,
            attempt: 1,
            agent_id: "a-1".into(),
            error: "agent a-1 lost:\n  no heartbeat".into(),
            ..created.clone()
        };
        assert_eq!(
            line(Event::Job(requeued.clone())).as_deref(),
            Some(
                "2030-01-02T03:04:05Z job j-1 running -> queued (status pending, attempt 1, agent a-1): \
                 agent a-1 lost: no heartbeat"
            )
        );
        let reclaimed = JobEvent {
            status: JobStatus::Running as i32,
            queued_state: QueuedJobState::Claimed as i32,
            previous_queued_state: QueuedJobState::Queued as i32,
            attempt: 2,
            ..requeued.clone()
        };
        assert_eq!(
            line(Event::Job(reclaimed)).as_deref(),
            Some("2030-01-02T03:04:05Z job j-1 queued -> claimed (status running, attempt 2, agent a-1)")
        );
        let failed = JobEvent {
            status: JobStatus::Failed as i32,
            queued_state: QueuedJobState::Failed as i32,
            error: "exit code 2".into(),
            ..requeued
        };
        assert!(line(Event::Job(failed))
            .is_some_and(|l| l.ends_with("running -> failed (status failed, attempt 1, agent a-1): exit code 2")));

        // A deployment's creation, by the server, with no reason.
        let deployment = DeploymentEvent {
            deployment_id: "api/d-1".into(),
            version: "v2".into(),
            environment: "production".into(),
            to_state: DeploymentState::Pending as i32,
            time: None,
            ..Default::default()
        };
        assert_eq!(
            line(Event::Deployment(deployment)).as_deref(),
            Some("- deployment api/d-1 v2 production - -> pending")
        );

        // An agent that registers; one whose health changed says why.
        let agent = Agent {
            id: "a-1".into(),
            name: "runner-1".into(),
            pool: "builds".into(),
            health: AgentHealth::Registering as i32,
            scheduling_status: AgentSchedulingStatus::Active as i32,
            ..Default::default()
        };
        let registered = AgentEvent { agent: Some(agent.clone()), time: ts(NOW_SECS), ..Default::default() };
        assert_eq!(
            line(Event::Agent(registered)).as_deref(),
            Some("2030-01-02T03:04:05Z agent builds/runner-1 registering/active (registered)")
        );
        let degraded = AgentEvent {
            agent: Some(Agent {
                health: AgentHealth::Degraded as i32,
                scheduling_status: 42,
                health_reason: "missed 2 heartbeats".into(),
                ..agent
            }),
            previous_health: AgentHealth::Healthy as i32,
            previous_scheduling_status: AgentSchedulingStatus::Cordoned as i32,
            time: ts(NOW_SECS),
        };
        assert_eq!(
            line(Event::Agent(degraded)).as_deref(),
            Some(
                "2030-01-02T03:04:05Z agent builds/runner-1 degraded/unknown(42) (was healthy/cordoned): \
                 missed 2 heartbeats"
            )
        );

        // Not changes.
        assert_eq!(line(Event::KeepAlive(KeepAlive { time: ts(NOW_SECS) })), None);
        assert_eq!(line(Event::Reset(EventsReset { reason: "trimmed".into() })), None);
        assert_eq!(format_watch_event(&WatchEventsResponse { event: None, cursor: "c".into() }), None);
    }
}
