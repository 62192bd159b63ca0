//! The engine driven in memory: hand-written scenarios, then random
//! interleavings with duplicates, reorderings and late events.

use super::*;
use crate::protocol::{
    CancelRequested, SubjobCompleted, SubjobFailed, Workflow, AGING_MS, MAX_RECORD_BYTES,
};
use proptest::prelude::*;
use serde_json::json;

fn workflow(fanout_extra: &str) -> Workflow {
    Workflow::from_toml(&format!(
        r#"
name = "invoices"
[[steps]]
name = "collect"
kind = "task"
[[steps]]
name = "send"
kind = "fanout"
max_attempts = 3
{fanout_extra}
[[steps]]
name = "summarize"
kind = "task"
"#
    ))
    .unwrap()
}

fn request(engine: &mut Engine, wf: Workflow) -> Vec<Action> {
    engine.apply(
        Input::Requested {
            seq: 1,
            event: JobRequested {
                job_id: "j".into(),
                workflow: "invoices".into(),
                customer: Some("acme".into()),
                input: json!({"n": 1}),
                at: 0,
                deadline_at: None,
                priority: None,
            },
            stored: false,
            workflow: Definition::Found(wf),
        },
        10,
    )
}

thread_local! {
    /// Log sequences in the order events are made, as the log assigns them.
    static SEQ: std::cell::Cell<u64> = const { std::cell::Cell::new(100) };
}

fn next_seq() -> u64 {
    SEQ.with(|s| {
        let seq = s.get();
        s.set(seq + 1);
        seq
    })
}

fn done(step_index: usize, index: u64, attempt: u32, result: Value) -> Input {
    Input::Event {
        seq: next_seq(),
        event: Event::SubjobCompleted(SubjobCompleted {
            run: 0,
            job_id: "j".into(),
            step_index,
            index,
            attempt,
            result,
            duration_ms: 1,
            token: String::new(),
        }),
    }
}

/// Completions of step `step_index` reported together (index, attempt).
fn done_together(step_index: usize, outcomes: &[(u64, u32)]) -> Input {
    Input::Event {
        seq: next_seq(),
        event: Event::SubjobsCompleted(crate::protocol::SubjobsCompleted {
            job_id: "j".into(),
            step_index,
            run: 0,
            outcomes: outcomes
                .iter()
                .map(|&(index, attempt)| crate::protocol::Completion {
                    index,
                    attempt,
                    result: json!({"i": index}),
                    duration_ms: 1,
                    token: String::new(),
                })
                .collect(),
        }),
    }
}

fn failed(step_index: usize, index: u64) -> Input {
    failed_with(step_index, index, 3, format!("bad {index}"))
}

fn kinds(actions: &[Action]) -> Vec<String> {
    actions
        .iter()
        .map(|a| match a {
            Action::Publish(e) => e.kind().token().to_string(),
            Action::Dispatch(d) => format!("dispatch {}:{}..{}", d.step_index, d.from, d.to),
            Action::PurgeTasks { .. } => "purge".into(),
            Action::Checkpoint(cp) => format!("checkpoint {}", cp.job_id),
            Action::Ack => "ack".into(),
        })
        .collect()
}

/// The manager's own decisions published in `actions`, read back from the
/// log, as the event loop does; what that calls for.
fn read_back(e: &mut Engine, actions: &[Action], now: Millis) -> Vec<Action> {
    let mut out = Vec::new();
    for a in actions {
        if let Action::Publish(ev @ Event::SubjobsFailed(_)) = a {
            out.extend(e.apply(
                Input::Event {
                    seq: next_seq(),
                    event: ev.clone(),
                },
                now,
            ));
        }
    }
    out
}

