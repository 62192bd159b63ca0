//! The update service: answers `fanjet.update.<customer>.<job_id>` by
//! asking for a change of the job (pause, resume, window, tolerance) when
//! the job is that customer's, so a submitter pinned to one customer can
//! operate its own jobs (and no one else's) without any right on the log.
//! Runs in the intake's queue group, like the cancel service.

use serde::Deserialize;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::status::{customers_job, Refusal};
use super::ManagerError;
use crate::nats::{log, service, Nats};
use crate::protocol::{
    bounded, now_ms, Event, Tolerance, UpdateRequested, MAX_REASON_BYTES, UPDATE_WILDCARD,
};

/// Answers update requests until `cancel`.
pub async fn run(nats: Nats, cancel: CancellationToken) -> Result<(), ManagerError> {
    service::serve(&nats, UPDATE_WILDCARD, &cancel, |msg| answer(&nats, msg))
        .await
        .map_err(|e| ManagerError::Nats(format!("subscribing to update requests: {e}")))
}

/// What a request may change (PROTOCOL.md, "Update service").
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Body {
    #[serde(default)]
    paused: Option<bool>,
    #[serde(default)]
    max_in_flight: Option<u64>,
    /// "10" or "5%".
    #[serde(default)]
    tolerate_failures: Option<String>,
    #[serde(default)]
    reason: Option<String>,
}

fn error(code: &str, message: String) -> Value {
    json!({"ok": false, "error": {"code": code, "message": message}})
}

async fn answer(nats: &Nats, msg: async_nats::Message) -> Value {
    let body: Body = match serde_json::from_slice(&msg.payload) {
        Ok(b) => b,
        Err(e) => return error("malformed_payload", e.to_string()),
    };
    if body.max_in_flight == Some(0) {
        return error("invalid_change", "max_in_flight must be at least 1".into());
    }
    let tolerate = match body.tolerate_failures.as_deref().map(Tolerance::parse) {
        None => None,
        Some(Ok(t)) => Some(t),
        Some(Err(m)) => return error("invalid_change", m),
    };
    if body.paused.is_none() && body.max_in_flight.is_none() && tolerate.is_none() {
        return error(
            "invalid_change",
            "nothing to change: give paused, max_in_flight or tolerate_failures".into(),
        );
    }
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
    let event = Event::UpdateRequested(UpdateRequested {
        job_id: job_id.clone(),
        paused: body.paused,
        max_in_flight: body.max_in_flight,
        tolerate,
        reason: body.reason.map(|r| bounded(&r, MAX_REASON_BYTES)),
        at: now_ms(),
    });
    match log::append(nats, &event).await {
        Ok(_) => json!({"ok": true, "job_id": job_id}),
        Err(e) => error("unavailable", e.to_string()),
    }
}
