//! JSON Schemas of every payload, generated from the Rust types. The copies
//! in `docs/schemas/` are checked against these by a test, so the documents
//! other languages rely on cannot drift from the code. Regenerate them with
//! `FANJET_WRITE_SCHEMAS=1 cargo test --lib schemas`.

use schemars::schema_for;
use serde_json::Value;

use super::{
    Demand, Event, Heartbeat, IndexCounts, Job, JobPage, JobStats, JobSummary, ListRequest,
    Reservations, ResultsPage, ResultsRequest, Submission, SubmitReply, Task, Tenant, Workflow,
};

/// (file name in `docs/schemas/`, schema) for every payload.
pub fn all() -> Vec<(&'static str, Value)> {
    let v = |s: schemars::Schema| s.to_value();
    vec![
        ("submission.json", v(schema_for!(Submission))),
        ("submit-reply.json", v(schema_for!(SubmitReply))),
        ("event.json", v(schema_for!(Event))),
        ("task.json", v(schema_for!(Task))),
        ("job-status.json", v(schema_for!(Job))),
        ("job-stats.json", v(schema_for!(JobStats))),
        ("heartbeat.json", v(schema_for!(Heartbeat))),
        ("workflow.json", v(schema_for!(Workflow))),
        ("demand.json", v(schema_for!(Demand))),
        ("tenant.json", v(schema_for!(Tenant))),
        ("reservations.json", v(schema_for!(Reservations))),
        ("results-request.json", v(schema_for!(ResultsRequest))),
        ("results-page.json", v(schema_for!(ResultsPage))),
        ("job-summary.json", v(schema_for!(JobSummary))),
        ("list-request.json", v(schema_for!(ListRequest))),
        ("job-page.json", v(schema_for!(JobPage))),
        ("job-counts.json", v(schema_for!(IndexCounts))),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn docs_schemas_match_the_code() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/schemas");
        let write = std::env::var_os("FANJET_WRITE_SCHEMAS").is_some();
        for (name, schema) in all() {
            let text = serde_json::to_string_pretty(&schema).unwrap() + "\n";
            let path = dir.join(name);
            if write {
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(&path, &text).unwrap();
            }
            let on_disk = std::fs::read_to_string(&path).unwrap_or_else(|_| {
                panic!(
                    "{} is missing; run FANJET_WRITE_SCHEMAS=1 cargo test --lib schemas",
                    path.display()
                )
            });
            assert_eq!(
                on_disk,
                text,
                "{} differs from the code; run FANJET_WRITE_SCHEMAS=1 cargo test --lib schemas",
                path.display()
            );
        }
    }

    #[test]
    fn the_event_schema_names_every_kind() {
        let schema = all()
            .into_iter()
            .find(|(n, _)| *n == "event.json")
            .unwrap()
            .1;
        let text = schema.to_string();
        for kind in [
            "JobRequested",
            "JobRejected",
            "StepStarted",
            "StepCompleted",
            "SubjobCompleted",
            "SubjobFailed",
            "SubjobsDone",
            "SubjobsCompleted",
            "SubjobsFailed",
            "JobCompleted",
            "JobFailed",
            "CancelRequested",
            "JobCancelled",
        ] {
            assert!(
                text.contains(&format!("\"{kind}\"")),
                "{kind} missing from the event schema"
            );
        }
    }
}
