"""DashboardService.WatchEvents from Python: a dashboard job run by a
Python agent on the Connect stream arrives change by change (each change
starting where the one before it ended, as the job's history holds them),
a watcher resuming from a cursor gets exactly the rest, the kinds filter,
keep-alives on a quiet stream (and their cursor resumes with nothing
missed), and precise statuses for bad requests.

The module runs a server of its own with --watch-keep-alive 1s (the shared
server has the 15 s default), so "nothing more came" is a keep-alive
within a couple of seconds; every wait is bounded by support.WAIT.
"""

import queue
import threading
import time
from collections import defaultdict
from datetime import datetime, timezone

import grpc
import pytest

from tether.v1 import agent_pb2, dashboard_pb2, queue_pb2

import support
from support import RPC_TIMEOUT, STREAM_TIMEOUT, WAIT, hello, rpc_error, violated_fields

A = agent_pb2
D = dashboard_pb2
Q = queue_pb2
T = RPC_TIMEOUT
POOL = "py-watched"
KEEP_ALIVE = 1.0  # --watch-keep-alive of this module's server, in seconds
DEFAULT_KEEP_ALIVE = 15.0


@pytest.fixture(scope="module")
def watched(start_server):
    """This module's server: keep-alives every second."""
    clients = start_server("--watch-keep-alive", "1s")
    clients.agents.CreateAgentPool(
        A.CreateAgentPoolRequest(pool=A.AgentPool(name=POOL, description="python WatchEvents")), timeout=T
    )
    return clients


class EventWatch:
    """A WatchEvents stream read on a thread, so each wait is bounded."""

    def __init__(self, clients, kinds=(), cursor=""):
        request = D.WatchEventsRequest(kinds=list(kinds), cursor=cursor)
        self._call = clients.dashboard.WatchEvents(request, timeout=STREAM_TIMEOUT)
        self._messages: "queue.Queue[object]" = queue.Queue()
        self._thread = threading.Thread(target=self._read, name="watch-events", daemon=True)
        self._thread.start()
        # The server fixes where the watch starts ("from now", or the
        # cursor's first read) before it answers: once the headers are here,
        # every later change is sent.
        self._call.initial_metadata()

    def _read(self):
        try:
            for message in self._call:
                self._messages.put(message)
        except grpc.RpcError as e:
            self._messages.put(e)
        self._messages.put(None)

    def next(self, timeout=WAIT) -> D.WatchEventsResponse:
        """The next message, keep-alives included."""
        try:
            message = self._messages.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no WatchEvents message within {timeout}s") from None
        if message is None or isinstance(message, grpc.RpcError):
            self._messages.put(message)  # keep reporting the end
            raise AssertionError(f"the watch ended: {message!r}")
        assert message.cursor, f"a message without a cursor: {message}"
        return message

    def next_change(self) -> D.WatchEventsResponse:
        """The next message that is not a keep-alive, within WAIT."""
        deadline = time.monotonic() + WAIT
        while True:
            message = self.next(timeout=max(deadline - time.monotonic(), 0.001))
            if message.WhichOneof("event") != "keep_alive":
                return message

    def changes_until(self, done, what) -> list:
        """Changes until `done` holds for the list of them so far."""
        changes = []
        deadline = time.monotonic() + WAIT
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out after {WAIT}s waiting for {what}; got {keys(changes)}")
            try:
                message = self.next(timeout=left)
            except AssertionError as e:
                raise AssertionError(f"{e} while waiting for {what}; got {keys(changes)}") from None
            if message.WhichOneof("event") == "keep_alive":
                continue
            changes.append(message)
            if done(changes):
                return changes

    def close(self):
        self._call.cancel()
        self._thread.join(timeout=5)


@pytest.fixture
def watch_events(watched):
    watches = []

    def open_watch(kinds=(), cursor=""):
        w = EventWatch(watched, kinds, cursor)
        watches.append(w)
        return w

    yield open_watch
    for w in watches:
        w.close()


@pytest.fixture
def agent_on_watched(watched):
    """Connect-stream agents on this module's server; killed at the end."""
    agents = []

    def connect(hello_):
        a = support.StreamAgent(watched, hello_)
        agents.append(a)
        return a

    yield connect
    for a in agents:
        a.kill()


