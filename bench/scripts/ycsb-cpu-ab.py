#!/usr/bin/env python3
"""Interleaved fixed-work rounds of YCSB load + workload A (embedded cluster).

    bench/scripts/ycsb-cpu-ab.py ROUNDS LABEL=BINARY [LABEL=BINARY ...]

Each round runs every binary once, one after the other, on the same work
(RECORDS records loaded, then OPERATIONS operations of workload A, 256 threads).
Per run: the process's CPU seconds (user + system, from getrusage: time the
hypervisor stole from this VM is not counted, unlike perf's task-clock), the
seconds stolen from the whole VM meanwhile (/proc/stat), wall seconds, load and
workload A ops/s. At the end: per label the median CPU, and against the first
label the median of the paired per-round ratios.
"""
import os
import re
import resource
import statistics
import subprocess
import sys
import time

RECORDS = os.environ.get("RECORDS", "100000")
OPERATIONS = os.environ.get("OPERATIONS", "400000")


def stolen_ticks():
    with open("/proc/stat") as stat:
        return int(stat.readline().split()[8])


def run(binary):
    args = [binary, "bench", "ycsb", "--workloads", "a", "--phase", "both",
            "--threads", "256", "-p", f"recordcount={RECORDS}",
            "--operations", OPERATIONS, "--quiet"]
    steal0, usage0, wall0 = stolen_ticks(), resource.getrusage(resource.RUSAGE_CHILDREN), time.time()
    out = subprocess.run(args, capture_output=True, text=True)
    usage1, steal1, wall1 = resource.getrusage(resource.RUSAGE_CHILDREN), stolen_ticks(), time.time()
    if out.returncode != 0:
        sys.exit(f"{binary} failed:\n{out.stderr}")
    text = out.stdout + out.stderr
    load = re.search(r"load: (\d+) ops", text)
    a = [m for m in re.findall(r"\[rangekv\] (.*)", text) if "load:" not in m]
    a_ops = re.search(r": (\d+) ops.s over", a[0]) if a else None
    cpu = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)
    return {
        "cpu": cpu,
        "steal": (steal1 - steal0) / os.sysconf("SC_CLK_TCK"),
        "wall": wall1 - wall0,
        "load": float(load.group(1)) if load else float("nan"),
        "a": float(a_ops.group(1)) if a_ops else float("nan"),
    }


def main():
    rounds = int(sys.argv[1])
    specs = [arg.split("=", 1) for arg in sys.argv[2:]]
    results = {label: [] for label, _ in specs}
    for r in range(1, rounds + 1):
        for label, binary in specs:
            m = run(binary)
            results[label].append(m)
            print(f"round {r} {label:<10} cpu {m['cpu']:6.2f} s  stolen {m['steal']:5.2f} s  "
                  f"wall {m['wall']:5.1f} s  load {m['load']:8.0f}/s  A {m['a']:8.0f}/s", flush=True)
    base = specs[0][0]
    for label, _ in specs:
        line = f"{label:<10} median cpu {statistics.median(x['cpu'] for x in results[label]):.2f} s"
        if label != base:
            for key in ("cpu", "load", "a"):
                ratios = [x[key] / b[key] for x, b in zip(results[label], results[base])]
                line += f"  {key} ×{statistics.median(ratios):.3f} (paired median vs {base})"
        print(line)


if __name__ == "__main__":
    main()
