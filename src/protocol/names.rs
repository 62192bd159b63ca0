//! Stream, bucket, subject and header names, and the rules for the tokens
//! that user input puts into subjects.

use thiserror::Error;

/// Prefix of the event log's streams, one per cell ([`events_stream`]):
/// every fact about every job, subjects per job.
pub const EVENTS_STREAM_PREFIX: &str = "FANJET_EVENTS";
/// Prefix of the work queue's streams, one per cell ([`tasks_stream`]):
/// one message per task.
pub const TASKS_STREAM_PREFIX: &str = "FANJET_TASKS";
/// Captures the server's max-deliveries advisories for the task stream, so a
/// subjob whose last attempt timed out is noticed even if no manager was up.
pub const ADVISORIES_STREAM: &str = "FANJET_ADVISORIES";

/// KV bucket: workflow definitions, key = workflow name.
pub const WORKFLOWS_BUCKET: &str = "fanjet_workflows";
/// Prefix of the KV buckets of detailed job status, one per cell
/// ([`jobs_bucket`]), key = job id.
pub const JOBS_BUCKET_PREFIX: &str = "fanjet_jobs";
/// Prefix of the KV buckets of pending sets as bitmap chunks, one per cell
/// ([`pending_bucket`]), key = `<job>.<step>.<chunk>`.
pub const PENDING_BUCKET_PREFIX: &str = "fanjet_pending";

/// KV bucket: per-job statistics, key = job id.
pub const STATS_BUCKET: &str = "fanjet_stats";
/// Durable consumer of the event log that builds statistics and metrics.
pub const STATS_CONSUMER: &str = "fanjet-stats";
/// Durable consumer of the event log that sends notifications.
pub const NOTIFY_CONSUMER: &str = "fanjet-notify";

/// Prefix of the durable consumers through which managers read the event
/// log, one per partition: `fanjet-manager-00` … `fanjet-manager-15`.
pub const MANAGER_CONSUMER: &str = "fanjet-manager";
/// KV bucket: which managers are alive (keys `manager.<id>`) and who runs
/// the work one process at a time does (keys `exclusive.<name>`); the
/// partition leases are in their cells' buckets
/// ([`partition_leases_bucket`]). Entries expire after [`LEASE_TTL`]
/// unless renewed.
pub const LEASES_BUCKET: &str = "fanjet_leases";
/// How long a partition lease or a manager's membership lasts unrenewed:
/// a killed or frozen manager's partitions are taken over this long after
/// its last renewal (renewals go every 0.5 s, so four are tried first).
pub const LEASE_TTL: std::time::Duration = std::time::Duration::from_secs(2);
/// Durable consumer of the advisories stream used by the workflow manager.
pub const ADVISORY_CONSUMER: &str = "fanjet-advisories";
/// Queue group of the submission intake (any number of managers).
pub const INTAKE_QUEUE: &str = "fanjet-intake";

/// Content type header; `application/cbor` selects CBOR, anything else JSON.
pub const CONTENT_TYPE_HEADER: &str = "Content-Type";

/// Number of partitions of the event log. The partition is the third token
/// of every event subject; managers split the partitions between them and
/// read each through its own consumer filter.
pub const PARTITIONS: u32 = 16;

/// Largest submission body accepted by the intake.
pub const MAX_SUBMISSION_BYTES: usize = 1024 * 1024;

/// Longest job id, workflow or step name accepted.
pub const MAX_TOKEN_LEN: usize = 64;
/// Longest customer (tenant) key accepted.
pub const MAX_CUSTOMER_LEN: usize = 128;

/// Number of cells. Partition `NN` is in cell `NN mod CELLS`; each cell has
/// streams, buckets and consumers of its own (the log's, first), so that a
/// NATS node's loss stalls the cell whose leaders it held and no other.
pub const CELLS: u32 = 3;

/// The cell of a partition.
pub fn cell(partition: u32) -> u32 {
    partition % CELLS
}

/// The cell of a job: its partition's.
pub fn job_cell(job_id: &str) -> u32 {
    cell(partition(job_id))
}

/// The partitions of one cell, in order.
pub fn cell_partitions(cell: u32) -> impl Iterator<Item = u32> {
    (0..PARTITIONS).filter(move |p| p % CELLS == cell)
}

/// The event log's stream of one cell: `FANJET_EVENTS_<cell>`.
pub fn events_stream(cell: u32) -> String {
    format!("{EVENTS_STREAM_PREFIX}_{cell}")
}

