//! Any language: the Python worker in `examples/python-worker` (nats-py,
//! nothing from fanjet) serves a fanout step side by side with a Rust worker
//! on a real nats-server, and a job is submitted and followed from Python.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::Env;
use fanjet::protocol::JobState;
use fanjet::worker::{TaskContext, Worker};
use serde_json::{json, Value};

fn python() -> (PathBuf, PathBuf) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let deps = root.join(".tools/python");
    // From the deps folder: the repository's own nats/ folder must not pass for the package.
    let ok = deps.is_dir()
        && Command::new("python3")
            .args(["-c", "import nats.aio.client"])
            .current_dir(&deps)
            .env("PYTHONPATH", &deps)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
    assert!(ok, "this test needs python3 with nats-py: run `just python-deps` (scripts/install-tools.sh python-deps)");
    (root.join("examples/python-worker"), deps)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_worker_shares_a_fanout_step_with_a_rust_worker() {
    let (dir, deps) = python();
    let mut env = Env::start().await;
    env.apply(
        "name = \"squares\"\n[[steps]]\nname = \"square\"\nkind = \"fanout\"\ntimeout = \"10s\"\nmax_attempts = 3\nbackoff = [\"100ms\"]\n[[steps]]\nname = \"report\"\nkind = \"task\"\n",
    )
    .await;
    env.manager();
    env.worker(
        Worker::new(env.nats.clone())
            .concurrency(2)
            .handler("squares", "square", |c: TaskContext| async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                let n = c.task.item.as_i64().unwrap_or(0);
                Ok(json!({"square": n * n, "by": "rust"}))
            })
            .handler("squares", "report", |c: TaskContext| async move {
                Ok(c.task.input)
            }),
    );
    let url = env.url();
    let py = move |script: &str| {
        let mut c = Command::new("python3");
        c.arg(dir.join(script))
            .env("PYTHONPATH", &deps)
            .env("NATS_URL", &url);
        c
    };
    let mut worker = py("worker.py")
        .args([
            "--workflow",
            "squares",
            "--step",
            "square",
            "--concurrency",
            "4",
        ])
        .stdout(Stdio::null())
        .spawn()
        .expect("start the python worker");

    let input = serde_json::to_string(&(0..300).collect::<Vec<i64>>()).unwrap();
    let submit = py("submit.py");
    let out = tokio::task::spawn_blocking(move || {
        let mut submit = submit;
        submit
            .args(["squares", &input, "--job-id", "py-job-1"])
            .output()
    })
    .await
    .unwrap()
    .expect("run submit.py");
    let _ = worker.kill();
    let _ = worker.wait();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "submit.py failed: {stderr}");
    assert!(
        stderr.contains("step_started: square (300 subjobs)"),
        "followed live from Python: {stderr}"
    );
    let status: Value =
        serde_json::from_slice(&out.stdout).expect("submit.py prints the final status");
    assert_eq!(status["state"], "completed");
    assert_eq!(status["steps"][0]["completed"], 300);

    let job = env.wait_end("py-job-1", Duration::from_secs(10)).await;
    assert_eq!(job.state, JobState::Completed);
    let events = common::completions(&env.events("py-job-1").await);
    let done: Vec<&Value> = events.iter().filter(|e| e["step_index"] == 0).collect();
    assert_eq!(done.len(), 300);
    let by_python = done
        .iter()
        .filter(|e| e["result"]["by"] == "python")
        .count();
    let by_rust = done.iter().filter(|e| e["result"]["by"] == "rust").count();
    assert!(
        by_python > 0 && by_rust > 0,
        "both workers took part: python {by_python}, rust {by_rust}"
    );
    assert!(done
        .iter()
        .all(|e| e["result"]["square"].as_i64() == e["index"].as_i64().map(|i| i * i)));
    // Python's retries (every 13th item it took failed once) were counted.
    let retried = done
        .iter()
        .filter(|e| e["attempt"].as_u64() == Some(2) && e["result"]["by"].is_string())
        .count();
    assert_eq!(job.steps[0].retries as usize, retried);

    // A batched step served by Python alone, from PROTOCOL.md's "Batches":
    // items together, a failing one retried alone, one SubjobsDone each.
    env.apply(
        "name = \"squaresb\"\n[[steps]]\nname = \"square\"\nkind = \"fanout\"\ntimeout = \"10s\"\nmax_attempts = 3\nbackoff = [\"100ms\"]\nbatch_size = 5\n",
    )
    .await;
    let mut batcher = py("worker.py")
        .args(["--workflow", "squaresb", "--step", "square"])
        .stdout(Stdio::null())
        .spawn()
        .expect("start the python worker");
    let items: Vec<i64> = (0..60).collect();
    let reply = env
        .submit("squaresb", json!({"job_id": "py-batch-1", "input": items}))
        .await;
    assert!(reply.ok, "{reply:?}");
    let job = env.wait_end("py-batch-1", Duration::from_secs(60)).await;
    let _ = batcher.kill();
    let _ = batcher.wait();
    assert_eq!(job.state, JobState::Completed, "{:?}", job.error);
    // Items 0, 13, 26, 39, 52 failed once and were retried alone.
    assert_eq!(
        (
            job.steps[0].completed,
            job.steps[0].failed,
            job.steps[0].retries
        ),
        (60, 0, 5)
    );
    let events = env.events("py-batch-1").await;
    let outcomes: Vec<&Value> = events
        .iter()
        .filter(|e| e["type"] == "SubjobsDone")
        .flat_map(|e| e["outcomes"].as_array().unwrap().iter())
        .collect();
    assert_eq!(outcomes.len(), 60);
    assert!(outcomes.iter().all(|o| o["result"]["by"] == "python"
        && o["result"]["square"].as_i64() == o["index"].as_i64().map(|i| i * i)));
}
