"""A Python agent holding AgentService.Connect, written only from the
contract in agent.proto: handshake, heartbeats, assignments with acks,
progress and logs, results, Cancel and Drain.

Every wait reads the agent's stream or a WatchQueue stream, bounded by
support.WAIT; nothing sleeps to synchronise.
"""

import grpc

from tether.v1 import agent_pb2, queue_pb2

from support import RPC_TIMEOUT, hello, job_request

A = agent_pb2
Q = queue_pb2
T = RPC_TIMEOUT


def get_job(clients, job_id):
    return clients.queue.GetQueuedJob(Q.GetQueuedJobRequest(id=job_id), timeout=T).job


def get_agent(clients, agent_id):
    return clients.agents.GetAgent(A.GetAgentRequest(id=agent_id), timeout=T).agent


def test_handshake_heartbeat_assignment_and_success(clients, stream_agent, watch):
    agent = stream_agent(hello("py-agent", slots=1, labels={"lang": "python"}))
    w = agent.welcome
    assert w.agent_id
    assert w.protocol_version == 1
    assert w.heartbeat_interval.ToTimedelta().total_seconds() > 0
    assert w.lease_duration.ToTimedelta().total_seconds() > 0
    assert w.HasField("reconnect_grace")
    assert list(w.resumed_jobs) == [] and list(w.abandoned_jobs) == []
    agent.heartbeat()

    events = watch(queue="py-stream")
    job = clients.queue.EnqueueJob(job_request("py-stream", b'{"command": "echo hi"}'), timeout=T).job

    assignment = agent.expect("assignment")
    ref = assignment.job
    assert (ref.job_id, ref.attempt) == (job.id, 1)
    assert ref.fencing_token > 0
    assert assignment.queue == "py-stream"
    assert assignment.payload == b'{"command": "echo hi"}'
    assert assignment.priority == Q.PRIORITY_NORMAL
    assert assignment.max_attempts == 3
    assert assignment.HasField("lease_expire_time")

    ack = agent.accept_and_start(ref)
    assert ack.accepted, ack.reason
    events.wait_state(job.id, Q.QUEUED_JOB_STATE_RUNNING)

    # The stream is ordered: the heartbeat sent before JobStarted was
    # processed by the time JobStarted was acknowledged.
    seen = get_agent(clients, agent.agent_id)
    assert seen.connected
    assert seen.health == A.AGENT_HEALTH_HEALTHY, seen.health_reason
    assert seen.labels["lang"] == "python"
    assert seen.version == "python-interop"
    assert [r.job_id for r in seen.running_jobs] == [job.id]
    assert seen.metrics.memory_total_bytes == 8 << 30

    agent.send(job_progress=A.JobProgress(job=ref, percent=50.0, message="half way"))
    agent.send(job_log=A.JobLog(job=ref, stream=A.LOG_STREAM_STDOUT, data=b"hi\n", sequence=0))
    agent.heartbeat()  # lists the running job: renews its lease
    done_ack = agent.finish(ref, A.JOB_OUTCOME_SUCCEEDED, result=b"hi\n", exit_code=0)
    assert done_ack.accepted, done_ack.reason

    events.wait_state(job.id, Q.QUEUED_JOB_STATE_SUCCEEDED)
    stored = get_job(clients, job.id)
    assert stored.state == Q.QUEUED_JOB_STATE_SUCCEEDED
    assert stored.result == b"hi\n"
    assert stored.worker_id == agent.agent_id
    assert stored.attempt == 1 and stored.fencing_token == ref.fencing_token

    # Re-sending the same result (as after a reconnect) is idempotent.
    again = agent.finish(ref, A.JOB_OUTCOME_SUCCEEDED, result=b"hi\n")
    assert again.accepted, again.reason

    agent.close()
    assert agent.ended is None, "the server ends the stream cleanly after the agent closes it"
    assert not get_agent(clients, agent.agent_id).connected


def test_reconnect_keeps_the_agent_id(clients, stream_agent):
    first = stream_agent(hello("py-stable"))
    first.close()
    second = stream_agent(hello("py-stable"))
    assert second.agent_id == first.agent_id, "(pool, name) maps to the same agent"
    second.close()


