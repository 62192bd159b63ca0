//! `nats/secure/server.conf` on a real nats-server: each role can do its
//! job, and no more. A worker cannot write a job's or step's completion or
//! read the log; a submitter can submit and read status for its own
//! customer only and cannot forge events; a viewer changes nothing.

mod common;

use std::future::IntoFuture;
use std::path::Path;
use std::time::Duration;

use fanjet::client;
use fanjet::manager::{self, ManagerOptions};
use fanjet::nats::connect::ConnectArgs;
use fanjet::nats::server::NatsServer;
use fanjet::nats::{Nats, WorkerNats};
use fanjet::protocol::Workflow;
use fanjet::protocol::{
    customer_submit_subject, encode_json, event_subject, tenant_job_id, Event, JobCompleted,
    StepCompleted, SubjobCompleted, SubjobFailed, Submission,
};
use fanjet::protocol::{JobState, ListRequest};
use fanjet::worker::{TaskContext, Worker};
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// The inbox prefix `nats/secure/server.conf` gives each user.
fn inbox_of(user: &str) -> String {
    match user {
        "submitter" => "_INBOX_acme".into(),
        other => format!("_INBOX_{other}"),
    }
}

async fn connect(server: &NatsServer, user: &str) -> async_nats::Client {
    let mut args = ConnectArgs::url(server.url());
    args.user = Some(user.into());
    args.password = Some(format!("{user}-secret"));
    args.inbox_prefix = Some(inbox_of(user));
    args.connect(&format!("test-{user}"))
        .await
        .unwrap_or_else(|e| panic!("{user} connects: {e}"))
}

