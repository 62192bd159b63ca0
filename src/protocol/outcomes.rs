//! Which outcome of each subjob counts, for a reader of the log that wants
//! one step's results (part of the contract: any client reading results
//! keeps the same rules): the manager's own rules, applied event by event in
//! log order (PROTOCOL.md, "Counting outcomes as the manager does"):
//! - only outcomes of the step while it runs count: nothing before its
//!   `StepStarted`, nothing after its `StepCompleted`, the job's end or a
//!   request to cancel it;
//! - the first outcome of each subjob counts, later ones are duplicates;
//! - a `SubjobsFailed` fails every subjob below its `below` that has no
//!   outcome yet;
//! - a `SubjobsDone` (a batch) is an outcome for each subjob it names, and
//!   a `SubjobsCompleted` a completion for each;
//! - with the task key, an outcome without its task's token is dropped
//!   (a reader without the key cannot tell, and says so);
//! - a redriven job ran the step more than once ([`Job::result_runs`]):
//!   each run counts its own outcomes (those carrying its `run`) while the
//!   step runs in it; a subjob that completed in any of those runs has that
//!   result, one that did not has its failure in the last run (a redrive
//!   runs again every subjob that did not complete, so each subjob appears
//!   once).
//!
//! Memory is two bits per subjob, whatever the number of results read.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{Event, Job, Mark, Pending, TaskKey};

/// One subjob's counted outcome.
#[derive(Debug, Clone, PartialEq)]
pub enum Counted {
    Completed {
        index: u64,
        attempt: u32,
        /// The result, or a reference to it in the object store.
        result: Value,
        seq: u64,
    },
    Failed {
        index: u64,
        /// The attempt that failed, when a worker reported it.
        attempt: Option<u32>,
        error: String,
        seq: u64,
    },
}

impl Counted {
    pub fn index(&self) -> u64 {
        match self {
            Counted::Completed { index, .. } | Counted::Failed { index, .. } => *index,
        }
    }

    pub fn is_failed(&self) -> bool {
        matches!(self, Counted::Failed { .. })
    }

    /// One line of `fanjet results` and of the results API:
    /// `{"index", "ok": true, "attempt", "result"}` or
    /// `{"index", "ok": false, "attempt"?, "error"}`.
    pub fn to_json(&self) -> Value {
        match self {
            Counted::Completed {
                index,
                attempt,
                result,
                ..
            } => json!({"index": index, "ok": true, "attempt": attempt, "result": result}),
            Counted::Failed {
                index,
                attempt,
                error,
                ..
            } => {
                let mut v = json!({"index": index, "ok": false, "error": error});
                if let Some(a) = attempt {
                    v["attempt"] = json!(a);
                }
                v
            }
        }
    }
}

/// A worker's request to the results service (`fanjet.results.<job_id>`):
/// the results of step `step` of the job whose task it holds, proved by
/// the task's `token` (with the task's `step_index`, `index` and `run`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ResultsRequest {
    pub token: String,
    pub step_index: usize,
    pub index: u64,
    #[serde(default)]
    pub run: u32,
    /// The step whose results to read (by index).
    pub step: usize,
    /// For a batch task: its `batch_size` (the token is the batch's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<u64>,
}

/// One page of the results service's answer: lines as `fanjet results`
/// prints them; `next`, when more follow, is the subject to send an empty
/// request to for the next page (within a minute).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ResultsPage {
    pub ok: bool,
    #[serde(default)]
    pub results: Vec<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<Value>,
}

/// A step's outcomes as the log tells them, one event at a time.
pub struct StepResults {
    step_index: usize,
    key: Option<TaskKey>,
    /// The first and last runs whose outcomes count.
    runs: (u32, u32),
    /// The run being read, and its subjobs with an outcome: set at the
    /// step's `StepStarted` in that run, cleared at its end.
    counting: Option<(u32, Pending)>,
    /// Subjobs that completed in a run read so far: the next run starts
    /// from them (it ran only the others).
    completed: Option<Pending>,
    ended: bool,
}

impl StepResults {
    /// The results of a job never redriven (its first run).
    pub fn new(step_index: usize, key: Option<TaskKey>) -> Self {
        Self::of_runs(step_index, (0, 0), key)
    }

