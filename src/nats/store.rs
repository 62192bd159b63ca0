//! The records fanjet keeps in KV: job records (`fanjet_jobs_<cell>`),
//! their pending-set chunks (`fanjet_pending_<cell>`) and statistics
//! records (`fanjet_stats`).
//!
//! The manager writes a job's record first and its changed bitmap chunks
//! second (see [`crate::machine::Checkpoint`]); on load the counts are
//! taken from the bits ([`Job::recount`]).

use async_nats::jetstream::context::{PublishError, PublishErrorKind};
use async_nats::jetstream::kv;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::LastRawMessageErrorKind;
use bytes::Bytes;
use futures::TryStreamExt;
use thiserror::Error;

use super::Nats;
use crate::protocol::{
    active_filter, active_key, active_scanned_key, cell, chunk_key, event_subject, job_cell,
    jobs_bucket, pending_bucket, validate_token, Event, EventKind, Job, JobState, JobStats,
    Pending, StepKind, StepState, CELLS, MANAGER_HEADER,
};

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("job {job_id}: stored record is unreadable: {source}")]
    Decode {
        job_id: String,
        source: serde_json::Error,
    },
    #[error("job {job_id}: another manager changed it (expected revision {expected:?})")]
    Conflict {
        job_id: String,
        expected: Option<u64>,
    },
    #[error("job {job_id}: {op} failed: {message}")]
    Kv {
        job_id: String,
        op: &'static str,
        message: String,
    },
}

/// Writes a job record: creates it (`revision` None) or updates the one
/// at `revision`; returns the new revision. Every write of this module
/// names its `author` (the manager) in [`MANAGER_HEADER`]. [`StoreError::Conflict`] when
/// another manager wrote it since.
pub async fn put_record(
    nats: &Nats,
    author: &str,
    job_id: &str,
    record: Bytes,
    revision: Option<u64>,
) -> Result<u64, StoreError> {
    let conflict = || StoreError::Conflict {
        job_id: job_id.to_string(),
        expected: revision,
    };
    let written = kv_write(
        nats,
        &jobs_bucket(job_cell(job_id)),
        job_id,
        record.clone(),
        author,
        Some(revision.unwrap_or(0)),
        &[],
    )
    .await;
    match (written, revision) {
        (Ok(revision), _) => Ok(revision),
        (Err(e), Some(_)) if e.kind() == PublishErrorKind::WrongLastSequence => Err(conflict()),
        // A key deleted before has a revision of its own: the KV API's
        // create knows how to create over it (without the author).
        (Err(e), None) if e.kind() == PublishErrorKind::WrongLastSequence => nats
            .records(job_id)
            .create(job_id, record)
            .await
            .map_err(|e| {
                if e.kind() == kv::CreateErrorKind::AlreadyExists {
                    conflict()
                } else {
                    kv_error(job_id, "create", &e)
                }
            }),
        (Err(e), None) => Err(kv_error(job_id, "create", &e)),
        (Err(e), Some(_)) => Err(kv_error(job_id, "update", &e)),
    }
}

/// Stores one chunk of a step's pending set.
pub async fn put_chunk(
    nats: &Nats,
    author: &str,
    job_id: &str,
    step_index: usize,
    chunk: u64,
    bits: Vec<u8>,
) -> Result<(), StoreError> {
    let key = chunk_key(job_id, step_index, chunk);
    let bucket = pending_bucket(job_cell(job_id));
    kv_write(nats, &bucket, &key, bits.into(), author, None, &[])
        .await
        .map(|_| ())
        .map_err(|e| kv_error(job_id, "put chunk", &e))
}

/// Deletes one chunk of a step's pending set (with its history).
pub async fn delete_chunk(
    nats: &Nats,
    author: &str,
    job_id: &str,
    step_index: usize,
    chunk: u64,
) -> Result<(), StoreError> {
    purge_pending(
        nats,
        author,
        job_id,
        &chunk_key(job_id, step_index, chunk),
        "purge chunk",
    )
    .await
}

/// Purges one key of the pending bucket (with its history).
async fn purge_pending(
    nats: &Nats,
    author: &str,
    job_id: &str,
    key: &str,
    op: &'static str,
) -> Result<(), StoreError> {
    let purge = [("KV-Operation", "PURGE"), ("Nats-Rollup", "sub")];
    kv_write(
        nats,
        &pending_bucket(job_cell(job_id)),
        key,
        Bytes::new(),
        author,
        None,
        &purge,
    )
    .await
    .map(|_| ())
    .map_err(|e| kv_error(job_id, op, &e))
}

