//! The job index: one summary per job in the `FANJET_INDEX` stream, under a
//! subject that names the job's customer (its tag), state and workflow, so
//! that listing one customer's failed jobs, or counting every customer's
//! jobs per state, is a question the server answers from its subject index
//! without anyone reading every job record.
//!
//! A job has exactly one entry: when its state changes, the index consumer
//! writes the new entry and deletes the old one, whose place it keeps in
//! the `fanjet_index` bucket ([`IndexPosition`]). Entries are in the order
//! they were written, so the stream's order is "most recently changed
//! first" read backwards: a running job by when it started, an ended one by
//! when it ended. [`change`] is the rule that turns an event into a job's
//! next summary; it is pure, and the consumer applies it in log order.

use serde::{Deserialize, Serialize};

use super::{
    bounded, customer_tag, subject_token, validate_token, Event, EventKind, Job, JobState, Millis,
    MAX_REASON_BYTES,
};

/// The stream of job summaries.
pub const INDEX_STREAM: &str = "FANJET_INDEX";
/// Where each job's summary is in [`INDEX_STREAM`] (key: the job id).
pub const INDEX_BUCKET: &str = "fanjet_index";
/// The durable consumer of the log that maintains the index.
pub const INDEX_CONSUMER: &str = "fanjet-index";
/// Every entry of the index.
pub const INDEX_WILDCARD: &str = "fanjet.index.>";
/// The key of [`INDEX_BUCKET`] that says the job records written before
/// the index existed were indexed (a job id has no dot).
pub const INDEX_BACKFILLED_KEY: &str = "index.backfilled";
/// Most jobs one listing page holds.
pub const MAX_PAGE: usize = 1000;
/// Subject token of a job without a customer.
pub const NO_CUSTOMER_TOKEN: &str = "_";

/// The event kinds that change a job's summary; the index consumer reads
/// only these.
pub const INDEXED_KINDS: [EventKind; 7] = [
    EventKind::JobRequested,
    EventKind::JobRejected,
    EventKind::StepStarted,
    EventKind::JobCompleted,
    EventKind::JobFailed,
    EventKind::JobCancelled,
    EventKind::JobRedriven,
];

/// The customer's token in index subjects: its tag (a customer key may hold
/// any text), `_` for jobs without a customer.
pub fn index_customer_token(customer: Option<&str>) -> String {
    customer.map_or_else(|| NO_CUSTOMER_TOKEN.into(), customer_tag)
}

/// The subject of a job's entry: `fanjet.index.<customer tag>.<state>.<workflow>`.
pub fn index_subject(customer: Option<&str>, state: JobState, workflow: &str) -> String {
    format!(
        "fanjet.index.{}.{}.{}",
        index_customer_token(customer),
        state.as_str(),
        subject_token(workflow)
    )
}

/// Which jobs a listing or a count keeps (`None`: any).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct IndexFilter {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub customer: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<JobState>,
}

impl IndexFilter {
    /// The subject filter of the entries it keeps (tags stand for
    /// customers: [`keeps`](Self::keeps) tells the rare two customers with
    /// one tag apart).
    pub fn subject(&self) -> String {
        let customer = self
            .customer
            .as_deref()
            .map_or_else(|| "*".into(), |c| index_customer_token(Some(c)));
        let state = self.state.map_or("*", JobState::as_str);
        let workflow = self
            .workflow
            .as_deref()
            .map_or_else(|| "*".into(), subject_token);
        format!("fanjet.index.{customer}.{state}.{workflow}")
    }

    /// Whether a summary is one this filter keeps.
    pub fn keeps(&self, s: &JobSummary) -> bool {
        self.customer
            .as_deref()
            .is_none_or(|c| s.customer.as_deref() == Some(c))
            && self.workflow.as_deref().is_none_or(|w| s.workflow == w)
            && self.state.is_none_or(|st| s.state == st)
    }
}

