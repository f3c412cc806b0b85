//! Tier 3: blue-green model swaps on the local cluster with real workers and the real
//! all-MiniLM-L6-v2 weights, under continuous OIP v2 gRPC load that must never see a failed
//! request. One pipeline goes through, in order:
//!
//! 1. v1 → v2 (same weights, new version and URI): shadow parity passes, traffic walks
//!    10 → 50 → 100, v2 becomes active on green and blue's pods are gone after
//!    `scaleDownDelay`.
//! 2. v2 → v3 (the weights with noise added): shadow parity fails, the rollout rolls back on
//!    its own, the Degraded condition states the measured mismatch rate, v2 keeps serving.
//! 3. → v4, superseded by v5 while v4 is still a candidate: v5 replaces it on the same color.
//! 4. The operator is killed (SIGKILL) while v5 holds its 50 % step: a new operator resumes at
//!    that step (traffic never goes back) and promotes v5.
//! 5. The `kubectl tandem` plugin, found by kubectl on `PATH`: `status` shows the v6
//!    candidate, `abort` stops it (Degraded, reason RolloutAborted), `undo` sets the spec back
//!    to v5 and the pipeline is Ready again with no rollout.
//!
//! Another pipeline rolls out a model whose `sha256` does not match its weights: its pods
//! crash-loop, and the rollout rolls back on that (`CandidateCrashLoop`) within a minute or so,
//! not at its 30-minute `progressDeadline`, with no request of the load failing.
//!
//! A third loses its candidate's only pod at the 50 % step while the model store hangs: live
//! traffic goes back to blue, the step starts over once a replacement has loaded the model, and
//! the candidate is promoted, again with no request failing.
//!
//! Latency percentiles of the load during each swap are printed.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tandem_e2e::{Cluster, Operator, condition, free_port, repo_root, wait_until};
use tandem_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use tandem_proto::inference::model_infer_request::InferInputTensor;
use tandem_proto::inference::{InferTensorContents, ModelInferRequest};

const PIPELINE: &str = "swap";
const BRIDGE_IP: &str = "10.244.0.1";

/// Model files for every version, served over HTTP on the cluster bridge.
struct ModelServer {
    child: Child,
    base: String,
    dir: PathBuf,
}

impl Drop for ModelServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn models_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("TANDEM_MODELS_DIR") {
        return PathBuf::from(dir);
    }
    let out = Command::new(repo_root().join("scripts/fetch-models.sh"))
        .output()
        .expect("running scripts/fetch-models.sh");
    assert!(
        out.status.success(),
        "scripts/fetch-models.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// `<dir>/<version>/` holds a MiniLM copy per version asked for: v1, v2, v4, v5, v6 the real
/// weights, v3 every floating-point weight multiplied by `1 + 0.05·u`, `u` uniform in [-1, 1]
/// (deterministic).
fn prepare_models(
    ns: &str,
    versions: &[&str],
) -> anyhow::Result<(PathBuf, BTreeMap<String, String>)> {
    let src = models_dir().join("minilm");
    let dir = std::env::temp_dir().join(format!("tandem-rollout-models-{ns}"));
    let _ = std::fs::remove_dir_all(&dir);
    let mut sums = BTreeMap::new();
    for &v in versions {
        let to = dir.join(v);
        std::fs::create_dir_all(to.join("1_Pooling"))?;
        for f in ["config.json", "tokenizer.json", "1_Pooling/config.json"] {
            std::fs::copy(src.join(f), to.join(f)).with_context(|| format!("copying {f}"))?;
        }
        let weights = std::fs::read(src.join("model.safetensors"))?;
        let weights = if v == "v3" {
            let noisy = perturbed(&weights)?;
            std::fs::write(to.join("model.safetensors"), &noisy)?;
            noisy
        } else {
            // The real weights, linked rather than copied: five copies of 87 MB add up.
            link_or_copy(
                &src.join("model.safetensors"),
                &to.join("model.safetensors"),
            )?;
            weights
        };
        sums.insert(v.to_owned(), hex(&Sha256::digest(&weights)));
    }
    Ok((dir, sums))
}

fn link_or_copy(from: &Path, to: &Path) -> anyhow::Result<()> {
    if std::fs::hard_link(from, to).is_err() {
        std::fs::copy(from, to).with_context(|| format!("copying {}", from.display()))?;
    }
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn perturbed(weights: &[u8]) -> anyhow::Result<Vec<u8>> {
    use safetensors::tensor::{Dtype, SafeTensors, TensorView};
    let st = SafeTensors::deserialize(weights)?;
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut noisy: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, view) in st.tensors() {
        let mut data = view.data().to_vec();
        if view.dtype() == Dtype::F32 {
            for chunk in data.chunks_exact_mut(4) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let u = (state >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0;
                let w = f32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
                chunk.copy_from_slice(&((f64::from(w) * (1.0 + 0.05 * u)) as f32).to_le_bytes());
            }
        }
        noisy.push((name, view.dtype(), view.shape().to_vec(), data));
    }
    let views = noisy
        .iter()
        .map(|(n, d, s, b)| Ok((n.clone(), TensorView::new(*d, s.clone(), b)?)))
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
    Ok(safetensors::serialize(views, None)?)
}

fn serve(dir: &Path) -> ModelServer {
    let port = free_port();
    ModelServer {
        child: http_server(dir, port),
        base: format!("http://{BRIDGE_IP}:{port}"),
        dir: dir.to_owned(),
    }
}

/// Python's `http.server` for `dir` on the bridge, once it accepts connections.
fn http_server(dir: &Path, port: u16) -> Child {
    let python = std::env::var("TANDEM_PYTHON").unwrap_or_else(|_| "python3".to_owned());
    let child = Command::new(python)
        .args(["-m", "http.server", &port.to_string(), "--bind", BRIDGE_IP])
        .arg("--directory")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting the model file server");
    let addr = format!("{BRIDGE_IP}:{port}").parse().expect("address");
    wait_until("the model file server", Duration::from_secs(20), || {
        Ok(
            std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200))
                .ok()
                .map(|_| ()),
        )
    })
    .expect("model file server up");
    child
}

