#!/usr/bin/env bash
# Tests scripts/check_api_compat.sh on copies of the module: the unmodified
# copy and a copy with only additions pass; a copy with a renamed RPC and one
# with a deleted field fail, naming the change; a missing baseline fails
# rather than skipping.
set -euo pipefail
cd "$(dirname "$0")/.."
check="$PWD/scripts/check_api_compat.sh"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
failures=0

# copy <name>: a fresh copy of the module (buf.yaml, buf.lock if any, proto/).
copy() {
  mkdir -p "$tmp/$1"
  cp -R proto buf.yaml "$tmp/$1/"
  if [ -f buf.lock ]; then cp buf.lock "$tmp/$1/"; fi
  echo "$tmp/$1"
}

# edit <file> <sed script>: applies the script and insists that it changed
# the file, so a test never passes because its edit matched nothing.
edit() {
  cp "$1" "$1.orig"
  sed -i -E "$2" "$1"
  if cmp -s "$1" "$1.orig"; then
    echo "FAIL: edit '$2' changed nothing in $1 (has the proto moved on?)" >&2
    exit 1
  fi
  rm "$1.orig"
}

# expect_pass <case> <dir>
expect_pass() {
  local out status=0
  out="$(bash "$check" "$2" 2>&1)" || status=$?
  if [ "$status" -eq 0 ]; then
    echo "ok: $1 passes"
  else
    echo "FAIL: $1 should pass but exited $status:" >&2
    echo "$out" >&2
    failures=$((failures + 1))
  fi
}

# expect_fail <case> <dir> <pattern>...: non-zero exit and output matching
# every pattern (grep -E).
expect_fail() {
  local name="$1" dir="$2" out status=0 pattern
  shift 2
  local first="$1"
  out="$(bash "$check" "$dir" 2>&1)" || status=$?
  if [ "$status" -eq 0 ]; then
    echo "FAIL: $name should fail but passed:" >&2
    echo "$out" >&2
    failures=$((failures + 1))
    return
  fi
  for pattern in "$@"; do
    if ! grep -qE -- "$pattern" <<<"$out"; then
      echo "FAIL: $name failed (exit $status) but its output lacks /$pattern/:" >&2
      echo "$out" >&2
      failures=$((failures + 1))
      return
    fi
  done
  echo "ok: $name fails (exit $status): $(grep -m1 -E -- "$first" <<<"$out")"
}

echo "==> unmodified copy"
expect_pass "unmodified copy" "$(copy unmodified)"

echo "==> additions only (new message, new RPC)"
dir="$(copy additions)"
edit "$dir/proto/tether/v1/queue.proto" \
  's/^(service QueueService \{)$/\1\n  rpc ApiCompatProbe(ApiCompatProbeRequest) returns (ApiCompatProbeResponse);/'
cat >>"$dir/proto/tether/v1/queue.proto" <<'PROTO'

message ApiCompatProbeRequest {
  string probe = 1;
}

message ApiCompatProbeResponse {}
PROTO
expect_pass "a copy with only additions" "$dir"

echo "==> renamed RPC"
dir="$(copy renamed-rpc)"
edit "$dir/proto/tether/v1/queue.proto" 's/^(  rpc )EnqueueJob\(/\1SubmitJob(/'
expect_fail "a copy with QueueService.EnqueueJob renamed" "$dir" \
  'tether/v1/queue\.proto' '"EnqueueJob".*deleted'

echo "==> deleted field"
dir="$(copy deleted-field)"
edit "$dir/proto/tether/v1/queue.proto" '/^  string idempotency_key = 8[ ;]/d'
expect_fail "a copy with EnqueueJobRequest.idempotency_key deleted" "$dir" \
  'tether/v1/queue\.proto' '"idempotency_key" on message "EnqueueJobRequest" was deleted'

echo "==> missing baseline"
out="" status=0
out="$(TETHER_API_BASELINE="$tmp/no-such-baseline.binpb" bash "$check" "$(copy missing-baseline)" 2>&1)" || status=$?
if [ "$status" -ne 0 ] && grep -q 'no-such-baseline.binpb.*missing' <<<"$out"; then
  echo "ok: a missing baseline fails (exit $status): $out"
else
  echo "FAIL: a missing baseline should fail and say so, got exit $status:" >&2
  echo "$out" >&2
  failures=$((failures + 1))
fi
if grep -qi 'skip' <<<"$out"; then
  echo "FAIL: the missing-baseline message mentions skipping: $out" >&2
  failures=$((failures + 1))
fi

if [ "$failures" -ne 0 ]; then
  echo "FAIL: $failures API compatibility test(s) failed" >&2
  exit 1
fi
echo "ok: all API compatibility tests passed"
