"""DashboardService from Python: a dashboard job's life run by a unary
worker (attempts, exit code, history with actors), why a pending job waits,
retry as a linked new job, listing with filters, the error contract, and
job secrets (names in every view, values only in the Assignment of the
agent that runs the job)."""

import base64
import json

import grpc
import pytest
from grpc_status import rpc_status

from tether.v1 import agent_pb2, dashboard_pb2, dashboard_pb2_grpc, queue_pb2

import support
from support import PROTOCOL_SECRETS, RPC_TIMEOUT, hello, rpc_error, violated_fields

A = agent_pb2
D = dashboard_pb2
Q = queue_pb2
T = RPC_TIMEOUT
POOL = "py-dashboard"


def ensure_pool(clients, name=POOL):
    try:
        clients.agents.CreateAgentPool(
            agent_pb2.CreateAgentPoolRequest(pool=agent_pb2.AgentPool(name=name, description="python dashboard")),
            timeout=T,
        )
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.ALREADY_EXISTS, e


def create(clients, name, command, **kw):
    request = D.CreateJobRequest(name=name, command=command, routing=Q.Routing(pool=POOL), **kw)
    response = clients.dashboard.CreateJob(request, timeout=T)
    assert response.created
    return response.job


def test_a_job_run_by_a_unary_worker_keeps_its_attempts_and_history(clients):
    ensure_pool(clients)
    job = create(clients, "py-build", "make test", env={"CI": "1"}, requested_by="py-user")
    assert job.status == D.JOB_STATUS_PENDING
    assert job.queued_state == Q.QUEUED_JOB_STATE_QUEUED
    assert dict(job.env) == {"CI": "1"}

    # A pending job says why it waits: no agent of its pool is connected.
    got = clients.dashboard.GetJob(D.GetJobRequest(id=job.id), timeout=T).job
    assert got.pending_reason.kind == D.WAIT_KIND_NO_AGENT_IN_POOL, got.pending_reason
    assert POOL in got.pending_reason.summary

    claimed = clients.queue.ClaimJob(
        Q.ClaimJobRequest(worker_id="py-worker", queue="tether.jobs", pool=POOL), timeout=T
    ).job
    assert claimed.id == job.id, "the dashboard job runs as the queued job of the same id"
    ref = dict(id=claimed.id, attempt=claimed.attempt, fencing_token=claimed.fencing_token)
    clients.queue.StartJob(Q.StartJobRequest(**ref), timeout=T)
    running = clients.dashboard.GetJob(D.GetJobRequest(id=job.id), timeout=T).job
    assert running.status == D.JOB_STATUS_RUNNING
    assert not running.HasField("pending_reason")
    clients.queue.FailJob(Q.FailJobRequest(error="tests failed", exit_code=3, **ref), timeout=T)

    failed = clients.dashboard.GetJob(D.GetJobRequest(id=job.id), timeout=T).job
    assert failed.status == D.JOB_STATUS_FAILED
    assert failed.error.startswith("tests failed")
    assert len(failed.attempts) == 1
    attempt = failed.attempts[0]
    assert (attempt.attempt, attempt.agent_id) == (1, "py-worker")
    assert attempt.HasField("exit_code") and attempt.exit_code == 3
    assert attempt.outcome == Q.QUEUED_JOB_STATE_FAILED
    path = [(t.from_state, t.to_state, t.actor) for t in failed.transitions]
    assert path == [
        (Q.QUEUED_JOB_STATE_UNSPECIFIED, Q.QUEUED_JOB_STATE_QUEUED, "user:py-user"),
        (Q.QUEUED_JOB_STATE_QUEUED, Q.QUEUED_JOB_STATE_CLAIMED, "worker:py-worker"),
        (Q.QUEUED_JOB_STATE_CLAIMED, Q.QUEUED_JOB_STATE_RUNNING, "worker:py-worker"),
        (Q.QUEUED_JOB_STATE_RUNNING, Q.QUEUED_JOB_STATE_FAILED, "worker:py-worker"),
    ]

    retried = clients.dashboard.RetryJob(D.RetryJobRequest(id=job.id, requested_by="py-other"), timeout=T).job
    assert retried.id != job.id
    assert (retried.retry_of, retried.requested_by, retried.command) == (job.id, "py-other", "make test")

    listed = clients.dashboard.ListJobs(
        D.ListJobsRequest(pool=POOL, statuses=[D.JOB_STATUS_FAILED], requested_by="py-user"), timeout=T
    ).jobs
    assert [j.id for j in listed] == [job.id]
    clients.dashboard.CancelJob(D.CancelJobRequest(id=retried.id, reason="done here"), timeout=T)


