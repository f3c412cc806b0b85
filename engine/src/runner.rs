//! The engine thread: owns an [`Engine`], pulls batches from the
//! [`Batcher`](crate::batcher::Batcher) and answers each request through its
//! reply callback. Callers submit from any thread (async handlers included);
//! a full queue is refused at once. Closing stops intake, runs what is queued
//! without waiting for `max_delay`, then ends the thread.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::batch;
use crate::batcher::{Batcher, BatcherConfig, Poll, QueueFull, length_bucket};
use crate::engine::{Engine, EngineError};
use crate::spec::{InputKind, ModelSpec};
use crate::tensor::Tensor;

/// The reply of one request: its outputs in spec order, or the error.
pub type Reply = Box<dyn FnOnce(Result<Vec<Tensor>, EngineError>) + Send>;

/// One request for the engine thread.
pub struct Job {
    /// Inputs in spec order, already validated against the spec, values included
    /// ([`ModelSpec::check_values`]).
    pub inputs: Vec<Tensor>,
    /// Called once with the outputs.
    pub reply: Reply,
    /// The request's tracing span; queue wait, batch assembly and engine
    /// forward spans become its children.
    pub span: tracing::Span,
    /// Set once nobody waits for the answer any more (the client went away): a job
    /// that has not started by then is dropped instead of run.
    pub abandoned: Option<Arc<AtomicBool>>,
}

impl Job {
    fn is_abandoned(&self) -> bool {
        self.abandoned
            .as_ref()
            .is_some_and(|a| a.load(Ordering::Relaxed))
    }
}

struct Queued {
    job: Job,
    _queue_wait: tracing::Span,
}

/// Why a job was not queued; the job comes back.
pub enum SubmitError {
    /// The queue holds `max_queue_depth` requests.
    QueueFull(Job),
    /// The runner is draining or stopped.
    Closed(Job),
}

/// Counters readable while the engine runs.
#[derive(Debug, Default)]
struct Counters {
    in_flight: AtomicU64,
    batches: AtomicU64,
    batched_rows: AtomicU64,
    max_batch: AtomicU64,
    rejected: AtomicU64,
    errors: AtomicU64,
    abandoned: AtomicU64,
}

/// A snapshot of the runner's load.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RunnerStats {
    /// Requests waiting in the batcher.
    pub queue_depth: u64,
    /// Requests in the batch being run.
    pub in_flight: u64,
    /// Batches run.
    pub batches: u64,
    /// Mean rows per batch.
    pub mean_batch_size: f64,
    /// Largest batch run.
    pub max_batch_size: u64,
    /// Requests refused because the queue was full.
    pub rejected: u64,
    /// Requests answered with an engine error.
    pub errors: u64,
    /// Requests dropped unrun because their clients had gone away.
    pub abandoned: u64,
    /// The configured queue bound.
    pub max_queue_depth: u64,
}

struct State {
    batcher: Batcher<Queued>,
    closing: bool,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    counters: Counters,
    spec: ModelSpec,
    /// Most rows the engine is given at once (`max_batch_size`).
    max_rows: usize,
    on_batch: Option<BatchObserver>,
}

/// Called with the row count of every batch the engine runs (for metrics).
pub type BatchObserver = Box<dyn Fn(usize) + Send + Sync>;

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data; keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Handle to a running engine thread (cheap to clone).
#[derive(Clone)]
pub struct Runner {
    shared: Arc<Shared>,
}

impl Runner {
    /// Starts the engine thread.
    pub fn spawn(
        engine: Box<dyn Engine>,
        cfg: BatcherConfig,
    ) -> std::io::Result<(Self, std::thread::JoinHandle<()>)> {
        Self::spawn_observed(engine, cfg, None)
    }

