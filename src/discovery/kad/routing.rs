//! Node ids, XOR distance and the k-bucket routing table.
//!
//! A [`NodeId`] is SHA-256 of the peer's public key: ed25519 public keys are not uniformly
//! distributed bit strings, their hash is, so buckets fill evenly and an attacker cannot place an
//! id next to a chosen target without a preimage search (cost about 2^b hashes for b shared
//! leading bits).
//!
//! Bucket `i` holds the peers whose distance from us has exactly `i` leading zero bits: bucket 0
//! is the far half of the id space, bucket 255 the single closest id. Each bucket keeps at most
//! `k` entries, least recently seen first. When a new peer arrives at a full bucket the table
//! keeps it as the bucket's single *candidate* and asks the caller to ping the oldest entry
//! ([`Insert::PingOldest`]): if the oldest answers (any message from it refreshes it) the
//! candidate is dropped, if it times out the caller calls [`RoutingTable::remove`] and the
//! candidate takes its place. Long-lived peers are thus preferred over newcomers, which is both
//! what churn measurements favour and what makes flooding the table with fresh ids useless.
//!
//! Memory: at most 256 buckets of `k` (≤ [`MAX_K`]) entries plus one candidate each, about
//! 90 bytes per entry: ≤ 256 × 21 × 90 B ≈ 480 KiB in the worst case, and in practice
//! log2(network size) + a few non-empty buckets (a few KiB): buckets exist up to the deepest one
//! used (256 empty ones cost 43 KB per node, which a 1,000-node simulation felt).

use std::fmt;
use std::net::SocketAddr;
use std::time::Instant;

use sha2::{Digest, Sha256};

use crate::identity::PeerId;
use crate::rng::Rng;

/// Bits in a node id (and number of buckets).
pub const ID_BITS: usize = 256;

/// Default bucket size and replication factor.
///
/// 8, as in BitTorrent's Mainline DHT rather than the paper's 20: our networks are small
/// (a handful to a few hundred boards), so 8 per bucket already holds every peer of the deep
/// buckets that matter; every record is stored on 8 nodes, which survives any 7 of them leaving
/// within a republish period (boards rebooting for upgrades leave one or two at a time); and a
/// lookup message carrying 8 node entries stays far below the 1200-byte datagram cap. It also
/// keeps the per-node routing table and the fan-out of every PUT small on 512 MB boards.
pub const DEFAULT_K: usize = 8;

/// Largest bucket size accepted in the settings (and node entries per wire message).
pub const MAX_K: usize = 20;

/// A 256-bit Kademlia node id: SHA-256 of the peer's public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub [u8; 32]);

impl NodeId {
    /// The node id of `peer`.
    #[must_use]
    pub fn of_peer(peer: &PeerId) -> NodeId {
        NodeId(Sha256::digest(peer.as_bytes()).into())
    }

    /// XOR distance to `other`.
    #[must_use]
    pub fn distance(&self, other: &NodeId) -> Distance {
        let mut d = [0u8; 32];
        for (out, (a, b)) in d.iter_mut().zip(self.0.iter().zip(other.0.iter())) {
            *out = a ^ b;
        }
        Distance(d)
    }

    /// The bucket `other` falls into from our point of view, or `None` when it is our own id.
    #[must_use]
    pub fn bucket_of(&self, other: &NodeId) -> Option<usize> {
        let lz = self.distance(other).leading_zeros();
        (lz < ID_BITS).then_some(lz)
    }

