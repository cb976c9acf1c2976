//! The trace of a run: a rolling hash over everything that happened, so two runs can be compared
//! by one number, and optionally the last records in words to find where they part.

use std::collections::VecDeque;

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0100_0000_01b3;

/// A rolling FNV-1a hash of trace records, plus a bounded tail of them in words.
#[derive(Debug, Clone)]
pub struct Trace {
    hash: u64,
    records: u64,
    keep: usize,
    tail: VecDeque<String>,
}

impl Trace {
    /// An empty trace keeping the last `keep` records in words (0: hash only).
    #[must_use]
    pub fn new(keep: usize) -> Self {
        Self {
            hash: FNV_OFFSET,
            records: 0,
            keep,
            tail: VecDeque::new(),
        }
    }

    /// The hash of every record so far.
    #[must_use]
    pub fn hash(&self) -> u64 {
        self.hash
    }

    /// Records so far.
    #[must_use]
    pub fn records(&self) -> u64 {
        self.records
    }

    /// The last records in words (empty unless asked for).
    pub fn tail(&self) -> impl Iterator<Item = &str> {
        self.tail.iter().map(String::as_str)
    }

    /// True when the tail is kept (callers skip formatting otherwise).
    #[must_use]
    pub fn keeps_words(&self) -> bool {
        self.keep > 0
    }

    /// Adds one record: its words (hashed) and, when kept, its text.
    pub fn record(&mut self, words: &[u64], text: impl FnOnce() -> String) {
        for w in words {
            self.mix(*w);
        }
        self.records += 1;
        if self.keep > 0 {
            if self.tail.len() == self.keep {
                self.tail.pop_front();
            }
            self.tail.push_back(text());
        }
    }

    fn mix(&mut self, word: u64) {
        for b in word.to_le_bytes() {
            self.hash ^= u64::from(b);
            self.hash = self.hash.wrapping_mul(FNV_PRIME);
        }
    }
}

/// FNV-1a of a byte string (packet contents in trace records).
#[must_use]
pub fn hash_bytes(bytes: &[u8]) -> u64 {
    let mut h = FNV_OFFSET;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    h
}
