//! Who runs: live managers with the event-log partitions each leases, and
//! workers with their slots, from the lease bucket and heartbeats
//! (`fanjet processes`, `GET /api/processes`, the page's Processes panel).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

use crate::nats::{leases, Nats};
use crate::protocol::{Heartbeat, PARTITIONS};

/// A live manager: the partitions it leases, and what its heartbeat said.
#[derive(Debug, Clone, Serialize, serde::Deserialize, schemars::JsonSchema)]
pub struct ManagerView {
    pub id: String,
    /// The NATS user its heartbeats come from (none heard yet: absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Partitions of the event log it reads (from the lease bucket).
    pub partitions: Vec<u32>,
    /// Jobs it holds as running (from its heartbeat; none heard yet: null).
    pub jobs: Option<u64>,
    /// Milliseconds since its last heartbeat (none heard yet: null).
    pub seen_ms_ago: Option<u64>,
}

/// A live worker process, from its heartbeat.
#[derive(Debug, Clone, Serialize, serde::Deserialize, schemars::JsonSchema)]
pub struct WorkerView {
    pub id: String,
    /// The NATS user its heartbeats come from (from their subject).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    pub slots: u64,
    pub busy: u64,
    pub seen_ms_ago: u64,
}

/// Who runs: managers with their partitions, workers with their slots.
#[derive(Debug, Clone, Serialize, serde::Deserialize, schemars::JsonSchema)]
pub struct Processes {
    pub managers: Vec<ManagerView>,
    pub workers: Vec<WorkerView>,
    /// Partitions no manager holds: their jobs wait (normal for a few
    /// seconds after a manager died, until its leases expire).
    pub unowned_partitions: Vec<u32>,
    /// Set when the lease bucket could not be read (partitions unknown).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leases_error: Option<String>,
}

/// Builds the process list from the lease bucket and heartbeats heard
/// ([`super::monitor::live`] in `fanjet serve`, [`crate::nats::heartbeat::listen`] elsewhere).
pub async fn processes(nats: &Nats, beats: Vec<(Duration, Heartbeat)>) -> Processes {
    let ms = |d: Duration| d.as_millis() as u64;
    let mut managers: BTreeMap<String, ManagerView> = BTreeMap::new();
    let mut workers = Vec::new();
    for (ago, hb) in beats {
        match hb.role.as_str() {
            "manager" => {
                managers.insert(
                    hb.id.clone(),
                    ManagerView {
                        id: hb.id,
                        user: hb.user,
                        partitions: Vec::new(),
                        jobs: Some(hb.jobs),
                        seen_ms_ago: Some(ms(ago)),
                    },
                );
            }
            "worker" => workers.push(WorkerView {
                id: hb.id,
                user: hb.user,
                slots: hb.slots,
                busy: hb.busy,
                seen_ms_ago: ms(ago),
            }),
            _ => {}
        }
    }
    let leases = leases::holders(nats).await;
    // A manager in the lease bucket whose heartbeat was not heard (yet).
    let unheard = |id: &str| ManagerView {
        user: None,
        id: id.to_string(),
        partitions: Vec::new(),
        jobs: None,
        seen_ms_ago: None,
    };
    let (unowned_partitions, leases_error) = match leases {
        Ok((held, members)) => {
            for id in members {
                managers.entry(id.clone()).or_insert_with(|| unheard(&id));
            }
            for (p, id) in &held {
                managers
                    .entry(id.clone())
                    .or_insert_with(|| unheard(id))
                    .partitions
                    .push(*p);
            }
            let unowned = (0..PARTITIONS).filter(|p| !held.contains_key(p)).collect();
            (unowned, None)
        }
        Err(e) => (Vec::new(), Some(e.to_string())),
    };
    workers.sort_by(|a, b| a.id.cmp(&b.id));
    Processes {
        managers: managers.into_values().collect(),
        workers,
        unowned_partitions,
        leases_error,
    }
}
