//! The long-running processes: `fanjet manager`, `fanjet worker` and
//! `fanjet serve`. Each runs until SIGTERM or Ctrl-C and drains first.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::Args;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use fanjet::manager::{self, ManagerOptions};
use fanjet::nats::connect::ConnectArgs;
use fanjet::observe::notify::Webhooks;
use fanjet::observe::{self, ServeOptions};
use fanjet::shutdown;
use fanjet::worker::{exec_batch_handler, exec_handler, sleep_handler, Worker, EXIT_GIVE_UP};

// `fanjet manager`
#[derive(Args)]
pub struct ManagerArgs {
    /// Also serve this process's Prometheus metrics (events ignored, by reason) at ADDR/metrics.
    #[arg(long)]
    metrics: Option<SocketAddr>,
    /// Submissions accepted per second per customer (per manager process);
    /// beyond it they are answered `rate_limited` and nothing is recorded.
    #[arg(long, default_value = "200")]
    submit_rate: NonZeroU32,
    /// Submissions a customer may send at once above --submit-rate.
    #[arg(long, default_value = "2000")]
    submit_burst: NonZeroU32,
    /// Rejected submissions recorded per minute per customer (each is a
    /// JobRejected and a record kept 30 days); past it they are answered
    /// but not recorded.
    #[arg(long, default_value = "60")]
    rejections_per_min: NonZeroU32,
    /// Rejections recorded at once above --rejections-per-min.
    #[arg(long, default_value = "50")]
    rejection_burst: NonZeroU32,
    /// After SIGTERM, how long stopping may take (last checkpoints, handing
    /// partitions over) before the process exits anyway.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    grace: Duration,
    /// Fair share: each fanout keeps dispatched its share of its step's
    /// worker slots (split between customers, then their jobs, by
    /// priority; counted from worker heartbeats) plus this much work ahead,
    /// so a job submitted later waits at most about this long behind
    /// others. Larger: more throughput for no-op subjobs; smaller: fairer.
    #[arg(long, default_value = "50ms", value_parser = humantime::parse_duration)]
    queue_ahead: Duration,
    /// Turn the fair share off: each job dispatches up to its step's
    /// `max_in_flight`, first come first served.
    #[arg(long, conflicts_with = "queue_ahead")]
    no_fair_share: bool,
    /// Leave the leaders of fanjet's streams, buckets and consumers where
    /// the cluster's elections put them. By default one manager at a time
    /// keeps each cell's on the node that leads the cell's log, and the
    /// cells' logs on different nodes, so that losing a node stalls only the
    /// cell it led (docs/RELIABILITY.md); on a single server this does
    /// nothing either way.
    #[arg(long)]
    no_placement: bool,
}

// `fanjet worker`
#[derive(Args)]
pub struct WorkerArgs {
    /// Workflow whose steps this worker serves.
    #[arg(long)]
    workflow: String,
    /// Step to serve (repeat for several).
    #[arg(long = "step", required = true)]
    steps: Vec<String>,
    /// Command run per task (through `sh -c`): the task as JSON on stdin,
    /// the result as JSON on stdout; exit 100 gives up, any other failure is
    /// retried. For a step with `batch_size` it runs once per batch: the
    /// task's `items` on stdin, and on stdout a JSON array with one entry
    /// per item, `{"result": …}` or `{"error": "…"}` (that item is retried
    /// alone; add `"give_up": true` not to retry). See docs/PROTOCOL.md.
    #[arg(long, required_unless_present = "sleep", conflicts_with = "sleep")]
    exec: Option<String>,
    /// Built-in handler instead of --exec: sleep this long, then succeed with a null result
    /// (benchmarks and smoke tests).
    #[arg(long, value_parser = humantime::parse_duration)]
    sleep: Option<Duration>,
    /// Most tasks running at once.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// How long in-flight tasks may finish after SIGTERM (the process exits
    /// at the latest 5 s later, when their outcomes cannot be reported).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    grace: Duration,
    /// Threads of this process's runtime. One is enough for the handlers of
    /// this command (each --exec task runs in a process of its own, --sleep
    /// only waits), and costs less per task than several (fewer wake-ups
    /// between threads); raise it only if this process itself is busy.
    #[arg(long, default_value_t = 1, env = "FANJET_WORKER_THREADS", value_parser = clap::value_parser!(u16).range(1..))]
    pub threads: u16,
}

