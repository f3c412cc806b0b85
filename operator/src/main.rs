//! `tandem-operator`: runs the controller (`run`) or prints the CRD (`crd`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use tandem_operator::autoscale::AutoscaleConfig;
use tandem_operator::build::{BuildConfig, WorkerTracing};
use tandem_operator::control_auth::{ControlKey, ControlKeys};
use tandem_operator::controller::{self, ControllerConfig};
use tandem_operator::leader::{self, LeaderConfig};
use tandem_operator::metrics::{self, Metrics};
use tandem_operator::validate::parse_duration;
use tokio::sync::watch;
use tracing::{info, warn};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The Tandem operator: InferencePipeline reconciler.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the InferencePipeline CRD as YAML.
    Crd,
    /// Print the CRD reference (Markdown) committed as `docs/crd-reference.md`.
    CrdReference,
    /// Run the controller (with leader election).
    Run(Box<RunArgs>),
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Worker container image; defaults to `tandem-worker:<operator version>`.
    #[arg(long, env = "TANDEM_WORKER_IMAGE")]
    worker_image: Option<String>,
    /// `imagePullPolicy` for worker containers (cluster default when unset).
    #[arg(long, env = "TANDEM_WORKER_IMAGE_PULL_POLICY")]
    worker_image_pull_policy: Option<String>,
    /// Secrets worker pods pull their image with (repeat the flag or separate with commas).
    /// Each must exist in every namespace where pipelines live.
    #[arg(
        long = "worker-image-pull-secret",
        env = "TANDEM_WORKER_IMAGE_PULL_SECRETS",
        value_delimiter = ',',
        value_name = "SECRET"
    )]
    worker_image_pull_secrets: Vec<String>,
    /// File holding the secret key each pipeline's worker control token is derived from (at
    /// least 32 bytes; the chart mounts one from a Secret it creates). Worker pods then take
    /// `GetStats`/`SetRoutes` only with their pipeline's token; without a key, from anyone who
    /// can reach their control port.
    #[arg(long, env = "TANDEM_CONTROL_KEY_FILE", value_name = "FILE")]
    control_key_file: Option<std::path::PathBuf>,
    /// During a key rotation, the file holding the key used before the current one: a pod not
    /// yet replaced, which still has the old token, is called with that token when it refuses
    /// the current one. A missing file (the chart's Secret has no `previous` entry outside a
    /// rotation) means no previous key.
    #[arg(
        long,
        env = "TANDEM_PREVIOUS_CONTROL_KEY_FILE",
        value_name = "FILE",
        requires = "control_key_file"
    )]
    previous_control_key_file: Option<std::path::PathBuf>,
    /// OTLP/gRPC collector for the worker pods' spans (sets `OTEL_EXPORTER_OTLP_ENDPOINT` in
    /// every worker container); workers export nothing when unset.
    #[arg(long, env = "TANDEM_WORKER_OTLP_ENDPOINT")]
    worker_otlp_endpoint: Option<String>,
    /// Fraction of new traces the workers keep (`parentbased_traceidratio`: a request that
    /// arrives with a sampled `traceparent` is always traced).
    #[arg(long, env = "TANDEM_WORKER_TRACE_SAMPLING_RATIO", default_value_t = 1.0, value_parser = sampling_ratio)]
    worker_trace_sampling_ratio: f64,
    /// Namespaces to watch (repeat the flag or separate with commas); every namespace when
    /// unset. Each watched namespace gets its own caches and reconcile loop.
    #[arg(
        long = "namespace",
        env = "TANDEM_WATCH_NAMESPACES",
        value_delimiter = ',',
        value_name = "NAMESPACE"
    )]
    namespaces: Vec<String>,
    /// Address of `/metrics`, `/healthz` and `/readyz`.
    #[arg(long, env = "TANDEM_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// Name of the leader-election Lease.
    #[arg(long, env = "TANDEM_LEASE_NAME", default_value = "tandem-operator")]
    lease_name: String,
    /// Namespace of the Lease; the pod's (or kubeconfig's) namespace when unset.
    #[arg(long, env = "POD_NAMESPACE")]
    lease_namespace: Option<String>,
    /// How long a Lease stays valid without renewal (e.g. `15s`); a standby takes over after it.
    #[arg(long, env = "TANDEM_LEASE_DURATION", default_value = "15s", value_parser = duration_arg)]
    lease_duration: Duration,
    /// This replica's identity in the Lease and on Events; `<hostname>-<pid>` when unset.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Reconciles running at once. Reconciles that change nothing make no API call; the ones
    /// that do wait on the API server, so a higher value mostly queues requests there.
    #[arg(long, env = "TANDEM_CONCURRENCY", default_value_t = 4)]
    concurrency: u16,
    /// Longest one reconcile may take once it runs; past it its API calls are cancelled and
    /// the pipeline is retried with backoff, so an API server that stops answering cannot hold
    /// a reconcile slot for the client's 295 s limit.
    #[arg(long, env = "TANDEM_RECONCILE_TIMEOUT", default_value = "30s", value_parser = duration_arg)]
    reconcile_timeout: Duration,
    /// Page size of initial list calls; small pages keep peak memory low.
    #[arg(long, env = "TANDEM_PAGE_SIZE", default_value_t = 100)]
    page_size: u32,
    /// Log format.
    #[arg(long, env = "TANDEM_LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    log_format: LogFormat,
    #[command(flatten)]
    autoscale: AutoscaleArgs,
}

