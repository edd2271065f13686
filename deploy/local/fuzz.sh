#!/usr/bin/env bash
# Fuzzes switchyard's decoders and HTTP bodies with cargo-fuzz (libFuzzer); README, "Fuzzing".
#
#   deploy/local/fuzz.sh                   # every target, 10,000,000 executions each
#   deploy/local/fuzz.sh codec_avro        # one target (names: src/fuzzing.rs, TARGETS)
#   deploy/local/fuzz.sh all 100000        # every target, 100,000 executions each
#   FUZZ_SECONDS=600 deploy/local/fuzz.sh  # each target stops after 10 minutes at the latest
#   FUZZ_SANITIZER=address deploy/local/fuzz.sh codec_avro   # under AddressSanitizer
#   deploy/local/fuzz.sh --list            # the targets and their -max_len
#
# Needs a nightly toolchain (installed with rustup when missing) and cargo-fuzz (installed from
# crates.io when missing); CI does not run it (the stable corpus test tests/fuzz_corpus.rs does).
# Per target: runs libFuzzer on fuzz/corpus/<target> (new inputs are added there) with -max_len the
# code's own size cap for that input, -rss_limit_mb, -malloc_limit_mb and a 10-second -timeout; the
# harness's allocator (fuzz/alloc_bound.rs) aborts on any allocation over 64 MiB with every
# sanitizer. Then minimises the corpus (a set cover of the edges) and prints executions, time,
# exec/s and the corpus size. A crash leaves its input in fuzz/artifacts/<target>/ and stops the
# script.
# One fuzz process at a time (no -jobs/-workers); wrap in `nice -n 19` on a shared machine.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
WHAT="${1:-all}"
RUNS="${2:-${FUZZ_RUNS:-10000000}}"
SANITIZER="${FUZZ_SANITIZER:-none}"
RSS_MB="${FUZZ_RSS_MB:-2048}"
MALLOC_MB="${FUZZ_MALLOC_MB:-64}"
SECONDS_CAP="${FUZZ_SECONDS:-0}"
LOGS="${FUZZ_LOGS:-$ROOT/fuzz/artifacts/logs}"
# The same build for build, run and cmin (else each rebuilds); 16 codegen units build much faster
# than cargo-fuzz's default of 1 for a little throughput.
BUILD=(-s "$SANITIZER" --codegen-units "${FUZZ_CODEGEN_UNITS:-16}")

# name max_len, from the table in src/fuzzing.rs.
targets() {
    python3 - "$ROOT/src/fuzzing.rs" <<'EOF'
import re, sys
text = open(sys.argv[1]).read()
caps = {"RECORD_CAP": 1 << 20}
for name, expr in re.findall(r'name: "(\w+)",.*?max_len: ([^,]+),', text, re.S):
    for k, v in caps.items():
        expr = expr.replace(k, str(v))
    if not re.fullmatch(r"[\d\s<()]+", expr):
        sys.exit(f"max_len of {name} is not literal: {expr}")
    print(name, eval(expr))
EOF
}

if [ "$WHAT" = "--list" ]; then
    targets
    exit 0
fi

if ! rustup toolchain list | grep -q '^nightly'; then
    echo "Installing the nightly toolchain (cargo-fuzz needs it)."
    rustup toolchain install nightly --profile minimal
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "Installing cargo-fuzz."
    cargo install cargo-fuzz --locked
fi

mkdir -p "$LOGS"
cd "$ROOT/fuzz"
cargo +nightly fuzz build "${BUILD[@]}" >/dev/null

printf '%-22s %12s %9s %9s %8s %10s\n' target executions seconds exec/s files bytes
targets | while read -r name max_len; do
    if [ "$WHAT" != all ] && [ "$WHAT" != "$name" ]; then
        continue
    fi
    mkdir -p "corpus/$name"
    log="$LOGS/$name.log"
    start=$(date +%s)
    if ! cargo +nightly fuzz run "${BUILD[@]}" "$name" -- \
        -runs="$RUNS" -max_total_time="$SECONDS_CAP" -max_len="$max_len" -timeout=10 \
        -rss_limit_mb="$RSS_MB" -malloc_limit_mb="$MALLOC_MB" -print_final_stats=1 >"$log" 2>&1; then
        echo "$name: the fuzzer stopped on a finding; see $log and fuzz/artifacts/$name/" >&2
        tail -n 30 "$log" >&2
        exit 1
    fi
    seconds=$(( $(date +%s) - start ))
    # Minimised to a set cover of the edges (not of libFuzzer's hit-count features): several times
    # smaller, so the corpus can be committed.
    fresh="corpus-new/$name"
    rm -rf "$fresh"
    mkdir -p "$fresh"
    cargo +nightly fuzz run "${BUILD[@]}" "$name" "$fresh" "corpus/$name" -- \
        -set_cover_merge=1 -use_counters=0 -max_len="$max_len" >>"$log" 2>&1
    rm -rf "corpus/$name"
    mv "$fresh" "corpus/$name"
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n 1)
    files=$(find "corpus/$name" -type f | wc -l)
    bytes=$(du -sb "corpus/$name" | cut -f1)
    printf '%-22s %12s %9s %9s %8s %10s\n' "$name" "$execs" "$seconds" "$rate" "$files" "$bytes"
done
