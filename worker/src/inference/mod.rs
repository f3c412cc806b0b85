//! The inference role: load a model, then serve batched inference over OIP v2
//! (gRPC and REST), `WorkerControl.GetStats` and Prometheus `/metrics`, and
//! drain gracefully on SIGTERM.
//!
//! Start-up: the servers come up first (live, not ready) so probes see the
//! process; the model is resolved (downloaded for http(s)), sha256-verified,
//! loaded and warmed up; only then is the worker ready. A load failure is
//! logged, written to the Kubernetes termination log, and exits non-zero.

mod convert;
mod grpc;
mod metrics;
mod model;
mod rest;
mod service;
mod stats;
mod trace;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tandem_engine::batcher::BatcherConfig;
use tandem_engine::load::LoadOptions;
use tandem_engine::runner::Runner;
use tandem_engine::{DataType, Device};
use tokio::sync::watch;

use crate::common::budget::Budget;
use crate::common::control_auth::{self, ControlAuth, ControlToken};
use crate::common::net;

use service::Worker;

/// Device choice on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceArg {
    /// CPU threads.
    Cpu,
    /// NVIDIA GPU (CUDA).
    Cuda,
}

/// Datatype advertised for image inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ImageInput {
    /// FP32 NCHW, already normalized.
    Fp32,
    /// UINT8 NCHW; the engine normalizes with the model's mean/std.
    Uint8,
}

