#!/usr/bin/env bash
# End-to-end benchmark, one command: switchyard vs the physical limit (raw rdkafka chain, same hops)
# vs the peer (quixstreams + redis-py), on one broker and Redis, in one run.
#
#   deploy/bench/run.sh                 # 20,000 events per phase over 10,000 resources
#   BENCH_EVENTS=50000 deploy/bench/run.sh
#   BENCH_LINGER_MS=20 deploy/bench/run.sh   # producer linger.ms of both the limit chain and switchyard
#   BENCH_ONLY=switchyard deploy/bench/run.sh  # one maximum-rate phase (or =limit), e.g. under perf
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
    exit 0   # a single phase: no table, JSON or plot
fi
"$VENV/bin/python" "$ROOT/deploy/bench/plot.py" "$OUT/e2e.json" "$OUT/e2e.png"
echo "bench: microbenchmarks (criterion)" >&2
cargo bench --bench micro -- --warm-up-time 1 --measurement-time 3 2>/dev/null | grep -E "^[a-z_/0-9]+ +time:|^(decode|route|resolve)" || true
