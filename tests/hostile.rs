//! Hostile and broken input against a real nats-server: garbage and forged
//! events on the log, poison subjobs (a handler that always fails, one that
//! kills its worker process), oversized results, limits.

mod common;

use std::time::Duration;

use common::{seed_workflow, submit_bytes, Env};
use fanjet::manager::ManagerOptions;
use fanjet::metrics::Metrics;
use fanjet::protocol::{encode_json, event_subject, Event, ResultRef, SubjobCompleted};
use fanjet::protocol::{JobState, RejectCode};
use fanjet::worker::{TaskContext, Worker};
use serde_json::{json, Value};

fn ignored(reason: &str) -> u64 {
    Metrics::get()
        .manager_ignored
        .with_label_values(&[reason])
        .get()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_forged_events_are_ignored_counted_and_harmless() {
    let mut env = Env::start().await;
    env.apply("name = \"forge\"\n[[steps]]\nname = \"send\"\nkind = \"fanout\"\n")
        .await;
    env.manager();
    let before = [
        "unreadable",
        "subject_mismatch",
        "unknown_job",
        "not_dispatched",
    ]
    .map(ignored);
    let js = &env.nats.js;
    // Bytes that are no event at all, on subjects the manager reads.
    for (subject, body) in [
        (
            event_subject("x", "subjob_completed"),
            b"\xff\x00garbage".to_vec(),
        ),
        (
            event_subject("x", "requested"),
            b"{\"type\": \"JobRequested\"}".to_vec(),
        ),
        (event_subject("x", "subjob_failed"), b"[1, 2, 3]".to_vec()),
    ] {
        js.publish(subject, body.into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    // A well-formed event whose body names another job than its subject.
    let forged = Event::SubjobCompleted(SubjobCompleted {
        run: 0,
        job_id: "victim".into(),
        step_index: 1,
        index: 0,
        attempt: 1,
        result: json!(null),
        duration_ms: 0,
        token: env.token("victim", 1, 0),
    });
    js.publish(
        event_subject("other", "subjob_completed"),
        encode_json(&forged).unwrap(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    // Completions for a job that does not exist.
    let ghost = Event::SubjobCompleted(SubjobCompleted {
        run: 0,
        job_id: "ghost".into(),
        step_index: 0,
        index: 0,
        attempt: 1,
        result: json!(null),
        duration_ms: 0,
        token: env.token("ghost", 0, 0),
    });
    js.publish(ghost.subject(), encode_json(&ghost).unwrap())
        .await
        .unwrap()
        .await
        .unwrap();

    // A real job, with forged completions for subjobs never dispatched.
    assert!(
        env.submit(
            "forge",
            json!({"job_id": "real", "input": (0..50).collect::<Vec<_>>()})
        )
        .await
        .ok
    );
    env.wait_for("real", Duration::from_secs(10), "fanout started", |j| {
        j.steps[0].total == 50
    })
    .await;
    for index in [50, 10_000, u64::MAX] {
        let e = Event::SubjobCompleted(SubjobCompleted {
            run: 0,
            job_id: "real".into(),
            step_index: 0,
            index,
            attempt: 1,
            result: json!(null),
            duration_ms: 0,
            token: env.token("real", 0, index),
        });
        js.publish(e.subject(), encode_json(&e).unwrap())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    env.worker(Worker::new(env.nats.clone()).concurrency(8).handler(
        "forge",
        "send",
        |ctx: TaskContext| async move { Ok(ctx.task.item) },
    ));
    let job = env.wait_end("real", Duration::from_secs(20)).await;
    assert_eq!(job.state, JobState::Completed, "{:?}", job.error);
    assert_eq!(
        (
            job.steps[0].total,
            job.steps[0].completed,
            job.steps[0].failed
        ),
        (50, 50, 0)
    );
    let after = [
        "unreadable",
        "subject_mismatch",
        "unknown_job",
        "not_dispatched",
    ]
    .map(ignored);
    assert!(
        after[0] >= before[0] + 3,
        "unreadable counted: {before:?} -> {after:?}"
    );
    assert!(
        after[1] > before[1],
        "subject mismatch counted: {before:?} -> {after:?}"
    );
    assert!(
        after[2] > before[2],
        "unknown job counted: {before:?} -> {after:?}"
    );
    assert!(
        after[3] >= before[3] + 3,
        "never-dispatched subjobs counted: {before:?} -> {after:?}"
    );
    assert!(
        fanjet::nats::store::get(&env.nats, "ghost")
            .await
            .unwrap()
            .is_none(),
        "a forged event creates no job"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_subjob_fails_alone_and_blocks_nothing() {
    let mut env = Env::start().await;
    env.apply(&seed_workflow("poison", "tolerate_failures = \"1\""))
        .await;
    env.manager();
    let worker = Worker::new(env.nats.clone())
        .concurrency(4)
        .handler("poison", "collect", |ctx: TaskContext| async move {
            let n = ctx.task.input["count"].as_u64().unwrap_or(0);
            Ok(Value::Array((0..n).map(|i| json!(i)).collect()))
        })
        .handler("poison", "send", |ctx: TaskContext| async move {
            if ctx.task.job_id == "p-1" && ctx.task.index == 0 {
                panic!("this invoice always crashes its handler");
            }
            Ok(ctx.task.item)
        })
        .handler("poison", "summarize", |ctx: TaskContext| async move {
            Ok(ctx.task.input)
        });
    env.worker(worker);
    assert!(
        env.submit("poison", json!({"job_id": "p-1", "input": {"count": 100}}))
            .await
            .ok
    );
    assert!(
        env.submit("poison", json!({"job_id": "p-2", "input": {"count": 100}}))
            .await
            .ok
    );
    let (a, b) = tokio::join!(
        env.wait_end("p-1", Duration::from_secs(30)),
        env.wait_end("p-2", Duration::from_secs(30))
    );
    assert_eq!(a.state, JobState::Completed, "{:?}", a.error);
    assert_eq!((a.steps[1].completed, a.steps[1].failed), (99, 1));
    let f = &a.steps[1].failures[0];
    assert_eq!((f.index, f.attempt), (0, 3), "retried up to max_attempts");
    assert!(
        f.error
            .contains("handler panicked: this invoice always crashes"),
        "{f:?}"
    );
    assert_eq!(b.state, JobState::Completed);
    assert_eq!((b.steps[1].completed, b.steps[1].failed), (100, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subjob_that_kills_its_worker_process_is_failed_after_its_attempts() {
    let mut env = Env::start().await;
    env.apply("name = \"crash\"\n[[steps]]\nname = \"send\"\nkind = \"fanout\"\ntimeout = \"1s\"\nmax_attempts = 2\ntolerate_failures = \"1\"\n").await;
    env.manager();
    // Subjob 0 SIGKILLs the worker running it; a supervisor starts a new one.
    let exec = "if [ \"$FANJET_INDEX\" = 0 ]; then kill -9 $PPID; sleep 5; fi; cat";
    // One slot: the poison subjob takes down no other subjob with it.
    let args = [
        "worker",
        "--workflow",
        "crash",
        "--step",
        "send",
        "--concurrency",
        "1",
        "--exec",
        exec,
    ];
    let mut workers = vec![common::fanjet_command(&env.url(), &args).spawn().unwrap()];
    assert!(
        env.submit(
            "crash",
            json!({"job_id": "k-1", "input": (0..20).collect::<Vec<_>>()})
        )
        .await
        .ok
    );
    let start = std::time::Instant::now();
    let job = loop {
        if let Some((job, _)) = fanjet::nats::store::get(&env.nats, "k-1").await.unwrap() {
            if job.state.is_terminal() {
                break job;
            }
        }
        assert!(start.elapsed() < Duration::from_secs(40), "job did not end");
        if workers
            .iter_mut()
            .all(|w| w.try_wait().ok().flatten().is_some())
        {
            workers.push(common::fanjet_command(&env.url(), &args).spawn().unwrap());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for w in &mut workers {
        let _ = w.kill();
        let _ = w.wait();
    }
    assert!(
        workers.len() >= 3,
        "the poison subjob killed a worker on each of its 2 attempts"
    );
    assert_eq!(job.state, JobState::Completed, "{:?}", job.error);
    assert_eq!((job.steps[0].completed, job.steps[0].failed), (19, 1));
    assert_eq!(job.steps[0].failures[0].index, 0);
    assert_eq!(env.queued_tasks("fanjet.task.>").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_results_go_to_the_object_store_and_limits_hold() {
    let mut env = Env::start().await;
    // A 65 MB result takes seconds to build in a debug build on a busy
    // 2-core machine: the seed workflow's 5 s would run it again.
    env.apply(&seed_workflow("big", "tolerate_failures = \"1\"").replacen(
        "timeout = \"5s\"\nmax_attempts",
        "timeout = \"60s\"\nmax_attempts",
        1,
    ))
    .await;
    env.apply(
        "name = \"capped\"\n[[steps]]\nname = \"send\"\nkind = \"fanout\"\nmax_subjobs = 5\n",
    )
    .await;
    env.manager();
    env.worker(
        Worker::new(env.nats.clone())
            .concurrency(4)
            // S1's output (12,000 items, about 500 KB) is too large for an event.
            .handler("big", "collect", |_c: TaskContext| async move {
                Ok(Value::Array(
                    (0..12_000)
                        .map(|i| json!({"invoice": format!("INV-{i:08}-padding")}))
                        .collect(),
                ))
            })
            .handler("big", "send", |ctx: TaskContext| async move {
                match ctx.task.index {
                    1 => Ok(json!("x".repeat(9 * 1024 * 1024))),
                    2 => Ok(json!("y".repeat(65 * 1024 * 1024))),
                    _ => Ok(json!(null)),
                }
            })
            .handler("big", "summarize", |c: TaskContext| async move {
                Ok(c.task.input)
            })
            .handler("capped", "send", |_c: TaskContext| async move {
                Ok(json!(null))
            }),
    );
    assert!(env.submit("big", json!({"job_id": "big-1"})).await.ok);
    let job = env.wait_end("big-1", Duration::from_secs(120)).await;
    assert_eq!(job.state, JobState::Completed, "{:?}", job.error);
    let send = &job.steps[1];
    assert_eq!(
        (send.total, send.completed, send.failed, send.retries),
        (12_000, 11_999, 1, 0)
    );
    assert_eq!(send.failures[0].index, 2);
    assert!(
        send.failures[0].error.contains("result too large"),
        "{:?}",
        send.failures
    );
    // The 9 MB result is in the object store, its event carries the reference.
    let events = common::completions(&env.events("big-1").await);
    let nine = events
        .iter()
        .find(|e| e["type"] == "SubjobCompleted" && e["step_index"] == 1 && e["index"] == 1)
        .expect("subjob 1 completed");
    let r = ResultRef::from_value(&nine["result"]).expect("a reference");
    assert_eq!(r.size, 9 * 1024 * 1024 + 2);
    let collect = events
        .iter()
        .find(|e| e["type"] == "SubjobCompleted" && e["step_index"] == 0)
        .unwrap();
    assert_eq!(
        ResultRef::from_value(&collect["result"]).and_then(|r| r.array_len),
        Some(12_000)
    );
    use tokio::io::AsyncReadExt;
    let mut obj = env.nats.results.get(&r.name).await.unwrap();
    let mut bytes = Vec::new();
    obj.read_to_end(&mut bytes).await.unwrap();
    assert_eq!(bytes.len(), 9 * 1024 * 1024 + 2);

    assert!(
        env.submit(
            "capped",
            json!({"job_id": "cap-1", "input": [1, 2, 3, 4, 5, 6]})
        )
        .await
        .ok
    );
    let capped = env.wait_end("cap-1", Duration::from_secs(10)).await;
    assert_eq!(capped.state, JobState::Failed);
    assert!(
        capped
            .error
            .as_deref()
            .unwrap_or_default()
            .contains("max_subjobs"),
        "{:?}",
        capped.error
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_customer_is_rate_limited_and_its_rejections_bounded() {
    use std::num::NonZeroU32;
    let mut env = Env::start().await;
    env.apply(&seed_workflow("flood", "")).await;
    let n = |v| NonZeroU32::new(v).unwrap();
    env.manager_with(ManagerOptions {
        intake: fanjet::manager::intake::IntakeLimits {
            submissions_per_s: n(1),
            submission_burst: n(5),
            rejections_recorded_per_min: n(1),
            rejection_burst: n(3),
        },
        ..ManagerOptions::default()
    });
    // Twelve malformed submissions as `spam`: answered, three recorded.
    for i in 0..12 {
        let reply = submit_bytes(
            &env.nats,
            "flood.spam",
            format!("{{\"job_id\": \"junk-{i}\", \"bogus\": true}}").into_bytes(),
        )
        .await;
        assert_eq!(
            reply.error.map(|e| e.code),
            Some(RejectCode::MalformedPayload),
            "junk-{i}"
        );
    }
    // The intake logs a rejection before it answers: the log is exact now.
    let mut logged = 0;
    for i in 0..12 {
        let id = fanjet::protocol::tenant_job_id("spam", &format!("junk-{i}"));
        logged += env
            .events(&id)
            .await
            .iter()
            .filter(|e| e["type"] == "JobRejected")
            .count();
    }
    assert_eq!(logged, 3, "rejections recorded past the budget");
    // Ten submissions at once from one customer: the burst goes through,
    // the rest are refused with nothing recorded; another customer is not
    // held back.
    let mut limited = Vec::new();
    for i in 0..10 {
        let body =
            json!({"job_id": format!("many-{i}"), "customer": "busy", "input": {"count": 1}});
        let reply = env.submit("flood", body).await;
        match reply.error.map(|e| e.code) {
            None => assert!(reply.ok),
            Some(RejectCode::RateLimited) => limited.push(format!("many-{i}")),
            other => panic!("many-{i}: {other:?}"),
        }
    }
    assert!(limited.len() >= 4, "only {} limited", limited.len());
    for id in &limited {
        assert!(
            fanjet::nats::store::status(&env.nats, id)
                .await
                .unwrap()
                .is_none(),
            "{id} was recorded"
        );
    }
    let other = env
        .submit(
            "flood",
            json!({"job_id": "calm-1", "customer": "calm", "input": {"count": 1}}),
        )
        .await;
    assert!(other.ok, "{other:?}");
    // fanjet's own client waits for the budget and sends it again.
    let patient = fanjet::client::submit(
        &env.nats.client,
        "flood",
        &fanjet::protocol::Submission {
            job_id: Some("many-patient".into()),
            customer: Some("busy".into()),
            input: json!({"count": 1}),
            priority: None,
        },
    )
    .await
    .unwrap();
    assert!(patient.ok, "{patient:?}");
}
