//! The statistics consumer: a projection of the event log, separate from
//! the manager, that keeps per-job statistics in the `fanjet_stats` bucket
//! (attempt histograms, subjob duration percentiles, throughput) and feeds
//! the Prometheus counters.
//!
//! Each record remembers the last log sequence it applied, so replaying
//! after a restart counts nothing twice. It counts subjob outcomes by the
//! manager's rules, in the same log order: the first outcome of each subjob
//! while its step runs (a bitmap per running step, in memory), the
//! subjobs a `SubjobsFailed` fails, nothing after the step ended or a
//! cancellation was asked for. A step's
//! end (`StepCompleted`, with the manager's counts) settles its figures, so
//! they equal the job record even when a restart of this consumer lost a
//! running step's bitmap. A record is read back from the bucket's leader
//! before it is updated (a replica behind it could answer with none), and
//! a job with no record gets one seeded from its job record, with the
//! figures and outcome of a job that ended.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::Message;
use thiserror::Error;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::metrics::Metrics;
use crate::nats::log::{stream_seq, Batch, LogError, Reader};
use crate::nats::store::{self, StoreError};
use crate::nats::Nats;
use crate::protocol::{
    capacity, cell_events_subjects, AbandonReason, Event, JobStats, Mark, Millis, Pending,
    StepStats, TaskKey, CELLS, STATS_CONSUMER,
};
use crate::shutdown::supervise;

impl StepStats {
    /// Whether this is the first outcome of subjob `index` while the step
    /// runs: the manager ignores the others (duplicates, late ones).
    fn first_outcome(&mut self, index: u64, failed: bool) -> bool {
        if self.finished_at.is_some() || (self.total > 0 && index >= self.total) {
            return false;
        }
        if self.total == 0 {
            return true; // the step's start was not seen: count as it comes
        }
        let total = self.total;
        let seen = self.seen.get_or_insert_with(|| Pending::new(total));
        seen.mark(index, failed) == Mark::New
    }
}

#[derive(Debug, Error)]
pub enum StatsError {
    #[error(transparent)]
    Log(#[from] LogError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("NATS: {0}")]
    Nats(String),
}

impl JobStats {
    /// Completions of step `step_index` (index, attempt, duration in ms):
    /// each subjob's first outcome counts, in the record and the metrics.
    fn count_completions(
        &mut self,
        step_index: usize,
        done: impl IntoIterator<Item = (u64, u32, u64)>,
        metrics: &Metrics,
    ) {
        let name = self.step_name(step_index);
        let workflow = self.workflow.clone();
        let labels = [workflow.as_str(), name.as_str()];
        let s = self.step(step_index);
        let (mut completed, mut retries, mut duration) = (0, 0, None);
        for (index, attempt, ms) in done {
            if !s.first_outcome(index, false) {
                continue;
            }
            s.completed += 1;
            s.record_attempt(attempt);
            s.record_duration(ms);
            completed += 1;
            retries += u64::from(attempt.saturating_sub(1));
            duration
                .get_or_insert_with(|| metrics.subjob_duration.with_label_values(&labels))
                .observe(ms as f64 / 1000.0);
        }
        if completed > 0 {
            metrics
                .subjobs_completed
                .with_label_values(&labels)
                .inc_by(completed);
            metrics
                .subjob_retries
                .with_label_values(&labels)
                .inc_by(retries);
        }
    }