/// Streams (and buckets' streams) kept per cell: their names end with
/// `_<cell>`.
const CELLED_STREAMS: [&str; 5] = [
    EVENTS_STREAM_PREFIX,
    TASKS_STREAM_PREFIX,
    "KV_fanjet_jobs",
    "KV_fanjet_pending",
    "KV_fanjet_leases",
];

/// The job records of one cell: `fanjet_jobs_<cell>`.
pub fn jobs_bucket(cell: u32) -> String {
    format!("{JOBS_BUCKET_PREFIX}_{cell}")
}

/// The pending sets (and active keys) of one cell: `fanjet_pending_<cell>`.
pub fn pending_bucket(cell: u32) -> String {
    format!("{PENDING_BUCKET_PREFIX}_{cell}")
}

/// The leases of one cell's partitions (keys `partition.<NN>`, expiring
/// after [`LEASE_TTL`] unless renewed): `fanjet_leases_<cell>`.
pub fn partition_leases_bucket(cell: u32) -> String {
    format!("{LEASES_BUCKET}_{cell}")
}

/// The cell a stream (or a bucket's stream, `KV_…`) belongs to; `None` for
/// one all cells share.
pub fn stream_cell(stream: &str) -> Option<u32> {
    let (prefix, n) = stream.rsplit_once('_')?;
    let cell: u32 = n.parse().ok()?;
    (cell < CELLS && CELLED_STREAMS.contains(&prefix)).then_some(cell)
}

/// The work queue's stream of one cell: `FANJET_TASKS_<cell>`.
pub fn tasks_stream(cell: u32) -> String {
    format!("{TASKS_STREAM_PREFIX}_{cell}")
}

/// The subjects of one cell's work queue: `fanjet.task.<NN>.>` for each of
/// its partitions.
pub fn cell_tasks_subjects(cell: u32) -> Vec<String> {
    cell_partitions(cell)
        .map(|p| format!("fanjet.task.{p:02}.>"))
        .collect()
}

/// The subjects of one cell's log stream: `fanjet.ev.<NN>.>` for each of
/// its partitions.
pub fn cell_events_subjects(cell: u32) -> Vec<String> {
    cell_partitions(cell)
        .map(|p| format!("fanjet.ev.{p:02}.>"))
        .collect()
}

