#!/usr/bin/env bash
# Fails if the protos break the last released API, api/baseline.binpb (see
# api/README.md), under the breaking rules of the module's buf.yaml. Additions
# (new files, messages, fields, RPCs) pass; deletions, renames, renumbering
# and type changes fail. There is no skip path: a missing baseline or a buf
# failure is an error.
#   scripts/check_api_compat.sh [<buf workspace dir>]   (default: the repo root)
# TETHER_API_BASELINE overrides the baseline image's path.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
module="${1:-$root}"
baseline="${TETHER_API_BASELINE:-$root/api/baseline.binpb}"

fail() {
  echo "error: API compatibility check failed: $*" >&2
  exit 1
}

command -v buf >/dev/null 2>&1 ||
  fail "buf is not installed (python3 -m pip install buf-bin)"
[ -d "$module" ] || fail "module directory '$module' does not exist"
[ -f "$module/buf.yaml" ] || fail "no buf.yaml in '$module'"
[ -f "$baseline" ] && [ -s "$baseline" ] ||
  fail "API baseline '$baseline' is missing or empty; restore it from git or rebuild it with scripts/api-baseline.sh <release ref>"

# Only the project's own files are compared, not the well-known types they
# import (which ship with buf). #format=binpb so any file name works.
status=0
buf breaking "$module" --against "${baseline}#format=binpb" --exclude-imports || status=$?
case "$status" in
  0) echo "ok: $module is compatible with the released API ($baseline)" ;;
  100) fail "breaking changes against the released API ($baseline), listed above" ;;
  *) fail "buf breaking exited with status $status (see above)" ;;
esac
