//! Random input against every decoder and against the engine: nothing may
//! panic or hang, whatever arrives on the wire. Each test says how many
//! inputs it tried (run with `--nocapture` to see it).

use std::sync::atomic::{AtomicUsize, Ordering};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{json, Value};

use super::*;
use crate::machine::{Engine, Input, JobState};
use crate::workflow::Workflow;

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f)
            .map(Value::Number)
            .unwrap_or(Value::Null)),
        ".{0,20}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{1,12}", inner, 0..8)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Runs `cases` random inputs through `check`; returns how many ran.
fn run<S: Strategy>(cases: u32, strategy: S, check: impl Fn(S::Value)) -> usize {
    let tried = AtomicUsize::new(0);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&strategy, |v| {
            tried.fetch_add(1, Ordering::Relaxed);
            check(v);
            Ok(())
        })
        .unwrap();
    tried.into_inner()
}

fn decode_all(bytes: &[u8]) {
    for enc in [Encoding::Json, Encoding::Cbor] {
        let _ = decode::<Submission>(enc, bytes);
        let _ = decode::<Event>(enc, bytes);
        let _ = decode::<Task>(enc, bytes);
        let _ = decode::<SubmitReply>(enc, bytes);
        let _ = decode::<crate::machine::Job>(enc, bytes);
    }
}

#[test]
fn random_bytes_never_panic_a_decoder() {
    let n = run(4000, prop::collection::vec(any::<u8>(), 0..600), |b| {
        decode_all(&b)
    });
    eprintln!("decoders: tried {n} random byte strings, each as JSON and as CBOR");
    assert_eq!(n, 4000);
}

#[test]
fn random_json_documents_never_panic_a_decoder() {
    let n = run(3000, json_value(), |v| {
        decode_all(&serde_json::to_vec(&v).unwrap());
        decode_all(&encode_cbor(&v).unwrap());
        // Documents shaped like events, with random field values.
        for t in [
            "JobRequested",
            "SubjobCompleted",
            "SubjobFailed",
            "CancelRequested",
            "StepStarted",
        ] {
            let mut doc = v.as_object().cloned().unwrap_or_default();
            doc.insert("type".into(), json!(t));
            decode_all(&serde_json::to_vec(&Value::Object(doc)).unwrap());
        }
    });
    eprintln!(
        "decoders: tried {n} random JSON documents, as JSON and CBOR, and as 5 event types each"
    );
    assert_eq!(n, 3000);
}

/// Random, mostly nonsensical inputs for the engine: unknown jobs, huge
/// indices, wrong steps, duplicates, ticks, aborts.
fn engine_input() -> impl Strategy<Value = (u8, u8, usize, u64, u32, bool)> {
    (
        0u8..8,
        0u8..3,
        0usize..4,
        prop_oneof![0u64..12, Just(u64::MAX), any::<u64>()],
        0u32..6,
        any::<bool>(),
    )
}

#[test]
fn random_event_streams_never_panic_the_engine() {
    let wf = Workflow::from_toml(
        "name = \"w\"\n[[steps]]\nname = \"a\"\nkind = \"task\"\n[[steps]]\nname = \"b\"\nkind = \"fanout\"\nmax_in_flight = 3\ntolerate_failures = \"2\"\n[[steps]]\nname = \"c\"\nkind = \"task\"\n",
    )
    .unwrap();
    let n = run(
        1500,
        prop::collection::vec(engine_input(), 1..120),
        |inputs| {
            let mut e = Engine::new();
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
                            customer: None,
                            input: json!(null),
                            at: now,
                            deadline_at: None,
                        },
                        workflow: flag.then(|| wf.clone()),
                    },
                    1 | 2 => Input::Event {
                        seq: now,
                        event: Event::SubjobCompleted(SubjobCompleted {
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
                        }),
                    },
                    3 => Input::Event {
                        seq: now,
                        event: Event::SubjobFailed(SubjobFailed {
                            job_id,
                            step_index: step,
                            index,
                            attempt,
                            error: "e".into(),
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
                    6 => Input::Lost { job_id },
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
        },
    );
    eprintln!("engine: tried {n} random streams of up to 120 inputs each");
    assert_eq!(n, 1500);
}
