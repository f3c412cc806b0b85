//! Compact forms of owned objects for the operator's caches.
//!
//! A cached `k8s_openapi` `Deployment` is 2.4 KB before any of its strings, because its
//! optional pod template is laid out inline even when empty. The reconciler needs a Deployment's
//! metadata (labels and owner references for pruning, `generation` for the apply record),
//! `spec.replicas` and the status counters, so the watch decodes straight into
//! [`DeploymentSummary`] (serde skips the rest of the JSON) and the cache holds that.

use std::borrow::Cow;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use serde::Deserialize;

/// What the reconciler reads of a Deployment; decodes from a Deployment's JSON.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct DeploymentSummary {
    /// The Deployment's metadata (`managedFields` dropped before caching).
    #[serde(default)]
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

/// Watched and listed at the Deployment's own URLs (`apps/v1`, `deployments`).
impl Resource for DeploymentSummary {
    type DynamicType = ();
    type Scope = k8s_openapi::NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        Cow::Borrowed("Deployment")
    }

    fn group(_: &()) -> Cow<'_, str> {
        Cow::Borrowed("apps")
    }

    fn version(_: &()) -> Cow<'_, str> {
        Cow::Borrowed("v1")
    }

    fn plural(_: &()) -> Cow<'_, str> {
        Cow::Borrowed("deployments")
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
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

    #[test]
    fn the_cached_form_is_a_fraction_of_a_deployment() {
        assert!(std::mem::size_of::<DeploymentSummary>() * 4 < std::mem::size_of::<Deployment>());
    }
}
