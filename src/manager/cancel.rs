//! The cancel service: answers `fanjet.cancel.<customer>.<job_id>` by
//! asking for the job's cancellation when the job is that customer's, so a
//! submitter pinned to one customer can cancel its own jobs (and no one
//! else's) without any right on the log. Runs in the intake's queue group.

use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::status::request_for_customer;
use super::ManagerError;
use crate::nats::{service, Nats};
use crate::protocol::{bounded, now_ms, CancelRequested, Event, CANCEL_WILDCARD, MAX_REASON_BYTES};

/// Answers cancel requests until `cancel`.
pub async fn run(nats: Nats, cancel: CancellationToken) -> Result<(), ManagerError> {
    service::serve(&nats, CANCEL_WILDCARD, &cancel, |msg| answer(&nats, msg))
        .await
        .map_err(|e| ManagerError::Nats(format!("subscribing to cancel requests: {e}")))
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
    request_for_customer(nats, msg.subject.as_str(), |job_id| {
        Event::CancelRequested(CancelRequested {
            job_id,
            reason,
            at: now_ms(),
        })
    })
    .await
}
