//! The autoscaler's decision for one stage: (demand, current replicas, policy, memory, now) →
//! desired replicas and why. Pure; time is a parameter, so load series are simulated in tests
//! without clocks or sleeps.
//!
//! - `desired = ceil(queued / targetQueueDepth)` within `[min, max]`, where *queued* counts the
//!   requests waiting or being worked on in the stage (plus, for inference, what the preprocess
//!   stage is about to send it: feed-forward).
//! - Scale up at once, by at most [`Policy::max_step_up`] (doubling or +4, whichever is larger).
//! - Scale down only to the highest recommendation seen during the stabilization window, so a
//!   dip shorter than the window changes nothing.
//! - A tolerance band around the current count absorbs small wobbles (no flapping).
//! - When some pods' load is unknown (unreachable past their grace), never scale down: unknown
//!   load is not zero load.
//! - With `min == 0`, the stage goes to zero after an idle window, and back to one as soon as
//!   any preprocess pod holds requests for it.

use std::collections::VecDeque;
use std::fmt;
use std::time::{Duration, Instant};

/// Bounds and knobs for one stage.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Policy {
    /// Fewest pods; 0 allows scale to zero.
    pub min: i32,
    /// Most pods.
    pub max: i32,
    /// Queued requests per pod to aim for (at least 1).
    pub target_queue_depth: u32,
    /// Relative band around the current count inside which nothing changes (0.1 = ±10%).
    pub tolerance: f64,
    /// A lower count is applied only once every recommendation in this window agrees.
    pub scale_down_window: Duration,
    /// With `min == 0`: how long the stage must be idle before it goes to zero.
    pub scale_to_zero_after: Duration,
}

impl Policy {
    /// The most pods one decision may go to from `current`: double, or four more, whichever
    /// is larger (the same shape as the HPA's default scale-up policy, applied every tick).
    pub fn max_step_up(current: i32) -> i32 {
        current.saturating_mul(2).max(current.saturating_add(4))
    }
}

/// What the stage is asked to carry, from one round of polls.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Demand {
    /// Requests queued or being worked on in this stage, feed-forward included.
    pub queued: f64,
    /// Of `queued`, how much was fed forward from the preprocess stage (for messages only).
    pub fed_forward: f64,
    /// A lower bound on pods from the arrival rate and the per-pod capacity seen under load
    /// (feed-forward by throughput); 0 when unknown.
    pub rate_floor: i32,
    /// Requests held by preprocess pods for want of an inference endpoint.
    pub held: u64,
    /// Requests arrived at the pipeline since the last round (work may have come and gone
    /// between two polls without ever showing in a queue).
    pub arrived: bool,
    /// Ready pods whose load is unknown (unreachable for longer than their grace).
    pub unknown_pods: u32,
}

impl Demand {
    fn busy(&self) -> bool {
        self.queued > 0.0 || self.held > 0 || self.unknown_pods > 0 || self.arrived
    }
}

/// What one stage remembers between decisions.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StageMemory {
    /// The recommendations inside the scale-down window that can still be its maximum: oldest
    /// first, each strictly larger than every later one. A recommendation at or below a newer
    /// one is dropped when the newer arrives, since it expires first and can never be the
    /// window's maximum again; so a steady stage keeps one entry instead of one per tick.
    recommendations: VecDeque<(Instant, i32)>,
    /// The last time the stage had any work (or the first time it was seen).
    last_busy: Option<Instant>,
}

impl StageMemory {
    /// Adds a recommendation made at `now`.
    fn recommend(&mut self, now: Instant, recommendation: i32) {
        while self
            .recommendations
            .back()
            .is_some_and(|&(_, older)| older <= recommendation)
        {
            self.recommendations.pop_back();
        }
        self.recommendations.push_back((now, recommendation));
    }

    /// Drops the recommendations older than `window`.
    fn expire(&mut self, now: Instant, window: Duration) {
        while let Some(&(t, _)) = self.recommendations.front() {
            if now.saturating_duration_since(t) > window {
                self.recommendations.pop_front();
            } else {
                break;
            }
        }
    }

