//! The LAN beacon: one sealed UDP datagram saying "peer P listens for QUIC on these addresses".
//!
//! # Wire format (version 1)
//!
//! ```text
//! offset  size  field
//! 0       1     packet type and version: 0x11 (type 0x1_, version _1)
//! 1       8     crypto window (u64 big-endian), in clear
//! 9       12    AEAD nonce
//! 21      n+16  ChaCha20-Poly1305(beacon_key(window), nonce, aad = bytes 0..21, body)
//! ```
//!
//! The body (plaintext) is, with [`crate::wire`] encodings:
//!
//! ```text
//! peer id (32) | sent_at_unix_ms (u64) | nonce (u64) | count (u16, <= 8) | count x socket addr
//! | zero padding up to 208 bytes
//! ```
//!
//! Every beacon this build seals is exactly [`SEALED_LEN`] (245) bytes: the padding hides how many
//! addresses (and of which family) the sender has. Anything longer than [`MAX_BEACON_LEN`] (512)
//! is rejected before any cryptography.
//!
//! # Decisions
//!
//! - **First byte 0x11.** Every QUIC v1 packet has the fixed bit 0x40 set (RFC 9000 §17), so a
//!   receiver sharing the overlay socket can tell a beacon from QUIC by its first byte
//!   ([`looks_like_beacon`]). This holds only while QUIC "greasing" of that bit (RFC 9287) is off:
//!   the overlay must build its quinn-proto `EndpointConfig` with `grease_quic_bit(false)`, or a
//!   driver should hand packets that fail [`Beacon::open`] on to QUIC.
//! - **Window in clear.** The receiver rejects a window outside
//!   [`accepted_windows`](crate::token::accepted_windows) of its own clock before deriving any key
//!   or running the AEAD, so garbage costs one comparison and at most one decryption (trying the
//!   three accepted windows would cost three), and a clock too far off is reported as
//!   [`BeaconError::WindowNotAccepted`] instead of a bare authentication failure. What it reveals
//!   is the sender's clock divided by the rotation interval, i.e. roughly the time of day, which
//!   an observer knows anyway. The window is authenticated (associated data) and must match the
//!   window of the sealed `sent_at_unix_ms`.
//! - **Synthetic nonce.** The 12-byte AEAD nonce is `HMAC-SHA256(nonce_key, header || body)`
//!   truncated, with `nonce_key = HMAC-SHA256(beacon_key, "kairos-p2p v1 beacon nonce")`. It looks
//!   random to outsiders, and two nonces can only collide when the whole plaintext (peer id,
//!   timestamp, random `nonce`) is the same, so ChaCha20-Poly1305's one rule (never reuse a nonce
//!   with different plaintexts under one key) holds even if two nodes were started with the same
//!   [`Rng`](crate::rng::Rng) seed or under a `NEVER_ROTATE` key used for years.
//! - **Nothing readable outside the seal.** No peer id, address or network tag is in clear; an
//!   outsider sees a constant-length random-looking datagram, the window and the type byte.
//!
//! [`Beacon::open`] checks format, window and authenticity only; freshness, replays and own
//! beacons need state and are checked by [`LanDiscovery`](super::lan::LanDiscovery), which reports
//! them with the same [`BeaconError`].

use std::fmt;
use std::net::SocketAddr;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use hkdf::HmacImpl;
use hkdf::hmac::Hmac;
use sha2::Sha256;

use crate::identity::PeerId;
use crate::token::{KeySchedule, Window, accepted_windows};
use crate::wire::{Reader, WireError, Writer};

/// Type and version byte of a version-1 beacon (bit 0x40 clear: never a QUIC v1 packet).
pub const BEACON_TYPE_V1: u8 = 0x11;
/// Type bits shared by every beacon version (`0x10..=0x1f`); the low nibble is the version.
const BEACON_TYPE_MASK: u8 = 0xf0;
const BEACON_TYPE: u8 = 0x10;
/// Largest number of addresses a beacon carries.
pub const MAX_ADDRS: usize = 8;
/// Hard cap on a beacon datagram; longer input is rejected before decryption.
pub const MAX_BEACON_LEN: usize = 512;
/// Clear header: type byte, window, AEAD nonce.
pub const HEADER_LEN: usize = 1 + 8 + NONCE_LEN;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
/// Plaintext body length after padding: fits 8 IPv6 addresses (32 + 8 + 8 + 2 + 8 x 19 = 202).
pub const PADDED_BODY_LEN: usize = 208;
/// Length of every beacon this build seals.
pub const SEALED_LEN: usize = HEADER_LEN + PADDED_BODY_LEN + TAG_LEN;

