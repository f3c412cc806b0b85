#!/usr/bin/env bash
# Builds the local control plane (etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler, kubectl, helm) from the Go wrapper modules beside this file
# into a cache directory keyed by version, outside the clone. Prints that bin
# directory on stdout; reuses it when it is already complete.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=versions.env
. "$here/versions.env"
export GOTOOLCHAIN=local GOWORK=off CGO_ENABLED=0 GOFLAGS=-mod=mod

sumkey=$(cat "$here"/k8s/go.sum "$here"/etcd/go.sum "$here"/helm/go.sum | sha256sum | cut -c1-12)
cache_root=${TANDEM_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/tandem}
bin="$cache_root/kube/k8s-$KUBE_VERSION-etcd-$ETCD_VERSION-helm-$HELM_VERSION-$sumkey/bin"
want=(etcd kube-apiserver kube-controller-manager kube-scheduler kubectl helm)

complete() { for b in "${want[@]}"; do [ -x "$bin/$b" ] || return 1; done; }
if complete; then echo "$bin"; exit 0; fi

log() { echo "[build] $*" >&2; }
mkdir -p "$bin.partial"
# A private Go build and module cache (~5 GB), deleted once the binaries are in
# place: they are cached by version above, so nothing reads these caches again.
# A failed build keeps them, so a retry resumes. GOCACHE/GOMODCACHE set by the
# caller are used as they are and kept.
scratch="$cache_root/kube/go-scratch"
own_cache=()
if [ -z "${GOCACHE:-}" ]; then export GOCACHE="$scratch/build"; own_cache+=("$GOCACHE"); fi
if [ -z "${GOMODCACHE:-}" ]; then export GOMODCACHE="$scratch/mod"; own_cache+=("$GOMODCACHE"); fi
start=$(date +%s)

# Version stamps: without them the servers report v0.0.0 and helm/semver
# checks on the server version fail.
commit=$(cd "$here/k8s" && go mod download -json "k8s.io/kubernetes@$KUBE_VERSION" |
  sed -n 's/.*"Hash": "\([0-9a-f]\{40\}\)".*/\1/p' | head -n1)
commit=${commit:-0000000000000000000000000000000000000000}
major=${KUBE_VERSION#v}; major=${major%%.*}
minor=${KUBE_VERSION#v*.}; minor=${minor%%.*}
date=$(date -u +%Y-%m-%dT%H:%M:%SZ)
kflags=""
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  kflags+=" -X $pkg.gitVersion=$KUBE_VERSION -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
  kflags+=" -X $pkg.gitCommit=$commit -X $pkg.gitTreeState=clean -X $pkg.buildDate=$date"
done

log "kubernetes $KUBE_VERSION (apiserver, controller-manager, scheduler, kubectl); a cold build takes tens of minutes"
(cd "$here/k8s" && go build -trimpath -tags selinux,notest,grpcnotrace -ldflags "-s -w $kflags" \
  -o "$bin.partial/" \
  k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
  k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl)

log "etcd $ETCD_VERSION"
(cd "$here/etcd" && go build -trimpath -ldflags "-s -w -X go.etcd.io/etcd/api/v3/version.GitSHA=release-$ETCD_VERSION" \
  -o "$bin.partial/etcd" go.etcd.io/etcd/server/v3)

log "helm $HELM_VERSION"
(cd "$here/helm" && go build -trimpath -ldflags "-s -w \
  -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION \
  -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=$major \
  -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$minor \
  -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=$major \
  -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$minor" \
  -o "$bin.partial/helm" helm.sh/helm/v3/cmd/helm)

rm -rf "$bin"
mv "$bin.partial" "$bin"
for c in "${own_cache[@]}"; do
  # The module cache is read-only on purpose; make it deletable first.
  chmod -R u+w "$c" 2>/dev/null || true
  rm -rf "$c"
done
log "built in $(( $(date +%s) - start ))s into $bin"
echo "$bin"
