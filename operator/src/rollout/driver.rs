//! The rollout machine's I/O edge (leader only). Every tick, for each pipeline whose spec names
//! a model other than the one serving, or whose rollout is under way, it asks the candidate's
//! inference pods and the preprocess pods for `GetStats`, turns the answers into
//! [`Observations`], runs [`super::next`] and writes the result to status (server-side apply,
//! conditional on the resourceVersion read, so a stale view never overwrites a newer one).
//! Pipelines with nothing to roll out cost no RPCs.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cache::Cache;
use futures::future::join_all;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, ResourceExt};
use tandem_proto::tandem::v1::worker_control_client::WorkerControlClient;
use tandem_proto::tandem::v1::{GetStatsRequest, WorkerStats};
use tracing::{debug, info, warn};

use super::{
    ANNOTATION_ABORT, ANNOTATION_PROMOTE, ColorWindow, Inputs, Observations, ShadowCounts,
    UserAction, color_replicas, consumed_annotation, next,
};
use crate::build::Stage;
use crate::control_auth::{self, Tokens};
use crate::controller::FIELD_MANAGER;
use crate::crd::{Color, InferencePipeline, ModelRef, RolloutPhase, RolloutStatus};
use crate::events::Publisher;
use crate::metrics::Metrics;
use crate::router::Published;
use crate::routing::{WorkerPod, desired_table, namespaced_name, same_routes, workers_by_pipeline};
use crate::status::Transition;
use crate::summary::PodSummary;
use crate::validate::validate;

/// Driver settings.
#[derive(Clone, Debug)]
pub struct DriverConfig {
    /// Time between ticks.
    pub interval: Duration,
    /// Limit for one `GetStats` call, connection included.
    pub stats_timeout: Duration,
    /// Status writes that only refresh counters and messages happen at most this often.
    pub counters_every: Duration,
    /// Derives the token each pipeline's pods require (see [`crate::control_auth`]); none
    /// when unset.
    pub control_key: Option<crate::control_auth::ControlKeys>,
}

impl Default for DriverConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(1),
            stats_timeout: Duration::from_millis(800),
            counters_every: Duration::from_secs(2),
            control_key: None,
        }
    }
}

/// Per-pipeline memory between ticks. Only conveniences live here; a new leader rebuilds it.
#[derive(Default)]
struct Memory {
    /// Which step the baselines belong to.
    window: Option<(String, Option<i32>, Option<i64>)>,
    /// `(pod, color)` → `(requests, errors)` when the step began (or the pod was first seen).
    baselines: HashMap<(String, String), (u64, u64)>,
    last_write: Option<Instant>,
    /// Whether an outdated CRD's refusal was already reported ([`crate::skew`]).
    crd_outdated: bool,
}

/// Runs until aborted.
pub async fn run(
    client: Client,
    pipelines: Cache<InferencePipeline>,
    pods: Cache<PodSummary>,
    published: Published,
    metrics: Arc<Metrics>,
    events: Publisher,
    cfg: DriverConfig,
) {
    // A pipeline with no ready pods takes a new model in place; an empty cache must not look
    // like that.
    pods.wait_until_ready().await;
    let mut memory: HashMap<(String, String), Memory> = HashMap::new();
    let mut ticker = tokio::time::interval(cfg.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let snapshot = pipelines.state();
        let all_pods = pods.state();
        let mut by_pipeline = workers_by_pipeline(all_pods.iter().map(AsRef::as_ref));
        let mut seen = HashSet::new();
        for p in &snapshot {
            let Some((ns, name)) = namespaced_name(&p.metadata) else {
                continue;
            };
            let workers = by_pipeline.remove(&(ns, name)).unwrap_or_default();
            let key = (ns.to_owned(), name.to_owned());
            let tick = Tick {
                workers: &workers,
                pods: &all_pods,
                published: &published,
                memory: &mut memory,
                key: &key,
            };
            drive(&client, p, tick, &metrics, &events, &cfg).await;
            seen.insert(key);
        }
        memory.retain(|k, _| seen.contains(k));
    }
}

