"""Helpers for the Python interop suite: the real `tether` server as a child
process, gRPC stubs, bounded event-driven waits, and a raw Connect-stream
agent written only against the generated Python code.

Nothing here knows the server is written in Rust: it speaks the protos.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import uuid
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from tether.v1 import agent_pb2, agent_pb2_grpc, dashboard_pb2_grpc, queue_pb2, queue_pb2_grpc

REPO = Path(__file__).resolve().parents[3]

# Upper bound for any single wait; a test that reaches it has failed.
WAIT = 30.0
# Deadline of every unary call.
RPC_TIMEOUT = 10.0
# Bound on the whole life of a test's Connect stream.
STREAM_TIMEOUT = 120.0


def server_binary() -> Path:
    """The `tether` binary: $TETHER_BIN, else target/debug/tether."""
    path = Path(os.environ.get("TETHER_BIN", REPO / "target" / "debug" / "tether"))
    if not path.exists():
        raise RuntimeError(f"{path} not found: run `cargo build --bin tether` first (or set TETHER_BIN)")
    return path


def store_backend() -> str:
    """TETHER_TEST_STORE: "embedded" (the default) or "dynamodb"."""
    backend = os.environ.get("TETHER_TEST_STORE", "embedded")
    if backend not in ("embedded", "dynamodb"):
        raise RuntimeError(f"TETHER_TEST_STORE={backend!r}: use embedded or dynamodb")
    return backend


def write_secrets_key(path: Path) -> Path:
    """A fresh secrets key (32 random bytes) in a new file only its owner
    reads, for --secrets-key-file."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(os.urandom(32))
    return path


def store_arguments(env: dict, data_dir: Path, secrets_key: bool = True) -> list:
    """The server's store flags: DynamoDB Local on fresh tables when
    TETHER_TEST_STORE=dynamodb (the endpoint in TETHER_TEST_DYNAMODB_ENDPOINT,
    any static credentials), else the embedded store.

    The embedded store makes its own secrets key in its data directory; on
    DynamoDB the server has none unless given one, so with `secrets_key` a
    fresh key file is written next to the data and passed."""
    backend = store_backend()
    if backend == "embedded":
        return []
    if backend != "dynamodb":
        raise RuntimeError(f"TETHER_TEST_STORE={backend!r}: use embedded or dynamodb")
    endpoint = os.environ.get("TETHER_TEST_DYNAMODB_ENDPOINT")
    if not endpoint:
        raise RuntimeError("TETHER_TEST_STORE=dynamodb needs TETHER_TEST_DYNAMODB_ENDPOINT (scripts/dynamodb-local.sh start)")
    env.setdefault("AWS_ACCESS_KEY_ID", "local")
    env.setdefault("AWS_SECRET_ACCESS_KEY", "local")
    env.setdefault("AWS_REGION", "us-east-1")
    flags = ["--dynamodb-endpoint", endpoint, "--dynamodb-table-prefix", f"py-{uuid.uuid4().hex}-"]
    subprocess.run([str(server_binary()), "dynamodb", "create-tables", *flags], env=env, check=True,
                   stdout=subprocess.DEVNULL, timeout=WAIT)
    args = ["--store", "dynamodb", *flags]
    if secrets_key:
        key = write_secrets_key(data_dir.parent / f"{data_dir.name}-secrets.key")
        args += ["--secrets-key-file", str(key)]
    return args


