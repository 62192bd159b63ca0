//! Every workflow rule, as a pure state machine: `Engine::apply(input, now)`
//! changes the jobs it holds and returns the [`Action`]s an executor must
//! carry out. No I/O, no clock, no tokio: everything it needs arrives in the
//! input, so every interleaving of events can be tested in memory.
//!
//! Rules it keeps:
//! - a job id starts once: a `JobRequested` for a job held, or stored, is
//!   ignored;
//! - each subjob's outcome is counted once (the [`Pending`] bitmaps), and an
//!   outcome replayed after a crash is not counted twice (`applied_seq`);
//! - events for a step that is no longer running, or a job that ended, are
//!   ignored; an outcome of a fanout subjob not dispatched yet is held and
//!   counted once it is ([`Engine::early`]: a session started again may
//!   dispatch less than the one before, whose workers ran more);
//! - steps run in order; a fanout keeps at most `max_in_flight` subjobs
//!   dispatched and unfinished; failures beyond the step's tolerance, a
//!   step's deadline, a cancellation end the job;
//! - a redrive ([`Input::Redrive`]) runs a failed job (or one that
//!   completed with failed subjobs) again as a new run: only the subjobs of
//!   the chosen step that did not complete, then the steps after it; the
//!   events, tasks and tokens of a run carry its number, so nothing of an
//!   earlier run (a late outcome, a replay) counts in a later one, and the
//!   figures of the run before stay in the record;
//! - a paused job dispatches nothing (not even its next step's task) until
//!   resumed; a change of window or tolerance applies from the running step
//!   on, and a tolerance below the failures counted fails the job;
//! - a paced engine ([`Engine::paced`]) shares each step's worker slots
//!   (`share.rs`: priorities, then customers, then jobs) and a fanout keeps
//!   dispatched only its share plus a few milliseconds of work, never more
//!   than its partition reserved under a cap ([`Input::Shares`]);
//! - lost subjobs: in-flight subjobs of a job whose tasks are all gone from
//!   the work queue fail, but only at the second look in a row with no
//!   progress in between ([`Input::NoTasks`]), since a cluster changing
//!   leaders can show an empty queue for a moment, and only once the
//!   step's outcomes in the log were read back and any one not applied
//!   was ([`Engine::read_back`]): an outcome that is in the log never
//!   counts as lost;
//! - the manager's own decisions to fail subjobs (lost, step deadline) are
//!   logged as a `SubjobsFailed` before they count, so any reader of the log
//!   sees every failure the job record counts; it applies them at once (a
//!   job's decision must not wait behind its partition's backlog), and
//!   reading one back, or replaying it after a crash, counts nothing twice;
//! - crash safety: on [`Input::Save`] every changed job is checkpointed
//!   (record, then chunks: [`Checkpoint`]) before the events that changed it
//!   are acknowledged ([`Action::Ack`]), and a job that ended is unloaded
//!   once its last checkpoint is out;
//! - every action is idempotent when replayed (events and tasks carry
//!   deterministic message ids), so the executor may re-apply events after a
//!   crash and re-run what they produce.

mod checkpoint;
mod share;

pub use checkpoint::{Checkpoint, Write};
pub use share::{allocate, effective_priority, waterfill, Grant, Limits, ShareView, StepView};

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde_json::{json, Value};

use crate::protocol::{
    array_len, bounded, customer_cap_key, event_subject, events_stream, job_cell, step_cap_key,
    validate_token, AbandonReason, CancelRequested, Completion, Event, EventKind, Failure, Job,
    JobCancelled, JobCompleted, JobDemand, JobFailed, JobRedriven, JobRejected, JobRequested,
    JobState, Mark, Millis, Pace, Pending, Redrive, RedriveRequested, RejectCode, RunFigures,
    Share, Source, SourceField, Step, StepCompleted, StepKind, StepRun, StepStarted, StepState,
    SubjobCompleted, SubjobFailed, SubjobsCompleted, SubjobsDone, SubjobsFailed, UpdateRequested,
    Workflow, INLINE_RESULT_MAX, MAX_ERROR_BYTES, MAX_FAILURES_KEPT, MAX_FAILURES_PASSED_ON,
    MAX_REASON_BYTES,
};

/// Refill a step's in-flight window only when at least this many slots are
/// free (or the rest fits), so dispatches go out in batches.
const MIN_REFILL: u64 = 256;

/// Outcomes held at most until their subjobs are dispatched
/// ([`Engine::early`]); beyond, an outcome is left to the lost-task
/// check's read back.
const MAX_EARLY: usize = 10_000;

/// What the engine is told.
#[derive(Debug, Clone)]
pub enum Input {
    /// A job was requested. The event loop looked up whether a record of
    /// this job id is stored already and, if not, its workflow.
    Requested {
        seq: u64,
        event: JobRequested,
        stored: bool,
        workflow: Definition,
    },
    /// Any other event of the log, with its stream sequence.
    Event { seq: u64, event: Event },
    /// Someone asked to redrive a job. For a job the engine does not hold,
    /// the event loop read its record (`None`: there is none) with the
    /// pending bitmap of the step it would run again (empty when that
    /// bitmap is no longer stored).
    Redrive {
        seq: u64,
        event: RedriveRequested,
        stored: Option<Box<Job>>,
    },
    /// Time passed: check deadlines and refill in-flight windows.
    Tick,
    /// The executor could not carry out an action for this job (its input
    /// is gone from the log, a task is larger than the server accepts):
    /// the job fails with `reason` instead of blocking the manager.
    Abort { job_id: String, reason: String },
    /// The lost-task check: of the jobs [`Engine::stalled`] named, these
    /// have no task left in the work queue. Outcomes are logged before
    /// their task leaves the queue, so a job that has every outcome in the
    /// log up to its last one applied has every outcome it will ever get.
    /// Such a job, named at two checks in a row with no progress in between
    /// and read back at the second ([`Unqueued::read_back`]), has in-flight
    /// subjobs that can never finish (their tasks were purged, or a failure
    /// report was lost): they fail. Each job is judged on its own events,
    /// so a busy neighbour hides nothing. An empty list clears the
    /// suspicions.
    NoTasks { jobs: Vec<Unqueued> },
    /// Checkpoint every job changed since the last save, then acknowledge
    /// the events applied so far.
    Save,
    /// What the other partitions' jobs want of each step and the slots of
    /// the workers serving it: the engine shares the slots out again
    /// (a paced engine only, [`Engine::paced`]).
    Shares(ShareView),
}

/// What the event loop found of a requested job's workflow.
#[derive(Debug, Clone, PartialEq)]
pub enum Definition {
    Found(Workflow),
    /// No workflow by that name.
    Unknown,
    /// Stored, but not a valid definition (why): the job is rejected.
    Invalid(String),
}

/// What the executor must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Append an event to the log.
    Publish(Event),
    /// Enqueue subjobs `from..to` of a step.
    Dispatch(Dispatch),
    /// Drop every queued task of the job.
    PurgeTasks { job_id: String },
    /// Store a job: its writes in order, after every action before it.
    Checkpoint(Checkpoint),
    /// Acknowledge every event applied so far; every checkpoint before it
    /// must be stored first.
    Ack,
}

/// A job the lost-task check found without a task in the work queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unqueued {
    pub job_id: String,
    /// Whether its running step's outcomes in the log, up to its last
    /// outcome event (read after the queue), were read back just before
    /// and every one not yet applied was ([`Engine::read_back`],
    /// [`Engine::unapplied`]). Its subjobs are failed as lost only then:
    /// the partition's reader may be behind, or have gone past an outcome
    /// without applying it.
    pub read_back: bool,
}

/// Subjobs to enqueue.
#[derive(Debug, Clone, PartialEq)]
pub struct Dispatch {
    pub job_id: String,
    pub workflow: String,
    pub step_index: usize,
    pub step: Step,
    pub total: u64,
    pub from: u64,
    pub to: u64,
    /// The subjobs of `from..to` to enqueue, when not all of them (a
    /// redriven fanout skips those that completed in an earlier run).
    pub indices: Option<Vec<u64>>,
    /// The job's run, which its tasks and their tokens carry.
    pub run: u32,
    /// Where the step's input (task) or items (fanout) are.
    pub source: Source,
}

