//! The record encoding both backends store: postcard behind a one-byte
//! format version, so a release reads what older ones wrote and refuses,
//! with a clear message, what a newer one wrote.

use std::fmt::Display;

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{StoreError, StoreResult};
use crate::domain::{Job, JobState, Priority};

/// The record encoding's version, the first byte of every stored value.
pub(crate) const FORMAT_V1: u8 = 1;
/// Job records since retry policies (format 1 jobs are read through
/// [`super::legacy`]; other records are still format 1).
pub(crate) const JOB_FORMAT_V2: u8 = 2;
/// Job records since dashboard jobs (formats 1 and 2 are read through
/// [`super::legacy`]).
pub(crate) const JOB_FORMAT_V3: u8 = 3;

/// Log records since the agent's time (format 1 chunks are read through
/// [`super::legacy::LogChunkV1`]).
pub(crate) const LOG_FORMAT_V2: u8 = 2;

/// A log chunk's record.
pub(crate) fn encode_log(chunk: &super::LogChunk) -> StoreResult<Vec<u8>> {
    postcard::to_extend(chunk, vec![LOG_FORMAT_V2]).map_err(|e| StoreError::Corrupt(format!("encode: {e}")))
}

/// A log record of any format this release reads.
pub(crate) fn decode_log(bytes: &[u8]) -> StoreResult<super::LogChunk> {
    let corrupt = |e: postcard::Error| StoreError::Corrupt(format!("decode log chunk: {e}"));
    match bytes.split_first() {
        Some((&LOG_FORMAT_V2, rest)) => postcard::from_bytes(rest).map_err(corrupt),
        Some((&FORMAT_V1, rest)) => {
            postcard::from_bytes::<super::legacy::LogChunkV1>(rest).map(super::LogChunk::from).map_err(corrupt)
        }
        Some((v, _)) => Err(StoreError::Corrupt(format!(
            "log record format {v} is newer than this release reads; run a newer tether"
        ))),
        None => Err(StoreError::Corrupt("empty log record".into())),
    }
}

pub(crate) fn encode<T: Serialize>(value: &T) -> StoreResult<Vec<u8>> {
    postcard::to_extend(value, vec![FORMAT_V1]).map_err(|e| StoreError::Corrupt(format!("encode: {e}")))
}

/// Like [`encode`], into a reused buffer.
pub(crate) fn encode_into<T: Serialize>(buf: &mut Vec<u8>, value: &T) -> StoreResult<()> {
    let mut out = std::mem::take(buf);
    out.clear();
    out.push(FORMAT_V1);
    *buf = postcard::to_extend(value, out).map_err(|e| StoreError::Corrupt(format!("encode: {e}")))?;
    Ok(())
}

/// A job record, into a reused buffer: format 3 for a dashboard job, format
/// 2 (the same layout without the dashboard part) for any other, so the
/// previous release still reads every job it knows how to handle (a
/// replica of it during a rolling deploy on DynamoDB).
pub(crate) fn encode_job_into(buf: &mut Vec<u8>, job: &Job) -> StoreResult<()> {
    let mut out = std::mem::take(buf);
    out.clear();
    let encoded = if job.dashboard.is_some() {
        out.push(JOB_FORMAT_V3);
        postcard::to_extend(job, out)
    } else {
        out.push(JOB_FORMAT_V2);
        postcard::to_extend(&super::legacy::JobV2Ref::from(job), out)
    };
    *buf = encoded.map_err(|e| StoreError::Corrupt(format!("encode: {e}")))?;
    Ok(())
}