    /// Applies one event; updates the metrics. False when already applied.
    pub fn apply(&mut self, seq: u64, event: &Event, metrics: &Metrics) -> bool {
        if seq <= self.applied_seq {
            return false;
        }
        self.applied_seq = seq;
        metrics
            .events_observed
            .with_label_values(&[event.kind().token()])
            .inc();
        let outcome = matches!(
            event,
            Event::SubjobCompleted(_)
                | Event::SubjobFailed(_)
                | Event::SubjobsDone(_)
                | Event::SubjobsCompleted(_)
                | Event::SubjobsFailed(_)
        );
        if outcome && event.run() != Some(self.run) {
            // A late outcome of a run before a redrive.
            return true;
        }
        if outcome && (self.outcome.is_some() || self.cancel_requested_at.is_some()) {
            // After the job's end, or a request to cancel it, the manager
            // counts no outcome.
            return true;
        }
        match event {
            Event::JobRequested(e) => {
                self.workflow = e.workflow.clone();
                self.requested_at = Some(e.at);
                self.deadline_at = e.deadline_at;
                metrics
                    .jobs_submitted
                    .with_label_values(&[&e.workflow])
                    .inc();
            }
            Event::StepStarted(e) => {
                if !e.workflow.is_empty() {
                    self.workflow = e.workflow.clone();
                }
                let s = self.step(e.step_index);
                s.name = e.step.clone();
                s.started_at = Some(e.at);
                s.total = e.total;
            }
            Event::StepCompleted(e) => {
                let workflow = self.workflow.clone();
                let s = self.step(e.step_index);
                s.name = e.step.clone();
                s.finished_at = Some(e.at);
                s.seen = None;
                let labels = [workflow.as_str(), e.step.as_str()];
                // The manager's counts settle the step's.
                if e.completed > s.completed {
                    metrics
                        .subjobs_completed
                        .with_label_values(&labels)
                        .inc_by(e.completed - s.completed);
                }
                if e.failed > s.failed {
                    metrics
                        .subjobs_failed
                        .with_label_values(&labels)
                        .inc_by(e.failed - s.failed);
                }
                if (s.completed, s.failed) != (e.completed, e.failed) {
                    debug!(
                        job_id = %e.job_id,
                        step = e.step_index,
                        counted = ?(s.completed, s.failed),
                        manager = ?(e.completed, e.failed),
                        "step figures settled from the manager's"
                    );
                }
                (s.total, s.completed, s.failed, s.retries) =
                    (e.total, e.completed, e.failed, e.retries);
                let secs = e.at.saturating_sub(e.started_at) as f64 / 1000.0;
                let outcome = if e.ok { "ok" } else { "failed" };
                metrics
                    .step_duration
                    .with_label_values(&[&workflow, &e.step, outcome])
                    .observe(secs);
            }
            Event::SubjobCompleted(e) => {
                let done = [(e.index, e.attempt, e.duration_ms)];
                self.count_completions(e.step_index, done, metrics);
            }
            Event::SubjobFailed(e) => {
                let name = self.step_name(e.step_index);
                let s = self.step(e.step_index);
                if !s.first_outcome(e.index, true) {
                    return true;
                }
                s.failed += 1;
                s.record_attempt(e.attempt);
                let labels = [self.workflow.as_str(), name.as_str()];
                metrics.subjobs_failed.with_label_values(&labels).inc();
                metrics
                    .subjob_retries
                    .with_label_values(&labels)
                    .inc_by(u64::from(e.attempt.saturating_sub(1)));
            }
            Event::SubjobsDone(e) => {
                let name = self.step_name(e.step_index);
                let workflow = self.workflow.clone();
                let labels = [workflow.as_str(), name.as_str()];
                let s = self.step(e.step_index);
                let each_ms = e.duration_ms / (e.outcomes.len().max(1) as u64);
                let (mut completed, mut failed, mut retries) = (0, 0, 0);
                for o in &e.outcomes {
                    let is_failed = o.error.is_some();
                    if !s.first_outcome(o.index, is_failed) {
                        continue;
                    }
                    s.record_attempt(o.attempt);
                    retries += u64::from(o.attempt.saturating_sub(1));
                    if is_failed {
                        s.failed += 1;
                        failed += 1;
                    } else {
                        s.completed += 1;
                        completed += 1;
                        s.record_duration(each_ms);
                        metrics
                            .subjob_duration
                            .with_label_values(&labels)
                            .observe(each_ms as f64 / 1000.0);
                    }
                }
                metrics
                    .subjobs_completed
                    .with_label_values(&labels)
                    .inc_by(completed);
                metrics
                    .subjobs_failed
                    .with_label_values(&labels)
                    .inc_by(failed);
                metrics
                    .subjob_retries
                    .with_label_values(&labels)
                    .inc_by(retries);
            }
            Event::SubjobsCompleted(e) => {
                let done = e
                    .outcomes
                    .iter()
                    .map(|o| (o.index, o.attempt, o.duration_ms));
                self.count_completions(e.step_index, done, metrics);
            }
            Event::SubjobsFailed(e) => {
                let name = self.step_name(e.step_index);
                let s = self.step(e.step_index);
                let below = match e.reason {
                    AbandonReason::Deadline => s.total,
                    AbandonReason::Lost => e.below.min(s.total),
                };
                let mut n = 0;
                for i in 0..below {
                    if s.first_outcome(i, true) {
                        n += 1;
                    }
                }
                s.failed += n;
                let labels = [self.workflow.as_str(), name.as_str()];
                metrics.subjobs_failed.with_label_values(&labels).inc_by(n);
            }
            Event::JobCompleted(e) => self.finish("completed", e.at, metrics),
            Event::JobFailed(e) => self.finish("failed", e.at, metrics),
            Event::JobCancelled(e) => self.finish("cancelled", e.at, metrics),
            Event::JobRejected(e) => {
                if let Some(w) = &e.workflow {
                    self.workflow = w.clone();
                }
                self.finish("rejected", e.at, metrics);
            }
            Event::CancelRequested(e) => {
                self.cancel_requested_at.get_or_insert(e.at);
            }
            // Pausing or changing a job's window or tolerance counts
            // nothing; nor does a request to redrive (the manager's
            // `JobRedriven` says whether it runs again).
            Event::UpdateRequested(_) | Event::RedriveRequested(_) => {}
            Event::JobRedriven(e) => {
                // As the manager does: the step forgets its failures and
                // runs again for the rest; the steps after it start over.
                self.run = e.run;
                self.outcome = None;
                self.finished_at = None;
                let s = self.step(e.step_index);
                s.failed = 0;
                s.finished_at = None;
                s.seen = None;
                self.steps.truncate(e.step_index + 1);
            }
        }
        true
    }

