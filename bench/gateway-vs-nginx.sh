#!/usr/bin/env bash
# Our gateway against nginx, in front of the same upstream, driven by wrk on
# loopback in one run.
#
#   bench/gateway-vs-nginx.sh [duration] [connections] [workers] [rounds]
#
# The upstream is a separate nginx instance that answers every request with a
# small JSON body (so neither proxy shares a process with it). Each proxy gets
# the same number of workers: nginx `worker_processes`, our gateway
# `TOKIO_WORKER_THREADS`. After a short warm-up of each they are measured in
# alternating rounds and the medians compared. nginx and wrk are installed
# from Debian if missing.
# The last line is
#   gateway/nginx throughput ratio: X.XX, p99 ratio: Y.YY
# (throughput above 1 and p99 below 1 favour the gateway).
set -euo pipefail
cd "$(dirname "$0")/.."
duration=${1:-10s}
conns=${2:-64}
workers=${3:-1}
rounds=${4:-5}

install() {
  command -v "$1" > /dev/null && return
  echo "installing $2" >&2
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo=sudo
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q "$2" > /dev/null \
    || { $sudo apt-get update -q > /dev/null && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q "$2" > /dev/null; }
  command -v "$1" > /dev/null || { echo "cannot install $2" >&2; exit 1; }
}
PATH=$PATH:/usr/sbin
install nginx nginx-light
install wrk wrk

bin=target/release/restaurant
[ -x "$bin" ] || cargo build --release
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
upstream_port=$(free_port)
nginx_port=$(free_port)
gateway_port=$(free_port)
dir=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2> /dev/null || true; done
  wait 2> /dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT

nginx_conf() { # name, worker count, server block
  mkdir -p "$dir/$1"
  cat > "$dir/$1/nginx.conf" << EOF
daemon off;
worker_processes $2;
pid $dir/$1/nginx.pid;
error_log $dir/$1/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $dir/$1;
  proxy_temp_path $dir/$1;
  fastcgi_temp_path $dir/$1;
  uwsgi_temp_path $dir/$1;
  scgi_temp_path $dir/$1;
  $3
}
EOF
  nginx -p "$dir/$1" -c "$dir/$1/nginx.conf" &
  pids+=($!)
}

nginx_conf upstream 1 "server {
    listen 127.0.0.1:$upstream_port reuseport;
    keepalive_requests 1000000;
    location / { default_type application/json; return 200 '{\"ok\":true}'; }
  }"
nginx_conf proxy "$workers" "upstream backend { server 127.0.0.1:$upstream_port; keepalive 256; }
  server {
    listen 127.0.0.1:$nginx_port reuseport;
    keepalive_requests 1000000;
    location / {
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection \"\";
      proxy_read_timeout 30s;
    }
  }"
up="http://127.0.0.1:$upstream_port"
TOKIO_WORKER_THREADS=$workers RUST_LOG=warn "$bin" serve gateway --port "$gateway_port" \
  --order-url "$up" --cook-url "$up" --delivery-url "$up" --mypage-url "$up" > "$dir/gateway.log" 2>&1 &
pids+=($!)

for port in "$upstream_port" "$nginx_port" "$gateway_port"; do
  for _ in $(seq 1 100); do
    curl -sf "http://127.0.0.1:$port/orders/bench" > /dev/null && break
    sleep 0.05
  done
  curl -sf "http://127.0.0.1:$port/orders/bench" > /dev/null || { echo "port $port does not answer" >&2; exit 1; }
done

# wrk prints "Requests/sec: N" and, with --latency, "99% T" (T in us/ms/s).
measure() {
  wrk -t1 -c"$conns" -d"$duration" --latency "$1" > "$dir/wrk.out"
  local rps p99
  rps=$(awk '/^Requests\/sec:/ {print $2}' "$dir/wrk.out")
  p99=$(awk '$1 == "99%" {v=$2; if (v ~ /us$/) {sub(/us$/,"",v); v/=1000} else if (v ~ /ms$/) {sub(/ms$/,"",v)} else if (v ~ /s$/) {sub(/s$/,"",v); v*=1000} print v}' "$dir/wrk.out")
  errors=$(awk '/Non-2xx|Socket errors/' "$dir/wrk.out")
  [ -z "$errors" ] || echo "  $errors" >&2
  echo "$rps $p99"
}
gateway="http://127.0.0.1:$gateway_port/orders/bench"
nginx="http://127.0.0.1:$nginx_port/orders/bench"
# Warm both up, then alternate: on a shared two-core machine consecutive
# runs of the same build differ by up to a third, so each side gets the
# same share of good and bad moments, and the medians are compared.
wrk -t1 -c"$conns" -d2s "$gateway" > /dev/null
wrk -t1 -c"$conns" -d2s "$nginx" > /dev/null
: > "$dir/rounds"
for round in $(seq 1 "$rounds"); do
  read -r gw_rps gw_p99 < <(measure "$gateway")
  read -r ng_rps ng_p99 < <(measure "$nginx")
  echo "$gw_rps $gw_p99 $ng_rps $ng_p99" >> "$dir/rounds"
  printf 'round %d: gateway %.0f req/s p99 %.2f ms | nginx %.0f req/s p99 %.2f ms\n' \
    "$round" "$gw_rps" "$gw_p99" "$ng_rps" "$ng_p99"
done
echo "machine: $(nproc) cores; $workers worker(s) per proxy; wrk 1 thread, $conns connections, $rounds rounds of $duration each"
python3 - "$dir/rounds" << 'EOF'
import statistics, sys
rows = [list(map(float, line.split())) for line in open(sys.argv[1]) if line.strip()]
gw_rps, gw_p99, ng_rps, ng_p99 = (statistics.median(col) for col in zip(*rows))
print(f"gateway: {gw_rps:.0f} req/s, p99 {gw_p99:.2f} ms (medians)")
print(f"nginx:   {ng_rps:.0f} req/s, p99 {ng_p99:.2f} ms (medians)")
print(f"gateway/nginx throughput ratio: {gw_rps / ng_rps:.2f}, p99 ratio: {gw_p99 / ng_p99:.2f}")
EOF