    /// Starts the engine thread, reporting each batch's rows to `on_batch`.
    pub fn spawn_observed(
        engine: Box<dyn Engine>,
        cfg: BatcherConfig,
        on_batch: Option<BatchObserver>,
    ) -> std::io::Result<(Self, std::thread::JoinHandle<()>)> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                batcher: Batcher::new(cfg),
                closing: false,
            }),
            wake: Condvar::new(),
            counters: Counters::default(),
            spec: engine.spec().clone(),
            max_rows: cfg.max_batch_size.max(1),
            on_batch,
        });
        let s = shared.clone();
        let handle = std::thread::Builder::new()
            .name("tandem-engine".into())
            .spawn(move || run_loop(&s, engine))?;
        Ok((Self { shared }, handle))
    }

    /// The served model's signature.
    pub fn spec(&self) -> &ModelSpec {
        &self.shared.spec
    }

    /// Queues a job; refused at once when the queue is full or closing.
    pub fn submit(&self, job: Job) -> Result<(), SubmitError> {
        let rows = job.inputs.first().map_or(0, Tensor::rows);
        let group = match self.shared.spec.kind {
            InputKind::Sequence => length_bucket(
                job.inputs
                    .first()
                    .and_then(|t| t.shape.get(1).copied())
                    .unwrap_or(0),
            ),
            InputKind::Fixed => job.inputs.first().map_or(0, |t| t.dtype() as u64),
        };
        let mut st = self.shared.lock();
        if st.closing {
            return Err(SubmitError::Closed(job));
        }
        let queue_wait = tracing::info_span!(parent: &job.span, "queue_wait");
        match st.batcher.push(
            Queued {
                job,
                _queue_wait: queue_wait,
            },
            rows,
            group,
            Instant::now(),
        ) {
            Ok(()) => {
                drop(st);
                self.shared.wake.notify_one();
                Ok(())
            }
            Err(QueueFull(q)) => {
                self.shared
                    .counters
                    .rejected
                    .fetch_add(1, Ordering::Relaxed);
                Err(SubmitError::QueueFull(q.job))
            }
        }
    }

    /// Stops intake; queued work still runs, then the thread ends.
    pub fn close(&self) {
        self.shared.lock().closing = true;
        self.shared.wake.notify_all();
    }

    /// A snapshot of load and counters.
    pub fn stats(&self) -> RunnerStats {
        let (queue_depth, max_queue_depth) = {
            let st = self.shared.lock();
            (
                st.batcher.len() as u64,
                st.batcher.config().max_queue_depth as u64,
            )
        };
        let c = &self.shared.counters;
        let batches = c.batches.load(Ordering::Relaxed);
        let rows = c.batched_rows.load(Ordering::Relaxed);
        RunnerStats {
            queue_depth,
            in_flight: c.in_flight.load(Ordering::Relaxed),
            batches,
            mean_batch_size: if batches == 0 {
                0.0
            } else {
                rows as f64 / batches as f64
            },
            max_batch_size: c.max_batch.load(Ordering::Relaxed),
            rejected: c.rejected.load(Ordering::Relaxed),
            errors: c.errors.load(Ordering::Relaxed),
            abandoned: c.abandoned.load(Ordering::Relaxed),
            max_queue_depth,
        }
    }
}

fn run_loop(shared: &Shared, mut engine: Box<dyn Engine>) {
    let mut st = shared.lock();
    loop {
        let now = Instant::now();
        // While closing, nothing waits for company any more.
        let horizon = if st.closing {
            now + st.batcher.config().max_delay + Duration::from_secs(1)
        } else {
            now
        };
        match st.batcher.poll(horizon) {
            Poll::Batch(jobs) => {
                shared
                    .counters
                    .in_flight
                    .store(jobs.len() as u64, Ordering::Relaxed);
                drop(st);
                run_batch(shared, engine.as_mut(), jobs);
                shared.counters.in_flight.store(0, Ordering::Relaxed);
                st = shared.lock();
            }
            Poll::WaitUntil(t) => {
                let timeout = t.saturating_duration_since(now);
                st = shared
                    .wake
                    .wait_timeout(st, timeout)
                    .map(|(g, _)| g)
                    .unwrap_or_else(|p| p.into_inner().0);
            }
            Poll::Idle if st.closing => return,
            Poll::Idle => {
                st = shared.wake.wait(st).unwrap_or_else(|p| p.into_inner());
            }
        }
    }
}

