//! One partition's event loop: reads the partition's durable consumer of
//! the log ([`Reader`]), gathers the facts the [`Engine`] needs (is a
//! requested job stored already, its workflow; which stalled jobs have no
//! task left), feeds it, and has the [`Executor`] carry out the actions.
//! The rules, and their order, are the engine's:
//! 1. a batch's events are applied in memory; what they call for is carried
//!    out (publishes carry deterministic message ids);
//! 2. every 100 ms (or 2,000 events) [`Input::Save`]: each changed job's
//!    record, then its bitmap chunks, then the ack of the last applied event
//!    (AckPolicy::All acks everything before it).
//!
//! A crash anywhere re-delivers the batch from the consumer's ack floor (the
//! consumer is reset to it at start), the engine re-applies it onto the
//! stored state, duplicates are counted once, and re-published events and
//! tasks are dropped by the streams' duplicate window.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::Message;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::shares::{Board, Published, Reserved};
use super::{Executor, ManagerError, ManagerOptions, Writer};
use crate::machine::{valid_job_id, Action, Definition, Engine, Input, Unqueued};
use crate::metrics::Metrics;
use crate::nats::connect::{connects, reconnected};
use crate::nats::leases::Fence;
use crate::nats::log::{self, stream_seq, Batch, LogError, Reader};
use crate::nats::store;
use crate::nats::{Nats, SetupError};
use crate::protocol::{
    cell, event_subject, job_tasks_filter, manager_consumer, now_ms, partition_kind_filter, Event,
    EventKind, TaskKey, Workflow,
};

/// Events read per page when a stalled job's outcomes are read back.
const READ_BACK_PAGE: usize = 2000;

pub(super) struct EventLoop {
    /// The partition of the log this loop reads.
    partition: u32,
    /// Its lease's fence: no write once the lease is not certainly held.
    fence: Fence,
    /// Jobs held as running per partition, for the heartbeat.
    running: Arc<Vec<AtomicU64>>,
    nats: Nats,
    options: ManagerOptions,
    engine: Engine,
    executor: Executor,
    /// Definitions seen, to create step consumers when one is new or changed.
    workflows: HashMap<String, Workflow>,
    /// Checks the tokens of outcomes.
    key: TaskKey,
    /// The fair share's view, and what this partition last told it.
    board: Board,
    published: Published,
    /// Its reservations under caps.
    reserved: Reserved,
    /// No write to the shares bucket before this (one did not answer in
    /// time: the bucket, shared by every cell, may be electing a leader).
    shares_resume: Option<std::time::Instant>,
    /// Jobs an event named that are not held, looked up this session and
    /// found ended or not stored (late events of ended jobs are common).
    not_running: HashSet<String>,
    /// The session went on without listing the partition's running jobs.
    unlisted: bool,
    /// The jobs the last session held, when it ended on a transient
    /// failure (`None` after a lost lease, whose state was dropped, and
    /// until a session has loaded its jobs).
    held: Option<Vec<String>>,
    /// Turns of the session's loop (each at most a checkpoint interval
    /// apart while it is not held up).
    progress: Arc<AtomicU64>,
}

