//! Random input against every decoder: nothing may panic or hang, whatever
//! arrives on the wire. Each test says how many inputs it tried (run with
//! `--nocapture` to see it). The engine's own fuzzing is in `machine/fuzz.rs`.

use std::sync::atomic::{AtomicUsize, Ordering};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{json, Value};

use super::*;

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
        let _ = decode::<Job>(enc, bytes);
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
