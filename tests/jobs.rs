//! End-to-end jobs on a real nats-server: the happy path at 1,000 subjobs
//! submitted by a plain NATS request, retries, failure policies, duplicates
//! and late completions, cancel, bad submissions, a silent member of the
//! intake's queue group, and isolation of concurrent jobs.

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{seed_workflow, Env};
use fanjet::protocol::{encode_json, Event, RejectCode, SubjobCompleted};
use fanjet::protocol::{JobState, StepState};
use fanjet::worker::{TaskContext, TaskError, Worker};
use serde_json::{json, Value};

/// Workers for the seed shape: collect lists `input.count` items, send
/// returns the item doubled, summarize echoes its input.
fn seed_worker(
    env: &Env,
    wf: &str,
    send: impl Fn(TaskContext) -> Result<Value, TaskError> + Send + Sync + 'static,
) -> Worker {
    let send = Arc::new(send);
    Worker::new(env.nats.clone())
        .concurrency(64)
        .handler(wf, "collect", |ctx: TaskContext| async move {
            let n = ctx.task.input["count"].as_u64().unwrap_or(0);
            Ok(Value::Array((0..n).map(|i| json!(i)).collect()))
        })
        .handler(wf, "send", move |ctx: TaskContext| {
            let send = send.clone();
            async move { send(ctx) }
        })
        .handler(wf, "summarize", |ctx: TaskContext| async move {
            Ok(ctx.task.input)
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_subjobs_from_a_plain_nats_request_complete_with_exact_counts() {
    let mut env = Env::start().await;
    env.apply(&seed_workflow("invoices", "")).await;
    env.manager();
    let seen = Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
    let s = seen.clone();
    let w = seed_worker(&env, "invoices", move |ctx| {
        s.lock().unwrap().insert(ctx.task.index);
        Ok(json!(ctx.task.item.as_u64().unwrap_or(0) * 2))
    });
    env.worker(w);

    // Exactly what any NATS client sends: a request with a JSON body.
    let reply = env
        .submit(
            "invoices",
            json!({"job_id": "happy-1", "customer": "acme", "input": {"count": 1000}}),
        )
        .await;
    assert!(reply.ok, "{reply:?}");
    assert_eq!(reply.job_id.as_deref(), Some("happy-1"));

    let job = env.wait_end("happy-1", Duration::from_secs(60)).await;
    assert_eq!(job.state, JobState::Completed, "{:?}", job.error);
    assert_eq!(job.customer.as_deref(), Some("acme"));
    let send = &job.steps[1];
    assert_eq!((send.total, send.completed, send.failed), (1000, 1000, 0));
    assert!(job.steps.iter().all(|s| s.state == StepState::Completed
        && s.started_at.is_some()
        && s.finished_at.is_some()));
    assert_eq!(
        seen.lock().unwrap().len(),
        1000,
        "every item was handed to a worker"
    );
    // S3 got the fanout's summary as input, and its result is the job's output.
    assert_eq!(job.output["completed"], 1000);
    assert_eq!(
        job.output["results"]["subject"]
            .as_str()
            .map(|s| s.ends_with(".happy-1.subjob_completed")),
        Some(true)
    );

    let events = env.events("happy-1").await;
    let count = |t: &str| events.iter().filter(|e| e["type"] == t).count();
    assert_eq!(count("JobRequested"), 1);
    assert_eq!(count("StepStarted"), 3);
    assert_eq!(count("StepCompleted"), 3);
    assert_eq!(common::completions(&events).len(), 1002);
    assert_eq!(count("JobCompleted"), 1);
    assert_eq!(
        events.last().map(|e| e["type"].clone()),
        Some(json!("JobCompleted"))
    );

    // Submitting the same id again starts nothing new.
    let again = env
        .submit(
            "invoices",
            json!({"job_id": "happy-1", "input": {"count": 5}}),
        )
        .await;
    assert!(again.ok && again.duplicate, "{again:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(env.events("happy-1").await.len(), events.len());
    assert_eq!(
        env.queued_tasks("fanjet.task.>").await,
        0,
        "work queue drained"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_are_retried_and_counted() {
    let mut env = Env::start().await;
    env.apply(&seed_workflow("retry", "")).await;
    env.manager();
    env.worker(seed_worker(&env, "retry", |ctx| {
        // Every third subjob fails on its first attempt, once on the second.
        match (ctx.task.index % 3, ctx.attempt) {
            (0, 1) => Err(TaskError::retry("flaky")),
            (0, 2) if ctx.task.index % 2 == 0 => Err(TaskError::Retry {
                message: "flaky again".into(),
                after: Some(Duration::from_millis(10)),
            }),
            _ => Ok(json!(ctx.attempt)),
        }
    }));
    let reply = env
        .submit("retry", json!({"job_id": "r1", "input": {"count": 30}}))
        .await;
    assert!(reply.ok);
    let job = env.wait_end("r1", Duration::from_secs(30)).await;
    assert_eq!(job.state, JobState::Completed, "{:?}", job.error);
    let send = &job.steps[1];
    assert_eq!((send.completed, send.failed), (30, 0));
    // indexes 0,3,..,27: 10 subjobs retried once; of them the even ones (0,6,..,24) twice.
    assert_eq!(send.retries, 10 + 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_failures_fail_the_job_or_are_tolerated() {
    let mut env = Env::start().await;
    env.apply(&seed_workflow("strict", "")).await;
    env.apply(&seed_workflow("lenient", "tolerate_failures = \"10%\""))
        .await;
    env.manager();
    let handler = |ctx: TaskContext| match ctx.task.index {
        7 => Err(TaskError::give_up("invoice 7 has no e-mail address")),
        9 => Err(TaskError::retry("mailbox full")),
        _ => Ok(json!("sent")),
    };
    env.worker(seed_worker(&env, "strict", handler));
    env.worker(seed_worker(&env, "lenient", handler));

    assert!(
        env.submit(
            "strict",
            json!({"job_id": "strict-1", "input": {"count": 50}})
        )
        .await
        .ok
    );
    assert!(
        env.submit(
            "lenient",
            json!({"job_id": "lenient-1", "input": {"count": 50}})
        )
        .await
        .ok
    );

    let strict = env.wait_end("strict-1", Duration::from_secs(30)).await;
    assert_eq!(strict.state, JobState::Failed);
    let err = strict.error.clone().unwrap_or_default();
    assert!(
        err.contains("send") && err.contains("more than tolerated"),
        "{err}"
    );
    assert_eq!(strict.steps[1].state, StepState::Failed);
    assert_eq!(strict.steps[2].state, StepState::Pending, "S3 never ran");

    let lenient = env.wait_end("lenient-1", Duration::from_secs(30)).await;
    assert_eq!(lenient.state, JobState::Completed, "{:?}", lenient.error);
    let send = &lenient.steps[1];
    assert_eq!((send.completed, send.failed), (48, 2));
    let mut failures: Vec<_> = send
        .failures
        .iter()
        .map(|f| (f.index, f.attempt, f.error.clone()))
        .collect();
    failures.sort();
    assert_eq!(
        failures[0],
        (7, 1, "invoice 7 has no e-mail address".to_string())
    );
    assert_eq!(failures[1].0, 9);
    assert_eq!(failures[1].1, 3, "retried up to max_attempts");
    assert!(failures[1].2.contains("mailbox full"), "{:?}", failures[1]);
    assert_eq!(
        lenient.output["failed"], 2,
        "S3 saw the failures in its summary"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_and_late_completions_count_once() {
    let mut env = Env::start().await;
    env.apply(&seed_workflow("dup", "")).await;
    env.manager();
    // Every completion is reported a second time, without a message id so
    // the stream cannot drop it: the manager must.
    let nats = env.nats.clone();
    let worker = seed_worker(&env, "dup", move |ctx| {
        let ev = Event::SubjobCompleted(SubjobCompleted {
            run: 0,
            job_id: ctx.task.job_id.clone(),
            step_index: ctx.task.step_index,
            index: ctx.task.index,
            attempt: 1,
            result: json!("dup"),
            duration_ms: 0,
            token: ctx.task.token.clone(),
        });
        let nats = nats.clone();
        tokio::spawn(async move {
            let _ = nats
                .js
                .publish(ev.subject(), encode_json(&ev).unwrap())
                .await;
        });
        Ok(json!("ok"))
    });
    env.worker(worker);
    assert!(
        env.submit("dup", json!({"job_id": "d1", "input": {"count": 200}}))
            .await
            .ok
    );
    let job = env.wait_end("d1", Duration::from_secs(30)).await;
    assert_eq!(job.state, JobState::Completed, "{:?}", job.error);
    assert_eq!(
        (
            job.steps[1].completed,
            job.steps[1].failed,
            job.steps[1].retries
        ),
        (200, 0, 0)
    );

    // A late completion after the job ended changes nothing.
    let late = Event::SubjobCompleted(SubjobCompleted {
        run: 0,
        job_id: "d1".into(),
        step_index: 1,
        index: 3,
        attempt: 9,
        result: json!(null),
        duration_ms: 0,
        token: env.token("d1", 1, 3),
    });
    env.nats
        .js
        .publish(late.subject(), encode_json(&late).unwrap())
        .await
        .unwrap()
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (after, _) = fanjet::nats::store::get(&env.nats, "d1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(after, job);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_drops_queued_tasks_and_ends_the_job() {
    let mut env = Env::start().await;
    env.apply(&seed_workflow("slow", "")).await;
    env.manager();
    let ran = Arc::new(AtomicU32::new(0));
    let r = ran.clone();
    let worker = Worker::new(env.nats.clone())
        .concurrency(2)
        .handler("slow", "collect", |_ctx: TaskContext| async move {
            Ok(Value::Array((0..500).map(|i| json!(i)).collect()))
        })
        .handler("slow", "send", move |_ctx: TaskContext| {
            let r = r.clone();
            async move {
                r.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(100)).await;
                Ok(json!(null))
            }
        });
    env.worker(worker);
    assert!(env.submit("slow", json!({"job_id": "c1"})).await.ok);
    env.wait_for("c1", Duration::from_secs(20), "some subjobs done", |j| {
        j.steps[1].completed >= 4
    })
    .await;

    let status =
        common::fanjet_command(&env.url(), &["cancel", "c1", "--reason", "customer asked"])
            .status()
            .unwrap();
    assert!(status.success());
    let job = env.wait_end("c1", Duration::from_secs(10)).await;
    assert_eq!(job.state, JobState::Cancelled);
    assert_eq!(job.error.as_deref(), Some("customer asked"));
    assert_eq!(job.steps[1].state, StepState::Cancelled);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        env.queued_tasks("fanjet.task.*.*.*.c1").await,
        0,
        "queued tasks dropped"
    );
    assert!(ran.load(Ordering::SeqCst) < 100, "most subjobs never ran");
    let again = common::fanjet_command(&env.url(), &["cancel", "c1"])
        .status()
        .unwrap();
    assert!(!again.success(), "cancelling an ended job is an error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_submissions_are_rejected_and_the_manager_keeps_going() {
    let mut env = Env::start().await;
    env.apply(&seed_workflow("ok", "")).await;
    env.manager();
    env.worker(seed_worker(&env, "ok", |_| Ok(json!(1))));

    let malformed = common::submit_bytes(&env.nats, "ok", b"{not json".to_vec()).await;
    assert!(!malformed.ok);
    assert_eq!(
        malformed.error.as_ref().map(|e| e.code),
        Some(RejectCode::MalformedPayload)
    );

    let cbor_garbage = {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Content-Type", "application/cbor");
        let m = env
            .nats
            .client
            .request_with_headers("fanjet.submit.ok", headers, vec![0xff, 0x00, 0x9f].into())
            .await
            .unwrap();
        serde_json::from_slice::<fanjet::protocol::SubmitReply>(&m.payload).unwrap()
    };
    assert_eq!(
        cbor_garbage.error.as_ref().map(|e| e.code),
        Some(RejectCode::MalformedPayload)
    );

    let unknown = env.submit("nope", json!({"job_id": "u1"})).await;
    assert_eq!(
        unknown.error.as_ref().map(|e| e.code),
        Some(RejectCode::UnknownWorkflow)
    );
    assert!(unknown
        .error
        .as_ref()
        .unwrap()
        .message
        .contains("workflow apply"));

    for bad in ["a.b", "x*", "white space", ">"] {
        let r = env.submit("ok", json!({"job_id": bad})).await;
        assert_eq!(
            r.error.as_ref().map(|e| e.code),
            Some(RejectCode::InvalidJobId),
            "{bad:?}: {r:?}"
        );
        assert_ne!(
            r.job_id.as_deref(),
            Some(bad),
            "a fresh id carries the rejection"
        );
    }
    let wrong_type = env.submit("ok", json!({"job_id": 5})).await;
    assert_eq!(
        wrong_type.error.as_ref().map(|e| e.code),
        Some(RejectCode::MalformedPayload)
    );

    // Every rejection of a valid job id is recorded under that id.
    let pinned = |body: Value| {
        let nats = env.nats.clone();
        async move {
            let m = nats
                .client
                .request("fanjet.submit.ok.acme", encode_json(&body).unwrap())
                .await
                .unwrap();
            serde_json::from_slice::<fanjet::protocol::SubmitReply>(&m.payload).unwrap()
        }
    };
    // (On the tenant subject, under the id in acme's namespace.)
    let scoped = fanjet::protocol::tenant_job_id("acme", "rej-mismatch");
    for (id, reply, code) in [
        (
            "rej-customer",
            env.submit(
                "ok",
                json!({"job_id": "rej-customer", "customer": "a\u{7}b"}),
            )
            .await,
            "invalid_customer",
        ),
        (
            scoped.as_str(),
            pinned(json!({"job_id": "rej-mismatch", "customer": "globex"})).await,
            "invalid_customer",
        ),
        (
            "rej-malformed",
            env.submit("ok", json!({"job_id": "rej-malformed", "colour": "red"}))
                .await,
            "malformed_payload",
        ),
    ] {
        assert!(!reply.ok, "{reply:?}");
        assert_eq!(reply.job_id.as_deref(), Some(id), "{reply:?}");
        let job = env.wait_end(id, Duration::from_secs(10)).await;
        assert_eq!(job.state, JobState::Rejected);
        assert_eq!(env.events(id).await[0]["code"], code);
        // The id is used: sent again, correctly, it starts nothing.
        let again = match id == scoped {
            true => pinned(json!({"job_id": "rej-mismatch"})).await,
            false => env.submit("ok", json!({"job_id": id})).await,
        };
        assert!(again.ok && again.duplicate, "{again:?}");
    }

    // The rejection is on the log and in the status.
    let job = env.wait_end("u1", Duration::from_secs(10)).await;
    assert_eq!(job.state, JobState::Rejected);
    assert!(job.error.as_deref().unwrap_or_default().contains("nope"));
    let events = env.events("u1").await;
    assert_eq!(events[0]["type"], "JobRejected");
    assert_eq!(events[0]["code"], "unknown_workflow");

    // CBOR works when it is well-formed, and the manager is still running.
    let mut body = Vec::new();
    ciborium::ser::into_writer(
        &json!({"job_id": "good-1", "input": {"count": 3}}),
        &mut body,
    )
    .unwrap();
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Content-Type", "application/cbor");
    let m = env
        .nats
        .client
        .request_with_headers("fanjet.submit.ok", headers, body.into())
        .await
        .unwrap();
    let reply: fanjet::protocol::SubmitReply = serde_json::from_slice(&m.payload).unwrap();
    assert!(reply.ok, "{reply:?}");
    assert_eq!(
        env.wait_end("good-1", Duration::from_secs(20)).await.state,
        JobState::Completed
    );
    // A bad submission naming a job that exists is refused under a fresh
    // id: the existing job's history is left alone.
    let late = env
        .submit("ok", json!({"job_id": "good-1", "colour": "red"}))
        .await;
    assert!(!late.ok);
    assert_ne!(late.job_id.as_deref(), Some("good-1"));
    assert!(env
        .events("good-1")
        .await
        .iter()
        .all(|e| e["type"] != "JobRejected"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_jobs_of_one_customer_stay_isolated() {
    let mut env = Env::start().await;
    env.apply(&seed_workflow("iso", "")).await;
    env.manager();
    env.worker(seed_worker(&env, "iso", |ctx| {
        if ctx.task.job_id == "iso-b" && ctx.task.index < 3 {
            Err(TaskError::give_up("only b fails"))
        } else {
            Ok(json!(ctx.task.item))
        }
    }));
    let a = env.submit(
        "iso",
        json!({"job_id": "iso-a", "customer": "acme", "input": {"count": 300}}),
    );
    let b = env.submit(
        "iso",
        json!({"job_id": "iso-b", "customer": "acme", "input": {"count": 200}}),
    );
    let (a, b) = tokio::join!(a, b);
    assert!(a.ok && b.ok);
    let (a, b) = tokio::join!(
        env.wait_end("iso-a", Duration::from_secs(30)),
        env.wait_end("iso-b", Duration::from_secs(30))
    );
    assert_eq!(a.state, JobState::Completed, "{:?}", a.error);
    assert_eq!((a.steps[1].total, a.steps[1].completed), (300, 300));
    assert_eq!(b.state, JobState::Failed);
    assert_eq!(b.steps[1].total, 200);
    assert!(b.steps[1].failed >= 1);
}

/// Item batching: a fanout with `batch_size` hands its items to the handler
/// in blocks (one task each); an item that fails with a retryable error is
/// retried alone, one that gives up fails alone; counts, results and
/// statistics stay per item. A handler of one subjob serves a batched step
/// item by item.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batched_fanout_hands_items_together_and_retries_a_failing_item_alone() {
    use fanjet::worker::BatchContext;
    let mut env = Env::start().await;
    env.apply(&seed_workflow(
        "batched",
        "batch_size = 10\ntolerate_failures = \"1\"",
    ))
    .await;
    env.apply(&seed_workflow("batched_plain", "batch_size = 7"))
        .await;
    env.manager();
    let (_base, _stop) = env.serve(Default::default()).await;
    let calls: Arc<std::sync::Mutex<Vec<Vec<u64>>>> = Arc::default();
    let c = calls.clone();
    let worker = Worker::new(env.nats.clone())
        .concurrency(8)
        .handler("batched", "collect", |ctx: TaskContext| async move {
            let n = ctx.task.input["count"].as_u64().unwrap_or(0);
            Ok(Value::Array((0..n).map(|i| json!(i)).collect()))
        })
        .batch_handler("batched", "send", move |ctx: BatchContext| {
            let calls = c.clone();
            async move {
                calls.lock().unwrap().push(ctx.indices.clone());
                Ok(ctx
                    .indices
                    .iter()
                    .zip(&ctx.items)
                    .map(|(&i, item)| match (i, ctx.attempt) {
                        (17, 1) => Err(TaskError::retry("flaky")),
                        (42, _) => Err(TaskError::give_up("bounced")),
                        _ => Ok(json!(item.as_u64().unwrap_or(0) * 2)),
                    })
                    .collect())
            }
        })
        .handler("batched", "summarize", |ctx: TaskContext| async move {
            Ok(ctx.task.input)
        });
    env.worker(worker);
    env.worker(seed_worker(&env, "batched_plain", |ctx| {
        Ok(json!(ctx.task.item.as_u64().unwrap_or(0) + 1))
    }));
    for (workflow, job) in [("batched", "batch-1"), ("batched_plain", "batch-2")] {
        let reply = env
            .submit(workflow, json!({"job_id": job, "input": {"count": 95}}))
            .await;
        assert!(reply.ok, "{reply:?}");
    }

    let job = env.wait_end("batch-1", Duration::from_secs(60)).await;
    assert_eq!(job.state, JobState::Completed, "{:?}", job.error);
    let send = &job.steps[1];
    assert_eq!(
        (send.total, send.completed, send.failed, send.retries),
        (95, 94, 1, 1)
    );
    // Ten tasks of whole blocks; then subjob 17 alone, once.
    let calls = calls.lock().unwrap().clone();
    let (firsts, again): (Vec<_>, Vec<_>) = calls.iter().partition(|c| c.len() > 1 || c[0] == 90);
    let mut blocks: Vec<Vec<u64>> = firsts.into_iter().cloned().collect();
    blocks.sort();
    let expected: Vec<Vec<u64>> = (0..10)
        .map(|b| (b * 10..((b + 1) * 10).min(95)).collect())
        .collect();
    assert_eq!(blocks, expected, "{calls:?}");
    assert_eq!(again, vec![&vec![17u64]], "{calls:?}");
    let events = env.events("batch-1").await;
    let count = |t: &str| events.iter().filter(|e| e["type"] == t).count();
    assert_eq!(count("SubjobsDone"), 10);
    assert_eq!(count("SubjobCompleted"), 2, "collect and summarize only");

    // Results per item, as `fanjet results` reads them from the log.
    let (ok, text) = common::cli(&env, &["results", "batch-1", "--step", "send"]);
    assert!(ok, "{text}");
    let lines: Vec<Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert_eq!(lines.len(), 95, "{text}");
    let line = |i: u64| lines.iter().find(|l| l["index"] == i).unwrap().clone();
    assert_eq!(line(5)["result"], 10);
    assert_eq!(
        (line(17)["ok"].clone(), line(17)["attempt"].clone()),
        (json!(true), json!(2))
    );
    assert_eq!(line(42)["ok"], false);
    assert_eq!(line(42)["error"], "bounced");

    // Statistics count the items of each batch.
    env.wait_stats("batch-1", Duration::from_secs(15), |s| {
        s.steps
            .get(1)
            .is_some_and(|s| (s.completed, s.failed) == (94, 1))
    })
    .await;

    // A handler of one subjob on a batched step: item by item.
    let plain = env.wait_end("batch-2", Duration::from_secs(60)).await;
    assert_eq!(plain.state, JobState::Completed, "{:?}", plain.error);
    assert_eq!((plain.steps[1].completed, plain.steps[1].failed), (95, 0));
    let events = env.events("batch-2").await;
    assert_eq!(
        events.iter().filter(|e| e["type"] == "SubjobsDone").count(),
        14,
        "95 items in blocks of 7"
    );
}

/// A busy worker reports the completions of one step that are ready at
/// the same moment in one `SubjobsCompleted`: fewer events than subjobs,
/// and the record, the statistics, the results and the step after count
/// each subjob once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_worker_reports_completions_together_and_each_counts_once() {
    let mut env = Env::start().await;
    env.apply(&seed_workflow("together", "max_in_flight = 200"))
        .await;
    env.manager();
    let (_base, _stop) = env.serve(Default::default()).await;
    env.worker(seed_worker(&env, "together", |ctx| {
        Ok(json!(ctx.task.item.as_u64().unwrap_or(0) * 2))
    }));
    let reply = env
        .submit(
            "together",
            json!({"job_id": "tg-1", "input": {"count": 3000}}),
        )
        .await;
    assert!(reply.ok, "{reply:?}");
    let job = env.wait_end("tg-1", Duration::from_secs(90)).await;
    assert_eq!(job.state, JobState::Completed, "{:?}", job.error);
    assert_eq!((job.steps[1].completed, job.steps[1].failed), (3000, 0));
    assert_eq!(job.output["completed"], 3000);

    let events = env.events("tg-1").await;
    let together = events
        .iter()
        .filter(|e| e["type"] == "SubjobsCompleted")
        .count();
    let alone = events
        .iter()
        .filter(|e| e["type"] == "SubjobCompleted" && e["step_index"] == 1)
        .count();
    assert!(together > 0, "no completions were reported together");
    assert!(
        together + alone < 3000,
        "{together} reports together and {alone} alone for 3,000 subjobs"
    );
    let done = common::completions(&events);
    let mut indices: Vec<u64> = done
        .iter()
        .filter(|e| e["step_index"] == 1)
        .filter_map(|e| e["index"].as_u64())
        .collect();
    indices.sort_unstable();
    indices.dedup();
    assert_eq!(indices.len(), 3000);

    // Results as `fanjet results` reads them from the log: each once.
    let (ok, text) = common::cli(&env, &["results", "tg-1", "--step", "send"]);
    assert!(ok, "{text}");
    let lines: Vec<Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert_eq!(lines.len(), 3000);
    assert!(lines
        .iter()
        .all(|l| l["ok"] == true && l["result"].as_u64() == l["index"].as_u64().map(|i| i * 2)));

    env.wait_stats("tg-1", Duration::from_secs(15), |s| {
        s.steps
            .get(1)
            .is_some_and(|s| (s.completed, s.failed) == (3000, 0))
    })
    .await;
}

/// A fanout over items put in the object store (`fanjet items put`, or a
/// step's `TaskContext::put_items`): the manager reads them a buffer at a
/// time, in order; a reference whose count is wrong, or whose object is
/// gone, fails the job with a reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fanout_reads_its_items_from_an_object_put_with_the_cli() {
    let mut env = Env::start().await;
    env.apply(
        "name = \"many\"\n[[steps]]\nname = \"send\"\nkind = \"fanout\"\nbatch_size = 50\nmax_in_flight = 500\n",
    )
    .await;
    // A first step that hands on its items as an object.
    env.apply(
        "name = \"made\"\n[[steps]]\nname = \"collect\"\nkind = \"task\"\n\
         [[steps]]\nname = \"send\"\nkind = \"fanout\"\nbatch_size = 10\n",
    )
    .await;
    env.manager();
    let seen = Arc::new(std::sync::Mutex::new(Vec::<(u64, Value)>::new()));
    let s = seen.clone();
    env.worker(
        Worker::new(env.nats.clone())
            .concurrency(8)
            .handler("many", "send", move |ctx: TaskContext| {
                s.lock()
                    .unwrap()
                    .push((ctx.task.index, ctx.task.item.clone()));
                async move { Ok(Value::Null) }
            })
            .handler("made", "collect", |ctx: TaskContext| async move {
                let n = ctx.task.input["count"].as_u64().unwrap_or(0);
                let lines: String = (0..n).map(|i| format!("{{\"c\": {i}}}\n")).collect();
                ctx.put_items(lines.as_bytes(), fanjet::protocol::ItemsFormat::Lines)
                    .await
            })
            .handler("made", "send", |ctx: TaskContext| async move {
                match ctx.task.item["c"].as_u64() == Some(ctx.task.index) {
                    true => Ok(Value::Null),
                    false => Err(TaskError::give_up(format!("item {}", ctx.task.item))),
                }
            }),
    );
    // 5,000 items as JSON lines, one a string with a newline escaped, one
    // nested, blank lines between.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("items.jsonl");
    let mut text = String::new();
    for i in 0..5000u64 {
        match i {
            7 => text.push_str("\"line\\nbreak, ]\"\n\n"),
            8 => text.push_str("{\"deep\": [1, {\"x\": \"}\"}]}\n"),
            _ => text.push_str(&format!("{{\"n\": {i}}}\n")),
        }
    }
    std::fs::write(&path, text).unwrap();
    let (ok, out) = common::cli(&env, &["items", "put", path.to_str().unwrap()]);
    assert!(ok, "{out}");
    assert!(out.contains("stored 5000 items"), "{out}");
    let reference: Value = out
        .lines()
        .find_map(|l| serde_json::from_str(l).ok())
        .expect("the reference on stdout");
    assert_eq!(reference["$fanjet_result"]["array_len"], 5000);
    assert_eq!(reference["$fanjet_result"]["format"], "lines");

    assert!(
        env.submit(
            "many",
            json!({"job_id": "many-1", "input": reference.clone()})
        )
        .await
        .ok
    );
    let job = env.wait_end("many-1", Duration::from_secs(60)).await;
    assert_eq!(job.state, JobState::Completed, "{:?}", job.error);
    assert_eq!((job.steps[0].total, job.steps[0].completed), (5000, 5000));
    let mut seen = seen.lock().unwrap().clone();
    seen.sort_by_key(|(i, _)| *i);
    seen.dedup_by_key(|(i, _)| *i);
    assert_eq!(seen.len(), 5000);
    assert_eq!(seen[7].1, json!("line\nbreak, ]"));
    assert_eq!(seen[8].1, json!({"deep": [1, {"x": "}"}]}));
    assert_eq!(seen[4999].1, json!({"n": 4999}));

    // A reference that claims more items than the object holds.
    let mut wrong = reference.clone();
    wrong["$fanjet_result"]["array_len"] = json!(5001);
    assert!(
        env.submit("many", json!({"job_id": "many-2", "input": wrong}))
            .await
            .ok
    );
    let job = env.wait_end("many-2", Duration::from_secs(30)).await;
    assert_eq!(job.state, JobState::Failed);
    let error = job.error.unwrap_or_default();
    assert!(
        error.contains("holds 5000 items, its reference says 5001"),
        "{error}"
    );
    // An object that is not there.
    let mut gone = reference;
    gone["$fanjet_result"]["name"] = json!("i/01NOTTHERE");
    assert!(
        env.submit("many", json!({"job_id": "many-3", "input": gone}))
            .await
            .ok
    );
    let job = env.wait_end("many-3", Duration::from_secs(30)).await;
    assert_eq!(job.state, JobState::Failed);
    let error = job.error.unwrap_or_default();
    assert!(error.contains("no longer in the object store"), "{error}");

    // A step's result put as items: the fanout after it reads them.
    assert!(
        env.submit(
            "made",
            json!({"job_id": "made-1", "input": {"count": 3000}})
        )
        .await
        .ok
    );
    let job = env.wait_end("made-1", Duration::from_secs(60)).await;
    assert_eq!(job.state, JobState::Completed, "{:?}", job.error);
    assert_eq!(
        (job.steps[1].total, job.steps[1].completed),
        (3000, 3000),
        "each subjob got its own item"
    );
}

/// A manager that stopped answering (frozen, its host gone) still takes its
/// turn of the intake's queue group: the client asks again after 2 s with
/// the same id and another manager answers (it waited 10 s and gave up
/// before, `timed out`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submission_taken_by_a_silent_manager_is_answered_by_another() {
    use futures::{FutureExt, StreamExt};
    let mut env = Env::start().await;
    env.apply(&seed_workflow("silent", "")).await;
    env.manager();
    // Let the manager's intake subscribe first.
    env.submit(
        "silent",
        json!({"job_id": "warm-up", "input": {"count": 0}}),
    )
    .await;
    // A member of the queue group that takes one request and never answers.
    let mut silent = env
        .nats
        .client
        .queue_subscribe(
            fanjet::protocol::SUBMIT_WILDCARD,
            fanjet::protocol::INTAKE_QUEUE.into(),
        )
        .await
        .expect("subscribe");
    silent
        .unsubscribe_after(1)
        .await
        .expect("unsubscribe after one");
    env.nats.client.flush().await.expect("flush");
    for i in 0..40 {
        let sub = fanjet::protocol::Submission {
            job_id: Some(format!("silent-{i}")),
            customer: None,
            input: json!({"count": 0}),
            priority: None,
        };
        let reply = fanjet::client::submit(&env.nats.client, "silent", &sub)
            .await
            .unwrap_or_else(|e| panic!("submission {i} not answered: {e}"));
        assert!(reply.ok, "{reply:?}");
        if let Some(Some(taken)) = silent.next().now_or_never() {
            let first_try: Value = serde_json::from_slice(&taken.payload).expect("json");
            assert_eq!(first_try["job_id"], format!("silent-{i}"));
            assert_eq!(reply.job_id, Some(format!("silent-{i}")));
            return;
        }
    }
    panic!("the silent member of the queue group never got a request");
}
