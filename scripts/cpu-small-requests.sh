#!/usr/bin/env bash
# CPU time (user and system) and context switches per small GET in each process of a relay,
# under `relay-bench load` on CONNS keep-alive connections for SECS seconds: the relay's
# relay-server and agent, (TARGET=rathole) rathole's server and client, or (TARGET=haproxy)
# HAProxy alone, in front of the same backend. Then the whole machine's time per request:
# the backend's CPU, the load generator's, and the cores' idle time, which add up with the
# relaying processes' to 1 s × cores / the rate (docs/PERFORMANCE.md, the thirty-third
# round: the relay's HTTP/2 requests leave the cores idle longer than HAProxy's). On this
# project's VM throughput moves by ±30 % between runs while CPU per request moves far less,
# so this is how docs/PERFORMANCE.md compares the two and A/B pairs of builds. Reads /proc;
# needs curl, rathole in target/bench-tools (installed by a full `relay-bench` run) for
# TARGET=rathole, haproxy for TARGET=haproxy. Run after `cargo build --release --workspace`.
#   scripts/cpu-small-requests.sh                     # relay, 16 connections, 5 s
#   CONNS=1 SECS=3 scripts/cpu-small-requests.sh
#   TARGET=rathole scripts/cpu-small-requests.sh
#   TARGET=haproxy LOAD="--h2 32" scripts/cpu-small-requests.sh
#   AGENT_ARGS="--worker-threads 0" scripts/cpu-small-requests.sh   # the agent on one thread per core
#   LOAD="--h2 32" scripts/cpu-small-requests.sh        # HTTP/2, 32 streams on one connection
set -euo pipefail
cd "$(dirname "$0")/.."
conns=${CONNS:-16}
secs=${SECS:-5}
. scripts/lib/small-requests.sh
start_target
# The relaying processes (one for HAProxy), then the backend.
procs=("$server" ${agent:+"$agent"} "$backend_pid")
# utime, stime (clock ticks) and the context switches of every thread, per process.
# Then the machine's idle and busy ticks (/proc/stat, all cores).
snap() {
  for p in "${procs[@]}"; do
    awk '{printf "%s %s ", $14, $15}' "/proc/$p/stat"
    cat /proc/"$p"/task/*/status | awk '/ctxt_switches/{n += $2} END{printf "%d ", n}'
  done
  awk '/^cpu /{printf "%d %d", $5 + $6, $2 + $3 + $4 + $7 + $8 + $9}' /proc/stat
}
load=(${LOAD:---conns $conns})
"$(bench_backend)" load "$url" "${load[@]}" --secs 1 >/dev/null # warm-up (the backend's binary)
before=$(snap)
# The load's own user and system seconds, from bash's `time`.
TIMEFORMAT='%U %S'
{ time "$(bench_backend)" load "$url" "${load[@]}" --secs "$secs" >"$out/result"; } 2>"$out/load-time"
after=$(snap)
result=$(cat "$out/result")
echo "$result"
python3 - "$before" "$after" "$result" "$secs" "$(getconf CLK_TCK)" "$(tail -1 "$out/load-time")" \
  "${names[@]}" backend <<'PY'
import re, sys
a, b = (list(map(int, x.split())) for x in sys.argv[1:3])
n = float(re.search(r"([0-9.]+) req/s", sys.argv[3]).group(1)) * float(sys.argv[4])
tick_us = 1e6 / int(sys.argv[5])
load_user, load_system = map(float, sys.argv[6].split())
names = sys.argv[7:]
total = 0.0
for i, name in enumerate(names):
    user, system, switches = ((b[3 * i + k] - a[3 * i + k]) for k in range(3))
    total += (user + system) * tick_us / n
    print(f"{name}: user {user * tick_us / n:.1f} µs, system {system * tick_us / n:.1f} µs, "
          f"{switches / n:.2f} context switches per request")
load = (load_user + load_system) * 1e6 / n
total += load
print(f"load: user {load_user * 1e6 / n:.1f} µs, system {load_system * 1e6 / n:.1f} µs per request")
k = 3 * len(names)
idle, busy = b[k] - a[k], b[k + 1] - a[k + 1]
print(f"machine: {100 * idle / (idle + busy):.0f} % idle, {idle * tick_us / n:.1f} µs of idle "
      f"cores per request beside {total:.1f} µs of CPU in these processes")
PY
