//! The update service: answers `fanjet.update.<customer>.<job_id>` by
//! asking for a change of the job (pause, resume, window, tolerance) when
//! the job is that customer's, so a submitter pinned to one customer can
//! operate its own jobs (and no one else's) without any right on the log.
//! Runs in the intake's queue group, like the cancel service.

use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::status::{error, request_for_customer};
use super::ManagerError;
use crate::nats::{service, Nats};
use crate::protocol::{
    bounded, now_ms, ChangeRequest, Event, UpdateRequested, MAX_REASON_BYTES, UPDATE_WILDCARD,
};

/// Answers update requests until `cancel`.
pub async fn run(nats: Nats, cancel: CancellationToken) -> Result<(), ManagerError> {
    service::serve(&nats, UPDATE_WILDCARD, &cancel, |msg| answer(&nats, msg))
        .await
        .map_err(|e| ManagerError::Nats(format!("subscribing to update requests: {e}")))
}

async fn answer(nats: &Nats, msg: async_nats::Message) -> Value {
    let update = match serde_json::from_slice::<ChangeRequest>(&msg.payload) {
        // The job id is the full one, known once the job is found.
        Ok(body) => body.into_update(String::new(), now_ms()),
        Err(e) => return error("malformed_payload", e.to_string()),
    };
    let update = match update {
        Ok(u) => u,
        Err(m) => return error("invalid_change", m),
    };
    request_for_customer(nats, msg.subject.as_str(), |job_id| {
        Event::UpdateRequested(UpdateRequested {
            job_id,
            reason: update.reason.map(|r| bounded(&r, MAX_REASON_BYTES)),
            ..update
        })
    })
    .await
}
