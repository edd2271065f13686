#!/usr/bin/env bash
# Command (b): set up everything and run the whole test suite against a real broker and Redis.
#
#   deploy/local/test.sh            # format check, clippy, unit + property + integration tests,
#                                   # then the short fault suite (deploy/local/faults.sh --short)
#   deploy/local/test.sh -- NAME    # pass extra arguments to `cargo test` (e.g. a test name filter;
#                                   # the fault suite is skipped then)
#
# Starts its own stack (.stack/test) and stops it afterwards. Exits non-zero on any failure.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
[[ "${1:-}" == "--" ]] && shift
export SWITCHYARD_STACK_DIR="$ROOT/.stack/test"
STACK="$ROOT/deploy/local/stack.sh"
say() { printf '\n== %s\n' "$*"; }

command -v cargo >/dev/null || { echo "cargo not found: install a Rust toolchain (https://rustup.rs) first" >&2; exit 1; }

trap '"$STACK" down >/dev/null 2>&1 || true' EXIT

say "Starting the local stack (tansu broker, Redis, the LLM stand-in llmock)"
"$STACK" up
# shellcheck disable=SC1091
source "$SWITCHYARD_STACK_DIR/env"
export SWITCHYARD_KAFKA_BROKERS SWITCHYARD_REDIS_URL SWITCHYARD_LLM_BASE_URL
export RUST_BACKTRACE=1

say "cargo fmt --check"
cargo fmt --all -- --check

say "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets --quiet -- -D warnings

say "import graph of src/: no circle, nothing importing back up (deploy/tools/import_graph.py)"
python3 deploy/tools/import_graph.py --check | sed -n '1,5p'

start=$SECONDS
if cargo nextest --version >/dev/null 2>&1; then
    # Every test binary's tests interleaved, each test in its own process (.config/nextest.toml).
    # They mostly wait on the stack, so more run at once than there are cores.
    threads="${SWITCHYARD_TEST_THREADS:-4}"
    say "cargo nextest run (unit, property and integration tests against the stack; $threads at once)"
    cargo nextest run --lib --bins --tests --test-threads "$threads" "$@"
    # The benchmarks (their own harness, which nextest cannot list) in test mode: a quick check
    # that they build and run.
    if [[ $# -eq 0 ]]; then cargo test --benches --quiet; fi
else
    say "cargo test (unit, property and integration tests against the stack; cargo-nextest is not installed)"
    cargo test --no-fail-fast --all-targets "$@"
fi
say "Tests passed in $((SECONDS - start)) s"

if [[ $# -eq 0 && "${SWITCHYARD_SKIP_FAULTS:-}" != 1 ]]; then
    say "Short fault suite (deploy/local/faults.sh --short; README, \"Faults we test\")"
    SWITCHYARD_BIN="$ROOT/target/debug/switchyard" deploy/local/faults.sh --short
fi
say "All tests passed in $((SECONDS - start)) s"