fn run_batch(shared: &Shared, engine: &mut dyn Engine, queued: Vec<Queued>) {
    let (gone, jobs): (Vec<Job>, Vec<Job>) = queued
        .into_iter()
        .map(|q| q.job)
        .partition(Job::is_abandoned);
    if !gone.is_empty() {
        count_abandoned(
            shared,
            gone.len(),
            "skipped requests whose clients went away",
        );
    }
    // Their replies are dropped unsent: nobody waits for them.
    drop(gone);
    if !jobs.is_empty() {
        run_jobs(shared, engine, jobs);
    }
}

/// Runs `jobs` as one batch and answers each. Requests are checked one by one before they
/// are queued ([`ModelSpec::check_values`]); should the engine still refuse a batch's input,
/// or panic on it, each request is run again alone, so that only the one at fault fails. A
/// panic is answered as [`EngineError::Panic`]: were it to end this thread, every later
/// request would wait for ever while the worker still reported ready.
fn run_jobs(shared: &Shared, engine: &mut dyn Engine, jobs: Vec<Job>) {
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        forward(shared, engine, &jobs)
    }))
    .unwrap_or_else(|panic| Err(EngineError::Panic(panic_message(panic.as_ref()))));
    match result {
        Ok(Some(per_request)) => {
            for (job, out) in jobs.into_iter().zip(per_request) {
                (job.reply)(Ok(out));
            }
        }
        Ok(None) => count_abandoned(
            shared,
            jobs.len(),
            "stopped a request in chunks whose client went away",
        ),
        Err(EngineError::InvalidInput(e) | EngineError::Panic(e)) if jobs.len() > 1 => {
            tracing::warn!(error = %e, requests = jobs.len(), "the engine refused a batch; running its requests one by one");
            for job in jobs {
                run_jobs(shared, engine, vec![job]);
            }
        }
        Err(e) => {
            shared
                .counters
                .errors
                .fetch_add(jobs.len() as u64, Ordering::Relaxed);
            for job in jobs {
                (job.reply)(Err(e.clone()));
            }
        }
    }
}

/// Counts `requests` dropped unanswered because nobody waits for them any more.
fn count_abandoned(shared: &Shared, requests: usize, what: &'static str) {
    shared
        .counters
        .abandoned
        .fetch_add(requests as u64, Ordering::Relaxed);
    tracing::debug!(requests, "{what}");
}

/// The text a panic was raised with.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic without a message".to_owned())
}

/// Joins `jobs` into one batch, runs it, and splits the outputs back per request; `None` when
/// it was run in chunks and every job's client went away before the last one.
fn forward(
    shared: &Shared,
    engine: &mut dyn Engine,
    jobs: &[Job],
) -> Result<Option<Vec<Vec<Tensor>>>, EngineError> {
    let assembly: Vec<tracing::Span> = jobs
        .iter()
        .map(|j| tracing::info_span!(parent: &j.span, "batch_assembly"))
        .collect();
    let requests: Vec<&[Tensor]> = jobs.iter().map(|j| j.inputs.as_slice()).collect();
    let (inputs, rows) = batch::join(&shared.spec, &requests)?;
    drop(assembly);
    let total: usize = rows.iter().sum();
    let c = &shared.counters;
    c.batches.fetch_add(1, Ordering::Relaxed);
    c.batched_rows.fetch_add(total as u64, Ordering::Relaxed);
    c.max_batch.fetch_max(total as u64, Ordering::Relaxed);
    if let Some(observe) = &shared.on_batch {
        observe(total);
    }
    let forward: Vec<tracing::Span> = jobs
        .iter()
        .map(|j| tracing::info_span!(parent: &j.span, "engine_forward", batch_rows = total))
        .collect();
    let gone = || jobs.iter().all(Job::is_abandoned);
    let out = forward_in_chunks(engine, &inputs, total, shared.max_rows, &gone);
    drop(forward);
    out.map(|o| o.map(|o| batch::split(o, &rows)))
}

