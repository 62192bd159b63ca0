//! The status service: answers `fanjet.status.<customer>.<job_id>` with
//! the job's detailed status, for users whose permissions let them ask only
//! as their own customer. Runs in the intake's queue group, so any number
//! of managers share it.

use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::ManagerError;
use crate::nats::{store, Nats};
use crate::protocol::{detailed, encode_json, now_ms, INTAKE_QUEUE, STATUS_WILDCARD};

/// Answers `fanjet.status.<customer>.<job_id>` with the job's detailed
/// status, when the job is that customer's; `{"error": …}` otherwise.
pub async fn run(nats: Nats, cancel: CancellationToken) -> Result<(), ManagerError> {
    let mut sub = nats
        .client
        .queue_subscribe(STATUS_WILDCARD, INTAKE_QUEUE.into())
        .await
        .map_err(|e| ManagerError::Nats(format!("subscribing to status requests: {e}")))?;
    loop {
        let msg = tokio::select! {
            _ = cancel.cancelled() => break,
            m = sub.next() => match m { Some(m) => m, None => break },
        };
        let Some(reply) = msg.reply.clone() else {
            continue;
        };
        let mut tokens = msg.subject.as_str().split('.').skip(2);
        let (customer, job_id) = (
            tokens.next().unwrap_or_default(),
            tokens.next().unwrap_or_default(),
        );
        let answer = match store::status(&nats, job_id).await {
            Ok(Some(job)) if job.customer.as_deref() == Some(customer) => {
                let stats = store::stats(&nats, job_id).await.ok().flatten();
                detailed(&job, stats.as_ref(), now_ms())
            }
            Ok(_) => {
                serde_json::json!({"error": {"code": "not_found", "message": format!("no job {job_id:?} for customer {customer:?}")}})
            }
            Err(e) => serde_json::json!({"error": {"code": "internal", "message": e.to_string()}}),
        };
        if let Ok(body) = encode_json(&answer) {
            if let Err(e) = nats.client.publish(reply, body).await {
                warn!(error = %e, "could not answer a status request");
            }
        }
    }
    let _ = sub.unsubscribe().await;
    Ok(())
}
