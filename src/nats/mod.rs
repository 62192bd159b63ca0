//! Everything fanjet does with NATS itself, below the workflow logic:
//! [`Nats`], the handle every part uses (one connection, with its streams
//! and buckets found or created); the connection flags ([`connect`]); the
//! event log, appended to and read ([`log`]); job records, pending chunks
//! and statistics records in KV ([`store`]); leases ([`leases`]); leaders
//! kept beside the event log's on a cluster ([`placement`]); heartbeats
//! ([`heartbeat`]); request/reply services in a queue group ([`service`]);
//! and a local nats-server ([`server`]).
//!
//! [`Nats::ensure`] creates (or updates to the current settings) every
//! stream, consumer and bucket; the manager, `fanjet serve` and `workflow
//! apply` call it, so the order in which a user starts things does not
//! matter. Restricted roles [`Nats::bind`] and create nothing.

pub mod connect;
pub mod direct;
pub mod heartbeat;
pub mod index;
pub mod leases;
pub mod log;
pub mod objects;
pub mod placement;
pub mod publish;
pub mod server;
pub mod service;
pub mod store;
pub mod tenants;

use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv, object_store, stream, Context};
use thiserror::Error;

use crate::protocol::{
    cell_events_subjects, cell_tasks_subjects, events_stream, job_cell, jobs_bucket,
    max_deliveries_advisories, partition_leases_bucket, pending_bucket, step_consumer,
    step_tasks_filter, tasks_stream, Step, Workflow, ADVISORIES_STREAM, CELLS,
    EVENTS_STREAM_PREFIX, INDEX_BUCKET, INDEX_STREAM, INDEX_WILDCARD, LEASES_BUCKET, LEASE_TTL,
    RESULTS_BUCKET, STATS_BUCKET, TASKS_STREAM_PREFIX, WORKFLOWS_BUCKET,
};
use crate::protocol::{TaskKey, KEYS_BUCKET, SHARES_BUCKET, TASK_KEY, TENANTS_BUCKET};

/// How long the event log keeps events (and so how long a job may run).
pub const EVENTS_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);
/// How long job status and statistics are kept after their last change.
pub const RECORDS_MAX_AGE: Duration = Duration::from_secs(30 * 24 * 3600);
/// Duplicate window of the event and task streams: a re-publish within it
/// (after a crash) is dropped by the server.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(300);

#[derive(Debug, Error)]
pub enum SetupError {
    #[error("could not create or update stream {name}: {source}")]
    Stream {
        name: String,
        source: jetstream::context::CreateStreamError,
    },
    #[error("could not create or update bucket {name}: {source}")]
    Bucket {
        name: String,
        source: jetstream::context::CreateKeyValueError,
    },
    #[error("could not create consumer {name}: {source}")]
    Consumer {
        name: String,
        source: jetstream::stream::ConsumerError,
    },
    #[error("could not read stream {name}: {source}")]
    GetStream {
        name: String,
        source: jetstream::context::GetStreamError,
    },
    #[error("fanjet's streams and buckets are not there or not readable ({0}): start `fanjet manager` (or `fanjet dev`) first, or check this user's permissions")]
    Missing(String),
    /// A store an earlier version made, with one log and one work queue:
    /// this version splits them into cells.
    #[error("stream {0} is an earlier fanjet's (one log and one work queue; this version keeps them per cell): let its jobs end, then delete it (`nats stream rm {0}`); see docs/OPERATIONS.md, \"Upgrading\"")]
    Legacy(String),
    #[error("could not read or create the task token key in bucket {KEYS_BUCKET}: {0}")]
    Key(String),
    #[error("could not open the results object store: {0}")]
    Results(String),
    #[error("could not read or store workflow {name}: {message}")]
    Workflow { name: String, message: String },
    /// The stored definition fails validation: reading it again will not help.
    #[error("the stored definition of workflow {name:?} is invalid: {message}")]
    BadDefinition { name: String, message: String },
}

impl SetupError {
    /// True when trying again may succeed (NATS unavailable, a timeout);
    /// false when the thing itself is wrong.
    pub fn is_transient(&self) -> bool {
        !matches!(
            self,
            SetupError::BadDefinition { .. } | SetupError::Legacy(_)
        )
    }
}

