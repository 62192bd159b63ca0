//! Task tokens: who may report a subjob's outcome.
//!
//! Outcome events travel on subjects that name only the job, so no NATS
//! permission can tie a worker to the tasks it was given. Instead every
//! task a manager enqueues carries a token, a MAC of the subjob it stands
//! for (job, step, index) under a key that only managers read
//! ([`KEYS_BUCKET`]); a worker copies it into the outcome, and managers and
//! the statistics consumer count an outcome only if its token is the
//! subjob's. A worker therefore decides only subjobs whose task it holds,
//! and with permissions that let it pull only its steps' consumers, only
//! subjobs of its steps. Tokens are deterministic, so every attempt of a
//! subjob (and a re-dispatched task) carries the same one. A redriven run's
//! tasks carry tokens of their run, so an outcome of an earlier run (a late
//! one, or a replay) never counts in a later one.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::event::Event;

/// KV bucket of secrets only the manager role may read.
pub const KEYS_BUCKET: &str = "fanjet_keys";
/// Key (in [`KEYS_BUCKET`]) of the task token key.
pub const TASK_KEY: &str = "task-token";
/// Bytes of MAC a token carries (128 bits; 22 characters of base64url).
const TOKEN_BYTES: usize = 16;
/// Domain separation: a token of this scheme is never valid in another.
const CONTEXT: &[u8] = b"fanjet task token v1\0";

/// The secret tokens are made with. Its `Debug` does not show it.
#[derive(Clone)]
pub struct TaskKey {
    bytes: [u8; 32],
    /// The MAC keyed and fed the context once: each token starts from a
    /// copy of it (one is made per task dispatched and per outcome read).
    keyed: Hmac<Sha256>,
}

impl std::fmt::Debug for TaskKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TaskKey(..)")
    }
}

impl TaskKey {
    /// A fresh random key.
    pub fn generate() -> TaskKey {
        TaskKey::new(rand::random())
    }

    /// The key stored as `bytes`, if they are one.
    pub fn from_bytes(bytes: &[u8]) -> Option<TaskKey> {
        bytes.try_into().ok().map(TaskKey::new)
    }

