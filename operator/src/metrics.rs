//! The operator's Prometheus metrics and its HTTP endpoints (`/metrics`, `/healthz`, `/readyz`).
//!
//! One registry; names are constants; labels are low-cardinality enums (outcome, error kind),
//! never error strings. The rollout gauges are the one per-pipeline family (one series per
//! pipeline and color), like kube-state-metrics' object gauges: they are read from the
//! controller's pipeline cache at each scrape, so nothing is kept per pipeline between scrapes
//! and a deleted pipeline's series disappear with it.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::cache::Cache;
use crate::crd::{Color, InferencePipeline};

/// `tandem_operator_reconcile_total{outcome}`.
pub const RECONCILE_TOTAL: &str = "tandem_operator_reconcile";
/// `tandem_operator_reconcile_duration_seconds`.
pub const RECONCILE_DURATION: &str = "tandem_operator_reconcile_duration_seconds";
/// `tandem_operator_reconcile_errors_total{kind}`.
pub const RECONCILE_ERRORS: &str = "tandem_operator_reconcile_errors";
/// `tandem_operator_leader` (1 while this replica leads).
pub const LEADER: &str = "tandem_operator_leader";
/// `tandem_operator_autoscale_decisions_total{stage,change}`.
pub const AUTOSCALE_DECISIONS: &str = "tandem_operator_autoscale_decisions";
/// `tandem_operator_autoscale_poll_failures_total{stage}`.
pub const AUTOSCALE_POLL_FAILURES: &str = "tandem_operator_autoscale_poll_failures";
/// `tandem_operator_autoscale_round_duration_seconds`.
pub const AUTOSCALE_ROUND_DURATION: &str = "tandem_operator_autoscale_round_duration_seconds";

/// `tandem_operator_rollout_phase{namespace,pipeline,phase}` (1 for the current phase).
pub const ROLLOUT_PHASE: &str = "tandem_operator_rollout_phase";
/// `tandem_operator_traffic_percent{namespace,pipeline,color}`.
pub const TRAFFIC_PERCENT: &str = "tandem_operator_traffic_percent";
/// `tandem_operator_rollout_transitions_total{reason}`.
pub const ROLLOUT_TRANSITIONS: &str = "tandem_operator_rollout_transitions";
/// `tandem_operator_events_unpublished_total{why}`.
pub const EVENTS_UNPUBLISHED: &str = "tandem_operator_events_unpublished";

/// The per-pipeline rollout gauges, encoded at scrape time from the pipeline cache the
/// controller hands over once it runs (a follower replica, which caches nothing, exports none).
#[derive(Clone, Default)]
struct RolloutSeries(Arc<OnceLock<Cache<InferencePipeline>>>);

impl std::fmt::Debug for RolloutSeries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RolloutSeries")
            .field("watching", &self.0.get().is_some())
            .finish()
    }
}

