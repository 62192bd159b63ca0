//! The notifier: a consumer of the event log, separate from the manager,
//! that announces step and job transitions on NATS subjects
//! (`fanjet.notify.<workflow>.<job_id>.<kind>`) and, when configured, POSTs
//! them as JSON to webhooks with retries and backoff.
//!
//! Each event is acknowledged only after it was announced and every webhook
//! took it or gave up, so a restarted notifier resumes where it stopped;
//! the acknowledgement is confirmed by the server, which confirms the
//! announcement sent before it ([`acknowledge`]). The ack wait is short
//! ([`ACK_WAIT`]) so that an event a killed notifier held comes back within
//! seconds; a delivery under way (a webhook being retried for minutes)
//! tells the server it is still working ([`keep_alive`]), and a notifier
//! told to stop hands back what it has not finished.
//! Every notification carries the event's message id in the
//! `Fanjet-Notification-Id` header for receivers to drop the rare duplicate
//! (a notifier that dies between sending and acknowledging).

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{self, pull};
use async_nats::jetstream::AckKind;
use futures::StreamExt;
use thiserror::Error;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::nats::{reader_messages, Nats};
use crate::protocol::{
    kind_filter, notify_subject, Event, EventKind, CELLS, NOTIFICATION_ID_HEADER, NOTIFY_CONSUMER,
};

#[derive(Debug, Error)]
pub enum NotifyError {
    #[error("NATS: {0}")]
    Nats(String),
}

/// Kinds that are notified.
pub const NOTIFIED: [EventKind; 7] = [
    EventKind::StepStarted,
    EventKind::StepCompleted,
    EventKind::JobCompleted,
    EventKind::JobFailed,
    EventKind::JobCancelled,
    EventKind::JobRejected,
    EventKind::JobRedriven,
];

/// Webhook delivery settings.
#[derive(Debug, Clone)]
pub struct Webhooks {
    pub urls: Vec<String>,
    /// Tries per notification and URL.
    pub attempts: u32,
    /// Delay before the first retry; doubles each time.
    pub first_backoff: Duration,
}

impl Default for Webhooks {
    fn default() -> Self {
        Webhooks {
            urls: Vec::new(),
            attempts: 6,
            first_backoff: Duration::from_secs(1),
        }
    }
}

/// The workflow an event names (empty when it names none).
fn workflow_of(event: &Event) -> &str {
    match event {
        Event::StepStarted(e) => &e.workflow,
        Event::StepCompleted(e) => &e.workflow,
        Event::JobCompleted(e) => &e.workflow,
        Event::JobFailed(e) => &e.workflow,
        Event::JobCancelled(e) => &e.workflow,
        Event::JobRejected(e) => e.workflow.as_deref().unwrap_or(""),
        Event::JobRedriven(e) => &e.workflow,
        _ => "",
    }
}

/// How long the server waits for a delivered event's acknowledgement
/// before delivering it again: the longest an event held by a notifier
/// that was killed waits to be notified.
pub const ACK_WAIT: Duration = Duration::from_secs(15);

/// How often a delivery under way tells the server it is still working.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// Deliveries at once; also the most events delivered and not acknowledged,
/// so none waits for a slot unannounced to the server.
const SLOTS: usize = 64;

/// Runs the notifier until `cancel`: a reader per cell's log, each started
/// again alone when it fails (a cell's consumer electing a leader, or its
/// pull ending), so one cell's trouble delays no other's notifications.
pub async fn run(
    nats: Nats,
    hooks: Webhooks,
    cancel: CancellationToken,
) -> Result<(), NotifyError> {
    let hooks = Arc::new(hooks);
    let mut cells = tokio::task::JoinSet::new();
    for cell in 0..CELLS {
        let (n, h, c) = (nats.clone(), hooks.clone(), cancel.clone());
        cells.spawn(crate::shutdown::supervise(
            "notifier",
            cancel.clone(),
            move || run_cell(n.clone(), cell, h.clone(), c.clone()),
        ));
    }
    while cells.join_next().await.is_some() {}
    Ok(())
}

