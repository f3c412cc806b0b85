#!/usr/bin/env bash
# Builds crane (go-containerregistry) from the Go wrapper module beside this
# file into a cache directory keyed by its version and go.sum, outside the
# clone. Prints that bin directory on stdout; reuses it when it is complete.
# Used by scripts/images.sh to assemble OCI images without a Docker engine.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export GOTOOLCHAIN=local GOWORK=off CGO_ENABLED=0 GOFLAGS=-mod=mod

# The version pinned in go.mod is the single source of truth.
version=$(sed -n 's|^[[:space:]]*github.com/google/go-containerregistry \(v[^ ]*\).*|\1|p' "$here/go.mod" | head -n1)
[ -n "$version" ] || { echo "[crane] no go-containerregistry version in $here/go.mod" >&2; exit 1; }
sumkey=$(sha256sum "$here/go.sum" | cut -c1-12)
cache_root=${TANDEM_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/tandem}
bin="$cache_root/oci/crane-$version-$sumkey/bin"

if [ -x "$bin/crane" ]; then echo "$bin"; exit 0; fi

echo "[crane] building crane $version (about a minute cold)" >&2
mkdir -p "$bin.partial"
(cd "$here" && go build -trimpath \
  -ldflags "-s -w -X github.com/google/go-containerregistry/cmd/crane/cmd.Version=$version" \
  -o "$bin.partial/crane" github.com/google/go-containerregistry/cmd/crane)
rm -rf "$bin"
mv "$bin.partial" "$bin"
echo "[crane] built into $bin" >&2
echo "$bin"
