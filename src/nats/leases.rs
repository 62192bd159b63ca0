//! Leases in KV buckets: who runs what, when only one process may. The
//! partitions' leases are in their cells' buckets (`fanjet_leases_<cell>`),
//! so that renewals go on while another cell's bucket elects a leader;
//! memberships and the work one process at a time does are in
//! `fanjet_leases`.
//!
//! Two users. Managers split the event log's partitions ([`Partitions`]):
//! each partition is read by one manager at a time, through its own durable
//! consumer, so a job's events keep their order and its state has a single
//! writer, exactly as with one manager; more managers share the partitions.
//! And `fanjet serve` runs the statistics consumer in one process only
//! ([`exclusive`]), since it builds records in memory between saves.
//!
//! Every round ([`LEASE_ROUND`]) a holder renews its leases with a
//! revision-checked update. Entries expire unrenewed after [`LEASE_TTL`], so
//! a killed holder's leases are free again after at most that long.
//!
//! # Fencing
//! A holder may be frozen (a GC pause, SIGSTOP, a VM migration) past its
//! lease and wake up unaware that another holder took over. So each lease
//! carries a [`Fence`]: the instant until which the lease is certainly held,
//! [`LEASE_VALID`] after the last successful renewal was *sent* (the entry
//! cannot expire before [`LEASE_TTL`] after that, and the rest is a margin
//! for writes already on their way). Whatever the lease guards checks the
//! fence before every write, ack or publish, on the monotonic clock, and
//! does nothing once it has passed. A renewal that fails (NATS unreachable,
//! a leader election in the lease bucket) is not a lost lease: the work
//! pauses when the fence passes and goes on when a renewal succeeds again.
//! Only a renewal that finds the key held by someone else (or gone) loses
//! the lease; a renewal refused for a stale revision first reads the key,
//! since an earlier renewal whose reply was lost may have landed. (A
//! manager claims a gone key again at once: its state is reloaded, but the
//! partition stays where it was.) The fence cannot cover a process frozen
//! between its check and the write reaching the server; the margin bounds
//! that in practice, and job records are revision-checked besides.
//!
//! Managers also renew a membership key, count the live managers and move
//! toward an equal share, `ceil(partitions / managers)`: they give up extra
//! partitions (stopping their loops first) and claim free ones with
//! `create`, which only one manager can win.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::kv::{self, CreateErrorKind, Operation, UpdateErrorKind};
use futures::TryStreamExt;
use thiserror::Error;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::Nats;
use crate::protocol::{
    cell, cell_partitions, exclusive_key, lease_key, member_key, partition,
    partition_leases_bucket, CELLS, LEASES_BUCKET, LEASE_KEY_PREFIX, LEASE_TTL, MEMBER_KEY_PREFIX,
    PARTITIONS,
};

/// How often holders renew their leases.
pub const LEASE_ROUND: Duration = Duration::from_millis(500);
/// How long after a successful renewal was sent its holder may still write:
/// [`LEASE_TTL`] less a margin for writes already on their way (and a
/// taker still has to see the key gone, claim it and open its reader).
pub const LEASE_VALID: Duration = LEASE_TTL.saturating_sub(Duration::from_millis(500));

/// Until when a lease is certainly held; see the module docs. Clones share
/// it: the lease extends it, the work it guards checks it.
#[derive(Debug, Clone)]
pub struct Fence(Arc<watch::Sender<Option<Instant>>>);

/// A write refused because the lease guarding it may have passed to
/// another holder.
#[derive(Debug, Clone, Copy, Error)]
#[error("the lease guarding this work is not certainly held; writing nothing")]
pub struct Fenced;

impl Fence {
    /// A fence that holds nothing until extended.
    pub fn new() -> Self {
        Fence(Arc::new(watch::Sender::new(None)))
    }

    /// A renewal (or claim) sent at `sent` succeeded.
    fn extend(&self, sent: Instant) {
        let until = sent + LEASE_VALID;
        self.0.send_if_modified(|u| match u {
            Some(u) if *u >= until => false,
            _ => {
                *u = Some(until);
                true
            }
        });
    }

    /// The lease is lost: nothing may be written under it any more.
    pub fn revoke(&self) {
        self.0.send_replace(None);
    }

    /// Whether the lease is certainly held right now.
    pub fn holds(&self) -> bool {
        matches!(*self.0.borrow(), Some(until) if Instant::now() < until)
    }

