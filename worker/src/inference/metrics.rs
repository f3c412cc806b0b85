//! The inference role's Prometheus metrics: one registry, names as constants,
//! low-cardinality labels only.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::common::control_auth;

const REQUESTS: &str = "tandem_inference_requests";
const LATENCY: &str = "tandem_inference_request_duration_seconds";
const BATCH_SIZE: &str = "tandem_inference_batch_size";
const QUEUE_DEPTH: &str = "tandem_inference_queue_depth";
const IN_FLIGHT: &str = "tandem_inference_in_flight";
const READY: &str = "tandem_inference_model_ready";
const REQUEST_BYTES_IN_FLIGHT: &str = "tandem_inference_request_bytes_in_flight";

/// Outcome label of a request.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// `ok`, `invalid`, `rejected`, `error`.
    pub outcome: &'static str,
}

/// All metrics of the inference role.
pub struct Metrics {
    registry: Registry,
    /// Requests by outcome.
    pub requests: Family<OutcomeLabel, Counter>,
    /// End-to-end ModelInfer latency.
    pub latency: Histogram,
    /// Rows per request that reached the engine (batch composition is in GetStats).
    pub batch_size: Histogram,
    /// Requests waiting in the batcher.
    pub queue_depth: Gauge,
    /// Requests in the running batch.
    pub in_flight: Gauge,
    /// 1 once the model is loaded and warmed up.
    pub ready: Gauge,
    /// Bytes of request bodies reserved from `--max-request-bytes-in-flight`.
    pub request_bytes_in_flight: Gauge,
    /// WorkerControl calls refused for their control token (shared with the preprocess role).
    pub control_refusals: control_auth::Refusals,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<OutcomeLabel, Counter>::default();
        let latency = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        let batch_size = Histogram::new(exponential_buckets(1.0, 2.0, 10));
        let queue_depth = Gauge::default();
        let in_flight = Gauge::default();
        let ready = Gauge::default();
        let request_bytes_in_flight = Gauge::default();
        registry.register(REQUESTS, "Inference requests by outcome", requests.clone());
        registry.register(LATENCY, "ModelInfer latency in seconds", latency.clone());
        registry.register(
            BATCH_SIZE,
            "Rows of each batch run by the engine",
            batch_size.clone(),
        );
        registry.register(
            QUEUE_DEPTH,
            "Requests waiting in the batcher",
            queue_depth.clone(),
        );
        registry.register(
            IN_FLIGHT,
            "Requests in the batch being run",
            in_flight.clone(),
        );
        registry.register(
            READY,
            "1 when the model is loaded and warmed up",
            ready.clone(),
        );
        registry.register(
            REQUEST_BYTES_IN_FLIGHT,
            "Bytes of request bodies being received or held, reserved from --max-request-bytes-in-flight",
            request_bytes_in_flight.clone(),
        );
        let control_refusals = control_auth::register(&mut registry);
        Self {
            registry,
            requests,
            latency,
            batch_size,
            queue_depth,
            in_flight,
            ready,
            request_bytes_in_flight,
            control_refusals,
        }
    }

    /// Counts a request refused before it reached the batcher because the worker had no room
    /// for its body, as a full queue's refusals are counted (`outcome="rejected"`).
    pub fn count_refused(&self) {
        self.requests
            .get_or_create(&OutcomeLabel {
                outcome: "rejected",
            })
            .inc();
    }

    /// Text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_worker_metric_the_charts_alerts_name_is_exported() {
        use crate::common::control_auth::RefusalLabels;
        use tandem_worker::preprocess::metrics::{Metrics as Preprocess, RequestLabels};
        let rules = include_str!("../../../helm/tandem/templates/prometheusrule.yaml");
        let names: std::collections::BTreeSet<String> = rules
            .match_indices("tandem_")
            .map(|(i, _)| {
                rules[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                    .collect::<String>()
            })
            .filter(|n| !n.starts_with("tandem_operator_"))
            .collect();
        assert!(names.len() >= 4, "{names:?}");
        // Both roles' registries as their /metrics ports serve them once each labeled family
        // has a series (an unused family is not listed at all).
        let mut registry = Registry::default();
        let pre = Preprocess::register(&mut registry);
        pre.requests
            .get_or_create(&RequestLabels {
                protocol: "grpc",
                code: "RESOURCE_EXHAUSTED",
            })
            .inc();
        control_auth::register(&mut registry)
            .get_or_create(&RefusalLabels { reason: "wrong" })
            .inc();
        let mut text = crate::common::metrics::render(&registry).unwrap_or_default();
        let inf = Metrics::new();
        inf.count_refused();
        text.push_str(&inf.encode());
        for name in names {
            // OpenMetrics names a counter's family without `_total`.
            let family = name.strip_suffix("_total").unwrap_or(&name);
            assert!(
                text.contains(&format!("# TYPE {family} ")),
                "the chart's alerts use {name}, which no worker exports:\n{text}"
            );
        }
    }
}