/// Every job the manager holds in memory, and which ones changed.
#[derive(Debug, Default)]
pub struct Engine {
    jobs: HashMap<String, Job>,
    dirty: BTreeSet<String>,
    ignored: BTreeMap<&'static str, u64>,
    /// Jobs without tasks at the last lost-task check, with their
    /// `updated_at` then.
    suspects: HashMap<String, Millis>,
    /// Set when fanouts are paced by the fair share: the milliseconds of
    /// work a job keeps queued beyond its slots.
    pacing: Option<u64>,
    /// The last [`Input::Shares`].
    view: ShareView,
    /// Whether one came: until then a paced engine knows no capacity and
    /// no cap, and dispatches no fanout.
    shared: bool,
    /// This engine's demands by step, as of the last [`Input::Shares`].
    own: BTreeMap<String, Vec<JobDemand>>,
    /// Since when each job wanted slots and held none.
    waiting: HashMap<String, Millis>,
    /// Per cap key: the cap, and the room this engine's jobs under it want
    /// reserved, as of the last [`Input::Shares`] (none before the first).
    wanted: Option<BTreeMap<String, (u64, u64)>>,
    /// Outcomes of fanout subjobs that this engine has not dispatched
    /// (yet), by job: each is applied once its subjob is. A session
    /// started again reads the log again from its last acknowledged event
    /// and dispatches what its window and share allow now, which can be
    /// less than the session before had dispatched and its workers ran;
    /// their outcomes then come before the dispatch. Their tokens say a
    /// manager dispatched them (forgeries never reach the engine), and
    /// their tasks, enqueued again, are duplicates the work queue drops,
    /// so no other outcome would come. At most [`MAX_EARLY`], kept in
    /// memory only: a session that fails with some held leaves them to be
    /// read again or read back.
    early: HashMap<String, Vec<Early>>,
}

/// An outcome held until its subjob is dispatched.
#[derive(Debug, Clone)]
struct Early {
    seq: u64,
    event: Event,
    /// It came at or before the job's last applied sequence (a replay).
    replay: bool,
}

impl Engine {
    pub fn new() -> Self {
        Self::default()
    }

    /// An engine whose fanouts dispatch by the fair share of their step's
    /// workers ([`Input::Shares`]) rather than up to `max_in_flight`: each
    /// job keeps its slots' worth of subjobs dispatched, plus what it
    /// finishes in `ahead_ms`, so the work queue holds little more than
    /// can start soon. A fanout step waits for its share before it
    /// dispatches anything.
    pub fn paced(ahead_ms: u64) -> Self {
        Engine {
            pacing: Some(ahead_ms),
            ..Self::default()
        }
    }

    /// What this engine's running fanouts want, by step
    /// (`<workflow>.<step>`), as of the last [`Input::Shares`].
    pub fn demands(&self) -> &BTreeMap<String, Vec<JobDemand>> {
        &self.own
    }

    /// Per cap key ([`customer_cap_key`], [`step_cap_key`]): the cap and
    /// the room this engine's jobs under it want reserved (their slots, and
    /// at least what they hold), as of the last [`Input::Shares`]. The
    /// event loop reserves it and says what it got in the next
    /// [`ShareView::reserved`]; jobs under a cap never hold more together
    /// than their partition reserved. `None` until this engine has shared
    /// out once (what its loaded jobs hold is not known before).
    pub fn reservations(&self) -> Option<&BTreeMap<String, (u64, u64)>> {
        self.wanted.as_ref()
    }

    pub fn contains(&self, job_id: &str) -> bool {
        self.jobs.contains_key(job_id)
    }

    pub fn job(&self, job_id: &str) -> Option<&Job> {
        self.jobs.get(job_id)
    }

    pub fn len(&self) -> usize {
        self.jobs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }

    /// Every job held in memory.
    pub fn jobs(&self) -> impl Iterator<Item = &Job> {
        self.jobs.values()
    }

    /// Adds a job loaded from storage (after a restart).
    pub fn insert(&mut self, mut job: Job) {
        job.pacing = self.pacing;
        self.jobs.insert(job.job_id.clone(), job);
    }

    /// Jobs whose in-flight subjobs have made no progress for `quiet` ms:
    /// the ones the lost-task check looks at.
    pub fn stalled(&self, now: Millis, quiet: Millis) -> Vec<String> {
        self.jobs
            .values()
            .filter(|j| in_flight(j) > 0 && now.saturating_sub(j.updated_at) >= quiet)
            .map(|j| j.job_id.clone())
            .collect()
    }

    /// Whether the lost-task check, naming `job_id`, would fail its
    /// in-flight subjobs now: it was named at the check before and made no
    /// progress since. Then its running step's outcomes are to be read back
    /// from the log first (applying those its reader is behind on, or went
    /// past), from the log sequence returned: none of them lies before it
    /// (its input's event).
    pub fn read_back(&self, job_id: &str) -> Option<u64> {
        let job = self.jobs.get(job_id)?;
        if self.suspects.get(job_id) != Some(&job.updated_at) {
            return None;
        }
        let step = job.steps.get(job.current)?;
        match step.source {
            Some(Source::Event { seq, .. }) => Some(seq),
            _ => Some(job.requested_seq),
        }
    }

    /// Whether `event`, read back from the log, is an outcome of a held
    /// job's running step (and run) that it has not applied.
    pub fn unapplied(&self, event: &Event) -> bool {
        self.jobs
            .get(event.job_id())
            .is_some_and(|job| standings(job, event).0)
    }

    fn unload(&mut self, job_id: &str) {
        self.early.remove(job_id);
        self.dirty.remove(job_id);
        self.suspects.remove(job_id);
        self.waiting.remove(job_id);
        self.jobs.remove(job_id);
    }

    /// Applies one input at time `now`.
    pub fn apply(&mut self, input: Input, now: Millis) -> Vec<Action> {
        let mut out = Vec::new();
        match input {
            Input::Requested {
                seq,
                event,
                stored,
                workflow,
            } => {
                if !valid_job_id(&event.job_id) {
                    self.ignore(&Event::JobRequested(event), Ignored::InvalidJobId);
                // A job id starts once, whatever is sent again.
                } else if !stored && !self.jobs.contains_key(&event.job_id) {
                    self.requested(seq, event, workflow, now, &mut out);
                }
            }
            Input::Event { seq, event } => self.event(seq, event, now, &mut out),
            Input::Redrive { seq, event, stored } => {
                self.redrive(seq, event, stored, now, &mut out)
            }
            Input::Abort { job_id, reason } => {
                if let Some(job) = self.jobs.get_mut(&job_id) {
                    if !job.state.is_terminal() {
                        fail_job(job, reason, now, &mut out);
                        self.dirty.insert(job_id);
                    }
                }
            }
            Input::NoTasks { jobs } => self.no_tasks(jobs, now, &mut out),
            Input::Save => self.save(&mut out),
            Input::Shares(view) => {
                self.view = view;
                self.shared = true;
                self.share_out(now, &mut out);
            }
            Input::Tick => {
                let ids: Vec<String> = self
                    .jobs
                    .iter()
                    .filter(|(_, j)| j.state == JobState::Running)
                    .map(|(id, _)| id.clone())
                    .collect();
                for id in ids {
                    if let Some(job) = self.jobs.get_mut(&id) {
                        if tick(job, now, &mut out) {
                            self.dirty.insert(id);
                        }
                    }
                }
            }
        }
        if self.pacing.is_some() {
            self.first_shares(now, &mut out);
        }
        self.release_early(now, &mut out);
        out
    }

    /// Applies the held outcomes whose subjobs are now dispatched (which
    /// may dispatch more, and release others); drops those that can no
    /// longer count (their job or step ended, or they count nothing). Looks
    /// only at the jobs the actions of this input dispatched or ended.
    fn release_early(&mut self, now: Millis, out: &mut Vec<Action>) {
        let mut from = 0;
        while !self.early.is_empty() && from < out.len() {
            let touched: BTreeSet<String> = out[from..]
                .iter()
                .filter_map(|a| match a {
                    Action::Dispatch(d) => Some(d.job_id.as_str()),
                    Action::Publish(
                        e @ (Event::StepCompleted(_)
                        | Event::JobCompleted(_)
                        | Event::JobFailed(_)
                        | Event::JobCancelled(_)),
                    ) => Some(e.job_id()),
                    _ => None,
                })
                .filter(|id| self.early.contains_key(*id))
                .map(str::to_string)
                .collect();
            from = out.len();
            for id in touched {
                let Some(held) = self.early.remove(&id) else {
                    continue;
                };
                let Some(job) = self.jobs.get_mut(&id) else {
                    continue;
                };
                let mut keep = Vec::new();
                for early in held {
                    let (open, undispatched) = standings(job, &early.event);
                    if !open {
                        if undispatched {
                            keep.push(early);
                        }
                        continue;
                    }
                    // Sequence 0 is never taken for a replay; a replay
                    // keeps its own, at or below the last one applied.
                    let seq = if early.replay { early.seq } else { 0 };
                    if let Ok(true) = outcome(job, seq, &early.event, now, out) {
                        self.dirty.insert(id.clone());
                        if standings(job, &early.event).1 {
                            keep.push(early);
                        }
                    }
                }
                if !keep.is_empty() {
                    self.early.insert(id, keep);
                }
            }
        }
    }

