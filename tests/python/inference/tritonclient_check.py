#!/usr/bin/env python3
"""End-to-end check of the inference worker with unmodified tritonclient.

Starts `tandem-worker inference` on loopback for MiniLM and EfficientNet-Lite0
(models from scripts/fetch-models.sh), and with tritonclient.grpc and
tritonclient.http: checks ServerLive/Ready, ModelMetadata (names, datatypes,
shapes), ModelInfer results against the committed PyTorch fixtures, and
WorkerControl-independent /metrics; then SIGTERM → clean exit 0. A request
with a token id outside the vocabulary, sent together with valid ones that the
batcher joins it to, must fail alone with INVALID_ARGUMENT (HTTP 400) naming
the id. Finally a bad model source (wrong sha256) must exit non-zero with a
clear message in the termination log.

Usage: $(scripts/python-env.sh)/bin/python tests/python/inference/tritonclient_check.py \
           --worker target/debug/tandem-worker --models "$(scripts/fetch-models.sh)"
"""

import argparse
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from functools import partial

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

HERE = os.path.dirname(os.path.abspath(__file__))
FIX = os.path.join(HERE, "fixtures")
# Termination logs and configs of the workers started here; removed when the interpreter exits.
SCRATCH = tempfile.TemporaryDirectory(prefix="tandem-check-")


def start(worker, uri, name, base, extra=()):
    tl = tempfile.NamedTemporaryFile(dir=SCRATCH.name, delete=False)
    cmd = [worker, "inference", "--model-uri", uri, "--model-name", name, "--listen-address", "127.0.0.1",
           "--http-port", str(base), "--grpc-port", str(base + 1), "--metrics-port", str(base + 2),
           "--control-port", str(base + 3), "--cpu-threads", "2", "--termination-log", tl.name, *extra]
    p = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    return p, tl.name


def wait_ready(client, proc, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"worker exited early: {proc.stderr.read()}")
        try:
            if client.is_server_ready():
                return
        except Exception:
            pass
        time.sleep(0.2)
    raise SystemExit("worker not ready in time")


def stop(proc):
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=60)
    assert rc == 0, f"worker exit code {rc} after SIGTERM: {proc.stderr.read()}"


def cosine(a, b):
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def check_minilm(worker, models, base):
    fx = json.load(open(os.path.join(FIX, "minilm_embeddings.json")))["sentences"]
    proc, _ = start(worker, f"file://{models}/minilm", "minilm", base)
    g = grpcclient.InferenceServerClient(f"127.0.0.1:{base + 1}")
    h = httpclient.InferenceServerClient(f"127.0.0.1:{base}")
    try:
        wait_ready(g, proc)
        assert g.is_server_live() and h.is_server_live() and h.is_server_ready()
        assert g.is_model_ready("minilm") and h.is_model_ready("minilm")
        md = g.get_model_metadata("minilm", as_json=True)
        ins = [(i["name"], i["datatype"], [int(d) for d in i["shape"]]) for i in md["inputs"]]
        assert ins == [("input_ids", "INT64", [-1, -1]), ("attention_mask", "INT64", [-1, -1]),
                       ("token_type_ids", "INT64", [-1, -1])], ins
        outs = [(o["name"], o["datatype"], [int(d) for d in o["shape"]]) for o in md["outputs"]]
        assert outs == [("embedding", "FP32", [-1, 384])], outs
        hmd = h.get_model_metadata("minilm")
        assert [o["name"] for o in hmd["outputs"]] == ["embedding"]
        for mod, client in (("grpc", g), ("http", h)):
            for s in fx[:4]:
                ids = np.array([s["input_ids"]], dtype=np.int64)
                arrays = [ids, np.ones_like(ids), np.zeros_like(ids)]
                inputs = []
                for n, a in zip(["input_ids", "attention_mask", "token_type_ids"], arrays):
                    i = mod_input(mod, n, a)
                    inputs.append(i)
                out = client.infer("minilm", inputs, outputs=[mod_output(mod, "embedding")])
                emb = out.as_numpy("embedding")
                assert emb.shape == (1, 384), emb.shape
                c = cosine(emb[0], np.array(s["embedding"]))
                assert c >= 0.9999, (mod, s["text"], c)
            # Compressed requests, as tritonclient sends them when asked to.
            s = fx[0]
            ids = np.array([s["input_ids"]], dtype=np.int64)
            inputs = [mod_input(mod, n, a) for n, a in
                      zip(["input_ids", "attention_mask", "token_type_ids"], [ids, np.ones_like(ids), np.zeros_like(ids)])]
            for algorithm in ("gzip", "deflate"):
                kw = ({"compression_algorithm": algorithm} if mod == "grpc"
                      else {"request_compression_algorithm": algorithm})
                out = client.infer("minilm", inputs, outputs=[mod_output(mod, "embedding")], **kw)
                assert cosine(out.as_numpy("embedding")[0], np.array(s["embedding"])) >= 0.9999, (mod, algorithm)
            json_too = ""
            if mod == "http":
                # Values as JSON both ways (tritonclient's binary_data=False).
                inputs = [mod_input(mod, n, a, binary=False) for n, a in
                          zip(["input_ids", "attention_mask", "token_type_ids"], [ids, np.ones_like(ids), np.zeros_like(ids)])]
                out = client.infer("minilm", inputs, outputs=[mod_output(mod, "embedding", binary=False)])
                assert cosine(out.as_numpy("embedding")[0], np.array(s["embedding"])) >= 0.9999
                json_too = ", JSON data both ways too"
            print(f"minilm via {mod}: metadata ok, 4 sentences cosine >= 0.9999, gzip and deflate requests too{json_too}")
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{base + 2}/metrics").read().decode()
        assert "tandem_inference_requests_total" in metrics, metrics[:400]
        print("metrics ok")
    finally:
        stop(proc)
    print("minilm: SIGTERM -> exit 0")


