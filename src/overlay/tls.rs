//! TLS 1.3 for the overlay: mutual authentication of token members, nothing else.
//!
//! - TLS 1.3 only, ALPN [`ALPN`] (`kairos-p2p/1`: name and version, so a later version can be
//!   offered next to this one and refused or adapted to), X25519 key exchange, Ed25519
//!   signatures only, no resumption, no 0-RTT: every connection runs the full mutual handshake.
//! - Both sides present the node certificate of [`cert`] and accept only
//!   certificates that pass [`cert::verify`] under *our* token's membership key; the
//!   CertificateVerify signature is checked with ed25519-dalek against the certificate's key, so a
//!   copied certificate is useless without its private key. The peer id of the other side is the
//!   key of its certificate.
//! - **Non-members learn nothing.** In TLS 1.3 the server sends its certificate before it sees
//!   the client's, so the server presents one only when the ClientHello carries a ticket only
//!   members can compute: the SNI is `k` + base32(HMAC-SHA256(membership key, "kairos-p2p v1 sni
//!   ticket" || window)[..20]) (see [`sni_ticket`]). Without it the server aborts the handshake
//!   with an `access_denied` alert before any certificate or key share leaves it. `window` is the
//!   token's crypto-stream window (`KeySchedule::crypto_window`, set through
//!   [`Transport::set_ticket_window`](super::Transport::set_ticket_window)); the server accepts
//!   the previous and next window too. With a never-rotating token (Kairos' default) it is 0.
//! - Residual: the SNI travels in clear. An on-path observer of a member's ClientHello can replay
//!   it (within its window) and obtain that server's certificate: its peer id and a membership
//!   proof that is only a MAC of that id. The observer still cannot complete a handshake (it has
//!   no proof for its own key), and learns nothing of the network's traffic or token. It can
//!   also link connections carrying the same ticket to one network, as it could by addresses.
//! - Cipher suites: ChaCha20-Poly1305 first on CPUs without AES instructions (most Raspberry Pi
//!   boards, every armv7), AES-GCM first otherwise. A server without AES imposes its order; one
//!   with AES follows the client's, so the slower side of a pair gets its preferred suite.
//!   AES-128-GCM stays in the list on every CPU because QUIC's Initial packets need it.
//!
//! TLS randomness (ClientHello random, X25519 ephemeral keys) comes from the operating system
//! through *ring*, on purpose: it changes bytes but never sizes or timing, so a seeded
//! simulation still replays the same event trace.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use ed25519_dalek::Signer as _;
use hkdf::hmac::{Hmac, KeyInit, Mac};
use quinn_proto::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::Resumption;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::crypto::ring::{cipher_suite, default_provider, kx_group};
use rustls::pki_types::{CertificateDer, ServerName, SubjectPublicKeyInfoDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, NoServerSessionStorage, ResolvesServerCert};
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, SignatureAlgorithm,
    SignatureScheme, SupportedCipherSuite,
};
use sha2::Sha256;

use super::cert::{self, CertError};
use crate::identity::PeerId;
use crate::token::{Window, accepted_windows};

/// The ALPN protocol of this overlay, version 1.
pub const ALPN: &[u8] = b"kairos-p2p/1";

/// Domain-separation label of the SNI ticket.
const TICKET_LABEL: &[u8] = b"kairos-p2p v1 sni ticket";

/// Which cipher suites to prefer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CipherPreference {
    /// ChaCha20-Poly1305 first when the CPU has no AES instructions, AES-GCM first otherwise.
    #[default]
    Auto,
    /// ChaCha20-Poly1305 first.
    ChaCha20First,
    /// AES-GCM first.
    AesFirst,
}

impl CipherPreference {
    /// Whether ChaCha20-Poly1305 goes first on this machine.
    #[must_use]
    pub fn chacha_first(self) -> bool {
        match self {
            Self::Auto => !cpu_has_fast_aes(),
            Self::ChaCha20First => true,
            Self::AesFirst => false,
        }
    }
}

