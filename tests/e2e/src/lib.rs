//! Helpers shared by the end-to-end tests: reaching the local cluster started by
//! `tests/kube/cluster up`, running `kubectl`, per-test namespaces and polling
//! waits with deadlines.
//!
//! Tests that need the cluster call [`Cluster::connect`], which fails the test
//! loudly (never skips) when the cluster is not reachable.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

pub mod otlp;

/// Handle on the local cluster: where its kubeconfig is.
#[derive(Debug, Clone)]
pub struct Cluster {
    kubeconfig: PathBuf,
}

impl Cluster {
    /// Connects to the cluster named by `KUBECONFIG` and checks `/readyz`.
    ///
    /// # Panics
    /// When the cluster is not configured or not ready: cluster tests must fail,
    /// not skip, when their cluster is missing.
    pub fn connect() -> Cluster {
        let kubeconfig = std::env::var_os("KUBECONFIG").map(PathBuf::from).unwrap_or_else(|| {
            panic!(
                "KUBECONFIG is not set: start the local cluster with `tests/kube/cluster up` and \
                 `eval \"$(tests/kube/cluster env)\"` (scripts/test does both)"
            )
        });
        let cluster = Cluster { kubeconfig };
        let ready = cluster.kubectl(["get", "--raw", "/readyz"]);
        match ready {
            Ok(out) if out.status.success() => cluster,
            Ok(out) => panic!(
                "the local cluster is not ready (kubectl get --raw /readyz): {}",
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(err) => panic!("cannot run kubectl against the local cluster: {err:#}"),
        }
    }

    /// The admin kubeconfig path.
    pub fn kubeconfig(&self) -> &PathBuf {
        &self.kubeconfig
    }

    /// Runs kubectl with the admin kubeconfig and returns its raw output.
    pub fn kubectl<I, S>(&self, args: I) -> anyhow::Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("running kubectl (is the cluster's kubectl on PATH?)")
    }

    /// Runs kubectl as the holder of a bearer `token` (no client certificate):
    /// same server and CA as the admin kubeconfig, nothing else.
    pub fn kubectl_with_token(&self, token: &str, args: &[&str]) -> anyhow::Result<Output> {
        let field = |path: &str| -> anyhow::Result<String> {
            let jsonpath = format!("jsonpath={{.clusters[0].cluster.{path}}}");
            self.kubectl_ok(["config", "view", "--minify", "-o", &jsonpath])
        };
        let server = field("server")?;
        let ca = field("certificate-authority")?;
        Command::new("kubectl")
            .env_remove("KUBECONFIG")
            .args(["--kubeconfig", "/dev/null", "--server", &server])
            .args(["--certificate-authority", &ca, "--token", token])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("running kubectl with a token")
    }

