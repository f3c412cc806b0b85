#!/usr/bin/env python3
"""Writes a ResNet-50 (torchvision tensor names and shapes) with random weights
as safetensors plus a Tandem config.json. numpy only; deterministic (seeded).

Random weights are enough for throughput work and shape tests. BatchNorm
statistics are the identity (mean 0, var 1, weight 1, bias 0) and convs use
He-normal init scaled down so activations stay finite through 16 blocks.

Usage: gen-resnet50.py OUT_DIR
"""

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from importlib import import_module  # noqa: E402

write_safetensors = import_module("convert-torch-legacy").write_safetensors

DEPTHS = [3, 4, 6, 3]
WIDTHS = [64, 128, 256, 512]
EXPANSION = 4


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(50)
    tensors = {}

    def conv(name, cout, cin, k):
        std = np.sqrt(2.0 / (cin * k * k)) * 0.5
        tensors[name + ".weight"] = (rng.normal(0, std, (cout, cin, k, k)).astype(np.float32), "F32")

    def bn(name, c):
        tensors[name + ".weight"] = (np.ones(c, np.float32), "F32")
        tensors[name + ".bias"] = (np.zeros(c, np.float32), "F32")
        tensors[name + ".running_mean"] = (np.zeros(c, np.float32), "F32")
        tensors[name + ".running_var"] = (np.ones(c, np.float32), "F32")

    conv("conv1", 64, 3, 7)
    bn("bn1", 64)
    cin = 64
    for li, (depth, width) in enumerate(zip(DEPTHS, WIDTHS), start=1):
        for b in range(depth):
            p = f"layer{li}.{b}"
            conv(p + ".conv1", width, cin, 1)
            bn(p + ".bn1", width)
            conv(p + ".conv2", width, width, 3)
            bn(p + ".bn2", width)
            conv(p + ".conv3", width * EXPANSION, width, 1)
            bn(p + ".bn3", width * EXPANSION)
            if b == 0:
                conv(p + ".downsample.0", width * EXPANSION, cin, 1)
                bn(p + ".downsample.1", width * EXPANSION)
            cin = width * EXPANSION
    tensors["fc.weight"] = (rng.normal(0, 0.01, (1000, 2048)).astype(np.float32), "F32")
    tensors["fc.bias"] = (np.zeros(1000, np.float32), "F32")
    write_safetensors(os.path.join(out, "model.safetensors"), tensors, {"format": "pt", "weights": "random"})
    config = {
        "architectures": ["TandemResNet"],
        "model_type": "tandem-resnet",
        "depths": DEPTHS,
        "num_classes": 1000,
        "bn_eps": 1e-5,
        "image_size": 224,
        "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225],
    }
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    main()
