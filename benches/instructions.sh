#!/usr/bin/env bash
# User-space instructions per request, counted by callgrind: a figure that a busy machine does
# not move, unlike CPU time, so that two builds can be compared on a shared VM. Each build serves
# N requests (h2load, HTTP/1.1, 16 keep-alive connections, the default resilience stack) to a
# HAProxy that answers `200 ok` itself; the counters are zeroed after a 2,000-request warm-up.
# Counts only user space (the kernel's share is in benches/load.sh's figures). `rep movs`/`stos`
# count one instruction per byte here, so large copies weigh more than their time. The proxy
# runs itself again at start with glibc's allocator tuned (see the README's Performance section):
# valgrind follows it (--trace-children). Set GLIBC_TUNABLES= to measure it untuned.
#   bash benches/instructions.sh [N] [BINARY...]   # default: 20000 target/release/outrigger
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v haproxy >/dev/null 2>&1 || need+=(haproxy)
command -v h2load >/dev/null 2>&1 || need+=(nghttp2-client)
command -v valgrind >/dev/null 2>&1 || need+=(valgrind)
command -v curl >/dev/null 2>&1 || need+=(curl)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
n="${1:-20000}"
shift || true
bins=("$@")
if [ ${#bins[@]} -eq 0 ]; then
  cargo build --release --locked --bin outrigger
  bins=(target/release/outrigger)
fi
dir=$(mktemp -d)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
origin=$(free_port); proxy=$(free_port); admin=$(free_port)
cat >"$dir/origin.cfg" <<EOF
global
  nbthread 1
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
frontend origin
  bind 127.0.0.1:$origin
  http-request return status 200 content-type text/plain string ok
EOF
cat >"$dir/outrigger.yaml" <<EOF
admin: { address: 127.0.0.1:$admin }
listeners:
  - name: http
    address: 127.0.0.1:$proxy
    routes:
      - name: all
        cluster: origin
clusters:
  - name: origin
    endpoints: [127.0.0.1:$origin]
EOF
haproxy -f "$dir/origin.cfg" -D -p "$dir/origin.pid"
trap 'kill "$(cat "$dir/origin.pid")" 2>/dev/null || true; rm -rf "$dir"' EXIT
for bin in "${bins[@]}"; do
  valgrind --tool=callgrind --trace-children=yes --callgrind-out-file="$dir/cg.%p" "$bin" run --workers 1 \
    --config "$dir/outrigger.yaml" >"$dir/log" 2>&1 &
  pid=$!
  for _ in $(seq 150); do
    curl -s -o /dev/null "http://127.0.0.1:$proxy/" && break
    sleep 0.2
  done
  h2load --h1 -n 2000 -c 16 "http://127.0.0.1:$proxy/" >/dev/null
  callgrind_control -z "$pid" >/dev/null 2>&1
  done_line=$(h2load --h1 -n "$n" -c 16 "http://127.0.0.1:$proxy/" | grep -E '^requests:')
  callgrind_control -d "$pid" >/dev/null 2>&1
  kill "$pid"
  wait "$pid" 2>/dev/null || true
  ir=$(grep -hE '^(summary|totals):' "$dir"/cg."$pid".1 | head -1 | awk '{print $2}')
  echo "$bin: $((ir / n)) instructions per request ($done_line)"
done
