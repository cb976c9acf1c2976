//! The ledger store: buckets of signed entries, merge, limits, tombstone expiry, events.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use super::authority::{Authority, MAX_DEFERRED, Verdict, announced_uuid};
use super::journal::JournalState;
use crate::cluster::election::MASTER_COMMIT;

use super::entry::{MAX_VALUE_WIRE, known_valid, remember_valid};
use super::hlc::wall_clock_is_set;
use super::{Clock, DEFAULT_MAX_AHEAD_MS, Entry, Hlc, KeyId, LedgerError};
use crate::identity::{Identity, PeerId};

/// Room a message needs besides one entry's value (header, names, version, writer, signature).
const MESSAGE_SLACK: usize = 1024;
/// Bytes counted per stored entry on top of its encoding (hash, key id, map nodes).
const STORE_OVERHEAD: usize = 64;
/// Most bytes one writer's entries may hold in a ledger (a quota: one member, or one API
/// client through it, cannot fill every node's disk and memory).
pub const MAX_WRITER_BYTES: usize = 4 * 1024 * 1024;
/// Most entries one writer may hold (the leader writes a role per node: room for thousands).
pub const MAX_WRITER_ENTRIES: usize = 16_384;
/// Removal marks kept per bucket for incremental readers ([`Ledger::changed_since`]); past it
/// the oldest is dropped and a reader that has not seen it reads the whole bucket again.
pub const MAX_REMOVAL_MARKS: usize = 1024;
/// edgevpn's default `max_message_size` (20 MiB).
const DEFAULT_MAX_MESSAGE_SIZE: usize = 20 * 1024 * 1024;

/// The ledger's bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most entries (tombstones included); new keys are refused beyond it. Default 65,536.
    pub max_entries: usize,
    /// Most bytes held (encoded entries plus a fixed overhead each). Default 64 MiB.
    pub max_total_bytes: usize,
    /// Largest value. Default: the token's default `max_message_size` (20 MiB) less 1 KiB, so
    /// that every entry fits in one message.
    pub max_value_bytes: usize,
    /// How long a tombstone is kept after its version. Default 24 h.
    pub tombstone_lifetime_ms: u64,
    /// How far past the local horizon a version may be (see the module documentation).
    /// Default 24 h.
    pub max_future_ms: u64,
    /// Most bytes held from one writer (counted like `max_total_bytes`). Default
    /// [`MAX_WRITER_BYTES`].
    pub max_writer_bytes: usize,
    /// Most entries held from one writer. Default [`MAX_WRITER_ENTRIES`].
    pub max_writer_entries: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_entries: 65_536,
            max_total_bytes: 64 * 1024 * 1024,
            max_value_bytes: DEFAULT_MAX_MESSAGE_SIZE - MESSAGE_SLACK,
            tombstone_lifetime_ms: 24 * 60 * 60 * 1000,
            max_future_ms: DEFAULT_MAX_AHEAD_MS,
            max_writer_bytes: MAX_WRITER_BYTES,
            max_writer_entries: MAX_WRITER_ENTRIES,
        }
    }
}

impl Limits {
    /// The defaults, with the value limit derived from the token's `max_message_size`.
    #[must_use]
    pub fn for_max_message_size(max_message_size: u64) -> Limits {
        let max = usize::try_from(max_message_size)
            .unwrap_or(usize::MAX)
            .min(MAX_VALUE_WIRE);
        Limits {
            max_value_bytes: max.saturating_sub(MESSAGE_SLACK),
            ..Limits::default()
        }
    }
}

/// What [`Ledger::apply`] did with an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The key was absent; the entry is stored.
    New,
    /// The entry won over the stored one and replaced it.
    Replaced,
    /// The entry lost (or was already held, or was an expired tombstone); nothing changed.
    Stale,
}

/// Totals of [`Ledger::apply_all`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// Entries stored under new keys.
    pub new: usize,
    /// Entries that replaced older ones.
    pub replaced: usize,
    /// Entries that changed nothing.
    pub stale: usize,
    /// Entries refused with an error (counted by kind in [`Counters`]).
    pub refused: usize,
}

/// What the ledger has done since it was created; never reset.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    /// Entries stored (new or replacing), local writes included.
    pub applied: u64,
    /// Entries that lost against what was held (discarded before their signature is checked).
    pub stale: u64,
    /// Entries with a bad signature or writer key.
    pub bad_signature: u64,
    /// Entries with an invalid name or an oversized value.
    pub invalid: u64,
    /// Entries refused because the ledger was full.
    pub rejected_full: u64,
    /// Entries refused because their version was too far in the future.
    pub rejected_future: u64,
    /// Tombstones removed by [`Ledger::expire`].
    pub tombstones_expired: u64,
    /// Quarantined entries dropped because a peer had forgotten them.
    pub suspects_dropped: u64,
    /// Events discarded because nobody polled them (replaced by [`LedgerEvent::Resync`]).
    pub events_dropped: u64,
    /// Entries refused because their writer does not own their key (see [`super::authority`]).
    pub not_owner: u64,
    /// Entries kept aside until their owner is known.
    pub deferred: u64,
    /// Entries refused because their writer was at its quota.
    pub rejected_quota: u64,
}