/// Inference worker configuration.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Model location: file:///dir, file:///dir/model.safetensors or http(s)://.../model.safetensors
    /// (config.json and 1_Pooling/config.json are read beside it).
    #[arg(long, env = "TANDEM_MODEL_URI")]
    pub model_uri: String,
    /// Expected sha256 (hex) of model.safetensors; required to trust http(s) sources.
    #[arg(long, env = "TANDEM_MODEL_SHA256")]
    pub model_sha256: Option<String>,
    /// Model name served over OIP v2.
    #[arg(long, env = "TANDEM_MODEL_NAME")]
    pub model_name: String,
    /// Model version served over OIP v2.
    #[arg(long, env = "TANDEM_MODEL_VERSION", default_value = "1")]
    pub model_version: String,
    /// Device to run on.
    #[arg(long, env = "TANDEM_DEVICE", value_enum, default_value = "cpu")]
    pub device: DeviceArg,
    /// With --device cuda: run on the CPU when no usable GPU exists instead of failing.
    #[arg(long, env = "TANDEM_ALLOW_CPU_FALLBACK")]
    pub allow_cpu_fallback: bool,
    /// Most rows in one engine batch.
    #[arg(long, env = "TANDEM_MAX_BATCH_SIZE", default_value_t = 32)]
    pub max_batch_size: usize,
    /// Longest wait (ms) for a batch to fill, 0 to 60000.
    #[arg(long, env = "TANDEM_MAX_DELAY_MS", default_value_t = 2.0, value_parser = delay_ms)]
    pub max_delay_ms: f64,
    /// Most requests waiting; beyond it requests get RESOURCE_EXHAUSTED.
    #[arg(long, env = "TANDEM_MAX_QUEUE_DEPTH", default_value_t = 256)]
    pub max_queue_depth: usize,
    /// Bytes of request bodies received and held at once, REST and gRPC together; a request
    /// whose body does not fit gets RESOURCE_EXHAUSTED / 429. At least the largest request
    /// (256 MiB). The default, 512 MiB, is two of those: one maximal request leaves room for
    /// the usual traffic (a preprocessed batch is a few MiB: 32 images of 224 x 224 in FP32
    /// are 19 MB) instead of shutting it out, while 100 concurrent 64 MiB uploads, which would
    /// take 6.4 GB, cannot get the pod OOM-killed.
    #[arg(
        long,
        env = "TANDEM_MAX_REQUEST_BYTES_IN_FLIGHT",
        default_value_t = 2 * rest::MAX_BODY_BYTES,
        value_parser = bytes_in_flight
    )]
    pub max_request_bytes_in_flight: usize,
    /// CPU engine threads (default: all cores).
    #[arg(long, env = "TANDEM_CPU_THREADS")]
    pub cpu_threads: Option<usize>,
    /// Datatype advertised for image inputs (the other is accepted as well).
    #[arg(long, env = "TANDEM_IMAGE_INPUT", value_enum, default_value = "fp32")]
    pub image_input: ImageInput,
    /// Where downloaded models and compiled GPU kernels are cached.
    #[arg(
        long,
        env = "TANDEM_MODEL_CACHE_DIR",
        default_value = "/tmp/tandem-models"
    )]
    pub model_cache_dir: PathBuf,
    /// Seconds a model download may wait to connect, for a response or for more data before
    /// it fails (the pod then exits and says why, rather than staying unready for ever).
    #[arg(
        long,
        env = "TANDEM_DOWNLOAD_STALL_TIMEOUT",
        default_value_t = 60.0,
        value_parser = stall_secs
    )]
    pub download_stall_timeout: f64,
    /// Address to listen on.
    #[arg(long, env = "TANDEM_LISTEN_ADDRESS", default_value = "0.0.0.0")]
    pub listen_address: IpAddr,
    /// OIP v2 gRPC port.
    #[arg(long, env = "TANDEM_GRPC_PORT", default_value_t = 8001)]
    pub grpc_port: u16,
    /// OIP v2 REST port.
    #[arg(long, env = "TANDEM_HTTP_PORT", default_value_t = 8000)]
    pub http_port: u16,
    /// Prometheus /metrics port.
    #[arg(long, env = "TANDEM_METRICS_PORT", default_value_t = 9090)]
    pub metrics_port: u16,
    /// WorkerControl gRPC port.
    #[arg(long, env = "TANDEM_CONTROL_PORT", default_value_t = 9091)]
    pub control_port: u16,
    /// Longest time to finish in-flight work after SIGTERM.
    #[arg(long, env = "TANDEM_DRAIN_TIMEOUT_S", default_value_t = 30)]
    pub drain_timeout_s: u64,
    /// File that receives the fatal error message (Kubernetes terminationMessagePath).
    #[arg(
        long,
        env = "TANDEM_TERMINATION_LOG",
        default_value = "/dev/termination-log"
    )]
    pub termination_log: PathBuf,
    /// Pod name reported in stats.
    #[arg(long, env = "POD_NAME", default_value = "")]
    pub pod_name: String,
    /// Secret that every WorkerControl call (GetStats) must carry as gRPC metadata
    /// `authorization: Bearer <token>`; at least 16 bytes. Unset or empty: calls need none.
    #[arg(long, env = "TANDEM_CONTROL_TOKEN", hide_env_values = true)]
    pub control_token: Option<ControlToken>,
}

/// A batching delay in milliseconds: finite, 0 to a minute (a request would wait that long
/// for company).
fn delay_ms(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(ms) if (0.0..=60_000.0).contains(&ms) => Ok(ms),
        _ => Err(format!("{s:?} is not a delay between 0 and 60000 ms")),
    }
}

fn stall_secs(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(secs) if (0.1..=3600.0).contains(&secs) => Ok(secs),
        _ => Err(format!(
            "{s:?} is not a timeout between 0.1 and 3600 seconds"
        )),
    }
}

/// A budget of request bytes in flight: a whole number of bytes, at least the largest
/// request ([`rest::MAX_BODY_BYTES`]), so that every request can be received.
fn bytes_in_flight(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= rest::MAX_BODY_BYTES => Ok(n),
        Ok(n) => Err(format!(
            "{n} bytes is less than the largest request ({} bytes); no such request could \
             ever be received",
            rest::MAX_BODY_BYTES
        )),
        Err(_) => Err(format!("{s:?} is not a number of bytes")),
    }
}

