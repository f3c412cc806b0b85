//! Blue-green model rollouts.
//!
//! [`next`] is the whole state machine, pure: `(spec, status, observations, now) → (next status,
//! events)`. It runs on the leader every tick of [`driver`], which gathers the observations
//! (candidate pods' model state, routing acknowledgements and shadow/live counters from the
//! preprocess pods' `GetStats`) and writes the result to status. The reconcile loop then runs
//! whatever colors status names ([`color_replicas`] splits the stage's pods between them) and
//! the router pushes the traffic split status describes. Every fact needed to resume is in
//! status, so a new leader continues at the same step.
//!
//! ```text
//! idle ──spec.model changes──▶ Provisioning ──candidate ready, table acked──▶ Shadowing
//!   ▲                              │                                            │ parity ok
//!   │                              ▼ (deadline, crash, parity, errors, latency) ▼
//!   │                         RolledBack ◀──────────────────────────────── ShiftingTraffic
//!   │                                                                  steps…100%, held
//!   └── Complete ◀──scaleDownDelay── Promoted ◀─────────────────────────────────┘
//! ```

pub mod driver;
pub mod view;

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;

use crate::crd::{Color, ModelRef, RolloutPhase, RolloutStatus, ShadowStatus};
use crate::status::{Transition, truncate};
use crate::summary::{ContainerStatusSummary, ContainerTerminated, PodSummary};
use crate::validate::ValidRollout;

/// Annotation naming the candidate version to promote at once (skipping remaining steps).
pub const ANNOTATION_PROMOTE: &str = "tandem.dev/promote";
/// Annotation naming the candidate version whose rollout to abort.
pub const ANNOTATION_ABORT: &str = "tandem.dev/abort";

/// Fewest candidate requests in a step before its error rate is judged.
const MIN_ERROR_SAMPLES: u64 = 20;
/// Fewest requests per color in a step before latencies are compared.
const MIN_LATENCY_SAMPLES: u64 = 50;
/// Latencies below this are not compared (noise dominates).
const LATENCY_FLOOR_MS: f64 = 5.0;
/// Restarts after which a candidate container that keeps failing is a crash loop, which fails
/// the rollout at once (`CandidateCrashLoop`) instead of at `progressDeadline`. Between
/// restarts the kubelet backs off 10 s, 20 s, 40 s, … (it may restart the first crash at
/// once), so three restarts are half a minute to a minute of the same failure at start: a
/// fault that clears by itself (the model store briefly unreachable) still gets its retries,
/// while a wrong URI or checksum, which no restart fixes, fails in about a minute rather than
/// after 10 (the default deadline).
const CRASH_LOOP_RESTARTS: i32 = 3;
/// How much older than its rollout a candidate pod may look and still count as started for
/// it: `creationTimestamp` has whole seconds, and the API server's clock may trail the
/// operator's a little. An earlier candidate's pod on the same color (a halted rollout that a
/// fix superseded) is far older; the Deployment keeps it until a replacement is available
/// (`maxUnavailable: 0`), so it can be the only pod there until that replacement is created,
/// which under a full quota may be never, and its crash loop is not the new model's.
const POD_AGE_SLACK: Duration = Duration::from_secs(5);
/// Longest excerpt of a container's termination message quoted in a rollout's message.
const CRASH_MESSAGE_MAX: usize = 300;

/// A request from a person, read from the pipeline's annotations. It only applies when the
/// annotation names the version currently being rolled out, and the driver removes the
/// annotation once it has acted ([`consumed_annotation`]), so an old annotation never touches a
/// later rollout, even one of the same version string.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UserAction {
    /// Skip the remaining shadow and traffic steps.
    Promote,
    /// Stop, send all traffic back to the active color and remove the candidate.
    Abort,
}

/// The annotation a tick acted on, for the driver to remove: `tandem.dev/abort` when the
/// rollout went from in progress to `Aborted`, `tandem.dev/promote` when a person's promotion
/// made it `Promoted`. An annotation left on the object would otherwise act again on a later
/// rollout that reuses the version string (a fixed build shipped under the same version).
pub fn consumed_annotation(
    action: Option<UserAction>,
    before: Option<&RolloutStatus>,
    after: Option<&RolloutStatus>,
) -> Option<&'static str> {
    let was_in_progress = before
        .and_then(|r| r.phase)
        .is_some_and(RolloutPhase::in_progress);
    let now = after.and_then(|r| r.phase);
    match action? {
        UserAction::Abort if was_in_progress && now == Some(RolloutPhase::Aborted) => {
            Some(ANNOTATION_ABORT)
        }
        UserAction::Promote if was_in_progress && now == Some(RolloutPhase::Promoted) => {
            Some(ANNOTATION_PROMOTE)
        }
        _ => None,
    }
}

/// Requests one color served in the current traffic step (deltas since the step began).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ColorWindow {
    /// Requests completed.
    pub requests: u64,
    /// Requests that failed.
    pub errors: u64,
    /// Worst p99 latency any preprocess pod reports for the color (recent window), ms.
    pub p99_ms: f64,
}

