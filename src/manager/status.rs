//! The status service: answers `fanjet.status.<customer>.<job_id>` with
//! the job's detailed status, for users whose permissions let them ask only
//! as their own customer. Runs in the intake's queue group, so any number
//! of managers share it.

use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::ManagerError;
use crate::nats::store::{self, StoreError};
use crate::nats::{log, service, Nats};
use crate::protocol::{detailed, now_ms, tenant_job_id, Event, Job, STATUS_WILDCARD};

/// Answers `fanjet.status.<customer>.<job_id>` with the job's detailed
/// status, when the job is that customer's; `{"error": …}` otherwise.
pub async fn run(nats: Nats, cancel: CancellationToken) -> Result<(), ManagerError> {
    service::serve(&nats, STATUS_WILDCARD, &cancel, |msg| answer(&nats, msg))
        .await
        .map_err(|e| ManagerError::Nats(format!("subscribing to status requests: {e}")))
}

async fn answer(nats: &Nats, msg: async_nats::Message) -> Value {
    match customers_job(nats, msg.subject.as_str()).await {
        Ok(job) => {
            let stats = store::stats(nats, &job.job_id).await.ok().flatten();
            detailed(&job, stats.as_ref(), now_ms())
        }
        Err(Refusal::NotFound(message)) => {
            json!({"error": {"code": "not_found", "message": message}})
        }
        Err(Refusal::Store(e)) => json!({"error": {"code": "internal", "message": e.to_string()}}),
    }
}

/// Why a customer service request names no job it may act on.
pub(super) enum Refusal {
    /// No such job, or not that customer's (the two look the same).
    NotFound(String),
    /// The jobs bucket could not be read.
    Store(StoreError),
}

/// The job a customer service request (`fanjet.<service>.<customer>.<job_id>`)
/// names, when it is that customer's. Its jobs are under its tag (see the
/// intake); the id may be given with it or without.
pub(super) async fn customers_job(nats: &Nats, subject: &str) -> Result<Job, Refusal> {
    let mut tokens = subject.split('.').skip(2);
    let (customer, asked) = (
        tokens.next().unwrap_or_default(),
        tokens.next().unwrap_or_default(),
    );
    match store::status(nats, &tenant_job_id(customer, asked)).await {
        Ok(Some(job)) if job.customer.as_deref() == Some(customer) => Ok(job),
        Ok(_) => Err(Refusal::NotFound(format!(
            "no job {asked:?} for customer {customer:?}"
        ))),
        Err(e) => Err(Refusal::Store(e)),
    }
}

/// An error answer of a customer service.
pub(super) fn error(code: &str, message: String) -> Value {
    json!({"ok": false, "error": {"code": code, "message": message}})
}

/// What the cancel and update services do once a request is understood:
/// for a job of the subject's customer that has not ended, log the event
/// `make` builds from its full id; answer `{"ok": true, "job_id"}` or why not.
pub(super) async fn request_for_customer(
    nats: &Nats,
    subject: &str,
    make: impl FnOnce(String) -> Event,
) -> Value {
    let job = match customers_job(nats, subject).await {
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
    match log::append(nats, &make(job_id.clone())).await {
        Ok(_) => json!({"ok": true, "job_id": job_id}),
        Err(e) => error("unavailable", e.to_string()),
    }
}
