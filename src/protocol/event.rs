//! The events of the log. Each is one JSON object with a `type` field, stored
//! on `fanjet.ev.<partition>.<job_id>.<kind>` where `kind` is
//! [`EventKind::token`].

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{event_subject, partition, Millis, Tolerance};

/// A job was submitted and accepted by the intake.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct JobRequested {
    pub job_id: String,
    pub workflow: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub customer: Option<String>,
    #[serde(default)]
    pub input: Value,
    /// Its priority (1 to 9), when the submission set one (default 5).
    #[schemars(range(min = 1, max = 9))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u8>,
    pub at: Millis,
    /// When the job should have ended (its workflow's deadline), if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_at: Option<Millis>,
}

/// Why a job was rejected; stable codes a client can branch on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RejectCode {
    MalformedPayload,
    UnknownWorkflow,
    InvalidJobId,
    InvalidWorkflowName,
    InvalidCustomer,
    // `priority` is not a whole number from 1 to 9.
    InvalidPriority,
    PayloadTooLarge,
    // The workflow's stored definition fails validation (it was put in
    // the bucket by other means than `fanjet workflow apply`).
    InvalidDefinition,
    // NATS could not be read or written for a moment (a leader election, a
    // node restarting): nothing was recorded; send the same submission again.
    Unavailable,
    // Too many submissions from this customer: nothing was recorded; send
    // the same submission again after the time the message says.
    RateLimited,
    Internal,
}

/// A submission was refused; nothing runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct JobRejected {
    pub job_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub customer: Option<String>,
    pub code: RejectCode,
    pub reason: String,
    pub at: Millis,
}

/// A step began; `total` subjobs were planned (1 for a task step).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct StepStarted {
    pub job_id: String,
    #[serde(default)]
    pub workflow: String,
    pub step: String,
    pub step_index: usize,
    pub total: u64,
    /// The run it belongs to: 0 for the job's first, `n` after its `n`th
    /// redrive (absent when 0).
    #[serde(default, skip_serializing_if = "super::is_first_run")]
    pub run: u32,
    pub at: Millis,
}

/// A step ended: `ok` says whether the job goes on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct StepCompleted {
    pub job_id: String,
    #[serde(default)]
    pub workflow: String,
    pub step: String,
    pub step_index: usize,
    pub ok: bool,
    pub total: u64,
    pub completed: u64,
    pub failed: u64,
    pub retries: u64,
    pub started_at: Millis,
    /// The run it belongs to: 0 for the job's first, `n` after its `n`th
    /// redrive (absent when 0).
    #[serde(default, skip_serializing_if = "super::is_first_run")]
    pub run: u32,
    pub at: Millis,
}

/// One subjob (or the single run of a task step) succeeded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct SubjobCompleted {
    pub job_id: String,
    pub step_index: usize,
    pub index: u64,
    /// The delivery attempt that succeeded, from 1.
    pub attempt: u32,
    #[serde(default)]
    pub result: Value,
    #[serde(default)]
    pub duration_ms: u64,
    /// The run it belongs to: 0 for the job's first, `n` after its `n`th
    /// redrive (absent when 0). Copy it from the task into the outcome.
    #[serde(default, skip_serializing_if = "super::is_first_run")]
    pub run: u32,
    /// The task's `token`: an outcome without the right one is ignored.
    #[serde(default)]
    pub token: String,
}

/// Subjobs of one step completed, each run as a task of its own, reported
/// together: a busy worker reports in one event the completions of one job's
/// step that are ready at the same moment (fewer messages for the server to
/// store, deliver and acknowledge). Each counts as its own
/// [`SubjobCompleted`] would.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct SubjobsCompleted {
    pub job_id: String,
    pub step_index: usize,
    /// The run they belong to (absent when 0); every task reported shares it.
    #[serde(default, skip_serializing_if = "super::is_first_run")]
    pub run: u32,
    pub outcomes: Vec<Completion>,
}

