//! The `tether` binary's client commands run as a process: those that need
//! no server, and `tether jobs …`, `tether envs …` and `tether deploy …`
//! against a real `tether server` whose jobs an in-process agent runs (a
//! raw Connect stream that runs each job's shell command, like the
//! reference agent).

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

/// Connects an agent to `pool` that runs each assigned job's command with
/// `sh -c` and reports how it ended (protocol version 2: a job is accepted
/// and started in one message). Returns its agent id; the agent lives until
/// the server goes away.
async fn spawn_shell_agent(url: String, name: &str, pool: &str) -> String {
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
            pool: pool.into(),
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
                            let log = pb::JobLog { job: Some(job.clone()), stream: stream as i32, data: data.into(), sequence, time: None };
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
    let agent_id = spawn_shell_agent(server.url(), "cli-runner", "default").await;

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

/// The value of a `Key:` line of a details table.
fn detail(out: &Output, key: &str) -> String {
    let prefix = format!("{key}:");
    stdout(out)
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| panic!("no {key:?} line: {}", shown(out)))
}

/// The cells of a list table's line, split on the column gaps (cells may
/// hold single spaces).
fn cells(line: &str) -> Vec<&str> {
    line.split("   ").map(str::trim).filter(|c| !c.is_empty()).collect()
}

