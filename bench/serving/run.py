#!/usr/bin/env python3
"""Serving-layer benchmark: Tandem's preprocess worker vs the FastAPI peer
(peer.py), both in front of the same Tandem inference worker, for the image
pipeline (1920x1080 JPEG -> EfficientNet-Lite0) and the text pipeline
(sentences -> all-MiniLM-L6-v2). Prints every measurement and the ratios in
one run, writes results.json and PNG plots. Run through run.sh, which builds
the release binaries and finds the virtualenv.

Cores (taskset): the serving layer under test (Tandem or the peer) on CORE_SERVING,
the inference worker (or the stub) and the load generator on CORE_OTHER. All
traffic is on 127.0.0.1; every run is bounded in time and request count.

Phases per pipeline:
  1. stub inference (answers zeros at once): max sustainable rate of each
     serving layer alone on one core, and its CPU time per request;
  2. real inference worker: max sustainable rate end to end; p50/p99/p99.9 at
     25/50/75 % of the peer's max, serving-layer CPU ms per request;
  3. peak RSS (VmHWM, summed over the serving layer's processes);
  4. cold start: exec -> first successful inference answer (3 times);
then deployable size (stripped binary vs the peer's Python environment).
"""

import argparse
import io
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parents[2]
HERE = pathlib.Path(__file__).resolve().parent
CORE_SERVING, CORE_OTHER = "0", "1"
CLK = os.sysconf("SC_CLK_TCK")
# Below the kernel's ephemeral range (32768+), where the load generator's own
# client sockets would otherwise collide with a server's bind.
PORTS = dict(tandem_http=24100, tandem_grpc=24101, tandem_metrics=24102, tandem_control=24103,
             peer=24110, inf_grpc=24120, inf_http=24121, inf_metrics=24122, inf_control=24123, stub=24130)
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Kubernetes schedules pods onto nodes that have enough free resources.",
    "A sentence embedding maps text to a fixed-size vector.",
    "Hello world",
    "Rust gives you memory safety without a garbage collector.",
    "The preprocessing around a model is often slower than the model itself.",
    "She sells sea shells by the sea shore, and the shells she sells are surely sea shells.",
    "Latency at the 99th percentile matters more than the average for interactive services.",
    "Tokenizers split text into word pieces that the model knows.",
    "What is the weather like in Paris in the spring?",
    "Batching requests together keeps the accelerator busy.",
    "An open-loop load generator sends requests at a fixed rate regardless of responses.",
    "Blue-green deployments keep the old version ready for an instant rollback.",
    "Cats sleep for most of the day.",
    "Throughput per core is the number that decides how many machines you pay for.",
    "The inference worker batches requests from many preprocess pods.",
]


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- processes