def entity(message):
    """What a change is about: ("job", id), ("agent", id), ("deployment", id)."""
    kind = message.WhichOneof("event")
    if kind == "job":
        return ("job", message.job.job_id)
    if kind == "agent":
        return ("agent", message.agent.agent.id)
    if kind == "deployment":
        return ("deployment", message.deployment.deployment_id)
    return (kind,)


def key(message):
    """A change's identity: what it is about and what it says, without times."""
    kind = message.WhichOneof("event")
    if kind == "job":
        j = message.job
        return (
            "job",
            j.job_id,
            support.state_name(j.previous_queued_state),
            support.state_name(j.queued_state),
            D.JobStatus.Name(j.status),
            j.attempt,
        )
    if kind == "agent":
        a = message.agent
        return (
            "agent",
            a.agent.id,
            (a.previous_health, a.previous_scheduling_status),
            (a.agent.health, a.agent.scheduling_status),
        )
    if kind == "deployment":
        d = message.deployment
        return ("deployment", d.deployment_id, d.from_state, d.to_state)
    return (kind,)


def keys(messages):
    return [key(m) for m in messages]


def by_entity(messages):
    """Each job's, agent's and deployment's changes, in the order sent."""
    out = defaultdict(list)
    for m in messages:
        out[entity(m)].append(key(m))
    return dict(out)


def assert_chained(messages, born=()):
    """Each job's, agent's and deployment's changes form one chain: every
    change starts where the one before it ended. The entities in `born`
    were created while watched: their first change starts from nothing."""
    last = {}
    for m in messages:
        kind = m.WhichOneof("event")
        if kind == "job":
            before, after = m.job.previous_queued_state, m.job.queued_state
        elif kind == "agent":
            a = m.agent
            before = (a.previous_health, a.previous_scheduling_status)
            after = (a.agent.health, a.agent.scheduling_status)
        elif kind == "deployment":
            before, after = m.deployment.from_state, m.deployment.to_state
        else:
            raise AssertionError(f"not a change: {m}")
        who = entity(m)
        if who in last:
            expected = last[who]
        elif who[1] in born:
            expected = (0, 0) if kind == "agent" else 0
        else:
            expected = before  # seen from the middle of its life
        assert before == expected, f"the chain of {who} is broken at {key(m)}: {keys(messages)}"
        last[who] = after


def is_job(message, job_id, queued_state):
    """Whether the message is the change of this job into this state."""
    return (
        message.WhichOneof("event") == "job"
        and message.job.job_id == job_id
        and message.job.queued_state == queued_state
    )


def is_registration(message, agent_id):
    """Whether the message is this agent's registration."""
    return (
        message.WhichOneof("event") == "agent"
        and message.agent.agent.id == agent_id
        and message.agent.previous_health == A.AGENT_HEALTH_UNSPECIFIED
    )


def job_changes(messages, job_id):
    return [m.job for m in messages if m.WhichOneof("event") == "job" and m.job.job_id == job_id]


def timestamp_age(ts) -> float:
    return abs((datetime.now(timezone.utc) - ts.ToDatetime(tzinfo=timezone.utc)).total_seconds())