def test_bad_requests_name_the_field(clients):
    err = rpc_error(lambda: clients.dashboard.ListJobs(D.ListJobsRequest(statuses=[0]), timeout=T))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    assert violated_fields(err) == ["statuses[0]"]

    err = rpc_error(lambda: clients.dashboard.CreateJob(D.CreateJobRequest(name="x", command=""), timeout=T))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "command" in err.details(), err
    err = rpc_error(lambda: clients.dashboard.GetJob(D.GetJobRequest(id="no-such-job"), timeout=T))
    assert err.code() == grpc.StatusCode.NOT_FOUND, err


# Secrets.

SECRET = "s3cr3t-value!"
SECRET_FORMS = [SECRET.encode(), base64.b64encode(SECRET.encode()), b"s3cr3t-value%21"]
SECRETS_POOL = "py-secrets"
SECRETS_IDLE_POOL = "py-secrets-idle"  # no agent: its jobs stay pending


def secret_job(pool, **kw):
    kw.setdefault("secrets", {"TOKEN": SECRET, "SHORT": "ab"})
    return D.CreateJobRequest(name="py-secret-deploy", command="./deploy.sh", routing=Q.Routing(pool=pool), **kw)


def assert_hidden(what, data):
    for form in SECRET_FORMS:
        assert form not in data, f"{what} shows the secret as {form!r}"


def test_a_job_shows_its_secret_names_and_only_its_assignment_carries_the_values(clients, stream_agent, watch):
    ensure_pool(clients, SECRETS_POOL)
    agent = stream_agent(hello("py-secret-agent", pool=SECRETS_POOL, max_protocol_version=PROTOCOL_SECRETS))
    assert agent.welcome.protocol_version == PROTOCOL_SECRETS
    agent.heartbeat()
    jobs = watch(queue="tether.jobs")

    created = clients.dashboard.CreateJob(secret_job(SECRETS_POOL, env={"CI": "1"}), timeout=T)
    job = created.job
    assert created.created
    assert list(job.secret_names) == ["SHORT", "TOKEN"], "names only, sorted"
    assert dict(job.env) == {"CI": "1"}, "secrets are not environment variables of the job's record"
    assert_hidden("CreateJob's answer", created.SerializeToString())

    assignment = agent.expect("assignment")
    ref = assignment.job
    assert ref.job_id == job.id
    assert dict(assignment.secrets) == {"TOKEN": SECRET, "SHORT": "ab"}, "the values, for the agent running it"
    assert_hidden("the payload", assignment.payload)
    payload = json.loads(assignment.payload)
    assert (payload["command"], payload["env"]) == ("./deploy.sh", {"CI": "1"})

    agent.accept_started(ref)
    # An agent that does not mask: the server masks each chunk and the result.
    agent.send(job_log=A.JobLog(job=ref, stream=A.LOG_STREAM_STDOUT, data=f"leak {SECRET}\n".encode(), sequence=0))
    assert agent.finish(ref, A.JOB_OUTCOME_SUCCEEDED, result=SECRET.encode()).accepted
    jobs.wait_state(job.id, Q.QUEUED_JOB_STATE_SUCCEEDED)

    got = clients.dashboard.GetJob(D.GetJobRequest(id=job.id), timeout=T)
    assert got.job.status == D.JOB_STATUS_SUCCESS
    assert list(got.job.secret_names) == ["SHORT", "TOKEN"]
    assert_hidden("GetJob", got.SerializeToString())
    listed = clients.dashboard.ListJobs(D.ListJobsRequest(pool=SECRETS_POOL), timeout=T)
    assert [j.id for j in listed.jobs] == [job.id] and list(listed.jobs[0].secret_names) == ["SHORT", "TOKEN"]
    assert_hidden("ListJobs", listed.SerializeToString())
    queued = clients.queue.GetQueuedJob(Q.GetQueuedJobRequest(id=job.id), timeout=T)
    assert_hidden("the queued job", queued.SerializeToString())
    assert queued.job.result == b"***", "the result is masked"
    logs = clients.dashboard.StreamJobLogs(D.StreamJobLogsRequest(id=job.id), timeout=T)
    assert b"".join(chunk.data for chunk in logs) == b"leak ***\n", "the output is masked"

    # RetryJob keeps the secrets: the next assignment carries them again.
    retried = clients.dashboard.RetryJob(D.RetryJobRequest(id=job.id), timeout=T).job
    assert list(retried.secret_names) == ["SHORT", "TOKEN"]
    again = agent.expect("assignment")
    assert again.job.job_id == retried.id
    assert dict(again.secrets) == {"TOKEN": SECRET, "SHORT": "ab"}
    agent.accept_started(again.job)
    assert agent.finish(again.job, A.JOB_OUTCOME_SUCCEEDED).accepted
    jobs.wait_state(retried.id, Q.QUEUED_JOB_STATE_SUCCEEDED)


