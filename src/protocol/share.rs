//! Sharing workers' slots fairly: what each partition tells the others
//! about the jobs it runs on a step (its [`Demand`], one key per step and
//! partition in [`SHARES_BUCKET`]), the settings of a customer
//! ([`Tenant`], in [`TENANTS_BUCKET`]), and the share a job's record shows
//! ([`Share`]). The rules that turn them into slots are the engine's
//! (`machine/share.rs`); these are the records that travel.

use serde::{Deserialize, Serialize};

use super::{customer_tag, Millis};

/// Bucket of the partitions' demands, one key per step and partition
/// ([`share_key`]); written by managers only.
pub const SHARES_BUCKET: &str = "fanjet_shares";
/// Bucket of the customers' settings, one key per customer
/// ([`tenant_key`]); written by operators (`fanjet tenants set`), read by
/// managers and the viewer role.
pub const TENANTS_BUCKET: &str = "fanjet_tenants";

/// Lowest, default and highest job priority: among jobs competing for a
/// step's slots, a higher one starts first.
pub const MIN_PRIORITY: u8 = 1;
pub const DEFAULT_PRIORITY: u8 = 5;
pub const MAX_PRIORITY: u8 = 9;

/// A job that wants slots and held none for this long rises one priority
/// level, and one more per period it still waits (the starvation policy).
pub const AGING_MS: u64 = 60_000;

/// A demand record not rewritten for this long is ignored (its partition's
/// holder rewrites it at least every few seconds).
pub const DEMAND_TTL_MS: u64 = 30_000;

/// Key of one partition's demand on one step of a workflow, in
/// [`SHARES_BUCKET`]. Workflow and step names are tokens, so the key is a
/// valid KV key.
pub fn share_key(workflow: &str, step: &str, partition: u32) -> String {
    format!("demand.{workflow}.{step}.{partition:02}")
}

/// The step (`<workflow>.<step>`) and partition a [`share_key`] names.
pub fn parse_share_key(key: &str) -> Option<(String, u32)> {
    let (step, partition) = key.strip_prefix("demand.")?.rsplit_once('.')?;
    if !step.contains('.') {
        return None;
    }
    Some((step.to_string(), partition.parse().ok()?))
}

/// Key, in [`SHARES_BUCKET`], of the reservations under a customer's cap.
pub fn customer_cap_key(customer: &str) -> String {
    format!("cap.customer.{}", customer_tag(customer))
}

/// Key, in [`SHARES_BUCKET`], of the reservations under a step's cap.
pub fn step_cap_key(workflow: &str, step: &str) -> String {
    format!("cap.step.{workflow}.{step}")
}

/// The room each partition has reserved under one cap: its jobs under the
/// cap together hold (dispatched and unfinished) at most its reservation,
/// and the reservations together never exceed the cap (each change is a
/// revision-checked update).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Reservations {
    /// Partition → subjobs reserved.
    pub partitions: std::collections::BTreeMap<u32, u64>,
}

/// Key of a customer's settings in [`TENANTS_BUCKET`]: its tag, since a
/// customer key may hold any printable text.
pub fn tenant_key(customer: &str) -> String {
    customer_tag(customer)
}

/// What one partition's running jobs want of one step's slots.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Demand {
    /// When it was written (readers ignore one older than [`DEMAND_TTL_MS`]).
    pub at: Millis,
    pub jobs: Vec<JobDemand>,
}

/// One job's claim on a step's slots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct JobDemand {
    pub job_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub customer: Option<String>,
    #[schemars(range(min = 1, max = 9))]
    pub priority: u8,
    /// Slots it could use now: its unfinished subjobs, at most its
    /// `max_in_flight`.
    pub want: u64,
    /// Subjobs it has dispatched and not finished.
    pub holds: u64,
    /// Subjobs of its step not finished (dispatched or not).
    #[serde(default)]
    pub unfinished: u64,
    /// When its step started (older first among equals).
    pub since: Millis,
    /// Since when it wants slots and holds none, if so (for aging).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_since: Option<Millis>,
}

/// A customer's settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Tenant {
    pub customer: String,
    /// Its weight against other customers on a step (default 1): a
    /// customer of weight 2 gets twice the slots of one of weight 1 when
    /// both want more than there is.
    #[serde(default = "one")]
    pub weight: u32,
    /// Most of its subjobs running (dispatched and unfinished) at once,
    /// over all its jobs and steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrency: Option<u64>,
}

fn one() -> u32 {
    1
}

impl Tenant {
    pub fn new(customer: &str) -> Self {
        Tenant {
            customer: customer.to_string(),
            weight: 1,
            max_concurrency: None,
        }
    }
}

/// One customer's use of the workers now, from the partitions' demands:
/// what `fanjet jobs --by-customer` and `GET /api/customers` show.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct CustomerUsage {
    /// `-` for jobs without a customer.
    pub customer: String,
    /// Its fanouts running now.
    pub jobs: u64,
    /// Their subjobs dispatched and unfinished (queued or running on a worker).
    pub running: u64,
    /// Their subjobs not dispatched yet (waiting for their share).
    pub queued: u64,
    pub weight: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrency: Option<u64>,
}

/// A running fanout step's share of its workers, as the job record shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Share {
    /// Slots it may hold by the fair-share rules now.
    pub slots: u64,
    /// Slots of all workers serving the step (from their heartbeats).
    pub capacity: u64,
    /// Why it holds fewer slots than it could use, if it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<WaitReason>,
}

/// How the manager paces a running fanout step: kept in memory, never
/// stored (a manager that loads the job measures again).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Pace {
    /// Slots the fair share grants it; `None` until shared out.
    pub slots: Option<u64>,
    /// Under a cap: the most it may hold (see the engine's `Grant`).
    pub limit: Option<u64>,
    /// Mean duration of its subjobs lately, as workers report them.
    pub mean_ms: Option<f64>,
    /// Subjobs it finishes per second, as measured lately.
    pub rate: Option<f64>,
    /// When, and at how many finished subjobs, it was last measured.
    pub measured_at: Millis,
    pub measured_done: u64,
}

/// Why a job gets fewer slots than it wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum WaitReason {
    /// Every slot is shared out among jobs of its priority or higher.
    NoCapacity,
    /// Jobs of a higher priority take the slots it would get.
    LowerPriority,
    /// Its customer's `max_concurrency` is reached.
    CustomerCap,
    /// The step's `max_concurrency` is reached.
    StepCap,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn share_keys_name_their_step_and_partition() {
        let k = share_key("invoices", "send", 7);
        assert_eq!(k, "demand.invoices.send.07");
        assert_eq!(parse_share_key(&k), Some(("invoices.send".into(), 7)));
        assert_eq!(parse_share_key("demand.send.07"), None);
        assert_eq!(parse_share_key("demand.a.b.x"), None);
        assert_eq!(parse_share_key(&step_cap_key("cap", "customer")), None);
        assert_eq!(customer_cap_key("acme"), "cap.customer.822b33ad87c1");
    }
}
