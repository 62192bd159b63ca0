//! fanjet: fan-out/fan-in workflow jobs on NATS JetStream.
//!
//! # Layout
//! - [`protocol`]: the wire contract (subjects, streams, buckets, events, tasks, codecs).
//! - [`workflow`]: workflow definitions (TOML in, validated, JSON in the KV bucket).
//! - [`machine`]: the pure state machine: events in, actions out.
//! - [`setup`]: creates the streams, consumers and buckets fanjet uses.
//! - [`store`]: job records and pending-set chunks in KV.
//! - [`manager`]: the workflow manager: intake, event loop, executor, advisories.
//! - [`worker`]: the worker pool, the handler API and the `--exec` handler.
//! - [`delivery`]: finds deliveries lost on the way to an acknowledge-all consumer.
//! - [`leases`]: who runs what when only one may: partitions among managers, the statistics consumer.
//! - [`connect`]: NATS connection options shared by every command.
//! - [`server`]: finds and runs a local nats-server (for `fanjet dev` and tests).
//! - [`shutdown`]: signals to cancellation.

pub mod api;
pub mod client;
pub mod connect;
pub mod delivery;
pub mod demo;
pub mod leases;
pub mod machine;
pub mod manager;
pub mod metrics;
pub mod monitor;
pub mod notify;
pub mod progress;
pub mod protocol;
pub mod serve;
pub mod server;
pub mod setup;
pub mod shutdown;
pub mod stats;
pub mod store;
pub mod worker;
pub mod workflow;