    /// The results of a step over `runs` (from [`Job::result_runs`]).
    pub fn of_runs(step_index: usize, runs: (u32, u32), key: Option<TaskKey>) -> Self {
        StepResults {
            step_index,
            key,
            runs,
            counting: None,
            completed: None,
            ended: false,
        }
    }

    /// The results of step `step_index` of `job` as its record tells.
    pub fn of_job(job: &Job, step_index: usize, key: Option<TaskKey>) -> Self {
        Self::of_runs(step_index, job.result_runs(step_index), key)
    }

    /// True once nothing more can count (the step or the job ended).
    pub fn ended(&self) -> bool {
        self.ended
    }

    /// Whether outcomes were checked against their tasks' tokens.
    pub fn verified(&self) -> bool {
        self.key.is_some()
    }

    /// Applies the event at log sequence `seq`; what it makes count goes
    /// to `out`.
    pub fn apply(&mut self, seq: u64, event: &Event, out: &mut Vec<Counted>) {
        if self.ended {
            return;
        }
        let (first, last) = self.runs;
        match event {
            Event::StepStarted(e) if e.step_index == self.step_index => {
                if (first..=last).contains(&e.run) && self.counting.is_none() {
                    let seen = match &self.completed {
                        Some(done) if done.len() == e.total => done.clone(),
                        _ => Pending::new(e.total),
                    };
                    self.counting = Some((e.run, seen));
                }
                return;
            }
            Event::JobCancelled(_) | Event::JobRejected(_) => {
                self.ended = true;
                return;
            }
            _ => {}
        }
        // The end of the run being read: the step's, the job's, or a
        // request to cancel it.
        let run_ends = match event {
            Event::StepCompleted(e) => e.step_index == self.step_index,
            Event::JobCompleted(_) | Event::JobFailed(_) | Event::CancelRequested(_) => true,
            _ => false,
        };
        let Some(reading) = self.counting.as_ref().map(|(run, _)| *run) else {
            return;
        };
        if run_ends && event.run().is_none_or(|r| r == reading) {
            self.counting = None;
            self.ended = reading >= last;
            return;
        }
        if event.run() != Some(reading) {
            return; // another run's (a late one)
        }
        // Failures count in the last run only: earlier ones ran again.
        let keep_failures = reading == last;
        match event {
            Event::SubjobCompleted(e) if e.step_index == self.step_index => {
                let c = Counted::Completed {
                    index: e.index,
                    attempt: e.attempt,
                    result: e.result.clone(),
                    seq,
                };
                self.count(event, c, out);
            }
            Event::SubjobFailed(e) if e.step_index == self.step_index => {
                let c = Counted::Failed {
                    index: e.index,
                    attempt: Some(e.attempt),
                    error: e.error.clone(),
                    seq,
                };
                let before = out.len();
                self.count(event, c, out);
                if !keep_failures {
                    out.truncate(before);
                }
            }
            Event::SubjobsDone(e) if e.step_index == self.step_index => {
                if !self.key.as_ref().is_none_or(|k| k.admits(event)) {
                    return;
                }
                for o in &e.outcomes {
                    let c = match &o.error {
                        None => Counted::Completed {
                            index: o.index,
                            attempt: o.attempt,
                            result: o.result.clone(),
                            seq,
                        },
                        Some(error) => Counted::Failed {
                            index: o.index,
                            attempt: Some(o.attempt),
                            error: error.clone(),
                            seq,
                        },
                    };
                    let (failed, before) = (c.is_failed(), out.len());
                    self.count_admitted(c, out);
                    if failed && !keep_failures {
                        out.truncate(before);
                    }
                }
            }
            Event::SubjobsCompleted(e) if e.step_index == self.step_index => {
                if !self.key.as_ref().is_none_or(|k| k.admits(event)) {
                    return;
                }
                for o in &e.outcomes {
                    let c = Counted::Completed {
                        index: o.index,
                        attempt: o.attempt,
                        result: o.result.clone(),
                        seq,
                    };
                    self.count_admitted(c, out);
                }
            }
            Event::SubjobsFailed(e) if e.step_index == self.step_index => {
                let Some((_, seen)) = self.counting.as_mut() else {
                    return;
                };
                // Those without an outcome below `below` (in a redriven
                // run, those that completed before have one).
                let below = e.below.min(seen.len());
                let mut from = 0;
                while let Some(index) = seen.next_open(from, below) {
                    seen.mark(index, true);
                    from = index + 1;
                    if keep_failures {
                        out.push(Counted::Failed {
                            index,
                            attempt: None,
                            error: e.error.clone(),
                            seq,
                        });
                    }
                }
            }
            _ => {}
        }
    }

