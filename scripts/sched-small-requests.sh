#!/usr/bin/env bash
# Where the machine's time goes while a relay serves small GETs under `relay-bench load`:
# the kernel's scheduler events (perf sched, every CPU, WINDOW seconds in the middle of the
# load) say how long each process ran per request, how long the CPUs stood idle and in
# gaps of what length, whether both were idle at once, and how long a woken thread waited
# for its CPU; and one over the CPU per request of the two middle processes together (on
# a 2-core machine the rate follows it, docs/PERFORMANCE.md). TARGET=rathole measures
# rathole's server and client the same way. Needs perf and curl; run after
# `cargo build --release --workspace`.
#   scripts/sched-small-requests.sh                      # 16 keep-alive connections
#   LOAD="--h2 32" scripts/sched-small-requests.sh
#   TARGET=rathole scripts/sched-small-requests.sh
set -euo pipefail
cd "$(dirname "$0")/.."
window=${WINDOW:-0.5}
. scripts/lib/small-requests.sh
start_target
warm_up
(
  sleep 1
  perf sched record -a -o "$out/sched.data" -- sleep "$window" >/dev/null 2>&1
) &
rec=$!
result=$(target/release/relay-bench load "$url" "${load[@]}" --secs 3)
wait "$rec"
echo "$result"
# One line per switch-out: time, [cpu], task[tid/pid], wait, scheduling delay, run time.
perf sched timehist -i "$out/sched.data" 2>/dev/null >"$out/timehist"
python3 - "$out/timehist" "$result" "$server" "$agent" "${names[@]}" <<'PY'
import re, sys
path, result, server, agent, sname, aname = sys.argv[1:7]
rate = float(re.search(r"([0-9.]+) req/s", result).group(1))
who = {server: sname, agent: aname}
run, delay, idle = {}, {}, {}
t0 = t1 = None
for line in open(path):
    f = line.split()
    if len(f) < 6 or not re.match(r"^[0-9.]+$", f[0]) or "awakened" in line:
        continue
    t, cpu, task = float(f[0]), f[1], f[2]
    ms = float(f[-1])
    t0 = t - ms / 1e3 if t0 is None else min(t0, t - ms / 1e3)
    t1 = t if t1 is None else max(t1, t)
    if task == "<idle>":
        idle.setdefault(cpu, []).append((t - ms / 1e3, t))
        continue
    # `name[tid/pid]`, or `name[pid]` for a process's main thread.
    m = re.search(r"\[(\d+)(?:/(\d+))?\]", task)
    pid = (m.group(2) or m.group(1)) if m else ""
    name = who.get(pid, "load and backend")
    if "perf" in task or "sleep" in task or task.startswith(("k", "rcu", "migration")):
        name = "other"
    run[name] = run.get(name, 0) + ms
    d = delay.setdefault(name, [0.0, 0])
    d[0] += float(f[-2])
    d[1] += 1
span = t1 - t0
n = rate * span
print(f"{span:.3f} s recorded, about {n:.0f} requests")
for name in (sname, aname, "load and backend", "other"):
    if name in run:
        d = delay[name]
        print(f"  {name:17s} {run[name] / n * 1e3:6.1f} µs of CPU per request, "
              f"waited {d[0] / d[1] * 1e3:5.1f} µs on average for its CPU after a wake-up")
pair = sum(run.get(k, 0) for k in (sname, aname)) / n * 1e3
print(f"  the two together {pair:.1f} µs: 1 / that = {1e6 / pair:.0f} req/s "
      "(the rate when they keep one CPU busy between them)")
gaps = {"< 50 µs": 0.0, "50-100 µs": 0.0, "100-200 µs": 0.0, ">= 200 µs": 0.0}
for cpu in sorted(idle):
    total = sum(b - a for a, b in idle[cpu])
    print(f"  CPU {cpu} idle {total / span * 100:5.1f} %")
    for a, b in idle[cpu]:
        us = (b - a) * 1e6
        k = "< 50 µs" if us < 50 else "50-100 µs" if us < 100 else "100-200 µs" if us < 200 else ">= 200 µs"
        gaps[k] += b - a
cpus = sorted(idle)
both = 0.0
if len(cpus) == 2:
    other = sorted(idle[cpus[1]])
    for a, b in sorted(idle[cpus[0]]):
        for x, y in other:
            if y <= a:
                continue
            if x >= b:
                break
            both += min(b, y) - max(a, x)
    print(f"  both CPUs idle at once {both / span * 100:5.1f} % of the time")
all_idle = sum(gaps.values()) or 1
print("  idle time in gaps of " + ", ".join(f"{k}: {v / all_idle * 100:.0f} %" for k, v in gaps.items()))
PY
