//! The fair share as one manager process sees it ([`Board`]): what every
//! partition wants of each step (watched in the shares bucket), the slots
//! of the live workers serving each step (their heartbeats), and the
//! customers' settings (watched in the tenants bucket). Each partition loop
//! takes a [`ShareView`] from it at every tick and publishes its own
//! demands ([`Published`]); the sharing itself is the engine's
//! (`machine/share.rs`).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_nats::jetstream::kv::{self, CreateErrorKind, UpdateErrorKind};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::ManagerError;
use crate::machine::{ShareView, StepView};
use crate::nats::heartbeat::{ages, record, Heard};
use crate::nats::Nats;
use crate::protocol::{
    parse_share_key, share_key, Demand, JobDemand, Millis, Reservations, Tenant, DEMAND_TTL_MS,
    ROLL_CALL, SHARES_BUCKET, TENANTS_BUCKET, WORKER_HEARTBEATS,
};

/// A partition writes a changed demand at most this often...
const WRITE_EVERY: Duration = Duration::from_millis(250);
/// ...and an unchanged one this often (readers drop one older than
/// [`DEMAND_TTL_MS`]).
const REFRESH_EVERY: Duration = Duration::from_secs(5);

#[derive(Clone, Default)]
pub struct Board {
    state: Arc<Mutex<State>>,
}

#[derive(Default)]
struct State {
    /// Every partition's demand by step: (step, partition) → demand.
    demands: HashMap<(String, u32), Demand>,
    workers: Heard,
    tenants: HashMap<String, Tenant>,
}

impl Board {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding it leaves plain data behind: go on with it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What `partition` needs to know of everyone else at `now`.
    pub fn view(&self, partition: u32, now: Millis) -> ShareView {
        let st = self.state();
        let mut steps: HashMap<String, StepView> = HashMap::new();
        for (_, hb) in ages(&st.workers) {
            if hb.slots == 0 {
                continue;
            }
            for step in &hb.steps {
                let v = steps.entry(step.clone()).or_default();
                v.capacity = Some(v.capacity.unwrap_or(0) + hb.slots);
            }
        }
        for ((step, p), demand) in &st.demands {
            if *p == partition || now.saturating_sub(demand.at) > DEMAND_TTL_MS {
                continue;
            }
            let v = steps.entry(step.clone()).or_default();
            v.others.extend(demand.jobs.iter().cloned());
        }
        ShareView {
            steps,
            tenants: st.tenants.clone(),
            reserved: HashMap::new(),
        }
    }