    fn held_early(&self) -> usize {
        self.early.values().map(Vec::len).sum()
    }

    /// A paced fanout that just started gets its share at once (from the
    /// last view), so it need not wait for the next [`Input::Shares`].
    fn first_shares(&mut self, now: Millis, out: &mut Vec<Action>) {
        let started: Vec<(String, usize)> = out
            .iter()
            .filter_map(|a| match a {
                Action::Publish(Event::StepStarted(s)) => Some((s.job_id.clone(), s.step_index)),
                _ => None,
            })
            .collect();
        if !self.shared {
            return;
        }
        for (job_id, i) in started {
            let Some(job) = self.jobs.get(&job_id) else {
                continue;
            };
            let Some(demand) = demand(job, now) else {
                continue;
            };
            if job.current != i || job.steps[i].pace.slots.is_some() {
                continue;
            }
            let key = step_key(job);
            let mut claims: Vec<JobDemand> = self
                .own
                .get(&key)
                .map(|v| v.iter().filter(|d| d.job_id != job_id).cloned().collect())
                .unwrap_or_default();
            claims.push(demand);
            self.own.insert(key.clone(), claims.clone());
            let grants = self.grants(&key, &claims, now);
            // Under a cap, the room is handed out at share-outs, from what
            // the partition reserved: a newcomer waits for the next one.
            let capped = self
                .jobs
                .get(&job_id)
                .is_some_and(|j| !self.caps_of(j).is_empty());
            let grant = grants.get(&job_id).map(|g| Grant {
                limit: capped.then_some(0),
                ..*g
            });
            self.grant(&job_id, &key, grant, now, out);
        }
    }

    /// Shares every step this engine's jobs run on, and refills them.
    fn share_out(&mut self, now: Millis, out: &mut Vec<Action>) {
        let mut own: BTreeMap<String, Vec<JobDemand>> = BTreeMap::new();
        for job in self.jobs.values() {
            if let Some(mut d) = demand(job, now) {
                if d.want > 0 && d.holds == 0 {
                    d.waiting_since = Some(*self.waiting.entry(d.job_id.clone()).or_insert(now));
                } else {
                    self.waiting.remove(&d.job_id);
                }
                own.entry(step_key(job)).or_default().push(d);
            }
        }
        self.own = own;
        let steps: Vec<(String, Vec<JobDemand>)> = self
            .own
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut all = Vec::new();
        for (key, mine) in steps {
            let grants = self.grants(&key, &mine, now);
            for d in mine {
                if let Some(g) = grants.get(&d.job_id) {
                    all.push((d, key.clone(), *g));
                }
            }
        }
        let limits = self.limits(&all);
        for (d, key, mut g) in all {
            g.limit = limits.get(&d.job_id).copied();
            self.grant(&d.job_id, &key, Some(g), now, out);
        }
    }

    /// The caps a job is under: its customer's and its step's, by key.
    fn caps_of(&self, job: &Job) -> Vec<(String, u64)> {
        let mut caps = Vec::new();
        if let Some(c) = &job.customer {
            if let Some(cap) = self.view.tenants.get(c).and_then(|t| t.max_concurrency) {
                caps.push((customer_cap_key(c), cap));
            }
        }
        if let Some(cap) = job
            .definition
            .steps
            .get(job.current)
            .and_then(|s| s.max_concurrency)
        {
            let step = job
                .steps
                .get(job.current)
                .map(|s| s.name.as_str())
                .unwrap_or("");
            caps.push((step_cap_key(&job.workflow, step), cap));
        }
        caps
    }

    /// Each capped job's limit: under each of its caps, the room this
    /// partition reserved less what its jobs under the cap hold is shared
    /// among those below their slots; a job's limit is what it holds plus
    /// its part, the lowest over its caps. Also what to reserve next.
    fn limits(&mut self, all: &[(JobDemand, String, Grant)]) -> HashMap<String, u64> {
        // Cap key → the cap and the jobs under it.
        type Under<'a> = (u64, Vec<(&'a JobDemand, &'a Grant)>);
        let mut under: BTreeMap<String, Under> = BTreeMap::new();
        for (d, _, g) in all {
            let Some(job) = self.jobs.get(&d.job_id) else {
                continue;
            };
            for (key, cap) in self.caps_of(job) {
                under.entry(key).or_insert((cap, Vec::new())).1.push((d, g));
            }
        }
        let mut limits: HashMap<String, u64> = HashMap::new();
        let wanted = self.wanted.insert(BTreeMap::new());
        for (key, (cap, jobs)) in under {
            let held: u64 = jobs.iter().map(|(d, _)| d.holds).sum();
            let reserved = self.view.reserved.get(&key).copied().unwrap_or(0);
            let asks: Vec<(u64, u64)> = jobs
                .iter()
                .map(|(d, g)| (1, g.slots.saturating_sub(d.holds)))
                .collect();
            let parts = waterfill(reserved.saturating_sub(held), &asks);
            for ((d, _), part) in jobs.iter().zip(parts) {
                let limit = d.holds + part;
                let l = limits.entry(d.job_id.clone()).or_insert(limit);
                *l = (*l).min(limit);
            }
            let want: u64 = jobs.iter().map(|(d, g)| g.slots.max(d.holds)).sum();
            wanted.insert(key, (cap, want));
        }
        limits
    }

    /// The grants of a step: its own claims `mine` beside the others'.
    fn grants(&self, key: &str, mine: &[JobDemand], now: Millis) -> HashMap<String, Grant> {
        let view = self.view.steps.get(key);
        let mut claims: Vec<JobDemand> = mine.to_vec();
        if let Some(v) = view {
            claims.extend(
                v.others
                    .iter()
                    .filter(|d| !self.jobs.contains_key(&d.job_id))
                    .cloned(),
            );
        }
        // A customer's cap covers all its steps: what it holds elsewhere.
        let mut elsewhere: HashMap<String, u64> = HashMap::new();
        let mut count = |d: &JobDemand| {
            if let Some(c) = &d.customer {
                *elsewhere.entry(c.clone()).or_default() += d.holds;
            }
        };
        for (k, ds) in &self.own {
            if k != key {
                ds.iter().for_each(&mut count);
            }
        }
        for (k, v) in &self.view.steps {
            if k != key {
                v.others.iter().for_each(&mut count);
            }
        }
        let step_cap = mine.first().and_then(|d| {
            let job = self.jobs.get(&d.job_id)?;
            job.definition.steps.get(job.current)?.max_concurrency
        });
        let limits = Limits {
            // Unknown (no worker heartbeat names the step): nothing is held
            // back but the caps.
            capacity: view.and_then(|v| v.capacity).unwrap_or(u64::MAX / 4),
            step_cap,
            tenants: &self.view.tenants,
            held_elsewhere: &elsewhere,
        };
        allocate(&claims, limits, now)
    }

    /// Applies one job's grant: its slots, the share its record shows, and
    /// what it may dispatch now.
    fn grant(
        &mut self,
        job_id: &str,
        key: &str,
        grant: Option<Grant>,
        now: Millis,
        out: &mut Vec<Action>,
    ) {
        let capacity = self.view.steps.get(key).and_then(|v| v.capacity);
        let Some(job) = self.jobs.get_mut(job_id) else {
            return;
        };
        let i = job.current;
        let Some(grant) = grant else {
            return;
        };
        let share = capacity.map(|capacity| Share {
            slots: grant.slots,
            capacity,
            waiting: grant.waiting,
        });
        let step = &mut job.steps[i];
        if grant.slots > 0 && step.pace.slots.unwrap_or(0) == 0 {
            // Its pace while it had no slot says nothing: measure afresh.
            step.pace.rate = None;
            step.pace.measured_at = 0;
        }
        step.pace.slots = Some(grant.slots);
        step.pace.limit = grant.limit;
        meter(step, now);
        let mut changed = step.share != share;
        step.share = share;
        let before = out.len();
        refill(job, out);
        changed |= out.len() > before;
        if changed {
            self.dirty.insert(job_id.to_string());
        }
    }

