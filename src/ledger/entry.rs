//! One signed ledger entry: its canonical encoding, signature and deterministic order.
//!
//! Encoding (big-endian, with [`crate::wire`]):
//!
//! ```text
//! entry   = u16 len | bucket | u16 len | key | u8 kind (0 tombstone, 1 value)
//!           [ u32 len | value ]            -- only when kind = 1
//!           u64 version | writer (32) | signature (64)
//! signed  = u16 len | "kairos-p2p v1 ledger" | entry without its signature
//! ```

use std::collections::BTreeSet;
use std::fmt;
use std::sync::{Mutex, PoisonError};

use ed25519_dalek::{Signature, Signer as _};
use sha2::{Digest as _, Sha256};

use super::{Hlc, LedgerError};
use crate::identity::{Identity, PeerId};
use crate::wire::{Reader, WireError, Writer};

/// Domain-separation label that starts every signed message.
pub const SIGNING_LABEL: &[u8] = b"kairos-p2p v1 ledger";
/// Label of the entry hash used by digests.
const HASH_LABEL: &[u8] = b"kairos-p2p v1 ledger entry hash";
/// Longest bucket name, in bytes.
pub const MAX_BUCKET_LEN: usize = 128;
/// Longest key, in bytes.
pub const MAX_KEY_LEN: usize = 256;
/// Largest value the format can carry at all (the ledger's configured limit is lower).
pub(crate) const MAX_VALUE_WIRE: usize = 1 << 30;
/// Bytes the encoding of a value entry adds to its bucket, key and value lengths.
pub const ENTRY_WIRE_OVERHEAD: usize = 2 + 2 + 1 + 4 + 8 + 32 + 64;

const KIND_TOMBSTONE: u8 = 0;
const KIND_VALUE: u8 = 1;

/// Most hashes the verified-signature cache keeps (about 1 MiB) before it starts over.
const VERIFIED_CACHE_MAX: usize = 16_384;

/// Process-wide cache of entry hashes known to carry a valid signature: filled by
/// [`Entry::sign`] and by successful verifications, consulted by the ledger before verifying.
/// A hash covers the whole signed body and the signature, so a hit means the exact same bytes
/// were verified (or produced by their signer) before. It saves verifying one entry once per
/// ledger when many ledgers share a process (the simulator, tests).
static VERIFIED: Mutex<BTreeSet<[u8; 32]>> = Mutex::new(BTreeSet::new());

/// Records that the entry with this hash has a valid signature.
pub(crate) fn remember_valid(hash: [u8; 32]) {
    let mut set = VERIFIED.lock().unwrap_or_else(PoisonError::into_inner);
    if set.len() >= VERIFIED_CACHE_MAX {
        set.clear();
    }
    set.insert(hash);
}

/// True when the entry with this hash is known to have a valid signature.
pub(crate) fn known_valid(hash: &[u8; 32]) -> bool {
    VERIFIED
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .contains(hash)
}

/// What is wrong with a bucket or key name, if anything.
pub(crate) fn name_problem(name: &str, max: usize) -> Option<&'static str> {
    if name.is_empty() {
        Some("is empty")
    } else if name.len() > max {
        Some("is too long")
    } else if name.chars().any(char::is_control) {
        Some("holds a control character")
    } else {
        None
    }
}

/// Checks a bucket (`field = "bucket"`) or key name.
pub(crate) fn check_name(field: &'static str, name: &str, max: usize) -> Result<(), LedgerError> {
    match name_problem(name, max) {
        Some(reason) => Err(LedgerError::InvalidName { field, reason }),
        None => Ok(()),
    }
}

/// A compact, fixed-size stand-in for a key inside a bucket (the first 8 bytes of its SHA-256),
/// used by summaries and requests. Two keys may share one; the protocol stays correct, only a
/// little redundant, when they do.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyId(pub u64);

impl KeyId {
    /// The id of `key`.
    #[must_use]
    pub fn of(key: &str) -> KeyId {
        let h = Sha256::digest(key.as_bytes());
        let mut b = [0u8; 8];
        b.copy_from_slice(&h[..8]);
        KeyId(u64::from_be_bytes(b))
    }
}

