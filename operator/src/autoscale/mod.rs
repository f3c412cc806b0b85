//! The autoscaler: every `interval` (about a second) it polls `WorkerControl.GetStats` of every
//! ready worker pod concurrently, folds the answers into per-stage demand ([`load`]), decides
//! each stage's desired replicas ([`decision`]) and writes them to the pipeline's status —
//! only its own fields, with a JSON merge patch — from where the reconciler sizes the
//! Deployments. The reconciler stays the one writer of `replicas`; a status change re-queues
//! the pipeline through the controller's watch. Every change is also an Event and a metric.
//!
//! The same answers carry the preprocess pods' model checks: when they find that the active
//! model cannot take what they send, the autoscaler writes it to `status.preprocess.modelMismatch`,
//! from where the reconciler marks the pipeline Degraded.
//!
//! Runs on the leader only, beside the reconciler, reading the controller's pipeline and pod
//! caches (one copy per watched namespace keeps the operator's memory flat). The inference stage is sized on the load of *all* its pods (both colors
//! during a rollout); the rollout logic splits that total between the colors.

pub mod decision;
pub mod load;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cache::Cache;
use futures::future::join_all;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::{Map, Value, json};
use tandem_proto::tandem::v1::worker_control_client::WorkerControlClient;
use tandem_proto::tandem::v1::{GetStatsRequest, ModelMismatch, WorkerStats};
use tonic::transport::Channel;
use tracing::{debug, info, warn};

use crate::build::Stage;
use crate::control_auth::{self, Tokens};
use crate::crd::{InferencePipeline, StageStatus};
use crate::events::Publisher;
use crate::metrics::{AutoscaleStage, Metrics, ScaleChange};
use crate::routing::{WorkerPod, namespaced_name, workers_by_pipeline};
use crate::summary::PodSummary;
use crate::validate::{Replicas, validate};

use decision::{Change, Decision, Policy, decide};
use load::{PipelineMemory, PodLoad, PodPoll, observe};

/// Field manager of the autoscaler's status writes (the reconciler uses `tandem-operator`).
pub const FIELD_MANAGER: &str = "tandem-autoscaler";

/// Autoscaler settings; the policy knobs apply to every pipeline.
#[derive(Clone, Debug)]
pub struct AutoscaleConfig {
    /// Time between polling rounds.
    pub interval: Duration,
    /// Limit for one `GetStats` call, connection included.
    pub poll_timeout: Duration,
    /// How long a pod that stops answering stands in with its last answer before its load
    /// counts as unknown (which blocks scale-down).
    pub unreachable_grace: Duration,
    /// Relative band around the current count inside which nothing changes.
    pub tolerance: f64,
    /// A lower count is applied only once every recommendation in this window agrees.
    pub scale_down_window: Duration,
    /// Idle time before an inference stage with `replicas.min: 0` goes to zero.
    pub scale_to_zero_after: Duration,
    /// Queue depths alone (no change of desired replicas) are written at most this often.
    pub status_interval: Duration,
    /// Derives the token each pipeline's pods require (see [`crate::control_auth`]); none
    /// when unset.
    pub control_key: Option<crate::control_auth::ControlKeys>,
}

impl Default for AutoscaleConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(1),
            poll_timeout: Duration::from_millis(500),
            unreachable_grace: Duration::from_secs(10),
            tolerance: 0.1,
            scale_down_window: Duration::from_secs(30),
            scale_to_zero_after: Duration::from_secs(60),
            status_interval: Duration::from_secs(5),
            control_key: None,
        }
    }
}

/// Why one write of the autoscaler failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The status merge patch was refused.
    #[error("patching status of {namespace}/{name}")]
    PatchStatus {
        /// Pipeline namespace.
        namespace: String,
        /// Pipeline name.
        name: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
}

/// A stage's last write, so a status that has not caught up yet is not mistaken for the
/// current count, and queue depths are not written every round.
#[derive(Clone, Copy, Debug, Default)]
struct Written {
    desired: Option<i32>,
    desired_at: Option<Instant>,
    queue_at: Option<Instant>,
}

/// What the autoscaler remembers about one pipeline between rounds. Kept boxed in the
/// per-pipeline map: the map's table has room for up to twice the pipelines, and 304-byte
/// entries in it cost 0.6 MB at 1,000 pipelines against 0.4 MB boxed.
#[derive(Default)]
struct PipelineState {
    memory: PipelineMemory,
    preprocess: Written,
    inference: Written,
}