// `fanjet serve`
#[derive(Args)]
pub struct ServeArgs {
    /// Address of the HTTP server. Loopback by default: put a proxy in front to expose it.
    #[arg(long, default_value = "127.0.0.1:8080", env = "FANJET_LISTEN")]
    listen: SocketAddr,
    /// URL to POST every step and job notification to (repeat for several).
    #[arg(long = "webhook", env = "FANJET_WEBHOOKS", value_delimiter = ',')]
    webhooks: Vec<String>,
    /// Tries per notification and webhook (delays double from 1 s).
    #[arg(long, default_value_t = 6)]
    webhook_attempts: u32,
    /// Bearer token every API call must carry (the admin token: it may
    /// also submit and cancel). Required to listen on a non-loopback
    /// address. (`--token` is NATS's, as for every command.)
    #[arg(long, env = "FANJET_API_TOKEN", hide_env_values = true)]
    api_token: Option<String>,
    /// A second bearer token that may only read (GET routes: status,
    /// events, the page's data), e.g. for dashboards and support staff.
    #[arg(
        long,
        env = "FANJET_API_READ_TOKEN",
        hide_env_values = true,
        requires = "api_token"
    )]
    api_read_token: Option<String>,
    /// Also serve /metrics, without the token, on this address (for Prometheus).
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// After SIGTERM, how long stopping may take (saving statistics) before
    /// the process exits anyway.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    grace: Duration,
}

/// Beyond a worker's grace period, time to report what finished in it.
const WORKER_REPORT_MARGIN: Duration = Duration::from_secs(5);

pub async fn manager(connect: &ConnectArgs, args: ManagerArgs) -> Result<u8> {
    let root = CancellationToken::new();
    shutdown::on_signals(root.clone(), args.grace);
    let Some(nats) = super::connect_waiting(connect, "fanjet-manager", &root).await? else {
        return Ok(0);
    };
    let mut side = JoinSet::new();
    if let Some(addr) = args.metrics {
        side.spawn(observe::api::serve_metrics(addr, root.clone()));
    }
    let options = ManagerOptions {
        intake: manager::intake::IntakeLimits {
            submissions_per_s: args.submit_rate,
            submission_burst: args.submit_burst,
            rejections_recorded_per_min: args.rejections_per_min,
            rejection_burst: args.rejection_burst,
        },
        queue_ahead: (!args.no_fair_share).then_some(args.queue_ahead),
        keep_leaders_together: !args.no_placement,
        ..ManagerOptions::default()
    };
    let result = manager::run(nats, options, root.clone()).await;
    root.cancel();
    while let Some(r) = side.join_next().await {
        if let Ok(Err(e)) = r {
            eprintln!("error: metrics endpoint: {e}");
        }
    }
    result?;
    Ok(0)
}

pub async fn worker(connect: &ConnectArgs, args: WorkerArgs) -> Result<u8> {
    if args.exec.is_none() && args.sleep.is_none() {
        bail!("give --exec CMD or --sleep DURATION");
    }
    let root = CancellationToken::new();
    shutdown::on_signals(root.clone(), args.grace + WORKER_REPORT_MARGIN);
    let Some(nats) = super::connect_worker(connect, &root).await? else {
        return Ok(0);
    };
    let mut worker = Worker::new(nats)
        .concurrency(args.concurrency)
        .grace(args.grace);
    for step in &args.steps {
        worker = match (&args.exec, args.sleep) {
            (Some(cmd), _) => worker
                .boxed_handler(&args.workflow, step, exec_handler(cmd.clone()))
                .boxed_batch_handler(&args.workflow, step, exec_batch_handler(cmd.clone())),
            (None, Some(d)) => worker.boxed_handler(&args.workflow, step, sleep_handler(d)),
            (None, None) => bail!("give --exec CMD or --sleep DURATION"),
        };
    }
    tracing::info!(give_up_exit_code = EXIT_GIVE_UP, "worker starting");
    worker.run(root).await?;
    Ok(0)
}

pub async fn serve(connect: &ConnectArgs, args: ServeArgs) -> Result<u8> {
    let root = CancellationToken::new();
    shutdown::on_signals(root.clone(), args.grace);
    let Some(nats) = super::connect_waiting(connect, "fanjet-serve", &root).await? else {
        return Ok(0);
    };
    let webhooks = Webhooks {
        urls: args.webhooks,
        attempts: args.webhook_attempts,
        ..Default::default()
    };
    eprintln!(
        "fanjet serve: http://{}/ (API under /api, metrics at /metrics)",
        args.listen
    );
    let options = ServeOptions {
        listen: args.listen,
        webhooks,
        tokens: fanjet::observe::api::ApiTokens {
            admin: args.api_token,
            read: args.api_read_token,
        },
        metrics_listen: args.metrics_listen,
    };
    observe::serve(nats, options, root).await?;
    Ok(0)
}
