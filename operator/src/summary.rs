//! Compact forms of owned objects for the operator's caches.
//!
//! A cached `k8s_openapi` `Deployment` is 2.4 KB before any of its strings, because its
//! optional pod template is laid out inline even when empty; a `Pod` likewise (its spec). The
//! reconciler needs a Deployment's metadata (labels and owner references for pruning,
//! `generation` for the apply record), `spec.replicas` and the status counters, so the watch
//! decodes straight into [`DeploymentSummary`] (serde skips the rest of the JSON) and the cache
//! holds that. Worker pods are cached as [`PodSummary`]: metadata, IP, conditions and the few
//! container-status fields the router and `status::pod_problem` read.

use std::borrow::Cow;

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
use kube::Resource;
use serde::{Deserialize, Deserializer};

use crate::build::{LABEL_COLOR, LABEL_COMPONENT, LABEL_INSTANCE, LABEL_NAME};

/// What the reconciler reads of a Deployment; decodes from a Deployment's JSON.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct DeploymentSummary {
    /// The Deployment's metadata, decoded in part ([`decode_meta`]) and cached slimmed
    /// ([`DeploymentSummary::slim`]).
    #[serde(default, deserialize_with = "decode_meta")]
    pub metadata: ObjectMeta,
    /// `spec.replicas`.
    #[serde(default)]
    pub spec: DeploymentSpecSummary,
    /// The status counters.
    #[serde(default)]
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

impl From<Deployment> for DeploymentSummary {
    fn from(d: Deployment) -> Self {
        let status = d.status.unwrap_or_default();
        Self {
            metadata: d.metadata,
            spec: DeploymentSpecSummary {
                replicas: d.spec.and_then(|s| s.replicas),
            },
            status: DeploymentStatusSummary {
                observed_generation: status.observed_generation,
                replicas: status.replicas,
                ready_replicas: status.ready_replicas,
                updated_replicas: status.updated_replicas,
            },
        }
    }
}

impl DeploymentSummary {
    /// Drops from the metadata what no reader of the Deployment cache uses, before caching:
    /// pruning finds a Deployment by name and needs the owner's UID, deletion the UID, the
    /// apply record the `generation`, and the controller maps a changed Deployment to its
    /// pipeline through the owner reference (kind, apiVersion and name included), which stays
    /// whole. No labels: nothing reads a cached Deployment's, and four labels cost about 800
    /// bytes per Deployment (a B-tree node and eight strings).
    pub fn slim(&mut self) {
        slim_common(&mut self.metadata);
    }
}

impl PodSummary {
    /// Drops from the metadata what no reader of the pod cache uses, before caching: the
    /// router, autoscaler and status read the name, the selector labels (already moved to
    /// [`PodSummary::labels`] by the decode) and whether the pod is being deleted.
    pub fn slim(&mut self) {
        let m = &mut self.metadata;
        slim_common(m);
        m.uid = None;
        m.generation = None;
        m.generate_name = None;
        m.owner_references = None;
    }
}

/// What neither cache reads: managed fields, annotations, timestamps other than deletion,
/// finalizers, the `resourceVersion` (the watcher tracks its own before this runs) and the
/// metadata's labels (a pod's selector labels are in [`PodSummary::labels`]).
fn slim_common(m: &mut ObjectMeta) {
    m.managed_fields = None;
    m.resource_version = None;
    m.annotations = None;
    m.creation_timestamp = None;
    m.finalizers = None;
    m.labels = None;
}

/// The metadata fields a summary decodes: those its cache keeps (see [`slim_common`]) and the
/// `resourceVersion`, from which the watcher resumes before `slim` drops it. Everything else is
/// skipped without being parsed into values, `managedFields` above all: about half of a
/// Deployment's JSON, re-sent with every status change the deployment controller writes.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct MetaFields {
    name: Option<String>,
    namespace: Option<String>,
    uid: Option<String>,
    resource_version: Option<String>,
    generation: Option<i64>,
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
        deletion_timestamp: m.deletion_timestamp,
        labels: m.labels,
        owner_references: m.owner_references,
        ..ObjectMeta::default()
    })
}

