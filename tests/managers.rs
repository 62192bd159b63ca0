//! Several managers split the event log's partitions through leases: a
//! second manager takes half of them, and when one of two managers is
//! SIGKILLed mid-jobs, the other takes its partitions over and every job
//! ends with exact counts, each step started once; a manager stopped with
//! SIGTERM hands its partitions over as it exits; one joining mid-jobs takes
//! its share while they run, and no count is lost; one frozen past its lease
//! writes nothing once it wakes.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::Env;
use fanjet::protocol::JobState;
use fanjet::protocol::{partition, LEASES_BUCKET, LEASE_TTL, MANAGER_HEADER, PARTITIONS};
use serde_json::json;

async fn lease_bucket(env: &Env) -> async_nats::jetstream::kv::Store {
    env.nats
        .js
        .get_key_value(LEASES_BUCKET)
        .await
        .expect("lease bucket")
}

/// Partition → the manager holding its lease.
async fn holders(env: &Env) -> BTreeMap<u32, String> {
    fanjet::nats::leases::holders(&env.nats)
        .await
        .expect("read leases")
        .0
}

/// How many partitions each manager holds, once every partition is held.
async fn wait_split(env: &Env, managers: usize, within: Duration) -> BTreeMap<String, Vec<u32>> {
    let start = Instant::now();
    loop {
        let held = holders(env).await;
        let mut by: BTreeMap<String, Vec<u32>> = BTreeMap::new();
        for (p, m) in &held {
            by.entry(m.clone()).or_default().push(*p);
        }
        let even = by
            .values()
            .all(|ps| ps.len() == PARTITIONS as usize / managers);
        if held.len() == PARTITIONS as usize && by.len() == managers && even {
            return by;
        }
        assert!(
            start.elapsed() < within,
            "partitions never split between {managers} managers: {by:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn managers_split_partitions_and_take_over_a_killed_one() {
    let mut env = Env::start().await;
    let extra = "timeout = \"5s\"\nmax_in_flight = 40";
    env.one_fanout("many", extra, 16, Duration::from_millis(20))
        .await;

    let first = env.spawn(&["manager"]);
    let alone = wait_split(&env, 1, Duration::from_secs(20)).await;
    let first_id = alone.keys().next().expect("one manager").clone();
    env.spawn(&["manager"]);
    let split = wait_split(&env, 2, Duration::from_secs(30)).await;
    assert!(split.contains_key(&first_id), "{split:?}");
    let first_parts = &split[&first_id];

    // Who runs what, as `fanjet processes` shows it (heartbeats included).
    let out = common::fanjet_command(&env.url(), &["processes", "--json", "--listen", "7s"])
        .stdout(std::process::Stdio::piped())
        .output()
        .expect("fanjet processes");
    assert!(out.status.success());
    let shown: fanjet::observe::processes::Processes =
        serde_json::from_slice(&out.stdout).expect("processes JSON");
    assert_eq!(shown.managers.len(), 2, "{shown:?}");
    for m in &shown.managers {
        assert_eq!(m.partitions, split[&m.id], "{shown:?}");
        assert!(m.seen_ms_ago.is_some(), "heartbeat heard: {shown:?}");
    }
    assert!(shown.unowned_partitions.is_empty());
    assert_eq!(shown.workers.len(), 1, "the in-process worker: {shown:?}");
    assert_eq!(shown.workers[0].slots, 16);

    // Jobs on both managers' partitions.
    let ids: Vec<String> = (0..12).map(|i| format!("mm-{i}")).collect();
    let on_first = ids
        .iter()
        .filter(|id| first_parts.contains(&partition(id)))
        .count();
    assert!(
        on_first > 0 && on_first < ids.len(),
        "test ids should land on both managers: {on_first} of {}",
        ids.len()
    );
    let input: Vec<u32> = (0..150).collect();
    for id in &ids {
        assert!(
            env.submit("many", json!({"job_id": id, "input": input}))
                .await
                .ok
        );
    }
    // Kill the first manager while its jobs are under way.
    let victim = ids
        .iter()
        .find(|id| first_parts.contains(&partition(id)))
        .expect("a job of the first manager");
    env.wait_for(victim, Duration::from_secs(60), "progress", |j| {
        j.steps[0].completed >= 10
    })
    .await;
    env.kill(first);

    for id in &ids {
        let job = env.wait_end(id, Duration::from_secs(120)).await;
        assert_eq!(job.state, JobState::Completed, "{id}: {:?}", job.error);
        assert_eq!(
            (
                job.steps[0].total,
                job.steps[0].completed,
                job.steps[0].failed
            ),
            (150, 150, 0),
            "{id}"
        );
        let started = env
            .events(id)
            .await
            .iter()
            .filter(|e| e["type"] == "StepStarted")
            .count();
        assert_eq!(started, 1, "{id}: the step started {started} times");
    }
    let survivor = wait_split(&env, 1, Duration::from_secs(30)).await;
    assert!(!survivor.contains_key(&first_id), "{survivor:?}");

    // A manager stopped with SIGTERM hands its partitions over as it
    // exits, instead of leaving leases to expire.
    let mut third = common::fanjet_command(&env.url(), &["manager"])
        .spawn()
        .expect("start a third manager");
    let split = wait_split(&env, 2, Duration::from_secs(30)).await;
    let third_id = split
        .keys()
        .find(|id| !survivor.contains_key(*id))
        .expect("the third manager holds partitions")
        .clone();
    let term = std::process::Command::new("kill")
        .args(["-TERM", &third.id().to_string()])
        .status()
        .expect("kill -TERM");
    assert!(term.success());
    let status = tokio::task::spawn_blocking(move || third.wait())
        .await
        .expect("join")
        .expect("wait");
    assert!(status.success(), "manager exits cleanly: {status:?}");
    // Leases live 3 s unrenewed: one still naming the third manager now
    // would mean it was left to expire.
    let left = holders(&env).await;
    assert!(
        left.values().all(|m| *m != third_id),
        "leases left behind by a graceful stop: {left:?}"
    );
    wait_split(&env, 1, Duration::from_secs(30)).await;
}

/// Waits until the statistics record of `job_id` counts `n` completed subjobs
/// and the job's outcome.
async fn wait_stats(env: &Env, job_id: &str, n: u64) {
    let start = Instant::now();
    loop {
        let stats = fanjet::nats::store::stats(&env.nats, job_id)
            .await
            .expect("stats");
        let counts = stats
            .as_ref()
            .and_then(|s| s.steps.first())
            .map(|s| (s.completed, s.failed));
        if counts == Some((n, 0)) && stats.as_ref().is_some_and(|s| s.outcome.is_some()) {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{job_id}: statistics never counted {n} subjobs: {counts:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_serve_processes_count_statistics_once_and_hand_over() {
    let mut env = Env::start().await;
    env.one_fanout("st", "", 8, Duration::ZERO).await;
    env.manager();
    let kv = lease_bucket(&env).await;
    let holder = || async {
        kv.get(fanjet::protocol::exclusive_key("statistics"))
            .await
            .ok()
            .flatten()
            .map(|v| String::from_utf8_lossy(&v).into_owned())
    };
    // The first serve takes the statistics role before the second starts.
    let (base, first) = env.serve(Default::default()).await;
    let start = Instant::now();
    let before = loop {
        if let Some(h) = holder().await {
            break h;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no serve took the statistics lease"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (_, _second) = env.serve(Default::default()).await;

    let input: Vec<u32> = (0..300).collect();
    assert!(
        env.submit("st", json!({"job_id": "s1", "input": input}))
            .await
            .ok
    );
    let job = env.wait_end("s1", Duration::from_secs(60)).await;
    assert_eq!(job.state, JobState::Completed);
    wait_stats(&env, "s1", 300).await;
    assert_eq!(
        holder().await.as_ref(),
        Some(&before),
        "the second serve stood by"
    );
    let shown: fanjet::observe::processes::Processes =
        reqwest::get(format!("{base}/api/processes"))
            .await
            .expect("GET /api/processes")
            .json()
            .await
            .expect("processes JSON");
    assert_eq!(shown.managers.len(), 1, "{shown:?}");
    assert_eq!(shown.managers[0].partitions.len(), PARTITIONS as usize);
    assert!(shown.unowned_partitions.is_empty());

    // Stop the first serve, the reader: the second takes over.
    first.cancel();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        env.submit("st", json!({"job_id": "s2", "input": input}))
            .await
            .ok
    );
    env.wait_end("s2", Duration::from_secs(60)).await;
    wait_stats(&env, "s2", 300).await;
    let after = holder().await.expect("the statistics lease is held");
    assert_ne!(after, before, "the second serve reads statistics now");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manager_joining_mid_jobs_takes_its_share_without_losing_counts() {
    let mut env = Env::start().await;
    // 16 slots × 10 ms: the jobs below take at least 11 s.
    let extra = "timeout = \"5s\"\nmax_in_flight = 40";
    env.one_fanout("join", extra, 16, Duration::from_millis(10))
        .await;
    env.spawn(&["manager"]);
    wait_split(&env, 1, Duration::from_secs(20)).await;
    let input: Vec<u32> = (0..1500).collect();
    let ids: Vec<String> = (0..12).map(|i| format!("join-{i}")).collect();
    for id in &ids {
        assert!(
            env.submit("join", json!({"job_id": id, "input": input}))
                .await
                .ok
        );
    }
    env.wait_for(&ids[0], Duration::from_secs(60), "progress", |j| {
        j.steps[0].completed >= 100
    })
    .await;
    // The first manager hands half its partitions over while their jobs run.
    env.spawn(&["manager"]);
    wait_split(&env, 2, Duration::from_secs(30)).await;
    let mut running = 0;
    for id in &ids {
        if let Some((job, _)) = fanjet::nats::store::get(&env.nats, id)
            .await
            .expect("status")
        {
            running += usize::from(!job.state.is_terminal());
        }
    }
    assert!(running > 0, "the jobs ended before the hand-over");
    for id in &ids {
        let job = env.wait_end(id, Duration::from_secs(120)).await;
        assert_eq!(job.state, JobState::Completed, "{id}: {:?}", job.error);
        assert_eq!(
            (job.steps[0].completed, job.steps[0].failed),
            (1500, 0),
            "{id}"
        );
    }
}

/// Everything written for one job (its events, its record and its pending
/// chunks) and for its partition's lease, each with the time it was stored
/// and the manager that wrote it (named in a header; a lease by its value),
/// recorded live: the buckets keep one revision per key.
type Writes = std::sync::Arc<std::sync::Mutex<Vec<(i128, Option<String>, String)>>>;

async fn record_writes(env: &Env, job_id: &str) -> Writes {
    use async_nats::jetstream::consumer::pull::OrderedConfig;
    use fanjet::protocol::{
        events_stream, job_cell, jobs_bucket, lease_key, partition_leases_bucket, pending_bucket,
    };
    let (jobs, pending, leases) = (
        jobs_bucket(job_cell(job_id)),
        pending_bucket(job_cell(job_id)),
        partition_leases_bucket(job_cell(job_id)),
    );
    use futures::StreamExt;
    let writes = Writes::default();
    let sources = [
        (
            events_stream(job_cell(job_id)),
            fanjet::protocol::job_events_filter(job_id),
        ),
        (format!("KV_{jobs}"), format!("$KV.{jobs}.{job_id}")),
        (format!("KV_{pending}"), format!("$KV.{pending}.{job_id}.>")),
        (
            format!("KV_{leases}"),
            format!("$KV.{leases}.{}", lease_key(partition(job_id))),
        ),
    ];
    for (stream, filter) in sources {
        let stream = env.nats.js.get_stream(&stream).await.expect("stream");
        let consumer = stream
            .create_consumer(OrderedConfig {
                filter_subject: filter,
                ..Default::default()
            })
            .await
            .expect("consumer");
        let mut messages = consumer.messages().await.expect("messages");
        let writes = writes.clone();
        tokio::spawn(async move {
            while let Some(Ok(m)) = messages.next().await {
                let Ok(info) = m.info() else { continue };
                let at = info.published.unix_timestamp_nanos();
                let subject = m.subject.to_string();
                let manager = if subject.starts_with(&format!("$KV.{LEASES_BUCKET}_")) {
                    Some(String::from_utf8_lossy(&m.payload).into_owned())
                } else {
                    m.headers
                        .as_ref()
                        .and_then(|h| h.get(MANAGER_HEADER))
                        .map(|v| v.to_string())
                };
                writes.lock().expect("lock").push((at, manager, subject));
            }
        });
    }
    writes
}

fn unix_nanos(t: std::time::SystemTime) -> i128 {
    t.duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_nanos() as i128
}

/// Writes by `manager` to the job (not its lease) stored in `(from, to)`.
fn written_between(writes: &Writes, manager: &str, from: i128, to: i128) -> Vec<String> {
    writes
        .lock()
        .expect("lock")
        .iter()
        .filter(|(at, m, s)| {
            m.as_deref() == Some(manager)
                && *at > from
                && *at < to
                && !s.starts_with(&format!("$KV.{LEASES_BUCKET}_"))
        })
        .map(|(_, _, s)| s.clone())
        .collect()
}

/// When `manager` next took the job's partition lease after `after`.
fn claimed_after(writes: &Writes, manager: &str, after: i128) -> Option<i128> {
    writes
        .lock()
        .expect("lock")
        .iter()
        .filter(|(at, m, s)| {
            *at > after
                && m.as_deref() == Some(manager)
                && s.starts_with(&format!("$KV.{LEASES_BUCKET}_"))
        })
        .map(|(at, _, _)| *at)
        .min()
}

/// A manager frozen (SIGSTOP) for three lease lives while its partition is
/// busy, twice. Alone: when it wakes it writes nothing for the job until it
/// has claimed the partition again, though its consumer holds outcomes it
/// has not applied and its state is unsaved. With a second manager
/// started meanwhile: the second takes the partition over, the first's
/// stale pull takes no delivery from it, and the first, awake, writes
/// nothing under the lease it lost. The job ends with exact counts, each
/// step started once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manager_frozen_past_its_lease_writes_nothing_after_it() {
    let mut env = Env::start().await;
    env.one_fanout(
        "frz",
        "timeout = \"5s\"\nmax_in_flight = 200",
        16,
        Duration::from_millis(20),
    )
    .await;
    let logs = tempfile::tempdir().expect("tempdir");
    let (a_log, b_log) = (logs.path().join("a.log"), logs.path().join("b.log"));
    let a = env.spawn_logged(&["manager"], &a_log);
    let alone = wait_split(&env, 1, Duration::from_secs(20)).await;
    let a_id = alone.keys().next().expect("one manager").clone();
    // When the frozen manager rejoins, the other gives up its highest
    // partitions: a job in the lower half stays with the new holder.
    let job_id = (0..)
        .map(|i| format!("frozen-{i}"))
        .find(|id| partition(id) < PARTITIONS / 2)
        .expect("an id");
    let writes = record_writes(&env, &job_id).await;
    let input: Vec<u32> = (0..8000).collect();
    assert!(
        env.submit("frz", json!({"job_id": job_id, "input": input}))
            .await
            .ok
    );
    let progress = |env: &Env| {
        let (nats, id) = (env.nats.clone(), job_id.clone());
        async move {
            fanjet::nats::store::get(&nats, &id)
                .await
                .expect("status")
                .map(|(j, _)| j.steps[0].completed)
                .unwrap_or(0)
        }
    };
    env.wait_for(&job_id, Duration::from_secs(60), "progress", |j| {
        j.steps[0].completed >= 500
    })
    .await;

    // 1. Alone: frozen while outcomes keep arriving, woken after its
    // leases expired.
    let stopped = std::time::SystemTime::now();
    env.signal(a, "STOP");
    tokio::time::sleep(LEASE_TTL * 3).await;
    env.signal(a, "CONT");
    let woke = Instant::now();
    let lease_end = unix_nanos(stopped + LEASE_TTL);
    let reclaimed = loop {
        if let Some(at) = claimed_after(&writes, &a_id, lease_end) {
            break at;
        }
        assert!(
            woke.elapsed() < Duration::from_secs(30),
            "the woken manager never claimed the partition again"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let stale = written_between(&writes, &a_id, lease_end, reclaimed);
    assert!(
        stale.is_empty(),
        "written by {a_id} between its lease's end and its new claim: {stale:?}"
    );

    // 2. Frozen again; a second manager takes over meanwhile.
    let before = progress(&env).await;
    let stopped = std::time::SystemTime::now();
    let frozen_at = Instant::now();
    env.signal(a, "STOP");
    env.spawn_logged(&["manager"], &b_log);
    loop {
        let holder = holders(&env).await.get(&partition(&job_id)).cloned();
        if holder.as_ref().is_some_and(|h| *h != a_id) {
            break;
        }
        assert!(
            frozen_at.elapsed() < Duration::from_secs(30),
            "the partition never moved: {holder:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let takeover = frozen_at.elapsed();
    tokio::time::sleep((LEASE_TTL * 3).saturating_sub(frozen_at.elapsed())).await;
    let before_wake = progress(&env).await;
    eprintln!("progress: {before} at the second freeze, {before_wake} before waking");
    assert!(
        before_wake > before,
        "the new holder made no progress while the first was frozen"
    );
    assert!(
        before_wake < 8000,
        "the job ended before the frozen manager woke"
    );
    env.signal(a, "CONT");

    let job = env.wait_end(&job_id, Duration::from_secs(120)).await;
    assert_eq!(job.state, JobState::Completed, "{:?}", job.error);
    assert_eq!(
        (
            job.steps[0].total,
            job.steps[0].completed,
            job.steps[0].failed
        ),
        (8000, 8000, 0)
    );
    let events = env.events(&job_id).await;
    for kind in ["StepStarted", "StepCompleted", "JobCompleted"] {
        let n = events.iter().filter(|e| e["type"] == kind).count();
        assert_eq!(n, 1, "{kind} logged {n} times");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for kind in ["fanjet.ev.", "$KV.fanjet_jobs_", "$KV.fanjet_pending_"] {
        assert!(
            writes
                .lock()
                .expect("lock")
                .iter()
                .any(|(_, m, s)| s.starts_with(kind) && m.as_deref() == Some(a_id.as_str())),
            "no write under {kind} names the first manager"
        );
    }
    let stale = written_between(&writes, &a_id, unix_nanos(stopped + LEASE_TTL), i128::MAX);
    assert!(
        stale.is_empty(),
        "written by {a_id} after the lease it lost: {stale:?}"
    );
    let a_said = std::fs::read_to_string(&a_log).expect("log of the frozen manager");
    assert!(
        a_said.contains("taken over") || a_said.contains("partition paused"),
        "the frozen manager never noticed it lost its leases:\n{a_said}"
    );
    let b_said = std::fs::read_to_string(&b_log).expect("log of the new holder");
    for wrong in ["another manager changed", "went missing"] {
        assert!(
            !b_said.contains(wrong),
            "the new holder saw {wrong:?}:\n{b_said}"
        );
    }
    eprintln!(
        "partition taken over {takeover:?} after the freeze; the job ended with exact counts"
    );
}
