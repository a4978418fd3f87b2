#!/usr/bin/env bash
# The load benchmark: installs HAProxy, wrk and h2load if missing, builds the release binary,
# then runs benches/load.rs (Outrigger vs a direct connection vs HAProxy, in one run; each proxy
# pinned to one core, perf counting system calls).
#   bash benches/load.sh                       # 3 rounds per figure, about 8 minutes
#   OUTRIGGER_LOAD_ROUNDS=1 bash benches/load.sh
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v haproxy >/dev/null 2>&1 || need+=(haproxy)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v h2load >/dev/null 2>&1 || need+=(nghttp2-client)
command -v taskset >/dev/null 2>&1 || need+=(util-linux)
command -v perf >/dev/null 2>&1 || need+=(linux-perf)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
cargo build --release --locked --bin outrigger
cargo bench --locked --bench load