/// Shadow counters summed over the preprocess pods that apply the current table.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ShadowCounts {
    /// Requests compared.
    pub compared: u64,
    /// Comparisons beyond the tolerance.
    pub mismatches: u64,
    /// Mirrored requests the candidate failed.
    pub errors: u64,
    /// Lowest cosine similarity seen, if any comparison happened.
    pub worst_cosine: Option<f64>,
    /// Largest absolute element difference seen.
    pub max_abs_diff: Option<f64>,
}

/// What the driver saw this tick.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Observations {
    /// Ready pods of the active color.
    pub active_ready: u32,
    /// Ready candidate pods that report the candidate model loaded and warmed up.
    pub candidate_ready: u32,
    /// Candidate pods wanted before traffic moves.
    pub candidate_wanted: u32,
    /// Ready pods of the candidate color still serving another model: a superseded
    /// candidate's, or a rolled-back one's not yet gone. They are in the routing table, and
    /// every request sent to them for the candidate's model fails, so nothing is mirrored or
    /// shifted until they have left.
    pub candidate_stale: u32,
    /// Why candidate pods are not ready, when their status says (`status::pod_problem`).
    pub candidate_problem: Option<String>,
    /// The candidate color's inference pods as watched, terminating ones included, while fewer
    /// than wanted are ready (for the crash-loop check).
    pub candidate_pods: Vec<Arc<PodSummary>>,
    /// Why the candidate's model cannot take what preprocess sends, when a preprocess pod found
    /// it in the model's metadata once the candidate was routed to.
    pub candidate_mismatch: Option<String>,
    /// The routing generation for the current status, once every ready preprocess pod holds
    /// it; `None` while any pod lags (or no table has been published yet).
    pub routes_acked: Option<u64>,
    /// Shadow counters for the candidate.
    pub shadow: ShadowCounts,
    /// The active color's requests in the current step.
    pub active_window: ColorWindow,
    /// The candidate's requests in the current step.
    pub candidate_window: ColorWindow,
}

/// Everything a decision depends on.
#[derive(Clone, Debug)]
pub struct Inputs<'a> {
    /// The model the spec asks for.
    pub spec_model: &'a ModelRef,
    /// The rollout policy.
    pub policy: &'a ValidRollout,
    /// The color serving live traffic.
    pub active_color: Color,
    /// The model it serves.
    pub active_model: &'a ModelRef,
    /// The rollout as recorded in status.
    pub rollout: Option<&'a RolloutStatus>,
    /// This tick's observations.
    pub obs: &'a Observations,
    /// A person's promote/abort request for the current candidate.
    pub action: Option<UserAction>,
    /// The time of this tick.
    pub now: Timestamp,
}

/// The machine's answer.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// The color serving live traffic after this tick.
    pub active_color: Color,
    /// Its model.
    pub active_model: ModelRef,
    /// The rollout to record.
    pub rollout: Option<RolloutStatus>,
    /// Transitions worth an Event.
    pub events: Vec<Transition>,
}

/// One step of the rollout state machine.
pub fn next(inp: &Inputs<'_>) -> Decision {
    let mut d = Decision {
        active_color: inp.active_color,
        active_model: inp.active_model.clone(),
        rollout: inp.rollout.cloned(),
        events: Vec::new(),
    };
    let spec = inp.spec_model;
    let phase = inp.rollout.and_then(|r| r.phase);
    match (phase, inp.rollout) {
        (Some(p), Some(r)) if p.in_progress() => {
            if spec == inp.active_model {
                d.rollout = None;
                d.events.push(normal(
                    "RolloutCancelled",
                    format!(
                        "spec.inference.model is back to the active {}; candidate {} removed",
                        version(inp.active_model),
                        color_of(r)
                    ),
                ));
            } else if r.candidate_model.as_ref() != Some(spec) {
                let previous = r.candidate_model.as_ref().map(version).unwrap_or_default();
                start(inp, &mut d);
                d.events[0] = normal(
                    "RolloutSuperseded",
                    format!(
                        "{} replaces candidate {previous} on {}; traffic stays on {}",
                        version(spec),
                        color_of(r),
                        inp.active_color.as_str()
                    ),
                );
            } else {
                progress(inp, r, p, &mut d);
            }
        }
        // After promotion the previous color runs until scaleDownDelay has passed.
        (Some(RolloutPhase::Promoted), Some(r))
            if spec == inp.active_model
                && elapsed_ms(r.step_started_at.as_ref(), inp.now)
                    >= millis(inp.policy.scale_down_delay) =>
        {
            let mut done = r.clone();
            let old = r.previous_color.map_or("the previous color", Color::as_str);
            done.phase = Some(RolloutPhase::Complete);
            done.previous_color = None;
            done.step_started_at = Some(time(inp.now));
            done.message = Some(format!(
                "{} serves all traffic on {}; {old} scaled away after scaleDownDelay",
                version(inp.active_model),
                inp.active_color.as_str()
            ));
            d.events.push(normal(
                "PreviousColorRetired",
                format!("{old} scaled away after scaleDownDelay"),
            ));
            d.rollout = Some(done);
        }
        (Some(RolloutPhase::RolledBack | RolloutPhase::Aborted), Some(r))
            if r.candidate_model.as_ref() == Some(spec) =>
        {
            // The failed model stays failed until the spec names another one.
        }
        (Some(RolloutPhase::RolledBack | RolloutPhase::Aborted), _) if spec == inp.active_model => {
            d.rollout = None;
        }
        _ if spec != inp.active_model => {
            if inp.obs.active_ready == 0 {
                // Nothing serves yet (a broken first model, say): there is no traffic to
                // protect or compare against, so the new model simply replaces it.
                d.active_model = spec.clone();
                d.rollout = None;
                d.events.push(normal(
                    "ModelReplaced",
                    format!(
                        "{} replaces {} in place: the active color had no ready pods, so there was no traffic to protect",
                        version(spec),
                        version(inp.active_model)
                    ),
                ));
            } else {
                start(inp, &mut d);
            }
        }
        _ => {}
    }
    d
}

