#!/usr/bin/env bash
# The fault suite (README, "Faults we test"): three switchyard instances under steady load over
# 1,000 resources per fault, with actions and approvals in flight, and an independent checker.
#
#   deploy/local/faults.sh            # instance kill, Redis kill (AOF), broker SIGSTOP, Redis
#                                     # restarted without data, 1,000 resources each
#   deploy/local/faults.sh --broker-kill  # broker kill -9 on S3 storage (moto), 100 resources
#   deploy/local/faults.sh --short    # instance kill, broker SIGSTOP, Redis without data over 300
#                                     # resources (what CI runs: deploy/local/test.sh)
#   deploy/local/faults.sh --phases instance,redis-aof [--resources N --rate N --storage s3 --keep]
#
# Starts a world of its own (tansu — on a local S3 server, moto, for the broker kill — Redis with
# its AOF fsynced on every write, three instances) under .stack/faults, using the test stack's
# installation (venv, tansu, redis-server); stops it after.
# Exits non-zero when the checker finds a lost event, a doubled action, an order violation, or an
# audit trail that does not verify.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
INSTALL_DIR="${SWITCHYARD_FAULTS_INSTALL_DIR:-$ROOT/.stack/test}"
SWITCHYARD_STACK_DIR="$INSTALL_DIR" deploy/local/stack.sh install
if [[ " $* " == *" --storage s3"* || "${1:-}" == --broker-kill ]]; then
    SWITCHYARD_STACK_DIR="$INSTALL_DIR" deploy/local/stack.sh install-s3
fi
BIN="${SWITCHYARD_BIN:-$ROOT/target/debug/switchyard}"
if [[ -z "${SWITCHYARD_BIN:-}" ]]; then
    cargo build --quiet --bin switchyard
fi
start=$SECONDS
run() {
    "$INSTALL_DIR/venv/bin/python" deploy/local/faults.py --bin "$BIN" --tansu "$INSTALL_DIR/bin/tansu" \
        --work "${SWITCHYARD_FAULTS_WORK:-$ROOT/.stack/faults}" "$@"
}
case "${1:-}" in
"")
    run --phases instance,redis-aof,broker-stop,redis-wipe
    ;;
--broker-kill)
    # The broker kill needs a broker that keeps its data: tansu on S3 (a local moto server). It
    # answers every fetch from S3 through moto (~100 requests/s), so it carries far less load and
    # reading the topics back takes minutes (README, "Faults we test").
    shift
    run --storage s3 --phases broker-kill --resources 100 --rate 20 --fetch-wait-ms 500 --phase-timeout 600 "$@"
    ;;
--short)
    # CI: the faults that need no S3 server, over 300 resources.
    shift
    run --phases instance,broker-stop,redis-wipe --resources 300 "$@"
    ;;
*)
    run "$@"
    ;;
esac
echo "faults: passed in $((SECONDS - start)) s"
