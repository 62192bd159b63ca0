//! The job commands: `fanjet submit`, `status`, `jobs`, `cancel`, `watch`.

use std::io::Write;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;

use fanjet::client;
use fanjet::nats::connect::ConnectArgs;
use fanjet::nats::index;
use fanjet::nats::store;
use fanjet::nats::Nats;
use fanjet::protocol::{
    detailed, now_ms, validate_token, IndexCounts, Job, JobState, ListRequest, StepState,
    Submission, Tolerance,
};

use super::progress;

// `fanjet submit`
#[derive(Args)]
pub struct SubmitArgs {
    workflow: String,
    /// Job id (idempotent: the same id never starts twice). Generated when absent.
    #[arg(long)]
    job_id: Option<String>,
    /// Submit as this customer, on its tenant subject
    /// `fanjet.submit.<workflow>.<customer>` (what a submitter pinned to one
    /// customer may use). The job id lives in the customer's namespace: the
    /// id printed starts with the customer's tag.
    #[arg(long)]
    customer: Option<String>,
    /// With --customer: send the customer in the body of a submission on
    /// `fanjet.submit.<workflow>` instead (trusted users; the id is used as
    /// given).
    #[arg(long, requires = "customer")]
    global: bool,
    /// Input as JSON, or @FILE to read it from a file.
    #[arg(long)]
    input: Option<String>,
    /// Priority from 1 (lowest) to 9 (highest), default 5: among jobs
    /// waiting for the same workers, a higher one starts first. A job that
    /// waits a minute without a slot rises one level per minute.
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=9))]
    priority: Option<u8>,
    /// Follow the job with progress bars and exit with its outcome (0 completed, 1 failed, 2 cancelled).
    #[arg(long)]
    wait: bool,
    /// Print machine-readable JSON.
    #[arg(long)]
    json: bool,
}

// `fanjet status`
#[derive(Args)]
pub struct StatusArgs {
    job_id: String,
    #[arg(long)]
    json: bool,
    /// Ask the status service as this customer (for users who may only do that).
    #[arg(long)]
    customer: Option<String>,
}

// `fanjet jobs`
#[derive(Args)]
pub struct JobsArgs {
    /// Only this customer's jobs, asked of the listing service as that
    /// customer (what a user pinned to one customer may do).
    #[arg(long)]
    customer: Option<String>,
    #[arg(long)]
    workflow: Option<String>,
    /// Only jobs in this state (requested, running, completed, failed, cancelled, rejected).
    #[arg(long, value_parser = parse_state)]
    state: Option<JobState>,
    /// Only jobs whose state changed since then: a time (2026-12-01T08:00:00Z)
    /// or a while ago (90m, 2h, 7d).
    #[arg(long, value_parser = parse_time)]
    since: Option<u64>,
    /// Only jobs whose state changed before then (same forms as --since).
    #[arg(long, value_parser = parse_time)]
    until: Option<u64>,
    /// Only jobs whose id starts with this (looks at the newest 10,000 jobs
    /// the other filters keep; the cursor printed goes on from there).
    #[arg(long)]
    prefix: Option<String>,
    /// How many jobs (at most 1000).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..=1000))]
    limit: u64,
    /// Go on where a listing stopped (the cursor it printed).
    #[arg(long)]
    cursor: Option<String>,
    /// Also print how many jobs there are per workflow and state.
    #[arg(long)]
    counts: bool,
    /// Instead of jobs: each customer's running fanouts and their subjobs
    /// dispatched (running) and waiting for their share (queued), now.
    #[arg(long, conflicts_with_all = ["customer", "workflow", "state", "since", "until", "prefix", "cursor", "counts"])]
    by_customer: bool,
    #[arg(long)]
    json: bool,
}

// `fanjet cancel`
#[derive(Args)]
pub struct CancelArgs {
    job_id: String,
    #[arg(long)]
    reason: Option<String>,
    /// Ask the cancel service as this customer (for users pinned to one
    /// customer, who may cancel only its jobs).
    #[arg(long)]
    customer: Option<String>,
}

// `fanjet pause`, `fanjet resume`
#[derive(Args)]
pub struct PauseArgs {
    job_id: String,
    #[arg(long)]
    reason: Option<String>,
    /// Ask the update service as this customer (for users pinned to one
    /// customer, who may change only its jobs).
    #[arg(long)]
    customer: Option<String>,
}

