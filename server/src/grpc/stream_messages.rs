//! The Connect stream's messages, wire to domain and back: the Hello with
//! its protocol negotiation, every later agent message (validated, fields
//! named on error), and the server's pushes. Pure functions, so the fuzz
//! targets drive them without a server.

use tether::time::{to_duration, to_timestamp};
use tether::v1 as pb;
use tether::v1::{connect_request, connect_response};

use super::convert::{self, job_ref_in, job_ref_out};
use crate::domain::{validate, DomainError, DomainResult};
use crate::engine::{AgentInbound, AgentPush, HelloInfo, Outcome};

/// Largest log chunk an agent may send.
pub const MAX_LOG_CHUNK: usize = 64 * 1024;

/// Validates a Hello; returns it with the protocol version chosen.
pub fn hello_in(hello: &pb::Hello) -> DomainResult<(HelloInfo, u32)> {
    validate::name("hello.name", &hello.name, validate::MAX_NAME)?;
    let pool = convert::pool_name_in("hello.pool", &hello.pool)?;
    let labels = convert::labels_in("hello.labels", &hello.labels)?;
    let slots = convert::slots_in("hello.slots", hello.slots)?;
    if hello.max_protocol_version == 0 {
        return Err(DomainError::invalid("hello.max_protocol_version", "is required"));
    }
    if hello.min_protocol_version > hello.max_protocol_version {
        return Err(DomainError::invalid("hello.min_protocol_version", "must not exceed max_protocol_version"));
    }
    let low = hello.min_protocol_version.max(tether::PROTOCOL_VERSION_MIN);
    let high = hello.max_protocol_version.min(tether::PROTOCOL_VERSION_MAX);
    if low > high {
        return Err(DomainError::FailedPrecondition(format!(
            "no common protocol version: the agent speaks {}..={}, the server {}..={}",
            hello.min_protocol_version,
            hello.max_protocol_version,
            tether::PROTOCOL_VERSION_MIN,
            tether::PROTOCOL_VERSION_MAX
        )));
    }
    let running = hello
        .running_jobs
        .iter()
        .enumerate()
        .map(|(i, r)| job_ref_in(&format!("hello.running_jobs[{i}]"), Some(r)))
        .collect::<DomainResult<Vec<_>>>()?;
    if hello.version.len() > validate::MAX_NAME {
        return Err(DomainError::invalid("hello.version", "is too long"));
    }
    let info = HelloInfo {
        name: hello.name.clone(),
        pool,
        labels,
        slots,
        version: hello.version.clone(),
        running,
        answer_starts: high < tether::PROTOCOL_LEAN_STARTS,
        reconnects: high >= tether::PROTOCOL_RECONNECT,
    };
    Ok((info, high))
}

