//! Large results. A result whose JSON is larger than [`INLINE_RESULT_MAX`]
//! is stored in the JetStream object store bucket [`RESULTS_BUCKET`] and
//! the event carries a reference instead:
//! `{"$fanjet_result": {"bucket": …, "name": …, "size": …, "digest": …, "array_len": …}}`.
//! Readers of a result (the manager, for a step's input) follow it.
//!
//! Names are random, so a worker cannot aim at another's object, and the
//! reference carries the object's digest, so a replaced object is noticed
//! when read: the value that counts is the one the token-holding worker
//! reported.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Object store bucket of large results.
pub const RESULTS_BUCKET: &str = "fanjet_results";
/// Largest result sent inline in its event, in bytes of JSON.
pub const INLINE_RESULT_MAX: usize = 256 * 1024;
/// Largest result accepted at all, in bytes of JSON.
pub const MAX_RESULT_BYTES: usize = 64 * 1024 * 1024;
/// The key that marks a reference.
pub const RESULT_REF_KEY: &str = "$fanjet_result";

/// Where a large result is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ResultRef {
    pub bucket: String,
    /// Object name: `r/<ULID>`, new for every result stored.
    pub name: String,
    /// Bytes of JSON.
    pub size: u64,
    /// The object's digest as the object store reports it
    /// (`SHA-256=<base64url>`); a reader refuses an object that differs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// When the result is an array: its length (a fanout step's subjob count).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub array_len: Option<u64>,
    /// How the object is written: one JSON value (`json`, the default), or,
    /// for items, JSON lines (`lines`: one item per line).
    #[serde(default, skip_serializing_if = "super::is_json_format")]
    pub format: super::ItemsFormat,
}

impl ResultRef {
    /// A fresh object name: random, so it says nothing of the job and no
    /// one can guess it, and never written twice (nothing to purge).
    pub fn new_name() -> String {
        format!("r/{}", ulid::Ulid::new())
    }

    /// The value an event carries in place of the result.
    pub fn to_value(&self) -> Value {
        serde_json::json!({ RESULT_REF_KEY: self })
    }

    /// The reference in `value`, if it is one.
    pub fn from_value(value: &Value) -> Option<ResultRef> {
        let obj = value.as_object()?;
        if obj.len() != 1 {
            return None;
        }
        serde_json::from_value(obj.get(RESULT_REF_KEY)?.clone()).ok()
    }
}

/// The number of elements of a result that is (or refers to) an array.
pub fn array_len(value: &Value) -> Option<u64> {
    match value.as_array() {
        Some(a) => Some(a.len() as u64),
        None => ResultRef::from_value(value).and_then(|r| r.array_len),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_round_trip_and_carry_the_length() {
        let r = ResultRef {
            bucket: RESULTS_BUCKET.into(),
            name: ResultRef::new_name(),
            size: 10,
            digest: Some("SHA-256=abc".into()),
            array_len: Some(3),
            format: Default::default(),
        };
        let v = r.to_value();
        assert_eq!(ResultRef::from_value(&v), Some(r));
        assert_eq!(array_len(&v), Some(3));
        assert_eq!(array_len(&serde_json::json!([1, 2])), Some(2));
        assert_eq!(
            ResultRef::from_value(&serde_json::json!({"$fanjet_result": 1})),
            None
        );
        assert_eq!(
            ResultRef::from_value(&serde_json::json!({"a": 1, "$fanjet_result": {}})),
            None
        );
    }
}