/// A change the rest of the node may react to; poll with [`Ledger::poll_event`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LedgerEvent {
    /// The visible value of `bucket/key` changed (set, changed or deleted).
    Changed {
        /// The bucket.
        bucket: String,
        /// The key.
        key: String,
    },
    /// Too many events were left unpolled and were dropped: re-read the whole ledger.
    Resync,
}

/// One stored entry and what the store keeps about it.
#[derive(Debug, Clone)]
pub(crate) struct Stored {
    pub(crate) entry: Entry,
    pub(crate) hash: [u8; 32],
    pub(crate) key_id: KeyId,
    /// Quarantined: possibly deleted elsewhere while this node was away (see the module doc).
    pub(crate) suspect: bool,
    /// The ledger's change number when this entry was stored.
    pub(crate) change: u64,
}

/// One bucket: its entries, the XOR of their hashes, and its change log.
#[derive(Debug, Clone, Default)]
pub(crate) struct Bucket {
    pub(crate) entries: BTreeMap<String, Stored>,
    pub(crate) hash: [u8; 32],
    /// The key of each stored entry by its change number ([`Stored::change`]).
    stored_log: BTreeMap<u64, String>,
    /// Keys removed outright (not replaced since), by the change number of the removal, at most
    /// [`MAX_REMOVAL_MARKS`].
    removal_log: BTreeMap<u64, String>,
    /// The change number of each key in `removal_log`.
    removed: BTreeMap<String, u64>,
    /// Changes up to this one may be missing from the logs (the bucket's creation, or a dropped
    /// removal mark): a reader must have seen at least this one to read on incrementally.
    floor: u64,
}

impl Bucket {
    /// Logs change `change` of `key`: stored (replacing `previous`, its earlier change number)
    /// or, with `stored` false, removed.
    fn log(&mut self, key: &str, change: u64, previous: Option<u64>, stored: bool) {
        if let Some(p) = previous {
            self.stored_log.remove(&p);
        }
        if let Some(r) = self.removed.remove(key) {
            self.removal_log.remove(&r);
        }
        if stored {
            self.stored_log.insert(change, key.to_owned());
            return;
        }
        self.removal_log.insert(change, key.to_owned());
        self.removed.insert(key.to_owned(), change);
        if self.removal_log.len() > MAX_REMOVAL_MARKS {
            if let Some((oldest, key)) = self.removal_log.pop_first() {
                self.removed.remove(&key);
                self.floor = self.floor.max(oldest);
            }
        }
    }
}

/// Which checks [`Ledger::admit`] runs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Admit {
    /// Verify the signature.
    pub(crate) verify: bool,
    /// Refuse versions past the future horizon.
    pub(crate) future: bool,
    /// The local time, when known (snapshots load without one).
    pub(crate) now: Option<u64>,
}

/// The replicated ledger (see the module documentation for the rules).
///
/// Call order for the node: [`apply`](Self::apply) entries from gossip, [`put`](Self::put) and
/// [`delete`](Self::delete) local writes, [`expire`](Self::expire) once in a while, drain
/// [`poll_event`](Self::poll_event) after each of those, run anti-entropy with
/// [`digest`](Self::digest) / [`summary_for`](Self::summary_for) /
/// [`reconcile`](Self::reconcile) / [`answer`](Self::answer), and [`save`](Self::save) after
/// changes.
#[derive(Debug, Clone)]
pub struct Ledger {
    pub(crate) buckets: BTreeMap<String, Bucket>,
    limits: Limits,
    entries: usize,
    bytes: usize,
    /// Highest versions stored, from two distinct writers (monotonic high-water marks).
    high: [Option<(Hlc, PeerId)>; 2],
    pub(crate) counters: Counters,
    events: VecDeque<LedgerEvent>,
    pub(crate) last_contact_ms: Option<u64>,
    pub(crate) quarantined_at: Option<u64>,
    pub(crate) suspects: usize,
    /// The ownership rule (`None`: every writer may write every key, as in plain stores).
    pub(crate) authority: Option<Authority>,
    /// uuid -> the peer bound to it and the version time of its announcement.
    pub(crate) bindings: BTreeMap<String, (PeerId, u64)>,
    /// Peers bound to at least one uuid, with how many.
    pub(crate) bound_peers: BTreeMap<PeerId, usize>,
    /// Entries whose owner is not known yet, oldest first.
    deferred: VecDeque<Entry>,
    /// The hashes of the deferred entries (a copy received again is found in O(log n): at
    /// formation each entry comes from several members while many wait for their owners).
    deferred_hashes: BTreeSet<[u8; 32]>,
    /// Deferred entries stored since [`Ledger::take_settled`] last ran (to gossip on).
    settled: Vec<Entry>,
    /// Per bucket, the newest `leader-auto` claim refused here (see [`Ledger::refused_claim`]).
    refused_claims: BTreeMap<String, Hlc>,
    /// What the next save must write (see [`super::journal`]).
    pub(crate) journal: JournalState,
    /// Entries and bytes held per writer (for the quotas).
    usage: BTreeMap<PeerId, (usize, usize)>,
    /// Per bound uuid, the latest sign of another peer using it (see [`Ledger::rival`]).
    rivals: BTreeMap<String, Rival>,
    /// The latest change number ([`Ledger::change_seq`]).
    change: u64,
    /// Buckets whose changes are logged for [`Ledger::changed_since`] ([`Ledger::follow`]).
    followed: BTreeSet<String>,
}