/// What one tick hands [`drive`] for one pipeline besides the pipeline itself. The routing
/// table and the pipeline's [`Memory`] are only looked up (and the memory only created) for
/// a pipeline with something to drive.
struct Tick<'a> {
    workers: &'a [WorkerPod],
    /// Every watched worker pod, for why a candidate's pods are not ready.
    pods: &'a [Arc<PodSummary>],
    published: &'a Published,
    memory: &'a mut HashMap<(String, String), Memory>,
    key: &'a (String, String),
}

async fn drive(
    client: &Client,
    p: &InferencePipeline,
    tick: Tick<'_>,
    metrics: &Metrics,
    events: &Publisher,
    cfg: &DriverConfig,
) {
    // The controller writes the first status (the active model); nothing to roll out before.
    let Some(status) = p.status.as_ref() else {
        return;
    };
    let Some(active_model) = status.active_model.as_ref() else {
        return;
    };
    let rollout = status.rollout.as_deref();
    let phase = rollout.and_then(|r| r.phase);
    // Nothing to drive, and so no RPCs: a failed rollout whose model the spec still names
    // (it stays failed until the spec changes), or no rollout with the spec's model serving.
    // Decided before validating or copying anything: this runs for every pipeline every tick,
    // and almost every pipeline is settled.
    let spec = &p.spec.inference.model;
    let settled = match phase {
        Some(RolloutPhase::RolledBack | RolloutPhase::Aborted) => rollout
            .and_then(|r| r.candidate_model.as_ref())
            .is_some_and(|m| m.is(spec)),
        Some(p) if p.in_progress() || p == RolloutPhase::Promoted => false,
        _ => active_model.is(spec),
    };
    if settled {
        return;
    }
    let Ok(v) = validate(p) else {
        return;
    };
    let active_color = status.active_color.unwrap_or(Color::Blue);
    let spec_model = ModelRef::from(&v.inference.model);
    let Tick {
        workers,
        pods,
        published,
        memory,
        key,
    } = tick;
    let table = published.lock().ok().and_then(|t| t.get(key).cloned());
    let mem = memory.entry(key.clone()).or_default();
    let token = cfg
        .control_key
        .as_ref()
        .map(|k| k.tokens(&key.0, &key.1, &v.meta.uid));
    let token = token.as_ref();

    let candidate = rollout
        .filter(|r| r.phase.is_some_and(RolloutPhase::in_progress))
        .and_then(|r| Some((r.candidate_color?, r.candidate_model.clone()?)));
    let total = v
        .inference
        .replicas
        .clamp(status.inference.as_ref().and_then(|s| s.desired_replicas))
        .max(1)
        .unsigned_abs();
    let wanted = color_replicas(total, rollout, v.rollout.max_surge).1;
    let mut obs = Observations {
        active_ready: count_ready(workers, Stage::Inference, Some(active_color)),
        candidate_wanted: u32::try_from(
            v.inference
                .replicas
                .clamp(Some(i32::try_from(wanted).unwrap_or(i32::MAX))),
        )
        .unwrap_or(1),
        ..Observations::default()
    };

    if let Some((color, model)) = &candidate {
        let stats = poll(
            workers,
            Stage::Inference,
            Some(*color),
            token,
            cfg.stats_timeout,
        )
        .await;
        // Each answering pod serves the candidate's model (ready once loaded) or another one
        // (a superseded candidate's pod not yet gone).
        for s in stats.iter().filter_map(|(_, s)| s.as_ref()) {
            if s.model_version != model.version {
                obs.candidate_stale = obs.candidate_stale.saturating_add(1);
            } else if s.model_loaded {
                obs.candidate_ready = obs.candidate_ready.saturating_add(1);
            }
        }
        if obs.candidate_ready < obs.candidate_wanted.max(1) {
            obs.candidate_pods = candidate_pods(pods, &key.0, &key.1, *color);
            obs.candidate_problem = super::candidate_problem(
                &obs.candidate_pods,
                rollout.and_then(|r| r.started_at.as_ref()).map(|t| t.0),
            );
        }
    }

    let pre = poll(workers, Stage::Preprocess, None, token, cfg.stats_timeout).await;
    let answered: Vec<(&str, &WorkerStats)> = pre
        .iter()
        .filter_map(|(name, s)| Some((name.as_str(), s.as_ref()?)))
        .collect();
    obs.routes_acked = acknowledged(p, workers, table.as_deref(), &pre);
    if let Some((color, model)) = &candidate {
        obs.candidate_mismatch = candidate_mismatch(&answered, color.as_str(), &model.version);
        obs.shadow = shadow_counts(&answered, color.as_str());
        let r = rollout.cloned().unwrap_or_default();
        let window = (
            r.candidate_model
                .as_ref()
                .map(|m| m.version.clone())
                .unwrap_or_default(),
            r.step,
            r.step_started_at.as_ref().map(|t| t.0.as_millisecond()),
        );
        if mem.window.as_ref() != Some(&window) {
            mem.window = Some(window);
            mem.baselines.clear();
        }
        obs.active_window = color_window(&answered, active_color.as_str(), &mut mem.baselines);
        obs.candidate_window = color_window(&answered, color.as_str(), &mut mem.baselines);
    }

    let action = candidate.as_ref().and_then(|(_, model)| {
        let names = |key: &str| p.annotations().get(key) == Some(&model.version);
        if names(ANNOTATION_ABORT) {
            Some(UserAction::Abort)
        } else if names(ANNOTATION_PROMOTE) {
            Some(UserAction::Promote)
        } else {
            None
        }
    });

    let d = next(&Inputs {
        spec_model: &spec_model,
        policy: &v.rollout,
        active_color,
        active_model,
        rollout,
        obs: &obs,
        action,
        now: Timestamp::now(),
    });
    if d.rollout.as_ref() == rollout
        && d.active_color == active_color
        && d.active_model == *active_model
    {
        return;
    }
    let shape_changed = !d.events.is_empty()
        || d.active_color != active_color
        || d.active_model != *active_model
        || shape(d.rollout.as_ref()) != shape(rollout);
    if !shape_changed
        && mem
            .last_write
            .is_some_and(|t| t.elapsed() < cfg.counters_every)
    {
        return;
    }

    let mut next_status = status.clone();
    next_status.active_color = Some(d.active_color);
    next_status.active_model = Some(d.active_model.clone());
    next_status.rollout = d.rollout.clone().map(Box::new);
    let body = serde_json::json!({
        "apiVersion": "tandem.dev/v1alpha1",
        "kind": "InferencePipeline",
        "metadata": { "resourceVersion": p.resource_version() },
        "status": next_status,
    });
    let api: Api<InferencePipeline> = Api::namespaced(client.clone(), &v.meta.namespace);
    match api
        .patch_status(
            &v.meta.name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await
    {
        Ok(_) => {
            mem.last_write = Some(Instant::now());
            if let Some(key) = consumed_annotation(action, rollout, d.rollout.as_ref()) {
                remove_annotation(&api, &v.meta.name, key).await;
            }
            for e in &d.events {
                log_transition(&v.meta.namespace, &v.meta.name, e);
                metrics.count_rollout_transition(&e.reason);
                let note = crate::events::Note {
                    action: "Rollout",
                    reason: &e.reason,
                    note: e.note.clone(),
                    warning: e.warning,
                    discriminator: "rollout",
                };
                events.publish(p.into(), note, Timestamp::now());
            }
        }
        // Someone wrote since the cache was read: the next tick decides again on fresh state.
        Err(kube::Error::Api(s)) if s.code == 409 => {
            debug!(pipeline = %v.meta.name, "rollout status write conflicted; retrying next tick")
        }
        Err(e) => match crate::skew::undeclared_field(&e) {
            // Once per pipeline and leader term: the driver retries every tick.
            Some(field) if !mem.crd_outdated => {
                mem.crd_outdated = true;
                crate::skew::report(events, p.into(), "Rollout", field);
            }
            Some(_) => {
                debug!(pipeline = %v.meta.name, "rollout status refused: the CRD is outdated")
            }
            None => warn!(pipeline = %v.meta.name, error = %e, "writing rollout status failed"),
        },
    }
}

/// Removes an annotation the rollout acted on. A failure is logged: the annotation then stays,
/// as it did before the operator removed them, and acts only on a rollout of its version.
async fn remove_annotation(api: &Api<InferencePipeline>, name: &str, key: &str) {
    let patch = serde_json::json!({ "metadata": { "annotations": { key: null } } });
    match api
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => {
            info!(pipeline = %name, annotation = key, "removed the annotation the rollout acted on")
        }
        Err(e) => {
            warn!(pipeline = %name, annotation = key, error = %e, "could not remove the annotation the rollout acted on")
        }
    }
}

