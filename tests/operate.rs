//! Operating running jobs from the CLI, as a user would: pause, resume,
//! change the window and the tolerated failures.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{cli, Env};
use fanjet::protocol::JobState;
use fanjet::worker::{TaskContext, TaskError, Worker};
use futures::StreamExt;
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

/// The lines `fanjet ARGS` prints, checked to hold subjobs 0..total once each.
fn results_once_each(env: &Env, args: &[&str], total: u64) -> Vec<Value> {
    let (ok, out) = cli(env, args);
    assert!(ok, "{out}");
    let lines: Vec<Value> = out
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let mut indices: Vec<u64> = lines.iter().map(|l| l["index"].as_u64().unwrap()).collect();
    indices.sort();
    assert_eq!(
        indices,
        (0..total).collect::<Vec<u64>>(),
        "each subjob once"
    );
    lines
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

    let lines = results_once_each(&env, &["results", "r-1"], 60);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_job_is_redriven_for_the_subjobs_that_did_not_complete() {
    let mut env = Env::start().await;
    env.apply(
        "name = \"rd\"\n[[steps]]\nname = \"send\"\nkind = \"fanout\"\nmax_in_flight = 8\n\
         [[steps]]\nname = \"sum\"\nkind = \"task\"\nmax_attempts = 10\nbackoff = [\"300ms\"]\n",
    )
    .await;
    // Items 9, 19, … fail for good until the mail server is "fixed";
    // each call is noted with its run and attempt.
    let fixed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let calls = Arc::new(std::sync::Mutex::new(Vec::<(u32, u64, u32)>::new()));
    let (f, noted) = (fixed.clone(), calls.clone());
    env.worker(
        Worker::new(env.nats.clone())
            .concurrency(4)
            .handler("rd", "send", move |c: TaskContext| {
                let (f, noted) = (f.clone(), noted.clone());
                async move {
                    noted
                        .lock()
                        .unwrap()
                        .push((c.task.run, c.task.index, c.attempt));
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    match c.task.index % 10 == 9 && !f.load(Ordering::SeqCst) {
                        true => Err(TaskError::give_up("mail server down")),
                        false => Ok(json!(format!("sent {}", c.task.index))),
                    }
                }
            })
            .handler("rd", "sum", |c: TaskContext| async move {
                Ok(c.task.input["completed"].clone())
            }),
    );
    env.manager();
    let (base, _stop) = env.serve(Default::default()).await;
    let items: Vec<Value> = (0..60).map(|i| json!(i)).collect();
    assert!(
        env.submit("rd", json!({"job_id": "rd-1", "input": items}))
            .await
            .ok
    );
    let first = env.wait_end("rd-1", Duration::from_secs(60)).await;
    assert_eq!(first.state, JobState::Failed, "no failure is tolerated");
    let unfinished = 60 - first.steps[0].completed;
    assert!(first.steps[0].completed > 0 && unfinished > 0, "{first:?}");

    // A running or completed-without-failures job cannot be redriven; nor a
    // cancelled one. Each refusal says why.
    let (ok, out) = cli(&env, &["redrive", "rd-1", "--step", "nope"]);
    assert!(!ok && out.contains("no step \"nope\""), "{out}");
    let (ok, out) = cli(&env, &["redrive", "rd-1", "--step", "sum"]);
    assert!(!ok && out.contains("never ran"), "{out}");

    fixed.store(true, Ordering::SeqCst);
    let mut notes = env
        .nats
        .client
        .subscribe("fanjet.notify.rd.rd-1.>")
        .await
        .unwrap();
    let (ok, out) = cli(
        &env,
        &["redrive", "rd-1", "--reason", "mail server back", "--wait"],
    );
    assert!(ok, "followed to its end, completed: {out}");
    assert!(
        out.contains(&format!(
            "run 1 started: step \"send\" runs again for {unfinished} subjobs"
        )),
        "{out}"
    );
    assert!(out.contains("state completed"), "{out}");
    let job = env.wait_end("rd-1", Duration::from_secs(60)).await;
    assert_eq!(job.state, JobState::Completed, "{:?}", job.error);
    assert_eq!((job.run, job.error.as_deref()), (1, None));
    assert_eq!((job.steps[0].completed, job.steps[0].failed), (60, 0));
    assert_eq!(job.output, json!(60), "the summary step ran again");
    // Notifications say so: the redrive, then the steps and the job's end
    // of the new run.
    let mut kinds = Vec::new();
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(5), notes.next()).await {
        let kind = m.subject.rsplit('.').next().unwrap_or_default().to_string();
        let done = kind == "completed";
        kinds.push(kind);
        if done {
            break;
        }
    }
    assert_eq!(
        kinds,
        [
            "redriven",
            "step_started",
            "step_completed",
            "step_started",
            "step_completed",
            "completed"
        ]
    );
    // The first run's figures stay visible.
    let r = &job.redrives[0];
    assert_eq!(
        (r.run, r.state, r.subjobs),
        (1, JobState::Failed, unfinished)
    );
    assert_eq!(r.steps[0].completed, first.steps[0].completed);
    assert_eq!(r.steps[0].failed, first.steps[0].failed);
    assert_eq!(r.reason.as_deref(), Some("mail server back"));
    assert!(r.error.as_deref().unwrap().contains("mail server down"));
    // Only those subjobs ran again, each once, attempts counted afresh.
    let again: Vec<(u32, u64, u32)> = calls
        .lock()
        .unwrap()
        .iter()
        .copied()
        .filter(|c| c.0 == 1)
        .collect();
    let mut indices: Vec<u64> = again.iter().map(|c| c.1).collect();
    indices.sort();
    indices.dedup();
    assert_eq!(indices.len() as u64, unfinished, "{again:?}");
    assert!(
        again.iter().all(|c| c.2 == 1),
        "attempts start over: {again:?}"
    );

    // Results: each subjob once, from the run that decided it; statistics
    // agree with the record; the status shows the redrive.
    let lines = results_once_each(&env, &["results", "rd-1", "--step", "send"], 60);
    assert!(lines.iter().all(|l| l["ok"] == json!(true)), "{lines:?}");
    let stats = env
        .wait_stats("rd-1", Duration::from_secs(20), |s| {
            s.run == 1 && s.outcome.as_deref() == Some("completed")
        })
        .await;
    assert_eq!((stats.steps[0].completed, stats.steps[0].failed), (60, 0));
    let (ok, out) = cli(&env, &["status", "rd-1"]);
    assert!(
        ok && out.contains("run 1 (redrive: mail server back)"),
        "{out}"
    );

    // Nothing more to redrive: said by the CLI and the API.
    let (ok, out) = cli(&env, &["redrive", "rd-1"]);
    assert!(!ok && out.contains("nothing to redrive"), "{out}");
    let answer = reqwest::Client::new()
        .post(format!("{base}/api/jobs/rd-1/redrive"))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status().as_u16(), 409);
    let body: Value = answer.json().await.unwrap();
    assert_eq!(body["error"]["code"], "nothing_to_redrive", "{body}");

    // A cancelled job is refused.
    assert!(
        env.submit(
            "rd",
            json!({"job_id": "rd-2", "input": (0..400).collect::<Vec<u32>>()})
        )
        .await
        .ok
    );
    let (ok, out) = cli(&env, &["cancel", "rd-2"]);
    assert!(ok, "{out}");
    env.wait_end("rd-2", Duration::from_secs(30)).await;
    let (ok, out) = cli(&env, &["redrive", "rd-2"]);
    assert!(!ok && out.contains("was cancelled"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_step_after_a_fanout_reads_its_results_page_by_page() {
    let mut env = Env::start().await;
    env.apply(
        "name = \"pg\"\n[[steps]]\nname = \"make\"\nkind = \"fanout\"\n\
         [[steps]]\nname = \"count\"\nkind = \"task\"\n",
    )
    .await;
    env.worker(
        Worker::new(env.nats.clone())
            .concurrency(8)
            .handler("pg", "make", |c: TaskContext| async move {
                // 2 KB each: 400 of them do not fit one message.
                Ok(json!(format!("{:0>2000}", c.task.index)))
            })
            .handler("pg", "count", |c: TaskContext| async move {
                let mut results = c.results(c.task.step_index - 1);
                let (mut pages, mut seen) = (0, std::collections::BTreeSet::new());
                while let Some(page) = results.next_page().await? {
                    pages += 1;
                    for line in page {
                        let index = line["index"].as_u64().unwrap_or(u64::MAX);
                        let padded = format!("{index:0>2000}");
                        if line["ok"] == json!(true) && line["result"] == json!(padded) {
                            seen.insert(index);
                        }
                    }
                }
                Ok(json!({"pages": pages, "distinct": seen.len()}))
            }),
    );
    env.manager();
    let items: Vec<u32> = (0..400).collect();
    assert!(
        env.submit("pg", json!({"job_id": "pg-1", "input": items}))
            .await
            .ok
    );
    let job = env.wait_end("pg-1", Duration::from_secs(60)).await;
    assert_eq!(job.state, JobState::Completed, "{:?}", job.error);
    assert_eq!(job.output["distinct"], 400, "{}", job.output);
    assert!(
        job.output["pages"].as_u64().unwrap() >= 2,
        "more than one page: {}",
        job.output
    );
    // A handler test without a connection is told so.
    let alone = TaskContext::new(
        fanjet::protocol::Task {
            token: String::new(),
            ..serde_json::from_value(json!({"job_id": "x", "workflow": "pg", "step": "count",
            "step_index": 1, "handler": "count", "index": 0, "total": 1, "kind": "task",
            "timeout_ms": 1000, "max_attempts": 1}))
            .unwrap()
        },
        1,
    );
    let e = alone.results(0).next_page().await.unwrap_err();
    assert!(e.to_string().contains("no connection"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_are_read_even_before_the_jobs_first_checkpoint() {
    let mut env = Env::start().await;
    env.apply(
        "name = \"early\"\n[[steps]]\nname = \"make\"\nkind = \"fanout\"\n\
         [[steps]]\nname = \"count\"\nkind = \"task\"\n",
    )
    .await;
    env.worker(
        Worker::new(env.nats.clone())
            .concurrency(4)
            .handler("early", "make", |c: TaskContext| async move {
                Ok(json!(c.task.index))
            })
            .handler("early", "count", |c: TaskContext| async move {
                let lines = c.results(c.task.step_index - 1).all().await?;
                Ok(json!(lines.len()))
            }),
    );
    // The job is done before its record is first stored.
    env.manager_with(fanjet::manager::ManagerOptions {
        checkpoint_every: Duration::from_millis(1500),
        ..Default::default()
    });
    assert!(
        env.submit("early", json!({"job_id": "e-1", "input": [1, 2, 3]}))
            .await
            .ok
    );
    let job = env.wait_end("e-1", Duration::from_secs(30)).await;
    assert_eq!(job.state, JobState::Completed, "{:?}", job.error);
    assert_eq!(job.output, json!(3));
}

/// A batched fanout redriven: only the subjobs that did not complete run
/// again, in tasks that each hold subjobs of one block, and the results
/// of both runs read as one step's, also when the next step asks before
/// the redriven run's record is stored (it is told to ask again). A batch
/// handler reads an earlier step's results with its batch's token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batched_fanout_is_redriven_for_the_subjobs_that_did_not_complete() {
    use fanjet::worker::BatchContext;
    let mut env = Env::start().await;
    env.apply(
        "name = \"rdb\"\n[[steps]]\nname = \"make\"\nkind = \"task\"\n\
         [[steps]]\nname = \"send\"\nkind = \"fanout\"\nbatch_size = 5\nmax_in_flight = 10\n\
         [[steps]]\nname = \"sum\"\nkind = \"task\"\nmax_attempts = 10\nbackoff = [\"300ms\"]\n",
    )
    .await;
    let fixed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let calls = Arc::new(std::sync::Mutex::new(Vec::<(u32, Vec<u64>)>::new()));
    let (f, noted) = (fixed.clone(), calls.clone());
    env.worker(
        Worker::new(env.nats.clone())
            .concurrency(4)
            .handler("rdb", "make", |c: TaskContext| async move {
                let n = c.task.input["count"].as_u64().unwrap_or(0);
                Ok(json!((0..n).collect::<Vec<u64>>()))
            })
            .batch_handler("rdb", "send", move |c: BatchContext| {
                let (f, noted) = (f.clone(), noted.clone());
                async move {
                    // The batch's token opens the job's results.
                    let made = c.results(0).all().await?;
                    if made.len() != 1 {
                        return Err(TaskError::give_up(format!("read {made:?}")));
                    }
                    noted.lock().unwrap().push((c.task.run, c.indices.clone()));
                    Ok(c.indices
                        .iter()
                        .map(|&i| match i % 10 == 9 && !f.load(Ordering::SeqCst) {
                            true => Err(TaskError::give_up("mail server down")),
                            false => Ok(json!(i)),
                        })
                        .collect())
                }
            })
            .handler("rdb", "sum", |c: TaskContext| async move {
                let lines = c.results(1).all().await?;
                let ok: Vec<u64> = lines
                    .iter()
                    .filter(|l| l["ok"] == json!(true))
                    .filter_map(|l| l["result"].as_u64())
                    .collect();
                Ok(json!({"ok": ok.len(), "sum": ok.iter().sum::<u64>()}))
            }),
    );
    // Records stored every 2 s: the next step reads the results before the
    // redriven run's record is stored, and is told to ask again.
    env.manager_with(fanjet::manager::ManagerOptions {
        checkpoint_every: Duration::from_secs(2),
        ..Default::default()
    });
    assert!(
        env.submit("rdb", json!({"job_id": "rdb-1", "input": {"count": 30}}))
            .await
            .ok
    );
    let first = env.wait_end("rdb-1", Duration::from_secs(60)).await;
    assert_eq!(first.state, JobState::Failed, "no failure is tolerated");
    assert!(
        first
            .error
            .as_deref()
            .unwrap_or("")
            .contains("mail server down"),
        "{:?}",
        first.error
    );
    let done_first = first.steps[1].completed;
    assert!(done_first > 0 && done_first < 30, "{first:?}");

    fixed.store(true, Ordering::SeqCst);
    let (ok, out) = cli(&env, &["redrive", "rdb-1"]);
    assert!(ok, "{out}");
    let job = env
        .wait_for(
            "rdb-1",
            Duration::from_secs(60),
            "the redriven run's end",
            |j| j.run == 1 && j.state.is_terminal(),
        )
        .await;
    assert_eq!(job.state, JobState::Completed, "{:?}", job.error);
    assert_eq!((job.steps[1].completed, job.steps[1].failed), (30, 0));
    // The results of both runs, each subjob once.
    assert_eq!(job.output, json!({"ok": 30, "sum": 435}));
    let calls = calls.lock().unwrap().clone();
    let again: Vec<u64> = calls
        .iter()
        .filter(|(run, _)| *run == 1)
        .flat_map(|(_, i)| i.clone())
        .collect();
    assert_eq!(
        again.len() as u64,
        30 - done_first,
        "only what did not complete ran again: {calls:?}"
    );
    assert!(
        calls
            .iter()
            .all(|(_, i)| i.iter().all(|x| x / 5 == i[0] / 5)),
        "every task within one block: {calls:?}"
    );
}
