//! Sliding-window latency and throughput, reported in the `WorkerControl`
//! `LatencySummary` shape. Pure: the caller passes the current time.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use tandem_proto::tandem::v1::LatencySummary;

/// Completed-request latencies over the last `window`, capped at `capacity`
/// samples so memory stays bounded under any load.
#[derive(Debug, Clone)]
pub struct LatencyWindow {
    window: Duration,
    capacity: usize,
    samples: VecDeque<(Instant, f64)>,
    /// Completions evicted by the capacity cap but still inside the window,
    /// so throughput stays right when latencies are sampled away.
    started: Option<Instant>,
}

impl LatencyWindow {
    /// A window of `window` length holding at most `capacity` samples.
    pub fn new(window: Duration, capacity: usize) -> Self {
        Self {
            window,
            capacity: capacity.max(1),
            samples: VecDeque::new(),
            started: None,
        }
    }

    /// Records one completed request.
    pub fn record(&mut self, now: Instant, latency: Duration) {
        self.started.get_or_insert(now);
        self.evict(now);
        if self.samples.len() == self.capacity {
            self.samples.pop_front();
        }
        self.samples.push_back((now, latency.as_secs_f64() * 1e3));
    }

    fn evict(&mut self, now: Instant) {
        while let Some(&(t, _)) = self.samples.front() {
            if now.saturating_duration_since(t) > self.window {
                self.samples.pop_front();
            } else {
                break;
            }
        }
    }

    /// p50/p99/mean over the window.
    pub fn summary(&mut self, now: Instant) -> LatencySummary {
        self.evict(now);
        let mut v: Vec<f64> = self.samples.iter().map(|&(_, ms)| ms).collect();
        if v.is_empty() {
            return LatencySummary::default();
        }
        v.sort_by(f64::total_cmp);
        let pick = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
        LatencySummary {
            count: v.len() as u64,
            p50_ms: pick(0.5),
            p99_ms: pick(0.99),
            mean_ms: v.iter().sum::<f64>() / v.len() as f64,
        }
    }

    /// Completions per second over the window (or since the first sample,
    /// when that is shorter).
    pub fn throughput(&mut self, now: Instant) -> f64 {
        self.evict(now);
        let Some(started) = self.started else {
            return 0.0;
        };
        let span = now.saturating_duration_since(started).min(self.window);
        let secs = span.as_secs_f64().max(1.0);
        self.samples.len() as f64 / secs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_reports_percentiles_of_recent_samples_only() {
        let t0 = Instant::now();
        let mut w = LatencyWindow::new(Duration::from_secs(10), 1000);
        for i in 1..=100 {
            w.record(t0, Duration::from_millis(i));
        }
        let s = w.summary(t0);
        assert_eq!(s.count, 100);
        assert!((s.p50_ms - 50.0).abs() <= 1.0);
        assert!((s.p99_ms - 99.0).abs() <= 1.0);
        let later = t0 + Duration::from_secs(11);
        assert_eq!(w.summary(later).count, 0);
    }

    #[test]
    fn capacity_bounds_the_number_of_samples_kept() {
        let t0 = Instant::now();
        let mut w = LatencyWindow::new(Duration::from_secs(10), 8);
        for _ in 0..100 {
            w.record(t0, Duration::from_millis(1));
        }
        assert_eq!(w.summary(t0).count, 8);
    }

    #[test]
    fn throughput_counts_completions_per_second_in_the_window() {
        let t0 = Instant::now();
        let mut w = LatencyWindow::new(Duration::from_secs(10), 10_000);
        for i in 0..50 {
            w.record(
                t0 + Duration::from_millis(i * 100),
                Duration::from_millis(1),
            );
        }
        let tp = w.throughput(t0 + Duration::from_secs(5));
        assert!((tp - 10.0).abs() < 0.5, "{tp}");
    }
}
