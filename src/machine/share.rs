//! Fair share of a step's worker slots, as a pure function of what every
//! partition wants ([`JobDemand`]), the slots of the workers serving the
//! step, and the customers' settings.
//!
//! The rules, in order:
//! 1. **Priority.** Jobs of a higher (effective) priority are served
//!    first; a lower level gets what they leave. A job that wants slots and
//!    held none for [`AGING_MS`] rises one level per period it waits, so no
//!    job starves for ever.
//! 2. **Customers.** Within a level the slots left are shared between
//!    customers by max-min fairness (water-filling), weighted by each
//!    customer's `weight`: a customer that wants less than its share gets
//!    what it wants and the rest is shared among the others. A customer's
//!    `max_concurrency` (over all its steps) and the step's own
//!    `max_concurrency` bound what it can get.
//! 3. **Jobs.** A customer's slots are shared between its jobs the same way,
//!    with equal weights.
//!
//! Slots are whole; the ones left after the even split go to the oldest
//! claims first. The result is a target: a job above it dispatches nothing
//! more until its finished subjobs bring it below, a job under it
//! dispatches up to it at once.

use std::collections::{BTreeMap, HashMap};

use crate::protocol::{JobDemand, Millis, Tenant, WaitReason, AGING_MS, MAX_PRIORITY};

/// What a partition knows of one step beyond its own jobs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepView {
    /// Slots of the live workers serving the step; `None` when no worker
    /// heartbeat names it (workers that send none: nothing is held back).
    pub capacity: Option<u64>,
    /// The other partitions' jobs on the step.
    pub others: Vec<JobDemand>,
}

/// What a partition knows of everyone else, by step (`<workflow>.<step>`),
/// the customers' settings by customer, and the room it has reserved under
/// each cap (by cap key; none: nothing).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ShareView {
    pub steps: HashMap<String, StepView>,
    pub tenants: HashMap<String, Tenant>,
    pub reserved: HashMap<String, u64>,
}

/// One job's slots, and why it gets fewer than it wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    pub slots: u64,
    pub waiting: Option<WaitReason>,
    /// Under a cap (its customer's or its step's): the most it may hold,
    /// whatever its slots (set by the engine from its partition's
    /// reservations). Never below what it holds already.
    pub limit: Option<u64>,
}

/// The step-wide facts [`allocate`] needs besides the claims.
#[derive(Debug, Clone, Copy)]
pub struct Limits<'a> {
    pub capacity: u64,
    /// The step's `max_concurrency`, if set.
    pub step_cap: Option<u64>,
    pub tenants: &'a HashMap<String, Tenant>,
    /// Subjobs each customer holds on other steps (its cap covers all).
    pub held_elsewhere: &'a HashMap<String, u64>,
}

/// A job's priority at `now`: its own, raised one level per [`AGING_MS`]
/// it has waited without a slot.
pub fn effective_priority(job: &JobDemand, now: Millis) -> u8 {
    let aged = job
        .waiting_since
        .map(|since| now.saturating_sub(since) / AGING_MS)
        .unwrap_or(0);
    (job.priority as u64 + aged).min(MAX_PRIORITY as u64) as u8
}

