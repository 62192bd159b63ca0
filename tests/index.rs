//! The job index: listings, filters, cursors and counts answered from
//! `FANJET_INDEX` agree with the job records, through a restart of the
//! index consumer and a redrive, over the API, the CLI and the customer
//! listing service.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::{cli, Env};
use fanjet::nats::{index, store};
use fanjet::protocol::{IndexCounts, IndexFilter, JobState, ListRequest};
use fanjet::worker::{TaskContext, TaskError, Worker};
use serde_json::{json, Value};

/// A task step whose input says how it ends: `"ok"`, `"fail"` (gives up)
/// or `"wait"` (runs until cancelled).
async fn env_with_workflows() -> Env {
    let mut env = Env::start().await;
    for wf in ["billing", "reports"] {
        env.apply(&format!(
            "name = \"{wf}\"\n[[steps]]\nname = \"t\"\nkind = \"task\"\ntimeout = \"30s\"\nmax_attempts = 1\n"
        ))
        .await;
    }
    env.manager();
    let handler = |c: TaskContext| async move {
        match c.task.input.as_str() {
            Some("fail") => Err(TaskError::give_up("asked to fail")),
            Some("wait") => {
                tokio::time::sleep(Duration::from_secs(600)).await;
                Ok(json!(null))
            }
            _ => Ok(json!("done")),
        }
    };
    let worker = Worker::new(env.nats.clone())
        .concurrency(32)
        .handler("billing", "t", handler)
        .handler("reports", "t", handler);
    env.worker(worker);
    env
}

/// What the records say: (customer, workflow, state) per job id.
async fn truth(env: &Env, ids: &[String]) -> BTreeMap<String, (String, String, JobState)> {
    let mut out = BTreeMap::new();
    for id in ids {
        let (job, _) = store::get(&env.nats, id)
            .await
            .expect("read record")
            .expect("recorded");
        out.insert(
            id.clone(),
            (job.customer.unwrap_or_default(), job.workflow, job.state),
        );
    }
    out
}

fn counts_of<'a>(
    jobs: impl Iterator<Item = &'a (String, String, JobState)>,
    customer: Option<&str>,
) -> IndexCounts {
    let mut c = IndexCounts::default();
    for (_, wf, st) in jobs.filter(|j| customer.is_none_or(|c| j.0 == c)) {
        c.total += 1;
        *c.states.entry(st.as_str().into()).or_default() += 1;
        *c.workflows
            .entry(wf.clone())
            .or_default()
            .entry(st.as_str().into())
            .or_default() += 1;
    }
    c
}

/// Every page of a listing, following cursors: the ids in order, and how
/// many pages it took.
async fn all_pages(env: &Env, filter: &IndexFilter, req: ListRequest) -> (Vec<String>, usize) {
    let mut ids = Vec::new();
    let mut req = req;
    let mut pages = 0;
    loop {
        let page = index::list(&env.nats, filter, &req).await.expect("list");
        pages += 1;
        // Newest first: a cell's jobs in the order their changes were
        // logged in the cell's log (the cells' readers write side by side).
        let mut last_seq = [u64::MAX; fanjet::protocol::CELLS as usize];
        for j in &page.jobs {
            assert!(filter.keeps(j), "{j:?} does not match {filter:?}");
            let last = &mut last_seq[fanjet::protocol::job_cell(&j.job_id) as usize];
            assert!(j.seq < *last, "not newest first: {page:?}");
            *last = j.seq;
            ids.push(j.job_id.clone());
        }
        match page.next_cursor {
            Some(c) => req.cursor = Some(c),
            None => return (ids, pages),
        }
        assert!(pages < 100, "the cursor never ends");
    }
}

