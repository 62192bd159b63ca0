//! fanjet: fan-out/fan-in workflow jobs on NATS JetStream.
//!
//! # Layout
//! Arrows run one way: a module uses only modules listed above it, never
//! one below or beside it (`tests/layout.rs` checks the code).
//! - [`protocol`]: the wire contract: subjects, streams, buckets, events,
//!   tasks, submissions, workflow definitions, the records kept in buckets
//!   (job records with their pending bitmaps, statistics, heartbeats, the
//!   detailed status), codecs and the JSON Schemas generated from them.
//! - [`metrics`]: the one Prometheus registry; every metric name and help.
//! - [`shutdown`]: signals to cancellation; a part of a process started
//!   again alone when it fails.
//! - [`logging`]: the log lines on stderr (colour only on a terminal).
//! - [`machine`]: every workflow rule, as a pure state machine: inputs in,
//!   actions out. No I/O, no clock. Uses `protocol`.
//! - [`nats`]: everything done with NATS itself: the connection and its
//!   streams and buckets, the event log (append, read), records in KV,
//!   leases, heartbeats, the embedded nats-server. Uses `protocol`.
//! - [`client`]: what any client does over NATS: submit, cancel, ask the
//!   status service.
//! - [`manager`]: the only writer of job state: partition coordinator, one
//!   event loop per partition around the machine, executor, intake, status
//!   and listing services, max-deliveries advisories, the job index's
//!   consumer.
//! - [`worker`]: the worker pool, the handler API and the `--exec` handler.
//! - [`observe`]: what `fanjet serve` runs: statistics, notifications,
//!   gauges, the process list, the HTTP API and web page. Reads, never
//!   drives a job; uses `client` for the API's submit and cancel.
//!
//! `manager`, `worker` and `observe` do not use each other. The `fanjet`
//! binary (`src/main.rs`, `src/cli/`) parses the command line and calls
//! these; it is the only place that uses `anyhow`.

pub mod client;
pub mod logging;
pub mod machine;
pub mod manager;
pub mod metrics;
pub mod nats;
pub mod observe;
pub mod protocol;
pub mod shutdown;
pub mod worker;
