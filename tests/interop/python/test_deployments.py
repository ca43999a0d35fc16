"""Deployments from Python: environments (create, replace, list, unknown
pool or next stage, cycles), a release rolled out by a Python agent on the
Connect stream in the environment's pool, promoted to the next
environment, rolled back, the audit trail event by event, a failed rollout
that cannot be promoted, and precise statuses for bad requests.

A deployment's state is seen only through GetDeployment: the waits poll it,
bounded by support.WAIT.
"""

import json

import grpc
import pytest

from tether.v1 import agent_pb2, dashboard_pb2, queue_pb2

from support import RPC_TIMEOUT, hello, rpc_error, violated_fields, wait_until

A = agent_pb2
D = dashboard_pb2
Q = queue_pb2
T = RPC_TIMEOUT
S = D.DeploymentState

# Pools and environments of this module (names no other module uses).
STAGING = "py-staging"
PRODUCTION = "py-production"
IDLE = "py-deploy-idle"  # an environment whose pool has no agent

RAN = [
    (D.DEPLOYMENT_STATE_UNSPECIFIED, D.DEPLOYMENT_STATE_PENDING),
    (D.DEPLOYMENT_STATE_PENDING, D.DEPLOYMENT_STATE_QUEUED),
    (D.DEPLOYMENT_STATE_QUEUED, D.DEPLOYMENT_STATE_IN_PROGRESS),
    (D.DEPLOYMENT_STATE_IN_PROGRESS, D.DEPLOYMENT_STATE_SUCCEEDED),
]


def ensure_pool(clients, name):
    try:
        clients.agents.CreateAgentPool(
            A.CreateAgentPoolRequest(pool=A.AgentPool(name=name, description="python deployments")), timeout=T
        )
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.ALREADY_EXISTS, e


def put_env(clients, name, pool, promote_to="", auto_rollback=False):
    return clients.dashboard.PutEnvironment(
        D.PutEnvironmentRequest(name=name, pool=pool, promote_to=promote_to, auto_rollback=auto_rollback),
        timeout=T,
    )


@pytest.fixture(scope="module")
def stages(clients):
    """Pools and environments: py-staging promotes to py-production; and
    py-deploy-idle, whose pool no agent serves."""
    for pool in (STAGING, PRODUCTION, IDLE):
        ensure_pool(clients, pool)
    put_env(clients, PRODUCTION, PRODUCTION)
    put_env(clients, STAGING, STAGING, promote_to=PRODUCTION)
    put_env(clients, IDLE, IDLE)
    return clients


def deploy(service, version, environment, command="./deploy.sh", env=None, **kw):
    """A CreateDeploymentRequest; an empty command leaves the rollout out."""
    kw.setdefault("requested_by", "py-ann")
    kw.setdefault("reason", f"ship {version}")
    rollout = D.RolloutSpec(command=command, env=env or {}) if command else None
    return D.CreateDeploymentRequest(service=service, version=version, environment=environment, rollout=rollout, **kw)


def create(clients, request):
    return clients.dashboard.CreateDeployment(request, timeout=T).deployment


def get(clients, deployment_id):
    return clients.dashboard.GetDeployment(D.GetDeploymentRequest(id=deployment_id), timeout=T).deployment


def wait_state(clients, deployment_id, state):
    def reached():
        d = get(clients, deployment_id)
        return d if d.state == state else None

    return wait_until(reached, f"deployment {deployment_id} to be {S.Name(state)}")


def events(clients, service, deployment_id="", environment=""):
    request = D.ListDeploymentEventsRequest(service=service, deployment_id=deployment_id, environment=environment)
    return list(clients.dashboard.ListDeploymentEvents(request, timeout=T).events)


def path(trail):
    return [(e.from_state, e.to_state) for e in trail]


