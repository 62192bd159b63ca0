//! `just chaos`: a seeded chaos run that proves fanjet's guarantees from
//! outside. A 3-node JetStream cluster (`sync_interval: always`, 3 replicas
//! of everything), three `fanjet manager` processes, `fanjet serve`
//! (statistics and notifications) and three worker processes (this binary
//! in its hidden `worker` role), a stream of jobs from several customers
//! (duplicates, cancels, tolerated and fatal failures with long error
//! texts, handlers that hang, fanouts in batches, one bad definition), and a seeded schedule of
//! faults, one at a time: SIGKILL and restart of a manager, a worker,
//! `fanjet serve` or one NATS node (often the event log's leader), SIGTERM
//! and restart of a manager, and SIGSTOP of a manager for three lease lives.
//!
//! The handlers write an independent ledger (append + fsync) of every
//! subjob they ran to success. At the end every check below must hold, or
//! the run exits non-zero:
//! - every job is terminal (hung = 0), with the outcome its input calls for
//!   (no false failure);
//! - per fanout step of a completed job, completed == the distinct indices
//!   in the ledger and completed + failed == total; no subjob lost;
//! - statistics == job record, for every job;
//! - the job index holds one entry per recorded job, in its recorded state;
//! - each step started once in the log and was announced: POSTed to a
//!   webhook this run serves (retried until taken); the same notification
//!   on NATS is counted too, but core NATS reaches only subscribers
//!   connected at that moment, so one missed there while a node restarts
//!   is a figure (`missed_on_nats`), not a violation. Announcements are
//!   awaited until none came for 10 s; their lag is a figure.
//!
//! It prints one line of figures (faults by kind, re-executions, takeover
//! times, the longest stall between two outcomes, and after each fault
//! until the next, time from the last fault to all terminal) and writes them with every violation to
//! `<out>/result.json`; the history of a job with subjobs counted lost goes
//! to `<out>/events-<job>.json`.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use futures::StreamExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use fanjet::nats::connect::ConnectArgs;
use fanjet::nats::server::NatsCluster;
use fanjet::nats::Nats;
use fanjet::protocol::{
    lease_key, JobState, RejectCode, Submission, Workflow, LEASE_TTL, PARTITIONS, WORKFLOWS_BUCKET,
};
use fanjet::worker::{TaskContext, TaskError, Worker};

#[derive(Parser)]
#[command(about = "A seeded chaos run on a 3-node cluster; exits non-zero on any violation")]
struct Args {
    /// Seed of the job stream and the fault schedule.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// How long jobs are submitted and faults injected.
    #[arg(long, default_value_t = 2.0)]
    minutes: f64,
    /// Longest wait, after the last fault, for every job to end.
    #[arg(long, default_value = "3m", value_parser = humantime::parse_duration)]
    drain: Duration,
    /// Where the logs, the ledgers and result.json go (an earlier run's are
    /// removed first; a folder holding anything else is refused).
    #[arg(long, default_value = "target/chaos")]
    out: PathBuf,
    /// Inject only these kinds of fault (comma-separated: kill_manager,
    /// freeze_manager, kill_nats, kill_worker, stop_manager, kill_serve),
    /// to measure one; all of them by default.
    #[arg(long, value_delimiter = ',', value_parser = clap::builder::PossibleValuesParser::new(FAULTS.map(|(kind, _)| kind)))]
    only: Vec<String>,
    /// Which NATS node a `kill_nats` fault kills: `mixed`, the node leading
    /// cell 0's log (and what the cells share) half the time and any node
    /// otherwise; `followers`, one leading no cell's log (when there is).
    #[arg(long, value_enum, default_value = "mixed")]
    nats_victims: Victims,
    /// Run the managers with `--no-placement` (leaders where elections put
    /// them), to compare with the default (each cell's leaders beside its
    /// log's, the cells' logs on different nodes).
    #[arg(long)]
    no_placement: bool,
    /// Seconds of quiet added after each fault before the next (default
    /// none: 3 to 7 s). Some 40 s lets the cluster settle (a node back
    /// takes a cell again after 30 s), so each fault meets the state a
    /// real cluster is in when a fault comes.
    #[arg(long, default_value_t = 0)]
    gap: u64,
    #[command(subcommand)]
    role: Option<Role>,
}

#[derive(Subcommand)]
enum Role {
    /// A worker process running the chaos handlers (started by the run).
    #[command(hide = true)]
    Worker {
        /// The ledger this process appends to.
        #[arg(long)]
        ledger: PathBuf,
    },
}

const MANAGERS: usize = 3;
const WORKERS: usize = 3;
const SLOTS: usize = 16;
/// Fatal error texts are this long: a long traceback.
const LONG_ERROR: usize = 20_000;

fn workflow(name: &str, tolerate: &str, batch: u64) -> String {
    format!(
        r#"
name = "{name}"
[[steps]]
name = "collect"
kind = "task"
timeout = "5s"
max_attempts = 30
backoff = ["100ms", "500ms"]
[[steps]]
name = "send"
kind = "fanout"
timeout = "5s"
run_timeout = "2s"
max_attempts = 30
backoff = ["100ms", "500ms", "1s"]
max_in_flight = 100
tolerate_failures = "{tolerate}"
batch_size = {batch}
[[steps]]
name = "summarize"
kind = "task"
timeout = "5s"
max_attempts = 30
backoff = ["100ms", "500ms"]
"#
    )
}

/// What a job's input asks its handlers to do.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Plan {
    n: u64,
    /// Items `i` with `i % fail_every == 0` fail for good.
    fail_every: Option<u64>,
    /// Items `i` with `i % hang_every == 1` hang on their first attempt.
    hang_every: Option<u64>,
    /// Failures carry a 20 KB error text.
    long: bool,
}

impl Plan {
    fn fails(&self, i: u64) -> bool {
        self.fail_every.is_some_and(|k| i % k == 0)
    }
    fn failing(&self) -> u64 {
        (0..self.n).filter(|i| self.fails(*i)).count() as u64
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    fanjet::logging::init("warn");
    match args.role {
        Some(Role::Worker { ledger }) => worker(ledger).await,
        None => {
            let code = run(&args).await?;
            std::process::exit(code)
        }
    }
}

// ---------------------------------------------------------------- worker

async fn worker(ledger: PathBuf) -> Result<()> {
    let url = std::env::var("NATS_URL").context("NATS_URL")?;
    let client = ConnectArgs::url(url).connect("chaos-worker").await?;
    let nats = Nats::bind(client).await?;
    let ledger = Arc::new(Mutex::new(
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&ledger)
            .with_context(|| format!("opening {}", ledger.display()))?,
    ));
    let mut w = Worker::new(nats).concurrency(SLOTS);
    for wf in ["chaos", "chaos_tolerant"] {
        w = w
            .handler(wf, "collect", |c: TaskContext| async move {
                let plan: Plan = serde_json::from_value(c.task.input.clone())
                    .map_err(|e| TaskError::give_up(format!("bad plan: {e}")))?;
                let items: Vec<Value> = (0..plan.n)
                    .map(|i| {
                        json!({
                            "i": i,
                            "fail": plan.fails(i),
                            "hang": plan.hang_every.is_some_and(|k| i % k == 1),
                            "long": plan.long,
                        })
                    })
                    .collect();
                Ok(Value::Array(items))
            })
            .handler(wf, "send", {
                let ledger = ledger.clone();
                move |c: TaskContext| {
                    let ledger = ledger.clone();
                    async move { send(c, ledger).await }
                }
            })
            .handler(wf, "summarize", |c: TaskContext| async move {
                Ok(json!({"completed": c.task.input["completed"], "failed": c.task.input["failed"]}))
            });
    }
    let cancel = CancellationToken::new();
    let c = cancel.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        c.cancel();
    });
    w.run(cancel).await?;
    Ok(())
}