/// Logs a rollout transition at the level of its Event: a rollback, a halt or an abort (a
/// `Warning` Event) at WARN, so alerting on operator warnings sees failed rollouts.
pub(super) fn log_transition(namespace: &str, name: &str, t: &Transition) {
    let pipeline = format!("{namespace}/{name}");
    if t.warning {
        warn!(pipeline = %pipeline, reason = %t.reason, "{}", t.note);
    } else {
        info!(pipeline = %pipeline, reason = %t.reason, "{}", t.note);
    }
}

/// The parts of a rollout whose change is a transition (not just fresher counters).
#[derive(PartialEq)]
struct Shape {
    phase: Option<RolloutPhase>,
    candidate: Option<Color>,
    step: Option<i32>,
    traffic: i32,
    halted: bool,
}

fn shape(r: Option<&RolloutStatus>) -> Option<Shape> {
    r.map(|r| Shape {
        phase: r.phase,
        candidate: r.candidate_color,
        step: r.step,
        traffic: r.traffic_percent,
        halted: r.halted,
    })
}

/// The inference pods of one pipeline's color, terminating ones included: for why they are
/// not running (crash loop, unschedulable...) and whether they crash-loop.
fn candidate_pods(
    pods: &[Arc<PodSummary>],
    ns: &str,
    pipeline: &str,
    color: Color,
) -> Vec<Arc<PodSummary>> {
    pods.iter()
        .filter(|p| {
            &*p.namespace == ns
                && p.labels.instance.as_deref() == Some(pipeline)
                && p.labels.component.as_deref() == Some(Stage::Inference.as_str())
                && p.labels.color.as_deref() == Some(color.as_str())
        })
        .cloned()
        .collect()
}