/// True when the CPU has AES instructions (and carry-less multiplication for GCM).
#[must_use]
pub fn cpu_has_fast_aes() -> bool {
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    {
        std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        // Rust's "aes" on aarch64 means FEAT_AES and FEAT_PMULL.
        std::arch::is_aarch64_feature_detected!("aes")
    }
    // armv7 boards (Raspberry Pi 2/3 in 32-bit mode) have no usable AES instructions.
    #[cfg(not(any(target_arch = "x86", target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

/// TLS 1.3 cipher suites in preference order.
#[must_use]
pub fn cipher_suites(chacha_first: bool) -> Vec<SupportedCipherSuite> {
    let aes = [
        cipher_suite::TLS13_AES_128_GCM_SHA256,
        cipher_suite::TLS13_AES_256_GCM_SHA384,
    ];
    let chacha = cipher_suite::TLS13_CHACHA20_POLY1305_SHA256;
    if chacha_first {
        vec![chacha, aes[0], aes[1]]
    } else {
        vec![aes[0], aes[1], chacha]
    }
}

/// The SNI ticket of `window` for the network whose membership key is `membership_key`: `k`
/// followed by 32 lowercase base32 characters (a valid DNS label).
#[must_use]
pub fn sni_ticket(membership_key: &[u8; 32], window: Window) -> String {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(membership_key)
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(TICKET_LABEL);
    mac.update(&window.to_be_bytes());
    let tag: [u8; 32] = mac.finalize().into_bytes().into();
    let mut out = String::with_capacity(33);
    out.push('k');
    base32_lower(&tag[..20], &mut out);
    out
}

/// RFC 4648 base32, lowercase, for inputs whose length is a multiple of 5 (no padding).
fn base32_lower(bytes: &[u8], out: &mut String) {
    const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
    for chunk in bytes.chunks(5) {
        let mut block = [0u8; 8];
        block[3..3 + chunk.len()].copy_from_slice(chunk);
        let v = u64::from_be_bytes(block);
        for i in (0..8).rev() {
            out.push(char::from(ALPHABET[((v >> (5 * i)) & 31) as usize]));
        }
    }
}

/// Constant-time equality of byte strings (the length is not secret).
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Why we refused the other side's certificate or handshake signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertRejection {
    /// The certificate itself failed (shape, key, membership proof or self-signature).
    Certificate(CertError),
    /// The peer sent a chain of this many certificates instead of exactly one.
    NotSingleCertificate(usize),
    /// A valid member, but not the peer we dialled.
    UnexpectedPeer {
        /// The peer id we asked for.
        expected: PeerId,
        /// The peer id the certificate proves.
        actual: PeerId,
    },
    /// The peer presented our own peer id (a connection to ourselves, or a cloned identity).
    OwnIdentity,
    /// The handshake signature (CertificateVerify) does not verify with the certificate's key:
    /// the peer does not hold the certificate's private key.
    HandshakeSignature,
    /// A handshake signature scheme other than Ed25519.
    UnsupportedScheme(u16),
}

impl fmt::Display for CertRejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Certificate(e) => write!(f, "{e}"),
            Self::NotSingleCertificate(n) => write!(f, "peer sent {n} certificates, expected 1"),
            Self::UnexpectedPeer { expected, actual } => {
                write!(f, "expected peer {expected}, got {actual}")
            }
            Self::OwnIdentity => f.write_str("peer presented our own peer id"),
            Self::HandshakeSignature => {
                f.write_str("handshake signature does not match the certificate key")
            }
            Self::UnsupportedScheme(s) => write!(f, "unsupported signature scheme {s:#06x}"),
        }
    }
}

impl std::error::Error for CertRejection {}

/// Counters shared by every verifier and resolver of one transport.
#[derive(Debug, Default)]
pub(crate) struct TlsCounters {
    /// Peer certificates that reached one of our verifiers.
    pub certs_received: AtomicU64,
    /// Of those, how many we refused (and handshake signatures refused).
    pub certs_rejected: AtomicU64,
    /// ClientHellos refused because they carried no valid SNI ticket.
    pub tickets_refused: AtomicU64,
}

/// What the TLS layer of one connection decided, read back by the transport when the handshake
/// fails, to report a typed reason.
#[derive(Debug, Default)]
pub(crate) struct HandshakeProbe {
    state: Mutex<ProbeState>,
}

#[derive(Debug, Default, Clone, Copy)]
struct ProbeState {
    rejection: Option<CertRejection>,
    ticket_refused: bool,
}