/// A signed ledger entry. `value: None` is a tombstone (the key was deleted).
#[derive(Clone, PartialEq, Eq)]
pub struct Entry {
    /// Bucket name (1..=128 bytes of UTF-8, no control characters).
    pub bucket: String,
    /// Key (1..=256 bytes of UTF-8, no control characters).
    pub key: String,
    /// The value, or `None` for a tombstone.
    pub value: Option<Vec<u8>>,
    /// Version: the writer's hybrid logical clock when it wrote.
    pub version: Hlc,
    /// Who wrote it.
    pub writer: PeerId,
    /// ed25519 signature by `writer` over the signed encoding (see the module documentation).
    pub signature: [u8; 64],
}

impl fmt::Debug for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Entry")
            .field("bucket", &self.bucket)
            .field("key", &self.key)
            .field("value_len", &self.value.as_ref().map(Vec::len))
            .field("version", &self.version)
            .field("writer", &self.writer)
            .finish_non_exhaustive()
    }
}

impl Entry {
    /// Builds and signs an entry as `identity`. Fails on an invalid name or a value the format
    /// cannot carry (over 1 GiB); the ledger's own value limit is checked by the ledger.
    pub fn sign(
        identity: &Identity,
        bucket: &str,
        key: &str,
        value: Option<&[u8]>,
        version: Hlc,
    ) -> Result<Entry, LedgerError> {
        let mut entry = Entry {
            bucket: bucket.to_owned(),
            key: key.to_owned(),
            value: value.map(<[u8]>::to_vec),
            version,
            writer: identity.peer_id(),
            signature: [0; 64],
        };
        entry.check_shape(MAX_VALUE_WIRE)?;
        let message = entry.signing_message()?;
        entry.signature = identity.signing_key().sign(&message).to_bytes();
        remember_valid(entry.hash());
        Ok(entry)
    }

    /// True for a tombstone.
    #[must_use]
    pub fn is_tombstone(&self) -> bool {
        self.value.is_none()
    }

    /// Checks names and the value length against `max_value`.
    pub(crate) fn check_shape(&self, max_value: usize) -> Result<(), LedgerError> {
        check_name("bucket", &self.bucket, MAX_BUCKET_LEN)?;
        check_name("key", &self.key, MAX_KEY_LEN)?;
        match &self.value {
            Some(v) if v.len() > max_value.min(MAX_VALUE_WIRE) => Err(LedgerError::ValueTooLarge {
                len: v.len(),
                max: max_value.min(MAX_VALUE_WIRE),
            }),
            _ => Ok(()),
        }
    }

    /// Everything but the signature.
    fn write_body(&self, w: &mut Writer<'_>) -> Result<(), WireError> {
        w.bytes_u16("bucket", MAX_BUCKET_LEN, self.bucket.as_bytes())?;
        w.bytes_u16("key", MAX_KEY_LEN, self.key.as_bytes())?;
        match &self.value {
            None => {
                w.u8(KIND_TOMBSTONE);
            }
            Some(v) => {
                w.u8(KIND_VALUE).bytes_u32("value", MAX_VALUE_WIRE, v)?;
            }
        }
        w.u64(self.version.0).peer_id(&self.writer);
        Ok(())
    }

    /// The exact bytes the signature covers.
    pub fn signing_message(&self) -> Result<Vec<u8>, LedgerError> {
        let mut buf = Vec::with_capacity(self.encoded_len() + SIGNING_LABEL.len());
        let mut w = Writer::new(&mut buf);
        w.bytes_u16("label", SIGNING_LABEL.len(), SIGNING_LABEL)?;
        self.write_body(&mut w)?;
        Ok(buf)
    }

    /// Checks the names, that the writer is a valid ed25519 key, and the signature
    /// (`verify_strict`: no small-order keys, no malleable signatures).
    pub fn verify(&self) -> Result<(), LedgerError> {
        self.check_shape(MAX_VALUE_WIRE)?;
        let key = self
            .writer
            .verifying_key()
            .ok_or(LedgerError::BadWriterKey {
                writer: self.writer,
            })?;
        let message = self.signing_message()?;
        key.verify_strict(&message, &Signature::from_bytes(&self.signature))
            .map_err(|_| LedgerError::BadSignature {
                bucket: self.bucket.clone(),
                key: self.key.clone(),
                writer: self.writer,
            })
    }