/// Begins a rollout of the spec's model on the other color.
fn start(inp: &Inputs<'_>, d: &mut Decision) {
    let candidate = inp.active_color.other();
    let now = time(inp.now);
    d.rollout = Some(RolloutStatus {
        phase: Some(RolloutPhase::Provisioning),
        candidate_color: Some(candidate),
        candidate_model: Some(inp.spec_model.clone()),
        step: None,
        traffic_percent: 0,
        started_at: Some(now.clone()),
        step_started_at: Some(now),
        shadow: None,
        previous_color: None,
        previous_model: Some(inp.active_model.clone()),
        routes_generation: None,
        halted: false,
        candidate_unavailable_since: None,
        message: Some(format!(
            "starting {} candidate pod(s) of {} on {}",
            inp.policy.max_surge,
            version(inp.spec_model),
            candidate.as_str()
        )),
    });
    d.events.push(normal(
        "RolloutStarted",
        format!(
            "rolling out {} on {} (serving {} on {})",
            version(inp.spec_model),
            candidate.as_str(),
            version(inp.active_model),
            inp.active_color.as_str()
        ),
    ));
}

/// Advances a rollout that has a candidate running.
fn progress(inp: &Inputs<'_>, r: &RolloutStatus, phase: RolloutPhase, d: &mut Decision) {
    let obs = inp.obs;
    let policy = inp.policy;
    let mut next = r.clone();
    if let Some(g) = obs.routes_acked {
        next.routes_generation = i64::try_from(g).ok();
    }
    let candidate = r.candidate_color.unwrap_or(inp.active_color.other());

    match inp.action {
        Some(UserAction::Abort) => {
            end_without_candidate(
                inp,
                &mut next,
                RolloutPhase::Aborted,
                format!(
                    "aborted by a person ({ANNOTATION_ABORT}); all traffic is on {} ({}); {} stays unserved until spec.inference.model changes",
                    inp.active_color.as_str(),
                    version(inp.active_model),
                    version(inp.spec_model)
                ),
            );
            d.events.push(warning(
                "RolloutAborted",
                next.message.clone().unwrap_or_default(),
            ));
            d.rollout = Some(next);
            return;
        }
        Some(UserAction::Promote) if obs.candidate_ready > 0 => {
            promote(inp, r, d, "promoted by a person (tandem.dev/promote)");
            return;
        }
        _ => {}
    }
    if r.halted {
        d.rollout = Some(next);
        return;
    }
    // Every request the candidate would get fails: no point shadowing or stepping on.
    if let Some(why) = &obs.candidate_mismatch {
        let msg = format!(
            "candidate {} on {} does not take what preprocess sends: {why}",
            version(inp.spec_model),
            candidate.as_str()
        );
        fail(inp, next, d, "ModelMismatch", msg);
        return;
    }
    if matches!(
        phase,
        RolloutPhase::Shadowing | RolloutPhase::ShiftingTraffic
    ) {
        if candidate_unavailable(obs) {
            candidate_lost(inp, r, candidate, next, d);
            return;
        }
        if r.candidate_unavailable_since.is_some() {
            candidate_back(inp, r, phase, candidate, next, d);
            return;
        }
    }

    match phase {
        RolloutPhase::Provisioning => {
            let waited = elapsed_ms(r.step_started_at.as_ref(), inp.now);
            let ready =
                obs.candidate_ready >= obs.candidate_wanted.max(1) && obs.candidate_stale == 0;
            if ready && obs.routes_acked.is_some() && policy.paused && policy.shadow_requests == 0 {
                // Held before live traffic moves. (Shadowing moves none: a paused rollout may
                // start it and holds at its end, as in the Shadowing arm.)
                next.message = Some(format!(
                    "candidate {} ready on {}; paused before moving traffic (spec.rollout.paused)",
                    version(inp.spec_model),
                    candidate.as_str(),
                ));
            } else if ready && obs.routes_acked.is_some() {
                if policy.shadow_requests == 0 {
                    enter_step(inp, &mut next, 0);
                    d.events.push(normal(
                        "TrafficShifted",
                        format!(
                            "candidate ready, shadow skipped (shadow.requests = 0); {}% of traffic on {}",
                            next.traffic_percent,
                            candidate.as_str()
                        ),
                    ));
                } else {
                    next.phase = Some(RolloutPhase::Shadowing);
                    next.step_started_at = Some(time(inp.now));
                    next.shadow = Some(ShadowStatus::default());
                    next.message = Some(format!(
                        "mirroring live requests to {} and comparing outputs: 0/{} compared",
                        candidate.as_str(),
                        policy.shadow_requests
                    ));
                    d.events.push(normal(
                        "ShadowStarted",
                        format!(
                            "{} ready on {}; comparing {} mirrored requests against {}",
                            version(inp.spec_model),
                            candidate.as_str(),
                            policy.shadow_requests,
                            inp.active_color.as_str()
                        ),
                    ));
                }
            } else if let Some(msg) = crash_loop_failure(inp, r, candidate) {
                // No restart fixes what makes every pod exit at start (a wrong URI or
                // checksum): waiting out progressDeadline would only delay the same answer.
                fail(inp, next, d, "CandidateCrashLoop", msg);
                return;
            } else if waited >= millis(policy.progress_deadline) {
                let mut msg = format!(
                    "candidate {} on {} had {}/{} pods ready with the model loaded after {}s (progressDeadline {}s)",
                    version(inp.spec_model),
                    candidate.as_str(),
                    obs.candidate_ready,
                    obs.candidate_wanted.max(1),
                    waited / 1000,
                    policy.progress_deadline.as_secs()
                );
                if let Some(why) = &obs.candidate_problem {
                    msg.push_str(": ");
                    msg.push_str(why);
                }
                fail(inp, next, d, "ProgressDeadlineExceeded", msg);
                return;
            } else {
                next.message = Some(if ready {
                    "candidate ready; waiting for every preprocess pod to apply the routing table"
                        .to_owned()
                } else if obs.candidate_stale > 0 {
                    format!(
                        "waiting for {} pod(s) on {} still serving an earlier candidate to leave before {} takes requests ({}/{} ready)",
                        obs.candidate_stale,
                        candidate.as_str(),
                        version(inp.spec_model),
                        obs.candidate_ready,
                        obs.candidate_wanted.max(1)
                    )
                } else {
                    let mut msg = format!(
                        "waiting for candidate pods to load {}: {}/{} ready",
                        version(inp.spec_model),
                        obs.candidate_ready,
                        obs.candidate_wanted.max(1)
                    );
                    if let Some(why) = &obs.candidate_problem {
                        msg.push_str("; ");
                        msg.push_str(why);
                    }
                    msg
                });
            }
        }
        RolloutPhase::Shadowing => {
            let s = merge_shadow(r.shadow.as_ref(), &obs.shadow);
            next.shadow = Some(s.clone());
            let target = u64::from(policy.shadow_requests);
            let compared = u64::try_from(s.compared).unwrap_or(0);
            let mismatches = u64::try_from(s.mismatches).unwrap_or(0);
            let errors = u64::try_from(s.errors).unwrap_or(0);
            // Fail as soon as the budget is spent: waiting for the rest cannot pass.
            let budget = (policy.max_mismatch_rate * target as f64).floor() as u64;
            if mismatches > budget
                || (compared >= target && rate(mismatches, compared) > policy.max_mismatch_rate)
            {
                let msg = format!(
                    "shadow parity failed: {mismatches} of {compared} compared requests ({:.1}%) differed beyond the tolerance ({}), above maxMismatchRate {:.1}%{}",
                    100.0 * rate(mismatches, compared),
                    tolerance_text(policy),
                    100.0 * policy.max_mismatch_rate,
                    worst_text(&s)
                );
                fail(inp, next, d, "ShadowParityFailed", msg);
                return;
            }
            if errors > budget.max(1) {
                let msg = format!(
                    "candidate failed {errors} mirrored requests during shadowing ({compared} compared), above maxMismatchRate {:.1}% of {target}",
                    100.0 * policy.max_mismatch_rate
                );
                fail(inp, next, d, "ShadowErrors", msg);
                return;
            }
            if compared >= target && !policy.paused {
                enter_step(inp, &mut next, 0);
                d.events.push(normal(
                    "ShadowPassed",
                    format!(
                        "shadow parity passed: {mismatches} of {compared} compared requests differed ({:.2}%){}; {}% of traffic on {}",
                        100.0 * rate(mismatches, compared),
                        worst_text(&s),
                        next.traffic_percent,
                        candidate.as_str()
                    ),
                ));
            } else {
                next.message = Some(format!(
                    "mirroring live requests to {}: {compared}/{target} compared, {mismatches} mismatched{}{}",
                    candidate.as_str(),
                    worst_text(&s),
                    if policy.paused { " (paused)" } else { "" }
                ));
            }
        }
        RolloutPhase::ShiftingTraffic => {
            let cand = obs.candidate_window;
            let act = obs.active_window;
            if cand.requests >= MIN_ERROR_SAMPLES
                && rate(cand.errors, cand.requests)
                    > rate(act.errors, act.requests) + policy.max_error_rate
            {
                let msg = format!(
                    "candidate error rate {:.1}% ({} of {}) exceeds the active color's {:.1}% by more than maxErrorRate {:.1}% at {}% traffic",
                    100.0 * rate(cand.errors, cand.requests),
                    cand.errors,
                    cand.requests,
                    100.0 * rate(act.errors, act.requests),
                    100.0 * policy.max_error_rate,
                    r.traffic_percent
                );
                fail(inp, next, d, "CandidateErrors", msg);
                return;
            }
            if policy.max_latency_ratio > 0.0
                && cand.requests >= MIN_LATENCY_SAMPLES
                && act.requests >= MIN_LATENCY_SAMPLES
                && cand.p99_ms > LATENCY_FLOOR_MS
                && cand.p99_ms > policy.max_latency_ratio * act.p99_ms.max(LATENCY_FLOOR_MS)
            {
                let msg = format!(
                    "candidate p99 {:.1} ms is more than {:.1}x the active color's {:.1} ms at {}% traffic",
                    cand.p99_ms, policy.max_latency_ratio, act.p99_ms, r.traffic_percent
                );
                fail(inp, next, d, "CandidateLatency", msg);
                return;
            }
            let step = usize::try_from(r.step.unwrap_or(0)).unwrap_or(0);
            let held = elapsed_ms(r.step_started_at.as_ref(), inp.now);
            let due = held >= millis(policy.step_duration);
            if obs.routes_acked.is_none() {
                next.message = Some(format!(
                    "{}% of traffic on {}: waiting for every preprocess pod to apply the routing table",
                    r.traffic_percent,
                    candidate.as_str()
                ));
            } else if due && !policy.paused {
                // The first step above the share held now, not the next index: `steps` may have
                // been edited since this step was entered.
                let next_step = policy
                    .steps
                    .iter()
                    .position(|&p| i32::from(p) > r.traffic_percent);
                if let Some(next_step) = next_step {
                    enter_step(inp, &mut next, next_step);
                    d.events.push(normal(
                        "TrafficShifted",
                        format!(
                            "{}% of traffic on {} (step {}/{}); candidate {} requests, {} errors in the last step",
                            next.traffic_percent,
                            candidate.as_str(),
                            next_step + 1,
                            policy.steps.len(),
                            cand.requests,
                            cand.errors
                        ),
                    ));
                } else {
                    promote(inp, r, d, "every traffic step passed");
                    return;
                }
            } else {
                next.message = Some(format!(
                    "{}% of traffic on {} (step {}/{}), {}s of {}s held; candidate {} requests, {} errors{}",
                    r.traffic_percent,
                    candidate.as_str(),
                    step + 1,
                    policy.steps.len(),
                    held / 1000,
                    policy.step_duration.as_secs(),
                    cand.requests,
                    cand.errors,
                    if policy.paused { " (paused)" } else { "" }
                ));
            }
        }
        _ => {}
    }
    d.rollout = Some(next);
}

