//! Forwarding to inference pods from the routing table pushed by the operator
//! (`WorkerControl.SetRoutes`), or from static endpoints.
//!
//! Per request: a weighted split between colors (smooth weighted round robin,
//! deterministic), the least-loaded endpoint inside the color (fewest calls in
//! flight from this worker), one retry on another endpoint when the first
//! fails as a pod that is going away does (see [`pod_gone`]), and optional shadow mirroring to another color whose
//! outputs are compared with the live ones off the request path. While no
//! endpoint exists, requests are *held* (bounded count, bounded time) so the
//! inference stage can scale from zero.
//!
//! Selection logic is in pure functions ([`smooth_wrr`], [`least_loaded`],
//! [`mirror_this_one`], [`judge`]); the rest is the async edge.
//!
//! When a table names a color (or a model) not seen before, one of its pods is asked for the
//! model's `ModelMetadata`, which is checked against what this worker sends
//! ([`contract`]); mismatches are reported in `GetStats`.

pub mod contract;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tandem_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use tandem_proto::inference::{ModelInferRequest, ModelInferResponse, ModelMetadataRequest};
use tandem_proto::tandem::v1::{ColorStats, ModelMismatch, RoutingTable, ShadowStats};
use tokio::sync::watch;
use tonic::transport::Channel;

use super::error::RequestError;
use super::metrics::{ForwardLabels, Metrics, ShadowLabels};
use super::postprocess::{Comparison, compare};
use crate::common::stats::LatencyWindow;
use crate::common::telemetry::TraceContext;
use crate::common::tensor::le_bytes_to_f32;
use contract::Contract;

/// Picks the next color by smooth weighted round robin (nginx's algorithm):
/// each eligible color gains its weight, the richest wins and pays the total.
/// `current` keeps the running credit per color. `None` when no color is
/// eligible (`weights[i] == 0` or `eligible[i] == false` for all).
pub fn smooth_wrr(weights: &[u32], eligible: &[bool], current: &mut [i64]) -> Option<usize> {
    let mut total = 0i64;
    let mut best: Option<usize> = None;
    for i in 0..weights.len() {
        if !eligible[i] || weights[i] == 0 {
            continue;
        }
        current[i] += i64::from(weights[i]);
        total += i64::from(weights[i]);
        if best.is_none_or(|b| current[i] > current[b]) {
            best = Some(i);
        }
    }
    let b = best?;
    current[b] -= total;
    Some(b)
}

/// Index of the endpoint with the fewest calls in flight, skipping
/// `excluded`; ties are broken by rotating from `rotate` so equal endpoints
/// share the load.
pub fn least_loaded(loads: &[u64], excluded: &[bool], rotate: usize) -> Option<usize> {
    let n = loads.len();
    (0..n)
        .map(|k| (k + rotate) % n.max(1))
        .filter(|&i| !excluded[i])
        .min_by_key(|&i| loads[i])
}

/// Whether request number `k` (0-based) is mirrored at `rate` (0..=1):
/// deterministic, spreads mirrored requests evenly.
pub fn mirror_this_one(k: u64, rate: f64) -> bool {
    let rate = rate.clamp(0.0, 1.0);
    ((k + 1) as f64 * rate).floor() > (k as f64 * rate).floor()
}

/// Shadow parity tolerance (from the routing table).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Tolerance {
    /// Fail when cosine < this (0 = unused).
    pub min_cosine: f64,
    /// Fail when max |a-b| > this (0 = unused).
    pub max_abs: f64,
    /// Fail when any row's argmax differs.
    pub require_top1: bool,
}

/// Whether a comparison passes the tolerance.
pub fn judge(c: &Comparison, t: &Tolerance) -> bool {
    !((t.min_cosine > 0.0 && c.min_cosine < t.min_cosine)
        || (t.max_abs > 0.0 && c.max_abs_diff > t.max_abs)
        || (t.require_top1 && c.top1_disagreements > 0))
}