    /// `Ok` when a write may go out now.
    pub fn check(&self) -> Result<(), Fenced> {
        if self.holds() {
            Ok(())
        } else {
            Err(Fenced)
        }
    }

    /// Waits until the lease is certainly held again (a renewal succeeded).
    pub async fn held(&self) {
        let mut changes = self.0.subscribe();
        while !self.holds() {
            if changes.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }
}

impl Default for Fence {
    fn default() -> Self {
        Fence::new()
    }
}

#[derive(Debug, Error)]
pub enum LeaseError {
    #[error("leases ({LEASES_BUCKET}): {0}")]
    Nats(String),
    #[error("the lease on {0} was lost; its work was stopped")]
    Lost(String),
    #[error("{0}")]
    Work(String),
}

/// The lease bucket (created with the other streams and buckets by
/// [`Nats::ensure`]).
pub async fn bucket(nats: &Nats) -> Result<kv::Store, LeaseError> {
    nats.js
        .get_key_value(LEASES_BUCKET)
        .await
        .map_err(|e| LeaseError::Nats(e.to_string()))
}

/// The partition leases' buckets, one per cell (index = cell).
pub async fn cell_buckets(nats: &Nats) -> Result<Vec<kv::Store>, LeaseError> {
    let mut out = Vec::new();
    for c in 0..CELLS {
        let kv = nats
            .js
            .get_key_value(partition_leases_bucket(c))
            .await
            .map_err(|e| LeaseError::Nats(e.to_string()))?;
        out.push(kv);
    }
    Ok(out)
}

/// Forgets every lease. Only for a server no other fanjet process uses
/// (`fanjet dev`'s own): leases left by a killed earlier run would
/// otherwise keep its partitions idle until they expire.
pub async fn clear(nats: &Nats) -> Result<(), LeaseError> {
    let err = |e: &dyn std::fmt::Display| LeaseError::Nats(e.to_string());
    let buckets =
        std::iter::once(LEASES_BUCKET.to_string()).chain((0..CELLS).map(partition_leases_bucket));
    for bucket in buckets {
        let stream = nats
            .js
            .get_stream(format!("KV_{bucket}"))
            .await
            .map_err(|e| err(&e))?;
        stream.purge().await.map_err(|e| err(&e))?;
    }
    Ok(())
}

/// A bucket's live keys, sorted out: the managers' ids and the partitions
/// held.
async fn keys(kv: &kv::Store) -> Result<(Vec<String>, Vec<u32>), LeaseError> {
    let err = |e: &dyn std::fmt::Display| LeaseError::Nats(e.to_string());
    let keys: Vec<String> = kv
        .keys()
        .await
        .map_err(|e| err(&e))?
        .try_collect()
        .await
        .map_err(|e| err(&e))?;
    let mut members = Vec::new();
    let mut partitions = Vec::new();
    for key in keys {
        if let Some(id) = key.strip_prefix(MEMBER_KEY_PREFIX) {
            members.push(id.to_string());
        } else if let Some(p) = key
            .strip_prefix(LEASE_KEY_PREFIX)
            .and_then(|p| p.parse().ok())
        {
            partitions.push(p);
        }
    }
    Ok((members, partitions))
}

/// Who holds what: partition → manager id, and the live managers' ids.
pub async fn holders(nats: &Nats) -> Result<(BTreeMap<u32, String>, Vec<String>), LeaseError> {
    let (members, _) = keys(&bucket(nats).await?).await?;
    let mut partitions = BTreeMap::new();
    for kv in cell_buckets(nats).await? {
        let (_, held) = keys(&kv).await?;
        for p in held {
            let holder = kv
                .get(lease_key(p))
                .await
                .map_err(|e| LeaseError::Nats(e.to_string()))?;
            if let Some(holder) = holder {
                partitions.insert(p, String::from_utf8_lossy(&holder).into_owned());
            }
        }
    }
    Ok((partitions, members))
}

/// One held key.
pub struct Lease {
    key: String,
    revision: u64,
    fence: Fence,
}

/// How a renewal went.
#[derive(Debug, PartialEq, Eq)]
pub enum Renewal {
    Renewed,
    /// Someone else holds the key now.
    TakenOver,
    /// Nobody holds it: it expired first (renewals failed for its whole
    /// life, e.g. while the lease bucket elected a leader).
    Gone,
    /// Not renewed this time (NATS unreachable, timed out); maybe still
    /// held: the fence says until when for certain.
    Failed(String),
}

impl Lease {
    /// Takes `key` if nobody holds it.
    pub async fn claim(kv: &kv::Store, key: &str, me: &str) -> Result<Option<Lease>, LeaseError> {
        let sent = Instant::now();
        match kv.create(key, me.to_string().into()).await {
            Ok(revision) => {
                let fence = Fence::new();
                fence.extend(sent);
                Ok(Some(Lease {
                    key: key.to_string(),
                    revision,
                    fence,
                }))
            }
            Err(e) if e.kind() == CreateErrorKind::AlreadyExists => Ok(None),
            Err(e) => Err(LeaseError::Nats(e.to_string())),
        }
    }

