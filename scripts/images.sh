#!/usr/bin/env bash
# Builds the tandem-operator and tandem-worker container images WITHOUT a Docker
# engine and without pulling from any image registry: the runtime base is built from the
# Debian packages the binaries need (ldd decides which), the binary is its own
# layer, and crane (go-containerregistry, built from tests/kube/crane) writes
# the image config, a `docker load`-able tarball and an OCI image layout.
#
#   scripts/images.sh              build release binaries, then both images
#   scripts/images.sh --no-build   reuse target/release-small/tandem-operator and
#                                  target/release/tandem-worker as they are (build the worker
#                                  with --features tandem-engine/cuda)
#   scripts/images.sh --no-run     skip running the binaries inside the unpacked rootfs
#   scripts/images.sh --check-dockerfiles
#                                  only check that docker/*.Dockerfile, the chart and the
#                                  operator's worker ports agree with this script (< 1 s)
#   scripts/images.sh --no-build --bin-dir target/debug
#                                  package other binaries, both from one directory (a quick check of the packaging
#                                  itself, ~15 s warm; the sizes are then not the release ones)
#
# Output under target/images/, for tandem-operator:<version> and tandem-worker:<version>-cpu
# (the worker without CUDA libraries, like the Dockerfile's `cpu` target):
#   <image>-<tag>.tar            docker load / podman load / crane push
#   <image>-<tag>.oci/           OCI image layout (crane push, skopeo copy oci:...)
#   <image>-<tag>.contents.txt   every file of every layer, with owner and mode
#   <image>-<tag>.config.json    the image config
#   sizes.tsv                    compressed/uncompressed sizes, one line per image per run
#
# The images match docker/*.Dockerfile: uid/gid 65532 ("nonroot"), entrypoint
# /usr/local/bin/tandem-<name>, the operator's default argument `run`, the same
# exposed ports and labels. Debug info is stripped from the copied binary
# (symbols stay, so backtraces keep function names), as the Dockerfiles do.
# The only network access is `apt-get download` (Debian archive) and, on the
# first run, the Go module proxy for crane. A loopback-only registry (`crane
# registry serve`, blobs in a temporary directory) lives for the duration of the
# script, because `crane mutate` edits images through the registry API.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/lib.sh
. "$root/scripts/lib.sh"

