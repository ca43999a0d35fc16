//! The running-job table and the results waiting for their JobUpdateAck.
//!
//! Pure bookkeeping, no I/O: the caller holds the lock around it and sends
//! whatever the methods tell it to.

use ahash::AHashMap as HashMap;

use tether::v1::{JobFinished, JobRef};
use tokio_util::sync::CancellationToken;

/// One attempt of one job: the full JobRef, since a job id alone does not
/// tell a stale attempt from the current one.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct JobKey {
    job_id: String,
    attempt: u32,
    fencing_token: u64,
}

impl JobKey {
    pub(crate) fn from_ref(job: JobRef) -> Self {
        Self { job_id: job.job_id, attempt: job.attempt, fencing_token: job.fencing_token }
    }

    pub(crate) fn to_ref(&self) -> JobRef {
        JobRef { job_id: self.job_id.clone(), attempt: self.attempt, fencing_token: self.fencing_token }
    }
}

/// Why a running job's token was cancelled from outside its task.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CancelCause {
    /// The server sent Cancel: report CANCELLED.
    Server,
    /// The attempt is no longer ours: report nothing.
    Abandoned,
}

#[derive(Debug)]
pub(crate) struct RunningJob {
    pub(crate) token: CancellationToken,
    pub(crate) cause: Option<CancelCause>,
    /// JobUpdateAcks still due on this stream for messages about this job
    /// (the JobStarted). Acks carry no message type, so they are counted.
    pub(crate) unacked: u32,
}

#[derive(Debug)]
struct PendingResult {
    finished: JobFinished,
    unacked: u32,
}

/// What [`JobTable::on_ack`] found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum AckEffect {
    /// Nothing to do (ack of a JobStarted, or of something unknown).
    None,
    /// The JobStarted was refused: the attempt is stale and was abandoned.
    StaleAbandoned,
    /// The JobFinished got its answer and was dropped.
    ResultSettled,
}

/// Running attempts and finished-but-unacknowledged results.
#[derive(Debug, Default)]
pub(crate) struct JobTable {
    running: HashMap<JobKey, RunningJob>,
    pending: HashMap<JobKey, PendingResult>,
}

impl JobTable {
    /// No job running and no result waiting for its ack.
    pub(crate) fn is_idle(&self) -> bool {
        self.running.is_empty() && self.pending.is_empty()
    }

    pub(crate) fn running_len(&self) -> usize {
        self.running.len()
    }

    pub(crate) fn is_running(&self, key: &JobKey) -> bool {
        self.running.contains_key(key)
    }

    /// Refs of the running jobs (heartbeat lease renewal).
    pub(crate) fn running_refs(&self) -> Vec<JobRef> {
        self.running.keys().map(JobKey::to_ref).collect()
    }

    /// Refs of every attempt the agent still holds: running ones and those
    /// whose result is unacknowledged, so the server keeps their leases until
    /// the re-sent JobFinished arrives.
    pub(crate) fn held_refs(&self) -> Vec<JobRef> {
        self.running.keys().chain(self.pending.keys()).map(JobKey::to_ref).collect()
    }

    /// The unacknowledged result of `key`, if it has one.
    pub(crate) fn pending_result(&self, key: &JobKey) -> Option<&JobFinished> {
        self.pending.get(key).map(|p| &p.finished)
    }

    /// Records one more ack due for `key` (running or pending).
    pub(crate) fn expect_ack(&mut self, key: &JobKey) {
        if let Some(job) = self.running.get_mut(key) {
            job.unacked += 1;
        } else if let Some(p) = self.pending.get_mut(key) {
            p.unacked += 1;
        }
    }

    /// Adds a running attempt; the caller has checked it is new.
    pub(crate) fn insert_running(&mut self, key: JobKey, token: CancellationToken) {
        self.running.insert(key, RunningJob { token, cause: None, unacked: 0 });
    }

    /// Takes a finished attempt out of the running set.
    pub(crate) fn remove_running(&mut self, key: &JobKey) -> Option<RunningJob> {
        self.running.remove(key)
    }

    /// Keeps a result until it is acknowledged. `unacked` counts the acks
    /// already due on this stream (its JobStarted's, plus one if it was sent).
    pub(crate) fn insert_pending(&mut self, key: JobKey, finished: JobFinished, unacked: u32) {
        self.pending.insert(key, PendingResult { finished, unacked });
    }