/// Runs the inference worker until shutdown.
pub fn run(args: Args) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("tandem-io")
        .build()
        .context("cannot start the async runtime")?;
    let telemetry = {
        let _rt = rt.enter();
        tandem_worker::common::telemetry::init("tandem-inference")
    };
    let result = rt.block_on(serve(args));
    if let Err(e) = &result {
        tracing::error!(error = %format!("{e:#}"), "inference worker failed");
    }
    {
        let _rt = rt.enter();
        telemetry.shutdown();
    }
    // Dropping the runtime would wait for its blocking tasks, among them the join of an engine
    // thread the drain gave up on.
    rt.shutdown_timeout(Duration::from_millis(500));
    result
}

async fn serve(args: Args) -> anyhow::Result<()> {
    let worker = Arc::new(Worker::new(
        args.model_name.clone(),
        args.model_version.clone(),
        args.pod_name.clone(),
    ));
    let (stop_tx, stop_rx) = watch::channel(Shutdown::Running);
    let servers = start_servers(&args, worker.clone(), stop_rx).await?;

    // Load + warm up on a blocking thread while the servers answer probes.
    let opts = LoadOptions {
        device: match args.device {
            DeviceArg::Cpu => Device::Cpu,
            DeviceArg::Cuda => Device::Cuda,
        },
        allow_cpu_fallback: args.allow_cpu_fallback,
        cpu_threads: args
            .cpu_threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
        image_input: match args.image_input {
            ImageInput::Fp32 => DataType::Fp32,
            ImageInput::Uint8 => DataType::Uint8,
        },
        sha256: args.model_sha256.clone(),
        kernel_cache_dir: Some(args.model_cache_dir.join("kernels")),
    };
    let loaded = async {
        let local = model::resolve(
            &args.model_uri,
            args.model_sha256.as_deref(),
            &args.model_cache_dir,
            Duration::from_secs_f64(args.download_stall_timeout),
        )
        .await?;
        tokio::task::spawn_blocking(move || model::load_and_warm_up(&local, &opts))
            .await
            .map_err(|e| anyhow::anyhow!("model loading thread failed: {e}"))?
            .map_err(anyhow::Error::from)
    };
    let mut stop_signal = Box::pin(shutdown_signal());
    let loaded = tokio::select! {
        l = loaded => l,
        () = &mut stop_signal => {
            let _ = stop_tx.send(Shutdown::All);
            return Ok(());
        }
    };
    let loaded = match loaded {
        Ok(l) => l,
        Err(e) => {
            // `main` writes this to the termination log.
            let _ = stop_tx.send(Shutdown::All);
            return Err(e.context(format!("model {} from {}", args.model_name, args.model_uri)));
        }
    };
    if let Some(reason) = &loaded.fallback_reason {
        tracing::warn!(%reason, "CUDA unusable; running on the CPU (--allow-cpu-fallback)");
    }
    tracing::info!(architecture = loaded.architecture.name(), device = %loaded.engine.device(), "model loaded and warmed up");
    let cfg = BatcherConfig {
        max_batch_size: args.max_batch_size,
        max_delay: Duration::from_secs_f64(args.max_delay_ms / 1e3),
        max_queue_depth: args.max_queue_depth,
    };
    let batch_hist = worker.metrics.batch_size.clone();
    let observer: tandem_engine::runner::BatchObserver =
        Box::new(move |rows| batch_hist.observe(rows as f64));
    let (runner, engine_thread) = Runner::spawn_observed(loaded.engine, cfg, Some(observer))
        .context("cannot start the engine thread")?;
    worker.set_ready(runner.clone());
    tracing::info!(model = %args.model_name, "ready");

    stop_signal.await;
    tracing::info!("SIGTERM: draining");
    worker.start_drain();
    let _ = stop_tx.send(Shutdown::ClientPorts);
    let (clients, side): (Vec<_>, Vec<_>) = servers
        .into_iter()
        .partition(|(at, _)| *at == Shutdown::ClientPorts);
    let drain = async {
        for (_, s) in clients {
            let _ = s.await;
        }
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.drain_timeout_s);
    if tokio::time::timeout_at(deadline, drain).await.is_err() {
        tracing::warn!("drain timeout reached with requests still in flight");
    }
    // The engine finishes what it has (requests whose clients left are skipped), within the
    // drain timeout; past it the process exits without it.
    runner.close();
    let stats = runner.stats();
    if stats.queue_depth + stats.in_flight > 0 {
        tracing::info!(
            queued = stats.queue_depth,
            in_flight = stats.in_flight,
            "waiting for the engine"
        );
    }
    let joined = tokio::task::spawn_blocking(move || engine_thread.join());
    let grace = deadline.max(tokio::time::Instant::now() + ENGINE_GRACE);
    let finished = tokio::time::timeout_at(grace, joined).await.is_ok();
    if !finished {
        let stats = runner.stats();
        tracing::warn!(
            queued = stats.queue_depth,
            in_flight = stats.in_flight,
            drain_timeout_s = args.drain_timeout_s,
            "the engine is still busy after the drain timeout; exiting without it"
        );
    }
    let _ = stop_tx.send(Shutdown::All);
    let side = async {
        for (_, s) in side {
            let _ = s.await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), side).await;
    if finished {
        tracing::info!("drained; exiting");
    }
    Ok(())
}