def mod_input(mod, name, arr, binary=True):
    """An input; over HTTP `binary=False` sends its values as JSON instead of binary data."""
    m = grpcclient if mod == "grpc" else httpclient
    dt = {np.int64: "INT64", np.uint8: "UINT8", np.float32: "FP32"}[arr.dtype.type]
    i = m.InferInput(name, list(arr.shape), dt)
    if mod == "http":
        i.set_data_from_numpy(arr, binary_data=binary)
    else:
        i.set_data_from_numpy(arr)
    return i


def mod_output(mod, name, binary=True):
    if mod == "http":
        return httpclient.InferRequestedOutput(name, binary_data=binary)
    return grpcclient.InferRequestedOutput(name)


def check_efficientnet(worker, models, base):
    fx = json.load(open(os.path.join(FIX, "efficientnet_chelsea.json")))
    img = np.fromfile(os.path.join(FIX, "chelsea_224_u8.nchw"), dtype=np.uint8).reshape(1, 3, 224, 224)
    proc, _ = start(worker, f"file://{models}/efficientnet-lite0/model.safetensors", "effnet", base,
                    ["--image-input", "uint8"])
    g = grpcclient.InferenceServerClient(f"127.0.0.1:{base + 1}")
    h = httpclient.InferenceServerClient(f"127.0.0.1:{base}")
    try:
        wait_ready(g, proc)
        md = g.get_model_metadata("effnet", as_json=True)
        assert md["inputs"][0]["name"] == "input" and md["inputs"][0]["datatype"] == "UINT8"
        assert [int(d) for d in md["inputs"][0]["shape"]] == [-1, 3, 224, 224]
        assert md["outputs"][0]["name"] == "logits" and [int(d) for d in md["outputs"][0]["shape"]] == [-1, 1000]
        mean = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]
        std = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]
        f32 = ((img.astype(np.float32) / 255.0 - mean) / std).astype(np.float32)
        for mod, client in (("grpc", g), ("http", h)):
            # Over HTTP the UINT8 pixels also go as JSON numbers, and the logits come back so.
            sends = [(img, True), (f32, True)] + ([(img, False)] if mod == "http" else [])
            for arr, binary in sends:
                out = client.infer("effnet", [mod_input(mod, "input", arr, binary)],
                                   outputs=[mod_output(mod, "logits", binary)])
                logits = out.as_numpy("logits")[0]
                top5 = list(np.argsort(-logits)[:5])
                assert top5 == fx["top5"], (mod, binary, top5)
                assert np.max(np.abs(logits - np.array(fx["logits"]))) < 2e-3
            also = ", UINT8 as JSON numbers too" if mod == "http" else ""
            print(f"efficientnet via {mod}: UINT8 and FP32 top-5 {top5} match the reference{also}")
    finally:
        stop(proc)