// `fanjet update`
#[derive(Args)]
pub struct UpdateArgs {
    job_id: String,
    /// Most subjobs of the job dispatched and unfinished at once, from now
    /// on (its running step and the ones after).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    max_in_flight: Option<u64>,
    /// Failed subjobs its steps tolerate from now on: a count ("10") or a
    /// share ("5%"). Lower than the failures its running step counted
    /// already, the job fails at once.
    #[arg(long, value_parser = parse_tolerance)]
    tolerate_failures: Option<Tolerance>,
    #[arg(long)]
    reason: Option<String>,
    /// Ask the update service as this customer (for users pinned to one
    /// customer, who may change only its jobs).
    #[arg(long)]
    customer: Option<String>,
}

// `fanjet redrive`
#[derive(Args)]
pub struct RedriveArgs {
    job_id: String,
    /// The step to run again (its subjobs that did not complete, then the
    /// steps after it); default: the step where the job failed, or for a
    /// completed job its first step with failed subjobs.
    #[arg(long)]
    step: Option<String>,
    /// Why (kept with the redrive in the job's record and log).
    #[arg(long)]
    reason: Option<String>,
    /// Ask the redrive service as this customer (for users pinned to one
    /// customer, who may redrive only its jobs).
    #[arg(long)]
    customer: Option<String>,
    /// Then follow the job to its end with progress bars; the exit code is
    /// its outcome (0 completed, 1 failed, 2 cancelled), as `fanjet watch`.
    #[arg(long)]
    wait: bool,
}

fn parse_tolerance(text: &str) -> Result<Tolerance, String> {
    Tolerance::parse(text)
}

// `fanjet results`
#[derive(Args)]
pub struct ResultsArgs {
    job_id: String,
    /// The step (name or index); default: the last fanout step that started.
    #[arg(long)]
    step: Option<String>,
    /// Only the subjobs that failed, with their last error.
    #[arg(long)]
    failed: bool,
}

// `fanjet watch`
#[derive(Args)]
pub struct WatchArgs {
    job_id: String,
    /// Read the status as this customer, through the status service (for users who may only do that).
    #[arg(long)]
    customer: Option<String>,
}

fn parse_state(name: &str) -> Result<JobState, String> {
    JobState::parse(name).ok_or_else(|| {
        let names: Vec<&str> = JobState::ALL.iter().map(|s| s.as_str()).collect();
        format!("unknown state {name:?}; one of {}", names.join(", "))
    })
}

pub async fn submit(connect: &ConnectArgs, args: SubmitArgs) -> Result<u8> {
    let input = match args.input {
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
    let as_customer = args
        .customer
        .clone()
        .filter(|c| !args.global && validate_token("customer", c).is_ok());
    let sub = Submission {
        job_id: args.job_id,
        customer: args.customer,
        input,
        priority: args.priority,
    };
    // As a customer, nothing but the intake and the status service is
    // needed: no stream or bucket is bound (a submitter may see none).
    let (reply, nats) = match &as_customer {
        Some(customer) => {
            let nats = connect.connect("fanjet-cli").await?;
            let reply = client::submit_as(&nats, &args.workflow, customer, &sub).await?;
            (reply, Connection::Customer(nats))
        }
        None => {
            let nats = super::connect(connect, "fanjet-cli").await?;
            let reply = client::submit(&nats.client, &args.workflow, &sub).await?;
            (reply, Connection::Full(Box::new(nats)))
        }
    };
    let id = reply.job_id.clone().unwrap_or_default();
    if !reply.ok {
        let err = reply
            .error
            .map(|e| format!("{:?}: {}", e.code, e.message))
            .unwrap_or_default();
        bail!("job {id} rejected: {err}");
    }
    if args.json && !args.wait {
        println!("{}", serde_json::to_string(&reply)?);
    } else if !args.wait {
        println!("{id}");
    }
    if reply.duplicate {
        eprintln!("note: job {id} existed already; nothing new was started");
    }
    if !args.wait {
        return Ok(0);
    }
    let source = nats.source(as_customer.as_deref());
    follow_to_end(source, &id, args.json).await
}

/// A connection for a command that may act as a customer.
enum Connection {
    /// Streams and buckets bound (users who may read them).
    Full(Box<Nats>),
    /// Only the connection: as a customer, through the manager's services.
    Customer(async_nats::Client),
}

impl Connection {
    async fn open(connect: &ConnectArgs, customer: Option<&str>) -> Result<Connection> {
        Ok(match customer {
            Some(_) => Connection::Customer(connect.connect("fanjet-cli").await?),
            None => Connection::Full(Box::new(super::connect(connect, "fanjet-cli").await?)),
        })
    }

    fn source<'a>(&'a self, customer: Option<&'a str>) -> progress::Source<'a> {
        match (self, customer) {
            (Connection::Full(n), None) => progress::Source::Store(n),
            (Connection::Full(n), Some(c)) => progress::Source::Customer(&n.client, c),
            (Connection::Customer(n), c) => progress::Source::Customer(n, c.unwrap_or("-")),
        }
    }
}

pub async fn status(connect: &ConnectArgs, args: StatusArgs) -> Result<u8> {
    let conn = Connection::open(connect, args.customer.as_deref()).await?;
    let job = lookup(conn.source(args.customer.as_deref()), &args.job_id).await?;
    let stats = match &conn {
        Connection::Full(nats) => store::stats(nats, &args.job_id).await.ok().flatten(),
        Connection::Customer(_) => None,
    };
    let now = now_ms();
    let view = detailed(&job, stats.as_ref(), now);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&view)?);
    } else {
        print!("{}", progress::render(&job));
        if let Some(st) = &stats {
            print!(
                "{}",
                progress::render_stats(st, job.finished_at.unwrap_or(now))
            );
        }
        print!("{}", progress::render_capacity(&view, now));
    }
    Ok(0)
}

