//! The dynamic batcher as a pure state machine: requests are pushed with the
//! time they arrived, and [`Batcher::poll`] is asked, at some `now`, whether a
//! batch is ready or how long to wait. No clocks and no threads inside, so
//! tests simulate arrivals by passing times.
//!
//! Policy:
//! - Requests carry a *group* key; only requests of the same group are joined.
//!   Sequence models use the padded-length bucket ([`length_bucket`]) so a long
//!   sentence is never padded together with short ones; image models use the
//!   input datatype.
//! - A group is dispatched when its queued rows reach `max_batch_size`, or when
//!   its oldest request has waited `max_delay`. Groups are served oldest first.
//! - A batch holds at most `max_batch_size` rows, except that a single request
//!   larger than that is dispatched alone (never refused; the runner gives it to
//!   the engine `max_batch_size` rows at a time).
//! - At most `max_queue_depth` requests wait; beyond that `push` refuses
//!   (the server answers `RESOURCE_EXHAUSTED`).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Batching limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatcherConfig {
    /// Most rows in one batch.
    pub max_batch_size: usize,
    /// Longest time the oldest request of a group waits for company.
    pub max_delay: Duration,
    /// Most requests waiting (not counting the batch being run).
    pub max_queue_depth: usize,
}

/// A request refused by [`Batcher::push`], handed back to the caller.
#[derive(Debug, PartialEq, Eq)]
pub struct QueueFull<T>(pub T);

struct Pending<T> {
    item: T,
    rows: usize,
    group: u64,
    arrived: Instant,
}

/// What the batcher wants at `now`.
#[derive(Debug, PartialEq, Eq)]
pub enum Poll<T> {
    /// Run these requests as one batch (FIFO order within the group).
    Batch(Vec<T>),
    /// Nothing is ready; poll again at this instant (or on the next push).
    WaitUntil(Instant),
    /// The queue is empty.
    Idle,
}

/// Queue + batching policy.
pub struct Batcher<T> {
    cfg: BatcherConfig,
    queue: VecDeque<Pending<T>>,
}

/// Group key for a sequence of length `len`: the next power of two, at least
/// 16. Batches then pad at most to twice the shortest member's bucket.
pub fn length_bucket(len: usize) -> u64 {
    len.max(16).next_power_of_two() as u64
}

impl<T> Batcher<T> {
    /// An empty batcher. `max_batch_size` and `max_queue_depth` are at least 1.
    pub fn new(cfg: BatcherConfig) -> Self {
        let cfg = BatcherConfig {
            max_batch_size: cfg.max_batch_size.max(1),
            max_queue_depth: cfg.max_queue_depth.max(1),
            ..cfg
        };
        Self {
            cfg,
            queue: VecDeque::new(),
        }
    }

    /// The limits in force.
    pub fn config(&self) -> BatcherConfig {
        self.cfg
    }

    /// Requests waiting.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Queues a request of `rows` rows in `group`, arrived at `now`.
    pub fn push(
        &mut self,
        item: T,
        rows: usize,
        group: u64,
        now: Instant,
    ) -> Result<(), QueueFull<T>> {
        if self.queue.len() >= self.cfg.max_queue_depth {
            return Err(QueueFull(item));
        }
        self.queue.push_back(Pending {
            item,
            rows,
            group,
            arrived: now,
        });
        Ok(())
    }

    /// Takes the next ready batch, or says when one will be ready.
    pub fn poll(&mut self, now: Instant) -> Poll<T> {
        let Some(first) = self.queue.front() else {
            return Poll::Idle;
        };
        let mut earliest_deadline = first.arrived + self.cfg.max_delay;
        // Groups in order of their oldest request.
        let mut seen: Vec<u64> = Vec::new();
        for p in &self.queue {
            if seen.contains(&p.group) {
                continue;
            }
            seen.push(p.group);
            let deadline = p.arrived + self.cfg.max_delay;
            earliest_deadline = earliest_deadline.min(deadline);
            let queued: usize = self
                .queue
                .iter()
                .filter(|q| q.group == p.group)
                .map(|q| q.rows)
                .sum();
            if now >= deadline || queued >= self.cfg.max_batch_size {
                return Poll::Batch(self.take_group(p.group));
            }
        }
        Poll::WaitUntil(earliest_deadline)
    }

    /// Removes every waiting request (for shutdown without a model).
    pub fn drain(&mut self) -> Vec<T> {
        self.queue.drain(..).map(|p| p.item).collect()
    }

