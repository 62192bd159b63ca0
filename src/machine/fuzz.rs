//! Random, mostly nonsensical input against the engine (unknown jobs, huge
//! indices, wrong steps, duplicates, batches of any shape, ticks, aborts,
//! lost-task looks, saves, conflicts): it may never panic or
//! break a count, whatever arrives on the log. The test says how many
//! streams it tried (run with `--nocapture` to see it).

use std::sync::atomic::{AtomicUsize, Ordering};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::json;

use super::{Definition, Engine, Input, ShareView, StepView, Unqueued};
use crate::protocol::{
    CancelRequested, Completion, Event, ItemOutcome, JobDemand, JobRequested, JobState,
    SubjobCompleted, SubjobFailed, SubjobsCompleted, SubjobsDone, Tenant, Tolerance,
    UpdateRequested, Workflow,
};

/// Random, mostly nonsensical inputs for the engine: unknown jobs, huge
/// indices, wrong steps, duplicates, ticks, aborts.
fn engine_input() -> impl Strategy<Value = (u8, u8, usize, u64, u32, bool)> {
    (
        0u8..13,
        0u8..3,
        0usize..4,
        prop_oneof![0u64..12, Just(u64::MAX), any::<u64>()],
        0u32..6,
        any::<bool>(),
    )
}

/// Shares as another partition might report them: any capacity (or none),
/// other jobs, a cap and its reservation.
fn random_view(n: u64, k: u32, capped: bool) -> ShareView {
    let mut v = ShareView::default();
    let others = (0..k)
        .map(|i| JobDemand {
            job_id: format!("other{i}"),
            customer: Some(format!("c{}", i % 2)),
            priority: (n % 9 + 1) as u8,
            want: n % 50,
            holds: n % 7,
            unfinished: n % 60,
            since: u64::from(i),
            waiting_since: (n % 3 == 0).then_some(0),
        })
        .collect();
    let capacity = (n % 4 != 0).then_some(n % 20);
    v.steps.insert("w.b".into(), StepView { capacity, others });
    if capped {
        v.tenants.insert(
            "c0".into(),
            Tenant {
                max_concurrency: Some(n % 5),
                ..Tenant::new("c0")
            },
        );
        v.reserved
            .insert(crate::protocol::customer_cap_key("c0"), n % 6);
    }
    v
}

