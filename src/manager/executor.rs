//! Carries out the engine's actions on NATS: appends events, enqueues tasks,
//! drops queued tasks. Publishes are pipelined (many acks awaited at once,
//! a bounded number in flight) because per-subjob work is the hot path.

use std::collections::HashMap;
use std::future::IntoFuture;
use std::sync::Arc;

use async_nats::jetstream::context::{PublishAckFuture, PublishError};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::RawMessageErrorKind;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use serde_json::Value;
use tracing::warn;

use super::ManagerError;
use crate::machine::{Action, Dispatch};
use crate::nats::log::{self, LogError};
use crate::nats::Nats;
use crate::protocol::{
    encode_json, job_tasks_filter, task_msg_id, task_subject, Event, ResultRef, Source,
    SourceField, StepKind, Task,
};

/// Publishes awaiting their ack at once, at most.
const MAX_IN_FLIGHT: usize = 1024;
/// Step inputs kept decoded (each is one logged event's payload).
const SOURCE_CACHE: usize = 64;

pub struct Executor {
    nats: Nats,
    sources: HashMap<u64, Arc<Value>>,
    acks: FuturesUnordered<<PublishAckFuture as IntoFuture>::IntoFuture>,
}

impl Executor {
    pub fn new(nats: Nats) -> Self {
        Executor {
            nats,
            sources: HashMap::new(),
            acks: FuturesUnordered::new(),
        }
    }

    /// Carries out `actions` in order; returns when every publish is
    /// acknowledged, with the jobs that must fail because an action of
    /// theirs cannot be carried out (job id, reason).
    pub async fn run(
        &mut self,
        actions: Vec<Action>,
    ) -> Result<Vec<(String, String)>, ManagerError> {
        let mut aborts = Vec::new();
        for action in actions {
            match action {
                Action::Publish(event) => self.publish_event(&event).await?,
                Action::Dispatch(d) => {
                    let job_id = d.job_id.clone();
                    if let Some(reason) = self.dispatch(d).await? {
                        warn!(
                            job_id,
                            reason, "failing the job: its tasks cannot be enqueued"
                        );
                        aborts.push((job_id, reason));
                    }
                }
                Action::PurgeTasks { job_id } => {
                    // Everything enqueued before must be in the stream before it is purged.
                    self.flush().await?;
                    self.nats
                        .tasks
                        .purge()
                        .filter(job_tasks_filter(&job_id))
                        .await
                        .map_err(|e| {
                            ManagerError::Nats(format!("purging tasks of {job_id}: {e}"))
                        })?;
                }
            }
        }
        self.flush().await?;
        Ok(aborts)
    }

    async fn publish_event(&mut self, event: &Event) -> Result<(), ManagerError> {
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
            (Err(e), _) => return Err(e.into()),
        };
        self.send(event.subject(), log::message(event, payload))
            .await
    }

    async fn send(&mut self, subject: String, msg: PublishMessage) -> Result<(), ManagerError> {
        while self.acks.len() >= MAX_IN_FLIGHT {
            if let Some(ack) = self.acks.next().await {
                ack.map_err(publish_err)?;
            }
        }
        let fut = self
            .nats
            .js
            .send_publish(subject, msg)
            .await
            .map_err(publish_err)?;
        self.acks.push(fut.into_future());
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), ManagerError> {
        while let Some(ack) = self.acks.next().await {
            ack.map_err(publish_err)?;
        }
        Ok(())
    }

    /// Enqueues a slice of a step; `Some(reason)` when it never can be.
    async fn dispatch(&mut self, d: Dispatch) -> Result<Option<String>, ManagerError> {
        let value = match self.source(&d.source).await? {
            Ok(v) => v,
            Err(reason) => return Ok(Some(format!("step {:?}: {reason}", d.step.name))),
        };
        let max = self.nats.max_payload();
        for index in d.from..d.to {
            let (item, input) = match d.step.kind {
                StepKind::Fanout => (
                    value.get(index as usize).cloned().unwrap_or(Value::Null),
                    Value::Null,
                ),
                StepKind::Task => (Value::Null, (*value).clone()),
            };
            let task = Task {
                job_id: d.job_id.clone(),
                workflow: d.workflow.clone(),
                step: d.step.name.clone(),
                step_index: d.step_index,
                handler: d.step.handler.clone(),
                index,
                total: d.total,
                kind: d.step.kind.as_str().to_string(),
                item,
                input,
                timeout_ms: d.step.timeout_ms,
                max_attempts: d.step.max_attempts,
                backoff_ms: d.step.backoff_ms.clone(),
            };
            let payload = encode_json(&task).map_err(|e| ManagerError::Nats(e.to_string()))?;
            if payload.len() > max {
                return Ok(Some(format!(
                    "step {:?}: the task for subjob {index} is {} bytes, more than the server accepts ({max})",
                    d.step.name,
                    payload.len()
                )));
            }
            let msg = PublishMessage::build()
                .payload(payload)
                .message_id(task_msg_id(&d.job_id, d.step_index, index));
            self.send(task_subject(&d.workflow, &d.step.name, &d.job_id), msg)
                .await?;
        }
        Ok(None)
    }

    /// The value a step reads: inline, or a field of an event in the log.
    /// The inner error is permanent (the job cannot go on), the outer one
    /// transient.
    async fn source(
        &mut self,
        source: &Source,
    ) -> Result<Result<Arc<Value>, String>, ManagerError> {
        let (seq, field) = match source {
            Source::Inline(v) => return Ok(Ok(Arc::new(v.clone()))),
            Source::Event { seq, field } => (*seq, *field),
        };
        if let Some(v) = self.sources.get(&seq) {
            return Ok(Ok(v.clone()));
        }
        let msg = match self.nats.events.get_raw_message(seq).await {
            Ok(m) => m,
            Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => {
                return Ok(Err(format!(
                    "its input (event {seq}) is no longer in the log"
                )));
            }
            Err(e) => {
                return Err(ManagerError::Nats(format!(
                    "reading step input at event {seq}: {e}"
                )))
            }
        };
        let value = match (serde_json::from_slice::<Event>(&msg.payload), field) {
            (Ok(Event::JobRequested(r)), SourceField::Input) => r.input,
            (Ok(Event::SubjobCompleted(c)), SourceField::Result) => c.result,
            _ => return Ok(Err(format!("event {seq} does not hold a step input"))),
        };
        let value = match ResultRef::from_value(&value) {
            None => value,
            Some(r) => match fetch_result(&self.nats, &r).await? {
                Ok(v) => v,
                Err(reason) => return Ok(Err(reason)),
            },
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
    let mut bytes = Vec::with_capacity(r.size as usize);
    object
        .read_to_end(&mut bytes)
        .await
        .map_err(|e| ManagerError::Nats(format!("reading result {}: {e}", r.name)))?;
    Ok(serde_json::from_slice(&bytes).map_err(|e| format!("result {} is not JSON: {e}", r.name)))
}

fn publish_err(e: PublishError) -> ManagerError {
    ManagerError::Nats(format!("publish: {e}"))
}