    /// The largest recommendation in the window.
    fn stabilized(&self) -> Option<i32> {
        self.recommendations.front().map(|&(_, r)| r)
    }
}

/// The direction of a decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Change {
    /// The desired count stays.
    Steady,
    /// More pods.
    Up,
    /// Fewer pods, at least one.
    Down,
    /// From at least one pod to none.
    ToZero,
    /// From no pods to some.
    FromZero,
}

impl Change {
    /// PascalCase Event reason, `None` for [`Change::Steady`].
    pub fn reason(self) -> Option<&'static str> {
        match self {
            Self::Steady => None,
            Self::Up => Some("ScaledUp"),
            Self::Down => Some("ScaledDown"),
            Self::ToZero => Some("ScaledToZero"),
            Self::FromZero => Some("ScaledFromZero"),
        }
    }

    /// Low-cardinality metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Steady => "steady",
            Self::Up => "up",
            Self::Down => "down",
            Self::ToZero => "to_zero",
            Self::FromZero => "from_zero",
        }
    }
}

/// The outcome of one decision.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// Pods wanted now.
    pub desired: i32,
    /// How `desired` relates to the current count.
    pub change: Change,
    /// Why, in words, e.g. `queue 48 (12 fed forward) > 16 per pod: 1 → 3`.
    pub message: String,
}

/// A bound of `spec.<stage>.replicas` that decided the count rather than the load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Bound {
    /// `replicas.min` is above the current count (it was raised).
    Min(i32),
    /// `replicas.max` is below the current count (it was lowered).
    Max(i32),
}

struct Why<'a> {
    demand: &'a Demand,
    bound: Option<Bound>,
    policy: &'a Policy,
    current: i32,
    desired: i32,
    change: Change,
    idle_for: Duration,
}

impl fmt::Display for Why<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.demand;
        let queue = format!("queue {:.0}", d.queued);
        let ff = if d.fed_forward > 0.0 {
            format!(" ({:.0} fed forward from preprocess)", d.fed_forward)
        } else {
            String::new()
        };
        let target = self.policy.target_queue_depth;
        let (from, to) = (self.current, self.desired);
        if let Some(bound) = self.bound {
            let (change, n) = match bound {
                Bound::Min(min) => ("min raised", min),
                Bound::Max(max) => ("max lowered", max),
            };
            return write!(
                f,
                "replicas.{change} to {n} ({queue}{ff}): {from} → {to} pods"
            );
        }
        match self.change {
            Change::FromZero => write!(
                f,
                "{} requests held by preprocess pods, {queue}{ff}: {from} → {to} pods",
                d.held
            ),
            Change::ToZero => write!(
                f,
                "no requests for {}s: {from} → 0 pods",
                self.idle_for.as_secs()
            ),
            Change::Up
                if d.rate_floor > from && d.queued <= f64::from(from) * f64::from(target) =>
            {
                write!(
                    f,
                    "arrival rate needs {} pods ({queue}{ff}): {from} → {to} pods",
                    d.rate_floor
                )
            }
            Change::Up => write!(f, "{queue}{ff} > {target} per pod: {from} → {to} pods"),
            Change::Down => write!(
                f,
                "{queue}{ff} needed at most {to} pods of {target} for {}s: {from} → {to} pods",
                self.policy.scale_down_window.as_secs()
            ),
            Change::Steady => write!(f, "{queue}{ff}: {from} pods"),
        }
    }
}

