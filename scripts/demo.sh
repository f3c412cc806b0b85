#!/usr/bin/env bash
# Tandem's demo command, safe to re-run: installs what a fresh machine lacks,
# builds the control plane and the workspace, brings up the local cluster and
# shows a node and a running pod answering on its pod IP.
# (It grows into the full pipeline demo as the chart and examples land.)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
. scripts/lib.sh
t0=$(date +%s)

ensure_system_packages
say "1/4 control plane binaries (cached by version; a cold build takes ~10-20 min)"
kube_bin=$(tests/kube/build.sh)
export PATH="$kube_bin:$PATH"

say "2/4 local cluster (etcd, kube-apiserver, controller-manager, scheduler, node agent)"
tests/kube/cluster up
eval "$(tests/kube/cluster env)"
kubectl get nodes -o wide

say "3/4 a Deployment whose pod runs as a process in its own network namespace"
kubectl create namespace tandem-demo --dry-run=client -o yaml | kubectl apply -f - >/dev/null
kubectl apply -n tandem-demo -f - <<'YAML'
apiVersion: apps/v1
kind: Deployment
metadata: {name: hello}
spec:
  replicas: 1
  selector: {matchLabels: {app: hello}}
  template:
    metadata: {labels: {app: hello}}
    spec:
      containers:
      - name: server
        image: tandem-testserver:latest
        args: ["--port", "8080"]
        env:
        - {name: POD_NAME, valueFrom: {fieldRef: {fieldPath: metadata.name}}}
        - {name: POD_IP, valueFrom: {fieldRef: {fieldPath: status.podIP}}}
        readinessProbe: {httpGet: {path: /healthz, port: 8080}, periodSeconds: 1}
YAML
kubectl rollout status -n tandem-demo deployment/hello --timeout=120s
kubectl get pods -n tandem-demo -o wide
ip=$(kubectl get pods -n tandem-demo -l app=hello -o jsonpath='{.items[0].status.podIP}')

say "4/4 the pod answers on its pod IP"
echo "curl http://$ip:8080/  ->  $(curl -s --max-time 5 "http://$ip:8080/")"

say "done in $(since "$t0")"
cat <<MSG
The cluster keeps running. Reach it with:
  eval "\$(tests/kube/cluster env)"; kubectl get pods -A
Logs: \$TANDEM_CLUSTER_DIR/logs (control plane) and \$TANDEM_CLUSTER_DIR/logs/pods (pods)
Stop it with: tests/kube/cluster down
MSG