    /// Runs kubectl and returns stdout; fails with kubectl's stderr otherwise.
    pub fn kubectl_ok<I, S>(&self, args: I) -> anyhow::Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let args: Vec<std::ffi::OsString> =
            args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        let out = self.kubectl(&args)?;
        if !out.status.success() {
            bail!(
                "kubectl {:?} failed: {}",
                args,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `kubectl <args> -f -` with `manifest` on stdin (apply, create, delete).
    pub fn kubectl_stdin(&self, args: &[&str], manifest: &str) -> anyhow::Result<Output> {
        let mut child = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawning kubectl")?;
        child
            .stdin
            .take()
            .context("kubectl stdin")?
            .write_all(manifest.as_bytes())
            .context("writing the manifest to kubectl")?;
        child.wait_with_output().context("waiting for kubectl")
    }

    /// `kubectl apply -f -`, failing with kubectl's message.
    pub fn apply(&self, manifest: &str) -> anyhow::Result<()> {
        let out = self.kubectl_stdin(&["apply"], manifest)?;
        if !out.status.success() {
            bail!(
                "kubectl apply failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// Reads one object (or a list) as JSON.
    pub fn get_json(&self, args: &[&str]) -> anyhow::Result<serde_json::Value> {
        let mut all: Vec<&str> = vec!["get"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["-o", "json"]);
        let text = self.kubectl_ok(&all)?;
        serde_json::from_str(&text).context("parsing kubectl JSON output")
    }

    /// The first `events.k8s.io` Event in `ns` with `reason` and `type_` (`Normal` or
    /// `Warning`), once one exists (Events are created after the change they report).
    pub fn wait_event(
        &self,
        ns: &str,
        reason: &str,
        type_: &str,
        timeout: Duration,
    ) -> anyhow::Result<serde_json::Value> {
        wait_until(&format!("a {type_} Event {reason}"), timeout, || {
            let events = self.get_json(&["events.events.k8s.io", "-n", ns])?;
            Ok(events["items"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|e| e["reason"] == reason && e["type"] == type_)
                .cloned())
        })
    }

    /// Creates a fresh namespace for one test; deleted when the guard drops.
    pub fn namespace(&self, prefix: &str) -> anyhow::Result<TestNamespace> {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "{prefix}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        self.kubectl_ok(["create", "namespace", &name])?;
        // The ServiceAccount controller creates `default` a moment later;
        // pods cannot be created before it exists.
        wait_until(
            "the default ServiceAccount",
            Duration::from_secs(30),
            || {
                Ok(self
                    .kubectl(["get", "serviceaccount", "default", "-n", &name])?
                    .status
                    .success()
                    .then_some(()))
            },
        )?;
        Ok(TestNamespace {
            cluster: self.clone(),
            name,
        })
    }
}

/// A live worker pod, as [`Cluster::worker_pods`] lists it.
#[derive(Clone, Debug)]
pub struct WorkerPod {
    /// `metadata.name`.
    pub name: String,
    /// `status.podIP`, empty until assigned.
    pub ip: String,
    /// Its `Ready` condition is `True`.
    pub ready: bool,
}

impl WorkerPod {
    /// Its OIP v2 gRPC address (`ip:8001`).
    pub fn grpc_address(&self) -> String {
        format!("{}:8001", self.ip)
    }
}

impl Cluster {
    /// The live (not terminating) pods of one stage (`preprocess` or `inference`) of pipeline
    /// `pipeline`.
    pub fn worker_pods(
        &self,
        ns: &str,
        pipeline: &str,
        component: &str,
    ) -> anyhow::Result<Vec<WorkerPod>> {
        let list = self.get_json(&[
            "pods",
            "-n",
            ns,
            "-l",
            &format!(
                "app.kubernetes.io/instance={pipeline},app.kubernetes.io/component={component}"
            ),
        ])?;
        Ok(list["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
            .map(|p| WorkerPod {
                name: p["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                ip: p["status"]["podIP"].as_str().unwrap_or_default().to_owned(),
                ready: p["status"]["conditions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True"),
            })
            .collect())
    }

    /// A ready preprocess pod of `pipeline` with an address, waiting up to three minutes for
    /// one.
    pub fn ready_preprocess_pod(&self, ns: &str, pipeline: &str) -> anyhow::Result<WorkerPod> {
        wait_until("a ready preprocess pod", Duration::from_secs(180), || {
            Ok(self
                .worker_pods(ns, pipeline, "preprocess")?
                .into_iter()
                .find(|p| p.ready && !p.ip.is_empty()))
        })
    }

    /// The OIP v2 gRPC address (`ip:8001`) of a ready preprocess pod of `pipeline`, waiting
    /// up to three minutes for one.
    pub fn ready_preprocess_address(&self, ns: &str, pipeline: &str) -> anyhow::Result<String> {
        Ok(self.ready_preprocess_pod(ns, pipeline)?.grpc_address())
    }
}

/// The models of `scripts/fetch-models.sh` served over HTTP on the bridge address
/// (`tests/kube/cluster serve`, port 8088), where pods reach them.
pub struct ServedModels {
    /// `http://<bridge ip>:8088`.
    pub base: String,
    /// sha256 of `minilm/model.safetensors`, for a pipeline's `model.sha256`.
    pub minilm_sha256: String,
    /// sha256 of `efficientnet-lite0/model.safetensors`.
    pub efficientnet_sha256: String,
}

impl ServedModels {
    /// Fetches the models if needed and serves them (idempotent).
    pub fn start() -> anyhow::Result<ServedModels> {
        let models = script_output("scripts/fetch-models.sh", &[])?;
        let base = script_output("tests/kube/cluster", &["serve", &models, "8088"])?;
        let sums = std::fs::read_to_string(Path::new(&models).join("SHA256SUMS"))?;
        let sha256 = |file: &str| {
            sums.lines()
                .find_map(|l| l.strip_suffix(&format!("  {file}")))
                .map(str::to_owned)
                .with_context(|| format!("{file} in SHA256SUMS"))
        };
        Ok(ServedModels {
            minilm_sha256: sha256("minilm/model.safetensors")?,
            efficientnet_sha256: sha256("efficientnet-lite0/model.safetensors")?,
            base,
        })
    }
}

/// Where a test with real worker pods starts: the cluster with the CRD installed, a namespace
/// of its own (deleted with everything in it when dropped) and the models served over HTTP.
pub struct WorkerTest {
    /// The local cluster.
    pub cluster: Cluster,
    /// The test's namespace.
    pub namespace: TestNamespace,
    /// Where pods download the models from.
    pub models: ServedModels,
}

impl WorkerTest {
    /// Sets one up, the namespace named after `prefix`.
    pub fn start(prefix: &str) -> anyhow::Result<WorkerTest> {
        let cluster = Cluster::connect();
        cluster.ensure_crd()?;
        let namespace = cluster.namespace(prefix)?;
        let models = ServedModels::start()?;
        Ok(WorkerTest {
            cluster,
            namespace,
            models,
        })
    }
}

/// Runs a repository script (path relative to the root) and returns its trimmed stdout.
pub fn script_output(cmd: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(repo_root().join(cmd))
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {cmd}"))?;
    if !out.status.success() {
        bail!("{cmd} {args:?} failed");
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The repository root (for committed manifests such as `crds/` and `docs/examples/`).
pub fn repo_root() -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

impl Cluster {
    /// Applies the committed InferencePipeline CRD server-side (idempotent beside tests that
    /// install the same file through the chart) and waits until it is served.
    pub fn ensure_crd(&self) -> anyhow::Result<()> {
        let crd = repo_root().join("crds/inferencepipelines.tandem.dev.yaml");
        let crd = crd.to_str().context("repository path is not UTF-8")?;
        self.kubectl_ok([
            "apply",
            "--server-side",
            "--force-conflicts",
            "--field-manager=tandem-e2e",
            "-f",
            crd,
        ])?;
        self.kubectl_ok([
            "wait",
            "--for=condition=Established",
            "crd/inferencepipelines.tandem.dev",
            "--timeout=60s",
        ])?;
        Ok(())
    }
}

/// `namespace/name` of a Deployment that runs a Tandem operator without `--namespace`, which
/// would reconcile every namespace's pipelines (the chart's cluster-wide install, as the demo
/// leaves it); `None` when there is none, or when the Deployments cannot be listed.
fn cluster_wide_operator(cluster: &Cluster) -> Option<String> {
    let list = cluster.get_json(&["deployments", "-A"]).ok()?;
    list["items"].as_array()?.iter().find_map(|d| {
        let containers = d["spec"]["template"]["spec"]["containers"].as_array()?;
        let watches_all = containers.iter().any(|c| {
            let args: Vec<&str> = c["args"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(serde_json::Value::as_str)
                .collect();
            c["image"]
                .as_str()
                .is_some_and(|i| i.contains("tandem-operator"))
                && args.first() == Some(&"run")
                && !args.iter().any(|a| a.starts_with("--namespace"))
        });
        watches_all.then(|| {
            format!(
                "{}/{}",
                d["metadata"]["namespace"].as_str().unwrap_or_default(),
                d["metadata"]["name"].as_str().unwrap_or_default()
            )
        })
    })
}

/// A namespace owned by one test; deleted (without waiting) on drop.
#[derive(Debug)]
pub struct TestNamespace {
    cluster: Cluster,
    name: String,
}

impl TestNamespace {
    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        let _ = self
            .cluster
            .kubectl(["delete", "namespace", &self.name, "--wait=false"]);
    }
}

/// Polls `check` every 200 ms until it returns `Some`, an error, or `timeout`
/// passes. Errors from `check` end the wait at once.
pub fn wait_until<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check()? {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A minimal HTTP/1.0 GET (no TLS, no redirects, so no chunked bodies):
/// returns (status, body). Enough for probing test servers on pod IPs.
pub fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> anyhow::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("malformed HTTP response from {addr}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status line in response from {addr}"))?;
    Ok((status, body.to_owned()))
}

/// Processes on this machine whose environment has `POD_NAME=<pod>`: how the
/// tests see whether a pod's processes still run, independent of the agent.
pub fn processes_of_pod(pod: &str) -> Vec<u32> {
    let needle = format!("POD_NAME={pod}");
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()))
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .map(|env| env.split(|b| *b == 0).any(|kv| kv == needle.as_bytes()))
                .unwrap_or(false)
        })
        .collect()
}

/// `cargo` arguments that build the operator, its kubectl plugin, the worker and the node agent
/// exactly as `tests/kube/cluster up` does, so a test never triggers a differently featured
/// rebuild of shared dependencies.
pub const BUILD_ARGS: &[&str] = &[
    "build",
    "-p",
    "tandem-node-agent",
    "-p",
    "tandem-worker",
    "-p",
    "tandem-operator",
];

/// Whether `name` is one of the variables `cargo test` sets for the test process itself (its
/// package's name, version and manifest directory, `OUT_DIR`, …). A `cargo` spawned from a test
/// must not inherit them: build scripts such as ring's declare `rerun-if-env-changed` on exactly
/// these names, so inheriting them re-runs those scripts and recompiles everything above them
/// (ring → rustls → kube → the operator), once per test binary, in a second copy on disk.
fn is_test_process_cargo_var(name: &str) -> bool {
    name.starts_with("CARGO_PKG_")
        || name.starts_with("CARGO_MANIFEST_")
        || name.starts_with("CARGO_BIN_")
        || matches!(
            name,
            "CARGO_CRATE_NAME"
                | "CARGO_PRIMARY_PACKAGE"
                | "CARGO_TARGET_TMPDIR"
                | "CARGO_RUSTC_CURRENT_DIR"
                | "OUT_DIR"
        )
}

/// Builds the binaries the tests start (see [`BUILD_ARGS`]) once per test binary and returns
/// the directory that holds them.
pub fn bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        let mut build = Command::new(cargo);
        for (name, _) in std::env::vars_os() {
            if name.to_str().is_some_and(is_test_process_cargo_var) {
                build.env_remove(name);
            }
        }
        let status = build
            .args(BUILD_ARGS)
            .current_dir(repo_root())
            .status()
            .expect("running cargo build");
        assert!(status.success(), "cargo {BUILD_ARGS:?} failed");
        std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo_root().join("target"))
            .join("debug")
    })
}

