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
//! - with the task key, an outcome without its task's token is dropped
//!   (a reader without the key cannot tell, and says so).
//!
//! Memory is two bits per subjob, whatever the number of results read.

use serde_json::{json, Value};

use super::{Event, Mark, Pending, TaskKey};

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

/// A step's outcomes as the log tells them, one event at a time.
pub struct StepResults {
    step_index: usize,
    key: Option<TaskKey>,
    /// Set at the step's `StepStarted` (its subjob count).
    seen: Option<Pending>,
    ended: bool,
}

impl StepResults {
    pub fn new(step_index: usize, key: Option<TaskKey>) -> Self {
        StepResults {
            step_index,
            key,
            seen: None,
            ended: false,
        }
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
        match event {
            Event::StepStarted(e) if e.step_index == self.step_index => {
                self.seen.get_or_insert_with(|| Pending::new(e.total));
            }
            Event::StepCompleted(e) if e.step_index == self.step_index => self.ended = true,
            Event::JobCompleted(_)
            | Event::JobFailed(_)
            | Event::JobCancelled(_)
            | Event::JobRejected(_)
            | Event::CancelRequested(_) => self.ended = true,
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
                self.count(event, c, out);
            }
            Event::SubjobsFailed(e) if e.step_index == self.step_index => {
                let below = self
                    .seen
                    .as_ref()
                    .map(|p| e.below.min(p.len()))
                    .unwrap_or(0);
                for index in 0..below {
                    if self.first(index, true) {
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
        let admitted = self.key.as_ref().is_none_or(|k| k.admits(event));
        if admitted && self.first(c.index(), c.is_failed()) {
            out.push(c);
        }
    }

    /// True for the first outcome of `index` while the step runs.
    fn first(&mut self, index: u64, failed: bool) -> bool {
        match &mut self.seen {
            Some(p) => p.mark(index, failed) == Mark::New,
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
            job_id: "j".into(),
            step_index: 1,
            below: 4,
            reason: AbandonReason::Lost,
            error: "lost".into(),
            at: 0,
        });
        let end = Event::StepCompleted(StepCompleted {
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
    fn with_the_key_a_forged_outcome_is_dropped() {
        let key = TaskKey::generate();
        let real = key.token("j", 1, 0);
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
}
