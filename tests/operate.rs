//! Operating running jobs from the CLI, as a user would: pause, resume,
//! change the window and the tolerated failures.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{cli, Env};
use fanjet::protocol::JobState;
use fanjet::worker::{TaskContext, TaskError, Worker};
use serde_json::{json, Value};

/// Workflow `op` (one fanout), a worker of 4 slots whose handler takes
/// 50 ms, fails the items that are `"bad"` for good, and counts starts.
async fn setup() -> (Env, Arc<AtomicU64>) {
    let mut env = Env::start().await;
    env.apply(
        "name = \"op\"\n[[steps]]\nname = \"work\"\nkind = \"fanout\"\ntolerate_failures = \"5\"\n",
    )
    .await;
    let starts = Arc::new(AtomicU64::new(0));
    let counted = starts.clone();
    env.worker(Worker::new(env.nats.clone()).concurrency(4).handler(
        "op",
        "work",
        move |c: TaskContext| {
            let counted = counted.clone();
            async move {
                counted.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(50)).await;
                match c.task.item {
                    Value::String(s) if s == "bad" => Err(TaskError::give_up("bad item")),
                    _ => Ok(Value::Null),
                }
            }
        },
    ));
    env.manager();
    (env, starts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_job_starts_nothing_until_resumed() {
    let (env, starts) = setup().await;
    let items: Vec<Value> = (0..120).map(|i| json!(i)).collect();
    assert!(
        env.submit("op", json!({"job_id": "p-1", "input": items}))
            .await
            .ok
    );
    env.wait_for("p-1", Duration::from_secs(30), "10 done", |j| {
        j.steps[0].completed >= 10
    })
    .await;
    let (ok, out) = cli(&env, &["pause", "p-1", "--reason", "maintenance"]);
    assert!(ok && out.contains("pause requested"), "{out}");
    // What was dispatched finishes; then nothing starts.
    let job = env
        .wait_for(
            "p-1",
            Duration::from_secs(30),
            "paused, nothing in flight",
            |j| {
                j.paused_at.is_some()
                    && j.steps[0].dispatched == j.steps[0].completed + j.steps[0].failed
            },
        )
        .await;
    let before = starts.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        starts.load(Ordering::SeqCst),
        before,
        "a subjob started while paused"
    );
    assert!(job.steps[0].completed < 120);
    let (ok, out) = cli(&env, &["status", "p-1"]);
    assert!(ok && out.contains("state paused"), "{out}");
    let (ok, out) = cli(&env, &["jobs"]);
    assert!(ok && out.contains("paused"), "{out}");
    let (ok, out) = cli(&env, &["resume", "p-1"]);
    assert!(ok && out.contains("resume requested"), "{out}");
    let job = env.wait_end("p-1", Duration::from_secs(60)).await;
    assert_eq!(job.state, JobState::Completed);
    assert_eq!((job.steps[0].completed, job.steps[0].failed), (120, 0));
    assert_eq!(job.paused_at, None);
    // Ended, it cannot be paused; the error says why.
    let (ok, out) = cli(&env, &["pause", "p-1"]);
    assert!(!ok && out.contains("completed"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_jobs_window_and_tolerance_are_changed_from_the_cli() {
    let (env, _) = setup().await;
    let mut items: Vec<Value> = (0..200).map(|i| json!(i)).collect();
    for i in [150, 160, 170] {
        items[i] = json!("bad");
    }
    assert!(
        env.submit("op", json!({"job_id": "w-1", "input": items}))
            .await
            .ok
    );
    env.wait_for("w-1", Duration::from_secs(30), "running", |j| {
        j.steps[0].completed >= 4
    })
    .await;
    let (ok, out) = cli(&env, &["update", "w-1"]);
    assert!(!ok && out.contains("nothing to change"), "{out}");
    let (ok, out) = cli(&env, &["update", "w-1", "--max-in-flight", "2"]);
    assert!(ok, "{out}");
    let job = env
        .wait_for("w-1", Duration::from_secs(30), "the new window", |j| {
            j.definition.steps[0].max_in_flight == 2
        })
        .await;
    assert!(job.steps[0].completed < 200);
    // Once what was dispatched before drains, at most 2 are ever in flight.
    env.wait_for("w-1", Duration::from_secs(30), "2 in flight", |j| {
        j.steps[0].dispatched - j.steps[0].completed - j.steps[0].failed <= 2
    })
    .await;
    let (ok, out) = cli(&env, &["update", "w-1", "--tolerate-failures", "1"]);
    assert!(ok, "{out}");
    // The third bad item is one failure more than now tolerated.
    let job = env.wait_end("w-1", Duration::from_secs(60)).await;
    assert_eq!(job.state, JobState::Failed, "{:?}", job.error);
    assert_eq!(job.steps[0].failed, 2);
    assert!(
        job.error
            .as_deref()
            .unwrap_or("")
            .contains("more than tolerated (1)"),
        "{:?}",
        job.error
    );
    // Every change is in the log.
    let kinds: Vec<String> = env
        .events("w-1")
        .await
        .iter()
        .map(|e| e["type"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(
        kinds.iter().filter(|k| *k == "UpdateRequested").count(),
        2,
        "{kinds:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_steps_results_are_read_once_each_from_the_cli_and_the_api() {
    let (mut env, _) = setup().await;
    let mut items: Vec<Value> = (0..60).map(|i| json!(i)).collect();
    items[7] = json!("bad");
    items[42] = json!("bad");
    assert!(
        env.submit("op", json!({"job_id": "r-1", "input": items}))
            .await
            .ok
    );
    let job = env.wait_end("r-1", Duration::from_secs(60)).await;
    assert_eq!((job.steps[0].completed, job.steps[0].failed), (58, 2));

    let (ok, out) = cli(&env, &["results", "r-1"]);
    assert!(ok, "{out}");
    let lines: Vec<Value> = out
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let mut indices: Vec<u64> = lines.iter().map(|l| l["index"].as_u64().unwrap()).collect();
    indices.sort();
    assert_eq!(indices, (0..60).collect::<Vec<u64>>(), "each subjob once");
    let failed: Vec<&Value> = lines.iter().filter(|l| l["ok"] == json!(false)).collect();
    assert_eq!(failed.len(), 2);
    assert_eq!(failed[0]["error"], "bad item");
    let (ok, out) = cli(&env, &["results", "r-1", "--step", "work", "--failed"]);
    assert!(ok, "{out}");
    assert_eq!(
        out.lines().filter(|l| l.starts_with('{')).count(),
        2,
        "{out}"
    );
    let (ok, out) = cli(&env, &["results", "r-1", "--step", "nope"]);
    assert!(!ok && out.contains("no step"), "{out}");

    let (base, _stop) = env.serve(Default::default()).await;
    let body = reqwest::get(format!("{base}/api/jobs/r-1/steps/0/results"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(body.lines().count(), 60, "{body}");
    let body = reqwest::get(format!("{base}/api/jobs/r-1/steps/0/results?failed=true"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(body.lines().count(), 2, "{body}");
    let status = reqwest::get(format!("{base}/api/jobs/r-1/steps/5/results"))
        .await
        .unwrap()
        .status();
    assert_eq!(status.as_u16(), 404);
}
