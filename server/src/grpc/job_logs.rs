//! StreamJobLogs' stream: a task that sends a job's stored output from the
//! caller's cursor, attempt by attempt, and with `follow` the output that
//! arrives, until the job has ended and all of it was sent. Commits that
//! store output wake it (this replica's agents); on a shared store it also
//! reads every poll interval, for agents connected to other replicas.

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tonic::Status;

use tether::time::to_timestamp;
use tether::v1 as pb;

use super::page_token::{self, Listing};
use super::status::to_status;
use crate::domain::{DomainError, DomainResult, JobState};
use crate::engine::EngineHandle;
use crate::store::LogChunk;

/// Responses a slow reader may leave unread before the task waits.
const BUFFER: usize = 64;

/// Where a log stream resumes: after a chunk of an attempt (`after`, the
/// last sequence sent; `None` from the attempt's first chunk). A sequence
/// is the agent's choice, any u64: "after" needs no successor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogCursor {
    pub attempt: u32,
    pub after: Option<u64>,
}

impl LogCursor {
    pub const START: LogCursor = LogCursor { attempt: 1, after: None };

    pub fn encode(self) -> String {
        let after = self.after.map_or_else(|| "-".to_string(), |s| s.to_string());
        page_token::encode(Listing::JobLogs, Some(&format!("{}.{after}", self.attempt)))
    }

    fn is_past(self, sequence: u64) -> bool {
        self.after.is_some_and(|after| sequence <= after)
    }

    /// The cursor of a token; [`LogCursor::START`] for an empty one.
    pub fn decode(field: &str, token: &str) -> DomainResult<LogCursor> {
        let foreign = || DomainError::invalid(field, "is not a log cursor this server issued");
        let Some(text) = page_token::decode(Listing::JobLogs, token).map_err(|_| foreign())? else {
            return Ok(LogCursor::START);
        };
        let (attempt, sequence) = text.split_once('.').ok_or_else(foreign)?;
        let attempt: u32 = attempt.parse().map_err(|_| foreign())?;
        let after = match sequence {
            "-" => None,
            n => Some(n.parse::<u64>().map_err(|_| foreign())?),
        };
        if attempt == 0 {
            return Err(foreign());
        }
        Ok(LogCursor { attempt, after })
    }
}

/// What a stream sends.
pub struct LogRequest {
    pub job_id: String,
    pub cursor: LogCursor,
    pub follow: bool,
    /// Only lines holding these bytes; empty means everything.
    pub filter: Vec<u8>,
}

/// Spawns the task; the stream ends when it has sent what it must, when
/// the client goes, at shutdown, or with an error status.
pub fn spawn(
    engine: EngineHandle,
    request: LogRequest,
    stopping: CancellationToken,
) -> mpsc::Receiver<Result<pb::StreamJobLogsResponse, Status>> {
    let (tx, rx) = mpsc::channel(BUFFER);
    // Subscribed before the first read: output (or an end) committed after
    // it wakes the task.
    let wakes = Wakes { output: engine.subscribe_output(), changes: engine.subscribe_log() };
    let mut serving = engine.serving();
    tokio::spawn(async move {
        // A stream that ends OK has sent everything; one the server stops
        // ends UNAVAILABLE, so a follower resumes from its cursor elsewhere.
        let stopped = || Status::unavailable("the server is stopping; resume from the last cursor");
        tokio::select! {
            result = run(&engine, request, wakes, &tx) => {
                if let Err(e) = result {
                    let _ = tx.send(Err(to_status(e))).await;
                }
            }
            () = stopping.cancelled() => {
                let _ = tx.send(Err(stopped())).await;
            }
            () = async move {
                // The guard `wait_for` returns is not Send: dropped at once.
                let _ = serving.wait_for(|serving| !*serving).await.map(|_| ());
            } => {
                let _ = tx.send(Err(stopped())).await;
            }
            () = tx.closed() => {}
        }
    });
    rx
}