    /// Keeps the board up to date until `cancel`; watches that fail (a
    /// leader election, a reconnect) start again.
    pub async fn run(self, nats: Nats, cancel: CancellationToken) -> Result<(), ManagerError> {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                r = self.watch(&nats) => {
                    if let Err(e) = r {
                        warn!(error = %e, "fair-share view interrupted; watching again");
                    }
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    async fn watch(&self, nats: &Nats) -> Result<(), String> {
        let bucket = |name: &'static str| async move {
            nats.js
                .get_key_value(name)
                .await
                .map_err(|e| format!("{name}: {e}"))
        };
        let (shares, tenants) = (bucket(SHARES_BUCKET).await?, bucket(TENANTS_BUCKET).await?);
        let mut beats = nats
            .client
            .subscribe(WORKER_HEARTBEATS)
            .await
            .map_err(|e| format!("worker heartbeats: {e}"))?;
        // Workers answer at once rather than at their next heartbeat.
        if let Err(e) = nats.client.publish(ROLL_CALL, Default::default()).await {
            debug!(error = %e, "roll call");
        }
        let mut demands = shares
            .watch_with_history(">")
            .await
            .map_err(|e| format!("{SHARES_BUCKET}: {e}"))?;
        let mut settings = tenants
            .watch_with_history(">")
            .await
            .map_err(|e| format!("{TENANTS_BUCKET}: {e}"))?;
        let mut prune = tokio::time::interval(Duration::from_secs(60));
        loop {
            tokio::select! {
                entry = demands.next() => match entry {
                    Some(Ok(e)) => self.demand(e),
                    Some(Err(e)) => return Err(format!("{SHARES_BUCKET}: {e}")),
                    None => return Err(format!("{SHARES_BUCKET}: the watch ended")),
                },
                entry = settings.next() => match entry {
                    Some(Ok(e)) => self.tenant(e),
                    Some(Err(e)) => return Err(format!("{TENANTS_BUCKET}: {e}")),
                    None => return Err(format!("{TENANTS_BUCKET}: the watch ended")),
                },
                msg = beats.next() => match msg {
                    Some(msg) => record(&mut self.state().workers, &msg),
                    None => return Err("worker heartbeats: the subscription ended".into()),
                },
                _ = prune.tick() => {
                    let live = ages(&self.state().workers).into_iter().map(|(_, hb)| hb.id).collect::<Vec<_>>();
                    self.state().workers.retain(|id, _| live.contains(id));
                }
            }
        }
    }

    fn demand(&self, entry: kv::Entry) {
        let Some(key) = parse_share_key(&entry.key) else {
            return;
        };
        let mut st = self.state();
        match entry.operation {
            kv::Operation::Put => match serde_json::from_slice::<Demand>(&entry.value) {
                Ok(d) => {
                    st.demands.insert(key, d);
                }
                Err(e) => debug!(key = %entry.key, error = %e, "unreadable demand"),
            },
            kv::Operation::Delete | kv::Operation::Purge => {
                st.demands.remove(&key);
            }
        }
    }

    fn tenant(&self, entry: kv::Entry) {
        let mut st = self.state();
        let put = matches!(entry.operation, kv::Operation::Put);
        match serde_json::from_slice::<Tenant>(&entry.value) {
            Ok(t) if put => {
                st.tenants.insert(t.customer.clone(), t);
            }
            _ => {
                // A deleted key names no customer: find it by its key.
                st.tenants
                    .retain(|c, _| crate::protocol::tenant_key(c) != entry.key);
            }
        }
    }
}

/// What one partition last wrote, per step, so it writes only changes.
#[derive(Default)]
pub struct Published {
    last: HashMap<String, (Vec<JobDemand>, Instant)>,
    bucket: Option<kv::Store>,
}

/// The shares bucket's handle, looked up once.
async fn shares_bucket<'a>(
    nats: &Nats,
    cached: &'a mut Option<kv::Store>,
) -> Result<&'a kv::Store, ManagerError> {
    if cached.is_none() {
        let store = nats
            .js
            .get_key_value(SHARES_BUCKET)
            .await
            .map_err(|e| ManagerError::Nats(format!("{SHARES_BUCKET}: {e}")))?;
        *cached = Some(store);
    }
    cached
        .as_ref()
        .ok_or_else(|| ManagerError::Nats(format!("{SHARES_BUCKET}: no handle")))
}

impl Published {
    /// Writes this partition's demands that changed (or are due to be
    /// rewritten), and an empty one for each step it no longer runs on.
    pub async fn write(
        &mut self,
        nats: &Nats,
        partition: u32,
        demands: &BTreeMap<String, Vec<JobDemand>>,
        now: Millis,
    ) -> Result<(), ManagerError> {
        let gone: Vec<String> = self
            .last
            .keys()
            .filter(|k| !demands.contains_key(*k))
            .cloned()
            .collect();
        let empty = Vec::new();
        let changes: Vec<(&str, &Vec<JobDemand>)> = demands
            .iter()
            .map(|(k, v)| (k.as_str(), v))
            .chain(gone.iter().map(|k| (k.as_str(), &empty)))
            .collect();
        for (step, jobs) in changes {
            let due = match self.last.get(step) {
                None => true,
                Some((prev, at)) => {
                    (prev != jobs && at.elapsed() >= WRITE_EVERY) || at.elapsed() >= REFRESH_EVERY
                }
            };
            if !due {
                continue;
            }
            let Some((workflow, name)) = step.split_once('.') else {
                continue;
            };
            let store = shares_bucket(nats, &mut self.bucket).await?;
            let demand = Demand {
                at: now,
                jobs: jobs.clone(),
            };
            let body = serde_json::to_vec(&demand)
                .map_err(|e| ManagerError::Nats(format!("encoding a demand: {e}")))?;
            store
                .put(share_key(workflow, name, partition), body.into())
                .await
                .map_err(|e| ManagerError::Nats(format!("writing a demand: {e}")))?;
            if jobs.is_empty() {
                self.last.remove(step);
            } else {
                self.last
                    .insert(step.to_string(), (jobs.clone(), Instant::now()));
            }
        }
        Ok(())
    }
}

/// The room one partition has reserved under each cap (see
/// [`Reservations`]), kept in step with what its engine wants.
#[derive(Default)]
pub struct Reserved {
    held: HashMap<String, u64>,
    /// Whether the bucket was read for this partition's reservations (a
    /// manager taking a partition over gives back what it does not need).
    found: bool,
    bucket: Option<kv::Store>,
}

impl Reserved {
    /// What was reserved, by cap key (as of the last [`sync`](Self::sync)).
    pub fn held(&self) -> HashMap<String, u64> {
        self.held.clone()
    }