/// The partition of a job: FNV-1a (32 bit) of the job id's bytes, modulo
/// [`PARTITIONS`].
pub fn partition(job_id: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in job_id.as_bytes() {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h % PARTITIONS
}

/// The durable consumer a manager reads partition `partition` through.
pub fn manager_consumer(partition: u32) -> String {
    format!("{MANAGER_CONSUMER}-{partition:02}")
}

/// Events of one kind in one partition.
pub fn partition_kind_filter(partition: u32, kind: &str) -> String {
    format!("fanjet.ev.{partition:02}.*.{kind}")
}

/// Header naming the manager process on every event and task a manager
/// publishes (an audit: which process wrote what).
pub const MANAGER_HEADER: &str = "Fanjet-Manager";
/// Prefix of the partition leases' keys in [`partition_leases_bucket`].
pub const LEASE_KEY_PREFIX: &str = "partition.";
/// Prefix of the managers' membership keys in [`LEASES_BUCKET`].
pub const MEMBER_KEY_PREFIX: &str = "manager.";

/// Key of a partition's lease in its cell's [`partition_leases_bucket`].
pub fn lease_key(partition: u32) -> String {
    format!("{LEASE_KEY_PREFIX}{partition:02}")
}

/// Key of a manager's membership in [`LEASES_BUCKET`].
pub fn member_key(manager_id: &str) -> String {
    format!("{MEMBER_KEY_PREFIX}{manager_id}")
}

/// Key of the lease on work only one process may do at a time, such as
/// `exclusive.statistics` for the statistics consumer of `fanjet serve`.
pub fn exclusive_key(name: &str) -> String {
    format!("exclusive.{name}")
}

/// Subject a client publishes (or sends a request) to in order to start a job.
pub fn submit_subject(workflow: &str) -> String {
    format!("fanjet.submit.{workflow}")
}

/// Tenant-scoped submission subject: the intake sets the job's customer to
/// the last token, so a user allowed only `fanjet.submit.*.<customer>` can
/// submit for that customer alone.
pub fn customer_submit_subject(workflow: &str, customer: &str) -> String {
    format!("fanjet.submit.{workflow}.{customer}")
}

/// Characters of a customer's tag (hex of SHA-256 of the customer key).
const CUSTOMER_TAG_LEN: usize = 12;

/// Longest job id a submission on a tenant subject may name: room is left
/// for the customer's tag ([`tenant_job_id`]).
pub const MAX_TENANT_JOB_ID_LEN: usize = MAX_TOKEN_LEN - CUSTOMER_TAG_LEN - 1;

/// The customer's tag: the first 12 hex digits of the SHA-256 of its key.
pub fn customer_tag(customer: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(customer.as_bytes());
    let mut tag: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    tag.truncate(CUSTOMER_TAG_LEN);
    tag
}

/// The id of a job submitted on a tenant subject as `job_id`: the
/// customer's tag, `_`, then `job_id`. Job ids are unique per customer
/// there: two customers naming the same id get two jobs, and no customer
/// learns whether another's id exists. An id that already carries the
/// customer's tag is kept as it is (the status service accepts both).
pub fn tenant_job_id(customer: &str, job_id: &str) -> String {
    let tag = customer_tag(customer);
    match job_id.strip_prefix(tag.as_str()) {
        Some(rest) if rest.starts_with('_') => job_id.to_string(),
        _ => format!("{tag}_{job_id}"),
    }
}

/// Request subject of the status service: answers with the job's detailed
/// status when the job belongs to `customer` (which a permission can pin).
pub fn status_subject(customer: &str, job_id: &str) -> String {
    format!("fanjet.status.{customer}.{job_id}")
}

/// Request subject of the cancel service: asks for the job's cancellation
/// when the job belongs to `customer` (which a permission can pin).
pub fn cancel_subject(customer: &str, job_id: &str) -> String {
    format!("fanjet.cancel.{customer}.{job_id}")
}

/// What the cancel service listens on.
pub const CANCEL_WILDCARD: &str = "fanjet.cancel.*.*";

/// Subject of the update service (pause, resume, window, tolerance) for one
/// customer's job.
pub fn update_subject(customer: &str, job_id: &str) -> String {
    format!("fanjet.update.{customer}.{job_id}")
}

/// Subject of the redrive service for one customer's job.
pub fn redrive_subject(customer: &str, job_id: &str) -> String {
    format!("fanjet.redrive.{customer}.{job_id}")
}

/// What the redrive service listens on.
pub const REDRIVE_WILDCARD: &str = "fanjet.redrive.*.*";

/// Subject of the results service for one job: a worker holding one of
/// its tasks reads a step's results (see [`super::ResultsRequest`]).
pub fn results_subject(job_id: &str) -> String {
    format!("fanjet.results.{job_id}")
}

/// What the results service listens on (first pages).
pub const RESULTS_WILDCARD: &str = "fanjet.results.*";

/// Where the manager that answered a first page serves the next ones of
/// that reading (`session`), for a time.
pub fn results_page_subject(manager: &str, session: &str) -> String {
    format!("fanjet.results.page.{manager}.{session}")
}

/// What one manager listens on for next pages.
pub fn results_pages_wildcard(manager: &str) -> String {
    format!("fanjet.results.page.{manager}.*")
}

/// What the update service listens on.
pub const UPDATE_WILDCARD: &str = "fanjet.update.*.*";

/// What the status service listens on.
pub const STATUS_WILDCARD: &str = "fanjet.status.*.*";

/// Wildcard the intake subscribes to.
pub const SUBMIT_WILDCARD: &str = "fanjet.submit.>";

/// Every event of the log (a core NATS subscription; each cell's stream
/// holds a part, [`cell_events_subjects`]).
pub const EVENTS_WILDCARD: &str = "fanjet.ev.>";

/// Subject of one event of a job: `fanjet.ev.<partition>.<job_id>.<kind>`.
pub fn event_subject(job_id: &str, kind: &str) -> String {
    format!("fanjet.ev.{:02}.{job_id}.{kind}", partition(job_id))
}

/// Every event of one job, whatever its partition.
pub fn job_events_filter(job_id: &str) -> String {
    format!("fanjet.ev.*.{job_id}.*")
}

/// Events of one kind across all jobs.
pub fn kind_filter(kind: &str) -> String {
    format!("fanjet.ev.*.*.{kind}")
}

/// Subject of a notification: `fanjet.notify.<workflow>.<job_id>.<kind>`
/// (`_` as the workflow when a rejected submission named none).
pub fn notify_subject(workflow: &str, job_id: &str, kind: &str) -> String {
    let workflow = if workflow.is_empty() { "_" } else { workflow };
    format!("fanjet.notify.{workflow}.{job_id}.{kind}")
}

/// Subject of a heartbeat: `fanjet.heartbeat.<role>.<user>.<id>`, where
/// `user` is the sender's NATS user name ([`subject_token`]).
pub fn heartbeat_subject(role: &str, user: &str, id: &str) -> String {
    format!("fanjet.heartbeat.{role}.{}.{id}", subject_token(user))
}

/// The sender's (role, user, id) from a heartbeat subject; `None` for any
/// other shape.
pub fn heartbeat_sender(subject: &str) -> Option<(&str, &str, &str)> {
    let mut t = subject.strip_prefix("fanjet.heartbeat.")?.split('.');
    let sender = (t.next()?, t.next()?, t.next()?);
    t.next().is_none().then_some(sender)
}

/// `value` as one subject token: characters other than letters, digits,
/// `-` and `_` become `_`; empty becomes `_`.
pub fn subject_token(value: &str) -> String {
    if value.is_empty() {
        return "_".into();
    }
    value
        .chars()
        .map(
            |c| match c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                true => c,
                false => '_',
            },
        )
        .collect()
}

