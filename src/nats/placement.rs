//! Keeps each cell's streams, buckets and durable consumers led from the
//! node that leads the cell's event log, and the cells' logs led from
//! different nodes.
//!
//! Why: on a cluster, each stream, bucket and durable consumer is a Raft
//! group of its own with a leader of its own, and a group whose leader dies
//! takes nothing (no write, no pull) until its followers elect another,
//! 4 to 9 s later (nats-server's election timeout, not configurable). A
//! subjob's path crosses many groups: the event log, the work queue, a
//! step's consumer, a partition's consumer, the job and pending buckets,
//! the leases. Left where elections put them, the leaders spread over the
//! nodes, so the loss of almost any node stalls every partition for an
//! election (docs/RELIABILITY.md measures it). Kept on the node leading
//! their cell's log, the loss of a node stalls the cell it leads (a third
//! of the partitions on three nodes), and the loss of a node leading no
//! cell costs the clients a reconnect.
//!
//! The rule is [`plan`] (pure): every group led from elsewhere than its
//! cell's log leader (groups all cells share: cell 0's) whose peers
//! include an up-to-date copy there is asked to step down in its favour
//! (`$JS.API.STREAM.LEADER.STEPDOWN`, `…CONSUMER.LEADER.STEPDOWN` with a
//! preferred server, a hand-over that takes a moment rather than an
//! election). A cell's log led from the node of a lower cell's log is asked
//! to move to a node that leads no cell's log, if one has an up-to-date
//! copy; otherwise logs never move, and the rest follow them. A group asked
//! to move that is still elsewhere on the next look is left alone for a
//! while, doubling, so a refusal never turns into a storm of step-downs.
//! One process at a time does this (a lease, [`super::leases::exclusive`]);
//! on a single server every leader is the same and nothing is ever asked.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use async_nats::jetstream::stream::{self, ClusterInfo, PeerInfo};
use futures::TryStreamExt;
use serde_json::json;
use thiserror::Error;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::Nats;
use crate::protocol::{events_stream, stream_cell, CELLS, EVENTS_STREAM_PREFIX};

/// How often the leaders are looked at (four requests a round).
const ROUND: Duration = Duration::from_secs(1);
/// How often to look when nothing is replicated.
const UNREPLICATED_ROUND: Duration = Duration::from_secs(30);
/// How long a group asked to move is left alone before it is asked again
/// (doubled for every ask that did not take, up to [`BACKOFF_MAX`]).
const BACKOFF: Duration = Duration::from_secs(6);
const BACKOFF_MAX: Duration = Duration::from_secs(120);
/// Most step-downs asked for in one round: a hand-over is short, but many
/// at once would add up.
const MOVES_PER_ROUND: usize = 16;
/// How long a node must have been up to date before a cell's log is moved
/// to it: one that just came back is catching up, and one that comes and
/// goes should not take a cell each time.
const SETTLE: Duration = Duration::from_secs(30);

#[derive(Debug, Error)]
pub enum PlacementError {
    /// Listing streams or consumers failed (NATS unavailable, an election):
    /// the next round tries again.
    #[error("could not list fanjet's streams and consumers: {0}")]
    List(String),
}

/// One Raft group: a stream (a bucket is its stream, `KV_<name>`) or a
/// durable consumer of one.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Group {
    pub stream: String,
    pub consumer: Option<String>,
}

impl Group {
    /// The cell whose log this group follows (cell 0 for what all share).
    pub fn cell(&self) -> u32 {
        stream_cell(&self.stream).unwrap_or(0)
    }

    /// The log stream of a cell itself (not a consumer of it).
    fn log_of(&self) -> Option<u32> {
        let cell = stream_cell(&self.stream)?;
        (self.consumer.is_none() && self.stream.starts_with(EVENTS_STREAM_PREFIX)).then_some(cell)
    }
}

impl std::fmt::Display for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.consumer {
            Some(c) => write!(f, "consumer {c} of {}", self.stream),
            None => write!(f, "stream {}", self.stream),
        }
    }
}

