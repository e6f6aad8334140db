#!/usr/bin/env bash
# Multi-node benchmark: one redis-server, NODES gateway nodes (release build), optionally
# HAProxy in front (VIA=haproxy), and loadgen. Prints loadgen's report (deliveries/s,
# latency, lost/duplicated, summed node CPU) plus Redis CPU per publication.
#
#   loadtest/cluster-bench.sh NODES CPU_CAP [loadgen args...]
#
# CPU_CAP caps each node with a cgroup-v1 CPU quota (e.g. 0.25 = a quarter core), so that
# "N nodes vs 1" can be measured on a 2-core machine without the machine itself being the
# cap; "none" runs uncapped. Needs root for the cap. Publishers connect to one more,
# uncapped node that has no subscribers (a backend publishing through the gateway), the
# same in every configuration; its CPU is not in the reported sum. GATEWAY_BIN runs
# another gateway binary (e.g. an older release, for a side-by-side comparison).
set -euo pipefail
cd "$(dirname "$0")/.."
nodes=${1:?nodes}; cap=${2:?cpu cap or none}; shift 2
cargo build --release -q -p gateway -p loadtest
gateway=${GATEWAY_BIN:-./target/release/gateway}
dir=$(mktemp -d)
pids=()
cgroups=()
cleanup() {
  kill "${pids[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
  for g in "${cgroups[@]}"; do rmdir "$g" 2>/dev/null || true; done
  rm -rf "$dir"
}
trap cleanup EXIT INT TERM

rport=$((20000 + RANDOM % 10000))
redis-server --port "$rport" --bind 127.0.0.1 --save "" --appendonly no --dir "$dir" >/dev/null &
pids+=($!)
sleep 0.3
addrs=()
for i in $(seq 1 "$nodes"); do
  port=$((rport + i))
  GATEWAY_LOG=warn "$gateway" --listen "127.0.0.1:$port" --node-id "bench$i" \
    --redis-url "redis://127.0.0.1:$rport" --config loadtest/bench.toml >/dev/null 2>&1 &
  pid=$!
  pids+=($pid)
  addrs+=("127.0.0.1:$port")
  if [ "$cap" != none ]; then
    g=/sys/fs/cgroup/cpu/gateway-bench-$i-$$
    mkdir -p "$g"
    echo 100000 >"$g/cpu.cfs_period_us"
    awk -v c="$cap" 'BEGIN { printf "%d\n", c * 100000 }' >"$g/cpu.cfs_quota_us"
    sleep 0.2
    for t in /proc/$pid/task/*; do echo "${t##*/}" >"$g/tasks"; done
    cgroups+=("$g")
  fi
done
pport=$((rport + 50))
GATEWAY_LOG=warn "$gateway" --listen "127.0.0.1:$pport" --node-id bench-publisher \
  --redis-url "redis://127.0.0.1:$rport" --config loadtest/bench.toml >/dev/null 2>&1 &
pids+=($!)
sleep 0.5
node_list=$(IFS=,; echo "${addrs[*]}")
target=$node_list
if [ "${VIA:-direct}" = haproxy ]; then
  hport=$((rport + 100))
  {
    printf 'global\n  maxconn 8000\ndefaults\n  mode http\n  timeout connect 1s\n  timeout client 60s\n'
    printf '  timeout server 60s\n  timeout tunnel 1h\nfrontend fe\n  bind 127.0.0.1:%s\n  default_backend gw\n' "$hport"
    printf 'backend gw\n  balance roundrobin\n'
    for a in "${addrs[@]}"; do printf '  server %s %s\n' "${a##*:}" "$a"; done
  } >"$dir/haproxy.cfg"
  haproxy -f "$dir/haproxy.cfg" -db >/dev/null 2>&1 &
  pids+=($!)
  sleep 0.5
  target=127.0.0.1:$hport
fi
redis_cpu() { redis-cli -p "$rport" INFO cpu | awk -F: '/used_cpu_(sys|user):/ { s += $2 } END { print s }'; }
before=$(redis_cpu)
./target/release/loadgen --addr "$target" --publish-addr "127.0.0.1:$pport" --metrics-addr "$node_list" "$@" | tee "$dir/out"
after=$(redis_cpu)
published=$(awk '/^published/ { print $2 }' "$dir/out")
awk -v b="$before" -v a="$after" -v p="$published" 'BEGIN {
  if (p > 0) printf "redis: %.2f cpu-s for %d publications = %.1f us per publish (incl. pub/sub fan-out to nodes)\n", a - b, p, (a - b) / p * 1e6 }'