def test_bad_secrets_name_the_field_and_never_echo_the_value(clients):
    ensure_pool(clients, SECRETS_IDLE_POOL)
    many = {f"S{i}": "v" for i in range(33)}
    for what, request, field in [
        ("a name also in env", secret_job(SECRETS_IDLE_POOL, env={"TOKEN": "x"}), 'secrets["TOKEN"]'),
        ("a bad name", secret_job(SECRETS_IDLE_POOL, secrets={"BAD NAME": SECRET}), 'secrets["BAD NAME"]'),
        ("a NUL byte", secret_job(SECRETS_IDLE_POOL, secrets={"NUL": SECRET + "\0"}), 'secrets["NUL"]'),
        ("a long value", secret_job(SECRETS_IDLE_POOL, secrets={"BIG": SECRET + "x" * 4096}), 'secrets["BIG"]'),
        ("too many", secret_job(SECRETS_IDLE_POOL, secrets=many), "secrets"),
    ]:
        err = rpc_error(lambda: clients.dashboard.CreateJob(request, timeout=T))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (what, err)
        assert violated_fields(err) == [field], (what, err)
        assert_hidden(what, (err.details() or "").encode())
        assert_hidden(what, rpc_status.from_call(err).SerializeToString())

    # One idempotency key with the same secrets: one job; other secrets: refused.
    keyed = secret_job(SECRETS_IDLE_POOL, idempotency_key="py-secret-key")
    first = clients.dashboard.CreateJob(keyed, timeout=T)
    second = clients.dashboard.CreateJob(keyed, timeout=T)
    assert first.created and not second.created
    assert first.job.id == second.job.id
    other = secret_job(SECRETS_IDLE_POOL, idempotency_key="py-secret-key", secrets={"TOKEN": "another-value"})
    err = rpc_error(lambda: clients.dashboard.CreateJob(other, timeout=T))
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS, err
    assert "another-value" not in (err.details() or "")
    clients.dashboard.CancelJob(D.CancelJobRequest(id=first.job.id), timeout=T)


def test_a_server_without_a_secrets_key_refuses_secrets(tmp_path):
    if support.store_backend() != "dynamodb":
        pytest.skip("the embedded store always has a secrets key (it makes one in its data directory)")
    server = support.ServerProcess(tmp_path, secrets_key=False)
    try:
        channel = grpc.insecure_channel(server.addr)
        grpc.channel_ready_future(channel).result(timeout=support.WAIT)
        dashboard = dashboard_pb2_grpc.DashboardServiceStub(channel)
        err = rpc_error(lambda: dashboard.CreateJob(secret_job("default"), timeout=T))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "secrets key" in err.details(), err
        assert_hidden("the refusal", (err.details() or "").encode())
        plain = dashboard.CreateJob(D.CreateJobRequest(name="py-plain", command="true"), timeout=T).job
        assert list(plain.secret_names) == []
        dashboard.CancelJob(D.CancelJobRequest(id=plain.id), timeout=T)
        channel.close()
    finally:
        code = server.stop()
    assert code == 0, "the server exited with %s:\n%s" % (code, "".join(server.log_lines[-50:]))
