//! The reconcile loop's I/O edge: `fetch → validate → build → apply → status`.
//!
//! `validate`, `build` and `status` are pure; this module only fetches observations, applies
//! the built objects with server-side apply under one field manager, deletes owned objects that
//! are no longer desired, writes status and publishes Events. `error_policy` separates an
//! invalid spec (wait for a change) from transient API errors (per-object exponential backoff).

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::stream::{BoxStream, FuturesUnordered};
use futures::{FutureExt, Stream, StreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{
    Api, DeleteParams, GetParams, PartialObjectMeta, Patch, PatchParams, Preconditions,
};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::applied::{Applied, fingerprint};
use crate::build::{
    self, BuildConfig, ColorPlan, Desired, LABEL_MANAGED_BY, MANAGED_BY, Observed, Stage,
};
use crate::cache::{Cache, key_of};
use crate::crd::{Color, InferencePipeline, InferencePipelineStatus, ModelRef, RolloutPhase};
use crate::metrics::{ErrorKind, Metrics, Outcome};
use crate::ownership::{self, Owners};
use crate::status::{self, DeploymentObservation, Observation};
use crate::summary::{DeploymentSummary, PodSummary, WatchedDeployment};
use crate::validate::{ValidateError, ValidatedPipeline, validate};
use crate::workqueue::{Finished, WorkQueue};

/// The one field manager for every object and status this operator writes.
pub const FIELD_MANAGER: &str = "tandem-operator";

/// How long a triggered reconcile waits for more events on the same pipeline.
const DEBOUNCE: Duration = Duration::from_millis(500);

/// Why a reconcile did not complete.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The spec cannot be served; the Degraded condition says why. Not retried until the
    /// object changes.
    #[error("invalid spec: {0}")]
    InvalidSpec(#[source] ValidateError),
    /// Objects could not be built.
    #[error("building objects")]
    Build(#[source] build::BuildError),
    /// Reading an existing object before its first apply failed.
    #[error("reading {kind} {name}")]
    Read {
        /// Object kind.
        kind: &'static str,
        /// Object name.
        name: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
    /// An object under one of the pipeline's names exists and is not the pipeline's; it is
    /// left alone, and nothing of the pipeline is applied (see [`crate::ownership`]).
    #[error(
        "{kind} {name} already exists and does not belong to this pipeline ({holder}); the operator will not take it over"
    )]
    NameInUse {
        /// Object kind.
        kind: &'static str,
        /// Object name.
        name: String,
        /// Who holds it ([`crate::ownership::holder`]).
        holder: String,
    },
    /// Server-side apply of an owned object failed.
    #[error("applying {kind} {name}")]
    Apply {
        /// Object kind.
        kind: &'static str,
        /// Object name.
        name: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
    /// Deleting an object that is no longer desired failed.
    #[error("deleting retired {kind} {name}")]
    Prune {
        /// Object kind.
        kind: &'static str,
        /// Object name.
        name: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
    /// Writing status failed.
    #[error("writing status")]
    Status(#[source] kube::Error),
    /// The reconcile ran past [`ControllerConfig::reconcile_timeout`]; its API calls were
    /// cancelled and it is retried with backoff.
    #[error("reconcile did not finish within {}s (API server unresponsive?); its pending API calls were cancelled", .0.as_secs_f32())]
    Timeout(Duration),
}

impl Error {
    /// What to tell the user when the API server refused an owned object (400, 403, 404, 422:
    /// a value it does not accept, a permission missing, a field another manager owns), which
    /// retrying alone will not fix. `None` for everything else, transient errors included.
    fn refusal(&self) -> Option<String> {
        let (verb, kind, name, source) = match self {
            Self::Read { kind, name, source } => ("read", kind, name, source),
            Self::Apply { kind, name, source } => ("apply", kind, name, source),
            Self::Prune { kind, name, source } => ("delete", kind, name, source),
            _ => return None,
        };
        match source {
            kube::Error::Api(s) if matches!(s.code, 400 | 403 | 404 | 422) => Some(format!(
                "the API server refused to {verb} {kind} {name}: {}",
                s.message
            )),
            _ => None,
        }
    }

    fn kind(&self) -> ErrorKind {
        match self {
            Self::InvalidSpec(_) => ErrorKind::InvalidSpec,
            Self::Build(_) => ErrorKind::Build,
            Self::Read { .. } => ErrorKind::Read,
            Self::NameInUse { .. } => ErrorKind::NameInUse,
            Self::Apply { .. } => ErrorKind::Apply,
            Self::Prune { .. } => ErrorKind::Prune,
            Self::Status(e) if crate::skew::undeclared_field(e).is_some() => ErrorKind::CrdOutdated,
            Self::Status(_) => ErrorKind::Status,
            Self::Timeout(_) => ErrorKind::Timeout,
        }
    }
}

/// Settings for the controller.
#[derive(Clone, Debug)]
pub struct ControllerConfig {
    /// Builder settings (worker image, version).
    pub build: BuildConfig,
    /// Namespace to watch; every namespace when `None`.
    pub namespace: Option<String>,
    /// Reconciles running at once (0: no limit). Pipelines waiting for one are taken first
    /// come, first served (see [`crate::workqueue`]).
    pub concurrency: u16,
    /// Longest a reconcile may run once it holds a slot. The client's own limit is the
    /// watch-friendly 295 s, so without this one API call that never answers would hold a
    /// slot (of `concurrency`) for five minutes.
    pub reconcile_timeout: Duration,
    /// Page size of the initial lists (small pages keep peak memory low).
    pub page_size: u32,
    /// Identity reported on Events.
    pub identity: String,
    /// The queue-depth autoscaler's settings; no autoscaler when `None`.
    pub autoscale: Option<crate::autoscale::AutoscaleConfig>,
}

/// Shared state of all reconciles.
pub struct Context {
    client: Client,
    cfg: ControllerConfig,
    metrics: Arc<Metrics>,
    /// The pipelines, as the controller's watch has them.
    pipelines: Cache<InferencePipeline>,
    /// Owned Deployments, in the compact form pruning and status read.
    deployments: Cache<DeploymentSummary>,
    /// Worker pods (labels and status), shared with the router, rollout driver and autoscaler.
    pods: Cache<PodSummary>,
    /// What was last applied of each owned object (see [`crate::applied`]).
    applied: Arc<Mutex<Applied>>,
    /// The controlling owner of each cached owned object but Deployments (see
    /// [`crate::ownership`]).
    owners: Owners,
    /// Failed reconciles in a row, per pipeline (the backoff's exponent).
    failures: Mutex<HashMap<Key, u32>>,
    /// Since which generation each owned Deployment's spec, `replicas` aside, is unchanged:
    /// status does not wait for the Deployment controller to observe a change of `replicas`.
    spec_since: Mutex<status::SpecSince>,
    /// Creates the Events reconciles publish, without making them wait.
    events: crate::events::Publisher,
}

/// A pipeline's work-queue key, `namespace/name` (neither may contain a `/`), the same as its
/// pipeline-cache key: one small shared string, cheap to clone into the queue's FIFO and
/// timers.
pub type Key = Arc<str>;

fn key(namespace: &str, name: &str) -> Key {
    key_of(namespace, name).into()
}

/// What a reconcile asks for next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Requeue {
    /// Reconcile again after this long (sooner if something changes).
    After(Duration),
    /// Reconcile again only when the pipeline or an object it owns changes.
    OnChange,
}

/// Delay before retrying an object that failed `failures` times in a row: 1s doubling up to
/// 5 minutes. Per object, so one broken pipeline does not slow the others.
pub fn backoff(failures: u32) -> Duration {
    let secs = 1u64
        .checked_shl(failures.saturating_sub(1))
        .unwrap_or(u64::MAX);
    Duration::from_secs(secs.min(300))
}

/// How soon to look again after a successful reconcile: within a minute while pods are not
/// ready (their reasons can change without touching the Deployment), rarely once everything
/// is ready. Deployment changes trigger reconciles anyway; this only bounds staleness.
fn requeue_after(ready: bool) -> Duration {
    if ready {
        Duration::from_secs(300)
    } else {
        Duration::from_secs(60)
    }
}

/// Runs the controller until `shutdown` resolves, then finishes in-flight reconciles.
pub async fn run(
    client: Client,
    cfg: ControllerConfig,
    metrics: Arc<Metrics>,
    ready: impl Fn() + Send + 'static,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let api = |c: &Client| -> Api<InferencePipeline> {
        match &cfg.namespace {
            Some(ns) => Api::namespaced(c.clone(), ns),
            None => Api::all(c.clone()),
        }
    };
    let pipelines = api(&client);
    // Initial lists and relists are paged (`page_size` objects per call). Not `any_semantic`:
    // a list at resourceVersion "0" is served from the API server's watch cache whole, `limit`
    // ignored, so a restart at 1,000 pipelines received 2,000 Deployments (15 MB of JSON, half
    // of it managedFields) in one response and decoded them all before caching any.
    let owned = watcher::Config::default()
        .labels(&format!("{LABEL_MANAGED_BY}={MANAGED_BY}"))
        .page_size(cfg.page_size);

    let applied = Arc::new(Mutex::new(Applied::default()));
    let owners = Owners::default();
    let owned_watch = OwnedWatch {
        client: &client,
        namespace: &cfg.namespace,
        config: &owned,
        applied: &applied,
    };

    // Owned Deployments, cached as the summaries pruning and status read, so that a reconcile
    // with nothing to apply takes their status from here instead of an apply.
    let dep_store = Cache::<DeploymentSummary>::default();
    let dep_applied = applied.clone();
    let deployments = watcher(
        scoped::<WatchedDeployment>(&client, &cfg.namespace),
        owned.clone(),
    )
    .default_backoff()
    .inspect(dep_store.writer(|d| DeploymentSummary::from(d)))
    .inspect(move |ev| note_owned_event(&dep_applied, ev))
    .touched_objects();

    // Events the pipeline and pod caches took in: the router passes over the pipelines only
    // when there were some (or when it has something left to push).
    let cache_changes = crate::router::CacheChanges::default();
    let ipl_changes = cache_changes.clone();
    // The pipelines themselves: full objects (the spec is needed), managedFields stripped.
    let ipl_store = Cache::<InferencePipeline>::default();
    let ipl_stream = watcher(
        pipelines,
        watcher::Config::default().page_size(cfg.page_size),
    )
    .modify(slim_pipeline)
    .default_backoff()
    .inspect(ipl_store.writer(InferencePipeline::clone))
    .inspect(move |ev| {
        if ev.is_ok() {
            ipl_changes.note();
        }
    })
    // Deletions too: the queue then forgets the pipeline.
    .touched_objects();

    // Pods that start failing (see `router::watch_pods`).
    let (failing_tx, failing_rx) = tokio::sync::mpsc::channel(1024);

    // What triggers a reconcile: a change to the pipeline or to an object it owns, or a worker
    // pod that starts failing. Creating a
    // pipeline's seven objects fires seven watch events; the queue's debounce folds them (and
    // Deployment status churn) into one follow-up reconcile.
    let triggers = futures::stream::select_all([
        ipl_stream
            .filter_map(|ev| std::future::ready(self_key(ev)))
            .boxed(),
        owner_keys(deployments, "Deployment"),
        owner_keys(owned_watch.stream::<Service>(&owners.services), "Service"),
        owner_keys(
            owned_watch.stream::<ConfigMap>(&owners.config_maps),
            "ConfigMap",
        ),
        owner_keys(
            owned_watch.stream::<ServiceAccount>(&owners.service_accounts),
            "ServiceAccount",
        ),
        owner_keys(
            owned_watch.stream::<PodDisruptionBudget>(&owners.pdbs),
            "PodDisruptionBudget",
        ),
        futures::stream::unfold(failing_rx, |mut rx| async move {
            let (ns, name): (String, String) = rx.recv().await?;
            Some((key(&ns, &name), rx))
        })
        .boxed(),
    ]);

    // Worker pods: the router's routing tables, the rollout driver, the autoscaler and the
    // reconciler's "why not ready" all read this one cache.
    let (pod_store, pod_watch) = crate::router::watch_pods(
        client.clone(),
        cfg.namespace.as_deref(),
        cfg.page_size,
        cache_changes.clone(),
        failing_tx,
    );
    let pod_watch = tokio::spawn(pod_watch);
    let (events, events_task) =
        crate::events::Publisher::start(client.clone(), cfg.identity.clone(), metrics.clone());
    let ctx = Arc::new(Context {
        client: client.clone(),
        cfg: cfg.clone(),
        metrics,
        pipelines: ipl_store.clone(),
        deployments: dep_store.clone(),
        pods: pod_store.clone(),
        applied: applied.clone(),
        owners: owners.clone(),
        failures: Mutex::new(HashMap::new()),
        spec_since: Mutex::default(),
        events: events.clone(),
    });

    // `/metrics` reads each pipeline's rollout phase and traffic split from this cache.
    ctx.metrics.watch_pipelines(ipl_store.clone());

    // The caches hold a full list: before that they are empty (a list is swapped in whole),
    // so reconciles wait for it, and so does readiness. (An empty owner cache would cost a read
    // of every object before its first apply, not a wrong answer.)
    let synced = {
        let (pipelines, deployments) = (ipl_store.clone(), dep_store.clone());
        async move {
            futures::join!(
                pipelines.wait_until_ready(),
                deployments.wait_until_ready(),
                owners.wait_until_ready()
            );
        }
    };

    // Routing tables follow the pods the pipelines own; the rollout driver moves traffic by
    // writing status and waits for the tables to reach every preprocess pod. Leader-only like
    // reconcile.
    let routing_store = ipl_store.clone();
    let published = crate::router::Published::default();
    let router = tokio::spawn(crate::router::run(
        routing_store.clone(),
        pod_store.clone(),
        cache_changes,
        published.clone(),
        crate::router::RouterConfig {
            control_key: cfg.build.control_key.clone(),
            ..crate::router::RouterConfig::default()
        },
    ));
    let autoscaler = cfg.autoscale.clone().map(|a| {
        tokio::spawn(crate::autoscale::run(
            client.clone(),
            a,
            ctx.metrics.clone(),
            events.clone(),
            routing_store.clone(),
            pod_store.clone(),
        ))
    });
    let rollouts = tokio::spawn(crate::rollout::driver::run(
        client.clone(),
        routing_store,
        pod_store,
        published,
        ctx.metrics.clone(),
        events.clone(),
        crate::rollout::driver::DriverConfig {
            control_key: cfg.build.control_key.clone(),
            ..crate::rollout::driver::DriverConfig::default()
        },
    ));

    drive(ctx, triggers, synced, ready, shutdown).await;
    router.abort();
    rollouts.abort();
    if let Some(a) = autoscaler {
        a.abort();
    }
    pod_watch.abort();
    // The Events already published get a moment to reach the API server; the task ends once
    // the last publisher is gone and the queue is empty.
    drop(events);
    if tokio::time::timeout(EVENTS_FLUSH, events_task)
        .await
        .is_err()
    {
        warn!("stopping with Events still unpublished");
    }
    info!("controller stopped");
}

/// The reconcile loop: takes triggers into the work queue, runs up to `concurrency`
/// reconciles at once (first come, first served) once the caches have synced, and schedules
/// each pipeline's next reconcile from how the last one ended. On `shutdown` it takes no new
/// work and lets the running reconciles finish.
async fn drive(
    ctx: Arc<Context>,
    triggers: impl Stream<Item = Key>,
    synced: impl std::future::Future<Output = ()>,
    ready: impl Fn(),
    shutdown: impl std::future::Future<Output = ()>,
) {
    let limit = match ctx.cfg.concurrency {
        0 => usize::MAX,
        n => usize::from(n),
    };
    let mut queue = WorkQueue::<Key>::default();
    let mut running = FuturesUnordered::new();
    let mut triggers = std::pin::pin!(triggers);
    let mut synced = std::pin::pin!(synced.fuse());
    let mut shutdown = std::pin::pin!(shutdown.fuse());
    let mut started = false;
    loop {
        let now = Instant::now();
        queue.fire_due(now);
        while started && running.len() < limit {
            let Some((key, since)) = queue.pop() else {
                break;
            };
            running.push(run_one(ctx.clone(), key, since));
        }
        let next_due = queue.next_due();
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            () = &mut synced, if !started => {
                info!("caches synced");
                ready();
                started = true;
            }
            Some((key, next)) = running.next(), if !running.is_empty() => {
                queue.finish(key, next, Instant::now());
            }
            Some(key) = triggers.next() => queue.schedule(key, Instant::now() + DEBOUNCE),
            () = sleep_until(next_due), if next_due.is_some() => {}
            else => break,
        }
    }
    while running.next().await.is_some() {}
}

async fn sleep_until(at: Option<Instant>) {
    if let Some(at) = at {
        tokio::time::sleep_until(at.into()).await;
    }
}

/// Reconciles the pipeline behind `key` as the cache has it now, and says when to come back.
async fn run_one(ctx: Arc<Context>, key: Key, queued: Instant) -> (Key, Finished) {
    let Some(p) = ctx.pipelines.get_key(&key) else {
        debug!(pipeline = %key, "pipeline gone");
        if let Ok(mut f) = ctx.failures.lock() {
            f.remove(&key);
        }
        if let Ok(mut s) = ctx.spec_since.lock() {
            s.forget(&key);
        }
        return (key, Finished::Gone);
    };
    let next = match reconcile(&p, &ctx, queued).await {
        Ok(next) => {
            if let Ok(mut f) = ctx.failures.lock() {
                f.remove(&key);
            }
            next
        }
        Err(e) => error_policy(&p, &key, &e, &ctx),
    };
    let finished = match next {
        Requeue::After(d) => Finished::RequeueAt(Instant::now() + d),
        Requeue::OnChange => Finished::AwaitChange,
    };
    (key, finished)
}

/// The key of a pipeline the watch saw change or go; watch errors are logged (the watch
/// retries with backoff).
fn self_key(ev: Result<InferencePipeline, watcher::Error>) -> Option<Key> {
    match ev {
        Ok(p) => Some(key(
            p.metadata.namespace.as_deref()?,
            p.metadata.name.as_deref()?,
        )),
        Err(e) => {
            warn!(error = %e, kind = "InferencePipeline", "watch failed; retrying");
            None
        }
    }
}

/// The owning pipeline of each owned object the watch saw change or go.
fn owner_keys<O>(
    objects: impl Stream<Item = Result<O, watcher::Error>> + Send + 'static,
    kind: &'static str,
) -> BoxStream<'static, Key>
where
    O: Resource + Send + 'static,
    O::DynamicType: Default,
{
    let api_version = InferencePipeline::api_version(&());
    let owner_kind = InferencePipeline::kind(&());
    objects
        .filter_map(move |ev| {
            let found = match ev {
                Ok(o) => {
                    let meta = o.meta();
                    meta.namespace.as_deref().and_then(|ns| {
                        meta.owner_references
                            .iter()
                            .flatten()
                            .find(|r| r.kind == owner_kind && r.api_version == api_version)
                            .map(|r| key(ns, &r.name))
                    })
                }
                Err(e) => {
                    warn!(error = %e, kind, "watch failed; retrying");
                    None
                }
            };
            std::future::ready(found)
        })
        .boxed()
}

/// What the pipeline cache does not need: `managedFields`, and the copy of the whole object
/// that a client-side `kubectl apply` keeps in an annotation (about as large as the spec).
/// Other annotations stay: `tandem.dev/promote` and `tandem.dev/abort` steer rollouts.
fn slim_pipeline(p: &mut InferencePipeline) {
    p.metadata.managed_fields = None;
    if let Some(a) = p.metadata.annotations.as_mut() {
        a.remove(LAST_APPLIED);
    }
}

/// The annotation in which `kubectl apply` (client-side) records what it applied.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

fn scoped<K>(client: &Client, namespace: &Option<String>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// What every owned kind's watch shares: where to watch, which objects, and the apply record.
struct OwnedWatch<'a> {
    client: &'a Client,
    namespace: &'a Option<String>,
    config: &'a watcher::Config,
    applied: &'a Arc<Mutex<Applied>>,
}

impl OwnedWatch<'_> {
    /// Trigger stream of one owned kind (metadata only; `owners` caches each object's
    /// controlling owner). Every change is also shown to `applied`, which drops an object's
    /// record when someone other than the reconciler changed or deleted it.
    fn stream<K>(
        &self,
        owners: &Cache<u64>,
    ) -> impl Stream<Item = Result<PartialObjectMeta<K>, watcher::Error>> + Send + 'static
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
            + Clone
            + DeserializeOwned
            + std::fmt::Debug
            + Send
            + Sync
            + 'static,
    {
        let applied = self.applied.clone();
        watcher(
            scoped::<PartialObjectMeta<K>>(self.client, self.namespace),
            self.config.clone(),
        )
        .default_backoff()
        .inspect(owners.writer(controller_of::<K>))
        .inspect(move |ev| note_owned_event(&applied, ev))
        .touched_objects()
    }
}

