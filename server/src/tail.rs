//! One reader of the job event log per replica for all its watchers
//! (WatchQueue, WatchEvents): after each commit that wrote to the log (and,
//! on a shared store, every poll interval) the tail reads the new events
//! once and hands the batch to every watcher in memory, instead of every
//! watcher reading the store. A watcher that is behind the tail (a resumed
//! cursor, or a slow one whose batches were dropped) reads the store itself
//! until it meets the tail again ([`Follower`]).
//!
//! Batches chain: each says the position it was read from and the one it
//! reached. A watcher whose position is at or past a batch's start (in every
//! shard) takes the batch's events after its position; one whose position
//! is before it (it would skip events) reads the store instead.

use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::{broadcast, watch};

use crate::domain::DomainResult;
use crate::engine::{EngineHandle, WatchSettings};
use crate::store::{Event, EventCursor, EventRead, Store};

/// Events read per store call and shard.
pub const READ_BATCH: usize = 256;
/// Batches kept for watchers that are a little behind; one further behind
/// reads the store. Few: a watcher whose client stopped reading holds
/// every batch in the ring.
const KEPT_BATCHES: usize = 64;
/// The pause after a failed read before the tail tries again.
const RETRY: Duration = Duration::from_millis(200);

/// Events of the log from `from` (exclusive) to `to` (inclusive), per
/// shard in sequence order.
#[derive(Debug)]
pub struct Batch {
    pub from: EventCursor,
    pub to: EventCursor,
    pub events: Vec<Event>,
}

/// The tail's handle: watchers subscribe to its batches.
#[derive(Clone)]
pub struct JobLogTail {
    batches: broadcast::Sender<Arc<Batch>>,
}

impl JobLogTail {
    /// Starts the tail's task; it ends when the engine's commit counter
    /// (`wake`) or the store goes (it never keeps the store open).
    pub fn spawn(store: Arc<dyn Store>, wake: watch::Receiver<u64>, settings: WatchSettings) -> JobLogTail {
        let (batches, _) = broadcast::channel(KEPT_BATCHES);
        tokio::spawn(run(Arc::downgrade(&store), wake, settings, batches.clone()));
        JobLogTail { batches }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Batch>> {
        self.batches.subscribe()
    }
}

async fn run(
    store: Weak<dyn Store>,
    mut wake: watch::Receiver<u64>,
    settings: WatchSettings,
    batches: broadcast::Sender<Arc<Batch>>,
) {
    // `None` while nobody listens: the next reader starts from the present.
    let mut position: Option<EventCursor> = None;
    let mut last_read = tokio::time::Instant::now();
    // After a failed read: try again after a pause, not after the next
    // commit (on the embedded store, watchers would wait for one).
    let mut failed = false;
    loop {
        if failed {
            tokio::time::sleep(RETRY).await;
        } else if !woken(&mut wake, settings.poll).await {
            return;
        }
        failed = false;
        if batches.receiver_count() == 0 {
            position = None;
            continue;
        }
        if let Some(least) = settings.min_read_interval {
            tokio::time::sleep_until(last_read + least).await;
        }
        last_read = tokio::time::Instant::now();
        let Some(store) = store.upgrade() else { return };
        let anchored = position.is_none();
        let from = match position.take() {
            Some(from) => from,
            None => match store.event_heads().await {
                Ok(heads) => heads,
                Err(e) => {
                    tracing::warn!(error = %e, "the event log tail could not read the log's heads");
                    failed = true;
                    continue;
                }
            },
        };
        match read_on(store.as_ref(), from, anchored, &batches).await {
            Reached::At(at) => position = Some(at),
            Reached::Restart => {}
            Reached::Failed => failed = true,
        }
    }
}

/// Waits for the next commit that wrote to the log, or the poll interval
/// on a shared store; false once the engine is gone.
async fn woken(wake: &mut watch::Receiver<u64>, poll: Option<Duration>) -> bool {
    let changed = async { wake.changed().await.is_ok() };
    match poll {
        Some(every) => tokio::select! {
            alive = changed => alive,
            () = tokio::time::sleep(every) => true,
        },
        None => changed.await,
    }
}

/// Where a read of the tail ended.
enum Reached {
    At(EventCursor),
    /// The log was trimmed past the position: start again from the present
    /// (watchers behind read the store themselves).
    Restart,
    /// The store failed: the same, after a pause.
    Failed,
}

/// Reads everything after `from` and publishes it. A tail that has just `anchored` at the present publishes even nothing:
/// the commit that woke it is then before `from`, and a watcher waiting
/// for it must learn that it has to read the store.
async fn read_on(
    store: &dyn Store,
    mut from: EventCursor,
    anchored: bool,
    batches: &broadcast::Sender<Arc<Batch>>,
) -> Reached {
    loop {
        match store.read_events(&from, READ_BATCH).await {
            Ok(EventRead::Events { events, next }) => {
                if events.is_empty() {
                    if anchored {
                        let _ = batches.send(Arc::new(Batch { from: from.clone(), to: from.clone(), events }));
                    }
                    return Reached::At(from);
                }
                let full = events.len() >= READ_BATCH;
                let batch = Batch { from, to: next.clone(), events };
                // No receiver left: nothing to do (the next wake starts over).
                let _ = batches.send(Arc::new(batch));
                from = next;
                if !full {
                    return Reached::At(from);
                }
            }
            Ok(EventRead::Expired | EventRead::Unknown) => return Reached::Restart,
            Err(e) => {
                tracing::warn!(error = %e, "the event log tail could not read the log");
                return Reached::Failed;
            }
        }
    }
}

/// A watcher's reader of the job log from its own position: from the
/// store while it is behind the tail, then from the tail's batches.
pub struct Follower {
    /// How far it has read (what it returned; the caller's cursor follows
    /// as it sends).
    position: EventCursor,
    batches: broadcast::Receiver<Arc<Batch>>,
    behind: bool,
}

impl Follower {
    /// Follows from `position`: subscribed now, so no batch published
    /// from here on is missed; the events before are read from the store.
    pub fn new(tail: &JobLogTail, position: EventCursor) -> Follower {
        Follower { position, batches: tail.subscribe(), behind: true }
    }

