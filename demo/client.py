"""Tandem demo client: talks to the preprocess stage with the stock Triton client.

Sends a few sentences to the text pipeline and prints their cosine similarity table,
then sends a cat photo (scikit-image's chelsea.png) to the image pipeline and prints
the top-5 ImageNet classes. Uses OIP v2 over gRPC, so any KServe/Triton client works.

    python demo/client.py --text 10.244.0.5:8001 --text-model minilm \
                          --image 10.244.0.6:8001 --image-model efficientnet
"""

import argparse
import io
import sys

import numpy as np
import tritonclient.grpc as grpcclient

SENTENCES = [
    "A cat sits on the warm windowsill.",
    "A kitten is sleeping in the sun by the window.",
    "The stock market fell sharply on Monday.",
    "Shares dropped at the start of the week.",
    "Tandem moves the serving hot path to Rust.",
]


def bytes_input(name: str, items: list[bytes]) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, [len(items)], "BYTES")
    tensor.set_data_from_numpy(np.array(items, dtype=np.object_))
    return tensor


def text_demo(address: str, model: str) -> None:
    client = grpcclient.InferenceServerClient(address)
    meta = client.get_model_metadata(model)
    print(f"model {meta.name} (versions {list(meta.versions)}), outputs: "
          + ", ".join(f"{o.name} {o.datatype} {list(o.shape)}" for o in meta.outputs))
    result = client.infer(model, [bytes_input("TEXT", [s.encode() for s in SENTENCES])])
    emb = result.as_numpy("embedding")
    print(f"embeddings: {emb.shape[0]} x {emb.shape[1]} (L2-normalized)")
    sims = emb @ emb.T
    print("\ncosine similarity")
    for i, s in enumerate(SENTENCES):
        row = " ".join(f"{v:5.2f}" for v in sims[i])
        print(f"  [{i}] {row}   {s}")


def image_demo(address: str, model: str) -> None:
    from skimage import data  # ships chelsea.png, a photo of a cat
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(data.chelsea()).save(buf, format="JPEG", quality=95)
    client = grpcclient.InferenceServerClient(address)
    result = client.infer(model, [bytes_input("IMAGE", [buf.getvalue()])])
    probs = result.as_numpy("probabilities")[0]
    labels = result.as_numpy("labels")[0]
    print("\nchelsea.png (a tabby cat) top-5:")
    for p, label in zip(probs, labels):
        text = label.decode() if isinstance(label, bytes) else str(label)
        print(f"  {p:6.3f}  {text}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", help="host:port of a text pipeline's preprocess gRPC")
    parser.add_argument("--text-model", default="minilm")
    parser.add_argument("--image", help="host:port of an image pipeline's preprocess gRPC")
    parser.add_argument("--image-model", default="efficientnet")
    args = parser.parse_args()
    if args.text:
        text_demo(args.text, args.text_model)
    if args.image:
        image_demo(args.image, args.image_model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