/// What the owner caches keep of an owned object ([`ownership::controller_hash`]).
fn controller_of<K>(o: &PartialObjectMeta<K>) -> u64 {
    ownership::controller_hash(&o.metadata)
}

/// Shows one owned-object watch event to the apply record, which drops an object's record when
/// someone other than the reconciler changed or deleted it.
fn note_owned_event<O>(applied: &Mutex<Applied>, ev: &Result<watcher::Event<O>, watcher::Error>)
where
    O: Resource + ResourceExt,
    O::DynamicType: Default,
{
    let (obj, deleted) = match ev {
        Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => (o, false),
        Ok(watcher::Event::Delete(o)) => (o, true),
        _ => return,
    };
    let (Some(ns), Some(kind)) = (obj.namespace(), owned_kind(&O::kind(&Default::default())))
    else {
        return;
    };
    if let Ok(mut a) = applied.lock() {
        let marker = change_marker(kind, obj.meta());
        a.observe(&ns, kind, &obj.name_any(), marker.as_deref(), deleted);
    }
}

/// Reconciles one pipeline (the cache's newest copy), within the reconcile deadline.
/// `queued` is when it became ready in the work queue, for the log's `queued_ms`.
pub async fn reconcile(
    p: &InferencePipeline,
    ctx: &Context,
    queued: Instant,
) -> Result<Requeue, Error> {
    let span = info_span!("reconcile", pipeline = %p.name_any(), namespace = p.namespace().unwrap_or_default());
    async {
        let started = Instant::now();
        let queued_ms = started.duration_since(queued).as_secs_f64() * 1e3;
        let limit = ctx.cfg.reconcile_timeout;
        let result = tokio::time::timeout(limit, reconcile_inner(p, ctx))
            .await
            .unwrap_or(Err(Error::Timeout(limit)));
        let outcome = match &result {
            Ok(_) => Outcome::Success,
            Err(Error::InvalidSpec(_)) => Outcome::InvalidSpec,
            Err(_) => Outcome::Error,
        };
        ctx.metrics.observe_reconcile(outcome, started.elapsed());
        debug!(
            duration_ms = started.elapsed().as_secs_f64() * 1e3,
            queued_ms,
            ?outcome,
            "reconcile finished"
        );
        result
    }
    .instrument(span)
    .await
}