/// What wakes a follower: commits that stored output, and commits that
/// changed a job's state (the job may have ended without more output).
struct Wakes {
    output: watch::Receiver<u64>,
    changes: watch::Receiver<u64>,
}

async fn run(
    engine: &EngineHandle,
    request: LogRequest,
    mut wakes: Wakes,
    tx: &mpsc::Sender<Result<pb::StreamJobLogsResponse, Status>>,
) -> DomainResult<()> {
    let settings = engine.watch_settings();
    let mut cursor = request.cursor;
    let finder = memchr::memmem::Finder::new(&request.filter);
    // Where the chunks read so far end, once the cursor's attempt was read.
    let mut position: Option<Position> = None;
    loop {
        let read_at = tokio::time::Instant::now();
        // The job first: if it has ended, everything its agents sent is
        // stored by now (an agent's output comes before its result).
        let job = engine.get_job(&request.job_id).await?;
        let ended = job.state.is_terminal() || job.state == JobState::DeadLettered;
        loop {
            // The attempt's first read takes it whole (offsets count every
            // chunk before the cursor); later ones only what is new.
            let chunks = match (position, cursor.after) {
                (Some(ref p), Some(after)) if p.attempt == cursor.attempt => {
                    engine.logs_after(&request.job_id, cursor.attempt, after).await?
                }
                _ => engine.logs(&request.job_id, cursor.attempt).await?,
            };
            let start = match position {
                Some(ref p) if p.attempt == cursor.attempt => p.offset,
                _ => 0,
            };
            let (out, offset) = responses(&chunks, &mut cursor, &finder, start);
            position = Some(Position { attempt: cursor.attempt, offset });
            for response in out {
                if tx.send(Ok(response)).await.is_err() {
                    return Ok(());
                }
            }
            // A later attempt exists: this one's output is complete.
            if cursor.attempt < job.attempt {
                cursor = LogCursor { attempt: cursor.attempt + 1, after: None };
            } else {
                break;
            }
        }
        if !request.follow || ended {
            return Ok(());
        }
        // (The senders live as long as the engine handle this task holds:
        // `changed` does not fail; shutdown ends the task from `spawn`.)
        let woken = async {
            tokio::select! {
                _ = wakes.output.changed() => {}
                _ = wakes.changes.changed() => {}
            }
        };
        match settings.poll {
            Some(every) => tokio::select! {
                () = woken => {}
                () = tokio::time::sleep(every) => {}
            },
            None => woken.await,
        }
        // On a shared store each read is several requests: at most one per
        // interval, as for WatchQueue.
        if let Some(least) = settings.min_read_interval {
            tokio::time::sleep_until(read_at + least).await;
        }
    }
}

/// How far into an attempt's output the chunks read so far reach.
#[derive(Debug, Clone, Copy)]
struct Position {
    attempt: u32,
    offset: u64,
}