pub async fn list(connect: &ConnectArgs, args: JobsArgs) -> Result<u8> {
    if args.by_customer {
        let nats = super::connect(connect, "fanjet-cli").await?;
        let usage = fanjet::nats::tenants::usage(&nats.js).await?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&usage)?);
            return Ok(0);
        }
        println!(
            "{:<24} {:>6} {:>10} {:>10} {:>7} {:>8}",
            "customer", "jobs", "running", "queued", "weight", "cap"
        );
        for u in usage {
            let cap = u
                .max_concurrency
                .map(|c| c.to_string())
                .unwrap_or("-".into());
            println!(
                "{:<24} {:>6} {:>10} {:>10} {:>7} {:>8}",
                u.customer, u.jobs, u.running, u.queued, u.weight, cap
            );
        }
        return Ok(0);
    }
    let req = ListRequest {
        workflow: args.workflow.clone(),
        state: args.state,
        since: args.since,
        until: args.until,
        prefix: args.prefix.clone(),
        cursor: args.cursor.clone(),
        limit: Some(args.limit as usize),
        counts: args.counts,
    };
    let mut full = None;
    let (page, counts) = match &args.customer {
        Some(customer) => {
            let client = connect.connect("fanjet-cli").await?;
            client::list_as(&client, customer, &req).await?
        }
        None => {
            let nats = full.insert(super::connect(connect, "fanjet-cli").await?);
            let filter = req.filter(None);
            let page = index::list(nats, &filter, &req).await?;
            let counts = match args.counts {
                true => Some(index::counts(nats, &filter).await?),
                false => None,
            };
            (page, counts)
        }
    };
    if args.json {
        let mut body = serde_json::json!(page);
        if let Some(c) = &counts {
            body["counts"] = serde_json::json!(c);
        }
        println!("{}", serde_json::to_string_pretty(&body)?);
        return Ok(0);
    }
    if let Some(c) = &counts {
        print_counts(c);
    }
    // Ids of jobs submitted as a customer carry its tag: as wide as they are.
    let w = page
        .jobs
        .iter()
        .map(|j| j.job_id.len())
        .max()
        .unwrap_or(0)
        .max(28);
    println!(
        "{:<w$} {:<16} {:<16} {:<10} {:<20} progress",
        "job", "workflow", "customer", "state", "changed"
    );
    for j in &page.jobs {
        // A job under way: its step and whether it is paused, from its record.
        let record = match (&full, j.state.is_terminal()) {
            (Some(nats), false) => store::status(nats, &j.job_id).await.ok().flatten(),
            _ => None,
        };
        let (state, step) = match &record {
            Some(job) => {
                let started = job
                    .steps
                    .iter()
                    .filter(|s| s.state != StepState::Pending)
                    .count();
                (
                    progress::shown_state(job),
                    format!("step {started}/{}", job.steps.len()),
                )
            }
            None => (j.state.as_str(), String::new()),
        };
        println!(
            "{:<w$} {:<16} {:<16} {:<10} {:<20} {step}",
            j.job_id,
            j.workflow,
            j.customer.as_deref().unwrap_or("-"),
            state,
            humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + std::time::Duration::from_millis(j.changed_at)
            ),
        );
    }
    match &page.next_cursor {
        Some(c) => println!("more: add --cursor {c}"),
        None if page.jobs.is_empty() => println!("no jobs"),
        None => {}
    }
    Ok(0)
}

