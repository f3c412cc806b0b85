//! A sliding window of request latencies → the `LatencySummary` and
//! throughput of `WorkerControl.GetStats`. Pure: time is a parameter.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Latencies of requests completed in the last `window`.
#[derive(Debug)]
pub struct LatencyWindow {
    window: Duration,
    capacity: usize,
    samples: VecDeque<(Instant, f64)>,
}

/// Summary of a window.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Summary {
    /// Requests in the window.
    pub count: u64,
    /// Median latency (ms).
    pub p50_ms: f64,
    /// 99th percentile latency (ms).
    pub p99_ms: f64,
    /// Mean latency (ms).
    pub mean_ms: f64,
    /// Completed requests per second over the window.
    pub throughput_rps: f64,
}

impl LatencyWindow {
    /// A window of `window` holding at most `capacity` samples.
    pub fn new(window: Duration, capacity: usize) -> Self {
        Self {
            window,
            capacity: capacity.max(1),
            samples: VecDeque::new(),
        }
    }

    /// Records one completed request.
    pub fn record(&mut self, now: Instant, latency: Duration) {
        if self.samples.len() == self.capacity {
            self.samples.pop_front();
        }
        self.samples.push_back((now, latency.as_secs_f64() * 1e3));
    }

    /// Summarizes the samples younger than the window at `now`.
    pub fn summary(&mut self, now: Instant) -> Summary {
        while self
            .samples
            .front()
            .is_some_and(|(t, _)| now.saturating_duration_since(*t) > self.window)
        {
            self.samples.pop_front();
        }
        if self.samples.is_empty() {
            return Summary::default();
        }
        let mut v: Vec<f64> = self.samples.iter().map(|(_, ms)| *ms).collect();
        v.sort_by(f64::total_cmp);
        let pct = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
        let span = self
            .samples
            .front()
            .map_or(self.window, |(t, _)| now.saturating_duration_since(*t))
            .max(Duration::from_secs(1));
        Summary {
            count: v.len() as u64,
            p50_ms: pct(0.5),
            p99_ms: pct(0.99),
            mean_ms: v.iter().sum::<f64>() / v.len() as f64,
            throughput_rps: v.len() as f64 / span.min(self.window).as_secs_f64(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_mean_come_from_the_samples_in_the_window() {
        let t0 = Instant::now();
        let mut w = LatencyWindow::new(Duration::from_secs(10), 100);
        for i in 1..=100u64 {
            w.record(t0, Duration::from_millis(i));
        }
        let s = w.summary(t0);
        assert_eq!(s.count, 100);
        assert!((s.p50_ms - 51.0).abs() < 1.01 && (s.p99_ms - 99.0).abs() < 1.01);
        assert!((s.mean_ms - 50.5).abs() < 1e-6);
    }

    #[test]
    fn samples_older_than_the_window_are_forgotten() {
        let t0 = Instant::now();
        let mut w = LatencyWindow::new(Duration::from_secs(10), 100);
        w.record(t0, Duration::from_millis(5));
        assert_eq!(w.summary(t0 + Duration::from_secs(11)).count, 0);
    }
}