impl EventLoop {
    pub(super) fn new(
        nats: Nats,
        options: ManagerOptions,
        partition: u32,
        writer: Writer,
        running: Arc<Vec<AtomicU64>>,
        board: Board,
    ) -> Self {
        EventLoop {
            // `run` refuses to start without it.
            key: nats.task_key.clone().unwrap_or_else(TaskKey::generate),
            partition,
            running,
            fence: writer.fence.clone(),
            executor: Executor::new(nats.clone(), writer),
            engine: engine(&options),
            nats,
            options,
            workflows: HashMap::new(),
            board,
            published: Published::default(),
            reserved: Reserved::default(),
            shares_resume: None,
            not_running: HashSet::new(),
            unlisted: false,
            held: None,
            progress: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The partition's reader: its durable consumer over the event kinds
    /// that drive the manager, reset to its ack floor.
    async fn reader(
        nats: &Nats,
        partition: u32,
        batch: usize,
        fence: &Fence,
    ) -> Result<Reader, ManagerError> {
        let filters = EventKind::ALL
            .iter()
            .filter(|k| k.drives_manager())
            .map(|k| partition_kind_filter(partition, k.token()))
            .collect();
        let name = manager_consumer(partition);
        let cell = cell(partition);
        match Reader::open(nats, cell, &name, filters, batch, "manager", Some(fence)).await {
            Ok(r) => Ok(r),
            Err(LogError::Fenced(f)) => Err(f.into()),
            Err(e) => Err(e.into()),
        }
    }

    /// Loads the partition's running jobs from their checkpoints.
    async fn reload(&mut self) -> Result<(), ManagerError> {
        // In case the listing cannot be had at once. The engine in memory
        // is replaced only once the new one is loaded: until then it is
        // what the last session held.
        let known = self.held.clone();
        let p = self.partition;
        let mut revisions = HashMap::new();
        let (jobs, listed) = store::load_active(&self.nats, p, known.as_deref()).await?;
        self.engine = engine(&self.options);
        self.not_running.clear();
        if !listed {
            warn!(
                partition = p,
                jobs = known.as_ref().map_or(0, Vec::len),
                "the partition's running jobs could not be listed at once; going on with those held before, listing again at each tick"
            );
        }
        self.unlisted = !listed;
        for (job, rev) in jobs {
            revisions.insert(job.job_id.clone(), rev);
            self.engine.insert(job);
        }
        self.executor.reset(revisions);
        // Loaded: from now on what it holds is known.
        self.held.get_or_insert_with(Vec::new);
        if !self.engine.is_empty() {
            info!(
                partition = p,
                jobs = self.engine.len(),
                "resumed running jobs"
            );
        }
        Ok(())
    }

    /// Runs sessions until cancelled. A session ends at an error (other
    /// than a hole or a failed pull of its reader, after which it stores
    /// what it applied and reads on with a new reader); the next one starts
    /// from the checkpoints. One that ended because the lease was
    /// not certainly held wrote nothing after that, dropped its state
    /// unsaved, and the next one waits until the lease is held again.
    pub(super) async fn run(mut self, cancel: CancellationToken) -> Result<(), ManagerError> {
        let mut backoff = Duration::from_millis(200);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                _ = self.fence.held() => {}
            }
            let began = std::time::Instant::now();
            // A session waiting on a lost connection's requests (a
            // checkpoint, a publish) is started again rather than waiting
            // out their time-outs: it resumes from what was stored.
            let stuck = stuck_after_reconnect(self.nats.client.clone(), self.progress.clone());
            let ended = tokio::select! {
                ended = self.session(&cancel) => ended,
                _ = stuck => Err(ManagerError::Nats(
                    "the connection to NATS was lost and made again, and the session has been waiting since on what was in flight on it (never answered)".into(),
                )),
            };
            match ended {
                Ok(()) => return Ok(()),
                Err(ManagerError::Fenced(_)) => {
                    self.held = None;
                    self.engine = engine(&self.options);
                    self.set_running();
                    if !cancel.is_cancelled() {
                        Metrics::get().manager_fenced.inc();
                        warn!(
                            partition = self.partition,
                            "partition paused: its lease is not certainly held (renewals failing, or another manager took it); state dropped unsaved"
                        );
                    }
                }
                Err(e) => {
                    if let Some(held) = &mut self.held {
                        *held = self.engine.jobs().map(|j| j.job_id.clone()).collect();
                    }
                    if began.elapsed() > Duration::from_secs(30) {
                        backoff = Duration::from_millis(200); // it had recovered
                    }
                    error!(partition = self.partition, error = %e, "manager loop failed; reloading state and resuming from the last checkpoint");
                    Metrics::get().manager_restarts.inc();
                    tokio::select! {
                        _ = cancel.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    // Short: most failures are a leader election (4-9 s),
                    // and a longer wait would outlast it.
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    /// Loads state, resets the consumer and processes until cancelled or an error.
    async fn session(&mut self, cancel: &CancellationToken) -> Result<(), ManagerError> {
        self.reload().await?;
        // Opening the reader resets the shared consumer and takes its pin:
        // only a holder may (checked before each of those).
        let mut reader =
            Some(Self::reader(&self.nats, self.partition, self.options.batch, &self.fence).await?);
        // The fair share's view first: a paced engine dispatches no fanout
        // before it.
        self.share().await?;
        let mut ticker = tokio::time::interval(self.options.tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut saver = tokio::time::interval(self.options.checkpoint_every);
        saver.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stall = tokio::time::interval(self.options.stall_after / 2);
        stall.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Events applied since the last save.
        let mut unsaved = 0usize;
        debug!(partition = self.partition, "partition loop running");
        loop {
            self.progress.fetch_add(1, Ordering::Relaxed);
            // After a hole or a failed pull, what was applied is stored and
            // a new reader goes on from there (the one before is gone
            // first): the jobs in memory are what a reload would give, so
            // the session goes on without reloading them.
            let reading = match reader.as_mut() {
                Some(r) => r,
                None => reader.insert(
                    Self::reader(&self.nats, self.partition, self.options.batch, &self.fence)
                        .await?,
                ),
            };
            tokio::select! {
                _ = cancel.cancelled() => {
                    // Graceful: store what was applied so a restart replays nothing.
                    self.save().await?;
                    return Ok(());
                }
                _ = ticker.tick() => {
                    self.list_again().await?;
                    self.share().await?;
                    self.feed(Input::Tick).await?;
                }
                _ = stall.tick() => {
                    self.find_lost().await?;
                    unsaved = 0;
                }
                _ = saver.tick() => {
                    self.save().await?;
                    unsaved = 0;
                }
                batch = reading.next_batch() => {
                    let Batch { mut messages, hole } = match batch {
                        Ok(batch) => batch,
                        Err(e) => {
                            warn!(partition = self.partition, error = %e, "reading the event log failed; reading again from the last event applied");
                            self.save().await?;
                            unsaved = 0;
                            reader = None;
                            continue;
                        }
                    };
                    unsaved += messages.len();
                    self.apply(&messages).await?;
                    if let Some(last) = messages.pop() {
                        self.executor.applied(last);
                    }
                    if let Some(hole) = hole {
                        // Reading again from the ack floor delivers the
                        // missing event.
                        debug!(partition = self.partition, %hole, "reading again from the last event applied");
                        self.save().await?;
                        unsaved = 0;
                        reader = None;
                        continue;
                    }
                    if unsaved >= self.options.batch {
                        self.save().await?;
                        unsaved = 0;
                    }
                }
            }
        }
    }

    /// The lost-task check: looks at jobs whose in-flight subjobs made no
    /// progress for `stall_after` and tells the engine which of them have
    /// no task left in the work queue (it fails them at the second look in
    /// a row, once their outcomes in the log up to the last one were read
    /// back and applied).
    ///
    /// Outcomes are reported before their task is acknowledged, so once the
    /// queue holds no task of a job, every outcome of it is in the log: the
    /// queue is read first and the job's last outcome second, and the read
    /// back goes at least as far.
    async fn find_lost(&mut self) -> Result<(), ManagerError> {
        let quiet = self.options.stall_after.as_millis() as u64;
        let stalled = self.engine.stalled(now_ms(), quiet);
        let mut gone = Vec::new();
        if !stalled.is_empty() {
            self.save().await?;
            for job_id in stalled {
                if queued_tasks(&self.nats, &job_id).await? == 0 {
                    let mut last_outcome = 0;
                    for kind in [
                        EventKind::SubjobCompleted,
                        EventKind::SubjobFailed,
                        EventKind::SubjobsCompleted,
                        EventKind::SubjobsDone,
                    ] {
                        let subject = event_subject(&job_id, kind.token());
                        last_outcome =
                            last_outcome.max(log::last_seq(&self.nats, &job_id, &subject).await?);
                    }
                    let read_back = match self.engine.read_back(&job_id) {
                        Some(from) => self.read_back(&job_id, from, last_outcome).await?,
                        None => false,
                    };
                    gone.push(Unqueued { job_id, read_back });
                }
            }
        }
        if !gone.is_empty() {
            let ids: Vec<&str> = gone.iter().map(|u| u.job_id.as_str()).collect();
            warn!(partition = self.partition, jobs = ?ids, "in-flight subjobs without a task in the work queue (they fail at the second look in a row)");
        }
        self.feed(Input::NoTasks { jobs: gone }).await
    }

    /// Reads a job's events from `from` back from the log and applies
    /// every outcome of its running step that it has not applied: one the
    /// partition's reader is behind on, or went past (a delivery lost
    /// without a gap in its numbering), must not count as lost. True when
    /// the read reached `last_outcome`; a read that fails or falls short (a
    /// replica behind) decides nothing, and the job stays suspected.
    async fn read_back(
        &mut self,
        job_id: &str,
        from: u64,
        last_outcome: u64,
    ) -> Result<bool, ManagerError> {
        // What the job had applied, for the warning: an outcome below it
        // is not applied again (a replay), so the recovered ones lie above.
        let applied_before = self.engine.job(job_id).map(|j| j.applied_seq);
        let mut from = from;
        let mut reached = last_outcome == 0;
        let mut recovered = Vec::new();
        while !reached {
            let page = match log::history(&self.nats, job_id, from, READ_BACK_PAGE).await {
                Ok(page) => page,
                Err(e) => {
                    warn!(partition = self.partition, job_id, error = %e, "could not read a job's outcomes back; it stays suspected");
                    return Ok(false);
                }
            };
            let Some(last) = page.last().map(|l| l.seq) else {
                break;
            };
            for logged in page {
                reached |= logged.seq >= last_outcome;
                let Ok(event) = serde_json::from_value::<Event>(logged.event) else {
                    continue;
                };
                if event.is_stored_on(&logged.subject)
                    && self.key.admits(&event)
                    && self.engine.unapplied(&event)
                {
                    recovered.push(logged.seq);
                    self.feed(Input::Event {
                        seq: logged.seq,
                        event,
                    })
                    .await?;
                }
            }
            from = last + 1;
        }
        if !recovered.is_empty() {
            Metrics::get()
                .manager_recovered_outcomes
                .inc_by(recovered.len() as u64);
            // Where the partition's consumer stands tells the two apart:
            // an ack floor past them means its reader went past them.
            let consumer = self
                .nats
                .cell_log(cell(self.partition))
                .clone()
                .consumer_info(manager_consumer(self.partition))
                .await
                .map(|i| {
                    format!(
                        "ack floor {}, delivered {}, pending {}, unacknowledged {}",
                        i.ack_floor.stream_sequence,
                        i.delivered.stream_sequence,
                        i.num_pending,
                        i.num_ack_pending
                    )
                })
                .unwrap_or_else(|e| format!("unknown ({e})"));
            warn!(
                partition = self.partition,
                job_id,
                seqs = ?recovered,
                ?applied_before,
                consumer,
                "applied outcomes read back from the log that the partition's reader had not (it is behind, or went past them); no subjob counts as lost while its outcome is in the log"
            );
        }
        Ok(reached)
    }

    /// The fair share: tells the engine what the others want and the
    /// workers' slots (it shares them out and refills), then publishes what
    /// this partition's jobs want. A demand that cannot be written is
    /// written at the next tick; the others go on with the last one.
    async fn share(&mut self) -> Result<(), ManagerError> {
        if self.options.queue_ahead.is_none() {
            return Ok(());
        }
        let now = now_ms();
        // The shares bucket is every cell's: while it elects a leader, this
        // loop goes on with the last view rather than wait for it.
        if let (true, Some(wanted)) = (self.shares_open(), self.engine.reservations()) {
            let wanted = wanted.clone();
            let sync = self.reserved.sync(&self.nats, self.partition, &wanted);
            match tokio::time::timeout(SHARES_WAIT, sync).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    warn!(partition = self.partition, error = %e, "could not change reservations under caps")
                }
                Err(_) => self.shares_late("changing reservations under caps"),
            }
        }
        let mut view = self.board.view(self.partition, now);
        view.reserved = self.reserved.held();
        self.feed(Input::Shares(view)).await?;
        if self.shares_open() {
            let write =
                self.published
                    .write(&self.nats, self.partition, self.engine.demands(), now);
            match tokio::time::timeout(SHARES_WAIT, write).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    warn!(partition = self.partition, error = %e, "could not publish this partition's demands")
                }
                Err(_) => self.shares_late("publishing this partition's demands"),
            }
        }
        Ok(())
    }

    /// Whether this loop writes to the shares bucket now: while its lease
    /// is held, and not while a write lately did not answer.
    fn shares_open(&self) -> bool {
        self.fence.holds()
            && self
                .shares_resume
                .is_none_or(|at| std::time::Instant::now() >= at)
    }

    /// A write to the shares bucket did not answer in time: none for a
    /// while.
    fn shares_late(&mut self, what: &str) {
        warn!(
            partition = self.partition,
            pause = ?SHARES_PAUSE,
            "{what} timed out; the fair share goes on with the last view"
        );
        self.shares_resume = Some(std::time::Instant::now() + SHARES_PAUSE);
    }

    /// Checkpoints changed jobs, then acknowledges every event applied so far.
    async fn save(&mut self) -> Result<(), ManagerError> {
        self.feed(Input::Save).await?;
        self.set_running();
        Ok(())
    }

    /// Loads a running job an event names that this session does not
    /// hold: the listing of the partition's active keys, read from a
    /// replica behind its leader, can miss a job, whose events would
    /// otherwise be acknowledged unapplied.
    async fn hold_if_running(&mut self, job_id: &str) -> Result<(), ManagerError> {
        if self.engine.contains(job_id)
            || self.not_running.contains(job_id)
            || !valid_job_id(job_id)
        {
            return Ok(());
        }
        match store::load(&self.nats, job_id).await? {
            Some((mut job, revision)) if !job.state.is_terminal() => {
                warn!(
                    partition = self.partition,
                    job_id, "holding a running job its partition's listing missed"
                );
                job.listed = true;
                self.executor.track(job_id.to_string(), revision);
                self.engine.insert(job);
            }
            _ => {
                if self.not_running.len() >= 100_000 {
                    self.not_running.clear();
                }
                self.not_running.insert(job_id.to_string());
            }
        }
        Ok(())
    }

    /// After a session went on without its partition's listing (see
    /// [`store::load_active`]): lists again, a second at most, and holds
    /// any running job listed that it does not.
    async fn list_again(&mut self) -> Result<(), ManagerError> {
        if !self.unlisted {
            return Ok(());
        }
        // Not answered (or refused): again at the next tick.
        if let Some(ids) = store::active_ids_briefly(&self.nats, self.partition).await {
            for id in ids {
                self.hold_if_running(&id).await?;
            }
            self.unlisted = false;
        }
        Ok(())
    }

    fn set_running(&self) {
        if let Some(n) = self.running.get(self.partition as usize) {
            n.store(self.engine.len() as u64, Ordering::Relaxed);
        }
    }

    /// Applies a batch of events and carries out what they call for.
    async fn apply(&mut self, batch: &[Message]) -> Result<(), ManagerError> {
        let now = now_ms();
        let mut actions = Vec::new();
        let mut redriven = None;
        for msg in batch {
            let seq = stream_seq(msg);
            let event: Event = match serde_json::from_slice(&msg.payload) {
                Ok(e) => e,
                Err(e) => {
                    Metrics::get()
                        .manager_ignored
                        .with_label_values(&["unreadable"])
                        .inc();
                    warn!(subject = %msg.subject, seq, error = %e, "dropping an unreadable event");
                    continue;
                }
            };
            if !event.is_stored_on(&msg.subject) {
                Metrics::get()
                    .manager_ignored
                    .with_label_values(&["subject_mismatch"])
                    .inc();
                warn!(subject = %msg.subject, seq, "dropping an event whose subject does not match its body");
                continue;
            }
            if !self.key.admits(&event) {
                Metrics::get()
                    .manager_ignored
                    .with_label_values(&["bad_token"])
                    .inc();
                warn!(subject = %msg.subject, seq, "dropping an outcome without its task's token (a forgery, or a worker older than protocol 2)");
                continue;
            }
            let input = match event {
                // The facts the engine needs to decide whether and how the
                // job starts (a workflow it will not use is not fetched).
                Event::JobRequested(req) => {
                    let (stored, workflow) = if !valid_job_id(&req.job_id) {
                        // No record could hold it; the engine ignores it.
                        (false, Definition::Unknown)
                    } else {
                        let stored = store::stored(&self.nats, &req.job_id).await?;
                        let workflow = match stored || self.engine.contains(&req.job_id) {
                            true => Definition::Unknown,
                            false => self.workflow(&req.workflow).await?,
                        };
                        (stored, workflow)
                    };
                    Input::Requested {
                        seq,
                        event: req,
                        stored,
                        workflow,
                    }
                }
                // An ended job is not held: its record and the bitmap of
                // the step it would run again are read.
                Event::RedriveRequested(req) => {
                    let stored = match self.engine.contains(&req.job_id)
                        || !valid_job_id(&req.job_id)
                    {
                        true => None,
                        false => {
                            store::load_for_redrive(&self.nats, &req.job_id, req.step.as_deref())
                                .await?
                                .map(|(job, revision)| {
                                    redriven = Some((job.job_id.clone(), revision));
                                    Box::new(job)
                                })
                        }
                    };
                    Input::Redrive {
                        seq,
                        event: req,
                        stored,
                    }
                }
                event => {
                    self.hold_if_running(event.job_id()).await?;
                    Input::Event { seq, event }
                }
            };
            actions.extend(self.engine.apply(input, now));
            // A redriven job is held again: its record is updated from the
            // revision read.
            if let Some((job_id, revision)) = redriven.take() {
                if self.engine.contains(&job_id) {
                    self.executor.track(job_id, revision);
                }
            }
        }
        for (reason, n) in self.engine.take_ignored() {
            debug!(reason, n, "events ignored");
            Metrics::get()
                .manager_ignored
                .with_label_values(&[reason])
                .inc_by(n);
        }
        self.execute(actions).await
    }

    /// Applies one input and carries out what it calls for.
    async fn feed(&mut self, input: Input) -> Result<(), ManagerError> {
        let actions = self.engine.apply(input, now_ms());
        self.execute(actions).await
    }

    /// Carries out actions, and tells the engine what came of them (jobs
    /// whose actions cannot be carried out, records another manager wrote)
    /// until nothing more comes.
    async fn execute(&mut self, actions: Vec<Action>) -> Result<(), ManagerError> {
        let mut actions = actions;
        while !actions.is_empty() {
            let feedback = self.executor.run(actions).await?;
            actions = Vec::new();
            for input in feedback {
                actions.extend(self.engine.apply(input, now_ms()));
            }
        }
        Ok(())
    }

    /// The requested workflow, checked as it is read; its step consumers
    /// are created when it is new or changed.
    async fn workflow(&mut self, name: &str) -> Result<Definition, ManagerError> {
        let wf = match self.nats.workflow(name).await {
            Ok(Some(wf)) => wf,
            Ok(None) => return Ok(Definition::Unknown),
            Err(SetupError::BadDefinition { message, .. }) => {
                return Ok(Definition::Invalid(message))
            }
            Err(e) => return Err(e.into()),
        };
        if self.workflows.get(name) != Some(&wf) {
            // This partition's cell's consumers: another cell's work queue
            // electing a leader must not hold up this one.
            let cell = cell(self.partition);
            for step in &wf.steps {
                self.nats
                    .ensure_cell_step_consumer(cell, &wf.name, step)
                    .await?;
            }
            self.workflows.insert(name.to_string(), wf.clone());
        }
        Ok(Definition::Found(wf))
    }
}

/// How long a session may go without a turn of its loop after its
/// connection was made again before it counts as held up by what was in
/// flight on the lost one (a turn comes every checkpoint interval, 100 ms
/// by default, unless a request holds it up).
const STUCK_AFTER_RECONNECT: Duration = Duration::from_secs(1);

/// Resolves when `client` has connected again and the session whose turns
/// `progress` counts has made none for [`STUCK_AFTER_RECONNECT`] since: it
/// waits on a request sent on the lost connection, never to be answered.
/// A session that goes on turning after a reconnection is left alone.
async fn stuck_after_reconnect(client: async_nats::Client, progress: Arc<AtomicU64>) {
    loop {
        reconnected(&client, connects(&client)).await;
        let seen = progress.load(Ordering::Relaxed);
        tokio::time::sleep(STUCK_AFTER_RECONNECT).await;
        if progress.load(Ordering::Relaxed) == seen {
            return;
        }
    }
}

/// The longest a partition loop waits for the shares bucket at a tick...
const SHARES_WAIT: Duration = Duration::from_millis(250);
/// ...and how long it leaves the bucket alone after it did not answer.
const SHARES_PAUSE: Duration = Duration::from_secs(2);

/// A fresh engine, paced when the fair share is on.
fn engine(options: &ManagerOptions) -> Engine {
    match options.queue_ahead {
        Some(ahead) => Engine::paced(ahead.as_millis() as u64),
        None => Engine::new(),
    }
}

/// Tasks of one job in the work queue (queued, running or waiting to be retried).
async fn queued_tasks(nats: &Nats, job_id: &str) -> Result<u64, ManagerError> {
    let mut subjects = nats
        .task_queue(job_id)
        .info_with_subjects(job_tasks_filter(job_id))
        .await
        .map_err(|e| ManagerError::Nats(format!("counting tasks of {job_id}: {e}")))?;
    let mut n = 0;
    while let Some(entry) = subjects.next().await {
        n += entry
            .map_err(|e| ManagerError::Nats(format!("counting tasks of {job_id}: {e}")))?
            .1 as u64;
    }
    Ok(n)
}
