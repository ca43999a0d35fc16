"""DashboardService from Python: a dashboard job's life run by a unary
worker (attempts, exit code, history with actors), why a pending job waits,
retry as a linked new job, listing with filters, and the error contract."""

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from tether.v1 import agent_pb2, dashboard_pb2, queue_pb2

from support import RPC_TIMEOUT, rpc_error

D = dashboard_pb2
Q = queue_pb2
T = RPC_TIMEOUT
POOL = "py-dashboard"


def ensure_pool(clients):
    try:
        clients.agents.CreateAgentPool(
            agent_pb2.CreateAgentPoolRequest(pool=agent_pb2.AgentPool(name=POOL, description="python dashboard")),
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
    status = rpc_status.from_call(err)
    assert status is not None
    fields = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            fields += [v.field for v in bad_request.field_violations]
    assert fields == ["statuses[0]"]

    err = rpc_error(lambda: clients.dashboard.CreateJob(D.CreateJobRequest(name="x", command=""), timeout=T))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "command" in err.details(), err
    err = rpc_error(lambda: clients.dashboard.GetJob(D.GetJobRequest(id="no-such-job"), timeout=T))
    assert err.code() == grpc.StatusCode.NOT_FOUND, err
