#!/usr/bin/env python3
"""Text pipeline end to end at one fixed offered rate: the peer, Tandem over REST
and Tandem over gRPC take turns in front of one inference worker (MiniLM, one
CPU thread, the serving benchmark's settings and cores). For each run it prints
the latency percentiles and the batches the inference worker ran (count, mean
size, from its tandem_inference_batch_size histogram), one JSON line per run.

    "$(scripts/python-env.sh)/bin/python" bench/serving/fixed_rate.py \\
        --venv "$(scripts/python-env.sh)" --bin-dir target/release --rate 111.7

--bin-dir holds tandem-worker and tandem-loadgen (bench/serving/run.sh builds
them); give another build's directory to compare inference workers.
"""

import argparse
import json
import pathlib
import re
import sys
import tempfile
import time
import urllib.request

import run as R


def batch_histogram(port):
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()

    def value(name):
        m = re.search(rf"^tandem_inference_batch_size_{name} (\S+)$", text, re.M)
        if m is None:
            raise RuntimeError(f"tandem_inference_batch_size_{name} missing from the inference worker's /metrics")
        return float(m.group(1))

    return value("sum"), value("count")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--venv", required=True, help="the project virtualenv (scripts/python-env.sh)")
    ap.add_argument("--bin-dir", required=True, help="tandem-worker and tandem-loadgen")
    ap.add_argument("--models", default=str(pathlib.Path.home() / ".cache/tandem/models"))
    ap.add_argument("--rate", type=float, required=True, help="offered requests per second")
    ap.add_argument("--seconds", type=float, default=15)
    ap.add_argument("--rounds", type=int, default=1)
    a = ap.parse_args()

    venv, bins = pathlib.Path(a.venv), pathlib.Path(a.bin_dir)
    model_dir = pathlib.Path(a.models) / "minilm"
    tokenizer = str(model_dir / "tokenizer.json")
    P = R.PORTS
    with tempfile.TemporaryDirectory(prefix="tandem-fixed-rate-") as tmp:
        sentences = pathlib.Path(tmp) / "sentences.txt"
        sentences.write_text("\n".join(R.SENTENCES) + "\n")
        load = R.Load(str(bins / "tandem-loadgen"), "minilm", ["--lines", str(sentences)])
        endpoint = f"127.0.0.1:{P['inf_grpc']}"

        def tandem():
            cfg = R.tandem_config(tmp, "text", "minilm", endpoint, tokenizer)
            return R.Server("tandem-text", [str(bins / "tandem-worker"), "preprocess", "--config", str(cfg),
                                            "--bind", "127.0.0.1"], env={"RUST_LOG": "warn"})

        def peer():
            env = {"PEER_PIPELINE": "text", "PEER_MODEL": "minilm", "PEER_INFERENCE": endpoint,
                   "PEER_INFER_MODEL": "minilm", "PEER_TOKENIZER": tokenizer, "OMP_NUM_THREADS": "1",
                   "PYTHONDONTWRITEBYTECODE": "1"}
            return R.Server("peer-text", [str(venv / "bin/uvicorn"), "--app-dir", str(R.HERE), "peer:app",
                                          "--host", "127.0.0.1", "--port", str(P["peer"]), "--workers", "2",
                                          "--loop", "uvloop", "--http", "httptools", "--no-access-log",
                                          "--log-level", "warning"], env=env)

        inference = R.Server("inference-text", [
            str(bins / "tandem-worker"), "inference", "--model-uri", f"file://{model_dir}", "--model-name", "minilm",
            "--listen-address", "127.0.0.1", "--grpc-port", str(P["inf_grpc"]), "--http-port", str(P["inf_http"]),
            "--metrics-port", str(P["inf_metrics"]), "--control-port", str(P["inf_control"]), "--cpu-threads", "1",
            "--max-batch-size", "32", "--max-delay-ms", "2", "--max-queue-depth", "4096",
            "--termination-log", str(pathlib.Path(tmp) / "termination-log")],
            env={"RUST_LOG": "warn"}, core=R.CORE_OTHER).start()
        t_http, t_grpc = f"http://127.0.0.1:{P['tandem_http']}", f"grpc://127.0.0.1:{P['tandem_grpc']}"
        p_http = f"http://127.0.0.1:{P['peer']}"
        try:
            R.wait_http(f"http://127.0.0.1:{P['inf_http']}/v2/health/ready", 300, inference)
            for rnd in range(a.rounds):
                for who, make, ready_url, target in [("peer", peer, p_http, p_http),
                                                     ("tandem-http", tandem, t_http, t_http),
                                                     ("tandem-grpc", tandem, t_http, t_grpc)]:
                    server = make().start()
                    try:
                        R.wait_http(ready_url + "/v2/health/ready", server=server)
                        load.run(target, 20, 2, "warm-up")
                        s0, c0 = batch_histogram(P["inf_metrics"])
                        r = load.run(target, a.rate, a.seconds, who)
                        s1, c1 = batch_histogram(P["inf_metrics"])
                    finally:
                        server.stop()
                    print(json.dumps({"round": rnd, "who": who, "offered_rps": a.rate, "ok": r["ok"],
                                      "errors": r["errors"], "p50_ms": r["p50_ms"], "p90_ms": r.get("p90_ms"),
                                      "p99_ms": r["p99_ms"], "batches": c1 - c0,
                                      "mean_batch": (s1 - s0) / max(c1 - c0, 1)}), flush=True)
        finally:
            inference.stop()
            for s in list(R.LIVE):
                s.stop()


if __name__ == "__main__":
    sys.exit(main())
