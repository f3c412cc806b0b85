//! Pure status computation: observations of the owned Deployments and their pods in, the next
//! `InferencePipelineStatus` out. Conditions keep `lastTransitionTime` while their status is
//! unchanged, and every message says why.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::crd::{
    Color, InferencePipelineStatus, ModelRef, Phase, RolloutPhase, RolloutStatus, StageStatus,
    StatusSummary,
};
use crate::summary::{ContainerStatusSummary, PodSummary};
use crate::validate::ValidateError;

/// Condition type: every stage has its desired pods ready.
pub const READY: &str = "Ready";
/// Condition type: pods are being created or replaced.
pub const PROGRESSING: &str = "Progressing";
/// Condition type: something keeps pods from becoming ready, or the spec is invalid.
pub const DEGRADED: &str = "Degraded";
/// Reason: the preprocess pods found that the active model cannot take what they send.
pub const MODEL_MISMATCH: &str = "ModelMismatch";
/// Degraded reasons that a rollout's end sets. The rollout driver publishes that transition as
/// its own Event, with the failure's reason and numbers (`ShadowParityFailed`,
/// `ProgressDeadlineExceeded`, `RolloutHalted`, `RolloutAborted`, …).
const ROLLOUT_REASONS: [&str; 3] = ["RolledBack", "RolloutAborted", "RolloutHalted"];

/// What was observed of one Deployment (from the server-side apply response) and its pods.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeploymentObservation {
    /// Pods the Deployment should run (`spec.replicas` as applied).
    pub desired: i32,
    /// Pods that exist.
    pub replicas: i32,
    /// Pods that are ready.
    pub ready: i32,
    /// Pods on the current template.
    pub updated: i32,
    /// Whether the Deployment controller has seen the latest spec, `replicas` aside: a change
    /// of `replicas` alone leaves the pods as they are, so the counts it reports still hold
    /// (see [`SpecSince`]).
    pub observed_current: bool,
    /// Why pods are not ready, when it is known (unschedulable, crash loop, image pull).
    pub problem: Option<Problem>,
}

/// Why pods of a stage are not running.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// PascalCase reason for the Degraded condition: `PodsUnschedulable` or `PodsFailing`.
    pub reason: &'static str,
    /// Human-readable cause, e.g. `Insufficient nvidia.com/gpu`.
    pub message: String,
}

impl DeploymentObservation {
    fn is_ready(&self) -> bool {
        self.observed_current && self.ready >= self.desired && self.updated >= self.desired
    }

    /// Whether the stage serves: every desired pod ready, or, for a stage that was ready with
    /// `before` pods, a change of `replicas` alone under way (every pod on the current spec)
    /// with at least as many pods ready as before or as now desired, whichever is fewer. A
    /// scale-up fails no request while the new pods start, nor does a scale-down while the
    /// extra pods go.
    fn serves(&self, before: Option<i32>) -> bool {
        self.is_ready()
            || (self.observed_current
                && self.updated >= self.replicas
                && before.is_some_and(|b| self.ready >= self.desired.min(b)))
    }
}

/// Per owned Deployment: the first generation that carried its current spec, `replicas`
/// aside. A generation newer than that changed only `replicas` (the autoscaler, or
/// `replicas.min`/`max`), so a Deployment controller that has not observed it yet still
/// reports the current pods. Kept per pipeline, forgotten with it; an operator that restarts
/// starts from the generation it first sees (as before: the lag counts until observed).
#[derive(Debug, Default)]
pub struct SpecSince {
    by_pipeline: HashMap<Arc<str>, Vec<SpecRecord>>,
}

#[derive(Debug, Clone, Copy)]
struct SpecRecord {
    deployment: u64,
    spec: u64,
    since: i64,
}

impl SpecSince {
    /// The first generation of Deployment `deployment` (of `pipeline`) whose spec without
    /// `replicas` hashes to `spec`, given that it is now at `generation`.
    pub fn since(
        &mut self,
        pipeline: &Arc<str>,
        deployment: &str,
        spec: u64,
        generation: i64,
    ) -> i64 {
        let deployment = {
            let mut h = DefaultHasher::new();
            deployment.hash(&mut h);
            h.finish()
        };
        let records = self.by_pipeline.entry(pipeline.clone()).or_default();
        match records.iter_mut().find(|r| r.deployment == deployment) {
            // A generation below the record's: the Deployment was deleted and created anew.
            Some(r) if r.spec == spec && r.since <= generation => r.since,
            Some(r) => {
                *r = SpecRecord {
                    deployment,
                    spec,
                    since: generation,
                };
                generation
            }
            None => {
                records.push(SpecRecord {
                    deployment,
                    spec,
                    since: generation,
                });
                generation
            }
        }
    }

    /// Drops a deleted pipeline's records.
    pub fn forget(&mut self, pipeline: &str) {
        self.by_pipeline.remove(pipeline);
    }
}

/// Everything status is computed from.
#[derive(Clone, Debug, PartialEq)]
pub struct Observation {
    /// The pipeline's `metadata.generation`.
    pub generation: Option<i64>,
    /// The preprocess Deployment.
    pub preprocess: DeploymentObservation,
    /// The active color's inference Deployment.
    pub inference: DeploymentObservation,
    /// The active color.
    pub active_color: Color,
    /// The model it serves.
    pub active_model: ModelRef,
    /// The rollout in progress, carried through unchanged (the rollout machine owns it).
    pub rollout: Option<Box<RolloutStatus>>,
}

/// A notable transition worth a Kubernetes Event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    /// `Normal` or `Warning`.
    pub warning: bool,
    /// PascalCase reason.
    pub reason: String,
    /// Human-readable note.
    pub note: String,
}

