//! Kubernetes Events for transitions that carry their own numbers (scale decisions, rollout
//! steps). Created directly with `events.k8s.io/v1` rather than through kube's `Recorder`,
//! which folds Events with the same reason into one series and keeps only the first note:
//! "50% of traffic on green" and "100% of traffic on blue" must both be readable.

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::{Client, ResourceExt};

use crate::crd::InferencePipeline;

/// One Event about a pipeline.
#[derive(Clone, Debug)]
pub struct Note<'a> {
    /// What the operator did: `Scale`, `Rollout`.
    pub action: &'a str,
    /// PascalCase reason.
    pub reason: &'a str,
    /// Human-readable message with the numbers.
    pub note: String,
    /// `Warning` instead of `Normal`.
    pub warning: bool,
    /// A short word that keeps names of Events created in the same nanosecond apart.
    pub discriminator: &'a str,
}

/// Creates the Event; `identity` is the reporting operator replica.
pub async fn create(
    client: &Client,
    identity: &str,
    p: &InferencePipeline,
    n: Note<'_>,
    stamp: Timestamp,
) -> Result<(), kube::Error> {
    let ns = p.namespace().unwrap_or_default();
    let name = p.name_any();
    let event = Event {
        metadata: ObjectMeta {
            name: Some(format!(
                "{name}.{}.{:x}",
                n.discriminator,
                stamp.as_nanosecond()
            )),
            namespace: Some(ns.clone()),
            ..ObjectMeta::default()
        },
        event_time: Some(MicroTime(stamp)),
        action: Some(n.action.to_owned()),
        reason: Some(n.reason.to_owned()),
        note: Some(n.note),
        type_: Some(if n.warning { "Warning" } else { "Normal" }.to_owned()),
        regarding: Some(ObjectReference {
            api_version: Some("tandem.dev/v1alpha1".to_owned()),
            kind: Some("InferencePipeline".to_owned()),
            name: Some(name),
            namespace: Some(ns.clone()),
            uid: p.uid(),
            ..ObjectReference::default()
        }),
        reporting_controller: Some(crate::controller::FIELD_MANAGER.to_owned()),
        reporting_instance: Some(identity.to_owned()),
        ..Event::default()
    };
    let api: Api<Event> = Api::namespaced(client.clone(), &ns);
    api.create(&PostParams::default(), &event).await.map(|_| ())
}