    /// The deterministic merge order: higher version, then higher writer id, then higher value
    /// bytes (a tombstone is lowest), then higher signature bytes. Equal entries do not win.
    #[must_use]
    pub fn wins_over(&self, other: &Entry) -> bool {
        (self.version, &self.writer, &self.value, &self.signature)
            > (other.version, &other.writer, &other.value, &other.signature)
    }

    /// Length of [`encode`](Self::encode)'s output.
    #[must_use]
    pub fn encoded_len(&self) -> usize {
        let value = self.value.as_ref().map_or(0, |v| 4 + v.len());
        ENTRY_WIRE_OVERHEAD - 4 + self.bucket.len() + self.key.len() + value
    }

    /// Appends the wire encoding (see the module documentation).
    pub fn encode(&self, w: &mut Writer<'_>) -> Result<(), WireError> {
        self.write_body(w)?;
        w.bytes(&self.signature);
        Ok(())
    }

    /// Reads one entry, refusing invalid names and values over `max_value` bytes. The signature
    /// is not checked here ([`verify`](Self::verify) does).
    pub fn decode(r: &mut Reader<'_>, max_value: usize) -> Result<Entry, WireError> {
        let bucket = read_name(r, "bucket", MAX_BUCKET_LEN)?;
        let key = read_name(r, "key", MAX_KEY_LEN)?;
        let value = match r.u8()? {
            KIND_TOMBSTONE => None,
            KIND_VALUE => Some(
                r.bytes_u32("value", max_value.min(MAX_VALUE_WIRE))?
                    .to_vec(),
            ),
            tag => {
                return Err(WireError::UnknownTag {
                    field: "entry kind",
                    tag,
                });
            }
        };
        Ok(Entry {
            bucket,
            key,
            value,
            version: Hlc(r.u64()?),
            writer: r.peer_id()?,
            signature: r.array()?,
        })
    }

    /// The hash that stands for this entry in digests: SHA-256 over a label, the signed body and
    /// the signature, so any difference between two replicas shows.
    #[must_use]
    pub(crate) fn hash(&self) -> [u8; 32] {
        let mut body = Vec::with_capacity(self.encoded_len());
        // Cannot fail for an entry that passed `check_shape`; a failure hashes the prefix only,
        // which still differs from any valid entry's hash.
        let _ = self.encode(&mut Writer::new(&mut body));
        let mut h = Sha256::new();
        h.update(HASH_LABEL);
        h.update(&body);
        h.finalize().into()
    }
}