fn count_ready(workers: &[WorkerPod], stage: Stage, color: Option<Color>) -> u32 {
    workers
        .iter()
        .filter(|w| w.stage == stage && w.color == color && w.ready && !w.terminating)
        .count()
        .try_into()
        .unwrap_or(u32::MAX)
}

/// `GetStats` of every ready, non-terminating pod of a stage (and color), concurrently;
/// `None` for pods that did not answer in time.
async fn poll(
    workers: &[WorkerPod],
    stage: Stage,
    color: Option<Color>,
    token: Option<&Tokens>,
    timeout: Duration,
) -> Vec<(String, Option<WorkerStats>)> {
    let calls = workers
        .iter()
        .filter(|w| w.stage == stage && w.color == color && w.ready && !w.terminating)
        .filter_map(|w| Some((w.name.clone(), w.control_address()?)))
        .map(|(name, address)| async move {
            let stats = get_stats(&address, token, timeout).await;
            if let Err(e) = &stats {
                debug!(pod = %name, error = %e, "GetStats failed");
            }
            (name, stats.ok())
        });
    join_all(calls).await
}

async fn get_stats(
    address: &str,
    tokens: Option<&Tokens>,
    timeout: Duration,
) -> Result<WorkerStats, String> {
    let call = async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
            .map_err(|e| e.to_string())?
            .connect_timeout(timeout)
            .timeout(timeout)
            .connect()
            .await
            .map_err(|e| e.to_string())?;
        let client = WorkerControlClient::new(channel);
        // A pod not yet replaced after a key rotation takes the previous token.
        control_auth::call(tokens, |token| {
            let mut client = client.clone();
            let request = control_auth::request(GetStatsRequest {}, token);
            async move { client.get_stats(request).await }
        })
        .await
        .map(tonic::Response::into_inner)
        .map_err(|s| s.message().to_owned())
    };
    tokio::time::timeout(timeout * 2, call)
        .await
        .map_err(|_| "timed out".to_owned())?
}

