//! The job index on JetStream (the rules are in
//! [`crate::protocol::index`]): the index consumer's writes (an entry per
//! job in `FANJET_INDEX`, its place in the `fanjet_index` bucket), and the
//! listings and counts every reader makes of it.
//!
//! A listing never reads every entry. The server keeps, per subject, how
//! many entries it holds; a listing asks for the counts of the subjects
//! its filter matches, and from their share of the stream guesses a window
//! of the newest entries likely to hold a page, reads the matching entries
//! in that window with batched direct gets, and widens the window
//! (fourfold) only when it held too few. The server finds a filter's next
//! entry by looking at each entry after the one before, within the blocks
//! where the filter's subjects are (its subject index knows a subject's
//! first and last entry per block, not the ones between), so the cost is
//! the window's width. When the filter matches a few subjects holding few
//! entries (a customer's failed jobs: one subject per workflow), each
//! subject is read on its own and the pages merged: an entry alone of its
//! subject in a block is found from the index directly. Measured on
//! 1,000,000 entries: docs/PERFORMANCE.md.

use std::collections::BTreeMap;
use std::time::{Duration, UNIX_EPOCH};

use async_nats::jetstream::context::PublishAckFuture;
use async_nats::jetstream::kv;
use async_nats::jetstream::message::PublishMessage;
use serde::Deserialize;
use serde_json::{json, Value};
use thiserror::Error;

use super::direct::{self, MAX_BATCH};
use super::{Nats, RECORDS_MAX_AGE};
use crate::protocol::{
    parse_index_subject, IndexCounts, IndexFilter, IndexPosition, JobPage, JobSummary, ListRequest,
    Millis, INDEX_STREAM, MAX_PAGE,
};

#[derive(Debug, Error)]
pub enum IndexError {
    /// The index could not be read now (a node down, a timeout).
    #[error("reading the job index: {0}")]
    Read(String),
    /// An entry or a position could not be written now.
    #[error("writing the job index: {0}")]
    Write(String),
    /// The request itself is wrong (a cursor that is no cursor).
    #[error("{0}")]
    BadRequest(String),
}

impl IndexError {
    /// True when the same call may succeed later.
    pub fn is_transient(&self) -> bool {
        !matches!(self, IndexError::BadRequest(_))
    }
}

/// Jobs a listing page holds when the request does not say.
pub const DEFAULT_PAGE: usize = 50;

/// Entries a listing with a job id prefix looks at before it answers with
/// what it found and a cursor to look further (a whole job id is found at
/// once, wherever it is).
pub const PREFIX_SCAN_BUDGET: u64 = 10_000;

/// How long after a change its entry is written, at most, as a time range
/// reckons (ms); an entry written later, by an index consumer that was
/// behind, is missed by a range that ends before it was written.
const WRITTEN_WITHIN: Millis = 60_000;

/// A filter matching at most this many subjects, holding few entries, is
/// read subject by subject.
const FEW_SUBJECTS: usize = 16;

/// Where a job's entry is, as its position says (`None`: not indexed), as
/// the bucket's leader has it.
pub async fn position(
    positions: &kv::Store,
    job_id: &str,
) -> Result<Option<IndexPosition>, IndexError> {
    // From the leader: a replica behind it would answer with the place of
    // an entry replaced since, and the entry that replaced it would stay.
    let bytes = super::store::read_latest(positions, job_id)
        .await
        .map_err(|e| IndexError::Read(format!("position of {job_id}: {e}")))?;
    Ok(bytes.and_then(|b| serde_json::from_slice(&b).ok()))
}

/// Stores where a job's entry is.
pub async fn put_position(positions: &kv::Store, pos: &IndexPosition) -> Result<(), IndexError> {
    let job_id = &pos.summary.job_id;
    let bytes = serde_json::to_vec(pos).map_err(|e| IndexError::Write(e.to_string()))?;
    positions
        .put(job_id, bytes.into())
        .await
        .map(|_| ())
        .map_err(|e| IndexError::Write(format!("position of {job_id}: {e}")))
}

