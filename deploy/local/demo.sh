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
# The inbox's sign-in token (user `admin`) and the HTTP ingest token, made up for this run.
SWITCHYARD_ADMIN_TOKEN="inbox-$(python3 -c 'import secrets; print(secrets.token_hex(12))')"
SWITCHYARD_INGEST_TOKEN="ingest-$(python3 -c 'import secrets; print(secrets.token_hex(12))')"
export SWITCHYARD_ADMIN_TOKEN SWITCHYARD_INGEST_TOKEN
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
HTTP_PORT="$(free_port)"
export SWITCHYARD_HTTP_LISTEN="127.0.0.1:$HTTP_PORT"
# The LLM agents' tools: an MCP server (the official mcp SDK) and a ticket system stand-in.
MCP_PORT="$(free_port)"
TICKETS_PORT="$(free_port)"
export SWITCHYARD_OPS_MCP_URL="http://127.0.0.1:$MCP_PORT/mcp"
export SWITCHYARD_TICKETS_URL="http://127.0.0.1:$TICKETS_PORT/tickets/{{ service }}"
# OpenTelemetry spans go to a local OTLP receiver (README, "OpenTelemetry spans").
OTLP_PORT="$(free_port)"
export SWITCHYARD_OTLP_ENDPOINT="http://127.0.0.1:$OTLP_PORT"