/// How long the engine may still finish its batch once the servers have drained, when the
/// drain timeout has already passed.
const ENGINE_GRACE: Duration = Duration::from_secs(2);

/// Completes on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}

/// How far shutdown has gone; each server stops at its own step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Shutdown {
    Running,
    /// The client ports (gRPC, REST) close: not ready, no new requests.
    ClientPorts,
    /// Everything closes, `/metrics` and `WorkerControl` too (they stay up through the drain,
    /// so the drain itself can be scraped and polled).
    All,
}

async fn wait_stop(mut rx: watch::Receiver<Shutdown>, at: Shutdown) {
    let _ = rx.wait_for(|v| *v >= at).await;
}

async fn start_servers(
    args: &Args,
    worker: Arc<Worker>,
    stop: watch::Receiver<Shutdown>,
) -> anyhow::Result<Vec<(Shutdown, tokio::task::JoinHandle<()>)>> {
    let addr = |port| SocketAddr::new(args.listen_address, port);
    // Checked before any port is bound: a token too short fails the start.
    let auth = ControlAuth::new(
        args.control_token.as_ref(),
        worker.metrics.control_refusals.clone(),
    )?;
    let mut tasks = Vec::new();

    let budget = Budget::new(
        args.max_request_bytes_in_flight,
        "--max-request-bytes-in-flight",
        worker.metrics.request_bytes_in_flight.clone(),
    );
    let oip = grpc::server(worker.clone(), budget.clone());
    let grpc_incoming =
        net::grpc_incoming(addr(args.grpc_port), "gRPC port", net::FIRST_BYTE_TIMEOUT).await?;
    let s = stop.clone();
    tasks.push((
        Shutdown::ClientPorts,
        tokio::spawn(async move {
            if let Err(e) = tonic::transport::Server::builder()
                .add_service(oip)
                .serve_with_incoming_shutdown(grpc_incoming, wait_stop(s, Shutdown::ClientPorts))
                .await
            {
                tracing::error!(error = %e, "gRPC server failed");
            }
        }),
    ));

    let control = control_auth::server(grpc::Control(worker.clone()), auth);
    let control_incoming = net::grpc_incoming(
        addr(args.control_port),
        "control port",
        net::FIRST_BYTE_TIMEOUT,
    )
    .await?;
    let s = stop.clone();
    tasks.push((
        Shutdown::All,
        tokio::spawn(async move {
            if let Err(e) = tonic::transport::Server::builder()
                .add_service(control)
                .serve_with_incoming_shutdown(control_incoming, wait_stop(s, Shutdown::All))
                .await
            {
                tracing::error!(error = %e, "control server failed");
            }
        }),
    ));

    let http_listener = net::http_listener(addr(args.http_port), "HTTP port").await?;
    let app = rest::router(worker.clone(), budget);
    let s = stop.clone();
    tasks.push((
        Shutdown::ClientPorts,
        tokio::spawn(async move {
            net::serve_http(
                http_listener,
                app,
                net::HEADER_READ_TIMEOUT,
                wait_stop(s, Shutdown::ClientPorts),
            )
            .await;
        }),
    ));

    let metrics_listener = tokio::net::TcpListener::bind(addr(args.metrics_port))
        .await
        .context("bind metrics port")?;
    let w = worker.clone();
    let metrics_app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let w = w.clone();
            async move {
                w.refresh_gauges();
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    w.metrics.encode(),
                )
            }
        }),
    );
    let s = stop;
    tasks.push((
        Shutdown::All,
        tokio::spawn(async move {
            net::serve_http(
                metrics_listener,
                metrics_app,
                net::HEADER_READ_TIMEOUT,
                wait_stop(s, Shutdown::All),
            )
            .await;
        }),
    ));
    Ok(tasks)
}