/// How long an entry written now for a summary that changed at
/// `changed_at` may live: as long as the job's record, which was written
/// when the change happened (`None`: the record has expired already).
pub fn entry_ttl(changed_at: Millis, now: Millis) -> Option<Duration> {
    let age = Duration::from_millis(now.saturating_sub(changed_at));
    RECORDS_MAX_AGE
        .checked_sub(age)
        .filter(|left| *left >= Duration::from_secs(1))
}

/// Writes a job's entry; its sequence in the index stream (`None`: the
/// job's record has expired, so the index forgets it). The message id
/// (job and log sequence) makes writing it again after a crash a
/// duplicate, not a second entry.
pub async fn write_entry(
    nats: &Nats,
    summary: &JobSummary,
    now: Millis,
) -> Result<Option<u64>, IndexError> {
    match send_entry(nats, summary, now).await? {
        Some(ack) => Ok(Some(
            ack.await
                .map_err(|e| IndexError::Write(e.to_string()))?
                .sequence,
        )),
        None => Ok(None),
    }
}

/// Sends a job's entry without waiting for the server to confirm it:
/// entries sent one after another on a connection are stored in that
/// order (which is the listing's). `None`: the record has expired.
pub async fn send_entry(
    nats: &Nats,
    summary: &JobSummary,
    now: Millis,
) -> Result<Option<PublishAckFuture>, IndexError> {
    let Some(ttl) = entry_ttl(summary.changed_at, now) else {
        return Ok(None);
    };
    let payload = serde_json::to_vec(summary).map_err(|e| IndexError::Write(e.to_string()))?;
    let msg = PublishMessage::build()
        .message_id(format!("{}:{}", summary.job_id, summary.seq))
        .ttl(ttl)
        .payload(payload.into());
    let ack = nats
        .js
        .send_publish(summary.subject(), msg)
        .await
        .map_err(|e| IndexError::Write(e.to_string()))?;
    Ok(Some(ack))
}

/// Deletes an entry a job has left (one gone already is fine).
pub async fn delete_entry(nats: &Nats, seq: u64) -> Result<(), IndexError> {
    use async_nats::jetstream::{stream::DeleteMessageErrorKind, ErrorCode};
    match nats.index.delete_message(seq).await {
        Ok(_) => Ok(()),
        Err(e) => match e.kind() {
            DeleteMessageErrorKind::JetStream(j)
                if matches!(
                    j.error_code(),
                    ErrorCode::NO_MESSAGE_FOUND | ErrorCode::SEQUENCE_NOT_FOUND
                ) =>
            {
                Ok(())
            }
            _ => Err(IndexError::Write(format!("deleting entry {seq}: {e}"))),
        },
    }
}

/// The entry written for `summary` since `since`, if one was (a write the
/// consumer made before it stopped, without storing its position).
pub async fn find_entry(
    nats: &Nats,
    summary: &JobSummary,
    since: Millis,
) -> Result<Option<u64>, IndexError> {
    Ok(job_entries(nats, summary, since)
        .await?
        .into_iter()
        .find(|(_, s)| s.seq == summary.seq)
        .map(|(seq, _)| seq))
}

/// Every entry of `summary`'s job written since `since`, in any state, with
/// the summary each holds: what a consumer that stopped before storing
/// their positions may have left.
pub async fn job_entries(
    nats: &Nats,
    summary: &JobSummary,
    since: Millis,
) -> Result<Vec<(u64, JobSummary)>, IndexError> {
    // From the time, then on from the last entry read.
    let mut from = json!({"start_time": rfc3339(since)});
    let mut out = Vec::new();
    loop {
        let mut request = from.clone();
        request["next_by_subj"] = json!(summary.any_state_subject());
        request["batch"] = json!(MAX_BATCH);
        let got = direct::batch(&nats.client, INDEX_STREAM, &request)
            .await
            .map_err(IndexError::Read)?;
        for m in &got {
            if let Ok(s) = serde_json::from_slice::<JobSummary>(&m.payload) {
                if s.job_id == summary.job_id {
                    out.push((m.seq, s));
                }
            }
        }
        match got.last() {
            Some(last) if got.len() == MAX_BATCH => from = json!({"seq": last.seq + 1}),
            _ => return Ok(out),
        }
    }
}

