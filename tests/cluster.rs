//! fanjet on a 3-node JetStream cluster with 3 replicas of everything and two
//! managers splitting the partitions: simultaneous submissions of one job id
//! are all answered ok (one starts it), every stream, bucket and consumer is
//! led from its cell's log leader and the cells' logs from different nodes
//! (before a node is lost and again after), and a job keeps going and ends
//! with exact counts when its cell's log leader is killed mid-job, while
//! the other cells' logs keep their leaders.
//! (Attempts are generous: while streams change leaders, outcomes cannot be
//! reported and tasks come back; a subjob that ran out of attempts then
//! would fail, rightly, and this test is about nothing being lost.)

use std::time::{Duration, Instant};

use fanjet::manager::{self, ManagerOptions};
use fanjet::nats::connect::ConnectArgs;
use fanjet::nats::server::NatsCluster;
use fanjet::nats::Nats;
use fanjet::protocol::JobState;
use fanjet::protocol::Workflow;
use fanjet::worker::{TaskContext, Worker};
use serde_json::json;
use tokio_util::sync::CancellationToken;

async fn connect(cluster: &NatsCluster, name: &str) -> async_nats::Client {
    ConnectArgs::url(cluster.urls())
        .connect(name)
        .await
        .expect("connect to the cluster")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_survives_losing_a_cluster_node() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("FANJET_LOG").unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
    let mut cluster = tokio::task::spawn_blocking(|| NatsCluster::start(3))
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("this test needs a real nats-server: {e}"));
    // The cluster elects its JetStream leader after the nodes meet.
    let start = Instant::now();
    let admin = loop {
        match Nats::ensure_replicated(connect(&cluster, "admin").await, 3).await {
            Ok(n) => break n,
            Err(e) => {
                assert!(
                    start.elapsed() < Duration::from_secs(60),
                    "JetStream cluster never ready: {e}"
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };
    let info = admin.cell_log(0).get_info().await.unwrap();
    assert_eq!(info.config.num_replicas, 3);
    assert_eq!(
        info.cluster.as_ref().map(|c| c.replicas.len()),
        Some(2),
        "a leader and two replicas"
    );
    admin
        .apply_workflow(&Workflow::from_toml("name = \"ha\"\n[[steps]]\nname = \"send\"\nkind = \"fanout\"\ntimeout = \"3s\"\nmax_attempts = 20\nbackoff = [\"200ms\"]\n").unwrap())
        .await
        .unwrap();

    let cancel = CancellationToken::new();
    // Two managers splitting the partitions, each on its own connection.
    let mut managers = Vec::new();
    let mut manager_clients = Vec::new();
    for name in ["manager-a", "manager-b"] {
        let client = connect(&cluster, name).await;
        manager_clients.push(client.clone());
        let m = Nats::bind(client).await.unwrap();
        managers.push(tokio::spawn(manager::run(
            m,
            ManagerOptions::default(),
            cancel.clone(),
        )));
    }
    let w = Nats::bind(connect(&cluster, "worker").await).await.unwrap();
    let worker =
        Worker::new(w)
            .concurrency(16)
            .handler("ha", "send", |c: TaskContext| async move {
                tokio::time::sleep(Duration::from_millis(10)).await;
                Ok(c.task.item)
            });
    let wc = cancel.clone();
    let worker = tokio::spawn(async move { worker.run(wc).await });

    duplicates_in_flight_are_duplicates(&admin).await;
    // A reader of the job's cell beside the managers', opened again the
    // moment its consumer's leader is lost (below).
    let probe_cell = fanjet::protocol::job_cell("ha-1");
    let probe = || {
        fanjet::nats::log::Reader::open(
            &admin,
            probe_cell,
            "fanjet-probe",
            vec![fanjet::protocol::partition_kind_filter(
                fanjet::protocol::partition("ha-1"),
                "probe",
            )],
            10,
            "probe",
            None,
        )
    };
    drop(probe().await.expect("a reader of the job's cell"));
    together(&admin, "before the kill").await;

    let reply = fanjet::client::submit(
        &admin.client,
        "ha",
        &fanjet::protocol::Submission {
            job_id: Some("ha-1".into()),
            customer: None,
            input: json!((0..600).collect::<Vec<_>>()),
            priority: None,
        },
    )
    .await
    .unwrap();
    assert!(reply.ok);
    let start = Instant::now();
    loop {
        if let Ok(Some((job, _))) = fanjet::nats::store::get(&admin, "ha-1").await {
            if job.steps[0].completed >= 150 {
                break;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the job did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The managers keep each cell's leaders beside its log's, the cells'
    // logs on different nodes, so that losing a node stalls its cell only.
    // Kill the hardest node to lose for this job: its cell's log leader.
    // Outcomes cannot be written until another node leads, and deliveries
    // in flight to the manager are lost with it.
    let before = fanjet::nats::placement::survey(&admin)
        .await
        .expect("survey")
        .anchors;
    let leader = admin
        .log("ha-1")
        .get_info()
        .await
        .ok()
        .and_then(|i| i.cluster)
        .and_then(|c| c.leader)
        .expect("the event log has a leader");
    let node: usize = leader
        .trim_start_matches('n')
        .parse()
        .unwrap_or_else(|_| panic!("unexpected server name {leader}"));
    cluster.nodes[node].kill();
    // Its consumer is led from the killed node (the managers keep it
    // there): the requests that open it go unanswered until its followers
    // elect a leader, and are asked again rather than waited out. So are
    // those that load the job to resume it or ask whether it is stored
    // (its record and bitmap, read from their buckets' leaders, led from
    // there too).
    let (reopened, loaded, stored) = tokio::join!(
        probe(),
        fanjet::nats::store::load(&admin, "ha-1"),
        fanjet::nats::store::stored(&admin, "ha-1")
    );
    let reopened = reopened.map(drop);

    let start = Instant::now();
    let mut reported = false;
    let job = loop {
        if let Ok(Some((job, _))) = fanjet::nats::store::get(&admin, "ha-1").await {
            if job.state.is_terminal() {
                break job;
            }
        }
        if start.elapsed() > Duration::from_secs(40) && !reported {
            // Stuck longer than any election: say why now (the job may
            // still end), with the servers' logs kept.
            reported = true;
            eprintln!(
                "the job has not ended 40 s after losing a node: {}",
                stuck_report(&admin, &cluster, node, &manager_clients).await
            );
        }
        if start.elapsed() > Duration::from_secs(150) {
            panic!(
                "the job did not end after losing a node: {}",
                stuck_report(&admin, &cluster, node, &manager_clients).await
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(job.state, JobState::Completed, "{:?}", job.error);
    if let Err(e) = reopened {
        panic!("a reader opened as its consumer's leader was lost did not open once another was elected: {e}");
    }
    match loaded {
        Ok(Some(_)) => {}
        other => panic!(
            "a job loaded as its record's leader was lost did not load once another was elected: {other:?}"
        ),
    }
    assert!(
        matches!(stored, Ok(true)),
        "whether a job is stored, asked as its record's leader was lost, was not answered once another was elected: {stored:?}"
    );
    assert_eq!(
        (
            job.steps[0].total,
            job.steps[0].completed,
            job.steps[0].failed
        ),
        (600, 600, 0)
    );
    // After the election, the rest follow the log's new leader (the
    // killed node's copies are not current, so they are not counted).
    together(&admin, "after the kill").await;
    // The other cells' logs were led from other nodes: none had to elect.
    let after = fanjet::nats::placement::survey(&admin)
        .await
        .expect("survey")
        .anchors;
    let killed = fanjet::protocol::job_cell("ha-1") as usize;
    for cell in (0..after.len()).filter(|c| *c != killed) {
        assert_eq!(
            after[cell], before[cell],
            "cell {cell}'s log changed leader when cell {killed}'s node died: {before:?} -> {after:?}"
        );
    }
    cancel.cancel();
    for m in managers {
        let _ = m.await;
    }
    let _ = worker.await;
}

/// What a job stuck after a node's loss waits for: the job, its consumers
/// and streams, and the node each manager is connected to; the servers'
/// logs (traced with `FANJET_NATS_TRACE=1`) and monitor pages are copied
/// to a folder the report names.
async fn stuck_report(
    admin: &Nats,
    cluster: &NatsCluster,
    killed: usize,
    managers: &[async_nats::Client],
) -> String {
    let job = fanjet::nats::store::get(admin, "ha-1")
        .await
        .ok()
        .flatten()
        .map(|(j, _)| {
            (
                j.state,
                j.steps[0].completed,
                j.steps[0].failed,
                j.steps[0].dispatched,
            )
        });
    let mgr = admin
        .log("ha-1")
        .clone()
        .consumer_info(fanjet::protocol::manager_consumer(
            fanjet::protocol::partition("ha-1"),
        ))
        .await
        .map(|i| {
            (
                i.num_pending,
                i.num_ack_pending,
                i.delivered.stream_sequence,
                i.ack_floor.stream_sequence,
            )
        });
    let tasks = admin
        .task_queue("ha-1")
        .clone()
        .consumer_info("fanjet_ha_send")
        .await
        .map(|i| (i.num_pending, i.num_ack_pending, i.num_waiting));
    let ev = admin
        .log("ha-1")
        .get_info()
        .await
        .map(|i| (i.state.messages, i.cluster.and_then(|c| c.leader)));
    let queue = admin
        .task_queue("ha-1")
        .get_info()
        .await
        .map(|i| (i.state.messages, i.cluster.and_then(|c| c.leader)));
    let connected: Vec<String> = managers
        .iter()
        .map(|c| {
            format!(
                "{} ({:?})",
                c.server_info().server_name,
                c.connection_state()
            )
        })
        .collect();
    let kept = std::env::temp_dir().join(format!("fanjet-cluster-stuck-{}", start_id()));
    let _ = std::fs::create_dir_all(&kept);
    for (i, n) in cluster.nodes.iter().enumerate() {
        let _ = std::fs::copy(
            n.store().join("nats-server.log"),
            kept.join(format!("n{i}.log")),
        );
        if i == killed {
            continue;
        }
        if let Some(m) = n.monitor_url() {
            for page in [
                "routez?subs=detail",
                "subsz?subs=1",
                "connz?subs=detail",
                "jsz?streams=true&consumers=true",
            ] {
                if let Ok(r) = reqwest::get(format!("{m}/{page}")).await {
                    if let Ok(text) = r.text().await {
                        let name = page.split('?').next().unwrap_or(page);
                        let _ = std::fs::write(kept.join(format!("n{i}-{name}.json")), text);
                    }
                }
            }
        }
    }
    format!(
        "job {job:?} manager consumer {mgr:?} tasks consumer {tasks:?} events {ev:?} task queue {queue:?}; managers connected to {connected:?}; servers' logs and monitor pages in {}",
        kept.display()
    )
}

/// A number for this moment, to name what a report leaves behind.
fn start_id() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default()
}

/// Waits (60 s at most) until every replicated stream, bucket and durable
/// consumer of fanjet's is led from the node leading its cell's log, and
/// the cells' logs from different nodes while there are nodes enough.
async fn together(admin: &Nats, when: &str) {
    let start = Instant::now();
    loop {
        let survey = fanjet::nats::placement::survey(admin)
            .await
            .unwrap_or_default();
        let away: Vec<String> = survey.misplaced().iter().map(|g| g.to_string()).collect();
        if away.is_empty() && survey.groups.len() > 10 {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{when}: not led from their cells' log leaders {:?} after 60 s: {away:?}",
            survey.anchors
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Submissions of one job id at the same moment to two intakes: on a
/// replicated stream the second publish can meet the first still "in
/// process"; every answer is ok, and exactly one started the job.
async fn duplicates_in_flight_are_duplicates(admin: &Nats) {
    for round in 0..5 {
        let id = format!("same-{round}");
        let requests = (0..40).map(|_| {
            let (nats, id) = (admin.clone(), id.clone());
            tokio::spawn(async move {
                let sub = fanjet::protocol::Submission {
                    job_id: Some(id),
                    customer: None,
                    input: json!([]),
                    priority: None,
                };
                fanjet::client::submit(&nats.client, "ha", &sub).await
            })
        });
        let replies: Vec<_> = futures::future::join_all(requests)
            .await
            .into_iter()
            .map(|r| r.unwrap().unwrap())
            .collect();
        for r in &replies {
            assert!(r.ok && r.error.is_none(), "{id}: {r:?}");
        }
        let started = replies.iter().filter(|r| !r.duplicate).count();
        assert_eq!(started, 1, "{id}: one submission started it");
    }
}
