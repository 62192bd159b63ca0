//! The event log (`FANJET_EVENTS_<cell>`, a stream per cell), the one place that writes to it and
//! reads it in order: [`append`] (and [`encode`] + [`message`] for writers
//! that pipeline), [`Reader`] for the acknowledge-all readers (the manager's
//! partitions, the statistics consumer), and [`history`] for a job's events.
//!
//! Every event goes out with its deterministic message id
//! ([`Event::msg_id`]), so re-publishing after a crash is dropped by the
//! stream's duplicate window, and bounded by the server's max payload: an
//! event that cannot fit is a [`LogError::TooLarge`], which retrying cannot
//! mend, unlike a [`LogError::Append`] (a node down, a timeout).
//!
//! # Holes in acknowledge-all reading
//! Under `AckPolicy::All`, acknowledging a message acknowledges every message
//! delivered before it. A message lost between the server and the client (a
//! dropped connection, a consumer leader changing in the middle of a
//! delivery) would then be acknowledged without ever being read, and the
//! manager would wait for an outcome it will never see. The server numbers
//! every delivery of a consumer (the consumer sequence; a reset starts it
//! again after the ack floor), so a [`Reader`] checks the numbers follow on
//! without a hole: at a hole, it hands out only what came before it, and
//! its owner applies that, acknowledges it and opens the reader again from
//! its ack floor, which delivers the lost message again.
//!
//! # One reader at a time
//! A reader's consumer is shared by whoever holds its lease in turn. A
//! holder frozen past its lease still has a pull request waiting at the
//! server, which would go on taking deliveries meant for the next holder
//! (they would come back only after the ack wait). So the consumer pins one
//! client ([`PriorityPolicy::PinnedClient`]), and opening a reader unpins
//! whoever held it: the stale request is refused from then on, and the new
//! reader's pull takes the pin.

use std::time::Duration;

use async_nats::jetstream::consumer::pull;
use async_nats::jetstream::consumer::{AckPolicy, Info, PriorityPolicy};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::{
    ConsumerResetError, LastRawMessageErrorKind, RawMessageErrorKind, Stream,
};
use async_nats::jetstream::{Context, Message};
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use serde::Serialize;
use serde_json::Value;
use thiserror::Error;

use super::leases::{Fence, Fenced};
use super::Nats;
use crate::metrics::Metrics;
use crate::protocol::{
    encode_json, events_stream, job_cell, job_events_filter, Counted, Event, Job, Source,
    StepResults, TaskKey,
};

/// What can go wrong with the log, and whether trying again can help
/// ([`LogError::is_transient`]).
#[derive(Debug, Error)]
pub enum LogError {
    /// The event, encoded, is larger than the server accepts.
    #[error("{kind} event of job {job_id} is {bytes} bytes, more than the server accepts ({max})")]
    TooLarge {
        job_id: String,
        kind: &'static str,
        bytes: usize,
        max: usize,
    },
    /// The event cannot be encoded.
    #[error("encoding an event: {0}")]
    Encode(String),
    /// NATS did not take or confirm the event (a node down, a timeout).
    #[error("appending to the event log: {0}")]
    Append(String),
    /// Reading failed (a node down, a timeout, a consumer gone).
    #[error("reading the event log: {0}")]
    Read(String),
    /// The lease the reader stands for is not certainly held.
    #[error(transparent)]
    Fenced(#[from] Fenced),
}

impl LogError {
    /// True when the same call may succeed later; false when it never will.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            LogError::Append(_) | LogError::Read(_) | LogError::Fenced(_)
        )
    }
}

/// An event accepted by the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// Its sequence in the log.
    pub seq: u64,
    /// The log had it already (the same message id, within the duplicate window).
    pub duplicate: bool,
}

