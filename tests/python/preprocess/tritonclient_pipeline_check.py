#!/usr/bin/env python3
"""End-to-end check of the preprocess worker with unmodified tritonclient.

For each pipeline, starts on loopback a real `tandem-worker inference` (CPU) and
a `tandem-worker preprocess` forwarding to it (static endpoint), then drives the
preprocess worker with tritonclient.grpc and tritonclient.http:

- text (MiniLM): the reference sentences as one BYTES batch of mixed lengths;
  each embedding must match the sentence-transformers reference committed in
  tests/python/inference/fixtures (cosine >= 0.9999), so tokenization,
  dynamic padding and the attention mask are right end to end;
- image (EfficientNet-Lite0): scikit-image's chelsea as PNG and as JPEG; the
  top-5 labels and probabilities must match the same model fed Pillow's
  preprocessing of the same crop (sent straight to the inference worker), and
  the top class must be the PyTorch reference's;
- hostile inputs (truncated JPEG, zero bytes, a PNG header claiming
  100000x100000, invalid UTF-8, a wrong datatype, a wrong shape, a request over
  maxRequestBytes, an unknown output): each refused with INVALID_ARGUMENT over
  gRPC and 400 over HTTP, with a message naming the problem, and the next valid
  request answered;
- SIGTERM: every worker exits 0.

Usage: $(scripts/python-env.sh)/bin/python tests/python/preprocess/tritonclient_pipeline_check.py \
           --worker target/debug/tandem-worker --models "$(scripts/fetch-models.sh)"
"""

import argparse
import io
import json
import os
import struct
import subprocess
import sys
import tempfile
import zlib

import numpy as np
import skimage
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from PIL import Image
from tritonclient.utils import InferenceServerException

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "inference"))
sys.path.insert(0, HERE)
from gen_image_fixtures import pillow_reference  # noqa: E402
from tritonclient_check import FIX, SCRATCH, cosine, mod_input, mod_output, start, stop, wait_ready  # noqa: E402

# ImageNet class names of the PyTorch reference's top 5 for chelsea (fixtures/efficientnet_chelsea.json).
IMAGENET_NAMES = {281: "tabby", 282: "tiger cat", 285: "Egyptian cat", 287: "lynx", 782: "screen"}

# Kept small so that the oversized-request check sends little.
MAX_REQUEST_BYTES = 4 * 1024 * 1024


def start_preprocess(worker, config, base, inference_grpc_port):
    path = tempfile.NamedTemporaryFile("w", suffix=".json", dir=SCRATCH.name, delete=False)
    json.dump(config, path)
    path.close()
    cmd = [worker, "preprocess", "--config", path.name, "--bind", "127.0.0.1",
           "--inference-endpoint", f"127.0.0.1:{inference_grpc_port}",
           "--http-port", str(base), "--grpc-port", str(base + 1), "--metrics-port", str(base + 2),
           "--control-port", str(base + 3), "--cpu-threads", "2",
           "--shutdown-delay-seconds", "0", "--drain-seconds", "10"]
    return subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)


def clients(base):
    return (("grpc", grpcclient.InferenceServerClient(f"127.0.0.1:{base + 1}")),
            ("http", httpclient.InferenceServerClient(f"127.0.0.1:{base}")))


def bytes_input(mod, items, shape=None):
    m = grpcclient if mod == "grpc" else httpclient
    arr = np.array(items, dtype=np.object_)
    if shape is not None:
        arr = arr.reshape(shape)
    i = m.InferInput("INPUT", list(arr.shape), "BYTES")
    i.set_data_from_numpy(arr)
    return i


def expect_refused(mod, client, model, inputs, needle, outputs=None):
    """The request must fail with INVALID_ARGUMENT (gRPC) or 400 (HTTP) and a
    message containing `needle`."""
    try:
        client.infer(model, inputs, outputs=outputs)
    except InferenceServerException as e:
        want = "StatusCode.INVALID_ARGUMENT" if mod == "grpc" else "400"
        assert str(e.status()) == want, (mod, needle, e.status(), e.message())
        assert needle.lower() in e.message().lower(), (mod, needle, e.message())
        return e.message()
    raise AssertionError(f"{mod}: accepted a request that should name {needle!r}")


