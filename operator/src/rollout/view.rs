//! What `kubectl tandem` shows and asks for, pure so it is unit-tested: the status view and
//! the patches behind `promote`, `abort`, `undo`, `pause` and `resume`.

use std::fmt::Write as _;

use serde_json::{Value, json};

use super::{ANNOTATION_ABORT, ANNOTATION_PROMOTE};
use crate::crd::{InferencePipeline, ModelRef, RolloutPhase};

/// Why a plugin command cannot act.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ViewError {
    /// promote/abort need a candidate.
    #[error("{0} has no rollout in progress (rollout phase: {1}); nothing to {2}")]
    NoRollout(String, String, &'static str),
    /// undo needs a previous model.
    #[error("{0} has no previous model recorded in status.rollout.previousModel; nothing to undo")]
    NothingToUndo(String),
}

/// A multi-line, human view of a pipeline's serving and rollout state.
pub fn describe(p: &InferencePipeline) -> String {
    let mut out = String::new();
    let name = p.metadata.name.as_deref().unwrap_or("?");
    let ns = p.metadata.namespace.as_deref().unwrap_or("?");
    let spec = &p.spec.inference.model;
    let _ = writeln!(out, "{ns}/{name}");
    let Some(s) = p.status.as_ref() else {
        let _ = writeln!(out, "  no status yet (is the operator running?)");
        return out;
    };
    let active = s.active_color.map_or("-", |c| c.as_str());
    let model = s.active_model.as_ref().map_or("-".to_owned(), short);
    let _ = writeln!(
        out,
        "  serving:   {model} on {active}   (spec asks for {}:{})",
        spec.name, spec.version
    );
    let phase = s.phase.map_or("-".to_owned(), |p| format!("{p:?}"));
    let _ = writeln!(out, "  phase:     {phase}");
    if let Some(sum) = s.summary.as_ref() {
        let _ = writeln!(
            out,
            "  traffic:   {}   pods: preprocess {}, inference {}",
            sum.traffic, sum.preprocess, sum.inference
        );
    }
    if let Some(r) = s.rollout.as_deref() {
        let rphase = r.phase.map_or("-", RolloutPhase::as_str);
        let _ = writeln!(
            out,
            "  rollout:   {rphase}{}",
            if r.halted { " (halted)" } else { "" }
        );
        if let Some(m) = r.candidate_model.as_ref() {
            let color = r
                .candidate_color
                .map_or(String::new(), |c| format!(" on {}", c.as_str()));
            let _ = writeln!(out, "    candidate: {}{color}", short(m));
        }
        if let Some(step) = r.step {
            let steps = &p.spec.rollout.steps;
            let _ = writeln!(
                out,
                "    step:      {}/{} ({}% of traffic)",
                step + 1,
                steps.len(),
                r.traffic_percent
            );
        }
        if let Some(sh) = r.shadow.as_ref() {
            let target = p.spec.rollout.shadow.requests;
            let worst = sh
                .worst_cosine
                .map_or(String::new(), |c| format!(", worst cosine {c:.6}"));
            let _ = writeln!(
                out,
                "    shadow:    {}/{target} compared, {} mismatched, {} errors{worst}",
                sh.compared, sh.mismatches, sh.errors
            );
        }
        if let Some(m) = r.previous_model.as_ref() {
            let color = r.previous_color.map_or(String::new(), |c| {
                format!(" (still running on {})", c.as_str())
            });
            let _ = writeln!(out, "    previous:  {}{color}", short(m));
        }
        if let Some(t) = r.step_started_at.as_ref() {
            let _ = writeln!(out, "    since:     {}", t.0);
        }
        if let Some(msg) = r.message.as_deref() {
            let _ = writeln!(out, "    message:   {msg}");
        }
    }
    for c in &s.conditions {
        let _ = writeln!(
            out,
            "  {:<12} {:<5} {}: {}",
            c.type_, c.status, c.reason, c.message
        );
    }
    out
}

fn short(m: &ModelRef) -> String {
    format!("{}:{}", m.name, m.version)
}

/// The candidate version a promote/abort annotation must name.
pub fn candidate_version(p: &InferencePipeline, verb: &'static str) -> Result<String, ViewError> {
    let name = p.metadata.name.clone().unwrap_or_default();
    let r = p.status.as_ref().and_then(|s| s.rollout.as_deref());
    let phase = r.and_then(|r| r.phase);
    match (r, phase) {
        (Some(r), Some(ph)) if ph.in_progress() => r
            .candidate_model
            .as_ref()
            .map(|m| m.version.clone())
            .ok_or(ViewError::NoRollout(name, ph.as_str().to_owned(), verb)),
        _ => Err(ViewError::NoRollout(
            name,
            phase.map_or("none", RolloutPhase::as_str).to_owned(),
            verb,
        )),
    }
}

