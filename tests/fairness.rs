//! The fair share against a real nats-server: a small job runs beside a
//! big one instead of behind it, caps hold (a ledger of running handlers
//! per customer), priorities start in order.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{cli, Env};
use fanjet::nats::tenants;
use fanjet::protocol::{partition, Tenant, WaitReason};
use fanjet::worker::{TaskContext, Worker};
use serde_json::{json, Value};

/// Handlers running now and at most, per customer, and the order subjobs
/// started in (job id per start).
#[derive(Default)]
struct Ledger {
    running: HashMap<String, u64>,
    most: HashMap<String, u64>,
    starts: Vec<String>,
    /// Subjobs of the workflow's step running at once, at most.
    step_most: u64,
    step_running: u64,
}

fn customer_of(job_id: &str) -> String {
    job_id.split('-').next().unwrap_or_default().to_string()
}

/// A worker of `slots` slots on `workflow.work` whose handler keeps the
/// ledger and sleeps `each`.
fn ledger_worker(
    env: &Env,
    workflow: &str,
    slots: usize,
    each: Duration,
    ledger: Arc<Mutex<Ledger>>,
) -> Worker {
    Worker::new(env.nats.clone()).concurrency(slots).handler(
        workflow,
        "work",
        move |c: TaskContext| {
            let ledger = ledger.clone();
            async move {
                let who = customer_of(&c.task.job_id);
                {
                    let mut l = ledger.lock().unwrap();
                    let n = l.running.entry(who.clone()).or_default();
                    *n += 1;
                    let n = *n;
                    let most = l.most.entry(who.clone()).or_default();
                    *most = (*most).max(n);
                    l.starts.push(c.task.job_id.clone());
                    l.step_running += 1;
                    l.step_most = l.step_most.max(l.step_running);
                }
                tokio::time::sleep(each).await;
                let mut l = ledger.lock().unwrap();
                *l.running.entry(who).or_default() -= 1;
                l.step_running -= 1;
                Ok(Value::Null)
            }
        },
    )
}

fn items(n: usize) -> Value {
    Value::Array(vec![Value::Null; n])
}

async fn fair_workflow(env: &Env, name: &str, extra: &str) {
    env.apply(&format!(
        "name = \"{name}\"\n[[steps]]\nname = \"work\"\nkind = \"fanout\"\n{extra}\n"
    ))
    .await;
}

