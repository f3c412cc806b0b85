use std::time::Duration;

use super::*;
use crate::summary::{
    ContainerStateSummary, ContainerWaiting, PodConditionSummary, PodStatusSummary,
};

fn model(v: &str) -> ModelRef {
    ModelRef {
        name: "minilm".into(),
        version: v.into(),
        uri: format!("http://models/{v}/model.safetensors"),
        sha256: "a".repeat(64),
    }
}

fn policy() -> ValidRollout {
    ValidRollout {
        steps: vec![10, 50, 100],
        step_duration: Duration::from_secs(30),
        shadow_requests: 100,
        max_mismatch_rate: 0.01,
        cosine_tolerance: 0.999,
        auto_rollback: true,
        scale_down_delay: Duration::from_secs(60),
        max_abs_diff: 0.0,
        top1: false,
        paused: false,
        max_surge: 1,
        max_error_rate: 0.01,
        max_latency_ratio: 3.0,
        progress_deadline: Duration::from_secs(600),
    }
}

fn at(secs: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000 + secs).unwrap()
}

/// A pipeline serving v1 on blue, with a spec that may ask for another model.
struct World {
    spec: ModelRef,
    policy: ValidRollout,
    active_color: Color,
    active_model: ModelRef,
    rollout: Option<RolloutStatus>,
    obs: Observations,
}

impl World {
    fn serving_v1() -> Self {
        Self {
            spec: model("v1"),
            policy: policy(),
            active_color: Color::Blue,
            active_model: model("v1"),
            rollout: None,
            obs: Observations {
                active_ready: 2,
                candidate_wanted: 1,
                routes_acked: Some(7),
                ..Observations::default()
            },
        }
    }

    /// Runs one tick at `secs` and adopts the decision as the new status.
    fn tick(&mut self, secs: i64, action: Option<UserAction>) -> Vec<Transition> {
        let d = next(&Inputs {
            spec_model: &self.spec,
            policy: &self.policy,
            active_color: self.active_color,
            active_model: &self.active_model,
            rollout: self.rollout.as_ref(),
            obs: &self.obs,
            action,
            now: at(secs),
        });
        self.active_color = d.active_color;
        self.active_model = d.active_model;
        self.rollout = d.rollout;
        d.events
    }

    fn phase(&self) -> Option<RolloutPhase> {
        self.rollout.as_ref().and_then(|r| r.phase)
    }

    fn r(&self) -> &RolloutStatus {
        self.rollout.as_ref().expect("a rollout in status")
    }

    /// Drives a v1 → v2 rollout to the shadow phase.
    fn shadowing_v2(&mut self) {
        self.spec = model("v2");
        self.tick(0, None);
        self.obs.candidate_ready = 1;
        self.tick(5, None);
        assert_eq!(self.phase(), Some(RolloutPhase::Shadowing));
    }

    fn passes_shadow(&mut self, secs: i64) {
        self.obs.shadow = ShadowCounts {
            compared: 100,
            mismatches: 0,
            errors: 0,
            worst_cosine: Some(0.999_99),
            max_abs_diff: Some(0.0001),
        };
        assert_eq!(reasons(&self.tick(secs, None)), ["ShadowPassed"]);
    }
}

fn reasons(events: &[Transition]) -> Vec<&str> {
    events.iter().map(|e| e.reason.as_str()).collect()
}

#[test]
fn nothing_happens_while_the_spec_names_the_active_model() {
    let mut w = World::serving_v1();
    assert!(w.tick(0, None).is_empty());
    assert_eq!(w.rollout, None);
    assert_eq!(w.active_model, model("v1"));
}

#[test]
fn a_new_model_in_the_spec_starts_provisioning_the_other_color_with_no_traffic() {
    let mut w = World::serving_v1();
    w.spec = model("v2");
    let ev = w.tick(0, None);
    assert_eq!(reasons(&ev), ["RolloutStarted"]);
    let r = w.r();
    assert_eq!(r.phase, Some(RolloutPhase::Provisioning));
    assert_eq!(r.candidate_color, Some(Color::Green));
    assert_eq!(r.candidate_model, Some(model("v2")));
    assert_eq!(r.traffic_percent, 0);
    assert_eq!(r.previous_model, Some(model("v1")));
    assert_eq!(w.active_model, model("v1"), "v1 keeps serving");
}

#[test]
fn a_pipeline_with_no_ready_pods_takes_the_new_model_in_place() {
    let mut w = World::serving_v1();
    w.obs.active_ready = 0;
    w.spec = model("v2");
    let ev = w.tick(0, None);
    assert_eq!(reasons(&ev), ["ModelReplaced"]);
    assert_eq!(w.active_model, model("v2"));
    assert_eq!(w.active_color, Color::Blue);
    assert_eq!(w.rollout, None);
}

#[test]
fn provisioning_waits_for_loaded_candidate_pods_and_an_acknowledged_table() {
    let mut w = World::serving_v1();
    w.spec = model("v2");
    w.tick(0, None);
    w.tick(5, None);
    assert_eq!(w.phase(), Some(RolloutPhase::Provisioning));
    assert!(w.r().message.as_deref().unwrap().contains("0/1 ready"));

    w.obs.candidate_ready = 1;
    w.obs.routes_acked = None;
    w.tick(6, None);
    assert_eq!(w.phase(), Some(RolloutPhase::Provisioning));

    w.obs.routes_acked = Some(8);
    let ev = w.tick(7, None);
    assert_eq!(reasons(&ev), ["ShadowStarted"]);
    assert_eq!(w.phase(), Some(RolloutPhase::Shadowing));
    assert_eq!(w.r().traffic_percent, 0, "shadowing moves no live traffic");
    assert_eq!(w.r().routes_generation, Some(8));
}

