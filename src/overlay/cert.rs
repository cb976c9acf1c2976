//! The node certificate: a minimal self-signed X.509 v3 certificate, DER written by hand.
//!
//! Every node presents the same fixed template; only three holes differ between nodes:
//!
//! ```text
//! Certificate ::= SEQUENCE {
//!   tbsCertificate SEQUENCE {
//!     version              [0] EXPLICIT INTEGER 2 (v3)
//!     serialNumber         INTEGER 1
//!     signature            AlgorithmIdentifier { id-Ed25519 1.3.101.112 }
//!     issuer               Name { CN = UTF8String "kairos-p2p" }
//!     validity             { notBefore UTCTime 700101000000Z,
//!                            notAfter  GeneralizedTime 99991231235959Z }
//!     subject              Name { CN = UTF8String "kairos-p2p" }
//!     subjectPublicKeyInfo { id-Ed25519, BIT STRING <node public key = peer id> }   -- hole 1
//!     extensions      [3]  { Extension { extnID MEMBERSHIP_PROOF_OID, critical absent (false),
//!                                        extnValue OCTET STRING { OCTET STRING (32) proof } } }
//!   }                                                                                -- hole 2
//!   signatureAlgorithm     AlgorithmIdentifier { id-Ed25519 }
//!   signatureValue         BIT STRING <Ed25519 signature of tbsCertificate by the node key>  -- hole 3
//! }
//! ```
//!
//! - Validity: RFC 5280 §4.1.2.5 requires UTCTime for dates before 2050 and names
//!   99991231235959Z (GeneralizedTime) as "no well-defined expiration". The window is that wide
//!   on purpose: boards without an RTC boot in 1970, and nothing here trusts dates.
//! - The membership proof is `HMAC-SHA256(membership_key, "kairos-p2p v1 cert proof" || public
//!   key)` with the token's [`KeySchedule::membership_key`](crate::token::KeySchedule::membership_key):
//!   only a holder of the token can produce it, and it binds the proof to one peer id.
//! - [`MEMBERSHIP_PROOF_OID`] lives under `2.25` (ITU-T X.667: an OID made from a UUID, which
//!   anyone may mint without registration); the UUID `fbe808c2-1350-4f66-a7e9-a8aadbe16f05` was
//!   generated for this purpose, and its sub-arc `.1` is version 1 of the proof.
//!
//! The parser accepts exactly this template: the length must match, every byte outside the
//! three holes must equal the template, so there is no DER parsing of attacker input at all.
//! Verification then checks the key is a valid, non-weak Ed25519 point, the proof (in constant
//! time) and the self-signature (`verify_strict`).

use std::fmt;
use std::ops::Range;
use std::sync::OnceLock;

use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use hkdf::hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::identity::PeerId;

/// Dotted form of the membership-proof extension OID (see the module documentation).
pub const MEMBERSHIP_PROOF_OID: &str = "2.25.334841017448711625302113688190070124293.1";

/// DER content octets of [`MEMBERSHIP_PROOF_OID`].
const MEMBERSHIP_PROOF_OID_DER: [u8; 21] = [
    0x69, 0x83, 0xf7, 0xe8, 0x84, 0xb0, 0xc2, 0xb5, 0x82, 0xbd, 0xcd, 0xa7, 0xf4, 0xea, 0x95, 0xad,
    0xdf, 0x85, 0xde, 0x05, 0x01,
];

/// Domain-separation label of the membership proof MAC.
const PROOF_LABEL: &[u8] = b"kairos-p2p v1 cert proof";

/// Common name of issuer and subject.
pub const COMMON_NAME: &str = "kairos-p2p";

/// Length in bytes of every certificate this module emits.
pub const CERT_LEN: usize = 285;

/// Where the public key sits in the certificate.
const KEY_RANGE: Range<usize> = 114..146;
/// Where the membership proof sits.
const PROOF_RANGE: Range<usize> = 179..211;
/// Where the signed part (tbsCertificate, with its header) sits.
const TBS_RANGE: Range<usize> = 4..211;
/// Where the signature sits.
const SIG_RANGE: Range<usize> = 221..285;