/// One subjob's completion in a [`SubjobsCompleted`]: what its own
/// [`SubjobCompleted`] would carry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Completion {
    pub index: u64,
    /// The delivery attempt that succeeded, from 1.
    pub attempt: u32,
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub result: Value,
    #[serde(default)]
    pub duration_ms: u64,
    /// The task's `token`: the event is ignored unless every outcome
    /// carries its own task's.
    #[serde(default)]
    pub token: String,
}

impl From<SubjobCompleted> for Completion {
    /// A completion's own fields, without the job, step and run it shares
    /// with the others of its report.
    fn from(e: SubjobCompleted) -> Self {
        Completion {
            index: e.index,
            attempt: e.attempt,
            result: e.result,
            duration_ms: e.duration_ms,
            token: e.token,
        }
    }
}

/// The subjobs of one batch task (a fanout step with `batch_size` > 1)
/// ended: one outcome per subjob it carried, reported together.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct SubjobsDone {
    pub job_id: String,
    pub step_index: usize,
    /// The batch's block: its first index (the task's `index`, a multiple
    /// of `batch_size`) and the step's `batch_size`; every outcome's index
    /// lies in `index .. index + batch_size`.
    pub index: u64,
    pub batch_size: u64,
    /// The task's delivery attempt.
    pub attempt: u32,
    /// Milliseconds the whole batch took.
    #[serde(default)]
    pub duration_ms: u64,
    pub outcomes: Vec<ItemOutcome>,
    /// The run it belongs to: 0 for the job's first, `n` after its `n`th
    /// redrive (absent when 0). Copy it from the task into the outcome.
    #[serde(default, skip_serializing_if = "super::is_first_run")]
    pub run: u32,
    /// The task's `token` (it covers the block): the event is ignored
    /// without the right one.
    #[serde(default)]
    pub token: String,
}

/// One subjob's outcome in a [`SubjobsDone`]: its result, or its `error`
/// when it failed (after its attempts, each in a batch of its own after
/// the first).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ItemOutcome {
    pub index: u64,
    /// Handler calls this subjob was part of, from 1.
    pub attempt: u32,
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub result: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One subjob gave up: its attempts are exhausted, its handler said so, or
/// the step's deadline passed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct SubjobFailed {
    pub job_id: String,
    pub step_index: usize,
    pub index: u64,
    pub attempt: u32,
    pub error: String,
    /// The run it belongs to: 0 for the job's first, `n` after its `n`th
    /// redrive (absent when 0). Copy it from the task into the outcome.
    #[serde(default, skip_serializing_if = "super::is_first_run")]
    pub run: u32,
    /// The task's `token`: an outcome without the right one is ignored.
    #[serde(default)]
    pub token: String,
}

/// Why the manager failed subjobs itself ([`SubjobsFailed`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum AbandonReason {
    /// Their tasks are gone from the work queue and no outcome was reported.
    Lost,
    /// The step's deadline passed.
    Deadline,
}

impl AbandonReason {
    pub fn as_str(self) -> &'static str {
        match self {
            AbandonReason::Lost => "lost",
            AbandonReason::Deadline => "deadline",
        }
    }
}

/// The manager fails subjobs itself: every subjob of step `step_index`
/// with an index below `below` that has no outcome yet at this point of the
/// log fails (outcomes logged after it are late). The manager logs it
/// before the failures count in the job record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct SubjobsFailed {
    pub job_id: String,
    pub step_index: usize,
    /// Subjobs `0 .. below` without an outcome fail.
    pub below: u64,
    pub reason: AbandonReason,
    /// For people (bounded like every error text).
    pub error: String,
    /// The run it belongs to: 0 for the job's first, `n` after its `n`th
    /// redrive (absent when 0).
    #[serde(default, skip_serializing_if = "super::is_first_run")]
    pub run: u32,
    pub at: Millis,
}

/// The last step completed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct JobCompleted {
    pub job_id: String,
    pub workflow: String,
    /// The last step's result (a task step) or its summary (a fanout step).
    #[serde(default)]
    pub output: Value,
    /// The run it belongs to: 0 for the job's first, `n` after its `n`th
    /// redrive (absent when 0).
    #[serde(default, skip_serializing_if = "super::is_first_run")]
    pub run: u32,
    pub at: Millis,
}