impl ModelServer {
    /// Freezes the model store (SIGSTOP): connections are accepted but never answered, so a
    /// download waits, as on a store that hangs, until [`ModelServer::resume`].
    fn pause(&self) {
        self.signal("-STOP");
    }

    /// Lets the frozen store answer again (SIGCONT).
    fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .expect("running kill");
        assert!(status.success(), "kill {sig} of the model server failed");
    }
}

/// What every test here starts from: the cluster with the CRD, a namespace of its own, and
/// the MiniLM copies for `versions` served over HTTP with their checksums.
fn scene(
    prefix: &str,
    versions: &[&str],
) -> (
    Cluster,
    tandem_e2e::TestNamespace,
    BTreeMap<String, String>,
    ModelServer,
) {
    let cluster = Cluster::connect();
    cluster.ensure_crd().expect("the CRD is served");
    let ns = cluster.namespace(prefix).expect("namespace");
    let (dir, sums) = prepare_models(ns.name(), versions).expect("model copies");
    let server = serve(&dir);
    (cluster, ns, sums, server)
}

fn model_json(base: &str, sums: &BTreeMap<String, String>, v: &str) -> Value {
    serde_json::json!({
        "name": "minilm",
        "version": v,
        "uri": format!("{base}/{v}/model.safetensors"),
        "sha256": sums[v],
    })
}

fn manifest(ns: &str, base: &str, sums: &BTreeMap<String, String>) -> String {
    serde_json::json!({
        "apiVersion": "tandem.dev/v1alpha1",
        "kind": "InferencePipeline",
        "metadata": {"name": PIPELINE, "namespace": ns},
        "spec": {
            "preprocess": {
                "text": {"tokenizer": format!("{base}/v1/tokenizer.json"), "maxLength": 64},
                "replicas": {"min": 1, "max": 1},
            },
            "inference": {
                "model": model_json(base, sums, "v1"),
                "device": "CPU",
                "batching": {"maxBatchSize": 16, "maxDelay": "2ms"},
                "replicas": {"min": 1, "max": 1},
            },
            "rollout": {
                "steps": [10, 50, 100],
                "stepDuration": "6s",
                "shadow": {"requests": 40, "maxMismatchRate": 0.05, "tolerance": {"cosine": 0.999}},
                "autoRollback": true,
                "scaleDownDelay": "5s",
                // Latency on a shared 2-core machine is too noisy to gate on here; the
                // latency check is covered by the state machine's unit tests.
                "maxLatencyRatio": 0.0,
                "progressDeadline": "3m",
            },
        },
    })
    .to_string()
}

/// When a request was sent and its latency, or why it failed.
type Outcome = (Instant, Result<Duration, String>);