/// Every heartbeat.
pub const HEARTBEAT_WILDCARD: &str = "fanjet.heartbeat.>";
/// Every worker's heartbeat (managers count the slots of each step from them).
pub const WORKER_HEARTBEATS: &str = "fanjet.heartbeat.worker.>";
/// A message here asks every process to send its heartbeat now (a manager
/// that starts need not wait a heartbeat period to count the slots).
pub const ROLL_CALL: &str = "fanjet.rollcall";

/// Header carrying a notification's stable id (the event's message id), for
/// receivers to drop the rare duplicate.
pub const NOTIFICATION_ID_HEADER: &str = "Fanjet-Notification-Id";

/// Subject of a task: `fanjet.task.<partition>.<workflow>.<step>.<job_id>`
/// (the partition picks the cell's work queue).
pub fn task_subject(workflow: &str, step: &str, job_id: &str) -> String {
    format!(
        "fanjet.task.{:02}.{workflow}.{step}.{job_id}",
        partition(job_id)
    )
}

/// What a step's consumer filters on (in each cell's work queue).
pub fn step_tasks_filter(workflow: &str, step: &str) -> String {
    format!("fanjet.task.*.{workflow}.{step}.*")
}

/// Every queued task of one job (used to drop them on cancel or failure).
pub fn job_tasks_filter(job_id: &str) -> String {
    format!("fanjet.task.{:02}.*.*.{job_id}", partition(job_id))
}

/// Name of the durable pull consumer workers of one step share.
pub fn step_consumer(workflow: &str, step: &str) -> String {
    format!("fanjet_{workflow}_{step}")
}

/// Subjects captured by the advisories stream: every cell's work queue's.
pub fn max_deliveries_advisories() -> Vec<String> {
    (0..CELLS)
        .map(|c| {
            format!(
                "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{}.>",
                tasks_stream(c)
            )
        })
        .collect()
}

/// KV key (in its cell's [`pending_bucket`]) marking a job its partition's manager
/// must load when it takes the partition over: present from the job's
/// first checkpoint to its last, so a manager loads the running jobs of a
/// partition without reading every record kept (a month of them). `=`
/// cannot start a job id, so these keys never meet a chunk's.
pub fn active_key(job_id: &str) -> String {
    format!("=active.{:02}.{job_id}", partition(job_id))
}

/// The active keys of one partition, for a key listing.
pub fn active_filter(partition: u32) -> String {
    format!("=active.{partition:02}.>")
}

/// KV key (in its cell's [`pending_bucket`]) saying that a partition's active keys are
/// complete: a manager of a version before them wrote none, so without it
/// a manager scans every record of the partition once and writes them.
pub fn active_scanned_key(partition: u32) -> String {
    format!("=scanned.{partition:02}")
}

/// KV key (in its job's cell's [`pending_bucket`]) of one chunk of a step's pending set.
pub fn chunk_key(job_id: &str, step_index: usize, chunk: u64) -> String {
    format!("{job_id}.{step_index}.{chunk}")
}

/// Message id of a task, for JetStream de-duplication of re-dispatches
/// (a redriven run's tasks are new ones: their ids end with the run).
pub fn task_msg_id(job_id: &str, step_index: usize, index: u64, run: u32) -> String {
    match run {
        0 => format!("{job_id}:{step_index}:{index}"),
        run => format!("{job_id}:{step_index}:{index}:r{run}"),
    }
}

