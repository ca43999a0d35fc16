//! Waiting for this replica's next commit to the job log, or an interval
//! (for what other replicas commit): the pace of the background tasks that
//! follow the store (deployments, the summary's figures).

use std::time::Duration;

use tokio::sync::watch;

use crate::engine::EngineHandle;

pub struct Commits {
    /// `None` once the engine has stopped: then only the interval wakes.
    log: Option<watch::Receiver<u64>>,
}

impl Commits {
    pub fn new(engine: &EngineHandle) -> Commits {
        Commits { log: Some(engine.subscribe_log()) }
    }

    /// Resolves after the next commit that wrote to the job log, or after
    /// `interval`, whichever comes first.
    pub async fn next(&mut self, interval: Duration) {
        let commits = async {
            match self.log.as_mut() {
                Some(log) => log.changed().await.is_ok(),
                None => std::future::pending().await,
            }
        };
        let engine_runs = tokio::select! {
            running = commits => running,
            () = tokio::time::sleep(interval) => true,
        };
        if !engine_runs {
            self.log = None;
        }
    }
}
