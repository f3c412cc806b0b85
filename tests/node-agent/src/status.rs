//! Builds a Pod's `status` from what the agent observed about its processes. Pure: the pod,
//! the runtime facts and `now` go in, a `PodStatus` comes out.

use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
    ContainerStatus, HostIP, Pod, PodCondition, PodIP, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

/// How a container run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Termination {
    /// Exit code (128 + signal when killed by a signal).
    pub exit_code: i32,
    /// The signal that killed it, if any.
    pub signal: Option<i32>,
    /// `Completed`, `Error`, or the agent's reason (e.g. `StartError`).
    pub reason: String,
    /// Human-readable detail.
    pub message: Option<String>,
    /// When the run started.
    pub started_at: Timestamp,
    /// When it ended.
    pub finished_at: Timestamp,
    /// Container ID of that run.
    pub container_id: Option<String>,
}

/// The state of one container as the agent sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunState {
    /// Not running; `reason` says why (`ContainerCreating`, `ImageNotMapped`, `CrashLoopBackOff`..).
    Waiting {
        /// Machine-readable reason.
        reason: String,
        /// Human-readable detail.
        message: Option<String>,
    },
    /// The process runs.
    Running {
        /// Start time of this run.
        started_at: Timestamp,
    },
    /// The process ended and will not be restarted (for now).
    Terminated(Termination),
}

/// One container's runtime record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerRuntime {
    /// Container name.
    pub name: String,
    /// Image as in the spec.
    pub image: String,
    /// What the image resolved to (`tandem://<binary>`), empty when unresolved.
    pub image_id: String,
    /// ID of the current run.
    pub container_id: Option<String>,
    /// Current state.
    pub state: RunState,
    /// Readiness (readiness probe passed, or running without one).
    pub ready: bool,
    /// Started (startup probe passed, or running without one).
    pub started: bool,
    /// Number of restarts.
    pub restart_count: i32,
    /// The previous run's end.
    pub last_termination: Option<Termination>,
}

impl ContainerRuntime {
    /// A container that has not been started yet.
    pub fn creating(name: &str, image: &str) -> Self {
        Self {
            name: name.to_owned(),
            image: image.to_owned(),
            image_id: String::new(),
            container_id: None,
            state: RunState::Waiting {
                reason: "ContainerCreating".to_owned(),
                message: None,
            },
            ready: false,
            started: false,
            restart_count: 0,
            last_termination: None,
        }
    }
}

/// Everything the agent knows about a pod at run time.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodRuntime {
    /// Init containers, in spec order.
    pub init_containers: Vec<ContainerRuntime>,
    /// Containers, in spec order.
    pub containers: Vec<ContainerRuntime>,
    /// Pod IP, once the network namespace exists.
    pub pod_ip: Option<Ipv4Addr>,
    /// Node IP.
    pub host_ip: Option<Ipv4Addr>,
    /// When the agent accepted the pod.
    pub start_time: Option<Timestamp>,
    /// The network namespace and volumes are ready.
    pub sandbox_ready: bool,
    /// All init containers completed.
    pub initialized: bool,
    /// Pod-level failure reason (e.g. network setup failed).
    pub reason: Option<String>,
    /// Pod-level message.
    pub message: Option<String>,
}

impl PodRuntime {
    /// The init containers or the containers.
    pub fn containers_of(&self, init: bool) -> &[ContainerRuntime] {
        if init {
            &self.init_containers
        } else {
            &self.containers
        }
    }
}

fn time(t: Timestamp) -> Time {
    Time(t)
}

fn termination_state(t: &Termination) -> ContainerState {
    ContainerState {
        terminated: Some(ContainerStateTerminated {
            container_id: t.container_id.clone(),
            exit_code: t.exit_code,
            signal: t.signal,
            reason: Some(t.reason.clone()),
            message: t.message.clone(),
            started_at: Some(time(t.started_at)),
            finished_at: Some(time(t.finished_at)),
        }),
        ..ContainerState::default()
    }
}