/// Another peer announcing or beating under a uuid bound to somebody else (a cloned disk, or
/// the same node before a wipe): what the latest of its signed entries showed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rival {
    /// The other peer.
    pub peer: PeerId,
    /// The version of its latest entry under the uuid.
    pub version: Hlc,
    /// Its latest announcement was a deletion: it gave the uuid up.
    pub released: bool,
}

impl Default for Ledger {
    fn default() -> Self {
        Self::new(Limits::default())
    }
}

fn xor_into(acc: &mut [u8; 32], h: &[u8; 32]) {
    for (a, b) in acc.iter_mut().zip(h) {
        *a ^= b;
    }
}

fn stored_size(e: &Entry) -> usize {
    e.encoded_len() + STORE_OVERHEAD
}

impl Ledger {
    /// An empty ledger.
    #[must_use]
    pub fn new(limits: Limits) -> Self {
        Self {
            buckets: BTreeMap::new(),
            limits,
            entries: 0,
            bytes: 0,
            high: [None, None],
            counters: Counters::default(),
            events: VecDeque::new(),
            last_contact_ms: None,
            quarantined_at: None,
            suspects: 0,
            authority: None,
            bindings: BTreeMap::new(),
            bound_peers: BTreeMap::new(),
            deferred: VecDeque::new(),
            deferred_hashes: BTreeSet::new(),
            settled: Vec::new(),
            refused_claims: BTreeMap::new(),
            journal: JournalState::default(),
            usage: BTreeMap::new(),
            rivals: BTreeMap::new(),
            change: 0,
            followed: BTreeSet::new(),
        }
    }

    /// Logs the changes of `bucket` from now on, for [`changed_since`](Self::changed_since)
    /// (a log costs a key and a map node per entry of the bucket).
    pub fn follow(&mut self, bucket: &str) {
        if self.followed.insert(bucket.to_owned()) {
            if let Some(b) = self.buckets.get_mut(bucket) {
                b.floor = self.change;
            }
        }
    }

    /// The number of the latest change (each entry stored or removed counts one; it only grows).
    #[must_use]
    pub fn change_seq(&self) -> u64 {
        self.change
    }

    /// The keys of `bucket` stored or removed after change `since` (a [`change_seq`] read
    /// earlier), each with the entry it holds now (`None`: removed), in change order; `None`
    /// when they are not all known (the bucket is not [followed](Self::follow), is gone or was
    /// created since, or older removal marks were dropped): read the whole bucket then.
    /// O(changes · log keys).
    ///
    /// [`change_seq`]: Self::change_seq
    #[must_use]
    pub fn changed_since(&self, bucket: &str, since: u64) -> Option<Vec<(&str, Option<&Entry>)>> {
        let b = self.buckets.get(bucket)?;
        if since < b.floor || !self.followed.contains(bucket) {
            return None;
        }
        let from = since.saturating_add(1);
        let mut changes: Vec<(u64, &str, Option<&Entry>)> = b
            .stored_log
            .range(from..)
            .map(|(c, k)| (*c, k.as_str(), b.entries.get(k).map(|s| &s.entry)))
            .chain(
                b.removal_log
                    .range(from..)
                    .map(|(c, k)| (*c, k.as_str(), None)),
            )
            .collect();
        changes.sort_unstable_by_key(|(c, _, _)| *c);
        Some(changes.into_iter().map(|(_, k, e)| (k, e)).collect())
    }

    /// The latest signs of another peer than the bound one using `uuid` (its announcement or its
    /// heartbeat, valid signatures only), if any.
    #[must_use]
    pub fn rival(&self, uuid: &str) -> Option<Rival> {
        self.rivals.get(uuid).copied()
    }

    /// Notes `entry` if it is another peer's announcement or heartbeat under a bound uuid.
    fn note_rival(&mut self, entry: &Entry, hash: [u8; 32]) {
        // Keys only the uuid's own node writes (not `-role`: the leader writes those).
        let own_suffixes = [
            super::names::IP_SUFFIX,
            crate::cluster::election::VOTE_SUFFIX,
            crate::cluster::election::BALLOT_SUFFIX,
        ];
        let uuid = match announced_uuid(&entry.bucket, &entry.key) {
            Some(u) => u,
            None if matches!(
                entry.bucket.as_str(),
                super::names::HEALTHCHECK | super::names::DHCP
            ) =>
            {
                entry.key.as_str()
            }
            None if entry.bucket != super::names::MACHINES => {
                match own_suffixes
                    .iter()
                    .find_map(|s| entry.key.strip_suffix(s).filter(|u| !u.is_empty()))
                {
                    Some(u) => u,
                    None => return,
                }
            }
            None => return,
        };
        let Some(bound) = self.bound_peer(uuid) else {
            return;
        };
        if bound == entry.writer
            || self
                .rivals
                .get(uuid)
                .is_some_and(|r| r.peer == entry.writer && r.version >= entry.version)
        {
            return;
        }
        if !known_valid(&hash) {
            if entry.verify().is_err() {
                return;
            }
            remember_valid(hash);
        }
        let released = announced_uuid(&entry.bucket, &entry.key).is_some() && entry.is_tombstone();
        let previous = self.rivals.get(uuid).filter(|r| r.peer == entry.writer);
        let released = if announced_uuid(&entry.bucket, &entry.key).is_none() {
            previous.is_some_and(|r| r.released)
        } else {
            released
        };
        self.rivals.insert(
            uuid.to_string(),
            Rival {
                peer: entry.writer,
                version: entry.version,
                released,
            },
        );
    }