/// Life of each pull request of a reader that runs for ever (the
/// notifier, the advisory watcher). A pull outlives the leader of its
/// consumer: when the leader changes (a node lost), the reader learns it
/// from a missed heartbeat (every quarter of this) and pulls again from the
/// new one. The client's default (30 s, heartbeats every 15) left a
/// notifier silent for half a minute after a node was killed.
pub const READER_PULL: Duration = Duration::from_secs(4);

/// The messages of `consumer` for a reader that runs for ever, each pull
/// living [`READER_PULL`].
pub async fn reader_messages(
    consumer: &consumer::PullConsumer,
) -> Result<consumer::pull::Stream, consumer::StreamError> {
    consumer
        .stream()
        .expires(READER_PULL)
        .heartbeat(READER_PULL / 4)
        .messages()
        .await
}

/// Runs `work`, telling the server every `every` that `msg` is still being
/// worked on (in-progress acks), so that its ack wait does not run out.
pub async fn keep_taken<T>(
    msg: &async_nats::jetstream::Message,
    every: Duration,
    work: impl std::future::Future<Output = T>,
) -> T {
    let mut progress = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tokio::pin!(work);
    loop {
        tokio::select! {
            done = &mut work => return done,
            _ = progress.tick() => {
                if let Err(e) = msg.ack_with(jetstream::AckKind::Progress).await {
                    tracing::warn!(subject = %msg.subject, error = %e, "telling the server a message is still being worked on");
                }
            }
        }
    }
}

/// Room kept for headers (message id and the like) under the server's max
/// payload.
const HEADER_ROOM: usize = 1024;

/// Handles to everything fanjet uses on one NATS connection.
#[derive(Clone)]
pub struct Nats {
    pub client: async_nats::Client,
    pub js: Context,
    /// The event log, one stream per cell (index = cell): see [`Nats::log`].
    pub events: Vec<stream::Stream>,
    /// The work queue, one stream per cell (index = cell).
    pub tasks: Vec<stream::Stream>,
    pub advisories: stream::Stream,
    /// The job index: a summary per job (see [`index`]).
    pub index: stream::Stream,
    pub workflows: kv::Store,
    /// Job records, one bucket per cell: see [`Nats::records`].
    pub jobs: Vec<kv::Store>,
    /// Pending sets and active keys, one bucket per cell: see
    /// [`Nats::pending_of`].
    pub pending: Vec<kv::Store>,
    pub stats: kv::Store,
    /// Results too large to travel inline in their event.
    pub results: object_store::ObjectStore,
    /// The key of task tokens: managers (and `fanjet serve`) only, read by
    /// [`ensure`](Self::ensure); `None` for restricted roles.
    pub task_key: Option<TaskKey>,
    /// The NATS user this connection authenticated as (`_` when unknown):
    /// heartbeats go out under it ([`with_user`](Self::with_user)).
    pub user: String,
}

impl Nats {
    /// The log stream holding `job_id`'s events (its cell's).
    pub fn log(&self, job_id: &str) -> &stream::Stream {
        self.cell_log(job_cell(job_id))
    }

    /// The work queue holding `job_id`'s tasks (its cell's).
    pub fn task_queue(&self, job_id: &str) -> &stream::Stream {
        &self.tasks[job_cell(job_id) as usize]
    }

    /// The bucket of `job_id`'s record (its cell's).
    pub fn records(&self, job_id: &str) -> &kv::Store {
        &self.jobs[job_cell(job_id) as usize]
    }

    /// The bucket of `job_id`'s pending sets and active key (its cell's).
    pub fn pending_of(&self, job_id: &str) -> &kv::Store {
        &self.pending[job_cell(job_id) as usize]
    }

    /// The log stream of one cell.
    pub fn cell_log(&self, cell: u32) -> &stream::Stream {
        &self.events[cell as usize]
    }

    /// The largest payload a message of fanjet's may carry: the server's
    /// max payload, less room for headers.
    pub fn max_payload(&self) -> usize {
        max_payload(&self.client)
    }

