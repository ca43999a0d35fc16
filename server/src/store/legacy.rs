//! Record layouts of earlier releases, decoded into today's types. Records
//! are postcard-encoded (not self-describing) behind a format byte, so a
//! change of layout gets a new format byte and the old one is read here.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::events::Transition;
use super::{LogChunk, Record, Write};
use crate::domain::{Agent, Job, JobSpec, JobState, Pool, Priority, RetryPolicy, Routing};

/// A job as format 1 stored it: before retry policies.
#[derive(Deserialize)]
pub struct JobV1 {
    id: String,
    seq: u64,
    spec: JobSpecV1,
    state: JobState,
    attempt: u32,
    fencing_token: u64,
    worker_id: String,
    create_time: SystemTime,
    update_time: SystemTime,
    ready_time: SystemTime,
    lease_expire_time: Option<SystemTime>,
    run_deadline: Option<SystemTime>,
    result: Bytes,
    last_error: String,
    finish_time: Option<SystemTime>,
    version: u64,
}

#[derive(Deserialize)]
struct JobSpecV1 {
    queue: String,
    payload: Bytes,
    priority: Priority,
    routing: Routing,
    max_attempts: u32,
    lease_duration: Duration,
    timeout: Option<Duration>,
    idempotency_key: Option<String>,
    not_before: Option<SystemTime>,
}

impl From<JobV1> for Job {
    /// Jobs of format 1 were enqueued when every retryable failure was
    /// retried: they keep that behaviour.
    fn from(v1: JobV1) -> Job {
        let s = v1.spec;
        Job {
            id: v1.id,
            seq: v1.seq,
            spec: JobSpec {
                queue: s.queue,
                payload: s.payload,
                priority: s.priority,
                routing: s.routing,
                max_attempts: s.max_attempts,
                lease_duration: s.lease_duration,
                timeout: s.timeout,
                idempotency_key: s.idempotency_key,
                not_before: s.not_before,
                retry: RetryPolicy::any(),
            },
            state: v1.state,
            attempt: v1.attempt,
            fencing_token: v1.fencing_token,
            worker_id: v1.worker_id,
            create_time: v1.create_time,
            update_time: v1.update_time,
            ready_time: v1.ready_time,
            lease_expire_time: v1.lease_expire_time,
            run_deadline: v1.run_deadline,
            result: v1.result,
            last_error: v1.last_error,
            finish_time: v1.finish_time,
            version: v1.version,
            dashboard: None,
        }
    }
}

/// A job as format 2 stored it: before dashboard jobs.
#[derive(Serialize, Deserialize)]
pub struct JobV2 {
    id: String,
    seq: u64,
    spec: JobSpec,
    state: JobState,
    attempt: u32,
    fencing_token: u64,
    worker_id: String,
    create_time: SystemTime,
    update_time: SystemTime,
    ready_time: SystemTime,
    lease_expire_time: Option<SystemTime>,
    run_deadline: Option<SystemTime>,
    result: Bytes,
    last_error: String,
    finish_time: Option<SystemTime>,
    version: u64,
}

impl From<JobV2> for Job {
    fn from(v2: JobV2) -> Job {
        Job {
            id: v2.id,
            seq: v2.seq,
            spec: v2.spec,
            state: v2.state,
            attempt: v2.attempt,
            fencing_token: v2.fencing_token,
            worker_id: v2.worker_id,
            create_time: v2.create_time,
            update_time: v2.update_time,
            ready_time: v2.ready_time,
            lease_expire_time: v2.lease_expire_time,
            run_deadline: v2.run_deadline,
            result: v2.result,
            last_error: v2.last_error,
            finish_time: v2.finish_time,
            version: v2.version,
            dashboard: None,
        }
    }
}

/// A job in format 2's layout, borrowed: how a job without a dashboard
/// part is still written (job records, event groups), so a release that
/// reads only format 2 keeps reading every job but dashboard jobs.
#[derive(Serialize)]
pub struct JobV2Ref<'a> {
    id: &'a str,
    seq: u64,
    spec: &'a JobSpec,
    state: JobState,
    attempt: u32,
    fencing_token: u64,
    worker_id: &'a str,
    create_time: SystemTime,
    update_time: SystemTime,
    ready_time: SystemTime,
    lease_expire_time: Option<SystemTime>,
    run_deadline: Option<SystemTime>,
    result: &'a Bytes,
    last_error: &'a str,
    finish_time: Option<SystemTime>,
    version: u64,
}