#[test]
fn candidate_pods_that_never_become_ready_roll_back_at_the_progress_deadline() {
    let mut w = World::serving_v1();
    w.spec = model("v2");
    w.tick(0, None);
    w.tick(599, None);
    assert_eq!(w.phase(), Some(RolloutPhase::Provisioning));
    let ev = w.tick(600, None);
    assert_eq!(reasons(&ev), ["ProgressDeadlineExceeded"]);
    assert!(ev[0].warning);
    assert_eq!(w.phase(), Some(RolloutPhase::RolledBack));
    assert_eq!(w.r().candidate_color, None, "the candidate is removed");
    let msg = w.r().message.clone().unwrap();
    assert!(msg.contains("0/1 pods ready"), "{msg}");
    assert!(msg.contains("after 600s"), "{msg}");
}

#[test]
fn a_crashing_candidate_says_why_while_provisioning_and_when_rolled_back() {
    let mut w = World::serving_v1();
    w.spec = model("v2");
    w.tick(0, None);
    let why = "CrashLoopBackOff: container inference exited with code 1: sha256 mismatch";
    w.obs.candidate_problem = Some(why.to_owned());
    w.tick(30, None);
    assert_eq!(
        w.r().message.as_deref(),
        Some(format!("waiting for candidate pods to load minilm:v2: 0/1 ready; {why}").as_str())
    );
    let ev = w.tick(600, None);
    assert_eq!(reasons(&ev), ["ProgressDeadlineExceeded"]);
    let msg = w.r().message.clone().unwrap();
    assert!(
        msg.contains(&format!("(progressDeadline 600s): {why}; rolled back")),
        "{msg}"
    );
}

const SHA_MISMATCH: &str = "Error: model minilm from http://models/v2/model.safetensors: sha256 mismatch for /tmp/models/model.safetensors: expected aaaa, got bbbb";

/// A candidate pod, created a second into the rollout, whose inference container restarted
/// `restarts` times and waits in CrashLoopBackOff after exiting with code 1 and `message` (its
/// log's end).
fn crashing(restarts: i32, message: &str) -> PodSummary {
    PodSummary {
        name: format!("minilm-inference-green-{restarts}").into(),
        namespace: "ml".into(),
        created: Some(at(1)),
        status: PodStatusSummary {
            container_statuses: vec![ContainerStatusSummary {
                name: "inference".into(),
                restart_count: restarts,
                state: ContainerStateSummary {
                    waiting: Some(ContainerWaiting {
                        reason: Some("CrashLoopBackOff".into()),
                        message: Some("back-off 40s restarting failed container".into()),
                    }),
                    terminated: None,
                },
                last_state: ContainerStateSummary {
                    waiting: None,
                    terminated: Some(ContainerTerminated {
                        exit_code: 1,
                        reason: Some("Error".into()),
                        message: Some(message.to_owned()),
                    }),
                },
                ready: false,
            }],
            ..PodStatusSummary::default()
        },
        ..PodSummary::default()
    }
}

/// A candidate pod that passes its readiness probe.
fn ready_pod() -> PodSummary {
    PodSummary {
        name: "minilm-inference-green-ready".into(),
        namespace: "ml".into(),
        created: Some(at(1)),
        status: PodStatusSummary {
            conditions: vec![PodConditionSummary {
                type_: "Ready".into(),
                status: "True".into(),
                ..PodConditionSummary::default()
            }],
            container_statuses: vec![ContainerStatusSummary {
                name: "inference".into(),
                ready: true,
                ..ContainerStatusSummary::default()
            }],
            ..PodStatusSummary::default()
        },
        ..PodSummary::default()
    }
}

/// A candidate pod the scheduler cannot place (its node went away, say): not ready, no
/// restarts.
fn unschedulable_pod(created: i64) -> PodSummary {
    PodSummary {
        name: format!("minilm-inference-green-{created}").into(),
        namespace: "ml".into(),
        created: Some(at(created)),
        status: PodStatusSummary {
            conditions: vec![PodConditionSummary {
                type_: "PodScheduled".into(),
                status: "False".into(),
                reason: Some("Unschedulable".into()),
                message: Some("0/3 nodes are available: 3 Insufficient nvidia.com/gpu.".into()),
            }],
            ..PodStatusSummary::default()
        },
        ..PodSummary::default()
    }
}

fn pods(pods: impl IntoIterator<Item = PodSummary>) -> Vec<Arc<PodSummary>> {
    pods.into_iter().map(Arc::new).collect()
}

/// A v1 → v2 rollout provisioning since t = 0.
fn provisioning_v2() -> World {
    let mut w = World::serving_v1();
    w.spec = model("v2");
    w.tick(0, None);
    assert_eq!(w.phase(), Some(RolloutPhase::Provisioning));
    w
}

#[test]
fn a_candidate_whose_pods_all_crash_loop_rolls_back_long_before_the_progress_deadline() {
    let mut w = provisioning_v2();
    w.obs.candidate_pods = pods([crashing(3, &format!("loading model\n{SHA_MISMATCH}\n"))]);
    let ev = w.tick(75, None);
    assert_eq!(reasons(&ev), ["CandidateCrashLoop"]);
    assert!(ev[0].warning);
    assert_eq!(w.phase(), Some(RolloutPhase::RolledBack));
    assert_eq!(w.r().candidate_color, None, "the candidate is removed");
    assert_eq!(
        (w.active_color, &w.active_model),
        (Color::Blue, &model("v1"))
    );
    assert_eq!(
        w.r().message.as_deref(),
        Some(
            format!(
                "candidate minilm:v2 on green is crash-looping with no pod ready (1 pod(s), each restarted at least 3 times): container inference restarted 3 times, last exited with code 1: {SHA_MISMATCH}; rolled back: all traffic is on blue (minilm:v1)"
            )
            .as_str()
        )
    );
    assert_eq!(ev[0].note, w.r().message.clone().unwrap());
}