impl Collector for RolloutSeries {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let pipelines = self.0.get().map(Cache::state).unwrap_or_default();
        // Pipelines the controller has written a first status for: before that no color serves.
        let serving = || {
            pipelines.iter().filter_map(|p| {
                let status = p.status.as_ref().filter(|s| s.active_model.is_some())?;
                let (ns, name) = crate::routing::namespaced_name(&p.metadata)?;
                Some((ns, name, status))
            })
        };
        let mut family = encoder.encode_descriptor(
            ROLLOUT_PHASE,
            "1 for the phase each pipeline's latest rollout is in",
            None,
            MetricType::Gauge,
        )?;
        for (ns, name, status) in serving() {
            if let Some(phase) = status.rollout.as_ref().and_then(|r| r.phase) {
                let labels = [
                    ("namespace", ns),
                    ("pipeline", name),
                    ("phase", phase.as_str()),
                ];
                ConstGauge::new(1_i64).encode(family.encode_family(&labels)?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            TRAFFIC_PERCENT,
            "Share of live traffic per pipeline and inference color",
            None,
            MetricType::Gauge,
        )?;
        for (ns, name, status) in serving() {
            let active = status.active_color.unwrap_or(Color::Blue);
            for (color, pct) in crate::rollout::traffic_weights(active, status.rollout.as_deref()) {
                let labels = [("namespace", ns), ("pipeline", name), ("color", color)];
                ConstGauge::new(pct).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

/// Why an Event was not created.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum Unpublished {
    /// The publisher's queue was full; the Event was dropped.
    QueueFull,
    /// The API server refused it or did not answer in time.
    Failed,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UnpublishedLabels {
    why: Unpublished,
}

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
    /// Reading an existing object before claiming its name.
    Read,
    /// An object of a pipeline's names exists and belongs to something else.
    NameInUse,
    /// Server-side apply.
    Apply,
    /// Deleting retired objects.
    Prune,
    /// Writing status.
    Status,
    /// Writing status, refused because the installed CRD is older than the operator.
    CrdOutdated,
    /// A reconcile ran past its time limit.
    Timeout,
}

/// Pipeline stage, as an autoscaler label.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum AutoscaleStage {
    /// The CPU front stage.
    Preprocess,
    /// The model stage.
    Inference,
}

/// Direction of one autoscaler decision.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum ScaleChange {
    /// Desired replicas unchanged.
    Steady,
    /// More pods.
    Up,
    /// Fewer pods, at least one.
    Down,
    /// To zero pods.
    ToZero,
    /// From zero pods.
    FromZero,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    stage: AutoscaleStage,
    change: ScaleChange,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageLabels {
    stage: AutoscaleStage,
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
    decisions: Family<DecisionLabels, Counter>,
    poll_failures: Family<StageLabels, Counter>,
    round: Histogram,
    rollouts: RolloutSeries,
    transitions: Family<ReasonLabels, Counter>,
    unpublished: Family<UnpublishedLabels, Counter>,
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
        let decisions = Family::<DecisionLabels, Counter>::default();
        let poll_failures = Family::<StageLabels, Counter>::default();
        let round = Histogram::new([0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]);
        registry.register(
            AUTOSCALE_DECISIONS,
            "Autoscaler decisions by stage and direction (steady included)",
            decisions.clone(),
        );
        registry.register(
            AUTOSCALE_POLL_FAILURES,
            "GetStats polls of ready worker pods that failed or timed out",
            poll_failures.clone(),
        );
        registry.register(
            AUTOSCALE_ROUND_DURATION,
            "Time for one autoscaler round (poll, decide, write)",
            round.clone(),
        );
        let rollouts = RolloutSeries::default();
        let transitions = Family::<ReasonLabels, Counter>::default();
        registry.register_collector(Box::new(rollouts.clone()));
        registry.register(
            ROLLOUT_TRANSITIONS,
            "Rollout transitions by reason (the Event reason)",
            transitions.clone(),
        );
        let unpublished = Family::<UnpublishedLabels, Counter>::default();
        registry.register(
            EVENTS_UNPUBLISHED,
            "Events not created, by why (QueueFull: dropped; Failed: refused or unanswered)",
            unpublished.clone(),
        );
        Self {
            registry,
            reconciles,
            errors,
            duration,
            leader,
            decisions,
            poll_failures,
            round,
            rollouts,
            transitions,
            unpublished,
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

    /// Counts one autoscaler decision for a stage.
    pub fn count_autoscale_decision(&self, stage: AutoscaleStage, change: ScaleChange) {
        self.decisions
            .get_or_create(&DecisionLabels { stage, change })
            .inc();
    }

    /// Counts an Event that was not created.
    pub fn count_unpublished_event(&self, why: Unpublished) {
        self.unpublished
            .get_or_create(&UnpublishedLabels { why })
            .inc();
    }

    /// Counts a failed `GetStats` poll.
    pub fn count_autoscale_poll_failure(&self, stage: AutoscaleStage) {
        self.poll_failures
            .get_or_create(&StageLabels { stage })
            .inc();
    }

    /// Records how long one autoscaler round took.
    pub fn observe_autoscale_round(&self, took: Duration) {
        self.round.observe(took.as_secs_f64());
    }

    /// Exports every cached pipeline's rollout phase and traffic split from now on (the
    /// controller calls this once it caches pipelines; later calls are ignored).
    pub fn watch_pipelines(&self, pipelines: Cache<InferencePipeline>) {
        // Already set: the first store stays, and serves the same pipelines.
        let _ = self.rollouts.0.set(pipelines);
    }

    /// Counts one rollout transition.
    pub fn count_rollout_transition(&self, reason: &str) {
        self.transitions
            .get_or_create(&ReasonLabels {
                reason: reason.to_owned(),
            })
            .inc();
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

    /// A cached pipeline serving `active` with a rollout in `phase` at `traffic` percent.
    fn rolled(
        active: Color,
        phase: crate::crd::RolloutPhase,
        traffic: i32,
    ) -> crate::crd::InferencePipeline {
        let mut p = crate::test_fixtures::text_pipeline();
        p.status = Some(crate::crd::InferencePipelineStatus {
            active_color: Some(active),
            active_model: Some(crate::crd::ModelRef::from(&p.spec.inference.model)),
            rollout: Some(Box::new(crate::crd::RolloutStatus {
                phase: Some(phase),
                candidate_color: Some(active.other()),
                traffic_percent: traffic,
                ..Default::default()
            })),
            ..Default::default()
        });
        p
    }

    /// The metric names in `text` that start with `prefix` (the chart's alert rules).
    fn metric_names(text: &str, prefix: &str) -> std::collections::BTreeSet<String> {
        text.match_indices(prefix)
            .map(|(i, _)| {
                text[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                    .collect()
            })
            .collect()
    }

    #[test]
    fn every_operator_metric_the_charts_alerts_name_is_exported() {
        use kube::runtime::watcher::Event;
        let rules = include_str!("../../helm/tandem/templates/prometheusrule.yaml");
        let names = metric_names(rules, "tandem_operator_");
        assert!(names.len() >= 4, "{names:?}");
        // A leader with a pipeline in a rollout and a series in each labeled family (an unused
        // family is not listed at all): what a scrape of the chart's job returns.
        let m = Metrics::new();
        m.observe_reconcile(Outcome::Error, Duration::from_millis(5));
        m.count_error(ErrorKind::Apply);
        m.count_unpublished_event(Unpublished::QueueFull);
        m.count_rollout_transition("RolloutHalted");
        let store = Cache::default();
        m.watch_pipelines(store.clone());
        store.apply(
            &Event::Apply(rolled(Color::Blue, crate::crd::RolloutPhase::RolledBack, 0)),
            Clone::clone,
        );
        let text = m.encode().unwrap();
        for name in names {
            // OpenMetrics names a counter's family without `_total`.
            let family = name.strip_suffix("_total").unwrap_or(&name);
            assert!(
                text.contains(&format!("# TYPE {family} ")),
                "the chart's alerts use {name}, which the operator does not export:\n{text}"
            );
        }
    }

    #[test]
    fn rollout_phase_and_traffic_are_read_from_the_pipeline_cache_at_each_scrape() {
        use crate::crd::RolloutPhase;
        use kube::runtime::watcher::Event;
        let m = Metrics::new();
        let text = m.encode().unwrap();
        assert!(!text.contains("pipeline=\""), "no cache yet: {text}");

        let store = Cache::default();
        m.watch_pipelines(store.clone());
        let mut unserved = crate::test_fixtures::image_pipeline();
        unserved.status = None;
        store.apply(&Event::Apply(unserved), Clone::clone);
        store.apply(
            &Event::Apply(rolled(Color::Blue, RolloutPhase::Shadowing, 0)),
            Clone::clone,
        );
        let text = m.encode().unwrap();
        assert!(
            text.contains(
                "tandem_operator_rollout_phase{namespace=\"ml\",pipeline=\"minilm\",phase=\"Shadowing\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "tandem_operator_traffic_percent{namespace=\"ml\",pipeline=\"minilm\",color=\"blue\"} 100"
            ),
            "shadowing moves no live traffic: {text}"
        );
        assert!(
            !text.contains("pipeline=\"effnet\""),
            "a pipeline with no status yet has no series: {text}"
        );

        store.apply(
            &Event::Apply(rolled(Color::Blue, RolloutPhase::ShiftingTraffic, 10)),
            Clone::clone,
        );
        m.count_rollout_transition("ShadowPassed");
        let text = m.encode().unwrap();
        assert!(
            text.contains(
                "tandem_operator_rollout_phase{namespace=\"ml\",pipeline=\"minilm\",phase=\"ShiftingTraffic\"} 1"
            ),
            "{text}"
        );
        assert!(!text.contains("phase=\"Shadowing\""), "{text}");
        for (color, pct) in [("blue", 90), ("green", 10)] {
            let series = format!(
                "tandem_operator_traffic_percent{{namespace=\"ml\",pipeline=\"minilm\",color=\"{color}\"}} {pct}"
            );
            assert!(text.contains(&series), "{series} missing: {text}");
        }
        assert!(
            text.contains("tandem_operator_rollout_transitions_total{reason=\"ShadowPassed\"} 1"),
            "{text}"
        );

        store.apply(
            &Event::Delete(rolled(Color::Blue, RolloutPhase::ShiftingTraffic, 10)),
            Clone::clone,
        );
        let text = m.encode().unwrap();
        assert!(!text.contains("pipeline=\"minilm\""), "{text}");
        assert!(
            text.contains("# TYPE tandem_operator_traffic_percent gauge"),
            "the families stay described when empty: {text}"
        );
    }

    #[test]
    fn autoscaler_decisions_are_counted_by_stage_and_direction() {
        let m = Metrics::new();
        m.count_autoscale_decision(AutoscaleStage::Inference, ScaleChange::FromZero);
        m.count_autoscale_poll_failure(AutoscaleStage::Preprocess);
        m.observe_autoscale_round(Duration::from_millis(4));
        let text = m.encode().unwrap();
        assert!(
            text.contains(
                "tandem_operator_autoscale_decisions_total{stage=\"Inference\",change=\"FromZero\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("tandem_operator_autoscale_poll_failures_total{stage=\"Preprocess\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("tandem_operator_autoscale_round_duration_seconds_count 1"),
            "{text}"
        );
    }
}
