//! Waiting for a job to finish (`queue wait`, `queue enqueue --wait`),
//! and the spinner and retry pacing `deploy … --wait` shares.
//!
//! The wait is push-driven: it opens `WatchQueue` on the job's queue and
//! only then re-reads the job with `GetQueuedJob`. Opening the watch first
//! closes the race where the job finishes between the read and the watch:
//! any change after the read arrives on the stream, and a change before it
//! is in the read. A periodic re-read covers dropped or missed events, and a
//! broken stream is reopened with backoff so a server restart does not end
//! a long wait.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tether::v1::{GetQueuedJobRequest, QueuedJob, QueuedJobState, WatchQueueRequest};
use tonic::{Code, Status};

use crate::client::Clients;
use crate::output::state_name;

/// Re-read the job this often even when no event arrives: a safety net for
/// events the server dropped or never sent (another replica, a bug).
const RECHECK_EVERY: Duration = Duration::from_secs(15);

/// Consecutive transient failures (no event received in between) tolerated
/// before the wait gives up; with the backoff below that is about a minute.
pub(crate) const MAX_TRANSIENT_FAILURES: u32 = 12;

/// Whether a job in this state will not change again without an operator:
/// the terminal states, and DEAD_LETTERED (which only a redrive leaves).
pub fn is_finished(state: i32) -> bool {
    matches!(
        QueuedJobState::try_from(state),
        Ok(QueuedJobState::Succeeded
            | QueuedJobState::Failed
            | QueuedJobState::Cancelled
            | QueuedJobState::DeadLettered)
    )
}

/// Whether a failed call is worth retrying: the server is restarting or the
/// connection broke, as opposed to a refusal (NOT_FOUND, PERMISSION_DENIED).
pub(crate) fn is_transient(status: &Status) -> bool {
    matches!(status.code(), Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded)
}

/// The backoff before retry number `n` (1-based): 250 ms doubling to 5 s.
pub(crate) fn backoff(n: u32) -> Duration {
    let ms = 250u64.saturating_mul(1 << n.min(5));
    Duration::from_millis(ms.min(5_000))
}

/// Whether `candidate` is at least as recent as `current`, by update time;
/// events buffered before a re-read must not roll the shown state back.
fn is_not_older(candidate: &QueuedJob, current: &QueuedJob) -> bool {
    let key = |j: &QueuedJob| j.update_time.as_ref().map(|t| (t.seconds, t.nanos));
    key(candidate) >= key(current)
}

/// A spinner on stderr showing the job's state; a no-op when disabled.
/// It is cleared when dropped, so an error message is not drawn over.
pub(crate) struct Spinner(Option<ProgressBar>);

impl Spinner {
    pub(crate) fn new(enabled: bool) -> Self {
        if !enabled {
            return Self(None);
        }
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} [{elapsed}]") {
            bar.set_style(style);
        }
        bar.enable_steady_tick(Duration::from_millis(120));
        Self(Some(bar))
    }

    fn show(&self, job: &QueuedJob) {
        if let Some(bar) = &self.0 {
            let mut msg = format!("job {}: {}", job.id, state_name(job.state));
            if job.attempt > 0 {
                msg.push_str(&format!(", attempt {}/{}", job.attempt, job.max_attempts));
            }
            if !job.worker_id.is_empty() {
                msg.push_str(&format!(" on {}", job.worker_id));
            }
            bar.set_message(msg);
        }
    }

    pub(crate) fn note(&self, text: String) {
        if let Some(bar) = &self.0 {
            bar.set_message(text);
        }
    }
}

impl Drop for Spinner {
    fn drop(&mut self) {
        if let Some(bar) = &self.0 {
            bar.finish_and_clear();
        }
    }
}

/// How following one watch stream ended.
enum WatchEnd {
    /// The job is finished.
    Finished,
    /// The server closed the stream; `progressed` says whether any event
    /// arrived on it (if none did, reopening counts as a failure).
    Closed { progressed: bool },
}

