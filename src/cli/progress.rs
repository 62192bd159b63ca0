//! Following a job from the terminal: progress bars per step (on stderr)
//! while it runs, and a statistics table when it ends.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use fanjet::client::{self, ClientError};
use fanjet::nats::{store, Nats};
use fanjet::protocol::{partition, Job, JobState, JobStats, StepState, WaitReason};

/// Where a job's status is read.
#[derive(Clone, Copy)]
pub enum Source<'a> {
    /// The jobs bucket (users who may read it).
    Store(&'a Nats),
    /// The status service, as a customer (what a submitter may do: it
    /// needs no right on any stream or bucket).
    Customer(&'a async_nats::Client, &'a str),
}

impl Source<'_> {
    pub async fn status(self, job_id: &str) -> Result<Option<Job>, ClientError> {
        match self {
            Source::Customer(nats, c) => client::status_as(nats, c, job_id).await,
            Source::Store(nats) => Ok(store::status(nats, job_id).await?),
        }
    }
}

/// Polls the job's status until it ends; draws bars when `bars` is set.
pub async fn follow(
    source: Source<'_>,
    job_id: &str,
    bars: bool,
    timeout: Option<Duration>,
) -> Result<Option<Job>, ClientError> {
    let multi = MultiProgress::with_draw_target(if bars {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    });
    let style = ProgressStyle::with_template(
        "{prefix:>12} [{bar:40.cyan/blue}] {pos:>6}/{len:6} {per_sec:>10} eta {eta:>4} {msg}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    let mut shown: Vec<ProgressBar> = Vec::new();
    let start = std::time::Instant::now();
    // Without a terminal (a log, CI), a plain line every few seconds instead.
    let plain = bars && !std::io::stderr().is_terminal();
    let mut last_line = std::time::Instant::now();
    loop {
        let current = source.status(job_id).await?;
        if let Some(job) = current {
            if plain && (last_line.elapsed() >= Duration::from_secs(2) || job.state.is_terminal()) {
                last_line = std::time::Instant::now();
                eprintln!("[{:>5.1}s] {}", start.elapsed().as_secs_f64(), line(&job));
            }
            for (i, step) in job.steps.iter().enumerate() {
                if shown.len() <= i {
                    let bar = multi.add(ProgressBar::new(step.total.max(1)));
                    bar.set_style(style.clone());
                    bar.set_prefix(step.name.clone());
                    shown.push(bar);
                }
                let bar = &shown[i];
                bar.set_length(step.total.max(1));
                bar.set_position(step.completed + step.failed);
                bar.set_message(format!(
                    "{} failed {} retries {}",
                    step.state.as_str(),
                    step.failed,
                    step.retries
                ));
            }
            if job.state.is_terminal() {
                for bar in &shown {
                    bar.finish();
                }
                return Ok(Some(job));
            }
        }
        if timeout.is_some_and(|t| start.elapsed() > t) {
            return Ok(None);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One line of progress: each step's counts.
fn line(job: &Job) -> String {
    let steps: Vec<String> = job
        .steps
        .iter()
        .map(|s| match s.state {
            StepState::Pending => format!("{} pending", s.name),
            _ => format!(
                "{} {}/{} ({} failed, {} retries) {}",
                s.name,
                s.completed + s.failed,
                s.total,
                s.failed,
                s.retries,
                s.state.as_str()
            ),
        })
        .collect();
    format!("{}: {}", job.state.as_str(), steps.join(" | "))
}

fn secs(from: Option<u64>, to: Option<u64>) -> String {
    match (from, to) {
        (Some(a), Some(b)) => format!("{:.2}s", (b.saturating_sub(a)) as f64 / 1000.0),
        _ => "-".into(),
    }
}

/// A human summary of a job: state, per-step counts and durations.
pub fn render(job: &Job) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "job {}  workflow {}  customer {}  partition {:02}\n",
        job.job_id,
        job.workflow,
        job.customer.as_deref().unwrap_or("-"),
        partition(&job.job_id)
    ));
    out.push_str(&format!(
        "state {}  duration {}\n",
        shown_state(job),
        secs(Some(job.created_at), job.finished_at)
    ));
    if let Some(e) = &job.error {
        out.push_str(&format!("error {e}\n"));
    }
    // Each redrive, with what the run before it had left.
    for r in &job.redrives {
        let step = |k: usize| {
            job.steps
                .get(r.step_index + k)
                .map_or("?", |s| s.name.as_str())
        };
        out.push_str(&format!(
            "run {} (redrive{}): step {} ran again for {} subjobs; run {} had ended {}{}\n",
            r.run,
            r.reason
                .as_deref()
                .map(|t| format!(": {t}"))
                .unwrap_or_default(),
            step(0),
            r.subjobs,
            r.run - 1,
            r.state.as_str(),
            r.error
                .as_deref()
                .map(|e| format!(" ({e})"))
                .unwrap_or_default(),
        ));
        for (k, f) in r.steps.iter().enumerate().filter(|(_, f)| f.total > 0) {
            out.push_str(&format!(
                "    run {}: {} {} of {} completed, {} failed\n",
                r.run - 1,
                step(k),
                f.completed,
                f.total,
                f.failed
            ));
        }
    }
    if !job.steps.is_empty() {
        out.push_str(&format!(
            "{:<14} {:<7} {:<10} {:>8} {:>9} {:>7} {:>8} {:>9}\n",
            "step", "kind", "state", "total", "completed", "failed", "retries", "duration"
        ));
    }
    for s in &job.steps {
        out.push_str(&format!(
            "{:<14} {:<7} {:<10} {:>8} {:>9} {:>7} {:>8} {:>9}\n",
            s.name,
            s.kind.as_str(),
            s.state.as_str(),
            s.total,
            s.completed,
            s.failed,
            s.retries,
            secs(s.started_at, s.finished_at)
        ));
        for f in s.failures.iter().take(5) {
            out.push_str(&format!(
                "    subjob {} failed after {} attempt(s): {}\n",
                f.index, f.attempt, f.error
            ));
        }
        if s.failures.len() > 5 {
            out.push_str(&format!(
                "    ... {} more failures\n",
                s.failed.saturating_sub(5)
            ));
        }
        if s.state == StepState::Running && s.total > 0 {
            out.push_str(&format!(
                "    {:.1}% done\n",
                100.0 * (s.completed + s.failed) as f64 / s.total as f64
            ));
            if let Some(share) = &s.share {
                let held = fanjet::machine::in_flight(job);
                let why = match share.waiting {
                    Some(WaitReason::NoCapacity) => ", waiting: every slot is shared out",
                    Some(WaitReason::LowerPriority) => ", waiting: higher priorities first",
                    Some(WaitReason::CustomerCap) => ", waiting: its customer's cap is reached",
                    Some(WaitReason::StepCap) => ", waiting: the step's cap is reached",
                    None => "",
                };
                out.push_str(&format!(
                    "    share: {} of {} slots (holds {held}){why}\n",
                    share.slots, share.capacity
                ));
            }
        }
    }
    if job.state == JobState::Completed && !job.output.is_null() {
        out.push_str(&format!("output {}\n", job.output));
    }
    out
}

/// A job's state as people read it: a running job that dispatches nothing
/// more is `paused`.
pub fn shown_state(job: &Job) -> &'static str {
    match (job.state, job.paused_at) {
        (JobState::Running, Some(_)) => "paused",
        (state, _) => state.as_str(),
    }
}

