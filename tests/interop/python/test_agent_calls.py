"""AgentService's unary calls from Python: registration, lookup, listing,
cordon/uncordon, the unary heartbeat, deregistration, and agent pools
(CRUD with a FieldMask, the scaling signal)."""

import math

import grpc
from google.protobuf import field_mask_pb2

from tether.v1 import agent_pb2, queue_pb2

from support import RPC_TIMEOUT, job_request, rpc_error

A = agent_pb2
Q = queue_pb2
T = RPC_TIMEOUT


def register(clients, name, pool="", slots=2, **labels):
    return clients.agents.RegisterAgent(
        A.RegisterAgentRequest(name=name, pool=pool, slots=slots, labels=labels), timeout=T
    )


def test_register_get_and_list_agents(clients):
    first = register(clients, "py-reg-1", gpu="a100", zone="z1")
    assert first.created
    agent = first.agent
    assert agent.id and agent.name == "py-reg-1" and agent.pool == "default"
    assert agent.slots == 2
    assert dict(agent.labels) == {"gpu": "a100", "zone": "z1"}
    assert agent.health == A.AGENT_HEALTH_REGISTERING
    assert agent.scheduling_status == A.AGENT_SCHEDULING_STATUS_ACTIVE
    assert not agent.connected

    again = register(clients, "py-reg-1", gpu="a100", zone="z1")
    assert not again.created and again.agent.id == agent.id

    register(clients, "py-reg-2", zone="z2")
    got = clients.agents.GetAgent(A.GetAgentRequest(id=agent.id), timeout=T).agent
    assert got.id == agent.id and got.name == "py-reg-1"

    by_label = clients.agents.ListAgents(A.ListAgentsRequest(labels={"gpu": "a100"}), timeout=T)
    assert [a.id for a in by_label.agents] == [agent.id]

    names, token, pages = [], "", 0
    while True:
        page = clients.agents.ListAgents(A.ListAgentsRequest(pool="default", page_size=1, page_token=token), timeout=T)
        pages += 1
        assert len(page.agents) <= 1
        names += [a.name for a in page.agents]
        token = page.next_page_token
        if not token or pages > 100:
            break
    assert {"py-reg-1", "py-reg-2"} <= set(names)
    assert len(names) == len(set(names)), "paging returns each agent once"

    registering = clients.agents.ListAgents(
        A.ListAgentsRequest(health=[A.AGENT_HEALTH_REGISTERING]), timeout=T
    )
    assert agent.id in [a.id for a in registering.agents]

    missing = rpc_error(lambda: clients.agents.GetAgent(A.GetAgentRequest(id="no-such-agent"), timeout=T))
    assert missing.code() == grpc.StatusCode.NOT_FOUND
    bad = rpc_error(lambda: register(clients, "py-reg-bad", slots=0))
    assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT and "slots" in bad.details()


def test_cordon_and_uncordon(clients):
    agent = register(clients, "py-cordon").agent

    def set_status(status, reason=""):
        return clients.agents.UpdateAgentStatus(
            A.UpdateAgentStatusRequest(id=agent.id, scheduling_status=status, reason=reason), timeout=T
        ).agent

    assert set_status(A.AGENT_SCHEDULING_STATUS_CORDONED, "kernel upgrade").scheduling_status == (
        A.AGENT_SCHEDULING_STATUS_CORDONED
    )
    got = clients.agents.GetAgent(A.GetAgentRequest(id=agent.id), timeout=T).agent
    assert got.scheduling_status == A.AGENT_SCHEDULING_STATUS_CORDONED
    assert set_status(A.AGENT_SCHEDULING_STATUS_ACTIVE).scheduling_status == A.AGENT_SCHEDULING_STATUS_ACTIVE
    assert set_status(A.AGENT_SCHEDULING_STATUS_OUT_OF_SERVICE).scheduling_status == (
        A.AGENT_SCHEDULING_STATUS_OUT_OF_SERVICE
    )
    assert set_status(A.AGENT_SCHEDULING_STATUS_ACTIVE).scheduling_status == A.AGENT_SCHEDULING_STATUS_ACTIVE

    unset = rpc_error(lambda: set_status(A.AGENT_SCHEDULING_STATUS_UNSPECIFIED))
    assert unset.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "scheduling_status" in unset.details()


def test_unary_heartbeat(clients):
    agent = register(clients, "py-unary-hb").agent
    metrics = A.AgentMetrics(cpu_percent=3.0, memory_used_bytes=100, memory_total_bytes=1000, running_jobs=0)
    response = clients.agents.Heartbeat(A.HeartbeatRequest(agent_id=agent.id, metrics=metrics), timeout=T)
    assert response.heartbeat_interval.ToTimedelta().total_seconds() > 0
    assert not response.drain
    assert list(response.abandoned_jobs) == []

    got = clients.agents.GetAgent(A.GetAgentRequest(id=agent.id), timeout=T).agent
    assert got.health == A.AGENT_HEALTH_HEALTHY, got.health_reason
    assert got.metrics.memory_total_bytes == 1000
    assert len(got.metrics_history) >= 1
    assert got.last_seen_time.ToNanoseconds() >= agent.last_seen_time.ToNanoseconds()

    # A job it does not hold is abandoned.
    stranger = A.JobRef(job_id="not-mine", attempt=1, fencing_token=424242)
    response = clients.agents.Heartbeat(A.HeartbeatRequest(agent_id=agent.id, running_jobs=[stranger]), timeout=T)
    assert list(response.abandoned_jobs) == [stranger]

    missing = rpc_error(lambda: clients.agents.Heartbeat(A.HeartbeatRequest(agent_id="nobody"), timeout=T))
    assert missing.code() == grpc.StatusCode.NOT_FOUND


