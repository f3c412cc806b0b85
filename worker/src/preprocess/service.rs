//! The protocol-independent request path of the preprocess role:
//! validate → admit → preprocess on the CPU pool → forward → post-process.
//!
//! gRPC and REST both turn their request into a `ModelInferRequest` and call
//! [`Service::infer`]; this keeps one set of checks and one error mapping.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tandem_proto::inference::model_infer_request::InferInputTensor;
use tandem_proto::inference::model_infer_response::InferOutputTensor;
use tandem_proto::inference::model_metadata_response::TensorMetadata;
use tandem_proto::inference::{ModelInferRequest, ModelInferResponse, ModelMetadataResponse};
use tandem_proto::tandem::v1::WorkerStats;
use tokio::sync::Semaphore;

use super::error::RequestError;
use super::image::ImagePipeline;
use super::metrics::{Metrics, RequestLabels};
use super::pool::{Abandoned, CpuPool, PoolError};
use super::postprocess::classify;
use super::router::contract::Contract;
use super::router::{Router, RouterConfig};
use super::text::TextPipeline;
use crate::common::oip::{self, NotServed};
use crate::common::stats::LatencyWindow;
use crate::common::telemetry::TraceContext;
use crate::common::tensor::{self, DataType};
use crate::config::{PipelineConfig, Postprocess, Preprocess};

/// Name of the client-facing input in model metadata (any name is accepted).
pub const CLIENT_INPUT: &str = "INPUT";
/// Output names, shared with the inference role (see docs/worker-config.md).
pub mod names {
    /// Text: token ids, INT64 `[N, L]`.
    pub const INPUT_IDS: &str = "input_ids";
    /// Text: 1 on tokens, 0 on padding, INT64 `[N, L]`.
    pub const ATTENTION_MASK: &str = "attention_mask";
    /// Text: segment ids, INT64 `[N, L]`.
    pub const TOKEN_TYPE_IDS: &str = "token_type_ids";
    /// Image: FP32 or UINT8 `[N, 3, H, W]` / `[N, H, W, 3]`.
    pub const IMAGE_INPUT: &str = "input";
    /// Embedding output, FP32 `[N, D]`.
    pub const EMBEDDING: &str = "embedding";
    /// Classifier output, FP32 `[N, C]`.
    pub const LOGITS: &str = "logits";
    /// Top-k probabilities, FP32 `[N, K]`.
    pub const PROBABILITIES: &str = "probabilities";
    /// Top-k labels, BYTES `[N, K]`.
    pub const LABELS: &str = "labels";
}

/// The configured transform.
#[derive(Debug, Clone)]
pub enum Pipeline {
    /// Tokenizer.
    Text(Arc<TextPipeline>),
    /// Image decode/resize/normalize.
    Image(Arc<ImagePipeline>),
}

/// Tensors ready to forward.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// Input descriptions.
    pub inputs: Vec<InferInputTensor>,
    /// Their raw contents, in the same order.
    pub raw: Vec<Bytes>,
}

fn tensor_desc(name: &str, datatype: &str, shape: Vec<i64>) -> InferInputTensor {
    InferInputTensor {
        name: name.to_owned(),
        datatype: datatype.to_owned(),
        shape,
        ..Default::default()
    }
}

impl Pipeline {
    /// Runs the transform on a batch (CPU-bound; call it on the pool).
    /// Decodes or tokenizes a request's items into the tensors forwarded to inference. An
    /// image batch stops between images once its client has gone away (`gone`); a text batch
    /// is tokenized whole (each text costs what truncation keeps).
    pub fn prepare(&self, items: &[Bytes], gone: &Abandoned) -> Result<Prepared, RequestError> {
        match self {
            Pipeline::Text(t) => {
                let _span = tracing::info_span!("tokenize", n = items.len()).entered();
                let out = t
                    .process_batch(items)
                    .map_err(|(i, e)| RequestError::invalid(format!("text item {i}: {e}")))?;
                let shape = vec![out.n as i64, out.len as i64];
                Ok(Prepared {
                    inputs: vec![
                        tensor_desc(names::INPUT_IDS, "INT64", shape.clone()),
                        tensor_desc(names::ATTENTION_MASK, "INT64", shape.clone()),
                        tensor_desc(names::TOKEN_TYPE_IDS, "INT64", shape),
                    ],
                    raw: vec![
                        out.input_ids.into(),
                        out.attention_mask.into(),
                        out.token_type_ids.into(),
                    ],
                })
            }
            Pipeline::Image(p) => {
                let buf = p
                    .process_batch_while(items, || !gone.now())
                    .map_err(|(i, e)| RequestError::invalid(format!("image {i}: {e}")))?
                    .ok_or_else(|| RequestError::Unavailable("the client went away".into()))?;
                Ok(Prepared {
                    inputs: vec![tensor_desc(
                        names::IMAGE_INPUT,
                        p.datatype(),
                        p.shape(items.len()),
                    )],
                    raw: vec![Bytes::from(buf)],
                })
            }
        }
    }
}