/// The status for a valid pipeline.
pub fn compute(
    prev: Option<&InferencePipelineStatus>,
    obs: &Observation,
    now: &Time,
) -> InferencePipelineStatus {
    let prev_conditions = prev.map(|s| s.conditions.as_slice()).unwrap_or_default();
    let pre = &obs.preprocess;
    let inf = &obs.inference;
    // Written by the autoscaler from the preprocess pods' model checks.
    let mismatch = prev
        .and_then(|s| s.preprocess.as_ref())
        .and_then(|s| s.model_mismatch.as_deref())
        .map(|why| {
            format!(
                "{}:{} on {} does not take what preprocess sends, so every request fails: {why}",
                obs.active_model.name,
                obs.active_model.version,
                obs.active_color.as_str()
            )
        });
    // The ready pods of each stage when the pipeline was last Ready: a scale-up or -down is
    // measured against them (see `DeploymentObservation::serves`).
    let was_ready = prev_conditions
        .iter()
        .any(|c| c.type_ == READY && c.status == "True");
    let before = |s: Option<&StageStatus>| s.filter(|_| was_ready).map(|s| s.ready_replicas);
    let pre_serves = pre.serves(before(prev.and_then(|s| s.preprocess.as_ref())));
    let inf_serves = inf.serves(before(prev.and_then(|s| s.inference.as_ref())));
    let pods_ready = pre_serves && inf_serves;
    let ready = pods_ready && mismatch.is_none();
    // Serving, with pods still coming or going after a change of `replicas`.
    let scaling = pods_ready && !(pre.is_ready() && inf.is_ready());
    let rollout = obs.rollout.as_deref();
    let rolling = rollout
        .filter(|r| !r.halted && r.phase.is_some_and(RolloutPhase::in_progress))
        .map(|r| r.message.clone().unwrap_or_default());
    let is_rolling = rolling.is_some();
    let problem = stage_problem("inference", inf)
        .or_else(|| stage_problem("preprocess", pre))
        .or_else(|| mismatch.clone().map(|m| (MODEL_MISMATCH, m)))
        .or_else(|| rollout.and_then(rollout_problem));

    let mut conditions = Vec::with_capacity(3);
    let (ready_reason, ready_message) = if ready {
        (
            "AllPodsReady",
            format!(
                "{}/{} preprocess and {}/{} inference pods ready",
                pre.ready, pre.desired, inf.ready, inf.desired
            ),
        )
    } else if !inf_serves {
        ("InferenceNotReady", not_ready_message("inference", inf))
    } else if !pre_serves {
        ("PreprocessNotReady", not_ready_message("preprocess", pre))
    } else {
        (MODEL_MISMATCH, mismatch.clone().unwrap_or_default())
    };
    conditions.push(condition(
        prev_conditions,
        READY,
        ready,
        ready_reason,
        ready_message,
        obs.generation,
        now,
    ));

    let progressing = (!ready || is_rolling || scaling) && problem.is_none();
    let (p_reason, p_message) = if let Some(message) = rolling.filter(|_| progressing) {
        ("RollingOut", message)
    } else if progressing && !ready {
        let stage = if inf_serves {
            ("preprocess", pre)
        } else {
            ("inference", inf)
        };
        ("PodsStarting", not_ready_message(stage.0, stage.1))
    } else if progressing {
        let stage = if inf.is_ready() {
            ("preprocess", pre)
        } else {
            ("inference", inf)
        };
        (
            "Scaling",
            format!("serving while {}", not_ready_message(stage.0, stage.1)),
        )
    } else if ready && !scaling {
        ("Stable", "every stage runs its desired pods".to_owned())
    } else if pods_ready && !ready {
        (
            "Blocked",
            "requests cannot be served; see the Degraded condition".to_owned(),
        )
    } else {
        (
            "Blocked",
            "pods cannot become ready; see the Degraded condition".to_owned(),
        )
    };
    conditions.push(condition(
        prev_conditions,
        PROGRESSING,
        progressing,
        p_reason,
        p_message,
        obs.generation,
        now,
    ));

    let (d_reason, d_message) = match &problem {
        Some((reason, message)) => (*reason, message.clone()),
        None => ("AsExpected", "no problems observed".to_owned()),
    };
    conditions.push(condition(
        prev_conditions,
        DEGRADED,
        problem.is_some(),
        d_reason,
        d_message,
        obs.generation,
        now,
    ));

    let phase = if problem.is_some() {
        Phase::Degraded
    } else if ready && !is_rolling {
        // A change of `replicas` under way is no reason to leave `Ready`: the pipeline serves.
        Phase::Ready
    } else if ready {
        Phase::Progressing
    } else if pre.ready == 0 && inf.ready == 0 {
        Phase::Pending
    } else {
        Phase::Progressing
    };

    // Queue depth and the last scale decision belong to the autoscaler: carried over as they are.
    let autoscaled = |s: Option<&StageStatus>| s.cloned().unwrap_or_default();
    let prev_pre = autoscaled(prev.and_then(|s| s.preprocess.as_ref()));
    let prev_inf = autoscaled(prev.and_then(|s| s.inference.as_ref()));
    let preprocess = StageStatus {
        replicas: pre.replicas,
        ready_replicas: pre.ready,
        desired_replicas: Some(pre.desired),
        ..prev_pre
    };
    // While two colors run, `desiredReplicas` is the stage total that `plan()` splits between
    // them, not the active color's share: writing the share back would shrink the total on
    // every reconcile and fight the autoscaler.
    let two_colors = obs
        .rollout
        .as_ref()
        .and_then(|r| r.phase)
        .is_some_and(|p| p.in_progress() || p == RolloutPhase::Promoted);
    let inference_desired = match prev_inf.desired_replicas {
        Some(total) if two_colors => total,
        _ => inf.desired,
    };
    let inference = StageStatus {
        replicas: inf.replicas,
        ready_replicas: inf.ready,
        desired_replicas: Some(inference_desired),
        ..prev_inf
    };
    let summary = StatusSummary {
        model: format!("{}:{}", obs.active_model.name, obs.active_model.version),
        traffic: traffic(obs.active_color, obs.rollout.as_deref()),
        preprocess: format!("{}/{}", pre.ready, pre.desired),
        inference: format!("{}/{}", inf.ready, inf.desired),
        queue_depth: preprocess.queue_depth + inference.queue_depth,
    };
    InferencePipelineStatus {
        observed_generation: obs.generation,
        phase: Some(phase),
        conditions,
        active_color: Some(obs.active_color),
        active_model: Some(obs.active_model.clone()),
        rollout: obs.rollout.clone(),
        preprocess: Some(preprocess),
        inference: Some(inference),
        summary: Some(summary),
    }
}

/// The status for a spec the operator cannot serve: Degraded with the reason, everything else
/// kept as it was (objects from the last valid spec keep running).
pub fn invalid(
    prev: Option<&InferencePipelineStatus>,
    generation: Option<i64>,
    err: &ValidateError,
    now: &Time,
) -> InferencePipelineStatus {
    let message = format!("invalid spec: {err}");
    Stuck {
        reason: "InvalidSpec",
        waiting_for: "waiting for a corrected spec",
        keep_ready: false,
        phase: Phase::Invalid,
    }
    .status(prev, generation, message, now)
}