/// Where a group is led from and who could lead it.
#[derive(Debug, Clone, Default)]
pub struct Leadership {
    /// The server leading it; `None` while it elects.
    pub leader: Option<String>,
    /// Its other peers that are up to date (could take over at once).
    pub current: Vec<String>,
}

impl Leadership {
    fn of(cluster: Option<&ClusterInfo>) -> Self {
        let Some(c) = cluster else {
            return Leadership::default();
        };
        Leadership {
            leader: c.leader.clone(),
            current: c
                .replicas
                .iter()
                .filter(|p| up_to_date(p))
                .map(|p| p.name.clone())
                .collect(),
        }
    }
}

/// How recently a peer must have answered its leader to count as up to
/// date. A leader hears from its followers at least every second (its
/// heartbeats), but goes on reporting a peer that stopped answering as
/// `current` until it has been silent 10 s: a node just killed would look
/// like a fine place to move a cell to.
const ANSWERED_WITHIN: Duration = Duration::from_secs(3);

/// Whether a peer could take over at once: up to date, online, and heard
/// from lately.
fn up_to_date(p: &PeerInfo) -> bool {
    p.current && !p.offline && p.active <= ANSWERED_WITHIN
}

/// A step-down to ask for: `group` from `from` to `to`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Move {
    pub group: Group,
    pub from: String,
    pub to: String,
}

/// What a survey saw: where each cell's log is led from, and every group.
#[derive(Debug, Clone, Default)]
pub struct Survey {
    /// The leader of each cell's log (index = cell), `None` while electing
    /// or not replicated.
    pub anchors: Vec<Option<String>>,
    pub groups: BTreeMap<Group, Leadership>,
    /// Each cell's log elected its leader after losing one, less than
    /// [`SETTLE`] ago (index = cell; missing: no).
    pub failed_over: Vec<bool>,
}

impl Survey {
    /// The server a group should be led from: its cell's log leader.
    fn target(&self, g: &Group) -> Option<&str> {
        self.anchors.get(g.cell() as usize)?.as_deref()
    }

    /// Groups not where the rule wants them: led from elsewhere than their
    /// cell's log leader (or electing), and cells' logs led from the node
    /// of a lower cell's log while another node could lead them.
    pub fn misplaced(&self) -> Vec<&Group> {
        self.groups
            .iter()
            .filter(|(g, l)| match g.log_of() {
                Some(c) => {
                    let shared = self.anchors[..c as usize]
                        .iter()
                        .any(|a| a.is_some() && *a == l.leader);
                    let free = l
                        .current
                        .iter()
                        .any(|n| !self.anchors.contains(&Some(n.clone())));
                    l.leader.is_none() || (shared && free)
                }
                None => l.leader.is_none() || l.leader.as_deref() != self.target(g),
            })
            .map(|(g, _)| g)
            .collect()
    }
}