    /// The lease's fence, for the work it guards.
    pub fn fence(&self) -> Fence {
        self.fence.clone()
    }

    /// Extends the lease by another [`LEASE_TTL`]. A refusal for a stale
    /// revision is checked against the key itself: a renewal whose reply was
    /// lost may have landed, and the key still names this holder.
    pub async fn renew(&mut self, kv: &kv::Store, me: &str) -> Renewal {
        let sent = Instant::now();
        let refused = match kv
            .update(&self.key, me.to_string().into(), self.revision)
            .await
        {
            Ok(revision) => return self.renewed(revision, sent),
            Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => e,
            Err(e) => return Renewal::Failed(e.to_string()),
        };
        match kv.entry(&self.key).await {
            Ok(Some(entry))
                if entry.operation == Operation::Put && entry.value == me.as_bytes() =>
            {
                debug!(key = %self.key, "an earlier renewal had landed; renewing from it");
                let sent = Instant::now();
                match kv
                    .update(&self.key, me.to_string().into(), entry.revision)
                    .await
                {
                    Ok(revision) => self.renewed(revision, sent),
                    Err(e) => {
                        self.revision = entry.revision;
                        Renewal::Failed(e.to_string())
                    }
                }
            }
            Ok(entry) => {
                debug!(key = %self.key, error = %refused, "the lease key is another holder's or gone");
                self.fence.revoke();
                match entry {
                    Some(e) if e.operation == Operation::Put => Renewal::TakenOver,
                    _ => Renewal::Gone,
                }
            }
            Err(e) => Renewal::Failed(e.to_string()),
        }
    }

    fn renewed(&mut self, revision: u64, sent: Instant) -> Renewal {
        self.revision = revision;
        self.fence.extend(sent);
        Renewal::Renewed
    }

    /// Gives the key up (its work must have stopped).
    /// A refusal for a stale revision is checked against the key, as in
    /// [`renew`](Self::renew): a renewal whose reply was lost may have
    /// landed, and the key still names this holder.
    pub async fn release(self, kv: &kv::Store, me: &str) {
        self.fence.revoke();
        let Err(e) = kv
            .delete_expect_revision(&self.key, Some(self.revision))
            .await
        else {
            return;
        };
        let released = match kv.entry(&self.key).await {
            Ok(Some(entry))
                if entry.operation == Operation::Put && entry.value == me.as_bytes() =>
            {
                kv.delete_expect_revision(&self.key, Some(entry.revision))
                    .await
                    .map_err(|e| e.to_string())
            }
            _ => Err(e.to_string()),
        };
        if let Err(error) = released {
            debug!(key = %self.key, error, "releasing a lease; it will expire instead");
        }
    }
}

/// How [`exclusive`] work holds on through renewals that fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// Stopped once its fence has passed: work that writes what only one
    /// holder may write.
    Fenced,
    /// Goes on while renewals fail (the lease bucket electing a leader),
    /// takes the key again at once if it expired meanwhile, and stops only
    /// when the key is found another's: work that two processes may do for
    /// a moment without harm, and that must not stop for the lease bucket's
    /// elections (leader placement). Its fence says nothing.
    UntilTaken,
}