/// Encodes `event` as JSON, refusing it when it is larger than
/// `max_payload` (take it from [`Nats::max_payload`], read once per batch:
/// this runs for every subjob).
pub fn encode(event: &Event, max_payload: usize) -> Result<Bytes, LogError> {
    let bytes = encode_json(event).map_err(|e| LogError::Encode(e.to_string()))?;
    if bytes.len() > max_payload {
        return Err(LogError::TooLarge {
            job_id: event.job_id().to_string(),
            kind: event.kind().token(),
            bytes: bytes.len(),
            max: max_payload,
        });
    }
    Ok(bytes)
}

/// The message that carries an encoded event: its payload and message id.
pub fn message(event: &Event, payload: Bytes) -> PublishMessage {
    PublishMessage::build()
        .payload(payload)
        .message_id(event.msg_id())
}

/// Appends one event and waits until the log has it.
pub async fn append(nats: &Nats, event: &Event) -> Result<Appended, LogError> {
    let payload = encode(event, nats.max_payload())?;
    append_encoded(&nats.js, event, payload).await
}

/// Appends an event already [`encode`]d.
pub async fn append_encoded(
    js: &Context,
    event: &Event,
    payload: Bytes,
) -> Result<Appended, LogError> {
    let err = |e: &dyn std::fmt::Display| LogError::Append(e.to_string());
    let ack = js
        .send_publish(event.subject(), message(event, payload))
        .await
        .map_err(|e| err(&e))?
        .await
        .map_err(|e| err(&e))?;
    Ok(Appended {
        seq: ack.sequence,
        duplicate: ack.duplicate,
    })
}

/// How long one try of [`append_retrying`] waits for the log's
/// acknowledgement. A publish that reaches a stream as it hands its
/// leadership over (an election, or a move on purpose) is never
/// acknowledged; waited out for the client's 10 s, it held up every later
/// outcome of that worker's cell as long (seen in a chaos run).
const APPEND_WAIT: Duration = Duration::from_secs(2);
/// How long a worker goes on trying to store an outcome: past a leader
/// election (4-9 s), so that it is stored rather than its subjob run again.
pub const OUTCOME_APPEND_FOR: Duration = Duration::from_secs(15);

/// Appends an event already [`encode`]d, trying again after transient
/// failures and unacknowledged tries ([`APPEND_WAIT`] each) for up to
/// `within` (pauses doubling from 100 ms up to 1 s). The message id
/// makes that safe: an event the log took already is answered as a
/// duplicate, which is also how a publish that met the same event still in
/// process on a replicated stream (another intake, a resent request) ends.
pub async fn append_retrying(
    js: &Context,
    event: &Event,
    payload: Bytes,
    within: Duration,
) -> Result<Appended, LogError> {
    let began = std::time::Instant::now();
    let mut pause = Duration::from_millis(100);
    loop {
        let tried = tokio::time::timeout(APPEND_WAIT, append_encoded(js, event, payload.clone()))
            .await
            .unwrap_or_else(|_| {
                Err(LogError::Append(format!(
                    "no acknowledgement within {APPEND_WAIT:?}"
                )))
            });
        match tried {
            Err(e) if e.is_transient() && began.elapsed() + pause < within => {
                tracing::debug!(error = %e, job_id = event.job_id(), "appending an event; trying again");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
            }
            result => return result,
        }
    }
}

/// Reads the payload of the event at log sequence `seq` (a step's input). `Ok(None)`: it
/// is gone for good (older than the log's first event, or deleted); an
/// error: it could not be read now, try again later. A "no message" answer
/// alone is not trusted: while a cluster changes leaders a read can answer
/// that for an event that is there, which would fail a job for nothing.
pub async fn event_at(nats: &Nats, job_id: &str, seq: u64) -> Result<Option<Bytes>, LogError> {
    let log = nats.log(job_id);
    let err = |e: &dyn std::fmt::Display| LogError::Read(format!("event {seq}: {e}"));
    let mut pause = Duration::from_millis(250);
    for _ in 0..3 {
        // Asked again when unanswered: a read sent as the log's leader was
        // lost is never answered, and waiting out the client's 10 s held
        // its session up that long.
        let got = super::answered(|| log.get_raw_message(seq))
            .await
            .map_err(|e| err(&e))?;
        match got {
            Ok(m) => return Ok(Some(m.payload)),
            Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => {
                tokio::time::sleep(pause).await;
                pause *= 2;
            }
            Err(e) => return Err(err(&e)),
        }
    }
    let state = log.get_info().await.map_err(|e| err(&e))?.state;
    if seq > state.last_sequence {
        // What answered has not seen it yet: it is not gone.
        return Err(err(&"not found, and the log's last event is older"));
    }
    Ok(None)
}

