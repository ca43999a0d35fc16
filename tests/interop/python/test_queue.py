"""QueueService from Python: the whole job lifecycle over unary calls,
paging, stats, retries, dead letters, cancel, idempotency and the error
contract (INVALID_ARGUMENT names the field)."""

import time

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status
import pytest
from google.protobuf import duration_pb2

from tether.v1 import agent_pb2, queue_pb2

from support import RPC_TIMEOUT, job_request, rpc_error

Q = queue_pb2
T = RPC_TIMEOUT


def enqueue(clients, queue_name, payload=b"{}", pool=None, **kw):
    if pool is not None:
        kw["routing"] = Q.Routing(pool=pool)
    response = clients.queue.EnqueueJob(job_request(queue_name, payload, **kw), timeout=T)
    assert response.created
    return response.job


def claim(clients, queue_name, pool, worker="py-worker"):
    response = clients.queue.ClaimJob(Q.ClaimJobRequest(worker_id=worker, queue=queue_name, pool=pool), timeout=T)
    return response.job if response.HasField("job") else None


def test_enqueue_get_and_list_with_paging(clients, unary_pool):
    ids = [
        enqueue(clients, "py-list", f'{{"n": {i}}}'.encode(), pool=unary_pool, priority=Q.PRIORITY_HIGH).id
        for i in range(5)
    ]
    assert len(set(ids)) == 5

    got = clients.queue.GetQueuedJob(Q.GetQueuedJobRequest(id=ids[2]), timeout=T).job
    assert got.id == ids[2]
    assert got.queue == "py-list"
    assert got.payload == b'{"n": 2}'
    assert got.priority == Q.PRIORITY_HIGH
    assert got.state == Q.QUEUED_JOB_STATE_QUEUED
    assert got.routing.pool == unary_pool
    assert got.max_attempts == 3, "0 means 3"
    assert got.lease_duration.ToTimedelta().total_seconds() == 30, "unset means 30 s"
    assert not got.HasField("timeout"), "unset means no limit"
    assert got.attempt == 0 and got.fencing_token == 0
    assert got.create_time.ToNanoseconds() > 0

    seen, token, pages = [], "", 0
    while True:
        page = clients.queue.ListQueuedJobs(
            Q.ListQueuedJobsRequest(queue="py-list", page_size=2, page_token=token), timeout=T
        )
        pages += 1
        assert len(page.jobs) <= 2
        seen += [j.id for j in page.jobs]
        token = page.next_page_token
        if not token:
            break
        assert pages < 10, "paging does not end"
    assert seen == list(reversed(ids)), "newest first, every job once"
    assert pages == 3

    by_state = clients.queue.ListQueuedJobs(
        Q.ListQueuedJobsRequest(queue="py-list", states=[Q.QUEUED_JOB_STATE_SUCCEEDED]), timeout=T
    )
    assert list(by_state.jobs) == []
    for job_id in ids:  # leave nothing waiting in the pool
        clients.queue.CancelQueuedJob(Q.CancelQueuedJobRequest(id=job_id, reason="cleanup"), timeout=T)


