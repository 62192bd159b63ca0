//! `just bench`: fanjet against the raw JetStream floor, on fresh local
//! nats-servers (file storage, the settings fanjet ships), in one run.
//! Prints a table and writes `target/bench/results.json`; each figure is
//! the median of `--runs` runs with min and max.
//!
//! - floor: the least JetStream work per subjob, with async-nats directly:
//!   publish a task to a work-queue stream, a pull consumer fetches it,
//!   publishes a completion to a second stream and acks; one consumer
//!   counts completions.
//! - A, overhead: one job, S1 -> N no-op subjobs -> S3, the same worker
//!   concurrency; subjobs/s from submission to JobCompleted, and the ratio
//!   to the floor of the same run.
//! - B, the seed at 1000x compression: 10,000 subjobs of 60 ms on 4 worker
//!   processes of 50 slots; efficiency = ideal / measured.
//! - C, many jobs: 100 jobs of 100 no-op subjobs submitted at once.
//! - D, scale: one job of 1,000,000 no-op subjobs; the manager runs as its
//!   own process and its peak RSS is reported.
//! - E, latency: 200 small jobs one after another: submission to first
//!   subjob running, and last subjob done to JobCompleted.
//! - G, fair share: one `fanjet manager` and one `fanjet worker --sleep
//!   50ms --concurrency 100` process, as users run them; a job of 100
//!   subjobs alone, then one second after another customer's job of
//!   20,000. Half the slots would be its fair share, so fair is twice its
//!   time alone: `behind_over_fair_share` says how many times that it took.

use std::future::IntoFuture;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, consumer, stream};
use clap::Parser;
use futures::StreamExt;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use fanjet::manager::{self, ManagerOptions};
use fanjet::nats::server::NatsServer;
use fanjet::nats::Nats;
use fanjet::protocol::Workflow;
use fanjet::protocol::{encode_json, submit_subject, Submission, SubmitReply};
use fanjet::worker::{TaskContext, Worker};

#[derive(Parser)]
#[command(about = "fanjet vs raw JetStream on the same machine")]
struct Args {
    /// Subjobs per run of floor and A.
    #[arg(long, default_value_t = 10_000)]
    subjobs: u64,
    /// Worker slots (floor, A, C, D, E).
    #[arg(long, default_value_t = 50)]
    concurrency: usize,
    /// Runs of each scenario; the median is reported with min-max.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Scenarios to run (floor, A, A_deployed, A_batch10, B, B_deployed,
    /// C, C_deployed, D, D10, E, F, G, H, R). The `_deployed` ones run as users deploy
    /// fanjet: a `fanjet manager` process and `fanjet worker` processes
    /// (A_deployed against the streaming floor); A_batch10 is A_deployed
    /// with `batch_size = 10`.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "floor,A,A_deployed,A_batch10,B,B_deployed,C,C_deployed,D,D10,E,F,G,H"
    )]
    only: Vec<String>,
    /// The floor also sets `Nats-Msg-Id` on every publish, as fanjet does,
    /// to see what the streams' de-duplication costs.
    #[arg(long)]
    floor_msg_ids: bool,
    /// The streaming floor (A_deployed's) writes what fanjet writes:
    /// message ids on tasks and completions, a header on each task, tasks
    /// of the size of fanjet's (about 400 bytes).
    #[arg(long)]
    floor_as_fanjet: bool,
    /// Finished jobs in the store for scenario R.
    #[arg(long, default_value_t = 100_000)]
    r_jobs: u64,
    /// Ended jobs in the index for scenario H.
    #[arg(long, default_value_t = 1_000_000)]
    h_jobs: u64,
    /// Subjobs of scenario D.
    #[arg(long, default_value_t = 1_000_000)]
    d_subjobs: u64,
    /// Subjobs of scenario D10 (items put in the object store).
    #[arg(long, default_value_t = 10_000_000)]
    d10_subjobs: u64,
    /// Subjobs per task in scenario D10.
    #[arg(long, default_value_t = 100)]
    d10_batch: u64,
    /// Every nats-server flushes each write to disk before acknowledging it
    /// (`sync_interval: always`, as `nats/cluster/*.conf` set), to see what
    /// that costs.
    #[arg(long)]
    sync_always: bool,
}

