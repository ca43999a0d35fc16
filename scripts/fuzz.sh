#!/usr/bin/env bash
# Fuzzes request decoding/validation and the agent stream handler with the
# cargo-fuzz targets of fuzz/ (see fuzz/README.md), each for FUZZ_SECONDS
# (default 80: 160 s of fuzzing in all; the build comes on top), starting
# from the committed seed corpus, copied so runs never grow it. Exits
# non-zero if a target crashed, and says where its input was written.
#
# Needs only the stable toolchain: cargo-fuzz's nightly flags are enabled
# with RUSTC_BOOTSTRAP=1. Installs cargo-fuzz from crates.io if missing.
set -euo pipefail
cd "$(dirname "$0")/.."

FUZZ_SECONDS="${FUZZ_SECONDS:-80}"
TARGETS=(decode_requests stream_handler)
# The fuzz build has its own flags (coverage instrumentation), so it gets
# its own target directory: under CARGO_TARGET_DIR when that is set,
# outside the clone otherwise.
if [[ -n "${CARGO_TARGET_DIR:-}" ]]; then
  FUZZ_TARGET_DIR="$CARGO_TARGET_DIR/fuzz"
else
  FUZZ_TARGET_DIR="${HOME:-/tmp}/.cache/tether-fuzz-target"
fi
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "--> installing cargo-fuzz (crates.io)"
  nice -n 19 cargo install cargo-fuzz --locked
fi
cargo fuzz --version

fuzz() {
  nice -n 19 cargo fuzz "$1" --fuzz-dir fuzz --sanitizer none --target-dir "$FUZZ_TARGET_DIR" "${@:2}"
}

# One build per target: `cargo fuzz build` without one would also build the
# seed generator (a plain binary, not a fuzz target) with the fuzzing flags.
start=$SECONDS
for target in "${TARGETS[@]}"; do
  echo "--> build $target"
  fuzz build "$target"
done
echo "--> built in $((SECONDS - start)) s (target dir $FUZZ_TARGET_DIR)"

work="$(mktemp -d "${TMPDIR:-/tmp}/tether-fuzz.XXXXXX")"
trap 'rm -rf "$work"' EXIT
failed=()
for target in "${TARGETS[@]}"; do
  echo "--> fuzz $target for ${FUZZ_SECONDS} s"
  mkdir -p "$work/$target" "fuzz/artifacts/$target"
  cp -R "fuzz/corpus/$target/." "$work/$target/"
  log="$work/$target.log"
  extra=()
  # The stateful target's coverage is noisy (threads, timing), so libFuzzer
  # would never lengthen its inputs: allow long sessions from the start.
  if [[ $target == stream_handler ]]; then
    extra=(-max_len=2048 -len_control=0)
  fi
  status=0
  fuzz run "$target" "$work/$target" -- \
    -max_total_time="$FUZZ_SECONDS" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 "${extra[@]}" \
    >"$log" 2>&1 || status=$?
  # Coverage after the seeds and at the end, executions, speed, memory.
  grep -E '^#[0-9]+[[:space:]]+(INITED|DONE)|^Done [0-9]+ runs|^stat::(number_of_executed_units|average_exec_per_sec|peak_rss_mb)' "$log" || true
  if [[ $status -ne 0 ]]; then
    failed+=("$target")
    echo "!!! $target failed (exit $status); the end of its log:"
    tail -n 60 "$log"
    grep -E 'Test unit written to|artifact_prefix' "$log" || true
    echo "!!! reproduce: RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir fuzz -s none --target-dir $FUZZ_TARGET_DIR $target <the artifact above>"
  fi
done

if [[ ${#failed[@]} -gt 0 ]]; then
  echo "fuzzing found crashes in: ${failed[*]} (inputs under fuzz/artifacts/)"
  exit 1
fi
echo "fuzzing: ${#TARGETS[@]} targets, no crash"