/// One subjob: hangs (first attempt of a hanging item), fails for good, or
/// works a little, writes the ledger (on disk before the outcome is
/// reported) and succeeds.
async fn send(c: TaskContext, ledger: Arc<Mutex<std::fs::File>>) -> Result<Value, TaskError> {
    let item = &c.task.item;
    let i = item["i"].as_u64().unwrap_or(u64::MAX);
    if item["hang"] == json!(true) && c.attempt == 1 {
        std::future::pending::<()>().await;
    }
    if item["fail"] == json!(true) {
        let mut message = format!("item {i} is refused");
        if item["long"] == json!(true) {
            message.push_str(&"\n  at a deep frame of a long traceback".repeat(LONG_ERROR / 36));
        }
        return Err(TaskError::give_up(message));
    }
    let ms = rand::rng().random_range(5..40);
    tokio::time::sleep(Duration::from_millis(ms)).await;
    let line = format!(
        "{} {} {} {} {}\n",
        c.task.job_id,
        c.task.step,
        i,
        c.attempt,
        std::process::id()
    );
    let written = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        let mut f = ledger
            .lock()
            .map_err(|_| std::io::Error::other("ledger lock poisoned"))?;
        f.write_all(line.as_bytes())?;
        f.sync_data()
    })
    .await;
    match written {
        Ok(Ok(())) => Ok(json!(i)),
        Ok(Err(e)) => Err(TaskError::retry(format!("ledger: {e}"))),
        Err(e) => Err(TaskError::retry(format!("ledger: {e}"))),
    }
}

// ---------------------------------------------------------------- run

/// A process the run started, and the slot it fills (restarted in place).
struct Proc {
    name: String,
    args: Vec<String>,
    exe: PathBuf,
    child: Child,
    generation: usize,
}

struct Procs {
    out: PathBuf,
    url: String,
    all: Vec<Proc>,
}

impl Procs {
    fn start(&mut self, name: &str, exe: &Path, args: &[String]) -> Result<usize> {
        let child = self.spawn(name, 0, exe, args)?;
        self.all.push(Proc {
            name: name.to_string(),
            args: args.to_vec(),
            exe: exe.to_path_buf(),
            child,
            generation: 0,
        });
        Ok(self.all.len() - 1)
    }