def text_config(models):
    return {
        "pipeline": "minilm",
        "model": {"name": "minilm", "version": "1"},
        "preprocess": {"text": {"tokenizer": f"{models}/minilm/tokenizer.json", "maxLength": 256}},
        "postprocess": {"kind": "Embedding"},
        "limits": {"maxRequestBytes": MAX_REQUEST_BYTES},
    }


def check_text(worker, models, base):
    fx = json.load(open(os.path.join(FIX, "minilm_embeddings.json")))["sentences"]
    texts = [s["text"].encode() for s in fx]
    ref = [np.array(s["embedding"]) for s in fx]
    inference, _ = start(worker, f"file://{models}/minilm", "minilm", base + 10)
    pre = start_preprocess(worker, text_config(models), base, base + 11)
    try:
        wait_ready(grpcclient.InferenceServerClient(f"127.0.0.1:{base + 11}"), inference)
        for mod, client in clients(base):
            wait_ready(client, pre)
            assert client.is_model_ready("minilm"), mod
            out = client.infer("minilm", [bytes_input(mod, texts)]).as_numpy("embedding")
            assert out.shape == (len(texts), 384), (mod, out.shape)
            worst = min(cosine(out[i], ref[i]) for i in range(len(texts)))
            assert worst >= 0.9999, (mod, worst)
            # [N, 1] is the other accepted shape.
            one = client.infer("minilm", [bytes_input(mod, texts[:2], (2, 1))]).as_numpy("embedding")
            assert min(cosine(one[i], ref[i]) for i in range(2)) >= 0.9999, mod
            print(f"text via {mod}: {len(texts)} sentences in one batch, worst cosine against "
                  f"sentence-transformers {worst:.6f}")
            # Compressed requests, as tritonclient sends them when asked to.
            for algorithm in ("gzip", "deflate"):
                kw = ({"compression_algorithm": algorithm} if mod == "grpc"
                      else {"request_compression_algorithm": algorithm})
                got = client.infer("minilm", [bytes_input(mod, texts)], **kw).as_numpy("embedding")
                assert min(cosine(got[i], ref[i]) for i in range(len(texts))) >= 0.9999, (mod, algorithm)
            print(f"text via {mod}: gzip and deflate requests answered")

            refusals = [
                ([bytes_input(mod, [b"ok \xff\xfe"])], "UTF-8", None),
                ([mod_input(mod, "INPUT", np.array([7], dtype=np.int64))], "BYTES", None),
                ([bytes_input(mod, [b"a", b"b"], (1, 2))], "shape", None),
                ([bytes_input(mod, [b"x" * (MAX_REQUEST_BYTES + 1)])], "bytes", None),
                ([bytes_input(mod, [b"fine"])], "nonexistent", [mod_output(mod, "nonexistent")]),
            ]
            for inputs, needle, outputs in refusals:
                msg = expect_refused(mod, client, "minilm", inputs, needle, outputs)
                after = client.infer("minilm", [bytes_input(mod, texts[:1])]).as_numpy("embedding")
                assert cosine(after[0], ref[0]) >= 0.9999, (mod, needle)
                print(f"text via {mod}: refused ({needle}): {msg[:110]}")
    finally:
        stop(pre)
        stop(inference)
    print("text: SIGTERM -> both workers exit 0")


def image_config():
    return {
        "pipeline": "efficientnet",
        "model": {"name": "efficientnet-lite0", "version": "1"},
        "preprocess": {"image": {
            "resize": {"width": 224, "height": 224, "mode": "CenterCrop", "filter": "Bilinear"},
            "layout": "NCHW", "dtype": "FP32"}},
        "postprocess": {"kind": "Classification", "topK": 5, "labels": "imagenet"},
        "limits": {"maxRequestBytes": MAX_REQUEST_BYTES},
    }


