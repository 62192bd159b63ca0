//! Partition ownership: managers split the event log's partitions between
//! them through leases in a KV bucket.
//!
//! Each partition is read by one manager at a time, through its own durable
//! consumer, so a job's events keep their order and its state has a single
//! writer, exactly as with one manager; more managers share the partitions.
//!
//! Every round (a fifth of a lease's life) a manager renews its membership
//! key and its leases, counts the live managers, and moves toward an equal
//! share, `ceil(partitions / managers)`: it gives up extra partitions
//! (stopping their loops first) and claims free ones with `create`, which
//! only one manager can win. Entries expire unrenewed after [`LEASE_TTL`],
//! so a killed manager's partitions are free again after at most that long.
//! A manager that could not renew a lease for half its life treats it as
//! lost and stops that partition's loop, well before the entry can expire
//! and another manager claim it.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use async_nats::jetstream::kv::{self, CreateErrorKind, UpdateErrorKind};
use futures::TryStreamExt;
use thiserror::Error;
use tracing::{debug, warn};

use crate::protocol::{lease_key, member_key, LEASES_BUCKET, LEASE_TTL, PARTITIONS};
use crate::setup::Nats;

#[derive(Debug, Error)]
pub enum LeaseError {
    #[error("partition leases ({LEASES_BUCKET}): {0}")]
    Nats(String),
}

struct Held {
    revision: u64,
    renewed: Instant,
}

/// This manager's membership and the partitions it holds.
pub struct Leases {
    kv: kv::Store,
    me: String,
    held: BTreeMap<u32, Held>,
}

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
    let mut give_up: Vec<u32> = held
        .iter()
        .copied()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    give_up.reverse();
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
    let start = crate::protocol::partition(me) as usize % free.len();
    free[start..]
        .iter()
        .chain(&free[..start])
        .copied()
        .collect()
}

impl Leases {
    /// Opens the lease bucket (created by [`Nats::ensure`]).
    pub async fn open(nats: &Nats, me: String) -> Result<Self, LeaseError> {
        let kv = nats
            .js
            .get_key_value(LEASES_BUCKET)
            .await
            .map_err(|e| LeaseError::Nats(e.to_string()))?;
        Ok(Leases {
            kv,
            me,
            held: BTreeMap::new(),
        })
    }

    /// Partitions held, in order.
    pub fn held(&self) -> Vec<u32> {
        self.held.keys().copied().collect()
    }

    /// Renews the membership and every held lease. A lease someone else
    /// holds now is dropped and returned.
    pub async fn renew(&mut self) -> Vec<u32> {
        if let Err(e) = self
            .kv
            .put(member_key(&self.me), self.me.clone().into())
            .await
        {
            warn!(error = %e, "could not renew this manager's membership");
        }
        let renewals = self.held.iter().map(|(p, h)| {
            let (kv, me, p, revision) = (self.kv.clone(), self.me.clone(), *p, h.revision);
            async move { (p, kv.update(lease_key(p), me.into(), revision).await) }
        });
        let renewals: Vec<(u32, Result<u64, kv::UpdateError>)> =
            futures::future::join_all(renewals).await;
        let mut lost = Vec::new();
        for (p, result) in renewals {
            match result {
                Ok(revision) => {
                    self.held.insert(
                        p,
                        Held {
                            revision,
                            renewed: Instant::now(),
                        },
                    );
                }
                Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => {
                    warn!(partition = p, "partition lease taken over; stopping it");
                    self.held.remove(&p);
                    lost.push(p);
                }
                Err(e) => warn!(partition = p, error = %e, "could not renew a partition lease"),
            }
        }
        lost
    }

    /// Drops and returns the leases not renewed for half their life: they
    /// may expire soon, and this manager must have stopped reading first.
    pub fn expiring(&mut self) -> Vec<u32> {
        let limit = LEASE_TTL / 2;
        let stale: Vec<u32> = self
            .held
            .iter()
            .filter(|(_, h)| h.renewed.elapsed() >= limit)
            .map(|(p, _)| *p)
            .collect();
        for p in &stale {
            warn!(
                partition = p,
                "partition lease not renewed in time; stopping it"
            );
            self.held.remove(p);
        }
        stale
    }

    /// Live managers (this one included) and the partitions nobody holds.
    pub async fn survey(&self) -> Result<(usize, Vec<u32>), LeaseError> {
        let err = |e: &dyn std::fmt::Display| LeaseError::Nats(e.to_string());
        let keys: Vec<String> = self
            .kv
            .keys()
            .await
            .map_err(|e| err(&e))?
            .try_collect()
            .await
            .map_err(|e| err(&e))?;
        let mut members: BTreeSet<&str> = BTreeSet::new();
        let mut taken = BTreeSet::new();
        for key in &keys {
            if let Some(id) = key.strip_prefix("manager.") {
                members.insert(id);
            } else if let Some(p) = key.strip_prefix("partition.") {
                if let Ok(p) = p.parse::<u32>() {
                    taken.insert(p);
                }
            }
        }
        members.insert(&self.me);
        let free = (0..PARTITIONS)
            .filter(|p| !taken.contains(p) && !self.held.contains_key(p))
            .collect();
        Ok((members.len(), free))
    }

    /// Tries to take a free partition; false when another manager won it.
    pub async fn claim(&mut self, p: u32) -> Result<bool, LeaseError> {
        match self.kv.create(lease_key(p), self.me.clone().into()).await {
            Ok(revision) => {
                debug!(partition = p, "partition lease claimed");
                self.held.insert(
                    p,
                    Held {
                        revision,
                        renewed: Instant::now(),
                    },
                );
                Ok(true)
            }
            Err(e) if e.kind() == CreateErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(LeaseError::Nats(e.to_string())),
        }
    }

    /// Gives a partition up (its loop must have stopped).
    pub async fn release(&mut self, p: u32) {
        if let Some(h) = self.held.remove(&p) {
            if let Err(e) = self
                .kv
                .delete_expect_revision(lease_key(p), Some(h.revision))
                .await
            {
                debug!(partition = p, error = %e, "releasing a lease; it will expire instead");
            }
        }
    }

    /// Gives every partition up and leaves (graceful shutdown), so other
    /// managers take over at once instead of after the leases expire.
    pub async fn leave(&mut self, within: Duration) {
        let leave = async {
            for p in self.held() {
                self.release(p).await;
            }
            let _ = self.kv.delete(member_key(&self.me)).await;
        };
        let _ = tokio::time::timeout(within, leave).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
