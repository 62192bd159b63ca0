//! The heartbeat every manager and worker publishes on
//! `fanjet.heartbeat.<role>.<user>.<id>`: how `fanjet serve` and `fanjet
//! processes` know who is alive and how busy, and which NATS user says so
//! (a permission on `fanjet.heartbeat.<role>.<user>.>` makes the `user`
//! token the sender's, so a heartbeat cannot speak for someone else).

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How often processes send a heartbeat.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(5);
/// A process silent this long is gone.
pub const HEARTBEAT_TTL: Duration = Duration::from_secs(15);

/// What a process says about itself.
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Heartbeat {
    /// `manager` or `worker`.
    pub role: String,
    pub id: String,
    /// Worker: slots in all, and busy.
    #[serde(default)]
    pub slots: u64,
    #[serde(default)]
    pub busy: u64,
    /// Worker: the steps its slots serve, as `<workflow>.<step>` (managers
    /// count the slots of each step from these to share them fairly).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<String>,
    /// Manager: jobs held as running, partitions owned.
    #[serde(default)]
    pub jobs: u64,
    #[serde(default)]
    pub partitions: u64,
    /// The NATS user it came from: set by readers from the subject (what a
    /// permission can enforce), never taken from the payload.
    #[serde(default, skip_deserializing, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}