/// Notifies one cell's events until `cancel`.
async fn run_cell(
    nats: Nats,
    cell: u32,
    hooks: Arc<Webhooks>,
    cancel: CancellationToken,
) -> Result<(), NotifyError> {
    let err = |e: &dyn std::fmt::Display| NotifyError::Nats(e.to_string());
    let consumer = nats
        .cell_log(cell)
        .create_consumer(pull::Config {
            durable_name: Some(NOTIFY_CONSUMER.into()),
            filter_subjects: NOTIFIED.iter().map(|k| kind_filter(k.token())).collect(),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: ACK_WAIT,
            max_ack_pending: SLOTS as i64,
            ..Default::default()
        })
        .await
        .map_err(|e| err(&e))?;
    let mut messages = reader_messages(&consumer).await.map_err(|e| err(&e))?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| err(&e))?;
    let slots = Arc::new(Semaphore::new(SLOTS));
    // Cancelled after a grace period at a stop: deliveries still under
    // way then hand their events back.
    let abandon = CancellationToken::new();
    let mut deliveries = JoinSet::new();
    // An event taken from the consumer that had no slot yet at a stop.
    let mut waiting = None;
    info!(cell, webhooks = hooks.urls.len(), "notifier running");
    loop {
        let msg = tokio::select! {
            _ = cancel.cancelled() => break,
            m = messages.next() => match m {
                Some(Ok(m)) => m,
                Some(Err(e)) => {
                    warn!(error = %e, "notifier pull");
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = redeliver_unacknowledged(&nats, cell) => {}
                    }
                    continue;
                }
                None => break,
            },
        };
        while deliveries.try_join_next().is_some() {}
        let event: Event = match serde_json::from_slice(&msg.payload) {
            Ok(e) => e,
            Err(e) => {
                warn!(subject = %msg.subject, error = %e, "notifier: skipping an unreadable event");
                let _ = msg.ack().await;
                continue;
            }
        };
        let id = event.msg_id();
        let subject = notify_subject(workflow_of(&event), event.job_id(), event.kind().token());
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(NOTIFICATION_ID_HEADER, id.as_str());
        let announcement = Announcement {
            subject,
            headers,
            body: msg.payload.clone(),
        };
        if let Err(e) = announcement.send(&nats.client).await {
            warn!(error = %e, "could not publish a notification; it will be retried");
            continue;
        }
        let permit = tokio::select! {
            _ = cancel.cancelled() => { waiting = Some(msg); break; }
            p = keep_alive(&msg, slots.clone().acquire_owned()) => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (http, hooks) = (http.clone(), hooks.clone());
        let client = nats.client.clone();
        let abandon = abandon.clone();
        deliveries.spawn(async move {
            let posts = async {
                for url in &hooks.urls {
                    post(&http, url, &id, announcement.body.clone(), &hooks).await;
                }
            };
            tokio::select! {
                _ = abandon.cancelled() => hand_back(&msg).await,
                _ = keep_alive(&msg, posts) => acknowledge(&client, &msg, &announcement).await,
            }
            drop(permit);
        });
    }
    // No more deliveries to this notifier: what is handed back goes to the
    // next one.
    drop(messages);
    if let Some(msg) = waiting {
        hand_back(&msg).await;
    }
    // Let deliveries under way finish their current try; the rest hand
    // their events back.
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while deliveries.join_next().await.is_some() {}
    })
    .await;
    abandon.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while deliveries.join_next().await.is_some() {}
    })
    .await;
    deliveries.shutdown().await;
    let _ = nats.client.flush().await;
    Ok(())
}