/// The job stopped on an error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct JobFailed {
    pub job_id: String,
    pub workflow: String,
    pub error: String,
    /// The run it belongs to: 0 for the job's first, `n` after its `n`th
    /// redrive (absent when 0).
    #[serde(default, skip_serializing_if = "super::is_first_run")]
    pub run: u32,
    pub at: Millis,
}

/// Someone asked to cancel the job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct CancelRequested {
    pub job_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub at: Millis,
}

/// Someone asked to change a running job: pause or resume its dispatching,
/// its in-flight window, its tolerated failures. Absent fields change
/// nothing; the changes apply to its running step and the steps after it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct UpdateRequested {
    pub job_id: String,
    /// `true`: dispatch nothing more (running subjobs finish); `false`: go on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused: Option<bool>,
    /// Most subjobs of the job dispatched and unfinished at once (1 or more).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_in_flight: Option<u64>,
    /// Failed subjobs a step tolerates from now on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerate: Option<Tolerance>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub at: Millis,
}

/// A request to change a job as it travels to the update service and the
/// HTTP API: `{"paused"?, "max_in_flight"?, "tolerate_failures"?: "10" |
/// "5%", "reason"?}`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChangeRequest {
    #[serde(default)]
    pub paused: Option<bool>,
    #[serde(default)]
    pub max_in_flight: Option<u64>,
    #[serde(default)]
    pub tolerate_failures: Option<String>,
    #[serde(default)]
    pub reason: Option<String>,
}

impl ChangeRequest {
    /// The event it asks for, or why it is not one: a window of 0, a
    /// tolerance that does not parse, nothing to change.
    pub fn into_update(self, job_id: String, at: Millis) -> Result<UpdateRequested, String> {
        if self.max_in_flight == Some(0) {
            return Err("max_in_flight must be at least 1".into());
        }
        let tolerate = self
            .tolerate_failures
            .as_deref()
            .map(Tolerance::parse)
            .transpose()?;
        if self.paused.is_none() && self.max_in_flight.is_none() && tolerate.is_none() {
            return Err("nothing to change".into());
        }
        Ok(UpdateRequested {
            job_id,
            paused: self.paused,
            max_in_flight: self.max_in_flight,
            tolerate,
            reason: self.reason,
            at,
        })
    }
}

/// Someone asked to run a failed job (or one that completed with
/// tolerated failures) again from one of its steps: only that step's
/// subjobs that did not complete run again, then the steps after it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct RedriveRequested {
    pub job_id: String,
    /// The step to run again, by name; absent: the step where the job
    /// failed, or for a completed job the first step with failed subjobs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub at: Millis,
}

/// The manager started run `run` of the job: step `step_index` runs again
/// for its `subjobs` subjobs that did not complete, then the steps after it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct JobRedriven {
    pub job_id: String,
    pub workflow: String,
    pub run: u32,
    pub step: String,
    pub step_index: usize,
    pub subjobs: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub at: Millis,
}

/// A request to redrive a job as it travels to the redrive service and the
/// HTTP API: `{"step"?, "reason"?}`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedriveRequest {
    #[serde(default)]
    pub step: Option<String>,
    #[serde(default)]
    pub reason: Option<String>,
}

/// The job was cancelled; its queued tasks were dropped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct JobCancelled {
    pub job_id: String,
    pub workflow: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub at: Millis,
}

/// Every event of the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "type")]
pub enum Event {
    JobRequested(JobRequested),
    JobRejected(JobRejected),
    StepStarted(StepStarted),
    StepCompleted(StepCompleted),
    SubjobCompleted(SubjobCompleted),
    SubjobFailed(SubjobFailed),
    SubjobsDone(SubjobsDone),
    SubjobsCompleted(SubjobsCompleted),
    SubjobsFailed(SubjobsFailed),
    JobCompleted(JobCompleted),
    JobFailed(JobFailed),
    CancelRequested(CancelRequested),
    JobCancelled(JobCancelled),
    UpdateRequested(UpdateRequested),
    RedriveRequested(RedriveRequested),
    JobRedriven(JobRedriven),
}

