//! Request/reply services in the manager's queue group (the intake and the
//! status service): any number of managers share the requests, each
//! answered by one of them.

use std::future::Future;

use futures::StreamExt;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::Nats;
use crate::protocol::{encode_json, INTAKE_QUEUE};

/// Answers requests on `subject` with `answer(request)`, encoded as JSON,
/// one at a time, until `cancel`. A request without a reply subject is
/// handled all the same and not answered.
pub async fn serve<F, Fut, T>(
    nats: &Nats,
    subject: &str,
    cancel: &CancellationToken,
    mut answer: F,
) -> Result<(), async_nats::SubscribeError>
where
    F: FnMut(async_nats::Message) -> Fut,
    Fut: Future<Output = T>,
    T: Serialize,
{
    let mut requests = nats
        .client
        .queue_subscribe(subject.to_string(), INTAKE_QUEUE.into())
        .await?;
    loop {
        let msg = tokio::select! {
            _ = cancel.cancelled() => break,
            m = requests.next() => match m { Some(m) => m, None => break },
        };
        let reply_to = msg.reply.clone();
        let reply = answer(msg).await;
        let Some(to) = reply_to else { continue };
        match encode_json(&reply) {
            Ok(body) => {
                if let Err(e) = nats.client.publish(to, body).await {
                    warn!(subject, error = %e, "could not answer a request");
                }
            }
            Err(e) => warn!(subject, error = %e, "could not encode an answer"),
        }
    }
    let _ = requests.unsubscribe().await;
    Ok(())
}
