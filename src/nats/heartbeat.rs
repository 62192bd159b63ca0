//! Sending and hearing heartbeats ([`Heartbeat`]): every manager and worker
//! runs [`beat`]; `fanjet processes` runs [`listen`]; the collector of
//! `fanjet serve` keeps what it hears with [`record`].

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::Nats;
use crate::protocol::{
    heartbeat_sender, heartbeat_subject, Heartbeat, HEARTBEAT_EVERY, HEARTBEAT_TTL,
    HEARTBEAT_WILDCARD, ROLL_CALL,
};

/// A unique id for this process's heartbeats.
pub fn process_id(role: &str) -> String {
    format!(
        "{role}-{}-{}",
        std::process::id(),
        ulid::Ulid::new()
            .to_string()
            .to_lowercase()
            .get(20..)
            .unwrap_or("0")
    )
}

/// The last heartbeat of each process, by id, and when it came.
pub type Heard = HashMap<String, (Instant, Heartbeat)>;

/// Keeps a heartbeat message, marked with the user its subject names;
/// anything unreadable, or whose subject does not name its role and id, is
/// ignored.
pub fn record(seen: &mut Heard, msg: &async_nats::Message) {
    let Some((role, user, id)) = heartbeat_sender(msg.subject.as_str()) else {
        return;
    };
    if let Ok(mut hb) = serde_json::from_slice::<Heartbeat>(&msg.payload) {
        if hb.role == role && hb.id == id {
            hb.user = Some(user.to_string());
            seen.insert(hb.id.clone(), (Instant::now(), hb));
        }
    }
}

/// The processes heard from within [`HEARTBEAT_TTL`]: how long ago, and
/// what they said.
pub fn ages(seen: &Heard) -> Vec<(Duration, Heartbeat)> {
    seen.values()
        .filter(|(at, _)| at.elapsed() < HEARTBEAT_TTL)
        .map(|(at, hb)| (at.elapsed(), hb.clone()))
        .collect()
}

/// Listens to heartbeats for `period` (processes send one every
/// [`HEARTBEAT_EVERY`]); for a command line that does not run the collector.
pub async fn listen(
    nats: &Nats,
    period: Duration,
) -> Result<Vec<(Duration, Heartbeat)>, async_nats::SubscribeError> {
    let mut beats = nats.client.subscribe(HEARTBEAT_WILDCARD).await?;
    let mut seen = Heard::new();
    let until = tokio::time::sleep(period);
    tokio::pin!(until);
    loop {
        tokio::select! {
            _ = &mut until => break,
            Some(msg) = beats.next() => record(&mut seen, &msg),
        }
    }
    Ok(ages(&seen))
}

/// Publishes `make()` every [`HEARTBEAT_EVERY`] until `cancel`, as NATS
/// user `user` (the subject's user token).
pub async fn beat(
    client: async_nats::Client,
    user: String,
    cancel: CancellationToken,
    mut make: impl FnMut() -> Heartbeat + Send,
) {
    let mut every = tokio::time::interval(HEARTBEAT_EVERY);
    let send = |hb: Heartbeat| {
        let client = client.clone();
        let subject = heartbeat_subject(&hb.role, &user, &hb.id);
        async move {
            if let Ok(body) = serde_json::to_vec(&hb) {
                if let Err(e) = client.publish(subject, body.into()).await {
                    debug!(error = %e, "heartbeat");
                }
            }
        }
    };
    // Answering roll calls is a courtesy: a user without the right to
    // listen beats on its period only.
    let mut calls = match client.subscribe(ROLL_CALL).await {
        Ok(s) => Some(s),
        Err(e) => {
            debug!(error = %e, "not answering roll calls");
            None
        }
    };
    loop {
        let call = async {
            match calls.as_mut() {
                Some(c) => c.next().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            Some(_) = call => send(make()).await,
            _ = cancel.cancelled() => {
                // A last one with no slots: managers stop counting them
                // now rather than when the heartbeat expires.
                let hb = Heartbeat { slots: 0, steps: Vec::new(), ..make() };
                let _ = tokio::time::timeout(Duration::from_millis(500), send(hb)).await;
                return;
            }
            _ = every.tick() => send(make()).await,
        }
    }
}