/// The generation of the table that reflects the pipeline's current status, once every ready
/// preprocess pod answered and holds it (or a later one).
fn acknowledged(
    p: &InferencePipeline,
    workers: &[WorkerPod],
    table: Option<&tandem_proto::tandem::v1::RoutingTable>,
    pre: &[(String, Option<WorkerStats>)],
) -> Option<u64> {
    let table = table?;
    if !same_routes(table, &desired_table(p, workers)) || pre.is_empty() {
        return None;
    }
    pre.iter()
        .all(|(_, s)| {
            s.as_ref()
                .is_some_and(|s| s.routes_generation >= table.generation)
        })
        .then_some(table.generation)
}

/// A preprocess pod's finding that the candidate's model cannot take what it sends.
fn candidate_mismatch(pre: &[(&str, &WorkerStats)], color: &str, version: &str) -> Option<String> {
    pre.iter()
        .flat_map(|(_, s)| &s.model_mismatches)
        .find(|m| m.color == color && m.model_version == version)
        .map(|m| m.message.clone())
}

fn shadow_counts(pre: &[(&str, &WorkerStats)], color: &str) -> ShadowCounts {
    let mut c = ShadowCounts::default();
    for s in pre
        .iter()
        .filter_map(|(_, s)| s.shadow.as_ref())
        .filter(|s| s.color == color)
    {
        c.compared += s.compared;
        c.mismatches += s.mismatches;
        c.errors += s.errors;
        if s.compared > 0 {
            c.worst_cosine = Some(c.worst_cosine.map_or(s.min_cosine, |w| w.min(s.min_cosine)));
            c.max_abs_diff = Some(
                c.max_abs_diff
                    .map_or(s.max_abs_diff, |w| w.max(s.max_abs_diff)),
            );
        }
    }
    c
}