/// Runs until the task is aborted, reading the pipelines and worker pods from the
/// controller's caches (one copy of each per watched namespace, shared with the router and the
/// rollout driver).
pub async fn run(
    client: Client,
    cfg: AutoscaleConfig,
    metrics: Arc<Metrics>,
    events: Publisher,
    ipl_store: Cache<InferencePipeline>,
    pod_store: Cache<PodSummary>,
) {
    info!(
        interval_ms = cfg.interval.as_millis() as u64,
        "autoscaler started"
    );
    let mut state: HashMap<(String, String), Box<PipelineState>> = HashMap::new();
    let mut channels: HashMap<String, WorkerControlClient<Channel>> = HashMap::new();
    let mut ticker = tokio::time::interval(cfg.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let started = Instant::now();
        tick(
            &client,
            &cfg,
            Sinks {
                metrics: &metrics,
                events: &events,
            },
            &ipl_store,
            &pod_store,
            &mut state,
            &mut channels,
        )
        .await;
        metrics.observe_autoscale_round(started.elapsed());
    }
}

/// One polling round over every pipeline.
/// Where a round's decisions are reported besides status: metrics and Events.
#[derive(Clone, Copy)]
struct Sinks<'a> {
    metrics: &'a Metrics,
    events: &'a Publisher,
}

