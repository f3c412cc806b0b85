//! The operator's Prometheus metrics and its HTTP endpoints (`/metrics`, `/healthz`, `/readyz`).
//!
//! One registry; names are constants; labels are low-cardinality enums (outcome, error kind),
//! never object names or error strings.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// `tandem_operator_reconcile_total{outcome}`.
pub const RECONCILE_TOTAL: &str = "tandem_operator_reconcile";
/// `tandem_operator_reconcile_duration_seconds`.
pub const RECONCILE_DURATION: &str = "tandem_operator_reconcile_duration_seconds";
/// `tandem_operator_reconcile_errors_total{kind}`.
pub const RECONCILE_ERRORS: &str = "tandem_operator_reconcile_errors";
/// `tandem_operator_leader` (1 while this replica leads).
pub const LEADER: &str = "tandem_operator_leader";

/// Result of one reconcile.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum Outcome {
    /// Objects and status are up to date.
    Success,
    /// The spec was rejected; waiting for a change.
    InvalidSpec,
    /// A transient failure; retried with backoff.
    Error,
}

/// Step that failed.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum ErrorKind {
    /// Validation.
    InvalidSpec,
    /// Building objects.
    Build,
    /// Server-side apply.
    Apply,
    /// Deleting retired objects.
    Prune,
    /// Reading pods.
    Observe,
    /// Writing status.
    Status,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: Outcome,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    kind: ErrorKind,
}

/// All operator metrics plus the health flags the probes report.
pub struct Metrics {
    registry: Registry,
    reconciles: Family<OutcomeLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
    duration: Histogram,
    leader: Gauge<i64, AtomicI64>,
    ready: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with every metric registered.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let reconciles = Family::<OutcomeLabels, Counter>::default();
        let errors = Family::<ErrorLabels, Counter>::default();
        let duration = Histogram::new([
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
        ]);
        let leader = Gauge::<i64, AtomicI64>::default();
        registry.register(RECONCILE_TOTAL, "Reconciles by outcome", reconciles.clone());
        registry.register(
            RECONCILE_ERRORS,
            "Failed reconciles by the step that failed",
            errors.clone(),
        );
        registry.register(
            RECONCILE_DURATION,
            "Time to reconcile one pipeline",
            duration.clone(),
        );
        registry.register(
            LEADER,
            "1 while this replica holds the leader lease",
            leader.clone(),
        );
        Self {
            registry,
            reconciles,
            errors,
            duration,
            leader,
            ready: AtomicBool::new(false),
        }
    }

    /// Records one finished reconcile.
    pub fn observe_reconcile(&self, outcome: Outcome, took: Duration) {
        self.reconciles
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
        self.duration.observe(took.as_secs_f64());
    }

    /// Counts a failed reconcile by the step that failed.
    pub fn count_error(&self, kind: ErrorKind) {
        self.errors.get_or_create(&ErrorLabels { kind }).inc();
    }

    /// Records whether this replica leads.
    pub fn set_leader(&self, leading: bool) {
        self.leader.set(i64::from(leading));
    }

    /// Marks the process ready (`/readyz` answers 200).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// Text exposition of every metric.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// The HTTP router: `/metrics`, `/healthz` (the process serves requests) and `/readyz` (caches
/// synced, or standing by as a follower).
pub fn router(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(metrics)
}

async fn metrics_handler(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    match m.encode() {
        Ok(body) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

async fn readyz(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    if m.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconciles_are_counted_by_outcome_and_timed() {
        let m = Metrics::new();
        m.observe_reconcile(Outcome::Success, Duration::from_millis(3));
        m.observe_reconcile(Outcome::InvalidSpec, Duration::from_millis(1));
        m.count_error(ErrorKind::Apply);
        m.set_leader(true);
        let text = m.encode().unwrap();
        assert!(
            text.contains("tandem_operator_reconcile_total{outcome=\"Success\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("tandem_operator_reconcile_total{outcome=\"InvalidSpec\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("tandem_operator_reconcile_errors_total{kind=\"Apply\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("tandem_operator_reconcile_duration_seconds_count 2"),
            "{text}"
        );
        assert!(text.contains("tandem_operator_leader 1"), "{text}");
    }
}
