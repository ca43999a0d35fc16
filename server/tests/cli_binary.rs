//! The `tether` binary's client commands run as a process: those that need
//! no server, and `tether jobs …` against a real `tether server` whose jobs
//! an in-process agent runs (a raw Connect stream that runs each job's
//! shell command, like the reference agent).

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tether::v1 as pb;
use tether::v1::agent_service_client::AgentServiceClient;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStderr};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// Upper bound for any single wait; a test that hits it failed.
const WAIT: Duration = Duration::from_secs(60);

/// Who the CLI says asks, through `TETHER_REQUESTED_BY`.
const REQUESTER: &str = "cli-test";

#[test]
fn shell_completions_are_printed() {
    for shell in ["bash", "zsh", "fish"] {
        let out = Command::new(env!("CARGO_BIN_EXE_tether")).args(["completions", shell]).output().expect("run tether");
        assert!(out.status.success(), "{shell}: {}", String::from_utf8_lossy(&out.stderr));
        let script = String::from_utf8_lossy(&out.stdout);
        assert!(script.contains("tether") && script.contains("pools"), "{shell} script lacks the commands");
    }
    let bad = Command::new(env!("CARGO_BIN_EXE_tether")).args(["completions", "cmd.exe"]).output().expect("run tether");
    assert_eq!(bad.status.code(), Some(2), "an unknown shell is a usage error");
}

/// A running `tether server` child process; killed when dropped, so a
/// failing test never leaves a server behind.
struct ServerProcess {
    child: Child,
    addr: SocketAddr,
}

