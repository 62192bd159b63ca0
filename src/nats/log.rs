//! The event log (`FANJET_EVENTS`): reading a job's history, and finding
//! the holes of the log's acknowledge-all readers (the manager and the
//! statistics consumer).
//!
//! Under `AckPolicy::All`, acknowledging a message acknowledges every message
//! delivered before it. A message lost between the server and the client (a
//! dropped connection, a consumer leader changing in the middle of a
//! delivery) would then be acknowledged without ever being read, and the
//! manager would wait for an outcome it will never see. The server numbers
//! every delivery of a consumer (the consumer sequence; a reset starts it
//! again after the ack floor), so a reader that checks the numbers follow on
//! without a hole notices the loss, applies only what came before it, and
//! starts again from its ack floor, which delivers the lost message again.

use std::time::Duration;

use async_nats::jetstream::consumer::pull::OrderedConfig;
use async_nats::jetstream::consumer::{DeliverPolicy, Info};
use async_nats::jetstream::stream::{ConsumerResetError, Stream};
use async_nats::jetstream::Message;
use futures::StreamExt;
use serde::Serialize;
use serde_json::Value;
use thiserror::Error;

use super::Nats;
use crate::protocol::job_events_filter;

/// What can go wrong with the log.
#[derive(Debug, Error)]
pub enum LogError {
    #[error("reading the event log: {0}")]
    Read(String),
}

/// One event of a job's history.
#[derive(Debug, Clone, Serialize)]
pub struct LoggedEvent {
    pub seq: u64,
    pub subject: String,
    pub event: Value,
}

/// A job's events from the log in order, from sequence `from_seq`, at most `limit`.
pub async fn history(
    nats: &Nats,
    job_id: &str,
    from_seq: u64,
    limit: usize,
) -> Result<Vec<LoggedEvent>, LogError> {
    let err = |e: &dyn std::fmt::Display| LogError::Read(e.to_string());
    let deliver_policy = if from_seq > 1 {
        DeliverPolicy::ByStartSequence {
            start_sequence: from_seq,
        }
    } else {
        DeliverPolicy::All
    };
    let consumer = nats
        .events
        .create_consumer(OrderedConfig {
            filter_subject: job_events_filter(job_id),
            deliver_policy,
            ..Default::default()
        })
        .await
        .map_err(|e| err(&e))?;
    let mut out = Vec::new();
    let mut msgs = consumer.messages().await.map_err(|e| err(&e))?;
    while out.len() < limit {
        let Ok(Some(next)) = tokio::time::timeout(Duration::from_millis(500), msgs.next()).await
        else {
            break;
        };
        let m = next.map_err(|e| err(&e))?;
        let info = m.info().map_err(|e| err(&e))?;
        let (seq, pending) = (info.stream_sequence, info.pending);
        out.push(LoggedEvent {
            seq,
            subject: m.subject.to_string(),
            event: serde_json::from_slice(&m.payload).unwrap_or(Value::Null),
        });
        if pending == 0 {
            break;
        }
    }
    Ok(out)
}

/// Where a batch stops following on from what was read before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hole {
    /// How many messages at the start of the batch are safe to apply.
    pub at: usize,
    /// The consumer sequence that should have come next.
    pub expected: u64,
    /// The consumer sequence that came instead.
    pub got: u64,
}

impl std::fmt::Display for Hole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "a delivery went missing (expected consumer sequence {}, got {})",
            self.expected, self.got
        )
    }
}

/// The consumer sequence the next delivery must carry.
#[derive(Debug, Clone)]
pub struct Deliveries {
    next: u64,
}

impl Deliveries {
    /// Resets the durable consumer `name` of `stream` to its ack floor, so
    /// everything not yet acknowledged is delivered again, in order, and
    /// numbers the deliveries that follow.
    pub async fn reset(stream: &Stream, name: &str) -> Result<Self, ConsumerResetError> {
        let reset = stream.reset_consumer(name, None).await?;
        Ok(Self::after(&reset.info))
    }

    /// Expects the delivery after the one `info` last recorded.
    pub fn after(info: &Info) -> Self {
        Self {
            next: info.delivered.consumer_sequence + 1,
        }
    }

    /// Checks a batch of messages; `Some` when one of them does not follow on.
    pub fn check(&mut self, batch: &[Message]) -> Option<Hole> {
        self.check_sequences(
            batch
                .iter()
                .map(|m| m.info().ok().map(|i| i.consumer_sequence)),
        )
    }

    /// The rule itself: every known sequence is the one expected; a message
    /// whose sequence cannot be read (none from a real server) is let
    /// through rather than stopping the reader for good.
    fn check_sequences(&mut self, seqs: impl Iterator<Item = Option<u64>>) -> Option<Hole> {
        for (at, seq) in seqs.enumerate() {
            let Some(got) = seq else { continue };
            if got != self.next {
                return Some(Hole {
                    at,
                    expected: self.next,
                    got,
                });
            }
            self.next = got + 1;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from(next: u64) -> Deliveries {
        Deliveries { next }
    }

    #[test]
    fn consecutive_deliveries_pass() {
        let mut d = from(1);
        assert_eq!(d.check_sequences([1, 2, 3].map(Some).into_iter()), None);
        assert_eq!(d.check_sequences([4].map(Some).into_iter()), None);
        assert_eq!(d.next, 5);
    }

    #[test]
    fn a_skipped_delivery_stops_the_batch_before_it() {
        let mut d = from(7);
        assert_eq!(
            d.check_sequences([7, 8, 10, 11].map(Some).into_iter()),
            Some(Hole {
                at: 2,
                expected: 9,
                got: 10
            })
        );
    }

    #[test]
    fn a_hole_before_the_first_message_of_a_batch_is_found() {
        let mut d = from(3);
        assert_eq!(d.check_sequences([3].map(Some).into_iter()), None);
        assert_eq!(
            d.check_sequences([5, 6].map(Some).into_iter()),
            Some(Hole {
                at: 0,
                expected: 4,
                got: 5
            })
        );
    }

    #[test]
    fn a_sequence_going_back_is_a_hole_too() {
        // A new consumer leader that had not heard of the last deliveries
        // numbers them again: what it sends may not be what was read.
        let mut d = from(10);
        assert_eq!(
            d.check_sequences([10, 8].map(Some).into_iter()),
            Some(Hole {
                at: 1,
                expected: 11,
                got: 8
            })
        );
    }

    #[test]
    fn unreadable_sequences_are_let_through() {
        let mut d = from(1);
        assert_eq!(
            d.check_sequences([Some(1), None, Some(2)].into_iter()),
            None
        );
    }
}