    fn requested(
        &mut self,
        seq: u64,
        ev: JobRequested,
        workflow: Definition,
        now: Millis,
        out: &mut Vec<Action>,
    ) {
        let (code, reason) = match workflow {
            Definition::Found(workflow) => return self.start(seq, ev, workflow, now, out),
            Definition::Unknown => (
                RejectCode::UnknownWorkflow,
                format!(
                    "unknown workflow {:?}: apply it first with `fanjet workflow apply`",
                    ev.workflow
                ),
            ),
            Definition::Invalid(why) => (
                RejectCode::InvalidDefinition,
                bounded(
                    &format!(
                        "the stored definition of workflow {:?} is invalid: {why}",
                        ev.workflow
                    ),
                    MAX_REASON_BYTES,
                ),
            ),
        };
        out.push(Action::Publish(Event::JobRejected(JobRejected {
            job_id: ev.job_id.clone(),
            workflow: Some(ev.workflow.clone()),
            customer: ev.customer.clone(),
            code,
            reason: reason.clone(),
            at: now,
        })));
        let job = Job::rejected(
            &ev.job_id,
            Some(&ev.workflow),
            ev.customer.clone(),
            reason,
            now,
        );
        self.dirty.insert(job.job_id.clone());
        self.jobs.insert(job.job_id.clone(), job);
    }

    fn start(
        &mut self,
        seq: u64,
        ev: JobRequested,
        workflow: Workflow,
        now: Millis,
        out: &mut Vec<Action>,
    ) {
        let mut job = Job::new(&ev, workflow, seq, now);
        job.pacing = self.pacing;
        // An array, or a reference to items in the object store.
        let len = array_len(&ev.input);
        start_step(
            &mut job,
            0,
            Source::Event {
                seq,
                field: SourceField::Input,
            },
            len,
            now,
            out,
        );
        self.dirty.insert(job.job_id.clone());
        self.jobs.insert(job.job_id.clone(), job);
    }

    /// A redrive: starts the job's next run, or, read again after a crash
    /// (the job is held and this request started its run), makes its
    /// stored bitmap forget the run before's failures again.
    fn redrive(
        &mut self,
        seq: u64,
        e: RedriveRequested,
        stored: Option<Box<Job>>,
        now: Millis,
        out: &mut Vec<Action>,
    ) {
        let ignored = Event::RedriveRequested(e.clone());
        if let Some(job) = self.jobs.get_mut(&e.job_id) {
            match job.redrives.last() {
                Some(r) if r.seq == seq => {
                    let (i, before) = (r.step_index, r.steps.clone());
                    replay_redrive(job, i, &before);
                    self.dirty.insert(e.job_id.clone());
                }
                _ => self.ignore(&ignored, Ignored::NotRedrivable),
            }
            return;
        }
        let Some(mut job) = stored.map(|j| *j) else {
            self.ignore(&ignored, Ignored::UnknownJob);
            return;
        };
        let Ok(i) = job.redrive_step(e.step.as_deref()) else {
            self.ignore(&ignored, Ignored::NotRedrivable);
            return;
        };
        let step = &job.steps[i];
        if step.kind == StepKind::Fanout && step.pending.len() != step.total {
            // Which of its subjobs completed is no longer stored.
            self.ignore(&ignored, Ignored::NotRedrivable);
            return;
        }
        job.pacing = self.pacing;
        start_run(&mut job, i, seq, e, now, out);
        self.dirty.insert(job.job_id.clone());
        self.jobs.insert(job.job_id.clone(), job);
    }

    fn event(&mut self, seq: u64, event: Event, now: Millis, out: &mut Vec<Action>) {
        if let Event::JobRejected(r) = &event {
            if !valid_job_id(&r.job_id) {
                self.ignore(&event, Ignored::InvalidJobId);
            } else if !self.jobs.contains_key(&r.job_id) {
                let job = Job::rejected(
                    &r.job_id,
                    r.workflow.as_deref(),
                    r.customer.clone(),
                    bounded(&r.reason, MAX_REASON_BYTES),
                    r.at,
                );
                self.dirty.insert(job.job_id.clone());
                self.jobs.insert(job.job_id.clone(), job);
            }
            return;
        }
        let Some(job) = self.jobs.get_mut(event.job_id()) else {
            // Unknown, or ended and unloaded: late or forged.
            self.ignore(&event, Ignored::UnknownJob);
            return;
        };
        if job.state.is_terminal() {
            self.ignore(&event, Ignored::JobEnded);
            return;
        }
        let replay = seq != 0 && seq <= job.applied_seq;
        let result = match &event {
            Event::SubjobsFailed(e) => subjobs_failed(job, seq, e, now, out),
            Event::CancelRequested(e) => Ok(cancel(job, e.clone(), now, out)),
            Event::UpdateRequested(e) => Ok(update(job, e, now, out)),
            _ => outcome(job, seq, &event, now, out),
        };
        if standings(job, &event).1 && self.held_early() < MAX_EARLY {
            let held = Early {
                seq,
                event: without_results(event.clone()),
                replay,
            };
            self.early
                .entry(event.job_id().to_string())
                .or_default()
                .push(held);
            if let Err(Ignored::NotDispatched) = result {
                self.ignore(&event, Ignored::Early);
                return;
            }
        }
        match result {
            Ok(true) => {
                if !self.dirty.contains(event.job_id()) {
                    self.dirty.insert(event.job_id().to_string());
                }
            }
            Ok(false) => {}
            Err(why) => self.ignore(&event, why),
        }
    }

    /// Two strikes: a job fails its in-flight subjobs only when it had no
    /// tasks at the previous check too, made no progress since, and its
    /// outcomes in the log were read back (else it stays suspected).
    fn no_tasks(&mut self, jobs: Vec<Unqueued>, now: Millis, out: &mut Vec<Action>) {
        let mut suspects = HashMap::new();
        for Unqueued {
            job_id: id,
            read_back,
        } in jobs
        {
            let Some(job) = self.jobs.get_mut(&id) else {
                continue;
            };
            if self.suspects.get(&id) == Some(&job.updated_at) && read_back {
                if lost(job, now, out) {
                    self.dirty.insert(id);
                }
            } else {
                suspects.insert(id, job.updated_at);
            }
        }
        self.suspects = suspects;
    }

    /// Checkpoints every changed job, unloads the ended ones, then
    /// acknowledges. A record that cannot be encoded (no job's can) keeps
    /// its job changed and holds the acknowledgement back, so its events
    /// are applied again rather than lost.
    fn save(&mut self, out: &mut Vec<Action>) {
        let mut unsaved = BTreeSet::new();
        for id in std::mem::take(&mut self.dirty) {
            let Some(job) = self.jobs.get_mut(&id) else {
                continue;
            };
            match Checkpoint::of(job) {
                Ok(cp) => {
                    if cp.ended {
                        self.unload(&id);
                    }
                    out.push(Action::Checkpoint(cp));
                }
                Err(_) => {
                    unsaved.insert(id);
                }
            }
        }
        if unsaved.is_empty() {
            out.push(Action::Ack);
        }
        self.dirty = unsaved;
    }

    fn ignore(&mut self, event: &Event, why: Ignored) {
        if event.kind().drives_manager() {
            *self.ignored.entry(why.as_str()).or_default() += 1;
        }
    }

    /// Events ignored since the last call, by reason (for a metric).
    pub fn take_ignored(&mut self) -> BTreeMap<&'static str, u64> {
        std::mem::take(&mut self.ignored)
    }
}

/// Why an event changed nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ignored {
    /// No such job here (never existed, or ended and unloaded).
    UnknownJob,
    /// The job has ended.
    JobEnded,
    /// The event is for a step that is not running (late, or forged).
    StepNotRunning,
    /// The subjob was never dispatched (forged, or a corrupt index).
    NotDispatched,
    /// The subjob is not dispatched yet: the outcome is held until it is
    /// ([`Engine::early`]).
    Early,
    /// The subjob's outcome was counted already.
    Duplicate,
    /// The job id is no subject token (only a client that writes the log
    /// directly can send one); no record could hold it.
    InvalidJobId,
    /// An outcome or decision of another run of the job (a late one).
    OtherRun,
    /// A redrive of a job that cannot be redriven (running, cancelled,
    /// nothing failed, its bitmap gone: [`Job::redrive_step`]).
    NotRedrivable,
}