/// Shares a step's slots between `jobs` (see the module docs).
pub fn allocate(jobs: &[JobDemand], limits: Limits<'_>, now: Millis) -> HashMap<String, Grant> {
    let mut order: Vec<&JobDemand> = jobs.iter().collect();
    order.sort_by(|a, b| (a.since, &a.job_id).cmp(&(b.since, &b.job_id)));
    let step_room = limits.step_cap.unwrap_or(u64::MAX);
    let mut left = limits.capacity.min(step_room);
    let step_bound = step_room < limits.capacity;
    // What each customer got so far (on this step, higher levels).
    let mut got: HashMap<&str, u64> = HashMap::new();
    let mut grants = HashMap::new();
    let mut levels: BTreeMap<u8, Vec<&JobDemand>> = BTreeMap::new();
    for j in order {
        levels
            .entry(effective_priority(j, now))
            .or_default()
            .push(j);
    }
    let mut higher_took = false;
    for (_, level) in levels.into_iter().rev() {
        // Customers in order of their oldest job.
        let mut customers: Vec<(&str, Vec<&JobDemand>)> = Vec::new();
        for j in level {
            let c = j.customer.as_deref().unwrap_or("");
            match customers.iter_mut().find(|(name, _)| *name == c) {
                Some((_, js)) => js.push(j),
                None => customers.push((c, vec![j])),
            }
        }
        let claims: Vec<(u64, u64)> = customers
            .iter()
            .map(|(c, js)| {
                let want: u64 = js.iter().map(|j| j.want).sum();
                (
                    weight(limits.tenants, c),
                    want.min(cap_room(limits, c, &got)),
                )
            })
            .collect();
        let shares = waterfill(left, &claims);
        for ((c, js), (share, (_, room))) in customers.iter().zip(shares.iter().zip(&claims)) {
            let within = waterfill(*share, &js.iter().map(|j| (1, j.want)).collect::<Vec<_>>());
            let capped = js.iter().map(|j| j.want).sum::<u64>() > *room;
            for (j, slots) in js.iter().zip(within) {
                let waiting = if slots >= j.want {
                    None
                } else if capped && share == room {
                    Some(WaitReason::CustomerCap)
                } else if higher_took {
                    Some(WaitReason::LowerPriority)
                } else if step_bound {
                    Some(WaitReason::StepCap)
                } else if slots == 0 || slots < limits.capacity.min(step_room) {
                    Some(WaitReason::NoCapacity)
                } else {
                    None // it has every slot there is
                };
                let limit = None;
                grants.insert(
                    j.job_id.clone(),
                    Grant {
                        slots,
                        waiting,
                        limit,
                    },
                );
            }
            *got.entry(c).or_default() += share;
            left -= share;
        }
        higher_took |= shares.iter().any(|s| *s > 0);
    }
    grants
}

fn weight(tenants: &HashMap<String, Tenant>, customer: &str) -> u64 {
    tenants.get(customer).map(|t| t.weight as u64).unwrap_or(1)
}

/// Slots a customer may still take on this step under its cap.
fn cap_room(limits: Limits<'_>, customer: &str, got: &HashMap<&str, u64>) -> u64 {
    match limits.tenants.get(customer).and_then(|t| t.max_concurrency) {
        None => u64::MAX,
        Some(cap) => cap
            .saturating_sub(limits.held_elsewhere.get(customer).copied().unwrap_or(0))
            .saturating_sub(got.get(customer).copied().unwrap_or(0)),
    }
}