SY_PID=""
TOOL_PIDS=()
cleanup() {
    if [[ $KEEP -eq 0 ]]; then
        for p in "${TOOL_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    fi
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

say "Starting the LLM agents' tools: MCP server ops (port $MCP_PORT), ticket system (port $TICKETS_PORT)"
rm -f "$SWITCHYARD_STACK_DIR/mcp-calls.jsonl"
"$SWITCHYARD_STACK_DIR/venv/bin/python" "$ROOT/deploy/local/mcp_server.py" "$MCP_PORT" "$SWITCHYARD_STACK_DIR/mcp-calls.jsonl" \
    >"$SWITCHYARD_STACK_DIR/mcp.log" 2>&1 &
TOOL_PIDS+=($!)
python3 "$ROOT/deploy/local/ticket_service.py" "$TICKETS_PORT" >"$SWITCHYARD_STACK_DIR/tickets.log" 2>&1 &
TOOL_PIDS+=($!)
say "Starting an OTLP trace receiver (port $OTLP_PORT; deploy/local/otlp_receiver.py): switchyard exports its spans there"
rm -f "$SWITCHYARD_STACK_DIR/spans.jsonl"
"$SWITCHYARD_STACK_DIR/venv/bin/python" "$ROOT/deploy/local/otlp_receiver.py" "$OTLP_PORT" "$SWITCHYARD_STACK_DIR/spans.jsonl" \
    >"$SWITCHYARD_STACK_DIR/otlp.log" 2>&1 &
TOOL_PIDS+=($!)
for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$MCP_PORT") 2>/dev/null && (exec 3<>"/dev/tcp/127.0.0.1/$TICKETS_PORT") 2>/dev/null &&
        (exec 3<>"/dev/tcp/127.0.0.1/$OTLP_PORT") 2>/dev/null && break
    sleep 0.1
done

# What the stand-in model answers (a real model decides for itself; llmock follows a script,
# matched by model: alias analyst -> gpt-4o-mini for incident-analyst, advisor -> gpt-4.1-nano for
# cost-advisor). Point SWITCHYARD_LLM_BASE_URL/SWITCHYARD_LLM_API_KEY at a real provider instead
# and the same agents reason for real.
say "Scripting the stand-in model's answers for the two LLM agents"
LLM_ADMIN="${SWITCHYARD_LLM_BASE_URL%/v1}"
curl -fsS -X DELETE "$LLM_ADMIN/_llmock/scenario" >/dev/null
curl -fsS "$LLM_ADMIN/_llmock/scenario" -H 'content-type: application/json' -d @- >/dev/null <<'JSON'
{"behaviors": [
  {"type": "reply", "match": {"model": "gpt-4o-mini"}, "tool_calls": [
    {"name": "read_context", "arguments": {"keys": ["deployment", "last_completed_deployment"]}},
    {"name": "ops__service_status", "arguments": {"service": "checkout"}},
    {"name": "related_context", "arguments": {"relation": "depends_on", "keys": ["last_completed_deployment"]}}]},
  {"type": "reply", "match": {"model": "gpt-4o-mini"}, "tool_calls": [
    {"name": "write_finding", "arguments": {"key": "incident.summary", "value": "checkout breached availability (97.2 of 99.9) right after payments, which it depends on, deployed v8 (checkout's own v42 came earlier); error rate 3.1 %. payments v8 is the suspect."}},
    {"name": "propose_action", "arguments": {"action": "page", "parameters": {"team": "team-payments", "summary": "checkout availability 97.2 after payments v8"}, "impact": "medium", "reason": "availability SLO breached"}},
    {"name": "propose_action", "arguments": {"action": "rollback", "resource": "payments", "parameters": {"to_version": "v7"}, "impact": "high", "reason": "checkout's breach started right after payments v8"}}]},
  {"type": "reply", "match": {"model": "gpt-4o-mini"}, "text": "Paged team-payments and proposed rolling payments back to v7."},
  {"type": "reply", "match": {"model": "gpt-4.1-nano"}, "tool_calls": [
    {"name": "ticket", "arguments": {"service": "checkout", "title": "checkout spend 135 % of budget", "body": "Spend 1350 USD against 1000 USD for 2026-11."}}]},
  {"type": "reply", "match": {"model": "gpt-4.1-nano"}, "text": "Proposed a ticket for the checkout owners."}
]}
JSON

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
for f in deployments deployments-dependency sla-breaches; do
    # deployments-dependency: payments (which checkout depends on) deploys after checkout.
    topic="events.${f%-dependency}"
    "$BIN" --config "$CONFIG" publish --topic "$topic" --file "deploy/local/samples/$f.jsonl"
    sleep 1.5
done
echo "and the cost alert over HTTP ingest (POST /v1/events, a structured CloudEvent; 202 once the broker has it):"
python3 -c 'import json,sys; e=json.loads(open(sys.argv[1]).readline()); e["specversion"]="1.0"; print(json.dumps(e))' \
    deploy/local/samples/cost-thresholds.jsonl |
    curl -sS -w '  (HTTP %{http_code})\n' "http://$SWITCHYARD_HTTP_LISTEN/v1/events" \
        -H "Authorization: Bearer $SWITCHYARD_INGEST_TOKEN" -H 'Content-Type: application/cloudevents+json' --data-binary @-
sleep 1.5

echo "and one malformed record (it must land in switchyard.dlq without stopping anything):"
"$BIN" --config "$CONFIG" publish --topic events.deployments --raw --file deploy/local/samples/poison.txt --subject checkout

show() { # topic, summary fields
    local topic="$1"
    say "Records on $topic"
    "$BIN" --config "$CONFIG" tail "$topic" --from-beginning --idle-timeout-ms 3000 --format human
}
sleep 2
show switchyard.tasks
show switchyard.results
show switchyard.workflows
say "The incident-response run's timeline (switchyard workflows show)"
"$BIN" --config "$CONFIG" workflows list
RUN_ID="$("$BIN" --config "$CONFIG" workflows list | awk '/^run-/ {print $1; exit}')"
[[ -n "$RUN_ID" ]] && "$BIN" --config "$CONFIG" workflows show "$RUN_ID"
show switchyard.proposals
say "Context across resources: checkout depends_on payments (static in the config, and learned from checkout's deployment event)"
"$BIN" --config "$CONFIG" context show checkout --related 1
echo "every resource with an active SLA breach (the fact index):"
"$BIN" --config "$CONFIG" context query --fact sla --path active --equals true
echo "everything that depends on payments:"
"$BIN" --config "$CONFIG" context query --related-to payments --relation depends_on --direction in
show switchyard.approvals
show switchyard.actions

say "Approvals waiting for a person"
"$BIN" --config "$CONFIG" approvals list
echo "The agent inbox shows them too: http://$SWITCHYARD_HTTP_LISTEN/inbox (sign in with the token $SWITCHYARD_ADMIN_TOKEN)"
if [[ -n "${SWITCHYARD_SCREENSHOTS:-}" ]]; then
    # The README's screenshots are made so (headless Chromium through Selenium).
    "$SWITCHYARD_STACK_DIR/venv/bin/python" "$ROOT/deploy/local/inbox_screenshots.py" \
        "http://$SWITCHYARD_HTTP_LISTEN" "$SWITCHYARD_ADMIN_TOKEN" "$SWITCHYARD_SCREENSHOTS"
fi
APPROVALS="$("$BIN" --config "$CONFIG" approvals list | awk '/^apr-/ {print $1}')"
if [[ -n "$APPROVALS" ]]; then
    for APPROVAL_ID in $APPROVALS; do
        say "Approving $APPROVAL_ID through the CLI (the HTTP API does the same: POST /v1/approvals/$APPROVAL_ID/approve)"
        "$BIN" --config "$CONFIG" approvals approve "$APPROVAL_ID" --by demo-operator --why "checked by the on-call engineer"
    done
    sleep 2
    show switchyard.actions
fi

say "The LLM agents' tool calls and what the tools saw"
show switchyard.tool-calls
echo "MCP server ops saw:"; sed 's/^/  /' "$SWITCHYARD_STACK_DIR/mcp-calls.jsonl" 2>/dev/null || echo "  (nothing)"
echo "ticket system saw (after the approval, once):"; sed 's/^/  /' "$SWITCHYARD_STACK_DIR/tickets.log"
sleep 2
show switchyard.audit
show switchyard.dlq

say "One model call through the AI gateway (alias analyst -> provider default = llmock), as an agent in any language would make it"
curl -fsS "http://$SWITCHYARD_HTTP_LISTEN/v1/chat/completions" -H "Authorization: Bearer $SWITCHYARD_GATEWAY_KEY" \
    -H 'content-type: application/json' -H 'X-Switchyard-Task: demo-task-1' \
    -d '{"model": "analyst", "messages": [{"role": "user", "content": "Why did checkout breach its SLA?"}]}' |
    python3 -c 'import json,sys; r=json.load(sys.stdin); print("answer:", r["choices"][0]["message"]["content"][:120]); print("usage:", r["usage"])'
grep '"Model call."\|Model call\.' "$SWITCHYARD_STACK_DIR/switchyard.log" | tail -1 || true
curl -fsS "http://$SWITCHYARD_HTTP_LISTEN/metrics" | grep -E '^switchyard_(llm_(requests|tokens|cost)|agent_llm_(tokens|cost)|tool_calls)_total' || true

say "Verifying the audit trail's hash chains"
"$BIN" --config "$CONFIG" audit verify

say "switchyard status"
"$BIN" --config "$CONFIG" status

say "Metrics (excerpt)"
curl -fsS "http://$SWITCHYARD_HTTP_LISTEN/metrics" | grep -E '^switchyard_(events|tasks_emitted|dlq_records|agent_tasks|proposals|actions_accepted|actions_rejected|approvals|produce_batches)_total' || true

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

say "Dead letters (switchyard dlq list; redrive with switchyard dlq redrive --reason R [--dry-run])"
"$BIN" --config "$CONFIG" dlq list

say "The same story as OpenTelemetry spans at the OTLP receiver (exported every 5 s)"
sleep 6
python3 "$ROOT/deploy/local/span_tree.py" "$SWITCHYARD_STACK_DIR/spans.jsonl" demo-sla-1

say "Replay: the recorded events again, in a sandbox, with the config in force (switchyard replay; no model call)"
"$BIN" --config "$CONFIG" replay --since 1h || echo "(replay exit $?)"

say "What-if: without the approval rule for rollbacks? (switchyard --config candidate.yaml replay; exit 1 = decisions differ)"
CANDIDATE="$SWITCHYARD_STACK_DIR/candidate.yaml"
sed -e '/name: high-impact-rollbacks/d' -e "s#dir: \.\./topics#dir: $ROOT/topics#" \
    -e "s#^schemas_dir: \.\./schemas#schemas_dir: $ROOT/schemas#" "$CONFIG" >"$CANDIDATE"
"$BIN" --config "$CANDIDATE" replay --since 1h || echo "(replay exit $?: the decisions above differ)"

say "The story of the breach event, from the audit trail (switchyard trace demo-sla-1)"
"$BIN" --config "$CONFIG" trace demo-sla-1

if [[ $KEEP -eq 1 ]]; then
    say "Left running: switchyard pid $SY_PID; stop with: kill $SY_PID; SWITCHYARD_STACK_DIR=$SWITCHYARD_STACK_DIR $STACK down"
else
    say "Done; stopping switchyard and the stack"
fi