    /// A worker's outcome counts if it carries its token (when checked)
    /// and is its subjob's first.
    fn count(&mut self, event: &Event, c: Counted, out: &mut Vec<Counted>) {
        if self.key.as_ref().is_none_or(|k| k.admits(event)) {
            self.count_admitted(c, out);
        }
    }

    /// An admitted outcome counts if it is its subjob's first.
    fn count_admitted(&mut self, c: Counted, out: &mut Vec<Counted>) {
        if self.first(c.index(), c.is_failed()) {
            if let (false, Some((_, seen))) = (c.is_failed(), &self.counting) {
                let total = seen.len();
                self.completed
                    .get_or_insert_with(|| Pending::new(total))
                    .mark(c.index(), false);
            }
            out.push(c);
        }
    }

    /// True for the first outcome of `index` while the step runs.
    fn first(&mut self, index: u64, failed: bool) -> bool {
        match &mut self.counting {
            Some((_, p)) => p.mark(index, failed) == Mark::New,
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{
        AbandonReason, StepCompleted, StepStarted, SubjobCompleted, SubjobFailed, SubjobsFailed,
    };
    fn started(total: u64) -> Event {
        Event::StepStarted(StepStarted {
            run: 0,
            job_id: "j".into(),
            workflow: "w".into(),
            step: "s".into(),
            step_index: 1,
            total,
            at: 0,
        })
    }

    fn ok(index: u64, result: Value, token: &str) -> Event {
        Event::SubjobCompleted(SubjobCompleted {
            run: 0,
            job_id: "j".into(),
            step_index: 1,
            index,
            attempt: 1,
            result,
            duration_ms: 1,
            token: token.into(),
        })
    }

    fn bad(index: u64) -> Event {
        Event::SubjobFailed(SubjobFailed {
            run: 0,
            job_id: "j".into(),
            step_index: 1,
            index,
            attempt: 3,
            error: "no".into(),
            token: String::new(),
        })
    }

    fn read(r: &mut StepResults, events: &[Event]) -> Vec<Counted> {
        let mut out = Vec::new();
        for (i, e) in events.iter().enumerate() {
            r.apply(i as u64 + 1, e, &mut out);
        }
        out
    }

    #[test]
    fn each_subjob_counts_once_while_its_step_runs() {
        let decided = Event::SubjobsFailed(SubjobsFailed {
            run: 0,
            job_id: "j".into(),
            step_index: 1,
            below: 4,
            reason: AbandonReason::Lost,
            error: "lost".into(),
            at: 0,
        });
        let end = Event::StepCompleted(StepCompleted {
            run: 0,
            job_id: "j".into(),
            workflow: "w".into(),
            step: "s".into(),
            step_index: 1,
            ok: true,
            total: 5,
            completed: 2,
            failed: 3,
            retries: 0,
            started_at: 0,
            at: 0,
        });
        let events = [
            ok(0, json!("early"), ""), // before the step started: not counted
            started(5),
            ok(0, json!("a"), ""),
            ok(0, json!("again"), ""), // a duplicate
            bad(1),
            ok(1, json!("late"), ""), // after its failure
            decided,                  // 2 and 3 fail
            ok(4, json!("e"), ""),
            end,
            ok(3, json!("after the end"), ""),
        ];
        let mut r = StepResults::new(1, None);
        let got = read(&mut r, &events);
        let shown: Vec<(u64, bool)> = got.iter().map(|c| (c.index(), c.is_failed())).collect();
        assert_eq!(
            shown,
            [(0, false), (1, true), (2, true), (3, true), (4, false)]
        );
        assert!(r.ended() && !r.verified());
        assert!(matches!(&got[0], Counted::Completed { result, .. } if result == "a"));
        assert!(matches!(&got[2], Counted::Failed { attempt: None, error, .. } if error == "lost"));
    }

    #[test]
    fn a_redriven_step_shows_each_subjob_once_from_the_run_that_decided_it() {
        use crate::protocol::{JobFailed, JobRedriven, StepCompleted};
        let in_run = |run: u32, e: Event| match e {
            Event::StepStarted(s) => Event::StepStarted(StepStarted { run, ..s }),
            Event::SubjobCompleted(c) => Event::SubjobCompleted(SubjobCompleted { run, ..c }),
            Event::SubjobFailed(f) => Event::SubjobFailed(SubjobFailed { run, ..f }),
            other => other,
        };
        let end = |run| {
            Event::StepCompleted(StepCompleted {
                job_id: "j".into(),
                workflow: "w".into(),
                step: "s".into(),
                step_index: 1,
                ok: run > 0,
                total: 4,
                completed: 0,
                failed: 0,
                retries: 0,
                started_at: 0,
                run,
                at: 0,
            })
        };
        let events = [
            started(4),
            ok(0, json!("a"), ""),
            bad(1),
            bad(2),
            end(0),
            Event::JobFailed(JobFailed {
                job_id: "j".into(),
                workflow: "w".into(),
                error: "too many".into(),
                run: 0,
                at: 0,
            }),
            ok(3, json!("late"), ""), // the first run had ended
            Event::JobRedriven(JobRedriven {
                job_id: "j".into(),
                workflow: "w".into(),
                run: 1,
                step: "s".into(),
                step_index: 1,
                subjobs: 3,
                reason: None,
                at: 0,
            }),
            in_run(1, started(4)),
            ok(2, json!("stale"), ""), // a first-run outcome, read late
            in_run(1, ok(2, json!("c"), "")),
            in_run(1, bad(1)),
            Event::SubjobsFailed(SubjobsFailed {
                job_id: "j".into(),
                step_index: 1,
                below: 4,
                reason: AbandonReason::Lost,
                error: "lost".into(),
                run: 1,
                at: 0,
            }),
            end(1),
        ];
        let mut r = StepResults::of_runs(1, (0, 1), None);
        let got = read(&mut r, &events);
        let shown: Vec<(u64, bool)> = got.iter().map(|c| (c.index(), c.is_failed())).collect();
        assert_eq!(shown, [(0, false), (2, false), (1, true), (3, true)]);
        assert!(r.ended());
        assert!(matches!(&got[1], Counted::Completed { result, .. } if result == "c"));
        // Read as a job never redriven, the first run is the whole story.
        let mut first = StepResults::new(1, None);
        let got = read(&mut first, &events);
        assert_eq!(got.len(), 3);
        assert!(first.ended());
    }

    #[test]
    fn with_the_key_a_forged_outcome_is_dropped() {
        let key = TaskKey::generate();
        let real = key.token("j", 1, 0, 0);
        let mut r = StepResults::new(1, Some(key));
        let got = read(
            &mut r,
            &[
                started(1),
                ok(0, json!("forged"), "xx"),
                ok(0, json!("real"), &real),
            ],
        );
        assert_eq!(got.len(), 1);
        assert!(matches!(&got[0], Counted::Completed { result, .. } if result == "real"));
    }

    #[test]
    fn completions_reported_together_count_each_once() {
        use crate::protocol::{Completion, SubjobsCompleted};
        let key = TaskKey::generate();
        let together = |indices: &[u64], forged: bool| {
            Event::SubjobsCompleted(SubjobsCompleted {
                job_id: "j".into(),
                step_index: 1,
                run: 0,
                outcomes: indices
                    .iter()
                    .map(|&index| Completion {
                        index,
                        attempt: 1,
                        result: json!(index * 10),
                        duration_ms: 1,
                        token: match forged {
                            true => "xx".into(),
                            false => key.token("j", 1, index, 0),
                        },
                    })
                    .collect(),
            })
        };
        let mut r = StepResults::new(1, Some(key.clone()));
        let got = read(
            &mut r,
            &[
                started(4),
                together(&[0, 1], true), // forged: dropped whole
                ok(1, json!("alone"), &key.token("j", 1, 1, 0)), // 1 first alone
                together(&[0, 1, 2], false), // 1 again: a duplicate
                together(&[3], false),
            ],
        );
        let shown: Vec<(u64, Value)> = got
            .iter()
            .map(|c| match c {
                Counted::Completed { index, result, .. } => (*index, result.clone()),
                Counted::Failed { index, .. } => (*index, Value::Null),
            })
            .collect();
        assert_eq!(
            shown,
            [
                (1, json!("alone")),
                (0, json!(0)),
                (2, json!(20)),
                (3, json!(30))
            ]
        );
    }
}
