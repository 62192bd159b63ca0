//! The pending set of one fanout step, as two bitmaps: `done` (completed or
//! failed) and `failed`. One bit per subjob keeps 10,000 subjobs in 2.5 KB
//! and 1,000,000 in 250 KB; it is stored in fixed-size chunks so that a
//! checkpoint rewrites only the chunks that changed.

use std::collections::BTreeSet;

/// Subjobs per stored chunk.
pub const CHUNK_BITS: u64 = 65_536;
const WORDS_PER_CHUNK: usize = (CHUNK_BITS / 64) as usize;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Pending {
    len: u64,
    done: Vec<u64>,
    failed: Vec<u64>,
    dirty: BTreeSet<u64>,
}

/// What marking a subjob changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    /// First outcome recorded for this subjob.
    New,
    /// It had an outcome already: a duplicate.
    Seen,
    /// The index is beyond the step's subjobs.
    OutOfRange,
}

impl Pending {
    pub fn new(len: u64) -> Self {
        let words = len.div_ceil(64) as usize;
        Pending {
            len,
            done: vec![0; words],
            failed: vec![0; words],
            dirty: BTreeSet::new(),
        }
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn is_done(&self, index: u64) -> bool {
        index < self.len && self.done[(index / 64) as usize] & (1 << (index % 64)) != 0
    }

    /// Records the outcome of subjob `index`, once.
    pub fn mark(&mut self, index: u64, failed: bool) -> Mark {
        if index >= self.len {
            return Mark::OutOfRange;
        }
        let (w, b) = ((index / 64) as usize, 1u64 << (index % 64));
        if self.done[w] & b != 0 {
            return Mark::Seen;
        }
        self.done[w] |= b;
        if failed {
            self.failed[w] |= b;
        }
        self.dirty.insert(index / CHUNK_BITS);
        Mark::New
    }

    /// Marks every subjob without an outcome as failed; returns how many.
    pub fn fail_rest(&mut self) -> u64 {
        let mut n = 0;
        for w in 0..self.done.len() {
            let valid = if (w as u64 + 1) * 64 <= self.len {
                u64::MAX
            } else {
                (1u64 << (self.len % 64)) - 1
            };
            let open = !self.done[w] & valid;
            if open != 0 {
                n += u64::from(open.count_ones());
                self.done[w] |= open;
                self.failed[w] |= open;
                self.dirty.insert(w as u64 / WORDS_PER_CHUNK as u64);
            }
        }
        n
    }

    /// Forgets every failure (those subjobs have no outcome again, for a
    /// redrive); returns how many. Idempotent.
    pub fn forget_failed(&mut self) -> u64 {
        let mut n = 0;
        for w in 0..self.failed.len() {
            let failed = self.failed[w];
            if failed != 0 {
                n += u64::from(failed.count_ones());
                self.done[w] &= !failed;
                self.failed[w] = 0;
                self.dirty.insert(w as u64 / WORDS_PER_CHUNK as u64);
            }
        }
        n
    }

    /// (completed, failed) counted from the bits.
    pub fn counts(&self) -> (u64, u64) {
        let done: u64 = self.done.iter().map(|w| u64::from(w.count_ones())).sum();
        let failed: u64 = self.failed.iter().map(|w| u64::from(w.count_ones())).sum();
        (done - failed, failed)
    }

    /// The first subjob without an outcome below `limit`, from `from`.
    pub fn next_open(&self, from: u64, limit: u64) -> Option<u64> {
        (from..limit.min(self.len)).find(|i| !self.is_done(*i))
    }

    pub fn chunk_count(&self) -> u64 {
        self.len.div_ceil(CHUNK_BITS)
    }

    /// Chunks changed since the last call, with their bytes.
    pub fn take_dirty(&mut self) -> Vec<(u64, Vec<u8>)> {
        let dirty = std::mem::take(&mut self.dirty);
        dirty
            .into_iter()
            .map(|c| (c, self.chunk_bytes(c)))
            .collect()
    }

    /// Every chunk's bytes (for a first write).
    pub fn all_chunks(&self) -> Vec<(u64, Vec<u8>)> {
        (0..self.chunk_count())
            .map(|c| (c, self.chunk_bytes(c)))
            .collect()
    }

    /// Stored form of a chunk: its `done` words then its `failed` words, little-endian.
    fn chunk_bytes(&self, chunk: u64) -> Vec<u8> {
        let (a, b) = self.word_range(chunk);
        let mut out = Vec::with_capacity((b - a) * 16);
        for w in &self.done[a..b] {
            out.extend_from_slice(&w.to_le_bytes());
        }
        for w in &self.failed[a..b] {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out
    }

    fn word_range(&self, chunk: u64) -> (usize, usize) {
        let a = (chunk as usize) * WORDS_PER_CHUNK;
        let b = (a + WORDS_PER_CHUNK).min(self.done.len());
        (a.min(b), b)
    }

    /// Loads a stored chunk; a chunk of the wrong size is refused.
    pub fn load_chunk(&mut self, chunk: u64, bytes: &[u8]) -> bool {
        let (a, b) = self.word_range(chunk);
        let n = b - a;
        if n == 0 || bytes.len() != n * 16 {
            return false;
        }
        for i in 0..n {
            let mut d = [0u8; 8];
            d.copy_from_slice(&bytes[i * 8..i * 8 + 8]);
            self.done[a + i] = u64::from_le_bytes(d);
            d.copy_from_slice(&bytes[(n + i) * 8..(n + i) * 8 + 8]);
            self.failed[a + i] = u64::from_le_bytes(d) & self.done[a + i];
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_once_and_counts() {
        let mut p = Pending::new(130);
        assert_eq!(p.mark(0, false), Mark::New);
        assert_eq!(p.mark(0, true), Mark::Seen);
        assert_eq!(p.mark(129, true), Mark::New);
        assert_eq!(p.mark(130, false), Mark::OutOfRange);
        assert_eq!(p.counts(), (1, 1));
        assert_eq!(p.next_open(0, 130), Some(1));
        assert_eq!(p.fail_rest(), 128);
        assert_eq!(p.counts(), (1, 129));
        assert_eq!(p.fail_rest(), 0);
        p.take_dirty();
        assert_eq!(p.forget_failed(), 129);
        assert_eq!(p.counts(), (1, 0));
        assert!(p.is_done(0) && !p.is_done(129));
        assert_eq!(p.take_dirty().len(), 1, "the chunk is written again");
        assert_eq!(p.forget_failed(), 0);
        assert_eq!(p.mark(129, false), Mark::New);
    }

    #[test]
    fn chunks_round_trip_and_only_dirty_ones_are_written() {
        let mut p = Pending::new(3 * CHUNK_BITS + 5);
        p.mark(1, false);
        p.mark(CHUNK_BITS * 3 + 4, true);
        let dirty = p.take_dirty();
        assert_eq!(dirty.iter().map(|d| d.0).collect::<Vec<_>>(), vec![0, 3]);
        assert!(p.take_dirty().is_empty());
        let mut q = Pending::new(p.len());
        for (c, bytes) in p.all_chunks() {
            assert!(q.load_chunk(c, &bytes));
        }
        assert_eq!(q.counts(), (1, 1));
        assert!(q.is_done(CHUNK_BITS * 3 + 4));
        assert!(!q.load_chunk(0, b"short"));
    }
}