    fn finish(&mut self, outcome: &str, at: Millis, metrics: &Metrics) {
        for s in &mut self.steps {
            s.seen = None;
        }
        if self.outcome.is_some() {
            return;
        }
        self.outcome = Some(outcome.to_string());
        self.finished_at = Some(at);
        metrics
            .jobs_finished
            .with_label_values(&[&self.workflow, outcome])
            .inc();
        if let Some(start) = self.requested_at {
            metrics
                .job_duration
                .with_label_values(&[&self.workflow, outcome])
                .observe(at.saturating_sub(start) as f64 / 1000.0);
        }
    }
}

/// Runs the statistics consumer until `cancel`.
pub async fn run(nats: Nats, cancel: CancellationToken) -> Result<(), StatsError> {
    let nats = nats
        .with_task_key()
        .await
        .map_err(|e| StatsError::Nats(e.to_string()))?;
    let Some(key) = nats.task_key.clone() else {
        return Err(StatsError::Nats("the task token key was not read".into()));
    };
    // A reader per cell, each started again alone when it fails (its
    // cell's log electing a leader stops none of the others). A job's
    // events are all in its cell, so their records are apart too.
    let mut cells = JoinSet::new();
    for cell in 0..CELLS {
        let (n, k, c) = (nats.clone(), key.clone(), cancel.clone());
        cells.spawn(supervise("statistics", cancel.clone(), move || {
            run_cell(n.clone(), k.clone(), cell, c.clone())
        }));
    }
    while cells.join_next().await.is_some() {}
    Ok(())
}

/// Reads one cell's log into statistics until `cancel`.
async fn run_cell(
    nats: Nats,
    key: TaskKey,
    cell: u32,
    cancel: CancellationToken,
) -> Result<(), StatsError> {
    let open = || {
        Reader::open(
            &nats,
            cell,
            STATS_CONSUMER,
            cell_events_subjects(cell),
            2000,
            "statistics",
            None,
        )
    };
    let mut reader = Some(open().await?);
    let metrics = Metrics::get();
    let mut jobs: HashMap<String, JobStats> = HashMap::new();
    let mut dirty: Vec<String> = Vec::new();
    let mut unacked: Option<Message> = None;
    let mut saver = tokio::time::interval(Duration::from_millis(500));
    info!(cell, "statistics consumer running");
    loop {
        // After a hole: the reader before is gone (its pull with it) before
        // the next one opens.
        let reading = match reader.as_mut() {
            Some(r) => r,
            None => reader.insert(open().await?),
        };
        tokio::select! {
            _ = cancel.cancelled() => {
                save(&nats, cell, &mut jobs, &mut dirty, &mut unacked).await?;
                return Ok(());
            }
            _ = saver.tick() => save(&nats, cell, &mut jobs, &mut dirty, &mut unacked).await?,
            batch = reading.next_batch() => {
                let Batch { mut messages, hole } = batch?;
                for msg in &messages {
                    let Ok(event) = serde_json::from_slice::<Event>(&msg.payload) else {
                        warn!(subject = %msg.subject, "statistics: skipping an unreadable event");
                        continue;
                    };
                    // What the manager drops is not counted either.
                    if !event.is_stored_on(&msg.subject) || !key.admits(&event) {
                        debug!(subject = %msg.subject, "statistics: skipping a misplaced event or an outcome without its token");
                        continue;
                    }
                    let id = event.job_id().to_string();
                    if !jobs.contains_key(&id) {
                        let loaded = match store::stats_to_update(&nats, &id).await? {
                            Some(s) => s,
                            None => seed(&nats, &id).await,
                        };
                        jobs.insert(id.clone(), loaded);
                    }
                    if let Some(stats) = jobs.get_mut(&id) {
                        if stats.apply(stream_seq(msg), &event, metrics) {
                            dirty.push(id);
                        }
                    }
                }
                if let Some(last) = messages.pop() {
                    unacked = Some(last);
                }
                if let Some(hole) = hole {
                    // Applying past the hole would mark the missing event
                    // as seen; save, and read again from the ack floor
                    // (at once: a hole is no failure of this consumer).
                    save(&nats, cell, &mut jobs, &mut dirty, &mut unacked).await?;
                    debug!(%hole, "statistics: reading again from the last acknowledged event");
                    reader = None;
                }
            }
        }
    }
}

/// A fresh record, for a job this consumer has no record of (it joined
/// late, or the record could not be read): names from the job's record
/// and, if the job has ended, its figures and outcome, so that late
/// outcomes of an ended job count nothing, as the manager counts them.
async fn seed(nats: &Nats, job_id: &str) -> JobStats {
    let mut s = JobStats {
        job_id: job_id.to_string(),
        ..Default::default()
    };
    if let Ok(Some((job, _))) = store::latest(nats, job_id).await {
        s.workflow = job.workflow.clone();
        s.requested_at = Some(job.created_at);
        s.run = job.run;
        let ended = job.state.is_terminal();
        s.steps = job
            .steps
            .iter()
            .map(|st| StepStats {
                name: st.name.clone(),
                ..Default::default()
            })
            .collect();
        if ended {
            for (stats, st) in s.steps.iter_mut().zip(&job.steps) {
                (stats.started_at, stats.finished_at) = (st.started_at, st.finished_at);
                (stats.total, stats.completed, stats.failed, stats.retries) =
                    (st.total, st.completed, st.failed, st.retries);
            }
            s.outcome = Some(job.state.as_str().to_string());
            s.finished_at = job.finished_at;
        }
    }
    s
}

/// Stores what changed of one cell's records, then acknowledges.
async fn save(
    nats: &Nats,
    cell: u32,
    jobs: &mut HashMap<String, JobStats>,
    dirty: &mut Vec<String>,
    unacked: &mut Option<Message>,
) -> Result<(), StatsError> {
    dirty.sort();
    dirty.dedup();
    for id in dirty.drain(..) {
        if let Some(s) = jobs.get(&id) {
            store::put_stats(nats, &id, s).await?;
            if s.outcome.is_some() {
                jobs.remove(&id);
            }
        }
    }
    if let Some(m) = unacked.take() {
        m.ack().await.map_err(|e| StatsError::Nats(e.to_string()))?;
    }
    capacity_gauges(cell, jobs.values(), crate::protocol::now_ms());
    // Running jobs stay in memory (with their steps' bitmaps); ended ones
    // left above. A bound in case the log holds jobs no manager will end:
    // dropped records are reloaded from KV, without their bitmaps.
    if jobs.len() > 100_000 {
        jobs.clear();
    }
    Ok(())
}

/// Per workflow and step, over running jobs: worker slots needed to meet
/// the jobs' deadlines, and seconds left at the throughput seen.
fn capacity_gauges<'a>(cell: u32, jobs: impl Iterator<Item = &'a JobStats>, now: Millis) {
    let m = Metrics::get();
    let mut needed: HashMap<(String, String), (i64, i64)> = HashMap::new();
    for job in jobs.filter(|j| j.outcome.is_none()) {
        let Some(step) = job
            .steps
            .iter()
            .find(|s| s.started_at.is_some() && s.finished_at.is_none() && s.total > 0)
        else {
            continue;
        };
        let mean = step.duration_sum_ms.checked_div(step.completed);
        let done = step.completed + step.failed;
        let Some(c) = capacity(
            step.total,
            done,
            step.started_at.unwrap_or(now),
            now,
            mean,
            job.deadline_at,
        ) else {
            continue;
        };
        let e = needed
            .entry((job.workflow.clone(), step.name.clone()))
            .or_default();
        e.0 += c.slots_needed.unwrap_or(0) as i64;
        let left = c
            .predicted_finish_at
            .map(|at| at.saturating_sub(now) / 1000)
            .unwrap_or(0) as i64;
        e.1 = e.1.max(left);
    }
    // Each cell's reader sees its own jobs: the gauges add up the cells'
    // figures, each cell's replaced by its latest. Steps seen once stay at
    // 0 when idle: a dashboard line drops to zero rather than vanishing.
    type ByStep = HashMap<(String, String), (i64, i64)>;
    static CELLS: std::sync::Mutex<Option<HashMap<u32, ByStep>>> = std::sync::Mutex::new(None);
    let Ok(mut cells) = CELLS.lock() else { return };
    let cells = cells.get_or_insert_with(HashMap::new);
    let mine = cells.entry(cell).or_default();
    for figures in mine.values_mut() {
        *figures = (0, 0);
    }
    mine.extend(needed);
    let mut seen: Vec<(String, String)> =
        cells.values().flat_map(|by| by.keys().cloned()).collect();
    seen.sort();
    seen.dedup();
    for key in seen {
        let (slots, left) = cells
            .values()
            .filter_map(|by| by.get(&key))
            .fold((0, 0), |(s, l), (s1, l1)| (s + s1, l.max(*l1)));
        m.slots_needed
            .with_label_values(&[&key.0, &key.1])
            .set(slots);
        m.predicted_seconds_left
            .with_label_values(&[&key.0, &key.1])
            .set(left);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{
        CancelRequested, JobRequested, StepStarted, SubjobCompleted, SubjobFailed, SubjobsFailed,
    };

    fn done(index: u64) -> Event {
        Event::SubjobCompleted(SubjobCompleted {
            run: 0,
            job_id: "j".into(),
            step_index: 0,
            index,
            attempt: 1,
            result: serde_json::Value::Null,
            duration_ms: 1,
            token: String::new(),
        })
    }

    fn started(total: u64) -> Event {
        Event::StepStarted(StepStarted {
            run: 0,
            job_id: "j".into(),
            workflow: "w".into(),
            step: "send".into(),
            step_index: 0,
            total,
            at: 1,
        })
    }

    #[test]
    fn outcomes_count_once_per_subjob_as_the_manager_counts_them() {
        let m = Metrics::get();
        let mut s = JobStats::default();
        let mut seq = 0;
        let mut apply = |s: &mut JobStats, e: Event| {
            seq += 1;
            s.apply(seq, &e, m);
        };
        apply(&mut s, started(6));
        let failed = Event::SubjobFailed(SubjobFailed {
            run: 0,
            job_id: "j".into(),
            step_index: 0,
            index: 0,
            attempt: 1,
            error: "no".into(),
            token: String::new(),
        });
        for e in [failed, done(0), done(1), done(1), done(2), done(99)] {
            apply(&mut s, e);
        }
        assert_eq!((s.steps[0].completed, s.steps[0].failed), (2, 1));
        // The manager's decision fails what has no outcome below 4.
        apply(
            &mut s,
            Event::SubjobsFailed(SubjobsFailed {
                run: 0,
                job_id: "j".into(),
                step_index: 0,
                below: 4,
                reason: AbandonReason::Lost,
                error: "lost".into(),
                at: 2,
            }),
        );
        assert_eq!((s.steps[0].completed, s.steps[0].failed), (2, 2));
        // After a cancellation is asked for, nothing counts.
        apply(
            &mut s,
            Event::CancelRequested(CancelRequested {
                job_id: "j".into(),
                reason: None,
                at: 3,
            }),
        );
        apply(&mut s, done(5));
        assert_eq!((s.steps[0].completed, s.steps[0].failed), (2, 2));
    }

    #[test]
    fn a_step_end_settles_its_figures_and_later_outcomes_are_late() {
        let m = Metrics::get();
        let mut s = JobStats::default();
        s.apply(1, &started(3), m);
        s.apply(2, &done(0), m);
        // A restart lost the bitmap: the repeat is counted for now...
        s.steps[0].seen = None;
        s.steps[0].completed = 1;
        s.apply(3, &done(0), m);
        assert_eq!(s.steps[0].completed, 2);
        // ...and the step's end settles it.
        let end = Event::StepCompleted(crate::protocol::StepCompleted {
            run: 0,
            job_id: "j".into(),
            workflow: "w".into(),
            step: "send".into(),
            step_index: 0,
            ok: true,
            total: 3,
            completed: 1,
            failed: 2,
            retries: 0,
            started_at: 1,
            at: 5,
        });
        s.apply(4, &end, m);
        assert_eq!((s.steps[0].completed, s.steps[0].failed), (1, 2));
        s.apply(5, &done(1), m);
        assert_eq!(s.steps[0].completed, 1, "late");
    }

    #[test]
    fn percentiles_attempts_and_replays() {
        let m = Metrics::get();
        let mut s = JobStats::default();
        assert!(s.apply(
            1,
            &Event::JobRequested(JobRequested {
                job_id: "j".into(),
                workflow: "w".into(),
                customer: None,
                input: serde_json::Value::Null,
                at: 0,
                deadline_at: None,
                priority: None,
            }),
            m
        ));
        s.apply(
            2,
            &Event::StepStarted(StepStarted {
                run: 0,
                job_id: "j".into(),
                workflow: "w".into(),
                step: "send".into(),
                step_index: 0,
                total: 100,
                at: 1000,
            }),
            m,
        );
        for i in 0..100u64 {
            let ev = Event::SubjobCompleted(SubjobCompleted {
                run: 0,
                job_id: "j".into(),
                step_index: 0,
                index: i,
                attempt: if i < 10 { 2 } else { 1 },
                result: serde_json::Value::Null,
                duration_ms: i + 1,
                token: String::new(),
            });
            assert!(s.apply(3 + i, &ev, m));
        }
        let st = &s.steps[0];
        assert_eq!((st.completed, st.retries), (100, 10));
        assert_eq!(&st.attempts[..2], &[90, 10]);
        assert_eq!(st.duration_quantile_ms(0.5), Some(50));
        assert_eq!(st.duration_quantile_ms(0.95), Some(95));
        assert_eq!(st.duration_max_ms, 100);
        assert_eq!(st.throughput(3000), Some(50.0));
        // Replaying an applied sequence changes nothing.
        let before = s.clone();
        let ev = Event::SubjobCompleted(SubjobCompleted {
            run: 0,
            job_id: "j".into(),
            step_index: 0,
            index: 1,
            attempt: 1,
            result: serde_json::Value::Null,
            duration_ms: 5,
            token: String::new(),
        });
        assert!(!s.apply(50, &ev, m));
        assert_eq!(s, before);
    }
}
