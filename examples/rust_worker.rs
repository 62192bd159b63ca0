//! A worker written against the fanjet library: one async handler per step.
//!
//! Run a manager (`fanjet dev` starts one with its own nats-server on
//! 127.0.0.1:4222), then:
//!
//! ```sh
//! cargo run --example rust_worker -- nats://127.0.0.1:4222
//! fanjet workflow apply examples/squares.toml
//! fanjet submit squares --input '[1, 2, 3, 4]' --wait
//! ```
//!
//! The workflow `squares` has a first fanout step over the job's input
//! (squares each number) and a task step that receives the fanout summary.

use std::time::Duration;

use fanjet::nats::Nats;
use fanjet::worker::{TaskContext, TaskError, Worker};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "nats://127.0.0.1:4222".into());
    let client = async_nats::connect(&url).await?;
    let nats = Nats::ensure(client).await?;
    // The workflow may be applied from Rust too.
    nats.apply_workflow(&fanjet::protocol::Workflow::from_toml(include_str!(
        "squares.toml"
    ))?)
    .await?;

    let worker = Worker::new(nats)
        .concurrency(8)
        .grace(Duration::from_secs(10))
        .handler("squares", "square", |ctx: TaskContext| async move {
            let n = ctx.task.item.as_f64().ok_or_else(|| {
                TaskError::give_up(format!("item {} is not a number", ctx.task.item))
            })?;
            if ctx.attempt == 1 && ctx.task.index % 4 == 3 {
                // Pretend a dependency is briefly down: retry after the step's backoff.
                return Err(TaskError::retry("dependency unavailable"));
            }
            Ok(json!(n * n))
        })
        .handler("squares", "report", |ctx: TaskContext| async move {
            let summary: &Value = &ctx.task.input;
            Ok(json!({"squared": summary["completed"], "failed": summary["failed"]}))
        });

    let cancel = CancellationToken::new();
    // SIGTERM: stop pulling, let running tasks finish for 30 s (the worker's
    // default grace), exit at the latest 5 s after.
    fanjet::shutdown::on_signals(cancel.clone(), std::time::Duration::from_secs(35));
    worker.run(cancel).await?;
    Ok(())
}