/// Status when the API server refused one of the pipeline's objects: `Degraded` and
/// `Progressing` say why; `Ready` is left as it was (the objects applied before keep serving).
pub fn refused(
    prev: Option<&InferencePipelineStatus>,
    generation: Option<i64>,
    message: String,
    now: &Time,
) -> InferencePipelineStatus {
    Stuck {
        reason: "ApplyRejected",
        waiting_for: "waiting for a spec (or permissions) the API server accepts; retried with backoff",
        keep_ready: true,
        phase: Phase::Degraded,
    }
    .status(prev, generation, message, now)
}

/// Status while an object under one of the pipeline's names exists and belongs to something
/// else (see [`crate::ownership`]): nothing of the pipeline is applied until it is gone.
pub fn name_in_use(
    prev: Option<&InferencePipelineStatus>,
    generation: Option<i64>,
    message: String,
    now: &Time,
) -> InferencePipelineStatus {
    Stuck {
        reason: "NameInUse",
        waiting_for: "waiting until that object is deleted or renamed, or the pipeline is given another name; retried with backoff",
        keep_ready: true,
        phase: Phase::Degraded,
    }
    .status(prev, generation, message, now)
}

/// A pipeline the operator cannot move forward until someone acts.
struct Stuck {
    reason: &'static str,
    /// The `Progressing=False` message.
    waiting_for: &'static str,
    /// Keep an existing `Ready` condition (the objects applied before still serve) rather than
    /// setting it false with the message.
    keep_ready: bool,
    phase: Phase,
}

impl Stuck {
    fn status(
        &self,
        prev: Option<&InferencePipelineStatus>,
        generation: Option<i64>,
        message: String,
        now: &Time,
    ) -> InferencePipelineStatus {
        let mut next = prev.cloned().unwrap_or_default();
        let prev_conditions = std::mem::take(&mut next.conditions);
        let kept_ready = self
            .keep_ready
            .then(|| prev_conditions.iter().find(|c| c.type_ == READY).cloned())
            .flatten();
        let ready = kept_ready.unwrap_or_else(|| {
            condition(
                &prev_conditions,
                READY,
                false,
                self.reason,
                message.clone(),
                generation,
                now,
            )
        });
        next.conditions = vec![
            ready,
            condition(
                &prev_conditions,
                PROGRESSING,
                false,
                self.reason,
                self.waiting_for.to_owned(),
                generation,
                now,
            ),
            condition(
                &prev_conditions,
                DEGRADED,
                true,
                self.reason,
                message,
                generation,
                now,
            ),
        ];
        next.observed_generation = generation;
        next.phase = Some(self.phase);
        next
    }
}

/// Condition changes between two statuses that deserve an Event.
pub fn transitions(
    prev: Option<&InferencePipelineStatus>,
    next: &InferencePipelineStatus,
) -> Vec<Transition> {
    let status_of = |s: Option<&InferencePipelineStatus>, t: &str| {
        s.and_then(|s| s.conditions.iter().find(|c| c.type_ == t))
            .map(|c| (c.status.clone(), c.reason.clone()))
    };
    let mut out = Vec::new();
    for t in [READY, DEGRADED] {
        let before = status_of(prev, t);
        let Some(after) = next.conditions.iter().find(|c| c.type_ == t) else {
            continue;
        };
        if before.as_ref() == Some(&(after.status.clone(), after.reason.clone())) {
            continue;
        }
        let became_true = after.status == "True";
        // A first `Degraded=False` or `Ready=False` is the normal start, not news.
        if before.is_none() && !became_true {
            continue;
        }
        // The rollout driver already published this one; a second Warning with the same text
        // would be alert noise.
        if t == DEGRADED && became_true && ROLLOUT_REASONS.contains(&after.reason.as_str()) {
            continue;
        }
        let warning = (t == DEGRADED) == became_true;
        out.push(Transition {
            warning,
            reason: after.reason.clone(),
            note: after.message.clone(),
        });
    }
    out
}

/// The first human-readable reason the given pods are not running, such as
/// `Insufficient nvidia.com/gpu` or `CrashLoopBackOff: back-off restarting failed container`.
pub fn pod_problem<'a>(pods: impl IntoIterator<Item = &'a PodSummary>) -> Option<Problem> {
    for pod in pods {
        let status = &pod.status;
        for c in &status.conditions {
            if c.type_ == "PodScheduled"
                && c.status == "False"
                && c.reason.as_deref() == Some("Unschedulable")
            {
                let why = c
                    .message
                    .as_deref()
                    .map(scheduler_reasons)
                    .unwrap_or_default();
                let why = if why.is_empty() {
                    "no node fits the pod".to_owned()
                } else {
                    why
                };
                return Some(Problem {
                    reason: "PodsUnschedulable",
                    message: why,
                });
            }
        }
        let containers = status
            .init_container_statuses
            .iter()
            .chain(&status.container_statuses);
        for cs in containers {
            if let Some(w) = &cs.state.waiting {
                let reason = w.reason.as_deref().unwrap_or_default();
                if matches!(
                    reason,
                    "CrashLoopBackOff"
                        | "ImagePullBackOff"
                        | "ErrImagePull"
                        | "InvalidImageName"
                        | "CreateContainerConfigError"
                        | "CreateContainerError"
                        | "RunContainerError"
                ) {
                    let mut msg = reason.to_owned();
                    if reason == "CrashLoopBackOff" {
                        // The waiting message carries the back-off delay and pod name, which
                        // change on every restart; the last exit says why and stays stable.
                        if let Some(exit) = last_exit(cs) {
                            msg.push_str(": ");
                            msg.push_str(&exit);
                        }
                    } else if let Some(m) = w.message.as_deref().filter(|m| !m.is_empty()) {
                        msg.push_str(": ");
                        msg.push_str(&truncate(m, 200));
                    }
                    return Some(Problem {
                        reason: "PodsFailing",
                        message: msg,
                    });
                }
            }
            // Between two crashes the container runs again (loading its model, say) and is
            // not waiting: without this the pipeline would read as healthy for that while,
            // and its Degraded condition flap with every restart.
            if is_running(cs)
                && !cs.ready
                && cs.restart_count > 0
                && let Some(exit) = last_exit(cs).filter(|_| last_exit_failed(cs))
            {
                return Some(Problem {
                    reason: "PodsFailing",
                    message: format!("restarted {} times: {exit}", cs.restart_count),
                });
            }
        }
    }
    None
}

/// Neither waiting nor terminated: running (or about to).
fn is_running(cs: &ContainerStatusSummary) -> bool {
    cs.state.waiting.is_none() && cs.state.terminated.is_none()
}

fn last_exit_failed(cs: &ContainerStatusSummary) -> bool {
    cs.last_state
        .terminated
        .as_ref()
        .is_some_and(|t| t.exit_code != 0)
}