async fn tick(
    client: &Client,
    cfg: &AutoscaleConfig,
    Sinks { metrics, events }: Sinks<'_>,
    pipelines: &Cache<InferencePipeline>,
    pods: &Cache<PodSummary>,
    state: &mut HashMap<(String, String), Box<PipelineState>>,
    channels: &mut HashMap<String, WorkerControlClient<Channel>>,
) {
    let pipelines = pipelines.state();
    let all_pods = pods.state();
    let mut by_pipeline = workers_by_pipeline(all_pods.iter().map(AsRef::as_ref));

    // Every ready pod of every pipeline is polled at once.
    let mut targets: Vec<((String, String), WorkerPod)> = Vec::new();
    // Each polled pipeline's control token, computed once per round.
    let mut tokens: HashMap<(String, String), Arc<Tokens>> = HashMap::new();
    for p in &pipelines {
        let Some(key) = namespaced_name(&p.metadata) else {
            continue;
        };
        let group = by_pipeline.remove(&key);
        if let (Some(k), Some(_)) = (&cfg.control_key, &group) {
            let uid = p.metadata.uid.as_deref().unwrap_or_default();
            tokens.insert(
                (key.0.to_owned(), key.1.to_owned()),
                Arc::new(k.tokens(key.0, key.1, uid)),
            );
        }
        for w in group.into_iter().flatten() {
            // Ready pods, and preprocess pods draining after a scale-down: what they still
            // hold waits for inference (see `PodPoll::draining`).
            let polled = if w.terminating {
                w.stage == Stage::Preprocess
            } else {
                w.ready
            };
            if polled && w.ip.is_some() {
                let (ns, name) = key;
                targets.push((
                    (ns.to_owned(), name.to_owned()),
                    WorkerPod {
                        // Pod names are unique per namespace: qualify them for the shared
                        // maps below.
                        name: format!("{ns}/{name}/{}", w.name),
                        ..w
                    },
                ));
            }
        }
    }
    let live: HashSet<String> = targets
        .iter()
        .filter_map(|(_, w)| w.control_address())
        .collect();
    channels.retain(|addr, _| live.contains(addr));
    let calls = targets.iter().map(|(key, w)| {
        let client = w
            .control_address()
            .and_then(|a| channel(channels, &a, cfg.poll_timeout));
        poll(client, tokens.get(key).cloned(), cfg.poll_timeout)
    });
    let answers = join_all(calls).await;
    let mut polls: HashMap<(String, String), Vec<PodPoll>> = HashMap::new();
    // Only pods that report a mismatch add an entry (rarely any): no per-round work per pipeline.
    let mut mismatches: HashMap<(String, String), Vec<ModelMismatch>> = HashMap::new();
    for ((key, w), answer) in targets.into_iter().zip(answers) {
        // A draining pod stops answering when it exits: expected, not a failure.
        if answer.is_none() && !w.terminating {
            metrics.count_autoscale_poll_failure(metric_stage(w.stage));
            debug!(pod = %w.name, "GetStats failed");
        }
        let load = answer.map(|(load, found)| {
            if w.stage == Stage::Preprocess && !w.terminating && !found.is_empty() {
                mismatches.entry(key.clone()).or_default().extend(found);
            }
            load
        });
        polls.entry(key).or_default().push(PodPoll {
            name: w.name,
            stage: w.stage,
            draining: w.terminating,
            load,
        });
    }

    let now = Instant::now();
    let mut seen = HashSet::new();
    for p in &pipelines {
        let (Some(ns), name) = (p.namespace(), p.name_any()) else {
            continue;
        };
        if !reconciled(p) {
            continue;
        }
        // Invalid specs are the reconciler's to report; nothing to scale.
        let Ok(v) = validate(p) else { continue };
        let status = p.status.as_ref();
        let key = (ns.clone(), name.clone());
        seen.insert(key.clone());
        let st = state.entry(key.clone()).or_default();
        let round = polls.remove(&key).unwrap_or_default();
        let active = status
            .and_then(|s| s.active_color)
            .unwrap_or(crate::crd::Color::Blue);
        let checks = ModelChecks {
            answered: round
                .iter()
                .any(|p| p.stage == Stage::Preprocess && !p.draining && p.load.is_some()),
            mismatches: mismatches.remove(&key).unwrap_or_default(),
        };
        let found = checks.verdict(active.as_str());
        let observed = observe(&round, &mut st.memory, now, cfg.unreachable_grace);

        let policy = |r: Replicas, target: u32| Policy {
            min: r.min,
            max: r.max,
            target_queue_depth: target,
            tolerance: cfg.tolerance,
            scale_down_window: cfg.scale_down_window,
            scale_to_zero_after: cfg.scale_to_zero_after,
        };
        let pre_policy = policy(v.preprocess.replicas, v.preprocess.target_queue_depth);
        let inf_policy = policy(v.inference.replicas, v.inference.target_queue_depth);
        let pre_current = current(
            status.and_then(|s| s.preprocess.as_ref()),
            v.preprocess.replicas,
            &st.preprocess,
        );
        let inf_current = current(
            status.and_then(|s| s.inference.as_ref()),
            v.inference.replicas,
            &st.inference,
        );
        let pre = decide(
            &observed.preprocess,
            pre_current,
            &pre_policy,
            &mut st.memory.preprocess,
            now,
        );
        let inf = decide(
            &observed.inference,
            inf_current,
            &inf_policy,
            &mut st.memory.inference,
            now,
        );
        metrics.count_autoscale_decision(AutoscaleStage::Preprocess, metric_change(pre.change));
        metrics.count_autoscale_decision(AutoscaleStage::Inference, metric_change(inf.change));
        debug!(
            pipeline = %format!("{ns}/{name}"),
            preprocess_queue = observed.preprocess_queue,
            inference_queue = observed.inference_queue,
            inference_demand = observed.inference.queued,
            arrival_rps = observed.arrival_rps,
            preprocess = pre.desired,
            inference = inf.desired,
            "autoscaler round"
        );

        let stamp = Timestamp::now();
        let mut patch = Map::new();
        for (stage, decision, queue, written, demand) in [
            (
                Stage::Preprocess,
                &pre,
                observed.preprocess_queue,
                &mut st.preprocess,
                &observed.preprocess,
            ),
            (
                Stage::Inference,
                &inf,
                observed.inference_queue,
                &mut st.inference,
                &observed.inference,
            ),
        ] {
            let stage_status = status.and_then(|s| match stage {
                Stage::Preprocess => s.preprocess.as_ref(),
                Stage::Inference => s.inference.as_ref(),
            });
            if let Some(fields) =
                stage_patch(stage_status, decision, queue, written, now, cfg, &stamp)
            {
                patch.insert(stage.as_str().to_owned(), Value::Object(fields));
            }
            if decision.change != Change::Steady {
                log_scaling(&ns, &name, stage, decision, queue, demand.held);
            }
        }
        let pre_status = status.and_then(|s| s.preprocess.as_ref());
        let mismatch = found.and_then(|f| mismatch_patch(pre_status, f));
        if let Some(value) = &mismatch {
            let fields = patch
                .entry(Stage::Preprocess.as_str())
                .or_insert_with(|| Value::Object(Map::new()));
            if let Value::Object(fields) = fields {
                fields.insert("modelMismatch".into(), value.clone());
            }
        }
        if patch.is_empty() {
            continue;
        }
        let body = json!({ "status": Value::Object(patch) });
        if let Err(e) = patch_status(client, &ns, &name, &body).await {
            warn!(error = %e, source = ?std::error::Error::source(&e).map(ToString::to_string), "autoscaler status write failed; retried next round");
            // Forget what was written so the next round tries again.
            st.preprocess = Written::default();
            st.inference = Written::default();
            continue;
        }
        for (stage, decision) in [(Stage::Preprocess, &pre), (Stage::Inference, &inf)] {
            if let Some(reason) = decision.change.reason() {
                publish(events, p, stage, reason, decision, &stamp);
            }
        }
        if let Some(Value::String(why)) = &mismatch {
            warn!(pipeline = %format!("{ns}/{name}"), color = active.as_str(), why = %why, "the active model does not take what preprocess sends");
            let note = crate::events::Note {
                action: "CheckModel",
                reason: "ModelMismatch",
                note: format!(
                    "the {} model does not take what preprocess sends: {why}",
                    active.as_str()
                ),
                warning: true,
                discriminator: active.as_str(),
            };
            events.publish(p.as_ref().into(), note, stamp);
        }
    }
    state.retain(|k, _| seen.contains(k));
}

