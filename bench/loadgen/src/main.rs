//! `tandem-loadgen`: the serving-layer benchmark's client and stub.
//!
//! - `run`: open-loop load at a fixed arrival rate over OIP v2 gRPC
//!   (`grpc://host:port`) or REST (`http://host:port`, binary tensor
//!   extension), bounded in time and count; prints one JSON summary line.
//! - `probe`: sends one request every millisecond until one succeeds and prints
//!   the time since a given wall-clock instant (cold start to first answer).
//! - `stub`: an OIP v2 gRPC inference server that answers every `ModelInfer`
//!   at once with an FP32 `[N, D]` tensor of zeros, to measure a serving layer
//!   with the model taken out.
//!
//! Every address must be a loopback address: this tool refuses anything else.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use tandem_loadgen::request::{bytes_tensor, grpc_request, rest_body};
use tandem_loadgen::schedule::Schedule;
use tandem_loadgen::summary::{Outcome, summarize};
use tandem_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use tandem_proto::inference::grpc_inference_service_server::{
    GrpcInferenceService, GrpcInferenceServiceServer,
};
use tandem_proto::inference::model_infer_response::InferOutputTensor;
use tandem_proto::inference::model_metadata_response::TensorMetadata;
use tandem_proto::inference::{
    ModelInferRequest, ModelInferResponse, ModelMetadataRequest, ModelMetadataResponse,
    ModelReadyRequest, ModelReadyResponse, ServerLiveRequest, ServerLiveResponse,
    ServerMetadataRequest, ServerMetadataResponse, ServerReadyRequest, ServerReadyResponse,
};
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};

#[derive(Debug, Parser)]
#[command(about = "Open-loop OIP v2 load generator and stub inference server (loopback only)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, clap::Args)]
struct Target {
    /// `grpc://127.0.0.1:PORT` or `http://127.0.0.1:PORT` (loopback only).
    #[arg(long)]
    target: String,
    /// Model name in the request.
    #[arg(long)]
    model: String,
    /// Files whose whole contents are one item each (e.g. JPEGs); cycled.
    #[arg(long = "input")]
    inputs: Vec<PathBuf>,
    /// A text file whose non-empty lines are one item each; cycled.
    #[arg(long)]
    lines: Option<PathBuf>,
    /// Items per request (batch N).
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Per-request deadline in seconds.
    #[arg(long, default_value_t = 30.0)]
    timeout_s: f64,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Fixed-rate open-loop run; prints a JSON summary.
    Run {
        #[command(flatten)]
        target: Target,
        /// Arrival rate, requests per second.
        #[arg(long)]
        rate: f64,
        /// Longest schedule, seconds.
        #[arg(long, default_value_t = 10.0)]
        duration_s: f64,
        /// Most requests in the schedule.
        #[arg(long, default_value_t = 100_000)]
        max_requests: u64,
        /// Requests outstanding at once before new ones are counted as
        /// `client_overload` instead of sent (bounds the client's memory).
        #[arg(long, default_value_t = 2048)]
        max_in_flight: usize,
        /// Free-form label echoed in the JSON.
        #[arg(long, default_value = "")]
        label: String,
    },
    /// Retries every millisecond until one request succeeds; prints ms since `--since-unix-ns`.
    Probe {
        #[command(flatten)]
        target: Target,
        /// Wall-clock start (ns since the Unix epoch), e.g. when the server was exec'd.
        #[arg(long)]
        since_unix_ns: u128,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 120.0)]
        give_up_s: f64,
    },
    /// Stub inference server answering zeros at once.
    Stub {
        /// gRPC port on 127.0.0.1.
        #[arg(long)]
        port: u16,
        /// Output tensor name (`embedding`, `logits`).
        #[arg(long)]
        output: String,
        /// Output width D.
        #[arg(long)]
        width: usize,
    },
}

/// A connected client for one target.
#[derive(Clone)]
enum Client {
    Grpc(GrpcInferenceServiceClient<Channel>),
    Http {
        client: reqwest::Client,
        url: String,
    },
}

