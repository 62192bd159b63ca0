//! The `fanjet` command: parses arguments, sets up logging, dispatches.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use fanjet::connect::ConnectArgs;
use fanjet::machine::JobState;
use fanjet::manager::{self, ManagerOptions};
use fanjet::notify::Webhooks;
use fanjet::protocol::Submission;
use fanjet::serve::{self, ServeOptions};
use fanjet::server::NatsServer;
use fanjet::setup::Nats;
use fanjet::worker::{exec_handler, Worker, EXIT_GIVE_UP};
use fanjet::workflow::Workflow;
use fanjet::{client, demo, progress, shutdown, store};

/// fanjet: fan-out/fan-in workflow jobs on NATS JetStream.
///
/// A job runs a workflow's steps in order; a fanout step splits into one
/// subjob per item, spread over any number of workers. Start with
/// `fanjet dev --demo`, which runs everything against its own nats-server.
#[derive(Parser)]
#[command(name = "fanjet", version, propagate_version = true)]
struct Cli {
    #[command(flatten)]
    connect: ConnectArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Embedded default: starts its own nats-server, a manager and a worker pool with the demo handlers.
    Dev {
        /// Where the embedded nats-server keeps its data.
        #[arg(long, default_value = ".fanjet/nats")]
        store: PathBuf,
        /// Port of the embedded nats-server (4222 when free, else any free one).
        #[arg(long)]
        port: Option<u16>,
        /// Run one `invoices` job, show its progress and statistics, then exit.
        #[arg(long)]
        demo: bool,
        /// Invoices (subjobs) the demo job sends.
        #[arg(long, default_value_t = 1000)]
        invoices: u64,
        /// Worker slots.
        #[arg(long, default_value_t = 50)]
        concurrency: usize,
        /// Share of demo send attempts that fail transiently (0..1).
        #[arg(long, default_value_t = 0.05)]
        failure_rate: f64,
        /// Address of the HTTP API and web page (127.0.0.1:8080 when free, else any free port).
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
    },
    /// Runs the workflow manager (intake, event loops, advisories) until SIGTERM.
    ///
    /// Run several for capacity and availability: they split the event log's
    /// 16 partitions evenly through leases in the `fanjet_leases` bucket. A
    /// manager that stops gracefully hands its partitions over at once; one
    /// that dies loses them after 10 s, when the others take them over.
    Manager {
        /// Also serve this process's Prometheus metrics (events ignored, by reason) at ADDR/metrics.
        #[arg(long)]
        metrics: Option<std::net::SocketAddr>,
    },
    /// Runs a worker pool that executes a shell command per task.
    ///
    /// The command runs through `sh -c` with the task as JSON on stdin
    /// (job_id, workflow, step, attempt, and index + item for a fanout subjob
    /// or input for a task step). Its stdout (JSON, or text) is the result.
    /// Exit 0: success. Exit 100: give up now, no more attempts. Any other
    /// exit: retry after the step's backoff, stderr is the error.
    Worker {
        /// Workflow whose steps this worker serves.
        #[arg(long)]
        workflow: String,
        /// Step to serve (repeat for several).
        #[arg(long = "step", required = true)]
        steps: Vec<String>,
        /// Command run per task.
        #[arg(long, required_unless_present = "sleep", conflicts_with = "sleep")]
        exec: Option<String>,
        /// Built-in handler instead of --exec: sleep this long, then succeed with a null result
        /// (benchmarks and smoke tests).
        #[arg(long, value_parser = humantime::parse_duration)]
        sleep: Option<Duration>,
        /// Most tasks running at once.
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        /// How long in-flight tasks may finish after SIGTERM.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        grace: Duration,
    },
    /// Submits a job and prints its id (with --wait, follows it to the end).
    Submit {
        workflow: String,
        /// Job id (idempotent: the same id never starts twice). Generated when absent.
        #[arg(long)]
        job_id: Option<String>,
        /// Customer (tenant) key.
        #[arg(long)]
        customer: Option<String>,
        /// Input as JSON, or @FILE to read it from a file.
        #[arg(long)]
        input: Option<String>,
        /// Follow the job with progress bars and exit with its outcome (0 completed, 1 failed, 2 cancelled).
        #[arg(long)]
        wait: bool,
        /// Print machine-readable JSON.
        #[arg(long)]
        json: bool,
    },
    /// Shows a job's detailed status and statistics (with --json: the same object as GET /api/jobs/JOB).
    Status {
        job_id: String,
        #[arg(long)]
        json: bool,
        /// Ask the status service as this customer (for users who may only do that).
        #[arg(long)]
        customer: Option<String>,
    },
    /// Lists jobs.
    Jobs {
        #[arg(long)]
        customer: Option<String>,
        #[arg(long)]
        workflow: Option<String>,
        /// Only jobs in this state (requested, running, completed, failed, cancelled, rejected).
        #[arg(long)]
        state: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Lists live managers (with the event-log partitions each reads) and
    /// workers (with their slots), from the lease bucket and heartbeats.
    ///
    /// Processes send a heartbeat every 5 s, so this listens that long
    /// (`--listen`) before printing.
    Processes {
        /// How long to listen for heartbeats.
        #[arg(long, default_value = "6s", value_parser = humantime::parse_duration)]
        listen: Duration,
        #[arg(long)]
        json: bool,
    },
    /// Cancels a job: nothing new is dispatched, queued tasks are dropped.
    Cancel {
        job_id: String,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Follows a job with live progress bars; exits with its outcome (0 completed, 1 failed, 2 cancelled or rejected).
    Watch {
        job_id: String,
        /// Read the status as this customer, through the status service (for users who may only do that).
        #[arg(long)]
        customer: Option<String>,
    },
    /// Serves the HTTP API, the web page and /metrics, and runs the statistics consumer and the notifier.
    Serve {
        /// Address of the HTTP server. Loopback by default: put a proxy in front to expose it.
        #[arg(long, default_value = "127.0.0.1:8080", env = "FANJET_LISTEN")]
        listen: std::net::SocketAddr,
        /// URL to POST every step and job notification to (repeat for several).
        #[arg(long = "webhook", env = "FANJET_WEBHOOKS", value_delimiter = ',')]
        webhooks: Vec<String>,
        /// Tries per notification and webhook (delays double from 1 s).
        #[arg(long, default_value_t = 6)]
        webhook_attempts: u32,
        /// Bearer token every API call must carry. Required to listen on a non-loopback address.
        #[arg(long, env = "FANJET_API_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Also serve /metrics, without the token, on this address (for Prometheus).
        #[arg(long)]
        metrics_listen: Option<std::net::SocketAddr>,
    },
    /// Manages workflow definitions.
    #[command(subcommand)]
    Workflow(WorkflowCommand),
}

#[derive(Subcommand)]
enum WorkflowCommand {
    /// Validates TOML definitions and stores them (creating their step consumers).
    Apply { files: Vec<PathBuf> },
    /// Lists stored workflows.
    List {
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FANJET_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,async_nats=warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Follows a job to its end (bars unless `json`), prints it, and returns
/// its outcome as the exit code.
async fn follow_to_end(
    nats: &Nats,
    job_id: &str,
    json: bool,
    customer: Option<&str>,
) -> Result<u8> {
    let job = progress::follow(nats, job_id, !json, None, customer)
        .await?
        .ok_or_else(|| anyhow!("job {job_id} vanished"))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&job)?);
    } else {
        print!("{}", progress::render(&job));
    }
    Ok(progress::exit_code(job.state) as u8)
}

/// A job's status from the jobs bucket, or as `customer` through the status service.
async fn lookup(nats: &Nats, job_id: &str, customer: Option<&str>) -> Result<fanjet::machine::Job> {
    let job = match customer {
        Some(c) => client::status_as(nats, c, job_id).await?,
        None => client::status(nats, job_id).await?,
    };
    job.ok_or_else(|| anyhow!("no job {job_id:?}"))
}

/// Connects and binds to fanjet's streams and buckets; creates them when
/// they are missing and this user may (a fresh server).
async fn nats(connect: &ConnectArgs, name: &str) -> Result<Nats> {
    let client = connect.connect(name).await?;
    match Nats::bind(client.clone()).await {
        Ok(n) => Ok(n),
        Err(bind_err) => Nats::ensure(client)
            .await
            .map_err(|_| anyhow::Error::from(bind_err)),
    }
}

/// Connects, creating or updating every stream and bucket (manager, serve,
/// workflow apply).
async fn nats_admin(connect: &ConnectArgs, name: &str) -> Result<Nats> {
    let client = connect.connect(name).await?;
    Ok(Nats::ensure(client).await?)
}

async fn run(cli: Cli) -> Result<u8> {
    let root = CancellationToken::new();
    match cli.command {
        Command::Dev {
            store,
            port,
            demo,
            invoices,
            concurrency,
            failure_rate,
            listen,
        } => {
            let opts = DevOptions {
                store,
                port,
                demo,
                invoices,
                concurrency,
                failure_rate,
                listen,
            };
            dev(opts, root).await
        }
        Command::Manager { metrics } => {
            let nats = nats_admin(&cli.connect, "fanjet-manager").await?;
            shutdown::on_signals(root.clone());
            let mut side = JoinSet::new();
            if let Some(addr) = metrics {
                side.spawn(fanjet::api::serve_metrics(addr, root.clone()));
            }
            let result = manager::run(nats, ManagerOptions::default(), root.clone()).await;
            root.cancel();
            while let Some(r) = side.join_next().await {
                if let Ok(Err(e)) = r {
                    eprintln!("error: metrics endpoint: {e}");
                }
            }
            result?;
            Ok(0)
        }
        Command::Worker {
            workflow,
            steps,
            exec,
            sleep,
            concurrency,
            grace,
        } => {
            let nats = nats(&cli.connect, "fanjet-worker").await?;
            shutdown::on_signals(root.clone());
            let mut worker = Worker::new(nats).concurrency(concurrency).grace(grace);
            for step in &steps {
                let handler = match (&exec, sleep) {
                    (Some(cmd), _) => exec_handler(cmd.clone()),
                    (None, Some(d)) => fanjet::worker::sleep_handler(d),
                    (None, None) => bail!("give --exec CMD or --sleep DURATION"),
                };
                worker = worker.boxed_handler(&workflow, step, handler);
            }
            tracing::info!(give_up_exit_code = EXIT_GIVE_UP, "worker starting");
            worker.run(root).await?;
            Ok(0)
        }
        Command::Submit {
            workflow,
            job_id,
            customer,
            input,
            wait,
            json,
        } => {
            let nats = nats(&cli.connect, "fanjet-cli").await?;
            let input = match input {
                None => serde_json::Value::Null,
                Some(s) => {
                    let text = match s.strip_prefix('@') {
                        Some(path) => std::fs::read_to_string(path)
                            .with_context(|| format!("reading input file {path}"))?,
                        None => s,
                    };
                    serde_json::from_str(&text).context("--input is not valid JSON")?
                }
            };
            // A customer (a token) may be all this user can read status as.
            let as_customer = customer
                .clone()
                .filter(|c| fanjet::protocol::validate_token("customer", c).is_ok());
            let sub = Submission {
                job_id,
                customer,
                input,
            };
            let reply = client::submit(&nats, &workflow, &sub).await?;
            let id = reply.job_id.clone().unwrap_or_default();
            if !reply.ok {
                let err = reply
                    .error
                    .map(|e| format!("{:?}: {}", e.code, e.message))
                    .unwrap_or_default();
                bail!("job {id} rejected: {err}");
            }
            if json && !wait {
                println!("{}", serde_json::to_string(&reply)?);
            } else if !wait {
                println!("{id}");
            }
            if reply.duplicate {
                eprintln!("note: job {id} existed already; nothing new was started");
            }
            if !wait {
                return Ok(0);
            }
            follow_to_end(&nats, &id, json, as_customer.as_deref()).await
        }
        Command::Status {
            job_id,
            json,
            customer,
        } => {
            let nats = nats(&cli.connect, "fanjet-cli").await?;
            let job = lookup(&nats, &job_id, customer.as_deref()).await?;
            let stats = match customer {
                Some(_) => None,
                None => fanjet::stats::get(&nats, &job_id).await.ok().flatten(),
            };
            let now = fanjet::protocol::now_ms();
            if json {
                let detailed = client::detailed(&job, stats.as_ref(), now);
                println!("{}", serde_json::to_string_pretty(&detailed)?);
            } else {
                print!("{}", progress::render(&job));
                if let Some(st) = &stats {
                    print!(
                        "{}",
                        progress::render_stats(st, job.finished_at.unwrap_or(now))
                    );
                }
                let detailed = client::detailed(&job, stats.as_ref(), now);
                print!("{}", progress::render_capacity(&detailed, now));
            }
            Ok(0)
        }
        Command::Processes { listen, json } => {
            let nats = nats(&cli.connect, "fanjet-cli").await?;
            if !json {
                eprintln!(
                    "listening for heartbeats for {}…",
                    humantime::format_duration(listen)
                );
            }
            let beats = fanjet::monitor::listen(&nats, listen).await?;
            let p = fanjet::client::processes(&nats, beats).await;
            if json {
                println!("{}", serde_json::to_string_pretty(&p)?);
            } else {
                print!("{}", progress::processes_table(&p));
            }
            Ok(0)
        }
        Command::Jobs {
            customer,
            workflow,
            state,
            json,
        } => {
            let nats = nats(&cli.connect, "fanjet-cli").await?;
            let mut jobs = Vec::new();
            for id in store::job_ids(&nats).await? {
                if let Some((job, _)) = store::get(&nats, &id).await? {
                    let keep = customer
                        .as_deref()
                        .is_none_or(|c| job.customer.as_deref() == Some(c))
                        && workflow.as_deref().is_none_or(|w| job.workflow == w)
                        && state.as_deref().is_none_or(|s| job.state.as_str() == s);
                    if keep {
                        jobs.push(job);
                    }
                }
            }
            jobs.sort_by_key(|j| j.created_at);
            if json {
                let list: Vec<_> = jobs
                    .iter()
                    .map(|j| serde_json::json!({"job_id": j.job_id, "workflow": j.workflow, "customer": j.customer, "state": j.state, "created_at": j.created_at, "finished_at": j.finished_at}))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                println!(
                    "{:<28} {:<16} {:<16} {:<10} progress",
                    "job", "workflow", "customer", "state"
                );
                for j in &jobs {
                    let done: u64 = j
                        .steps
                        .iter()
                        .filter(|s| s.state != fanjet::machine::StepState::Pending)
                        .count() as u64;
                    println!(
                        "{:<28} {:<16} {:<16} {:<10} step {}/{}",
                        j.job_id,
                        j.workflow,
                        j.customer.as_deref().unwrap_or("-"),
                        j.state.as_str(),
                        done,
                        j.steps.len()
                    );
                }
            }
            Ok(0)
        }
        Command::Cancel { job_id, reason } => {
            let nats = nats(&cli.connect, "fanjet-cli").await?;
            client::cancel(&nats, &job_id, reason).await?;
            eprintln!("cancel requested for {job_id}");
            Ok(0)
        }
        Command::Watch { job_id, customer } => {
            let nats = nats(&cli.connect, "fanjet-cli").await?;
            lookup(&nats, &job_id, customer.as_deref()).await?;
            follow_to_end(&nats, &job_id, false, customer.as_deref()).await
        }
        Command::Serve {
            listen,
            webhooks,
            webhook_attempts,
            token,
            metrics_listen,
        } => {
            let nats = nats_admin(&cli.connect, "fanjet-serve").await?;
            shutdown::on_signals(root.clone());
            let hooks = Webhooks {
                urls: webhooks,
                attempts: webhook_attempts,
                ..Default::default()
            };
            eprintln!("fanjet serve: http://{listen}/ (API under /api, metrics at /metrics)");
            serve::run(
                nats,
                ServeOptions {
                    listen,
                    webhooks: hooks,
                    token,
                    metrics_listen,
                },
                root,
            )
            .await?;
            Ok(0)
        }
        Command::Workflow(WorkflowCommand::Apply { files }) => {
            if files.is_empty() {
                bail!("give at least one workflow file");
            }
            let mut parsed = Vec::new();
            for f in &files {
                let text = std::fs::read_to_string(f)
                    .with_context(|| format!("reading {}", f.display()))?;
                parsed
                    .push(Workflow::from_toml(&text).with_context(|| format!("{}", f.display()))?);
            }
            let nats = nats_admin(&cli.connect, "fanjet-cli").await?;
            for w in parsed {
                nats.apply_workflow(&w).await?;
                println!("applied {} ({} steps)", w.name, w.steps.len());
            }
            Ok(0)
        }
        Command::Workflow(WorkflowCommand::List { json }) => {
            let nats = nats(&cli.connect, "fanjet-cli").await?;
            let list = nats.workflows().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                for w in list {
                    let steps: Vec<String> = w
                        .steps
                        .iter()
                        .map(|s| format!("{}({})", s.name, s.kind.as_str()))
                        .collect();
                    println!("{:<20} {}", w.name, steps.join(" -> "));
                }
            }
            Ok(0)
        }
    }
}

