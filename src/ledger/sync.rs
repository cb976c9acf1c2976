//! Anti-entropy: digests, summaries and entry batches, and their wire format.
//!
//! Message sequence (A starts, typically the node that was away; see the module documentation
//! of [`crate::ledger`] for the reasoning):
//!
//! ```text
//! 1. A -> B  Digest    A.digest(now)
//! 2. B -> A  Summary   B.summary_for(&digest)      A: apply_all(summary.entries), then
//! 3. A -> B  Batch     A.reconcile(&summary)       B: apply_all(batch.entries)
//! 4. B -> A  Batch     B.answer(&batch.requests)   only if step 3 requested anything
//! ```
//!
//! Wire format (big-endian, [`crate::wire`]); every message is
//! `u8 SYNC_VERSION | u8 kind | body`:
//!
//! ```text
//! Digest  (kind 1) = u8 flags (1 partial, 2 first, 4 cluster, 8 brief)
//!                    | [u16 len | first bucket, if flag 2] | [u16 len | cluster, if flag 4]
//!                    | u32 n | n x (u16 len | bucket | u32 count | hash[32])
//!                    | u32 m | m x (writer[32] | u64 version)
//! Summary (kind 2) = u8 flags (2 complete) | u64 synced until | u16 w | w x writer[32]
//!                    | u32 n | n x (u16 len | bucket | u64 first | u64 last | u32 i
//!                                   | i x (u64 key id | u64 version | u16 writer index
//!                                          | u32 tag | u8 flags (1 suspect, 2 tombstone)))
//!                    | u32 e | e x entry
//! Batch   (kind 3) = u32 e | e x entry | u32 r | r x (u16 len | bucket | u64 key id)
//! ```
//!
//! Buckets (in digests and summaries) and writers (in digests) are strictly increasing; every
//! count is checked against the caller's [`SyncLimits`] and against the bytes left before
//! anything is allocated.

use std::collections::{BTreeMap, BTreeSet, btree_map};

use super::authority::announced_uuid;
use super::entry::{MAX_VALUE_WIRE, name_problem};
use super::names;
use super::store::Stored;
use super::{Entry, Hlc, KeyId, Ledger, LedgerError, Limits, MAX_BUCKET_LEN, MAX_KEY_LEN};
use crate::identity::PeerId;
use crate::wire::{Reader, WireError, Writer};

/// Version byte that starts every sync message.
pub const SYNC_VERSION: u8 = 1;

const KIND_DIGEST: u8 = 1;
const KIND_SUMMARY: u8 = 2;
const KIND_BATCH: u8 = 3;
const KIND_ANNOUNCE: u8 = 4;

const DIGEST_PARTIAL: u8 = 1;
const DIGEST_FIRST: u8 = 2;
const DIGEST_CLUSTER: u8 = 4;
const DIGEST_BRIEF: u8 = 8;
const SUMMARY_COMPLETE: u8 = 2;
const SUMMARY_CLUSTER: u8 = 4;
const ITEM_SUSPECT: u8 = 1;
const ITEM_TOMBSTONE: u8 = 2;

/// Version, kind, and the largest fixed part of any body (flags, contact time, three counts,
/// the sender's cluster).
const MESSAGE_FIXED: usize = 2 + 1 + 8 + 2 + 4 + 4 + 2 + MAX_BUCKET_LEN;
/// Encoded size of one summary item.
const ITEM_LEN: usize = 8 + 8 + 2 + 4 + 1;
/// Encoded size of one writer in a summary's table.
const WRITER_LEN: usize = 32;
/// Most distinct writers one summary can name (its table has a u16 count).
const MAX_SUMMARY_WRITERS: u16 = u16::MAX;
/// Encoded size of one version-vector element.
const VV_LEN: usize = 32 + 8;
/// Smallest encoded entry (1-byte names, tombstone).
const MIN_ENTRY_LEN: usize = 2 + 1 + 2 + 1 + 1 + 8 + 32 + 64;

/// Bounds on sync messages, both when building and when decoding them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncLimits {
    /// Largest encoded message (the token's `max_message_size`, or less).
    pub max_message_bytes: usize,
    /// Most full entries in one message.
    pub max_entries: usize,
    /// Largest value accepted inside a message.
    pub max_value_bytes: usize,
}

impl Default for SyncLimits {
    fn default() -> Self {
        Self::for_ledger(&Limits::default(), 20 * 1024 * 1024)
    }
}

impl SyncLimits {
    /// Limits matching a ledger's, with messages of at most `max_message_bytes`.
    #[must_use]
    pub fn for_ledger(limits: &Limits, max_message_bytes: usize) -> Self {
        Self {
            max_message_bytes,
            max_entries: limits.max_entries,
            max_value_bytes: limits.max_value_bytes,
        }
    }
}

/// One bucket in a [`Digest`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BucketDigest {
    /// Entries held in it, tombstones included.
    pub count: u32,
    /// XOR of the hashes of those entries (order-independent).
    pub hash: [u8; 32],
}

/// What a ledger holds, in brief: per bucket a count and a hash, per writer the highest version
/// held (a version vector). When the buckets do not all fit in a message, a contiguous run of
/// them is listed (`first` ..= last listed) and only those are compared.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Digest {
    /// Buckets by name.
    pub buckets: BTreeMap<String, BucketDigest>,
    /// When set, buckets named before this one were left out (size cap; the start rotates).
    pub first: Option<String>,
    /// True when buckets named after the last one listed were left out (size cap).
    pub partial: bool,
    /// Highest version held from each writer; a writer left out means "nothing known", which
    /// only makes the peer send more.
    pub writers: BTreeMap<PeerId, Hlc>,
    /// The sender's cluster bucket (its `network_id`), when it has one: see [`Scope`].
    pub cluster: Option<String>,
    /// Only the buckets, no version vector: the periodic check between two members that
    /// synced already. A peer whose buckets match ([`Ledger::differs_from`]) answers nothing;
    /// one whose buckets differ answers with its own full digest, which starts the usual
    /// exchange the other way.
    pub brief: bool,
}