/// Runs `inputs` (`total` rows) through the engine at most `max_rows` rows at a time. Only a
/// single request larger than `max_batch_size` is ever split: the engine's working memory
/// grows with the rows it is given (a BERT's attention with rows × length²), so one request
/// of 2,048 rows of 512 tokens would otherwise need 5 GB, where a full batch needs what
/// `max_batch_size` allows. Before each chunk after the first, `gone` is asked whether anyone
/// still waits for the answer: a request of 256 rows of 256 tokens is over a minute of CPU,
/// which a client that gave up (or a preprocess pod whose forward deadline passed) must not
/// keep the engine busy with. `None` when it stopped for that.
fn forward_in_chunks(
    engine: &mut dyn Engine,
    inputs: &[Tensor],
    total: usize,
    max_rows: usize,
    gone: &dyn Fn() -> bool,
) -> Result<Option<Vec<Tensor>>, EngineError> {
    if total <= max_rows {
        return engine.forward(inputs).map(Some);
    }
    let mut outputs: Option<Vec<Tensor>> = None;
    for start in (0..total).step_by(max_rows) {
        if start > 0 && gone() {
            return Ok(None);
        }
        let end = (start + max_rows).min(total);
        let chunk: Vec<Tensor> = inputs.iter().map(|t| t.rows_range(start, end)).collect();
        let out = engine.forward(&chunk)?;
        match outputs.as_mut() {
            None => outputs = Some(out),
            Some(acc) => {
                for (a, o) in acc.iter_mut().zip(out) {
                    a.append_rows(o).map_err(|e| {
                        EngineError::Panic(format!("the outputs of a request's chunks differ: {e}"))
                    })?;
                }
            }
        }
    }
    Ok(Some(outputs.unwrap_or_default()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::TensorSpec;
    use crate::tensor::DataType;
    use std::sync::mpsc;

    /// Doubles its input, refusing a batch with any negative value and panicking on 666;
    /// records batch sizes.
    struct Doubler {
        spec: ModelSpec,
        seen: Arc<Mutex<Vec<usize>>>,
    }

    impl Engine for Doubler {
        fn spec(&self) -> &ModelSpec {
            &self.spec
        }
        fn forward(&mut self, inputs: &[Tensor]) -> Result<Vec<Tensor>, EngineError> {
            let crate::tensor::TensorData::F32(v) = &inputs[0].data else {
                unreachable!()
            };
            self.seen.lock().unwrap().push(inputs[0].rows());
            assert!(!v.contains(&666.0), "the engine cannot take 666");
            if let Some(x) = v.iter().find(|x| **x < 0.0) {
                return Err(EngineError::InvalidInput(format!("negative value {x}")));
            }
            Ok(vec![Tensor::f32(
                inputs[0].shape.clone(),
                v.iter().map(|x| x * 2.0).collect(),
            )])
        }
    }

    fn doubler() -> (Box<dyn Engine>, Arc<Mutex<Vec<usize>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let spec = ModelSpec {
            inputs: vec![TensorSpec::new("x", DataType::Fp32, &[-1, 1])],
            outputs: vec![TensorSpec::new("y", DataType::Fp32, &[-1, 1])],
            kind: InputKind::Fixed,
            also_accepts: vec![],
            value_ranges: vec![],
            max_sequence_len: None,
        };
        (
            Box::new(Doubler {
                spec,
                seen: seen.clone(),
            }),
            seen,
        )
    }

    /// A runner over the [`Doubler`] with batches of at most 8 rows, 16 requests queued.
    fn spawn_doubler(
        max_delay: Duration,
    ) -> (Runner, std::thread::JoinHandle<()>, Arc<Mutex<Vec<usize>>>) {
        let (engine, seen) = doubler();
        let cfg = BatcherConfig {
            max_batch_size: 8,
            max_delay,
            max_queue_depth: 16,
        };
        let (runner, handle) = Runner::spawn(engine, cfg).unwrap();
        (runner, handle, seen)
    }

    /// Submits one single-row job per value to a runner that waits an hour for company,
    /// closes it (so they run at once, as one batch) and returns each job's answer, in
    /// order, with the batch sizes the engine saw.
    fn run_closed(values: &[f32]) -> (Vec<Result<f32, EngineError>>, Vec<usize>, Runner) {
        let (runner, handle, seen) = spawn_doubler(Duration::from_secs(3600));
        let receivers: Vec<_> = values
            .iter()
            .map(|&x| {
                let (tx, rx) = mpsc::channel();
                let job = Job {
                    inputs: vec![Tensor::f32(vec![1, 1], vec![x])],
                    reply: Box::new(move |r| tx.send(r).unwrap()),
                    span: tracing::Span::none(),
                    abandoned: None,
                };
                assert!(runner.submit(job).is_ok());
                rx
            })
            .collect();
        runner.close();
        handle.join().unwrap();
        let got = receivers
            .iter()
            .map(|rx| {
                rx.try_recv().unwrap().map(|out| match &out[0].data {
                    crate::tensor::TensorData::F32(v) => v[0],
                    _ => unreachable!(),
                })
            })
            .collect();
        let seen = seen.lock().unwrap().clone();
        (got, seen, runner)
    }

    #[test]
    fn closing_runs_every_queued_request_before_the_thread_ends() {
        let (got, seen, runner) = run_closed(&[0.0, 1.0, 2.0]);
        assert_eq!(got, vec![Ok(0.0), Ok(2.0), Ok(4.0)]);
        assert_eq!(seen, [3]);
        let late = Job {
            inputs: vec![],
            reply: Box::new(|_| {}),
            span: tracing::Span::none(),
            abandoned: None,
        };
        assert!(matches!(runner.submit(late), Err(SubmitError::Closed(_))));
        assert_eq!(runner.stats().errors, 0);
    }

    #[test]
    fn a_request_larger_than_max_batch_size_reaches_the_engine_in_chunks_and_is_answered_whole() {
        let (runner, handle, seen) = spawn_doubler(Duration::from_millis(1));
        let (tx, rx) = mpsc::channel();
        let values: Vec<f32> = (0..20u8).map(f32::from).collect();
        let job = Job {
            inputs: vec![Tensor::f32(vec![20, 1], values.clone())],
            reply: Box::new(move |r| tx.send(r).unwrap()),
            span: tracing::Span::none(),
            abandoned: None,
        };
        assert!(runner.submit(job).is_ok());
        let out = rx.recv_timeout(Duration::from_secs(10)).unwrap().unwrap();
        runner.close();
        handle.join().unwrap();
        let doubled: Vec<f32> = values.iter().map(|x| x * 2.0).collect();
        assert_eq!(out, vec![Tensor::f32(vec![20, 1], doubled)]);
        assert_eq!(*seen.lock().unwrap(), [8, 8, 4]);
    }

    #[test]
    fn a_request_in_chunks_stops_after_the_chunk_during_which_its_client_went_away() {
        /// Doubles its input; the client leaves while the first chunk runs.
        struct LeavesDuringFirst {
            inner: Box<dyn Engine>,
            gone: Arc<AtomicBool>,
        }
        impl Engine for LeavesDuringFirst {
            fn spec(&self) -> &ModelSpec {
                self.inner.spec()
            }
            fn forward(&mut self, inputs: &[Tensor]) -> Result<Vec<Tensor>, EngineError> {
                self.gone.store(true, Ordering::SeqCst);
                self.inner.forward(inputs)
            }
        }
        let (inner, seen) = doubler();
        let gone = Arc::new(AtomicBool::new(false));
        let engine = Box::new(LeavesDuringFirst {
            inner,
            gone: Arc::clone(&gone),
        });
        let cfg = BatcherConfig {
            max_batch_size: 8,
            max_delay: Duration::from_millis(1),
            max_queue_depth: 16,
        };
        let (runner, handle) = Runner::spawn(engine, cfg).unwrap();
        let (tx, rx) = mpsc::channel();
        let job = Job {
            inputs: vec![Tensor::f32(vec![20, 1], vec![1.0; 20])],
            reply: Box::new(move |r| tx.send(r).unwrap()),
            span: tracing::Span::none(),
            abandoned: Some(gone),
        };
        assert!(runner.submit(job).is_ok());
        runner.close();
        handle.join().unwrap();
        assert_eq!(
            *seen.lock().unwrap(),
            [8],
            "only the first of three chunks ran"
        );
        assert!(rx.try_recv().is_err(), "nobody is answered");
        assert_eq!(runner.stats().abandoned, 1);
        assert_eq!(runner.stats().errors, 0);
    }

    #[test]
    fn a_queued_request_whose_client_went_away_is_not_run() {
        let (runner, handle, seen) = spawn_doubler(Duration::from_secs(3600));
        let gone = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        for (x, abandoned) in [(1.0, Some(Arc::clone(&gone))), (2.0, None)] {
            let tx = tx.clone();
            let job = Job {
                inputs: vec![Tensor::f32(vec![1, 1], vec![x])],
                reply: Box::new(move |r| tx.send((x, r)).unwrap()),
                span: tracing::Span::none(),
                abandoned,
            };
            assert!(runner.submit(job).is_ok());
        }
        drop(tx);
        gone.store(true, Ordering::Relaxed);
        runner.close();
        handle.join().unwrap();
        let answered: Vec<f32> = rx.iter().map(|(x, _)| x).collect();
        assert_eq!(answered, [2.0], "only the request still wanted is answered");
        assert_eq!(*seen.lock().unwrap(), [1], "the engine ran one row");
        assert_eq!(runner.stats().abandoned, 1);
        assert_eq!(runner.stats().errors, 0);
    }

    #[test]
    fn rows_are_cut_and_appended_back_for_every_datatype() {
        let t = Tensor::i64(vec![3, 2], vec![1, 2, 3, 4, 5, 6]);
        let mut head = t.rows_range(0, 2);
        assert_eq!(head, Tensor::i64(vec![2, 2], vec![1, 2, 3, 4]));
        assert_eq!(t.rows_range(2, 9), Tensor::i64(vec![1, 2], vec![5, 6]));
        assert_eq!(t.rows_range(5, 9), Tensor::i64(vec![0, 2], vec![]));
        head.append_rows(t.rows_range(2, 3)).unwrap();
        assert_eq!(head, t);
        let mut u = Tensor::u8(vec![1, 2], vec![1, 2]);
        assert!(
            u.append_rows(Tensor::u8(vec![1, 3], vec![1, 2, 3]))
                .is_err()
        );
        assert!(
            u.append_rows(Tensor::f32(vec![1, 2], vec![1.0, 2.0]))
                .is_err()
        );
        u.append_rows(Tensor::u8(vec![2, 2], vec![3, 4, 5, 6]))
            .unwrap();
        assert_eq!(u, Tensor::u8(vec![3, 2], vec![1, 2, 3, 4, 5, 6]));
    }

    #[test]
    fn a_request_the_engine_refuses_fails_alone_and_the_rest_of_its_batch_is_answered() {
        let (got, seen, runner) = run_closed(&[1.0, -1.0, 2.0]);
        assert_eq!(
            got,
            vec![
                Ok(2.0),
                Err(EngineError::InvalidInput("negative value -1".into())),
                Ok(4.0)
            ]
        );
        // the batch of three, then each request alone
        assert_eq!(seen, [3, 1, 1, 1]);
        assert_eq!(runner.stats().errors, 1);
    }

    #[test]
    fn an_engine_panic_fails_the_request_that_caused_it_and_the_engine_thread_lives_on() {
        // run_closed joins the engine thread, which must not have ended in the panic, and the
        // requests after the panicking batch must be answered.
        let (got, seen, runner) = run_closed(&[1.0, 666.0, 2.0]);
        assert_eq!(
            got,
            vec![
                Ok(2.0),
                Err(EngineError::Panic("the engine cannot take 666".into())),
                Ok(4.0)
            ]
        );
        assert_eq!(seen, [3, 1, 1, 1]);
        assert_eq!(runner.stats().errors, 1);
    }
}
