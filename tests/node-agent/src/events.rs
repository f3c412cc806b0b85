//! Kubernetes Events about pods (`kubectl describe pod` shows them), written fire-and-forget:
//! an Event that cannot be written is only logged.

use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};

/// Event type for normal progress.
pub const NORMAL: &str = "Normal";
/// Event type for problems.
pub const WARNING: &str = "Warning";

/// The Event object for `pod` (pure).
pub fn build(
    pod: &Pod,
    container: Option<&str>,
    type_: &str,
    reason: &str,
    message: &str,
    now: Timestamp,
) -> Event {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    Event {
        metadata: ObjectMeta {
            generate_name: Some(format!("{name}.")),
            namespace: Some(ns.clone()),
            ..ObjectMeta::default()
        },
        involved_object: ObjectReference {
            api_version: Some("v1".to_owned()),
            kind: Some("Pod".to_owned()),
            name: Some(name),
            namespace: Some(ns),
            uid: pod.metadata.uid.clone(),
            field_path: container.map(|c| format!("spec.containers{{{c}}}")),
            ..ObjectReference::default()
        },
        type_: Some(type_.to_owned()),
        reason: Some(reason.to_owned()),
        message: Some(message.to_owned()),
        count: Some(1),
        first_timestamp: Some(Time(now)),
        last_timestamp: Some(Time(now)),
        source: Some(EventSource {
            component: Some("tandem-node-agent".to_owned()),
            host: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
        }),
        reporting_component: Some("tandem-node-agent".to_owned()),
        reporting_instance: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
        ..Event::default()
    }
}

/// Writes an Event in the background.
pub fn emit(
    client: &kube::Client,
    pod: &Pod,
    container: Option<&str>,
    type_: &str,
    reason: &str,
    message: &str,
) {
    let event = build(pod, container, type_, reason, message, Timestamp::now());
    let api: Api<Event> = Api::namespaced(
        client.clone(),
        pod.metadata.namespace.as_deref().unwrap_or("default"),
    );
    tokio::spawn(async move {
        if let Err(e) = api.create(&PostParams::default(), &event).await {
            tracing::debug!(error = %e, "writing event");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_point_at_the_pod_and_its_container() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "n", "uid": "u"},
            "spec": {"nodeName": "tandem-node-1", "containers": [{"name": "c"}]}
        }))
        .expect("pod");
        let e = build(
            &pod,
            Some("c"),
            WARNING,
            "BackOff",
            "back-off 2s",
            Timestamp::UNIX_EPOCH,
        );
        assert_eq!(e.involved_object.uid.as_deref(), Some("u"));
        assert_eq!(
            e.involved_object.field_path.as_deref(),
            Some("spec.containers{c}")
        );
        assert_eq!(e.metadata.namespace.as_deref(), Some("n"));
        assert_eq!(e.reason.as_deref(), Some("BackOff"));
    }
}
