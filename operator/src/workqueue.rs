//! The reconcile work queue: which pipelines to reconcile, in what order, and when again.
//!
//! Pure state (time is a parameter): the controller's loop feeds it watch triggers and
//! finished reconciles and takes work from it. It replaces kube-rs' `Controller` runner and
//! scheduler for three reasons measured at 1,000 pipelines (docs/benchmarks.md):
//!
//! - **First come, first served.** kube-rs' runner parks the requests that find every slot
//!   busy in a hash set and takes them out in hash order, so under sustained load some
//!   pipelines were never reconciled. Here ready keys wait in a FIFO.
//! - **Small.** A waiting pipeline is its key in a `VecDeque`, not a parked reconcile future in
//!   a hash table sized for the largest burst (kube's runner and scheduler held ~2.3 MB at
//!   the peak of a 1,000-pipeline burst).
//! - **One reconcile per pipeline at a time**, and a trigger that arrives while it runs
//!   schedules exactly one more run after it, as with kube-rs.
//!
//! Each key has at most one timer: a new request replaces a later one and is dropped when an
//! earlier one is pending ("the earliest wins"), so a burst of watch events on one pipeline
//! folds into one reconcile.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::hash::Hash;
use std::time::Instant;

/// Where a key stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Not queued and not running; may have a timer.
    Idle,
    /// In the ready FIFO.
    Ready,
    /// Being reconciled; `again` when it became due meanwhile and must run once more.
    Running { again: bool },
}

#[derive(Debug)]
struct Entry {
    state: State,
    /// When its timer fires; `None` without a timer.
    due: Option<Instant>,
}

/// How a reconcile that ran ended, as far as the queue is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finished {
    /// Run again at this time (or earlier, if something triggers it).
    RequeueAt(Instant),
    /// Run again only when something triggers it.
    AwaitChange,
    /// The object no longer exists: forget the key unless it was triggered meanwhile.
    Gone,
}

/// Pipelines to reconcile: a FIFO of ready keys, one timer per key, and which keys run.
#[derive(Debug)]
pub struct WorkQueue<K> {
    /// Ready keys, oldest first, with the time each became ready.
    ready: VecDeque<(K, Instant)>,
    entries: HashMap<K, Entry>,
    /// Pending timers, soonest first. Holds `(due, key)` for exactly the entries with a `due`.
    timers: BTreeSet<(Instant, K)>,
}

impl<K> Default for WorkQueue<K> {
    fn default() -> Self {
        Self {
            ready: VecDeque::new(),
            entries: HashMap::new(),
            timers: BTreeSet::new(),
        }
    }
}

impl<K: Clone + Eq + Hash + Ord> WorkQueue<K> {
    /// Asks for `key` to be reconciled at `at`. Dropped when the key is already ready or has
    /// an earlier timer; otherwise it replaces the key's timer.
    pub fn schedule(&mut self, key: K, at: Instant) {
        let entry = self.entries.entry(key.clone()).or_insert(Entry {
            state: State::Idle,
            due: None,
        });
        if entry.state == State::Ready || entry.due.is_some_and(|due| due <= at) {
            return;
        }
        if let Some(old) = entry.due.replace(at) {
            self.timers.remove(&(old, key.clone()));
        }
        self.timers.insert((at, key));
    }

    /// Fires the timers due at `now`: an idle key becomes ready, a running one will run again.
    pub fn fire_due(&mut self, now: Instant) {
        while let Some((due, _)) = self.timers.first()
            && *due <= now
        {
            let Some((_, key)) = self.timers.pop_first() else {
                break;
            };
            let Some(entry) = self.entries.get_mut(&key) else {
                continue;
            };
            entry.due = None;
            match entry.state {
                State::Idle => {
                    entry.state = State::Ready;
                    self.ready.push_back((key, now));
                }
                State::Running { .. } => entry.state = State::Running { again: true },
                State::Ready => {}
            }
        }
    }

