//! Batched direct gets (`$JS.API.DIRECT.GET.<stream>` with a JSON request:
//! `seq` or `start_time`, `next_by_subj`, `batch`, `up_to_seq`): many
//! messages of a stream read in order with one request and no consumer, by
//! any replica, and by users (the viewer role) who may not create consumers.
//! async-nats has single direct gets only.

use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use serde_json::Value;

/// The server answers at most this many messages to one request.
pub const MAX_BATCH: usize = 1000;

/// How long one request may take to be answered in full.
const ANSWER_WITHIN: Duration = Duration::from_secs(5);

/// A message as a direct get answers it.
#[derive(Debug, Clone)]
pub struct Stored {
    pub seq: u64,
    pub subject: String,
    pub payload: Bytes,
}

/// Sends one batched direct get `request` to `stream` and collects the
/// messages it answers, in stream order (none when nothing matches). The
/// error says what failed, for the caller's error type.
pub async fn batch(
    client: &async_nats::Client,
    stream: &str,
    request: &Value,
) -> Result<Vec<Stored>, String> {
    let inbox = client.new_inbox();
    let mut replies = client
        .subscribe(inbox.clone())
        .await
        .map_err(|e| e.to_string())?;
    client
        .publish_with_reply(
            format!("$JS.API.DIRECT.GET.{stream}"),
            inbox,
            request.to_string().into(),
        )
        .await
        .map_err(|e| e.to_string())?;
    let deadline = tokio::time::Instant::now() + ANSWER_WITHIN;
    let mut out = Vec::new();
    loop {
        let reply = tokio::time::timeout_at(deadline, replies.next())
            .await
            .map_err(|_| format!("no full answer to a direct get on {stream} within 5 s"))?
            .ok_or("the reply subscription closed")?;
        match reply.status.map(u16::from) {
            // 204: end of the batch; 404: nothing (more) matches.
            Some(204) | Some(404) => return Ok(out),
            Some(code) => {
                let why = reply.description.unwrap_or_default();
                return Err(format!("direct get on {stream} answered {code} {why}"));
            }
            None => {}
        }
        let header = |name: &str| {
            reply
                .headers
                .as_ref()
                .and_then(|h| h.get(name))
                .map(|v| v.as_str().to_string())
        };
        let seq = header("Nats-Sequence")
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or("a direct get reply without Nats-Sequence")?;
        out.push(Stored {
            seq,
            subject: header("Nats-Subject").unwrap_or_default(),
            payload: reply.payload,
        });
    }
}
