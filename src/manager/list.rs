//! The listing service: answers `fanjet.jobs.<customer>` with a page of
//! that customer's jobs from the job index (and their counts when asked),
//! for users whose permissions let them ask only as their own customer.
//! Runs in the intake's queue group, so any number of managers share it.

use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::ManagerError;
use crate::nats::index::{self, IndexError};
use crate::nats::{service, Nats};
use crate::protocol::{ListRequest, LIST_WILDCARD};

/// Serves listing requests until `cancel`.
pub async fn run(nats: Nats, cancel: CancellationToken) -> Result<(), ManagerError> {
    service::serve(&nats, LIST_WILDCARD, &cancel, |msg| answer(&nats, msg))
        .await
        .map_err(|e| ManagerError::Nats(format!("subscribing to listing requests: {e}")))
}

async fn answer(nats: &Nats, msg: async_nats::Message) -> Value {
    let customer = msg.subject.as_str().rsplit('.').next().unwrap_or_default();
    let req: ListRequest = match msg.payload.is_empty() {
        true => ListRequest::default(),
        false => match serde_json::from_slice(&msg.payload) {
            Ok(r) => r,
            Err(e) => return refused("bad_request", format!("unreadable listing request: {e}")),
        },
    };
    // The subject's customer, whatever the request says.
    let filter = req.filter(Some(customer.to_string()));
    let page = match index::list(nats, &filter, &req).await {
        Ok(page) => page,
        Err(e) => return index_refusal(e),
    };
    let mut body = json!(page);
    if req.counts {
        match index::counts(nats, &filter).await {
            Ok(counts) => body["counts"] = json!(counts),
            Err(e) => return index_refusal(e),
        }
    }
    body
}

fn index_refusal(e: IndexError) -> Value {
    let code = match e.is_transient() {
        true => "unavailable",
        false => "bad_request",
    };
    refused(code, e.to_string())
}

fn refused(code: &str, message: String) -> Value {
    json!({"error": {"code": code, "message": message}})
}
