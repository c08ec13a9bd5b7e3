#!/usr/bin/env bash
# Durable QoS 1 throughput: petrel (disk store, fsync always / every_ms / memory) and Mosquitto
# (persistence true), pairs scenario with persistent sessions, one broker at a time.
#
#   bench/durable/run.sh   (after cargo build --release -p petrel-server -p petrel-bench;
#                           Mosquitto from Debian at /usr/sbin/mosquitto)
#
# A quick look at the durable figures without the whole comparison; bench/compare runs the same
# load as its durable-always and durable-every-ms scenarios, which BENCHMARKS.md reports.
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
BIN=${BIN:-$HERE/../../target/release}
cd "$(mktemp -d)"
PORT=21883
run_bench() { # label
  timeout 200 "$BIN/petrel-bench" pairs --port $PORT --qos 1 --pairs 50 --messages 20000 --inflight 100 \
    --persistent --json --label "$1" --timeout 180 2>/dev/null | python3 "$HERE/fmt.py"
}
for mode in always every_ms memory; do
  rm -rf data; mkdir -p data
  if [ $mode = memory ]; then store='mode = "memory"'; else store="dir = \"$PWD/data\"
fsync = \"$mode\""; fi
  cat > petrel.toml <<CFG
[[listeners]]
bind = "127.0.0.1:$PORT"
[mqtt]
max_inflight = 100
max_queued_messages = 1000
[storage]
$store
CFG
  "$BIN/petrel" --config petrel.toml 2>petrel-$mode.log & pid=$!
  sleep 0.5
  run_bench "petrel fsync=$mode"
  kill -TERM $pid; wait $pid
done
rm -rf mosq; mkdir -p mosq
cat > mosquitto.conf <<CFG
listener $PORT 127.0.0.1
allow_anonymous true
set_tcp_nodelay true
persistence true
persistence_location $PWD/mosq/
max_inflight_messages 100
max_queued_messages 1000
CFG
/usr/sbin/mosquitto -c mosquitto.conf 2>mosq.log & pid=$!
sleep 0.5
run_bench "mosquitto persistence"
kill -TERM $pid; wait $pid
