#!/usr/bin/env python3
"""Image preprocessing benchmark (not a test): 1920x1080 JPEG -> 3x224x224
normalized FP32 tensor (resize shorter side + center crop, bilinear), on ONE
core, in the same run:

  - Tandem (worker/examples/bench_image.rs; pass its binary with --tandem)
  - Pillow + NumPy (full decode)
  - Pillow with draft-mode decode (JPEG DCT scaling) + NumPy
  - OpenCV (imdecode, INTER_AREA) + NumPy

Quality: PSNR of each method's 224x224 RGB8 output against a high-quality
reference (Pillow full decode, float Lanczos on the same crop box).

    $(scripts/python-env.sh)/bin/python bench/preprocess/bench_image.py \
        --tandem target/release/examples/bench_image [--cpu-time]

--cpu-time counts CPU time (rusage) instead of wall time, so other processes
preempting the pinned core (a shared machine) do not inflate either side.
"""

import argparse
import io
import os
import resource
import subprocess
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import skimage.data  # noqa: E402
from PIL import Image  # noqa: E402

cv2.setNumThreads(1)
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
W = H = 224


def make_jpeg():
    src = Image.fromarray(skimage.data.chelsea()).resize((1920, 1080), Image.LANCZOS)
    buf = io.BytesIO()
    src.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def box(sw, sh):
    scale = max(W / sw, H / sh)
    cw, ch = W / scale, H / scale
    l, t = (sw - cw) / 2, (sh - ch) / 2
    return (l, t, l + cw, t + ch)


def normalize(rgb):
    return np.ascontiguousarray(((rgb.astype(np.float32) / 255.0 - MEAN) / STD).transpose(2, 0, 1))


def pillow(data):
    img = Image.open(io.BytesIO(data)).convert("RGB")
    rgb = np.asarray(img.resize((W, H), Image.BILINEAR, box=box(*img.size)))
    return normalize(rgb), rgb


def pillow_draft(data):
    img = Image.open(io.BytesIO(data))
    img.draft("RGB", (W, H))  # largest DCT scale that keeps the image >= 224x224
    img = img.convert("RGB")
    rgb = np.asarray(img.resize((W, H), Image.BILINEAR, box=box(*img.size)))
    return normalize(rgb), rgb


def opencv(data):
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    sh, sw = bgr.shape[:2]
    l, t, r, b = box(sw, sh)
    crop = bgr[int(round(t)) : int(round(b)), int(round(l)) : int(round(r))]
    rgb = cv2.cvtColor(cv2.resize(crop, (W, H), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB)
    return normalize(rgb), rgb


def reference(data):
    img = Image.open(io.BytesIO(data)).convert("RGB")
    f = np.asarray(img, np.float32)
    chans = [np.asarray(Image.fromarray(f[..., c], "F").resize((W, H), Image.LANCZOS, box=box(*img.size))) for c in range(3)]
    return np.stack(chans, -1)


def psnr(a, ref):
    mse = np.mean((a.astype(np.float64) - ref.astype(np.float64)) ** 2)
    return 10 * np.log10(255.0**2 / mse)


def timeit(fn, data, iters, clock=time.perf_counter):
    fn(data)
    t = clock()
    for _ in range(iters):
        fn(data)
    return (clock() - t) * 1e3 / iters


def child_cpu_ms(cmd):
    """CPU time (user + system) of one child process run to completion, in ms."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.check_output(cmd).decode()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) * 1e3, out


def tandem_cpu_ms(cmd_for, policy, iters):
    """CPU ms/image of one policy: a run of `iters` iterations minus a run of 0
    (start-up, warm-up decode and the UINT8 output), so preemption by other
    processes on a shared machine does not count."""
    full, _ = child_cpu_ms(cmd_for(policy, iters))
    base, _ = child_cpu_ms(cmd_for(policy, 0))
    return (full - base) / iters


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tandem", help="path of the bench_image example binary")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument(
        "--cpu-time",
        action="store_true",
        help="time by CPU time (process/child rusage) instead of wall time: robust against other load on the pinned core",
    )
    a = ap.parse_args()
    clock = time.process_time if a.cpu_time else time.perf_counter
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    data = make_jpeg()
    ref = reference(data)
    rows = []
    for name, fn in [("Pillow + NumPy", pillow), ("Pillow draft + NumPy", pillow_draft), ("OpenCV INTER_AREA + NumPy", opencv)]:
        ms = timeit(fn, data, a.iters, clock)
        rows.append((name, ms, psnr(fn(data)[1], ref)))
    if a.tandem:
        labels = {"off": "Tandem, full decode", "quality": "Tandem, DCT 1/2 (Quality)", "fast": "Tandem, DCT draft (Fast, default)"}
        with tempfile.TemporaryDirectory() as d:
            jpg, out = os.path.join(d, "in.jpg"), os.path.join(d, "out")
            open(jpg, "wb").write(data)
            cpu = str(sorted(os.sched_getaffinity(0))[0])
            lines = subprocess.check_output(["taskset", "-c", cpu, a.tandem, jpg, str(a.iters), out]).decode().split("\n")
            for line in filter(None, lines):
                policy, ms = line.split()
                rgb = np.fromfile(f"{out}.{policy}.u8", np.uint8).reshape(H, W, 3)
                if a.cpu_time:
                    ms = tandem_cpu_ms(lambda p, n: ["taskset", "-c", cpu, a.tandem, jpg, str(n), out, p], policy, a.iters)
                rows.append((labels.get(policy, policy), float(ms), psnr(rgb, ref)))
    fastest_py = min(r[1] for r in rows if not r[0].startswith("Tandem"))
    print(f"{'method':32} {'CPU ms/image' if a.cpu_time else 'ms/image':>9} {'vs fastest Python':>18} {'PSNR dB':>8}")
    for name, ms, q in rows:
        print(f"{name:32} {ms:9.2f} {fastest_py / ms:17.2f}x {q:8.2f}")


if __name__ == "__main__":
    main()
