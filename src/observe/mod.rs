//! Watching fanjet work: everything `fanjet serve` runs. The statistics
//! consumer ([`stats`]) and the notifier ([`notify`]) each read the log
//! through a consumer of their own; the collector ([`monitor`]) turns
//! heartbeats and consumer info into gauges; [`processes`] says who runs;
//! [`api`] serves the HTTP API, the web page and `/metrics`. Each part is
//! its own task, restarted alone when it fails, all stopped together
//! ([`serve`]). Nothing here drives a job: observers only read the log.

pub mod api;
pub mod monitor;
pub mod notify;
pub mod processes;
pub mod stats;

use std::net::SocketAddr;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::error;

use crate::nats::heartbeat::process_id;
use crate::nats::{leases, Nats};
use crate::shutdown::supervise;
use api::ServeError;
use notify::Webhooks;

/// Settings of `fanjet serve`.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub listen: SocketAddr,
    pub webhooks: Webhooks,
    /// Bearer tokens the API requires (none: open, loopback only).
    pub tokens: api::ApiTokens,
    /// A separate, unauthenticated listener for `/metrics` (for Prometheus).
    pub metrics_listen: Option<SocketAddr>,
}

/// Runs everything until `cancel`; the first part to fail stops the rest.
pub async fn serve(
    nats: Nats,
    options: ServeOptions,
    cancel: CancellationToken,
) -> Result<(), ServeError> {
    let mut tasks = JoinSet::new();
    let (n, c) = (nats.clone(), cancel.clone());
    // One statistics reader across every `fanjet serve`: it builds records
    // in memory between saves. The others stand by and take over.
    let me = process_id("serve");
    tasks.spawn(supervise("statistics", c.clone(), move || {
        let (n, c, me) = (n.clone(), c.clone(), me.clone());
        async move {
            leases::exclusive(
                &n,
                "statistics",
                &me,
                leases::Hold::Fenced,
                &c,
                |inner, _fence| stats::run(n.clone(), inner),
            )
            .await
        }
    }));
    let (n, c, hooks) = (nats.clone(), cancel.clone(), options.webhooks.clone());
    tasks.spawn(supervise("notifier", c.clone(), move || {
        notify::run(n.clone(), hooks.clone(), c.clone())
    }));
    let (n, c) = (nats.clone(), cancel.clone());
    tasks.spawn(supervise("metrics collector", c.clone(), move || {
        monitor::collect(n.clone(), c.clone())
    }));
    if let Some(addr) = options.metrics_listen {
        let c = cancel.clone();
        tasks.spawn(async move {
            if let Err(e) = api::serve_metrics(addr, c).await {
                error!(error = %e, "metrics listener");
            }
        });
    }
    let served = api::serve(nats, options.listen, options.tokens.clone(), cancel.clone()).await;
    cancel.cancel();
    while let Some(r) = tasks.join_next().await {
        if let Err(e) = r {
            error!(error = %e, "serve task panicked");
        }
    }
    served
}
