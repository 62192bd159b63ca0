//! Publishes confirmed through a leader's loss. A publish that reaches a
//! stream as it changes leaders is never acknowledged, and one that comes
//! while no leader is elected is answered "no stream": waited out for the
//! client's 10 s, or taken as a refusal, either held up or failed the
//! session that sent it (seen in chaos runs). Sent again under its message
//! id, the message is stored once, or answered as a duplicate.

use std::future::IntoFuture;
use std::time::Duration;

use async_nats::jetstream::context::{Context, PublishAckFuture, PublishError, PublishErrorKind};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::publish::PublishAck;
use async_nats::jetstream::ErrorCode;
use thiserror::Error;

use super::leases::Fenced;

/// How long an ack is awaited before the message is sent again.
pub const ACK_WAIT: Duration = Duration::from_secs(2);
/// Sends of one message before its last answer is taken as final (a
/// stream electing a leader answers "no stream" at once; those are sent
/// again [`ACK_WAIT`]`/2` apart, so this covers an election's 4-9 s).
pub const SENDS: u32 = 8;

/// Why a publish was not confirmed.
#[derive(Debug, Error)]
pub enum ConfirmError {
    /// The last answer, final (a refusal) or after [`SENDS`] sends.
    #[error(transparent)]
    Publish(#[from] PublishError),
    /// A re-send was not allowed (the lease guarding it passed).
    #[error(transparent)]
    Fenced(#[from] Fenced),
}

/// Waits for the ack of `first`, the publish of `msg` to `subject` (which
/// must carry a message id), and sends it again while the answer says
/// nothing is stored yet ([`unconfirmed`]), up to [`SENDS`] sends in all.
/// `may_send` is asked before each re-send (a lease's fence).
pub async fn confirmed(
    js: &Context,
    subject: &str,
    msg: &PublishMessage,
    first: PublishAckFuture,
    may_send: impl Fn() -> Result<(), Fenced>,
) -> Result<PublishAck, ConfirmError> {
    let mut ack = first.into_future();
    let mut sent = 1;
    loop {
        let answer = tokio::time::timeout(ACK_WAIT, &mut ack)
            .await
            .unwrap_or_else(|_| Err(PublishError::new(PublishErrorKind::TimedOut)));
        match answer {
            Err(e) if unconfirmed(&e) && sent < SENDS => {
                if e.kind() != PublishErrorKind::TimedOut {
                    tokio::time::sleep(ACK_WAIT / 2).await;
                }
            }
            answer => return Ok(answer?),
        }
        may_send()?;
        ack = js
            .send_publish(subject.to_string(), msg.clone())
            .await?
            .into_future();
        sent += 1;
    }
}

/// A publish answered in a way that says nothing is stored *yet*: no
/// answer, no stream (its leader lost, another not yet elected), or the same
/// message id still in process (an earlier send of it). Sent again, it
/// is stored once or answered as a duplicate.
pub fn unconfirmed(e: &PublishError) -> bool {
    match e.kind() {
        PublishErrorKind::TimedOut | PublishErrorKind::StreamNotFound => true,
        PublishErrorKind::Other => std::error::Error::source(e)
            .and_then(|s| s.downcast_ref::<async_nats::jetstream::Error>())
            .is_some_and(|j| j.error_code() == ErrorCode::STREAM_DUPLICATE_MESSAGE_CONFLICT),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answered(code: u64, description: &str) -> PublishError {
        let error: async_nats::jetstream::Error = serde_json::from_value(serde_json::json!({
            "code": 400, "err_code": code, "description": description
        }))
        .unwrap();
        PublishError::with_source(PublishErrorKind::Other, error)
    }

    #[test]
    fn only_answers_that_store_nothing_yet_are_sent_again() {
        assert!(unconfirmed(&PublishError::new(PublishErrorKind::TimedOut)));
        assert!(unconfirmed(&PublishError::new(
            PublishErrorKind::StreamNotFound
        )));
        assert!(unconfirmed(&answered(
            10158,
            "duplicate message id is in process"
        )));
        // A refusal stays one (a full queue, a bad subject…).
        assert!(!unconfirmed(&answered(10077, "maximum messages exceeded")));
        assert!(!unconfirmed(&PublishError::new(
            PublishErrorKind::MaxPayloadExceeded
        )));
    }
}
