//! The notifier: a consumer of the event log, separate from the manager,
//! that announces step and job transitions on NATS subjects
//! (`fanjet.notify.<workflow>.<job_id>.<kind>`) and, when configured, POSTs
//! them as JSON to webhooks with retries and backoff.
//!
//! Each event is acknowledged only after it was announced and every webhook
//! took it or gave up, so a restarted notifier resumes where it stopped;
//! the acknowledgement is confirmed by the server, which confirms the
//! announcement sent before it ([`acknowledge`]).
//! Every notification carries the event's message id in the
//! `Fanjet-Notification-Id` header for receivers to drop the rare duplicate
//! (a notifier that dies between sending and acknowledging).

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{self, pull};
use futures::StreamExt;
use thiserror::Error;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::nats::Nats;
use crate::protocol::{
    kind_filter, notify_subject, Event, EventKind, NOTIFICATION_ID_HEADER, NOTIFY_CONSUMER,
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

/// Runs the notifier until `cancel`.
pub async fn run(
    nats: Nats,
    hooks: Webhooks,
    cancel: CancellationToken,
) -> Result<(), NotifyError> {
    let err = |e: &dyn std::fmt::Display| NotifyError::Nats(e.to_string());
    let consumer = nats
        .events
        .create_consumer(pull::Config {
            durable_name: Some(NOTIFY_CONSUMER.into()),
            filter_subjects: NOTIFIED.iter().map(|k| kind_filter(k.token())).collect(),
            ack_policy: consumer::AckPolicy::Explicit,
            // Long enough for every retry of a slow webhook.
            ack_wait: Duration::from_secs(300),
            max_ack_pending: 1000,
            ..Default::default()
        })
        .await
        .map_err(|e| err(&e))?;
    let mut messages = consumer.messages().await.map_err(|e| err(&e))?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| err(&e))?;
    let hooks = Arc::new(hooks);
    let slots = Arc::new(Semaphore::new(64));
    let mut deliveries = JoinSet::new();
    info!(webhooks = hooks.urls.len(), "notifier running");
    loop {
        let msg = tokio::select! {
            _ = cancel.cancelled() => break,
            m = messages.next() => match m {
                Some(Ok(m)) => m,
                Some(Err(e)) => { warn!(error = %e, "notifier pull"); continue; }
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
        let Ok(permit) = slots.clone().acquire_owned().await else {
            break;
        };
        let (http, hooks) = (http.clone(), hooks.clone());
        let client = nats.client.clone();
        deliveries.spawn(async move {
            for url in &hooks.urls {
                post(&http, url, &id, announcement.body.clone(), &hooks).await;
            }
            acknowledge(&client, &msg, &announcement).await;
            drop(permit);
        });
    }
    // Let deliveries under way finish their current try; the rest are redelivered.
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while deliveries.join_next().await.is_some() {}
    })
    .await;
    deliveries.shutdown().await;
    Ok(())
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