/// The `CandidateCrashLoop` message when no candidate pod is ready and every pod started for
/// the rollout is crash-looping ([`crash_loop`]).
fn crash_loop_failure(inp: &Inputs<'_>, r: &RolloutStatus, candidate: Color) -> Option<String> {
    let obs = inp.obs;
    let crash = r
        .started_at
        .as_ref()
        .filter(|_| obs.candidate_ready == 0)
        .and_then(|since| crash_loop(&obs.candidate_pods, since.0))?;
    Some(format!(
        "candidate {} on {} is crash-looping with no pod ready ({} pod(s), each restarted at least {CRASH_LOOP_RESTARTS} times): {}",
        version(inp.spec_model),
        candidate.as_str(),
        crash.pods,
        crash.detail
    ))
}

/// Whether a candidate that had been ready has no ready pod now: none answers `GetStats` with
/// the model loaded, and none is Ready for Kubernetes either (so one `GetStats` call that timed
/// out does not count as a loss).
fn candidate_unavailable(obs: &Observations) -> bool {
    obs.candidate_ready == 0
        && !obs
            .candidate_pods
            .iter()
            .any(|p| !p.terminating && p.is_ready())
}

/// Shadowing or shifting traffic with no ready candidate pod. A crash loop fails the rollout
/// at once, as in provisioning. Otherwise live traffic goes back to the active color (which
/// gets its pods back with it, [`color_replicas`]) and the rollout waits for a pod, up to
/// `progressDeadline` from the loss.
fn candidate_lost(
    inp: &Inputs<'_>,
    r: &RolloutStatus,
    candidate: Color,
    mut next: RolloutStatus,
    d: &mut Decision,
) {
    let policy = inp.policy;
    next.traffic_percent = 0;
    if let Some(msg) = crash_loop_failure(inp, r, candidate) {
        fail(inp, next, d, "CandidateCrashLoop", msg);
        return;
    }
    let why = inp
        .obs
        .candidate_problem
        .as_deref()
        .map(|w| format!(": {w}"))
        .unwrap_or_default();
    let since = r
        .candidate_unavailable_since
        .clone()
        .unwrap_or_else(|| time(inp.now));
    let lost_ms = elapsed_ms(Some(&since), inp.now);
    if lost_ms >= millis(policy.progress_deadline) {
        let msg = format!(
            "candidate {} on {} has had no ready pod for {}s (progressDeadline {}s){why}",
            version(inp.spec_model),
            candidate.as_str(),
            lost_ms / 1000,
            policy.progress_deadline.as_secs()
        );
        fail(inp, next, d, "CandidateUnavailable", msg);
        return;
    }
    if r.candidate_unavailable_since.is_none() {
        d.events.push(warning(
            "CandidateUnavailable",
            format!(
                "candidate {} on {} has no ready pod{why}; all live traffic is back on {}, and the rollout fails if none is ready within progressDeadline ({}s)",
                version(inp.spec_model),
                candidate.as_str(),
                inp.active_color.as_str(),
                policy.progress_deadline.as_secs()
            ),
        ));
    }
    next.message = Some(format!(
        "candidate {} on {} has had no ready pod for {}s{why}; all live traffic is on {} until one is ready again (progressDeadline {}s)",
        version(inp.spec_model),
        candidate.as_str(),
        lost_ms / 1000,
        inp.active_color.as_str(),
        policy.progress_deadline.as_secs()
    ));
    next.candidate_unavailable_since = Some(since);
    d.rollout = Some(next);
}

