//! The status service: answers `fanjet.status.<customer>.<job_id>` with
//! the job's detailed status, for users whose permissions let them ask only
//! as their own customer. Runs in the intake's queue group, so any number
//! of managers share it.

use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::ManagerError;
use crate::nats::{service, store, Nats};
use crate::protocol::{detailed, now_ms, tenant_job_id, STATUS_WILDCARD};

/// Answers `fanjet.status.<customer>.<job_id>` with the job's detailed
/// status, when the job is that customer's; `{"error": …}` otherwise.
pub async fn run(nats: Nats, cancel: CancellationToken) -> Result<(), ManagerError> {
    service::serve(&nats, STATUS_WILDCARD, &cancel, |msg| answer(&nats, msg))
        .await
        .map_err(|e| ManagerError::Nats(format!("subscribing to status requests: {e}")))
}

async fn answer(nats: &Nats, msg: async_nats::Message) -> Value {
    let mut tokens = msg.subject.as_str().split('.').skip(2);
    let (customer, asked) = (
        tokens.next().unwrap_or_default(),
        tokens.next().unwrap_or_default(),
    );
    // The customer's jobs are under its tag (see the intake); the id may
    // be given with it or without.
    let job_id = tenant_job_id(customer, asked);
    match store::status(nats, &job_id).await {
        Ok(Some(job)) if job.customer.as_deref() == Some(customer) => {
            let stats = store::stats(nats, &job_id).await.ok().flatten();
            detailed(&job, stats.as_ref(), now_ms())
        }
        Ok(_) => {
            json!({"error": {"code": "not_found", "message": format!("no job {asked:?} for customer {customer:?}")}})
        }
        Err(e) => json!({"error": {"code": "internal", "message": e.to_string()}}),
    }
}