/// The moves that bring the groups where they belong, at most `limit`,
/// none of those `resting` (asked to go to that server recently):
/// - a cell's log led from the node of a lower cell's log goes to a
///   `settled` node with an up-to-date copy that leads no cell's log (the
///   first by name), unless it `failed_over` lately;
///   its cell's other groups wait for it;
/// - every other group led from elsewhere than its cell's log leader, with
///   an up-to-date copy there, goes there.
///
/// Groups electing, or whose peers do not include their target (a replica
/// count below the cluster's size), stay where they are.
pub fn plan(
    survey: &Survey,
    resting: &dyn Fn(&Group, &str) -> bool,
    settled: &dyn Fn(&str) -> bool,
    limit: usize,
) -> Vec<Move> {
    let mut moves = Vec::new();
    let mut anchors = survey.anchors.clone();
    let mut moving = Vec::new();
    for cell in 1..anchors.len() {
        let Some(leader) = anchors[cell].clone() else {
            continue;
        };
        if !anchors[..cell].contains(&Some(leader.clone())) {
            continue;
        }
        // Shared since a node was lost: that node may be the free one,
        // just back (a node killed and started again within seconds never
        // looks absent), so the log stays until the loss is SETTLE old.
        if survey.failed_over.get(cell).copied().unwrap_or(false) {
            continue;
        }
        let group = Group {
            stream: events_stream(cell as u32),
            consumer: None,
        };
        let Some(lead) = survey.groups.get(&group) else {
            continue;
        };
        let mut free: Vec<&String> = lead
            .current
            .iter()
            .filter(|n| !anchors.contains(&Some((*n).clone())) && settled(n))
            .collect();
        free.sort();
        let Some(to) = free.first().map(|n| (*n).clone()) else {
            continue;
        };
        if resting(&group, &to) {
            continue;
        }
        moving.push(cell as u32);
        anchors[cell] = Some(to.clone());
        moves.push(Move {
            group,
            from: leader,
            to,
        });
    }
    for (group, l) in &survey.groups {
        if group.log_of().is_some() || moving.contains(&group.cell()) {
            continue;
        }
        let (Some(from), Some(to)) = (l.leader.as_deref(), survey.target(group)) else {
            continue;
        };
        if from != to && l.current.iter().any(|p| p == to) && !resting(group, to) {
            moves.push(Move {
                group: group.clone(),
                from: from.to_string(),
                to: to.to_string(),
            });
        }
    }
    moves.truncate(limit);
    moves
}

/// Whether a stream's leader was elected after it lost one, less than
/// [`SETTLE`] ago: led since well after the stream was created (its first
/// leader is elected with it), and not for long. The times are the
/// servers' clocks against this one's; a skew of a few seconds only moves
/// the moment a cell goes back.
fn failed_over_lately(info: &stream::Info) -> bool {
    let Some(since) = info.cluster.as_ref().and_then(|c| c.leader_since) else {
        return false;
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128);
    let (since, created) = (
        since.unix_timestamp_nanos(),
        info.created.unix_timestamp_nanos(),
    );
    let secs = |d: Duration| d.as_nanos() as i128;
    since - created > secs(FIRST_LEADER_WITHIN) && now - since < secs(SETTLE)
}

/// A stream's first leader is elected within this long of its creation.
const FIRST_LEADER_WITHIN: Duration = Duration::from_secs(10);

/// Whether a stream is fanjet's: its streams, and the streams of its
/// buckets and object stores.
fn ours(stream: &str) -> bool {
    stream.starts_with("FANJET_")
        || stream.starts_with("KV_fanjet_")
        || stream.starts_with("OBJ_fanjet_")
}

/// How long one listing or step-down may take: a stream electing a leader
/// does not answer, and the others should not wait for it.
const LIST_TIMEOUT: Duration = Duration::from_secs(3);