/// Which buckets two ledgers exchange. One token carries every cluster (`network_id`) of a
/// network; a node keeps its own cluster's bucket and the rest (the network-wide `machines`,
/// `healthcheck`, `dhcp`, and any other bucket), but not the bucket of another cluster: two
/// members of different clusters do not exchange either one's cluster bucket (but for the nodes'
/// announcements, see [`Scope::shares`]), and a node keeps
/// its own from a peer whose cluster it does not know yet (the exchange that starts every
/// connection brings the peer what it missed meanwhile). Nobody passes on another cluster's
/// bucket, so nobody holds one. A member that names some bucket as its cluster only keeps that
/// bucket from itself.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Scope<'a> {
    /// This node's cluster bucket.
    pub mine: Option<&'a str>,
    /// The peer's cluster bucket, when it said (in its [`Digest`]).
    pub theirs: Option<&'a str>,
}

impl Scope<'_> {
    /// Every bucket is exchanged (a peer whose cluster is not known yet, or one ledger alone).
    pub const ALL: Scope<'static> = Scope {
        mine: None,
        theirs: None,
    };

    /// True when the entry `bucket`/`key` goes between the two. A node's announcement
    /// (`<uuid>-uuid`) always does, whatever its bucket: it binds the uuid to the node's key for
    /// the whole network, and the network-wide buckets are keyed by uuid (another cluster's
    /// heartbeats and address claims could not be checked without it).
    #[must_use]
    pub fn shares(&self, bucket: &str, key: &str) -> bool {
        if announced_uuid(bucket, key).is_some() {
            return true;
        }
        match (self.mine, self.theirs) {
            (Some(mine), Some(theirs)) if mine == theirs => true,
            (mine, theirs) => {
                names::is_network_wide(bucket) || (mine != Some(bucket) && theirs != Some(bucket))
            }
        }
    }
}

/// One entry as listed in a [`Summary`]: enough to tell who is ahead, without the value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SummaryItem {
    /// The key's id.
    pub key: KeyId,
    /// The entry's version.
    pub version: Hlc,
    /// The entry's writer.
    pub writer: PeerId,
    /// First 4 bytes of the entry hash: tells two entries with equal version and writer apart.
    pub tag: u32,
    /// Quarantined at the sender: do not request it.
    pub suspect: bool,
    /// A tombstone.
    pub tombstone: bool,
}

/// The sender's entries in one bucket whose key ids lie in `first..=last`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketSummary {
    /// The bucket.
    pub name: String,
    /// Lowest key id covered.
    pub first: KeyId,
    /// Highest key id covered (a bucket that did not fit is covered in part).
    pub last: KeyId,
    /// The entries not sent in full, by key id.
    pub items: Vec<SummaryItem>,
}

/// Reply to a [`Digest`]: for every bucket that differs, the entries the digest's version vector
/// shows the peer lacks, in full, and every other entry as a [`SummaryItem`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Until when (unix ms) the sender was in contact with the network before this exchange
    /// (now, unless it was away; 0 if never). A quarantined entry older than this that the sender
    /// lacks was most likely deleted and forgotten there, and is dropped by the receiver.
    pub synced_until: u64,
    /// Every differing bucket is covered in full (no size cap hit, digest not partial).
    pub complete: bool,
    /// Per-bucket listings.
    pub buckets: Vec<BucketSummary>,
    /// Entries sent in full.
    pub entries: Vec<Entry>,
    /// The sender's cluster bucket, as in [`Digest::cluster`] (for a peer whose digest was
    /// lost).
    pub cluster: Option<String>,
}

/// A request for whatever the peer holds under a key id.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Request {
    /// The bucket.
    pub bucket: String,
    /// The key's id.
    pub key: KeyId,
}

/// Entries to merge and, optionally, requests to answer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Batch {
    /// Entries, to give to [`Ledger::apply_all`].
    pub entries: Vec<Entry>,
    /// Requests, to give to [`Ledger::answer`].
    pub requests: Vec<Request>,
}

/// One entry the sender holds, named without its value: the receiver asks for it (a
/// [`Request`] in a [`Batch`]) only when it has nothing as new.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announced {
    /// The bucket.
    pub bucket: String,
    /// The key.
    pub key: String,
    /// The entry's version.
    pub version: Hlc,
    /// First 4 bytes of the entry hash: tells two entries of one version apart.
    pub tag: u32,
}

impl Announced {
    /// The announcement of `entry`.
    #[must_use]
    pub fn of(entry: &Entry) -> Self {
        Self {
            bucket: entry.bucket.clone(),
            key: entry.key.clone(),
            version: entry.version,
            tag: tag_of(&entry.hash()),
        }
    }

    /// True when `held` is this entry or newer (nothing to ask for).
    #[must_use]
    pub fn is_covered_by(&self, held: &Entry) -> bool {
        held.version > self.version
            || (held.version == self.version && tag_of(&held.hash()) == self.tag)
    }

    fn encoded_len(&self) -> usize {
        2 + self.bucket.len() + 2 + self.key.len() + 8 + 4
    }
}

