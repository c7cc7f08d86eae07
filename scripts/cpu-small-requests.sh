#!/usr/bin/env bash
# CPU time (user and system) and context switches per small GET in each process of a relay,
# under `relay-bench load` on CONNS keep-alive connections for SECS seconds: the relay's
# relay-server and agent, or (TARGET=rathole) rathole's server and client in front of the
# same backend. On this project's VM throughput moves by ±30 % between runs while CPU per
# request moves far less, so this is how docs/PERFORMANCE.md compares the two and A/B
# pairs of builds. Reads /proc; needs curl, and rathole in target/bench-tools (installed by
# a full `relay-bench` run) for TARGET=rathole. Run after `cargo build --release --workspace`.
#   scripts/cpu-small-requests.sh                     # relay, 16 connections, 5 s
#   CONNS=1 SECS=3 scripts/cpu-small-requests.sh
#   TARGET=rathole scripts/cpu-small-requests.sh
#   AGENT_ARGS="--worker-threads 0" scripts/cpu-small-requests.sh   # the agent on one thread per core
#   LOAD="--h2 32" scripts/cpu-small-requests.sh        # HTTP/2, 32 streams on one connection
set -euo pipefail
cd "$(dirname "$0")/.."
conns=${CONNS:-16}
secs=${SECS:-5}
. scripts/lib/small-requests.sh
start_target
# utime, stime (clock ticks) and the context switches of every thread, per process.
# Then the machine's idle and busy ticks (/proc/stat).
snap() {
  for p in "$server" "$agent"; do
    awk '{printf "%s %s ", $14, $15}' "/proc/$p/stat"
    cat /proc/"$p"/task/*/status | awk '/ctxt_switches/{n += $2} END{printf "%d ", n}'
  done
  awk '/^cpu /{printf "%d %d", $5 + $6, $2 + $3 + $4 + $7 + $8 + $9}' /proc/stat
}
load=(${LOAD:---conns $conns})
target/release/relay-bench load "$url" "${load[@]}" --secs 1 >/dev/null # warm-up
before=$(snap)
result=$(target/release/relay-bench load "$url" "${load[@]}" --secs "$secs")
after=$(snap)
echo "$result"
python3 - "$before" "$after" "$result" "$secs" "$(getconf CLK_TCK)" "${names[@]}" <<'PY'
import re, sys
a, b = (list(map(int, x.split())) for x in sys.argv[1:3])
n = float(re.search(r"([0-9.]+) req/s", sys.argv[3]).group(1)) * float(sys.argv[4])
tick_us = 1e6 / int(sys.argv[5])
for i, name in enumerate(sys.argv[6:8]):
    user, system, switches = ((b[3 * i + k] - a[3 * i + k]) for k in range(3))
    print(f"{name}: user {user * tick_us / n:.1f} µs, system {system * tick_us / n:.1f} µs, "
          f"{switches / n:.2f} context switches per request")
idle, busy = b[6] - a[6], b[7] - a[7]
print(f"machine: {100 * idle / (idle + busy):.0f} % idle")
PY
