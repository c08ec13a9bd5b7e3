#!/usr/bin/env bash
# Cluster mode over NATS against a single node (issue 11): fan-in, fan-out and QoS 1 pairs with
# the clients spread over three petrel nodes that share one nats-server, then the same load
# against one petrel without [cluster], in the same sitting on the same machine.
#
#   bench/cluster/run.sh [--quick] [--runs N]
#
# 1. Builds petrel and petrel-bench in release mode (into $CARGO_TARGET_DIR if set).
# 2. Starts nats-server (JetStream on, store in a temp dir) and three petrel nodes (memory
#    storage, queues large enough for lossless QoS 1) on free 127.0.0.1 ports, and waits until
#    every node sees all three alive.
# 3. Runs each scenario --runs times (default 3) with `petrel-bench --ports A,B,C` (placement in
#    bench/README.md: every pair crosses nodes, fan-in's publishers and fan-out's subscribers
#    sit on all three). Before each run every node must report no remote filter (the previous
#    run's unsubscriptions have arrived); within the run, `--before-publish` holds the
#    publishers back until every node knows of the new subscriptions (bench/cluster/wait.py).
# 4. Stops the cluster, starts one petrel with the same settings and no [cluster], and runs the
#    same scenarios as often.
# 5. Prints medians per scenario with the ratio cluster / single, and writes them with every
#    run's report to bench/cluster-results/cluster-<UTC time>.json.
#
# Every server listens on 127.0.0.1 only; every process started here is stopped on exit,
# whatever the exit. Each run is bounded by petrel-bench's --timeout (and a hard stop after it),
# and the script gives up starting runs after MAX_SECONDS (default 900).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
# free_port, port_open, stop_pid
source "$ROOT/bench/lib.sh"
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
NATS_SERVER=${NATS_SERVER:-$(command -v nats-server || echo /usr/sbin/nats-server)}
MAX_SECONDS=${MAX_SECONDS:-900}

log() { printf '[cluster-bench] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
usage() { sed -n '2,6p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

QUICK=0
RUNS=3
INVOCATION="bench/cluster/run.sh${*:+$(printf " %q" "$@")}"
while [ $# -gt 0 ]; do
  case $1 in
    --quick) QUICK=1 ;;
    --runs) [ $# -ge 2 ] || usage 2; RUNS=$2; shift ;;
    -h|--help) usage 0 ;;
    *) log "unknown argument: $1"; usage 2 ;;
  esac
  shift
done
[ "$RUNS" -ge 1 ] 2>/dev/null || die "--runs must be a positive number"

# ----------------------------------------------------------------------------- the parameters
# Shapes as in bench/compare (64-byte payloads, the generator on one thread, QoS 0 fan-in and
# fan-out, QoS 1 pairs with an in-flight window of 100), with 30 instead of 50 fan-out
# subscribers and pairs so that the cross-node pairs, at a twentieth of the single node's rate,
# keep the whole script at about 4 minutes on 2 cores.
SCENARIOS=(fan-in fan-out pairs)
if [ "$QUICK" = 1 ]; then
  declare -A ARGS=(
    [fan-in]="--qos 0 --publishers 8 --messages 2000"
    [fan-out]="--qos 0 --subscribers 30 --messages 500"
    [pairs]="--qos 1 --pairs 30 --messages 200"
  )
  TIMEOUT=60
else
  declare -A ARGS=(
    [fan-in]="--qos 0 --publishers 8 --messages 150000"
    [fan-out]="--qos 0 --subscribers 30 --messages 100000"
    [pairs]="--qos 1 --pairs 30 --messages 20000"
  )
  TIMEOUT=90
fi
# Subscribers per run, for the interest each node must see (wait.py places them as the
# generator does).
declare -A CLIENTS=([fan-in]=1 [fan-out]=30 [pairs]=30)
COMMON=(--host 127.0.0.1 --payload 64 --threads 1 --inflight 100 --json --timeout "$TIMEOUT")
GUARD=$((TIMEOUT + 30))
# As bench/compare: an outbound QoS 1 window of 100 and queues no scenario fills, so nothing is
# dropped for want of room.
INFLIGHT=100
QUEUED=1000000
NODES=(a b c)

# ------------------------------------------------------------------------------------- build
[ -x "$NATS_SERVER" ] || die "nats-server not found (Debian package nats-server; or set NATS_SERVER)"
log "building petrel and petrel-bench (release)"
(cd "$ROOT" && cargo build --release -p petrel-server -p petrel-bench >&2)
PETREL=$TARGET_DIR/release/petrel
BENCH=$TARGET_DIR/release/petrel-bench
for bin in "$PETREL" "$BENCH"; do [ -x "$bin" ] || die "$bin was not built"; done

