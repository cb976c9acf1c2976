//! The replicated ledger: signed key/value entries in named buckets, merged deterministically,
//! gossiped between members and kept on disk. Sans-IO: no sockets, no clock; every mutator that
//! needs the time takes `now_unix_ms`.
//!
//! # Data and merge
//! A [`Ledger`] holds buckets of `key -> Entry`. An [`Entry`] carries its value (or `None`, a
//! tombstone), a version ([`Hlc`], hybrid logical clock), the writer's [`PeerId`] and the writer's
//! ed25519 signature over a domain-separated encoding of all of that. For one key the entry that
//! [`Entry::wins_over`] the other is kept: higher version, then higher writer id, then higher
//! value bytes (tombstone lowest), then higher signature bytes. That order is total, so
//! [`Ledger::apply`] is commutative, associative and idempotent: any order and any duplication of
//! the same entries gives the same ledger (the tests check it over thousands of random cases).
//!
//! # Clock rules
//! Versions come from a [`Clock`]: 48 bits of unix milliseconds and a 16-bit counter, monotonic
//! even when the wall clock steps back. An entry is refused (counted as `rejected_future`) when its
//! version is more than [`Limits::max_future_ms`] (24 h) ahead of both the local wall clock and the
//! highest version stored from any *other* writer: one writer cannot vouch for its own clock, but a
//! second writer can, so a node whose wall clock is behind (a board without RTC boots in 1970)
//! still accepts the network's time. A wall clock before [`CLOCK_SET_FLOOR_MS`] (2024-01-01) is
//! taken as unset: such a node cannot judge the future and accepts every version. Refused entries
//! are not lost: anti-entropy offers them again and they are taken once the horizon catches up.
//!
//! # Tombstones
//! A delete writes a tombstone, which expires [`Limits::tombstone_lifetime_ms`] (24 h) after its
//! version and is then removed by [`Ledger::expire`]. The classic caveat: a node that was out of
//! contact for longer than that still holds the deleted key and would bring it back. Mitigation,
//! quarantine: when a ledger that has been out of contact for more than half the lifetime starts
//! an exchange ([`Ledger::summary_for`] or [`Ledger::reconcile`]), every entry older than its last
//! contact becomes *suspect* (peers held those then; entries written since, while alone or
//! partitioned, are not suspect). Suspect entries still read locally but are never pushed or
//! served; the next [`Ledger::reconcile`] confirms those the peer holds and drops those the peer
//! lacks although it was in contact after their version ([`Summary::synced_until`]). So a delete
//! made while we were away wins, a write made during a partition survives, and a whole network
//! coming back from a power cut keeps its data. Suspicion nobody could settle is lifted after
//! one lifetime. Remaining hole: a peer that missed a write *and* forgot a delete of the same
//! age cannot be told apart; a longer lifetime narrows it.
//!
//! # Anti-entropy (see [`Digest`], [`Summary`], [`Batch`])
//! 1. A→B [`Digest`]: per bucket, count and XOR of entry hashes; per writer, the highest version A
//!    holds (a version vector).
//! 2. B→A [`Summary`] ([`Ledger::summary_for`]): for each bucket that differs, the entries A's
//!    version vector shows A lacks, in full, and a compact list of every other entry B holds there.
//! 3. A→B [`Batch`] ([`Ledger::reconcile`]): the entries B lacks or holds older, and requests for
//!    entries A still lacks (gaps below its version vector, rare).
//! 4. B→A [`Batch`] ([`Ledger::answer`]), only when step 3 carried requests.
//!
//! A node that was away (A) has caught up after one round trip (messages 1–2) unless it had gaps;
//! B after one and a half. Everything converges in at most two round trips, except when a size cap
//! cut a message short, in which case the next exchange continues.
//!
//! # Limits
//! Names are bounded ([`MAX_BUCKET_LEN`], [`MAX_KEY_LEN`], UTF-8, no control characters), values
//! by [`Limits::max_value_bytes`], the ledger by entry count and total bytes (a full ledger
//! refuses new keys and never evicts live data), every message by [`SyncLimits`].

#![warn(missing_docs)]

pub mod authority;
mod catchup;
pub mod disk;
pub mod edgevpn;
mod entry;
mod hlc;
pub mod journal;
pub mod names;
mod persist;
mod store;
mod sync;
#[cfg(test)]
mod tests;

use std::fmt;
use std::io;
use std::path::PathBuf;

use crate::identity::PeerId;
use crate::wire::WireError;