def encoded(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png_header_claiming(width, height):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def check_image(worker, models, base):
    fx = json.load(open(os.path.join(FIX, "efficientnet_chelsea.json")))
    chelsea = Image.fromarray(skimage.data.chelsea())
    png, jpeg = encoded(chelsea, "PNG"), encoded(chelsea, "JPEG", quality=95)
    model = "efficientnet-lite0"
    inference, _ = start(worker, f"file://{models}/efficientnet-lite0/model.safetensors", model,
                         base + 10)
    pre = start_preprocess(worker, image_config(), base, base + 11)
    try:
        direct = grpcclient.InferenceServerClient(f"127.0.0.1:{base + 11}")
        wait_ready(direct, inference)
        # The reference: Pillow's resize of the same crop box, sent straight to the model.
        crop = np.ascontiguousarray(
            np.transpose(pillow_reference(chelsea, 224, 224, "CenterCrop", "Bilinear"), (2, 0, 1)))
        ref_logits = direct.infer(model, [mod_input("grpc", "input", crop[None])]).as_numpy("logits")[0]
        ref_top5 = list(np.argsort(-ref_logits)[:5])
        ref_probs = softmax(ref_logits.astype(np.float64))[ref_top5]
        # A wider crop than torchvision's (short side to 224, not 256) swaps the first two cats.
        assert sorted(ref_top5) == sorted(fx["top5"]), (ref_top5, fx["top5"])
        for mod, client in clients(base):
            wait_ready(client, pre)
            for name, data in (("PNG", png), ("JPEG", jpeg)):
                res = client.infer(model, [bytes_input(mod, [data, data])])
                labels = res.as_numpy("labels")
                probs = res.as_numpy("probabilities")
                logits = res.as_numpy("logits")
                assert labels.shape == (2, 5) and probs.shape == (2, 5) and logits.shape == (2, 1000)
                top5 = list(np.argsort(-logits[0])[:5])
                assert top5[:3] == ref_top5[:3], (mod, name, top5, ref_top5)
                for j, k in enumerate(top5[:3]):
                    assert IMAGENET_NAMES[k] in labels[0][j].decode(), (mod, name, k, labels[0])
                assert np.allclose(probs[0], softmax(logits[0].astype(np.float64))[top5], atol=1e-5)
                diff = float(np.max(np.abs(probs[0][:3] - ref_probs[:3])))
                # PNG is decoded exactly, so only the resize's rounding differs from Pillow's
                # (within one level: worker/tests/image_fixtures.rs); one level up or down in a
                # tenth of the pixels moves these probabilities by up to 0.008. JPEG adds its
                # compression loss.
                assert diff < (0.02 if name == "PNG" else 0.05), (mod, name, probs[0], ref_probs)
                assert np.array_equal(logits[0], logits[1]), (mod, name)
                print(f"image via {mod}, {name}: top-5 {[l.decode() for l in labels[0]]}, "
                      f"probabilities within {diff:.4f} of Pillow's preprocessing")

            wrong_type = mod_input(mod, "INPUT", np.array([1.0], dtype=np.float32))
            refusals = [
                ([bytes_input(mod, [jpeg[: len(jpeg) // 2]])], "truncated"),
                ([bytes_input(mod, [b""])], "empty"),
                ([bytes_input(mod, [png_header_claiming(100_000, 100_000)])], "100000x100000"),
                ([bytes_input(mod, [b"not an image at all"])], "format"),
                ([wrong_type], "BYTES"),
                ([bytes_input(mod, [png] * (MAX_REQUEST_BYTES // len(png) + 1))], "bytes"),
            ]
            for inputs, needle in refusals:
                msg = expect_refused(mod, client, model, inputs, needle)
                after = client.infer(model, [bytes_input(mod, [png])]).as_numpy("labels")
                assert IMAGENET_NAMES[ref_top5[0]] in after[0][0].decode(), (mod, needle, after)
                print(f"image via {mod}: refused ({needle}): {msg[:110]}")
    finally:
        stop(pre)
        stop(inference)
    print("image: SIGTERM -> both workers exit 0")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", required=True)
    ap.add_argument("--models", required=True)
    ap.add_argument("--base-port", type=int, default=18800)
    a = ap.parse_args()
    check_text(a.worker, a.models, a.base_port)
    check_image(a.worker, a.models, a.base_port + 20)
    print("preprocess tritonclient check: all ok")


if __name__ == "__main__":
    sys.exit(main())
