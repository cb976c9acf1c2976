//! The key schedule: every secret the other layers need, derived from the token with
//! HKDF-SHA256 (RFC 5869).
//!
//! - Per stream, a pseudorandom key `PRK = HKDF-Extract(salt = label, IKM = otp.<stream>.key)`
//!   with labels `kairos-p2p v1 otp.crypto` and `kairos-p2p v1 otp.dht`.
//! - Per window, `HKDF-Expand(PRK, info = label || window as u64 big-endian, 32)` with labels
//!   `kairos-p2p v1 beacon` (crypto stream), `kairos-p2p v1 rendezvous` and
//!   `kairos-p2p v1 rendezvous seal` (DHT stream).
//! - The static membership key: `HKDF(salt = "kairos-p2p v1 membership", IKM = every token field,
//!   length-prefixed, info = "kairos-p2p v1 membership")`.
//!
//! Everything is a pure function of the token and of the window numbers the caller passes; no
//! clock is read here.

use std::fmt;

use hkdf::hmac::Hmac;
use hkdf::{Hkdf, HmacImpl};
use sha2::Sha256;

use super::{NEVER_ROTATE, NetworkToken, Redacted};

const LABEL_CRYPTO: &[u8] = b"kairos-p2p v1 otp.crypto";
const LABEL_DHT: &[u8] = b"kairos-p2p v1 otp.dht";
const LABEL_MEMBERSHIP: &[u8] = b"kairos-p2p v1 membership";
const LABEL_BEACON: &[u8] = b"kairos-p2p v1 beacon";
const LABEL_RENDEZVOUS: &[u8] = b"kairos-p2p v1 rendezvous";
const LABEL_RENDEZVOUS_SEAL: &[u8] = b"kairos-p2p v1 rendezvous seal";

/// Index of a rotation time window: `unix_seconds / interval`.
pub type Window = u64;

/// The window containing `unix_secs` for a stream rotating every `interval` seconds. An
/// interval of [`NEVER_ROTATE`] or more (or 0, which validation rejects) gives window 0 forever.
#[must_use]
pub fn window_at(unix_secs: u64, interval: u64) -> Window {
    if interval >= NEVER_ROTATE {
        return 0;
    }
    unix_secs.checked_div(interval).unwrap_or(0)
}

/// The windows whose keys are accepted while in `current`: current, previous, then next (one
/// step of grace each side for clock skew), without duplicates or overflow at 0 and `u64::MAX`.
pub fn accepted_windows(current: Window) -> impl Iterator<Item = Window> {
    [
        Some(current),
        current.checked_sub(1),
        current.checked_add(1),
    ]
    .into_iter()
    .flatten()
}

/// Secrets derived from a [`NetworkToken`]; build it with [`NetworkToken::key_schedule`].
///
/// Its `Debug` output shows only the intervals.
#[derive(Clone)]
pub struct KeySchedule {
    crypto_prk: [u8; 32],
    dht_prk: [u8; 32],
    membership: [u8; 32],
    crypto_interval: u64,
    dht_interval: u64,
}

impl KeySchedule {
    /// Derives the schedule from `token`.
    #[must_use]
    pub fn new(token: &NetworkToken) -> KeySchedule {
        let otp = &token.otp;
        let mut all = Vec::with_capacity(256);
        for p in [&otp.dht, &otp.crypto] {
            all.extend_from_slice(&p.interval.to_be_bytes());
            push_bytes(&mut all, p.key.as_bytes());
            all.extend_from_slice(&u64::from(p.length).to_be_bytes());
        }
        push_bytes(&mut all, token.room.as_bytes());
        push_bytes(&mut all, token.rendezvous.as_bytes());
        push_bytes(&mut all, token.mdns.as_bytes());
        all.extend_from_slice(&token.max_message_size.to_be_bytes());
        let membership_prk = extract(LABEL_MEMBERSHIP, &all);
        KeySchedule {
            crypto_prk: extract(LABEL_CRYPTO, otp.crypto.key.as_bytes()),
            dht_prk: extract(LABEL_DHT, otp.dht.key.as_bytes()),
            membership: expand(&membership_prk, LABEL_MEMBERSHIP, None),
            crypto_interval: otp.crypto.interval,
            dht_interval: otp.dht.interval,
        }
    }

    /// Static key proving token membership (MACs a peer's public key); bound to every token
    /// field, never rotates.
    #[must_use]
    pub fn membership_key(&self) -> [u8; 32] {
        self.membership
    }

    /// Window of the crypto stream at `unix_secs`.
    #[must_use]
    pub fn crypto_window(&self, unix_secs: u64) -> Window {
        window_at(unix_secs, self.crypto_interval)
    }

    /// Window of the DHT stream at `unix_secs`.
    #[must_use]
    pub fn dht_window(&self, unix_secs: u64) -> Window {
        window_at(unix_secs, self.dht_interval)
    }

    /// True when the crypto stream's keys change over time (its interval is not "never").
    #[must_use]
    pub fn crypto_rotates(&self) -> bool {
        self.crypto_interval < NEVER_ROTATE
    }

