#!/bin/bash
# CPU and context switches per thread kind of a running YCSB load (embedded cluster),
# sampled from /proc over 2 s in the middle of a 300,000-record load.
#   bench/scripts/thread-cpu.sh [BENCH FLAGS...]
set -eu
BIN=${RANGEKV:-$HOME/.cache/rangekv/target/release/rangekv}
OUT=$(mktemp)
"$BIN" bench ycsb --workloads a --phase load --threads 256 -p recordcount=300000 \
    --quiet "$@" >"$OUT" 2>&1 &
BENCH=$!
sleep 2.5
snap() {
    for t in /proc/$BENCH/task/*; do
        printf '%s %s %s %s %s\n' "${t##*/}" "$(tr -d '0-9 ' <"$t/comm" 2>/dev/null)" \
            "$(awk '/^voluntary/ {print $2}' "$t/status" 2>/dev/null)" \
            "$(awk '/^nonvoluntary/ {print $2}' "$t/status" 2>/dev/null)" \
            "$(cut -d' ' -f14,15 "$t/stat" 2>/dev/null | awk '{print $1 + $2}')"
    done
}
snap >"$OUT.a"
sleep 2
snap >"$OUT.b"
wait $BENCH
grep -a "load:" "$OUT"
printf "%-20s %8s %8s %7s %4s\n" thread vol/s invol/s cpu% n
# Threads that ran through both snapshots (matched by thread id), summed by kind
# (name without digits); CPU in % of one core (clock ticks of 10 ms over 2 s).
awk 'NR == FNR { if (NF == 5) { kind[$1] = $2; v[$1] = $3; i[$1] = $4; c[$1] = $5 }; next }
    NF == 5 && ($1 in kind) {
        k = kind[$1]; vol[k] += $3 - v[$1]; inv[k] += $4 - i[$1]; cpu[k] += $5 - c[$1]; n[k]++
    }
    END {
        for (k in cpu) printf "%-20s %8d %8d %7.1f %4d\n", k, vol[k] / 2, inv[k] / 2, cpu[k] / 2, n[k]
    }' "$OUT.a" "$OUT.b" | sort -k4 -nr
rm -f "$OUT" "$OUT.a" "$OUT.b"