/// The responses for `chunks` (of `cursor`'s attempt, starting at byte
/// `offset` of its output) after the cursor, in order, and the offset
/// after them; moves `cursor` past them. Offsets count every chunk of the
/// attempt before, sent or not.
fn responses(
    chunks: &[LogChunk],
    cursor: &mut LogCursor,
    filter: &memchr::memmem::Finder<'_>,
    mut offset: u64,
) -> (Vec<pb::StreamJobLogsResponse>, u64) {
    let mut out = Vec::new();
    for chunk in chunks {
        let start = offset;
        offset = offset.saturating_add(chunk.data.len() as u64);
        if cursor.is_past(chunk.sequence) {
            continue;
        }
        cursor.after = Some(chunk.sequence);
        let (data, line_offsets) = if filter.needle().is_empty() {
            (chunk.data.clone(), Vec::new())
        } else {
            let mut kept = Vec::new();
            let mut at = Vec::new();
            let mut line_start = 0usize;
            for line in chunk.data.split_inclusive(|b| *b == b'\n') {
                if filter.find(line).is_some() {
                    at.push(start.saturating_add(line_start as u64));
                    kept.extend_from_slice(line);
                }
                line_start += line.len();
            }
            if at.is_empty() {
                continue;
            }
            (kept.into(), at)
        };
        out.push(pb::StreamJobLogsResponse {
            attempt: cursor.attempt,
            stream: if chunk.stderr { pb::LogStream::Stderr } else { pb::LogStream::Stdout } as i32,
            data,
            offset: start,
            line_offsets,
            sequence: chunk.sequence,
            receive_time: Some(to_timestamp(chunk.time)),
            agent_time: chunk.agent_time.map(to_timestamp),
            cursor: cursor.encode(),
        });
    }
    (out, offset)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    fn chunk(sequence: u64, stderr: bool, data: &str) -> LogChunk {
        LogChunk {
            agent_time: None,
            job_id: "j".into(),
            attempt: 1,
            sequence,
            stderr,
            data: bytes::Bytes::copy_from_slice(data.as_bytes()),
            time: SystemTime::UNIX_EPOCH,
        }
    }

    #[test]
    fn chunks_after_the_cursor_are_sent_with_their_offsets() {
        let chunks = [chunk(0, false, "one\n"), chunk(1, true, "oops\n"), chunk(2, false, "two\nthree\n")];
        let all = memchr::memmem::Finder::new(b"");
        let mut cursor = LogCursor { attempt: 1, after: Some(0) };
        let (sent, end) = responses(&chunks, &mut cursor, &all, 0);
        assert_eq!(sent.iter().map(|r| (r.sequence, r.offset)).collect::<Vec<_>>(), [(1, 4), (2, 9)]);
        assert_eq!(end, 19, "where the next read's chunks start");
        assert_eq!(sent[0].stream, pb::LogStream::Stderr as i32);
        assert_eq!(cursor, LogCursor { attempt: 1, after: Some(2) });
        assert_eq!(LogCursor::decode("cursor", &sent[1].cursor).ok(), Some(cursor));
        assert!(responses(&chunks, &mut cursor, &all, 0).0.is_empty(), "nothing twice");
        // A later read of only the new chunks continues the offsets.
        let last = [chunk(u64::MAX, false, "end\n")];
        let (more, _) = responses(&last, &mut cursor, &all, end);
        assert_eq!(more.iter().map(|r| r.offset).collect::<Vec<_>>(), [19], "continues where the last read ended");
        // The largest sequence an agent may choose is sent once too.
        assert!(responses(&last, &mut cursor, &all, end).0.is_empty(), "nothing twice");
        assert_eq!(LogCursor::decode("cursor", &cursor.encode()).ok(), Some(cursor));
    }

    #[test]
    fn a_filter_keeps_matching_lines_with_their_offsets() {
        let chunks = [chunk(0, false, "ok 1\nerror: a\nok 2\nerror: b"), chunk(1, false, "fine\n")];
        let mut cursor = LogCursor::START;
        let (sent, _) = responses(&chunks, &mut cursor, &memchr::memmem::Finder::new(b"error"), 0);
        assert_eq!(sent.len(), 1, "a chunk without a match is not sent");
        assert_eq!(&sent[0].data[..], b"error: a\nerror: b");
        assert_eq!(sent[0].line_offsets, [5, 19]);
        assert_eq!(cursor.after, Some(1), "the cursor passes unmatched chunks too");
    }

    #[test]
    fn foreign_cursors_are_refused() {
        assert_eq!(LogCursor::decode("cursor", "").ok(), Some(LogCursor::START));
        for bad in [
            "nope",
            &page_token::encode(Listing::Jobs, Some("1.2")),
            &page_token::encode(Listing::JobLogs, Some("0.1")),
            &page_token::encode(Listing::JobLogs, Some("1.")),
        ] {
            assert!(LogCursor::decode("cursor", bad).is_err(), "{bad}");
        }
        let token = page_token::encode(Listing::JobLogs, Some("x.1"));
        assert!(LogCursor::decode("cursor", &token).is_err());
    }
}
