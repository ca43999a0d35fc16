//! WatchQueue's stream: a task that reads the durable event log from the
//! watcher's cursor and sends each matching change with the cursor after
//! it. Once it has caught up it reads through this replica's log tail
//! (`crate::tail`: one read of each commit for all watchers; on a shared
//! store also every poll interval, for other replicas' changes). A store
//! error or an expired cursor ends the stream with its status; the client
//! resumes from the last cursor it received.

use std::collections::VecDeque;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use tether::v1 as pb;

use super::convert::{self, job_out};
use super::event_cursor;
use super::status::to_status;
use crate::domain::{DomainResult, JobState};
use crate::engine::EngineHandle;
use crate::store::{Event, EventCursor};
use crate::tail::Follower;

pub use crate::tail::READ_BATCH;
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
    follower: Follower,
}

pub async fn start(engine: &EngineHandle, cursor: Option<EventCursor>) -> DomainResult<Start> {
    let Some(cursor) = cursor else {
        // Following before the heads are read: no change after them is
        // missed.
        let mut follower = engine.follow_log(EventCursor::default());
        let cursor = engine.event_heads().await?;
        follower.read_to(cursor.clone(), false);
        return Ok(Start { events: Vec::new(), cursor, follower });
    };
    let mut follower = engine.follow_log(cursor.clone());
    // The cursor moves past each event as it is sent.
    let (events, next) = engine.read_events("cursor", &cursor, READ_BATCH).await?;
    follower.read_to(next, events.len() >= READ_BATCH);
    Ok(Start { events, cursor, follower })
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
    let Start { mut events, mut cursor, mut follower } = start;
    loop {
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
        match follower.next(engine, "cursor").await {
            Ok(Some(read)) => events = read,
            Ok(None) => return,
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