/// A candidate pod is ready again after [`candidate_lost`]: shadowing resumes where it was
/// (its counters only grow), a traffic step starts over, with its share and a full
/// `stepDuration`, so it is judged on requests the candidate served after its return.
fn candidate_back(
    inp: &Inputs<'_>,
    r: &RolloutStatus,
    phase: RolloutPhase,
    candidate: Color,
    mut next: RolloutStatus,
    d: &mut Decision,
) {
    next.candidate_unavailable_since = None;
    let note = if phase == RolloutPhase::ShiftingTraffic {
        let step = usize::try_from(r.step.unwrap_or(0)).unwrap_or(0);
        enter_step(inp, &mut next, step);
        format!(
            "candidate {} on {} has a ready pod again; step {}/{} starts over with {}% of traffic",
            version(inp.spec_model),
            candidate.as_str(),
            step + 1,
            inp.policy.steps.len(),
            next.traffic_percent
        )
    } else {
        let compared = r.shadow.as_ref().map_or(0, |s| s.compared);
        let note = format!(
            "candidate {} on {} has a ready pod again; mirroring resumes at {compared}/{} compared",
            version(inp.spec_model),
            candidate.as_str(),
            inp.policy.shadow_requests
        );
        next.message = Some(note.clone());
        note
    };
    d.events.push(normal("CandidateRecovered", note));
    d.rollout = Some(next);
}