    fn spawn(&self, name: &str, generation: usize, exe: &Path, args: &[String]) -> Result<Child> {
        let log = std::fs::File::create(self.out.join(format!("logs/{name}.{generation}.log")))?;
        Command::new(exe)
            .args(args)
            .env("NATS_URL", &self.url)
            .env("FANJET_REPLICAS", "3")
            .env(
                "FANJET_LOG",
                std::env::var("FANJET_CHAOS_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .with_context(|| format!("starting {}", exe.display()))
    }

    fn pid(&self, i: usize) -> u32 {
        self.all[i].child.id()
    }

    fn signal(&self, i: usize, sig: &str) {
        let _ = Command::new("kill")
            .args([format!("-{sig}"), self.pid(i).to_string()])
            .status();
    }

    fn kill(&mut self, i: usize) {
        let _ = self.all[i].child.kill();
        let _ = self.all[i].child.wait();
    }

    fn wait_exit(&mut self, i: usize, within: Duration) {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.all[i].child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn restart(&mut self, i: usize) -> Result<()> {
        self.kill(i);
        let p = &self.all[i];
        let child = self.spawn(&p.name, p.generation + 1, &p.exe, &p.args)?;
        let p = &mut self.all[i];
        p.generation += 1;
        p.child = child;
        Ok(())
    }

    fn stop_all(&mut self) {
        for i in 0..self.all.len() {
            self.signal(i, "CONT");
            self.signal(i, "TERM");
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for p in &mut self.all {
            while Instant::now() < deadline {
                if let Ok(Some(_)) = p.child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
    }
}

/// One job as submitted.
#[derive(Debug, Clone)]
struct Planned {
    id: String,
    workflow: String,
    plan: Plan,
    cancelled: bool,
    /// The submission was never answered (a fault in the way).
    unanswered: bool,
}

#[derive(Default)]
struct Figures {
    faults: BTreeMap<&'static str, u32>,
    /// Each fault: its kind, when it began (unix ns) and, for a node
    /// killed, what it led then (streams and buckets).
    schedule: Vec<(&'static str, i128, Vec<String>)>,
    /// From a manager's SIGKILL or SIGSTOP until others hold its partitions.
    takeovers_ms: Vec<u64>,
    /// The same after a SIGTERM.
    handovers_ms: Vec<u64>,
    last_fault: Option<Instant>,
    /// The process ids of the workers SIGKILLed (the ledgers name the
    /// process that ran each subjob).
    killed_workers: HashSet<u32>,
}

fn unix_nanos() -> i128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or_default()
}

async fn run(args: &Args) -> Result<i32> {
    clear_output(&args.out)?;
    std::fs::create_dir_all(args.out.join("logs"))?;
    let exe_dir = std::env::current_exe()?
        .parent()
        .context("binary folder")?
        .to_path_buf();
    let fanjet = exe_dir.join("fanjet");
    if !fanjet.is_file() {
        bail!(
            "{} is missing: build it with `cargo build --bins`",
            fanjet.display()
        );
    }
    let me = std::env::current_exe()?;
    let started = Instant::now();
    eprintln!(
        "chaos: seed {}, {} min; starting a 3-node cluster",
        args.seed, args.minutes
    );
    let mut cluster = tokio::task::spawn_blocking(|| NatsCluster::start_synced(3)).await??;
    let url = cluster.urls();
    let nats = ensure(&url).await?;
    // The tolerant jobs' fanouts go in batches of 5 (items retried alone,
    // outcomes reported together), the others one task per subjob.
    for (name, tolerate, batch) in [("chaos", "0", 1), ("chaos_tolerant", "100%", 5)] {
        let wf = Workflow::from_toml(&workflow(name, tolerate, batch))?;
        nats.apply_workflow(&wf).await?;
    }
    // A definition put straight into the bucket: it passes the schema but
    // a step named "a.b" cannot be a subject token.
    let mut bad: Value =
        serde_json::to_value(Workflow::from_toml(&workflow("chaos_bad", "0", 1))?)?;
    bad["steps"][1]["name"] = json!("a.b");
    nats.js
        .get_key_value(WORKFLOWS_BUCKET)
        .await?
        .put("chaos_bad", serde_json::to_vec(&bad)?.into())
        .await?;

    let mut procs = Procs {
        out: args.out.clone(),
        url: url.clone(),
        all: Vec::new(),
    };
    let mut manager_args = vec!["manager".to_string()];
    if args.no_placement {
        manager_args.push("--no-placement".into());
    }
    let managers: Vec<usize> = (0..MANAGERS)
        .map(|i| procs.start(&format!("manager-{i}"), &fanjet, &manager_args))
        .collect::<Result<_>>()?;
    // Step starts as the webhook receives them.
    let hooked: Hooked = Arc::default();
    let hook = webhook_receiver(hooked.clone()).await?;
    let serve_port = fanjet::nats::server::free_port();
    let serve = procs.start(
        "serve",
        &fanjet,
        &[
            "serve".into(),
            "--listen".into(),
            format!("127.0.0.1:{serve_port}"),
            "--webhook".into(),
            hook,
        ],
    )?;
    let workers: Vec<usize> = (0..WORKERS)
        .map(|i| {
            let ledger = args.out.join(format!("ledger-{i}.txt"));
            procs.start(
                &format!("worker-{i}"),
                &me,
                &[
                    "worker".into(),
                    "--ledger".into(),
                    ledger.display().to_string(),
                ],
            )
        })
        .collect::<Result<_>>()?;

    // Announcements, heard on every node so that a node's loss misses none.
    let notes: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let mut listeners = Vec::new();
    for node in &cluster.nodes {
        let client = ConnectArgs::url(node.url())
            .connect("chaos-observer")
            .await?;
        let mut sub = client.subscribe("fanjet.notify.>").await?;
        let notes = notes.clone();
        listeners.push(tokio::spawn(async move {
            let mut ids = BTreeSet::new();
            while let Some(m) = sub.next().await {
                let id = m
                    .headers
                    .as_ref()
                    .and_then(|h| h.get("Fanjet-Notification-Id"))
                    .map(|v| v.to_string());
                if let Some(id) = id.filter(|id| id.contains(":step_started:")) {
                    // Each listener counts an id once; the union is kept.
                    if ids.insert(id.clone()) {
                        let mut n = notes.lock().expect("lock");
                        n.entry(id).or_default();
                    }
                }
            }
            drop(client);
        }));
    }

    let run_for = Duration::from_secs_f64(args.minutes * 60.0);
    let planned: Arc<Mutex<Vec<Planned>>> = Arc::default();
    let submitter = tokio::spawn(submit_jobs(
        nats.clone(),
        args.seed,
        run_for,
        planned.clone(),
    ));
    let mut figures = Figures::default();
    faults(
        args.seed,
        &args.only,
        args.nats_victims,
        Duration::from_secs(args.gap),
        run_for,
        &mut cluster,
        &mut procs,
        &managers,
        &workers,
        serve,
        &nats,
        &mut figures,
    )
    .await?;
    let planned_jobs = submitter.await??;
    let jobs = { planned.lock().expect("lock").clone() };
    let _ = planned_jobs;
    let last_fault = figures.last_fault.unwrap_or(started);

    // Drain: every job must end.
    eprintln!("chaos: faults over; waiting for {} jobs to end", jobs.len());
    let mut records = BTreeMap::new();
    let deadline = Instant::now() + args.drain;
    loop {
        let mut open = 0;
        for j in &jobs {
            if records.contains_key(&j.id) {
                continue;
            }
            match fanjet::nats::store::get(&nats, &j.id).await {
                Ok(Some((job, _))) if job.state.is_terminal() => {
                    records.insert(j.id.clone(), job);
                }
                Ok(None) if j.unanswered => {
                    // Never recorded: the submission did not get through.
                }
                _ => open += 1,
            }
        }
        if open == 0 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let all_ended = last_fault.elapsed();
    // Statistics trail the log a little; announcements too (a notifier
    // whose consumer lost its leader pulls again once it has a new one).
    // Wait until no announcement came for ANNOUNCE_QUIET.
    let waiting_since = Instant::now();
    let mut last = (hooked.lock().expect("lock").len(), Instant::now());
    tokio::time::sleep(Duration::from_secs(2)).await;
    while last.1.elapsed() < ANNOUNCE_QUIET && waiting_since.elapsed() < Duration::from_secs(60) {
        let now = hooked.lock().expect("lock").len();
        if now != last.0 {
            last = (now, Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    let report = check(
        &nats,
        &args.out,
        &jobs,
        &records,
        &hooked,
        &notes,
        &figures.killed_workers,
    )
    .await?;
    let tagged = outcome_times(&nats).await.unwrap_or_default();
    let outcomes: Vec<i128> = tagged.iter().map(|(t, _)| *t).collect();
    // Each cell's own outcomes: a node's loss should stall the cell it
    // led, not the others.
    let cells: Vec<Vec<i128>> = (0..fanjet::protocol::CELLS)
        .map(|c| {
            tagged
                .iter()
                .filter(|(_, cell)| *cell == c)
                .map(|(t, _)| *t)
                .collect()
        })
        .collect();
    // When each cell had a job running (unix ns): a cell without one has
    // nothing to wait for, and its quiet is no stall.
    let ms_ns = |ms: u64| i128::from(ms) * 1_000_000;
    let busy: Vec<Vec<(i128, i128)>> = (0..fanjet::protocol::CELLS)
        .map(|c| {
            records
                .values()
                .filter(|j| fanjet::protocol::job_cell(&j.job_id) == c)
                .map(|j| {
                    let end = j.finished_at.map_or(i128::MAX, ms_ns);
                    (ms_ns(j.created_at), end)
                })
                .collect()
        })
        .collect();
    let stall = longest_gap(&outcomes, i128::MIN, i128::MAX);
    // After each fault: the longest wait for an outcome within 20 s (and
    // the quiet gap asked for), or
    // until the next fault if that comes first (so that a fault is not
    // charged with the stall of the one after it).
    let windows: Vec<(i128, i128)> = figures
        .schedule
        .iter()
        .enumerate()
        .map(|(i, (_, at, _))| {
            let next = figures
                .schedule
                .get(i + 1)
                .map_or(i128::MAX, |(_, n, _)| *n);
            // With a quiet gap, the window covers it too: what follows a
            // node's return (the keeper moving a cell to it) is charged to
            // the fault.
            let cap = (20 + i128::from(args.gap)) * 1_000_000_000;
            (*at, (at + cap).min(next))
        })
        .collect();
    let stalls: Vec<u64> = windows
        .iter()
        .map(|(from, to)| longest_gap(&outcomes, *from, *to))
        .collect();
    let per_fault: Vec<Value> = figures
        .schedule
        .iter()
        .zip(&windows)
        .zip(&stalls)
        .map(|(((kind, _, led), (from, to)), stall)| {
            // The fault's own 20 s, and (with a quiet gap) what came after
            // until the next fault: the node back, a cell moved to it.
            let cut = (*from + 20_000_000_000).min(*to);
            let cell_stalls: Vec<u64> = cells
                .iter()
                .zip(&busy)
                .map(|(times, busy)| longest_busy_gap(times, busy, *from, cut))
                .collect();
            let later: Vec<u64> = cells
                .iter()
                .zip(&busy)
                .map(|(times, busy)| longest_busy_gap(times, busy, cut, *to))
                .collect();
            let led_cells: Vec<u32> = (0..fanjet::protocol::CELLS)
                .filter(|c| led.contains(&fanjet::protocol::events_stream(*c)))
                .collect();
            json!({"kind": kind, "stall_ms": stall, "cell_stall_ms": cell_stalls, "cell_stall_later_ms": later, "led_cells": led_cells, "window_ms": (to - from) / 1_000_000, "led": led})
        })
        .collect();
    // After a node's loss, the longest stall of a cell whose log it did
    // not lead (one with a job running): what cells are for.
    let mut others: Vec<u64> = per_fault
        .iter()
        .filter(|f| f["kind"] == "kill_nats")
        .filter_map(|f| {
            let led: Vec<u64> = f["led_cells"]
                .as_array()?
                .iter()
                .filter_map(Value::as_u64)
                .collect();
            f["cell_stall_ms"]
                .as_array()?
                .iter()
                .enumerate()
                .filter(|(c, _)| !led.contains(&(*c as u64)))
                .filter_map(|(_, v)| v.as_u64())
                .max()
        })
        .collect();
    others.sort_unstable();
    let other_cells = Quantiles::of(others);
    let mut worst: BTreeMap<&str, u64> = BTreeMap::new();
    for ((kind, _, _), stall) in figures.schedule.iter().zip(&stalls) {
        let w = worst.entry(kind).or_default();
        *w = (*w).max(*stall);
    }
    // After each kind of fault: the longest any cell with a job running
    // waited for an outcome (in the fault's own 20 s), per fault; a quiet
    // cluster between jobs is no stall.
    let mut busy_after: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for ((kind, _, _), f) in figures.schedule.iter().zip(&per_fault) {
        let longest = f["cell_stall_ms"]
            .as_array()
            .map_or(0, |c| c.iter().filter_map(Value::as_u64).max().unwrap_or(0));
        busy_after.entry(kind).or_default().push(longest);
    }
    let busy_after: BTreeMap<&str, Quantiles> = busy_after
        .into_iter()
        .map(|(k, v)| (k, Quantiles::of(v)))
        .collect();
    procs.stop_all();
    for l in listeners {
        l.abort();
    }

    let mut takeovers = figures.takeovers_ms.clone();
    takeovers.sort_unstable();
    let Quantiles { p50, max } = Quantiles::of(takeovers.clone());
    let result = json!({
        "seed": args.seed,
        "minutes": args.minutes,
        "jobs": jobs.len(),
        "subjobs_run": report.ledger_lines,
        "re_executions": report.ledger_lines.saturating_sub(report.distinct),
        "re_executions_after_worker_kill": report.re_executions_after_kill,
        "faults": figures.faults,
        "takeover_ms": {"p50": p50, "max": max, "all": takeovers},
        "graceful_handover_ms": figures.handovers_ms,
        "longest_stall_ms": stall,
        "other_cells_stall_ms": {"p50": other_cells.p50, "max": other_cells.max},
        "longest_stall_after_ms": worst,
        "busy_cell_stall_after_ms": busy_after.iter().map(|(k, q)| (k.to_string(), json!({"p50": q.p50, "max": q.max}))).collect::<BTreeMap<_, _>>(),
        "schedule": per_fault,
        "last_fault_to_all_terminal_ms": all_ended.as_millis() as u64,
        "hung": report.hung,
        "missed_on_nats": report.missed_on_nats,
        "announce_lag_ms": {"p50": report.announce_lag.p50, "max": report.announce_lag.max, "slowest": report.slowest_announcements},
        "violations": report.violations,
    });
    std::fs::write(
        args.out.join("result.json"),
        serde_json::to_vec_pretty(&result)?,
    )?;
    let faults: Vec<String> = figures
        .faults
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    let worst: Vec<String> = worst.iter().map(|(k, v)| format!("{k} {v}")).collect();
    let busy: Vec<String> = busy_after
        .iter()
        .map(|(k, q)| format!("{k} {}/{}", q.p50.unwrap_or(0), q.max.unwrap_or(0)))
        .collect();
    println!(
        "chaos seed {}: {} jobs, {} subjobs run ({} re-executions, {} after a run by a worker killed); faults: {}; takeover p50 {} ms, max {} ms; graceful handover max {} ms; longest stall {} ms (after {}); a busy cell's longest stall after each fault, p50/max ms: {}; after a node's loss, the other cells' longest stall p50 {} ms, max {} ms; last fault to all terminal {:.1} s; step starts announced after p50 {} ms, max {} ms (missed on NATS {}); hung {}; violations {}",
        args.seed,
        jobs.len(),
        report.ledger_lines,
        report.ledger_lines.saturating_sub(report.distinct),
        report.re_executions_after_kill,
        faults.join(", "),
        p50.map_or("-".into(), |v| v.to_string()),
        max.map_or("-".into(), |v| v.to_string()),
        figures
            .handovers_ms
            .iter()
            .max()
            .map_or("-".into(), |v| v.to_string()),
        stall,
        worst.join(", "),
        busy.join(", "),
        other_cells.p50.map_or("-".into(), |v| v.to_string()),
        other_cells.max.map_or("-".into(), |v| v.to_string()),
        all_ended.as_secs_f64(),
        report.announce_lag.p50.map_or("-".into(), |v| v.to_string()),
        report.announce_lag.max.map_or("-".into(), |v| v.to_string()),
        report.missed_on_nats,
        report.hung,
        report.violations.len(),
    );
    for v in report.violations.iter().take(30) {
        println!("  violation: {v}");
    }
    for (i, node) in cluster.nodes.iter().enumerate() {
        let log = node.store().join("nats-server.log");
        let _ = std::fs::copy(&log, args.out.join("logs").join(format!("nats-n{i}.log")));
    }
    drop(cluster);
    Ok(if report.violations.is_empty() && report.hung == 0 {
        0
    } else {
        1
    })
}

/// Empties the output folder of an earlier run; refuses a folder holding
/// anything else (a mistyped `--out .` must not delete a checkout).
fn clear_output(out: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(out) else {
        return Ok(());
    };
    let mut ours = Vec::new();
    for entry in entries {
        let path = entry?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let from_a_run = name == "logs"
            || name == "result.json"
            || (name.starts_with("ledger-") && name.ends_with(".txt"))
            || (name.starts_with("events-") && name.ends_with(".json"));
        if !from_a_run {
            bail!(
                "{} holds {name}, which no chaos run wrote: choose an empty or new --out folder",
                out.display()
            );
        }
        ours.push(path);
    }
    for path in ours {
        if path.is_dir() {
            std::fs::remove_dir_all(&path)?;
        } else {
            std::fs::remove_file(&path)?;
        }
    }
    Ok(())
}

/// Connects and creates the streams and buckets, waiting for the cluster to
/// elect its JetStream leader.
async fn ensure(url: &str) -> Result<Nats> {
    let start = Instant::now();
    loop {
        let client = ConnectArgs::url(url).connect("chaos").await?;
        match Nats::ensure_replicated(client, 3).await {
            Ok(n) => return Ok(n),
            Err(e) if start.elapsed() < Duration::from_secs(60) => {
                tracing::debug!(error = %e, "cluster not ready yet");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Submits the seeded stream of jobs for `run_for`; returns how many.
async fn submit_jobs(
    nats: Nats,
    seed: u64,
    run_for: Duration,
    planned: Arc<Mutex<Vec<Planned>>>,
) -> Result<usize> {
    let mut rng = StdRng::seed_from_u64(seed);
    let start = Instant::now();
    let mut k = 0usize;
    let mut cancels = tokio::task::JoinSet::new();
    // The bad definition: rejected, recorded, and nothing else stops.
    let bad = Planned {
        id: format!("chaos-{seed}-bad"),
        workflow: "chaos_bad".into(),
        plan: Plan {
            n: 3,
            fail_every: None,
            hang_every: None,
            long: false,
        },
        cancelled: false,
        unanswered: false,
    };
    let bad = submit_one(&nats, bad).await;
    planned.lock().expect("lock").push(bad);
    while start.elapsed() < run_for {
        let wait = rng.random_range(400..1400);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        // Now and then the same id again: answered as a duplicate.
        if k > 2 && rng.random_bool(0.1) {
            let again = planned.lock().expect("lock")[rng.random_range(1..=k)].clone();
            let _ = submit_one(&nats, again).await;
            continue;
        }
        k += 1;
        let fail_every = match rng.random_range(0..10) {
            0..=5 => None,
            6..=7 => Some(7),
            _ => Some(31),
        };
        let plan = Plan {
            n: rng.random_range(20..=300),
            fail_every,
            hang_every: rng.random_bool(0.3).then_some(53),
            long: rng.random_bool(0.5),
        };
        let workflow = if rng.random_bool(0.6) {
            "chaos_tolerant"
        } else {
            "chaos"
        };
        let cancelled = rng.random_bool(0.08);
        let job = Planned {
            id: format!("chaos-{seed}-{k}"),
            workflow: workflow.into(),
            plan,
            cancelled,
            unanswered: false,
        };
        let job = submit_one(&nats, job).await;
        if cancelled && !job.unanswered {
            let (n, id) = (nats.clone(), job.id.clone());
            let after = Duration::from_millis(rng.random_range(200..3000));
            cancels.spawn(async move {
                tokio::time::sleep(after).await;
                for _ in 0..20 {
                    match fanjet::client::cancel(&n, &id, Some("chaos".into())).await {
                        Ok(()) | Err(fanjet::client::ClientError::Ended { .. }) => return,
                        Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
                    }
                }
            });
        }
        planned.lock().expect("lock").push(job);
    }
    while cancels.join_next().await.is_some() {}
    Ok(k)
}

/// Sends a submission until it is answered (the same id: idempotent).
async fn submit_one(nats: &Nats, mut job: Planned) -> Planned {
    let sub = Submission {
        job_id: Some(job.id.clone()),
        customer: Some(format!("c{}", job.id.len() % 4)),
        input: serde_json::to_value(&job.plan).unwrap_or(Value::Null),
        priority: None,
    };
    for _ in 0..10 {
        match fanjet::client::submit(&nats.client, &job.workflow, &sub).await {
            // Nothing recorded, for now: sent again, as PROTOCOL.md asks.
            Ok(reply)
                if reply.error.as_ref().is_some_and(|e| {
                    matches!(e.code, RejectCode::Unavailable | RejectCode::RateLimited)
                }) =>
            {
                tracing::info!(job_id = %job.id, ?reply, "submission not recorded; again");
                job.unanswered = true;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Ok(reply) => {
                if !reply.ok && job.workflow != "chaos_bad" {
                    tracing::warn!(job_id = %job.id, ?reply, "submission refused");
                }
                job.unanswered = false;
                return job;
            }
            Err(e) => {
                tracing::info!(job_id = %job.id, error = %e, "submission not answered; again");
                job.unanswered = true;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
    job
}

/// Every kind of fault the run injects, with its weight in the schedule
/// (out of 12).
const FAULTS: [(&str, u32); 6] = [
    ("kill_manager", 3),
    ("freeze_manager", 2),
    ("kill_nats", 2),
    ("kill_worker", 2),
    ("stop_manager", 1),
    ("kill_serve", 2),
];

/// The kind of fault a draw in `0..12` picks, by the weights of [`FAULTS`].
fn fault_kind(mut draw: u32) -> &'static str {
    for (kind, weight) in FAULTS {
        if draw < weight {
            return kind;
        }
        draw -= weight;
    }
    FAULTS[FAULTS.len() - 1].0
}

/// The seeded schedule of faults, one at a time, for `run_for` (of the
/// kinds in `only`, when it names any).
#[allow(clippy::too_many_arguments)]
async fn faults(
    seed: u64,
    only: &[String],
    victims: Victims,
    quiet: Duration,
    run_for: Duration,
    cluster: &mut NatsCluster,
    procs: &mut Procs,
    managers: &[usize],
    workers: &[usize],
    serve: usize,
    nats: &Nats,
    figures: &mut Figures,
) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
    let start = Instant::now();
    tokio::time::sleep(Duration::from_secs(8)).await;
    while start.elapsed() + Duration::from_secs(10) < run_for {
        let kind = loop {
            let kind = fault_kind(rng.random_range(0..12));
            if only.is_empty() || only.iter().any(|k| k == kind) {
                break kind;
            }
        };
        *figures.faults.entry(kind).or_default() += 1;
        figures.schedule.push((kind, unix_nanos(), Vec::new()));
        figures.last_fault = Some(Instant::now());
        match kind {
            "kill_manager" | "freeze_manager" => {
                let i = managers[rng.random_range(0..managers.len())];
                let victim = format!("manager-{}-", procs.pid(i));
                let at = Instant::now();
                let lease = if kind == "kill_manager" {
                    procs.kill(i);
                    None
                } else {
                    procs.signal(i, "STOP");
                    Some(LEASE_TTL * 3)
                };
                let took = takeover(nats, &victim, Duration::from_secs(60)).await;
                if let Some(took) = took {
                    figures.takeovers_ms.push(took.as_millis() as u64);
                }
                match lease {
                    None => procs.restart(i)?,
                    Some(frozen) => {
                        tokio::time::sleep(frozen.saturating_sub(at.elapsed())).await;
                        procs.signal(i, "CONT");
                    }
                }
            }
            "stop_manager" => {
                // A graceful stop (SIGTERM) hands the partitions over at once.
                let i = managers[rng.random_range(0..managers.len())];
                let victim = format!("manager-{}-", procs.pid(i));
                procs.signal(i, "TERM");
                if let Some(took) = takeover(nats, &victim, Duration::from_secs(60)).await {
                    figures.handovers_ms.push(took.as_millis() as u64);
                }
                procs.wait_exit(i, Duration::from_secs(15));
                procs.restart(i)?;
            }
            "kill_worker" => {
                let i = workers[rng.random_range(0..workers.len())];
                figures.killed_workers.insert(procs.pid(i));
                procs.kill(i);
                tokio::time::sleep(Duration::from_secs(1)).await;
                procs.restart(i)?;
            }
            "kill_serve" => {
                procs.kill(serve);
                tokio::time::sleep(Duration::from_secs(1)).await;
                procs.restart(serve)?;
            }
            _ => {
                let node = match victims {
                    // Cell 0's log leader leads what the cells share too.
                    Victims::Mixed => match rng.random_bool(0.5) {
                        true => log_leaders(nats).await[0].unwrap_or(0),
                        false => rng.random_range(0..cluster.nodes.len()),
                    },
                    Victims::Followers => {
                        let leaders = log_leaders(nats).await;
                        let others: Vec<usize> = (0..cluster.nodes.len())
                            .filter(|n| !leaders.contains(&Some(*n)))
                            .collect();
                        match others.is_empty() {
                            // Every node leads a cell's log.
                            true => rng.random_range(0..cluster.nodes.len()),
                            false => others[rng.random_range(0..others.len())],
                        }
                    }
                };
                if let Some(fault) = figures.schedule.last_mut() {
                    fault.2 = led_by(nats, node).await;
                }
                cluster.nodes[node].kill();
                tokio::time::sleep(Duration::from_secs(2)).await;
                let n = &mut cluster.nodes[node];
                tokio::task::block_in_place(|| n.restart())?;
                // Let it catch up before the next fault.
                tokio::time::sleep(Duration::from_secs(3)).await;
            }
        }
        let gap = rng.random_range(3000..7000);
        tokio::time::sleep(Duration::from_millis(gap) + quiet).await;
    }
    Ok(())
}

/// What node `node` leads of fanjet's: its streams (buckets as
/// `KV_<bucket>`) by name, and how many durable consumers.
async fn led_by(nats: &Nats, node: usize) -> Vec<String> {
    let Ok(fanjet::nats::placement::Survey { groups, .. }) =
        fanjet::nats::placement::survey(nats).await
    else {
        return vec!["(not surveyed)".into()];
    };
    let name = format!("n{node}");
    let mine = groups
        .iter()
        .filter(|(_, l)| l.leader.as_deref() == Some(name.as_str()));
    let mut led: Vec<String> = mine
        .clone()
        .filter(|(g, _)| g.consumer.is_none())
        .map(|(g, _)| g.stream.clone())
        .collect();
    let consumers = mine.filter(|(g, _)| g.consumer.is_some()).count();
    if consumers > 0 {
        led.push(format!("{consumers} consumers"));
    }
    led
}

/// Which node a `kill_nats` fault picks.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Victims {
    Mixed,
    Followers,
}

/// The node leading each cell's log (`n0` → 0), by cell.
async fn log_leaders(nats: &Nats) -> Vec<Option<usize>> {
    let mut out = Vec::new();
    for log in &nats.events {
        let mut log = log.clone();
        let leader = match log.info().await {
            Ok(info) => info.cluster.as_ref().and_then(|c| c.leader.clone()),
            Err(_) => None,
        };
        out.push(leader.and_then(|l| l.strip_prefix('n')?.parse().ok()));
    }
    out
}

/// How long until no partition is held by `victim` (an id prefix) and every
/// partition is held again.
async fn takeover(nats: &Nats, victim: &str, within: Duration) -> Option<Duration> {
    let start = Instant::now();
    let cells = fanjet::nats::leases::cell_buckets(nats).await.ok()?;
    while start.elapsed() < within {
        let mut held = 0;
        let mut by_victim = false;
        for p in 0..PARTITIONS {
            let kv = &cells[fanjet::protocol::cell(p) as usize];
            if let Ok(Some(v)) = kv.get(lease_key(p)).await {
                held += 1;
                by_victim |= String::from_utf8_lossy(&v).starts_with(victim);
            }
        }
        if held == PARTITIONS && !by_victim {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

/// The median and the largest of some durations (ms); `None` for none.
struct Quantiles {
    p50: Option<u64>,
    max: Option<u64>,
}

impl Quantiles {
    fn of(mut values: Vec<u64>) -> Self {
        values.sort_unstable();
        Quantiles {
            p50: values.get(values.len() / 2).copied(),
            max: values.last().copied(),
        }
    }
}

/// Step starts POSTed to the run's webhook: notification id → when it
/// first arrived (ms since the epoch).
type Hooked = Arc<Mutex<BTreeMap<String, i64>>>;

/// How long no announcement may have arrived before the check, once every
/// job has ended: a notifier that lost its consumer's leader is back within
/// an election and a pull (a missing announcement is a violation).
const ANNOUNCE_QUIET: Duration = Duration::from_secs(10);

/// Serves a webhook on a free local port that records the step starts it
/// is POSTed (by their `Fanjet-Notification-Id`); returns its URL.
async fn webhook_receiver(hooked: Hooked) -> Result<String> {
    use axum::http::HeaderMap;
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap| {
            let hooked = hooked.clone();
            async move {
                let id = headers
                    .get("Fanjet-Notification-Id")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default();
                if id.contains(":step_started:") {
                    let now = fanjet::protocol::now_ms() as i64;
                    hooked
                        .lock()
                        .expect("lock")
                        .entry(id.to_string())
                        .or_insert(now);
                }
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hook", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(url)
}

/// How long the statistics may take to count what the job records count
/// once every job has ended.
const STATS_CATCH_UP: Duration = Duration::from_secs(60);

/// Why a job's statistics differ from its record, if they do.
async fn statistics_differ(nats: &Nats, job: &fanjet::protocol::Job) -> Result<Option<String>> {
    let stats = fanjet::nats::store::stats(nats, &job.job_id).await?;
    let agree = stats.as_ref().is_some_and(|s| {
        job.steps.iter().enumerate().all(|(i, st)| {
            s.steps.get(i).map_or(st.started_at.is_none(), |ss| {
                (ss.completed, ss.failed) == (st.completed, st.failed)
            })
        })
    });
    if agree {
        return Ok(None);
    }
    let counted: Option<Vec<(u64, u64)>> =
        stats.map(|s| s.steps.iter().map(|s| (s.completed, s.failed)).collect());
    let recorded: Vec<(u64, u64)> = job.steps.iter().map(|s| (s.completed, s.failed)).collect();
    Ok(Some(format!(
        "{}: statistics {counted:?} differ from the record {recorded:?} (after {} s)",
        job.job_id,
        STATS_CATCH_UP.as_secs()
    )))
}

/// Why the job index differs from the job records, if it does: one entry
/// per recorded job, in its recorded state.
async fn index_differs(nats: &Nats) -> Result<Option<String>> {
    let mut recorded: BTreeMap<String, u64> = BTreeMap::new();
    let mut states: BTreeMap<String, String> = BTreeMap::new();
    let ids = fanjet::nats::store::job_ids(nats).await?;
    for id in &ids {
        if let Some((job, _)) = fanjet::nats::store::get(nats, id).await? {
            *recorded.entry(job.state.as_str().to_string()).or_default() += 1;
            states.insert(id.clone(), job.state.as_str().to_string());
        }
    }
    let counts = fanjet::nats::index::counts(nats, &Default::default()).await?;
    let entries = nats.index.get_info().await?.state.messages;
    let total: u64 = recorded.values().sum();
    if counts.states == recorded && entries == total {
        return Ok(None);
    }
    // Which jobs: every entry read, against the records.
    let mut seen: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut next = 1;
    loop {
        let request = serde_json::json!({"seq": next, "batch": 1000});
        let got =
            fanjet::nats::direct::batch(&nats.client, fanjet::protocol::INDEX_STREAM, &request)
                .await
                .map_err(anyhow::Error::msg)?;
        for m in &got {
            if let Ok(s) = serde_json::from_slice::<fanjet::protocol::JobSummary>(&m.payload) {
                seen.entry(s.job_id).or_default().push(format!(
                    "{}@{}(seq {})",
                    s.state.as_str(),
                    m.seq,
                    s.seq
                ));
            }
        }
        match got.last() {
            Some(last) if got.len() == 1000 => next = last.seq + 1,
            _ => break,
        }
    }
    let wrong: Vec<String> = seen
        .iter()
        .filter(|(id, e)| {
            e.len() != 1
                || !states
                    .get(*id)
                    .is_some_and(|s| e[0].starts_with(s.as_str()))
        })
        .map(|(id, e)| format!("{id}: {e:?}, recorded {:?}", states.get(id)))
        .chain(
            states
                .keys()
                .filter(|id| !seen.contains_key(*id))
                .map(|id| format!("{id}: no entry")),
        )
        .collect();
    Ok(Some(format!(
        "the job index holds {entries} entries {:?}; the records {total} {recorded:?} (after {} s): {wrong:?}",
        counts.states,
        STATS_CATCH_UP.as_secs()
    )))
}

struct Report {
    ledger_lines: u64,
    distinct: u64,
    /// Re-executions whose run before was by a worker later SIGKILLed.
    re_executions_after_kill: u64,
    hung: u64,
    /// Step starts the webhook got and no NATS listener heard.
    missed_on_nats: u64,
    /// From a step's start (its record) to its announcement's arrival.
    announce_lag: Quantiles,
    /// The five latest announcements: (lag in ms, notification id).
    slowest_announcements: Vec<(u64, String)>,
    violations: Vec<String>,
}

/// Of one subjob's runs (attempt, process id), how many came after a run
/// by a worker that was SIGKILLed: that worker may have died before its
/// report was stored, so the task was delivered again. A run after one by
/// a worker that lived on was for another reason (a report lost with a
/// node, an ack deadline passed).
fn re_executions_after_kill(mut runs: Vec<(u32, u32)>, killed: &HashSet<u32>) -> u64 {
    runs.sort_unstable();
    runs.windows(2)
        .filter(|pair| killed.contains(&pair[0].1))
        .count() as u64
}

async fn check(
    nats: &Nats,
    out: &Path,
    jobs: &[Planned],
    records: &BTreeMap<String, fanjet::protocol::Job>,
    hooked: &Hooked,
    notes: &Arc<Mutex<HashMap<String, u32>>>,
    killed_workers: &HashSet<u32>,
) -> Result<Report> {
    // The ledgers: (job, step) → distinct indices run to success.
    let mut ran: HashMap<(String, String), BTreeSet<u64>> = HashMap::new();
    // Each subjob's runs: (attempt, the worker's process id).
    let mut runs: HashMap<(String, String, u64), Vec<(u32, u32)>> = HashMap::new();
    let mut lines = 0u64;
    for entry in std::fs::read_dir(out)? {
        let path = entry?.path();
        if !path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("ledger-"))
        {
            continue;
        }
        for line in std::fs::read_to_string(&path)?.lines() {
            let parts: Vec<&str> = line.split(' ').collect();
            if let [job, step, index, attempt, pid] = parts[..] {
                if let (Ok(i), Ok(attempt), Ok(pid)) = (index.parse(), attempt.parse(), pid.parse())
                {
                    lines += 1;
                    ran.entry((job.to_string(), step.to_string()))
                        .or_default()
                        .insert(i);
                    runs.entry((job.to_string(), step.to_string(), i))
                        .or_default()
                        .push((attempt, pid));
                }
            }
        }
    }
    let distinct = ran.values().map(|s| s.len() as u64).sum();
    let mut violations = Vec::new();
    let mut hung = 0;
    let notes = notes.lock().expect("lock").clone();
    let hooked = hooked.lock().expect("lock").clone();
    let mut missed_on_nats = 0;
    let mut lags = Vec::new();
    let mut slowest: Vec<(u64, String)> = Vec::new();
    let mut behind = Vec::new();
    for j in jobs {
        let Some(job) = records.get(&j.id) else {
            if !j.unanswered {
                hung += 1;
                violations.push(format!("{}: not terminal", j.id));
            }
            continue;
        };
        // The outcome its input calls for.
        let expected: &[JobState] = match (j.workflow.as_str(), j.cancelled) {
            ("chaos_bad", _) => &[JobState::Rejected],
            (_, true) => &[JobState::Cancelled, JobState::Completed, JobState::Failed],
            ("chaos", _) if j.plan.failing() > 0 => &[JobState::Failed],
            _ => &[JobState::Completed],
        };
        if !expected.contains(&job.state) {
            violations.push(format!(
                "{}: {} but expected {:?}: {:?}",
                j.id,
                job.state.as_str(),
                expected,
                job.error
            ));
        }
        let events = fanjet::nats::log::history(nats, &j.id, 1, 100_000)
            .await
            .map_err(|e| anyhow::anyhow!("history of {}: {e}", j.id))?;
        for (i, step) in job.steps.iter().enumerate() {
            let started = events
                .iter()
                .filter(|e| e.event["type"] == "StepStarted" && e.event["step_index"] == i)
                .count();
            let ran_it = step.started_at.is_some();
            if started != usize::from(ran_it) {
                violations.push(format!("{}: step {i} started {started} times", j.id));
            }
            if ran_it {
                let id = format!("{}:step_started:{i}", j.id);
                match (hooked.get(&id), step.started_at) {
                    (Some(at), Some(started)) => {
                        let lag = at.saturating_sub(started as i64).max(0) as u64;
                        lags.push(lag);
                        slowest.push((lag, id.clone()));
                    }
                    (Some(_), None) => {}
                    (None, _) => {
                        violations.push(format!("{}: step {i} start never announced", j.id))
                    }
                }
                if !notes.contains_key(&id) {
                    missed_on_nats += 1;
                }
            }
            if step.completed + step.failed > step.total {
                violations.push(format!(
                    "{}: step {i} counts {} + {} of {}",
                    j.id, step.completed, step.failed, step.total
                ));
            }
        }
        if events
            .iter()
            .any(|e| e.event["type"] == "SubjobsFailed" && e.event["reason"] == "lost")
        {
            violations.push(format!("{}: subjobs lost", j.id));
            // The job's whole history, to see what became of those subjobs.
            let file = out.join(format!("events-{}.json", j.id));
            std::fs::write(&file, serde_json::to_vec_pretty(&events)?)?;
        }
        if job.state == JobState::Completed {
            if let Some(send) = job.steps.get(1) {
                let in_ledger = ran
                    .get(&(j.id.clone(), "send".to_string()))
                    .map_or(0, |s| s.len() as u64);
                let want_failed = j.plan.failing();
                if send.completed != in_ledger
                    || send.failed != want_failed
                    || send.completed + send.failed != send.total
                {
                    violations.push(format!(
                        "{}: send counted {} completed, {} failed of {}; the ledger has {in_ledger}, {want_failed} should fail",
                        j.id, send.completed, send.failed, send.total
                    ));
                }
            }
        }
        // Statistics == record (checked again below while they catch up).
        if statistics_differ(nats, job).await?.is_some() {
            behind.push(job);
        }
    }
    // The statistics consumer is a reader of its own: it may still be
    // catching up (a restart after the last fault) when the last job ends.
    let catch_up = Instant::now();
    while !behind.is_empty() {
        let mut still = Vec::new();
        for job in behind {
            if let Some(differ) = statistics_differ(nats, job).await? {
                if catch_up.elapsed() >= STATS_CATCH_UP {
                    violations.push(differ);
                } else {
                    still.push(job);
                }
            }
        }
        behind = still;
        if !behind.is_empty() {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
    // So is the index consumer.
    loop {
        match index_differs(nats).await? {
            None => break,
            Some(differ) if catch_up.elapsed() >= STATS_CATCH_UP => {
                violations.push(differ);
                break;
            }
            Some(_) => tokio::time::sleep(Duration::from_secs(1)).await,
        }
    }
    Ok(Report {
        ledger_lines: lines,
        distinct,
        re_executions_after_kill: runs
            .into_values()
            .map(|r| re_executions_after_kill(r, killed_workers))
            .sum(),
        hung,
        missed_on_nats,
        announce_lag: Quantiles::of(lags),
        slowest_announcements: {
            slowest.sort_unstable_by(|a, b| b.cmp(a));
            slowest.truncate(5);
            slowest
        },
        violations,
    })
}

/// When each subjob outcome was stored in the log (unix ns), in order,
/// with its cell.
async fn outcome_times(nats: &Nats) -> Result<Vec<(i128, u32)>> {
    let mut times = Vec::new();
    for (cell, log) in nats.events.iter().enumerate() {
        for t in cell_outcome_times(log).await? {
            times.push((t, cell as u32));
        }
    }
    times.sort_unstable();
    Ok(times)
}

/// When each subjob outcome was stored in one cell's log (unix ns).
async fn cell_outcome_times(log: &async_nats::jetstream::stream::Stream) -> Result<Vec<i128>> {
    use async_nats::jetstream::consumer::pull::OrderedConfig;
    let consumer = log
        .create_consumer(OrderedConfig {
            filter_subjects: vec![
                "fanjet.ev.*.*.subjob_completed".into(),
                "fanjet.ev.*.*.subjob_failed".into(),
                "fanjet.ev.*.*.subjobs_done".into(),
                "fanjet.ev.*.*.subjobs_completed".into(),
            ],
            ..Default::default()
        })
        .await?;
    let pending = consumer.cached_info().num_pending;
    let mut messages = consumer.messages().await?;
    let mut times = Vec::with_capacity(pending as usize);
    while (times.len() as u64) < pending {
        let Some(m) = tokio::time::timeout(Duration::from_secs(10), messages.next())
            .await
            .ok()
            .flatten()
        else {
            break;
        };
        if let Ok(info) = m?.info() {
            times.push(info.published.unix_timestamp_nanos());
        }
    }
    times.sort_unstable();
    Ok(times)
}

/// The longest time (ms) in `[from, to]` without an outcome (`times`,
/// sorted) while a job was running (`busy`: start and end of each).
fn longest_busy_gap(times: &[i128], busy: &[(i128, i128)], from: i128, to: i128) -> u64 {
    let mut merged: Vec<(i128, i128)> = busy.to_vec();
    merged.sort_unstable();
    let mut union: Vec<(i128, i128)> = Vec::new();
    for (a, b) in merged {
        match union.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => union.push((a, b)),
        }
    }
    // The longest stretch of the quiet `(a, b)` with a job running.
    let covered = |a: i128, b: i128| -> i128 {
        union
            .iter()
            .map(|(s, e)| (b.min(*e) - a.max(*s)).max(0))
            .max()
            .unwrap_or(0)
    };
    let mut points = vec![from];
    points.extend(times.iter().copied().filter(|t| *t > from && *t < to));
    points.push(to);
    let gap = points
        .windows(2)
        .map(|w| covered(w[0], w[1]))
        .max()
        .unwrap_or(0);
    (gap / 1_000_000) as u64
}

/// The longest time (ms) without an outcome in `[from, to]`, counting
/// from `from` to the first outcome after it.
fn longest_gap(times: &[i128], from: i128, to: i128) -> u64 {
    let mut last = if from == i128::MIN { None } else { Some(from) };
    let mut gap = 0i128;
    for t in times.iter().copied().filter(|t| *t >= from && *t <= to) {
        if let Some(l) = last {
            gap = gap.max(t - l);
        }
        last = Some(t);
    }
    // A wait still going on at the window's end counts up to it (when
    // outcomes came after it: the run had work, it was not idle).
    if let Some(l) = last {
        if to != i128::MAX && times.iter().any(|t| *t > to) {
            gap = gap.max(to - l);
        }
    }
    (gap / 1_000_000) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_re_execution_is_charged_to_a_kill_when_the_run_before_was_by_a_killed_worker() {
        let killed = HashSet::from([7]);
        // Once, by a worker that lived on: none.
        assert_eq!(re_executions_after_kill(vec![(1, 5)], &killed), 0);
        // Run by worker 7, killed, then again by 5: one after a kill.
        assert_eq!(re_executions_after_kill(vec![(2, 5), (1, 7)], &killed), 1);
        // Run by 5, which lived on, then again by 7: for another reason.
        assert_eq!(re_executions_after_kill(vec![(1, 5), (2, 7)], &killed), 0);
        // Three runs: 7 (killed), 5, 5: the second after the kill, the third not.
        assert_eq!(
            re_executions_after_kill(vec![(3, 5), (1, 7), (2, 5)], &killed),
            1
        );
    }

    #[test]
    fn a_fault_is_charged_with_the_waits_in_its_window_only() {
        let ms = |v: i128| v * 1_000_000;
        let times: Vec<i128> = [0, 1000, 1500, 9000, 9500].map(ms).to_vec();
        // From the fault at 1.2 s: 1.5 s, then nothing until 9 s.
        assert_eq!(longest_gap(&times, ms(1200), ms(20_000)), 7500);
        // Until the next fault at 4 s: still waiting then, 2.5 s so far.
        assert_eq!(longest_gap(&times, ms(1200), ms(4000)), 2500);
        // The last window with nothing after it: no tail.
        assert_eq!(longest_gap(&times, ms(9200), ms(20_000)), 300);
        assert_eq!(longest_gap(&times, i128::MIN, i128::MAX), 7500);
    }

    #[test]
    fn a_cell_is_stalled_only_while_it_has_a_job_running() {
        let ms = |v: i128| v * 1_000_000;
        let times: Vec<i128> = [1000, 2000, 9000].map(ms).to_vec();
        // Running from 0 to 3 s and from 8 s on: the quiet from 3 to 8 s
        // is no stall; 2 to 3 s and 8 to 9 s are.
        let busy = [(ms(0), ms(3000)), (ms(8000), i128::MAX)];
        assert_eq!(longest_busy_gap(&times, &busy, ms(0), ms(10_000)), 1000);
        // Running throughout: the whole quiet counts.
        let always = [(ms(0), i128::MAX)];
        assert_eq!(longest_busy_gap(&times, &always, ms(0), ms(10_000)), 7000);
        // Overlapping jobs are counted once.
        let two = [(ms(0), ms(5000)), (ms(1000), ms(6000))];
        assert_eq!(longest_busy_gap(&times, &two, ms(0), ms(10_000)), 4000);
    }

    #[test]
    fn the_weights_pick_the_kinds_the_seeded_schedules_always_had() {
        let drawn: Vec<&str> = (0..12).map(fault_kind).collect();
        assert_eq!(
            drawn,
            [
                "kill_manager",
                "kill_manager",
                "kill_manager",
                "freeze_manager",
                "freeze_manager",
                "kill_nats",
                "kill_nats",
                "kill_worker",
                "kill_worker",
                "stop_manager",
                "kill_serve",
                "kill_serve",
            ]
        );
        assert_eq!(FAULTS.iter().map(|(_, w)| w).sum::<u32>(), 12);
    }
}
