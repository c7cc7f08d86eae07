#!/usr/bin/env bash
# Instruction profile of the relay-server (or, with PROFILE=agent, of the relay-client) for
# small relayed GETs (valgrind's callgrind: stable counts where perf has no samples, as in
# this project's VM); with TOOL=dhat, its heap allocations per request and where they are
# made (valgrind's dhat; the summary needs python3). Both run at their default log level.
# Needs valgrind and curl; run after `cargo build --release --workspace`.
#   scripts/profile-small-requests.sh [REQUESTS]              # default 2000
#   PROFILE=agent scripts/profile-small-requests.sh [REQUESTS]
#   TOOL=dhat scripts/profile-small-requests.sh [REQUESTS]   # builds target/system-allocator once
# With LOAD set, `relay-bench load` drives the relay for SECS seconds (default 10) instead
# of curl's one connection, and the requests it counts are the divisor: concurrency as in
# the benchmarks, and HTTP/2, which curl 7.88 cannot reuse a connection for:
#   LOAD="--h2 32" scripts/profile-small-requests.sh      # 32 streams on one h2c connection
#   LOAD="--conns 16" scripts/profile-small-requests.sh   # 16 keep-alive HTTP/1.1 connections
#   SERVER_ARGS="--max-parked-per-name 20000 --max-parked 20000" \
#     LOAD="--burst 10000" scripts/profile-small-requests.sh  # scenario 6's burst, once
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-2000}
side=${PROFILE:-server}
tool=${TOOL:-callgrind}
prof=$(mktemp -d)
case $tool in
  callgrind) grind=(valgrind --tool=callgrind --callgrind-out-file="$prof/callgrind.out") ;;
  dhat)
    grind=(valgrind --tool=dhat --dhat-out-file="$prof/dhat.json")
    # DHAT counts what goes through malloc, which mimalloc (the binaries' allocator) never
    # calls: the relay binaries are built once more with the system allocator, apart.
    cargo build --release -q -p relay-server -p relay-client \
      --features relay-config-file/system-allocator --target-dir target/system-allocator
    export BIN=target/system-allocator/release ;;
  *) echo "TOOL is callgrind or dhat" >&2; exit 2 ;;
esac
server_wrap=() agent_wrap=()
if [ "$side" = agent ]; then agent_wrap=("${grind[@]}"); else server_wrap=("${grind[@]}"); fi
. scripts/lib/small-requests.sh
start_small_requests "$n"
if [ -n "${LOAD:-}" ]; then
  secs=${SECS:-10}
  # shellcheck disable=SC2086 # LOAD holds the load's flags
  result=$(target/release/relay-bench load "$url/client/p" $LOAD --secs "$secs")
  echo "$result"
  # A burst (`--burst N`) prints how many were answered; a timed load its rate.
  n=$(python3 -c "import re,sys; m = re.search(r'([0-9]+) of [0-9]+ answered', sys.argv[1]); print(int(m.group(1)) if m else round(float(re.search(r'([0-9.]+) req/s', sys.argv[1]).group(1)) * $secs))" "$result")
else
  # One keep-alive connection, n requests.
  curl -sf "${urls[@]}"
fi
if [ "$side" = agent ]; then pid=$agent; else pid=$server; fi
kill -INT "$pid"
wait "$pid" || true
if [ "$tool" = dhat ]; then
  cp "$prof/dhat.json" target/dhat.json
  python3 - "$prof/dhat.json" "$n" "$side" <<'PY'
import json, re, sys
d = json.load(open(sys.argv[1])); n = int(sys.argv[2])
total = sum(p["tbk"] for p in d["pps"])
print(f"relay-{sys.argv[3]}: {total} heap allocations for {n} requests (plus start-up): "
      f"{total / n:.1f} per request; sites with at least one per 5 requests:")
def frames(p):
    # The first three frames outside the standard library and valgrind: the call site.
    shown = []
    for i in p["fs"][1:]:
        m = re.match(r"0x[0-9A-F]+: (.*?) \((.*)\)$", d["ftbl"][i])
        if not m or m.group(2).startswith("library/") or "vgpreload" in m.group(2):
            continue
        where = re.sub(r"^/root/.cargo/registry/src/[^/]*/", "", m.group(2))
        shown.append(f"{m.group(1)[:50]} @{where}")
        if len(shown) == 3:
            break
    return " <- ".join(shown)
for p in sorted(d["pps"], key=lambda p: -p["tbk"]):
    if p["tbk"] < n / 5:
        break
    print(f"{p['tbk'] / n:5.2f} x {p['tb'] // max(p['tbk'], 1):5d} B  {frames(p)}")
PY
  exit 0
fi
total=$(callgrind_annotate "$prof/callgrind.out" 2>/dev/null | awk '/PROGRAM TOTALS/{gsub(",","",$1); print $1}')
cp "$prof/callgrind.out" target/callgrind.out
echo "relay-$side: $total instructions for $n requests (plus start-up): $((total / n)) per request"
callgrind_annotate --inclusive=no "$prof/callgrind.out" 2>/dev/null | sed -n '/file:function/,$p' | head -25
