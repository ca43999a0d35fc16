//! Job secrets end to end: sent only in the Assignment to the agent that
//! runs the attempt, masked (plain, base64, URL-encoded) in the output by
//! the reference agent and again by the server for an agent that does not
//! mask, never in GetJob, ListJobs, the queued job or its events, and not
//! in clear in the data directory. Runs on either backend
//! (`TETHER_TEST_STORE`).

use base64::Engine as _;
use prost::Message as _;
use tether::v1 as pb;
use tether::v1::dashboard_service_client::DashboardServiceClient;
use tether_agent_sdk::shell::ShellHandler;
use tether_agent_sdk::{Agent, AgentConfig};
use tether_tests::{hello, DataDir, Options, RawAgent, TestServer, WAIT};
use tonic::transport::Channel;
use tonic::Code;

const SECRET: &str = "s3cr3t-value!";

fn with_secrets(command: &str) -> pb::CreateJobRequest {
    pb::CreateJobRequest {
        name: "deploy".into(),
        command: command.into(),
        secrets: [("TOKEN".to_string(), SECRET.to_string()), ("SHORT".to_string(), "ab".to_string())].into(),
        ..Default::default()
    }
}

/// Every chunk of the job's output, together, and whether every chunk
/// carried the agent's time.
async fn output(d: &mut DashboardServiceClient<Channel>, id: &str) -> String {
    output_and_times(d, id).await.0
}

async fn output_and_times(d: &mut DashboardServiceClient<Channel>, id: &str) -> (String, bool) {
    let mut stream = d
        .stream_job_logs(pb::StreamJobLogsRequest { id: id.into(), follow: true, ..Default::default() })
        .await
        .expect("logs")
        .into_inner();
    let mut all = Vec::new();
    let mut timed = true;
    while let Some(chunk) = tokio::time::timeout(WAIT, stream.message()).await.expect("in time").expect("chunk") {
        all.extend_from_slice(&chunk.data);
        assert!(chunk.receive_time.is_some());
        timed &= chunk.agent_time.is_some();
    }
    (String::from_utf8_lossy(&all).into_owned(), timed)
}

fn forms() -> [String; 3] {
    [SECRET.to_string(), base64::engine::general_purpose::STANDARD.encode(SECRET), "s3cr3t-value%21".to_string()]
}

fn assert_hidden(what: &str, bytes: &[u8]) {
    for form in forms() {
        assert!(!bytes.windows(form.len()).any(|w| w == form.as_bytes()), "{what} shows the secret as {form:?}");
    }
}

#[tokio::test]
async fn the_reference_agent_gets_secrets_and_masks_every_form_and_no_view_shows_them() {
    let dir = DataDir::new();
    let server = TestServer::start(&dir, Options::default()).await;
    let agent = Agent::new(AgentConfig::new(server.url.clone(), "runner"), ShellHandler::default());
    let handle = agent.handle();
    tokio::spawn(agent.run(futures::future::pending()));
    tokio::time::timeout(WAIT, handle.wait_connected()).await.expect("in time").expect("connected");
    let mut d = server.dashboard().await;

    // Plain, base64 and URL-encoded; a value split across two writes; the
    // short one (under 3 bytes) is not masked; the last line is the result.
    let command = "echo \"plain=$TOKEN\"; printf %s \"$TOKEN\" | base64; printf 'url=%s\\n' \"$(printf %s \"$TOKEN\" | sed 's/!/%21/')\"; \
                   printf 's3cr3'; sleep 0.1; printf 't-value!\\n'; echo \"short=$SHORT\" >&2; printf %s \"$TOKEN\"";
    let job = d.create_job(with_secrets(command)).await.expect("create").into_inner().job.expect("job");
    assert_eq!(job.secret_names, ["SHORT", "TOKEN"], "names only");
    assert!(job.env.is_empty());
    let id = job.id.clone();
    tether_tests::wait_until("the job to succeed", || {
        let mut d = d.clone();
        let id = id.clone();
        async move {
            d.get_job(pb::GetJobRequest { id })
                .await
                .is_ok_and(|r| r.into_inner().job.is_some_and(|j| j.status == pb::JobStatus::Success as i32))
        }
    })
    .await;

    let (out, timed) = output_and_times(&mut d, &id).await;
    assert!(timed, "the reference agent stamps every chunk with its own time");
    assert_hidden("the output", out.as_bytes());
    assert!(out.contains("plain=***\n"), "{out}");
    assert!(out.contains("url=***\n"), "{out}");
    assert_eq!(out.matches("***").count(), 5, "every form, the split value and the result: {out}");
    assert!(out.contains("short=ab"), "values under 3 bytes are not masked: {out}");

    let got = d.get_job(pb::GetJobRequest { id: id.clone() }).await.expect("get").into_inner();
    assert_hidden("GetJob", &got.encode_to_vec());
    let listed = d.list_jobs(pb::ListJobsRequest::default()).await.expect("list").into_inner();
    assert_hidden("ListJobs", &listed.encode_to_vec());
    let queued =
        server.queue().await.get_queued_job(pb::GetQueuedJobRequest { id: id.clone() }).await.expect("queued job");
    let queued = queued.into_inner();
    assert_hidden("the queued job (payload and result)", &queued.encode_to_vec());
    let result = queued.job.map(|j| j.result).unwrap_or_default();
    assert_eq!(&result[..], b"plain=***\n***\nurl=***\n***\n***", "the result (stdout's tail) is masked");

    // Nothing on disk holds a form of the secret in clear.
    for entry in walk(dir.path()) {
        let bytes = std::fs::read(&entry).expect("read");
        assert_hidden(&entry.display().to_string(), &bytes);
    }
}

