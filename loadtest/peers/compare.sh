#!/usr/bin/env bash
# Side by side in one run: the gateway on one node (embedded broker), the gateway on two
# nodes through one redis-server, and Bun's native pub/sub (loadtest/peers/bun), all
# driven by the same loadgen with the same shapes; server CPU and RSS are read from
# /proc (`loadgen --server-pid`), so every server is measured the same way. Prints one
# line per server and shape, then the gateway/Bun ratios.
#
#   loadtest/peers/compare.sh [SECONDS]           # default 10 s of publishing per shape
#   SHAPES="1000x50 10000x5" MEMORY=19000 loadtest/peers/compare.sh
#
# Shapes are SUBSCRIBERSxPUBLICATIONS_PER_SECOND on one channel, 100-byte payloads,
# binary (protobuf) frames. MEMORY=N (0 to skip) also holds N idle subscribed
# connections on each server (two loadgen processes: one process may hold at most
# ~19,500 sockets here) and prints RSS per connection. Gateway config:
# loadtest/bench.toml (publish rate limits raised, presence off; history on, as by
# default). Bun keeps no history and has no broker: it is the floor a single process can
# reach. Two-node runs subscribe half the clients on each node and publish on the
# first, so half of the deliveries cross Redis; the Redis column is redis-server's CPU.
set -euo pipefail
cd "$(dirname "$0")/../.."
secs=${1:-10}
shapes=${SHAPES:-"1000x50 10000x5"}
memory=${MEMORY:-19000}
cargo build --release -q -p gateway -p loadtest
if [ ! -x loadtest/peers/bun/node_modules/.bin/bun ]; then
  (cd loadtest/peers/bun && npm install --no-audit --no-fund --silent)
fi
if [ ! -d gateway/web/node_modules/@bufbuild/protobuf ]; then
  (cd gateway/web && npm install --no-audit --no-fund --silent)
fi
bun=loadtest/peers/bun/node_modules/.bin/bun
loadgen=./target/release/loadgen
dir=$(mktemp -d)
pids=()
stop_all() {
  [ ${#pids[@]} -gt 0 ] && kill "${pids[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
  pids=()
}
trap 'stop_all; rm -rf "$dir"' EXIT INT TERM
base=$((20000 + RANDOM % 10000))

wait_port() {
  for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nothing listens on $1" >&2
  return 1
}

# Starts a server; sets ADDRS (comma-separated subscriber addresses), PUB (publisher
# address), SPIDS (server pids, comma-separated) and RPID (redis-server, or empty).
start() {
  local kind=$1
  ADDRS=""; PUB=""; SPIDS=""; RPID=""
  case $kind in
    gateway-1)
      GATEWAY_LOG=warn ./target/release/gateway --listen "127.0.0.1:$base" \
        --config loadtest/bench.toml >/dev/null 2>&1 &
      pids+=($!); SPIDS=$!
      wait_port "$base"; ADDRS="127.0.0.1:$base"; PUB=$ADDRS ;;
    gateway-2-redis)
      redis-server --port $((base + 9)) --bind 127.0.0.1 --save "" --appendonly no \
        --dir "$dir" >/dev/null &
      pids+=($!); RPID=$!
      wait_port $((base + 9))
      for i in 1 2; do
        GATEWAY_LOG=warn ./target/release/gateway --listen "127.0.0.1:$((base + i))" \
          --node-id "cmp$i" --redis-url "redis://127.0.0.1:$((base + 9))" \
          --config loadtest/bench.toml >/dev/null 2>&1 &
        pids+=($!); SPIDS="${SPIDS:+$SPIDS,}$!"
        wait_port $((base + i))
      done
      ADDRS="127.0.0.1:$((base + 1)),127.0.0.1:$((base + 2))"; PUB="127.0.0.1:$((base + 1))" ;;
    bun)
      "$bun" loadtest/peers/bun/server.ts $((base + 5)) >/dev/null 2>&1 &
      pids+=($!); SPIDS=$!
      wait_port $((base + 5)); ADDRS="127.0.0.1:$((base + 5))"; PUB=$ADDRS ;;
  esac
  sleep 0.3
}

rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }

printf '%-16s %-9s %10s %8s %8s %9s %9s %8s %6s %5s\n' server shape deliveries/s p50_ms p99_ms \
  cpu_us/del redis_us/del B/conn lost dup
