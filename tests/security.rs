//! `nats/secure/server.conf` on a real nats-server: each role can do its
//! job, and no more. A worker cannot write a job's or step's completion or
//! read the log; a submitter can submit and read status for its own
//! customer only and cannot forge events; a viewer changes nothing.

use std::future::IntoFuture;
use std::path::Path;
use std::time::Duration;

use fanjet::client;
use fanjet::manager::{self, ManagerOptions};
use fanjet::nats::connect::ConnectArgs;
use fanjet::nats::server::NatsServer;
use fanjet::nats::Nats;
use fanjet::protocol::JobState;
use fanjet::protocol::Workflow;
use fanjet::protocol::{
    customer_submit_subject, encode_json, event_subject, Event, JobCompleted, StepCompleted,
    Submission,
};
use fanjet::worker::{TaskContext, Worker};
use serde_json::json;
use tokio_util::sync::CancellationToken;

async fn connect(server: &NatsServer, user: &str) -> async_nats::Client {
    let mut args = ConnectArgs::url(server.url());
    args.user = Some(user.into());
    args.password = Some(format!("{user}-secret"));
    args.connect(&format!("test-{user}"))
        .await
        .unwrap_or_else(|e| panic!("{user} connects: {e}"))
}

/// A JetStream publish this user may not make: no ack, nothing stored.
async fn refused_publish(nats: &Nats, subject: String, event: &Event) -> bool {
    let sent = nats.js.publish(subject, encode_json(event).unwrap()).await;
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
    let conf = Path::new(env!("CARGO_MANIFEST_DIR")).join("nats/secure/server.conf");
    let server = tokio::task::spawn_blocking(move || NatsServer::start_config(&conf))
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("this test needs a real nats-server: {e}"));

    // The manager role sets everything up and runs the manager.
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
    let cancel = CancellationToken::new();
    let m = tokio::spawn(manager::run(
        admin.clone(),
        ManagerOptions::default(),
        cancel.clone(),
    ));

    // The worker role binds and works.
    let worker = Nats::bind(connect(&server, "worker").await)
        .await
        .expect("worker binds");
    let create = tokio::time::timeout(
        Duration::from_secs(2),
        Nats::ensure(connect(&server, "worker").await),
    )
    .await;
    assert!(
        !matches!(create, Ok(Ok(_))),
        "a worker cannot create streams"
    );
    let w = Worker::new(worker.clone()).concurrency(4).handler(
        "inv",
        "send",
        |c: TaskContext| async move { Ok(json!({"sent": c.task.item})) },
    );
    let wc = cancel.clone();
    let w = tokio::spawn(async move { w.run(wc).await });

    // The submitter submits for its customer and follows the job through the status service.
    let submitter = Nats::bind(connect(&server, "submitter").await)
        .await
        .expect("submitter binds");
    let sub = Submission {
        job_id: Some("sec-1".into()),
        customer: Some("acme".into()),
        input: json!([1, 2, 3, 4, 5]),
    };
    let reply = client::submit(&submitter, "inv", &sub)
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

    // A submitter cannot act for another customer, read others' status, or forge events.
    let other = tokio::time::timeout(
        Duration::from_secs(1),
        submitter.client.request(
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
        client::status_as(&submitter, "globex", "sec-1"),
    )
    .await;
    assert!(
        !matches!(peek, Ok(Ok(Some(_)))),
        "no status of another customer's job"
    );
    let forged = Event::JobCompleted(JobCompleted {
        job_id: "sec-1".into(),
        workflow: "inv".into(),
        output: json!(null),
        at: 0,
    });
    assert!(
        refused_publish(&submitter, forged.subject(), &forged).await,
        "a submitter cannot write to the log"
    );
    let kv = tokio::time::timeout(
        Duration::from_secs(1),
        fanjet::nats::store::get(&submitter, "sec-1"),
    )
    .await;
    assert!(
        !matches!(kv, Ok(Ok(Some(_)))),
        "a submitter cannot read the jobs bucket"
    );

    // A worker cannot write a job's or a step's completion, nor read the log or the jobs.
    let fake_job = Event::JobCompleted(JobCompleted {
        job_id: "sec-2".into(),
        workflow: "inv".into(),
        output: json!(null),
        at: 0,
    });
    assert!(
        refused_publish(&worker, fake_job.subject(), &fake_job).await,
        "a worker cannot publish JobCompleted"
    );
    let fake_decision = Event::SubjobsFailed(fanjet::protocol::SubjobsFailed {
        job_id: "sec-2".into(),
        step_index: 0,
        below: 1,
        reason: fanjet::protocol::AbandonReason::Lost,
        error: "forged".into(),
        at: 0,
    });
    assert!(
        refused_publish(&worker, fake_decision.subject(), &fake_decision).await,
        "a worker cannot fail subjobs wholesale"
    );
    let fake_step = Event::StepCompleted(StepCompleted {
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
        refused_publish(&worker, fake_step.subject(), &fake_step).await,
        "a worker cannot publish StepCompleted"
    );
    let raw = tokio::time::timeout(Duration::from_secs(1), worker.events.get_raw_message(1)).await;
    assert!(
        !matches!(raw, Ok(Ok(_))),
        "a worker cannot read the event log"
    );
    let kv = tokio::time::timeout(
        Duration::from_secs(1),
        fanjet::nats::store::get(&worker, "sec-1"),
    )
    .await;
    assert!(
        !matches!(kv, Ok(Ok(Some(_)))),
        "a worker cannot read job status"
    );
    let read = tokio::time::timeout(
        Duration::from_secs(1),
        fanjet::nats::log::history(&worker, "sec-1", 0, 10),
    )
    .await;
    assert!(
        !matches!(read, Ok(Ok(ref v)) if !v.is_empty()),
        "a worker cannot follow the log"
    );

    // The viewer reads status and history, and changes nothing.
    let viewer = Nats::bind(connect(&server, "viewer").await)
        .await
        .expect("viewer binds");
    let (seen, _) = fanjet::nats::store::get(&viewer, "sec-1")
        .await
        .expect("viewer reads the jobs bucket")
        .expect("the job");
    assert_eq!(seen.state, JobState::Completed);
    let history = fanjet::nats::log::history(&viewer, "sec-1", 0, 100)
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
        job_id: "sec-1".into(),
        reason: None,
        at: 1,
    });
    assert!(
        refused_publish(
            &viewer,
            event_subject("sec-1", "cancel_requested"),
            &cancel_ev
        )
        .await,
        "a viewer cannot cancel"
    );

    // ... and sees who runs what, without being able to take a partition.
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
    assert!(shown.managers[0].seen_ms_ago.is_some(), "{shown:?}");
    let leases = viewer
        .js
        .get_key_value(fanjet::protocol::LEASES_BUCKET)
        .await
        .expect("viewer binds the lease bucket");
    let grab = tokio::time::timeout(
        Duration::from_secs(1),
        leases.put("partition.00", "viewer".into()),
    )
    .await;
    assert!(
        !matches!(grab, Ok(Ok(_))),
        "a viewer cannot take a partition"
    );

    // Nothing forged reached the log.
    let log = fanjet::nats::log::history(&admin, "sec-2", 0, 100)
        .await
        .unwrap();
    assert!(log.is_empty(), "forged events were stored: {log:?}");
    let log = fanjet::nats::log::history(&admin, "sec-1", 0, 1000)
        .await
        .unwrap();
    assert_eq!(
        log.iter()
            .filter(|e| e.event["type"] == "JobCompleted")
            .count(),
        1
    );

    cancel.cancel();
    let _ = m.await;
    let _ = w.await;
}
