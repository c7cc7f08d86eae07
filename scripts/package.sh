#!/usr/bin/env bash
# Builds the Debian packages of relay-server and relay-client into target/debian/ with
# cargo-deb (installed when missing): the release binaries, the systemd units, the example
# configs as conffiles under /etc, and a system user made on install.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! cargo deb --version >/dev/null 2>&1; then
  cargo install cargo-deb --locked --quiet
fi
cargo build --release -p relay-server -p relay-client --bins
for pkg in relay-server relay-client; do
  cargo deb -p "$pkg" --no-build --strip --quiet
done
ls target/debian/*.deb