    /// Cancels a running attempt. `Abandoned` wins over `Server`, and an
    /// abandoned attempt also loses its unacknowledged result. Returns
    /// whether anything was found.
    pub(crate) fn cancel(&mut self, key: &JobKey, cause: CancelCause) -> bool {
        if let Some(job) = self.running.get_mut(key) {
            if job.cause != Some(CancelCause::Abandoned) {
                job.cause = Some(cause);
            }
            job.token.cancel();
            return true;
        }
        cause == CancelCause::Abandoned && self.pending.remove(key).is_some()
    }

    /// Cancels every running attempt and forgets every result (the agent is
    /// stopping for good and can report nothing).
    pub(crate) fn abandon_all(&mut self) {
        for job in self.running.values_mut() {
            job.cause = Some(CancelCause::Abandoned);
            job.token.cancel();
        }
        self.pending.clear();
    }

    /// Applies a JobUpdateAck. Acks for one attempt arrive in the order its
    /// messages were sent, so the last one due on a finished attempt answers
    /// its JobFinished.
    pub(crate) fn on_ack(&mut self, key: &JobKey, accepted: bool) -> AckEffect {
        if let Some(job) = self.running.get_mut(key) {
            job.unacked = job.unacked.saturating_sub(1);
            if !accepted {
                // The server refuses messages of attempts that are not
                // current: whatever this job produces would be refused too.
                job.cause = Some(CancelCause::Abandoned);
                job.token.cancel();
                return AckEffect::StaleAbandoned;
            }
            return AckEffect::None;
        }
        let Some(p) = self.pending.get_mut(key) else {
            return AckEffect::None;
        };
        p.unacked = p.unacked.saturating_sub(1);
        if p.unacked == 0 {
            self.pending.remove(key);
            return AckEffect::ResultSettled;
        }
        AckEffect::None
    }

    /// Starts a new stream: acks due on the old one will never come. Returns
    /// the results to re-send, each now expecting exactly one ack.
    pub(crate) fn new_stream(&mut self) -> Vec<JobFinished> {
        for job in self.running.values_mut() {
            job.unacked = 0;
        }
        self.pending
            .values_mut()
            .map(|p| {
                p.unacked = 1;
                p.finished.clone()
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: &str) -> JobKey {
        JobKey::from_ref(JobRef { job_id: id.into(), attempt: 1, fencing_token: 7 })
    }

    fn finished(id: &str) -> JobFinished {
        JobFinished { job: Some(key(id).to_ref()), ..Default::default() }
    }

    #[test]
    fn finished_result_waits_for_the_last_ack() {
        let mut t = JobTable::default();
        t.insert_running(key("a"), CancellationToken::new());
        t.expect_ack(&key("a")); // JobStarted sent
        let job = t.remove_running(&key("a")).expect("running");
        t.insert_pending(key("a"), finished("a"), job.unacked + 1); // JobFinished sent
        assert_eq!(t.on_ack(&key("a"), true), AckEffect::None); // the JobStarted's
        assert!(!t.is_idle());
        assert_eq!(t.on_ack(&key("a"), false), AckEffect::ResultSettled);
        assert!(t.is_idle());
    }

    #[test]
    fn reconnect_resends_pending_results() {
        let mut t = JobTable::default();
        t.insert_pending(key("a"), finished("a"), 2);
        t.insert_running(key("b"), CancellationToken::new());
        assert_eq!(t.held_refs().len(), 2);
        assert_eq!(t.running_refs(), vec![key("b").to_ref()]);
        let resend = t.new_stream();
        assert_eq!(resend, vec![finished("a")]);
        assert_eq!(t.on_ack(&key("a"), true), AckEffect::ResultSettled);
    }

    #[test]
    fn refused_start_abandons_and_abandon_drops_results() {
        let mut t = JobTable::default();
        let token = CancellationToken::new();
        t.insert_running(key("a"), token.clone());
        assert_eq!(t.on_ack(&key("a"), false), AckEffect::StaleAbandoned);
        assert!(token.is_cancelled());
        assert_eq!(t.remove_running(&key("a")).and_then(|j| j.cause), Some(CancelCause::Abandoned));

        t.insert_pending(key("b"), finished("b"), 1);
        assert!(!t.cancel(&key("b"), CancelCause::Server));
        assert!(t.cancel(&key("b"), CancelCause::Abandoned));
        assert!(t.is_idle());
    }
}