/// Makes a summary type watchable at the URLs of the kind it summarises.
macro_rules! summary_resource {
    ($summary:ty, $kind:literal, $group:literal, $version:literal, $plural:literal) => {
        impl Resource for $summary {
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

summary_resource!(DeploymentSummary, "Deployment", "apps", "v1", "deployments");
summary_resource!(PodSummary, "Pod", "", "v1", "pods");

/// What the operator reads of a worker pod; decodes from a Pod's JSON.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(from = "RawPodSummary")]
pub struct PodSummary {
    /// The pod's metadata, decoded in part ([`decode_meta`]) and cached slimmed
    /// ([`PodSummary::slim`]); its labels are in [`PodSummary::labels`] instead.
    pub metadata: ObjectMeta,
    /// The selector labels, by which pods are grouped and matched.
    pub labels: WorkerLabels,
    /// The parts of its status that are read.
    pub status: PodStatusSummary,
}

/// A pod as decoded, before its selector labels move out of the metadata.
#[derive(Deserialize)]
struct RawPodSummary {
    #[serde(default, deserialize_with = "decode_meta")]
    metadata: ObjectMeta,
    #[serde(default)]
    status: PodStatusSummary,
}

impl From<RawPodSummary> for PodSummary {
    fn from(raw: RawPodSummary) -> Self {
        let mut metadata = raw.metadata;
        let labels = WorkerLabels::take(&mut metadata);
        Self {
            metadata,
            labels,
            status: raw.status,
        }
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
    /// Moves the selector labels out of `meta`, dropping its other labels.
    fn take(meta: &mut ObjectMeta) -> Self {
        let mut labels = meta.labels.take().unwrap_or_default();
        let mut take = |key: &str| labels.remove(key).map(String::into_boxed_str);
        WorkerLabels {
            name: take(LABEL_NAME),
            instance: take(LABEL_INSTANCE),
            component: take(LABEL_COMPONENT),
            color: take(LABEL_COLOR),
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
    /// Termination message (e.g. the worker's termination log).
    pub message: Option<String>,
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

    #[test]
    fn a_deployments_json_decodes_to_the_fields_the_reconciler_reads() {
        let s: DeploymentSummary = serde_json::from_value(deployment_json()).expect("decodes");
        assert_eq!(s.metadata.name.as_deref(), Some("text-preprocess"));
        assert_eq!(s.metadata.generation, Some(3));
        assert_eq!(s.metadata.owner_references.as_ref().map(Vec::len), Some(1));
        assert_eq!(s.spec.replicas, Some(2));
        assert_eq!(s.status.observed_generation, Some(3));
        assert_eq!(s.status.replicas, Some(2));
        assert_eq!(s.status.ready_replicas, Some(1));
        assert_eq!(s.status.updated_replicas, Some(2));
    }

    #[test]
    fn converting_a_typed_deployment_gives_the_same_summary_as_decoding_its_json() {
        let typed: Deployment = serde_json::from_value(deployment_json()).expect("decodes");
        let decoded: DeploymentSummary =
            serde_json::from_value(deployment_json()).expect("decodes");
        assert_eq!(DeploymentSummary::from(typed), decoded);
    }

    #[test]
    fn decoding_skips_the_metadata_no_cache_reads_but_keeps_the_resource_version_for_the_watcher() {
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
        let m = serde_json::from_value::<DeploymentSummary>(json)
            .expect("decodes")
            .metadata;
        assert_eq!(m.resource_version.as_deref(), Some("812"));
        assert!(m.deletion_timestamp.is_some());
        assert_eq!(m.uid.as_deref(), Some("u-dep"));
        assert_eq!(m.generation, Some(3));
        assert_eq!(m.owner_references.as_ref().map(Vec::len), Some(1));
        assert_eq!(
            (
                &m.managed_fields,
                &m.annotations,
                &m.creation_timestamp,
                &m.finalizers
            ),
            (&None, &None, &None, &None)
        );
        let typed: Deployment = serde_json::from_value(deployment_json()).expect("decodes");
        let mut from_typed = DeploymentSummary::from(typed);
        from_typed.slim();
        let mut decoded: DeploymentSummary =
            serde_json::from_value(deployment_json()).expect("decodes");
        decoded.slim();
        assert_eq!(decoded, from_typed, "both paths cache the same");
    }

    #[test]
    fn a_new_deployment_without_spec_or_status_decodes_to_empty_counters() {
        let s: DeploymentSummary =
            serde_json::from_value(serde_json::json!({"metadata": {"name": "x"}}))
                .expect("decodes");
        assert_eq!(s.spec.replicas, None);
        assert_eq!(s.status, DeploymentStatusSummary::default());
    }

    #[test]
    fn it_is_addressed_like_a_deployment() {
        assert_eq!(DeploymentSummary::api_version(&()), "apps/v1");
        assert_eq!(
            DeploymentSummary::url_path(&(), Some("ml")),
            "/apis/apps/v1/namespaces/ml/deployments"
        );
    }

    fn pod_json() -> serde_json::Value {
        serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "text-preprocess-abc", "namespace": "ml",
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
                                       "lastState": {"terminated": {"exitCode": 3, "message": "model sha256 mismatch"}}}]
            }
        })
    }

    #[test]
    fn a_pods_json_decodes_to_ip_conditions_restarts_and_last_exit() {
        let s: PodSummary = serde_json::from_value(pod_json()).expect("decodes");
        assert_eq!(s.metadata.name.as_deref(), Some("text-preprocess-abc"));
        assert_eq!(s.status.pod_ip.as_deref(), Some("10.244.0.7"));
        assert!(s.is_ready());
        let c = &s.status.container_statuses[0];
        assert_eq!(c.restart_count, 2);
        assert_eq!(c.state.waiting, None);
        let last = c.last_state.terminated.as_ref().expect("last exit");
        assert_eq!(last.exit_code, 3);
        assert_eq!(last.message.as_deref(), Some("model sha256 mismatch"));
    }

    #[test]
    fn summarising_a_typed_pod_gives_the_same_as_decoding_its_json() {
        let typed: k8s_openapi::api::core::v1::Pod =
            serde_json::from_value(pod_json()).expect("decodes");
        let decoded: PodSummary = serde_json::from_value(pod_json()).expect("decodes");
        assert_eq!(PodSummary::of(&typed).expect("summarises"), decoded);
    }

    #[test]
    fn a_pod_summary_is_addressed_like_a_pod_and_is_a_fraction_of_one() {
        assert_eq!(PodSummary::api_version(&()), "v1");
        assert_eq!(
            PodSummary::url_path(&(), Some("ml")),
            "/api/v1/namespaces/ml/pods"
        );
        assert!(
            std::mem::size_of::<PodSummary>() * 4
                < std::mem::size_of::<k8s_openapi::api::core::v1::Pod>()
        );
    }

    /// Metadata as a worker object carries it on the API server: every label the operator
    /// and Kubernetes put there, annotations, owner, timestamps.
    fn full_meta(name: &str, extra_label: (&str, &str)) -> ObjectMeta {
        let stage = crate::build::Stage::Preprocess;
        let mut labels =
            crate::build::selector_labels("text", stage, Some(crate::crd::Color::Blue));
        labels.insert(
            crate::build::LABEL_MANAGED_BY.into(),
            "tandem-operator".into(),
        );
        labels.insert(crate::build::LABEL_VERSION.into(), "1".into());
        labels.insert(extra_label.0.into(), extra_label.1.into());
        serde_json::from_value(serde_json::json!({
            "name": name, "namespace": "ml", "uid": "u-obj", "resourceVersion": "812",
            "generation": 3, "generateName": "text-preprocess-blue-",
            "creationTimestamp": "2026-12-05T08:00:00Z",
            "labels": labels,
            "annotations": {"deployment.kubernetes.io/revision": "1"},
            "finalizers": ["example.com/hold"],
            "ownerReferences": [{"apiVersion": "tandem.dev/v1alpha1", "kind": "InferencePipeline",
                                 "name": "text", "uid": "u-1", "controller": true}]
        }))
        .expect("decodes")
    }

    #[test]
    fn a_slimmed_deployment_keeps_what_pruning_the_apply_record_and_owner_triggers_read() {
        let meta = full_meta("text-preprocess-blue", ("extra", "x"));
        let mut d = DeploymentSummary {
            metadata: meta.clone(),
            ..DeploymentSummary::default()
        };
        d.slim();
        let m = &d.metadata;
        assert_eq!(m.labels, None);
        assert_eq!(
            m.owner_references, meta.owner_references,
            "owner triggers need it whole"
        );
        assert_eq!((m.uid.as_deref(), m.generation), (Some("u-obj"), Some(3)));
        assert_eq!(
            (m.name.as_deref(), m.namespace.as_deref()),
            (Some("text-preprocess-blue"), Some("ml"))
        );
        assert_eq!(
            (
                &m.annotations,
                &m.creation_timestamp,
                &m.finalizers,
                &m.resource_version
            ),
            (&None, &None, &None, &None)
        );
    }

    #[test]
    fn a_decoded_pod_keeps_only_its_selector_labels_typed_and_slimming_changes_no_reading() {
        let mut json = pod_json();
        json["metadata"] = serde_json::to_value(full_meta(
            "text-preprocess-blue-abc",
            ("pod-template-hash", "5d8f"),
        ))
        .expect("encodes");
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
        assert_eq!(pod.metadata.labels, None, "no second copy in the metadata");

        let before = crate::routing::WorkerPod::from_pod(&pod);
        let mut slim = pod.clone();
        slim.slim();
        assert!(before.is_some());
        assert_eq!(crate::routing::WorkerPod::from_pod(&slim), before);
        assert_eq!(slim.labels, pod.labels);
        assert_eq!(
            crate::routing::workers_by_pipeline([&slim])
                .keys()
                .collect::<Vec<_>>(),
            [&("ml", "text")]
        );
        let m = &slim.metadata;
        assert_eq!(
            (
                &m.uid,
                &m.owner_references,
                &m.generate_name,
                &m.annotations
            ),
            (&None, &None, &None, &None)
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
    fn the_cached_form_is_a_fraction_of_a_deployment() {
        assert!(std::mem::size_of::<DeploymentSummary>() * 4 < std::mem::size_of::<Deployment>());
    }
}