#[test]
fn a_crash_loop_without_auto_rollback_halts_the_rollout_on_its_candidate() {
    let mut w = provisioning_v2();
    w.policy.auto_rollback = false;
    w.obs.candidate_pods = pods([crashing(4, SHA_MISMATCH)]);
    assert_eq!(reasons(&w.tick(75, None)), ["RolloutHalted"]);
    let r = w.r();
    assert!(r.halted);
    assert_eq!(r.phase, Some(RolloutPhase::Provisioning));
    assert_eq!(r.candidate_color, Some(Color::Green));
    let msg = r.message.clone().unwrap();
    assert!(
        msg.starts_with("candidate minilm:v2 on green is crash-looping"),
        "{msg}"
    );
    assert!(msg.contains("restarted 4 times"), "{msg}");
    assert!(msg.contains("autoRollback is off"), "{msg}");
    assert!(w.tick(700, None).is_empty(), "halted: not failed again");
    assert!(w.r().halted);
}

#[test]
fn the_reason_quoted_for_unready_candidate_pods_is_never_an_earlier_candidates_crash() {
    // v2's pod crash-looped since t = 1; v3's rollout began at t = 600 and its pod waits
    // unscheduled.
    let earlier = crashing(5, SHA_MISMATCH);
    let both = pods([earlier.clone(), unschedulable_pod(601)]);
    let why = candidate_problem(&both, Some(at(600))).expect("the new pod's problem");
    assert!(why.contains("Insufficient nvidia.com/gpu"), "{why}");
    // Only the earlier pod left: nothing known about the new model's pods yet.
    assert_eq!(
        candidate_problem(&pods([earlier.clone()]), Some(at(600))),
        None
    );
    // Without a start time every pod counts, as before.
    let all = candidate_problem(&pods([earlier]), None).expect("a problem");
    assert!(all.contains("CrashLoopBackOff"), "{all}");
}

#[test]
fn one_crashing_pod_beside_a_ready_or_a_starting_one_keeps_the_rollout_waiting() {
    let mut w = provisioning_v2();
    w.obs.candidate_wanted = 2;
    w.obs.candidate_ready = 1;
    w.obs.candidate_pods = pods([crashing(5, SHA_MISMATCH), ready_pod()]);
    assert!(w.tick(120, None).is_empty());
    assert_eq!(w.phase(), Some(RolloutPhase::Provisioning));

    // Ready for Kubernetes but not (yet) answering GetStats with the model loaded.
    w.obs.candidate_ready = 0;
    assert!(w.tick(121, None).is_empty());

    // A second pod still starting (pulling its image, loading the model) may yet come up.
    let starting = PodSummary {
        name: "minilm-inference-green-new".into(),
        created: Some(at(100)),
        ..PodSummary::default()
    };
    w.obs.candidate_pods = pods([crashing(5, SHA_MISMATCH), starting]);
    assert!(w.tick(122, None).is_empty());
    assert_eq!(w.phase(), Some(RolloutPhase::Provisioning));
}

#[test]
fn pods_with_fewer_than_three_restarts_keep_the_rollout_waiting_until_the_third() {
    let mut w = provisioning_v2();
    let why = format!("CrashLoopBackOff: container inference exited with code 1: {SHA_MISMATCH}");
    w.obs.candidate_problem = Some(why.clone());
    w.obs.candidate_pods = pods([crashing(2, SHA_MISMATCH)]);
    assert!(w.tick(120, None).is_empty());
    assert_eq!(
        w.r().message.as_deref(),
        Some(format!("waiting for candidate pods to load minilm:v2: 0/1 ready; {why}").as_str())
    );
    w.obs.candidate_pods = pods([crashing(3, SHA_MISMATCH)]);
    assert_eq!(reasons(&w.tick(121, None)), ["CandidateCrashLoop"]);
}

#[test]
fn an_earlier_candidates_crash_looping_pod_on_the_color_is_not_the_new_rollouts() {
    // A halted v2 rollout superseded by v3: the Deployment keeps v2's crash-looping pod until
    // v3's is available, and until v3's is created (or ever, under a full quota) it is the only
    // pod there is.
    let mut w = World::serving_v1();
    w.policy.auto_rollback = false;
    w.spec = model("v2");
    w.tick(0, None);
    let v2_pod = crashing(5, "v2's error");
    w.obs.candidate_pods = pods([v2_pod.clone()]);
    assert_eq!(reasons(&w.tick(75, None)), ["RolloutHalted"]);
    w.spec = model("v3");
    assert_eq!(reasons(&w.tick(200, None)), ["RolloutSuperseded"]);
    assert!(w.tick(201, None).is_empty());
    assert!(w.tick(400, None).is_empty());
    assert_eq!(w.phase(), Some(RolloutPhase::Provisioning));
    assert!(!w.r().halted);

    // Created with whole seconds, a little behind the operator's clock: still v3's.
    let mut v3_pod = crashing(3, "v3's error");
    v3_pod.created = Some(at(197));
    w.obs.candidate_pods = pods([v2_pod, v3_pod]);
    assert_eq!(reasons(&w.tick(401, None)), ["RolloutHalted"]);
    let msg = w.r().message.clone().unwrap();
    assert!(msg.contains("minilm:v3 on green is crash-looping"), "{msg}");
    assert!(msg.contains("(1 pod(s), each"), "{msg}");
    assert!(msg.contains("v3's error"), "{msg}");
}

#[test]
fn the_crash_message_quotes_the_last_line_of_the_least_restarted_pods_exit_bounded_at_a_char_boundary()
 {
    let mut w = provisioning_v2();
    let long = "é".repeat(1000);
    w.obs.candidate_pods = pods([
        crashing(9, "the older pod's error"),
        crashing(3, &format!("first line\n{long}\n\n")),
    ]);
    assert_eq!(reasons(&w.tick(75, None)), ["CandidateCrashLoop"]);
    let msg = w.r().message.clone().unwrap();
    assert!(
        msg.contains("(2 pod(s), each restarted at least 3 times)"),
        "{msg}"
    );
    assert!(
        msg.contains("container inference restarted 3 times"),
        "{msg}"
    );
    assert!(!msg.contains("older pod"), "{msg}");
    assert!(!msg.contains("first line"), "the last line only: {msg}");
    assert!(
        msg.contains(&format!("code 1: {}…; rolled back", "é".repeat(150))),
        "{msg}"
    );
    assert!(msg.len() < 600, "{} bytes: {msg}", msg.len());
}