fn enter_step(inp: &Inputs<'_>, next: &mut RolloutStatus, step: usize) {
    let pct = inp.policy.steps.get(step).copied().unwrap_or(100);
    next.phase = Some(RolloutPhase::ShiftingTraffic);
    next.step = i32::try_from(step).ok();
    next.traffic_percent = i32::from(pct);
    next.step_started_at = Some(time(inp.now));
    next.message = Some(format!(
        "{pct}% of traffic on {} (step {}/{})",
        next.candidate_color.map_or("the candidate", Color::as_str),
        step + 1,
        inp.policy.steps.len()
    ));
}

fn promote(inp: &Inputs<'_>, r: &RolloutStatus, d: &mut Decision, why: &str) {
    let candidate = r.candidate_color.unwrap_or(inp.active_color.other());
    let model = r
        .candidate_model
        .clone()
        .unwrap_or_else(|| inp.spec_model.clone());
    let mut next = r.clone();
    next.phase = Some(RolloutPhase::Promoted);
    next.previous_color = Some(inp.active_color);
    next.previous_model = Some(inp.active_model.clone());
    next.candidate_color = None;
    next.step = None;
    // The candidate model is now the active one and takes all live traffic.
    next.traffic_percent = 100;
    next.halted = false;
    next.candidate_unavailable_since = None;
    next.step_started_at = Some(time(inp.now));
    next.message = Some(format!(
        "{} is active on {} ({why}); {} keeps running {}s for an instant undo",
        version(&model),
        candidate.as_str(),
        inp.active_color.as_str(),
        inp.policy.scale_down_delay.as_secs()
    ));
    d.events.push(normal(
        "Promoted",
        format!(
            "{} promoted on {} ({why}); previous {} on {}",
            version(&model),
            candidate.as_str(),
            version(inp.active_model),
            inp.active_color.as_str()
        ),
    ));
    d.active_color = candidate;
    d.active_model = model;
    d.rollout = Some(next);
}

