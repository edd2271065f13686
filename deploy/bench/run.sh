#!/usr/bin/env bash
# End-to-end benchmark, one command: switchyard vs the physical limit (a raw rdkafka chain with
# switchyard's hops, topics, partitions, records and bytes) vs the peer (quixstreams + redis-py), on
# one broker and Redis, in one run; plus switchyard's Redis command mix replayed pipelined, and
# scaling figures (1/100/10,000 resources; 1 and 3 processes in one group).
#
#   deploy/bench/run.sh                 # 20,000 events per phase over 10,000 resources
#   BENCH_EVENTS=50000 deploy/bench/run.sh
#   BENCH_FRACTIONS=0.5 deploy/bench/run.sh  # fixed rates as fractions of the maximum (0.25,0.5,0.75)
#   BENCH_SCALING=0 deploy/bench/run.sh      # leave the scaling phases out (on by default)
#   BENCH_LINGER_MS=20 deploy/bench/run.sh   # producer linger.ms of both the limit chain and switchyard
#   BENCH_ONLY=switchyard deploy/bench/run.sh  # one part only (switchyard, limit, peer, redis, scaling),
#                                              # e.g. under perf; no JSON or plot
#   BENCH_INSTRUCTIONS=1 deploy/bench/run.sh   # also instructions per event under callgrind
#                                              # (deploy/bench/instructions.sh; a few minutes more)
#
# Writes deploy/bench/results/e2e.json and e2e.png (the README shows them). The broker is restarted
# between phases (tansu's memory store grows without bound).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
export SWITCHYARD_STACK_DIR="$ROOT/.stack/bench"
STACK="$ROOT/deploy/local/stack.sh"
OUT="$ROOT/deploy/bench/results"
VENV="$SWITCHYARD_STACK_DIR/peer-venv"
trap '"$STACK" down >/dev/null 2>&1 || true' EXIT

"$STACK" up
# shellcheck disable=SC1091
source "$SWITCHYARD_STACK_DIR/env"
export SWITCHYARD_KAFKA_BROKERS SWITCHYARD_REDIS_URL

if [[ ! -x "$VENV/bin/python" ]] || ! "$VENV/bin/python" -c 'import quixstreams, redis, matplotlib' 2>/dev/null; then
    echo "bench: installing the peer (quixstreams, redis-py) and matplotlib into $VENV" >&2
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check -r "$ROOT/deploy/bench/requirements.txt"
fi
export BENCH_PEER_PYTHON="$VENV/bin/python"
mkdir -p "$OUT"
export BENCH_OUT="$OUT"

echo "bench: building (release) and running; this takes several minutes" >&2
cargo bench --bench e2e
if [[ -n "${BENCH_ONLY:-}" ]]; then
    exit 0   # one part: its table only, no JSON or plot
fi
"$VENV/bin/python" "$ROOT/deploy/bench/plot.py" "$OUT/e2e.json" "$OUT/e2e.png"
if [[ "${BENCH_INSTRUCTIONS:-0}" == 1 ]]; then
    "$ROOT/deploy/bench/instructions.sh"
fi
echo "bench: microbenchmarks (criterion)" >&2
cargo bench --bench micro -- --warm-up-time 1 --measurement-time 3 2>/dev/null | grep -E "^[a-z_/0-9]+ +time:|^(decode|route|resolve)" || true
