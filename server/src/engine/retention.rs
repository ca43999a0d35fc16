//! The event log's retention task: every `interval` (on the engine's clock)
//! it trims events older than the retention from the store, off the
//! engine's loop. On the embedded store the trim deletes them; on DynamoDB
//! it raises each shard's low-water mark and leaves deletion to the table's
//! TTL (see `store/dynamodb/events.rs`). Any replica may trim: trims only
//! ever raise the marks, so two at once do no harm.

use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::watch;

use crate::clock::Clock;
use crate::store::Store;

/// Groups trimmed per store call: one call is one bounded transaction
/// (embedded) or a bounded walk (DynamoDB); the task calls again while
/// more remain.
const TRIM_BATCH: usize = 4096;

/// Trims every `interval` until the engine is gone (its `serving` sender
/// dropped). Between trims it holds the store only weakly, so a stopped
/// engine's store closes at once.
pub(crate) async fn run(
    store: Weak<dyn Store>,
    clock: Arc<dyn Clock>,
    retention: Duration,
    interval: Duration,
    mut serving: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            () = clock.sleep_until(tether::time::later(clock.now(), interval)) => {}
            () = gone(&mut serving) => return,
        }
        let Some(store) = store.upgrade() else { return };
        trim_once(store.as_ref(), clock.now(), retention).await;
    }
}

/// Resolves when the engine has dropped its end of `serving`.
async fn gone(serving: &mut watch::Receiver<bool>) {
    while serving.changed().await.is_ok() {}
}

/// Trims everything older than `now - retention`; returns the groups
/// trimmed.
pub(crate) async fn trim_once(store: &dyn Store, now: std::time::SystemTime, retention: Duration) -> u64 {
    let Some(before) = now.checked_sub(retention) else { return 0 };
    let mut total = 0;
    loop {
        match store.trim_events(before, TRIM_BATCH).await {
            Ok(trimmed) => {
                total += trimmed.groups;
                if !trimmed.more {
                    break;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "trimming the event log failed; trying again later");
                break;
            }
        }
    }
    if total > 0 {
        tracing::debug!(groups = total, "trimmed the event log");
        metrics::counter!("tether_events_trimmed_total").increment(total);
    }
    total
}