    fn new(bytes: [u8; 32]) -> TaskKey {
        // A 32-byte key is always accepted.
        let mut keyed = <Hmac<Sha256> as Mac>::new_from_slice(&bytes)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        keyed.update(CONTEXT);
        TaskKey { bytes, keyed }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The MAC of a subjob, or with `batch` of the block of that many
    /// subjobs from `index` (a longer message, so never a subjob's).
    fn mac(
        &self,
        job_id: &str,
        step_index: usize,
        index: u64,
        run: u32,
        batch: Option<u64>,
    ) -> Hmac<Sha256> {
        let mut mac = self.keyed.clone();
        mac.update(&(job_id.len() as u64).to_be_bytes());
        mac.update(job_id.as_bytes());
        mac.update(&(step_index as u64).to_be_bytes());
        mac.update(&index.to_be_bytes());
        // The first run's tokens are those of jobs never redriven.
        if run > 0 {
            mac.update(&run.to_be_bytes());
        }
        if let Some(size) = batch {
            mac.update(b"batch");
            mac.update(&size.to_be_bytes());
        }
        mac
    }

    fn encode(mac: Hmac<Sha256>) -> String {
        URL_SAFE_NO_PAD.encode(&mac.finalize().into_bytes()[..TOKEN_BYTES])
    }

    fn check(mac: Hmac<Sha256>, token: &str) -> bool {
        let Ok(tag) = URL_SAFE_NO_PAD.decode(token) else {
            return false;
        };
        tag.len() == TOKEN_BYTES && mac.verify_truncated_left(&tag).is_ok()
    }

    /// The token of subjob `index` of step `step_index` of `job_id`, in
    /// run `run` of the job (0 until it is redriven).
    pub fn token(&self, job_id: &str, step_index: usize, index: u64, run: u32) -> String {
        Self::encode(self.mac(job_id, step_index, index, run, None))
    }

    /// The token of a batch: the block of `size` subjobs from `first`.
    pub fn batch_token(
        &self,
        job_id: &str,
        step_index: usize,
        first: u64,
        size: u64,
        run: u32,
    ) -> String {
        Self::encode(self.mac(job_id, step_index, first, run, Some(size)))
    }

    /// Whether `token` is that subjob's in that run (compared in constant
    /// time).
    pub fn verify(
        &self,
        job_id: &str,
        step_index: usize,
        index: u64,
        run: u32,
        token: &str,
    ) -> bool {
        Self::check(self.mac(job_id, step_index, index, run, None), token)
    }

    /// Whether `token` is that batch's (compared in constant time).
    pub fn verify_batch(
        &self,
        job_id: &str,
        step_index: usize,
        first: u64,
        size: u64,
        run: u32,
        token: &str,
    ) -> bool {
        Self::check(self.mac(job_id, step_index, first, run, Some(size)), token)
    }

    /// Whether `event` may count: any event but an outcome, and an outcome
    /// carrying its subjob's token for its run (a batch's: its block's,
    /// with every outcome inside the block; completions reported together:
    /// each its own).
    pub fn admits(&self, event: &Event) -> bool {
        if let Event::SubjobsCompleted(e) = event {
            return !e.outcomes.is_empty()
                && e.outcomes
                    .iter()
                    .all(|o| self.verify(&e.job_id, e.step_index, o.index, e.run, &o.token));
        }
        if let Event::SubjobsDone(e) = event {
            let block = e.index..e.index.saturating_add(e.batch_size);
            return e.batch_size > 1
                && e.outcomes.iter().all(|o| block.contains(&o.index))
                && self.verify_batch(
                    &e.job_id,
                    e.step_index,
                    e.index,
                    e.batch_size,
                    e.run,
                    &e.token,
                );
        }
        match event.outcome_token() {
            None => true,
            Some((job, step, index, run, token)) => self.verify(job, step, index, run, token),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_valid_for_its_subjob_only() {
        let key = TaskKey::generate();
        let t = key.token("job-1", 1, 7, 0);
        assert_eq!(t.len(), 22);
        assert_eq!(t, key.token("job-1", 1, 7, 0), "deterministic");
        assert!(key.verify("job-1", 1, 7, 0, &t));
        for (job, step, index) in [("job-2", 1, 7), ("job-1", 0, 7), ("job-1", 1, 8)] {
            assert!(!key.verify(job, step, index, 0, &t), "{job} {step} {index}");
        }
        // Lengths are framed: moving bytes between the id and the numbers fails.
        assert_ne!(key.token("a", 1, 0, 0), key.token("a\u{1}", 0, 0, 0));
        let other = TaskKey::generate();
        assert!(!other.verify("job-1", 1, 7, 0, &t), "another key");
        for bad in [
            "",
            "x",
            &t[..21],
            &format!("{t}A"),
            "!!!!!!!!!!!!!!!!!!!!!!",
        ] {
            assert!(!key.verify("job-1", 1, 7, 0, bad), "{bad:?}");
        }
        assert_eq!(format!("{key:?}"), "TaskKey(..)");
        let again = TaskKey::from_bytes(key.as_bytes()).unwrap();
        assert!(again.verify("job-1", 1, 7, 0, &t));
        assert!(TaskKey::from_bytes(b"short").is_none());
    }

    #[test]
    fn a_batch_token_admits_outcomes_of_its_block_only() {
        use crate::protocol::{ItemOutcome, SubjobsDone};
        let key = TaskKey::generate();
        let done = |first: u64, size: u64, indices: &[u64], token: &str| {
            Event::SubjobsDone(SubjobsDone {
                job_id: "job-1".into(),
                step_index: 1,
                index: first,
                batch_size: size,
                attempt: 1,
                duration_ms: 0,
                outcomes: indices
                    .iter()
                    .map(|&index| ItemOutcome {
                        index,
                        attempt: 1,
                        result: serde_json::Value::Null,
                        error: None,
                    })
                    .collect(),
                run: 0,
                token: token.into(),
            })
        };
        let t = key.batch_token("job-1", 1, 10, 10, 0);
        assert!(key.admits(&done(10, 10, &[10, 15, 19], &t)));
        assert!(key.verify_batch("job-1", 1, 10, 10, 0, &t));
        // Outside the block, another block or size, a subjob's token: refused.
        assert!(!key.admits(&done(10, 10, &[10, 20], &t)));
        assert!(!key.admits(&done(10, 20, &[10, 25], &t)));
        assert!(!key.admits(&done(0, 10, &[0], &t)));
        let single = key.token("job-1", 1, 10, 0);
        assert_ne!(single, t);
        assert!(!key.admits(&done(10, 10, &[10], &single)));
        assert!(!key.verify("job-1", 1, 10, 0, &t), "not a subjob's token");
        assert!(!key.admits(&done(10, 1, &[10], &key.batch_token("job-1", 1, 10, 1, 0))));
    }

    #[test]
    fn completions_reported_together_count_only_with_each_ones_token() {
        use crate::protocol::{Completion, SubjobsCompleted};
        let key = TaskKey::generate();
        let done = |outcomes: &[(u64, String)]| {
            Event::SubjobsCompleted(SubjobsCompleted {
                job_id: "job-1".into(),
                step_index: 1,
                run: 0,
                outcomes: outcomes
                    .iter()
                    .map(|(index, token)| Completion {
                        index: *index,
                        attempt: 1,
                        result: serde_json::Value::Null,
                        duration_ms: 0,
                        token: token.clone(),
                    })
                    .collect(),
            })
        };
        let t = |i| key.token("job-1", 1, i, 0);
        assert!(key.admits(&done(&[(3, t(3)), (9, t(9))])));
        // One forged among them, a token moved to another index, none at all.
        assert!(!key.admits(&done(&[(3, t(3)), (4, t(9))])));
        assert!(!key.admits(&done(&[(3, t(3)), (4, String::new())])));
        assert!(!key.admits(&done(&[])));
        // A batch token covers no single completion.
        assert!(!key.admits(&done(&[(10, key.batch_token("job-1", 1, 10, 10, 0))])));
    }

    #[test]
    fn a_redriven_run_has_tokens_of_its_own() {
        let key = TaskKey::generate();
        let first = key.token("job-1", 1, 7, 0);
        let second = key.token("job-1", 1, 7, 1);
        assert_ne!(first, second);
        assert!(key.verify("job-1", 1, 7, 1, &second));
        assert!(!key.verify("job-1", 1, 7, 1, &first), "a first-run outcome");
        assert!(!key.verify("job-1", 1, 7, 2, &second), "another run");
    }
}
