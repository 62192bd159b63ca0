//! The `--exec` handler: runs a shell command per task, the task as JSON on
//! stdin, the result as JSON on stdout (a batch: the items together, an
//! outcome per item, [`exec_batch_handler`]). Exit 0 is success, [`EXIT_GIVE_UP`]
//! fails the subjob at once, any other exit asks for a retry with stderr as
//! the error. The same facts are in the environment (`FANJET_JOB_ID`,
//! `FANJET_WORKFLOW`, `FANJET_STEP`, `FANJET_INDEX`, `FANJET_ATTEMPT`) for
//! commands that do not parse JSON.

use std::process::Stdio;
use std::sync::Arc;

use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

use super::{BatchContext, BatchHandler, BatchResults, Handler, TaskContext, TaskError};
use crate::protocol::Task;

/// Exit code with which a command says: do not retry this subjob.
pub const EXIT_GIVE_UP: i32 = 100;

/// Longest stderr text kept as an error message.
const MAX_ERROR: usize = 2000;

/// A handler that runs `command` through `sh -c`.
pub fn exec_handler(command: String) -> Handler {
    let command = Arc::new(command);
    Arc::new(move |ctx: TaskContext| {
        let command = command.clone();
        Box::pin(async move { run(&command, ctx).await })
    })
}

/// A built-in handler that sleeps `d` and succeeds with null: the cost of
/// fanjet itself when the work is a known, fixed time (benchmarks).
pub fn sleep_handler(d: std::time::Duration) -> Handler {
    Arc::new(move |_ctx: TaskContext| {
        Box::pin(async move {
            // A timer of 0 still waits for the runtime's next timer tick
            // (up to a millisecond): no work is no wait.
            if !d.is_zero() {
                tokio::time::sleep(d).await;
            }
            Ok(Value::Null)
        })
    })
}

/// What the command reads on stdin.
fn stdin_json(ctx: &TaskContext) -> Value {
    let t = &ctx.task;
    let mut v = json!({
        "job_id": t.job_id,
        "workflow": t.workflow,
        "step": t.step,
        "step_index": t.step_index,
        "handler": t.handler,
        "kind": t.kind,
        "attempt": ctx.attempt,
        "max_attempts": t.max_attempts,
    });
    if t.kind == "fanout" {
        v["index"] = json!(t.index);
        v["total"] = json!(t.total);
        v["item"] = t.item.clone();
    } else {
        v["input"] = t.input.clone();
    }
    v
}

async fn run(command: &str, ctx: TaskContext) -> Result<Value, TaskError> {
    let input = stdin_json(&ctx);
    let text = run_command(command, &ctx.task, ctx.attempt, ctx.task.index, input).await?;
    if text.is_empty() {
        return Ok(Value::Null);
    }
    Ok(serde_json::from_str(&text).unwrap_or_else(|_| Value::String(text.to_string())))
}

/// A batch handler that runs `command` through `sh -c` once per batch:
/// the batch on stdin (the fields of a single subjob's, with `indices` and
/// `items` instead of `index` and `item`), on stdout a JSON array with an
/// entry per item in the same order: `{"result": …}`, or `{"error": "…"}`
/// (retried alone) or `{"error": "…", "give_up": true}`. Exit codes apply
/// to the whole batch as to a single subjob.
pub fn exec_batch_handler(command: String) -> BatchHandler {
    let command = Arc::new(command);
    Arc::new(move |ctx: BatchContext| {
        let command = command.clone();
        Box::pin(async move { run_batch(&command, ctx).await })
    })
}