/// One inference pod.
#[derive(Debug)]
struct EndpointHandle {
    address: String,
    in_flight: AtomicU64,
    client: GrpcInferenceServiceClient<Channel>,
}

/// Counters of one color, kept across routing tables.
#[derive(Debug)]
struct ColorCounters {
    requests: AtomicU64,
    errors: AtomicU64,
    in_flight: AtomicU64,
    latency: Mutex<LatencyWindow>,
}

impl ColorCounters {
    fn new() -> Self {
        Self {
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            latency: Mutex::new(LatencyWindow::new(Duration::from_secs(30), 4096)),
        }
    }
}

#[derive(Debug)]
struct ColorRoute {
    name: String,
    weight: u32,
    model_name: String,
    model_version: String,
    endpoints: Vec<Arc<EndpointHandle>>,
    counters: Arc<ColorCounters>,
}

#[derive(Debug, Default)]
struct ShadowState {
    color: String,
    epoch: String,
    sample_rate: f64,
    tolerance: Tolerance,
    counter: u64,
    stats: ShadowStats,
}

#[derive(Debug, Default)]
struct State {
    generation: u64,
    held: bool,
    colors: Vec<ColorRoute>,
    wrr: Vec<i64>,
    rotate: usize,
    shadow: ShadowState,
    endpoints: HashMap<String, Arc<EndpointHandle>>,
    counters: HashMap<String, Arc<ColorCounters>>,
}

/// Routing settings.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// Model name sent when a color names none.
    pub default_model: String,
    /// Model version sent when a color names none.
    pub default_version: String,
    /// Requests held at most while no endpoint exists.
    pub max_held: usize,
    /// How long a held request waits.
    pub hold_timeout: Duration,
    /// Deadline per inference call.
    pub forward_timeout: Duration,
    /// Output compared for shadow parity (`embedding`, `logits`; `None` =
    /// first FP32 output).
    pub compare_output: Option<String>,
    /// What each color's model is checked against; `None` = no checks.
    pub contract: Option<Arc<Contract>>,
}

/// Attempts at reading one color's model metadata before giving up until the next table.
const CHECK_ATTEMPTS: u32 = 6;
/// Limit for one `ModelMetadata` call.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// A model as one color serves it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct CheckKey {
    color: String,
    model_name: String,
    model_version: String,
}

/// Where the check of one color's model stands.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Checked {
    /// Asked, not answered yet.
    Pending,
    /// The model takes what this worker sends.
    Fits,
    /// It does not; what differs.
    Mismatch(String),
}

type Checks = Arc<Mutex<HashMap<CheckKey, Checked>>>;

fn lock_checks(checks: &Checks) -> std::sync::MutexGuard<'_, HashMap<CheckKey, Checked>> {
    checks.lock().unwrap_or_else(|p| p.into_inner())
}

/// Where one request goes.
struct Target {
    color: String,
    model_name: String,
    model_version: String,
    endpoint: Arc<EndpointHandle>,
    counters: Arc<ColorCounters>,
}

/// Answer of a forwarded request.
#[derive(Debug)]
pub struct Forwarded {
    /// The inference pod's response.
    pub response: ModelInferResponse,
    /// Color that served it.
    pub color: String,
}

/// The routing table holder and forwarder; share it behind an `Arc`.
#[derive(Debug)]
pub struct Router {
    cfg: RouterConfig,
    state: Mutex<State>,
    changed: watch::Sender<u64>,
    held_now: AtomicU64,
    metrics: Metrics,
    checks: Checks,
}

impl Router {
    /// An empty router (not ready until a table arrives).
    pub fn new(cfg: RouterConfig, metrics: Metrics) -> Self {
        let (changed, _) = watch::channel(0);
        Self {
            cfg,
            state: Mutex::new(State::default()),
            changed,
            held_now: AtomicU64::new(0),
            metrics,
            checks: Checks::default(),
        }
    }