/// Any sync message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyncMessage {
    /// Step 1.
    Digest(Digest),
    /// Step 2.
    Summary(Summary),
    /// Steps 3 and 4, and pushes.
    Batch(Batch),
    /// Entries the sender holds, without their values (a lazy push).
    Announce(Vec<Announced>),
}

impl SyncMessage {
    /// Announcements ([`Announced::of`] the entries) split into messages within `limits`.
    #[must_use]
    pub fn announcements(
        announced: impl IntoIterator<Item = Announced>,
        limits: &SyncLimits,
    ) -> Vec<SyncMessage> {
        let budget = limits.max_message_bytes.saturating_sub(MESSAGE_FIXED);
        let mut out = Vec::new();
        let mut items = Vec::new();
        let mut size = 0;
        for item in announced {
            let len = item.encoded_len();
            if !items.is_empty() && (size + len > budget || items.len() >= limits.max_entries) {
                out.push(SyncMessage::Announce(std::mem::take(&mut items)));
                size = 0;
            }
            size += len;
            items.push(item);
        }
        if !items.is_empty() {
            out.push(SyncMessage::Announce(items));
        }
        out
    }
}

fn tag_of(hash: &[u8; 32]) -> u32 {
    u32::from_be_bytes([hash[0], hash[1], hash[2], hash[3]])
}

fn write_count(
    w: &mut Writer<'_>,
    field: &'static str,
    max: usize,
    n: usize,
) -> Result<(), WireError> {
    match u32::try_from(n) {
        Ok(v) if n <= max => {
            w.u32(v);
            Ok(())
        }
        _ => Err(WireError::TooLong { field, len: n, max }),
    }
}

/// A u32 count, at most `max` and at most what the remaining bytes can hold.
fn read_count(
    r: &mut Reader<'_>,
    field: &'static str,
    max: usize,
    min_item: usize,
) -> Result<usize, WireError> {
    let n = usize::try_from(r.u32()?).unwrap_or(usize::MAX);
    if n > max {
        return Err(WireError::TooLong { field, len: n, max });
    }
    let fits = r.remaining() / min_item.max(1);
    if n > fits {
        return Err(WireError::Truncated {
            needed: n.saturating_mul(min_item),
            remaining: r.remaining(),
        });
    }
    Ok(n)
}

fn read_bucket(r: &mut Reader<'_>) -> Result<String, WireError> {
    let s = r.str_u16("bucket", MAX_BUCKET_LEN)?;
    match name_problem(s, MAX_BUCKET_LEN) {
        Some(_) => Err(WireError::Invalid("bucket")),
        None => Ok(s.to_owned()),
    }
}

fn write_entries(
    w: &mut Writer<'_>,
    entries: &[Entry],
    limits: &SyncLimits,
) -> Result<(), WireError> {
    write_count(w, "entries", limits.max_entries, entries.len())?;
    for e in entries {
        if let Some(v) = &e.value {
            if v.len() > limits.max_value_bytes {
                return Err(WireError::TooLong {
                    field: "value",
                    len: v.len(),
                    max: limits.max_value_bytes,
                });
            }
        }
        e.encode(w)?;
    }
    Ok(())
}

fn read_entries(r: &mut Reader<'_>, limits: &SyncLimits) -> Result<Vec<Entry>, WireError> {
    let n = read_count(r, "entries", limits.max_entries, MIN_ENTRY_LEN)?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(Entry::decode(
            r,
            limits.max_value_bytes.min(MAX_VALUE_WIRE),
        )?);
    }
    Ok(out)
}

impl SyncMessage {
    /// Appends the encoding to `out`; fails (leaving `out` as it was) if the message breaks
    /// `limits`, including [`SyncLimits::max_message_bytes`].
    pub fn encode(&self, limits: &SyncLimits, out: &mut Vec<u8>) -> Result<(), LedgerError> {
        let start = out.len();
        let res = self.encode_inner(limits, out).and_then(|()| {
            let len = out.len() - start;
            if len > limits.max_message_bytes {
                Err(WireError::TooLong {
                    field: "sync message",
                    len,
                    max: limits.max_message_bytes,
                })
            } else {
                Ok(())
            }
        });
        if res.is_err() {
            out.truncate(start);
        }
        res.map_err(LedgerError::Wire)
    }

