//! The state of one job: what `fanjet status` shows and what the manager
//! stores in the jobs bucket at each checkpoint (the pending bitmaps are
//! stored apart, in chunks).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{
    JobRequested, Millis, Pace, Pending, Share, StepKind, Workflow, CHUNK_BITS, DEFAULT_PRIORITY,
};

/// Failed subjobs kept with their error per step; the count is always exact.
pub const MAX_FAILURES_KEPT: usize = 100;
/// Longest error text of one failed subjob kept in a record or passed on,
/// in bytes; a longer one keeps its start and says how much was cut.
pub const MAX_ERROR_BYTES: usize = 1024;
/// Longest reason (why a job failed, was cancelled or rejected) kept in a
/// record or an event, in bytes.
pub const MAX_REASON_BYTES: usize = 2048;
/// Failed subjobs listed in the summary a fanout step hands to the next
/// step (and, for a last step, in the job's output).
pub const MAX_FAILURES_PASSED_ON: usize = 10;
/// Largest encoded job record the manager writes. Far below the smallest
/// `max_payload` fanjet supports (1 MB, the NATS default); a record that
/// would be larger sheds its lists of failures and its output first.
pub const MAX_RECORD_BYTES: usize = 512 * 1024;

/// Most redrives of one job (each keeps the figures it started from in the
/// record).
pub const MAX_REDRIVES: usize = 20;

/// `text`, cut to at most `max` bytes: its start, and how much was cut.
pub fn bounded(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let note = |cut: usize| format!("… [{cut} bytes cut]");
    // The note's length depends on the number in it; the longest it can be.
    let longest = note(text.len()).len();
    let room = if max > longest { max - longest } else { max };
    let mut end = room.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let mut out = text[..end].to_string();
    if max > longest {
        out.push_str(&note(text.len() - end));
    }
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Requested,
    Running,
    Completed,
    Failed,
    Cancelled,
    Rejected,
}

impl JobState {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Completed | JobState::Failed | JobState::Cancelled | JobState::Rejected
        )
    }

    /// Every state, in the order a job may pass through them.
    pub const ALL: [JobState; 6] = [
        JobState::Requested,
        JobState::Running,
        JobState::Completed,
        JobState::Failed,
        JobState::Cancelled,
        JobState::Rejected,
    ];

    /// The state named `name` (as [`as_str`](Self::as_str) spells it).
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == name)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Requested => "requested",
            JobState::Running => "running",
            JobState::Completed => "completed",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
            JobState::Rejected => "rejected",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum StepState {
    Pending,
    Running,
    Completed,
    Failed,
    Cancelled,
}

impl StepState {
    pub fn as_str(self) -> &'static str {
        match self {
            StepState::Pending => "pending",
            StepState::Running => "running",
            StepState::Completed => "completed",
            StepState::Failed => "failed",
            StepState::Cancelled => "cancelled",
        }
    }
}

/// Which field of a logged event holds a step's input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SourceField {
    /// `input` of a JobRequested.
    Input,
    /// `result` of a SubjobCompleted.
    Result,
}

/// Where a step's input or items are. Large values stay in the log and are
/// referenced by sequence, so the job record stays small.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    Event { seq: u64, field: SourceField },
    Inline(Value),
}

/// A failed subjob and its last error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Failure {
    pub index: u64,
    pub attempt: u32,
    pub error: String,
}

/// The progress of one step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct StepRun {
    pub name: String,
    pub kind: StepKind,
    pub state: StepState,
    pub total: u64,
    pub completed: u64,
    pub failed: u64,
    /// Attempts beyond the first, over the subjobs that finished.
    pub retries: u64,
    /// Subjobs enqueued so far (the in-flight window moves through the step).
    #[serde(default)]
    pub dispatched: u64,
    pub started_at: Option<Millis>,
    pub finished_at: Option<Millis>,
    pub failures: Vec<Failure>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Source>,
    /// Task step: sequence of the SubjobCompleted that holds its result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_seq: Option<u64>,
    /// Task step: length of its result when it is an array.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_len: Option<u64>,
    /// Stored apart, chunk by chunk.
    #[serde(skip)]
    pub pending: Pending,
    /// A redriven fanout: subjobs at or past `dispatched` that completed in
    /// an earlier run (it dispatches only the others).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub carried: u64,
    /// Chunks of an earlier run of this step to delete at the next
    /// checkpoint (it runs again from scratch). In memory only.
    #[serde(skip)]
    pub discard_chunks: u64,
    /// A running fanout's share of its workers' slots, when they are shared
    /// out (see PROTOCOL.md, "Fair share").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub share: Option<Share>,
    /// In memory only.
    #[serde(skip)]
    pub pace: Pace,
}

impl StepRun {
    /// A step as it is before it starts.
    pub fn new(name: String, kind: StepKind) -> Self {
        StepRun {
            name,
            kind,
            state: StepState::Pending,
            total: 0,
            completed: 0,
            failed: 0,
            retries: 0,
            dispatched: 0,
            started_at: None,
            finished_at: None,
            failures: Vec::new(),
            source: None,
            output_seq: None,
            output_len: None,
            pending: Pending::default(),
            carried: 0,
            discard_chunks: 0,
            share: None,
            pace: Pace::default(),
        }
    }
}