/// Converts one container record to its API status.
pub fn container_status(c: &ContainerRuntime) -> ContainerStatus {
    let state = match &c.state {
        RunState::Waiting { reason, message } => ContainerState {
            waiting: Some(ContainerStateWaiting {
                reason: Some(reason.clone()),
                message: message.clone(),
            }),
            ..ContainerState::default()
        },
        RunState::Running { started_at } => ContainerState {
            running: Some(ContainerStateRunning {
                started_at: Some(time(*started_at)),
            }),
            ..ContainerState::default()
        },
        RunState::Terminated(t) => termination_state(t),
    };
    ContainerStatus {
        name: c.name.clone(),
        image: c.image.clone(),
        image_id: c.image_id.clone(),
        container_id: c.container_id.clone(),
        ready: c.ready && matches!(c.state, RunState::Running { .. }),
        started: Some(c.started && matches!(c.state, RunState::Running { .. })),
        restart_count: c.restart_count,
        state: Some(state),
        last_state: Some(
            c.last_termination
                .as_ref()
                .map(termination_state)
                .unwrap_or_default(),
        ),
        ..ContainerStatus::default()
    }
}

/// The pod phase by the kubelet's rules.
pub fn phase(restart_policy: &str, rt: &PodRuntime) -> &'static str {
    if !rt.initialized {
        let init_failed_for_good = rt.init_containers.iter().any(|c| {
            matches!(&c.state, RunState::Terminated(t) if t.exit_code != 0)
                && restart_policy == "Never"
        });
        return if init_failed_for_good {
            "Failed"
        } else {
            "Pending"
        };
    }
    let (mut waiting, mut running, mut stopped, mut succeeded) = (0usize, 0usize, 0usize, 0usize);
    for c in &rt.containers {
        match &c.state {
            RunState::Running { .. } => running += 1,
            RunState::Terminated(t) => {
                stopped += 1;
                if t.exit_code == 0 {
                    succeeded += 1;
                }
            }
            RunState::Waiting { .. } if c.last_termination.is_some() => stopped += 1,
            RunState::Waiting { .. } => waiting += 1,
        }
    }
    let total = rt.containers.len();
    if waiting > 0 {
        "Pending"
    } else if running > 0 {
        "Running"
    } else if stopped == total && total > 0 {
        match restart_policy {
            "Always" => "Running",
            "OnFailure" if succeeded == total => "Succeeded",
            "OnFailure" => "Running",
            _ if succeeded == total => "Succeeded",
            _ => "Failed",
        }
    } else {
        "Pending"
    }
}

fn condition(
    existing: &[PodCondition],
    type_: &str,
    ok: bool,
    reason: Option<&str>,
    now: Timestamp,
) -> PodCondition {
    let status = if ok { "True" } else { "False" };
    let prev = existing.iter().find(|c| c.type_ == type_);
    let last_transition_time = match prev {
        Some(p) if p.status == status && p.last_transition_time.is_some() => {
            p.last_transition_time.clone()
        }
        _ => Some(time(now)),
    };
    PodCondition {
        type_: type_.to_owned(),
        status: status.to_owned(),
        last_transition_time,
        reason: if ok { None } else { reason.map(str::to_owned) },
        ..PodCondition::default()
    }
}

