//! Carries out the engine's actions on NATS: appends events, enqueues tasks,
//! drops queued tasks, writes checkpoints, acknowledges the events applied.
//! Publishes are pipelined (many acks awaited at once, a bounded number in
//! flight) because per-subjob work is the hot path; every publish is
//! confirmed before a checkpoint is written or an ack sent, so a stored
//! record never claims more than the streams hold.
//!
//! Every write, publish and ack first checks the partition lease's
//! [`Fence`]: once the lease is not certainly held, nothing goes out
//! ([`ManagerError::Fenced`]), and a record another manager wrote
//! ([`ManagerError::Conflict`]) ends the session, whose state is stale.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use async_nats::jetstream::context::PublishError;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::publish::PublishAck;
use async_nats::jetstream::Message;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use serde_json::Value;
use tracing::warn;

use super::ManagerError;
use crate::machine::{Action, Checkpoint, Dispatch, Input, Write};
use crate::nats::leases::Fence;
use crate::nats::log::{self, LogError};
use crate::nats::objects::{ItemReader, ItemsReadError};
use crate::nats::publish::{self, ConfirmError};
use crate::nats::store::{self, StoreError};
use crate::nats::Nats;
use crate::protocol::{
    encode_json, job_tasks_filter, task_msg_id, task_subject, Event, ResultRef, Source,
    SourceField, StepKind, Task, TaskKey, MANAGER_HEADER,
};

/// Publishes awaiting their ack at once, at most.
const MAX_IN_FLIGHT: usize = 1024;
/// Step inputs kept decoded (each is one logged event's payload).
const SOURCE_CACHE: usize = 64;
/// Readers of items objects kept between dispatches.
const READERS_KEPT: usize = 32;
/// Jobs checkpointed at once, at most.
const CHECKPOINTS_IN_FLIGHT: usize = 32;

/// Who writes, and under which lease.
#[derive(Debug, Clone)]
pub struct Writer {
    /// The manager's process id, in the [`MANAGER_HEADER`] of every event
    /// and task it publishes: an audit of who wrote what, and when.
    pub manager: String,
    /// The partition lease's fence, checked before every write.
    pub fence: Fence,
}

pub struct Executor {
    nats: Nats,
    writer: Writer,
    sources: HashMap<u64, Arc<Value>>,
    /// Objects of items counted (and their digest checked) already.
    counted: HashSet<String>,
    /// Where the last dispatch of each step run over an object's items
    /// stopped reading.
    readers: HashMap<String, ItemReader>,
    /// Acks awaited, each naming the subject published to if it fails.
    acks: FuturesUnordered<BoxFuture<'static, Result<PublishAck, ManagerError>>>,
    /// The stored revision of each job record held.
    revisions: HashMap<String, u64>,
    /// The last event applied and not yet acknowledged.
    unacked: Option<Message>,
}

impl Executor {
    pub fn new(nats: Nats, writer: Writer) -> Self {
        Executor {
            nats,
            writer,
            sources: HashMap::new(),
            counted: HashSet::new(),
            readers: HashMap::new(),
            acks: FuturesUnordered::new(),
            revisions: HashMap::new(),
            unacked: None,
        }
    }

    /// Starts over from stored records: `revisions` of the jobs loaded.
    /// The acks a failed session still awaited go with it: what they
    /// confirm is published again from the checkpoints (under the same
    /// message ids, so the streams keep one copy), and one kept would
    /// fail the next session with the last one's error.
    pub fn reset(&mut self, revisions: HashMap<String, u64>) {
        self.revisions = revisions;
        self.unacked = None;
        self.acks = FuturesUnordered::new();
    }

    /// A job loaded again (an ended one, redriven) at `revision`.
    pub fn track(&mut self, job_id: String, revision: u64) {
        self.revisions.insert(job_id, revision);
    }

    /// Notes the last event of a batch handed to the engine: the next
    /// [`Action::Ack`] acknowledges it and everything before it.
    pub fn applied(&mut self, last: Message) {
        self.unacked = Some(last);
    }

