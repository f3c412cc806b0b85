//! Whose an object of a pipeline's names is, so that the reconciler never takes over an object
//! that belongs to something else.
//!
//! A pipeline's objects have fixed names (`<name>`, `<name>-config`, ...), and the reconciler
//! applies them with server-side apply and `force`, which takes over every field it sets and
//! adds the pipeline as controlling owner. Applied over an existing Service or ServiceAccount
//! someone else made, that rewrites it, and deleting the pipeline then garbage-collects it: a
//! confused deputy for anyone who may create pipelines but not edit Services. So before an
//! object is first applied the reconciler makes sure it is either absent or already the
//! pipeline's own (an owner reference with the pipeline's UID).
//!
//! The owned-object watches (label `app.kubernetes.io/managed-by=tandem-operator`) already see
//! every object the operator made; their caches here keep only a hash of each object's
//! controlling owner's UID, 16 bytes of table per object. An object found there as the
//! pipeline's costs nothing; any other is read once (`GET`, served from the API server's
//! watch cache) before its first apply — a new pipeline's objects, or an object whose label
//! someone removed.

use std::collections::BTreeSet;
use std::hash::{DefaultHasher, Hash, Hasher};

use kube::api::ObjectMeta;

use crate::cache::Cache;

/// The controlling owners of the owned objects the watches hold, one cache per kind
/// (Deployments are in the controller's Deployment cache, which keeps their owners' UIDs).
#[derive(Clone, Debug, Default)]
pub struct Owners {
    /// ServiceAccounts.
    pub service_accounts: Cache<u64>,
    /// ConfigMaps.
    pub config_maps: Cache<u64>,
    /// Services.
    pub services: Cache<u64>,
    /// PodDisruptionBudgets.
    pub pdbs: Cache<u64>,
}

impl Owners {
    /// The cache of `kind` (as [`crate::controller`] names the owned kinds), if it has one.
    pub fn of(&self, kind: &str) -> Option<&Cache<u64>> {
        match kind {
            "ServiceAccount" => Some(&self.service_accounts),
            "ConfigMap" => Some(&self.config_maps),
            "Service" => Some(&self.services),
            "PodDisruptionBudget" => Some(&self.pdbs),
            _ => None,
        }
    }

    /// Whether the cache of `kind` holds `namespace/name` with `uid` as its controller.
    pub fn controlled_by(&self, kind: &str, namespace: &str, name: &str, uid: &str) -> bool {
        self.of(kind)
            .and_then(|c| c.get(namespace, name))
            .is_some_and(|owner| *owner == uid_hash(uid))
    }

    /// Returns once every cache holds a complete list.
    pub async fn wait_until_ready(&self) {
        futures::join!(
            self.service_accounts.wait_until_ready(),
            self.config_maps.wait_until_ready(),
            self.services.wait_until_ready(),
            self.pdbs.wait_until_ready(),
        );
    }
}

/// What a cache keeps of an object: the hash of its controlling owner's UID (0 for none).
pub fn controller_hash(meta: &ObjectMeta) -> u64 {
    controller(meta).map_or(0, |o| uid_hash(&o.uid))
}

fn uid_hash(uid: &str) -> u64 {
    let mut h = DefaultHasher::new();
    uid.hash(&mut h);
    h.finish()
}

fn controller(
    meta: &ObjectMeta,
) -> Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference> {
    meta.owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true))
}

/// Whether an object with this metadata is the pipeline's: one of its owner references carries
/// the pipeline's UID.
pub fn owned_by(meta: &ObjectMeta, pipeline_uid: &str) -> bool {
    meta.owner_references
        .iter()
        .flatten()
        .any(|o| o.uid == pipeline_uid)
}