results=$dir/results
: >"$results"
for shape in $shapes; do
  subs=${shape%x*}; rate=${shape#*x}
  for kind in gateway-1 gateway-2-redis bun; do
    start "$kind"
    watched=$SPIDS${RPID:+,$RPID}
    out=$dir/$kind-$shape.txt
    "$loadgen" --addr "$ADDRS" --publish-addr "$PUB" --connections "$subs" --channels 1 \
      --prefix "cmp-" --rate "$rate" --duration "$secs" --publishers 1 \
      --server-pid "$watched" >"$out" 2>&1 || true
    stop_all
    # Server CPU: the gateway nodes (or Bun), not Redis; Redis on its own.
    awk -v kind="$kind" -v shape="$shape" -v servers="$SPIDS" -v redis="$RPID" '
      BEGIN { n = split(servers, s, ","); for (i = 1; i <= n; i++) srv[s[i]] = 1 }
      /^delivered/ { delivered = $2; lost = $9; sub(",", "", lost); dup = $11 }
      /^latency/ { p50 = $4; p99 = $6 }
      /^sustained/ { rate = $2 }
      /^process/ {
        pid = $2; sub(":", "", pid)
        for (i = 1; i <= NF; i++) if ($i == "publishing") cpu = $(i - 2)
        sub("s", "", cpu)
        if (pid in srv) server_cpu += cpu; else if (pid == redis) redis_cpu += cpu
      }
      /B\/conn/ { for (i = 2; i <= NF; i++) if ($i ~ /B\/conn/) { bc = $(i - 1); sub(/[(]/, "", bc) } }
      END {
        if (delivered == 0) { printf "%-16s %-9s FAILED (see loadgen output)\n", kind, shape; exit }
        us = server_cpu * 1e6 / delivered
        rus = redis == "" ? "-" : sprintf("%.2f", redis_cpu * 1e6 / delivered)
        printf "%-16s %-9s %10.0f %8s %8s %9.2f %9s %8s %6s %5s\n", kind, shape, rate, p50, p99, us, rus, bc, lost, dup
        printf "%s %s %.4f %s\n", kind, shape, us, p99 >> "'"$results"'"
      }' "$out"
  done
done

echo
echo "ratios (gateway / Bun, same run; below 1 = the gateway uses less):"
awk '
  { us[$1 " " $2] = $3; p99[$1 " " $2] = $4; shapes[$2] = 1 }
  END {
    for (s in shapes) for (k = 1; k <= 2; k++) {
      g = (k == 1 ? "gateway-1" : "gateway-2-redis")
      if ((g " " s) in us && ("bun " s) in us && us["bun " s] > 0)
        printf "  %-16s %-9s cpu per delivery %.2fx   p99 %.2fx\n", g, s,
          us[g " " s] / us["bun " s], p99[g " " s] / p99["bun " s]
    }
  }' "$results"

if [ "$memory" -gt 0 ]; then
  echo
  echo "idle memory: $memory subscribed connections, no publications"
  half=$((memory / 2))
  for kind in gateway-1-default bun; do
    if [ "$kind" = bun ]; then
      start bun
    else
      # Default config (presence on), as in loadtest/memory.sh.
      GATEWAY_LOG=warn ./target/release/gateway --listen "127.0.0.1:$base" >/dev/null 2>&1 &
      pids+=($!); SPIDS=$!; wait_port "$base"; ADDRS="127.0.0.1:$base"; sleep 0.3
    fi
    before=$(rss_kib "$SPIDS")
    for i in 1 2; do
      count=$half; [ "$i" = 2 ] && count=$((memory - half))
      "$loadgen" --addr "$ADDRS" --connections "$count" --channels 100 --prefix "mem$i-" \
        --publishers 0 --hold 15 --no-metrics >"$dir/mem$i" 2>&1 &
    done
    for _ in $(seq 1 120); do
      [ "$(cat "$dir/mem1" "$dir/mem2" | grep -c '^subscribed')" = 2 ] && break
      sleep 0.5
    done
    sleep 3
    after=$(rss_kib "$SPIDS")
    opened=$(grep -h '^subscribed' "$dir/mem1" "$dir/mem2" | awk '{split($2, a, "/"); n += a[1]} END {print n}')
    awk -v k="$kind" -v b="$before" -v a="$after" -v n="$opened" 'BEGIN {
      printf "  %-18s rss %.1f MiB -> %.1f MiB with %d connections: %.0f B (%.2f KiB) per connection\n",
        k, b / 1024, a / 1024, n, (a - b) * 1024 / n, (a - b) / n }'
    pkill -f "loadgen --addr $ADDRS" 2>/dev/null || true
    stop_all
  done
fi
