//! Job output from agents' streams: stored per (job, attempt, sequence);
//! a dashboard job's output is capped (`EngineConfig::max_job_output_bytes`)
//! with one truncation marker, its count kept in the job's record.

use std::time::SystemTime;

use bytes::Bytes;

use super::core::Engine;
use crate::domain::dashboard::OutputFate;
use crate::domain::AttemptRef;
use crate::store::{LogChunk, Write};

impl Engine {
    /// Stores a chunk of the output of an attempt the sender holds.
    pub fn store_output(&mut self, r: AttemptRef, stderr: bool, data: Bytes, sequence: u64, now: SystemTime) {
        let data = match self.count_output(&r.job_id, data.len()) {
            OutputFate::Keep => data,
            OutputFate::Truncate { keep, marker } => {
                let mut cut = Vec::with_capacity(keep + marker.len());
                cut.extend_from_slice(&data[..keep.min(data.len())]);
                cut.extend_from_slice(marker.as_bytes());
                Bytes::from(cut)
            }
            OutputFate::Drop => return,
        };
        self.pending.has_output = true;
        self.persist_other(Write::AppendLog(LogChunk {
            job_id: r.job_id,
            attempt: r.attempt,
            sequence,
            stderr,
            data,
            time: now,
        }));
    }

    /// Counts output against a dashboard job's cap, in its record (written
    /// with the chunk's batch); other jobs' output is not capped here.
    fn count_output(&mut self, job_id: &str, len: usize) -> OutputFate {
        let cap = self.config.max_job_output_bytes;
        let counted = self.active.get(job_id).is_some_and(|j| j.dashboard.is_some());
        if !counted {
            return OutputFate::Keep;
        }
        let Some(mut job) = self.take_active(job_id) else { return OutputFate::Keep };
        let fate = match job.dashboard.as_mut() {
            Some(d) => d.take_output(len, cap),
            None => OutputFate::Keep,
        };
        if fate != OutputFate::Drop {
            let state = job.state;
            self.persist(&mut job, Some(state));
        }
        self.track_deadline(&job, None);
        self.active.insert(job.id.clone(), job);
        fate
    }
}