    /// DHT windows whose rendezvous keys are in use in `current`: with rotation, the current one
    /// and one step of grace either side ([`accepted_windows`]); without, only window 0.
    pub fn dht_windows_in_use(&self, current: Window) -> impl Iterator<Item = Window> {
        let rotates = self.dht_interval < NEVER_ROTATE;
        accepted_windows(current).filter(move |&w| rotates || w == current)
    }

    /// Key sealing LAN beacons in crypto-stream `window`.
    #[must_use]
    pub fn beacon_key(&self, window: Window) -> [u8; 32] {
        expand(&self.crypto_prk, LABEL_BEACON, Some(window))
    }

    /// DHT rendezvous identifier for DHT-stream `window`.
    #[must_use]
    pub fn rendezvous_key(&self, window: Window) -> [u8; 32] {
        expand(&self.dht_prk, LABEL_RENDEZVOUS, Some(window))
    }

    /// Key sealing DHT record contents in DHT-stream `window`.
    #[must_use]
    pub fn rendezvous_seal_key(&self, window: Window) -> [u8; 32] {
        expand(&self.dht_prk, LABEL_RENDEZVOUS_SEAL, Some(window))
    }
}

impl fmt::Debug for KeySchedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeySchedule")
            .field("crypto_interval", &self.crypto_interval)
            .field("dht_interval", &self.dht_interval)
            .field("keys", &Redacted)
            .finish()
    }
}

/// Appends `bytes` prefixed with its length (u64 big-endian), so field boundaries are unambiguous.
fn push_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u64).to_be_bytes());
    out.extend_from_slice(bytes);
}

/// HKDF-Extract (RFC 5869 §2.2).
fn extract(salt: &[u8], ikm: &[u8]) -> [u8; 32] {
    let (prk, _) = Hkdf::<Sha256>::extract(Some(salt), ikm);
    prk.into()
}