/// Per-step statistics: subjob durations and attempts.
pub fn render_stats(st: &JobStats, now: u64) -> String {
    let mut out = format!(
        "{:<14} {:>9} {:>9} {:>9} {:>11}  attempts (1, 2, 3, ...)\n",
        "statistics", "p50 ms", "p95 ms", "max ms", "subjobs/s"
    );
    for s in &st.steps {
        let opt = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_else(|| "-".into());
        let attempts: Vec<String> = {
            let last = s
                .attempts
                .iter()
                .rposition(|c| *c > 0)
                .map(|i| i + 1)
                .unwrap_or(0);
            s.attempts[..last].iter().map(|c| c.to_string()).collect()
        };
        out.push_str(&format!(
            "{:<14} {:>9} {:>9} {:>9} {:>11}  {}\n",
            s.name,
            opt(s.duration_quantile_ms(0.5)),
            opt(s.duration_quantile_ms(0.95)),
            opt((s.completed > 0).then_some(s.duration_max_ms)),
            s.throughput(now)
                .map(|t| format!("{t:.1}"))
                .unwrap_or_else(|| "-".into()),
            attempts.join(", ")
        ));
    }
    out
}

/// The capacity figures of running steps (from the detailed status).
pub fn render_capacity(detailed: &serde_json::Value, now: u64) -> String {
    let mut out = String::new();
    for step in detailed["steps"].as_array().into_iter().flatten() {
        let c = &step["capacity"];
        if c.is_null() {
            continue;
        }
        let secs = |at: &serde_json::Value| {
            at.as_u64()
                .map(|t| format!("{:.0}s", t.saturating_sub(now) as f64 / 1000.0))
        };
        out.push_str(&format!(
            "capacity {}: ends in {} at this pace; deadline in {}; needs {} worker slots to meet it (mean subjob {} ms)\n",
            step["name"].as_str().unwrap_or("?"),
            secs(&c["predicted_finish_at"]).unwrap_or_else(|| "?".into()),
            secs(&c["deadline_at"]).unwrap_or_else(|| "-".into()),
            c["slots_needed"].as_u64().map(|n| n.to_string()).unwrap_or_else(|| "-".into()),
            c["mean_subjob_ms"].as_u64().map(|n| n.to_string()).unwrap_or_else(|| "?".into()),
        ));
    }
    out
}

/// Exit code for a finished job: 0 completed, 1 failed, 2 cancelled or rejected.
pub fn exit_code(state: JobState) -> i32 {
    match state {
        JobState::Completed => 0,
        JobState::Failed => 1,
        _ => 2,
    }
}