/// Builds `tandem-operator` (once per test binary) and returns its path.
pub fn operator_binary() -> PathBuf {
    let bin = bin_dir().join("tandem-operator");
    assert!(bin.exists(), "{} missing after cargo build", bin.display());
    bin
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// The condition of `type_` in a pipeline's status (`null` when it has none).
pub fn condition<'a>(p: &'a serde_json::Value, type_: &str) -> &'a serde_json::Value {
    static NULL: serde_json::Value = serde_json::Value::Null;
    p["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == type_))
        .unwrap_or(&NULL)
}

/// A `tandem-operator run` process watching one namespace; killed on drop.
pub struct Operator {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

/// The key file every operator a test starts in `ns` reads, unless it is given its own.
pub fn control_key_file(ns: &str) -> PathBuf {
    std::env::temp_dir().join(format!("tandem-control-key-{ns}"))
}

/// What [`control_key_file`] holds.
fn default_control_key(ns: &str) -> String {
    format!("e2e-control-key-{ns}-0123456789abcdef0123456789abcdef\n")
}

impl Operator {
    /// Starts one and waits for its `/healthz`.
    pub fn start(cluster: &Cluster, ns: &str, identity: &str) -> Operator {
        Self::start_with(cluster, ns, identity, &[])
    }

    /// Starts one with extra `run` flags (e.g. autoscaler knobs) and waits for its `/healthz`.
    pub fn start_with(cluster: &Cluster, ns: &str, identity: &str, extra: &[String]) -> Operator {
        Self::start_with_env(cluster, ns, identity, extra, &[])
    }

