//! Capacity for the deadline: from observed subjob durations and the
//! backlog, fanjet predicts when a running fanout step ends and how many
//! worker slots its job's deadline needs. Checked here against a run whose
//! subjob duration is known (100 ms on 4 slots: 40 subjobs/s).

mod common;

use std::time::{Duration, Instant};

use common::Env;
use fanjet::observe::notify::Webhooks;
use fanjet::worker::{TaskContext, Worker};
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_prediction_matches_a_run_of_known_duration() {
    let mut env = Env::start().await;
    // 200 subjobs of 100 ms on 4 slots take 5 s; the deadline gives 4 s.
    env.apply("name = \"cap\"\ndeadline = \"4s\"\n[[steps]]\nname = \"send\"\nkind = \"fanout\"\n")
        .await;
    env.manager();
    let (base, _stop) = env.serve(Webhooks::default()).await;
    env.worker(Worker::new(env.nats.clone()).concurrency(4).handler(
        "cap",
        "send",
        |_c: TaskContext| async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            Ok(json!(null))
        },
    ));
    assert!(
        env.submit(
            "cap",
            json!({"job_id": "cap-1", "input": (0..200).collect::<Vec<_>>()})
        )
        .await
        .ok
    );

    // A third of the way in, ask.
    let start = Instant::now();
    let (capacity, done_then) = loop {
        let job: Value = reqwest::get(format!("{base}/api/jobs/cap-1"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let step = &job["steps"][0];
        let done = step["completed"].as_u64().unwrap_or(0);
        if done >= 60 && step["capacity"]["slots_needed"].is_u64() {
            break (step["capacity"].clone(), done);
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no capacity figures: {job}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let status = common::fanjet_command(&env.url(), &["status", "cap-1"])
        .stdout(std::process::Stdio::piped())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        text.contains("capacity send: ends in") && text.contains("worker slots to meet it"),
        "fanjet status shows it: {text}"
    );
    let metrics = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let gauge = metrics
        .lines()
        .find(|l| l.starts_with("fanjet_step_slots_needed{") && l.contains("workflow=\"cap\""))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);

    let job = env.wait_end("cap-1", Duration::from_secs(30)).await;
    let step = &job.steps[0];
    let (started, finished) = (step.started_at.unwrap(), step.finished_at.unwrap());
    let predicted = capacity["predicted_finish_at"].as_u64().unwrap();
    let error = (predicted as f64 - finished as f64).abs() / (finished - started) as f64;
    assert!(error < 0.25, "predicted the end within 25% of the step's duration: predicted {predicted}, actual {finished}, off by {:.0}%", error * 100.0);
    let mean = capacity["mean_subjob_ms"].as_u64().unwrap();
    assert!(
        (100..=150).contains(&mean),
        "mean subjob {mean} ms for 100 ms handlers"
    );
    // Work left / time left: (200 - done) x 100 ms over the ~4 s deadline's rest: more than the 4 slots there are.
    let slots = capacity["slots_needed"].as_u64().unwrap();
    assert!(
        slots > 4,
        "the deadline needs more than the 4 slots: {slots} (asked at {done_then} done)"
    );
    assert!(slots <= 200, "{slots}");
    assert!(gauge >= 1.0, "the autoscaler gauge says so too: {gauge}");
    assert_eq!(capacity["deadline_at"].as_u64(), job.deadline_at);
    assert!(
        finished > job.deadline_at.unwrap(),
        "and indeed the job missed its deadline"
    );
}