/// Request-level counters for `GetStats`.
#[derive(Debug)]
struct Counters {
    requests: AtomicU64,
    errors: AtomicU64,
    rejected: AtomicU64,
    latency: Mutex<LatencyWindow>,
}

/// The preprocess service; share it behind an `Arc`.
#[derive(Debug)]
pub struct Service {
    cfg: PipelineConfig,
    pipeline: Pipeline,
    pool: CpuPool,
    admission: Arc<Semaphore>,
    router: Arc<Router>,
    metrics: Metrics,
    labels: Arc<Vec<String>>,
    /// Shutdown has begun: not ready any more.
    unready: AtomicBool,
    /// New requests are refused.
    stopping: AtomicBool,
    counters: Counters,
    pod_name: String,
    /// Width `D` of the model's `[N, D]` output (embedding size or class
    /// count), learned from the first good inference answer; -1 until then.
    /// The config does not carry it and the inference stage may be a
    /// different model version after a rollout, so the answers are the truth.
    output_width: AtomicI64,
}

impl Service {
    /// Builds the service from a validated config and a loaded pipeline.
    pub fn new(
        cfg: PipelineConfig,
        pipeline: Pipeline,
        labels: Vec<String>,
        metrics: Metrics,
    ) -> Arc<Self> {
        let limits = cfg.limits;
        let compare_output = match cfg.postprocess {
            Postprocess::Embedding => Some(names::EMBEDDING.to_owned()),
            Postprocess::Classification { .. } => Some(names::LOGITS.to_owned()),
            Postprocess::None => None,
        };
        let router = Arc::new(Router::new(
            RouterConfig {
                default_model: cfg.model.name.clone(),
                default_version: cfg.model.version.clone(),
                max_held: limits.max_held_requests,
                hold_timeout: Duration::from_millis(limits.hold_timeout_ms),
                forward_timeout: Duration::from_millis(limits.forward_timeout_ms),
                compare_output,
                contract: Some(Arc::new(Contract::of(&cfg))),
            },
            metrics.clone(),
        ));
        Arc::new(Self {
            pool: CpuPool::new(limits.cpu_threads, limits.max_queue_depth),
            admission: Arc::new(Semaphore::new(limits.max_queue_depth)),
            router,
            metrics,
            labels: Arc::new(labels),
            unready: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            counters: Counters {
                requests: AtomicU64::new(0),
                errors: AtomicU64::new(0),
                rejected: AtomicU64::new(0),
                latency: Mutex::new(LatencyWindow::new(Duration::from_secs(30), 8192)),
            },
            pod_name: std::env::var("POD_NAME")
                .or_else(|_| std::env::var("HOSTNAME"))
                .unwrap_or_default(),
            output_width: AtomicI64::new(-1),
            cfg,
            pipeline,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &PipelineConfig {
        &self.cfg
    }

    /// The router (for `SetRoutes` and static endpoints).
    pub fn router(&self) -> &Arc<Router> {
        &self.router
    }

    /// Ready = a routing table is held and shutdown has not begun.
    pub fn is_ready(&self) -> bool {
        !self.unready.load(Ordering::Relaxed) && self.router.has_table()
    }

    /// Shutdown has begun: not ready any more, so that Service endpoints and load balancers
    /// take the pod out, while requests are still taken until [`Service::stop_accepting`].
    pub fn begin_shutdown(&self) {
        self.unready.store(true, Ordering::Relaxed);
        self.metrics.ready.set(0);
    }

    /// New requests are refused (`UNAVAILABLE`) from now on; accepted ones finish.
    pub fn stop_accepting(&self) {
        self.begin_shutdown();
        self.stopping.store(true, Ordering::Relaxed);
    }

    /// Requests admitted and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.cfg.limits.max_queue_depth - self.admission.available_permits()
    }

    /// Waits until no admitted request remains, or `limit` passes.
    pub async fn drain(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        let all = u32::try_from(self.cfg.limits.max_queue_depth).unwrap_or(u32::MAX);
        tokio::time::timeout_at(deadline, self.admission.acquire_many(all))
            .await
            .is_ok()
    }

    /// Refreshes the readiness gauge.
    pub fn refresh_ready_metric(&self) {
        self.metrics.ready.set(i64::from(self.is_ready()));
    }

    /// The client-facing model metadata.
    pub fn metadata(&self) -> ModelMetadataResponse {
        let t = |name: &str, datatype: &str, shape: Vec<i64>| TensorMetadata {
            name: name.to_owned(),
            datatype: datatype.to_owned(),
            shape,
        };
        let width = self.output_width.load(Ordering::Relaxed);
        let outputs = match &self.cfg.postprocess {
            Postprocess::None => vec![],
            Postprocess::Embedding => vec![t(names::EMBEDDING, "FP32", vec![-1, width])],
            Postprocess::Classification { top_k, .. } => {
                // k is min(topK, classes) once the class count is known.
                let k = if width > 0 {
                    (*top_k as i64).min(width)
                } else {
                    *top_k as i64
                };
                vec![
                    t(names::PROBABILITIES, "FP32", vec![-1, k]),
                    t(names::LABELS, "BYTES", vec![-1, k]),
                    t(names::LOGITS, "FP32", vec![-1, width]),
                ]
            }
        };
        ModelMetadataResponse {
            name: self.cfg.model.name.clone(),
            versions: if self.cfg.model.version.is_empty() {
                vec![]
            } else {
                vec![self.cfg.model.version.clone()]
            },
            platform: match self.cfg.preprocess {
                Preprocess::Text(_) => "tandem_preprocess_text".into(),
                Preprocess::Image(_) => "tandem_preprocess_image".into(),
            },
            inputs: vec![t(CLIENT_INPUT, "BYTES", vec![-1])],
            outputs,
        }
    }

    /// Whether `name`/`version` address the model served here, [`oip::check_served`] over the
    /// pipeline's `model`.
    pub fn check_served(&self, name: &str, version: &str) -> Result<(), NotServed> {
        let model = &self.cfg.model;
        oip::check_served(&model.name, &model.version, name, version)
    }

    /// What is refused before any work: a model or version not served here (the answer names
    /// the version that is), and an output asking for Triton's classification extension,
    /// pointing at the pipeline's own.
    fn refuse_early(&self, req: &ModelInferRequest) -> Result<(), RequestError> {
        self.check_served(&req.model_name, &req.model_version)?;
        oip::check_requested_outputs(req).map_err(|e| {
            RequestError::invalid(format!(
                "{e}; `postprocess: Classification` in the pipeline returns the top-k labels \
                 (outputs \"labels\" and \"probabilities\")"
            ))
        })
    }

    /// Handles one inference request end to end and records its outcome.
    pub async fn infer(
        self: &Arc<Self>,
        req: ModelInferRequest,
        trace: Option<TraceContext>,
        protocol: &'static str,
    ) -> Result<ModelInferResponse, RequestError> {
        let started = Instant::now();
        let span = tracing::info_span!("infer", protocol, model = %req.model_name, id = %req.id);
        if let Some(ctx) = &trace {
            crate::common::telemetry::set_remote_parent(&span, ctx);
        }
        let result = tracing::Instrument::instrument(self.infer_inner(req, trace), span).await;
        let elapsed = started.elapsed();
        self.metrics.observe("total", elapsed);
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        let code = match &result {
            Ok(_) => {
                self.counters
                    .latency
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .record(Instant::now(), elapsed);
                "OK"
            }
            Err(e) => {
                if matches!(e, RequestError::ResourceExhausted(_)) {
                    self.counters.rejected.fetch_add(1, Ordering::Relaxed);
                }
                self.counters.errors.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(error = %e, "request failed");
                e.code_label()
            }
        };
        self.metrics
            .requests
            .get_or_create(&RequestLabels { protocol, code })
            .inc();
        result
    }

    /// Counts a request refused before it reached [`Self::infer`] (e.g. an
    /// unparsable REST body).
    pub fn infer_rejected(&self, protocol: &'static str, e: &RequestError) {
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        self.counters.errors.fetch_add(1, Ordering::Relaxed);
        if matches!(e, RequestError::ResourceExhausted(_)) {
            self.counters.rejected.fetch_add(1, Ordering::Relaxed);
        }
        self.metrics
            .requests
            .get_or_create(&RequestLabels {
                protocol,
                code: e.code_label(),
            })
            .inc();
    }

    async fn infer_inner(
        self: &Arc<Self>,
        mut req: ModelInferRequest,
        trace: Option<TraceContext>,
    ) -> Result<ModelInferResponse, RequestError> {
        self.refuse_early(&req)?;
        if self.stopping.load(Ordering::Relaxed) {
            return Err(RequestError::Unavailable("worker is shutting down".into()));
        }
        let items = self.validate(&req)?;
        // Only the id and the requested outputs are needed from here on: the request's own
        // bytes (an upload can be 64 MiB of text of which 256 tokens are forwarded) are not
        // kept while the inference call runs.
        // (A `..` pattern would leave the other fields in `req` until the function returns.)
        let (id, outputs) = (
            std::mem::take(&mut req.id),
            std::mem::take(&mut req.outputs),
        );
        drop(req);
        // Shared with the CPU job: a client that goes away while its items are decoded or
        // tokenized does not free its place in the queue until that work has ended, so
        // `maxQueueDepth` bounds the CPU work queued and running.
        let permit = Arc::new(
            Arc::clone(&self.admission)
                .try_acquire_owned()
                .map_err(|_| {
                    RequestError::ResourceExhausted(format!(
                        "queue is full (maxQueueDepth {})",
                        self.cfg.limits.max_queue_depth
                    ))
                })?,
        );
        let job_permit = Arc::clone(&permit);
        self.metrics.in_flight.inc();
        let _in_flight = GaugeGuard(&self.metrics.in_flight);

        let n = items.len();
        let pipeline = self.pipeline.clone();
        self.metrics.queue_depth.set(self.pool.queued() as i64 + 1);
        let cpu_started = Instant::now();
        let (prepared, waited) = self
            .pool
            .run(tracing::info_span!("preprocess", n), move |gone| {
                let _permit = job_permit;
                pipeline.prepare(&items, gone)
            })
            .await
            .map_err(|e| match e {
                PoolError::Full => RequestError::ResourceExhausted("CPU queue is full".into()),
                PoolError::Stopped => RequestError::Unavailable("CPU pool stopped".into()),
            })?;
        self.metrics.queue_depth.set(self.pool.queued() as i64);
        self.metrics.observe("queue_wait", waited);
        self.metrics
            .observe("preprocess", cpu_started.elapsed().saturating_sub(waited));
        let prepared = prepared?;

        let forward = ModelInferRequest {
            model_name: String::new(),
            model_version: String::new(),
            id: id.clone(),
            parameters: Default::default(),
            inputs: prepared.inputs,
            outputs: vec![],
            raw_input_contents: prepared.raw,
        };
        let fwd_started = Instant::now();
        let forwarded = self.router.forward(forward, trace).await?;
        self.metrics.observe("forward", fwd_started.elapsed());

        let post_started = Instant::now();
        let mut resp = self.postprocess(forwarded.response, n)?;
        self.metrics.observe("postprocess", post_started.elapsed());
        resp.model_name = self.cfg.model.name.clone();
        resp.model_version = self.cfg.model.version.clone();
        resp.id = id;
        filter_outputs(
            &mut resp,
            &outputs.iter().map(|o| o.name.as_str()).collect::<Vec<_>>(),
        )?;
        Ok(resp)
    }

    /// The outputs this pipeline answers with, when its post-processing fixes them (`None`
    /// passes the model's outputs through, which only the inference answer names).
    fn known_outputs(&self) -> Option<&'static [&'static str]> {
        match &self.cfg.postprocess {
            Postprocess::None => None,
            Postprocess::Embedding => Some(&[names::EMBEDDING]),
            Postprocess::Classification { .. } => {
                Some(&[names::PROBABILITIES, names::LABELS, names::LOGITS])
            }
        }
    }

    /// Checks the client input and splits its BYTES elements.
    fn validate(&self, req: &ModelInferRequest) -> Result<Vec<Bytes>, RequestError> {
        // An unknown output is refused before any work, where the outputs are known.
        if let Some(known) = self.known_outputs()
            && let Some(o) = req
                .outputs
                .iter()
                .find(|o| !known.contains(&o.name.as_str()))
        {
            return Err(RequestError::invalid(format!(
                "requested output {:?} does not exist; available: {known:?}",
                o.name
            )));
        }
        let [input] = req.inputs.as_slice() else {
            return Err(RequestError::invalid(format!(
                "expected exactly 1 input (BYTES, shape [N] or [N,1]), got {}",
                req.inputs.len()
            )));
        };
        if input.datatype != DataType::Bytes.as_str() {
            return Err(RequestError::invalid(format!(
                "input {:?} has datatype {:?}; expected BYTES (encoded images or UTF-8 text)",
                input.name, input.datatype
            )));
        }
        let n = match input.shape.as_slice() {
            [n] | [n, 1] if *n >= 1 => *n as usize,
            other => {
                return Err(RequestError::invalid(format!(
                    "input {:?} has shape {other:?}; expected [N] or [N,1] with N >= 1",
                    input.name
                )));
            }
        };
        if n > self.cfg.limits.max_batch {
            return Err(RequestError::invalid(format!(
                "batch of {n} is over the limit of {} (limits.maxBatch)",
                self.cfg.limits.max_batch
            )));
        }
        let raw = tensor::input_raw(req, 0).map_err(|e| RequestError::invalid(e.to_string()))?;
        if raw.len() > self.cfg.limits.max_request_bytes {
            return Err(RequestError::invalid(format!(
                "request data is {} bytes, over the limit of {} bytes (limits.maxRequestBytes)",
                raw.len(),
                self.cfg.limits.max_request_bytes
            )));
        }
        let items = tensor::decode_bytes_elements_up_to(&raw, n)
            .map_err(|e| RequestError::invalid(format!("input {:?}: {e}", input.name)))?;
        if items.len() > n {
            return Err(RequestError::invalid(format!(
                "input {:?}: shape says {n} elements but the data holds more",
                input.name
            )));
        }
        if items.len() < n {
            return Err(RequestError::invalid(format!(
                "input {:?}: shape says {n} elements but the data holds {}",
                input.name,
                items.len()
            )));
        }
        Ok(items)
    }

    fn postprocess(
        &self,
        resp: ModelInferResponse,
        n: usize,
    ) -> Result<ModelInferResponse, RequestError> {
        let resp = normalize_raw(resp)?;
        match &self.cfg.postprocess {
            Postprocess::None => Ok(resp),
            Postprocess::Embedding => {
                let (out, raw) = take_fp32(&resp, names::EMBEDDING, n)?;
                self.learn_output_width(&out);
                Ok(ModelInferResponse {
                    outputs: vec![InferOutputTensor {
                        name: names::EMBEDDING.into(),
                        datatype: "FP32".into(),
                        shape: out.shape.clone(),
                        ..Default::default()
                    }],
                    raw_output_contents: vec![raw],
                    ..resp
                })
            }
            Postprocess::Classification { top_k, .. } => {
                let (out, raw) = take_fp32(&resp, names::LOGITS, n)?;
                self.learn_output_width(&out);
                let classes = out.shape.get(1).copied().unwrap_or(0).max(0) as usize;
                let logits = tensor::le_bytes_to_f32(&raw).ok_or_else(|| {
                    RequestError::Internal("inference logits are not FP32".into())
                })?;
                let top = classify(&logits, n, classes, *top_k, &self.labels);
                let k = top.k as i64;
                let fp = |name: &str, shape: Vec<i64>| InferOutputTensor {
                    name: name.into(),
                    datatype: "FP32".into(),
                    shape,
                    ..Default::default()
                };
                Ok(ModelInferResponse {
                    outputs: vec![
                        fp(names::PROBABILITIES, vec![n as i64, k]),
                        InferOutputTensor {
                            name: names::LABELS.into(),
                            datatype: "BYTES".into(),
                            shape: vec![n as i64, k],
                            ..Default::default()
                        },
                        fp(names::LOGITS, out.shape.clone()),
                    ],
                    raw_output_contents: vec![
                        tensor::f32_to_le_bytes(&top.probabilities),
                        tensor::encode_bytes_elements(top.labels.iter().map(String::as_bytes)),
                        raw,
                    ],
                    ..resp
                })
            }
        }
    }

    /// Remembers `D` of a checked FP32 `[N, D]` inference output for
    /// [`Self::metadata`].
    fn learn_output_width(&self, out: &InferOutputTensor) {
        if let Some(&d) = out.shape.get(1)
            && d > 0
        {
            self.output_width.store(d, Ordering::Relaxed);
        }
    }

    /// A `WorkerControl` stats snapshot.
    pub fn stats(&self, now: Instant) -> WorkerStats {
        let (colors, shadow) = self.router.stats(now);
        let mut lat = self
            .counters
            .latency
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        WorkerStats {
            role: "preprocess".into(),
            pod_name: self.pod_name.clone(),
            ready: self.is_ready(),
            queue_depth: self.pool.queued() as u64,
            in_flight: self.in_flight() as u64,
            max_queue_depth: self.cfg.limits.max_queue_depth as u64,
            requests_total: self.counters.requests.load(Ordering::Relaxed),
            errors_total: self.counters.errors.load(Ordering::Relaxed),
            rejected_total: self.counters.rejected.load(Ordering::Relaxed),
            latency: Some(lat.summary(now)),
            throughput_rps: lat.throughput(now),
            routes_generation: self.router.generation(),
            held_requests: self.router.held_now(),
            colors,
            shadow,
            model_name: self.cfg.model.name.clone(),
            model_version: self.cfg.model.version.clone(),
            model_loaded: true,
            batches: None,
            model_mismatches: self.router.model_mismatches(),
        }
    }
}

struct GaugeGuard<'a>(&'a prometheus_client::metrics::gauge::Gauge);

