//! The index consumer: keeps the job index ([`crate::protocol::index`])
//! from the log, reading only the events that change a job's state.
//!
//! For each job whose summary a batch of events changes it writes the new
//! entry, deletes the old one, then stores where the new one is; the batch
//! is acknowledged after all of them. Read again after a restart, an event
//! changes nothing (each summary carries the log sequence it reflects). A
//! crash between writing an entry and storing its place would leave the
//! entry behind, counted twice: writing it again within the index
//! stream's duplicate window is answered with the first one, and after
//! that, the first batch looks for entries written since the last batch
//! began (its start is stored, with the server's time) before writing.
//!
//! Jobs recorded before the index existed are indexed from their records
//! once, when the consumer first runs.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::kv;
use futures::{StreamExt, TryStreamExt};
use thiserror::Error;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::nats::index::{self as idx, IndexError};
use crate::nats::leases::{Fence, Fenced};
use crate::nats::log::{stream_seq, Batch, LogError, Reader};
use crate::nats::store::{self, StoreError};
use crate::nats::{Nats, DUPLICATE_WINDOW};
use crate::protocol::{
    change, kind_filter, now_ms, Event, EventKind, IndexPosition, JobSummary, Millis, CELLS,
    INDEXED_KINDS, INDEX_BACKFILLED_KEY, INDEX_BUCKET, INDEX_CONSUMER,
};
use crate::shutdown::supervise;

#[derive(Debug, Error)]
pub enum IndexerError {
    #[error(transparent)]
    Log(#[from] LogError),
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("NATS: {0}")]
    Nats(String),
    #[error(transparent)]
    Fenced(#[from] Fenced),
}

/// Events read at once.
const BATCH: usize = 1000;
/// Jobs whose entries are written at once.
const WRITES_IN_FLIGHT: usize = 64;
/// The key that holds when the last batch began (the server's time of
/// its write).
const WRITING_KEY: &str = "index.writing";

/// Runs the index consumer until `cancel`. With a `fence` (the lease of
/// the one index consumer), every write is made only while the lease is
/// certainly held: a consumer frozen past its lease while another took
/// over would otherwise write entries from summaries read before.
pub async fn run(
    nats: Nats,
    cancel: CancellationToken,
    fence: Option<Fence>,
) -> Result<(), IndexerError> {
    let positions = nats
        .js
        .get_key_value(INDEX_BUCKET)
        .await
        .map_err(|e| IndexerError::Nats(format!("opening bucket {INDEX_BUCKET}: {e}")))?;
    backfill(&nats, &positions, &cancel, &fence).await?;
    let filters = INDEXED_KINDS
        .iter()
        .map(|k| kind_filter(k.token()))
        .collect::<Vec<_>>();
    info!("index consumer running");
    // A reader per cell, each started again alone when it fails: a cell's
    // log electing a leader holds up none of the others.
    let mut cells = JoinSet::new();
    for cell in 0..CELLS {
        let (n, p, f, c, filters) = (
            nats.clone(),
            positions.clone(),
            fence.clone(),
            cancel.clone(),
            filters.clone(),
        );
        cells.spawn(supervise("job index", cancel.clone(), move || {
            run_cell(
                n.clone(),
                p.clone(),
                cell,
                filters.clone(),
                c.clone(),
                f.clone(),
            )
        }));
    }
    while cells.join_next().await.is_some() {}
    Ok(())
}

/// Indexes one cell's log until `cancel`.
async fn run_cell(
    nats: Nats,
    positions: kv::Store,
    cell: u32,
    filters: Vec<String>,
    cancel: CancellationToken,
    fence: Option<Fence>,
) -> Result<(), IndexerError> {
    loop {
        // Where the writer before stopped: entries it wrote after this
        // may have no position stored.
        let since = last_batch_start(&positions).await?;
        let mut reader = Reader::open(
            &nats,
            cell,
            INDEX_CONSUMER,
            filters.clone(),
            BATCH,
            "index",
            fence.as_ref(),
        )
        .await?;
        let mut look_first = since;
        loop {
            let batch = tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                b = reader.next_batch() => b?,
            };
            let Batch { messages, hole } = batch;
            if !messages.is_empty() {
                checked(&fence)?;
                positions
                    .put(WRITING_KEY, Default::default())
                    .await
                    .map_err(|e| IndexerError::Nats(format!("marking a batch: {e}")))?;
                apply(&nats, &positions, &messages, look_first.take(), &fence).await?;
                if let Some(last) = messages.last() {
                    checked(&fence)?;
                    last.ack()
                        .await
                        .map_err(|e| IndexerError::Nats(e.to_string()))?;
                }
            }
            if let Some(hole) = hole {
                debug!(%hole, "index: reading again from the last acknowledged event");
                break;
            }
        }
    }
}