#[test]
fn random_event_streams_never_panic_the_engine() {
    let definition = |batch: u64| {
        Workflow::from_toml(&format!(
            "name = \"w\"\n[[steps]]\nname = \"a\"\nkind = \"task\"\n[[steps]]\nname = \"b\"\nkind = \"fanout\"\nmax_in_flight = 3\ntolerate_failures = \"2\"\nbatch_size = {batch}\n[[steps]]\nname = \"c\"\nkind = \"task\"\n"
        ))
        .unwrap()
    };
    // Jobs with an odd number fan out in batches of 2.
    let (wf, batched) = (definition(1), definition(2));
    let tried = AtomicUsize::new(0);
    let mut runner = TestRunner::new(Config {
        cases: 1500,
        failure_persistence: None,
        ..Config::default()
    });
    // Half the streams go to a paced engine, fed random shares.
    let streams = (any::<bool>(), prop::collection::vec(engine_input(), 1..120));
    runner
        .run(&streams, |(paced, inputs)| {
            tried.fetch_add(1, Ordering::Relaxed);
            let mut e = if paced {
                Engine::paced(50)
            } else {
                Engine::new()
            };
            let mut now = 1;
            for (what, job, step, index, attempt, flag) in inputs {
                now += 7;
                let job_id = format!("j{job}");
                let input = match what {
                    0 => Input::Requested {
                        seq: now,
                        event: JobRequested {
                            job_id,
                            workflow: "w".into(),
                            customer: (job % 2 == 0).then(|| "c0".into()),
                            input: json!(null),
                            at: now,
                            deadline_at: None,
                            priority: None,
                        },
                        stored: index == 0,
                        workflow: match (flag, attempt) {
                            (true, _) if job % 2 == 1 => Definition::Found(batched.clone()),
                            (true, _) => Definition::Found(wf.clone()),
                            (false, 0) => Definition::Invalid("bad".into()),
                            (false, _) => Definition::Unknown,
                        },
                    },
                    1 | 2 => Input::Event {
                        seq: now,
                        event: Event::SubjobCompleted(SubjobCompleted {
                            run: 0,
                            job_id,
                            step_index: step,
                            index,
                            attempt,
                            result: if flag {
                                json!([1, 2, 3, 4, 5])
                            } else {
                                json!({"x": 1})
                            },
                            duration_ms: 1,
                            token: String::new(),
                        }),
                    },
                    3 => Input::Event {
                        seq: now,
                        event: Event::SubjobFailed(SubjobFailed {
                            run: 0,
                            job_id,
                            step_index: step,
                            index,
                            attempt,
                            error: "e".into(),
                            token: String::new(),
                        }),
                    },
                    4 => Input::Event {
                        seq: now,
                        event: Event::CancelRequested(CancelRequested {
                            job_id,
                            reason: None,
                            at: now,
                        }),
                    },
                    5 => Input::Abort {
                        job_id,
                        reason: "r".into(),
                    },
                    6 => Input::NoTasks {
                        jobs: vec![Unqueued {
                            job_id,
                            read_back: flag,
                        }],
                    },
                    7 => Input::Save,
                    8 => Input::Shares(random_view(index, attempt, flag)),
                    9 => Input::Event {
                        seq: now,
                        event: Event::UpdateRequested(UpdateRequested {
                            job_id,
                            paused: (attempt % 3 != 0).then_some(flag),
                            max_in_flight: (attempt % 2 == 0).then_some(index % 6),
                            tolerate: (attempt % 4 == 1).then_some(Tolerance::Count(index % 3)),
                            reason: None,
                            at: now,
                        }),
                    },
                    10 => Input::Event {
                        seq: now,
                        event: Event::SubjobsDone(SubjobsDone {
                            job_id,
                            step_index: step,
                            index: index - index % 2,
                            batch_size: if flag { 2 } else { u64::from(attempt) },
                            attempt,
                            duration_ms: 3,
                            outcomes: (0..=u64::from(attempt % 3))
                                .map(|k| ItemOutcome {
                                    index: index.saturating_add(k),
                                    attempt,
                                    result: json!(k),
                                    error: (k == 1 && !flag).then(|| "e".into()),
                                })
                                .collect(),
                            run: 0,
                            token: String::new(),
                        }),
                    },
                    11 => Input::Event {
                        seq: now,
                        event: Event::SubjobsCompleted(SubjobsCompleted {
                            job_id,
                            step_index: step,
                            run: u32::from(!flag && attempt % 5 == 0),
                            outcomes: (0..=u64::from(attempt % 4))
                                .map(|k| Completion {
                                    index: index.saturating_add(k % 3),
                                    attempt,
                                    result: json!(k),
                                    duration_ms: 2,
                                    token: String::new(),
                                })
                                .collect(),
                        }),
                    },
                    _ => Input::Tick,
                };
                let _ = e.apply(input, now);
                for j in e.jobs() {
                    for s in &j.steps {
                        assert!(s.completed + s.failed <= s.total.max(s.dispatched), "{s:?}");
                        assert!(s.dispatched <= s.total, "{s:?}");
                    }
                    if j.state == JobState::Completed {
                        assert!(j.steps.iter().all(|s| s.completed + s.failed == s.total));
                    }
                }
            }
            Ok(())
        })
        .unwrap();
    let n = tried.into_inner();
    eprintln!("engine: tried {n} random streams of up to 120 inputs each");
    assert_eq!(n, 1500);
}