/// Max-min fair split of `total` among `(weight, demand)` claims: nobody
/// gets more than it asks, and whoever gets less than it asks gets at
/// least its weighted share of what the satisfied ones leave. Whole units;
/// the rest of an uneven split goes to the first claims.
pub fn waterfill(total: u64, claims: &[(u64, u64)]) -> Vec<u64> {
    let mut grants = vec![0u64; claims.len()];
    let mut left = total;
    let mut active: Vec<usize> = (0..claims.len())
        .filter(|&i| claims[i].0 > 0 && claims[i].1 > 0)
        .collect();
    while !active.is_empty() && left > 0 {
        let weights: u128 = active.iter().map(|&i| claims[i].0 as u128).sum();
        let fair = |i: usize| (left as u128 * claims[i].0 as u128 / weights) as u64;
        let (done, rest): (Vec<usize>, Vec<usize>) = active
            .iter()
            .partition(|&&i| claims[i].1 - grants[i] <= fair(i));
        if done.is_empty() {
            // Everyone wants more than its share: split, the rest in order.
            let shares: Vec<u64> = rest.iter().map(|&i| fair(i)).collect();
            let mut spare = left - shares.iter().sum::<u64>();
            for (&i, s) in rest.iter().zip(shares) {
                let extra = u64::from(spare > 0 && claims[i].1 - grants[i] > s);
                grants[i] += s + extra;
                spare -= extra;
            }
            break;
        }
        for i in done {
            left -= claims[i].1 - grants[i];
            grants[i] = claims[i].1;
        }
        active = rest;
    }
    grants
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn job(id: &str, customer: &str, priority: u8, want: u64, since: Millis) -> JobDemand {
        JobDemand {
            job_id: id.into(),
            customer: Some(customer.into()),
            priority,
            want,
            holds: 0,
            unfinished: want,
            since,
            waiting_since: None,
        }
    }

    fn run(
        capacity: u64,
        jobs: &[JobDemand],
        tenants: &HashMap<String, Tenant>,
    ) -> HashMap<String, Grant> {
        let none = HashMap::new();
        let limits = Limits {
            capacity,
            step_cap: None,
            tenants,
            held_elsewhere: &none,
        };
        allocate(jobs, limits, 0)
    }

    fn slots(g: &HashMap<String, Grant>, id: &str) -> u64 {
        g.get(id).map(|g| g.slots).unwrap_or(u64::MAX)
    }

    #[test]
    fn a_small_job_gets_its_customers_half_beside_a_big_one() {
        let jobs = [
            job("big", "big", 5, 5000, 1),
            job("small", "small", 5, 100, 2),
        ];
        let g = run(100, &jobs, &HashMap::new());
        assert_eq!(slots(&g, "big"), 50);
        assert_eq!(slots(&g, "small"), 50);
        assert_eq!(g["small"].waiting, Some(WaitReason::NoCapacity));
    }

    #[test]
    fn customers_share_first_then_their_jobs() {
        // Customer a has three jobs, b one: a's three share a's half.
        let jobs = [
            job("a1", "a", 5, 1000, 1),
            job("a2", "a", 5, 1000, 2),
            job("a3", "a", 5, 1000, 3),
            job("b1", "b", 5, 1000, 4),
        ];
        let g = run(90, &jobs, &HashMap::new());
        assert_eq!(slots(&g, "b1"), 45);
        assert_eq!(
            [slots(&g, "a1"), slots(&g, "a2"), slots(&g, "a3")],
            [15, 15, 15]
        );
    }

    #[test]
    fn what_a_small_claim_leaves_goes_to_the_others() {
        let jobs = [
            job("x", "x", 5, 10, 1),
            job("y", "y", 5, 1000, 2),
            job("z", "z", 5, 1000, 3),
        ];
        let g = run(100, &jobs, &HashMap::new());
        assert_eq!(
            (slots(&g, "x"), slots(&g, "y"), slots(&g, "z")),
            (10, 45, 45)
        );
        assert_eq!(g["x"].waiting, None);
    }

    #[test]
    fn weights_and_caps_of_customers() {
        let mut tenants = HashMap::new();
        tenants.insert(
            "heavy".to_string(),
            Tenant {
                weight: 3,
                ..Tenant::new("heavy")
            },
        );
        tenants.insert(
            "capped".to_string(),
            Tenant {
                max_concurrency: Some(7),
                ..Tenant::new("capped")
            },
        );
        let jobs = [job("h", "heavy", 5, 1000, 1), job("l", "light", 5, 1000, 2)];
        let g = run(100, &jobs, &tenants);
        assert_eq!((slots(&g, "h"), slots(&g, "l")), (75, 25));
        let jobs = [
            job("c", "capped", 5, 1000, 1),
            job("l", "light", 5, 1000, 2),
        ];
        let g = run(100, &jobs, &tenants);
        assert_eq!((slots(&g, "c"), slots(&g, "l")), (7, 93));
        assert_eq!(g["c"].waiting, Some(WaitReason::CustomerCap));
        // What it holds on other steps counts against its cap.
        let elsewhere = HashMap::from([("capped".to_string(), 5u64)]);
        let limits = Limits {
            capacity: 100,
            step_cap: None,
            tenants: &tenants,
            held_elsewhere: &elsewhere,
        };
        assert_eq!(allocate(&jobs, limits, 0)["c"].slots, 2);
    }

    #[test]
    fn the_step_cap_bounds_every_job_together() {
        let jobs = [job("a", "a", 5, 1000, 1), job("b", "b", 5, 1000, 2)];
        let (none, nothing) = (HashMap::new(), HashMap::new());
        let limits = Limits {
            capacity: 100,
            step_cap: Some(10),
            tenants: &none,
            held_elsewhere: &nothing,
        };
        let g = allocate(&jobs, limits, 0);
        assert_eq!((g["a"].slots, g["b"].slots), (5, 5));
        assert_eq!(g["a"].waiting, Some(WaitReason::StepCap));
    }

    #[test]
    fn higher_priorities_first_and_waiting_jobs_age() {
        let mut jobs = vec![job("hi", "a", 9, 1000, 2), job("lo", "b", 1, 1000, 1)];
        let g = run(100, &jobs, &HashMap::new());
        assert_eq!((slots(&g, "hi"), slots(&g, "lo")), (100, 0));
        assert_eq!(g["lo"].waiting, Some(WaitReason::LowerPriority));
        // Waiting eight periods, the low one reaches level 9 and shares.
        jobs[1].waiting_since = Some(0);
        let (none, nothing) = (HashMap::new(), HashMap::new());
        let limits = Limits {
            capacity: 100,
            step_cap: None,
            tenants: &none,
            held_elsewhere: &nothing,
        };
        assert_eq!(allocate(&jobs, limits, 7 * AGING_MS)["lo"].slots, 0);
        let g = allocate(&jobs, limits, 8 * AGING_MS);
        assert_eq!((g["hi"].slots, g["lo"].slots), (50, 50));
    }

    #[test]
    fn leftover_slots_go_to_the_oldest() {
        let jobs = [
            job("new", "b", 5, 1000, 9),
            job("old", "a", 5, 1000, 1),
            job("mid", "c", 5, 1000, 5),
        ];
        let g = run(4, &jobs, &HashMap::new());
        assert_eq!(
            (slots(&g, "old"), slots(&g, "mid"), slots(&g, "new")),
            (2, 1, 1)
        );
    }

    proptest! {
        #[test]
        fn waterfill_is_max_min_fair(
            total in 0u64..10_000,
            claims in proptest::collection::vec((1u64..5, 0u64..3_000), 0..12),
        ) {
            let g = waterfill(total, &claims);
            let asked: u64 = claims.iter().map(|c| c.1).sum();
            let given: u64 = g.iter().sum();
            // Nothing is wasted and nobody gets more than it asks.
            prop_assert_eq!(given, total.min(asked));
            for (gi, (_, want)) in g.iter().zip(&claims) {
                prop_assert!(gi <= want);
            }
            // Whoever is short got at least its weighted share of the level
            // everyone short is at (within one unit of rounding).
            for (i, (wi, want_i)) in claims.iter().enumerate() {
                if g[i] < *want_i {
                    for (j, (wj, _)) in claims.iter().enumerate() {
                        let level_i = (g[i] + 1) as f64 / *wi as f64;
                        let level_j = g[j].saturating_sub(1) as f64 / *wj as f64;
                        prop_assert!(level_i >= level_j, "claim {} short at {} while {} got {}", i, g[i], j, g[j]);
                    }
                }
            }
        }

        #[test]
        fn allocations_respect_capacity_caps_and_wants(
            capacity in 0u64..500,
            step_cap in proptest::option::of(0u64..500),
            cap in proptest::option::of(0u64..200),
            jobs in proptest::collection::vec((0usize..4, 1u8..10, 0u64..300), 0..20),
        ) {
            let tenants = HashMap::from([(
                "c0".to_string(),
                Tenant { max_concurrency: cap, ..Tenant::new("c0") },
            )]);
            let demands: Vec<JobDemand> = jobs
                .iter()
                .enumerate()
                .map(|(i, (c, p, w))| job(&format!("j{i}"), &format!("c{c}"), *p, *w, i as u64))
                .collect();
            let none = HashMap::new();
            let limits = Limits { capacity, step_cap, tenants: &tenants, held_elsewhere: &none };
            let g = allocate(&demands, limits, 0);
            let total: u64 = g.values().map(|g| g.slots).sum();
            prop_assert!(total <= capacity.min(step_cap.unwrap_or(u64::MAX)));
            let c0: u64 = demands
                .iter()
                .filter(|d| d.customer.as_deref() == Some("c0"))
                .map(|d| g[&d.job_id].slots)
                .sum();
            prop_assert!(c0 <= cap.unwrap_or(u64::MAX));
            for d in &demands {
                let grant = g[&d.job_id];
                prop_assert!(grant.slots <= d.want);
                if grant.waiting.is_some() {
                    prop_assert!(grant.slots < d.want);
                }
                if grant.slots == 0 && d.want > 0 {
                    prop_assert!(grant.waiting.is_some());
                }
            }
        }
    }
}
