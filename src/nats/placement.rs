//! Keeps every stream, bucket and durable consumer of fanjet's led from the
//! node that leads the event log.
//!
//! Why: on a cluster, each stream, bucket and durable consumer is a Raft
//! group of its own with a leader of its own, and a group whose leader dies
//! takes nothing (no write, no pull) until its followers elect another,
//! 4 to 9 s later (nats-server's election timeout, not configurable). A
//! subjob's path crosses many groups: the event log, the work queue, a
//! step's consumer, a partition's consumer, the job and pending buckets,
//! the leases. Left where elections put them, the leaders spread over the
//! nodes, so the loss of almost any node stalls every partition for an
//! election (docs/RELIABILITY.md measures it). Kept on one node, only the
//! loss of that node stalls; the loss of another costs the clients a
//! reconnect.
//!
//! The rule is [`plan`] (pure): every group led from elsewhere whose peers
//! include an up-to-date copy on the log's leader is asked to step down in
//! its favour (`$JS.API.STREAM.LEADER.STEPDOWN`, `…CONSUMER.LEADER.STEPDOWN`
//! with a preferred server, a hand-over that takes a moment rather than an
//! election). The log's leader is never moved: a leader that changed after
//! a node was lost stays where the election put it and the rest follow it,
//! so a node coming back moves nothing. A group asked to move that is still
//! elsewhere on the next look is left alone for a while, doubling, so a
//! refusal never turns into a storm of step-downs. One process at a time
//! does this (a lease, [`super::leases::exclusive`]); on a single server
//! every leader is the same and nothing is ever asked.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use async_nats::jetstream::stream::ClusterInfo;
use futures::TryStreamExt;
use serde_json::json;
use thiserror::Error;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::Nats;
use crate::protocol::EVENTS_STREAM;

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
                .filter(|p| p.current && !p.offline)
                .map(|p| p.name.clone())
                .collect(),
        }
    }
}

/// A step-down to ask for: `group` from `from` to `to`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Move {
    pub group: Group,
    pub from: String,
    pub to: String,
}