/// `container X exited with code N (reason): <why>`, from the last termination: the reason
/// is the only explanation of a kill (`OOMKilled`), which leaves no message; `why` is the
/// message's telling line ([`crate::summary::ContainerTerminated::why`]).
fn last_exit(cs: &ContainerStatusSummary) -> Option<String> {
    let t = cs.last_state.terminated.as_ref()?;
    let mut msg = format!("container {} exited with code {}", cs.name, t.exit_code);
    if let Some(reason) = t.telling_reason() {
        msg.push_str(&format!(" ({})", truncate(reason, 64)));
    }
    if let Some(m) = t.why() {
        msg.push_str(": ");
        msg.push_str(&truncate(m, 300));
    }
    Some(msg)
}

/// Shortens a scheduler message such as
/// `0/3 nodes are available: 1 node(s) had untolerated taint {x: y}, 2 Insufficient nvidia.com/gpu. preemption: …`
/// to its reasons: `node(s) had untolerated taint {x: y}, Insufficient nvidia.com/gpu`.
pub fn scheduler_reasons(message: &str) -> String {
    let body = message.split_once(": ").map(|(_, b)| b).unwrap_or(message);
    // The reasons end at the first sentence's full stop; what follows is the scheduler's
    // preemption and dynamic resource allocation chatter (`. preemption: …`, `. no new claims
    // to deallocate, …` on Kubernetes 1.36).
    let body = body.split(". ").next().unwrap_or(body);
    let body = body.trim().trim_end_matches('.');
    body.split(", ")
        .map(|part| {
            let part = part.trim();
            match part.split_once(' ') {
                Some((n, rest)) if n.bytes().all(|b| b.is_ascii_digit()) => rest,
                _ => part,
            }
        })
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join(", ")
}

fn stage_problem(stage: &str, d: &DeploymentObservation) -> Option<(&'static str, String)> {
    let problem = d.problem.as_ref()?;
    if d.ready >= d.desired && d.observed_current {
        return None;
    }
    Some((
        problem.reason,
        format!(
            "{}/{} {stage} pods ready: {}",
            d.ready, d.desired, problem.message
        ),
    ))
}

fn not_ready_message(stage: &str, d: &DeploymentObservation) -> String {
    match &d.problem {
        Some(p) => format!(
            "{}/{} {stage} pods ready: {}",
            d.ready, d.desired, p.message
        ),
        None if !d.observed_current => {
            format!("{stage} Deployment has not picked up the latest spec yet")
        }
        None if d.updated < d.desired => {
            format!(
                "{}/{} {stage} pods updated, {} ready",
                d.updated, d.desired, d.ready
            )
        }
        None => format!("{}/{} {stage} pods ready", d.ready, d.desired),
    }
}

/// A rollout that ended without serving the spec's model, or is stuck: the Degraded reason.
fn rollout_problem(r: &RolloutStatus) -> Option<(&'static str, String)> {
    let message = || r.message.clone().unwrap_or_default();
    match r.phase {
        Some(RolloutPhase::RolledBack) => Some((ROLLOUT_REASONS[0], message())),
        Some(RolloutPhase::Aborted) => Some((ROLLOUT_REASONS[1], message())),
        Some(p) if p.in_progress() && r.halted => Some((ROLLOUT_REASONS[2], message())),
        _ => None,
    }
}

fn traffic(active: Color, rollout: Option<&RolloutStatus>) -> String {
    let a = active.as_str();
    let Some((r, candidate)) = rollout.and_then(|r| Some((r, r.candidate_color?))) else {
        return format!("{a} 100%");
    };
    let c = candidate.as_str();
    match r.phase {
        Some(RolloutPhase::ShiftingTraffic) => {
            let pct = crate::rollout::candidate_share(Some(r));
            format!("{a} {}% {c} {pct}%", 100 - pct)
        }
        // Halted: nothing is mirrored any more (`routing::desired_table`).
        Some(RolloutPhase::Shadowing) if r.halted => format!("{a} 100% ({c} halted)"),
        Some(RolloutPhase::Shadowing) => format!("{a} 100% (shadow {c})"),
        Some(RolloutPhase::Provisioning) => format!("{a} 100% ({c} starting)"),
        _ => format!("{a} 100%"),
    }
}

fn condition(
    prev: &[Condition],
    type_: &str,
    status: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: &Time,
) -> Condition {
    let status = if status { "True" } else { "False" }.to_owned();
    let last_transition_time = prev
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| now.clone());
    Condition {
        type_: type_.to_owned(),
        status,
        reason: reason.to_owned(),
        message: truncate(&message, 1024),
        observed_generation: generation,
        last_transition_time,
    }
}

