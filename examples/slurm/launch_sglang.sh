#!/usr/bin/env bash
# launch_sglang.sh: owns the life of SGLang servers started from a shell. It builds the
# `python -m sglang.launch_server` command for every node of a layout (one node, or several with
# --nnodes/--node-rank/--dist-init-addr and the rendezvous at the allocation's first host), starts
# them (directly, or one per node through srun), waits for /health, sends one smoke request, serves
# until told to stop, and stops everything it started. The sbatch files next to it only pick a
# layout; the Makefile uses the local start/health/stop commands. Guide: docs/deploy/slurm.md.
#
# Usage: launch_sglang.sh [--dry-run] [job|node|print|start|health|stop]
#   job     (default) the body of an sbatch job: launch, wait for health, smoke test, serve
#   node    what srun runs on every node: exec that node's launch_server (rank = SLURM_NODEID)
#   print   print the launch commands and exit; same as DRY_RUN=1 job. Needs no Slurm: the
#           allocation is emulated (SLURM_JOB_NODELIST defaults to node[01-NN])
#   start   start one server on this machine in the background (pid file), wait until healthy
#   health  one check of /health and /get_model_info
#   stop    stop the server named by the pid file (TERM, then KILL after STOP_TIMEOUT)
set -euo pipefail

SELF=$(readlink -f "${BASH_SOURCE[0]}")

MODEL_PATH=${MODEL_PATH:-meta-llama/Llama-3.1-70B-Instruct}
TP_SIZE=${TP_SIZE:-1}
NNODES=${NNODES:-${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}}
HOST=${HOST:-0.0.0.0}
PORT=${PORT:-30000}
DIST_INIT_PORT=${DIST_INIT_PORT:-50000}
DIST_INIT_HOST=${DIST_INIT_HOST:-}
SERVER_ARGS=${SERVER_ARGS:-}
SRUN_ARGS=${SRUN_ARGS:-}
PYTHON=${PYTHON:-python3}
HEALTH_TIMEOUT=${HEALTH_TIMEOUT:-1800}
HEALTH_INTERVAL=${HEALTH_INTERVAL:-5}
STOP_TIMEOUT=${STOP_TIMEOUT:-60}
EXIT_AFTER_SMOKE=${EXIT_AFTER_SMOKE:-0}
SMOKE_PROMPT=${SMOKE_PROMPT:-The capital city of France is}
RUN_DIR=${RUN_DIR:-${TMPDIR:-/tmp}}
PID_FILE=${PID_FILE:-$RUN_DIR/sglang-server-$PORT.pid}
LOG_FILE=${LOG_FILE:-$RUN_DIR/sglang-server-$PORT.log}
DRY_RUN=${DRY_RUN:-0}

SERVER_PID=
HEAD=
NODES=()
CMD=()

log() { echo "[launch_sglang $(date +%H:%M:%S)] $*" >&2; }
die() { log "error: $*"; exit 1; }

# Shell-quoted, space-joined: what is printed can be pasted into a shell as is.
quoted() {
    local out
    printf -v out '%q ' "$@"
    echo "${out% }"
}