/// When the last batch of the writer before began, if that is longer ago
/// than the duplicate window remembers (less a margin): its writes without
/// a stored position must then be looked for.
async fn last_batch_start(positions: &kv::Store) -> Result<Option<Millis>, IndexerError> {
    let entry = positions
        .entry(WRITING_KEY)
        .await
        .map_err(|e| IndexerError::Nats(format!("reading {WRITING_KEY}: {e}")))?;
    let Some(entry) = entry else {
        return Ok(None);
    };
    let began = (entry.created.unix_timestamp_nanos() / 1_000_000).max(0) as Millis;
    let remembered = DUPLICATE_WINDOW.saturating_sub(Duration::from_secs(30));
    let long_ago = now_ms().saturating_sub(began) > remembered.as_millis() as Millis;
    // A second of margin for the clocks of different servers.
    Ok(long_ago.then(|| began.saturating_sub(1000)))
}

/// What a batch changes for one job.
struct Changed {
    /// Where its entry was (`None`: it had none).
    old: Option<u64>,
    summary: JobSummary,
}

/// Applies a batch of events in log order, then writes each changed job's
/// entry (many jobs at once, one job's writes in order).
async fn apply(
    nats: &Nats,
    positions: &kv::Store,
    messages: &[async_nats::jetstream::Message],
    look_since: Option<Millis>,
    fence: &Option<Fence>,
) -> Result<(), IndexerError> {
    // Each job's summary as the batch goes on (None: not indexed), read
    // for all of the batch's jobs at once.
    let mut events = Vec::with_capacity(messages.len());
    for msg in messages {
        let Ok(event) = serde_json::from_slice::<Event>(&msg.payload) else {
            warn!(subject = %msg.subject, "index: skipping an unreadable event");
            continue;
        };
        if !event.is_stored_on(&msg.subject) {
            debug!(subject = %msg.subject, "index: skipping a misplaced event");
            continue;
        }
        events.push((stream_seq(msg), event));
    }
    let mut first: HashMap<&str, &Event> = HashMap::new();
    for (_, e) in &events {
        first.entry(e.job_id()).or_insert(e);
    }
    let reads: Vec<_> = first
        .into_iter()
        .map(|(id, e)| async move {
            let current = current(nats, positions, id, e).await?;
            Ok::<_, IndexerError>((id.to_string(), current))
        })
        .collect();
    let mut known: HashMap<String, Option<(Option<u64>, JobSummary)>> =
        futures::stream::iter(reads)
            .buffer_unordered(WRITES_IN_FLIGHT)
            .try_collect()
            .await?;
    let mut changed: HashMap<String, Changed> = HashMap::new();
    for &(seq, ref event) in &events {
        let id = event.job_id().to_string();
        let Some(slot) = known.get_mut(&id) else {
            continue;
        };
        let old_entry = slot.as_ref().and_then(|(e, _)| *e);
        let next = change(slot.as_ref().map(|(_, s)| s), seq, event);
        let Some(next) = next else {
            // A job known from its record only is indexed as it stands.
            if let Some((None, base)) = slot.as_ref() {
                changed.entry(id).or_insert_with(|| Changed {
                    old: None,
                    summary: base.clone(),
                });
            }
            continue;
        };
        changed
            .entry(id.clone())
            .and_modify(|c| c.summary = next.clone())
            .or_insert(Changed {
                old: old_entry,
                summary: next.clone(),
            });
        *slot = Some((old_entry, next));
    }
    let mut changed: Vec<Changed> = changed.into_values().collect();
    changed.sort_by_key(|c| c.summary.seq);
    write(nats, positions, changed, now_ms(), look_since, fence).await
}

/// A job's summary before the batch: from its position, else (a job the
/// index has not seen) from its record, for any event but its first.
async fn current(
    nats: &Nats,
    positions: &kv::Store,
    id: &str,
    event: &Event,
) -> Result<Option<(Option<u64>, JobSummary)>, IndexerError> {
    if let Some(pos) = idx::position(positions, id).await? {
        return Ok(Some((Some(pos.entry), pos.summary)));
    }
    if matches!(
        event.kind(),
        EventKind::JobRequested | EventKind::JobRejected
    ) {
        return Ok(None);
    }
    Ok(store::latest(nats, id)
        .await?
        .map(|(job, _)| (None, JobSummary::of_job(&job))))
}