    /// The model a color's requests name: its own, or the pipeline's when it names none.
    fn model_of(&self, c: &ColorRoute) -> (String, String) {
        if c.model_name.is_empty() {
            (
                self.cfg.default_model.clone(),
                self.cfg.default_version.clone(),
            )
        } else {
            (c.model_name.clone(), c.model_version.clone())
        }
    }

    /// Starts a model check for each color of `colors` with pods whose model has none yet, and
    /// forgets the checks of colors no longer routed to or now routed to another model. A color
    /// scaled to zero keeps its verdict: its model has not changed, so neither has the fit.
    fn check_models(&self, colors: &[ColorRoute]) {
        let Some(contract) = &self.cfg.contract else {
            return;
        };
        let mut checks = lock_checks(&self.checks);
        let keys: Vec<(CheckKey, &ColorRoute)> = colors
            .iter()
            .map(|c| {
                let (model_name, model_version) = self.model_of(c);
                let key = CheckKey {
                    color: c.name.clone(),
                    model_name,
                    model_version,
                };
                (key, c)
            })
            .collect();
        checks.retain(|k, _| keys.iter().any(|(key, _)| key == k));
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        for (key, color) in keys {
            if color.endpoints.is_empty() || checks.contains_key(&key) {
                continue;
            }
            checks.insert(key.clone(), Checked::Pending);
            let clients = color.endpoints.iter().map(|e| e.client.clone()).collect();
            runtime.spawn(check_model(
                Arc::clone(&self.checks),
                key,
                clients,
                Arc::clone(contract),
            ));
        }
    }

