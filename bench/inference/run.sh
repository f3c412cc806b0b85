#!/usr/bin/env bash
# CPU engine vs PyTorch CPU, same inputs, same run, pinned to the same cores.
# Usage: bench/inference/run.sh [THREADS]   (default 2; cores 0..THREADS-1)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
threads=${1:-2}
cores="0-$((threads - 1))"
models=$("$root/scripts/fetch-models.sh")
py="$("$root/scripts/python-env.sh")/bin/python"
cd "$root"
cargo build --release -q -p tandem-engine --example bench_cpu
echo "# $(date -u +%FT%TZ) $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), cores $cores"
taskset -c "$cores" target/release/examples/bench_cpu "$models" "$threads"
OMP_NUM_THREADS=$threads taskset -c "$cores" "$py" bench/inference/torch_cpu.py "$threads"