/// Fixed fields of the template by end offset, for error messages.
const FIELDS: [(usize, &str); 15] = [
    (4, "certificate header"),
    (7, "tbsCertificate header"),
    (12, "version"),
    (15, "serialNumber"),
    (22, "signature algorithm"),
    (45, "issuer"),
    (79, "validity"),
    (102, "subject"),
    (114, "subjectPublicKeyInfo header"),
    (146, "subject public key"),
    (179, "membership extension header"),
    (211, "membership proof"),
    (218, "signatureAlgorithm"),
    (221, "signatureValue header"),
    (285, "signatureValue"),
];

/// Why a certificate was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertError {
    /// Not the length of our certificate template.
    Length {
        /// Length received.
        len: usize,
        /// The template's length.
        expected: usize,
    },
    /// A byte outside the key, proof and signature differs from the template.
    Shape {
        /// The template field it belongs to.
        field: &'static str,
        /// Offset of the first differing byte.
        offset: usize,
    },
    /// The public key is not a valid Ed25519 point, or is a weak (small-order) one.
    BadKey,
    /// The membership proof does not match our token: the peer is not a member.
    NotMember,
    /// The self-signature does not verify under the certificate's own key.
    BadSignature,
}

impl fmt::Display for CertError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Length { len, expected } => {
                write!(f, "certificate is {len} bytes, expected {expected}")
            }
            Self::Shape { field, offset } => {
                write!(f, "certificate field {field} (byte {offset}) is not ours")
            }
            Self::BadKey => f.write_str("certificate key is not a valid Ed25519 key"),
            Self::NotMember => f.write_str("certificate has no valid membership proof"),
            Self::BadSignature => f.write_str("certificate self-signature does not verify"),
        }
    }
}

impl std::error::Error for CertError {}

/// The variable parts of a certificate that matched the template (not yet verified).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CertFields<'a> {
    /// The subject public key: the peer id it claims.
    pub peer: PeerId,
    /// The membership proof it carries.
    pub proof: [u8; 32],
    /// The signed bytes (tbsCertificate).
    pub tbs: &'a [u8],
    /// The self-signature.
    pub signature: [u8; 64],
}

/// The membership proof for `peer` under `membership_key`.
#[must_use]
pub fn membership_proof(membership_key: &[u8; 32], peer: &PeerId) -> [u8; 32] {
    proof_mac(membership_key, peer)
        .finalize()
        .into_bytes()
        .into()
}

fn proof_mac(membership_key: &[u8; 32], peer: &PeerId) -> Hmac<Sha256> {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(membership_key)
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(PROOF_LABEL);
    mac.update(peer.as_bytes());
    mac
}

/// This node's certificate: its key, its membership proof, signed by itself.
#[must_use]
pub fn generate(key: &SigningKey, membership_key: &[u8; 32]) -> Vec<u8> {
    let peer = PeerId(key.verifying_key().to_bytes());
    encode(&peer, &membership_proof(membership_key, &peer), |tbs| {
        key.sign(tbs).to_bytes()
    })
}

