//! The workflow manager, the only writer of job state. Its parts:
//! - the coordinator (here): renews the partition leases every round (see
//!   [`crate::nats::leases`]) and starts and stops one event loop per
//!   partition held, each fenced by its lease;
//! - [`partition`]: one partition's event loop around the pure
//!   [`crate::machine::Engine`], with checkpoints;
//! - [`executor`]: carries out the engine's actions on NATS;
//! - [`intake`]: turns submissions into `JobRequested` events;
//! - [`status`]: the status service customers ask;
//! - [`advisories`]: fails subjobs whose last attempt timed out;
//! - [`shares`]: the fair share's view (demands, heartbeats, customers'
//!   settings) and voice (this manager's demands and reservations).

mod advisories;
mod cancel;
mod executor;
pub mod index;
pub mod intake;
mod list;
mod partition;
mod redrive;
mod results;
mod shares;
mod status;
mod update;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

pub use executor::{Executor, Writer};
use partition::EventLoop;

use crate::nats::heartbeat::{beat, process_id};
use crate::nats::leases::{
    self, Fence, Hold, LeaseError, Partitions as PartitionLeases, LEASE_ROUND, LEASE_VALID,
};
use crate::nats::log::LogError;
use crate::nats::placement;
use crate::nats::store::StoreError;
use crate::nats::{Nats, SetupError};
use crate::protocol::{Heartbeat, PARTITIONS};