def proc_tree(pid):
    """pid and all its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            kids = pathlib.Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            kids = []
        todo.extend(int(k) for k in kids)
    return out


def cpu_seconds(pids):
    total = 0.0
    for p in pids:
        try:
            f = pathlib.Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(f[11]) + int(f[12])) / CLK  # utime + stime
        except OSError:
            pass
    return total


def peak_rss_mib(pids):
    total = 0
    for p in pids:
        try:
            for line in pathlib.Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


LIVE = []  # servers started and not yet stopped; stopped on any exit


def port_free(port):
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


class Server:
    def __init__(self, name, argv, env=None, core=CORE_SERVING):
        self.name = name
        self.argv = ["taskset", "-c", core, *argv]
        self.env = {**os.environ, **(env or {})}
        self.proc = None
        self.started_ns = None

    def start(self):
        self.logf = open(tempfile.gettempdir() + f"/tandem-bench-{self.name}.log", "w")
        self.started_ns = time.time_ns()
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=self.logf, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        LIVE.append(self)
        return self

    def pids(self):
        return proc_tree(self.proc.pid)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self in LIVE:
            LIVE.remove(self)
        self.proc = None


def wait_http(url, timeout=120, server=None):
    end = time.time() + timeout
    while time.time() < end:
        if server is not None and server.proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited with {server.proc.returncode}; see its log in {tempfile.gettempdir()}")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except Exception:
            time.sleep(0.05)
    raise RuntimeError(f"{url} not ready after {timeout}s")


# ---------------------------------------------------------------- load

class Load:
    def __init__(self, loadgen, model, items_args):
        self.loadgen, self.model, self.items_args = loadgen, model, items_args

    def run(self, target, rate, seconds, label=""):
        argv = ["taskset", "-c", CORE_OTHER, self.loadgen, "run", "--target", target, "--model", self.model,
                *self.items_args, "--rate", f"{rate:.3f}", "--duration-s", str(seconds),
                "--max-requests", "200000", "--timeout-s", "20", "--label", label]
        out = subprocess.run(argv, check=True, capture_output=True, text=True, timeout=seconds + 60)
        return json.loads(out.stdout.strip().splitlines()[-1])

    def probe(self, target, since_ns):
        argv = ["taskset", "-c", CORE_OTHER, self.loadgen, "probe", "--target", target, "--model", self.model,
                *self.items_args, "--since-unix-ns", str(since_ns), "--give-up-s", "120"]
        return subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)


def sustainable(r, slo_ms):
    return (not r["errors"] and r["ok"] == r["scheduled"] and r["achieved_rps"] >= 0.95 * r["offered_rps"]
            and r["p99_ms"] is not None and r["p99_ms"] <= slo_ms)


def find_max(load, target, start, seconds, slo_ms, label, limit=100000.0, factor=1.35):
    """Raises the offered rate by `factor` until a run is not sustainable
    (errors, < 95 % of the offered rate achieved, or p99 over the SLO); then
    one bisection step between the last good and the first bad rate."""
    rate, best, runs = start, None, []
    while rate <= limit:
        r = load.run(target, rate, seconds, f"{label} ramp")
        runs.append(r)
        log(f"    {label:<22} {rate:9.1f} rps -> {r['achieved_rps']:9.1f} ok/s p99 {r['p99_ms']} ms errors {r['errors']}")
        if not sustainable(r, slo_ms):
            break
        best = rate
        rate *= factor
    if best is not None and rate <= limit:
        mid = (best + rate) / 2
        r = load.run(target, mid, seconds, f"{label} ramp")
        runs.append(r)
        log(f"    {label:<22} {mid:9.1f} rps -> {r['achieved_rps']:9.1f} ok/s p99 {r['p99_ms']} ms errors {r['errors']}")
        if sustainable(r, slo_ms):
            best = mid
    return best, runs


def measured(load, servers, target, rate, seconds, label):
    """One fixed-rate run plus the serving layer's CPU seconds per answered request."""
    pids = [p for s in servers for p in s.pids()]
    c0 = cpu_seconds(pids)
    r = load.run(target, rate, seconds, label)
    c1 = cpu_seconds(pids)
    r["serving_cpu_ms_per_req"] = (c1 - c0) * 1e3 / max(r["ok"], 1)
    log(f"    {label:<22} {rate:9.1f} rps: p50 {r['p50_ms']} p99 {r['p99_ms']} p99.9 {r['p999_ms']} ms,"
        f" {r['achieved_rps']} ok/s, errors {r['errors']}, serving CPU {r['serving_cpu_ms_per_req']:.3f} ms/req")
    return r


# ---------------------------------------------------------------- pipelines

def tandem_config(tmp, kind, model, endpoint, tokenizer):
    if kind == "image":
        pre = """  image:
    resize: {width: 224, height: 224, mode: CenterCrop, filter: Bilinear}
    layout: NCHW
    dtype: FP32
postprocess: {kind: Classification, topK: 5, labels: imagenet}"""
    else:
        pre = f"""  text: {{tokenizer: "{tokenizer}", maxLength: 256}}
postprocess: {{kind: Embedding}}"""
    text = f"""pipeline: bench-{kind}
model: {{name: {model}, version: "1"}}
preprocess:
{pre}
ports: {{http: {PORTS['tandem_http']}, grpc: {PORTS['tandem_grpc']}, metrics: {PORTS['tandem_metrics']}, control: {PORTS['tandem_control']}}}
limits: {{maxQueueDepth: 4096, cpuThreads: 1, maxHeldRequests: 4096}}
inferenceEndpoints: ["{endpoint}"]
"""
    path = pathlib.Path(tmp) / f"tandem-{kind}.yaml"
    path.write_text(text)
    return path