/// One request's payload in both encodings.
#[derive(Clone)]
struct Payload {
    tensor: Bytes,
    rest: Bytes,
    header_len: usize,
    n: usize,
}

async fn check_loopback(host_port: &str) -> anyhow::Result<()> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(host_port)
        .await
        .with_context(|| format!("resolve {host_port}"))?
        .collect();
    if addrs.is_empty() || addrs.iter().any(|a| !a.ip().is_loopback()) {
        bail!(
            "{host_port} is not a loopback address; this tool only sends to 127.0.0.0/8 or [::1]"
        );
    }
    Ok(())
}

async fn connect(t: &Target) -> anyhow::Result<Client> {
    if let Some(hp) = t.target.strip_prefix("grpc://") {
        check_loopback(hp).await?;
        let channel = Endpoint::from_shared(format!("http://{hp}"))?
            .tcp_nodelay(true)
            .connect_lazy();
        Ok(Client::Grpc(
            GrpcInferenceServiceClient::new(channel).max_decoding_message_size(256 << 20),
        ))
    } else if let Some(hp) = t.target.strip_prefix("http://") {
        check_loopback(hp).await?;
        let client = reqwest::Client::builder()
            .http1_only()
            .no_proxy()
            .tcp_nodelay(true)
            .pool_max_idle_per_host(4096)
            .build()?;
        Ok(Client::Http {
            client,
            url: format!("http://{hp}/v2/models/{}/infer", t.model),
        })
    } else {
        bail!(
            "--target must start with grpc:// or http://, got {}",
            t.target
        )
    }
}

fn payloads(t: &Target) -> anyhow::Result<Vec<Payload>> {
    let mut items: Vec<Vec<u8>> = Vec::new();
    for p in &t.inputs {
        items.push(std::fs::read(p).with_context(|| format!("read {}", p.display()))?);
    }
    if let Some(p) = &t.lines {
        let text = std::fs::read_to_string(p).with_context(|| format!("read {}", p.display()))?;
        items.extend(
            text.lines()
                .filter(|l| !l.trim().is_empty())
                .map(|l| l.as_bytes().to_vec()),
        );
    }
    if items.is_empty() || t.batch == 0 {
        bail!("give at least one --input or a --lines file, and --batch >= 1");
    }
    Ok((0..items.len())
        .map(|i| {
            let batch: Vec<&[u8]> = (0..t.batch)
                .map(|j| items[(i + j) % items.len()].as_slice())
                .collect();
            let tensor = bytes_tensor(&batch);
            let (rest, header_len) = rest_body(&tensor, t.batch);
            Payload {
                tensor,
                rest,
                header_len,
                n: t.batch,
            }
        })
        .collect())
}

/// Sends one request; `Err` holds a short error class.
async fn send(client: &Client, model: &str, p: &Payload, timeout: Duration) -> Result<(), String> {
    let call = async {
        match client {
            Client::Grpc(c) => {
                let mut c = c.clone();
                c.model_infer(grpc_request(model, p.tensor.clone(), p.n))
                    .await
                    .map(|_| ())
                    .map_err(|s| format!("{:?}", s.code()))
            }
            Client::Http { client, url } => {
                let resp = client
                    .post(url)
                    .header("Inference-Header-Content-Length", p.header_len)
                    .header("Content-Type", "application/octet-stream")
                    .body(p.rest.clone())
                    .send()
                    .await
                    .map_err(|e| {
                        if e.is_connect() {
                            "connect".to_owned()
                        } else {
                            "http error".to_owned()
                        }
                    })?;
                let status = resp.status();
                let body = resp.bytes().await.map_err(|_| "http body".to_owned())?;
                if status.is_success() && !body.is_empty() {
                    Ok(())
                } else {
                    Err(format!("http {}", status.as_u16()))
                }
            }
        }
    };
    match tokio::time::timeout(timeout, call).await {
        Ok(r) => r,
        Err(_) => Err("timeout".into()),
    }
}

