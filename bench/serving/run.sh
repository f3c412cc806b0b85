#!/usr/bin/env bash
# Serving-layer benchmark: Tandem preprocess worker vs the FastAPI peer, same
# inference worker, same cores. Builds the release binaries, then runs
# bench/serving/run.py (all flags pass through, e.g. --pipelines text).
# Results: bench/serving/results/{results.json,report.txt,*.png}.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
venv=$(scripts/python-env.sh)
models=${TANDEM_MODELS_DIR:-$HOME/.cache/tandem/models}
[ -f "$models/minilm/.complete" ] && [ -f "$models/efficientnet-lite0/.complete" ] || scripts/fetch-models.sh
cargo build --release -p tandem-worker -p tandem-loadgen
# Private copies: other builds may replace target/release/* during the run.
bin=$(mktemp -d /tmp/tandem-serving-bench.XXXXXX)
trap 'rm -rf "$bin"' EXIT
cp target/release/tandem-worker target/release/tandem-loadgen "$bin/"
"$venv/bin/python" bench/serving/run.py --venv "$venv" --models "$models" --bin-dir "$bin" "$@"