    /// Enforces the ownership rule from now on, on every entry merged or written.
    pub fn set_authority(&mut self, authority: Authority) {
        self.authority = Some(authority);
    }

    /// The newest claim of `leader-auto` in `bucket` this ledger refused (a lower-ranked node
    /// claimed the lead while the holder was live here): the holder, if it still leads, claims
    /// again with a newer version, or the nodes that took the other claim would never come back.
    #[must_use]
    pub fn refused_claim(&self, bucket: &str) -> Option<Hlc> {
        self.refused_claims.get(bucket).copied()
    }

    /// Entries kept aside until their owner is known.
    #[must_use]
    pub fn deferred(&self) -> usize {
        self.deferred.len()
    }

    /// The bounds it was built with.
    #[must_use]
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// What it has done so far.
    #[must_use]
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Entries held, tombstones included.
    #[must_use]
    pub fn len(&self) -> usize {
        self.entries
    }

    /// True when nothing is held, not even a tombstone.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }

    /// Bytes held, as counted against [`Limits::max_total_bytes`].
    #[must_use]
    pub fn total_bytes(&self) -> usize {
        self.bytes
    }

    /// The highest version ever stored (a high-water mark; local writes stamp after it).
    #[must_use]
    pub fn max_version(&self) -> Hlc {
        self.high[0].map_or(Hlc::ZERO, |(v, _)| v)
    }

    /// Entries currently quarantined (see the module documentation).
    #[must_use]
    pub fn suspects(&self) -> usize {
        self.suspects
    }

    /// When this ledger last started an exchange with a peer, if ever.
    #[must_use]
    pub fn last_contact_ms(&self) -> Option<u64> {
        self.last_contact_ms
    }

    /// The visible value of `bucket/key` (a tombstone reads as absent).
    #[must_use]
    pub fn get(&self, bucket: &str, key: &str) -> Option<&[u8]> {
        self.entry(bucket, key).and_then(|e| e.value.as_deref())
    }

    /// The entry held for `bucket/key`, tombstones included.
    #[must_use]
    pub fn entry(&self, bucket: &str, key: &str) -> Option<&Entry> {
        self.buckets
            .get(bucket)
            .and_then(|b| b.entries.get(key))
            .map(|s| &s.entry)
    }