def test_a_job_run_by_a_python_agent_arrives_change_by_change_and_a_resumed_watcher_gets_the_rest(
    watched, watch_events, agent_on_watched
):
    everything = watch_events()  # every kind, from now
    agent = agent_on_watched(hello("py-watched-agent", pool=POOL))
    agent.heartbeat()
    # Not a dashboard job: never sent.
    plain = watched.queue.EnqueueJob(support.job_request("py-watch-plain"), timeout=T).job
    job = watched.dashboard.CreateJob(
        D.CreateJobRequest(name="py-watched-build", command="make", routing=Q.Routing(pool=POOL), requested_by="py"),
        timeout=T,
    ).job

    assignment = agent.expect("assignment")
    ref = assignment.job
    assert ref.job_id == job.id
    assert agent.accept_and_start(ref).accepted
    assert agent.finish(ref, A.JOB_OUTCOME_SUCCEEDED).accepted

    # Until the job succeeded and the agent's registration came (each log
    # keeps its order, but the job log and the activity log, where agents
    # are, may be read at different times: on DynamoDB the agent that
    # registered first may come after the job).
    seen = everything.changes_until(
        lambda got: any(is_job(m, job.id, Q.QUEUED_JOB_STATE_SUCCEEDED) for m in got)
        and any(is_registration(m, agent.agent_id) for m in got),
        f"job {job.id} to succeed and agent {agent.agent_id} to register",
    )
    assert_chained(seen, born={job.id, agent.agent_id})
    assert plain.id not in {m.job.job_id for m in seen if m.WhichOneof("event") == "job"}, keys(seen)

    # The agent registered, with its id and name.
    registered = [m.agent.agent for m in seen if is_registration(m, agent.agent_id)]
    assert [a.name for a in registered] == ["py-watched-agent"], keys(seen)
    assert registered[0].pool == POOL

    # The job from its creation to its success, by the agent's attempt 1.
    changes = job_changes(seen, job.id)
    first, final = changes[0], changes[-1]
    assert (first.previous_queued_state, first.queued_state) == (
        Q.QUEUED_JOB_STATE_UNSPECIFIED,
        Q.QUEUED_JOB_STATE_QUEUED,
    ), first
    assert (first.status, first.attempt) == (D.JOB_STATUS_PENDING, 0)
    assert (final.status, final.attempt, final.agent_id) == (D.JOB_STATUS_SUCCESS, 1, agent.agent_id), final
    assert Q.QUEUED_JOB_STATE_RUNNING in [c.queued_state for c in changes], keys(seen)
    for c in changes:
        assert c.HasField("time") and timestamp_age(c.time) < 300, c
    # Change by change, as the job's history holds them.
    history = watched.dashboard.GetJob(D.GetJobRequest(id=job.id), timeout=T).job.transitions
    assert [(c.previous_queued_state, c.queued_state) for c in changes] == [
        (t.from_state, t.to_state) for t in history
    ], keys(seen)

    # Resumed after the first message, a watcher gets exactly the rest:
    # each job's and agent's changes in the same order (the interleaving of
    # different logs' changes may differ); an agent may have changed since
    # (its health), after what was seen.
    resumed = watch_events(cursor=seen[0].cursor)
    rest = by_entity(seen[1:])
    got = resumed.changes_until(
        lambda got: all(len(by_entity(got).get(who, [])) >= len(sent) for who, sent in rest.items()),
        "the changes after the first",
    )
    got_by_entity = by_entity(got)
    for who, sent in rest.items():
        if who[0] == "agent":
            assert got_by_entity[who][: len(sent)] == sent, (who, keys(got))
        else:
            assert got_by_entity[who] == sent, (who, keys(got))
    assert {who for who in got_by_entity if who[0] != "agent"} == {who for who in rest if who[0] != "agent"}, keys(got)
    assert plain.id not in {m.job.job_id for m in got if m.WhichOneof("event") == "job"}

    # Jobs only, resumed after the job's creation: its other changes, in
    # order, then nothing (a keep-alive) on this quiet server.
    created = next(m for m in seen if m.WhichOneof("event") == "job" and m.job.job_id == job.id)
    jobs_only = watch_events(kinds=[D.EVENT_KIND_JOB], cursor=created.cursor)
    after_creation = [key(m) for m in seen if m.WhichOneof("event") == "job"]
    after_creation = after_creation[after_creation.index(key(created)) + 1 :]
    assert [key(jobs_only.next_change()) for _ in after_creation] == after_creation
    quiet = jobs_only.next(timeout=KEEP_ALIVE + WAIT)
    assert quiet.WhichOneof("event") == "keep_alive", key(quiet)

    # From the last change, jobs and deployments: only keep-alives.
    tail = watch_events(kinds=[D.EVENT_KIND_JOB, D.EVENT_KIND_DEPLOYMENT], cursor=seen[-1].cursor)
    quiet = tail.next(timeout=KEEP_ALIVE + WAIT)
    assert quiet.WhichOneof("event") == "keep_alive", key(quiet)