/// Maps a failed reconcile to its retry: an invalid spec waits for the object to change;
/// anything else (API errors) backs off exponentially per object.
pub fn error_policy(p: &InferencePipeline, key: &Key, err: &Error, ctx: &Context) -> Requeue {
    ctx.metrics.count_error(err.kind());
    if let Error::InvalidSpec(_) = err {
        return Requeue::OnChange;
    }
    if let Error::Status(e) = err
        && let Some(field) = crate::skew::undeclared_field(e)
    {
        crate::skew::report(&ctx.events, p.into(), "Reconcile", field);
    }
    let failures = match ctx.failures.lock() {
        Ok(mut f) => {
            let n = f.entry(key.clone()).or_insert(0);
            *n = n.saturating_add(1);
            *n
        }
        Err(_) => 1,
    };
    let delay = backoff(failures);
    let cause = std::error::Error::source(err).map_or_else(String::new, ToString::to_string);
    warn!(pipeline = %key, error = %err, cause, failures, retry_in_s = delay.as_secs(), "reconcile failed");
    Requeue::After(delay)
}

async fn reconcile_inner(p: &InferencePipeline, ctx: &Context) -> Result<Requeue, Error> {
    let prev = p.status.as_ref();
    let now = Time(k8s_openapi::jiff::Timestamp::now());

    // validate
    let v = match validate(p) {
        Ok(v) => v,
        Err(e) => {
            let next = status::invalid(prev, p.metadata.generation, &e, &now);
            write_status(p, ctx, prev, &next).await?;
            return Err(Error::InvalidSpec(e));
        }
    };

    // build
    let observed = plan(&v, prev);
    let desired = build::build(&v, &observed, &ctx.cfg.build).map_err(Error::Build)?;

    // apply
    let applied = match apply_owned(ctx, &v, &desired).await {
        Ok(applied) => applied,
        Err(e) => {
            // Say why in status, where `kubectl describe` shows it; retried with backoff all
            // the same (a missing permission can be granted meanwhile).
            let next = if let Error::NameInUse { .. } = &e {
                Some(status::name_in_use(
                    prev,
                    p.metadata.generation,
                    e.to_string(),
                    &now,
                ))
            } else {
                e.refusal()
                    .map(|message| status::refused(prev, p.metadata.generation, message, &now))
            };
            if let Some(next) = next {
                write_status(p, ctx, prev, &next).await?;
            }
            return Err(e);
        }
    };

    // status
    let active = observed
        .colors
        .first()
        .map(|c| c.color)
        .unwrap_or(Color::Blue);
    let pre_dep = applied.first();
    let inf_dep = applied.get(1);
    let built = |i: usize| desired.deployments.get(i);
    let preprocess = observe(ctx, &v, pre_dep, built(0), Stage::Preprocess, None).await?;
    let inference = observe(ctx, &v, inf_dep, built(1), Stage::Inference, Some(active)).await?;
    let obs = Observation {
        generation: p.metadata.generation,
        preprocess,
        inference,
        active_color: active,
        active_model: observed
            .colors
            .first()
            .map(|c| c.model.clone())
            .unwrap_or_default(),
        rollout: prev.and_then(|s| s.rollout.clone()),
    };
    let next = status::compute(prev, &obs, &now);
    write_status(p, ctx, prev, &next).await?;
    let ready = next.phase == Some(crate::crd::Phase::Ready);
    Ok(Requeue::After(requeue_after(ready)))
}

