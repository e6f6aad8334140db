#!/usr/bin/env bash
# The Redis publish path: one redis-server, one gateway node (release build), and loadgen
# with publishers only (no subscribers), each publisher sending publishes back to back
# over one WebSocket. Prints publications/s through the node, the gateway's and Redis's
# CPU per publication, and the node's publications per Redis script call.
#
#   loadtest/publish-bench.sh [CHANNELS] [PUBLISHERS] [RATE] [SECONDS]
#
# Defaults: 100 channels, 16 publishers, 150,000 publications/s offered for 5 s (more
# than this machine sustains: the printed rate is what got through). History is on
# (loadtest/bench.toml). GATEWAY_BIN runs another gateway binary (e.g. an older commit,
# for a side-by-side comparison).
set -euo pipefail
cd "$(dirname "$0")/.."
channels=${1:-100}; publishers=${2:-16}; rate=${3:-150000}; secs=${4:-5}
cargo build --release -q -p gateway -p loadtest
gateway=${GATEWAY_BIN:-./target/release/gateway}
dir=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT INT TERM
rport=$((20000 + RANDOM % 10000)); gport=$((rport + 1))
redis-server --port "$rport" --bind 127.0.0.1 --save "" --appendonly no --dir "$dir" >/dev/null &
rp=$!; pids+=("$rp")
sleep 0.3
GATEWAY_LOG=warn "$gateway" --listen "127.0.0.1:$gport" --node-id publish-bench \
  --redis-url "redis://127.0.0.1:$rport" --config loadtest/bench.toml >/dev/null 2>&1 &
gp=$!; pids+=("$gp")
for _ in $(seq 1 50); do curl -sf "http://127.0.0.1:$gport/readyz" >/dev/null && break; sleep 0.1; done
redis-cli -p "$rport" CONFIG RESETSTAT >/dev/null
./target/release/loadgen --addr "127.0.0.1:$gport" --connections 0 --channels "$channels" \
  --publishers "$publishers" --rate "$rate" --duration "$secs" --server-pid "$gp,$rp" \
  >"$dir/out" 2>&1
published=$(awk '/^published/ { print $2 }' "$dir/out")
took=$(awk '/^published/ { print $(NF) }' "$dir/out" | tr -d s)
gateway_cpu=$(awk -v p="$gp" '$1 == "process" && $2 == p ":" { print $(NF-2) }' "$dir/out" | tr -d s)
redis_cpu=$(awk -v p="$rp" '$1 == "process" && $2 == p ":" { print $(NF-2) }' "$dir/out" | tr -d s)
scripts=$(redis-cli -p "$rport" INFO commandstats | awk -F'[=,:]' '/^cmdstat_evalsha:/ { print $3 }')
# Publications the node actually ran (acknowledged or not), from its batch histogram.
# (An older binary without that metric ran one script call per publication.)
ran=$(curl -s "http://127.0.0.1:$gport/metrics" | awk '$1 == "gateway_broker_publish_batch_size_sum" { print $2 }')
ran=${ran:-$scripts}
grep -E '^(published|process)' "$dir/out"
awk -v n="$ran" -v a="$published" -v t="$took" -v g="$gateway_cpu" -v r="$redis_cpu" -v s="$scripts" \
  -v c="$channels" -v p="$publishers" 'BEGIN {
  printf "channels %d, publishers %d: %d publications acknowledged in %.1f s = %.0f/s\n", c, p, a, t, a / t
  printf "gateway cpu %.2f us, redis cpu %.2f us per publication (%d run); %d script calls, %.1f publications per call\n",
    g / n * 1e6, r / n * 1e6, n, s, n / s
  printf "redis-bound ceiling: %.0f publications per redis cpu-second\n", n / r }'
