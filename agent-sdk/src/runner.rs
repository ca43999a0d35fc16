//! One job task: run the handler under its timeout and cancellation, then
//! turn the ending into a JobFinished that stays pending until acked.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;
use tether::v1::{connect_request::Message, JobFinished, JobOutcome};

use crate::handler::{JobContext, JobHandler, JobResult};
use crate::jobs::{CancelCause, JobKey};
use crate::state::Shared;

/// Largest result the protocol allows.
const MAX_RESULT: usize = 1 << 20;

/// How the handler's future ended.
enum Ending {
    Returned(JobResult),
    Panicked(String),
    TimedOut(Duration),
    /// Cancelled and did not return within the grace period.
    Unresponsive,
}

/// Spawns the task running one attempt. The caller has already inserted
/// `key` into the running table and sent AssignmentAck and JobStarted.
pub(crate) fn spawn_job(shared: Arc<Shared>, handler: Arc<dyn JobHandler>, ctx: JobContext, key: JobKey) {
    tokio::spawn(async move {
        let ending = execute(handler.as_ref(), ctx.clone(), shared.cancel_grace).await;
        // Output held back by secret masking goes before the result.
        ctx.flush_masked().await;
        complete(&shared, &ctx, key, masked(&ctx, ending));
    });
}

async fn execute(handler: &dyn JobHandler, ctx: JobContext, grace: Duration) -> Ending {
    let token = ctx.cancellation_token();
    let timeout = ctx.timeout();
    // A panicking handler must still produce a JobFinished, or its slot
    // would stay taken on the server until the lease ran out.
    let run = AssertUnwindSafe(handler.run(ctx)).catch_unwind();
    tokio::pin!(run);
    let deadline = async {
        match timeout {
            Some(t) => tokio::time::sleep(t).await,
            None => std::future::pending().await,
        }
    };
    let timed_out = tokio::select! {
        biased;
        r = &mut run => return returned(r),
        _ = token.cancelled() => false,
        _ = deadline => true,
    };
    token.cancel();
    let after_cancel = tokio::select! {
        biased;
        r = &mut run => Some(returned(r)),
        _ = tokio::time::sleep(grace) => None,
    };
    match (timed_out, after_cancel) {
        (true, _) => Ending::TimedOut(timeout.unwrap_or_default()),
        (false, Some(ending)) => ending,
        (false, None) => Ending::Unresponsive,
    }
}

/// The ending with the job's secrets masked out of its result and error.
fn masked(ctx: &JobContext, ending: Ending) -> Ending {
    let text = |s: String| String::from_utf8_lossy(&ctx.masked(s.as_bytes())).into_owned();
    match ending {
        Ending::Returned(JobResult::Succeeded { result }) => {
            Ending::Returned(JobResult::Succeeded { result: Bytes::from(ctx.masked(&result)) })
        }
        Ending::Returned(JobResult::Failed { error, retryable, exit_code }) => {
            Ending::Returned(JobResult::Failed { error: text(error), retryable, exit_code })
        }
        Ending::Panicked(message) => Ending::Panicked(text(message)),
        other => other,
    }
}

fn returned(r: std::thread::Result<JobResult>) -> Ending {
    match r {
        Ok(result) => Ending::Returned(result),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-string panic".into());
            Ending::Panicked(msg)
        }
    }
}

fn complete(shared: &Shared, ctx: &JobContext, key: JobKey, ending: Ending) {
    let mut core = shared.core();
    ctx.mark_done();
    let Some(job) = core.jobs.remove_running(&key) else {
        // Gone already: the agent stopped for good.
        return;
    };
    if job.cause == Some(CancelCause::Abandoned) {
        tracing::debug!(job_id = ctx.job_id(), "abandoned attempt ended; result dropped");
        shared.poke_if_idle(&core);
        return;
    }
    let finished = finished_message(key.to_ref(), ending, job.cause == Some(CancelCause::Server));
    let sent = core.send(Message::JobFinished(finished.clone()));
    core.jobs.insert_pending(key, finished, job.unacked + u32::from(sent));
}

