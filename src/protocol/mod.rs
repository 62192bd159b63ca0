//! The wire contract: every subject, header, stream, bucket and payload that
//! fanjet puts on NATS, and every record it keeps in a bucket (workflow
//! definitions, job records with their pending bitmaps, statistics,
//! heartbeats, the detailed status). `docs/PROTOCOL.md` is the same contract
//! in prose and `docs/schemas/` its JSON Schemas, generated from these types
//! ([`schemas`]); the three change together. Nothing outside this module
//! builds a subject string, and this module imports nothing else of fanjet.
//!
//! Any NATS client can take part: submit with a request to
//! [`submit_subject`], work by pulling from the task stream, follow a job by
//! subscribing to [`job_events_filter`].

mod codec;
mod event;
#[cfg(test)]
mod fuzz;
mod heartbeat;
mod index;
mod items;
mod job;
mod names;
mod outcomes;
mod pending;
mod results;
pub mod schemas;
mod share;
mod stats;
mod status;
mod submit;
mod task;
mod token;
mod workflow;

pub use codec::{
    decode, encode_cbor, encode_json, CodecError, Encoding, CBOR_CONTENT_TYPE, JSON_CONTENT_TYPE,
};
pub use event::{
    AbandonReason, CancelRequested, ChangeRequest, Completion, Event, EventKind, ItemOutcome,
    JobCancelled, JobCompleted, JobFailed, JobRedriven, JobRejected, JobRequested, RedriveRequest,
    RedriveRequested, RejectCode, StepCompleted, StepStarted, SubjobCompleted, SubjobFailed,
    SubjobsCompleted, SubjobsDone, SubjobsFailed, UpdateRequested,
};
pub use heartbeat::{Heartbeat, HEARTBEAT_EVERY, HEARTBEAT_TTL};
pub use index::*;
pub use items::{is_json_format, ItemScanner, ItemsError, ItemsFormat};
pub use job::{
    bounded, Failure, Job, JobState, Redrive, RedriveRefused, RunFigures, Source, SourceField,
    StepRun, StepState, MAX_ERROR_BYTES, MAX_FAILURES_KEPT, MAX_FAILURES_PASSED_ON,
    MAX_REASON_BYTES, MAX_RECORD_BYTES, MAX_REDRIVES,
};
pub use names::*;
pub use outcomes::{Counted, ResultsPage, ResultsRequest, StepResults};
pub use pending::{Mark, Pending, CHUNK_BITS};
pub use results::{
    array_len, ResultRef, INLINE_RESULT_MAX, MAX_RESULT_BYTES, RESULTS_BUCKET, RESULT_REF_KEY,
};
pub use share::{
    customer_cap_key, parse_share_key, share_key, step_cap_key, tenant_key, CustomerUsage, Demand,
    JobDemand, Pace, Reservations, Share, Tenant, WaitReason, AGING_MS, DEFAULT_PRIORITY,
    DEMAND_TTL_MS, MAX_PRIORITY, MIN_PRIORITY, SHARES_BUCKET, TENANTS_BUCKET,
};
pub use stats::{JobStats, StepStats, DURATION_BOUNDS_MS, MAX_ATTEMPT_BUCKET};
pub use status::{capacity, detailed, Capacity};
pub use submit::{Submission, SubmitError, SubmitReply};
pub use task::Task;
pub use token::{TaskKey, KEYS_BUCKET, TASK_KEY};
pub use workflow::{Step, StepKind, Tolerance, Workflow, WorkflowError};

/// Whether a `run` field is the job's first run (and so left out on the wire).
pub(crate) fn is_first_run(run: &u32) -> bool {
    *run == 0
}

/// Milliseconds since the Unix epoch: the one time format on the wire.
pub type Millis = u64;

/// Current wall-clock time in [`Millis`].
pub fn now_ms() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