fn fail(inp: &Inputs<'_>, mut next: RolloutStatus, d: &mut Decision, reason: &str, msg: String) {
    if inp.policy.auto_rollback {
        let note = format!(
            "{msg}; rolled back: all traffic is on {} ({})",
            inp.active_color.as_str(),
            version(inp.active_model)
        );
        end_without_candidate(inp, &mut next, RolloutPhase::RolledBack, note.clone());
        d.events.push(warning(reason, note));
    } else {
        next.halted = true;
        let note = format!(
            "{msg}; autoRollback is off: holding {}% on the candidate until it is aborted, promoted or the spec changes",
            next.traffic_percent
        );
        next.message = Some(note.clone());
        d.events.push(warning("RolloutHalted", note));
    }
    d.rollout = Some(next);
}

fn end_without_candidate(
    inp: &Inputs<'_>,
    next: &mut RolloutStatus,
    phase: RolloutPhase,
    message: String,
) {
    next.phase = Some(phase);
    next.candidate_color = None;
    next.step = None;
    next.traffic_percent = 0;
    next.halted = false;
    next.candidate_unavailable_since = None;
    next.step_started_at = Some(time(inp.now));
    next.message = Some(message);
}

/// Candidate pods that all crash at start, as [`crash_loop`] finds them.
#[derive(Clone, Debug, PartialEq)]
struct CrashLoop {
    /// How many pods of the rollout there are, every one crash-looping.
    pods: usize,
    /// The container, its restarts and how it last ended, of the pod with the fewest restarts
    /// (as many as every pod has had at least).
    detail: String,
}

/// Whether `pod` was created for the rollout begun at `since` ([`POD_AGE_SLACK`] allowed)
/// and is not terminating: an earlier candidate's pod on the same color is not.
fn started_for(pod: &PodSummary, since: Timestamp) -> bool {
    let since = since.as_millisecond().saturating_sub(millis(POD_AGE_SLACK));
    !pod.terminating && pod.created.is_some_and(|t| t.as_millisecond() >= since)
}

/// Why the candidate's pods are not ready, for the rollout's message: the first problem
/// [`crate::status::pod_problem`] finds among the pods started for the rollout begun at
/// `since` (all of them when it is unknown). An earlier candidate's crash, still on the same
/// color until a replacement is ready, is not the new model's.
pub fn candidate_problem(pods: &[Arc<PodSummary>], since: Option<Timestamp>) -> Option<String> {
    crate::status::pod_problem(
        pods.iter()
            .map(AsRef::as_ref)
            .filter(|p| since.is_none_or(|s| started_for(p, s))),
    )
    .map(|p| p.message)
}

/// `Some` when the rollout begun at `since` has at least one candidate pod started for it
/// (created since, [`POD_AGE_SLACK`] allowed) that is not terminating, and every such pod is
/// crash-looping ([`crashing_container`]); a single ready or still-starting pod is `None`.
fn crash_loop(pods: &[Arc<PodSummary>], since: Timestamp) -> Option<CrashLoop> {
    let mut crashing = Vec::new();
    for pod in pods.iter().filter(|p| started_for(p, since)) {
        crashing.push(crashing_container(pod)?);
    }
    let pods = crashing.len();
    let c = crashing.into_iter().min_by_key(|c| c.restart_count)?;
    let mut detail = format!("container {} restarted {} times", c.name, c.restart_count);
    match last_termination(c) {
        Some(t) => {
            detail.push_str(&format!(", last exited with code {}", t.exit_code));
            if let Some(reason) = t.telling_reason() {
                detail.push_str(&format!(" ({})", truncate(reason, 64)));
            }
            if let Some(m) = t.why() {
                detail.push_str(": ");
                detail.push_str(&truncate(m, CRASH_MESSAGE_MAX));
            }
        }
        None => detail.push_str(", waiting in CrashLoopBackOff"),
    }
    Some(CrashLoop { pods, detail })
}

/// The container (the worker or an init container) that makes a pod crash-loop: the pod is not
/// ready, and the container has restarted at least [`CRASH_LOOP_RESTARTS`] times and now waits
/// in `CrashLoopBackOff` or last ended with a non-zero code (it may be running again, between
/// two crashes). Of several, the most restarted.
fn crashing_container(pod: &PodSummary) -> Option<&ContainerStatusSummary> {
    if pod.is_ready() {
        return None;
    }
    let status = &pod.status;
    status
        .init_container_statuses
        .iter()
        .chain(&status.container_statuses)
        .filter(|c| c.restart_count >= CRASH_LOOP_RESTARTS)
        .filter(|c| {
            let backing_off = c
                .state
                .waiting
                .as_ref()
                .is_some_and(|w| w.reason.as_deref() == Some("CrashLoopBackOff"));
            backing_off || last_termination(c).is_some_and(|t| t.exit_code != 0)
        })
        .max_by_key(|c| c.restart_count)
}

/// How the container last ended: now, if it is terminated, or before its last restart.
fn last_termination(c: &ContainerStatusSummary) -> Option<&ContainerTerminated> {
    c.state
        .terminated
        .as_ref()
        .or(c.last_state.terminated.as_ref())
}