/// The state and workflow an entry's subject names.
pub fn parse_index_subject(subject: &str) -> Option<(JobState, &str)> {
    let mut t = subject.strip_prefix("fanjet.index.")?.split('.');
    let (_customer, state, workflow) = (t.next()?, t.next()?, t.next()?);
    if t.next().is_some() {
        return None;
    }
    Some((JobState::parse(state)?, workflow))
}

/// One job in the index: what a listing shows of it without reading its
/// record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct JobSummary {
    pub job_id: String,
    pub workflow: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub customer: Option<String>,
    pub state: JobState,
    /// When it was submitted.
    pub created_at: Millis,
    /// When its state last changed (the listing's order).
    pub changed_at: Millis,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Millis>,
    /// Its run: 0, or `n` after its `n`th redrive.
    #[serde(default, skip_serializing_if = "super::is_first_run")]
    pub run: u32,
    /// Why it failed, was cancelled or rejected (bounded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The log sequence of the event this summary reflects (0: taken from
    /// the job's record).
    #[serde(default)]
    pub seq: u64,
}

impl JobSummary {
    /// The summary of a job as its record shows it (for jobs whose events
    /// the index did not see).
    pub fn of_job(job: &Job) -> Self {
        JobSummary {
            job_id: job.job_id.clone(),
            workflow: job.workflow.clone(),
            customer: job.customer.clone(),
            state: job.state,
            created_at: job.created_at,
            changed_at: job.finished_at.unwrap_or(job.updated_at),
            finished_at: job.finished_at,
            run: job.run,
            error: job.error.as_deref().map(|e| bounded(e, MAX_REASON_BYTES)),
            seq: 0,
        }
    }

    /// The subject of its entry.
    pub fn subject(&self) -> String {
        index_subject(self.customer.as_deref(), self.state, &self.workflow)
    }

    /// The subjects any entry of this job is on, whatever its state.
    pub fn any_state_subject(&self) -> String {
        let mut t: Vec<String> = self.subject().split('.').map(String::from).collect();
        // fanjet.index.<customer>.<state>.<workflow>
        t[3] = "*".into();
        t.join(".")
    }
}

/// What the `fanjet_index` bucket keeps of a job: where its entry is and
/// the summary it holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IndexPosition {
    /// The sequence of its entry in [`INDEX_STREAM`].
    pub entry: u64,
    pub summary: JobSummary,
}

/// The summary a job has after `event` (log sequence `seq`), given the one
/// it has (`None`: the index knows nothing of the job); `None` when the
/// event changes nothing the index shows, or was applied already. The
/// rules follow the manager's: a job starts once, a late or repeated end
/// changes nothing, a redrive starts a later run of an ended job.
pub fn change(current: Option<&JobSummary>, seq: u64, event: &Event) -> Option<JobSummary> {
    if current.is_some_and(|c| seq <= c.seq) {
        return None;
    }
    let next = |c: &JobSummary, state: JobState, at: Millis| JobSummary {
        state,
        changed_at: at,
        seq,
        ..c.clone()
    };
    match (event, current) {
        (Event::JobRequested(r), None) => Some(JobSummary {
            job_id: r.job_id.clone(),
            workflow: r.workflow.clone(),
            customer: r.customer.clone(),
            state: JobState::Requested,
            created_at: r.at,
            changed_at: r.at,
            finished_at: None,
            run: 0,
            error: None,
            seq,
        }),
        (Event::JobRejected(r), None) if validate_token("job id", &r.job_id).is_ok() => {
            Some(JobSummary {
                job_id: r.job_id.clone(),
                workflow: r.workflow.clone().unwrap_or_default(),
                customer: r.customer.clone(),
                state: JobState::Rejected,
                created_at: r.at,
                changed_at: r.at,
                finished_at: Some(r.at),
                run: 0,
                error: Some(bounded(&r.reason, MAX_REASON_BYTES)),
                seq,
            })
        }
        (Event::StepStarted(s), Some(c)) if c.state == JobState::Requested && s.run == c.run => {
            Some(next(c, JobState::Running, s.at))
        }
        (Event::JobCompleted(e), Some(c)) if !c.state.is_terminal() && e.run == c.run => {
            let mut s = next(c, JobState::Completed, e.at);
            s.finished_at = Some(e.at);
            Some(s)
        }
        (Event::JobFailed(e), Some(c)) if !c.state.is_terminal() && e.run == c.run => {
            let mut s = next(c, JobState::Failed, e.at);
            s.finished_at = Some(e.at);
            s.error = Some(bounded(&e.error, MAX_REASON_BYTES));
            Some(s)
        }
        (Event::JobCancelled(e), Some(c)) if !c.state.is_terminal() => {
            let mut s = next(c, JobState::Cancelled, e.at);
            s.finished_at = Some(e.at);
            s.error = e.reason.as_deref().map(|r| bounded(r, MAX_REASON_BYTES));
            Some(s)
        }
        (Event::JobRedriven(e), Some(c))
            if c.state.is_terminal() && c.state != JobState::Rejected && e.run > c.run =>
        {
            let mut s = next(c, JobState::Running, e.at);
            s.run = e.run;
            s.finished_at = None;
            s.error = None;
            Some(s)
        }
        _ => None,
    }
}