/// Which inference colors to run, from status: the active color with its model (the spec's
/// model for a new pipeline), a rollout's candidate while it is provisioned, shadowed or takes
/// traffic, and the previous color after a promotion until `scaleDownDelay` has passed. The
/// stage's desired pods (the autoscaler's `status.inference.desiredReplicas`), within the
/// spec's bounds, are split between them by [`crate::rollout::color_replicas`]: the bounds
/// apply to the stage, not to each color, so a candidate starts with `maxSurge` pods even when
/// `replicas.min` is higher.
fn plan(v: &ValidatedPipeline, prev: Option<&InferencePipelineStatus>) -> Observed {
    let active = prev.and_then(|s| s.active_color).unwrap_or(Color::Blue);
    let active_model = prev
        .and_then(|s| s.active_model.clone())
        .unwrap_or_else(|| ModelRef::from(&v.inference.model));
    let total_desired = prev
        .and_then(|s| s.inference.as_ref())
        .and_then(|s| s.desired_replicas);
    let rollout = prev.and_then(|s| s.rollout.as_deref());
    let other = rollout.and_then(|r| match r.phase {
        Some(p) if p.in_progress() => Some((r.candidate_color?, r.candidate_model.clone()?)),
        Some(RolloutPhase::Promoted) => Some((r.previous_color?, r.previous_model.clone()?)),
        _ => None,
    });
    let Some((other_color, other_model)) = other.filter(|(c, _)| *c != active) else {
        return Observed {
            colors: vec![ColorPlan {
                color: active,
                model: active_model,
                replicas: v.inference.replicas.clamp(total_desired),
            }],
            preprocess_desired: prev
                .and_then(|s| s.preprocess.as_ref())
                .and_then(|s| s.desired_replicas),
        };
    };
    let total = v
        .inference
        .replicas
        .clamp(total_desired)
        .max(1)
        .unsigned_abs();
    let (active_n, other_n) = crate::rollout::color_replicas(total, rollout, v.rollout.max_surge);
    let count = |n: u32| i32::try_from(n).unwrap_or(i32::MAX);
    Observed {
        colors: vec![
            ColorPlan {
                color: active,
                model: active_model,
                replicas: count(active_n),
            },
            ColorPlan {
                color: other_color,
                model: other_model,
                replicas: count(other_n),
            },
        ],
        preprocess_desired: prev
            .and_then(|s| s.preprocess.as_ref())
            .and_then(|s| s.desired_replicas),
    }
}

async fn apply<K>(ctx: &Context, ns: &str, obj: &K) -> Result<K, Error>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + Serialize
        + std::fmt::Debug,
{
    let name = obj.meta().name.clone().unwrap_or_default();
    let api: Api<K> = Api::namespaced(ctx.client.clone(), ns);
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(obj),
    )
    .await
    .map_err(|source| Error::Apply {
        kind: short_kind::<K>(),
        name,
        source,
    })
}

fn short_kind<K: Resource<DynamicType = ()>>() -> &'static str {
    owned_kind(&K::kind(&())).unwrap_or("object")
}

/// The kinds this operator owns, as `'static` names.
fn owned_kind(kind: &str) -> Option<&'static str> {
    Some(match kind {
        "Deployment" => "Deployment",
        "Service" => "Service",
        "ConfigMap" => "ConfigMap",
        "ServiceAccount" => "ServiceAccount",
        "PodDisruptionBudget" => "PodDisruptionBudget",
        _ => return None,
    })
}