fn walk(path: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    let mut dirs = vec![path.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("read dir").flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files
}

#[tokio::test]
async fn only_the_assignment_carries_secrets_and_the_server_masks_an_agent_that_does_not() {
    let dir = DataDir::new();
    let server = TestServer::start(&dir, Options::default()).await;
    let mut d = server.dashboard().await;
    let mut agent = RawAgent::connect(&server, secrets_hello("raw")).await.expect("connect");
    assert_eq!(agent.welcome.protocol_version, tether::PROTOCOL_SECRETS);
    let job = d.create_job(with_secrets("true")).await.expect("create").into_inner().job.expect("job");
    let assignment = agent.next_assignment().await;
    assert_eq!(assignment.secrets.get("TOKEN").map(String::as_str), Some(SECRET));
    assert_hidden("the payload", &assignment.payload);
    let job_ref = assignment.job.clone().expect("job ref");
    agent.accept_and_start(&job_ref).await;
    for (sequence, text) in
        [format!("leak {SECRET}\n"), "half s3cr3".into(), "t-value! done\n".into()].into_iter().enumerate()
    {
        agent
            .send(pb::connect_request::Message::JobLog(pb::JobLog {
                job: Some(job_ref.clone()),
                stream: pb::LogStream::Stdout as i32,
                data: text.into_bytes().into(),
                sequence: sequence as u64,
                time: None,
            }))
            .await;
    }
    agent.finish(&job_ref, pb::JobOutcome::Succeeded, SECRET).await;
    let out = output(&mut d, &job.id).await;
    assert!(out.starts_with("leak ***\n"), "the server masks what the agent did not: {out}");
    // The server masks each chunk on its own: a value split across chunks
    // is the agent's to mask (the SDK does, above).
    assert!(out.contains("half s3cr3"), "{out}");
    let queued =
        server.queue().await.get_queued_job(pb::GetQueuedJobRequest { id: job.id.clone() }).await.expect("queued job");
    assert_eq!(queued.into_inner().job.map(|j| j.result), Some(bytes::Bytes::from_static(b"***")));

    // RetryJob keeps the secrets: the next assignment carries them again.
    let retry = d.retry_job(pb::RetryJobRequest { id: job.id.clone(), ..Default::default() }).await.expect("retry");
    let retry = retry.into_inner().job.expect("job");
    assert_eq!(retry.secret_names, ["SHORT", "TOKEN"]);
    let again = tokio::time::timeout(WAIT, agent.next_assignment()).await.expect("in time");
    assert_eq!(again.secrets.get("TOKEN").map(String::as_str), Some(SECRET));
}

/// An agent speaking the protocol version that carries secrets.
fn secrets_hello(name: &str) -> pb::Hello {
    pb::Hello { max_protocol_version: tether::PROTOCOL_SECRETS, ..hello(name, 1) }
}

#[tokio::test]
async fn an_agent_too_old_for_secrets_never_gets_them_its_attempt_fails_saying_why_and_is_retried() {
    let dir = DataDir::new();
    let server = TestServer::start(&dir, Options::default()).await;
    let mut d = server.dashboard().await;
    let mut old =
        RawAgent::connect(&server, pb::Hello { max_protocol_version: 3, ..hello("old", 1) }).await.expect("connect");
    assert_eq!(old.welcome.protocol_version, 3);
    // A job without secrets still runs on it.
    let plain = d
        .create_job(pb::CreateJobRequest { name: "plain".into(), command: "true".into(), ..Default::default() })
        .await
        .expect("create")
        .into_inner()
        .job
        .expect("job");
    let assignment = old.next_assignment().await;
    assert_eq!(assignment.job.as_ref().map(|j| j.job_id.as_str()), Some(plain.id.as_str()));
    assert!(assignment.secrets.is_empty());
    let plain_ref = assignment.job.expect("job ref");
    old.accept_and_start(&plain_ref).await;
    old.finish(&plain_ref, pb::JobOutcome::Succeeded, "").await;
    // One with secrets is not sent to it: its attempt fails, retryably,
    // saying why.
    let mut one_attempt = with_secrets("true");
    one_attempt.max_attempts = 1;
    let job = d.create_job(one_attempt).await.expect("create").into_inner().job.expect("job");
    let id = job.id.clone();
    tether_tests::wait_until("the attempt on the old agent to fail", || {
        let mut d = d.clone();
        let id = id.clone();
        async move {
            d.get_job(pb::GetJobRequest { id })
                .await
                .is_ok_and(|r| r.into_inner().job.is_some_and(|j| j.status == pb::JobStatus::Failed as i32))
        }
    })
    .await;
    let failed = d.get_job(pb::GetJobRequest { id: job.id.clone() }).await.expect("get").into_inner().job.expect("job");
    let attempt = failed.attempts.last().expect("an attempt");
    assert!(
        attempt.reason.contains("protocol version 3") && attempt.reason.contains("upgrade the agent"),
        "{attempt:?}"
    );
    assert_eq!(attempt.outcome, pb::QueuedJobState::Failed as i32, "its only attempt: {attempt:?}");
    assert_hidden("the attempt's reason", attempt.reason.as_bytes());
    // A job with more attempts goes to an agent that speaks version 4 once
    // one is there, with its secrets.
    let retried = d.create_job(with_secrets("true")).await.expect("create").into_inner().job.expect("job");
    let mut new = RawAgent::connect(&server, secrets_hello("new")).await.expect("connect");
    let assignment = new.next_assignment().await;
    assert_eq!(assignment.job.as_ref().map(|j| j.job_id.as_str()), Some(retried.id.as_str()));
    assert_eq!(assignment.secrets.get("TOKEN").map(String::as_str), Some(SECRET));
    // Any attempt the old agent got first was retried, not the end.
    let got =
        d.get_job(pb::GetJobRequest { id: retried.id.clone() }).await.expect("get").into_inner().job.expect("job");
    for earlier in got.attempts.iter().filter(|a| a.agent_id == old.agent_id) {
        assert_eq!(earlier.outcome, pb::QueuedJobState::Queued as i32, "{earlier:?}");
    }
}

#[tokio::test]
async fn bad_secrets_get_precise_statuses() {
    let dir = DataDir::new();
    let server = TestServer::start_manual(&dir).await;
    let mut d = server.dashboard().await;
    let mut clash = with_secrets("true");
    clash.env.insert("TOKEN".into(), "x".into());
    let mut nul = with_secrets("true");
    nul.secrets.insert("NUL".into(), "a\0b".into());
    let mut many = with_secrets("true");
    for i in 0..40 {
        many.secrets.insert(format!("S{i}"), "v".into());
    }
    let mut bad_name = with_secrets("true");
    bad_name.secrets.insert("BAD NAME".into(), "v".into());
    for (what, req, field) in [
        ("a name also in env", clash, "secrets[\"TOKEN\"]"),
        ("a NUL byte", nul, "secrets[\"NUL\"]"),
        ("too many", many, "secrets"),
        ("a bad name", bad_name, "secrets[\"BAD NAME\"]"),
    ] {
        let refused = d.create_job(req).await.expect_err(what);
        assert_eq!(refused.code(), Code::InvalidArgument, "{what}: {refused:?}");
        assert_eq!(tether_tests::violated_fields(&refused), [field.to_string()], "{what}");
        assert_hidden(what, refused.message().as_bytes());
    }
    // One idempotency key, the same secrets: one job; other secrets: refused.
    let keyed = pb::CreateJobRequest { idempotency_key: "k1".into(), ..with_secrets("true") };
    let first = d.create_job(keyed.clone()).await.expect("create").into_inner();
    let second = d.create_job(keyed.clone()).await.expect("repeat").into_inner();
    assert!(first.created && !second.created);
    assert_eq!(first.job.map(|j| j.id), second.job.map(|j| j.id));
    let mut other = keyed;
    other.secrets.insert("TOKEN".into(), "another-value".into());
    let refused = d.create_job(other).await.expect_err("other secrets, same key");
    assert_eq!(refused.code(), Code::AlreadyExists, "{refused:?}");
}
