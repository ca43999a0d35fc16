//! What a user of the SDK implements ([`JobHandler`]) and what it gets
//! ([`JobContext`]) and returns ([`JobResult`]).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tether::mask::{Masker, StreamMasker};
use tether::v1::{connect_request::Message, JobLog, JobProgress, JobRef, Priority};
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

use crate::state::{Shared, OUTPUT_BUDGET};

/// Largest log chunk the protocol allows per message.
pub const MAX_LOG_CHUNK: usize = 64 * 1024;

/// Runs jobs. One call per assigned attempt, concurrently up to the agent's
/// slots.
///
/// Closures `Fn(JobContext) -> impl Future<Output = JobResult>` implement it
/// too.
#[async_trait]
pub trait JobHandler: Send + Sync + 'static {
    /// Runs one attempt. Should return soon after `job.cancelled()` fires;
    /// a handler that ignores cancellation is dropped after the agent's
    /// `cancel_grace`.
    async fn run(&self, job: JobContext) -> JobResult;
}

#[async_trait]
impl<F, Fut> JobHandler for F
where
    F: Fn(JobContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = JobResult> + Send + 'static,
{
    async fn run(&self, job: JobContext) -> JobResult {
        (self)(job).await
    }
}

/// How an attempt ended, as the handler sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobResult {
    /// Done; `result` (at most 1 MiB) goes to the job's result.
    Succeeded {
        /// The result bytes.
        result: Bytes,
    },
    /// Failed; `retryable` lets the server try another attempt.
    Failed {
        /// What went wrong.
        error: String,
        /// Whether another attempt may succeed.
        retryable: bool,
        /// The exit code, when the job was a process.
        exit_code: Option<i32>,
    },
    /// Stopped because the job was cancelled.
    Cancelled,
}

impl JobResult {
    /// A success with `result`.
    pub fn success(result: impl Into<Bytes>) -> Self {
        Self::Succeeded { result: result.into() }
    }

    /// A failure another attempt may fix.
    pub fn retryable(error: impl Into<String>) -> Self {
        Self::Failed { error: error.into(), retryable: true, exit_code: None }
    }

    /// A failure no retry will fix.
    pub fn permanent(error: impl Into<String>) -> Self {
        Self::Failed { error: error.into(), retryable: false, exit_code: None }
    }
}

/// Which output stream a log chunk came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LogStream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

impl LogStream {
    fn to_proto(self) -> tether::v1::LogStream {
        match self {
            Self::Stdout => tether::v1::LogStream::Stdout,
            Self::Stderr => tether::v1::LogStream::Stderr,
        }
    }
}

/// One attempt of a job, handed to [`JobHandler::run`]. Cheap to clone, so
/// a handler can hand it to tasks it spawns.
#[derive(Clone)]
pub struct JobContext {
    inner: Arc<Inner>,
}

struct Inner {
    job: JobRef,
    queue: String,
    payload: Bytes,
    priority: i32,
    timeout: Option<Duration>,
    max_attempts: u32,
    token: CancellationToken,
    shared: Arc<Shared>,
    next_sequence: AtomicU64,
    /// Set (under the core lock) when JobFinished is built; later output
    /// would be refused by the server, so it is not sent.
    done: AtomicBool,
    /// The job's secrets (from its Assignment).
    secrets: BTreeMap<String, String>,
    /// Masks them out of output, result and error; `None` without secrets.
    masker: Option<Arc<Masker>>,
    /// Stdout's and stderr's maskers, which hold back a possible start of
    /// a secret until the next chunk shows whether it is one.
    streams: Mutex<[StreamMasker; 2]>,
}

/// The parts of an Assignment a [`JobContext`] is built from.
pub(crate) struct JobSpec {
    pub(crate) job: JobRef,
    pub(crate) queue: String,
    pub(crate) payload: Bytes,
    pub(crate) priority: i32,
    pub(crate) timeout: Option<Duration>,
    pub(crate) max_attempts: u32,
    pub(crate) secrets: BTreeMap<String, String>,
}

impl JobContext {
    pub(crate) fn new(spec: JobSpec, token: CancellationToken, shared: Arc<Shared>) -> Self {
        let masker = Arc::new(Masker::new(spec.secrets.values().map(String::as_str)));
        let streams = Mutex::new([StreamMasker::new(masker.clone()), StreamMasker::new(masker.clone())]);
        let masker = (!masker.is_empty()).then_some(masker);
        Self {
            inner: Arc::new(Inner {
                job: spec.job,
                queue: spec.queue,
                payload: spec.payload,
                priority: spec.priority,
                timeout: spec.timeout,
                max_attempts: spec.max_attempts,
                token,
                shared,
                next_sequence: AtomicU64::new(0),
                done: AtomicBool::new(false),
                secrets: spec.secrets,
                masker,
                streams,
            }),
        }
    }

    /// The job id.
    pub fn job_id(&self) -> &str {
        &self.inner.job.job_id
    }

    /// The attempt number.
    pub fn attempt(&self) -> u32 {
        self.inner.job.attempt
    }

    /// The attempt's fencing token.
    pub fn fencing_token(&self) -> u64 {
        self.inner.job.fencing_token
    }

    /// The attempt's full reference.
    pub fn job_ref(&self) -> &JobRef {
        &self.inner.job
    }

