//! fanjet: fan-out/fan-in workflow jobs on NATS JetStream.
//!
//! # Layout
//! Imports run one way, down this list: a module uses only those above it
//! (`nats` and `machine` do not use each other; `manager`, `worker` and
//! `observe` do not use each other).
//! - [`protocol`]: the wire contract: subjects, streams, buckets, events,
//!   tasks, submissions, workflow definitions, the records kept in buckets,
//!   codecs and the JSON Schemas generated from them. Imports nothing else.
//! - [`machine`]: every workflow rule, as a pure state machine: inputs in,
//!   actions out. No I/O, no clock.
//! - [`nats`]: everything done with NATS itself: the connection and its
//!   streams and buckets, the event log (append, read), records in KV,
//!   leases, heartbeats, the embedded nats-server.
//! - [`metrics`]: the one Prometheus registry; every metric name and help.
//! - [`client`]: what any client does over NATS: submit, cancel, ask status.
//! - [`manager`]: partition coordinator, event loops, executor, intake,
//!   status service, max-deliveries advisories.
//! - [`worker`]: the worker pool, the handler API and the `--exec` handler.
//! - [`observe`]: what `fanjet serve` runs: statistics, notifications,
//!   gauges, the process list, the HTTP API and web page.
//! - [`shutdown`]: signals to cancellation.
//!
//! The `fanjet` binary (`src/main.rs`, `src/cli/`) parses the command line
//! and calls these; it is the only place that uses `anyhow`.

pub mod client;
pub mod machine;
pub mod manager;
pub mod metrics;
pub mod nats;
pub mod observe;
pub mod protocol;
pub mod shutdown;
pub mod worker;