/// Sequence numbers and per-subject counts of the index stream, for the
/// subjects `filter` matches (`None`: none asked for).
struct Shape {
    first: u64,
    last: u64,
    messages: u64,
    subjects: Option<BTreeMap<String, u64>>,
}

#[derive(Deserialize)]
struct InfoReply {
    #[serde(default)]
    state: Option<InfoState>,
    #[serde(default)]
    error: Option<Value>,
    #[serde(default)]
    total: usize,
    #[serde(default)]
    limit: usize,
}

#[derive(Deserialize)]
struct InfoState {
    messages: u64,
    first_seq: u64,
    last_seq: u64,
    #[serde(default)]
    subjects: Option<BTreeMap<String, u64>>,
}

/// Reads the stream's state and, with a `filter`, how many entries each
/// subject it matches holds (stream info, page by page).
async fn shape(nats: &Nats, filter: Option<&str>) -> Result<Shape, IndexError> {
    let mut subjects = filter.map(|_| BTreeMap::new());
    let mut offset = 0usize;
    loop {
        let body = match filter {
            Some(f) => json!({"subjects_filter": f, "offset": offset}),
            None => json!({}),
        };
        let reply = nats
            .client
            .request(
                format!("$JS.API.STREAM.INFO.{INDEX_STREAM}"),
                body.to_string().into(),
            )
            .await
            .map_err(|e| IndexError::Read(format!("index stream info: {e}")))?;
        let info: InfoReply = serde_json::from_slice(&reply.payload)
            .map_err(|e| IndexError::Read(format!("index stream info: {e}")))?;
        if let Some(e) = info.error {
            return Err(IndexError::Read(format!("index stream info: {e}")));
        }
        let state = info
            .state
            .ok_or_else(|| IndexError::Read("index stream info without state".into()))?;
        let got = state.subjects.as_ref().map_or(0, BTreeMap::len);
        if let (Some(all), Some(page)) = (subjects.as_mut(), state.subjects) {
            all.extend(page);
        }
        offset += got;
        if filter.is_none() || got == 0 || info.limit == 0 || offset >= info.total {
            return Ok(Shape {
                first: state.first_seq,
                last: state.last_seq,
                messages: state.messages,
                subjects,
            });
        }
    }
}

/// How many jobs the index holds per state and workflow, of the jobs
/// `filter` keeps. Customers are told apart by their tags (12 hex digits
/// of a hash): two customers whose tags are the same would count together.
pub async fn counts(nats: &Nats, filter: &IndexFilter) -> Result<IndexCounts, IndexError> {
    let shape = shape(nats, Some(&filter.subject())).await?;
    let mut counts = IndexCounts::default();
    for (subject, n) in shape.subjects.unwrap_or_default() {
        let Some((state, workflow)) = parse_index_subject(&subject) else {
            continue;
        };
        counts.total += n;
        *counts.states.entry(state.as_str().into()).or_default() += n;
        *counts
            .workflows
            .entry(workflow.into())
            .or_default()
            .entry(state.as_str().into())
            .or_default() += n;
    }
    Ok(counts)
}