/// The `scaling` log line of one stage's change. The explanation goes in `why`: logs are JSON
/// with the event's fields flattened beside its `message`, so a field named `message` gave the
/// line two `"message"` keys, and JSON parsers keep only the last.
fn log_scaling(ns: &str, name: &str, stage: Stage, decision: &Decision, queue: u64, held: u64) {
    info!(
        pipeline = %format!("{ns}/{name}"),
        stage = stage.as_str(),
        desired = decision.desired,
        queue,
        held,
        reason = decision.change.reason().unwrap_or_default(),
        why = %decision.message,
        "scaling"
    );
}

/// What a round's preprocess answers of one pipeline said about the models they route to.
#[derive(Debug)]
struct ModelChecks {
    /// At least one preprocess pod answered.
    answered: bool,
    /// Every mismatch any of them reported (usually none).
    mismatches: Vec<ModelMismatch>,
}

impl ModelChecks {
    /// What is known of the `color` model's fit: `None` when no preprocess pod answered,
    /// `Some(None)` when none that answered found a mismatch (fits, or not checked yet),
    /// `Some(Some(why))` when one did.
    fn verdict(self, color: &str) -> Option<Option<String>> {
        self.answered.then(|| {
            self.mismatches
                .into_iter()
                .find(|m| m.color == color)
                .map(|m| m.message)
        })
    }
}

/// The `modelMismatch` value to write (a string, or JSON null to clear it), if status does not
/// already say the same.
fn mismatch_patch(status: Option<&StageStatus>, found: Option<String>) -> Option<Value> {
    let shown = status.and_then(|s| s.model_mismatch.as_deref());
    if shown == found.as_deref() {
        return None;
    }
    Some(found.map_or(Value::Null, Value::String))
}

/// Whether the reconciler has written this pipeline's status at least once. Until then it has
/// no workers to scale, and that first write sets each stage's desired count (its minimum). In
/// a burst of new pipelines, writing the counts here as well added one status write per
/// pipeline, ~1,000 API writes at the start of a 1,000-pipeline burst, each ahead of a
/// reconcile in the API server's queue (docs/benchmarks.md).
fn reconciled(p: &InferencePipeline) -> bool {
    p.status
        .as_ref()
        .is_some_and(|s| s.observed_generation.is_some())
}

/// The count desired so far: this autoscaler's own last decision once it has one (the watch
/// may not have delivered its write yet, and status can be rewritten by others), status's on
/// first sight (a new pipeline, or a new leader).
fn current(status: Option<&StageStatus>, replicas: Replicas, written: &Written) -> i32 {
    written
        .desired
        .unwrap_or_else(|| replicas.clamp(status.and_then(|s| s.desired_replicas)))
}

