#!/usr/bin/env bash
# Instruction profile of the relay-server (or, with PROFILE=agent, of the relay-client) for
# small relayed GETs (valgrind's callgrind: stable counts where perf has no samples, as in
# this project's VM). Both run at their default log level. Needs valgrind and curl; run
# after `cargo build --release --workspace`.
#   scripts/profile-small-requests.sh [REQUESTS]              # default 2000
#   PROFILE=agent scripts/profile-small-requests.sh [REQUESTS]
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-2000}
out=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true' EXIT
token=profile-token-0123456789abcdef
target/release/relay-bench backend >"$out/backend.log" 2>&1 &
until grep -q '^http ' "$out/backend.log"; do sleep 0.1; done
backend=$(awk '/^http /{print $2}' "$out/backend.log")
side=${PROFILE:-server}
grind=(valgrind --tool=callgrind --callgrind-out-file="$out/callgrind.out")
server_wrap=() agent_wrap=()
if [ "$side" = agent ]; then agent_wrap=("${grind[@]}"); else server_wrap=("${grind[@]}"); fi
${server_wrap[@]+"${server_wrap[@]}"} target/release/relay-server --listen 127.0.0.1:0 \
  --agent-token "*=$token" >"$out/server.log" 2>&1 &
server=$!
until grep -q 'listening on http://' "$out/server.log"; do sleep 0.2; done
url=$(grep -o 'http://[0-9.:]*' "$out/server.log" | head -1)
${agent_wrap[@]+"${agent_wrap[@]}"} target/release/relay-client --relay-url "$url" --name p \
  --backend-url "http://$backend" --token "$token" >"$out/agent.log" 2>&1 &
agent=$!
until curl -sf -o /dev/null "$url/client/p/small"; do sleep 0.2; done
# One keep-alive connection, n requests.
urls=()
for _ in $(seq "$n"); do urls+=("$url/client/p/small" -o /dev/null); done
curl -sf "${urls[@]}"
if [ "$side" = agent ]; then pid=$agent; else pid=$server; fi
kill -INT "$pid"
wait "$pid" || true
total=$(callgrind_annotate "$out/callgrind.out" 2>/dev/null | awk '/PROGRAM TOTALS/{gsub(",","",$1); print $1}')
cp "$out/callgrind.out" target/callgrind.out
echo "relay-$side: $total instructions for $n requests (plus start-up): $((total / n)) per request"
callgrind_annotate --inclusive=no "$out/callgrind.out" 2>/dev/null | sed -n '/file:function/,$p' | head -25
