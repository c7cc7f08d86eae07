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
if [ "${TARGET:-relay}" = rathole ]; then
  out=$(mktemp -d)
  trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true' EXIT
  target/release/relay-bench backend >"$out/backend.log" 2>&1 &
  until grep -q '^http ' "$out/backend.log" 2>/dev/null; do sleep 0.1; done
  backend=$(awk '/^http /{print $2}' "$out/backend.log")
  port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
  control=$(port) http=$(port)
  printf '[server]\nbind_addr = "127.0.0.1:%s"\ndefault_token = "t"\n[server.services.http]\nbind_addr = "127.0.0.1:%s"\n' \
    "$control" "$http" >"$out/server.toml"
  printf '[client]\nremote_addr = "127.0.0.1:%s"\ndefault_token = "t"\n[client.services.http]\nlocal_addr = "%s"\n' \
    "$control" "$backend" >"$out/client.toml"
  RUST_LOG=warn target/bench-tools/bin/rathole --server "$out/server.toml" >"$out/server.log" 2>&1 &
  server=$!
  RUST_LOG=warn target/bench-tools/bin/rathole --client "$out/client.toml" >"$out/client.log" 2>&1 &
  agent=$!
  url=http://127.0.0.1:$http
  until curl -sf -o /dev/null "$url/small"; do sleep 0.2; done
  names=(rathole-server rathole-client)
else
  . scripts/lib/small-requests.sh
  start_small_requests 1
  url=$url/client/p
  names=(relay-server relay-agent)
fi
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
