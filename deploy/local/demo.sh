#!/usr/bin/env bash
# Command (a): set up everything and run the main job end to end on the local stack.
#
#   deploy/local/demo.sh           # start broker + Redis, apply topics, run switchyard, publish the
#                                  # sample events, print what came out, stop everything
#   deploy/local/demo.sh --keep    # leave the stack and switchyard running afterwards
#
# Uses its own stack directory (.stack/demo) so it never mixes with test runs.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
KEEP=0
[[ "${1:-}" == "--keep" ]] && KEEP=1
export SWITCHYARD_STACK_DIR="$ROOT/.stack/demo"
STACK="$ROOT/deploy/local/stack.sh"
CONFIG="$ROOT/deploy/switchyard.yaml"
BIN="$ROOT/target/debug/switchyard"
say() { printf '\n== %s\n' "$*"; }

command -v cargo >/dev/null || { echo "cargo not found: install a Rust toolchain (https://rustup.rs) first" >&2; exit 1; }

say "Starting the local stack (tansu broker, Redis, the LLM stand-in llmock)"
"$STACK" up
# shellcheck disable=SC1091
source "$SWITCHYARD_STACK_DIR/env"
export SWITCHYARD_LLM_BASE_URL
# A key for the gateway's served endpoint (accepted as a key of the tenant `default`).
SWITCHYARD_GATEWAY_KEY="demo-$(python3 -c 'import secrets; print(secrets.token_hex(8))')"
export SWITCHYARD_GATEWAY_KEY
HTTP_PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
export SWITCHYARD_HTTP_LISTEN="127.0.0.1:$HTTP_PORT"

SY_PID=""
cleanup() {
    if [[ -n "$SY_PID" ]] && kill -0 "$SY_PID" 2>/dev/null; then
        if [[ $KEEP -eq 0 ]]; then
            kill -TERM "$SY_PID" 2>/dev/null || true
            wait "$SY_PID" 2>/dev/null || true
        fi
    fi
    if [[ $KEEP -eq 0 ]]; then "$STACK" down >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT

say "Building switchyard"
cargo build --quiet --bin switchyard

say "Validating the config and applying topics"
"$BIN" --config "$CONFIG" validate
"$BIN" --config "$CONFIG" topics apply

say "Starting switchyard (log: $SWITCHYARD_STACK_DIR/switchyard.log, metrics: http://$SWITCHYARD_HTTP_LISTEN/metrics)"
"$BIN" --config "$CONFIG" run >"$SWITCHYARD_STACK_DIR/switchyard.log" 2>&1 &
SY_PID=$!
for _ in $(seq 1 120); do
    if curl -fsS "http://$SWITCHYARD_HTTP_LISTEN/readyz" >/dev/null 2>&1; then break; fi
    kill -0 "$SY_PID" 2>/dev/null || { cat "$SWITCHYARD_STACK_DIR/switchyard.log" >&2; echo "switchyard exited" >&2; exit 1; }
    sleep 0.5
done
curl -fsS "http://$SWITCHYARD_HTTP_LISTEN/readyz"

say "Publishing sample events (deploy/local/samples/)"
# Seconds apart, as the real systems would be: events on different topics have no order between them.
for f in deployments sla-breaches cost-thresholds; do
    "$BIN" --config "$CONFIG" publish --topic "events.$f" --file "deploy/local/samples/$f.jsonl"
    sleep 1.5
done

echo "and one malformed record (it must land in switchyard.dlq without stopping anything):"
"$BIN" --config "$CONFIG" publish --topic events.deployments --raw --file deploy/local/samples/poison.txt --subject checkout

show() { # topic, summary fields
    local topic="$1"
    say "Records on $topic"
    "$BIN" --config "$CONFIG" tail "$topic" --from-beginning --idle-timeout-ms 3000 | python3 "$ROOT/deploy/local/summarize.py"
}
sleep 2
show switchyard.tasks
show switchyard.results
show switchyard.proposals
show switchyard.approvals
show switchyard.actions

say "Approvals waiting for a person"
"$BIN" --config "$CONFIG" approvals list
APPROVAL_ID="$("$BIN" --config "$CONFIG" approvals list | awk '/^apr-/ {print $1; exit}')"
if [[ -n "$APPROVAL_ID" ]]; then
    say "Approving $APPROVAL_ID through the CLI (the HTTP API does the same: POST /v1/approvals/$APPROVAL_ID/approve)"
    "$BIN" --config "$CONFIG" approvals approve "$APPROVAL_ID" --by demo-operator --why "breach started right after v42"
    sleep 1
    show switchyard.actions
fi
sleep 2
show switchyard.audit
show switchyard.dlq

say "One model call through the AI gateway (alias analyst -> provider default = llmock), as an agent in any language would make it"
curl -fsS "http://$SWITCHYARD_HTTP_LISTEN/v1/chat/completions" -H "Authorization: Bearer $SWITCHYARD_GATEWAY_KEY" \
    -H 'content-type: application/json' -H 'X-Switchyard-Task: demo-task-1' \
    -d '{"model": "analyst", "messages": [{"role": "user", "content": "Why did checkout breach its SLA?"}]}' |
    python3 -c 'import json,sys; r=json.load(sys.stdin); print("answer:", r["choices"][0]["message"]["content"][:120]); print("usage:", r["usage"])'
grep '"Model call."\|Model call\.' "$SWITCHYARD_STACK_DIR/switchyard.log" | tail -1 || true
curl -fsS "http://$SWITCHYARD_HTTP_LISTEN/metrics" | grep -E '^switchyard_llm_(requests|tokens|cost)_total' || true

say "Verifying the audit trail's hash chains"
"$BIN" --config "$CONFIG" audit verify

say "switchyard status"
"$BIN" --config "$CONFIG" status

say "Metrics (excerpt)"
curl -fsS "http://$SWITCHYARD_HTTP_LISTEN/metrics" | grep -E '^switchyard_(events|tasks_emitted|dlq_records|agent_tasks|proposals|actions_accepted|actions_rejected|approvals)_total' || true

say "Shared context of resource checkout in Redis"
redis-cli -u "$SWITCHYARD_REDIS_URL" --raw HGETALL 'switchyard:ctx:{default/checkout}' | python3 -c '
import json, sys
lines = sys.stdin.read().splitlines()
for k, v in zip(lines[::2], lines[1::2]):
    if k == "_version":
        print(f"  {k:<26} {v}")
    elif k == "_events":
        print(f"  {k:<26} {len(json.loads(v))} recent events")
    elif k.startswith("_"):
        continue  # per-key versions, recently finished task ids
    else:
        f = json.loads(v)
        print("  %-26s (by %s) %s" % (k, f["by"], json.dumps(f["value"])))
'

if [[ $KEEP -eq 1 ]]; then
    say "Left running: switchyard pid $SY_PID; stop with: kill $SY_PID; SWITCHYARD_STACK_DIR=$SWITCHYARD_STACK_DIR $STACK down"
else
    say "Done; stopping switchyard and the stack"
fi
