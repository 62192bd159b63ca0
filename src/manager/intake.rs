//! Submission intake: answers requests on `fanjet.submit.<workflow>` from any
//! NATS client, turning each into a JobRequested (or a JobRejected) on the
//! log. Runs in a queue group, so any number of managers share the load.
//!
//! Each customer's submissions are rate limited ([`IntakeLimits`]), and so
//! are the rejections it gets recorded: past its budget a rejection is
//! still answered but leaves no record, so one client sending garbage
//! cannot fill the store for 30 days.

use std::num::NonZeroU32;

use governor::clock::Clock;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::ManagerError;
use crate::nats::log::{self, Appended, LogError};
use crate::nats::{service, store, Nats, SetupError};
use crate::protocol::{
    bounded, decode, new_job_id, now_ms, tenant_job_id, validate_customer, validate_token,
    Encoding, Event, JobRejected, JobRequested, RejectCode, Submission, SubmitError, SubmitReply,
    DEFAULT_PRIORITY, MAX_PRIORITY, MAX_REASON_BYTES, MAX_SUBMISSION_BYTES, MAX_TENANT_JOB_ID_LEN,
    MAX_TOKEN_LEN, MIN_PRIORITY, SUBMIT_WILDCARD,
};

/// Per-customer limits of one intake. Each manager process keeps its own
/// count, so with N managers a customer may reach N times these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IntakeLimits {
    /// Submissions accepted per second per customer, sustained…
    pub submissions_per_s: NonZeroU32,
    /// …and how many may come at once above that.
    pub submission_burst: NonZeroU32,
    /// Rejections recorded per minute per customer (a `JobRejected` and a
    /// record kept 30 days); past it they are answered, not recorded…
    pub rejections_recorded_per_min: NonZeroU32,
    /// …and how many may be recorded at once above that.
    pub rejection_burst: NonZeroU32,
}

impl Default for IntakeLimits {
    fn default() -> Self {
        let n = |v: u32| NonZeroU32::new(v).unwrap_or(NonZeroU32::MIN);
        IntakeLimits {
            submissions_per_s: n(200),
            submission_burst: n(2000),
            rejections_recorded_per_min: n(60),
            rejection_burst: n(50),
        }
    }
}

/// The counters of [`IntakeLimits`], by customer (`-` for submissions that
/// name none).
struct Limiters {
    submissions: DefaultKeyedRateLimiter<String>,
    rejections: DefaultKeyedRateLimiter<String>,
}

impl Limiters {
    fn new(limits: IntakeLimits) -> Self {
        Limiters {
            submissions: RateLimiter::keyed(
                Quota::per_second(limits.submissions_per_s).allow_burst(limits.submission_burst),
            ),
            rejections: RateLimiter::keyed(
                Quota::per_minute(limits.rejections_recorded_per_min)
                    .allow_burst(limits.rejection_burst),
            ),
        }
    }

    /// Forgets customers whose budget is full again, now and then.
    fn tidy(&self) {
        if self.submissions.len() + self.rejections.len() > 10_000 {
            self.submissions.retain_recent();
            self.rejections.retain_recent();
        }
    }
}

/// Answers submissions on `fanjet.submit.<workflow>[.<customer>]` until `cancel`.
pub async fn run(
    nats: Nats,
    limits: IntakeLimits,
    cancel: CancellationToken,
) -> Result<(), ManagerError> {
    let nats = &nats;
    let limiters = &Limiters::new(limits);
    service::serve(nats, SUBMIT_WILDCARD, &cancel, |msg| async move {
        limiters.tidy();
        submit(nats, &msg, limiters).await
    })
    .await
    .map_err(|e| ManagerError::Nats(format!("subscribing to submissions: {e}")))
}

fn rejected(job_id: Option<String>, code: RejectCode, message: String) -> SubmitReply {
    SubmitReply {
        ok: false,
        job_id,
        duplicate: false,
        error: Some(SubmitError { code, message }),
    }
}

