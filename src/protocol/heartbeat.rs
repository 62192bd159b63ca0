//! The heartbeat every manager and worker publishes on
//! `fanjet.heartbeat.<role>.<id>`: how `fanjet serve` and `fanjet processes`
//! know who is alive and how busy.

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
    /// Manager: jobs held as running, partitions owned.
    #[serde(default)]
    pub jobs: u64,
    #[serde(default)]
    pub partitions: u64,
}
