#!/usr/bin/env bash
# Worker cold start: exec -> /v2/health/ready == 200, in ms (static endpoint,
# so readiness needs no routing table). Usage: cold_start.sh <worker-binary> <config.yaml> [http-port]
set -euo pipefail
bin=$1; cfg=$2; port=${3:-8000}
start=$(date +%s%N)
"$bin" preprocess --config "$cfg" --bind 127.0.0.1 >/dev/null 2>&1 &
pid=$!
until curl -fs "http://127.0.0.1:$port/v2/health/ready" >/dev/null 2>&1; do sleep 0.002; done
end=$(date +%s%N)
echo "cold start: $(( (end - start) / 1000000 )) ms"
echo "RSS after start: $(awk '/VmRSS/ {print $2, $3}' /proc/$pid/status)"
kill -TERM $pid; wait $pid || true