/// Runs `work` while this process holds the lease `name`; waits for it
/// while another process does. `work` is cancelled if the lease is lost
/// (see [`Hold`]), and gets the lease's fence: a process frozen past its
/// lease (and woken before it noticed) must check it before each write.
pub async fn exclusive<F, Fut, E>(
    nats: &Nats,
    name: &str,
    me: &str,
    hold: Hold,
    cancel: &CancellationToken,
    work: F,
) -> Result<(), LeaseError>
where
    F: FnOnce(CancellationToken, Fence) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let key = exclusive_key(name);
    let mut waiting_said = false;
    // The bucket not answering (its leader's node lost, an election) is a
    // reason to wait and ask again soon, not to fail: whoever is standing
    // by when it answers again must be quick to take over.
    let pause = || async {
        tokio::select! {
            _ = cancel.cancelled() => false,
            _ = tokio::time::sleep(LEASE_TTL / 5) => true,
        }
    };
    let kv = loop {
        match bucket(nats).await {
            Ok(kv) => break kv,
            Err(e) => {
                debug!(part = name, error = %e, "the lease bucket did not answer; asking again")
            }
        }
        if !pause().await {
            return Ok(());
        }
    };
    let mut lease = loop {
        match Lease::claim(&kv, &key, me).await {
            Ok(Some(lease)) => break lease,
            Ok(None) if !waiting_said => {
                info!(part = name, "another process runs this; standing by");
                waiting_said = true;
            }
            Ok(None) => {}
            Err(e) => {
                debug!(part = name, error = %e, "the lease bucket did not answer; asking again")
            }
        }
        if !pause().await {
            return Ok(());
        }
    };
    let inner = cancel.child_token();
    let work = work(inner.clone(), lease.fence());
    tokio::pin!(work);
    let mut round = tokio::time::interval(LEASE_ROUND);
    round.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let result = loop {
        tokio::select! {
            done = &mut work => break done.map_err(|e| LeaseError::Work(e.to_string())),
            _ = round.tick() => {
                let renewal = tokio::time::timeout(LEASE_VALID / 2, lease.renew(&kv, me))
                    .await
                    .unwrap_or_else(|_| Renewal::Failed("timed out".into()));
                if let Renewal::Failed(error) = &renewal {
                    warn!(part = name, error, "could not renew the lease");
                }
                if hold == Hold::UntilTaken && matches!(renewal, Renewal::Gone) {
                    // Expired while the bucket could not be written (an
                    // election): take it again at once if nobody has.
                    if let Ok(Some(again)) = Lease::claim(&kv, &key, me).await {
                        info!(part = name, "the lease expired unrenewed; claimed it again");
                        lease = again;
                        continue;
                    }
                }
                let expired = hold == Hold::Fenced && !lease.fence.holds();
                if matches!(renewal, Renewal::TakenOver | Renewal::Gone) || expired {
                    inner.cancel();
                    let _ = work.await;
                    break Err(LeaseError::Lost(name.to_string()));
                }
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), lease.release(&kv, me)).await;
    result
}

/// This manager's membership and the partitions it holds.
pub struct Partitions {
    /// Memberships.
    kv: kv::Store,
    /// Each cell's partition leases (index = cell).
    cells: Vec<kv::Store>,
    /// Cells whose lease bucket did not answer the last survey.
    unlisted: Vec<bool>,
    me: String,
    held: BTreeMap<u32, Lease>,
}

/// The longest one request to a lease bucket may hold up a round: a cell's
/// bucket electing a leader must not delay the renewals of the others'
/// partitions past their fences.
const BUCKET_WAIT: Duration = Duration::from_millis(500);

/// What one round should change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rebalance {
    /// Held partitions to give up, highest first.
    pub give_up: Vec<u32>,
    /// How many free partitions to claim.
    pub claim: usize,
}

/// The share each of `members` live managers should hold.
pub fn share(members: usize) -> usize {
    (PARTITIONS as usize).div_ceil(members.max(1))
}

/// Moves `held` toward an equal share among `members` managers.
pub fn plan(held: &[u32], members: usize) -> Rebalance {
    let target = share(members);
    let mut give_up = held.to_vec();
    give_up.sort_unstable_by(|a, b| b.cmp(a));
    give_up.truncate(held.len().saturating_sub(target));
    Rebalance {
        give_up,
        claim: target.saturating_sub(held.len()),
    }
}

/// Free partitions in the order this manager tries them: starting at a
/// place of its own, so managers claiming at once rarely collide.
pub fn claim_order(me: &str, free: &[u32]) -> Vec<u32> {
    if free.is_empty() {
        return Vec::new();
    }
    let start = partition(me) as usize % free.len();
    free[start..]
        .iter()
        .chain(&free[..start])
        .copied()
        .collect()
}