/// Stores a job's active key ([`active_key`]): its partition's next
/// manager loads it.
pub async fn list_active(nats: &Nats, author: &str, job_id: &str) -> Result<(), StoreError> {
    kv_write(
        nats,
        &pending_bucket(job_cell(job_id)),
        &active_key(job_id),
        Bytes::new(),
        author,
        None,
        &[],
    )
    .await
    .map(|_| ())
    .map_err(|e| kv_error(job_id, "put active key", &e))
}

/// Deletes a job's active key (it ended).
pub async fn unlist_active(nats: &Nats, author: &str, job_id: &str) -> Result<(), StoreError> {
    purge_pending(
        nats,
        author,
        job_id,
        &active_key(job_id),
        "purge active key",
    )
    .await
}

/// The job ids of one partition's active keys.
pub async fn active_ids(nats: &Nats, partition: u32) -> Result<Vec<String>, StoreError> {
    use async_nats::jetstream::consumer::{push, DeliverPolicy, ReplayPolicy};
    use futures::StreamExt;
    let err = |e: &dyn std::fmt::Display| StoreError::Kv {
        job_id: "*".into(),
        op: "list active keys",
        message: e.to_string(),
    };
    let prefix = format!("$KV.{}.", pending_bucket(cell(partition)));
    let stream = &nats.pending[cell(partition) as usize].stream;
    // Created by the meta leader: asked again while it is being elected.
    let consumer = super::answered(|| {
        stream.create_consumer(push::OrderedConfig {
            deliver_subject: nats.client.new_inbox(),
            filter_subject: format!("{prefix}{}", active_filter(partition)),
            headers_only: true,
            replay_policy: ReplayPolicy::Instant,
            deliver_policy: DeliverPolicy::LastPerSubject,
            ..Default::default()
        })
    })
    .await
    .map_err(|e| err(&e))?
    .map_err(|e| err(&e))?;
    let mut ids = Vec::new();
    if consumer.cached_info().num_pending == 0 {
        return Ok(ids);
    }
    let mut messages = consumer.messages().await.map_err(|e| err(&e))?;
    while let Some(msg) = messages.next().await {
        let msg = msg.map_err(|e| err(&e))?;
        let deleted = msg
            .headers
            .as_ref()
            .and_then(|h| h.get("KV-Operation"))
            .is_some_and(|op| op.as_str() != "PUT");
        if !deleted {
            if let Some(id) = msg.subject.rsplit('.').next() {
                ids.push(id.to_string());
            }
        }
        if msg.info().map_or(true, |i| i.pending == 0) {
            break;
        }
    }
    Ok(ids)
}

/// One write to a KV bucket, as the KV API makes it (a publish to the
/// key's subject, revision-checked when `expect` is set), with the author
/// in a header, which the KV API has no way to add.
async fn kv_write(
    nats: &Nats,
    bucket: &str,
    key: &str,
    value: Bytes,
    author: &str,
    expect: Option<u64>,
    headers: &[(&'static str, &'static str)],
) -> Result<u64, PublishError> {
    let mut msg = PublishMessage::build()
        .payload(value)
        .header(MANAGER_HEADER, author);
    for (name, value) in headers {
        msg = msg.header(*name, *value);
    }
    if let Some(revision) = expect {
        msg = msg.expected_last_subject_sequence(revision);
    }
    let ack = nats
        .js
        .send_publish(format!("$KV.{bucket}.{key}"), msg)
        .await?
        .await?;
    Ok(ack.sequence)
}

fn kv_error(job_id: &str, op: &'static str, e: &dyn std::fmt::Display) -> StoreError {
    StoreError::Kv {
        job_id: job_id.to_string(),
        op,
        message: e.to_string(),
    }
}

/// How a key is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Read {
    /// A direct get, which any replica answers: available while the
    /// bucket elects a leader, but a replica that has not caught up (a node
    /// just back) may answer with an older value, or none.
    Any,
    /// From the bucket's leader: the last value written. What resuming a
    /// job needs; a stale record or bitmap there would count subjobs
    /// twice, or lose the outcomes acknowledged since.
    Leader,
    /// From the leader, asked again when unanswered ([`super::answered`]):
    /// a read sent as the bucket's leader was lost is never answered, and
    /// waiting out the client's 10 s for it held a partition's session
    /// that long (13 reloads in a 20-minute chaos run).
    LeaderAskedAgain,
}

