//! Tier 4: the queue-depth autoscaler with real workers on the local cluster. One
//! EfficientNet-Lite0 image pipeline (CPU), models served over HTTP by `tests/kube/cluster
//! serve`, the operator as a local process with short windows, real requests from tritonclient:
//!
//! 1. the inference stage starts at zero (`replicas.min: 0`); a first request is held by the
//!    preprocess pod while the operator scales inference from zero, then served;
//! 2. a load step raises both stages' desired replicas within 3 s (measured from the load's
//!    start to the ScaledUp Events' `eventTime`, printed);
//! 3. load removed → ScaledDown after the scale-down window; then ScaledToZero after the idle
//!    window, and the Deployment really goes to zero pods;
//! 4. requests after scale-to-zero are held and served again, even though the preprocess pod
//!    holding them is deleted while it holds them (it drains: the operator still polls it and
//!    pushes it the new inference endpoint), and its replacement serves new requests;
//!
//! and no request fails anywhere.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use serde_json::Value;
use tandem_e2e::{Cluster, Operator, WorkerTest, script_output, wait_until};

/// The pipeline's name.
const PIPELINE: &str = "effnet";
/// Its model's name, which clients name at the preprocess front door too.
const MODEL: &str = "efficientnet-lite0";
/// Scale-down window and idle window given to the operator: short, so the test is quick.
const SCALE_DOWN_WINDOW_S: u64 = 6;
const SCALE_TO_ZERO_AFTER_S: u64 = 10;
/// Where the issue draws the line for reacting to a load step.
const REACTION_LIMIT_S: f64 = 3.0;

// ---- helpers of this file ----

/// The operator for this test: the shared e2e one, with short autoscaler windows.
fn start_operator(cluster: &Cluster, ns: &str) -> Operator {
    Operator::start_with(
        cluster,
        ns,
        "autoscaling-e2e",
        &[
            "--autoscale-interval=1s".to_owned(),
            format!("--scale-down-window={SCALE_DOWN_WINDOW_S}s"),
            format!("--scale-to-zero-after={SCALE_TO_ZERO_AFTER_S}s"),
        ],
    )
}

fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Seconds since the Unix epoch of an RFC 3339 UTC time such as `2026-11-23T17:01:02.123456Z`.
fn parse_utc(s: &str) -> Option<f64> {
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.split(':');
    let (hh, mm) = (
        t.next()?.parse::<i64>().ok()?,
        t.next()?.parse::<i64>().ok()?,
    );
    let ss: f64 = t.next()?.parse().ok()?;
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + hh * 3600 + mm * 60) as f64 + ss)
}

/// A scale Event the autoscaler published.
#[derive(Debug, Clone)]
struct ScaleEvent {
    reason: String,
    note: String,
    at: f64,
}

fn scale_events(cluster: &Cluster, ns: &str) -> anyhow::Result<Vec<ScaleEvent>> {
    let list = cluster.get_json(&["events.events.k8s.io", "-n", ns])?;
    let mut out: Vec<ScaleEvent> = list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["action"] == "Scale")
        .filter_map(|e| {
            Some(ScaleEvent {
                reason: e["reason"].as_str()?.to_owned(),
                note: e["note"].as_str()?.to_owned(),
                at: parse_utc(e["eventTime"].as_str()?)?,
            })
        })
        .collect();
    out.sort_by(|a, b| a.at.total_cmp(&b.at));
    Ok(out)
}

/// The first Event with `reason` for `stage` at or after `since`.
fn first_event(
    cluster: &Cluster,
    ns: &str,
    reason: &str,
    stage: &str,
    since: f64,
    timeout: Duration,
) -> anyhow::Result<ScaleEvent> {
    let prefix = format!("{stage}: ");
    wait_until(&format!("a {reason} Event for {stage}"), timeout, || {
        Ok(scale_events(cluster, ns)?
            .into_iter()
            .find(|e| e.reason == reason && e.note.starts_with(&prefix) && e.at >= since))
    })
}

fn stage_status(cluster: &Cluster, ns: &str, stage: &str) -> anyhow::Result<Value> {
    let p = cluster.get_json(&["ipl", PIPELINE, "-n", ns])?;
    Ok(p["status"][stage].clone())
}

