//! The worker pool: pulls tasks of the steps it serves, runs their handlers
//! with at most `concurrency` at once, and reports each outcome on the log.
//!
//! A handler's result says what happens next ([`TaskError`]); `settle`
//! is the one place that maps it to JetStream: ack, NAK with a delay, or
//! TERM. Completions go through the reporter (`report.rs`), which stores
//! those ready at the same moment in one event before acking their tasks.
//! Long handlers get in-progress acks on a timer so the ack deadline only
//! fires for a worker that died or hung.

mod batch;
mod exec;
mod report;
mod results;

pub use exec::{exec_batch_handler, exec_handler, sleep_handler, EXIT_GIVE_UP};
pub use results::{Results, ResultsError};

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::AckKind;
use futures::{FutureExt, StreamExt};
use serde_json::Value;
use thiserror::Error;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::nats::connect;
use crate::nats::heartbeat::{beat, process_id};
use crate::nats::log::{self, LogError};
use crate::nats::{objects, SetupError, WorkerNats};
use crate::protocol::{
    bounded, Event, Heartbeat, ResultRef, SubjobCompleted, SubjobFailed, Task, CELLS,
    INLINE_RESULT_MAX, MAX_ERROR_BYTES, MAX_RESULT_BYTES, RESULTS_BUCKET,
};

/// Why a handler did not produce a result, and what should happen next.
#[derive(Debug, Clone, Error, PartialEq)]
pub enum TaskError {
    /// Try again later: after `after`, or the step's backoff when `None`.
    #[error("{message}")]
    Retry {
        message: String,
        after: Option<Duration>,
    },
    /// Do not try again: the subjob fails now.
    #[error("{message}")]
    GiveUp { message: String },
}

impl TaskError {
    pub fn retry(message: impl Into<String>) -> Self {
        TaskError::Retry {
            message: message.into(),
            after: None,
        }
    }
    pub fn give_up(message: impl Into<String>) -> Self {
        TaskError::GiveUp {
            message: message.into(),
        }
    }
}

/// One task as a handler sees it.
#[derive(Debug, Clone)]
pub struct TaskContext {
    pub task: Task,
    /// Delivery attempt, from 1.
    pub attempt: u32,
    /// The worker's connection, for [`TaskContext::results`].
    client: Option<async_nats::Client>,
}

impl TaskContext {
    /// A task as a handler sees it, without a connection (for tests of
    /// handlers: [`TaskContext::results`] then says so).
    pub fn new(task: Task, attempt: u32) -> Self {
        TaskContext {
            task,
            attempt,
            client: None,
        }
    }

    /// The results of step `step` of this task's job, each subjob's once
    /// (for the step after a fanout: `self.task.step_index - 1`), read page
    /// by page through the manager's results service.
    pub fn results(&self, step: usize) -> Results {
        Results::new(self.client.clone(), &self.task, step)
    }

    /// Stores items (a JSON array, or JSON lines, as `format` says) read
    /// from `reader` as an object, and gives the reference to return as
    /// this step's result: a fanout after it reads them a buffer at a time,
    /// so a step may hand on millions of items (a result returned whole is
    /// at most 64 MiB, and is built in memory).
    pub async fn put_items<R: tokio::io::AsyncRead + Unpin>(
        &self,
        reader: R,
        format: crate::protocol::ItemsFormat,
    ) -> Result<Value, TaskError> {
        let Some(client) = &self.client else {
            return Err(TaskError::give_up(
                "this task context has no connection (a handler test): items cannot be stored",
            ));
        };
        let js = async_nats::jetstream::new(client.clone());
        objects::put_items(&js, RESULTS_BUCKET, reader, format)
            .await
            .map(|r| r.to_value())
            .map_err(|e| TaskError::retry(e.to_string()))
    }
}

/// A batch as a handler sees it (a fanout step with `batch_size` > 1):
/// the subjobs `indices` with their `items`, in the same order. The first
/// call has the task's subjobs; an item retried after a retryable error
/// comes alone.
#[derive(Debug, Clone)]
pub struct BatchContext {
    pub task: Task,
    /// Handler calls these items were part of, from 1.
    pub attempt: u32,
    pub indices: Vec<u64>,
    pub items: Vec<Value>,
    client: Option<async_nats::Client>,
}

