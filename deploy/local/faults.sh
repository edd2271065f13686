#!/usr/bin/env bash
# The fault suite (README, "Faults we test"): three switchyard instances under steady load over
# 1,000 resources per fault, with actions and approvals in flight, and an independent checker.
#
#   deploy/local/faults.sh            # every fault: instance kill, Redis kill (AOF), broker kill
#                                     # (S3 storage), broker SIGSTOP, Redis restarted without data
#   deploy/local/faults.sh --short    # instance kill, broker SIGSTOP, Redis without data (CI)
#   deploy/local/faults.sh --phases broker-kill,redis-aof [--resources N --rate N]
#
# Starts a world of its own (moto S3 server, tansu on it, Redis with AOF, three instances) under
# .stack/faults, using the test stack's installation (venv, tansu, redis-server); stops it after.
# Exits non-zero when the checker finds a lost event, a doubled action, an order violation, or an
# audit trail that does not verify.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
INSTALL_DIR="${SWITCHYARD_FAULTS_INSTALL_DIR:-$ROOT/.stack/test}"
SWITCHYARD_STACK_DIR="$INSTALL_DIR" deploy/local/stack.sh install
BIN="${SWITCHYARD_BIN:-$ROOT/target/debug/switchyard}"
if [[ -z "${SWITCHYARD_BIN:-}" ]]; then
    cargo build --quiet --bin switchyard
fi
start=$SECONDS
"$INSTALL_DIR/venv/bin/python" deploy/local/faults.py --bin "$BIN" --tansu "$INSTALL_DIR/bin/tansu" \
    --work "$ROOT/.stack/faults" "$@"
echo "faults: passed in $((SECONDS - start)) s"