fn deployment_replicas(cluster: &Cluster, ns: &str, name: &str) -> anyhow::Result<i64> {
    let d = cluster.get_json(&["deployment", name, "-n", ns])?;
    Ok(d["spec"]["replicas"].as_i64().unwrap_or(-1))
}

/// The load generator: `concurrency` threads, each with its own tritonclient gRPC client,
/// send `batch` PNGs of `side`×`side` pixels per request until `seconds` have passed (or
/// `requests` requests in total when given). Prints one JSON line with the outcome.
///
/// The PNG is smooth, so it is small on the wire (about 80 kB at 4000 px) while its decode
/// and resize cost what its pixels cost: PNG has no decode-time downscaling.
const LOADGEN: &str = r#"
import io, json, sys, threading, time
import numpy as np
from PIL import Image
import tritonclient.grpc as grpcclient

address, model = sys.argv[1], sys.argv[2]
concurrency, seconds, requests, batch, side = (int(x) for x in sys.argv[3:8])
y, x = np.mgrid[0:side, 0:side]
pixels = np.stack([x * 255 // side, y * 255 // side, (x // 7 + y // 5) % 256], -1)
png = io.BytesIO()
Image.fromarray(pixels.astype(np.uint8)).save(png, "PNG")
image = png.getvalue()
lock = threading.Lock()
ok, failed, errors, latencies, sent = 0, 0, [], [], 0
start = time.time()
deadline = start + seconds

def worker():
    global ok, failed, sent
    client = grpcclient.InferenceServerClient(address)
    while True:
        with lock:
            if (requests and sent >= requests) or (not requests and time.time() >= deadline):
                return
            sent += 1
        t = grpcclient.InferInput("IMAGE", [batch], "BYTES")
        t.set_data_from_numpy(np.array([image] * batch, dtype=np.object_))
        t0 = time.time()
        try:
            r = client.infer(model, [t], client_timeout=120)
            assert r.as_numpy("logits").shape == (batch, 1000)
            with lock:
                ok += 1
                latencies.append(time.time() - t0)
        except Exception as e:  # counted and reported, never hidden
            with lock:
                failed += 1
                errors.append(str(e)[:300])

threads = [threading.Thread(target=worker) for _ in range(concurrency)]
for th in threads: th.start()
for th in threads: th.join()
latencies.sort()
print(json.dumps({
    "start": start, "end": time.time(), "ok": ok, "failed": failed, "errors": errors[:5],
    "max_latency_s": latencies[-1] if latencies else None,
    "p50_latency_s": latencies[len(latencies) // 2] if latencies else None,
}))
"#;

struct Load {
    child: Child,
}

impl Load {
    fn start(
        address: &str,
        concurrency: u32,
        seconds: u32,
        requests: u32,
        batch: u32,
        side: u32,
    ) -> anyhow::Result<Load> {
        let venv = script_output("scripts/python-env.sh", &[])?;
        let script = std::env::temp_dir().join("tandem-autoscaling-loadgen.py");
        std::fs::write(&script, LOADGEN)?;
        let child = Command::new(PathBuf::from(venv).join("bin/python"))
            .arg(&script)
            .args([address, MODEL])
            .args([concurrency, seconds, requests, batch, side].map(|n| n.to_string()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting the load generator")?;
        Ok(Load { child })
    }

    /// Whether it is still sending or waiting for answers.
    fn running(&mut self) -> anyhow::Result<bool> {
        Ok(self.child.try_wait()?.is_none())
    }

    fn finish(self) -> anyhow::Result<Value> {
        let out = self.child.wait_with_output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text.lines().last().unwrap_or_default();
        serde_json::from_str(line).with_context(|| format!("load generator output: {text}"))
    }
}

/// No request of `result` failed and at least one succeeded; the operator's log tail is in the
/// message otherwise.
fn assert_no_failures(op: &Operator, what: &str, result: &Value) {
    assert_eq!(
        result["failed"].as_u64(),
        Some(0),
        "{what}: requests failed: {result}\n{}",
        op.log_tail()
    );
    assert!(
        result["ok"].as_u64().unwrap_or(0) > 0,
        "{what}: no request succeeded: {result}\n{}",
        op.log_tail()
    );
}

#[test]
fn inference_scales_from_zero_both_stages_follow_a_load_step_and_idle_goes_back_to_zero_without_failed_requests()
-> anyhow::Result<()> {
    // The namespace is deleted (with everything in it) when `t` drops.
    let t = WorkerTest::start("autoscale")?;
    let (cluster, ns) = (&t.cluster, t.namespace.name().to_owned());
    let (base, sha) = (&t.models.base, &t.models.efficientnet_sha256);

    let op = start_operator(cluster, &ns);
    let manifest = format!(
        r#"
apiVersion: tandem.dev/v1alpha1
kind: InferencePipeline
metadata: {{name: {PIPELINE}, namespace: {ns}}}
spec:
  preprocess:
    image:
      resize: {{width: 224, height: 224, mode: CenterCrop, filter: Bilinear}}
      normalize: {{mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225]}}
    replicas: {{min: 1, max: 3}}
    targetQueueDepth: 2
    resources: {{requests: {{cpu: 10m, memory: 64Mi}}}}
  inference:
    model:
      name: {MODEL}
      version: "1"
      uri: "{base}/efficientnet-lite0/model.safetensors"
      sha256: {sha}
    device: CPU
    batching: {{maxBatchSize: 16, maxDelay: 2ms}}
    replicas: {{min: 0, max: 3}}
    targetQueueDepth: 4
    resources: {{requests: {{cpu: 10m, memory: 64Mi}}}}
"#
    );
    cluster.apply(&manifest)?;
    let check = |r: anyhow::Result<()>| -> anyhow::Result<()> {
        r.map_err(|e| anyhow::anyhow!("{e:#}\n{}", op.log_tail()))
    };

    // 1. Inference starts at zero; the first request is held, then served.
    let address = cluster.ready_preprocess_address(&ns, PIPELINE)?;
    check(wait_until(
        "inference desiredReplicas 0",
        Duration::from_secs(30),
        || Ok((stage_status(cluster, &ns, "inference")?["desiredReplicas"] == 0).then_some(())),
    ))?;
    assert_eq!(
        deployment_replicas(cluster, &ns, &format!("{PIPELINE}-inference-blue"))?,
        0
    );
    let cold = Load::start(&address, 1, 0, 1, 1, 64)?.finish()?;
    assert_no_failures(&op, "first request against zero inference pods", &cold);
    let from_zero = first_event(
        cluster,
        &ns,
        "ScaledFromZero",
        "inference",
        cold["start"].as_f64().unwrap_or(0.0),
        Duration::from_secs(10),
    )?;
    println!(
        "zero → one: ScaledFromZero {:.2} s after the first request; that request took {:.2} s \
         (held while the pod started and loaded the model): {}",
        from_zero.at - cold["start"].as_f64().unwrap_or(0.0),
        cold["max_latency_s"].as_f64().unwrap_or(f64::NAN),
        from_zero.note
    );

    // Let the first scale settle (window) so the step below starts from one pod per stage.
    check(wait_until(
        "one ready inference pod",
        Duration::from_secs(120),
        || {
            let p = cluster.worker_pods(&ns, PIPELINE, "inference")?;
            Ok((p.len() == 1 && p[0].ready).then_some(()))
        },
    ))?;

    // 2. A load step: 8 clients, batches of 8 PNGs of 4000×4000. Decoding and resizing them
    //    keeps the preprocess pod's threads busy, so its queue builds at once; the inference
    //    stage sees that backlog fed forward before its own queue builds. The images are that
    //    large so that preprocess stays the slower stage for the whole step: at 1600 px the
    //    requests soon waited at inference instead, and preprocess scaled back to one pod
    //    while the load still ran.
    let step = Load::start(&address, 8, 25, 0, 8, 4000)?;
    let (pre_up_at, inf_up_at): (f64, f64);
    let load = {
        // Wait for the reactions while the load runs.
        let started = now_unix();
        let pre_up = first_event(
            cluster,
            &ns,
            "ScaledUp",
            "preprocess",
            started - 1.0,
            Duration::from_secs(20),
        );
        let inf_up = first_event(
            cluster,
            &ns,
            "ScaledUp",
            "inference",
            started - 1.0,
            Duration::from_secs(20),
        );
        let result = step.finish()?;
        let load_start = result["start"].as_f64().unwrap_or(started);
        let pre_up = pre_up.map_err(|e| anyhow::anyhow!("{e:#}\n{}", op.log_tail()))?;
        let inf_up = inf_up.map_err(|e| anyhow::anyhow!("{e:#}\n{}", op.log_tail()))?;
        pre_up_at = pre_up.at;
        inf_up_at = inf_up.at;
        let pre_s = pre_up.at - load_start;
        let inf_s = inf_up.at - load_start;
        println!(
            "load step → preprocess ScaledUp after {pre_s:.2} s: {}",
            pre_up.note
        );
        println!(
            "load step → inference ScaledUp after {inf_s:.2} s: {}",
            inf_up.note
        );
        println!("load step result: {result}");
        assert!(
            pre_s <= REACTION_LIMIT_S,
            "preprocess reacted after {pre_s:.2} s"
        );
        assert!(
            inf_s <= REACTION_LIMIT_S,
            "inference reacted after {inf_s:.2} s"
        );
        assert_no_failures(&op, "load step", &result);
        result
    };
    let pre_desired = stage_status(cluster, &ns, "preprocess")?["desiredReplicas"].clone();
    let inf_desired = stage_status(cluster, &ns, "inference")?["desiredReplicas"].clone();
    println!("desired after the step: preprocess {pre_desired}, inference {inf_desired}");
    assert!(deployment_replicas(cluster, &ns, &format!("{PIPELINE}-preprocess"))? >= 2);

    // 3. Load removed: down after the window, then inference to zero after the idle window.
    //    A stage's window runs from the last round its load needed more pods. That can be
    //    before the load ends (the step's steady part may need fewer pods than its burst asked
    //    for: seen once, inference 3 → 2 at +2.6 s from the load's end), so the lower bound a
    //    scale-down must respect is a full window after the stage's scale-up, whose round did
    //    need the higher count; the upper bound is a window (plus slack for the tail of the
    //    last answers) after the load's end.
    let load_end = load["end"].as_f64().unwrap_or_else(now_unix);
    let window_s = SCALE_DOWN_WINDOW_S as f64;
    let wait = Duration::from_secs(SCALE_DOWN_WINDOW_S + 30);
    let pre_down = check_event(
        &op,
        first_event(cluster, &ns, "ScaledDown", "preprocess", pre_up_at, wait),
    )?;
    println!(
        "load removed → preprocess ScaledDown {:+.2} s from the load's end, {:.2} s after its \
         scale-up (window {SCALE_DOWN_WINDOW_S} s): {}",
        pre_down.at - load_end,
        pre_down.at - pre_up_at,
        pre_down.note
    );
    assert!(pre_down.at - pre_up_at >= window_s);
    assert!(pre_down.at - load_end <= window_s + 5.0);
    let inf_down = check_event(
        &op,
        first_event(
            cluster,
            &ns,
            "ScaledDown",
            "inference",
            load_end - 5.0,
            wait,
        ),
    )?;
    println!(
        "load removed → inference ScaledDown {:+.2} s from the load's end, {:.2} s after its \
         scale-up (window {SCALE_DOWN_WINDOW_S} s): {}",
        inf_down.at - load_end,
        inf_down.at - inf_up_at,
        inf_down.note
    );
    assert!(inf_down.at - inf_up_at >= window_s);
    assert!(inf_down.at - load_end <= window_s + 5.0);
    let to_zero = check_event(
        &op,
        first_event(
            cluster,
            &ns,
            "ScaledToZero",
            "inference",
            load_end,
            Duration::from_secs(SCALE_TO_ZERO_AFTER_S + 30),
        ),
    )?;
    println!(
        "load removed → inference ScaledToZero after {:.2} s (idle window {SCALE_TO_ZERO_AFTER_S} s): {}",
        to_zero.at - load_end,
        to_zero.note
    );
    assert!(to_zero.at - load_end >= SCALE_TO_ZERO_AFTER_S as f64 - 1.0);
    check(wait_until(
        "no inference pods",
        Duration::from_secs(60),
        || {
            Ok(cluster
                .worker_pods(&ns, PIPELINE, "inference")?
                .is_empty()
                .then_some(()))
        },
    ))?;
    assert_eq!(
        deployment_replicas(cluster, &ns, &format!("{PIPELINE}-inference-blue"))?,
        0
    );
    let inf_status = stage_status(cluster, &ns, "inference")?;
    assert_eq!(
        inf_status["lastScaleReason"], "ScaledToZero",
        "{inf_status}"
    );
    assert!(inf_status["lastScaleTime"].is_string(), "{inf_status}");

    // 4. Requests after scale-to-zero are held and served, even by a preprocess pod deleted
    //    while it holds them. Preprocess first settles at its minimum (one pod): the client
    //    here talks to one pod's address, not through a Service, so a scale-down of that pod
    //    in the middle would refuse its next connection. (In CI once, the requests landed on
    //    a pod the autoscaler removed the next second.)
    check(wait_until(
        "preprocess settled at its one-pod minimum",
        Duration::from_secs(SCALE_DOWN_WINDOW_S + 60),
        || {
            let desired = stage_status(cluster, &ns, "preprocess")?["desiredReplicas"] == 1;
            let pods = cluster.worker_pods(&ns, PIPELINE, "preprocess")?;
            Ok((desired && pods.len() == 1 && pods[0].ready).then_some(()))
        },
    ))?;
    let holder = cluster.ready_preprocess_pod(&ns, PIPELINE)?;
    let sent = now_unix();
    let mut held = Load::start(&holder.grpc_address(), 3, 0, 3, 2, 64)?;
    let back = check_event(
        &op,
        first_event(
            cluster,
            &ns,
            "ScaledFromZero",
            "inference",
            sent - 1.0,
            Duration::from_secs(10),
        ),
    )?;
    // The inference pod takes seconds to start and load the model; its Event comes within
    // about a second of the requests, so they are still held here.
    assert!(
        held.running()?,
        "the held requests were answered before their preprocess pod could be deleted"
    );
    cluster.kubectl_ok(["delete", "pod", &holder.name, "-n", &ns, "--wait=false"])?;
    let deleted = now_unix();
    let held = held.finish()?;
    assert_no_failures(&op, "requests held by a deleted preprocess pod", &held);
    println!(
        "zero → one again: ScaledFromZero {:.2} s after the requests; their preprocess pod was \
         deleted {:.2} s after them and still served them, the slowest in {:.2} s: {}",
        back.at - sent,
        deleted - sent,
        held["max_latency_s"].as_f64().unwrap_or(f64::NAN),
        back.note
    );
    // Its replacement serves new requests.
    let address = cluster.ready_preprocess_address(&ns, PIPELINE)?;
    let after = Load::start(&address, 3, 0, 6, 2, 64)?.finish()?;
    assert_no_failures(&op, "requests to the replacement preprocess pod", &after);

    let metrics = op.metrics();
    for needle in [
        "tandem_operator_autoscale_decisions_total{stage=\"Inference\",change=\"FromZero\"}",
        "tandem_operator_autoscale_decisions_total{stage=\"Preprocess\",change=\"Up\"}",
        "tandem_operator_autoscale_decisions_total{stage=\"Inference\",change=\"ToZero\"}",
    ] {
        assert!(metrics.contains(needle), "{needle} missing:\n{metrics}");
    }
    let _ = cluster.kubectl(["delete", "ipl", PIPELINE, "-n", &ns, "--wait=false"]);
    Ok(())
}

fn check_event(op: &Operator, r: anyhow::Result<ScaleEvent>) -> anyhow::Result<ScaleEvent> {
    r.map_err(|e| anyhow::anyhow!("{e:#}\n{}", op.log_tail()))
}

#[test]
fn rfc3339_times_parse_to_unix_seconds() {
    assert_eq!(parse_utc("1970-01-01T00:00:00Z"), Some(0.0));
    assert_eq!(parse_utc("2000-03-01T00:00:01.5Z"), Some(951_868_801.5));
    assert_eq!(parse_utc("garbage"), None);
}
