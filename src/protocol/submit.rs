//! Submission: what a client sends to `fanjet.submit.<workflow>` and what
//! the intake answers.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::RejectCode;

/// The body of a submission. Every field is optional; `{}` is a valid job
/// with a null input and a generated id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Submission {
    /// Client-chosen id for idempotent submission; a ULID is generated when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    /// Tenant key, for filtering and isolation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub customer: Option<String>,
    /// Input of the first step (for a first fanout step: a JSON array of items).
    #[serde(default)]
    pub input: Value,
    /// Among jobs competing for a step's workers, a higher priority starts
    /// first: 1 (lowest) to 9 (highest), default 5.
    #[schemars(range(min = 1, max = 9))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u8>,
}

/// The reply to a submission request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct SubmitReply {
    /// True when the job was accepted (or already existed).
    pub ok: bool,
    /// The job id: present when accepted, and on rejections whose id is known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    /// True when a job with this id existed already; nothing new was started.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub duplicate: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<SubmitError>,
}

/// Why a submission was refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct SubmitError {
    pub code: RejectCode,
    pub message: String,
}