/// A key's value and revision (`None`: not there, or deleted); an error
/// names the job and the operation (`op`) it was read for.
async fn read_key(
    bucket: &kv::Store,
    key: &str,
    how: Read,
    job_id: &str,
    op: &'static str,
) -> Result<Option<(Bytes, u64)>, StoreError> {
    let read = match how {
        Read::LeaderAskedAgain => super::answered(|| read_raw(bucket, key, Read::Leader))
            .await
            .unwrap_or_else(|e| Err(e.to_string())),
        _ => read_raw(bucket, key, how).await,
    };
    read.map_err(|message| StoreError::Kv {
        job_id: job_id.into(),
        op,
        message,
    })
}

async fn read_raw(
    bucket: &kv::Store,
    key: &str,
    how: Read,
) -> Result<Option<(Bytes, u64)>, String> {
    match how {
        Read::Any => match bucket.entry(key).await {
            Ok(Some(e)) if e.operation == kv::Operation::Put => Ok(Some((e.value, e.revision))),
            Ok(_) => Ok(None),
            Err(e) => Err(e.to_string()),
        },
        Read::Leader | Read::LeaderAskedAgain => {
            let subject = format!("$KV.{}.{key}", bucket.name);
            match bucket
                .stream
                .get_last_raw_message_by_subject(&subject)
                .await
            {
                Ok(m) => {
                    let deleted = m
                        .headers
                        .get("KV-Operation")
                        .is_some_and(|op| op.as_str() != "PUT");
                    Ok((!deleted).then_some((m.payload, m.sequence)))
                }
                Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
                Err(e) => Err(e.to_string()),
            }
        }
    }
}

/// A key's value as the bucket's leader has it (`None`: not there, or
/// deleted): for the one writer of a key, going on from what it wrote.
pub async fn read_latest(bucket: &kv::Store, key: &str) -> Result<Option<Bytes>, String> {
    Ok(read_raw(bucket, key, Read::Leader).await?.map(|(b, _)| b))
}

/// Reads one job record (without its bitmaps): what `fanjet status` shows.
pub async fn get(nats: &Nats, job_id: &str) -> Result<Option<(Job, u64)>, StoreError> {
    get_with(nats, job_id, Read::Any).await
}

/// Whether a job's record is stored, as the bucket's leader says (asked
/// again when unanswered: a partition's session asks it of every job
/// requested).
pub async fn stored(nats: &Nats, job_id: &str) -> Result<bool, StoreError> {
    Ok(get_with(nats, job_id, Read::LeaderAskedAgain)
        .await?
        .is_some())
}

/// One job record (without its bitmaps) as the bucket's leader has it:
/// for a writer that goes on from it, where a replica behind could answer
/// with an older record or none.
pub async fn latest(nats: &Nats, job_id: &str) -> Result<Option<(Job, u64)>, StoreError> {
    get_with(nats, job_id, Read::Leader).await
}

/// One job record, read as `how` says.
async fn get_with(nats: &Nats, job_id: &str, how: Read) -> Result<Option<(Job, u64)>, StoreError> {
    match read_key(nats.records(job_id), job_id, how, job_id, "get").await? {
        Some((value, revision)) => {
            let job: Job = serde_json::from_slice(&value).map_err(|source| StoreError::Decode {
                job_id: job_id.into(),
                source,
            })?;
            Ok(Some((job, revision)))
        }
        None => Ok(None),
    }
}

/// A job's status: its record, or, in the moment between its acceptance and
/// the manager's first checkpoint, a `requested` stub built from the log.
pub async fn status(nats: &Nats, job_id: &str) -> Result<Option<Job>, StoreError> {
    if let Some((job, _)) = get(nats, job_id).await? {
        return Ok(Some(job));
    }
    if validate_token("job id", job_id).is_err() {
        return Ok(None);
    }
    let subject = event_subject(job_id, EventKind::JobRequested.token());
    let Ok(msg) = nats
        .log(job_id)
        .get_last_raw_message_by_subject(&subject)
        .await
    else {
        return Ok(None);
    };
    let Ok(Event::JobRequested(req)) = serde_json::from_slice::<Event>(&msg.payload) else {
        return Ok(None);
    };
    let mut job = Job::rejected(
        &req.job_id,
        Some(&req.workflow),
        req.customer.clone(),
        String::new(),
        req.at,
    );
    job.state = JobState::Requested;
    job.error = None;
    job.finished_at = None;
    Ok(Some(job))
}