    fn encode_inner(&self, limits: &SyncLimits, out: &mut Vec<u8>) -> Result<(), WireError> {
        let mut w = Writer::new(out);
        w.u8(SYNC_VERSION);
        match self {
            SyncMessage::Digest(d) => {
                let mut flags = if d.partial { DIGEST_PARTIAL } else { 0 };
                if d.first.is_some() {
                    flags |= DIGEST_FIRST;
                }
                if d.cluster.is_some() {
                    flags |= DIGEST_CLUSTER;
                }
                if d.brief {
                    flags |= DIGEST_BRIEF;
                }
                w.u8(KIND_DIGEST).u8(flags);
                if let Some(first) = &d.first {
                    w.bytes_u16("bucket", MAX_BUCKET_LEN, first.as_bytes())?;
                }
                if let Some(cluster) = &d.cluster {
                    w.bytes_u16("bucket", MAX_BUCKET_LEN, cluster.as_bytes())?;
                }
                write_count(&mut w, "buckets", usize::MAX, d.buckets.len())?;
                for (name, b) in &d.buckets {
                    w.bytes_u16("bucket", MAX_BUCKET_LEN, name.as_bytes())?;
                    w.u32(b.count).bytes(&b.hash);
                }
                write_count(&mut w, "writers", usize::MAX, d.writers.len())?;
                for (writer, v) in &d.writers {
                    w.peer_id(writer).u64(v.0);
                }
            }
            SyncMessage::Summary(s) => {
                let mut flags = if s.complete { SUMMARY_COMPLETE } else { 0 };
                if s.cluster.is_some() {
                    flags |= SUMMARY_CLUSTER;
                }
                w.u8(KIND_SUMMARY).u8(flags).u64(s.synced_until);
                if let Some(cluster) = &s.cluster {
                    w.bytes_u16("bucket", MAX_BUCKET_LEN, cluster.as_bytes())?;
                }
                let mut table: BTreeMap<PeerId, u16> = BTreeMap::new();
                let mut order: Vec<PeerId> = Vec::new();
                for item in s.buckets.iter().flat_map(|b| &b.items) {
                    if let btree_map::Entry::Vacant(slot) = table.entry(item.writer) {
                        let idx = u16::try_from(order.len())
                            .ok()
                            .filter(|&i| i < MAX_SUMMARY_WRITERS)
                            .ok_or(WireError::TooLong {
                                field: "summary writers",
                                len: order.len() + 1,
                                max: usize::from(MAX_SUMMARY_WRITERS),
                            })?;
                        slot.insert(idx);
                        order.push(item.writer);
                    }
                }
                w.u16(order.len() as u16);
                for writer in &order {
                    w.peer_id(writer);
                }
                write_count(&mut w, "buckets", usize::MAX, s.buckets.len())?;
                for b in &s.buckets {
                    w.bytes_u16("bucket", MAX_BUCKET_LEN, b.name.as_bytes())?;
                    w.u64(b.first.0).u64(b.last.0);
                    write_count(&mut w, "items", usize::MAX, b.items.len())?;
                    for item in &b.items {
                        let idx = table.get(&item.writer).copied().unwrap_or(0);
                        let mut f = 0;
                        if item.suspect {
                            f |= ITEM_SUSPECT;
                        }
                        if item.tombstone {
                            f |= ITEM_TOMBSTONE;
                        }
                        w.u64(item.key.0)
                            .u64(item.version.0)
                            .u16(idx)
                            .u32(item.tag)
                            .u8(f);
                    }
                }
                write_entries(&mut w, &s.entries, limits)?;
            }
            SyncMessage::Announce(items) => {
                w.u8(KIND_ANNOUNCE);
                write_count(&mut w, "announced", limits.max_entries, items.len())?;
                for item in items {
                    w.bytes_u16("bucket", MAX_BUCKET_LEN, item.bucket.as_bytes())?;
                    w.bytes_u16("key", MAX_KEY_LEN, item.key.as_bytes())?;
                    w.u64(item.version.0).u32(item.tag);
                }
            }
            SyncMessage::Batch(b) => {
                w.u8(KIND_BATCH);
                write_entries(&mut w, &b.entries, limits)?;
                write_count(&mut w, "requests", usize::MAX, b.requests.len())?;
                for r in &b.requests {
                    w.bytes_u16("bucket", MAX_BUCKET_LEN, r.bucket.as_bytes())?;
                    w.u64(r.key.0);
                }
            }
        }
        Ok(())
    }

    /// Decodes one message. Never panics; any malformed, oversized or trailing input is a typed
    /// error.
    pub fn decode(buf: &[u8], limits: &SyncLimits) -> Result<SyncMessage, LedgerError> {
        if buf.len() > limits.max_message_bytes {
            return Err(LedgerError::Wire(WireError::TooLong {
                field: "sync message",
                len: buf.len(),
                max: limits.max_message_bytes,
            }));
        }
        Self::decode_inner(buf, limits).map_err(LedgerError::Wire)
    }