    /// Carries out `actions` in order; returns when every publish is
    /// acknowledged, with what the engine must be told: jobs that must
    /// fail because an action of theirs cannot be carried out
    /// ([`Input::Abort`]).
    pub async fn run(&mut self, actions: Vec<Action>) -> Result<Vec<Input>, ManagerError> {
        let mut feedback = Vec::new();
        let mut checkpoints = Vec::new();
        for action in actions {
            if let Action::Checkpoint(cp) = action {
                checkpoints.push(cp);
                continue;
            }
            // Consecutive checkpoints are written together, before what follows.
            self.checkpoint(std::mem::take(&mut checkpoints)).await?;
            match action {
                Action::Checkpoint(_) => {}
                Action::Ack => {
                    self.flush().await?;
                    self.writer.fence.check()?;
                    if let Some(last) = self.unacked.take() {
                        last.ack()
                            .await
                            .map_err(|e| ManagerError::Nats(format!("acking events: {e}")))?;
                    }
                }
                Action::Publish(event) => {
                    if let Some(reason) = self.publish_event(&event).await? {
                        warn!(
                            job_id = event.job_id(),
                            reason, "failing the job: an event of it cannot be logged"
                        );
                        feedback.push(Input::Abort {
                            job_id: event.job_id().to_string(),
                            reason,
                        });
                    }
                }
                Action::Dispatch(d) => {
                    let job_id = d.job_id.clone();
                    if let Some(reason) = self.dispatch(d).await? {
                        warn!(
                            job_id,
                            reason, "failing the job: its tasks cannot be enqueued"
                        );
                        feedback.push(Input::Abort { job_id, reason });
                    }
                }
                Action::PurgeTasks { job_id } => {
                    // Everything enqueued before must be in the stream before it is purged.
                    self.flush().await?;
                    self.writer.fence.check()?;
                    self.nats
                        .task_queue(&job_id)
                        .purge()
                        .filter(job_tasks_filter(&job_id))
                        .await
                        .map_err(|e| {
                            ManagerError::Nats(format!("purging tasks of {job_id}: {e}"))
                        })?;
                }
            }
        }
        self.checkpoint(checkpoints).await?;
        self.flush().await?;
        Ok(feedback)
    }

