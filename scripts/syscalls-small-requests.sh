#!/usr/bin/env bash
# System calls per relayed small GET, on the relay-server and on the agent (strace -c on
# both while curl sends REQUESTS GETs on PARALLEL keep-alive connections; the counts divided
# by the requests are what docs/PERFORMANCE.md quotes, e.g. futex calls per request). Needs
# strace and curl; run after `cargo build --release --workspace`.
#   scripts/syscalls-small-requests.sh [REQUESTS]        # default 2000, one connection
#   PARALLEL=8 scripts/syscalls-small-requests.sh 1000    # 8 connections, 1000 GETs each
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-2000}
par=${PARALLEL:-1}
. scripts/lib/small-requests.sh
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