/// An inference worker over an engine that holds each batch until the test lets it go, for
/// the protocol handlers' tests.
#[cfg(test)]
mod testing {
    use std::sync::{Arc, Condvar, Mutex};
    use std::time::Duration;

    use tandem_engine::batcher::BatcherConfig;
    use tandem_engine::runner::Runner;
    use tandem_engine::spec::InputKind;
    use tandem_engine::{DataType, Engine, EngineError, ModelSpec, Tensor, TensorSpec};
    use tokio::sync::mpsc;

    use super::service::Worker;

    /// Whether the engine may answer; shared with [`Gate::open`].
    type Open = Arc<(Mutex<bool>, Condvar)>;

    /// Takes FP32 `x` `[N, K]`, answers FP32 `y` `[N, 1]` of zeros once the gate is open.
    struct Held {
        spec: ModelSpec,
        open: Open,
        arrived: mpsc::UnboundedSender<()>,
    }

    impl Engine for Held {
        fn spec(&self) -> &ModelSpec {
            &self.spec
        }

        fn forward(&mut self, inputs: &[Tensor]) -> Result<Vec<Tensor>, EngineError> {
            let _ = self.arrived.send(());
            let (lock, turned) = &*self.open;
            let mut open = lock.lock().unwrap();
            while !*open {
                open = turned.wait(open).unwrap();
            }
            let rows = inputs[0].rows();
            Ok(vec![Tensor::f32(vec![rows, 1], vec![0.0; rows])])
        }
    }

    /// Lets the held engine answer.
    pub struct Gate {
        open: Open,
        /// Receives one message per batch the engine is given.
        pub arrived: mpsc::UnboundedReceiver<()>,
    }

    impl Gate {
        /// Lets every batch through, those held and those to come.
        pub fn open(&self) {
            *self.open.0.lock().unwrap() = true;
            self.open.1.notify_all();
        }
    }

    /// A ready worker serving model "m" version "1" over the held engine, one request per
    /// batch.
    pub fn held_worker() -> (Arc<Worker>, Gate) {
        let (arrived_tx, arrived) = mpsc::unbounded_channel();
        let open = Open::default();
        let engine = Held {
            spec: ModelSpec {
                inputs: vec![TensorSpec::new("x", DataType::Fp32, &[-1, -1])],
                outputs: vec![TensorSpec::new("y", DataType::Fp32, &[-1, 1])],
                kind: InputKind::Fixed,
                also_accepts: vec![],
                value_ranges: vec![],
                max_sequence_len: None,
            },
            open: Arc::clone(&open),
            arrived: arrived_tx,
        };
        let cfg = BatcherConfig {
            max_batch_size: 1,
            max_delay: Duration::ZERO,
            max_queue_depth: 16,
        };
        let (runner, _thread) = Runner::spawn(Box::new(engine), cfg).unwrap();
        let w = Arc::new(Worker::new("m".into(), "1".into(), String::new()));
        w.set_ready(runner);
        (w, Gate { open, arrived })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use clap::Parser as _;
    use tandem_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
    use tandem_proto::inference::model_infer_request::InferInputTensor;
    use tandem_proto::inference::{ModelInferRequest, ServerReadyRequest};
    use tandem_proto::tandem::v1::worker_control_client::WorkerControlClient;
    use tandem_proto::tandem::v1::{GetStatsRequest, SetRoutesRequest};
    use tokio::sync::watch;
    use tonic::{Code, Request};

    use super::testing::held_worker;
    use super::{Args, Shutdown, bytes_in_flight, delay_ms, start_servers};

    /// 64 hex characters, as the operator derives a pipeline's control token.
    const TOKEN: &str = "5f0e3c1a9b7d24e68a1f0c3b5d7e9a2c4b6d8f0a1c3e5b7d9f2a4c6e8b0d1f3a";

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free loopback port")
    }

