//! The reference agent's job runner: a shell command in its own process
//! group, output streamed as it comes, the group killed on cancel.
//!
//! A payload is either a JSON object
//! `{"command": "...", "env": {"K": "V"}, "workdir": "..."}` or, if it is not
//! one, the shell command itself.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio_util::sync::CancellationToken;

use crate::handler::{JobContext, JobHandler, JobResult, LogStream, MAX_LOG_CHUNK};

/// The most stdout kept as a succeeded job's result.
pub const RESULT_TAIL: usize = 64 * 1024;

/// A command to run with `sh -c`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct ShellCommand {
    /// The command line.
    pub command: String,
    /// Variables added to the agent's environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Where to run; the agent's working directory if unset.
    #[serde(default)]
    pub workdir: Option<PathBuf>,
}

/// Why a payload is not a command.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PayloadError {
    /// A JSON object that does not match `{"command", "env", "workdir"}`.
    #[error("invalid JSON payload: {0}")]
    Json(#[from] serde_json::Error),
    /// Neither JSON nor UTF-8 text.
    #[error("payload is neither a JSON object nor UTF-8 text")]
    NotUtf8,
    /// No command to run.
    #[error("payload has an empty command")]
    Empty,
}

impl ShellCommand {
    /// Parses a job payload (see the module docs).
    pub fn parse(payload: &[u8]) -> Result<Self, PayloadError> {
        let cmd = match serde_json::from_slice::<serde_json::Value>(payload) {
            Ok(v @ serde_json::Value::Object(_)) => serde_json::from_value::<ShellCommand>(v)?,
            Ok(serde_json::Value::String(command)) => ShellCommand { command, ..Default::default() },
            // Anything else ("true", "{ a; b; }", "echo hi") is shell text.
            _ => {
                let text = std::str::from_utf8(payload).map_err(|_| PayloadError::NotUtf8)?;
                ShellCommand { command: text.to_owned(), ..Default::default() }
            }
        };
        if cmd.command.trim().is_empty() {
            return Err(PayloadError::Empty);
        }
        Ok(cmd)
    }
}

/// Where a running command's output goes.
#[async_trait]
pub trait OutputSink: Send + Sync {
    /// Takes one chunk of output; may wait (backpressure).
    async fn output(&self, stream: LogStream, data: Bytes);
}

#[async_trait]
impl OutputSink for JobContext {
    async fn output(&self, stream: LogStream, data: Bytes) {
        self.log(stream, data).await;
    }
}

/// How a command ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShellOutput {
    /// The exit code, if it exited.
    pub exit_code: Option<i32>,
    /// The signal that killed it, if one did.
    pub signal: Option<i32>,
    /// The last [`RESULT_TAIL`] bytes of stdout.
    pub stdout_tail: Bytes,
    /// It was stopped because the job was cancelled.
    pub cancelled: bool,
}

impl ShellOutput {
    /// Exit 0 succeeds with the stdout tail; cancellation is `Cancelled`;
    /// anything else is a retryable failure.
    pub fn into_result(self) -> JobResult {
        if self.cancelled {
            return JobResult::Cancelled;
        }
        match (self.exit_code, self.signal) {
            (Some(0), _) => JobResult::Succeeded { result: self.stdout_tail },
            (Some(code), _) => {
                JobResult::Failed { error: format!("exited with code {code}"), retryable: true, exit_code: Some(code) }
            }
            (None, sig) => JobResult::Failed {
                error: format!("killed by signal {}", sig.unwrap_or(0)),
                retryable: true,
                exit_code: None,
            },
        }
    }
}

