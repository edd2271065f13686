#!/usr/bin/env bash
# A noise-free figure: instructions per input event of the switchyard process, counted by callgrind.
#
#   deploy/bench/instructions.sh                       # 3,000 events over 1,000 resources
#   INSTR_EVENTS=6000 INSTR_RESOURCES=2000 deploy/bench/instructions.sh
#
# How: starts the stack, runs `switchyard run` (release build, the e2e bench's config) under
# `valgrind --tool=callgrind --instr-atstart=no`, sends the first INSTR_WARM_FRACTION (0.1) of the
# events and waits for their results and a quiet output (group joins, caches, connections: not
# counted), then `callgrind_control -i on` and `-z`, produces the rest at once, waits for every result
# and a quiet output, `callgrind_control --dump`, and divides that dump's Ir (every thread; idle
# polling during the window included) by the events produced while counting.
#
# --instr-atstart=no, not --collect-atstart=no: with collection off at start nothing turns it on
# again (callgrind_control switches instrumentation, not collection) and every dump says 0 Ir.
#
# Writes deploy/bench/results/instructions.json. Takes a few minutes (valgrind runs the measured
# part ~50x slower); INSTR_TIMEOUT_S (1800) bounds the whole run. Uses the same stack directory as
# run.sh: do not run both at once.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
export SWITCHYARD_STACK_DIR="${SWITCHYARD_STACK_DIR:-$ROOT/.stack/bench}"
STACK="$ROOT/deploy/local/stack.sh"
OUT="$ROOT/deploy/bench/results"

for tool in valgrind callgrind_control; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "instructions: $tool is not installed (apt-get install valgrind)" >&2
        exit 1
    fi
done

trap '"$STACK" down >/dev/null 2>&1 || true' EXIT
"$STACK" up
# shellcheck disable=SC1091
source "$SWITCHYARD_STACK_DIR/env"
export SWITCHYARD_KAFKA_BROKERS SWITCHYARD_REDIS_URL
mkdir -p "$OUT"
export BENCH_OUT="$OUT"

echo "instructions: building (release) and measuring; this takes a few minutes" >&2
# The bench binary drives the run (producing, reading, callgrind_control); it measures the release
# build of switchyard that `cargo bench` builds alongside it (target/release/switchyard).
cargo bench --bench e2e -- --instructions
