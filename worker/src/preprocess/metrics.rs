//! Prometheus metrics of the preprocess role: names as constants, labels of
//! low cardinality only (protocol, outcome code, phase, color).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Requests admitted and waiting for a CPU thread.
pub const QUEUE_DEPTH: &str = "tandem_preprocess_queue_depth";
/// Requests being handled (admitted, not yet answered).
pub const IN_FLIGHT: &str = "tandem_preprocess_in_flight";
/// Bytes of request bodies reserved from `limits.maxRequestBytesInFlight`.
pub const REQUEST_BYTES_IN_FLIGHT: &str = "tandem_preprocess_request_bytes_in_flight";
/// Requests held because no inference endpoint exists.
pub const HELD: &str = "tandem_preprocess_held_requests";
/// Requests answered, by protocol and outcome code.
pub const REQUESTS: &str = "tandem_preprocess_requests";
/// Seconds per phase (total, queue_wait, preprocess, forward, postprocess).
pub const PHASE_SECONDS: &str = "tandem_preprocess_phase_seconds";
/// Calls to inference pods, by color and outcome.
pub const FORWARDS: &str = "tandem_preprocess_forwards";
/// Shadow comparisons, by result (match, mismatch, error).
pub const SHADOW: &str = "tandem_preprocess_shadow_comparisons";
/// 1 when ready to serve.
pub const READY: &str = "tandem_preprocess_ready";

/// Labels of [`REQUESTS`].
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `grpc` or `http`.
    pub protocol: &'static str,
    /// Outcome code (`OK`, `INVALID_ARGUMENT`, `RESOURCE_EXHAUSTED`, ...).
    pub code: &'static str,
}

/// Labels of [`PHASE_SECONDS`].
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    /// Phase name.
    pub phase: &'static str,
}

/// Labels of [`FORWARDS`].
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ForwardLabels {
    /// Routing color.
    pub color: String,
    /// `ok`, `error`, `retried`.
    pub outcome: &'static str,
}

/// Labels of [`SHADOW`].
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShadowLabels {
    /// `match`, `mismatch` or `error`.
    pub result: &'static str,
}

/// All metrics of the role.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// See [`QUEUE_DEPTH`].
    pub queue_depth: Gauge,
    /// See [`IN_FLIGHT`].
    pub in_flight: Gauge,
    /// See [`REQUEST_BYTES_IN_FLIGHT`].
    pub request_bytes_in_flight: Gauge,
    /// See [`HELD`].
    pub held: Gauge,
    /// See [`REQUESTS`].
    pub requests: Family<RequestLabels, Counter>,
    /// See [`PHASE_SECONDS`].
    pub phase_seconds: Family<PhaseLabels, Histogram>,
    /// See [`FORWARDS`].
    pub forwards: Family<ForwardLabels, Counter>,
    /// See [`SHADOW`].
    pub shadow: Family<ShadowLabels, Counter>,
    /// See [`READY`].
    pub ready: Gauge,
}

impl Metrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            queue_depth: Gauge::default(),
            in_flight: Gauge::default(),
            request_bytes_in_flight: Gauge::default(),
            held: Gauge::default(),
            requests: Family::default(),
            phase_seconds: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.0001, 2.0, 20))
            }),
            forwards: Family::default(),
            shadow: Family::default(),
            ready: Gauge::default(),
        };
        registry.register(
            QUEUE_DEPTH,
            "Requests admitted and waiting for a CPU thread",
            m.queue_depth.clone(),
        );
        registry.register(IN_FLIGHT, "Requests being handled", m.in_flight.clone());
        registry.register(
            REQUEST_BYTES_IN_FLIGHT,
            "Bytes of request bodies being received or held, reserved from limits.maxRequestBytesInFlight",
            m.request_bytes_in_flight.clone(),
        );
        registry.register(
            HELD,
            "Requests held while no inference endpoint exists",
            m.held.clone(),
        );
        registry.register(
            REQUESTS,
            "Requests answered, by protocol and outcome code",
            m.requests.clone(),
        );
        registry.register(
            PHASE_SECONDS,
            "Seconds spent per request phase",
            m.phase_seconds.clone(),
        );
        registry.register(
            FORWARDS,
            "Calls to inference pods, by color and outcome",
            m.forwards.clone(),
        );
        registry.register(
            SHADOW,
            "Shadow output comparisons, by result",
            m.shadow.clone(),
        );
        registry.register(
            READY,
            "1 when the worker is ready to serve",
            m.ready.clone(),
        );
        m
    }

    /// Observes one phase duration.
    pub fn observe(&self, phase: &'static str, d: std::time::Duration) {
        self.phase_seconds
            .get_or_create(&PhaseLabels { phase })
            .observe(d.as_secs_f64());
    }
}