async fn run_batch(command: &str, ctx: BatchContext) -> BatchResults {
    let mut input = stdin_json(&TaskContext::new(ctx.task.clone(), ctx.attempt));
    if let Some(map) = input.as_object_mut() {
        map.remove("index");
        map.remove("item");
        map.insert("indices".into(), json!(ctx.indices));
        map.insert("items".into(), Value::Array(ctx.items.clone()));
    }
    let first = ctx.indices.first().copied().unwrap_or(ctx.task.index);
    let text = run_command(command, &ctx.task, ctx.attempt, first, input).await?;
    let entries: Vec<Value> = serde_json::from_str(&text).map_err(|e| {
        TaskError::retry(format!(
            "the command's output is not a JSON array of outcomes, one per item ({e})"
        ))
    })?;
    if entries.len() != ctx.items.len() {
        return Err(TaskError::retry(format!(
            "the command gave {} outcomes for {} items",
            entries.len(),
            ctx.items.len()
        )));
    }
    Ok(entries.into_iter().map(item_outcome).collect())
}

/// One entry of a batch command's output.
fn item_outcome(entry: Value) -> Result<Value, TaskError> {
    let Value::Object(mut map) = entry else {
        return Err(TaskError::retry(
            "an outcome is not an object like {\"result\": …} or {\"error\": \"…\"}",
        ));
    };
    if let Some(error) = map.get("error") {
        let text: String = match error {
            Value::String(s) => s.chars().take(MAX_ERROR).collect(),
            other => other.to_string().chars().take(MAX_ERROR).collect(),
        };
        return match map.get("give_up") {
            Some(Value::Bool(true)) => Err(TaskError::give_up(text)),
            _ => Err(TaskError::retry(text)),
        };
    }
    Ok(map.remove("result").unwrap_or(Value::Null))
}