/// Waits until `job` is finished (see [`is_finished`]) and returns its final
/// form. `progress` draws a spinner on stderr.
pub(crate) async fn wait_for_job(clients: &Clients, job: QueuedJob, progress: bool) -> Result<QueuedJob, Status> {
    let spinner = Spinner::new(progress);
    let mut current = job;
    spinner.show(&current);
    let mut failures = 0u32;
    loop {
        if is_finished(current.state) {
            return Ok(current);
        }
        let outcome = watch_once(clients, &mut current, &spinner).await;
        let transient = match outcome {
            Ok(WatchEnd::Finished) => return Ok(current),
            Ok(WatchEnd::Closed { progressed: true }) => {
                failures = 0;
                continue;
            }
            Ok(WatchEnd::Closed { progressed: false }) => Status::unavailable("the server closed the watch stream"),
            Err(status) if is_transient(&status) => status,
            Err(status) => return Err(status),
        };
        failures += 1;
        if failures > MAX_TRANSIENT_FAILURES {
            return Err(transient);
        }
        let delay = backoff(failures);
        spinner.note(format!(
            "job {}: lost the server ({}); retrying in {}",
            current.id,
            transient.message(),
            humantime::format_duration(delay)
        ));
        tokio::time::sleep(delay).await;
    }
}

/// Opens one watch, re-reads the job, and follows the stream until the job
/// is finished (`current` then holds it) or the stream ends.
async fn watch_once(clients: &Clients, current: &mut QueuedJob, spinner: &Spinner) -> Result<WatchEnd, Status> {
    let id = current.id.clone();
    let watch = WatchQueueRequest { queue: current.queue.clone(), ..Default::default() };
    let mut stream = clients.queue.clone().watch_queue(clients.req(watch)).await?.into_inner();
    *current = get_job(clients, &id).await?;
    spinner.show(current);
    if is_finished(current.state) {
        return Ok(WatchEnd::Finished);
    }
    let mut progressed = false;
    loop {
        match tokio::time::timeout(RECHECK_EVERY, stream.message()).await {
            Err(_quiet) => {
                *current = get_job(clients, &id).await?;
            }
            Ok(Ok(Some(event))) => {
                progressed = true;
                if let Some(job) = event.job {
                    if job.id == id && is_not_older(&job, current) {
                        *current = job;
                    }
                }
                // The server skipped events for this slow watcher; one of
                // them may have been ours.
                if event.dropped > 0 {
                    *current = get_job(clients, &id).await?;
                }
            }
            Ok(Ok(None)) => return Ok(WatchEnd::Closed { progressed }),
            Ok(Err(status)) => return Err(status),
        }
        spinner.show(current);
        if is_finished(current.state) {
            return Ok(WatchEnd::Finished);
        }
    }
}

/// Reads a job, failing with the server's status.
pub(crate) async fn get_job(clients: &Clients, id: &str) -> Result<QueuedJob, Status> {
    let response = clients
        .queue
        .clone()
        .get_queued_job(clients.req(GetQueuedJobRequest { id: id.to_string() }))
        .await?
        .into_inner();
    response.job.ok_or_else(|| Status::internal(format!("the server returned no job for id {id}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finished_states() {
        use QueuedJobState::*;
        for s in [Succeeded, Failed, Cancelled, DeadLettered] {
            assert!(is_finished(s as i32), "{s:?}");
        }
        for s in [Unspecified, Queued, Claimed, Running] {
            assert!(!is_finished(s as i32), "{s:?}");
        }
        assert!(!is_finished(99));
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        assert_eq!(backoff(1), Duration::from_millis(500));
        assert!(backoff(2) > backoff(1));
        assert_eq!(backoff(40), Duration::from_secs(5));
    }

    #[test]
    fn older_events_do_not_roll_back() {
        let at =
            |s| QueuedJob { update_time: Some(prost_types::Timestamp { seconds: s, nanos: 0 }), ..Default::default() };
        assert!(is_not_older(&at(5), &at(5)));
        assert!(is_not_older(&at(6), &at(5)));
        assert!(!is_not_older(&at(4), &at(5)));
    }
}