impl<'a> From<&'a Job> for JobV2Ref<'a> {
    /// The job without its dashboard part.
    fn from(job: &'a Job) -> JobV2Ref<'a> {
        JobV2Ref {
            id: &job.id,
            seq: job.seq,
            spec: &job.spec,
            state: job.state,
            attempt: job.attempt,
            fencing_token: job.fencing_token,
            worker_id: &job.worker_id,
            create_time: job.create_time,
            update_time: job.update_time,
            ready_time: job.ready_time,
            lease_expire_time: job.lease_expire_time,
            run_deadline: job.run_deadline,
            result: &job.result,
            last_error: &job.last_error,
            finish_time: job.finish_time,
            version: job.version,
        }
    }
}

/// A job field in format 2's layout, inline (event groups): the dashboard
/// part is left out on write and absent on read.
pub mod job_v2_inline {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::{JobV2, JobV2Ref};
    use crate::domain::Job;

    pub fn serialize<S: Serializer>(job: &Job, serializer: S) -> Result<S::Ok, S::Error> {
        JobV2Ref::from(job).serialize(serializer)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Job, D::Error> {
        JobV2::deserialize(deserializer).map(Job::from)
    }
}

impl From<&Job> for JobV2 {
    /// Format 2's layout of `job` (its dashboard part is lost): for tests
    /// that need records as the previous release wrote them.
    fn from(job: &Job) -> JobV2 {
        JobV2 {
            id: job.id.clone(),
            seq: job.seq,
            spec: job.spec.clone(),
            state: job.state,
            attempt: job.attempt,
            fencing_token: job.fencing_token,
            worker_id: job.worker_id.clone(),
            create_time: job.create_time,
            update_time: job.update_time,
            ready_time: job.ready_time,
            lease_expire_time: job.lease_expire_time,
            run_deadline: job.run_deadline,
            result: job.result.clone(),
            last_error: job.last_error.clone(),
            finish_time: job.finish_time,
            version: job.version,
        }
    }
}

/// A journaled write as journal format 1 held it: jobs inline in format 2's
/// layout. Journal format 2 holds each job as a versioned job record, so a
/// later change of the job layout needs no new journal format.
#[derive(Serialize, Deserialize)]
pub enum WriteV1 {
    CreateJob { job: Box<JobV2>, events: Vec<Transition> },
    UpdateJob { job: Box<JobV2>, expected_version: u64, events: Vec<Transition> },
    PutAgent(Box<Agent>),
    CreatePool(Box<Pool>),
    PutPool(Box<Pool>),
    DeletePool { name: String },
    AppendLog(LogChunkV1),
    RaiseCounter { name: String, value: u64 },
}

impl WriteV1 {
    pub fn upgrade(self) -> Result<Write, String> {
        Ok(match self {
            WriteV1::CreateJob { job, events } => Write::CreateJob { job: Box::new(Job::from(*job)), events },
            WriteV1::UpdateJob { job, expected_version, events } => {
                Write::UpdateJob { job: Box::new(Job::from(*job)), expected_version, events }
            }
            WriteV1::PutAgent(a) => Write::PutAgent(a),
            WriteV1::CreatePool(p) => Write::CreatePool(p),
            WriteV1::PutPool(p) => Write::PutPool(p),
            WriteV1::DeletePool { name } => Write::DeletePool { name },
            WriteV1::AppendLog(chunk) => Write::AppendLog(chunk.into()),
            WriteV1::RaiseCounter { name, value } => {
                let name = super::counter_by_name(&name).ok_or_else(|| format!("unknown counter {name:?}"))?;
                Write::RaiseCounter { name, value }
            }
        })
    }
}

/// A log chunk as log record format 1 (and journal formats 1 and 2) held
/// it: before the agent's time.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LogChunkV1 {
    pub job_id: String,
    pub attempt: u32,
    pub sequence: u64,
    pub stderr: bool,
    pub data: Bytes,
    pub time: SystemTime,
}