async fn wait_counts(env: &Env, want: &IndexCounts) {
    let start = Instant::now();
    loop {
        let got = index::counts(&env.nats, &IndexFilter::default())
            .await
            .expect("counts");
        if &got == want {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the index never agreed with the records:\nindex {got:?}\nrecords {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn listings_pages_and_counts_agree_with_the_records() {
    let env = env_with_workflows().await;
    let customers = ["acme", "globex", "a customer, with spaces"];
    let mut ids = Vec::new();
    let mut waiting = Vec::new();
    // 60 jobs: three customers, two workflows, three endings.
    for i in 0..60 {
        let customer = customers[i % 3];
        let workflow = ["billing", "reports"][i / 3 % 2];
        let input = match i % 5 {
            0 => "fail",
            1 if i % 10 == 1 => "wait",
            _ => "ok",
        };
        let id = format!("ix-{i:02}");
        let reply = env
            .submit(
                workflow,
                json!({"job_id": id, "customer": customer, "input": input}),
            )
            .await;
        assert!(reply.ok, "{reply:?}");
        if input == "wait" {
            waiting.push(id.clone());
        } else {
            env.wait_end(&id, Duration::from_secs(30)).await;
        }
        ids.push(id);
    }
    // Two of the waiting ones are cancelled; the others keep running.
    for id in &waiting[..2] {
        fanjet::client::cancel(&env.nats, id, Some("not needed".into()))
            .await
            .expect("cancel");
        env.wait_end(id, Duration::from_secs(30)).await;
    }
    for id in &waiting[2..] {
        env.wait_for(id, Duration::from_secs(30), "running", |j| {
            j.state == JobState::Running
        })
        .await;
    }
    let jobs = truth(&env, &ids).await;
    wait_counts(&env, &counts_of(jobs.values(), None)).await;

    // Each customer's jobs, page after page, exactly once each.
    for customer in customers {
        let filter = IndexFilter {
            customer: Some(customer.into()),
            ..Default::default()
        };
        let req = ListRequest {
            limit: Some(7),
            ..Default::default()
        };
        let (listed, pages) = all_pages(&env, &filter, req).await;
        let want: BTreeSet<&String> = jobs
            .iter()
            .filter(|j| j.1 .0 == customer)
            .map(|j| j.0)
            .collect();
        assert_eq!(listed.len(), want.len(), "{customer}: {listed:?}");
        assert_eq!(listed.iter().collect::<BTreeSet<_>>(), want, "{customer}");
        assert!(
            pages >= 3,
            "{customer}: 20 jobs in pages of 7 took {pages} pages"
        );
        let counts = index::counts(&env.nats, &filter).await.expect("counts");
        assert_eq!(
            counts,
            counts_of(jobs.values(), Some(customer)),
            "{customer}"
        );
    }
    // One state across customers, and every filter at once.
    for state in [
        JobState::Failed,
        JobState::Completed,
        JobState::Running,
        JobState::Cancelled,
    ] {
        let filter = IndexFilter {
            state: Some(state),
            ..Default::default()
        };
        let (listed, _) = all_pages(&env, &filter, ListRequest::default()).await;
        let want: BTreeSet<&String> = jobs
            .iter()
            .filter(|j| j.1 .2 == state)
            .map(|j| j.0)
            .collect();
        assert_eq!(listed.iter().collect::<BTreeSet<_>>(), want, "{state:?}");
        assert!(!want.is_empty(), "{state:?}");
    }
    let filter = IndexFilter {
        customer: Some("globex".into()),
        workflow: Some("reports".into()),
        state: Some(JobState::Completed),
    };
    let (listed, _) = all_pages(&env, &filter, ListRequest::default()).await;
    let want: BTreeSet<&String> = jobs
        .iter()
        .filter(|j| j.1 == &("globex".into(), "reports".into(), JobState::Completed))
        .map(|j| j.0)
        .collect();
    assert_eq!(listed.iter().collect::<BTreeSet<_>>(), want);
    // A job id prefix.
    let (listed, _) = all_pages(
        &env,
        &IndexFilter::default(),
        ListRequest {
            prefix: Some("ix-1".into()),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        listed.iter().collect::<BTreeSet<_>>(),
        (10..20)
            .map(|i| format!("ix-{i}"))
            .collect::<BTreeSet<_>>()
            .iter()
            .collect()
    );
    // A bad cursor is the caller's mistake, said so.
    let bad = index::list(
        &env.nats,
        &IndexFilter::default(),
        &ListRequest {
            cursor: Some("yesterday".into()),
            ..Default::default()
        },
    )
    .await;
    assert!(
        matches!(bad, Err(index::IndexError::BadRequest(_))),
        "{bad:?}"
    );

    // A time range: jobs that changed after a moment, and before it.
    let mark = fanjet::protocol::now_ms();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut later = Vec::new();
    for i in 0..5 {
        let id = format!("late-{i}");
        env.submit(
            "billing",
            json!({"job_id": id, "customer": "acme", "input": "ok"}),
        )
        .await;
        env.wait_end(&id, Duration::from_secs(30)).await;
        later.push(id);
    }
    ids.extend(later.clone());
    let jobs = truth(&env, &ids).await;
    wait_counts(&env, &counts_of(jobs.values(), None)).await;
    let since = ListRequest {
        since: Some(mark),
        ..Default::default()
    };
    let (listed, _) = all_pages(&env, &IndexFilter::default(), since).await;
    assert_eq!(
        listed.iter().collect::<BTreeSet<_>>(),
        later.iter().collect::<BTreeSet<_>>()
    );
    let until = ListRequest {
        until: Some(mark),
        ..Default::default()
    };
    let (listed, _) = all_pages(&env, &IndexFilter::default(), until).await;
    assert_eq!(listed.len(), 60);

    // A redrive moves a failed job back to running, then to its new end.
    let failed = "ix-00";
    env.wait_for(failed, Duration::from_secs(5), "failed", |j| {
        j.state == JobState::Failed
    })
    .await;
    fanjet::client::redrive(&env.nats, failed, None, None)
        .await
        .expect("redrive");
    env.wait_for(
        failed,
        Duration::from_secs(30),
        "a second run that failed",
        |j| j.run == 1 && j.state == JobState::Failed,
    )
    .await;
    let jobs = truth(&env, &ids).await;
    wait_counts(&env, &counts_of(jobs.values(), None)).await;
    let page = index::list(&env.nats, &IndexFilter::default(), &ListRequest::default())
        .await
        .expect("list");
    assert_eq!(
        page.jobs[0].job_id, failed,
        "the job that changed last comes first"
    );
    assert_eq!(page.jobs[0].run, 1);

    // Over the API (with the running jobs' progress) and the CLI.
    let mut env = env;
    let (base, _stop) = env.serve(Default::default()).await;
    let api: Value = reqwest::get(format!("{base}/api/jobs?customer=acme&limit=5&counts=true"))
        .await
        .expect("GET")
        .json()
        .await
        .expect("json");
    assert_eq!(api["jobs"].as_array().map(Vec::len), Some(5), "{api}");
    assert!(api["next_cursor"].is_string(), "{api}");
    assert_eq!(
        serde_json::from_value::<IndexCounts>(api["counts"].clone()).unwrap(),
        counts_of(jobs.values(), Some("acme"))
    );
    let running: Value = reqwest::get(format!("{base}/api/jobs?state=running"))
        .await
        .expect("GET")
        .json()
        .await
        .expect("json");
    assert!(
        running["jobs"]
            .as_array()
            .is_some_and(|a| !a.is_empty() && a.iter().all(|j| j["step"] == "t")),
        "{running}"
    );
    let code = reqwest::get(format!("{base}/api/jobs?state=sleeping"))
        .await
        .expect("GET")
        .status();
    assert_eq!(code, 400);
    let (ok, out) = cli(&env, &["jobs", "--state", "failed", "--counts"]);
    assert!(ok, "{out}");
    assert!(out.contains("ix-05") && out.contains("billing"), "{out}");
    let (ok, out) = cli(
        &env,
        &["jobs", "--customer", "acme", "--limit", "2", "--json"],
    );
    assert!(ok, "{out}");
    let page: Value = serde_json::from_str(&out).expect("json page");
    assert_eq!(page["jobs"].as_array().map(Vec::len), Some(2), "{page}");
    let cursor = page["next_cursor"].as_str().expect("a cursor").to_string();
    let (ok, out) = cli(
        &env,
        &[
            "jobs",
            "--customer",
            "acme",
            "--limit",
            "2",
            "--cursor",
            &cursor,
            "--json",
        ],
    );
    assert!(ok, "{out}");
    let next: Value = serde_json::from_str(&out).expect("json page");
    assert_ne!(next["jobs"][0]["job_id"], page["jobs"][0]["job_id"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restarted_index_consumer_counts_nothing_twice() {
    let env = env_with_workflows().await;
    let mut ids = Vec::new();
    for i in 0..30 {
        let id = format!("rs-{i:02}");
        env.submit("billing", json!({"job_id": id, "customer": "acme", "input": if i % 4 == 0 { "fail" } else { "ok" }}))
            .await;
        ids.push(id);
    }
    for id in &ids {
        env.wait_end(id, Duration::from_secs(30)).await;
    }
    let jobs = truth(&env, &ids).await;
    wait_counts(&env, &counts_of(jobs.values(), None)).await;
    // Its consumer read again from the start, as after a crash that lost
    // every acknowledgement: the entries stay one per job.
    for log in &env.nats.events {
        log.delete_consumer(fanjet::protocol::INDEX_CONSUMER)
            .await
            .expect("delete the index consumer");
    }
    for i in 30..40 {
        let id = format!("rs-{i:02}");
        env.submit(
            "billing",
            json!({"job_id": id, "customer": "acme", "input": "ok"}),
        )
        .await;
        env.wait_end(&id, Duration::from_secs(30)).await;
        ids.push(id);
    }
    let jobs = truth(&env, &ids).await;
    wait_counts(&env, &counts_of(jobs.values(), None)).await;
    let info = env.nats.index.get_info().await.expect("index info");
    assert_eq!(info.state.messages, 40, "one entry per job");

    // Each entry lives as long as its job's record: its TTL is the
    // record's age limit, less the time since the change.
    let last = env
        .nats
        .index
        .direct_get(info.state.last_sequence)
        .await
        .expect("the newest entry");
    let ttl: u64 = last
        .headers
        .get("Nats-TTL")
        .expect("a TTL")
        .as_str()
        .parse()
        .expect("seconds");
    let full = fanjet::nats::RECORDS_MAX_AGE.as_secs();
    assert!((full - 60..=full).contains(&ttl), "TTL {ttl} s");
    // An entry written by a consumer that stopped before storing its place
    // is found, not written twice.
    let summary: fanjet::protocol::JobSummary =
        serde_json::from_slice(&last.payload).expect("a summary");
    let found = index::find_entry(&env.nats, &summary, summary.changed_at - 1000)
        .await
        .expect("look for it");
    assert_eq!(found, Some(info.state.last_sequence));
    let mut other = summary.clone();
    other.seq += 1;
    assert_eq!(
        index::find_entry(&env.nats, &other, summary.changed_at - 1000)
            .await
            .expect("look for it"),
        None
    );
}

/// A consumer whose lease has passed (a manager frozen past it, woken while
/// another runs the index) writes nothing more: the first batch it reads
/// after its fence lapsed ends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_consumer_past_its_lease_writes_nothing() {
    use fanjet::nats::leases::{self, Lease};
    use fanjet::protocol::{Event, JobCompleted, JobRequested};
    let env = Env::start().await;
    let job = |id: &str| {
        let requested = Event::JobRequested(JobRequested {
            job_id: id.into(),
            workflow: "wf".into(),
            customer: Some("acme".into()),
            input: Value::Null,
            priority: None,
            at: fanjet::protocol::now_ms(),
            deadline_at: None,
        });
        let completed = Event::JobCompleted(JobCompleted {
            job_id: id.into(),
            workflow: "wf".into(),
            output: Value::Null,
            run: 0,
            at: fanjet::protocol::now_ms(),
        });
        [requested, completed]
    };
    for e in job("f-1") {
        fanjet::nats::log::append(&env.nats, &e)
            .await
            .expect("append");
    }
    let kv = leases::bucket(&env.nats).await.expect("leases");
    let lease = Lease::claim(&kv, "exclusive.index-test", "me")
        .await
        .expect("claim")
        .expect("free");
    let claimed = Instant::now();
    let cancel = tokio_util::sync::CancellationToken::new();
    let run = tokio::spawn(fanjet::manager::index::run(
        env.nats.clone(),
        cancel.clone(),
        Some(lease.fence()),
    ));
    let counted = |n: u64| {
        let nats = env.nats.clone();
        async move {
            let c = index::counts(&nats, &IndexFilter::default())
                .await
                .expect("counts");
            c.total == n
        }
    };
    while !counted(1).await {
        assert!(
            claimed.elapsed() < fanjet::nats::leases::LEASE_VALID,
            "f-1 not indexed while the lease held"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Never renewed: the fence lapses.
    tokio::time::sleep(
        fanjet::nats::leases::LEASE_VALID.saturating_sub(claimed.elapsed())
            + Duration::from_millis(200),
    )
    .await;
    for e in job("f-2") {
        fanjet::nats::log::append(&env.nats, &e)
            .await
            .expect("append");
    }
    let ended = tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("the consumer stops at its next batch")
        .expect("join");
    assert!(
        matches!(ended, Err(fanjet::manager::index::IndexerError::Fenced(_))),
        "{ended:?}"
    );
    assert!(counted(1).await, "f-2 was indexed after the lease passed");
    let page = index::list(&env.nats, &IndexFilter::default(), &ListRequest::default())
        .await
        .expect("list");
    assert_eq!(
        page.jobs
            .iter()
            .map(|j| j.job_id.as_str())
            .collect::<Vec<_>>(),
        ["f-1"]
    );
}

/// A consumer that stopped after writing a job's entry and before storing
/// its place, in the middle of a batch, leaves that entry behind; the next
/// one reads the batch again with the job's later events in it, so it
/// writes another summary: it finds the entry left and deletes it, and the
/// job is counted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_left_by_a_consumer_stopped_mid_batch_is_not_counted_twice() {
    use fanjet::protocol::{job_cell, Event, JobCompleted, JobRequested, INDEX_BUCKET};
    let env = Env::start().await;
    let id = "orphan-1";
    let requested = Event::JobRequested(JobRequested {
        job_id: id.into(),
        workflow: "wf".into(),
        customer: Some("acme".into()),
        input: Value::Null,
        priority: None,
        at: fanjet::protocol::now_ms(),
        deadline_at: None,
    });
    let seq = fanjet::nats::log::append(&env.nats, &requested)
        .await
        .expect("append")
        .seq;
    // The consumer before: the job's entry as its request left it, sent;
    // its place not stored, the batch not marked done.
    let summary = fanjet::protocol::change(None, seq, &requested).expect("a summary");
    index::send_entry(&env.nats, &summary, fanjet::protocol::now_ms())
        .await
        .expect("send")
        .expect("not expired")
        .await
        .expect("stored");
    let positions = env
        .nats
        .js
        .get_key_value(INDEX_BUCKET)
        .await
        .expect("positions");
    positions
        .put(format!("index.writing.{}", job_cell(id)), "begun".into())
        .await
        .expect("mark");
    // The job ended meanwhile: the next batch reads both events.
    let completed = Event::JobCompleted(JobCompleted {
        job_id: id.into(),
        workflow: "wf".into(),
        output: Value::Null,
        run: 0,
        at: fanjet::protocol::now_ms(),
    });
    fanjet::nats::log::append(&env.nats, &completed)
        .await
        .expect("append");
    let cancel = tokio_util::sync::CancellationToken::new();
    let run = tokio::spawn(fanjet::manager::index::run(
        env.nats.clone(),
        cancel.clone(),
        None,
    ));
    let start = Instant::now();
    loop {
        let pos = index::position(&positions, id).await.expect("position");
        if pos.is_some_and(|p| p.summary.state == JobState::Completed) {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "never indexed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let info = env.nats.index.get_info().await.expect("index info");
    assert_eq!(info.state.messages, 1, "the entry left behind is gone");
    let counts = index::counts(&env.nats, &IndexFilter::default())
        .await
        .expect("counts");
    assert_eq!(counts.total, 1);
    cancel.cancel();
    let _ = run.await;
}
