#!/usr/bin/env bash
# End-to-end benchmark of one shape: starts the system on a fresh data
# directory with automatic cook/delivery at 0, runs `restaurant bench`
# against it, samples the server's resident memory during the run, and
# prints the report. Loopback only; bounded by --duration.
#
#   bench/e2e.sh [embedded|embedded-nofsync|distributed] [duration] [concurrency]
#
# distributed needs PostgreSQL and NATS (scripts/services.sh); it uses a fresh
# database and stream and drops them afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
shape=${1:-embedded}
duration=${2:-30s}
concurrency=${3:-64}
# BIN=path compares another build (e.g. target/experiment/restaurant).
bin=${BIN:-target/release/restaurant}
[ -x "$bin" ] || cargo build --release
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
dir=$(mktemp -d)
args=(up --port "$port" --data-dir "$dir" --cook-time 0 --delivery-time 0)
db=""
case "$shape" in
  embedded) ;;
  embedded-nofsync) args+=(--no-fsync) ;;
  distributed)
    db="rt_bench_$$"
    psql -h 127.0.0.1 -U postgres -qc "CREATE DATABASE $db"
    args+=(--processes --database-url "postgres://postgres@127.0.0.1:5432/$db" --nats-url nats://127.0.0.1:4222 --stream "$db")
    ;;
  *) echo "unknown shape $shape" >&2; exit 2 ;;
esac
RUST_LOG=${RUST_LOG:-warn} "$bin" "${args[@]}" > "$dir/up.log" 2>&1 &
pid=$!
cleanup() {
  kill -TERM "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  if [ -n "$db" ]; then
    psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" || true
    # An older build compared with BIN= may not have drop-stream.
    for b in "$bin" target/release/restaurant; do
      "$b" drop-stream --nats-url nats://127.0.0.1:4222 --stream "$db" >/dev/null 2>&1 && break
    done || echo "could not drop the stream $db" >&2
  fi
  # BENCH_KEEP_LOG=FILE keeps the server's log (e.g. with
  # RUST_LOG=warn,sqlx::query=debug, to count statements).
  if [ -n "${BENCH_KEEP_LOG:-}" ]; then cp "$dir/up.log" "$BENCH_KEEP_LOG"; fi
  rm -rf "$dir"
}
trap cleanup EXIT
for _ in $(seq 1 200); do
  curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break
  sleep 0.05
done
children() {
  python3 - "$1" <<'PY' 2>/dev/null
import json, sys
d = json.load(open(sys.argv[1]))
print(" ".join(f"{p['name']}-{p['replica']}:{p['pid']}" for p in d["processes"] if p["pid"]))
PY
}
# Peak resident memory of every process of the system, sampled twice a
# second: the `up` process itself and, in the distributed shape, each
# supervised child named in processes.json. A sample forks nothing but its
# `sleep` (bash builtins reading /proc; processes.json is parsed again only
# when it changes): python3 and ps on every tick cost the host several
# percent of its cores, which the distributed shape's latencies paid.
( declare -A peak
  kids="" seen="$dir/processes.seen"
  while kill -0 "$pid" 2>/dev/null && [ ! -e "$dir/stop" ]; do
    if [ -f "$dir/processes.json" ] && { [ ! -e "$seen" ] || [ "$dir/processes.json" -nt "$seen" ]; }; then
      : > "$seen"
      kids=$(children "$dir/processes.json")
    fi
    for entry in "up:$pid" $kids; do
      name=${entry%%:*}; p=${entry##*:}
      rss=""
      while read -r key value _; do
        [ "$key" = "VmRSS:" ] && { rss=$value; break; }
      done 2>/dev/null < "/proc/$p/status" || true
      [ -n "$rss" ] && [ "$rss" -gt "${peak[$name]:-0}" ] && peak[$name]=$rss
    done
    sleep 0.5
  done
  for name in "${!peak[@]}"; do echo "$name ${peak[$name]}"; done | sort > "$dir/rss" ) &
sampler=$!
"$bin" bench --url "http://127.0.0.1:$port" --duration "$duration" --concurrency "$concurrency" \
  --json "$dir/report.json" ${BENCH_ARGS:-} 2>/dev/null
touch "$dir/stop"
wait "$sampler" || true
echo "peak RSS per process (MiB):$(awk '{printf " %s %.1f", $1, $2/1024}' "$dir/rss" 2>/dev/null)"
echo "shape: $shape, $(nproc) cores, duration $duration, concurrency $concurrency"
# A server that ended on its own during the run is a finding, not noise:
# say so, with the end of its log (removed with the data directory).
if ! kill -0 "$pid" 2>/dev/null; then
  status=0; wait "$pid" || status=$?
  echo "the server (pid $pid) ended during the run, exit status $status; its log ends:" >&2
  tail -n 30 "$dir/up.log" >&2
  exit 1
fi