/// Autoscaler knobs (see docs/autoscaling.md); they apply to every pipeline.
#[derive(clap::Args, Debug)]
struct AutoscaleArgs {
    /// Run the queue-depth autoscaler on the leader (`--autoscale=false` leaves desired
    /// replicas at each stage's minimum unless something else writes them).
    #[arg(long, env = "TANDEM_AUTOSCALE", default_value_t = true, action = clap::ArgAction::Set)]
    autoscale: bool,
    /// Time between autoscaler rounds (poll every ready worker, decide, write status).
    #[arg(long, env = "TANDEM_AUTOSCALE_INTERVAL", default_value = "1s", value_parser = duration_arg)]
    autoscale_interval: Duration,
    /// Limit for one `GetStats` poll of a worker pod.
    #[arg(long, env = "TANDEM_AUTOSCALE_POLL_TIMEOUT", default_value = "500ms", value_parser = duration_arg)]
    autoscale_poll_timeout: Duration,
    /// Fewer pods only once every recommendation during this window agrees.
    #[arg(long, env = "TANDEM_SCALE_DOWN_WINDOW", default_value = "30s", value_parser = duration_arg)]
    scale_down_window: Duration,
    /// Idle time before an inference stage with `replicas.min: 0` goes to zero pods.
    #[arg(long, env = "TANDEM_SCALE_TO_ZERO_AFTER", default_value = "60s", value_parser = duration_arg)]
    scale_to_zero_after: Duration,
    /// Relative band around the current pod count inside which load changes nothing.
    #[arg(long, env = "TANDEM_AUTOSCALE_TOLERANCE", default_value_t = 0.1)]
    autoscale_tolerance: f64,
    /// How long a ready pod that stops answering counts with its last answer; after that its
    /// load is unknown and blocks scale-down.
    #[arg(long, env = "TANDEM_AUTOSCALE_UNREACHABLE_GRACE", default_value = "10s", value_parser = duration_arg)]
    autoscale_unreachable_grace: Duration,
    /// Queue depths alone (no change of desired replicas) are written to status at most this often.
    #[arg(long, env = "TANDEM_AUTOSCALE_STATUS_INTERVAL", default_value = "5s", value_parser = duration_arg)]
    autoscale_status_interval: Duration,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    /// One JSON object per line.
    Json,
    /// Human-readable text.
    Text,
}

fn duration_arg(s: &str) -> Result<Duration, String> {
    parse_duration(s).ok_or_else(|| format!("{s:?} is not a duration such as 15s"))
}

fn sampling_ratio(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!("{s:?} is not a fraction between 0.0 and 1.0")),
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => {
            print!("{}", tandem_operator::crd::crd_yaml()?);
            Ok(())
        }
        Command::CrdReference => {
            print!("{}", tandem_operator::reference::crd_reference()?);
            Ok(())
        }
        Command::Run(args) => {
            // One thread: reconciles are I/O-bound, and a single thread (one allocator arena,
            // no worker stacks) keeps the resident set small.
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the tokio runtime")?;
            rt.block_on(run(*args))
        }
    }
}

