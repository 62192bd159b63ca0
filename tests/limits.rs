//! One job's data never stops its partition. On a stock nats-server
//! (`max_payload` 1 MB, what most users run): error texts of any length
//! from a worker in any language, and a definition put straight into the
//! bucket that fails validation, each end their own job (or are refused)
//! while other jobs on the same partition go on.

mod common;

use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::AckKind;
use common::Env;
use fanjet::protocol::{
    encode_json, partition, Event, JobState, SubjobFailed, Task, MAX_ERROR_BYTES,
};
use fanjet::worker::{TaskContext, Worker};
use futures::StreamExt;
use serde_json::json;

/// The first `prefix-N` whose partition is `p`.
fn id_on(p: u32, prefix: &str) -> String {
    (0..)
        .map(|n| format!("{prefix}-{n}"))
        .find(|id| partition(id) == p)
        .expect("some id hashes there")
}

/// A stock server, as users run it: the limit these tests are about.
fn assert_stock(env: &Env) {
    assert_eq!(
        env.nats.client.server_info().max_payload,
        1024 * 1024,
        "these tests need a nats-server with the default max_payload"
    );
}

/// Serves `quiet`'s one fanout step in this process and checks a job of it
/// on `p` still completes.
async fn quiet_job_completes(env: &mut Env, p: u32) {
    let id = id_on(p, "quiet");
    let reply = env
        .submit("quiet", json!({"job_id": id, "input": [1, 2, 3]}))
        .await;
    assert!(reply.ok, "{reply:?}");
    let job = env.wait_end(&id, Duration::from_secs(20)).await;
    assert_eq!(job.state, JobState::Completed, "{job:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_error_texts_from_any_worker_never_stop_a_partition() {
    let mut env = Env::start().await;
    assert_stock(&env);
    env.apply(
        "name = \"noisy\"\n[[steps]]\nname = \"send\"\nkind = \"fanout\"\ntolerate_failures = \"100%\"\n\
         [[steps]]\nname = \"report\"\nkind = \"task\"\n",
    )
    .await;
    env.one_fanout("quiet", "", 4, Duration::from_millis(1))
        .await;
    env.worker(Worker::new(env.nats.clone()).handler(
        "noisy",
        "report",
        |c: TaskContext| async move { Ok(json!({"failed": c.task.input["failed"]})) },
    ));
    env.manager();
    let p = 6;
    let noisy = id_on(p, "noisy");
    let items: Vec<u64> = (0..200).collect();
    let reply = env
        .submit("noisy", json!({"job_id": noisy, "input": items}))
        .await;
    assert!(reply.ok, "{reply:?}");

    // A worker written against PROTOCOL.md alone, in any language: it gives
    // up on every subjob with a long traceback (20 KB) and terminates it.
    let consumer: PullConsumer = env
        .nats
        .task_queue(&noisy)
        .get_consumer("fanjet_noisy_send")
        .await
        .expect("step consumer");
    let traceback = format!(
        "Traceback (most recent call last):\n{}",
        "  File \"x.py\", line 1, in <module>\n".repeat(600)
    );
    assert!(traceback.len() > 20_000);
    let mut handled = 0;
    let start = std::time::Instant::now();
    while handled < 200 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "only {handled} tasks came"
        );
        let mut batch = consumer
            .fetch()
            .max_messages(100)
            .expires(Duration::from_secs(1))
            .messages()
            .await
            .expect("fetch");
        while let Some(Ok(msg)) = batch.next().await {
            let task: Task = serde_json::from_slice(&msg.payload).expect("task");
            let event = Event::SubjobFailed(SubjobFailed {
                run: 0,
                job_id: task.job_id.clone(),
                step_index: task.step_index,
                index: task.index,
                attempt: 1,
                error: traceback.clone(),
                token: task.token.clone(),
            });
            env.nats
                .js
                .publish(event.subject(), encode_json(&event).expect("json"))
                .await
                .expect("publish")
                .await
                .expect("stored");
            msg.ack_with(AckKind::Term).await.expect("term");
            handled += 1;
        }
    }

    let job = env.wait_end(&noisy, Duration::from_secs(20)).await;
    assert_eq!(
        job.state,
        JobState::Completed,
        "tolerated failures: {job:?}"
    );
    let send = &job.steps[0];
    assert_eq!((send.completed, send.failed), (0, 200), "exact counts");
    assert!(!send.failures.is_empty(), "some failures are shown");
    for f in &send.failures {
        assert!(
            f.error.len() <= MAX_ERROR_BYTES,
            "{} bytes kept",
            f.error.len()
        );
        assert!(f.error.starts_with("Traceback"), "the start is kept");
    }
    assert_eq!(job.output, json!({"failed": 200}));
    let (_, record) = env
        .nats
        .records(&noisy)
        .entry(&noisy)
        .await
        .ok()
        .flatten()
        .map(|e| ((), e.value))
        .expect("record");
    assert!(
        record.len() < 256 * 1024,
        "record of {} bytes",
        record.len()
    );

    // The partition goes on.
    quiet_job_completes(&mut env, p).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_definition_that_fails_validation_is_refused_where_it_is_read() {
    let mut env = Env::start().await;
    assert_stock(&env);
    env.one_fanout("quiet", "", 4, Duration::from_millis(1))
        .await;
    env.manager();
    env.put_dotted_workflow("dotted").await;

    let p = 9;
    let refused = id_on(p, "dotted");
    let reply = env.submit("dotted", json!({"job_id": refused})).await;
    assert!(!reply.ok, "{reply:?}");
    let error = reply.error.expect("error");
    assert_eq!(
        serde_json::to_value(error.code).expect("code"),
        json!("invalid_definition")
    );
    assert!(error.message.contains("a.b"), "{}", error.message);

    // A request that reaches the manager anyway (the definition changed
    // after the intake read it) is rejected there, and the partition goes on.
    let late = id_on(p, "dotted-late");
    let event = Event::JobRequested(fanjet::protocol::JobRequested {
        job_id: late.clone(),
        workflow: "dotted".into(),
        customer: None,
        input: json!(null),
        at: fanjet::protocol::now_ms(),
        deadline_at: None,
        priority: None,
    });
    fanjet::nats::log::append(&env.nats, &event)
        .await
        .expect("append");
    let job = env.wait_end(&late, Duration::from_secs(10)).await;
    assert_eq!(job.state, JobState::Rejected);
    assert!(
        job.error.as_deref().unwrap_or_default().contains("a.b"),
        "{:?}",
        job.error
    );
    quiet_job_completes(&mut env, p).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_id_no_bucket_can_hold_is_ignored_not_retried_forever() {
    let mut env = Env::start().await;
    env.one_fanout("quiet", "", 4, Duration::from_millis(1))
        .await;
    env.manager();
    // Valid in a subject, so the log takes it; but no KV key may hold ':'
    // or '+'. Only a client that writes the log directly can send these.
    let odd = ["odd:1", "odd+2"];
    for id in odd {
        let event = Event::JobRequested(fanjet::protocol::JobRequested {
            job_id: id.into(),
            workflow: "quiet".into(),
            customer: None,
            input: json!([1]),
            at: fanjet::protocol::now_ms(),
            deadline_at: None,
            priority: None,
        });
        fanjet::nats::log::append(&env.nats, &event)
            .await
            .expect("append");
    }
    for id in odd {
        quiet_job_completes(&mut env, partition(id)).await;
    }
    let ignored = fanjet::metrics::Metrics::get()
        .manager_ignored
        .with_label_values(&["invalid_job_id"])
        .get();
    assert_eq!(ignored, 2, "each is counted, once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_input_is_gone_only_when_it_is_not_for_a_moment() {
    use fanjet::nats::log::event_at;
    let env = Env::start().await;
    let event = |id: &str| {
        Event::JobRequested(fanjet::protocol::JobRequested {
            job_id: id.into(),
            workflow: "w".into(),
            customer: None,
            input: json!([1, 2]),
            at: 1,
            deadline_at: None,
            priority: None,
        })
    };
    // A second job in the same cell: its event follows in the same stream.
    let cell = fanjet::protocol::job_cell("in-1");
    let second = (2..)
        .map(|i| format!("in-{i}"))
        .find(|id| fanjet::protocol::job_cell(id) == cell)
        .expect("an id in the cell");
    let first = fanjet::nats::log::append(&env.nats, &event("in-1"))
        .await
        .expect("append")
        .seq;
    assert!(event_at(&env.nats, "in-1", first)
        .await
        .expect("read")
        .is_some());

    // Asked for before it is there (as a read during a leader change can
    // answer "no message" for an event that exists): found once it is.
    let nats = env.nats.clone();
    let late = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        fanjet::nats::log::append(&nats, &event(&second))
            .await
            .expect("append")
            .seq
    });
    let found = event_at(&env.nats, "in-1", first + 1).await.expect("read");
    assert_eq!(late.await.expect("join"), first + 1);
    assert!(
        found.is_some(),
        "a moment of \"no message\" is not \"gone\""
    );

    // Past the end of the log: not gone either, but not readable now.
    let err = event_at(&env.nats, "in-1", first + 100)
        .await
        .expect_err("not there yet");
    assert!(err.is_transient(), "{err}");

    // Deleted, or older than the log's first event: gone for good.
    env.nats
        .log("in-1")
        .delete_message(first + 1)
        .await
        .expect("delete");
    assert!(event_at(&env.nats, "in-1", first + 1)
        .await
        .expect("read")
        .is_none());
    env.nats
        .log("in-1")
        .purge()
        .sequence(first + 1)
        .await
        .expect("purge");
    assert!(event_at(&env.nats, "in-1", first)
        .await
        .expect("read")
        .is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_chunks_cannot_outlive_the_log_even_on_an_older_store() {
    let server =
        tokio::task::spawn_blocking(|| fanjet::nats::server::NatsServer::start(None, None))
            .await
            .unwrap()
            .expect("this test needs a real nats-server");
    let client = async_nats::connect(server.url()).await.unwrap();
    // The bucket as earlier versions made it: kept forever.
    let js = async_nats::jetstream::new(client.clone());
    js.create_key_value(async_nats::jetstream::kv::Config {
        bucket: fanjet::protocol::pending_bucket(1),
        history: 1,
        ..Default::default()
    })
    .await
    .unwrap();
    let nats = fanjet::nats::Nats::ensure(client).await.unwrap();
    let events = nats.cell_log(0).get_info().await.unwrap().config.max_age;
    let pending = js
        .get_stream(format!("KV_{}", fanjet::protocol::pending_bucket(1)))
        .await
        .unwrap()
        .get_info()
        .await
        .unwrap()
        .config
        .max_age;
    assert!(events > Duration::ZERO);
    assert_eq!(pending, events, "chunks expire with the log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_from_before_the_cells_is_refused_saying_what_to_do() {
    let server =
        tokio::task::spawn_blocking(|| fanjet::nats::server::NatsServer::start(None, None))
            .await
            .unwrap()
            .expect("this test needs a real nats-server");
    let client = async_nats::connect(server.url()).await.unwrap();
    // The single log earlier versions made: it takes every event subject.
    let js = async_nats::jetstream::new(client.clone());
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "FANJET_EVENTS".into(),
        subjects: vec!["fanjet.ev.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let err = match fanjet::nats::Nats::ensure(client).await {
        Ok(_) => panic!("set up beside an earlier version's log"),
        Err(e) => e,
    };
    let text = err.to_string();
    assert!(
        text.contains("nats stream rm FANJET_EVENTS") && text.contains("Upgrading"),
        "{text}"
    );
    assert!(!err.is_transient(), "waiting will not mend it: {text}");
}