#[test]
fn a_container_running_again_between_crashes_or_an_init_container_counts_and_a_clean_exit_does_not()
{
    let between_crashes = |exit_code: i32| {
        let mut p = crashing(3, SHA_MISMATCH);
        let c = &mut p.status.container_statuses[0];
        c.state = ContainerStateSummary::default();
        if let Some(t) = c.last_state.terminated.as_mut() {
            t.exit_code = exit_code;
        }
        p
    };
    let mut w = provisioning_v2();
    w.obs.candidate_pods = pods([between_crashes(0)]);
    assert!(w.tick(75, None).is_empty(), "exited 0, not backing off");
    w.obs.candidate_pods = pods([between_crashes(1)]);
    assert_eq!(reasons(&w.tick(76, None)), ["CandidateCrashLoop"]);

    let mut w = provisioning_v2();
    let mut init = crashing(3, "cannot fetch");
    init.status.init_container_statuses = std::mem::take(&mut init.status.container_statuses);
    init.status.init_container_statuses[0].name = "fetch".into();
    w.obs.candidate_pods = pods([init]);
    assert_eq!(reasons(&w.tick(75, None)), ["CandidateCrashLoop"]);
    let msg = w.r().message.clone().unwrap();
    assert!(msg.contains("container fetch restarted 3 times"), "{msg}");
}

#[test]
fn terminating_pods_neither_make_nor_prevent_a_crash_loop() {
    let terminating = |p: PodSummary| PodSummary {
        terminating: true,
        ..p
    };
    let mut w = provisioning_v2();
    w.obs.candidate_pods = pods([terminating(crashing(5, SHA_MISMATCH))]);
    assert!(w.tick(75, None).is_empty(), "no pod left to judge");
    w.obs.candidate_pods = pods([terminating(ready_pod()), crashing(3, SHA_MISMATCH)]);
    assert_eq!(reasons(&w.tick(76, None)), ["CandidateCrashLoop"]);
}

#[test]
fn shadow_counts_accumulate_and_a_clean_shadow_moves_the_first_step_of_traffic() {
    let mut w = World::serving_v1();
    w.shadowing_v2();
    w.obs.shadow = ShadowCounts {
        compared: 40,
        ..ShadowCounts::default()
    };
    w.tick(10, None);
    assert_eq!(w.r().shadow.as_ref().unwrap().compared, 40);
    assert!(
        w.r()
            .message
            .as_deref()
            .unwrap()
            .contains("40/100 compared")
    );

    // A preprocess pod restarted and took its counts with it: what was seen is kept.
    w.obs.shadow.compared = 30;
    w.tick(11, None);
    assert_eq!(w.r().shadow.as_ref().unwrap().compared, 40);

    w.passes_shadow(12);
    assert_eq!(w.phase(), Some(RolloutPhase::ShiftingTraffic));
    assert_eq!(w.r().step, Some(0));
    assert_eq!(w.r().traffic_percent, 10);
}

#[test]
fn a_candidate_model_that_does_not_take_what_preprocess_sends_rolls_back_at_once() {
    let mut w = World::serving_v1();
    w.shadowing_v2();
    let why = "input \"input\": sent as [N, 3, 224, 224], the model takes [-1, 3, 260, 260]";
    w.obs.candidate_mismatch = Some(why.to_owned());
    let ev = w.tick(5, None);
    assert_eq!(reasons(&ev), ["ModelMismatch"]);
    assert!(ev[0].warning);
    assert_eq!(w.phase(), Some(RolloutPhase::RolledBack));
    assert_eq!(w.active_model, model("v1"));
    let msg = w.r().message.clone().unwrap();
    assert!(
        msg.starts_with(&format!(
            "candidate minilm:v2 on green does not take what preprocess sends: {why}; rolled back: all traffic is on blue"
        )),
        "{msg}"
    );
}

#[test]
fn mismatches_beyond_the_budget_roll_back_with_the_measured_rate_in_the_message() {
    let mut w = World::serving_v1();
    w.shadowing_v2();
    w.obs.shadow = ShadowCounts {
        compared: 20,
        mismatches: 2,
        errors: 0,
        worst_cosine: Some(0.95),
        max_abs_diff: Some(0.2),
    };
    let ev = w.tick(10, None);
    assert_eq!(reasons(&ev), ["ShadowParityFailed"]);
    assert_eq!(w.phase(), Some(RolloutPhase::RolledBack));
    assert_eq!(w.active_color, Color::Blue);
    assert_eq!(w.active_model, model("v1"));
    let msg = w.r().message.clone().unwrap();
    assert!(msg.contains("2 of 20 compared requests (10.0%)"), "{msg}");
    assert!(msg.contains("maxMismatchRate 1.0%"), "{msg}");
    assert!(msg.contains("worst cosine 0.950000"), "{msg}");
    assert!(msg.contains("all traffic is on blue"), "{msg}");
}

#[test]
fn a_rolled_back_model_is_not_retried_until_the_spec_names_another() {
    let mut w = World::serving_v1();
    w.shadowing_v2();
    w.obs.shadow.mismatches = 50;
    w.obs.shadow.compared = 60;
    w.tick(10, None);
    assert_eq!(w.phase(), Some(RolloutPhase::RolledBack));
    assert!(w.tick(100, None).is_empty());
    assert_eq!(w.phase(), Some(RolloutPhase::RolledBack));

    w.spec = model("v4");
    assert_eq!(reasons(&w.tick(101, None)), ["RolloutStarted"]);
    assert_eq!(w.r().candidate_model, Some(model("v4")));
}

#[test]
fn going_back_to_the_active_model_after_a_rollback_clears_the_rollout() {
    let mut w = World::serving_v1();
    w.shadowing_v2();
    w.obs.shadow.mismatches = 50;
    w.obs.shadow.compared = 60;
    w.tick(10, None);
    w.spec = model("v1");
    w.tick(11, None);
    assert_eq!(w.rollout, None);
}