/// Reads a job's statistics record.
pub async fn stats(nats: &Nats, job_id: &str) -> Result<Option<JobStats>, StoreError> {
    let bytes = nats.stats.get(job_id).await.map_err(|e| StoreError::Kv {
        job_id: job_id.into(),
        op: "get statistics",
        message: e.to_string(),
    })?;
    Ok(bytes.and_then(|b| serde_json::from_slice(&b).ok()))
}

/// Reads a job's statistics record from the bucket's leader, for its one
/// writer to go on from: a replica behind its leader (a node just back)
/// can answer with an older record or none, and the consumer would count
/// again what it counted, or count late outcomes of an ended job.
/// The statistics bucket is shared by every cell: after its leader's node
/// is lost, a read or a write is asked again ([`super::answered`]) rather
/// than waited out.
pub async fn stats_to_update(nats: &Nats, job_id: &str) -> Result<Option<JobStats>, StoreError> {
    let op = "get statistics";
    let entry = read_key(&nats.stats, job_id, Read::LeaderAskedAgain, job_id, op).await?;
    Ok(entry.and_then(|(b, _)| serde_json::from_slice(&b).ok()))
}

/// Writes a job's statistics record (the statistics consumer is its one writer).
pub async fn put_stats(nats: &Nats, job_id: &str, stats: &JobStats) -> Result<(), StoreError> {
    let bytes = serde_json::to_vec(stats).map_err(|source| StoreError::Decode {
        job_id: job_id.to_string(),
        source,
    })?;
    let op = "put statistics";
    let bytes = Bytes::from(bytes);
    super::answered(|| nats.stats.put(job_id, bytes.clone()))
        .await
        .map_err(|e| kv_error(job_id, op, &e))?
        .map(|_| ())
        .map_err(|e| kv_error(job_id, op, &e))
}

/// Reads a job record with the bitmap of its running step, ready to
/// resume, from the buckets' leaders.
pub async fn load(nats: &Nats, job_id: &str) -> Result<Option<(Job, u64)>, StoreError> {
    let Some((mut job, rev)) = get_with(nats, job_id, Read::LeaderAskedAgain).await? else {
        return Ok(None);
    };
    let i = job.current;
    if let Some(step) = job.steps.get_mut(i) {
        if step.state == StepState::Running {
            step.pending = match step.kind {
                StepKind::Fanout => bits(nats, job_id, i, step.total).await?.0,
                StepKind::Task => Pending::new(step.total),
            };
        }
    }
    job.recount();
    Ok(Some((job, rev)))
}

/// Reads an ended job's record (and its revision) for a redrive, with the bitmap of the
/// fanout step it would run again ([`Job::redrive_step`]). When a chunk of
/// that bitmap is missing (it expired, or the job ended before fanjet kept
/// them) and some subjob completed, the bitmap is left empty: which ones
/// did is no longer known.
pub async fn load_for_redrive(
    nats: &Nats,
    job_id: &str,
    step: Option<&str>,
) -> Result<Option<(Job, u64)>, StoreError> {
    let Some((mut job, revision)) = get_with(nats, job_id, Read::Leader).await? else {
        return Ok(None);
    };
    let Ok(i) = job.redrive_step(step) else {
        return Ok(Some((job, revision)));
    };
    let run = &mut job.steps[i];
    if run.kind == StepKind::Fanout {
        let (pending, whole) = bits(nats, job_id, i, run.total).await?;
        if whole || run.completed == 0 {
            run.pending = pending;
        } else {
            tracing::warn!(
                job_id,
                step = %run.name,
                "cannot redrive: the step's bitmap (which subjobs completed) is no longer stored"
            );
        }
    }
    Ok(Some((job, revision)))
}

/// The stored bitmap of a fanout step, and whether every chunk was there.
async fn bits(
    nats: &Nats,
    job_id: &str,
    step_index: usize,
    total: u64,
) -> Result<(Pending, bool), StoreError> {
    let mut pending = Pending::new(total);
    let mut whole = true;
    for c in 0..pending.chunk_count() {
        let key = chunk_key(job_id, step_index, c);
        let bytes = read_key(
            nats.pending_of(job_id),
            &key,
            Read::LeaderAskedAgain,
            job_id,
            "get chunk",
        )
        .await?
        .map(|(value, _)| value);
        match bytes {
            Some(b) => {
                if !pending.load_chunk(c, &b) {
                    whole = false;
                    tracing::warn!(
                        job_id,
                        key,
                        "pending chunk has the wrong size; treating it as empty"
                    );
                }
            }
            None => whole = false,
        }
    }
    Ok((pending, whole))
}