/// One page of the jobs `filter` and `req` keep, most recently changed
/// first.
pub async fn list(
    nats: &Nats,
    filter: &IndexFilter,
    req: &ListRequest,
) -> Result<JobPage, IndexError> {
    let need = req.limit.unwrap_or(DEFAULT_PAGE).clamp(1, MAX_PAGE);
    let below = match req.cursor.as_deref() {
        None => u64::MAX,
        Some(c) => c
            .parse::<u64>()
            .map_err(|_| IndexError::BadRequest(format!("{c:?} is not a cursor of a listing")))?,
    };
    let subject = filter.subject();
    let any = filter == &IndexFilter::default();
    let shape = shape(nats, (!any).then_some(subject.as_str())).await?;
    if shape.messages == 0 {
        return Ok(JobPage::default());
    }
    // The window of sequences to look in: below the cursor, within the time range.
    let mut hi = shape.last.min(below.saturating_sub(1));
    let mut lo = shape.first;
    if let Some(since) = req.since {
        match first_at(nats, since).await? {
            Some(seq) => lo = lo.max(seq),
            None => return Ok(JobPage::default()),
        }
    }
    if let Some(until) = req.until {
        // Entries are written a moment after the change they show.
        if let Some(seq) = first_at(nats, until.saturating_add(WRITTEN_WITHIN)).await? {
            hi = hi.min(seq.saturating_sub(1));
        }
    }
    if hi < lo {
        return Ok(JobPage::default());
    }
    let prefix = req.prefix.as_deref().filter(|p| !p.is_empty());
    // The sequences bound when entries were written; their changes (a
    // moment before, or longer when the index consumer was behind) are
    // what a time range asks for.
    let keeps = |s: &JobSummary| {
        filter.keeps(s)
            && prefix.is_none_or(|p| s.job_id.starts_with(p))
            && req.since.is_none_or(|t| s.changed_at >= t)
            && req.until.is_none_or(|t| s.changed_at < t)
    };
    let span = Span {
        lo,
        hi,
        messages: shape.messages,
    };
    let subjects: Vec<(String, u64)> = match &shape.subjects {
        Some(s) => s.iter().map(|(k, v)| (k.clone(), *v)).collect(),
        None => vec![(subject.clone(), shape.messages)],
    };
    let total: u64 = subjects.iter().map(|(_, n)| n).sum();
    let sparse = total <= (need as u64).saturating_mul(4);
    let (mut found, go_on) = if prefix.is_none() && sparse && subjects.len() <= FEW_SUBJECTS {
        // Each subject's newest (at once), merged.
        let reads = subjects
            .iter()
            .map(|(s, n)| newest(nats, s, *n, span, need, &keeps, u64::MAX));
        let mut all = Vec::new();
        for (got, _) in futures::future::try_join_all(reads).await? {
            all.extend(got);
        }
        all.sort_by_key(|f| std::cmp::Reverse(f.0));
        (all, None)
    } else {
        let budget = match prefix {
            Some(_) => PREFIX_SCAN_BUDGET,
            None => u64::MAX,
        };
        // Every entry: no subject filter for the server to match.
        let subject = match any {
            true => "",
            false => subject.as_str(),
        };
        newest(nats, subject, total, span, need, &keeps, budget).await?
    };
    // A whole job id given as the prefix finds that job at once, when the
    // scan did not reach it.
    if let Some(id) = prefix.filter(|_| req.cursor.is_none()) {
        if !found.iter().any(|(_, s)| s.job_id == id) {
            if let Ok(Some(job)) = super::store::status(nats, id).await {
                let s = JobSummary::of_job(&job);
                if filter.keeps(&s) {
                    found.insert(0, (u64::MAX, s));
                }
            }
        }
    }
    let next_cursor = if found.len() > need && found[need - 1].0 == u64::MAX {
        // Only the job found by its whole id on this page: go on from the
        // first entry the scan found.
        Some(found[need].0.saturating_add(1))
    } else if found.len() > need {
        Some(found[need - 1].0)
    } else if found.len() == need {
        // Full: there may be more below its last.
        found.last().map(|f| f.0).filter(|&s| s > lo)
    } else {
        go_on
    };
    let jobs = found.into_iter().take(need).map(|(_, s)| s).collect();
    Ok(JobPage {
        jobs,
        next_cursor: next_cursor.map(|s| s.to_string()),
    })
}