/// Requests of one color since the step began, over every answering preprocess pod. A pod seen
/// for the first time mid-step counts from then; a pod whose counters went backwards
/// restarted and counts from zero.
fn color_window(
    pre: &[(&str, &WorkerStats)],
    color: &str,
    baselines: &mut HashMap<(String, String), (u64, u64)>,
) -> ColorWindow {
    let mut w = ColorWindow::default();
    for (pod, s) in pre {
        let Some(c) = s.colors.iter().find(|c| c.color == color) else {
            continue;
        };
        let base = baselines
            .entry(((*pod).to_owned(), color.to_owned()))
            .or_insert((c.requests, c.errors));
        if c.requests < base.0 || c.errors < base.1 {
            *base = (0, 0);
        }
        w.requests += c.requests - base.0;
        w.errors += c.errors - base.1;
        if let Some(l) = c.latency.as_ref().filter(|l| l.count > 0) {
            w.p99_ms = w.p99_ms.max(l.p99_ms);
        }
    }
    w
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_proto::tandem::v1::{ColorStats, LatencySummary, ShadowStats};

    fn stats(colors: &[(&str, u64, u64)]) -> WorkerStats {
        WorkerStats {
            colors: colors
                .iter()
                .map(|(c, r, e)| ColorStats {
                    color: (*c).to_owned(),
                    requests: *r,
                    errors: *e,
                    in_flight: 0,
                    latency: Some(LatencySummary {
                        count: *r,
                        p50_ms: 5.0,
                        p99_ms: 9.0,
                        mean_ms: 6.0,
                    }),
                })
                .collect(),
            ..WorkerStats::default()
        }
    }

    #[test]
    fn step_windows_count_from_the_first_sight_and_survive_a_pod_restart() {
        let mut base = HashMap::new();
        let a = stats(&[("green", 100, 2)]);
        let w = color_window(&[("pre-a", &a)], "green", &mut base);
        assert_eq!(
            (w.requests, w.errors),
            (0, 0),
            "earlier requests are not this step's"
        );
        let a = stats(&[("green", 130, 3)]);
        let w = color_window(&[("pre-a", &a)], "green", &mut base);
        assert_eq!((w.requests, w.errors, w.p99_ms), (30, 1, 9.0));
        let restarted = stats(&[("green", 7, 0)]);
        let w = color_window(&[("pre-a", &restarted)], "green", &mut base);
        assert_eq!((w.requests, w.errors), (7, 0));
    }

    #[test]
    fn shadow_counts_add_up_over_pods_of_the_candidate_color_only() {
        let pod = |color: &str, compared, mismatches, cosine| WorkerStats {
            shadow: Some(ShadowStats {
                color: color.to_owned(),
                compared,
                mismatches,
                errors: 1,
                min_cosine: cosine,
                max_abs_diff: 0.5,
                top1_disagreements: 0,
            }),
            ..WorkerStats::default()
        };
        let (a, b, other) = (
            pod("green", 10, 1, 0.9),
            pod("green", 5, 0, 0.99),
            pod("blue", 50, 50, -1.0),
        );
        let c = shadow_counts(&[("a", &a), ("b", &b), ("c", &other)], "green");
        assert_eq!((c.compared, c.mismatches, c.errors), (15, 1, 2));
        assert_eq!(c.worst_cosine, Some(0.9));
        assert_eq!(c.max_abs_diff, Some(0.5));
    }

    #[test]
    fn the_candidates_pods_are_its_pipelines_inference_pods_of_its_color_in_its_namespace() {
        let pod = |name: &str, ns: &str, pipeline: &str, stage: Stage, color: Option<Color>| {
            let labels = crate::build::selector_labels(pipeline, stage, color);
            let json = serde_json::json!({
                "metadata": {"name": name, "namespace": ns, "labels": labels},
            });
            Arc::new(serde_json::from_value::<PodSummary>(json).expect("decodes"))
        };
        let green = Some(Color::Green);
        let all = [
            pod("mine", "ml", "text", Stage::Inference, green),
            pod("active", "ml", "text", Stage::Inference, Some(Color::Blue)),
            pod("preprocess", "ml", "text", Stage::Preprocess, None),
            pod("other-pipeline", "ml", "img", Stage::Inference, green),
            pod("other-ns", "dev", "text", Stage::Inference, green),
        ];
        let found = candidate_pods(&all, "ml", "text", Color::Green);
        let names: Vec<&str> = found.iter().map(|p| &*p.name).collect();
        assert_eq!(names, ["mine"]);
    }

    #[test]
    fn only_a_mismatch_of_the_candidates_color_and_version_stops_the_rollout() {
        use tandem_proto::tandem::v1::ModelMismatch;
        let reports = |color: &str, version: &str| WorkerStats {
            model_mismatches: vec![ModelMismatch {
                color: color.into(),
                model_name: "effnet".into(),
                model_version: version.into(),
                message: format!("{color} {version}"),
            }],
            ..WorkerStats::default()
        };
        let (fine, active, stale, found) = (
            WorkerStats::default(),
            reports("blue", "1"),
            reports("green", "1"),
            reports("green", "2"),
        );
        let pods = [("a", &fine), ("b", &active), ("c", &stale)];
        assert_eq!(candidate_mismatch(&pods, "green", "2"), None);
        let pods = [("a", &fine), ("b", &active), ("c", &stale), ("d", &found)];
        assert_eq!(
            candidate_mismatch(&pods, "green", "2").as_deref(),
            Some("green 2")
        );
    }
}