def batches_of_several(base):
    """Batches of two rows or more the worker has run, from its batch-size histogram."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{base + 2}/metrics").read().decode()
    value = {}
    for line in text.splitlines():
        if line.startswith('tandem_inference_batch_size_bucket{le="1.0"}'):
            value["one"] = float(line.split()[-1])
        elif line.startswith("tandem_inference_batch_size_count"):
            value["all"] = float(line.split()[-1])
    return value["all"] - value["one"]


def check_bad_input_fails_alone(worker, models, base):
    fx = json.load(open(os.path.join(FIX, "minilm_embeddings.json")))["sentences"]
    # A 300 ms batching window, so requests sent together are joined into one batch.
    proc, _ = start(worker, f"file://{models}/minilm", "minilm", base, ["--max-delay-ms", "300"])
    g = grpcclient.InferenceServerClient(f"127.0.0.1:{base + 1}")
    h = httpclient.InferenceServerClient(f"127.0.0.1:{base}")

    def inputs(mod, ids):
        ids = np.array([ids], dtype=np.int64)
        return [mod_input(mod, n, a) for n, a in
                zip(["input_ids", "attention_mask", "token_type_ids"], [ids, np.ones_like(ids), np.zeros_like(ids)])]

    # A copy of the first sentence (9 tokens): the same length bucket as the three valid ones.
    bad_ids = list(fx[0]["input_ids"])
    bad_ids[1] = 999999
    try:
        wait_ready(g, proc)
        before = batches_of_several(base)
        answers = queue.Queue()
        sent = [("good", s) for s in fx[:3]] + [("bad", None)]
        for kind, s in sent:
            ids = s["input_ids"] if s else bad_ids
            # tritonclient calls back with keyword arguments `result` and `error`.
            g.async_infer("minilm", inputs("grpc", ids),
                          partial(lambda kind, s, result, error: answers.put((kind, s, result, error)), kind, s),
                          outputs=[mod_output("grpc", "embedding")])
        got = [answers.get(timeout=30) for _ in sent]
        assert batches_of_several(base) > before, "the four requests were not batched together"
        for kind, s, result, error in got:
            if kind == "good":
                assert error is None, f"a valid request failed beside the bad one: {error}"
                c = cosine(result.as_numpy("embedding")[0], np.array(s["embedding"]))
                assert c >= 0.9999, (s["text"], c)
            else:
                assert error is not None and error.status() == "StatusCode.INVALID_ARGUMENT", error
                assert "input_ids value 999999 at [0, 1] is outside the vocabulary" in error.message(), error.message()
        print("bad token id in a batch: INVALID_ARGUMENT for it alone, the three valid requests answered")
        try:
            h.infer("minilm", inputs("http", bad_ids))
            raise AssertionError("HTTP accepted a token id outside the vocabulary")
        except InferenceServerException as e:
            assert e.status() == "400" and "999999" in e.message(), (e.status(), e.message())
        try:
            g.infer("minilm", inputs("grpc", [101] * 600))
            raise AssertionError("gRPC accepted 600 tokens")
        except InferenceServerException as e:
            assert e.status() == "StatusCode.INVALID_ARGUMENT", e
            assert "sequence length 600 exceeds the model's maximum of 512" in e.message(), e.message()
        out = g.infer("minilm", inputs("grpc", fx[0]["input_ids"]), outputs=[mod_output("grpc", "embedding")])
        assert cosine(out.as_numpy("embedding")[0], np.array(fx[0]["embedding"])) >= 0.9999
        print("HTTP 400 for the bad id, INVALID_ARGUMENT for 600 tokens; the next valid request answered")
    finally:
        stop(proc)


def check_bad_source(worker, models, base):
    proc, tl = start(worker, f"file://{models}/minilm", "minilm", base, ["--model-sha256", "0" * 64])
    rc = proc.wait(timeout=60)
    msg = open(tl).read()
    assert rc != 0, "worker with a wrong sha256 must exit non-zero"
    assert "sha256 mismatch" in msg, msg
    print(f"wrong sha256: exit {rc}, termination message: {msg}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", required=True)
    ap.add_argument("--models", required=True)
    ap.add_argument("--base-port", type=int, default=18700)
    a = ap.parse_args()
    check_minilm(a.worker, a.models, a.base_port)
    check_efficientnet(a.worker, a.models, a.base_port + 10)
    check_bad_input_fails_alone(a.worker, a.models, a.base_port + 30)
    check_bad_source(a.worker, a.models, a.base_port + 20)
    print("tritonclient check: all ok")


if __name__ == "__main__":
    sys.exit(main())