fn print_counts(c: &IndexCounts) {
    let states: Vec<&str> = JobState::ALL.iter().map(|s| s.as_str()).collect();
    print!("{:<16}", "workflow");
    for s in &states {
        print!(" {s:>10}");
    }
    println!();
    for (wf, by_state) in &c.workflows {
        print!("{wf:<16}");
        for s in &states {
            print!(" {:>10}", by_state.get(*s).copied().unwrap_or(0));
        }
        println!();
    }
    println!("{} jobs\n", c.total);
}

/// A time given as RFC 3339 or as a while ago, in ms since the epoch.
fn parse_time(text: &str) -> Result<u64, String> {
    if let Ok(t) = humantime::parse_rfc3339_weak(text) {
        return t
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .map_err(|e| e.to_string());
    }
    match humantime::parse_duration(text) {
        Ok(ago) => Ok(now_ms().saturating_sub(ago.as_millis() as u64)),
        Err(_) => Err(format!(
            "{text:?} is neither a time (2026-12-01T08:00:00Z) nor a while ago (90m, 2h, 7d)"
        )),
    }
}

pub async fn cancel(connect: &ConnectArgs, args: CancelArgs) -> Result<u8> {
    let id = match &args.customer {
        Some(customer) => {
            let nats = connect.connect("fanjet-cli").await?;
            client::cancel_as(&nats, customer, &args.job_id, args.reason).await?
        }
        None => {
            let nats = super::connect(connect, "fanjet-cli").await?;
            client::cancel(&nats, &args.job_id, args.reason).await?;
            args.job_id
        }
    };
    eprintln!("cancel requested for {id}");
    Ok(0)
}

/// `fanjet pause` (`paused`) and `fanjet resume`.
pub async fn pause(connect: &ConnectArgs, args: PauseArgs, paused: bool) -> Result<u8> {
    let change = client::Change {
        paused: Some(paused),
        reason: args.reason,
        ..Default::default()
    };
    let id = change_job(connect, &args.job_id, args.customer.as_deref(), change).await?;
    let what = if paused { "pause" } else { "resume" };
    eprintln!("{what} requested for {id}");
    Ok(0)
}

/// Asks for a change: as a customer through the update service, else on
/// the log. The job's full id.
async fn change_job(
    connect: &ConnectArgs,
    job_id: &str,
    customer: Option<&str>,
    change: client::Change,
) -> Result<String> {
    Ok(match customer {
        Some(customer) => {
            let nats = connect.connect("fanjet-cli").await?;
            client::update_as(&nats, customer, job_id, change).await?
        }
        None => {
            let nats = super::connect(connect, "fanjet-cli").await?;
            client::update(&nats, job_id, change).await?;
            job_id.to_string()
        }
    })
}

pub async fn update(connect: &ConnectArgs, args: UpdateArgs) -> Result<u8> {
    if args.max_in_flight.is_none() && args.tolerate_failures.is_none() {
        bail!("nothing to change: give --max-in-flight or --tolerate-failures");
    }
    let change = client::Change {
        max_in_flight: args.max_in_flight,
        tolerate: args.tolerate_failures,
        reason: args.reason,
        ..Default::default()
    };
    let id = change_job(connect, &args.job_id, args.customer.as_deref(), change).await?;
    eprintln!("change requested for {id}");
    Ok(0)
}