impl Ignored {
    pub fn as_str(self) -> &'static str {
        match self {
            Ignored::UnknownJob => "unknown_job",
            Ignored::JobEnded => "job_ended",
            Ignored::StepNotRunning => "step_not_running",
            Ignored::NotDispatched => "not_dispatched",
            Ignored::Early => "not_dispatched_yet",
            Ignored::Duplicate => "duplicate",
            Ignored::InvalidJobId => "invalid_job_id",
            Ignored::OtherRun => "other_run",
            Ignored::NotRedrivable => "not_redrivable",
        }
    }
}

/// Whether a job may have this id: the intake lets no other through, and
/// its record and pending chunks are keyed by it.
pub fn valid_job_id(job_id: &str) -> bool {
    validate_token("job id", job_id).is_ok()
}

/// A subjob outcome's effect on a job: counts it (the handlers of each
/// kind); `Ok(false)` for other events.
fn outcome(
    job: &mut Job,
    seq: u64,
    event: &Event,
    now: Millis,
    out: &mut Vec<Action>,
) -> Result<bool, Ignored> {
    match event {
        Event::SubjobCompleted(e) => subjob_completed(job, seq, e.clone(), now, out),
        Event::SubjobFailed(e) => subjob_failed(job, seq, e.clone(), now, out),
        Event::SubjobsDone(e) => subjobs_done(job, seq, e, now, out),
        Event::SubjobsCompleted(e) => subjobs_completed(job, seq, e, now, out),
        // The manager's own output, read back: already applied.
        _ => Ok(false),
    }
}

/// Where one subjob of a job stands, for an outcome of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Standing {
    /// Dispatched, no outcome counted yet.
    Open,
    /// In the running fanout step, but not dispatched yet.
    Undispatched,
    /// Counted already, or not of the running step and run.
    Other,
}

fn standing(job: &Job, step_index: usize, index: u64, run: u32) -> Standing {
    let running = job.state == JobState::Running && job.current == step_index && run == job.run;
    match job.steps.get(step_index) {
        Some(s) if running && s.state == StepState::Running => {
            if index >= s.pending.len() || s.pending.is_done(index) {
                Standing::Other
            } else if index < s.dispatched {
                Standing::Open
            } else if s.kind == StepKind::Fanout {
                Standing::Undispatched
            } else {
                Standing::Other
            }
        }
        _ => Standing::Other,
    }
}

/// Whether any subjob an outcome event reports is open, and whether any
/// is undispatched ([`Standing`]). Only the subjobs of a batch's own
/// block count.
fn standings(job: &Job, event: &Event) -> (bool, bool) {
    let (step_index, run, indices): (usize, u32, Vec<u64>) = match event {
        Event::SubjobCompleted(e) => (e.step_index, e.run, vec![e.index]),
        Event::SubjobFailed(e) => (e.step_index, e.run, vec![e.index]),
        Event::SubjobsCompleted(e) => (
            e.step_index,
            e.run,
            e.outcomes.iter().map(|o| o.index).collect(),
        ),
        Event::SubjobsDone(e) => {
            let block = e.index..e.index.saturating_add(e.batch_size);
            let inside = e.outcomes.iter().map(|o| o.index);
            (
                e.step_index,
                e.run,
                inside.filter(|i| block.contains(i)).collect(),
            )
        }
        _ => return (false, false),
    };
    let mut seen = (false, false);
    for index in indices {
        match standing(job, step_index, index, run) {
            Standing::Open => seen.0 = true,
            Standing::Undispatched => seen.1 = true,
            Standing::Other => {}
        }
    }
    seen
}

/// A fanout outcome without its results, which only a task step's
/// outcome keeps (held outcomes are of fanout steps).
fn without_results(mut event: Event) -> Event {
    match &mut event {
        Event::SubjobCompleted(e) => e.result = Value::Null,
        Event::SubjobsCompleted(e) => e.outcomes.iter_mut().for_each(|o| o.result = Value::Null),
        Event::SubjobsDone(e) => e.outcomes.iter_mut().for_each(|o| o.result = Value::Null),
        _ => {}
    }
    event
}

/// Records a subjob's outcome once; the step it belongs to, or why not.
fn mark_outcome(
    job: &mut Job,
    step_index: usize,
    index: u64,
    run: u32,
    failed: bool,
) -> Result<&mut StepRun, Ignored> {
    if run != job.run {
        return Err(Ignored::OtherRun);
    }
    let step = running_step(job, step_index).ok_or(Ignored::StepNotRunning)?;
    if index >= step.dispatched {
        return Err(Ignored::NotDispatched);
    }
    match step.pending.mark(index, failed) {
        Mark::New => Ok(step),
        Mark::Seen => Err(Ignored::Duplicate),
        Mark::OutOfRange => Err(Ignored::NotDispatched),
    }
}

/// The step an event addresses, if it is the running one.
fn running_step(job: &mut Job, step_index: usize) -> Option<&mut StepRun> {
    if job.state != JobState::Running || job.current != step_index {
        return None;
    }
    job.steps
        .get_mut(step_index)
        .filter(|s| s.state == StepState::Running)
}

fn subjob_completed(
    job: &mut Job,
    seq: u64,
    e: SubjobCompleted,
    now: Millis,
    out: &mut Vec<Action>,
) -> Result<bool, Ignored> {
    let replayed = replayed(job, seq);
    let (step_index, run) = (e.step_index, e.run);
    count_completed(job, seq, step_index, run, &Completion::from(e), replayed)?;
    job.updated_at = now;
    after_outcome(job, now, out);
    Ok(true)
}

/// Completions reported together: each counts as its own event would; the
/// step then ends or refills once.
fn subjobs_completed(
    job: &mut Job,
    seq: u64,
    e: &SubjobsCompleted,
    now: Millis,
    out: &mut Vec<Action>,
) -> Result<bool, Ignored> {
    let replayed = replayed(job, seq);
    let mut counted = false;
    let mut why = Ignored::Duplicate;
    for c in &e.outcomes {
        match count_completed(job, seq, e.step_index, e.run, c, replayed) {
            Ok(()) => counted = true,
            Err(w) => why = w,
        }
    }
    if !counted {
        return Err(why);
    }
    job.updated_at = now;
    after_outcome(job, now, out);
    Ok(true)
}

/// Counts one subjob's completion (its first outcome of the running step).
fn count_completed(
    job: &mut Job,
    seq: u64,
    step_index: usize,
    run: u32,
    c: &Completion,
    replayed: bool,
) -> Result<(), Ignored> {
    let step = mark_outcome(job, step_index, c.index, run, false)?;
    step.completed += 1;
    let took = c.duration_ms as f64;
    step.pace.mean_ms = Some(step.pace.mean_ms.map_or(took, |m| 0.9 * m + 0.1 * took));
    if !replayed {
        step.retries += u64::from(c.attempt.saturating_sub(1));
    }
    if step.kind == StepKind::Task {
        step.output_seq = Some(seq);
        step.output_len = array_len(&c.result);
        if step_index + 1 == job.steps.len() {
            job.output = output(c.result.clone(), seq);
        }
    }
    Ok(())
}

fn subjob_failed(
    job: &mut Job,
    seq: u64,
    e: SubjobFailed,
    now: Millis,
    out: &mut Vec<Action>,
) -> Result<bool, Ignored> {
    let replayed = replayed(job, seq);
    let step = mark_outcome(job, e.step_index, e.index, e.run, true)?;
    step.failed += 1;
    // A replay is in the stored record's counts already; only its bit was lost.
    if !replayed {
        step.retries += u64::from(e.attempt.saturating_sub(1));
        if step.failures.len() < MAX_FAILURES_KEPT {
            step.failures.push(Failure {
                index: e.index,
                attempt: e.attempt,
                error: bounded(&e.error, MAX_ERROR_BYTES),
            });
        }
    }
    job.updated_at = now;
    after_outcome(job, now, out);
    Ok(true)
}