    /// When the next timer fires.
    pub fn next_due(&self) -> Option<Instant> {
        self.timers.first().map(|(due, _)| *due)
    }

    /// Takes the oldest ready key (and when it became ready) and marks it running.
    pub fn pop(&mut self) -> Option<(K, Instant)> {
        let (key, since) = self.ready.pop_front()?;
        if let Some(entry) = self.entries.get_mut(&key) {
            entry.state = State::Running { again: false };
        }
        Some((key, since))
    }

    /// Records that `key`'s reconcile ended at `now`.
    pub fn finish(&mut self, key: K, how: Finished, now: Instant) {
        let Some(entry) = self.entries.get_mut(&key) else {
            return;
        };
        let again = matches!(entry.state, State::Running { again: true });
        if again {
            entry.state = State::Ready;
            self.ready.push_back((key.clone(), now));
        } else {
            entry.state = State::Idle;
        }
        match how {
            Finished::RequeueAt(at) => self.schedule(key, at),
            Finished::AwaitChange => {}
            Finished::Gone if again => {}
            Finished::Gone => {
                if let Some(Entry { due: Some(due), .. }) = self.entries.remove(&key) {
                    self.timers.remove(&(due, key));
                }
            }
        }
    }

    /// Keys waiting in the FIFO.
    pub fn ready_len(&self) -> usize {
        self.ready.len()
    }