    /// After a read of the store made by the caller up to `next` (`full`:
    /// it may not have reached the end).
    pub fn read_to(&mut self, next: EventCursor, full: bool) {
        self.position = next;
        self.behind = full;
    }

    /// The next events after its position, oldest first per shard; `None`
    /// when the tail has stopped. An expired position is
    /// [`crate::domain::DomainError::Expired`] (see
    /// [`EngineHandle::read_events`]). Cancel-safe.
    pub async fn next(&mut self, engine: &EngineHandle, field: &str) -> DomainResult<Option<Vec<Event>>> {
        loop {
            if self.behind {
                let (events, next) = engine.read_events(field, &self.position, READ_BATCH).await?;
                self.behind = events.len() >= READ_BATCH;
                self.position = next;
                if !events.is_empty() {
                    return Ok(Some(events));
                }
                continue;
            }
            match self.batches.recv().await {
                Ok(batch) => {
                    if !at_or_after(&self.position, &batch.from) {
                        // Events before the batch are not read yet.
                        self.behind = true;
                        continue;
                    }
                    let new: Vec<Event> = batch
                        .events
                        .iter()
                        .filter(|e| self.position.positions.get(e.shard as usize).is_some_and(|p| e.seq > *p))
                        .cloned()
                        .collect();
                    for (p, to) in self.position.positions.iter_mut().zip(&batch.to.positions) {
                        *p = (*p).max(*to);
                    }
                    if !new.is_empty() {
                        return Ok(Some(new));
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => self.behind = true,
                Err(broadcast::error::RecvError::Closed) => return Ok(None),
            }
        }
    }
}

/// Whether `position` is at or past `start` in every shard.
fn at_or_after(position: &EventCursor, start: &EventCursor) -> bool {
    position.positions.len() == start.positions.len()
        && position.positions.iter().zip(&start.positions).all(|(p, s)| p >= s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_is_usable_from_any_position_at_or_past_its_start() {
        let c = |p: &[u64]| EventCursor { positions: p.to_vec() };
        assert!(at_or_after(&c(&[3, 5]), &c(&[3, 5])));
        assert!(at_or_after(&c(&[4, 5]), &c(&[3, 5])));
        assert!(!at_or_after(&c(&[2, 9]), &c(&[3, 5])), "shard 0 would skip event 3");
        assert!(!at_or_after(&c(&[3]), &c(&[3, 5])), "another layout");
    }
}