/// After a failed pull: what the consumer delivered and nobody
/// acknowledged is delivered again now. A delivery that went out as the
/// consumer's leader was lost (its pull unanswered since) would otherwise
/// wait out [`ACK_WAIT`] (announcements came 15 s late in chaos runs). An
/// event being announced at that moment may be announced twice, which
/// receivers drop by its id.
async fn redeliver_unacknowledged(nats: &Nats, cell: u32) {
    let log = nats.cell_log(cell);
    let reset = crate::nats::answered(|| log.reset_consumer(NOTIFY_CONSUMER, None)).await;
    if let Err(error) = reset
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()))
    {
        debug!(cell, error, "notifier: resetting its consumer");
    }
}

/// Runs `work`, telling the server every [`PROGRESS_EVERY`] that `msg` is
/// still being worked on, so that its [`ACK_WAIT`] does not run out.
async fn keep_alive<T>(
    msg: &async_nats::jetstream::Message,
    work: impl std::future::Future<Output = T>,
) -> T {
    crate::nats::keep_taken(msg, PROGRESS_EVERY, work).await
}

/// Gives an event back unfinished, for delivery again at once (another
/// notifier, or this one restarted, sends it with the same id).
async fn hand_back(msg: &async_nats::jetstream::Message) {
    if let Err(e) = msg.ack_with(AckKind::Nak(None)).await {
        warn!(error = %e, "handing back a notification; it comes again after its ack wait");
    }
}

/// A notification, as it goes out on NATS (and again, if need be).
struct Announcement {
    subject: String,
    headers: async_nats::HeaderMap,
    body: bytes::Bytes,
}

impl Announcement {
    /// Hands it to the connection (which sends it unless it drops first).
    async fn send(&self, client: &async_nats::Client) -> Result<(), async_nats::PublishError> {
        client
            .publish_with_headers(
                self.subject.clone(),
                self.headers.clone(),
                self.body.clone(),
            )
            .await
    }
}

/// Confirmed acknowledgements tried before leaving the event to its ack
/// wait (the next one after a 0.2 s pause, then twice as long each time).
const ACK_TRIES: u32 = 5;

/// Acknowledges a notified event and waits for the server to confirm it,
/// announcing it again each time that fails. A publish only hands the
/// notification to the connection: if the connection drops (its node
/// killed) before sending, the notification and the acknowledgement after
/// it are lost together, and the event would come back only after its ack
/// wait (minutes). The server handles one connection's messages in order,
/// so a confirmed acknowledgement means the announcement before it reached
/// the server too. Receivers drop repeats by `Fanjet-Notification-Id`.
async fn acknowledge(
    client: &async_nats::Client,
    msg: &async_nats::jetstream::Message,
    announcement: &Announcement,
) {
    let mut pause = Duration::from_millis(200);
    for attempt in 1..=ACK_TRIES {
        match msg.double_ack().await {
            Ok(()) => return,
            Err(e) if attempt == ACK_TRIES => {
                warn!(error = %e, "acking a notified event; it will be notified again after its ack wait");
                return;
            }
            Err(e) => {
                warn!(error = %e, "acking a notified event failed; announcing it again");
            }
        }
        tokio::time::sleep(pause).await;
        pause *= 2;
        if let Err(e) = announcement.send(client).await {
            warn!(error = %e, "could not publish a notification again");
        }
    }
}

/// POSTs one notification, retrying with doubling delays.
async fn post(http: &reqwest::Client, url: &str, id: &str, body: bytes::Bytes, hooks: &Webhooks) {
    let mut delay = hooks.first_backoff;
    for attempt in 1..=hooks.attempts.max(1) {
        let sent = http
            .post(url)
            .header(NOTIFICATION_ID_HEADER, id)
            .header("Content-Type", "application/json")
            .body(body.clone())
            .send()
            .await;
        match sent {
            Ok(r) if r.status().is_success() => return,
            Ok(r) => warn!(url, attempt, status = %r.status(), "webhook refused a notification"),
            Err(e) => warn!(url, attempt, error = %e, "webhook unreachable"),
        }
        if attempt < hooks.attempts {
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(300));
        }
    }
    warn!(url, id, "webhook gave up after {} attempts", hooks.attempts);
}