/// Every job id with a record, cell after cell.
pub async fn job_ids(nats: &Nats) -> Result<Vec<String>, StoreError> {
    let mut ids = Vec::new();
    for cell in 0..CELLS {
        ids.extend(cell_job_ids(nats, cell).await?);
    }
    Ok(ids)
}

/// The job ids with a record in one cell.
async fn cell_job_ids(nats: &Nats, cell: u32) -> Result<Vec<String>, StoreError> {
    let err = |e: &dyn std::fmt::Display| StoreError::Kv {
        job_id: "*".into(),
        op: "list",
        message: e.to_string(),
    };
    let keys = nats.jobs[cell as usize].keys().await.map_err(|e| err(&e))?;
    keys.try_collect().await.map_err(|e| err(&e))
}

/// How long a session that already knows its partition's running jobs
/// waits for the listing of active keys before it goes on with those.
const LISTING_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// [`active_ids`] if they come within [`LISTING_WAIT`]; `None` when they
/// do not (or the listing fails).
pub async fn active_ids_briefly(nats: &Nats, partition: u32) -> Option<Vec<String>> {
    match tokio::time::timeout(LISTING_WAIT, active_ids(nats, partition)).await {
        Ok(Ok(ids)) => Some(ids),
        Ok(Err(e)) => {
            tracing::debug!(partition, error = %e, "listing active keys");
            None
        }
        Err(_) => None,
    }
}

/// The running jobs of one partition, loaded to resume: those with an
/// active key (the keys of jobs that ended are deleted), and those of
/// `known` still running.
///
/// Listing the keys takes a consumer, which the cluster's JetStream meta
/// leader creates: after the loss of the node leading it, for as long as
/// the election takes (4-9 s). A session starting again in the same
/// process after a transient failure (`known`: the jobs the last one held,
/// perhaps none) waits for the listing [`LISTING_WAIT`] at most, then goes
/// on with what it knew: a job it did not know has its events, which load
/// it as they come (the partition loop's `hold_if_running`).
/// `Ok((jobs, false))` when the listing was left out.
pub async fn load_active(
    nats: &Nats,
    partition: u32,
    known: Option<&[String]>,
) -> Result<(Vec<(Job, u64)>, bool), StoreError> {
    let scanned = nats.pending[cell(partition) as usize]
        .get(active_scanned_key(partition))
        .await
        .map_err(|e| kv_error("*", "get scanned key", &e))?;
    if scanned.is_none() {
        return Ok((scan_partition(nats, partition).await?, true));
    }
    let Some(known) = known else {
        let ids = active_ids(nats, partition).await?;
        return Ok((load_listed(nats, ids).await?, true));
    };
    let listed = active_ids_briefly(nats, partition).await;
    let done = listed.is_some();
    let mut ids = listed.unwrap_or_default();
    for id in known {
        if !ids.contains(id) {
            ids.push(id.clone());
        }
    }
    Ok((load_listed(nats, ids).await?, done))
}

/// The jobs of `ids` still running, loaded; the active keys of those that
/// ended are deleted.
async fn load_listed(nats: &Nats, ids: Vec<String>) -> Result<Vec<(Job, u64)>, StoreError> {
    let mut out = Vec::new();
    for id in ids {
        match load(nats, &id).await? {
            Some((mut job, rev)) if !job.state.is_terminal() => {
                job.listed = true;
                out.push((job, rev));
            }
            // Ended: its key's deletion did not land.
            Some(_) => unlist_active(nats, "reload", &id).await?,
            // Not stored yet: a crash came between its key and its first
            // record, and its request, not acknowledged, is read again.
            // The key stays for it (it expires with the log at the latest).
            None => {}
        }
    }
    Ok(out)
}

/// The running jobs of a partition found by reading every record, once,
/// for a store written before active keys: each gets its key, then the
/// partition is marked scanned.
async fn scan_partition(nats: &Nats, partition: u32) -> Result<Vec<(Job, u64)>, StoreError> {
    let mut out = Vec::new();
    for id in cell_job_ids(nats, cell(partition))
        .await?
        .into_iter()
        .filter(|id| crate::protocol::partition(id) == partition)
    {
        // `load` reads a bitmap only for a running step.
        if let Some((mut job, rev)) = load(nats, &id).await? {
            if job.state.is_terminal() {
                continue;
            }
            list_active(nats, "reload", &id).await?;
            job.listed = true;
            out.push((job, rev));
        }
    }
    nats.pending[cell(partition) as usize]
        .put(active_scanned_key(partition), Bytes::new())
        .await
        .map_err(|e| kv_error("*", "put scanned key", &e))?;
    Ok(out)
}