const LABEL_NONCE: &[u8] = b"kairos-p2p v1 beacon nonce";

/// The contents of a beacon (what is sealed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Beacon {
    /// The sender.
    pub peer: PeerId,
    /// The sender's QUIC listen addresses, at most [`MAX_ADDRS`]. An unspecified IP
    /// (`0.0.0.0:port`, `[::]:port`) means "the source IP of this datagram, this port".
    pub addrs: Vec<SocketAddr>,
    /// Sender's wall clock when sealing, milliseconds since the Unix epoch; strictly increasing
    /// per sender. Its window (`sent_at_unix_ms / 1000` through the key schedule) is the window
    /// in the header.
    pub sent_at_unix_ms: u64,
    /// Random per beacon; `(peer, nonce)` identifies a beacon for replay detection.
    pub nonce: u64,
}

/// Why a beacon was not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BeaconError {
    /// Malformed: not a beacon, unsupported version, truncated, over [`MAX_BEACON_LEN`], or a bad
    /// body (after authentication: a buggy member).
    Wire(WireError),
    /// Authentication failed: sealed under another token, or modified on the way.
    Decrypt,
    /// The header's window is not one the receiver accepts at its current time (clock skew of
    /// more than one rotation interval, or garbage).
    WindowNotAccepted {
        /// Window in the header.
        window: Window,
        /// The receiver's current window.
        current: Window,
    },
    /// `sent_at_unix_ms` is outside the freshness window around the receiver's clock (rotating
    /// tokens only).
    Stale {
        /// The beacon's timestamp.
        sent_at_unix_ms: u64,
        /// The receiver's clock.
        now_unix_ms: u64,
    },
    /// Not newer than the last beacon accepted from the same peer (an older beacon replayed, or
    /// the sender's clock went back; see the `lan` module for the restart rule).
    OutOfOrder {
        /// The beacon's timestamp.
        sent_at_unix_ms: u64,
        /// Timestamp of the last beacon accepted from that peer.
        last_unix_ms: u64,
    },
    /// The same `(peer, nonce)` was accepted recently: an exact replay.
    Replay,
    /// Our own beacon (broadcasts loop back).
    SelfBeacon,
}

impl fmt::Display for BeaconError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Wire(e) => write!(f, "malformed beacon: {e}"),
            Self::Decrypt => {
                f.write_str("beacon failed authentication (other network or modified)")
            }
            Self::WindowNotAccepted { window, current } => {
                write!(
                    f,
                    "beacon key window {window} not accepted in window {current} (clock skew?)"
                )
            }
            Self::Stale {
                sent_at_unix_ms,
                now_unix_ms,
            } => write!(
                f,
                "stale beacon: sent at {sent_at_unix_ms} ms, now {now_unix_ms} ms (clock skew or replay)"
            ),
            Self::OutOfOrder {
                sent_at_unix_ms,
                last_unix_ms,
            } => write!(
                f,
                "beacon sent at {sent_at_unix_ms} ms is not newer than the last one ({last_unix_ms} ms)"
            ),
            Self::Replay => f.write_str("replayed beacon"),
            Self::SelfBeacon => f.write_str("own beacon"),
        }
    }
}

impl std::error::Error for BeaconError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Wire(e) => Some(e),
            _ => None,
        }
    }
}

impl From<WireError> for BeaconError {
    fn from(e: WireError) -> Self {
        Self::Wire(e)
    }
}

/// True when `bytes` starts like a beacon of some version (first byte `0x10..=0x1f`). A driver
/// that receives beacons on the overlay socket uses it to route datagrams; see the module doc for
/// QUIC bit greasing.
#[must_use]
pub fn looks_like_beacon(bytes: &[u8]) -> bool {
    bytes
        .first()
        .is_some_and(|b| b & BEACON_TYPE_MASK == BEACON_TYPE)
}

