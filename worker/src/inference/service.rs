//! The inference role's core, shared by the gRPC, REST and control servers:
//! readiness, admission into the engine's batcher, stats. Handlers are thin
//! adapters over [`Worker::infer`].

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tandem_engine::runner::{Job, Runner, SubmitError};
use tandem_engine::{EngineError, ModelSpec};
use tandem_proto::inference::{ModelInferRequest, ModelInferResponse};
use tandem_proto::tandem::v1::{BatchStats, LatencySummary, WorkerStats};

use super::convert::{self, ConvertError};
use super::metrics::{Metrics, OutcomeLabel};
use super::stats::LatencyWindow;
use crate::common::oip::{self, NotServed};

/// Why an inference request failed.
#[derive(Debug, thiserror::Error)]
pub enum InferError {
    /// The request names another model or version.
    #[error(transparent)]
    UnknownModel(#[from] NotServed),
    /// The model is still loading or warming up.
    #[error("model is not ready yet")]
    NotReady,
    /// The worker is draining for shutdown.
    #[error("worker is shutting down")]
    Draining,
    /// The batcher queue is full.
    #[error("inference queue is full ({0} requests waiting)")]
    QueueFull(u64),
    /// The request does not fit the model.
    #[error(transparent)]
    Invalid(#[from] ConvertError),
    /// The engine refused or failed.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The engine thread went away without answering.
    #[error("engine stopped before answering")]
    Lost,
}

impl From<InferError> for tonic::Status {
    fn from(e: InferError) -> Self {
        let msg = crate::common::bounded_message(e.to_string());
        match e {
            InferError::UnknownModel(_) => tonic::Status::not_found(msg),
            InferError::NotReady | InferError::Draining | InferError::Lost => {
                tonic::Status::unavailable(msg)
            }
            InferError::QueueFull(_) => tonic::Status::resource_exhausted(msg),
            InferError::Invalid(_) | InferError::Engine(EngineError::InvalidInput(_)) => {
                tonic::Status::invalid_argument(msg)
            }
            InferError::Engine(EngineError::Device(_) | EngineError::Panic(_)) => {
                tonic::Status::internal(msg)
            }
        }
    }
}

impl InferError {
    /// The HTTP status of the REST form.
    pub fn http_status(&self) -> http::StatusCode {
        match self {
            Self::UnknownModel(_) => http::StatusCode::NOT_FOUND,
            Self::NotReady | Self::Draining | Self::Lost => http::StatusCode::SERVICE_UNAVAILABLE,
            Self::QueueFull(_) => http::StatusCode::TOO_MANY_REQUESTS,
            Self::Invalid(_) | Self::Engine(EngineError::InvalidInput(_)) => {
                http::StatusCode::BAD_REQUEST
            }
            Self::Engine(EngineError::Device(_) | EngineError::Panic(_)) => {
                http::StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }

    fn outcome(&self) -> &'static str {
        match self {
            Self::QueueFull(_) => "rejected",
            Self::Invalid(_)
            | Self::Engine(EngineError::InvalidInput(_))
            | Self::UnknownModel(_) => "invalid",
            _ => "error",
        }
    }
}

/// Shared state of one inference worker.
pub struct Worker {
    /// Served model name.
    pub model_name: String,
    /// Served model version.
    pub model_version: String,
    /// Pod name for stats.
    pub pod_name: String,
    runner: OnceLock<Runner>,
    ready: AtomicBool,
    draining: AtomicBool,
    requests: AtomicU64,
    errors: AtomicU64,
    /// Requests refused for the bytes-in-flight budget (the runner counts full-queue ones).
    refused: AtomicU64,
    latency: Mutex<LatencyWindow>,
    /// Prometheus metrics.
    pub metrics: Metrics,
}

impl Worker {
    /// A worker with no model yet (live, not ready).
    pub fn new(model_name: String, model_version: String, pod_name: String) -> Self {
        Self {
            model_name,
            model_version,
            pod_name,
            runner: OnceLock::new(),
            ready: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            latency: Mutex::new(LatencyWindow::new(Duration::from_secs(60), 8192)),
            metrics: Metrics::new(),
        }
    }

    /// Installs the loaded, warmed-up model and becomes ready.
    pub fn set_ready(&self, runner: Runner) {
        let _ = self.runner.set(runner);
        self.ready.store(true, Ordering::SeqCst);
        self.metrics.ready.set(1);
    }

    /// Stops taking requests (SIGTERM): not ready, new requests refused.
    pub fn start_drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
        self.ready.store(false, Ordering::SeqCst);
        self.metrics.ready.set(0);
    }

    /// Whether the model is loaded, warmed up and not draining.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// The model's spec, once loaded.
    pub fn spec(&self) -> Option<&ModelSpec> {
        self.runner.get().map(Runner::spec)
    }

    /// Whether `name`/`version` designate the served model (empty version = any).
    pub fn check_served(&self, name: &str, version: &str) -> Result<(), NotServed> {
        oip::check_served(&self.model_name, &self.model_version, name, version)
    }

    /// Runs one OIP v2 inference request through the batcher.
    pub async fn infer(
        &self,
        req: ModelInferRequest,
        span: tracing::Span,
    ) -> Result<ModelInferResponse, InferError> {
        let started = Instant::now();
        let result = self.infer_inner(req, span).await;
        let elapsed = started.elapsed();
        self.requests.fetch_add(1, Ordering::Relaxed);
        let outcome = match &result {
            Ok(_) => {
                self.metrics.latency.observe(elapsed.as_secs_f64());
                self.latency
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .record(Instant::now(), elapsed);
                "ok"
            }
            Err(e) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                e.outcome()
            }
        };
        self.metrics
            .requests
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
        result
    }

    /// Counts a request refused before it reached [`Self::infer`] (a REST body that could not
    /// be read or parsed), as [`Self::infer`] counts an invalid one.
    pub fn infer_rejected(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.errors.fetch_add(1, Ordering::Relaxed);
        self.metrics
            .requests
            .get_or_create(&OutcomeLabel { outcome: "invalid" })
            .inc();
    }

    /// Counts a request refused for the bytes-in-flight budget before it reached
    /// [`Self::infer`]: in `GetStats` as a request, an error and a rejection (as the runner
    /// counts a full queue's), and in Prometheus as `outcome="rejected"`.
    pub fn infer_refused(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.errors.fetch_add(1, Ordering::Relaxed);
        self.refused.fetch_add(1, Ordering::Relaxed);
        self.metrics.count_refused();
    }

    async fn infer_inner(
        &self,
        req: ModelInferRequest,
        span: tracing::Span,
    ) -> Result<ModelInferResponse, InferError> {
        self.check_served(&req.model_name, &req.model_version)?;
        oip::check_requested_outputs(&req).map_err(ConvertError::Unsupported)?;
        if self.draining.load(Ordering::SeqCst) {
            return Err(InferError::Draining);
        }
        let runner = match self.runner.get() {
            Some(r) if self.is_ready() => r,
            _ => return Err(InferError::NotReady),
        };
        let spec = runner.spec();
        let inputs = convert::engine_inputs(spec, &req)?;
        let requested: Vec<String> = req.outputs.iter().map(|o| o.name.clone()).collect();
        if let Some(unknown) = requested
            .iter()
            .find(|n| !spec.outputs.iter().any(|s| &s.name == *n))
        {
            return Err(ConvertError::UnknownOutput(unknown.clone()).into());
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        // Set when this future is dropped (the client went away, or it has its answer): the
        // engine skips a job still queued by then.
        let abandoned = Arc::new(AtomicBool::new(false));
        let _on_drop = SetOnDrop(Arc::clone(&abandoned));
        let job = Job {
            inputs,
            reply: Box::new(move |r| drop(tx.send(r))),
            span,
            abandoned: Some(abandoned),
        };
        match runner.submit(job) {
            Ok(()) => {}
            Err(SubmitError::QueueFull(_)) => {
                return Err(InferError::QueueFull(runner.stats().queue_depth));
            }
            Err(SubmitError::Closed(_)) => return Err(InferError::Draining),
        }
        let outputs = rx.await.map_err(|_| InferError::Lost)??;
        let (meta, raw) = convert::to_outputs(spec, &outputs, &requested);
        Ok(ModelInferResponse {
            model_name: self.model_name.clone(),
            model_version: self.model_version.clone(),
            id: req.id,
            outputs: meta,
            raw_output_contents: raw,
            ..Default::default()
        })
    }

    /// Refreshes the load gauges (before a scrape).
    pub fn refresh_gauges(&self) {
        if let Some(r) = self.runner.get() {
            let s = r.stats();
            self.metrics.queue_depth.set(s.queue_depth as i64);
            self.metrics.in_flight.set(s.in_flight as i64);
        }
    }

    /// The `WorkerControl.GetStats` answer.
    pub fn stats(&self) -> WorkerStats {
        let summary = self
            .latency
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .summary(Instant::now());
        let runner = self.runner.get().map(Runner::stats);
        WorkerStats {
            role: "inference".into(),
            pod_name: self.pod_name.clone(),
            ready: self.is_ready(),
            queue_depth: runner.map_or(0, |s| s.queue_depth),
            in_flight: runner.map_or(0, |s| s.in_flight),
            max_queue_depth: runner.map_or(0, |s| s.max_queue_depth),
            requests_total: self.requests.load(Ordering::Relaxed),
            errors_total: self.errors.load(Ordering::Relaxed),
            rejected_total: runner
                .map_or(0, |s| s.rejected)
                .saturating_add(self.refused.load(Ordering::Relaxed)),
            latency: Some(LatencySummary {
                count: summary.count,
                p50_ms: summary.p50_ms,
                p99_ms: summary.p99_ms,
                mean_ms: summary.mean_ms,
            }),
            throughput_rps: summary.throughput_rps,
            model_name: self.model_name.clone(),
            model_version: self.model_version.clone(),
            model_loaded: self.runner.get().is_some(),
            batches: runner.map(|s| BatchStats {
                batches: s.batches,
                mean_batch_size: s.mean_batch_size,
                max_batch_size: u32::try_from(s.max_batch_size).unwrap_or(u32::MAX),
            }),
            ..Default::default()
        }
    }
}

/// Sets its flag when dropped.
struct SetOnDrop(Arc<AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Test check, shared by the gRPC and REST budget tests: one budget refusal is counted in
/// Prometheus and in `GetStats`, and no request bytes are left reserved.
#[cfg(test)]
pub(crate) fn assert_one_refusal_counted(w: &Worker) {
    let metrics = w.metrics.encode();
    for line in [
        "tandem_inference_requests_total{outcome=\"rejected\"} 1",
        "tandem_inference_request_bytes_in_flight 0",
    ] {
        assert!(metrics.contains(line), "{line} in {metrics}");
    }
    let stats = w.stats();
    assert_eq!(stats.rejected_total, 1, "{stats:?}");
    assert!(stats.errors_total >= 1, "{stats:?}");
}