    /// Keys known to the queue (ready, running, or waiting for a timer or a change).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the queue knows no key.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn at(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    fn drain(q: &mut WorkQueue<&'static str>) -> Vec<&'static str> {
        std::iter::from_fn(|| q.pop().map(|(k, _)| k)).collect()
    }

    #[test]
    fn keys_become_ready_in_the_order_their_timers_fire_and_are_taken_first_come_first_served() {
        let t0 = Instant::now();
        let mut q = WorkQueue::default();
        q.schedule("c", at(t0, 30));
        q.schedule("a", at(t0, 10));
        q.schedule("b", at(t0, 20));
        q.fire_due(at(t0, 15));
        assert_eq!(q.ready_len(), 1);
        q.fire_due(at(t0, 40));
        assert_eq!(drain(&mut q), ["a", "b", "c"]);
        assert_eq!(q.next_due(), None);
    }

    #[test]
    fn nothing_is_ready_before_its_timer_and_next_due_says_when() {
        let t0 = Instant::now();
        let mut q = WorkQueue::default();
        q.schedule("a", at(t0, 500));
        q.fire_due(at(t0, 499));
        assert_eq!(q.pop(), None);
        assert_eq!(q.next_due(), Some(at(t0, 500)));
        q.fire_due(at(t0, 500));
        assert_eq!(q.pop(), Some(("a", at(t0, 500))));
    }

    #[test]
    fn a_burst_of_triggers_on_one_key_folds_into_one_run_at_the_earliest_time() {
        let t0 = Instant::now();
        let mut q = WorkQueue::default();
        q.schedule("a", at(t0, 500));
        q.schedule("a", at(t0, 700));
        q.schedule("a", at(t0, 900));
        assert_eq!(q.next_due(), Some(at(t0, 500)));
        // An earlier request replaces the later timer instead of adding one.
        q.schedule("a", at(t0, 100));
        assert_eq!(q.next_due(), Some(at(t0, 100)));
        q.fire_due(at(t0, 1_000));
        assert_eq!(drain(&mut q), ["a"]);
        assert_eq!(q.next_due(), None);
    }

    #[test]
    fn a_ready_key_is_not_queued_twice() {
        let t0 = Instant::now();
        let mut q = WorkQueue::default();
        q.schedule("a", at(t0, 0));
        q.fire_due(at(t0, 0));
        q.schedule("a", at(t0, 0));
        q.fire_due(at(t0, 10));
        assert_eq!(drain(&mut q), ["a"]);
    }

    #[test]
    fn a_key_triggered_while_running_runs_once_more_after_it_and_never_twice_at_once() {
        let t0 = Instant::now();
        let mut q = WorkQueue::default();
        q.schedule("a", at(t0, 0));
        q.fire_due(at(t0, 0));
        assert_eq!(q.pop().map(|(k, _)| k), Some("a"));
        // Two triggers fire while it runs: not ready while running...
        q.schedule("a", at(t0, 5));
        q.fire_due(at(t0, 5));
        q.schedule("a", at(t0, 6));
        q.fire_due(at(t0, 6));
        assert_eq!(q.pop(), None);
        // ...and ready exactly once when it ends. Its requeue is dropped: the run it is ready
        // for will schedule its own.
        q.finish("a", Finished::RequeueAt(at(t0, 60_000)), at(t0, 8));
        assert_eq!(q.pop(), Some(("a", at(t0, 8))));
        assert_eq!(q.pop(), None);
        assert_eq!(q.next_due(), None);
        q.finish("a", Finished::RequeueAt(at(t0, 60_008)), at(t0, 9));
        assert_eq!(q.next_due(), Some(at(t0, 60_008)));
    }

    #[test]
    fn a_finished_reconcile_requeues_at_its_time_and_a_trigger_before_then_runs_it_earlier() {
        let t0 = Instant::now();
        let mut q = WorkQueue::default();
        q.schedule("a", at(t0, 0));
        q.fire_due(at(t0, 0));
        let _ = q.pop();
        q.finish("a", Finished::RequeueAt(at(t0, 60_000)), at(t0, 10));
        assert_eq!(q.next_due(), Some(at(t0, 60_000)));
        q.schedule("a", at(t0, 510));
        assert_eq!(q.next_due(), Some(at(t0, 510)));
        q.fire_due(at(t0, 510));
        assert_eq!(drain(&mut q), ["a"]);
        // The replaced timer is gone: nothing fires at the requeue time.
        assert_eq!(q.next_due(), None);
    }

    #[test]
    fn await_change_leaves_a_key_idle_until_triggered() {
        let t0 = Instant::now();
        let mut q = WorkQueue::default();
        q.schedule("a", at(t0, 0));
        q.fire_due(at(t0, 0));
        let _ = q.pop();
        q.finish("a", Finished::AwaitChange, at(t0, 1));
        q.fire_due(at(t0, 1_000_000));
        assert_eq!(q.pop(), None);
        assert_eq!(q.len(), 1);
        q.schedule("a", at(t0, 1_000_001));
        q.fire_due(at(t0, 1_000_001));
        assert_eq!(drain(&mut q), ["a"]);
    }

    #[test]
    fn a_gone_key_is_forgotten_with_its_timer_unless_triggered_while_running() {
        let t0 = Instant::now();
        let mut q = WorkQueue::default();
        q.schedule("a", at(t0, 0));
        q.schedule("b", at(t0, 0));
        q.fire_due(at(t0, 0));
        let _ = q.pop();
        let _ = q.pop();
        // "a" got a later timer while running, then turned out gone: forgotten, timer too.
        q.schedule("a", at(t0, 5_000));
        q.finish("a", Finished::Gone, at(t0, 1));
        assert_eq!(q.next_due(), None);
        assert_eq!(q.len(), 1);
        // "b" was triggered while running (perhaps re-created): it runs again.
        q.schedule("b", at(t0, 2));
        q.fire_due(at(t0, 2));
        q.finish("b", Finished::Gone, at(t0, 3));
        assert_eq!(drain(&mut q), ["b"]);
        q.finish("b", Finished::Gone, at(t0, 4));
        assert!(q.is_empty());
    }

    #[test]
    fn finishing_an_unknown_key_changes_nothing() {
        let t0 = Instant::now();
        let mut q: WorkQueue<&str> = WorkQueue::default();
        q.finish("x", Finished::RequeueAt(at(t0, 1)), at(t0, 0));
        assert!(q.is_empty());
        assert_eq!(q.next_due(), None);
    }
}
