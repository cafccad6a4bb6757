#!/bin/sh
# CPU of each node of an idle local cluster (PD + 3 nodes, 3 replicas per range).
#   bench/scripts/idle-cpu.sh RANGES [SECONDS] [NODE_CONFIG]
# Prints each node's CPU as a percentage of one core over SECONDS, measured from
# /proc/<pid>/stat once every range has a leader and 10 s more have passed (enough for
# idle ranges to quiesce: 20 ticks of 100 ms).
set -eu
RANGES=${1:-1000}
SECONDS_=${2:-30}
NODE_CONFIG=${3:-}
BIN=${RANGEKV:-$HOME/.cache/rangekv/target/release/rangekv}
DIR=$(mktemp -d /tmp/rangekv-idle.XXXXXX)
EXTRA=""
[ -n "$NODE_CONFIG" ] && EXTRA="--node-config $NODE_CONFIG"
"$BIN" local --dir "$DIR" --initial-ranges "$RANGES" --pd-port 23790 --node-port 23800 \
    --ready-timeout-secs 600 $EXTRA >"$DIR/local.out" 2>&1 &
LOCAL=$!
trap 'kill -TERM $LOCAL 2>/dev/null; wait $LOCAL 2>/dev/null; rm -rf "$DIR"' EXIT
START=$(date +%s)
until grep -q "Press Ctrl-C" "$DIR/local.out"; do
    kill -0 $LOCAL 2>/dev/null || { cat "$DIR/local.out"; exit 1; }
    sleep 1
done
echo "ready: $RANGES ranges led after $(( $(date +%s) - START )) s"
sleep 10
HZ=$(getconf CLK_TCK)
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }
PIDS=$(pgrep -f "rangekv node --data-dir $DIR")
for p in $PIDS; do eval "before_$p=$(cpu "$p")"; done
sleep "$SECONDS_"
for p in $PIDS; do
    eval "b=\$before_$p"
    a=$(cpu "$p")
    echo "node pid $p: $(awk -v a="$a" -v b="$b" -v hz="$HZ" -v s="$SECONDS_" 'BEGIN { printf "%.2f", (a - b) * 100 / (hz * s) }') % of one core, rss $(awk '/VmRSS/{print $2 $3}' /proc/$p/status)"
done