def test_batch_enqueue_is_all_or_nothing(clients, unary_pool):
    routing = Q.Routing(pool=unary_pool)
    batch = clients.queue.BatchEnqueueJobs(
        Q.BatchEnqueueJobsRequest(requests=[job_request("py-batch", b"a", routing=routing) for _ in range(3)]),
        timeout=T,
    )
    assert len(batch.jobs) == 3 and list(batch.created) == [True, True, True]
    err = rpc_error(
        lambda: clients.queue.BatchEnqueueJobs(
            Q.BatchEnqueueJobsRequest(
                requests=[job_request("py-batch", b"ok", routing=routing), job_request("", b"bad", routing=routing)]
            ),
            timeout=T,
        )
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "queue" in err.details()
    listed = clients.queue.ListQueuedJobs(Q.ListQueuedJobsRequest(queue="py-batch"), timeout=T)
    assert len(listed.jobs) == 3, "the invalid batch enqueued nothing"
    for j in listed.jobs:
        clients.queue.CancelQueuedJob(Q.CancelQueuedJobRequest(id=j.id), timeout=T)


def test_claim_start_renew_complete_and_stats(clients, unary_pool):
    job = enqueue(clients, "py-run", b"work", pool=unary_pool)

    claimed = claim(clients, "py-run", unary_pool)
    assert claimed is not None and claimed.id == job.id
    assert claimed.state == Q.QUEUED_JOB_STATE_CLAIMED
    assert claimed.attempt == 1 and claimed.fencing_token > 0
    assert claimed.worker_id == "py-worker"
    assert claimed.HasField("lease_expire_time")
    assert claim(clients, "py-run", unary_pool) is None, "nothing else is ready"

    ref = dict(id=job.id, attempt=claimed.attempt, fencing_token=claimed.fencing_token)
    started = clients.queue.StartJob(Q.StartJobRequest(**ref), timeout=T).job
    assert started.state == Q.QUEUED_JOB_STATE_RUNNING

    renewed = clients.queue.RenewLease(
        Q.RenewLeaseRequest(**ref, lease_duration=duration_pb2.Duration(seconds=600)), timeout=T
    ).job
    assert renewed.lease_expire_time.ToNanoseconds() > started.lease_expire_time.ToNanoseconds()
    left = renewed.lease_expire_time.ToSeconds() - time.time()
    assert 500 < left <= 601, left

    stale = rpc_error(
        lambda: clients.queue.CompleteJob(
            Q.CompleteJobRequest(id=job.id, attempt=1, fencing_token=claimed.fencing_token + 1000), timeout=T
        )
    )
    assert stale.code() == grpc.StatusCode.FAILED_PRECONDITION

    done = clients.queue.CompleteJob(Q.CompleteJobRequest(**ref, result=b"\x00\x01result"), timeout=T).job
    assert done.state == Q.QUEUED_JOB_STATE_SUCCEEDED
    assert done.result == b"\x00\x01result"
    assert done.HasField("finish_time")
    stored = clients.queue.GetQueuedJob(Q.GetQueuedJobRequest(id=job.id), timeout=T).job
    assert stored.state == Q.QUEUED_JOB_STATE_SUCCEEDED and stored.result == done.result

    enqueue(clients, "py-run", b"waiting", pool=unary_pool, priority=Q.PRIORITY_CRITICAL)
    stats = clients.queue.GetQueueStats(Q.GetQueueStatsRequest(queue="py-run"), timeout=T)
    counts = {s.state: s.count for s in stats.by_state}
    assert set(counts) == {v for v in Q.QueuedJobState.values() if v != 0}, "one entry for every state"
    assert counts[Q.QUEUED_JOB_STATE_SUCCEEDED] == 1
    assert counts[Q.QUEUED_JOB_STATE_QUEUED] == 1
    by_priority = {p.priority: p.count for p in stats.queued_by_priority}
    assert set(by_priority) == {v for v in Q.Priority.values() if v != 0}, "one entry for every priority"
    assert by_priority[Q.PRIORITY_CRITICAL] == 1
    assert stats.HasField("oldest_queued_age")
    leftover = clients.queue.ListQueuedJobs(
        Q.ListQueuedJobsRequest(queue="py-run", states=[Q.QUEUED_JOB_STATE_QUEUED]), timeout=T
    )
    for j in leftover.jobs:
        clients.queue.CancelQueuedJob(Q.CancelQueuedJobRequest(id=j.id), timeout=T)


def test_retryable_failure_requeues_then_dead_letters_and_redrives(clients, unary_pool):
    job = enqueue(
        clients, "py-retry", b"flaky", pool=unary_pool, max_attempts=3, retry_policy=Q.RetryPolicy(any_failure=True)
    )
    claimed = claim(clients, "py-retry", unary_pool)
    assert claimed.id == job.id
    failed = clients.queue.FailJob(
        Q.FailJobRequest(
            id=job.id, attempt=1, fencing_token=claimed.fencing_token, error="disk on fire", retryable=True
        ),
        timeout=T,
    ).job
    assert failed.state == Q.QUEUED_JOB_STATE_QUEUED, "a retryable failure with attempts left requeues"
    assert failed.attempt == 1
    assert "disk on fire" in failed.last_error
    assert failed.ready_time.ToNanoseconds() > failed.update_time.ToNanoseconds(), "after a backoff"
    clients.queue.CancelQueuedJob(Q.CancelQueuedJobRequest(id=job.id), timeout=T)

    # With its only attempt spent, the job is dead-lettered; redrive requeues it.
    once = enqueue(
        clients, "py-dead", b"doomed", pool=unary_pool, max_attempts=1, retry_policy=Q.RetryPolicy(any_failure=True)
    )
    c = claim(clients, "py-dead", unary_pool)
    dead = clients.queue.FailJob(
        Q.FailJobRequest(id=once.id, attempt=1, fencing_token=c.fencing_token, error="boom", retryable=True),
        timeout=T,
    ).job
    assert dead.state == Q.QUEUED_JOB_STATE_DEAD_LETTERED
    letters = clients.queue.ListDeadLetters(Q.ListDeadLettersRequest(queue="py-dead"), timeout=T)
    assert [j.id for j in letters.jobs] == [once.id]
    redriven = clients.queue.RedriveDeadLetter(Q.RedriveDeadLetterRequest(id=once.id), timeout=T).job
    assert redriven.state == Q.QUEUED_JOB_STATE_QUEUED and redriven.attempt == 0

    # A permanent failure fails the job at once.
    c = claim(clients, "py-dead", unary_pool)
    final = clients.queue.FailJob(
        Q.FailJobRequest(id=once.id, attempt=c.attempt, fencing_token=c.fencing_token, error="bad input"),
        timeout=T,
    ).job
    assert final.state == Q.QUEUED_JOB_STATE_FAILED


def test_the_retry_policy_decides_from_the_exit_code(clients, unary_pool):
    def fail_with(job, exit_code):
        c = claim(clients, "py-policy", unary_pool)
        assert c.id == job.id
        return clients.queue.FailJob(
            Q.FailJobRequest(
                id=c.id, attempt=c.attempt, fencing_token=c.fencing_token, error="exit", retryable=True, exit_code=exit_code
            ),
            timeout=T,
        ).job

    # No policy: a command that exited non-zero is FAILED at once.
    plain = enqueue(clients, "py-policy", b"x", pool=unary_pool, max_attempts=3)
    assert fail_with(plain, 2).state == Q.QUEUED_JOB_STATE_FAILED
    # A policy listing 75 retries exit code 75, not 2.
    listed = enqueue(
        clients, "py-policy", b"y", pool=unary_pool, max_attempts=3, retry_policy=Q.RetryPolicy(exit_codes=[75])
    )
    again = fail_with(listed, 75)
    assert again.state == Q.QUEUED_JOB_STATE_QUEUED
    assert list(again.retry_policy.exit_codes) == [75]
    clients.queue.CancelQueuedJob(Q.CancelQueuedJobRequest(id=listed.id), timeout=T)
    other = enqueue(
        clients, "py-policy", b"z", pool=unary_pool, max_attempts=3, retry_policy=Q.RetryPolicy(exit_codes=[75])
    )
    assert fail_with(other, 2).state == Q.QUEUED_JOB_STATE_FAILED


def test_cancel(clients, unary_pool):
    job = enqueue(clients, "py-cancel", b"x", pool=unary_pool)
    cancelled = clients.queue.CancelQueuedJob(Q.CancelQueuedJobRequest(id=job.id, reason="not needed"), timeout=T).job
    assert cancelled.state == Q.QUEUED_JOB_STATE_CANCELLED
    assert "not needed" in cancelled.last_error
    assert claim(clients, "py-cancel", unary_pool) is None
    again = rpc_error(lambda: clients.queue.CancelQueuedJob(Q.CancelQueuedJobRequest(id=job.id), timeout=T))
    assert again.code() == grpc.StatusCode.FAILED_PRECONDITION
    missing = rpc_error(lambda: clients.queue.GetQueuedJob(Q.GetQueuedJobRequest(id="no-such-job"), timeout=T))
    assert missing.code() == grpc.StatusCode.NOT_FOUND


def test_idempotency_key(clients, unary_pool):
    routing = Q.Routing(pool=unary_pool)
    first = clients.queue.EnqueueJob(
        job_request("py-idem", b"same", routing=routing, idempotency_key="py-key-1"), timeout=T
    )
    assert first.created
    repeat = clients.queue.EnqueueJob(
        job_request("py-idem", b"same", routing=routing, idempotency_key="py-key-1"), timeout=T
    )
    assert not repeat.created and repeat.job.id == first.job.id
    assert repeat.job.idempotency_key == "py-key-1"
    conflict = rpc_error(
        lambda: clients.queue.EnqueueJob(
            job_request("py-idem", b"different", routing=routing, idempotency_key="py-key-1"), timeout=T
        )
    )
    assert conflict.code() == grpc.StatusCode.ALREADY_EXISTS
    clients.queue.CancelQueuedJob(Q.CancelQueuedJobRequest(id=first.job.id), timeout=T)


@pytest.mark.parametrize(
    "method, request_, field",
    [
        pytest.param("EnqueueJob", Q.EnqueueJobRequest(queue=""), "queue", id="empty-queue"),
        pytest.param("EnqueueJob", Q.EnqueueJobRequest(queue="has space"), "queue", id="bad-queue-name"),
        pytest.param("EnqueueJob", Q.EnqueueJobRequest(queue="q", max_attempts=101), "max_attempts", id="too-many-attempts"),
        pytest.param("EnqueueJob", Q.EnqueueJobRequest(queue="q", lease_duration=duration_pb2.Duration(nanos=1000)), "lease_duration", id="lease-too-short"),
        pytest.param("EnqueueJob", Q.EnqueueJobRequest(queue="q", idempotency_key="k" * 257), "idempotency_key", id="key-too-long"),
        pytest.param("GetQueuedJob", Q.GetQueuedJobRequest(id=""), "id", id="get-without-id"),
        pytest.param("ClaimJob", Q.ClaimJobRequest(worker_id=""), "worker_id", id="claim-without-worker"),
        pytest.param("StartJob", Q.StartJobRequest(id="j", attempt=0, fencing_token=1), "attempt", id="start-attempt-zero"),
        pytest.param("ListQueuedJobs", Q.ListQueuedJobsRequest(page_size=-1), "page_size", id="negative-page-size"),
        pytest.param("ListQueuedJobs", Q.ListQueuedJobsRequest(page_token="not-a-token"), "page_token", id="foreign-page-token"),
        pytest.param("ListQueuedJobs", Q.ListQueuedJobsRequest(states=[Q.QUEUED_JOB_STATE_UNSPECIFIED]), "states", id="unspecified-state-filter"),
    ],
)
def test_invalid_argument_names_the_field(clients, method, request_, field):
    err = rpc_error(lambda: getattr(clients.queue, method)(request_, timeout=T))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    assert field in err.details(), err.details()


# Python's proto3 enums are open: any int can be set and sent.
@pytest.mark.parametrize(
    "stub, method, request_, field",
    [
        pytest.param("queue", "EnqueueJob", Q.EnqueueJobRequest(queue="q", priority=42), "priority", id="priority-42"),
        pytest.param("queue", "ListQueuedJobs", Q.ListQueuedJobsRequest(states=[99]), "states", id="list-state-99"),
        pytest.param("queue", "WatchQueue", Q.WatchQueueRequest(states=[1234]), "states", id="watch-state-1234"),
        pytest.param("agents", "ListAgents", agent_pb2.ListAgentsRequest(health=[77]), "health", id="agent-health-77"),
        pytest.param("agents", "UpdateAgentStatus", agent_pb2.UpdateAgentStatusRequest(id="a", scheduling_status=9), "scheduling_status", id="scheduling-status-9"),
    ],
)
def test_unknown_enum_values_are_invalid_argument(clients, stub, method, request_, field):
    def call():
        response = getattr(getattr(clients, stub), method)(request_, timeout=T)
        if method == "WatchQueue":
            return next(iter(response))
        return response

    err = rpc_error(call)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    assert field in err.details(), err.details()


def test_errors_carry_google_rpc_details(clients):
    """INVALID_ARGUMENT carries a google.rpc.BadRequest naming the field and
    an ErrorInfo with a stable reason, readable with grpcio-status."""
    err = rpc_error(lambda: clients.queue.EnqueueJob(Q.EnqueueJobRequest(queue="", payload=b"x"), timeout=T))
    status = rpc_status.from_call(err)
    assert status is not None, "the status has no details"
    bad_request = error_details_pb2.BadRequest()
    info = error_details_pb2.ErrorInfo()
    found = set()
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            detail.Unpack(bad_request)
            found.add("bad_request")
        elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            detail.Unpack(info)
            found.add("error_info")
    assert found == {"bad_request", "error_info"}, status
    assert [v.field for v in bad_request.field_violations] == ["queue"]
    assert (info.reason, info.domain) == ("INVALID_FIELD", "tether.v1")

    missing = rpc_error(lambda: clients.queue.GetQueuedJob(Q.GetQueuedJobRequest(id="no-such-job"), timeout=T))
    status = rpc_status.from_call(missing)
    assert status is not None
    reasons = []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            detail.Unpack(info)
            reasons.append(info.reason)
    assert reasons == ["NOT_FOUND"]
