#!/bin/bash
# User-space instructions per insert of a YCSB load phase (embedded cluster), counted
# by valgrind's callgrind, which repeats where CPU time does not on a shared machine.
#   bench/scripts/ycsb-instructions.sh 'LABEL|ENV|BINARY|FLAGS' ['LABEL|ENV|BINARY|FLAGS' ...]
# Each variant loads SMALL then LARGE records; instructions per insert =
# (Ir(LARGE) - Ir(SMALL)) / (LARGE - SMALL), so start-up, the cluster's bootstrap and
# shutdown cancel out. ROUNDS (default 1) repeats the whole set, one variant after the
# other. SMALL (default 2000), LARGE (default 12000), THREADS (default 64), EXTRA (more
# bench flags for every variant). ENV is `NAME=value ...` for `env`, or `_=1` for none;
# BINARY defaults to $RANGEKV, else ~/.cache/rangekv/target/release/rangekv; FLAGS are
# more bench flags for this variant (e.g. --log-io auto).
# Valgrind runs one thread at a time, ~50x slower: group sizes (requests per raft
# entry, entries per log write) are not those of a native run, and the kernel's part
# (page faults, syscalls, the device) is not counted.
set -eu
ROUNDS=${ROUNDS:-1}
SMALL=${SMALL:-2000}
LARGE=${LARGE:-12000}
THREADS=${THREADS:-64}
DEFAULT=${RANGEKV:-$HOME/.cache/rangekv/target/release/rangekv}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT

# Total Ir of one run: callgrind writes one file per process, "summary: N" in it.
instructions() {
    local envs=$1 bin=$2 records=$3 flags=$4 file=$OUT/cg.out
    rm -f "$file"
    # shellcheck disable=SC2086
    env ${envs:-_=1} valgrind --tool=callgrind --callgrind-out-file="$file" -- \
        "$bin" bench ycsb --workloads a --phase load --threads "$THREADS" \
        -p recordcount="$records" --quiet ${EXTRA:-} $flags >"$OUT/bench.log" 2>"$OUT/vg.log" || {
        echo "run failed ($bin, $records records):" >&2
        tail -5 "$OUT/vg.log" "$OUT/bench.log" >&2
        exit 1
    }
    if grep -aq 'errors: [1-9]' "$OUT/bench.log"; then
        echo "the load had errors ($bin, $records records)" >&2
        exit 1
    fi
    grep -a '^summary:' "$file" | awk '{print $2}'
}

for round in $(seq 1 "$ROUNDS"); do
    for spec in "$@"; do
        IFS='|' read -r label envs bin flags <<<"$spec"
        bin=${bin:-$DEFAULT}
        small=$(instructions "$envs" "$bin" "$SMALL" "${flags:-}")
        large=$(instructions "$envs" "$bin" "$LARGE" "${flags:-}")
        per=$(echo "($large - $small) / ($LARGE - $SMALL)" | bc)
        printf 'round %s %-12s %12s Ir per insert  (Ir %s at %s, %s at %s)\n' \
            "$round" "$label" "$per" "$small" "$SMALL" "$large" "$LARGE"
    done
done
