//! The detailed status of a job: what the manager's status service
//! (`fanjet.status.<customer>.<job>`), `GET /api/jobs/{id}` and `fanjet
//! status --json` answer. It is the job record less its internal fields,
//! with the job's partition, each step's statistics and, for a running
//! step, its throughput, ETA and the capacity its deadline needs.

use serde::Serialize;
use serde_json::{json, Value};

use super::{partition, Job, JobStats, StepState};

/// The detailed status: the job record, with statistics and an ETA per step.
pub fn detailed(job: &Job, stats: Option<&JobStats>, now: u64) -> Value {
    let mut v = serde_json::to_value(job).unwrap_or(Value::Null);
    if let Some(obj) = v.as_object_mut() {
        obj.remove("definition");
        obj.remove("requested_seq");
        obj.remove("applied_seq");
        // Which manager drives the job: the holder of this partition's lease
        // (`fanjet processes`).
        obj.insert("partition".into(), json!(partition(&job.job_id)));
    }
    if let Some(steps) = v.get_mut("steps").and_then(Value::as_array_mut) {
        for (i, sv) in steps.iter_mut().enumerate() {
            let Some(step) = job.steps.get(i) else {
                continue;
            };
            let Some(o) = sv.as_object_mut() else {
                continue;
            };
            o.remove("source");
            o.remove("output_seq");
            o.remove("output_len");
            if let Some(st) = stats.and_then(|s| s.steps.get(i)) {
                o.insert("stats".into(), st.summary(now));
            }
            if step.state == StepState::Running {
                let mean_ms = stats
                    .and_then(|s| s.steps.get(i))
                    .and_then(|st| st.duration_sum_ms.checked_div(st.completed));
                if let Some(c) = capacity(
                    step.total,
                    step.completed + step.failed,
                    step.started_at.unwrap_or(now),
                    now,
                    mean_ms,
                    job.deadline_at,
                ) {
                    o.insert(
                        "capacity".into(),
                        serde_json::to_value(c).unwrap_or(Value::Null),
                    );
                }
                let done = step.completed + step.failed;
                let elapsed = now.saturating_sub(step.started_at.unwrap_or(now)).max(1);
                if done > 0 {
                    let rate = done as f64 / (elapsed as f64 / 1000.0);
                    let eta_ms = ((step.total.saturating_sub(done)) as f64 / rate * 1000.0) as u64;
                    o.insert("throughput_per_s".into(), json!(rate));
                    o.insert("eta_ms".into(), json!(eta_ms));
                    o.insert("eta_at".into(), json!(now + eta_ms));
                }
            }
        }
    }
    v
}

/// What a running fanout step needs to finish on time.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Capacity {
    /// When the step will end at the throughput seen so far.
    pub predicted_finish_at: Option<u64>,
    /// The job's deadline, if it has one.
    pub deadline_at: Option<u64>,
    /// Worker slots busy all the time until the deadline that the rest of
    /// the step needs (from the mean subjob duration).
    pub slots_needed: Option<u64>,
    /// Mean duration of a successful subjob so far, in ms.
    pub mean_subjob_ms: Option<u64>,
}

/// Predicts a step's end from its progress, and the slots its deadline
/// needs from the mean subjob duration: the figure an autoscaler wants.
pub fn capacity(
    total: u64,
    done: u64,
    started_at: u64,
    now: u64,
    mean_ms: Option<u64>,
    deadline_at: Option<u64>,
) -> Option<Capacity> {
    let remaining = total.saturating_sub(done);
    let elapsed = now.saturating_sub(started_at);
    let predicted_finish_at = (done > 0 && elapsed > 0)
        .then(|| now + (remaining as f64 * elapsed as f64 / done as f64) as u64);
    let slots_needed = match (deadline_at, mean_ms) {
        (Some(deadline), Some(mean)) => {
            let left = deadline.saturating_sub(now).max(1);
            Some(
                (remaining * mean)
                    .div_ceil(left)
                    .max(u64::from(remaining > 0)),
            )
        }
        _ => None,
    };
    if predicted_finish_at.is_none() && slots_needed.is_none() {
        return None;
    }
    Some(Capacity {
        predicted_finish_at,
        deadline_at,
        slots_needed,
        mean_subjob_ms: mean_ms,
    })
}