/// Installs logging (and OTLP tracing when `OTEL_EXPORTER_OTLP_ENDPOINT` is set). Returns the
/// tracer provider to flush on exit.
fn init_telemetry(
    format: LogFormat,
) -> anyhow::Result<Option<opentelemetry_sdk::trace::SdkTracerProvider>> {
    use opentelemetry::trace::TracerProvider as _;
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,kube=warn,tower=warn,hyper=warn"));
    let provider = if std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT").is_some() {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()
            .context("building the OTLP span exporter")?;
        Some(
            opentelemetry_sdk::trace::SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(
                    opentelemetry_sdk::Resource::builder()
                        .with_service_name("tandem-operator")
                        .build(),
                )
                .build(),
        )
    } else {
        None
    };
    let otel = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("tandem-operator")));
    let registry = tracing_subscriber::registry().with(filter).with(otel);
    match format {
        LogFormat::Json => registry
            .with(tracing_subscriber::fmt::layer().json().flatten_event(true))
            .try_init(),
        // Colors only on a terminal: in a pod's log (a file or a pipe) the escape codes split
        // `field=value` pairs and make the lines hard to search.
        LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout())),
            )
            .try_init(),
    }
    .context("installing the log subscriber")?;
    Ok(provider)
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let tracer = init_telemetry(args.log_format)?;
    let client = tandem_operator::client::infer()
        .await
        .context("connecting to Kubernetes (in-cluster config or KUBECONFIG)")?;
    let identity = args.identity.clone().unwrap_or_else(default_identity);
    let control_key = args
        .control_key_file
        .as_deref()
        .map(ControlKey::load)
        .transpose()?
        .map(|current| {
            let previous = match args.previous_control_key_file.as_deref() {
                Some(path) if path.exists() => Some(ControlKey::load(path)?),
                _ => None,
            };
            anyhow::Ok(ControlKeys::new(current, previous))
        })
        .transpose()?;
    if let Some(keys) = &control_key {
        info!(
            previous_key = keys.has_previous(),
            "worker control ports take calls with their pipeline's token only"
        );
    } else {
        warn!(
            "no --control-key-file: worker control ports (GetStats, SetRoutes) take calls from anyone who can reach them"
        );
    }
    let lease_namespace = args
        .lease_namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_owned());
    let scopes = watch_scopes(&args.namespaces);
    info!(version = VERSION, %identity, namespaces = ?args.namespaces, %lease_namespace, "starting");

    let metrics = Arc::new(Metrics::new());
    let listener = tandem_net::http_listener(args.metrics_addr, "metrics address").await?;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let http = {
        let mut rx = shutdown_rx.clone();
        let app = metrics::router(metrics.clone());
        // A client that connects and sends nothing, or trickles its headers, is cut off after
        // `HEADER_READ_TIMEOUT` (`axum::serve` would hold it for ever).
        tokio::spawn(tandem_net::serve_http(
            listener,
            app,
            tandem_net::HEADER_READ_TIMEOUT,
            async move {
                let _ = rx.wait_for(|s| *s).await;
            },
        ))
    };

    // Signals: SIGTERM (pod deletion) or Ctrl-C.
    {
        let tx = shutdown_tx.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            info!("shutdown requested");
            tx.send_replace(true);
        });
    }

    let (leading_tx, mut leading_rx) = watch::channel(false);
    // The elector stops (and releases a held Lease) only after the controllers have finished
    // their running reconciles: released at the signal, a standby could take over and
    // reconcile the same pipelines while this replica was still applying.
    let (elector_stop_tx, elector_stop_rx) = watch::channel(false);
    let elector = tokio::spawn(leader::run(
        Api::<Lease>::namespaced(client.clone(), &lease_namespace),
        LeaderConfig {
            name: args.lease_name.clone(),
            namespace: lease_namespace.clone(),
            identity: identity.clone(),
            lease_duration: args.lease_duration,
        },
        leading_tx,
        elector_stop_rx,
    ));

    // Standing by is healthy: a follower is ready.
    metrics.set_ready(true);
    let mut shutdown_wait = shutdown_rx.clone();
    let became_leader = tokio::select! {
        r = leading_rx.wait_for(|l| *l) => r.is_ok(),
        _ = shutdown_wait.wait_for(|s| *s) => false,
    };

    let mut lost_leadership = false;
    if became_leader {
        metrics.set_leader(true);
        metrics.set_ready(false);
        let autoscale = args.autoscale.autoscale.then(|| {
            let a = &args.autoscale;
            AutoscaleConfig {
                interval: a.autoscale_interval,
                poll_timeout: a.autoscale_poll_timeout,
                unreachable_grace: a.autoscale_unreachable_grace,
                tolerance: a.autoscale_tolerance.clamp(0.0, 1.0),
                scale_down_window: a.scale_down_window,
                scale_to_zero_after: a.scale_to_zero_after,
                status_interval: a.autoscale_status_interval,
                control_key: control_key.clone(),
            }
        });
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut shutdown_for_ctrl = shutdown_rx.clone();
        let mut leading_for_ctrl = leading_rx.clone();
        let watchdog = tokio::spawn(async move {
            let lost = tokio::select! {
                _ = shutdown_for_ctrl.wait_for(|s| *s) => false,
                _ = leading_for_ctrl.wait_for(|l| !*l) => true,
            };
            stop_tx.send_replace(true);
            lost
        });
        // One controller per watched namespace (or one for the whole cluster); the leader is
        // ready once every one of them has synced its caches.
        let synced = Arc::new(AtomicUsize::new(0));
        let controllers = scopes.iter().map(|scope| {
            let cfg = ControllerConfig {
                build: BuildConfig {
                    worker_image: args
                        .worker_image
                        .clone()
                        .unwrap_or_else(|| format!("tandem-worker:{VERSION}")),
                    image_pull_policy: args.worker_image_pull_policy.clone(),
                    image_pull_secrets: args.worker_image_pull_secrets.clone(),
                    operator_version: VERSION.to_owned(),
                    worker_tracing: args.worker_otlp_endpoint.clone().map(|endpoint| {
                        WorkerTracing {
                            endpoint,
                            sampling_ratio: args.worker_trace_sampling_ratio,
                        }
                    }),
                    control_key: control_key.clone(),
                },
                namespace: scope.clone(),
                concurrency: args.concurrency,
                reconcile_timeout: args.reconcile_timeout,
                page_size: args.page_size,
                identity: identity.clone(),
                autoscale: autoscale.clone(),
            };
            let mut stop_rx = stop_rx.clone();
            let stop = async move {
                let _ = stop_rx.wait_for(|s| *s).await;
            };
            let (m, synced, all) = (metrics.clone(), synced.clone(), scopes.len());
            let ready = move || {
                if synced.fetch_add(1, Ordering::SeqCst) + 1 == all {
                    m.set_ready(true);
                }
            };
            controller::run(client.clone(), cfg, metrics.clone(), ready, stop)
        });
        futures::future::join_all(controllers).await;
        lost_leadership = watchdog.await.unwrap_or(false);
        metrics.set_leader(false);
    }

    shutdown_tx.send_replace(true);
    elector_stop_tx.send_replace(true);
    if let Err(e) = elector.await {
        warn!(error = %e, "leader election task ended abnormally");
    }
    let _ = http.await;
    if let Some(p) = tracer
        && let Err(e) = p.shutdown()
    {
        warn!(error = %e, "flushing traces failed");
    }
    if lost_leadership {
        // Another replica leads now; exit non-zero so the pod restarts as a clean follower.
        anyhow::bail!("lost the leader lease");
    }
    info!("stopped");
    Ok(())
}

