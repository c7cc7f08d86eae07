#!/usr/bin/env bash
# What waking a thread costs on this machine: two threads ping-pong a byte over pipes,
# pinned to one core and then to two (each wake-up then lands on a core that was idle a
# moment ago). On a virtual machine whose idle vCPUs halt without polling first (guest
# halt-polling off: /sys/module/haltpoll/parameters/guest_halt_poll_ns 0), the two-core
# round trip costs tens of µs; this is what `--spin` saves (docs/PERFORMANCE.md, "Spinning
# before parking"). Needs a C compiler (cc).
#   scripts/wake-latency.sh [ROUND_TRIPS]   # default 20000
set -euo pipefail
n=${1:-20000}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
cat >"$dir/pp.c" <<'C'
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
static int ping[2], pong[2], n, peer_cpu;
static void pin(int cpu) {
  cpu_set_t s;
  CPU_ZERO(&s);
  CPU_SET(cpu, &s);
  if (sched_setaffinity(0, sizeof s, &s)) { perror("sched_setaffinity"); exit(1); }
}
static void *peer(void *arg) {
  char c;
  (void)arg;
  pin(peer_cpu);
  for (int i = 0; i < n; i++)
    if (read(ping[0], &c, 1) != 1 || write(pong[1], &c, 1) != 1) exit(1);
  return 0;
}
int main(int argc, char **argv) {
  n = atoi(argv[1]);
  int cpu = atoi(argv[2]);
  peer_cpu = atoi(argv[3]);
  pthread_t t;
  if (pipe(ping) || pipe(pong) || pthread_create(&t, 0, peer, 0)) return 1;
  pin(cpu);
  struct timespec a, b;
  char c = 'x';
  clock_gettime(CLOCK_MONOTONIC, &a);
  for (int i = 0; i < n; i++)
    if (write(ping[1], &c, 1) != 1 || read(pong[0], &c, 1) != 1) return 1;
  clock_gettime(CLOCK_MONOTONIC, &b);
  pthread_join(t, 0);
  double us = ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / n / 1e3;
  printf("cores %d and %d: %.1f µs per round trip (two wake-ups)\n", cpu, peer_cpu, us);
  return 0;
}
C
cc -O2 -pthread -o "$dir/pp" "$dir/pp.c"
"$dir/pp" "$n" 0 0
if [ "$(nproc)" -gt 1 ]; then "$dir/pp" "$n" 0 1; fi
poll=/sys/module/haltpoll/parameters/guest_halt_poll_ns
if [ -r "$poll" ]; then echo "guest halt-polling: $(cat "$poll") ns ($poll)"; fi
