//! Keeps every preprocess pod's routing table current. Watches the operator's worker
//! pods, builds each pipeline's desired table ([`crate::routing`]), numbers it when its
//! content changes and pushes it with `WorkerControl.SetRoutes` to every preprocess pod
//! that has an address — including pods that are not Ready yet, since a preprocess pod
//! only becomes Ready once it holds a table. Runs on the leader only.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::cache::Cache;
use crate::control_auth::{self, ControlKeys, Tokens};
use futures::StreamExt;
use futures::future::join_all;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tandem_proto::tandem::v1::worker_control_client::WorkerControlClient;
use tandem_proto::tandem::v1::{RoutingTable, SetRoutesRequest};
use tracing::{debug, info, warn};

use crate::build::{APP_NAME, LABEL_MANAGED_BY, LABEL_NAME, MANAGED_BY, Stage};
use crate::crd::InferencePipeline;
use crate::routing::{
    desired_table, namespaced_name, next_generation, same_routes, workers_by_pipeline,
};
use crate::summary::{PodSummary, WatchedPod};

/// Router settings.
#[derive(Clone, Debug)]
pub struct RouterConfig {
    /// How often tables are recomputed and unacknowledged pods retried.
    pub interval: Duration,
    /// Limit for one `SetRoutes` call, connection included.
    pub push_timeout: Duration,
    /// Tables are pushed again to every pod this often, acknowledged or not.
    pub refresh: Duration,
    /// Derives the token each pipeline's pods require (see [`crate::control_auth`]); none
    /// when unset.
    pub control_key: Option<ControlKeys>,
}

impl Default for RouterConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_millis(250),
            push_timeout: Duration::from_secs(1),
            refresh: Duration::from_secs(30),
            control_key: None,
        }
    }
}

/// The table a pipeline's pods should hold and which pods acknowledged it.
#[derive(Default)]
struct PipelineRoutes {
    table: Option<Arc<RoutingTable>>,
    /// Pod name → (restart count, generation) it acknowledged.
    acked: HashMap<String, (i32, u64)>,
    /// Pods that reported a newer table than this operator ever numbered: pushed with
    /// `replace` until they hold this operator's table.
    replace: HashSet<String>,
}

/// Routing tables as last numbered, per pipeline `(namespace, name)`. The rollout driver reads
/// them to know which generation the preprocess pods must report before a step counts. The
/// router updates an entry when the pipeline's table changes and drops it with the pipeline;
/// the tables are shared with the router's own state, not copied.
pub type Published = Arc<Mutex<HashMap<(String, String), Arc<RoutingTable>>>>;

/// Counts the events the pipeline and worker-pod watches have applied to their caches, so that
/// the router can tell that nothing it reads changed since its last pass. Each watch notes an
/// event after its cache holds it.
#[derive(Clone, Debug, Default)]
pub struct CacheChanges(Arc<AtomicU64>);

impl CacheChanges {
    /// One more event is in a cache.
    pub fn note(&self) {
        self.0.fetch_add(1, Ordering::Release);
    }

    /// Events so far; a reader that sees a count also sees the caches as of that event.
    pub fn count(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }
}

/// A cache of the operator's worker pods (labels, status and deletion only) and the watch that
/// fills it; spawn the future. Shared by the router, the rollout driver and the autoscaler.
/// Every event is noted in `changes` once the cache holds it. A pod whose containers start
/// failing, or fail differently (a crash loop, an image that cannot be pulled), sends its
/// pipeline's `(namespace, name)` to `failing`: nothing else about the pipeline changes then,
/// and its status should say so without waiting for the next periodic reconcile.
pub fn watch_pods(
    client: Client,
    namespace: Option<&str>,
    page_size: u32,
    changes: CacheChanges,
    failing: tokio::sync::mpsc::Sender<(String, String)>,
) -> (
    Cache<PodSummary>,
    impl std::future::Future<Output = ()> + Send + 'static,
) {
    let pods: Api<WatchedPod> = match namespace {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::all(client),
    };
    let selector = format!("{LABEL_MANAGED_BY}={MANAGED_BY},{LABEL_NAME}={APP_NAME}");
    let store = Cache::<PodSummary>::default();
    let watch = watcher(
        pods,
        watcher::Config::default()
            .labels(&selector)
            .page_size(page_size),
    )
    // Only the name, selector labels, status and deletion matter here (the watched form skips
    // the spec while decoding, the summary keeps no metadata): keep the cache small.
    .default_backoff()
    .inspect({
        let store = store.clone();
        move |ev| {
            if let Ok(watcher::Event::Apply(pod)) = ev
                && let Some(pipeline) = newly_failing(&store, &PodSummary::from(pod))
            {
                // A full queue drops it: the periodic reconcile still comes.
                let _ = failing.try_send(pipeline);
            }
        }
    })
    .inspect(store.writer(|p| PodSummary::from(p)))
    .for_each(move |event| {
        match event {
            Ok(_) => changes.note(),
            // e.g. a missing `watch pods` permission: say so, the backoff retries.
            Err(e) => warn!(error = %e, "watching worker pods failed"),
        }
        futures::future::ready(())
    });
    (store, watch)
}