/// A job record of any format this release reads.
pub(crate) fn decode_job(bytes: &[u8]) -> StoreResult<Job> {
    let corrupt = |e: postcard::Error| StoreError::Corrupt(format!("decode job: {e}"));
    match bytes.split_first() {
        Some((&JOB_FORMAT_V3, rest)) => postcard::from_bytes(rest).map_err(corrupt),
        Some((&JOB_FORMAT_V2, rest)) => {
            postcard::from_bytes::<super::legacy::JobV2>(rest).map(Job::from).map_err(corrupt)
        }
        Some((&FORMAT_V1, rest)) => postcard::from_bytes::<super::legacy::JobV1>(rest).map(Job::from).map_err(corrupt),
        Some((v, _)) => Err(StoreError::Corrupt(format!(
            "job record format {v} is newer than this release reads; run a newer tether"
        ))),
        None => Err(StoreError::Corrupt("empty job record".into())),
    }
}

pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> StoreResult<T> {
    match bytes.split_first() {
        Some((&FORMAT_V1, rest)) => postcard::from_bytes(rest).map_err(|e| StoreError::Corrupt(format!("decode: {e}"))),
        Some((v, _)) => Err(StoreError::Corrupt(format!("unknown record format {v}"))),
        None => Err(StoreError::Corrupt("empty record".into())),
    }
}

pub(crate) fn priority_code(p: Priority) -> u8 {
    match p {
        Priority::Low => 1,
        Priority::Normal => 2,
        Priority::High => 3,
        Priority::Critical => 4,
    }
}

pub(crate) fn priority_from_code(c: u8) -> StoreResult<Priority> {
    Ok(match c {
        1 => Priority::Low,
        2 => Priority::Normal,
        3 => Priority::High,
        4 => Priority::Critical,
        _ => return Err(StoreError::Corrupt(format!("priority code {c}"))),
    })
}

pub(crate) fn state_from_code(c: u8) -> StoreResult<JobState> {
    JobState::ALL.into_iter().find(|s| s.code() == c).ok_or_else(|| StoreError::Corrupt(format!("state code {c}")))
}

/// A record that does not decode is logged and skipped by scans, so one
/// bad record cannot stop a server from starting.
pub(crate) fn skip_corrupt<T>(what: impl Display, read: StoreResult<T>) -> StoreResult<Option<T>> {
    match read {
        Ok(value) => Ok(Some(value)),
        Err(StoreError::Corrupt(reason)) => {
            tracing::error!(record = %what, %reason, "skipping a stored record that does not decode");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::dashboard::{DashboardJob, DashboardSpec};
    use crate::store::conformance;
    use crate::store::legacy::JobV2;

    #[test]
    fn a_job_of_the_previous_format_reads_without_a_dashboard_part() {
        let job = conformance::job("a", 1, "q", Some("k"));
        let v2 = postcard::to_extend(&JobV2::from(&job), vec![JOB_FORMAT_V2]).expect("encode");
        assert_eq!(decode_job(&v2).expect("decode"), job);
    }

    #[test]
    fn a_job_without_a_dashboard_part_is_written_as_the_previous_release_did() {
        let job = conformance::job("a", 1, "q", Some("k"));
        let mut buf = Vec::new();
        encode_job_into(&mut buf, &job).expect("encode");
        let v2 = postcard::to_extend(&JobV2::from(&job), vec![JOB_FORMAT_V2]).expect("encode");
        assert_eq!(buf, v2, "format 2, byte for byte");
        assert_eq!(decode_job(&buf).expect("decode"), job);
    }

    #[test]
    fn a_dashboard_job_round_trips() {
        let mut job = conformance::job("a", 1, "tether.jobs", None);
        let spec = DashboardSpec { name: "build".into(), requested_by: "ann".into(), retry_of: Some("z".into()) };
        let mut dashboard = DashboardJob::new(spec);
        dashboard.record(&job, None, "user:ann", None);
        job.dashboard = Some(Box::new(dashboard));
        let mut buf = Vec::new();
        encode_job_into(&mut buf, &job).expect("encode");
        assert_eq!(buf[0], JOB_FORMAT_V3);
        assert_eq!(decode_job(&buf).expect("decode"), job);
    }
}
