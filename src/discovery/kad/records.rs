//! Rendezvous records (sealed member addresses) and the bounded record store every DHT node
//! keeps for others.
//!
//! # Records
//!
//! Members of one network meet under the DHT key `KeySchedule::rendezvous_key(w)` of the
//! current DHT window `w`: 32 pseudorandom bytes that reveal nothing about the token. The value
//! each member stores there is sealed with ChaCha20-Poly1305 under
//! `KeySchedule::rendezvous_seal_key(w)`:
//!
//! ```text
//! sealed    = nonce [12] || ciphertext || tag [16]
//! plaintext = version u8 (1) || member peer id [32] || published_at u64 (unix seconds)
//!             || count u16 (≤ 8) || count × address (tag 4|6, address, port)
//! aad       = "kairos-p2p v1 rendezvous record" || rendezvous_key(w)
//! nonce     = SHA-256("kairos-p2p v1 record nonce" || seal key || 16 random bytes
//!             || plaintext)[..12]
//! ```
//!
//! The nonce is synthetic: even if the seeded generator repeated itself, two different
//! plaintexts never share a nonce (the only failure that breaks ChaCha20-Poly1305). The AAD
//! binds a record to its DHT key, so a record copied under another key does not open. A DHT
//! node without the token can neither read nor forge a record. A token member could claim
//! another member's peer id in a record; that only makes the overlay dial an address whose
//! QUIC handshake then fails, since the handshake proves the peer id. Records carry no expiry
//! check against the local clock (boards without a real-time clock would reject each other);
//! the storing nodes' TTL and the window rotation bound how stale a replayed record can be.
//!
//! # Store
//!
//! Each DHT node stores records for any key, because it serves many networks. Memory is
//! bounded by [`StoreLimits`]: records per key (64, the oldest record of the source holding
//! the most records for the key is evicted), keys (4,096), accounted bytes (4 MiB including a
//! fixed per-record and per-key overhead; PUTs beyond it are refused with `Full`), TTL (capped
//! at one hour), and a per-source-IP PUT rate (10 per minute, burst 10) in a table of 1,024
//! sources. One record per (publisher, source IP) per key: a republish replaces the previous
//! record; a PUT claiming a member's peer id from another address adds a record instead of
//! replacing the member's.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use chacha20poly1305::aead::{Aead, Payload};
use chacha20poly1305::{ChaCha20Poly1305, KeyInit, Nonce};
use sha2::{Digest, Sha256};

use super::limit::{Limiter, Rate};
use super::message::{MAX_RECORD_LEN, PutStatus};
use crate::identity::PeerId;
use crate::rng::Rng;
use crate::token::{KeySchedule, Window};
use crate::wire::{Reader, WireError, Writer};

/// Version byte inside the sealed plaintext.
pub const RECORD_VERSION: u8 = 1;
/// Largest number of addresses in a rendezvous record.
pub const MAX_RECORD_ADDRS: usize = 8;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
const AAD_LABEL: &[u8] = b"kairos-p2p v1 rendezvous record";
const NONCE_LABEL: &[u8] = b"kairos-p2p v1 record nonce";

/// A member's announcement: who it is and where it can be reached.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct RendezvousRecord {
    /// The member's peer id.
    pub peer: PeerId,
    /// Addresses it is reachable at (≤ [`MAX_RECORD_ADDRS`]).
    pub addrs: Vec<SocketAddr>,
    /// When it sealed the record (its own clock, unix seconds).
    pub published_at: u64,
}

/// Why a record could not be sealed or opened.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum RecordError {
    /// More than [`MAX_RECORD_ADDRS`] addresses.
    TooManyAddrs(usize),
    /// Shorter than a nonce and a tag, or longer than [`MAX_RECORD_LEN`].
    BadLength(usize),
    /// Authentication failed: another network's record, another window's, or tampered with.
    Unauthentic,
    /// Authentic, but the plaintext does not decode (a newer record version, or a bug).
    Malformed(WireError),
}