impl From<LogChunkV1> for LogChunk {
    fn from(c: LogChunkV1) -> LogChunk {
        LogChunk {
            job_id: c.job_id,
            attempt: c.attempt,
            sequence: c.sequence,
            stderr: c.stderr,
            data: c.data,
            time: c.time,
            agent_time: None,
        }
    }
}

/// A write as journal format 2 held it: log chunks inline, in log format
/// 1's layout.
#[derive(Deserialize)]
pub enum WriteV2 {
    CreateJob {
        #[serde(with = "super::job_record")]
        job: Box<Job>,
        events: Vec<Transition>,
    },
    UpdateJob {
        #[serde(with = "super::job_record")]
        job: Box<Job>,
        expected_version: u64,
        events: Vec<Transition>,
    },
    PutAgent(Box<Agent>),
    CreatePool(Box<Pool>),
    PutPool(Box<Pool>),
    DeletePool {
        name: String,
    },
    AppendLog(LogChunkV1),
    RaiseCounter {
        #[serde(with = "super::counter_name")]
        name: super::CounterName,
        value: u64,
    },
    PutRecord {
        record: Record,
        expected_version: u64,
    },
}

impl From<WriteV2> for Write {
    fn from(w: WriteV2) -> Write {
        match w {
            WriteV2::CreateJob { job, events } => Write::CreateJob { job, events },
            WriteV2::UpdateJob { job, expected_version, events } => Write::UpdateJob { job, expected_version, events },
            WriteV2::PutAgent(a) => Write::PutAgent(a),
            WriteV2::CreatePool(p) => Write::CreatePool(p),
            WriteV2::PutPool(p) => Write::PutPool(p),
            WriteV2::DeletePool { name } => Write::DeletePool { name },
            WriteV2::AppendLog(chunk) => Write::AppendLog(chunk.into()),
            WriteV2::RaiseCounter { name, value } => Write::RaiseCounter { name, value },
            WriteV2::PutRecord { record, expected_version } => Write::PutRecord { record, expected_version },
        }
    }
}

#[cfg(test)]
pub mod fixture {
    //! Encodes a job the way format 1 did, for migration tests.
    use serde::Serialize;

    use super::*;

    #[derive(Serialize)]
    struct JobSpecV1Out<'a> {
        queue: &'a str,
        payload: &'a Bytes,
        priority: Priority,
        routing: &'a Routing,
        max_attempts: u32,
        lease_duration: Duration,
        timeout: Option<Duration>,
        idempotency_key: &'a Option<String>,
        not_before: Option<SystemTime>,
    }

    #[derive(Serialize)]
    struct JobV1Out<'a> {
        id: &'a str,
        seq: u64,
        spec: JobSpecV1Out<'a>,
        state: JobState,
        attempt: u32,
        fencing_token: u64,
        worker_id: &'a str,
        create_time: SystemTime,
        update_time: SystemTime,
        ready_time: SystemTime,
        lease_expire_time: Option<SystemTime>,
        run_deadline: Option<SystemTime>,
        result: &'a Bytes,
        last_error: &'a str,
        finish_time: Option<SystemTime>,
        version: u64,
    }

    /// `job` in format 1's layout (without the format byte).
    pub fn encode_v1(job: &Job) -> Vec<u8> {
        let s = &job.spec;
        let out = JobV1Out {
            id: &job.id,
            seq: job.seq,
            spec: JobSpecV1Out {
                queue: &s.queue,
                payload: &s.payload,
                priority: s.priority,
                routing: &s.routing,
                max_attempts: s.max_attempts,
                lease_duration: s.lease_duration,
                timeout: s.timeout,
                idempotency_key: &s.idempotency_key,
                not_before: s.not_before,
            },
            state: job.state,
            attempt: job.attempt,
            fencing_token: job.fencing_token,
            worker_id: &job.worker_id,
            create_time: job.create_time,
            update_time: job.update_time,
            ready_time: job.ready_time,
            lease_expire_time: job.lease_expire_time,
            run_deadline: job.run_deadline,
            result: &job.result,
            last_error: &job.last_error,
            finish_time: job.finish_time,
            version: job.version,
        };
        postcard::to_allocvec(&out).unwrap_or_default()
    }
}
