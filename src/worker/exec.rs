//! The `--exec` handler: runs a shell command per task, the task as JSON on
//! stdin, the result as JSON on stdout. Exit 0 is success, [`EXIT_GIVE_UP`]
//! fails the subjob at once, any other exit asks for a retry with stderr as
//! the error. The same facts are in the environment (`FANJET_JOB_ID`,
//! `FANJET_WORKFLOW`, `FANJET_STEP`, `FANJET_INDEX`, `FANJET_ATTEMPT`) for
//! commands that do not parse JSON.

use std::process::Stdio;
use std::sync::Arc;

use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

use super::{Handler, TaskContext, TaskError};

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
            tokio::time::sleep(d).await;
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
    let mut child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .env("FANJET_JOB_ID", &ctx.task.job_id)
        .env("FANJET_WORKFLOW", &ctx.task.workflow)
        .env("FANJET_STEP", &ctx.task.step)
        .env("FANJET_INDEX", ctx.task.index.to_string())
        .env("FANJET_ATTEMPT", ctx.attempt.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| TaskError::retry(format!("could not start `sh -c {command}`: {e}")))?;
    let input =
        serde_json::to_vec(&stdin_json(&ctx)).map_err(|e| TaskError::give_up(e.to_string()))?;
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
        Some(0) => {
            let text = String::from_utf8_lossy(&out.stdout);
            let text = text.trim();
            if text.is_empty() {
                return Ok(Value::Null);
            }
            Ok(serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_string())))
        }
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
    use crate::protocol::Task;

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