# The operator ships from the size-optimised `release-small` profile (Cargo.toml says why).
build=1 run=1 bin_dir=target/release op_dir=target/release-small check_only=0
while [ $# -gt 0 ]; do
  arg=$1
  shift
  case "$arg" in
    --check-dockerfiles) check_only=1 ;;
    --no-build) build=0 ;;
    --no-run) run=0 ;;
    --bin-dir) [ $# -gt 0 ] || { echo "images.sh: --bin-dir needs a directory" >&2; exit 2; }
      bin_dir=$1; op_dir=$1; shift ;;
    -h | --help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "images.sh: unknown argument '$arg' (see --help)" >&2; exit 2 ;;
  esac
done
if [ "$build" = 1 ] && [ "$bin_dir" != target/release ]; then
  echo "images.sh: --bin-dir needs --no-build" >&2
  exit 2
fi

# The image contract, shared with docker/*.Dockerfile (checked by --check-dockerfiles).
# Size targets of issue #8, in bytes (compressed = what a node pulls).
declare -A target_bytes=([operator]=$((30 * 1000 * 1000)) [worker]=$((50 * 1000 * 1000)))
# Operator: the chart's metrics.port. Worker: PORT_HTTP, PORT_GRPC, PORT_METRICS, PORT_CONTROL
# of operator/src/build/mod.rs, the ports of the worker pods the operator builds.
declare -A ports=([operator]="8080" [worker]="8000 8001 9090 9091")
worker_features=tandem-engine/cuda
uid=65532
paths_env="PATH=/usr/local/bin:/usr/bin:/bin"
certs_env="SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt"

# Fails when the Dockerfiles, the chart or the operator's pod ports drift from the contract
# above. Reads files only: no build, no network (scripts/test.sh runs it).
check_dockerfiles() {
  local bad=0 n
  expect() { # file, fixed string, expected count
    n=$(grep -cF -- "$2" "$root/$1" || true)
    if [ "$n" != "$3" ]; then
      echo "images.sh: $1: expected $3 line(s) with '$2', found $n" >&2
      bad=1
    fi
  }
  expect docker/operator.Dockerfile "USER $uid:$uid" 1
  expect docker/operator.Dockerfile "EXPOSE ${ports[operator]}" 1
  expect docker/operator.Dockerfile 'ENTRYPOINT ["/usr/local/bin/tandem-operator"]' 1
  expect docker/operator.Dockerfile 'CMD ["run"]' 1
  expect docker/operator.Dockerfile "strip --strip-debug" 1
  expect docker/operator.Dockerfile "cargo build --locked --profile release-small -p tandem-operator" 1
  # Two runtime stages (cpu, cuda), one build stage.
  expect docker/worker.Dockerfile "USER $uid:$uid" 2
  expect docker/worker.Dockerfile "EXPOSE ${ports[worker]}" 2
  expect docker/worker.Dockerfile 'ENTRYPOINT ["/usr/local/bin/tandem-worker"]' 2
  expect docker/worker.Dockerfile "cargo build --locked --release -p tandem-worker --features $worker_features" 1
  expect docker/worker.Dockerfile "strip --strip-debug" 1
  expect helm/tandem/values.yaml "runAsUser: $uid" 1
  expect helm/tandem/values.yaml "runAsGroup: $uid" 1
  expect helm/tandem/values.yaml "port: ${ports[operator]}" 2
  local p
  for p in PORT_HTTP PORT_GRPC PORT_METRICS PORT_CONTROL; do
    n=$(sed -n "s/^pub const $p: i32 = \([0-9]*\);.*/\1/p" "$root/operator/src/build/mod.rs")
    if [ -z "$n" ] || [[ " ${ports[worker]} " != *" $n "* ]]; then
      echo "images.sh: operator/src/build/mod.rs $p='$n' is not among the worker image ports (${ports[worker]})" >&2
      bad=1
    fi
  done
  return "$bad"
}
if [ "$check_only" = 1 ]; then
  check_dockerfiles
  echo "images.sh: Dockerfiles, chart and operator ports agree with the image contract" >&2
  exit 0
fi
check_dockerfiles
if [ "$(id -u)" != 0 ]; then
  echo "images.sh: run as root: the layers carry files owned by uid $uid, and the checks run" \
    "the binaries with chroot (and runc)" >&2
  exit 1
fi

need=()
command -v jq >/dev/null || need+=(jq)
command -v strip >/dev/null || need+=(binutils)
command -v dpkg-deb >/dev/null || need+=(dpkg)
# The worker's release build compiles libjpeg-turbo (turbojpeg-sys: cmake, NASM for its SIMD).
command -v cmake >/dev/null || need+=(cmake)
command -v nasm >/dev/null || need+=(nasm)
if [ ${#need[@]} -gt 0 ]; then
  say "installing Debian packages: ${need[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

cd "$root"
version=$(cargo metadata --no-deps --format-version 1 |
  jq -r '.packages[] | select(.name == "tandem-operator") | .version')
revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
# Binaries built from uncommitted sources are marked, so a label never claims a clean commit.
if ! git diff --quiet HEAD -- Cargo.toml Cargo.lock proto engine operator worker 2>/dev/null; then
  revision="$revision-dirty"
fi
# Fixed layer timestamps make the layers reproducible: the same binary gives the same digest.
epoch=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo 0)}
out="$root/target/images"
cache_root=${TANDEM_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/tandem}
debs="$cache_root/oci/debs"
mkdir -p "$out" "$debs"
work=$(mktemp -d "$out/.work.XXXXXX")
registry_pid=""
cleanup() {
  if [ -n "$registry_pid" ]; then kill "$registry_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

start=$(date +%s)
if [ "$build" = 1 ]; then
  say "cargo build --release (cold: tens of minutes on 2 cores)"
  # The worker is built with the CUDA engine compiled in (cudarc loads libcuda, cuBLAS
  # and NVRTC with dlopen at run time, so nothing CUDA is linked or shipped): the same
  # image runs `--device cpu` anywhere and `--device cuda` where the libraries are provided.
  cargo build --release -p tandem-worker --features "$worker_features"
  cargo build --profile release-small -p tandem-operator
fi
bin_dir=$(cd "$bin_dir" && pwd)
op_dir=$(cd "$op_dir" && pwd)
# Where each image's binary comes from.
declare -A dirs=([operator]=$op_dir [worker]=$bin_dir)
for name in operator worker; do
  [ -x "${dirs[$name]}/tandem-$name" ] ||
    { echo "images.sh: ${dirs[$name]}/tandem-$name is missing; run without --no-build" >&2; exit 1; }
done

say "crane (tests/kube/crane)"
crane="$("$root/tests/kube/crane/build.sh")/crane"
"$crane" version >&2

# --- runtime base from Debian packages --------------------------------------

# The shared libraries (and the dynamic loader) a binary needs, one absolute path a line.
needed_libs() {
  local ldd_out
  ldd_out=$(ldd "$1") || { echo "images.sh: ldd $1 failed" >&2; return 1; }
  if grep -q 'not found' <<<"$ldd_out"; then
    echo "images.sh: $1 has unresolved libraries:" >&2
    echo "$ldd_out" >&2
    return 1
  fi
  awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' <<<"$ldd_out" | sort -u
}

# The Debian package that owns a path (usrmerge-aware: tries /usr/lib and /lib spellings).
owner_of() {
  local p=$1 real cand
  real=$(readlink -f "$p")
  for cand in "$p" "$real" "${p#/usr}" "/usr$p" "${real#/usr}" "/usr$real"; do
    if dpkg -S "$cand" >/dev/null 2>&1; then
      dpkg -S "$cand" | head -n1 | cut -d: -f1
      return 0
    fi
  done
  echo "images.sh: no Debian package owns $p" >&2
  return 1
}

# The .deb of apt's candidate version of a package in the cache (empty when not there), so
# a newer version (a security update, after `apt-get update`) is fetched, never a stale one.
cached_deb() {
  local pkg=$1 ver
  ver=$(apt-cache policy "$pkg" | awk '$1 == "Candidate:" { print $2 }')
  [ -n "$ver" ] && [ "$ver" != "(none)" ] || return 0
  find "$debs" -maxdepth 1 -name "${pkg}_${ver//:/%3a}_*.deb" | head -n1
}

# Downloads (once, into the cache) and extracts a Debian package; prints the extraction dir.
deb_dir() {
  local pkg=$1 deb
  deb=$(cached_deb "$pkg")
  if [ -z "$deb" ]; then
    echo "[images] apt-get download $pkg" >&2
    (cd "$debs" && { apt-get download -o APT::Sandbox::User=root "$pkg" >/dev/null 2>&1 ||
      { apt-get update -qq && apt-get download -o APT::Sandbox::User=root "$pkg" >/dev/null; }; })
    deb=$(cached_deb "$pkg")
    [ -n "$deb" ] || { echo "images.sh: apt-get download $pkg gave no .deb in $debs" >&2; return 1; }
  fi
  if [ ! -d "$work/debs/$pkg" ]; then
    mkdir -p "$work/debs/$pkg"
    dpkg-deb -x "$deb" "$work/debs/$pkg"
    dpkg-deb -f "$deb" >"$work/debs/$pkg.control"
  fi
  echo "$work/debs/$pkg"
}

# Finds path $2 inside the extracted package $1 (a package may ship /lib/... or /usr/lib/...).
file_in_deb() {
  local dir=$1 p=$2 cand
  for cand in "$p" "${p#/usr}" "/usr$p"; do
    if [ -e "$dir$cand" ]; then echo "$dir$cand"; return 0; fi
  done
  echo "images.sh: $p is not in the package extracted at $dir" >&2
  return 1
}

# Writes the runtime base root filesystem for a binary into $2.
make_base() {
  local bin=$1 fs=$2 lib pkg dir src doc libs
  local -A pkgs=()
  mkdir -p "$fs"/{etc/ssl/certs,tmp,home/nonroot,var/lib/dpkg/status.d,usr/share/doc}
  libs=$(needed_libs "$bin")
  while read -r lib; do
    pkg=$(owner_of "$lib")
    pkgs[$pkg]=1
    dir=$(deb_dir "$pkg")
    src=$(file_in_deb "$dir" "$lib")
    # At the exact path the loader looks (ldd's answer, PT_INTERP for the loader),
    # as a regular file: no /lib -> /usr/lib symlinks are needed in the image.
    install -D -m 0755 "$(readlink -f "$src")" "$fs$lib"
  done <<<"$libs"

  # CA bundle, as update-ca-certificates would generate it (rustls roots, SSL_CERT_FILE).
  pkgs[ca-certificates]=1
  dir=$(deb_dir ca-certificates)
  find "$dir/usr/share/ca-certificates" -name '*.crt' | LC_ALL=C sort | xargs cat \
    >"$fs/etc/ssl/certs/ca-certificates.crt"
  chmod 0644 "$fs/etc/ssl/certs/ca-certificates.crt"

  # Distribution identity (os-release, debian_version) as in distroless: image scanners
  # use it to match the package records below against Debian's security tracker.
  pkgs[base-files]=1
  dir=$(deb_dir base-files)
  install -D -m 0644 "$dir/usr/lib/os-release" "$fs/usr/lib/os-release"
  ln -s ../usr/lib/os-release "$fs/etc/os-release"
  install -m 0644 "$dir/etc/debian_version" "$fs/etc/debian_version"

  # Licences and package records (scanners such as trivy read status.d, as in distroless).
  for pkg in $(printf '%s\n' "${!pkgs[@]}" | LC_ALL=C sort); do
    dir=$(deb_dir "$pkg")
    doc="$dir/usr/share/doc/$pkg"
    # Some packages link their doc dir to the source package's (libgcc-s1 -> gcc-12-base).
    if [ -L "$doc" ]; then doc="$(deb_dir "$(basename "$(readlink "$doc")")")/usr/share/doc/$(basename "$(readlink "$doc")")"; fi
    install -D -m 0644 "$doc/copyright" "$fs/usr/share/doc/$pkg/copyright"
    install -m 0644 "$work/debs/$pkg.control" "$fs/var/lib/dpkg/status.d/$pkg"
    echo "$pkg $(sed -n 's/^Version: //p' "$work/debs/$pkg.control")"
  done >"$fs.packages"

  printf '%s\n' "root:x:0:0:root:/root:/sbin/nologin" \
    "nonroot:x:$uid:$uid:nonroot:/home/nonroot:/sbin/nologin" >"$fs/etc/passwd"
  printf '%s\n' "root:x:0:" "nonroot:x:$uid:" >"$fs/etc/group"
  # glibc >= 2.34 has the files and dns NSS modules built in; no libnss_* needed.
  printf '%s\n' "passwd: files" "group: files" "hosts: files dns" >"$fs/etc/nsswitch.conf"
  chmod 0644 "$fs/etc/passwd" "$fs/etc/group" "$fs/etc/nsswitch.conf"
  chmod 1777 "$fs/tmp"
  chown "$uid:$uid" "$fs/home/nonroot"
  chmod 0700 "$fs/home/nonroot"
}

# A reproducible layer tarball of directory $1 (sorted, fixed mtime, numeric owners).
layer_tar() {
  local dir=$1 tarball=$2 entries
  mapfile -t entries < <(cd "$dir" && ls -A)
  tar -C "$dir" --sort=name --format=gnu --numeric-owner --mtime="@$epoch" \
    -cf "$tarball" "${entries[@]}"
}

# --- loopback registry for crane mutate ---------------------------------------

say "loopback registry (crane registry serve)"
mkdir -p "$work/registry"
: >"$work/registry.log"
"$crane" registry serve --address 127.0.0.1:0 --disk "$work/registry" 2>"$work/registry.log" &
registry_pid=$!
port=""
for _ in $(seq 1 100); do
  port=$(sed -n 's/.*serving on port \([0-9]*\).*/\1/p' "$work/registry.log" | head -n1)
  [ -n "$port" ] && break
  kill -0 "$registry_pid" 2>/dev/null || { cat "$work/registry.log" >&2; exit 1; }
  sleep 0.1
done
[ -n "$port" ] || { echo "images.sh: the registry did not start" >&2; cat "$work/registry.log" >&2; exit 1; }
reg="127.0.0.1:$port"

# --- images ------------------------------------------------------------------

# The checks' expected output: the operator's `crd` prints the CRD, the worker's `--help` its usage.
expect_output() { # name, how it ran, output file
  local want
  case "$1" in
    operator) want='^kind: CustomResourceDefinition' ;;
    worker) want='^Usage: tandem-worker' ;;
  esac
  if ! grep -q "$want" "$3"; then
    echo "images.sh: tandem-$1 printed no '$want' when run with $2 from its image:" >&2
    cat "$3" >&2
    exit 1
  fi
}

