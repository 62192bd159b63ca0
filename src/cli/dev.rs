//! `fanjet dev`: the embedded default. Starts its own nats-server, a
//! manager, a worker pool with the demo handlers and `fanjet serve`; with
//! `--demo`, runs one `invoices` job to its end and exits with its outcome.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, Result};
use clap::Args;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use fanjet::client;
use fanjet::manager::{self, ManagerOptions};
use fanjet::nats::connect::ConnectArgs;
use fanjet::nats::server::{free_port, NatsServer};
use fanjet::nats::{leases, store, Nats};
use fanjet::observe::notify::Webhooks;
use fanjet::observe::{self, ServeOptions};
use fanjet::protocol::{JobState, Submission, Workflow};
use fanjet::shutdown;
use fanjet::worker::Worker;

use super::{demo, progress};

// `fanjet dev`
#[derive(Args)]
pub struct DevArgs {
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
    listen: Option<SocketAddr>,
}

/// A port: the preferred one when free, else any free one.
fn port_or_free(preferred: u16) -> u16 {
    if std::net::TcpListener::bind(("127.0.0.1", preferred)).is_ok() {
        preferred
    } else {
        free_port()
    }
}

pub async fn run(o: DevArgs) -> Result<u8> {
    let root = CancellationToken::new();
    let port = o.port.unwrap_or_else(|| port_or_free(4222));
    let store_dir = o.store.clone();
    let server =
        tokio::task::spawn_blocking(move || NatsServer::start(Some(store_dir), Some(port)))
            .await??;
    let url = server.url();
    let listen = o
        .listen
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], port_or_free(8080))));
    eprintln!(
        "nats-server  {url}  (JetStream data in {})",
        server.store().display()
    );
    eprintln!("web page     http://{listen}/   API http://{listen}/api/jobs   metrics http://{listen}/metrics");
    let nats = super::connect_admin(&ConnectArgs::url(&url), "fanjet-dev").await?;
    leases::clear(&nats).await?;
    nats.apply_workflow(&Workflow::from_toml(demo::INVOICES_TOML)?)
        .await?;
    shutdown::on_signals(root.clone(), std::time::Duration::from_secs(40));
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
        let worker = demo::register(Worker::new(nats.clone()).concurrency(o.concurrency), opts);
        let c = root.clone();
        tasks.spawn(async move { worker.run(c).await.map_err(anyhow::Error::from) });
    }
    {
        let (n, c) = (nats.clone(), root.clone());
        let options = ServeOptions {
            listen,
            webhooks: Webhooks::default(),
            tokens: Default::default(),
            metrics_listen: None,
        };
        tasks.spawn(async move {
            observe::serve(n, options, c)
                .await
                .map_err(anyhow::Error::from)
        });
    }
    let mut code = 0;
    if o.demo {
        code = demo_job(&nats, &o, listen, &root).await?;
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

/// Submits the demo job, follows it to its end and prints it with its
/// statistics; its outcome is the exit code.
async fn demo_job(
    nats: &Nats,
    o: &DevArgs,
    listen: SocketAddr,
    root: &CancellationToken,
) -> Result<i32> {
    let invoices = o.invoices;
    let sub = Submission {
        job_id: None,
        customer: Some("acme".into()),
        input: serde_json::json!({"customer": "acme", "count": invoices}),
        priority: None,
    };
    let reply = client::submit(&nats.client, "invoices", &sub).await?;
    let id = reply
        .job_id
        .ok_or_else(|| anyhow!("submission refused: {:?}", reply.error))?;
    eprintln!(
        "submitted job {id}: collect -> send x{invoices} -> summarize, {} worker slots",
        o.concurrency
    );
    eprintln!("watch it at http://{listen}/#job={id}");
    let job = tokio::select! {
        j = progress::follow(progress::Source::Store(nats), &id, true, None) => j?,
        _ = root.cancelled() => None,
    };
    let Some(job) = job else { return Ok(0) };
    print!("{}", progress::render(&job));
    // The statistics consumer records the end within a second.
    let mut stats = None;
    for _ in 0..30 {
        stats = store::stats(nats, &id).await.ok().flatten();
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
    if job.state != JobState::Completed {
        eprintln!("the demo job did not complete");
    }
    Ok(progress::exit_code(job.state))
}