/// A listing page: jobs newest (most recently changed) first, and where
/// the next page starts (`None`: this is the last).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct JobPage {
    pub jobs: Vec<JobSummary>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// How many jobs the index holds per state, and per workflow and state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct IndexCounts {
    pub total: u64,
    pub states: std::collections::BTreeMap<String, u64>,
    pub workflows: std::collections::BTreeMap<String, std::collections::BTreeMap<String, u64>>,
}

/// A request to the listing service (`fanjet.jobs.<customer>`) and the
/// query `fanjet jobs` and `GET /api/jobs` make of the index.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ListRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<JobState>,
    /// Jobs whose state changed at or after this time (ms since the epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<Millis>,
    /// Jobs whose state changed before this time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<Millis>,
    /// Jobs whose id starts with this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// Where to go on: a page's `next_cursor`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
    /// How many jobs (default 50, at most [`MAX_PAGE`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
    /// Also answer the counts per workflow and state.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub counts: bool,
}

impl ListRequest {
    /// Which jobs it keeps, of `customer`'s (any customer's: `None`).
    pub fn filter(&self, customer: Option<String>) -> IndexFilter {
        IndexFilter {
            customer,
            workflow: self.workflow.clone(),
            state: self.state,
        }
    }
}

/// Request subject of the listing service for one customer (a permission
/// can pin the customer).
pub fn list_subject(customer: &str) -> String {
    format!("fanjet.jobs.{customer}")
}