    fn decode_inner(buf: &[u8], limits: &SyncLimits) -> Result<SyncMessage, WireError> {
        let mut r = Reader::new(buf);
        let version = r.u8()?;
        if version != SYNC_VERSION {
            return Err(WireError::UnsupportedVersion(version));
        }
        let msg = match r.u8()? {
            KIND_DIGEST => {
                let flags = r.u8()?;
                if flags & !(DIGEST_PARTIAL | DIGEST_FIRST | DIGEST_CLUSTER | DIGEST_BRIEF) != 0 {
                    return Err(WireError::UnknownTag {
                        field: "digest flags",
                        tag: flags,
                    });
                }
                let partial = flags & DIGEST_PARTIAL != 0;
                let first = if flags & DIGEST_FIRST != 0 {
                    Some(read_bucket(&mut r)?)
                } else {
                    None
                };
                let cluster = if flags & DIGEST_CLUSTER != 0 {
                    Some(read_bucket(&mut r)?)
                } else {
                    None
                };
                let n = read_count(&mut r, "buckets", usize::MAX, 2 + 1 + 4 + 32)?;
                let mut buckets = BTreeMap::new();
                for _ in 0..n {
                    let name = read_bucket(&mut r)?;
                    let b = BucketDigest {
                        count: r.u32()?,
                        hash: r.array()?,
                    };
                    if buckets
                        .keys()
                        .next_back()
                        .is_some_and(|last: &String| *last >= name)
                    {
                        return Err(WireError::Invalid("digest buckets out of order"));
                    }
                    buckets.insert(name, b);
                }
                let m = read_count(&mut r, "writers", usize::MAX, VV_LEN)?;
                let mut writers = BTreeMap::new();
                for _ in 0..m {
                    let writer = r.peer_id()?;
                    let v = Hlc(r.u64()?);
                    if writers
                        .keys()
                        .next_back()
                        .is_some_and(|last| *last >= writer)
                    {
                        return Err(WireError::Invalid("digest writers out of order"));
                    }
                    writers.insert(writer, v);
                }
                if let (Some(f), Some(b)) = (&first, buckets.keys().next()) {
                    if b < f {
                        return Err(WireError::Invalid("digest bucket before its first"));
                    }
                }
                if flags & DIGEST_BRIEF != 0 && !writers.is_empty() {
                    return Err(WireError::Invalid("brief digest with a version vector"));
                }
                SyncMessage::Digest(Digest {
                    buckets,
                    first,
                    partial,
                    writers,
                    cluster,
                    brief: flags & DIGEST_BRIEF != 0,
                })
            }
            KIND_SUMMARY => {
                let flags = r.u8()?;
                if flags & !(SUMMARY_COMPLETE | SUMMARY_CLUSTER) != 0 {
                    return Err(WireError::UnknownTag {
                        field: "summary flags",
                        tag: flags,
                    });
                }
                let synced_until = r.u64()?;
                let cluster = if flags & SUMMARY_CLUSTER != 0 {
                    Some(read_bucket(&mut r)?)
                } else {
                    None
                };
                let w = usize::from(r.u16()?);
                if w > r.remaining() / WRITER_LEN {
                    return Err(WireError::Truncated {
                        needed: w * WRITER_LEN,
                        remaining: r.remaining(),
                    });
                }
                let mut table = Vec::with_capacity(w);
                for _ in 0..w {
                    table.push(r.peer_id()?);
                }
                let n = read_count(&mut r, "buckets", usize::MAX, 2 + 1 + 8 + 8 + 4)?;
                let mut buckets = Vec::with_capacity(n);
                for _ in 0..n {
                    let name = read_bucket(&mut r)?;
                    if buckets
                        .last()
                        .is_some_and(|prev: &BucketSummary| prev.name >= name)
                    {
                        return Err(WireError::Invalid("summary buckets out of order"));
                    }
                    let (first, last) = (KeyId(r.u64()?), KeyId(r.u64()?));
                    if first > last {
                        return Err(WireError::Invalid("summary range"));
                    }
                    let i = read_count(&mut r, "items", usize::MAX, ITEM_LEN)?;
                    let mut items = Vec::with_capacity(i);
                    for _ in 0..i {
                        let key = KeyId(r.u64()?);
                        let version = Hlc(r.u64()?);
                        let writer = *table
                            .get(usize::from(r.u16()?))
                            .ok_or(WireError::Invalid("summary writer index"))?;
                        let tag = r.u32()?;
                        let f = r.u8()?;
                        if f & !(ITEM_SUSPECT | ITEM_TOMBSTONE) != 0 {
                            return Err(WireError::UnknownTag {
                                field: "summary item flags",
                                tag: f,
                            });
                        }
                        items.push(SummaryItem {
                            key,
                            version,
                            writer,
                            tag,
                            suspect: f & ITEM_SUSPECT != 0,
                            tombstone: f & ITEM_TOMBSTONE != 0,
                        });
                    }
                    buckets.push(BucketSummary {
                        name,
                        first,
                        last,
                        items,
                    });
                }
                let entries = read_entries(&mut r, limits)?;
                SyncMessage::Summary(Summary {
                    synced_until,
                    complete: flags & SUMMARY_COMPLETE != 0,
                    buckets,
                    entries,
                    cluster,
                })
            }
            KIND_BATCH => {
                let entries = read_entries(&mut r, limits)?;
                let n = read_count(&mut r, "requests", usize::MAX, 2 + 1 + 8)?;
                let mut requests = Vec::with_capacity(n);
                for _ in 0..n {
                    requests.push(Request {
                        bucket: read_bucket(&mut r)?,
                        key: KeyId(r.u64()?),
                    });
                }
                SyncMessage::Batch(Batch { entries, requests })
            }
            KIND_ANNOUNCE => {
                let n = read_count(&mut r, "announced", limits.max_entries, 2 + 1 + 2 + 1 + 12)?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    let bucket = read_bucket(&mut r)?;
                    let key = r.str_u16("key", MAX_KEY_LEN)?;
                    if name_problem(key, MAX_KEY_LEN).is_some() {
                        return Err(WireError::Invalid("key"));
                    }
                    items.push(Announced {
                        bucket,
                        key: key.to_owned(),
                        version: Hlc(r.u64()?),
                        tag: r.u32()?,
                    });
                }
                SyncMessage::Announce(items)
            }
            tag => {
                return Err(WireError::UnknownTag {
                    field: "sync message kind",
                    tag,
                });
            }
        };
        r.finish()?;
        Ok(msg)
    }
}

/// A starting key id for a bucket that does not fit, varying with time so successive exchanges
/// cover the whole bucket (SplitMix64 of `now` and the name).
fn range_start(now: u64, name: &str) -> u64 {
    let mut z = now ^ KeyId::of(name).0;
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// How a local entry compares with one the peer listed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cmp {
    Ahead,
    Behind,
    Same,
    /// Same version and writer, different content: both sides send (the merge order decides).
    Differ,
}

/// What the peer holds under one key id.
#[derive(Debug, Clone, Copy)]
struct Held {
    version: Hlc,
    writer: PeerId,
    tag: u32,
    suspect: bool,
    tombstone: bool,
    pushed: bool,
}

