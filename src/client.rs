//! What any client of fanjet does over NATS, as the protocol describes it:
//! submit a job through the intake, ask for its cancellation, ask the
//! manager's status service as a customer. The CLI and the HTTP API use it;
//! the manager, workers and observers do not.

use std::time::{Duration, Instant};

use serde_json::Value;
use thiserror::Error;

use crate::nats::log::{self, LogError};
use crate::nats::store::{self, StoreError};
use crate::nats::Nats;
use crate::protocol::{
    cancel_subject, customer_submit_subject, encode_json, list_subject, new_job_id, now_ms,
    redrive_subject, status_subject, submit_subject, update_subject, validate_token,
    CancelRequested, Event, IndexCounts, Job, JobPage, ListRequest, RedriveRefused,
    RedriveRequested, RejectCode, Submission, SubmitReply, Tolerance, UpdateRequested,
};

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("no fanjet manager is running (start `fanjet manager` or `fanjet dev`)")]
    NoManager,
    #[error("no answer from a fanjet manager within {0:?}")]
    Timeout(Duration),
    #[error("no job {0:?}")]
    NoSuchJob(String),
    #[error("job {job_id} has already ended ({state})")]
    Ended { job_id: String, state: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Log(#[from] LogError),
    #[error("the server does not let this user publish to {subject} ({message}){hint}")]
    Refused {
        subject: String,
        message: String,
        hint: &'static str,
    },
    #[error("{0}")]
    NotRedrivable(RedriveRefused),
    #[error("job {job_id} cannot be redriven: the input of its step {step:?} is no longer in the event log (it keeps events for 7 days)")]
    LogExpired { job_id: String, step: String },
    /// A manager's service refused the request, with its code.
    #[error("{message}")]
    Answered { code: String, message: String },
    #[error("NATS: {0}")]
    Nats(String),
}

impl ClientError {
    /// The stable code of an answer that refuses the request (as the
    /// customer services and the HTTP API name it), if it is one.
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Answered { code, .. } => Some(code),
            ClientError::NoSuchJob(_) => Some("not_found"),
            ClientError::Ended { .. } => Some("job_ended"),
            ClientError::NotRedrivable(r) => Some(r.code()),
            ClientError::LogExpired { .. } => Some("log_expired"),
            _ => None,
        }
    }
}

/// A request, answered, timed out after `wait`, or refused by the server
/// (a permission violation names the subject; said at once, not as a
/// time-out).
async fn request(
    nats: &async_nats::Client,
    subject: &str,
    body: bytes::Bytes,
    wait: Duration,
) -> Result<Result<async_nats::Message, async_nats::RequestError>, ClientError> {
    let mut refusals = crate::nats::connect::refusals();
    let refused = async {
        loop {
            match refusals.recv().await {
                Ok(text) if text.contains(&format!("\"{subject}\"")) => return text,
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                    std::future::pending::<()>().await
                }
            }
        }
    };
    tokio::select! {
        answer = tokio::time::timeout(wait, nats.request(subject.to_string(), body)) => {
            answer.map_err(|_| ClientError::Timeout(wait))
        }
        message = refused => Err(ClientError::Refused {
            subject: subject.to_string(),
            message,
            hint: if subject.starts_with("fanjet.submit.") {
                "; a user pinned to one customer submits as it: --customer <customer>"
            } else if subject.starts_with("fanjet.status.") {
                "; a user pinned to one customer asks as it: --customer <customer>"
            } else {
                ""
            },
        }),
    }
}

/// Submits a job through the intake; waits up to 5 s for a manager to come
/// up, and sends it again while the answer is `unavailable` (NATS busy
/// for a moment) or `rate_limited` (nothing was recorded either way), for
/// up to 10 s. The job id is
/// chosen here when the submission has none, so that sending again is
/// idempotent.
pub async fn submit(
    nats: &async_nats::Client,
    workflow: &str,
    sub: &Submission,
) -> Result<SubmitReply, ClientError> {
    send(nats, submit_subject(workflow), sub).await
}

