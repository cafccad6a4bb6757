#!/bin/bash
# Interleaved A/B rounds of a YCSB load phase (embedded cluster), under perf stat.
#   bench/scripts/ycsb-ab.sh ROUNDS 'LABEL|ENV|BINARY' ['LABEL|ENV|BINARY' ...]
# Each round runs every variant once, one after the other. Per run: inserts/s, CPU µs
# per insert (the process's task-clock ÷ RECORDS), page faults, context switches.
#   RECORDS (default 200000), EXTRA (more bench flags, e.g. "--log-io sync").
#   PHASE=both also runs workload A after the load (for DURATION seconds, default 15)
#   and prints its ops/s; CPU per insert then covers both phases.
# ENV is `NAME=value ...` for `env` (e.g. MALLOC_CONF=...), or `_=1` for none; BINARY
# defaults to $RANGEKV, else ~/.cache/rangekv/target/release/rangekv.
set -eu
ROUNDS=$1
shift
RECORDS=${RECORDS:-200000}
PHASE=${PHASE:-load}
DURATION=${DURATION:-15}
DEFAULT=${RANGEKV:-$HOME/.cache/rangekv/target/release/rangekv}
for round in $(seq 1 "$ROUNDS"); do
    for spec in "$@"; do
        IFS='|' read -r label envs bin <<<"$spec"
        bin=${bin:-$DEFAULT}
        # shellcheck disable=SC2086
        out=$(env ${envs:-_=1} perf stat -e task-clock,page-faults,context-switches -- \
            "$bin" bench ycsb --workloads a --phase "$PHASE" --threads 256 \
            -p recordcount="$RECORDS" --duration-secs "$DURATION" --quiet ${EXTRA:-} 2>&1)
        ops=$(echo "$out" | grep -a "load:" | sed -E 's/.*load: ([0-9]+) ops.*/\1/')
        run_ops=$(echo "$out" | grep -a "^\[rangekv\] " | grep -av " load:" |
            sed -E 's/.*: ([0-9]+) ops.s over.*/\1/' | head -1)
        clock=$(echo "$out" | grep -a "task-clock" | awk '{print $1}' | tr -d ,)
        faults=$(echo "$out" | grep -a "page-faults" | awk '{print $1}' | tr -d ,)
        switches=$(echo "$out" | grep -a "context-switches" | awk '{print $1}' | tr -d ,)
        cpu=$(echo "$clock * 1000 / $RECORDS" | bc -l)
        printf 'round %s %-12s %8s inserts/s  %8s A ops/s  %6.1f µs CPU/insert  %8s faults  %8s switches\n' \
            "$round" "$label" "$ops" "${run_ops:--}" "$cpu" "$faults" "$switches"
    done
done