/// The status fields to write for one stage, if any: the desired count whenever it changes or
/// status no longer shows it (re-asserted at most every other round), the queue depth at most
/// every `status_interval` when it changed.
fn stage_patch(
    status: Option<&StageStatus>,
    decision: &Decision,
    queue: u64,
    written: &mut Written,
    now: Instant,
    cfg: &AutoscaleConfig,
    stamp: &Timestamp,
) -> Option<Map<String, Value>> {
    let queue_i64 = i64::try_from(queue).unwrap_or(i64::MAX);
    let status_desired = status.and_then(|s| s.desired_replicas);
    let status_queue = status.map(|s| s.queue_depth);
    let mut fields = Map::new();
    let stale = status_desired != Some(decision.desired)
        && written
            .desired_at
            .is_none_or(|at| now.saturating_duration_since(at) >= cfg.interval * 2);
    if decision.change != Change::Steady || stale {
        fields.insert("desiredReplicas".into(), json!(decision.desired));
        written.desired_at = Some(now);
    }
    written.desired = Some(decision.desired);
    if let Some(reason) = decision.change.reason() {
        fields.insert("lastScaleTime".into(), json!(Time(*stamp)));
        fields.insert("lastScaleReason".into(), json!(reason));
        fields.insert("lastScaleMessage".into(), json!(decision.message));
    }
    let queue_due = written
        .queue_at
        .is_none_or(|at| now.saturating_duration_since(at) >= cfg.status_interval);
    if status_queue != Some(queue_i64) && (!fields.is_empty() || queue_due) {
        fields.insert("queueDepth".into(), json!(queue_i64));
        written.queue_at = Some(now);
    }
    (!fields.is_empty()).then_some(fields)
}

async fn patch_status(client: &Client, ns: &str, name: &str, body: &Value) -> Result<(), Error> {
    let api: Api<InferencePipeline> = Api::namespaced(client.clone(), ns);
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.to_owned()),
        ..PatchParams::default()
    };
    api.patch_status(name, &params, &Patch::Merge(body))
        .await
        .map(|_| ())
        .map_err(|source| Error::PatchStatus {
            namespace: ns.to_owned(),
            name: name.to_owned(),
            source,
        })
}

/// Queues one Event per scale decision (see [`crate::events`] for why not the `Recorder`).
fn publish(
    events: &Publisher,
    p: &InferencePipeline,
    stage: Stage,
    reason: &'static str,
    decision: &Decision,
    stamp: &Timestamp,
) {
    let note = crate::events::Note {
        action: "Scale",
        reason,
        note: format!("{}: {}", stage.as_str(), decision.message),
        warning: false,
        discriminator: stage.as_str(),
    };
    events.publish(p.into(), note, *stamp);
}

fn channel(
    channels: &mut HashMap<String, WorkerControlClient<Channel>>,
    address: &str,
    timeout: Duration,
) -> Option<WorkerControlClient<Channel>> {
    if let Some(c) = channels.get(address) {
        return Some(c.clone());
    }
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
        .ok()?
        .connect_timeout(timeout)
        .timeout(timeout);
    let client = WorkerControlClient::new(endpoint.connect_lazy());
    channels.insert(address.to_owned(), client.clone());
    Some(client)
}

/// One `GetStats` call: the pod's load and the model mismatches it reports; `None` when the
/// pod does not answer within `timeout` (connection included) or answers with an error.
async fn poll(
    client: Option<WorkerControlClient<Channel>>,
    tokens: Option<Arc<Tokens>>,
    timeout: Duration,
) -> Option<(PodLoad, Vec<ModelMismatch>)> {
    let client = client?;
    // A pod not yet replaced after a key rotation takes the previous token.
    let call = control_auth::call(tokens.as_deref(), |token| {
        let mut client = client.clone();
        let request = control_auth::request(GetStatsRequest {}, token);
        async move { client.get_stats(request).await }
    });
    let reply = tokio::time::timeout(timeout, call)
        .await
        .ok()?
        .ok()?
        .into_inner();
    Some((pod_load(&reply), reply.model_mismatches))
}

/// The figures the autoscaler reads from a stats answer.
fn pod_load(stats: &WorkerStats) -> PodLoad {
    PodLoad {
        queue_depth: stats.queue_depth,
        in_flight: stats.in_flight,
        held: stats.held_requests,
        forwarded: stats
            .colors
            .iter()
            .fold(0u64, |sum, c| sum.saturating_add(c.in_flight)),
        requests_total: stats.requests_total,
        throughput_rps: stats.throughput_rps,
        completed_in_window: stats.latency.map_or(0, |l| l.count),
    }
}

fn metric_stage(stage: Stage) -> AutoscaleStage {
    match stage {
        Stage::Preprocess => AutoscaleStage::Preprocess,
        Stage::Inference => AutoscaleStage::Inference,
    }
}

