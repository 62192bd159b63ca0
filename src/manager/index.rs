//! The index consumer: keeps the job index ([`crate::protocol::index`])
//! from the log, reading only the events that change a job's state.
//!
//! For each job whose summary a batch of events changes it writes the new
//! entry, deletes the old one, then stores where the new one is; the batch
//! is acknowledged after all of them. Read again after a restart, an event
//! changes nothing (each summary carries the log sequence it reflects). A
//! crash between writing an entry and storing its place would leave the
//! entry behind, counted twice, and the batch read again may end a job's
//! events elsewhere (its summary then differs from the one written). So
//! each cell's reader marks a batch as begun (`index.writing.<cell>`, with
//! the server's time) and as done once acknowledged; a reader that finds
//! its cell's last batch begun and not done looks, in its first batch, for
//! the entries each job got since then: the newest one written is kept
//! (and the summary it holds, when it is as new as this batch's or newer),
//! the others deleted.
//!
//! Jobs recorded before the index existed are indexed from their records
//! once, when the consumer first runs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

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
use crate::nats::Nats;
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

impl IndexerError {
    /// The lease's fence lapsed: nothing more may be written.
    pub fn is_fenced(&self) -> bool {
        matches!(
            self,
            IndexerError::Fenced(_) | IndexerError::Log(LogError::Fenced(_))
        )
    }
}

/// Events read at once.
const BATCH: usize = 1000;
/// Jobs whose entries are written at once.
const WRITES_IN_FLIGHT: usize = 64;
/// Prefix of each cell's key (`index.writing.<cell>`) that holds when its
/// last batch began (the server's time of its write) and whether it is done.
const WRITING_KEY: &str = "index.writing";
/// The value of a cell's [`WRITING_KEY`] while a batch is being written
/// (empty once it is done).
const BATCH_BEGUN: &str = "begun";

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
    // A reader per cell, each started again alone when it fails (a cell's
    // log electing a leader holds up none of the others); past the lease,
    // every one stops and the error is the index's.
    let stop = cancel.child_token();
    let fenced: Arc<Mutex<Option<IndexerError>>> = Arc::default();
    let mut cells = JoinSet::new();
    for cell in 0..CELLS {
        let (n, p, f, c, filters, fenced) = (
            nats.clone(),
            positions.clone(),
            fence.clone(),
            stop.clone(),
            filters.clone(),
            fenced.clone(),
        );
        cells.spawn(supervise("job index", stop.clone(), move || {
            let (n, p, f, c, filters, fenced) = (
                n.clone(),
                p.clone(),
                f.clone(),
                c.clone(),
                filters.clone(),
                fenced.clone(),
            );
            async move {
                match run_cell(n, p, cell, filters, c.clone(), f).await {
                    Err(e) if e.is_fenced() => {
                        c.cancel();
                        *fenced.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
                        Ok(())
                    }
                    done => done,
                }
            }
        }));
    }
    while cells.join_next().await.is_some() {}
    let fenced = fenced.lock().unwrap_or_else(|e| e.into_inner()).take();
    match fenced {
        Some(e) => Err(e),
        None => Ok(()),
    }
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
    let writing = format!("{WRITING_KEY}.{cell}");
    loop {
        // Where the writer before stopped mid-batch: entries it wrote
        // after this may have no position stored.
        let since = unfinished_batch(&positions, &writing).await?;
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
                    .put(&writing, BATCH_BEGUN.into())
                    .await
                    .map_err(|e| IndexerError::Nats(format!("marking a batch: {e}")))?;
                apply(&nats, &positions, &messages, look_first.take(), &fence).await?;
                if let Some(last) = messages.last() {
                    checked(&fence)?;
                    last.double_ack()
                        .await
                        .map_err(|e| IndexerError::Nats(e.to_string()))?;
                    positions
                        .put(&writing, Default::default())
                        .await
                        .map_err(|e| IndexerError::Nats(format!("marking a batch done: {e}")))?;
                }
            }
            if let Some(hole) = hole {
                debug!(%hole, "index: reading again from the last acknowledged event");
                break;
            }
        }
    }
}

/// When the last batch of a cell began, if it was not marked done (its
/// writer stopped in it): its writes without a stored position must be
/// looked for.
async fn unfinished_batch(
    positions: &kv::Store,
    key: &str,
) -> Result<Option<Millis>, IndexerError> {
    let entry = positions
        .entry(key)
        .await
        .map_err(|e| IndexerError::Nats(format!("reading {key}: {e}")))?;
    let Some(entry) = entry.filter(|e| e.value.as_ref() == BATCH_BEGUN.as_bytes()) else {
        return Ok(None);
    };
    let began = (entry.created.unix_timestamp_nanos() / 1_000_000).max(0) as Millis;
    // A second of margin for the clocks of different servers.
    Ok(Some(began.saturating_sub(1000)))
}

/// What a batch changes for one job.
struct Changed {
    /// Where its entry was (`None`: it had none).
    old: Option<u64>,
    summary: JobSummary,
    /// Entries a writer before left without storing their place (found
    /// when looked for), to delete.
    stale: Vec<u64>,
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
                    stale: Vec::new(),
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
                stale: Vec::new(),
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
    let mut changed = changed;
    let mut sent = Vec::with_capacity(changed.len());
    for c in &mut changed {
        checked(fence)?;
        let found = match look_since {
            Some(since) => idx::job_entries(nats, &c.summary, since).await?,
            None => Vec::new(),
        };
        // The newest entry a writer before left, when it is as new as
        // this batch's summary or newer, is the job's entry: the events
        // it reflects come again, and change nothing.
        let newest = found
            .iter()
            .filter(|(_, s)| s.seq >= c.summary.seq)
            .max_by_key(|(_, s)| s.seq)
            .cloned();
        c.stale = found
            .iter()
            .map(|(seq, _)| *seq)
            .filter(|seq| newest.as_ref().is_none_or(|(kept, _)| kept != seq))
            .collect();
        sent.push(match newest {
            Some((seq, summary)) => {
                c.summary = summary;
                Sent::Found(seq)
            }
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
            for old in c.old.iter().chain(&c.stale) {
                if Some(*old) != entry {
                    idx::delete_entry(nats, *old).await?;
                }
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
    /// Written before (by a writer that stopped before storing its place),
    /// as new as this batch's summary or newer.
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
                    stale: Vec::new(),
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