    /// Moves this partition's reservation under each cap toward what its
    /// jobs want (`wanted`: cap key → (cap, want)): lowering always
    /// succeeds, raising takes what the cap leaves beside the other
    /// partitions' reservations, each change a revision-checked update.
    /// A cap no job wants any more is given back. On an error the last
    /// reservation is kept (it is still counted in the bucket).
    pub async fn sync(
        &mut self,
        nats: &Nats,
        partition: u32,
        wanted: &BTreeMap<String, (u64, u64)>,
    ) -> Result<(), ManagerError> {
        let mut keys: Vec<(String, u64, u64)> = wanted
            .iter()
            .map(|(k, (cap, want))| (k.clone(), *cap, *want))
            .collect();
        for k in self.held.keys() {
            if !wanted.contains_key(k) {
                keys.push((k.clone(), 0, 0));
            }
        }
        if self.found && keys.is_empty() {
            return Ok(());
        }
        let store = shares_bucket(nats, &mut self.bucket).await?.clone();
        if !self.found {
            for (key, n) in reservations_of(&store, partition).await? {
                if !wanted.contains_key(&key) {
                    keys.push((key.clone(), 0, 0));
                }
                self.held.insert(key, n);
            }
            self.found = true;
        }
        for (key, cap, want) in keys {
            match reserve(&store, &key, partition, cap, want).await {
                Ok(0) => {
                    self.held.remove(&key);
                }
                Ok(n) => {
                    self.held.insert(key, n);
                }
                Err(e) => {
                    warn!(key, error = %e, "could not change a reservation under a cap; keeping the last one")
                }
            }
        }
        Ok(())
    }
}

/// What `partition` has reserved under every cap, as the bucket says.
async fn reservations_of(
    store: &kv::Store,
    partition: u32,
) -> Result<Vec<(String, u64)>, ManagerError> {
    let fail = |e: &dyn std::fmt::Display| ManagerError::Nats(format!("{SHARES_BUCKET}: {e}"));
    let mut keys = store.keys().await.map_err(|e| fail(&e))?;
    let mut caps = Vec::new();
    while let Some(key) = keys.next().await {
        let key = key.map_err(|e| fail(&e))?;
        if key.starts_with("cap.") {
            caps.push(key);
        }
    }
    let mut out = Vec::new();
    for key in caps {
        if let Some(bytes) = store.get(&key).await.map_err(|e| fail(&e))? {
            let r: Reservations = serde_json::from_slice(&bytes).unwrap_or_default();
            if let Some(n) = r.partitions.get(&partition) {
                out.push((key, *n));
            }
        }
    }
    Ok(out)
}

/// One revision-checked change of `partition`'s reservation under `key`;
/// what it holds after.
async fn reserve(
    store: &kv::Store,
    key: &str,
    partition: u32,
    cap: u64,
    want: u64,
) -> Result<u64, String> {
    for _ in 0..5 {
        let entry = store.entry(key).await.map_err(|e| e.to_string())?;
        let (mut r, revision) = match &entry {
            Some(e) if matches!(e.operation, kv::Operation::Put) => (
                serde_json::from_slice::<Reservations>(&e.value).unwrap_or_default(),
                Some(e.revision),
            ),
            _ => (Reservations::default(), None),
        };
        let mine = r.partitions.get(&partition).copied().unwrap_or(0);
        let others: u64 = r
            .partitions
            .iter()
            .filter(|(p, _)| **p != partition)
            .map(|(_, n)| *n)
            .sum();
        let new = if want <= mine {
            want
        } else {
            want.min(cap.saturating_sub(others)).max(mine)
        };
        if new == mine {
            return Ok(mine);
        }
        if new == 0 {
            r.partitions.remove(&partition);
        } else {
            r.partitions.insert(partition, new);
        }
        let body: bytes::Bytes = serde_json::to_vec(&r).map_err(|e| e.to_string())?.into();
        let written = match revision {
            Some(rev) => store.update(key, body, rev).await.map(|_| ()).map_err(|e| {
                (
                    e.kind() == UpdateErrorKind::WrongLastRevision,
                    e.to_string(),
                )
            }),
            None => store
                .create(key, body)
                .await
                .map(|_| ())
                .map_err(|e| (e.kind() == CreateErrorKind::AlreadyExists, e.to_string())),
        };
        match written {
            Ok(()) => return Ok(new),
            Err((true, _)) => continue, // another partition changed it: read again
            Err((false, e)) => return Err(e),
        }
    }
    Err("the key kept changing under five attempts".into())
}
