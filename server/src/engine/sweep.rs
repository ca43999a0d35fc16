//! The sweep of a shared store: every replica reads the store's queued and
//! active jobs about once a second (jittered, so replicas spread their
//! reads) and hands them to its engine, which adopts queued jobs it did not
//! know (enqueued through another replica, or whose wake-up was lost) and
//! reaps active jobs whose lease ran out long ago (their replica died).
//! The reads run here, never on the engine's loop.

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::sync::mpsc;

use super::Command;
use crate::clock::Clock;
use crate::store::Store;

/// How many queued jobs a sweep reads: its cost is bounded however long
/// the queue. Each sweep resumes where the last one stopped and starts over
/// at the end, so every queued job is seen within a few sweeps even behind
/// thousands of jobs no agent here can run yet.
const SWEEP_QUEUED: usize = 512;

pub(crate) async fn run(
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    interval: Duration,
    commands: mpsc::WeakSender<Command>,
) {
    let mut cursor = 0;
    loop {
        let wait = jittered(interval);
        clock.sleep_until(tether::time::later(clock.now(), wait)).await;
        // What the reads return is at least this recent.
        let read_at = clock.now();
        let swept = async {
            let queued = store.queued_after(cursor, SWEEP_QUEUED).await?;
            Ok::<_, crate::store::StoreError>((queued, store.load_active().await?, store.list_pools().await?))
        };
        let (queued, active, pools) = match swept.await {
            Ok(((queued, next), active, pools)) => {
                cursor = next.unwrap_or(0);
                (queued, active, pools)
            }
            Err(e) => {
                tracing::warn!(error = %e, "sweep of the shared store failed; trying again");
                continue;
            }
        };
        // The engine has stopped when its queue is gone.
        let Some(commands) = commands.upgrade() else { return };
        if commands.send(Command::Sweep { queued, active, pools, read_at }).await.is_err() {
            return;
        }
    }
}

/// `interval` ±25%, so replicas started together do not sweep together.
fn jittered(interval: Duration) -> Duration {
    let quarter = interval / 4;
    let spread = quarter.as_nanos().min(u128::from(u64::MAX)) as u64;
    let offset = Duration::from_nanos(rand::rng().random_range(0..=spread.saturating_mul(2)));
    (interval - quarter).saturating_add(offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_a_quarter_of_the_interval() {
        for _ in 0..1000 {
            let d = jittered(Duration::from_secs(1));
            assert!(d >= Duration::from_millis(750) && d <= Duration::from_millis(1250), "{d:?}");
        }
        assert_eq!(jittered(Duration::ZERO), Duration::ZERO);
    }
}
