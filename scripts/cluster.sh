#!/usr/bin/env bash
# A local 3-node cluster: one redis-server, three gateway nodes and HAProxy in front.
#   scripts/cluster.sh            start (Ctrl-C stops everything)
# Then open http://127.0.0.1:8080 (through HAProxy); nodes listen on 127.0.0.1:8081-8083,
# Redis on 127.0.0.1:6390; the HTTP API key is "local-key".
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in redis-server haproxy; do
  command -v "$tool" >/dev/null || { echo "needs $tool: apt-get install redis-server haproxy" >&2; exit 1; }
done
cargo build --release -q -p gateway
dir=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT INT TERM

redis-server --port 6390 --bind 127.0.0.1 --save "" --appendonly yes --dir "$dir" >"$dir/redis.log" &
pids+=($!)
sleep 0.3
for i in 1 2 3; do
  ./target/release/gateway --listen "127.0.0.1:808$i" --node-id "node$i" \
    --redis-url redis://127.0.0.1:6390 --api-key local-key >"$dir/node$i.log" 2>&1 &
  pids+=($!)
done
cat >"$dir/haproxy.cfg" <<CFG
global
  maxconn 4096
defaults
  mode http
  timeout connect 1s
  timeout client 60s
  timeout server 60s
  timeout tunnel 1h
  option redispatch
  retries 2
frontend fe
  bind 127.0.0.1:8080
  default_backend gw
backend gw
  balance roundrobin
  option httpchk GET /readyz
  server node1 127.0.0.1:8081 check inter 500 fall 2 rise 1
  server node2 127.0.0.1:8082 check inter 500 fall 2 rise 1
  server node3 127.0.0.1:8083 check inter 500 fall 2 rise 1
CFG
haproxy -f "$dir/haproxy.cfg" -db >"$dir/haproxy.log" 2>&1 &
pids+=($!)
sleep 1
echo "cluster up: http://127.0.0.1:8080 (haproxy) -> nodes 127.0.0.1:8081-8083, redis 127.0.0.1:6390"
curl -s -H 'X-API-Key: local-key' http://127.0.0.1:8081/api/v1/nodes || true
echo
echo "logs in $dir; Ctrl-C to stop"
wait
