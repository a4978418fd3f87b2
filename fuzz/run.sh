#!/usr/bin/env bash
# Runs every fuzz target for a bounded time (default 300 s each, two at a time on two cores) and
# prints how many inputs each executed. Crashes are saved under fuzz/artifacts/TARGET/; copy a
# crashing input into fuzz/regressions/TARGET/ so `cargo test --test fuzz_regressions` replays it.
#
#   bash fuzz/run.sh          # 300 s per target
#   bash fuzz/run.sh 30       # a quick smoke run
set -euo pipefail
cd "$(dirname "$0")"
secs="${1:-300}"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
# cargo-fuzz needs nightly-only flags; the one stable toolchain here accepts them this way.
export RUSTC_BOOTSTRAP=1
targets=(config downstream_request framing route_match upstream_response)
cargo fuzz build
mkdir -p logs
run() {
    local t="$1"
    mkdir -p "corpus/$t"
    cargo fuzz run "$t" "corpus/$t" "seeds/$t" -- \
        -max_total_time="$secs" -print_final_stats=1 >"logs/$t.log" 2>&1
    local execs
    execs=$(grep -m1 'stat::number_of_executed_units' "logs/$t.log" | awk '{print $2}')
    echo "$t: ${secs}s, ${execs:-?} executions, no crash"
}
pids=()
for t in "${targets[@]}"; do
    run "$t" &
    pids+=($!)
    if (( ${#pids[@]} == 2 )); then wait "${pids[0]}"; pids=("${pids[@]:1}"); fi
done
for p in "${pids[@]}"; do wait "$p"; done