/// The sequences a listing looks in, and the stream's size.
#[derive(Clone, Copy)]
struct Span {
    lo: u64,
    hi: u64,
    messages: u64,
}

/// The newest entries (by sequence, newest first) on `subject` (every
/// entry when empty) within
/// `span` that `keeps` keeps: at least `need` when there are, and where to
/// go on (a cursor) when the scan stopped after `budget` entries read.
async fn newest(
    nats: &Nats,
    subject: &str,
    count: u64,
    span: Span,
    need: usize,
    keeps: &(dyn Fn(&JobSummary) -> bool + Sync),
    budget: u64,
) -> Result<(Vec<(u64, JobSummary)>, Option<u64>), IndexError> {
    let mut found: Vec<(u64, JobSummary)> = Vec::new();
    if count == 0 {
        return Ok((found, None));
    }
    // A window expected to hold half as many again as needed.
    let share = count as f64 / span.messages.max(1) as f64;
    let mut width = ((need as f64 * 1.5 / share).ceil() as u64).saturating_add(64);
    let mut hi = span.hi;
    let mut scanned = 0u64;
    loop {
        let lo = hi.saturating_sub(width - 1).max(span.lo);
        // The server reads on past `hi` up to the batch (it honours
        // `up_to_seq` only for last-per-subject gets): ask for about what
        // the window should hold.
        let expected = (share * (hi - lo + 1) as f64).ceil() as usize;
        let batch = expected.saturating_mul(2).saturating_add(16).min(MAX_BATCH);
        let mut window = Vec::new();
        let mut start = lo;
        loop {
            let mut request = json!({"seq": start, "batch": batch});
            if !subject.is_empty() {
                request["next_by_subj"] = json!(subject);
            }
            let got = direct::batch(&nats.client, INDEX_STREAM, &request)
                .await
                .map_err(IndexError::Read)?;
            let full = got.len() == batch;
            if let Some(last) = got.last() {
                start = last.seq + 1;
            }
            window.extend(got.into_iter().filter(|m| m.seq <= hi));
            if !full || start > hi {
                break;
            }
        }
        scanned += window.len() as u64;
        for m in window.into_iter().rev() {
            match serde_json::from_slice::<JobSummary>(&m.payload) {
                Ok(s) if keeps(&s) => found.push((m.seq, s)),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(seq = m.seq, error = %e, "skipping an unreadable index entry")
                }
            }
        }
        if found.len() >= need || lo <= span.lo {
            return Ok((found, None));
        }
        if scanned >= budget {
            return Ok((found, Some(lo)));
        }
        hi = lo - 1;
        width = width.saturating_mul(4);
    }
}

/// The sequence of the first entry written at or after `at` (`None`:
/// none was).
async fn first_at(nats: &Nats, at: Millis) -> Result<Option<u64>, IndexError> {
    let request = json!({"start_time": rfc3339(at), "batch": 1});
    let got = direct::batch(&nats.client, INDEX_STREAM, &request)
        .await
        .map_err(IndexError::Read)?;
    Ok(got.first().map(|m| m.seq))
}

fn rfc3339(at: Millis) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(at)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_lives_as_long_as_the_record_written_at_its_change() {
        let day = 24 * 3600 * 1000;
        assert_eq!(entry_ttl(1000, 1000), Some(RECORDS_MAX_AGE));
        // Written a day after the change (the consumer was behind): a day less.
        assert_eq!(
            entry_ttl(0, day),
            Some(RECORDS_MAX_AGE - Duration::from_millis(day))
        );
        // The record has expired: no entry.
        let age = RECORDS_MAX_AGE.as_millis() as Millis;
        assert_eq!(entry_ttl(0, age), None);
        assert_eq!(entry_ttl(0, age + 5), None);
        // A change stamped a little ahead of this clock.
        assert_eq!(entry_ttl(2000, 1000), Some(RECORDS_MAX_AGE));
    }
}
