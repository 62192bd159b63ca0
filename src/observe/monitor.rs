//! The gauges no event carries, built from heartbeats and consumer info.
//!
//! Managers and workers publish a small heartbeat every few seconds on
//! `fanjet.heartbeat.<role>.<user>.<id>` ([`crate::nats::heartbeat`]); `fanjet
//! serve` listens, reads the task and manager consumers' state, and sets
//! the gauges, so one scrape target covers every process.

use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::metrics::{Metrics, CUSTOMER_SERIES};
use crate::nats::heartbeat::{ages, record, Heard};
use crate::nats::tenants;
use crate::nats::Nats;
use crate::protocol::{
    cell, manager_consumer, Heartbeat, HEARTBEAT_TTL, HEARTBEAT_WILDCARD, PARTITIONS,
};

/// The heartbeats [`collect`] heard lately: what the API's process list
/// shows. Empty in a process that does not collect.
fn heard() -> &'static Mutex<Heard> {
    static HEARD: OnceLock<Mutex<Heard>> = OnceLock::new();
    HEARD.get_or_init(Default::default)
}

/// Live processes [`collect`] has heard from.
pub fn live() -> Vec<(Duration, Heartbeat)> {
    heard().lock().map(|seen| ages(&seen)).unwrap_or_default()
}

/// Keeps the gauges current until `cancel`.
pub async fn collect(
    nats: Nats,
    cancel: CancellationToken,
) -> Result<(), async_nats::SubscribeError> {
    let m = Metrics::get();
    let mut beats = nats.client.subscribe(HEARTBEAT_WILDCARD).await?;
    let mut seen = Heard::new();
    let mut every = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            Some(msg) = beats.next() => record(&mut seen, &msg),
            _ = every.tick() => {
                seen.retain(|_, (at, _)| at.elapsed() < HEARTBEAT_TTL);
                if let Ok(mut heard) = heard().lock() {
                    heard.clone_from(&seen);
                }
                let workers = seen.values().filter(|(_, h)| h.role == "worker");
                let (mut n, mut slots, mut busy) = (0, 0, 0);
                for (_, h) in workers {
                    n += 1;
                    slots += h.slots;
                    busy += h.busy;
                }
                m.workers.with_label_values::<&str>(&[]).set(n);
                m.worker_slots.with_label_values(&["busy"]).set(busy as i64);
                m.worker_slots.with_label_values(&["free"]).set(slots.saturating_sub(busy) as i64);
                m.jobs_running.reset();
                m.manager_partitions.reset();
                let mut managers = 0;
                for (_, h) in seen.values().filter(|(_, h)| h.role == "manager") {
                    managers += 1;
                    m.jobs_running.with_label_values(&[&h.id]).set(h.jobs as i64);
                    m.manager_partitions.with_label_values(&[&h.id]).set(h.partitions as i64);
                }
                m.managers.with_label_values::<&str>(&[]).set(managers);
                consumers(&nats, m).await;
                customers(&nats, m).await;
            }
        }
    }
}

/// Running and queued subjobs per customer, the busiest
/// [`CUSTOMER_SERIES`] by name and the rest as `_other` (a bounded number
/// of series whatever the number of customers).
async fn customers(nats: &Nats, m: &Metrics) {
    let Ok(usage) = tenants::usage(&nats.js).await else {
        return;
    };
    m.customer_subjobs.reset();
    let (mut running, mut queued) = (0, 0);
    for (i, u) in usage.iter().enumerate() {
        if i < CUSTOMER_SERIES && u.customer != "_other" {
            m.customer_subjobs
                .with_label_values(&[&u.customer, "running"])
                .set(u.running as i64);
            m.customer_subjobs
                .with_label_values(&[&u.customer, "queued"])
                .set(u.queued as i64);
        } else {
            running += u.running;
            queued += u.queued;
        }
    }
    // Always there (0 when every customer has a series of its own), so the
    // dashboard's panel has data on an idle system.
    {
        m.customer_subjobs
            .with_label_values(&["_other", "running"])
            .set(running as i64);
        m.customer_subjobs
            .with_label_values(&["_other", "queued"])
            .set(queued as i64);
    }
}

/// Backlog, in-flight and redelivered tasks per step (summed over the
/// cells' work queues); the manager's lag.
async fn consumers(nats: &Nats, m: &Metrics) {
    // (backlog, in flight, redelivered) per (workflow, step).
    let mut steps: BTreeMap<(String, String), [u64; 3]> = BTreeMap::new();
    for queue in &nats.tasks {
        let mut list = queue.consumers();
        while let Some(Ok(info)) = list.next().await {
            // Consumer names join workflow and step with '_', which the
            // names may hold too; the filter subject keeps them apart.
            let filter = info.config.filter_subject.clone();
            let parts: Vec<&str> = filter.split('.').collect();
            if parts.len() != 6 || parts[0] != "fanjet" || parts[1] != "task" {
                continue;
            }
            let figures = steps
                .entry((parts[3].to_string(), parts[4].to_string()))
                .or_default();
            figures[0] += info.num_pending;
            figures[1] += info.num_ack_pending as u64;
            figures[2] += info.num_redelivered as u64;
        }
    }
    for ((workflow, step), [backlog, in_flight, redelivered]) in steps {
        let labels = [workflow.as_str(), step.as_str()];
        m.known_step(&workflow, &step);
        m.task_backlog
            .with_label_values(&labels)
            .set(backlog as i64);
        m.tasks_in_flight
            .with_label_values(&labels)
            .set(in_flight as i64);
        m.tasks_redelivered
            .with_label_values(&labels)
            .set(redelivered as i64);
    }
    // The lag of every partition's consumer, summed.
    let lags = (0..PARTITIONS).map(|p| {
        let events = nats.cell_log(cell(p)).clone();
        async move {
            events
                .consumer_info(manager_consumer(p))
                .await
                .ok()
                .map(|i| i.num_pending + i.num_ack_pending as u64)
        }
    });
    let lags: Vec<Option<u64>> = futures::future::join_all(lags).await;
    if lags.iter().any(Option::is_some) {
        m.manager_lag
            .with_label_values::<&str>(&[])
            .set(lags.into_iter().flatten().sum::<u64>() as i64);
    }
}
