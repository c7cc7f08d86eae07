#!/usr/bin/env bash
# System calls per relayed small GET, on the relay-server and on the agent (strace -c on
# both while curl sends REQUESTS GETs on PARALLEL keep-alive connections; the counts divided
# by the requests are what docs/PERFORMANCE.md quotes, e.g. futex calls per request). Needs
# strace and curl; run after `cargo build --release --workspace`.
#   scripts/syscalls-small-requests.sh [REQUESTS]        # default 2000, one connection
#   PARALLEL=8 scripts/syscalls-small-requests.sh 1000    # 8 connections, 1000 GETs each
# With LOAD set, `relay-bench load` drives it for SECS seconds (default 4) and the kernel
# counts (perf stat on tracepoints: far less overhead than strace, so the load keeps its
# shape), with each process's CPU time and context switches; TARGET=rathole measures
# rathole's server and client the same way (rathole in target/bench-tools). Needs perf.
#   LOAD="--conns 16" scripts/syscalls-small-requests.sh
#   LOAD="--conns 16" TARGET=rathole scripts/syscalls-small-requests.sh
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-2000}
par=${PARALLEL:-1}
. scripts/lib/small-requests.sh
if [ -n "${LOAD:-}" ]; then
  start_target
  secs=${SECS:-4}
  calls=(epoll_wait futex recvfrom read writev sendto write sched_yield)
  events=raw_syscalls:sys_enter,$(printf 'syscalls:sys_enter_%s,' "${calls[@]}")context-switches,task-clock
  load=($LOAD)
  target/release/relay-bench load "$url" "${load[@]}" --secs 1 >/dev/null # warm-up
  # Counting starts before the load and ends after it; the idle moments add nothing.
  perf stat -x, -e "$events" -p "$server" -o "$out/server.perf" -- sleep $((secs + 1)) &
  s=$!
  perf stat -x, -e "$events" -p "$agent" -o "$out/agent.perf" -- sleep $((secs + 1)) &
  a=$!
  sleep 0.5
  result=$(target/release/relay-bench load "$url" "${load[@]}" --secs "$secs")
  wait "$s" "$a"
  echo "$result"
  total=$(echo "$result" | awk -v s="$secs" '{for (i = 1; i < NF; i++) if ($(i + 1) ~ /^req\/s/) print $i * s}')
  for i in 0 1; do
    side=${names[$i]}
    [ "$i" = 0 ] && f=$out/server.perf || f=$out/agent.perf
    echo "$side, $total requests: per request"
    # task-clock is in milliseconds: per request in µs.
    awk -F, -v t="$total" '!/^#/ && NF > 2 {
      v = $1 / t; name = $3; sub(/^(raw_)?syscalls:sys_enter_?/, "", name)
      if (name == "") name = "all system calls"
      if (name == "task-clock") printf "  %-18s %7.1f µs\n", "CPU time", v * 1000
      else printf "  %-18s %7.2f\n", name, v }' "$f"
  done
  exit 0
fi
start_small_requests "$n"
# Warm-up (connections, pools, the session's credit), then the counted run.
curl -sf "${urls[@]}"
strace -c -f -p "$server" -o "$out/server.strace" 2>/dev/null &
s=$!
strace -c -f -p "$agent" -o "$out/agent.strace" 2>/dev/null &
a=$!
# strace attaches asynchronously; wait until it traces (its summary file opens at the end).
until grep -q TracerPid:.*[1-9] "/proc/$server/status" && grep -q TracerPid:.*[1-9] "/proc/$agent/status"; do sleep 0.1; done
clients=()
for _ in $(seq "$par"); do
  curl -sf "${urls[@]}" &
  clients+=($!)
done
wait "${clients[@]}"
kill -INT "$s" "$a"
wait "$s" "$a" || true
total=$((n * par))
for side in server agent; do
  echo "relay-$side, $total requests: calls per request"
  awk -v t="$total" '$NF ~ /^[a-z_0-9]+$/ && $4 ~ /^[0-9]+$/ && $NF != "total" {printf "  %-14s %6.2f\n", $NF, $4 / t}' "$out/$side.strace"
done