def test_deregister(clients):
    agent = register(clients, "py-gone").agent
    gone = clients.agents.DeregisterAgent(A.DeregisterAgentRequest(id=agent.id), timeout=T).agent
    assert gone.health == A.AGENT_HEALTH_TERMINATED


def test_agent_pools(clients):
    created = clients.agents.CreateAgentPool(
        A.CreateAgentPoolRequest(
            pool=A.AgentPool(
                name="py-pool",
                description="python pool",
                min_size=1,
                max_size=5,
                desired_size=2,
                default_labels={"team": "interop"},
            )
        ),
        timeout=T,
    ).pool
    assert created.name == "py-pool" and created.max_size == 5 and created.min_size == 1
    assert dict(created.default_labels) == {"team": "interop"}
    assert created.create_time.ToNanoseconds() > 0

    dup = rpc_error(
        lambda: clients.agents.CreateAgentPool(A.CreateAgentPoolRequest(pool=A.AgentPool(name="py-pool")), timeout=T)
    )
    assert dup.code() == grpc.StatusCode.ALREADY_EXISTS
    unnamed = rpc_error(
        lambda: clients.agents.CreateAgentPool(A.CreateAgentPoolRequest(pool=A.AgentPool(name="")), timeout=T)
    )
    assert unnamed.code() == grpc.StatusCode.INVALID_ARGUMENT and "name" in unnamed.details()

    got = clients.agents.GetAgentPool(A.GetAgentPoolRequest(name="py-pool"), timeout=T).pool
    assert got == created

    names, token, pages = [], "", 0
    while True:
        page = clients.agents.ListAgentPools(A.ListAgentPoolsRequest(page_size=1, page_token=token), timeout=T)
        pages += 1
        names += [p.name for p in page.pools]
        token = page.next_page_token
        if not token or pages > 100:
            break
    assert {"default", "py-pool"} <= set(names)
    assert names == sorted(names), "pools come by name"

    # Only the fields in the mask change.
    updated = clients.agents.UpdateAgentPool(
        A.UpdateAgentPoolRequest(
            pool=A.AgentPool(name="py-pool", description="renamed", desired_size=3, min_size=4, max_size=4),
            update_mask=field_mask_pb2.FieldMask(paths=["description", "desired_size"]),
        ),
        timeout=T,
    ).pool
    assert updated.description == "renamed" and updated.desired_size == 3
    assert (updated.min_size, updated.max_size) == (1, 5), "fields outside the mask are kept"
    assert dict(updated.default_labels) == {"team": "interop"}
    bad_mask = rpc_error(
        lambda: clients.agents.UpdateAgentPool(
            A.UpdateAgentPoolRequest(
                pool=A.AgentPool(name="py-pool"), update_mask=field_mask_pb2.FieldMask(paths=["create_time"])
            ),
            timeout=T,
        )
    )
    assert bad_mask.code() == grpc.StatusCode.INVALID_ARGUMENT and "update_mask" in bad_mask.details()
    no_mask = rpc_error(
        lambda: clients.agents.UpdateAgentPool(A.UpdateAgentPoolRequest(pool=A.AgentPool(name="py-pool")), timeout=T)
    )
    assert no_mask.code() == grpc.StatusCode.INVALID_ARGUMENT and "update_mask" in no_mask.details()

    # Scaling signal: three jobs wait for the pool.
    jobs = [
        clients.queue.EnqueueJob(job_request("py-pool-q", b"x", routing=Q.Routing(pool="py-pool")), timeout=T).job
        for _ in range(3)
    ]
    signal = clients.agents.GetPoolScalingSignal(A.GetPoolScalingSignalRequest(name="py-pool"), timeout=T)
    assert signal.queued_jobs == 3 and signal.running_jobs == 0 and signal.current_agents == 0
    assert (signal.min_size, signal.max_size) == (1, 5)
    assert signal.slots_per_agent >= 1
    want = math.ceil((signal.queued_jobs + signal.running_jobs) / signal.slots_per_agent)
    assert signal.desired_agents == min(max(want, signal.min_size), signal.max_size)
    assert signal.compute_time.ToNanoseconds() > 0

    busy = rpc_error(lambda: clients.agents.DeleteAgentPool(A.DeleteAgentPoolRequest(name="py-pool"), timeout=T))
    assert busy.code() == grpc.StatusCode.FAILED_PRECONDITION, "jobs still wait for it"
    for j in jobs:
        clients.queue.CancelQueuedJob(Q.CancelQueuedJobRequest(id=j.id), timeout=T)
    deleted = clients.agents.DeleteAgentPool(A.DeleteAgentPoolRequest(name="py-pool"), timeout=T).pool
    assert deleted.name == "py-pool"
    gone = rpc_error(lambda: clients.agents.GetAgentPool(A.GetAgentPoolRequest(name="py-pool"), timeout=T))
    assert gone.code() == grpc.StatusCode.NOT_FOUND
    default = rpc_error(lambda: clients.agents.DeleteAgentPool(A.DeleteAgentPoolRequest(name="default"), timeout=T))
    assert default.code() == grpc.StatusCode.FAILED_PRECONDITION

    nowhere = rpc_error(
        lambda: clients.queue.EnqueueJob(job_request("q", b"x", routing=Q.Routing(pool="py-pool")), timeout=T)
    )
    assert nowhere.code() == grpc.StatusCode.NOT_FOUND, "jobs must name an existing pool"