/// Builds the whole pod status. Keeps `PodScheduled` (the scheduler's) and the transition times
/// of conditions whose status did not change.
pub fn build_status(pod: &Pod, rt: &PodRuntime, now: Timestamp) -> PodStatus {
    let spec = pod.spec.as_ref();
    let restart_policy = spec
        .and_then(|s| s.restart_policy.as_deref())
        .unwrap_or("Always");
    let existing: Vec<PodCondition> = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default();
    let phase = phase(restart_policy, rt);
    let containers_ready = rt.initialized
        && !rt.containers.is_empty()
        && rt
            .containers
            .iter()
            .all(|c| c.ready && matches!(c.state, RunState::Running { .. }));
    let gates_ok = spec
        .and_then(|s| s.readiness_gates.as_ref())
        .map(|gates| {
            gates.iter().all(|g| {
                existing
                    .iter()
                    .any(|c| c.type_ == g.condition_type && c.status == "True")
            })
        })
        .unwrap_or(true);
    let terminal = phase == "Succeeded" || phase == "Failed";
    let not_ready_reason = if terminal {
        "PodCompleted"
    } else {
        "ContainersNotReady"
    };

    let mut conditions = vec![
        condition(
            &existing,
            "PodReadyToStartContainers",
            rt.sandbox_ready && !terminal,
            None,
            now,
        ),
        condition(
            &existing,
            "Initialized",
            rt.initialized,
            Some("ContainersNotInitialized"),
            now,
        ),
        condition(
            &existing,
            "Ready",
            containers_ready && gates_ok,
            Some(not_ready_reason),
            now,
        ),
        condition(
            &existing,
            "ContainersReady",
            containers_ready,
            Some(not_ready_reason),
            now,
        ),
    ];
    let scheduled = existing
        .iter()
        .find(|c| c.type_ == "PodScheduled")
        .cloned()
        .unwrap_or_else(|| condition(&[], "PodScheduled", true, None, now));
    conditions.push(scheduled);
    // Readiness-gate conditions belong to others: carry them over untouched.
    for c in &existing {
        if !conditions.iter().any(|k| k.type_ == c.type_) {
            conditions.push(c.clone());
        }
    }

    let pod_ip = rt.pod_ip.map(|ip| ip.to_string());
    let host_ip = rt.host_ip.map(|ip| ip.to_string());
    PodStatus {
        phase: Some(phase.to_owned()),
        conditions: Some(conditions),
        container_statuses: Some(rt.containers.iter().map(container_status).collect()),
        init_container_statuses: if rt.init_containers.is_empty() {
            None
        } else {
            Some(rt.init_containers.iter().map(container_status).collect())
        },
        pod_ip: pod_ip.clone(),
        pod_ips: pod_ip.map(|ip| vec![PodIP { ip }]),
        host_ip: host_ip.clone(),
        host_ips: host_ip.map(|ip| vec![HostIP { ip }]),
        start_time: rt.start_time.map(time),
        qos_class: pod.status.as_ref().and_then(|s| s.qos_class.clone()),
        observed_generation: pod.metadata.generation,
        reason: rt.reason.clone(),
        message: rt.message.clone(),
        ..PodStatus::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ts(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).expect("valid timestamp")
    }

    fn pod(policy: &str) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "n", "generation": 3},
            "spec": {"restartPolicy": policy, "containers": [{"name": "c", "image": "tandem-testserver"}]},
            "status": {"conditions": [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": "2027-01-01T00:00:00Z"},
                {"type": "Ready", "status": "False", "lastTransitionTime": "2027-01-01T00:00:00Z"}
            ]}
        }))
        .expect("valid pod")
    }

    fn running(ready: bool) -> ContainerRuntime {
        ContainerRuntime {
            state: RunState::Running { started_at: ts(1) },
            ready,
            started: true,
            ..ContainerRuntime::creating("c", "tandem-testserver")
        }
    }

    fn exited(code: i32) -> Termination {
        Termination {
            exit_code: code,
            signal: None,
            reason: if code == 0 {
                "Completed".into()
            } else {
                "Error".into()
            },
            message: None,
            started_at: ts(1),
            finished_at: ts(2),
            container_id: None,
        }
    }

    fn rt(c: ContainerRuntime) -> PodRuntime {
        PodRuntime {
            containers: vec![c],
            pod_ip: Some(Ipv4Addr::new(10, 244, 0, 5)),
            host_ip: Some(Ipv4Addr::new(10, 244, 0, 1)),
            start_time: Some(ts(0)),
            sandbox_ready: true,
            initialized: true,
            ..PodRuntime::default()
        }
    }

    fn cond<'a>(s: &'a PodStatus, t: &str) -> &'a PodCondition {
        s.conditions
            .as_ref()
            .and_then(|c| c.iter().find(|c| c.type_ == t))
            .expect("condition present")
    }

    #[test]
    fn a_ready_running_container_makes_the_pod_running_and_ready() {
        let s = build_status(&pod("Always"), &rt(running(true)), ts(10));
        assert_eq!(s.phase.as_deref(), Some("Running"));
        assert_eq!(cond(&s, "Ready").status, "True");
        assert_eq!(cond(&s, "ContainersReady").status, "True");
        assert_eq!(cond(&s, "Ready").last_transition_time, Some(Time(ts(10))));
        assert_eq!(s.pod_ip.as_deref(), Some("10.244.0.5"));
        assert_eq!(s.host_ip.as_deref(), Some("10.244.0.1"));
        assert_eq!(s.observed_generation, Some(3));
        let cs = &s.container_statuses.expect("statuses")[0];
        assert!(cs.ready);
        assert!(cs.state.as_ref().and_then(|s| s.running.as_ref()).is_some());
    }

    #[test]
    fn unchanged_conditions_keep_their_transition_time_and_pod_scheduled_is_kept() {
        let s = build_status(&pod("Always"), &rt(running(false)), ts(10));
        assert_eq!(cond(&s, "Ready").status, "False");
        assert_eq!(
            cond(&s, "Ready").reason.as_deref(),
            Some("ContainersNotReady")
        );
        let kept = Timestamp::from_second(1_798_761_600).expect("2027-01-01");
        assert_eq!(cond(&s, "Ready").last_transition_time, Some(Time(kept)));
        assert_eq!(
            cond(&s, "PodScheduled").last_transition_time,
            Some(Time(kept))
        );
    }

    #[test]
    fn a_container_waiting_for_its_first_start_keeps_the_pod_pending() {
        let mut c = ContainerRuntime::creating("c", "nginx");
        c.state = RunState::Waiting {
            reason: "ImageNotMapped".into(),
            message: Some("image \"nginx\" is not mapped".into()),
        };
        let s = build_status(&pod("Always"), &rt(c), ts(10));
        assert_eq!(s.phase.as_deref(), Some("Pending"));
        let cs = &s.container_statuses.expect("statuses")[0];
        let w = cs
            .state
            .as_ref()
            .and_then(|s| s.waiting.as_ref())
            .expect("waiting");
        assert_eq!(w.reason.as_deref(), Some("ImageNotMapped"));
    }

    #[test]
    fn crash_looping_containers_keep_an_always_pod_running_with_last_state() {
        let mut c = ContainerRuntime::creating("c", "x");
        c.state = RunState::Waiting {
            reason: "CrashLoopBackOff".into(),
            message: None,
        };
        c.restart_count = 2;
        c.last_termination = Some(exited(3));
        let s = build_status(&pod("Always"), &rt(c), ts(10));
        assert_eq!(s.phase.as_deref(), Some("Running"));
        let cs = &s.container_statuses.expect("statuses")[0];
        assert_eq!(cs.restart_count, 2);
        let last = cs
            .last_state
            .as_ref()
            .and_then(|s| s.terminated.as_ref())
            .expect("last");
        assert_eq!(last.exit_code, 3);
    }

    #[test]
    fn terminal_phases_follow_the_restart_policy() {
        let done = |code| ContainerRuntime {
            state: RunState::Terminated(exited(code)),
            ..ContainerRuntime::creating("c", "x")
        };
        let phase_of =
            |policy: &str, code| build_status(&pod(policy), &rt(done(code)), ts(5)).phase;
        assert_eq!(phase_of("Never", 0).as_deref(), Some("Succeeded"));
        assert_eq!(phase_of("Never", 1).as_deref(), Some("Failed"));
        assert_eq!(phase_of("OnFailure", 0).as_deref(), Some("Succeeded"));
        assert_eq!(phase_of("OnFailure", 1).as_deref(), Some("Running"));
        let s = build_status(&pod("Never"), &rt(done(0)), ts(5));
        assert_eq!(cond(&s, "Ready").reason.as_deref(), Some("PodCompleted"));
    }

    #[test]
    fn uninitialized_pods_are_pending_and_fail_when_init_fails_with_never() {
        let mut r = rt(ContainerRuntime::creating("c", "x"));
        r.initialized = false;
        r.init_containers = vec![ContainerRuntime {
            state: RunState::Terminated(exited(1)),
            ..ContainerRuntime::creating("init", "x")
        }];
        assert_eq!(phase("Always", &r), "Pending");
        assert_eq!(phase("Never", &r), "Failed");
    }
}
