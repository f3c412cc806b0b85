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
# Uses target/release-small/tandem-operator, the profile the operator image ships (rebuilt when
# stale; OPERATOR_BIN overrides).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
N=${N:-1000}
MAX_WAIT=${MAX_WAIT:-1800}   # seconds; past it the numbers so far are reported as incomplete
# LOG_OUT=<file> keeps the operator's JSON log (e.g. to split first reconciles from follow-ups).
# STEADY_S=<s> then restarts the operator on the reconciled pipelines and reports its memory
# after that many seconds (the caches without the burst) and its idle CPU over 120 s more (chart log level); SMAPS_OUT=<file> keeps the first
# operator's /proc/<pid>/smaps at the end.
# Progress, memory and the report: bench/operator/measure.py.
eval "$(tests/kube/cluster env)"
bin=${OPERATOR_BIN:-$root/target/release-small/tandem-operator}
# Always ask cargo (a no-op when fresh): a stale release binary would measure old code.
[ -n "${OPERATOR_BIN:-}" ] || cargo build --profile release-small -p tandem-operator --bin tandem-operator
ns=bench-operator-$$
work=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cleanup() {
  kubectl delete namespace "$ns" --wait=false >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

kubectl apply --server-side --force-conflicts --field-manager=tandem-bench \
  -f crds/inferencepipelines.tandem.dev.yaml >/dev/null
kubectl wait --for=condition=Established crd/inferencepipelines.tandem.dev --timeout=60s >/dev/null
# A previous run's namespace is deleted in the background; its garbage collection (thousands
# of objects) would load the API server this run measures.
for old in $(kubectl get namespaces -o name | grep '^namespace/bench-operator-' || true); do
  echo "[bench] waiting for $old to be deleted" >&2
  kubectl wait --for=delete "$old" --timeout=900s >/dev/null 2>&1 || true
done
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

log=${LOG_OUT:-$work/operator.log}
RUST_LOG=warn,tandem_operator=debug python3 bench/operator/measure.py \
  --namespace "$ns" --pipelines "$N" --log "$log" --max-wait "$MAX_WAIT" \
  --create-s "$(echo "$c1 - $c0" | bc)" --steady-s "${STEADY_S:-0}" ${SMAPS_OUT:+--smaps-out "$SMAPS_OUT"} -- \
  "$bin" run --namespace "$ns" --lease-namespace "$ns" \
  --metrics-addr "127.0.0.1:$port" --log-format json
