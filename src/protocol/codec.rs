//! Payload encodings. Everything fanjet writes is JSON; what clients send may
//! be JSON or CBOR, chosen by the `Content-Type` header.

use async_nats::HeaderMap;
use serde::de::DeserializeOwned;
use serde::Serialize;
use thiserror::Error;

use super::CONTENT_TYPE_HEADER;

pub const JSON_CONTENT_TYPE: &str = "application/json";
pub const CBOR_CONTENT_TYPE: &str = "application/cbor";

/// The encoding of one payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Json,
    Cbor,
}

impl Encoding {
    /// Reads the `Content-Type` header; JSON when absent or unknown.
    pub fn from_headers(headers: Option<&HeaderMap>) -> Self {
        let ct = headers
            .and_then(|h| h.get(CONTENT_TYPE_HEADER))
            .map(|v| v.as_str().to_ascii_lowercase());
        match ct {
            Some(ct) if ct.starts_with(CBOR_CONTENT_TYPE) => Encoding::Cbor,
            _ => Encoding::Json,
        }
    }
}

#[derive(Debug, Error)]
pub enum CodecError {
    #[error("malformed JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("malformed CBOR: {0}")]
    Cbor(String),
    #[error("could not encode: {0}")]
    Encode(String),
}

/// Decodes a payload in the given encoding.
pub fn decode<T: DeserializeOwned>(encoding: Encoding, payload: &[u8]) -> Result<T, CodecError> {
    match encoding {
        Encoding::Json => Ok(serde_json::from_slice(payload)?),
        Encoding::Cbor => {
            ciborium::de::from_reader(payload).map_err(|e| CodecError::Cbor(e.to_string()))
        }
    }
}

/// Encodes as JSON.
pub fn encode_json<T: Serialize>(value: &T) -> Result<bytes::Bytes, CodecError> {
    serde_json::to_vec(value)
        .map(bytes::Bytes::from)
        .map_err(|e| CodecError::Encode(e.to_string()))
}

/// Encodes as CBOR (used by clients and tests; fanjet itself writes JSON).
pub fn encode_cbor<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    let mut out = Vec::new();
    ciborium::ser::into_writer(value, &mut out).map_err(|e| CodecError::Encode(e.to_string()))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Submission;

    #[test]
    fn cbor_and_json_decode_the_same_submission() {
        let s = Submission {
            job_id: Some("j1".into()),
            customer: Some("acme".into()),
            input: serde_json::json!({"n": 3, "list": [1, "two", null]}),
            priority: None,
        };
        let cbor = encode_cbor(&s).unwrap();
        let json = encode_json(&s).unwrap();
        let a: Submission = decode(Encoding::Cbor, &cbor).unwrap();
        let b: Submission = decode(Encoding::Json, &json).unwrap();
        assert_eq!(a, s);
        assert_eq!(b, s);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for bytes in [&b"\xff\xfe"[..], b"{", b"", b"\x9f\x9f\x9f"] {
            assert!(decode::<Submission>(Encoding::Json, bytes).is_err());
            assert!(decode::<Submission>(Encoding::Cbor, bytes).is_err());
        }
    }

    #[test]
    fn content_type_selects_cbor() {
        let mut h = HeaderMap::new();
        h.insert(CONTENT_TYPE_HEADER, "application/cbor");
        assert_eq!(Encoding::from_headers(Some(&h)), Encoding::Cbor);
        assert_eq!(Encoding::from_headers(None), Encoding::Json);
    }
}