#[derive(Debug, Error)]
pub enum ManagerError {
    #[error(transparent)]
    Setup(#[from] SetupError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Leases(#[from] LeaseError),
    #[error(transparent)]
    Log(#[from] LogError),
    #[error("NATS: {0}")]
    Nats(String),
    /// The partition's lease is not certainly held: nothing was written.
    #[error(transparent)]
    Fenced(#[from] leases::Fenced),
    /// Another manager wrote a job record of this partition: this one's
    /// state is stale, and is loaded again.
    #[error(transparent)]
    Conflict(StoreError),
}

/// Manager settings.
#[derive(Debug, Clone)]
pub struct ManagerOptions {
    /// How often deadlines and in-flight windows are checked.
    pub tick: Duration,
    /// Most events applied between two checkpoints.
    pub batch: usize,
    /// Longest time between two checkpoints (and so the status lag).
    pub checkpoint_every: Duration,
    /// A job whose in-flight subjobs show no progress this long is checked
    /// for lost tasks.
    pub stall_after: Duration,
    /// Per-customer submission limits of the intake.
    pub intake: intake::IntakeLimits,
    /// Fair share: fanouts dispatch their share of the step's worker slots
    /// plus this much work ahead (so the work queue holds little more than
    /// can start soon). `None`: each job dispatches up to its
    /// `max_in_flight`, first come first served.
    pub queue_ahead: Option<Duration>,
    /// Keep each cell's leaders on the node leading its log, the cells'
    /// logs on different nodes ([`placement`]).
    pub keep_leaders_together: bool,
}

impl Default for ManagerOptions {
    fn default() -> Self {
        ManagerOptions {
            tick: Duration::from_millis(500),
            batch: 2000,
            checkpoint_every: Duration::from_millis(100),
            stall_after: Duration::from_secs(30),
            intake: intake::IntakeLimits::default(),
            queue_ahead: Some(Duration::from_millis(50)),
            keep_leaders_together: true,
        }
    }
}

/// Runs the intake, the advisory watcher and, for every partition this
/// manager holds a lease on, an event loop, until `cancel`.
pub async fn run(
    nats: Nats,
    options: ManagerOptions,
    cancel: CancellationToken,
) -> Result<(), ManagerError> {
    let id = process_id("manager");
    // The lease bucket may be electing a leader (a node restarting): wait.
    let mut pause = Duration::from_millis(250);
    let mut nats = nats;
    let mut leases = loop {
        let opened = match nats.clone().with_task_key().await {
            Ok(keyed) => {
                nats = keyed;
                PartitionLeases::open(&nats, id.clone())
                    .await
                    .map_err(|e| e.to_string())
            }
            Err(e) => Err(e.to_string()),
        };
        match opened {
            Ok(l) => break l,
            Err(e) => {
                warn!(error = %e, retry_in = ?pause, "waiting for the lease and key buckets");
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(pause) => {}
                }
                pause = (pause * 2).min(Duration::from_secs(5));
            }
        }
    };
    let mut tasks = JoinSet::new();
    tasks.spawn(intake::run(nats.clone(), options.intake, cancel.clone()));
    tasks.spawn(status::run(nats.clone(), cancel.clone()));
    tasks.spawn(list::run(nats.clone(), cancel.clone()));
    // One index consumer across every manager; the others stand by.
    let (n, c, me) = (nats.clone(), cancel.clone(), id.clone());
    tasks.spawn(async move {
        crate::shutdown::supervise("job index", c.clone(), move || {
            let (n, c, me) = (n.clone(), c.clone(), me.clone());
            async move {
                leases::exclusive(&n, "index", &me, Hold::Fenced, &c, |inner, fence| {
                    index::run(n.clone(), inner, Some(fence))
                })
                .await
            }
        })
        .await;
        Ok(())
    });
    if options.keep_leaders_together {
        // One process at a time keeps the leaders beside the log's.
        let (n, c, me) = (nats.clone(), cancel.clone(), id.clone());
        tasks.spawn(async move {
            crate::shutdown::supervise("leader placement", c.clone(), move || {
                let (n, c, me) = (n.clone(), c.clone(), me.clone());
                async move {
                    leases::exclusive(
                        &n,
                        "placement",
                        &me,
                        Hold::UntilTaken,
                        &c,
                        |inner, _fence| placement::run(n.clone(), inner),
                    )
                    .await
                }
            })
            .await;
            Ok(())
        });
    }
    tasks.spawn(cancel::run(nats.clone(), cancel.clone()));
    tasks.spawn(update::run(nats.clone(), cancel.clone()));
    tasks.spawn(redrive::run(nats.clone(), cancel.clone()));
    tasks.spawn(results::run(nats.clone(), id.clone(), cancel.clone()));
    tasks.spawn(advisories::run(nats.clone(), cancel.clone()));
    let board = shares::Board::default();
    if options.queue_ahead.is_some() {
        tasks.spawn(board.clone().run(nats.clone(), cancel.clone()));
    }
    let running: Arc<Vec<AtomicU64>> =
        Arc::new((0..PARTITIONS).map(|_| AtomicU64::new(0)).collect());
    let owned = Arc::new(AtomicU64::new(0));
    let (beat_cancel, beat_nats) = (cancel.clone(), nats.clone());
    let (beat_running, beat_owned, beat_id) = (running.clone(), owned.clone(), id.clone());
    tasks.spawn(async move {
        beat(beat_nats.client, beat_nats.user, beat_cancel, move || {
            Heartbeat {
                role: "manager".into(),
                id: beat_id.clone(),
                jobs: beat_running.iter().map(|n| n.load(Ordering::Relaxed)).sum(),
                partitions: beat_owned.load(Ordering::Relaxed),
                ..Default::default()
            }
        })
        .await;
        Ok(())
    });
    info!(manager = %id, "manager running; claiming partitions of the event log");
    let mut loops = Partitions {
        id: id.clone(),
        nats: nats.clone(),
        options,
        running,
        board,
        cancel: cancel.clone(),
        loops: BTreeMap::new(),
        stopping: Vec::new(),
    };
    let mut round = tokio::time::interval(LEASE_ROUND);
    round.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = round.tick() => {}
        }
        loops.round(&mut leases, &id).await;
        owned.store(leases.held().len() as u64, Ordering::Relaxed);
    }
    cancel.cancel();
    let all: Vec<u32> = loops.loops.keys().copied().collect();
    loops.stop(&all).await;
    // At a shutdown, what stops late is waited for (within the grace).
    for (p, handle) in loops.stopping.drain(..) {
        if let Err(e) = handle.await {
            error!(partition = p, error = %e, "partition loop panicked");
        }
    }
    leases.leave(Duration::from_secs(2)).await;
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(Err(e)) => error!(error = %e, "manager task failed"),
            Err(e) => error!(error = %e, "manager task panicked"),
            Ok(Ok(())) => {}
        }
    }
    Ok(())
}

/// The event loops of the partitions this manager holds.
struct Partitions {
    /// This manager's id, on everything it writes.
    id: String,
    nats: Nats,
    options: ManagerOptions,
    running: Arc<Vec<AtomicU64>>,
    board: shares::Board,
    cancel: CancellationToken,
    loops: BTreeMap<u32, (CancellationToken, tokio::task::JoinHandle<()>)>,
    /// Loops told to stop that had not ended within [`STOP_WAIT`]: their
    /// fences are revoked, so they write nothing more; they end on their own.
    stopping: Vec<(u32, tokio::task::JoinHandle<()>)>,
}

/// How long a lease round waits for a stopping loop. A loop waiting on a
/// NATS request (its cell's streams electing a leader) can take seconds to
/// notice, and the round renews every other partition's lease: waiting
/// for it would let their fences lapse.
const STOP_WAIT: Duration = Duration::from_secs(1);

