#!/usr/bin/env bash
# Command (b): set up everything and run the whole test suite against a real broker and Redis.
#
#   deploy/local/test.sh            # format check, clippy, unit + property + integration tests
#   deploy/local/test.sh -- NAME    # pass extra arguments to `cargo test` (e.g. a test name filter)
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

say "cargo test (unit, property and integration tests against the stack)"
start=$SECONDS
cargo test --no-fail-fast --all-targets "$@"
say "All tests passed in $((SECONDS - start)) s"
