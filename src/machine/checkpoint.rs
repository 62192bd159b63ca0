//! What storing one job means, in order: its active key (first time),
//! its record, its pending chunks, and once it ended its active key's
//! deletion. A job that ended keeps the chunks of its steps with subjobs
//! that did not complete, for a redrive; the others are deleted. After a
//! crash between record and chunks, the record may be ahead of the
//! bitmaps, never behind; on load the counts are taken from the
//! bits ([`Job::recount`]) and re-applied events count exactly the subjobs
//! the bits miss. The engine acknowledges events ([`super::Action::Ack`])
//! only after the checkpoints of every job they changed.

use bytes::Bytes;

use serde_json::json;

use crate::protocol::{
    Job, JobState, Source, StepKind, StepState, MAX_FAILURES_PASSED_ON, MAX_RECORD_BYTES,
};

/// One write of a checkpoint, in the order they must be made.
#[derive(Debug, Clone, PartialEq)]
pub enum Write {
    /// The job record (`fanjet_jobs_<cell>`), revision-checked: when another
    /// manager changed it, the writes after it are not made.
    Record(Bytes),
    /// A changed chunk of a fanout step's pending set (`fanjet_pending_<cell>`).
    Chunk {
        step_index: usize,
        chunk: u64,
        bits: Vec<u8>,
    },
    /// A chunk no longer needed (the job ended).
    DeleteChunk { step_index: usize, chunk: u64 },
    /// The job's active key, before its first record: a manager taking
    /// its partition over loads it.
    Listed,
    /// The job's active key deleted, after its last record.
    Unlisted,
}

/// Everything one job's checkpoint writes.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    pub job_id: String,
    /// The job has ended: the engine no longer holds it.
    pub ended: bool,
    /// The record first, then chunks.
    pub writes: Vec<Write>,
}

impl Checkpoint {
    /// Takes what changed in `job` since its last checkpoint (the record is
    /// always written whole; only dirty chunks are). Fails only if the record
    /// cannot be encoded, in which case nothing is taken.
    pub(super) fn of(job: &mut Job) -> Result<Self, serde_json::Error> {
        let mut record = serde_json::to_vec(&*job)?;
        if record.len() > MAX_RECORD_BYTES {
            shed(job);
            record = serde_json::to_vec(&*job)?;
        }
        let ended = job.state.is_terminal();
        let mut writes = Vec::new();
        // A running record always has its active key (a rejected job never
        // runs: it has none).
        if !ended && !job.listed {
            writes.push(Write::Listed);
            job.listed = true;
        }
        writes.push(Write::Record(record.into()));
        for (i, step) in job.steps.iter_mut().enumerate() {
            if step.kind != StepKind::Fanout {
                continue;
            }
            // A step that runs again from scratch: its earlier run's bits go
            // first (its own come after).
            let discard = std::mem::take(&mut step.discard_chunks);
            writes.extend((0..discard).map(|chunk| Write::DeleteChunk {
                step_index: i,
                chunk,
            }));
            if ended && step.completed >= step.total {
                // Nothing of it can be redriven. From the total: steps
                // before a restart have no bits loaded.
                let chunks = Job::chunks_of(step.total);
                writes.extend((0..chunks).map(|chunk| Write::DeleteChunk {
                    step_index: i,
                    chunk,
                }));
            } else {
                // Running, or ended with subjobs that did not complete: a
                // redrive reads which did (the chunks expire with the log).
                writes.extend(step.pending.take_dirty().into_iter().map(|(chunk, bits)| {
                    Write::Chunk {
                        step_index: i,
                        chunk,
                        bits,
                    }
                }));
            }
        }
        if ended && job.state != JobState::Rejected {
            writes.push(Write::Unlisted);
            job.listed = false;
        }
        Ok(Checkpoint {
            job_id: job.job_id.clone(),
            ended,
            writes,
        })
    }
}

/// Makes a record that grew past [`MAX_RECORD_BYTES`] small again, keeping
/// every count: a few failures per step instead of the full list, then
/// none, and the output and finished steps' inline inputs replaced by a
/// note. (Every text in a record is bounded, so only a workflow of many
/// steps, each with many long failures, gets here.)
fn shed(job: &mut Job) {
    for step in &mut job.steps {
        step.failures.truncate(MAX_FAILURES_PASSED_ON);
    }
    if serde_json::to_vec(&*job).map_or(true, |r| r.len() > MAX_RECORD_BYTES) {
        let note = json!({"omitted": "the job record grew past its limit; see the event log"});
        for step in &mut job.steps {
            step.failures.clear();
            if step.state != StepState::Running && matches!(step.source, Some(Source::Inline(_))) {
                step.source = Some(Source::Inline(note.clone()));
            }
        }
        if !job.output.is_null() {
            job.output = note;
        }
    }
}