#[test]
fn happy_path_runs_three_steps_and_counts_once() {
    let mut e = Engine::new();
    assert_eq!(
        kinds(&request(&mut e, workflow(""))),
        ["step_started", "dispatch 0:0..1"]
    );
    let a = e.apply(done(0, 0, 1, json!([1, 2, 3])), 20);
    assert_eq!(
        kinds(&a),
        ["step_completed", "step_started", "dispatch 1:0..3"]
    );
    match &a[2] {
        Action::Dispatch(d) => assert_eq!(
            d.source,
            Source::Event {
                seq: 100,
                field: SourceField::Result
            }
        ),
        other => panic!("{other:?}"),
    }
    assert!(e.apply(done(1, 0, 1, json!(null)), 30).is_empty());
    assert!(
        e.apply(done(1, 0, 2, json!(null)), 31).is_empty(),
        "duplicate counted once"
    );
    assert!(
        e.apply(done(1, 7, 1, json!(null)), 31).is_empty(),
        "index beyond the step is ignored"
    );
    e.apply(done(1, 1, 2, json!(null)), 32);
    let a = e.apply(done(1, 2, 1, json!(null)), 33);
    assert_eq!(
        kinds(&a),
        ["step_completed", "step_started", "dispatch 2:0..1"]
    );
    match &a[2] {
        Action::Dispatch(d) => match &d.source {
            Source::Inline(s) => {
                assert_eq!(s["completed"], 3);
                assert_eq!(s["retries"], 1);
            }
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    }
    assert!(
        e.apply(done(1, 2, 1, json!(null)), 34).is_empty(),
        "late completion ignored"
    );
    let a = e.apply(done(2, 0, 1, json!({"sent": 3})), 40);
    assert_eq!(kinds(&a), ["step_completed", "completed"]);
    let job = e.job("j").unwrap();
    assert_eq!(job.state, JobState::Completed);
    assert_eq!(job.output, json!({"sent": 3}));
    assert_eq!(
        (
            job.steps[1].completed,
            job.steps[1].failed,
            job.steps[1].retries
        ),
        (3, 0, 1)
    );
    assert!(e.apply(done(2, 0, 1, json!(null)), 50).is_empty());
}

#[test]
fn completions_reported_together_count_each_once_and_end_the_step_once() {
    let mut e = Engine::new();
    request(&mut e, workflow(""));
    e.apply(done(0, 0, 1, json!([1, 2, 3, 4, 5])), 20);
    assert!(e.apply(done_together(1, &[(0, 1), (1, 2)]), 30).is_empty());
    // 1 again (a duplicate), 9 beyond the step: only 2 counts.
    assert!(e
        .apply(done_together(1, &[(1, 1), (9, 1), (2, 1)]), 31)
        .is_empty());
    assert_eq!(
        e.job("j")
            .map(|j| (j.steps[1].completed, j.steps[1].retries)),
        Some((3, 1))
    );
    // Nothing new in it: ignored.
    assert!(e.apply(done_together(1, &[(0, 1), (2, 1)]), 32).is_empty());
    let a = e.apply(done_together(1, &[(3, 1), (4, 3)]), 33);
    assert_eq!(
        kinds(&a),
        ["step_completed", "step_started", "dispatch 2:0..1"]
    );
    let job = e.job("j").unwrap();
    assert_eq!(
        (
            job.steps[1].completed,
            job.steps[1].failed,
            job.steps[1].retries
        ),
        (5, 0, 3)
    );
    // After the step's end: late, counted nowhere.
    assert!(e.apply(done_together(1, &[(0, 1)]), 34).is_empty());
    // The last (task) step's one completion reported that way is its output.
    let a = e.apply(done_together(2, &[(0, 1)]), 40);
    assert_eq!(kinds(&a), ["step_completed", "completed"]);
    assert_eq!(e.job("j").unwrap().output, json!({"i": 0}));
}

#[test]
fn failures_beyond_tolerance_fail_the_job_and_purge() {
    let mut e = Engine::new();
    request(&mut e, workflow("tolerate_failures = \"1\""));
    e.apply(done(0, 0, 1, json!([1, 2, 3, 4])), 20);
    assert!(
        e.apply(failed(1, 0), 21).is_empty(),
        "one failure is tolerated"
    );
    let a = e.apply(failed(1, 1), 22);
    assert_eq!(kinds(&a), ["step_completed", "purge", "failed"]);
    let job = e.job("j").unwrap();
    assert_eq!(job.state, JobState::Failed);
    assert!(
        job.error.as_deref().unwrap().contains("bad 1"),
        "{:?}",
        job.error
    );
    assert!(e.apply(done(1, 2, 1, json!(null)), 23).is_empty());
}

#[test]
fn tolerated_failures_let_the_job_complete() {
    let mut e = Engine::new();
    request(&mut e, workflow("tolerate_failures = \"50%\""));
    e.apply(done(0, 0, 1, json!([1, 2])), 20);
    e.apply(failed(1, 0), 21);
    let a = e.apply(done(1, 1, 1, json!(null)), 22);
    assert_eq!(
        kinds(&a),
        ["step_completed", "step_started", "dispatch 2:0..1"]
    );
    assert_eq!(e.job("j").unwrap().steps[1].failures[0].error, "bad 0");
}

#[test]
fn a_tolerated_task_failure_hands_null_on_and_abort_fails_the_job() {
    let wf = Workflow::from_toml(
        "name = \"w\"\n[[steps]]\nname = \"a\"\nkind = \"task\"\ntolerate_failures = \"1\"\n[[steps]]\nname = \"b\"\nkind = \"task\"",
    )
    .unwrap();
    let mut e = Engine::new();
    request(&mut e, wf);
    let a = e.apply(failed(0, 0), 20);
    assert_eq!(
        kinds(&a),
        ["step_completed", "step_started", "dispatch 1:0..1"]
    );
    match &a[2] {
        Action::Dispatch(d) => assert_eq!(d.source, Source::Inline(Value::Null)),
        other => panic!("{other:?}"),
    }
    let a = e.apply(
        Input::Abort {
            job_id: "j".into(),
            reason: "input gone".into(),
        },
        21,
    );
    assert_eq!(kinds(&a), ["step_completed", "purge", "failed"]);
    assert_eq!(e.job("j").unwrap().error.as_deref(), Some("input gone"));
    assert!(e
        .apply(
            Input::Abort {
                job_id: "j".into(),
                reason: "again".into()
            },
            22
        )
        .is_empty());
}

#[test]
fn lost_subjobs_fail_and_the_window_goes_on() {
    let mut e = Engine::new();
    request(
        &mut e,
        workflow("max_in_flight = 2\ntolerate_failures = \"100%\""),
    );
    e.apply(done(0, 0, 1, json!([1, 2, 3, 4])), 20);
    e.apply(done(1, 0, 1, json!(null)), 21);
    assert_eq!(in_flight(e.job("j").unwrap()), 1);
    assert_eq!(e.stalled(21 + 999, 1000), Vec::<String>::new());
    assert_eq!(e.stalled(21 + 1000, 1000), ["j"]);
    let gone = || Input::NoTasks {
        jobs: vec![unqueued("j")],
    };
    // Two strikes: the first look fails nothing.
    assert!(e.apply(gone(), 22).is_empty());
    let a = e.apply(gone(), 23);
    assert_eq!(
        kinds(&a),
        ["subjobs_failed", "dispatch 1:2..4"],
        "the decision is logged, and counts at once"
    );
    let step = &e.job("j").unwrap().steps[1];
    assert_eq!((step.completed, step.failed), (1, 1));
    assert!(step.failures[0].error.contains("lost"));
    assert!(
        read_back(&mut e, &a, 23).is_empty(),
        "read back from the log, the decision fails nothing more"
    );
    // After a crash before the checkpoint, the logged decision is what
    // fails them.
    let mut replay = Engine::new();
    request(
        &mut replay,
        workflow("max_in_flight = 2\ntolerate_failures = \"100%\""),
    );
    replay.apply(done(0, 0, 1, json!([1, 2, 3, 4])), 20);
    replay.apply(done(1, 0, 1, json!(null)), 21);
    assert_eq!(kinds(&read_back(&mut replay, &a, 24)), ["dispatch 1:2..4"]);
    assert_eq!(replay.job("j").unwrap().steps[1].failed, 1);
    // Progress between two looks, or a look that found tasks, starts over.
    assert!(e.apply(gone(), 24).is_empty());
    e.apply(done(1, 2, 1, json!(null)), 25);
    assert!(
        e.apply(gone(), 26).is_empty(),
        "progress since the last look"
    );
    e.apply(Input::NoTasks { jobs: vec![] }, 27);
    assert!(e.apply(gone(), 28).is_empty(), "tasks were seen in between");
    let unread = Input::NoTasks {
        jobs: vec![Unqueued {
            job_id: "j".into(),
            read_back: false,
        }],
    };
    assert!(
        e.apply(unread.clone(), 28).is_empty(),
        "outcomes not read back: never lost"
    );
    assert!(e.apply(unread, 28).is_empty());
    let a = e.apply(gone(), 29);
    assert_eq!(
        kinds(&a),
        [
            "subjobs_failed",
            "step_completed",
            "step_started",
            "dispatch 2:0..1"
        ]
    );
    let step = &e.job("j").unwrap().steps[1];
    assert_eq!((step.completed, step.failed), (2, 2));
}

/// A job the lost-task check names, its outcomes read back.
fn unqueued(job_id: &str) -> Unqueued {
    Unqueued {
        job_id: job_id.into(),
        read_back: true,
    }
}

#[test]
fn subjobs_count_as_lost_only_once_their_outcomes_were_read_back() {
    let mut e = Engine::new();
    request(
        &mut e,
        workflow("max_in_flight = 2\ntolerate_failures = \"100%\""),
    );
    e.apply(done(0, 0, 1, json!([1, 2, 3, 4])), 20);
    let applied = e.job("j").unwrap().applied_seq;
    let look = |read_back| Input::NoTasks {
        jobs: vec![Unqueued {
            job_id: "j".into(),
            read_back,
        }],
    };
    assert_eq!(e.read_back("j"), None, "not suspected yet");
    assert!(e.apply(look(false), 21).is_empty());
    let from = e.read_back("j").expect("a second look reads back");
    assert_eq!(
        from,
        e.job("j").unwrap().steps[0].output_seq.unwrap(),
        "from the step's items"
    );
    assert_eq!(e.read_back("other"), None);
    // A look whose read back failed decides nothing, and the job stays
    // suspected.
    assert!(e.apply(look(false), 22).is_empty());
    assert!(e.read_back("j").is_some());

    // The reader went past subjob 1's outcome: read back, it is unapplied
    // and counts; the job is no longer a suspect.
    let outcome = |index, run, step_index| {
        Event::SubjobCompleted(SubjobCompleted {
            run,
            job_id: "j".into(),
            step_index,
            index,
            attempt: 1,
            result: json!(null),
            duration_ms: 1,
            token: String::new(),
        })
    };
    assert!(e.unapplied(&outcome(1, 0, 1)));
    assert!(!e.unapplied(&outcome(1, 1, 1)), "another run");
    assert!(
        !e.unapplied(&outcome(0, 0, 0)),
        "a step that is not running"
    );
    assert!(!e.unapplied(&outcome(2, 0, 1)), "not dispatched");
    e.apply(
        Input::Event {
            seq: applied - 1,
            event: outcome(1, 0, 1),
        },
        23,
    );
    assert!(!e.unapplied(&outcome(1, 0, 1)), "applied now");
    assert_eq!(e.job("j").unwrap().steps[1].completed, 1);
    assert!(e.apply(look(true), 24).is_empty(), "progress: a first look");
    let a = e.apply(look(true), 25);
    assert_eq!(kinds(&a), ["subjobs_failed", "dispatch 1:2..4"]);
    let step = &e.job("j").unwrap().steps[1];
    assert_eq!(
        (step.completed, step.failed),
        (1, 1),
        "only subjob 0 is lost"
    );
}

#[test]
fn save_writes_each_record_before_its_chunks_then_acks_and_unloads_ended_jobs() {
    let mut e = Engine::new();
    let first = kinds(&request(&mut e, workflow("")));
    assert!(!first.contains(&"ack".to_string()), "only a save acks");
    e.apply(done(0, 0, 1, json!([1, 2, 3])), 20);
    e.apply(done(1, 1, 1, json!(null)), 21);
    let a = e.apply(Input::Save, 22);
    assert_eq!(kinds(&a), ["checkpoint j", "ack"]);
    let Action::Checkpoint(cp) = &a[0] else {
        unreachable!()
    };
    assert!(!cp.ended);
    assert_eq!(
        cp.writes[0],
        Write::Listed,
        "its active key comes before its first record"
    );
    let Write::Record(record) = &cp.writes[1] else {
        panic!("then the record: {:?}", cp.writes[1]);
    };
    let stored: Job = serde_json::from_slice(record).unwrap();
    assert_eq!(stored.steps[1].completed, 1);
    assert!(
        matches!(
            cp.writes[2..],
            [Write::Chunk {
                step_index: 1,
                chunk: 0,
                ..
            }]
        ),
        "then the changed chunk: {:?}",
        &cp.writes[2..]
    );
    assert_eq!(kinds(&e.apply(Input::Save, 23)), ["ack"], "nothing changed");
    e.apply(done(1, 0, 1, json!(null)), 23);
    let a = e.apply(Input::Save, 23);
    assert_eq!(kinds(&a), ["checkpoint j", "ack"]);
    assert!(
        a.iter()
            .all(|a| !matches!(a, Action::Checkpoint(cp) if cp.writes.contains(&Write::Listed))),
        "the active key is written once"
    );

    e.apply(done(1, 0, 1, json!(null)), 24);
    e.apply(done(1, 2, 1, json!(null)), 25);
    e.apply(done(2, 0, 1, json!("sum")), 26);
    assert_eq!(e.job("j").unwrap().state, JobState::Completed);
    let a = e.apply(Input::Save, 27);
    assert_eq!(kinds(&a), ["checkpoint j", "ack"]);
    let Action::Checkpoint(cp) = &a[0] else {
        unreachable!()
    };
    assert!(cp.ended);
    assert!(matches!(cp.writes[0], Write::Record(_)));
    assert_eq!(
        cp.writes[1..],
        [
            Write::DeleteChunk {
                step_index: 1,
                chunk: 0
            },
            Write::Unlisted
        ],
        "its active key goes after its last record"
    );
    assert!(
        e.job("j").is_none(),
        "unloaded once its last checkpoint is out"
    );
    assert!(e.apply(done(1, 0, 2, json!(null)), 28).is_empty());
    assert_eq!(e.take_ignored().get("unknown_job"), Some(&1));
}

#[test]
fn a_fanout_over_a_non_array_fails_clearly() {
    let mut e = Engine::new();
    request(&mut e, workflow(""));
    let a = e.apply(done(0, 0, 1, json!({"not": "a list"})), 20);
    assert_eq!(
        kinds(&a),
        ["step_completed", "step_completed", "purge", "failed"]
    );
    assert!(e
        .job("j")
        .unwrap()
        .error
        .as_deref()
        .unwrap()
        .contains("not a JSON array"));
}

#[test]
fn an_empty_fanout_goes_straight_on() {
    let mut e = Engine::new();
    request(&mut e, workflow(""));
    let a = e.apply(done(0, 0, 1, json!([])), 20);
    assert_eq!(
        kinds(&a),
        [
            "step_completed",
            "step_started",
            "step_completed",
            "step_started",
            "dispatch 2:0..1"
        ]
    );
}

#[test]
fn cancel_stops_everything() {
    let mut e = Engine::new();
    request(&mut e, workflow(""));
    e.apply(done(0, 0, 1, json!([1, 2])), 20);
    let a = e.apply(
        Input::Event {
            seq: 9,
            event: Event::CancelRequested(CancelRequested {
                job_id: "j".into(),
                reason: None,
                at: 1,
            }),
        },
        21,
    );
    assert_eq!(kinds(&a), ["purge", "cancelled"]);
    assert_eq!(e.job("j").unwrap().state, JobState::Cancelled);
    assert!(e.apply(done(1, 0, 1, json!(null)), 22).is_empty());
    assert!(e
        .apply(
            Input::Event {
                seq: 9,
                event: Event::CancelRequested(CancelRequested {
                    job_id: "j".into(),
                    reason: None,
                    at: 1
                })
            },
            23
        )
        .is_empty());
}

#[test]
fn unknown_workflow_and_resubmission() {
    let mut e = Engine::new();
    let a = e.apply(requested("x", false, Definition::Unknown), 5);
    assert_eq!(kinds(&a), ["rejected"]);
    assert_eq!(e.job("x").unwrap().state, JobState::Rejected);
    request(&mut e, workflow(""));
    assert!(
        request(&mut e, workflow("")).is_empty(),
        "same id again starts nothing"
    );
    // A job stored already (ended, or held by a manager before a restart)
    // does not start again either.
    let mut fresh = Engine::new();
    let a = fresh.apply(requested("j", true, Definition::Found(workflow(""))), 5);
    assert!(a.is_empty() && fresh.is_empty());
}

#[test]
fn the_window_moves_through_a_large_fanout_and_the_deadline_fails_the_rest() {
    let mut e = Engine::new();
    request(
        &mut e,
        workflow("max_in_flight = 1000\ndeadline = \"10s\"\ntolerate_failures = \"100%\""),
    );
    let a = e.apply(done(0, 0, 1, Value::Array(vec![json!(0); 5000])), 1000);
    assert_eq!(kinds(&a)[2], "dispatch 1:0..1000");
    for i in 0..255 {
        assert!(e.apply(done(1, i, 1, json!(null)), 1001).is_empty());
    }
    assert!(
        e.apply(done(1, 1000, 1, json!(null)), 1001).is_empty(),
        "not dispatched yet: held"
    );
    assert_eq!(
        kinds(&e.apply(done(1, 255, 1, json!(null)), 1002)),
        ["dispatch 1:1000..1256"]
    );
    assert!(e.apply(Input::Tick, 5000).is_empty());
    let a = e.apply(Input::Tick, 11_001);
    assert_eq!(
        kinds(&a),
        [
            "subjobs_failed",
            "purge",
            "step_completed",
            "step_started",
            "dispatch 2:0..1"
        ]
    );
    let step = &e.job("j").unwrap().steps[1];
    assert_eq!(
        (step.completed, step.failed),
        (257, 4743),
        "1000 counted once dispatched"
    );
    assert!(step.failures[0].error.contains("deadline"));
    assert!(
        read_back(&mut e, &a, 11_002).is_empty(),
        "read back, nothing more"
    );
}

#[test]
fn recount_follows_the_bitmap() {
    let mut e = Engine::new();
    request(&mut e, workflow("tolerate_failures = \"1\""));
    e.apply(done(0, 0, 1, json!([1, 2, 3])), 20);
    e.apply(done(1, 0, 1, json!(null)), 21);
    e.apply(failed(1, 1), 22);
    let mut job = e.job("j").unwrap().clone();
    job.steps[1].completed = 99;
    job.recount();
    assert_eq!((job.steps[1].completed, job.steps[1].failed), (1, 1));
}

#[test]
fn outcomes_replayed_after_a_crash_are_not_counted_twice() {
    // The record was written after four outcomes, but the crash came
    // before the bitmap of the last two: on restart those two are replayed
    // from the log with the same sequences.
    let mut e = Engine::new();
    request(&mut e, workflow("tolerate_failures = \"2\""));
    e.apply(done(0, 0, 1, json!([1, 2, 3, 4, 5])), 20);
    e.apply(done(1, 0, 2, json!(null)), 21);
    e.apply(done(1, 1, 1, json!(null)), 22);
    let bits_stored = e.job("j").unwrap().steps[1].pending.clone();
    let third = done(1, 2, 3, json!(null));
    let fourth = failed(1, 3);
    e.apply(third.clone(), 23);
    e.apply(fourth.clone(), 24);
    let record = e.job("j").unwrap().clone();
    assert_eq!(
        (record.steps[1].retries, record.steps[1].failures.len()),
        (5, 1)
    );

    let mut loaded = record.clone();
    loaded.steps[1].pending = bits_stored;
    loaded.recount();
    assert_eq!((loaded.steps[1].completed, loaded.steps[1].failed), (2, 0));
    let mut e = Engine::new();
    e.insert(loaded);
    e.apply(third, 30);
    e.apply(fourth, 31);
    let job = e.job("j").unwrap();
    let s = &job.steps[1];
    assert_eq!((s.completed, s.failed), (3, 1), "bits set again");
    assert_eq!((s.retries, s.failures.len()), (5, 1), "counted once");

    // A new outcome after the replay is counted as usual.
    e.apply(done(1, 4, 2, json!(null)), 32);
    let s = &e.job("j").unwrap().steps[1];
    assert_eq!((s.completed, s.retries), (4, 6));
}

/// One message a simulated worker may deliver.
#[derive(Debug, Clone)]
enum Delivery {
    Done {
        step: usize,
        index: u64,
        attempt: u32,
    },
    Fail {
        step: usize,
        index: u64,
    },
}

fn failed_with(step_index: usize, index: u64, attempt: u32, error: String) -> Input {
    Input::Event {
        seq: next_seq(),
        event: Event::SubjobFailed(SubjobFailed {
            run: 0,
            job_id: "j".into(),
            step_index,
            index,
            attempt,
            error,
            token: String::new(),
        }),
    }
}

fn requested(job_id: &str, stored: bool, workflow: Definition) -> Input {
    Input::Requested {
        seq: next_seq(),
        event: JobRequested {
            job_id: job_id.into(),
            workflow: "invoices".into(),
            customer: None,
            input: json!(null),
            at: 0,
            deadline_at: None,
            priority: None,
        },
        stored,
        workflow,
    }
}

#[test]
fn an_invalid_stored_definition_rejects_the_job_with_its_reason() {
    let mut e = Engine::new();
    let a = e.apply(
        requested(
            "x",
            false,
            Definition::Invalid("step name \"a.b\" has a dot".into()),
        ),
        5,
    );
    let [Action::Publish(Event::JobRejected(r))] = &a[..] else {
        panic!("{a:?}");
    };
    assert_eq!(r.code, RejectCode::InvalidDefinition);
    assert!(r.reason.contains("a.b"), "{}", r.reason);
    let job = e.job("x").unwrap();
    assert_eq!(job.state, JobState::Rejected);
    assert_eq!(job.error.as_deref(), Some(r.reason.as_str()));
}

#[test]
fn texts_a_job_keeps_or_sends_are_bounded() {
    let mut e = Engine::new();
    request(&mut e, workflow("tolerate_failures = \"100%\""));
    e.apply(done(0, 0, 1, json!((0..150).collect::<Vec<u64>>())), 20);
    let mut actions = Vec::new();
    for i in 0..150 {
        actions.extend(e.apply(
            failed_with(1, i, 1, format!("{i}:{}", "x".repeat(20_000))),
            21,
        ));
    }
    let send = &e.job("j").unwrap().steps[1];
    assert_eq!(send.failed, 150, "the count is exact");
    assert_eq!(send.failures.len(), MAX_FAILURES_KEPT);
    assert!(send
        .failures
        .iter()
        .all(|f| f.error.len() <= MAX_ERROR_BYTES));
    assert!(send.failures[0].error.starts_with("0:xxx"));
    // The summary handed to the next step lists a few failures only.
    let summary = actions
        .iter()
        .find_map(|a| match a {
            Action::Dispatch(d) if d.step_index == 2 => Some(d.source.clone()),
            _ => None,
        })
        .expect("the last step starts");
    let Source::Inline(summary) = summary else {
        panic!("{summary:?}")
    };
    assert_eq!(summary["failed"], 150);
    assert_eq!(
        summary["failures"].as_array().unwrap().len(),
        MAX_FAILURES_PASSED_ON
    );
    // An output larger than any conforming worker sends inline is a pointer.
    let big = json!("y".repeat(INLINE_RESULT_MAX + 1));
    e.apply(done(2, 0, 1, big), 22);
    let job = e.job("j").unwrap();
    assert_eq!(job.state, JobState::Completed);
    assert!(job.output["omitted"]
        .as_str()
        .unwrap()
        .contains("in the log"));
    assert!(job.output["seq"].as_u64().is_some());

    // A cancellation's reason, and an abort's, are cut too.
    let mut e = Engine::new();
    request(&mut e, workflow(""));
    let a = e.apply(
        Input::Event {
            seq: next_seq(),
            event: Event::CancelRequested(CancelRequested {
                job_id: "j".into(),
                reason: Some("r".repeat(100_000)),
                at: 1,
            }),
        },
        30,
    );
    let cancelled = a
        .iter()
        .find_map(|a| match a {
            Action::Publish(Event::JobCancelled(c)) => c.reason.clone(),
            _ => None,
        })
        .unwrap();
    assert!(cancelled.len() <= MAX_REASON_BYTES);
    assert!(e.job("j").unwrap().error.as_ref().unwrap().len() <= MAX_REASON_BYTES);
    let mut e = Engine::new();
    request(&mut e, workflow(""));
    e.apply(
        Input::Abort {
            job_id: "j".into(),
            reason: "z".repeat(100_000),
        },
        31,
    );
    assert!(e.job("j").unwrap().error.as_ref().unwrap().len() <= MAX_REASON_BYTES);
}

#[test]
fn a_record_past_its_limit_sheds_lists_and_keeps_counts() {
    // Six fanouts in a row, each with 100 long failures kept: 600 KB of
    // failures alone, past the record's limit.
    let mut toml = String::from("name = \"invoices\"\n");
    for i in 0..6 {
        toml += &format!(
            "[[steps]]\nname = \"list{i}\"\nkind = \"task\"\n[[steps]]\nname = \"fan{i}\"\nkind = \"fanout\"\ntolerate_failures = \"100%\"\n"
        );
    }
    let wf = Workflow::from_toml(&toml).unwrap();
    let mut e = Engine::new();
    request(&mut e, wf);
    for i in 0..6 {
        e.apply(done(2 * i, 0, 1, json!((0..100).collect::<Vec<u64>>())), 20);
        for index in 0..100 {
            e.apply(failed_with(2 * i + 1, index, 1, "e".repeat(2000)), 21);
        }
    }
    assert_eq!(e.job("j").unwrap().state, JobState::Completed);
    let a = e.apply(Input::Save, 22);
    let Some(Action::Checkpoint(cp)) = a.first() else {
        panic!("{a:?}")
    };
    let Write::Record(record) = &cp.writes[0] else {
        panic!("{:?}", cp.writes[0])
    };
    assert!(record.len() <= MAX_RECORD_BYTES, "{} bytes", record.len());
    let stored: Job = serde_json::from_slice(record).unwrap();
    for step in stored.steps.iter().filter(|s| s.kind == StepKind::Fanout) {
        assert_eq!(step.failed, 100, "counts stay exact");
        assert!(step.failures.len() <= MAX_FAILURES_PASSED_ON);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Workers answer in any order, repeat themselves, fail some subjobs for
    /// good, and keep answering after steps ended. Whatever happens, every
    /// job ends, each subjob is counted once, and counts add up; paced by
    /// the fair share (any capacity, a customer cap or none) too, where the
    /// job never holds more than its cap.
    #[test]
    fn any_interleaving_ends_with_exact_counts(
        n in 0u64..60,
        window in 1u64..20,
        tolerate in 0u64..5,
        choices in proptest::collection::vec((0usize..1000, 0u8..10), 1..800),
        paced in any::<bool>(),
        capacity in proptest::option::of(1u64..30),
        cap in proptest::option::of(1u64..6),
    ) {
        let wf = workflow(&format!("max_in_flight = {window}\ntolerate_failures = \"{tolerate}\""));
        let mut e = if paced { Engine::paced(50) } else { Engine::new() };
        let mut view = ShareView::default();
        view.steps.insert("invoices.send".into(), StepView { capacity, others: vec![] });
        if let Some(cap) = cap {
            view.tenants.insert(
                "acme".into(),
                crate::protocol::Tenant { max_concurrency: Some(cap), ..crate::protocol::Tenant::new("acme") },
            );
        }
        let mut queue: Vec<Delivery> = Vec::new();
        let mut sent: Vec<Delivery> = Vec::new();
        let mut now = 10;
        let push = |actions: Vec<Action>, queue: &mut Vec<Delivery>| {
            for a in actions {
                if let Action::Dispatch(d) = a {
                    for i in d.from..d.to {
                        queue.push(Delivery::Done { step: d.step_index, index: i, attempt: 1 });
                    }
                }
            }
        };
        push(request(&mut e, wf), &mut queue);
        let mut choices = choices.into_iter();
        while e.job("j").map(|j| !j.state.is_terminal()).unwrap_or(false) {
            now += 1;
            // Past the choices: deliveries, and shares every other step.
            let (pick, roll) = choices.next().unwrap_or((0, if now % 2 == 0 { 0 } else { 9 }));
            let input = if !queue.is_empty() && roll >= 2 {
                let d = queue.remove(pick % queue.len());
                let d = match d {
                    Delivery::Done { step, index, attempt } if roll == 2 && attempt < 3 => {
                        // a retry: the same subjob comes back later with a higher attempt
                        queue.push(Delivery::Done { step, index, attempt: attempt + 1 });
                        continue;
                    }
                    Delivery::Done { step, index, .. } if roll == 3 => Delivery::Fail { step, index },
                    other => other,
                };
                sent.push(d.clone());
                to_input(&d, n)
            } else if !sent.is_empty() && roll == 1 {
                // a duplicate or a late answer
                to_input(&sent[pick % sent.len()].clone(), n)
            } else if paced && roll == 0 {
                // what the event loop does: reserve what it wants (alone
                // under the cap: all of it) and share out
                reserving(&e, &view)
            } else {
                Input::Tick
            };
            let actions = e.apply(input, now);
            push(actions, &mut queue);
            if let (true, Some(cap), Some(job)) = (paced, cap, e.job("j")) {
                if job.steps[1].state == StepState::Running {
                    prop_assert!(in_flight(job) <= cap, "{} in flight under a cap of {cap}", in_flight(job));
                }
            }
            prop_assert!(now < 100_000, "job did not end");
        }
        let job = e.job("j").unwrap();
        let fan = &job.steps[1];
        if job.state == JobState::Completed {
            prop_assert_eq!(fan.completed + fan.failed, n);
            prop_assert!(fan.failed <= tolerate);
        } else {
            prop_assert_eq!(job.state, JobState::Failed);
            prop_assert!(fan.failed > tolerate || job.steps[0].state == StepState::Failed || job.steps[2].state == StepState::Failed);
        }
        let (c, f) = fan.pending.counts();
        prop_assert_eq!((c, f), (fan.completed, fan.failed));
    }
}

/// What the event loop feeds a paced engine alone under its caps: `view`,
/// with all the engine wants reserved (within each cap).
fn reserving(e: &Engine, view: &ShareView) -> Input {
    let mut v = view.clone();
    v.reserved = e
        .reservations()
        .into_iter()
        .flatten()
        .map(|(k, (cap, want))| (k.clone(), (*want).min(*cap)))
        .collect();
    Input::Shares(v)
}

fn to_input(d: &Delivery, n: u64) -> Input {
    match *d {
        Delivery::Done {
            step: 0,
            index,
            attempt,
        } => done(0, index, attempt, Value::Array(vec![json!(1); n as usize])),
        Delivery::Done {
            step,
            index,
            attempt,
        } => done(step, index, attempt, json!(null)),
        Delivery::Fail { step, index } => failed(step, index),
    }
}

// --- Fair share: a paced engine dispatches by its share of the slots ---

fn fair_workflow(extra: &str) -> Workflow {
    Workflow::from_toml(&format!(
        "name = \"fair\"\n[[steps]]\nname = \"work\"\nkind = \"fanout\"\n{extra}\n"
    ))
    .unwrap()
}

fn submit_fair(
    e: &mut Engine,
    id: &str,
    customer: &str,
    priority: Option<u8>,
    n: usize,
    now: Millis,
) -> Vec<Action> {
    e.apply(
        Input::Requested {
            seq: next_seq(),
            event: JobRequested {
                job_id: id.into(),
                workflow: "fair".into(),
                customer: Some(customer.into()),
                input: Value::Array(vec![Value::Null; n]),
                at: now,
                deadline_at: None,
                priority,
            },
            stored: false,
            workflow: Definition::Found(fair_workflow("")),
        },
        now,
    )
}

fn view(capacity: Option<u64>, others: Vec<JobDemand>) -> Input {
    let mut v = ShareView::default();
    v.steps
        .insert("fair.work".into(), StepView { capacity, others });
    Input::Shares(v)
}

/// Subjobs dispatched by these actions, per job.
fn dispatched(actions: &[Action]) -> BTreeMap<String, u64> {
    let mut n = BTreeMap::new();
    for a in actions {
        if let Action::Dispatch(d) = a {
            *n.entry(d.job_id.clone()).or_default() += d.to - d.from;
        }
    }
    n
}

fn finish(e: &mut Engine, id: &str, index: u64, now: Millis) -> Vec<Action> {
    e.apply(
        Input::Event {
            seq: next_seq(),
            event: Event::SubjobCompleted(SubjobCompleted {
                run: 0,
                job_id: id.into(),
                step_index: 0,
                index,
                attempt: 1,
                result: Value::Null,
                duration_ms: 50,
                token: String::new(),
            }),
        },
        now,
    )
}

#[test]
fn a_paced_fanout_dispatches_its_share_not_its_whole_window() {
    let mut e = Engine::paced(50);
    e.apply(view(Some(100), vec![]), 1);
    let a = submit_fair(&mut e, "big", "big", None, 20_000, 10);
    // Its slots, and as much again until its pace is measured.
    assert_eq!(dispatched(&a)["big"], 200);
    let share = e.job("big").unwrap().steps[0].share.clone().unwrap();
    assert_eq!(
        (share.slots, share.capacity, share.waiting),
        (100, 100, None)
    );
    // A small job of another customer starts with half the slots at once.
    let a = submit_fair(&mut e, "small", "small", None, 100, 20);
    assert_eq!(dispatched(&a)["small"], 100, "50 slots and 50 ahead");
    assert_eq!(
        e.job("small").unwrap().steps[0]
            .share
            .as_ref()
            .unwrap()
            .slots,
        50
    );
    // The big one, over its new share, refills nothing as subjobs finish,
    // once the engine has shared out again.
    e.apply(view(Some(100), vec![]), 30);
    assert_eq!(
        e.job("big").unwrap().steps[0].share.as_ref().unwrap().slots,
        50
    );
    let mut refilled = 0;
    for i in 0..100 {
        refilled += dispatched(&finish(&mut e, "big", i, 40))
            .get("big")
            .copied()
            .unwrap_or(0);
    }
    assert_eq!(
        refilled, 0,
        "100 of 200 in flight finished: at its window of 100 or more"
    );
    for i in 100..150 {
        refilled += dispatched(&finish(&mut e, "big", i, 40))
            .get("big")
            .copied()
            .unwrap_or(0);
    }
    assert!(
        refilled > 0 && refilled <= 50,
        "refilled {refilled} back up to its window"
    );
}

#[test]
fn a_paced_batched_fanout_keeps_a_batch_per_slot() {
    let mut e = Engine::paced(50);
    e.apply(view(Some(100), vec![]), 1);
    let a = e.apply(
        Input::Requested {
            seq: next_seq(),
            event: JobRequested {
                job_id: "b".into(),
                workflow: "fair".into(),
                customer: Some("c".into()),
                input: json!(vec![0; 20_000]),
                at: 10,
                deadline_at: None,
                priority: None,
            },
            stored: false,
            workflow: Definition::Found(fair_workflow("batch_size = 10")),
        },
        10,
    );
    // 100 slots, each busy with a batch of 10, and 100 ahead.
    assert_eq!(dispatched(&a)["b"], 1100);
}

#[test]
fn without_a_known_capacity_a_paced_fanout_dispatches_its_max_in_flight() {
    let mut e = Engine::paced(50);
    let a = submit_fair(&mut e, "big", "big", None, 20_000, 10);
    assert_eq!(
        dispatched(&a).get("big"),
        None,
        "nothing before a first view"
    );
    let a = e.apply(view(None, vec![]), 11);
    assert_eq!(dispatched(&a)["big"], 5000);
    assert_eq!(e.job("big").unwrap().steps[0].share, None);
}

#[test]
fn other_partitions_jobs_take_their_share_and_priorities_go_first() {
    let mut e = Engine::paced(50);
    let other = JobDemand {
        job_id: "elsewhere".into(),
        customer: Some("c2".into()),
        priority: 9,
        want: 5000,
        holds: 100,
        unfinished: 9000,
        since: 0,
        waiting_since: None,
    };
    e.apply(view(Some(100), vec![other.clone()]), 1);
    let a = submit_fair(&mut e, "low", "c1", Some(5), 1000, 10);
    assert_eq!(
        dispatched(&a).get("low"),
        None,
        "a priority-9 job elsewhere takes every slot"
    );
    let share = e.job("low").unwrap().steps[0].share.clone().unwrap();
    assert_eq!(
        share.waiting,
        Some(crate::protocol::WaitReason::LowerPriority)
    );
    // Waiting, it ages one level a minute: at level 9 after four, it shares.
    e.apply(view(Some(100), vec![other.clone()]), 10);
    e.apply(view(Some(100), vec![other.clone()]), 10 + 3 * AGING_MS);
    assert_eq!(
        e.job("low").unwrap().steps[0].share.as_ref().unwrap().slots,
        0
    );
    let a = e.apply(view(Some(100), vec![other]), 10 + 4 * AGING_MS);
    assert_eq!(
        e.job("low").unwrap().steps[0].share.as_ref().unwrap().slots,
        50
    );
    assert_eq!(dispatched(&a)["low"], 100);
}

#[test]
fn a_capped_customer_never_holds_more_than_its_cap() {
    let mut e = Engine::paced(50);
    let mut v = ShareView::default();
    v.steps.insert(
        "fair.work".into(),
        StepView {
            capacity: Some(100),
            others: vec![],
        },
    );
    v.tenants.insert(
        "acme".into(),
        crate::protocol::Tenant {
            max_concurrency: Some(7),
            ..crate::protocol::Tenant::new("acme")
        },
    );
    let held =
        |e: &Engine| in_flight(e.job("a1").unwrap()) + e.job("a2").map(in_flight).unwrap_or(0);
    // What the event loop does: reserve what the engine wants, within the
    // cap (one partition: all of it).
    let share_out = |e: &mut Engine, v: &ShareView, now: Millis| {
        let input = reserving(e, v);
        e.apply(input, now)
    };
    share_out(&mut e, &v, 1);
    let a = submit_fair(&mut e, "a1", "acme", None, 1000, 10);
    assert_eq!(
        dispatched(&a).get("a1"),
        None,
        "under a cap, it waits for the next share-out"
    );
    let a = share_out(&mut e, &v, 11);
    assert_eq!(dispatched(&a).get("a1"), None, "nothing reserved yet");
    assert_eq!(
        e.reservations().unwrap()["cap.customer.822b33ad87c1"],
        (7, 7)
    );
    let a = share_out(&mut e, &v, 12);
    assert_eq!(
        dispatched(&a)["a1"],
        7,
        "its cap, though 100 slots are free"
    );
    assert_eq!(
        e.job("a1").unwrap().steps[0]
            .share
            .as_ref()
            .unwrap()
            .waiting,
        Some(crate::protocol::WaitReason::CustomerCap)
    );
    submit_fair(&mut e, "a2", "acme", None, 1000, 12);
    let (mut done1, mut done2) = (0, 0);
    for t in 0..200u64 {
        share_out(&mut e, &v, 13 + t * 10);
        assert!(held(&e) <= 7, "at round {t}: {} held", held(&e));
        // Each round, one subjob of each finishes.
        if in_flight(e.job("a1").unwrap()) > 0 {
            finish(&mut e, "a1", done1, 14 + t * 10);
            done1 += 1;
        }
        if in_flight(e.job("a2").unwrap()) > 0 {
            e.apply(
                Input::Event {
                    seq: next_seq(),
                    event: Event::SubjobCompleted(SubjobCompleted {
                        run: 0,
                        job_id: "a2".into(),
                        step_index: 0,
                        index: done2,
                        attempt: 1,
                        result: Value::Null,
                        duration_ms: 1,
                        token: String::new(),
                    }),
                },
                15 + t * 10,
            );
            done2 += 1;
        }
        assert!(held(&e) <= 7, "at round {t}: {} held", held(&e));
    }
    assert!(
        done2 > 50 && done1 > 50,
        "both progress: {done1} and {done2}"
    );
}

// --- Changing a running job: pause, resume, window, tolerance ---

fn update_input(job: &str, at: Millis, f: impl FnOnce(&mut UpdateRequested)) -> Input {
    let mut e = UpdateRequested {
        job_id: job.into(),
        paused: None,
        max_in_flight: None,
        tolerate: None,
        reason: None,
        at,
    };
    f(&mut e);
    Input::Event {
        seq: next_seq(),
        event: Event::UpdateRequested(e),
    }
}

#[test]
fn a_paused_job_dispatches_nothing_until_resumed() {
    let mut e = Engine::new();
    request(&mut e, workflow("max_in_flight = 2"));
    e.apply(update_input("j", 15, |u| u.paused = Some(true)), 15);
    assert_eq!(e.job("j").unwrap().paused_at, Some(15));
    // Its running task finishes; the fanout starts but dispatches nothing.
    let a = e.apply(done(0, 0, 1, json!([1, 2, 3, 4, 5])), 20);
    assert_eq!(
        kinds(&a),
        ["step_completed", "step_started"],
        "no dispatch while paused"
    );
    let a = e.apply(Input::Tick, 30);
    assert!(kinds(&a).is_empty(), "{:?}", kinds(&a));
    // Resumed, it dispatches its window at once.
    let a = e.apply(update_input("j", 40, |u| u.paused = Some(false)), 40);
    assert_eq!(kinds(&a), ["dispatch 1:0..2"]);
    assert_eq!(e.job("j").unwrap().paused_at, None);
    // Paused again: the two in flight finish, nothing more goes out.
    e.apply(update_input("j", 50, |u| u.paused = Some(true)), 50);
    assert!(kinds(&e.apply(done(1, 0, 1, json!(null)), 51)).is_empty());
    assert!(kinds(&e.apply(done(1, 1, 1, json!(null)), 52)).is_empty());
    assert_eq!(in_flight(e.job("j").unwrap()), 0);
    // A repeated request changes nothing.
    assert!(e
        .apply(update_input("j", 50, |u| u.paused = Some(true)), 53)
        .is_empty());
}

#[test]
fn a_running_jobs_window_and_tolerance_change() {
    let mut e = Engine::new();
    request(
        &mut e,
        workflow("max_in_flight = 2\ntolerate_failures = \"3\""),
    );
    e.apply(done(0, 0, 1, json!([1, 2, 3, 4, 5, 6, 7, 8])), 20);
    // A wider window: the next refill fills it.
    let a = e.apply(update_input("j", 21, |u| u.max_in_flight = Some(5)), 21);
    assert!(kinds(&a).is_empty(), "{:?}", kinds(&a));
    assert_eq!(e.job("j").unwrap().definition.steps[1].max_in_flight, 5);
    assert_eq!(
        e.job("j").unwrap().definition.steps[0].max_in_flight,
        5000,
        "steps before stay"
    );
    e.apply(done(1, 0, 1, json!(null)), 22);
    let a = e.apply(done(1, 1, 1, json!(null)), 22);
    assert_eq!(kinds(&a), ["dispatch 1:2..7"]);
    // Two failures, tolerated (3)...
    e.apply(failed(1, 2), 23);
    e.apply(failed(1, 3), 23);
    assert_eq!(e.job("j").unwrap().state, JobState::Running);
    // ...until the tolerance comes down to 1: the job fails at once.
    let a = e.apply(
        update_input("j", 24, |u| {
            u.tolerate = Some(crate::protocol::Tolerance::Count(1))
        }),
        24,
    );
    assert!(kinds(&a).contains(&"failed".to_string()), "{:?}", kinds(&a));
    let job = e.job("j").unwrap();
    assert_eq!(job.state, JobState::Failed);
    assert!(job
        .error
        .as_deref()
        .unwrap_or("")
        .contains("more than now tolerated (1)"));
    // A window of 0 is refused (it would stall the job).
    let mut e = Engine::new();
    request(&mut e, workflow("max_in_flight = 2"));
    e.apply(done(0, 0, 1, json!([1, 2, 3])), 20);
    assert!(e
        .apply(update_input("j", 21, |u| u.max_in_flight = Some(0)), 21)
        .is_empty());
    assert_eq!(e.job("j").unwrap().definition.steps[1].max_in_flight, 2);
}

/// What the store holds of a job after `actions`' last checkpoint of it:
/// the record, with the chunks of step `step_index` loaded over the
/// chunks stored before (`chunks`, updated).
fn stored_after(actions: &[Action], step_index: usize, chunks: &mut BTreeMap<u64, Vec<u8>>) -> Job {
    let mut record = None;
    for a in actions {
        let Action::Checkpoint(cp) = a else { continue };
        for w in &cp.writes {
            match w {
                Write::Record(r) => record = Some(serde_json::from_slice::<Job>(r).unwrap()),
                Write::Chunk {
                    step_index: s,
                    chunk,
                    bits,
                } if *s == step_index => {
                    chunks.insert(*chunk, bits.clone());
                }
                Write::DeleteChunk {
                    step_index: s,
                    chunk,
                } if *s == step_index => {
                    chunks.remove(chunk);
                }
                _ => {}
            }
        }
    }
    let mut job = record.expect("a checkpoint of the job");
    let total = job.steps[step_index].total;
    let mut pending = Pending::new(total);
    for (c, bits) in chunks.iter() {
        assert!(pending.load_chunk(*c, bits));
    }
    job.steps[step_index].pending = pending;
    job
}

fn outcome_in(run: u32, step_index: usize, index: u64, ok: bool) -> Input {
    let event = match ok {
        true => Event::SubjobCompleted(SubjobCompleted {
            job_id: "j".into(),
            step_index,
            index,
            attempt: 1,
            result: json!(index),
            duration_ms: 1,
            run,
            token: String::new(),
        }),
        false => Event::SubjobFailed(SubjobFailed {
            job_id: "j".into(),
            step_index,
            index,
            attempt: 1,
            error: format!("bad {index} in run {run}"),
            run,
            token: String::new(),
        }),
    };
    Input::Event {
        seq: next_seq(),
        event,
    }
}

fn redrive_request(seq: u64, step: Option<&str>, stored: Option<Job>) -> Input {
    Input::Redrive {
        seq,
        event: RedriveRequested {
            job_id: "j".into(),
            step: step.map(str::to_string),
            reason: Some("the mail server is back".into()),
            at: 50,
        },
        stored: stored.map(Box::new),
    }
}

/// A job whose fanout (6 subjobs, 1 failure tolerated) failed with 0 and 5
/// completed, 1 and 2 failed, 3 and 4 never finished; stored and unloaded.
fn failed_fanout(e: &mut Engine, chunks: &mut BTreeMap<u64, Vec<u8>>) -> Job {
    request(e, workflow("tolerate_failures = \"1\""));
    e.apply(done(0, 0, 1, json!([0, 1, 2, 3, 4, 5])), 11);
    let mut saved = e.apply(Input::Save, 12);
    for (index, ok) in [(0, true), (5, true), (1, false), (2, false)] {
        e.apply(outcome_in(0, 1, index, ok), 13);
    }
    assert_eq!(e.job("j").unwrap().state, JobState::Failed);
    saved.extend(e.apply(Input::Save, 14));
    assert!(!e.contains("j"), "an ended job is unloaded");
    stored_after(&saved, 1, chunks)
}

#[test]
fn a_redrive_runs_again_only_the_subjobs_that_did_not_complete() {
    let mut e = Engine::new();
    let mut chunks = BTreeMap::new();
    let stored = failed_fanout(&mut e, &mut chunks);
    assert_eq!(stored.redrive_step(None), Ok(1));
    assert!(
        !chunks.is_empty(),
        "an ended job keeps the bits of a step it may redrive"
    );

    let a = e.apply(redrive_request(900, None, Some(stored)), 50);
    assert_eq!(
        kinds(&a),
        ["redriven", "step_started", "dispatch 1:0..5"],
        "{a:?}"
    );
    let Action::Dispatch(d) = &a[2] else {
        unreachable!()
    };
    assert_eq!((d.indices.as_deref(), d.run), (Some(&[1, 2, 3, 4][..]), 1));
    let Action::Publish(Event::JobRedriven(r)) = &a[0] else {
        unreachable!()
    };
    assert_eq!((r.run, r.step_index, r.subjobs), (1, 1, 4));
    let job = e.job("j").unwrap();
    assert_eq!(job.state, JobState::Running);
    assert_eq!((job.run, job.error.as_deref()), (1, None));
    let before = &job.redrives[0];
    assert_eq!(before.state, JobState::Failed);
    assert!(before
        .error
        .as_deref()
        .unwrap()
        .contains("more than tolerated"));
    assert_eq!((before.steps[0].completed, before.steps[0].failed), (2, 2));
    assert_eq!(before.steps.len(), 2, "the steps from the redriven one on");

    // Late outcomes of the first run count nothing; a second redrive of a
    // running job is refused; the first one read again changes nothing.
    assert!(e.apply(outcome_in(0, 1, 3, true), 51).is_empty());
    assert!(e.apply(redrive_request(901, None, None), 51).is_empty());
    assert!(e.apply(redrive_request(900, None, None), 51).is_empty());
    assert_eq!(e.job("j").unwrap().run, 1);
    assert_eq!(e.job("j").unwrap().steps[1].completed, 2);
    assert_eq!(in_flight(e.job("j").unwrap()), 4);
    let ignored = e.take_ignored();
    assert_eq!(ignored.get("other_run"), Some(&1));
    assert_eq!(ignored.get("not_redrivable"), Some(&1));

    // This run's outcomes count, then the job goes on to its last step.
    for index in [1, 2, 3] {
        assert!(e.apply(outcome_in(1, 1, index, true), 52).is_empty());
    }
    let a = e.apply(outcome_in(1, 1, 4, true), 53);
    assert_eq!(
        kinds(&a),
        ["step_completed", "step_started", "dispatch 2:0..1"]
    );
    let Action::Publish(Event::StepCompleted(end)) = &a[0] else {
        unreachable!()
    };
    assert_eq!((end.run, end.completed, end.failed), (1, 6, 0));
    let a = e.apply(outcome_in(1, 2, 0, true), 54);
    let Some(Action::Publish(Event::JobCompleted(c))) = a.last() else {
        panic!("{a:?}")
    };
    assert_eq!(c.run, 1);
    assert_ne!(
        Event::JobCompleted(c.clone()).msg_id(),
        Event::JobCompleted(JobCompleted {
            run: 0,
            ..c.clone()
        })
        .msg_id(),
        "the duplicate window does not drop the second run's end"
    );
}

#[test]
fn a_redrive_read_again_after_a_crash_forgets_the_failures_again() {
    let mut e = Engine::new();
    let mut chunks = BTreeMap::new();
    let stored = failed_fanout(&mut e, &mut chunks);
    let a = e.apply(redrive_request(900, None, Some(stored)), 50);
    // The record of the run is stored, its chunks are not: a restart loads
    // the record with the run before's bits.
    let mut record = None;
    for w in e
        .apply(Input::Save, 51)
        .iter()
        .chain(a.iter())
        .filter_map(|a| match a {
            Action::Checkpoint(cp) => Some(&cp.writes),
            _ => None,
        })
        .flatten()
    {
        if let Write::Record(r) = w {
            record = Some(serde_json::from_slice::<Job>(r).unwrap());
        }
    }
    let mut job = record.unwrap();
    let mut pending = Pending::new(6);
    for (c, bits) in &chunks {
        assert!(pending.load_chunk(*c, bits));
    }
    job.steps[1].pending = pending;
    job.recount();
    assert_eq!(job.steps[1].failed, 2, "stale failures");
    let mut e = Engine::new();
    e.insert(job);
    e.apply(redrive_request(900, None, None), 60);
    let job = e.job("j").unwrap();
    assert_eq!(
        (job.run, job.steps[1].completed, job.steps[1].failed),
        (1, 2, 0)
    );
    assert_eq!(job.redrives.len(), 1);
}

#[test]
fn what_cannot_be_redriven_is_refused_with_a_reason() {
    let mut e = Engine::new();
    request(&mut e, workflow(""));
    let job = e.job("j").unwrap().clone();
    assert_eq!(job.redrive_step(None).unwrap_err().code(), "job_running");
    let mut ended = job.clone();
    ended.state = JobState::Cancelled;
    assert_eq!(
        ended.redrive_step(None).unwrap_err().code(),
        "not_redrivable"
    );
    ended.state = JobState::Completed;
    ended.steps.iter_mut().for_each(|s| {
        s.state = StepState::Completed;
        s.total = 1;
        s.completed = 1;
    });
    ended.current = 2;
    assert_eq!(
        ended.redrive_step(None).unwrap_err().code(),
        "nothing_to_redrive"
    );
    assert_eq!(
        ended.redrive_step(Some("nope")).unwrap_err().code(),
        "no_such_step"
    );
    ended.steps[1].completed = 0;
    ended.steps[1].failed = 1;
    ended.steps[1].source = Some(Source::Inline(json!([1])));
    assert_eq!(ended.redrive_step(None), Ok(1), "tolerated failures");
    assert_eq!(ended.redrive_step(Some("send")), Ok(1));
    // The engine ignores what the rule refuses.
    let mut e = Engine::new();
    let mut running = job;
    running.job_id = "j".into();
    assert!(e
        .apply(redrive_request(5, None, Some(running)), 10)
        .is_empty());
    assert_eq!(e.take_ignored().get("not_redrivable"), Some(&1));
}

#[test]
fn a_completed_job_with_tolerated_failures_redrives_them_and_runs_the_rest_again() {
    let mut e = Engine::new();
    let mut chunks = BTreeMap::new();
    request(&mut e, workflow("tolerate_failures = \"50%\""));
    e.apply(done(0, 0, 1, json!([0, 1, 2])), 11);
    let mut saved = Vec::new();
    for (index, ok) in [(0, true), (1, false), (2, true)] {
        saved.extend(e.apply(outcome_in(0, 1, index, ok), 13));
    }
    saved.extend(e.apply(outcome_in(0, 2, 0, true), 14));
    assert_eq!(e.job("j").unwrap().state, JobState::Completed);
    saved.extend(e.apply(Input::Save, 15));
    let stored = stored_after(&saved, 1, &mut chunks);
    let a = e.apply(redrive_request(950, None, Some(stored)), 50);
    let Some(Action::Dispatch(d)) = a.last() else {
        panic!("{a:?}")
    };
    assert_eq!(d.indices.as_deref(), Some(&[1][..]));
    let job = e.job("j").unwrap();
    assert_eq!(job.redrives[0].state, JobState::Completed);
    assert_eq!(
        job.steps[2].state,
        StepState::Pending,
        "the last step runs again"
    );
    assert_eq!(job.output, Value::Null);
    assert_eq!(job.result_runs(1), (0, 1));
    assert_eq!(job.result_runs(2), (1, 1));
}

#[test]
fn a_paused_job_keeps_its_deadline_and_loses_nothing_it_did_not_dispatch() {
    // The lost-task check: paused with nothing in flight, an empty work
    // queue at two looks in a row fails nothing.
    let mut e = Engine::new();
    request(&mut e, workflow("max_in_flight = 2"));
    e.apply(done(0, 0, 1, json!([1, 2, 3, 4])), 20);
    e.apply(update_input("j", 21, |u| u.paused = Some(true)), 21);
    e.apply(done(1, 0, 1, json!(null)), 22);
    e.apply(done(1, 1, 1, json!(null)), 22);
    assert_eq!(in_flight(e.job("j").unwrap()), 0);
    for now in [30, 40] {
        let a = e.apply(
            Input::NoTasks {
                jobs: vec![unqueued("j")],
            },
            now,
        );
        assert!(kinds(&a).is_empty(), "{:?}", kinds(&a));
    }
    assert_eq!(e.job("j").unwrap().steps[1].failed, 0);

    // The step deadline: it passes while paused, and the rest fails.
    let mut e = Engine::new();
    request(&mut e, workflow("max_in_flight = 2\ndeadline = \"1s\""));
    e.apply(done(0, 0, 1, json!([1, 2, 3, 4])), 20);
    e.apply(update_input("j", 21, |u| u.paused = Some(true)), 21);
    let a = e.apply(Input::Tick, 20 + 1000);
    assert!(
        kinds(&a).contains(&"subjobs_failed".to_string()),
        "{:?}",
        kinds(&a)
    );
    let job = e.job("j").unwrap();
    assert_eq!(job.state, JobState::Failed);
    assert_eq!(job.steps[1].failed, 4);
}

proptest! {
    /// Whatever the first run left (failures, subjobs never finished,
    /// duplicates), a redrive in which everything succeeds, with late
    /// first-run outcomes mixed in, ends with every subjob completed once.
    #[test]
    fn a_redrive_completes_exactly_what_the_first_run_did_not(
        total in 1u64..40,
        first in proptest::collection::vec((0u64..40, any::<bool>()), 0..60),
        late in proptest::collection::vec(0u64..40, 0..20),
        order in any::<u64>(),
    ) {
        let mut e = Engine::new();
        let mut chunks = BTreeMap::new();
        request(&mut e, workflow("tolerate_failures = \"2\"\nmax_in_flight = 7"));
        let items: Vec<u64> = (0..total).collect();
        let mut saved = e.apply(done(0, 0, 1, json!(items)), 11);
        for (index, ok) in first {
            saved.extend(e.apply(outcome_in(0, 1, index % total, ok), 12));
            saved.extend(e.apply(Input::Tick, 12));
        }
        if e.job("j").is_some_and(|j| j.current == 2 && j.state == JobState::Running) {
            // Completed within its tolerance: the last step ends it.
            saved.extend(e.apply(outcome_in(0, 2, 0, true), 12));
        }
        // Still running: it fails for another reason (its input gone).
        saved.extend(e.apply(
            Input::Abort {
                job_id: "j".into(),
                reason: "aborted".into(),
            },
            12,
        ));
        saved.extend(e.apply(Input::Save, 13));
        prop_assert!(!e.contains("j"), "an ended job is unloaded");
        let stored = stored_after(&saved, 1, &mut chunks);
        let first_completed = stored.steps[1].completed;
        match stored.redrive_step(None) {
            Err(_) => {
                // Nothing to redrive: the first run completed everything.
                prop_assert_eq!(first_completed, total);
                return Ok(());
            }
            Ok(i) => prop_assert_eq!(i, 1),
        }
        e.apply(redrive_request(900, None, Some(stored)), 50);
        let mut now = 51;
        let mut rng = order;
        let mut late = late.into_iter();
        while e.job("j").is_some_and(|j| j.state == JobState::Running) {
            let job = e.job("j").unwrap();
            let step = job.current;
            // The next subjob in flight, picked by a cheap generator.
            let open: Vec<u64> = (0..job.steps[step].dispatched)
                .filter(|i| !job.steps[step].pending.is_done(*i))
                .collect();
            prop_assert!(!open.is_empty(), "a running step with nothing in flight");
            rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let index = open[(rng >> 33) as usize % open.len()];
            if let Some(l) = late.next() {
                e.apply(outcome_in(0, 1, l % total, true), now);
            }
            e.apply(outcome_in(1, step, index, true), now);
            e.apply(Input::Tick, now);
            now += 1;
        }
        let job = e.job("j").unwrap();
        prop_assert_eq!(job.state, JobState::Completed);
        prop_assert_eq!((job.steps[1].completed, job.steps[1].failed), (total, 0));
        prop_assert_eq!(job.steps[1].pending.counts(), (total, 0));
        prop_assert_eq!(job.redrives[0].subjobs, total - first_completed);
    }
}

fn batch_done(first: u64, size: u64, outcomes: &[(u64, Option<&str>)]) -> Input {
    Input::Event {
        seq: next_seq(),
        event: Event::SubjobsDone(crate::protocol::SubjobsDone {
            job_id: "j".into(),
            step_index: 1,
            index: first,
            batch_size: size,
            attempt: 1,
            duration_ms: 10,
            outcomes: outcomes
                .iter()
                .map(|&(index, error)| crate::protocol::ItemOutcome {
                    index,
                    attempt: if error.is_some() { 3 } else { 1 },
                    result: json!(index),
                    error: error.map(str::to_string),
                })
                .collect(),
            run: 0,
            token: String::new(),
        }),
    }
}

#[test]
fn a_batched_fanout_dispatches_whole_blocks_and_counts_each_subjob_once() {
    let mut e = Engine::new();
    request(
        &mut e,
        workflow("batch_size = 4\nmax_in_flight = 6\ntolerate_failures = \"1\""),
    );
    let a = e.apply(done(0, 0, 1, json!((0..10).collect::<Vec<_>>())), 20);
    // The window (6) cut to a whole block (4).
    assert_eq!(
        kinds(&a),
        ["step_completed", "step_started", "dispatch 1:0..4"]
    );
    // Outcomes outside the batch's block, or of another batch size, count nothing.
    assert!(e.apply(batch_done(0, 4, &[(5, None)]), 21).is_empty());
    assert!(e.apply(batch_done(0, 2, &[(0, None)]), 21).is_empty());
    assert!(e.apply(batch_done(2, 4, &[(2, None)]), 21).is_empty());
    // Nor does one of another batch size whose block is not dispatched
    // yet: held until it is, then dropped.
    assert!(e.apply(batch_done(4, 2, &[(4, None)]), 21).is_empty());
    assert_eq!(e.job("j").unwrap().steps[1].completed, 0);
    // One item failed (tolerated), three completed: the window refills.
    let a = e.apply(
        batch_done(
            0,
            4,
            &[(0, None), (1, Some("bounced")), (2, None), (3, None)],
        ),
        22,
    );
    // The rest (6) fits the window; it ends a block, at the step's end.
    assert_eq!(kinds(&a), ["dispatch 1:4..10"]);
    let step = &e.job("j").unwrap().steps[1];
    assert_eq!((step.completed, step.failed, step.retries), (3, 1, 2));
    assert_eq!(step.failures[0].index, 1);
    // A repeat of the batch counts nothing.
    assert!(e
        .apply(batch_done(0, 4, &[(0, None), (1, None)]), 23)
        .is_empty());
    assert_eq!(e.job("j").unwrap().steps[1].completed, 3);
    // The last block is short (8..10).
    let a = e.apply(
        batch_done(4, 4, &[(4, None), (5, None), (6, None), (7, None)]),
        24,
    );
    assert!(a.is_empty());
    let a = e.apply(batch_done(8, 4, &[(8, None), (9, None)]), 25);
    assert_eq!(
        kinds(&a),
        ["step_completed", "step_started", "dispatch 2:0..1"]
    );
    let step = &e.job("j").unwrap().steps[1];
    assert_eq!((step.completed, step.failed), (9, 1));
}

#[test]
fn a_batch_read_back_is_unapplied_while_any_of_its_subjobs_is() {
    let mut e = Engine::new();
    request(&mut e, workflow("batch_size = 2"));
    e.apply(done(0, 0, 1, json!([1, 2, 3, 4])), 20);
    let Input::Event { event, .. } = batch_done(0, 2, &[(0, None), (1, None)]) else {
        unreachable!()
    };
    assert!(e.unapplied(&event));
    e.apply(batch_done(0, 2, &[(0, None)]), 21);
    assert!(e.unapplied(&event), "subjob 1 has no outcome yet");
    e.apply(batch_done(0, 2, &[(1, None)]), 22);
    assert!(!e.unapplied(&event));
}

#[test]
fn an_outcome_replayed_before_its_subjob_is_dispatched_again_counts_once_it_is() {
    // Session A dispatched 200 subjobs (its share then), and a worker ran
    // subjob 150; A failed before its first checkpoint.
    let request = Input::Requested {
        seq: next_seq(),
        event: JobRequested {
            job_id: "big".into(),
            workflow: "fair".into(),
            customer: Some("acme".into()),
            input: Value::Array(vec![Value::Null; 20_000]),
            at: 10,
            deadline_at: None,
            priority: None,
        },
        stored: false,
        workflow: Definition::Found(fair_workflow("")),
    };
    let mut a = Engine::paced(50);
    a.apply(view(Some(100), vec![]), 1);
    assert_eq!(dispatched(&a.apply(request.clone(), 10))["big"], 200);
    let ran = Input::Event {
        seq: next_seq(),
        event: Event::SubjobCompleted(SubjobCompleted {
            run: 0,
            job_id: "big".into(),
            step_index: 0,
            index: 150,
            attempt: 1,
            result: Value::Null,
            duration_ms: 50,
            token: String::new(),
        }),
    };
    // Session B reads the log again from its start, with a smaller share
    // than A had: the outcome comes before B dispatched subjob 150.
    let mut b = Engine::paced(50);
    b.apply(view(Some(10), vec![]), 20);
    assert_eq!(dispatched(&b.apply(request, 21))["big"], 20);
    b.apply(ran, 22);
    assert_eq!(b.job("big").unwrap().steps[0].completed, 0);
    // Its share grows; once it dispatches 150 again, the outcome counts
    // (its task, dispatched again, is dropped as a duplicate by the work
    // queue, so no other outcome would ever come).
    b.apply(view(Some(100), vec![]), 30);
    let mut now = 40;
    let mut index = 0;
    while b.job("big").unwrap().steps[0].dispatched <= 150 {
        finish(&mut b, "big", index, now);
        index += 1;
        now += 1;
        assert!(index < 150, "dispatched up to 150 by finishing others");
    }
    let step = &b.job("big").unwrap().steps[0];
    assert!(
        step.pending.is_done(150),
        "the outcome counted once dispatched"
    );
    assert_eq!(step.completed, index + 1);
    // Counted once: the same outcome again is a duplicate.
    finish(&mut b, "big", 150, now);
    assert_eq!(b.job("big").unwrap().steps[0].completed, index + 1);
}
