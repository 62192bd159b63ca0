//! `just bench`: fanjet against the raw JetStream floor, on fresh local
//! nats-servers, in one run. Prints a table and writes
//! `target/bench/results.json`.
//!
//! - floor: the least JetStream work per subjob, with async-nats directly:
//!   publish a task to a work-queue stream, a pull consumer fetches it,
//!   publishes a completion to a second stream and acks; one consumer
//!   counts completions.
//! - A: one fanjet job, S1 -> N no-op subjobs -> S3, the same worker
//!   concurrency; the whole job, submit to JobCompleted.

use std::future::IntoFuture;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use async_nats::jetstream::{self, consumer, stream};
use clap::Parser;
use futures::StreamExt;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use fanjet::manager::{self, ManagerOptions};
use fanjet::protocol::{encode_json, submit_subject, Submission, SubmitReply};
use fanjet::server::NatsServer;
use fanjet::setup::Nats;
use fanjet::worker::{TaskContext, Worker};
use fanjet::workflow::Workflow;

#[derive(Parser)]
#[command(about = "fanjet vs raw JetStream on the same machine")]
struct Args {
    /// Subjobs per run.
    #[arg(long, default_value_t = 10_000)]
    subjobs: u64,
    /// Worker slots (floor and fanjet alike).
    #[arg(long, default_value_t = 50)]
    concurrency: usize,
    /// Runs of each scenario; the median is reported with min-max.
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FANJET_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let mut floor = Vec::new();
    let mut a = Vec::new();
    for run in 1..=args.runs {
        let f = floor_run(args.subjobs, args.concurrency).await?;
        eprintln!("run {run}: floor {f:.0} subjobs/s");
        floor.push(f);
        let x = fanjet_run(args.subjobs, args.concurrency).await?;
        eprintln!("run {run}: fanjet {x:.0} subjobs/s");
        a.push(x);
    }
    let (fm, fmin, fmax) = stats(&floor);
    let (am, amin, amax) = stats(&a);
    let ratios: Vec<f64> = a.iter().zip(&floor).map(|(x, f)| x / f).collect();
    let (rm, rmin, rmax) = stats(&ratios);
    println!(
        "{:<10} {:>14} {:>22} {:>10}",
        "scenario", "subjobs/s", "min-max", "vs floor"
    );
    println!(
        "{:<10} {:>14.0} {:>22} {:>10}",
        "floor",
        fm,
        format!("{fmin:.0}-{fmax:.0}"),
        "1.00"
    );
    println!(
        "{:<10} {:>14.0} {:>22} {:>10}",
        "A",
        am,
        format!("{amin:.0}-{amax:.0}"),
        format!("{rm:.2} ({rmin:.2}-{rmax:.2})")
    );
    println!(
        "({} subjobs, concurrency {}, median of {} runs)",
        args.subjobs, args.concurrency, args.runs
    );
    let results = json!({
        "machine": {"cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)},
        "params": {"subjobs": args.subjobs, "concurrency": args.concurrency, "runs": args.runs},
        "floor": {"subjobs_per_s": fm, "min": fmin, "max": fmax},
        "A": {"subjobs_per_s": am, "min": amin, "max": amax, "ratio_to_floor": rm, "ratio_min": rmin, "ratio_max": rmax},
    });
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join("results.json"),
        serde_json::to_string_pretty(&results)?,
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
    Ok(tokio::task::spawn_blocking(|| NatsServer::start(None, None)).await??)
}

/// The raw JetStream floor; returns subjobs/s.
async fn floor_run(n: u64, concurrency: usize) -> Result<f64> {
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
    let work = tasks
        .create_consumer(consumer::pull::Config {
            durable_name: Some("w".into()),
            ack_policy: consumer::AckPolicy::Explicit,
            max_ack_pending: 100_000,
            ..Default::default()
        })
        .await?;
    let count = events
        .create_consumer(consumer::pull::Config {
            durable_name: Some("c".into()),
            ack_policy: consumer::AckPolicy::All,
            max_ack_pending: 100_000,
            ..Default::default()
        })
        .await?;
    let start = Instant::now();
    // Producer: every task, pipelined.
    let producer = {
        let js = js.clone();
        tokio::spawn(async move {
            let mut acks = futures::stream::FuturesUnordered::new();
            for i in 0..n {
                let body = encode_json(&json!({"job_id": "floor", "index": i, "item": null}))?;
                let ack = js
                    .publish(format!("floor.task.job.{i}"), body)
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
    };
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
                        let info_seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
                        if let Ok(ack) = js
                            .publish(format!("floor.ev.job.{info_seq}"), msg.payload.clone())
                            .await
                        {
                            let _ = ack.await;
                        }
                        let _ = msg.ack().await;
                        drop(permit);
                    });
                }
                while running.try_join_next().is_some() {}
            }
            running.shutdown().await;
            anyhow::Ok(())
        })
    };
    // Counter: one consumer counts completions.
    let mut seen = 0u64;
    let mut msgs = count
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
    let took = start.elapsed();
    cancel.cancel();
    producer.await??;
    let _ = worker.await;
    Ok(n as f64 / took.as_secs_f64())
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
async fn fanjet_run(n: u64, concurrency: usize) -> Result<f64> {
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
            manager::run(nats, ManagerOptions::default(), c)
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
    if std::env::var_os("FANJET_BENCH_DEBUG").is_some() {
        let nats = nats.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let t = nats
                    .tasks
                    .get_info()
                    .await
                    .map(|i| i.state.messages)
                    .unwrap_or(0);
                let e = nats
                    .events
                    .get_info()
                    .await
                    .map(|i| i.state.messages)
                    .unwrap_or(0);
                let c = nats
                    .events
                    .clone()
                    .consumer_info(fanjet::protocol::MANAGER_CONSUMER)
                    .await
                    .map(|i| (i.num_pending, i.num_ack_pending))
                    .unwrap_or((0, 0));
                eprintln!(
                    "  t={:?} tasks queued {t} events {e} manager pending/unacked {c:?}",
                    start.elapsed()
                );
            }
        });
    }
    // Wait for JobCompleted on the log (not the checkpoint poll, to time it exactly).
    let mut sub = nats
        .client
        .subscribe("fanjet.ev.*.bench-1.completed")
        .await?;
    if fanjet::store::get(&nats, "bench-1")
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
        match fanjet::store::get(&nats, "bench-1").await? {
            Some((job, _)) if job.state.is_terminal() => break job,
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    if std::env::var_os("FANJET_BENCH_DEBUG").is_some() {
        for st in &job.steps {
            eprintln!(
                "  {} {:?}..{:?} = {:?} ms",
                st.name,
                st.started_at,
                st.finished_at,
                st.finished_at.zip(st.started_at).map(|(a, b)| a - b)
            );
        }
        eprintln!("  job {} ms", job.finished_at.unwrap_or(0) - job.created_at);
    }
    anyhow::ensure!(
        job.steps[1].completed == n,
        "bench job counted {} of {n}",
        job.steps[1].completed
    );
    cancel.cancel();
    while tasks.join_next().await.is_some() {}
    Ok(n as f64 / took.as_secs_f64())
}