def test_the_kinds_filter_what_is_sent(watched, watch_events, agent_on_watched):
    jobs_only = watch_events(kinds=[D.EVENT_KIND_JOB])
    agents_only = watch_events(kinds=[D.EVENT_KIND_AGENT])
    deployments_only = watch_events(kinds=[D.EVENT_KIND_DEPLOYMENT])
    agent = agent_on_watched(hello("py-filtered-agent", pool=POOL))
    agent.heartbeat()
    job = watched.dashboard.CreateJob(
        D.CreateJobRequest(name="py-filtered", command="true", routing=Q.Routing(pool=POOL)), timeout=T
    ).job
    ref = agent.expect("assignment").job
    assert agent.accept_and_start(ref).accepted
    assert agent.finish(ref, A.JOB_OUTCOME_SUCCEEDED).accepted

    jobs = jobs_only.changes_until(
        lambda got: is_job(got[-1], job.id, Q.QUEUED_JOB_STATE_SUCCEEDED), f"job {job.id} to succeed"
    )
    assert {m.WhichOneof("event") for m in jobs} == {"job"}, keys(jobs)
    assert_chained(jobs, born={job.id})
    registered = agents_only.changes_until(
        lambda got: is_registration(got[-1], agent.agent_id), f"agent {agent.agent_id} to register"
    )
    assert {m.WhichOneof("event") for m in registered} == {"agent"}, keys(registered)
    # No deployment happened: only keep-alives.
    quiet = deployments_only.next(timeout=KEEP_ALIVE + WAIT)
    assert quiet.WhichOneof("event") == "keep_alive", key(quiet)


def test_a_quiet_stream_gets_keep_alives_whose_cursor_misses_nothing(watched, watch_events):
    quiet = watch_events(kinds=[D.EVENT_KIND_DEPLOYMENT])
    opened = time.monotonic()
    first = quiet.next(timeout=KEEP_ALIVE + WAIT)
    after = time.monotonic() - opened
    assert first.WhichOneof("event") == "keep_alive", key(first)
    # Every second (--watch-keep-alive 1s), not the default 15 s.
    assert after < DEFAULT_KEEP_ALIVE / 2, f"the first keep-alive came after {after:.1f}s"
    assert first.keep_alive.HasField("time") and timestamp_age(first.keep_alive.time) < 60, first
    second = quiet.next(timeout=KEEP_ALIVE + WAIT)
    between = time.monotonic() - opened - after
    assert second.WhichOneof("event") == "keep_alive", key(second)
    assert between < DEFAULT_KEEP_ALIVE / 2, f"the second keep-alive came {between:.1f}s after the first"
    assert second.keep_alive.time.ToNanoseconds() > first.keep_alive.time.ToNanoseconds()

    # A keep-alive's cursor is a position like any other: a job created
    # after it is the first change a watcher resuming there gets.
    # (Pool "default": no agent there, it stays pending until cancelled.)
    job = watched.dashboard.CreateJob(D.CreateJobRequest(name="py-after-keep-alive", command="true"), timeout=T).job
    try:
        resumed = watch_events(kinds=[D.EVENT_KIND_JOB], cursor=second.cursor)
        change = resumed.next_change()
        created = ("job", job.id, "QUEUED_JOB_STATE_UNSPECIFIED", "QUEUED_JOB_STATE_QUEUED")
        assert key(change)[:4] == created, key(change)
    finally:
        watched.dashboard.CancelJob(D.CancelJobRequest(id=job.id), timeout=T)


@pytest.mark.parametrize(
    "what, request_, field",
    [
        ("an unspecified kind", dict(kinds=[0]), "kinds[0]"),
        ("an unknown kind", dict(kinds=[99]), "kinds[0]"),
        ("an unknown kind after a known one", dict(kinds=[D.EVENT_KIND_JOB, 99]), "kinds[1]"),
        ("too many kinds", dict(kinds=[1, 2, 3, 1]), "kinds"),
        ("a garbage cursor", dict(cursor="garbage!"), "cursor"),
        ("a huge cursor", dict(cursor="A" * 100_000), "cursor"),
    ],
)
def test_bad_watch_requests_are_invalid_argument_naming_the_field(watched, what, request_, field):
    call = watched.dashboard.WatchEvents(D.WatchEventsRequest(**request_), timeout=T)
    err = rpc_error(lambda: next(call))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (what, err)
    assert violated_fields(err) == [field], (what, err)