impl fmt::Display for RecordError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooManyAddrs(n) => write!(f, "record: {n} addresses, at most {MAX_RECORD_ADDRS}"),
            Self::BadLength(n) => write!(f, "record: sealed length {n} out of range"),
            Self::Unauthentic => f.write_str("record: does not open under this network's key"),
            Self::Malformed(e) => write!(f, "record: {e}"),
        }
    }
}

impl std::error::Error for RecordError {}

fn aad(keys: &KeySchedule, window: Window) -> Vec<u8> {
    let mut aad = AAD_LABEL.to_vec();
    aad.extend_from_slice(&keys.rendezvous_key(window));
    aad
}

/// Seals `record` for DHT window `window` of the network whose key schedule is `keys`.
pub fn seal_record(
    keys: &KeySchedule,
    window: Window,
    record: &RendezvousRecord,
    rng: &mut Rng,
) -> Result<Vec<u8>, RecordError> {
    if record.addrs.len() > MAX_RECORD_ADDRS {
        return Err(RecordError::TooManyAddrs(record.addrs.len()));
    }
    let mut plain = Vec::with_capacity(64);
    let mut w = Writer::new(&mut plain);
    w.u8(RECORD_VERSION)
        .peer_id(&record.peer)
        .u64(record.published_at);
    w.count("addresses", MAX_RECORD_ADDRS, record.addrs.len())
        .map_err(RecordError::Malformed)?;
    for a in &record.addrs {
        w.socket_addr(a);
    }
    let seal_key = keys.rendezvous_seal_key(window);
    let mut salt = [0u8; 16];
    rng.fill(&mut salt);
    let mut h = Sha256::new();
    h.update(NONCE_LABEL);
    h.update(seal_key);
    h.update(salt);
    h.update(&plain);
    let digest: [u8; 32] = h.finalize().into();
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&digest[..NONCE_LEN]);
    let cipher = ChaCha20Poly1305::new(&seal_key.into());
    let aad = aad(keys, window);
    let sealed = cipher
        .encrypt(
            &Nonce::from(nonce),
            Payload {
                msg: &plain,
                aad: &aad,
            },
        )
        .map_err(|_| RecordError::BadLength(plain.len()))?;
    let mut out = Vec::with_capacity(NONCE_LEN + sealed.len());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&sealed);
    if out.len() > MAX_RECORD_LEN {
        return Err(RecordError::BadLength(out.len()));
    }
    Ok(out)
}

/// Opens a record sealed by [`seal_record`] for `window` of the same network.
pub fn open_record(
    keys: &KeySchedule,
    window: Window,
    sealed: &[u8],
) -> Result<RendezvousRecord, RecordError> {
    if sealed.len() < NONCE_LEN + TAG_LEN || sealed.len() > MAX_RECORD_LEN {
        return Err(RecordError::BadLength(sealed.len()));
    }
    let (nonce, body) = sealed.split_at(NONCE_LEN);
    let nonce: [u8; NONCE_LEN] = nonce
        .try_into()
        .map_err(|_| RecordError::BadLength(sealed.len()))?;
    let cipher = ChaCha20Poly1305::new(&keys.rendezvous_seal_key(window).into());
    let aad = aad(keys, window);
    let plain = cipher
        .decrypt(
            &Nonce::from(nonce),
            Payload {
                msg: body,
                aad: &aad,
            },
        )
        .map_err(|_| RecordError::Unauthentic)?;
    let mut r = Reader::new(&plain);
    let version = r.u8().map_err(RecordError::Malformed)?;
    if version != RECORD_VERSION {
        return Err(RecordError::Malformed(WireError::UnsupportedVersion(
            version,
        )));
    }
    let peer = r.peer_id().map_err(RecordError::Malformed)?;
    let published_at = r.u64().map_err(RecordError::Malformed)?;
    let n = r
        .count("addresses", MAX_RECORD_ADDRS)
        .map_err(RecordError::Malformed)?;
    let mut addrs = Vec::with_capacity(n);
    for _ in 0..n {
        addrs.push(r.socket_addr().map_err(RecordError::Malformed)?);
    }
    r.finish().map_err(RecordError::Malformed)?;
    Ok(RendezvousRecord {
        peer,
        addrs,
        published_at,
    })
}

