//! Subjobs whose last attempt ran out of time. JetStream stops redelivering
//! a task after MaxDeliver attempts, leaves it in the work-queue stream and
//! emits a max-deliveries advisory; the advisories stream keeps those, and
//! this task turns each into a SubjobFailed and deletes the stuck task.
//! (A handler that fails on its last attempt reports SubjobFailed itself.)

use std::time::Duration;

use async_nats::jetstream::consumer::{self, pull};
use futures::StreamExt;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::ManagerError;
use crate::nats::{log, reader_messages, Nats};
use crate::protocol::{
    stream_cell, Event, ItemOutcome, SubjobFailed, SubjobsDone, Task, ADVISORY_CONSUMER,
    TASKS_STREAM_PREFIX,
};

#[derive(Debug, Deserialize)]
struct MaxDeliveries {
    /// The work queue (a cell's) the task is in.
    stream: String,
    stream_seq: u64,
    #[serde(default)]
    deliveries: u64,
}

pub async fn run(nats: Nats, cancel: CancellationToken) -> Result<(), ManagerError> {
    let consumer = nats
        .advisories
        .create_consumer(pull::Config {
            durable_name: Some(ADVISORY_CONSUMER.into()),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: Duration::from_secs(30),
            ..Default::default()
        })
        .await
        .map_err(|e| ManagerError::Nats(format!("creating the advisory consumer: {e}")))?;
    let mut messages = reader_messages(&consumer)
        .await
        .map_err(|e| ManagerError::Nats(format!("pulling advisories: {e}")))?;
    loop {
        let msg = tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            m = messages.next() => match m {
                Some(Ok(m)) => m,
                Some(Err(e)) => { warn!(error = %e, "advisory pull"); continue; }
                None => return Ok(()),
            },
        };
        match handle(&nats, &msg.payload).await {
            Ok(()) => {
                if let Err(e) = msg.ack().await {
                    warn!(error = %e, "acking an advisory");
                }
            }
            Err(e) => warn!(error = %e, "handling an advisory; it will be retried"),
        }
    }
}

async fn handle(nats: &Nats, payload: &[u8]) -> Result<(), String> {
    let adv: MaxDeliveries = match serde_json::from_slice(payload) {
        Ok(a) => a,
        Err(e) => {
            warn!(error = %e, "ignoring an unreadable advisory");
            return Ok(());
        }
    };
    let Some(queue) = stream_cell(&adv.stream)
        .filter(|_| adv.stream.starts_with(TASKS_STREAM_PREFIX))
        .map(|cell| &nats.tasks[cell as usize])
    else {
        warn!(
            stream = adv.stream,
            "ignoring an advisory of a stream not fanjet's work queue"
        );
        return Ok(());
    };
    let raw = match queue.get_raw_message(adv.stream_seq).await {
        Ok(m) => m,
        // Gone already (acked late, purged, or handled before a restart).
        Err(_) => return Ok(()),
    };
    if let Ok(task) = serde_json::from_slice::<Task>(&raw.payload) {
        let attempts = u32::try_from(adv.deliveries).unwrap_or(task.max_attempts);
        let error = format!(
            "no answer within the {} ms timeout on the last of {} attempts (worker crashed or hung)",
            task.timeout_ms, task.max_attempts
        );
        let event = match task.batch_size {
            // A batch: each of its subjobs fails.
            Some(batch_size) => Event::SubjobsDone(SubjobsDone {
                job_id: task.job_id.clone(),
                step_index: task.step_index,
                index: task.index,
                batch_size,
                attempt: attempts,
                duration_ms: 0,
                outcomes: task
                    .indices
                    .iter()
                    .map(|&index| ItemOutcome {
                        index,
                        attempt: attempts,
                        result: serde_json::Value::Null,
                        error: Some(error.clone()),
                    })
                    .collect(),
                run: task.run,
                token: task.token.clone(),
            }),
            None => Event::SubjobFailed(SubjobFailed {
                job_id: task.job_id.clone(),
                step_index: task.step_index,
                index: task.index,
                attempt: attempts,
                error,
                run: task.run,
                token: task.token.clone(),
            }),
        };
        log::append(nats, &event).await.map_err(|e| e.to_string())?;
        info!(job_id = %task.job_id, step = %task.step, index = task.index, "subjob exhausted its attempts");
    } else {
        warn!(
            seq = adv.stream_seq,
            "an exhausted task is unreadable; deleting it"
        );
    }
    queue
        .delete_message(adv.stream_seq)
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}
