#!/usr/bin/env bash
# Operator benchmark (not a test): reconcile N InferencePipelines (default 1000) on the local
# cluster and report
#   - time from operator start until every pipeline's Deployments exist and its status is written
#   - operator peak RSS (VmHWM) and RSS at the end
#   - reconcile latency p50/p90/p99/max (from the operator's own "reconcile finished" events)
#
#   tests/kube/cluster up && bench/operator/run.sh            # N=1000
#   N=200 bench/operator/run.sh
#
# The pipelines are created first, with no operator running; then the operator starts and the
# clock runs. Each pipeline's preprocess pod requests an absurd CPU amount so it stays Pending
# (no worker processes on this machine) and inference has min 0 (scaled to zero): the benchmark
# measures the operator and the API server, not the workers.
# Uses target/release/tandem-operator (rebuilt when stale; OPERATOR_BIN overrides).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
N=${N:-1000}
MAX_WAIT=${MAX_WAIT:-1800}   # seconds; past it the numbers so far are reported as incomplete
eval "$(tests/kube/cluster env)"
bin=${OPERATOR_BIN:-$root/target/release/tandem-operator}
# Always ask cargo (a no-op when fresh): a stale release binary would measure old code.
[ -n "${OPERATOR_BIN:-}" ] || cargo build --release -p tandem-operator --bin tandem-operator
ns=bench-operator-$$
work=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
op_pid=
cleanup() {
  [ -n "$op_pid" ] && kill "$op_pid" 2>/dev/null || true
  kubectl delete namespace "$ns" --wait=false >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

kubectl apply --server-side --force-conflicts --field-manager=tandem-bench \
  -f crds/inferencepipelines.tandem.dev.yaml >/dev/null
kubectl wait --for=condition=Established crd/inferencepipelines.tandem.dev --timeout=60s >/dev/null
kubectl create namespace "$ns" >/dev/null

python3 - "$N" > "$work/pipelines.yaml" <<'PY'
import sys
n = int(sys.argv[1])
for i in range(n):
    print(f"""---
apiVersion: tandem.dev/v1alpha1
kind: InferencePipeline
metadata: {{name: p{i:04d}}}
spec:
  preprocess:
    text: {{tokenizer: "file:///var/lib/tandem/models/minilm/tokenizer.json"}}
    replicas: {{min: 1, max: 4}}
    resources: {{requests: {{cpu: "1000", memory: 64Mi}}}}
  inference:
    model: {{name: minilm, version: "1", uri: "file:///var/lib/tandem/models/minilm/model.safetensors",
            sha256: "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"}}
    device: CPU
    replicas: {{min: 0, max: 4}}""")
PY
echo "[bench] creating $N pipelines in $ns (operator not running yet)" >&2
c0=$(date +%s.%N)
kubectl apply -n "$ns" -f "$work/pipelines.yaml" >/dev/null
c1=$(date +%s.%N)

echo "[bench] starting the operator" >&2
t0=$(date +%s.%N)
RUST_LOG=warn,tandem_operator=debug "$bin" run --namespace "$ns" --lease-namespace "$ns" \
  --metrics-addr "127.0.0.1:$port" --log-format json > "$work/operator.log" 2>&1 &
op_pid=$!

peak_sampled=0
while :; do
  rss=$(awk '/VmRSS/ {print $2}' "/proc/$op_pid/status" 2>/dev/null || echo 0)
  [ "$rss" -gt "$peak_sampled" ] && peak_sampled=$rss
  deps=$(kubectl get deployments -n "$ns" -o name 2>/dev/null | wc -l)
  done_status=$(kubectl get ipl -n "$ns" -o jsonpath='{range .items[*]}{.status.observedGeneration}{"\n"}{end}' 2>/dev/null | grep -c . || true)
  if [ "$deps" -ge $((2 * N)) ] && [ "$done_status" -ge "$N" ]; then break; fi
  if [ "$(echo "$(date +%s.%N) - $t0 > $MAX_WAIT" | bc)" = 1 ]; then
    echo "[bench] INCOMPLETE after ${MAX_WAIT}s: $done_status/$N statuses, $deps/$((2 * N)) Deployments" >&2
    break
  fi
  if ! kill -0 "$op_pid" 2>/dev/null; then echo "[bench] operator exited" >&2; tail -20 "$work/operator.log" >&2; exit 1; fi
  # Each poll lists N pipelines and 2N Deployments: poll every 2 s so the harness itself does
  # not compete with the operator for the API server.
  sleep 2
done
t1=$(date +%s.%N)
sleep 5   # let follow-up reconciles (owned-object events) finish before reading memory
hwm=$(awk '/VmHWM/ {print $2}' "/proc/$op_pid/status")
rss_end=$(awk '/VmRSS/ {print $2}' "/proc/$op_pid/status")
kill -TERM "$op_pid"; wait "$op_pid" 2>/dev/null || true; op_pid=

python3 - "$work/operator.log" "$N" "$c0" "$c1" "$t0" "$t1" "$hwm" "$rss_end" "$done_status" <<'PY'
import json, sys
log, n, c0, c1, t0, t1, hwm, rss_end, done = sys.argv[1:]
d = []
for line in open(log):
    try:
        e = json.loads(line)
    except ValueError:
        continue
    if e.get("message") == "reconcile finished" and "duration_ms" in e:
        d.append(float(e["duration_ms"]))
d.sort()
pct = lambda p: d[min(len(d) - 1, int(round(p / 100 * (len(d) - 1))))] if d else float("nan")
print(f"pipelines:                 {n}")
print(f"create (kubectl apply):    {float(c1) - float(c0):.1f} s")
print(f"pipelines with status:     {done}/{n}")
print(f"all reconciled after:      {float(t1) - float(t0):.1f} s (operator start -> every pipeline has 2 Deployments and status)")
print(f"operator peak RSS (VmHWM): {int(hwm) / 1024:.1f} MiB")
print(f"operator RSS at end:       {int(rss_end) / 1024:.1f} MiB")
print(f"reconciles:                {len(d)}")
print(f"reconcile p50/p90/p99/max: {pct(50):.1f} / {pct(90):.1f} / {pct(99):.1f} / {d[-1] if d else float('nan'):.1f} ms")
PY
