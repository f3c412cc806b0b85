//! Compact forms of owned objects for the operator's caches.
//!
//! Each watch decodes an object into its *watched* form ([`WatchedDeployment`],
//! [`WatchedPod`]): the metadata fields something reads ([`decode_meta`]; `managedFields`,
//! annotations and finalizers are skipped unparsed) with the spec or status fields the
//! operator uses. The watcher resumes from its `resourceVersion` and the controller maps it to
//! its pipeline through its owner reference; then the cache keeps only its *summary*
//! ([`DeploymentSummary`], [`PodSummary`]), with no `ObjectMeta` (360 bytes inline before any
//! of its strings). A typed `k8s_openapi` `Deployment` is 2.4 KB before its strings, because
//! its optional pod template is laid out inline even when empty; a `Pod` likewise.

use std::borrow::Cow;

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
use k8s_openapi::jiff::Timestamp;
use kube::Resource;
use serde::{Deserialize, Deserializer};

use crate::build::{LABEL_COLOR, LABEL_COMPONENT, LABEL_INSTANCE, LABEL_NAME};

/// A Deployment as its watch decodes it.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct WatchedDeployment {
    /// The Deployment's metadata, decoded in part ([`decode_meta`]).
    #[serde(default, deserialize_with = "decode_meta")]
    pub metadata: ObjectMeta,
    /// `spec.replicas`.
    #[serde(default)]
    pub spec: DeploymentSpecSummary,
    /// The status counters.
    #[serde(default)]
    pub status: DeploymentStatusSummary,
}

/// What the reconciler reads of a Deployment, cached and taken from apply responses: pruning
/// finds a Deployment by name and deletes it only if the pipeline (by UID) owns it, guarded
/// by its own UID; the apply record compares its `generation`; status reads the counters.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DeploymentSummary {
    /// `metadata.name`.
    pub name: Box<str>,
    /// `metadata.uid`.
    pub uid: Option<Box<str>>,
    /// `metadata.generation`.
    pub generation: Option<i64>,
    /// The UIDs of its owners.
    pub owner_uids: Box<[Box<str>]>,
    /// `spec.replicas`.
    pub spec: DeploymentSpecSummary,
    /// The status counters.
    pub status: DeploymentStatusSummary,
}

/// `spec.replicas` of a Deployment.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DeploymentSpecSummary {
    /// Desired pods; the API server defaults it to 1.
    pub replicas: Option<i32>,
}

/// The counters of a Deployment's status.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DeploymentStatusSummary {
    /// The generation the deployment controller last acted on.
    pub observed_generation: Option<i64>,
    /// Pods of any ReplicaSet of the Deployment.
    pub replicas: Option<i32>,
    /// Ready pods.
    pub ready_replicas: Option<i32>,
    /// Pods of the newest ReplicaSet.
    pub updated_replicas: Option<i32>,
}

impl DeploymentSummary {
    fn from_parts(
        meta: &ObjectMeta,
        spec: DeploymentSpecSummary,
        status: DeploymentStatusSummary,
    ) -> Self {
        Self {
            name: boxed(meta.name.as_deref().unwrap_or_default()),
            uid: meta.uid.as_deref().map(boxed),
            generation: meta.generation,
            owner_uids: meta
                .owner_references
                .iter()
                .flatten()
                .map(|o| boxed(&o.uid))
                .collect(),
            spec,
            status,
        }
    }
}

impl From<&WatchedDeployment> for DeploymentSummary {
    fn from(d: &WatchedDeployment) -> Self {
        Self::from_parts(&d.metadata, d.spec.clone(), d.status.clone())
    }
}

impl From<Deployment> for DeploymentSummary {
    fn from(d: Deployment) -> Self {
        let status = d.status.unwrap_or_default();
        Self::from_parts(
            &d.metadata,
            DeploymentSpecSummary {
                replicas: d.spec.and_then(|s| s.replicas),
            },
            DeploymentStatusSummary {
                observed_generation: status.observed_generation,
                replicas: status.replicas,
                ready_replicas: status.ready_replicas,
                updated_replicas: status.updated_replicas,
            },
        )
    }
}

fn boxed(s: &str) -> Box<str> {
    Box::from(s)
}

