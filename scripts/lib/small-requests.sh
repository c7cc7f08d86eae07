# Sourced by the scripts/*-small-requests.sh measurements. `start_small_requests` starts
# the bench backend, a relay-server and an agent (name `p`) on loopback, each under the
# command in the arrays `server_wrap` and `agent_wrap` if the caller set them (valgrind,
# …), and waits until a GET passes through. Sets `out` (a temporary folder with the logs),
# `url`, `server` and `agent` (the PIDs), and `urls` (arguments for curl: REQUESTS GETs of
# the small page).
# Kills what it started when the calling script exits. Needs curl; run after
# `cargo build --release --workspace`. The relay binaries come from `$BIN` (default
# target/release), and so does the backend when `$BIN` has one (`relay-bench`, as in
# target/dist), so that an A/B there measures the backend `relay-bench` uses.

# The benchmark backend's binary: `$BIN`'s `relay-bench` if it has one, else the release one.
bench_backend() {
  if [ -x "${BIN:-target/release}/relay-bench" ]; then
    echo "${BIN:-target/release}/relay-bench"
  else
    echo target/release/relay-bench
  fi
}

# Makes `out` (a temporary folder for the logs), arranges for what the caller starts to be
# killed when it exits, and starts the bench backend: sets `backend` (its address) and
# `backend_pid`.
start_backend() {
  out=$(mktemp -d)
  trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true' EXIT
  "$(bench_backend)" backend >"$out/backend.log" 2>&1 &
  backend_pid=$!
  until grep -qs '^http ' "$out/backend.log"; do sleep 0.1; done
  backend=$(awk '/^http /{print $2}' "$out/backend.log")
}

# A loopback port free when asked (for peers that take no port 0).
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

start_small_requests() {
  local n=$1 token=profile-token-0123456789abcdef
  start_backend
  ${server_wrap[@]+"${server_wrap[@]}"} "${BIN:-target/release}"/relay-server ${SERVER_ARGS:-} --listen 127.0.0.1:0 \
    --agent-token "*=$token" --log "${LOG:-info}" >"$out/server.log" 2>&1 &
  server=$!
  until grep -qs 'listening on http://' "$out/server.log"; do sleep 0.2; done
  url=$(grep -o 'http://[0-9.:]*' "$out/server.log" | head -1)
  ${agent_wrap[@]+"${agent_wrap[@]}"} "${BIN:-target/release}"/relay-client --relay-url "$url" --name p \
    --backend-url "http://$backend" --token "$token" --log "${LOG:-info}" ${AGENT_ARGS:-} >"$out/agent.log" 2>&1 &
  agent=$!
  until curl -sf -o /dev/null "$url/client/p/small"; do sleep 0.2; done
  urls=()
  for _ in $(seq "$n"); do urls+=("$url/client/p/small" -o /dev/null); done
}

# Like `start_small_requests`, for rathole's server and client in front of the same backend
# (rathole in target/bench-tools, installed by a full `relay-bench` run): sets `out`, `url`
# (the small page's base), `server` and `agent` (rathole's server and client PIDs). With
# RATHOLE_NODELAY=1 both run with scripts/lib/nodelay.c preloaded (built with cc): TCP_NODELAY
# on every connection, as rathole's README says it has and its code does not do for the
# visitor's and the backend's connections (docs/PERFORMANCE.md, the thirtieth round).
start_rathole() {
  local control http preload=()
  start_backend
  if [ "${RATHOLE_NODELAY:-0}" = 1 ]; then
    cc -O2 -shared -fPIC -o "$out/nodelay.so" scripts/lib/nodelay.c -ldl
    preload=("LD_PRELOAD=$out/nodelay.so")
  fi
  control=$(free_port) http=$(free_port)
  printf '[server]\nbind_addr = "127.0.0.1:%s"\ndefault_token = "t"\n[server.services.http]\nbind_addr = "127.0.0.1:%s"\n' \
    "$control" "$http" >"$out/server.toml"
  printf '[client]\nremote_addr = "127.0.0.1:%s"\ndefault_token = "t"\n[client.services.http]\nlocal_addr = "%s"\n' \
    "$control" "$backend" >"$out/client.toml"
  env ${preload[@]+"${preload[@]}"} RUST_LOG=warn target/bench-tools/bin/rathole --server "$out/server.toml" >"$out/server.log" 2>&1 &
  server=$!
  env ${preload[@]+"${preload[@]}"} RUST_LOG=warn target/bench-tools/bin/rathole --client "$out/client.toml" >"$out/client.log" 2>&1 &
  agent=$!
  url=http://127.0.0.1:$http
  until curl -sf -o /dev/null "$url/small"; do sleep 0.2; done
}

# Like `start_rathole`, for HAProxy (Debian's `haproxy`, as `relay-bench` runs it: one
# process, a thread per core, keep-alive HTTP/1.1 to the backend) alone in front of the same
# backend: a reverse proxy doing the relay's kind of work in one hop. It listens for
# HTTP/1.1 and, on another port, HTTP/2 with prior knowledge; `url` is the one LOAD speaks.
# Sets `server` (HAProxy's PID) and leaves `agent` empty.
start_haproxy() {
  local h1 h2
  start_backend
  h1=$(free_port) h2=$(free_port)
  printf 'global\n  maxconn 1024\ndefaults\n  mode http\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\nfrontend h1\n  bind 127.0.0.1:%s\n  default_backend b\nfrontend h2\n  bind 127.0.0.1:%s proto h2\n  default_backend b\nbackend b\n  server s1 %s\n' \
    "$h1" "$h2" "$backend" >"$out/haproxy.cfg"
  # -db: in the foreground, so that `$!` is HAProxy itself and the exit trap stops it.
  haproxy -db -f "$out/haproxy.cfg" >"$out/haproxy.log" 2>&1 &
  server=$!
  agent=
  until curl -sf -o /dev/null "http://127.0.0.1:$h1/small"; do sleep 0.2; done
  case "${LOAD:-}" in
    *--h2*) url=http://127.0.0.1:$h2 ;;
    *) url=http://127.0.0.1:$h1 ;;
  esac
}

# The relay (start_small_requests, `url` set to the agent's base), with TARGET=rathole
# rathole (start_rathole), or with TARGET=haproxy HAProxy (start_haproxy); `names` are the
# relaying processes' names. Every starter sets `backend_pid`, the backend's PID.
start_target() {
  if [ "${TARGET:-relay}" = rathole ]; then
    start_rathole
    names=(rathole-server rathole-client)
  elif [ "${TARGET:-relay}" = haproxy ]; then
    start_haproxy
    names=(haproxy)
  else
    start_small_requests 1
    url=$url/client/p
    names=(relay-server relay-agent)
  fi
}

# The load's arguments for `relay-bench load` in the array `load` (LOAD, default 16
# keep-alive connections), and one second of that load to warm the target up.
warm_up() {
  load=(${LOAD:---conns 16})
  "${BIN:-target/release}"/relay-bench load "$url" "${load[@]}" --secs 1 >/dev/null
}