impl Partitions {
    /// Opens the lease bucket for manager `me`.
    pub async fn open(nats: &Nats, me: String) -> Result<Self, LeaseError> {
        Ok(Partitions {
            kv: bucket(nats).await?,
            cells: cell_buckets(nats).await?,
            unlisted: vec![false; CELLS as usize],
            me,
            held: BTreeMap::new(),
        })
    }

    /// The lease bucket of partition `p`'s cell.
    fn bucket_of(&self, p: u32) -> &kv::Store {
        &self.cells[cell(p) as usize]
    }

    /// Partitions held, in order.
    pub fn held(&self) -> Vec<u32> {
        self.held.keys().copied().collect()
    }

    /// The fence of a held partition's lease.
    pub fn fence(&self, p: u32) -> Option<Fence> {
        self.held.get(&p).map(Lease::fence)
    }

    /// Renews the membership and every held lease, side by side, each
    /// given [`BUCKET_WAIT`]. A lease someone else holds now (or nobody) is
    /// dropped, its fence revoked, and returned, with whether nobody holds
    /// it. A lease merely not renewed stays: its fence pauses its work.
    pub async fn renew(&mut self) -> Vec<(u32, bool)> {
        let membership = async {
            let put = self.kv.put(member_key(&self.me), self.me.clone().into());
            match tokio::time::timeout(BUCKET_WAIT, put).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => warn!(error = %e, "could not renew this manager's membership"),
                Err(_) => warn!("renewing this manager's membership timed out"),
            }
        };
        let (cells, me) = (&self.cells, self.me.as_str());
        let renewals = self.held.iter_mut().map(|(p, lease)| async move {
            let kv = &cells[cell(*p) as usize];
            let renewal = tokio::time::timeout(BUCKET_WAIT, lease.renew(kv, me))
                .await
                .unwrap_or_else(|_| Renewal::Failed("timed out".into()));
            (*p, renewal)
        });
        let (_, renewals) = futures::join!(membership, futures::future::join_all(renewals));
        let mut lost = Vec::new();
        let mut failed = Vec::new();
        for (p, renewal) in renewals {
            match renewal {
                Renewal::TakenOver => {
                    warn!(partition = p, "partition lease taken over; stopping it");
                    lost.push((p, false));
                }
                Renewal::Gone => {
                    warn!(
                        partition = p,
                        "partition lease expired unrenewed; stopping it and claiming it again"
                    );
                    lost.push((p, true));
                }
                Renewal::Failed(error) => failed.push((p, error)),
                Renewal::Renewed => {}
            }
        }
        if let Some((_, error)) = failed.first() {
            let partitions: Vec<u32> = failed.iter().map(|(p, _)| *p).collect();
            warn!(?partitions, error, "could not renew partition leases");
        }
        for (p, _) in &lost {
            self.held.remove(p);
        }
        lost
    }

    /// Live managers (this one included) and the partitions nobody holds.
    /// A cell whose bucket does not answer within [`BUCKET_WAIT`] offers
    /// none of its partitions this time, nor the next: a bucket that had no
    /// leader for a lease's life comes back with every lease expired, and
    /// their holders, which take them again at their next renewal, go
    /// first (their partitions would otherwise move between managers).
    pub async fn survey(&mut self) -> Result<(usize, Vec<u32>), LeaseError> {
        let listed = |kv: &kv::Store| {
            let kv = kv.clone();
            async move {
                tokio::time::timeout(BUCKET_WAIT, async { keys(&kv).await })
                    .await
                    .map_err(|_| LeaseError::Nats("timed out".into()))?
            }
        };
        let (members, cells) = futures::join!(
            listed(&self.kv),
            futures::future::join_all(self.cells.iter().map(listed))
        );
        let (members, _) = members?;
        let mut members: BTreeSet<String> = members.into_iter().collect();
        members.insert(self.me.clone());
        let mut free = Vec::new();
        for (c, listing) in cells.into_iter().enumerate() {
            let taken = match listing {
                Ok(_) if self.unlisted[c] => {
                    self.unlisted[c] = false;
                    continue;
                }
                Ok((_, taken)) => taken,
                Err(e) => {
                    debug!(cell = c, error = %e, "a cell's partition leases were not listed");
                    self.unlisted[c] = true;
                    continue;
                }
            };
            free.extend(
                cell_partitions(c as u32)
                    .filter(|p| !taken.contains(p) && !self.held.contains_key(p)),
            );
        }
        free.sort_unstable();
        Ok((members.len(), free))
    }

    /// Tries to take a free partition; false when another manager won it.
    pub async fn claim(&mut self, p: u32) -> Result<bool, LeaseError> {
        let key = lease_key(p);
        let claim = Lease::claim(self.bucket_of(p), &key, &self.me);
        let claimed = tokio::time::timeout(BUCKET_WAIT, claim)
            .await
            .map_err(|_| LeaseError::Nats(format!("claiming partition {p} timed out")))?;
        match claimed? {
            Some(lease) => {
                debug!(partition = p, "partition lease claimed");
                self.held.insert(p, lease);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Gives a partition up (its loop must have stopped); one not released
    /// within [`BUCKET_WAIT`] expires instead.
    pub async fn release(&mut self, p: u32) {
        if let Some(lease) = self.held.remove(&p) {
            let kv = self.cells[cell(p) as usize].clone();
            let _ = tokio::time::timeout(BUCKET_WAIT, lease.release(&kv, &self.me)).await;
        }
    }

    /// Gives every partition up and leaves (graceful shutdown), so other
    /// managers take over at once instead of after the leases expire.
    pub async fn leave(&mut self, within: Duration) {
        let (kv, cells, me) = (&self.kv, &self.cells, self.me.as_str());
        let held = std::mem::take(&mut self.held);
        let leave = async {
            let releases = held
                .into_iter()
                .map(|(p, l)| l.release(&cells[cell(p) as usize], me));
            futures::future::join_all(releases).await;
            let _ = kv.delete(member_key(me)).await;
        };
        let _ = tokio::time::timeout(within, leave).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_fence_holds_from_a_renewal_until_its_validity_ends_or_it_is_revoked() {
        let fence = Fence::new();
        assert!(fence.check().is_err(), "holds nothing before a claim");
        fence.extend(Instant::now());
        assert!(fence.holds());
        // A renewal sent longer ago than the validity holds nothing.
        let old = Fence::new();
        old.extend(Instant::now() - LEASE_VALID - Duration::from_millis(1));
        assert!(!old.holds());
        // An older renewal's reply arriving late does not shorten it.
        let until = *fence.0.borrow();
        fence.extend(Instant::now() - Duration::from_secs(1));
        assert_eq!(*fence.0.borrow(), until);
        fence.revoke();
        assert!(fence.check().is_err());
        // Waiting for it: over when a renewal succeeds.
        let waiting = fence.clone();
        let held = tokio::spawn(async move { waiting.held().await });
        tokio::task::yield_now().await;
        assert!(!held.is_finished());
        fence.extend(Instant::now());
        tokio::time::timeout(Duration::from_secs(1), held)
            .await
            .expect("held once renewed")
            .expect("join");
    }

    #[test]
    fn one_manager_takes_everything() {
        assert_eq!(
            plan(&[], 1),
            Rebalance {
                give_up: vec![],
                claim: 16
            }
        );
    }

    #[test]
    fn a_second_manager_gets_half() {
        let all: Vec<u32> = (0..16).collect();
        assert_eq!(
            plan(&all, 2),
            Rebalance {
                give_up: vec![15, 14, 13, 12, 11, 10, 9, 8],
                claim: 0
            }
        );
        assert_eq!(plan(&[], 2).claim, 8);
    }

    #[test]
    fn shares_always_cover_every_partition() {
        for members in 1..=40 {
            assert!(share(members) * members >= PARTITIONS as usize);
            assert!(share(members) >= 1);
        }
    }

    #[test]
    fn a_manager_at_its_share_changes_nothing() {
        assert_eq!(
            plan(&[1, 5, 9], 6),
            Rebalance {
                give_up: vec![],
                claim: 0
            }
        );
    }

    #[test]
    fn claim_order_is_a_rotation_of_the_free_partitions() {
        let free = vec![2, 3, 7, 11];
        let order = claim_order("manager-1-abc", &free);
        let mut sorted = order.clone();
        sorted.sort();
        assert_eq!(sorted, free);
        assert!(claim_order("x", &[]).is_empty());
    }
}