#[test]
fn traffic_steps_advance_only_when_held_and_acknowledged_then_the_candidate_is_promoted() {
    let mut w = World::serving_v1();
    w.shadowing_v2();
    w.passes_shadow(10);
    assert_eq!(w.r().traffic_percent, 10);

    w.tick(39, None);
    assert_eq!(w.r().traffic_percent, 10, "held for stepDuration");
    w.obs.routes_acked = None;
    w.tick(41, None);
    assert_eq!(
        w.r().traffic_percent,
        10,
        "not every preprocess pod applied it"
    );
    w.obs.routes_acked = Some(9);
    assert_eq!(reasons(&w.tick(42, None)), ["TrafficShifted"]);
    assert_eq!((w.r().step, w.r().traffic_percent), (Some(1), 50));

    w.tick(72, None);
    assert_eq!((w.r().step, w.r().traffic_percent), (Some(2), 100));
    assert_eq!(w.active_color, Color::Blue, "100% is held before promotion");

    assert_eq!(reasons(&w.tick(102, None)), ["Promoted"]);
    assert_eq!(w.active_color, Color::Green);
    assert_eq!(w.active_model, model("v2"));
    let r = w.r();
    assert_eq!(r.phase, Some(RolloutPhase::Promoted));
    assert_eq!(r.previous_color, Some(Color::Blue));
    assert_eq!(r.previous_model, Some(model("v1")));
    assert_eq!(r.candidate_color, None);
    assert_eq!(
        r.traffic_percent, 100,
        "the promoted model serves all live traffic"
    );
}

#[test]
fn the_previous_color_is_retired_after_the_scale_down_delay() {
    let mut w = World::serving_v1();
    w.policy.steps = vec![100];
    w.shadowing_v2();
    w.passes_shadow(10);
    w.tick(40, None);
    assert_eq!(w.phase(), Some(RolloutPhase::Promoted));
    w.tick(99, None);
    assert_eq!(w.r().previous_color, Some(Color::Blue));
    assert_eq!(reasons(&w.tick(100, None)), ["PreviousColorRetired"]);
    assert_eq!(w.phase(), Some(RolloutPhase::Complete));
    assert_eq!(w.r().previous_color, None);
    assert_eq!(w.r().previous_model, Some(model("v1")), "kept for an undo");
    assert_eq!(w.r().traffic_percent, 100);
}

#[test]
fn a_candidate_error_rate_above_the_active_one_rolls_back_during_a_step() {
    let mut w = World::serving_v1();
    w.shadowing_v2();
    w.passes_shadow(10);
    w.obs.active_window = ColorWindow {
        requests: 900,
        errors: 0,
        p99_ms: 20.0,
    };
    w.obs.candidate_window = ColorWindow {
        requests: 100,
        errors: 5,
        p99_ms: 20.0,
    };
    let ev = w.tick(15, None);
    assert_eq!(reasons(&ev), ["CandidateErrors"]);
    assert_eq!(w.phase(), Some(RolloutPhase::RolledBack));
    assert_eq!(w.r().traffic_percent, 0);
    assert!(
        w.r()
            .message
            .as_deref()
            .unwrap()
            .contains("5.0% (5 of 100)")
    );
}

#[test]
fn a_few_candidate_requests_are_not_enough_to_judge_errors() {
    let mut w = World::serving_v1();
    w.shadowing_v2();
    w.passes_shadow(10);
    w.obs.candidate_window = ColorWindow {
        requests: 5,
        errors: 1,
        p99_ms: 20.0,
    };
    w.tick(15, None);
    assert_eq!(w.phase(), Some(RolloutPhase::ShiftingTraffic));
}

#[test]
fn a_much_slower_candidate_rolls_back_on_latency() {
    let mut w = World::serving_v1();
    w.shadowing_v2();
    w.passes_shadow(10);
    w.obs.active_window = ColorWindow {
        requests: 900,
        errors: 0,
        p99_ms: 20.0,
    };
    w.obs.candidate_window = ColorWindow {
        requests: 100,
        errors: 0,
        p99_ms: 70.0,
    };
    assert_eq!(reasons(&w.tick(15, None)), ["CandidateLatency"]);
    let msg = w.r().message.clone().unwrap();
    assert!(msg.contains("p99 70.0 ms is more than 3.0x"), "{msg}");
}

#[test]
fn paused_rollouts_hold_their_step() {
    let mut w = World::serving_v1();
    w.shadowing_v2();
    w.passes_shadow(10);
    w.policy.paused = true;
    w.tick(500, None);
    assert_eq!(w.r().traffic_percent, 10);
    assert!(w.r().message.as_deref().unwrap().contains("(paused)"));
    w.policy.paused = false;
    w.tick(501, None);
    assert_eq!(w.r().traffic_percent, 50);
}

#[test]
fn a_paused_rollout_without_a_shadow_phase_moves_no_traffic_once_its_candidate_is_ready() {
    let mut w = World::serving_v1();
    w.policy.paused = true;
    w.policy.shadow_requests = 0;
    w.spec = model("v2");
    w.tick(0, None);
    w.obs.candidate_ready = 1;
    assert!(w.tick(5, None).is_empty());
    assert_eq!(w.phase(), Some(RolloutPhase::Provisioning));
    assert_eq!(w.r().traffic_percent, 0);
    let message = w.r().message.clone().unwrap();
    assert!(message.contains("spec.rollout.paused"), "{message}");
    w.policy.paused = false;
    w.tick(6, None);
    assert_eq!(
        (w.phase(), w.r().traffic_percent),
        (Some(RolloutPhase::ShiftingTraffic), 10)
    );
}

#[test]
fn a_paused_rollout_with_a_shadow_phase_shadows_and_holds_at_its_end() {
    let mut w = World::serving_v1();
    w.policy.paused = true;
    w.shadowing_v2();
    w.obs.shadow = ShadowCounts {
        compared: 100,
        ..ShadowCounts::default()
    };
    assert!(w.tick(60, None).is_empty());
    assert_eq!(w.phase(), Some(RolloutPhase::Shadowing));
    assert_eq!(w.r().traffic_percent, 0);
    w.policy.paused = false;
    assert_eq!(reasons(&w.tick(61, None)), ["ShadowPassed"]);
}