/// Lays out a certificate for `peer` carrying `proof`, signed by `sign` over the tbsCertificate.
/// [`generate`] is the normal entry; tests use this to forge certificates.
pub(crate) fn encode(
    peer: &PeerId,
    proof: &[u8; 32],
    sign: impl FnOnce(&[u8]) -> [u8; 64],
) -> Vec<u8> {
    const ED25519_ALG: [u8; 7] = [0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70];
    let name = {
        let mut atv = Vec::new();
        tlv(&mut atv, 0x06, &[0x55, 0x04, 0x03]); // id-at-commonName
        tlv(&mut atv, 0x0c, COMMON_NAME.as_bytes()); // UTF8String
        let mut rdn = Vec::new();
        tlv(&mut rdn, 0x30, &atv);
        let mut set = Vec::new();
        tlv(&mut set, 0x31, &rdn);
        let mut name = Vec::new();
        tlv(&mut name, 0x30, &set);
        name
    };
    let mut validity = Vec::new();
    tlv(&mut validity, 0x17, b"700101000000Z"); // UTCTime
    tlv(&mut validity, 0x18, b"99991231235959Z"); // GeneralizedTime
    let mut spki = ED25519_ALG.to_vec();
    let mut bits = vec![0u8]; // no unused bits
    bits.extend_from_slice(peer.as_bytes());
    tlv(&mut spki, 0x03, &bits);
    let mut ext = Vec::new();
    tlv(&mut ext, 0x06, &MEMBERSHIP_PROOF_OID_DER);
    let mut inner = Vec::new();
    tlv(&mut inner, 0x04, proof);
    tlv(&mut ext, 0x04, &inner);
    let mut exts = Vec::new();
    tlv(&mut exts, 0x30, &ext);
    let mut exts_seq = Vec::new();
    tlv(&mut exts_seq, 0x30, &exts);

    let mut tbs_body = vec![0xa0, 0x03, 0x02, 0x01, 0x02]; // [0] EXPLICIT INTEGER 2
    tbs_body.extend_from_slice(&[0x02, 0x01, 0x01]); // serialNumber 1
    tbs_body.extend_from_slice(&ED25519_ALG);
    tbs_body.extend_from_slice(&name);
    tlv(&mut tbs_body, 0x30, &validity);
    tbs_body.extend_from_slice(&name);
    tlv(&mut tbs_body, 0x30, &spki);
    tlv(&mut tbs_body, 0xa3, &exts_seq);
    let mut tbs = Vec::new();
    tlv(&mut tbs, 0x30, &tbs_body);

    let signature = sign(&tbs);
    let mut body = tbs;
    body.extend_from_slice(&ED25519_ALG);
    let mut bits = vec![0u8];
    bits.extend_from_slice(&signature);
    tlv(&mut body, 0x03, &bits);
    let mut cert = Vec::with_capacity(CERT_LEN);
    tlv(&mut cert, 0x30, &body);
    cert
}

/// Appends a DER TLV (definite, minimal length; our contents stay under 64 KiB).
fn tlv(out: &mut Vec<u8>, tag: u8, content: &[u8]) {
    out.push(tag);
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else if len <= 0xff {
        out.extend_from_slice(&[0x81, len as u8]);
    } else {
        out.extend_from_slice(&[0x82, (len >> 8) as u8, len as u8]);
    }
    out.extend_from_slice(content);
}

/// The template with zeroed holes.
fn template() -> &'static [u8] {
    static TEMPLATE: OnceLock<Vec<u8>> = OnceLock::new();
    TEMPLATE.get_or_init(|| encode(&PeerId([0; 32]), &[0; 32], |_| [0; 64]))
}

fn in_hole(offset: usize) -> bool {
    KEY_RANGE.contains(&offset) || PROOF_RANGE.contains(&offset) || SIG_RANGE.contains(&offset)
}

/// Matches `der` against the template and extracts its variable parts. Checks nothing
/// cryptographic: use [`verify`].
pub fn parse(der: &[u8]) -> Result<CertFields<'_>, CertError> {
    if der.len() != CERT_LEN {
        return Err(CertError::Length {
            len: der.len(),
            expected: CERT_LEN,
        });
    }
    let template = template();
    if let Some(offset) = (0..CERT_LEN).find(|&i| !in_hole(i) && der[i] != template[i]) {
        let field = FIELDS
            .iter()
            .find(|(end, _)| offset < *end)
            .map_or("certificate", |(_, name)| name);
        return Err(CertError::Shape { field, offset });
    }
    let mut peer = [0u8; 32];
    peer.copy_from_slice(&der[KEY_RANGE]);
    let mut proof = [0u8; 32];
    proof.copy_from_slice(&der[PROOF_RANGE]);
    let mut signature = [0u8; 64];
    signature.copy_from_slice(&der[SIG_RANGE]);
    Ok(CertFields {
        peer: PeerId(peer),
        proof,
        tbs: &der[TBS_RANGE],
        signature,
    })
}

