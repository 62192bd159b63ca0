//! Batches: a task of a fanout step with `batch_size` > 1 carries the
//! items of several subjobs. The handler gets them together; an item that
//! fails with a retryable error is retried alone (the handler called with
//! that item only, after the step's backoff) until its attempts run out, so
//! one bad item neither fails nor re-runs its batch. The batch's outcomes
//! go to the log together, in as few `SubjobsDone` events as the server's
//! payload limit allows, before the task is acknowledged.
//!
//! The task stays alive at the server while the batch and its retries run
//! (in-progress acks); a worker that dies mid-batch has the whole batch
//! delivered again, and the manager counts each subjob's first outcome.

use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use async_nats::jetstream::AckKind;
use futures::FutureExt;
use serde_json::Value;
use tokio::sync::OwnedSemaphorePermit;
use tracing::{debug, warn};

use super::{offload, BatchContext, StepHandler, TaskContext, TaskError};
use crate::nats::log::{self, LogError};
use crate::nats::WorkerNats;
use crate::protocol::{bounded, Event, ItemOutcome, SubjobsDone, Task, MAX_ERROR_BYTES};

/// Runs a batch task and settles its message.
pub(super) async fn process(
    nats: &WorkerNats,
    msg: async_nats::jetstream::Message,
    task: Task,
    attempt: u32,
    handler: StepHandler,
    max_payload: usize,
    slot: OwnedSemaphorePermit,
) {
    let started = Instant::now();
    let progress_every = Duration::from_millis((task.timeout_ms / 3).max(500));
    let work = run(nats, &task, attempt, &handler);
    tokio::pin!(work);
    let mut ticker =
        tokio::time::interval_at(tokio::time::Instant::now() + progress_every, progress_every);
    let outcomes = loop {
        tokio::select! {
            outcomes = &mut work => break outcomes,
            _ = ticker.tick() => {
                if let Err(e) = msg.ack_with(AckKind::Progress).await {
                    debug!(error = %e, "in-progress ack");
                }
            }
        }
    };
    // The slot was the handler's: reporting waits on the job's cell's log,
    // which must not keep a slot another cell's task could use.
    drop(slot);
    let done = SubjobsDone {
        job_id: task.job_id.clone(),
        step_index: task.step_index,
        index: task.index,
        batch_size: task.batch_size.unwrap_or(1),
        attempt,
        duration_ms: started.elapsed().as_millis() as u64,
        outcomes,
        run: task.run,
        token: task.token.clone(),
    };
    for (event, payload) in events(done, max_payload) {
        if let Err(e) =
            log::append_retrying(&nats.js, &event, payload, log::OUTCOME_APPEND_FOR).await
        {
            // Not acked: the batch comes back after its deadline and runs again.
            warn!(job_id = %task.job_id, index = task.index, error = %e, "could not report a batch's outcomes");
            return;
        }
    }
    if let Err(e) = msg.ack_with(AckKind::Ack).await {
        warn!(job_id = %task.job_id, index = task.index, error = %e, "could not ack a batch task");
    }
}

/// Runs the batch, then each item that failed and may be tried again
/// alone; gives one outcome per item, in the task's order.
async fn run(
    nats: &WorkerNats,
    task: &Task,
    attempt: u32,
    handler: &StepHandler,
) -> Vec<ItemOutcome> {
    let n = task.indices.len();
    let firsts = call(
        nats,
        handler,
        task,
        attempt,
        task.indices.clone(),
        task.items.clone(),
    )
    .await;
    let mut outcomes = Vec::with_capacity(n);
    for (i, result) in firsts.into_iter().enumerate() {
        let index = task.indices[i];
        let mut tries = attempt;
        let mut result = result;
        loop {
            let result_now = match result {
                Ok(value) => offload(nats, value).await,
                Err(e) => Err(e),
            };
            match result_now {
                Ok(value) => {
                    outcomes.push(ItemOutcome {
                        index,
                        attempt: tries,
                        result: value,
                        error: None,
                    });
                    break;
                }
                Err(TaskError::Retry { message, after }) if tries < task.max_attempts => {
                    let delay = after.unwrap_or_else(|| task.backoff_after(tries));
                    debug!(job_id = %task.job_id, index, tries, ?delay, error = %message, "retrying an item alone");
                    tokio::time::sleep(delay).await;
                    tries += 1;
                    let item = task.items.get(i).cloned().unwrap_or(Value::Null);
                    result = call(nats, handler, task, tries, vec![index], vec![item])
                        .await
                        .into_iter()
                        .next()
                        .unwrap_or_else(|| Err(TaskError::retry("the handler returned nothing")));
                }
                Err(e) => {
                    let error = match &e {
                        TaskError::Retry { message, .. } => format!(
                            "{message} (attempt {tries} of {}, no attempts left)",
                            task.max_attempts
                        ),
                        TaskError::GiveUp { message } => message.clone(),
                    };
                    outcomes.push(ItemOutcome {
                        index,
                        attempt: tries,
                        result: Value::Null,
                        error: Some(bounded(&error, MAX_ERROR_BYTES)),
                    });
                    break;
                }
            }
        }
    }
    outcomes
}