    /// A random id whose distance from `self` falls in bucket `index` (`index` < 256; larger
    /// values are treated as 255): the first `index` bits equal ours, bit `index` differs, the
    /// rest is random. Used to refresh a bucket.
    #[must_use]
    pub fn random_in_bucket(&self, index: usize, rng: &mut Rng) -> NodeId {
        let index = index.min(ID_BITS - 1);
        let mut noise = [0u8; 32];
        rng.fill(&mut noise);
        let mut out = self.0;
        for (i, (o, n)) in out.iter_mut().zip(noise.iter()).enumerate() {
            for bit in 0..8 {
                let pos = i * 8 + bit;
                let mask = 0x80u8 >> bit;
                if pos == index {
                    *o ^= mask;
                } else if pos > index {
                    *o = (*o & !mask) | (n & mask);
                }
            }
        }
        NodeId(out)
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId(")?;
        for b in &self.0[..6] {
            write!(f, "{b:02x}")?;
        }
        write!(f, "..)")
    }
}

/// XOR distance between two ids; orders as a 256-bit big-endian number.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub struct Distance(pub [u8; 32]);

impl Distance {
    /// Leading zero bits (256 for distance zero).
    #[must_use]
    pub fn leading_zeros(&self) -> usize {
        let mut n = 0;
        for b in &self.0 {
            if *b == 0 {
                n += 8;
            } else {
                return n + b.leading_zeros() as usize;
            }
        }
        n
    }
}

/// A peer in the routing table.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Entry {
    /// The peer's identity.
    pub peer: PeerId,
    /// Its node id (SHA-256 of `peer`).
    pub id: NodeId,
    /// The address we last heard it from.
    pub addr: SocketAddr,
}

impl Entry {
    /// An entry for `peer` at `addr`.
    #[must_use]
    pub fn new(peer: PeerId, addr: SocketAddr) -> Entry {
        Entry {
            peer,
            id: NodeId::of_peer(&peer),
            addr,
        }
    }
}

/// What [`RoutingTable::insert`] did.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Insert {
    /// The peer was new and the bucket had room.
    Added,
    /// The peer was known: it moved to the most-recently-seen end.
    Refreshed,
    /// The bucket is full: the peer waits as candidate; ping `oldest` and call
    /// [`RoutingTable::remove`] with it if it does not answer.
    PingOldest {
        /// The least recently seen entry of the bucket.
        oldest: Entry,
    },
    /// The bucket is full and its oldest entry is already being pinged; the peer replaced the
    /// previous candidate.
    Queued,
    /// The peer is ourselves; nothing stored.
    Ignored,
}

#[derive(Debug, Default)]
struct Bucket {
    /// Least recently seen first.
    entries: Vec<Entry>,
    /// A peer waiting for a slot, and the entry being pinged to decide.
    candidate: Option<(Entry, PeerId)>,
    /// When a lookup last targeted this bucket.
    last_lookup: Option<Instant>,
}

/// The k-bucket routing table of one node.
#[derive(Debug)]
pub struct RoutingTable {
    me: NodeId,
    k: usize,
    /// Up to the deepest bucket used; those beyond are empty.
    buckets: Vec<Bucket>,
    len: usize,
}

impl RoutingTable {
    /// An empty table for the node `me` with buckets of `k` entries (clamped to 1..=[`MAX_K`]).
    #[must_use]
    pub fn new(me: NodeId, k: usize) -> RoutingTable {
        RoutingTable {
            me,
            k: k.clamp(1, MAX_K),
            buckets: Vec::new(),
            len: 0,
        }
    }

    /// Our own id.
    #[must_use]
    pub fn local_id(&self) -> NodeId {
        self.me
    }

    /// Bucket size.
    #[must_use]
    pub fn k(&self) -> usize {
        self.k
    }

    /// Entries stored (candidates not counted).
    #[must_use]
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no peer is known.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The entry for `peer`, if stored.
    #[must_use]
    pub fn get(&self, peer: &PeerId) -> Option<&Entry> {
        let id = NodeId::of_peer(peer);
        let bucket = self.buckets.get(self.me.bucket_of(&id)?)?;
        bucket.entries.iter().find(|e| e.peer == *peer)
    }

    /// Every stored entry, bucket by bucket.
    pub fn iter(&self) -> impl Iterator<Item = &Entry> {
        self.buckets.iter().flat_map(|b| b.entries.iter())
    }