/// What the listing service listens on.
pub const LIST_WILDCARD: &str = "fanjet.jobs.*";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{
        JobCancelled, JobCompleted, JobFailed, JobRedriven, JobRejected, JobRequested, RejectCode,
        StepStarted,
    };
    use serde_json::Value;

    fn requested(id: &str) -> Event {
        Event::JobRequested(JobRequested {
            job_id: id.into(),
            workflow: "wf".into(),
            customer: Some("acme corp".into()),
            input: Value::Null,
            priority: None,
            at: 10,
            deadline_at: None,
        })
    }

    fn started(run: u32, at: Millis) -> Event {
        Event::StepStarted(StepStarted {
            job_id: "j".into(),
            workflow: "wf".into(),
            step: "s".into(),
            step_index: 0,
            total: 1,
            run,
            at,
        })
    }

    fn completed(run: u32, at: Millis) -> Event {
        Event::JobCompleted(JobCompleted {
            job_id: "j".into(),
            workflow: "wf".into(),
            output: Value::Null,
            run,
            at,
        })
    }

    #[test]
    fn a_job_goes_requested_running_ended_and_a_repeat_changes_nothing() {
        let s = change(None, 1, &requested("j")).unwrap();
        assert_eq!((s.state, s.created_at, s.seq), (JobState::Requested, 10, 1));
        assert_eq!(
            s.subject(),
            format!("fanjet.index.{}.requested.wf", customer_tag("acme corp"))
        );
        // Read again after a restart: applied already.
        assert_eq!(change(Some(&s), 1, &requested("j")), None);
        // A second request for a known id is no new job.
        assert_eq!(change(Some(&s), 2, &requested("j")), None);
        let s = change(Some(&s), 3, &started(0, 20)).unwrap();
        assert_eq!((s.state, s.changed_at), (JobState::Running, 20));
        // Later steps starting change nothing the index shows.
        assert_eq!(change(Some(&s), 4, &started(0, 25)), None);
        let s = change(Some(&s), 5, &completed(0, 30)).unwrap();
        assert_eq!(
            (s.state, s.finished_at, s.created_at),
            (JobState::Completed, Some(30), 10)
        );
        // A late end, of this run or another, changes nothing.
        assert_eq!(change(Some(&s), 6, &completed(0, 40)), None);
        let failed = Event::JobFailed(JobFailed {
            job_id: "j".into(),
            workflow: "wf".into(),
            error: "x".repeat(10_000),
            run: 0,
            at: 41,
        });
        assert_eq!(change(Some(&s), 7, &failed), None);
    }

    #[test]
    fn a_failure_keeps_a_bounded_reason_and_a_redrive_starts_the_next_run() {
        let s = change(None, 1, &requested("j")).unwrap();
        let failed = Event::JobFailed(JobFailed {
            job_id: "j".into(),
            workflow: "wf".into(),
            error: "x".repeat(10_000),
            run: 0,
            at: 41,
        });
        let s = change(Some(&s), 2, &failed).unwrap();
        assert_eq!(s.state, JobState::Failed);
        assert!(s.error.as_ref().unwrap().len() <= MAX_REASON_BYTES);
        let redriven = |run| {
            Event::JobRedriven(JobRedriven {
                job_id: "j".into(),
                workflow: "wf".into(),
                run,
                step: "s".into(),
                step_index: 0,
                subjobs: 1,
                reason: None,
                at: 50,
            })
        };
        let s = change(Some(&s), 3, &redriven(1)).unwrap();
        assert_eq!(
            (s.state, s.run, s.finished_at, s.error.clone()),
            (JobState::Running, 1, None, None)
        );
        // The earlier run's end, read late, does not end this one.
        assert_eq!(change(Some(&s), 4, &completed(0, 60)), None);
        let s = change(Some(&s), 5, &completed(1, 60)).unwrap();
        assert_eq!(s.state, JobState::Completed);
        let cancelled = Event::JobCancelled(JobCancelled {
            job_id: "j".into(),
            workflow: "wf".into(),
            reason: None,
            at: 70,
        });
        assert_eq!(change(Some(&s), 6, &cancelled), None);
    }

    #[test]
    fn a_rejection_is_indexed_only_for_a_valid_unknown_id() {
        let rejected = |id: &str| {
            Event::JobRejected(JobRejected {
                job_id: id.into(),
                workflow: None,
                customer: None,
                code: RejectCode::UnknownWorkflow,
                reason: "no".into(),
                at: 5,
            })
        };
        let s = change(None, 1, &rejected("j")).unwrap();
        assert_eq!(s.subject(), "fanjet.index._.rejected._");
        assert_eq!(change(None, 1, &rejected("a.b")), None);
        let known = change(None, 1, &requested("j")).unwrap();
        assert_eq!(change(Some(&known), 2, &rejected("j")), None);
        // Events of a job the index does not know change nothing.
        assert_eq!(change(None, 3, &completed(0, 1)), None);
    }

    #[test]
    fn a_filter_names_the_subjects_of_the_entries_it_keeps() {
        let f = IndexFilter {
            customer: Some("acme corp".into()),
            state: Some(JobState::Failed),
            workflow: None,
        };
        assert_eq!(
            f.subject(),
            format!("fanjet.index.{}.failed.*", customer_tag("acme corp"))
        );
        assert_eq!(IndexFilter::default().subject(), "fanjet.index.*.*.*");
        assert_eq!(
            parse_index_subject("fanjet.index.abc.failed.wf"),
            Some((JobState::Failed, "wf"))
        );
        assert_eq!(parse_index_subject("fanjet.index.abc.nope.wf"), None);
    }
}
