//! The preprocess role: OIP v2 gRPC + REST for clients, decode/resize/
//! normalize or tokenize on a bounded CPU pool, forward to inference pods from
//! the operator's routing table, post-process, answer.
//!
//! Module map: [`service`] is the request path; [`grpc`], [`rest`] and
//! [`control`] are thin protocol adapters; [`image`], [`text`] and
//! [`postprocess`] are pure transforms; [`router`] forwards; [`pool`] runs CPU
//! work; [`metrics`] names the Prometheus series.

pub mod control;
pub mod error;
pub mod grpc;
pub mod image;
pub mod metrics;
mod png;
pub mod pool;
pub mod postprocess;
pub mod rest;
pub mod router;
pub mod service;
pub mod text;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use prometheus_client::registry::Registry;

use crate::common::budget::Budget;
use crate::common::control_auth::{self, ControlAuth, ControlToken};
use crate::common::shutdown::Shutdown;
use crate::common::{metrics as metrics_server, net, telemetry};
use crate::config::{Limits, PipelineConfig};

/// Preprocess worker configuration (flags override the config file).
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Pipeline config file (YAML or JSON), as rendered by the operator.
    #[arg(long, env = "TANDEM_CONFIG")]
    pub config: PathBuf,
    /// Static inference endpoint(s) `host:port`; the worker is ready without a
    /// routing table. Repeat or comma-separate for several.
    #[arg(
        long = "inference-endpoint",
        env = "TANDEM_INFERENCE_ENDPOINTS",
        value_delimiter = ','
    )]
    pub inference_endpoints: Vec<String>,
    /// Address to bind (all ports).
    #[arg(long, env = "TANDEM_BIND", default_value_t = IpAddr::V4(Ipv4Addr::UNSPECIFIED))]
    pub bind: IpAddr,
    /// OIP v2 REST + health port (overrides `ports.http`).
    #[arg(long, env = "TANDEM_HTTP_PORT")]
    pub http_port: Option<u16>,
    /// OIP v2 gRPC port (overrides `ports.grpc`).
    #[arg(long, env = "TANDEM_GRPC_PORT")]
    pub grpc_port: Option<u16>,
    /// Prometheus port (overrides `ports.metrics`).
    #[arg(long, env = "TANDEM_METRICS_PORT")]
    pub metrics_port: Option<u16>,
    /// WorkerControl port (overrides `ports.control`).
    #[arg(long, env = "TANDEM_CONTROL_PORT")]
    pub control_port: Option<u16>,
    /// Admission limit (overrides `limits.maxQueueDepth`).
    #[arg(long, env = "TANDEM_MAX_QUEUE_DEPTH")]
    pub max_queue_depth: Option<usize>,
    /// Bytes of request bodies received and held at once, REST and gRPC together (overrides
    /// `limits.maxRequestBytesInFlight`; at least `limits.maxRequestBytes`).
    #[arg(long, env = "TANDEM_MAX_REQUEST_BYTES_IN_FLIGHT")]
    pub max_request_bytes_in_flight: Option<usize>,
    /// CPU threads (overrides `limits.cpuThreads`; 0 = one per core).
    #[arg(long, env = "TANDEM_CPU_THREADS")]
    pub cpu_threads: Option<usize>,
    /// Seconds between SIGTERM and closing the client ports: the worker reports not ready at
    /// once but keeps taking requests meanwhile, so that Service endpoints and load
    /// balancers stop sending to it before its connections close.
    #[arg(long, env = "TANDEM_SHUTDOWN_DELAY_SECONDS", default_value_t = 5)]
    pub shutdown_delay_seconds: u64,
    /// Longest wait for accepted requests once the client ports closed, in seconds.
    /// Default: the hold timeout plus the forward timeout (90 s with the default limits), the
    /// longest a request held for an inference stage scaling from zero may still take.
    #[arg(long, env = "TANDEM_DRAIN_SECONDS")]
    pub drain_seconds: Option<u64>,
    /// File that receives the fatal error message (Kubernetes terminationMessagePath).
    #[arg(
        long,
        env = "TANDEM_TERMINATION_LOG",
        default_value = "/dev/termination-log"
    )]
    pub termination_log: PathBuf,
    /// Secret that every WorkerControl call (SetRoutes, GetStats) must carry as gRPC metadata
    /// `authorization: Bearer <token>`; at least 16 bytes. Unset or empty: calls need none.
    /// A flag rather than a config-file field, so that the secret stays out of the ConfigMap.
    #[arg(long, env = "TANDEM_CONTROL_TOKEN", hide_env_values = true)]
    pub control_token: Option<ControlToken>,
}