/// Handles one submission; every failure becomes a rejection, never a panic.
async fn submit(nats: &Nats, msg: &async_nats::Message, limiters: &Limiters) -> SubmitReply {
    // fanjet.submit.<workflow> or fanjet.submit.<workflow>.<customer>
    let tokens: Vec<&str> = msg.subject.as_str().split('.').skip(2).collect();
    let workflow = tokens.first().copied().unwrap_or_default().to_string();
    let pinned_customer = tokens.get(1).map(|c| c.to_string());
    let mut reject = Rejection {
        workflow: Some(workflow.clone()),
        customer: None,
        job_id: None,
        limiters,
        budget: pinned_customer.clone(),
    };
    if msg.payload.len() > MAX_SUBMISSION_BYTES {
        let m = format!(
            "submission is {} bytes; the limit is {MAX_SUBMISSION_BYTES}",
            msg.payload.len()
        );
        return reject.send(nats, RejectCode::PayloadTooLarge, m).await;
    }
    // The job id first, so that any rejection is recorded under it.
    let encoding = Encoding::from_headers(msg.headers.as_ref());
    let decoded: Result<Submission, String> = if msg.payload.iter().all(u8::is_ascii_whitespace) {
        Ok(Submission::default())
    } else {
        decode(encoding, &msg.payload).map_err(|e| e.to_string())
    };
    let submitted_id = match &decoded {
        Ok(sub) => sub.job_id.clone(),
        // A submission that is no valid Submission may still name its job.
        Err(_) => decode::<serde_json::Value>(encoding, &msg.payload)
            .ok()
            .and_then(|v| v.get("job_id")?.as_str().map(str::to_string)),
    };
    let job_id = match submitted_id {
        Some(id) => match validate_token("job id", &id) {
            Ok(()) => id,
            Err(e) => {
                return reject
                    .send(nats, RejectCode::InvalidJobId, e.to_string())
                    .await
            }
        },
        None => new_job_id(),
    };
    // On a tenant subject, ids live in the customer's own namespace.
    let job_id = match &pinned_customer {
        None => job_id,
        Some(customer) => {
            let scoped = tenant_job_id(customer, &job_id);
            if scoped.len() > MAX_TOKEN_LEN {
                let m = format!(
                    "job id {job_id:?} is longer than {MAX_TENANT_JOB_ID_LEN} characters (on fanjet.submit.<workflow>.<customer>, the customer's tag is put before it)"
                );
                return reject.send(nats, RejectCode::InvalidJobId, m).await;
            }
            scoped
        }
    };
    reject.job_id = Some(job_id.clone());
    if tokens.len() > 2 {
        reject.workflow = None;
        let m = format!(
            "submit to fanjet.submit.<workflow> or fanjet.submit.<workflow>.<customer>, not {}",
            msg.subject
        );
        return reject.send(nats, RejectCode::InvalidWorkflowName, m).await;
    }
    if let Err(e) = validate_token("workflow name", &workflow) {
        reject.workflow = None;
        return reject
            .send(nats, RejectCode::InvalidWorkflowName, e.to_string())
            .await;
    }
    let mut sub = match decoded {
        Ok(sub) => sub,
        Err(e) => return reject.send(nats, RejectCode::MalformedPayload, e).await,
    };
    let who = pinned_customer.clone().or_else(|| sub.customer.clone());
    reject.budget = who.clone();
    if let Err(not_until) = limiters
        .submissions
        .check_key(&who.unwrap_or_else(|| "-".into()))
    {
        let wait = not_until.wait_time_from(limiters.submissions.clock().now());
        // Nothing is recorded: the same submission may be sent again.
        return rejected(
            Some(job_id),
            RejectCode::RateLimited,
            format!(
                "too many submissions from this customer; send it again in {} ms",
                wait.as_millis().max(1)
            ),
        );
    }
    if let Some(pinned) = &pinned_customer {
        if sub.customer.as_deref().is_some_and(|c| c != pinned) {
            let m = format!(
                "the submission names customer {:?} but was sent to {}",
                sub.customer.as_deref().unwrap_or(""),
                msg.subject
            );
            return reject.send(nats, RejectCode::InvalidCustomer, m).await;
        }
        sub.customer = Some(pinned.clone());
    }
    if let Some(c) = &sub.customer {
        if let Err(e) = validate_customer(c) {
            return reject
                .send(nats, RejectCode::InvalidCustomer, e.to_string())
                .await;
        }
        reject.customer = Some(c.clone());
    }
    if let Some(p) = sub.priority {
        if !(MIN_PRIORITY..=MAX_PRIORITY).contains(&p) {
            let m = format!("priority {p} is out of range: from {MIN_PRIORITY} (lowest) to {MAX_PRIORITY} (highest), default {DEFAULT_PRIORITY}");
            return reject.send(nats, RejectCode::InvalidPriority, m).await;
        }
    }
    match store::get(nats, &job_id).await {
        Ok(Some(_)) => {
            return SubmitReply {
                ok: true,
                job_id: Some(job_id),
                duplicate: true,
                error: None,
            }
        }
        Ok(None) => {}
        Err(e) => return unavailable(job_id, &e),
    }
    let deadline_ms = match nats.workflow(&workflow).await {
        Ok(Some(wf)) => wf.deadline_ms,
        Ok(None) => {
            let m = format!(
                "unknown workflow {workflow:?}: apply it first with `fanjet workflow apply FILE`"
            );
            return reject.send(nats, RejectCode::UnknownWorkflow, m).await;
        }
        Err(e @ SetupError::BadDefinition { .. }) => {
            return reject
                .send(nats, RejectCode::InvalidDefinition, e.to_string())
                .await
        }
        Err(e) => return unavailable(job_id, &e),
    };
    let at = now_ms();
    let event = Event::JobRequested(JobRequested {
        job_id: job_id.clone(),
        workflow,
        customer: sub.customer,
        input: sub.input,
        priority: sub.priority,
        at,
        deadline_at: deadline_ms.map(|d| at + d),
    });
    match append(nats, &event).await {
        Ok(Appended { duplicate, .. }) => {
            info!(job_id, duplicate, "job requested");
            SubmitReply {
                ok: true,
                job_id: Some(job_id),
                duplicate,
                error: None,
            }
        }
        Err(LogError::TooLarge { bytes, max, .. }) => {
            let m = format!("the job's request is {bytes} bytes; the server accepts {max}");
            reject.send(nats, RejectCode::PayloadTooLarge, m).await
        }
        Err(e) => unavailable(job_id, &e),
    }
}