    /// The job's queue.
    pub fn queue(&self) -> &str {
        &self.inner.queue
    }

    /// The job's secrets, by name (sent only in its Assignment). Their
    /// values are masked out of what [`JobContext::log`] sends and out of
    /// the result and error.
    pub fn secrets(&self) -> &BTreeMap<String, String> {
        &self.inner.secrets
    }

    /// `data` with the job's secrets masked.
    pub(crate) fn masked(&self, data: &[u8]) -> Vec<u8> {
        match &self.inner.masker {
            Some(masker) => masker.mask(data),
            None => data.to_vec(),
        }
    }

    /// Sends what the stream maskers held back (the output has ended).
    pub(crate) async fn flush_masked(&self) {
        if self.inner.masker.is_none() {
            return;
        }
        let held = {
            let mut streams = self.inner.streams.lock().unwrap_or_else(PoisonError::into_inner);
            [streams[0].finish(), streams[1].finish()]
        };
        for (stream, data) in [LogStream::Stdout, LogStream::Stderr].into_iter().zip(held) {
            if !data.is_empty() {
                self.send_output(stream, Bytes::from(data)).await;
            }
        }
    }

    /// The job's payload.
    pub fn payload(&self) -> &Bytes {
        &self.inner.payload
    }

    /// The job's priority.
    pub fn priority(&self) -> Priority {
        Priority::try_from(self.inner.priority).unwrap_or(Priority::Unspecified)
    }

    /// The longest the attempt may run; the SDK enforces it by cancelling.
    pub fn timeout(&self) -> Option<Duration> {
        self.inner.timeout
    }

    /// Attempts the job gets in all.
    pub fn max_attempts(&self) -> u32 {
        self.inner.max_attempts
    }

    /// Resolves once the attempt is cancelled (server Cancel, timeout, or
    /// the attempt was taken away from this agent).
    pub fn cancelled(&self) -> WaitForCancellationFuture<'_> {
        self.inner.token.cancelled()
    }

    /// Whether the attempt has been cancelled.
    pub fn is_cancelled(&self) -> bool {
        self.inner.token.is_cancelled()
    }

    /// The attempt's cancellation token, for work spawned by the handler.
    pub fn cancellation_token(&self) -> CancellationToken {
        self.inner.token.clone()
    }

    /// Reports progress, `percent` within 0-100. Best effort: dropped while
    /// the agent is between streams.
    pub async fn progress(&self, percent: f64, message: impl Into<String>) {
        let message: String = message.into();
        // Progress text is the job's output too: its secrets are masked.
        let message = if self.inner.masker.is_some() {
            String::from_utf8_lossy(&self.masked(message.as_bytes())).into_owned()
        } else {
            message
        };
        let percent = if percent.is_nan() { 0.0 } else { percent.clamp(0.0, 100.0) };
        let Some(permit) = self.budget(message.len() + 64).await else {
            return;
        };
        let core = self.inner.shared.core();
        if self.inner.done.load(Ordering::Acquire) {
            return;
        }
        let job = Some(self.inner.job.clone());
        core.send_with_permit(Message::JobProgress(JobProgress { job, percent, message }), Some(permit));
    }

    /// Sends output, split into chunks of at most 64 KiB, each with the
    /// attempt's next sequence number. Waits when too much output is queued.
    /// Best effort: dropped while the agent is between streams.
    pub async fn log(&self, stream: LogStream, data: Bytes) {
        let data = match &self.inner.masker {
            None => data,
            Some(_) => {
                let index = usize::from(matches!(stream, LogStream::Stderr));
                let mut streams = self.inner.streams.lock().unwrap_or_else(PoisonError::into_inner);
                Bytes::from(streams[index].push(&data))
            }
        };
        self.send_output(stream, data).await;
    }

    async fn send_output(&self, stream: LogStream, data: Bytes) {
        let mut rest = data;
        while !rest.is_empty() {
            let chunk = rest.split_to(rest.len().min(MAX_LOG_CHUNK));
            let Some(permit) = self.budget(chunk.len()).await else {
                return;
            };
            let core = self.inner.shared.core();
            if self.inner.done.load(Ordering::Acquire) || !core.connected() {
                return;
            }
            // Numbered under the lock so sequence order is stream order.
            let sequence = self.inner.next_sequence.fetch_add(1, Ordering::Relaxed);
            let log = JobLog {
                job: Some(self.inner.job.clone()),
                stream: stream.to_proto() as i32,
                data: chunk,
                sequence,
                time: Some(tether::time::to_timestamp(std::time::SystemTime::now())),
            };
            core.send_with_permit(Message::JobLog(log), Some(permit));
        }
    }

    async fn budget(&self, bytes: usize) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let n = u32::try_from(bytes.clamp(1, OUTPUT_BUDGET)).unwrap_or(u32::MAX);
        // The semaphore is never closed; None would only mean it was.
        self.inner.shared.output_budget.clone().acquire_many_owned(n).await.ok()
    }

    /// Marks the attempt finished; the caller holds the core lock.
    pub(crate) fn mark_done(&self) {
        self.inner.done.store(true, Ordering::Release);
    }
}

impl std::fmt::Debug for JobContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobContext")
            .field("job", &self.inner.job)
            .field("queue", &self.inner.queue)
            .field("payload_len", &self.inner.payload.len())
            .field("cancelled", &self.is_cancelled())
            .finish()
    }
}
