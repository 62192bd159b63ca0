//! Every Prometheus metric fanjet exports: one registry, each name a
//! constant with its help text here, so the dashboard and this file can be
//! read side by side (`dashboards/README.md`).
//!
//! Labels are bounded: workflow, step, outcome, state. Never a job id.
//! The counters are fed from the event log by the statistics consumer, so
//! one `fanjet serve` exports the whole deployment whatever the number of
//! managers and workers; gauges come from consumer info and heartbeats.

use std::sync::OnceLock;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

pub const JOBS_SUBMITTED: &str = "fanjet_jobs_submitted_total";
pub const JOBS_FINISHED: &str = "fanjet_jobs_finished_total";
pub const JOBS_RUNNING: &str = "fanjet_jobs_running";
pub const SUBJOBS_COMPLETED: &str = "fanjet_subjobs_completed_total";
pub const SUBJOBS_FAILED: &str = "fanjet_subjobs_failed_total";
pub const SUBJOB_RETRIES: &str = "fanjet_subjob_retries_total";
pub const SUBJOB_DURATION: &str = "fanjet_subjob_duration_seconds";
pub const STEP_DURATION: &str = "fanjet_step_duration_seconds";
pub const JOB_DURATION: &str = "fanjet_job_duration_seconds";
pub const TASK_BACKLOG: &str = "fanjet_task_backlog";
pub const TASKS_IN_FLIGHT: &str = "fanjet_tasks_in_flight";
pub const TASKS_REDELIVERED: &str = "fanjet_tasks_redelivered";
pub const WORKER_SLOTS: &str = "fanjet_worker_slots";
pub const WORKERS: &str = "fanjet_workers";
pub const CUSTOMER_SUBJOBS: &str = "fanjet_customer_subjobs";
/// Customers with a series of their own in [`CUSTOMER_SUBJOBS`], the
/// busiest; the rest are summed under `customer="_other"`.
pub const CUSTOMER_SERIES: usize = 50;
pub const MANAGERS: &str = "fanjet_managers";
pub const MANAGER_PARTITIONS: &str = "fanjet_manager_partitions_owned";
pub const MANAGER_LAG: &str = "fanjet_manager_lag_events";
pub const EVENTS_OBSERVED: &str = "fanjet_events_observed_total";
pub const MANAGER_IGNORED: &str = "fanjet_manager_events_ignored_total";
pub const LOG_HOLES: &str = "fanjet_log_deliveries_missed_total";
pub const MANAGER_FENCED: &str = "fanjet_manager_partitions_paused_total";
pub const MANAGER_RECOVERED: &str = "fanjet_manager_outcomes_read_back_total";
pub const MANAGER_RESTARTS: &str = "fanjet_manager_sessions_restarted_total";
pub const SLOTS_NEEDED: &str = "fanjet_step_slots_needed";
pub const SECONDS_LEFT: &str = "fanjet_step_predicted_seconds_left";

/// Buckets for subjob durations: 1 ms to 10 min.
const SUBJOB_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
    600.0,
];
/// Buckets for step and job durations: 10 ms to 4 h.
const LONG_BUCKETS: &[f64] = &[
    0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0, 1800.0, 3600.0, 5400.0, 7200.0,
    14400.0,
];

/// The metrics, registered once per process.
pub struct Metrics {
    pub registry: Registry,
    pub jobs_submitted: IntCounterVec,
    pub jobs_finished: IntCounterVec,
    pub jobs_running: IntGaugeVec,
    pub subjobs_completed: IntCounterVec,
    pub subjobs_failed: IntCounterVec,
    pub subjob_retries: IntCounterVec,
    pub subjob_duration: HistogramVec,
    pub step_duration: HistogramVec,
    pub job_duration: HistogramVec,
    pub task_backlog: IntGaugeVec,
    pub tasks_in_flight: IntGaugeVec,
    pub tasks_redelivered: IntGaugeVec,
    pub worker_slots: IntGaugeVec,
    pub workers: IntGaugeVec,
    pub customer_subjobs: IntGaugeVec,
    pub managers: IntGaugeVec,
    pub manager_partitions: IntGaugeVec,
    pub manager_lag: IntGaugeVec,
    pub events_observed: IntCounterVec,
    pub manager_ignored: IntCounterVec,
    pub log_holes: IntCounterVec,
    pub manager_fenced: IntCounter,
    pub manager_recovered_outcomes: IntCounter,
    pub manager_restarts: IntCounter,
    pub slots_needed: IntGaugeVec,
    pub predicted_seconds_left: IntGaugeVec,
}

fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    r.register(Box::new(c.clone()))
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    c
}

fn plain_counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).unwrap_or_else(|e| panic!("metric {name}: {e}"));
    r.register(Box::new(c.clone()))
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    c
}

fn gauge(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    r.register(Box::new(g.clone()))
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    g
}

fn histogram(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: &[f64],
) -> HistogramVec {
    let h = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets.to_vec()),
        labels,
    )
    .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    r.register(Box::new(h.clone()))
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    h
}

impl Metrics {
    fn new() -> Self {
        let r = Registry::new();
        Metrics {
            jobs_submitted: counter(&r, JOBS_SUBMITTED, "Jobs requested (accepted by the intake), by workflow.", &["workflow"]),
            jobs_finished: counter(&r, JOBS_FINISHED, "Jobs that ended, by workflow and outcome (completed, failed, cancelled, rejected).", &["workflow", "outcome"]),
            jobs_running: gauge(&r, JOBS_RUNNING, "Jobs the managers hold as running (from manager heartbeats).", &["manager"]),
            subjobs_completed: counter(&r, SUBJOBS_COMPLETED, "Subjobs (and task-step runs) that succeeded, by workflow and step.", &["workflow", "step"]),
            subjobs_failed: counter(&r, SUBJOBS_FAILED, "Subjobs that failed for good, by workflow and step.", &["workflow", "step"]),
            subjob_retries: counter(&r, SUBJOB_RETRIES, "Attempts beyond the first, over subjobs that finished, by workflow and step.", &["workflow", "step"]),
            subjob_duration: histogram(&r, SUBJOB_DURATION, "Handler run time of successful subjob attempts, by workflow and step.", &["workflow", "step"], SUBJOB_BUCKETS),
            step_duration: histogram(&r, STEP_DURATION, "Time from step start to step end, by workflow, step and outcome (ok, failed).", &["workflow", "step", "outcome"], LONG_BUCKETS),
            job_duration: histogram(&r, JOB_DURATION, "Time from request to end, by workflow and outcome.", &["workflow", "outcome"], LONG_BUCKETS),
            task_backlog: gauge(&r, TASK_BACKLOG, "Tasks queued and not yet delivered to a worker, by workflow and step.", &["workflow", "step"]),
            tasks_in_flight: gauge(&r, TASKS_IN_FLIGHT, "Tasks delivered to workers and not yet acknowledged, by workflow and step.", &["workflow", "step"]),
            tasks_redelivered: gauge(&r, TASKS_REDELIVERED, "Tasks currently being delivered again (a worker timed out or asked for a retry), by workflow and step.", &["workflow", "step"]),
            worker_slots: gauge(&r, WORKER_SLOTS, "Worker slots by state (busy, free), over all live workers.", &["state"]),
            workers: gauge(&r, WORKERS, "Live worker processes (heartbeat within 15 s).", &[]),
            customer_subjobs: gauge(&r, CUSTOMER_SUBJOBS, "Subjobs of running fanouts by customer and state (running: dispatched and unfinished; queued: waiting for their share), for the 50 busiest customers; the rest under customer=\"_other\".", &["customer", "state"]),
            managers: gauge(&r, MANAGERS, "Live manager processes (heartbeat within 15 s).", &[]),
            manager_partitions: gauge(&r, MANAGER_PARTITIONS, "Event-log partitions each live manager owns.", &["manager"]),
            manager_lag: gauge(&r, MANAGER_LAG, "Events in the log not yet processed by the manager (delivered or not).", &[]),
            events_observed: counter(&r, EVENTS_OBSERVED, "Events read from the log by the statistics consumer, by kind.", &["kind"]),
            manager_ignored: counter(
                &r,
                MANAGER_IGNORED,
                "Events the manager read and ignored, by reason: duplicate, step_not_running (late), job_ended, unknown_job, not_dispatched, not_dispatched_yet (held until its subjob is dispatched, then counted), invalid_job_id, unreadable, subject_mismatch, bad_token (an outcome without its task's token). Exported by the process that runs the manager.",
                &["reason"],
            ),
            log_holes: counter(
                &r,
                LOG_HOLES,
                "Deliveries of the event log that never reached a reader (manager or statistics), each followed by that reader starting again from its last acknowledged event. Seen when a connection drops or a cluster changes leaders.",
                &["reader"],
            ),
            manager_fenced: plain_counter(
                &r,
                MANAGER_FENCED,
                "Partition loops of this manager that stopped writing because their lease was not certainly held (lease renewals failing, a frozen process, another manager taking over); each dropped its state unsaved and loaded it again once the lease was held. Exported by the process that runs the manager.",
            ),
            manager_restarts: plain_counter(
                &r,
                MANAGER_RESTARTS,
                "Partition sessions of this manager that failed (a NATS error: a leader election, a timeout) and started again from the last checkpoints. A few around a fault are expected; a steady rate means a partition is stuck. Exported by the process that runs the manager.",
            ),
            manager_recovered_outcomes: plain_counter(
                &r,
                MANAGER_RECOVERED,
                "Subjob outcomes the manager applied only when it read a stalled job's outcomes back from the log, before counting its subjobs as lost: its partition's reader had not applied them (behind, or gone past them). Should stay 0; each one is logged with its sequence. Exported by the process that runs the manager.",
            ),
            slots_needed: gauge(
                &r,
                SLOTS_NEEDED,
                "Worker slots the running fanout steps need, busy until their jobs' deadlines, to finish on time (sum over running jobs with a deadline). What an autoscaler should provide.",
                &["workflow", "step"],
            ),
            predicted_seconds_left: gauge(
                &r,
                SECONDS_LEFT,
                "Seconds until the running fanout steps end at the throughput seen so far (the longest over running jobs).",
                &["workflow", "step"],
            ),
            registry: r,
        }
    }

