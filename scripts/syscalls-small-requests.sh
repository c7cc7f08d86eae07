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
out=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true' EXIT
token=profile-token-0123456789abcdef
target/release/relay-bench backend >"$out/backend.log" 2>&1 &
until grep -q '^http ' "$out/backend.log"; do sleep 0.1; done
backend=$(awk '/^http /{print $2}' "$out/backend.log")
target/release/relay-server --listen 127.0.0.1:0 --agent-token "*=$token" >"$out/server.log" 2>&1 &
server=$!
until grep -q 'listening on http://' "$out/server.log"; do sleep 0.2; done
url=$(grep -o 'http://[0-9.:]*' "$out/server.log" | head -1)
target/release/relay-client --relay-url "$url" --name p --backend-url "http://$backend" \
  --token "$token" >"$out/agent.log" 2>&1 &
agent=$!
until curl -sf -o /dev/null "$url/client/p/small"; do sleep 0.2; done
urls=()
for _ in $(seq "$n"); do urls+=("$url/client/p/small" -o /dev/null); done
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