    fn take_group(&mut self, group: u64) -> Vec<T> {
        let mut rows = 0;
        let mut taken = Vec::new();
        let mut kept = VecDeque::with_capacity(self.queue.len());
        let mut full = false;
        for p in self.queue.drain(..) {
            if p.group != group || full {
                kept.push_back(p);
                continue;
            }
            if !taken.is_empty() && rows + p.rows > self.cfg.max_batch_size {
                // Keep FIFO: once one request does not fit, later ones wait too.
                full = true;
                kept.push_back(p);
                continue;
            }
            rows += p.rows;
            taken.push(p.item);
            full = rows >= self.cfg.max_batch_size;
        }
        self.queue = kept;
        taken
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(max_batch_size: usize, delay_ms: u64, depth: usize) -> BatcherConfig {
        BatcherConfig {
            max_batch_size,
            max_delay: Duration::from_millis(delay_ms),
            max_queue_depth: depth,
        }
    }

    fn ms(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    #[test]
    fn an_empty_batcher_is_idle() {
        let mut b: Batcher<u32> = Batcher::new(cfg(4, 2, 8));
        assert_eq!(b.poll(Instant::now()), Poll::Idle);
    }

    #[test]
    fn a_lone_request_waits_until_max_delay_then_runs_alone() {
        let t0 = Instant::now();
        let mut b = Batcher::new(cfg(4, 2, 8));
        b.push(1, 1, 0, t0).unwrap();
        assert_eq!(b.poll(ms(t0, 1)), Poll::WaitUntil(ms(t0, 2)));
        assert_eq!(b.poll(ms(t0, 2)), Poll::Batch(vec![1]));
        assert_eq!(b.poll(ms(t0, 3)), Poll::Idle);
    }

    #[test]
    fn a_full_batch_is_dispatched_at_once_without_waiting() {
        let t0 = Instant::now();
        let mut b = Batcher::new(cfg(3, 100, 8));
        for i in 0..4 {
            b.push(i, 1, 0, t0).unwrap();
        }
        assert_eq!(b.poll(t0), Poll::Batch(vec![0, 1, 2]));
        // The fourth waits for its own deadline.
        assert_eq!(b.poll(t0), Poll::WaitUntil(ms(t0, 100)));
    }

    #[test]
    fn rows_not_requests_count_toward_the_batch_size() {
        let t0 = Instant::now();
        let mut b = Batcher::new(cfg(8, 5, 8));
        b.push("a", 5, 0, t0).unwrap();
        b.push("b", 5, 0, ms(t0, 1)).unwrap();
        // 10 rows queued >= 8: dispatch now, but "b" does not fit beside "a".
        assert_eq!(b.poll(ms(t0, 1)), Poll::Batch(vec!["a"]));
        assert_eq!(b.poll(ms(t0, 1)), Poll::WaitUntil(ms(t0, 6)));
    }

    #[test]
    fn a_request_larger_than_max_batch_size_runs_alone() {
        let t0 = Instant::now();
        let mut b = Batcher::new(cfg(4, 5, 8));
        b.push("big", 10, 0, t0).unwrap();
        b.push("small", 1, 0, t0).unwrap();
        assert_eq!(b.poll(t0), Poll::Batch(vec!["big"]));
    }

    #[test]
    fn the_queue_refuses_requests_beyond_max_queue_depth() {
        let t0 = Instant::now();
        let mut b = Batcher::new(cfg(64, 5, 2));
        b.push(1, 1, 0, t0).unwrap();
        b.push(2, 1, 0, t0).unwrap();
        assert_eq!(b.push(3, 1, 0, t0), Err(QueueFull(3)));
        assert_eq!(b.len(), 2);
    }

    #[test]
    fn long_sequences_are_not_batched_with_short_ones() {
        let t0 = Instant::now();
        let mut b = Batcher::new(cfg(64, 2, 16));
        b.push("short1", 1, length_bucket(9), t0).unwrap();
        b.push("long", 1, length_bucket(200), t0).unwrap();
        b.push("short2", 1, length_bucket(12), ms(t0, 1)).unwrap();
        assert_eq!(b.poll(ms(t0, 2)), Poll::Batch(vec!["short1", "short2"]));
        assert_eq!(b.poll(ms(t0, 2)), Poll::Batch(vec!["long"]));
    }

    #[test]
    fn a_full_younger_group_does_not_wait_behind_an_older_partial_one() {
        let t0 = Instant::now();
        let mut b = Batcher::new(cfg(2, 50, 16));
        b.push("old", 1, 1, t0).unwrap();
        b.push("x", 1, 2, ms(t0, 1)).unwrap();
        b.push("y", 1, 2, ms(t0, 2)).unwrap();
        assert_eq!(b.poll(ms(t0, 2)), Poll::Batch(vec!["x", "y"]));
        assert_eq!(b.poll(ms(t0, 2)), Poll::WaitUntil(ms(t0, 50)));
    }

    #[test]
    fn simulated_steady_arrivals_form_full_batches_with_bounded_wait() {
        // One request every 0.5 ms, max batch 4, max delay 10 ms: every batch
        // fills (4 rows) long before the deadline, and nobody waits > 2 ms.
        let t0 = Instant::now();
        let mut b = Batcher::new(cfg(4, 10, 64));
        let mut arrivals = Vec::new();
        let mut batches = Vec::new();
        for i in 0..40u64 {
            let now = t0 + Duration::from_micros(500 * i);
            b.push(i, 1, 0, now).unwrap();
            arrivals.push(now);
            while let Poll::Batch(batch) = b.poll(now) {
                for id in &batch {
                    assert!(now - arrivals[*id as usize] <= Duration::from_millis(2));
                }
                batches.push(batch);
            }
        }
        assert_eq!(batches.len(), 10);
        assert!(batches.iter().all(|x| x.len() == 4));
    }

    #[test]
    fn length_buckets_round_up_to_powers_of_two_from_sixteen() {
        assert_eq!(length_bucket(1), 16);
        assert_eq!(length_bucket(16), 16);
        assert_eq!(length_bucket(17), 32);
        assert_eq!(length_bucket(128), 128);
        assert_eq!(length_bucket(129), 256);
    }
}