fn compare(local: &Stored, held: &Held) -> Cmp {
    match (local.entry.version, local.entry.writer).cmp(&(held.version, held.writer)) {
        std::cmp::Ordering::Greater => Cmp::Ahead,
        std::cmp::Ordering::Less => Cmp::Behind,
        std::cmp::Ordering::Equal if tag_of(&local.hash) == held.tag => Cmp::Same,
        std::cmp::Ordering::Equal => Cmp::Differ,
    }
}

/// Adds entries to a batch while they fit.
struct Budget {
    left: usize,
    entries_left: usize,
}

impl Budget {
    fn take(&mut self, bytes: usize) -> bool {
        if bytes <= self.left {
            self.left -= bytes;
            true
        } else {
            false
        }
    }

    fn take_entry(&mut self, bytes: usize) -> bool {
        if self.entries_left > 0 && self.take(bytes) {
            self.entries_left -= 1;
            true
        } else {
            false
        }
    }
}

impl Ledger {
    /// Step 1: this ledger's [`Digest`], within `limits`. When the buckets do not all fit, a run
    /// of them starting at a bucket chosen from `now_unix_ms` is listed (so successive exchanges
    /// cover them all); writers past what fits are left out (the peer then only sends more).
    #[must_use]
    pub fn digest(&self, limits: &SyncLimits, now_unix_ms: u64) -> Digest {
        let mut left = limits.max_message_bytes.saturating_sub(MESSAGE_FIXED);
        let mut d = Digest::default();
        let cost = |name: &str| 2 + name.len() + 4 + 32;
        let all: usize = self.buckets.keys().map(|n| cost(n)).sum();
        let skip = if all <= left || self.buckets.is_empty() {
            0
        } else {
            let n = self.buckets.len() as u64;
            let start = usize::try_from(range_start(now_unix_ms, "") % n).unwrap_or(0);
            if let Some(name) = self.buckets.keys().nth(start) {
                left = left.saturating_sub(2 + name.len());
                d.first = (start > 0).then(|| name.clone());
            }
            start
        };
        for (name, b) in self.buckets.iter().skip(skip) {
            if cost(name) > left {
                d.partial = true;
                break;
            }
            left -= cost(name);
            d.buckets.insert(
                name.clone(),
                BucketDigest {
                    count: u32::try_from(b.entries.len()).unwrap_or(u32::MAX),
                    hash: b.hash,
                },
            );
        }
        let mut vv: BTreeMap<PeerId, Hlc> = BTreeMap::new();
        for s in self.buckets.values().flat_map(|b| b.entries.values()) {
            if !s.suspect {
                let v = vv.entry(s.entry.writer).or_insert(s.entry.version);
                *v = (*v).max(s.entry.version);
            }
        }
        for (writer, v) in vv {
            if VV_LEN > left {
                break;
            }
            left -= VV_LEN;
            d.writers.insert(writer, v);
        }
        d
    }

    /// A brief digest: [`Ledger::digest`] without the version vector (see [`Digest::brief`]).
    pub fn brief_digest(&self, limits: &SyncLimits, now_unix_ms: u64) -> Digest {
        let mut d = self.digest(limits, now_unix_ms);
        d.writers.clear();
        d.brief = true;
        d
    }

    /// True when a bucket both hold in full in `scope` differs between this ledger and `remote`
    /// (among the buckets `remote` covers). The cluster bucket of one of them, when they are in
    /// different clusters, is left out: each holds a different part of it.
    pub fn differs_from(&self, remote: &Digest, scope: Scope<'_>) -> bool {
        let cutoff: Option<&str> = remote
            .partial
            .then(|| remote.buckets.keys().next_back().map_or("", String::as_str));
        let first = remote.first.as_deref();
        let partly_shared = |name: &str| {
            scope.mine != scope.theirs && (scope.mine == Some(name) || scope.theirs == Some(name))
        };
        self.buckets
            .keys()
            .chain(remote.buckets.keys())
            .map(String::as_str)
            .filter(|n| cutoff.is_none_or(|c| *n <= c) && first.is_none_or(|f| *n >= f))
            .filter(|n| !partly_shared(n))
            .any(
                |name| match (self.buckets.get(name), remote.buckets.get(name)) {
                    (Some(b), Some(d)) => {
                        usize::try_from(d.count).ok() != Some(b.entries.len()) || d.hash != b.hash
                    }
                    (None, None) => false,
                    _ => true,
                },
            )
    }

