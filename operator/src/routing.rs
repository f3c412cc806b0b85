//! Routing tables for preprocess pods: which inference pods serve each color, each
//! color's share of live traffic and which color is shadowed. Pure: built from the
//! pipeline's spec and status and the inference pods the operator observes.

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use tandem_proto::tandem::v1::{ColorRoute, Endpoint, ParityTolerance, RoutingTable, ShadowPolicy};

use crate::build::{PORT_CONTROL, PORT_GRPC, Stage};
use crate::crd::{Color, InferencePipeline, ModelRef, RolloutPhase};
use crate::summary::PodSummary;

/// A worker pod as the router needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerPod {
    /// Pod name.
    pub name: String,
    /// `preprocess` or `inference`.
    pub stage: Stage,
    /// Inference color; `None` for preprocess pods.
    pub color: Option<Color>,
    /// Pod IP, once assigned.
    pub ip: Option<String>,
    /// The pod's Ready condition is True.
    pub ready: bool,
    /// The pod is being deleted (it finishes in-flight work but takes no new requests).
    pub terminating: bool,
    /// Sum of container restarts: a restarted worker has lost its table.
    pub restarts: i32,
}

impl WorkerPod {
    /// Reads the router's view of a pod; `None` for pods that are not Tandem workers.
    pub fn from_pod(pod: &PodSummary) -> Option<WorkerPod> {
        let stage = match pod.labels.component.as_deref()? {
            "preprocess" => Stage::Preprocess,
            "inference" => Stage::Inference,
            _ => return None,
        };
        let color = match pod.labels.color.as_deref() {
            Some("blue") => Some(Color::Blue),
            Some("green") => Some(Color::Green),
            _ => None,
        };
        let status = &pod.status;
        let restarts = status
            .container_statuses
            .iter()
            .map(|c| c.restart_count)
            .sum();
        Some(WorkerPod {
            name: pod.name.to_string(),
            stage,
            color,
            ip: status.pod_ip.clone().filter(|ip| !ip.is_empty()),
            ready: pod.is_ready(),
            terminating: pod.terminating,
            restarts,
        })
    }

    /// Where this pod's `WorkerControl` service listens.
    pub fn control_address(&self) -> Option<String> {
        self.ip.as_ref().map(|ip| socket(ip, PORT_CONTROL))
    }
}

/// A cached object's `(namespace, name)`, borrowed: the key [`workers_by_pipeline`] groups by.
pub fn namespaced_name(meta: &ObjectMeta) -> Option<(&str, &str)> {
    Some((meta.namespace.as_deref()?, meta.name.as_deref()?))
}

/// Worker pods grouped by pipeline — `(namespace, app.kubernetes.io/instance)` — in one pass,
/// so that a loop over every pipeline does not scan every pod for each. The keys borrow from
/// the pods: the map is rebuilt several times a second and copies nothing but the pods' view.
pub fn workers_by_pipeline<'a>(
    pods: impl IntoIterator<Item = &'a PodSummary>,
) -> HashMap<(&'a str, &'a str), Vec<WorkerPod>> {
    let mut by: HashMap<(&str, &str), Vec<WorkerPod>> = HashMap::new();
    for pod in pods {
        let Some(instance) = pod.labels.instance.as_deref() else {
            continue;
        };
        let ns = &*pod.namespace;
        if let Some(w) = WorkerPod::from_pod(pod) {
            by.entry((ns, instance)).or_default().push(w);
        }
    }
    by
}

fn socket(ip: &str, port: i32) -> String {
    if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    }
}