/// Decides one stage's desired replicas. `current` is the count desired so far (what status
/// says); `memory` carries the stabilization window and the idle clock between calls.
pub fn decide(
    demand: &Demand,
    current: i32,
    policy: &Policy,
    memory: &mut StageMemory,
    now: Instant,
) -> Decision {
    let target = f64::from(policy.target_queue_depth.max(1));
    let max = policy.max.max(policy.min).max(0);
    let current = current.max(0);

    // The idle clock starts at first sight, so a new pipeline never drops to zero at once.
    let busy = demand.busy();
    if busy || memory.last_busy.is_none() {
        memory.last_busy = Some(now);
    }
    let idle_for = memory
        .last_busy
        .map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
    // Zero is allowed after the idle window, and a stage already at zero stays there until
    // work shows up.
    let may_be_zero =
        policy.min == 0 && !busy && (idle_for >= policy.scale_to_zero_after || current == 0);
    let floor = if may_be_zero { 0 } else { policy.min.max(1) };
    if memory.recommendations.is_empty() {
        // First sight (or an operator restart): the current count counts as recommended now,
        // so the scale-down window applies from here rather than being skipped.
        memory.recommend(now, current.min(max));
    }

    let ratio = demand.queued.max(0.0) / target;
    let mut raw = ceil_i32(ratio).max(demand.rate_floor);
    if demand.held > 0 {
        raw = raw.max(1);
    }
    // Inside the tolerance band the current count stands (small wobbles are noise).
    if current > 0
        && raw != current
        && (ratio / f64::from(current) - 1.0).abs() <= policy.tolerance
        && demand.rate_floor <= current
    {
        raw = current;
    }
    let recommendation = raw.clamp(floor, max);

    memory.recommend(now, recommendation);
    memory.expire(now, policy.scale_down_window);
    let stabilized = memory.stabilized().unwrap_or(recommendation);

    let mut desired = if recommendation > current {
        // The step limit paces growth the load asks for; a raised `min` applies at once, as
        // the reconciler clamps the Deployment into `[min, max]` anyway.
        recommendation
            .min(Policy::max_step_up(current))
            .max(floor.min(max))
    } else if may_be_zero && recommendation == 0 {
        // The idle window already proved the quiet: no second wait.
        0
    } else if stabilized < current {
        stabilized
    } else {
        current
    };
    if demand.unknown_pods > 0 {
        desired = desired.max(current);
    }
    // A lowered `max` applies at once.
    desired = desired.min(max);
    // Say so when a bound of the spec, not the load, moved the count: the load-based message
    // would claim a queue that is not there, or a window that was not waited.
    let bound = if current < floor && desired == floor && raw < floor {
        Some(Bound::Min(floor))
    } else if current > max && desired == max {
        Some(Bound::Max(max))
    } else {
        None
    };
    let change = match (current, desired) {
        (c, d) if d == c => Change::Steady,
        (0, _) => Change::FromZero,
        (_, 0) => Change::ToZero,
        (c, d) if d > c => Change::Up,
        _ => Change::Down,
    };
    if change != Change::Steady {
        // A new count starts a new window: older recommendations describe the old count.
        memory.recommendations.clear();
        memory.recommend(now, desired);
    }
    let message = Why {
        demand,
        bound,
        policy,
        current,
        desired,
        change,
        idle_for,
    }
    .to_string();
    Decision {
        desired,
        change,
        message,
    }
}

