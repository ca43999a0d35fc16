//! The task that moves deployments along with their rollout jobs: a pass
//! over every busy (service, environment) after a commit of this replica
//! changed a job (the engine's event-log counter), after a request
//! changed a rollout, and on an interval for what other replicas changed.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::Deployments;

/// Passes are at least this far apart, however busy the job log is: a pass
/// reads each busy rollout and its job.
const MIN_SPACING: Duration = Duration::from_millis(100);

pub fn spawn(deployments: Deployments, interval: Duration, stopping: CancellationToken) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        tokio::select! {
            () = run(&deployments, interval) => {}
            () = stopping.cancelled() => {}
        }
    })
}

async fn run(deployments: &Deployments, interval: Duration) {
    let mut commits = crate::wake::Commits::new(&deployments.engine);
    let nudge = deployments.nudged();
    loop {
        pass(deployments).await;
        tokio::select! {
            () = commits.next(interval) => {}
            () = nudge.notified() => {}
        }
        tokio::time::sleep(MIN_SPACING).await;
    }
}

async fn pass(deployments: &Deployments) {
    let busy = match deployments.busy_rollouts().await {
        Ok(busy) => busy,
        Err(e) => {
            tracing::warn!(error = %e, "reading the rollouts failed; trying again on the next pass");
            return;
        }
    };
    for (service, environment) in busy {
        if let Err(e) = deployments.advance(&service, &environment).await {
            tracing::warn!(%service, %environment, error = %e, "a rollout could not advance; trying again on the next pass");
        }
    }
}