/// Bounds on what a node stores for others.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct StoreLimits {
    /// Records per key; the oldest record of the most prolific source is evicted beyond it.
    pub max_records_per_key: usize,
    /// Distinct keys; PUTs for new keys are refused beyond it.
    pub max_keys: usize,
    /// Accounted bytes (record bytes + [`RECORD_OVERHEAD`] each + [`KEY_OVERHEAD`] per key).
    pub max_bytes: usize,
    /// Longest lifetime granted to a record.
    pub max_ttl: Duration,
    /// PUT rate per source IP.
    pub put_rate: Rate,
    /// Source IPs tracked by the PUT rate limit.
    pub max_sources: usize,
}

impl Default for StoreLimits {
    fn default() -> Self {
        StoreLimits {
            max_records_per_key: 64,
            max_keys: 4096,
            max_bytes: 4 << 20,
            max_ttl: Duration::from_secs(u64::from(super::message::MAX_TTL_SECS)),
            put_rate: Rate {
                burst: 10,
                per_minute: 10,
            },
            max_sources: 1024,
        }
    }
}

/// Bytes charged per stored record on top of its length (metadata and allocation).
pub const RECORD_OVERHEAD: usize = 96;
/// Bytes charged per key.
pub const KEY_OVERHEAD: usize = 96;

/// A record held for someone.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct StoredRecord {
    /// Who put it (as claimed in the PUT).
    pub publisher: PeerId,
    /// Source IP of the PUT (`None` for our own records).
    pub source: Option<IpAddr>,
    /// The sealed bytes.
    pub record: Vec<u8>,
    /// When it was stored or last replaced.
    pub stored_at: Instant,
    /// When it expires.
    pub expires_at: Instant,
}

/// The records this node holds for the DHT.
#[derive(Debug)]
pub struct Store {
    limits: StoreLimits,
    keys: BTreeMap<[u8; 32], Vec<StoredRecord>>,
    bytes: usize,
    records: usize,
    next_expiry: Option<Instant>,
    puts: Limiter<IpAddr>,
}

impl Store {
    /// An empty store.
    #[must_use]
    pub fn new(limits: StoreLimits) -> Store {
        Store {
            limits,
            keys: BTreeMap::new(),
            bytes: 0,
            records: 0,
            next_expiry: None,
            puts: Limiter::new(limits.put_rate, limits.max_sources),
        }
    }

    /// Stores a record PUT by `publisher` from `source`, subject to the rate limit and caps.
    pub fn put(
        &mut self,
        now: Instant,
        source: IpAddr,
        publisher: PeerId,
        key: [u8; 32],
        record: Vec<u8>,
        ttl: Duration,
    ) -> PutStatus {
        if !self.puts.allow(source, now) {
            return PutStatus::RateLimited;
        }
        self.insert(now, Some(source), publisher, key, record, ttl)
    }

    /// Stores one of our own records (no rate limit, same caps).
    pub fn put_local(
        &mut self,
        now: Instant,
        publisher: PeerId,
        key: [u8; 32],
        record: Vec<u8>,
        ttl: Duration,
    ) -> PutStatus {
        self.insert(now, None, publisher, key, record, ttl)
    }