fn ceil_i32(x: f64) -> i32 {
    if !x.is_finite() || x <= 0.0 {
        return 0;
    }
    let c = x.ceil();
    if c >= f64::from(i32::MAX) {
        i32::MAX
    } else {
        c as i32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            min: 1,
            max: 10,
            target_queue_depth: 10,
            tolerance: 0.1,
            scale_down_window: Duration::from_secs(30),
            scale_to_zero_after: Duration::from_secs(60),
        }
    }

    fn queued(q: f64) -> Demand {
        Demand {
            queued: q,
            ..Demand::default()
        }
    }

    /// One decision from a fresh memory.
    fn decide_once(d: &Demand, current: i32, p: &Policy) -> Decision {
        decide(d, current, p, &mut StageMemory::default(), Instant::now())
    }

    /// Runs a load series, one decision per second, feeding each decision back as the next
    /// `current`. Returns the desired count after every tick.
    fn run(
        policy: &Policy,
        start: i32,
        series: impl IntoIterator<Item = Demand>,
    ) -> (Vec<i32>, Vec<Decision>) {
        let t0 = Instant::now();
        let mut memory = StageMemory::default();
        let mut current = start;
        let mut counts = Vec::new();
        let mut decisions = Vec::new();
        for (i, d) in series.into_iter().enumerate() {
            let now = t0 + Duration::from_secs(i as u64);
            let decision = decide(&d, current, policy, &mut memory, now);
            current = decision.desired;
            counts.push(current);
            decisions.push(decision);
        }
        (counts, decisions)
    }

    fn changes(decisions: &[Decision]) -> usize {
        decisions
            .iter()
            .filter(|d| d.change != Change::Steady)
            .count()
    }

    #[test]
    fn the_window_keeps_only_possible_maxima_and_agrees_with_the_max_of_every_entry() {
        let t0 = Instant::now();
        let window = Duration::from_secs(30);
        let mut memory = StageMemory::default();
        let mut every: Vec<(Instant, i32)> = Vec::new();
        let mut x: u32 = 12345;
        for i in 0..2_000u64 {
            // A deterministic jumble of recommendations, one per second.
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            let r = i32::try_from((x >> 16) % 12).unwrap_or(0);
            let now = t0 + Duration::from_secs(i);
            memory.recommend(now, r);
            memory.expire(now, window);
            every.push((now, r));
            let naive = every
                .iter()
                .filter(|&&(t, _)| now.saturating_duration_since(t) <= window)
                .map(|&(_, r)| r)
                .max();
            assert_eq!(memory.stabilized(), naive, "tick {i}");
        }
        // A steady stage: one entry, however long it runs.
        let mut steady = StageMemory::default();
        for i in 0..500u64 {
            let now = t0 + Duration::from_secs(i);
            steady.recommend(now, 3);
            steady.expire(now, window);
        }
        assert_eq!(steady.recommendations.len(), 1);
    }

    #[test]
    fn a_load_step_scales_up_on_the_first_tick_to_ceil_of_queue_over_target() {
        let (counts, decisions) = run(&policy(), 1, [queued(0.0), queued(35.0), queued(35.0)]);
        assert_eq!(counts, [1, 4, 4]);
        assert_eq!(decisions[1].change, Change::Up);
        assert_eq!(decisions[1].change.reason(), Some("ScaledUp"));
        assert!(
            decisions[1].message.contains("queue 35") && decisions[1].message.contains("1 → 4"),
            "{}",
            decisions[1].message
        );
    }

    #[test]
    fn a_huge_step_is_limited_per_tick_and_bounded_by_max() {
        let mut p = policy();
        p.max = 20;
        let (counts, _) = run(&p, 1, std::iter::repeat_n(queued(1000.0), 4));
        // 1 → 5 (+4) → 10 (x2) → 20 (x2, max) → 20.
        assert_eq!(counts, [5, 10, 20, 20]);
    }

    #[test]
    fn a_spike_scales_up_at_once_and_down_only_after_the_window() {
        let p = policy();
        let series = std::iter::once(queued(40.0)).chain(std::iter::repeat_n(queued(0.0), 40));
        let (counts, decisions) = run(&p, 1, series);
        assert_eq!(counts[0], 4, "up on the spike's own tick");
        // The window is 30 s: still 4 pods 30 ticks later, back to 1 right after.
        assert!(counts[1..=30].iter().all(|&c| c == 4), "{counts:?}");
        assert_eq!(counts[31], 1, "{counts:?}");
        assert_eq!(decisions[31].change, Change::Down);
        assert_eq!(changes(&decisions), 2);
    }

    #[test]
    fn a_slow_ramp_grows_step_by_step_without_going_back() {
        let series = (0..60).map(|i| queued(f64::from(i) * 1.5));
        let (counts, _) = run(&policy(), 1, series);
        assert!(counts.windows(2).all(|w| w[1] >= w[0]), "{counts:?}");
        assert_eq!(*counts.last().unwrap_or(&0), 9, "ceil(88.5 / 10)");
    }

    #[test]
    fn oscillating_load_holds_the_peak_instead_of_flapping() {
        // Queue swings between 15 and 45 every 5 s: the stage settles at the peak's 5 pods.
        let series = (0..120).map(|i| queued(if (i / 5) % 2 == 0 { 45.0 } else { 15.0 }));
        let (counts, decisions) = run(&policy(), 1, series);
        assert_eq!(changes(&decisions), 1, "{counts:?}");
        assert!(counts.iter().all(|&c| c == 5), "{counts:?}");
    }

    #[test]
    fn small_wobbles_inside_the_tolerance_change_nothing() {
        // 4 pods × 10 = 40; 43 is within 10%, 44 would round to 5 without the band.
        let series = [41.0, 43.0, 39.0, 42.0].map(queued);
        let (counts, decisions) = run(&policy(), 4, series);
        assert_eq!(counts, [4, 4, 4, 4]);
        assert_eq!(changes(&decisions), 0);
    }

    #[test]
    fn an_idle_stage_with_min_zero_goes_to_zero_after_the_idle_window() {
        let mut p = policy();
        p.min = 0;
        let (counts, decisions) = run(&p, 1, std::iter::repeat_n(queued(0.0), 62));
        assert!(counts[..60].iter().all(|&c| c == 1), "{counts:?}");
        assert_eq!(counts[60], 0);
        assert_eq!(decisions[60].change, Change::ToZero);
        assert_eq!(decisions[60].change.reason(), Some("ScaledToZero"));
        assert!(decisions[60].message.contains("no requests for 60s"));
        assert_eq!(counts[61], 0);
    }

    #[test]
    fn requests_arriving_between_polls_keep_the_stage_from_going_to_zero() {
        let mut p = policy();
        p.min = 0;
        let trickle = Demand {
            arrived: true,
            ..Demand::default()
        };
        let (counts, _) = run(&p, 1, std::iter::repeat_n(trickle, 120));
        assert!(counts.iter().all(|&c| c == 1), "{counts:?}");
    }

    #[test]
    fn an_idle_stage_with_min_one_never_goes_to_zero() {
        let (counts, _) = run(&policy(), 1, std::iter::repeat_n(queued(0.0), 200));
        assert!(counts.iter().all(|&c| c == 1));
    }

    #[test]
    fn a_held_request_brings_a_zero_stage_back_to_one_at_once() {
        let mut p = policy();
        p.min = 0;
        let held = Demand {
            held: 1,
            queued: 1.0,
            fed_forward: 1.0,
            ..Demand::default()
        };
        let (counts, decisions) = run(&p, 0, [queued(0.0), held, held, queued(0.0)]);
        assert_eq!(counts, [0, 1, 1, 1]);
        assert_eq!(decisions[1].change, Change::FromZero);
        assert_eq!(decisions[1].change.reason(), Some("ScaledFromZero"));
        assert!(
            decisions[1].message.contains("1 requests held"),
            "{}",
            decisions[1].message
        );
    }

    #[test]
    fn held_requests_count_even_when_the_queue_reads_empty() {
        let mut p = policy();
        p.min = 0;
        let held = Demand {
            held: 3,
            ..Demand::default()
        };
        let d = decide(&held, 0, &p, &mut StageMemory::default(), Instant::now());
        assert_eq!((d.desired, d.change), (1, Change::FromZero));
    }

    #[test]
    fn unreachable_pods_block_scale_down_and_scale_to_zero() {
        let mut p = policy();
        p.min = 0;
        let unknown = Demand {
            unknown_pods: 1,
            ..Demand::default()
        };
        let (counts, _) = run(&p, 3, std::iter::repeat_n(unknown, 120));
        assert!(counts.iter().all(|&c| c == 3), "{counts:?}");
    }

    #[test]
    fn unreachable_pods_do_not_block_scale_up() {
        let d = Demand {
            queued: 50.0,
            unknown_pods: 1,
            ..Demand::default()
        };
        let out = decide_once(&d, 2, &policy());
        assert_eq!((out.desired, out.change), (5, Change::Up));
    }

    #[test]
    fn the_arrival_rate_floor_scales_up_before_any_queue_builds() {
        let d = Demand {
            queued: 2.0,
            rate_floor: 3,
            ..Demand::default()
        };
        let out = decide_once(&d, 1, &policy());
        assert_eq!((out.desired, out.change), (3, Change::Up));
        assert!(out.message.contains("arrival rate"), "{}", out.message);
    }

    #[test]
    fn fed_forward_work_is_named_in_the_message() {
        let d = Demand {
            queued: 30.0,
            fed_forward: 20.0,
            ..Demand::default()
        };
        let out = decide_once(&d, 1, &policy());
        assert_eq!(out.desired, 3);
        assert!(out.message.contains("20 fed forward"), "{}", out.message);
    }

    #[test]
    fn a_current_count_above_a_lowered_max_is_brought_within_max_at_once() {
        let mut p = policy();
        p.max = 2;
        let (counts, _) = run(&p, 5, std::iter::repeat_n(queued(100.0), 3));
        assert_eq!(
            counts,
            [2, 2, 2],
            "the recommendation itself is clamped to max"
        );
    }

    #[test]
    fn a_raised_min_applies_at_once_and_says_so_instead_of_naming_the_queue() {
        let mut p = policy();
        p.min = 3;
        let (counts, decisions) = run(&p, 1, std::iter::repeat_n(queued(0.0), 3));
        assert_eq!(counts, [3, 3, 3]);
        assert_eq!(decisions[0].change, Change::Up);
        assert_eq!(
            decisions[0].message,
            "replicas.min raised to 3 (queue 0): 1 → 3 pods"
        );

        // Beyond the per-round step limit too: the reconciler sizes the Deployment to min.
        p.min = 12;
        p.max = 20;
        let d = decide_once(&queued(0.0), 1, &p);
        assert_eq!(d.desired, 12);

        // At zero, a raised min is not a held request.
        p.min = 1;
        let d = decide_once(&queued(0.0), 0, &p);
        assert_eq!((d.desired, d.change), (1, Change::FromZero));
        assert_eq!(d.message, "replicas.min raised to 1 (queue 0): 0 → 1 pods");

        // When the load asks for at least as many, the load is the reason.
        p.min = 3;
        let d = decide_once(&queued(50.0), 1, &p);
        assert!(
            d.message.starts_with("queue 50 > 10 per pod"),
            "{}",
            d.message
        );
    }

    #[test]
    fn a_lowered_max_applies_at_once_and_says_so_instead_of_naming_a_window() {
        let mut p = policy();
        p.max = 2;
        let (counts, decisions) = run(&p, 3, std::iter::repeat_n(queued(0.0), 2));
        assert_eq!(counts, [2, 2], "no scale-down window for a lowered max");
        assert_eq!(decisions[0].change, Change::Down);
        assert_eq!(
            decisions[0].message,
            "replicas.max lowered to 2 (queue 0): 3 → 2 pods"
        );
        // Under load, too.
        let d = decide_once(&queued(100.0), 5, &p);
        assert_eq!(
            d.message,
            "replicas.max lowered to 2 (queue 100): 5 → 2 pods"
        );
    }

    #[test]
    fn a_stage_at_zero_without_work_stays_at_zero() {
        let mut p = policy();
        p.min = 0;
        let (counts, decisions) = run(&p, 0, std::iter::repeat_n(queued(0.0), 10));
        assert!(counts.iter().all(|&c| c == 0), "{counts:?}");
        assert_eq!(changes(&decisions), 0);
    }

    #[test]
    fn fresh_memory_after_a_restart_still_waits_the_window_before_scaling_down() {
        let (counts, _) = run(&policy(), 6, std::iter::repeat_n(queued(0.0), 32));
        assert!(counts[..=30].iter().all(|&c| c == 6), "{counts:?}");
        assert_eq!(counts[31], 1);
    }

    #[test]
    fn ceil_handles_nonsense_values() {
        assert_eq!(ceil_i32(f64::NAN), 0);
        assert_eq!(ceil_i32(-3.0), 0);
        assert_eq!(ceil_i32(1e300), i32::MAX);
        assert_eq!(ceil_i32(0.1), 1);
    }
}
