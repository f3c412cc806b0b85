//! Crash-loop backoff between container restarts: doubles from `initial` up to `max`, and starts
//! over once a container has run cleanly for `reset_after` (the kubelet's rule, with shorter
//! defaults suited to a test cluster).

use std::time::Duration;

/// Backoff state of one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrashLoopBackoff {
    initial: Duration,
    max: Duration,
    reset_after: Duration,
    current: Option<Duration>,
}

impl CrashLoopBackoff {
    /// A fresh backoff.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max: max.max(initial),
            reset_after: max.max(initial) * 2,
            current: None,
        }
    }

    /// The delay before the next start, given how long the last run lasted.
    pub fn next_delay(&mut self, last_run: Duration) -> Duration {
        if last_run >= self.reset_after {
            self.current = None;
        }
        let next = match self.current {
            None => self.initial,
            Some(d) => (d * 2).min(self.max),
        };
        self.current = Some(next);
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_and_are_capped() {
        let mut b = CrashLoopBackoff::new(Duration::from_secs(2), Duration::from_secs(10));
        let d: Vec<u64> = (0..5)
            .map(|_| b.next_delay(Duration::ZERO).as_secs())
            .collect();
        assert_eq!(d, vec![2, 4, 8, 10, 10]);
    }

    #[test]
    fn a_long_clean_run_resets_the_backoff() {
        let mut b = CrashLoopBackoff::new(Duration::from_secs(2), Duration::from_secs(10));
        b.next_delay(Duration::ZERO);
        b.next_delay(Duration::ZERO);
        assert_eq!(
            b.next_delay(Duration::from_secs(20)),
            Duration::from_secs(2)
        );
    }
}