impl BatchContext {
    /// A batch as a handler sees it, without a connection (for tests of
    /// handlers).
    pub fn new(task: Task, attempt: u32) -> Self {
        BatchContext {
            indices: task.indices.clone(),
            items: task.items.clone(),
            task,
            attempt,
            client: None,
        }
    }

    /// The results of step `step` of this batch's job (as
    /// [`TaskContext::results`]).
    pub fn results(&self, step: usize) -> Results {
        Results::new(self.client.clone(), &self.task, step)
    }
}

/// What a batch handler gives: one result per item, in the items' order,
/// or an error of the whole call (every item's).
pub type BatchResults = Result<Vec<Result<Value, TaskError>>, TaskError>;
pub type BatchFuture = Pin<Box<dyn Future<Output = BatchResults> + Send>>;
/// A batch handler.
pub type BatchHandler = Arc<dyn Fn(BatchContext) -> BatchFuture + Send + Sync>;

/// What serves one step: a handler of one subjob, of a batch, or both.
/// Either serves every task: a batch goes to a handler of one subjob item
/// by item, and a single subjob to a batch handler as a batch of one.
#[derive(Clone, Default)]
pub(crate) struct StepHandler {
    one: Option<Handler>,
    batch: Option<BatchHandler>,
}

pub type HandlerFuture = Pin<Box<dyn Future<Output = Result<Value, TaskError>> + Send>>;
/// How long a busy pull loop waits to gather free slots before pulling.
const GATHER: Duration = Duration::from_millis(2);

/// How long an idle pull loop's request waits for a task.
const IDLE_WAIT: Duration = Duration::from_secs(2);
/// How long after its expiry a pull request is surely over: no task
/// comes to it any more.
const PULL_EXPIRED_AFTER: Duration = Duration::from_millis(500);
/// How long a busy loop waits for the answer to a fetch that does not
/// wait (the server answers at once) before it lets its slots go.
const FETCH_WAIT: Duration = Duration::from_secs(2);

/// A step's handler.
pub type Handler = Arc<dyn Fn(TaskContext) -> HandlerFuture + Send + Sync>;

#[derive(Debug, Error)]
pub enum WorkerError {
    #[error(transparent)]
    Setup(#[from] SetupError),
    #[error("NATS: {0}")]
    Nats(String),
    #[error("a worker needs at least one step to serve")]
    NoSteps,
}

/// Builds and runs a worker pool.
pub struct Worker {
    nats: WorkerNats,
    concurrency: usize,
    grace: Duration,
    handlers: Vec<(String, String, StepHandler)>,
}

impl Worker {
    /// A worker on `nats`: a [`WorkerNats`] (what a worker user may bind),
    /// or a full [`Nats`](crate::nats::Nats) handle.
    pub fn new(nats: impl Into<WorkerNats>) -> Self {
        Worker {
            nats: nats.into(),
            concurrency: 16,
            grace: Duration::from_secs(30),
            handlers: Vec::new(),
        }
    }