/// Writes the jobs' new entries in this order (sent one after another,
/// so the index stores them in it), then deletes their old ones and
/// stores where the new ones are (many jobs at once).
async fn write(
    nats: &Nats,
    positions: &kv::Store,
    changed: Vec<Changed>,
    now: Millis,
    look_since: Option<Millis>,
    fence: &Option<Fence>,
) -> Result<(), IndexerError> {
    let mut sent = Vec::with_capacity(changed.len());
    for c in &changed {
        checked(fence)?;
        let found = match look_since {
            Some(since) => idx::find_entry(nats, &c.summary, since).await?,
            None => None,
        };
        sent.push(match found {
            Some(seq) => Sent::Found(seq),
            None => match idx::send_entry(nats, &c.summary, now).await? {
                Some(ack) => Sent::Pending(ack),
                None => Sent::Expired,
            },
        });
    }
    let mut entries = Vec::with_capacity(sent.len());
    for s in sent {
        entries.push(match s {
            Sent::Found(seq) => Some(seq),
            Sent::Pending(ack) => Some(
                ack.await
                    .map_err(|e| IndexerError::Index(IndexError::Write(e.to_string())))?
                    .sequence,
            ),
            Sent::Expired => None,
        });
    }
    futures::stream::iter(changed.into_iter().zip(entries).map(Ok::<_, IndexerError>))
        .try_for_each_concurrent(WRITES_IN_FLIGHT, |(c, entry)| async move {
            checked(fence)?;
            if let Some(old) = c.old.filter(|&old| Some(old) != entry) {
                idx::delete_entry(nats, old).await?;
            }
            match entry {
                Some(entry) => {
                    let pos = IndexPosition {
                        entry,
                        summary: c.summary,
                    };
                    idx::put_position(positions, &pos).await?;
                }
                // Its record has expired: the index forgets it.
                None => {
                    let _ = positions.purge(&c.summary.job_id).await;
                }
            }
            Ok(())
        })
        .await
}

/// Fails when the lease this consumer stands for is not certainly held.
fn checked(fence: &Option<Fence>) -> Result<(), IndexerError> {
    match fence.as_ref().map(Fence::check) {
        Some(Err(e)) => Err(IndexerError::Fenced(e)),
        _ => Ok(()),
    }
}

/// How a job's new entry was written.
enum Sent {
    /// Written before (by a writer that stopped before storing its place).
    Found(u64),
    /// Sent; the server's confirmation comes with its sequence.
    Pending(async_nats::jetstream::context::PublishAckFuture),
    /// Not written: the job's record has expired.
    Expired,
}

/// Indexes, once, every job whose record was written before the index
/// existed (from its record).
async fn backfill(
    nats: &Nats,
    positions: &kv::Store,
    cancel: &CancellationToken,
    fence: &Option<Fence>,
) -> Result<(), IndexerError> {
    let done = positions
        .get(INDEX_BACKFILLED_KEY)
        .await
        .map_err(|e| IndexerError::Nats(format!("reading {INDEX_BACKFILLED_KEY}: {e}")))?;
    if done.is_some() {
        return Ok(());
    }
    let ids = store::job_ids(nats).await?;
    info!(
        jobs = ids.len(),
        "indexing the jobs recorded before the index"
    );
    let now = now_ms();
    for chunk in ids.chunks(BATCH) {
        if cancel.is_cancelled() {
            return Ok(());
        }
        let reads: Vec<_> = chunk
            .iter()
            .map(|id| async move {
                if idx::position(positions, id).await?.is_some() {
                    return Ok::<_, IndexerError>(None);
                }
                Ok(store::get(nats, id).await?.map(|(job, _)| Changed {
                    old: None,
                    summary: JobSummary::of_job(&job),
                }))
            })
            .collect();
        let mut found: Vec<Changed> = futures::stream::iter(reads)
            .buffer_unordered(WRITES_IN_FLIGHT)
            .try_filter_map(|c| async move { Ok(c) })
            .try_collect()
            .await?;
        // Oldest change first, as the log would have written them.
        found.sort_by_key(|c| c.summary.changed_at);
        write(nats, positions, found, now, None, fence).await?;
    }
    if cancel.is_cancelled() {
        return Ok(());
    }
    positions
        .put(INDEX_BACKFILLED_KEY, Default::default())
        .await
        .map_err(|e| IndexerError::Nats(format!("writing {INDEX_BACKFILLED_KEY}: {e}")))?;
    Ok(())
}