/// Parses `der` and checks it completely: a strong Ed25519 key, a membership proof valid under
/// `membership_key` (constant-time comparison) and a valid self-signature. Returns the peer id.
pub fn verify(der: &[u8], membership_key: &[u8; 32]) -> Result<PeerId, CertError> {
    let fields = parse(der)?;
    let key = VerifyingKey::from_bytes(fields.peer.as_bytes()).map_err(|_| CertError::BadKey)?;
    if key.is_weak() {
        return Err(CertError::BadKey);
    }
    // Cheap check first: non-members fail here without an Ed25519 verification.
    proof_mac(membership_key, &fields.peer)
        .verify_slice(&fields.proof)
        .map_err(|_| CertError::NotMember)?;
    key.verify_strict(fields.tbs, &Signature::from_bytes(&fields.signature))
        .map_err(|_| CertError::BadSignature)?;
    Ok(fields.peer)
}

/// Verifies an Ed25519 signature (strict: no weak keys, canonical S) by `peer` over `message`.
pub(crate) fn verify_signature(peer: &PeerId, message: &[u8], signature: &[u8]) -> bool {
    let Ok(signature) = <[u8; 64]>::try_from(signature) else {
        return false;
    };
    let Ok(key) = VerifyingKey::from_bytes(peer.as_bytes()) else {
        return false;
    };
    key.verify_strict(message, &Signature::from_bytes(&signature))
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEMBERSHIP: [u8; 32] = [0x11; 32];

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn peer_of(key: &SigningKey) -> PeerId {
        PeerId(key.verifying_key().to_bytes())
    }

    #[test]
    fn generated_certificate_round_trips() {
        let k = key(1);
        let der = generate(&k, &MEMBERSHIP);
        assert_eq!(der.len(), CERT_LEN);
        assert_eq!(verify(&der, &MEMBERSHIP), Ok(peer_of(&k)));
        let fields = parse(&der).unwrap();
        assert_eq!(fields.peer, peer_of(&k));
        assert_eq!(fields.proof, membership_proof(&MEMBERSHIP, &peer_of(&k)));
        assert_eq!(fields.tbs, &der[TBS_RANGE]);
        // Deterministic: Ed25519 signatures are, so the same key gives the same bytes.
        assert_eq!(generate(&k, &MEMBERSHIP), der);
    }

    #[test]
    fn holes_are_where_the_layout_says() {
        let peer = PeerId([0xd1; 32]);
        let der = encode(&peer, &[0xd2; 32], |tbs| {
            assert_eq!(tbs.len(), TBS_RANGE.len());
            [0xd3; 64]
        });
        assert_eq!(der.len(), CERT_LEN);
        assert!(der[KEY_RANGE].iter().all(|&b| b == 0xd1));
        assert!(der[PROOF_RANGE].iter().all(|&b| b == 0xd2));
        assert!(der[SIG_RANGE].iter().all(|&b| b == 0xd3));
        let holes = der.iter().filter(|&&b| matches!(b, 0xd1..=0xd3)).count();
        assert_eq!(
            holes,
            32 + 32 + 64,
            "no other byte of the template uses those values"
        );
        assert_eq!(FIELDS.last().map(|f| f.0), Some(CERT_LEN));
        assert!(FIELDS.windows(2).all(|w| w[0].0 < w[1].0));
    }

    #[test]
    fn template_starts_like_a_der_certificate() {
        let der = generate(&key(2), &MEMBERSHIP);
        // SEQUENCE of 281 bytes holding a SEQUENCE of 204 bytes (tbsCertificate).
        assert_eq!(&der[..7], &[0x30, 0x82, 0x01, 0x19, 0x30, 0x81, 0xcc]);
        let text = String::from_utf8_lossy(&der);
        assert!(text.contains("kairos-p2p"));
        assert!(text.contains("700101000000Z") && text.contains("99991231235959Z"));
    }

    #[test]
    fn oid_bytes_encode_the_documented_uuid_arc() {
        let uuid: u128 = 0xfbe808c2_1350_4f66_a7e9_a8aadbe16f05;
        let mut arc = Vec::new();
        let mut n = uuid;
        arc.push((n & 0x7f) as u8);
        n >>= 7;
        while n > 0 {
            arc.push((n & 0x7f) as u8 | 0x80);
            n >>= 7;
        }
        arc.reverse();
        let mut expected = vec![40 * 2 + 25]; // 2.25
        expected.extend(arc);
        expected.push(1);
        assert_eq!(expected, MEMBERSHIP_PROOF_OID_DER);
        assert_eq!(
            MEMBERSHIP_PROOF_OID,
            format!("2.25.{uuid}.1"),
            "dotted form matches the bytes"
        );
    }

    #[test]
    fn another_token_is_not_a_member() {
        let der = generate(&key(3), &MEMBERSHIP);
        assert_eq!(verify(&der, &[0x22; 32]), Err(CertError::NotMember));
    }

    #[test]
    fn valid_proof_signed_by_another_key_fails() {
        let (victim, forger) = (key(4), key(5));
        let peer = peer_of(&victim);
        let der = encode(&peer, &membership_proof(&MEMBERSHIP, &peer), |tbs| {
            forger.sign(tbs).to_bytes()
        });
        assert_eq!(verify(&der, &MEMBERSHIP), Err(CertError::BadSignature));
    }

    #[test]
    fn weak_and_invalid_keys_are_refused() {
        // The identity point (small order), and the first y coordinate that is not on the curve.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        assert!(VerifyingKey::from_bytes(&identity).unwrap().is_weak());
        let not_on_curve = (2u8..)
            .map(|y| {
                let mut k = [0u8; 32];
                k[0] = y;
                k
            })
            .find(|k| VerifyingKey::from_bytes(k).is_err())
            .unwrap();
        for bytes in [identity, not_on_curve] {
            let peer = PeerId(bytes);
            let der = encode(&peer, &membership_proof(&MEMBERSHIP, &peer), |_| [0; 64]);
            assert_eq!(
                verify(&der, &MEMBERSHIP),
                Err(CertError::BadKey),
                "{bytes:?}"
            );
        }
    }

    #[test]
    fn every_mutation_fails_to_parse_or_to_verify() {
        let der = generate(&key(6), &MEMBERSHIP);
        let mut shape = 0;
        let mut crypto = 0;
        for i in 0..der.len() {
            for bit in 0..8 {
                let mut m = der.clone();
                m[i] ^= 1 << bit;
                match verify(&m, &MEMBERSHIP) {
                    Ok(p) => panic!("flip of bit {bit} at {i} accepted as {p}"),
                    Err(CertError::Shape { offset, .. }) => {
                        assert_eq!(offset, i);
                        shape += 1;
                    }
                    Err(_) => crypto += 1,
                }
            }
        }
        assert_eq!(crypto, 8 * (32 + 32 + 64));
        assert_eq!(shape + crypto, 8 * CERT_LEN);
        for cut in 0..der.len() {
            assert!(matches!(
                verify(&der[..cut], &MEMBERSHIP),
                Err(CertError::Length { .. })
            ));
        }
        let mut longer = der.clone();
        longer.push(0);
        assert!(matches!(
            verify(&longer, &MEMBERSHIP),
            Err(CertError::Length { .. })
        ));
    }

    #[test]
    fn shape_errors_name_the_field() {
        let mut der = generate(&key(7), &MEMBERSHIP);
        der[50] ^= 0xff;
        assert_eq!(
            parse(&der).unwrap_err(),
            CertError::Shape {
                field: "validity",
                offset: 50
            }
        );
        assert!(parse(&der).unwrap_err().to_string().contains("validity"));
    }

    #[test]
    fn handshake_signatures_verify_strictly() {
        let k = key(8);
        let sig = k.sign(b"hello").to_bytes();
        assert!(verify_signature(&peer_of(&k), b"hello", &sig));
        assert!(!verify_signature(&peer_of(&k), b"hellO", &sig));
        assert!(!verify_signature(&peer_of(&key(9)), b"hello", &sig));
        assert!(!verify_signature(&peer_of(&k), b"hello", &sig[..63]));
    }
}