/// A JetStream publish this user may not make: no ack, nothing stored.
async fn refused_publish(nats: &async_nats::Client, subject: String, event: &Event) -> bool {
    let js = async_nats::jetstream::new(nats.clone());
    let sent = js.publish(subject, encode_json(event).unwrap()).await;
    match sent {
        Err(_) => true,
        Ok(ack) => tokio::time::timeout(Duration::from_secs(1), ack.into_future())
            .await
            .map(|r| r.is_err())
            .unwrap_or(true),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_can_do_its_job_and_no_more() {
    // The manager role sets everything up and runs the manager.
    let env = Secure::start().await;
    let (server, admin, cancel) = (&env.server, &env.admin, env.cancel.clone());

    // The worker role binds and works.
    let worker = WorkerNats::bind(connect(server, "worker").await)
        .await
        .expect("worker binds")
        .with_user(Some("worker"));
    // It cannot list job ids: no stream info beyond the workflows bucket.
    for stream in [
        "KV_fanjet_jobs_0",
        "KV_fanjet_jobs_1",
        "KV_fanjet_jobs_2",
        "FANJET_EVENTS_0",
        "FANJET_EVENTS_1",
        "FANJET_EVENTS_2",
        "FANJET_TASKS_0",
        "FANJET_TASKS_1",
        "FANJET_TASKS_2",
        "OBJ_fanjet_results",
        "FANJET_INDEX",
        "KV_fanjet_index",
    ] {
        assert!(
            refused_request(
                &worker.client,
                &format!("$JS.API.STREAM.INFO.{stream}"),
                "{\"subjects_filter\": \">\"}"
            )
            .await,
            "a worker listed the subjects of {stream}"
        );
    }
    let create = tokio::time::timeout(
        Duration::from_secs(2),
        Nats::ensure(connect(server, "worker").await),
    )
    .await;
    assert!(
        !matches!(create, Ok(Ok(_))),
        "a worker cannot create streams"
    );
    let w = Worker::new(worker.clone())
        .concurrency(4)
        .handler("inv", "send", |c: TaskContext| async move {
            Ok(json!({"sent": c.task.item}))
        })
        .handler("invb", "send", |c: TaskContext| async move {
            Ok(json!({"sent": c.task.item}))
        });
    let wc = cancel.clone();
    let w = tokio::spawn(async move { w.run(wc).await });

    // The submitter submits for its customer and follows the job through the status service.
    // A customer binds nothing: it has no right on any stream or bucket.
    let submitter = connect(server, "submitter").await;
    let bound = tokio::time::timeout(Duration::from_secs(3), Nats::bind(submitter.clone())).await;
    assert!(
        !matches!(bound, Ok(Ok(_))),
        "a submitter found fanjet's streams"
    );
    // Nor can it list job ids: STREAM.INFO with a subjects filter is refused.
    for stream in [
        "KV_fanjet_jobs_0",
        "KV_fanjet_jobs_1",
        "KV_fanjet_jobs_2",
        "FANJET_EVENTS_0",
        "FANJET_EVENTS_1",
        "FANJET_EVENTS_2",
        "FANJET_TASKS_0",
        "FANJET_TASKS_1",
        "FANJET_TASKS_2",
        "OBJ_fanjet_results",
    ] {
        assert!(
            refused_request(
                &submitter,
                &format!("$JS.API.STREAM.INFO.{stream}"),
                "{\"subjects_filter\": \">\"}"
            )
            .await,
            "a submitter listed the subjects of {stream}"
        );
    }
    let sub = Submission {
        job_id: Some("sec-1".into()),
        customer: Some("acme".into()),
        input: json!([1, 2, 3, 4, 5]),
        priority: None,
    };
    let sec1 = tenant_job_id("acme", "sec-1");
    let reply = client::submit_as(&submitter, "inv", "acme", &sub)
        .await
        .expect("submitter submits");
    assert!(reply.ok, "{reply:?}");
    let mut done = None;
    for _ in 0..100 {
        if let Some(job) = client::status_as(&submitter, "acme", "sec-1")
            .await
            .unwrap()
        {
            if job.state.is_terminal() {
                done = Some(job);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let job = done.expect("the job ended");
    assert_eq!(job.state, JobState::Completed, "{:?}", job.error);
    assert_eq!(job.steps[0].completed, 5);
    // The worker role reports a batch's outcomes too.
    let batched = Submission {
        job_id: Some("sec-b".into()),
        ..sub.clone()
    };
    let reply = client::submit_as(&submitter, "invb", "acme", &batched)
        .await
        .expect("submitter submits");
    assert!(reply.ok, "{reply:?}");
    let job = env
        .wait(
            &tenant_job_id("acme", "sec-b"),
            "the batched job's end",
            |j| j.state.is_terminal(),
        )
        .await;
    assert_eq!(job.state, JobState::Completed, "{:?}", job.error);
    assert_eq!(job.steps[0].completed, 5);

    // Submitting without naming its customer is refused by the server, and
    // the client says so at once instead of waiting for an answer.
    let global = client::submit(&submitter, "inv", &sub).await;
    match global {
        Err(client::ClientError::Refused { subject, hint, .. }) => {
            assert_eq!(subject, "fanjet.submit.inv");
            assert!(hint.contains("--customer"), "{hint}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }

    // A submitter cannot act for another customer, read others' status, or forge events.
    let other = tokio::time::timeout(
        Duration::from_secs(1),
        submitter.request(
            customer_submit_subject("inv", "globex"),
            encode_json(&json!({})).unwrap(),
        ),
    )
    .await;
    assert!(
        !matches!(other, Ok(Ok(_))),
        "submitting for globex is refused"
    );
    let peek = tokio::time::timeout(
        Duration::from_secs(1),
        client::status_as(&submitter, "globex", &sec1),
    )
    .await;
    assert!(
        !matches!(peek, Ok(Ok(Some(_)))),
        "no status of another customer's job"
    );
    // It lists its own jobs through the listing service, and no other
    // customer's; it cannot read the index itself.
    let mut listed = Vec::new();
    for _ in 0..100 {
        let (page, _) = client::list_as(&submitter, "acme", &ListRequest::default())
            .await
            .expect("the submitter lists its jobs");
        listed = page
            .jobs
            .iter()
            .map(|j| j.job_id.clone())
            .collect::<Vec<_>>();
        if listed.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    listed.sort();
    assert_eq!(listed, vec![sec1.clone(), tenant_job_id("acme", "sec-b")]);
    let (_, counts) = client::list_as(
        &submitter,
        "acme",
        &ListRequest {
            counts: true,
            ..Default::default()
        },
    )
    .await
    .expect("the submitter counts its jobs");
    assert_eq!(counts.map(|c| c.total), Some(2));
    let others = tokio::time::timeout(
        Duration::from_secs(1),
        client::list_as(&submitter, "globex", &ListRequest::default()),
    )
    .await;
    assert!(
        !matches!(others, Ok(Ok(_))),
        "a submitter listed another customer's jobs: {others:?}"
    );
    assert!(
        refused_request(
            &submitter,
            "$JS.API.DIRECT.GET.FANJET_INDEX",
            "{\"seq\": 1, \"batch\": 10}"
        )
        .await,
        "a submitter read the job index"
    );
    let forged = Event::JobCompleted(JobCompleted {
        run: 0,
        job_id: sec1.clone(),
        workflow: "inv".into(),
        output: json!(null),
        at: 0,
    });
    assert!(
        refused_publish(&submitter, forged.subject(), &forged).await,
        "a submitter cannot write to the log"
    );
    assert!(
        refused_request(
            &submitter,
            &format!(
                "$JS.API.DIRECT.GET.KV_{jobs}.$KV.{jobs}.{sec1}",
                jobs = fanjet::protocol::jobs_bucket(fanjet::protocol::job_cell(&sec1))
            ),
            ""
        )
        .await,
        "a submitter cannot read the jobs bucket"
    );

    // A worker cannot write a job's or a step's completion, nor read the log or the jobs.
    let fake_job = Event::JobCompleted(JobCompleted {
        run: 0,
        job_id: "sec-2".into(),
        workflow: "inv".into(),
        output: json!(null),
        at: 0,
    });
    assert!(
        refused_publish(&worker.client, fake_job.subject(), &fake_job).await,
        "a worker cannot publish JobCompleted"
    );
    let fake_decision = Event::SubjobsFailed(fanjet::protocol::SubjobsFailed {
        run: 0,
        job_id: "sec-2".into(),
        step_index: 0,
        below: 1,
        reason: fanjet::protocol::AbandonReason::Lost,
        error: "forged".into(),
        at: 0,
    });
    assert!(
        refused_publish(&worker.client, fake_decision.subject(), &fake_decision).await,
        "a worker cannot fail subjobs wholesale"
    );
    let fake_step = Event::StepCompleted(StepCompleted {
        run: 0,
        job_id: "sec-2".into(),
        workflow: "inv".into(),
        step: "send".into(),
        step_index: 0,
        ok: true,
        total: 1,
        completed: 1,
        failed: 0,
        retries: 0,
        started_at: 0,
        at: 0,
    });
    assert!(
        refused_publish(&worker.client, fake_step.subject(), &fake_step).await,
        "a worker cannot publish StepCompleted"
    );
    for (subject, body, what) in [
        (
            "$JS.API.STREAM.MSG.GET.FANJET_EVENTS_0".to_string(),
            "{\"seq\": 1}",
            "read the event log",
        ),
        (
            "$JS.API.DIRECT.GET.FANJET_EVENTS_1".to_string(),
            "{\"seq\": 1, \"next_by_subj\": \"fanjet.ev.>\"}",
            "read the event log",
        ),
        (
            format!(
                "$JS.API.DIRECT.GET.KV_{jobs}.$KV.{jobs}.{sec1}",
                jobs = fanjet::protocol::jobs_bucket(fanjet::protocol::job_cell(&sec1))
            ),
            "",
            "read job status",
        ),
        (
            "$JS.API.CONSUMER.CREATE.FANJET_EVENTS_2".to_string(),
            "{\"stream_name\": \"FANJET_EVENTS_2\", \"config\": {}}",
            "follow the log",
        ),
    ] {
        assert!(
            refused_request(&worker.client, &subject, body).await,
            "a worker could {what}"
        );
    }

    // The viewer reads status and history, and changes nothing.
    let viewer = env.bind("viewer").await;
    let (seen, _) = fanjet::nats::store::get(&viewer, &sec1)
        .await
        .expect("viewer reads the jobs bucket")
        .expect("the job");
    assert_eq!(seen.state, JobState::Completed);
    let history = fanjet::nats::log::history(&viewer, &sec1, 0, 100)
        .await
        .expect("viewer reads the job's events");
    assert!(history.iter().any(|e| e.event["type"] == "JobCompleted"));
    let submit = tokio::time::timeout(
        Duration::from_secs(1),
        viewer
            .client
            .request("fanjet.submit.inv", encode_json(&json!({})).unwrap()),
    )
    .await;
    assert!(!matches!(submit, Ok(Ok(_))), "a viewer cannot submit");
    let cancel_ev = Event::CancelRequested(fanjet::protocol::CancelRequested {
        job_id: sec1.clone(),
        reason: None,
        at: 1,
    });
    assert!(
        refused_publish(
            &viewer.client,
            event_subject(&sec1, "cancel_requested"),
            &cancel_ev
        )
        .await,
        "a viewer cannot cancel"
    );

    // ... and sees who runs what, without being able to take a partition.
    // Meanwhile a worker tries to speak for another user in heartbeats: the
    // subject names the sender and its permission pins it; and on its own
    // name, a subject whose id is not the payload's is dropped.
    let forger = worker.client.clone();
    let forging = tokio::spawn(async move {
        let fake = json!({"role": "worker", "id": "worker-fake", "slots": 9999, "busy": 0});
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            for subject in [
                "fanjet.heartbeat.worker.worker_squares.worker-fake",
                "fanjet.heartbeat.worker.worker-fake",
                "fanjet.heartbeat.worker.worker.other-id",
            ] {
                let _ = forger.publish(subject, fake.to_string().into()).await;
            }
            let _ = forger.flush().await;
        }
    });
    let shown = fanjet::observe::processes::processes(
        &viewer,
        fanjet::nats::heartbeat::listen(&viewer, Duration::from_secs(7))
            .await
            .expect("viewer hears heartbeats"),
    )
    .await;
    assert_eq!(shown.leases_error, None);
    assert_eq!(shown.managers.len(), 1, "{shown:?}");
    assert_eq!(shown.managers[0].partitions.len(), 16);
    assert!(
        shown
            .workers
            .iter()
            .any(|w| w.user.as_deref() == Some("worker") && w.slots == 4),
        "the worker's heartbeat, attributed to its user: {shown:?}"
    );
    forging.await.unwrap();
    assert!(
        !shown.workers.iter().any(|w| w.slots == 9999),
        "a forged heartbeat was shown: {shown:?}"
    );
    assert!(shown.managers[0].seen_ms_ago.is_some(), "{shown:?}");
    let leases = viewer
        .js
        .get_key_value(fanjet::protocol::partition_leases_bucket(0))
        .await
        .expect("viewer binds a cell's lease bucket");
    let grab = tokio::time::timeout(
        Duration::from_secs(1),
        leases.put("partition.00", "viewer".into()),
    )
    .await;
    assert!(
        !matches!(grab, Ok(Ok(_))),
        "a viewer cannot take a partition"
    );
    // It reads the customers' settings and their use of the workers, and
    // changes none of them.
    fanjet::nats::tenants::put(
        &admin.js,
        &fanjet::protocol::Tenant {
            max_concurrency: Some(9),
            ..fanjet::protocol::Tenant::new("acme")
        },
    )
    .await
    .unwrap();
    let settings = fanjet::nats::tenants::list(&viewer.js)
        .await
        .expect("viewer reads the customers' settings");
    assert_eq!(settings[0].max_concurrency, Some(9));
    fanjet::nats::tenants::usage(&viewer.js)
        .await
        .expect("viewer reads the customers' use");
    let raise = tokio::time::timeout(
        Duration::from_secs(1),
        fanjet::nats::tenants::put(&viewer.js, &fanjet::protocol::Tenant::new("acme")),
    )
    .await;
    assert!(
        !matches!(raise, Ok(Ok(_))),
        "a viewer cannot change a customer's cap"
    );

    // Nothing forged reached the log.
    let log = fanjet::nats::log::history(admin, "sec-2", 0, 100)
        .await
        .unwrap();
    assert!(log.is_empty(), "forged events were stored: {log:?}");
    let log = fanjet::nats::log::history(admin, &sec1, 0, 1000)
        .await
        .unwrap();
    assert_eq!(
        log.iter()
            .filter(|e| e.event["type"] == "JobCompleted")
            .count(),
        1
    );

    env.stop().await;
    let _ = w.await;
}

/// A secure server with the manager and the statistics consumer running
/// and workflows `inv` (one fanout step `send`) and `squares` (from
/// `examples/`) applied.
struct Secure {
    server: NatsServer,
    admin: Nats,
    cancel: CancellationToken,
    manager: tokio::task::JoinHandle<Result<(), manager::ManagerError>>,
    stats: tokio::task::JoinHandle<Result<(), fanjet::observe::stats::StatsError>>,
}

impl Secure {
    async fn start() -> Secure {
        let conf = Path::new(env!("CARGO_MANIFEST_DIR")).join("nats/secure/server.conf");
        let server = tokio::task::spawn_blocking(move || NatsServer::start_config(&conf))
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("this test needs a real nats-server: {e}"));
        let admin = Nats::ensure(connect(&server, "manager").await)
            .await
            .expect("manager creates streams and buckets");
        admin
            .apply_workflow(
                &Workflow::from_toml(
                    "name = \"inv\"\n[[steps]]\nname = \"send\"\nkind = \"fanout\"\ntimeout = \"5s\"\n",
                )
                .unwrap(),
            )
            .await
            .unwrap();
        // A batched fanout: its outcomes come as `subjobs_done` events.
        admin
            .apply_workflow(
                &Workflow::from_toml(
                    "name = \"invb\"\n[[steps]]\nname = \"send\"\nkind = \"fanout\"\ntimeout = \"5s\"\nbatch_size = 2\n",
                )
                .unwrap(),
            )
            .await
            .unwrap();
        let squares = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/squares.toml"),
        )
        .unwrap();
        admin
            .apply_workflow(&Workflow::from_toml(&squares).unwrap())
            .await
            .unwrap();
        let cancel = CancellationToken::new();
        let manager = tokio::spawn(manager::run(
            admin.clone(),
            ManagerOptions::default(),
            cancel.clone(),
        ));
        let stats = tokio::spawn(fanjet::observe::stats::run(admin.clone(), cancel.clone()));
        Secure {
            server,
            admin,
            cancel,
            manager,
            stats,
        }
    }

    async fn client(&self, user: &str) -> async_nats::Client {
        connect(&self.server, user).await
    }

    async fn worker(&self, user: &str) -> WorkerNats {
        WorkerNats::bind(connect(&self.server, user).await)
            .await
            .unwrap_or_else(|e| panic!("{user} binds: {e}"))
            .with_user(Some(user))
    }

    async fn bind(&self, user: &str) -> Nats {
        Nats::bind(connect(&self.server, user).await)
            .await
            .unwrap_or_else(|e| panic!("{user} binds: {e}"))
    }

    async fn wait(
        &self,
        job_id: &str,
        what: &str,
        done: impl Fn(&fanjet::protocol::Job) -> bool,
    ) -> fanjet::protocol::Job {
        for _ in 0..200 {
            if let Some((job, _)) = fanjet::nats::store::get(&self.admin, job_id).await.unwrap() {
                if done(&job) {
                    return job;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("job {job_id}: {what} did not happen within 20 s");
    }

    async fn stop(self) {
        self.cancel.cancel();
        let _ = self.manager.await;
        let _ = self.stats.await;
    }
}

/// A request this user may not make: the server drops it, so no answer
/// comes (a permissions violation is reported to the client only).
async fn refused_request(nats: &async_nats::Client, subject: &str, body: &str) -> bool {
    let answer = tokio::time::timeout(
        Duration::from_secs(1),
        nats.request(subject.to_string(), body.to_string().into()),
    )
    .await;
    !matches!(answer, Ok(Ok(_)))
}

fn bad_tokens_dropped() -> u64 {
    fanjet::metrics::Metrics::get()
        .manager_ignored
        .with_label_values(&["bad_token"])
        .get()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_decides_only_the_tasks_it_was_given() {
    let env = Secure::start().await;
    let bob = env.client("bob").await;
    let bob_parked = tenant_job_id("bob", "bob-parked");
    let sub = Submission {
        job_id: Some("bob-parked".into()),
        customer: Some("bob".into()),
        input: json!([1, 2, 3]),
        priority: None,
    };
    assert!(
        client::submit_as(&bob, "inv", "bob", &sub)
            .await
            .unwrap()
            .ok
    );
    // No worker serves `inv` yet: the job waits with its tasks queued.
    env.wait(&bob_parked, "dispatch", |j| j.steps[0].dispatched == 3)
        .await;

    // A worker of `squares` forges outcomes for bob's job: JetStream stores
    // them (the subject is allowed), and every reader drops them.
    let attacker = env.worker("worker_squares").await;
    let before = bad_tokens_dropped();
    let mut forged = Vec::new();
    for index in 0..3 {
        forged.push(Event::SubjobCompleted(SubjobCompleted {
            run: 0,
            job_id: bob_parked.clone(),
            step_index: 0,
            index,
            attempt: 1,
            result: json!("forged"),
            duration_ms: 0,
            token: String::new(),
        }));
        forged.push(Event::SubjobFailed(SubjobFailed {
            run: 0,
            job_id: bob_parked.clone(),
            step_index: 0,
            index,
            attempt: 1,
            error: "forged".into(),
            token: "AAAAAAAAAAAAAAAAAAAAAA".into(),
        }));
    }
    // And all three reported together, under tokens of its own making.
    forged.push(Event::SubjobsCompleted(
        fanjet::protocol::SubjobsCompleted {
            job_id: bob_parked.clone(),
            step_index: 0,
            run: 0,
            outcomes: (0..3)
                .map(|index| fanjet::protocol::Completion {
                    index,
                    attempt: 1,
                    result: json!("forged"),
                    duration_ms: 0,
                    token: "AAAAAAAAAAAAAAAAAAAAAA".into(),
                })
                .collect(),
        },
    ));
    for e in &forged {
        attacker
            .js
            .publish(e.subject(), encode_json(e).unwrap())
            .await
            .unwrap()
            .await
            .expect("a worker may publish outcomes");
    }
    for _ in 0..100 {
        if bad_tokens_dropped() >= before + forged.len() as u64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        bad_tokens_dropped() - before,
        forged.len() as u64,
        "the manager read and dropped every forged outcome"
    );
    let (job, _) = fanjet::nats::store::get(&env.admin, &bob_parked)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(job.state, JobState::Running);
    assert_eq!((job.steps[0].completed, job.steps[0].failed), (0, 0));

    // It cannot take `inv` tasks (and their tokens) either, in any cell.
    for cell in 0..fanjet::protocol::CELLS {
        assert!(
            refused_request(
                &attacker.client,
                &format!(
                    "$JS.API.CONSUMER.MSG.NEXT.{}.fanjet_inv_send",
                    fanjet::protocol::tasks_stream(cell)
                ),
                "{\"batch\": 1, \"expires\": 500000000}"
            )
            .await,
            "a squares worker pulls inv tasks"
        );
    }

    // Its own work goes through, acks and all.
    let w = Worker::new(attacker.clone())
        .concurrency(4)
        .handler("squares", "square", |c: TaskContext| async move {
            let x = c.task.item.as_i64().unwrap_or(0);
            Ok(json!(x * x))
        })
        .handler("squares", "report", |c: TaskContext| async move {
            // The fanout's results, through the manager's results service.
            let lines = c.results(c.task.step_index - 1).all().await?;
            let sum: i64 = lines.iter().filter_map(|l| l["result"].as_i64()).sum();
            Ok(json!({"sum": sum, "lines": lines.len()}))
        });
    let wc = env.cancel.clone();
    let w = tokio::spawn(async move { w.run(wc).await });
    let acme = env.client("submitter").await;
    let acme_squares = tenant_job_id("acme", "acme-squares");
    let sub = Submission {
        job_id: Some("acme-squares".into()),
        customer: Some("acme".into()),
        input: json!([1, 2, 3]),
        priority: None,
    };
    assert!(
        client::submit_as(&acme, "squares", "acme", &sub)
            .await
            .unwrap()
            .ok
    );
    let done = env
        .wait(&acme_squares, "completion", |j| j.state.is_terminal())
        .await;
    assert_eq!(done.state, JobState::Completed, "{:?}", done.error);
    assert_eq!(
        done.output,
        json!({"sum": 14, "lines": 3}),
        "the worker read its input's results"
    );
    // Without a token of one of its tasks, it reads no job's results.
    let forged = fanjet::protocol::ResultsRequest {
        token: "AAAAAAAAAAAAAAAAAAAAAA".into(),
        step_index: 0,
        index: 0,
        run: 0,
        step: 0,
        batch_size: None,
    };
    let answer = attacker
        .client
        .request(
            fanjet::protocol::results_subject(&bob_parked),
            serde_json::to_vec(&forged).unwrap().into(),
        )
        .await
        .unwrap();
    let page: fanjet::protocol::ResultsPage = serde_json::from_slice(&answer.payload).unwrap();
    assert!(!page.ok && page.results.is_empty(), "{page:?}");
    assert_eq!(page.error.unwrap()["code"], "forbidden");

    // A real worker of `inv` finishes bob's job with real results.
    let real = env.worker("worker").await;
    let w2 = Worker::new(real)
        .concurrency(4)
        .handler("inv", "send", |c: TaskContext| async move {
            Ok(json!({"sent": c.task.item}))
        });
    let wc = env.cancel.clone();
    let w2 = tokio::spawn(async move { w2.run(wc).await });
    let job = env
        .wait(&bob_parked, "completion", |j| j.state.is_terminal())
        .await;
    assert_eq!(job.state, JobState::Completed, "{:?}", job.error);
    assert_eq!((job.steps[0].completed, job.steps[0].failed), (3, 0));
    let mut counted = None;
    for _ in 0..50 {
        counted = fanjet::nats::store::stats(&env.admin, &bob_parked)
            .await
            .unwrap()
            .map(|s| (s.steps[0].completed, s.steps[0].failed));
        if counted == Some((3, 0)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(counted, Some((3, 0)), "statistics ignore forgeries");
    let logged: Vec<serde_json::Value> =
        fanjet::nats::log::history(&env.admin, &bob_parked, 0, 1000)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.event)
            .collect();
    let results: Vec<_> = common::completions(&logged)
        .into_iter()
        .filter(|e| e["result"] != json!("forged"))
        .collect();
    assert_eq!(results.len(), 3, "the real outcomes are in the log");
    env.stop().await;
    let _ = w.await;
    let _ = w2.await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_role_reads_another_ones_replies() {
    let env = Secure::start().await;
    // acme listens wherever replies could go: everyone's default inbox
    // prefix, bob's, and the manager's (where its pulls deliver events).
    let acme = connect(&env.server, "submitter").await;
    let mut spies = Vec::new();
    for subject in ["_INBOX.>", "_INBOX_bob.>", "_INBOX_manager.>", ">"] {
        spies.push(acme.subscribe(subject).await.unwrap());
    }
    let worker = connect(&env.server, "worker").await;
    let mut worker_spy = worker.subscribe("_INBOX_worker_squares.>").await.unwrap();
    acme.flush().await.unwrap();
    worker.flush().await.unwrap();

    let bob = env.client("bob").await;
    let bob_private = tenant_job_id("bob", "bob-private");
    let sub = Submission {
        job_id: Some("bob-private".into()),
        customer: Some("bob".into()),
        input: json!([1, 2]),
        priority: None,
    };
    let reply = client::submit_as(&bob, "squares", "bob", &sub)
        .await
        .unwrap();
    assert!(reply.ok, "{reply:?}");
    let squares = env.worker("worker_squares").await;
    let w = Worker::new(squares)
        .concurrency(2)
        .handler("squares", "square", |c: TaskContext| async move {
            Ok(c.task.item)
        })
        .handler("squares", "report", |_c: TaskContext| async move {
            Ok(json!(null))
        });
    let wc = env.cancel.clone();
    let w = tokio::spawn(async move { w.run(wc).await });
    let job = env
        .wait(&bob_private, "completion", |j| j.state.is_terminal())
        .await;
    assert_eq!(job.state, JobState::Completed, "{:?}", job.error);
    let seen = client::status_as(&bob, "bob", &bob_private).await.unwrap();
    assert!(seen.is_some(), "bob reads his status through his own inbox");

    for mut spy in spies {
        let got = tokio::time::timeout(
            Duration::from_millis(300),
            futures::StreamExt::next(&mut spy),
        )
        .await;
        assert!(
            !matches!(got, Ok(Some(_))),
            "acme received {:?}",
            got.ok().flatten().map(|m| m.subject)
        );
    }
    let got = tokio::time::timeout(
        Duration::from_millis(300),
        futures::StreamExt::next(&mut worker_spy),
    )
    .await;
    assert!(
        !matches!(got, Ok(Some(_))),
        "one worker user saw another's task deliveries"
    );
    env.stop().await;
    let _ = w.await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_viewer_changes_no_consumer_and_pulls_none() {
    let env = Secure::start().await;
    // The manager has made its consumers.
    // Partition 07 is in cell 1, partitions 09 and 12 in cell 0.
    let stream = env.admin.cell_log(1).clone();
    let cell0 = env.admin.cell_log(0).clone();
    for _ in 0..100 {
        if stream.consumer_info("fanjet-manager-07").await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before = stream
        .consumer_info("fanjet-manager-07")
        .await
        .unwrap()
        .config;
    let viewer = env.bind("viewer").await;
    let hijack = json!({
        "stream_name": "FANJET_EVENTS_1",
        "config": {"durable_name": "fanjet-manager-07", "filter_subject": "nothing.matches", "ack_policy": "all"},
        "action": ""
    })
    .to_string();
    for (subject, body) in [
        (
            "$JS.API.CONSUMER.CREATE.FANJET_EVENTS_1.fanjet-manager-07.nothing.matches",
            hijack.as_str(),
        ),
        (
            "$JS.API.CONSUMER.CREATE.FANJET_EVENTS_1.fanjet-manager-07",
            hijack.as_str(),
        ),
        ("$JS.API.CONSUMER.CREATE.FANJET_EVENTS_1", hijack.as_str()),
        (
            "$JS.API.CONSUMER.DURABLE.CREATE.FANJET_EVENTS_1.fanjet-manager-07",
            hijack.as_str(),
        ),
        (
            "$JS.API.CONSUMER.DELETE.FANJET_EVENTS_0.fanjet-manager-09",
            "",
        ),
        ("$JS.API.CONSUMER.DELETE.FANJET_EVENTS_0.fanjet-notify", ""),
        ("$JS.API.CONSUMER.DELETE.FANJET_EVENTS_0.fanjet-stats", ""),
        (
            "$JS.API.CONSUMER.MSG.NEXT.FANJET_EVENTS_0.fanjet-manager-12",
            "{\"batch\": 1}",
        ),
        (
            "$JS.API.CONSUMER.UNPIN.FANJET_EVENTS_0.fanjet-manager-12",
            "{\"group\": \"reader\"}",
        ),
        (
            "$JS.API.CONSUMER.PAUSE.FANJET_EVENTS_0.fanjet-manager-12",
            "{}",
        ),
        ("$JS.API.STREAM.PURGE.FANJET_EVENTS_0", ""),
    ] {
        assert!(
            refused_request(&viewer.client, subject, body).await,
            "the viewer was answered on {subject}"
        );
    }
    let after = stream
        .consumer_info("fanjet-manager-07")
        .await
        .unwrap()
        .config;
    assert_eq!(after.filter_subjects, before.filter_subjects);
    assert_eq!(after.filter_subject, before.filter_subject);
    for name in ["fanjet-manager-09", "fanjet-stats"] {
        assert!(cell0.consumer_info(name).await.is_ok(), "{name} is gone");
    }
    // What the viewer is for still works: a job's history and the job list.
    let acme = env.client("submitter").await;
    let acme_seen = tenant_job_id("acme", "acme-seen");
    let sub = Submission {
        job_id: Some("acme-seen".into()),
        customer: Some("acme".into()),
        input: json!([1]),
        priority: None,
    };
    assert!(
        client::submit_as(&acme, "inv", "acme", &sub)
            .await
            .unwrap()
            .ok
    );
    env.wait(&acme_seen, "dispatch", |j| j.steps[0].dispatched == 1)
        .await;
    let history = fanjet::nats::log::history(&viewer, &acme_seen, 0, 100)
        .await
        .expect("viewer reads history");
    assert!(
        history.iter().any(|e| e.event["type"] == "StepStarted"),
        "{history:?}"
    );
    let mut seen = false;
    for _ in 0..100 {
        let page = fanjet::nats::index::list(&viewer, &Default::default(), &Default::default())
            .await
            .expect("viewer lists jobs");
        seen = page.jobs.iter().any(|j| j.job_id == acme_seen);
        if seen {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(seen, "the viewer's listing never showed {acme_seen}");
    let counts = fanjet::nats::index::counts(&viewer, &Default::default())
        .await
        .expect("viewer counts jobs");
    assert!(counts.total >= 1);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_cannot_purge_or_replace_a_stored_result() {
    let mut env = Secure::start().await;
    let big = |tag: &str| json!({"tag": tag, "pad": "x".repeat(300_000)});
    let worker = env.worker("worker").await;
    let acme = env.client("submitter").await;
    // Two steps: a task whose large result is the next step's input.
    env.admin
        .apply_workflow(
            &Workflow::from_toml(
                "name = \"big\"\n[[steps]]\nname = \"make\"\nkind = \"task\"\ntimeout = \"5s\"\n[[steps]]\nname = \"use\"\nkind = \"task\"\ntimeout = \"5s\"\n",
            )
            .unwrap(),
        )
        .await
        .unwrap();
    let acme_big = tenant_job_id("acme", "acme-big");
    let sub = Submission {
        job_id: Some("acme-big".into()),
        customer: Some("acme".into()),
        input: json!(null),
        priority: None,
    };
    assert!(
        client::submit_as(&acme, "big", "acme", &sub)
            .await
            .unwrap()
            .ok
    );
    env.wait(&acme_big, "dispatch", |j| j.steps[0].dispatched == 1)
        .await;
    // The manager stops before the worker reports, so the result sits in
    // the store until it comes back.
    env.cancel.cancel();
    let _ = (&mut env.manager).await;
    let again = CancellationToken::new();
    let stop = CancellationToken::new();
    let real = big("real");
    let w = Worker::new(worker.clone()).concurrency(1).handler(
        "big",
        "make",
        move |_c: TaskContext| {
            let real = real.clone();
            async move { Ok(real) }
        },
    );
    let ws = stop.clone();
    let w = tokio::spawn(async move { w.run(ws).await });
    let mut reference = None;
    for _ in 0..100 {
        let log = fanjet::nats::log::history(&env.admin, &acme_big, 0, 100)
            .await
            .unwrap();
        reference = log
            .iter()
            .find(|e| e.event["type"] == "SubjobCompleted")
            .and_then(|e| fanjet::protocol::ResultRef::from_value(&e.event["result"]));
        if reference.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.cancel();
    let _ = w.await;
    let reference = reference.expect("the large result was stored and reported");
    assert!(reference.digest.is_some(), "{reference:?}");

    // A worker may not purge the store, nor read another's result back.
    assert!(
        refused_request(
            &worker.client,
            "$JS.API.STREAM.PURGE.OBJ_fanjet_results",
            ""
        )
        .await
    );
    assert!(
        refused_request(
            &worker.client,
            "$JS.API.STREAM.MSG.GET.OBJ_fanjet_results",
            "{\"seq\": 1}"
        )
        .await
    );
    assert!(
        refused_request(
            &worker.client,
            "$JS.API.CONSUMER.CREATE.OBJ_fanjet_results",
            "{\"stream_name\": \"OBJ_fanjet_results\", \"config\": {}}"
        )
        .await
    );
    // Knowing the name (here, from the log: a worker cannot list them), it
    // writes another value under it.
    let forged = serde_json::to_vec(&big("forged")).unwrap();
    fanjet::nats::objects::put(
        &worker.js,
        fanjet::protocol::RESULTS_BUCKET,
        &reference.name,
        &forged,
    )
    .await
    .expect("a worker may write results");
    let now = env.admin.results.info(&reference.name).await.unwrap();
    assert_ne!(
        now.digest, reference.digest,
        "the attack replaced the object"
    );

    // The manager comes back, reads the step's input and notices.
    let manager = tokio::spawn(manager::run(
        env.admin.clone(),
        ManagerOptions::default(),
        again.clone(),
    ));
    let used = std::sync::Arc::new(std::sync::Mutex::new(None));
    let seen = used.clone();
    let w = Worker::new(worker)
        .concurrency(1)
        .handler("big", "use", move |c: TaskContext| {
            let seen = seen.clone();
            async move {
                *seen.lock().unwrap() = Some(c.task.input["tag"].clone());
                Ok(json!(null))
            }
        });
    let wc = again.clone();
    let w = tokio::spawn(async move { w.run(wc).await });
    let job = env
        .wait(&acme_big, "its end", |j| j.state.is_terminal())
        .await;
    assert_eq!(
        job.state,
        JobState::Failed,
        "the forged input was used: {:?}",
        used.lock().unwrap()
    );
    let error = job.error.clone().unwrap_or_default();
    assert!(error.contains("replaced"), "{error}");
    assert_eq!(*used.lock().unwrap(), None);
    again.cancel();
    let _ = manager.await;
    let _ = w.await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_ids_are_unique_per_customer_and_reveal_nothing() {
    let env = Secure::start().await;
    let acme = env.client("submitter").await;
    let bob = env.client("bob").await;
    let sub = |id: &str| Submission {
        job_id: Some(id.into()),
        customer: None,
        input: json!([1]),
        priority: None,
    };
    // acme takes the id bob is about to use.
    let squat = client::submit_as(&acme, "inv", "acme", &sub("bob-next"))
        .await
        .unwrap();
    assert!(squat.ok && !squat.duplicate, "{squat:?}");
    let mine = client::submit_as(&bob, "inv", "bob", &sub("bob-next"))
        .await
        .unwrap();
    assert!(mine.ok && !mine.duplicate, "bob's job is his own: {mine:?}");
    assert_ne!(mine.job_id, squat.job_id);
    let bobs = mine.job_id.clone().unwrap();
    let seen = client::status_as(&bob, "bob", "bob-next").await.unwrap();
    assert_eq!(
        seen.map(|j| (j.job_id, j.customer)),
        Some((bobs.clone(), Some("bob".to_string())))
    );
    // acme cannot reach bob's job, even by its full id.
    assert!(client::status_as(&acme, "acme", &bobs)
        .await
        .unwrap()
        .is_none());
    // Each cancels its own jobs only.
    match client::cancel_as(&acme, "acme", &bobs, None).await {
        Err(client::ClientError::NoSuchJob(_)) => {}
        other => panic!("acme cancelled bob's job: {other:?}"),
    }
    match client::cancel_as(&acme, "bob", "bob-next", None).await {
        Err(client::ClientError::Refused { .. }) => {}
        other => panic!("acme asked as bob: {other:?}"),
    }
    // And pauses (or changes) its own jobs only.
    let pause = || client::Change {
        paused: Some(true),
        ..Default::default()
    };
    match client::update_as(&acme, "acme", &bobs, pause()).await {
        Err(client::ClientError::NoSuchJob(_)) => {}
        other => panic!("acme paused bob's job: {other:?}"),
    }
    match client::update_as(&acme, "bob", "bob-next", pause()).await {
        Err(client::ClientError::Refused { .. }) => {}
        other => panic!("acme asked as bob: {other:?}"),
    }
    let acmes = squat.job_id.clone().unwrap();
    assert_eq!(
        client::update_as(&acme, "acme", "bob-next", pause())
            .await
            .unwrap(),
        acmes
    );
    env.wait(&acmes, "its pause", |j| {
        j.paused_at.is_some() || j.state.is_terminal()
    })
    .await;
    assert_eq!(
        client::cancel_as(&acme, "acme", "bob-next", Some("changed my mind".into()))
            .await
            .unwrap(),
        acmes
    );
    let ended = env
        .wait(&acmes, "cancellation", |j| j.state.is_terminal())
        .await;
    assert_eq!(ended.state, JobState::Cancelled);
    // It asks for redrives of its own jobs only, and hears why not.
    match client::redrive_as(&acme, "acme", "bob-next", None, None).await {
        Err(e) if e.code() == Some("not_redrivable") => {
            assert!(e.to_string().contains("was cancelled"), "{e}")
        }
        other => panic!("a cancelled job redriven: {other:?}"),
    }
    match client::redrive_as(&acme, "acme", &bobs, None, None).await {
        Err(client::ClientError::NoSuchJob(_)) => {}
        other => panic!("acme redrove bob's job: {other:?}"),
    }
    match client::redrive_as(&acme, "bob", "bob-next", None, None).await {
        Err(client::ClientError::Refused { .. }) => {}
        other => panic!("acme asked as bob: {other:?}"),
    }
    let (still, _) = fanjet::nats::store::get(&env.admin, &bobs)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(still.state, JobState::Running, "bob's job goes on");

    // The same submission again is bob's duplicate, answered as such.
    let again = client::submit_as(&bob, "inv", "bob", &sub("bob-next"))
        .await
        .unwrap();
    assert!(again.ok && again.duplicate, "{again:?}");
    // A rejection is recorded in the submitter's namespace only.
    let bad = acme
        .request(
            "fanjet.submit.inv.acme",
            "{\"job_id\": \"bob-later\", \"bogus\": 1}".into(),
        )
        .await
        .unwrap();
    let bad: fanjet::protocol::SubmitReply = serde_json::from_slice(&bad.payload).unwrap();
    assert!(!bad.ok);
    assert_eq!(bad.job_id, Some(tenant_job_id("acme", "bob-later")));
    let later = client::submit_as(&bob, "inv", "bob", &sub("bob-later"))
        .await
        .unwrap();
    assert!(later.ok && !later.duplicate, "{later:?}");
    // Ids leave room for the customer's tag.
    let long = "x".repeat(fanjet::protocol::MAX_TENANT_JOB_ID_LEN + 1);
    let refused = client::submit_as(&bob, "inv", "bob", &sub(&long))
        .await
        .unwrap();
    assert_eq!(
        refused.error.map(|e| e.code),
        Some(fanjet::protocol::RejectCode::InvalidJobId)
    );
    env.stop().await;
}
