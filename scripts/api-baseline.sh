#!/usr/bin/env bash
# Rebuilds api/baseline.binpb, the released API that scripts/check_api_compat.sh
# checks every change against, from the protos and buf.yaml at a git ref.
# Run it when cutting a release, on the release commit or tag:
#   scripts/api-baseline.sh [<git ref>]    (default HEAD)
set -euo pipefail
cd "$(dirname "$0")/.."

ref="${1:-HEAD}"
if ! commit="$(git rev-parse --verify --quiet "${ref}^{commit}")"; then
  echo "error: '$ref' is not a commit in this clone" >&2
  exit 1
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# Exactly that commit's module: its buf.yaml (and buf.lock, if any) and proto/.
paths=(buf.yaml proto)
if git cat-file -e "${commit}:buf.lock" 2>/dev/null; then
  paths+=(buf.lock)
fi
git archive "$commit" "${paths[@]}" | tar -x -C "$tmp"

# Source info (comments, line numbers) is not needed to compare descriptors.
buf build "$tmp" --exclude-source-info -o "$tmp/baseline.binpb"
mkdir -p api
mv "$tmp/baseline.binpb" api/baseline.binpb
echo "wrote api/baseline.binpb from $ref ($commit)"
