#!/usr/bin/env bash
# TCP segments the whole machine sends per small GET (the kernel's counters, `nstat`), under
# `relay-bench load` for SECS seconds: through the relay, or (TARGET=rathole) rathole's
# server and client in front of the same backend. On loopback every segment a process sends
# also costs it the receiver's TCP processing and wake-up, so segments per request are a
# floor under the system time of a hop. docs/PERFORMANCE.md (the thirty-first round) used it
# to see that the relay's HTTP/2 costs about one segment to the backend and one back per
# request, where rathole passes a whole batch of streams in one. Counts every TCP segment
# on the machine: run it on an otherwise quiet one. Needs curl and nstat (iproute2), and
# rathole in target/bench-tools for TARGET=rathole. Run after `cargo build --release
# --workspace` (BIN=target/dist for the shipped build).
#   LOAD="--h2 32" scripts/segments-small-requests.sh
#   TARGET=rathole RATHOLE_NODELAY=1 LOAD="--h2 32 --h2load" scripts/segments-small-requests.sh
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${SECS:-3}
. scripts/lib/small-requests.sh
start_target
warm_up
nstat -n >/dev/null # resets nstat's history: the next call counts from here
result=$("${BIN:-target/release}"/relay-bench load "$url" "${load[@]}" --secs "$secs")
counters=$(nstat 2>/dev/null)
echo "$result"
requests=$(awk -v s="$secs" '{print $1 * s}' <<<"$result")
awk -v n="$requests" '
  $1 ~ /^(TcpOutSegs|TcpExtTCPOrigDataSent|TcpExtTCPPureAcks|TcpExtDelayedACKs|IpExtInOctets)$/ {
    printf "%-24s %12d  %8.3f per request\n", $1, $2, $2 / n
  }' <<<"$counters"