/// The metadata fields the watched forms decode: what the watcher (`resourceVersion`), the
/// owner triggers and apply record (owner references, `generation`) and the summaries read
/// (a pod's `creationTimestamp`: which rollout it was started for).
/// Everything else is skipped without being parsed into values, `managedFields` above all:
/// about half of a Deployment's JSON, re-sent with every status change the deployment
/// controller writes.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct MetaFields {
    name: Option<String>,
    namespace: Option<String>,
    uid: Option<String>,
    resource_version: Option<String>,
    generation: Option<i64>,
    creation_timestamp: Option<Time>,
    deletion_timestamp: Option<Time>,
    labels: Option<BTreeMap<String, String>>,
    owner_references: Option<Vec<OwnerReference>>,
}

fn decode_meta<'de, D: Deserializer<'de>>(d: D) -> Result<ObjectMeta, D::Error> {
    let m = MetaFields::deserialize(d)?;
    Ok(ObjectMeta {
        name: m.name,
        namespace: m.namespace,
        uid: m.uid,
        resource_version: m.resource_version,
        generation: m.generation,
        creation_timestamp: m.creation_timestamp,
        deletion_timestamp: m.deletion_timestamp,
        labels: m.labels,
        owner_references: m.owner_references,
        ..ObjectMeta::default()
    })
}

/// Makes a watched form watchable at the URLs of the kind it summarises.
macro_rules! watched_resource {
    ($watched:ty, $kind:literal, $group:literal, $version:literal, $plural:literal) => {
        impl Resource for $watched {
            type DynamicType = ();
            type Scope = k8s_openapi::NamespaceResourceScope;

            fn kind(_: &()) -> Cow<'_, str> {
                Cow::Borrowed($kind)
            }

            fn group(_: &()) -> Cow<'_, str> {
                Cow::Borrowed($group)
            }

            fn version(_: &()) -> Cow<'_, str> {
                Cow::Borrowed($version)
            }

            fn plural(_: &()) -> Cow<'_, str> {
                Cow::Borrowed($plural)
            }

            fn meta(&self) -> &ObjectMeta {
                &self.metadata
            }

            fn meta_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
}

watched_resource!(WatchedDeployment, "Deployment", "apps", "v1", "deployments");
watched_resource!(WatchedPod, "Pod", "", "v1", "pods");

/// A worker pod as its watch decodes it.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct WatchedPod {
    /// The pod's metadata, decoded in part ([`decode_meta`]).
    #[serde(default, deserialize_with = "decode_meta")]
    pub metadata: ObjectMeta,
    /// The parts of its status that are read.
    #[serde(default)]
    pub status: PodStatusSummary,
}

/// What the operator reads of a worker pod, cached: the router, autoscaler, rollout driver
/// and status group pods by namespace and selector labels and read their status. Decodes
/// from a Pod's JSON.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(from = "WatchedPod")]
pub struct PodSummary {
    /// `metadata.name`.
    pub name: Box<str>,
    /// `metadata.namespace`.
    pub namespace: Box<str>,
    /// `metadata.creationTimestamp` (whole seconds): a rollout judges only the candidate pods
    /// started for it, not an earlier candidate's still on the same color.
    pub created: Option<Timestamp>,
    /// Whether it is being deleted (`metadata.deletionTimestamp` is set).
    pub terminating: bool,
    /// The selector labels, by which pods are grouped and matched.
    pub labels: WorkerLabels,
    /// The parts of its status that are read.
    pub status: PodStatusSummary,
}

impl PodSummary {
    fn from_parts(meta: &ObjectMeta, status: PodStatusSummary) -> Self {
        Self {
            name: boxed(meta.name.as_deref().unwrap_or_default()),
            namespace: boxed(meta.namespace.as_deref().unwrap_or_default()),
            created: meta.creation_timestamp.as_ref().map(|t| t.0),
            terminating: meta.deletion_timestamp.is_some(),
            labels: WorkerLabels::of(meta.labels.as_ref()),
            status,
        }
    }
}

impl From<&WatchedPod> for PodSummary {
    fn from(pod: &WatchedPod) -> Self {
        Self::from_parts(&pod.metadata, pod.status.clone())
    }
}