def run_rollout(clients, agent, deployment, outcome=A.JOB_OUTCOME_SUCCEEDED, **finished):
    """The agent takes the deployment's rollout job, starts it (the
    deployment goes IN_PROGRESS) and ends it with `outcome`. Returns the
    assignment."""
    assignment = agent.expect("assignment")
    ref = assignment.job
    current = get(clients, deployment.id)
    assert ref.job_id == current.job_id, "the agent got the deployment's rollout job"
    assert assignment.queue == "tether.jobs", "a rollout job is a dashboard job"
    assert agent.accept_and_start(ref).accepted
    wait_state(clients, deployment.id, D.DEPLOYMENT_STATE_IN_PROGRESS)
    assert agent.finish(ref, outcome, **finished).accepted
    return assignment


def test_environments_are_stored_listed_and_checked(clients):
    ensure_pool(clients, "py-env-pool")
    put = put_env(clients, "py-env-prod", "py-env-pool")
    assert put.created
    env = put.environment
    assert (env.name, env.pool, env.promote_to, env.auto_rollback) == ("py-env-prod", "py-env-pool", "", False)
    assert env.HasField("create_time") and env.HasField("update_time")

    qa = put_env(clients, "py-env-qa", "py-env-pool", promote_to="py-env-prod", auto_rollback=True)
    assert qa.created and qa.environment.promote_to == "py-env-prod" and qa.environment.auto_rollback

    # Putting it again replaces it, keeping when it was created.
    again = put_env(clients, "py-env-prod", "py-env-pool", auto_rollback=True)
    assert not again.created
    assert again.environment.auto_rollback
    assert again.environment.create_time == env.create_time
    assert again.environment.update_time.ToDatetime() >= env.update_time.ToDatetime()

    listed = clients.dashboard.ListEnvironments(D.ListEnvironmentsRequest(), timeout=T).environments
    names = [e.name for e in listed]
    assert names == sorted(names), "by name"
    ours = {e.name: (e.pool, e.promote_to, e.auto_rollback) for e in listed if e.name.startswith("py-env-")}
    assert ours == {
        "py-env-prod": ("py-env-pool", "", True),
        "py-env-qa": ("py-env-pool", "py-env-prod", True),
    }

    err = rpc_error(lambda: put_env(clients, "py-env-x", "py-no-such-pool"))
    assert err.code() == grpc.StatusCode.NOT_FOUND and "py-no-such-pool" in err.details(), err
    err = rpc_error(lambda: put_env(clients, "py-env-x", "py-env-pool", promote_to="py-env-nowhere"))
    assert err.code() == grpc.StatusCode.NOT_FOUND and "py-env-nowhere" in err.details(), err
    err = rpc_error(lambda: put_env(clients, "py-env-x", "py-env-pool", promote_to="py-env-x"))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err
    # prod -> qa would close the loop qa -> prod -> qa.
    err = rpc_error(lambda: put_env(clients, "py-env-prod", "py-env-pool", promote_to="py-env-qa"))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "cycle" in err.details(), err
    # Nothing refused was stored.
    listed = clients.dashboard.ListEnvironments(D.ListEnvironmentsRequest(), timeout=T).environments
    assert "py-env-x" not in [e.name for e in listed]
    assert [e.promote_to for e in listed if e.name == "py-env-prod"] == [""]

    for request, field in [
        (D.PutEnvironmentRequest(name="", pool="py-env-pool"), "name"),
        (D.PutEnvironmentRequest(name="py env", pool="py-env-pool"), "name"),
        (D.PutEnvironmentRequest(name="py-env-y", pool=""), "pool"),
        (D.PutEnvironmentRequest(name="py-env-y", pool="py-env-pool", promote_to="a/b"), "promote_to"),
    ]:
        err = rpc_error(lambda: clients.dashboard.PutEnvironment(request, timeout=T))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, err)
        assert violated_fields(err) == [field], (field, err)


