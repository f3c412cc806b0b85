//! The Helm chart `helm/tandem`.
//!
//! Without a cluster: the chart's CRD is byte for byte the committed `crds/` one, `helm lint`
//! is clean, and bad values fail at render time with a message naming the value.
//!
//! Against the local cluster (tier 4): the rendered chart passes a server-side dry run; an
//! installed chart runs the operator *as its ServiceAccount* (the node agent hands pods a token
//! kubeconfig), which reconciles an example pipeline end to end; the ServiceAccount can do
//! exactly what the operator needs and nothing more; `helm upgrade` rolls the operator and it
//! keeps reconciling; `helm uninstall` leaves nothing of the chart behind.
//!
//! `helm` and `kubectl` come from `eval "$(tests/kube/cluster env)"`.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use tandem_e2e::{Cluster, http_get, processes_of_pod, wait_until};

const CRD_NAME: &str = "inferencepipelines.tandem.dev";
const RELEASE: &str = "tandem";
/// The operator's metrics/health port (chart default `metrics.port`).
const METRICS_PORT: u16 = 8080;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn chart_dir() -> PathBuf {
    repo_root().join("helm/tandem")
}

fn helm<I, S>(args: I) -> anyhow::Result<Output>
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    Command::new("helm")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context(
            "running helm: put the cluster's helm on PATH with `eval \"$(tests/kube/cluster env)\"`",
        )
}

fn helm_ok<I, S>(args: I) -> anyhow::Result<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let args: Vec<std::ffi::OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let out = helm(&args)?;
    if !out.status.success() {
        bail!(
            "helm {:?} failed: {}{}",
            args,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `*.yaml` file names and contents of a directory, sorted by name.
fn yaml_files(dir: &Path) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .context("file name")?
                .to_owned();
            files.push((name, std::fs::read(&path)?));
        }
    }
    files.sort();
    Ok(files)
}

#[test]
fn the_charts_crds_are_byte_identical_to_the_committed_crds() -> anyhow::Result<()> {
    let committed = yaml_files(&repo_root().join("crds"))?;
    let chart = yaml_files(&chart_dir().join("crds"))?;
    assert!(!committed.is_empty(), "crds/ holds no CRD");
    let names = |v: &[(String, Vec<u8>)]| v.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    assert_eq!(
        names(&chart),
        names(&committed),
        "helm/tandem/crds/ must hold the same files as crds/ (copy them: cp crds/*.yaml helm/tandem/crds/)"
    );
    for ((name, a), (_, b)) in chart.iter().zip(&committed) {
        assert!(
            a == b,
            "helm/tandem/crds/{name} differs from crds/{name}: copy it (cp crds/{name} helm/tandem/crds/)"
        );
    }
    Ok(())
}

#[test]
fn helm_lint_is_clean_in_both_rbac_scopes() -> anyhow::Result<()> {
    let chart = chart_dir();
    let scopes: [&[&str]; 2] = [&[], &["--set", "rbac.scope=Namespaced"]];
    for extra in scopes {
        let mut args: Vec<&std::ffi::OsStr> =
            vec!["lint".as_ref(), "--strict".as_ref(), chart.as_os_str()];
        args.extend(extra.iter().map(std::ffi::OsStr::new));
        let out = helm_ok(&args)?;
        assert!(out.contains("0 chart(s) failed"), "helm lint: {out}");
        assert!(
            !out.contains("[WARNING]") && !out.contains("[ERROR]"),
            "helm lint: {out}"
        );
    }
    Ok(())
}

/// Renders the chart with `args` (`--set`, `--set-string`, ...) and asserts that Helm refuses
/// it with a message containing `expected`.
fn assert_render_refused(args: &[&str], expected: &str) -> anyhow::Result<()> {
    let chart = chart_dir();
    let mut all: Vec<&std::ffi::OsStr> = vec!["template".as_ref(), "t".as_ref(), chart.as_os_str()];
    all.extend(args.iter().map(std::ffi::OsStr::new));
    let out = helm(&all)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "{args:?} rendered, but must be rejected"
    );
    assert!(
        stderr.contains(expected),
        "{args:?}: the error should name {expected:?}, got: {stderr}"
    );
    Ok(())
}

/// Renders the chart's templates with `args`; fails the test when Helm refuses them.
fn render(args: &[&str]) -> anyhow::Result<String> {
    let chart = chart_dir();
    let mut all: Vec<&std::ffi::OsStr> =
        vec!["template".as_ref(), RELEASE.as_ref(), chart.as_os_str()];
    all.extend(args.iter().map(std::ffi::OsStr::new));
    helm_ok(&all)
}

#[test]
fn bad_values_fail_at_render_time_with_a_message_naming_the_value() -> anyhow::Result<()> {
    let cases = [
        ("rbac.scope=Everywhere", "/rbac/scope"),
        ("replicaCount=0", "/replicaCount"),
        (
            "leaderElection.leaseDuration=soon",
            "/leaderElection/leaseDuration",
        ),
        ("image.digest=latest", "/image/digest"),
        ("reconcileTimeout=30", "/reconcileTimeout"),
        (
            "podSecurityContext.runAsNonRoot=false",
            "/podSecurityContext/runAsNonRoot",
        ),
        (
            "securityContext.allowPrivilegeEscalation=true",
            "/securityContext/allowPrivilegeEscalation",
        ),
        ("metrics.port=80", "/metrics/port"),
        (
            "worker.image.pullPolicy=Sometimes",
            "/worker/image/pullPolicy",
        ),
        ("replicas=3", "additional properties 'replicas'"),
        ("tracing.samplingRatio=1.5", "/tracing/samplingRatio"),
        (
            "worker.imagePullSecrets[0].secret=regcred",
            "/worker/imagePullSecrets/0",
        ),
        // Values the API server would refuse at apply time, after Helm had started.
        (
            "podDisruptionBudget.maxUnavailable=abc",
            "'/podDisruptionBudget/maxUnavailable': 'abc' does not match pattern",
        ),
        (
            "podDisruptionBudget.maxUnavailable=-1",
            "'/podDisruptionBudget/maxUnavailable': minimum: got -1, want 1",
        ),
        (
            "resources.limits.memory=lots",
            "'/resources/limits/memory': 'lots' does not match pattern",
        ),
        (
            "resources.requests.cpu=-1",
            "'/resources/requests/cpu': minimum: got -1, want 0",
        ),
        (
            "extraEnv[0].name=FOO,extraEnv[0].bogus=x",
            "'/extraEnv/0': additional properties 'bogus' not allowed",
        ),
        // Values the API server accepts but that break the operator or the cluster's upkeep:
        // maxUnavailable 0 blocks every node drain, a zero grace period kills a reconcile.
        (
            "podDisruptionBudget.maxUnavailable=0",
            "'/podDisruptionBudget/maxUnavailable': minimum: got 0, want 1",
        ),
        (
            "terminationGracePeriodSeconds=0",
            "'/terminationGracePeriodSeconds': minimum: got 0, want 15",
        ),
    ];
    for (set, expected) in cases {
        assert_render_refused(&["--set", set], expected)?;
    }
    assert_render_refused(
        &["--set-string", "podDisruptionBudget.maxUnavailable=0%"],
        "'/podDisruptionBudget/maxUnavailable': '0%' does not match pattern",
    )?;
    assert_render_refused(
        &["--set", "serviceAccount.create=false"],
        "serviceAccount.name must name an existing ServiceAccount",
    )?;
    // What the refusals leave possible still renders.
    let pdb = render(&[
        "--set-string",
        "podDisruptionBudget.maxUnavailable=50%",
        "--set",
        "resources.limits.cpu=1500m,resources.limits.memory=1Gi,resources.requests.cpu=0.5",
        "--set",
        "extraEnv[0].name=FOO,extraEnv[0].value=bar",
        "--show-only",
        "templates/pdb.yaml",
    ])?;
    assert!(pdb.contains("maxUnavailable: \"50%\""), "{pdb}");
    Ok(())
}

