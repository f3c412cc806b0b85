//! Pure: one round of `GetStats` answers from a pipeline's ready pods → each stage's
//! [`Demand`]. Remembers every pod's last good answer, so a pod that misses a poll stands in
//! with that answer for a bounded grace and is then counted as *unknown* — never as idle.
//!
//! Feed-forward: the inference stage's demand adds what the preprocess stage holds in its own
//! hands (queued or being preprocessed) and the requests it holds for want of an inference
//! endpoint, so inference grows before its own queue does. Its throughput term sizes inference
//! from the preprocess arrival rate over the per-pod rate inference pods reached while they had
//! a queue.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::build::Stage;

use super::decision::{Demand, StageMemory};

/// Smoothed arrival rates below this, in a round without arrivals, count as none.
const MIN_ARRIVAL_RPS: f64 = 0.1;

/// The load figures the autoscaler reads from one `WorkerStats` answer.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PodLoad {
    /// Requests waiting for a worker thread (preprocess) or the batcher (inference).
    pub queue_depth: u64,
    /// Preprocess: admitted and not answered (queued, preprocessing, forwarded or held).
    /// Inference: requests in the batch being executed.
    pub in_flight: u64,
    /// Preprocess: requests held because no inference endpoint exists.
    pub held: u64,
    /// Preprocess: requests forwarded to inference pods and not answered yet.
    pub forwarded: u64,
    /// Requests received since the worker started.
    pub requests_total: u64,
    /// Requests completed per second over the worker's summary window.
    pub throughput_rps: f64,
    /// Requests completed in that window (what `throughput_rps` is measured on).
    pub completed_in_window: u64,
}

/// Fewest completed requests in a pod's window for its throughput to count as its capacity: a
/// pod that has just come back from idle reports one request per second for its first answer.
const CAPACITY_MIN_SAMPLES: u64 = 20;

/// Least backlog, in seconds of the pod's own pace (`queue_depth / throughput_rps`), for the
/// pod to count as saturated. A dynamic batcher holds a request or two for its delay window at
/// any load, and a pod that keeps up completes what it is offered: its throughput is then the
/// arrival rate, not what it could do.
const SATURATED_BACKLOG_S: f64 = 0.25;

/// How long a learned capacity is trusted without a new saturated observation (a new model,
/// other pods on the node, a long idle time).
const CAPACITY_TTL: Duration = Duration::from_secs(300);

impl PodLoad {
    /// This inference pod's throughput, when it measures what the pod can do: it is clearly
    /// behind (see [`SATURATED_BACKLOG_S`]) and has completed enough requests to measure.
    fn capacity(&self) -> Option<f64> {
        let behind = self.queue_depth as f64 >= SATURATED_BACKLOG_S * self.throughput_rps;
        (self.throughput_rps > 0.0
            && self.queue_depth > 1
            && behind
            && self.completed_in_window >= CAPACITY_MIN_SAMPLES)
            .then_some(self.throughput_rps)
    }
}

impl PodLoad {
    /// Requests in this pod's own hands: for preprocess, admitted minus what waits on the
    /// inference stage (forwarded or held); for inference, queued plus executing.
    pub fn own(&self, stage: Stage) -> u64 {
        match stage {
            Stage::Preprocess => self
                .in_flight
                .saturating_sub(self.forwarded.saturating_add(self.held))
                .max(self.queue_depth),
            Stage::Inference => self.queue_depth.saturating_add(self.in_flight),
        }
    }
}

/// One pod's answer in a polling round.
#[derive(Clone, Debug, PartialEq)]
pub struct PodPoll {
    /// Pod name.
    pub name: String,
    /// Stage of the pod.
    pub stage: Stage,
    /// The pod is being deleted: a draining preprocess pod still holds and forwards what it
    /// accepted, which is demand for inference (an inference stage at zero must come up for
    /// it), but it is no preprocess capacity or demand any more, and its silence is expected.
    pub draining: bool,
    /// The answer, or `None` when the pod did not answer in time.
    pub load: Option<PodLoad>,
}

