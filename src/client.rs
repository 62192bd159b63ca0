//! What a client does, shared by the CLI and the HTTP API: submit a job,
//! cancel it, read its events.

use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::pull::OrderedConfig;
use async_nats::jetstream::consumer::DeliverPolicy;
use futures::StreamExt;
use serde::Serialize;
use serde_json::{json, Value};
use thiserror::Error;

use crate::machine::{Job, JobState, StepState};
use crate::protocol::{
    customer_submit_subject, encode_json, event_subject, job_events_filter, now_ms, status_subject,
    submit_subject, validate_token, CancelRequested, Event, EventKind, Submission, SubmitReply,
};
use crate::setup::Nats;
use crate::store::{self, StoreError};

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("no fanjet manager is running (start `fanjet manager` or `fanjet dev`)")]
    NoManager,
    #[error("no answer from a fanjet manager within {0:?}")]
    Timeout(Duration),
    #[error("no job {0:?}")]
    NoSuchJob(String),
    #[error("job {job_id} has already ended ({state})")]
    Ended { job_id: String, state: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("NATS: {0}")]
    Nats(String),
}

/// Submits a job through the intake; waits up to 5 s for a manager to come up.
pub async fn submit(
    nats: &Nats,
    workflow: &str,
    sub: &Submission,
) -> Result<SubmitReply, ClientError> {
    let body = encode_json(sub).map_err(|e| ClientError::Nats(e.to_string()))?;
    // A customer that is a subject token goes on the tenant-scoped subject,
    // which is what a submitter's permissions allow.
    let subject = match sub.customer.as_deref() {
        Some(c) if validate_token("customer", c).is_ok() => customer_submit_subject(workflow, c),
        _ => submit_subject(workflow),
    };
    let start = Instant::now();
    let wait = Duration::from_secs(10);
    loop {
        let answer = tokio::time::timeout(wait, nats.client.request(subject.clone(), body.clone()))
            .await
            .map_err(|_| ClientError::Timeout(wait))?;
        match answer {
            Ok(msg) => {
                return serde_json::from_slice(&msg.payload).map_err(|e| {
                    ClientError::Nats(format!("unreadable answer from the manager: {e}"))
                })
            }
            Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => {
                if start.elapsed() > Duration::from_secs(5) {
                    return Err(ClientError::NoManager);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(ClientError::Nats(format!("submitting: {e}"))),
        }
    }
}

/// Asks the manager to cancel a running job.
pub async fn cancel(nats: &Nats, job_id: &str, reason: Option<String>) -> Result<(), ClientError> {
    // A job just accepted (not yet checkpointed) can be cancelled too: the
    // request follows its JobRequested in the log.
    let job = status(nats, job_id)
        .await?
        .ok_or_else(|| ClientError::NoSuchJob(job_id.to_string()))?;
    if job.state.is_terminal() {
        return Err(ClientError::Ended {
            job_id: job_id.to_string(),
            state: job.state.as_str().to_string(),
        });
    }
    let event = Event::CancelRequested(CancelRequested {
        job_id: job_id.to_string(),
        reason,
        at: now_ms(),
    });
    let body = encode_json(&event).map_err(|e| ClientError::Nats(e.to_string()))?;
    nats.js
        .publish(event.subject(), body)
        .await
        .map_err(|e| ClientError::Nats(e.to_string()))?
        .await
        .map_err(|e| ClientError::Nats(e.to_string()))?;
    Ok(())
}

/// A job's status: its record, or, in the moment between its acceptance and
/// the manager's first checkpoint, a `requested` stub built from the log.
pub async fn status(nats: &Nats, job_id: &str) -> Result<Option<Job>, ClientError> {
    if let Some((job, _)) = store::get(nats, job_id).await? {
        return Ok(Some(job));
    }
    if crate::protocol::validate_token("job id", job_id).is_err() {
        return Ok(None);
    }
    let subject = event_subject(job_id, EventKind::JobRequested.token());
    let Ok(msg) = nats.events.get_last_raw_message_by_subject(&subject).await else {
        return Ok(None);
    };
    let Ok(Event::JobRequested(req)) = serde_json::from_slice::<Event>(&msg.payload) else {
        return Ok(None);
    };
    let mut job = Job::rejected(
        &req.job_id,
        Some(&req.workflow),
        req.customer.clone(),
        String::new(),
        req.at,
    );
    job.state = JobState::Requested;
    job.error = None;
    job.finished_at = None;
    Ok(Some(job))
}

/// A job's detailed status through the status service, as a customer sees
/// it (for users whose permissions allow only `fanjet.status.<customer>.>`).
pub async fn status_as(
    nats: &Nats,
    customer: &str,
    job_id: &str,
) -> Result<Option<Job>, ClientError> {
    let msg = tokio::time::timeout(
        Duration::from_secs(10),
        nats.client
            .request(status_subject(customer, job_id), "".into()),
    )
    .await
    .map_err(|_| ClientError::Timeout(Duration::from_secs(10)))?
    .map_err(|e| match e.kind() {
        async_nats::RequestErrorKind::NoResponders => ClientError::NoManager,
        _ => ClientError::Nats(e.to_string()),
    })?;
    let v: Value =
        serde_json::from_slice(&msg.payload).map_err(|e| ClientError::Nats(e.to_string()))?;
    if v.get("error").is_some() {
        return Ok(None);
    }
    serde_json::from_value(v)
        .map(Some)
        .map_err(|e| ClientError::Nats(format!("unreadable status: {e}")))
}

/// One event of a job's history.
#[derive(Debug, Clone, Serialize)]
pub struct LoggedEvent {
    pub seq: u64,
    pub subject: String,
    pub event: Value,
}

/// A job's events from the log in order, from sequence `from_seq`, at most `limit`.
pub async fn events(
    nats: &Nats,
    job_id: &str,
    from_seq: u64,
    limit: usize,
) -> Result<Vec<LoggedEvent>, ClientError> {
    let err = |e: &dyn std::fmt::Display| ClientError::Nats(e.to_string());
    let deliver_policy = if from_seq > 1 {
        DeliverPolicy::ByStartSequence {
            start_sequence: from_seq,
        }
    } else {
        DeliverPolicy::All
    };
    let consumer = nats
        .events
        .create_consumer(OrderedConfig {
            filter_subject: job_events_filter(job_id),
            deliver_policy,
            ..Default::default()
        })
        .await
        .map_err(|e| err(&e))?;
    let mut out = Vec::new();
    let mut msgs = consumer.messages().await.map_err(|e| err(&e))?;
    while out.len() < limit {
        let Ok(Some(next)) = tokio::time::timeout(Duration::from_millis(500), msgs.next()).await
        else {
            break;
        };
        let m = next.map_err(|e| err(&e))?;
        let info = m.info().map_err(|e| err(&e))?;
        let (seq, pending) = (info.stream_sequence, info.pending);
        out.push(LoggedEvent {
            seq,
            subject: m.subject.to_string(),
            event: serde_json::from_slice(&m.payload).unwrap_or(Value::Null),
        });
        if pending == 0 {
            break;
        }
    }
    Ok(out)
}

/// The detailed status: the job record, with statistics and an ETA per step.
pub fn detailed(job: &Job, stats: Option<&crate::stats::JobStats>, now: u64) -> Value {
    let mut v = serde_json::to_value(job).unwrap_or(Value::Null);
    if let Some(obj) = v.as_object_mut() {
        obj.remove("definition");
        obj.remove("requested_seq");
        obj.remove("applied_seq");
        // Which manager drives the job: the holder of this partition's lease
        // (`fanjet processes`).
        obj.insert(
            "partition".into(),
            json!(crate::protocol::partition(&job.job_id)),
        );
    }
    if let Some(steps) = v.get_mut("steps").and_then(Value::as_array_mut) {
        for (i, sv) in steps.iter_mut().enumerate() {
            let Some(step) = job.steps.get(i) else {
                continue;
            };
            let Some(o) = sv.as_object_mut() else {
                continue;
            };
            o.remove("source");
            o.remove("output_seq");
            o.remove("output_len");
            if let Some(st) = stats.and_then(|s| s.steps.get(i)) {
                o.insert("stats".into(), st.summary(now));
            }
            if step.state == StepState::Running {
                let mean_ms = stats
                    .and_then(|s| s.steps.get(i))
                    .and_then(|st| st.duration_sum_ms.checked_div(st.completed));
                if let Some(c) = capacity(
                    step.total,
                    step.completed + step.failed,
                    step.started_at.unwrap_or(now),
                    now,
                    mean_ms,
                    job.deadline_at,
                ) {
                    o.insert(
                        "capacity".into(),
                        serde_json::to_value(c).unwrap_or(Value::Null),
                    );
                }
                let done = step.completed + step.failed;
                let elapsed = now.saturating_sub(step.started_at.unwrap_or(now)).max(1);
                if done > 0 {
                    let rate = done as f64 / (elapsed as f64 / 1000.0);
                    let eta_ms = ((step.total.saturating_sub(done)) as f64 / rate * 1000.0) as u64;
                    o.insert("throughput_per_s".into(), json!(rate));
                    o.insert("eta_ms".into(), json!(eta_ms));
                    o.insert("eta_at".into(), json!(now + eta_ms));
                }
            }
        }
    }
    v
}

/// What a running fanout step needs to finish on time.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Capacity {
    /// When the step will end at the throughput seen so far.
    pub predicted_finish_at: Option<u64>,
    /// The job's deadline, if it has one.
    pub deadline_at: Option<u64>,
    /// Worker slots busy all the time until the deadline that the rest of
    /// the step needs (from the mean subjob duration).
    pub slots_needed: Option<u64>,
    /// Mean duration of a successful subjob so far, in ms.
    pub mean_subjob_ms: Option<u64>,
}

/// Predicts a step's end from its progress, and the slots its deadline
/// needs from the mean subjob duration: the figure an autoscaler wants.
pub fn capacity(
    total: u64,
    done: u64,
    started_at: u64,
    now: u64,
    mean_ms: Option<u64>,
    deadline_at: Option<u64>,
) -> Option<Capacity> {
    let remaining = total.saturating_sub(done);
    let elapsed = now.saturating_sub(started_at);
    let predicted_finish_at = (done > 0 && elapsed > 0)
        .then(|| now + (remaining as f64 * elapsed as f64 / done as f64) as u64);
    let slots_needed = match (deadline_at, mean_ms) {
        (Some(deadline), Some(mean)) => {
            let left = deadline.saturating_sub(now).max(1);
            Some(
                (remaining * mean)
                    .div_ceil(left)
                    .max(u64::from(remaining > 0)),
            )
        }
        _ => None,
    };
    if predicted_finish_at.is_none() && slots_needed.is_none() {
        return None;
    }
    Some(Capacity {
        predicted_finish_at,
        deadline_at,
        slots_needed,
        mean_subjob_ms: mean_ms,
    })
}

/// A live manager: the partitions it leases, and what its heartbeat said.
#[derive(Debug, Clone, Serialize, serde::Deserialize, schemars::JsonSchema)]
pub struct ManagerView {
    pub id: String,
    /// Partitions of the event log it reads (from the lease bucket).
    pub partitions: Vec<u32>,
    /// Jobs it holds as running (from its heartbeat; none heard yet: null).
    pub jobs: Option<u64>,
    /// Milliseconds since its last heartbeat (none heard yet: null).
    pub seen_ms_ago: Option<u64>,
}

/// A live worker process, from its heartbeat.
#[derive(Debug, Clone, Serialize, serde::Deserialize, schemars::JsonSchema)]
pub struct WorkerView {
    pub id: String,
    pub slots: u64,
    pub busy: u64,
    pub seen_ms_ago: u64,
}

/// Who runs: managers with their partitions, workers with their slots.
#[derive(Debug, Clone, Serialize, serde::Deserialize, schemars::JsonSchema)]
pub struct Processes {
    pub managers: Vec<ManagerView>,
    pub workers: Vec<WorkerView>,
    /// Partitions no manager holds: their jobs wait (normal for a few
    /// seconds after a manager died, until its leases expire).
    pub unowned_partitions: Vec<u32>,
    /// Set when the lease bucket could not be read (partitions unknown).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leases_error: Option<String>,
}

/// Builds the process list from the lease bucket and heartbeats heard
/// (`monitor::live()` in `fanjet serve`, `monitor::listen` elsewhere).
pub async fn processes(
    nats: &Nats,
    beats: Vec<(Duration, crate::monitor::Heartbeat)>,
) -> Processes {
    use std::collections::BTreeMap;
    let ms = |d: Duration| d.as_millis() as u64;
    let mut managers: BTreeMap<String, ManagerView> = BTreeMap::new();
    let mut workers = Vec::new();
    for (ago, hb) in beats {
        match hb.role.as_str() {
            "manager" => {
                managers.insert(
                    hb.id.clone(),
                    ManagerView {
                        id: hb.id,
                        partitions: Vec::new(),
                        jobs: Some(hb.jobs),
                        seen_ms_ago: Some(ms(ago)),
                    },
                );
            }
            "worker" => workers.push(WorkerView {
                id: hb.id,
                slots: hb.slots,
                busy: hb.busy,
                seen_ms_ago: ms(ago),
            }),
            _ => {}
        }
    }
    let leases = match crate::leases::bucket(nats).await {
        Ok(kv) => crate::leases::holders(&kv).await,
        Err(e) => Err(e),
    };
    // A manager in the lease bucket whose heartbeat was not heard (yet).
    let unheard = |id: &str| ManagerView {
        id: id.to_string(),
        partitions: Vec::new(),
        jobs: None,
        seen_ms_ago: None,
    };
    let (unowned_partitions, leases_error) = match leases {
        Ok((held, members)) => {
            for id in members {
                managers.entry(id.clone()).or_insert_with(|| unheard(&id));
            }
            for (p, id) in &held {
                managers
                    .entry(id.clone())
                    .or_insert_with(|| unheard(id))
                    .partitions
                    .push(*p);
            }
            let unowned = (0..crate::protocol::PARTITIONS)
                .filter(|p| !held.contains_key(p))
                .collect();
            (unowned, None)
        }
        Err(e) => (Vec::new(), Some(e.to_string())),
    };
    workers.sort_by(|a, b| a.id.cmp(&b.id));
    Processes {
        managers: managers.into_values().collect(),
        workers,
        unowned_partitions,
        leases_error,
    }
}
