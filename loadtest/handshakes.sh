#!/usr/bin/env bash
# New subscribed connections per second on one node: loadgen opens N connections
# (WebSocket upgrade + subscribe reply each) against a fresh release gateway, without and
# with an HS256 connection token, and prints the wall-clock rate and the gateway's CPU per
# handshake (from /proc, `loadgen --server-pid`). The load generator shares the machine's
# cores, so the wall-clock rate is bounded by the client here; handshakes per gateway
# CPU-second is what one node can take when its clients are elsewhere.
#   loadtest/handshakes.sh [N]        # default 10000
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-10000}
cargo build --release -q -p gateway -p loadtest
python3 -c 'import jwt' 2>/dev/null || pip install -q pyjwt
port=$((20000 + RANDOM % 10000))
dir=$(mktemp -d)
gw=""
trap '[ -n "$gw" ] && kill $gw 2>/dev/null; wait 2>/dev/null; rm -rf "$dir"' EXIT INT TERM
secret="handshake-bench-secret-0123456789abcdef"
printf '[limits]\nmax_connections = 100000\nmax_connections_per_ip = 0\n' >"$dir/anon.toml"
printf '[limits]\nmax_connections = 100000\nmax_connections_per_ip = 0\n[auth]\nhmac_secrets = ["%s"]\n' "$secret" >"$dir/auth.toml"
token=$(python3 -c 'import jwt, sys, time; print(jwt.encode({"sub": "bench", "exp": int(time.time()) + 3600}, sys.argv[1], algorithm="HS256"))' "$secret")
for mode in anonymous token; do
  config=$dir/anon.toml; args=()
  [ "$mode" = token ] && { config=$dir/auth.toml; args=(--token "$token"); }
  GATEWAY_LOG=warn ./target/release/gateway --listen "127.0.0.1:$port" --config "$config" >/dev/null 2>&1 &
  gw=$!
  for _ in $(seq 1 50); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
  out=$(./target/release/loadgen --addr "127.0.0.1:$port" --connections "$n" --channels 100 \
    --publishers 0 --connect-concurrency 500 --server-pid "$gw" "${args[@]}")
  kill "$gw"; wait "$gw" 2>/dev/null || true; gw=""
  echo "$out" | awk -v mode="$mode" '
    /^subscribed/ { split($2, a, "/"); opened = a[1]; secs = $5; sub("s", "", secs) }
    /^process/ { for (i = 1; i <= NF; i++) if ($i == "subscribing,") { cpu = $(i - 2); sub("s", "", cpu) } }
    END {
      printf "%-9s %d connections in %.2f s: %.0f per second wall; gateway cpu %.2f s = %.0f us per handshake, %.0f handshakes per gateway cpu-second\n",
        mode, opened, secs, opened / secs, cpu, cpu * 1e6 / opened, opened / cpu }'
done