/// Runs `command` with `input` on stdin; its trimmed stdout on exit 0.
async fn run_command(
    command: &str,
    task: &Task,
    attempt: u32,
    index: u64,
    input: Value,
) -> Result<String, TaskError> {
    let mut child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .env("FANJET_JOB_ID", &task.job_id)
        .env("FANJET_WORKFLOW", &task.workflow)
        .env("FANJET_STEP", &task.step)
        .env("FANJET_INDEX", index.to_string())
        .env("FANJET_ATTEMPT", attempt.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| TaskError::retry(format!("could not start `sh -c {command}`: {e}")))?;
    let input = serde_json::to_vec(&input).map_err(|e| TaskError::give_up(e.to_string()))?;
    if let Some(mut stdin) = child.stdin.take() {
        // A command that does not read its stdin is fine: ignore a broken pipe.
        let _ = stdin.write_all(&input).await;
        let _ = stdin.shutdown().await;
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(|e| TaskError::retry(format!("waiting for the command: {e}")))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let mut error: String = stderr.trim().chars().take(MAX_ERROR).collect();
    match out.status.code() {
        Some(0) => Ok(String::from_utf8_lossy(&out.stdout).trim().to_string()),
        Some(EXIT_GIVE_UP) => {
            if error.is_empty() {
                error = format!("command gave up (exit {EXIT_GIVE_UP})");
            }
            Err(TaskError::give_up(error))
        }
        code => {
            let how = code
                .map(|c| format!("exit {c}"))
                .unwrap_or_else(|| "killed by a signal".into());
            Err(TaskError::retry(if error.is_empty() {
                format!("command failed ({how})")
            } else {
                format!("{error} ({how})")
            }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(kind: &str) -> TaskContext {
        TaskContext::new(
            Task {
                run: 0,
                job_id: "j".into(),
                workflow: "w".into(),
                step: "s".into(),
                step_index: 1,
                handler: "s".into(),
                index: 4,
                total: 9,
                kind: kind.into(),
                item: json!({"n": 4}),
                indices: vec![],
                items: vec![],
                batch_size: None,
                input: json!(null),
                timeout_ms: 1000,
                run_timeout_ms: None,
                max_attempts: 3,
                backoff_ms: vec![],
                token: String::new(),
            },
            2,
        )
    }

    #[tokio::test]
    async fn exit_codes_map_to_outcomes() {
        let ok = run("cat", ctx("fanout")).await.unwrap();
        assert_eq!(ok["item"]["n"], 4);
        assert_eq!(ok["attempt"], 2);
        assert_eq!(ok["index"], 4);
        assert_eq!(
            run("echo hello", ctx("fanout")).await.unwrap(),
            json!("hello")
        );
        assert_eq!(run("true", ctx("task")).await.unwrap(), Value::Null);
        assert_eq!(
            run(
                "echo $FANJET_STEP-$FANJET_INDEX-$FANJET_ATTEMPT",
                ctx("fanout")
            )
            .await
            .unwrap(),
            json!("s-4-2")
        );
        assert_eq!(
            run("echo nope >&2; exit 100", ctx("fanout"))
                .await
                .unwrap_err(),
            TaskError::give_up("nope")
        );
        match run("echo flaky >&2; exit 3", ctx("fanout"))
            .await
            .unwrap_err()
        {
            TaskError::Retry { message, .. } => assert_eq!(message, "flaky (exit 3)"),
            other => panic!("{other:?}"),
        }
    }
}

#[cfg(test)]
mod batch_tests {
    use super::*;

    fn batch(items: Vec<Value>) -> BatchContext {
        let n = items.len() as u64;
        BatchContext::new(
            Task {
                run: 0,
                job_id: "j".into(),
                workflow: "w".into(),
                step: "s".into(),
                step_index: 1,
                handler: "s".into(),
                index: 10,
                total: 20,
                kind: "fanout".into(),
                item: Value::Null,
                indices: (10..10 + n).collect(),
                items,
                batch_size: Some(10),
                input: Value::Null,
                timeout_ms: 1000,
                run_timeout_ms: None,
                max_attempts: 3,
                backoff_ms: vec![],
                token: String::new(),
            },
            1,
        )
    }

    #[tokio::test]
    async fn a_batch_command_reads_the_items_and_gives_an_outcome_per_item() {
        let ctx = batch(vec![json!({"n": 1}), json!({"n": 2}), json!({"n": 3})]);
        let command = r#"in=$(cat); echo "$in" | grep -q '"items":\[{"n":1},{"n":2},{"n":3}\]' && echo "$in" | grep -q '"indices":\[10,11,12\]' && echo '[{"result": 1}, {"error": "later"}, {"error": "never", "give_up": true}]'"#;
        let results = run_batch(command, ctx.clone()).await.unwrap();
        assert_eq!(
            results,
            vec![
                Ok(json!(1)),
                Err(TaskError::retry("later")),
                Err(TaskError::give_up("never"))
            ]
        );
        // The whole batch: a wrong count, output that is no array, an exit code.
        for (command, retry) in [
            ("echo '[{\"result\": 1}]'", true),
            ("echo 7", true),
            ("exit 100", false),
            ("exit 2", true),
        ] {
            match run_batch(command, ctx.clone()).await {
                Err(TaskError::Retry { .. }) if retry => {}
                Err(TaskError::GiveUp { .. }) if !retry => {}
                other => panic!("{command}: {other:?}"),
            }
        }
    }
}

#[cfg(test)]
mod sleep_tests {
    use super::*;
    use futures::FutureExt;

    /// `--sleep 0ms` is no work: its handler is done at the first poll,
    /// not after the runtime's next timer tick (ten ticks for a batch of ten
    /// run one after the other held batches at a third of their speed).
    #[tokio::test]
    async fn a_zero_sleep_does_not_wait_for_a_timer() {
        let handler = sleep_handler(std::time::Duration::ZERO);
        let task: Task = serde_json::from_value(json!({
            "job_id": "j", "workflow": "w", "step": "s", "step_index": 0,
            "handler": "s", "index": 0, "total": 1, "kind": "fanout",
            "timeout_ms": 1000, "max_attempts": 1
        }))
        .unwrap();
        let done = handler(TaskContext::new(task, 1)).now_or_never();
        assert_eq!(done, Some(Ok(Value::Null)));
    }
}
