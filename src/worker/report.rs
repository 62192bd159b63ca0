//! Reports a worker's completions to the log, several in one event when
//! several are ready at once.
//!
//! Each completion stored on the log costs the server a publish, its
//! acknowledgement, a delivery to the partition's reader and that reader's
//! ack. A busy worker of small subjobs finishes many of one job's step at
//! the same moment; reported together (a `SubjobsCompleted`), they cost one
//! of each. Nothing waits to be grouped: the reporter sends what is ready
//! as soon as the previous send is stored, so an idle worker reports each
//! completion alone and at once, and a busy one groups what finished while
//! its previous report was on its way. Each task is acknowledged only after
//! its completion is stored, as when reported alone. Each cell's
//! completions go through a reporter of their own: a cell's log electing a
//! leader holds up no other cell's reports.

use std::collections::HashMap;
use std::sync::Arc;

use async_nats::jetstream::{AckKind, Message};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::warn;

use super::{json_len, send};
use crate::nats::log::{self, LogError};
use crate::nats::WorkerNats;
use crate::protocol::{job_cell, Completion, Event, SubjobCompleted, SubjobsCompleted, CELLS};

/// Completions in one report at most.
const MAX_GROUP: usize = 256;
/// Bytes an outcome adds to a report besides its result (index, attempt,
/// duration, token and their names), an upper bound.
const OUTCOME_OVERHEAD: usize = 160;

/// A completion waiting to be reported, with its task's message.
struct Ready {
    done: SubjobCompleted,
    msg: Message,
    /// Told once the completion is stored and its task acknowledged (or
    /// left to come back after its ack deadline).
    settled: oneshot::Sender<()>,
}

impl Ready {
    /// Reports the completion alone (its own `SubjobCompleted`), acks its
    /// task, and says so.
    async fn alone(self, nats: &WorkerNats, max_payload: usize) {
        let event = Some(Event::SubjobCompleted(self.done));
        // Boxed: a send's state is large, and it would size every report.
        Box::pin(send(nats, &self.msg, event, AckKind::Ack, max_payload)).await;
        let _ = self.settled.send(());
    }
}

/// The handle through which a worker's tasks report completions.
#[derive(Clone)]
pub(super) struct Reporter {
    /// One reporting loop per cell (index = cell).
    tx: Vec<mpsc::Sender<Ready>>,
    nats: Arc<WorkerNats>,
}

impl Reporter {
    /// Starts the reporting loops, one per cell; they end once every handle
    /// is dropped and what was handed to them is reported.
    pub(super) fn start(nats: Arc<WorkerNats>, slots: usize) -> (Self, JoinHandle<()>) {
        let mut tx = Vec::new();
        let mut loops = Vec::new();
        for _ in 0..CELLS {
            let (t, rx) = mpsc::channel(slots.max(1));
            tx.push(t);
            loops.push(tokio::spawn(run(nats.clone(), rx)));
        }
        let reporting = tokio::spawn(async move {
            for l in loops {
                let _ = l.await;
            }
        });
        (Reporter { tx, nats }, reporting)
    }

    /// Reports `done` and acknowledges `msg` once it is stored; returns
    /// when that is done (or failed: the task then comes back). Without a
    /// running reporter, reports it alone.
    pub(super) async fn report(&self, done: SubjobCompleted, msg: Message) {
        let (settled, wait) = oneshot::channel();
        let tx = &self.tx[job_cell(&done.job_id) as usize];
        let ready = Ready { done, msg, settled };
        match tx.send(ready).await {
            Ok(()) => {
                let _ = wait.await;
            }
            Err(mpsc::error::SendError(r)) => r.alone(&self.nats, self.nats.max_payload()).await,
        }
    }
}

async fn run(nats: Arc<WorkerNats>, mut rx: mpsc::Receiver<Ready>) {
    let max_payload = nats.max_payload();
    while let Some(first) = rx.recv().await {
        let mut ready = vec![first];
        while ready.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(r) => ready.push(r),
                Err(_) => break,
            }
        }
        let reports = group(ready, max_payload / 2, |r| {
            let d = &r.done;
            let size = json_len(&d.result).saturating_add(OUTCOME_OVERHEAD);
            ((d.job_id.clone(), d.step_index, d.run), d.index, size)
        });
        futures::future::join_all(reports.into_iter().map(|g| report(&nats, g, max_payload))).await;
    }
}