/// A batch's outcomes: each subjob of the batch's block counts once, as
/// its own outcome would; the step then ends, fails or refills once.
fn subjobs_done(
    job: &mut Job,
    seq: u64,
    e: &SubjobsDone,
    now: Millis,
    out: &mut Vec<Action>,
) -> Result<bool, Ignored> {
    let size = job
        .definition
        .steps
        .get(e.step_index)
        .map_or(1, |d| d.batch_size);
    if size <= 1 || e.batch_size != size || e.index % size != 0 {
        return Err(Ignored::NotDispatched);
    }
    let replayed = replayed(job, seq);
    let block = e.index..e.index.saturating_add(size);
    let each_ms = e.duration_ms as f64 / e.outcomes.len().max(1) as f64;
    let mut counted = false;
    let mut why = Ignored::Duplicate;
    for o in e.outcomes.iter().filter(|o| block.contains(&o.index)) {
        let failed = o.error.is_some();
        let step = match mark_outcome(job, e.step_index, o.index, e.run, failed) {
            Ok(step) => step,
            Err(w) => {
                why = w;
                continue;
            }
        };
        counted = true;
        if !replayed {
            step.retries += u64::from(o.attempt.saturating_sub(1));
        }
        match &o.error {
            Some(error) => {
                step.failed += 1;
                if !replayed && step.failures.len() < MAX_FAILURES_KEPT {
                    step.failures.push(Failure {
                        index: o.index,
                        attempt: o.attempt,
                        error: bounded(error, MAX_ERROR_BYTES),
                    });
                }
            }
            None => {
                step.completed += 1;
                step.pace.mean_ms = Some(
                    step.pace
                        .mean_ms
                        .map_or(each_ms, |m| 0.9 * m + 0.1 * each_ms),
                );
            }
        }
    }
    if !counted {
        return Err(why);
    }
    job.updated_at = now;
    after_outcome(job, now, out);
    Ok(true)
}

/// The manager's own decision, read back from the log: every subjob below
/// `below` without an outcome fails (past a deadline, also those never
/// dispatched, and the step's queued tasks are dropped).
fn subjobs_failed(
    job: &mut Job,
    seq: u64,
    e: &SubjobsFailed,
    now: Millis,
    out: &mut Vec<Action>,
) -> Result<bool, Ignored> {
    if e.run != job.run {
        return Err(Ignored::OtherRun);
    }
    let replayed = replayed(job, seq);
    let step = running_step(job, e.step_index).ok_or(Ignored::StepNotRunning)?;
    let below = match e.reason {
        AbandonReason::Deadline => step.total,
        AbandonReason::Lost => e.below.min(step.dispatched),
    };
    let first = step.pending.next_open(0, below);
    let mut n = 0;
    if let Some(first) = first {
        for i in first..below {
            if step.pending.mark(i, true) == Mark::New {
                n += 1;
            }
        }
    }
    let Some(index) = first.filter(|_| n > 0) else {
        return Err(Ignored::Duplicate);
    };
    step.failed += n;
    if !replayed && step.failures.len() < MAX_FAILURES_KEPT {
        step.failures.push(Failure {
            index,
            attempt: 0,
            error: bounded(&e.error, MAX_ERROR_BYTES),
        });
    }
    if e.reason == AbandonReason::Deadline {
        step.dispatched = step.total;
        step.carried = 0;
        out.push(Action::PurgeTasks {
            job_id: job.job_id.clone(),
        });
    }
    job.updated_at = now;
    after_outcome(job, now, out);
    Ok(true)
}

/// Whether an outcome at log sequence `seq` was counted before (the log is
/// read in order, so a sequence at or below the last one counted is a
/// replay after a restart); records `seq` otherwise. Sequence 0 (an outcome
/// made by the manager itself) is never a replay.
fn replayed(job: &mut Job, seq: u64) -> bool {
    if seq != 0 && seq <= job.applied_seq {
        return true;
    }
    job.applied_seq = job.applied_seq.max(seq);
    false
}

/// A job's output: the last step's result, unless it is larger than a
/// conforming worker sends inline (it would have stored it as a reference,
/// [`INLINE_RESULT_MAX`]); then where to read it in the log.
fn output(result: Value, seq: u64) -> Value {
    let bytes = serde_json::to_vec(&result)
        .map(|b| b.len())
        .unwrap_or(usize::MAX);
    if bytes <= INLINE_RESULT_MAX {
        return result;
    }
    json!({
        "omitted": format!("the result is {bytes} bytes, more than a record keeps inline ({INLINE_RESULT_MAX}); it is in the log"),
        "seq": seq,
    })
}

/// After a subjob outcome: fail the job past the tolerance, finish the step
/// when nothing is pending, or refill the in-flight window.
fn after_outcome(job: &mut Job, now: Millis, out: &mut Vec<Action>) {
    let i = job.current;
    let def = &job.definition.steps[i];
    let step = &job.steps[i];
    if step.failed > def.tolerate.allowed(step.total) {
        let reason = match step.failures.last() {
            Some(f) => format!(
                "step {:?}: {} of {} subjobs failed, more than tolerated ({}); last error (subjob {}): {}",
                step.name, step.failed, step.total, def.tolerate.allowed(step.total), f.index, f.error
            ),
            None => format!("step {:?}: {} of {} subjobs failed, more than tolerated", step.name, step.failed, step.total),
        };
        fail_job(job, reason, now, out);
    } else if step.completed + step.failed == step.total {
        finish_step(job, now, out);
    } else {
        meter(&mut job.steps[i], now);
        refill(job, out);
    }
}

/// Most subjobs a running step may have dispatched and unfinished: its
/// `max_in_flight`; for a paced fanout, its slots plus what it finishes in
/// the pacing's milliseconds (its slots again until it has been
/// measured; see below); under a cap, its slots and never above
/// its limit; nothing before it has a share.
fn window(pacing: Option<u64>, def: &Step, step: &StepRun) -> u64 {
    let (Some(ahead_ms), StepKind::Fanout) = (pacing, def.kind) else {
        return def.max_in_flight;
    };
    let Some(slots) = step.pace.slots else {
        return 0;
    };
    if slots == 0 {
        return 0;
    }
    // What it finishes in `ahead_ms`: at its measured rate, and at most
    // what its slots finish at its subjobs' mean duration (a burst of
    // outcomes read at once measures a rate no worker keeps up).
    let ahead_ms = ahead_ms as f64;
    let by_rate = step.pace.rate.map(|r| r * ahead_ms / 1000.0);
    let by_slots = step
        .pace
        .mean_ms
        .map(|m| slots as f64 * ahead_ms / m.max(1.0));
    let ahead = match (step.pace.limit, by_rate, by_slots) {
        // Under a cap, queued tasks count against it: none ahead.
        (Some(_), _, _) => 0,
        (None, None, None) => slots,
        (None, Some(a), Some(b)) => a.min(b).ceil() as u64,
        (None, Some(a), None) | (None, None, Some(a)) => a.ceil() as u64,
    }
    .max(1);
    // A slot works on a batch's subjobs at once.
    slots
        .saturating_mul(def.batch_size.max(1))
        .saturating_add(ahead)
        .min(step.pace.limit.unwrap_or(u64::MAX))
        .min(def.max_in_flight)
}

/// Measures how fast a step finishes its subjobs (for the pacing).
fn meter(step: &mut StepRun, now: Millis) {
    let done = step.completed + step.failed;
    let pace = &mut step.pace;
    if pace.measured_at == 0 || done < pace.measured_done {
        pace.measured_at = now;
        pace.measured_done = done;
        return;
    }
    let dt = now.saturating_sub(pace.measured_at);
    if dt < 100 {
        return;
    }
    let now_rate = (done - pace.measured_done) as f64 * 1000.0 / dt as f64;
    pace.rate = Some(match pace.rate {
        None => now_rate,
        Some(r) => (r + now_rate) / 2.0,
    });
    pace.measured_at = now;
    pace.measured_done = done;
}

/// A running fanout's claim on its step's slots.
fn demand(job: &Job, now: Millis) -> Option<JobDemand> {
    let def = job.definition.steps.get(job.current)?;
    let step = job.steps.get(job.current)?;
    if job.state != JobState::Running
        || step.state != StepState::Running
        || def.kind != StepKind::Fanout
    {
        return None;
    }
    let unfinished = step.total.saturating_sub(step.completed + step.failed);
    // A paused job wants nothing more.
    let want = match job.paused_at {
        Some(_) => 0,
        None => unfinished.min(def.max_in_flight),
    };
    Some(JobDemand {
        job_id: job.job_id.clone(),
        customer: job.customer.clone(),
        priority: job.priority,
        want,
        holds: in_flight(job),
        unfinished,
        since: step.started_at.unwrap_or(now),
        waiting_since: None,
    })
}

