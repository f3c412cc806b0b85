//! The operator's Kubernetes Events (status transitions, scale decisions, rollout steps),
//! created directly with `events.k8s.io/v1` rather than through kube's `Recorder`. The
//! `Recorder` folds Events with the same reason into one series and keeps only the first note
//! ("50% of traffic on green" and "100% of traffic on blue" must both be readable), and it
//! keeps a copy of every Event it published for six minutes: 1.8 MB of heap, and a scan of
//! them all on each publish, after 1,000 pipelines each changed condition once.
//!
//! They are created in the background by a [`Publisher`], as client-go's event broadcaster
//! does: a reconcile, a scale decision or a rollout step hands its Event over and goes on,
//! instead of waiting for one more API round trip.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, ObjectMeta, PostParams};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::warn;

use crate::crd::InferencePipeline;
use crate::metrics::{Metrics, Unpublished};
use crate::validate::PipelineMeta;

/// Events waiting to be created; past this many, new ones are dropped and counted (client-go's
/// broadcaster drops too). At ~10 ms per Event that is ten seconds of backlog.
pub const QUEUE_CAPACITY: usize = 1024;

/// How long one Event's creation may take before it is given up (and counted as failed), so
/// a hung API server fills the queue instead of holding it forever.
pub const CREATE_TIMEOUT: Duration = Duration::from_secs(10);

/// Hands Events to a background task that creates them one at a time, in the order they were
/// published. Cheap to clone; the task ends when every clone is dropped and the queue is empty.
#[derive(Clone)]
pub struct Publisher {
    tx: mpsc::Sender<Pending>,
    metrics: Arc<Metrics>,
}

/// An Event waiting in the queue, owning what [`Regarding`] and [`Note`] borrow.
struct Pending {
    namespace: String,
    name: String,
    uid: Option<String>,
    action: String,
    reason: String,
    note: String,
    warning: bool,
    discriminator: String,
    stamp: Timestamp,
}

impl Publisher {
    /// Starts the task that creates the published Events as `identity`.
    pub fn start(
        client: Client,
        identity: String,
        metrics: Arc<Metrics>,
    ) -> (Self, JoinHandle<()>) {
        Self::start_with_timeout(client, identity, metrics, CREATE_TIMEOUT)
    }

    fn start_with_timeout(
        client: Client,
        identity: String,
        metrics: Arc<Metrics>,
        timeout: Duration,
    ) -> (Self, JoinHandle<()>) {
        let (tx, mut rx) = mpsc::channel::<Pending>(QUEUE_CAPACITY);
        let counts = metrics.clone();
        let task = tokio::spawn(async move {
            while let Some(p) = rx.recv().await {
                let Pending {
                    namespace,
                    name,
                    uid,
                    action,
                    reason,
                    note,
                    warning,
                    discriminator,
                    stamp,
                } = p;
                let regarding = Regarding {
                    namespace: &namespace,
                    name: &name,
                    uid: uid.as_deref(),
                };
                let note = Note {
                    action: &action,
                    reason: &reason,
                    note,
                    warning,
                    discriminator: &discriminator,
                };
                let created = tokio::time::timeout(
                    timeout,
                    create(&client, &identity, regarding, note, stamp),
                )
                .await;
                let error = match created {
                    Ok(Ok(())) => continue,
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => format!("no answer within {} ms", timeout.as_millis()),
                };
                counts.count_unpublished_event(Unpublished::Failed);
                warn!(
                    error,
                    pipeline = %format!("{namespace}/{name}"),
                    %reason,
                    "creating Event failed"
                );
            }
        });
        (Self { tx, metrics }, task)
    }

    /// Queues an Event about `regarding`; never waits. Returns whether it was queued: not when
    /// the queue is full (the Event is dropped, logged and counted) or the task has stopped.
    pub fn publish(&self, regarding: Regarding<'_>, n: Note<'_>, stamp: Timestamp) -> bool {
        let pending = Pending {
            namespace: regarding.namespace.to_owned(),
            name: regarding.name.to_owned(),
            uid: regarding.uid.map(str::to_owned),
            action: n.action.to_owned(),
            reason: n.reason.to_owned(),
            note: n.note,
            warning: n.warning,
            discriminator: n.discriminator.to_owned(),
            stamp,
        };
        match self.tx.try_send(pending) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(p)) => {
                self.metrics.count_unpublished_event(Unpublished::QueueFull);
                warn!(
                    pipeline = %format!("{}/{}", p.namespace, p.name),
                    reason = %p.reason,
                    capacity = QUEUE_CAPACITY,
                    "Event queue full; dropping the Event"
                );
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }
}

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

/// Creates the Event; `identity` is the reporting operator replica. Only the [`Publisher`]'s
/// task calls it.
async fn create(
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

    /// A client for an API server that accepts connections and never answers; the receiver
    /// gets each connection.
    async fn unanswering_api_server() -> (Client, mpsc::UnboundedReceiver<tokio::net::TcpStream>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let _ = tx.send(stream);
            }
        });
        let config = kube::Config::new(format!("http://{addr}").parse().unwrap());
        (Client::try_from(config).unwrap(), rx)
    }

    fn meta() -> PipelineMeta {
        PipelineMeta {
            name: "embed".into(),
            namespace: "ml".into(),
            uid: "u-1".into(),
            generation: Some(1),
        }
    }

    fn unpublished(metrics: &Metrics, why: &str) -> bool {
        let text = metrics.encode().unwrap();
        text.contains(&format!(
            "tandem_operator_events_unpublished_total{{why=\"{why}\"}} 1"
        ))
    }

    /// The first Event hangs in the background task on an API server that never answers;
    /// publishing goes on regardless until the queue is full, and the Event after that is
    /// dropped and counted instead of waiting.
    #[tokio::test]
    async fn publishing_does_not_wait_for_the_api_server_and_drops_events_past_a_full_queue() {
        let (client, mut conns) = unanswering_api_server().await;
        let metrics = Arc::new(Metrics::new());
        let (events, _task) = Publisher::start(client, "op-0".into(), metrics.clone());
        let stamp = Timestamp::from_nanosecond(1).unwrap();
        let meta = meta();
        assert!(events.publish((&meta).into(), note(false), stamp));
        // The task has taken the first Event once it connects to create it.
        conns
            .recv()
            .await
            .expect("the task connects to create the Event");
        for i in 0..QUEUE_CAPACITY {
            assert!(
                events.publish((&meta).into(), note(false), stamp),
                "Event {i} fits in the queue"
            );
        }
        assert!(!unpublished(&metrics, "QueueFull"));
        assert!(
            !events.publish((&meta).into(), note(true), stamp),
            "the queue is full"
        );
        assert!(
            unpublished(&metrics, "QueueFull"),
            "the dropped Event is counted"
        );
    }

    /// An Event the API server never answers is given up after the timeout and counted, and
    /// the task, its publishers gone, then ends instead of waiting on it.
    #[tokio::test]
    async fn an_unanswered_event_is_given_up_after_the_timeout_and_counted_as_failed() {
        let (client, _conns) = unanswering_api_server().await;
        let metrics = Arc::new(Metrics::new());
        let timeout = Duration::from_millis(50);
        let (events, task) =
            Publisher::start_with_timeout(client, "op-0".into(), metrics.clone(), timeout);
        let meta = meta();
        assert!(events.publish((&meta).into(), note(false), Timestamp::now()));
        drop(events);
        tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("the task ends after giving the Event up")
            .unwrap();
        assert!(unpublished(&metrics, "Failed"));
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
