#!/usr/bin/env bash
# Shared by scripts/test.sh and scripts/demo.sh: install what a fresh machine
# lacks and say what is happening.

say() { printf '\n\033[1m==> %s\033[0m\n' "$*" >&2; }

# Debian packages the project needs (network namespaces, certificates).
ensure_system_packages() {
  local missing=()
  command -v ip >/dev/null || missing+=(iproute2)
  command -v openssl >/dev/null || missing+=(openssl)
  command -v setsid >/dev/null || missing+=(util-linux)
  command -v pgrep >/dev/null || missing+=(procps)
  command -v curl >/dev/null || missing+=(curl)
  command -v cmake >/dev/null || missing+=(cmake) # turbojpeg-sys builds libjpeg-turbo from source
  command -v nasm >/dev/null || missing+=(nasm)   # libjpeg-turbo's x86-64 SIMD (required, see Cargo.toml)
  command -v g++ >/dev/null || missing+=(g++)     # tests/cuda-emu compiles the CUDA kernels as C++20
  if [ ${#missing[@]} -gt 0 ]; then
    say "installing Debian packages: ${missing[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

# Seconds since the given epoch, for the timing lines.
since() { echo $(( $(date +%s) - $1 ))s; }

# Free space on the filesystems a run writes to (the clone's target/ and the cache
# directory), for the log: a cold run needs about 15 GiB (docs/development.md).
report_disk() {
  local cache=${TANDEM_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/tandem}
  mkdir -p "$cache"
  df -h --output=avail,target "$root" "$cache" | sed 's/^/[disk] /' >&2
}