/// The docs say the operator's hardening is pinned: no value removes or weakens what a
/// restricted Pod Security Standard namespace requires, or the read-only root file system.
#[test]
fn the_pod_hardening_cannot_be_removed_or_weakened_through_values() -> anyhow::Result<()> {
    let cases = [
        ("securityContext=null", "missing property 'securityContext'"),
        (
            "podSecurityContext=null",
            "missing property 'podSecurityContext'",
        ),
        (
            "securityContext.runAsUser=0",
            "'/securityContext/runAsUser': minimum: got 0, want 1",
        ),
        (
            "securityContext.runAsNonRoot=false",
            "'/securityContext/runAsNonRoot': value must be true",
        ),
        (
            "securityContext.privileged=true",
            "'/securityContext/privileged': value must be false",
        ),
        (
            "securityContext.readOnlyRootFilesystem=false",
            "'/securityContext/readOnlyRootFilesystem': value must be true",
        ),
        (
            "securityContext.capabilities.add[0]=SYS_ADMIN",
            "'/securityContext/capabilities/add': maxItems: got 1, want 0",
        ),
        (
            "securityContext.capabilities.drop[0]=NET_RAW",
            "'/securityContext/capabilities/drop': no items match contains schema",
        ),
        (
            "securityContext.capabilities=null",
            "'/securityContext': missing property 'capabilities'",
        ),
        (
            "securityContext.seccompProfile.type=Unconfined",
            "'/securityContext/seccompProfile/type': value must be one of 'RuntimeDefault', 'Localhost'",
        ),
        (
            "securityContext.readonlyRootFilesystem=true",
            "'/securityContext': additional properties 'readonlyRootFilesystem' not allowed",
        ),
        (
            "podSecurityContext.runAsUser=0",
            "'/podSecurityContext/runAsUser': minimum: got 0, want 1",
        ),
        (
            "podSecurityContext.seccompProfile.type=Unconfined",
            "'/podSecurityContext/seccompProfile/type': value must be one of 'RuntimeDefault', 'Localhost'",
        ),
        (
            "podSecurityContext.seccompProfile=null",
            "'/podSecurityContext': missing property 'seccompProfile'",
        ),
        (
            "podSecurityContext.seccompProfile.type=Localhost",
            "'/podSecurityContext/seccompProfile': missing property 'localhostProfile'",
        ),
        (
            "podSecurityContext.appArmorProfile.type=Unconfined",
            "'/podSecurityContext/appArmorProfile/type': value must be one of 'RuntimeDefault', 'Localhost'",
        ),
    ];
    for (set, expected) in cases {
        assert_render_refused(&["--set", set], expected)?;
    }
    // Tightening or adapting stays possible: another non-root uid, a Localhost profile, the
    // local cluster's sets (no uid at all; runAsNonRoot still enforces non-root).
    let rendered = render(&[
        "--set",
        "securityContext.runAsUser=1000,podSecurityContext.fsGroup=2000",
        "--set",
        "podSecurityContext.seccompProfile.type=Localhost",
        "--set",
        "podSecurityContext.seccompProfile.localhostProfile=profiles/tandem.json",
        "--set",
        LOCAL_CLUSTER_SETS[0],
        "--set",
        LOCAL_CLUSTER_SETS[1],
        "--show-only",
        "templates/deployment.yaml",
    ])?;
    for needle in [
        "localhostProfile: profiles/tandem.json",
        "runAsUser: 1000",
        "readOnlyRootFilesystem: true",
    ] {
        assert!(rendered.contains(needle), "no {needle:?} in:\n{rendered}");
    }
    Ok(())
}

/// Values the schema cannot judge alone (a relation between two values, a duration's size, a
/// key the chart reserves) fail at render time with what to do, not at run time.
#[test]
fn values_that_would_break_the_operator_at_run_time_fail_at_render_time_with_what_to_do()
-> anyhow::Result<()> {
    let cases = [
        (
            "leaderElection.leaseDuration=0s",
            "leaderElection.leaseDuration must be at least 5s (got 0s)",
        ),
        (
            "leaderElection.leaseDuration=5500ms",
            "leaderElection.leaseDuration must be a whole number of seconds (got 5500ms)",
        ),
        (
            "reconcileTimeout=0s",
            "reconcileTimeout must be at least 5s (got 0s)",
        ),
        (
            "reconcileTimeout=1m",
            "terminationGracePeriodSeconds (45) must be at least reconcileTimeout (1m) + 10s",
        ),
        (
            "terminationGracePeriodSeconds=39",
            "terminationGracePeriodSeconds (39) must be at least reconcileTimeout (30s) + 10s",
        ),
        (
            "rbac.watchNamespaces={ml}",
            "rbac.watchNamespaces (ml) is only read with rbac.scope=Namespaced",
        ),
        (
            "podLabels.app\\.kubernetes\\.io/name=evil",
            "podLabels must not set app.kubernetes.io/name",
        ),
        (
            "podLabels.app\\.kubernetes\\.io/instance=evil",
            "podLabels must not set app.kubernetes.io/instance",
        ),
        (
            "extraArgs[0]=--lease-name=other",
            "extraArgs must not set --lease-name=other",
        ),
    ];
    for (set, expected) in cases {
        assert_render_refused(&["--set", set], expected)?;
    }
    // The defaults satisfy every relation, and a longer reconcile deadline renders once the
    // grace period covers it.
    let rendered = render(&["--show-only", "templates/deployment.yaml"])?;
    assert!(
        rendered.contains("terminationGracePeriodSeconds: 45")
            && rendered.contains("- --reconcile-timeout=30s"),
        "the default grace period must cover the default reconcileTimeout + 10s:\n{rendered}"
    );
    render(&[
        "--set",
        "reconcileTimeout=1m,terminationGracePeriodSeconds=70,leaderElection.leaseDuration=5s",
    ])?;
    render(&[
        "--set",
        "rbac.scope=Namespaced,rbac.watchNamespaces={ml},podLabels.team=ml",
    ])?;
    Ok(())
}