impl Drop for GaugeGuard<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Makes `raw_output_contents` line up with `outputs` (typed contents are
/// converted), so later steps index one form only.
fn normalize_raw(mut resp: ModelInferResponse) -> Result<ModelInferResponse, RequestError> {
    if resp.raw_output_contents.is_empty() {
        resp.raw_output_contents = resp
            .outputs
            .iter_mut()
            .map(|o| {
                o.contents
                    .take()
                    .map(|c| tensor::contents_to_raw(&c))
                    .unwrap_or_default()
            })
            .collect();
    }
    if resp.raw_output_contents.len() != resp.outputs.len() {
        return Err(RequestError::Internal(format!(
            "inference answered {} outputs but {} raw contents",
            resp.outputs.len(),
            resp.raw_output_contents.len()
        )));
    }
    Ok(resp)
}

/// The FP32 `[n, D]` output named `name` (or the first FP32 output).
fn take_fp32(
    resp: &ModelInferResponse,
    name: &str,
    n: usize,
) -> Result<(InferOutputTensor, Bytes), RequestError> {
    let idx = resp
        .outputs
        .iter()
        .position(|o| o.name == name)
        .or_else(|| resp.outputs.iter().position(|o| o.datatype == "FP32"))
        .ok_or_else(|| RequestError::Internal(format!("inference returned no {name:?} output")))?;
    let out = resp.outputs[idx].clone();
    let raw = resp.raw_output_contents[idx].clone();
    if out.datatype != "FP32" || out.shape.len() != 2 || out.shape[0] != n as i64 {
        return Err(RequestError::Internal(format!(
            "inference output {:?} is {} {:?}; expected FP32 [{n}, D]",
            out.name, out.datatype, out.shape
        )));
    }
    tensor::check_raw_size(&out.name, DataType::Fp32, &out.shape, &raw)
        .map_err(|e| RequestError::Internal(e.to_string()))?;
    Ok((out, raw))
}

/// Keeps only the outputs the client asked for (all when it named none).
fn filter_outputs(resp: &mut ModelInferResponse, wanted: &[&str]) -> Result<(), RequestError> {
    if wanted.is_empty() {
        return Ok(());
    }
    if let Some(missing) = wanted
        .iter()
        .find(|w| !resp.outputs.iter().any(|o| o.name == **w))
    {
        return Err(RequestError::invalid(format!(
            "requested output {missing:?} does not exist; available: {:?}",
            resp.outputs
                .iter()
                .map(|o| o.name.as_str())
                .collect::<Vec<_>>()
        )));
    }
    let keep: Vec<bool> = resp
        .outputs
        .iter()
        .map(|o| wanted.contains(&o.name.as_str()))
        .collect();
    let mut i = 0;
    resp.outputs.retain(|_| {
        i += 1;
        keep[i - 1]
    });
    let mut j = 0;
    resp.raw_output_contents.retain(|_| {
        j += 1;
        keep[j - 1]
    });
    Ok(())
}

/// Builds the pipeline described by the config.
pub fn build_pipeline(cfg: &PipelineConfig) -> anyhow::Result<Pipeline> {
    Ok(match &cfg.preprocess {
        Preprocess::Text(t) => {
            Pipeline::Text(Arc::new(TextPipeline::load(&t.tokenizer, t.max_length)?))
        }
        Preprocess::Image(i) => Pipeline::Image(Arc::new(ImagePipeline::new(
            i.clone(),
            cfg.limits.max_image_pixels,
        ))),
    })
}

/// Builds the pipeline, downloading an `http(s)://` tokenizer first.
pub async fn build_pipeline_async(cfg: &PipelineConfig) -> anyhow::Result<Pipeline> {
    match &cfg.preprocess {
        Preprocess::Text(t) => Ok(Pipeline::Text(Arc::new(
            TextPipeline::load_any(&t.tokenizer, t.max_length).await?,
        ))),
        Preprocess::Image(_) => build_pipeline(cfg),
    }
}

/// Loads the labels for classification post-processing.
pub fn load_labels(cfg: &PipelineConfig) -> anyhow::Result<Vec<String>> {
    Ok(match &cfg.postprocess {
        Postprocess::Classification {
            labels: Some(l), ..
        } if l == "imagenet" => super::postprocess::imagenet_labels(),
        Postprocess::Classification {
            labels: Some(path), ..
        } => super::postprocess::parse_labels(
            &std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("read labels {path}: {e}"))?,
        ),
        _ => vec![],
    })
}