    /// Most tasks running at once, over all steps served.
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// How long in-flight tasks may finish after shutdown begins.
    pub fn grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// Serves `workflow`'s step `step` with `handler`.
    pub fn handler<F, Fut>(self, workflow: &str, step: &str, handler: F) -> Self
    where
        F: Fn(TaskContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Value, TaskError>> + Send + 'static,
    {
        let h: Handler = Arc::new(move |ctx| Box::pin(handler(ctx)));
        self.boxed_handler(workflow, step, h)
    }

    /// Serves with an already boxed handler.
    pub fn boxed_handler(mut self, workflow: &str, step: &str, handler: Handler) -> Self {
        self.step_handler(workflow, step).one = Some(handler);
        self
    }

    /// Serves `workflow`'s step `step` with a handler of batches (a fanout
    /// with `batch_size`): it gets a batch's items together and gives a
    /// result per item. A task of one subjob comes as a batch of one.
    pub fn batch_handler<F, Fut>(self, workflow: &str, step: &str, handler: F) -> Self
    where
        F: Fn(BatchContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = BatchResults> + Send + 'static,
    {
        let h: BatchHandler = Arc::new(move |ctx| Box::pin(handler(ctx)));
        self.boxed_batch_handler(workflow, step, h)
    }

    /// Serves with an already boxed batch handler.
    pub fn boxed_batch_handler(
        mut self,
        workflow: &str,
        step: &str,
        handler: BatchHandler,
    ) -> Self {
        self.step_handler(workflow, step).batch = Some(handler);
        self
    }

    fn step_handler(&mut self, workflow: &str, step: &str) -> &mut StepHandler {
        let at = match self
            .handlers
            .iter()
            .position(|(w, s, _)| w == workflow && s == step)
        {
            Some(i) => i,
            None => {
                self.handlers
                    .push((workflow.into(), step.into(), StepHandler::default()));
                self.handlers.len() - 1
            }
        };
        &mut self.handlers[at].2
    }

    /// Pulls and runs tasks until `cancel`, then lets in-flight tasks finish
    /// within the grace period. Unfinished tasks are redelivered elsewhere.
    pub async fn run(self, cancel: CancellationToken) -> Result<(), WorkerError> {
        if self.handlers.is_empty() {
            return Err(WorkerError::NoSteps);
        }
        let slots = Arc::new(Semaphore::new(self.concurrency));
        // Tasks being handled.
        let active = Arc::new(AtomicU64::new(0));
        let mut loops = JoinSet::new();
        {
            let (busy, total, id) = (
                active.clone(),
                self.concurrency as u64,
                process_id("worker"),
            );
            let nats = self.nats.clone();
            let c = cancel.clone();
            let steps: Vec<String> = self
                .handlers
                .iter()
                .map(|(w, s, _)| format!("{w}.{s}"))
                .collect();
            loops.spawn(async move {
                beat(nats.client, nats.user, c, move || Heartbeat {
                    role: "worker".into(),
                    id: id.clone(),
                    slots: total,
                    busy: busy.load(Ordering::Relaxed),
                    steps: steps.clone(),
                    ..Default::default()
                })
                .await;
                Ok(())
            });
        }
        let running: Arc<tokio::sync::Mutex<JoinSet<()>>> =
            Arc::new(tokio::sync::Mutex::new(JoinSet::new()));
        let (reporter, reporting) =
            report::Reporter::start(Arc::new(self.nats.clone()), self.concurrency);
        // Each step binds on its own, so a step whose workflow is not applied
        // yet does not hold up the others.
        for (workflow, step, handler) in self.handlers {
            let (nats, slots, running, cancel, active, reporter) = (
                self.nats.clone(),
                slots.clone(),
                running.clone(),
                cancel.clone(),
                active.clone(),
                reporter.clone(),
            );
            let max_batch = self.concurrency;
            loops.spawn(async move {
                // One loop per cell's work queue, sharing the slots; each
                // binds its cell's consumer on its own, so a cell whose
                // work queue elects a leader holds up none of the others.
                let nats = Arc::new(nats);
                let step_cancel = cancel.child_token();
                let mut cells = JoinSet::new();
                for cell in 0..CELLS {
                    let (nats, workflow, step) = (nats.clone(), workflow.clone(), step.clone());
                    let (handler, slots, running, active, reporter) = (
                        handler.clone(),
                        slots.clone(),
                        running.clone(),
                        active.clone(),
                        reporter.clone(),
                    );
                    let cancel = step_cancel.clone();
                    cells.spawn(async move {
                        let consumer = tokio::select! {
                            _ = cancel.cancelled() => return Ok(()),
                            c = bind(&nats, cell, &workflow, &step) => c?,
                        };
                        if cell == 0 {
                            info!(workflow, step, concurrency = max_batch, "worker serving");
                        }
                        PullLoop {
                            nats,
                            consumer,
                            handler,
                            slots,
                            max_batch,
                            running,
                            active,
                            reporter,
                        }
                        .run(cancel)
                        .await
                    });
                }
                let mut result = Ok(());
                while let Some(r) = cells.join_next().await {
                    if let Ok(Err(e)) = r {
                        // One loop failed: the step's others stop too,
                        // and the error is the step's.
                        step_cancel.cancel();
                        result = Err(e);
                    }
                }
                result
            });
        }
        while let Some(r) = loops.join_next().await {
            if let Ok(Err(e)) = r {
                warn!(error = %e, "pull loop ended");
            }
        }
        let mut running = running.lock().await;
        while running.try_join_next().is_some() {}
        if !running.is_empty() {
            info!(in_flight = running.len(), grace = ?self.grace, "waiting for in-flight tasks");
        }
        let drained = tokio::time::timeout(self.grace, async {
            while running.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            warn!(
                left = running.len(),
                "grace period over; unfinished tasks will be redelivered"
            );
            running.shutdown().await;
        }
        // What was handed to the reporter is reported before the worker ends.
        drop(reporter);
        let _ = reporting.await;
        Ok(())
    }
}

/// Finds the step's consumer in one cell's work queue, creating it from the
/// stored workflow; waits (saying so) until the workflow has been applied.
async fn bind(
    nats: &WorkerNats,
    cell: u32,
    workflow: &str,
    step: &str,
) -> Result<PullConsumer, WorkerError> {
    let mut said = false;
    loop {
        // The consumer exists once the workflow was applied; binding to it
        // needs no right to create anything.
        if let Ok(c) = nats.step_consumer(cell, workflow, step).await {
            return Ok(c);
        }
        if let Some(wf) = nats.workflow(workflow).await? {
            match wf.steps.iter().find(|s| s.name == step) {
                Some(s) => match nats.ensure_cell_step_consumer(cell, workflow, s).await {
                    Ok(c) => return Ok(c),
                    Err(e) if !said => {
                        warn!(workflow, step, error = %e, "cannot create the step's consumer; waiting for the workflow to be applied")
                    }
                    Err(_) => {}
                },
                None if !said => warn!(
                    workflow,
                    step, "workflow has no such step; waiting for a definition that has it"
                ),
                None => {}
            }
        } else if !said {
            warn!(
                workflow,
                "workflow not applied yet; waiting (run `fanjet workflow apply FILE`)"
            );
        }
        said = true;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

struct PullLoop {
    /// Shared by the loop's tasks: cloning the handle copies the workflow
    /// bucket's configuration, too much to do per task.
    nats: Arc<WorkerNats>,
    consumer: PullConsumer,
    handler: StepHandler,
    slots: Arc<Semaphore>,
    max_batch: usize,
    running: Arc<tokio::sync::Mutex<JoinSet<()>>>,
    /// Tasks being handled, for the heartbeat.
    active: Arc<AtomicU64>,
    reporter: report::Reporter,
}

/// Counts a task as being handled while it lives (also when its handler
/// panics).
struct Active(Arc<AtomicU64>);

impl Active {
    fn start(n: &Arc<AtomicU64>) -> Self {
        n.fetch_add(1, Ordering::Relaxed);
        Active(n.clone())
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl PullLoop {
    async fn run(self, cancel: CancellationToken) -> Result<(), WorkerError> {
        // An idle loop waits for one task holding no slot: a worker pulls
        // from every step's consumer in every cell, more loops than it may
        // have slots, and idle ones must not keep the slots a busy one
        // could use.
        let mut idle = true;
        let mut backoff = PullBackoff::default();
        loop {
            if idle {
                // A task that came as the worker stops is handed back below.
                let msg = match self.wait_for_one(&cancel).await {
                    Pulled::Task(msg) => *msg,
                    _ if cancel.is_cancelled() => return Ok(()),
                    Pulled::Nothing => {
                        backoff.reset();
                        continue;
                    }
                    Pulled::Failed => {
                        backoff.wait(&cancel).await;
                        continue;
                    }
                };
                backoff.reset();
                // A slot for it, telling the server meanwhile that it is
                // taken (all slots may be busy for a while).
                let permit = tokio::select! {
                    _ = cancel.cancelled() => {
                        // Not started: back to the queue for another worker.
                        let _ = msg.ack_with(AckKind::Nak(None)).await;
                        return Ok(());
                    }
                    p = crate::nats::keep_taken(&msg, Duration::from_secs(1), self.slots.clone().acquire_owned()) => {
                        p.map_err(|e| WorkerError::Nats(e.to_string()))?
                    }
                };
                self.start(msg, permit, self.nats.max_payload()).await;
                idle = false;
                continue;
            }
            let first = tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                p = self.slots.clone().acquire_owned() => p.map_err(|e| WorkerError::Nats(e.to_string()))?,
            };
            let mut permits: Vec<OwnedSemaphorePermit> = vec![first];
            let want = self.max_batch;
            // A busy step waits a moment for a quarter of its slots to free
            // up, so each pull round trip brings several tasks, not one.
            let enough = (want / 4).max(1);
            let gather_until = tokio::time::Instant::now() + GATHER;
            while permits.len() < want {
                match self.slots.clone().try_acquire_owned() {
                    Ok(p) => permits.push(p),
                    Err(_) if permits.len() >= enough => break,
                    Err(_) => tokio::select! {
                        p = self.slots.clone().acquire_owned() => match p {
                            Ok(p) => permits.push(p),
                            Err(_) => break,
                        },
                        _ = tokio::time::sleep_until(gather_until) => break,
                    },
                }
            }
            // Busy: take what is there now, without waiting.
            let batch = self
                .consumer
                .fetch()
                .max_messages(permits.len())
                .messages()
                .await;
            let mut batch = match batch {
                Ok(b) => b,
                Err(e) => {
                    pull_failed(&e, &cancel).await;
                    continue;
                }
            };
            let mut got = 0;
            let mut failed = false;
            let max_payload = self.nats.max_payload();
            // A pull whose answer never comes (its consumer's leader died or
            // moved) must not hold the loop, nor the slots it took, which
            // another cell's tasks could use: a fetch that does not wait is
            // answered at once by a live leader.
            let give_up_at = tokio::time::Instant::now() + FETCH_WAIT;
            loop {
                let next = tokio::select! {
                    _ = cancel.cancelled() => return Ok(()),
                    _ = tokio::time::sleep_until(give_up_at) => {
                        debug!("pull request unanswered; pulling again");
                        break;
                    }
                    n = batch.next() => n,
                };
                let msg = match next {
                    None => break,
                    Some(Ok(m)) => m,
                    Some(Err(e)) => {
                        debug!(error = %e, "pull batch ended");
                        failed = got == 0;
                        break;
                    }
                };
                let Some(permit) = permits.pop() else { break };
                got += 1;
                self.start(msg, permit, max_payload).await;
            }
            idle = got == 0;
            if failed {
                drop(permits);
                backoff.wait(&cancel).await;
            } else {
                backoff.reset();
            }
            // Reap finished tasks so the set does not grow.
            let mut running = self.running.lock().await;
            while running.try_join_next().is_some() {}
        }
    }

    /// Waits (a pull of [`IDLE_WAIT`]) for one task.
    async fn wait_for_one(&self, cancel: &CancellationToken) -> Pulled {
        let client = &self.nats.client;
        let connects = connect::connects(client);
        let sent = tokio::time::Instant::now();
        let batch = self
            .consumer
            .batch()
            .max_messages(1)
            .expires(IDLE_WAIT)
            .messages()
            .await;
        let mut batch = match batch {
            Ok(b) => b,
            Err(e) => {
                pull_failed(&e, cancel).await;
                return Pulled::Nothing;
            }
        };
        // Given up a while after the server would have answered (a leader
        // that moved leaves a pull unanswered). After a reconnection, as
        // soon as the pull has certainly expired: sent just before the
        // connection was lost, it may never have reached the consumer,
        // and the cell's tasks would wait for this worker meanwhile (up
        // to 4.7 s in a chaos run). Not sooner: a pull that did reach a
        // live leader is still answered, and a task it delivers to an
        // inbox no longer read would wait for its ack deadline.
        let give_up_at = sent + IDLE_WAIT + Duration::from_secs(3);
        let after_reconnection = async {
            connect::reconnected(client, connects).await;
            tokio::time::sleep_until(sent + IDLE_WAIT + PULL_EXPIRED_AFTER).await;
        };
        tokio::select! {
            _ = cancel.cancelled() => Pulled::Nothing,
            _ = tokio::time::sleep_until(give_up_at) => {
                debug!("pull request unanswered; pulling again");
                Pulled::Nothing
            }
            _ = after_reconnection => {
                debug!("pull request sent before a reconnection expired unanswered; pulling again");
                Pulled::Nothing
            }
            n = batch.next() => match n {
                Some(Ok(m)) => Pulled::Task(Box::new(m)),
                Some(Err(e)) => {
                    debug!(error = %e, "pull batch ended");
                    Pulled::Failed
                }
                None => Pulled::Nothing,
            },
        }
    }

    /// Runs a task in the background, holding its slot. `max_payload` is
    /// read by the caller, once per pull (reading it clones the server's
    /// whole INFO).
    async fn start(
        &self,
        msg: async_nats::jetstream::Message,
        permit: OwnedSemaphorePermit,
        max_payload: usize,
    ) {
        let nats = self.nats.clone();
        let handler = self.handler.clone();
        let active = Active::start(&self.active);
        let reporter = self.reporter.clone();
        // Boxed: a task's future is several KiB, and the runtime would copy
        // it whole when spawning and again when it ends; a box is copied
        // once.
        let task = Box::pin(async move {
            process(&nats, &reporter, msg, handler, max_payload, permit).await;
            drop(active);
        });
        self.running.lock().await.spawn(task);
    }
}

/// What an idle loop's pull brought.
enum Pulled {
    Task(Box<async_nats::jetstream::Message>),
    /// No task: the pull expired, or was given up.
    Nothing,
    /// The pull was refused at once, e.g. "no responders" (503) while the
    /// consumer elects a leader.
    Failed,
}

/// Pauses after pulls refused at once, doubling from [`PULL_PAUSE_FIRST`]
/// to [`PULL_PAUSE_MAX`]. Pulling again at once, every loop of a worker
/// asked thousands of times a second while a consumer elected its leader
/// (over 3,000 refused pulls a second from one worker in a chaos run),
/// load on the very servers the other cells were waiting on.
struct PullBackoff(Duration);

const PULL_PAUSE_FIRST: Duration = Duration::from_millis(50);
const PULL_PAUSE_MAX: Duration = Duration::from_secs(1);

impl Default for PullBackoff {
    fn default() -> Self {
        PullBackoff(PULL_PAUSE_FIRST)
    }
}

impl PullBackoff {
    async fn wait(&mut self, cancel: &CancellationToken) {
        tokio::select! {
            _ = cancel.cancelled() => {}
            _ = tokio::time::sleep(self.0) => {}
        }
        self.0 = (self.0 * 2).min(PULL_PAUSE_MAX);
    }

    fn reset(&mut self) {
        self.0 = PULL_PAUSE_FIRST;
    }
}

/// Says a pull request failed and pauses before the next (a moment, or
/// until `cancel`).
async fn pull_failed(error: &(dyn std::fmt::Display + Sync), cancel: &CancellationToken) {
    warn!(error = %error, "pull request failed; retrying");
    tokio::select! {
        _ = cancel.cancelled() => {}
        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
    }
}

/// Runs one task and settles its message. `max_payload` is
/// [`WorkerNats::max_payload`], read by the pull loop (reading it clones the
/// server's whole INFO).
async fn process(
    nats: &WorkerNats,
    reporter: &report::Reporter,
    msg: async_nats::jetstream::Message,
    handler: StepHandler,
    max_payload: usize,
    slot: OwnedSemaphorePermit,
) {
    let attempt = msg
        .info()
        .map(|i| u32::try_from(i.delivered).unwrap_or(u32::MAX))
        .unwrap_or(1);
    let task: Task = match serde_json::from_slice(&msg.payload) {
        Ok(t) => t,
        Err(e) => {
            warn!(subject = %msg.subject, error = %e, "unreadable task; terminating it");
            let _ = msg.ack_with(AckKind::Term).await;
            return;
        }
    };
    if task.is_batch() {
        // Boxed: the batch path's state would otherwise make every task's
        // future as large as its own.
        return Box::pin(batch::process(
            nats,
            msg,
            task,
            attempt,
            handler,
            max_payload,
            slot,
        ))
        .await;
    }
    let handler = match (handler.one, handler.batch) {
        (Some(one), _) => one,
        (None, Some(batch)) => one_of_batch(batch),
        (None, None) => return,
    };
    let started = Instant::now();
    let ctx = TaskContext {
        task: task.clone(),
        attempt,
        client: Some(nats.client.clone()),
    };
    let work = AssertUnwindSafe(handler(ctx)).catch_unwind();
    let progress_every = Duration::from_millis((task.timeout_ms / 3).max(500));
    let mut ticker =
        tokio::time::interval_at(tokio::time::Instant::now() + progress_every, progress_every);
    // Past the step's run_timeout the attempt is dropped (an exec handler's
    // process is killed with it) and retried.
    let ran_out = async {
        match task.run_timeout_ms {
            Some(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(work, ran_out);
    let result = loop {
        tokio::select! {
            r = &mut work => break r,
            _ = &mut ran_out => {
                let ms = task.run_timeout_ms.unwrap_or_default();
                break Ok(Err(TaskError::retry(format!(
                    "the attempt ran past the step's run_timeout of {ms} ms"
                ))));
            }
            _ = ticker.tick() => {
                if let Err(e) = msg.ack_with(AckKind::Progress).await {
                    debug!(error = %e, "in-progress ack");
                }
            }
        }
    };
    let result = result.unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "handler panicked".into());
        Err(TaskError::retry(format!("handler panicked: {what}")))
    });
    // The slot was the handler's: reporting waits on the job's cell's log,
    // which must not keep a slot another cell's task could use.
    drop(slot);
    settle(
        nats,
        reporter,
        msg,
        &task,
        attempt,
        started.elapsed(),
        result,
        max_payload,
    )
    .await;
}

/// A batch handler serving a task of one subjob, as a batch of one.
fn one_of_batch(batch: BatchHandler) -> Handler {
    Arc::new(move |ctx: TaskContext| {
        let batch = batch.clone();
        Box::pin(async move {
            let bctx = BatchContext {
                indices: vec![ctx.task.index],
                items: vec![ctx.task.item.clone()],
                task: ctx.task,
                attempt: ctx.attempt,
                client: ctx.client,
            };
            match batch(bctx).await {
                Ok(results) => results
                    .into_iter()
                    .next()
                    .unwrap_or_else(|| Err(TaskError::retry("the handler returned no result"))),
                Err(e) => Err(e),
            }
        })
    })
}

/// Maps a handler outcome to the log and to JetStream's ack, NAK or TERM.
#[allow(clippy::too_many_arguments)]
async fn settle(
    nats: &WorkerNats,
    reporter: &report::Reporter,
    msg: async_nats::jetstream::Message,
    task: &Task,
    attempt: u32,
    took: Duration,
    result: Result<Value, TaskError>,
    max_payload: usize,
) {
    let result = match result {
        Ok(value) => offload(nats, value).await,
        Err(e) => Err(e),
    };
    let (event, ack) = match result {
        Ok(result) => {
            let done = SubjobCompleted {
                job_id: task.job_id.clone(),
                step_index: task.step_index,
                index: task.index,
                attempt,
                result,
                duration_ms: took.as_millis() as u64,
                run: task.run,
                token: task.token.clone(),
            };
            return reporter.report(done, msg).await;
        }
        Err(TaskError::Retry { message, after }) if attempt < task.max_attempts => {
            let delay = after.unwrap_or_else(|| task.backoff_after(attempt));
            debug!(job_id = %task.job_id, index = task.index, attempt, ?delay, error = %message, "retrying");
            (None, AckKind::Nak(Some(delay)))
        }
        Err(e) => {
            let error = match &e {
                TaskError::Retry { message, .. } => format!(
                    "{message} (attempt {attempt} of {}, no attempts left)",
                    task.max_attempts
                ),
                TaskError::GiveUp { message } => message.clone(),
            };
            let error = bounded(&error, MAX_ERROR_BYTES);
            (
                Some(Event::SubjobFailed(SubjobFailed {
                    job_id: task.job_id.clone(),
                    step_index: task.step_index,
                    index: task.index,
                    attempt,
                    error,
                    run: task.run,
                    token: task.token.clone(),
                })),
                AckKind::Term,
            )
        }
    };
    // Boxed: a failure is rare, and a send's state is large.
    Box::pin(send(nats, &msg, event, ack, max_payload)).await;
}

/// Stores a task's outcome (if any) on the log, then settles its message
/// with `ack`; a completion too large for the server fails its subjob.
async fn send(
    nats: &WorkerNats,
    msg: &async_nats::jetstream::Message,
    event: Option<Event>,
    ack: AckKind,
    max_payload: usize,
) {
    let (event, ack) = match event.map(|e| (log::encode(&e, max_payload), e)) {
        None => (None, ack),
        Some((Ok(bytes), e)) => (Some((e, bytes)), ack),
        Some((Err(LogError::TooLarge { bytes, max, .. }), Event::SubjobCompleted(done))) => {
            // Retrying would not make it fit: fail the subjob with a clear error.
            let error = format!("result too large: {bytes} bytes, the server accepts {max}");
            warn!(job_id = %done.job_id, index = done.index, error, "failing the subjob");
            let failed = Event::SubjobFailed(SubjobFailed {
                job_id: done.job_id,
                step_index: done.step_index,
                index: done.index,
                attempt: done.attempt,
                error,
                run: done.run,
                token: done.token,
            });
            match log::encode(&failed, max_payload) {
                Ok(bytes) => (Some((failed, bytes)), AckKind::Term),
                Err(_) => (None, AckKind::Term),
            }
        }
        Some((Err(e), event)) => {
            warn!(job_id = %event.job_id(), error = %e, "could not encode an outcome");
            (None, AckKind::Nak(None))
        }
    };
    if let Some((event, payload)) = event {
        if let Err(e) =
            log::append_retrying(&nats.js, &event, payload, log::OUTCOME_APPEND_FOR).await
        {
            // Not acked: the task comes back after its deadline and runs again.
            warn!(job_id = %event.job_id(), error = %e, "could not report an outcome");
            return;
        }
    }
    if let Err(e) = msg.ack_with(ack).await {
        warn!(subject = %msg.subject, error = %e, "could not ack a task");
    }
}

/// Moves a large result to the object store and returns the reference to
/// send instead; a result beyond [`MAX_RESULT_BYTES`] fails the subjob.
async fn offload(nats: &WorkerNats, value: Value) -> Result<Value, TaskError> {
    // Per-subjob path: most results are small, so measure without building
    // the encoding (it is built once, with the event).
    if json_len(&value) <= INLINE_RESULT_MAX {
        return Ok(value);
    }
    let bytes = serde_json::to_vec(&value)
        .map_err(|e| TaskError::give_up(format!("result is not JSON: {e}")))?;
    if bytes.len() > MAX_RESULT_BYTES {
        return Err(TaskError::give_up(format!(
            "result too large: {} bytes, the limit is {MAX_RESULT_BYTES}",
            bytes.len()
        )));
    }
    let name = ResultRef::new_name();
    // Boxed: most results are small, and a put's state is large.
    let digest = Box::pin(objects::put(&nats.js, RESULTS_BUCKET, &name, &bytes))
        .await
        .map_err(|e| TaskError::retry(format!("storing a large result: {e}")))?;
    let reference = ResultRef {
        bucket: RESULTS_BUCKET.into(),
        name,
        size: bytes.len() as u64,
        digest: Some(digest),
        array_len: value.as_array().map(|a| a.len() as u64),
        format: Default::default(),
    };
    Ok(reference.to_value())
}

/// Bytes of `value`'s JSON encoding, counted without a buffer.
fn json_len(value: &Value) -> usize {
    match value {
        Value::Null | Value::Bool(_) | Value::Number(_) => 32,
        // Escaping at most sextuples a byte.
        Value::String(s) if s.len() * 6 + 2 <= INLINE_RESULT_MAX => s.len() * 6 + 2,
        _ => {
            struct Count(usize);
            impl std::io::Write for Count {
                fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                    self.0 += b.len();
                    Ok(b.len())
                }
                fn flush(&mut self) -> std::io::Result<()> {
                    Ok(())
                }
            }
            let mut c = Count(0);
            match serde_json::to_writer(&mut c, value) {
                Ok(()) => c.0,
                Err(_) => usize::MAX,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_len_never_undercounts() {
        for v in [
            json!(null),
            json!(1.5e300),
            json!("a\"\n\u{1}é"),
            json!({"k": [1, "two", {"x": null}]}),
            json!("x".repeat(300_000)),
        ] {
            let real = serde_json::to_vec(&v).unwrap().len();
            let counted = json_len(&v);
            assert!(counted >= real, "{counted} < {real} for {v}");
            if v.is_object() || v.as_str().is_some_and(|s| s.len() > 100_000) {
                assert_eq!(
                    counted, real,
                    "containers and long strings are counted exactly"
                );
            }
        }
    }
}
