//! The task message: one per subjob (or per task step run), on
//! `fanjet.task.<partition>.<workflow>.<step>.<job_id>`.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// What a worker receives. The attempt number is not in the payload: it is
/// the JetStream delivery count of the message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Task {
    pub job_id: String,
    pub workflow: String,
    pub step: String,
    pub step_index: usize,
    /// The step's handler name (the step name unless the workflow says otherwise).
    pub handler: String,
    /// Subjob index within the step (0 for a task step).
    pub index: u64,
    /// Number of subjobs in the step (1 for a task step).
    pub total: u64,
    /// `"task"` or `"fanout"`.
    pub kind: String,
    /// For a fanout subjob: its item (null for a task step and a batch).
    #[serde(default)]
    pub item: Value,
    /// For a batch (a fanout step with `batch_size` > 1): the subjobs it
    /// carries, consecutive indices within one block of `batch_size` from
    /// `index` (a multiple of it), and their items in the same order.
    /// Report them together in one `SubjobsDone`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub indices: Vec<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub items: Vec<Value>,
    /// For a batch: the step's `batch_size` (the block's length, which
    /// the token covers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<u64>,
    /// For a task step: its input (null for a fanout subjob).
    #[serde(default)]
    pub input: Value,
    /// Milliseconds of ack deadline per attempt (the step's timeout).
    pub timeout_ms: u64,
    /// Longest one attempt may run, in milliseconds (the step's
    /// `run_timeout`), if set: a worker fails the attempt past it as a
    /// retryable error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_timeout_ms: Option<u64>,
    /// Attempts allowed in all.
    pub max_attempts: u32,
    /// Delay before each retry, in milliseconds (the last repeats).
    #[serde(default)]
    pub backoff_ms: Vec<u64>,
    /// The job's run this task belongs to: 0 (absent) until the job is
    /// redriven. Copy it into the outcome event, with the token.
    #[serde(default, skip_serializing_if = "super::is_first_run")]
    pub run: u32,
    /// The subjob's token: copy it into the outcome event, which counts
    /// only with it (protocol version 2).
    #[serde(default)]
    pub token: String,
}

impl Task {
    /// Whether this task carries a batch of subjobs.
    pub fn is_batch(&self) -> bool {
        self.batch_size.is_some()
    }

    /// Delay before retrying after failed attempt `attempt` (1-based).
    pub fn backoff_after(&self, attempt: u32) -> std::time::Duration {
        let i = (attempt.max(1) - 1) as usize;
        let ms = self
            .backoff_ms
            .get(i)
            .or(self.backoff_ms.last())
            .copied()
            .unwrap_or(0);
        std::time::Duration::from_millis(ms)
    }
}
