//! Workflow definitions: a named, ordered list of steps, written in TOML by
//! people and stored as JSON in the workflows bucket.
//!
//! Parsing is strict (unknown keys, bad durations and duplicate step names
//! are errors with the offending name in the message) because a typo in a
//! retry policy should fail at `fanjet workflow apply`, not at 3 a.m.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::{validate_token, TokenError};

/// How a step runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum StepKind {
    /// One execution; its result is the next step's input.
    Task,
    /// One subjob per item of the previous step's output (a JSON array).
    Fanout,
}

impl StepKind {
    pub fn as_str(self) -> &'static str {
        match self {
            StepKind::Task => "task",
            StepKind::Fanout => "fanout",
        }
    }
}

/// How many failed subjobs a step tolerates before the job fails.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Tolerance {
    Count(u64),
    Percent(f64),
}

impl Tolerance {
    /// A count, or a share from 0% to 100%.
    pub fn is_valid(self) -> bool {
        match self {
            Tolerance::Count(_) => true,
            Tolerance::Percent(p) => (0.0..=100.0).contains(&p),
        }
    }

    /// The largest number of failures allowed among `total` subjobs.
    pub fn allowed(self, total: u64) -> u64 {
        match self {
            Tolerance::Count(n) => n,
            Tolerance::Percent(p) => ((total as f64) * p / 100.0).floor() as u64,
        }
    }

    /// "10" (a count) or "5%" (a share of the step's subjobs).
    pub fn parse(s: &str) -> Result<Self, String> {
        let t = s.trim();
        if let Some(p) = t.strip_suffix('%') {
            let v: f64 = p
                .trim()
                .parse()
                .map_err(|_| format!("{s:?} is not a percentage like \"5%\""))?;
            if !(0.0..=100.0).contains(&v) {
                return Err(format!("{s:?} must be between 0% and 100%"));
            }
            Ok(Tolerance::Percent(v))
        } else {
            t.parse::<u64>().map(Tolerance::Count).map_err(|_| {
                format!("{s:?} is neither a count like \"10\" nor a percentage like \"5%\"")
            })
        }
    }
}

/// One validated step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Step {
    pub name: String,
    pub kind: StepKind,
    pub handler: String,
    /// Ack deadline of one attempt.
    pub timeout_ms: u64,
    /// Longest one attempt may run, if set: past it the attempt fails and
    /// is retried (a handler that hangs would otherwise keep its task
    /// alive, extending the ack deadline for ever).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_timeout_ms: Option<u64>,
    pub max_attempts: u32,
    /// Delay before each retry; the last value repeats.
    pub backoff_ms: Vec<u64>,
    pub tolerate: Tolerance,
    /// Overall deadline of the step from its start; subjobs still pending then fail.
    pub deadline_ms: Option<u64>,
    /// Most subjobs of one job queued or running at once (fair share between jobs).
    pub max_in_flight: u64,
    /// Most subjobs a fanout step may split into; a larger input fails the job.
    #[serde(default = "default_max_subjobs")]
    pub max_subjobs: u64,
    /// Most subjobs of this step running (dispatched and unfinished) at
    /// once, over all jobs: a cap for a downstream system's sake.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrency: Option<u64>,
    /// A fanout's subjobs per task (item batching): one task carries the
    /// items of up to this many consecutive subjobs, from an index that is
    /// a multiple of it, and the handler gets them together. Counts,
    /// results and retries stay per subjob. 1 (absent): a task per subjob.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub batch_size: u64,
}

fn one() -> u64 {
    1
}

fn is_one(n: &u64) -> bool {
    *n == 1
}

fn default_max_subjobs() -> u64 {
    DEFAULT_MAX_SUBJOBS
}

/// One validated workflow.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Workflow {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub steps: Vec<Step>,
    /// Time a job has from its request to its end (the capacity figures
    /// say how many worker slots keep it on time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<u64>,
}