    fn insert(
        &mut self,
        now: Instant,
        source: Option<IpAddr>,
        publisher: PeerId,
        key: [u8; 32],
        record: Vec<u8>,
        ttl: Duration,
    ) -> PutStatus {
        if record.is_empty() || record.len() > MAX_RECORD_LEN || ttl.is_zero() {
            return PutStatus::Full;
        }
        let cost = record.len() + RECORD_OVERHEAD;
        let expires_at = now + ttl.min(self.limits.max_ttl);
        let new_key = !self.keys.contains_key(&key);
        if new_key && self.keys.len() >= self.limits.max_keys {
            return PutStatus::Full;
        }
        let list = self.keys.get(&key);
        let replaced = list.and_then(|l| {
            l.iter()
                .find(|r| r.publisher == publisher && r.source == source)
        });
        let freed = replaced.map_or(0, |r| r.record.len() + RECORD_OVERHEAD);
        let key_cost = if new_key { KEY_OVERHEAD } else { 0 };
        if self.bytes - freed + cost + key_cost > self.limits.max_bytes {
            return PutStatus::Full;
        }
        let entry = StoredRecord {
            publisher,
            source,
            record,
            stored_at: now,
            expires_at,
        };
        let list = self.keys.entry(key).or_default();
        self.bytes += key_cost;
        if let Some(pos) = list
            .iter()
            .position(|r| r.publisher == publisher && r.source == source)
        {
            let old = list.remove(pos);
            self.bytes -= old.record.len() + RECORD_OVERHEAD;
            self.records -= 1;
        } else if list.len() >= self.limits.max_records_per_key {
            if let Some(pos) = eviction_victim(list) {
                let old = list.remove(pos);
                self.bytes -= old.record.len() + RECORD_OVERHEAD;
                self.records -= 1;
            }
        }
        list.push(entry);
        self.bytes += cost;
        self.records += 1;
        self.next_expiry = Some(self.next_expiry.map_or(expires_at, |t| t.min(expires_at)));
        PutStatus::Stored
    }

    /// The live records under `key`, oldest first.
    pub fn get(&self, now: Instant, key: &[u8; 32]) -> impl Iterator<Item = &StoredRecord> {
        self.keys
            .get(key)
            .into_iter()
            .flatten()
            .filter(move |r| r.expires_at > now)
    }

    /// Drops expired records (and keys left empty); returns how many.
    pub fn expire(&mut self, now: Instant) -> usize {
        if self.next_expiry.is_none_or(|t| t > now) {
            return 0;
        }
        let mut dropped = 0;
        let mut bytes = 0;
        let mut next: Option<Instant> = None;
        self.keys.retain(|_, list| {
            list.retain(|r| {
                let live = r.expires_at > now;
                if live {
                    next = Some(next.map_or(r.expires_at, |t| t.min(r.expires_at)));
                } else {
                    dropped += 1;
                    bytes += r.record.len() + RECORD_OVERHEAD;
                }
                live
            });
            if list.is_empty() {
                bytes += KEY_OVERHEAD;
            }
            !list.is_empty()
        });
        self.bytes -= bytes;
        self.records -= dropped;
        self.next_expiry = next;
        self.puts.prune(now, Duration::from_secs(600));
        dropped
    }

    /// When the next record expires.
    #[must_use]
    pub fn next_expiry(&self) -> Option<Instant> {
        self.next_expiry
    }

    /// Records stored.
    #[must_use]
    pub fn len(&self) -> usize {
        self.records
    }

    /// True when nothing is stored.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.records == 0
    }

    /// Keys stored.
    #[must_use]
    pub fn key_count(&self) -> usize {
        self.keys.len()
    }

    /// Accounted bytes (always ≤ `max_bytes`).
    #[must_use]
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