/// The log sequence of the last event of `job_id` on `subject` (0: none).
pub async fn last_seq(nats: &Nats, job_id: &str, subject: &str) -> Result<u64, LogError> {
    match nats
        .log(job_id)
        .get_last_raw_message_by_subject(subject)
        .await
    {
        Ok(m) => Ok(m.sequence),
        Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(0),
        Err(e) => Err(LogError::Read(format!("last event on {subject}: {e}"))),
    }
}

/// The log sequence of a delivered event (0 when the reply subject cannot
/// be read, which a real server never sends).
pub fn stream_seq(msg: &Message) -> u64 {
    msg.info().map(|i| i.stream_sequence).unwrap_or(0)
}

/// A durable, acknowledge-all reader of the log, delivering in order and
/// stopping at holes. Its owner applies each [`Batch`], acknowledges the
/// last message applied (which acknowledges everything before it) and, at
/// a hole, opens the reader again.
pub struct Reader {
    messages: pull::Stream,
    deliveries: Deliveries,
    batch: usize,
    /// Who reads, for the holes metric.
    who: &'static str,
}

/// What one [`Reader::next_batch`] hands out.
pub struct Batch {
    /// Messages in log order, every one of them following on.
    pub messages: Vec<Message>,
    /// Set when a delivery went missing after `messages`: apply them,
    /// acknowledge, then open the reader again to have it delivered.
    pub hole: Option<Hole>,
}

/// The priority group every reader pulls in.
const READER_GROUP: &str = "reader";
/// A pinned reader that stops pulling this long loses the pin.
const PIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Each pull request's life: a reader pulls again at least this often.
/// Shorter than a lease's life less a renewal round, so the requests of a
/// holder frozen past its lease have expired at the server when the next
/// holder opens its reader: a request not yet pinned could otherwise take
/// the pin the new reader just released.
const PULL_EXPIRES: Duration = Duration::from_secs(2);

impl Reader {
    /// Creates (or updates) the durable consumer `name` over `filters` on
    /// the log stream of `cell`,
    /// resets it to its ack floor, so everything not yet acknowledged is
    /// delivered again in order, takes the pin from any earlier reader and
    /// starts pulling batches of at most `batch` events. With a `fence`,
    /// each of those changes to the shared consumer is made only while the
    /// lease it stands for is certainly held (checked right before each).
    pub async fn open(
        nats: &Nats,
        cell: u32,
        name: &str,
        filters: Vec<String>,
        batch: usize,
        who: &'static str,
        fence: Option<&Fence>,
    ) -> Result<Self, LogError> {
        let fenced = || match fence.map(Fence::check) {
            Some(Err(e)) => Err(LogError::Fenced(e)),
            _ => Ok(()),
        };
        let err =
            |what: &str, e: &dyn std::fmt::Display| LogError::Read(format!("{what} {name}: {e}"));
        let consumer: pull::Config = pull::Config {
            durable_name: Some(name.to_string()),
            filter_subjects: filters,
            ack_policy: AckPolicy::All,
            ack_wait: Duration::from_secs(60),
            max_ack_pending: 100_000,
            priority_policy: PriorityPolicy::PinnedClient,
            priority_groups: vec![READER_GROUP.to_string()],
            priority_timeout: PIN_TIMEOUT,
            ..Default::default()
        };
        // An existing consumer, pinned or made by an earlier version that
        // did not pin, is updated in place from where it is.
        // Each request is asked again when it goes unanswered (its group
        // electing a leader), the fence checked before every try.
        let log = nats.cell_log(cell);
        let consumer = super::answered(|| async {
            fenced()?;
            super::consumer_as(&nats.js, log, name, consumer.clone())
                .await
                .map_err(|e| err("reading or creating consumer", &e))
        })
        .await
        .map_err(|e| err("reading or creating consumer", &e))??;
        let (deliveries, floor) = super::answered(|| async {
            fenced()?;
            Deliveries::reset(log, name)
                .await
                .map_err(|e| err("resetting consumer", &e))
        })
        .await
        .map_err(|e| err("resetting consumer", &e))??;
        tracing::info!(
            consumer = name,
            ack_floor = floor,
            next_delivery = deliveries.next,
            "reading the log again from its ack floor"
        );
        super::answered(|| async {
            fenced()?;
            log.unpin_consumer(name, READER_GROUP)
                .await
                .map_err(|e| err("taking the pin of", &e))
        })
        .await
        .map_err(|e| err("taking the pin of", &e))??;
        let messages = consumer
            .stream()
            .group(READER_GROUP)
            .max_messages_per_batch(batch)
            .expires(PULL_EXPIRES)
            .heartbeat(PULL_EXPIRES / 4)
            .messages()
            .await
            .map_err(|e| err("pulling from", &e))?;
        Ok(Reader {
            messages,
            deliveries,
            batch,
            who,
        })
    }

