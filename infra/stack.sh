#!/usr/bin/env bash
# The service stack on loopback, one command up and one down: PostgreSQL (a private cluster) behind an
# MLflow tracking server with a proxied artifact store, a Prefect server and a worker on the process work
# pool `pfp-process`, and a TVM RPC tracker with the emulated Raspberry Pi registered.
#
# Usage: infra/stack.sh up|down|status|env|psql [psql arguments]|help
#   up      start what is not running, wait until each service answers, print the client environment
#           (also written to $STACK_DIR/env: `source .stack/env`); a no-op for services already up
#   down    stop every process `up` started (process groups from pids/, PostgreSQL with pg_ctl stop)
#   status  each service with its URL, pid and health; exit 0 when all are healthy, 1 otherwise
#   env     print the client environment of the running stack
#   psql    psql on the stack's `mlflow` database as the cluster's superuser (over its Unix socket)
#
# Env (read by `up`, remembered in $STACK_DIR/stack.conf for the other commands):
#   STACK_DIR (default <repo>/.stack: logs/, pids/, pg/, mlflow/, prefect/), STACK_HOST (127.0.0.1),
#   STACK_PG_PORT (5433), STACK_MLFLOW_PORT (5000), STACK_PREFECT_PORT (4200), STACK_TRACKER_PORT (9190),
#   STACK_BOARD (emulated-pi | none), STACK_BOARD_KEY (rasp4b-emulated), STACK_BOARD_PORT (9090),
#   STACK_PREFECT_DB (postgres: the Prefect server's database in the same cluster | sqlite: in prefect/),
#   STACK_TIMEOUT (seconds per service, 180), STACK_BOARD_TIMEOUT (300: a first start builds the emulated
#   Pi, about a minute), STACK_PG_BIN (/usr/lib/postgresql/15/bin), VENV (<repo>/.venv).
#
# PostgreSQL refuses to run as root: as root, the cluster runs as the `postgres` system user (created by
# the Debian package) through runuser, so $STACK_DIR must be reachable by that user (not under a 0700 home).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
POOL=pfp-process

log() { echo "stack: $*" >&2; }
die() { log "error: $*"; exit 1; }

STACK_DIR="$(realpath -m "${STACK_DIR:-$REPO/.stack}")"
CONF="$STACK_DIR/stack.conf"
LOGS="$STACK_DIR/logs"
PIDS="$STACK_DIR/pids"