def make_images(tmp):
    import numpy as np
    import skimage.data
    from PIL import Image

    paths = []
    for name in ["chelsea", "astronaut", "coffee"]:
        src = Image.fromarray(getattr(skimage.data, name)()).convert("RGB").resize((1920, 1080), Image.LANCZOS)
        p = pathlib.Path(tmp) / f"{name}-1080p.jpg"
        src.save(p, "JPEG", quality=90)
        paths.append(p)
    del np
    return paths


def bench_pipeline(kind, a, tmp, out):
    venv = pathlib.Path(a.venv)
    models = pathlib.Path(a.models)
    worker = str(pathlib.Path(a.bin_dir) / "tandem-worker")
    loadgen = str(pathlib.Path(a.bin_dir) / "tandem-loadgen")
    if kind == "image":
        # Tandem forwards its own model name, so clients and inference share one.
        model, infer_model, model_dir = "efficientnet-lite0", "efficientnet-lite0", models / "efficientnet-lite0"
        output, width, batch = "logits", 1000, "8"
        items = [arg for p in make_images(tmp) for arg in ("--input", str(p))]
        tokenizer = ""
    else:
        model, infer_model, model_dir = "minilm", "minilm", models / "minilm"
        output, width, batch = "embedding", 384, "32"
        sent = pathlib.Path(tmp) / "sentences.txt"
        sent.write_text("\n".join(SENTENCES) + "\n")
        items = ["--lines", str(sent)]
        tokenizer = str(model_dir / "tokenizer.json")
    load = Load(loadgen, model, items)
    res = out.setdefault(kind, {})

    def tandem(endpoint):
        cfg = tandem_config(tmp, kind, model, endpoint, tokenizer)
        return Server("tandem-" + kind, [worker, "preprocess", "--config", str(cfg), "--bind", "127.0.0.1"],
                      env={"RUST_LOG": "warn"})

    def peer(endpoint, workers):
        env = {"PEER_PIPELINE": kind, "PEER_MODEL": model, "PEER_INFERENCE": endpoint, "PEER_INFER_MODEL": infer_model,
               "PEER_TOKENIZER": tokenizer, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
        return Server("peer-" + kind, [str(venv / "bin/uvicorn"), "--app-dir", str(HERE), "peer:app", "--host", "127.0.0.1",
                                       "--port", str(PORTS["peer"]), "--workers", str(workers), "--loop", "uvloop",
                                       "--http", "httptools", "--no-access-log", "--log-level", "warning"], env=env)

    T_HTTP = f"http://127.0.0.1:{PORTS['tandem_http']}"
    T_GRPC = f"grpc://127.0.0.1:{PORTS['tandem_grpc']}"
    P_HTTP = f"http://127.0.0.1:{PORTS['peer']}"

    def up(s, url):
        s.start()
        wait_http(url + "/v2/health/ready", server=s)
        time.sleep(0.2)
        if s.proc.poll() is not None:
            raise RuntimeError(f"{s.name} exited; is another server on its port?")
        # warm-up: a few requests at a low rate
        load.run(url if not url.startswith("grpc") else url, 5, 1, "warmup")
        return s

    def start_inference():
        inf = Server("inference-" + kind, [worker, "inference", "--model-uri", f"file://{model_dir}", "--model-name", infer_model,
                                           "--listen-address", "127.0.0.1", "--grpc-port", str(PORTS["inf_grpc"]),
                                           "--http-port", str(PORTS["inf_http"]), "--metrics-port", str(PORTS["inf_metrics"]),
                                           "--control-port", str(PORTS["inf_control"]), "--cpu-threads", "1",
                                           "--max-batch-size", batch, "--max-delay-ms", "2", "--max-queue-depth", "4096",
                                           "--termination-log", str(pathlib.Path(tmp) / "termination-log")],
                     env={"RUST_LOG": "warn"}, core=CORE_OTHER).start()
        wait_http(f"http://127.0.0.1:{PORTS['inf_http']}/v2/health/ready", 300, inf)
        return inf

    inf_ep = f"127.0.0.1:{PORTS['inf_grpc']}"
    if a.cold_start_only:
        inf = start_inference()
        workers = a.cold_start_workers
        res["peer_workers_cold_start"] = workers
        cold_start(kind, res, load, lambda: tandem(inf_ep), lambda: peer(inf_ep, workers), T_HTTP, P_HTTP)
        inf.stop()
        return

    # ---- phase 1: stub inference (serving layer alone)
    log(f"[{kind}] phase 1: serving layer alone (stub inference on core {CORE_OTHER})")
    stub = Server("stub", [loadgen, "stub", "--port", str(PORTS["stub"]), "--output", output, "--width", str(width)],
                  core=CORE_OTHER).start()
    time.sleep(0.5)
    stub_ep = f"127.0.0.1:{PORTS['stub']}"
    res["stub"] = {}
    for workers in a.peer_workers:
        s = up(peer(stub_ep, workers), P_HTTP)
        best, _ = find_max(load, P_HTTP, a.stub_start[kind], a.ramp_s, a.slo_ms, f"peer w={workers} stub")
        r = measured(load, [s], P_HTTP, (best or a.stub_start[kind]) * 0.5, a.level_s, f"peer w={workers} stub cpu")
        s.stop()
        res["stub"][f"peer_w{workers}"] = {"max_rps": best, "at_half": r}
    for proto, url in [("http", T_HTTP), ("grpc", T_GRPC)]:
        s = up(tandem(stub_ep), T_HTTP)
        load.run(url, 5, 1, "warmup")
        best, _ = find_max(load, url, a.stub_start[kind], a.ramp_s, a.slo_ms, f"tandem {proto} stub")
        r = measured(load, [s], url, (best or a.stub_start[kind]) * 0.5, a.level_s, f"tandem {proto} stub cpu")
        s.stop()
        res["stub"][f"tandem_{proto}"] = {"max_rps": best, "at_half": r}
    stub.stop()

    # ---- phase 2: real inference worker
    log(f"[{kind}] phase 2: end to end with the real inference worker (core {CORE_OTHER})")
    inf = start_inference()
    workers = res["stub"].get("best_peer_workers") or max(
        a.peer_workers, key=lambda w: res["stub"][f"peer_w{w}"]["max_rps"] or 0)
    res["peer_workers"] = workers
    log(f"[{kind}] peer uses {workers} uvicorn worker(s) (fastest with the stub)")

    s = up(peer(inf_ep, workers), P_HTTP)
    peer_max, _ = find_max(load, P_HTTP, a.e2e_start[kind], a.ramp_s, a.slo_ms, "peer e2e")
    res["e2e"] = {"peer_max_rps": peer_max, "levels": {}}
    peer_max = peer_max or a.e2e_start[kind]
    for frac in (0.25, 0.5, 0.75):
        res["e2e"]["levels"].setdefault(str(frac), {})["peer_http"] = measured(
            load, [s], P_HTTP, peer_max * frac, a.level_s, f"peer {int(frac * 100)}%")
    res["peak_rss_mib_peer"] = peak_rss_mib(s.pids())
    s.stop()

    s = up(tandem(inf_ep), T_HTTP)
    t_max, _ = find_max(load, T_HTTP, a.e2e_start[kind], a.ramp_s, a.slo_ms, "tandem http e2e")
    res["e2e"]["tandem_http_max_rps"] = t_max
    for frac in (0.25, 0.5, 0.75):
        lv = res["e2e"]["levels"][str(frac)]
        lv["tandem_http"] = measured(load, [s], T_HTTP, peer_max * frac, a.level_s, f"tandem http {int(frac * 100)}%")
        lv["tandem_grpc"] = measured(load, [s], T_GRPC, peer_max * frac, a.level_s, f"tandem grpc {int(frac * 100)}%")
    res["peak_rss_mib_tandem"] = peak_rss_mib(s.pids())
    s.stop()

    # ---- phase 4: cold start (inference already warm)
    cold_start(kind, res, load, lambda: tandem(inf_ep), lambda: peer(inf_ep, workers), T_HTTP, P_HTTP)
    inf.stop()


def cold_start(kind, res, load, make_tandem, make_peer, t_url, p_url, repeats=3):
    """exec -> first successful inference answer. The probe starts first and
    retries every millisecond, so its own start-up is not counted; it prints
    the wall-clock time of the first success."""
    log(f"[{kind}] cold start: exec -> first successful answer")
    res["cold_start_ms"] = {"tandem": [], "peer": []}
    for _ in range(repeats):
        for name, make, url in [("tandem", make_tandem, t_url), ("peer", make_peer, p_url)]:
            pr = load.probe(url, 0)
            time.sleep(0.5)
            s = make()
            s.start()
            got = json.loads(pr.communicate(timeout=180)[0].strip().splitlines()[-1])
            s.stop()
            ms = got["first_success_ms"] - s_started_ms(s)
            res["cold_start_ms"][name].append(ms)
            log(f"    {name}: {ms:.1f} ms ({got['tries']} tries)")


def s_started_ms(s):
    return s.started_ns / 1e6


def deploy_sizes(venv, bin_dir):
    worker = pathlib.Path(bin_dir) / "tandem-worker"
    stripped = pathlib.Path(tempfile.gettempdir()) / "tandem-worker.stripped"
    subprocess.run(["strip", "-o", str(stripped), str(worker)], check=True)
    code = r"""
import importlib.metadata as md, json, os, re, sys, sysconfig
roots = ["fastapi", "uvicorn", "uvloop", "httptools", "pillow", "numpy", "tokenizers", "tritonclient"]
extras = {"tritonclient": {"grpc"}}
seen, todo = {}, [(r, extras.get(r, set())) for r in roots]
while todo:
    name, want = todo.pop()
    key = re.sub(r"[-_.]+", "-", name).lower()
    if key in seen:
        continue
    try:
        d = md.distribution(name)
    except md.PackageNotFoundError:
        continue
    seen[key] = d
    for req in d.requires or []:
        m = re.match(r"([A-Za-z0-9_.\-]+)(\[[^\]]*\])?", req)
        marker = req.split(";", 1)[1] if ";" in req else ""
        if "extra" in marker and not any(f'extra == "{e}"' in marker or f"extra == '{e}'" in marker for e in want):
            continue
        if "sys_platform" in marker and "linux" not in marker and "!=" not in marker:
            continue
        sub = set(x.strip() for x in (m.group(2) or "[]")[1:-1].split(",") if x.strip())
        todo.append((m.group(1), sub))
size = 0
for d in seen.values():
    for f in d.files or []:
        p = d.locate_file(f)
        if os.path.isfile(p):
            size += os.path.getsize(p)
std = sysconfig.get_paths()["stdlib"]
# What a slim runtime image keeps of the standard library: no site-packages
# (counted above), no static libpython (config-*), tests, IDLE, Tk or ensurepip.
skip = {"site-packages", "test", "tests", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3"}
stdsize = 0
for r, dirs, fs in os.walk(std):
    dirs[:] = [d for d in dirs if d not in skip and not d.startswith("config-")]
    stdsize += sum(os.path.getsize(os.path.join(r, f)) for f in fs if os.path.isfile(os.path.join(r, f)))
exe = os.path.realpath(sys.executable)
libs = [os.path.realpath(os.path.join(sysconfig.get_config_var("LIBDIR") or "", sysconfig.get_config_var("LDLIBRARY") or ""))]
libsize = sum(os.path.getsize(l) for l in libs if os.path.isfile(l))
print(json.dumps({"packages": sorted(seen), "site_packages_bytes": size, "stdlib_bytes": stdsize,
                  "interpreter_bytes": os.path.getsize(exe) + libsize}))
"""
    py = json.loads(subprocess.check_output([str(pathlib.Path(venv) / "bin/python"), "-c", code], text=True))
    py["total_bytes"] = py["site_packages_bytes"] + py["stdlib_bytes"] + py["interpreter_bytes"]
    return {"tandem_binary_bytes": worker.stat().st_size, "tandem_stripped_bytes": stripped.stat().st_size, "python": py}


# ---------------------------------------------------------------- report

def ratio(a, b):
    return a / b if a and b else float("nan")


def _num(v):
    return float("nan") if v is None else v


def report(out):
    out = json.loads(json.dumps(out), parse_constant=float, object_hook=lambda d: {k: _num(v) if k.endswith("_ms") else v for k, v in d.items()})
    lines = []
    p = lines.append
    for kind in ("image", "text"):
        r = out.get(kind)
        if not r:
            continue
        st = r["stub"]
        w = r["peer_workers"]
        peer_stub = st[f"peer_w{w}"]
        p(f"\n== {kind}: serving layer alone (stub inference), one core ==")
        p(f"{'':28} {'max rps':>9} {'CPU ms/req':>11} {'req/s per core':>15}")
        rows = [(f"peer (uvicorn w={w})", peer_stub)] + [(f"Tandem {k}", st[f"tandem_{k}"]) for k in ("http", "grpc")]
        for name, v in rows:
            cpu = v["at_half"]["serving_cpu_ms_per_req"]
            p(f"{name:28} {v['max_rps'] or 0:9.1f} {cpu:11.3f} {1000 / cpu:15.1f}")
        pc = peer_stub["at_half"]["serving_cpu_ms_per_req"]
        for k in ("http", "grpc"):
            tc = st[f"tandem_{k}"]["at_half"]["serving_cpu_ms_per_req"]
            p(f"ratio Tandem {k} / peer: throughput/core (CPU) {pc / tc:.2f}x, max rps {ratio(st[f'tandem_{k}']['max_rps'], peer_stub['max_rps']):.2f}x")
        e = r["e2e"]
        p(f"\n== {kind}: end to end, real inference worker on core {CORE_OTHER} ==")
        p(f"max sustainable: peer {e['peer_max_rps']} rps, Tandem http {e['tandem_http_max_rps']} rps")
        p(f"{'load':>6} {'server':14} {'offered':>8} {'p50 ms':>8} {'p99 ms':>8} {'p99.9 ms':>9} {'CPU ms/req':>11}")
        for frac, lv in e["levels"].items():
            for name in ("peer_http", "tandem_http", "tandem_grpc"):
                v = lv[name]
                p(f"{int(float(frac) * 100):>5}% {name:14} {v['offered_rps']:8.1f} {v['p50_ms']:8.1f} {v['p99_ms']:8.1f} {v['p999_ms']:9.1f} {v['serving_cpu_ms_per_req']:11.3f}")
            pe, th = lv["peer_http"], lv["tandem_http"]
            p(f"       ratio peer/Tandem http: p99 {ratio(pe['p99_ms'], th['p99_ms']):.2f}x, p50 {ratio(pe['p50_ms'], th['p50_ms']):.2f}x, CPU/req {ratio(pe['serving_cpu_ms_per_req'], th['serving_cpu_ms_per_req']):.2f}x")
        p(f"peak RSS: peer {r['peak_rss_mib_peer']:.1f} MiB, Tandem {r['peak_rss_mib_tandem']:.1f} MiB "
          f"({(1 - r['peak_rss_mib_tandem'] / r['peak_rss_mib_peer']) * 100:.0f} % lower)")
        cs = r["cold_start_ms"]
        p(f"cold start to first answer (ms): peer {[round(x) for x in cs['peer']]}, Tandem {[round(x) for x in cs['tandem']]}; "
          f"median ratio {ratio(sorted(cs['peer'])[1], sorted(cs['tandem'])[1]):.1f}x")
    d = out.get("deploy")
    if d:
        py = d["python"]
        p(f"\n== deployable size ==\nTandem tandem-worker binary {d['tandem_binary_bytes'] / 2**20:.1f} MiB "
          f"(stripped {d['tandem_stripped_bytes'] / 2**20:.1f} MiB; serves both roles)")
        p(f"Python peer: site-packages {py['site_packages_bytes'] / 2**20:.1f} MiB ({len(py['packages'])} distributions) + stdlib "
          f"{py['stdlib_bytes'] / 2**20:.1f} MiB + interpreter {py['interpreter_bytes'] / 2**20:.1f} MiB = {py['total_bytes'] / 2**20:.1f} MiB "
          f"-> {py['total_bytes'] / d['tandem_stripped_bytes']:.1f}x the stripped binary")
    return "\n".join(lines)


def plots(out, dest):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing: no plots")
        return
    for kind in ("image", "text"):
        r = out.get(kind)
        if not r:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
        for name, style, color in [("peer_http", "o-", "tab:red"), ("tandem_http", "s-", "tab:blue"), ("tandem_grpc", "^-", "tab:green")]:
            xs = [lv[name]["offered_rps"] for lv in r["e2e"]["levels"].values()]
            ax.plot(xs, [lv[name]["p99_ms"] for lv in r["e2e"]["levels"].values()], style, color=color, label=f"{name} p99")
            ax.plot(xs, [lv[name]["p50_ms"] for lv in r["e2e"]["levels"].values()], style.replace("-", "--"), color=color,
                    alpha=0.5, label=f"{name} p50")
        ax.set_yscale("log")
        ax.set_xlabel("offered load (requests/s, open loop)")
        ax.set_ylabel("latency (ms)")
        ax.set_title(f"{kind} pipeline, same inference worker: latency vs offered load")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = pathlib.Path(dest) / f"serving-{kind}-latency.png"
        fig.savefig(path)
        log(f"wrote {path}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--venv", help="the project virtualenv (scripts/python-env.sh); required unless --report-only")
    ap.add_argument("--bin-dir", default=str(ROOT / "target/release"), help="tandem-worker and tandem-loadgen")
    ap.add_argument("--models", default=str(pathlib.Path.home() / ".cache/tandem/models"))
    ap.add_argument("--pipelines", default="image,text")
    ap.add_argument("--peer-workers", default="1,2")
    ap.add_argument("--ramp-s", type=float, default=6)
    ap.add_argument("--level-s", type=float, default=12)
    ap.add_argument("--slo-ms", type=float, default=1000, help="p99 above this = not sustainable")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--cold-start-only", action="store_true", help="only measure cold starts (into cold_start.json)")
    ap.add_argument("--cold-start-workers", type=int, default=2, help="uvicorn workers of the peer for --cold-start-only")
    ap.add_argument("--report-only", help="re-print the report and plots of a results.json")
    a = ap.parse_args()
    if a.report_only:
        out = json.loads(pathlib.Path(a.report_only).read_text())
        plots(out, pathlib.Path(a.report_only).parent)
        print(report(out))
        return
    if not a.venv:
        ap.error("--venv is required")
    a.peer_workers = [int(x) for x in a.peer_workers.split(",")]
    a.stub_start = {"image": 10.0, "text": 100.0}
    a.e2e_start = {"image": 2.0, "text": 10.0}
    outdir = pathlib.Path(a.out)
    outdir.mkdir(parents=True, exist_ok=True)
    out = {"started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "loadavg_start": os.getloadavg()}
    busy = [p for p in PORTS.values() if not port_free(p)]
    if busy:
        raise SystemExit(f"ports already in use (a previous run still alive?): {busy}")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for kind in a.pipelines.split(","):
                bench_pipeline(kind, a, tmp, out)
                (outdir / "results.partial.json").write_text(json.dumps(out, indent=1))
        finally:
            for srv in list(LIVE):
                srv.stop()
    if a.cold_start_only:
        (outdir / "cold_start.json").write_text(json.dumps(out, indent=1))
        print(json.dumps({k: v["cold_start_ms"] for k, v in out.items() if isinstance(v, dict) and "cold_start_ms" in v}))
        return
    out["deploy"] = deploy_sizes(a.venv, a.bin_dir)
    out["loadavg_end"] = os.getloadavg()
    (outdir / "results.json").write_text(json.dumps(out, indent=1))
    (outdir / "results.partial.json").unlink(missing_ok=True)
    text = report(out)
    (outdir / "report.txt").write_text(text + "\n")
    plots(out, outdir)
    print(text)


if __name__ == "__main__":
    main()