/// The routing table a pipeline's preprocess pods should hold now, without its
/// generation (the router numbers tables as their content changes).
///
/// - The active color (`status.activeColor`, blue before the first status) gets
///   `100 - trafficPercent` of live traffic; a rollout's candidate gets the rest. The
///   candidate is listed (with weight 0) from the moment it is provisioned, so the table the
///   rollout waits for already names its pods.
/// - While the rollout is in its shadow phase, every request is mirrored to the candidate and
///   compared with the spec's tolerance. The shadow `epoch` names the rollout, so preprocess
///   pods restart their counters for each new candidate.
/// - Endpoints are the Ready, non-terminating inference pods of each color.
pub fn desired_table(pipeline: &InferencePipeline, pods: &[WorkerPod]) -> RoutingTable {
    // Runs for every pipeline on every router pass: borrow, do not clone the status.
    let status = pipeline.status.as_ref();
    let active = status.and_then(|s| s.active_color).unwrap_or(Color::Blue);
    let spec_model;
    let active_model = match status.and_then(|s| s.active_model.as_ref()) {
        Some(m) => m,
        None => {
            spec_model = ModelRef::from(&pipeline.spec.inference.model);
            &spec_model
        }
    };
    let rollout = status
        .and_then(|s| s.rollout.as_deref())
        .filter(|r| r.phase.is_some_and(RolloutPhase::in_progress));
    let candidate = rollout.and_then(|r| Some((r.candidate_color?, r.candidate_model.as_ref()?)));
    let candidate_share = crate::rollout::candidate_share(rollout);

    let mut colors = vec![route(active, active_model, 100 - candidate_share, pods)];
    let mut shadow = None;
    if let (Some((color, model)), Some(r)) = (candidate, rollout) {
        colors.push(route(color, model, candidate_share, pods));
        // A halted rollout holds its candidate's share, but mirrors nothing more to it: it
        // has failed, and its shadow counters are no longer read.
        if r.phase == Some(RolloutPhase::Shadowing) && !r.halted {
            let tolerance = &pipeline.spec.rollout.shadow.tolerance;
            shadow = Some(ShadowPolicy {
                color: color.as_str().to_owned(),
                sample_rate: 1.0,
                tolerance: Some(ParityTolerance {
                    min_cosine: tolerance.cosine,
                    max_abs: tolerance.max_abs_diff,
                    require_top1: tolerance.top1,
                }),
                epoch: format!(
                    "{}/{}/{}",
                    color.as_str(),
                    model.version,
                    r.started_at.as_ref().map(|t| t.0.as_second()).unwrap_or(0)
                ),
            });
        }
    }
    RoutingTable {
        generation: 0,
        colors,
        shadow,
    }
}

fn route(color: Color, model: &ModelRef, weight: u32, pods: &[WorkerPod]) -> ColorRoute {
    // Sorted by name so equal pod sets give equal tables (no spurious generations).
    let endpoints: BTreeMap<&str, Endpoint> = pods
        .iter()
        .filter(|p| p.stage == Stage::Inference && p.color == Some(color))
        .filter(|p| p.ready && !p.terminating)
        .filter_map(|p| {
            let ip = p.ip.as_ref()?;
            Some((
                p.name.as_str(),
                Endpoint {
                    address: socket(ip, PORT_GRPC),
                    pod_name: p.name.clone(),
                },
            ))
        })
        .collect();
    ColorRoute {
        color: color.as_str().to_owned(),
        weight,
        endpoints: endpoints.into_values().collect(),
        model_name: model.name.clone(),
        model_version: model.version.clone(),
    }
}

/// Whether two tables route the same way (generations aside).
pub fn same_routes(a: &RoutingTable, b: &RoutingTable) -> bool {
    a.colors == b.colors && a.shadow == b.shadow
}