/// The kind of an event, as the last subject token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    JobRequested,
    JobRejected,
    StepStarted,
    StepCompleted,
    SubjobCompleted,
    SubjobFailed,
    SubjobsDone,
    SubjobsCompleted,
    SubjobsFailed,
    JobCompleted,
    JobFailed,
    CancelRequested,
    JobCancelled,
    UpdateRequested,
    RedriveRequested,
    JobRedriven,
}

impl EventKind {
    pub const ALL: [EventKind; 16] = [
        EventKind::JobRequested,
        EventKind::JobRejected,
        EventKind::StepStarted,
        EventKind::StepCompleted,
        EventKind::SubjobCompleted,
        EventKind::SubjobFailed,
        EventKind::SubjobsDone,
        EventKind::SubjobsCompleted,
        EventKind::SubjobsFailed,
        EventKind::JobCompleted,
        EventKind::JobFailed,
        EventKind::CancelRequested,
        EventKind::JobCancelled,
        EventKind::UpdateRequested,
        EventKind::RedriveRequested,
        EventKind::JobRedriven,
    ];

    /// The subject token of this kind.
    pub fn token(self) -> &'static str {
        match self {
            EventKind::JobRequested => "requested",
            EventKind::JobRejected => "rejected",
            EventKind::StepStarted => "step_started",
            EventKind::StepCompleted => "step_completed",
            EventKind::SubjobCompleted => "subjob_completed",
            EventKind::SubjobFailed => "subjob_failed",
            EventKind::SubjobsDone => "subjobs_done",
            EventKind::SubjobsCompleted => "subjobs_completed",
            EventKind::SubjobsFailed => "subjobs_failed",
            EventKind::JobCompleted => "completed",
            EventKind::JobFailed => "failed",
            EventKind::CancelRequested => "cancel_requested",
            EventKind::JobCancelled => "cancelled",
            EventKind::UpdateRequested => "update_requested",
            EventKind::RedriveRequested => "redrive_requested",
            EventKind::JobRedriven => "redriven",
        }
    }

    /// Kinds the workflow manager acts on; the others are its own output.
    pub fn drives_manager(self) -> bool {
        matches!(
            self,
            EventKind::JobRequested
                | EventKind::JobRejected
                | EventKind::SubjobCompleted
                | EventKind::SubjobFailed
                | EventKind::SubjobsDone
                | EventKind::SubjobsCompleted
                | EventKind::SubjobsFailed
                | EventKind::CancelRequested
                | EventKind::UpdateRequested
                | EventKind::RedriveRequested
        )
    }
}

impl Event {
    pub fn kind(&self) -> EventKind {
        match self {
            Event::JobRequested(_) => EventKind::JobRequested,
            Event::JobRejected(_) => EventKind::JobRejected,
            Event::StepStarted(_) => EventKind::StepStarted,
            Event::StepCompleted(_) => EventKind::StepCompleted,
            Event::SubjobCompleted(_) => EventKind::SubjobCompleted,
            Event::SubjobFailed(_) => EventKind::SubjobFailed,
            Event::SubjobsDone(_) => EventKind::SubjobsDone,
            Event::SubjobsCompleted(_) => EventKind::SubjobsCompleted,
            Event::SubjobsFailed(_) => EventKind::SubjobsFailed,
            Event::JobCompleted(_) => EventKind::JobCompleted,
            Event::JobFailed(_) => EventKind::JobFailed,
            Event::CancelRequested(_) => EventKind::CancelRequested,
            Event::JobCancelled(_) => EventKind::JobCancelled,
            Event::UpdateRequested(_) => EventKind::UpdateRequested,
            Event::RedriveRequested(_) => EventKind::RedriveRequested,
            Event::JobRedriven(_) => EventKind::JobRedriven,
        }
    }