#[test]
fn steps_edited_mid_rollout_go_on_from_the_first_step_above_the_share_held() {
    let mut w = World::serving_v1();
    w.shadowing_v2();
    w.passes_shadow(10);
    assert_eq!((w.r().step, w.r().traffic_percent), (Some(0), 10));
    // At 10 %, steps [10, 50, 100] become [25, 100]: the next step is 25 %, not index 1's 100 %.
    w.policy.steps = vec![25, 100];
    w.tick(40, None);
    assert_eq!((w.r().step, w.r().traffic_percent), (Some(0), 25));
    // Steps entirely below the share held are skipped, never stepped back to.
    w.policy.steps = vec![5, 20, 100];
    w.tick(70, None);
    assert_eq!((w.r().step, w.r().traffic_percent), (Some(2), 100));
    assert_eq!(reasons(&w.tick(100, None)), ["Promoted"]);
}

#[test]
fn a_new_spec_mid_rollout_supersedes_the_candidate_on_the_same_color() {
    let mut w = World::serving_v1();
    w.shadowing_v2();
    w.passes_shadow(10);
    w.spec = model("v3");
    let ev = w.tick(12, None);
    assert_eq!(reasons(&ev), ["RolloutSuperseded"]);
    let r = w.r();
    assert_eq!(r.phase, Some(RolloutPhase::Provisioning));
    assert_eq!(r.candidate_color, Some(Color::Green));
    assert_eq!(r.candidate_model, Some(model("v3")));
    assert_eq!(r.traffic_percent, 0, "traffic returns to the active color");
    assert_eq!(
        r.shadow, None,
        "old comparisons do not count for the new model"
    );
    assert_eq!(w.active_model, model("v1"));
}

#[test]
fn a_superseding_candidate_mirrors_nothing_while_the_superseded_ones_pods_still_serve() {
    let mut w = World::serving_v1();
    w.shadowing_v2();
    w.spec = model("v3");
    assert_eq!(reasons(&w.tick(12, None)), ["RolloutSuperseded"]);
    // The green Deployment rolls: a v3 pod is ready, a v2 pod not yet deleted is too. Both
    // are in the routing table, and a request for v3 sent to the v2 pod fails.
    w.obs.candidate_ready = 1;
    w.obs.candidate_stale = 1;
    assert!(w.tick(20, None).is_empty());
    assert_eq!(w.phase(), Some(RolloutPhase::Provisioning));
    let msg = w.r().message.clone().unwrap_or_default();
    assert!(
        msg.contains("1 pod(s) on green still serving an earlier candidate"),
        "{msg}"
    );

    w.obs.candidate_stale = 0;
    assert_eq!(reasons(&w.tick(21, None)), ["ShadowStarted"]);
}

#[test]
fn setting_the_spec_back_to_the_active_model_cancels_the_rollout() {
    let mut w = World::serving_v1();
    w.shadowing_v2();
    w.spec = model("v1");
    assert_eq!(reasons(&w.tick(12, None)), ["RolloutCancelled"]);
    assert_eq!(w.rollout, None);
    assert_eq!(w.active_color, Color::Blue);
}

#[test]
fn abort_sends_traffic_back_and_keeps_the_aborted_model_unserved() {
    let mut w = World::serving_v1();
    w.shadowing_v2();
    w.passes_shadow(10);
    let ev = w.tick(12, Some(UserAction::Abort));
    assert_eq!(reasons(&ev), ["RolloutAborted"]);
    assert_eq!(w.phase(), Some(RolloutPhase::Aborted));
    assert_eq!(w.r().traffic_percent, 0);
    assert_eq!(w.r().candidate_color, None);
    w.tick(100, None);
    assert_eq!(w.phase(), Some(RolloutPhase::Aborted));
}

#[test]
fn promote_skips_the_remaining_steps() {
    let mut w = World::serving_v1();
    w.shadowing_v2();
    assert_eq!(reasons(&w.tick(6, Some(UserAction::Promote))), ["Promoted"]);
    assert_eq!(w.active_color, Color::Green);
    assert_eq!(w.active_model, model("v2"));
    assert_eq!(w.r().traffic_percent, 100, "promoted from 0%, it takes all");
}

#[test]
fn rollbacks_and_halts_are_logged_at_warn_and_progress_at_info() {
    let level = |events: &[Transition]| {
        let lines = crate::test_fixtures::json_log_lines(|| {
            for e in events {
                driver::log_transition("ml", "minilm", e);
            }
        });
        lines
            .iter()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).expect("a JSON line");
                format!("{} {}", v["level"].as_str().unwrap_or("?"), v["reason"])
            })
            .collect::<Vec<_>>()
    };
    let mut w = World::serving_v1();
    w.shadowing_v2();
    w.obs.shadow = ShadowCounts {
        compared: 20,
        mismatches: 2,
        ..ShadowCounts::default()
    };
    assert_eq!(
        level(&w.tick(10, None)),
        ["WARN \"ShadowParityFailed\""],
        "a rollback"
    );

    let mut w = World::serving_v1();
    w.policy.auto_rollback = false;
    w.shadowing_v2();
    w.obs.shadow = ShadowCounts {
        compared: 100,
        ..ShadowCounts::default()
    };
    assert_eq!(level(&w.tick(10, None)), ["INFO \"ShadowPassed\""]);
    w.obs.candidate_window = ColorWindow {
        requests: 100,
        errors: 50,
        p99_ms: 20.0,
    };
    assert_eq!(level(&w.tick(15, None)), ["WARN \"RolloutHalted\""]);
}