/// The moves that bring every group to the log's leader `anchor`: groups
/// led from elsewhere with an up-to-date copy on `anchor`, except those in
/// `resting` (asked recently), at most `limit` of them. Groups electing, or
/// whose peers do not include `anchor` (a replica count below the cluster's
/// size), stay where they are.
pub fn plan(
    anchor: &str,
    groups: &BTreeMap<Group, Leadership>,
    resting: &dyn Fn(&Group) -> bool,
    limit: usize,
) -> Vec<Move> {
    groups
        .iter()
        .filter_map(|(group, l)| {
            let from = l.leader.as_deref()?;
            let movable = from != anchor
                && l.current.iter().any(|p| p == anchor)
                && !(group.stream == EVENTS_STREAM && group.consumer.is_none());
            (movable && !resting(group)).then(|| Move {
                group: group.clone(),
                from: from.to_string(),
                to: anchor.to_string(),
            })
        })
        .take(limit)
        .collect()
}

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
/// the log's leader. A stream whose consumers cannot be listed now (it is
/// electing) is surveyed without them.
pub async fn survey(
    nats: &Nats,
) -> Result<(Option<String>, BTreeMap<Group, Leadership>), PlacementError> {
    let err = |e: &dyn std::fmt::Display| PlacementError::List(e.to_string());
    let streams: Vec<_> = tokio::time::timeout(LIST_TIMEOUT, nats.js.streams().try_collect())
        .await
        .map_err(|e| err(&e))?
        .map_err(|e| err(&e))?;
    let mut groups = BTreeMap::new();
    let mut anchor = None;
    let mut listings = Vec::new();
    for info in streams {
        let name = info.config.name.clone();
        if !ours(&name) || info.config.num_replicas < 2 {
            continue;
        }
        let lead = Leadership::of(info.cluster.as_ref());
        if name == EVENTS_STREAM {
            anchor = lead.leader.clone();
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
    Ok((anchor, groups))
}

/// The groups led from elsewhere than `anchor` (or electing).
pub fn apart<'a>(anchor: &str, groups: &'a BTreeMap<Group, Leadership>) -> Vec<&'a Group> {
    groups
        .iter()
        .filter(|(_, l)| l.leader.as_deref() != Some(anchor))
        .map(|(g, _)| g)
        .collect()
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

/// What was asked of each group lately: when it may be asked again and how
/// many asks have not taken.
#[derive(Default)]
struct Asked(BTreeMap<Group, (Instant, u32)>);

impl Asked {
    fn resting(&self, g: &Group, now: Instant) -> bool {
        self.0.get(g).is_some_and(|(until, _)| now < *until)
    }

    fn asked(&mut self, g: &Group, now: Instant) {
        let tries = self.0.get(g).map_or(0, |(_, t)| *t) + 1;
        let wait = BACKOFF
            .saturating_mul(1 << (tries - 1).min(5))
            .min(BACKOFF_MAX);
        self.0.insert(g.clone(), (now + wait, tries));
    }

    /// Forgets groups now led from the anchor (or gone).
    fn settle(&mut self, anchor: &str, groups: &BTreeMap<Group, Leadership>) {
        self.0.retain(|g, _| {
            groups
                .get(g)
                .is_some_and(|l| l.leader.as_deref() != Some(anchor))
        });
    }
}

/// Keeps the leaders together until `cancel`. Run under a lease held with
/// [`Hold::UntilTaken`](super::leases::Hold): two keepers for a moment
/// ask for the same hand-overs, which is harmless, and a keeper must not
/// stop while the lease bucket elects a leader, when it is needed most.
pub async fn run(nats: Nats, cancel: CancellationToken) -> Result<(), PlacementError> {
    let mut asked = Asked::default();
    let mut last_anchor = None;
    let mut round = tokio::time::interval(ROUND);
    round.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = round.tick() => {}
        }
        let (anchor, groups) = match survey(&nats).await {
            Ok(s) => s,
            Err(e) => {
                debug!(error = %e, "placement: no survey this round");
                continue;
            }
        };
        if groups.is_empty() {
            // A single server (or one replica of everything): nothing to
            // keep, look again now and then in case that changes.
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                _ = tokio::time::sleep(UNREPLICATED_ROUND) => {}
            }
            continue;
        }
        let Some(anchor) = anchor else { continue };
        if last_anchor.as_ref() != Some(&anchor) {
            // A new leader of the log: what was asked toward the old one
            // says nothing about the new one.
            asked = Asked::default();
            last_anchor = Some(anchor.clone());
        }
        asked.settle(&anchor, &groups);
        if tracing::enabled!(tracing::Level::DEBUG) {
            let away: Vec<String> = apart(&anchor, &groups)
                .iter()
                .map(|g| g.to_string())
                .collect();
            let resting: Vec<String> = asked
                .0
                .iter()
                .map(|(g, (_, t))| format!("{g} x{t}"))
                .collect();
            debug!(anchor, ?away, ?resting, "placement round");
        }
        let now = Instant::now();
        let moves = plan(
            &anchor,
            &groups,
            &|g| asked.resting(g, now),
            MOVES_PER_ROUND,
        );
        for m in moves {
            if cancel.is_cancelled() {
                break;
            }
            asked.asked(&m.group, now);
            match step_down(&nats, &m).await {
                Ok(()) => {
                    info!(group = %m.group, from = m.from, to = m.to, "moved a leader beside the event log's")
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

    fn groups() -> BTreeMap<Group, Leadership> {
        BTreeMap::from([
            (g(EVENTS_STREAM, None), led(Some("n1"), &["n0", "n2"])),
            (
                g(EVENTS_STREAM, Some("fanjet-manager-00")),
                led(Some("n0"), &["n1", "n2"]),
            ),
            (g("FANJET_TASKS", None), led(Some("n1"), &["n0", "n2"])),
            (g("KV_fanjet_jobs", None), led(Some("n2"), &["n0"])),
            (g("KV_fanjet_pending", None), led(None, &["n1", "n2"])),
        ])
    }

    #[test]
    fn groups_led_elsewhere_move_to_the_log_leader() {
        let moves = plan("n1", &groups(), &|_| false, 16);
        let what: Vec<(String, &str, &str)> = moves
            .iter()
            .map(|m| (m.group.to_string(), m.from.as_str(), m.to.as_str()))
            .collect();
        assert_eq!(
            what,
            [("consumer fanjet-manager-00 of FANJET_EVENTS".to_string(), "n0", "n1")],
            "the jobs bucket has no up-to-date copy on n1, pending is electing, the tasks are there"
        );
    }

    #[test]
    fn the_log_itself_never_moves() {
        // Whatever else is where, the log's leader is the anchor, never moved.
        let moves = plan("n0", &groups(), &|_| false, 16);
        assert!(moves.iter().all(|m| m.group != g(EVENTS_STREAM, None)));
        assert_eq!(moves.len(), 2, "the tasks and the jobs bucket: {moves:?}");
    }

    #[test]
    fn resting_groups_and_the_limit_are_respected() {
        let all = plan("n0", &groups(), &|_| false, 16);
        let rest = plan("n0", &groups(), &|g| g.stream == "FANJET_TASKS", 16);
        assert_eq!(rest.len(), all.len() - 1);
        assert_eq!(plan("n0", &groups(), &|_| false, 1).len(), 1);
    }

    #[test]
    fn an_ask_that_did_not_take_waits_longer_each_time() {
        let mut asked = Asked::default();
        let t0 = Instant::now();
        let grp = g("FANJET_TASKS", None);
        asked.asked(&grp, t0);
        assert!(asked.resting(&grp, t0 + BACKOFF - Duration::from_millis(1)));
        assert!(!asked.resting(&grp, t0 + BACKOFF));
        asked.asked(&grp, t0);
        assert!(asked.resting(&grp, t0 + BACKOFF * 2 - Duration::from_millis(1)));
        for _ in 0..20 {
            asked.asked(&grp, t0);
        }
        assert!(!asked.resting(&grp, t0 + BACKOFF_MAX), "capped");
        // Once led from the anchor it is forgotten.
        let mut now_there = BTreeMap::new();
        now_there.insert(grp.clone(), led(Some("n0"), &["n1"]));
        asked.settle("n0", &now_there);
        assert!(!asked.resting(&grp, t0));
    }
}
