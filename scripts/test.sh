#!/usr/bin/env bash
# The project's whole test command: installs what the tests need (Debian, as root; only
# what is missing: nginx, openssh, slowhttptest, chromium, systemd-analyze, python3-yaml,
# redis-server, h2load for the benchmark's HTTP/2 scenario, HAProxy as its second reverse
# proxy, Backend.AI's CLI), then runs
# formatting, lints, the release build and every test.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
[ -x /usr/sbin/nginx ] || command -v nginx >/dev/null 2>&1 || missing+=(nginx)
[ -x /usr/sbin/sshd ] || missing+=(openssh-server)
command -v ssh >/dev/null 2>&1 && command -v scp >/dev/null 2>&1 || missing+=(openssh-client)
command -v python3 >/dev/null 2>&1 || missing+=(python3)
[ -x /usr/bin/slowhttptest ] || missing+=(slowhttptest)
[ -x /usr/bin/chromium ] || missing+=(chromium)
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
python3 -c 'import yaml' >/dev/null 2>&1 || missing+=(python3-yaml)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v h2load >/dev/null 2>&1 || missing+=(nghttp2-client)
[ -x /usr/sbin/haproxy ] || missing+=(haproxy)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "scripts/test.sh: missing ${missing[*]}; run as root or install them" >&2
    exit 1
  fi
  apt-get update -qq
  # The packages' own service starts may fail without an init system; the tests start
  # their own nginx and sshd, so only the binaries matter.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" \
    || { [ -x /usr/sbin/nginx ] && [ -x /usr/sbin/sshd ] && [ -x /usr/bin/slowhttptest ] \
         && [ -x /usr/bin/chromium ] && command -v systemd-analyze >/dev/null \
         && command -v redis-server >/dev/null && command -v h2load >/dev/null \
         && [ -x /usr/sbin/haproxy ]; }
fi

# Backend.AI's CLI for the service-port compatibility test (PyPI; yarl<1.10 is what the
# 23.9 client works with).
if [ ! -x target/bai-venv/bin/backend.ai ]; then
  rm -rf target/bai-venv
  python3 -m venv target/bai-venv
  target/bai-venv/bin/pip install -q --disable-pip-version-check "backend.ai-client==23.9.*" "yarl<1.10"
fi

cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings
# The end-to-end tests run the real binaries; build them in the same profile.
cargo build --release --workspace --all-targets
# The Debian packages the packaging test installs (cargo-deb is installed when missing).
scripts/package.sh
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --release --workspace --no-fail-fast
  # The end-to-end suite once more with every agent on long polls (protocol 1, the
  # fallback carrier); the run above uses sessions, and the nginx tests check that the
  # fallback is found by itself. Selected by a filter over the whole workspace, not with
  # `-p relay-tests`: that resolves features for one package and rebuilt every test
  # binary (7 minutes on the 2-core machine).
  RELAY_TEST_TRANSPORT=stream RELAY_TRANSPORT=stream \
    cargo nextest run --release --workspace -E 'package(relay-tests)' --no-fail-fast
else
  cargo test --release --workspace --no-fail-fast
  RELAY_TEST_TRANSPORT=stream RELAY_TRANSPORT=stream \
    cargo test --release -p relay-tests --no-fail-fast
fi
# Doc tests (nextest does not run them).
cargo test --release --workspace --doc
# The criterion micro-benchmarks, each run once so they cannot rot (timing: `cargo bench`).
cargo bench -p relay-bench --bench micro -- --test
# A 60-second soak under injected faults (docs/RELIABILITY.md): fails on any SILENT outcome
# (a response that looked complete and was wrong) or a resource that does not come back.
target/release/relay-soak --duration 60s --json target/soak-smoke.json