/// At most `max` bytes of `s`, cut at a char boundary, with `…` when cut.
pub(crate) fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        ContainerState, ContainerStateTerminated, ContainerStateWaiting, ContainerStatus, Pod,
        PodCondition, PodStatus,
    };
    use k8s_openapi::jiff::Timestamp;

    fn t(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).unwrap())
    }

    fn dep(desired: i32, ready: i32) -> DeploymentObservation {
        DeploymentObservation {
            desired,
            replicas: desired,
            ready,
            updated: desired,
            observed_current: true,
            problem: None,
        }
    }

    fn obs(pre: DeploymentObservation, inf: DeploymentObservation) -> Observation {
        Observation {
            generation: Some(4),
            preprocess: pre,
            inference: inf,
            active_color: Color::Blue,
            active_model: ModelRef {
                name: "minilm".into(),
                version: "2".into(),
                ..ModelRef::default()
            },
            rollout: None,
        }
    }

    fn cond<'a>(s: &'a InferencePipelineStatus, t: &str) -> &'a Condition {
        s.conditions.iter().find(|c| c.type_ == t).unwrap()
    }

    #[test]
    fn a_model_that_does_not_take_what_preprocess_sends_is_degraded_and_not_ready_until_cleared() {
        let why = "input \"input\": sent as [N, 3, 320, 320], the model takes [-1, 3, 224, 224]";
        let reported = InferencePipelineStatus {
            preprocess: Some(StageStatus {
                model_mismatch: Some(why.into()),
                ..StageStatus::default()
            }),
            ..InferencePipelineStatus::default()
        };
        let s = compute(Some(&reported), &obs(dep(2, 2), dep(1, 1)), &t(100));
        let message = format!(
            "minilm:2 on blue does not take what preprocess sends, so every request fails: {why}"
        );
        assert_eq!(s.phase, Some(Phase::Degraded));
        for c in [READY, DEGRADED] {
            assert_eq!(cond(&s, c).reason, MODEL_MISMATCH, "{c}");
            assert_eq!(cond(&s, c).message, message, "{c}");
        }
        assert_eq!(cond(&s, READY).status, "False");
        assert_eq!(cond(&s, DEGRADED).status, "True");
        assert_eq!(cond(&s, PROGRESSING).status, "False");
        assert_eq!(
            cond(&s, PROGRESSING).message,
            "requests cannot be served; see the Degraded condition"
        );
        // The autoscaler's field is carried through the reconciler's own write.
        assert_eq!(
            s.preprocess
                .as_ref()
                .and_then(|p| p.model_mismatch.as_deref()),
            Some(why)
        );

        // Cleared by the autoscaler: ready again.
        let cleared = InferencePipelineStatus {
            preprocess: Some(StageStatus::default()),
            ..s
        };
        let s = compute(Some(&cleared), &obs(dep(2, 2), dep(1, 1)), &t(110));
        assert_eq!(s.phase, Some(Phase::Ready));
        assert_eq!(cond(&s, READY).status, "True");
        assert_eq!(cond(&s, DEGRADED).status, "False");
    }

    #[test]
    fn all_pods_ready_means_ready_not_progressing_not_degraded() {
        let s = compute(None, &obs(dep(2, 2), dep(1, 1)), &t(100));
        assert_eq!(s.phase, Some(Phase::Ready));
        assert_eq!(cond(&s, READY).status, "True");
        assert_eq!(
            cond(&s, READY).message,
            "2/2 preprocess and 1/1 inference pods ready"
        );
        assert_eq!(cond(&s, PROGRESSING).status, "False");
        assert_eq!(cond(&s, DEGRADED).status, "False");
        assert_eq!(s.observed_generation, Some(4));
        assert_eq!(cond(&s, READY).observed_generation, Some(4));
        let sum = s.summary.unwrap();
        assert_eq!(
            (sum.model.as_str(), sum.traffic.as_str()),
            ("minilm:2", "blue 100%")
        );
        assert_eq!(
            (sum.preprocess.as_str(), sum.inference.as_str()),
            ("2/2", "1/1")
        );
    }

    #[test]
    fn unschedulable_gpu_pods_say_why_in_ready_and_degraded() {
        let mut inf = dep(2, 0);
        inf.problem = Some(Problem {
            reason: "PodsUnschedulable",
            message: "Insufficient nvidia.com/gpu".into(),
        });
        let s = compute(None, &obs(dep(1, 1), inf), &t(100));
        assert_eq!(s.phase, Some(Phase::Degraded));
        assert_eq!(
            cond(&s, READY).message,
            "0/2 inference pods ready: Insufficient nvidia.com/gpu"
        );
        assert_eq!(cond(&s, DEGRADED).status, "True");
        assert_eq!(cond(&s, DEGRADED).reason, "PodsUnschedulable");
        assert_eq!(
            cond(&s, DEGRADED).message,
            "0/2 inference pods ready: Insufficient nvidia.com/gpu"
        );
    }

    #[test]
    fn starting_pods_are_pending_then_progressing() {
        let s = compute(None, &obs(dep(1, 0), dep(1, 0)), &t(100));
        assert_eq!(s.phase, Some(Phase::Pending));
        assert_eq!(cond(&s, PROGRESSING).status, "True");
        assert_eq!(cond(&s, PROGRESSING).message, "0/1 inference pods ready");
        let s = compute(Some(&s), &obs(dep(1, 1), dep(1, 0)), &t(110));
        assert_eq!(s.phase, Some(Phase::Progressing));
    }

    #[test]
    fn last_transition_time_is_kept_while_the_status_is_unchanged() {
        let first = compute(None, &obs(dep(1, 1), dep(1, 1)), &t(100));
        let second = compute(Some(&first), &obs(dep(1, 1), dep(1, 1)), &t(200));
        assert_eq!(second, first);
        let third = compute(Some(&second), &obs(dep(1, 1), dep(1, 0)), &t(300));
        assert_eq!(cond(&third, READY).last_transition_time, t(300));
        assert_eq!(cond(&third, DEGRADED).last_transition_time, t(100));
    }

    #[test]
    fn queue_depth_written_by_the_autoscaler_is_preserved() {
        let mut prev = compute(None, &obs(dep(1, 1), dep(1, 1)), &t(100));
        prev.preprocess.as_mut().unwrap().queue_depth = 7;
        prev.inference.as_mut().unwrap().queue_depth = 5;
        let s = compute(Some(&prev), &obs(dep(1, 1), dep(1, 1)), &t(200));
        assert_eq!(s.summary.unwrap().queue_depth, 12);
    }

    #[test]
    fn while_two_colors_run_inference_desired_replicas_stays_the_stage_total() {
        let mut prev = compute(None, &obs(dep(1, 1), dep(4, 4)), &t(100));
        prev.inference.as_mut().unwrap().desired_replicas = Some(4);
        let mut o = obs(dep(1, 1), dep(2, 2));
        o.rollout = Some(Box::new(RolloutStatus {
            phase: Some(RolloutPhase::ShiftingTraffic),
            traffic_percent: 50,
            ..RolloutStatus::default()
        }));
        let s = compute(Some(&prev), &o, &t(200));
        let inf = s.inference.unwrap();
        assert_eq!(
            inf.desired_replicas,
            Some(4),
            "the total, not the active share"
        );
        assert_eq!(inf.ready_replicas, 2);
        o.rollout = None;
        let after = compute(Some(&prev), &o, &t(300));
        assert_eq!(after.inference.unwrap().desired_replicas, Some(2));
    }

    #[test]
    fn the_last_scale_decision_written_by_the_autoscaler_is_preserved() {
        let mut prev = compute(None, &obs(dep(1, 1), dep(1, 1)), &t(100));
        let inf = prev.inference.as_mut().unwrap();
        inf.last_scale_time = Some(t(150));
        inf.last_scale_reason = Some("ScaledUp".into());
        inf.last_scale_message = Some("queue 48 > 16 per pod: 1 → 3 pods".into());
        let s = compute(Some(&prev), &obs(dep(1, 1), dep(1, 1)), &t(200));
        assert_eq!(s.inference, prev.inference, "nothing else changed");
    }

    #[test]
    fn an_invalid_spec_is_degraded_with_the_validation_message() {
        let ready = compute(None, &obs(dep(1, 1), dep(1, 1)), &t(100));
        let s = invalid(
            Some(&ready),
            Some(5),
            &ValidateError::PreprocessInput,
            &t(200),
        );
        assert_eq!(s.phase, Some(Phase::Invalid));
        assert_eq!(s.observed_generation, Some(5));
        let d = cond(&s, DEGRADED);
        assert_eq!(
            (d.status.as_str(), d.reason.as_str()),
            ("True", "InvalidSpec")
        );
        assert_eq!(
            d.message,
            "invalid spec: preprocess must set exactly one of text or image"
        );
        assert_eq!(s.summary, ready.summary);
    }

    #[test]
    fn an_object_the_api_server_refuses_degrades_the_pipeline_with_its_message_and_keeps_ready() {
        let ready = compute(None, &obs(dep(1, 1), dep(1, 1)), &t(100));
        let msg = "the API server refused to apply Deployment m-inference-blue: quantities must \
                   match the regular expression";
        let s = refused(Some(&ready), Some(6), msg.to_owned(), &t(200));
        assert_eq!(s.phase, Some(Phase::Degraded));
        assert_eq!(s.observed_generation, Some(6));
        let d = cond(&s, DEGRADED);
        assert_eq!(
            (d.status.as_str(), d.reason.as_str(), d.message.as_str()),
            ("True", "ApplyRejected", msg)
        );
        assert_eq!(
            cond(&s, READY),
            cond(&ready, READY),
            "the old objects still serve"
        );
        assert_eq!(cond(&s, PROGRESSING).reason, "ApplyRejected");
        let ev = transitions(Some(&ready), &s);
        assert_eq!(ev.len(), 1);
        assert_eq!(
            (ev[0].reason.as_str(), ev[0].warning, ev[0].note.as_str()),
            ("ApplyRejected", true, msg)
        );
        // A new pipeline has no Ready condition yet: it is not ready, for the same reason.
        let fresh = refused(None, Some(1), msg.to_owned(), &t(200));
        let r = cond(&fresh, READY);
        assert_eq!(
            (r.status.as_str(), r.reason.as_str()),
            ("False", "ApplyRejected")
        );
    }

    #[test]
    fn transitions_report_ready_and_degraded_changes_but_not_a_quiet_start() {
        let starting = compute(None, &obs(dep(1, 0), dep(1, 0)), &t(100));
        assert!(transitions(None, &starting).is_empty());
        let ready = compute(Some(&starting), &obs(dep(1, 1), dep(1, 1)), &t(110));
        let ev = transitions(Some(&starting), &ready);
        assert_eq!(ev.len(), 1);
        assert_eq!(
            (ev[0].reason.as_str(), ev[0].warning),
            ("AllPodsReady", false)
        );
        assert!(transitions(Some(&ready), &ready).is_empty());
        let mut inf = dep(1, 0);
        inf.problem = Some(Problem {
            reason: "PodsFailing",
            message: "CrashLoopBackOff".into(),
        });
        let broken = compute(Some(&ready), &obs(dep(1, 1), inf), &t(120));
        let ev = transitions(Some(&ready), &broken);
        assert!(ev.iter().any(|e| e.warning && e.reason == "PodsFailing"));
    }

    /// The Deployment as the reconciler sees it right after applying `replicas`: generation 5,
    /// the Deployment controller still at 4, its counts those of generation 4's pods. The spec
    /// without `replicas` is the same as at generation 4 unless `new_template`.
    fn lagging(desired: i32, pods: i32, ready: i32, new_template: bool) -> DeploymentObservation {
        let mut specs = SpecSince::default();
        let pipeline: Arc<str> = "ml/minilm".into();
        assert_eq!(specs.since(&pipeline, "minilm-inference-blue", 7, 4), 4);
        let spec = if new_template { 8 } else { 7 };
        let since = specs.since(&pipeline, "minilm-inference-blue", spec, 5);
        DeploymentObservation {
            desired,
            replicas: pods,
            ready,
            updated: pods,
            observed_current: 4 >= since,
            problem: None,
        }
    }

    #[test]
    fn a_change_of_replicas_alone_keeps_the_generation_of_the_spec_and_a_new_spec_starts_anew() {
        let mut specs = SpecSince::default();
        let p: Arc<str> = "ml/minilm".into();
        assert_eq!(specs.since(&p, "minilm-preprocess", 1, 3), 3, "first sight");
        assert_eq!(
            specs.since(&p, "minilm-preprocess", 1, 4),
            3,
            "replicas only"
        );
        assert_eq!(
            specs.since(&p, "minilm-preprocess", 1, 6),
            3,
            "replicas only"
        );
        assert_eq!(
            specs.since(&p, "minilm-inference-blue", 1, 2),
            2,
            "its own record"
        );
        assert_eq!(specs.since(&p, "minilm-preprocess", 2, 7), 7, "a new spec");
        assert_eq!(specs.since(&p, "minilm-preprocess", 2, 8), 7);
        assert_eq!(
            specs.since(&p, "minilm-preprocess", 2, 1),
            1,
            "created anew"
        );
        specs.forget("ml/minilm");
        assert_eq!(specs.since(&p, "minilm-preprocess", 2, 8), 8, "forgotten");
    }

    #[test]
    fn a_scale_down_stays_ready_without_an_event_while_the_deployment_controller_catches_up() {
        let ready = compute(None, &obs(dep(1, 1), dep(3, 3)), &t(100));
        let s = compute(
            Some(&ready),
            &obs(dep(1, 1), lagging(2, 3, 3, false)),
            &t(101),
        );
        assert_eq!(s.phase, Some(Phase::Ready));
        assert_eq!(cond(&s, READY).status, "True");
        assert_eq!(cond(&s, PROGRESSING).status, "False");
        assert_eq!(transitions(Some(&ready), &s), []);
    }

    #[test]
    fn a_scale_up_stays_ready_without_an_event_while_the_new_pods_start() {
        let ready = compute(None, &obs(dep(1, 1), dep(1, 1)), &t(100));
        // Not observed yet, then observed with the new pods starting, then one of them ready.
        let mut starting = dep(3, 1);
        starting.replicas = 3;
        let mut one_more = starting.clone();
        one_more.ready = 2;
        let mut prev = ready.clone();
        for (i, inf) in [lagging(3, 1, 1, false), starting, one_more]
            .into_iter()
            .enumerate()
        {
            let s = compute(Some(&prev), &obs(dep(1, 1), inf), &t(101 + i as i64));
            assert_eq!(s.phase, Some(Phase::Ready), "step {i}");
            assert_eq!(cond(&s, READY).status, "True", "step {i}");
            assert_eq!(transitions(Some(&prev), &s), [], "step {i}");
            prev = s;
        }
        let p = cond(&prev, PROGRESSING);
        assert_eq!(
            (p.status.as_str(), p.reason.as_str(), p.message.as_str()),
            ("True", "Scaling", "serving while 2/3 inference pods ready")
        );
        assert_eq!(
            cond(&prev, READY).message,
            "1/1 preprocess and 2/3 inference pods ready"
        );
        // From zero: nothing served before, nothing lost; requests are held meanwhile.
        let zero = compute(None, &obs(dep(1, 1), dep(0, 0)), &t(200));
        let mut waking = dep(1, 0);
        waking.replicas = 1;
        let s = compute(Some(&zero), &obs(dep(1, 1), waking), &t(201));
        assert_eq!(cond(&s, READY).status, "True");
        assert_eq!(transitions(Some(&zero), &s), []);
    }

    #[test]
    fn losing_a_ready_pod_or_a_new_pod_template_still_makes_the_pipeline_not_ready() {
        let ready = compute(None, &obs(dep(1, 1), dep(3, 3)), &t(100));
        // A pod fewer than before, replicas unchanged.
        let s = compute(Some(&ready), &obs(dep(1, 1), dep(3, 2)), &t(101));
        assert_eq!(cond(&s, READY).status, "False");
        assert_eq!(cond(&s, READY).message, "2/3 inference pods ready");
        // Two more wanted, and one of the three lost meanwhile.
        let mut lost = dep(5, 2);
        lost.replicas = 5;
        let s = compute(Some(&ready), &obs(dep(1, 1), lost), &t(101));
        assert_eq!(cond(&s, READY).status, "False");
        // A new pod template, not observed yet, even with the replica count unchanged.
        let s = compute(
            Some(&ready),
            &obs(dep(1, 1), lagging(3, 3, 3, true)),
            &t(101),
        );
        assert_eq!(
            (
                cond(&s, READY).status.as_str(),
                cond(&s, READY).message.as_str()
            ),
            (
                "False",
                "inference Deployment has not picked up the latest spec yet"
            )
        );
        // Observed: old pods still running beside the new ones.
        let mut rolling = dep(3, 3);
        rolling.replicas = 4;
        rolling.updated = 1;
        let s = compute(Some(&ready), &obs(dep(1, 1), rolling), &t(102));
        assert_eq!(cond(&s, READY).status, "False");
        assert_eq!(s.phase, Some(Phase::Progressing));
    }

    #[test]
    fn a_scale_up_that_cannot_place_its_pods_is_degraded_but_still_ready() {
        let ready = compute(None, &obs(dep(1, 1), dep(1, 1)), &t(100));
        let mut inf = dep(2, 1);
        inf.problem = Some(Problem {
            reason: "PodsUnschedulable",
            message: "Insufficient nvidia.com/gpu".into(),
        });
        let s = compute(Some(&ready), &obs(dep(1, 1), inf), &t(101));
        assert_eq!(cond(&s, READY).status, "True", "the first pod serves");
        assert_eq!(cond(&s, DEGRADED).reason, "PodsUnschedulable");
        assert_eq!(
            cond(&s, PROGRESSING).message,
            "pods cannot become ready; see the Degraded condition"
        );
        let ev = transitions(Some(&ready), &s);
        assert_eq!(ev.len(), 1, "{ev:?}");
        assert_eq!(
            (ev[0].reason.as_str(), ev[0].warning),
            ("PodsUnschedulable", true)
        );
    }

    #[test]
    fn a_failed_rollout_degrades_the_pipeline_without_a_second_event_beside_the_drivers() {
        let ready = compute(None, &obs(dep(1, 1), dep(1, 1)), &t(100));
        let ended = |phase, halted| {
            let mut o = obs(dep(1, 1), dep(1, 1));
            o.rollout = Some(Box::new(RolloutStatus {
                phase: Some(phase),
                halted,
                message: Some("shadow parity failed: 87 of 100 compared requests differed".into()),
                ..RolloutStatus::default()
            }));
            compute(Some(&ready), &o, &t(110))
        };
        for (phase, halted, reason) in [
            (RolloutPhase::RolledBack, false, "RolledBack"),
            (RolloutPhase::Aborted, false, "RolloutAborted"),
            (RolloutPhase::Shadowing, true, "RolloutHalted"),
        ] {
            let s = ended(phase, halted);
            assert_eq!(
                cond(&s, DEGRADED).reason,
                reason,
                "the condition still says why"
            );
            assert_eq!(
                transitions(Some(&ready), &s),
                [],
                "{reason}: the driver's Event only"
            );
            // Fixed (a new spec): the recovery is the reconciler's news.
            let fixed = compute(Some(&s), &obs(dep(1, 1), dep(1, 1)), &t(120));
            let ev = transitions(Some(&s), &fixed);
            assert_eq!(ev.len(), 1, "{ev:?}");
            assert_eq!(
                (ev[0].reason.as_str(), ev[0].warning),
                ("AsExpected", false)
            );
        }
    }

    #[test]
    fn scheduler_messages_shrink_to_their_reasons() {
        assert_eq!(
            scheduler_reasons(
                "0/3 nodes are available: 1 node(s) had untolerated taint {a: b}, 2 Insufficient nvidia.com/gpu. preemption: 0/3 nodes are available: 3 No preemption victims found for incoming pod."
            ),
            "node(s) had untolerated taint {a: b}, Insufficient nvidia.com/gpu"
        );
        assert_eq!(
            scheduler_reasons("0/1 nodes are available: 1 Insufficient nvidia.com/gpu."),
            "Insufficient nvidia.com/gpu"
        );
        // Kubernetes 1.36, with dynamic resource allocation on.
        assert_eq!(
            scheduler_reasons(
                "0/1 nodes are available: 1 Insufficient nvidia.com/gpu. no new claims to deallocate, preemption: 0/1 nodes are available: 1 Preemption is not helpful for scheduling."
            ),
            "Insufficient nvidia.com/gpu"
        );
    }

    /// The summary of a pod whose one container, `inference`, has this status.
    fn pod_with(container: ContainerStatus) -> PodSummary {
        let pod = Pod {
            status: Some(PodStatus {
                container_statuses: Some(vec![ContainerStatus {
                    name: "inference".into(),
                    ..container
                }]),
                ..PodStatus::default()
            }),
            ..Pod::default()
        };
        PodSummary::of(&pod).expect("summarises")
    }

    /// A container's `lastState`: terminated with `code`, `reason` and `message`.
    fn exited(code: i32, reason: Option<&str>, message: Option<&str>) -> Option<ContainerState> {
        Some(ContainerState {
            terminated: Some(ContainerStateTerminated {
                exit_code: code,
                reason: reason.map(Into::into),
                message: message.map(Into::into),
                ..ContainerStateTerminated::default()
            }),
            ..ContainerState::default()
        })
    }

    #[test]
    fn pod_problems_come_from_scheduling_and_container_waits() {
        let unschedulable = Pod {
            status: Some(PodStatus {
                conditions: Some(vec![PodCondition {
                    type_: "PodScheduled".into(),
                    status: "False".into(),
                    reason: Some("Unschedulable".into()),
                    message: Some("0/1 nodes are available: 1 Insufficient nvidia.com/gpu.".into()),
                    ..PodCondition::default()
                }]),
                ..PodStatus::default()
            }),
            ..Pod::default()
        };
        let summary = |p: &Pod| PodSummary::of(p).expect("summarises");
        let p = pod_problem(&[summary(&unschedulable)]).unwrap();
        assert_eq!(
            (p.reason, p.message.as_str()),
            ("PodsUnschedulable", "Insufficient nvidia.com/gpu")
        );
        let crashing = pod_with(ContainerStatus {
            state: Some(ContainerState {
                waiting: Some(ContainerStateWaiting {
                    reason: Some("CrashLoopBackOff".into()),
                    message: Some(
                        "back-off 10s restarting failed container=inference pod=x".into(),
                    ),
                }),
                ..ContainerState::default()
            }),
            last_state: exited(1, None, Some("model sha256 mismatch\n")),
            ..ContainerStatus::default()
        });
        let p = pod_problem(&[summary(&Pod::default()), crashing]).unwrap();
        assert_eq!(
            (p.reason, p.message.as_str()),
            (
                "PodsFailing",
                "CrashLoopBackOff: container inference exited with code 1: model sha256 mismatch"
            )
        );
    }

    #[test]
    fn a_container_running_again_between_crashes_is_still_failing_with_its_last_exit() {
        let status = |ready: bool, restarts: i32, exit_code: i32| {
            pod_problem(&[pod_with(ContainerStatus {
                ready,
                restart_count: restarts,
                state: Some(ContainerState::default()),
                // The end of the log, as FallbackToLogsOnError gives it.
                last_state: exited(
                    exit_code,
                    None,
                    Some("loading model\nsha256 mismatch: expected 00…, got 53…\n\n"),
                ),
                ..ContainerStatus::default()
            })])
        };
        let p = status(false, 3, 1).expect("a problem");
        assert_eq!(
            (p.reason, p.message.as_str()),
            (
                "PodsFailing",
                "restarted 3 times: container inference exited with code 1: sha256 mismatch: \
                 expected 00…, got 53…"
            )
        );
        assert_eq!(status(true, 3, 1), None, "ready again: recovered");
        assert_eq!(status(false, 1, 0), None, "a clean exit is not a failure");
        assert_eq!(status(false, 0, 1), None, "never restarted");
    }

    #[test]
    fn a_kill_is_named_by_its_reason_and_a_panic_by_its_message_not_rusts_footer() {
        let crashed = |reason: &str, message: Option<&str>| {
            let code = if reason == "OOMKilled" { 137 } else { 101 };
            pod_problem(&[pod_with(ContainerStatus {
                restart_count: 2,
                state: Some(ContainerState {
                    waiting: Some(ContainerStateWaiting {
                        reason: Some("CrashLoopBackOff".into()),
                        ..ContainerStateWaiting::default()
                    }),
                    ..ContainerState::default()
                }),
                last_state: exited(code, Some(reason), message),
                ..ContainerStatus::default()
            })])
            .expect("a problem")
            .message
        };
        // A kill leaves no message: the reason is all there is.
        assert_eq!(
            crashed("OOMKilled", None),
            "CrashLoopBackOff: container inference exited with code 137 (OOMKilled)"
        );
        // A panic's last line is Rust's footer; the line before it says why. `Error` (any
        // non-zero exit) adds nothing to the code.
        assert_eq!(
            crashed(
                "Error",
                Some(
                    "thread 'main' panicked at worker/src/main.rs:10:5:\n\
                     index out of bounds\n\
                     note: run with `RUST_BACKTRACE=1` environment variable to display a backtrace\n"
                )
            ),
            "CrashLoopBackOff: container inference exited with code 101: index out of bounds"
        );
    }

    #[test]
    fn a_rollout_shows_the_split_in_the_traffic_column() {
        let mut o = obs(dep(1, 1), dep(1, 1));
        o.rollout = Some(Box::new(RolloutStatus {
            phase: Some(RolloutPhase::ShiftingTraffic),
            candidate_color: Some(Color::Green),
            traffic_percent: 10,
            message: Some("10% of traffic on green (step 1/3)".into()),
            ..RolloutStatus::default()
        }));
        let s = compute(None, &o, &t(1));
        assert_eq!(s.summary.as_ref().unwrap().traffic, "blue 90% green 10%");
        assert_eq!(s.phase, Some(Phase::Progressing));
        let p = cond(&s, PROGRESSING);
        assert_eq!(
            (p.status.as_str(), p.reason.as_str()),
            ("True", "RollingOut")
        );
        assert_eq!(p.message, "10% of traffic on green (step 1/3)");

        if let Some(r) = o.rollout.as_mut() {
            r.phase = Some(RolloutPhase::Shadowing);
        }
        let s = compute(None, &o, &t(1));
        assert_eq!(s.summary.unwrap().traffic, "blue 100% (shadow green)");

        // Halted while shadowing: the failed candidate no longer gets mirrored requests.
        if let Some(r) = o.rollout.as_mut() {
            r.halted = true;
        }
        let s = compute(None, &o, &t(1));
        assert_eq!(s.summary.unwrap().traffic, "blue 100% (green halted)");
    }

    #[test]
    fn a_rolled_back_rollout_is_degraded_with_its_numbers_while_the_old_model_serves() {
        let mut o = obs(dep(1, 1), dep(1, 1));
        o.rollout = Some(Box::new(RolloutStatus {
            phase: Some(RolloutPhase::RolledBack),
            message: Some(
                "shadow parity failed: 87 of 100 compared requests (87.0%) differed".into(),
            ),
            ..RolloutStatus::default()
        }));
        let s = compute(None, &o, &t(1));
        assert_eq!(s.phase, Some(Phase::Degraded));
        let d = cond(&s, DEGRADED);
        assert_eq!(
            (d.status.as_str(), d.reason.as_str()),
            ("True", "RolledBack")
        );
        assert!(d.message.contains("87 of 100"));
        assert_eq!(
            cond(&s, READY).status,
            "True",
            "the active color still serves"
        );
        assert_eq!(s.summary.unwrap().traffic, "blue 100%");
    }
}