impl HandshakeProbe {
    fn with<R>(&self, f: impl FnOnce(&mut ProbeState) -> R) -> R {
        f(&mut self.state.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Why we refused the peer's certificate, if we did.
    pub fn rejection(&self) -> Option<CertRejection> {
        self.with(|s| s.rejection)
    }

    /// Whether we (as server) refused the ClientHello for want of a ticket.
    pub fn ticket_refused(&self) -> bool {
        self.with(|s| s.ticket_refused)
    }
}

/// The TLS side of a transport: our certificate and key, the token's membership key, and the
/// factories of per-connection rustls configurations.
pub(crate) struct TlsContext {
    provider: Arc<CryptoProvider>,
    certified: Arc<CertifiedKey>,
    membership: [u8; 32],
    local: PeerId,
    chacha_first: bool,
    window: Arc<AtomicU64>,
    counters: Arc<TlsCounters>,
    /// Tests only: send this SNI instead of our ticket.
    #[cfg(test)]
    pub sni_override: Option<String>,
}

impl fmt::Debug for TlsContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsContext")
            .field("local", &self.local)
            .field("chacha_first", &self.chacha_first)
            .finish_non_exhaustive()
    }
}

/// A rustls configuration could not be built (a bug or an unusable crypto provider).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfigError(pub String);

impl fmt::Display for TlsConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TLS configuration: {}", self.0)
    }
}

impl std::error::Error for TlsConfigError {}

fn config_err(e: impl fmt::Display) -> TlsConfigError {
    TlsConfigError(e.to_string())
}

impl TlsContext {
    /// Builds the context for `key`, presenting `cert_der` (normally [`cert::generate`]).
    pub fn new(
        key: &ed25519_dalek::SigningKey,
        cert_der: Vec<u8>,
        membership: [u8; 32],
        chacha_first: bool,
    ) -> Self {
        let mut provider = default_provider();
        provider.cipher_suites = cipher_suites(chacha_first);
        provider.kx_groups = vec![kx_group::X25519];
        let signing_key = Arc::new(NodeKey {
            key: Arc::new(key.clone()),
        });
        Self {
            provider: Arc::new(provider),
            certified: Arc::new(CertifiedKey::new(
                vec![CertificateDer::from(cert_der)],
                signing_key,
            )),
            membership,
            local: PeerId(key.verifying_key().to_bytes()),
            chacha_first,
            window: Arc::new(AtomicU64::new(0)),
            counters: Arc::new(TlsCounters::default()),
            #[cfg(test)]
            sni_override: None,
        }
    }

    /// The shared counters.
    pub fn counters(&self) -> &TlsCounters {
        &self.counters
    }

    /// Sets the ticket window (clients use it, servers accept it and its neighbours).
    pub fn set_window(&self, window: Window) {
        self.window.store(window, Ordering::Relaxed);
    }

    /// The SNI a client sends now.
    pub fn server_name(&self) -> String {
        #[cfg(test)]
        if let Some(name) = &self.sni_override {
            return name.clone();
        }
        sni_ticket(&self.membership, self.window.load(Ordering::Relaxed))
    }

    fn check(&self, expected: Option<PeerId>, probe: Arc<HandshakeProbe>) -> MemberCheck {
        MemberCheck {
            membership: self.membership,
            local: self.local,
            expected,
            probe,
            counters: self.counters.clone(),
        }
    }

    /// A client configuration for one connection, expecting `expected` if given.
    pub fn client_config(
        &self,
        expected: Option<PeerId>,
        probe: Arc<HandshakeProbe>,
    ) -> Result<Arc<QuicClientConfig>, TlsConfigError> {
        let config = self.rustls_client_config(expected, probe)?;
        Ok(Arc::new(
            QuicClientConfig::try_from(config).map_err(config_err)?,
        ))
    }

    /// A server configuration for one incoming connection.
    pub fn server_config(
        &self,
        probe: Arc<HandshakeProbe>,
    ) -> Result<Arc<QuicServerConfig>, TlsConfigError> {
        let config = self.rustls_server_config(probe)?;
        Ok(Arc::new(
            QuicServerConfig::try_from(config).map_err(config_err)?,
        ))
    }