# Expand a Slurm host list (a,b or prefix[01-03,07]suffix, one bracket group per item) without
# scontrol; used only for dry runs on machines without Slurm.
expand_nodelist() {
    local list=$1 cur="" ch depth=0 i n item range lo hi
    local -a parts=() ranges=()
    for ((i = 0; i < ${#list}; i++)); do
        ch=${list:i:1}
        [[ $ch == "[" ]] && depth=$((depth + 1))
        [[ $ch == "]" ]] && depth=$((depth - 1))
        if [[ $ch == "," && $depth == 0 ]]; then
            parts+=("$cur")
            cur=""
        else
            cur+=$ch
        fi
    done
    parts+=("$cur")
    for item in "${parts[@]}"; do
        if [[ $item =~ ^([^][]*)\[([^]]*)\](.*)$ ]]; then
            IFS=, read -r -a ranges <<<"${BASH_REMATCH[2]}"
            for range in "${ranges[@]}"; do
                lo=${range%-*}
                hi=${range#*-}
                for ((n = 10#$lo; n <= 10#$hi; n++)); do
                    printf '%s%0*d%s\n' "${BASH_REMATCH[1]}" "${#lo}" "$n" "${BASH_REMATCH[3]}"
                done
            done
        elif [[ -n $item ]]; then
            echo "$item"
        fi
    done
}

# NODES (first NNODES hosts of the allocation) and HEAD (the first one, where node 0 runs).
resolve_layout() {
    [[ $TP_SIZE =~ ^[1-9][0-9]*$ ]] || die "TP_SIZE must be a positive integer, got '$TP_SIZE'"
    [[ $NNODES =~ ^[1-9][0-9]*$ ]] || die "NNODES must be a positive integer, got '$NNODES'"
    ((TP_SIZE % NNODES == 0)) || die "TP_SIZE ($TP_SIZE) must be divisible by NNODES ($NNODES)"
    local nodelist=${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-}} hosts
    if [[ -z $nodelist ]]; then
        if [[ $DRY_RUN == 1 ]]; then
            nodelist=$(printf 'node[01-%02d]' "$NNODES")
        elif ((NNODES == 1)); then
            nodelist=$(hostname)
        else
            die "SLURM_JOB_NODELIST is not set: submit with sbatch, or set DRY_RUN=1"
        fi
    fi
    if command -v scontrol >/dev/null 2>&1; then
        hosts=$(scontrol show hostnames "$nodelist")
    elif [[ $DRY_RUN == 1 || $nodelist != *"["* ]]; then
        hosts=$(expand_nodelist "$nodelist")
    else
        die "scontrol not found: cannot expand the node list '$nodelist'"
    fi
    mapfile -t NODES < <(head -n "$NNODES" <<<"$hosts")
    ((${#NODES[@]} == NNODES)) ||
        die "NNODES=$NNODES but the allocation has ${#NODES[@]} host(s): $nodelist"
    HEAD=${NODES[0]}
    DIST_INIT_HOST=${DIST_INIT_HOST:-$HEAD}
}

# CMD = the launch_server command of node $1.
build_cmd() {
    local rank=$1
    local -a extra=()
    CMD=("$PYTHON" -m sglang.launch_server --model-path "$MODEL_PATH" --tp "$TP_SIZE")
    if ((NNODES > 1)); then
        CMD+=(--nnodes "$NNODES" --node-rank "$rank")
        CMD+=(--dist-init-addr "$DIST_INIT_HOST:$DIST_INIT_PORT")
    fi
    CMD+=(--host "$HOST" --port "$PORT")
    read -r -a extra <<<"$SERVER_ARGS"
    CMD+=("${extra[@]}")
}

srun_cmd() {
    local -a extra=()
    read -r -a extra <<<"$SRUN_ARGS"
    CMD=(srun --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1
        --label "${extra[@]}" bash "$SELF" node)
}

server_url() { echo "http://$1:$PORT"; }

# Where clients reach node 0: the head's name, unless HOST binds one specific address.
head_url() {
    case $HOST in
    0.0.0.0 | "::" | "") server_url "$HEAD" ;;
    *) server_url "$HOST" ;;
    esac
}

smoke_body() {
    printf '{"text": "%s", "sampling_params": {"max_new_tokens": 8, "temperature": 0}}' \
        "$SMOKE_PROMPT"
}

print_plan() {
    local rank url
    url=$(head_url)
    echo "# layout: $NNODES node(s), tp $TP_SIZE ($((TP_SIZE / NNODES)) GPU rank(s) per node)," \
        "model $MODEL_PATH"
    echo "# nodes: ${NODES[*]}; head $HEAD; HTTP on $HEAD:$PORT (node 0 only)"
    if ((NNODES > 1)); then
        echo "# rendezvous: $DIST_INIT_HOST:$DIST_INIT_PORT; one task per node through:"
        srun_cmd
        echo "# $(quoted "${CMD[@]}")"
    fi
    for ((rank = 0; rank < NNODES; rank++)); do
        echo "# node $rank (${NODES[rank]}):"
        build_cmd "$rank"
        quoted "${CMD[@]}"
    done
    echo "# health: curl -fsS $url/health"
    echo "# smoke:  curl -fsS $url/generate -H 'Content-Type: application/json' -d '$(smoke_body)'"
}

server_alive() { [[ -n $SERVER_PID ]] && kill -0 "$SERVER_PID" 2>/dev/null; }

# Poll $1/health until it answers 200; give up when the server process is gone or on timeout.
wait_healthy() {
    local url=$1 deadline=$((SECONDS + HEALTH_TIMEOUT))
    log "waiting up to ${HEALTH_TIMEOUT}s for $url/health"
    until curl -fsS -o /dev/null --max-time 5 "$url/health" 2>/dev/null; do
        server_alive || die "the server exited before it became healthy (see its log)"
        ((SECONDS < deadline)) || die "no healthy answer from $url/health after ${HEALTH_TIMEOUT}s"
        sleep "$HEALTH_INTERVAL"
    done
    log "healthy after ${SECONDS}s: $url"
}

smoke_test() {
    local url=$1 reply
    reply=$(curl -fsS --max-time 300 "$url/generate" -H 'Content-Type: application/json' \
        -d "$(smoke_body)") || die "smoke request to $url/generate failed"
    [[ $reply == *'"text"'* ]] || die "smoke request got an unexpected reply: $reply"
    log "smoke request ok: ${reply:0:200}"
}

# TERM to $1 (a pid, or -pgid for a whole process group), KILL after STOP_TIMEOUT seconds.
stop_target() {
    local target=$1 pid=${1#-} deadline=$((SECONDS + STOP_TIMEOUT))
    kill -TERM -- "$target" 2>/dev/null || return 0
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do
        sleep 1
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "still running after ${STOP_TIMEOUT}s; sending KILL"
        kill -KILL -- "$target" 2>/dev/null || true
    fi
}

stop_servers() {
    server_alive || return 0
    log "stopping the server(s) (pid $SERVER_PID)"
    if ((NNODES > 1)); then
        stop_target "$SERVER_PID" # srun forwards TERM to the task on every node
    else
        stop_target "-$SERVER_PID" # its own process group: the scheduler processes too
    fi
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=
    log "stopped"
}

job_main() {
    local url status=0
    resolve_layout
    if [[ $DRY_RUN == 1 ]]; then
        print_plan
        return 0
    fi
    command -v curl >/dev/null || die "curl is needed for the health check"
    print_plan >&2
    export MODEL_PATH TP_SIZE NNODES HOST PORT DIST_INIT_HOST DIST_INIT_PORT SERVER_ARGS PYTHON
    trap 'stop_servers; exit 143' TERM
    trap 'stop_servers; exit 130' INT
    trap stop_servers EXIT
    if ((NNODES > 1)); then
        command -v srun >/dev/null || die "srun not found: multi-node runs need Slurm"
        srun_cmd
    else
        build_cmd 0
        CMD=(setsid "${CMD[@]}")
    fi
    log "running: $(quoted "${CMD[@]}")"
    "${CMD[@]}" &
    SERVER_PID=$!
    url=$(head_url)
    wait_healthy "$url"
    smoke_test "$url"
    log "ready: $url (OpenAI base URL $url/v1)"
    if [[ $EXIT_AFTER_SMOKE == 1 ]]; then
        return 0
    fi
    wait "$SERVER_PID" || status=$?
    SERVER_PID=
    log "the server exited with status $status"
    return "$status"
}

node_main() {
    local rank=${SLURM_NODEID:-}
    [[ -n $rank ]] || die "node mode runs under srun (SLURM_NODEID is not set)"
    resolve_layout
    build_cmd "$rank"
    if [[ $DRY_RUN == 1 ]]; then
        quoted "${CMD[@]}"
        return 0
    fi
    log "node $rank of $NNODES on $(hostname): $(quoted "${CMD[@]}")"
    exec "${CMD[@]}"
}

start_main() {
    mkdir -p "$(dirname "$PID_FILE")" "$(dirname "$LOG_FILE")"
    if [[ -f $PID_FILE ]] && kill -0 "$(cat "$PID_FILE")" 2>/dev/null; then
        die "already running (pid $(cat "$PID_FILE"), pid file $PID_FILE)"
    fi
    NNODES=1
    build_cmd 0
    log "starting: $(quoted "${CMD[@]}") (log: $LOG_FILE)"
    setsid "${CMD[@]}" >"$LOG_FILE" 2>&1 </dev/null &
    SERVER_PID=$!
    echo "$SERVER_PID" >"$PID_FILE"
    if ! (wait_healthy "$(server_url "$(connect_host)")"); then
        tail -n 20 "$LOG_FILE" >&2 || true
        stop_servers
        rm -f "$PID_FILE"
        exit 1
    fi
    grep -m1 "fired up and ready to roll" "$LOG_FILE" >&2 || true
    log "running as pid $SERVER_PID (pid file $PID_FILE)"
}

# Where a local client connects: a wildcard bind address is reached through loopback.
connect_host() {
    case $HOST in
    0.0.0.0 | "::" | "") echo 127.0.0.1 ;;
    *) echo "$HOST" ;;
    esac
}

health_main() {
    local url info
    url=$(server_url "$(connect_host)")
    curl -fsS --max-time 10 "$url/health" >/dev/null || die "$url/health is not healthy"
    echo "health: ok ($url/health)"
    info=$(curl -fsS --max-time 10 "$url/get_model_info") || die "$url/get_model_info failed"
    echo "model_info: $info"
}

stop_main() {
    local pid
    if [[ ! -f $PID_FILE ]]; then
        log "no pid file at $PID_FILE: nothing to stop"
        return 0
    fi
    pid=$(cat "$PID_FILE")
    if kill -0 "$pid" 2>/dev/null; then
        log "stopping pid $pid and its process group"
        stop_target "-$pid"
    else
        log "pid $pid is not running; removing the stale pid file"
    fi
    rm -f "$PID_FILE"
}

main() {
    local mode=job arg
    for arg in "$@"; do
        case $arg in
        --dry-run) DRY_RUN=1 ;;
        job | node | start | health | stop) mode=$arg ;;
        print)
            mode=job
            DRY_RUN=1
            ;;
        -h | --help)
            sed -n '2,/^set -euo/p' "$SELF" | sed '$d; s/^# \{0,1\}//'
            return 0
            ;;
        *) die "unknown argument '$arg' (try --help)" ;;
        esac
    done
    "${mode}_main"
}

main "$@"