pub use catchup::{CatchUpReport, catch_up_report};
pub use entry::{ENTRY_WIRE_OVERHEAD, Entry, KeyId, MAX_BUCKET_LEN, MAX_KEY_LEN, SIGNING_LABEL};
pub use hlc::{CLOCK_SET_FLOOR_MS, Clock, DEFAULT_MAX_AHEAD_MS, Hlc, TooFarAhead};
pub use persist::{SNAPSHOT_MAGIC, SNAPSHOT_VERSION};
pub use store::{
    Applied, ApplyReport, Counters, Ledger, LedgerEvent, Limits, MAX_REMOVAL_MARKS,
    MAX_WRITER_BYTES, MAX_WRITER_ENTRIES, Rival,
};
pub use sync::{
    Announced, Batch, BucketDigest, BucketSummary, Digest, Request, SYNC_VERSION, Scope, Summary,
    SummaryItem, SyncLimits, SyncMessage,
};

/// Why an entry, a message or a snapshot was refused.
#[derive(Debug)]
pub enum LedgerError {
    /// A bucket or key name is empty, too long or holds a control character.
    InvalidName {
        /// `bucket` or `key`.
        field: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A value is over the configured maximum.
    ValueTooLarge {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The writer's public key is not a valid ed25519 point.
    BadWriterKey {
        /// The writer.
        writer: PeerId,
    },
    /// The signature does not verify.
    BadSignature {
        /// Bucket of the entry.
        bucket: String,
        /// Key of the entry.
        key: String,
        /// The claimed writer.
        writer: PeerId,
    },
    /// The entry's version is too far ahead of this node's time horizon.
    TooFarInFuture {
        /// Bucket of the entry.
        bucket: String,
        /// Key of the entry.
        key: String,
        /// Its version.
        version: Hlc,
        /// The latest acceptable unix millisecond.
        limit_ms: u64,
    },
    /// The ledger is at its entry or byte limit and refuses a new key (or a larger value).
    Full {
        /// Bucket of the refused entry.
        bucket: String,
        /// Key of the refused entry.
        key: String,
        /// Entries held.
        entries: usize,
        /// Bytes held.
        bytes: usize,
    },
    /// The writer does not own the key (see [`authority`]).
    NotOwner {
        /// Bucket of the entry.
        bucket: String,
        /// Key of the entry.
        key: String,
        /// The writer.
        writer: PeerId,
        /// Why it is not the owner.
        reason: &'static str,
    },
    /// The writer holds its quota of entries or bytes already ([`Limits::max_writer_bytes`]).
    OverQuota {
        /// Bucket of the refused entry.
        bucket: String,
        /// Key of the refused entry.
        key: String,
        /// The writer.
        writer: PeerId,
        /// Its entries with this one.
        entries: usize,
        /// Its bytes with this one.
        bytes: usize,
    },
    /// A sync message did not decode or would not fit its limits.
    Wire(WireError),
    /// The snapshot file could not be read or written.
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        error: io::Error,
    },
    /// The snapshot file exists but is not a valid snapshot.
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

impl fmt::Display for LedgerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::InvalidName { field, reason } => write!(f, "ledger {field} name {reason}"),
            Self::ValueTooLarge { len, max } => {
                write!(f, "ledger value of {len} bytes is over the limit of {max}")
            }
            Self::BadWriterKey { writer } => {
                write!(f, "ledger writer {writer} is not a valid ed25519 key")
            }
            Self::BadSignature {
                bucket,
                key,
                writer,
            } => write!(
                f,
                "ledger entry {bucket}/{key}: bad signature from {writer}"
            ),
            Self::TooFarInFuture {
                bucket,
                key,
                version,
                limit_ms,
            } => write!(
                f,
                "ledger entry {bucket}/{key}: version {version} is after the horizon {limit_ms} ms"
            ),
            Self::Full {
                bucket,
                key,
                entries,
                bytes,
            } => write!(
                f,
                "ledger full ({entries} entries, {bytes} bytes): refused {bucket}/{key}"
            ),
            Self::NotOwner {
                bucket,
                key,
                writer,
                reason,
            } => write!(
                f,
                "ledger entry {bucket}/{key}: {writer} does not own it ({reason})"
            ),
            Self::OverQuota {
                bucket,
                key,
                writer,
                entries,
                bytes,
            } => write!(
                f,
                "ledger entry {bucket}/{key}: {writer} would hold {entries} entries, {bytes} bytes: over its quota"
            ),
            Self::Wire(e) => write!(f, "ledger message: {e}"),
            Self::Io { path, error } => write!(f, "ledger snapshot {}: {error}", path.display()),
            Self::Corrupt { path, reason } => {
                write!(f, "ledger snapshot {} is corrupt: {reason}", path.display())
            }
        }
    }
}

impl std::error::Error for LedgerError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Wire(e) => Some(e),
            Self::Io { error, .. } => Some(error),
            _ => None,
        }
    }
}

impl From<WireError> for LedgerError {
    fn from(e: WireError) -> Self {
        Self::Wire(e)
    }
}