    /// Waits for the next event, then takes every event already delivered
    /// behind it, up to the batch size, and cuts the batch at a hole.
    pub async fn next_batch(&mut self) -> Result<Batch, LogError> {
        let err = |e: &dyn std::fmt::Display| LogError::Read(e.to_string());
        let first = self
            .messages
            .next()
            .await
            .ok_or_else(|| LogError::Read("the consumer closed".into()))?
            .map_err(|e| err(&e))?;
        let mut messages = vec![first];
        while messages.len() < self.batch {
            match self.messages.next().now_or_never() {
                Some(Some(Ok(m))) => messages.push(m),
                Some(Some(Err(e))) => return Err(err(&e)),
                _ => break,
            }
        }
        let hole = self.deliveries.check(&messages);
        if let Some(hole) = hole {
            messages.truncate(hole.at);
            Metrics::get()
                .log_holes
                .with_label_values(&[self.who])
                .inc();
        }
        Ok(Batch { messages, hole })
    }
}

/// One event of a job's history.
#[derive(Debug, Clone, Serialize)]
pub struct LoggedEvent {
    pub seq: u64,
    pub subject: String,
    pub event: Value,
}

/// Events asked for in one batched direct get.
const HISTORY_BATCH: usize = 500;

/// A job's events from the log in order, from sequence `from_seq`, at most
/// `limit`. Read with batched direct gets (`$JS.API.DIRECT.GET.FANJET_EVENTS_<cell>`
/// with `next_by_subj`), so a reader needs no consumer on the log: the
/// viewer role may read history without any right to create, change or
/// pull the consumers the manager depends on.
pub async fn history(
    nats: &Nats,
    job_id: &str,
    from_seq: u64,
    limit: usize,
) -> Result<Vec<LoggedEvent>, LogError> {
    let filter = job_events_filter(job_id);
    let mut out = Vec::new();
    let mut next = from_seq.max(1);
    while out.len() < limit {
        let want = (limit - out.len()).min(HISTORY_BATCH);
        let body = serde_json::json!({"seq": next, "next_by_subj": filter, "batch": want});
        let got = super::direct::batch(&nats.client, &events_stream(job_cell(job_id)), &body)
            .await
            .map_err(LogError::Read)?;
        let full = got.len() >= want;
        for m in got {
            next = m.seq + 1;
            out.push(LoggedEvent {
                seq: m.seq,
                subject: m.subject,
                event: serde_json::from_slice(&m.payload).unwrap_or(Value::Null),
            });
        }
        if !full {
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
struct Deliveries {
    next: u64,
}

impl Deliveries {
    /// Resets the durable consumer `name` of `stream` to its ack floor, so
    /// everything not yet acknowledged is delivered again, in order, and
    /// numbers the deliveries that follow; also gives the ack floor's
    /// stream sequence.
    async fn reset(stream: &Stream, name: &str) -> Result<(Self, u64), ConsumerResetError> {
        let reset = stream.reset_consumer(name, None).await?;
        Ok((
            Self::after(&reset.info),
            reset.info.ack_floor.stream_sequence,
        ))
    }

    /// Expects the delivery after the one `info` last recorded.
    fn after(info: &Info) -> Self {
        Self {
            next: info.delivered.consumer_sequence + 1,
        }
    }

    /// Checks a batch of messages; `Some` when one of them does not follow on.
    fn check(&mut self, batch: &[Message]) -> Option<Hole> {
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

/// Events asked for per page when reading a step's results.
const RESULTS_PAGE: usize = 2000;

/// Reads one step's counted outcomes from the log, in log order, each
/// subjob once ([`StepResults`]), a page at a time. Memory: one page of
/// events and two bits per subjob. With a key (managers, `fanjet serve`),
/// forged outcomes are dropped; without, they cannot be told apart.
/// Whether the input step `step_index` of `job` reads (its items, or a
/// task's input) is still in the log: a redrive needs it.
pub async fn step_input_kept(nats: &Nats, job: &Job, step_index: usize) -> Result<bool, LogError> {
    match job.steps.get(step_index).and_then(|s| s.source.as_ref()) {
        Some(Source::Event { seq, .. }) => Ok(event_at(nats, &job.job_id, *seq).await?.is_some()),
        _ => Ok(true),
    }
}

pub struct ResultsReader {
    nats: Nats,
    job_id: String,
    reader: StepResults,
    from: u64,
    done: bool,
}

impl ResultsReader {
    /// The results of step `step_index` of `job` (of each run of it, when
    /// it was redriven: [`Job::result_runs`]).
    pub fn new(nats: &Nats, job: &Job, step_index: usize, key: Option<TaskKey>) -> Self {
        ResultsReader {
            nats: nats.clone(),
            job_id: job.job_id.clone(),
            reader: StepResults::of_job(job, step_index, key),
            from: 1,
            done: false,
        }
    }

    /// The outcomes that count in the next page of the job's events (maybe
    /// none); `None` once the step or the log has no more.
    pub async fn next_page(&mut self) -> Result<Option<Vec<Counted>>, LogError> {
        if self.done {
            return Ok(None);
        }
        let page = history(&self.nats, &self.job_id, self.from, RESULTS_PAGE).await?;
        let Some(last) = page.last() else {
            self.done = true;
            return Ok(None);
        };
        self.from = last.seq + 1;
        let mut out = Vec::new();
        for logged in page {
            let Ok(event) = serde_json::from_value::<Event>(logged.event) else {
                continue;
            };
            if event.is_stored_on(&logged.subject) {
                self.reader.apply(logged.seq, &event, &mut out);
            }
            if self.reader.ended() {
                self.done = true;
                break;
            }
        }
        Ok(Some(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::SubjobCompleted;

    #[test]
    fn events_are_bounded_and_too_large_is_not_transient() {
        let done = Event::SubjobCompleted(SubjobCompleted {
            run: 0,
            job_id: "j".into(),
            step_index: 1,
            index: 7,
            attempt: 1,
            result: serde_json::json!("x".repeat(2000)),
            duration_ms: 3,
            token: String::new(),
        });
        let bytes = encode(&done, 4096).expect("fits");
        assert_eq!(bytes, encode_json(&done).unwrap());
        match encode(&done, 1000) {
            Err(e @ LogError::TooLarge { .. }) => {
                assert!(!e.is_transient(), "too large stays too large");
                let text = e.to_string();
                assert!(text.contains("subjob_completed event of job j"), "{text}");
                assert!(text.contains("(1000)"), "{text}");
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
        assert!(LogError::Append("timeout".into()).is_transient());
        assert!(LogError::Read("no responders".into()).is_transient());
    }

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