fn metric_change(change: Change) -> ScaleChange {
    match change {
        Change::Steady => ScaleChange::Steady,
        Change::Up => ScaleChange::Up,
        Change::Down => ScaleChange::Down,
        Change::ToZero => ScaleChange::ToZero,
        Change::FromZero => ScaleChange::FromZero,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decision(desired: i32, change: Change) -> Decision {
        Decision {
            desired,
            change,
            message: "m".into(),
        }
    }

    fn cfg() -> AutoscaleConfig {
        AutoscaleConfig::default()
    }

    #[test]
    fn forwarded_requests_are_the_sum_over_colors_in_flight() {
        use tandem_proto::tandem::v1::ColorStats;
        let stats = WorkerStats {
            queue_depth: 3,
            in_flight: 20,
            held_requests: 1,
            requests_total: 99,
            throughput_rps: 4.5,
            colors: vec![
                ColorStats {
                    color: "blue".into(),
                    in_flight: 9,
                    ..ColorStats::default()
                },
                ColorStats {
                    color: "green".into(),
                    in_flight: 2,
                    ..ColorStats::default()
                },
            ],
            ..WorkerStats::default()
        };
        let l = pod_load(&stats);
        assert_eq!((l.queue_depth, l.in_flight, l.held), (3, 20, 1));
        assert_eq!(l.forwarded, 11);
        assert_eq!((l.requests_total, l.throughput_rps), (99, 4.5));
    }

    #[tokio::test]
    async fn a_pod_that_refuses_connections_reads_as_no_answer_within_the_timeout() {
        // Bind then drop a listener: the port is (almost certainly) closed afterwards.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "127.0.0.1:9".to_owned());
        let mut channels = HashMap::new();
        let timeout = Duration::from_millis(300);
        let client = channel(&mut channels, &addr, timeout);
        let started = Instant::now();
        assert_eq!(poll(client, None, timeout).await, None);
        assert!(started.elapsed() < Duration::from_secs(2));
        assert_eq!(
            poll(None, None, timeout).await,
            None,
            "no address, no answer"
        );
    }

    #[test]
    fn the_active_colors_mismatch_is_written_once_and_cleared_when_the_pods_find_none() {
        let mismatch = |color: &str| ModelMismatch {
            color: color.into(),
            model_name: "effnet".into(),
            model_version: "1".into(),
            message: "input \"input\": sent as [N, 3, 320, 320], the model takes [-1, 3, 224, 224]"
                .into(),
        };
        let checks = |answered, ms: Vec<ModelMismatch>| ModelChecks {
            answered,
            mismatches: ms,
        };
        let why = mismatch("blue").message;

        // Only the active color's mismatch counts; no answer means nothing is known.
        assert_eq!(
            checks(true, vec![mismatch("green"), mismatch("blue")]).verdict("blue"),
            Some(Some(why.clone()))
        );
        assert_eq!(
            checks(true, vec![mismatch("green")]).verdict("blue"),
            Some(None)
        );
        assert_eq!(checks(false, vec![]).verdict("blue"), None);

        // Written when status does not show it yet, not again, and cleared with null.
        let none = StageStatus::default();
        assert_eq!(
            mismatch_patch(Some(&none), Some(why.clone())),
            Some(json!(why))
        );
        let shown = StageStatus {
            model_mismatch: Some(why.clone()),
            ..StageStatus::default()
        };
        assert_eq!(mismatch_patch(Some(&shown), Some(why.clone())), None);
        assert_eq!(mismatch_patch(Some(&shown), None), Some(Value::Null));
        assert_eq!(mismatch_patch(Some(&none), None), None);
    }

    #[test]
    fn a_pipeline_is_scaled_only_once_the_reconciler_has_written_its_status() {
        let mut p = crate::test_fixtures::text_pipeline();
        p.status = None;
        assert!(!reconciled(&p), "no status yet");

        // Status written by someone else (e.g. `kubectl tandem`) without a generation.
        p.status = Some(crate::crd::InferencePipelineStatus::default());
        assert!(!reconciled(&p), "status without observedGeneration");

        p.status = Some(crate::crd::InferencePipelineStatus {
            observed_generation: Some(1),
            ..Default::default()
        });
        assert!(reconciled(&p));
    }

    #[test]
    fn a_scale_decision_writes_desired_reason_time_and_queue() {
        let mut w = Written::default();
        let st = StageStatus {
            desired_replicas: Some(1),
            ..StageStatus::default()
        };
        let f = stage_patch(
            Some(&st),
            &decision(3, Change::Up),
            48,
            &mut w,
            Instant::now(),
            &cfg(),
            &Timestamp::now(),
        )
        .unwrap_or_default();
        assert_eq!(f["desiredReplicas"], json!(3));
        assert_eq!(f["lastScaleReason"], json!("ScaledUp"));
        assert_eq!(f["queueDepth"], json!(48));
        assert!(f.contains_key("lastScaleTime"));
        assert_eq!(w.desired, Some(3));
    }

    #[test]
    fn a_steady_stage_writes_queue_depth_only_every_status_interval() {
        let mut w = Written::default();
        let st = StageStatus {
            desired_replicas: Some(2),
            queue_depth: 5,
            ..StageStatus::default()
        };
        let t0 = Instant::now();
        let stamp = Timestamp::now();
        let steady = decision(2, Change::Steady);
        let first = stage_patch(Some(&st), &steady, 7, &mut w, t0, &cfg(), &stamp);
        assert_eq!(first.map(|f| f["queueDepth"].clone()), Some(json!(7)));
        let soon = stage_patch(
            Some(&st),
            &steady,
            9,
            &mut w,
            t0 + Duration::from_secs(1),
            &cfg(),
            &stamp,
        );
        assert!(soon.is_none(), "{soon:?}");
        let later = stage_patch(
            Some(&st),
            &steady,
            9,
            &mut w,
            t0 + Duration::from_secs(5),
            &cfg(),
            &stamp,
        );
        assert_eq!(later.map(|f| f["queueDepth"].clone()), Some(json!(9)));
        let unchanged = StageStatus {
            queue_depth: 9,
            ..st
        };
        let same = stage_patch(
            Some(&unchanged),
            &steady,
            9,
            &mut w,
            t0 + Duration::from_secs(20),
            &cfg(),
            &stamp,
        );
        assert!(same.is_none(), "nothing changed: {same:?}");
    }

    #[test]
    fn the_autoscalers_own_last_decision_is_the_current_count_once_it_has_one() {
        let r = Replicas { min: 1, max: 8 };
        let st = StageStatus {
            desired_replicas: Some(2),
            ..StageStatus::default()
        };
        let w = Written {
            desired: Some(4),
            ..Written::default()
        };
        assert_eq!(current(Some(&st), r, &w), 4);
        assert_eq!(current(Some(&st), r, &Written::default()), 2, "first sight");
        assert_eq!(current(None, r, &Written::default()), 1, "nothing yet: min");
    }

    #[test]
    fn the_scaling_log_line_has_one_message_key_and_the_explanation_under_why() {
        let d = Decision {
            desired: 3,
            change: Change::Up,
            message: "queue 48 > 16 per pod: 1 → 3".into(),
        };
        let lines = crate::test_fixtures::json_log_lines(|| {
            log_scaling("ml", "minilm", Stage::Preprocess, &d, 48, 0);
        });
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert_eq!(lines[0].matches("\"message\":").count(), 1, "{}", lines[0]);
        let v: Value = serde_json::from_str(&lines[0]).expect("a JSON line");
        assert_eq!(v["message"], "scaling");
        assert_eq!(v["why"], "queue 48 > 16 per pod: 1 → 3");
        assert_eq!(v["pipeline"], "ml/minilm");
    }

    #[test]
    fn a_desired_count_that_status_lost_is_written_again_without_a_new_reason() {
        let t0 = Instant::now();
        let stamp = Timestamp::now();
        let mut w = Written::default();
        let rewritten = StageStatus {
            desired_replicas: Some(2),
            ..StageStatus::default()
        };
        let steady = decision(4, Change::Steady);
        let f = stage_patch(Some(&rewritten), &steady, 0, &mut w, t0, &cfg(), &stamp)
            .unwrap_or_default();
        assert_eq!(f.get("desiredReplicas"), Some(&json!(4)));
        assert!(!f.contains_key("lastScaleReason"));
        let again = stage_patch(
            Some(&rewritten),
            &steady,
            0,
            &mut w,
            t0 + Duration::from_secs(1),
            &cfg(),
            &stamp,
        );
        assert!(
            again.is_none_or(|f| !f.contains_key("desiredReplicas")),
            "not every round: the watch may simply be late"
        );
    }
}