def test_cancel_reaches_the_running_agent(clients, stream_agent, watch):
    agent = stream_agent(hello("py-cancel-agent", slots=1))
    agent.heartbeat()
    events = watch(queue="py-stream-cancel")

    first = clients.queue.EnqueueJob(job_request("py-stream-cancel", b"quick"), timeout=T).job
    r1 = agent.expect("assignment").job
    assert r1.job_id == first.id
    assert agent.accept_and_start(r1).accepted
    assert agent.finish(r1, A.JOB_OUTCOME_SUCCEEDED, result=b"ok").accepted

    # The freed slot takes the second job; cancel it while it runs.
    second = clients.queue.EnqueueJob(job_request("py-stream-cancel", b"long"), timeout=T).job
    r2 = agent.expect("assignment").job
    assert r2.job_id == second.id
    assert agent.accept_and_start(r2).accepted
    events.wait_state(second.id, Q.QUEUED_JOB_STATE_RUNNING)

    cancelled = clients.queue.CancelQueuedJob(
        Q.CancelQueuedJobRequest(id=second.id, reason="operator said stop"), timeout=T
    ).job
    assert cancelled.state == Q.QUEUED_JOB_STATE_CANCELLED

    cancel = agent.expect("cancel")
    assert cancel.job == r2
    assert "operator said stop" in cancel.reason
    # The contract: stop and still report JobFinished. The server answers
    # with a JobUpdateAck; the job stays CANCELLED.
    ack = agent.finish(r2, A.JOB_OUTCOME_CANCELLED, error="stopped on cancel")
    assert ack.job == r2
    assert get_job(clients, second.id).state == Q.QUEUED_JOB_STATE_CANCELLED

    # The slot is free again: a third job is assigned.
    third = clients.queue.EnqueueJob(job_request("py-stream-cancel", b"next"), timeout=T).job
    r3 = agent.expect("assignment").job
    assert r3.job_id == third.id
    agent.send(assignment_ack=A.AssignmentAck(job=r3, accepted=False, reason="shutting down"))
    # A rejected job goes back to the queue at once, without using an attempt.
    back = events.wait_for(
        lambda j: j.id == third.id and j.state == Q.QUEUED_JOB_STATE_QUEUED and "shutting down" in j.last_error,
        "the rejected job to be queued again",
    )
    assert back.attempt == 0
    clients.queue.CancelQueuedJob(Q.CancelQueuedJobRequest(id=third.id), timeout=T)
    agent.close()


def test_drain_closes_the_agent(clients, stream_agent):
    agent = stream_agent(hello("py-drain-agent", slots=2))
    agent.heartbeat()

    drained = clients.agents.DrainAgent(A.DrainAgentRequest(id=agent.agent_id, reason="maintenance"), timeout=T).agent
    assert drained.scheduling_status == A.AGENT_SCHEDULING_STATUS_DRAINING

    drain = agent.expect("drain")
    assert drain.reason == "maintenance"

    # A draining agent gets no new work.
    waiting = clients.queue.EnqueueJob(job_request("py-stream-drain", b"later"), timeout=T).job
    assert waiting.state == Q.QUEUED_JOB_STATE_QUEUED

    # Nothing runs, so the agent leaves at once; the server ends the stream.
    agent.close()
    assert agent.ended is None
    seen = clients.agents.GetAgent(A.GetAgentRequest(id=agent.agent_id), timeout=T).agent
    assert seen.scheduling_status == A.AGENT_SCHEDULING_STATUS_DRAINING
    assert not seen.connected
    assert get_job(clients, waiting.id).state == Q.QUEUED_JOB_STATE_QUEUED
    clients.queue.CancelQueuedJob(Q.CancelQueuedJobRequest(id=waiting.id), timeout=T)


def test_first_message_must_be_hello(clients):
    stream = clients.agents.Connect(
        iter([A.ConnectRequest(heartbeat=A.Heartbeat())]), timeout=T
    )
    try:
        list(stream)
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "hello" in err.details()
    else:
        raise AssertionError("a stream without a Hello was accepted")


def test_no_common_protocol_version(clients):
    bad = hello("py-future")
    bad.min_protocol_version = 7
    bad.max_protocol_version = 9
    stream = clients.agents.Connect(iter([A.ConnectRequest(hello=bad)]), timeout=T)
    try:
        list(stream)
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err
    else:
        raise AssertionError("an agent with no common protocol version was accepted")