/// The step a job runs now, as the shares name it.
fn step_key(job: &Job) -> String {
    let step = job
        .steps
        .get(job.current)
        .map(|s| s.name.as_str())
        .unwrap_or("");
    format!("{}.{}", job.workflow, step)
}

/// Enqueues the next slice of the running fanout if its window has room.
fn refill(job: &mut Job, out: &mut Vec<Action>) {
    let i = job.current;
    let def = &job.definition.steps[i];
    let step = &mut job.steps[i];
    if step.state != StepState::Running || step.dispatched >= step.total || job.paused_at.is_some()
    {
        return;
    }
    let in_flight = step_in_flight(step);
    let window = window(job.pacing, def, step);
    let room = window.saturating_sub(in_flight);
    // Subjobs still to dispatch (a redriven step skips those it carries).
    let rest = (step.total - step.dispatched).saturating_sub(step.carried);
    if rest == 0 {
        return;
    }
    // Paced windows are small: a quarter of one is a batch.
    let batch = match job.pacing {
        Some(_) => (window / 4).clamp(1, MIN_REFILL),
        None => MIN_REFILL.min(def.max_in_flight),
    };
    if room == 0 || (room < batch && room < rest) {
        return;
    }
    let from = step.dispatched;
    let n = room.min(rest);
    // A batched step dispatches whole blocks where the window allows (a
    // block cut at the window's edge goes as two tasks).
    let size = def.batch_size.max(1);
    let whole = |to: u64| match to - to % size {
        cut if size > 1 && to < step.total && cut > from => cut,
        _ => to,
    };
    let (to, indices) = match step.carried {
        0 => (whole(from + n), None),
        _ => {
            // Past the subjobs that completed in an earlier run.
            let mut indices = Vec::with_capacity(n as usize);
            let mut at = from;
            while (indices.len() as u64) < n && at < step.total {
                if step.pending.is_done(at) {
                    step.carried = step.carried.saturating_sub(1);
                } else {
                    indices.push(at);
                }
                at += 1;
            }
            (at, Some(indices))
        }
    };
    step.dispatched = to;
    let Some(source) = step.source.clone() else {
        return;
    };
    out.push(Action::Dispatch(Dispatch {
        job_id: job.job_id.clone(),
        workflow: job.workflow.clone(),
        step_index: i,
        step: def.clone(),
        total: step.total,
        from,
        to,
        indices,
        run: job.run,
        source,
    }));
}

fn start_step(
    job: &mut Job,
    i: usize,
    source: Source,
    len: Option<u64>,
    now: Millis,
    out: &mut Vec<Action>,
) {
    job.current = i;
    let def = job.definition.steps[i].clone();
    let total = match def.kind {
        StepKind::Task => 1,
        StepKind::Fanout => match len {
            Some(n) if n > def.max_subjobs => {
                let reason = format!(
                    "step {:?} would split into {n} subjobs, more than its limit of {} (max_subjobs)",
                    def.name, def.max_subjobs
                );
                job.steps[i].state = StepState::Running;
                job.steps[i].started_at = Some(now);
                fail_job(job, reason, now, out);
                return;
            }
            Some(n) => n,
            None => {
                let reason = format!(
                    "step {:?} is a fanout, but its input (the previous step's result, or the job's input for a first step) is not a JSON array",
                    def.name
                );
                job.steps[i].state = StepState::Running;
                job.steps[i].started_at = Some(now);
                fail_job(job, reason, now, out);
                return;
            }
        },
    };
    let step = &mut job.steps[i];
    step.state = StepState::Running;
    step.total = total;
    step.pending = Pending::new(total);
    step.started_at = Some(now);
    step.source = Some(source);
    out.push(Action::Publish(step_started_event(job, i, now)));
    if total == 0 {
        finish_step(job, now, out);
    } else {
        refill(job, out);
    }
}

fn finish_step(job: &mut Job, now: Millis, out: &mut Vec<Action>) {
    let i = job.current;
    let step = &mut job.steps[i];
    step.state = StepState::Completed;
    step.finished_at = Some(now);
    out.push(Action::Publish(Event::StepCompleted(step_completed_event(
        &job.job_id,
        &job.workflow,
        job.run,
        i,
        step,
        true,
        now,
    ))));
    let (source, len) = match (step.kind, step.output_seq) {
        (StepKind::Task, Some(seq)) => (
            Source::Event {
                seq,
                field: SourceField::Result,
            },
            step.output_len,
        ),
        // A task step whose one run failed, within its tolerance: no result.
        (StepKind::Task, None) => (Source::Inline(Value::Null), None),
        (StepKind::Fanout, _) => (Source::Inline(fanout_summary(&job.job_id, i, step)), None),
    };
    if i + 1 < job.steps.len() {
        start_step(job, i + 1, source, len, now, out);
        return;
    }
    if let Source::Inline(summary) = source {
        job.output = summary;
    }
    job.state = JobState::Completed;
    job.finished_at = Some(now);
    job.updated_at = now;
    out.push(Action::Publish(Event::JobCompleted(JobCompleted {
        job_id: job.job_id.clone(),
        workflow: job.workflow.clone(),
        output: job.output.clone(),
        run: job.run,
        at: now,
    })));
}

/// Step `i` of `job` started, in the job's current run.
fn step_started_event(job: &Job, i: usize, now: Millis) -> Event {
    let step = &job.steps[i];
    Event::StepStarted(StepStarted {
        job_id: job.job_id.clone(),
        workflow: job.workflow.clone(),
        step: step.name.clone(),
        step_index: i,
        total: step.total,
        run: job.run,
        at: now,
    })
}

fn step_completed_event(
    job_id: &str,
    workflow: &str,
    run: u32,
    i: usize,
    step: &StepRun,
    ok: bool,
    now: Millis,
) -> StepCompleted {
    StepCompleted {
        job_id: job_id.to_string(),
        workflow: workflow.to_string(),
        step: step.name.clone(),
        step_index: i,
        ok,
        total: step.total,
        completed: step.completed,
        failed: step.failed,
        retries: step.retries,
        started_at: step.started_at.unwrap_or(now),
        run,
        at: now,
    }
}

/// What a task step after a fanout receives as input.
fn fanout_summary(job_id: &str, i: usize, step: &StepRun) -> Value {
    json!({
        "step": step.name,
        "step_index": i,
        "total": step.total,
        "completed": step.completed,
        "failed": step.failed,
        "retries": step.retries,
        "failures": step.failures.iter().take(MAX_FAILURES_PASSED_ON).collect::<Vec<_>>(),
        "results": {
            "stream": events_stream(job_cell(job_id)),
            "subject": event_subject(job_id, EventKind::SubjobCompleted.token()),
            "step_index": i,
        },
    })
}

/// Starts the job's next run from step `i` (chosen by
/// [`Job::redrive_step`]; a fanout's bitmap is loaded): the run before's
/// figures go to `redrives`, the step forgets its failures and runs again
/// for the subjobs that did not complete, the steps after it start over.
fn start_run(
    job: &mut Job,
    i: usize,
    seq: u64,
    e: RedriveRequested,
    now: Millis,
    out: &mut Vec<Action>,
) {
    let figures = job.steps[i..]
        .iter()
        .map(|s| RunFigures {
            state: s.state,
            total: s.total,
            completed: s.completed,
            failed: s.failed,
            retries: s.retries,
        })
        .collect::<Vec<_>>();
    let reason = e.reason.map(|r| bounded(&r, MAX_REASON_BYTES));
    let state_before = job.state;
    job.run += 1;
    job.state = JobState::Running;
    job.current = i;
    job.finished_at = None;
    job.output = Value::Null;
    job.paused_at = None;
    job.updated_at = now;
    // A fresh deadline: the old one has passed or nearly.
    job.deadline_at = job.definition.deadline_ms.map(|d| now.saturating_add(d));
    for k in i + 1..job.steps.len() {
        let s = &mut job.steps[k];
        let discard = match s.kind {
            StepKind::Fanout => Job::chunks_of(s.total),
            StepKind::Task => 0,
        };
        *s = StepRun::new(s.name.clone(), s.kind);
        s.discard_chunks = discard;
    }
    let step = &mut job.steps[i];
    match step.kind {
        StepKind::Fanout => {
            step.pending.forget_failed();
            let (completed, _) = step.pending.counts();
            step.completed = completed;
            step.carried = completed;
        }
        StepKind::Task => {
            step.pending = Pending::new(1);
            step.completed = 0;
            step.carried = 0;
            step.output_seq = None;
            step.output_len = None;
        }
    }
    let subjobs = step.total - step.completed;
    step.failed = 0;
    step.dispatched = 0;
    step.failures.clear();
    step.state = StepState::Running;
    step.started_at = Some(now);
    step.finished_at = None;
    step.share = None;
    step.pace = Pace::default();
    let error = job.error.take();
    job.redrives.push(Redrive {
        run: job.run,
        step_index: i,
        subjobs,
        at: now,
        seq,
        reason: reason.clone(),
        state: state_before,
        error,
        steps: figures,
    });
    out.push(Action::Publish(Event::JobRedriven(JobRedriven {
        job_id: job.job_id.clone(),
        workflow: job.workflow.clone(),
        run: job.run,
        step: step.name.clone(),
        step_index: i,
        subjobs,
        reason,
        at: now,
    })));
    out.push(Action::Publish(step_started_event(job, i, now)));
    if subjobs == 0 {
        finish_step(job, now, out);
    } else {
        refill(job, out);
    }
}