/// Merge patch for `promote` (`true`) or `abort` (`false`).
pub fn action_patch(p: &InferencePipeline, promote: bool) -> Result<Value, ViewError> {
    let (key, verb) = if promote {
        (ANNOTATION_PROMOTE, "promote")
    } else {
        (ANNOTATION_ABORT, "abort")
    };
    let version = candidate_version(p, verb)?;
    Ok(json!({"metadata": {"annotations": {key: version}}}))
}

/// Merge patch for `undo`: the spec's model goes back to the one served before the last rollout.
pub fn undo_patch(p: &InferencePipeline) -> Result<Value, ViewError> {
    let previous = p
        .status
        .as_ref()
        .and_then(|s| s.rollout.as_deref())
        .and_then(|r| r.previous_model.clone())
        .ok_or_else(|| ViewError::NothingToUndo(p.metadata.name.clone().unwrap_or_default()))?;
    Ok(json!({"spec": {"inference": {"model": {
        "name": previous.name,
        "version": previous.version,
        "uri": previous.uri,
        "sha256": previous.sha256,
    }}}}))
}

/// Merge patch for `pause` (`true`) or `resume` (`false`).
pub fn pause_patch(paused: bool) -> Value {
    json!({"spec": {"rollout": {"paused": paused}}})
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{Color, InferencePipelineStatus, RolloutStatus, ShadowStatus};
    use crate::test_fixtures::text_pipeline;

    fn shadowing() -> InferencePipeline {
        let mut p = text_pipeline();
        let mut v3 = ModelRef::from(&p.spec.inference.model);
        v3.version = "3".into();
        let v2 = ModelRef::from(&p.spec.inference.model);
        p.metadata.namespace = Some("ml".into());
        p.status = Some(InferencePipelineStatus {
            active_color: Some(Color::Blue),
            active_model: Some(v2.clone()),
            rollout: Some(Box::new(RolloutStatus {
                phase: Some(RolloutPhase::Shadowing),
                candidate_color: Some(Color::Green),
                candidate_model: Some(v3),
                previous_model: Some(v2),
                shadow: Some(ShadowStatus {
                    compared: 120,
                    mismatches: 1,
                    errors: 0,
                    worst_cosine: Some(0.9991),
                    max_abs_diff: None,
                }),
                message: Some("mirroring live requests to green: 120/500 compared".into()),
                ..RolloutStatus::default()
            })),
            ..InferencePipelineStatus::default()
        });
        p
    }

    #[test]
    fn the_status_view_shows_candidate_shadow_counts_and_the_message() {
        let text = describe(&shadowing());
        assert!(text.contains("serving:   minilm:2 on blue"), "{text}");
        assert!(text.contains("rollout:   Shadowing"), "{text}");
        assert!(text.contains("candidate: minilm:3 on green"), "{text}");
        assert!(
            text.contains(
                "shadow:    120/500 compared, 1 mismatched, 0 errors, worst cosine 0.999100"
            ),
            "{text}"
        );
        assert!(
            text.contains("message:   mirroring live requests"),
            "{text}"
        );
    }

    #[test]
    fn promote_and_abort_name_the_candidate_version_and_need_a_rollout() {
        let p = shadowing();
        assert_eq!(
            action_patch(&p, true).unwrap(),
            json!({"metadata": {"annotations": {"tandem.dev/promote": "3"}}})
        );
        assert_eq!(
            action_patch(&p, false).unwrap(),
            json!({"metadata": {"annotations": {"tandem.dev/abort": "3"}}})
        );
        let idle = text_pipeline();
        assert!(matches!(
            action_patch(&idle, true),
            Err(ViewError::NoRollout(_, _, "promote"))
        ));
    }

    #[test]
    fn undo_sets_the_spec_back_to_the_previous_model() {
        let patch = undo_patch(&shadowing()).unwrap();
        assert_eq!(patch["spec"]["inference"]["model"]["version"], "2");
        assert!(matches!(
            undo_patch(&text_pipeline()),
            Err(ViewError::NothingToUndo(_))
        ));
    }
}