/// Every group of fanjet's, replicated ones only, with its leadership; and
/// each cell's log leader. A stream whose consumers cannot be listed now
/// (it is electing) is surveyed without them.
pub async fn survey(nats: &Nats) -> Result<Survey, PlacementError> {
    let err = |e: &dyn std::fmt::Display| PlacementError::List(e.to_string());
    let streams: Vec<_> = tokio::time::timeout(LIST_TIMEOUT, nats.js.streams().try_collect())
        .await
        .map_err(|e| err(&e))?
        .map_err(|e| err(&e))?;
    let mut groups = BTreeMap::new();
    let mut anchors = vec![None; CELLS as usize];
    let mut failed_over = vec![false; CELLS as usize];
    let mut listings = Vec::new();
    for info in streams {
        let name = info.config.name.clone();
        if !ours(&name) || info.config.num_replicas < 2 {
            continue;
        }
        let lead = Leadership::of(info.cluster.as_ref());
        if let Some(cell) = (Group {
            stream: name.clone(),
            consumer: None,
        })
        .log_of()
        {
            anchors[cell as usize] = lead.leader.clone();
            failed_over[cell as usize] = failed_over_lately(&info);
        }
        // Buckets and object stores have only their watchers' ephemeral
        // consumers; listing them can wait for a dead node's answer.
        let durables =
            name.starts_with("FANJET_") && info.state.consumer_count > 0 && lead.leader.is_some();
        groups.insert(
            Group {
                stream: name.clone(),
                consumer: None,
            },
            lead,
        );
        if durables {
            listings.push(name);
        }
    }
    // Each stream's consumers at once: one slow answer holds up no other.
    let listed = futures::future::join_all(listings.into_iter().map(|name| async move {
        let consumers = async {
            let stream = nats
                .js
                .get_stream_no_info(&name)
                .await
                .map_err(|e| err(&e))?;
            stream
                .consumers()
                .try_collect::<Vec<_>>()
                .await
                .map_err(|e| err(&e))
        };
        let listed = tokio::time::timeout(LIST_TIMEOUT, consumers).await;
        (name, listed)
    }))
    .await;
    for (name, listed) in listed {
        let consumers = match listed {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                debug!(stream = name, error = %e, "placement: consumers not listed");
                continue;
            }
            Err(_) => {
                debug!(stream = name, "placement: consumers not listed in time");
                continue;
            }
        };
        for c in consumers {
            // Ephemeral consumers (ordered readers) have one replica:
            // nothing to move, and their clients recreate them.
            let replicated = c.cluster.as_ref().is_some_and(|cl| !cl.replicas.is_empty());
            if c.config.durable_name.is_none() || !replicated {
                continue;
            }
            groups.insert(
                Group {
                    stream: name.clone(),
                    consumer: Some(c.name.clone()),
                },
                Leadership::of(c.cluster.as_ref()),
            );
        }
    }
    Ok(Survey {
        anchors,
        groups,
        failed_over,
    })
}

/// Asks `m.group`'s leader to hand over to `m.to`.
async fn step_down(nats: &Nats, m: &Move) -> Result<(), String> {
    let subject = match &m.group.consumer {
        Some(c) => format!("CONSUMER.LEADER.STEPDOWN.{}.{c}", m.group.stream),
        None => format!("STREAM.LEADER.STEPDOWN.{}", m.group.stream),
    };
    let body = json!({ "placement": { "preferred": m.to } });
    let answer: serde_json::Value =
        tokio::time::timeout(LIST_TIMEOUT, nats.js.request(subject, &body))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
    match answer.get("error") {
        Some(e) => Err(e.to_string()),
        None => Ok(()),
    }
}

/// What was asked of each group lately: toward which server, when it may
/// be asked again and how many asks have not taken.
#[derive(Default)]
struct Asked(BTreeMap<Group, (String, Instant, u32)>);

impl Asked {
    /// Asked to go to `to` lately (a new target is asked at once).
    fn resting(&self, g: &Group, to: &str, now: Instant) -> bool {
        self.0
            .get(g)
            .is_some_and(|(target, until, _)| target == to && now < *until)
    }

    fn asked(&mut self, g: &Group, to: &str, now: Instant) {
        let tries = match self.0.get(g) {
            Some((target, _, t)) if target == to => *t + 1,
            _ => 1,
        };
        let wait = BACKOFF
            .saturating_mul(1 << (tries - 1).min(5))
            .min(BACKOFF_MAX);
        self.0
            .insert(g.clone(), (to.to_string(), now + wait, tries));
    }

    /// Forgets groups now where they belong (or gone).
    fn settle(&mut self, survey: &Survey) {
        let misplaced = survey.misplaced();
        self.0.retain(|g, _| misplaced.contains(&g));
    }
}

