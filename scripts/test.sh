#!/usr/bin/env bash
# Runs every test of the project: formatting, clippy, unit and end-to-end tests (which
# start the real gateway binary, and for the multi-node suite their own redis-server and
# haproxy processes on free ports), and the browser test of the demo page. Installs what
# is missing first, so a fresh machine passes with this one command.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
command -v redis-sentinel >/dev/null 2>&1 || need_apt+=(redis-sentinel)
command -v haproxy >/dev/null 2>&1 || need_apt+=(haproxy)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "==> installing ${need_apt[*]}"
  if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
if [ ! -d tests/browser/node_modules/playwright-core ]; then
  echo "==> installing playwright-core (drives the system chromium; no browser download)"
  (cd tests/browser && npm ci --no-audit --no-fund --loglevel=error)
fi

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> module layers (no import cycles, no arrows against the data flow)"
python3 scripts/check-layers.py
echo "==> cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "==> unit and end-to-end tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast
else
  cargo test --workspace --no-fail-fast
fi
echo "==> browser test of the demo page"
cargo build -p gateway --quiet
node tests/browser/demo.test.mjs "${CARGO_TARGET_DIR:-target}/debug/gateway"