impl Beacon {
    /// Seals the beacon under `keys`, in the window of `sent_at_unix_ms`. Fails only when there
    /// are more than [`MAX_ADDRS`] addresses.
    pub fn seal(&self, keys: &KeySchedule) -> Result<Vec<u8>, BeaconError> {
        let window = keys.crypto_window(self.sent_at_unix_ms / 1000);
        let mut body = Vec::with_capacity(PADDED_BODY_LEN + TAG_LEN);
        let mut w = Writer::new(&mut body);
        w.peer_id(&self.peer)
            .u64(self.sent_at_unix_ms)
            .u64(self.nonce);
        w.count("beacon addresses", MAX_ADDRS, self.addrs.len())?;
        for addr in &self.addrs {
            w.socket_addr(addr);
        }
        // At most 202 bytes were written (MAX_ADDRS IPv6 addresses), so this only pads.
        body.resize(PADDED_BODY_LEN.max(body.len()), 0);

        let key = keys.beacon_key(window);
        let mut packet = Vec::with_capacity(SEALED_LEN);
        packet.push(BEACON_TYPE_V1);
        packet.extend_from_slice(&window.to_be_bytes());
        let nonce = synthetic_nonce(&key, &packet, &body);
        packet.extend_from_slice(&nonce);
        let cipher = ChaCha20Poly1305::new(&Key::from(key));
        let sealed = cipher
            .encrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: &body,
                    aad: &packet,
                },
            )
            .map_err(|_| BeaconError::Wire(WireError::Invalid("beacon too long to seal")))?;
        packet.extend_from_slice(&sealed);
        Ok(packet)
    }

    /// Opens a beacon received at `unix_secs` (the receiver's clock): checks the size cap, the
    /// type byte, that the window is accepted, authenticity, then decodes the body. Never panics.
    pub fn open(keys: &KeySchedule, unix_secs: u64, bytes: &[u8]) -> Result<Beacon, BeaconError> {
        if bytes.len() > MAX_BEACON_LEN {
            return Err(WireError::TooLong {
                field: "beacon",
                len: bytes.len(),
                max: MAX_BEACON_LEN,
            }
            .into());
        }
        let mut r = Reader::new(bytes);
        match r.u8()? {
            BEACON_TYPE_V1 => {}
            t if t & BEACON_TYPE_MASK == BEACON_TYPE => {
                return Err(WireError::UnsupportedVersion(t & !BEACON_TYPE_MASK).into());
            }
            tag => {
                return Err(WireError::UnknownTag {
                    field: "packet type",
                    tag,
                }
                .into());
            }
        }
        let window = r.u64()?;
        let nonce: [u8; NONCE_LEN] = r.array()?;
        if r.remaining() < TAG_LEN {
            return Err(WireError::Truncated {
                needed: TAG_LEN,
                remaining: r.remaining(),
            }
            .into());
        }
        let current = keys.crypto_window(unix_secs);
        if !accepted_windows(current).any(|w| w == window) {
            return Err(BeaconError::WindowNotAccepted { window, current });
        }
        let (header, ciphertext) =
            bytes
                .split_at_checked(HEADER_LEN)
                .ok_or(WireError::Truncated {
                    needed: HEADER_LEN,
                    remaining: bytes.len(),
                })?;
        let cipher = ChaCha20Poly1305::new(&Key::from(keys.beacon_key(window)));
        let body = cipher
            .decrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: ciphertext,
                    aad: header,
                },
            )
            .map_err(|_| BeaconError::Decrypt)?;
        let beacon = decode_body(&body)?;
        if keys.crypto_window(beacon.sent_at_unix_ms / 1000) != window {
            return Err(WireError::Invalid("beacon window does not match its timestamp").into());
        }
        Ok(beacon)
    }
}

fn decode_body(body: &[u8]) -> Result<Beacon, WireError> {
    let mut r = Reader::new(body);
    let peer = r.peer_id()?;
    let sent_at_unix_ms = r.u64()?;
    let nonce = r.u64()?;
    let count = r.count("beacon addresses", MAX_ADDRS)?;
    let mut addrs = Vec::with_capacity(count);
    for _ in 0..count {
        addrs.push(r.socket_addr()?);
    }
    if r.rest().iter().any(|&b| b != 0) {
        return Err(WireError::Invalid("beacon padding is not zero"));
    }
    Ok(Beacon {
        peer,
        addrs,
        sent_at_unix_ms,
        nonce,
    })
}