    /// Models found not to take what this worker sends, for `GetStats`.
    pub fn model_mismatches(&self) -> Vec<ModelMismatch> {
        let mut found: Vec<ModelMismatch> = lock_checks(&self.checks)
            .iter()
            .filter_map(|(k, c)| match c {
                Checked::Mismatch(message) => Some(ModelMismatch {
                    color: k.color.clone(),
                    model_name: k.model_name.clone(),
                    model_version: k.model_version.clone(),
                    message: message.clone(),
                }),
                Checked::Pending | Checked::Fits => None,
            })
            .collect();
        found.sort_by(|a, b| a.color.cmp(&b.color));
        found
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Critical sections never panic; recover the data if one ever did.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Installs static endpoints as a generation-0 table with one color
    /// (`static`), so any table pushed later replaces it.
    pub fn set_static(&self, addresses: &[String]) -> Result<(), RequestError> {
        use tandem_proto::tandem::v1::{ColorRoute as PColor, Endpoint};
        let table = RoutingTable {
            generation: 0,
            colors: vec![PColor {
                color: "static".into(),
                weight: 100,
                endpoints: addresses
                    .iter()
                    .map(|a| Endpoint {
                        address: a.clone(),
                        pod_name: String::new(),
                    })
                    .collect(),
                model_name: String::new(),
                model_version: String::new(),
            }],
            shadow: None,
        };
        self.apply(table, true).map(|_| ())
    }

    /// Applies a pushed table; lower generations than the one held are
    /// ignored unless `force`. Returns the generation held afterwards.
    pub fn apply(&self, table: RoutingTable, force: bool) -> Result<u64, RequestError> {
        let mut st = self.lock();
        if st.held && !force && table.generation < st.generation {
            return Ok(st.generation);
        }
        let mut colors = Vec::with_capacity(table.colors.len());
        let mut endpoints = HashMap::new();
        for c in &table.colors {
            let mut eps = Vec::with_capacity(c.endpoints.len());
            for e in &c.endpoints {
                let handle = match st
                    .endpoints
                    .get(&e.address)
                    .or_else(|| endpoints.get(&e.address))
                {
                    Some(h) => Arc::clone(h),
                    None => Arc::new(connect(&e.address)?),
                };
                endpoints.insert(e.address.clone(), Arc::clone(&handle));
                eps.push(handle);
            }
            let counters = Arc::clone(
                st.counters
                    .entry(c.color.clone())
                    .or_insert_with(|| Arc::new(ColorCounters::new())),
            );
            colors.push(ColorRoute {
                name: c.color.clone(),
                weight: c.weight,
                model_name: c.model_name.clone(),
                model_version: c.model_version.clone(),
                endpoints: eps,
                counters,
            });
        }
        let shadow = table.shadow.unwrap_or_default();
        // A new shadow color or a new rollout (epoch) starts its comparison from zero.
        if shadow.color != st.shadow.color || shadow.epoch != st.shadow.epoch {
            st.shadow = ShadowState {
                color: shadow.color.clone(),
                epoch: shadow.epoch.clone(),
                stats: ShadowStats {
                    color: shadow.color.clone(),
                    min_cosine: 1.0,
                    ..Default::default()
                },
                ..Default::default()
            };
        }
        st.shadow.sample_rate = shadow.sample_rate;
        st.shadow.tolerance = shadow
            .tolerance
            .map(|t| Tolerance {
                min_cosine: t.min_cosine,
                max_abs: t.max_abs,
                require_top1: t.require_top1,
            })
            .unwrap_or_default();
        st.wrr = vec![0; colors.len()];
        self.check_models(&colors);
        st.colors = colors;
        st.endpoints = endpoints;
        st.generation = table.generation;
        st.held = true;
        let g = st.generation;
        drop(st);
        self.changed.send_modify(|v| *v += 1);
        tracing::info!(generation = g, "routing table applied");
        Ok(g)
    }

    /// Whether a routing table (or static endpoints) is held.
    pub fn has_table(&self) -> bool {
        self.lock().held
    }

    /// Generation held (0 = none or static).
    pub fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// Requests held right now.
    pub fn held_now(&self) -> u64 {
        self.held_now.load(Ordering::Relaxed)
    }

    /// Per-color counters and the shadow comparison stats, for `GetStats`.
    pub fn stats(&self, now: Instant) -> (Vec<ColorStats>, Option<ShadowStats>) {
        let st = self.lock();
        let mut colors: Vec<ColorStats> = st
            .counters
            .iter()
            .map(|(name, c)| ColorStats {
                color: name.clone(),
                requests: c.requests.load(Ordering::Relaxed),
                errors: c.errors.load(Ordering::Relaxed),
                in_flight: c.in_flight.load(Ordering::Relaxed),
                latency: Some(
                    c.latency
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .summary(now),
                ),
            })
            .collect();
        colors.sort_by(|a, b| a.color.cmp(&b.color));
        let shadow = (!st.shadow.color.is_empty()).then(|| st.shadow.stats.clone());
        (colors, shadow)
    }

    /// Chooses a live target and, maybe, a shadow one.
    fn select(
        &self,
        exclude: Option<&str>,
        same_color: Option<&str>,
    ) -> (Option<Target>, Option<(Target, Tolerance)>) {
        let mut st = self.lock();
        let st = &mut *st;
        let eligible: Vec<bool> = st
            .colors
            .iter()
            .map(|c| {
                same_color.is_none_or(|s| s == c.name)
                    && c.endpoints
                        .iter()
                        .any(|e| Some(e.address.as_str()) != exclude)
            })
            .collect();
        let weights: Vec<u32> = st.colors.iter().map(|c| c.weight).collect();
        let mut idx = smooth_wrr(&weights, &eligible, &mut st.wrr);
        if idx.is_none() {
            // Every eligible color has weight 0 (e.g. mid-rollout glitch):
            // serve rather than hold.
            idx = eligible.iter().position(|&e| e);
        }
        st.rotate = st.rotate.wrapping_add(1);
        let rotate = st.rotate;
        let pick = |c: &ColorRoute, excl: Option<&str>| -> Option<Target> {
            let loads: Vec<u64> = c
                .endpoints
                .iter()
                .map(|e| e.in_flight.load(Ordering::Relaxed))
                .collect();
            let excluded: Vec<bool> = c
                .endpoints
                .iter()
                .map(|e| Some(e.address.as_str()) == excl)
                .collect();
            let i = least_loaded(&loads, &excluded, rotate)?;
            let (model_name, model_version) = self.model_of(c);
            Some(Target {
                color: c.name.clone(),
                model_name,
                model_version,
                endpoint: Arc::clone(&c.endpoints[i]),
                counters: Arc::clone(&c.counters),
            })
        };
        let live = idx.and_then(|i| pick(&st.colors[i], exclude));
        let mut shadow = None;
        if let Some(l) = &live
            && same_color.is_none()
            && !st.shadow.color.is_empty()
            && st.shadow.color != l.color
        {
            let k = st.shadow.counter;
            st.shadow.counter += 1;
            if mirror_this_one(k, st.shadow.sample_rate)
                && let Some(c) = st.colors.iter().find(|c| c.name == st.shadow.color)
                && let Some(t) = pick(c, None)
            {
                shadow = Some((t, st.shadow.tolerance));
            }
        }
        (live, shadow)
    }

    /// Forwards `request` (model name/version are filled in per color) and
    /// returns the live answer. Holds while no endpoint exists.
    pub async fn forward(
        self: &Arc<Self>,
        mut request: ModelInferRequest,
        trace: Option<TraceContext>,
    ) -> Result<Forwarded, RequestError> {
        let deadline = tokio::time::Instant::now() + self.cfg.hold_timeout;
        let (target, shadow) = loop {
            let mut rx = self.changed.subscribe();
            rx.borrow_and_update();
            let (live, shadow) = self.select(None, None);
            if let Some(t) = live {
                break (t, shadow);
            }
            if self.held_now.load(Ordering::Relaxed) >= self.cfg.max_held as u64 {
                return Err(RequestError::Unavailable(format!(
                    "no inference endpoint available and {} requests are already held",
                    self.cfg.max_held
                )));
            }
            self.held_now.fetch_add(1, Ordering::Relaxed);
            self.metrics.held.inc();
            let waited = tokio::time::timeout_at(deadline, rx.changed()).await;
            self.held_now.fetch_sub(1, Ordering::Relaxed);
            self.metrics.held.dec();
            if waited.is_err() {
                return Err(RequestError::Unavailable(format!(
                    "no inference endpoint became available within {} ms",
                    self.cfg.hold_timeout.as_millis()
                )));
            }
        };

        request.model_name = target.model_name.clone();
        request.model_version = target.model_version.clone();
        let shadow_call = shadow.map(|(t, tol)| {
            let mut req = request.clone();
            req.model_name = t.model_name.clone();
            req.model_version = t.model_version.clone();
            let me = Arc::clone(self);
            (
                tokio::spawn(async move { me.call(&t, req, trace).await }),
                tol,
            )
        });

        let first = self.call(&target, request.clone(), trace).await;
        let result = match first {
            Err(ref e) if pod_gone(e) => self.retry(&target, request, trace, first).await,
            other => other.map(|resp| (resp, target.color.clone())),
        };
        let (response, color) = result?;
        if let Some((handle, tol)) = shadow_call {
            let live = response.clone();
            let me = Arc::clone(self);
            tokio::spawn(async move {
                let shadow = handle
                    .await
                    .map_err(|e| RequestError::Internal(e.to_string()))
                    .and_then(|r| r);
                me.record_shadow(&live, shadow, &tol);
            });
        }
        Ok(Forwarded { response, color })
    }

    /// The one retry of a request whose first endpoint failed as a pod going away does: on
    /// another endpoint of the same color if there is one, else of any color; the first
    /// failure stands when there is no other endpoint.
    async fn retry(
        &self,
        target: &Target,
        mut request: ModelInferRequest,
        trace: Option<TraceContext>,
        first: Result<ModelInferResponse, RequestError>,
    ) -> Result<(ModelInferResponse, String), RequestError> {
        self.metrics
            .forwards
            .get_or_create(&ForwardLabels {
                color: target.color.clone(),
                outcome: "retried",
            })
            .inc();
        let (retry, _) = self.select(Some(&target.endpoint.address), Some(&target.color));
        let retry = match retry {
            Some(r) => Some(r),
            None => self.select(Some(&target.endpoint.address), None).0,
        };
        match retry {
            Some(r) => {
                request.model_name = r.model_name.clone();
                request.model_version = r.model_version.clone();
                self.call(&r, request, trace)
                    .await
                    .map(|resp| (resp, r.color))
            }
            None => first.map(|resp| (resp, target.color.clone())),
        }
    }

    async fn call(
        &self,
        target: &Target,
        request: ModelInferRequest,
        trace: Option<TraceContext>,
    ) -> Result<ModelInferResponse, RequestError> {
        let span = tracing::info_span!("forward", color = %target.color, endpoint = %target.endpoint.address);
        let _guard = InFlight::new(&target.endpoint.in_flight, &target.counters.in_flight);
        let started = Instant::now();
        let mut req = tonic::Request::new(request);
        req.set_timeout(self.cfg.forward_timeout);
        // With OTLP export on, the inference worker's span must hang under this `forward`
        // span as exported; without it, a fresh span id in the caller's trace is enough.
        let ctx = TraceContext::of_span(&span)
            .or_else(|| trace.map(|t| t.child()))
            .unwrap_or_else(TraceContext::new_root);
        if let Ok(v) = ctx.header_value().parse() {
            req.metadata_mut().insert("traceparent", v);
        }
        let mut client = target.endpoint.client.clone();
        let out = tracing::Instrument::instrument(client.model_infer(req), span).await;
        let elapsed = started.elapsed();
        target.counters.requests.fetch_add(1, Ordering::Relaxed);
        target
            .counters
            .latency
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .record(Instant::now(), elapsed);
        let outcome = if out.is_ok() { "ok" } else { "error" };
        self.metrics
            .forwards
            .get_or_create(&ForwardLabels {
                color: target.color.clone(),
                outcome,
            })
            .inc();
        match out {
            Ok(resp) => Ok(resp.into_inner()),
            Err(status) => {
                target.counters.errors.fetch_add(1, Ordering::Relaxed);
                Err(match status.code() {
                    tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
                        if elapsed >= self.cfg.forward_timeout =>
                    {
                        RequestError::DeadlineExceeded(format!(
                            "inference call exceeded {} ms",
                            self.cfg.forward_timeout.as_millis()
                        ))
                    }
                    code => RequestError::Upstream {
                        code,
                        message: status.message().to_owned(),
                        endpoint: target.endpoint.address.clone(),
                    },
                })
            }
        }
    }

    fn record_shadow(
        &self,
        live: &ModelInferResponse,
        shadow: Result<ModelInferResponse, RequestError>,
        tol: &Tolerance,
    ) {
        let cmp = shadow.ok().and_then(|s| {
            let (a, w) = comparable(live, self.cfg.compare_output.as_deref())?;
            let (b, _) = comparable(&s, self.cfg.compare_output.as_deref())?;
            compare(&a, &b, w)
        });
        let mut st = self.lock();
        let stats = &mut st.shadow.stats;
        match cmp {
            None => {
                stats.errors += 1;
                self.metrics
                    .shadow
                    .get_or_create(&ShadowLabels { result: "error" })
                    .inc();
            }
            Some(c) => {
                stats.compared += 1;
                stats.min_cosine = stats.min_cosine.min(c.min_cosine);
                stats.max_abs_diff = stats.max_abs_diff.max(c.max_abs_diff);
                stats.top1_disagreements += c.top1_disagreements;
                let ok = judge(&c, tol);
                if !ok {
                    stats.mismatches += 1;
                }
                let result = if ok { "match" } else { "mismatch" };
                self.metrics
                    .shadow
                    .get_or_create(&ShadowLabels { result })
                    .inc();
            }
        }
    }
}

/// The FP32 output to compare, flattened, with its row width.
pub fn comparable(resp: &ModelInferResponse, name: Option<&str>) -> Option<(Vec<f32>, usize)> {
    let idx = resp
        .outputs
        .iter()
        .position(|o| name.is_some_and(|n| o.name == n))
        .or_else(|| resp.outputs.iter().position(|o| o.datatype == "FP32"))?;
    let out = &resp.outputs[idx];
    let raw = resp.raw_output_contents.get(idx)?;
    let values = le_bytes_to_f32(raw)?;
    let width = usize::try_from(*out.shape.last()?).ok()?;
    Some((values, width))
}

/// Asks the color's pods in turn for the model's metadata, with backoff between rounds, and
/// records whether the model takes what this worker sends. Stops early when the color is no
/// longer routed to; after [`CHECK_ATTEMPTS`] unanswered rounds the check is dropped, so the
/// next table that names the color starts another.
async fn check_model(
    checks: Checks,
    key: CheckKey,
    clients: Vec<GrpcInferenceServiceClient<Channel>>,
    contract: Arc<Contract>,
) {
    let mut backoff = Duration::from_millis(250);
    let mut last_error = String::new();
    for _ in 0..CHECK_ATTEMPTS {
        for client in &clients {
            if !lock_checks(&checks).contains_key(&key) {
                return;
            }
            let request = ModelMetadataRequest {
                name: key.model_name.clone(),
                version: key.model_version.clone(),
            };
            let mut client = client.clone();
            let metadata =
                match tokio::time::timeout(CHECK_TIMEOUT, client.model_metadata(request)).await {
                    Ok(Ok(m)) => m.into_inner(),
                    Ok(Err(status)) => {
                        last_error = format!("{:?}: {}", status.code(), status.message());
                        continue;
                    }
                    Err(_) => {
                        last_error = format!("no answer within {} s", CHECK_TIMEOUT.as_secs());
                        continue;
                    }
                };
            let outcome = match contract.check(&metadata) {
                Ok(()) => {
                    tracing::info!(color = %key.color, model = %key.model_name, version = %key.model_version, "the model takes what this worker sends");
                    Checked::Fits
                }
                Err(why) => {
                    tracing::error!(color = %key.color, model = %key.model_name, version = %key.model_version, why = %why, "the model does not take what this worker sends: every request to it will fail");
                    Checked::Mismatch(why)
                }
            };
            if let Some(slot) = lock_checks(&checks).get_mut(&key) {
                *slot = outcome;
            }
            return;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(8));
    }
    tracing::warn!(color = %key.color, model = %key.model_name, error = %last_error, "could not read the model's metadata; its fit is not checked until the next routing table");
    let mut checks = lock_checks(&checks);
    if checks.get(&key) == Some(&Checked::Pending) {
        checks.remove(&key);
    }
}

fn connect(address: &str) -> Result<EndpointHandle, RequestError> {
    let uri = if address.contains("://") {
        address.to_owned()
    } else {
        format!("http://{address}")
    };
    let endpoint = tonic::transport::Endpoint::from_shared(uri)
        .map_err(|e| RequestError::invalid(format!("bad inference endpoint {address:?}: {e}")))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true);
    let client = GrpcInferenceServiceClient::new(endpoint.connect_lazy())
        .max_decoding_message_size(256 << 20)
        .max_encoding_message_size(256 << 20);
    Ok(EndpointHandle {
        address: address.to_owned(),
        in_flight: AtomicU64::new(0),
        client,
    })
}