    /// The process-wide metrics.
    pub fn get() -> &'static Metrics {
        static M: OnceLock<Metrics> = OnceLock::new();
        M.get_or_init(Metrics::new)
    }

    /// Creates the counters of a step at zero once it is known, so a
    /// healthy system shows "0 failed" rather than no data. Job outcomes of
    /// its workflow too.
    pub fn known_step(&self, workflow: &str, step: &str) {
        let labels = [workflow, step];
        self.subjobs_completed.with_label_values(&labels);
        self.subjobs_failed.with_label_values(&labels);
        self.subjob_retries.with_label_values(&labels);
        self.jobs_submitted.with_label_values(&[workflow]);
        for outcome in ["completed", "failed", "cancelled", "rejected"] {
            self.jobs_finished.with_label_values(&[workflow, outcome]);
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::warn!(error = %e, "encoding metrics");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_known_step_has_its_counters_at_zero() {
        let m = Metrics::new();
        m.known_step("wf", "send");
        let text = m.render();
        for series in [
            "fanjet_subjobs_failed_total{step=\"send\",workflow=\"wf\"} 0",
            "fanjet_subjobs_completed_total{step=\"send\",workflow=\"wf\"} 0",
            "fanjet_subjob_retries_total{step=\"send\",workflow=\"wf\"} 0",
            "fanjet_jobs_submitted_total{workflow=\"wf\"} 0",
            "fanjet_jobs_finished_total{outcome=\"failed\",workflow=\"wf\"} 0",
        ] {
            assert!(text.contains(series), "{series} in:\n{text}");
        }
    }

    #[test]
    fn every_metric_is_registered_with_help() {
        let m = Metrics::get();
        m.subjobs_completed.with_label_values(&["w", "s"]).inc();
        m.workers.with_label_values::<&str>(&[]).set(1);
        let text = m.render();
        for name in [SUBJOBS_COMPLETED, WORKERS] {
            assert!(text.contains(&format!("# HELP {name} ")), "{name} missing");
        }
    }
}