    /// Step 2: what the peer that sent `remote` needs to catch up, within `limits`.
    ///
    /// For each bucket whose count or hash differs: the entries newer than the peer's version
    /// vector go in full (quarantined entries never do), everything else is listed. A bucket too
    /// large for the message is listed in part, from a key id that varies with `now_unix_ms`.
    /// Buckets outside `scope` are left out.
    pub fn summary_for(
        &mut self,
        remote: &Digest,
        scope: Scope<'_>,
        limits: &SyncLimits,
        now_unix_ms: u64,
    ) -> Summary {
        let synced_until = self.note_contact(now_unix_ms);
        let mut budget = Budget {
            left: limits.max_message_bytes.saturating_sub(MESSAGE_FIXED),
            entries_left: limits.max_entries,
        };
        // Only the run of buckets the digest covers can be compared.
        let cutoff: Option<&str> = remote
            .partial
            .then(|| remote.buckets.keys().next_back().map_or("", String::as_str));
        let first = remote.first.as_deref();
        let names: BTreeSet<&str> = self
            .buckets
            .keys()
            .chain(remote.buckets.keys())
            .map(String::as_str)
            .filter(|n| cutoff.is_none_or(|c| *n <= c) && first.is_none_or(|f| *n >= f))
            .collect();
        let mut summary = Summary {
            synced_until,
            complete: !remote.partial && remote.first.is_none(),
            ..Summary::default()
        };
        let mut writers: BTreeSet<PeerId> = BTreeSet::new();
        // Per listed bucket: its entries in key-id order (to list or push).
        let mut listed: Vec<(String, KeyId, KeyId, Vec<&Stored>)> = Vec::new();
        for name in names {
            let local = self.buckets.get(name);
            let same = match (local, remote.buckets.get(name)) {
                (Some(b), Some(d)) => {
                    usize::try_from(d.count).ok() == Some(b.entries.len()) && d.hash == b.hash
                }
                (None, None) => true,
                _ => false,
            };
            if same {
                continue;
            }
            let fixed = 2 + name.len() + 8 + 8 + 4;
            if fixed > budget.left {
                summary.complete = false;
                break;
            }
            let mut items: Vec<&Stored> = local.map_or_else(Vec::new, |b| {
                b.entries
                    .values()
                    .filter(|s| scope.shares(name, &s.entry.key))
                    .collect()
            });
            items.sort_by_key(|s| s.key_id);
            let cost = |s: &Stored, ws: &BTreeSet<PeerId>| {
                if ws.contains(&s.entry.writer) {
                    ITEM_LEN
                } else if ws.len() < usize::from(MAX_SUMMARY_WRITERS) {
                    ITEM_LEN + WRITER_LEN
                } else {
                    usize::MAX
                }
            };
            // All of it, if it fits.
            let mut ws = writers.clone();
            let mut total = fixed;
            for s in &items {
                total = total.saturating_add(cost(s, &ws));
                ws.insert(s.entry.writer);
            }
            if total <= budget.left {
                budget.left -= total;
                writers = ws;
                listed.push((name.to_owned(), KeyId(0), KeyId(u64::MAX), items));
                continue;
            }
            // Part of it: a contiguous key-id range from a varying start.
            summary.complete = false;
            let mut start = range_start(now_unix_ms, name);
            let mut from = items.partition_point(|s| s.key_id.0 < start);
            if from == items.len() {
                start = 0;
                from = 0;
            }
            let mut left = budget.left - fixed;
            let mut end = from;
            while let Some(s) = items.get(end) {
                let c = cost(s, &writers);
                if c > left {
                    break;
                }
                left -= c;
                writers.insert(s.entry.writer);
                end += 1;
            }
            let last = match items.get(end) {
                None => u64::MAX,
                Some(next) => {
                    // Never split a group of equal key ids.
                    while end > from && items.get(end - 1).is_some_and(|p| p.key_id == next.key_id)
                    {
                        end -= 1;
                    }
                    next.key_id.0.saturating_sub(1)
                }
            };
            if end == from || last < start {
                continue;
            }
            budget.left = left;
            let part = items
                .get(from..end)
                .map_or_else(Vec::new, <[&Stored]>::to_vec);
            listed.push((name.to_owned(), KeyId(start), KeyId(last), part));
        }
        // Promote the entries the peer's version vector shows it lacks to full entries.
        for (name, first, last, items) in listed {
            let mut keep = Vec::with_capacity(items.len());
            for s in items {
                let lacks = remote
                    .writers
                    .get(&s.entry.writer)
                    .is_none_or(|v| s.entry.version > *v);
                let worth =
                    !(s.entry.is_tombstone() && self.is_expired(s.entry.version, now_unix_ms));
                let fits_value = s
                    .entry
                    .value
                    .as_ref()
                    .is_none_or(|v| v.len() <= limits.max_value_bytes);
                if !s.suspect
                    && lacks
                    && worth
                    && fits_value
                    && budget.take_entry(s.entry.encoded_len().saturating_sub(ITEM_LEN))
                {
                    summary.entries.push(s.entry.clone());
                } else {
                    keep.push(SummaryItem {
                        key: s.key_id,
                        version: s.entry.version,
                        writer: s.entry.writer,
                        tag: tag_of(&s.hash),
                        suspect: s.suspect,
                        tombstone: s.entry.is_tombstone(),
                    });
                }
            }
            summary.buckets.push(BucketSummary {
                name,
                first,
                last,
                items: keep,
            });
        }
        summary
    }

