#!/usr/bin/env bash
# Gateway overhead benchmark, one command: chat completions against a fast OpenAI-protocol upstream
# (examples/llm_bench.rs; GW_UPSTREAM=llmock for the stack's stand-in) directly, through switchyard's
# served endpoint, and through the LiteLLM proxy, side by side; the load generator is llm_bench too.
#
#   deploy/bench/gateway.sh                         # 1,000 sequential + 20,000 concurrent calls (LiteLLM 3,000)
#   GW_CALLS=10000 GW_CONCURRENCY=128 deploy/bench/gateway.sh
#
# Writes deploy/bench/results/gateway.json. Installs litellm[proxy] into .stack/bench/gateway-venv.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
export SWITCHYARD_STACK_DIR="$ROOT/.stack/bench"
STACK="$ROOT/deploy/local/stack.sh"
VENV="$SWITCHYARD_STACK_DIR/gateway-venv"
trap '"$STACK" down >/dev/null 2>&1 || true' EXIT

"$STACK" up
# shellcheck disable=SC1091
source "$SWITCHYARD_STACK_DIR/env"
export SWITCHYARD_KAFKA_BROKERS SWITCHYARD_REDIS_URL SWITCHYARD_LLM_BASE_URL

if [[ ! -x "$VENV/bin/litellm" ]] || ! "$VENV/bin/python" -c 'import httpx, litellm' 2>/dev/null; then
    echo "gateway bench: installing the LiteLLM proxy into $VENV" >&2
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check -r "$ROOT/deploy/bench/requirements-gateway.txt"
fi
echo "gateway bench: building switchyard (release)" >&2
cargo build --release --quiet --bin switchyard --example llm_bench
"$ROOT/target/release/switchyard" topics apply >/dev/null
GW_LITELLM="$VENV/bin/litellm" "$VENV/bin/python" "$ROOT/deploy/bench/gateway.py"