    /// Writes checkpoints, several jobs at once, each job's writes in
    /// order; a record another manager changed ends the session.
    async fn checkpoint(&mut self, checkpoints: Vec<Checkpoint>) -> Result<(), ManagerError> {
        if checkpoints.is_empty() {
            return Ok(());
        }
        // The records must not claim a task or event the streams lack.
        self.flush().await?;
        let nats = &self.nats;
        let revisions = &self.revisions;
        let writer = &self.writer;
        let written: Vec<(Checkpoint, Result<u64, ManagerError>)> =
            futures::stream::iter(checkpoints)
                .map(|cp| async move {
                    let revision = revisions.get(&cp.job_id).copied();
                    let result = write(nats, writer, &cp, revision).await;
                    (cp, result)
                })
                .buffer_unordered(CHECKPOINTS_IN_FLIGHT)
                .collect()
                .await;
        let mut failed = None;
        for (cp, result) in written {
            match result {
                Ok(_) if cp.ended => {
                    self.revisions.remove(&cp.job_id);
                }
                Ok(revision) => {
                    self.revisions.insert(cp.job_id, revision);
                }
                Err(e) => {
                    // A conflict says the most; any error ends the session.
                    if failed.is_none() || matches!(e, ManagerError::Conflict(_)) {
                        failed = Some(e);
                    }
                }
            }
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Appends an event (pipelined); `Some(reason)` when it can never be
    /// logged (too large: every text in it is bounded, so this is a bug, but
    /// it must not stop the partition).
    async fn publish_event(&mut self, event: &Event) -> Result<Option<String>, ManagerError> {
        let max = self.nats.max_payload();
        let payload = match (log::encode(event, max), event) {
            (Ok(payload), _) => payload,
            (Err(LogError::TooLarge { bytes, .. }), Event::JobCompleted(done)) => {
                // Only a job's output can be this large (it came in a result
                // that fit, plus a little); the event goes out without it.
                let mut slim = done.clone();
                slim.output = serde_json::json!({"omitted": "larger than the server's max payload; see the last step's SubjobCompleted"});
                warn!(
                    job_id = event.job_id(),
                    bytes, "JobCompleted too large; sending it without its output"
                );
                log::encode(&Event::JobCompleted(slim), max)?
            }
            (Err(e @ LogError::TooLarge { .. }), _) => return Ok(Some(e.to_string())),
            (Err(e), _) => return Err(e.into()),
        };
        self.send(
            event.subject(),
            event.msg_id(),
            log::message(event, payload),
        )
        .await?;
        Ok(None)
    }

    /// Publishes `msg` (whose message id is `id`) without waiting for its
    /// ack; a failed publish names both.
    async fn send(
        &mut self,
        subject: String,
        id: String,
        msg: PublishMessage,
    ) -> Result<(), ManagerError> {
        while self.acks.len() >= MAX_IN_FLIGHT {
            if let Some(ack) = self.acks.next().await {
                ack?;
            }
        }
        self.writer.fence.check()?;
        let msg = msg.header(MANAGER_HEADER, self.writer.manager.as_str());
        let fut = self
            .nats
            .js
            .send_publish(subject.clone(), msg.clone())
            .await
            .map_err(|e| publish_err(&subject, &id, e))?;
        let (js, fence) = (self.nats.js.clone(), self.writer.fence.clone());
        self.acks.push(
            async move {
                publish::confirmed(&js, &subject, &msg, fut, || fence.check())
                    .await
                    .map_err(|e| match e {
                        ConfirmError::Fenced(f) => f.into(),
                        ConfirmError::Publish(e) => publish_err(&subject, &id, e),
                    })
            }
            .boxed(),
        );
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), ManagerError> {
        while let Some(ack) = self.acks.next().await {
            ack?;
        }
        Ok(())
    }

    /// Enqueues a slice of a step; `Some(reason)` when it never can be.
    async fn dispatch(&mut self, mut d: Dispatch) -> Result<Option<String>, ManagerError> {
        let indices: Vec<u64> = match d.indices.take() {
            Some(list) => list,
            None => (d.from..d.to).collect(),
        };
        let (items, input) = match d.step.kind {
            StepKind::Fanout => match self.items(&d, &indices).await? {
                Ok(items) => (items, Arc::new(Value::Null)),
                Err(reason) => return Ok(Some(format!("step {:?}: {reason}", d.step.name))),
            },
            StepKind::Task => match self.source(&d.job_id, &d.source).await? {
                Ok(v) => (vec![Value::Null; indices.len()], v),
                Err(reason) => return Ok(Some(format!("step {:?}: {reason}", d.step.name))),
            },
        };
        let max = self.nats.max_payload();
        let key = self.nats.task_key.clone().ok_or_else(|| {
            ManagerError::Nats("this connection did not read the task token key".into())
        })?;
        if d.step.batch_size > 1 {
            return self.dispatch_batches(&d, &key, max, indices, items).await;
        }
        for (index, item) in indices.into_iter().zip(items) {
            let task = Task {
                indices: Vec::new(),
                items: Vec::new(),
                batch_size: None,
                job_id: d.job_id.clone(),
                workflow: d.workflow.clone(),
                step: d.step.name.clone(),
                step_index: d.step_index,
                handler: d.step.handler.clone(),
                index,
                total: d.total,
                kind: d.step.kind.as_str().to_string(),
                item,
                input: (*input).clone(),
                timeout_ms: d.step.timeout_ms,
                run_timeout_ms: d.step.run_timeout_ms,
                max_attempts: d.step.max_attempts,
                backoff_ms: d.step.backoff_ms.clone(),
                run: d.run,
                token: key.token(&d.job_id, d.step_index, index, d.run),
            };
            let payload = encode_json(&task).map_err(|e| ManagerError::Nats(e.to_string()))?;
            if payload.len() > max {
                return Ok(Some(format!(
                    "step {:?}: the task for subjob {index} is {} bytes, more than the server accepts ({max})",
                    d.step.name,
                    payload.len()
                )));
            }
            let id = task_msg_id(&d.job_id, d.step_index, index, d.run);
            let msg = PublishMessage::build().payload(payload).message_id(&id);
            self.send(task_subject(&d.workflow, &d.step.name, &d.job_id), id, msg)
                .await?;
        }
        Ok(None)
    }

    /// Enqueues a batched fanout's subjobs: one task per block of
    /// `batch_size` (from a multiple of it) holding the block's subjobs
    /// among `indices` (a redriven step skips those that completed), with
    /// their `items`.
    async fn dispatch_batches(
        &mut self,
        d: &Dispatch,
        key: &TaskKey,
        max: usize,
        indices: Vec<u64>,
        items: Vec<Value>,
    ) -> Result<Option<String>, ManagerError> {
        let size = d.step.batch_size;
        let mut block: Vec<u64> = Vec::new();
        let mut block_items: Vec<Value> = Vec::new();
        let mut pairs = indices.into_iter().zip(items).peekable();
        while let Some((index, item)) = pairs.next() {
            block.push(index);
            block_items.push(item);
            let ends = pairs
                .peek()
                .is_none_or(|(next, _)| next / size != index / size);
            if !ends {
                continue;
            }
            let (batch, batch_items) =
                (std::mem::take(&mut block), std::mem::take(&mut block_items));
            if let Some(reason) = self.enqueue_batch(d, key, max, batch, batch_items).await? {
                return Ok(Some(reason));
            }
        }
        Ok(None)
    }

    /// Enqueues one batch task (subjobs `batch`, all in one block).
    async fn enqueue_batch(
        &mut self,
        d: &Dispatch,
        key: &TaskKey,
        max: usize,
        batch: Vec<u64>,
        items: Vec<Value>,
    ) -> Result<Option<String>, ManagerError> {
        let size = d.step.batch_size;
        let Some(&first_index) = batch.first() else {
            return Ok(None);
        };
        let first = first_index - first_index % size;
        let task = Task {
            job_id: d.job_id.clone(),
            workflow: d.workflow.clone(),
            step: d.step.name.clone(),
            step_index: d.step_index,
            handler: d.step.handler.clone(),
            index: first,
            total: d.total,
            kind: d.step.kind.as_str().to_string(),
            item: Value::Null,
            indices: batch,
            items,
            batch_size: Some(size),
            input: Value::Null,
            timeout_ms: d.step.timeout_ms,
            run_timeout_ms: d.step.run_timeout_ms,
            max_attempts: d.step.max_attempts,
            backoff_ms: d.step.backoff_ms.clone(),
            run: d.run,
            token: key.batch_token(&d.job_id, d.step_index, first, size, d.run),
        };
        let payload = encode_json(&task).map_err(|e| ManagerError::Nats(e.to_string()))?;
        if payload.len() > max {
            return Ok(Some(format!(
                "step {:?}: the task for the batch of subjobs from {first} is {} bytes, more than the server accepts ({max}); lower batch_size",
                d.step.name,
                payload.len()
            )));
        }
        // A block split over two dispatches (a window's edge) is two tasks.
        let id = format!(
            "{}:b{}",
            task_msg_id(&d.job_id, d.step_index, first, d.run),
            task.indices[0]
        );
        let msg = PublishMessage::build().payload(payload).message_id(&id);
        self.send(task_subject(&d.workflow, &d.step.name, &d.job_id), id, msg)
            .await?;
        Ok(None)
    }

    /// The items of a fanout's subjobs `indices` (ascending): from the
    /// array its source holds, or read from the object the source refers
    /// to (a large result, or items put in the object store), which is
    /// never decoded whole: its items are counted once (the store checks
    /// its digest on the way), then read in order by a reader kept for the
    /// next dispatch. The inner error is permanent, the outer transient.
    async fn items(
        &mut self,
        d: &Dispatch,
        indices: &[u64],
    ) -> Result<Result<Vec<Value>, String>, ManagerError> {
        let raw = match self.raw(&d.job_id, &d.source).await? {
            Ok(v) => v,
            Err(reason) => return Ok(Err(reason)),
        };
        let Some(r) = ResultRef::from_value(&raw) else {
            return Ok(Ok(indices
                .iter()
                .map(|&i| raw.get(i as usize).cloned().unwrap_or(Value::Null))
                .collect()));
        };
        let fail = |e: ItemsReadError| match e.permanent {
            true => Ok(Err(format!("its items: {}", e.message))),
            false => Err(ManagerError::Nats(e.message)),
        };
        if !self.counted.contains(&r.name) {
            let reader = match ItemReader::open(&self.nats.results, &r).await {
                Ok(reader) => reader,
                Err(e) => return fail(e),
            };
            let n = match reader.count_rest().await {
                Ok(n) => n,
                Err(e) => return fail(e),
            };
            if r.array_len.is_some_and(|len| len != n) {
                return Ok(Err(format!(
                    "its items: object {} holds {n} items, its reference says {}",
                    r.name,
                    r.array_len.unwrap_or_default()
                )));
            }
            if self.counted.len() >= SOURCE_CACHE {
                self.counted.clear();
            }
            self.counted.insert(r.name.clone());
        }
        // A reader per step run: two jobs over the same object each read
        // on from where their last dispatch stopped.
        let at = format!("{}:{}:{}", d.job_id, d.step_index, d.run);
        let mut reader = match self.readers.remove(&at) {
            Some(reader) if indices.first().is_none_or(|&i| i >= reader.position()) => reader,
            _ => match ItemReader::open(&self.nats.results, &r).await {
                Ok(reader) => reader,
                Err(e) => return fail(e),
            },
        };
        let mut items = Vec::with_capacity(indices.len());
        for &i in indices {
            if i < reader.position() {
                reader = match ItemReader::open(&self.nats.results, &r).await {
                    Ok(reader) => reader,
                    Err(e) => return fail(e),
                };
            }
            let bytes = match reader.item(i).await {
                Ok(Some(bytes)) => bytes,
                Ok(None) => {
                    return Ok(Err(format!("its items: object {} has no item {i}", r.name)))
                }
                Err(e) => return fail(e),
            };
            match serde_json::from_slice(&bytes) {
                Ok(v) => items.push(v),
                Err(e) => {
                    return Ok(Err(format!(
                        "its items: item {i} of object {} is not JSON: {e}",
                        r.name
                    )))
                }
            }
        }
        if self.readers.len() >= READERS_KEPT {
            self.readers.clear();
        }
        self.readers.insert(at, reader);
        Ok(Ok(items))
    }

    /// The value a step reads: inline, or a field of an event in the log,
    /// a large result read whole from the object store. The inner error is
    /// permanent (the job cannot go on), the outer one transient.
    async fn source(
        &mut self,
        job_id: &str,
        source: &Source,
    ) -> Result<Result<Arc<Value>, String>, ManagerError> {
        let raw = match self.raw(job_id, source).await? {
            Ok(v) => v,
            Err(reason) => return Ok(Err(reason)),
        };
        match ResultRef::from_value(&raw) {
            None => Ok(Ok(raw)),
            Some(r) => Ok(fetch_result(&self.nats, &r).await?.map(Arc::new)),
        }
    }

    /// The value a step reads as its event holds it (a large result as its
    /// reference), kept for the next dispatches.
    async fn raw(
        &mut self,
        job_id: &str,
        source: &Source,
    ) -> Result<Result<Arc<Value>, String>, ManagerError> {
        let (seq, field) = match source {
            Source::Inline(v) => return Ok(Ok(Arc::new(v.clone()))),
            Source::Event { seq, field } => (*seq, *field),
        };
        if let Some(v) = self.sources.get(&seq) {
            return Ok(Ok(v.clone()));
        }
        let Some(payload) = log::event_at(&self.nats, job_id, seq).await? else {
            return Ok(Err(format!(
                "its input (event {seq}) is no longer in the log"
            )));
        };
        let value = match (serde_json::from_slice::<Event>(&payload), field) {
            (Ok(Event::JobRequested(r)), SourceField::Input) => r.input,
            (Ok(Event::SubjobCompleted(c)), SourceField::Result) => c.result,
            // A task step's one completion, reported with others.
            (Ok(Event::SubjobsCompleted(mut c)), SourceField::Result) if c.outcomes.len() == 1 => {
                c.outcomes.remove(0).result
            }
            _ => return Ok(Err(format!("event {seq} does not hold a step input"))),
        };
        if self.sources.len() >= SOURCE_CACHE {
            self.sources.clear();
        }
        let v = Arc::new(value);
        self.sources.insert(seq, v.clone());
        Ok(Ok(v))
    }
}

/// Reads a large result from the object store. The inner error is
/// permanent (gone or unreadable), the outer one transient.
async fn fetch_result(nats: &Nats, r: &ResultRef) -> Result<Result<Value, String>, ManagerError> {
    use tokio::io::AsyncReadExt;
    let mut object = match nats.results.get(&r.name).await {
        Ok(o) => o,
        Err(e) if e.kind() == async_nats::jetstream::object_store::GetErrorKind::NotFound => {
            return Ok(Err(format!(
                "its input (result {}) is no longer in the object store",
                r.name
            )));
        }
        Err(e) => {
            return Err(ManagerError::Nats(format!(
                "reading result {}: {e}",
                r.name
            )))
        }
    };
    // The object must be the one the worker reported; the store checks
    // while reading that the content matches the object's digest.
    if r.digest.is_some() && object.info.digest != r.digest {
        return Ok(Err(format!(
            "its input (result {}) was replaced in the object store after it was reported (digest {:?}, expected {:?})",
            r.name, object.info.digest, r.digest
        )));
    }
    let mut bytes = Vec::with_capacity(r.size as usize);
    if let Err(e) = object.read_to_end(&mut bytes).await {
        return match e.kind() {
            std::io::ErrorKind::InvalidData => Ok(Err(format!(
                "its input (result {}) does not match its digest: {e}",
                r.name
            ))),
            _ => Err(ManagerError::Nats(format!(
                "reading result {}: {e}",
                r.name
            ))),
        };
    }
    Ok(serde_json::from_slice(&bytes).map_err(|e| format!("result {} is not JSON: {e}", r.name)))
}

/// Makes one job's checkpoint writes in order, each under the fence;
/// returns the record's new revision.
async fn write(
    nats: &Nats,
    writer: &Writer,
    cp: &Checkpoint,
    revision: Option<u64>,
) -> Result<u64, ManagerError> {
    let mut stored = None;
    let author = writer.manager.as_str();
    for w in &cp.writes {
        writer.fence.check()?;
        match w {
            Write::Record(record) => {
                let put =
                    store::put_record(nats, author, &cp.job_id, record.clone(), revision).await;
                stored = Some(put.map_err(|e| match e {
                    e @ StoreError::Conflict { .. } => ManagerError::Conflict(e),
                    e => e.into(),
                })?);
            }
            Write::Chunk {
                step_index,
                chunk,
                bits,
            } => {
                store::put_chunk(nats, author, &cp.job_id, *step_index, *chunk, bits.clone())
                    .await?
            }
            Write::DeleteChunk { step_index, chunk } => {
                store::delete_chunk(nats, author, &cp.job_id, *step_index, *chunk).await?
            }
            Write::Listed => store::list_active(nats, author, &cp.job_id).await?,
            Write::Unlisted => store::unlist_active(nats, author, &cp.job_id).await?,
        }
    }
    Ok(stored.or(revision).unwrap_or_default())
}

fn publish_err(subject: &str, id: &str, e: PublishError) -> ManagerError {
    ManagerError::Nats(format!("publishing {id} to {subject}: {e}"))
}