    /// Handles to the streams and buckets a manager created, creating
    /// nothing: for roles that may only read and publish (workers,
    /// submitters, viewers). Needs `$JS.API.STREAM.INFO` on them.
    pub async fn bind(client: async_nats::Client) -> Result<Self, SetupError> {
        let js = context(client.clone());
        let missing =
            |what: &str, e: &dyn std::fmt::Display| SetupError::Missing(format!("{what}: {e}"));
        let stream = |name: String| {
            let js = js.clone();
            async move { js.get_stream(&name).await.map_err(|e| missing(&name, &e)) }
        };
        let bucket = |name: String| {
            let js = js.clone();
            async move {
                js.get_key_value(&name)
                    .await
                    .map_err(|e| missing(&name, &e))
            }
        };
        let (mut events, mut tasks) = (Vec::new(), Vec::new());
        let (mut jobs, mut pending) = (Vec::new(), Vec::new());
        for cell in 0..CELLS {
            events.push(stream(events_stream(cell)).await?);
            tasks.push(stream(tasks_stream(cell)).await?);
            jobs.push(bucket(jobs_bucket(cell)).await?);
            pending.push(bucket(pending_bucket(cell)).await?);
        }
        Ok(Nats {
            events,
            tasks,
            advisories: stream(ADVISORIES_STREAM.into()).await?,
            index: stream(INDEX_STREAM.into()).await?,
            workflows: bucket(WORKFLOWS_BUCKET.into()).await?,
            jobs,
            pending,
            stats: bucket(STATS_BUCKET.into()).await?,
            results: js
                .get_object_store(RESULTS_BUCKET)
                .await
                .map_err(|e| missing(RESULTS_BUCKET, &e))?,
            task_key: None,
            user: "_".into(),
            client,
            js,
        })
    }

    /// This handle, saying it is `user`'s (the name heartbeats carry).
    pub fn with_user(mut self, user: Option<&str>) -> Self {
        self.user = user_token(user);
        self
    }

    /// This handle with the task token key read (or made, by the first
    /// manager): for a connection that was [`bind`](Self::bind)-ed and
    /// runs a manager or the statistics consumer (the manager role).
    pub async fn with_task_key(mut self) -> Result<Self, SetupError> {
        if self.task_key.is_none() {
            let keys = self
                .js
                .get_key_value(KEYS_BUCKET)
                .await
                .map_err(|e| SetupError::Key(e.to_string()))?;
            self.task_key = Some(task_key(&keys).await?);
        }
        Ok(self)
    }

    /// Creates or updates the streams and buckets, and returns handles.
    pub async fn ensure(client: async_nats::Client) -> Result<Self, SetupError> {
        Self::ensure_replicated(client, replicas_from_env()).await
    }

