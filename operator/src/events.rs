//! The operator's Kubernetes Events (status transitions, scale decisions, rollout steps),
//! created directly with `events.k8s.io/v1` rather than through kube's `Recorder`. The
//! `Recorder` folds Events with the same reason into one series and keeps only the first note
//! ("50% of traffic on green" and "100% of traffic on blue" must both be readable), and it
//! keeps a copy of every Event it published for six minutes: 1.8 MB of heap, and a scan of
//! them all on each publish, after 1,000 pipelines each changed condition once.

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, ObjectMeta, PostParams};

use crate::crd::InferencePipeline;
use crate::validate::PipelineMeta;

/// The pipeline an Event is about.
#[derive(Clone, Copy, Debug)]
pub struct Regarding<'a> {
    /// `metadata.namespace`.
    pub namespace: &'a str,
    /// `metadata.name`.
    pub name: &'a str,
    /// `metadata.uid`, so the Event follows this pipeline and not a later one of that name.
    pub uid: Option<&'a str>,
}

impl<'a> From<&'a InferencePipeline> for Regarding<'a> {
    fn from(p: &'a InferencePipeline) -> Self {
        Regarding {
            namespace: p.metadata.namespace.as_deref().unwrap_or_default(),
            name: p.metadata.name.as_deref().unwrap_or_default(),
            uid: p.metadata.uid.as_deref(),
        }
    }
}

impl<'a> From<&'a PipelineMeta> for Regarding<'a> {
    fn from(m: &'a PipelineMeta) -> Self {
        Regarding {
            namespace: &m.namespace,
            name: &m.name,
            uid: Some(&m.uid),
        }
    }
}

/// One Event about a pipeline.
#[derive(Clone, Debug)]
pub struct Note<'a> {
    /// What the operator did: `Reconcile`, `Scale`, `Rollout`.
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
    regarding: Regarding<'_>,
    n: Note<'_>,
    stamp: Timestamp,
) -> Result<(), kube::Error> {
    let event = event(identity, regarding, n, stamp);
    let api: Api<Event> = Api::namespaced(client.clone(), regarding.namespace);
    api.create(&PostParams::default(), &event).await.map(|_| ())
}

fn event(identity: &str, regarding: Regarding<'_>, n: Note<'_>, stamp: Timestamp) -> Event {
    let Regarding {
        namespace: ns,
        name,
        uid,
    } = regarding;
    Event {
        metadata: ObjectMeta {
            name: Some(format!(
                "{name}.{}.{:x}",
                n.discriminator,
                stamp.as_nanosecond()
            )),
            namespace: Some(ns.to_owned()),
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
            name: Some(name.to_owned()),
            namespace: Some(ns.to_owned()),
            uid: uid.map(str::to_owned),
            ..ObjectReference::default()
        }),
        reporting_controller: Some(crate::controller::FIELD_MANAGER.to_owned()),
        reporting_instance: Some(identity.to_owned()),
        ..Event::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn note(warning: bool) -> Note<'static> {
        Note {
            action: "Reconcile",
            reason: "PodsUnschedulable",
            note: "0/2 inference pods ready: Insufficient nvidia.com/gpu".into(),
            warning,
            discriminator: "reconcile",
        }
    }

    #[test]
    fn an_event_names_its_pipeline_by_uid_and_keeps_its_own_note() {
        let meta = PipelineMeta {
            name: "embed".into(),
            namespace: "ml".into(),
            uid: "u-1".into(),
            generation: Some(3),
        };
        let stamp = Timestamp::from_nanosecond(255).unwrap();
        let e = event("op-0", (&meta).into(), note(true), stamp);
        assert_eq!(e.metadata.name.as_deref(), Some("embed.reconcile.ff"));
        assert_eq!(e.metadata.namespace.as_deref(), Some("ml"));
        assert_eq!(e.type_.as_deref(), Some("Warning"));
        assert_eq!(
            e.note.as_deref(),
            Some("0/2 inference pods ready: Insufficient nvidia.com/gpu")
        );
        assert!(e.series.is_none(), "each transition is its own Event");
        let r = e.regarding.unwrap();
        assert_eq!(
            (r.kind.as_deref(), r.name.as_deref(), r.namespace.as_deref()),
            (Some("InferencePipeline"), Some("embed"), Some("ml"))
        );
        assert_eq!(r.uid.as_deref(), Some("u-1"));
        assert_eq!(e.reporting_instance.as_deref(), Some("op-0"));
        let normal = event("op-0", (&meta).into(), note(false), stamp);
        assert_eq!(normal.type_.as_deref(), Some("Normal"));
    }

    #[test]
    fn a_cached_pipeline_converts_to_what_an_event_regards() {
        let p = crate::test_fixtures::text_pipeline();
        let r = Regarding::from(&p);
        assert_eq!((r.namespace, r.name), ("ml", "minilm"));
        assert_eq!(r.uid, p.metadata.uid.as_deref());
        assert!(r.uid.is_some());
    }
}
