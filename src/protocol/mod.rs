//! The wire contract: every subject, header, stream, bucket and payload that
//! fanjet puts on NATS. `docs/PROTOCOL.md` is the same contract in prose; the
//! two change together. Nothing outside this module builds a subject string.
//!
//! Any NATS client can take part: submit with a request to
//! [`submit_subject`], work by pulling from the task stream, follow a job by
//! subscribing to [`job_events_filter`].

mod codec;
mod event;
#[cfg(test)]
mod fuzz;
mod names;
mod results;
pub mod schemas;
mod submit;
mod task;

pub use codec::{
    decode, encode_cbor, encode_json, CodecError, Encoding, CBOR_CONTENT_TYPE, JSON_CONTENT_TYPE,
};
pub use event::{
    CancelRequested, Event, EventKind, JobCancelled, JobCompleted, JobFailed, JobRejected,
    JobRequested, RejectCode, StepCompleted, StepStarted, SubjobCompleted, SubjobFailed,
};
pub use names::*;
pub use results::{
    array_len, ResultRef, INLINE_RESULT_MAX, MAX_RESULT_BYTES, RESULTS_BUCKET, RESULT_REF_KEY,
};
pub use submit::{Submission, SubmitError, SubmitReply};
pub use task::Task;

/// Milliseconds since the Unix epoch: the one time format on the wire.
pub type Millis = u64;

/// Current wall-clock time in [`Millis`].
pub fn now_ms() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
