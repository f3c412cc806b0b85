#!/usr/bin/env python3
"""Generates the image-pipeline fixtures for `tandem-worker`'s tests.

Inputs are small synthetic images (deterministic NumPy RNG) in the formats and
colour modes the worker must handle; expected tensors are produced here,
independently of the Rust code, with Pillow (decode, EXIF transpose, convert to
RGB, resize with its antialiasing filters) and NumPy (normalize, layout).

Run from the repository root with the project venv:
    $(scripts/python-env.sh)/bin/python tests/python/preprocess/gen_image_fixtures.py
Output: worker/tests/fixtures/images/ (inputs, expected .bin tensors, manifest.json).
"""

import io
import json
import os
import struct

import numpy as np
from PIL import Image, ImageOps

OUT = os.path.join(os.path.dirname(__file__), "..", "..", "..", "worker", "tests", "fixtures", "images")
MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]
FILTERS = {"Bilinear": Image.BILINEAR, "Lanczos3": Image.LANCZOS}


def synthetic(w, h, seed):
    """Smooth gradients plus a few hard edges plus mild noise: exercises both
    the low-pass behaviour and the edge handling of the resize filters."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    r = 255 * (x / max(w - 1, 1))
    g = 255 * (y / max(h - 1, 1))
    b = 127 + 100 * np.sin(x / 5.0) * np.cos(y / 7.0)
    img = np.stack([r, g, b], axis=-1)
    img[h // 4 : h // 2, w // 3 : w // 2] = [250, 20, 30]
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def pillow_reference(img, w, h, mode, flt):
    img = ImageOps.exif_transpose(img)
    img = img.convert("RGB")
    sw, sh = img.size
    f = FILTERS[flt]
    if mode == "Stretch":
        return np.asarray(img.resize((w, h), f))
    if mode == "CenterCrop":
        scale = max(w / sw, h / sh)
        cw, ch = min(w / scale, sw), min(h / scale, sh)
        left, top = (sw - cw) / 2, (sh - ch) / 2
        return np.asarray(img.resize((w, h), f, box=(left, top, left + cw, top + ch)))
    if mode == "FitPad":
        scale = min(w / sw, h / sh)
        rw = min(max(int(round(sw * scale)), 1), w)
        rh = min(max(int(round(sh * scale)), 1), h)
        canvas = Image.new("RGB", (w, h), (0, 0, 0))
        canvas.paste(img.resize((rw, rh), f), ((w - rw) // 2, (h - rh) // 2))
        return np.asarray(canvas)
    raise ValueError(mode)


def to_tensor(rgb, layout, dtype):
    if dtype == "FP32":
        t = (rgb.astype(np.float32) / np.float32(255.0) - np.array(MEAN, np.float32)) / np.array(STD, np.float32)
        t = t.astype("<f4")
    else:
        t = rgb.astype(np.uint8)
    if layout == "NCHW":
        t = np.transpose(t, (2, 0, 1))
    return np.ascontiguousarray(t)


def exif_with_orientation(value):
    """A minimal little-endian TIFF/EXIF block holding only Orientation."""
    ifd = struct.pack("<HHHIHH", 1, 0x0112, 3, 1, value, 0) + struct.pack("<I", 0)
    return b"Exif\x00\x00" + b"II*\x00" + struct.pack("<I", 8) + ifd


def main():
    os.makedirs(OUT, exist_ok=True)
    base = Image.fromarray(synthetic(97, 61, 1), "RGB")
    inputs = {}

    def save(name, img, fmt, **kw):
        buf = io.BytesIO()
        img.save(buf, fmt, **kw)
        with open(os.path.join(OUT, name), "wb") as f:
            f.write(buf.getvalue())
        inputs[name] = buf.getvalue()

    save("rgb.png", base, "PNG")
    save("rgb.jpg", base, "JPEG", quality=92)
    save("gray.png", base.convert("L"), "PNG")
    rgba = base.copy()
    rgba.putalpha(Image.fromarray(np.tile(np.arange(97, dtype=np.uint8) * 2, (61, 1))))
    save("rgba.png", rgba, "PNG")
    save("cmyk.jpg", base.convert("CMYK"), "JPEG", quality=95)
    # Stored sideways; EXIF orientation 6 says "rotate 90° clockwise to view".
    save("exif6.jpg", base.transpose(Image.ROTATE_90), "JPEG", quality=92, exif=exif_with_orientation(6))
    save("rgb.webp", base, "WEBP", lossless=True)
    save("palette.png", base.convert("P", palette=Image.ADAPTIVE, colors=64), "PNG")

    cases = []
    plan = [
        ("rgb.png", 32, 24, "Stretch", "Bilinear", "NCHW", "FP32", 1),
        ("rgb.png", 24, 24, "CenterCrop", "Bilinear", "NCHW", "FP32", 1),
        # Lanczos: fast_image_resize's 16-bit fixed-point weights differ from
        # Pillow's 22-bit ones in the negative lobes, so a few pixels at hard
        # edges move more than one level (the test also checks that >= 98% of
        # values are within one level).
        ("rgb.png", 24, 24, "CenterCrop", "Lanczos3", "NHWC", "FP32", 8),
        ("rgb.png", 24, 24, "FitPad", "Bilinear", "NCHW", "UINT8", 1),
        ("rgb.png", 200, 150, "Stretch", "Lanczos3", "NHWC", "UINT8", 16),
        ("gray.png", 24, 24, "CenterCrop", "Bilinear", "NCHW", "FP32", 1),
        ("rgba.png", 24, 24, "CenterCrop", "Bilinear", "NCHW", "UINT8", 1),
        ("palette.png", 24, 24, "CenterCrop", "Bilinear", "NHWC", "UINT8", 1),
        ("rgb.webp", 24, 24, "CenterCrop", "Bilinear", "NCHW", "FP32", 1),
        # JPEG: Pillow decodes with libjpeg(-turbo), the worker with zune-jpeg;
        # the IDCT/upsampling differ by a few levels, hence the wider tolerance.
        ("rgb.jpg", 24, 24, "CenterCrop", "Bilinear", "NCHW", "FP32", 6),
        ("cmyk.jpg", 24, 24, "Stretch", "Bilinear", "NHWC", "UINT8", 8),
        ("exif6.jpg", 24, 32, "Stretch", "Bilinear", "NHWC", "UINT8", 6),
    ]
    for i, (name, w, h, mode, flt, layout, dtype, tol) in enumerate(plan):
        img = Image.open(io.BytesIO(inputs[name]))
        rgb = pillow_reference(img, w, h, mode, flt)
        tensor = to_tensor(rgb, layout, dtype)
        expected = f"case{i:02d}.bin"
        with open(os.path.join(OUT, expected), "wb") as f:
            f.write(tensor.tobytes())
        cases.append(
            {
                "input": name,
                "width": w,
                "height": h,
                "mode": mode,
                "filter": flt,
                "layout": layout,
                "dtype": dtype,
                "mean": MEAN,
                "std": STD,
                "expected": expected,
                "tolerancePixels": tol,
            }
        )
    with open(os.path.join(OUT, "manifest.json"), "w") as f:
        json.dump({"generator": "tests/python/preprocess/gen_image_fixtures.py", "cases": cases}, f, indent=1)
    print(f"wrote {len(cases)} cases to {os.path.normpath(OUT)}")


if __name__ == "__main__":
    main()
