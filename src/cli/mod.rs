//! The `fanjet` command's families, one file each: `dev` (everything on an
//! embedded nats-server), `services` (manager, worker, serve), `jobs`
//! (submit, status, jobs, cancel, watch), `processes`, `workflows`; with
//! the terminal output they share (`progress`) and the demo's handlers
//! (`demo`). Results go to stdout, logs and progress to stderr.

pub mod demo;
pub mod dev;
pub mod items;
pub mod jobs;
pub mod processes;
pub mod progress;
pub mod services;
pub mod tenants;
pub mod workflows;

use std::time::Duration;

use anyhow::Result;
use tokio_util::sync::CancellationToken;

use fanjet::nats::connect::ConnectArgs;
use fanjet::nats::{Nats, WorkerNats};

/// Connects and binds to fanjet's streams and buckets; creates them when
/// they are missing and this user may (a fresh server).
pub async fn connect(connect: &ConnectArgs, name: &str) -> Result<Nats> {
    let client = connect.connect(name).await?;
    let identity = connect.identity();
    let user = identity.as_deref();
    match Nats::bind(client.clone()).await {
        Ok(n) => Ok(n.with_user(user)),
        Err(bind_err) => Nats::ensure(client)
            .await
            .map(|n| n.with_user(user))
            .map_err(|_| anyhow::Error::from(bind_err)),
    }
}

/// Connects, creating or updating every stream and bucket (manager, serve,
/// workflow apply).
pub async fn connect_admin(connect: &ConnectArgs, name: &str) -> Result<Nats> {
    let client = connect.connect(name).await?;
    Ok(Nats::ensure(client)
        .await?
        .with_user(connect.identity().as_deref()))
}

/// For a long-running process that creates what it needs (manager,
/// serve): connects and sets up like [`connect_admin`], but while NATS is
/// not there yet or not ready (a server starting, a cluster electing a
/// leader) it waits and tries again, saying so, instead of exiting.
/// `None`: `stop` was cancelled (a signal) while waiting. Wrong addresses,
/// credentials or TLS settings fail at once.
pub async fn connect_waiting(
    connect: &ConnectArgs,
    name: &str,
    stop: &CancellationToken,
) -> Result<Option<Nats>> {
    let identity = connect.identity();
    let user = identity.as_deref();
    waiting(connect, name, stop, |client| async move {
        Ok(Nats::ensure(client).await?.with_user(user))
    })
    .await
}

/// Like [`connect_waiting`], for a worker: binds only what a worker uses
/// ([`WorkerNats`]), so a worker user needs no right to see fanjet's
/// streams; on a fresh server where this user may, it creates them first.
pub async fn connect_worker(
    connect: &ConnectArgs,
    stop: &CancellationToken,
) -> Result<Option<WorkerNats>> {
    let identity = connect.identity();
    let user = identity.as_deref();
    waiting(connect, "fanjet-worker", stop, |client| async move {
        let bound = match WorkerNats::bind(client.clone()).await {
            Ok(n) => n,
            Err(bind_err) => Nats::ensure(client)
                .await
                .map(WorkerNats::from)
                .map_err(|_| bind_err)?,
        };
        Ok(bound.with_user(user))
    })
    .await
}

/// Connects and runs `setup` until it succeeds, a permanent error, or `stop`.
async fn waiting<T, F, Fut>(
    connect: &ConnectArgs,
    name: &str,
    stop: &CancellationToken,
    setup: F,
) -> Result<Option<T>>
where
    F: Fn(async_nats::Client) -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut pause = Duration::from_millis(250);
    loop {
        let attempt = async {
            let client = connect.connect(name).await?;
            setup(client).await
        };
        let error = tokio::select! {
            _ = stop.cancelled() => return Ok(None),
            result = attempt => match result {
                Ok(ready) => return Ok(Some(ready)),
                Err(e) => e,
            },
        };
        let permanent = error
            .downcast_ref::<fanjet::nats::connect::ConnectError>()
            .is_some_and(|e| !e.is_transient());
        if permanent {
            return Err(error);
        }
        tracing::warn!(error = %format!("{error:#}"), retry_in = ?pause, "waiting for NATS");
        tokio::select! {
            _ = stop.cancelled() => return Ok(None),
            _ = tokio::time::sleep(pause) => {}
        }
        pause = (pause * 2).min(Duration::from_secs(5));
    }
}