impl Partitions {
    /// One lease round: renew, stop what was lost (its fence revoked, so
    /// its loop writes nothing more), then move toward an equal share (stop
    /// and release extras, claim and start free ones). A lease not renewed
    /// this round is kept: its fence pauses its loop if renewals keep
    /// failing, and a later renewal lets it go on.
    async fn round(&mut self, leases: &mut PartitionLeases, id: &str) {
        let step = LEASE_VALID / 2;
        self.revive(leases);
        let lost = tokio::time::timeout(step, leases.renew())
            .await
            .unwrap_or_default();
        let stopped: Vec<u32> = lost.iter().map(|(p, _)| *p).collect();
        self.stop(&stopped).await;
        // Leases that expired while the lease bucket could not be written
        // (a leader election) are claimed again at once, so that a store
        // outage does not reshuffle every partition between managers. The
        // loop starts afresh from the checkpoints.
        for (p, _) in lost.iter().filter(|(_, gone)| *gone) {
            if let Ok(true) = leases.claim(*p).await {
                if let Some(fence) = leases.fence(*p) {
                    self.start(*p, fence);
                }
            }
        }
        let (members, free) = match tokio::time::timeout(step, leases.survey()).await {
            Ok(Ok(survey)) => survey,
            Ok(Err(e)) => return warn!(error = %e, "could not read the partition leases"),
            Err(_) => return warn!("reading the partition leases timed out"),
        };
        let change = leases::plan(&leases.held(), members);
        self.stop(&change.give_up).await;
        for p in &change.give_up {
            leases.release(*p).await;
        }
        let mut claimed = 0;
        for p in leases::claim_order(id, &free) {
            if claimed == change.claim {
                break;
            }
            match leases.claim(p).await {
                Ok(true) => {
                    claimed += 1;
                    if let Some(fence) = leases.fence(p) {
                        self.start(p, fence);
                    }
                }
                Ok(false) => {}
                Err(e) => {
                    warn!(error = %e, "could not claim a partition");
                    break;
                }
            }
        }
        if !change.give_up.is_empty() || claimed > 0 {
            info!(managers = members, held = ?leases.held(), "partitions rebalanced");
        }
    }

    fn start(&mut self, p: u32, fence: Fence) {
        let cancel = self.cancel.child_token();
        let event_loop = EventLoop::new(
            self.nats.clone(),
            self.options.clone(),
            p,
            Writer {
                manager: self.id.clone(),
                fence,
            },
            self.running.clone(),
            self.board.clone(),
        );
        let c = cancel.clone();
        let handle = tokio::spawn(async move {
            if let Err(e) = event_loop.run(c).await {
                error!(partition = p, error = %e, "partition loop failed");
            }
        });
        self.loops.insert(p, (cancel, handle));
    }

    /// Starts again a loop that ended without being asked to (a panic; an
    /// event loop otherwise retries its own errors), so a held partition
    /// is never left unread.
    fn revive(&mut self, leases: &PartitionLeases) {
        let ended: Vec<u32> = self
            .loops
            .iter()
            .filter(|(_, (cancel, handle))| handle.is_finished() && !cancel.is_cancelled())
            .map(|(p, _)| *p)
            .collect();
        for p in ended {
            error!(
                partition = p,
                "partition loop ended unexpectedly; starting it again"
            );
            if let Some(fence) = leases.fence(p) {
                self.start(p, fence);
            }
        }
    }

    /// Stops these partitions' loops (each stores what it applied first)
    /// and waits until they have, [`STOP_WAIT`] at most: one that takes
    /// longer goes on ending in the background, its lease given up or lost
    /// (a released lease's fence is revoked first, so it writes nothing).
    async fn stop(&mut self, partitions: &[u32]) {
        self.stopping.retain(|(_, h)| !h.is_finished());
        let stopping: Vec<_> = partitions
            .iter()
            .filter_map(|p| self.loops.remove(p).map(|l| (*p, l)))
            .collect();
        for (_, (cancel, _)) in &stopping {
            cancel.cancel();
        }
        let until = tokio::time::Instant::now() + STOP_WAIT;
        for (p, (_, mut handle)) in stopping {
            match tokio::time::timeout_at(until, &mut handle).await {
                Ok(Err(e)) => error!(partition = p, error = %e, "partition loop panicked"),
                Ok(Ok(())) => {}
                Err(_) => {
                    debug!(partition = p, "a stopping loop has not ended yet; going on");
                    self.stopping.push((p, handle));
                }
            }
            if let Some(n) = self.running.get(p as usize) {
                n.store(0, Ordering::Relaxed);
            }
        }
    }
}