/// Helper for tests and the servers: the trace context of an incoming request.
pub fn trace_from_header(value: Option<&str>) -> Option<TraceContext> {
    value.and_then(TraceContext::parse)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn embedding_service() -> Arc<Service> {
        let cfg = PipelineConfig::parse(
            "pipeline: p\nmodel: {name: minilm}\npreprocess:\n  image:\n    resize: {width: 8, height: 8}\npostprocess: {kind: Embedding}\n",
        )
        .unwrap();
        let pipeline = build_pipeline(&cfg).unwrap();
        let mut registry = prometheus_client::registry::Registry::default();
        Service::new(cfg, pipeline, vec![], Metrics::register(&mut registry))
    }

    fn embedding_answer(n: usize, d: usize) -> ModelInferResponse {
        ModelInferResponse {
            outputs: vec![InferOutputTensor {
                name: names::EMBEDDING.into(),
                datatype: "FP32".into(),
                shape: vec![n as i64, d as i64],
                ..Default::default()
            }],
            raw_output_contents: vec![tensor::f32_to_le_bytes(&vec![0.5; n * d])],
            ..Default::default()
        }
    }

    fn embedding_shape(svc: &Service) -> Vec<i64> {
        svc.metadata().outputs[0].shape.clone()
    }

    #[test]
    fn embedding_metadata_reports_the_width_of_the_models_answers_once_one_arrived() {
        let svc = embedding_service();
        assert_eq!(embedding_shape(&svc), vec![-1, -1]);
        svc.postprocess(embedding_answer(2, 384), 2).unwrap();
        assert_eq!(embedding_shape(&svc), vec![-1, 384]);
    }

    #[test]
    fn a_malformed_answer_does_not_change_the_reported_width() {
        let svc = embedding_service();
        svc.postprocess(embedding_answer(1, 384), 1).unwrap();
        // Batch-size mismatch: refused before anything is learned.
        assert!(svc.postprocess(embedding_answer(3, 16), 2).is_err());
        assert_eq!(embedding_shape(&svc), vec![-1, 384]);
    }
}