/// Open-loop load: one request every `interval` whatever the answers do, each on its own
/// task, recording latency or the error.
struct Load {
    stop: Arc<AtomicBool>,
    results: Arc<Mutex<Vec<Outcome>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(address: String, interval: Duration) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let results = Arc::new(Mutex::new(Vec::new()));
        let (s, r) = (stop.clone(), results.clone());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("tokio runtime");
            rt.block_on(async move {
                let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
                    .expect("endpoint")
                    .connect_lazy();
                let client = GrpcInferenceServiceClient::new(channel);
                let mut ticker = tokio::time::interval(interval);
                let mut tasks = Vec::new();
                let mut n = 0u64;
                while !s.load(Ordering::Relaxed) {
                    ticker.tick().await;
                    n += 1;
                    let mut c = client.clone();
                    let r = r.clone();
                    tasks.push(tokio::spawn(async move {
                        let sent = Instant::now();
                        let text = format!("request {n}: a cat sits on the warm windowsill");
                        let req = ModelInferRequest {
                            model_name: "minilm".into(),
                            inputs: vec![InferInputTensor {
                                name: "TEXT".into(),
                                datatype: "BYTES".into(),
                                shape: vec![1],
                                contents: Some(InferTensorContents {
                                    bytes_contents: vec![bytes::Bytes::from(text)],
                                    ..Default::default()
                                }),
                                ..Default::default()
                            }],
                            ..Default::default()
                        };
                        let res = tokio::time::timeout(Duration::from_secs(10), c.model_infer(req))
                            .await
                            .map_err(|_| "timed out after 10 s".to_owned())
                            .and_then(|r| r.map_err(|s| format!("{:?}: {}", s.code(), s.message())))
                            .and_then(|r| {
                                r.into_inner()
                                    .outputs
                                    .iter()
                                    .any(|o| o.name == "embedding")
                                    .then_some(sent.elapsed())
                                    .ok_or_else(|| "no embedding output".to_owned())
                            });
                        if let Ok(mut all) = r.lock() {
                            all.push((sent, res));
                        }
                    }));
                }
                for t in tasks {
                    let _ = t.await;
                }
            });
        });
        Load {
            stop,
            results,
            thread: Some(thread),
        }
    }

    /// Requests sent since `from`: (count, failures as text, p50 ms, p99 ms).
    fn summary(&self, from: Instant) -> (usize, Vec<String>, f64, f64) {
        let all = self.results.lock().map(|r| r.clone()).unwrap_or_default();
        let window: Vec<_> = all.into_iter().filter(|(t, _)| *t >= from).collect();
        let failures: Vec<String> = window
            .iter()
            .filter_map(|(_, r)| r.as_ref().err().cloned())
            .collect();
        let mut ms: Vec<f64> = window
            .iter()
            .filter_map(|(_, r)| r.as_ref().ok().map(|d| d.as_secs_f64() * 1e3))
            .collect();
        ms.sort_by(f64::total_cmp);
        let pct = |p: f64| {
            ms.get(((ms.len() as f64 * p).ceil() as usize).saturating_sub(1))
                .copied()
                .unwrap_or(f64::NAN)
        };
        (window.len(), failures, pct(0.50), pct(0.99))
    }

    fn finish(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn pipeline(cluster: &Cluster, ns: &str) -> Value {
    cluster
        .get_json(&["ipl", PIPELINE, "-n", ns])
        .unwrap_or(Value::Null)
}

fn rollout_phase(p: &Value) -> String {
    p["status"]["rollout"]["phase"]
        .as_str()
        .unwrap_or("")
        .to_owned()
}

fn set_model(cluster: &Cluster, ns: &str, model: &Value) {
    let patch = serde_json::json!({"spec": {"inference": {"model": model}}}).to_string();
    cluster
        .kubectl_ok([
            "patch", "ipl", PIPELINE, "-n", ns, "--type", "merge", "-p", &patch,
        ])
        .expect("patching the model");
}

/// Polls status until `done` holds, recording every distinct (phase, traffic, active color).
fn watch(
    cluster: &Cluster,
    ns: &str,
    what: &str,
    timeout: Duration,
    seen: &mut Vec<(String, i64, String)>,
    mut done: impl FnMut(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let p = pipeline(cluster, ns);
        let state = (
            rollout_phase(&p),
            p["status"]["rollout"]["trafficPercent"]
                .as_i64()
                .unwrap_or(0),
            p["status"]["activeColor"].as_str().unwrap_or("").to_owned(),
        );
        if seen.last() != Some(&state) {
            // The printer columns a person watching `kubectl get ipl -w` sees at this moment.
            let row = cluster
                .kubectl_ok(["get", "ipl", PIPELINE, "-n", ns, "--no-headers"])
                .unwrap_or_default();
            println!("  {what}: {state:?}\n    {}", row.trim());
            seen.push(state);
        }
        if done(&p) {
            return p;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; last status: {}",
            serde_json::to_string_pretty(&p["status"]).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Applies `pipeline`, waits until it is Ready with v1 on blue, and starts open-loop load of 10
/// requests/s at its preprocess pod (given 2 s to settle).
fn serve_under_load(cluster: &Cluster, ns: &str, pipeline: &str) -> Load {
    cluster.apply(pipeline).expect("applying the pipeline");
    let p = wait_ready(cluster, ns);
    assert_eq!(p["status"]["activeColor"], "blue");
    let load = Load::start(preprocess_address(cluster, ns), Duration::from_millis(100));
    std::thread::sleep(Duration::from_secs(2));
    load
}

/// The pipeline once it is Ready.
fn wait_ready(cluster: &Cluster, ns: &str) -> Value {
    watch(
        cluster,
        ns,
        "v1 Ready",
        Duration::from_secs(240),
        &mut Vec::new(),
        |p| {
            p["status"]["conditions"].as_array().is_some_and(|cs| {
                cs.iter()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            })
        },
    )
}

/// The OIP v2 gRPC address of the preprocess pod, where the load goes.
fn preprocess_address(cluster: &Cluster, ns: &str) -> String {
    let pre_ip = cluster
        .kubectl_ok([
            "get",
            "pods",
            "-n",
            ns,
            "-l",
            &format!(
                "app.kubernetes.io/instance={PIPELINE},app.kubernetes.io/component=preprocess"
            ),
            "-o",
            "jsonpath={.items[0].status.podIP}",
        ])
        .expect("preprocess pod IP");
    format!("{}:8001", pre_ip.trim())
}

fn deployments(cluster: &Cluster, ns: &str) -> Vec<String> {
    cluster
        .kubectl_ok([
            "get",
            "deployments",
            "-n",
            ns,
            "-l",
            &format!("app.kubernetes.io/instance={PIPELINE}"),
            "-o",
            "jsonpath={.items[*].metadata.name}",
        ])
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

fn events(cluster: &Cluster, ns: &str) -> String {
    cluster
        .kubectl_ok([
            "get",
            "events",
            "-n",
            ns,
            "--field-selector",
            &format!("involvedObject.name={PIPELINE}"),
            "-o",
            "jsonpath={range .items[*]}{.reason}: {.message}{\"\\n\"}{end}",
        ])
        .unwrap_or_default()
}

/// Runs `kubectl tandem <args> -n <ns>` with the plugin binary first on `PATH`, the way a user
/// installs it; fails the test with its stderr when it fails.
fn plugin(cluster: &Cluster, ns: &str, args: &[&str]) -> String {
    let path = format!(
        "{}:{}",
        tandem_e2e::bin_dir().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new("kubectl")
        .arg("tandem")
        .args(args)
        .args(["-n", ns])
        .env("PATH", path)
        .env("KUBECONFIG", cluster.kubeconfig())
        .output()
        .expect("running kubectl tandem");
    assert!(
        out.status.success(),
        "kubectl tandem {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn report(load: &Load, from: Instant, name: &str) {
    let (n, failures, p50, p99) = load.summary(from);
    println!(
        "{name}: {n} requests, {} failed, p50 {p50:.1} ms, p99 {p99:.1} ms",
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{name}: {} of {n} requests failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
}

#[test]
fn model_swaps_promote_roll_back_supersede_and_survive_an_operator_restart_under_load() {
    let (cluster, ns_guard, sums, server) = scene("rollout", &["v1", "v2", "v3", "v4", "v5", "v6"]);
    let ns = ns_guard.name();
    let base = server.base.clone();

    tandem_e2e::bin_dir(); // built now, not in the middle of a timed scenario
    let mut operator = Some(Operator::start(&cluster, ns, "a"));
    let load = serve_under_load(&cluster, ns, &manifest(ns, &base, &sums));

    // 1. v1 → v2: same weights under a new version and URI.
    let t = Instant::now();
    set_model(&cluster, ns, &model_json(&base, &sums, "v2"));
    let mut seen = Vec::new();
    let p = watch(
        &cluster,
        ns,
        "v1 → v2",
        Duration::from_secs(240),
        &mut seen,
        |p| rollout_phase(p) == "Complete",
    );
    let op = operator.as_ref().expect("operator");
    let traffic: Vec<i64> = seen
        .iter()
        .filter(|s| s.0 == "ShiftingTraffic")
        .map(|s| s.1)
        .collect();
    assert_eq!(
        traffic,
        [10, 50, 100],
        "traffic steps seen: {seen:?}\n{}",
        op.log_tail()
    );
    assert!(seen.iter().any(|s| s.0 == "Shadowing"), "{seen:?}");
    assert_eq!(p["status"]["activeColor"], "green");
    assert_eq!(p["status"]["activeModel"]["version"], "v2");
    let shadow = &p["status"]["rollout"]["shadow"];
    assert!(shadow["compared"].as_i64().unwrap_or(0) >= 40, "{shadow}");
    assert_eq!(shadow["mismatches"], 0, "{shadow}");
    wait_until("blue's pods to be gone", Duration::from_secs(60), || {
        Ok((deployments(&cluster, ns)
            == [
                format!("{PIPELINE}-inference-green"),
                format!("{PIPELINE}-preprocess"),
            ])
        .then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e:#}: {:?}", deployments(&cluster, ns)));
    report(&load, t, "v1 → v2 (promoted)");

    // 2. v2 → v3: perturbed weights fail shadow parity and roll back.
    let t = Instant::now();
    set_model(&cluster, ns, &model_json(&base, &sums, "v3"));
    let mut seen = Vec::new();
    let p = watch(
        &cluster,
        ns,
        "v2 → v3",
        Duration::from_secs(240),
        &mut seen,
        |p| rollout_phase(p) == "RolledBack",
    );
    // (The first state seen can be v2's finished rollout, at 100% since ae83618.)
    assert!(
        seen.iter().filter(|s| s.0 != "Complete").all(|s| s.1 == 0),
        "no live traffic moved to v3: {seen:?}"
    );
    assert_eq!(p["status"]["activeColor"], "green");
    assert_eq!(p["status"]["activeModel"]["version"], "v2");
    // The reconcile that follows the rollout's status write recomputes the conditions.
    let p = watch(
        &cluster,
        ns,
        "Degraded",
        Duration::from_secs(30),
        &mut seen,
        |p| p["status"]["phase"] == "Degraded",
    );
    let degraded = condition(&p, "Degraded");
    assert_eq!(degraded["status"], "True", "{degraded}");
    assert_eq!(degraded["reason"], "RolledBack", "{degraded}");
    let message = degraded["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("shadow parity failed") && message.contains("compared requests ("),
        "the message states the measured mismatch rate: {message}"
    );
    println!("Degraded: {message}");
    wait_until(
        "the v3 candidate to be removed",
        Duration::from_secs(60),
        || {
            Ok(
                (!deployments(&cluster, ns).contains(&format!("{PIPELINE}-inference-blue")))
                    .then_some(()),
            )
        },
    )
    .expect("candidate removed");
    report(&load, t, "v2 → v3 (rolled back)");

    // 3. → v4, superseded by v5 while v4 is still the candidate.
    let t = Instant::now();
    set_model(&cluster, ns, &model_json(&base, &sums, "v4"));
    let mut seen = Vec::new();
    watch(
        &cluster,
        ns,
        "v4 started",
        Duration::from_secs(60),
        &mut seen,
        |p| p["status"]["rollout"]["candidateModel"]["version"] == "v4",
    );
    set_model(&cluster, ns, &model_json(&base, &sums, "v5"));
    watch(
        &cluster,
        ns,
        "v5 supersedes v4",
        Duration::from_secs(60),
        &mut seen,
        |p| p["status"]["rollout"]["candidateModel"]["version"] == "v5",
    );
    // Events are created in the background after the status write the watch saw.
    let superseded = wait_until("a RolloutSuperseded Event", Duration::from_secs(10), || {
        Ok(events(&cluster, ns)
            .contains("RolloutSuperseded")
            .then_some(()))
    });
    assert!(superseded.is_ok(), "{}", events(&cluster, ns));

    // 4. Kill the operator while v5 holds 50 %; a new one resumes at that step.
    let p = watch(
        &cluster,
        ns,
        "v5 at 50%",
        Duration::from_secs(240),
        &mut seen,
        |p| rollout_phase(p) == "ShiftingTraffic" && p["status"]["rollout"]["trafficPercent"] == 50,
    );
    let step_started = p["status"]["rollout"]["stepStartedAt"].clone();
    if let Some(op) = operator.take() {
        op.kill();
    }
    let killed_at = seen.len();
    operator = Some(Operator::start(&cluster, ns, "b"));
    let p = watch(
        &cluster,
        ns,
        "v5 promoted",
        Duration::from_secs(240),
        &mut seen,
        |p| matches!(rollout_phase(p).as_str(), "Promoted" | "Complete"),
    );
    let after: Vec<i64> = seen[killed_at..]
        .iter()
        .filter(|s| s.0 == "ShiftingTraffic")
        .map(|s| s.1)
        .collect();
    assert!(
        after.iter().all(|pct| *pct >= 50),
        "the new operator resumed at 50% (stepStartedAt {step_started}), saw {after:?}"
    );
    assert_eq!(p["status"]["activeModel"]["version"], "v5");
    assert_eq!(p["status"]["activeColor"], "blue");
    report(&load, t, "v4 → v5 (superseded, operator killed at 50%)");

    // 5. The kubectl plugin: pause, status, abort, undo, resume.
    let t = Instant::now();
    plugin(&cluster, ns, &["pause", PIPELINE]);
    set_model(&cluster, ns, &model_json(&base, &sums, "v6"));
    let mut seen = Vec::new();
    // Paused, the rollout compares all it needs and still holds its shadow phase.
    watch(
        &cluster,
        ns,
        "v6 shadowing, paused",
        Duration::from_secs(240),
        &mut seen,
        |p| {
            let r = &p["status"]["rollout"];
            r["candidateModel"]["version"] == "v6"
                && rollout_phase(p) == "Shadowing"
                && r["shadow"]["compared"].as_i64().unwrap_or(0) >= 40
                && r["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("(paused)"))
        },
    );
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        rollout_phase(&pipeline(&cluster, ns)),
        "Shadowing",
        "paused"
    );
    let status = plugin(&cluster, ns, &["status", PIPELINE]);
    println!("--- kubectl tandem status ---\n{status}");
    assert!(status.contains("candidate: minilm:v6 on green"), "{status}");
    assert!(status.contains("serving:   minilm:v5 on blue"), "{status}");
    assert!(status.contains("(paused)"), "{status}");
    plugin(&cluster, ns, &["abort", PIPELINE]);
    let p = watch(
        &cluster,
        ns,
        "v6 aborted",
        Duration::from_secs(60),
        &mut seen,
        |p| rollout_phase(p) == "Aborted" && p["status"]["phase"] == "Degraded",
    );
    let degraded = condition(&p, "Degraded");
    assert_eq!(degraded["reason"], "RolloutAborted", "{degraded}");
    assert_eq!(p["status"]["activeModel"]["version"], "v5");
    // Acted on, the annotation is removed: it cannot act on a later rollout of "v6".
    watch(
        &cluster,
        ns,
        "abort annotation removed",
        Duration::from_secs(30),
        &mut seen,
        |p| p["metadata"]["annotations"]["tandem.dev/abort"].is_null(),
    );
    plugin(&cluster, ns, &["undo", PIPELINE]);
    let p = watch(
        &cluster,
        ns,
        "undo to v5",
        Duration::from_secs(60),
        &mut seen,
        |p| {
            p["spec"]["inference"]["model"]["version"] == "v5"
                && p["status"]["rollout"].is_null()
                && p["status"]["phase"] == "Ready"
        },
    );
    assert_eq!(p["status"]["activeColor"], "blue");
    plugin(&cluster, ns, &["resume", PIPELINE]);
    assert_eq!(pipeline(&cluster, ns)["spec"]["rollout"]["paused"], false);
    report(
        &load,
        t,
        "v6 paused, aborted and undone with kubectl tandem",
    );

    // The operator exports the rollout's phase and the live split. It reads them from its own
    // pipeline cache, which can trail the watch above by a moment: scrape until they show.
    let wanted = [
        format!(
            "tandem_operator_traffic_percent{{namespace=\"{ns}\",pipeline=\"{PIPELINE}\",color=\"blue\"}} 100"
        ),
        "tandem_operator_rollout_transitions_total{reason=\"RolloutAborted\"}".to_owned(),
    ];
    let scraped = Instant::now();
    let metrics = loop {
        let metrics = operator.as_ref().map(Operator::metrics).unwrap_or_default();
        if wanted.iter().all(|s| metrics.contains(s)) || scraped.elapsed() > Duration::from_secs(10)
        {
            break metrics;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    for series in &wanted {
        assert!(
            metrics.contains(series),
            "{series} missing from /metrics for 10 s:\n{metrics}"
        );
    }

    load.finish();
    let all = events(&cluster, ns);
    println!("--- events ---\n{all}");
    for reason in [
        "RolloutStarted",
        "ShadowStarted",
        "ShadowPassed",
        "TrafficShifted",
        "Promoted",
        "ShadowParityFailed",
    ] {
        assert!(all.contains(reason), "Event {reason} missing:\n{all}");
    }
    let _ = std::io::stdout().flush();
    drop(operator);
    drop(server);
}

#[test]
fn a_candidate_crash_looping_on_a_wrong_sha256_rolls_back_long_before_the_progress_deadline() {
    let (cluster, ns_guard, sums, server) = scene("crashloop", &["v1"]);
    let ns = ns_guard.name();
    let base = server.base.clone();

    tandem_e2e::bin_dir(); // built now, not while the rollout is timed
    let operator = Operator::start(&cluster, ns, "crashloop");
    let mut pipeline: Value = serde_json::from_str(&manifest(ns, &base, &sums)).expect("JSON");
    let deadline = Duration::from_secs(30 * 60);
    pipeline["spec"]["rollout"]["progressDeadline"] = "30m".into();
    let load = serve_under_load(&cluster, ns, &pipeline.to_string());

    // The same weights under a checksum they do not have: the worker exits at every start.
    let mut wrong = model_json(&base, &sums, "v1");
    wrong["version"] = "v2-wrong-sha256".into();
    wrong["sha256"] = "0123456789abcdef".repeat(4).into();
    assert_ne!(wrong["sha256"], sums["v1"].as_str());
    let t = Instant::now();
    set_model(&cluster, ns, &wrong);
    let mut seen = Vec::new();
    let p = watch(
        &cluster,
        ns,
        "v2-wrong-sha256",
        Duration::from_secs(300),
        &mut seen,
        |p| rollout_phase(p) == "RolledBack",
    );
    let took = t.elapsed();
    println!(
        "rolled back on the crash loop {:.0} s after the spec changed (progressDeadline {} s)",
        took.as_secs_f64(),
        deadline.as_secs()
    );
    assert!(
        seen.iter().all(|s| s.1 == 0 && s.2 == "blue"),
        "no live traffic left blue: {seen:?}"
    );
    assert_eq!(p["status"]["activeColor"], "blue");
    assert_eq!(p["status"]["activeModel"]["version"], "v1");
    let message = p["status"]["rollout"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    println!("status.rollout.message: {message}");
    assert!(
        message.starts_with(
            "candidate minilm:v2-wrong-sha256 on green is crash-looping with no pod ready"
        ) && message.contains("sha256 mismatch")
            && message.ends_with("rolled back: all traffic is on blue (minilm:v1)"),
        "{message}"
    );

    // The driver's Warning Event names the failure.
    let event = wait_event(&cluster, ns, "CandidateCrashLoop", "Warning", &operator);
    assert_eq!(event["note"], message.as_str(), "{event}");

    let p = watch(
        &cluster,
        ns,
        "Degraded",
        Duration::from_secs(30),
        &mut seen,
        |p| p["status"]["phase"] == "Degraded",
    );
    let degraded = condition(&p, "Degraded");
    assert_eq!(degraded["reason"], "RolledBack", "{degraded}");
    wait_until(
        "the crash-looping candidate to be removed",
        Duration::from_secs(60),
        || {
            Ok(
                (!deployments(&cluster, ns).contains(&format!("{PIPELINE}-inference-green")))
                    .then_some(()),
            )
        },
    )
    .expect("candidate removed");
    report(
        &load,
        t,
        "v1 → v2 with a wrong sha256 (rolled back on its crash loop)",
    );
    load.finish();
    assert!(
        took < deadline / 10,
        "the crash loop, not the deadline, ended the rollout: {took:?}"
    );
    drop(operator);
    drop(server);
}

/// The pipeline's candidate-color inference pods that are not being deleted.
fn candidate_pods(cluster: &Cluster, ns: &str) -> Vec<String> {
    let pods = cluster
        .get_json(&[
            "pods",
            "-n",
            ns,
            "-l",
            &format!(
                "app.kubernetes.io/instance={PIPELINE},app.kubernetes.io/component=inference,tandem.dev/color=green"
            ),
        ])
        .unwrap_or(Value::Null);
    pods["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
        .filter_map(|p| p["metadata"]["name"].as_str().map(str::to_owned))
        .collect()
}

/// The Event of `reason` and `type_` about the pipeline, once the driver has created it (after
/// the status write it reports); the Events there are and the operator's log if none comes.
fn wait_event(cluster: &Cluster, ns: &str, reason: &str, type_: &str, op: &Operator) -> Value {
    cluster
        .wait_event(ns, reason, type_, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e:#}:\n{}\n{}", events(cluster, ns), op.log_tail()))
}

#[test]
fn a_candidate_that_loses_its_pod_mid_step_gets_no_traffic_until_one_is_back_and_no_request_fails()
{
    let (cluster, ns_guard, sums, server) = scene("lostpod", &["v1", "v2"]);
    let ns = ns_guard.name();
    let base = server.base.clone();

    tandem_e2e::bin_dir();
    let operator = Operator::start(&cluster, ns, "lostpod");
    let mut pipeline: Value = serde_json::from_str(&manifest(ns, &base, &sums)).expect("JSON");
    // Long enough a step that the candidate is lost and back before it is due.
    pipeline["spec"]["rollout"]["steps"] = serde_json::json!([50, 100]);
    pipeline["spec"]["rollout"]["stepDuration"] = "30s".into();
    let load = serve_under_load(&cluster, ns, &pipeline.to_string());

    let t = Instant::now();
    set_model(&cluster, ns, &model_json(&base, &sums, "v2"));
    let mut seen = Vec::new();
    watch(
        &cluster,
        ns,
        "v2 at 50 %",
        Duration::from_secs(180),
        &mut seen,
        |p| rollout_phase(p) == "ShiftingTraffic" && p["status"]["rollout"]["trafficPercent"] == 50,
    );

    // The model store hangs, then the candidate's only pod goes: its replacement waits for v2.
    server.pause();
    let lost = candidate_pods(&cluster, ns);
    assert_eq!(lost.len(), 1, "one candidate pod: {lost:?}");
    cluster
        .kubectl_ok(["delete", "pod", &lost[0], "-n", ns, "--wait=false"])
        .expect("deleting the candidate pod");
    let p = watch(
        &cluster,
        ns,
        "the candidate lost",
        Duration::from_secs(60),
        &mut seen,
        |p| !p["status"]["rollout"]["candidateUnavailableSince"].is_null(),
    );
    assert_eq!(rollout_phase(&p), "ShiftingTraffic");
    assert_eq!(
        p["status"]["rollout"]["trafficPercent"], 0,
        "live traffic back on blue: {}",
        p["status"]["rollout"]
    );
    let message = p["status"]["rollout"]["message"].as_str().unwrap_or("");
    assert!(
        message.starts_with("candidate minilm:v2 on green has had no ready pod for")
            && message.contains("all live traffic is on blue until one is ready again"),
        "{message}"
    );
    wait_event(&cluster, ns, "CandidateUnavailable", "Warning", &operator);

    // The store answers again: the replacement loads v2, and the step starts over.
    server.resume();
    let p = watch(
        &cluster,
        ns,
        "the candidate back",
        Duration::from_secs(120),
        &mut seen,
        |p| p["status"]["rollout"]["candidateUnavailableSince"].is_null(),
    );
    assert_eq!(
        rollout_phase(&p),
        "ShiftingTraffic",
        "{}",
        p["status"]["rollout"]
    );
    assert_eq!(p["status"]["rollout"]["trafficPercent"], 50);
    let event = wait_event(&cluster, ns, "CandidateRecovered", "Normal", &operator);
    assert_eq!(
        event["note"],
        "candidate minilm:v2 on green has a ready pod again; step 1/2 starts over with 50% of traffic"
    );
    let p = watch(
        &cluster,
        ns,
        "v2 promoted",
        Duration::from_secs(120),
        &mut seen,
        |p| p["status"]["activeColor"] == "green",
    );
    assert_eq!(p["status"]["activeModel"]["version"], "v2");
    report(
        &load,
        t,
        "v1 → v2 with the candidate's pod lost at 50 % and back",
    );
    load.finish();
    drop(operator);
    drop(server);
}

#[test]
fn control_ports_take_only_the_pipelines_token_and_a_key_rotation_keeps_old_pods_routed() {
    use tandem_proto::tandem::v1::worker_control_client::WorkerControlClient;
    use tandem_proto::tandem::v1::{GetStatsRequest, SetRoutesRequest};

    let (cluster, ns_guard, sums, server) = scene("control-auth", &["v1"]);
    let ns = ns_guard.name();
    let operator = Operator::start(&cluster, ns, "control-auth");
    cluster
        .apply(&manifest(ns, &server.base, &sums))
        .expect("applying the pipeline");
    // Ready means every preprocess pod holds the operator's routing table: pushed with the
    // pipeline's token, to pods that require it.
    wait_ready(&cluster, ns);

    let token_of = |deployment: &str| {
        cluster
            .kubectl_ok([
                "get",
                "deployment",
                deployment,
                "-n",
                ns,
                "-o",
                "jsonpath={.spec.template.spec.containers[0].env[?(@.name==\"TANDEM_CONTROL_TOKEN\")].value}",
            ])
            .expect("the Deployment")
    };
    let token = token_of(&format!("{PIPELINE}-preprocess"));
    assert_eq!(token.len(), 64, "{token:?}");
    assert!(token.bytes().all(|b| b.is_ascii_hexdigit()), "{token:?}");
    assert_eq!(
        token_of(&format!("{PIPELINE}-inference-blue")),
        token,
        "one token per pipeline, both stages"
    );
    let pre_ip = preprocess_address(&cluster, ns)
        .trim_end_matches(":8001")
        .to_owned();
    let inf_ip = cluster
        .kubectl_ok([
            "get",
            "pods",
            "-n",
            ns,
            "-l",
            &format!("app.kubernetes.io/instance={PIPELINE},app.kubernetes.io/component=inference"),
            "-o",
            "jsonpath={.items[0].status.podIP}",
        ])
        .expect("inference pod IP");

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    fn with<T>(message: T, token: Option<&str>) -> tonic::Request<T> {
        let mut r = tonic::Request::new(message);
        if let Some(t) = token {
            r.metadata_mut().insert(
                "authorization",
                format!("Bearer {t}").parse().expect("ASCII"),
            );
        }
        r
    }
    let generation_before = rt.block_on(async {
        let mut pre = WorkerControlClient::connect(format!("http://{pre_ip}:9091"))
            .await
            .expect("preprocess control port");
        // No token, or another pipeline's: refused, and the table the pod holds stays.
        let hijack = SetRoutesRequest {
            table: None,
            replace: true,
        };
        for token in [None, Some("0".repeat(64).as_str())] {
            let e = pre
                .set_routes(with(hijack.clone(), token))
                .await
                .expect_err("SetRoutes without the pipeline's token");
            assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
        }
        let e = pre
            .get_stats(with(GetStatsRequest {}, None))
            .await
            .expect_err("GetStats without a token");
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
        let stats = pre
            .get_stats(with(GetStatsRequest {}, Some(&token)))
            .await
            .expect("GetStats with the pipeline's token")
            .into_inner();
        assert!(
            stats.ready,
            "the pod still holds the operator's table: {stats:?}"
        );
        assert!(stats.routes_generation > 0, "{stats:?}");

        let mut inf = WorkerControlClient::connect(format!("http://{}:9091", inf_ip.trim()))
            .await
            .expect("inference control port");
        let e = inf
            .get_stats(with(GetStatsRequest {}, None))
            .await
            .expect_err("the inference pod's GetStats without a token");
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
        assert!(
            inf.get_stats(with(GetStatsRequest {}, Some(&token)))
                .await
                .expect("with it")
                .into_inner()
                .model_loaded
        );
        stats.routes_generation
    });
    // Still serving after the attempts.
    wait_ready(&cluster, ns);

    // A key rotation (docs/operations.md): the operator restarts with a new key and the old
    // one as the previous key. The preprocess Deployment is paused, so its pod keeps the old
    // token while the inference pod rolls to the new one: the new inference pod's address can
    // reach the old preprocess pod only in a table pushed with the previous key's token.
    let preprocess = format!("{PIPELINE}-preprocess");
    let pod_names = |component: &str| {
        cluster
            .kubectl_ok([
                "get",
                "pods",
                "-n",
                ns,
                "-l",
                &format!(
                    "app.kubernetes.io/instance={PIPELINE},app.kubernetes.io/component={component}"
                ),
                "-o",
                "jsonpath={.items[*].metadata.name}",
            ])
            .expect("pods")
    };
    let (old_pre, old_inf) = (pod_names("preprocess"), pod_names("inference"));
    cluster
        .kubectl_ok(["rollout", "pause", "deployment", &preprocess, "-n", ns])
        .expect("pausing the preprocess Deployment");
    let load = Load::start(format!("{pre_ip}:8001"), Duration::from_millis(100));
    let t = Instant::now();
    operator.kill();
    let new_key = std::env::temp_dir().join(format!("tandem-control-key-{ns}-rotated"));
    std::fs::write(
        &new_key,
        format!("rotated-e2e-control-key-{ns}-fedcba9876543210fedcba98\n"),
    )
    .expect("new key file");
    let operator = Operator::start_with(
        &cluster,
        ns,
        "control-auth-rotated",
        &[
            format!("--control-key-file={}", new_key.display()),
            format!(
                "--previous-control-key-file={}",
                tandem_e2e::control_key_file(ns).display()
            ),
        ],
    );
    let new_token = wait_until(
        "the operator to give the pods the new key's token",
        Duration::from_secs(60),
        || {
            let t = token_of(&format!("{PIPELINE}-inference-blue"));
            Ok((t.len() == 64 && t != token).then_some(t))
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", operator.log_tail()));
    assert_eq!(token_of(&preprocess), new_token, "the paused template too");
    wait_until(
        "the inference pod replaced, and its address pushed to the old preprocess pod",
        Duration::from_secs(180),
        || {
            let inf = pod_names("inference");
            if inf.is_empty() || inf.split(' ').any(|p| old_inf.split(' ').any(|o| o == p)) {
                return Ok(None);
            }
            let stats = rt.block_on(async {
                let mut pre = WorkerControlClient::connect(format!("http://{pre_ip}:9091"))
                    .await
                    .ok()?;
                pre.get_stats(with(GetStatsRequest {}, Some(&token)))
                    .await
                    .ok()
                    .map(tonic::Response::into_inner)
            });
            Ok(stats.filter(|s| s.ready && s.routes_generation > generation_before))
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", operator.log_tail()));
    // Requests keep flowing through the old pod to the new inference pod.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        pod_names("preprocess"),
        old_pre,
        "the paused pod is still the one"
    );
    report(
        &load,
        t,
        "key rotation, preprocess pod on the previous key's token",
    );
    load.finish();

    // Resumed, the preprocess pod rolls to the new token and takes the table with it.
    cluster
        .kubectl_ok(["rollout", "resume", "deployment", &preprocess, "-n", ns])
        .expect("resuming");
    wait_until(
        "the preprocess pod replaced",
        Duration::from_secs(120),
        || {
            let now = pod_names("preprocess");
            Ok((!now.is_empty() && now != old_pre).then_some(()))
        },
    )
    .expect("preprocess rolled");
    wait_ready(&cluster, ns);
    drop(operator);
}