/// Why a subject token was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("{what} is empty")]
    Empty { what: &'static str },
    #[error("{what} is longer than {max} characters")]
    TooLong { what: &'static str, max: usize },
    #[error("{what} {value:?} may only contain letters, digits, '-' and '_' (it becomes a NATS subject token)")]
    BadChar { what: &'static str, value: String },
    #[error("{what} {value:?} holds a control character (any other printable text is allowed)")]
    ControlChar { what: &'static str, value: String },
}

/// Checks a job id, workflow or step name: 1 to 64 of `[A-Za-z0-9_-]`, so it
/// is always one safe subject token (no `.`, `*`, `>` or whitespace).
pub fn validate_token(what: &'static str, value: &str) -> Result<(), TokenError> {
    if value.is_empty() {
        return Err(TokenError::Empty { what });
    }
    if value.len() > MAX_TOKEN_LEN {
        return Err(TokenError::TooLong {
            what,
            max: MAX_TOKEN_LEN,
        });
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        let shown: String = value.chars().take(MAX_TOKEN_LEN + 8).collect();
        return Err(TokenError::BadChar { what, value: shown });
    }
    Ok(())
}

/// Checks a customer key: it travels in payloads only, so it may hold any
/// printable text up to [`MAX_CUSTOMER_LEN`] characters.
pub fn validate_customer(value: &str) -> Result<(), TokenError> {
    if value.is_empty() {
        return Err(TokenError::Empty { what: "customer" });
    }
    if value.chars().count() > MAX_CUSTOMER_LEN {
        return Err(TokenError::TooLong {
            what: "customer",
            max: MAX_CUSTOMER_LEN,
        });
    }
    if value.chars().any(char::is_control) {
        return Err(TokenError::ControlChar {
            what: "customer",
            value: value.escape_debug().to_string(),
        });
    }
    Ok(())
}

/// A fresh job id: a ULID (26 characters, time-ordered).
pub fn new_job_id() -> String {
    ulid::Ulid::new().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_reject_subject_syntax() {
        for bad in ["a.b", "*", ">", "a b", "", "é", "a\tb"] {
            assert!(validate_token("job id", bad).is_err(), "{bad:?} accepted");
        }
        assert!(validate_token("job id", &"x".repeat(65)).is_err());
        for good in ["inv-2026_11", "A", &new_job_id()] {
            validate_token("job id", good).unwrap();
        }
    }

    #[test]
    fn a_customer_may_be_any_printable_text_and_its_error_says_so() {
        for good in ["acme", "Acme Inc.", "a.b*c>", "é 東京"] {
            validate_customer(good).unwrap();
        }
        let e = validate_customer("a\nb").unwrap_err().to_string();
        assert!(e.contains("control character"), "{e}");
        assert!(!e.contains("only contain letters"), "{e}");
    }

    #[test]
    fn tenant_ids_are_unique_per_customer() {
        // Fixed vector (also in docs/PROTOCOL.md) for other implementations.
        assert_eq!(customer_tag("acme"), "822b33ad87c1");
        let a = tenant_job_id("acme", "next");
        assert_eq!(a, "822b33ad87c1_next");
        assert_ne!(a, tenant_job_id("bob", "next"));
        assert_eq!(
            tenant_job_id("acme", &a),
            a,
            "scoping twice changes nothing"
        );
        // Customers whose keys run into each other's ids do not collide.
        assert_ne!(tenant_job_id("a", "b-c"), tenant_job_id("a-b", "c"));
        let longest = "x".repeat(MAX_TENANT_JOB_ID_LEN);
        validate_token("job id", &tenant_job_id("acme", &longest)).unwrap();
    }

    #[test]
    fn partition_is_stable_and_in_range() {
        // Fixed vector (also in docs/PROTOCOL.md) for other implementations.
        assert_eq!(partition("job-1"), 6);
        assert_eq!(
            event_subject("job-1", "requested"),
            "fanjet.ev.06.job-1.requested"
        );
        let all: std::collections::HashSet<u32> =
            (0..1000).map(|i| partition(&format!("j{i}"))).collect();
        assert!(all.iter().all(|p| *p < PARTITIONS));
        assert_eq!(
            all.len() as u32,
            PARTITIONS,
            "hash spreads over every partition"
        );
        assert!(event_subject("job-1", "requested").starts_with("fanjet.ev."));
    }
}