    /// Like [`ensure`](Self::ensure), with `replicas` copies of every
    /// stream, bucket and consumer (3 on a 3-node cluster survives the loss
    /// of one node).
    pub async fn ensure_replicated(
        client: async_nats::Client,
        replicas: usize,
    ) -> Result<Self, SetupError> {
        let replicas = replicas.max(1);
        let js = context(client.clone());
        let stream = |name: String, subjects: Vec<String>, retention, max_age, allow_direct| {
            let js = js.clone();
            let cfg = stream::Config {
                name: name.clone(),
                subjects,
                retention,
                max_age,
                storage: stream::StorageType::File,
                num_replicas: replicas,
                duplicate_window: DUPLICATE_WINDOW,
                allow_direct,
                ..Default::default()
            };
            async move {
                js.create_or_update_stream(cfg)
                    .await
                    .map_err(|source| SetupError::Stream {
                        name: name.clone(),
                        source,
                    })?;
                js.get_stream(&name)
                    .await
                    .map_err(|source| SetupError::GetStream { name, source })
            }
        };
        let bucket = |name: String, history: i64, max_age: Duration| {
            let js = js.clone();
            let cfg = kv::Config {
                bucket: name.clone(),
                history,
                max_age,
                storage: stream::StorageType::File,
                num_replicas: replicas,
                ..Default::default()
            };
            async move {
                js.create_or_update_key_value(cfg)
                    .await
                    .map_err(|source| SetupError::Bucket { name, source })
            }
        };
        use stream::RetentionPolicy::{Limits, WorkQueue};
        // Managers split the log's partitions through leases that expire.
        bucket(LEASES_BUCKET.into(), 1, LEASE_TTL).await?;
        let keys = bucket(KEYS_BUCKET.into(), 1, Duration::ZERO).await?;
        // The fair share: what each partition wants of each step (rewritten
        // every few seconds; a key nobody rewrites goes), and the
        // customers' settings.
        bucket(SHARES_BUCKET.into(), 1, Duration::from_secs(600)).await?;
        bucket(TENANTS_BUCKET.into(), 5, Duration::ZERO).await?;
        // Where each job's entry is in the index: kept as long as the entry.
        bucket(INDEX_BUCKET.into(), 1, RECORDS_MAX_AGE).await?;
        let index_stream = stream::Config {
            name: INDEX_STREAM.to_string(),
            subjects: vec![INDEX_WILDCARD.into()],
            retention: stream::RetentionPolicy::Limits,
            max_age: RECORDS_MAX_AGE,
            storage: stream::StorageType::File,
            num_replicas: replicas,
            duplicate_window: DUPLICATE_WINDOW,
            // Listings read it with batched direct gets, from any replica.
            allow_direct: true,
            // Each entry lives as long as its job's record.
            allow_message_ttl: true,
            ..Default::default()
        };
        js.create_or_update_stream(index_stream)
            .await
            .map_err(|source| SetupError::Stream {
                name: INDEX_STREAM.into(),
                source,
            })?;
        let task_key = task_key(&keys).await?;
        // A store made by a version before the cells: its single log and
        // work queue take the subjects the cells' streams need.
        for legacy in [EVENTS_STREAM_PREFIX, TASKS_STREAM_PREFIX] {
            if js.get_stream(legacy).await.is_ok() {
                return Err(SetupError::Legacy(legacy.into()));
            }
        }
        let (mut events, mut tasks) = (Vec::new(), Vec::new());
        let (mut jobs, mut pending) = (Vec::new(), Vec::new());
        for cell in 0..CELLS {
            jobs.push(bucket(jobs_bucket(cell), 1, RECORDS_MAX_AGE).await?);
            // A job cannot outlive the log, so neither may its chunks: if
            // deleting them when the job ended failed, they expire.
            pending.push(bucket(pending_bucket(cell), 1, EVENTS_MAX_AGE).await?);
            // Each cell's partitions are leased in a bucket of the cell's:
            // renewals go on while another cell's bucket elects a leader.
            bucket(partition_leases_bucket(cell), 1, LEASE_TTL).await?;
            // Readers without consumer rights (the viewer role) read a
            // job's history with direct gets.
            let log = stream(
                events_stream(cell),
                cell_events_subjects(cell),
                Limits,
                EVENTS_MAX_AGE,
                true,
            );
            events.push(log.await?);
            let queue = stream(
                tasks_stream(cell),
                cell_tasks_subjects(cell),
                WorkQueue,
                Duration::ZERO,
                false,
            );
            tasks.push(queue.await?);
        }
        Ok(Nats {
            events,
            tasks,
            advisories: stream(
                ADVISORIES_STREAM.into(),
                max_deliveries_advisories(),
                Limits,
                EVENTS_MAX_AGE,
                false,
            )
            .await?,
            index: js
                .get_stream(INDEX_STREAM)
                .await
                .map_err(|source| SetupError::GetStream {
                    name: INDEX_STREAM.into(),
                    source,
                })?,
            workflows: bucket(WORKFLOWS_BUCKET.into(), 5, Duration::ZERO).await?,
            jobs,
            pending,
            stats: bucket(STATS_BUCKET.into(), 1, RECORDS_MAX_AGE).await?,
            results: results_bucket(&js, replicas).await?,
            task_key: Some(task_key),
            user: "_".into(),
            client,
            js,
        })
    }

    /// Creates or updates the pull consumers workers of one step share, one
    /// in each cell's work queue (index = cell): AckWait = the step's
    /// timeout, MaxDeliver = its attempts.
    pub async fn ensure_step_consumer(
        &self,
        workflow: &str,
        step: &Step,
    ) -> Result<Vec<consumer::PullConsumer>, SetupError> {
        create_step_consumer(&self.js, workflow, step).await
    }

    /// Creates or updates a step's consumer in one cell's work queue (what
    /// a partition of that cell needs, whatever the other cells' state).
    pub async fn ensure_cell_step_consumer(
        &self,
        cell: u32,
        workflow: &str,
        step: &Step,
    ) -> Result<consumer::PullConsumer, SetupError> {
        create_cell_step_consumer(&self.js, cell, workflow, step).await
    }

    /// Stores a workflow definition and creates its step consumers.
    pub async fn apply_workflow(&self, workflow: &Workflow) -> Result<(), SetupError> {
        let bytes = serde_json::to_vec(workflow).map_err(|e| SetupError::Workflow {
            name: workflow.name.clone(),
            message: e.to_string(),
        })?;
        // What readers will check, checked before anything is written.
        Workflow::from_json(&bytes).map_err(|e| SetupError::BadDefinition {
            name: workflow.name.clone(),
            message: e.to_string(),
        })?;
        for step in &workflow.steps {
            self.ensure_step_consumer(&workflow.name, step).await?;
        }
        self.workflows
            .put(&workflow.name, bytes.into())
            .await
            .map_err(|e| SetupError::Workflow {
                name: workflow.name.clone(),
                message: e.to_string(),
            })?;
        Ok(())
    }