/// Runs `cmd` with `sh -c` in a new process group, streaming its output to
/// `sink`. On `cancel` the group gets SIGTERM, then SIGKILL after
/// `kill_grace`. When `sh` exits, whatever it left running in its group is
/// killed too, so a job's processes never outlive it.
pub async fn run_command(
    cmd: &ShellCommand,
    sink: &dyn OutputSink,
    cancel: &CancellationToken,
    kill_grace: Duration,
) -> std::io::Result<ShellOutput> {
    let mut command = tokio::process::Command::new("sh");
    command
        .arg("-c")
        .arg(&cmd.command)
        .envs(&cmd.env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    if let Some(dir) = &cmd.workdir {
        command.current_dir(dir);
    }
    let mut child = command.spawn()?;
    let group = child.id().and_then(|pid| i32::try_from(pid).ok()).map(ProcessGroup::register);
    let pgid = group.as_ref().map(|g| g.0);

    let mut tail = Tail::default();
    let stdout = pump(child.stdout.take(), LogStream::Stdout, sink, Some(&mut tail));
    let stderr = pump(child.stderr.take(), LogStream::Stderr, sink, None);
    let wait = async {
        let ended = tokio::select! {
            status = child.wait() => (status, false),
            _ = cancel.cancelled() => {
                signal_group(pgid, libc::SIGTERM);
                let status = tokio::select! {
                    status = child.wait() => status,
                    _ = tokio::time::sleep(kill_grace) => {
                        signal_group(pgid, libc::SIGKILL);
                        child.wait().await
                    }
                };
                (status, true)
            }
        };
        // Leftover background processes would hold the pipes open forever.
        signal_group(pgid, libc::SIGKILL);
        ended
    };
    let ((), (), (status, cancelled)) = tokio::join!(stdout, stderr, wait);
    let status = status?;
    use std::os::unix::process::ExitStatusExt;
    Ok(ShellOutput { exit_code: status.code(), signal: status.signal(), stdout_tail: tail.into_bytes(), cancelled })
}

async fn pump<R: AsyncRead + Unpin>(
    reader: Option<R>,
    stream: LogStream,
    sink: &dyn OutputSink,
    mut tail: Option<&mut Tail>,
) {
    let Some(mut reader) = reader else { return };
    let mut buf = BytesMut::new();
    loop {
        buf.reserve(MAX_LOG_CHUNK);
        match reader.read_buf(&mut buf).await {
            Ok(0) => return,
            Ok(_) => {
                let chunk = buf.split().freeze();
                if let Some(tail) = tail.as_deref_mut() {
                    tail.push(&chunk);
                }
                sink.output(stream, chunk).await;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// The last [`RESULT_TAIL`] bytes written.
#[derive(Default)]
struct Tail(Vec<u8>);

impl Tail {
    fn push(&mut self, data: &[u8]) {
        self.0.extend_from_slice(data);
        if self.0.len() > RESULT_TAIL {
            let excess = self.0.len() - RESULT_TAIL;
            self.0.drain(..excess);
        }
    }

    fn into_bytes(self) -> Bytes {
        Bytes::from(self.0)
    }
}

/// Process groups of running commands, so a hard exit can kill them all.
static GROUPS: Mutex<BTreeSet<i32>> = Mutex::new(BTreeSet::new());

/// A live process group; dropping it (e.g. when the handler is dropped
/// mid-run) kills the group.
struct ProcessGroup(i32);

impl ProcessGroup {
    fn register(pgid: i32) -> Self {
        GROUPS.lock().unwrap_or_else(PoisonError::into_inner).insert(pgid);
        Self(pgid)
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        GROUPS.lock().unwrap_or_else(PoisonError::into_inner).remove(&self.0);
        signal_group(Some(self.0), libc::SIGKILL);
    }
}

/// SIGKILLs every process group started by [`run_command`] that is still
/// running; for an agent exiting without draining.
pub fn kill_all_process_groups() {
    let groups = GROUPS.lock().unwrap_or_else(PoisonError::into_inner);
    for &pgid in groups.iter() {
        signal_group(Some(pgid), libc::SIGKILL);
    }
}

fn signal_group(pgid: Option<i32>, signal: libc::c_int) {
    // Only positive ids: kill(0 or -1, ...) would hit our own group or
    // every process we may signal.
    if let Some(pgid) = pgid.filter(|&p| p > 1) {
        // SAFETY: kill(2) has no memory-safety preconditions; a group that
        // is already gone just yields ESRCH.
        unsafe {
            libc::kill(-pgid, signal);
        }
    }
}

/// The reference agent's [`JobHandler`]: runs each payload as a shell
/// command (see the module docs).
#[derive(Clone, Debug)]
pub struct ShellHandler {
    /// Time between SIGTERM and SIGKILL on cancel.
    pub kill_grace: Duration,
}

impl Default for ShellHandler {
    fn default() -> Self {
        Self { kill_grace: Duration::from_secs(5) }
    }
}

#[async_trait]
impl JobHandler for ShellHandler {
    async fn run(&self, job: JobContext) -> JobResult {
        let mut cmd = match ShellCommand::parse(job.payload()) {
            Ok(cmd) => cmd,
            Err(e) => return JobResult::permanent(e.to_string()),
        };
        // Secrets are environment variables of the command, like env.
        cmd.env.extend(job.secrets().iter().map(|(k, v)| (k.clone(), v.clone())));
        let cancel = job.cancellation_token();
        match run_command(&cmd, &job, &cancel, self.kill_grace).await {
            Ok(output) => output.into_result(),
            Err(e) => JobResult::retryable(format!("could not run sh: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Collects output and signals the first chunk.
    #[derive(Default)]
    struct Collect(Mutex<Vec<(LogStream, Bytes)>>, tokio::sync::Notify);

    #[async_trait]
    impl OutputSink for Collect {
        async fn output(&self, stream: LogStream, data: Bytes) {
            self.0.lock().unwrap_or_else(PoisonError::into_inner).push((stream, data));
            self.1.notify_one();
        }
    }

    impl Collect {
        fn text(&self, stream: LogStream) -> String {
            let chunks = self.0.lock().unwrap_or_else(PoisonError::into_inner);
            let bytes: Vec<u8> = chunks.iter().filter(|(s, _)| *s == stream).flat_map(|(_, d)| d.to_vec()).collect();
            String::from_utf8_lossy(&bytes).into_owned()
        }
    }

    #[test]
    fn parses_json_and_plain_payloads() {
        let json = br#"{"command": "make test", "env": {"A": "1"}, "workdir": "/tmp"}"#;
        let cmd = ShellCommand::parse(json).expect("json payload");
        assert_eq!(cmd.command, "make test");
        assert_eq!(cmd.env.get("A").map(String::as_str), Some("1"));
        assert_eq!(cmd.workdir, Some(PathBuf::from("/tmp")));

        assert_eq!(ShellCommand::parse(b"echo hi").expect("plain").command, "echo hi");
        assert_eq!(ShellCommand::parse(b"true").expect("json bool is shell").command, "true");
        assert_eq!(ShellCommand::parse(b"{ echo a; }").expect("group").command, "{ echo a; }");
        assert_eq!(ShellCommand::parse(br#""echo quoted""#).expect("json string").command, "echo quoted");

        assert!(matches!(ShellCommand::parse(br#"{"env": {}}"#), Err(PayloadError::Json(_))));
        assert!(matches!(ShellCommand::parse(b"   "), Err(PayloadError::Empty)));
        assert!(matches!(ShellCommand::parse(&[0xff, 0xfe]), Err(PayloadError::NotUtf8)));
    }

    #[tokio::test]
    async fn runs_sh_and_streams_output() {
        let sink = Collect::default();
        let cmd = ShellCommand::parse(b"echo hi; echo err >&2; exit 3").expect("payload");
        let out = run_command(&cmd, &sink, &CancellationToken::new(), Duration::from_secs(5)).await.expect("ran");
        assert_eq!(out.exit_code, Some(3));
        assert!(!out.cancelled);
        assert_eq!(sink.text(LogStream::Stdout), "hi\n");
        assert_eq!(sink.text(LogStream::Stderr), "err\n");
        assert_eq!(
            out.into_result(),
            JobResult::Failed { error: "exited with code 3".into(), retryable: true, exit_code: Some(3) }
        );
    }

    #[tokio::test]
    async fn success_returns_stdout_tail_with_env_and_workdir() {
        let sink = Collect::default();
        let dir = std::env::temp_dir();
        let json = serde_json::json!({"command": "printf '%s:' \"$GREETING\"; pwd", "env": {"GREETING": "hello"}, "workdir": dir});
        let cmd = ShellCommand::parse(json.to_string().as_bytes()).expect("payload");
        let out = run_command(&cmd, &sink, &CancellationToken::new(), Duration::from_secs(5)).await.expect("ran");
        let canonical = dir.canonicalize().expect("temp dir");
        let expected = format!("hello:{}\n", canonical.display());
        assert_eq!(out.into_result(), JobResult::success(expected));
    }

    #[tokio::test]
    async fn long_output_keeps_only_the_tail() {
        let sink = Collect::default();
        let cmd = ShellCommand::parse(b"head -c 200000 /dev/zero | tr '\\0' a; printf END").expect("payload");
        let out = run_command(&cmd, &sink, &CancellationToken::new(), Duration::from_secs(5)).await.expect("ran");
        assert_eq!(out.stdout_tail.len(), RESULT_TAIL);
        assert!(out.stdout_tail.ends_with(b"aaaEND"));
        assert_eq!(sink.text(LogStream::Stdout).len(), 200_003);
    }

    /// Runs `script`, cancels it once it printed something, returns how
    /// it ended and how long the cancel took.
    async fn cancel_after_first_output(script: &[u8], grace: Duration) -> (ShellOutput, Duration) {
        let sink = Collect::default();
        let cancel = CancellationToken::new();
        let cmd = ShellCommand::parse(script).expect("payload");
        let run = run_command(&cmd, &sink, &cancel, grace);
        tokio::pin!(run);
        tokio::select! {
            _ = sink.1.notified() => cancel.cancel(),
            out = &mut run => panic!("ended before cancel: {out:?}"),
        }
        let at = std::time::Instant::now();
        let out = run.await.expect("ran");
        (out, at.elapsed())
    }

    #[tokio::test]
    async fn cancel_kills_the_whole_group() {
        // The background sleep would keep stdout open if it survived.
        let (out, took) = cancel_after_first_output(b"sleep 30 & echo started; wait", Duration::from_secs(5)).await;
        assert!(out.cancelled);
        assert!(took < Duration::from_secs(5), "{took:?}");
        assert_eq!(out.into_result(), JobResult::Cancelled);
    }

    #[tokio::test]
    async fn sigkill_follows_an_ignored_sigterm() {
        let grace = Duration::from_millis(200);
        let (out, took) = cancel_after_first_output(b"trap '' TERM; echo ready; sleep 30", grace).await;
        assert!(out.cancelled);
        assert_eq!(out.signal, Some(libc::SIGKILL));
        assert!(took >= grace, "{took:?}");
    }
}