    /// Like [`Operator::start_with`], with extra environment variables (e.g. OTLP settings).
    pub fn start_with_env(
        cluster: &Cluster,
        ns: &str,
        identity: &str,
        extra: &[String],
        env: &[(&str, &str)],
    ) -> Operator {
        if let Some(other) = cluster_wide_operator(cluster) {
            panic!(
                "a Tandem operator watching every namespace runs in the cluster ({other}): it \
                 would reconcile this test's pipelines too. The demo leaves one installed; start \
                 from a fresh cluster (`tests/kube/cluster down`) or uninstall it."
            );
        }
        let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let log = std::env::temp_dir().join(format!("tandem-operator-{ns}-{identity}.log"));
        // Worker control ports take the pipelines' tokens, as with the chart: one key per
        // namespace, shared by every operator a test starts there (as replicas share the
        // chart's Secret), unless the test passes its own `--control-key-file`.
        let key = control_key_file(ns);
        std::fs::write(&key, default_control_key(ns)).expect("control key file");
        let own_key = extra.iter().any(|a| a.starts_with("--control-key-file="));
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(operator_binary())
            .args([
                "run",
                "--namespace",
                ns,
                "--lease-namespace",
                ns,
                "--lease-duration",
                "4s",
            ])
            .args(["--identity", identity, "--log-format", "text"])
            .arg(format!("--metrics-addr={addr}"))
            .args((!own_key).then(|| format!("--control-key-file={}", key.display())))
            .args(extra)
            .env("KUBECONFIG", cluster.kubeconfig())
            .env("RUST_LOG", "info,tandem_operator=debug")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .spawn()
            .expect("starting tandem-operator");
        let op = Operator { child, addr, log };
        wait_until("the operator's /healthz", Duration::from_secs(30), || {
            Ok(http_get(op.addr, "/healthz", Duration::from_secs(1))
                .ok()
                .filter(|(s, _)| *s == 200)
                .map(|_| ()))
        })
        .unwrap_or_else(|e| panic!("{e:#}\n{}", op.log_tail()));
        op
    }

