#!/usr/bin/env bash
# Creates (or reuses) the Python virtual environment for tests, fixtures, the
# demo client and benchmarks, keyed by the requirements file, outside the
# clone. Prints the venv directory on stdout.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
req="$root/tests/python/requirements.txt"
key=$(sha256sum "$req" | cut -c1-12)
cache_root=${TANDEM_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/tandem}
venv="$cache_root/venv-$key"
if [ ! -f "$venv/.complete" ]; then
  echo "[python-env] creating $venv" >&2
  rm -rf "$venv"
  python3 -m venv "$venv"
  pip_flags=(-q --disable-pip-version-check)
  # On CI the wheel cache would only hold a second copy of torch and friends (GBs).
  [ "${CI:-}" = true ] && pip_flags+=(--no-cache-dir)
  "$venv/bin/python" -m pip install "${pip_flags[@]}" --upgrade pip >&2
  "$venv/bin/python" -m pip install "${pip_flags[@]}" -r "$req" >&2
  touch "$venv/.complete"
  # Environments for older requirements files are ~6 GB each and never used again.
  for old in "$cache_root"/venv-*; do
    [ "$old" = "$venv" ] || { echo "[python-env] removing stale $old" >&2; rm -rf "$old"; }
  done
fi
echo "$venv"