/// `protocol`: the version chosen in the Welcome.
pub fn inbound_in(message: connect_request::Message, protocol: u32) -> DomainResult<AgentInbound> {
    use connect_request::Message as M;
    Ok(match message {
        M::Hello(_) => return Err(DomainError::invalid("hello", "is only allowed as the first message")),
        M::Heartbeat(h) => AgentInbound::Heartbeat {
            metrics: convert::metrics_in(h.metrics.as_ref()),
            running: h
                .running_jobs
                .iter()
                .enumerate()
                .map(|(i, r)| job_ref_in(&format!("heartbeat.running_jobs[{i}]"), Some(r)))
                .collect::<DomainResult<_>>()?,
            draining: h.draining,
        },
        M::AssignmentAck(a) => AgentInbound::AssignmentAck {
            job: job_ref_in("assignment_ack.job", a.job.as_ref())?,
            accepted: a.accepted,
            started: a.accepted && a.started && protocol >= tether::PROTOCOL_LEAN_STARTS,
            reason: truncate(a.reason),
        },
        M::JobStarted(s) => AgentInbound::Started { job: job_ref_in("job_started.job", s.job.as_ref())? },
        M::JobProgress(p) => AgentInbound::Progress {
            job: job_ref_in("job_progress.job", p.job.as_ref())?,
            percent: if p.percent.is_finite() { p.percent.clamp(0.0, 100.0) } else { 0.0 },
            message: truncate(p.message),
        },
        M::JobLog(l) => {
            let stderr = match pb::LogStream::try_from(l.stream) {
                Ok(pb::LogStream::Stdout) => false,
                Ok(pb::LogStream::Stderr) => true,
                _ => return Err(DomainError::invalid("job_log.stream", format!("unknown log stream {}", l.stream))),
            };
            if l.data.len() > MAX_LOG_CHUNK {
                return Err(DomainError::invalid(
                    "job_log.data",
                    format!("is {} bytes; the limit is {MAX_LOG_CHUNK} bytes per message", l.data.len()),
                ));
            }
            AgentInbound::Log {
                job: job_ref_in("job_log.job", l.job.as_ref())?,
                stderr,
                data: l.data,
                sequence: l.sequence,
                agent_time: convert::timestamp_in_field("job_log.time", l.time.as_ref())?,
            }
        }
        M::JobFinished(f) => {
            let outcome = match pb::JobOutcome::try_from(f.outcome) {
                Ok(pb::JobOutcome::Succeeded) => Outcome::Succeeded,
                Ok(pb::JobOutcome::FailedRetryable) => Outcome::FailedRetryable,
                Ok(pb::JobOutcome::FailedPermanent) => Outcome::FailedPermanent,
                Ok(pb::JobOutcome::Cancelled) => Outcome::Cancelled,
                _ => {
                    return Err(DomainError::invalid("job_finished.outcome", format!("unknown outcome {}", f.outcome)))
                }
            };
            if f.result.len() > validate::MAX_RESULT_BYTES {
                return Err(DomainError::invalid(
                    "job_finished.result",
                    format!("is {} bytes; the limit is {} bytes", f.result.len(), validate::MAX_RESULT_BYTES),
                ));
            }
            // The exit code is appended after cutting the agent's text to
            // leave room for it, so the stored error keeps within the limit
            // and still names the code.
            let error = if f.exit_code != 0 && !f.error.contains("exit") {
                let suffix = format!(" (exit code {})", f.exit_code);
                let text = truncate_to(f.error, validate::MAX_ERROR_LEN - suffix.len());
                format!("{text}{suffix}").trim().to_string()
            } else {
                truncate(f.error)
            };
            AgentInbound::Finished {
                job: job_ref_in("job_finished.job", f.job.as_ref())?,
                outcome,
                result: f.result,
                error,
                exit_code: (f.exit_code != 0).then_some(f.exit_code),
            }
        }
    })
}

pub fn truncate(s: String) -> String {
    truncate_to(s, validate::MAX_ERROR_LEN)
}

/// `s` cut to at most `max` bytes, on a character boundary.
fn truncate_to(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

pub fn push_out(push: AgentPush) -> pb::ConnectResponse {
    use connect_response::Message as M;
    let message = match push {
        AgentPush::Assign(job) => M::Assignment(pb::Assignment {
            job: Some(job_ref_out(&job.attempt_ref())),
            queue: job.spec.queue.clone(),
            payload: job.spec.payload.clone(),
            priority: convert::priority_out(job.spec.priority) as i32,
            lease_expire_time: job.lease_expire_time.map(to_timestamp),
            timeout: job.spec.timeout.map(to_duration),
            max_attempts: job.spec.max_attempts,
            // Set by the session, which opens them (`session_secrets`).
            secrets: Default::default(),
        }),
        AgentPush::Cancel { job, reason } => M::Cancel(pb::Cancel { job: Some(job_ref_out(&job)), reason }),
        AgentPush::Drain { reason } => M::Drain(pb::Drain { reason }),
        AgentPush::Reconnect { reason } => M::Reconnect(pb::Reconnect { reason }),
        AgentPush::UpdateAck { job, accepted, reason } => {
            M::JobUpdateAck(pb::JobUpdateAck { job: Some(job_ref_out(&job)), accepted, reason })
        }
    };
    pb::ConnectResponse { message: Some(message) }
}