summary=()
for name in operator worker; do
  image="tandem-$name"
  # The worker image without CUDA libraries is the Dockerfile's `cpu` target: tag suffix -cpu.
  tag=$version
  if [ "$name" = worker ]; then tag=$version-cpu; fi
  stem="$out/$image-$tag"
  say "$image:$tag"

  make_base "${dirs[$name]}/$image" "$work/$name-base"
  mkdir -p "$work/$name-bin/usr/local/bin"
  strip --strip-debug -o "$work/$name-bin/usr/local/bin/$image" "${dirs[$name]}/$image"
  chmod 0755 "$work/$name-bin/usr/local/bin/$image"
  layer_tar "$work/$name-base" "$work/$name-base.tar"
  layer_tar "$work/$name-bin" "$work/$name-bin.tar"
  echo "[images] base packages: $(awk '{ printf "%s%s=%s", (NR > 1 ? " " : ""), $1, $2 }' "$work/$name-base.packages")" >&2

  mutate_args=(--set-platform linux/amd64 --user "$uid:$uid" --workdir /
    --entrypoint "/usr/local/bin/$image" -e "$paths_env" -e "$certs_env"
    -l "org.opencontainers.image.title=$image"
    -l "org.opencontainers.image.version=$version"
    -l "org.opencontainers.image.revision=$revision"
    -l "org.opencontainers.image.licenses=Apache-2.0"
    -l "dev.tandem.image.base-packages=$(tr ' ' '=' <"$work/$name-base.packages" | paste -sd' ')")
  for p in ${ports[$name]}; do mutate_args+=(--exposed-ports "$p/tcp"); done
  case "$name" in
    operator)
      mutate_args+=(--cmd run
        -l "org.opencontainers.image.description=Tandem Kubernetes operator for InferencePipelines") ;;
    worker)
      # cudarc is only compiled in with tandem-engine's `cuda` feature.
      cuda_engine=false
      if grep -qa 'cudarc' "$bin_dir/$image"; then cuda_engine=true; fi
      [ "$cuda_engine" = true ] || echo "[images] warning: $bin_dir/$image has no CUDA engine" \
        "(build it with --features tandem-engine/cuda); --device cuda will fail" >&2
      mutate_args+=(-l "dev.tandem.worker.cuda-engine=$cuda_engine"
        -l "org.opencontainers.image.description=Tandem worker (preprocess and inference; CUDA libraries not included)") ;;
  esac

  "$crane" append --oci-empty-base -f "$work/$name-base.tar" -f "$work/$name-bin.tar" \
    -t "$reg/$image:layers" >/dev/null 2>"$work/append.log" || { cat "$work/append.log" >&2; exit 1; }
  # The OCI image (OCI media types) goes to the loopback registry and from there into an
  # OCI layout; the docker-archive tarball is written from the same config and layers
  # (docker archives carry Docker media types, so its manifest digest differs; its
  # config and layer blobs are the same bytes).
  digest=$("$crane" mutate "$reg/$image:layers" "${mutate_args[@]}" -t "$reg/$image:$tag" 2>/dev/null)
  digest=${digest##*@}
  rm -rf "$stem.oci" "$stem.tar"
  "$crane" pull --format oci "$reg/$image:$tag" "$stem.oci"
  # Name the image by its tag inside the layout (umoci and skopeo address it as <dir>:<tag>).
  jq --arg t "$tag" '.manifests[0].annotations = {"org.opencontainers.image.ref.name": $t}' \
    "$stem.oci/index.json" >"$work/index.json"
  install -m 0644 "$work/index.json" "$stem.oci/index.json"
  "$crane" mutate "$reg/$image:layers" "${mutate_args[@]}" -t "$image:$tag" -o "$stem.tar" 2>/dev/null

  # Structural checks: both outputs valid, the layout pushes back to the same digest,
  # the config is as intended.
  "$crane" validate --tarball "$stem.tar" >&2
  "$crane" validate --remote "$reg/$image:$tag" >&2
  "$crane" push "$stem.oci" "$reg/$image:from-layout" >/dev/null 2>&1
  layout_digest=$("$crane" digest "$reg/$image:from-layout")
  [ "$digest" = "$layout_digest" ] ||
    { echo "images.sh: OCI layout digest $layout_digest != built digest $digest" >&2; exit 1; }
  "$crane" config "$reg/$image:$tag" | jq . >"$stem.config.json"
  jq -e --arg u "$uid:$uid" --arg e "/usr/local/bin/$image" \
    '.config.User == $u and .config.Entrypoint == [$e] and .os == "linux" and .architecture == "amd64"' \
    "$stem.config.json" >/dev/null ||
    { echo "images.sh: unexpected image config:" >&2; cat "$stem.config.json" >&2; exit 1; }
  manifest=$("$crane" manifest "$reg/$image:$tag")
  jq -e '.mediaType == "application/vnd.oci.image.manifest.v1+json" and (.layers | length) == 2' \
    <<<"$manifest" >/dev/null ||
    { echo "images.sh: unexpected manifest: $manifest" >&2; exit 1; }

  # Layer contents, as a node will unpack them.
  {
    echo "# $image:$tag $digest"
    echo "## layer 1: runtime base ($(awk '{ printf "%s%s=%s", (NR > 1 ? " " : ""), $1, $2 }' "$work/$name-base.packages"))"
    tar -tvf "$work/$name-base.tar" --numeric-owner
    echo "## layer 2: binary"
    tar -tvf "$work/$name-bin.tar" --numeric-owner
  } >"$stem.contents.txt"

  compressed=$(jq '[.config.size] + [.layers[].size] | add' <<<"$manifest")
  uncompressed=$(($(stat -c %s "$work/$name-base.tar") + $(stat -c %s "$work/$name-bin.tar")))
  binary=$(stat -c %s "$work/$name-bin/usr/local/bin/$image")
  verdict=ok
  [ "$compressed" -le "${target_bytes[$name]}" ] || verdict=OVER
  if [ ! -s "$out/sizes.tsv" ]; then
    printf 'date\timage\trevision\tdigest\tcompressed_bytes\tuncompressed_bytes\tbinary_bytes\ttarget_bytes\tverdict\tbinaries\n' \
      >"$out/sizes.tsv"
  fi
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$image:$tag" \
    "$revision" "$digest" "$compressed" "$uncompressed" "$binary" "${target_bytes[$name]}" "$verdict" \
    "${dirs[$name]#"$root"/}" >>"$out/sizes.tsv"
  summary+=("$(awk -v i="$image:$tag" -v c="$compressed" -v u="$uncompressed" -v b="$binary" \
    -v t="${target_bytes[$name]}" -v v="$verdict" 'BEGIN {
      printf "%-22s compressed %6.1f MB  uncompressed %6.1f MB  binary %6.1f MB  target <= %d MB compressed: %s",
        i, c / 1e6, u / 1e6, b / 1e6, t / 1e6, v }')")

  # Self-sufficiency: run the binary from the unpacked image as uid 65532, with
  # nothing of the host visible (chroot), an empty environment but the image's
  # PATH, and no network (unshare --net where allowed). The command is looked up
  # through PATH, as the operator's worker pods do (`command: [tandem-worker]`).
  if [ "$run" = 1 ]; then
    rootfs="$work/$name-rootfs"
    mkdir -p "$rootfs"
    "$crane" export "$reg/$image:$tag" - | tar -C "$rootfs" -xf -
    case "$name" in
      operator) check=("$image" crd) ;;
      worker) check=("$image" --help) ;;
    esac
    isolate=()
    if unshare --net true 2>/dev/null; then isolate=("$(command -v unshare)" --net); fi
    env -i "$paths_env" "${isolate[@]}" "$(command -v chroot)" --userspec="$uid:$uid" "$rootfs" "${check[@]}" \
      >"$work/run.out" 2>&1 || true
    expect_output "$name" "chroot" "$work/run.out"
    echo "[images] ran '${check[*]}' in the unpacked $image rootfs as uid $uid ${isolate[*]:+(no network)}: ok" >&2

    # Where runc and umoci are installed (Debian packages), also run it as a container from
    # the OCI layout: umoci turns the image config into the runtime spec (user, PATH, cwd,
    # HOME from /etc/passwd); runc runs it with a read-only root filesystem, no capabilities,
    # no new privileges and its own network namespace, as a restricted pod would.
    if command -v runc >/dev/null && command -v umoci >/dev/null; then
      bundle="$work/$name-bundle"
      umoci unpack --image "$stem.oci:$tag" "$bundle" >/dev/null 2>"$work/umoci.log" ||
        { cat "$work/umoci.log" >&2; exit 1; }
      jq --argjson args "$(printf '%s\n' "${check[@]}" | jq -R . | jq -sc .)" \
        '.process.terminal = false | .process.args = $args | .root.readonly = true
         | .process.noNewPrivileges = true
         | .process.capabilities = {bounding: [], effective: [], permitted: [], inheritable: [], ambient: []}' \
        "$bundle/config.json" >"$work/config.json"
      install -m 0644 "$work/config.json" "$bundle/config.json"
      id="tandem-images-$name-$$"
      runc run --bundle "$bundle" "$id" >"$work/run.out" 2>&1 </dev/null || true
      runc delete --force "$id" >/dev/null 2>&1 || true
      expect_output "$name" "runc" "$work/run.out"
      echo "[images] ran '${check[*]}' as a runc container from $(basename "$stem.oci"):$tag" \
        "(uid $uid, read-only root, no capabilities): ok" >&2
    fi
  fi
done

say "images in $out ($(since "$start"))"
printf '%s\n' "${summary[@]}"
echo "sizes appended to $out/sizes.tsv (binaries from ${op_dir#"$root"/} and ${bin_dir#"$root"/})"
echo "load with: docker load -i $out/tandem-operator-$version.tar  (or: crane push $out/tandem-operator-$version.oci <registry>/tandem-operator:$version)"