/// Whether a forwarded call failed as a pod that is going away, or already gone, makes it
/// fail before answering: no endpoint could be chosen, or the pod's status is `UNAVAILABLE`
/// (connection refused, the server's GOAWAY), `CANCELLED` (the connection closed with the call
/// queued or in flight; our own deadline is told apart by the time taken, in `call`) or
/// `UNKNOWN` (tonic's "transport error", a connection reset). Inference is a pure function of
/// its inputs, so one more attempt elsewhere can only cost time, never repeat an effect.
fn pod_gone(e: &RequestError) -> bool {
    match e {
        RequestError::Unavailable(_) => true,
        RequestError::Upstream { code, .. } => matches!(
            code,
            tonic::Code::Unavailable | tonic::Code::Cancelled | tonic::Code::Unknown
        ),
        _ => false,
    }
}

/// Increments two in-flight counters for its lifetime.
struct InFlight<'a>(&'a AtomicU64, &'a AtomicU64);

impl<'a> InFlight<'a> {
    fn new(a: &'a AtomicU64, b: &'a AtomicU64) -> Self {
        a.fetch_add(1, Ordering::Relaxed);
        b.fetch_add(1, Ordering::Relaxed);
        Self(a, b)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
        self.1.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smooth_wrr_splits_traffic_by_weight_and_interleaves() {
        let mut cur = vec![0; 2];
        let picks: Vec<usize> = (0..10)
            .filter_map(|_| smooth_wrr(&[90, 10], &[true, true], &mut cur))
            .collect();
        assert_eq!(picks.iter().filter(|&&p| p == 1).count(), 1);
        let mut cur = vec![0; 2];
        let picks: Vec<usize> = (0..4)
            .filter_map(|_| smooth_wrr(&[50, 50], &[true, true], &mut cur))
            .collect();
        assert_eq!(picks, vec![0, 1, 0, 1]);
    }

    #[test]
    fn smooth_wrr_skips_ineligible_and_zero_weight_colors() {
        let mut cur = vec![0; 3];
        for _ in 0..5 {
            assert_eq!(
                smooth_wrr(&[50, 0, 50], &[false, true, true], &mut cur),
                Some(2)
            );
        }
        assert_eq!(smooth_wrr(&[0, 0], &[true, true], &mut [0, 0]), None);
    }

    #[test]
    fn least_loaded_prefers_fewest_in_flight_and_rotates_ties() {
        assert_eq!(least_loaded(&[3, 1, 2], &[false; 3], 0), Some(1));
        assert_eq!(least_loaded(&[1, 1], &[false; 2], 0), Some(0));
        assert_eq!(least_loaded(&[1, 1], &[false; 2], 1), Some(1));
        assert_eq!(least_loaded(&[0, 5], &[true, false], 0), Some(1));
        assert_eq!(least_loaded(&[0], &[true], 0), None);
        assert_eq!(least_loaded(&[], &[], 0), None);
    }

    #[test]
    fn mirroring_samples_the_requested_fraction_evenly() {
        let n = (0..1000).filter(|&k| mirror_this_one(k, 0.1)).count();
        assert_eq!(n, 100);
        assert!((0..10).all(|k| mirror_this_one(k, 1.0)));
        assert!((0..10).all(|k| !mirror_this_one(k, 0.0)));
    }

    #[test]
    fn judge_applies_each_configured_tolerance() {
        let c = Comparison {
            min_cosine: 0.998,
            max_abs_diff: 0.02,
            top1_disagreements: 0,
            rows: 4,
        };
        assert!(!judge(
            &c,
            &Tolerance {
                min_cosine: 0.999,
                ..Default::default()
            }
        ));
        assert!(judge(
            &c,
            &Tolerance {
                min_cosine: 0.99,
                ..Default::default()
            }
        ));
        assert!(!judge(
            &c,
            &Tolerance {
                max_abs: 0.01,
                ..Default::default()
            }
        ));
        let flipped = Comparison {
            top1_disagreements: 1,
            ..c
        };
        assert!(!judge(
            &flipped,
            &Tolerance {
                require_top1: true,
                ..Default::default()
            }
        ));
        assert!(judge(&flipped, &Tolerance::default()));
    }
}