/// Loads the config file and applies the flag overrides.
pub fn effective_config(args: &Args) -> anyhow::Result<PipelineConfig> {
    let mut cfg = PipelineConfig::load(&args.config)?;
    if let Some(p) = args.http_port {
        cfg.ports.http = p;
    }
    if let Some(p) = args.grpc_port {
        cfg.ports.grpc = p;
    }
    if let Some(p) = args.metrics_port {
        cfg.ports.metrics = p;
    }
    if let Some(p) = args.control_port {
        cfg.ports.control = p;
    }
    if let Some(d) = args.max_queue_depth {
        cfg.limits.max_queue_depth = d;
    }
    if let Some(b) = args.max_request_bytes_in_flight {
        cfg.limits.max_request_bytes_in_flight = b;
    }
    if let Some(t) = args.cpu_threads {
        cfg.limits.cpu_threads = t;
    }
    if !args.inference_endpoints.is_empty() {
        cfg.inference_endpoints = args.inference_endpoints.clone();
    }
    cfg.validate()?;
    Ok(cfg)
}

/// The worker's budget of request-body bytes in flight (`limits.maxRequestBytesInFlight`),
/// shared by its gRPC and REST servers, reporting what is reserved in `reserved`.
pub fn request_budget(
    limits: &Limits,
    reserved: prometheus_client::metrics::gauge::Gauge,
) -> Budget {
    Budget::new(
        limits.max_request_bytes_in_flight,
        "limits.maxRequestBytesInFlight",
        reserved,
    )
}

/// How long a server may still wait for its connections to close once the drain has ended.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Waits for `server`, but gives up on it [`CLOSE_GRACE`] after `drained` fires (`None`): by
/// then every accepted request has been answered or the drain time is over, and a connection
/// still open, such as one stalled half-way through sending a request, must not keep the
/// process alive until the kubelet's SIGKILL.
async fn until_drained<T>(
    server: impl std::future::Future<Output = T>,
    drained: &Shutdown,
    what: &str,
) -> Option<T> {
    let give_up = async {
        drained.wait().await;
        tokio::time::sleep(CLOSE_GRACE).await;
    };
    tokio::select! {
        done = server => Some(done),
        () = give_up => {
            tracing::warn!(server = what, "connections still open after the drain; closing them");
            None
        }
    }
}

/// Runs the preprocess worker until SIGTERM/SIGINT, then drains and returns.
pub fn run(args: Args) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("tandem-io")
        .build()
        .context("start tokio runtime")?;
    let telemetry = {
        let _rt = runtime.enter();
        telemetry::init("tandem-preprocess")
    };
    let cfg = effective_config(&args)?;
    let drain = args
        .drain_seconds
        .map_or_else(|| cfg.limits.longest_request(), Duration::from_secs);
    let result = runtime.block_on(async {
        let stop = Stop {
            signal: Shutdown::new(),
            delay: Duration::from_secs(args.shutdown_delay_seconds),
            drain,
        };
        tokio::spawn(stop.signal.clone().listen_for_signals());
        serve(cfg, args.bind, args.control_token.as_ref(), stop).await
    });
    {
        let _rt = runtime.enter();
        telemetry.shutdown();
    }
    result
}

/// How a preprocess worker stops (see [`serve`]).
#[derive(Clone, Debug)]
pub struct Stop {
    /// Starts the shutdown (SIGTERM or SIGINT in [`run`]).
    pub signal: Shutdown,
    /// Not ready but still taking requests this long after the signal.
    pub delay: Duration,
    /// Longest wait for accepted requests once the client ports closed.
    pub drain: Duration,
}