/// The oldest record of the source holding the most records in `list`.
fn eviction_victim(list: &[StoredRecord]) -> Option<usize> {
    let mut counts: BTreeMap<Option<IpAddr>, usize> = BTreeMap::new();
    for r in list {
        *counts.entry(r.source).or_default() += 1;
    }
    let top = counts.iter().max_by_key(|(_, n)| **n).map(|(s, _)| *s)?;
    list.iter().position(|r| r.source == top)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::NetworkToken;

    fn keys(seed: u64) -> KeySchedule {
        let mut rng = Rng::from_seed(seed);
        NetworkToken::generate_with(3600, &mut |b: &mut [u8]| rng.fill(b)).key_schedule()
    }

    fn record() -> RendezvousRecord {
        RendezvousRecord {
            peer: PeerId([5; 32]),
            addrs: vec![
                "192.0.2.1:7120".parse().unwrap(),
                "[2001:db8::1]:7120".parse().unwrap(),
            ],
            published_at: 1_700_000_000,
        }
    }

    #[test]
    fn seal_open_round_trip_and_nonces_differ() {
        let ks = keys(1);
        let mut rng = Rng::from_seed(9);
        let a = seal_record(&ks, 4, &record(), &mut rng).unwrap();
        let b = seal_record(&ks, 4, &record(), &mut rng).unwrap();
        assert_ne!(a, b);
        assert_eq!(open_record(&ks, 4, &a), Ok(record()));
        assert_eq!(open_record(&ks, 4, &b), Ok(record()));
        let full = RendezvousRecord {
            addrs: vec!["[2001:db8::1]:1".parse().unwrap(); 8],
            ..record()
        };
        let sealed = seal_record(&ks, 4, &full, &mut rng).unwrap();
        assert_eq!(sealed.len(), 12 + 1 + 32 + 8 + 2 + 8 * 19 + 16);
        assert_eq!(open_record(&ks, 4, &sealed), Ok(full));
    }

    #[test]
    fn wrong_token_wrong_window_tampering_and_garbage_fail() {
        let ks = keys(1);
        let mut rng = Rng::from_seed(9);
        let sealed = seal_record(&ks, 4, &record(), &mut rng).unwrap();
        assert_eq!(
            open_record(&keys(2), 4, &sealed),
            Err(RecordError::Unauthentic)
        );
        assert_eq!(open_record(&ks, 5, &sealed), Err(RecordError::Unauthentic));
        for i in 0..sealed.len() {
            let mut t = sealed.clone();
            t[i] ^= 0x01;
            assert_eq!(
                open_record(&ks, 4, &t),
                Err(RecordError::Unauthentic),
                "flip at {i}"
            );
        }
        assert_eq!(
            open_record(&ks, 4, &sealed[..27]),
            Err(RecordError::BadLength(27))
        );
        assert_eq!(
            open_record(&ks, 4, &[0; 1025]),
            Err(RecordError::BadLength(1025))
        );
        for n in 0..200 {
            let mut junk = vec![0u8; n];
            rng.fill(&mut junk);
            assert!(open_record(&ks, 4, &junk).is_err());
        }
        let many = RendezvousRecord {
            addrs: vec!["192.0.2.1:1".parse().unwrap(); 9],
            ..record()
        };
        assert_eq!(
            seal_record(&ks, 4, &many, &mut rng),
            Err(RecordError::TooManyAddrs(9))
        );
    }

    fn ip(n: u32) -> IpAddr {
        IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + n))
    }

    #[test]
    fn republish_replaces_and_ttl_expires() {
        let mut s = Store::new(StoreLimits::default());
        let t0 = Instant::now();
        let ttl = Duration::from_secs(900);
        assert_eq!(
            s.put(t0, ip(1), PeerId([1; 32]), [0; 32], vec![1; 50], ttl),
            PutStatus::Stored
        );
        assert_eq!(
            s.put(t0, ip(1), PeerId([1; 32]), [0; 32], vec![2; 60], ttl),
            PutStatus::Stored
        );
        assert_eq!(
            s.put(
                t0,
                ip(2),
                PeerId([1; 32]),
                [0; 32],
                vec![3; 70],
                Duration::from_secs(7200)
            ),
            PutStatus::Stored
        );
        let got: Vec<_> = s.get(t0, &[0; 32]).map(|r| r.record.clone()).collect();
        assert_eq!(
            got,
            vec![vec![2; 60], vec![3; 70]],
            "same publisher from another IP adds, never replaces"
        );
        assert_eq!(s.bytes(), KEY_OVERHEAD + 130 + 2 * RECORD_OVERHEAD);
        assert_eq!(s.expire(t0 + Duration::from_secs(899)), 0);
        assert_eq!(s.expire(t0 + Duration::from_secs(900)), 1);
        assert_eq!(s.get(t0 + Duration::from_secs(900), &[0; 32]).count(), 1);
        assert_eq!(
            s.next_expiry(),
            Some(t0 + Duration::from_secs(3600)),
            "TTL capped at one hour"
        );
        assert_eq!(s.expire(t0 + Duration::from_secs(3600)), 1);
        assert!(s.is_empty());
        assert_eq!((s.key_count(), s.bytes()), (0, 0));
    }

    #[test]
    fn a_put_flood_from_one_source_stays_bounded_and_spares_others() {
        let mut s = Store::new(StoreLimits::default());
        let t0 = Instant::now();
        let ttl = Duration::from_secs(900);
        for m in 0..20 {
            assert_eq!(
                s.put(
                    t0,
                    ip(100 + m),
                    PeerId([m as u8; 32]),
                    [7; 32],
                    vec![1; 100],
                    ttl
                ),
                PutStatus::Stored
            );
        }
        let mut stored = 0;
        for i in 0..10_000u32 {
            let mut key = [0u8; 32];
            key[..4].copy_from_slice(&(i % 3).to_be_bytes());
            let now = t0 + Duration::from_millis(u64::from(i) * 100);
            let mut publisher = [0u8; 32];
            publisher[..4].copy_from_slice(&i.to_be_bytes());
            if s.put(now, ip(1), PeerId(publisher), key, vec![9; 1024], ttl) == PutStatus::Stored {
                stored += 1;
            }
        }
        // 1000 s at 10 per minute plus the burst.
        assert!(stored <= 10 + 1000 / 6 + 1, "{stored}");
        assert!(s.bytes() <= StoreLimits::default().max_bytes);
        // The same flood spread over many forged sources, all under the members' key: capped per
        // key, and the flood evicts its own records first once it dominates.
        for i in 0..5_000u32 {
            let mut publisher = [0u8; 32];
            publisher[..4].copy_from_slice(&i.to_be_bytes());
            s.put(
                t0,
                ip(1000 + i % 8),
                PeerId(publisher),
                [7; 32],
                vec![9; 1024],
                ttl,
            );
        }
        let under_key: Vec<_> = s.get(t0, &[7; 32]).collect();
        assert_eq!(under_key.len(), 64);
        let members = under_key.iter().filter(|r| r.record.len() == 100).count();
        assert_eq!(members, 20, "members' records survive the flood");
    }

    #[test]
    fn key_and_byte_caps_refuse_new_records() {
        let limits = StoreLimits {
            max_keys: 3,
            max_bytes: 4000,
            ..StoreLimits::default()
        };
        let mut s = Store::new(limits);
        let t0 = Instant::now();
        let ttl = Duration::from_secs(60);
        for k in 0..3u8 {
            assert_eq!(
                s.put_local(t0, PeerId([k; 32]), [k; 32], vec![1; 10], ttl),
                PutStatus::Stored
            );
        }
        assert_eq!(
            s.put_local(t0, PeerId([9; 32]), [9; 32], vec![1; 10], ttl),
            PutStatus::Full
        );
        let mut n = 0;
        while s.put_local(t0, PeerId([n; 32]), [0; 32], vec![1; 1000], ttl) == PutStatus::Stored {
            n += 1;
        }
        // The first one replaced publisher 0's small record; two more fit, the fourth does not.
        assert_eq!(n, 3);
        assert_eq!(
            s.bytes(),
            2 * (10 + RECORD_OVERHEAD) + 3 * KEY_OVERHEAD + 3 * (1000 + RECORD_OVERHEAD)
        );
    }
}