struct DevOptions {
    store: PathBuf,
    port: Option<u16>,
    demo: bool,
    invoices: u64,
    concurrency: usize,
    failure_rate: f64,
    listen: Option<std::net::SocketAddr>,
}

/// A port: the preferred one when free, else any free one.
fn port_or_free(preferred: u16) -> u16 {
    if std::net::TcpListener::bind(("127.0.0.1", preferred)).is_ok() {
        preferred
    } else {
        fanjet::server::free_port()
    }
}

async fn dev(o: DevOptions, root: CancellationToken) -> Result<u8> {
    let port = o.port.unwrap_or_else(|| port_or_free(4222));
    let store_dir = o.store.clone();
    let server =
        tokio::task::spawn_blocking(move || NatsServer::start(Some(store_dir), Some(port)))
            .await??;
    let url = server.url();
    let listen = o
        .listen
        .unwrap_or_else(|| std::net::SocketAddr::from(([127, 0, 0, 1], port_or_free(8080))));
    eprintln!(
        "nats-server  {url}  (JetStream data in {})",
        server.store().display()
    );
    eprintln!("web page     http://{listen}/   API http://{listen}/api/jobs   metrics http://{listen}/metrics");
    let nats = nats_admin(&ConnectArgs::url(&url), "fanjet-dev").await?;
    fanjet::leases::clear(&nats).await?;
    nats.apply_workflow(&Workflow::from_toml(demo::INVOICES_TOML)?)
        .await?;
    shutdown::on_signals(root.clone());
    let mut tasks = JoinSet::new();
    {
        let (n, c) = (nats.clone(), root.clone());
        tasks.spawn(async move {
            manager::run(n, ManagerOptions::default(), c)
                .await
                .map_err(anyhow::Error::from)
        });
    }
    {
        let opts = demo::DemoOptions {
            invoices: o.invoices,
            failure_rate: o.failure_rate,
            ..Default::default()
        };
        let worker = demo::register(
            Worker::new(nats.clone()).concurrency(o.concurrency),
            nats.clone(),
            opts,
        );
        let c = root.clone();
        tasks.spawn(async move { worker.run(c).await.map_err(anyhow::Error::from) });
    }
    {
        let (n, c) = (nats.clone(), root.clone());
        let options = ServeOptions {
            listen,
            webhooks: Webhooks::default(),
            token: None,
            metrics_listen: None,
        };
        tasks.spawn(async move { serve::run(n, options, c).await.map_err(anyhow::Error::from) });
    }
    let mut code = 0;
    if o.demo {
        let invoices = o.invoices;
        let sub = Submission {
            job_id: None,
            customer: Some("acme".into()),
            input: serde_json::json!({"customer": "acme", "count": invoices}),
        };
        let reply = client::submit(&nats, "invoices", &sub).await?;
        let id = reply
            .job_id
            .ok_or_else(|| anyhow!("submission refused: {:?}", reply.error))?;
        eprintln!(
            "submitted job {id}: collect -> send x{invoices} -> summarize, {} worker slots",
            o.concurrency
        );
        eprintln!("watch it at http://{listen}/#job={id}");
        let job = tokio::select! {
            j = progress::follow(&nats, &id, true, None, None) => j?,
            _ = root.cancelled() => None,
        };
        if let Some(job) = job {
            print!("{}", progress::render(&job));
            // The statistics consumer records the end within a second.
            let mut stats = None;
            for _ in 0..30 {
                stats = fanjet::stats::get(&nats, &id).await.ok().flatten();
                if stats.as_ref().is_some_and(|s| s.outcome.is_some()) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            if let Some(st) = stats {
                print!(
                    "{}",
                    progress::render_stats(&st, job.finished_at.unwrap_or(0))
                );
            }
            code = progress::exit_code(job.state);
            if job.state != JobState::Completed {
                eprintln!("the demo job did not complete");
            }
        }
        root.cancel();
    } else {
        eprintln!("manager, workers and API running; submit a job from another shell:");
        eprintln!("  fanjet --server {url} submit invoices --customer acme --input '{{\"count\": 100}}' --wait");
        eprintln!("or from any NATS client: nats --server {url} request fanjet.submit.invoices '{{\"input\": {{\"count\": 100}}}}'");
        eprintln!("Ctrl-C stops everything.");
    }
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(Err(e)) => {
                root.cancel();
                eprintln!("error: {e:#}");
                code = 1;
            }
            Err(e) => eprintln!("error: task failed: {e}"),
            Ok(Ok(())) => {}
        }
    }
    drop(server);
    Ok(code as u8)
}