/// One job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Job {
    pub job_id: String,
    pub workflow: String,
    pub customer: Option<String>,
    /// Among jobs competing for a step's slots, a higher one starts first
    /// (1 to 9, default 5).
    #[schemars(range(min = 1, max = 9))]
    #[serde(default = "default_priority")]
    pub priority: u8,
    pub state: JobState,
    pub current: usize,
    pub steps: Vec<StepRun>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The last step's result (task) or summary (fanout), once completed.
    #[serde(default)]
    pub output: Value,
    pub created_at: Millis,
    pub updated_at: Millis,
    pub finished_at: Option<Millis>,
    /// Sequence of the JobRequested event (the job's input).
    #[serde(default)]
    pub requested_seq: u64,
    /// The highest log sequence of an outcome counted in `retries` and
    /// `failures`. An outcome replayed after a crash (its bit was not yet
    /// stored) sets its bit again but is not counted twice.
    #[serde(default)]
    pub applied_seq: u64,
    /// When the job should have ended, if its workflow has a deadline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_at: Option<Millis>,
    /// Since when it is paused (dispatches nothing more), if it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused_at: Option<Millis>,
    /// Its run: 0 until it is redriven, then the number of redrives.
    #[serde(default, skip_serializing_if = "super::is_first_run")]
    pub run: u32,
    /// Each redrive, with the figures of the run before it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub redrives: Vec<Redrive>,
    /// The workflow as it was when the job started; later edits do not
    /// change a running job.
    #[serde(default)]
    pub definition: Workflow,
    /// Set by a manager that shares slots fairly: how many milliseconds of
    /// work a job keeps queued beyond its share. In memory only.
    #[serde(skip)]
    pub pacing: Option<u64>,
    /// Whether its partition's active key is stored (see
    /// [`super::active_key`]). In memory only.
    #[serde(skip)]
    pub listed: bool,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// One redrive of a job: when, from which step, and what the run before it
/// had left (so a redrive never hides the first run's figures).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Redrive {
    /// The run it started (1 for the first redrive).
    pub run: u32,
    pub step_index: usize,
    /// Subjobs of that step run again (those that had not completed).
    pub subjobs: u64,
    pub at: Millis,
    /// Log sequence of the `RedriveRequested` event.
    pub seq: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// How the run before ended, and why.
    pub state: JobState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The figures of steps `step_index` on as the run before left them.
    pub steps: Vec<RunFigures>,
}

/// A step's counts at the end of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct RunFigures {
    pub state: StepState,
    pub total: u64,
    pub completed: u64,
    pub failed: u64,
    pub retries: u64,
}

/// Why a job cannot be redriven (a client is told, the manager ignores the
/// request). Codes: `job_running`, `not_redrivable`, `no_such_step`,
/// `nothing_to_redrive`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RedriveRefused {
    #[error("job {0} is running: only a failed job, or one that completed with failed subjobs, can be redriven")]
    Running(String),
    #[error("job {job_id} was {state}: only a failed job, or one that completed with failed subjobs, can be redriven")]
    Ended { job_id: String, state: String },
    #[error("job {0} was redriven {MAX_REDRIVES} times, the most a job may be")]
    TooMany(String),
    #[error("job {job_id}'s workflow has no step {step:?}")]
    NoSuchStep { job_id: String, step: String },
    #[error("step {step:?} of job {job_id} {why}")]
    NothingToRedrive {
        job_id: String,
        step: String,
        why: &'static str,
    },
    #[error("job {0} completed with no failed subjob: nothing to redrive")]
    NothingFailed(String),
}

impl RedriveRefused {
    /// The stable code a client can branch on.
    pub fn code(&self) -> &'static str {
        match self {
            RedriveRefused::Running(_) => "job_running",
            RedriveRefused::Ended { .. } | RedriveRefused::TooMany(_) => "not_redrivable",
            RedriveRefused::NoSuchStep { .. } => "no_such_step",
            RedriveRefused::NothingToRedrive { .. } | RedriveRefused::NothingFailed(_) => {
                "nothing_to_redrive"
            }
        }
    }
}

fn default_priority() -> u8 {
    DEFAULT_PRIORITY
}

impl Job {
    pub fn new(ev: &JobRequested, definition: Workflow, seq: u64, now: Millis) -> Self {
        let steps = definition
            .steps
            .iter()
            .map(|s| StepRun::new(s.name.clone(), s.kind))
            .collect();
        Job {
            job_id: ev.job_id.clone(),
            workflow: ev.workflow.clone(),
            customer: ev.customer.clone(),
            priority: ev.priority.unwrap_or(DEFAULT_PRIORITY),
            state: JobState::Running,
            current: 0,
            steps,
            error: None,
            output: Value::Null,
            created_at: ev.at.min(now),
            updated_at: now,
            finished_at: None,
            requested_seq: seq,
            applied_seq: seq,
            deadline_at: ev
                .deadline_at
                .or_else(|| definition.deadline_ms.map(|d| ev.at + d)),
            paused_at: None,
            run: 0,
            redrives: Vec::new(),
            definition,
            pacing: None,
            listed: false,
        }
    }

