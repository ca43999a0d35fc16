//! WatchQueue's stream: a task that reads the durable event log from the
//! watcher's cursor and sends each matching change with the cursor after
//! it. The engine's count of commits that wrote to the log only wakes the
//! task (this replica's commits); on a shared store it also reads the log every
//! `poll` interval, for changes made through other replicas. A store
//! error or an expired cursor ends the stream with its status; the client
//! resumes from the last cursor it received.

use std::collections::VecDeque;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tonic::Status;

use tether::v1 as pb;

use super::convert::{self, job_out};
use super::event_cursor;
use super::status::to_status;
use crate::domain::{DomainResult, JobState};
use crate::engine::EngineHandle;
use crate::store::{Event, EventCursor};

/// Events read per store call (per shard).
pub const READ_BATCH: usize = 256;
/// Responses buffered for a slow client before the task waits for it.
const BUFFER: usize = 64;

/// Which changes a watcher wants.
pub struct Filter {
    pub queue: Option<String>,
    pub states: Vec<JobState>,
    /// Leave payload and result out (else each is read from the job).
    pub skip_payload: bool,
}

impl Filter {
    fn matches(&self, event: &Event) -> bool {
        self.queue.as_ref().is_none_or(|q| *q == event.job.spec.queue)
            && (self.states.is_empty() || self.states.contains(&event.job.state))
    }
}

/// Where a watch starts: its first read is done before the call answers,
/// so a cursor that is invalid or expired is the call's status.
pub struct Start {
    pub events: Vec<Event>,
    pub cursor: EventCursor,
    pub wake: watch::Receiver<u64>,
}

pub async fn start(engine: &EngineHandle, cursor: Option<EventCursor>) -> DomainResult<Start> {
    // Subscribed before the first read: a change committed after it wakes
    // the task.
    let wake = engine.subscribe_log();
    let Some(cursor) = cursor else {
        return Ok(Start { events: Vec::new(), cursor: engine.event_heads().await?, wake });
    };
    // The cursor moves past each event as it is sent (a read's `next` is
    // where the last event of each shard it returned leaves it).
    let (events, _) = engine.read_events("cursor", &cursor, READ_BATCH).await?;
    Ok(Start { events, cursor, wake })
}

/// Spawns the task; the stream ends when the client goes, at shutdown, or
/// with an error status.
pub fn spawn(
    engine: EngineHandle,
    filter: Filter,
    start: Start,
    stopping: CancellationToken,
) -> mpsc::Receiver<Result<pb::WatchQueueResponse, Status>> {
    let (tx, rx) = mpsc::channel(BUFFER);
    tokio::spawn(async move {
        tokio::select! {
            () = run(&engine, &filter, start, &tx) => {}
            () = stopping.cancelled() => {}
            () = tx.closed() => {}
        }
    });
    rx
}

async fn run(
    engine: &EngineHandle,
    filter: &Filter,
    start: Start,
    tx: &mpsc::Sender<Result<pb::WatchQueueResponse, Status>>,
) {
    let Start { mut events, mut cursor, mut wake } = start;
    let settings = engine.watch_settings();
    let mut last_read = tokio::time::Instant::now();
    loop {
        let full = events.len() >= READ_BATCH;
        for mut event in in_time_order(std::mem::take(&mut events), |e| e.shard, |e| e.job.update_time) {
            cursor.advance(&event);
            if !filter.matches(&event) {
                continue;
            }
            if !filter.skip_payload {
                if let Err(e) = fill_payload(engine, &mut event).await {
                    let _ = tx.send(Err(to_status(e))).await;
                    return;
                }
            }
            let response = pb::WatchQueueResponse {
                job: Some(job_out(&event.job)),
                previous_state: event.previous.map_or(0, |s| convert::state_out(s) as i32),
                dropped: 0,
                cursor: event_cursor::encode(&cursor),
            };
            if tx.send(Ok(response)).await.is_err() {
                return;
            }
        }
        if !full {
            if !wait(&mut wake, settings.poll).await {
                return;
            }
            if let Some(least) = settings.min_read_interval {
                tokio::time::sleep_until(last_read + least).await;
            }
        }
        last_read = tokio::time::Instant::now();
        match engine.read_events("cursor", &cursor, READ_BATCH).await {
            Ok((read, _)) => events = read,
            Err(e) => {
                let _ = tx.send(Err(to_status(e))).await;
                return;
            }
        }
    }
}

/// Puts back what the log leaves out: the payload (it never changes) and,
/// for a success, the result (final once the job succeeded), from the
/// job's record.
async fn fill_payload(engine: &EngineHandle, event: &mut Event) -> DomainResult<()> {
    let job = match engine.get_job(&event.job.id).await {
        Ok(job) => job,
        // Never deleted today; if it were, the change is still worth sending.
        Err(crate::domain::DomainError::NotFound { .. }) => return Ok(()),
        Err(e) => return Err(e),
    };
    event.job.spec.payload = job.spec.payload;
    if event.job.state == JobState::Succeeded {
        event.job.result = job.result;
    }
    Ok(())
}

/// Waits for a wake-up: a local commit's event, or the poll interval on a
/// shared store. Drains what else is queued first, so one read answers
/// every wake-up that came before it. False when the engine is gone.
async fn wait(wake: &mut watch::Receiver<u64>, poll: Option<std::time::Duration>) -> bool {
    // `changed` marks every commit so far as seen: one read answers them all.
    let woken = async { wake.changed().await.is_ok() };
    match poll {
        Some(every) => tokio::select! {
            alive = woken => alive,
            () = tokio::time::sleep(every) => true,
        },
        None => woken.await,
    }
}

/// Entries of several shards merged by time, each shard's kept in its own
/// (sequence) order.
pub(super) fn in_time_order<T, K: PartialEq>(
    entries: Vec<T>,
    shard: impl Fn(&T) -> K,
    time: impl Fn(&T) -> std::time::SystemTime,
) -> Vec<T> {
    let mut shards: Vec<(K, VecDeque<T>)> = Vec::new();
    for entry in entries {
        let key = shard(&entry);
        match shards.iter_mut().find(|(k, _)| *k == key) {
            Some((_, queue)) => queue.push_back(entry),
            None => shards.push((key, VecDeque::from([entry]))),
        }
    }
    let mut out = Vec::new();
    loop {
        let next = shards
            .iter()
            .enumerate()
            .filter_map(|(i, (_, q))| q.front().map(|e| (i, time(e))))
            .min_by_key(|(_, t)| *t)
            .map(|(i, _)| i);
        let Some(i) = next else { return out };
        if let Some(entry) = shards[i].1.pop_front() {
            out.push(entry);
        }
    }
}