    fn rustls_client_config(
        &self,
        expected: Option<PeerId>,
        probe: Arc<HandshakeProbe>,
    ) -> Result<rustls::ClientConfig, TlsConfigError> {
        let verifier = Arc::new(MemberServerVerifier(self.check(expected, probe)));
        let mut config = rustls::ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(config_err)?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_cert_resolver(Arc::new(SingleCertAndKey::from(self.certified.clone())));
        config.alpn_protocols = vec![ALPN.to_vec()];
        config.resumption = Resumption::disabled();
        config.enable_early_data = false;
        Ok(config)
    }

    fn rustls_server_config(
        &self,
        probe: Arc<HandshakeProbe>,
    ) -> Result<rustls::ServerConfig, TlsConfigError> {
        let verifier = Arc::new(MemberClientVerifier(self.check(None, probe.clone())));
        let resolver = Arc::new(TicketResolver {
            membership: self.membership,
            window: self.window.clone(),
            certified: self.certified.clone(),
            probe,
            counters: self.counters.clone(),
        });
        let mut config = rustls::ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(config_err)?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(resolver);
        config.alpn_protocols = vec![ALPN.to_vec()];
        // Without AES instructions our order (ChaCha20 first) wins; with them, the client's.
        config.ignore_client_order = self.chacha_first;
        config.session_storage = Arc::new(NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        config.max_early_data_size = 0;
        Ok(config)
    }
}

/// Our node key as a rustls signing key (no PKCS#8 round trip).
struct NodeKey {
    key: Arc<ed25519_dalek::SigningKey>,
}

impl fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("NodeKey(Ed25519, <redacted>)")
    }
}

/// DER SubjectPublicKeyInfo prefix of an Ed25519 key.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

impl rustls::sign::SigningKey for NodeKey {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn rustls::sign::Signer>> {
        if offered.contains(&SignatureScheme::ED25519) {
            Some(Box::new(NodeSigner {
                key: self.key.clone(),
            }))
        } else {
            None
        }
    }

    fn public_key(&self) -> Option<SubjectPublicKeyInfoDer<'_>> {
        let mut spki = ED25519_SPKI_PREFIX.to_vec();
        spki.extend_from_slice(self.key.verifying_key().as_bytes());
        Some(SubjectPublicKeyInfoDer::from(spki))
    }

    fn algorithm(&self) -> SignatureAlgorithm {
        SignatureAlgorithm::ED25519
    }
}

struct NodeSigner {
    key: Arc<ed25519_dalek::SigningKey>,
}

impl fmt::Debug for NodeSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("NodeSigner(Ed25519, <redacted>)")
    }
}

impl rustls::sign::Signer for NodeSigner {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        Ok(self.key.sign(message).to_bytes().to_vec())
    }

    fn scheme(&self) -> SignatureScheme {
        SignatureScheme::ED25519
    }
}

/// The checks both verifiers share.
struct MemberCheck {
    membership: [u8; 32],
    local: PeerId,
    expected: Option<PeerId>,
    probe: Arc<HandshakeProbe>,
    counters: Arc<TlsCounters>,
}

impl fmt::Debug for MemberCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemberCheck")
            .field("local", &self.local)
            .field("expected", &self.expected)
            .finish_non_exhaustive()
    }
}

impl MemberCheck {
    fn reject(&self, why: CertRejection) -> rustls::Error {
        self.counters.certs_rejected.fetch_add(1, Ordering::Relaxed);
        self.probe.with(|s| s.rejection = Some(why));
        log::debug!("refusing peer certificate: {why}");
        let kind = match why {
            CertRejection::Certificate(CertError::NotMember) | CertRejection::OwnIdentity => {
                CertificateError::ApplicationVerificationFailure
            }
            CertRejection::Certificate(CertError::BadSignature)
            | CertRejection::HandshakeSignature
            | CertRejection::UnsupportedScheme(_) => CertificateError::BadSignature,
            CertRejection::Certificate(_) | CertRejection::NotSingleCertificate(_) => {
                CertificateError::BadEncoding
            }
            CertRejection::UnexpectedPeer { .. } => CertificateError::NotValidForName,
        };
        rustls::Error::InvalidCertificate(kind)
    }