/// Builds the service and serves all four ports until `stop.signal` fires and the requests it
/// accepted are answered (or `stop.drain` passes). With a `control_token`, the control port
/// takes only calls that carry it; a token under 16 bytes fails here, before anything starts.
///
/// On the signal the worker turns not ready at once, but takes requests for `stop.delay`
/// more: endpoints and load balancers drop a terminating pod asynchronously, and a
/// connection they still send meanwhile must not be refused. Then its client ports (gRPC,
/// HTTP) close (HTTP/2 clients get GOAWAY and reconnect elsewhere) and new requests are
/// refused. The control port and `/metrics` keep serving until the drain ends: a draining
/// pod may hold requests for an inference stage that is scaling from zero, only the
/// operator's `SetRoutes` can tell it where to send them, and its `GetStats` answers keep
/// that demand counted.
pub async fn serve(
    cfg: PipelineConfig,
    bind: IpAddr,
    control_token: Option<&ControlToken>,
    stop: Stop,
) -> anyhow::Result<()> {
    let Stop {
        signal: shutdown,
        delay,
        drain,
    } = stop;
    let mut registry = Registry::default();
    let auth = ControlAuth::new(control_token, control_auth::register(&mut registry))?;
    let metrics = metrics::Metrics::register(&mut registry);
    let budget = request_budget(&cfg.limits, metrics.request_bytes_in_flight.clone());
    let pipeline = service::build_pipeline_async(&cfg).await?;
    let labels = service::load_labels(&cfg)?;
    let ports = cfg.ports;
    let statics = cfg.inference_endpoints.clone();
    let svc = service::Service::new(cfg, pipeline, labels, metrics);
    if !statics.is_empty() {
        svc.router().set_static(&statics)?;
    }
    svc.refresh_ready_metric();

    // Fires `delay` after the signal: the client ports close then.
    let closing = Shutdown::new();
    // Fires once the drain has ended: the control and metrics ports close then.
    let drained = Shutdown::new();

    let grpc_addr = SocketAddr::new(bind, ports.grpc);
    let control_addr = SocketAddr::new(bind, ports.control);
    let http_addr = SocketAddr::new(bind, ports.http);
    let metrics_addr = SocketAddr::new(bind, ports.metrics);

    let http_listener = net::http_listener(http_addr, "HTTP").await?;
    let grpc_incoming = net::grpc_incoming(grpc_addr, "gRPC", net::FIRST_BYTE_TIMEOUT).await?;
    let control_incoming =
        net::grpc_incoming(control_addr, "control", net::FIRST_BYTE_TIMEOUT).await?;

    let s = closing.clone();
    let grpc = tonic::transport::Server::builder()
        .add_service(grpc::server(Arc::clone(&svc), budget.clone()))
        .serve_with_incoming_shutdown(grpc_incoming, async move { s.wait().await });
    let d = drained.clone();
    let control = tonic::transport::Server::builder()
        .add_service(control::server(Arc::clone(&svc), auth))
        .serve_with_incoming_shutdown(control_incoming, async move { d.wait().await });
    let s = closing.clone();
    let http = net::serve_http(
        http_listener,
        rest::router(Arc::clone(&svc), budget),
        net::HEADER_READ_TIMEOUT,
        async move { s.wait().await },
    );
    let metrics_task = tokio::spawn(metrics_server::serve(
        metrics_addr,
        Arc::new(registry),
        drained.clone(),
    ));

    tracing::info!(%http_addr, %grpc_addr, %control_addr, %metrics_addr, ready = svc.is_ready(), "preprocess worker serving");
    let svc2 = Arc::clone(&svc);
    let s = shutdown.clone();
    let drain_ended = drained.clone();
    let on_shutdown = async move {
        s.wait().await;
        svc2.begin_shutdown();
        tracing::info!(
            delay_ms = delay.as_millis() as u64,
            "shutting down: not ready, still taking requests until the client ports close"
        );
        tokio::time::sleep(delay).await;
        svc2.stop_accepting();
        closing.trigger();
        tracing::info!(
            in_flight = svc2.in_flight(),
            held = svc2.router().held_now(),
            "client ports closed, draining accepted requests"
        );
        if !svc2.drain(drain).await {
            tracing::warn!(
                in_flight = svc2.in_flight(),
                "drain time ran out with requests still in flight"
            );
        }
        drain_ended.trigger();
    };
    let (g, c, _, ()) = tokio::join!(
        until_drained(grpc, &drained, "gRPC"),
        until_drained(control, &drained, "control"),
        until_drained(http, &drained, "HTTP"),
        on_shutdown
    );
    g.transpose().context("gRPC server")?;
    c.transpose().context("control server")?;
    metrics_task.await.context("metrics task")??;
    tracing::info!("preprocess worker stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_server_still_waiting_for_its_connections_is_given_up_after_the_drain() {
        let drained = Shutdown::new();
        drained.trigger();
        let stuck = std::future::pending::<()>();
        assert_eq!(until_drained(stuck, &drained, "test").await, None);
    }

    #[test]
    fn the_control_token_is_a_flag_that_never_shows_in_the_arguments_debug_output() {
        use clap::Parser as _;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: Args,
        }
        let token = "5f0e3c1a9b7d24e68a1f0c3b5d7e9a2c";
        let cli = Cli::try_parse_from([
            "tandem-worker",
            "--config",
            "p.yaml",
            "--control-token",
            token,
        ])
        .unwrap();
        let shown = format!("{:?}", cli.args);
        assert!(!shown.contains(token), "{shown}");
        assert!(
            shown.contains("control_token: Some(ControlToken(<hidden>))"),
            "{shown}"
        );
    }

    #[tokio::test]
    async fn a_server_that_ends_by_itself_gives_its_result() {
        let drained = Shutdown::new();
        assert_eq!(until_drained(async { 7 }, &drained, "test").await, Some(7));
    }
}