/// A parent chart that vendors this one under `charts/` renders: Helm passes the parent's
/// `global` values (and the `enabled` key of a `condition`) down to the subchart, and the
/// schema must not refuse them.
/// The rendered objects of `kind`, parsed.
fn rendered(yaml: &str, kind: &str) -> anyhow::Result<Vec<serde_json::Value>> {
    let mut out = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(yaml) {
        let v: serde_json::Value = serde::Deserialize::deserialize(doc)?;
        if v["kind"] == kind {
            out.push(v);
        }
    }
    Ok(out)
}

#[test]
fn prometheus_operator_monitors_and_alerts_render_only_when_asked_and_select_the_right_targets()
-> anyhow::Result<()> {
    let plain = render(&[])?;
    assert!(!plain.contains("monitoring.coreos.com"), "off by default");
    let all = [
        "--set",
        "monitoring.serviceMonitor.enabled=true",
        "--set",
        "monitoring.podMonitor.enabled=true",
        "--set",
        "monitoring.prometheusRule.enabled=true",
        "--set",
        "monitoring.serviceMonitor.labels.release=kps",
    ];
    let yaml = render(&all)?;

    // The ServiceMonitor selects the metrics Service, by its labels and port name.
    let sm = &rendered(&yaml, "ServiceMonitor")?[0];
    let service = &rendered(&yaml, "Service")?[0];
    assert_eq!(sm["metadata"]["labels"]["release"], "kps");
    for (k, v) in sm["spec"]["selector"]["matchLabels"]
        .as_object()
        .into_iter()
        .flatten()
    {
        assert_eq!(&service["metadata"]["labels"][k], v, "label {k}");
    }
    assert_eq!(
        sm["spec"]["endpoints"][0]["port"],
        service["spec"]["ports"][0]["name"]
    );
    assert_eq!(sm["spec"]["endpoints"][0]["honorLabels"], true);

    // The PodMonitor selects worker pods by the labels the operator gives them: every
    // namespace in Cluster scope, the watched ones in Namespaced scope.
    let pm = &rendered(&yaml, "PodMonitor")?[0];
    let service_name = service["metadata"]["name"]
        .as_str()
        .context("Service name")?;
    let pod_monitor_job = format!(
        "{}/{}",
        pm["metadata"]["namespace"].as_str().context("namespace")?,
        pm["metadata"]["name"].as_str().context("name")?
    );
    assert_eq!(
        pm["spec"]["selector"]["matchLabels"],
        serde_json::json!({"app.kubernetes.io/name": "tandem-worker",
                           "app.kubernetes.io/managed-by": "tandem-operator"})
    );
    assert_eq!(pm["spec"]["podMetricsEndpoints"][0]["port"], "metrics");
    assert_eq!(pm["spec"]["namespaceSelector"]["any"], true);
    let mut namespaced = all.to_vec();
    namespaced.extend([
        "--set",
        "rbac.scope=Namespaced",
        "--set",
        "rbac.watchNamespaces={ml,search}",
    ]);
    let pm = &rendered(&render(&namespaced)?, "PodMonitor")?[0];
    assert_eq!(
        pm["spec"]["namespaceSelector"],
        serde_json::json!({"matchNames": ["ml", "search"]})
    );

    // Every alert parses as PromQL and selects the job of the monitor that scrapes it.
    let rule = &rendered(&yaml, "PrometheusRule")?[0];
    let mut alerts = 0;
    for group in rule["spec"]["groups"].as_array().into_iter().flatten() {
        for r in group["rules"].as_array().into_iter().flatten() {
            let expr = r["expr"].as_str().context("an expr")?;
            promql_parser::parser::parse(expr)
                .map_err(|e| anyhow::anyhow!("{}: {expr}: {e}", r["alert"]))?;
            // Prometheus Operator's job names: the Service's name for a ServiceMonitor,
            // `<namespace>/<name>` of the PodMonitor for a PodMonitor.
            let job = if expr.contains("tandem_operator_") {
                format!("job=\"{}\"", service_name)
            } else {
                format!("job=\"{pod_monitor_job}\"")
            };
            assert!(
                expr.contains(&job),
                "{}: {expr} should select {job}",
                r["alert"]
            );
            assert!(r["labels"]["severity"].is_string(), "{}", r["alert"]);
            alerts += 1;
        }
    }
    assert!(alerts >= 8, "{alerts} alerts");

    assert_render_refused(
        &[
            "--set",
            "monitoring.serviceMonitor.enabled=true",
            "--set",
            "metrics.service.enabled=false",
        ],
        "monitoring.serviceMonitor.enabled needs metrics.service.enabled",
    )?;
    Ok(())
}

#[test]
fn the_chart_renders_as_a_subchart_of_a_parent_chart() -> anyhow::Result<()> {
    let parent = std::env::temp_dir().join(format!("tandem-parent-chart-{}", std::process::id()));
    struct RemoveOnDrop(PathBuf);
    impl Drop for RemoveOnDrop {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _cleanup = RemoveOnDrop(parent.clone());
    let charts = parent.join("charts");
    std::fs::create_dir_all(&charts)?;
    std::fs::write(
        parent.join("Chart.yaml"),
        "apiVersion: v2\nname: platform\nversion: 1.0.0\ndependencies:\n\
         - name: tandem\n  version: \">=0.0.0-0\"\n  condition: tandem.enabled\n",
    )?;
    std::fs::write(
        parent.join("values.yaml"),
        "global:\n  imageRegistry: registry.example.com\n  storageClass: fast\n\
         tandem:\n  enabled: true\n  rbac:\n    scope: Namespaced\n",
    )?;
    helm_ok([
        "package".as_ref(),
        chart_dir().as_os_str(),
        "--destination".as_ref(),
        charts.as_os_str(),
    ])?;
    let rendered = helm_ok([
        "template".as_ref(),
        "platform".as_ref(),
        parent.as_os_str(),
        "-n".as_ref(),
        "ml".as_ref(),
    ])?;
    for needle in [
        "kind: Deployment",
        "name: platform-tandem",
        "- --namespace=ml",
    ] {
        assert!(
            rendered.contains(needle),
            "the subchart rendered no {needle:?}:\n{rendered}"
        );
    }
    // The subchart's schema still applies to the values the parent gives it.
    let out = helm([
        "template".as_ref(),
        "platform".as_ref(),
        parent.as_os_str(),
        "--set".as_ref(),
        "tandem.replicaCount=0".as_ref(),
    ])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("/replicaCount"),
        "tandem.replicaCount=0 in the parent must be refused: {stderr}"
    );
    Ok(())
}

