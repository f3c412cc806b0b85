"""Steady load for the demo's live model swap: sentences to a text pipeline at a fixed rate
over OIP v2 gRPC (tritonclient), until a stop file appears; prints requests, failures and
latency percentiles at the end. Open loop: a slow answer does not delay the next request.

    python demo/load.py --address 10.244.0.5:8001 --model minilm --rate 10 --stop-file /tmp/stop
"""

import argparse
import os
import sys
import threading
import time

import numpy as np
import tritonclient.grpc as grpcclient


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", required=True)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--rate", type=float, default=10.0, help="requests per second")
    parser.add_argument("--stop-file", required=True, help="stop once this file exists")
    parser.add_argument("--max-seconds", type=float, default=600.0)
    args = parser.parse_args()

    client = grpcclient.InferenceServerClient(args.address)
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()

    def done(sent: float, result, error) -> None:
        with lock:
            if error is not None:
                failures.append(str(error))
            elif result.as_numpy("embedding") is None:
                failures.append("no embedding in the answer")
            else:
                latencies.append((time.monotonic() - sent) * 1e3)

    start = time.monotonic()
    n = 0
    while not os.path.exists(args.stop_file) and time.monotonic() - start < args.max_seconds:
        text = grpcclient.InferInput("TEXT", [1], "BYTES")
        text.set_data_from_numpy(np.array([f"request {n}: a cat on a warm windowsill".encode()], dtype=np.object_))
        sent = time.monotonic()
        client.async_infer(
            args.model, [text], callback=lambda result, error, s=sent: done(s, result, error)
        )
        n += 1
        next_at = start + n / args.rate
        time.sleep(max(0.0, next_at - time.monotonic()))
    time.sleep(2.0)  # let the last answers arrive
    with lock:
        ok = sorted(latencies)
        pct = lambda p: ok[min(len(ok) - 1, int(len(ok) * p))] if ok else float("nan")
        print(f"load: {n} requests over {time.monotonic() - start:.0f} s, {len(failures)} failed, "
              f"p50 {pct(0.50):.1f} ms, p99 {pct(0.99):.1f} ms")
        for f in failures[:5]:
            print(f"  failure: {f}")
        return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
