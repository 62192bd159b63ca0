//! Writing large results to the object store without reading it, and
//! reading a fanout's items from an object a buffer at a time.
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
    let (digest, _) = put_reader(js, bucket, name, data, |_| Ok(())).await?;
    Ok(digest)
}

/// Stores what `reader` gives as object `name` of `bucket` (a name not
/// used before), a chunk at a time, showing each chunk to `inspect` first
/// (an error there stops before the metadata: no object is made); returns
/// its digest and size.
pub async fn put_reader<R: tokio::io::AsyncRead + Unpin>(
    js: &Context,
    bucket: &str,
    name: &str,
    mut reader: R,
    mut inspect: impl FnMut(&[u8]) -> Result<(), String>,
) -> Result<(String, u64), PutError> {
    use tokio::io::AsyncReadExt;
    let fail = |message: String| PutError {
        bucket: bucket.to_string(),
        name: name.to_string(),
        message,
    };
    let nuid = ulid::Ulid::new().to_string();
    let chunks_subject = format!("$O.{bucket}.C.{nuid}");
    let mut sha = Sha256::new();
    let (mut chunks, mut size) = (0, 0u64);
    let mut chunk = vec![0u8; CHUNK];
    loop {
        // A whole chunk unless the data ends.
        let mut filled = 0;
        while filled < CHUNK {
            let n = reader
                .read(&mut chunk[filled..])
                .await
                .map_err(|e| fail(format!("reading the data: {e}")))?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            break;
        }
        let data = &chunk[..filled];
        inspect(data).map_err(fail)?;
        sha.update(data);
        chunks += 1;
        size += filled as u64;
        js.publish(chunks_subject.clone(), Bytes::copy_from_slice(data))
            .await
            .map_err(|e| fail(format!("chunk {chunks}: {e}")))?
            .await
            .map_err(|e| fail(format!("chunk {chunks}: {e}")))?;
        if filled < CHUNK {
            break;
        }
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
        size: size as usize,
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
    Ok((digest, size))
}

/// Stores items (a JSON array, or JSON lines) from `reader` as a new
/// object of `bucket`, checking their shape and counting them on the way;
/// returns the reference a job's input (or a step's result) gives to a
/// fanout over them.
pub async fn put_items<R: tokio::io::AsyncRead + Unpin>(
    js: &Context,
    bucket: &str,
    reader: R,
    format: crate::protocol::ItemsFormat,
) -> Result<crate::protocol::ResultRef, PutError> {
    let name = format!("i/{}", ulid::Ulid::new());
    let mut scanner = crate::protocol::ItemScanner::new(format);
    let mut count = 0u64;
    let (digest, size) = put_reader(js, bucket, &name, reader, |data| {
        scanner
            .feed(data, |_| count += 1)
            .map_err(|e| e.to_string())
    })
    .await?;
    // The end of the items: the last line, or a cut-short array.
    scanner.finish(|_| count += 1).map_err(|e| PutError {
        bucket: bucket.to_string(),
        name: name.clone(),
        message: format!("{e} (the object was stored; it is not referred to)"),
    })?;
    Ok(crate::protocol::ResultRef {
        bucket: bucket.to_string(),
        name,
        size,
        digest: Some(digest),
        array_len: Some(count),
        format,
    })
}

/// Why items could not be read: `permanent` when reading again cannot help
/// (the object is gone, replaced, or not items).
#[derive(Debug, Error)]
#[error("{message}")]
pub struct ItemsReadError {
    pub message: String,
    pub permanent: bool,
}

impl ItemsReadError {
    fn permanent(message: String) -> Self {
        ItemsReadError {
            message,
            permanent: true,
        }
    }
    fn transient(message: String) -> Self {
        ItemsReadError {
            message,
            permanent: false,
        }
    }
}

/// Bytes read from an object at a time.
const READ_BUFFER: usize = 64 * 1024;

/// A fanout's items in an object (a large step result, or items put with
/// `fanjet items put`), read in order, a buffer at a time: the object is
/// never held whole, and only the items asked for are handed out.
pub struct ItemReader {
    object: async_nats::jetstream::object_store::Object,
    name: String,
    scanner: crate::protocol::ItemScanner,
    ready: std::collections::VecDeque<Vec<u8>>,
    /// The index of `ready`'s first item.
    next: u64,
    eof: bool,
    buf: Vec<u8>,
}

impl ItemReader {
    /// Opens the object `r` names, refusing one whose digest is not the
    /// reference's (replaced after it was reported).
    pub async fn open(
        store: &async_nats::jetstream::object_store::ObjectStore,
        r: &crate::protocol::ResultRef,
    ) -> Result<Self, ItemsReadError> {
        use async_nats::jetstream::object_store::GetErrorKind;
        let object = match store.get(&r.name).await {
            Ok(o) => o,
            Err(e) if e.kind() == GetErrorKind::NotFound => {
                return Err(ItemsReadError::permanent(format!(
                    "object {} is no longer in the object store",
                    r.name
                )))
            }
            Err(e) => {
                return Err(ItemsReadError::transient(format!(
                    "reading object {}: {e}",
                    r.name
                )))
            }
        };
        if r.digest.is_some() && object.info.digest != r.digest {
            return Err(ItemsReadError::permanent(format!(
                "object {} was replaced after it was referred to (digest {:?}, expected {:?})",
                r.name, object.info.digest, r.digest
            )));
        }
        Ok(ItemReader {
            object,
            name: r.name.clone(),
            scanner: crate::protocol::ItemScanner::new(r.format),
            ready: Default::default(),
            next: 0,
            eof: false,
            buf: vec![0; READ_BUFFER],
        })
    }

    /// The index of the next item it can hand out; earlier ones need a
    /// reader opened again.
    pub fn position(&self) -> u64 {
        self.next
    }

    /// Item `index` (at or past [`position`](Self::position)) as JSON
    /// text, skipping those before it; `None` past the last item.
    pub async fn item(&mut self, index: u64) -> Result<Option<Vec<u8>>, ItemsReadError> {
        if index < self.next {
            return Err(ItemsReadError::transient(format!(
                "item {index} of object {} was read already (the reader is at {})",
                self.name, self.next
            )));
        }
        loop {
            let buffered = self.ready.len() as u64;
            if index < self.next + buffered {
                let skip = index.saturating_sub(self.next);
                self.ready.drain(..skip as usize);
                self.next += skip + 1;
                return Ok(self.ready.pop_front());
            }
            self.next += buffered;
            self.ready.clear();
            if self.eof {
                return Ok(None);
            }
            self.fill().await?;
        }
    }

    /// Counts the items from here to the end; the store checks the
    /// object's digest once the last byte is read.
    pub async fn count_rest(mut self) -> Result<u64, ItemsReadError> {
        let mut n = self.ready.len() as u64;
        self.ready.clear();
        while !self.eof {
            n += self.fill_counting().await?;
        }
        Ok(n)
    }

    async fn read_some(&mut self) -> Result<usize, ItemsReadError> {
        use tokio::io::AsyncReadExt;
        self.object
            .read(&mut self.buf)
            .await
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::InvalidData => ItemsReadError::permanent(format!(
                    "object {} does not match its digest: {e}",
                    self.name
                )),
                _ => ItemsReadError::transient(format!("reading object {}: {e}", self.name)),
            })
    }

    async fn fill(&mut self) -> Result<(), ItemsReadError> {
        let n = self.read_some().await?;
        let ready = &mut self.ready;
        let scanned = match n {
            0 => {
                self.eof = true;
                self.scanner.finish(|b| ready.push_back(b.to_vec()))
            }
            n => self
                .scanner
                .feed(&self.buf[..n], |b| ready.push_back(b.to_vec())),
        };
        scanned.map_err(|e| ItemsReadError::permanent(format!("object {}: {e}", self.name)))
    }

    async fn fill_counting(&mut self) -> Result<u64, ItemsReadError> {
        let n = self.read_some().await?;
        let mut count = 0;
        let scanned = match n {
            0 => {
                self.eof = true;
                self.scanner.finish(|_| count += 1)
            }
            n => self.scanner.feed(&self.buf[..n], |_| count += 1),
        };
        scanned.map_err(|e| ItemsReadError::permanent(format!("object {}: {e}", self.name)))?;
        Ok(count)
    }
}
