//! Job output from agents' streams: stored per (job, attempt, sequence);
//! a dashboard job's output is capped (`EngineConfig::max_job_output_bytes`,
//! every attempt together) with one truncation marker, its count kept in
//! the job's record.

use std::time::SystemTime;

use bytes::Bytes;

use super::core::Engine;
use crate::domain::dashboard::OutputFate;
use crate::domain::AttemptRef;
use crate::store::{LogChunk, Write};

/// One chunk of output as an agent sent it.
pub struct AgentChunk {
    pub stderr: bool,
    pub data: Bytes,
    pub sequence: u64,
    pub agent_time: Option<SystemTime>,
}

impl Engine {
    /// Stores a chunk of the output of an attempt the sender holds.
    pub fn store_output(&mut self, r: AttemptRef, chunk: AgentChunk, now: SystemTime) {
        let AgentChunk { stderr, data, sequence, agent_time } = chunk;
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
            agent_time,
        }));
    }

    /// Counts output against a dashboard job's cap, in its record; other
    /// jobs' output is not capped here. The count goes out with the job's
    /// next write, and with this chunk's batch only when it crosses a MiB
    /// or the cap: a job's output does not rewrite its record per chunk,
    /// and a restart forgets at most a MiB of count.
    fn count_output(&mut self, job_id: &str, len: usize) -> OutputFate {
        let cap = self.config.max_job_output_bytes;
        let Some(d) = self.active.get_mut(job_id).and_then(|job| job.dashboard.as_mut()) else {
            return OutputFate::Keep;
        };
        let before = d.output_bytes;
        let fate = d.take_output(len, cap);
        let persist = matches!(fate, OutputFate::Truncate { .. }) || (before >> 20) != (d.output_bytes >> 20);
        if persist {
            if let Some(mut job) = self.take_active(job_id) {
                let state = job.state;
                self.persist(&mut job, Some(state));
                self.track_deadline(&job, None);
                self.active.insert(job.id.clone(), job);
            }
        }
        fate
    }
}