    /// The flags of a worker on free loopback ports, with `extra` after them: (args, gRPC
    /// port, control port).
    fn args(extra: &[&str]) -> (Args, u16, u16) {
        let (grpc, control) = (free_port(), free_port());
        let ports = [
            ("--grpc-port", grpc),
            ("--control-port", control),
            ("--http-port", free_port()),
            ("--metrics-port", free_port()),
        ];
        let mut argv: Vec<String> = [
            "tandem-worker",
            "--model-uri",
            "file:///unused",
            "--model-name",
            "m",
            "--listen-address",
            "127.0.0.1",
        ]
        .map(String::from)
        .into();
        for (flag, port) in ports {
            argv.extend([flag.to_owned(), port.to_string()]);
        }
        argv.extend(extra.iter().map(|s| s.to_string()));
        (Cli::try_parse_from(argv).unwrap().args, grpc, control)
    }

    fn authorized<T>(message: T, value: &str) -> Request<T> {
        let mut r = Request::new(message);
        r.metadata_mut()
            .insert("authorization", value.parse().expect("ASCII metadata"));
        r
    }

    async fn connect_control(port: u16) -> WorkerControlClient<tonic::transport::Channel> {
        WorkerControlClient::connect(format!("http://127.0.0.1:{port}"))
            .await
            .expect("the control port")
    }

    async fn stop(
        stop_tx: watch::Sender<Shutdown>,
        tasks: Vec<(Shutdown, tokio::task::JoinHandle<()>)>,
    ) {
        stop_tx.send(Shutdown::All).unwrap();
        for (_, t) in tasks {
            t.await.unwrap();
        }
    }

    /// An inference pod's `GetStats` tells whoever asks how loaded it is and what it serves;
    /// with a token only the operator may ask. Its OIP port serves clients, which hold no
    /// token, as before.
    #[tokio::test]
    async fn with_a_control_token_worker_control_needs_it_and_the_oip_port_does_not() {
        let (w, gate) = held_worker();
        let (args, grpc, control) = args(&["--control-token", TOKEN]);
        let (stop_tx, stop_rx) = watch::channel(Shutdown::Running);
        let tasks = start_servers(&args, Arc::clone(&w), stop_rx).await.unwrap();
        let mut c = connect_control(control).await;

        let missing = c.get_stats(GetStatsRequest {}).await.unwrap_err();
        assert_eq!(missing.code(), Code::Unauthenticated);
        assert_eq!(
            missing.message(),
            "WorkerControl needs \"authorization: Bearer <token>\" (this pod was started with \
             a control token)"
        );
        let wrong = c
            .get_stats(authorized(GetStatsRequest {}, "Bearer 0123456789abcdef"))
            .await
            .unwrap_err();
        assert_eq!(wrong.code(), Code::Unauthenticated);
        assert_eq!(wrong.message(), "wrong control token");
        let right = format!("Bearer {TOKEN}");
        let stats = c
            .get_stats(authorized(GetStatsRequest {}, &right))
            .await
            .expect("GetStats with the token")
            .into_inner();
        assert_eq!(stats.model_name, "m");
        assert!(stats.model_loaded);
        // SetRoutes is checked first too; with the token it reaches the handler, which has no
        // table to set.
        let routes = || SetRoutesRequest {
            table: None,
            replace: true,
        };
        let refused = c.set_routes(routes()).await.unwrap_err();
        assert_eq!(refused.code(), Code::Unauthenticated);
        let reached = c
            .set_routes(authorized(routes(), &right))
            .await
            .unwrap_err();
        assert_eq!(reached.code(), Code::Unimplemented, "{}", reached.message());

        let metrics = w.metrics.encode();
        for line in [
            "tandem_worker_control_unauthenticated_total{reason=\"missing\"} 2",
            "tandem_worker_control_unauthenticated_total{reason=\"wrong\"} 1",
        ] {
            assert!(metrics.contains(line), "{line} in {metrics}");
        }

        let mut oip = GrpcInferenceServiceClient::connect(format!("http://127.0.0.1:{grpc}"))
            .await
            .unwrap();
        assert!(
            oip.server_ready(ServerReadyRequest {})
                .await
                .expect("ServerReady without a token")
                .into_inner()
                .ready
        );
        gate.open();
        oip.model_infer(ModelInferRequest {
            model_name: "m".into(),
            inputs: vec![InferInputTensor {
                name: "x".into(),
                datatype: "FP32".into(),
                shape: vec![1, 2],
                ..Default::default()
            }],
            raw_input_contents: vec![vec![0u8; 8].into()],
            ..Default::default()
        })
        .await
        .expect("ModelInfer without a token");
        stop(stop_tx, tasks).await;
    }