fn finished_message(job: tether::v1::JobRef, ending: Ending, server_cancelled: bool) -> JobFinished {
    let mut f = JobFinished { job: Some(job), ..Default::default() };
    let fail = |f: &mut JobFinished, outcome: JobOutcome, error: String| {
        f.outcome = outcome as i32;
        f.error = error;
    };
    match ending {
        // A timeout is the SDK's own doing: report it as such even if the
        // server also sent Cancel meanwhile.
        Ending::TimedOut(t) => fail(&mut f, JobOutcome::FailedRetryable, format!("timed out after {t:?}")),
        _ if server_cancelled => f.outcome = JobOutcome::Cancelled as i32,
        Ending::Returned(JobResult::Succeeded { result }) if result.len() > MAX_RESULT => fail(
            &mut f,
            JobOutcome::FailedPermanent,
            format!("result of {} bytes exceeds the 1 MiB limit", result.len()),
        ),
        Ending::Returned(JobResult::Succeeded { result }) => {
            f.outcome = JobOutcome::Succeeded as i32;
            f.result = result;
        }
        Ending::Returned(JobResult::Failed { error, retryable, exit_code }) => {
            let outcome = if retryable { JobOutcome::FailedRetryable } else { JobOutcome::FailedPermanent };
            fail(&mut f, outcome, error);
            f.exit_code = exit_code.unwrap_or(0);
        }
        // The attempt was given up rather than failed (the agent is
        // shutting down, or its handler stopped without a result): CANCELLED
        // makes the server count it as a lost attempt and retry the job,
        // whatever its retry policy says about failures.
        Ending::Returned(JobResult::Cancelled) => {
            fail(&mut f, JobOutcome::Cancelled, "handler stopped without a cancel request".into())
        }
        Ending::Unresponsive => fail(&mut f, JobOutcome::Cancelled, "handler ignored cancellation".into()),
        // A panic is the job's failure; its retry policy decides.
        Ending::Panicked(msg) => fail(&mut f, JobOutcome::FailedRetryable, format!("handler panicked: {msg}")),
    }
    if f.outcome != JobOutcome::Succeeded as i32 {
        f.result = Bytes::new();
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(ending: Ending, server_cancelled: bool) -> (JobOutcome, String) {
        let f = finished_message(Default::default(), ending, server_cancelled);
        (JobOutcome::try_from(f.outcome).unwrap_or(JobOutcome::Unspecified), f.error)
    }

    #[test]
    fn endings_map_to_outcomes() {
        let ok = || Ending::Returned(JobResult::success("x"));
        assert_eq!(outcome(ok(), false).0, JobOutcome::Succeeded);
        assert_eq!(outcome(ok(), true).0, JobOutcome::Cancelled);
        assert_eq!(outcome(Ending::Returned(JobResult::Cancelled), true).0, JobOutcome::Cancelled);
        assert_eq!(outcome(Ending::Returned(JobResult::Cancelled), false).0, JobOutcome::Cancelled);
        assert_eq!(outcome(Ending::Unresponsive, false).0, JobOutcome::Cancelled);
        assert_eq!(outcome(Ending::Returned(JobResult::permanent("no")), false).0, JobOutcome::FailedPermanent);
        let (o, e) = outcome(Ending::TimedOut(Duration::from_secs(2)), true);
        assert_eq!(o, JobOutcome::FailedRetryable);
        assert!(e.contains("timed out"), "{e}");
        let big = Ending::Returned(JobResult::success(vec![0u8; MAX_RESULT + 1]));
        assert_eq!(outcome(big, false).0, JobOutcome::FailedPermanent);
        assert_eq!(outcome(Ending::Panicked("boom".into()), false).0, JobOutcome::FailedRetryable);
    }
}