impl ServerProcess {
    /// Starts the binary on a port-0 listener and waits for its
    /// "tether server listening" log line to learn the bound address.
    async fn start(data_dir: &Path) -> ServerProcess {
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tether"))
            .arg("server")
            .args(["--listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--log-format", "json"])
            .env("TETHER_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn the tether binary");
        let stderr = child.stderr.take().expect("piped stderr");
        let mut server = ServerProcess { child, addr: SocketAddr::from(([0, 0, 0, 0], 0)) };
        server.addr =
            tokio::time::timeout(WAIT, listening_addr(stderr)).await.expect("the server logs its address in time");
        server
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Runs `tether --server <this server> ARGS…` to completion.
    async fn tether(&self, args: &[&str]) -> Output {
        let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_tether"))
            .args(["--server", &self.url()])
            .args(args)
            .env_remove("TETHER_SERVER")
            .env_remove("TETHER_TOKEN")
            .env("TETHER_REQUESTED_BY", REQUESTER)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output();
        tokio::time::timeout(WAIT, run).await.unwrap_or_else(|_| panic!("tether {args:?} ends in time")).expect("run")
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// Reads JSON log lines until the listening line, then keeps draining stderr
/// in the background so the server never blocks on a full pipe.
async fn listening_addr(stderr: ChildStderr) -> SocketAddr {
    let mut lines = BufReader::new(stderr).lines();
    while let Some(line) = lines.next_line().await.expect("read server stderr") {
        let Ok(record) = serde_json::from_str::<serde_json::Value>(&line) else { continue };
        let fields = &record["fields"];
        if fields["message"].as_str() != Some("tether server listening") {
            continue;
        }
        let addr = fields["addr"].as_str().unwrap_or_else(|| panic!("no addr in {line}"));
        let addr: SocketAddr = addr.parse().unwrap_or_else(|e| panic!("bad addr {addr:?}: {e}"));
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        return addr;
    }
    panic!("the server exited before it listened");
}

/// What the CLI printed, for assertion messages.
fn shown(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The payload of a dashboard job: what the reference agent runs.
#[derive(serde::Deserialize)]
struct ShellJob {
    command: String,
    #[serde(default)]
    env: std::collections::HashMap<String, String>,
    #[serde(default)]
    workdir: String,
}

/// Connects an agent to the default pool that runs each assigned job's
/// command with `sh -c` and reports how it ended (protocol version 2: a job
/// is accepted and started in one message). Returns its agent id; the agent
/// lives until the server goes away.
async fn spawn_shell_agent(url: String, name: &str) -> String {
    let (outbound, rx) = mpsc::channel::<pb::ConnectRequest>(256);
    let send = |tx: &mpsc::Sender<pb::ConnectRequest>, message| {
        let tx = tx.clone();
        async move {
            let _ = tx.send(pb::ConnectRequest { message: Some(message) }).await;
        }
    };
    send(
        &outbound,
        pb::connect_request::Message::Hello(pb::Hello {
            name: name.into(),
            pool: "default".into(),
            slots: 2,
            version: "cli-test".into(),
            min_protocol_version: 2,
            max_protocol_version: 2,
            ..Default::default()
        }),
    )
    .await;
    // (`AgentServiceClient::connect` is the Connect call, not a dialer.)
    let channel = tonic::transport::Endpoint::from_shared(url).expect("url").connect().await.expect("dial");
    let mut client = AgentServiceClient::new(channel);
    let mut inbound = client.connect(ReceiverStream::new(rx)).await.expect("open the stream").into_inner();
    let welcome = match inbound.message().await.expect("stream ok").and_then(|m| m.message) {
        Some(pb::connect_response::Message::Welcome(welcome)) => welcome,
        other => panic!("expected a welcome, got {other:?}"),
    };
    let heartbeat_every = welcome
        .heartbeat_interval
        .as_ref()
        .and_then(tether::time::from_duration)
        .filter(|d| !d.is_zero())
        .unwrap_or(Duration::from_secs(5));
    let running: Arc<Mutex<Vec<pb::JobRef>>> = Arc::default();
    tokio::spawn(async move {
        let mut beat = tokio::time::interval(heartbeat_every);
        loop {
            tokio::select! {
                _ = beat.tick() => {
                    let running_jobs = running.lock().unwrap_or_else(|e| e.into_inner()).clone();
                    let heartbeat = pb::Heartbeat { running_jobs, ..Default::default() };
                    send(&outbound, pb::connect_request::Message::Heartbeat(heartbeat)).await;
                }
                message = inbound.message() => {
                    let Ok(Some(pb::ConnectResponse { message: Some(message) })) = message else { return };
                    let pb::connect_response::Message::Assignment(assignment) = message else { continue };
                    let Some(job) = assignment.job else { continue };
                    running.lock().unwrap_or_else(|e| e.into_inner()).push(job.clone());
                    let ack = pb::AssignmentAck { job: Some(job.clone()), accepted: true, started: true, ..Default::default() };
                    send(&outbound, pb::connect_request::Message::AssignmentAck(ack)).await;
                    let (outbound, running) = (outbound.clone(), running.clone());
                    tokio::spawn(async move {
                        let (finished, output) = run_shell_job(job.clone(), &assignment.payload).await;
                        // Its output first, as an agent streams it: stdout, then stderr.
                        let streams = [(pb::LogStream::Stdout, output.0), (pb::LogStream::Stderr, output.1)];
                        let chunks = streams.into_iter().filter(|(_, data)| !data.is_empty());
                        for (sequence, (stream, data)) in (0u64..).zip(chunks) {
                            let log = pb::JobLog { job: Some(job.clone()), stream: stream as i32, data: data.into(), sequence };
                            send(&outbound, pb::connect_request::Message::JobLog(log)).await;
                        }
                        running.lock().unwrap_or_else(|e| e.into_inner()).retain(|r| r != &job);
                        send(&outbound, pb::connect_request::Message::JobFinished(finished)).await;
                    });
                }
            }
        }
    });
    welcome.agent_id
}

/// Runs one job's command and says how it ended, with its stdout and
/// stderr.
async fn run_shell_job(job: pb::JobRef, payload: &[u8]) -> (pb::JobFinished, (Vec<u8>, Vec<u8>)) {
    let failed = |error: String, exit_code: i32| pb::JobFinished {
        job: Some(job.clone()),
        outcome: pb::JobOutcome::FailedRetryable as i32,
        error,
        exit_code,
        ..Default::default()
    };
    let spec: ShellJob = match serde_json::from_slice(payload) {
        Ok(spec) => spec,
        Err(e) => return (failed(format!("bad payload: {e}"), 0), Default::default()),
    };
    let mut command = tokio::process::Command::new("sh");
    command.arg("-c").arg(&spec.command).envs(&spec.env).stdin(Stdio::null()).kill_on_drop(true);
    if !spec.workdir.is_empty() {
        command.current_dir(&spec.workdir);
    }
    match command.output().await {
        Ok(out) if out.status.success() => {
            let finished = pb::JobFinished {
                job: Some(job.clone()),
                outcome: pb::JobOutcome::Succeeded as i32,
                result: out.stdout.clone().into(),
                ..Default::default()
            };
            (finished, (out.stdout, out.stderr))
        }
        Ok(out) => {
            let code = out.status.code().unwrap_or(0);
            (failed(format!("exited with code {code}"), code), (out.stdout, out.stderr))
        }
        Err(e) => (failed(format!("cannot run sh: {e}"), 0), Default::default()),
    }
}

/// The id a `create`/`retry` printed: its only line.
fn printed_id(out: &Output) -> String {
    let text = stdout(out);
    let id = text.trim();
    assert!(!id.is_empty() && !id.contains('\n'), "one id expected: {}", shown(out));
    id.to_string()
}

/// The status of a job, through `tether jobs get --output json`.
async fn status_of(server: &ServerProcess, id: &str) -> String {
    let out = server.tether(&["jobs", "get", id, "--output", "json"]).await;
    assert!(out.status.success(), "{}", shown(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    v["job"]["status"].as_str().unwrap_or_default().to_string()
}

#[tokio::test]
async fn jobs_run_and_are_shown_through_the_binary() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = ServerProcess::start(dir.path()).await;
    let agent_id = spawn_shell_agent(server.url(), "cli-runner").await;

    // create --wait: runs on the agent, prints the job, exit code 0.
    let out = server
        .tether(&[
            "jobs",
            "create",
            "--name",
            "greet",
            "--command",
            "test \"$GREETING\" = hello && test \"$(pwd)\" = /",
            "--env",
            "GREETING=hello",
            "--workdir",
            "/",
            "--wait",
        ])
        .await;
    assert_eq!(out.status.code(), Some(0), "{}", shown(&out));
    let details = stdout(&out);
    let id = details
        .lines()
        .find_map(|l| l.strip_prefix("ID:"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| panic!("no ID line: {}", shown(&out)));
    for want in ["Status:", "success", "Queued state:", "succeeded", "GREETING=hello", REQUESTER, &agent_id] {
        assert!(details.contains(want), "{want:?} in {}", shown(&out));
    }

    // get: details, the attempt and the history, oldest first.
    let out = server.tether(&["jobs", "get", &id]).await;
    assert_eq!(out.status.code(), Some(0), "{}", shown(&out));
    let text = stdout(&out);
    let positions: Vec<usize> = ["- → queued", "queued → claimed", "claimed → running", "running → succeeded"]
        .into_iter()
        .map(|step| text.find(step).unwrap_or_else(|| panic!("{step:?} in {}", shown(&out))))
        .collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "history in order: {text}");
    let created = text.lines().find(|l| l.contains("- → queued")).expect("creation row");
    assert!(created.contains(REQUESTER), "the creation is the requester's: {created}");
    let attempt = text.lines().find(|l| l.starts_with("1 ")).unwrap_or_else(|| panic!("attempt row: {text}"));
    assert!(attempt.contains(&agent_id) && attempt.contains("succeeded"), "{attempt}");
    assert!(!text.contains("waiting:"), "an ended job does not wait: {text}");

    // A failing command: create --wait exits 1 and shows the exit code.
    let out = server.tether(&["jobs", "create", "--name", "broken", "--command", "exit 7", "--wait"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", shown(&out));
    assert!(stdout(&out).contains("failed"), "{}", shown(&out));
    let failed_id = stdout(&out)
        .lines()
        .find_map(|l| l.strip_prefix("ID:"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| panic!("no ID line: {}", shown(&out)));
    let attempt = stdout(&out).lines().find(|l| l.starts_with("1 ")).map(str::to_string).unwrap_or_default();
    assert_eq!(attempt.split_whitespace().nth(5), Some("7"), "exit code column: {}", shown(&out));

    // retry: a new job, linked to the old one; with --wait it ends FAILED.
    let out = server.tether(&["jobs", "retry", &failed_id, "--requested-by", "bob"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", shown(&out));
    let retry_id = printed_id(&out);
    assert_ne!(retry_id, failed_id);
    assert!(out.stderr.is_empty(), "{}", shown(&out));
    // A repeated idempotency key gives the same new job, with a note.
    let keyed = ["jobs", "retry", &failed_id, "--idempotency-key", "retry-once"];
    let first = server.tether(&keyed).await;
    assert_eq!(first.status.code(), Some(0), "{}", shown(&first));
    let again = server.tether(&keyed).await;
    assert_eq!(again.status.code(), Some(0), "{}", shown(&again));
    assert_eq!(printed_id(&first), printed_id(&again));
    assert!(String::from_utf8_lossy(&again.stderr).starts_with("note: "), "{}", shown(&again));
    let keyed_id = printed_id(&first);
    let out = server.tether(&["jobs", "get", &retry_id]).await;
    let text = stdout(&out);
    let retry_of = text.lines().find(|l| l.starts_with("Retry of:")).unwrap_or_else(|| panic!("{}", shown(&out)));
    assert!(retry_of.ends_with(&failed_id), "{retry_of}");
    assert!(text.lines().any(|l| l.starts_with("Requested by:") && l.ends_with("bob")), "{text}");
    // The job runs as the queued job with the same id.
    for retry in [&retry_id, &keyed_id] {
        let out = server.tether(&["queue", "wait", retry]).await;
        assert_eq!(out.status.code(), Some(1), "the retry fails like the original: {}", shown(&out));
    }
    let out = server.tether(&["jobs", "retry", &id, "--wait", "--output", "json"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", shown(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["job"]["status"], "JOB_STATUS_SUCCESS", "{}", shown(&out));
    assert_eq!(v["job"]["retryOf"], id.as_str());

    // A job no agent can take: pending, and says why.
    let out =
        server.tether(&["jobs", "create", "--name", "stuck", "--command", "true", "--require-label", "os=plan9"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", shown(&out));
    let stuck = printed_id(&out);
    let out = server.tether(&["jobs", "get", &stuck]).await;
    assert_eq!(out.status.code(), Some(0), "{}", shown(&out));
    let text = stdout(&out);
    assert!(text.lines().any(|l| l.starts_with("Status:") && l.ends_with("pending")), "{text}");
    assert!(text.lines().any(|l| l.starts_with("waiting: ")), "{text}");
    assert!(text.contains("no attempts yet"), "{text}");

    // list filters by status.
    let out = server.tether(&["jobs", "list", "--status", "success"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", shown(&out));
    let text = stdout(&out);
    let header: Vec<&str> = text.lines().next().unwrap_or_default().split("   ").map(str::trim).collect();
    let header: Vec<&str> = header.into_iter().filter(|c| !c.is_empty()).collect();
    assert_eq!(header, ["ID", "NAME", "STATUS", "POOL", "REQUESTED BY", "AGE"]);
    let ids: Vec<&str> = text.lines().skip(1).filter_map(|l| l.split_whitespace().next()).collect();
    assert_eq!(ids.len(), 2, "the first job and its retry: {text}");
    assert!(ids.contains(&id.as_str()) && !ids.contains(&failed_id.as_str()) && !ids.contains(&stuck.as_str()));
    assert!(text.lines().skip(1).all(|l| l.contains(" success ")), "{text}");
    let out = server.tether(&["jobs", "list", "--status", "failed,pending", "--output", "json"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", shown(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let mut listed: Vec<&str> = v["jobs"].as_array().expect("jobs").iter().filter_map(|j| j["id"].as_str()).collect();
    listed.sort_unstable();
    let mut want = vec![failed_id.as_str(), retry_id.as_str(), keyed_id.as_str(), stuck.as_str()];
    want.sort_unstable();
    assert_eq!(listed, want);
    let out = server.tether(&["jobs", "list", "--status", "cancelled"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", shown(&out));
    assert!(stdout(&out).is_empty(), "{}", shown(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no jobs found"), "{}", shown(&out));

    // cancel: a pending job is cancelled; an ended one is refused.
    let out = server.tether(&["jobs", "cancel", &stuck, "--reason", "no plan9 agents"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", shown(&out));
    assert_eq!(stdout(&out).trim(), format!("job {stuck} cancelled"));
    assert_eq!(status_of(&server, &stuck).await, "JOB_STATUS_CANCELLED");
    let out = server.tether(&["jobs", "cancel", &id]).await;
    assert_eq!(out.status.code(), Some(1), "{}", shown(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.starts_with("error: FAILED_PRECONDITION: "), "{}", shown(&out));
    assert!(stderr.contains("hint: ") && stderr.contains("`tether jobs get ID`"), "{}", shown(&out));
    assert!(out.stdout.is_empty(), "{}", shown(&out));
    assert_eq!(status_of(&server, &id).await, "JOB_STATUS_SUCCESS", "the refused cancel changed nothing");

    // An unknown id: NOT_FOUND, exit code 1.
    let out = server.tether(&["jobs", "get", "no-such-job"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", shown(&out));
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("error: NOT_FOUND: "), "{}", shown(&out));

    // logs: the output as the agent sent it; -f exits with the outcome.
    let talk = server
        .tether(&["jobs", "create", "--name", "talk", "--command", "echo hello-log; echo warn-log >&2", "--wait"])
        .await;
    assert_eq!(talk.status.code(), Some(0), "{}", shown(&talk));
    let talk_id = stdout(&talk)
        .lines()
        .find_map(|l| l.strip_prefix("ID:"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| panic!("no ID line: {}", shown(&talk)));
    let out = server.tether(&["jobs", "logs", &talk_id]).await;
    assert_eq!(out.status.code(), Some(0), "{}", shown(&out));
    assert_eq!(stdout(&out), "hello-log\n", "{}", shown(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("warn-log"), "{}", shown(&out));
    let out = server.tether(&["jobs", "logs", &talk_id, "-f", "--filter", "warn", "--output", "json"]).await;
    assert_eq!(out.status.code(), Some(0), "the followed job succeeded: {}", shown(&out));
    let lines: Vec<serde_json::Value> =
        stdout(&out).lines().map(|l| serde_json::from_str(l).expect("one JSON object per line")).collect();
    assert_eq!(lines.len(), 1, "{}", shown(&out));
    assert_eq!(lines[0]["stream"], "LOG_STREAM_STDERR");
}

#[test]
fn bad_jobs_flags_are_usage_errors() {
    for args in [
        &["jobs", "list", "--status", "done"][..],
        &["jobs", "list", "--status", "success,queued"],
        &["jobs", "list", "--created-after", "yesterday"],
        &["jobs", "create", "--name", "n"],
        &["jobs", "create", "--name", "n", "--command", "true", "--env", "NOVALUE"],
    ] {
        // No server: a usage error is reported before any call.
        let out = Command::new(env!("CARGO_BIN_EXE_tether"))
            .args(["--server", "http://127.0.0.1:1"])
            .args(args)
            .env_remove("TETHER_SERVER")
            .output()
            .expect("run tether");
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", shown(&out));
        assert!(out.stdout.is_empty(), "{args:?}: {}", shown(&out));
    }
    let out = Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(["--server", "http://127.0.0.1:1", "jobs", "list", "--status", "done"])
        .output()
        .expect("run tether");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--status") && stderr.contains("pending, running, success, failed, cancelled"), "{stderr}");

    // Conflicting values clap cannot see are usage errors too.
    let out = Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(["--server", "http://127.0.0.1:1", "jobs", "create", "--name", "n", "--command", "true"])
        .args(["--env", "A=1", "--env", "A=2"])
        .output()
        .expect("run tether");
    assert_eq!(out.status.code(), Some(2), "{}", shown(&out));
}