    fn verify_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
    ) -> Result<(), rustls::Error> {
        self.counters.certs_received.fetch_add(1, Ordering::Relaxed);
        if !intermediates.is_empty() {
            return Err(self.reject(CertRejection::NotSingleCertificate(intermediates.len() + 1)));
        }
        let peer = cert::verify(end_entity, &self.membership)
            .map_err(|e| self.reject(CertRejection::Certificate(e)))?;
        if peer == self.local {
            return Err(self.reject(CertRejection::OwnIdentity));
        }
        match self.expected {
            Some(expected) if expected != peer => Err(self.reject(CertRejection::UnexpectedPeer {
                expected,
                actual: peer,
            })),
            _ => Ok(()),
        }
    }

    fn verify_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        if dss.scheme != SignatureScheme::ED25519 {
            return Err(self.reject(CertRejection::UnsupportedScheme(u16::from(dss.scheme))));
        }
        let fields = cert::parse(cert).map_err(|e| self.reject(CertRejection::Certificate(e)))?;
        if cert::verify_signature(&fields.peer, message, dss.signature()) {
            Ok(HandshakeSignatureValid::assertion())
        } else {
            Err(self.reject(CertRejection::HandshakeSignature))
        }
    }
}

fn tls12_refused() -> rustls::Error {
    rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls12NotOffered)
}

/// Client side: checks the server's certificate.
#[derive(Debug)]
struct MemberServerVerifier(MemberCheck);

impl ServerCertVerifier for MemberServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.0.verify_cert(end_entity, intermediates)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(tls12_refused())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

/// Server side: requires and checks the client's certificate.
#[derive(Debug)]
struct MemberClientVerifier(MemberCheck);

impl ClientCertVerifier for MemberClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.0.verify_cert(end_entity, intermediates)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(tls12_refused())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

/// Server side: presents our certificate only to ClientHellos carrying a valid ticket.
struct TicketResolver {
    membership: [u8; 32],
    window: Arc<AtomicU64>,
    certified: Arc<CertifiedKey>,
    probe: Arc<HandshakeProbe>,
    counters: Arc<TlsCounters>,
}

impl fmt::Debug for TicketResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TicketResolver").finish_non_exhaustive()
    }
}