async fn run(
    t: Target,
    rate: f64,
    duration_s: f64,
    max_requests: u64,
    max_in_flight: usize,
    label: String,
) -> anyhow::Result<()> {
    let schedule = Schedule::new(rate, Duration::from_secs_f64(duration_s), max_requests)?;
    let client = connect(&t).await?;
    let payloads = Arc::new(payloads(&t)?);
    let timeout = Duration::from_secs_f64(t.timeout_s);
    let model: Arc<str> = t.model.as_str().into();
    let in_flight = Arc::new(AtomicUsize::new(0));
    let start = Instant::now() + Duration::from_millis(20);
    let mut tasks = tokio::task::JoinSet::new();
    let mut outcomes = Vec::with_capacity(schedule.count() as usize);
    for i in 0..schedule.count() {
        let due = start + schedule.due(i);
        tokio::time::sleep_until(due).await;
        if in_flight.load(Ordering::Relaxed) >= max_in_flight {
            outcomes.push((
                Outcome {
                    latency: Duration::ZERO,
                    error: Some("client_overload".into()),
                },
                due,
            ));
            continue;
        }
        in_flight.fetch_add(1, Ordering::Relaxed);
        let (client, payloads, model, in_flight) = (
            client.clone(),
            Arc::clone(&payloads),
            Arc::clone(&model),
            Arc::clone(&in_flight),
        );
        tasks.spawn(async move {
            let p = &payloads[i as usize % payloads.len()];
            let r = send(&client, &model, p, timeout).await;
            let done = Instant::now();
            in_flight.fetch_sub(1, Ordering::Relaxed);
            (
                Outcome {
                    latency: done - due,
                    error: r.err(),
                },
                done,
            )
        });
    }
    while let Some(r) = tasks.join_next().await {
        outcomes.push(r?);
    }
    let last = outcomes.iter().map(|(_, d)| *d).max().unwrap_or(start);
    let outcomes: Vec<Outcome> = outcomes.into_iter().map(|(o, _)| o).collect();
    let summary = summarize(&outcomes, last.saturating_duration_since(start));
    let mut json = summary.to_json(rate);
    json["label"] = label.into();
    json["target"] = t.target.into();
    json["duration_s"] = duration_s.into();
    println!("{json}");
    Ok(())
}