/// One handler call on `items` (subjobs `indices` of the task): a result
/// per item. A failure of the whole call (an error, a panic, the step's
/// run_timeout, a wrong number of results) is every item's.
async fn call(
    nats: &WorkerNats,
    handler: &StepHandler,
    task: &Task,
    attempt: u32,
    indices: Vec<u64>,
    items: Vec<Value>,
) -> Vec<Result<Value, TaskError>> {
    let n = indices.len();
    let work = async {
        match (&handler.batch, &handler.one) {
            (Some(batch), _) => {
                let ctx = BatchContext {
                    task: task.clone(),
                    attempt,
                    indices,
                    items,
                    client: Some(nats.client.clone()),
                };
                AssertUnwindSafe(batch(ctx)).catch_unwind().await
            }
            (None, Some(one)) => {
                // A handler of one subjob: the items one after the other.
                AssertUnwindSafe(async {
                    let mut results = Vec::with_capacity(n);
                    for (index, item) in indices.into_iter().zip(items) {
                        let ctx = TaskContext {
                            task: single(task, index, item),
                            attempt,
                            client: Some(nats.client.clone()),
                        };
                        results.push(one(ctx).await);
                    }
                    Ok(results)
                })
                .catch_unwind()
                .await
            }
            (None, None) => Ok(Err(TaskError::give_up("no handler for this step"))),
        }
    };
    let ran_out = async {
        match task.run_timeout_ms {
            Some(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
            None => std::future::pending().await,
        }
    };
    let whole = tokio::select! {
        r = work => match r {
            Ok(Ok(results)) if results.len() == n => return results,
            Ok(Ok(results)) => TaskError::retry(format!(
                "the handler returned {} results for {n} items",
                results.len()
            )),
            Ok(Err(e)) => e,
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "handler panicked".into());
                TaskError::retry(format!("handler panicked: {what}"))
            }
        },
        _ = ran_out => TaskError::retry(format!(
            "the attempt ran past the step's run_timeout of {} ms",
            task.run_timeout_ms.unwrap_or_default()
        )),
    };
    vec![Err(whole); n]
}

/// The task of one subjob of a batch, as a handler of one subjob sees it.
pub(super) fn single(task: &Task, index: u64, item: Value) -> Task {
    Task {
        index,
        item,
        indices: Vec::new(),
        items: Vec::new(),
        batch_size: None,
        ..task.clone()
    }
}

/// The batch's outcomes as events the server takes: one, or several with
/// the outcomes split between them when one would be larger than
/// `max_payload`; an outcome too large alone fails its subjob.
fn events(done: SubjobsDone, max_payload: usize) -> Vec<(Event, bytes::Bytes)> {
    let mut out = Vec::new();
    let mut parts = vec![done];
    while let Some(mut part) = parts.pop() {
        let event = Event::SubjobsDone(part.clone());
        match log::encode(&event, max_payload) {
            Ok(bytes) => out.push((event, bytes)),
            Err(LogError::TooLarge { .. }) if part.outcomes.len() > 1 => {
                let rest = part.outcomes.split_off(part.outcomes.len() / 2);
                let mut second = part.clone();
                second.outcomes = rest;
                parts.push(second);
                parts.push(part);
            }
            Err(LogError::TooLarge { bytes, max, .. }) => {
                for o in &mut part.outcomes {
                    o.result = Value::Null;
                    o.error = Some(format!(
                        "result too large: {bytes} bytes, the server accepts {max}"
                    ));
                }
                let event = Event::SubjobsDone(part);
                if let Ok(bytes) = log::encode(&event, max_payload) {
                    out.push((event, bytes));
                }
            }
            Err(e) => {
                warn!(job_id = %part.job_id, index = part.index, error = %e, "could not encode a batch's outcomes");
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn done(n: u64, result_bytes: usize) -> SubjobsDone {
        SubjobsDone {
            job_id: "j".into(),
            step_index: 1,
            index: 0,
            batch_size: n,
            attempt: 1,
            duration_ms: 5,
            outcomes: (0..n)
                .map(|index| ItemOutcome {
                    index,
                    attempt: 1,
                    result: json!("x".repeat(result_bytes)),
                    error: None,
                })
                .collect(),
            run: 0,
            token: "t".into(),
        }
    }

    fn indices(events: &[(Event, bytes::Bytes)]) -> Vec<u64> {
        let mut all: Vec<u64> = events
            .iter()
            .flat_map(|(e, _)| match e {
                Event::SubjobsDone(d) => d.outcomes.iter().map(|o| o.index).collect(),
                _ => Vec::new(),
            })
            .collect();
        all.sort_unstable();
        all
    }

    #[test]
    fn a_batch_that_fits_is_one_event() {
        let events = events(done(10, 10), 1 << 20);
        assert_eq!(events.len(), 1);
        assert_eq!(indices(&events), (0..10).collect::<Vec<_>>());
    }

    #[test]
    fn a_batch_too_large_is_split_and_every_outcome_goes_once() {
        let events = events(done(10, 100_000), 300_000);
        assert!(events.len() >= 4, "{}", events.len());
        assert!(events.iter().all(|(_, b)| b.len() <= 300_000));
        assert_eq!(indices(&events), (0..10).collect::<Vec<_>>());
    }

    #[test]
    fn an_outcome_too_large_alone_fails_its_subjob() {
        let events = events(done(2, 500_000), 300_000);
        assert_eq!(indices(&events), vec![0, 1]);
        for (e, _) in &events {
            let Event::SubjobsDone(d) = e else { panic!() };
            assert!(d.outcomes[0]
                .error
                .as_deref()
                .unwrap()
                .contains("too large"));
        }
    }
}