    pub fn job_id(&self) -> &str {
        match self {
            Event::JobRequested(e) => &e.job_id,
            Event::JobRejected(e) => &e.job_id,
            Event::StepStarted(e) => &e.job_id,
            Event::StepCompleted(e) => &e.job_id,
            Event::SubjobCompleted(e) => &e.job_id,
            Event::SubjobFailed(e) => &e.job_id,
            Event::SubjobsDone(e) => &e.job_id,
            Event::SubjobsCompleted(e) => &e.job_id,
            Event::SubjobsFailed(e) => &e.job_id,
            Event::JobCompleted(e) => &e.job_id,
            Event::JobFailed(e) => &e.job_id,
            Event::CancelRequested(e) => &e.job_id,
            Event::JobCancelled(e) => &e.job_id,
            Event::UpdateRequested(e) => &e.job_id,
            Event::RedriveRequested(e) => &e.job_id,
            Event::JobRedriven(e) => &e.job_id,
        }
    }

    /// For a subjob outcome reported by a worker: the subjob (job, step,
    /// index, run) and the token it carries.
    pub fn outcome_token(&self) -> Option<(&str, usize, u64, u32, &str)> {
        match self {
            Event::SubjobCompleted(e) => Some((&e.job_id, e.step_index, e.index, e.run, &e.token)),
            Event::SubjobFailed(e) => Some((&e.job_id, e.step_index, e.index, e.run, &e.token)),
            Event::SubjobsDone(e) => Some((&e.job_id, e.step_index, e.index, e.run, &e.token)),
            _ => None,
        }
    }

    /// The run of the job this event belongs to, for the events a run
    /// makes (steps, outcomes, the job's end); `None` for the others.
    pub fn run(&self) -> Option<u32> {
        match self {
            Event::StepStarted(e) => Some(e.run),
            Event::StepCompleted(e) => Some(e.run),
            Event::SubjobCompleted(e) => Some(e.run),
            Event::SubjobFailed(e) => Some(e.run),
            Event::SubjobsDone(e) => Some(e.run),
            Event::SubjobsCompleted(e) => Some(e.run),
            Event::SubjobsFailed(e) => Some(e.run),
            Event::JobCompleted(e) => Some(e.run),
            Event::JobFailed(e) => Some(e.run),
            Event::JobRedriven(e) => Some(e.run),
            _ => None,
        }
    }

    /// Whether `subject` is the one this event belongs on (readers drop an
    /// event published on another job's or kind's subject).
    pub fn is_stored_on(&self, subject: &str) -> bool {
        let mut tokens = subject.rsplit('.');
        tokens.next() == Some(self.kind().token())
            && tokens.next() == Some(self.job_id())
            && tokens.next().and_then(|p| p.parse::<u32>().ok()) == Some(partition(self.job_id()))
    }

    /// The subject this event is stored on.
    pub fn subject(&self) -> String {
        event_subject(self.job_id(), self.kind().token())
    }

    /// The `Nats-Msg-Id` this event is published with. Equal facts get equal
    /// ids, so a re-publish after a crash is dropped by the stream's
    /// duplicate window instead of appearing twice in the log.
    pub fn msg_id(&self) -> String {
        let job = self.job_id();
        let kind = self.kind().token();
        // A redriven run repeats the facts of the runs before it: its ids
        // end with the run, so the duplicate window does not drop them.
        let id = self.first_run_msg_id(job, kind);
        match self.run() {
            Some(run) if run > 0 => format!("{id}:r{run}"),
            _ => id,
        }
    }