    pub fn rejected(
        job_id: &str,
        workflow: Option<&str>,
        customer: Option<String>,
        reason: String,
        at: Millis,
    ) -> Self {
        Job {
            job_id: job_id.to_string(),
            workflow: workflow.unwrap_or_default().to_string(),
            customer,
            priority: DEFAULT_PRIORITY,
            state: JobState::Rejected,
            current: 0,
            steps: Vec::new(),
            error: Some(reason),
            output: Value::Null,
            created_at: at,
            updated_at: at,
            finished_at: Some(at),
            requested_seq: 0,
            applied_seq: 0,
            deadline_at: None,
            paused_at: None,
            run: 0,
            redrives: Vec::new(),
            definition: Workflow {
                name: workflow.unwrap_or_default().to_string(),
                ..Workflow::default()
            },
            pacing: None,
            listed: false,
        }
    }

    /// The step a redrive runs again from, or why the job cannot be
    /// redriven (the one rule, for the manager and for clients that check
    /// before asking): a failed job, or one that completed with failed
    /// subjobs; `step` by name, else the step where it failed (a completed
    /// job: its first step with subjobs that did not complete). The step
    /// must have run and have subjobs that did not complete (a fanout that
    /// failed before splitting its input into subjobs would fail again).
    pub fn redrive_step(&self, step: Option<&str>) -> Result<usize, RedriveRefused> {
        let id = || self.job_id.clone();
        match self.state {
            JobState::Failed | JobState::Completed => {}
            JobState::Requested | JobState::Running => return Err(RedriveRefused::Running(id())),
            JobState::Cancelled | JobState::Rejected => {
                return Err(RedriveRefused::Ended {
                    job_id: id(),
                    state: self.state.as_str().to_string(),
                })
            }
        }
        if self.redrives.len() >= MAX_REDRIVES {
            return Err(RedriveRefused::TooMany(id()));
        }
        let unfinished = |s: &StepRun| s.completed < s.total;
        let i = match step {
            Some(name) => self
                .steps
                .iter()
                .position(|s| s.name == name)
                .ok_or_else(|| RedriveRefused::NoSuchStep {
                    job_id: id(),
                    step: name.to_string(),
                })?,
            None if self.state == JobState::Failed => self.current,
            None => self
                .steps
                .iter()
                .position(unfinished)
                .ok_or_else(|| RedriveRefused::NothingFailed(id()))?,
        };
        let Some(run) = self.steps.get(i) else {
            return Err(RedriveRefused::NothingFailed(id()));
        };
        let refuse = |why| {
            Err(RedriveRefused::NothingToRedrive {
                job_id: id(),
                step: run.name.clone(),
                why,
            })
        };
        if i > self.current || run.state == StepState::Pending {
            return refuse(
                "never ran in this job (a redrive runs the steps after the one it redrives)",
            );
        }
        if run.kind == StepKind::Fanout && run.source.is_none() {
            return refuse(
                "failed before splitting its input into subjobs; it would fail again the same way",
            );
        }
        let failed_here = self.state == JobState::Failed && i == self.current;
        if !unfinished(run) && !failed_here {
            return refuse("has no subjob that did not complete");
        }
        Ok(i)
    }

    /// The runs whose outcomes make step `step_index`'s results: from the
    /// last run that started it over (the first run, or a redrive of an
    /// earlier step) to the last that ran it again (a redrive of it).
    pub fn result_runs(&self, step_index: usize) -> (u32, u32) {
        let (mut first, mut last) = (0, 0);
        for r in &self.redrives {
            if r.step_index < step_index {
                (first, last) = (r.run, r.run);
            } else if r.step_index == step_index {
                last = r.run;
            }
        }
        (first, last)
    }

    /// Chunks a fanout step of `total` subjobs is stored in.
    pub fn chunks_of(total: u64) -> u64 {
        total.div_ceil(CHUNK_BITS)
    }

    /// After loading a record and its bitmaps: the counts follow the bits,
    /// which may be behind the record after a crash (see the executor).
    pub fn recount(&mut self) {
        if let Some(step) = self.steps.get_mut(self.current) {
            if step.state == StepState::Running {
                let (completed, failed) = step.pending.counts();
                step.completed = completed;
                step.failed = failed;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::bounded;

    #[test]
    fn bounded_texts_keep_their_start_and_say_what_was_cut() {
        assert_eq!(bounded("short", 10), "short");
        let long = "é".repeat(5000); // 10,000 bytes, two per char
        let cut = bounded(&long, 1024);
        assert!(cut.len() <= 1024, "{} bytes", cut.len());
        assert!(cut.starts_with("éé"));
        let kept = cut.split('…').next().unwrap_or_default().len();
        assert!(
            cut.ends_with(&format!("[{} bytes cut]", 10_000 - kept)),
            "{cut}"
        );
        assert_eq!(bounded(&long, 3), "é", "too little room for the note");
    }
}