/// What the controllers watch: each named namespace once, in the order given, or the whole
/// cluster (`None`) when no namespace is named.
fn watch_scopes(namespaces: &[String]) -> Vec<Option<String>> {
    let mut scopes: Vec<Option<String>> = Vec::new();
    for ns in namespaces
        .iter()
        .map(|n| n.trim())
        .filter(|n| !n.is_empty())
    {
        if !scopes.iter().any(|s| s.as_deref() == Some(ns)) {
            scopes.push(Some(ns.to_owned()));
        }
    }
    if scopes.is_empty() {
        scopes.push(None);
    }
    scopes
}

fn default_identity() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|s| s.trim().to_owned())
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "tandem-operator".to_owned());
    format!("{host}-{}", std::process::id())
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_args(argv: &[&str]) -> RunArgs {
        let cli = Cli::try_parse_from(["tandem-operator", "run"].iter().chain(argv))
            .expect("valid command line");
        match cli.command {
            Command::Run(args) => *args,
            other => panic!("parsed {other:?}, not run"),
        }
    }

    #[test]
    fn worker_trace_sampling_must_be_a_fraction() {
        let args = run_args(&[
            "--worker-otlp-endpoint",
            "http://c:4317",
            "--worker-trace-sampling-ratio",
            "0.1",
        ]);
        assert_eq!(args.worker_otlp_endpoint.as_deref(), Some("http://c:4317"));
        assert!((args.worker_trace_sampling_ratio - 0.1).abs() < f64::EPSILON);
        assert!((run_args(&[]).worker_trace_sampling_ratio - 1.0).abs() < f64::EPSILON);
        let err = Cli::try_parse_from([
            "tandem-operator",
            "run",
            "--worker-trace-sampling-ratio",
            "1.5",
        ])
        .expect_err("1.5 is refused")
        .to_string();
        assert!(err.contains("between 0.0 and 1.0"), "{err}");
    }

    #[test]
    fn no_namespace_flag_watches_the_whole_cluster() {
        assert_eq!(watch_scopes(&run_args(&[]).namespaces), vec![None]);
    }

    #[test]
    fn namespaces_can_be_repeated_or_comma_separated_and_are_watched_once_each() {
        let args = run_args(&[
            "--namespace",
            "ml,search",
            "--namespace",
            "ml",
            "--namespace",
            "ads",
        ]);
        assert_eq!(
            watch_scopes(&args.namespaces),
            vec![
                Some("ml".to_owned()),
                Some("search".to_owned()),
                Some("ads".to_owned())
            ]
        );
    }

    #[test]
    fn blank_namespace_entries_are_ignored_rather_than_watching_namespace_empty() {
        assert_eq!(watch_scopes(&["".to_owned(), " ".to_owned()]), vec![None]);
        assert_eq!(
            watch_scopes(&[" ml ".to_owned(), String::new()]),
            vec![Some("ml".to_owned())]
        );
    }
}