impl From<WatchedPod> for PodSummary {
    fn from(pod: WatchedPod) -> Self {
        Self::from_parts(&pod.metadata, pod.status)
    }
}

/// The selector labels of a worker pod (`build::selector_labels`), one field each. As a
/// `BTreeMap` (a B-tree node and eight strings) they cost ~0.6 KB more per pod (heaptrack at
/// 1,000 pods: 1.46 → 0.84 MB for the cached summaries' heap).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WorkerLabels {
    /// `app.kubernetes.io/name`.
    pub name: Option<Box<str>>,
    /// `app.kubernetes.io/instance`: the pipeline's name.
    pub instance: Option<Box<str>>,
    /// `app.kubernetes.io/component`: the stage.
    pub component: Option<Box<str>>,
    /// `tandem.dev/color`: an inference pod's color.
    pub color: Option<Box<str>>,
}

impl WorkerLabels {
    /// The selector labels among a pod's labels; the others are not kept.
    fn of(labels: Option<&BTreeMap<String, String>>) -> Self {
        let get = |key: &str| labels.and_then(|l| l.get(key)).map(|v| boxed(v));
        WorkerLabels {
            name: get(LABEL_NAME),
            instance: get(LABEL_INSTANCE),
            component: get(LABEL_COMPONENT),
            color: get(LABEL_COLOR),
        }
    }

    /// The value of one of the selector labels; `None` for any other key.
    pub fn get(&self, key: &str) -> Option<&str> {
        let v = match key {
            LABEL_NAME => &self.name,
            LABEL_INSTANCE => &self.instance,
            LABEL_COMPONENT => &self.component,
            LABEL_COLOR => &self.color,
            _ => return None,
        };
        v.as_deref()
    }
}

/// A pod's IP, conditions and container states.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct PodStatusSummary {
    /// `status.podIP`, once assigned.
    #[serde(rename = "podIP")]
    pub pod_ip: Option<String>,
    /// `PodScheduled`, `Ready`, ...
    pub conditions: Vec<PodConditionSummary>,
    /// Init containers first in `pod_problem`'s search.
    pub init_container_statuses: Vec<ContainerStatusSummary>,
    /// The worker container.
    pub container_statuses: Vec<ContainerStatusSummary>,
}

/// One pod condition.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct PodConditionSummary {
    /// Condition type.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// Machine-readable reason, e.g. `Unschedulable`.
    pub reason: Option<String>,
    /// The scheduler's or kubelet's message.
    pub message: Option<String>,
}

/// One container's restarts and states.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct ContainerStatusSummary {
    /// Container name.
    pub name: String,
    /// Restarts so far.
    pub restart_count: i32,
    /// Passes its readiness probe.
    pub ready: bool,
    /// Now.
    pub state: ContainerStateSummary,
    /// Before the last restart.
    pub last_state: ContainerStateSummary,
}

/// Waiting or terminated details of a container state (running carries nothing read here).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct ContainerStateSummary {
    /// Why it is waiting (`CrashLoopBackOff`, `ImagePullBackOff`, ...).
    pub waiting: Option<ContainerWaiting>,
    /// How it ended.
    pub terminated: Option<ContainerTerminated>,
}

/// `state.waiting`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct ContainerWaiting {
    /// Machine-readable reason.
    pub reason: Option<String>,
    /// Details.
    pub message: Option<String>,
}

/// `state.terminated`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct ContainerTerminated {
    /// Exit code.
    pub exit_code: i32,
    /// Machine-readable reason (`Error`, `OOMKilled`, ...): the only explanation of a kill,
    /// which leaves no message.
    pub reason: Option<String>,
    /// Termination message (e.g. the worker's termination log).
    pub message: Option<String>,
}

impl ContainerTerminated {
    /// The reason, when it says more than the exit code: `OOMKilled`, `ContainerCannotRun`...,
    /// not `Error` (any non-zero exit) or `Completed`.
    pub fn telling_reason(&self) -> Option<&str> {
        self.reason
            .as_deref()
            .filter(|r| !r.is_empty() && !matches!(*r, "Error" | "Completed"))
    }

