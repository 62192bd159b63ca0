//! The `fanjet` command's families, one file each: `dev` (everything on an
//! embedded nats-server), `services` (manager, worker, serve), `jobs`
//! (submit, status, jobs, cancel, watch), `processes`, `workflows`; with
//! the terminal output they share (`progress`) and the demo's handlers
//! (`demo`). Results go to stdout, logs and progress to stderr.

pub mod demo;
pub mod dev;
pub mod jobs;
pub mod processes;
pub mod progress;
pub mod services;
pub mod workflows;

use anyhow::Result;

use fanjet::nats::connect::ConnectArgs;
use fanjet::nats::Nats;

/// Connects and binds to fanjet's streams and buckets; creates them when
/// they are missing and this user may (a fresh server).
pub async fn connect(connect: &ConnectArgs, name: &str) -> Result<Nats> {
    let client = connect.connect(name).await?;
    match Nats::bind(client.clone()).await {
        Ok(n) => Ok(n),
        Err(bind_err) => Nats::ensure(client)
            .await
            .map_err(|_| anyhow::Error::from(bind_err)),
    }
}

/// Connects, creating or updating every stream and bucket (manager, serve,
/// workflow apply).
pub async fn connect_admin(connect: &ConnectArgs, name: &str) -> Result<Nats> {
    let client = connect.connect(name).await?;
    Ok(Nats::ensure(client).await?)
}
