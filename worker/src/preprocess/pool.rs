//! A bounded pool of CPU threads for decode/resize/tokenize.
//!
//! Jobs travel over a bounded channel with a reply oneshot and the caller's
//! tracing span, so async handlers never block the tokio runtime and CPU work
//! never exceeds the configured number of threads. The admission semaphore in
//! front of it (see `service`) is what bounds the queue in practice; the
//! channel bound is a second line of defence.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

type Job = Box<dyn FnOnce() + Send + 'static>;

/// Errors submitting work.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PoolError {
    /// The channel is full.
    #[error("CPU queue is full")]
    Full,
    /// The pool has shut down or the job panicked.
    #[error("CPU pool stopped")]
    Stopped,
}

/// Handed to a running job: whether its caller has gone away, so that a job of several items
/// can stop between them rather than finish work nobody will read.
pub struct Abandoned<'a>(&'a dyn Fn() -> bool);

impl Abandoned<'_> {
    /// Whether the caller dropped its future (its client went away).
    pub fn now(&self) -> bool {
        (self.0)()
    }
}

/// Fixed-size thread pool fed by a bounded channel.
#[derive(Debug, Clone)]
pub struct CpuPool {
    tx: mpsc::SyncSender<Job>,
    queued: Arc<AtomicUsize>,
    threads: usize,
}

impl CpuPool {
    /// Starts `threads` workers (0 = one per available core) with room for
    /// `capacity` queued jobs.
    pub fn new(threads: usize, capacity: usize) -> Self {
        let threads = if threads == 0 {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        } else {
            threads
        };
        let (tx, rx) = mpsc::sync_channel::<Job>(capacity.max(1));
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads {
            let rx = Arc::clone(&rx);
            let spawned = std::thread::Builder::new()
                .name(format!("tandem-cpu-{i}"))
                .spawn(move || {
                    loop {
                        // A poisoned lock means another worker panicked while
                        // holding it, which `recv` cannot do; keep serving.
                        let job = match rx.lock() {
                            Ok(guard) => guard.recv(),
                            Err(poisoned) => poisoned.into_inner().recv(),
                        };
                        match job {
                            Ok(job) => job(),
                            Err(_) => return,
                        }
                    }
                });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot spawn CPU worker thread");
            }
        }
        Self {
            tx,
            queued: Arc::new(AtomicUsize::new(0)),
            threads,
        }
    }

    /// Number of worker threads.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Jobs submitted and not yet started.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// Runs `f` on the pool inside `span`; returns its result and how long it
    /// waited in the queue. The wait is a `queue_wait` child span of `span`, closed when a
    /// pool thread takes the job. If the returned future is dropped before a pool thread takes
    /// the job (its client went away), `f` is dropped unrun; once it runs, `f` can ask
    /// [`Abandoned::now`] between steps.
    pub async fn run<T, F>(&self, span: tracing::Span, f: F) -> Result<(T, Duration), PoolError>
    where
        T: Send + 'static,
        F: FnOnce(&Abandoned) -> T + Send + 'static,
    {
        let (reply, rx) = oneshot::channel();
        let queued = Arc::clone(&self.queued);
        let submitted = Instant::now();
        let waiting = tracing::info_span!(parent: &span, "queue_wait");
        queued.fetch_add(1, Ordering::Relaxed);
        let job: Job = Box::new(move || {
            queued.fetch_sub(1, Ordering::Relaxed);
            if reply.is_closed() {
                return;
            }
            drop(waiting);
            let waited = submitted.elapsed();
            let gone = || reply.is_closed();
            let out = span.in_scope(|| f(&Abandoned(&gone)));
            let _ = reply.send((out, waited));
        });
        if let Err(e) = self.tx.try_send(job) {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            return Err(match e {
                mpsc::TrySendError::Full(_) => PoolError::Full,
                mpsc::TrySendError::Disconnected(_) => PoolError::Stopped,
            });
        }
        rx.await.map_err(|_| PoolError::Stopped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn jobs_run_on_pool_threads_and_return_results() {
        let pool = CpuPool::new(2, 8);
        let (name, _) = pool
            .run(tracing::Span::none(), |_| {
                std::thread::current().name().map(str::to_owned)
            })
            .await
            .unwrap();
        assert!(name.unwrap().starts_with("tandem-cpu-"));
        assert_eq!(pool.queued(), 0);
    }

    /// The job [`occupy`] starts.
    type Occupying = tokio::task::JoinHandle<Result<((), Duration), PoolError>>;

    /// Starts a job that holds the pool's (one) thread until the returned sender sends.
    fn occupy(pool: &CpuPool) -> (std::sync::mpsc::Sender<()>, Occupying) {
        let (block_tx, block_rx) = std::sync::mpsc::channel::<()>();
        let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
        let p = pool.clone();
        let job = tokio::spawn(async move {
            p.run(tracing::Span::none(), move |_| {
                let _ = started_tx.send(());
                let _ = block_rx.recv();
            })
            .await
        });
        started_rx.recv().unwrap();
        (block_tx, job)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_queue_is_refused_not_grown() {
        let pool = CpuPool::new(1, 1);
        let (block_tx, first) = occupy(&pool);
        // Polled once here, the second job is in the single queue slot when this returns.
        // (Waiting for `queued() > 0` from another task raced: `run` counts a job before it
        // sends it, so the third job could take the slot first and the test hung.)
        let mut second = Box::pin(pool.run(tracing::Span::none(), |_| ()));
        assert!(futures::poll!(second.as_mut()).is_pending());
        assert_eq!(pool.queued(), 1);
        assert_eq!(
            pool.run(tracing::Span::none(), |_| ()).await.unwrap_err(),
            PoolError::Full
        );
        block_tx.send(()).unwrap();
        first.await.unwrap().unwrap();
        second.await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_running_job_sees_that_its_caller_went_away_and_can_stop_between_steps() {
        let pool = CpuPool::new(1, 4);
        let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
        let (left_tx, left_rx) = std::sync::mpsc::channel::<()>();
        let (seen_tx, seen_rx) = std::sync::mpsc::channel::<(bool, bool)>();
        let mut job = Box::pin(pool.run(tracing::Span::none(), move |gone| {
            let before = gone.now();
            let _ = started_tx.send(());
            let _ = left_rx.recv();
            let _ = seen_tx.send((before, gone.now()));
        }));
        assert!(futures::poll!(job.as_mut()).is_pending());
        started_rx.recv().unwrap();
        drop(job);
        left_tx.send(()).unwrap();
        assert_eq!(seen_rx.recv().unwrap(), (false, true));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_job_whose_caller_went_away_before_it_started_is_dropped_unrun() {
        let pool = CpuPool::new(1, 4);
        let (block_tx, first) = occupy(&pool);
        let ran = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = Arc::clone(&ran);
        let mut abandoned = Box::pin(pool.run(tracing::Span::none(), move |_| {
            flag.store(true, Ordering::SeqCst);
        }));
        assert!(futures::poll!(abandoned.as_mut()).is_pending());
        assert_eq!(pool.queued(), 1);
        drop(abandoned);
        block_tx.send(()).unwrap();
        first.await.unwrap().unwrap();
        // The pool's one thread takes jobs in order: once this one has run, the abandoned
        // job has been taken and dropped.
        pool.run(tracing::Span::none(), |_| ()).await.unwrap();
        assert!(!ran.load(Ordering::SeqCst), "the abandoned job ran");
        assert_eq!(pool.queued(), 0);
    }
}