/// HKDF-Expand (RFC 5869 §2.3) for L = 32: the single block `T(1) = HMAC(PRK, info || 0x01)`,
/// with `info = label || window (u64 big-endian)`. Written out because the crate's `expand`
/// returns a `Result` that cannot fail for 32 bytes; a test checks both agree.
fn expand(prk: &[u8; 32], label: &[u8], window: Option<Window>) -> [u8; 32] {
    let mut mac = <Hmac<Sha256> as HmacImpl>::new_from_slice(prk);
    mac.update(label);
    if let Some(w) = window {
        mac.update(&w.to_be_bytes());
    }
    mac.update(&[1]);
    mac.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::{NetworkToken, Otp, OtpParams};

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The token behind the frozen vectors.
    fn vector_token() -> NetworkToken {
        NetworkToken {
            otp: Otp {
                dht: OtpParams {
                    interval: 9000,
                    key: "dhtKEYdhtKEYdhtKEYdhtKEYdhtKEYdhtKEYdhtKEYd".into(),
                    length: 43,
                },
                crypto: OtpParams {
                    interval: 9000,
                    key: "cryptoKEYcryptoKEYcryptoKEYcryptoKEYcryptoK".into(),
                    length: 43,
                },
            },
            room: "roomROOMroomROOMroomROOMroomROOMroomROOMroo".into(),
            rendezvous: "rdvRDVrdvRDVrdvRDVrdvRDVrdvRDVrdvRDVrdvRDVr".into(),
            mdns: "mdnsMDNSmdnsMDNSmdnsMDNSmdnsMDNSmdnsMDNSmdn".into(),
            max_message_size: 20_971_520,
        }
    }

    /// Frozen: computed once (and cross-checked with Python's hmac/hashlib HKDF); any change
    /// here breaks interoperability between versions.
    #[test]
    fn fixed_vectors() {
        let ks = vector_token().key_schedule();
        let rows: [(&str, [u8; 32], &str); 6] = [
            (
                "membership",
                ks.membership_key(),
                "553cb578b29588a4a1bfbc702113c6d73b2265e927803a96ccab132fe9ad562e",
            ),
            (
                "beacon(0)",
                ks.beacon_key(0),
                "db658793c8db98891beab749d9ecbea515b2518b5798c2ac39de48415c582640",
            ),
            (
                "beacon(1)",
                ks.beacon_key(1),
                "7a81dd6ba4bcbf3b3aaa7787f793576c782cac29d7145aa789461ef8777a339a",
            ),
            (
                "rendezvous(0)",
                ks.rendezvous_key(0),
                "3cdb03d6add793ef449807b4474a5f9c18abbc6cddceca8e46458b9ba41e2e0a",
            ),
            (
                "rendezvous(1)",
                ks.rendezvous_key(1),
                "1ed98e6a76800a53104ceac545a6bea3a431e5ab7a054fea4c54d00d22e9849c",
            ),
            (
                "rendezvous_seal(0)",
                ks.rendezvous_seal_key(0),
                "583bd7db167a84a1d8d105ef595ef2f3962ee6df3f19f5a15f9c5e80dbd41b42",
            ),
        ];
        for (name, got, want) in rows {
            assert_eq!(hex(&got), want, "{name}");
        }
    }

    #[test]
    fn all_keys_are_distinct() {
        let ks = vector_token().key_schedule();
        let mut keys = vec![ks.membership_key()];
        for w in [0, 1, 2, u64::MAX] {
            keys.extend([
                ks.beacon_key(w),
                ks.rendezvous_key(w),
                ks.rendezvous_seal_key(w),
            ]);
        }
        let mut unique = keys.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), keys.len());
    }

    #[test]
    fn same_key_in_both_streams_still_gives_distinct_keys() {
        let mut t = vector_token();
        t.otp.dht.key = t.otp.crypto.key.clone();
        let ks = t.key_schedule();
        assert_ne!(ks.beacon_key(0), ks.rendezvous_key(0));
        assert_ne!(ks.beacon_key(0), ks.rendezvous_seal_key(0));
    }

    #[test]
    fn membership_depends_on_every_field() {
        let base = vector_token().key_schedule().membership_key();
        let edits: [fn(&mut NetworkToken); 10] = [
            |t| t.otp.dht.interval += 1,
            |t| t.otp.dht.key.push('x'),
            |t| t.otp.dht.length += 1,
            |t| t.otp.crypto.interval += 1,
            |t| t.otp.crypto.key.push('x'),
            |t| t.otp.crypto.length += 1,
            |t| t.room.push('x'),
            |t| t.rendezvous.push('x'),
            |t| t.mdns.push('x'),
            |t| t.max_message_size += 1,
        ];
        for (i, edit) in edits.iter().enumerate() {
            let mut t = vector_token();
            edit(&mut t);
            assert_ne!(t.key_schedule().membership_key(), base, "edit {i}");
        }
        // Length prefixes: moving a character between adjacent fields changes the key.
        let mut t = vector_token();
        let c = t.room.pop().unwrap();
        t.rendezvous.insert(0, c);
        assert_ne!(t.key_schedule().membership_key(), base);
    }

    #[test]
    fn expand_matches_the_hkdf_crate() {
        let prk = extract(LABEL_BEACON, b"some key");
        let mut info = LABEL_BEACON.to_vec();
        info.extend_from_slice(&7u64.to_be_bytes());
        let mut okm = [0u8; 32];
        Hkdf::<Sha256>::from_prk(&prk)
            .unwrap()
            .expand(&info, &mut okm)
            .unwrap();
        assert_eq!(expand(&prk, LABEL_BEACON, Some(7)), okm);
        let mut okm = [0u8; 32];
        Hkdf::<Sha256>::new(Some(LABEL_MEMBERSHIP), b"ikm")
            .expand(LABEL_MEMBERSHIP, &mut okm)
            .unwrap();
        assert_eq!(
            expand(&extract(LABEL_MEMBERSHIP, b"ikm"), LABEL_MEMBERSHIP, None),
            okm
        );
    }

    #[test]
    fn window_boundaries() {
        let rows: [(u64, u64, Window); 10] = [
            (0, 9000, 0),
            (8999, 9000, 0),
            (9000, 9000, 1),
            (17_999, 9000, 1),
            (18_000, 9000, 2),
            (u64::MAX, 9000, u64::MAX / 9000),
            (u64::MAX, 1, u64::MAX),
            (1_700_000_000, NEVER_ROTATE, 0),
            (u64::MAX, NEVER_ROTATE, 0),
            (u64::MAX, 0, 0),
        ];
        for (unix, interval, want) in rows {
            assert_eq!(window_at(unix, interval), want, "{unix} / {interval}");
        }
        let ks = vector_token().key_schedule();
        assert_eq!(ks.crypto_window(8999), 0);
        assert_eq!(ks.crypto_window(9000), 1);
        assert_eq!(ks.dht_window(9000), 1);
        let mut t = vector_token();
        t.otp.crypto.interval = NEVER_ROTATE;
        t.otp.dht.interval = NEVER_ROTATE;
        let ks = t.key_schedule();
        assert_eq!(ks.crypto_window(u64::MAX), 0);
        assert_eq!(ks.dht_window(1_700_000_000), 0);
        assert!(!ks.crypto_rotates());
        assert_eq!(
            ks.dht_windows_in_use(0).collect::<Vec<_>>(),
            [0],
            "no window 1 without rotation"
        );
    }

    #[test]
    fn accepted_windows_saturate_without_duplicates() {
        let rows: [(Window, &[Window]); 3] = [
            (0, &[0, 1]),
            (5, &[5, 4, 6]),
            (u64::MAX, &[u64::MAX, u64::MAX - 1]),
        ];
        for (current, want) in rows {
            assert_eq!(accepted_windows(current).collect::<Vec<_>>(), want);
        }
    }

    #[test]
    fn debug_is_redacted() {
        let ks = vector_token().key_schedule();
        let text = format!("{ks:?}");
        for secret in [
            ks.membership_key(),
            ks.crypto_prk,
            ks.dht_prk,
            ks.beacon_key(0),
        ] {
            assert!(!text.contains(&hex(&secret)));
            assert!(!text.contains(&format!("{secret:?}")));
        }
        assert!(text.contains("<redacted>"), "{text}");
    }
}