    /// Records that `peer` was seen at `addr` (a message came from it). A known peer keeps its
    /// stored address: only eviction replaces it, so a spoofed datagram cannot redirect it.
    pub fn insert(&mut self, peer: PeerId, addr: SocketAddr) -> Insert {
        let entry = Entry::new(peer, addr);
        let Some(index) = self.me.bucket_of(&entry.id) else {
            return Insert::Ignored;
        };
        let k = self.k;
        let bucket = self.bucket_mut(index);
        if let Some(pos) = bucket.entries.iter().position(|e| e.peer == peer) {
            let known = bucket.entries.remove(pos);
            bucket.entries.push(known);
            if bucket
                .candidate
                .as_ref()
                .is_some_and(|(_, oldest)| *oldest == peer)
            {
                // The entry being pinged is alive: it stays, the candidate goes.
                bucket.candidate = None;
            }
            return Insert::Refreshed;
        }
        if bucket.entries.len() < k {
            bucket.entries.push(entry);
            self.len += 1;
            return Insert::Added;
        }
        match &mut bucket.candidate {
            Some((candidate, _)) => {
                *candidate = entry;
                Insert::Queued
            }
            None => {
                let Some(oldest) = bucket.entries.first().copied() else {
                    return Insert::Ignored;
                };
                bucket.candidate = Some((entry, oldest.peer));
                Insert::PingOldest { oldest }
            }
        }
    }

    /// Forgets `peer` (it failed to answer). If its bucket has a candidate, the candidate takes
    /// the slot. Returns true when the peer was stored.
    pub fn remove(&mut self, peer: &PeerId) -> bool {
        let id = NodeId::of_peer(peer);
        let Some(bucket) = self.me.bucket_of(&id).and_then(|i| self.buckets.get_mut(i)) else {
            return false;
        };
        let Some(pos) = bucket.entries.iter().position(|e| e.peer == *peer) else {
            if bucket
                .candidate
                .as_ref()
                .is_some_and(|(c, _)| c.peer == *peer)
            {
                bucket.candidate = None;
            }
            return false;
        };
        bucket.entries.remove(pos);
        self.len -= 1;
        if let Some((candidate, _)) = bucket.candidate.take() {
            bucket.entries.push(candidate);
            self.len += 1;
        }
        true
    }

    /// The `n` stored entries closest to `target`, closest first.
    #[must_use]
    pub fn closest(&self, target: &NodeId, n: usize) -> Vec<Entry> {
        let mut all: Vec<Entry> = self.iter().copied().collect();
        all.sort_by_key(|e| e.id.distance(target));
        all.truncate(n);
        all
    }

    /// Index of the deepest (closest to us) non-empty bucket.
    #[must_use]
    pub fn deepest_bucket(&self) -> Option<usize> {
        self.buckets.iter().rposition(|b| !b.entries.is_empty())
    }

    /// Notes that a lookup for `target` started, which counts as refreshing its bucket.
    pub fn touch(&mut self, target: &NodeId, now: Instant) {
        if let Some(index) = self.me.bucket_of(target) {
            self.bucket_mut(index).last_lookup = Some(now);
        }
    }

    /// Bucket `index` (below [`ID_BITS`]), made with those before it if they were not yet.
    fn bucket_mut(&mut self, index: usize) -> &mut Bucket {
        if self.buckets.len() <= index {
            self.buckets.resize_with(index + 1, Bucket::default);
        }
        &mut self.buckets[index]
    }