/// `fanjet redrive`: asks for it (checked first: a refusal says why), then
/// waits until a manager has started the run and says what runs again.
pub async fn redrive(connect: &ConnectArgs, args: RedriveArgs) -> Result<u8> {
    let customer = args.customer.as_deref();
    let conn = Connection::open(connect, customer).await?;
    let before = lookup(conn.source(customer), &args.job_id).await?;
    let id = match (&conn, customer) {
        (Connection::Full(nats), None) => {
            client::redrive(nats, &args.job_id, args.step, args.reason).await?;
            before.job_id.clone()
        }
        (Connection::Full(nats), Some(c)) => {
            client::redrive_as(&nats.client, c, &args.job_id, args.step, args.reason).await?
        }
        (Connection::Customer(n), c) => {
            client::redrive_as(n, c.unwrap_or("-"), &args.job_id, args.step, args.reason).await?
        }
    };
    let start = std::time::Instant::now();
    loop {
        let job = lookup(conn.source(customer), &args.job_id).await?;
        if let Some(r) = job.redrives.last().filter(|r| r.run > before.run) {
            let step = job.steps.get(r.step_index).map_or("?", |s| s.name.as_str());
            eprintln!(
                "job {id}: run {} started: step {step:?} runs again for {} subjobs, then the steps after it{}",
                r.run,
                r.subjobs,
                if args.wait { "" } else { " (follow it: fanjet watch JOB, or redrive with --wait)" }
            );
            if args.wait {
                return follow_to_end(conn.source(customer), &args.job_id, false).await;
            }
            return Ok(0);
        }
        if start.elapsed() > std::time::Duration::from_secs(10) {
            bail!("redrive of {id} requested, but no manager started it within 10 s: is `fanjet manager` running? (its log says why it ignored a request)");
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Prints each subjob's result (or last error) of a step once, as JSON
/// lines, in the order the log has them.
pub async fn results(connect: &ConnectArgs, args: ResultsArgs) -> Result<u8> {
    let nats = super::connect(connect, "fanjet-cli").await?;
    let job = store::status(&nats, &args.job_id)
        .await?
        .ok_or_else(|| anyhow!("no job {:?}", args.job_id))?;
    let step = match &args.step {
        Some(s) => job
            .steps
            .iter()
            .position(|st| st.name == *s)
            .or_else(|| s.parse().ok().filter(|i: &usize| *i < job.steps.len()))
            .ok_or_else(|| anyhow!("job {} has no step {s:?}", job.job_id))?,
        None => job
            .steps
            .iter()
            .rposition(|st| {
                st.kind == fanjet::protocol::StepKind::Fanout && st.state != StepState::Pending
            })
            .ok_or_else(|| {
                anyhow!(
                    "job {} has no fanout step that started; give --step",
                    job.job_id
                )
            })?,
    };
    // With the task key (managers' users), forged outcomes are dropped.
    let key = nats
        .clone()
        .with_task_key()
        .await
        .ok()
        .and_then(|n| n.task_key);
    if key.is_none() {
        eprintln!("note: this user cannot read the task key; outcomes are not checked against their tasks' tokens");
    }
    let mut reader = fanjet::nats::log::ResultsReader::new(&nats, &job, step, key);
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    while let Some(page) = reader.next_page().await? {
        for c in page.iter().filter(|c| !args.failed || c.is_failed()) {
            writeln!(out, "{}", c.to_json())?;
        }
    }
    out.flush()?;
    Ok(0)
}

pub async fn watch(connect: &ConnectArgs, args: WatchArgs) -> Result<u8> {
    let conn = Connection::open(connect, args.customer.as_deref()).await?;
    let source = conn.source(args.customer.as_deref());
    lookup(source, &args.job_id).await?;
    follow_to_end(source, &args.job_id, false).await
}

/// Follows a job to its end (bars unless `json`), prints it, and returns
/// its outcome as the exit code.
pub async fn follow_to_end(source: progress::Source<'_>, job_id: &str, json: bool) -> Result<u8> {
    let job = progress::follow(source, job_id, !json, None)
        .await?
        .ok_or_else(|| anyhow!("job {job_id} vanished"))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&job)?);
    } else {
        print!("{}", progress::render(&job));
    }
    Ok(progress::exit_code(job.state) as u8)
}

/// A job's status, or an error naming it.
async fn lookup(source: progress::Source<'_>, job_id: &str) -> Result<Job> {
    source
        .status(job_id)
        .await?
        .ok_or_else(|| anyhow!("no job {job_id:?}"))
}