    /// Reads a stored workflow and checks it; `Ok(None)` when there is none
    /// by that name, [`SetupError::BadDefinition`] when what is stored is
    /// not a valid definition of that name.
    pub async fn workflow(&self, name: &str) -> Result<Option<Workflow>, SetupError> {
        read_workflow(&self.workflows, name).await
    }

    /// Every stored workflow, by name.
    pub async fn workflows(&self) -> Result<Vec<Workflow>, SetupError> {
        use futures::TryStreamExt;
        let err = |message: String| SetupError::Workflow {
            name: "*".into(),
            message,
        };
        let keys: Vec<String> = match self.workflows.keys().await {
            Ok(k) => k.try_collect().await.map_err(|e| err(e.to_string()))?,
            Err(e) => return Err(err(e.to_string())),
        };
        let mut out = Vec::new();
        for k in keys {
            match self.workflow(&k).await {
                Ok(Some(w)) => out.push(w),
                Ok(None) => {}
                Err(e) if !e.is_transient() => tracing::warn!(error = %e, "skipping a workflow"),
                Err(e) => return Err(e),
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }
}

/// Creates or updates the pull consumers workers of one step share, one in
/// each cell's work queue: AckWait = the step's timeout, MaxDeliver = its
/// attempts.
async fn create_step_consumer(
    js: &Context,
    workflow: &str,
    step: &Step,
) -> Result<Vec<consumer::PullConsumer>, SetupError> {
    let mut consumers = Vec::new();
    for cell in 0..CELLS {
        consumers.push(create_cell_step_consumer(js, cell, workflow, step).await?);
    }
    Ok(consumers)
}

/// Creates or updates a step's consumer in one cell's work queue.
async fn create_cell_step_consumer(
    js: &Context,
    cell: u32,
    workflow: &str,
    step: &Step,
) -> Result<consumer::PullConsumer, SetupError> {
    let name = step_consumer(workflow, &step.name);
    let config = consumer::pull::Config {
        durable_name: Some(name.clone()),
        filter_subject: step_tasks_filter(workflow, &step.name),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: Duration::from_millis(step.timeout_ms),
        max_deliver: i64::from(step.max_attempts),
        max_ack_pending: 100_000,
        max_waiting: 4096,
        ..Default::default()
    };
    let queue = js
        .get_stream_no_info(tasks_stream(cell))
        .await
        .map_err(|e| SetupError::Consumer {
            name: name.clone(),
            source: stream::ConsumerError::with_source(stream::ConsumerErrorKind::Other, e),
        })?;
    answered(|| consumer_as(js, &queue, &name, config.clone()))
        .await
        .unwrap_or_else(|e| {
            Err(stream::ConsumerError::with_source(
                stream::ConsumerErrorKind::TimedOut,
                e,
            ))
        })
        .map_err(|source| SetupError::Consumer { name, source })
}

/// How long each try of [`answered`] waits for an answer: short at first,
/// then a little longer for a server that is only slow.
const ASK_WAITS: [Duration; 8] = [
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(2),
    Duration::from_secs(2),
    Duration::from_secs(2),
    Duration::from_secs(2),
    Duration::from_secs(3),
    Duration::from_secs(3),
];

/// A request that was asked [`ASK_WAITS`] times and never answered.
#[derive(Debug, Clone, Copy, Error)]
#[error("not answered in {0:?} (asked {1} times)")]
pub struct Unanswered(pub Duration, pub usize);

/// Asks `ask` until it is answered: each try waits briefly, and one that
/// gets no answer is asked again. A stream or consumer whose leader was
/// lost answers nothing until its followers elect another (4-9 s), and a
/// request sent before that is never answered: waiting out the client's
/// 10 s for it kept sessions waiting 3 to 5 s after their consumers had
/// leaders again (a chaos run's logs). Only for requests that may be repeated (reads, and
/// changes that leave the same result when applied twice); `ask` is
/// called before each try, so it may check a fence first. Answers that
/// are errors come back as they are.
pub(crate) async fn answered<T, E, F, Fut>(mut ask: F) -> Result<Result<T, E>, Unanswered>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut waited = Duration::ZERO;
    for wait in ASK_WAITS {
        if let Ok(answer) = tokio::time::timeout(wait, ask()).await {
            return Ok(answer);
        }
        waited += wait;
    }
    Err(Unanswered(waited, ASK_WAITS.len()))
}

/// The durable pull consumer `name` as `wanted`: the one there is when it
/// already is (its info comes from its own leader), created or changed
/// otherwise. Creating asks the cluster's JetStream meta leader, which
/// after a node's loss may be electing for seconds: a session that finds
/// its consumers as it left them must not wait for that.
pub(crate) async fn consumer_as<I>(
    js: &Context,
    stream: &stream::Stream<I>,
    name: &str,
    wanted: consumer::pull::Config,
) -> Result<consumer::PullConsumer, stream::ConsumerError> {
    use jetstream::context::ConsumerInfoErrorKind as Info;
    use stream::{ConsumerError, ConsumerErrorKind};
    match stream.consumer_info(name).await {
        Ok(info) if consumer_is(&info.config, &wanted) => {
            Ok(consumer::Consumer::new(wanted, info, js.clone()))
        }
        Ok(_) => stream.create_consumer(wanted).await,
        Err(e) if matches!(e.kind(), Info::NotFound) => stream.create_consumer(wanted).await,
        Err(e) if matches!(e.kind(), Info::TimedOut) => {
            Err(ConsumerError::with_source(ConsumerErrorKind::TimedOut, e))
        }
        Err(e) => Err(ConsumerError::with_source(ConsumerErrorKind::Other, e)),
    }
}

/// Whether a consumer's stored config is what `wanted` asks for, in every
/// field `wanted` sets (the server fills in the rest with its defaults).
fn consumer_is(have: &consumer::Config, wanted: &consumer::pull::Config) -> bool {
    use consumer::IntoConsumerConfig;
    let want = wanted.clone().into_consumer_config();
    let filters = |c: &consumer::Config| {
        let mut f = c.filter_subjects.clone();
        if !c.filter_subject.is_empty() {
            f.push(c.filter_subject.clone());
        }
        f.sort();
        f
    };
    let set = |w: i64, h: i64| w == 0 || w == h;
    have.durable_name == want.durable_name
        && filters(have) == filters(&want)
        && have.ack_policy == want.ack_policy
        && (want.ack_wait.is_zero() || have.ack_wait == want.ack_wait)
        && set(want.max_deliver, have.max_deliver)
        && set(want.max_ack_pending, have.max_ack_pending)
        && set(want.max_waiting, have.max_waiting)
        && have.priority_policy == want.priority_policy
        && have.priority_groups == want.priority_groups
        && (want.priority_timeout.is_zero() || have.priority_timeout == want.priority_timeout)
}

/// Reads a stored workflow and checks it; `Ok(None)` when there is none by
/// that name, [`SetupError::BadDefinition`] when what is stored is not a
/// valid definition of that name.
async fn read_workflow(workflows: &kv::Store, name: &str) -> Result<Option<Workflow>, SetupError> {
    let bytes = workflows
        .get(name)
        .await
        .map_err(|e| SetupError::Workflow {
            name: name.to_string(),
            message: e.to_string(),
        })?;
    let Some(bytes) = bytes else {
        return Ok(None);
    };
    let bad = |message: String| SetupError::BadDefinition {
        name: name.to_string(),
        message,
    };
    let workflow = Workflow::from_json(&bytes).map_err(|e| bad(e.to_string()))?;
    if workflow.name != name {
        return Err(bad(format!(
            "it is stored under {name:?} but names itself {:?}",
            workflow.name
        )));
    }
    Ok(Some(workflow))
}

/// The user token of heartbeats: `user` as a subject token, `_` for none.
fn user_token(user: Option<&str>) -> String {
    user.map(crate::protocol::subject_token)
        .unwrap_or_else(|| "_".into())
}

/// The largest payload a message may carry on `client`'s server, less room
/// for headers.
fn max_payload(client: &async_nats::Client) -> usize {
    match client.server_info().max_payload {
        0 => usize::MAX,
        max => max.saturating_sub(HEADER_ROOM),
    }
}

/// What a worker uses of NATS, and no more: its connection, the workflow
/// definitions, and its steps' consumers, found by name. Binding it needs
/// stream info on the workflows bucket only: none on the work queue, the
/// log or the result store, whose subjects (listed by a stream info
/// request) would name every customer's jobs.
#[derive(Clone)]
pub struct WorkerNats {
    pub client: async_nats::Client,
    pub js: Context,
    pub workflows: kv::Store,
    /// The NATS user heartbeats go out under (`_` when unknown).
    pub user: String,
}

impl From<Nats> for WorkerNats {
    fn from(n: Nats) -> Self {
        WorkerNats {
            client: n.client,
            js: n.js,
            workflows: n.workflows,
            user: n.user,
        }
    }
}

impl WorkerNats {
    /// Binds the workflows bucket, creating nothing.
    pub async fn bind(client: async_nats::Client) -> Result<Self, SetupError> {
        let js = context(client.clone());
        let workflows = js
            .get_key_value(WORKFLOWS_BUCKET)
            .await
            .map_err(|e| SetupError::Missing(format!("{WORKFLOWS_BUCKET}: {e}")))?;
        Ok(WorkerNats {
            client,
            js,
            workflows,
            user: "_".into(),
        })
    }