# ------------------------------------------------------------------------------ the processes
WORK=$(mktemp -d "${TMPDIR:-/tmp}/petrel-cluster-bench.XXXXXX")
PIDS=()
GEN_PID=""
cleanup() {
  local rc=$?
  [ -z "$GEN_PID" ] || stop_pid "$GEN_PID"
  local i
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do stop_pid "${PIDS[i]}"; done
  if [ "$rc" = 0 ]; then
    rm -rf "$WORK"
  else
    # Logs and configs for a post-mortem (the NATS store is not worth keeping).
    rm -rf "$WORK/nats"
    log "exit $rc; logs kept in $WORK"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Waits up to 15 s for a port; fails if the process exits first.
await_port() { # pid port what
  for _ in $(seq 150); do
    kill -0 "$1" 2>/dev/null || die "$3 exited at start; see $WORK"
    port_open "$2" && return 0
    sleep 0.1
  done
  die "$3 did not listen on 127.0.0.1:$2 within 15 s"
}

start_nats() {
  NATS_PORT=$(free_port) || die "no free port"
  "$NATS_SERVER" -js -a 127.0.0.1 -p "$NATS_PORT" --store_dir "$WORK/nats" \
    >"$WORK/nats.log" 2>&1 &
  NATS_PID=$!
  PIDS+=("$NATS_PID")
  await_port "$NATS_PID" "$NATS_PORT" nats-server
  for _ in $(seq 150); do
    grep -q "Server is ready" "$WORK/nats.log" && return 0
    sleep 0.1
  done
  die "nats-server not ready within 15 s"
}

# Starts a petrel; prints nothing, appends to PIDS, sets LAST_PID. An empty node id: no cluster.
start_petrel() { # name mqtt-port admin-port node-id
  local name=$1 port=$2 admin=$3 id=$4 config=$WORK/$1.toml
  cat >"$config" <<EOF
[[listeners]]
bind = "127.0.0.1:$port"
max_connections = 100000

[mqtt]
max_inflight = $INFLIGHT
max_queued_messages = $QUEUED

[storage]
mode = "memory"

[admin]
bind = "127.0.0.1:$admin"
token = "t"
EOF
  if [ -n "$id" ]; then
    cat >>"$config" <<EOF

[cluster]
nats = ["nats://127.0.0.1:$NATS_PORT"]
node_id = "$id"
heartbeat = "1s"
node_timeout = "5s"
EOF
  fi
  # info, not warn: async-nats reports a client-side slow consumer (a dropped message) at info.
  RUST_LOG=info NO_COLOR=1 "$PETREL" --config "$config" --shutdown-grace 1s \
    >"$WORK/$name.log" 2>&1 &
  LAST_PID=$!
  PIDS+=("$LAST_PID")
  # A cluster node joins NATS before it listens.
  await_port "$LAST_PID" "$port" "petrel $name"
}

# ------------------------------------------------------------------------------------ the runs
RESULTS=$WORK/runs.jsonl
: >"$RESULTS"

# Runs one scenario once; appends its report to RESULTS. Extra arguments go to petrel-bench.
run_once() { # label scenario run-number petrel-bench-args...
  local label=$1 scenario=$2 n=$3
  shift 3
  [ "$SECONDS" -lt "$MAX_SECONDS" ] || die "past MAX_SECONDS=$MAX_SECONDS; stopping"
  local -a args
  read -r -a args <<<"${ARGS[$scenario]}"
  local rc=0
  timeout --kill-after=10 "$GUARD" "$BENCH" "$scenario" "${COMMON[@]}" "${args[@]}" \
    --label "$label" "$@" >"$WORK/out.json" 2>"$WORK/bench-$label-$scenario-$n.log" &
  GEN_PID=$!
  wait "$GEN_PID" || rc=$?
  GEN_PID=""
  local line
  line=$(grep '^{' "$WORK/out.json" | tail -n 1 || true)
  [ -n "$line" ] || die "$label $scenario run $n: petrel-bench exited $rc without a report: $(tail -n 3 "$WORK/bench-$label-$scenario-$n.log" | tr '\n' ' ')"
  echo "$line" >>"$RESULTS"
  log "$label $scenario run $n: $(python3 -c '
import json, sys
r = json.loads(sys.argv[1]); l = r["latency_us"] or {}
print("%.0f msg/s, p50 %s µs, p99 %s µs, lost %d, dup %d, ok %s%s" % (r["delivered_per_s"],
      l.get("p50"), l.get("p99"), r["lost"], r["duplicates"], r["ok"],
      "" if not r["error"] else ", error: " + r["error"]))' "$line")"
}

alive() { # pid name
  kill -0 "$1" 2>/dev/null || die "$2 has exited; see $WORK/$2.log"
}

# The three-node cluster.
start_nats
MQTT_PORTS=()
ADMIN_PORTS=()
NODE_PIDS=()
for id in "${NODES[@]}"; do
  MQTT_PORTS+=("$(free_port)")
  ADMIN_PORTS+=("$(free_port)")
  start_petrel "node-$id" "${MQTT_PORTS[-1]}" "${ADMIN_PORTS[-1]}" "$id"
  NODE_PIDS+=("$LAST_PID")
done
PORTS_CSV=$(IFS=,; echo "${MQTT_PORTS[*]}")
ADMIN_CSV=$(IFS=,; echo "${ADMIN_PORTS[*]}")
python3 "$HERE/wait.py" members "$ADMIN_CSV" || die "the cluster did not form"
log "cluster: nats-server on $NATS_PORT, nodes ${NODES[*]} on MQTT $PORTS_CSV (admin $ADMIN_CSV)"

for scenario in "${SCENARIOS[@]}"; do
  for n in $(seq "$RUNS"); do
    python3 "$HERE/wait.py" quiet "$ADMIN_CSV" || die "interest of the previous run never left"
    run_once cluster "$scenario" "$n" --ports "$PORTS_CSV" \
      --before-publish "python3 $HERE/wait.py interest $ADMIN_CSV $scenario ${CLIENTS[$scenario]}"
    for i in "${!NODES[@]}"; do alive "${NODE_PIDS[i]}" "node-${NODES[i]}"; done
    alive "$NATS_PID" nats
  done
done
# What the nodes counted over all cluster runs: messages through NATS and dropped by the
# sending node, and the receiving side's async-nats "slow consumers" events (the client dropped
# messages its subscription channel had no room for; petrel's counters include none of them).
COUNTERS=$(for i in "${!NODES[@]}"; do
  curl -s -H "Authorization: Bearer t" "http://127.0.0.1:${ADMIN_PORTS[i]}/api/v1/cluster" |
    python3 -c 'import json, sys; c = json.load(sys.stdin); m = c["messages"]
m["slow_consumer_events"] = int(sys.argv[1]); print(c["node"] + ": " + json.dumps(m))' \
      "$(grep -c 'slow consumers' "$WORK/node-${NODES[i]}.log" || true)"
done | paste -sd';')
log "cluster counters: $COUNTERS"
for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do stop_pid "${PIDS[i]}"; done
PIDS=()

# One node, no cluster, same settings.
SINGLE_PORT=$(free_port)
start_petrel single "$SINGLE_PORT" "$(free_port)" ""
SINGLE_PID=$LAST_PID
log "single node on MQTT $SINGLE_PORT"
for scenario in "${SCENARIOS[@]}"; do
  for n in $(seq "$RUNS"); do
    run_once single "$scenario" "$n" --port "$SINGLE_PORT"
    alive "$SINGLE_PID" single
  done
done
stop_pid "$SINGLE_PID"
PIDS=()

# ---------------------------------------------------------------------------------- summary
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$ROOT/bench/cluster-results"
OUT=$ROOT/bench/cluster-results/cluster-$STAMP.json
commit=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
[ -z "$(git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null)" ] ||
  commit="$commit with uncommitted changes"
python3 "$HERE/summary.py" "$RESULTS" "$OUT" \
  "command=$INVOCATION" "date=$STAMP" "commit=$commit" \
  "petrel=$("$PETREL" --version | head -n 1)" \
  "nats_server=$("$NATS_SERVER" --version | head -n 1)" \
  "cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//') × $(nproc)" \
  "kernel=$(uname -r)" "runs_per_scenario=$RUNS" \
  "fan-in=${ARGS[fan-in]}" "fan-out=${ARGS[fan-out]}" "pairs=${ARGS[pairs]}" \
  "common=${COMMON[*]}" "cluster=3 petrel nodes (memory storage), one nats-server -js, all on 127.0.0.1" \
  "cluster_counters=$COUNTERS"
log "results: $OUT"
