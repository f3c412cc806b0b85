//! The open-loop arrival schedule: request `i` is due at `i / rate` seconds,
//! whatever happened to earlier requests, so a slow server cannot slow the
//! client down and hide its own tail latency (coordinated omission).

use std::time::Duration;

/// Why a schedule cannot be built.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ScheduleError {
    /// Rate not a positive finite number.
    #[error("rate must be a positive number of requests per second, got {0}")]
    Rate(f64),
}

/// A fixed-rate schedule bounded in time and count.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    rate: f64,
    count: u64,
}

impl Schedule {
    /// `rate` requests per second for at most `duration` and at most
    /// `max_requests` requests, whichever bound comes first.
    pub fn new(rate: f64, duration: Duration, max_requests: u64) -> Result<Self, ScheduleError> {
        if !(rate.is_finite() && rate > 0.0) {
            return Err(ScheduleError::Rate(rate));
        }
        let by_time = (rate * duration.as_secs_f64()).floor() as u64;
        Ok(Self {
            rate,
            count: by_time.min(max_requests),
        })
    }

    /// Number of requests the schedule sends.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Offset of request `i` from the start.
    pub fn due(&self, i: u64) -> Duration {
        Duration::from_secs_f64(i as f64 / self.rate)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_evenly_spaced_at_the_rate() {
        let s = Schedule::new(4.0, Duration::from_secs(10), 1000).unwrap();
        assert_eq!(s.due(0), Duration::ZERO);
        assert_eq!(s.due(1), Duration::from_millis(250));
        assert_eq!(s.due(8), Duration::from_secs(2));
    }

    #[test]
    fn the_count_stops_at_whichever_bound_comes_first() {
        assert_eq!(
            Schedule::new(100.0, Duration::from_secs(3), 1000)
                .unwrap()
                .count(),
            300
        );
        assert_eq!(
            Schedule::new(100.0, Duration::from_secs(30), 1000)
                .unwrap()
                .count(),
            1000
        );
    }

    #[test]
    fn a_zero_or_negative_rate_is_refused() {
        assert!(Schedule::new(0.0, Duration::from_secs(1), 1).is_err());
        assert!(Schedule::new(-1.0, Duration::from_secs(1), 1).is_err());
        assert!(Schedule::new(f64::NAN, Duration::from_secs(1), 1).is_err());
    }
}