/// Splits what is ready into reports: one per job, step and run (`what`
/// gives an item's, its subjob and its size), each holding a subjob once and
/// staying under `budget` bytes.
fn group<T>(
    ready: Vec<T>,
    budget: usize,
    what: impl Fn(&T) -> ((String, usize, u32), u64, usize),
) -> Vec<Vec<T>> {
    let mut reports: Vec<(Vec<T>, Vec<u64>, usize)> = Vec::new();
    let mut open: HashMap<(String, usize, u32), usize> = HashMap::new();
    for r in ready {
        let (key, index, size) = what(&r);
        let at = open.get(&key).copied().filter(|&at| {
            let (g, indices, bytes) = &reports[at];
            g.len() < MAX_GROUP && bytes.saturating_add(size) <= budget && !indices.contains(&index)
        });
        match at {
            Some(at) => {
                let (g, indices, bytes) = &mut reports[at];
                g.push(r);
                indices.push(index);
                *bytes += size;
            }
            None => {
                open.insert(key, reports.len());
                reports.push((vec![r], vec![index], size));
            }
        }
    }
    reports.into_iter().map(|(g, _, _)| g).collect()
}

/// Stores one report and acknowledges its tasks; a report of one is the
/// completion's own `SubjobCompleted`.
async fn report(nats: &WorkerNats, mut g: Vec<Ready>, max_payload: usize) {
    if g.len() == 1 {
        return g.remove(0).alone(nats, max_payload).await;
    }
    let head = &g[0].done;
    let event = Event::SubjobsCompleted(SubjobsCompleted {
        job_id: head.job_id.clone(),
        step_index: head.step_index,
        run: head.run,
        outcomes: g
            .iter()
            .map(|r| Completion {
                index: r.done.index,
                attempt: r.done.attempt,
                result: r.done.result.clone(),
                duration_ms: r.done.duration_ms,
                token: r.done.token.clone(),
            })
            .collect(),
    });
    let stored = match log::encode(&event, max_payload) {
        Ok(payload) => {
            log::append_retrying(&nats.js, &event, payload, log::OUTCOME_APPEND_FOR).await
        }
        // The sizes are reckoned from above, so this should not happen; were
        // it to, each goes alone rather than coming back for ever.
        Err(LogError::TooLarge { .. }) => {
            for r in g {
                r.alone(nats, max_payload).await;
            }
            return;
        }
        Err(e) => Err(e),
    };
    match stored {
        Ok(_) => {
            for r in g {
                if let Err(e) = r.msg.ack_with(AckKind::Ack).await {
                    warn!(job_id = %r.done.job_id, index = r.done.index, error = %e, "could not ack a task");
                }
                let _ = r.settled.send(());
            }
        }
        Err(e) => {
            // Not acknowledged: the tasks come back after their deadline.
            warn!(job_id = %head.job_id, outcomes = g.len(), error = %e, "could not report completions");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Item = (&'static str, usize, u32, u64);

    fn groups(ready: &[Item], budget: usize) -> Vec<Vec<Item>> {
        group(ready.to_vec(), budget, |&(job, step, run, index)| {
            ((job.to_string(), step, run), index, 100)
        })
    }

    #[test]
    fn reports_keep_jobs_steps_and_runs_apart_and_each_subjob_once() {
        let ready = [
            ("a", 1, 0, 0),
            ("a", 1, 0, 1),
            ("b", 1, 0, 0),
            ("a", 2, 0, 0),
            ("a", 1, 1, 2),
            ("a", 1, 0, 1), // the same subjob again: a report of its own
            ("a", 1, 0, 3),
        ];
        assert_eq!(
            groups(&ready, usize::MAX),
            vec![
                vec![("a", 1, 0, 0), ("a", 1, 0, 1)],
                vec![("b", 1, 0, 0)],
                vec![("a", 2, 0, 0)],
                vec![("a", 1, 1, 2)],
                vec![("a", 1, 0, 1), ("a", 1, 0, 3)],
            ]
        );
    }

    #[test]
    fn a_report_closes_at_its_byte_budget_or_its_size() {
        let many: Vec<Item> = (0..10).map(|i| ("a", 1, 0, i)).collect();
        let sizes = |g: Vec<Vec<Item>>| g.iter().map(Vec::len).collect::<Vec<_>>();
        assert_eq!(sizes(groups(&many, 300)), [3, 3, 3, 1]);
        assert_eq!(
            sizes(groups(&many, 99)),
            [1; 10],
            "one alone even past the budget"
        );
        let more: Vec<Item> = (0..600).map(|i| ("a", 1, 0, i)).collect();
        assert_eq!(sizes(groups(&more, usize::MAX)), [MAX_GROUP, MAX_GROUP, 88]);
    }
}