async fn probe(t: Target, since_unix_ns: u128, give_up_s: f64) -> anyhow::Result<()> {
    let client = connect(&t).await?;
    let p = payloads(&t)?.remove(0);
    let give_up = Instant::now() + Duration::from_secs_f64(give_up_s);
    let timeout = Duration::from_secs_f64(t.timeout_s);
    let mut tries = 0u64;
    loop {
        tries += 1;
        if send(&client, &t.model, &p, timeout).await.is_ok() {
            let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos();
            let ms = now.saturating_sub(since_unix_ns) as f64 / 1e6;
            println!(
                "{}",
                serde_json::json!({"first_success_ms": ms, "tries": tries})
            );
            return Ok(());
        }
        if Instant::now() > give_up {
            bail!("no successful answer within {give_up_s} s ({tries} tries)");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Stub inference: zeros `[N, width]` named `output`, answered at once.
struct Stub {
    output: String,
    width: usize,
}

#[tonic::async_trait]
impl GrpcInferenceService for Stub {
    async fn server_live(
        &self,
        _: tonic::Request<ServerLiveRequest>,
    ) -> Result<tonic::Response<ServerLiveResponse>, tonic::Status> {
        Ok(tonic::Response::new(ServerLiveResponse { live: true }))
    }
    async fn server_ready(
        &self,
        _: tonic::Request<ServerReadyRequest>,
    ) -> Result<tonic::Response<ServerReadyResponse>, tonic::Status> {
        Ok(tonic::Response::new(ServerReadyResponse { ready: true }))
    }
    async fn model_ready(
        &self,
        _: tonic::Request<ModelReadyRequest>,
    ) -> Result<tonic::Response<ModelReadyResponse>, tonic::Status> {
        Ok(tonic::Response::new(ModelReadyResponse { ready: true }))
    }
    async fn server_metadata(
        &self,
        _: tonic::Request<ServerMetadataRequest>,
    ) -> Result<tonic::Response<ServerMetadataResponse>, tonic::Status> {
        Ok(tonic::Response::new(ServerMetadataResponse {
            name: "tandem-loadgen-stub".into(),
            ..Default::default()
        }))
    }
    async fn model_metadata(
        &self,
        req: tonic::Request<ModelMetadataRequest>,
    ) -> Result<tonic::Response<ModelMetadataResponse>, tonic::Status> {
        Ok(tonic::Response::new(ModelMetadataResponse {
            name: req.into_inner().name,
            outputs: vec![TensorMetadata {
                name: self.output.clone(),
                datatype: "FP32".into(),
                shape: vec![-1, self.width as i64],
            }],
            ..Default::default()
        }))
    }
    type ModelStreamInferStream = tonic::codegen::tokio_stream::Empty<
        Result<tandem_proto::inference::ModelStreamInferResponse, tonic::Status>,
    >;
    async fn model_stream_infer(
        &self,
        _: tonic::Request<tonic::Streaming<ModelInferRequest>>,
    ) -> Result<tonic::Response<Self::ModelStreamInferStream>, tonic::Status> {
        Err(tonic::Status::unimplemented(
            "the stub answers ModelInfer only",
        ))
    }
    async fn model_config(
        &self,
        _: tonic::Request<tandem_proto::inference::ModelConfigRequest>,
    ) -> Result<tonic::Response<tandem_proto::inference::ModelConfigResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented(
            "the stub answers ModelInfer only",
        ))
    }
    async fn model_statistics(
        &self,
        _: tonic::Request<tandem_proto::inference::ModelStatisticsRequest>,
    ) -> Result<tonic::Response<tandem_proto::inference::ModelStatisticsResponse>, tonic::Status>
    {
        Err(tonic::Status::unimplemented(
            "the stub answers ModelInfer only",
        ))
    }
    async fn repository_index(
        &self,
        _: tonic::Request<tandem_proto::inference::RepositoryIndexRequest>,
    ) -> Result<tonic::Response<tandem_proto::inference::RepositoryIndexResponse>, tonic::Status>
    {
        Err(tonic::Status::unimplemented(
            "the stub answers ModelInfer only",
        ))
    }
    tandem_proto::triton_extensions!(|_| tonic::Status::unimplemented(
        "the stub answers ModelInfer only"
    ));
    async fn model_infer(
        &self,
        req: tonic::Request<ModelInferRequest>,
    ) -> Result<tonic::Response<ModelInferResponse>, tonic::Status> {
        let req = req.into_inner();
        let n = req
            .inputs
            .first()
            .and_then(|i| i.shape.first())
            .copied()
            .filter(|n| *n > 0)
            .ok_or_else(|| tonic::Status::invalid_argument("no input with a batch dimension"))?;
        Ok(tonic::Response::new(ModelInferResponse {
            model_name: req.model_name,
            id: req.id,
            outputs: vec![InferOutputTensor {
                name: self.output.clone(),
                datatype: "FP32".into(),
                shape: vec![n, self.width as i64],
                ..Default::default()
            }],
            raw_output_contents: vec![Bytes::from(vec![0u8; n as usize * self.width * 4])],
            ..Default::default()
        }))
    }
}

async fn stub(port: u16, output: String, width: usize) -> anyhow::Result<()> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    tonic::transport::Server::builder()
        .add_service(
            GrpcInferenceServiceServer::new(Stub { output, width })
                .max_decoding_message_size(256 << 20),
        )
        .serve_with_shutdown(addr, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // One thread: the benchmark pins this process to a core, and a single
    // event loop keeps the client's own overhead small and predictable.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match cli.cmd {
            Cmd::Run {
                target,
                rate,
                duration_s,
                max_requests,
                max_in_flight,
                label,
            } => run(target, rate, duration_s, max_requests, max_in_flight, label).await,
            Cmd::Probe {
                target,
                since_unix_ns,
                give_up_s,
            } => probe(target, since_unix_ns, give_up_s).await,
            Cmd::Stub {
                port,
                output,
                width,
            } => stub(port, output, width).await,
        }
    })
}