#[test]
fn the_rendered_chart_passes_a_server_side_dry_run_in_both_rbac_scopes() -> anyhow::Result<()> {
    let cluster = Cluster::connect();
    let ns = cluster.namespace("chart-dry")?;
    let chart = chart_dir();
    for scope in ["Cluster", "Namespaced"] {
        let manifest = helm_ok([
            "template".as_ref(),
            RELEASE.as_ref(),
            chart.as_os_str(),
            "--include-crds".as_ref(),
            "-n".as_ref(),
            ns.name().as_ref(),
            "--set".as_ref(),
            format!("rbac.scope={scope}").as_ref(),
        ])?;
        let out = cluster.kubectl_stdin(&["apply", "--dry-run=server"], &manifest)?;
        assert!(
            out.status.success(),
            "rbac.scope={scope}: kubectl apply --dry-run=server failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        for kind in [
            "customresourcedefinition",
            "deployment.apps",
            "lease.coordination.k8s.io",
            "serviceaccount",
        ] {
            assert!(
                stdout.contains(kind),
                "rbac.scope={scope}: no {kind} in {stdout}"
            );
        }
    }
    Ok(())
}

/// Makes sure the CRD exists and is Established. It is cluster-scoped and shared by every test,
/// so the chart is installed with `--skip-crds` and the CRD applied here from the chart's copy
/// (which the drift test keeps identical to `crds/`).
fn ensure_crd(cluster: &Cluster) -> anyhow::Result<()> {
    let crd = std::fs::read_to_string(chart_dir().join("crds").join(format!("{CRD_NAME}.yaml")))?;
    let out = cluster.kubectl_stdin(&["apply", "--server-side", "--force-conflicts"], &crd)?;
    if !out.status.success() {
        bail!("applying the CRD: {}", String::from_utf8_lossy(&out.stderr));
    }
    cluster.kubectl_ok([
        "wait",
        "--for=condition=Established",
        "--timeout=30s",
        &format!("crd/{CRD_NAME}"),
    ])?;
    Ok(())
}

/// Values every install on the local cluster adds. The test node agent keeps pod directories
/// (and the token kubeconfig it writes there) under its state dir, by default below `/root`
/// (mode 0700), so a pod running as uid 65532 cannot enter its own working directory. Until the
/// agent places pod directories where any uid can reach them, the operator pods run as the
/// agent's user here: `runAsNonRoot` stays set (the agent does not enforce it), and the RBAC
/// under test is the same, since authentication is by ServiceAccount token either way.
const LOCAL_CLUSTER_SETS: [&str; 2] = [
    "podSecurityContext.runAsUser=null",
    "podSecurityContext.runAsGroup=null",
];

/// A Helm release in one namespace; uninstalled (best effort) on drop so a failed test does not
/// leave its ClusterRole behind.
struct Release {
    namespace: String,
    /// `--set` values of the install, repeated on upgrade.
    base: Vec<String>,
    uninstalled: bool,
}

impl Release {
    fn install(cluster: &Cluster, namespace: &str, sets: &[&str]) -> anyhow::Result<Release> {
        // The node agent runs the chart's images as the workspace's binaries: build them now,
        // or a test run right after an edit would install the previous operator.
        tandem_e2e::bin_dir();
        ensure_crd(cluster)?;
        let chart = chart_dir();
        let mut args: Vec<std::ffi::OsString> = vec![
            "install".into(),
            RELEASE.into(),
            chart.into(),
            "--namespace".into(),
            namespace.into(),
            "--skip-crds".into(),
            "--kubeconfig".into(),
            cluster.kubeconfig().into(),
        ];
        for s in LOCAL_CLUSTER_SETS.iter().chain(sets) {
            args.push("--set".into());
            args.push(s.into());
        }
        helm_ok(&args)?;
        Ok(Release {
            namespace: namespace.to_owned(),
            base: sets.iter().map(|s| s.to_string()).collect(),
            uninstalled: false,
        })
    }

    fn upgrade(&self, cluster: &Cluster, sets: &[&str]) -> anyhow::Result<()> {
        let chart = chart_dir();
        let mut args: Vec<std::ffi::OsString> = vec![
            "upgrade".into(),
            RELEASE.into(),
            chart.into(),
            "--namespace".into(),
            self.namespace.clone().into(),
            "--skip-crds".into(),
            "--kubeconfig".into(),
            cluster.kubeconfig().into(),
        ];
        for s in LOCAL_CLUSTER_SETS
            .iter()
            .copied()
            .chain(self.base.iter().map(String::as_str))
            .chain(sets.iter().copied())
        {
            args.push("--set".into());
            args.push(s.into());
        }
        helm_ok(&args)?;
        Ok(())
    }

    /// `helm upgrade --reuse-values`: the release's stored values, the local cluster's `null`s
    /// included, which the values schema must accept as "unset".
    fn upgrade_reusing_values(&self, cluster: &Cluster) -> anyhow::Result<()> {
        helm_ok([
            "upgrade".as_ref(),
            RELEASE.as_ref(),
            chart_dir().as_os_str(),
            "--namespace".as_ref(),
            self.namespace.as_ref(),
            "--skip-crds".as_ref(),
            "--reuse-values".as_ref(),
            "--kubeconfig".as_ref(),
            cluster.kubeconfig().as_os_str(),
        ])?;
        Ok(())
    }

    fn uninstall(&mut self, cluster: &Cluster) -> anyhow::Result<()> {
        helm_ok([
            "uninstall".as_ref(),
            RELEASE.as_ref(),
            "--namespace".as_ref(),
            self.namespace.as_ref(),
            "--wait".as_ref(),
            "--timeout".as_ref(),
            "60s".as_ref(),
            "--kubeconfig".as_ref(),
            cluster.kubeconfig().as_os_str(),
        ])?;
        self.uninstalled = true;
        Ok(())
    }
}

impl Drop for Release {
    fn drop(&mut self) {
        if !self.uninstalled {
            let _ = helm([
                "uninstall",
                RELEASE,
                "--namespace",
                &self.namespace,
                "--wait=false",
            ]);
        }
    }
}

/// The operator Deployment's name for release [`RELEASE`].
const OPERATOR: &str = "tandem";

