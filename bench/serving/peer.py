"""The Python peer of Tandem's preprocess worker, written the way a competent
Python team would write it: FastAPI on uvicorn (uvloop + httptools), Pillow
(with JPEG draft-mode decode) + NumPy for images, Hugging Face `tokenizers`
for text, and the *same* Tandem inference worker called over OIP v2 gRPC with
`tritonclient.grpc.aio`. It accepts the same OIP v2 REST request as Tandem
(`POST /v2/models/{name}/infer`, JSON or the binary tensor extension) and
answers the same outputs as Tandem's post-processing (embedding pass-through,
or softmax top-k with ImageNet labels plus the logits) as JSON.

Configured by environment variables (one process per uvicorn worker):
  PEER_PIPELINE      image | text
  PEER_MODEL         model name clients use (default: the pipeline name)
  PEER_INFERENCE     host:port of the inference worker's gRPC endpoint
  PEER_INFER_MODEL   model name at the inference worker
  PEER_TOKENIZER     tokenizer.json (text)
  PEER_MAX_LENGTH    truncation (text, default 256)
  PEER_LABELS        labels file, one per line (image; default: Tandem's ImageNet list)
  PEER_TOP_K         top-k (image, default 5)

    uvicorn --app-dir bench/serving peer:app --host 127.0.0.1 --port 8100 --workers 1 \\
        --loop uvloop --http httptools --no-access-log
"""

import io
import json
import os
import pathlib

import numpy as np
import tritonclient.grpc.aio as grpcclient
from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from PIL import Image

PIPELINE = os.environ.get("PEER_PIPELINE", "text")
MODEL = os.environ.get("PEER_MODEL", PIPELINE)
INFERENCE = os.environ.get("PEER_INFERENCE", "127.0.0.1:8001")
INFER_MODEL = os.environ.get("PEER_INFER_MODEL", MODEL)
TOP_K = int(os.environ.get("PEER_TOP_K", "5"))
ROOT = pathlib.Path(__file__).resolve().parents[2]

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
SIZE = 224

app = FastAPI()
state = {}


@app.on_event("startup")
async def startup():
    state["client"] = grpcclient.InferenceServerClient(url=INFERENCE)
    if PIPELINE == "text":
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(os.environ["PEER_TOKENIZER"])
        tok.no_padding()  # MiniLM's tokenizer.json pads to 128: pad per batch instead
        tok.enable_truncation(int(os.environ.get("PEER_MAX_LENGTH", "256")))
        state["tok"] = tok
    else:
        path = os.environ.get("PEER_LABELS", str(ROOT / "worker/data/imagenet_labels.txt"))
        state["labels"] = np.array([l.strip() for l in open(path) if l.strip()], dtype=object)


def parse_items(body: bytes, header_len: int | None) -> list[bytes]:
    """The single BYTES input of an OIP v2 REST request, as a list of elements."""
    if header_len is None:
        header = json.loads(body)
        inp = header["inputs"][0]
        data = inp["data"]
        return [d.encode() if isinstance(d, str) else bytes(d) for d in data]
    header = json.loads(body[:header_len])
    inp = header["inputs"][0]
    if inp.get("datatype") != "BYTES":
        raise HTTPException(400, "expected one BYTES input")
    raw = memoryview(body)[header_len:]
    items, off = [], 0
    while off < len(raw):
        n = int.from_bytes(raw[off : off + 4], "little")
        items.append(bytes(raw[off + 4 : off + 4 + n]))
        off += 4 + n
    return items


def preprocess_images(items: list[bytes]) -> np.ndarray:
    out = np.empty((len(items), 3, SIZE, SIZE), np.float32)
    for i, data in enumerate(items):
        img = Image.open(io.BytesIO(data))
        img.draft("RGB", (SIZE, SIZE))  # JPEG DCT-domain downscale, as fast Pillow code does
        img = img.convert("RGB")
        w, h = img.size
        scale = max(SIZE / w, SIZE / h)
        cw, ch = SIZE / scale, SIZE / scale
        box = ((w - cw) / 2, (h - ch) / 2, (w + cw) / 2, (h + ch) / 2)
        rgb = np.asarray(img.resize((SIZE, SIZE), Image.BILINEAR, box=box), np.float32)
        out[i] = ((rgb / 255.0 - MEAN) / STD).transpose(2, 0, 1)
    return out


def tokenize(items: list[bytes]):
    enc = state["tok"].encode_batch([t.decode("utf-8") for t in items])
    length = max(len(e.ids) for e in enc)
    ids = np.zeros((len(enc), length), np.int64)
    mask = np.zeros_like(ids)
    types = np.zeros_like(ids)
    for i, e in enumerate(enc):
        n = len(e.ids)
        ids[i, :n] = e.ids
        mask[i, :n] = e.attention_mask
        types[i, :n] = e.type_ids
    return ids, mask, types


def tensor(name, array, datatype):
    t = grpcclient.InferInput(name, list(array.shape), datatype)
    t.set_data_from_numpy(array)
    return t


@app.get("/v2/health/ready")
async def ready():
    return {"ready": True}


@app.post("/v2/models/{name}/infer")
async def infer(name: str, request: Request):
    if name != MODEL:
        raise HTTPException(404, f"unknown model {name}")
    body = await request.body()
    hl = request.headers.get("inference-header-content-length")
    try:
        items = parse_items(body, int(hl) if hl is not None else None)
    except (ValueError, KeyError, IndexError) as e:
        raise HTTPException(400, f"bad request: {e}") from e
    if not items:
        raise HTTPException(400, "no items")
    client = state["client"]
    try:
        if PIPELINE == "text":
            ids, mask, types = tokenize(items)
            result = await client.infer(
                INFER_MODEL,
                [tensor("input_ids", ids, "INT64"), tensor("attention_mask", mask, "INT64"), tensor("token_type_ids", types, "INT64")],
            )
            emb = result.as_numpy("embedding")
            outputs = [{"name": "embedding", "datatype": "FP32", "shape": list(emb.shape), "data": emb.ravel().tolist()}]
        else:
            batch = await run_in_threadpool(preprocess_images, items)
            result = await client.infer(INFER_MODEL, [tensor("input", batch, "FP32")])
            logits = result.as_numpy("logits")
            z = logits - logits.max(axis=1, keepdims=True)
            p = np.exp(z)
            p /= p.sum(axis=1, keepdims=True)
            k = min(TOP_K, p.shape[1])
            top = np.argsort(-p, axis=1)[:, :k]
            probs = np.take_along_axis(p, top, axis=1)
            labels = state["labels"][top]
            outputs = [
                {"name": "probabilities", "datatype": "FP32", "shape": list(probs.shape), "data": probs.ravel().tolist()},
                {"name": "labels", "datatype": "BYTES", "shape": list(labels.shape), "data": labels.ravel().tolist()},
                {"name": "logits", "datatype": "FP32", "shape": list(logits.shape), "data": logits.ravel().tolist()},
            ]
    except UnicodeDecodeError as e:
        raise HTTPException(400, f"invalid UTF-8: {e}") from e
    except (OSError, Image.DecompressionBombError) as e:  # Pillow: not an image / truncated
        raise HTTPException(400, f"bad image: {e}") from e
    return Response(json.dumps({"model_name": MODEL, "outputs": outputs}), media_type="application/json")


@app.exception_handler(HTTPException)
async def http_error(_, exc: HTTPException):
    return JSONResponse({"error": exc.detail}, status_code=exc.status_code)