/// What a pipeline remembers between rounds.
#[derive(Clone, Debug, Default)]
pub struct PipelineMemory {
    /// Last good answer per pod, with its time.
    last_good: HashMap<String, (Instant, PodLoad)>,
    /// Requests per second one inference pod completed the last time it was saturated, and
    /// when ([`PodLoad::capacity`]); forgotten after [`CAPACITY_TTL`].
    capacity_rps: Option<(Instant, f64)>,
    /// Preprocess arrivals per second, smoothed over rounds (one round sees few arrivals).
    arrival_rps: Option<f64>,
    /// Preprocess stage decision memory.
    pub preprocess: StageMemory,
    /// Inference stage decision memory.
    pub inference: StageMemory,
}

/// Both stages' demand from one round, plus the queue depths status reports.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Observed {
    /// Demand on the preprocess stage.
    pub preprocess: Demand,
    /// Demand on the inference stage (feed-forward included).
    pub inference: Demand,
    /// Requests in the preprocess stage's own hands (status `queueDepth`).
    pub preprocess_queue: u64,
    /// Requests queued or executing in the inference stage, both colors (status `queueDepth`).
    pub inference_queue: u64,
    /// Preprocess arrivals per second (0 before two rounds).
    pub arrival_rps: f64,
}

/// Folds one round of polls into demand. Pods missing from `polls` are forgotten; a pod that
/// failed to answer uses its last good answer if it is younger than `grace`, and is counted
/// as unknown otherwise.
pub fn observe(
    polls: &[PodPoll],
    memory: &mut PipelineMemory,
    now: Instant,
    grace: Duration,
) -> Observed {
    memory
        .last_good
        .retain(|name, _| polls.iter().any(|p| &p.name == name));

    let mut out = Observed::default();
    let (mut pre_own, mut held, mut inf_own) = (0u64, 0u64, 0u64);
    // Work still inside draining preprocess pods, on its way to inference.
    let mut drained = 0u64;
    let (mut pre_unknown, mut inf_unknown) = (0u32, 0u32);
    let mut arrivals = 0.0;
    let mut measured = false;
    let mut saturated: Vec<f64> = Vec::new();
    for poll in polls {
        let previous = memory.last_good.get(&poll.name).copied();
        let load = match (poll.load, previous) {
            (Some(load), _) => {
                if poll.stage == Stage::Preprocess
                    && let Some((t, prev)) = previous
                {
                    let dt = now.saturating_duration_since(t).as_secs_f64();
                    if dt > 0.0 {
                        measured = true;
                        // A restarted pod's counter goes back: count nothing for it this round.
                        let delta = load.requests_total.saturating_sub(prev.requests_total);
                        arrivals += delta as f64 / dt;
                    }
                }
                if poll.stage == Stage::Inference
                    && let Some(capacity) = load.capacity()
                {
                    saturated.push(capacity);
                }
                memory.last_good.insert(poll.name.clone(), (now, load));
                Some(load)
            }
            // A draining pod that stops answering has exited: nothing of it is left to count.
            (None, Some((t, last)))
                if !poll.draining && now.saturating_duration_since(t) <= grace =>
            {
                Some(last)
            }
            (None, _) => None,
        };
        match (poll.stage, load) {
            (Stage::Preprocess, Some(l)) if poll.draining => {
                held = held.saturating_add(l.held);
                drained = drained.saturating_add(l.own(Stage::Preprocess));
            }
            (_, None) if poll.draining => {}
            (Stage::Preprocess, Some(l)) => {
                pre_own = pre_own.saturating_add(l.own(Stage::Preprocess));
                held = held.saturating_add(l.held);
            }
            (Stage::Inference, Some(l)) => {
                inf_own = inf_own.saturating_add(l.own(Stage::Inference))
            }
            (Stage::Preprocess, None) => pre_unknown += 1,
            (Stage::Inference, None) => inf_unknown += 1,
        }
    }
    let arrived = arrivals > 0.0;
    if measured {
        // Exponential smoothing, half weight to the newest round; a trickle that has stopped
        // snaps to zero rather than halving forever (it would hold one pod up for good).
        let smoothed = memory
            .arrival_rps
            .map_or(arrivals, |prev| 0.5 * prev + 0.5 * arrivals);
        memory.arrival_rps = Some(if !arrived && smoothed < MIN_ARRIVAL_RPS {
            0.0
        } else {
            smoothed
        });
    }
    let arrivals = memory.arrival_rps.unwrap_or(0.0);
    if !saturated.is_empty() {
        memory.capacity_rps = Some((now, saturated.iter().sum::<f64>() / saturated.len() as f64));
    }
    if memory
        .capacity_rps
        .is_some_and(|(t, _)| now.saturating_duration_since(t) > CAPACITY_TTL)
    {
        memory.capacity_rps = None;
    }
    let rate_floor = match memory.capacity_rps {
        Some((_, c)) if c > 0.0 && arrivals > 0.0 => {
            let pods = (arrivals / c).ceil();
            if pods >= f64::from(i32::MAX) {
                i32::MAX
            } else {
                pods as i32
            }
        }
        _ => 0,
    };

    let fed = pre_own.saturating_add(held).saturating_add(drained);
    out.preprocess = Demand {
        queued: pre_own as f64,
        fed_forward: 0.0,
        rate_floor: 0,
        held: 0,
        arrived,
        unknown_pods: pre_unknown,
    };
    out.inference = Demand {
        queued: inf_own.saturating_add(fed) as f64,
        fed_forward: fed as f64,
        rate_floor,
        held,
        arrived,
        // Unknown preprocess pods hide feed-forward work: unknown for inference too.
        unknown_pods: inf_unknown.saturating_add(pre_unknown),
    };
    out.preprocess_queue = pre_own;
    out.inference_queue = inf_own;
    out.arrival_rps = arrivals;
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pre(name: &str, load: Option<PodLoad>) -> PodPoll {
        PodPoll {
            name: name.into(),
            stage: Stage::Preprocess,
            draining: false,
            load,
        }
    }

    fn inf(name: &str, load: Option<PodLoad>) -> PodPoll {
        PodPoll {
            name: name.into(),
            stage: Stage::Inference,
            draining: false,
            load,
        }
    }

    /// A preprocess pod removed by a scale-down drains what it accepted. Requests it holds for
    /// an inference stage at zero are demand for inference until they are served (before, the
    /// draining pod was no longer polled, inference went back to zero after the idle window
    /// and the held requests timed out); its own queue no longer asks for preprocess pods, and
    /// once it stops answering (it exited) nothing of it is counted, not even its last answer.
    #[test]
    fn a_draining_preprocess_pod_keeps_inference_demand_but_not_preprocess_demand() {
        let draining = |load| PodPoll {
            draining: true,
            ..pre("old", load)
        };
        let holding = PodLoad {
            queue_depth: 2,
            in_flight: 5,
            held: 3,
            ..PodLoad::default()
        };
        let mut memory = PipelineMemory::default();
        let now = Instant::now();
        let polls = [pre("p1", Some(PodLoad::default())), draining(Some(holding))];
        let out = observe(&polls, &mut memory, now, Duration::from_secs(10));
        assert_eq!(out.inference.held, 3);
        // Held 3 plus the 2 requests still being preprocessed, all bound for inference.
        assert_eq!(out.inference.queued, 5.0);
        assert_eq!(out.preprocess.queued, 0.0);
        assert_eq!(out.preprocess_queue, 0);

        // It exited: no answer, no stale last answer, and not an unknown pod either.
        let later = now + Duration::from_secs(1);
        let polls = [pre("p1", Some(PodLoad::default())), draining(None)];
        let out = observe(&polls, &mut memory, later, Duration::from_secs(10));
        assert_eq!(out.inference.held, 0);
        assert_eq!(out.inference.queued, 0.0);
        assert_eq!(out.inference.unknown_pods, 0);
        assert_eq!(out.preprocess.unknown_pods, 0);
    }

    #[test]
    fn preprocess_work_excludes_what_waits_on_inference() {
        let l = PodLoad {
            queue_depth: 3,
            in_flight: 20,
            forwarded: 12,
            held: 2,
            ..PodLoad::default()
        };
        assert_eq!(l.own(Stage::Preprocess), 6);
        let odd = PodLoad {
            queue_depth: 5,
            in_flight: 1,
            ..PodLoad::default()
        };
        assert_eq!(
            odd.own(Stage::Preprocess),
            5,
            "a racy snapshot never reads below its queue"
        );
    }

    #[test]
    fn inference_demand_adds_the_preprocess_backlog_and_held_requests() {
        let polls = [
            pre(
                "p1",
                Some(PodLoad {
                    queue_depth: 10,
                    in_flight: 30,
                    forwarded: 18,
                    held: 2,
                    ..PodLoad::default()
                }),
            ),
            inf(
                "i1",
                Some(PodLoad {
                    queue_depth: 7,
                    in_flight: 4,
                    ..PodLoad::default()
                }),
            ),
        ];
        let o = observe(
            &polls,
            &mut PipelineMemory::default(),
            Instant::now(),
            Duration::from_secs(5),
        );
        assert_eq!(o.preprocess.queued, 10.0);
        assert_eq!(o.preprocess_queue, 10);
        assert_eq!(o.inference_queue, 11);
        assert_eq!(o.inference.queued, 11.0 + 10.0 + 2.0);
        assert_eq!(o.inference.fed_forward, 12.0);
        assert_eq!(o.inference.held, 2);
    }

    #[test]
    fn a_silent_pod_stands_in_with_its_last_answer_then_counts_as_unknown() {
        let mut m = PipelineMemory::default();
        let t0 = Instant::now();
        let grace = Duration::from_secs(5);
        let busy = Some(PodLoad {
            queue_depth: 40,
            ..PodLoad::default()
        });
        observe(&[inf("i1", busy)], &mut m, t0, grace);
        let o = observe(
            &[inf("i1", None)],
            &mut m,
            t0 + Duration::from_secs(3),
            grace,
        );
        assert_eq!(
            (o.inference.queued, o.inference.unknown_pods),
            (40.0, 0),
            "within grace"
        );
        let o = observe(
            &[inf("i1", None)],
            &mut m,
            t0 + Duration::from_secs(6),
            grace,
        );
        assert_eq!(
            (o.inference.queued, o.inference.unknown_pods),
            (0.0, 1),
            "past grace: unknown, not idle"
        );
    }

    #[test]
    fn a_pod_never_heard_from_is_unknown_at_once() {
        let o = observe(
            &[pre("p1", None)],
            &mut PipelineMemory::default(),
            Instant::now(),
            Duration::from_secs(5),
        );
        assert_eq!(o.preprocess.unknown_pods, 1);
        assert_eq!(
            o.inference.unknown_pods, 1,
            "its feed-forward work is unknown too"
        );
    }

    #[test]
    fn arrival_rate_over_saturated_capacity_gives_a_pod_floor() {
        let mut m = PipelineMemory::default();
        let t0 = Instant::now();
        let grace = Duration::from_secs(5);
        let p = |total| {
            Some(PodLoad {
                requests_total: total,
                ..PodLoad::default()
            })
        };
        // 40 requests waiting at 40 rps: a second behind.
        let saturated = Some(PodLoad {
            queue_depth: 40,
            throughput_rps: 40.0,
            completed_in_window: 400,
            ..PodLoad::default()
        });
        observe(&[pre("p1", p(0)), inf("i1", saturated)], &mut m, t0, grace);
        // 100 requests in 1 s against 40 rps per pod: 3 pods.
        let o = observe(
            &[pre("p1", p(100)), inf("i1", saturated)],
            &mut m,
            t0 + Duration::from_secs(1),
            grace,
        );
        assert_eq!(o.arrival_rps, 100.0);
        assert_eq!(o.inference.rate_floor, 3);
        // A round without arrivals halves the smoothed rate rather than zeroing it.
        let o = observe(
            &[pre("p1", p(100)), inf("i1", saturated)],
            &mut m,
            t0 + Duration::from_secs(2),
            grace,
        );
        assert_eq!(o.arrival_rps, 50.0);
        assert_eq!(o.inference.rate_floor, 2);
        assert!(!o.inference.arrived);
    }

    /// Seen on the local cluster: 10 requests/s of one sentence each, after 11 minutes idle,
    /// scaled inference 1 → 4 pods (its max) with a queue of 0. A pod back from idle reported
    /// 1 request/s (one completed request over the one-second minimum span) with a request
    /// waiting in its batcher, which counted as "saturated" and set the capacity to 1 rps.
    #[test]
    fn a_pod_that_keeps_up_or_has_barely_started_teaches_no_capacity() {
        let grace = Duration::from_secs(5);
        let p = |total| {
            Some(PodLoad {
                requests_total: total,
                ..PodLoad::default()
            })
        };
        let cases = [
            // Back from idle: one request done, one waiting for the batch window.
            PodLoad {
                queue_depth: 1,
                throughput_rps: 1.0,
                completed_in_window: 1,
                ..PodLoad::default()
            },
            // Keeping up at 10 rps, a request or two in the batcher (0.2 s of backlog).
            PodLoad {
                queue_depth: 2,
                throughput_rps: 10.0,
                completed_in_window: 600,
                ..PodLoad::default()
            },
            // Behind, but after too few requests to measure a rate.
            PodLoad {
                queue_depth: 30,
                throughput_rps: 3.0,
                completed_in_window: 3,
                ..PodLoad::default()
            },
        ];
        for pod in cases {
            let mut m = PipelineMemory::default();
            let t0 = Instant::now();
            observe(&[pre("p1", p(0)), inf("i1", Some(pod))], &mut m, t0, grace);
            let o = observe(
                &[pre("p1", p(10)), inf("i1", Some(pod))],
                &mut m,
                t0 + Duration::from_secs(1),
                grace,
            );
            assert_eq!(o.arrival_rps, 10.0);
            assert_eq!(o.inference.rate_floor, 0, "{pod:?}");
        }
    }

    #[test]
    fn a_learned_capacity_is_forgotten_after_five_minutes_without_saturation() {
        let mut m = PipelineMemory::default();
        let t0 = Instant::now();
        let grace = Duration::from_secs(5);
        let pod = |queue_depth, total| {
            [
                pre(
                    "p1",
                    Some(PodLoad {
                        requests_total: total,
                        ..PodLoad::default()
                    }),
                ),
                inf(
                    "i1",
                    Some(PodLoad {
                        queue_depth,
                        throughput_rps: 20.0,
                        completed_in_window: 1200,
                        ..PodLoad::default()
                    }),
                ),
            ]
        };
        observe(&pod(40, 0), &mut m, t0, grace);
        let o = observe(&pod(0, 50), &mut m, t0 + Duration::from_secs(1), grace);
        assert_eq!(o.inference.rate_floor, 3, "50 rps against 20 per pod");
        let later = t0 + Duration::from_secs(1) + CAPACITY_TTL;
        observe(&pod(0, 50), &mut m, later, grace);
        let o = observe(&pod(0, 100), &mut m, later + Duration::from_secs(2), grace);
        assert_eq!(o.inference.rate_floor, 0, "no capacity left to divide by");
    }

    #[test]
    fn a_stopped_trickle_of_arrivals_decays_to_exactly_zero() {
        let mut m = PipelineMemory::default();
        let t0 = Instant::now();
        let grace = Duration::from_secs(5);
        let p = |total| {
            Some(PodLoad {
                requests_total: total,
                ..PodLoad::default()
            })
        };
        observe(&[pre("p1", p(0))], &mut m, t0, grace);
        let o = observe(
            &[pre("p1", p(4))],
            &mut m,
            t0 + Duration::from_secs(1),
            grace,
        );
        assert!(o.inference.arrived && o.preprocess.arrived);
        let last = (2..12)
            .map(|i| {
                observe(
                    &[pre("p1", p(4))],
                    &mut m,
                    t0 + Duration::from_secs(i),
                    grace,
                )
            })
            .last();
        assert_eq!(last.map(|o| o.arrival_rps), Some(0.0));
    }

    #[test]
    fn a_restarted_pods_counter_does_not_make_negative_arrivals() {
        let mut m = PipelineMemory::default();
        let t0 = Instant::now();
        let grace = Duration::from_secs(5);
        let p = |total| {
            Some(PodLoad {
                requests_total: total,
                ..PodLoad::default()
            })
        };
        observe(&[pre("p1", p(500))], &mut m, t0, grace);
        let o = observe(
            &[pre("p1", p(3))],
            &mut m,
            t0 + Duration::from_secs(1),
            grace,
        );
        assert_eq!(o.arrival_rps, 0.0);
    }

    #[test]
    fn pods_that_left_are_forgotten() {
        let mut m = PipelineMemory::default();
        let t0 = Instant::now();
        let grace = Duration::from_secs(5);
        observe(&[inf("gone", Some(PodLoad::default()))], &mut m, t0, grace);
        observe(&[], &mut m, t0 + Duration::from_secs(1), grace);
        assert!(m.last_good.is_empty());
    }
}