/// Keeps the leaders together until `cancel`. Run under a lease held with
/// [`Hold::UntilTaken`](super::leases::Hold): two keepers for a moment
/// ask for the same hand-overs, which is harmless, and a keeper must not
/// stop while the lease bucket elects a leader, when it is needed most.
pub async fn run(nats: Nats, cancel: CancellationToken) -> Result<(), PlacementError> {
    let mut asked = Asked::default();
    // Since when each node has been seen up to date (the nodes of the first
    // survey count as settled).
    let mut seen: Option<BTreeMap<String, Instant>> = None;
    let mut round = tokio::time::interval(ROUND);
    round.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = round.tick() => {}
        }
        let survey = match survey(&nats).await {
            Ok(s) => s,
            Err(e) => {
                debug!(error = %e, "placement: no survey this round");
                continue;
            }
        };
        if survey.groups.is_empty() {
            // A single server (or one replica of everything): nothing to
            // keep, look again now and then in case that changes.
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                _ = tokio::time::sleep(UNREPLICATED_ROUND) => {}
            }
            continue;
        }
        asked.settle(&survey);
        let now = Instant::now();
        let present: std::collections::BTreeSet<&String> = survey
            .groups
            .values()
            .flat_map(|l| l.current.iter().chain(l.leader.iter()))
            .collect();
        let since = seen.get_or_insert_with(|| {
            let settled = now.checked_sub(SETTLE).unwrap_or(now);
            present.iter().map(|n| ((*n).clone(), settled)).collect()
        });
        since.retain(|n, _| present.contains(n));
        for n in &present {
            since.entry((*n).clone()).or_insert(now);
        }
        if tracing::enabled!(tracing::Level::DEBUG) {
            let away: Vec<String> = survey.misplaced().iter().map(|g| g.to_string()).collect();
            let resting: Vec<String> = asked
                .0
                .iter()
                .map(|(g, (to, _, t))| format!("{g} to {to} x{t}"))
                .collect();
            debug!(anchors = ?survey.anchors, ?away, ?resting, "placement round");
        }
        let settled = |n: &str| {
            since
                .get(n)
                .is_some_and(|t| now.duration_since(*t) >= SETTLE)
        };
        let moves = plan(
            &survey,
            &|g, to| asked.resting(g, to, now),
            &settled,
            MOVES_PER_ROUND,
        );
        for m in moves {
            if cancel.is_cancelled() {
                break;
            }
            asked.asked(&m.group, &m.to, now);
            match step_down(&nats, &m).await {
                Ok(()) => {
                    info!(group = %m.group, from = m.from, to = m.to, "moved a leader where its cell is led")
                }
                Err(e) => {
                    warn!(group = %m.group, from = m.from, to = m.to, error = e, "a leader would not move")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(stream: &str, consumer: Option<&str>) -> Group {
        Group {
            stream: stream.into(),
            consumer: consumer.map(Into::into),
        }
    }

    fn led(leader: Option<&str>, current: &[&str]) -> Leadership {
        Leadership {
            leader: leader.map(Into::into),
            current: current.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn survey(groups: Vec<(Group, Leadership)>) -> Survey {
        let groups: BTreeMap<Group, Leadership> = groups.into_iter().collect();
        let anchors = (0..CELLS)
            .map(|c| {
                groups
                    .get(&g(&events_stream(c), None))
                    .and_then(|l| l.leader.clone())
            })
            .collect();
        Survey {
            anchors,
            groups,
            failed_over: Vec::new(),
        }
    }

    /// Three cells' logs led from n0, n1, n2, and groups of cells 0 and 1.
    fn spread() -> Survey {
        survey(vec![
            (g("FANJET_EVENTS_0", None), led(Some("n0"), &["n1", "n2"])),
            (g("FANJET_EVENTS_1", None), led(Some("n1"), &["n0", "n2"])),
            (g("FANJET_EVENTS_2", None), led(Some("n2"), &["n0", "n1"])),
            (
                g("FANJET_EVENTS_1", Some("fanjet-manager-01")),
                led(Some("n0"), &["n1", "n2"]),
            ),
            (
                g("FANJET_EVENTS_0", Some("fanjet-manager-00")),
                led(Some("n0"), &["n1", "n2"]),
            ),
            (g("FANJET_ADVISORIES", None), led(Some("n1"), &["n0", "n2"])),
            (g("KV_fanjet_jobs", None), led(Some("n2"), &["n1"])),
            (g("KV_fanjet_pending", None), led(None, &["n1", "n2"])),
        ])
    }

    #[test]
    fn a_peer_silent_for_seconds_is_not_up_to_date_though_reported_current() {
        let peer = |current: bool, active_ms: u64, offline: bool| -> PeerInfo {
            serde_json::from_value(json!({
                "name": "n1",
                "current": current,
                "active": active_ms * 1_000_000,
                "offline": offline,
            }))
            .expect("a peer")
        };
        assert!(up_to_date(&peer(true, 400, false)));
        // A leader reports a killed peer as current for 10 s.
        assert!(!up_to_date(&peer(true, 4_000, false)));
        assert!(!up_to_date(&peer(false, 400, false)));
        assert!(!up_to_date(&peer(true, 400, true)));
    }

    fn what(moves: &[Move]) -> Vec<(String, &str, &str)> {
        moves
            .iter()
            .map(|m| (m.group.to_string(), m.from.as_str(), m.to.as_str()))
            .collect()
    }

    #[test]
    fn groups_move_to_their_cells_log_leader_and_shared_ones_to_cell_0s() {
        let moves = plan(&spread(), &|_, _| false, &|_| true, 16);
        assert_eq!(
            what(&moves),
            [
                ("stream FANJET_ADVISORIES".to_string(), "n1", "n0"),
                (
                    "consumer fanjet-manager-01 of FANJET_EVENTS_1".to_string(),
                    "n0",
                    "n1"
                ),
            ],
            "the jobs bucket has no up-to-date copy on n0, pending is electing"
        );
        assert_eq!(spread().misplaced().len(), 4);
    }

    #[test]
    fn logs_on_distinct_nodes_never_move() {
        let moves = plan(&spread(), &|_, _| false, &|_| true, 16);
        assert!(moves.iter().all(|m| m.group.log_of().is_none()));
    }

    #[test]
    fn a_log_sharing_a_node_moves_to_a_free_one_and_its_cell_waits_for_it() {
        // n2 was lost: cell 2's log elected n0, where cell 0's log is led.
        let s = survey(vec![
            (g("FANJET_EVENTS_0", None), led(Some("n0"), &["n1"])),
            (g("FANJET_EVENTS_1", None), led(Some("n1"), &["n0"])),
            (g("FANJET_EVENTS_2", None), led(Some("n0"), &["n1"])),
            (
                g("FANJET_EVENTS_2", Some("fanjet-manager-02")),
                led(Some("n1"), &["n0"]),
            ),
        ]);
        assert_eq!(
            what(&plan(&s, &|_, _| false, &|_| true, 16)),
            [(
                "consumer fanjet-manager-02 of FANJET_EVENTS_2".to_string(),
                "n1",
                "n0"
            )],
            "no node is free: the log stays, its consumer follows it"
        );
        // n2 came back and caught up: cell 2's log goes there, its
        // consumer waits for it.
        let s = survey(vec![
            (g("FANJET_EVENTS_0", None), led(Some("n0"), &["n1", "n2"])),
            (g("FANJET_EVENTS_1", None), led(Some("n1"), &["n0", "n2"])),
            (g("FANJET_EVENTS_2", None), led(Some("n0"), &["n1", "n2"])),
            (
                g("FANJET_EVENTS_2", Some("fanjet-manager-02")),
                led(Some("n1"), &["n0", "n2"]),
            ),
        ]);
        assert_eq!(
            what(&plan(&s, &|_, _| false, &|_| true, 16)),
            [("stream FANJET_EVENTS_2".to_string(), "n0", "n2")]
        );
        // n2 came back a moment ago: not yet, the consumer follows the log
        // where it is.
        assert_eq!(
            what(&plan(&s, &|_, _| false, &|n| n != "n2", 16)),
            [(
                "consumer fanjet-manager-02 of FANJET_EVENTS_2".to_string(),
                "n1",
                "n0"
            )]
        );
        // n2 back at once, but cell 2's log elected n0 after losing n2 a
        // moment ago: not yet either (the keeper may never have seen n2
        // gone, or may be new).
        let mut lately = s.clone();
        lately.failed_over = vec![false, false, true];
        assert_eq!(
            what(&plan(&lately, &|_, _| false, &|_| true, 16)),
            [(
                "consumer fanjet-manager-02 of FANJET_EVENTS_2".to_string(),
                "n1",
                "n0"
            )]
        );
        // The move refused lately: the consumer follows the log where it is.
        let rest = plan(&s, &|g, _| g.log_of().is_some(), &|_| true, 16);
        assert_eq!(
            what(&rest),
            [(
                "consumer fanjet-manager-02 of FANJET_EVENTS_2".to_string(),
                "n1",
                "n0"
            )]
        );
    }

    #[test]
    fn resting_groups_and_the_limit_are_respected() {
        let all = plan(&spread(), &|_, _| false, &|_| true, 16);
        let rest = plan(
            &spread(),
            &|g, _| g.stream == "FANJET_ADVISORIES",
            &|_| true,
            16,
        );
        assert_eq!(rest.len(), all.len() - 1);
        assert_eq!(plan(&spread(), &|_, _| false, &|_| true, 1).len(), 1);
    }

    #[test]
    fn an_ask_that_did_not_take_waits_longer_each_time_unless_the_target_changes() {
        let mut asked = Asked::default();
        let t0 = Instant::now();
        let grp = g("FANJET_ADVISORIES", None);
        asked.asked(&grp, "n0", t0);
        assert!(asked.resting(&grp, "n0", t0 + BACKOFF - Duration::from_millis(1)));
        assert!(!asked.resting(&grp, "n0", t0 + BACKOFF));
        assert!(
            !asked.resting(&grp, "n1", t0),
            "a new target is asked at once"
        );
        asked.asked(&grp, "n0", t0);
        assert!(asked.resting(&grp, "n0", t0 + BACKOFF * 2 - Duration::from_millis(1)));
        for _ in 0..20 {
            asked.asked(&grp, "n0", t0);
        }
        assert!(!asked.resting(&grp, "n0", t0 + BACKOFF_MAX), "capped");
        // Once where it belongs it is forgotten.
        let there = survey(vec![
            (g("FANJET_EVENTS_0", None), led(Some("n0"), &["n1"])),
            (grp.clone(), led(Some("n0"), &["n1"])),
        ]);
        asked.settle(&there);
        assert!(!asked.resting(&grp, "n0", t0));
    }

    #[test]
    fn a_log_failed_over_lately_when_led_since_well_after_its_creation() {
        let at = |ago: u64| {
            let t = std::time::SystemTime::now() - Duration::from_secs(ago);
            humantime::format_rfc3339(t).to_string()
        };
        let info = |created: u64, since: Option<u64>| -> stream::Info {
            let cluster = since.map(|s| json!({"leader": "n0", "leader_since": at(s)}));
            serde_json::from_value(json!({
                "config": stream::Config {
                    name: "FANJET_EVENTS_0".into(),
                    ..Default::default()
                },
                "created": at(created),
                "state": {"messages": 0, "bytes": 0, "first_seq": 0, "last_seq": 0,
                          "consumer_count": 0, "first_ts": at(created), "last_ts": at(created)},
                "cluster": cluster,
            }))
            .unwrap()
        };
        assert!(failed_over_lately(&info(3600, Some(5))), "elected 5 s ago");
        assert!(!failed_over_lately(&info(3600, Some(60))), "a minute ago");
        assert!(!failed_over_lately(&info(8, Some(7))), "its first leader");
        assert!(!failed_over_lately(&info(3600, None)), "not clustered");
    }
}
