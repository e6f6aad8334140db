#!/usr/bin/env bash
# Image benchmarks (issue 8): one redis-server, three gateway nodes (release build) and
# imagegen. Runs, in order:
#   1. small messages alone on a channel with 100 subscribers over the 3 nodes (baseline);
#   2. the same with 1 MiB images flowing (fetched over the WebSocket), then by signed URL;
#   3. RPC round trips through the gateway vs directly against a backend that answers at once;
#   4. 1,000 clients uploading 1 MiB each at once to one node (memory and the budget).
#
#   loadtest/images-bench.sh [IMAGES_PER_SECOND] [SECONDS]
#
# GATEWAY_BIN runs another gateway binary.
set -euo pipefail
cd "$(dirname "$0")/.."
rate=${1:-2}; secs=${2:-10}
cargo build --release -q -p gateway -p loadtest
gateway=${GATEWAY_BIN:-./target/release/gateway}
dir=$(mktemp -d)
pids=()
cleanup() {
  kill "${pids[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT INT TERM
ulimit -n 20000 2>/dev/null || true

rport=$((20000 + RANDOM % 10000))
bport=$((rport + 60))
redis-server --port "$rport" --bind 127.0.0.1 --save "" --appendonly no --dir "$dir" >/dev/null &
pids+=($!)
sleep 0.3
addrs=()
for i in 1 2 3; do
  port=$((rport + i))
  GATEWAY_LOG=warn "$gateway" --listen "127.0.0.1:$port" --node-id "img$i" \
    --redis-url "redis://127.0.0.1:$rport" --rpc-url "http://127.0.0.1:$bport" \
    --config loadtest/bench.toml >/dev/null 2>&1 &
  pids+=($!)
  addrs+=("127.0.0.1:$port")
done
sleep 1
nodes=$(IFS=,; echo "${addrs[*]}")
img=./target/release/imagegen

echo "== small messages alone (100 B at 200/s, 100 subscribers over 3 nodes)"
$img images --addr "$nodes" --subscribers 100 --images-per-second 0 --small-per-second 200 \
  --duration "$secs" --redis "127.0.0.1:$rport" --channel small-alone
echo
echo "== 1 MiB images at $rate/s with the same small messages, fetched over the WebSocket"
$img images --addr "$nodes" --subscribers 100 --images-per-second "$rate" --small-per-second 200 \
  --duration "$secs" --redis "127.0.0.1:$rport" --channel img-ws
echo
echo "== the same, fetched by signed URL (HTTP GET on the subscriber's node)"
$img images --addr "$nodes" --subscribers 100 --images-per-second "$rate" --small-per-second 200 \
  --duration "$secs" --redis "127.0.0.1:$rport" --channel img-http --fetch http
echo
for callers in 1 4 20; do
  echo "== RPC: $callers caller(s), 100 B, direct vs through one node"
  $img rpc --addr "${addrs[0]}" --backend "127.0.0.1:$bport" --callers "$callers" --duration "$secs"
  echo
done
echo "== 1,000 clients uploading 1 MiB each at once to one node (budget 256 MiB)"
$img uploads --addr "${addrs[0]}" --uploaders 1000 --image-bytes 1048576 --chunk 65536 --interval-ms 100
