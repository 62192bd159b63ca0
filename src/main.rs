//! The `fanjet` command: parses arguments, sets up logging, dispatches to
//! the command families in `cli/`.

mod cli;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use fanjet::nats::connect::ConnectArgs;

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
    Dev(cli::dev::DevArgs),
    /// Runs the workflow manager (intake, event loops, advisories) until SIGTERM.
    ///
    /// Run several for capacity and availability: they split the event log's
    /// 16 partitions evenly through leases in the `fanjet_leases_<cell>` buckets. A
    /// manager that stops gracefully hands its partitions over at once; one
    /// that dies loses them after about 3.5 s, when the others take them over.
    ///
    /// Fanouts share each step's worker slots fairly: between priorities,
    /// then customers (weights and caps: `fanjet tenants`), then jobs.
    Manager(cli::services::ManagerArgs),
    /// Runs a worker pool that executes a shell command per task.
    ///
    /// The command runs through `sh -c` with the task as JSON on stdin
    /// (job_id, workflow, step, attempt, and index + item for a fanout subjob
    /// or input for a task step). Its stdout (JSON, or text) is the result.
    /// Exit 0: success. Exit 100: give up now, no more attempts. Any other
    /// exit: retry after the step's backoff, stderr is the error.
    Worker(cli::services::WorkerArgs),
    /// Serves the HTTP API, the web page and /metrics, and runs the statistics consumer and the notifier.
    Serve(cli::services::ServeArgs),
    /// Submits a job and prints its id (with --wait, follows it to the end).
    Submit(cli::jobs::SubmitArgs),
    /// Shows a job's detailed status and statistics (with --json: the same object as GET /api/jobs/JOB).
    Status(cli::jobs::StatusArgs),
    /// Lists jobs from the job index, most recently changed first (a running
    /// job by when it started, an ended one by when it ended), a page at a
    /// time: filters, a time range, a job id prefix, counts per workflow
    /// and state; the cursor it prints goes on to the next page.
    Jobs(cli::jobs::JobsArgs),
    /// Cancels a job: nothing new is dispatched, queued tasks are dropped.
    Cancel(cli::jobs::CancelArgs),
    /// Pauses a job: nothing new is dispatched (not even its next step's
    /// task); subjobs already dispatched finish. Its deadlines keep running.
    Pause(cli::jobs::PauseArgs),
    /// Resumes a paused job: it dispatches again at once.
    Resume(cli::jobs::PauseArgs),
    /// Changes a running job's in-flight window or tolerated failures (from
    /// its running step on); recorded in its log.
    Update(cli::jobs::UpdateArgs),
    /// Runs a failed job (or one that completed with failed subjobs) again:
    /// only the subjobs of a step that did not complete (with fresh
    /// attempts), then the steps after it. Same job id; the first run's
    /// figures stay in its status.
    Redrive(cli::jobs::RedriveArgs),
    /// Prints a step's results: each subjob's result (or last error) once,
    /// as JSON lines `{"index", "ok", "attempt", "result" | "error"}` in log
    /// order, read in bounded memory (a million results too).
    Results(cli::jobs::ResultsArgs),
    /// Follows a job with live progress bars; exits with its outcome (0 completed, 1 failed, 2 cancelled or rejected).
    Watch(cli::jobs::WatchArgs),
    /// Lists live managers (with the event-log partitions each reads) and
    /// workers (with their slots), from the lease bucket and heartbeats.
    ///
    /// Processes send a heartbeat every 5 s, so this listens that long
    /// (`--listen`) before printing.
    Processes(cli::processes::ProcessesArgs),
    /// Manages workflow definitions.
    #[command(subcommand)]
    Workflow(cli::workflows::WorkflowCommand),
    /// A fanout's items as an object (for millions of them).
    #[command(subcommand)]
    Items(cli::items::ItemsCommand),
    /// Customers' settings for the fair share of workers: weight and concurrency cap.
    #[command(subcommand)]
    Tenants(cli::tenants::TenantsCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.command.prints_and_exits() {
        end_quietly_on_a_closed_pipe();
    }
    fanjet::logging::init("info,async_nats=warn");
    let rt = match &cli.command {
        Command::Worker(args) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(usize::from(args.threads))
            .enable_all()
            .build(),
        _ => tokio::runtime::Runtime::new(),
    };
    let rt = match rt {
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

impl Command {
    /// A command that prints its answer and exits (as opposed to the
    /// services and the commands that follow a job).
    fn prints_and_exits(&self) -> bool {
        matches!(
            self,
            Command::Submit(_)
                | Command::Status(_)
                | Command::Jobs(_)
                | Command::Cancel(_)
                | Command::Pause(_)
                | Command::Resume(_)
                | Command::Update(_)
                | Command::Redrive(_)
                | Command::Results(_)
                | Command::Processes(_)
                | Command::Workflow(_)
                | Command::Items(_)
                | Command::Tenants(_)
        )
    }
}

/// `fanjet jobs | head`: when the reader goes away, end as Unix tools do
/// (killed by SIGPIPE, silently) rather than with a panic from `println!`.
/// The Rust runtime ignores SIGPIPE, which suits the long-running services.
fn end_quietly_on_a_closed_pipe() {
    // SAFETY: restoring a signal's default disposition at startup, before
    // any thread exists; no handler is installed.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Runs the command; its result is the process's exit code.
async fn run(cli: Cli) -> anyhow::Result<u8> {
    let c = &cli.connect;
    match cli.command {
        Command::Dev(args) => cli::dev::run(args).await,
        Command::Manager(args) => cli::services::manager(c, args).await,
        Command::Worker(args) => cli::services::worker(c, args).await,
        Command::Serve(args) => cli::services::serve(c, args).await,
        Command::Submit(args) => cli::jobs::submit(c, args).await,
        Command::Status(args) => cli::jobs::status(c, args).await,
        Command::Jobs(args) => cli::jobs::list(c, args).await,
        Command::Cancel(args) => cli::jobs::cancel(c, args).await,
        Command::Pause(args) => cli::jobs::pause(c, args, true).await,
        Command::Resume(args) => cli::jobs::pause(c, args, false).await,
        Command::Update(args) => cli::jobs::update(c, args).await,
        Command::Redrive(args) => cli::jobs::redrive(c, args).await,
        Command::Results(args) => cli::jobs::results(c, args).await,
        Command::Watch(args) => cli::jobs::watch(c, args).await,
        Command::Processes(args) => cli::processes::run(c, args).await,
        Command::Workflow(cmd) => cli::workflows::run(c, cmd).await,
        Command::Items(cmd) => cli::items::run(c, cmd).await,
        Command::Tenants(cmd) => cli::tenants::run(c, cmd).await,
    }
}
