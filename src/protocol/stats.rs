//! The statistics record of one job, kept in the `fanjet_stats` bucket by
//! the statistics consumer ([`crate::observe::stats`], which fills it from
//! the log): attempt histograms, subjob duration percentiles, throughput.

use serde::{Deserialize, Serialize};

use super::{Millis, Pending};

/// Upper bounds (ms) of the duration buckets; the last bucket is open.
pub const DURATION_BOUNDS_MS: [u64; 16] = [
    1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10_000, 30_000, 60_000, 300_000,
];
/// Attempts counted one by one up to this; more fall in the last bucket.
pub const MAX_ATTEMPT_BUCKET: usize = 10;

/// Statistics of one step.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct StepStats {
    pub name: String,
    pub started_at: Option<Millis>,
    pub finished_at: Option<Millis>,
    pub total: u64,
    pub completed: u64,
    pub failed: u64,
    pub retries: u64,
    /// `attempts[i]`: subjobs that finished on attempt i+1 (the last entry: 10 or more).
    pub attempts: Vec<u64>,
    /// Counts per duration bucket (see [`DURATION_BOUNDS_MS`]), successful attempts only.
    pub duration_buckets: Vec<u64>,
    pub duration_max_ms: u64,
    /// The shortest successful attempt (absent in records written before
    /// it was kept): no quantile is reported below it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_min_ms: Option<u64>,
    pub duration_sum_ms: u64,
    /// Subjobs with an outcome counted, while the step runs: each subjob is
    /// counted once, as the manager counts it. Kept in memory only (one
    /// bit per subjob); the step's end sets the figures from the manager's.
    #[serde(skip)]
    #[schemars(skip)]
    pub seen: Option<Pending>,
}

impl StepStats {
    pub(crate) fn record_attempt(&mut self, attempt: u32) {
        let i = (attempt.max(1) as usize - 1).min(MAX_ATTEMPT_BUCKET - 1);
        if self.attempts.len() < MAX_ATTEMPT_BUCKET {
            self.attempts.resize(MAX_ATTEMPT_BUCKET, 0);
        }
        self.attempts[i] += 1;
        self.retries += u64::from(attempt.saturating_sub(1));
    }

    pub(crate) fn record_duration(&mut self, ms: u64) {
        if self.duration_buckets.len() < DURATION_BOUNDS_MS.len() + 1 {
            self.duration_buckets
                .resize(DURATION_BOUNDS_MS.len() + 1, 0);
        }
        let i = DURATION_BOUNDS_MS
            .iter()
            .position(|b| ms <= *b)
            .unwrap_or(DURATION_BOUNDS_MS.len());
        self.duration_buckets[i] += 1;
        self.duration_max_ms = self.duration_max_ms.max(ms);
        self.duration_min_ms = Some(self.duration_min_ms.map_or(ms, |m| m.min(ms)));
        self.duration_sum_ms += ms;
    }

    /// The duration (ms) under which a share `q` of successful attempts
    /// fall, interpolated within its bucket and kept between the shortest
    /// and the longest seen.
    pub fn duration_quantile_ms(&self, q: f64) -> Option<u64> {
        let n: u64 = self.duration_buckets.iter().sum();
        if n == 0 {
            return None;
        }
        let rank = ((n as f64) * q).ceil().max(1.0);
        let mut below = 0u64;
        for (i, c) in self.duration_buckets.iter().enumerate() {
            if *c > 0 && (below + c) as f64 >= rank {
                let lo = if i == 0 { 0 } else { DURATION_BOUNDS_MS[i - 1] };
                let lo = lo
                    .max(self.duration_min_ms.unwrap_or(0))
                    .min(self.duration_max_ms);
                let hi = DURATION_BOUNDS_MS
                    .get(i)
                    .copied()
                    .unwrap_or(self.duration_max_ms)
                    .min(self.duration_max_ms)
                    .max(lo);
                let share = (rank - below as f64) / *c as f64;
                return Some(lo + ((hi - lo) as f64 * share).round() as u64);
            }
            below += c;
        }
        Some(self.duration_max_ms)
    }

    /// Subjobs finished per second, over the step's run so far.
    pub fn throughput(&self, now: Millis) -> Option<f64> {
        let start = self.started_at?;
        let end = self.finished_at.unwrap_or(now);
        let secs = (end.saturating_sub(start) as f64 / 1000.0).max(0.001);
        Some((self.completed + self.failed) as f64 / secs)
    }

    /// A summary for people and the API.
    pub fn summary(&self, now: Millis) -> serde_json::Value {
        serde_json::json!({
            "name": self.name,
            "duration_ms": self.started_at.map(|s| self.finished_at.unwrap_or(now).saturating_sub(s)),
            "attempts_histogram": self.attempts,
            "subjob_duration_ms": {
                "p50": self.duration_quantile_ms(0.5),
                "p95": self.duration_quantile_ms(0.95),
                "max": (self.duration_buckets.iter().sum::<u64>() > 0).then_some(self.duration_max_ms),
                "mean": (self.completed > 0).then(|| self.duration_sum_ms / self.completed.max(1)),
            },
            "throughput_per_s": self.throughput(now),
        })
    }
}

/// Statistics of one job.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct JobStats {
    pub job_id: String,
    pub workflow: String,
    pub requested_at: Option<Millis>,
    pub finished_at: Option<Millis>,
    pub outcome: Option<String>,
    /// When the job should have ended, if its workflow has a deadline.
    #[serde(default)]
    pub deadline_at: Option<Millis>,
    /// When a cancellation was asked for: from then on the manager counts
    /// no subjob outcome (the job is cancelled, or had ended already).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancel_requested_at: Option<Millis>,
    pub steps: Vec<StepStats>,
    /// The job's run (0 until it is redriven; then how many redrives): only
    /// outcomes of this run count. Attempt and duration figures add up
    /// over the runs; a redriven step's failures are those of its last run.
    #[serde(default, skip_serializing_if = "super::is_first_run")]
    pub run: u32,
    /// Last event-log sequence applied to this record.
    pub applied_seq: u64,
}

impl JobStats {
    pub(crate) fn step(&mut self, i: usize) -> &mut StepStats {
        if self.steps.len() <= i {
            self.steps.resize_with(i + 1, StepStats::default);
        }
        &mut self.steps[i]
    }

    pub(crate) fn step_name(&self, i: usize) -> String {
        self.steps
            .get(i)
            .map(|s| s.name.clone())
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| format!("step{i}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_stay_between_the_shortest_and_longest_seen() {
        // Every attempt took 5 ms, at the top of the (2, 5] bucket: no
        // quantile of them is below 5.
        let mut s = StepStats::default();
        for _ in 0..100 {
            s.record_duration(5);
        }
        s.record_duration(7);
        assert_eq!(s.duration_quantile_ms(0.5), Some(5));
        assert_eq!(s.duration_quantile_ms(0.99), Some(5));
        assert_eq!(s.duration_quantile_ms(1.0), Some(7));
        // A record from before the minimum was kept: as it was.
        let mut old = s.clone();
        old.duration_min_ms = None;
        assert_eq!(old.duration_quantile_ms(0.5), Some(4));
    }
}