def test_staging_to_production_and_back_through_python_agents(stages, stream_agent):
    clients = stages
    stager = stream_agent(hello("py-stager", pool=STAGING))
    shipper = stream_agent(hello("py-shipper", pool=PRODUCTION))
    stager.heartbeat()
    shipper.heartbeat()

    # Nothing succeeded in production yet: nothing to roll back.
    err = rpc_error(
        lambda: clients.dashboard.RollbackDeployment(
            D.RollbackDeploymentRequest(service="py-api", environment=PRODUCTION), timeout=T
        )
    )
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err

    staged = create(clients, deploy("py-api", "v1", STAGING, env={"REGION": "eu"}))
    assert staged.id.startswith("py-api/"), "ids name their service"
    assert (staged.service, staged.version, staged.environment) == ("py-api", "v1", STAGING)
    assert staged.trigger == D.DEPLOYMENT_TRIGGER_CREATE
    assert staged.requested_by == "py-ann" and staged.reason == "ship v1"
    assert staged.rollout.command == "./deploy.sh"
    # The slot was free: its rollout job was created at once (an agent may
    # already hold it).
    assert staged.state in (D.DEPLOYMENT_STATE_QUEUED, D.DEPLOYMENT_STATE_IN_PROGRESS), S.Name(staged.state)
    assert staged.job_id

    assignment = run_rollout(clients, stager, staged)
    payload = json.loads(assignment.payload)
    assert payload["command"] == "./deploy.sh"
    assert payload["env"] == {
        "REGION": "eu",
        "TETHER_DEPLOY_SERVICE": "py-api",
        "TETHER_DEPLOY_VERSION": "v1",
        "TETHER_DEPLOY_ENVIRONMENT": STAGING,
        "TETHER_DEPLOY_ID": staged.id,
    }
    staged = wait_state(clients, staged.id, D.DEPLOYMENT_STATE_SUCCEEDED)
    assert staged.HasField("finish_time")

    job = clients.dashboard.GetJob(D.GetJobRequest(id=staged.job_id), timeout=T).job
    assert job.status == D.JOB_STATUS_SUCCESS
    assert job.routing.pool == STAGING, "ran in the staging pool"
    assert job.name == f"deploy py-api@v1 to {STAGING}"
    assert job.requested_by == "py-ann"
    assert [a.agent_id for a in job.attempts] == [stager.agent_id]

    trail = events(clients, "py-api", staged.id)
    assert path(trail) == RAN, trail
    assert trail[0].actor == "user:py-ann"
    assert all(e.actor == "tether" for e in trail[1:]), "the server followed the rollout job"
    assert all(e.job_id == staged.job_id for e in trail[1:]), "each names the rollout job"
    assert all((e.deployment_id, e.service, e.version, e.environment) == (staged.id, "py-api", "v1", STAGING)
               for e in trail)
    times = [e.time.ToDatetime() for e in trail]
    assert times == sorted(times), "oldest first"

    # Promote to the next stage: a new deployment of the same release.
    promoted = clients.dashboard.PromoteDeployment(
        D.PromoteDeploymentRequest(id=staged.id, requested_by="py-bob"), timeout=T
    ).deployment
    assert promoted.id != staged.id
    assert (promoted.environment, promoted.version) == (PRODUCTION, "v1")
    assert (promoted.trigger, promoted.promoted_from) == (D.DEPLOYMENT_TRIGGER_PROMOTE, staged.id)
    assert promoted.rollout == staged.rollout, "the release's spec"
    run_rollout(clients, shipper, promoted)
    promoted = wait_state(clients, promoted.id, D.DEPLOYMENT_STATE_SUCCEEDED)
    trail = events(clients, "py-api", promoted.id)
    assert path(trail) == RAN, trail
    assert trail[0].actor == "user:py-bob"

    # Production is the last stage.
    err = rpc_error(
        lambda: clients.dashboard.PromoteDeployment(D.PromoteDeploymentRequest(id=promoted.id), timeout=T)
    )
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "promote_to" in err.details(), err
    # Only v1 ever succeeded in production: no other good version to go back to.
    err = rpc_error(
        lambda: clients.dashboard.RollbackDeployment(
            D.RollbackDeploymentRequest(service="py-api", environment=PRODUCTION), timeout=T
        )
    )
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err

    # v2 straight to production, then rolled back to v1.
    v2 = create(clients, deploy("py-api", "v2", PRODUCTION, command="./deploy.sh --v2"))
    run_rollout(clients, shipper, v2)
    wait_state(clients, v2.id, D.DEPLOYMENT_STATE_SUCCEEDED)
    rolled = clients.dashboard.RollbackDeployment(
        D.RollbackDeploymentRequest(service="py-api", environment=PRODUCTION, reason="error rate",
                                    requested_by="py-carol"),
        timeout=T,
    )
    assert rolled.rolled_back_version == "v2"
    back = rolled.deployment
    assert (back.version, back.environment) == ("v1", PRODUCTION)
    assert (back.trigger, back.rollback_of) == (D.DEPLOYMENT_TRIGGER_ROLLBACK, v2.id)
    assert back.rollout.command == "./deploy.sh", "v1's release"
    run_rollout(clients, shipper, back)
    wait_state(clients, back.id, D.DEPLOYMENT_STATE_SUCCEEDED)
    v2 = get(clients, v2.id)
    assert v2.state == D.DEPLOYMENT_STATE_ROLLED_BACK
    last = events(clients, "py-api", v2.id)[-1]
    assert (last.from_state, last.to_state) == (D.DEPLOYMENT_STATE_SUCCEEDED, D.DEPLOYMENT_STATE_ROLLED_BACK)
    assert (last.actor, last.reason) == ("user:py-carol", "error rate")

    # v2 is marked bad: it is not deployed again.
    err = rpc_error(lambda: create(clients, deploy("py-api", "v2", STAGING, command="")))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "marked bad" in err.details(), err

    listed = clients.dashboard.ListDeployments(
        D.ListDeploymentsRequest(service="py-api", environment=PRODUCTION), timeout=T
    ).deployments
    assert [(d.id, d.version) for d in listed] == [(back.id, "v1"), (v2.id, "v2"), (promoted.id, "v1")], \
        "newest first"
    everywhere = clients.dashboard.ListDeployments(D.ListDeploymentsRequest(service="py-api"), timeout=T)
    assert [d.id for d in everywhere.deployments] == [back.id, v2.id, promoted.id, staged.id]
    assert everywhere.next_page_token == ""
    paged = clients.dashboard.ListDeployments(D.ListDeploymentsRequest(service="py-api", page_size=3), timeout=T)
    assert [d.id for d in paged.deployments] == [back.id, v2.id, promoted.id] and paged.next_page_token
    rest = clients.dashboard.ListDeployments(
        D.ListDeploymentsRequest(service="py-api", page_size=3, page_token=paged.next_page_token), timeout=T
    )
    assert [d.id for d in rest.deployments] == [staged.id] and rest.next_page_token == ""

    # The service's whole trail: deployments newest first, each oldest first.
    trail = events(clients, "py-api")
    owners = []
    for e in trail:
        if not owners or owners[-1] != e.deployment_id:
            owners.append(e.deployment_id)
    assert owners == [back.id, v2.id, promoted.id, staged.id]
    assert sum(1 for e in trail if e.from_state == D.DEPLOYMENT_STATE_UNSPECIFIED) == 4
    assert [e.deployment_id for e in events(clients, "py-api", environment=STAGING)] == [staged.id] * 4