    #[tokio::test]
    async fn without_a_control_token_get_stats_needs_no_metadata() {
        let (w, _gate) = held_worker();
        let (args, _, control) = args(&[]);
        let (stop_tx, stop_rx) = watch::channel(Shutdown::Running);
        let tasks = start_servers(&args, Arc::clone(&w), stop_rx).await.unwrap();
        let stats = connect_control(control)
            .await
            .get_stats(GetStatsRequest {})
            .await
            .expect("GetStats without metadata")
            .into_inner();
        assert_eq!(stats.model_name, "m");
        assert!(
            !w.metrics
                .encode()
                .contains("tandem_worker_control_unauthenticated_total{")
        );
        stop(stop_tx, tasks).await;
    }

    #[tokio::test]
    async fn a_control_token_under_16_bytes_fails_the_start_before_any_port_opens() {
        let (w, _gate) = held_worker();
        let (args, grpc, control) = args(&["--control-token", "hunter2"]);
        let (_stop_tx, stop_rx) = watch::channel(Shutdown::Running);
        let e = start_servers(&args, w, stop_rx)
            .await
            .expect_err("a 7-byte token is refused");
        assert_eq!(
            format!("{e:#}"),
            "the control token (--control-token, TANDEM_CONTROL_TOKEN) is 7 bytes long; it must \
             be at least 16 (the operator gives each pipeline a 64-hex-character HMAC), or empty \
             to take WorkerControl calls without one"
        );
        for port in [grpc, control] {
            assert!(
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_err()
            );
        }
    }

    #[test]
    fn the_control_token_never_shows_in_the_arguments_debug_output() {
        let (args, _, _) = args(&["--control-token", TOKEN]);
        let shown = format!("{args:?}");
        assert!(!shown.contains(TOKEN), "{shown}");
        assert!(
            shown.contains("control_token: Some(ControlToken(<hidden>))"),
            "{shown}"
        );
    }

    #[test]
    fn a_budget_of_bytes_in_flight_must_hold_the_largest_request() {
        assert_eq!(bytes_in_flight("268435456"), Ok(256 << 20));
        assert_eq!(bytes_in_flight("1073741824"), Ok(1 << 30));
        assert_eq!(
            bytes_in_flight("1048576"),
            Err(
                "1048576 bytes is less than the largest request (268435456 bytes); no such \
                 request could ever be received"
                    .into()
            )
        );
        assert!(bytes_in_flight("lots").is_err());
    }

    #[test]
    fn a_batching_delay_must_be_finite_and_at_most_a_minute() {
        assert_eq!(delay_ms("2"), Ok(2.0));
        assert_eq!(delay_ms("0"), Ok(0.0));
        assert_eq!(delay_ms("60000"), Ok(60_000.0));
        for bad in ["inf", "NaN", "-1", "1e20", "60001", "soon"] {
            assert!(delay_ms(bad).is_err(), "{bad}");
        }
    }
}