/// Appends a submission's event ([`log::append_retrying`]: a publish that
/// met the same job still in process, on a replicated stream, ends as a
/// duplicate), for [`APPEND_FOR`]: then the submitter hears `unavailable`
/// while it still waits for an answer.
async fn append(nats: &Nats, event: &Event) -> Result<Appended, LogError> {
    let payload = log::encode(event, nats.max_payload())?;
    log::append_retrying(&nats.js, event, payload, APPEND_FOR).await
}

/// How long a submission's event is tried: a client asks again after 2 s
/// and waits 10 s in all.
const APPEND_FOR: std::time::Duration = std::time::Duration::from_secs(3);

/// What is known of a submission when it is refused.
struct Rejection<'a> {
    workflow: Option<String>,
    customer: Option<String>,
    job_id: Option<String>,
    limiters: &'a Limiters,
    /// Whose budget of recorded rejections this one counts against.
    budget: Option<String>,
}

impl Rejection<'_> {
    /// Logs a JobRejected and builds the reply: under the submitted id when
    /// it is valid and no job has it yet (a job's record, or its request in
    /// the log), under a fresh id otherwise, so a rejection never touches
    /// another job.
    async fn send(self, nats: &Nats, code: RejectCode, reason: String) -> SubmitReply {
        let reason = bounded(&reason, MAX_REASON_BYTES);
        let budget = self.budget.clone().unwrap_or_else(|| "-".into());
        if self.limiters.rejections.check_key(&budget).is_err() {
            // Answered, not recorded: the store keeps no more of these.
            warn!(
                ?code,
                customer = budget,
                "submission rejected (not recorded: too many rejections)"
            );
            return rejected(
                self.job_id,
                code,
                format!(
                    "{reason} (not recorded: too many rejected submissions from this customer)"
                ),
            );
        }
        // Whether the submitted id is free must be known: a read that
        // failed (a leader election) would otherwise record the rejection
        // under a fresh id, and the submitted one would never get a record.
        let job_id = match self.job_id {
            Some(id) => match store::status(nats, &id).await {
                Ok(None) => id,
                Ok(Some(_)) => new_job_id(),
                Err(e) => return unavailable(id, &e),
            },
            None => new_job_id(),
        };
        warn!(job_id, ?code, reason, "submission rejected");
        let event = Event::JobRejected(JobRejected {
            job_id: job_id.clone(),
            workflow: self.workflow,
            customer: self.customer,
            code,
            reason: reason.clone(),
            at: now_ms(),
        });
        // Answered only once recorded: a rejection the log did not take is
        // `unavailable`, and the same submission sent again is rejected
        // and recorded then.
        match append(nats, &event).await {
            Ok(_) => rejected(Some(job_id), code, reason),
            Err(e) if e.is_transient() => unavailable(job_id, &e),
            Err(e) => {
                warn!(job_id, error = %e, "could not log a rejection");
                rejected(Some(job_id), code, reason)
            }
        }
    }
}

/// Nothing was recorded, for a moment: the submitter sends the same
/// submission again.
fn unavailable(job_id: String, e: &dyn std::fmt::Display) -> SubmitReply {
    warn!(job_id, error = %e, "a submission could not be handled for now");
    rejected(
        Some(job_id),
        RejectCode::Unavailable,
        format!("could not record the submission, try again: {e}"),
    )
}