/// The pod's pipeline, when the pod now has a `PodsFailing` problem it did not have (with this
/// message) in `store`.
fn newly_failing(store: &Cache<PodSummary>, pod: &PodSummary) -> Option<(String, String)> {
    let failing = |p: &PodSummary| {
        crate::status::pod_problem([p])
            .filter(|problem| problem.reason == "PodsFailing")
            .map(|problem| problem.message)
    };
    let now = failing(pod)?;
    let before = store
        .get(&pod.namespace, &pod.name)
        .and_then(|old| failing(&old));
    if before.as_deref() == Some(now.as_str()) {
        return None;
    }
    let pipeline = pod.labels.instance.as_deref()?;
    Some((pod.namespace.to_string(), pipeline.to_owned()))
}

/// Runs until the task is dropped or aborted.
pub async fn run(
    pipelines: Cache<InferencePipeline>,
    store: Cache<PodSummary>,
    changes: CacheChanges,
    published: Published,
    cfg: RouterConfig,
) {
    let mut state: HashMap<(String, String), PipelineRoutes> = HashMap::new();
    let mut ticker = tokio::time::interval(cfg.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_refresh = Instant::now();
    let mut last = Pass {
        changes: None,
        settled: false,
    };
    loop {
        ticker.tick().await;
        let refresh = last_refresh.elapsed() >= cfg.refresh;
        if refresh {
            for routes in state.values_mut() {
                routes.acked.clear();
            }
            last_refresh = Instant::now();
        }
        // Read before the pass: an event during it makes the next tick pass again.
        let now = changes.count();
        if !last.needed(refresh, now) {
            continue;
        }
        last = Pass {
            changes: Some(now),
            settled: sync_once(&pipelines, &store, &mut state, &published, &cfg).await,
        };
    }
}

/// What the router's last pass saw and left.
#[derive(Clone, Copy, Debug)]
struct Pass {
    /// [`CacheChanges::count`] when it started.
    changes: Option<u64>,
    /// It had nothing to push: every preprocess pod with an address held the current table.
    settled: bool,
}

impl Pass {
    /// Whether the next tick must pass over every pipeline again: the caches changed (a table
    /// may differ), a push is outstanding or failed (retried each tick), or it is time to
    /// re-push every table. Otherwise a pass would compute the same tables and push nothing;
    /// skipping it is most of an idle operator's work at 1,000 pipelines.
    fn needed(self, refresh: bool, changes: u64) -> bool {
        refresh || !self.settled || self.changes != Some(changes)
    }
}

/// One pass over every pipeline; true when it had nothing to push.
async fn sync_once(
    pipelines: &Cache<InferencePipeline>,
    pods: &Cache<PodSummary>,
    state: &mut HashMap<(String, String), PipelineRoutes>,
    published: &Published,
    cfg: &RouterConfig,
) -> bool {
    let snapshot = pipelines.state();
    let all_pods = pods.state();
    let mut by_pipeline = workers_by_pipeline(all_pods.iter().map(AsRef::as_ref));
    let mut seen = HashSet::new();
    let mut pushes = Vec::new();
    for pipeline in &snapshot {
        let Some((ns, name)) = namespaced_name(&pipeline.metadata) else {
            continue;
        };
        let workers = by_pipeline.remove(&(ns, name)).unwrap_or_default();
        let key = (ns.to_owned(), name.to_owned());
        seen.insert(key.clone());
        // Derived at the pipeline's first push of this pass: most passes push nothing.
        let mut token: Option<Arc<Tokens>> = None;
        let routes = state.entry(key.clone()).or_default();
        let mut desired = desired_table(pipeline, &workers);
        match &routes.table {
            Some(held) if same_routes(held, &desired) => desired.generation = held.generation,
            held => {
                let previous = held.as_ref().map_or(0, |t| t.generation);
                desired.generation = next_generation(previous, unix_millis());
                info!(
                    pipeline = %format!("{ns}/{name}"),
                    generation = desired.generation,
                    endpoints = desired.colors.iter().map(|c| c.endpoints.len()).sum::<usize>(),
                    "routing table changed"
                );
                let table = Arc::new(desired.clone());
                routes.table = Some(table.clone());
                if let Ok(mut p) = published.lock() {
                    p.insert(key, table);
                }
            }
        }
        routes
            .acked
            .retain(|pod, _| workers.iter().any(|w| &w.name == pod));
        routes
            .replace
            .retain(|pod| workers.iter().any(|w| &w.name == pod));
        // Draining pods too: requests they hold (an inference stage scaling from zero) are
        // only served once they learn the new endpoints.
        for w in workers.iter().filter(|w| w.stage == Stage::Preprocess) {
            let Some(address) = w.control_address() else {
                continue;
            };
            if routes.acked.get(&w.name) == Some(&(w.restarts, desired.generation)) {
                continue;
            }
            let request = SetRoutesRequest {
                table: Some(desired.clone()),
                replace: routes.replace.contains(&w.name),
            };
            if token.is_none()
                && let Some(k) = &cfg.control_key
            {
                let uid = pipeline.metadata.uid.as_deref().unwrap_or_default();
                token = Some(Arc::new(k.tokens(ns, name, uid)));
            }
            pushes.push((
                (ns.to_owned(), name.to_owned()),
                w.name.clone(),
                w.restarts,
                push(address, request, token.clone(), cfg.push_timeout),
            ));
        }
    }
    state.retain(|key, _| seen.contains(key));
    if let Ok(mut p) = published.lock() {
        p.retain(|key, _| seen.contains(key));
    }

    if pushes.is_empty() {
        return true;
    }
    let keys: Vec<_> = pushes
        .iter()
        .map(|(k, pod, restarts, _)| (k.clone(), pod.clone(), *restarts))
        .collect();
    let results = join_all(pushes.into_iter().map(|(_, _, _, fut)| fut)).await;
    for ((key, pod, restarts), result) in keys.into_iter().zip(results) {
        let Some(routes) = state.get_mut(&key) else {
            continue;
        };
        let wanted = routes.table.as_ref().map_or(0, |t| t.generation);
        match result {
            Ok(applied) if applied == wanted => {
                routes.replace.remove(&pod);
                routes.acked.insert(pod, (restarts, wanted));
            }
            // This operator numbers its tables from the clock and never goes back, so a newer
            // one came from elsewhere (anything that can reach the pod's control port, or a
            // leader whose clock ran ahead): it must not pin the pod for good.
            Ok(applied) if applied > wanted => {
                warn!(
                    pipeline = %format!("{}/{}", key.0, key.1),
                    pod = %pod,
                    applied,
                    wanted,
                    "preprocess pod holds a routing table this operator did not push; replacing it"
                );
                routes.replace.insert(pod);
            }
            Ok(applied) => {
                warn!(pod = %pod, applied, wanted, "preprocess pod kept an older routing table")
            }
            // Pods that are still starting refuse connections: retried next tick.
            Err(e) => debug!(pod = %pod, error = %e, "SetRoutes failed"),
        }
    }
    false
}

async fn push(
    address: String,
    request: SetRoutesRequest,
    tokens: Option<Arc<Tokens>>,
    timeout: Duration,
) -> Result<u64, PushError> {
    let call = async {
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
            .map_err(|e| PushError::Address(address.clone(), e.to_string()))?
            .connect_timeout(timeout)
            .timeout(timeout);
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| PushError::Connect(e.to_string()))?;
        let client = WorkerControlClient::new(channel);
        // A pod not yet replaced after a key rotation takes the previous token.
        let reply = control_auth::call(tokens.as_deref(), |token| {
            let mut client = client.clone();
            let request = control_auth::request(request.clone(), token);
            async move { client.set_routes(request).await }
        })
        .await
        .map_err(|s| PushError::Rejected(s.code(), s.message().to_owned()))?;
        Ok(reply.into_inner().applied_generation)
    };
    tokio::time::timeout(timeout * 2, call)
        .await
        .map_err(|_| PushError::Timeout)?
}

fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Why one push failed.
#[derive(Debug, thiserror::Error)]
enum PushError {
    #[error("invalid control address {0}: {1}")]
    Address(String, String),
    #[error("connecting: {0}")]
    Connect(String),
    #[error("SetRoutes answered {0:?}: {1}")]
    Rejected(tonic::Code, String),
    #[error("timed out")]
    Timeout,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A worker pod of pipeline `minilm` in `ml`, its container waiting for `waiting`.
    fn worker_pod(waiting: Option<(&str, i32)>) -> k8s_openapi::api::core::v1::Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "minilm-inference-blue-x", "namespace": "ml",
                         "labels": {"app.kubernetes.io/instance": "minilm",
                                    "app.kubernetes.io/component": "inference"}},
            "status": {"containerStatuses": [{
                "name": "inference", "image": "w", "imageID": "", "ready": false,
                "restartCount": 2,
                "state": match waiting {
                    Some((reason, _)) => serde_json::json!({"waiting": {"reason": reason}}),
                    None => serde_json::json!({"running": {}}),
                },
                "lastState": match waiting {
                    Some((_, code)) => serde_json::json!({"terminated": {"exitCode": code}}),
                    None => serde_json::json!({}),
                },
            }]}
        }))
        .expect("a pod")
    }

    #[test]
    fn a_pod_that_starts_failing_names_its_pipeline_once_per_new_failure() {
        let store = Cache::<PodSummary>::default();
        let summary = |p: &k8s_openapi::api::core::v1::Pod| PodSummary::of(p).expect("summary");
        let starting = worker_pod(None);
        store.apply(&watcher::Event::Apply(starting.clone()), summary);
        let crashing = worker_pod(Some(("CrashLoopBackOff", 1)));
        assert_eq!(
            newly_failing(&store, &summary(&crashing)),
            Some(("ml".to_owned(), "minilm".to_owned()))
        );
        store.apply(&watcher::Event::Apply(crashing.clone()), summary);
        assert_eq!(
            newly_failing(&store, &summary(&crashing)),
            None,
            "the same failure again"
        );
        let other = worker_pod(Some(("CrashLoopBackOff", 137)));
        assert!(
            newly_failing(&store, &summary(&other)).is_some(),
            "a new exit"
        );
        assert_eq!(
            newly_failing(&store, &summary(&starting)),
            None,
            "not failing"
        );
        let unschedulable: k8s_openapi::api::core::v1::Pod =
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "p", "namespace": "ml",
                             "labels": {"app.kubernetes.io/instance": "minilm"}},
                "status": {"conditions": [{"type": "PodScheduled", "status": "False",
                                           "reason": "Unschedulable", "message": "0/1 nodes"}]}
            }))
            .expect("a pod");
        assert_eq!(
            newly_failing(&store, &summary(&unschedulable)),
            None,
            "a Pending pod is reported by the Deployment's reconcile, not per pod event"
        );
    }

    /// A preprocess pod's `SetRoutes` as the worker answers it: a lower generation than the
    /// one held is ignored unless `replace`. Records each request's `replace` and
    /// `authorization` metadata.
    #[derive(Clone)]
    struct FakePod {
        held: Arc<Mutex<u64>>,
        replaces: Arc<Mutex<Vec<bool>>>,
        authorization: Arc<Mutex<Vec<Option<String>>>>,
        /// Set: the only `authorization` value taken, as a worker started with a token.
        accepts: Arc<Mutex<Option<String>>>,
    }

    /// A fake pod, its server task, and the caches that hold it and its pipeline.
    type Served = (
        FakePod,
        tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
        Cache<InferencePipeline>,
        Cache<PodSummary>,
    );

    impl FakePod {
        /// A pod holding generation `held`, serving on `ip`'s control port, and caches with
        /// the `ml/minilm` pipeline and that pod.
        fn serve(held: u64, ip: &str) -> Served {
            let pod = FakePod {
                held: Arc::new(Mutex::new(held)),
                replaces: Arc::default(),
                authorization: Arc::default(),
                accepts: Arc::default(),
            };
            let addr = format!("{ip}:{}", crate::build::PORT_CONTROL)
                .parse()
                .unwrap();
            let server = tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(
                        tandem_proto::tandem::v1::worker_control_server::WorkerControlServer::new(
                            pod.clone(),
                        ),
                    )
                    .serve(addr),
            );
            let pipelines = Cache::<InferencePipeline>::default();
            let mut pipeline = crate::test_fixtures::text_pipeline();
            pipeline.metadata.namespace = Some("ml".into());
            pipeline.metadata.name = Some("minilm".into());
            pipelines.apply(&watcher::Event::Apply(pipeline), Clone::clone);
            let pods = Cache::<PodSummary>::default();
            let preprocess: k8s_openapi::api::core::v1::Pod =
                serde_json::from_value(serde_json::json!({
                    "metadata": {"name": "minilm-preprocess-x", "namespace": "ml",
                                 "labels": {"app.kubernetes.io/instance": "minilm",
                                            "app.kubernetes.io/component": "preprocess"}},
                    "status": {"podIP": ip}
                }))
                .unwrap();
            pods.apply(&watcher::Event::Apply(preprocess), |p| {
                PodSummary::of(p).expect("summary")
            });
            (pod, server, pipelines, pods)
        }
    }

    /// Passes until the pod acknowledges (or 50 tries); whether it did.
    async fn sync_until_settled(
        pipelines: &Cache<InferencePipeline>,
        pods: &Cache<PodSummary>,
        state: &mut HashMap<(String, String), PipelineRoutes>,
        cfg: &RouterConfig,
    ) -> bool {
        let published = Published::default();
        for _ in 0..50 {
            if sync_once(pipelines, pods, state, &published, cfg).await {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    #[tonic::async_trait]
    impl tandem_proto::tandem::v1::worker_control_server::WorkerControl for FakePod {
        async fn get_stats(
            &self,
            _: tonic::Request<tandem_proto::tandem::v1::GetStatsRequest>,
        ) -> Result<tonic::Response<tandem_proto::tandem::v1::WorkerStats>, tonic::Status> {
            Err(tonic::Status::unimplemented("not used"))
        }

        async fn set_routes(
            &self,
            req: tonic::Request<SetRoutesRequest>,
        ) -> Result<tonic::Response<tandem_proto::tandem::v1::SetRoutesResponse>, tonic::Status>
        {
            let offered = req
                .metadata()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            self.authorization.lock().unwrap().push(offered.clone());
            if let Some(accepts) = self.accepts.lock().unwrap().as_ref()
                && offered.as_ref() != Some(accepts)
            {
                return Err(tonic::Status::unauthenticated("wrong token"));
            }
            let req = req.into_inner();
            let generation = req.table.map_or(0, |t| t.generation);
            self.replaces.lock().unwrap().push(req.replace);
            let mut held = self.held.lock().unwrap();
            if req.replace || generation >= *held {
                *held = generation;
            }
            Ok(tonic::Response::new(
                tandem_proto::tandem::v1::SetRoutesResponse {
                    applied_generation: *held,
                },
            ))
        }
    }

    #[tokio::test]
    async fn a_pod_pinned_by_a_table_the_operator_never_numbered_is_made_to_take_the_operators() {
        // A loopback address of its own: the control port is fixed.
        let ip = format!("127.{}.{}.{}", 1 + std::process::id() % 250, 7, 9);
        let (pod, server, pipelines, pods) = FakePod::serve(u64::MAX, &ip);
        let mut state = HashMap::new();
        let cfg = RouterConfig::default();
        let settled = sync_until_settled(&pipelines, &pods, &mut state, &cfg).await;
        assert!(settled, "the pod never acknowledged the operator's table");
        let wanted = state[&("ml".to_owned(), "minilm".to_owned())]
            .table
            .as_ref()
            .unwrap()
            .generation;
        assert_eq!(*pod.held.lock().unwrap(), wanted);
        assert_eq!(
            *pod.replaces.lock().unwrap(),
            [false, true],
            "a plain push first; `replace` only once the pod reported a newer generation"
        );
        server.abort();
    }

    #[tokio::test]
    async fn with_a_control_key_every_push_carries_the_pipelines_token_and_without_one_none() {
        let ip = format!("127.{}.{}.{}", 1 + std::process::id() % 250, 8, 9);
        let (pod, server, pipelines, pods) = FakePod::serve(0, &ip);
        let key = crate::control_auth::ControlKey::from_bytes(&[42; 32]).unwrap();
        let uid = pipelines
            .get("ml", "minilm")
            .and_then(|p| p.metadata.uid.clone())
            .expect("the fixture has a uid");
        let cfg = RouterConfig {
            control_key: Some(ControlKeys::new(key.clone(), None)),
            ..RouterConfig::default()
        };
        let mut state = HashMap::new();
        assert!(sync_until_settled(&pipelines, &pods, &mut state, &cfg).await);
        let bearer = format!("Bearer {}", key.token("ml", "minilm", &uid));
        assert_eq!(*pod.authorization.lock().unwrap(), [Some(bearer)]);

        // Without a key, a fresh router's push carries no token.
        let mut state = HashMap::new();
        assert!(sync_until_settled(&pipelines, &pods, &mut state, &RouterConfig::default()).await);
        assert_eq!(pod.authorization.lock().unwrap().last(), Some(&None));
        server.abort();
    }

    #[tokio::test]
    async fn after_a_key_rotation_a_pod_still_on_the_old_token_takes_tables_only_with_the_previous_key()
     {
        let ip = format!("127.{}.{}.{}", 1 + std::process::id() % 250, 8, 10);
        let (pod, server, pipelines, pods) = FakePod::serve(0, &ip);
        let old = crate::control_auth::ControlKey::from_bytes(&[1; 32]).unwrap();
        let new = crate::control_auth::ControlKey::from_bytes(&[2; 32]).unwrap();
        let uid = pipelines
            .get("ml", "minilm")
            .and_then(|p| p.metadata.uid.clone())
            .expect("the fixture has a uid");
        let old_bearer = format!("Bearer {}", old.token("ml", "minilm", &uid));
        let new_bearer = format!("Bearer {}", new.token("ml", "minilm", &uid));
        *pod.accepts.lock().unwrap() = Some(old_bearer.clone());

        // The new key alone: the pod refuses every push, and none is acknowledged.
        let only_new = RouterConfig {
            control_key: Some(ControlKeys::new(new.clone(), None)),
            ..RouterConfig::default()
        };
        let mut state = HashMap::new();
        assert!(!sync_until_settled(&pipelines, &pods, &mut state, &only_new).await);
        let offered = pod.authorization.lock().unwrap().clone();
        assert!(!offered.is_empty(), "the pod was reached");
        assert!(
            offered.iter().all(|o| o.as_ref() == Some(&new_bearer)),
            "{offered:?}"
        );
        assert_eq!(*pod.held.lock().unwrap(), 0, "no table taken");

        // With the old key as the previous one, the push is made again with its token.
        pod.authorization.lock().unwrap().clear();
        let rotating = RouterConfig {
            control_key: Some(ControlKeys::new(new, Some(old))),
            ..RouterConfig::default()
        };
        let mut state = HashMap::new();
        assert!(sync_until_settled(&pipelines, &pods, &mut state, &rotating).await);
        assert_eq!(
            *pod.authorization.lock().unwrap(),
            [Some(new_bearer), Some(old_bearer)]
        );
        assert!(*pod.held.lock().unwrap() > 0, "the table was taken");
        server.abort();
    }

    #[test]
    fn a_pass_is_skipped_only_when_nothing_changed_nothing_is_outstanding_and_no_refresh_is_due() {
        let settled = Pass {
            changes: Some(7),
            settled: true,
        };
        assert!(!settled.needed(false, 7), "idle: nothing to do");
        assert!(settled.needed(false, 8), "a cache changed");
        assert!(settled.needed(true, 7), "refresh due");
        let pushing = Pass {
            settled: false,
            ..settled
        };
        assert!(pushing.needed(false, 7), "a push is outstanding or failed");
        let first = Pass {
            changes: None,
            settled: true,
        };
        assert!(first.needed(false, 0), "never passed yet");
    }

    #[test]
    fn a_count_read_after_a_note_sees_it() {
        let changes = CacheChanges::default();
        let reader = changes.clone();
        let before = reader.count();
        changes.note();
        assert_eq!(reader.count(), before + 1);
    }
}