    /// The live `(key, value)` pairs of a bucket, in key order.
    pub fn bucket<'a>(&'a self, name: &str) -> impl Iterator<Item = (&'a str, &'a [u8])> + use<'a> {
        self.buckets
            .get(name)
            .into_iter()
            .flat_map(|b| b.entries.iter())
            .filter_map(|(k, s)| s.entry.value.as_deref().map(|v| (k.as_str(), v)))
    }

    /// Names of the buckets holding at least one live value, in order.
    pub fn buckets(&self) -> impl Iterator<Item = &str> {
        self.buckets
            .iter()
            .filter(|(_, b)| b.entries.values().any(|s| !s.entry.is_tombstone()))
            .map(|(n, _)| n.as_str())
    }

    /// Every entry held, tombstones included, in bucket then key order.
    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.buckets
            .values()
            .flat_map(|b| b.entries.values().map(|s| &s.entry))
    }

    /// The next change event, oldest first.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<LedgerEvent> {
        self.events.pop_front()
    }

    /// Merges an entry received from a peer: checks its shape, discards it if it does not win over
    /// what is held, verifies its signature, refuses it if its version is past the future horizon
    /// or the ledger is full, and stores it otherwise.
    pub fn apply(&mut self, entry: Entry, now_unix_ms: u64) -> Result<Applied, LedgerError> {
        self.admit(
            entry,
            Admit {
                verify: true,
                future: true,
                now: Some(now_unix_ms),
            },
        )
    }

    /// [`apply`](Self::apply) for an entry `from` relayed. An announcement or heartbeat under a
    /// uuid bound here to another peer, relayed by a third peer, shows that peer bound the uuid
    /// to the entry's writer: see [`Ledger::rival`]. (A writer sending its own entries shows
    /// nothing: a member can sign anything under any uuid, honest peers refuse to store it.)
    ///
    /// It takes the entry by reference and copies it only to store it: relayed entries are
    /// mostly copies of what is held (several members pass each one on), and those are
    /// discarded here without one.
    pub fn apply_from(
        &mut self,
        entry: &Entry,
        now_unix_ms: u64,
        from: &PeerId,
    ) -> Result<Applied, LedgerError> {
        if self.authority.is_some() && entry.writer != *from {
            self.note_rival(entry, entry.hash());
        }
        if let Err(e) = entry.check_shape(self.limits.max_value_bytes) {
            self.counters.invalid += 1;
            return Err(e);
        }
        if self.held_wins(entry, Some(now_unix_ms)) {
            self.counters.stale += 1;
            return Ok(Applied::Stale);
        }
        self.apply(entry.clone(), now_unix_ms)
    }

    /// Whether the entry held under `entry`'s key stays: `entry` does not win over it and
    /// may not take its place either (see [`Ledger::displaced_by`]).
    fn held_wins(&self, entry: &Entry, now: Option<u64>) -> bool {
        self.buckets
            .get(&entry.bucket)
            .and_then(|b| b.entries.get(&entry.key))
            .is_some_and(|old| self.keeps(&old.entry, entry, now))
    }

    /// Whether `held` stays when `entry` arrives for its key (see [`Ledger::held_wins`]).
    fn keeps(&self, held: &Entry, entry: &Entry, now: Option<u64>) -> bool {
        !entry.wins_over(held) && !self.displaced_by(held, &entry.writer, now)
    }

    /// [`apply`](Self::apply) for many entries; errors are counted, not returned.
    pub fn apply_all(
        &mut self,
        entries: impl IntoIterator<Item = Entry>,
        now_unix_ms: u64,
    ) -> ApplyReport {
        let mut report = ApplyReport::default();
        for e in entries {
            match self.apply(e, now_unix_ms) {
                Ok(Applied::New) => report.new += 1,
                Ok(Applied::Replaced) => report.replaced += 1,
                Ok(Applied::Stale) => report.stale += 1,
                Err(err) => {
                    log::debug!("ledger: refused an entry: {err}");
                    report.refused += 1;
                }
            }
        }
        report
    }

    /// Writes `bucket/key = value` as `identity`, stamped after everything the ledger holds, and
    /// returns the signed entry to gossip.
    pub fn put(
        &mut self,
        identity: &Identity,
        clock: &mut Clock,
        bucket: &str,
        key: &str,
        value: &[u8],
        unix_ms: u64,
    ) -> Result<Entry, LedgerError> {
        self.write(identity, clock, bucket, key, Some(value), unix_ms)
    }

    /// Deletes `bucket/key` by writing a tombstone (even when the key is not held here: a peer may
    /// hold it), and returns the signed tombstone to gossip.
    pub fn delete(
        &mut self,
        identity: &Identity,
        clock: &mut Clock,
        bucket: &str,
        key: &str,
        unix_ms: u64,
    ) -> Result<Entry, LedgerError> {
        self.write(identity, clock, bucket, key, None, unix_ms)
    }

    fn write(
        &mut self,
        identity: &Identity,
        clock: &mut Clock,
        bucket: &str,
        key: &str,
        value: Option<&[u8]>,
        unix_ms: u64,
    ) -> Result<Entry, LedgerError> {
        if let Some(v) = value {
            if v.len() > self.limits.max_value_bytes {
                return Err(LedgerError::ValueTooLarge {
                    len: v.len(),
                    max: self.limits.max_value_bytes,
                });
            }
        }
        clock.advance(self.max_version());
        let version = clock.tick(unix_ms);
        let entry = Entry::sign(identity, bucket, key, value, version)?;
        // Our own entry: signed just now, and our clock is the authority for our writes.
        self.admit(
            entry.clone(),
            Admit {
                verify: false,
                future: false,
                now: Some(unix_ms),
            },
        )?;
        Ok(entry)
    }

    /// Removes tombstones older than [`Limits::tombstone_lifetime_ms`] (by their version against
    /// `now_unix_ms`) and lifts a quarantine older than that; returns how many were removed.
    pub fn expire(&mut self, now_unix_ms: u64) -> usize {
        let dead: Vec<(String, String)> = self
            .buckets
            .iter()
            .flat_map(|(name, b)| {
                b.entries
                    .iter()
                    .filter(|(_, s)| {
                        s.entry.is_tombstone() && self.is_expired(s.entry.version, now_unix_ms)
                    })
                    .map(move |(k, _)| (name.clone(), k.clone()))
            })
            .collect();
        for (b, k) in &dead {
            self.remove(b, k);
        }
        self.counters.tombstones_expired += dead.len() as u64;
        if let Some(at) = self.quarantined_at {
            if now_unix_ms.saturating_sub(at) >= self.limits.tombstone_lifetime_ms {
                log::info!(
                    "ledger: lifting the quarantine of {} entries (no peer could judge them)",
                    self.suspects
                );
                for s in self
                    .buckets
                    .values_mut()
                    .flat_map(|b| b.entries.values_mut())
                {
                    s.suspect = false;
                }
                self.suspects = 0;
                self.quarantined_at = None;
            }
        }
        dead.len()
    }

    /// True when a version is older than the tombstone lifetime at `now`.
    pub(crate) fn is_expired(&self, version: Hlc, now: u64) -> bool {
        version
            .millis()
            .saturating_add(self.limits.tombstone_lifetime_ms)
            <= now
    }

    /// The latest acceptable version time for an entry by `writer`, or `None` when the wall
    /// clock is unset and nothing can be judged.
    fn future_limit(&self, now: u64, writer: &PeerId) -> Option<u64> {
        if !wall_clock_is_set(now) {
            return None;
        }
        let other = self
            .high
            .iter()
            .flatten()
            .find(|(_, w)| w != writer)
            .map_or(0, |(v, _)| v.millis());
        Some(now.max(other).saturating_add(self.limits.max_future_ms))
    }

    /// Raises the per-writer high-water marks (the two highest, from distinct writers).
    fn note_high(&mut self, version: Hlc, writer: PeerId) {
        let mut slots = self.high;
        if let Some(slot) = slots.iter_mut().flatten().find(|(_, w)| *w == writer) {
            slot.0 = slot.0.max(version);
        } else if slots[0].is_none() {
            slots[0] = Some((version, writer));
        } else if slots[1].is_none_or(|(v, _)| version > v) {
            slots[1] = Some((version, writer));
        }
        if let [Some(first), Some(second)] = slots {
            if second.0 > first.0 {
                slots.swap(0, 1);
            }
        }
        self.high = slots;
    }

    /// Merges one entry after the checks `admit` asks for.
    pub(crate) fn admit(&mut self, entry: Entry, admit: Admit) -> Result<Applied, LedgerError> {
        if let Err(e) = entry.check_shape(self.limits.max_value_bytes) {
            self.counters.invalid += 1;
            return Err(e);
        }
        let old = self
            .buckets
            .get(&entry.bucket)
            .and_then(|b| b.entries.get(&entry.key));
        // An older entry may still take the place of the held one (see
        // `Ledger::displaced_by`); it is authorized below like any other.
        if old.is_some_and(|old| self.keeps(&old.entry, &entry, admit.now)) {
            self.counters.stale += 1;
            return Ok(Applied::Stale);
        }
        let commit_before = (entry.key == MASTER_COMMIT)
            .then(|| self.committed_master(&entry.bucket))
            .flatten();
        let old_size = old.map(|o| stored_size(&o.entry));
        let visible_change = match old {
            Some(o) => o.entry.value != entry.value,
            None => entry.value.is_some(),
        };
        let hash = entry.hash();
        if admit.verify && !known_valid(&hash) {
            if let Err(e) = entry.verify() {
                match e {
                    LedgerError::BadSignature { .. } | LedgerError::BadWriterKey { .. } => {
                        self.counters.bad_signature += 1;
                    }
                    _ => self.counters.invalid += 1,
                }
                return Err(e);
            }
            remember_valid(hash);
        }
        if let Some(now) = admit.now {
            if admit.future {
                if let Some(limit_ms) = self.future_limit(now, &entry.writer) {
                    if entry.version.millis() > limit_ms {
                        self.counters.rejected_future += 1;
                        return Err(LedgerError::TooFarInFuture {
                            bucket: entry.bucket,
                            key: entry.key,
                            version: entry.version,
                            limit_ms,
                        });
                    }
                }
            }
            if old_size.is_none() && entry.is_tombstone() && self.is_expired(entry.version, now) {
                // It would be garbage at the next expiry: deleting what we never had.
                self.counters.stale += 1;
                return Ok(Applied::Stale);
            }
        }
        match self.authorize(&entry, admit.now) {
            Verdict::Allowed => {}
            Verdict::Unsettled if admit.verify => {
                log::debug!(
                    "ledger: {}/{} by {} waits until its owner is known",
                    entry.bucket,
                    entry.key,
                    entry.writer
                );
                if self.deferred_hashes.insert(hash) {
                    self.counters.deferred += 1;
                    if self.deferred.len() >= MAX_DEFERRED {
                        if let Some(oldest) = self.deferred.pop_front() {
                            self.deferred_hashes.remove(&oldest.hash());
                        }
                    }
                    self.deferred.push_back(entry);
                }
                return Ok(Applied::Stale);
            }
            verdict => {
                let reason = match verdict {
                    Verdict::NotOwner(r) => r,
                    _ => "its owner is not known yet",
                };
                self.counters.not_owner += 1;
                if entry.key == super::names::LEADER_AUTO && entry.value.is_some() {
                    let newest = self
                        .refused_claims
                        .entry(entry.bucket.clone())
                        .or_insert(entry.version);
                    *newest = (*newest).max(entry.version);
                }
                log::debug!(
                    "ledger: dropped {}/{} by {}: not the owner ({reason})",
                    entry.bucket,
                    entry.key,
                    entry.writer
                );
                return Err(LedgerError::NotOwner {
                    bucket: entry.bucket,
                    key: entry.key,
                    writer: entry.writer,
                    reason,
                });
            }
        }
        let size = stored_size(&entry);
        let (mut writer_entries, mut writer_bytes) =
            self.usage.get(&entry.writer).copied().unwrap_or_default();
        let replaces_own = old.is_some_and(|o| o.entry.writer == entry.writer);
        let other_writer = old
            .filter(|o| o.entry.writer != entry.writer)
            .map(|o| (o.entry.writer, stored_size(&o.entry)));
        if replaces_own {
            writer_bytes = writer_bytes.saturating_sub(old_size.unwrap_or(0));
        } else {
            writer_entries += 1;
        }
        writer_bytes += size;
        let grows = !replaces_own || Some(size) > old_size;
        if grows
            && (writer_entries > self.limits.max_writer_entries
                || writer_bytes > self.limits.max_writer_bytes)
        {
            self.counters.rejected_quota += 1;
            return Err(LedgerError::OverQuota {
                bucket: entry.bucket,
                key: entry.key,
                writer: entry.writer,
                entries: writer_entries,
                bytes: writer_bytes,
            });
        }
        let bytes_after = self.bytes.saturating_sub(old_size.unwrap_or(0)) + size;
        let over_count = old_size.is_none() && self.entries >= self.limits.max_entries;
        let over_bytes = bytes_after > self.limits.max_total_bytes && bytes_after > self.bytes;
        if over_count || over_bytes {
            self.counters.rejected_full += 1;
            return Err(LedgerError::Full {
                bucket: entry.bucket,
                key: entry.key,
                entries: self.entries,
                bytes: self.bytes,
            });
        }

        self.note_high(entry.version, entry.writer);
        if let Some((w, size)) = other_writer {
            self.release_usage(&w, size);
        }
        self.usage
            .insert(entry.writer, (writer_entries, writer_bytes));
        let key_id = KeyId::of(&entry.key);
        let (bucket_name, key) = (entry.bucket.clone(), entry.key.clone());
        let floor = self.change;
        self.change += 1;
        let change = self.change;
        let bucket = self
            .buckets
            .entry(bucket_name.clone())
            .or_insert_with(|| Bucket {
                floor,
                ..Bucket::default()
            });
        xor_into(&mut bucket.hash, &hash);
        let stored = Stored {
            entry,
            hash,
            key_id,
            suspect: false,
            change,
        };
        let previous = bucket.entries.insert(key.clone(), stored);
        if self.followed.contains(&bucket_name) {
            bucket.log(&key, change, previous.as_ref().map(|p| p.change), true);
        }
        let applied = match previous {
            Some(prev) => {
                xor_into(&mut bucket.hash, &prev.hash);
                if prev.suspect {
                    self.suspects = self.suspects.saturating_sub(1);
                }
                Applied::Replaced
            }
            None => {
                self.entries += 1;
                Applied::New
            }
        };
        self.bytes = bytes_after;
        self.counters.applied += 1;
        self.journal
            .dirty
            .insert((bucket_name.clone(), key.clone()));
        let settles = Self::settles_others(&self.buckets[&bucket_name].entries[&key].entry);
        if let Some(uuid) = announced_uuid(&bucket_name, &key) {
            let e = &self.buckets[&bucket_name].entries[&key].entry;
            let (writer, at, gone) = (e.writer, e.version.millis(), e.is_tombstone());
            if gone {
                // The owner deleted its announcement: it gives the uuid up.
                if self.bound_peer(uuid) == Some(writer) {
                    self.bindings.remove(uuid);
                    self.unbind_peer(&writer);
                }
            } else {
                self.bind(uuid, writer, at);
            }
        }
        let commit_changed =
            key == MASTER_COMMIT && self.committed_master(&bucket_name) != commit_before;
        if visible_change {
            self.push_event(LedgerEvent::Changed {
                bucket: bucket_name.clone(),
                key,
            });
        }
        if commit_changed {
            self.drop_disowned_master_keys(&bucket_name, admit.now);
        }
        if settles && !self.deferred.is_empty() {
            self.retry_deferred(admit.now);
        }
        Ok(applied)
    }

    /// Takes one entry of `size` bytes off `writer`'s usage.
    fn release_usage(&mut self, writer: &PeerId, size: usize) {
        if let Some((n, b)) = self.usage.get_mut(writer) {
            *n = n.saturating_sub(1);
            *b = b.saturating_sub(size);
            if *n == 0 {
                self.usage.remove(writer);
            }
        }
    }

    /// Entries and bytes held from `writer`.
    #[must_use]
    pub fn usage_of(&self, writer: &PeerId) -> (usize, usize) {
        self.usage.get(writer).copied().unwrap_or_default()
    }

    /// Records that `uuid` is bound to `peer` (announced at `at_ms`).
    fn bind(&mut self, uuid: &str, peer: PeerId, at_ms: u64) {
        if let Some((old, _)) = self.bindings.insert(uuid.to_string(), (peer, at_ms)) {
            self.unbind_peer(&old);
        }
        *self.bound_peers.entry(peer).or_default() += 1;
    }

    fn unbind_peer(&mut self, peer: &PeerId) {
        if let Some(n) = self.bound_peers.get_mut(peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.bound_peers.remove(peer);
            }
        }
    }

    /// Merges again the deferred entries whose owner may now be known.
    fn retry_deferred(&mut self, now: Option<u64>) {
        let waiting: Vec<Entry> = self.deferred.drain(..).collect();
        self.deferred_hashes.clear();
        let admit = Admit {
            verify: true,
            future: false,
            now,
        };
        for e in waiting {
            // A still-unsettled entry goes back in the queue; refusals are counted inside.
            if let Ok(Applied::New | Applied::Replaced) = self.admit(e.clone(), admit) {
                if self.settled.len() < MAX_DEFERRED {
                    self.settled.push(e);
                }
            }
        }
    }

    /// The deferred entries stored since the last call (gossip them on like fresh entries).
    pub fn take_settled(&mut self) -> Vec<Entry> {
        std::mem::take(&mut self.settled)
    }

    /// Removes one key outright (expiry, quarantine); returns what was held.
    pub(crate) fn remove(&mut self, bucket: &str, key: &str) -> Option<Entry> {
        let b = self.buckets.get_mut(bucket)?;
        let s = b.entries.remove(key)?;
        xor_into(&mut b.hash, &s.hash);
        self.change += 1;
        if self.followed.contains(bucket) {
            b.log(key, self.change, Some(s.change), false);
        }
        self.journal.needs_full = true;
        if let Some(uuid) = announced_uuid(bucket, key) {
            if self
                .bindings
                .get(uuid)
                .is_some_and(|(p, _)| *p == s.entry.writer)
            {
                self.bindings.remove(uuid);
                self.unbind_peer(&s.entry.writer);
            }
        }
        let b = self.buckets.get_mut(bucket)?;
        if b.entries.is_empty() {
            self.buckets.remove(bucket);
        }
        self.entries = self.entries.saturating_sub(1);
        self.bytes = self.bytes.saturating_sub(stored_size(&s.entry));
        self.release_usage(&s.entry.writer, stored_size(&s.entry));
        if s.suspect {
            self.suspects = self.suspects.saturating_sub(1);
        }
        Some(s.entry)
    }

    /// Sets or clears the quarantine flag of one entry.
    pub(crate) fn set_suspect(&mut self, bucket: &str, key: &str, suspect: bool) {
        let Some(s) = self
            .buckets
            .get_mut(bucket)
            .and_then(|b| b.entries.get_mut(key))
        else {
            return;
        };
        if s.suspect != suspect {
            s.suspect = suspect;
            self.journal
                .dirty
                .insert((bucket.to_string(), key.to_string()));
            if suspect {
                self.suspects += 1;
            } else {
                self.suspects = self.suspects.saturating_sub(1);
            }
        }
        if self.suspects == 0 {
            self.quarantined_at = None;
        }
    }

    /// Records the start of an exchange with a peer and returns until when this ledger was in
    /// contact before it (0 if never): entries older than that which it lacks were most likely
    /// deleted here and forgotten (see [`Summary::synced_until`](super::Summary::synced_until)).
    ///
    /// After more than half the tombstone lifetime without contact, every entry older than the
    /// previous contact is quarantined first: peers held those entries then, so a peer lacking one
    /// now has most likely deleted and forgotten it. Entries written since (our own, while alone)
    /// are not suspect. Nothing is quarantined while the wall clock is unset.
    pub(crate) fn note_contact(&mut self, now: u64) -> u64 {
        let half = self.limits.tombstone_lifetime_ms / 2;
        let Some(last) = self.last_contact_ms else {
            self.last_contact_ms = Some(now);
            return 0;
        };
        let away = now.saturating_sub(last) > half;
        if away && wall_clock_is_set(now) {
            let mut marked = 0;
            for s in self
                .buckets
                .values_mut()
                .flat_map(|b| b.entries.values_mut())
            {
                if !s.suspect && s.entry.version.millis() < last {
                    s.suspect = true;
                    marked += 1;
                }
            }
            if marked > 0 {
                log::info!(
                    "ledger: out of contact for {} s; quarantining {marked} older entries",
                    now.saturating_sub(last) / 1000
                );
                self.suspects += marked;
                self.quarantined_at = Some(now);
            }
        }
        self.last_contact_ms = Some(last.max(now));
        if away { last } else { now.max(last) }
    }

    /// Drops a quarantined entry a peer does not hold (it was probably deleted while we were away).
    pub(crate) fn drop_suspect(&mut self, bucket: &str, key: &str) {
        if let Some(e) = self.remove(bucket, key) {
            self.counters.suspects_dropped += 1;
            log::info!("ledger: dropped {bucket}/{key}, unknown to the network after our absence");
            if e.value.is_some() {
                self.push_event(LedgerEvent::Changed {
                    bucket: bucket.to_owned(),
                    key: key.to_owned(),
                });
            }
        }
        if self.suspects == 0 {
            self.quarantined_at = None;
        }
    }

    pub(crate) fn push_event(&mut self, event: LedgerEvent) {
        if self.events.len() >= self.limits.max_entries.max(1) {
            self.counters.events_dropped += self.events.len() as u64;
            self.events.clear();
            self.events.push_back(LedgerEvent::Resync);
        }
        self.events.push_back(event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_760_000_000_000;

    fn id(n: u8) -> Identity {
        Identity::from_seed([n; 32])
    }

    fn signed(i: &Identity, bucket: &str, key: &str, value: Option<&[u8]>, ms: u64) -> Entry {
        Entry::sign(i, bucket, key, value, Hlc::new(ms, 0)).unwrap()
    }

    #[test]
    fn apply_new_replaced_stale_and_events() {
        let mut l = Ledger::default();
        let a = signed(&id(1), "kairos", "k", Some(b"1"), NOW);
        let b = signed(&id(1), "kairos", "k", Some(b"2"), NOW + 1);
        assert_eq!(l.apply(a.clone(), NOW).unwrap(), Applied::New);
        assert_eq!(l.apply(b.clone(), NOW).unwrap(), Applied::Replaced);
        assert_eq!(l.apply(a, NOW).unwrap(), Applied::Stale);
        assert_eq!(l.apply(b, NOW).unwrap(), Applied::Stale);
        assert_eq!(l.get("kairos", "k"), Some(&b"2"[..]));
        let changed = |k: &str| LedgerEvent::Changed {
            bucket: "kairos".into(),
            key: k.into(),
        };
        assert_eq!(l.poll_event(), Some(changed("k")));
        assert_eq!(l.poll_event(), Some(changed("k")));
        assert_eq!(l.poll_event(), None);
        assert_eq!(l.counters().applied, 2);
        assert_eq!(l.counters().stale, 2);
    }
}
