#!/usr/bin/env python3
"""Writes seed images for `worker/examples/fuzz_image.rs` into the directory given.

The seeds cover what the image pipeline decodes differently: baseline JPEG with 4:2:0, 4:2:2
and 4:4:4 sampling, progressive, grayscale, CMYK, an EXIF-rotated one, a small one (decoded
at full size whatever the draft policy), PNG (RGB and RGBA) and WebP. The large ones are
1280x853, so that 1/2- and 1/4-scale JPEG draft decoding runs.

Run from the repository root with the project venv:
    $(scripts/python-env.sh)/bin/python tests/python/preprocess/gen_fuzz_seeds.py SEED_DIR
"""

import io
import os
import sys

import skimage.data
from PIL import Image


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: gen_fuzz_seeds.py SEED_DIR")
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    small = Image.fromarray(skimage.data.chelsea())  # 451x300 RGB
    big = small.resize((1280, 853), Image.BICUBIC)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    seeds = {
        "420.jpg": (big, dict(format="JPEG", quality=85)),
        "422.jpg": (big, dict(format="JPEG", quality=85, subsampling=1)),
        "444.jpg": (big, dict(format="JPEG", quality=90, subsampling=0)),
        "progressive.jpg": (big, dict(format="JPEG", quality=80, progressive=True)),
        "gray.jpg": (big.convert("L"), dict(format="JPEG", quality=85)),
        "cmyk.jpg": (big.convert("CMYK"), dict(format="JPEG", quality=80)),
        "exif6.jpg": (big, dict(format="JPEG", quality=80, exif=exif.tobytes())),
        "small.jpg": (small, dict(format="JPEG", quality=75)),
        "rgb.png": (small, dict(format="PNG")),
        "rgba.png": (small.convert("RGBA"), dict(format="PNG")),
        "rgb.webp": (small, dict(format="WEBP", quality=80)),
    }
    for name, (img, opts) in seeds.items():
        buf = io.BytesIO()
        img.save(buf, **opts)
        with open(os.path.join(out, name), "wb") as f:
            f.write(buf.getvalue())
    print(f"{len(seeds)} seeds in {out}")


if __name__ == "__main__":
    main()
