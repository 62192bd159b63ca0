//! The redrive service: answers `fanjet.redrive.<customer>.<job_id>` by
//! asking for a redrive of the job when it is that customer's and can be
//! redriven (the rule the manager applies, [`Job::redrive_step`], checked
//! first so a refusal says why), so a submitter pinned to one customer can
//! run its own failed jobs again without any right on the log. Runs in the
//! intake's queue group, like the cancel and update services.

use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::status::{customers_job, error, Refusal};
use super::ManagerError;
use crate::nats::{log, service, Nats};
use crate::protocol::{
    bounded, now_ms, Event, Job, RedriveRequest, RedriveRequested, MAX_REASON_BYTES,
    REDRIVE_WILDCARD,
};

/// Answers redrive requests until `cancel`.
pub async fn run(nats: Nats, cancel: CancellationToken) -> Result<(), ManagerError> {
    service::serve(&nats, REDRIVE_WILDCARD, &cancel, |msg| answer(&nats, msg))
        .await
        .map_err(|e| ManagerError::Nats(format!("subscribing to redrive requests: {e}")))
}

async fn answer(nats: &Nats, msg: async_nats::Message) -> Value {
    let body = match msg.payload.is_empty() {
        true => RedriveRequest::default(),
        false => match serde_json::from_slice::<RedriveRequest>(&msg.payload) {
            Ok(b) => b,
            Err(e) => return error("malformed_payload", e.to_string()),
        },
    };
    let job = match customers_job(nats, msg.subject.as_str()).await {
        Ok(job) => job,
        Err(Refusal::NotFound(message)) => return error("not_found", message),
        Err(Refusal::Store(e)) => return error("unavailable", e.to_string()),
    };
    if let Err(refusal) = check(nats, &job, body.step.as_deref()).await {
        return refusal;
    }
    let event = Event::RedriveRequested(RedriveRequested {
        job_id: job.job_id.clone(),
        step: body.step,
        reason: body.reason.map(|r| bounded(&r, MAX_REASON_BYTES)),
        at: now_ms(),
    });
    match log::append(nats, &event).await {
        Ok(_) => json!({"ok": true, "job_id": job.job_id, "run": job.run + 1}),
        Err(e) => error("unavailable", e.to_string()),
    }
}

/// The rule, and the step's input still in the log.
async fn check(nats: &Nats, job: &Job, step: Option<&str>) -> Result<(), Value> {
    let i = job
        .redrive_step(step)
        .map_err(|r| error(r.code(), r.to_string()))?;
    match log::step_input_kept(nats, job, i).await {
        Ok(true) => Ok(()),
        Ok(false) => Err(error(
            "log_expired",
            format!(
                "job {} cannot be redriven: the input of its step {:?} is no longer in the event log",
                job.job_id, job.steps[i].name
            ),
        )),
        Err(e) => Err(error("unavailable", e.to_string())),
    }
}