impl ResolvesServerCert for TicketResolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let current = self.window.load(Ordering::Relaxed);
        let valid = client_hello.server_name().is_some_and(|name| {
            // Check every accepted window, so timing does not tell which one matched.
            accepted_windows(current).fold(false, |ok, w| {
                ct_eq(name.as_bytes(), sni_ticket(&self.membership, w).as_bytes()) | ok
            })
        });
        if valid {
            Some(self.certified.clone())
        } else {
            self.counters
                .tickets_refused
                .fetch_add(1, Ordering::Relaxed);
            self.probe.with(|s| s.ticket_refused = true);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticket_is_a_dns_label_bound_to_key_and_window() {
        let t = sni_ticket(&[1; 32], 0);
        assert_eq!(t.len(), 33);
        assert!(t.starts_with('k'));
        assert!(
            t.bytes()
                .all(|b| b.is_ascii_lowercase() || (b'2'..=b'7').contains(&b))
        );
        assert!(ServerName::try_from(t.as_str()).is_ok());
        assert_eq!(t, sni_ticket(&[1; 32], 0));
        assert_ne!(t, sni_ticket(&[1; 32], 1));
        assert_ne!(t, sni_ticket(&[2; 32], 0));
    }

    #[test]
    fn base32_matches_rfc4648_vectors() {
        let mut s = String::new();
        base32_lower(b"fooba", &mut s);
        assert_eq!(s, "mzxw6ytb");
        s.clear();
        base32_lower(&[0xff; 5], &mut s);
        assert_eq!(s, "77777777");
    }

    #[test]
    fn constant_time_equality() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"ab"));
    }

    #[test]
    fn suites_follow_the_preference_and_keep_the_initial_suite() {
        let names = |v: Vec<SupportedCipherSuite>| v.iter().map(|s| s.suite()).collect::<Vec<_>>();
        let chacha = names(cipher_suites(true));
        assert_eq!(
            chacha[0],
            rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256
        );
        let aes = names(cipher_suites(false));
        assert_eq!(aes[0], rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
        for list in [chacha, aes] {
            assert!(list.contains(&rustls::CipherSuite::TLS13_AES_128_GCM_SHA256));
        }
        assert!(CipherPreference::ChaCha20First.chacha_first());
        assert!(!CipherPreference::AesFirst.chacha_first());
        assert_eq!(CipherPreference::Auto.chacha_first(), !cpu_has_fast_aes());
    }

    #[test]
    fn certified_key_matches_and_webpki_parses_our_certificate() {
        let key = ed25519_dalek::SigningKey::from_bytes(&[3; 32]);
        let der = cert::generate(&key, &[9; 32]);
        let ctx = TlsContext::new(&key, der.clone(), [9; 32], true);
        ctx.certified.keys_match().unwrap();
        let der = CertificateDer::from(der);
        let parsed = rustls::server::ParsedCertificate::try_from(&der);
        assert!(parsed.is_ok(), "webpki rejects our DER: {:?}", parsed.err());
        ctx.client_config(None, Arc::default()).unwrap();
        ctx.server_config(Arc::default()).unwrap();
    }

    /// Runs a TLS 1.3 handshake (over an in-memory byte pipe, not QUIC) between two contexts;
    /// returns the negotiated suite, or the error.
    fn handshake(
        client: &TlsContext,
        server: &TlsContext,
    ) -> Result<rustls::CipherSuite, rustls::Error> {
        let name = ServerName::try_from(client.server_name()).unwrap();
        let mut c = rustls::ClientConnection::new(
            Arc::new(client.rustls_client_config(None, Arc::default()).unwrap()),
            name,
        )?;
        let mut s = rustls::ServerConnection::new(Arc::new(
            server.rustls_server_config(Arc::default()).unwrap(),
        ))?;
        for _ in 0..10 {
            let mut pipe = Vec::new();
            c.write_tls(&mut pipe).unwrap();
            s.read_tls(&mut pipe.as_slice()).unwrap();
            s.process_new_packets()?;
            pipe.clear();
            s.write_tls(&mut pipe).unwrap();
            c.read_tls(&mut pipe.as_slice()).unwrap();
            c.process_new_packets()?;
            if !c.is_handshaking() && !s.is_handshaking() {
                assert_eq!(s.alpn_protocol(), Some(ALPN));
                return Ok(c.negotiated_cipher_suite().unwrap().suite());
            }
        }
        panic!("handshake did not finish");
    }

    fn context(seed: u8, membership: [u8; 32], chacha_first: bool) -> TlsContext {
        let key = ed25519_dalek::SigningKey::from_bytes(&[seed; 32]);
        TlsContext::new(
            &key,
            cert::generate(&key, &membership),
            membership,
            chacha_first,
        )
    }

    #[test]
    fn the_side_without_aes_gets_chacha20() {
        use rustls::CipherSuite::{
            TLS13_AES_128_GCM_SHA256 as AES, TLS13_CHACHA20_POLY1305_SHA256 as CHACHA,
        };
        // (client prefers ChaCha20, server prefers ChaCha20, negotiated)
        let rows = [
            (true, true, CHACHA),
            (true, false, CHACHA), // a server with AES follows the client
            (false, true, CHACHA), // a server without AES imposes its order
            (false, false, AES),
        ];
        for (client_chacha, server_chacha, want) in rows {
            let client = context(1, [7; 32], client_chacha);
            let server = context(2, [7; 32], server_chacha);
            assert_eq!(
                handshake(&client, &server),
                Ok(want),
                "{client_chacha} {server_chacha}"
            );
        }
    }

    #[test]
    fn plain_tls_refuses_a_non_member_before_any_certificate() {
        let client = context(1, [8; 32], true);
        let server = context(2, [7; 32], true);
        let err = handshake(&client, &server).unwrap_err();
        assert!(matches!(err, rustls::Error::General(_)), "{err:?}");
        assert_eq!(client.counters().certs_received.load(Ordering::Relaxed), 0);
        assert_eq!(server.counters().tickets_refused.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn debug_output_holds_no_secret() {
        let key = ed25519_dalek::SigningKey::from_bytes(&[3; 32]);
        let ctx = TlsContext::new(&key, cert::generate(&key, &[9; 32]), [9; 32], false);
        let text = format!("{ctx:?} {:?}", ctx.certified.key);
        assert!(!text.contains("[9, 9"), "{text}");
        assert!(!text.contains("[3, 3"), "{text}");
    }
}