/// `HMAC(HMAC(key, LABEL_NONCE), header || body)[..12]`: distinct for distinct plaintexts.
fn synthetic_nonce(key: &[u8; 32], header: &[u8], body: &[u8]) -> [u8; NONCE_LEN] {
    let mut sub = <Hmac<Sha256> as HmacImpl>::new_from_slice(key);
    sub.update(LABEL_NONCE);
    let sub_key: [u8; 32] = sub.finalize().into();
    let mut mac = <Hmac<Sha256> as HmacImpl>::new_from_slice(&sub_key);
    mac.update(header);
    mac.update(body);
    let full: [u8; 32] = mac.finalize().into();
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&full[..NONCE_LEN]);
    nonce
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;
    use crate::rng::Rng;
    use crate::token::{NEVER_ROTATE, NetworkToken};

    /// A key schedule from a token generated with a seeded generator.
    fn keys(seed: u64, interval: u64) -> KeySchedule {
        let mut rng = Rng::from_seed(seed);
        NetworkToken::generate_with(interval, &mut |b: &mut [u8]| rng.fill(b)).key_schedule()
    }

    fn beacon(sent_at_unix_ms: u64) -> Beacon {
        Beacon {
            peer: Identity::from_seed([7; 32]).peer_id(),
            addrs: vec![
                "10.77.3.9:7120".parse().unwrap(),
                "[fd00::5]:7120".parse().unwrap(),
            ],
            sent_at_unix_ms,
            nonce: 0x0123_4567_89ab_cdef,
        }
    }

    const NOW: u64 = 1_750_000_000;

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn seal_open_round_trip_with_constant_length() {
        let ks = keys(1, 9000);
        let b = beacon(NOW * 1000 + 123);
        let sealed = b.seal(&ks).unwrap();
        assert_eq!(sealed.len(), SEALED_LEN);
        assert_eq!(
            SEALED_LEN, 245,
            "the idle cost in the lan module doc assumes 245 bytes"
        );
        assert_eq!(sealed[0], BEACON_TYPE_V1);
        assert_eq!(sealed[0] & 0x40, 0, "never mistaken for QUIC");
        assert!(looks_like_beacon(&sealed));
        assert_eq!(Beacon::open(&ks, NOW, &sealed), Ok(b.clone()));

        let mut full = b.clone();
        full.addrs = (0..MAX_ADDRS as u16)
            .map(|i| SocketAddr::new("fe80::1".parse().unwrap(), i))
            .collect();
        let sealed_full = full.seal(&ks).unwrap();
        assert_eq!(
            sealed_full.len(),
            SEALED_LEN,
            "length does not reveal the address count"
        );
        assert_eq!(Beacon::open(&ks, NOW, &sealed_full), Ok(full));

        let mut empty = b;
        empty.addrs.clear();
        assert_eq!(Beacon::open(&ks, NOW, &empty.seal(&ks).unwrap()), Ok(empty));
    }

    #[test]
    fn too_many_addresses_do_not_seal() {
        let mut b = beacon(NOW * 1000);
        b.addrs = vec!["10.0.0.1:1".parse().unwrap(); MAX_ADDRS + 1];
        assert!(matches!(
            b.seal(&keys(1, 9000)),
            Err(BeaconError::Wire(WireError::TooLong { .. }))
        ));
    }

    #[test]
    fn another_token_cannot_open_and_sees_no_identity_or_address() {
        let ours = keys(1, 9000);
        let theirs = keys(2, 9000);
        let b = beacon(NOW * 1000);
        let sealed = b.seal(&ours).unwrap();
        assert_eq!(
            Beacon::open(&theirs, NOW, &sealed),
            Err(BeaconError::Decrypt)
        );
        assert!(!contains(&sealed, b.peer.as_bytes()));
        assert!(!contains(&sealed, &b.peer.as_bytes()[..6]));
        assert!(!contains(&sealed, &[10, 77, 3, 9]));
        let v6: std::net::Ipv6Addr = "fd00::5".parse().unwrap();
        assert!(!contains(&sealed, &v6.octets()));
        // Same contents, same key: the synthetic nonce repeats only for identical plaintext.
        assert_eq!(b.seal(&ours).unwrap(), sealed);
        let mut other = b.clone();
        other.nonce += 1;
        assert_ne!(other.seal(&ours).unwrap()[9..21], sealed[9..21]);
    }

    #[test]
    fn every_single_byte_change_fails() {
        let ks = keys(3, 9000);
        let sealed = beacon(NOW * 1000).seal(&ks).unwrap();
        for i in 0..sealed.len() {
            for flip in [0x01u8, 0x40, 0x80, 0xff] {
                let mut bad = sealed.clone();
                bad[i] ^= flip;
                let res = Beacon::open(&ks, NOW, &bad);
                assert!(res.is_err(), "byte {i} ^ {flip:#x} accepted");
                if i >= 9 {
                    assert_eq!(res, Err(BeaconError::Decrypt), "byte {i}");
                }
            }
        }
    }

    #[test]
    fn truncated_oversize_and_foreign_input_are_typed_errors() {
        let ks = keys(4, 9000);
        let sealed = beacon(NOW * 1000).seal(&ks).unwrap();
        // Shortest input worth decrypting: a header, an empty body and a tag.
        const MIN_SEALED: usize = HEADER_LEN + TAG_LEN;
        for cut in 0..sealed.len() {
            let res = Beacon::open(&ks, NOW, &sealed[..cut]);
            let ok = match cut {
                0..MIN_SEALED => {
                    matches!(res, Err(BeaconError::Wire(WireError::Truncated { .. })))
                }
                _ => res == Err(BeaconError::Decrypt),
            };
            assert!(ok, "cut at {cut}: {res:?}");
        }
        let mut long = sealed.clone();
        long.resize(MAX_BEACON_LEN + 1, 0);
        assert!(matches!(
            Beacon::open(&ks, NOW, &long),
            Err(BeaconError::Wire(WireError::TooLong {
                len: 513,
                max: 512,
                ..
            }))
        ));
        let mut v2 = sealed.clone();
        v2[0] = 0x12;
        assert_eq!(
            Beacon::open(&ks, NOW, &v2),
            Err(BeaconError::Wire(WireError::UnsupportedVersion(2)))
        );
        let mut quic = sealed;
        quic[0] = 0xc3;
        assert!(!looks_like_beacon(&quic));
        assert!(matches!(
            Beacon::open(&ks, NOW, &quic),
            Err(BeaconError::Wire(WireError::UnknownTag { tag: 0xc3, .. }))
        ));
    }

    #[test]
    fn random_buffers_never_open_and_never_panic() {
        let ks = keys(5, 9000);
        let window = ks.crypto_window(NOW);
        let mut rng = Rng::from_seed(5);
        for i in 0..4000 {
            let len = rng.below(600) as usize;
            let mut buf = vec![0u8; len];
            rng.fill(&mut buf);
            // Half of them get a valid header so they reach the AEAD and the body decoder.
            if i % 2 == 0 && len > 9 {
                buf[0] = BEACON_TYPE_V1;
                buf[1..9].copy_from_slice(&window.to_be_bytes());
            }
            let res = Beacon::open(&ks, NOW, &buf);
            assert!(res.is_err(), "random buffer {i} opened");
        }
    }

    #[test]
    fn accepted_across_one_window_boundary_but_not_two() {
        let ks = keys(6, 100);
        // Sealed in the last millisecond of window 17, received in window 18.
        let sent = beacon(1_799_999);
        let sealed = sent.seal(&ks).unwrap();
        assert_eq!(sealed[1..9], 17u64.to_be_bytes());
        assert_eq!(Beacon::open(&ks, 1_800, &sealed), Ok(sent.clone()));
        // A receiver whose clock is slightly behind (still in window 16) accepts it too.
        assert_eq!(Beacon::open(&ks, 1_650, &sealed), Ok(sent));
        assert_eq!(
            Beacon::open(&ks, 1_900, &sealed),
            Err(BeaconError::WindowNotAccepted {
                window: 17,
                current: 19
            })
        );
    }

    #[test]
    fn window_is_bound_to_the_timestamp() {
        // A member that seals with a header window not matching its timestamp is rejected.
        let ks = keys(7, 100);
        let b = beacon(1_000_000);
        let key = ks.beacon_key(11);
        let mut body = Vec::new();
        let mut w = Writer::new(&mut body);
        w.peer_id(&b.peer)
            .u64(b.sent_at_unix_ms)
            .u64(b.nonce)
            .u16(0);
        let mut packet = vec![BEACON_TYPE_V1];
        packet.extend_from_slice(&11u64.to_be_bytes());
        packet.extend_from_slice(&[9; NONCE_LEN]);
        let ct = ChaCha20Poly1305::new(&Key::from(key))
            .encrypt(
                &Nonce::from([9; NONCE_LEN]),
                Payload {
                    msg: &body,
                    aad: &packet,
                },
            )
            .unwrap();
        packet.extend_from_slice(&ct);
        assert!(matches!(
            Beacon::open(&ks, 1_100, &packet),
            Err(BeaconError::Wire(WireError::Invalid(_)))
        ));
    }

    #[test]
    fn never_rotating_tokens_ignore_the_clock() {
        let ks = keys(8, NEVER_ROTATE);
        let sent = beacon(5_000); // a board that booted in 1970
        let sealed = sent.seal(&ks).unwrap();
        assert_eq!(sealed[1..9], 0u64.to_be_bytes());
        assert_eq!(Beacon::open(&ks, NOW, &sealed), Ok(sent));
    }
}