    /// Its `/metrics` text (empty when unreachable).
    pub fn metrics(&self) -> String {
        http_get(self.addr, "/metrics", Duration::from_secs(2))
            .map(|(_, b)| b)
            .unwrap_or_default()
    }

    /// Whether it reports holding the lease.
    pub fn is_leader(&self) -> bool {
        self.metrics()
            .lines()
            .any(|l| l.trim() == "tandem_operator_leader 1")
    }

    /// Whether `/readyz` answers 200 (a leader only once its caches are synced).
    pub fn is_ready(&self) -> bool {
        http_get(self.addr, "/readyz", Duration::from_secs(2)).is_ok_and(|(code, _)| code == 200)
    }

    /// Successful reconciles so far.
    pub fn successes(&self) -> u64 {
        self.metrics()
            .lines()
            .find_map(|l| l.strip_prefix("tandem_operator_reconcile_total{outcome=\"Success\"} "))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    }

    /// SIGKILL: the process dies without releasing its lease or finishing anything.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn terminate(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let code = wait_until("the operator to exit", Duration::from_secs(30), || {
            Ok(self.child.try_wait()?)
        })
        .unwrap_or_else(|e| panic!("{e:#}\n{}", self.log_tail()));
        assert!(
            code.success(),
            "operator exited with {code}\n{}",
            self.log_tail()
        );
    }

    /// The last 40 lines of its log, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        format!(
            "--- operator log ({}) ---\n{}",
            self.log.display(),
            lines[lines.len().saturating_sub(40)..].join("\n")
        )
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
