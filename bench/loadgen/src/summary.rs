//! Latency summaries: nearest-rank percentiles over every measured request
//! (no histogram bucketing; a run has at most a few hundred thousand samples).

use std::collections::BTreeMap;
use std::time::Duration;

/// The outcome of one scheduled request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// From the time the request was *due* (not sent) to its answer.
    pub latency: Duration,
    /// `None` on success, else a short error class ("UNAVAILABLE", "http 429", "timeout", ...).
    pub error: Option<String>,
}

/// Nearest-rank percentile `p` (0..=100) of sorted samples.
pub fn percentile(sorted: &[Duration], p: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    // The epsilon keeps float noise (0.999 × 1000 = 999.000…1) from moving up a rank.
    let rank = ((p / 100.0) * sorted.len() as f64 - 1e-9).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// A run's summary, printed as one JSON object.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// Requests scheduled.
    pub scheduled: u64,
    /// Successful answers.
    pub ok: u64,
    /// Errors by class.
    pub errors: BTreeMap<String, u64>,
    /// Successful answers per second over the schedule's span plus the drain.
    pub achieved_rps: f64,
    /// Latency percentiles of successful requests, ms: p50, p90, p99, p99.9, max.
    pub latency_ms: [f64; 5],
}

/// Summarizes `outcomes` of a run that lasted `elapsed` (first due time to last answer).
pub fn summarize(outcomes: &[Outcome], elapsed: Duration) -> Summary {
    let mut ok: Vec<Duration> = outcomes
        .iter()
        .filter(|o| o.error.is_none())
        .map(|o| o.latency)
        .collect();
    ok.sort_unstable();
    let mut errors = BTreeMap::new();
    for e in outcomes.iter().filter_map(|o| o.error.as_ref()) {
        *errors.entry(e.clone()).or_insert(0) += 1;
    }
    let ms = |p: f64| percentile(&ok, p).map_or(f64::NAN, |d| d.as_secs_f64() * 1e3);
    Summary {
        scheduled: outcomes.len() as u64,
        ok: ok.len() as u64,
        errors,
        achieved_rps: if elapsed.is_zero() {
            0.0
        } else {
            ok.len() as f64 / elapsed.as_secs_f64()
        },
        latency_ms: [ms(50.0), ms(90.0), ms(99.0), ms(99.9), ms(100.0)],
    }
}

impl Summary {
    /// The summary as JSON (NaN percentiles become `null`).
    pub fn to_json(&self, offered_rps: f64) -> serde_json::Value {
        let num = |v: f64| {
            serde_json::Number::from_f64(v)
                .map_or(serde_json::Value::Null, serde_json::Value::Number)
        };
        let [p50, p90, p99, p999, max] = self.latency_ms;
        serde_json::json!({
            "offered_rps": offered_rps,
            "scheduled": self.scheduled,
            "ok": self.ok,
            "errors": self.errors,
            "achieved_rps": num(self.achieved_rps),
            "p50_ms": num(p50), "p90_ms": num(p90), "p99_ms": num(p99),
            "p999_ms": num(p999), "max_ms": num(max),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let s: Vec<Duration> = (1..=1000).map(ms).collect();
        assert_eq!(percentile(&s, 50.0), Some(ms(500)));
        assert_eq!(percentile(&s, 99.0), Some(ms(990)));
        assert_eq!(percentile(&s, 99.9), Some(ms(999)));
        assert_eq!(percentile(&s, 100.0), Some(ms(1000)));
        assert_eq!(percentile(&s, 0.0), Some(ms(1)));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn errors_are_counted_by_class_and_left_out_of_the_latencies() {
        let outcomes = vec![
            Outcome {
                latency: ms(10),
                error: None,
            },
            Outcome {
                latency: ms(5000),
                error: Some("timeout".into()),
            },
            Outcome {
                latency: ms(20),
                error: None,
            },
            Outcome {
                latency: ms(1),
                error: Some("http 429".into()),
            },
        ];
        let s = summarize(&outcomes, Duration::from_secs(2));
        assert_eq!((s.scheduled, s.ok), (4, 2));
        assert_eq!(s.errors.get("timeout"), Some(&1));
        assert_eq!(s.latency_ms[4], 20.0);
        assert_eq!(s.achieved_rps, 1.0);
    }
}