/// Set from `--sync-always` before any scenario starts a server.
static SYNC_ALWAYS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Figures of one run of a scenario.
type Figures = Vec<(&'static str, f64)>;

#[tokio::main]
async fn main() -> Result<()> {
    fanjet::logging::init("warn");
    let args = Args::parse();
    SYNC_ALWAYS.store(args.sync_always, std::sync::atomic::Ordering::Relaxed);
    let want = |s: &str| args.only.iter().any(|o| o.eq_ignore_ascii_case(s));
    let mut results: Vec<(&'static str, Vec<Figures>)> = Vec::new();
    // The floor and A alternate, run by run, so each ratio compares two
    // runs made one right after the other on this noisy machine.
    if want("floor") || want("A") {
        let (mut floor_runs, mut a_runs) = (Vec::new(), Vec::new());
        for run in 1..=args.runs {
            let floor = floor_run(args.subjobs, args.concurrency, args.floor_msg_ids).await?;
            eprintln!("floor run {run}: subjobs_per_s={floor:.3}");
            floor_runs.push(vec![("subjobs_per_s", floor)]);
            if want("A") {
                let x = fanjet_run(args.subjobs, args.concurrency, true).await?;
                // The same with the fair share off: what it costs.
                let y = fanjet_run(args.subjobs, args.concurrency, false).await?;
                eprintln!(
                    "A run {run}: subjobs_per_s={x:.3} ratio_to_floor={:.3} fair_share_off_subjobs_per_s={y:.3} fair_over_off={:.3}",
                    x / floor,
                    x / y
                );
                a_runs.push(vec![
                    ("subjobs_per_s", x),
                    ("ratio_to_floor", x / floor),
                    ("fair_share_off_subjobs_per_s", y),
                    ("fair_over_off", x / y),
                ]);
            }
        }
        results.push(("floor", floor_runs));
        if want("A") {
            results.push(("A", a_runs));
        }
    }
    // The deployed shape against the strongest floor, alternating too.
    if want("A_deployed") {
        let (mut floor_runs, mut runs) = (Vec::new(), Vec::new());
        for run in 1..=args.runs {
            let (floor, floor_server_us, floor_client_us) =
                floor_stream_run(args.subjobs, args.concurrency, args.floor_as_fanjet).await?;
            let on = deployed_run(args.subjobs, args.concurrency, true, 1).await?;
            let off = deployed_run(args.subjobs, args.concurrency, false, 1).await?;
            let (x, y) = (on[0].1, off[0].1);
            let mut figures = vec![
                ("subjobs_per_s", x),
                ("ratio_to_floor", x / floor),
                ("fair_share_off_subjobs_per_s", y),
                ("fair_share_off_ratio_to_floor", y / floor),
            ];
            figures.extend(on[1..].iter().copied());
            let shown: Vec<String> = figures.iter().map(|(k, v)| format!("{k}={v:.3}")).collect();
            eprintln!(
                "A_deployed run {run}: floor_stream subjobs_per_s={floor:.3} server_cpu_us={floor_server_us:.1} client_cpu_us={floor_client_us:.1}; {}",
                shown.join(" ")
            );
            floor_runs.push(vec![
                ("subjobs_per_s", floor),
                ("server_cpu_us_per_subjob", floor_server_us),
                ("client_cpu_us_per_subjob", floor_client_us),
            ]);
            runs.push(figures);
        }
        results.push(("floor_stream", floor_runs));
        results.push(("A_deployed", runs));
    }
    // Item batching (`batch_size = 10`) in the deployed shape, against the
    // same streaming floor (one task per subjob), alternating run by run.
    if want("A_batch10") {
        let mut runs = Vec::new();
        for run in 1..=args.runs {
            let (floor, _, _) =
                floor_stream_run(args.subjobs, args.concurrency, args.floor_as_fanjet).await?;
            let on = deployed_run(args.subjobs, args.concurrency, true, 10).await?;
            let x = on[0].1;
            let mut figures = vec![
                ("subjobs_per_s", x),
                ("ratio_to_floor", x / floor),
                ("floor_subjobs_per_s", floor),
            ];
            figures.extend(on[1..].iter().copied());
            let shown: Vec<String> = figures.iter().map(|(k, v)| format!("{k}={v:.3}")).collect();
            eprintln!("A_batch10 run {run}: {}", shown.join(" "));
            runs.push(figures);
        }
        results.push(("A_batch10", runs));
    }
    let plan = [
        ("R", want("R")),
        ("H", want("H")),
        ("B", want("B")),
        ("B_deployed", want("B_deployed")),
        ("C", want("C")),
        ("C_deployed", want("C_deployed")),
        ("D", want("D")),
        ("D10", want("D10")),
        ("E", want("E")),
        ("F", want("F")),
        ("G", want("G")),
    ];
    for (name, on) in plan {
        if !on {
            continue;
        }
        let mut runs = Vec::new();
        for run in 1..=args.runs {
            let figures = match name {
                "R" => restart_run(args.r_jobs).await?,
                "H" => index_run(args.h_jobs).await?,
                "B" => seed_run(false).await?,
                "B_deployed" => seed_run(true).await?,
                "C" => many_jobs_run(args.concurrency, false).await?,
                "C_deployed" => many_jobs_run(args.concurrency, true).await?,
                "D" => scale_run(args.d_subjobs, args.concurrency).await?,
                "D10" => {
                    ten_million_run(args.d10_subjobs, args.d10_batch, args.concurrency).await?
                }
                "E" => latency_run(args.concurrency).await?,
                "G" => fair_run().await?,
                _ => managers_run(args.concurrency).await?,
            };
            let shown: Vec<String> = figures.iter().map(|(k, v)| format!("{k}={v:.3}")).collect();
            eprintln!("{name} run {run}: {}", shown.join(" "));
            runs.push(figures);
        }
        results.push((name, runs));
    }
    let mut out = serde_json::Map::new();
    out.insert(
        "machine".into(),
        json!({"cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)}),
    );
    out.insert(
        "params".into(),
        json!({"subjobs": args.subjobs, "concurrency": args.concurrency, "runs": args.runs, "d_subjobs": args.d_subjobs}),
    );
    println!(
        "{:<9} {:<28} {:>14} {:>28}",
        "scenario", "figure", "median", "min-max"
    );
    for (name, runs) in &results {
        let mut obj = serde_json::Map::new();
        for (i, (key, _)) in runs[0].iter().enumerate() {
            let values: Vec<f64> = runs.iter().map(|r| r[i].1).collect();
            let (med, min, max) = stats(&values);
            println!(
                "{name:<9} {key:<28} {med:>14.3} {:>28}",
                format!("{min:.3}-{max:.3}")
            );
            obj.insert((*key).into(), json!(med));
            obj.insert(format!("{key}_min"), json!(min));
            obj.insert(format!("{key}_max"), json!(max));
        }
        out.insert((*name).into(), Value::Object(obj));
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join("results.json"),
        serde_json::to_string_pretty(&Value::Object(out))?,
    )?;
    eprintln!("wrote {}", dir.join("results.json").display());
    Ok(())
}

fn stats(v: &[f64]) -> (f64, f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    (s[s.len() / 2], s[0], s[s.len() - 1])
}

async fn start_server() -> Result<NatsServer> {
    let synced = SYNC_ALWAYS.load(std::sync::atomic::Ordering::Relaxed);
    Ok(tokio::task::spawn_blocking(move || match synced {
        true => NatsServer::start_synced(None, None),
        false => NatsServer::start(None, None),
    })
    .await??)
}

/// The floor's streams (tasks in a work queue, completions in a log) and
/// consumers on a fresh server, with a publisher of bounded in-flight acks.
struct Floor {
    server: NatsServer,
    js: jetstream::Context,
    work: consumer::PullConsumer,
    count: consumer::PullConsumer,
}

impl Floor {
    async fn start() -> Result<Floor> {
        let server = start_server().await?;
        let client = async_nats::connect(server.url()).await?;
        let js = jetstream::ContextBuilder::new()
            .max_ack_inflight(4096)
            .backpressure_on_inflight(true)
            .build(client);
        let mk = |name: &str, subject: &str, retention| stream::Config {
            name: name.into(),
            subjects: vec![subject.into()],
            retention,
            storage: stream::StorageType::File,
            ..Default::default()
        };
        let tasks = js
            .create_stream(mk(
                "FLOOR_TASKS",
                "floor.task.>",
                stream::RetentionPolicy::WorkQueue,
            ))
            .await?;
        let events = js
            .create_stream(mk(
                "FLOOR_EVENTS",
                "floor.ev.>",
                stream::RetentionPolicy::Limits,
            ))
            .await?;
        let consumer = |name: &str, ack_policy| consumer::pull::Config {
            durable_name: Some(name.into()),
            ack_policy,
            max_ack_pending: 100_000,
            ..Default::default()
        };
        Ok(Floor {
            work: tasks
                .create_consumer(consumer("w", consumer::AckPolicy::Explicit))
                .await?,
            count: events
                .create_consumer(consumer("c", consumer::AckPolicy::All))
                .await?,
            js,
            server,
        })
    }

    /// Publishes `n` tasks, pipelined. `ids`: with message ids, as fanjet;
    /// `like_fanjet`: also a header and fanjet's task size.
    fn produce(&self, n: u64, ids: bool, like_fanjet: bool) -> tokio::task::JoinHandle<Result<()>> {
        let js = self.js.clone();
        tokio::spawn(async move {
            let mut acks = futures::stream::FuturesUnordered::new();
            // fanjet's task names its workflow, step, handler, limits and token.
            let pad = if like_fanjet {
                "x".repeat(300)
            } else {
                String::new()
            };
            for i in 0..n {
                let body =
                    encode_json(&json!({"job_id": "floor", "index": i, "item": null, "pad": pad}))?;
                let mut msg = PublishMessage::build().payload(body);
                if ids {
                    msg = msg.message_id(format!("t:{i}"));
                }
                if like_fanjet {
                    msg = msg.header("Fanjet-Manager", "manager-1234-0123456789ab");
                }
                let ack = js
                    .send_publish(format!("floor.task.job.{i}"), msg)
                    .await?
                    .into_future();
                acks.push(ack);
                while acks.len() >= 1024 {
                    acks.next().await.transpose()?;
                }
            }
            while acks.next().await.transpose()?.is_some() {}
            anyhow::Ok(())
        })
    }

    /// Waits until the counter has read `n` completions.
    async fn count(&self, n: u64) -> Result<()> {
        let mut seen = 0u64;
        let mut msgs = self
            .count
            .stream()
            .max_messages_per_batch(1000)
            .messages()
            .await?;
        while seen < n {
            let m = tokio::time::timeout(Duration::from_secs(60), msgs.next())
                .await
                .context("floor stalled")?
                .context("floor ended")??;
            seen += 1;
            if seen % 500 == 0 || seen == n {
                m.ack().await.map_err(|e| anyhow::anyhow!("{e}"))?;
            }
        }
        Ok(())
    }
}

/// A floor worker's no-op subjob: its completion stored (the ack awaited),
/// then its task acknowledged.
async fn floor_complete(js: &jetstream::Context, msg: jetstream::Message, ids: bool) {
    let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
    let mut event = PublishMessage::build().payload(msg.payload.clone());
    if ids {
        event = event.message_id(format!("e:{seq}"));
    }
    if let Ok(ack) = js.send_publish(format!("floor.ev.job.{seq}"), event).await {
        let _ = ack.await;
    }
    let _ = msg.ack().await;
}

/// The raw JetStream floor (workers fetch a batch at a time); returns
/// subjobs/s.
async fn floor_run(n: u64, concurrency: usize, ids: bool) -> Result<f64> {
    let floor = Floor::start().await?;
    let (js, work) = (floor.js.clone(), floor.work.clone());
    let start = Instant::now();
    let producer = floor.produce(n, ids, false);
    // Workers: `concurrency` slots, a completion event per task, then ack.
    let cancel = CancellationToken::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let worker = {
        let (js, cancel, slots) = (js.clone(), cancel.clone(), slots.clone());
        tokio::spawn(async move {
            let mut running = tokio::task::JoinSet::new();
            while !cancel.is_cancelled() {
                let free = slots.available_permits().max(1);
                let mut batch = match work
                    .batch()
                    .max_messages(free)
                    .expires(Duration::from_millis(500))
                    .messages()
                    .await
                {
                    Ok(b) => b,
                    Err(_) => continue,
                };
                while let Some(Ok(msg)) = batch.next().await {
                    let permit = slots.clone().acquire_owned().await?;
                    let js = js.clone();
                    running.spawn(async move {
                        floor_complete(&js, msg, ids).await;
                        drop(permit);
                    });
                }
                while running.try_join_next().is_some() {}
            }
            running.shutdown().await;
            anyhow::Ok(())
        })
    };
    floor.count(n).await?;
    let took = start.elapsed();
    cancel.cancel();
    producer.await??;
    let _ = worker.await;
    Ok(n as f64 / took.as_secs_f64())
}

/// The floor as strong as JetStream allows for the same guarantees: one
/// continuous pull (the client keeps a buffer of messages requested ahead)
/// feeding `concurrency` handlers; each completion is published and its
/// ack awaited before the task is acked; tasks are published with bounded
/// in-flight acks; a counter reads the completions. With `as_fanjet`, it
/// writes what fanjet writes. Returns subjobs/s and the CPU µs per subjob
/// of the server and of this process.
async fn floor_stream_run(n: u64, concurrency: usize, as_fanjet: bool) -> Result<(f64, f64, f64)> {
    let floor = Floor::start().await?;
    let (js, work) = (floor.js.clone(), floor.work.clone());
    let ids = as_fanjet;
    let (server_pid, own) = (floor.server.pid(), std::process::id());
    let cpu0 = (cpu_secs(server_pid), cpu_secs(own));
    let start = Instant::now();
    let producer = floor.produce(n, ids, as_fanjet);
    let cancel = CancellationToken::new();
    let worker = {
        let (js, cancel) = (js.clone(), cancel.clone());
        tokio::spawn(async move {
            let slots = Arc::new(tokio::sync::Semaphore::new(concurrency));
            let mut msgs = work
                .stream()
                .max_messages_per_batch(concurrency)
                .messages()
                .await?;
            let mut running = tokio::task::JoinSet::new();
            loop {
                let permit = slots.clone().acquire_owned().await?;
                let msg = tokio::select! {
                    _ = cancel.cancelled() => break,
                    m = msgs.next() => match m {
                        Some(Ok(m)) => m,
                        Some(Err(_)) => continue,
                        None => break,
                    },
                };
                let js = js.clone();
                running.spawn(async move {
                    floor_complete(&js, msg, ids).await;
                    drop(permit);
                });
                while running.try_join_next().is_some() {}
            }
            running.shutdown().await;
            anyhow::Ok(())
        })
    };
    floor.count(n).await?;
    let took = start.elapsed();
    let per = |a: f64, b: f64| (b - a) * 1e6 / n as f64;
    let (server_us, client_us) = (
        per(cpu0.0, cpu_secs(server_pid)),
        per(cpu0.1, cpu_secs(own)),
    );
    cancel.cancel();
    producer.await??;
    let _ = worker.await;
    Ok((n as f64 / took.as_secs_f64(), server_us, client_us))
}

/// A's job as users deploy fanjet: one fanout over the job's input, its
/// subjobs `batch` to a task.
fn deployed_workflow(batch: u64) -> String {
    format!(
        r#"
name = "benchd"
[[steps]]
name = "noop"
kind = "fanout"
max_in_flight = 20000
batch_size = {batch}
"#
    )
}

/// A in the deployed shape: a `fanjet manager` process and two `fanjet
/// worker --sleep 0ms` processes of half the slots each (release builds),
/// the job submitted over NATS with its `n` items as input. Subjobs/s from
/// the intake's answer to the `JobCompleted` in the log.
async fn deployed_run(n: u64, concurrency: usize, fair: bool, batch: u64) -> Result<Figures> {
    let manager: &[&str] = match fair {
        true => &["manager"],
        false => &["manager", "--no-fair-share"],
    };
    let mut c = Cluster::start_with(Some(manager)).await?;
    c.nats
        .apply_workflow(&Workflow::from_toml(&deployed_workflow(batch))?)
        .await?;
    let mut beats = c.nats.client.subscribe("fanjet.heartbeat.worker.>").await?;
    let workers_pids = c.noop_workers("benchd", "noop", concurrency)?;
    let manager_pid = c.children[0].id();
    c.wait_partitions(1).await?;
    // Both workers up (their first heartbeats), so the shares know them.
    let mut workers = std::collections::HashSet::new();
    while workers.len() < 2 {
        let beat = tokio::time::timeout(Duration::from_secs(20), beats.next())
            .await
            .context("the worker processes sent no heartbeat")?
            .context("heartbeats ended")?;
        workers.insert(beat.subject.to_string());
    }
    let mut done = c
        .nats
        .client
        .subscribe("fanjet.ev.*.deployed-1.completed")
        .await?;
    let sub = Submission {
        job_id: Some("deployed-1".into()),
        customer: None,
        input: Value::Array(vec![Value::Null; n as usize]),
        priority: None,
    };
    let server_pid = c.server.pid();
    let cpu = || {
        (
            cpu_secs(server_pid),
            cpu_secs(manager_pid),
            workers_pids.iter().map(|p| cpu_secs(*p)).sum::<f64>(),
        )
    };
    let cpu0 = cpu();
    c.submit("benchd", &sub).await?;
    let start = Instant::now();
    tokio::time::timeout(Duration::from_secs(600), done.next())
        .await
        .context("the deployed job did not complete")?;
    let took = start.elapsed();
    let cpu1 = cpu();
    let per = |a: f64, b: f64| (b - a) * 1e6 / n as f64;
    let job = c.wait_end("deployed-1", Duration::from_secs(10)).await?;
    anyhow::ensure!(
        job.steps[0].completed == n,
        "the deployed job counted {} of {n}",
        job.steps[0].completed
    );
    c.stop().await;
    Ok(vec![
        ("subjobs_per_s", n as f64 / took.as_secs_f64()),
        ("server_cpu_us_per_subjob", per(cpu0.0, cpu1.0)),
        ("manager_cpu_us_per_subjob", per(cpu0.1, cpu1.1)),
        ("workers_cpu_us_per_subjob", per(cpu0.2, cpu1.2)),
    ])
}

/// CPU seconds (user + system) a process has used, from /proc (0 when it
/// cannot be read).
fn cpu_secs(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces), from field 3.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 (indices 11 and 12 here), in
    // clock ticks of 1/100 s on Linux.
    (ticks(11) + ticks(12)) / 100.0
}

const BENCH_WORKFLOW: &str = r#"
name = "bench"
[[steps]]
name = "collect"
kind = "task"
[[steps]]
name = "noop"
kind = "fanout"
max_in_flight = 20000
[[steps]]
name = "summarize"
kind = "task"
"#;

/// One fanjet job of `n` no-op subjobs; returns subjobs/s, submit to JobCompleted.
async fn fanjet_run(n: u64, concurrency: usize, fair: bool) -> Result<f64> {
    let server = start_server().await?;
    let client = async_nats::connect(server.url()).await?;
    let nats = Nats::ensure(client).await?;
    nats.apply_workflow(&Workflow::from_toml(BENCH_WORKFLOW)?)
        .await?;
    let cancel = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    {
        let (nats, c) = (nats.clone(), cancel.clone());
        tasks.spawn(async move {
            let options = ManagerOptions {
                queue_ahead: ManagerOptions::default().queue_ahead.filter(|_| fair),
                ..ManagerOptions::default()
            };
            manager::run(nats, options, c)
                .await
                .map_err(anyhow::Error::from)
        });
    }
    {
        let worker = Worker::new(nats.clone())
            .concurrency(concurrency)
            .handler("bench", "collect", move |_c: TaskContext| async move {
                Ok(Value::Array(vec![Value::Null; n as usize]))
            })
            .handler(
                "bench",
                "noop",
                |_c: TaskContext| async move { Ok(Value::Null) },
            )
            .handler("bench", "summarize", |c: TaskContext| async move {
                Ok(c.task.input)
            });
        let c = cancel.clone();
        tasks.spawn(async move { worker.run(c).await.map_err(anyhow::Error::from) });
    }
    let body = encode_json(&Submission {
        job_id: Some("bench-1".into()),
        customer: None,
        input: Value::Null,
        priority: None,
    })?;
    let start = Instant::now();
    let reply = loop {
        match nats
            .client
            .request(submit_subject("bench"), body.clone())
            .await
        {
            Ok(m) => break serde_json::from_slice::<SubmitReply>(&m.payload)?,
            Err(_) if start.elapsed() < Duration::from_secs(10) => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => anyhow::bail!("submit: {e}"),
        }
    };
    anyhow::ensure!(reply.ok, "bench job rejected: {reply:?}");
    let start = Instant::now();
    // Wait for JobCompleted on the log (not the checkpoint poll, to time it exactly).
    let mut sub = nats
        .client
        .subscribe("fanjet.ev.*.bench-1.completed")
        .await?;
    if fanjet::nats::store::get(&nats, "bench-1")
        .await?
        .map(|(j, _)| j.state.is_terminal())
        != Some(true)
    {
        tokio::time::timeout(Duration::from_secs(600), sub.next())
            .await
            .context("bench job did not complete")?;
    }
    let took = start.elapsed();
    // The status record follows the log by up to one checkpoint interval.
    let job = loop {
        match fanjet::nats::store::get(&nats, "bench-1").await? {
            Some((job, _)) if job.state.is_terminal() => break job,
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    anyhow::ensure!(
        job.steps[1].completed == n,
        "bench job counted {} of {n}",
        job.steps[1].completed
    );
    cancel.cancel();
    while tasks.join_next().await.is_some() {}
    Ok(n as f64 / took.as_secs_f64())
}

/// A fresh server with fanjet's streams, a manager (in this process, or as
/// a `fanjet manager` child process) and nothing else.
struct Cluster {
    server: NatsServer,
    nats: Nats,
    cancel: CancellationToken,
    tasks: tokio::task::JoinSet<Result<()>>,
    children: Vec<std::process::Child>,
}

impl Cluster {
    async fn start(manager_process: bool) -> Result<Cluster> {
        Self::start_with(manager_process.then_some(&["manager"][..])).await
    }

    /// A fresh server with fanjet's streams and no manager.
    async fn bare() -> Result<Cluster> {
        let server = start_server().await?;
        let nats = Nats::ensure(async_nats::connect(server.url()).await?).await?;
        Ok(Cluster {
            server,
            nats,
            cancel: CancellationToken::new(),
            tasks: tokio::task::JoinSet::new(),
            children: Vec::new(),
        })
    }

    /// With `manager`: the arguments of a `fanjet manager` child process
    /// (else a manager in this process).
    async fn start_with(manager: Option<&[&str]>) -> Result<Cluster> {
        let mut c = Self::bare().await?;
        if let Some(args) = manager {
            c.spawn(args)?;
        } else {
            let (n, cancel) = (c.nats.clone(), c.cancel.clone());
            c.tasks.spawn(async move {
                manager::run(n, ManagerOptions::default(), cancel)
                    .await
                    .map_err(anyhow::Error::from)
            });
        }
        Ok(c)
    }

    /// Two `fanjet worker --sleep 0ms` processes of half the slots each,
    /// serving `workflow`'s `step`; their process ids.
    fn noop_workers(&mut self, workflow: &str, step: &str, concurrency: usize) -> Result<Vec<u32>> {
        let slots = (concurrency / 2).max(1).to_string();
        let args = [
            "worker",
            "--workflow",
            workflow,
            "--step",
            step,
            "--sleep",
            "0ms",
            "--concurrency",
            &slots,
        ];
        Ok(vec![self.spawn(&args)?, self.spawn(&args)?])
    }

    fn spawn(&mut self, args: &[&str]) -> Result<u32> {
        let exe = std::env::current_exe()?.with_file_name("fanjet");
        anyhow::ensure!(
            exe.is_file(),
            "{} is missing: build it with `cargo build --release --bins`",
            exe.display()
        );
        let child = std::process::Command::new(exe)
            .args(args)
            .env("NATS_URL", self.server.url())
            .env("FANJET_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .spawn()?;
        let pid = child.id();
        self.children.push(child);
        Ok(pid)
    }

    fn worker(&mut self, worker: Worker) {
        let c = self.cancel.clone();
        self.tasks
            .spawn(async move { worker.run(c).await.map_err(anyhow::Error::from) });
    }

    async fn submit(&self, workflow: &str, sub: &Submission) -> Result<String> {
        let reply = fanjet::client::submit(&self.nats.client, workflow, sub).await?;
        anyhow::ensure!(reply.ok, "rejected: {reply:?}");
        reply.job_id.context("no job id")
    }

    /// Waits for the job's record to say it ended.
    async fn wait_end(&self, job_id: &str, within: Duration) -> Result<fanjet::protocol::Job> {
        let start = Instant::now();
        loop {
            if let Some((job, _)) = fanjet::nats::store::get(&self.nats, job_id).await? {
                if job.state.is_terminal() {
                    return Ok(job);
                }
            }
            anyhow::ensure!(
                start.elapsed() < within,
                "job {job_id} did not end within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until `managers` managers hold an equal share of the partitions.
    async fn wait_partitions(&self, managers: usize) -> Result<()> {
        let start = Instant::now();
        loop {
            let (held, _) = fanjet::nats::leases::holders(&self.nats).await?;
            let mut by: std::collections::HashMap<&str, usize> = Default::default();
            for m in held.values() {
                *by.entry(m.as_str()).or_default() += 1;
            }
            let share = fanjet::nats::leases::share(managers);
            if held.len() == fanjet::protocol::PARTITIONS as usize
                && by.len() == managers
                && by.values().all(|n| *n <= share)
            {
                return Ok(());
            }
            anyhow::ensure!(
                start.elapsed() < Duration::from_secs(60),
                "{managers} managers never split the partitions: {by:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn stop(mut self) {
        self.cancel.cancel();
        while self.tasks.join_next().await.is_some() {}
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Peak resident memory of a process, in MiB (VmHWM).
fn peak_rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

/// Writes `jobs` finished job records straight into `fanjet_jobs_<cell>` (as a
/// month of jobs leaves them), of 1,000 customers `c0`…`c999`.
async fn finished_records(nats: &Nats, jobs: u64) -> Result<()> {
    let mut acks = futures::stream::FuturesUnordered::new();
    let now = fanjet::protocol::now_ms();
    for i in 0..jobs {
        let id = format!("old-{i}");
        let mut job = fanjet::protocol::Job::rejected(
            &id,
            Some("many"),
            Some(format!("c{}", i % 1000)),
            "bench".into(),
            now,
        );
        job.state = fanjet::protocol::JobState::Completed;
        job.error = None;
        let body = serde_json::to_vec(&job)?;
        let ack = nats
            .js
            .send_publish(
                format!(
                    "$KV.{}.{id}",
                    fanjet::protocol::jobs_bucket(fanjet::protocol::job_cell(&id))
                ),
                PublishMessage::build().payload(body.into()),
            )
            .await?
            .into_future();
        acks.push(ack);
        while acks.len() >= 1024 {
            acks.next().await.transpose()?;
        }
    }
    while acks.next().await.transpose()?.is_some() {}
    Ok(())
}

/// H, finding jobs among a million: `jobs` ended jobs of 1,000 customers
/// and 5 workflows in the job index, then `fanjet serve`'s API (a separate
/// process) asked what `fanjet jobs` and the web page ask: the first page
/// (50 newest) of one customer, of one state, of both, the next pages of a
/// state, the counts of a customer and of everyone, a job id prefix. Each
/// figure is the median of 30 requests (milliseconds), with `fanjet
/// serve`'s peak memory. The first 20,000 jobs go through the index
/// consumer from the log (its rate is a figure); the rest are written
/// straight into the index as the consumer writes them: the index is
/// measured, not the engine.
async fn index_run(jobs: u64) -> Result<Figures> {
    let mut c = Cluster::bare().await?;
    let through_log = jobs.min(20_000);
    let now = fanjet::protocol::now_ms();
    let summary = |i: u64| {
        let state = match i % 50 {
            0 | 20 => fanjet::protocol::JobState::Failed,
            10 => fanjet::protocol::JobState::Cancelled,
            _ => fanjet::protocol::JobState::Completed,
        };
        let at = now - (jobs - i);
        fanjet::protocol::JobSummary {
            job_id: format!("job-{i:07}"),
            workflow: format!("wf{}", i / 1000 % 5),
            customer: Some(format!("c{}", i % 1000)),
            state,
            created_at: at,
            changed_at: at,
            finished_at: Some(at),
            run: 0,
            error: None,
            seq: 0,
        }
    };
    // The index consumer's own pace, from the log.
    {
        let mut acks = futures::stream::FuturesUnordered::new();
        for i in 0..through_log {
            let s = summary(i);
            let requested = fanjet::protocol::Event::JobRequested(fanjet::protocol::JobRequested {
                job_id: s.job_id.clone(),
                workflow: s.workflow.clone(),
                customer: s.customer.clone(),
                input: Value::Null,
                priority: None,
                at: s.created_at,
                deadline_at: None,
            });
            let ended = fanjet::protocol::Event::JobCompleted(fanjet::protocol::JobCompleted {
                job_id: s.job_id.clone(),
                workflow: s.workflow.clone(),
                output: Value::Null,
                run: 0,
                at: s.changed_at,
            });
            for event in [requested, ended] {
                let body = serde_json::to_vec(&event)?;
                acks.push(
                    c.nats
                        .js
                        .send_publish(
                            event.subject(),
                            PublishMessage::build().payload(body.into()),
                        )
                        .await?
                        .into_future(),
                );
            }
            while acks.len() >= 1024 {
                acks.next().await.transpose()?;
            }
        }
        while acks.next().await.transpose()?.is_some() {}
    }
    let start = Instant::now();
    let (n, cancel) = (c.nats.clone(), c.cancel.clone());
    c.tasks.spawn(async move {
        fanjet::manager::index::run(n, cancel, None)
            .await
            .map_err(anyhow::Error::from)
    });
    let all = fanjet::protocol::IndexFilter::default();
    loop {
        let counts = fanjet::nats::index::counts(&c.nats, &all).await?;
        if counts.total >= through_log {
            break;
        }
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(600),
            "the index consumer indexed {} of {through_log} jobs in 10 minutes",
            counts.total
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let index_rate = through_log as f64 / start.elapsed().as_secs_f64();
    // The rest, straight into the index.
    {
        let nats = &c.nats;
        let mut acks = futures::stream::FuturesUnordered::new();
        for i in through_log..jobs {
            let s = summary(i);
            acks.push(async move { fanjet::nats::index::write_entry(nats, &s, now).await });
            while acks.len() >= 2048 {
                acks.next().await.transpose()?;
            }
        }
        while acks.next().await.transpose()?.is_some() {}
    }
    let listen = format!("127.0.0.1:{}", fanjet::nats::server::free_port());
    let serve_pid = c.spawn(&["serve", "--listen", &listen])?;
    let base = format!("http://{listen}");
    let http = reqwest::Client::new();
    let start = Instant::now();
    while http.get(format!("{base}/readyz")).send().await.is_err() {
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(30),
            "fanjet serve never listened"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let get = |path: String| {
        let (http, base) = (http.clone(), base.clone());
        async move {
            let t = Instant::now();
            let r = http.get(format!("{base}{path}")).send().await?;
            anyhow::ensure!(r.status().is_success(), "{path}: {}", r.status());
            let body: Value = r.json().await?;
            Ok::<_, anyhow::Error>((t.elapsed().as_secs_f64() * 1000.0, body))
        }
    };
    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let per_customer = jobs / 1000;
    let (mut customer, mut state, mut both, mut counts_one, mut counts_all, mut next, mut prefix) =
        (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
    for k in 0..30u64 {
        let who = format!("c{}", (k * 337) % 1000);
        let (ms, body) = get(format!("/api/jobs?customer={who}&limit=50")).await?;
        let page = body["jobs"].as_array().map(Vec::len).unwrap_or(0) as u64;
        anyhow::ensure!(page == per_customer.min(50), "{who}: a page of {page}");
        customer.push(ms);
        let (ms, body) = get("/api/jobs?state=failed&limit=50".into()).await?;
        anyhow::ensure!(
            body["jobs"].as_array().map(Vec::len) == Some(50),
            "failed: {body}"
        );
        state.push(ms);
        let (ms, _) = get(format!("/api/jobs?customer={who}&state=failed&limit=50")).await?;
        both.push(ms);
        let (ms, body) = get(format!("/api/jobs/counts?customer={who}")).await?;
        anyhow::ensure!(
            body["total"].as_u64() == Some(per_customer),
            "{who}: {body}"
        );
        counts_one.push(ms);
        let (ms, body) = get("/api/jobs/counts".into()).await?;
        anyhow::ensure!(body["total"].as_u64() == Some(jobs), "all: {body}");
        counts_all.push(ms);
        let (ms, _) = get(format!(
            "/api/jobs?prefix=job-{:05}&limit=50",
            (k * 3331) % (jobs / 100)
        ))
        .await?;
        prefix.push(ms);
    }
    // Deeper: ten pages of the completed jobs, cursor after cursor.
    let mut cursor: Option<String> = None;
    for _ in 0..10 {
        let path = match &cursor {
            Some(c) => format!("/api/jobs?state=completed&limit=50&cursor={c}"),
            None => "/api/jobs?state=completed&limit=50".into(),
        };
        let (ms, body) = get(path).await?;
        next.push(ms);
        cursor = body["next_cursor"].as_str().map(str::to_string);
        anyhow::ensure!(
            cursor.is_some(),
            "the completed jobs ended after a few pages"
        );
    }
    let rss = peak_rss_mib(serve_pid).unwrap_or(0.0);
    c.stop().await;
    Ok(vec![
        ("index_consumer_jobs_per_s", index_rate),
        ("customer_first_page_ms", median(customer)),
        ("state_first_page_ms", median(state)),
        ("customer_and_state_page_ms", median(both)),
        ("next_pages_ms", median(next)),
        ("counts_customer_ms", median(counts_one)),
        ("counts_all_ms", median(counts_all)),
        ("id_prefix_page_ms", median(prefix)),
        ("serve_peak_rss_mib", rss),
    ])
}

/// R, a manager starting over a full store: `jobs` finished job records
/// (written straight into the bucket, as a month of jobs leaves them).
/// First start: the store as an earlier version left it (no active keys:
/// each partition is scanned once); then that manager stops (SIGTERM) and
/// a second starts over the store this version keeps. Each time a job of
/// 10 subjobs is submitted as the manager starts; the figure is the time
/// from the manager's start to that job's end.
async fn restart_run(jobs: u64) -> Result<Figures> {
    let mut c = Cluster::bare().await?;
    c.nats
        .apply_workflow(&Workflow::from_toml(MANY_WORKFLOW)?)
        .await?;
    finished_records(&c.nats, jobs).await?;
    c.worker(Worker::new(c.nats.clone()).concurrency(10).handler(
        "many",
        "noop",
        |_t: TaskContext| async move { Ok(Value::Null) },
    ));
    let mut figures = Vec::new();
    for (round, figure) in [(1, "seconds_first_start"), (2, "seconds_to_a_new_jobs_end")] {
        let start = Instant::now();
        let pid = c.spawn(&["manager"])?;
        let id = format!("fresh-{round}");
        let sub = Submission {
            job_id: Some(id.clone()),
            customer: None,
            input: Value::Array(vec![Value::Null; 10]),
            priority: None,
        };
        c.submit("many", &sub).await?;
        let job = c.wait_end(&id, Duration::from_secs(600)).await?;
        figures.push((figure, start.elapsed().as_secs_f64()));
        anyhow::ensure!(
            job.steps[0].completed == 10,
            "the fresh job counted {}",
            job.steps[0].completed
        );
        // A graceful stop: its leases are released at once.
        let stopped = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()?;
        anyhow::ensure!(stopped.success(), "could not stop the manager");
        if let Some(child) = c.children.iter_mut().find(|ch| ch.id() == pid) {
            child.wait()?;
        }
    }
    c.stop().await;
    Ok(figures)
}

/// B: the seed compressed 1000x: 10,000 subjobs of 60 ms, 4 worker
/// processes of 50 slots. Ideal: ceil(10000 / 200) x 60 ms = 3.0 s.
/// `deployed`: the manager is a `fanjet manager` process too (B_deployed).
async fn seed_run(deployed: bool) -> Result<Figures> {
    let mut c = Cluster::start(deployed).await?;
    if deployed {
        c.wait_partitions(1).await?;
    }
    let n = 10_000u64;
    c.nats
        .apply_workflow(&Workflow::from_toml(
            "name = \"seed\"\n[[steps]]\nname = \"collect\"\nkind = \"task\"\n[[steps]]\nname = \"send\"\nkind = \"fanout\"\nmax_in_flight = 10000\n[[steps]]\nname = \"summarize\"\nkind = \"task\"\n",
        )?)
        .await?;
    for _ in 0..4 {
        c.spawn(&[
            "worker",
            "--workflow",
            "seed",
            "--step",
            "send",
            "--sleep",
            "60ms",
            "--concurrency",
            "50",
        ])?;
    }
    c.worker(
        Worker::new(c.nats.clone())
            .concurrency(2)
            .handler("seed", "collect", move |_t: TaskContext| async move {
                Ok(Value::Array(vec![Value::Null; n as usize]))
            })
            .handler("seed", "summarize", |t: TaskContext| async move {
                Ok(t.task.input)
            }),
    );
    // All 200 slots are pulling before the clock starts.
    let consumer = fanjet::protocol::step_consumer("seed", "send");
    let start = Instant::now();
    loop {
        // The fewest pulls waiting in any cell's work queue.
        let mut waiting = usize::MAX;
        for queue in &c.nats.tasks {
            let n = queue
                .clone()
                .consumer_info(&consumer)
                .await
                .map(|i| i.num_waiting)
                .unwrap_or(0);
            waiting = waiting.min(n);
        }
        if waiting >= 4 || start.elapsed() > Duration::from_secs(20) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let start = Instant::now();
    let id = c
        .submit(
            "seed",
            &Submission {
                job_id: None,
                customer: None,
                input: Value::Null,
                priority: None,
            },
        )
        .await?;
    let job = c.wait_end(&id, Duration::from_secs(300)).await?;
    let took = job.finished_at.unwrap_or(0).saturating_sub(job.created_at) as f64 / 1000.0;
    let wall = start.elapsed().as_secs_f64();
    anyhow::ensure!(
        job.steps[1].completed == n,
        "seed job counted {}",
        job.steps[1].completed
    );
    c.stop().await;
    let ideal = (n as f64 / 200.0).ceil() * 0.060;
    Ok(vec![
        ("seconds", took),
        ("ideal_seconds", ideal),
        ("efficiency", ideal / took),
        ("wall_seconds", wall),
    ])
}

/// C: 100 jobs of 100 no-op subjobs, submitted at once.
/// C's workflow: one fanout over the job's input.
const MANY_WORKFLOW: &str = "name = \"many\"\n[[steps]]\nname = \"noop\"\nkind = \"fanout\"\n";

/// `deployed`: a `fanjet manager` process and two `fanjet worker`
/// processes of half the slots each (C_deployed).
async fn many_jobs_run(concurrency: usize, deployed: bool) -> Result<Figures> {
    let mut c = Cluster::start(deployed).await?;
    let figures = match deployed {
        false => many_jobs(&mut c, concurrency).await,
        true => {
            c.nats
                .apply_workflow(&Workflow::from_toml(MANY_WORKFLOW)?)
                .await?;
            let slots = (concurrency / 2).max(1).to_string();
            for _ in 0..2 {
                c.spawn(&[
                    "worker",
                    "--workflow",
                    "many",
                    "--step",
                    "noop",
                    "--sleep",
                    "0ms",
                    "--concurrency",
                    &slots,
                ])?;
            }
            c.wait_partitions(1).await?;
            many_jobs_on(&mut c, None).await
        }
    };
    c.stop().await;
    figures
}

/// G: a small job alone, then behind another customer's big one.
async fn fair_run() -> Result<Figures> {
    let mut c = Cluster::start(true).await?;
    let figures = async {
        c.nats
            .apply_workflow(&Workflow::from_toml(
                "name = \"fair\"\n[[steps]]\nname = \"work\"\nkind = \"fanout\"\n",
            )?)
            .await?;
        c.spawn(&[
            "worker",
            "--workflow",
            "fair",
            "--step",
            "work",
            "--sleep",
            "50ms",
            "--concurrency",
            "100",
        ])?;
        let job = |id: &str, customer: &str, n: usize| Submission {
            job_id: Some(id.into()),
            customer: Some(customer.into()),
            input: Value::Array(vec![Value::Null; n]),
            priority: None,
        };
        // The worker process is up once a first job went through.
        small_job(&c, "warm-up").await?;
        let mut alone = Vec::new();
        for i in 0..3 {
            alone.push(small_job(&c, &format!("small-alone-{i}")).await?);
        }
        let (alone, _, _) = stats(&alone);
        c.submit("fair", &job("big", "big", 20_000)).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let behind = small_job(&c, "small-behind").await?;
        fanjet::client::cancel(&c.nats, "big", None).await?;
        // The harder case: customer `whale` runs two jobs of 50,000; nine
        // customers each submit a job of 100 at a random moment within 8 s.
        // A small job's fair share is the slots split between whale and
        // the small jobs running beside it: with k sharing, k times its
        // time alone.
        c.submit("fair", &job("whale-1", "whale", 50_000)).await?;
        c.submit("fair", &job("whale-2", "whale", 50_000)).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let smalls = (1..=9).map(|i| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let at = Duration::from_millis(seed % 8000);
            let c = &c;
            async move {
                tokio::time::sleep(at).await;
                let id = format!("small-{i}");
                let sub = Submission {
                    job_id: Some(id.clone()),
                    customer: Some(format!("c{i}")),
                    input: Value::Array(vec![Value::Null; 100]),
                    priority: None,
                };
                c.submit("fair", &sub).await?;
                let j = c.wait_end(&id, Duration::from_secs(120)).await?;
                let end = j.finished_at.context("an ended job has an end")?;
                anyhow::Ok((j.created_at, end))
            }
        });
        let runs = futures::future::try_join_all(smalls).await?;
        // Its fair share: the slots split between whale and the most small
        // jobs running at once during its run (itself included).
        let running_at = |t: u64| runs.iter().filter(|(s, e)| *s <= t && t < *e).count();
        let ratios: Vec<f64> = runs
            .iter()
            .map(|&(start, end)| {
                let sharing = 1 + runs
                    .iter()
                    .map(|(s, _)| *s)
                    .filter(|s| start <= *s && *s < end)
                    .map(running_at)
                    .max()
                    .unwrap_or(1);
                (end - start) as f64 / 1000.0 / (sharing as f64 * alone)
            })
            .collect();
        let shown: Vec<String> = runs
            .iter()
            .zip(&ratios)
            .map(|((s, e), r)| format!("{}ms:{r:.2}", e - s))
            .collect();
        eprintln!(
            "G ten customers, each small job's duration and ratio: {}",
            shown.join(" ")
        );
        for id in ["whale-1", "whale-2"] {
            fanjet::client::cancel(&c.nats, id, None).await?;
        }
        // The first case again with two manager processes splitting the
        // partitions (the big and the small job's partitions apart or not,
        // the shares are the same).
        c.spawn(&["manager"])?;
        c.wait_partitions(2).await?;
        c.submit("fair", &job("big-2", "big", 20_000)).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let behind_two = small_job(&c, "small-behind-2").await?;
        fanjet::client::cancel(&c.nats, "big-2", None).await?;
        let (median, _, worst) = stats(&ratios);
        Ok(vec![
            ("small_alone_s", alone),
            ("small_behind_big_s", behind),
            ("behind_over_fair_share", behind / (2.0 * alone)),
            ("ten_customers_median_over_fair_share", median),
            ("ten_customers_worst_over_fair_share", worst),
            (
                "two_managers_behind_over_fair_share",
                behind_two / (2.0 * alone),
            ),
        ])
    }
    .await;
    c.stop().await;
    figures
}

/// Runs a job of 100 subjobs of customer `small` on workflow `fair`; its
/// duration from the record's own times (submission to end), in seconds.
async fn small_job(c: &Cluster, id: &str) -> Result<f64> {
    let sub = Submission {
        job_id: Some(id.into()),
        customer: Some("small".into()),
        input: Value::Array(vec![Value::Null; 100]),
        priority: None,
    };
    c.submit("fair", &sub).await?;
    let j = c.wait_end(id, Duration::from_secs(120)).await?;
    let end = j.finished_at.context("an ended job has an end")?;
    Ok(end.saturating_sub(j.created_at) as f64 / 1000.0)
}

/// F: C's load with one manager process, then with two splitting the
/// partitions, each on a fresh server.
async fn managers_run(concurrency: usize) -> Result<Figures> {
    let mut jobs_per_s = Vec::new();
    for managers in [1, 2] {
        let mut c = Cluster::start(true).await?;
        for _ in 1..managers {
            c.spawn(&["manager"])?;
        }
        let figures = async {
            c.wait_partitions(managers).await?;
            many_jobs(&mut c, concurrency).await
        }
        .await;
        c.stop().await;
        jobs_per_s.push(figures?[0].1);
    }
    Ok(vec![
        ("one_manager_jobs_per_s", jobs_per_s[0]),
        ("two_managers_jobs_per_s", jobs_per_s[1]),
        ("ratio_two_to_one", jobs_per_s[1] / jobs_per_s[0]),
    ])
}

/// 100 jobs of 100 no-op subjobs submitted at once, on `c`.
async fn many_jobs(c: &mut Cluster, concurrency: usize) -> Result<Figures> {
    many_jobs_on(c, Some(concurrency)).await
}

/// C's jobs; with `in_process` slots, served by a worker pool in this
/// process (else by worker processes already started).
async fn many_jobs_on(c: &mut Cluster, in_process: Option<usize>) -> Result<Figures> {
    c.nats
        .apply_workflow(&Workflow::from_toml(MANY_WORKFLOW)?)
        .await?;
    if let Some(concurrency) = in_process {
        c.worker(
            Worker::new(c.nats.clone())
                .concurrency(concurrency)
                .handler(
                    "many",
                    "noop",
                    |_t: TaskContext| async move { Ok(Value::Null) },
                ),
        );
    } else {
        // The worker processes' heartbeats, so the shares know their slots.
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    let input = Value::Array(vec![Value::Null; 100]);
    let start = Instant::now();
    let subs = (0..100).map(|i| Submission {
        job_id: Some(format!("many-{i}")),
        customer: Some(format!("c{}", i % 10)),
        input: input.clone(),
        priority: None,
    });
    let ids: Vec<String> = futures::future::try_join_all(subs.map(|s| {
        let c = &c;
        async move { c.submit("many", &s).await }
    }))
    .await?;
    let mut durations = Vec::new();
    for id in &ids {
        let job = c.wait_end(id, Duration::from_secs(300)).await?;
        anyhow::ensure!(
            job.steps[0].completed == 100,
            "job {id} counted {}",
            job.steps[0].completed
        );
        durations.push(job.finished_at.unwrap_or(0).saturating_sub(job.created_at) as f64 / 1000.0);
    }
    let took = start.elapsed().as_secs_f64();
    let (p50, min, max) = stats(&durations);
    Ok(vec![
        ("jobs_per_s", 100.0 / took),
        ("subjobs_per_s", 10_000.0 / took),
        ("job_seconds_min", min),
        ("job_seconds_p50", p50),
        ("job_seconds_max", max),
    ])
}

/// D: one job of `n` no-op subjobs; the manager is a child process so its
/// peak memory can be read.
async fn scale_run(n: u64, concurrency: usize) -> Result<Figures> {
    let mut c = Cluster::start(true).await?;
    let manager_pid = c.children[0].id();
    c.nats
        .apply_workflow(&Workflow::from_toml(
            "name = \"scale\"\n[[steps]]\nname = \"collect\"\nkind = \"task\"\n[[steps]]\nname = \"noop\"\nkind = \"fanout\"\n[[steps]]\nname = \"summarize\"\nkind = \"task\"\n",
        )?)
        .await?;
    c.worker(
        Worker::new(c.nats.clone())
            .concurrency(concurrency)
            .handler("scale", "collect", move |_t: TaskContext| async move {
                Ok(Value::Array(vec![Value::Null; n as usize]))
            })
            .handler(
                "scale",
                "noop",
                |_t: TaskContext| async move { Ok(Value::Null) },
            )
            .handler("scale", "summarize", |t: TaskContext| async move {
                Ok(t.task.input)
            }),
    );
    let start = Instant::now();
    let id = c
        .submit(
            "scale",
            &Submission {
                job_id: None,
                customer: None,
                input: Value::Null,
                priority: None,
            },
        )
        .await?;
    let job = c.wait_end(&id, Duration::from_secs(1800)).await?;
    let took = start.elapsed().as_secs_f64();
    anyhow::ensure!(
        job.steps[1].completed == n,
        "scale job counted {} of {n}",
        job.steps[1].completed
    );
    let rss = peak_rss_mib(manager_pid).unwrap_or(f64::NAN);
    c.stop().await;
    Ok(vec![
        ("seconds", took),
        ("subjobs_per_s", n as f64 / took),
        ("manager_peak_rss_mib", rss),
    ])
}

/// D10: one job of `n` subjobs (ten million by default) over items put in
/// the object store as JSON lines, `batch` subjobs to a task, as users
/// deploy it: a `fanjet manager` process and two `fanjet worker --sleep
/// 0ms` processes of half the slots each. Seconds from the submission to
/// the job's end, the manager's peak RSS, and exact counts.
async fn ten_million_run(n: u64, batch: u64, concurrency: usize) -> Result<Figures> {
    let mut c = Cluster::start_with(Some(&["manager"])).await?;
    c.nats
        .apply_workflow(&Workflow::from_toml(&format!(
            "name = \"tenm\"\n[[steps]]\nname = \"noop\"\nkind = \"fanout\"\nbatch_size = {batch}\nmax_in_flight = 50000\n"
        ))?)
        .await?;
    c.noop_workers("tenm", "noop", concurrency)?;
    let manager_pid = c.children[0].id();
    c.wait_partitions(1).await?;
    // The items: one number per line.
    let put_start = Instant::now();
    let mut lines = Vec::with_capacity(n as usize * 9);
    for i in 0..n {
        lines.extend_from_slice(i.to_string().as_bytes());
        lines.push(b'\n');
    }
    let reference = fanjet::nats::objects::put_items(
        &c.nats.js,
        fanjet::protocol::RESULTS_BUCKET,
        &lines[..],
        fanjet::protocol::ItemsFormat::Lines,
    )
    .await?;
    drop(lines);
    let put_secs = put_start.elapsed().as_secs_f64();
    let mut done = c
        .nats
        .client
        .subscribe("fanjet.ev.*.tenm-1.completed")
        .await?;
    let sub = Submission {
        job_id: Some("tenm-1".into()),
        customer: None,
        input: reference.to_value(),
        priority: None,
    };
    c.submit("tenm", &sub).await?;
    let start = Instant::now();
    tokio::time::timeout(Duration::from_secs(1800), done.next())
        .await
        .context("the ten-million job did not complete within 30 minutes")?;
    let took = start.elapsed().as_secs_f64();
    let job = c.wait_end("tenm-1", Duration::from_secs(30)).await?;
    anyhow::ensure!(
        (job.steps[0].completed, job.steps[0].failed) == (n, 0),
        "the job counted {} completed and {} failed of {n}",
        job.steps[0].completed,
        job.steps[0].failed
    );
    let rss = peak_rss_mib(manager_pid).unwrap_or(f64::NAN);
    c.stop().await;
    Ok(vec![
        ("seconds", took),
        ("subjobs_per_s", n as f64 / took),
        ("manager_peak_rss_mib", rss),
        ("batch_size", batch as f64),
        ("items_put_seconds", put_secs),
    ])
}

/// E: 200 small jobs (3 no-op subjobs) one after another.
async fn latency_run(concurrency: usize) -> Result<Figures> {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};
    let mut c = Cluster::start(false).await?;
    c.nats
        .apply_workflow(&Workflow::from_toml(
            "name = \"lat\"\n[[steps]]\nname = \"noop\"\nkind = \"fanout\"\n",
        )?)
        .await?;
    // job -> (first handler start, last handler end)
    let marks: Arc<Mutex<HashMap<String, (Instant, Instant)>>> = Arc::default();
    let m = marks.clone();
    c.worker(
        Worker::new(c.nats.clone())
            .concurrency(concurrency)
            .handler("lat", "noop", move |t: TaskContext| {
                let m = m.clone();
                async move {
                    let begun = Instant::now();
                    let end = Instant::now();
                    if let Ok(mut g) = m.lock() {
                        let e = g.entry(t.task.job_id).or_insert((begun, end));
                        e.0 = e.0.min(begun);
                        e.1 = e.1.max(end);
                    }
                    Ok(Value::Null)
                }
            }),
    );
    let mut completed = c.nats.client.subscribe("fanjet.ev.*.*.completed").await?;
    let (mut to_first, mut to_end) = (Vec::new(), Vec::new());
    for i in 0..200 {
        let id = format!("lat-{i}");
        let sent = Instant::now();
        c.submit(
            "lat",
            &Submission {
                job_id: Some(id.clone()),
                customer: None,
                input: json!([1, 2, 3]),
                priority: None,
            },
        )
        .await?;
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(30), completed.next())
                .await?
                .context("subscription ended")?;
            if msg.subject.as_str().contains(&format!(".{id}.")) {
                break;
            }
        }
        let seen = Instant::now();
        let (first, last) = marks
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .get(&id)
            .copied()
            .context("no subjob ran")?;
        to_first.push(first.duration_since(sent).as_secs_f64() * 1000.0);
        to_end.push(seen.duration_since(last).as_secs_f64() * 1000.0);
    }
    c.stop().await;
    let pct = |v: &mut Vec<f64>, q: f64| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1]
    };
    Ok(vec![
        ("submit_to_first_subjob_ms_p50", pct(&mut to_first, 0.5)),
        ("submit_to_first_subjob_ms_p99", pct(&mut to_first, 0.99)),
        ("last_subjob_to_completed_ms_p50", pct(&mut to_end, 0.5)),
        ("last_subjob_to_completed_ms_p99", pct(&mut to_end, 0.99)),
    ])
}
