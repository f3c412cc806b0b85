#!/usr/bin/env bash
# Where the serving layer's CPU time goes: runs one serving layer (tandem |
# peer) in front of the stub inference server at a fixed rate and samples it
# with `perf record` (Debian package linux-perf); prints the top shared
# objects and symbols. Same pinning and ports as run.py.
#   bench/serving/profile.sh <tandem|peer> <image|text> <rate> [seconds] [bin-dir]
set -euo pipefail
who=$1; kind=$2; rate=$3; secs=${4:-10}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
bin=${5:-$root/target/release}
venv=$("$root/scripts/python-env.sh")
models=${TANDEM_MODELS_DIR:-$HOME/.cache/tandem/models}
tmp=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$tmp"; }
trap cleanup EXIT
if [ "$kind" = image ]; then
  model=efficientnet; out=logits; width=1000
  "$venv/bin/python" - "$tmp" <<'PY'
import sys, skimage.data
from PIL import Image
Image.fromarray(skimage.data.chelsea()).resize((1920, 1080), Image.LANCZOS).save(sys.argv[1] + "/in.jpg", "JPEG", quality=90)
PY
  items=(--input "$tmp/in.jpg")
  pre='  image: {resize: {width: 224, height: 224, mode: CenterCrop, filter: Bilinear}}
postprocess: {kind: Classification, topK: 5, labels: imagenet}'
else
  model=minilm; out=embedding; width=384
  printf 'The quick brown fox jumps over the lazy dog.\nA sentence embedding maps text to a fixed-size vector.\n' > "$tmp/s.txt"
  items=(--lines "$tmp/s.txt")
  pre="  text: {tokenizer: \"$models/minilm/tokenizer.json\", maxLength: 256}
postprocess: {kind: Embedding}"
fi
taskset -c 1 "$bin/tandem-loadgen" stub --port 24130 --output "$out" --width "$width" & pids+=($!)
if [ "$who" = tandem ]; then
  cat > "$tmp/cfg.yaml" <<EOF2
pipeline: profile
model: {name: $model}
preprocess:
$pre
ports: {http: 24100, grpc: 24101, metrics: 24102, control: 24103}
limits: {cpuThreads: 1}
inferenceEndpoints: ["127.0.0.1:24130"]
EOF2
  RUST_LOG=warn taskset -c 0 "$bin/tandem-worker" preprocess --config "$tmp/cfg.yaml" --bind 127.0.0.1 & pids+=($!)
  port=24100
else
  PEER_PIPELINE=$kind PEER_MODEL=$model PEER_INFERENCE=127.0.0.1:24130 PEER_INFER_MODEL=$model \
  PEER_TOKENIZER="$models/minilm/tokenizer.json" taskset -c 0 "$venv/bin/uvicorn" --app-dir "$root/bench/serving" peer:app \
    --host 127.0.0.1 --port 24110 --workers 1 --loop uvloop --http httptools --no-access-log --log-level warning & pids+=($!)
  port=24110
fi
server=${pids[-1]}
until curl -fs "http://127.0.0.1:$port/v2/health/ready" >/dev/null 2>&1; do sleep 0.05; done
taskset -c 1 "$bin/tandem-loadgen" run --target "http://127.0.0.1:$port" --model "$model" "${items[@]}" --rate 20 --duration-s 1 >/dev/null
taskset -c 1 "$bin/tandem-loadgen" run --target "http://127.0.0.1:$port" --model "$model" "${items[@]}" --rate "$rate" --duration-s "$secs" &
load=$!
perf record -q -F 999 -g -p "$server" -o "$tmp/perf.data" -- sleep "$secs" 2>/dev/null
wait $load
echo "== $who $kind @ $rate rps: CPU samples by shared object =="
{ perf report -i "$tmp/perf.data" --no-children --sort dso --stdio -g none 2>/dev/null || true; } | grep -v '^#' | grep -v '^$' | head -12 || true
echo "== top symbols =="
{ perf report -i "$tmp/perf.data" --no-children --sort dso,symbol --stdio -g none --percent-limit 1.5 2>/dev/null || true; } \
  | grep -v '^#' | grep -v '^$' | sed -E 's/ +- +- *$//; s/ {3,}/  /g' | head -25 || true
