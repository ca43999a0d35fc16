//! The summary's job figures: a task folds the job event log into one
//! stored record (`summary` / `jobs`: per hour, dashboard jobs' outcomes
//! and first-claim waits, and the log position folded up to), so GetSummary
//! reads one record instead of scanning jobs. The record and its position
//! change in one conditional write, so replicas folding at once never count
//! an event twice: the one that loses re-reads and folds from the winner's
//! position.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::deploy::records::{get, put, Put};
use crate::domain::dashboard::DASHBOARD_QUEUE;
use crate::domain::summary::JobStats;
use crate::domain::{DomainError, DomainResult};
use crate::engine::EngineHandle;
use crate::store::EventCursor;

const COLLECTION: &str = "summary";
const JOBS: &str = "jobs";
/// Events folded per read.
const BATCH: usize = 1000;
/// Reads per pass at most (a pass that falls behind continues next time).
const MAX_READS: usize = 20;
/// Passes are at least this far apart however busy the log is.
const MIN_SPACING: Duration = Duration::from_millis(200);

/// The stored job figures (empty before the first fold).
pub async fn job_stats(engine: &EngineHandle) -> DomainResult<JobStats> {
    Ok(get::<JobStats>(engine.store().as_ref(), COLLECTION, JOBS).await?.map(|v| v.value).unwrap_or_default())
}

/// Folds what the log holds past the stored position; `true` if it caught
/// up.
pub async fn fold(engine: &EngineHandle) -> DomainResult<bool> {
    // The record as stored; read again only after another replica wrote it.
    let mut held: Option<(JobStats, u64)> = None;
    for _ in 0..MAX_READS {
        let (mut stats, version) = match held.take() {
            Some(held) => held,
            None => get::<JobStats>(engine.store().as_ref(), COLLECTION, JOBS)
                .await?
                .map_or_else(|| (JobStats::default(), 0), |v| (v.value, v.version)),
        };
        // The figures start from the present the first time (history
        // before is not counted).
        let cursor = if stats.cursor.is_empty() {
            engine.event_heads().await?
        } else {
            EventCursor { positions: stats.cursor.clone() }
        };
        let (events, next) = match engine.read_events("summary", &cursor, BATCH).await {
            Ok(read) => read,
            Err(DomainError::Expired(_)) => {
                // Trimmed past the position: counted as a gap, folded on
                // from the present.
                stats.gaps += 1;
                (Vec::new(), engine.event_heads().await?)
            }
            Err(e) => return Err(e),
        };
        let caught_up = events.is_empty();
        for event in &events {
            if event.job.spec.queue == DASHBOARD_QUEUE {
                let job = &event.job;
                stats.fold(event.previous, job.state, job.attempt, job.create_time, job.update_time);
            }
        }
        let moved = next.positions != stats.cursor;
        stats.cursor = next.positions;
        let mut version = version;
        if moved {
            if put(engine.store().as_ref(), COLLECTION, JOBS, &stats, version).await? == Put::Lost {
                // Another replica folded first: read its position again.
                continue;
            }
            version += 1;
        }
        if caught_up {
            return Ok(true);
        }
        held = Some((stats, version));
    }
    Ok(false)
}

/// Runs folds after this replica's commits and on an interval (other
/// replicas' commits), until `stopping`.
pub fn spawn(engine: EngineHandle, interval: Duration, stopping: CancellationToken) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        tokio::select! {
            () = run(&engine, interval) => {}
            () = stopping.cancelled() => {}
        }
    })
}

async fn run(engine: &EngineHandle, interval: Duration) {
    let mut commits = crate::wake::Commits::new(engine);
    loop {
        let caught_up = match fold(engine).await {
            Ok(caught_up) => caught_up,
            Err(e) => {
                tracing::warn!(error = %e, "folding job events into the summary failed; trying again");
                true
            }
        };
        if caught_up {
            commits.next(interval).await;
        }
        tokio::time::sleep(MIN_SPACING).await;
    }
}
