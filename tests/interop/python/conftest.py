"""Session fixtures: one real `tether` server for the whole suite, and
clients generated from proto/ by grpcio-tools (see scripts/test.sh)."""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
GEN = HERE / "gen"
if not (GEN / "tether" / "v1" / "queue_pb2.py").exists():
    raise RuntimeError(
        f"{GEN} holds no generated code; run:\n"
        "  python3 -m grpc_tools.protoc -Iproto --python_out=tests/interop/python/gen "
        "--grpc_python_out=tests/interop/python/gen --pyi_out=tests/interop/python/gen "
        "proto/tether/v1/*.proto"
    )
sys.path.insert(0, str(GEN))

import pytest  # noqa: E402

from tether.v1 import agent_pb2  # noqa: E402

import support  # noqa: E402


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    proc = support.ServerProcess(tmp_path_factory.mktemp("tether-data"))
    yield proc
    code = proc.stop()
    # SIGTERM is a graceful shutdown: the server must exit cleanly.
    assert code == 0, "the server exited with %s:\n%s" % (code, "".join(proc.log_lines[-50:]))


@pytest.fixture(scope="session")
def clients(server):
    clients = support.connect(server.addr)
    yield clients
    clients.channel.close()


@pytest.fixture(scope="module")
def start_server(tmp_path_factory):
    """Starts a server of the module's own, with server flags the shared one
    lacks: `start_server("--watch-keep-alive", "1s")` returns its Clients.
    Each is stopped at the end of the module and must exit cleanly."""
    started = []

    def start(*flags):
        proc = support.ServerProcess(tmp_path_factory.mktemp("tether-data"), flags=flags)
        started.append(proc)
        proc.clients = support.connect(proc.addr)
        return proc.clients

    yield start
    for proc in started:
        if getattr(proc, "clients", None):
            proc.clients.channel.close()
        code = proc.stop()
        assert code == 0, "the server exited with %s:\n%s" % (code, "".join(proc.log_lines[-50:]))


@pytest.fixture(scope="session")
def unary_pool(clients):
    """A pool of its own for the unary-worker tests, so the stream agents of
    the "default" pool never get their jobs."""
    name = "py-unary"
    clients.agents.CreateAgentPool(
        agent_pb2.CreateAgentPoolRequest(pool=agent_pb2.AgentPool(name=name, description="python unary workers")),
        timeout=support.RPC_TIMEOUT,
    )
    return name


@pytest.fixture
def watch(clients):
    watches = []

    def open_watch(**request):
        w = support.Watch(clients, **request)
        watches.append(w)
        return w

    yield open_watch
    for w in watches:
        w.close()


@pytest.fixture
def stream_agent(clients):
    """Opens Connect-stream agents; each is closed (or killed) at the end."""
    agents = []

    def connect(hello):
        a = support.StreamAgent(clients, hello)
        agents.append(a)
        return a

    yield connect
    for a in agents:
        a.kill()