    /// Buckets `0..=deepest` that no lookup targeted within `interval` before `now`.
    #[must_use]
    pub fn stale_buckets(&self, now: Instant, interval: std::time::Duration) -> Vec<usize> {
        let Some(deepest) = self.deepest_bucket() else {
            return Vec::new();
        };
        (0..=deepest)
            .filter(|&i| {
                self.buckets.get(i).is_some_and(|b| {
                    b.last_lookup
                        .is_none_or(|t| now.saturating_duration_since(t) >= interval)
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(n: u64) -> PeerId {
        let mut b = [0u8; 32];
        b[..8].copy_from_slice(&n.to_be_bytes());
        PeerId(b)
    }

    fn addr(n: u64) -> SocketAddr {
        SocketAddr::from(([10, 0, (n >> 8) as u8, n as u8], 7000))
    }

    #[test]
    fn distance_orders_numerically_and_buckets_count_leading_zeros() {
        let a = NodeId([0; 32]);
        let mut b = [0u8; 32];
        b[0] = 0x80;
        assert_eq!(a.bucket_of(&NodeId(b)), Some(0));
        b[0] = 0x01;
        assert_eq!(a.bucket_of(&NodeId(b)), Some(7));
        let mut c = [0u8; 32];
        c[31] = 1;
        assert_eq!(a.bucket_of(&NodeId(c)), Some(255));
        assert_eq!(a.bucket_of(&a), None);
        assert!(a.distance(&NodeId(c)) < a.distance(&NodeId(b)));
        assert_eq!(a.distance(&a).leading_zeros(), 256);
    }

    #[test]
    fn random_in_bucket_lands_in_that_bucket() {
        let mut rng = Rng::from_seed(1);
        let me = NodeId::of_peer(&peer(1));
        for i in [0, 1, 7, 8, 9, 100, 255] {
            for _ in 0..20 {
                assert_eq!(me.bucket_of(&me.random_in_bucket(i, &mut rng)), Some(i));
            }
        }
    }

    #[test]
    fn full_bucket_pings_oldest_then_keeps_it_if_alive_or_evicts_it() {
        let me = NodeId([0; 32]);
        let mut table = RoutingTable::new(me, 2);
        // Find three peers in bucket 0.
        let in_b0: Vec<PeerId> = (0..)
            .map(peer)
            .filter(|p| me.bucket_of(&NodeId::of_peer(p)) == Some(0))
            .take(4)
            .collect();
        assert_eq!(table.insert(in_b0[0], addr(0)), Insert::Added);
        assert_eq!(table.insert(in_b0[1], addr(1)), Insert::Added);
        let oldest = Entry::new(in_b0[0], addr(0));
        assert_eq!(
            table.insert(in_b0[2], addr(2)),
            Insert::PingOldest { oldest }
        );
        assert_eq!(table.insert(in_b0[3], addr(3)), Insert::Queued);
        // Oldest answers: stays (now most recent), candidate dropped.
        assert_eq!(table.insert(in_b0[0], addr(9)), Insert::Refreshed);
        assert_eq!(
            table.get(&in_b0[0]).map(|e| e.addr),
            Some(addr(0)),
            "address not redirected"
        );
        assert!(!table.remove(&in_b0[3]));
        assert_eq!(table.len(), 2);
        // Now in_b0[1] is oldest; new peer waits; oldest times out; candidate takes its slot.
        let oldest = Entry::new(in_b0[1], addr(1));
        assert_eq!(
            table.insert(in_b0[2], addr(2)),
            Insert::PingOldest { oldest }
        );
        assert!(table.remove(&in_b0[1]));
        assert!(table.get(&in_b0[2]).is_some());
        assert!(table.get(&in_b0[1]).is_none());
        assert_eq!(table.len(), 2);
    }

    #[test]
    fn closest_matches_brute_force() {
        let mut rng = Rng::from_seed(5);
        let me = NodeId::of_peer(&peer(0));
        let mut table = RoutingTable::new(me, 8);
        let mut stored = Vec::new();
        for n in 1..400 {
            if let Insert::Added = table.insert(peer(n), addr(n)) {
                stored.push(Entry::new(peer(n), addr(n)));
            }
        }
        assert_eq!(table.len(), stored.len());
        for _ in 0..50 {
            let mut t = [0u8; 32];
            rng.fill(&mut t);
            let target = NodeId(t);
            let mut brute = stored.clone();
            brute.sort_by_key(|e| e.id.distance(&target));
            brute.truncate(8);
            assert_eq!(table.closest(&target, 8), brute);
        }
    }

    #[test]
    fn own_id_is_ignored_and_stale_buckets_are_reported() {
        let me_peer = peer(42);
        let me = NodeId::of_peer(&me_peer);
        let mut table = RoutingTable::new(me, 8);
        assert_eq!(table.insert(me_peer, addr(1)), Insert::Ignored);
        assert!(
            table
                .stale_buckets(Instant::now(), std::time::Duration::from_secs(1))
                .is_empty()
        );
        for n in 0..50 {
            table.insert(peer(n), addr(n));
        }
        let now = Instant::now();
        let deepest = table.deepest_bucket().unwrap_or(0);
        assert_eq!(
            table
                .stale_buckets(now, std::time::Duration::from_secs(60))
                .len(),
            deepest + 1
        );
        table.touch(&me.random_in_bucket(0, &mut Rng::from_seed(1)), now);
        assert_eq!(
            table
                .stale_buckets(now, std::time::Duration::from_secs(60))
                .len(),
            deepest
        );
    }
}