/// Submits as `customer`, on its tenant subject
/// `fanjet.submit.<workflow>.<customer>` (what a submitter pinned to one
/// customer may use): the job's id is `sub.job_id` in the customer's
/// namespace ([`crate::protocol::tenant_job_id`]); the reply says which. Otherwise as
/// [`submit`].
pub async fn submit_as(
    nats: &async_nats::Client,
    workflow: &str,
    customer: &str,
    sub: &Submission,
) -> Result<SubmitReply, ClientError> {
    validate_token("customer", customer)
        .map_err(|e| ClientError::Nats(format!("{e}: it cannot be a subject token")))?;
    send(nats, customer_submit_subject(workflow, customer), sub).await
}

/// How long one try of a submission waits for its answer; it is sent again
/// (same id) until [`send`]'s ten seconds have passed.
const ATTEMPT_WAIT: Duration = Duration::from_secs(2);

async fn send(
    nats: &async_nats::Client,
    subject: String,
    sub: &Submission,
) -> Result<SubmitReply, ClientError> {
    let mut sub = sub.clone();
    sub.job_id.get_or_insert_with(new_job_id);
    let body = encode_json(&sub).map_err(|e| ClientError::Nats(e.to_string()))?;
    let start = Instant::now();
    let wait = Duration::from_secs(10);
    let mut pause = Duration::from_millis(100);
    loop {
        // A manager that stopped answering (frozen, or its host lost) still
        // takes its turn of the queue group's requests until the server
        // drops it: ask again, with the same id (idempotent), after a
        // short wait, and another manager answers.
        let answer = match request(nats, &subject, body.clone(), ATTEMPT_WAIT).await {
            Err(ClientError::Timeout(_)) if start.elapsed() + ATTEMPT_WAIT <= wait => continue,
            Err(ClientError::Timeout(_)) => return Err(ClientError::Timeout(start.elapsed())),
            other => other?,
        };
        match answer {
            Ok(msg) => {
                let reply: SubmitReply = serde_json::from_slice(&msg.payload).map_err(|e| {
                    ClientError::Nats(format!("unreadable answer from the manager: {e}"))
                })?;
                let busy = reply.error.as_ref().is_some_and(|e| {
                    matches!(e.code, RejectCode::Unavailable | RejectCode::RateLimited)
                });
                if !busy || start.elapsed() > wait {
                    return Ok(reply);
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
            Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => {
                if start.elapsed() > Duration::from_secs(5) {
                    return Err(ClientError::NoManager);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(ClientError::Nats(format!("submitting: {e}"))),
        }
    }
}

/// Asks the manager to cancel a running job.
pub async fn cancel(nats: &Nats, job_id: &str, reason: Option<String>) -> Result<(), ClientError> {
    not_ended(nats, job_id).await?;
    let event = Event::CancelRequested(CancelRequested {
        job_id: job_id.to_string(),
        reason,
        at: now_ms(),
    });
    log::append(nats, &event).await?;
    Ok(())
}

/// What to change of a running job (see [`UpdateRequested`]).
#[derive(Debug, Clone, Default)]
pub struct Change {
    pub paused: Option<bool>,
    pub max_in_flight: Option<u64>,
    pub tolerate: Option<Tolerance>,
    pub reason: Option<String>,
}

/// Asks the manager to change a running job: pause or resume it, its
/// in-flight window, its tolerated failures. The request is logged; the
/// manager applies it when it reads it (within a tick).
pub async fn update(nats: &Nats, job_id: &str, change: Change) -> Result<(), ClientError> {
    not_ended(nats, job_id).await?;
    let event = Event::UpdateRequested(UpdateRequested {
        job_id: job_id.to_string(),
        paused: change.paused,
        max_in_flight: change.max_in_flight,
        tolerate: change.tolerate,
        reason: change.reason,
        at: now_ms(),
    });
    log::append(nats, &event).await?;
    Ok(())
}

/// Asks the manager to redrive a job (see [`RedriveRequested`]): checked
/// first by the rule the manager applies ([`Job::redrive_step`]) and for
/// its step's input in the log, then logged. Returns the run it starts;
/// [`wait_for_run`] waits until the manager has started it.
pub async fn redrive(
    nats: &Nats,
    job_id: &str,
    step: Option<String>,
    reason: Option<String>,
) -> Result<u32, ClientError> {
    let job = store::status(nats, job_id)
        .await?
        .ok_or_else(|| ClientError::NoSuchJob(job_id.to_string()))?;
    redrivable(nats, &job, step.as_deref()).await?;
    let event = Event::RedriveRequested(RedriveRequested {
        job_id: job.job_id.clone(),
        step,
        reason,
        at: now_ms(),
    });
    log::append(nats, &event).await?;
    Ok(job.run + 1)
}

/// Whether `job` can be redriven from `step` (by name; `None`: where it
/// failed): the manager's rule, and the step's input still in the log.
pub async fn redrivable(nats: &Nats, job: &Job, step: Option<&str>) -> Result<usize, ClientError> {
    let i = job.redrive_step(step).map_err(ClientError::NotRedrivable)?;
    if !log::step_input_kept(nats, job, i).await? {
        return Err(ClientError::LogExpired {
            job_id: job.job_id.clone(),
            step: job.steps[i].name.clone(),
        });
    }
    Ok(i)
}

/// Waits up to `wait` until job `job_id` runs its run `run` (a manager took
/// the redrive); the record then.
pub async fn wait_for_run(
    nats: &Nats,
    job_id: &str,
    run: u32,
    wait: Duration,
) -> Result<Job, ClientError> {
    let start = Instant::now();
    loop {
        if let Some(job) = store::status(nats, job_id).await? {
            if job.run >= run {
                return Ok(job);
            }
        }
        if start.elapsed() > wait {
            return Err(ClientError::Timeout(wait));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The job exists and has not ended. A job just accepted (not yet
/// checkpointed) counts: a request follows its JobRequested in the log.
async fn not_ended(nats: &Nats, job_id: &str) -> Result<(), ClientError> {
    let job = store::status(nats, job_id)
        .await?
        .ok_or_else(|| ClientError::NoSuchJob(job_id.to_string()))?;
    if job.state.is_terminal() {
        return Err(ClientError::Ended {
            job_id: job_id.to_string(),
            state: job.state.as_str().to_string(),
        });
    }
    Ok(())
}

/// A request to one of the manager's customer services, and its JSON answer.
async fn ask(
    nats: &async_nats::Client,
    subject: &str,
    body: bytes::Bytes,
) -> Result<Value, ClientError> {
    let msg = request(nats, subject, body, Duration::from_secs(10))
        .await?
        .map_err(|e| match e.kind() {
            async_nats::RequestErrorKind::NoResponders => ClientError::NoManager,
            _ => ClientError::Nats(e.to_string()),
        })?;
    serde_json::from_slice(&msg.payload).map_err(|e| ClientError::Nats(e.to_string()))
}

/// A page of `customer`'s jobs (and their counts, when asked) through the
/// listing service (for users whose permissions allow only
/// `fanjet.jobs.<customer>`).
pub async fn list_as(
    nats: &async_nats::Client,
    customer: &str,
    req: &ListRequest,
) -> Result<(JobPage, Option<IndexCounts>), ClientError> {
    let body = serde_json::to_vec(req).map_err(|e| ClientError::Nats(e.to_string()))?;
    let v = ask(nats, &list_subject(customer), body.into()).await?;
    if let Some(e) = v.get("error") {
        let text = |k: &str| {
            e.get(k)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        return Err(ClientError::Answered {
            code: text("code"),
            message: text("message"),
        });
    }
    let counts = v
        .get("counts")
        .and_then(|c| serde_json::from_value(c.clone()).ok());
    let page = serde_json::from_value(v)
        .map_err(|e| ClientError::Nats(format!("unreadable page: {e}")))?;
    Ok((page, counts))
}

/// Asks for a job's cancellation through the cancel service, as `customer`
/// (for users whose permissions allow only `fanjet.cancel.<customer>.>`).
/// Returns the job's full id.
pub async fn cancel_as(
    nats: &async_nats::Client,
    customer: &str,
    job_id: &str,
    reason: Option<String>,
) -> Result<String, ClientError> {
    let body = serde_json::json!({ "reason": reason }).to_string();
    let v = ask(nats, &cancel_subject(customer, job_id), body.into()).await?;
    answered(v, job_id)
}

/// Asks for a change of a job (pause, resume, window, tolerance) through
/// the update service, as `customer` (for users whose permissions allow
/// only `fanjet.update.<customer>.>`). Returns the job's full id.
pub async fn update_as(
    nats: &async_nats::Client,
    customer: &str,
    job_id: &str,
    change: Change,
) -> Result<String, ClientError> {
    let mut body = serde_json::Map::new();
    if let Some(p) = change.paused {
        body.insert("paused".into(), p.into());
    }
    if let Some(n) = change.max_in_flight {
        body.insert("max_in_flight".into(), n.into());
    }
    if let Some(t) = change.tolerate {
        let text = match t {
            Tolerance::Count(n) => n.to_string(),
            Tolerance::Percent(p) => format!("{p}%"),
        };
        body.insert("tolerate_failures".into(), text.into());
    }
    if let Some(r) = change.reason {
        body.insert("reason".into(), r.into());
    }
    let body = Value::Object(body).to_string();
    let v = ask(nats, &update_subject(customer, job_id), body.into()).await?;
    answered(v, job_id)
}

/// Asks for a redrive through the redrive service, as `customer` (for
/// users whose permissions allow only `fanjet.redrive.<customer>.>`).
/// Returns the job's full id.
pub async fn redrive_as(
    nats: &async_nats::Client,
    customer: &str,
    job_id: &str,
    step: Option<String>,
    reason: Option<String>,
) -> Result<String, ClientError> {
    let body = serde_json::json!({ "step": step, "reason": reason }).to_string();
    let v = ask(nats, &redrive_subject(customer, job_id), body.into()).await?;
    answered(v, job_id)
}

/// The cancel or update service's answer: the job's full id, or why not.
fn answered(v: Value, job_id: &str) -> Result<String, ClientError> {
    if v["ok"] == Value::Bool(true) {
        return Ok(v["job_id"].as_str().unwrap_or(job_id).to_string());
    }
    let message = v["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    Err(match v["error"]["code"].as_str() {
        Some("not_found") => ClientError::NoSuchJob(job_id.to_string()),
        Some("job_ended") => ClientError::Ended {
            job_id: job_id.to_string(),
            state: message,
        },
        Some(
            code @ ("job_running" | "not_redrivable" | "no_such_step" | "nothing_to_redrive"
            | "log_expired"),
        ) => ClientError::Answered {
            code: code.to_string(),
            message,
        },
        _ => ClientError::Nats(message),
    })
}

/// A job's detailed status through the status service, as a customer sees
/// it (for users whose permissions allow only `fanjet.status.<customer>.>`).
pub async fn status_as(
    nats: &async_nats::Client,
    customer: &str,
    job_id: &str,
) -> Result<Option<Job>, ClientError> {
    let v = ask(nats, &status_subject(customer, job_id), "".into()).await?;
    if v.get("error").is_some() {
        return Ok(None);
    }
    serde_json::from_value(v)
        .map(Some)
        .map_err(|e| ClientError::Nats(format!("unreadable status: {e}")))
}