fn read_name(r: &mut Reader<'_>, field: &'static str, max: usize) -> Result<String, WireError> {
    let s = r.str_u16(field, max)?;
    match name_problem(s, max) {
        Some(_) => Err(WireError::Invalid(field)),
        None => Ok(s.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> Identity {
        Identity::from_seed([n; 32])
    }

    #[test]
    fn signed_entries_verify_and_tampering_is_caught() {
        let e = Entry::sign(&id(1), "kairos", "abc-role", Some(b"master"), Hlc(42)).unwrap();
        e.verify().unwrap();
        let mut t = e.clone();
        t.value = Some(b"worker".to_vec());
        assert!(matches!(t.verify(), Err(LedgerError::BadSignature { .. })));
        let mut t = e.clone();
        t.version = Hlc(43);
        assert!(t.verify().is_err());
        let mut t = e.clone();
        t.value = None;
        assert!(t.verify().is_err(), "a value cannot become a tombstone");
        let mut t = e.clone();
        t.writer = id(2).peer_id();
        assert!(t.verify().is_err());
        let mut t = e;
        t.bucket = "kairos2".into();
        assert!(t.verify().is_err());
    }

    #[test]
    fn field_boundaries_are_unambiguous() {
        // "ab"/"c" and "a"/"bc" must sign different messages.
        let a = Entry::sign(&id(1), "ab", "c", Some(b""), Hlc(1)).unwrap();
        let mut b = a.clone();
        b.bucket = "a".into();
        b.key = "bc".into();
        assert_ne!(a.signing_message().unwrap(), b.signing_message().unwrap());
        assert!(b.verify().is_err());
    }

    #[test]
    fn invalid_writer_key_is_typed() {
        let mut e = Entry::sign(&id(1), "b", "k", None, Hlc(1)).unwrap();
        // y = 2 is not on the curve.
        let mut bad = [0u8; 32];
        bad[0] = 2;
        e.writer = PeerId(bad);
        assert!(matches!(e.verify(), Err(LedgerError::BadWriterKey { .. })));
    }

    #[test]
    fn names_are_bounded_and_clean() {
        let i = id(1);
        for (bucket, key) in [
            ("", "k"),
            ("b", ""),
            ("b\n", "k"),
            ("b", "k\u{7f}"),
            (&"x".repeat(129) as &str, "k"),
            ("b", &"y".repeat(257)),
        ] {
            let err = Entry::sign(&i, bucket, key, None, Hlc(1)).unwrap_err();
            assert!(
                matches!(err, LedgerError::InvalidName { .. }),
                "{bucket:?} {key:?}"
            );
        }
        Entry::sign(&i, &"x".repeat(128), &"y".repeat(256), None, Hlc(1)).unwrap();
        Entry::sign(&i, "bücket", "clé-ü", None, Hlc(1)).unwrap();
    }

    #[test]
    fn wire_round_trip_and_length() {
        for value in [None, Some(&b""[..]), Some(&b"10.1.0.7"[..])] {
            let e = Entry::sign(&id(3), "dhcp", "node-1", value, Hlc(9)).unwrap();
            let mut buf = Vec::new();
            e.encode(&mut Writer::new(&mut buf)).unwrap();
            assert_eq!(buf.len(), e.encoded_len());
            let mut r = Reader::new(&buf);
            assert_eq!(Entry::decode(&mut r, 100).unwrap(), e);
            r.finish().unwrap();
        }
    }

    #[test]
    fn decode_refuses_big_values_bad_names_and_kinds() {
        let e = Entry::sign(&id(3), "b", "k", Some(&[1; 50]), Hlc(9)).unwrap();
        let mut buf = Vec::new();
        e.encode(&mut Writer::new(&mut buf)).unwrap();
        assert!(matches!(
            Entry::decode(&mut Reader::new(&buf), 49),
            Err(WireError::TooLong { .. })
        ));
        let mut bad_kind = buf.clone();
        bad_kind[6] = 7;
        assert!(matches!(
            Entry::decode(&mut Reader::new(&bad_kind), 100),
            Err(WireError::UnknownTag { tag: 7, .. })
        ));
        let mut ctl = buf;
        ctl[2] = b'\t';
        assert_eq!(
            Entry::decode(&mut Reader::new(&ctl), 100),
            Err(WireError::Invalid("bucket"))
        );
    }

    #[test]
    fn order_is_total_and_deterministic() {
        let (a, b) = (id(1), id(2));
        let lo =
            |i: &Identity, v, val: Option<&[u8]>| Entry::sign(i, "b", "k", val, Hlc(v)).unwrap();
        assert!(lo(&a, 2, None).wins_over(&lo(&b, 1, Some(b"x"))));
        let (hi_w, lo_w) = if a.peer_id() > b.peer_id() {
            (&a, &b)
        } else {
            (&b, &a)
        };
        assert!(lo(hi_w, 5, None).wins_over(&lo(lo_w, 5, Some(b"z"))));
        assert!(lo(&a, 5, Some(b"b")).wins_over(&lo(&a, 5, Some(b"a"))));
        assert!(lo(&a, 5, Some(b"")).wins_over(&lo(&a, 5, None)));
        let e = lo(&a, 5, None);
        assert!(!e.wins_over(&e.clone()));
    }

    #[test]
    fn key_ids_are_stable() {
        assert_eq!(KeyId::of("leader-auto"), KeyId::of("leader-auto"));
        assert_ne!(KeyId::of("leader-auto"), KeyId::of("ip-master"));
    }
}