/// [`claim_names`], [`apply_all`], then [`prune`].
async fn apply_owned(
    ctx: &Context,
    v: &ValidatedPipeline,
    d: &Desired,
) -> Result<Vec<DeploymentSummary>, Error> {
    let absent = claim_names(ctx, v, d).await?;
    let applied = apply_all(ctx, v, d, &absent).await?;
    prune(ctx, v, d).await?;
    Ok(applied)
}

/// The desired objects [`claim_names`] found absent, by kind and name. Their first apply may
/// only create them ([`CREATE_ONLY`]).
type Absent = BTreeSet<(&'static str, String)>;

/// A `resourceVersion` sent with the first apply of an object its claim found absent. A create
/// ignores it; an update compares it with the object's, and no object has this one (it is etcd's
/// first revision, written while the API server starts), so if someone created the object
/// between the claim and the apply, the apply fails with 409 Conflict instead of taking the
/// object over, and the next reconcile's claim finds it and names its holder.
pub const CREATE_ONLY: &str = "1";

/// Makes sure that every desired object is absent or already the pipeline's before anything is
/// applied, so that an object of the same name that belongs to something else is neither
/// rewritten nor adopted (and a pipeline is not half created beside it). Objects the owner
/// caches show as the pipeline's cost nothing; the others (a new pipeline's) are read at once,
/// concurrently. Returns the objects found absent.
async fn claim_names(ctx: &Context, v: &ValidatedPipeline, d: &Desired) -> Result<Absent, Error> {
    let ns = v.meta.namespace.as_str();
    let uid = v.meta.uid.as_str();
    let name = |meta: &ObjectMeta| meta.name.clone().unwrap_or_default();
    let cached = |kind: &str, meta: &ObjectMeta| {
        ctx.owners
            .controlled_by(kind, ns, meta.name.as_deref().unwrap_or_default(), uid)
    };
    let deployments = d.deployments.iter().map(|dep| {
        let name = name(&dep.metadata);
        let ours = ctx
            .deployments
            .get(ns, &name)
            .is_some_and(|c| c.owner_uids.iter().any(|o| &**o == uid));
        claim::<Deployment>(ctx, v, name, ours).boxed()
    });
    let pdbs = d.pdbs.iter().map(|pdb| {
        let ours = cached("PodDisruptionBudget", &pdb.metadata);
        claim::<PodDisruptionBudget>(ctx, v, name(&pdb.metadata), ours).boxed()
    });
    let (sa, cm, svc) = (
        &d.service_account.metadata,
        &d.config_map.metadata,
        &d.service.metadata,
    );
    let others = [
        claim::<ServiceAccount>(ctx, v, name(sa), cached("ServiceAccount", sa)).boxed(),
        claim::<ConfigMap>(ctx, v, name(cm), cached("ConfigMap", cm)).boxed(),
        claim::<Service>(ctx, v, name(svc), cached("Service", svc)).boxed(),
    ];
    let results =
        futures::future::join_all(others.into_iter().chain(deployments).chain(pdbs)).await;
    let mut absent = Absent::new();
    for r in results {
        absent.extend(r?);
    }
    Ok(absent)
}

/// One object of [`claim_names`]: nothing to do when `cached_as_ours`, else a read of its
/// metadata (from the API server's watch cache): the pipeline's is fine, absent is returned,
/// anything else is [`Error::NameInUse`].
async fn claim<K>(
    ctx: &Context,
    v: &ValidatedPipeline,
    name: String,
    cached_as_ours: bool,
) -> Result<Option<(&'static str, String)>, Error>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
{
    if cached_as_ours {
        return Ok(None);
    }
    let kind = short_kind::<K>();
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &v.meta.namespace);
    match api.get_metadata_with(&name, &GetParams::any()).await {
        Ok(found) if ownership::owned_by(&found.metadata, &v.meta.uid) => Ok(None),
        Ok(found) => Err(Error::NameInUse {
            kind,
            name,
            holder: ownership::holder(&found.metadata, &v.meta.name, &InferencePipeline::kind(&())),
        }),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(Some((kind, name))),
        Err(source) => Err(Error::Read { kind, name, source }),
    }
}

/// Applies the desired objects that changed; returns the Deployments as the server now has
/// them (with status), in the order built. The ServiceAccount, ConfigMap and Service go first
/// (the Deployments' pods need them), then the Deployments and PodDisruptionBudgets;
/// independent objects go out concurrently. An object exactly as this process last applied
/// it, untouched since ([`crate::applied`]), is skipped; an unchanged Deployment is read from
/// the watch cache.
async fn apply_all(
    ctx: &Context,
    v: &ValidatedPipeline,
    d: &Desired,
    absent: &Absent,
) -> Result<Vec<DeploymentSummary>, Error> {
    let ns = v.meta.namespace.as_str();
    let now = Instant::now();
    let (sa, cm, svc) = futures::join!(
        apply_changed(ctx, ns, &d.service_account, now, absent),
        apply_changed(ctx, ns, &d.config_map, now, absent),
        apply_changed(ctx, ns, &d.service, now, absent),
    );
    sa?;
    cm?;
    svc?;
    let (deployments, pdbs) = futures::join!(
        futures::future::join_all(
            d.deployments
                .iter()
                .map(|dep| deployment(ctx, ns, dep, now, absent))
        ),
        futures::future::join_all(
            d.pdbs
                .iter()
                .map(|pdb| apply_changed(ctx, ns, pdb, now, absent))
        ),
    );
    for pdb in pdbs {
        pdb?;
    }
    deployments.into_iter().collect()
}

/// Applies `obj` unless the apply record says exactly this was applied and nobody touched it
/// since.
async fn apply_changed<K>(
    ctx: &Context,
    ns: &str,
    obj: &K,
    now: Instant,
    absent: &Absent,
) -> Result<(), Error>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + Serialize
        + std::fmt::Debug,
{
    let name = obj.meta().name.as_deref().unwrap_or_default();
    let fp = fingerprint(obj);
    if let Some(fp) = fp
        && ctx
            .applied
            .lock()
            .is_ok_and(|a| a.current(ns, short_kind::<K>(), name, fp, now).is_some())
    {
        return Ok(());
    }
    apply_recorded(ctx, ns, obj, fp, now, absent)
        .await
        .map(|_| ())
}

/// A desired Deployment as the server has it: from the watch cache when the apply record says
/// it is unchanged and the cache already shows the generation that apply produced (an older
/// copy would report stale status), else by applying it.
async fn deployment(
    ctx: &Context,
    ns: &str,
    dep: &Deployment,
    now: Instant,
    absent: &Absent,
) -> Result<DeploymentSummary, Error> {
    let name = dep.metadata.name.as_deref().unwrap_or_default();
    let fp = fingerprint(dep);
    let recorded = fp.and_then(|fp| {
        ctx.applied
            .lock()
            .ok()
            .and_then(|a| a.current(ns, "Deployment", name, fp, now))
    });
    if let Some(recorded) = recorded
        && let Some(cached) = ctx.deployments.get(ns, name)
        && cached
            .generation
            .map(generation_marker)
            .is_some_and(|m| Applied::is_marker(recorded, &m))
    {
        return Ok(cached.as_ref().clone());
    }
    apply_recorded(ctx, ns, dep, fp, now, absent)
        .await
        .map(DeploymentSummary::from)
}

/// Applies `obj` and records the result: the fingerprint sent and the marker the server
/// returned, or no record at all when the apply failed. An object its claim found absent is
/// sent with [`CREATE_ONLY`].
async fn apply_recorded<K>(
    ctx: &Context,
    ns: &str,
    obj: &K,
    fp: Option<u64>,
    now: Instant,
    absent: &Absent,
) -> Result<K, Error>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + Serialize
        + std::fmt::Debug,
{
    let kind = short_kind::<K>();
    let name = obj.meta().name.as_deref().unwrap_or_default();
    let result = if absent.contains(&(kind, name.to_owned())) {
        let mut create = obj.clone();
        create.meta_mut().resource_version = Some(CREATE_ONLY.to_owned());
        apply(ctx, ns, &create).await
    } else {
        apply(ctx, ns, obj).await
    };
    if let Ok(mut a) = ctx.applied.lock() {
        match (&result, fp) {
            (Ok(applied), Some(fp)) => match change_marker(kind, applied.meta()) {
                Some(marker) => a.record(ns, kind, name, fp, &marker, now),
                None => a.forget(ns, kind, name),
            },
            _ => a.forget(ns, kind, name),
        }
    }
    result
}

/// What changes when someone changes an object's desired state: the `generation` of a
/// Deployment or PodDisruptionBudget (their status, rewritten by other controllers as pods come
/// and go, bumps only the `resourceVersion`), the `resourceVersion` of the others.
fn change_marker(kind: &str, meta: &ObjectMeta) -> Option<String> {
    match kind {
        "Deployment" | "PodDisruptionBudget" => meta.generation.map(generation_marker),
        _ => meta.resource_version.clone(),
    }
}

fn generation_marker(generation: i64) -> String {
    format!("g{generation}")
}

/// Deletes owned Deployments (and their PodDisruptionBudgets) that are no longer desired, such
/// as a retired color. Candidates are the Deployment names this operator gives a pipeline
/// ([`build::names`]), looked up in the cache by name (every reconcile runs this, so it must
/// not scan every cached Deployment); deletion is guarded by UID so a newer object of the
/// same name is never removed.
async fn prune(ctx: &Context, v: &ValidatedPipeline, d: &Desired) -> Result<(), Error> {
    let keep: BTreeSet<&str> = d
        .deployments
        .iter()
        .filter_map(|d| d.metadata.name.as_deref())
        .collect();
    let ns = v.meta.namespace.as_str();
    let pipeline = v.meta.name.as_str();
    let retired: Vec<(String, Option<String>)> = [
        build::names::preprocess(pipeline),
        build::names::inference(pipeline, Color::Blue),
        build::names::inference(pipeline, Color::Green),
    ]
    .into_iter()
    .filter(|name| !keep.contains(name.as_str()))
    .filter_map(|name| ctx.deployments.get(ns, &name))
    .filter(|d| d.owner_uids.iter().any(|uid| **uid == *v.meta.uid))
    .map(|d| (d.name.to_string(), d.uid.as_deref().map(String::from)))
    .collect();
    for (name, uid) in retired {
        let params = DeleteParams {
            preconditions: uid.map(|uid| Preconditions {
                uid: Some(uid),
                resource_version: None,
            }),
            ..DeleteParams::background()
        };
        let deps: Api<Deployment> = Api::namespaced(ctx.client.clone(), ns);
        ignore_gone(deps.delete(&name, &params).await.map(|_| ())).map_err(|source| {
            Error::Prune {
                kind: "Deployment",
                name: name.clone(),
                source,
            }
        })?;
        let pdbs: Api<PodDisruptionBudget> = Api::namespaced(ctx.client.clone(), ns);
        ignore_gone(
            pdbs.delete(&name, &DeleteParams::background())
                .await
                .map(|_| ()),
        )
        .map_err(|source| Error::Prune {
            kind: "PodDisruptionBudget",
            name: name.clone(),
            source,
        })?;
        info!(deployment = %name, "deleted retired Deployment");
        publish(
            ctx,
            &v.meta,
            false,
            "RetiredDeployment",
            format!("deleted {name}, no longer desired"),
        );
    }
    Ok(())
}

fn ignore_gone(r: Result<(), kube::Error>) -> Result<(), kube::Error> {
    match r {
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(()),
        other => other,
    }
}

/// Reads a Deployment's counts from the apply response and, only when pods are missing,
/// lists them to learn why. `built` is the Deployment as this reconcile built it.
async fn observe(
    ctx: &Context,
    v: &ValidatedPipeline,
    dep: Option<&DeploymentSummary>,
    built: Option<&Deployment>,
    stage: Stage,
    color: Option<Color>,
) -> Result<DeploymentObservation, Error> {
    let Some(dep) = dep else {
        return Ok(DeploymentObservation::default());
    };
    let desired = dep.spec.replicas.unwrap_or(1);
    let st = &dep.status;
    // The generation whose pods the counts must describe: the first with the current spec,
    // `replicas` aside (a change of `replicas` alone replaces no pod).
    let spec_since = dep.generation.map(|generation| {
        let spec = built.and_then(|b| b.spec.clone()).map(|mut spec| {
            spec.replicas = None;
            spec
        });
        let fp = spec.as_ref().and_then(crate::applied::fingerprint);
        match (fp, ctx.spec_since.lock()) {
            (Some(fp), Ok(mut s)) => {
                let pipeline = key(&v.meta.namespace, &v.meta.name);
                s.since(&pipeline, &dep.name, fp, generation)
            }
            _ => generation,
        }
    });
    let mut obs = DeploymentObservation {
        desired,
        replicas: st.replicas.unwrap_or(0),
        ready: st.ready_replicas.unwrap_or(0),
        updated: st.updated_replicas.unwrap_or(0),
        observed_current: st.observed_generation.is_some() && st.observed_generation >= spec_since,
        problem: None,
    };
    if obs.ready < obs.desired {
        // Why pods are missing, from the worker-pod cache the router keeps anyway (status is
        // all `pod_problem` reads): no list call per not-ready reconcile.
        let selector = build::selector_labels(&v.meta.name, stage, color);
        let pods = ctx.pods.state();
        let matching = pods
            .iter()
            .filter(|p| *p.namespace == *v.meta.namespace)
            .filter(|p| {
                selector
                    .iter()
                    .all(|(k, want)| p.labels.get(k) == Some(want.as_str()))
            })
            .map(|p| p.as_ref());
        obs.problem = status::pod_problem(matching);
    }
    Ok(obs)
}

async fn write_status(
    p: &InferencePipeline,
    ctx: &Context,
    prev: Option<&InferencePipelineStatus>,
    next: &InferencePipelineStatus,
) -> Result<(), Error> {
    if prev == Some(next) {
        return Ok(());
    }
    let (Some(ns), name) = (p.namespace(), p.name_any()) else {
        return Ok(());
    };
    let api: Api<InferencePipeline> = Api::namespaced(ctx.client.clone(), &ns);
    // The resourceVersion makes the write conditional: if anyone changed the object since it
    // was read (a user clearing a field, the rollout machine), the apply fails with 409 and the
    // next reconcile starts from fresh state instead of writing stale status back.
    let body = serde_json::json!({
        "apiVersion": "tandem.dev/v1alpha1",
        "kind": "InferencePipeline",
        "metadata": { "resourceVersion": p.resource_version() },
        "status": next,
    });
    match api
        .patch_status(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await
    {
        Ok(_) => {}
        // The autoscaler or the rollout driver wrote first: this status was computed from a
        // stale object. Not a failure — the watch delivers the newer object and reconciles it.
        Err(kube::Error::Api(s)) if s.code == 409 => {
            debug!(pipeline = %name, "status changed since it was read; reconciling the newer object");
            return Ok(());
        }
        Err(e) => return Err(Error::Status(e)),
    }
    if let Ok(meta) = validate_meta(p) {
        for t in status::transitions(prev, next) {
            publish(ctx, &meta, t.warning, &t.reason, t.note);
        }
    }
    Ok(())
}

fn validate_meta(p: &InferencePipeline) -> Result<crate::validate::PipelineMeta, ()> {
    Ok(crate::validate::PipelineMeta {
        name: p.name_any(),
        namespace: p.namespace().ok_or(())?,
        uid: p.uid().ok_or(())?,
        generation: p.metadata.generation,
    })
}

/// How long a stopping controller waits for queued Events to be created.
const EVENTS_FLUSH: Duration = Duration::from_secs(2);

/// Queues an Event on the pipeline (created in the background; failures are logged and
/// counted, never fatal: Events are advisory).
fn publish(
    ctx: &Context,
    meta: &crate::validate::PipelineMeta,
    warning: bool,
    reason: &str,
    note: String,
) {
    let note = crate::events::Note {
        action: "Reconcile",
        reason,
        note,
        warning,
        discriminator: "reconcile",
    };
    ctx.events
        .publish(meta.into(), note, k8s_openapi::jiff::Timestamp::now());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{RolloutPhase, RolloutStatus};
    use crate::test_fixtures::text_pipeline;

    /// A context whose API server accepts connections and never answers (a hung apiserver or
    /// a black-holed connection), with `pipelines` in its cache; the receiver gets each
    /// connection the operator opens.
    async fn unanswering_api_server(
        pipelines: &[InferencePipeline],
        concurrency: u16,
        reconcile_timeout: Duration,
    ) -> (
        Arc<Context>,
        tokio::sync::mpsc::UnboundedReceiver<tokio::net::TcpStream>,
    ) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (conn_tx, conn_rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            // Keep every connection open, answer nothing.
            while let Ok((stream, _)) = listener.accept().await {
                let _ = conn_tx.send(stream);
            }
        });
        let config = kube::Config::new(format!("http://{addr}").parse().unwrap());
        let client = Client::try_from(config).unwrap();
        let store = Cache::default();
        for p in pipelines {
            store.apply(&watcher::Event::Apply(p.clone()), Clone::clone);
        }
        let metrics = Arc::new(Metrics::new());
        let (events, _) =
            crate::events::Publisher::start(client.clone(), "test".into(), metrics.clone());
        let ctx = Arc::new(Context {
            client,
            cfg: ControllerConfig {
                build: BuildConfig {
                    worker_image: "tandem-worker:test".into(),
                    image_pull_policy: None,
                    image_pull_secrets: Vec::new(),
                    operator_version: "test".into(),
                    worker_tracing: None,
                    control_key: None,
                },
                namespace: Some("ml".into()),
                concurrency,
                reconcile_timeout,
                page_size: 100,
                identity: "test".into(),
                autoscale: None,
            },
            metrics,
            pipelines: store,
            deployments: Cache::default(),
            owners: Owners::default(),
            pods: Cache::default(),
            applied: Arc::new(Mutex::new(Applied::default())),
            failures: Mutex::new(HashMap::new()),
            spec_since: Mutex::default(),
            events,
        });
        (ctx, conn_rx)
    }

    fn pipeline_named(name: &str) -> InferencePipeline {
        let mut p = text_pipeline();
        p.metadata.namespace = Some("ml".into());
        p.metadata.name = Some(name.into());
        p
    }

    /// Against an API server that never answers, the reconcile gives up at its deadline with
    /// `Timeout` (and so frees its place among the running reconciles), instead of waiting out
    /// the client's 295 s limit.
    #[tokio::test]
    async fn a_reconcile_against_an_unanswering_api_server_gives_up_at_its_deadline() {
        let p = pipeline_named("a");
        let limit = Duration::from_millis(300);
        let (ctx, mut conns) = unanswering_api_server(std::slice::from_ref(&p), 1, limit).await;

        // The bound only keeps a broken build from hanging the test run; without the deadline
        // the reconcile would wait out the client's 295 s read timeout.
        let result =
            tokio::time::timeout(Duration::from_secs(60), reconcile(&p, &ctx, Instant::now()))
                .await
                .expect("reconcile returned");
        assert!(
            matches!(result, Err(Error::Timeout(d)) if d == limit),
            "{result:?}"
        );
        assert_eq!(result.unwrap_err().kind(), ErrorKind::Timeout);
        // It reached the API server: the first apply was sent.
        assert!(conns.try_recv().is_ok(), "no API call was attempted");
    }

    /// The loop itself: nothing runs before the caches sync; then every triggered pipeline
    /// is reconciled (here each fails at its deadline and is put on backoff), readiness is
    /// reported once, and shutdown ends the loop.
    #[tokio::test]
    async fn the_loop_waits_for_the_caches_then_reconciles_every_triggered_pipeline_until_shutdown()
    {
        let names = ["a", "b", "c"];
        let pipelines: Vec<_> = names.iter().map(|n| pipeline_named(n)).collect();
        let (ctx, mut conns) =
            unanswering_api_server(&pipelines, 1, Duration::from_millis(100)).await;
        let triggers = futures::stream::iter(["a", "a", "b", "c"].map(|n| key("ml", n)))
            .chain(futures::stream::pending());
        let (synced_tx, synced_rx) = tokio::sync::oneshot::channel::<()>();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let readied = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let loop_task = tokio::spawn(drive(
            ctx.clone(),
            triggers,
            async move {
                let _ = synced_rx.await;
            },
            {
                let readied = readied.clone();
                move || {
                    readied.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            },
            async move {
                let _ = stop_rx.await;
            },
        ));

        // Past the debounce, the keys are due, but the caches have not synced.
        tokio::time::sleep(DEBOUNCE * 2).await;
        assert!(
            conns.try_recv().is_err(),
            "reconciled before the caches synced"
        );
        assert_eq!(readied.load(std::sync::atomic::Ordering::SeqCst), 0);

        synced_tx.send(()).unwrap();
        let all_failed_once = async {
            loop {
                let failed = ctx.failures.lock().unwrap().len();
                if failed == names.len() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(30), all_failed_once)
            .await
            .expect("every triggered pipeline was reconciled");
        for n in names {
            assert!(ctx.failures.lock().unwrap().contains_key(&key("ml", n)));
        }
        assert_eq!(readied.load(std::sync::atomic::Ordering::SeqCst), 1);

        stop_tx.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(30), loop_task)
            .await
            .expect("the loop stopped on shutdown")
            .unwrap();
    }

    #[test]
    fn a_queue_key_is_the_pipeline_cache_key() {
        let cache = Cache::default();
        cache.apply(
            &watcher::Event::Apply(pipeline_named("embed")),
            Clone::clone,
        );
        let k = key("ml", "embed");
        assert_eq!(&*k, "ml/embed");
        assert!(cache.get_key(&k).is_some());
    }

    #[test]
    fn only_objects_the_api_server_refuses_are_reported_as_refusals() {
        let api = |code: u16| {
            kube::Error::Api(
                kube::core::Status::failure(&format!("refused with {code}"), "Invalid")
                    .with_code(code)
                    .boxed(),
            )
        };
        let apply = |code| Error::Apply {
            kind: "Service",
            name: "m".into(),
            source: api(code),
        };
        assert_eq!(
            apply(422).refusal().as_deref(),
            Some("the API server refused to apply Service m: refused with 422")
        );
        let prune = Error::Prune {
            kind: "Deployment",
            name: "m-inference-green".into(),
            source: api(403),
        };
        assert_eq!(
            prune.refusal().as_deref(),
            Some("the API server refused to delete Deployment m-inference-green: refused with 403")
        );
        for transient in [409, 429, 500, 503] {
            assert_eq!(apply(transient).refusal(), None, "{transient}");
        }
        assert_eq!(Error::Timeout(Duration::from_secs(30)).refusal(), None);
    }

    #[test]
    fn backoff_doubles_from_one_second_and_caps_at_five_minutes() {
        let d: Vec<u64> = (1..=10).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(d, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300]);
        assert_eq!(backoff(1000), Duration::from_secs(300));
    }

    #[test]
    fn a_pdb_changes_with_its_generation_other_kinds_with_their_resource_version() {
        let meta = ObjectMeta {
            generation: Some(3),
            resource_version: Some("812".into()),
            ..ObjectMeta::default()
        };
        assert_eq!(
            change_marker("PodDisruptionBudget", &meta).as_deref(),
            Some("g3")
        );
        assert_eq!(change_marker("ConfigMap", &meta).as_deref(), Some("812"));
        // A status-only write (new resourceVersion, same generation) is not a change to a PDB.
        let status_write = ObjectMeta {
            resource_version: Some("900".into()),
            ..meta.clone()
        };
        assert_eq!(
            change_marker("PodDisruptionBudget", &status_write),
            change_marker("PodDisruptionBudget", &meta)
        );
    }

    #[test]
    fn the_cached_pipeline_drops_managed_fields_and_kubectls_copy_but_keeps_rollout_annotations() {
        let mut p = text_pipeline();
        p.metadata.managed_fields = Some(vec![Default::default()]);
        p.metadata.annotations = Some(
            [
                (LAST_APPLIED.to_owned(), "{\"spec\":{}}".to_owned()),
                ("tandem.dev/promote".to_owned(), "v2".to_owned()),
            ]
            .into(),
        );
        slim_pipeline(&mut p);
        assert_eq!(p.metadata.managed_fields, None);
        let kept: Vec<&str> = p.annotations().keys().map(String::as_str).collect();
        assert_eq!(kept, ["tandem.dev/promote"]);
    }

    #[test]
    fn a_new_pipeline_plans_blue_only_with_no_desired_counts() {
        let v = validate(&text_pipeline()).unwrap();
        let o = plan(&v, None);
        assert_eq!(o.colors.len(), 1);
        assert_eq!(o.colors[0].color, Color::Blue);
        assert_eq!(o.colors[0].replicas, 1, "replicas.min");
        assert_eq!(o.preprocess_desired, None);
    }

    #[test]
    fn a_candidate_in_status_keeps_its_color_running_with_its_model() {
        let v = validate(&text_pipeline()).unwrap();
        let mut candidate = ModelRef::from(&v.inference.model);
        candidate.version = "3".into();
        let prev = InferencePipelineStatus {
            active_color: Some(Color::Green),
            rollout: Some(Box::new(RolloutStatus {
                phase: Some(RolloutPhase::Shadowing),
                candidate_color: Some(Color::Blue),
                candidate_model: Some(candidate.clone()),
                ..RolloutStatus::default()
            })),
            ..InferencePipelineStatus::default()
        };
        let o = plan(&v, Some(&prev));
        assert_eq!(
            o.colors.iter().map(|c| c.color).collect::<Vec<_>>(),
            [Color::Green, Color::Blue]
        );
        assert_eq!(o.colors[1].model, candidate);
        assert_eq!(o.colors[1].replicas, 1, "maxSurge pods");
    }

    #[test]
    fn replica_bounds_apply_to_the_stage_so_a_candidate_adds_max_surge_pods_not_a_second_copy() {
        let mut p = text_pipeline();
        p.spec.inference.replicas.min = 3;
        p.spec.inference.replicas.max = 6;
        let v = validate(&p).unwrap();
        let status = |desired: Option<i32>, rollout: Option<(RolloutPhase, i32)>| {
            let mut candidate = ModelRef::from(&v.inference.model);
            candidate.version = "2".into();
            InferencePipelineStatus {
                active_color: Some(Color::Blue),
                inference: Some(crate::crd::StageStatus {
                    desired_replicas: desired,
                    ..Default::default()
                }),
                rollout: rollout.map(|(phase, traffic)| {
                    Box::new(RolloutStatus {
                        phase: Some(phase),
                        candidate_color: Some(Color::Green),
                        candidate_model: Some(candidate.clone()),
                        previous_color: Some(Color::Green),
                        previous_model: Some(candidate),
                        traffic_percent: traffic,
                        ..RolloutStatus::default()
                    })
                }),
                ..InferencePipelineStatus::default()
            }
        };
        // What the inference Deployments get, as built.
        let cfg = crate::build::tests::cfg();
        let counts = |s: &InferencePipelineStatus| -> Vec<i32> {
            let d = build::build(&v, &plan(&v, Some(s)), &cfg).unwrap();
            d.deployments[1..]
                .iter()
                .map(|d| d.spec.as_ref().and_then(|s| s.replicas).unwrap())
                .collect()
        };
        // One color: the desired count within [min, max].
        assert_eq!(counts(&status(None, None)), [3]);
        assert_eq!(counts(&status(Some(1), None)), [3]);
        assert_eq!(counts(&status(Some(40), None)), [6]);
        // Two colors: the stage's count split, maxSurge (1) on top; before, each color was
        // clamped to min and the candidate ran 3 pods.
        assert_eq!(
            counts(&status(Some(4), Some((RolloutPhase::Shadowing, 0)))),
            [4, 1]
        );
        assert_eq!(
            counts(&status(Some(4), Some((RolloutPhase::ShiftingTraffic, 50)))),
            [2, 2]
        );
        assert_eq!(
            counts(&status(Some(4), Some((RolloutPhase::Promoted, 100)))),
            [4, 1]
        );
    }

    #[test]
    fn the_active_color_serves_the_model_in_status_not_the_spec() {
        let v = validate(&text_pipeline()).unwrap();
        let mut serving = ModelRef::from(&v.inference.model);
        serving.version = "0".into();
        let prev = InferencePipelineStatus {
            active_color: Some(Color::Blue),
            active_model: Some(serving.clone()),
            ..InferencePipelineStatus::default()
        };
        let o = plan(&v, Some(&prev));
        assert_eq!(o.colors.len(), 1);
        assert_eq!(o.colors[0].model, serving);
    }

    #[test]
    fn after_promotion_the_previous_color_runs_until_it_is_retired() {
        let v = validate(&text_pipeline()).unwrap();
        let old = ModelRef::from(&v.inference.model);
        let mut status = InferencePipelineStatus {
            active_color: Some(Color::Green),
            rollout: Some(Box::new(RolloutStatus {
                phase: Some(RolloutPhase::Promoted),
                previous_color: Some(Color::Blue),
                previous_model: Some(old.clone()),
                ..RolloutStatus::default()
            })),
            ..InferencePipelineStatus::default()
        };
        let o = plan(&v, Some(&status));
        assert_eq!(
            o.colors.iter().map(|c| c.color).collect::<Vec<_>>(),
            [Color::Green, Color::Blue]
        );
        assert_eq!(o.colors[1].model, old);
        if let Some(r) = status.rollout.as_mut() {
            r.phase = Some(RolloutPhase::Complete);
        }
        let o = plan(&v, Some(&status));
        assert_eq!(o.colors.len(), 1, "the retired color is pruned");
    }

    #[test]
    fn not_ready_pipelines_are_looked_at_again_sooner() {
        assert!(requeue_after(false) < requeue_after(true));
    }
}