    /// This handle, saying it is `user`'s (the name heartbeats carry).
    pub fn with_user(mut self, user: Option<&str>) -> Self {
        self.user = user_token(user);
        self
    }

    /// See [`Nats::max_payload`].
    pub fn max_payload(&self) -> usize {
        max_payload(&self.client)
    }

    /// See [`Nats::workflow`].
    pub async fn workflow(&self, name: &str) -> Result<Option<Workflow>, SetupError> {
        read_workflow(&self.workflows, name).await
    }

    /// The existing consumer of a step in one cell's work queue (consumer
    /// info only).
    pub async fn step_consumer(
        &self,
        cell: u32,
        workflow: &str,
        step: &str,
    ) -> Result<consumer::PullConsumer, String> {
        self.js
            .get_consumer_from_stream(step_consumer(workflow, step), tasks_stream(cell))
            .await
            .map_err(|e| e.to_string())
    }

    /// Creates the step's consumer in one cell's work queue (for a user
    /// allowed to: a worker that runs with the manager role, as in `fanjet
    /// dev`).
    pub async fn ensure_cell_step_consumer(
        &self,
        cell: u32,
        workflow: &str,
        step: &Step,
    ) -> Result<consumer::PullConsumer, SetupError> {
        create_cell_step_consumer(&self.js, cell, workflow, step).await
    }
}

/// The task token key: the stored one, or a new one stored by whichever
/// manager comes first.
async fn task_key(keys: &kv::Store) -> Result<TaskKey, SetupError> {
    let err = |e: &dyn std::fmt::Display| SetupError::Key(e.to_string());
    for _ in 0..2 {
        if let Some(bytes) = keys.get(TASK_KEY).await.map_err(|e| err(&e))? {
            return TaskKey::from_bytes(&bytes)
                .ok_or_else(|| err(&format!("the stored key is {} bytes, not 32", bytes.len())));
        }
        let fresh = TaskKey::generate();
        match keys
            .create(TASK_KEY, bytes::Bytes::copy_from_slice(fresh.as_bytes()))
            .await
        {
            Ok(_) => return Ok(fresh),
            // Another manager stored one first: read it.
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => continue,
            Err(e) => return Err(err(&e)),
        }
    }
    Err(err(&"the key was created and is not readable"))
}

/// The object store of large results, created on first use.
async fn results_bucket(
    js: &Context,
    replicas: usize,
) -> Result<object_store::ObjectStore, SetupError> {
    if let Ok(store) = js.get_object_store(RESULTS_BUCKET).await {
        return Ok(store);
    }
    js.create_object_store(object_store::Config {
        bucket: RESULTS_BUCKET.into(),
        description: Some("fanjet: results too large to travel in their event".into()),
        max_age: EVENTS_MAX_AGE,
        storage: stream::StorageType::File,
        num_replicas: replicas,
        ..Default::default()
    })
    .await
    .map_err(|e| SetupError::Results(e.to_string()))
}

/// Replicas for new streams and buckets: `FANJET_REPLICAS`, else 1.
pub fn replicas_from_env() -> usize {
    std::env::var("FANJET_REPLICAS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
}

/// The JetStream context every command uses.
fn context(client: async_nats::Client) -> Context {
    jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(10))
        .max_ack_inflight(4096)
        .backpressure_on_inflight(true)
        .build(client)
}