/// Who holds an existing object that is not the pipeline's, for the message that refuses it:
/// its controller, an earlier pipeline of the same name that the garbage collector has yet to
/// remove, or the field managers that wrote it.
pub fn holder(meta: &ObjectMeta, pipeline: &str, pipeline_kind: &str) -> String {
    if let Some(c) = controller(meta) {
        return if c.kind == pipeline_kind && c.name == pipeline {
            format!(
                "it belongs to an earlier {pipeline_kind} named {pipeline} (uid {}), which the garbage collector has not removed yet",
                c.uid
            )
        } else {
            format!("it is controlled by {} {}", c.kind, c.name)
        };
    }
    let managers: BTreeSet<&str> = meta
        .managed_fields
        .iter()
        .flatten()
        .filter_map(|m| m.manager.as_deref())
        .collect();
    if managers.is_empty() {
        "it has no controlling owner".to_owned()
    } else {
        let list: Vec<&str> = managers.into_iter().take(3).collect();
        format!(
            "it has no controlling owner and was written by {}",
            list.join(", ")
        )
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ManagedFieldsEntry, OwnerReference};

    use super::*;

    fn owner(kind: &str, name: &str, uid: &str, controller: bool) -> OwnerReference {
        OwnerReference {
            api_version: "tandem.dev/v1alpha1".into(),
            kind: kind.into(),
            name: name.into(),
            uid: uid.into(),
            controller: Some(controller),
            ..OwnerReference::default()
        }
    }

    fn meta(owners: Vec<OwnerReference>, managers: &[&str]) -> ObjectMeta {
        ObjectMeta {
            namespace: Some("ml".into()),
            name: Some("embed-config".into()),
            owner_references: Some(owners),
            managed_fields: Some(
                managers
                    .iter()
                    .map(|m| ManagedFieldsEntry {
                        manager: Some((*m).to_owned()),
                        ..ManagedFieldsEntry::default()
                    })
                    .collect(),
            ),
            ..ObjectMeta::default()
        }
    }

    #[test]
    fn an_object_is_the_pipelines_only_with_an_owner_reference_to_its_uid() {
        let ours = meta(vec![owner("InferencePipeline", "embed", "u-1", true)], &[]);
        assert!(owned_by(&ours, "u-1"));
        // Same name, another incarnation of the pipeline.
        assert!(!owned_by(&ours, "u-2"));
        assert!(!owned_by(&meta(vec![], &["kubectl-create"]), "u-1"));
    }

    #[test]
    fn the_caches_match_the_controllers_uid_per_kind() {
        let owners = Owners::default();
        let cm = k8s_openapi::api::core::v1::ConfigMap {
            metadata: meta(vec![owner("InferencePipeline", "embed", "u-1", true)], &[]),
            ..Default::default()
        };
        owners.config_maps.apply(
            &kube::runtime::watcher::Event::Apply(cm.clone()),
            |c: &k8s_openapi::api::core::v1::ConfigMap| controller_hash(&c.metadata),
        );
        assert!(owners.controlled_by("ConfigMap", "ml", "embed-config", "u-1"));
        assert!(!owners.controlled_by("ConfigMap", "ml", "embed-config", "u-2"));
        // Another kind of the same name is not that ConfigMap.
        assert!(!owners.controlled_by("Service", "ml", "embed-config", "u-1"));
        assert!(!owners.controlled_by("ConfigMap", "other", "embed-config", "u-1"));
        // A non-controlling owner reference does not count as control.
        let shared = meta(vec![owner("InferencePipeline", "embed", "u-1", false)], &[]);
        assert_eq!(controller_hash(&shared), 0);
    }

    #[test]
    fn the_holder_names_the_controller_an_earlier_pipeline_or_the_writers() {
        let by_rs = meta(vec![owner("ReplicaSet", "web-5d9f", "u-9", true)], &[]);
        assert_eq!(
            holder(&by_rs, "embed", "InferencePipeline"),
            "it is controlled by ReplicaSet web-5d9f"
        );
        let earlier = meta(vec![owner("InferencePipeline", "embed", "u-0", true)], &[]);
        assert_eq!(
            holder(&earlier, "embed", "InferencePipeline"),
            "it belongs to an earlier InferencePipeline named embed (uid u-0), which the garbage collector has not removed yet"
        );
        let other_pipeline = meta(vec![owner("InferencePipeline", "chat", "u-5", true)], &[]);
        assert_eq!(
            holder(&other_pipeline, "embed", "InferencePipeline"),
            "it is controlled by InferencePipeline chat"
        );
        let by_hand = meta(
            vec![],
            &["kubectl-client-side-apply", "kubectl-edit", "kubectl-edit"],
        );
        assert_eq!(
            holder(&by_hand, "embed", "InferencePipeline"),
            "it has no controlling owner and was written by kubectl-client-side-apply, kubectl-edit"
        );
        assert_eq!(
            holder(&meta(vec![], &[]), "embed", "InferencePipeline"),
            "it has no controlling owner"
        );
    }
}