/// A redrive read again after a crash: the record had its run, but the
/// bitmap may still hold the run before's failures (the record is stored
/// first), and the chunks of the steps after it may still be there.
fn replay_redrive(job: &mut Job, i: usize, before: &[RunFigures]) {
    let current = job.current == i && job.state == JobState::Running;
    if let Some(step) = job.steps.get_mut(i).filter(|_| current) {
        if step.kind == StepKind::Fanout && step.state == StepState::Running {
            step.pending.forget_failed();
            let (completed, failed) = step.pending.counts();
            step.completed = completed;
            step.failed = failed;
        }
    }
    for (k, fig) in before.iter().enumerate().skip(1) {
        if let Some(s) = job.steps.get_mut(i + k) {
            if s.state == StepState::Pending && s.kind == StepKind::Fanout {
                s.discard_chunks = Job::chunks_of(fig.total);
            }
        }
    }
}

fn fail_job(job: &mut Job, reason: String, now: Millis, out: &mut Vec<Action>) {
    let reason = bounded(&reason, MAX_REASON_BYTES);
    let i = job.current;
    if let Some(step) = job.steps.get_mut(i) {
        step.state = StepState::Failed;
        step.finished_at = Some(now);
        out.push(Action::Publish(Event::StepCompleted(step_completed_event(
            &job.job_id,
            &job.workflow,
            job.run,
            i,
            step,
            false,
            now,
        ))));
    }
    job.state = JobState::Failed;
    job.error = Some(reason.clone());
    job.finished_at = Some(now);
    job.updated_at = now;
    out.push(Action::PurgeTasks {
        job_id: job.job_id.clone(),
    });
    out.push(Action::Publish(Event::JobFailed(JobFailed {
        job_id: job.job_id.clone(),
        workflow: job.workflow.clone(),
        error: reason,
        run: job.run,
        at: now,
    })));
}

fn cancel(job: &mut Job, e: CancelRequested, now: Millis, out: &mut Vec<Action>) -> bool {
    if let Some(step) = job.steps.get_mut(job.current) {
        if step.state == StepState::Running {
            step.state = StepState::Cancelled;
            step.finished_at = Some(now);
        }
    }
    let reason = e.reason.map(|r| bounded(&r, MAX_REASON_BYTES));
    job.state = JobState::Cancelled;
    job.error = reason.clone().or_else(|| Some("cancelled".into()));
    job.finished_at = Some(now);
    job.updated_at = now;
    out.push(Action::PurgeTasks {
        job_id: job.job_id.clone(),
    });
    out.push(Action::Publish(Event::JobCancelled(JobCancelled {
        job_id: job.job_id.clone(),
        workflow: job.workflow.clone(),
        reason,
        at: now,
    })));
    true
}

/// A change to a running job: pause or resume its dispatching, its window,
/// its tolerance (for its running step and the ones after). A tolerance
/// lowered below the failures counted fails the job now; a resumed job
/// dispatches at once. Read back again (a replay), it changes nothing more.
fn update(job: &mut Job, e: &UpdateRequested, now: Millis, out: &mut Vec<Action>) -> bool {
    let before = (job.paused_at, job.definition.clone());
    match e.paused {
        Some(true) if job.paused_at.is_none() => job.paused_at = Some(e.at),
        Some(false) => job.paused_at = None,
        _ => {}
    }
    let from = job.current;
    for step in job.definition.steps.iter_mut().skip(from) {
        if let Some(n) = e.max_in_flight.filter(|n| *n >= 1) {
            step.max_in_flight = n;
        }
        if let Some(t) = e.tolerate.filter(|t| t.is_valid()) {
            step.tolerate = t;
        }
    }
    if job.paused_at == before.0 && job.definition == before.1 {
        return false;
    }
    job.updated_at = now;
    let i = job.current;
    let (failed, total) = (job.steps[i].failed, job.steps[i].total);
    let allowed = job.definition.steps[i].tolerate.allowed(total);
    if job.steps[i].state == StepState::Running && failed > allowed {
        let reason = format!(
            "step {:?}: {failed} of {total} subjobs failed, more than now tolerated ({allowed})",
            job.steps[i].name
        );
        fail_job(job, reason, now, out);
    } else {
        refill(job, out);
    }
    true
}

/// Subjobs dispatched and unfinished, for a running job's current step.
pub fn in_flight(job: &Job) -> u64 {
    match job.steps.get(job.current) {
        Some(s) if job.state == JobState::Running && s.state == StepState::Running => {
            step_in_flight(s)
        }
        _ => 0,
    }
}

/// Subjobs of a step dispatched and unfinished: below its dispatch cursor,
/// those without an outcome (what it carries lies past the cursor).
fn step_in_flight(s: &StepRun) -> u64 {
    let finished_below = (s.completed + s.failed).saturating_sub(s.carried);
    s.dispatched.saturating_sub(finished_below)
}

/// Decides that a job's in-flight subjobs are lost: they fail now, and the
/// decision goes to the log (read back, it finds them failed already).
fn lost(job: &mut Job, now: Millis, out: &mut Vec<Action>) -> bool {
    let n = in_flight(job);
    if n == 0 {
        return false;
    }
    let decision = SubjobsFailed {
        job_id: job.job_id.clone(),
        step_index: job.current,
        below: job.steps[job.current].dispatched,
        run: job.run,
        reason: AbandonReason::Lost,
        error: format!("{n} subjobs lost: their tasks are no longer in the work queue and no outcome was reported"),
        at: now,
    };
    decide(job, decision, now, out)
}

/// The manager's own decision to fail subjobs: published first, so that
/// every reader of the log sees it where it counts, then applied at once
/// (reading it back changes nothing; after a crash, it applies it then).
fn decide(job: &mut Job, decision: SubjobsFailed, now: Millis, out: &mut Vec<Action>) -> bool {
    out.push(Action::Publish(Event::SubjobsFailed(decision.clone())));
    subjobs_failed(job, 0, &decision, now, out).is_ok()
}

/// Deadline and window checks for one running job; true when it changed.
fn tick(job: &mut Job, now: Millis, out: &mut Vec<Action>) -> bool {
    let i = job.current;
    let Some(def) = job.definition.steps.get(i) else {
        return false;
    };
    let step = &mut job.steps[i];
    if step.state != StepState::Running {
        return false;
    }
    if let (Some(deadline), Some(started)) = (def.deadline_ms, step.started_at) {
        if now >= started.saturating_add(deadline) {
            let unfinished = step.total.saturating_sub(step.completed + step.failed);
            let decision = SubjobsFailed {
                job_id: job.job_id.clone(),
                step_index: i,
                below: step.total,
                run: job.run,
                reason: AbandonReason::Deadline,
                error: format!(
                    "step deadline of {deadline} ms passed with {unfinished} subjobs unfinished"
                ),
                at: now,
            };
            return decide(job, decision, now, out);
        }
    }
    let before = out.len();
    refill(job, out);
    out.len() > before
}

#[cfg(test)]
mod fuzz;
#[cfg(test)]
mod tests;