    fn first_run_msg_id(&self, job: &str, kind: &str) -> String {
        match self {
            Event::StepStarted(e) => format!("{job}:{kind}:{}", e.step_index),
            Event::StepCompleted(e) => format!("{job}:{kind}:{}", e.step_index),
            Event::SubjobCompleted(e) => format!("{job}:{kind}:{}:{}", e.step_index, e.index),
            Event::SubjobFailed(e) => format!("{job}:{kind}:{}:{}", e.step_index, e.index),
            // A batch reported in parts: a part per first outcome.
            Event::SubjobsDone(e) => format!(
                "{job}:{kind}:{}:{}:{}",
                e.step_index,
                e.index,
                e.outcomes.first().map_or(e.index, |o| o.index)
            ),
            // The same completions (a worker's publish sent again) share an
            // id; another set of them does not.
            Event::SubjobsCompleted(e) => format!(
                "{job}:{kind}:{}:{}:{}:{:016x}",
                e.step_index,
                e.outcomes.first().map_or(0, |o| o.index),
                e.outcomes.len(),
                e.outcomes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, o| {
                    o.index
                        .to_le_bytes()
                        .iter()
                        .fold(h, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
                })
            ),
            Event::SubjobsFailed(e) => format!(
                "{job}:{kind}:{}:{}:{}",
                e.step_index,
                e.reason.as_str(),
                e.below
            ),
            Event::CancelRequested(e) => format!("{job}:{kind}:{}", e.at),
            Event::UpdateRequested(e) => format!("{job}:{kind}:{}", e.at),
            Event::RedriveRequested(e) => format!("{job}:{kind}:{}", e.at),
            _ => format!("{job}:{kind}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{decode, encode_cbor, encode_json, Encoding};
    use serde_json::json;

    fn samples() -> Vec<Event> {
        vec![
            Event::JobRequested(JobRequested {
                job_id: "j".into(),
                workflow: "w".into(),
                customer: Some("c".into()),
                input: json!([1, 2]),
                at: 1,
                deadline_at: None,
                priority: None,
            }),
            Event::JobRejected(JobRejected {
                job_id: "j".into(),
                workflow: None,
                customer: None,
                code: RejectCode::UnknownWorkflow,
                reason: "no".into(),
                at: 1,
            }),
            Event::StepStarted(StepStarted {
                run: 0,
                job_id: "j".into(),
                workflow: "w".into(),
                step: "s".into(),
                step_index: 0,
                total: 3,
                at: 2,
            }),
            Event::StepCompleted(StepCompleted {
                run: 0,
                job_id: "j".into(),
                workflow: "w".into(),
                step: "s".into(),
                step_index: 0,
                ok: true,
                total: 3,
                completed: 3,
                failed: 0,
                retries: 1,
                started_at: 2,
                at: 3,
            }),
            Event::SubjobCompleted(SubjobCompleted {
                run: 0,
                job_id: "j".into(),
                step_index: 1,
                index: 7,
                attempt: 2,
                result: json!({"ok": true}),
                duration_ms: 12,
                token: String::new(),
            }),
            Event::SubjobFailed(SubjobFailed {
                run: 0,
                job_id: "j".into(),
                step_index: 1,
                index: 7,
                attempt: 5,
                error: "boom".into(),
                token: String::new(),
            }),
            Event::SubjobsDone(SubjobsDone {
                job_id: "j".into(),
                step_index: 1,
                index: 10,
                batch_size: 10,
                attempt: 1,
                duration_ms: 30,
                outcomes: vec![
                    ItemOutcome {
                        index: 10,
                        attempt: 1,
                        result: json!({"sent": true}),
                        error: None,
                    },
                    ItemOutcome {
                        index: 11,
                        attempt: 3,
                        result: Value::Null,
                        error: Some("bounced".into()),
                    },
                ],
                run: 0,
                token: "t".into(),
            }),
            Event::SubjobsCompleted(SubjobsCompleted {
                job_id: "j".into(),
                step_index: 1,
                run: 0,
                outcomes: vec![
                    Completion {
                        index: 3,
                        attempt: 1,
                        result: json!({"sent": true}),
                        duration_ms: 4,
                        token: "t3".into(),
                    },
                    Completion {
                        index: 9,
                        attempt: 2,
                        result: Value::Null,
                        duration_ms: 5,
                        token: "t9".into(),
                    },
                ],
            }),
            Event::SubjobsFailed(SubjobsFailed {
                run: 0,
                job_id: "j".into(),
                step_index: 1,
                below: 40,
                reason: AbandonReason::Deadline,
                error: "late".into(),
                at: 4,
            }),
            Event::JobCompleted(JobCompleted {
                run: 0,
                job_id: "j".into(),
                workflow: "w".into(),
                output: json!(null),
                at: 4,
            }),
            Event::JobFailed(JobFailed {
                run: 0,
                job_id: "j".into(),
                workflow: "w".into(),
                error: "e".into(),
                at: 4,
            }),
            Event::CancelRequested(CancelRequested {
                job_id: "j".into(),
                reason: None,
                at: 4,
            }),
            Event::JobCancelled(JobCancelled {
                job_id: "j".into(),
                workflow: "w".into(),
                reason: Some("r".into()),
                at: 5,
            }),
            Event::UpdateRequested(UpdateRequested {
                job_id: "j".into(),
                paused: Some(true),
                max_in_flight: Some(7),
                tolerate: Some(Tolerance::Percent(2.5)),
                reason: None,
                at: 6,
            }),
            Event::RedriveRequested(RedriveRequested {
                job_id: "j".into(),
                step: Some("s".into()),
                reason: Some("the mail server is back".into()),
                at: 7,
            }),
            Event::JobRedriven(JobRedriven {
                job_id: "j".into(),
                workflow: "w".into(),
                run: 1,
                step: "s".into(),
                step_index: 1,
                subjobs: 3,
                reason: None,
                at: 8,
            }),
        ]
    }

    #[test]
    fn a_redriven_run_has_message_ids_of_its_own() {
        let failed = |run| {
            Event::SubjobFailed(SubjobFailed {
                job_id: "j".into(),
                step_index: 1,
                index: 4,
                attempt: 1,
                error: "x".into(),
                run,
                token: String::new(),
            })
        };
        assert_eq!(failed(0).msg_id(), "j:subjob_failed:1:4");
        assert_eq!(failed(2).msg_id(), "j:subjob_failed:1:4:r2");
        let json = serde_json::to_value(failed(0)).unwrap();
        assert!(json.get("run").is_none(), "absent in the first run: {json}");
        assert_eq!(serde_json::to_value(failed(2)).unwrap()["run"], 2);
    }

    #[test]
    fn completions_reported_together_have_an_id_per_set() {
        let together = |indices: &[u64], run: u32| {
            Event::SubjobsCompleted(SubjobsCompleted {
                job_id: "j".into(),
                step_index: 1,
                run,
                outcomes: indices
                    .iter()
                    .map(|&index| Completion {
                        index,
                        attempt: 1,
                        result: Value::Null,
                        duration_ms: 0,
                        token: String::new(),
                    })
                    .collect(),
            })
        };
        let id = together(&[3, 9], 0).msg_id();
        assert!(id.starts_with("j:subjobs_completed:1:3:2:"), "{id}");
        assert_eq!(id, together(&[3, 9], 0).msg_id(), "sent again: the same");
        assert_ne!(id, together(&[3, 8], 0).msg_id());
        assert_ne!(id, together(&[3, 9, 10], 0).msg_id());
        assert!(together(&[3, 9], 2).msg_id().ends_with(":r2"));
    }

    #[test]
    fn every_event_round_trips_through_json_and_cbor() {
        let all = samples();
        assert_eq!(all.len(), EventKind::ALL.len());
        for e in all {
            let j: Event = decode(Encoding::Json, &encode_json(&e).unwrap()).unwrap();
            let c: Event = decode(Encoding::Cbor, &encode_cbor(&e).unwrap()).unwrap();
            assert_eq!(j, e);
            assert_eq!(c, e);
            assert!(e.subject().ends_with(&format!(".j.{}", e.kind().token())));
        }
    }

    #[test]
    fn wire_form_is_tagged_json() {
        let e = &samples()[0];
        let v: Value = serde_json::from_slice(&encode_json(e).unwrap()).unwrap();
        assert_eq!(v["type"], "JobRequested");
        assert_eq!(v["job_id"], "j");
    }

    #[test]
    fn subjects_must_match_kind_job_and_partition() {
        let ev = Event::CancelRequested(super::CancelRequested {
            job_id: "job-1".into(),
            reason: None,
            at: 1,
        });
        assert!(ev.is_stored_on(&event_subject("job-1", "cancel_requested")));
        assert!(!ev.is_stored_on("fanjet.ev.06.job-2.cancel_requested"));
        assert!(!ev.is_stored_on("fanjet.ev.06.job-1.job_completed"));
        assert!(
            !ev.is_stored_on("fanjet.ev.07.job-1.cancel_requested"),
            "job-1 is partition 06"
        );
        assert!(!ev.is_stored_on("fanjet.ev.xx.job-1.cancel_requested"));
        assert!(!ev.is_stored_on("job-1.cancel_requested"));
    }
}