/// Workflow `fair`, a ledger worker of `slots` slots, a manager.
async fn one_worker_and_manager(slots: usize, each: Duration) -> (Env, Arc<Mutex<Ledger>>) {
    let mut env = Env::start().await;
    fair_workflow(&env, "fair", "").await;
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    env.worker(ledger_worker(&env, "fair", slots, each, ledger.clone()));
    env.manager();
    (env, ledger)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_job_starts_beside_a_big_one_not_behind_it() {
    let (env, ledger) = one_worker_and_manager(20, Duration::from_millis(20)).await;
    let reply = env
        .submit(
            "fair",
            json!({"job_id": "big-1", "customer": "big", "input": items(2000)}),
        )
        .await;
    assert!(reply.ok, "{reply:?}");
    env.wait_for("big-1", Duration::from_secs(30), "100 subjobs done", |j| {
        j.steps[0].completed >= 100
    })
    .await;
    let reply = env
        .submit(
            "fair",
            json!({"job_id": "small-1", "customer": "small", "input": items(40)}),
        )
        .await;
    assert!(reply.ok, "{reply:?}");
    let small = env.wait_end("small-1", Duration::from_secs(60)).await;
    assert_eq!(small.steps[0].completed, 40);
    // Where the small job's first subjob started among all starts: first
    // come first served, it would follow all 2,000 of the big job's
    // (each kept up to 5,000 queued); fairly, it follows about the ones
    // running and queued ahead when it came (20 slots and 50 ms of work).
    let starts = ledger.lock().unwrap().starts.clone();
    let first = starts
        .iter()
        .position(|j| j == "small-1")
        .expect("small started");
    let big_before = starts[..first].iter().filter(|j| *j == "big-1").count();
    assert!(
        big_before < 1000,
        "{big_before} of the big job's subjobs started before the small one's first"
    );
    let big = env.wait_end("big-1", Duration::from_secs(120)).await;
    assert_eq!(big.steps[0].completed, 2000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_status_shows_the_share_and_why_a_job_waits() {
    let (env, ledger) = one_worker_and_manager(10, Duration::from_millis(30)).await;
    env.submit(
        "fair",
        json!({"job_id": "hi-1", "customer": "hi", "priority": 9, "input": items(600)}),
    )
    .await;
    env.wait_for("hi-1", Duration::from_secs(30), "a share", |j| {
        j.steps[0].share.is_some()
    })
    .await;
    // Its demand reaches the other partitions at their next ticks.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let reply = env
        .submit(
            "fair",
            json!({"job_id": "lo-1", "customer": "lo", "priority": 2, "input": items(20)}),
        )
        .await;
    assert!(reply.ok);
    let lo = env
        .wait_for(
            "lo-1",
            Duration::from_secs(30),
            "waiting for a lower priority",
            |j| {
                j.steps
                    .first()
                    .and_then(|s| s.share.as_ref())
                    .is_some_and(|s| s.waiting == Some(WaitReason::LowerPriority))
            },
        )
        .await;
    assert_eq!(lo.steps[0].share.as_ref().unwrap().slots, 0);
    assert_eq!(lo.steps[0].share.as_ref().unwrap().capacity, 10);
    let hi = env.wait_end("hi-1", Duration::from_secs(60)).await;
    let lo = env.wait_end("lo-1", Duration::from_secs(60)).await;
    assert_eq!((hi.steps[0].completed, lo.steps[0].completed), (600, 20));
    // The lower priority started after the higher one's subjobs had all
    // started (it aged one level at most: a minute had not passed).
    let starts = ledger.lock().unwrap().starts.clone();
    let first_lo = starts.iter().position(|j| j == "lo-1").expect("lo started");
    let hi_after = starts[first_lo..].iter().filter(|j| *j == "hi-1").count();
    assert_eq!(
        hi_after, 0,
        "the higher priority's subjobs all started first"
    );
    let refused = env
        .submit(
            "fair",
            json!({"customer": "x", "priority": 10, "input": items(1)}),
        )
        .await;
    assert_eq!(
        refused.error.map(|e| e.code),
        Some(fanjet::protocol::RejectCode::InvalidPriority)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caps_of_customers_and_steps_are_never_exceeded_across_managers() {
    let mut env = Env::start().await;
    fair_workflow(&env, "fair", "").await;
    fair_workflow(&env, "narrow", "max_concurrency = 4").await;
    tenants::put(
        &env.nats.js,
        &Tenant {
            max_concurrency: Some(3),
            ..Tenant::new("acme")
        },
    )
    .await
    .unwrap();
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let narrow = Arc::new(Mutex::new(Ledger::default()));
    env.worker(ledger_worker(
        &env,
        "fair",
        20,
        Duration::from_millis(30),
        ledger.clone(),
    ));
    env.worker(ledger_worker(
        &env,
        "narrow",
        20,
        Duration::from_millis(50),
        narrow.clone(),
    ));
    // Two managers: the jobs' partitions are split between them.
    env.manager();
    env.manager();
    let acme: Vec<String> = (1..=4).map(|i| format!("acme-{i}")).collect();
    let partitions: std::collections::BTreeSet<u32> = acme.iter().map(|id| partition(id)).collect();
    assert!(partitions.len() > 1, "acme's jobs span partitions");
    for id in &acme {
        env.submit(
            "fair",
            json!({"job_id": id, "customer": "acme", "input": items(60)}),
        )
        .await;
    }
    env.submit(
        "fair",
        json!({"job_id": "other-1", "customer": "other", "input": items(200)}),
    )
    .await;
    for i in 0..3 {
        env.submit(
            "narrow",
            json!({"job_id": format!("n{i}-1"), "customer": format!("n{i}"), "input": items(60)}),
        )
        .await;
    }
    for id in acme
        .iter()
        .map(String::as_str)
        .chain(["other-1", "n0-1", "n1-1", "n2-1"])
    {
        let job = env.wait_end(id, Duration::from_secs(120)).await;
        assert_eq!(job.steps[0].completed, job.steps[0].total, "{id}");
    }
    // Never above a cap, and (the jobs run for seconds, many ticks) the
    // cap was used.
    let l = ledger.lock().unwrap();
    assert_eq!(l.most["acme"], 3, "acme's cap is 3 (and it was reached)");
    assert!(l.most["other"] > 3, "other has no cap: {}", l.most["other"]);
    assert_eq!(
        narrow.lock().unwrap().step_most,
        4,
        "the step's cap is 4 (and it was reached)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_task_leaks_no_room_under_a_cap() {
    let mut env = Env::start().await;
    fair_workflow(&env, "capped", "timeout = \"1s\"\nmax_attempts = 5").await;
    tenants::put(
        &env.nats.js,
        &Tenant {
            max_concurrency: Some(2),
            ..Tenant::new("acme")
        },
    )
    .await
    .unwrap();
    env.manager();
    let worker = env.spawn(&[
        "worker",
        "--workflow",
        "capped",
        "--step",
        "work",
        "--sleep",
        "3s",
        "--concurrency",
        "4",
    ]);
    env.submit(
        "capped",
        json!({"job_id": "acme-1", "customer": "acme", "input": items(6)}),
    )
    .await;
    env.wait_for(
        "acme-1",
        Duration::from_secs(30),
        "two subjobs dispatched",
        |j| j.steps[0].dispatched >= 2,
    )
    .await;
    // Its two tasks are running there when it dies: they come back after
    // their ack deadline, to the next worker, within the same room.
    tokio::time::sleep(Duration::from_millis(500)).await;
    env.kill(worker);
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    env.worker(ledger_worker(
        &env,
        "capped",
        10,
        Duration::from_millis(50),
        ledger.clone(),
    ));
    let job = env.wait_end("acme-1", Duration::from_secs(60)).await;
    assert_eq!((job.steps[0].completed, job.steps[0].failed), (6, 0));
    assert!(ledger.lock().unwrap().most["acme"] <= 2);
    // The room is given back: the reservations under acme's cap come to
    // nothing once no job of acme runs, and a next job gets the full cap.
    let shares = env
        .nats
        .js
        .get_key_value(fanjet::protocol::SHARES_BUCKET)
        .await
        .unwrap();
    let key = fanjet::protocol::customer_cap_key("acme");
    let start = std::time::Instant::now();
    loop {
        let r: fanjet::protocol::Reservations = match shares.get(&key).await.unwrap() {
            Some(b) => serde_json::from_slice(&b).unwrap(),
            None => Default::default(),
        };
        if r.partitions.values().sum::<u64>() == 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "still reserved: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    env.submit(
        "capped",
        json!({"job_id": "acme-2", "customer": "acme", "input": items(20)}),
    )
    .await;
    env.wait_end("acme-2", Duration::from_secs(60)).await;
    assert_eq!(ledger.lock().unwrap().most["acme"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_are_set_from_the_cli_and_usage_is_shown_per_customer() {
    let mut env = Env::start().await;
    fair_workflow(&env, "fair", "").await;
    let (ok, out) = cli(
        &env,
        &[
            "tenants",
            "set",
            "acme",
            "--weight",
            "3",
            "--max-concurrency",
            "5",
        ],
    );
    assert!(ok, "{out}");
    assert!(out.contains("acme: weight 3, max concurrency 5"), "{out}");
    let (ok, out) = cli(&env, &["tenants", "set", "acme", "--no-max-concurrency"]);
    assert!(ok && out.contains("acme: weight 3, no cap"), "{out}");
    let (ok, out) = cli(&env, &["tenants", "set", "acme"]);
    assert!(!ok && out.contains("nothing to set"), "{out}");
    let (ok, out) = cli(&env, &["tenants", "list", "--json"]);
    assert!(ok, "{out}");
    let list: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(list[0]["customer"], "acme");
    assert_eq!(list[0]["weight"], 3);

    let ledger = Arc::new(Mutex::new(Ledger::default()));
    env.worker(ledger_worker(
        &env,
        "fair",
        4,
        Duration::from_millis(100),
        ledger,
    ));
    env.manager();
    env.submit(
        "fair",
        json!({"job_id": "acme-1", "customer": "acme", "input": items(400)}),
    )
    .await;
    env.submit(
        "fair",
        json!({"job_id": "bob-1", "customer": "bob", "input": items(400)}),
    )
    .await;
    // Each holds its share (3 : 1 by weight) and the rest waits.
    let start = std::time::Instant::now();
    let usage = loop {
        let (ok, out) = cli(&env, &["jobs", "--by-customer", "--json"]);
        assert!(ok, "{out}");
        let usage: Vec<fanjet::protocol::CustomerUsage> = serde_json::from_str(&out).unwrap();
        if usage.len() == 2 && usage.iter().all(|u| u.jobs == 1 && u.running > 0) {
            break usage;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "{usage:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let acme = usage.iter().find(|u| u.customer == "acme").unwrap();
    let bob = usage.iter().find(|u| u.customer == "bob").unwrap();
    assert_eq!((acme.weight, bob.weight), (3, 1));
    assert!(acme.queued > 300 && bob.queued > 300, "{usage:?}");
    let acme_job = env
        .wait_for(
            "acme-1",
            Duration::from_secs(20),
            "its weighted share",
            |j| j.steps[0].share.as_ref().is_some_and(|s| s.slots == 3),
        )
        .await;
    assert_eq!(acme_job.steps[0].share.as_ref().unwrap().capacity, 4);
    let (ok, out) = cli(&env, &["status", "acme-1"]);
    assert!(ok && out.contains("share: 3 of 4 slots"), "{out}");
    let (ok, out) = cli(&env, &["jobs", "--by-customer"]);
    assert!(ok && out.contains("acme") && out.contains("bob"), "{out}");
    // The API and Prometheus show the same.
    let (base, _stop) = env.serve(Default::default()).await;
    let api: Vec<fanjet::protocol::CustomerUsage> = reqwest::get(format!("{base}/api/customers"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        api.iter().any(|u| u.customer == "acme" && u.weight == 3),
        "{api:?}"
    );
    let start = std::time::Instant::now();
    loop {
        let text = reqwest::get(format!("{base}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if text.contains("fanjet_customer_subjobs{customer=\"acme\",state=\"queued\"}") {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "no per-customer gauge:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}
