//! Handlers of the seed `invoices` workflow, used by `fanjet dev`: S1 lists
//! a customer's invoices, S2 "generates and emails" one (a short delay, and
//! a transient failure now and then so retries show), S3 totals the results
//! it reads back through the manager's results service.

use std::time::Duration;

use rand::Rng;
use serde_json::{json, Value};

use fanjet::worker::{TaskContext, TaskError, Worker};

/// The seed workflow's definition.
pub const INVOICES_TOML: &str = include_str!("../../examples/invoices.toml");

/// Knobs of the simulated work.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Invoices S1 lists when the input does not say.
    pub invoices: u64,
    /// Simulated work per invoice, uniformly in this range.
    pub send_ms: (u64, u64),
    /// Share of attempts that fail transiently.
    pub failure_rate: f64,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            invoices: 1000,
            send_ms: (100, 300),
            failure_rate: 0.05,
        }
    }
}

/// Registers the three handlers on `worker`.
pub fn register(worker: Worker, options: DemoOptions) -> Worker {
    let default_count = options.invoices;
    let send_opts = options.clone();
    worker
        .handler("invoices", "collect", move |ctx: TaskContext| async move {
            Ok(collect(&ctx.task.input, default_count))
        })
        .handler("invoices", "send", move |ctx: TaskContext| {
            let o = send_opts.clone();
            async move { send(ctx, &o).await }
        })
        .handler("invoices", "summarize", |ctx: TaskContext| async move {
            summarize(&ctx).await
        })
}

/// S1: the invoices of `input.customer` (`input.count` of them).
pub fn collect(input: &Value, default_count: u64) -> Value {
    let customer = input
        .get("customer")
        .and_then(Value::as_str)
        .unwrap_or("acme");
    let count = input
        .get("count")
        .and_then(Value::as_u64)
        .unwrap_or(default_count);
    Value::Array(
        (0..count)
            .map(|i| json!({"invoice": format!("INV-{customer}-{:05}", i + 1), "customer": customer, "amount_cents": 1000 + (i * 37) % 9000}))
            .collect(),
    )
}

async fn send(ctx: TaskContext, o: &DemoOptions) -> Result<Value, TaskError> {
    let (delay, fail) = {
        let mut rng = rand::rng();
        (
            rng.random_range(o.send_ms.0..=o.send_ms.1.max(o.send_ms.0)),
            rng.random_bool(o.failure_rate.clamp(0.0, 1.0)),
        )
    };
    tokio::time::sleep(Duration::from_millis(delay)).await;
    if fail {
        return Err(TaskError::retry("mail server said 451: try again later"));
    }
    let item = &ctx.task.item;
    Ok(json!({"invoice": item["invoice"], "amount_cents": item["amount_cents"], "sent": true}))
}

/// S3: reads the fanout's results (each invoice's once, page by page,
/// through the manager's results service) and totals them.
async fn summarize(ctx: &TaskContext) -> Result<Value, TaskError> {
    let summary = &ctx.task.input;
    let step_index = summary["results"]["step_index"]
        .as_u64()
        .and_then(|i| usize::try_from(i).ok())
        .unwrap_or(0);
    let mut total_cents = 0u64;
    let mut seen = std::collections::HashSet::new();
    let mut results = ctx.results(step_index);
    while let Some(page) = results.next_page().await? {
        for line in page.iter().filter(|l| l["ok"] == true) {
            if seen.insert(line["index"].as_u64().unwrap_or(u64::MAX)) {
                total_cents += line["result"]["amount_cents"].as_u64().unwrap_or(0);
            }
        }
    }
    Ok(json!({
        "invoices_sent": summary["completed"],
        "failed": summary["failed"],
        "retries": summary["retries"],
        "total_cents": total_cents,
        "results_read": seen.len(),
    }))
}