    /// The line of the termination message that says why: of several (the end of the log,
    /// under `FallbackToLogsOnError`), the last non-empty one, skipping the footer Rust prints
    /// after a panic's message (`note: run with `RUST_BACKTRACE=1` ...`), which says nothing.
    pub fn why(&self) -> Option<&str> {
        self.message.as_deref().and_then(|m| {
            m.lines()
                .map(str::trim)
                .rfind(|l| !l.is_empty() && !l.starts_with("note: run with `RUST_BACKTRACE"))
        })
    }
}

impl PodSummary {
    /// The summary of a typed pod (the same as decoding the pod's JSON).
    pub fn of(pod: &k8s_openapi::api::core::v1::Pod) -> Result<Self, serde_json::Error> {
        serde_json::to_value(pod).and_then(serde_json::from_value)
    }

    /// Whether its `Ready` condition is `True`.
    pub fn is_ready(&self) -> bool {
        self.status
            .conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deployment_json() -> serde_json::Value {
        serde_json::json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {
                "name": "text-preprocess",
                "namespace": "ml",
                "generation": 3,
                "labels": {"app.kubernetes.io/instance": "text"},
                "ownerReferences": [{"apiVersion": "tandem.dev/v1alpha1", "kind": "InferencePipeline",
                                     "name": "text", "uid": "u-1"}]
            },
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": {"app.kubernetes.io/instance": "text"}},
                "template": {"spec": {"containers": [{"name": "worker", "image": "w:1"}]}}
            },
            "status": {"observedGeneration": 3, "replicas": 2, "readyReplicas": 1,
                       "updatedReplicas": 2, "availableReplicas": 1,
                       "conditions": [{"type": "Available", "status": "False"}]}
        })
    }

    fn watched(json: serde_json::Value) -> WatchedDeployment {
        serde_json::from_value(json).expect("decodes")
    }

    #[test]
    fn a_deployments_json_decodes_to_the_fields_the_reconciler_reads() {
        let s = DeploymentSummary::from(&watched(deployment_json()));
        assert_eq!(&*s.name, "text-preprocess");
        assert_eq!(s.generation, Some(3));
        assert_eq!(&*s.owner_uids, [Box::from("u-1")]);
        assert_eq!(s.spec.replicas, Some(2));
        assert_eq!(s.status.observed_generation, Some(3));
        assert_eq!(s.status.replicas, Some(2));
        assert_eq!(s.status.ready_replicas, Some(1));
        assert_eq!(s.status.updated_replicas, Some(2));
    }

    #[test]
    fn an_applied_deployment_gives_the_same_summary_as_a_watched_one() {
        let mut json = deployment_json();
        json["metadata"]["uid"] = "u-dep".into();
        let typed: Deployment = serde_json::from_value(json.clone()).expect("decodes");
        let from_watch = DeploymentSummary::from(&watched(json));
        assert_eq!(DeploymentSummary::from(typed), from_watch);
        assert_eq!(from_watch.uid.as_deref(), Some("u-dep"));
    }

    #[test]
    fn decoding_skips_the_metadata_no_one_reads_but_keeps_what_the_watcher_and_triggers_need() {
        let mut json = deployment_json();
        json["metadata"]["resourceVersion"] = "812".into();
        json["metadata"]["uid"] = "u-dep".into();
        json["metadata"]["deletionTimestamp"] = "2026-12-05T08:00:00Z".into();
        json["metadata"]["annotations"] =
            serde_json::json!({"deployment.kubernetes.io/revision": "1"});
        json["metadata"]["creationTimestamp"] = "2026-12-05T07:00:00Z".into();
        json["metadata"]["finalizers"] = serde_json::json!(["example.com/hold"]);
        json["metadata"]["managedFields"] = serde_json::json!([{
            "manager": "kube-controller-manager", "operation": "Update", "apiVersion": "apps/v1",
            "fieldsType": "FieldsV1", "subresource": "status",
            "fieldsV1": {"f:status": {"f:replicas": {}, "f:conditions": {".": {}}}}
        }]);
        let m = watched(json).metadata;
        assert_eq!(m.resource_version.as_deref(), Some("812"));
        assert!(m.deletion_timestamp.is_some());
        assert!(
            m.creation_timestamp.is_some(),
            "a pod's says which rollout it is of"
        );
        assert_eq!(m.uid.as_deref(), Some("u-dep"));
        assert_eq!(m.generation, Some(3));
        let owner = &m.owner_references.as_deref().expect("owner")[0];
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str()),
            ("InferencePipeline", "text"),
            "the owner trigger maps it to its pipeline by these"
        );
        assert_eq!(
            (&m.managed_fields, &m.annotations, &m.finalizers),
            (&None, &None, &None)
        );
    }

    #[test]
    fn a_new_deployment_without_spec_or_status_decodes_to_empty_counters() {
        let s = DeploymentSummary::from(&watched(serde_json::json!({"metadata": {"name": "x"}})));
        assert_eq!(s.spec.replicas, None);
        assert_eq!(s.status, DeploymentStatusSummary::default());
        assert!(s.owner_uids.is_empty());
    }

    #[test]
    fn it_is_addressed_like_a_deployment() {
        assert_eq!(WatchedDeployment::api_version(&()), "apps/v1");
        assert_eq!(
            WatchedDeployment::url_path(&(), Some("ml")),
            "/apis/apps/v1/namespaces/ml/deployments"
        );
    }

    fn pod_json() -> serde_json::Value {
        serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "text-preprocess-abc", "namespace": "ml",
                         "creationTimestamp": "2026-12-05T07:59:30Z",
                         "labels": {"app.kubernetes.io/component": "preprocess"},
                         "annotations": {"a": "b"}},
            "spec": {"containers": [{"name": "preprocess", "image": "w:1",
                                     "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]}]},
            "status": {
                "phase": "Running",
                "podIP": "10.244.0.7",
                "conditions": [{"type": "PodScheduled", "status": "True"},
                               {"type": "Ready", "status": "True", "lastTransitionTime": "2026-12-05T08:00:00Z"}],
                "containerStatuses": [{"name": "preprocess", "image": "w:1", "imageID": "x", "ready": true,
                                       "restartCount": 2,
                                       "state": {"running": {"startedAt": "2026-12-05T08:00:00Z"}},
                                       "lastState": {"terminated": {"exitCode": 3, "reason": "Error",
                                                                  "message": "model sha256 mismatch"}}}]
            }
        })
    }

    #[test]
    fn a_pods_json_decodes_to_ip_conditions_restarts_and_last_exit() {
        let s: PodSummary = serde_json::from_value(pod_json()).expect("decodes");
        assert_eq!((&*s.name, &*s.namespace), ("text-preprocess-abc", "ml"));
        assert_eq!(
            s.created.map(|t| t.to_string()).as_deref(),
            Some("2026-12-05T07:59:30Z")
        );
        assert!(!s.terminating);
        assert_eq!(s.status.pod_ip.as_deref(), Some("10.244.0.7"));
        assert!(s.is_ready());
        let c = &s.status.container_statuses[0];
        assert_eq!(c.restart_count, 2);
        assert_eq!(c.state.waiting, None);
        let last = c.last_state.terminated.as_ref().expect("last exit");
        assert_eq!(last.exit_code, 3);
        assert_eq!(last.reason.as_deref(), Some("Error"));
        assert_eq!(last.message.as_deref(), Some("model sha256 mismatch"));
    }

    #[test]
    fn a_pod_being_deleted_is_terminating() {
        let mut json = pod_json();
        json["metadata"]["deletionTimestamp"] = "2026-12-05T08:00:00Z".into();
        let s: PodSummary = serde_json::from_value(json).expect("decodes");
        assert!(s.terminating);
    }

    #[test]
    fn summarising_a_typed_or_watched_pod_gives_the_same_as_decoding_its_json() {
        let typed: k8s_openapi::api::core::v1::Pod =
            serde_json::from_value(pod_json()).expect("decodes");
        let decoded: PodSummary = serde_json::from_value(pod_json()).expect("decodes");
        let watched: WatchedPod = serde_json::from_value(pod_json()).expect("decodes");
        assert_eq!(PodSummary::of(&typed).expect("summarises"), decoded);
        assert_eq!(PodSummary::from(&watched), decoded);
    }

    #[test]
    fn a_watched_pod_is_addressed_like_a_pod_and_its_summary_is_a_fraction_of_one() {
        assert_eq!(WatchedPod::api_version(&()), "v1");
        assert_eq!(
            WatchedPod::url_path(&(), Some("ml")),
            "/api/v1/namespaces/ml/pods"
        );
        assert!(
            std::mem::size_of::<PodSummary>() * 4
                < std::mem::size_of::<k8s_openapi::api::core::v1::Pod>()
        );
    }

    /// Metadata as a worker object carries it on the API server: every label the operator
    /// and Kubernetes put there, annotations, owner, timestamps.
    fn full_meta(name: &str, extra_label: (&str, &str)) -> serde_json::Value {
        let stage = crate::build::Stage::Preprocess;
        let mut labels =
            crate::build::selector_labels("text", stage, Some(crate::crd::Color::Blue));
        labels.insert(
            crate::build::LABEL_MANAGED_BY.into(),
            "tandem-operator".into(),
        );
        labels.insert(crate::build::LABEL_VERSION.into(), "1".into());
        labels.insert(extra_label.0.into(), extra_label.1.into());
        serde_json::json!({
            "name": name, "namespace": "ml", "uid": "u-obj", "resourceVersion": "812",
            "generation": 3, "generateName": "text-preprocess-blue-",
            "creationTimestamp": "2026-12-05T08:00:00Z",
            "labels": labels,
            "annotations": {"deployment.kubernetes.io/revision": "1"},
            "finalizers": ["example.com/hold"],
            "ownerReferences": [{"apiVersion": "tandem.dev/v1alpha1", "kind": "InferencePipeline",
                                 "name": "text", "uid": "u-1", "controller": true}]
        })
    }

    #[test]
    fn a_cached_deployment_keeps_what_pruning_the_apply_record_and_status_read() {
        let mut json = deployment_json();
        json["metadata"] = full_meta("text-preprocess-blue", ("extra", "x"));
        let d = DeploymentSummary::from(&watched(json));
        assert_eq!(&*d.name, "text-preprocess-blue");
        assert_eq!((d.uid.as_deref(), d.generation), (Some("u-obj"), Some(3)));
        assert_eq!(&*d.owner_uids, [Box::from("u-1")]);
        assert_eq!(d.spec.replicas, Some(2));
    }

    #[test]
    fn a_decoded_pod_keeps_only_its_selector_labels_typed() {
        let mut json = pod_json();
        json["metadata"] = full_meta("text-preprocess-blue-abc", ("pod-template-hash", "5d8f"));
        let pod: PodSummary = serde_json::from_value(json).expect("decodes");
        let selector = crate::build::selector_labels(
            "text",
            crate::build::Stage::Preprocess,
            Some(crate::crd::Color::Blue),
        );
        for (k, v) in &selector {
            assert_eq!(pod.labels.get(k), Some(v.as_str()), "{k}");
        }
        assert_eq!(pod.labels.get("pod-template-hash"), None);
        assert!(crate::routing::WorkerPod::from_pod(&pod).is_some());
        assert_eq!(
            crate::routing::workers_by_pipeline([&pod])
                .keys()
                .collect::<Vec<_>>(),
            [&("ml", "text")]
        );
    }

    #[test]
    fn a_pod_without_selector_labels_is_no_worker() {
        let mut json = pod_json();
        json["metadata"]["labels"] = serde_json::json!({"app": "something-else"});
        let pod: PodSummary = serde_json::from_value(json).expect("decodes");
        assert_eq!(pod.labels, WorkerLabels::default());
        assert_eq!(crate::routing::WorkerPod::from_pod(&pod), None);
        assert!(crate::routing::workers_by_pipeline([&pod]).is_empty());
    }

    #[test]
    fn the_cached_forms_are_a_fraction_of_the_watched_ones() {
        assert!(std::mem::size_of::<DeploymentSummary>() * 4 < std::mem::size_of::<Deployment>());
        assert!(
            std::mem::size_of::<DeploymentSummary>() * 2 < std::mem::size_of::<WatchedDeployment>()
        );
        assert!(std::mem::size_of::<PodSummary>() * 2 < std::mem::size_of::<WatchedPod>());
    }
}
