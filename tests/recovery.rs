//! Crashes and deadlines on a real nats-server: the manager SIGKILLed in the
//! middle of a 1,000-subjob job, workers SIGKILLed mid-task (redelivery, and
//! exhausted attempts via the server's advisory), a step deadline, and a
//! worker's graceful SIGTERM, deliveries lost on the way to the log's readers,
//! and the nats-server itself SIGKILLed and restarted mid-job; through all
//! of which the statistics count what the job record counts.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{seed_workflow, Env};
use fanjet::protocol::{job_cell, JobState};
use fanjet::worker::{TaskContext, Worker};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

async fn wait_file(path: &Path, within: Duration) {
    let start = Instant::now();
    while !path.exists() {
        assert!(
            start.elapsed() < within,
            "{} never appeared",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A worker for workflow "one" whose subjobs return their item.
fn echo_worker(env: &Env) -> Worker {
    Worker::new(env.nats.clone()).handler(
        "one",
        "send",
        |c: TaskContext| async move { Ok(c.task.item) },
    )
}

/// A `fanjet worker` process whose one slot touches `mark` and then hangs.
fn hanging_worker(env: &mut Env, mark: &Path) -> usize {
    let hang = format!("touch {}; sleep 30", mark.display());
    env.spawn(&[
        "worker",
        "--workflow",
        "one",
        "--step",
        "send",
        "--concurrency",
        "1",
        "--exec",
        &hang,
    ])
}

const ONE_FANOUT: &str = r#"
name = "one"
[[steps]]
name = "send"
kind = "fanout"
timeout = "1s"
max_attempts = MAX
tolerate_failures = "1"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manager_killed_mid_job_resumes_with_exact_counts() {
    let mut env = Env::start().await;
    env.apply(&seed_workflow("crash", "max_in_flight = 300"))
        .await;
    let worker = Worker::new(env.nats.clone())
        .concurrency(16)
        .handler("crash", "collect", |_c: TaskContext| async move {
            Ok(Value::Array((0..1000).map(|i| json!(i)).collect()))
        })
        .handler("crash", "send", |c: TaskContext| async move {
            tokio::time::sleep(Duration::from_millis(15)).await;
            Ok(c.task.item)
        })
        .handler("crash", "summarize", |c: TaskContext| async move {
            Ok(c.task.input)
        });
    env.worker(worker);

    let m1 = env.spawn(&["manager"]);
    assert!(env.submit("crash", json!({"job_id": "k1"})).await.ok);
    env.wait_for("k1", Duration::from_secs(30), "200 subjobs done", |j| {
        j.steps.get(1).is_some_and(|s| s.completed >= 200)
    })
    .await;
    env.kill(m1);
    // Workers go on finishing what was queued while no manager runs.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let m2 = env.spawn(&["manager"]);
    env.wait_for("k1", Duration::from_secs(30), "600 subjobs done", |j| {
        j.steps.get(1).is_some_and(|s| s.completed >= 600)
    })
    .await;
    env.kill(m2);
    tokio::time::sleep(Duration::from_millis(300)).await;
    env.spawn(&["manager"]);

    let job = env.wait_end("k1", Duration::from_secs(60)).await;
    assert_eq!(job.state, JobState::Completed, "{:?}", job.error);
    let send = &job.steps[1];
    assert_eq!((send.total, send.completed, send.failed), (1000, 1000, 0));
    assert_eq!(job.output["completed"], 1000, "S3 saw exact counts");
    let events = env.events("k1").await;
    let count = |t: &str| events.iter().filter(|e| e["type"] == t).count();
    assert_eq!(count("StepStarted"), 3, "no step started twice");
    assert_eq!(count("StepCompleted"), 3);
    assert_eq!(count("JobCompleted"), 1);
    assert_eq!(env.queued_tasks("fanjet.task.>").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_task_is_redelivered_after_the_deadline() {
    let mut env = Env::start().await;
    env.apply(&ONE_FANOUT.replace("MAX", "3")).await;
    env.manager();
    let dir = tempfile::tempdir().unwrap();
    let mark = dir.path().join("started");
    let w1 = hanging_worker(&mut env, &mark);
    assert!(
        env.submit("one", json!({"job_id": "w1", "input": ["a", "b", "c"]}))
            .await
            .ok
    );
    wait_file(&mark, Duration::from_secs(20)).await;
    env.kill(w1);
    let killed_at = Instant::now();
    env.spawn(&[
        "worker",
        "--workflow",
        "one",
        "--step",
        "send",
        "--exec",
        "cat",
    ]);
    let job = env.wait_end("w1", Duration::from_secs(30)).await;
    assert_eq!(job.state, JobState::Completed, "{:?}", job.error);
    assert_eq!((job.steps[0].completed, job.steps[0].failed), (3, 0));
    assert!(job.steps[0].retries >= 1, "the killed attempt was retried");
    assert!(
        killed_at.elapsed() >= Duration::from_millis(500),
        "redelivery waited for the ack deadline"
    );
    // `cat` echoes the task: the redelivered one says attempt 2.
    let events = common::completions(&env.events("w1").await);
    let attempts: Vec<u64> = events
        .iter()
        .map(|e| e["result"]["attempt"].as_u64().unwrap_or(0))
        .collect();
    assert!(attempts.contains(&2), "{attempts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subjob_whose_last_attempt_times_out_fails_via_the_advisory() {
    let mut env = Env::start().await;
    env.apply(&ONE_FANOUT.replace("MAX", "1")).await;
    env.manager();
    let dir = tempfile::tempdir().unwrap();
    let mark = dir.path().join("started");
    let w1 = hanging_worker(&mut env, &mark);
    assert!(
        env.submit("one", json!({"job_id": "x1", "input": [1, 2, 3, 4]}))
            .await
            .ok
    );
    wait_file(&mark, Duration::from_secs(20)).await;
    env.kill(w1);
    env.spawn(&[
        "worker",
        "--workflow",
        "one",
        "--step",
        "send",
        "--exec",
        "cat",
    ]);
    let job = env.wait_end("x1", Duration::from_secs(30)).await;
    assert_eq!(
        job.state,
        JobState::Completed,
        "one failure is tolerated: {:?}",
        job.error
    );
    let send = &job.steps[0];
    assert_eq!((send.completed, send.failed), (3, 1));
    assert!(
        send.failures[0].error.contains("no answer within"),
        "{:?}",
        send.failures
    );
    assert_eq!(
        env.queued_tasks("fanjet.task.>").await,
        0,
        "the exhausted task does not stay in the work queue"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_deadline_fails_what_is_still_pending() {
    let mut env = Env::start().await;
    env.apply(
        r#"
name = "late"
[[steps]]
name = "send"
kind = "fanout"
deadline = "2s"
"#,
    )
    .await;
    env.manager();
    env.worker(Worker::new(env.nats.clone()).concurrency(8).handler(
        "late",
        "send",
        |c: TaskContext| async move {
            if c.task.index == 0 {
                tokio::time::sleep(Duration::from_secs(120)).await;
            }
            Ok(json!(null))
        },
    ));
    assert!(
        env.submit("late", json!({"job_id": "dl", "input": [0, 1, 2, 3, 4]}))
            .await
            .ok
    );
    let job = env.wait_end("dl", Duration::from_secs(20)).await;
    assert_eq!(job.state, JobState::Failed);
    assert_eq!((job.steps[0].completed, job.steps[0].failed), (4, 1));
    assert!(
        job.error
            .as_deref()
            .unwrap_or_default()
            .contains("deadline"),
        "{:?}",
        job.error
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_worker_finish_in_flight_tasks() {
    let mut env = Env::start().await;
    env.apply(&ONE_FANOUT.replace("MAX", "3").replace("1s", "10s"))
        .await;
    env.manager();
    let dir = tempfile::tempdir().unwrap();
    let mark = dir.path().join("started");
    let slow = format!("touch {}; sleep 1; cat", mark.display());
    let mut worker = common::fanjet_command(
        &env.url(),
        &[
            "worker",
            "--workflow",
            "one",
            "--step",
            "send",
            "--concurrency",
            "2",
            "--exec",
            &slow,
        ],
    )
    .spawn()
    .unwrap();
    assert!(
        env.submit("one", json!({"job_id": "t1", "input": [1, 2]}))
            .await
            .ok
    );
    wait_file(&mark, Duration::from_secs(20)).await;
    let term = std::process::Command::new("kill")
        .args(["-TERM", &worker.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let status = tokio::task::spawn_blocking(move || worker.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "worker exits cleanly: {status:?}");
    let job = env.wait_end("t1", Duration::from_secs(10)).await;
    assert_eq!(job.state, JobState::Completed, "{:?}", job.error);
    assert_eq!(
        job.steps[0].retries, 0,
        "in-flight tasks finished; nothing was redelivered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subjobs_whose_tasks_vanished_fail_instead_of_hanging() {
    let mut env = Env::start().await;
    env.apply(&ONE_FANOUT.replace("MAX", "3").replace("\"1\"", "\"0\""))
        .await;
    env.manager_with(fanjet::manager::ManagerOptions {
        stall_after: Duration::from_secs(1),
        ..Default::default()
    });
    assert!(
        env.submit("one", json!({"job_id": "lost-1", "input": [1, 2, 3]}))
            .await
            .ok
    );
    env.wait_for("lost-1", Duration::from_secs(10), "tasks dispatched", |j| {
        j.steps[0].dispatched == 3
    })
    .await;
    // No worker ever runs; an operator purges the queue.
    env.nats.task_queue("lost-1").purge().await.unwrap();
    let job = env.wait_end("lost-1", Duration::from_secs(20)).await;
    assert_eq!(job.state, JobState::Failed);
    assert_eq!(job.steps[0].failed, 3);
    assert!(
        job.error.as_deref().unwrap_or_default().contains("lost"),
        "{:?}",
        job.error
    );
}

/// Runs a manager in this process until each of `jobs` (of workflow
/// "one", three subjobs, no worker) has its tasks dispatched, then stops it
/// gracefully.
async fn dispatched_then_stopped(
    env: &Env,
    options: &fanjet::manager::ManagerOptions,
    jobs: &[&str],
) {
    let stop = CancellationToken::new();
    let manager = tokio::spawn(fanjet::manager::run(
        env.nats.clone(),
        options.clone(),
        stop.clone(),
    ));
    for id in jobs {
        assert!(
            env.submit("one", json!({"job_id": id, "input": [1, 2, 3]}))
                .await
                .ok
        );
        env.wait_for(id, Duration::from_secs(10), "tasks dispatched", |j| {
            j.steps[0].dispatched == 3
        })
        .await;
    }
    stop.cancel();
    manager.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_neighbour_does_not_hide_a_jobs_lost_tasks() {
    use fanjet::protocol::{manager_consumer, partition, Event, SubjobCompleted};
    let env = Env::start().await;
    env.apply(&ONE_FANOUT.replace("MAX", "3").replace("\"1\"", "\"0\""))
        .await;
    let options = fanjet::manager::ManagerOptions {
        stall_after: Duration::from_secs(1),
        tick: Duration::from_millis(200),
        ..Default::default()
    };
    // Two jobs on one partition, no worker: their tasks wait in the queue.
    let p = partition("lost-2");
    let busy = (0..)
        .map(|n| format!("busy-{n}"))
        .find(|id| partition(id) == p)
        .unwrap();
    dispatched_then_stopped(&env, &options, &["lost-2", busy.as_str()]).await;
    // While no manager runs, an operator drops one job's tasks and the
    // other piles up a backlog of events, as a million-subjob job does.
    env.nats
        .task_queue("lost-2")
        .purge()
        .filter(fanjet::protocol::job_tasks_filter("lost-2"))
        .await
        .unwrap();
    let flood = 200_000;
    let event = Event::SubjobCompleted(SubjobCompleted {
        run: 0,
        job_id: busy.clone(),
        step_index: 0,
        index: 0,
        attempt: 1,
        result: json!(null),
        duration_ms: 1,
        token: env.token(&busy, 0, 0),
    });
    let body = fanjet::protocol::encode_json(&event).unwrap();
    // Acks awaited a thousand at a time: the context holds back a publish
    // while 4,096 wait.
    for _ in 0..flood / 1000 {
        let mut acks = Vec::with_capacity(1000);
        for _ in 0..1000 {
            let ack = env.nats.js.publish(event.subject(), body.clone()).await;
            acks.push(ack.unwrap());
        }
        for ack in acks {
            ack.await.unwrap();
        }
    }
    // A manager starts on the backlog.
    let second = CancellationToken::new();
    let _stop = second.clone().drop_guard();
    tokio::spawn(fanjet::manager::run(env.nats.clone(), options, second));
    let started = Instant::now();
    let job = env.wait_end("lost-2", Duration::from_secs(60)).await;
    let took = started.elapsed();
    assert_eq!(job.state, JobState::Failed);
    assert_eq!(job.steps[0].failed, 3);
    let info = env
        .nats
        .cell_log(fanjet::protocol::cell(p))
        .clone()
        .consumer_info(manager_consumer(p))
        .await
        .unwrap();
    let backlog = info.num_pending + info.num_ack_pending as u64;
    eprintln!("lost job failed {took:?} after the manager started; {backlog} events of its neighbour still waited");
    assert!(
        backlog > 0,
        "the lost job ended only once its neighbour's events were all read ({took:?})"
    );
}

/// A subjob whose outcome is in the log never counts as lost, even when
/// the partition's reader went past it unapplied (a delivery lost without
/// a gap in its numbering): before the lost-task check fails a job's
/// subjobs, it reads the job's outcomes back from the log. One that truly
/// has none still fails. Two shapes: a later outcome of the job was applied
/// (it used to fail the one passed over as lost), and none was (the job
/// used to wait forever for an outcome "on its way").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outcome_the_reader_went_past_is_read_back_before_subjobs_count_as_lost() {
    use fanjet::protocol::{manager_consumer, partition, Event, SubjobCompleted};
    let env = Env::start().await;
    env.apply(&ONE_FANOUT.replace("MAX", "3")).await;
    let options = fanjet::manager::ManagerOptions {
        stall_after: Duration::from_secs(1),
        tick: Duration::from_millis(200),
        ..Default::default()
    };
    let jobs = ["past-1", "past-2"];
    dispatched_then_stopped(&env, &options, &jobs).await;
    // A worker ran subjobs 0 and 1 of each job and reported them; the
    // tasks of subjob 2 were dropped unrun.
    let outcome = |job_id: &str, index| {
        Event::SubjobCompleted(SubjobCompleted {
            run: 0,
            job_id: job_id.into(),
            step_index: 0,
            index,
            attempt: 1,
            result: json!(index),
            duration_ms: 1,
            token: env.token(job_id, 0, index),
        })
    };
    for id in jobs {
        env.nats
            .task_queue(id)
            .purge()
            .filter(fanjet::protocol::job_tasks_filter(id))
            .await
            .unwrap();
    }
    publish(&env, outcome("past-1", 0)).await;
    publish(&env, outcome("past-2", 0)).await;
    publish(&env, outcome("past-2", 1)).await;
    // Those went by the manager's readers unread; past-1's subjob 1 is
    // read as it should be.
    for id in jobs {
        let taken = take_deliveries(
            &env,
            job_cell(id),
            &manager_consumer(partition(id)),
            1000,
            Taken::AckAll,
        )
        .await;
        assert!(taken >= 1, "{id}'s outcomes were not waiting");
    }
    publish(&env, outcome("past-1", 1)).await;

    let second = CancellationToken::new();
    let _stop = second.clone().drop_guard();
    tokio::spawn(fanjet::manager::run(env.nats.clone(), options, second));
    for id in jobs {
        let job = env.wait_end(id, Duration::from_secs(30)).await;
        assert_eq!(
            (job.steps[0].completed, job.steps[0].failed),
            (2, 1),
            "{id}: {:?}",
            job.steps[0].failures
        );
        assert_eq!(job.state, JobState::Completed, "{id}: {:?}", job.error);
    }
    assert!(
        fanjet::metrics::Metrics::get()
            .manager_recovered_outcomes
            .get()
            >= 3
    );
}

/// What becomes of deliveries taken away from a log reader.
#[derive(Clone, Copy, PartialEq)]
enum Taken {
    /// Dropped, as a connection that died mid-delivery would.
    Dropped,
    /// Acknowledged unread (acknowledge-all on the last), as a reader that
    /// went past them without noticing would.
    AckAll,
}

/// Takes up to `n` deliveries of `consumer` on the event log of `cell` away
/// from its reader; returns how many it took. The readers' consumers
/// deliver to one pinned client: this takes the pin for one pull, then lets
/// it go.
async fn take_deliveries(env: &Env, cell: u32, consumer: &str, n: usize, then: Taken) -> usize {
    use futures::StreamExt;
    let client = async_nats::connect(env.url()).await.expect("connect");
    let stream = env
        .nats
        .js
        .get_stream(fanjet::protocol::events_stream(cell))
        .await
        .expect("stream");
    stream
        .unpin_consumer(consumer, "reader")
        .await
        .expect("unpin");
    let inbox = client.new_inbox();
    let mut sub = client.subscribe(inbox.clone()).await.expect("subscribe");
    let request = json!({"batch": n, "expires": 2_000_000_000u64, "group": "reader"});
    client
        .publish_with_reply(
            format!(
                "$JS.API.CONSUMER.MSG.NEXT.{}.{consumer}",
                fanjet::protocol::events_stream(cell)
            ),
            inbox,
            serde_json::to_vec(&request).expect("json").into(),
        )
        .await
        .expect("pull request");
    let mut taken = 0;
    let mut last = None;
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(2500), sub.next()).await {
        // Status messages (timeouts) carry no reply subject; deliveries do.
        if m.reply.is_some() {
            taken += 1;
            last = m.reply;
        }
        if taken == n {
            break;
        }
    }
    if let (Taken::AckAll, Some(reply)) = (then, last) {
        client
            .request(reply, "+ACK".into())
            .await
            .expect("acknowledged");
    }
    stream
        .unpin_consumer(consumer, "reader")
        .await
        .expect("unpin");
    taken
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_lost_on_the_way_to_the_manager_or_statistics_are_read_again() {
    let mut env = Env::start().await;
    env.one_fanout("gaps", "timeout = \"5s\"", 8, Duration::from_millis(20))
        .await;
    env.manager();
    env.serve(Default::default()).await;
    let holes = |reader: &str| {
        fanjet::metrics::Metrics::get()
            .log_holes
            .with_label_values(&[reader])
            .get()
    };
    let before = (holes("manager"), holes("statistics"));
    // Long enough (about 5 s) to be running while the thief tries.
    let input: Vec<u32> = (0..2000).collect();
    assert!(
        env.submit("gaps", json!({"job_id": "g1", "input": input}))
            .await
            .ok
    );
    env.wait_for("g1", Duration::from_secs(30), "50 subjobs done", |j| {
        j.steps[0].completed >= 50
    })
    .await;
    // Deliveries taken while the job runs never reach their reader; under
    // acknowledge-all, the reader's next ack would cover them for good.
    // After an unpin, the reader's own next pull may win the pin back
    // first: try again (a busy machine lost three rounds in a row once).
    let mut stolen = (0, 0);
    for _ in 0..10 {
        if stolen.0 > 0 && stolen.1 > 0 {
            break;
        }
        if stolen.0 == 0 {
            stolen.0 += take_deliveries(
                &env,
                job_cell("g1"),
                &fanjet::protocol::manager_consumer(fanjet::protocol::partition("g1")),
                5,
                Taken::Dropped,
            )
            .await;
        }
        if stolen.1 == 0 {
            stolen.1 += take_deliveries(
                &env,
                job_cell("g1"),
                fanjet::protocol::STATS_CONSUMER,
                5,
                Taken::Dropped,
            )
            .await;
        }
    }
    assert!(
        stolen.0 > 0 && stolen.1 > 0,
        "nothing was taken: {stolen:?}"
    );

    let job = env.wait_end("g1", Duration::from_secs(60)).await;
    assert_eq!(job.state, JobState::Completed, "{:?}", job.error);
    assert_eq!((job.steps[0].completed, job.steps[0].failed), (2000, 0));
    assert!(
        holes("manager") > before.0,
        "the manager never noticed the missing deliveries"
    );
    let start = Instant::now();
    loop {
        let stats = fanjet::nats::store::stats(&env.nats, "g1")
            .await
            .expect("stats");
        let counts = stats
            .as_ref()
            .and_then(|s| s.steps.first())
            .map(|s| (s.completed, s.failed));
        if counts == Some((2000, 0)) && stats.is_some_and(|s| s.outcome.is_some()) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "statistics never counted every subjob: {counts:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(holes("statistics") > before.1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_server_killed_and_restarted_mid_job_loses_nothing() {
    let mut env = Env::start().await;
    env.one_fanout(
        "rs",
        "timeout = \"3s\"\nmax_attempts = 20\nmax_in_flight = 100",
        16,
        Duration::from_millis(20),
    )
    .await;
    env.manager();
    let input: Vec<u32> = (0..2000).collect();
    assert!(
        env.submit("rs", json!({"job_id": "r1", "input": input}))
            .await
            .ok
    );
    env.wait_for("r1", Duration::from_secs(30), "300 subjobs done", |j| {
        j.steps[0].completed >= 300
    })
    .await;
    // SIGKILL the server, then start it again on the same port and store:
    // the manager, the worker and this test's client reconnect by themselves.
    let (store, port) = (env.server.store().to_path_buf(), env.server.port());
    let connects = fanjet::nats::connect::connects(&env.nats.client);
    env.server.kill();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _again = tokio::task::spawn_blocking(move || {
        fanjet::nats::server::NatsServer::start(Some(store), Some(port))
    })
    .await
    .expect("join")
    .expect("the server starts again on its store");
    // What a partition session watches for, to start again rather than
    // wait on requests the lost connection will never answer.
    tokio::time::timeout(
        Duration::from_secs(30),
        fanjet::nats::connect::reconnected(&env.nats.client, connects),
    )
    .await
    .expect("a connection made again is seen as such");
    let job = env.wait_end("r1", Duration::from_secs(90)).await;
    assert_eq!(job.state, JobState::Completed, "{:?}", job.error);
    assert_eq!(
        (
            job.steps[0].total,
            job.steps[0].completed,
            job.steps[0].failed
        ),
        (2000, 2000, 0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submission_nats_cannot_take_for_a_moment_is_unavailable_not_internal() {
    let mut env = Env::start().await;
    env.one_fanout("brief", "", 4, Duration::from_millis(1))
        .await;
    env.manager();
    assert!(
        env.submit("brief", json!({"job_id": "warm-up", "input": [1]}))
            .await
            .ok
    );
    // The event log is gone for a moment, as while a cluster elects its
    // leader: "no stream found for given subject".
    env.nats
        .js
        .delete_stream(fanjet::protocol::events_stream(job_cell("brief-1")))
        .await
        .unwrap();
    let reply = env
        .submit("brief", json!({"job_id": "brief-1", "input": [1, 2]}))
        .await;
    assert!(!reply.ok);
    let error = reply.error.expect("an error");
    assert_eq!(
        error.code,
        fanjet::protocol::RejectCode::Unavailable,
        "{error:?}"
    );
    assert!(
        fanjet::nats::store::get(&env.nats, "brief-1")
            .await
            .unwrap()
            .is_none(),
        "nothing was recorded under the id"
    );
    // Back, and the same submission goes through.
    let client = async_nats::connect(env.url()).await.unwrap();
    fanjet::nats::Nats::ensure(client).await.unwrap();
    let sub = fanjet::protocol::Submission {
        job_id: Some("brief-1".into()),
        customer: None,
        input: json!([1, 2]),
        priority: None,
    };
    let reply = fanjet::client::submit(&env.nats.client, "brief", &sub)
        .await
        .unwrap();
    assert!(reply.ok && !reply.duplicate, "{reply:?}");
    let job = env.wait_end("brief-1", Duration::from_secs(30)).await;
    assert_eq!(job.state, JobState::Completed);
}

/// Publishes an event as any client would (no message id: the stream keeps
/// repeats).
async fn publish(env: &Env, event: fanjet::protocol::Event) {
    env.nats
        .js
        .publish(
            event.subject(),
            fanjet::protocol::encode_json(&event).expect("json"),
        )
        .await
        .expect("publish")
        .await
        .expect("stored");
}

/// Every reader of the log counts what the job record counts. The
/// statistics (their record and their Prometheus counters) count one
/// outcome per subjob while its step runs, as the manager does (here both
/// outcomes of one subjob and a repeat of another), and the manager's own
/// decisions (a step deadline; lost tasks) are `SubjobsFailed` events in
/// the log.
/// Statistics the consumer cannot read back for a job that ended (a
/// replica that has none answered, or the record was lost) are seeded
/// from the job's record, figures and outcome included: a late outcome of
/// the ended job then counts nothing, as the manager counts it. Before,
/// the seed was blank and counted the late outcome as a running step's,
/// and the statistics never matched the record again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statistics_seeded_for_an_ended_job_count_no_late_outcome() {
    use fanjet::protocol::{Event, SubjobCompleted};
    let mut env = Env::start().await;
    env.apply(&ONE_FANOUT.replace("MAX", "3")).await;
    env.manager();
    env.serve(Default::default()).await;
    env.worker(echo_worker(&env));
    assert!(
        env.submit("one", json!({"job_id": "late-1", "input": [1, 2, 3]}))
            .await
            .ok
    );
    let job = env.wait_end("late-1", Duration::from_secs(30)).await;
    assert_eq!(job.state, JobState::Completed, "{:?}", job.error);
    let stats_of = || async {
        fanjet::nats::store::stats(&env.nats, "late-1")
            .await
            .expect("read statistics")
    };
    let start = Instant::now();
    while stats_of().await.is_none_or(|s| s.outcome.is_none()) {
        assert!(start.elapsed() < Duration::from_secs(20), "no statistics");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The record goes, then a late outcome (a second attempt of subjob 0,
    // reported after the job ended) makes the consumer start one afresh.
    env.nats.stats.purge("late-1").await.unwrap();
    publish(
        &env,
        Event::SubjobCompleted(SubjobCompleted {
            run: 0,
            job_id: "late-1".into(),
            step_index: 0,
            index: 0,
            attempt: 2,
            result: json!(0),
            duration_ms: 1,
            token: env.token("late-1", 0, 0),
        }),
    )
    .await;
    let start = Instant::now();
    let stats = loop {
        if let Some(s) = stats_of().await {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "never written again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(stats.outcome.as_deref(), Some("completed"));
    let counted: Vec<(u64, u64)> = stats
        .steps
        .iter()
        .map(|s| (s.completed, s.failed))
        .collect();
    assert_eq!(counted, [(3, 0)], "the late outcome counted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statistics_count_what_the_job_record_counts() {
    use fanjet::protocol::{Event, SubjobCompleted, SubjobFailed};
    let mut env = Env::start().await;
    let fanout = |name: &str, extra: &str| {
        format!("name = \"{name}\"\n[[steps]]\nname = \"send\"\nkind = \"fanout\"\ntolerate_failures = \"100%\"\n{extra}\n")
    };
    env.apply(&fanout("agree", "")).await;
    env.apply(&fanout("agree_late", "deadline = \"2s\"")).await;
    env.apply(&fanout("agree_lost", "")).await;
    env.manager_with(fanjet::manager::ManagerOptions {
        stall_after: Duration::from_secs(1),
        ..Default::default()
    });
    env.serve(Default::default()).await;
    // No worker runs: the outcomes are published by hand, the deadline
    // passes, and the lost job's tasks are purged.
    for (workflow, id, n) in [
        ("agree", "ag-1", 4),
        ("agree_late", "ag-2", 5),
        ("agree_lost", "ag-3", 3),
    ] {
        let input: Vec<u32> = (0..n).collect();
        assert!(
            env.submit(workflow, json!({"job_id": id, "input": input}))
                .await
                .ok
        );
        env.wait_for(id, Duration::from_secs(10), "dispatched", |j| {
            j.steps[0].dispatched == n as u64
        })
        .await;
    }
    let done = |index: u64| {
        Event::SubjobCompleted(SubjobCompleted {
            run: 0,
            job_id: "ag-1".into(),
            step_index: 0,
            index,
            attempt: 1,
            result: json!(index),
            duration_ms: 3,
            token: env.token("ag-1", 0, index),
        })
    };
    publish(
        &env,
        Event::SubjobFailed(SubjobFailed {
            run: 0,
            job_id: "ag-1".into(),
            step_index: 0,
            index: 0,
            attempt: 2,
            error: "gave up".into(),
            token: env.token("ag-1", 0, 0),
        }),
    )
    .await;
    for index in [0, 1, 1, 2, 3] {
        publish(&env, done(index)).await;
    }
    env.nats
        .task_queue("ag-3")
        .purge()
        .filter(fanjet::protocol::job_tasks_filter("ag-3"))
        .await
        .expect("purge");

    let metrics = fanjet::metrics::Metrics::get();
    for (workflow, id, completed, failed, decision) in [
        ("agree", "ag-1", 3, 1, None),
        ("agree_late", "ag-2", 0, 5, Some("deadline")),
        ("agree_lost", "ag-3", 0, 3, Some("lost")),
    ] {
        let job = env.wait_end(id, Duration::from_secs(30)).await;
        let step = &job.steps[0];
        assert_eq!((step.completed, step.failed), (completed, failed), "{id}");
        let start = Instant::now();
        let stats = loop {
            let stats = fanjet::nats::store::stats(&env.nats, id)
                .await
                .expect("stats");
            if let Some(s) = stats.filter(|s| s.outcome.is_some()) {
                break s;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "{id}: statistics never saw the end"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let counted = &stats.steps[0];
        assert_eq!(
            (
                counted.total,
                counted.completed,
                counted.failed,
                counted.retries
            ),
            (step.total, step.completed, step.failed, step.retries),
            "{id}: statistics differ from the record"
        );
        let labels = [workflow, "send"];
        assert_eq!(
            (
                metrics.subjobs_completed.with_label_values(&labels).get(),
                metrics.subjobs_failed.with_label_values(&labels).get()
            ),
            (completed, failed),
            "{id}: the Prometheus counters count each subjob once"
        );
        let decisions: Vec<Value> = env
            .events(id)
            .await
            .into_iter()
            .filter(|e| e["type"] == "SubjobsFailed")
            .collect();
        match decision {
            None => assert!(decisions.is_empty(), "{id}: {decisions:?}"),
            Some(reason) => {
                assert_eq!(decisions.len(), 1, "{id}: {decisions:?}");
                assert_eq!(decisions[0]["reason"], reason, "{id}");
            }
        }
    }
}

/// A handler that hangs on its first attempt keeps its task alive (its
/// worker extends the ack deadline while it runs); the step's
/// `run_timeout` abandons the attempt, and the retry completes the job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_hangs_is_retried_after_the_run_timeout() {
    let mut env = Env::start().await;
    env.apply(
        r#"
name = "hangs"
[[steps]]
name = "send"
kind = "fanout"
timeout = "2s"
run_timeout = "1s"
backoff = ["100ms"]
"#,
    )
    .await;
    env.manager();
    env.worker(Worker::new(env.nats.clone()).concurrency(4).handler(
        "hangs",
        "send",
        |c: TaskContext| async move {
            if c.task.index == 1 && c.attempt == 1 {
                std::future::pending::<()>().await;
            }
            Ok(json!(c.attempt))
        },
    ));
    assert!(
        env.submit("hangs", json!({"job_id": "h1", "input": [0, 1, 2]}))
            .await
            .ok
    );
    let job = env.wait_end("h1", Duration::from_secs(30)).await;
    assert_eq!(job.state, JobState::Completed, "{:?}", job.error);
    assert_eq!(
        (job.steps[0].completed, job.steps[0].retries),
        (3, 1),
        "the hung attempt was abandoned and retried once"
    );
}

/// A reader's consumer made by an earlier version (no priority group) is
/// taken over as it stands: reading goes on after its ack floor, and the
/// consumer pins one client from then on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_takes_over_a_consumer_an_earlier_version_made() {
    use async_nats::jetstream::consumer::{pull, AckPolicy, PriorityPolicy};
    use futures::StreamExt;
    let env = Env::start().await;
    let subject = "fanjet.ev.00.upgrade.cancel_requested";
    let mut seqs = Vec::new();
    for i in 0..5 {
        let ack = env
            .nats
            .js
            .publish(subject, format!("{{\"n\": {i}}}").into())
            .await
            .expect("publish")
            .await
            .expect("stored");
        seqs.push(ack.sequence);
    }
    let old = env
        .nats
        .cell_log(0)
        .create_consumer(pull::Config {
            durable_name: Some("upgrade-test".into()),
            filter_subjects: vec![subject.into()],
            ack_policy: AckPolicy::All,
            ..Default::default()
        })
        .await
        .expect("an earlier version's consumer");
    let mut batch = old.fetch().max_messages(3).messages().await.expect("fetch");
    let mut last = None;
    while let Some(m) = batch.next().await {
        last = Some(m.expect("message"));
    }
    last.expect("three delivered")
        .double_ack()
        .await
        .expect("ack");

    let mut reader = fanjet::nats::log::Reader::open(
        &env.nats,
        0,
        "upgrade-test",
        vec![subject.into()],
        10,
        "manager",
        None,
    )
    .await
    .expect("opened over the old consumer");
    let first = reader.next_batch().await.expect("batch").messages;
    assert_eq!(
        fanjet::nats::log::stream_seq(&first[0]),
        seqs[3],
        "goes on after the ack floor"
    );
    let info = env
        .nats
        .cell_log(0)
        .clone()
        .consumer_info("upgrade-test")
        .await
        .expect("info");
    assert_eq!(info.config.priority_policy, PriorityPolicy::PinnedClient);
}

/// Whether the job's active key is stored.
async fn listed(env: &Env, job_id: &str) -> bool {
    env.nats
        .pending_of(job_id)
        .get(fanjet::protocol::active_key(job_id))
        .await
        .expect("read the pending bucket")
        .is_some()
}

/// A manager process driving `job_id`, a job of three subjobs all
/// dispatched and waiting for a worker (none runs yet).
async fn running_without_a_worker(env: &mut Env, job_id: &str) -> usize {
    env.apply(&ONE_FANOUT.replace("MAX", "3")).await;
    let manager = env.spawn(&["manager"]);
    assert!(
        env.submit("one", json!({"job_id": job_id, "input": [1, 2, 3]}))
            .await
            .ok
    );
    env.wait_for(job_id, Duration::from_secs(20), "running", |j| {
        j.state == JobState::Running && j.steps[0].dispatched == 3
    })
    .await;
    manager
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manager_loads_the_running_jobs_by_their_active_keys_and_once_scans_an_older_store() {
    let mut env = Env::start().await;
    let m1 = running_without_a_worker(&mut env, "act-1").await;
    assert!(
        listed(&env, "act-1").await,
        "a running job has its active key"
    );
    env.kill(m1);

    // As an earlier version left the store: no active keys, no scan mark.
    let p = fanjet::protocol::partition("act-1");
    for key in [
        fanjet::protocol::active_key("act-1"),
        fanjet::protocol::active_scanned_key(p),
    ] {
        env.nats.pending_of("act-1").purge(&key).await.unwrap();
    }
    // And a key whose job is not stored yet (a crash came between its key
    // and its first record): it stays, and changes nothing.
    env.nats
        .pending_of("ghost")
        .put(fanjet::protocol::active_key("ghost"), Default::default())
        .await
        .unwrap();
    let gp = fanjet::protocol::partition("ghost");
    assert_ne!(
        gp, p,
        "the ghost's partition is not act-1's (which is to be scanned)"
    );
    env.nats
        .pending_of("ghost")
        .put(fanjet::protocol::active_scanned_key(gp), Default::default())
        .await
        .unwrap();

    env.spawn(&["manager"]);
    env.worker(echo_worker(&env));
    let job = env.wait_end("act-1", Duration::from_secs(30)).await;
    assert_eq!(job.state, JobState::Completed, "{:?}", job.error);
    assert_eq!(job.steps[0].completed, 3);
    assert!(
        env.nats
            .pending_of("act-1")
            .get(fanjet::protocol::active_scanned_key(p))
            .await
            .unwrap()
            .is_some(),
        "the partition was scanned once and marked"
    );
    let start = Instant::now();
    while listed(&env, "act-1").await {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "an ended job's key is left"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(listed(&env, "ghost").await);
}

/// A running job the listing of its partition's active keys misses (as a
/// listing read from a replica behind its leader can) is still driven: the
/// first event that names it has the manager read its record from the
/// bucket's leader and hold it, instead of acknowledging its outcomes
/// unapplied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_job_missing_from_the_listing_is_held_at_its_first_event() {
    let mut env = Env::start().await;
    let m1 = running_without_a_worker(&mut env, "miss-1").await;
    env.kill(m1);
    // The listing will not have it; the partition counts as scanned.
    let p = fanjet::protocol::partition("miss-1");
    env.nats
        .pending_of("miss-1")
        .purge(fanjet::protocol::active_key("miss-1"))
        .await
        .unwrap();
    assert!(env
        .nats
        .pending_of("miss-1")
        .get(fanjet::protocol::active_scanned_key(p))
        .await
        .unwrap()
        .is_some());

    env.spawn(&["manager"]);
    env.worker(echo_worker(&env));
    let job = env.wait_end("miss-1", Duration::from_secs(30)).await;
    assert_eq!(job.state, JobState::Completed, "{:?}", job.error);
    assert_eq!((job.steps[0].completed, job.steps[0].failed), (3, 0));
}

/// A session whose publishes failed leaves none of them to the next: once
/// the work queue takes tasks again, the job goes on. (The acks a failed
/// session still awaited used to stay with the partition, each failing one
/// later session 2 s apart: after a node's loss a job stalled for minutes,
/// `tests/cluster.rs` in about 1 run of 30.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_session_leaves_no_failed_publish_to_the_next() {
    use async_nats::jetstream::stream::DiscardPolicy;
    let mut env = Env::start().await;
    env.apply(
        "name = \"one\"\n[[steps]]\nname = \"send\"\nkind = \"fanout\"\ntimeout = \"5s\"\nmax_in_flight = 100\n",
    )
    .await;
    // The job's work queue takes 5 tasks and refuses the rest, so each
    // session of its partition publishes 100 and fails on the 6th ack.
    let queue = env.nats.task_queue("refused-1").clone();
    let original = queue.get_info().await.expect("work queue").config;
    let mut refusing = original.clone();
    refusing.max_messages = 5;
    refusing.discard = DiscardPolicy::New;
    env.nats
        .js
        .update_stream(&refusing)
        .await
        .expect("limit the work queue");
    env.manager_with(fanjet::manager::ManagerOptions {
        tick: Duration::from_millis(200),
        queue_ahead: None,
        ..Default::default()
    });
    let items: Vec<u64> = (0..300).collect();
    assert!(
        env.submit("one", json!({"job_id": "refused-1", "input": items}))
            .await
            .ok
    );
    let start = Instant::now();
    while queue
        .clone()
        .get_info()
        .await
        .expect("work queue")
        .state
        .messages
        < 5
    {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no task was queued"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A few sessions fail (0.2, 0.4, 0.8 s apart, then 2 s).
    tokio::time::sleep(Duration::from_secs(3)).await;
    env.nats
        .js
        .update_stream(&original)
        .await
        .expect("lift the limit");
    env.worker(echo_worker(&env));
    // The next session goes on within its back-off (2 s); 300 echoes take
    // well under a second. Each failure left over would cost 2 s, and
    // there are hundreds.
    let job = env.wait_end("refused-1", Duration::from_secs(30)).await;
    assert_eq!(job.state, JobState::Completed, "{:?}", job.error);
    assert_eq!((job.steps[0].completed, job.steps[0].failed), (300, 0));
}

/// A session opening its partition's reader, and a job's first dispatch
/// making sure of its step's consumer, ask no one to create a consumer that
/// is already as wanted: creating asks the cluster's JetStream meta leader,
/// and after the loss of the node leading it every session of every cell
/// waited for its election (4-9 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_already_as_wanted_are_not_created_again() {
    use futures::StreamExt;
    let env = Env::start().await;
    let wf = env
        .apply(
            "name = \"again\"\n[[steps]]\nname = \"send\"\nkind = \"fanout\"\ntimeout = \"5s\"\n",
        )
        .await;
    let mut creates = env
        .nats
        .client
        .subscribe("$JS.API.CONSUMER.>")
        .await
        .expect("subscribe");
    env.nats.client.flush().await.expect("flush");
    for _ in 0..3 {
        let reader = fanjet::nats::log::Reader::open(
            &env.nats,
            0,
            "again-test",
            vec!["fanjet.ev.00.again.>".into()],
            10,
            "manager",
            None,
        )
        .await
        .expect("reader");
        drop(reader);
        env.nats
            .ensure_cell_step_consumer(0, &wf.name, &wf.steps[0])
            .await
            .expect("step consumer");
    }
    env.nats.client.flush().await.expect("flush");
    let mut made = Vec::new();
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(500), creates.next()).await {
        if m.subject.contains(".CREATE.") {
            made.push(m.subject.to_string());
        }
    }
    // The step's consumer was made when the workflow was applied; the
    // reader's, at its first opening.
    assert_eq!(
        made,
        ["$JS.API.CONSUMER.CREATE.FANJET_EVENTS_0.again-test"],
        "created once each"
    );
}

/// A publish that finds no stream (its leader lost and another not yet
/// elected: "no stream found", as in a chaos run) is sent again under its
/// message id until the stream takes it, and is stored once; the
/// manager's tasks and events go this way. Taken as final, it failed the
/// session at the first answer. A re-send the fence forbids is not made.
#[tokio::test]
async fn a_publish_that_finds_no_stream_is_sent_again_until_stored() {
    use async_nats::jetstream::message::PublishMessage;
    use async_nats::jetstream::stream;
    use fanjet::nats::leases::Fenced;
    use fanjet::nats::publish::{confirmed, ConfirmError};

    let env = Env::start().await;
    let js = env.nats.js.clone();
    let msg = |id: &str| PublishMessage::build().payload("x".into()).message_id(id);
    let create = async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        js.create_stream(stream::Config {
            name: "PROBE".into(),
            subjects: vec!["probe.>".into()],
            ..Default::default()
        })
        .await
        .unwrap()
    };
    let sent = msg("probe-1");
    let first = js.send_publish("probe.1", sent.clone()).await.unwrap();
    let (ack, mut probe) = tokio::join!(confirmed(&js, "probe.1", &sent, first, || Ok(())), create);
    let ack = ack.expect("stored once the stream is there");
    assert!(!ack.duplicate);
    assert_eq!(probe.info().await.unwrap().state.messages, 1);

    // Fenced: the first answer is not taken as final, and nothing is sent
    // again.
    let sent = msg("probe-2");
    let first = js.send_publish("nowhere.2", sent.clone()).await.unwrap();
    let fenced = confirmed(&js, "nowhere.2", &sent, first, || Err(Fenced)).await;
    assert!(matches!(fenced, Err(ConfirmError::Fenced(_))), "{fenced:?}");
}

/// The server's count of messages received from clients (`/varz`).
async fn in_msgs(monitor: &str) -> u64 {
    let varz: Value = reqwest::get(format!("{monitor}/varz"))
        .await
        .expect("monitoring endpoint")
        .json()
        .await
        .expect("varz JSON");
    varz["in_msgs"].as_u64().expect("in_msgs")
}

/// A step consumer that answers no pull (while it elects a leader after a
/// node's loss, its pulls are refused at once: 503, no responders) is
/// asked again after growing pauses. Asked again at once, one worker
/// sent over 3,000 pulls a second in a chaos run, to the servers every
/// other cell was waiting on.
#[tokio::test]
async fn a_worker_does_not_flood_a_consumer_that_refuses_its_pulls() {
    use fanjet::nats::server::NatsServer;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
        .to_string();
    let monitor = format!("http://127.0.0.1:{port}");
    let server =
        tokio::task::spawn_blocking(move || NatsServer::start_with(None, None, &["-m", &port]))
            .await
            .expect("join")
            .unwrap_or_else(|e| panic!("this test needs a real nats-server: {e}"));
    let client = async_nats::connect(server.url()).await.expect("connect");
    let nats = fanjet::nats::Nats::ensure(client).await.expect("ensure");
    let wf =
        fanjet::protocol::Workflow::from_toml(&ONE_FANOUT.replace("MAX", "3")).expect("workflow");
    nats.apply_workflow(&wf).await.expect("apply");
    let cancel = CancellationToken::new();
    let worker = Worker::new(nats.clone()).handler("one", "send", |c: TaskContext| async move {
        Ok(c.task.item)
    });
    let running = tokio::spawn(worker.run(cancel.clone()));
    // Once the worker waits on cell 0's consumer, the consumer goes.
    let name = fanjet::protocol::step_consumer("one", "send");
    let queue = nats.tasks[0].clone();
    let waited = Instant::now();
    loop {
        let info = queue.consumer_info(&name).await.expect("consumer info");
        if info.num_waiting > 0 {
            break;
        }
        assert!(
            waited.elapsed() < Duration::from_secs(20),
            "the worker never pulled"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    queue.delete_consumer(&name).await.expect("delete consumer");
    // Its pending pull ends with the consumer; the next ones are refused.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = in_msgs(&monitor).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let sent = in_msgs(&monitor).await - before;
    cancel.cancel();
    let _ = running.await;
    // Paced: a few refused pulls (50 ms doubling to 1 s), the other
    // cells' idle pulls (every 2 s) and a heartbeat or two; at once: thousands.
    assert!(sent < 100, "{sent} messages in 3 s");
}

/// A rejection is answered only once it is recorded under the submitted
/// id: while the log cannot take it (as while it elects a leader) the
/// answer is `unavailable`, and the same submission sent again is
/// rejected and recorded. Before, the rejection was answered as final
/// with nothing recorded (a chaos run's bad definition never got a
/// record), or recorded under a fresh id when reading the id's status
/// failed.
#[tokio::test]
async fn a_rejection_the_log_cannot_take_is_unavailable_then_recorded() {
    let mut env = Env::start().await;
    env.one_fanout("brief", "", 4, Duration::from_millis(1))
        .await;
    env.manager();
    env.put_dotted_workflow("dotted").await;
    assert!(
        env.submit("brief", json!({"job_id": "warm-up", "input": [1]}))
            .await
            .ok
    );
    let cell = job_cell("bad-1");
    env.nats
        .js
        .delete_stream(fanjet::protocol::events_stream(cell))
        .await
        .unwrap();
    let reply = env.submit("dotted", json!({"job_id": "bad-1"})).await;
    let error = reply.error.expect("an error");
    assert_eq!(
        error.code,
        fanjet::protocol::RejectCode::Unavailable,
        "{error:?}"
    );
    // Back: the same submission is rejected, and recorded under its id.
    let client = async_nats::connect(env.url()).await.unwrap();
    fanjet::nats::Nats::ensure(client).await.unwrap();
    let reply = env.submit("dotted", json!({"job_id": "bad-1"})).await;
    let error = reply.error.expect("an error");
    assert_eq!(
        error.code,
        fanjet::protocol::RejectCode::InvalidDefinition,
        "{error:?}"
    );
    assert_eq!(reply.job_id.as_deref(), Some("bad-1"));
    let job = env.wait_end("bad-1", Duration::from_secs(30)).await;
    assert_eq!(job.state, JobState::Rejected);
}
