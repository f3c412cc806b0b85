#!/usr/bin/env python3
"""Runs the operator against pipelines that already exist and reports how it did.

Used by bench/operator/run.sh. Progress is followed with two kubectl *watches* (pipelines and
Deployments) rather than by listing: a list of 1,000 pipelines and 2,000 Deployments every
couple of seconds would load the API server the benchmark is measuring. The watches start, and
have delivered the initial pipeline list, before the operator does.

    measure.py --namespace NS --pipelines N --log FILE [--max-wait S] [--create-s S] -- CMD...
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time


def watch(cmd, on_line):
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    def pump():
        for line in proc.stdout:
            on_line(line.rstrip("\n"))

    threading.Thread(target=pump, daemon=True).start()
    return proc


def proc_kib(pid, path, key):
    try:
        with open(f"/proc/{pid}/{path}") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


IDLE_S = 120  # seconds of idle CPU measured after the STEADY_S restart


def cpu_s(pid):
    """User + system CPU seconds the process has used."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def stop(proc):
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def pct(d, p):
    return d[min(len(d) - 1, int(round(p / 100 * (len(d) - 1))))] if d else float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--namespace", required=True)
    ap.add_argument("--pipelines", type=int, required=True)
    ap.add_argument("--log", required=True)
    ap.add_argument("--max-wait", type=float, default=1800)
    ap.add_argument("--create-s", type=float, default=float("nan"))
    ap.add_argument("--steady-s", type=float, default=0,
                    help="after the run, start a second operator on the reconciled pipelines and "
                         "report its memory after this many seconds (0: skip)")
    ap.add_argument("--smaps-out", help="copy the operator's /proc/<pid>/smaps here at the end")
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    n, ns = a.pipelines, a.namespace

    lock = threading.Lock()
    seen, statused, deployments = set(), set(), set()

    def on_pipeline(line):
        fields = line.split()
        if not fields:
            return
        with lock:
            seen.add(fields[0])
            if len(fields) > 1 and fields[1] != "<none>":
                statused.add(fields[0])

    def on_deployment(line):
        if line.strip():
            with lock:
                deployments.add(line.strip())

    watchers = [
        watch(
            # (custom-columns, not jsonpath: over 500 objects kubectl lists in chunks and
            # its jsonpath printer then sees one List, not the items)
            ["kubectl", "get", "ipl", "-n", ns, "--watch", "--no-headers", "-o",
             "custom-columns=NAME:.metadata.name,GENERATION:.status.observedGeneration"],
            on_pipeline,
        ),
        watch(
            ["kubectl", "get", "deployments", "-n", ns, "--watch", "--no-headers", "-o",
             "custom-columns=NAME:.metadata.name"],
            on_deployment,
        ),
    ]
    deadline = time.monotonic() + 120
    while True:
        with lock:
            if len(seen) >= n:
                break
        if time.monotonic() > deadline:
            sys.exit(f"[bench] the pipeline watch listed {len(seen)}/{n} pipelines in 120 s")
        time.sleep(0.1)

    print("[bench] starting the operator", file=sys.stderr)
    log = open(a.log, "w")
    t0 = time.monotonic()
    op = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    peak_sampled = 0
    complete = False
    while True:
        peak_sampled = max(peak_sampled, proc_kib(op.pid, "status", "VmRSS"))
        with lock:
            done, deps = len(statused), len(deployments)
        if done >= n and deps >= 2 * n:
            complete = True
            break
        if op.poll() is not None:
            sys.exit(f"[bench] the operator exited with {op.returncode}; see {a.log}")
        if time.monotonic() - t0 > a.max_wait:
            print(f"[bench] INCOMPLETE after {a.max_wait:.0f} s: {done}/{n} statuses, "
                  f"{deps}/{2 * n} Deployments", file=sys.stderr)
            break
        time.sleep(0.1)
    t1 = time.monotonic()
    time.sleep(5)  # let follow-up reconciles (owned-object events) finish before reading memory
    hwm = proc_kib(op.pid, "status", "VmHWM")
    rss_end = proc_kib(op.pid, "status", "VmRSS")
    anon_end = proc_kib(op.pid, "smaps_rollup", "Anonymous")
    cpu = cpu_s(op.pid)
    if a.smaps_out:
        try:
            with open(f"/proc/{op.pid}/smaps") as src, open(a.smaps_out, "w") as dst:
                dst.write(src.read())
        except OSError as e:
            print(f"[bench] could not copy smaps: {e}", file=sys.stderr)
    stop(op)
    steady = None
    if a.steady_s > 0:
        # The same operator, restarted with every pipeline already reconciled: its memory is
        # the caches' steady state, without the first-reconcile burst.
        with open(a.log + ".restart", "w") as rlog:
            # The chart's log level, not the debug level the latency figures above need: the
            # idle CPU below should be what a deployed operator spends.
            env = {**os.environ, "RUST_LOG": "info,kube=warn,tower=warn,hyper=warn"}
            again = subprocess.Popen(cmd, stdout=rlog, stderr=subprocess.STDOUT, env=env)
            time.sleep(a.steady_s)
            steady = (proc_kib(again.pid, "status", "VmHWM"), proc_kib(again.pid, "status", "VmRSS"),
                      proc_kib(again.pid, "smaps_rollup", "Anonymous"))
            # Idle cost: CPU over the next 120 s, with nothing new to reconcile (the router,
            # rollout driver and autoscaler still pass over every pipeline each tick, and
            # not-ready pipelines are re-reconciled every 60 s: two such waves fall inside).
            before = cpu_s(again.pid)
            time.sleep(IDLE_S)
            idle_cpu = (cpu_s(again.pid) - before) / IDLE_S
            stop(again)
    for w in watchers:
        w.terminate()
    log.close()
    events = subprocess.run(
        ["kubectl", "get", "events", "-n", ns, "--no-headers",
         "--field-selector", "involvedObject.kind=InferencePipeline"],
        capture_output=True, text=True, check=False,
    ).stdout.count("\n")

    durations, queued = [], []
    with open(a.log) as f:
        for line in f:
            try:
                e = json.loads(line)
            except ValueError:
                continue
            if e.get("message") == "reconcile finished" and "duration_ms" in e:
                durations.append(float(e["duration_ms"]))
                queued.append(float(e.get("queued_ms", "nan")))
    durations.sort()
    queued.sort()
    print(f"pipelines:                 {n}")
    print(f"create (kubectl apply):    {a.create_s:.1f} s")
    print(f"pipelines with status:     {len(statused)}/{n}")
    verdict = "" if complete else " (INCOMPLETE)"
    print(f"all reconciled after:      {t1 - t0:.1f} s{verdict} (operator start -> every pipeline "
          "has 2 Deployments and status)")
    print(f"operator peak RSS (VmHWM): {hwm / 1024:.1f} MiB (sampled {peak_sampled / 1024:.1f})")
    print(f"operator RSS at end:       {rss_end / 1024:.1f} MiB ({anon_end / 1024:.1f} MiB "
          f"anonymous, {(rss_end - anon_end) / 1024:.1f} MiB file-backed)")
    if steady:
        print(f"restarted, after {a.steady_s:.0f} s:  peak {steady[0] / 1024:.1f} MiB, now "
              f"{steady[1] / 1024:.1f} MiB ({steady[2] / 1024:.1f} MiB anonymous); "
              f"then idle: {idle_cpu * 100:.1f} % of a core over {IDLE_S} s")
    print(f"operator CPU time:         {cpu:.1f} s (user + system, start to end)")
    print(f"reconciles:                {len(durations)}")
    print(f"Events about pipelines:    {events}")
    print(f"reconcile p50/p90/p99/max: {pct(durations, 50):.1f} / {pct(durations, 90):.1f} / "
          f"{pct(durations, 99):.1f} / {durations[-1] if durations else float('nan'):.1f} ms")
    print(f"waited for a slot p50/p99/max: {pct(queued, 50):.1f} / {pct(queued, 99):.1f} / "
          f"{queued[-1] if queued else float('nan'):.1f} ms (not part of the reconcile time)")
    sys.exit(0 if complete else 1)


if __name__ == "__main__":
    main()
