#!/usr/bin/env bash
# Time from starting `restaurant up` on a fresh data directory to its first
# successful /readyz, five runs; prints each and the median.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=target/release/restaurant
[ -x "$bin" ] || cargo build --release
times=()
for _ in 1 2 3 4 5; do
  dir=$(mktemp -d)
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  start=$(date +%s%N)
  RUST_LOG=warn "$bin" up --port "$port" --data-dir "$dir" > /dev/null 2>&1 &
  pid=$!
  until curl -sf "http://127.0.0.1:$port/readyz" > /dev/null; do sleep 0.005; done
  end=$(date +%s%N)
  times+=($(( (end - start) / 1000000 )))
  kill -TERM "$pid"; wait "$pid" 2>/dev/null || true
  rm -rf "$dir"
done
echo "ready after (ms): ${times[*]}"
printf '%s\n' "${times[@]}" | sort -n | sed -n 3p | xargs echo "median ms:"