/// The generation for a table whose content changed: later than the previous one
/// and than `now_ms`, so a restarted operator (which forgot its counter) still
/// numbers its first table above what the pods hold.
pub fn next_generation(previous: u64, now_ms: u64) -> u64 {
    previous.saturating_add(1).max(now_ms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::{LABEL_COLOR, LABEL_COMPONENT, LABEL_INSTANCE};
    use crate::crd::{InferencePipelineStatus, RolloutStatus};
    use crate::test_fixtures;

    fn cached_pod(ns: &str, instance: &str, name: &str, component: &str) -> PodSummary {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": ns, "labels": {
                LABEL_INSTANCE: instance, LABEL_COMPONENT: component, LABEL_COLOR: "blue"}},
            "status": {"podIP": "10.0.0.1", "conditions": [{"type": "Ready", "status": "True"}],
                       "containerStatuses": [{"name": "w", "restartCount": 1}]}
        }))
        .expect("pod json")
    }

    #[test]
    fn pods_are_grouped_by_namespace_and_pipeline_and_non_workers_are_left_out() {
        let pods = [
            cached_pod("ml", "text", "text-pre-1", "preprocess"),
            cached_pod("ml", "text", "text-inf-1", "inference"),
            cached_pod("ads", "text", "text-pre-2", "preprocess"),
            cached_pod("ml", "image", "image-pre-1", "preprocess"),
            cached_pod("ml", "text", "sidecar", "something-else"),
        ];
        let by = workers_by_pipeline(&pods);
        let names = |ns: &str, p: &str| -> Vec<String> {
            by.get(&(ns, p))
                .map(|ws| ws.iter().map(|w| w.name.clone()).collect())
                .unwrap_or_default()
        };
        assert_eq!(names("ml", "text"), ["text-pre-1", "text-inf-1"]);
        assert_eq!(names("ads", "text"), ["text-pre-2"]);
        assert_eq!(names("ml", "image"), ["image-pre-1"]);
        assert_eq!(by.len(), 3);
        let inf = &by[&("ml", "text")][1];
        assert_eq!(
            (inf.stage, inf.color, inf.ready, inf.restarts),
            (Stage::Inference, Some(Color::Blue), true, 1)
        );
        assert_eq!(inf.ip.as_deref(), Some("10.0.0.1"));
    }

    fn pod(name: &str, stage: Stage, color: Option<Color>, ip: &str, ready: bool) -> WorkerPod {
        WorkerPod {
            name: name.to_owned(),
            stage,
            color,
            ip: Some(ip.to_owned()),
            ready,
            terminating: false,
            restarts: 0,
        }
    }

    fn pipeline() -> InferencePipeline {
        test_fixtures::text_pipeline()
    }

    #[test]
    fn a_new_pipeline_sends_all_traffic_to_the_ready_blue_inference_pods() {
        let pods = [
            pod(
                "inf-b",
                Stage::Inference,
                Some(Color::Blue),
                "10.244.0.9",
                true,
            ),
            pod(
                "inf-a",
                Stage::Inference,
                Some(Color::Blue),
                "10.244.0.8",
                true,
            ),
            pod(
                "inf-c",
                Stage::Inference,
                Some(Color::Blue),
                "10.244.0.10",
                false,
            ),
            pod("pre-a", Stage::Preprocess, None, "10.244.0.2", true),
        ];
        let table = desired_table(&pipeline(), &pods);
        assert_eq!(table.colors.len(), 1);
        let blue = &table.colors[0];
        assert_eq!((blue.color.as_str(), blue.weight), ("blue", 100));
        let addresses: Vec<_> = blue.endpoints.iter().map(|e| e.address.as_str()).collect();
        assert_eq!(
            addresses,
            ["10.244.0.8:8001", "10.244.0.9:8001"],
            "ready pods only, sorted"
        );
        assert!(table.shadow.is_none());
    }

    #[test]
    fn terminating_inference_pods_get_no_new_requests() {
        let mut leaving = pod(
            "inf-a",
            Stage::Inference,
            Some(Color::Blue),
            "10.244.0.8",
            true,
        );
        leaving.terminating = true;
        let table = desired_table(&pipeline(), &[leaving]);
        assert!(table.colors[0].endpoints.is_empty());
    }

    #[test]
    fn a_shadowing_rollout_mirrors_every_request_to_the_candidate_without_live_traffic_until_halted()
     {
        let mut p = pipeline();
        let model = ModelRef::from(&p.spec.inference.model);
        p.status = Some(InferencePipelineStatus {
            active_color: Some(Color::Blue),
            rollout: Some(Box::new(RolloutStatus {
                candidate_color: Some(Color::Green),
                phase: Some(RolloutPhase::Shadowing),
                candidate_model: Some(ModelRef {
                    version: "2".into(),
                    ..model
                }),
                step: None,
                traffic_percent: 0,
                ..RolloutStatus::default()
            })),
            ..InferencePipelineStatus::default()
        });
        let pods = [
            pod(
                "blue-1",
                Stage::Inference,
                Some(Color::Blue),
                "10.244.0.8",
                true,
            ),
            pod(
                "green-1",
                Stage::Inference,
                Some(Color::Green),
                "10.244.0.9",
                true,
            ),
        ];
        let table = desired_table(&p, &pods);
        let weights: Vec<_> = table
            .colors
            .iter()
            .map(|c| (c.color.as_str(), c.weight))
            .collect();
        assert_eq!(weights, [("blue", 100), ("green", 0)]);
        assert_eq!(table.colors[1].model_version, "2");
        let shadow = table.shadow.expect("shadow policy while shadowing");
        assert_eq!(shadow.color, "green");
        assert_eq!(shadow.sample_rate, 1.0);
        let tolerance = shadow.tolerance.expect("tolerance");
        assert_eq!(tolerance.min_cosine, p.spec.rollout.shadow.tolerance.cosine);
        assert!(shadow.epoch.starts_with("green/2/"), "{}", shadow.epoch);

        // The same rollout halted (failed with autoRollback: false): nothing more is mirrored
        // to the failed candidate; it keeps its listing and its (zero) share.
        if let Some(r) = p.status.as_mut().and_then(|s| s.rollout.as_mut()) {
            r.halted = true;
        }
        let halted = desired_table(&p, &pods);
        assert_eq!(halted.shadow, None);
        assert_eq!(halted.colors, table.colors);
    }

    #[test]
    fn a_provisioning_candidate_is_listed_without_traffic_or_shadow_and_an_ended_one_not_at_all() {
        let mut p = pipeline();
        let model = ModelRef::from(&p.spec.inference.model);
        let with_phase = |phase| InferencePipelineStatus {
            active_color: Some(Color::Blue),
            rollout: Some(Box::new(RolloutStatus {
                phase: Some(phase),
                candidate_color: Some(Color::Green),
                candidate_model: Some(model.clone()),
                traffic_percent: 30,
                ..RolloutStatus::default()
            })),
            ..InferencePipelineStatus::default()
        };
        p.status = Some(with_phase(RolloutPhase::Provisioning));
        let table = desired_table(&p, &[]);
        let weights: Vec<_> = table
            .colors
            .iter()
            .map(|c| (c.color.as_str(), c.weight))
            .collect();
        assert_eq!(weights, [("blue", 100), ("green", 0)]);
        assert!(table.shadow.is_none());

        for ended in [
            RolloutPhase::Promoted,
            RolloutPhase::RolledBack,
            RolloutPhase::Aborted,
        ] {
            p.status = Some(with_phase(ended));
            let table = desired_table(&p, &[]);
            let weights: Vec<_> = table
                .colors
                .iter()
                .map(|c| (c.color.as_str(), c.weight))
                .collect();
            assert_eq!(weights, [("blue", 100)], "{ended:?}");
        }
    }

    #[test]
    fn a_traffic_step_splits_live_traffic_and_stops_shadowing() {
        let mut p = pipeline();
        let model = ModelRef::from(&p.spec.inference.model);
        p.status = Some(InferencePipelineStatus {
            active_color: Some(Color::Green),
            rollout: Some(Box::new(RolloutStatus {
                phase: Some(RolloutPhase::ShiftingTraffic),
                candidate_color: Some(Color::Blue),
                candidate_model: Some(model),
                step: Some(0),
                traffic_percent: 10,
                ..RolloutStatus::default()
            })),
            ..InferencePipelineStatus::default()
        });
        let table = desired_table(&p, &[]);
        let weights: Vec<_> = table
            .colors
            .iter()
            .map(|c| (c.color.as_str(), c.weight))
            .collect();
        assert_eq!(weights, [("green", 90), ("blue", 10)]);
        assert!(table.shadow.is_none());
    }

    #[test]
    fn tables_with_the_same_pods_in_another_order_are_the_same_routes() {
        let a = pod(
            "inf-a",
            Stage::Inference,
            Some(Color::Blue),
            "10.244.0.8",
            true,
        );
        let b = pod(
            "inf-b",
            Stage::Inference,
            Some(Color::Blue),
            "10.244.0.9",
            true,
        );
        let one = desired_table(&pipeline(), &[a.clone(), b.clone()]);
        let two = desired_table(&pipeline(), &[b, a]);
        assert!(same_routes(&one, &two));
    }

    #[test]
    fn generations_grow_past_both_the_previous_one_and_the_clock() {
        assert_eq!(next_generation(0, 1_700_000_000_000), 1_700_000_000_000);
        assert_eq!(
            next_generation(1_700_000_000_005, 1_700_000_000_000),
            1_700_000_000_006
        );
    }

    #[test]
    fn ipv6_pod_addresses_are_bracketed() {
        assert_eq!(socket("fd00::5", 8001), "[fd00::5]:8001");
    }
}
