#!/usr/bin/env bash
# Idle memory per connection: starts a release gateway, opens N subscribed connections
# from two loadgen processes (one process may hold at most ~19,500 sockets here), and
# prints (RSS with N connections - RSS idle) / N, read from the gateway's /metrics.
# Usage: loadtest/memory.sh [N] [gateway config file]
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-19000}
config=${2:-}
port=${PORT:-18080}
cargo build --release -q -p gateway -p loadtest
args=(--listen "127.0.0.1:$port")
[ -n "$config" ] && args+=(--config "$config")
GATEWAY_LOG=warn ./target/release/gateway "${args[@]}" >/dev/null &
gw=$!
trap 'kill $gw 2>/dev/null; wait 2>/dev/null' EXIT
sleep 0.5
rss() { curl -s "http://127.0.0.1:$port/metrics" | awk '$1=="process_resident_memory_bytes"{print $2}'; }
base=$(rss)
half=$((n / 2))
log=$(mktemp -d)
for i in 1 2; do
  count=$half; [ "$i" = 2 ] && count=$((n - half))
  ./target/release/loadgen --addr "127.0.0.1:$port" --connections "$count" --channels 100 --prefix "mem$i-" \
    --publishers 0 --hold 20 --no-metrics >"$log/$i" 2>&1 &
done
# Wait until both report their connections subscribed.
for _ in $(seq 1 120); do
  [ "$(cat "$log"/1 "$log"/2 | grep -c '^subscribed')" = 2 ] && break
  sleep 0.5
done
sleep 2
grep -h '^subscribed' "$log"/1 "$log"/2
conns=$(curl -s "http://127.0.0.1:$port/metrics" | awk '$1=="gateway_connections"{print $2}')
full=$(rss)
awk -v b="$base" -v f="$full" -v c="$conns" 'BEGIN {
  printf "gateway rss idle %.1f MiB, with %d connections %.1f MiB: %.0f bytes (%.2f KiB) per connection\n",
    b/1048576, c, f/1048576, (f-b)/c, (f-b)/c/1024 }'
wait %2 %3 2>/dev/null || true