#[test]
fn without_auto_rollback_a_failure_halts_and_holds_traffic() {
    let mut w = World::serving_v1();
    w.policy.auto_rollback = false;
    w.shadowing_v2();
    w.passes_shadow(10);
    w.obs.candidate_window = ColorWindow {
        requests: 100,
        errors: 50,
        p99_ms: 20.0,
    };
    assert_eq!(reasons(&w.tick(15, None)), ["RolloutHalted"]);
    assert!(w.r().halted);
    assert_eq!(w.r().traffic_percent, 10);
    assert_eq!(w.r().candidate_color, Some(Color::Green));
    w.obs.candidate_window = ColorWindow::default();
    w.tick(500, None);
    assert_eq!(
        w.r().traffic_percent,
        10,
        "a halted rollout does not advance"
    );
    w.tick(501, Some(UserAction::Abort));
    assert_eq!(w.phase(), Some(RolloutPhase::Aborted));
}

#[test]
fn a_restarted_operator_resumes_at_the_recorded_step() {
    let mut w = World::serving_v1();
    w.shadowing_v2();
    w.passes_shadow(10);
    w.tick(40, None);
    assert_eq!(w.r().traffic_percent, 50);
    // A new leader starts with nothing but status; its window counters are empty.
    let recorded = w.rollout.clone();
    w.obs.candidate_window = ColorWindow::default();
    w.obs.active_window = ColorWindow::default();
    w.tick(45, None);
    assert_eq!(w.r().traffic_percent, 50);
    assert_eq!(w.r().step_started_at, recorded.unwrap().step_started_at);
    w.tick(70, None);
    assert_eq!(w.r().traffic_percent, 100);
}

#[test]
fn an_undo_during_the_scale_down_delay_rolls_back_onto_the_still_running_color() {
    let mut w = World::serving_v1();
    w.policy.steps = vec![100];
    w.shadowing_v2();
    w.passes_shadow(10);
    w.tick(40, None);
    assert_eq!(w.active_color, Color::Green);
    w.spec = model("v1");
    assert_eq!(reasons(&w.tick(41, None)), ["RolloutStarted"]);
    assert_eq!(w.r().candidate_color, Some(Color::Blue));
    assert_eq!(w.r().candidate_model, Some(model("v1")));
    assert_eq!(w.r().previous_model, Some(model("v2")));
}

#[test]
fn pods_are_split_by_traffic_share_with_max_surge_extra() {
    let r = |phase, pct| RolloutStatus {
        phase: Some(phase),
        traffic_percent: pct,
        ..RolloutStatus::default()
    };
    assert_eq!(color_replicas(4, None, 1), (4, 0));
    assert_eq!(
        color_replicas(4, Some(&r(RolloutPhase::Provisioning, 0)), 1),
        (4, 1)
    );
    assert_eq!(
        color_replicas(4, Some(&r(RolloutPhase::ShiftingTraffic, 10)), 1),
        (4, 1)
    );
    assert_eq!(
        color_replicas(4, Some(&r(RolloutPhase::ShiftingTraffic, 50)), 1),
        (2, 2)
    );
    assert_eq!(
        color_replicas(4, Some(&r(RolloutPhase::ShiftingTraffic, 100)), 1),
        (1, 4)
    );
    assert_eq!(
        color_replicas(4, Some(&r(RolloutPhase::Promoted, 0)), 2),
        (4, 2)
    );
    assert_eq!(
        color_replicas(4, Some(&r(RolloutPhase::RolledBack, 0)), 1),
        (4, 0)
    );
}

#[test]
fn the_candidate_takes_live_traffic_only_while_traffic_shifts_and_never_more_than_all() {
    let with = |phase, pct| RolloutStatus {
        phase: Some(phase),
        traffic_percent: pct,
        ..RolloutStatus::default()
    };
    assert_eq!(candidate_share(None), 0);
    assert_eq!(candidate_share(Some(&with(RolloutPhase::Shadowing, 0))), 0);
    assert_eq!(
        candidate_share(Some(&with(RolloutPhase::ShiftingTraffic, 30))),
        30
    );
    assert_eq!(
        candidate_share(Some(&with(RolloutPhase::ShiftingTraffic, 250))),
        100
    );
    assert_eq!(
        candidate_share(Some(&with(RolloutPhase::ShiftingTraffic, -5))),
        0
    );
    // A promoted or rolled-back rollout keeps its last step in status; it routes nothing.
    assert_eq!(candidate_share(Some(&with(RolloutPhase::Promoted, 100))), 0);
    assert_eq!(
        candidate_share(Some(&with(RolloutPhase::RolledBack, 50))),
        0
    );
}

#[test]
fn the_annotation_a_person_acted_through_is_consumed_once_it_has_acted_and_not_before() {
    let consumed = |w: &mut World, secs: i64, action: Option<UserAction>| {
        let before = w.rollout.clone();
        w.tick(secs, action);
        consumed_annotation(action, before.as_ref(), w.rollout.as_ref())
    };
    let mut w = World::serving_v1();
    w.spec = model("v2");
    w.tick(0, None);
    // No candidate pod ready yet: a promotion cannot act, so its annotation stays.
    assert_eq!(consumed(&mut w, 1, Some(UserAction::Promote)), None);
    assert_eq!(w.phase(), Some(RolloutPhase::Provisioning));
    w.obs.candidate_ready = 1;
    assert_eq!(
        consumed(&mut w, 2, Some(UserAction::Promote)),
        Some(ANNOTATION_PROMOTE)
    );
    // Promoted: the same annotation read again is not an action any more.
    assert_eq!(consumed(&mut w, 3, Some(UserAction::Promote)), None);

    let mut w = World::serving_v1();
    w.shadowing_v2();
    assert_eq!(consumed(&mut w, 6, None), None);
    assert_eq!(
        consumed(&mut w, 7, Some(UserAction::Abort)),
        Some(ANNOTATION_ABORT)
    );
    assert_eq!(consumed(&mut w, 8, Some(UserAction::Abort)), None);
}