#[tokio::test]
async fn deployments_roll_out_promote_and_roll_back_through_the_binary() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = ServerProcess::start(dir.path()).await;
    let out = server.tether(&["pools", "create", "deployers"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", shown(&out));
    // The rollouts run in the environments' pool, so only this agent can
    // take them.
    let agent_id = spawn_shell_agent(server.url(), "deploy-runner", "deployers").await;

    // envs put: production first (promote_to must exist), then staging.
    let out = server.tether(&["envs", "put", "production", "--pool", "deployers"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", shown(&out));
    assert_eq!(
        stdout(&out).trim(),
        "environment production created: pool deployers, promotes to nowhere, auto-rollback off"
    );
    let put_staging = ["envs", "put", "staging", "--pool", "deployers", "--promote-to", "production"];
    let out = server.tether(&put_staging).await;
    assert_eq!(out.status.code(), Some(0), "{}", shown(&out));
    assert!(
        stdout(&out).starts_with("environment staging created: pool deployers, promotes to production"),
        "{}",
        shown(&out)
    );
    let out = server.tether(&put_staging).await;
    assert!(stdout(&out).starts_with("environment staging replaced: "), "{}", shown(&out));
    let out = server.tether(&["envs", "put", "production", "--pool", "deployers", "--promote-to", "staging"]).await;
    assert_eq!(out.status.code(), Some(1), "a cycle is refused: {}", shown(&out));
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("error: FAILED_PRECONDITION: "), "{}", shown(&out));
    let out = server.tether(&["envs", "put", "qa", "--pool", "no-such-pool"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", shown(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.starts_with("error: NOT_FOUND: ") && stderr.contains("`tether pools list`"), "{}", shown(&out));

    // envs list: a table by name, and JSON.
    let out = server.tether(&["envs", "list"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", shown(&out));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(cells(lines[0]), ["NAME", "POOL", "PROMOTE TO", "AUTO ROLLBACK", "AGE"], "{text}");
    assert_eq!(cells(lines[1])[..4], ["production", "deployers", "-", "no"], "{text}");
    assert_eq!(cells(lines[2])[..4], ["staging", "deployers", "production", "no"], "{text}");
    let out = server.tether(&["envs", "list", "--output", "json"]).await;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["environments"][1]["promoteTo"], "production", "{}", shown(&out));

    // Nothing succeeded in production yet: nothing to roll back.
    let out = server.tether(&["deploy", "rollback", "api", "--env", "production"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", shown(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.starts_with("error: FAILED_PRECONDITION: ") && stderr.contains("nothing to roll back"), "{stderr}");
    assert!(stderr.contains("hint: ") && stderr.contains("tether deploy history"), "{stderr}");
    assert!(out.stdout.is_empty(), "{}", shown(&out));

    // create --wait: the rollout runs on the pool's agent with its vars and
    // the TETHER_DEPLOY_* variables, then the deployment is shown.
    let rollout = r#"test "$TETHER_DEPLOY_SERVICE" = api && test "$TETHER_DEPLOY_VERSION" = "$EXPECT" && test "$GREETING" = hi && test -n "$TETHER_DEPLOY_ID""#;
    let create_v1 = [
        "deploy",
        "create",
        "api",
        "v1",
        "--env",
        "staging",
        "--command",
        rollout,
        "--var",
        "GREETING=hi",
        "--var",
        "EXPECT=v1",
        "--reason",
        "first release",
        "--wait",
    ];
    let out = server.tether(&create_v1).await;
    assert_eq!(out.status.code(), Some(0), "{}", shown(&out));
    let v1_staging = detail(&out, "ID");
    assert!(v1_staging.starts_with("api/"), "{v1_staging}");
    assert_eq!(detail(&out, "State"), "succeeded");
    assert_eq!(detail(&out, "Environment"), "staging");
    assert_eq!(detail(&out, "Trigger"), "create");
    assert_eq!(detail(&out, "Requested by"), REQUESTER);
    assert_eq!(detail(&out, "Reason"), "first release");
    let job = detail(&out, "Job");
    // The rollout is a dashboard job that ran on the pool's agent.
    let job_out = server.tether(&["jobs", "get", &job]).await;
    assert_eq!(detail(&job_out, "Status"), "success", "{}", shown(&job_out));
    assert_eq!(detail(&job_out, "Pool"), "deployers");
    assert!(stdout(&job_out).contains(&agent_id), "{}", shown(&job_out));

    // One good version in staging: still nothing to roll back to.
    let out = server.tether(&["deploy", "rollback", "api", "--env", "staging"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", shown(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing to roll back to"), "{}", shown(&out));

    // A release never changes: another rollout for v1 is refused.
    let out = server.tether(&["deploy", "create", "api", "v1", "--env", "staging", "--command", "true"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", shown(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.starts_with("error: ALREADY_EXISTS: ") && stderr.contains("--command"), "{stderr}");
    let out = server.tether(&["deploy", "create", "api", "v1", "--env", "nowhere"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", shown(&out));
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("error: NOT_FOUND: "), "{}", shown(&out));

    // promote --wait: the same release in production.
    let out = server.tether(&["deploy", "promote", &v1_staging, "--wait"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", shown(&out));
    let v1_production = detail(&out, "ID");
    assert_eq!(detail(&out, "Environment"), "production");
    assert_eq!((detail(&out, "Version"), detail(&out, "State")), ("v1".to_string(), "succeeded".to_string()));
    assert_eq!(detail(&out, "Trigger"), "promote");
    assert_eq!(detail(&out, "Promoted from"), v1_staging);
    // Production promotes nowhere.
    let out = server.tether(&["deploy", "promote", &v1_production]).await;
    assert_eq!(out.status.code(), Some(1), "{}", shown(&out));
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("error: FAILED_PRECONDITION: "), "{}", shown(&out));

    // v2 through staging (JSON) and, without --wait, on to production.
    let create_v2 = [
        "deploy",
        "create",
        "api",
        "v2",
        "-e",
        "staging",
        "--command",
        rollout,
        "--var",
        "GREETING=hi",
        "--var",
        "EXPECT=v2",
        "--wait",
        "--output",
        "json",
    ];
    let out = server.tether(&create_v2).await;
    assert_eq!(out.status.code(), Some(0), "{}", shown(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["deployment"]["state"], "DEPLOYMENT_STATE_SUCCEEDED", "{}", shown(&out));
    assert_eq!(v["deployment"]["rollout"]["env"]["GREETING"], "hi");
    let v2_staging = v["deployment"]["id"].as_str().expect("id").to_string();
    let out = server.tether(&["deploy", "promote", &v2_staging, "--reason", "green in staging"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", shown(&out));
    let v2_production = printed_id(&out);
    let wait_v2 = async {
        loop {
            let out = server.tether(&["deploy", "get", &v2_production, "--output", "json"]).await;
            assert_eq!(out.status.code(), Some(0), "{}", shown(&out));
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
            if v["deployment"]["state"] == "DEPLOYMENT_STATE_SUCCEEDED" {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(WAIT, wait_v2).await.expect("v2 reaches production");

    // rollback --wait: production goes back to v1; v2 is rolled back.
    let out =
        server.tether(&["deploy", "rollback", "api", "--env", "production", "--reason", "errors up", "--wait"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", shown(&out));
    let headline = stdout(&out).lines().next().unwrap_or_default().to_string();
    assert!(headline.starts_with("api in production: rolled back from v2 to v1 (deployment api/"), "{}", shown(&out));
    let rollback_id = detail(&out, "ID");
    let rollback_job = detail(&out, "Job");
    assert!(headline.contains(&rollback_id), "{headline}");
    assert_eq!((detail(&out, "Version"), detail(&out, "State")), ("v1".to_string(), "succeeded".to_string()));
    assert_eq!((detail(&out, "Trigger"), detail(&out, "Rollback of")), ("rollback".to_string(), v2_production.clone()));
    let out = server.tether(&["deploy", "get", &v2_production]).await;
    assert_eq!(detail(&out, "State"), "rolled-back", "{}", shown(&out));
    // v2 is marked bad: deploying it again is refused.
    let out = server.tether(&["deploy", "create", "api", "v2", "--env", "staging"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", shown(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("marked bad"), "{}", shown(&out));

    // history: every change, newest deployment first, each oldest first.
    let out = server.tether(&["deploy", "history", "api", "--env", "production"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", shown(&out));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        cells(lines[0]),
        ["TIME", "DEPLOYMENT", "VERSION", "ENVIRONMENT", "FROM → TO", "ACTOR", "JOB", "REASON"],
        "{text}"
    );
    let rows: Vec<Vec<&str>> = lines[1..].iter().map(|l| cells(l)).collect();
    assert!(rows.iter().all(|r| r[3] == "production"), "{text}");
    let of = |id: &str| -> Vec<&str> { rows.iter().filter(|r| r[1] == id).map(|r| r[4]).collect() };
    let run = ["- → pending", "pending → queued", "queued → in-progress", "in-progress → succeeded"];
    assert_eq!(of(&rollback_id), run, "{text}");
    assert_eq!(of(&v2_production)[..4], run, "{text}");
    assert_eq!(of(&v2_production)[4..], ["succeeded → rolled-back"], "{text}");
    assert_eq!(of(&v1_production), run, "{text}");
    let first = |id: &str| rows.iter().position(|r| r[1] == id).unwrap_or(usize::MAX);
    assert!(first(&rollback_id) < first(&v2_production) && first(&v2_production) < first(&v1_production), "{text}");
    let rolled = rows.iter().find(|r| r[4] == "succeeded → rolled-back").expect("rollback row");
    assert_eq!((rolled[5], rolled[7]), (format!("user:{REQUESTER}").as_str(), "errors up"), "{text}");
    let started = rows.iter().find(|r| r[1] == rollback_id && r[4] == "pending → queued").expect("queued row");
    assert_eq!(started[6], rollback_job, "the JOB column names the rollout job: {text}");
    let out = server.tether(&["deploy", "history", "api", "--deployment", &v1_staging, "--output", "json"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", shown(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let events = v["events"].as_array().expect("events");
    assert_eq!(events.len(), 4, "{}", shown(&out));
    assert!(events.iter().all(|e| e["deploymentId"] == v1_staging.as_str() && e["environment"] == "staging"));
    assert_eq!(events[3]["toState"], "DEPLOYMENT_STATE_SUCCEEDED");

    // summary: the service's deployments are counted (the figures come
    // from records the rollouts wrote, so they are there already).
    let out = server.tether(&["summary", "--output", "json"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", shown(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let api = v["services"].as_array().and_then(|s| s.iter().find(|x| x["service"] == "api").cloned());
    assert!(api.is_some_and(|api| api["badVersions"] == 1), "{}", shown(&out));
    let out = server.tether(&["summary"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", shown(&out));
    assert!(stdout(&out).lines().any(|l| l.starts_with("api ")), "{}", shown(&out));

    // list: newest first, filtered by environment; JSON holds them all.
    let out = server.tether(&["deploy", "list", "api", "--env", "production"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", shown(&out));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        cells(lines[0]),
        ["ID", "VERSION", "ENVIRONMENT", "STATE", "TRIGGER", "JOB", "REQUESTED BY", "AGE"],
        "{text}"
    );
    let listed: Vec<(&str, &str, &str, &str)> =
        lines[1..].iter().map(|l| cells(l)).map(|c| (c[0], c[1], c[3], c[4])).collect();
    assert_eq!(
        listed,
        [
            (rollback_id.as_str(), "v1", "succeeded", "rollback"),
            (v2_production.as_str(), "v2", "rolled-back", "promote"),
            (v1_production.as_str(), "v1", "succeeded", "promote"),
        ],
        "{text}"
    );
    let out = server.tether(&["deploy", "list", "api", "--page-size", "2", "--output", "json"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", shown(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["deployments"].as_array().map(Vec::len), Some(2), "{}", shown(&out));
    assert!(v["nextPageToken"].as_str().is_some_and(|t| !t.is_empty()), "{}", shown(&out));
    let out = server.tether(&["deploy", "list", "api", "--page-size", "2", "--all", "--output", "json"]).await;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["deployments"].as_array().map(Vec::len), Some(5), "{}", shown(&out));

    // A failing rollout: --wait exits 1 and shows why.
    let out =
        server.tether(&["deploy", "create", "api", "v3", "--env", "staging", "--command", "exit 3", "--wait"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", shown(&out));
    assert_eq!(detail(&out, "State"), "failed");
    assert!(detail(&out, "Error").contains("failed"), "{}", shown(&out));
    let out = server.tether(&["deploy", "get", "api/no-such-deployment"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", shown(&out));
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("error: NOT_FOUND: "), "{}", shown(&out));
}

#[test]
fn bad_deploy_and_envs_flags_are_usage_errors() {
    let dir = tempfile::tempdir().expect("temp dir");
    let empty_script = dir.path().join("empty.sh");
    std::fs::write(&empty_script, "\n").expect("write");
    let empty_script = empty_script.to_string_lossy().into_owned();
    for args in [
        &["deploy", "create", "api", "v1"][..],
        &["deploy", "create", "api", "v1", "--env", "staging", "--var", "A=1"],
        &["deploy", "create", "api", "v1", "--env", "staging", "--command", "x", "--script-file", "f.sh"],
        &["deploy", "create", "api", "v1", "--env", "staging", "--command", "x", "--timeout", "10"],
        &["deploy", "create", "api", "v1", "--env", "staging", "--command", "x", "--var", "NOVALUE"],
        &["deploy", "create", "api", "v1", "--env", "staging", "--command", "x", "--var", "A=1", "--var", "A=2"],
        &["deploy", "create", "api", "v1", "--env", "staging", "--command", " "],
        &["deploy", "create", "api", "v1", "--env", "staging", "--script-file", &empty_script],
        &["deploy", "rollback", "api"],
        &["deploy", "list", "api", "--page-size", "0"],
        &["deploy", "history"],
        &["envs", "put", "staging"],
        &["envs", "put", "staging", "--pool", "p", "--auto-rollback", "maybe"],
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
        .args(["--server", "http://127.0.0.1:1", "deploy", "create", "api", "v1", "--env", "s", "--workdir", "/"])
        .output()
        .expect("run tether");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--workdir") && stderr.contains("--command"), "{stderr}");
}