/// Waits until the operator Deployment has rolled out completely: every replica updated to the
/// current template and Ready, no old pod left. Returns the current pods' names and IPs.
fn wait_operator_rolled_out(
    cluster: &Cluster,
    ns: &str,
    replicas: i64,
) -> anyhow::Result<Vec<(String, IpAddr)>> {
    let mut last = serde_json::Value::Null;
    let waited = wait_until(
        "the operator Deployment to be rolled out and Ready",
        Duration::from_secs(180),
        || {
            let d = cluster.get_json(&["deployment", OPERATOR, "-n", ns])?;
            last = d["status"].clone();
            let st = &d["status"];
            let done = st["observedGeneration"] == d["metadata"]["generation"]
                && st["updatedReplicas"].as_i64() == Some(replicas)
                && st["readyReplicas"].as_i64() == Some(replicas)
                && st["replicas"].as_i64() == Some(replicas);
            if !done {
                return Ok(None);
            }
            let pods = cluster.get_json(&[
                "pods",
                "-n",
                ns,
                "-l",
                "app.kubernetes.io/instance=tandem,app.kubernetes.io/component=operator",
            ])?;
            let mut out = Vec::new();
            for p in pods["items"].as_array().into_iter().flatten() {
                if p["metadata"]["deletionTimestamp"].is_string() {
                    return Ok(None);
                }
                let name = p["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                let Some(ip) = p["status"]["podIP"].as_str().and_then(|s| s.parse().ok()) else {
                    return Ok(None);
                };
                out.push((name, ip));
            }
            Ok((out.len() as i64 == replicas).then_some(out))
        },
    );
    waited.with_context(|| {
        let pods = cluster
            .kubectl_ok(["get", "pods", "-n", ns, "-o", "wide"])
            .unwrap_or_default();
        format!("operator Deployment status: {last}\n{pods}")
    })
}

/// The pod holding the leader Lease, once it is one of `pods`.
fn wait_leader(
    cluster: &Cluster,
    ns: &str,
    pods: &[(String, IpAddr)],
) -> anyhow::Result<(String, IpAddr)> {
    wait_until(
        "one of the operator pods to hold the leader Lease",
        Duration::from_secs(60),
        || {
            let lease = cluster.get_json(&["lease", OPERATOR, "-n", ns])?;
            let holder = lease["spec"]["holderIdentity"].as_str().unwrap_or_default();
            Ok(pods.iter().find(|(name, _)| name == holder).cloned())
        },
    )
}