/// The candidate's only pod is gone and its replacement waits unscheduled.
fn lose_the_candidate(w: &mut World, created: i64) {
    w.obs.candidate_ready = 0;
    w.obs.candidate_pods = pods([unschedulable_pod(created)]);
    w.obs.candidate_problem = Some("Unschedulable: 3 Insufficient nvidia.com/gpu".into());
}

#[test]
fn a_candidate_that_loses_every_pod_mid_step_gets_no_traffic_and_its_step_starts_over_when_one_is_back()
 {
    let mut w = World::serving_v1();
    w.shadowing_v2();
    w.passes_shadow(10);
    w.tick(40, None);
    assert_eq!((w.r().step, w.r().traffic_percent), (Some(1), 50));

    lose_the_candidate(&mut w, 55);
    let ev = w.tick(60, None);
    assert_eq!(reasons(&ev), ["CandidateUnavailable"]);
    assert!(ev[0].warning);
    assert!(
        ev[0].note.contains("all live traffic is back on blue"),
        "{}",
        ev[0].note
    );
    let r = w.r().clone();
    assert_eq!(r.phase, Some(RolloutPhase::ShiftingTraffic));
    assert_eq!(r.step, Some(1), "the step is kept, to be resumed");
    assert_eq!(
        r.traffic_percent, 0,
        "no live traffic on a color with no pod"
    );
    assert_eq!(r.candidate_unavailable_since, Some(time(at(60))));
    assert_eq!(
        color_replicas(4, Some(&r), 1),
        (4, 1),
        "the active color gets its pods back"
    );

    // 50 % was due at 70 and 100 % at 100: neither moves, nothing is promoted.
    assert!(w.tick(75, None).is_empty());
    assert!(w.tick(200, None).is_empty());
    assert_eq!(w.active_color, Color::Blue);
    assert_eq!(w.r().traffic_percent, 0);
    assert_eq!(
        w.r().message.as_deref(),
        Some(
            "candidate minilm:v2 on green has had no ready pod for 140s: Unschedulable: 3 Insufficient nvidia.com/gpu; all live traffic is on blue until one is ready again (progressDeadline 600s)"
        )
    );

    // A pod is back: the step is entered again, with a full stepDuration.
    w.obs.candidate_ready = 1;
    w.obs.candidate_problem = None;
    let ev = w.tick(210, None);
    assert_eq!(reasons(&ev), ["CandidateRecovered"]);
    assert_eq!(
        ev[0].note,
        "candidate minilm:v2 on green has a ready pod again; step 2/3 starts over with 50% of traffic"
    );
    assert_eq!((w.r().step, w.r().traffic_percent), (Some(1), 50));
    assert_eq!(w.r().candidate_unavailable_since, None);
    assert!(w.tick(239, None).is_empty(), "held for stepDuration again");
    assert_eq!(reasons(&w.tick(240, None)), ["TrafficShifted"]);
    assert_eq!(w.r().traffic_percent, 100);
}

#[test]
fn a_candidate_with_no_ready_pod_for_the_progress_deadline_rolls_back() {
    let mut w = World::serving_v1();
    w.shadowing_v2();
    w.passes_shadow(10);
    lose_the_candidate(&mut w, 15);
    assert_eq!(reasons(&w.tick(20, None)), ["CandidateUnavailable"]);
    assert!(w.tick(619, None).is_empty());
    let ev = w.tick(620, None);
    assert_eq!(reasons(&ev), ["CandidateUnavailable"]);
    assert_eq!(w.phase(), Some(RolloutPhase::RolledBack));
    assert_eq!(w.r().candidate_unavailable_since, None);
    assert_eq!(
        w.r().message.as_deref(),
        Some(
            "candidate minilm:v2 on green has had no ready pod for 600s (progressDeadline 600s): Unschedulable: 3 Insufficient nvidia.com/gpu; rolled back: all traffic is on blue (minilm:v1)"
        )
    );
}

#[test]
fn a_candidate_that_starts_crash_looping_while_shadowing_rolls_back_at_once() {
    let mut w = World::serving_v1();
    w.shadowing_v2();
    w.obs.shadow.compared = 40;
    w.tick(8, None);
    w.obs.candidate_ready = 0;
    w.obs.candidate_pods = pods([crashing(3, "out of memory loading the model")]);
    let ev = w.tick(90, None);
    assert_eq!(reasons(&ev), ["CandidateCrashLoop"]);
    assert_eq!(w.phase(), Some(RolloutPhase::RolledBack));
    assert!(
        ev[0].note.starts_with(
            "candidate minilm:v2 on green is crash-looping with no pod ready (1 pod(s)"
        ),
        "{}",
        ev[0].note
    );
}

#[test]
fn shadowing_waits_for_a_lost_candidate_and_resumes_with_its_counts() {
    let mut w = World::serving_v1();
    w.shadowing_v2();
    w.obs.shadow.compared = 40;
    w.tick(8, None);
    lose_the_candidate(&mut w, 9);
    assert_eq!(reasons(&w.tick(10, None)), ["CandidateUnavailable"]);
    assert_eq!(w.phase(), Some(RolloutPhase::Shadowing));
    w.obs.candidate_ready = 1;
    let ev = w.tick(30, None);
    assert_eq!(
        ev[0].note,
        "candidate minilm:v2 on green has a ready pod again; mirroring resumes at 40/100 compared"
    );
    assert_eq!(w.r().shadow.as_ref().map(|s| s.compared), Some(40));
    w.obs.shadow.compared = 100;
    assert_eq!(reasons(&w.tick(31, None)), ["ShadowPassed"]);
}

#[test]
fn a_candidate_ready_for_kubernetes_whose_stats_call_failed_is_not_lost() {
    let mut w = World::serving_v1();
    w.shadowing_v2();
    w.passes_shadow(10);
    // GetStats timed out this tick, but the pod is Ready.
    w.obs.candidate_ready = 0;
    w.obs.candidate_pods = pods([ready_pod()]);
    assert!(w.tick(20, None).is_empty());
    assert_eq!(w.r().traffic_percent, 10);
    assert_eq!(w.r().candidate_unavailable_since, None);
}
