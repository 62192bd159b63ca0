//! The results service: a worker working on a job reads the results of
//! one of its steps (the step after a fanout reads the fanout's), although
//! the worker role may not read the log. It asks `fanjet.results.<job_id>`
//! with the token of a task of that job ([`ResultsRequest`]), which proves
//! it was given one; the manager checks the token, reads the results as
//! `fanjet results` does ([`ResultsReader`]: each subjob once, a million in
//! bounded memory) and answers page by page ([`ResultsPage`]). First pages
//! are shared by the intake's queue group; the rest of a reading is served
//! by the manager that began it, on a subject of its own, for a minute
//! after each page.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::ManagerError;
use crate::nats::log::{LogError, ResultsReader};
use crate::nats::{store, Nats};
use crate::protocol::{
    encode_json, results_page_subject, results_pages_wildcard, Counted, ResultsPage,
    ResultsRequest, INTAKE_QUEUE, RESULTS_WILDCARD,
};

/// How long a reading waits for its next page request.
const IDLE: Duration = Duration::from_secs(60);
/// Most readings one manager keeps open at once.
const MAX_SESSIONS: usize = 256;

/// One reading under way.
struct Session {
    reader: ResultsReader,
    /// Lines read from the log and not yet sent.
    queued: VecDeque<Value>,
    used: Instant,
}

/// Answers results requests until `cancel`.
pub async fn run(
    nats: Nats,
    manager: String,
    cancel: CancellationToken,
) -> Result<(), ManagerError> {
    let err = |e: async_nats::SubscribeError| {
        ManagerError::Nats(format!("subscribing to results requests: {e}"))
    };
    let mut firsts = nats
        .client
        .queue_subscribe(RESULTS_WILDCARD, INTAKE_QUEUE.into())
        .await
        .map_err(err)?;
    let mut nexts = nats
        .client
        .subscribe(results_pages_wildcard(&manager))
        .await
        .map_err(err)?;
    let mut sessions: HashMap<String, Session> = HashMap::new();
    loop {
        let (msg, page) = tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            Some(msg) = firsts.next() => {
                sessions.retain(|_, s| s.used.elapsed() < IDLE);
                let page = begin(&nats, &manager, &mut sessions, &msg).await;
                (msg, page)
            }
            Some(msg) = nexts.next() => {
                let session = msg.subject.rsplit('.').next().unwrap_or_default().to_string();
                let page = match sessions.remove(&session) {
                    Some(s) => serve(&nats, &manager, &mut sessions, session, s).await,
                    None => refusal("expired", "no such reading (it was idle for a minute, or its manager restarted): ask for the first page again".into()),
                };
                (msg, page)
            }
            else => return Ok(()),
        };
        if let Some(to) = msg.reply {
            match encode_json(&page) {
                Ok(body) => {
                    if let Err(e) = nats.client.publish(to, body).await {
                        warn!(error = %e, "could not answer a results request");
                    }
                }
                Err(e) => warn!(error = %e, "could not encode a results page"),
            }
        }
    }
}

fn refusal(code: &str, message: String) -> ResultsPage {
    ResultsPage {
        ok: false,
        results: Vec::new(),
        next: None,
        error: Some(json!({"code": code, "message": message})),
    }
}

/// A first page: the request checked, a reading begun.
async fn begin(
    nats: &Nats,
    manager: &str,
    sessions: &mut HashMap<String, Session>,
    msg: &async_nats::Message,
) -> ResultsPage {
    let job_id = msg.subject.rsplit('.').next().unwrap_or_default();
    let req: ResultsRequest = match serde_json::from_slice(&msg.payload) {
        Ok(r) => r,
        Err(e) => return refusal("malformed_payload", e.to_string()),
    };
    let Some(key) = &nats.task_key else {
        return refusal("unavailable", "this manager has no task key".into());
    };
    // The token of a task of this job: its holder works on it.
    let holds = match req.batch_size {
        Some(size) => {
            key.verify_batch(job_id, req.step_index, req.index, size, req.run, &req.token)
        }
        None => key.verify(job_id, req.step_index, req.index, req.run, &req.token),
    };
    if !holds {
        return refusal(
            "forbidden",
            format!("the token is not that of a task of job {job_id:?}"),
        );
    }
    // The token was made for this job, so it exists; its record may not
    // be stored yet (a job that just started: checkpoints lag the log by
    // up to half a second).
    let job = match store::get(nats, job_id).await {
        Ok(Some((job, _))) => job,
        Ok(None) => {
            return refusal(
                "unavailable",
                format!("job {job_id} has no stored record yet; ask again shortly"),
            )
        }
        Err(e) => return refusal("unavailable", e.to_string()),
    };
    // A redriven job's record is stored a moment after its new run began:
    // read with a record still of an earlier run, the results would miss
    // the new run's outcomes.
    if job.run < req.run {
        return refusal(
            "unavailable",
            format!(
                "job {job_id}'s stored record is of run {}, the task of run {}; ask again shortly",
                job.run, req.run
            ),
        );
    }
    if req.step >= job.steps.len() {
        return refusal(
            "no_such_step",
            format!("job {job_id} has {} steps (from 0)", job.steps.len()),
        );
    }
    if sessions.len() >= MAX_SESSIONS {
        return refusal(
            "unavailable",
            "too many readings under way; try again shortly".into(),
        );
    }
    let session = Session {
        reader: ResultsReader::new(nats, &job, req.step, nats.task_key.clone()),
        queued: VecDeque::new(),
        used: Instant::now(),
    };
    let id = ulid::Ulid::new().to_string().to_lowercase();
    serve(nats, manager, sessions, id, session).await
}

/// The next page of a reading, about half the server's largest message;
/// the reading is kept while more follow.
async fn serve(
    nats: &Nats,
    manager: &str,
    sessions: &mut HashMap<String, Session>,
    id: String,
    mut session: Session,
) -> ResultsPage {
    let budget = nats.max_payload() / 2;
    match fill(&mut session, budget).await {
        Ok((results, more)) => {
            let next = more.then(|| results_page_subject(manager, &id));
            if more {
                session.used = Instant::now();
                sessions.insert(id, session);
            }
            ResultsPage {
                ok: true,
                results,
                next,
                error: None,
            }
        }
        Err(e) => refusal("unavailable", e.to_string()),
    }
}

/// Lines up to `budget` bytes (at least one), and whether more follow.
async fn fill(session: &mut Session, budget: usize) -> Result<(Vec<Value>, bool), LogError> {
    let mut out = Vec::new();
    let mut bytes = 0;
    loop {
        while let Some(line) = session.queued.front() {
            let n = serde_json::to_vec(line).map_or(0, |b| b.len()) + 1;
            if bytes + n > budget && !out.is_empty() {
                return Ok((out, true));
            }
            bytes += n;
            out.extend(session.queued.pop_front());
        }
        match session.reader.next_page().await? {
            Some(page) => session.queued.extend(page.iter().map(Counted::to_json)),
            None => return Ok((out, false)),
        }
    }
}