def test_a_failed_rollout_is_not_promoted(stages, stream_agent):
    clients = stages
    stager = stream_agent(hello("py-stager-2", pool=STAGING))
    stager.heartbeat()
    failed = create(clients, deploy("py-web", "v1", STAGING, command="exit 3"))
    run_rollout(clients, stager, failed, A.JOB_OUTCOME_FAILED_PERMANENT, error="exit status 3", exit_code=3)
    failed = wait_state(clients, failed.id, D.DEPLOYMENT_STATE_FAILED)
    assert "failed" in failed.error, failed.error
    assert path(events(clients, "py-web", failed.id))[-1] == (
        D.DEPLOYMENT_STATE_IN_PROGRESS,
        D.DEPLOYMENT_STATE_FAILED,
    )
    job = clients.dashboard.GetJob(D.GetJobRequest(id=failed.job_id), timeout=T).job
    assert job.status == D.JOB_STATUS_FAILED
    err = rpc_error(lambda: clients.dashboard.PromoteDeployment(D.PromoteDeploymentRequest(id=failed.id), timeout=T))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "only a succeeded deployment" in err.details(), err


def test_bad_deployment_requests_get_precise_statuses(stages):
    clients = stages
    for request, field in [
        (deploy("", "v1", IDLE), "service"),
        (deploy("py-svc", "v 1", IDLE), "version"),
        (deploy("py-svc", "v1", ""), "environment"),
        (D.CreateDeploymentRequest(service="py-svc", version="v1", environment=IDLE,
                                   rollout=D.RolloutSpec(command="true", max_attempts=101)), "rollout.max_attempts"),
        (deploy("py-svc", "v1", IDLE, env={"TETHER_DEPLOY_VERSION": "v9"}), 'rollout.env["TETHER_DEPLOY_VERSION"]'),
    ]:
        err = rpc_error(lambda: create(clients, request))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, err)
        assert violated_fields(err) == [field], (field, err)

    err = rpc_error(lambda: create(clients, deploy("py-svc", "v1", "py-mars")))
    assert err.code() == grpc.StatusCode.NOT_FOUND and "py-mars" in err.details(), err
    err = rpc_error(lambda: create(clients, deploy("py-svc", "v1", IDLE, command="")))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "rollout.command" in err.details(), err

    # No agent serves the pool: it stays queued, which stores the release.
    first = create(clients, deploy("py-svc", "v1", IDLE, command="true"))
    assert first.state == D.DEPLOYMENT_STATE_QUEUED
    err = rpc_error(lambda: create(clients, deploy("py-svc", "v1", IDLE, command="false")))
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS, "a release never changes"
    # A second deployment waits for the first; the stored spec runs.
    second = create(clients, deploy("py-svc", "v1", IDLE, command=""))
    assert second.state == D.DEPLOYMENT_STATE_PENDING and not second.job_id
    assert second.rollout.command == "true"

    err = rpc_error(lambda: clients.dashboard.PromoteDeployment(D.PromoteDeploymentRequest(id=first.id), timeout=T))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, "still queued"
    err = rpc_error(
        lambda: clients.dashboard.RollbackDeployment(
            D.RollbackDeploymentRequest(service="py-svc", environment=IDLE), timeout=T
        )
    )
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, "nothing succeeded there"
    err = rpc_error(
        lambda: clients.dashboard.RollbackDeployment(
            D.RollbackDeploymentRequest(service="py-svc", environment="py-mars"), timeout=T
        )
    )
    assert err.code() == grpc.StatusCode.NOT_FOUND, err
    for bad_id in ["py-svc/no-such", "nope/123"]:
        err = rpc_error(lambda: get(clients, bad_id))
        assert err.code() == grpc.StatusCode.NOT_FOUND, (bad_id, err)
    err = rpc_error(lambda: get(clients, ""))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and violated_fields(err) == ["id"], err
    err = rpc_error(lambda: events(clients, "py-other", first.id))
    assert err.code() == grpc.StatusCode.NOT_FOUND, "another service's deployment"
    err = rpc_error(lambda: events(clients, "py-svc", first.id, environment=STAGING))
    assert err.code() == grpc.StatusCode.NOT_FOUND, "not in that environment"
    err = rpc_error(
        lambda: clients.dashboard.ListDeployments(
            D.ListDeploymentsRequest(service="py-svc", page_token="garbage"), timeout=T
        )
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    err = rpc_error(lambda: clients.dashboard.ListDeployments(D.ListDeploymentsRequest(service=""), timeout=T))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and violated_fields(err) == ["service"], err

    assert path(events(clients, "py-svc", second.id)) == [
        (D.DEPLOYMENT_STATE_UNSPECIFIED, D.DEPLOYMENT_STATE_PENDING)
    ]
    # The rollout job waits for an agent of the environment's pool.
    job = clients.dashboard.GetJob(D.GetJobRequest(id=first.job_id), timeout=T).job
    assert job.status == D.JOB_STATUS_PENDING and job.routing.pool == IDLE
    assert job.pending_reason.kind == D.WAIT_KIND_NO_AGENT_IN_POOL