class ServerProcess:
    """`tether server --listen 127.0.0.1:0` on a fresh data dir, with any
    further server `flags` (e.g. ["--watch-keep-alive", "1s"]); the bound
    address comes from its JSON log line "tether server listening"."""

    def __init__(self, data_dir: Path, secrets_key: bool = True, flags: Sequence[str] = ()):
        self.data_dir = data_dir
        self.addr: Optional[str] = None
        self.log_lines: list[str] = []
        self._listening = threading.Event()
        env = {**os.environ, "TETHER_LOG": os.environ.get("TETHER_LOG", "info")}
        store_args = store_arguments(env, data_dir, secrets_key)
        self.proc = subprocess.Popen(
            [
                *_DIE_WITH_PARENT,
                str(server_binary()),
                "server",
                "--listen",
                "127.0.0.1:0",
                "--data-dir",
                str(data_dir),
                "--log-format",
                "json",
                *store_args,
                *flags,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        # Keep draining stderr for the whole run so the server never blocks
        # on a full pipe.
        self._reader = threading.Thread(target=self._read_stderr, name="tether-stderr", daemon=True)
        self._reader.start()
        if not self._listening.wait(WAIT) or self.addr is None:
            self.stop()
            raise RuntimeError("the server did not report its address:\n" + "".join(self.log_lines[-50:]))

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log_lines.append(line)
            if self.addr is None:
                addr = listening_addr(line)
                if addr:
                    self.addr = addr
                    self._listening.set()
        self._listening.set()  # the process exited: wake the waiter

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        self._reader.join(timeout=5)
        return self.proc.returncode


# Runs the command after it (exec: the same process) with SIGTERM due when
# pytest dies, even when killed, so no server outlives the suite; where that
# is not possible (not Linux) the fixtures still stop it. A launcher rather
# than a preexec_fn: forking this process (it runs gRPC's threads) to run
# Python in the child before the exec can crash the child in gRPC's fork
# handlers; without a preexec_fn, subprocess uses vfork, which runs none.
_DIE_WITH_PARENT = [
    sys.executable,
    "-c",
    """
import ctypes, os, signal, sys
parent = int(sys.argv[1])
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
except (OSError, AttributeError):
    pass
if os.getppid() != parent:
    sys.exit("the test process is gone")
os.execv(sys.argv[2], sys.argv[2:])
""",
    str(os.getpid()),
]


def listening_addr(line: str) -> Optional[str]:
    """The `addr` of a JSON log line whose message is "tether server
    listening" (tracing's JSON puts them under "fields")."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict):
        return None
    fields = record.get("fields") if isinstance(record.get("fields"), dict) else record
    if fields.get("message") == "tether server listening":
        return fields.get("addr")
    return None


@dataclass
class Clients:
    channel: grpc.Channel
    queue: queue_pb2_grpc.QueueServiceStub
    agents: agent_pb2_grpc.AgentServiceStub
    dashboard: dashboard_pb2_grpc.DashboardServiceStub


def connect(addr: str) -> Clients:
    """A channel to a server, ready, with a stub of each service."""
    channel = grpc.insecure_channel(addr)
    grpc.channel_ready_future(channel).result(timeout=WAIT)
    return Clients(
        channel=channel,
        queue=queue_pb2_grpc.QueueServiceStub(channel),
        agents=agent_pb2_grpc.AgentServiceStub(channel),
        dashboard=dashboard_pb2_grpc.DashboardServiceStub(channel),
    )


def rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    """Runs a call that must fail and returns its error."""
    try:
        result = call()
    except grpc.RpcError as e:
        return e
    raise AssertionError(f"expected an RPC error, got {result!r}")


def violated_fields(err: grpc.RpcError) -> list:
    """The fields named by the google.rpc.BadRequest details of an error."""
    status = rpc_status.from_call(err)
    assert status is not None, f"no google.rpc.Status details in {err!r}"
    fields = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            fields += [v.field for v in bad_request.field_violations]
    return fields


def wait_until(check: Callable[[], object], what: str, every: float = 0.05):
    """Polls `check` (for state only a unary call shows) until it returns
    something truthy, which it returns; bounded by WAIT."""
    deadline = time.monotonic() + WAIT
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {WAIT}s waiting for {what}")
        time.sleep(every)


def state_name(value: int) -> str:
    return queue_pb2.QueuedJobState.Name(value)


def job_request(queue_name: str, payload: bytes = b"{}", **kw) -> queue_pb2.EnqueueJobRequest:
    return queue_pb2.EnqueueJobRequest(queue=queue_name, payload=payload, **kw)


class Watch:
    """A WatchQueue stream read on a thread, so each wait is bounded."""

    def __init__(self, clients: Clients, **request):
        self._call = clients.queue.WatchQueue(queue_pb2.WatchQueueRequest(**request), timeout=STREAM_TIMEOUT)
        self._events: "queue.Queue[object]" = queue.Queue()
        self._thread = threading.Thread(target=self._read, name="watch", daemon=True)
        self._thread.start()
        # WatchQueue streams changes "from now on": make sure the server has
        # registered the watch before the test makes any change.
        self._ready()

    def _ready(self) -> None:
        # The initial metadata is sent once the handler has subscribed.
        self._call.initial_metadata()

    def _read(self) -> None:
        try:
            for event in self._call:
                self._events.put(event)
        except grpc.RpcError as e:
            self._events.put(e)
        self._events.put(None)

    def wait_for(self, pred: Callable[[queue_pb2.QueuedJob], bool], what: str) -> queue_pb2.QueuedJob:
        deadline = time.monotonic() + WAIT
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out after {WAIT}s waiting for {what}")
            try:
                event = self._events.get(timeout=left)
            except queue.Empty:
                raise AssertionError(f"timed out after {WAIT}s waiting for {what}") from None
            if event is None or isinstance(event, grpc.RpcError):
                raise AssertionError(f"the watch ended while waiting for {what}: {event!r}")
            if event.HasField("job") and pred(event.job):
                return event.job

    def wait_state(self, job_id: str, state: int) -> queue_pb2.QueuedJob:
        return self.wait_for(lambda j: j.id == job_id and j.state == state, f"job {job_id} to be {state_name(state)}")

    def close(self) -> None:
        self._call.cancel()
        self._thread.join(timeout=5)


_END = object()


@dataclass
class StreamAgent:
    """An agent holding AgentService.Connect: requests come from a
    queue.Queue fed by the test (and a heartbeat thread), responses are read
    on a thread into another queue.Queue."""

    clients: Clients
    hello: agent_pb2.Hello
    welcome: agent_pb2.Welcome = field(init=False)
    agent_id: str = field(init=False)
    running: dict = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self._outbound: "queue.Queue[object]" = queue.Queue()
        self._inbound: "queue.Queue[object]" = queue.Queue()
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self.ended: Optional[grpc.RpcError] = None
        self._outbound.put(agent_pb2.ConnectRequest(hello=self.hello))
        self._call = self.clients.agents.Connect(self._requests(), timeout=STREAM_TIMEOUT)
        self._reader = threading.Thread(target=self._read, name=f"agent-{self.hello.name}", daemon=True)
        self._reader.start()
        first = self.next()
        if first.WhichOneof("message") != "welcome":
            raise AssertionError(f"expected a Welcome, got {first}")
        self.welcome = first.welcome
        self.agent_id = first.welcome.agent_id
        interval = first.welcome.heartbeat_interval.ToTimedelta().total_seconds() or 5.0
        self._heartbeats = threading.Thread(
            target=self._heartbeat_loop, args=(interval / 2,), name="heartbeat", daemon=True
        )
        self._heartbeats.start()

    # Outbound.

    def _requests(self) -> Iterator[agent_pb2.ConnectRequest]:
        while True:
            item = self._outbound.get()
            if item is _END:
                return
            yield item

    def send(self, **message) -> None:
        if self._closed.is_set():
            raise AssertionError("the agent already closed its stream")
        self._outbound.put(agent_pb2.ConnectRequest(**message))

    def heartbeat(self) -> None:
        with self._lock:
            running = list(self.running.values())
        self.send(
            heartbeat=agent_pb2.Heartbeat(
                metrics=agent_pb2.AgentMetrics(
                    cpu_percent=12.5,
                    memory_used_bytes=1 << 30,
                    memory_total_bytes=8 << 30,
                    disk_used_bytes=10 << 30,
                    disk_total_bytes=100 << 30,
                    running_jobs=len(running),
                ),
                running_jobs=running,
            )
        )

    def _heartbeat_loop(self, every: float) -> None:
        # Liveness only (the contract's "at least every heartbeat_interval");
        # tests never use it to synchronise.
        while not self._closed.wait(every):
            try:
                self.heartbeat()
            except AssertionError:
                return

    def close(self) -> None:
        """Half-closes the stream (the agent is done) and waits, bounded, for
        the server to end it."""
        if not self._closed.is_set():
            self._closed.set()
            self._outbound.put(_END)
        self._reader.join(timeout=WAIT)
        if self._reader.is_alive():
            self._call.cancel()
            raise AssertionError("the server did not end the stream after the agent closed it")

    def kill(self) -> None:
        self._closed.set()
        self._outbound.put(_END)
        self._call.cancel()
        self._reader.join(timeout=5)

    # Inbound.

    def _read(self) -> None:
        try:
            for response in self._call:
                self._inbound.put(response)
        except grpc.RpcError as e:
            self.ended = e
        self._inbound.put(_END)

    def next(self, timeout: float = WAIT) -> agent_pb2.ConnectResponse:
        try:
            item = self._inbound.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no server message within {timeout}s") from None
        if item is _END:
            self._inbound.put(_END)  # keep reporting the end
            raise AssertionError(f"the server ended the stream: {self.ended!r}")
        return item

    def expect(self, kind: str):
        """The next server message, which must be of this kind."""
        message = self.next()
        got = message.WhichOneof("message")
        if got != kind:
            raise AssertionError(f"expected {kind}, got {got}: {message}")
        return getattr(message, kind)

    def wait_end(self, timeout: float = WAIT) -> Optional[grpc.RpcError]:
        """Waits for the server to end the stream; returns its error, if any."""
        self._reader.join(timeout=timeout)
        if self._reader.is_alive():
            raise AssertionError(f"the stream was still open after {timeout}s")
        return self.ended

    # Job helpers.

    def accept_and_start(self, ref: agent_pb2.JobRef) -> agent_pb2.JobUpdateAck:
        with self._lock:
            self.running[ref.job_id] = ref
        self.send(assignment_ack=agent_pb2.AssignmentAck(job=ref, accepted=True))
        self.send(job_started=agent_pb2.JobStarted(job=ref))
        ack = self.expect("job_update_ack")
        assert ack.job == ref, ack
        return ack

    def accept_started(self, ref: agent_pb2.JobRef) -> None:
        """Accepts and starts in one AssignmentAck (protocol version 2 and
        later: an accepted start is not answered)."""
        with self._lock:
            self.running[ref.job_id] = ref
        self.send(assignment_ack=agent_pb2.AssignmentAck(job=ref, accepted=True, started=True))

    def finish(self, ref: agent_pb2.JobRef, outcome: int, **kw) -> agent_pb2.JobUpdateAck:
        self.send(job_finished=agent_pb2.JobFinished(job=ref, outcome=outcome, **kw))
        ack = self.expect("job_update_ack")
        assert ack.job == ref, ack
        with self._lock:
            self.running.pop(ref.job_id, None)
        return ack


def hello(name: str, slots: int = 1, pool: str = "default", **kw) -> agent_pb2.Hello:
    """A Hello of protocol version 1 unless max_protocol_version says otherwise."""
    kw.setdefault("min_protocol_version", 1)
    kw.setdefault("max_protocol_version", 1)
    return agent_pb2.Hello(name=name, pool=pool, slots=slots, version="python-interop", **kw)


# The stream protocol version whose Assignments carry secrets (rule 12 of
# AgentService.Connect): the server sends no job with secrets to an older agent.
PROTOCOL_SECRETS = 4
