#!/usr/bin/env bash
# Coverage-guided fuzzing of the parsers a client or backend reaches (cargo-fuzz with
# libFuzzer, on the stable toolchain: `-s none` needs no nightly sanitizer flags).
#
#   scripts/fuzz.sh [seconds-per-target] [jobs] [target...]
#
# Defaults: 60 s per target, 2 targets at a time, all six targets. Each target starts
# from its committed seeds (fuzz/seeds/<target>, made by fuzz/make_seeds.py) plus the
# working corpus it grew before (fuzz/corpus/<target>, not committed). A crash leaves
# its input in fuzz/artifacts/<target>/ and makes the script exit non-zero. The last
# stats of every run go to fuzz/logs/<target>.log.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds=${1:-60}
jobs=${2:-2}
shift $(( $# > 2 ? 2 : $# )) || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(frames_proto frames_json api_request blob_upload token ws_decode)

command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
cargo fuzz build -s none 2>&1 | tail -1
mkdir -p logs
run() {
    local t=$1
    mkdir -p "corpus/$t" "artifacts/$t"
    cargo fuzz run -s none "$t" "corpus/$t" "seeds/$t" -- \
        -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 \
        > "logs/$t.log" 2>&1
    local rc=$?
    echo "$t: exit $rc; $(grep -E '^stat::number_of_executed_units' "logs/$t.log" | tail -1); $(grep -E 'cov: ' "logs/$t.log" | tail -1)"
    return $rc
}
export -f run
export seconds
printf '%s\n' "${targets[@]}" | xargs -P "$jobs" -I{} bash -c 'run {}'
