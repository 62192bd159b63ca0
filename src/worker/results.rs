//! A step's results, read from a handler through the manager's results
//! service (the worker role may not read the log): the step after a fanout
//! gets each subjob's result (or last error) once, page by page, in
//! bounded memory. The task's token proves the worker works on the job.

use std::time::Duration;

use serde_json::Value;
use thiserror::Error;

use super::TaskError;
use crate::protocol::{results_subject, ResultsPage, ResultsRequest, Task};

/// How long one page may take.
const PAGE_WAIT: Duration = Duration::from_secs(30);
/// Tries again after a transient refusal (waits of 0.1, 0.2, … 1.6 s).
const RETRIES: u32 = 5;

#[derive(Debug, Error)]
pub enum ResultsError {
    /// The service said no (`forbidden`, `not_found`, `no_such_step`,
    /// `expired`, `unavailable`, …).
    #[error("results service: {code}: {message}")]
    Refused { code: String, message: String },
    #[error("results service: {0}")]
    Nats(String),
}

impl ResultsError {
    /// Whether trying again later may work (no manager, a busy store, a
    /// job whose record is not stored yet, a reading that expired and must
    /// start again).
    pub fn is_transient(&self) -> bool {
        match self {
            ResultsError::Refused { code, .. } => {
                matches!(code.as_str(), "unavailable" | "expired")
            }
            ResultsError::Nats(_) => true,
        }
    }
}

impl ResultsError {
    fn is_expired(&self) -> bool {
        matches!(self, ResultsError::Refused { code, .. } if code == "expired")
    }
}

/// A handler that cannot read its input's results: try the task again
/// when that may help, else give up with the reason.
impl From<ResultsError> for TaskError {
    fn from(e: ResultsError) -> Self {
        match e.is_transient() {
            true => TaskError::retry(e.to_string()),
            false => TaskError::give_up(e.to_string()),
        }
    }
}

/// The results of one step of a task's job, page by page
/// ([`super::TaskContext::results`]).
pub struct Results {
    /// None for a context made without a connection (a handler's test).
    client: Option<async_nats::Client>,
    /// The first request, until it is sent.
    first: Option<(String, bytes::Bytes)>,
    /// Where the next page is, while more follow.
    next: Option<String>,
}

impl Results {
    pub(super) fn new(client: Option<async_nats::Client>, task: &Task, step: usize) -> Self {
        let request = ResultsRequest {
            token: task.token.clone(),
            step_index: task.step_index,
            index: task.index,
            run: task.run,
            step,
            batch_size: task.batch_size,
        };
        let body = serde_json::to_vec(&request).unwrap_or_default();
        Results {
            client,
            first: Some((results_subject(&task.job_id), body.into())),
            next: None,
        }
    }

    /// The next page of lines `{"index", "ok": true, "attempt", "result"}`
    /// or `{"index", "ok": false, "attempt"?, "error"}` (as `fanjet
    /// results` prints them); `None` once every result was read.
    pub async fn next_page(&mut self) -> Result<Option<Vec<Value>>, ResultsError> {
        let (subject, body) = match (self.first.take(), self.next.take()) {
            (Some(first), _) => first,
            (None, Some(next)) => (next, bytes::Bytes::new()),
            (None, None) => return Ok(None),
        };
        // A moment of unavailability (a job whose record is not stored yet,
        // NATS busy) is waited out here rather than costing an attempt.
        let mut pause = Duration::from_millis(100);
        let mut tries = 0;
        loop {
            match self.page(&subject, body.clone()).await {
                // An expired reading starts again with the task.
                Err(e) if e.is_transient() && !e.is_expired() && tries < RETRIES => {
                    tries += 1;
                    tokio::time::sleep(pause).await;
                    pause *= 2;
                }
                Err(e) => return Err(e),
                Ok(page) => {
                    self.next = page.next;
                    return Ok(Some(page.results));
                }
            }
        }
    }

    async fn page(&self, subject: &str, body: bytes::Bytes) -> Result<ResultsPage, ResultsError> {
        let Some(client) = &self.client else {
            return Err(ResultsError::Nats(
                "this task context has no connection (made by TaskContext::new)".into(),
            ));
        };
        let answer = tokio::time::timeout(PAGE_WAIT, client.request(subject.to_string(), body))
            .await
            .map_err(|_| ResultsError::Nats(format!("no page within {PAGE_WAIT:?}")))?
            .map_err(|e| ResultsError::Nats(e.to_string()))?;
        let page: ResultsPage = serde_json::from_slice(&answer.payload)
            .map_err(|e| ResultsError::Nats(format!("unreadable page: {e}")))?;
        if !page.ok {
            let e = page.error.unwrap_or_default();
            return Err(ResultsError::Refused {
                code: e["code"].as_str().unwrap_or("unknown").to_string(),
                message: e["message"].as_str().unwrap_or_default().to_string(),
            });
        }
        Ok(page)
    }

    /// Every line, for a step small enough to hold in memory.
    pub async fn all(mut self) -> Result<Vec<Value>, ResultsError> {
        let mut out = Vec::new();
        while let Some(page) = self.next_page().await? {
            out.extend(page);
        }
        Ok(out)
    }
}