    /// Step 3: after applying `remote.entries`, the entries the peer lacks or holds older and
    /// requests for what this ledger still lacks, within `limits`. Also settles quarantined
    /// entries: confirmed when the peer holds the key, dropped when the peer lacks it although it
    /// was in contact after the entry's version (see [`Summary::synced_until`]). Buckets outside
    /// `scope` are neither sent nor asked for.
    pub fn reconcile(
        &mut self,
        remote: &Summary,
        scope: Scope<'_>,
        limits: &SyncLimits,
        now_unix_ms: u64,
    ) -> Batch {
        self.note_contact(now_unix_ms);
        let mut pushed: BTreeMap<&str, Vec<&Entry>> = BTreeMap::new();
        for e in &remote.entries {
            pushed.entry(e.bucket.as_str()).or_default().push(e);
        }
        let mut send: Vec<(String, String)> = Vec::new();
        let mut requests: Vec<Request> = Vec::new();
        let mut confirm: Vec<(String, String)> = Vec::new();
        let mut forget: Vec<(String, String)> = Vec::new();
        let mut seen: BTreeSet<&str> = BTreeSet::new();
        for bs in &remote.buckets {
            if !seen.insert(bs.name.as_str()) {
                continue; // a bucket listed twice is looked at once
            }
            let in_range = |k: KeyId| bs.first <= k && k <= bs.last;
            let mut held: BTreeMap<KeyId, Vec<Held>> = BTreeMap::new();
            for it in bs.items.iter().filter(|it| in_range(it.key)) {
                held.entry(it.key).or_default().push(Held {
                    version: it.version,
                    writer: it.writer,
                    tag: it.tag,
                    suspect: it.suspect,
                    tombstone: it.tombstone,
                    pushed: false,
                });
            }
            for e in pushed.get(bs.name.as_str()).into_iter().flatten() {
                held.entry(KeyId::of(&e.key)).or_default().push(Held {
                    version: e.version,
                    writer: e.writer,
                    tag: tag_of(&e.hash()),
                    suspect: false,
                    tombstone: e.is_tombstone(),
                    pushed: true,
                });
            }
            let mut locals: BTreeMap<KeyId, Vec<&Stored>> = BTreeMap::new();
            for s in self
                .buckets
                .get(&bs.name)
                .into_iter()
                .flat_map(|b| b.entries.values())
                .filter(|s| scope.shares(&bs.name, &s.entry.key))
            {
                locals.entry(s.key_id).or_default().push(s);
            }
            for (id, mine) in &locals {
                let theirs = held.get(id);
                if theirs.is_none() && !in_range(*id) {
                    continue;
                }
                let collision = mine.len() > 1 || theirs.is_some_and(|t| t.len() > 1);
                for s in mine {
                    let key = (bs.name.clone(), s.entry.key.clone());
                    let expired_tombstone =
                        s.entry.is_tombstone() && self.is_expired(s.entry.version, now_unix_ms);
                    match theirs {
                        None if s.suspect => {
                            if s.entry.version.millis() < remote.synced_until {
                                forget.push(key);
                            }
                        }
                        None => {
                            if !expired_tombstone {
                                send.push(key);
                            }
                        }
                        Some(t) => {
                            if s.suspect {
                                confirm.push(key.clone());
                            }
                            let ahead = collision
                                || t.iter()
                                    .any(|h| matches!(compare(s, h), Cmp::Ahead | Cmp::Differ));
                            if ahead && !expired_tombstone {
                                send.push(key);
                            }
                        }
                    }
                }
            }
            for (id, theirs) in &held {
                if theirs.iter().any(|h| h.pushed) {
                    continue;
                }
                let mine = locals.get(id);
                let collision = theirs.len() > 1 || mine.is_some_and(|m| m.len() > 1);
                let want = theirs.iter().any(|h| {
                    let useless =
                        h.suspect || (h.tombstone && self.is_expired(h.version, now_unix_ms));
                    !useless
                        && (collision
                            || mine.is_none_or(|m| {
                                m.iter().all(|s| {
                                    matches!(compare(s, h), Cmp::Behind | Cmp::Differ)
                                        || self.displaced_by(&s.entry, &h.writer, Some(now_unix_ms))
                                })
                            }))
                });
                if want {
                    requests.push(Request {
                        bucket: bs.name.clone(),
                        key: *id,
                    });
                }
            }
        }
        if remote.complete {
            // Buckets the peer did not list are identical to ours: it holds every entry in them.
            let listed: BTreeSet<&str> = remote.buckets.iter().map(|b| b.name.as_str()).collect();
            for (name, b) in &self.buckets {
                if !listed.contains(name.as_str()) {
                    for (k, s) in &b.entries {
                        if s.suspect {
                            confirm.push((name.clone(), k.clone()));
                        }
                    }
                }
            }
        }
        for (b, k) in confirm {
            self.set_suspect(&b, &k, false);
        }
        for (b, k) in forget {
            self.drop_suspect(&b, &k);
        }
        let mut budget = Budget {
            left: limits.max_message_bytes.saturating_sub(MESSAGE_FIXED),
            entries_left: limits.max_entries,
        };
        let mut batch = Batch::default();
        for (b, k) in send {
            if let Some(e) = self.entry(&b, &k) {
                let fits_value = e
                    .value
                    .as_ref()
                    .is_none_or(|v| v.len() <= limits.max_value_bytes);
                if fits_value && budget.take_entry(e.encoded_len()) {
                    batch.entries.push(e.clone());
                }
            }
        }
        for r in requests {
            if budget.take(2 + r.bucket.len() + 8) {
                batch.requests.push(r);
            }
        }
        batch
    }

    /// Step 4: the entries asked for (quarantined ones and buckets outside `scope` are never
    /// served), within `limits`.
    #[must_use]
    pub fn answer(&self, requests: &[Request], scope: Scope<'_>, limits: &SyncLimits) -> Batch {
        let mut wanted: BTreeMap<&str, BTreeSet<KeyId>> = BTreeMap::new();
        for r in requests {
            wanted.entry(r.bucket.as_str()).or_default().insert(r.key);
        }
        let mut budget = Budget {
            left: limits.max_message_bytes.saturating_sub(MESSAGE_FIXED),
            entries_left: limits.max_entries,
        };
        let mut batch = Batch::default();
        for (bucket, ids) in wanted {
            let Some(b) = self.buckets.get(bucket) else {
                continue;
            };
            for s in b.entries.values() {
                let fits_value = s
                    .entry
                    .value
                    .as_ref()
                    .is_none_or(|v| v.len() <= limits.max_value_bytes);
                if ids.contains(&s.key_id)
                    && scope.shares(bucket, &s.entry.key)
                    && !s.suspect
                    && fits_value
                    && budget.take_entry(s.entry.encoded_len())
                {
                    batch.entries.push(s.entry.clone());
                }
            }
        }
        batch
    }
}
