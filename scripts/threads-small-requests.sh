#!/usr/bin/env bash
# Each thread's share of a core (user and system time over the load's wall time) in the
# relay-server, the agent and the benchmark backend, under `relay-bench load` for SECS
# seconds: which stage of a relayed request is busy and which waits. With TARGET=rathole,
# rathole's server and client in front of the same backend. docs/PERFORMANCE.md (the
# twenty-ninth round) used it to see that no stage saturates a core under HTTP/2: the
# streams move through the stages as one convoy. Reads /proc; needs curl, and rathole in
# target/bench-tools for TARGET=rathole. Run after `cargo build --release --workspace`
# (BIN=target/dist for the shipped build).
#   LOAD="--h2 32" scripts/threads-small-requests.sh     # HTTP/2, 32 streams on one connection
#   LOAD="--conns 64" SECS=5 scripts/threads-small-requests.sh
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${SECS:-3}
. scripts/lib/small-requests.sh
start_target
backend_pid=$(pgrep -n -f "$(bench_backend) backend")
# pid, thread id, thread name, user + system ticks, for every thread of the three processes.
snap() {
  for p in "$server" "$agent" "$backend_pid"; do
    for t in /proc/"$p"/task/*; do
      printf '%s %s %s %s\n' "$p" "${t##*/}" "$(tr ' ' _ <"$t/comm")" \
        "$(awk '{print $14 + $15}' "$t/stat")"
    done
  done
}
load=(${LOAD:---conns 16})
"${BIN:-target/release}"/relay-bench load "$url" "${load[@]}" --secs 1 >/dev/null # warm-up
before=$(snap)
result=$("${BIN:-target/release}"/relay-bench load "$url" "${load[@]}" --secs "$secs")
after=$(snap)
echo "$result"
python3 - "$before" "$after" "$secs" "$(getconf CLK_TCK)" "$server" "$agent" "${names[@]}" <<'PY'
import sys
before, after, secs, hz, server, agent, *names = sys.argv[1:]
role = {server: names[0], agent: names[1]}
ticks = lambda text: {tuple(l.split()[:3]): int(l.split()[3]) for l in text.splitlines()}
b, a = ticks(before), ticks(after)
for key in sorted(a, key=lambda k: (k[0] != server, k[0] != agent, -(a[k] - b.get(k, 0)))):
    share = (a[key] - b.get(key, 0)) / int(hz) / float(secs)
    if share >= 0.01:
        print(f"{role.get(key[0], 'backend'):15} thread {key[1]:>7} {key[2]:16} {100 * share:5.1f} % of a core")
PY
