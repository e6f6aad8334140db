#!/usr/bin/env bash
# Runs every test of the project: formatting, clippy, unit and end-to-end tests (which
# start the real gateway binary, and for the multi-node suite their own redis-server and
# haproxy processes on free ports), the check that the committed browser bundles are what
# gateway/web builds, the client's unit tests, the headless-Chromium tests of both apps
# and the README's examples. Installs what is missing first, so a fresh machine passes
# with this one command.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
command -v redis-sentinel >/dev/null 2>&1 || need_apt+=(redis-sentinel)
command -v haproxy >/dev/null 2>&1 || need_apt+=(haproxy)
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "==> installing ${need_apt[*]}"
  if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
if ! (cd tests/browser && npm ls --depth=0 >/dev/null 2>&1); then
  echo "==> npm ci in tests/browser (playwright-core drives the system chromium: no browser download)"
  (cd tests/browser && npm ci --no-audit --no-fund --loglevel=error)
fi
# `npm install`, not `npm ci`, in gateway/web: the lock pins every version, but it lacks the
# other platforms' optional buf binaries (the registry mirror here does not serve them),
# which `npm ci` refuses; `npm install` installs exactly the locked versions for this one.
if ! (cd gateway/web && npm ls --depth=0 >/dev/null 2>&1); then
  echo "==> npm install in gateway/web (buf, esbuild, typescript at the locked versions)"
  (cd gateway/web && npm install --no-audit --no-fund --loglevel=error)
fi

echo "==> deploy/ and k8s/: promtool, dashboard metrics, haproxy, hadolint, kustomize + schemas"
bash scripts/check-deploy.sh
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
echo "==> browser bundles are what gateway/web builds; client unit tests"
(cd gateway/web && node build.mjs --check && npm test --silent)
echo "==> both apps in headless Chromium on 3 nodes behind HAProxy; the README's examples"
cargo build -p gateway --bins --examples --quiet
target="${CARGO_TARGET_DIR:-target}/debug"
node tests/browser/apps.test.mjs "$target/gateway" "$target/examples/volume_backend"
node tests/browser/readme.test.mjs "$target/gateway"
echo "==> k6 smoke: fan-out and a reconnect storm through HAProxy over two nodes on Redis"
GATEWAY_BIN="$target/gateway" loadtest/k6/smoke.sh loadtest/k6/fanout.js \
  -e SUBSCRIBERS=100 -e PUBLISH_RATE=20 -e DURATION=10s
GATEWAY_BIN="$target/gateway" loadtest/k6/smoke.sh loadtest/k6/storm.js \
  -e CLIENTS=300 -e STORM_AT_S=5 -e HOLD_S=10