/// Default ack deadline per attempt.
pub const DEFAULT_TIMEOUT: &str = "30s";
/// Default attempts per subjob.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
/// Default limit of subjobs per fanout step.
pub const DEFAULT_MAX_SUBJOBS: u64 = 10_000_000;
/// Default in-flight window per job and step.
pub const DEFAULT_MAX_IN_FLIGHT: u64 = 5000;
/// Largest `batch_size`.
pub const MAX_BATCH_SIZE: u64 = 1000;
/// Most steps in one workflow.
pub const MAX_STEPS: usize = 64;
/// Largest stored definition (JSON), in bytes: a copy travels in every job
/// record.
pub const MAX_DEFINITION_BYTES: usize = 64 * 1024;
/// Longest description and handler name, in bytes.
const MAX_DESCRIPTION_BYTES: usize = 4096;
const MAX_HANDLER_BYTES: usize = 256;
/// Most backoff delays listed for one step.
const MAX_BACKOFFS: usize = 32;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WorkflowFile {
    name: String,
    #[serde(default)]
    description: String,
    deadline: Option<String>,
    #[serde(default)]
    steps: Vec<StepFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StepFile {
    name: String,
    kind: StepKind,
    handler: Option<String>,
    timeout: Option<String>,
    run_timeout: Option<String>,
    max_attempts: Option<u32>,
    backoff: Option<Vec<String>>,
    tolerate_failures: Option<String>,
    deadline: Option<String>,
    max_in_flight: Option<u64>,
    max_subjobs: Option<u64>,
    max_concurrency: Option<u64>,
    batch_size: Option<u64>,
}

/// What is wrong with a workflow definition.
#[derive(Debug, Error)]
pub enum WorkflowError {
    #[error("invalid workflow file: {0}")]
    Toml(#[from] toml::de::Error),
    #[error("invalid workflow JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Name(#[from] TokenError),
    #[error("workflow {0:?} has no steps")]
    NoSteps(String),
    #[error("step name {0:?} appears more than once")]
    DuplicateStep(String),
    #[error("workflow {name:?}: {message}")]
    Workflow { name: String, message: String },
    #[error("step {step:?}: {field} {message}")]
    Field {
        step: String,
        field: &'static str,
        message: String,
    },
}

fn duration_ms(step: &str, field: &'static str, s: &str) -> Result<u64, WorkflowError> {
    let d = humantime::parse_duration(s.trim()).map_err(|e| WorkflowError::Field {
        step: step.into(),
        field,
        message: format!("{s:?} is not a duration like \"30s\" or \"5m\" ({e})"),
    })?;
    Ok(d.as_millis() as u64)
}

impl Workflow {
    /// Parses and validates a TOML definition.
    pub fn from_toml(text: &str) -> Result<Self, WorkflowError> {
        let file: WorkflowFile = toml::from_str(text)?;
        Self::validate(file)
    }

    /// Reads a definition stored as JSON (by `fanjet workflow apply`, or by
    /// anyone who may write the bucket) and checks it by the same rules.
    pub fn from_json(bytes: &[u8]) -> Result<Self, WorkflowError> {
        let workflow: Workflow = serde_json::from_slice(bytes)?;
        if bytes.len() > MAX_DEFINITION_BYTES {
            return Err(WorkflowError::Workflow {
                name: workflow.name,
                message: format!(
                    "the definition is {} bytes, more than {MAX_DEFINITION_BYTES}",
                    bytes.len()
                ),
            });
        }
        workflow.check()?;
        Ok(workflow)
    }

    /// The rules every definition keeps, however it was written: names
    /// that are subject tokens, at least one and at most [`MAX_STEPS`]
    /// steps with distinct names, usable timeouts, attempts, windows and
    /// tolerances, bounded texts.
    pub fn check(&self) -> Result<(), WorkflowError> {
        validate_token("workflow name", &self.name)?;
        let whole = |message: String| WorkflowError::Workflow {
            name: self.name.clone(),
            message,
        };
        if self.steps.is_empty() {
            return Err(WorkflowError::NoSteps(self.name.clone()));
        }
        if self.steps.len() > MAX_STEPS {
            return Err(whole(format!(
                "{} steps, more than {MAX_STEPS}",
                self.steps.len()
            )));
        }
        if self.description.len() > MAX_DESCRIPTION_BYTES {
            return Err(whole(format!(
                "the description is longer than {MAX_DESCRIPTION_BYTES} bytes"
            )));
        }
        for (i, s) in self.steps.iter().enumerate() {
            validate_token("step name", &s.name)?;
            if self.steps[..i].iter().any(|p| p.name == s.name) {
                return Err(WorkflowError::DuplicateStep(s.name.clone()));
            }
            let field = |field: &'static str, message: &str| WorkflowError::Field {
                step: s.name.clone(),
                field,
                message: message.to_string(),
            };
            if s.timeout_ms < 1000 {
                return Err(field("timeout", "must be at least 1s"));
            }
            if s.run_timeout_ms.is_some_and(|t| t < 1000) {
                return Err(field("run_timeout", "must be at least 1s"));
            }
            if s.max_attempts == 0 {
                return Err(field("max_attempts", "must be at least 1"));
            }
            if s.max_in_flight == 0 {
                return Err(field("max_in_flight", "must be at least 1"));
            }
            if s.max_concurrency == Some(0) {
                return Err(field("max_concurrency", "must be at least 1"));
            }
            if s.batch_size == 0 || s.batch_size > MAX_BATCH_SIZE {
                return Err(field("batch_size", "must be between 1 and 1000"));
            }
            if s.batch_size > 1 && s.kind != StepKind::Fanout {
                return Err(field("batch_size", "is for fanout steps only"));
            }
            if s.batch_size > s.max_in_flight {
                return Err(field(
                    "batch_size",
                    "must not be larger than max_in_flight (a batch is dispatched whole)",
                ));
            }
            if s.handler.trim().is_empty() {
                return Err(field("handler", "is empty"));
            }
            if s.handler.len() > MAX_HANDLER_BYTES {
                return Err(field("handler", "is longer than 256 bytes"));
            }
            if s.backoff_ms.len() > MAX_BACKOFFS {
                return Err(field("backoff", "lists more than 32 delays"));
            }
            if let Tolerance::Percent(p) = s.tolerate {
                if !(0.0..=100.0).contains(&p) {
                    return Err(field("tolerate_failures", "must be between 0% and 100%"));
                }
            }
        }
        Ok(())
    }

    pub fn step(&self, index: usize) -> Option<&Step> {
        self.steps.get(index)
    }

    fn validate(file: WorkflowFile) -> Result<Self, WorkflowError> {
        validate_token("workflow name", &file.name)?;
        if file.steps.is_empty() {
            return Err(WorkflowError::NoSteps(file.name));
        }
        let mut steps: Vec<Step> = Vec::with_capacity(file.steps.len());
        for s in file.steps {
            validate_token("step name", &s.name)?;
            if steps.iter().any(|p| p.name == s.name) {
                return Err(WorkflowError::DuplicateStep(s.name));
            }
            let field = |field: &'static str, message: String| WorkflowError::Field {
                step: s.name.clone(),
                field,
                message,
            };
            let timeout_ms = duration_ms(
                &s.name,
                "timeout",
                s.timeout.as_deref().unwrap_or(DEFAULT_TIMEOUT),
            )?;
            if timeout_ms < 1000 {
                return Err(field("timeout", "must be at least 1s".into()));
            }
            let run_timeout_ms = s
                .run_timeout
                .as_deref()
                .map(|d| duration_ms(&s.name, "run_timeout", d))
                .transpose()?;
            if run_timeout_ms.is_some_and(|t| t < 1000) {
                return Err(field("run_timeout", "must be at least 1s".into()));
            }
            let max_attempts = s.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS);
            if max_attempts == 0 {
                return Err(field("max_attempts", "must be at least 1".into()));
            }
            let backoff_ms = match &s.backoff {
                Some(list) => list
                    .iter()
                    .map(|b| duration_ms(&s.name, "backoff", b))
                    .collect::<Result<Vec<_>, _>>()?,
                None => vec![1000, 5000, 30_000],
            };
            let tolerate = match &s.tolerate_failures {
                Some(t) => Tolerance::parse(t).map_err(|m| field("tolerate_failures", m))?,
                None => Tolerance::Count(0),
            };
            let deadline_ms = s
                .deadline
                .as_deref()
                .map(|d| duration_ms(&s.name, "deadline", d))
                .transpose()?;
            let max_in_flight = s.max_in_flight.unwrap_or(DEFAULT_MAX_IN_FLIGHT);
            if max_in_flight == 0 {
                return Err(field("max_in_flight", "must be at least 1".into()));
            }
            let max_subjobs = s.max_subjobs.unwrap_or(DEFAULT_MAX_SUBJOBS);
            let handler = s.handler.clone().unwrap_or_else(|| s.name.clone());
            if handler.trim().is_empty() {
                return Err(field("handler", "is empty".into()));
            }
            steps.push(Step {
                name: s.name,
                kind: s.kind,
                handler,
                timeout_ms,
                run_timeout_ms,
                max_attempts,
                backoff_ms,
                tolerate,
                deadline_ms,
                max_in_flight,
                max_subjobs,
                max_concurrency: s.max_concurrency,
                batch_size: s.batch_size.unwrap_or(1),
            });
        }
        let deadline_ms = file
            .deadline
            .as_deref()
            .map(|d| duration_ms("(workflow)", "deadline", d))
            .transpose()?;
        let workflow = Workflow {
            name: file.name,
            description: file.description,
            steps,
            deadline_ms,
        };
        workflow.check()?;
        Ok(workflow)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: &str = r#"
name = "invoices"

[[steps]]
name = "collect"          # S1
kind = "task"
timeout = "30s"

[[steps]]
name = "send"             # S2
kind = "fanout"
timeout = "30s"
max_attempts = 5
backoff = ["1s", "2s", "5s"]
tolerate_failures = "0%"

[[steps]]
name = "summarize"        # S3
kind = "task"
timeout = "30s"
"#;

    #[test]
    fn seed_definition_is_accepted() {
        let w = Workflow::from_toml(SEED).unwrap();
        assert_eq!(w.name, "invoices");
        assert_eq!(w.steps.len(), 3);
        let send = &w.steps[1];
        assert_eq!(send.kind, StepKind::Fanout);
        assert_eq!(send.max_attempts, 5);
        assert_eq!(send.backoff_ms, vec![1000, 2000, 5000]);
        assert_eq!(send.tolerate, Tolerance::Percent(0.0));
        assert_eq!(send.timeout_ms, 30_000);
        let back = Workflow::from_json(&serde_json::to_vec(&w).unwrap()).unwrap();
        assert_eq!(back, w);
    }

    #[test]
    fn errors_name_the_problem() {
        let cases = [
            ("name = \"w\"\nbogus = 1\n[[steps]]\nname=\"a\"\nkind=\"task\"", "bogus"),
            ("name = \"w\"\n[[steps]]\nname=\"a\"\nkind=\"task\"\ntimeout=\"soon\"", "timeout"),
            ("name = \"w\"\n[[steps]]\nname=\"a\"\nkind=\"task\"\n[[steps]]\nname=\"a\"\nkind=\"task\"", "more than once"),
            ("name = \"w.x\"\n[[steps]]\nname=\"a\"\nkind=\"task\"", "may only contain"),
            ("name = \"w\"\n[[steps]]\nname=\"a\"\nkind=\"loop\"", "loop"),
            ("name = \"w\"", "no steps"),
            ("name = \"w\"\n[[steps]]\nname=\"a\"\nkind=\"fanout\"\ntolerate_failures=\"lots\"", "tolerate_failures"),
        ];
        for (text, needle) in cases {
            let err = Workflow::from_toml(text).unwrap_err().to_string();
            assert!(err.contains(needle), "{err:?} does not mention {needle:?}");
        }
    }

    #[test]
    fn tolerance_allowed() {
        assert_eq!(Tolerance::Percent(10.0).allowed(1000), 100);
        assert_eq!(Tolerance::Percent(0.0).allowed(1000), 0);
        assert_eq!(Tolerance::Count(3).allowed(1), 3);
        assert_eq!(Tolerance::parse("2.5%").unwrap(), Tolerance::Percent(2.5));
        assert!(Tolerance::parse("101%").is_err());
    }
}
