//! Writing large results to the object store without reading it.
//!
//! async-nats's `put` looks up the name first and purges the chunks of the
//! object it replaces, which needs rights on the store's stream (stream
//! info to bind it, reads, a purge) that would let a worker list, read or
//! wipe other customers' results. A result is never written twice (its
//! name is new each time), so none of that is needed: [`put`] publishes
//! the chunks and then the object's metadata in the object store's own
//! format (NATS ADR-20), which any reader, async-nats's `get` included,
//! reads as usual. A worker needs only to publish to `$O.<bucket>.C.>` and
//! `$O.<bucket>.M.>`.

use async_nats::jetstream::object_store::{ObjectInfo, ObjectOptions};
use async_nats::jetstream::Context;
use async_nats::HeaderMap;
use base64::engine::general_purpose::URL_SAFE;
use base64::Engine;
use bytes::Bytes;
use sha2::{Digest, Sha256};
use thiserror::Error;

/// Bytes per chunk message.
const CHUNK: usize = 128 * 1024;

#[derive(Debug, Error)]
#[error("storing object {name} in {bucket}: {message}")]
pub struct PutError {
    pub bucket: String,
    pub name: String,
    pub message: String,
}

/// Stores `data` as object `name` of `bucket` (a name not used before)
/// and returns its digest as the store records it (`SHA-256=<base64url>`).
/// Every message is acknowledged by the stream before the next goes; the
/// metadata goes last, so a reader never sees an object whose chunks are
/// not all there.
pub async fn put(js: &Context, bucket: &str, name: &str, data: &[u8]) -> Result<String, PutError> {
    let fail = |message: String| PutError {
        bucket: bucket.to_string(),
        name: name.to_string(),
        message,
    };
    let nuid = ulid::Ulid::new().to_string();
    let chunks_subject = format!("$O.{bucket}.C.{nuid}");
    let mut sha = Sha256::new();
    let mut chunks = 0;
    for chunk in data.chunks(CHUNK) {
        sha.update(chunk);
        chunks += 1;
        js.publish(chunks_subject.clone(), Bytes::copy_from_slice(chunk))
            .await
            .map_err(|e| fail(format!("chunk {chunks}: {e}")))?
            .await
            .map_err(|e| fail(format!("chunk {chunks}: {e}")))?;
    }
    let digest = format!("SHA-256={}", URL_SAFE.encode(sha.finalize()));
    let info = ObjectInfo {
        name: name.to_string(),
        description: None,
        metadata: Default::default(),
        headers: None,
        options: Some(ObjectOptions {
            link: None,
            max_chunk_size: Some(CHUNK),
        }),
        bucket: bucket.to_string(),
        nuid,
        size: data.len(),
        chunks,
        modified: None,
        digest: Some(digest.clone()),
        deleted: false,
    };
    let body = serde_json::to_vec(&info).map_err(|e| fail(e.to_string()))?;
    let mut headers = HeaderMap::new();
    // The latest metadata of a name replaces the earlier ones.
    headers.insert("Nats-Rollup", "sub");
    let meta_subject = format!("$O.{bucket}.M.{}", URL_SAFE.encode(name));
    js.publish_with_headers(meta_subject, headers, body.into())
        .await
        .map_err(|e| fail(format!("metadata: {e}")))?
        .await
        .map_err(|e| fail(format!("metadata: {e}")))?;
    Ok(digest)
}
