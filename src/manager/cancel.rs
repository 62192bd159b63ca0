//! The cancel service: answers `fanjet.cancel.<customer>.<job_id>` by
//! asking for the job's cancellation when the job is that customer's, so a
//! submitter pinned to one customer can cancel its own jobs (and no one
//! else's) without any right on the log. Runs in the intake's queue group.

use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::status::{customers_job, Refusal};
use super::ManagerError;
use crate::nats::{log, service, Nats};
use crate::protocol::{bounded, now_ms, CancelRequested, Event, CANCEL_WILDCARD, MAX_REASON_BYTES};

/// Answers cancel requests until `cancel`.
pub async fn run(nats: Nats, cancel: CancellationToken) -> Result<(), ManagerError> {
    service::serve(&nats, CANCEL_WILDCARD, &cancel, |msg| answer(&nats, msg))
        .await
        .map_err(|e| ManagerError::Nats(format!("subscribing to cancel requests: {e}")))
}

fn error(code: &str, message: String) -> Value {
    json!({"ok": false, "error": {"code": code, "message": message}})
}

async fn answer(nats: &Nats, msg: async_nats::Message) -> Value {
    // The body may give a reason: `{"reason": "…"}`.
    let reason = serde_json::from_slice::<Value>(&msg.payload)
        .ok()
        .and_then(|v| {
            v.get("reason")?
                .as_str()
                .map(|r| bounded(r, MAX_REASON_BYTES))
        });
    let job = match customers_job(nats, msg.subject.as_str()).await {
        Ok(job) => job,
        Err(Refusal::NotFound(message)) => return error("not_found", message),
        Err(Refusal::Store(e)) => return error("unavailable", e.to_string()),
    };
    let job_id = job.job_id.clone();
    if job.state.is_terminal() {
        return error(
            "job_ended",
            format!("job {job_id} has already ended ({})", job.state.as_str()),
        );
    }
    let event = Event::CancelRequested(CancelRequested {
        job_id: job_id.clone(),
        reason,
        at: now_ms(),
    });
    match log::append(nats, &event).await {
        Ok(_) => json!({"ok": true, "job_id": job_id}),
        Err(e) => error("unavailable", e.to_string()),
    }
}