/// Counters only grow: a preprocess pod that restarts or goes away takes its counts with it,
/// and what was already seen must not be forgotten.
fn merge_shadow(prev: Option<&ShadowStatus>, seen: &ShadowCounts) -> ShadowStatus {
    let prev = prev.cloned().unwrap_or_default();
    let grow = |a: i64, b: u64| a.max(i64::try_from(b).unwrap_or(i64::MAX));
    let min = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, y) => x.or(y),
    };
    let max = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(x), Some(y)) => Some(x.max(y)),
        (x, y) => x.or(y),
    };
    ShadowStatus {
        compared: grow(prev.compared, seen.compared),
        mismatches: grow(prev.mismatches, seen.mismatches),
        errors: grow(prev.errors, seen.errors),
        worst_cosine: min(prev.worst_cosine, seen.worst_cosine),
        max_abs_diff: max(prev.max_abs_diff, seen.max_abs_diff),
    }
}

/// The percentage of live traffic the candidate color takes: the current step while traffic
/// shifts, 0 in every other phase (shadowing mirrors traffic, it takes none). The router's
/// tables, the printed TRAFFIC column and the `/metrics` traffic gauges all derive from this.
pub fn candidate_share(rollout: Option<&RolloutStatus>) -> u32 {
    rollout
        .filter(|r| r.phase == Some(RolloutPhase::ShiftingTraffic))
        .map_or(0, |r| {
            u32::try_from(r.traffic_percent.clamp(0, 100)).unwrap_or(0)
        })
}

/// Live traffic per color as `/metrics` exports it: while traffic shifts, the active color
/// keeps `100 - share` and the candidate takes the share; otherwise the active color takes
/// everything and the other color is listed with 0.
pub fn traffic_weights(active: Color, rollout: Option<&RolloutStatus>) -> Vec<(&'static str, i64)> {
    match rollout.filter(|r| r.phase == Some(RolloutPhase::ShiftingTraffic)) {
        Some(r) => {
            let pct = i64::from(candidate_share(Some(r)));
            let mut w = vec![(active.as_str(), 100 - pct)];
            if let Some(c) = r.candidate_color {
                w.push((c.as_str(), pct));
            }
            w
        }
        None => vec![(active.as_str(), 100), (active.other().as_str(), 0)],
    }
}

/// Splits the inference stage's desired pods between the colors status names: `(active,
/// other)`. While a candidate shadows or takes a share of traffic, it runs
/// `max(maxSurge, ⌈total·share⌉)` pods and the active color keeps what its own share needs, so
/// a swap costs `maxSurge` extra pods rather than a second full copy; after promotion the
/// previous color keeps `maxSurge` pods until `scaleDownDelay`.
pub fn color_replicas(total: u32, rollout: Option<&RolloutStatus>, max_surge: u32) -> (u32, u32) {
    let Some(r) = rollout else {
        return (total, 0);
    };
    match r.phase {
        Some(RolloutPhase::Provisioning | RolloutPhase::Shadowing) => (total, max_surge),
        Some(RolloutPhase::ShiftingTraffic) => {
            let pct = u32::try_from(r.traffic_percent.clamp(0, 100)).unwrap_or(0);
            let candidate = (total * pct).div_ceil(100).max(max_surge);
            let active = (total * (100 - pct)).div_ceil(100).max(1);
            (active, candidate)
        }
        Some(RolloutPhase::Promoted) => (total, max_surge),
        _ => (total, 0),
    }
}

fn rate(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

fn tolerance_text(p: &ValidRollout) -> String {
    let mut parts = vec![format!("cosine >= {}", p.cosine_tolerance)];
    if p.max_abs_diff > 0.0 {
        parts.push(format!("max |diff| <= {}", p.max_abs_diff));
    }
    if p.top1 {
        parts.push("same top-1".to_owned());
    }
    parts.join(", ")
}

fn worst_text(s: &ShadowStatus) -> String {
    match (s.worst_cosine, s.max_abs_diff) {
        (Some(c), Some(m)) => format!("; worst cosine {c:.6}, max |diff| {m:.4}"),
        (Some(c), None) => format!("; worst cosine {c:.6}"),
        _ => String::new(),
    }
}

fn version(m: &ModelRef) -> String {
    format!("{}:{}", m.name, m.version)
}

fn color_of(r: &RolloutStatus) -> &'static str {
    r.candidate_color.map_or("candidate", Color::as_str)
}

fn time(t: Timestamp) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Time {
    k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(t)
}

fn elapsed_ms(
    since: Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    now: Timestamp,
) -> i64 {
    since.map_or(i64::MAX, |t| {
        now.as_millisecond().saturating_sub(t.0.as_millisecond())
    })
}

fn millis(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn normal(reason: &str, note: String) -> Transition {
    Transition {
        warning: false,
        reason: reason.to_owned(),
        note,
    }
}

fn warning(reason: &str, note: String) -> Transition {
    Transition {
        warning: true,
        reason: reason.to_owned(),
        note,
    }
}

#[cfg(test)]
mod tests;