command="${1:-help}"
[[ $# -gt 0 ]] && shift

# Settings: the other commands use what the last `up` recorded, so a stack started on other ports is still
# found and stopped; `up` takes the environment first, then the record.
SETTINGS=(STACK_HOST STACK_PG_PORT STACK_MLFLOW_PORT STACK_PREFECT_PORT STACK_TRACKER_PORT STACK_BOARD STACK_BOARD_KEY
          STACK_BOARD_PORT STACK_PREFECT_DB STACK_PG_BIN VENV)
declare -A GIVEN=() RECORDED=()
for name in "${SETTINGS[@]}"; do [[ -v $name ]] && GIVEN[$name]="${!name}"; done
if [[ -f "$CONF" ]]; then
    # shellcheck disable=SC1090
    source "$CONF"
    for name in "${SETTINGS[@]}"; do [[ -v $name ]] && RECORDED[$name]="${!name}"; done
    if [[ "$command" == up ]]; then
        for name in "${!GIVEN[@]}"; do printf -v "$name" '%s' "${GIVEN[$name]}"; done
    fi
fi
HOST="${STACK_HOST:-127.0.0.1}"
PG_PORT="${STACK_PG_PORT:-5433}"
MLFLOW_PORT="${STACK_MLFLOW_PORT:-5000}"
PREFECT_PORT="${STACK_PREFECT_PORT:-4200}"
TRACKER_PORT="${STACK_TRACKER_PORT:-9190}"
BOARD="${STACK_BOARD:-emulated-pi}"
PREFECT_DB="${STACK_PREFECT_DB:-postgres}"
BOARD_KEY="${STACK_BOARD_KEY:-rasp4b-emulated}"
BOARD_PORT="${STACK_BOARD_PORT:-9090}"
TIMEOUT="${STACK_TIMEOUT:-180}"
BOARD_TIMEOUT="${STACK_BOARD_TIMEOUT:-300}"
PG_BIN="${STACK_PG_BIN:-/usr/lib/postgresql/15/bin}"
VENV="${VENV:-$REPO/.venv}"
[[ "$VENV" == /* ]] || VENV="$REPO/$VENV"
PY="$VENV/bin/python"

PG_DIR="$STACK_DIR/pg"
PG_DATA="$PG_DIR/data"
PG_SOCKET="$PG_DIR/run"
SECRETS="$STACK_DIR/secrets"
ARTIFACTS="$STACK_DIR/mlflow/artifacts"
PREFECT_HOME_DIR="$STACK_DIR/prefect"
MLFLOW_URL="http://$HOST:$MLFLOW_PORT"
PREFECT_URL="http://$HOST:$PREFECT_PORT/api"
TRACKER="$HOST:$TRACKER_PORT"
PG_SUPERUSER="$(id -un)"  # initdb's default: the cluster owner
if [[ "$(id -u)" == 0 ]]; then PG_SUPERUSER=postgres; fi
WORKER_NAME="pfp-stack-$(hostname)"
SERVICES=(postgres mlflow prefect-server prefect-worker tracker board)

case "$BOARD" in
    emulated-pi|none) ;;
    *) die "STACK_BOARD=$BOARD: expected emulated-pi or none" ;;
esac
case "$PREFECT_DB" in
    postgres|sqlite) ;;
    *) die "STACK_PREFECT_DB=$PREFECT_DB: expected postgres or sqlite" ;;
esac

# ----------------------------------------------------------------------------------------------- helpers

as_pg() {  # run a PostgreSQL program as the cluster's owner
    if [[ "$(id -u)" == 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

# A pid file holds the pid and the process's start time: a pid reused by another program after a crash or
# reboot is not taken for the service (nor stopped by down).
record_pid() { { echo "$2"; ps -o lstart= -p "$2"; } >"$PIDS/$1.pid"; }

pid_of() { [[ -f "$PIDS/$1.pid" ]] && head -n 1 "$PIDS/$1.pid"; }

alive() {  # the service's recorded process is running
    local pid
    pid="$(pid_of "$1")" || return 1
    [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null && [[ "$(ps -o lstart= -p "$pid")" == "$(sed -n 2p "$PIDS/$1.pid")" ]]
}

port_open() { (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null; }

descendants() {  # every process below $1 (children may leave the process group, e.g. by setsid)
    local pid child
    for pid in "$@"; do
        for child in $(ps -o pid= --ppid "$pid" 2>/dev/null); do
            echo "$child"
            descendants "$child"
        done
    done
}

launch() {  # launch NAME COMMAND...: in its own session (process group = pid), output appended to logs/NAME.log
    local name="$1"; shift
    echo "=== $(date -u +%Y-%m-%dT%H:%M:%SZ) $*" >>"$LOGS/$name.log"
    # not a process-group leader here (no job control), so setsid execs in place and $! is the server's pid
    setsid "$@" >>"$LOGS/$name.log" 2>&1 </dev/null &
    record_pid "$name" $!
}

fail_service() {  # fail_service NAME MESSAGE: name the service and show the end of its log
    local name="$1" message="$2"
    log "error: $name $message"
    if [[ -f "$LOGS/$name.log" ]]; then
        log "last lines of $LOGS/$name.log:"
        tail -n 25 "$LOGS/$name.log" | sed 's/^/    /' >&2
    fi
    log "services already started keep running; stop them with: $0 down"
    exit 1
}

wait_until() {  # wait_until NAME SECONDS CHECK...: poll CHECK until it succeeds, the service dies, or time runs out
    local name="$1" seconds="$2"; shift 2
    local deadline=$((SECONDS + seconds))
    until "$@" >/dev/null 2>&1; do
        if [[ "$name" != postgres ]] && ! alive "$name"; then
            fail_service "$name" "exited before it answered"
        fi
        ((SECONDS < deadline)) || fail_service "$name" "did not answer within $seconds s"
        sleep 1
    done
}

# ------------------------------------------------------------------------------------------------ checks

pg_healthy() { "$PG_BIN/pg_isready" -q -h "$PG_SOCKET" -p "$PG_PORT" -U "$PG_SUPERUSER" -d postgres; }
mlflow_healthy() { [[ "$(curl -sf --max-time 5 "$MLFLOW_URL/health")" == OK ]]; }
prefect_healthy() { [[ "$(curl -sf --max-time 5 "$PREFECT_URL/health")" == true ]]; }
worker_online() {  # the worker's heartbeat reached the server: it is listed ONLINE on the pool
    curl -sf --max-time 5 -X POST -H 'Content-Type: application/json' -d '{}' \
        "$PREFECT_URL/work_pools/$POOL/workers/filter" \
    | "$PY" -c 'import json, sys; sys.exit(not any(w["name"] == sys.argv[1] and w["status"] == "ONLINE"
                                                   for w in json.load(sys.stdin)))' "$WORKER_NAME"
}
tracker_healthy() { port_open "$TRACKER_PORT"; }
board_registered() {  # board_registered [SECONDS [PID]]: exit 0 once the key is at the tracker, 1 at the deadline
    # or when PID (the board's server) has died; one interpreter polls, as import tvm takes seconds
    "$PY" - "$HOST" "$TRACKER_PORT" "$BOARD_KEY" "${1:-0}" "${2:-0}" <<'EOF'
import os, sys, time
import tvm.rpc
host, port, key, seconds, pid = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4]), int(sys.argv[5])
deadline = time.monotonic() + seconds
while True:
    if pid:
        os.kill(pid, 0)  # ProcessLookupError: the server is gone, no use waiting
    try:
        if key in tvm.rpc.connect_tracker(host, port).summary()["queue_info"]:
            sys.exit(0)
    except (OSError, RuntimeError):
        pass
    if time.monotonic() > deadline:
        sys.exit(1)
    time.sleep(1)
EOF
}

# ----------------------------------------------------------------------------------------------- env file

write_env() {
    {
        echo "# client environment of the service stack in $STACK_DIR (source it)"
        echo "export MLFLOW_TRACKING_URI=$MLFLOW_URL"
        echo "export PREFECT_API_URL=$PREFECT_URL"
        echo "export PFP_RPC_TRACKER=$TRACKER"
        echo "export TVM_TRACKER_HOST=$HOST"
        echo "export TVM_TRACKER_PORT=$TRACKER_PORT"
        if [[ "$BOARD" != none ]]; then echo "export PFP_RPC_KEY=$BOARD_KEY"; fi
    } >"$STACK_DIR/env.tmp"
    mv "$STACK_DIR/env.tmp" "$STACK_DIR/env"
}

write_conf() {
    STACK_HOST=$HOST STACK_PG_PORT=$PG_PORT STACK_MLFLOW_PORT=$MLFLOW_PORT STACK_PREFECT_PORT=$PREFECT_PORT
    STACK_TRACKER_PORT=$TRACKER_PORT STACK_BOARD=$BOARD STACK_BOARD_KEY=$BOARD_KEY STACK_BOARD_PORT=$BOARD_PORT
    STACK_PG_BIN=$PG_BIN STACK_PREFECT_DB=$PREFECT_DB
    {
        echo "# settings of the last 'infra/stack.sh up' (read by down, status, env and the next up)"
        for name in "${SETTINGS[@]}"; do printf '%s=%q\n' "$name" "${!name}"; done
    } >"$CONF.tmp"
    mv "$CONF.tmp" "$CONF"
}

check_same_settings() {  # a running stack keeps its ports: changing them needs a down first
    local name changed=()
    for name in "${!GIVEN[@]}"; do
        if [[ -v "RECORDED[$name]" && "${RECORDED[$name]}" != "${GIVEN[$name]}" ]]; then
            changed+=("$name=${GIVEN[$name]} (running: ${RECORDED[$name]})")
        fi
    done
    if ((${#changed[@]})); then
        die "the stack in $STACK_DIR is running with other settings: ${changed[*]}; run '$0 down' first"
    fi
}

# ---------------------------------------------------------------------------------------------------- up

start_postgres() {
    [[ -x "$PG_BIN/pg_ctl" ]] || die "no PostgreSQL at $PG_BIN (apt-get install postgresql-15, or make system-deps; STACK_PG_BIN overrides)"
    if [[ "$(id -u)" == 0 ]]; then
        id postgres >/dev/null 2>&1 || die "no 'postgres' system user to run PostgreSQL as (created by the Debian package postgresql-15)"
    fi
    mkdir -p "$PG_DIR"
    if [[ "$(id -u)" == 0 ]]; then chown postgres:postgres "$PG_DIR"; fi
    chmod 700 "$PG_DIR"
    as_pg test -w "$PG_DIR" || die "the postgres user cannot write to $PG_DIR: a parent folder is closed to it \
(a 0700 home or temp folder?); choose a STACK_DIR it can reach"
    local socket_path="$PG_SOCKET/.s.PGSQL.$PG_PORT"
    ((${#socket_path} < 100)) || die "the socket path $socket_path is too long for a Unix socket: use a shorter STACK_DIR"
    as_pg mkdir -p "$PG_SOCKET"
    touch "$LOGS/postgres.log"
    if [[ "$(id -u)" == 0 ]]; then chown postgres "$LOGS/postgres.log"; fi

    if [[ ! -f "$PG_DATA/PG_VERSION" ]]; then
        log "postgres: initdb $PG_DATA"
        # local (socket) connections by OS user; TCP only with a password (scram)
        as_pg "$PG_BIN/initdb" -D "$PG_DATA" -E UTF8 --locale=C --auth-local=peer --auth-host=scram-sha-256 \
            >>"$LOGS/postgres.log" 2>&1 || fail_service postgres "initdb failed"
    fi
    if alive postgres && pg_healthy; then
        log "postgres: already running (pid $(pid_of postgres), port $PG_PORT)"
    else
        log "postgres: starting on $HOST:$PG_PORT"
        as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$LOGS/postgres.log" -w -t "$TIMEOUT" \
            -o "-c port=$PG_PORT -c listen_addresses=$HOST -c unix_socket_directories=$PG_SOCKET" start \
            >/dev/null || fail_service postgres "did not start (pg_ctl start)"
        record_pid postgres "$(head -n 1 "$PG_DATA/postmaster.pid")"
    fi
    wait_until postgres "$TIMEOUT" pg_healthy

    mkdir -p "$SECRETS"
    chmod 700 "$SECRETS"
    create_database mlflow
    if [[ "$PREFECT_DB" == postgres ]]; then create_database prefect; fi
}

create_database() {  # create_database NAME: a role and a database NAME (its password made once into secrets/), idempotently
    local name="$1" password
    if [[ ! -s "$SECRETS/$name-db-password" ]]; then
        (umask 077; "$PY" -c 'import secrets; print(secrets.token_urlsafe(24))' >"$SECRETS/$name-db-password")
    fi
    password="$(cat "$SECRETS/$name-db-password")"
    as_pg "$PG_BIN/psql" -q -X -v ON_ERROR_STOP=1 -h "$PG_SOCKET" -p "$PG_PORT" -d postgres >>"$LOGS/postgres.log" 2>&1 <<EOF \
        || fail_service postgres "could not create the $name role and database"
SELECT 'CREATE ROLE $name LOGIN' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$name')\gexec
ALTER ROLE $name PASSWORD '$password';
SELECT 'CREATE DATABASE $name OWNER $name' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '$name')\gexec
EOF
}

db_url() {  # db_url NAME [DRIVER]: the TCP URL of the stack's database NAME, with its password
    echo "postgresql${2:++$2}://$1:$(cat "$SECRETS/$1-db-password")@$HOST:$PG_PORT/$1"
}

start_mlflow() {
    if alive mlflow; then log "mlflow: already running (pid $(pid_of mlflow))"; return; fi
    mkdir -p "$ARTIFACTS"
    log "mlflow: starting on $MLFLOW_URL (store: postgresql on port $PG_PORT, artifacts: $ARTIFACTS)"
    # The store URI holds the password: passed in the environment, not on the command line. Job execution
    # (GenAI jobs, unused here) would add seven huey worker processes: off unless asked for.
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}" \
    MLFLOW_BACKEND_STORE_URI="$(db_url mlflow)" \
        launch mlflow "$VENV/bin/mlflow" server --host "$HOST" --port "$MLFLOW_PORT" --workers 1 \
        --serve-artifacts --artifacts-destination "$ARTIFACTS"
}

# the Prefect settings of the server, the worker and the CLI calls
PREFECT_VARS=(PREFECT_HOME="$PREFECT_HOME_DIR" PREFECT_API_URL="$PREFECT_URL" PREFECT_SERVER_ANALYTICS_ENABLED=false
             PREFECT_CLI_PROMPT=false)

start_prefect_server() {
    if alive prefect-server; then log "prefect-server: already running (pid $(pid_of prefect-server))"; return; fi
    mkdir -p "$PREFECT_HOME_DIR"
    log "prefect-server: starting on ${PREFECT_URL%/api} (database: $PREFECT_DB)"
    local server=(env "${PREFECT_VARS[@]}" "$VENV/bin/prefect" server start --host "$HOST" --port "$PREFECT_PORT" --analytics-off)
    if [[ "$PREFECT_DB" == postgres ]]; then
        # the URL holds a password: in the server's environment, not on its command line
        PREFECT_SERVER_DATABASE_CONNECTION_URL="$(db_url prefect asyncpg)" launch prefect-server "${server[@]}"
    else
        launch prefect-server "${server[@]}"  # SQLite in $PREFECT_HOME
    fi
}

start_prefect_worker() {
    if alive prefect-worker; then log "prefect-worker: already running (pid $(pid_of prefect-worker))"; return; fi
    if ! env "${PREFECT_VARS[@]}" "$VENV/bin/prefect" work-pool inspect "$POOL" >/dev/null 2>&1; then
        log "prefect: creating the process work pool $POOL"
        env "${PREFECT_VARS[@]}" "$VENV/bin/prefect" work-pool create "$POOL" --type process >>"$LOGS/prefect-worker.log" 2>&1 \
            || fail_service prefect-worker "could not create the work pool $POOL"
    fi
    log "prefect-worker: starting $WORKER_NAME on pool $POOL (working folder $REPO)"
    # flow runs inherit this environment: the stack's MLflow and tracker, this checkout's code and venv
    local pythonpath="$REPO/src:$REPO${PYTHONPATH:+:$PYTHONPATH}" key=()
    if [[ "$BOARD" != none ]]; then key=(PFP_RPC_KEY="$BOARD_KEY"); fi
    launch prefect-worker env --chdir="$REPO" "${PREFECT_VARS[@]}" MLFLOW_TRACKING_URI="$MLFLOW_URL" PFP_RPC_TRACKER="$TRACKER" \
        "${key[@]}" PYTHONPATH="$pythonpath" PATH="$VENV/bin:$PATH" DVC_NO_ANALYTICS=1 \
        "$VENV/bin/prefect" worker start --pool "$POOL" --type process --name "$WORKER_NAME" --install-policy never
}

start_tracker() {
    if alive tracker; then log "tracker: already running (pid $(pid_of tracker))"; return; fi
    log "tracker: starting on $TRACKER"
    launch tracker env PYTHON="$PY" TRACKER_HOST="$HOST" TRACKER_PORT="$TRACKER_PORT" \
        TRACKER_PORT_END=$((TRACKER_PORT + 1)) bash "$HERE/rpc/start-tracker.sh"
}

start_board() {
    if alive board; then log "board: already running (pid $(pid_of board))"; return; fi
    log "board: starting the emulated Raspberry Pi under key $BOARD_KEY (the first start on a machine builds it: about a minute)"
    launch board env -u PYTHON HOST_PYTHON="$PY" TRACKER="$TRACKER" RPC_KEY="$BOARD_KEY" SERVER_HOST="$HOST" \
        SERVER_PORT="$BOARD_PORT" SERVER_PORT_END=$((BOARD_PORT + 100)) bash "$HERE/rpc/emulated-pi.sh" start
}

check_ports_free() {  # before starting anything: a port taken by another program is a clear error
    local name port
    for name in postgres:$PG_PORT mlflow:$MLFLOW_PORT prefect-server:$PREFECT_PORT tracker:$TRACKER_PORT; do
        port="${name#*:}"; name="${name%%:*}"
        if ! alive "$name" && port_open "$port"; then
            die "$name: port $port on $HOST is in use by another program (set STACK_${name^^}_PORT; see $0 help)"
        fi
    done
}

up() {
    [[ -x "$PY" ]] || die "no Python at $PY (make setup, or set VENV)"
    if [[ ! -d "$STACK_DIR" ]]; then
        mkdir -p "$STACK_DIR"
        chmod 755 "$STACK_DIR"  # whatever the umask: the postgres user goes through it to pg/
    fi
    mkdir -p "$LOGS" "$PIDS"
    local running=0 wanted=0 name
    for name in "${SERVICES[@]}"; do
        [[ "$name" == board && "$BOARD" == none ]] && continue
        wanted=$((wanted + 1))
        if alive "$name"; then running=$((running + 1)); fi
    done
    if ((running > 0)); then
        check_same_settings
        if ((running == wanted)); then log "already up in $STACK_DIR: checking that each service answers"
        else log "$running of $wanted services already running in $STACK_DIR: starting the others"
        fi
    fi
    check_ports_free
    write_conf

    # slow starters first, in parallel; then wait for each in dependency order
    start_postgres
    start_prefect_server
    start_tracker
    if [[ "$BOARD" != none ]]; then start_board; fi
    start_mlflow

    wait_until prefect-server "$TIMEOUT" prefect_healthy
    start_prefect_worker
    wait_until mlflow "$TIMEOUT" mlflow_healthy
    wait_until tracker "$TIMEOUT" tracker_healthy
    wait_until prefect-worker "$TIMEOUT" worker_online
    if [[ "$BOARD" != none ]]; then
        alive board || fail_service board "exited"
        board_registered "$BOARD_TIMEOUT" "$(pid_of board)" 2>/dev/null || { alive board || fail_service board "exited before it registered"
                                               fail_service board "was not registered under $BOARD_KEY within $BOARD_TIMEOUT s"; }
    fi
    write_env
    log "up: $STACK_DIR (logs in $LOGS); the client environment (also in $STACK_DIR/env):"
    cat "$STACK_DIR/env"
}

# -------------------------------------------------------------------------------------------------- down

stop_group() {  # stop_group NAME: TERM the process group and its escaped descendants, then KILL what is left
    local name="$1" pid
    pid="$(pid_of "$name")" || return 0
    if alive "$name"; then
        local others start=$SECONDS
        others="$(descendants "$pid")"
        log "$name: stopping (pid $pid)"
        kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
        # shellcheck disable=SC2086
        [[ -z "$others" ]] || kill -TERM $others 2>/dev/null || true
        if [[ "$name" == prefect-worker ]]; then
            # A Prefect worker turns the first SIGTERM into a graceful SIGINT, which an idle 3.9 worker never
            # acts on; its documented forced stop is a second signal.
            wait_gone "$pid" "$others" 5 || { log "$name: second SIGTERM (Prefect's forced stop)"; kill -TERM "$pid" 2>/dev/null || true; }
        fi
        if ! wait_gone "$pid" "$others" 10; then
            log "$name: still running $((SECONDS - start)) s after SIGTERM: killed"
            kill -KILL -- "-$pid" 2>/dev/null || true
            # shellcheck disable=SC2086
            [[ -z "$others" ]] || kill -KILL $others 2>/dev/null || true
        fi
    fi
    rm -f "$PIDS/$name.pid"
}

wait_gone() {  # wait_gone PGID "PIDS" SECONDS: until the process group and the listed pids are gone
    local pgid="$1" others="$2" deadline=$((SECONDS + $3)) pid
    while ((SECONDS < deadline)); do
        local any=0
        kill -0 -- "-$pgid" 2>/dev/null && any=1
        for pid in $others; do kill -0 "$pid" 2>/dev/null && any=1; done
        ((any)) || return 0
        sleep 0.3
    done
    return 1
}

down() {
    local name
    for name in prefect-worker board mlflow prefect-server tracker; do stop_group "$name" & done
    wait  # in parallel: each waits for its own process group
    if [[ -f "$PG_DATA/postmaster.pid" ]]; then
        log "postgres: stopping (pg_ctl stop -m fast)"
        as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -m fast -w -t 60 stop >/dev/null \
            || { log "postgres: pg_ctl stop failed, stopping it directly"; stop_group postgres; }
    fi
    rm -f "$PIDS/postgres.pid" "$STACK_DIR/env"
    log "down: nothing of the stack in $STACK_DIR is running"
}

# ------------------------------------------------------------------------------------------------ status

status() {
    local bad=0
    row() {  # row NAME URL CHECK...
        local name="$1" url="$2" health pid; shift 2
        pid="$(pid_of "$name" 2>/dev/null || true)"
        if ! alive "$name"; then health="down"; bad=1
        elif "$@" >/dev/null 2>&1; then health="healthy"
        else health="NOT ANSWERING"; bad=1
        fi
        printf '%-15s %-40s %-8s %s\n' "$name" "$url" "${pid:--}" "$health"
    }
    printf '%-15s %-40s %-8s %s\n' SERVICE URL PID HEALTH
    row postgres "postgresql://$HOST:$PG_PORT/mlflow" pg_healthy
    row mlflow "$MLFLOW_URL" mlflow_healthy
    row prefect-server "${PREFECT_URL%/api}" prefect_healthy
    row prefect-worker "pool $POOL ($WORKER_NAME)" worker_online
    row tracker "$TRACKER" tracker_healthy
    if [[ "$BOARD" == none ]]; then
        printf '%-15s %-40s %-8s %s\n' board "-" - "not started (STACK_BOARD=none)"
    else
        row board "key $BOARD_KEY at $TRACKER" board_registered 0
    fi
    return $bad
}

case "$command" in
    up) up ;;
    down) down ;;
    status) status ;;
    env) [[ -f "$STACK_DIR/env" ]] || die "the stack in $STACK_DIR is not up ($0 up)"; cat "$STACK_DIR/env" ;;
    psql) as_pg "$PG_BIN/psql" -X -h "$PG_SOCKET" -p "$PG_PORT" -d mlflow "$@" ;;
    help|-h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' ;;
    *) die "unknown command '$command' (up, down, status, env, psql, help)" ;;
esac