/// Reads the environment of the pod's process and its `KUBECONFIG`: proves the operator
/// authenticates with a ServiceAccount token, not the admin's client certificate.
fn assert_pod_uses_a_service_account_token(pod: &str) -> anyhow::Result<()> {
    let pids = processes_of_pod(pod);
    anyhow::ensure!(!pids.is_empty(), "no process runs pod {pod}");
    // The path in KUBECONFIG is the one the pod sees: read it inside each process's own
    // mount namespace (nsenter) (the node agent bind-mounts the token directory there); launcher
    // processes of the agent may carry the variable without that mount.
    let mut tried = Vec::new();
    let mut found = None;
    for pid in &pids {
        let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        let Some(kubeconfig) = environ
            .split(|b| *b == 0)
            .filter_map(|kv| std::str::from_utf8(kv).ok())
            .find_map(|kv| kv.strip_prefix("KUBECONFIG="))
            .map(str::to_owned)
        else {
            continue;
        };
        let out = std::process::Command::new("nsenter")
            .args(["-t", &pid.to_string(), "-m", "cat", &kubeconfig])
            .output()?;
        if out.status.success() {
            found = Some((
                kubeconfig,
                String::from_utf8_lossy(&out.stdout).into_owned(),
            ));
            break;
        }
        tried.push(format!(
            "pid {pid}: {kubeconfig}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let (kubeconfig, text) = found.with_context(|| {
        format!(
            "pod {pod}: no process has a readable KUBECONFIG ({})",
            tried.join("; ")
        )
    })?;
    assert!(
        text.contains("token"),
        "{pod}'s kubeconfig {kubeconfig} carries no token"
    );
    assert!(
        !text.contains("client-certificate") && !text.contains("client-key"),
        "{pod}'s kubeconfig {kubeconfig} carries a client certificate: the operator must run as its ServiceAccount"
    );
    Ok(())
}

/// What the pod's process wrote to stdout and stderr: the file its stdout points to (the node
/// agent's per-container log), found through /proc so the agent's log layout does not matter.
fn pod_log(pod: &str) -> anyhow::Result<String> {
    let pid = *processes_of_pod(pod)
        .first()
        .with_context(|| format!("no process runs pod {pod}"))?;
    let path = std::fs::read_link(format!("/proc/{pid}/fd/1"))
        .with_context(|| format!("stdout of pod {pod}'s process {pid}"))?;
    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// Fails when an operator pod logged an authorization failure (reconcile, Lease or Event).
fn assert_no_forbidden_in_logs(pods: &[(String, IpAddr)]) -> anyhow::Result<()> {
    for (pod, _) in pods {
        let log = pod_log(pod)?;
        let denied: Vec<&str> = log
            .lines()
            .filter(|l| {
                let l = l.to_ascii_lowercase();
                l.contains("forbidden") || l.contains("unauthorized")
            })
            .take(5)
            .collect();
        assert!(
            denied.is_empty(),
            "operator pod {pod} was denied by the API server: {denied:#?}"
        );
    }
    Ok(())
}

/// `tandem_operator_reconcile_errors_total` samples above zero, other than invalid specs.
fn reconcile_errors(metrics: &str) -> Vec<String> {
    metrics
        .lines()
        .filter(|l| l.starts_with("tandem_operator_reconcile_errors"))
        .filter(|l| !l.contains("InvalidSpec"))
        .filter(|l| {
            l.rsplit(' ')
                .next()
                .and_then(|v| v.parse::<f64>().ok())
                .is_some_and(|v| v > 0.0)
        })
        .map(str::to_owned)
        .collect()
}

/// One permission: (resource, resource names, verb) or (non-resource URL, "", verb).
type Permission = (String, String, String);

/// Parses the table of `kubectl auth can-i --list` by its header's column offsets (the
/// Resources column is blank on non-resource rows, so splitting on whitespace cannot work).
fn parse_can_i_list(table: &str) -> anyhow::Result<BTreeSet<Permission>> {
    let mut lines = table.lines();
    let header = lines.next().context("empty can-i output")?;
    let col = |name: &str| {
        header
            .find(name)
            .with_context(|| format!("no {name:?} column in {header:?}"))
    };
    let (urls, names, verbs) = (
        col("Non-Resource URLs")?,
        col("Resource Names")?,
        col("Verbs")?,
    );
    let cell = |line: &str, from: usize, to: Option<usize>| -> String {
        let end = to.unwrap_or(line.len()).min(line.len());
        line.get(from.min(end)..end)
            .unwrap_or_default()
            .trim()
            .to_owned()
    };
    let list = |s: String| -> Vec<String> {
        s.trim_start_matches('[')
            .trim_end_matches(']')
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    };
    let mut out = BTreeSet::new();
    for line in lines.filter(|l| !l.trim().is_empty()) {
        let resource = cell(line, 0, Some(urls));
        let subject = if resource.is_empty() {
            cell(line, urls, Some(names))
        } else {
            resource
        };
        let resource_names = list(cell(line, names, Some(verbs))).join(",");
        for verb in list(cell(line, verbs, None)) {
            out.insert((subject.clone(), resource_names.clone(), verb));
        }
    }
    Ok(out)
}

/// What `subject` may do in `ns`, as `kubectl auth can-i --list --as=...` reports it.
fn can_i_list(cluster: &Cluster, subject: &str, ns: &str) -> anyhow::Result<BTreeSet<Permission>> {
    let table = cluster.kubectl_ok([
        "auth",
        "can-i",
        "--list",
        &format!("--as={subject}"),
        "-n",
        ns,
    ])?;
    parse_can_i_list(&table)
}

/// Permissions `sa` has in `ns` beyond what any ServiceAccount of its namespace has (the
/// namespace's `default` ServiceAccount is the baseline: discovery, self-reviews).
fn extra_permissions(
    cluster: &Cluster,
    sa_ns: &str,
    sa: &str,
    ns: &str,
) -> anyhow::Result<BTreeSet<Permission>> {
    let granted = can_i_list(cluster, &format!("system:serviceaccount:{sa_ns}:{sa}"), ns)?;
    let baseline = can_i_list(
        cluster,
        &format!("system:serviceaccount:{sa_ns}:default"),
        ns,
    )?;
    Ok(granted.difference(&baseline).cloned().collect())
}

fn perms(rows: &[(&str, &str, &[&str])]) -> BTreeSet<Permission> {
    rows.iter()
        .flat_map(|(res, names, verbs)| {
            verbs
                .iter()
                .map(move |v| (res.to_string(), names.to_string(), v.to_string()))
        })
        .collect()
}

/// Exactly what the operator needs where pipelines live (see helm/tandem/templates/rbac.yaml).
fn workload_permissions() -> BTreeSet<Permission> {
    perms(&[
        (
            "inferencepipelines.tandem.dev",
            "",
            &["list", "watch", "patch"],
        ),
        ("inferencepipelines.tandem.dev/status", "", &["patch"]),
        (
            "deployments.apps",
            "",
            &["get", "list", "watch", "create", "patch", "delete"],
        ),
        (
            "poddisruptionbudgets.policy",
            "",
            &["get", "list", "watch", "create", "patch", "delete"],
        ),
        ("services", "", &["get", "list", "watch", "create", "patch"]),
        (
            "configmaps",
            "",
            &["get", "list", "watch", "create", "patch"],
        ),
        (
            "serviceaccounts",
            "",
            &["get", "list", "watch", "create", "patch"],
        ),
        ("pods", "", &["list", "watch"]),
        ("events.events.k8s.io", "", &["create"]),
    ])
}

/// Exactly what the operator needs in its own namespace for leader election.
/// `create` has no name (the name is not known before the object exists): it lets the operator
/// recreate a Lease deleted by hand instead of campaigning for ever.
fn lease_permissions() -> BTreeSet<Permission> {
    perms(&[
        ("leases.coordination.k8s.io", OPERATOR, &["get", "update"]),
        ("leases.coordination.k8s.io", "", &["create"]),
    ])
}

fn assert_permissions(what: &str, got: &BTreeSet<Permission>, want: &BTreeSet<Permission>) {
    let beyond: Vec<_> = got.difference(want).collect();
    let missing: Vec<_> = want.difference(got).collect();
    assert!(
        beyond.is_empty() && missing.is_empty(),
        "{what}: the operator's ServiceAccount may do more than it needs: {beyond:?}; lacks: {missing:?}"
    );
}

/// Objects of the release still present in `ns`, plus its cluster-scoped objects.
fn leftovers(cluster: &Cluster, ns: &str) -> anyhow::Result<Vec<String>> {
    let mut left = Vec::new();
    let kinds = "deployments,replicasets,pods,services,serviceaccounts,roles,rolebindings,poddisruptionbudgets,leases,configmaps,secrets";
    let selector = format!("app.kubernetes.io/instance={RELEASE},app.kubernetes.io/part-of=tandem");
    let names = cluster.kubectl_ok(["get", kinds, "-n", ns, "-l", &selector, "-o", "name"])?;
    left.extend(names.lines().map(str::to_owned));
    let helm_secrets = cluster.kubectl_ok([
        "get",
        "secrets",
        "-n",
        ns,
        "-l",
        &format!("owner=helm,name={RELEASE}"),
        "-o",
        "name",
    ])?;
    left.extend(helm_secrets.lines().map(str::to_owned));
    for kind in ["lease", "serviceaccount", "deployment", "service"] {
        let name = if kind == "service" {
            format!("{OPERATOR}-metrics")
        } else {
            OPERATOR.to_owned()
        };
        if cluster
            .kubectl(["get", kind, &name, "-n", ns])?
            .status
            .success()
        {
            left.push(format!("{kind}/{name}"));
        }
    }
    let cluster_name = format!("{ns}-{OPERATOR}");
    for kind in ["clusterrole", "clusterrolebinding"] {
        if cluster
            .kubectl(["get", kind, &cluster_name])?
            .status
            .success()
        {
            left.push(format!("{kind}/{cluster_name}"));
        }
    }
    left.retain(|l| !l.is_empty());
    Ok(left)
}

fn wait_nothing_left(cluster: &Cluster, ns: &str) -> anyhow::Result<()> {
    let mut last = Vec::new();
    let waited = wait_until(
        "helm uninstall to leave nothing behind",
        Duration::from_secs(60),
        || {
            last = leftovers(cluster, ns)?;
            Ok(last.is_empty().then_some(()))
        },
    );
    if waited.is_err() {
        bail!("after helm uninstall these are left: {last:?}");
    }
    Ok(())
}

/// The example pipeline, placed in `ns`.
fn example_pipeline(ns: &str) -> anyhow::Result<String> {
    let text =
        std::fs::read_to_string(repo_root().join("docs/examples/minilm-text-embedding.yaml"))?;
    Ok(text.replacen(
        "  name: minilm\n",
        &format!("  name: minilm\n  namespace: {ns}\n"),
        1,
    ))
}

fn owned_count(cluster: &Cluster, ns: &str, kind: &str) -> anyhow::Result<usize> {
    let list = cluster.get_json(&[
        kind,
        "-n",
        ns,
        "-l",
        "app.kubernetes.io/instance=minilm,app.kubernetes.io/managed-by=tandem-operator",
    ])?;
    Ok(list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|o| {
            o["metadata"]["ownerReferences"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|r| {
                    r["kind"] == "InferencePipeline"
                        && r["name"] == "minilm"
                        && r["controller"] == true
                })
        })
        .count())
}

/// Waits until the operator has reconciled the pipeline's current generation: every owned
/// kind exists (owned by the pipeline) and status.observedGeneration caught up.
fn wait_reconciled(cluster: &Cluster, ns: &str) -> anyhow::Result<()> {
    wait_until(
        "the operator to reconcile the pipeline",
        Duration::from_secs(120),
        || {
            let p = cluster.get_json(&["inferencepipeline", "minilm", "-n", ns])?;
            if p["status"]["observedGeneration"] != p["metadata"]["generation"] {
                return Ok(None);
            }
            for (kind, at_least) in [
                ("deployments", 2),
                ("services", 1),
                ("configmaps", 1),
                ("serviceaccounts", 1),
                ("poddisruptionbudgets", 2),
            ] {
                if owned_count(cluster, ns, kind)? < at_least {
                    return Ok(None);
                }
            }
            Ok(Some(()))
        },
    )
}

fn leader_metrics(ip: IpAddr) -> anyhow::Result<String> {
    let (status, body) = http_get(
        SocketAddr::new(ip, METRICS_PORT),
        "/metrics",
        Duration::from_secs(5),
    )?;
    if status != 200 {
        bail!("GET /metrics answered {status}: {body}");
    }
    Ok(body)
}

#[test]
fn the_installed_chart_runs_the_operator_as_its_service_account_with_only_the_permissions_it_needs()
-> anyhow::Result<()> {
    let cluster = Cluster::connect();
    let guard = cluster.namespace("chart")?;
    let ns = guard.name();
    // Cluster scope (ClusterRole), but the operator watches only this test's namespace: the
    // local cluster is shared with other tests whose pipelines it must not reconcile.
    let only_here = format!("extraArgs[0]=--namespace={ns}");
    let mut release = Release::install(&cluster, ns, &[&only_here])?;

    // Two replicas Ready; one holds the Lease; it authenticates with its ServiceAccount token.
    let pods = wait_operator_rolled_out(&cluster, ns, 2)?;
    let (leader, leader_ip) = wait_leader(&cluster, ns, &pods)?;
    assert_pod_uses_a_service_account_token(&leader)?;

    // The ServiceAccount may do exactly what the operator needs: workload permissions in every
    // namespace (cluster scope), the Lease only in its own.
    let sa = OPERATOR;
    assert_permissions(
        "release namespace",
        &extra_permissions(&cluster, ns, sa, ns)?,
        &workload_permissions()
            .union(&lease_permissions())
            .cloned()
            .collect(),
    );
    assert_permissions(
        "namespace default",
        &extra_permissions(&cluster, ns, sa, "default")?,
        &workload_permissions(),
    );

    // It reconciles an example pipeline end to end with those permissions alone.
    let out = cluster.kubectl_stdin(&["apply"], &example_pipeline(ns)?)?;
    assert!(
        out.status.success(),
        "applying the example: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_reconciled(&cluster, ns)?;
    let errors = reconcile_errors(&leader_metrics(leader_ip)?);
    assert!(
        errors.is_empty(),
        "the leader counted reconcile errors (RBAC?): {errors:?}"
    );
    assert_no_forbidden_in_logs(&pods)?;
    // The chart's control key reached the operator: the workers got the pipeline's token.
    let control = |what: &[&str]| -> anyhow::Result<String> {
        let mut args = vec!["get"];
        args.extend_from_slice(what);
        args.extend_from_slice(&["-n", ns]);
        cluster.kubectl_ok(args)
    };
    let key = || control(&["secret", "tandem-control-key", "-o", "jsonpath={.data.key}"]);
    let token = || {
        control(&[
            "deployment",
            "minilm-preprocess",
            "-o",
            r#"jsonpath={.spec.template.spec.containers[0].env[?(@.name=="TANDEM_CONTROL_TOKEN")].value}"#,
        ])
    };
    let (key_before, token_before) = (key()?, token()?);
    assert!(key_before.len() >= 64, "the generated key: {key_before:?}");
    assert_eq!(
        token_before.len(),
        64,
        "the worker's token: {token_before:?}"
    );

    // helm upgrade with a changed value rolls the operator; the new leader keeps reconciling.
    release.upgrade(&cluster, &["concurrency=4", "logging.format=text"])?;
    let operator_args = || {
        cluster.kubectl_ok([
            "get",
            "deployment",
            OPERATOR,
            "-n",
            ns,
            "-o",
            "jsonpath={.spec.template.spec.containers[0].args}",
        ])
    };
    let template_args = operator_args()?;
    assert!(
        template_args.contains("--concurrency=4"),
        "upgrade did not change the args: {template_args}"
    );
    let pods = wait_operator_rolled_out(&cluster, ns, 2)?;
    let (leader, _) = wait_leader(&cluster, ns, &pods)?;
    assert_pod_uses_a_service_account_token(&leader)?;
    cluster.kubectl_ok([
        "patch",
        "inferencepipeline",
        "minilm",
        "-n",
        ns,
        "--type=merge",
        "-p",
        r#"{"spec":{"preprocess":{"replicas":{"min":2,"max":4}}}}"#,
    ])?;
    wait_reconciled(&cluster, ns)?;
    assert_no_forbidden_in_logs(&pods)?;
    // The upgrade kept the key, so the workers' token (and pods) stayed as they were.
    assert_eq!(
        key()?,
        key_before,
        "helm upgrade regenerated the control key"
    );
    assert_eq!(token()?, token_before);
    // Mid-rotation (docs/operations.md), an upgrade keeps the previous key too: the template
    // carries it forward (helm's three-way merge would also leave a field it never wrote, but a
    // `--force` upgrade replaces the object), and the operator is told where to find it.
    let previous = "cHJldmlvdXMta2V5LWZvci10aGUtY2hhcnQtdGVzdC0wMTIzNDU2Nzg5YWJjZGVm";
    cluster.kubectl_ok([
        "patch",
        "secret",
        "tandem-control-key",
        "-n",
        ns,
        "--type=merge",
        "-p",
        &format!(r#"{{"data":{{"previous":"{previous}"}}}}"#),
    ])?;
    release.upgrade_reusing_values(&cluster)?;
    let template_args = operator_args()?;
    assert!(
        template_args.contains("--concurrency=4"),
        "helm upgrade --reuse-values lost the release's values: {template_args}"
    );
    assert_eq!(
        control(&[
            "secret",
            "tandem-control-key",
            "-o",
            "jsonpath={.data.previous}"
        ])?,
        previous,
        "helm upgrade dropped the previous key of a rotation in progress"
    );
    assert_eq!(key()?, key_before);
    assert!(
        template_args.contains("--previous-control-key-file=/etc/tandem/control-key/previous"),
        "{template_args}"
    );
    // The operator reads keys at start (the documented rotation restarts it): restarted, it
    // finds the previous key in its mounted Secret.
    cluster.kubectl_ok(["rollout", "restart", "deployment", OPERATOR, "-n", ns])?;
    let pods = wait_operator_rolled_out(&cluster, ns, 2)?;
    for (pod, _) in &pods {
        let log = pod_log(pod)?;
        assert!(
            // Text logs (this release's logging.format) or JSON.
            log.contains("previous_key=true") || log.contains(r#""previous_key":true"#),
            "operator pod {pod} did not load the previous key: {}",
            log.lines().take(5).collect::<Vec<_>>().join("\n")
        );
    }
    wait_leader(&cluster, ns, &pods)?;

    // Uninstall: pipelines first (their objects are theirs, not the chart's), then the chart.
    cluster.kubectl_ok([
        "delete",
        "inferencepipeline",
        "minilm",
        "-n",
        ns,
        "--wait=false",
    ])?;
    release.uninstall(&cluster)?;
    wait_nothing_left(&cluster, ns)?;
    Ok(())
}

#[test]
fn namespaced_scope_grants_the_watched_namespaces_only_and_uninstall_leaves_nothing()
-> anyhow::Result<()> {
    let cluster = Cluster::connect();
    let home = cluster.namespace("chart-home")?;
    let watched = cluster.namespace("chart-watched")?;
    let watched2 = cluster.namespace("chart-watched2")?;
    let (ns, wns, wns2) = (home.name(), watched.name(), watched2.name());
    let mut release = Release::install(
        &cluster,
        ns,
        &[
            "rbac.scope=Namespaced",
            &format!("rbac.watchNamespaces={{{wns},{wns2}}}"),
        ],
    )?;

    // The leader is Ready only once the caches of *both* watched namespaces hold a full list:
    // namespaced list/watch in each suffice.
    let pods = wait_operator_rolled_out(&cluster, ns, 2)?;
    wait_leader(&cluster, ns, &pods)?;

    let sa = OPERATOR;
    for w in [wns, wns2] {
        assert_permissions(
            &format!("watched namespace {w}"),
            &extra_permissions(&cluster, ns, sa, w)?,
            &workload_permissions(),
        );
    }
    assert_permissions(
        "release namespace",
        &extra_permissions(&cluster, ns, sa, ns)?,
        &lease_permissions(),
    );
    assert_permissions(
        "namespace default",
        &extra_permissions(&cluster, ns, sa, "default")?,
        &BTreeSet::new(),
    );
    for kind in ["clusterrole", "clusterrolebinding"] {
        let out = cluster.kubectl(["get", kind, &format!("{ns}-{OPERATOR}")])?;
        assert!(!out.status.success(), "Namespaced scope created a {kind}");
    }

    release.uninstall(&cluster)?;
    wait_nothing_left(&cluster, ns)?;
    for w in [wns, wns2] {
        let role = cluster.kubectl(["get", "role,rolebinding", OPERATOR, "-n", w])?;
        let left = String::from_utf8_lossy(&role.stdout);
        assert!(
            left.trim().is_empty(),
            "left in watched namespace {w}: {left}"
        );
    }
    Ok(())
}

#[test]
fn the_can_i_table_parser_reads_resource_and_non_resource_rows() -> anyhow::Result<()> {
    let table = "\
Resources                                       Non-Resource URLs   Resource Names   Verbs
leases.coordination.k8s.io                      []                  [tandem]         [get update]
pods                                            []                  []               [list]
                                                [/healthz]          []               [get]
";
    let got = parse_can_i_list(table)?;
    let want = perms(&[
        ("leases.coordination.k8s.io", "tandem", &["get", "update"]),
        ("pods", "", &["list"]),
        ("[/healthz]", "", &["get"]),
    ]);
    assert_eq!(got, want);
    Ok(())
}

/// `--set` gives a fraction as a string and a whole number as a number: the values the docs
/// show on the command line must render.
#[test]
fn command_line_values_render_into_the_operators_flags_and_env() -> anyhow::Result<()> {
    let chart = chart_dir();
    let rendered = helm_ok([
        "template".as_ref(),
        RELEASE.as_ref(),
        chart.as_os_str(),
        "--show-only".as_ref(),
        "templates/deployment.yaml".as_ref(),
        "--set".as_ref(),
        "tracing.otlpEndpoint=http://otel-collector.observability:4317".as_ref(),
        "--set".as_ref(),
        "tracing.samplingRatio=0.1".as_ref(),
        "--set".as_ref(),
        "resources.limits.cpu=1".as_ref(),
        "--set".as_ref(),
        "worker.imagePullSecrets[0].name=regcred".as_ref(),
        "--set".as_ref(),
        "worker.imagePullSecrets[1].name=mirror".as_ref(),
    ])?;
    for needle in [
        "- --worker-image-pull-secret=regcred",
        "- --worker-image-pull-secret=mirror",
        "value: \"0.1\"",
        "cpu: 1\n",
    ] {
        assert!(
            rendered.contains(needle),
            "the operator Deployment lacks {needle:?}:\n{rendered}"
        );
    }
    Ok(())
}

#[test]
fn the_operator_pods_are_hardened_and_highly_available_by_default() -> anyhow::Result<()> {
    let chart = chart_dir();
    let rendered = helm_ok([
        "template".as_ref(),
        RELEASE.as_ref(),
        chart.as_os_str(),
        "--show-only".as_ref(),
        "templates/deployment.yaml".as_ref(),
    ])?;
    for needle in [
        "replicas: 2",
        "runAsNonRoot: true",
        "runAsUser: 65532",
        "readOnlyRootFilesystem: true",
        "allowPrivilegeEscalation: false",
        "privileged: false",
        "- ALL",
        "type: RuntimeDefault",
        "livenessProbe:",
        "readinessProbe:",
        "path: /readyz",
        "memory: 256Mi",
        "- --lease-name=tandem",
        "- --worker-image=tandem-worker:0.1.0",
        "image: \"tandem-operator:0.1.0\"",
        "fieldPath: metadata.namespace",
    ] {
        assert!(
            rendered.contains(needle),
            "the operator Deployment lacks {needle:?}:\n{rendered}"
        );
    }
    assert!(
        !rendered.contains("--namespace="),
        "Cluster scope watches every namespace"
    );
    let namespaced = helm_ok([
        "template".as_ref(),
        RELEASE.as_ref(),
        chart.as_os_str(),
        "-n".as_ref(),
        "ml".as_ref(),
        "--set".as_ref(),
        "rbac.scope=Namespaced".as_ref(),
        "--show-only".as_ref(),
        "templates/deployment.yaml".as_ref(),
    ])?;
    assert!(namespaced.contains("- --namespace=ml"), "{namespaced}");
    Ok(())
}
