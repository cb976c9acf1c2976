//! [`Transport`]: one quinn-proto endpoint, one authenticated QUIC connection per peer.
//!
//! # Driving it
//!
//! The transport is a state machine; the caller owns the socket and the clock. Per loop turn,
//! read the clock once, then:
//!
//! 1. feed every received UDP payload for which [`is_quic_packet`](super::is_quic_packet) holds
//!    to [`Transport::handle_datagram`], and call [`Transport::handle_timeout`] when the instant
//!    from [`Transport::poll_timeout`] has passed;
//! 2. drain [`Transport::poll_event`];
//! 3. make the calls the events lead to ([`send_message`](Transport::send_message),
//!    [`send_datagram`](Transport::send_datagram), [`connect`](Transport::connect), ...);
//! 4. drain [`Transport::poll_transmit`] into the socket;
//! 5. sleep until [`Transport::poll_timeout`] (or the next packet).
//!
//! Inside, every input follows quinn-proto's order: the connection handles the input, then its
//! endpoint events go to the endpoint (and answers back to the connection), then its application
//! events become [`TransportEvent`]s, then it is marked for transmission.
//!
//! # Messages and datagrams
//!
//! A control message is one unidirectional stream, the whole stream up to its FIN; the receiver
//! stops (STOP_SENDING) a stream that grows past `max_message_size` and counts the drop, and the
//! connection carries on. VPN packets go as QUIC DATAGRAM frames: unreliable, unordered, no
//! head-of-line blocking; when the send buffer is full the oldest queued datagrams are dropped.
//!
//! # One connection per peer
//!
//! Peer ids are known only after the handshake, so two nodes dialling each other at once get two
//! connections. When a second connection to an already connected peer completes, both sides keep
//! the same one: if the two were established within [`SIMULTANEOUS_WINDOW`] of each other and
//! were dialled from opposite sides, the one dialled by the smaller peer id; otherwise the newer
//! one (the older is most likely dead: the peer restarted). The other connection is retired: no
//! new message goes on it, what is in flight still arrives, and it is closed after
//! [`RETIRE_GRACE`]. The peer is reported connected once.
//!
//! A client reports a connection only when the handshake is *confirmed* (the server's
//! HANDSHAKE_DONE), that is, after the server has accepted the client's certificate.
//!
//! # Limits against floods
//!
//! At most `max_connections` connections (handshaking ones included); beyond, incoming
//! handshakes are refused with CONNECTION_REFUSED. Handshakes from IP addresses with no
//! established connection draw from a token bucket (`handshake_rate` per second, burst
//! `handshake_burst`) and at most `max_handshakes_per_ip` may be in progress per address; over
//! either limit the Initial packet is ignored silently (the client retransmits and may get in
//! later). A flood from new addresses can thus delay new members, never established peers.
//! A ClientHello without a valid ticket costs three HMACs and is answered with an alert only
//! (see [`tls`](super::tls)). quinn-proto's anti-amplification limit bounds what an unvalidated
//! address can make us send. Not done: Retry-based address validation (its tokens read the
//! system clock inside quinn-proto; it would need a `TimeSource` fed from `now`).

use super::relay::{self, RELAYED_MTU};
use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::mem;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use hkdf::hmac::{Hmac, KeyInit, Mac};
use quinn_proto::crypto::{CryptoError, HmacKey};
use quinn_proto::{
    ClientConfig, ConnectionError, ConnectionHandle, DatagramEvent, Dir, Endpoint, EndpointConfig,
    Event, HashedConnectionIdGenerator, IdleTimeout, Incoming, ReadError, SendDatagramError,
    ServerConfig, StreamEvent, StreamId, TransportConfig, VarInt, WriteError,
};
use rustls::pki_types::CertificateDer;
use sha2::Sha256;

use super::cert;
use super::tls::{CertRejection, CipherPreference, HandshakeProbe, TlsConfigError, TlsContext};
use crate::identity::{Identity, PeerId};
use crate::token::{DEFAULT_MAX_MESSAGE_SIZE, KeySchedule, NetworkToken, Window};

/// Two connections to one peer established this close together count as a simultaneous open.
pub const SIMULTANEOUS_WINDOW: Duration = Duration::from_secs(5);

/// How long a retired duplicate connection stays open for what is in flight on it.
pub const RETIRE_GRACE: Duration = Duration::from_secs(3);

/// Application close code: normal close.
const CLOSE_NORMAL: u32 = 0;
/// Application close code: duplicate connection retired.
const CLOSE_DUPLICATE: u32 = 1;
/// Application close code: handshake refused after completion or timed out.
const CLOSE_HANDSHAKE: u32 = 2;
/// Stream stop code: message over `max_message_size`.
const STOP_TOO_LARGE: u32 = 1;

/// Tunables of the transport. `Default` gives the documented values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportSettings {
    /// A connection with no packet received for this long is closed (default 30 s). Both sides
    /// use the smaller of their two values.
    pub idle_timeout: Duration,
    /// Send a PING after this much silence, to keep NAT mappings and idle connections alive
    /// (default `None`: the NAT layer turns it on where it is needed).
    pub keep_alive: Option<Duration>,
    /// Initial UDP payload size of QUIC packets after the handshake (default 1452: a 1500-byte
    /// path minus 40 bytes of IPv6 and 8 of UDP header, so it fits IPv4 and IPv6). It must be
    /// at least 1200 (QUIC's minimum). A DATAGRAM frame then carries a VPN packet of up to 1414
    /// bytes ([`Transport::max_datagram_size`] tells exactly), more than the default VPN MTU of
    /// 1200 (EDGEVPNMTU). If the path is narrower, quinn-proto's black-hole detection falls back
    /// to [`min_mtu`](Self::min_mtu).
    pub initial_mtu: u16,
    /// The UDP payload size a connection falls back to when larger packets are lost (default
    /// [`MIN_PATH_MTU`], 1238: a 1200-byte VPN packet in one DATAGRAM frame, so Kairos' default
    /// EDGEVPNMTU works on every path; see `crate::vpn`). At least 1200, at most `initial_mtu`.
    pub min_mtu: u16,
    /// Probe for a larger path MTU (needs a socket that never fragments: IP_PMTUDISC_DO /
    /// IPV6_DONTFRAG). Default false.
    pub allow_mtu_discovery: bool,
    /// Largest control message, both ways (default: edgevpn's 20 MiB; set it from the token's
    /// `max_message_size`).
    pub max_message_size: usize,
    /// Bytes of received DATAGRAM frames buffered until polled (default 1 MiB).
    pub datagram_receive_buffer: usize,
    /// Bytes of DATAGRAM frames queued for sending; beyond, the oldest are dropped (default 1 MiB).
    pub datagram_send_buffer: usize,
    /// Bytes of messages queued per peer and not yet handed to QUIC, beyond which
    /// [`Transport::send_message`] refuses (default 64 MiB).
    pub max_pending_send: usize,
    /// Messages a peer may have in flight to us at once (default 32). Together with
    /// `max_message_size` it bounds the memory a peer can make us hold.
    pub max_concurrent_streams: u32,
    /// Connections, handshaking ones included (default 1024).
    pub max_connections: usize,
    /// Handshakes per second accepted from addresses without an established connection
    /// (default 32).
    pub handshake_rate: u32,
    /// Burst of such handshakes (default 64).
    pub handshake_burst: u32,
    /// Handshakes in progress per remote IP address without an established connection
    /// (default 16).
    pub max_handshakes_per_ip: usize,
    /// A handshake not complete (and confirmed) after this long fails (default 10 s).
    pub handshake_timeout: Duration,
    /// Datagrams per [`Transmit`] (GSO). 1 (the default) disables batching; raise it only when
    /// the socket sends with UDP_SEGMENT.
    pub max_gso_segments: usize,
    /// Cipher-suite preference (default: by CPU).
    pub ciphers: CipherPreference,
}

/// Size of each receive buffer incoming packets are copied into.
const RX_POOL_CHUNK: usize = 64 * 1024;

/// Default [`TransportSettings::min_mtu`]: QUIC packets of a 1200-byte VPN packet in a DATAGRAM
/// frame (1200 + 38 bytes quinn-proto reserves). On the wire: 1266 bytes over IPv4, 1286 over
/// IPv6; only an IPv6 path of exactly 1280 to 1285 bytes would not carry it.
pub const MIN_PATH_MTU: u16 = 1238;

impl Default for TransportSettings {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(30),
            keep_alive: None,
            initial_mtu: 1452,
            min_mtu: MIN_PATH_MTU,
            allow_mtu_discovery: false,
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE as usize,
            datagram_receive_buffer: 1 << 20,
            datagram_send_buffer: 1 << 20,
            max_pending_send: 64 << 20,
            max_concurrent_streams: 32,
            max_connections: 1024,
            handshake_rate: 32,
            handshake_burst: 64,
            max_handshakes_per_ip: 16,
            handshake_timeout: Duration::from_secs(10),
            max_gso_segments: 1,
            ciphers: CipherPreference::Auto,
        }
    }
}

impl TransportSettings {
    /// The defaults, with `max_message_size` from the network token.
    #[must_use]
    pub fn for_token(token: &NetworkToken) -> Self {
        Self {
            max_message_size: usize::try_from(token.max_message_size).unwrap_or(usize::MAX),
            ..Self::default()
        }
    }
}

/// Why a transport could not be created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransportError {
    /// A setting is out of range.
    InvalidSetting {
        /// Which one.
        name: &'static str,
        /// Why.
        why: &'static str,
    },
    /// The TLS configuration could not be built.
    Tls(TlsConfigError),
}

impl fmt::Display for TransportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::InvalidSetting { name, why } => write!(f, "transport setting {name}: {why}"),
            Self::Tls(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for TransportError {}

/// Why [`Transport::connect`] could not start a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectError {
    /// The expected peer is already connected.
    AlreadyConnected(PeerId),
    /// The expected peer is this node.
    OwnPeerId,
    /// `max_connections` reached.
    TooManyConnections,
    /// The address cannot be dialled (port 0, unspecified address, ...).
    InvalidAddress(SocketAddr),
    /// The TLS configuration could not be built.
    Tls(TlsConfigError),
    /// quinn-proto refused (its message).
    Endpoint(String),
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::AlreadyConnected(p) => write!(f, "already connected to {p}"),
            Self::OwnPeerId => f.write_str("cannot connect to ourselves"),
            Self::TooManyConnections => f.write_str("connection limit reached"),
            Self::InvalidAddress(a) => write!(f, "cannot connect to {a}"),
            Self::Tls(e) => write!(f, "{e}"),
            Self::Endpoint(e) => write!(f, "QUIC endpoint: {e}"),
        }
    }
}

impl std::error::Error for ConnectError {}

/// Why a message or datagram was not sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendError {
    /// No established connection to that peer.
    NotConnected,
    /// Over the size limit (`max_message_size`, or the current maximum datagram size).
    TooLarge {
        /// Size given.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Too many bytes already queued for that peer (`max_pending_send`).
    Backpressure {
        /// Bytes queued.
        pending: usize,
    },
    /// The peer does not accept DATAGRAM frames.
    DatagramsUnsupported,
}

impl fmt::Display for SendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotConnected => f.write_str("peer not connected"),
            Self::TooLarge { len, max } => write!(f, "{len} bytes, over the limit of {max}"),
            Self::Backpressure { pending } => write!(f, "{pending} bytes already queued"),
            Self::DatagramsUnsupported => f.write_str("peer does not accept datagrams"),
        }
    }
}

impl std::error::Error for SendError {}

/// Identifies one connection attempt (never reused within a transport).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

/// Why a connected peer went away.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DisconnectReason {
    /// No packet from the peer within the idle timeout.
    IdleTimeout,
    /// We closed it ([`Transport::close`]).
    ClosedLocally,
    /// The peer closed it; `code` 0 is a normal close.
    ClosedByPeer {
        /// The peer's application close code.
        code: u64,
    },
    /// Stateless reset: the peer lost the connection's state (it restarted).
    Reset,
    /// The peer closed it with a transport error (its description).
    PeerError(String),
    /// We detected a protocol error (its description).
    LocalError(String),
}

impl From<ConnectionError> for DisconnectReason {
    fn from(e: ConnectionError) -> Self {
        match e {
            ConnectionError::TimedOut => Self::IdleTimeout,
            ConnectionError::LocallyClosed => Self::ClosedLocally,
            ConnectionError::ApplicationClosed(c) => Self::ClosedByPeer {
                code: c.error_code.into_inner(),
            },
            ConnectionError::Reset => Self::Reset,
            ConnectionError::ConnectionClosed(c) => Self::PeerError(c.to_string()),
            other => Self::LocalError(other.to_string()),
        }
    }
}

impl fmt::Display for DisconnectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::IdleTimeout => f.write_str("idle timeout"),
            Self::ClosedLocally => f.write_str("closed locally"),
            Self::ClosedByPeer { code } => write!(f, "closed by peer (code {code})"),
            Self::Reset => f.write_str("reset by peer"),
            Self::PeerError(e) => write!(f, "peer error: {e}"),
            Self::LocalError(e) => write!(f, "protocol error: {e}"),
        }
    }
}

/// Why a handshake failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// We refused the other side: not a member, forged certificate, not the expected peer, ...
    Rejected(CertRejection),
    /// The other side aborted the handshake, with this TLS alert if any. A member server answers
    /// a ClientHello without a valid ticket with `access_denied` (49) before sending any
    /// certificate; a server refusing our certificate sends `bad_certificate` (42) or similar.
    Refused {
        /// The TLS alert code.
        tls_alert: Option<u8>,
    },
    /// No answer, or not complete within `handshake_timeout`.
    TimedOut,
    /// Anything else (the error's description).
    Other(String),
}

impl fmt::Display for HandshakeFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Rejected(r) => write!(f, "peer rejected: {r}"),
            Self::Refused { tls_alert: Some(a) } => write!(f, "refused by peer (TLS alert {a})"),
            Self::Refused { tls_alert: None } => f.write_str("refused by peer"),
            Self::TimedOut => f.write_str("timed out"),
            Self::Other(e) => f.write_str(e),
        }
    }
}

/// What the transport reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransportEvent {
    /// A peer is connected and authenticated (reported once, even if a duplicate connection is
    /// swapped in later).
    Connected {
        /// Its peer id (the key of its certificate).
        peer: PeerId,
        /// Its address.
        addr: SocketAddr,
        /// True if it dialled us.
        inbound: bool,
        /// The connection.
        conn: ConnId,
    },
    /// A connected peer went away.
    Disconnected {
        /// Its peer id.
        peer: PeerId,
        /// Why.
        reason: DisconnectReason,
    },
    /// A complete control message.
    Message {
        /// Sender.
        peer: PeerId,
        /// The message.
        bytes: Bytes,
    },
    /// A datagram (VPN packet).
    Datagram {
        /// Sender.
        peer: PeerId,
        /// The datagram.
        bytes: Bytes,
    },
    /// A connection we dialled failed before it was established (handshakes others start with
    /// us are only counted in [`TransportStats`]).
    HandshakeFailed {
        /// The attempt, as [`Transport::connect`] returned it.
        conn: ConnId,
        /// The address dialled.
        addr: SocketAddr,
        /// Why.
        reason: HandshakeFailure,
    },
}

/// A packet (or a GSO batch of packets) to send, written to the caller's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transmit {
    /// Where to send it.
    pub destination: SocketAddr,
    /// Bytes written to the buffer.
    pub len: usize,
    /// When `Some`, the buffer holds several datagrams of this size (the last may be shorter):
    /// send with UDP_SEGMENT or split.
    pub segment_size: Option<usize>,
    /// Source address to send from, when the socket is bound to several.
    pub src_ip: Option<IpAddr>,
}

/// One connected peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerInfo {
    /// Its peer id.
    pub peer: PeerId,
    /// Its current address.
    pub addr: SocketAddr,
    /// Smoothed round-trip time.
    pub rtt: Duration,
    /// True if it dialled us.
    pub inbound: bool,
    /// The connection in use.
    pub conn: ConnId,
    /// UDP payload bytes received on this connection (QUIC packets, all frames).
    pub bytes_in: u64,
    /// UDP payload bytes sent on this connection.
    pub bytes_out: u64,
}

/// Packets and messages dropped, by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DropStats {
    /// Packets handed to `handle_datagram` with the QUIC bit clear (or empty).
    pub not_quic: u64,
    /// Incoming handshakes refused: `max_connections` reached.
    pub over_connection_limit: u64,
    /// Incoming handshakes ignored: handshake rate or per-address limit.
    pub handshake_rate_limited: u64,
    /// ClientHellos without a valid ticket (non-members, scanners, stale windows).
    pub tickets_refused: u64,
    /// Peer certificates or handshake signatures we refused.
    pub certs_rejected: u64,
    /// Received messages over `max_message_size` (stream stopped).
    pub oversize_messages: u64,
    /// Received messages the sender reset before finishing.
    pub reset_messages: u64,
    /// Our messages the peer stopped (over its size limit) or that were lost with their stream.
    pub messages_stopped_by_peer: u64,
    /// Messages or datagrams from a connection whose peer was not authenticated yet.
    pub unauthenticated: u64,
}

/// Counters since the transport was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TransportStats {
    /// UDP payloads received.
    pub packets_in: u64,
    /// Bytes of those.
    pub bytes_in: u64,
    /// UDP payloads sent (each GSO segment counts).
    pub packets_out: u64,
    /// Bytes of those.
    pub bytes_out: u64,
    /// Handshakes completed (both directions; duplicates included).
    pub handshakes_ok: u64,
    /// Handshakes failed (both directions).
    pub handshakes_failed: u64,
    /// Peer certificates that reached our verifiers.
    pub peer_certs_received: u64,
    /// Messages queued for sending.
    pub messages_out: u64,
    /// Messages delivered.
    pub messages_in: u64,
    /// Datagrams queued for sending.
    pub datagrams_out: u64,
    /// Datagrams delivered.
    pub datagrams_in: u64,
    /// Drops by reason.
    pub drops: DropStats,
}

/// Where a connection stands.
#[derive(Debug, Clone, Copy)]
enum State {
    /// TLS handshake running.
    Handshaking,
    /// Client only: handshake complete, waiting for the server's HANDSHAKE_DONE.
    Confirming { peer: PeerId },
    /// In use for `peer`.
    Established { peer: PeerId, since: Instant },
    /// A duplicate kept for what is in flight, closed at `until`.
    Retiring {
        peer: PeerId,
        since: Instant,
        until: Instant,
    },
    /// Closed (draining in quinn-proto); already reported.
    Closed,
}

struct Conn {
    id: ConnId,
    conn: quinn_proto::Connection,
    inbound: bool,
    addr: SocketAddr,
    probe: Arc<HandshakeProbe>,
    state: State,
    handshake_deadline: Instant,
    /// Messages waiting for a stream.
    queued: VecDeque<Bytes>,
    /// Rest of messages being written, by stream.
    writing: BTreeMap<StreamId, Bytes>,
    /// Bytes in `queued` and `writing`.
    pending_bytes: usize,
    /// Messages being received, by stream.
    reading: BTreeMap<StreamId, Vec<u8>>,
    /// In the transmit queue.
    in_transmit_queue: bool,
}

impl Conn {
    fn peer(&self) -> Option<PeerId> {
        match self.state {
            State::Confirming { peer }
            | State::Established { peer, .. }
            | State::Retiring { peer, .. } => Some(peer),
            State::Handshaking | State::Closed => None,
        }
    }

    /// Our own deadline (handshake or retirement), besides quinn-proto's timers.
    fn deadline(&self) -> Option<Instant> {
        match self.state {
            State::Handshaking | State::Confirming { .. } => Some(self.handshake_deadline),
            State::Retiring { until, .. } => Some(until),
            State::Established { .. } | State::Closed => None,
        }
    }
}

/// Token bucket limiting handshakes from unknown addresses.
#[derive(Debug)]
struct Bucket {
    /// Tokens, in millionths.
    micro_tokens: u64,
    last: Option<Instant>,
    rate: u64,
    burst: u64,
}

impl Bucket {
    fn new(rate: u32, burst: u32) -> Self {
        Self {
            micro_tokens: u64::from(burst) * 1_000_000,
            last: None,
            rate: u64::from(rate),
            burst: u64::from(burst),
        }
    }

    fn take(&mut self, now: Instant) -> bool {
        if let Some(last) = self.last {
            let elapsed = now.saturating_duration_since(last).as_micros();
            let refill = elapsed.saturating_mul(u128::from(self.rate));
            let refill = u64::try_from(refill).unwrap_or(u64::MAX);
            self.micro_tokens = self
                .micro_tokens
                .saturating_add(refill)
                .min(self.burst * 1_000_000);
        }
        self.last = Some(now);
        if self.micro_tokens >= 1_000_000 {
            self.micro_tokens -= 1_000_000;
            true
        } else {
            false
        }
    }
}

/// Stateless-reset key, derived from the node key so that a restarted node resets the stale
/// connections of its peers at once instead of leaving them to the idle timeout.
struct ResetKey([u8; 32]);

impl ResetKey {
    fn mac(&self, data: &[u8]) -> Hmac<Sha256> {
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        mac.update(data);
        mac
    }
}

impl HmacKey for ResetKey {
    fn sign(&self, data: &[u8], signature_out: &mut [u8]) {
        let tag: [u8; 32] = self.mac(data).finalize().into_bytes().into();
        let n = signature_out.len().min(tag.len());
        signature_out[..n].copy_from_slice(&tag[..n]);
    }

    fn signature_len(&self) -> usize {
        32
    }

    fn verify(&self, data: &[u8], signature: &[u8]) -> Result<(), CryptoError> {
        self.mac(data)
            .verify_slice(signature)
            .map_err(|_| CryptoError)
    }
}

/// HMAC-SHA256 of `label` under the node's secret key: per-node secrets for QUIC internals.
fn node_secret(identity: &Identity, label: &[u8]) -> [u8; 32] {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(identity.signing_key().as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(label);
    mac.finalize().into_bytes().into()
}

/// The overlay transport: one QUIC endpoint and its connections. See the module documentation.
pub struct Transport {
    local: PeerId,
    settings: TransportSettings,
    endpoint: Endpoint,
    tls: TlsContext,
    server_base: ServerConfig,
    transport_config: Arc<TransportConfig>,
    /// The same with the smaller MTU of relayed paths ([`relay::RELAYED_MTU`]).
    relayed_transport_config: Arc<TransportConfig>,
    /// Boxed: a connection is some 6 KB, and map nodes hold eleven values inline (a node with
    /// three connections held 70 KB).
    conns: BTreeMap<ConnectionHandle, Box<Conn>>,
    by_peer: BTreeMap<PeerId, ConnectionHandle>,
    events: VecDeque<TransportEvent>,
    /// Endpoint-level packets (refusals, stateless resets, version negotiation).
    responses: VecDeque<(Transmit, Vec<u8>)>,
    /// Connections that may have something to send, round robin.
    transmit_queue: VecDeque<ConnectionHandle>,
    bucket: Bucket,
    next_id: u64,
    stats: TransportStats,
    scratch: Vec<u8>,
    /// Receive buffer packets are cut from (see [`Transport::handle_datagram`]).
    rx_pool: BytesMut,
}

impl fmt::Debug for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Transport")
            .field("local", &self.local)
            .field("connections", &self.conns.len())
            .field("peers", &self.by_peer.len())
            .finish_non_exhaustive()
    }
}

impl Transport {
    /// A transport for `identity` in the network of `keys`. `rng_seed` seeds quinn-proto's
    /// generator (connection ids' order, packet-number skips, padding), so that a simulation
    /// with the same seed replays; the agent passes OS randomness.
    pub fn new(
        identity: &Identity,
        keys: &KeySchedule,
        settings: TransportSettings,
        rng_seed: [u8; 32],
    ) -> Result<Self, TransportError> {
        let cert = cert::generate(identity.signing_key(), &keys.membership_key());
        Self::with_certificate(identity, keys, settings, rng_seed, cert)
    }

    /// Like [`new`](Self::new), presenting `cert_der` instead of our own certificate (tests
    /// forge certificates with it).
    pub(crate) fn with_certificate(
        identity: &Identity,
        keys: &KeySchedule,
        settings: TransportSettings,
        rng_seed: [u8; 32],
        cert_der: Vec<u8>,
    ) -> Result<Self, TransportError> {
        let invalid = |name, why| Err(TransportError::InvalidSetting { name, why });
        if settings.initial_mtu < 1200 {
            return invalid("initial_mtu", "below QUIC's minimum of 1200");
        }
        if settings.min_mtu < 1200 || settings.min_mtu > settings.initial_mtu {
            return invalid("min_mtu", "outside 1200..=initial_mtu");
        }
        if settings.max_message_size == 0 {
            return invalid("max_message_size", "must be positive");
        }
        if settings.max_gso_segments == 0 {
            return invalid("max_gso_segments", "must be at least 1");
        }
        if settings.max_connections == 0 {
            return invalid("max_connections", "must be positive");
        }
        if settings.max_concurrent_streams == 0 {
            return invalid("max_concurrent_streams", "must be positive");
        }
        let Ok(idle) = IdleTimeout::try_from(settings.idle_timeout) else {
            return invalid("idle_timeout", "too long");
        };

        let quic_config = |mtu: u16| {
            let mut config = TransportConfig::default();
            config
                .max_idle_timeout(Some(idle))
                .keep_alive_interval(settings.keep_alive)
                .initial_mtu(mtu)
                .min_mtu(settings.min_mtu.min(mtu))
                .datagram_receive_buffer_size(Some(settings.datagram_receive_buffer))
                .datagram_send_buffer_size(settings.datagram_send_buffer)
                .max_concurrent_bidi_streams(VarInt::from_u32(0))
                .max_concurrent_uni_streams(VarInt::from_u32(settings.max_concurrent_streams));
            Arc::new(config)
        };
        let transport = quic_config(settings.initial_mtu);
        let relayed_transport_config = quic_config(RELAYED_MTU.min(settings.initial_mtu));

        let tls = TlsContext::new(
            identity.signing_key(),
            cert_der,
            keys.membership_key(),
            settings.ciphers.chacha_first(),
        );
        let base_crypto = tls
            .server_config(Arc::default())
            .map_err(TransportError::Tls)?;
        let mut server = ServerConfig::with_crypto(base_crypto);
        server
            .transport_config(transport.clone())
            .migration(true)
            .max_incoming(settings.max_connections)
            .incoming_buffer_size(64 * 1024)
            .incoming_buffer_size_total(4 << 20);
        // No NEW_TOKEN frames: address validation tokens would read the system clock.
        server.validation_token.sent(0);

        let reset_key = ResetKey(node_secret(identity, b"kairos-p2p v1 quic stateless reset"));
        let cid_secret = node_secret(identity, b"kairos-p2p v1 quic connection ids");
        let mut cid_key = [0u8; 8];
        cid_key.copy_from_slice(&cid_secret[..8]);
        let cid_key = u64::from_be_bytes(cid_key);
        let mut endpoint_config = EndpointConfig::new(Arc::new(reset_key));
        endpoint_config
            .grease_quic_bit(false)
            .rng_seed(Some(rng_seed))
            // Connection ids validate across restarts, so stale peers get a stateless reset.
            .cid_generator(move || Box::new(HashedConnectionIdGenerator::from_key(cid_key)));
        if endpoint_config
            .max_udp_payload_size(settings.initial_mtu.max(1472))
            .is_err()
        {
            return invalid("initial_mtu", "over 65527");
        }
        let endpoint = Endpoint::new(
            Arc::new(endpoint_config),
            Some(Arc::new(server.clone())),
            settings.allow_mtu_discovery,
            None,
        );
        Ok(Self {
            local: identity.peer_id(),
            bucket: Bucket::new(settings.handshake_rate, settings.handshake_burst),
            settings,
            endpoint,
            tls,
            server_base: server,
            transport_config: transport,
            relayed_transport_config,
            conns: BTreeMap::new(),
            by_peer: BTreeMap::new(),
            events: VecDeque::new(),
            responses: VecDeque::new(),
            transmit_queue: VecDeque::new(),
            next_id: 0,
            stats: TransportStats::default(),
            scratch: Vec::new(),
            rx_pool: BytesMut::new(),
        })
    }

    // ---- getters ----

    /// Our peer id.
    #[must_use]
    pub fn local_peer_id(&self) -> PeerId {
        self.local
    }

    /// The settings in force.
    #[must_use]
    pub fn settings(&self) -> &TransportSettings {
        &self.settings
    }

    /// Connected peers.
    pub fn peers(&self) -> impl Iterator<Item = PeerInfo> + '_ {
        self.by_peer.iter().filter_map(|(peer, ch)| {
            let c = self.conns.get(ch)?;
            let stats = c.conn.stats();
            Some(PeerInfo {
                peer: *peer,
                addr: c.conn.remote_address(),
                rtt: c.conn.rtt(),
                inbound: c.inbound,
                conn: c.id,
                bytes_in: stats.udp_rx.bytes,
                bytes_out: stats.udp_tx.bytes,
            })
        })
    }

    /// Whether `peer` is connected.
    #[must_use]
    pub fn is_connected(&self, peer: &PeerId) -> bool {
        self.by_peer.contains_key(peer)
    }

    /// Connections held, handshaking, retiring and draining ones included.
    #[must_use]
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Whether a connection's datagram send queue is more than half full (its packets are read
    /// faster than its congestion controller lets them out; past full, the oldest are dropped).
    pub fn datagrams_backlogged(&mut self) -> bool {
        let half = self.settings.datagram_send_buffer / 2;
        self.conns
            .values_mut()
            .any(|c| c.conn.datagrams().send_buffer_space() < half)
    }

    /// Largest datagram [`send_datagram`](Self::send_datagram) accepts for `peer` now (it may
    /// change with the path MTU), or `None` if not connected or unsupported.
    pub fn max_datagram_size(&mut self, peer: &PeerId) -> Option<usize> {
        let ch = self.by_peer.get(peer)?;
        self.conns.get_mut(ch)?.conn.datagrams().max_size()
    }

    /// Counters since creation.
    #[must_use]
    pub fn stats(&self) -> TransportStats {
        let tls = self.tls.counters();
        let mut stats = self.stats;
        stats.peer_certs_received = tls.certs_received.load(Ordering::Relaxed);
        stats.drops.certs_rejected = tls.certs_rejected.load(Ordering::Relaxed);
        stats.drops.tickets_refused = tls.tickets_refused.load(Ordering::Relaxed);
        stats
    }

    // ---- handlers ----

    /// Handles one UDP payload received from `from` (on local address `local_ip`, if known).
    pub fn handle_datagram(
        &mut self,
        now: Instant,
        from: SocketAddr,
        local_ip: Option<IpAddr>,
        bytes: &[u8],
    ) {
        // Packets are copied into shared receive buffers (what quinn-proto keeps of one, a
        // datagram's data, refers to it): no allocation per packet.
        if self.rx_pool.capacity() < bytes.len() {
            self.rx_pool.reserve(RX_POOL_CHUNK.max(bytes.len()));
        }
        self.rx_pool.extend_from_slice(bytes);
        let packet = self.rx_pool.split();
        self.handle_packet(now, from, local_ip, packet);
    }

    /// [`handle_datagram`](Self::handle_datagram) for a payload the caller received into a
    /// buffer of its own (no copy: quinn-proto decrypts it in place and keeps what it needs).
    pub fn handle_packet(
        &mut self,
        now: Instant,
        from: SocketAddr,
        local_ip: Option<IpAddr>,
        packet: BytesMut,
    ) {
        self.stats.packets_in += 1;
        self.stats.bytes_in += packet.len() as u64;
        if packet.first().is_none_or(|&b| !super::is_quic_packet(b)) {
            self.stats.drops.not_quic += 1;
            return;
        }
        let mut buf = mem::take(&mut self.scratch);
        buf.clear();
        match self
            .endpoint
            .handle(now, from, local_ip, None, packet, &mut buf)
        {
            Some(DatagramEvent::ConnectionEvent(ch, event)) => {
                if let Some(c) = self.conns.get_mut(&ch) {
                    c.conn.handle_event(event);
                    self.drive(now, ch);
                }
            }
            Some(DatagramEvent::NewConnection(incoming)) => {
                self.on_incoming(now, incoming, &mut buf)
            }
            Some(DatagramEvent::Response(t)) => self.queue_response(t, &buf),
            None => {}
        }
        self.scratch = buf;
    }

    /// Handles expired timers; call when [`poll_timeout`](Self::poll_timeout)'s instant has
    /// passed (extra calls are harmless).
    pub fn handle_timeout(&mut self, now: Instant) {
        let due: Vec<ConnectionHandle> = self
            .conns
            .iter_mut()
            .filter_map(|(ch, c)| {
                let quic = c.conn.poll_timeout();
                let due = [quic, c.deadline()].into_iter().flatten().any(|t| t <= now);
                due.then_some(*ch)
            })
            .collect();
        for ch in due {
            let Some(c) = self.conns.get_mut(&ch) else {
                continue;
            };
            c.conn.handle_timeout(now);
            let (state, deadline) = (c.state, c.handshake_deadline);
            match state {
                State::Handshaking | State::Confirming { .. } if deadline <= now => {
                    self.fail_handshake(now, ch, HandshakeFailure::TimedOut);
                }
                State::Retiring { until, .. } if until <= now => {
                    c.conn.close(
                        now,
                        VarInt::from_u32(CLOSE_DUPLICATE),
                        Bytes::from_static(b"duplicate"),
                    );
                    c.state = State::Closed;
                }
                _ => {}
            }
            self.drive(now, ch);
        }
    }

    // ---- mutators ----

    /// Sets the SNI-ticket window: the token's crypto-stream window now
    /// ([`KeySchedule::crypto_window`] of the wall clock). Servers accept the previous and next
    /// window too. Leave it at 0 with a never-rotating token.
    pub fn set_ticket_window(&mut self, window: Window) {
        self.tls.set_window(window);
    }

    /// The QUIC transport parameters for a path to `addr`: relayed paths carry smaller packets.
    fn transport_config_for(&self, addr: &SocketAddr) -> Arc<TransportConfig> {
        if relay::is_relay_addr(addr) {
            self.relayed_transport_config.clone()
        } else {
            self.transport_config.clone()
        }
    }

    /// Dials `addr` (a virtual [`relay`] address for a relayed path). If `expected` is given, the handshake fails (before we present our
    /// certificate) unless the server proves that peer id. The outcome comes as
    /// [`TransportEvent::Connected`] or [`TransportEvent::HandshakeFailed`].
    pub fn connect(
        &mut self,
        now: Instant,
        addr: SocketAddr,
        expected: Option<PeerId>,
    ) -> Result<ConnId, ConnectError> {
        if let Some(peer) = expected {
            if peer == self.local {
                return Err(ConnectError::OwnPeerId);
            }
            if self.by_peer.contains_key(&peer) {
                return Err(ConnectError::AlreadyConnected(peer));
            }
        }
        if self.conns.len() >= self.settings.max_connections {
            return Err(ConnectError::TooManyConnections);
        }
        let probe = Arc::new(HandshakeProbe::default());
        let crypto = self
            .tls
            .client_config(expected, probe.clone())
            .map_err(ConnectError::Tls)?;
        let mut config = ClientConfig::new(crypto);
        config.transport_config(self.transport_config_for(&addr));
        let server_name = self.tls.server_name();
        let (ch, conn) = self
            .endpoint
            .connect(now, config, addr, &server_name)
            .map_err(|e| match e {
                quinn_proto::ConnectError::InvalidRemoteAddress(a) => {
                    ConnectError::InvalidAddress(a)
                }
                other => ConnectError::Endpoint(other.to_string()),
            })?;
        let id = self.insert(now, ch, conn, false, addr, probe);
        self.drive(now, ch);
        Ok(id)
    }

    /// Queues a control message to `peer` (reliable, one stream per message).
    pub fn send_message(&mut self, peer: &PeerId, bytes: Bytes) -> Result<(), SendError> {
        let max = self.settings.max_message_size;
        if bytes.len() > max {
            return Err(SendError::TooLarge {
                len: bytes.len(),
                max,
            });
        }
        let ch = *self.by_peer.get(peer).ok_or(SendError::NotConnected)?;
        let c = self.conns.get_mut(&ch).ok_or(SendError::NotConnected)?;
        if c.pending_bytes.saturating_add(bytes.len()) > self.settings.max_pending_send {
            return Err(SendError::Backpressure {
                pending: c.pending_bytes,
            });
        }
        c.pending_bytes += bytes.len();
        c.queued.push_back(bytes);
        self.stats.messages_out += 1;
        self.open_streams(ch);
        self.mark_for_transmit(ch);
        Ok(())
    }

    /// Sends a PING to `peer` now. A live peer acknowledges it; one that restarted has lost the
    /// connection and answers with a stateless reset, which reports it disconnected at once
    /// instead of after the idle timeout. Nothing happens if `peer` is not connected.
    pub fn ping(&mut self, peer: &PeerId) {
        let Some(ch) = self.by_peer.get(peer).copied() else {
            return;
        };
        if let Some(c) = self.conns.get_mut(&ch) {
            c.conn.ping();
            self.mark_for_transmit(ch);
        }
    }

    /// Queues a datagram to `peer` (unreliable; the oldest queued ones are dropped when the send
    /// buffer is full).
    pub fn send_datagram(&mut self, peer: &PeerId, bytes: Bytes) -> Result<(), SendError> {
        let ch = *self.by_peer.get(peer).ok_or(SendError::NotConnected)?;
        let c = self.conns.get_mut(&ch).ok_or(SendError::NotConnected)?;
        let len = bytes.len();
        match c.conn.datagrams().send(bytes, true) {
            Ok(()) => {}
            Err(SendDatagramError::TooLarge) => {
                let max = c.conn.datagrams().max_size().unwrap_or(0);
                return Err(SendError::TooLarge { len, max });
            }
            Err(SendDatagramError::UnsupportedByPeer | SendDatagramError::Disabled) => {
                return Err(SendError::DatagramsUnsupported);
            }
            Err(SendDatagramError::Blocked(_)) => {
                return Err(SendError::Backpressure { pending: len });
            }
        }
        self.stats.datagrams_out += 1;
        self.mark_for_transmit(ch);
        Ok(())
    }

    /// Closes the connection(s) to `peer` and reports it disconnected. False if it was not
    /// connected.
    pub fn close(&mut self, now: Instant, peer: &PeerId) -> bool {
        let Some(primary) = self.by_peer.remove(peer) else {
            return false;
        };
        let handles: Vec<ConnectionHandle> = self
            .conns
            .iter()
            .filter(|(ch, c)| **ch == primary || c.peer() == Some(*peer))
            .map(|(ch, _)| *ch)
            .collect();
        for ch in handles {
            if let Some(c) = self.conns.get_mut(&ch) {
                c.conn.close(
                    now,
                    VarInt::from_u32(CLOSE_NORMAL),
                    Bytes::from_static(b"closed"),
                );
                c.state = State::Closed;
            }
            self.drive(now, ch);
        }
        self.events.push_back(TransportEvent::Disconnected {
            peer: *peer,
            reason: DisconnectReason::ClosedLocally,
        });
        true
    }

    /// Closes every connection (shutdown), reporting connected peers as disconnected.
    pub fn close_all(&mut self, now: Instant) {
        let peers: Vec<PeerId> = self.by_peer.keys().copied().collect();
        for peer in peers {
            self.close(now, &peer);
        }
        let rest: Vec<ConnectionHandle> = self.conns.keys().copied().collect();
        for ch in rest {
            if let Some(c) = self.conns.get_mut(&ch) {
                if !matches!(c.state, State::Closed) {
                    c.conn.close(
                        now,
                        VarInt::from_u32(CLOSE_NORMAL),
                        Bytes::from_static(b"shutdown"),
                    );
                    c.state = State::Closed;
                }
            }
            self.drive(now, ch);
        }
    }

    // ---- polls ----

    /// The next event, if any.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<TransportEvent> {
        self.events.pop_front()
    }

    /// Writes the next packet (or GSO batch) to send into `buf` (cleared first) and says where
    /// it goes. Call until `None` after every handler or mutator call.
    #[must_use]
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> Option<Transmit> {
        buf.clear();
        if let Some((transmit, bytes)) = self.responses.pop_front() {
            buf.extend_from_slice(&bytes);
            self.count_out(&transmit);
            return Some(transmit);
        }
        while let Some(ch) = self.transmit_queue.pop_front() {
            let Some(c) = self.conns.get_mut(&ch) else {
                continue;
            };
            match c
                .conn
                .poll_transmit(now, self.settings.max_gso_segments, buf)
            {
                Some(t) => {
                    // Round robin: others go next, this one comes back.
                    self.transmit_queue.push_back(ch);
                    let transmit = Transmit {
                        destination: t.destination,
                        len: t.size,
                        segment_size: t.segment_size,
                        src_ip: t.src_ip,
                    };
                    buf.truncate(t.size);
                    self.count_out(&transmit);
                    return Some(transmit);
                }
                None => {
                    c.in_transmit_queue = false;
                    buf.clear();
                }
            }
        }
        None
    }

    /// When [`handle_timeout`](Self::handle_timeout) must be called next, if ever.
    #[must_use]
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        self.conns
            .values_mut()
            .flat_map(|c| [c.conn.poll_timeout(), c.deadline()])
            .flatten()
            .min()
    }

    // ---- internals ----

    fn count_out(&mut self, t: &Transmit) {
        self.stats.bytes_out += t.len as u64;
        self.stats.packets_out += match t.segment_size {
            Some(s) if s > 0 => t.len.div_ceil(s) as u64,
            _ => 1,
        };
    }

    fn queue_response(&mut self, t: quinn_proto::Transmit, buf: &[u8]) {
        let len = t.size.min(buf.len());
        let transmit = Transmit {
            destination: t.destination,
            len,
            segment_size: t.segment_size,
            src_ip: t.src_ip,
        };
        self.responses.push_back((transmit, buf[..len].to_vec()));
    }

    fn mark_for_transmit(&mut self, ch: ConnectionHandle) {
        if let Some(c) = self.conns.get_mut(&ch) {
            if !c.in_transmit_queue {
                c.in_transmit_queue = true;
                self.transmit_queue.push_back(ch);
            }
        }
    }

    fn insert(
        &mut self,
        now: Instant,
        ch: ConnectionHandle,
        conn: quinn_proto::Connection,
        inbound: bool,
        addr: SocketAddr,
        probe: Arc<HandshakeProbe>,
    ) -> ConnId {
        let id = ConnId(self.next_id);
        self.next_id += 1;
        self.conns.insert(
            ch,
            Box::new(Conn {
                id,
                conn,
                inbound,
                addr,
                probe,
                state: State::Handshaking,
                handshake_deadline: now + self.settings.handshake_timeout,
                queued: VecDeque::new(),
                writing: BTreeMap::new(),
                pending_bytes: 0,
                reading: BTreeMap::new(),
                in_transmit_queue: false,
            }),
        );
        id
    }

    /// Whether `ip` has an authenticated connection.
    fn is_known_ip(&self, ip: IpAddr) -> bool {
        self.conns
            .values()
            .any(|c| c.peer().is_some() && c.conn.remote_address().ip() == ip)
    }

    fn handshakes_from(&self, ip: IpAddr) -> usize {
        self.conns
            .values()
            .filter(|c| matches!(c.state, State::Handshaking) && c.addr.ip() == ip)
            .count()
    }

    fn on_incoming(&mut self, now: Instant, incoming: Incoming, buf: &mut Vec<u8>) {
        let addr = incoming.remote_address();
        if self.conns.len() >= self.settings.max_connections {
            buf.clear();
            let t = self.endpoint.refuse(incoming, buf);
            self.queue_response(t, buf);
            self.stats.drops.over_connection_limit += 1;
            return;
        }
        if !self.is_known_ip(addr.ip())
            && (self.handshakes_from(addr.ip()) >= self.settings.max_handshakes_per_ip
                || !self.bucket.take(now))
        {
            self.endpoint.ignore(incoming);
            self.stats.drops.handshake_rate_limited += 1;
            return;
        }
        let probe = Arc::new(HandshakeProbe::default());
        let crypto = match self.tls.server_config(probe.clone()) {
            Ok(c) => c,
            Err(e) => {
                log::error!("cannot accept from {addr}: {e}");
                self.endpoint.ignore(incoming);
                return;
            }
        };
        let mut config = self.server_base.clone();
        config.crypto = crypto;
        config.transport_config(self.transport_config_for(&addr));
        buf.clear();
        match self
            .endpoint
            .accept(incoming, now, buf, Some(Arc::new(config)))
        {
            Ok((ch, conn)) => {
                self.insert(now, ch, conn, true, addr, probe);
                self.drive(now, ch);
            }
            Err(e) => {
                if let Some(t) = e.response {
                    self.queue_response(t, buf);
                }
                self.stats.handshakes_failed += 1;
                log::debug!(
                    "handshake from {addr} failed: {}",
                    failure_reason(&probe, e.cause)
                );
            }
        }
    }

    /// Processes what a connection produced after an input: endpoint events, then application
    /// events; removes it once drained; queues it for transmission.
    fn drive(&mut self, now: Instant, ch: ConnectionHandle) {
        let mut drained = false;
        loop {
            let Some(c) = self.conns.get_mut(&ch) else {
                return;
            };
            let mut progressed = false;
            while let Some(event) = c.conn.poll_endpoint_events() {
                progressed = true;
                drained |= event.is_drained();
                if let Some(back) = self.endpoint.handle_event(ch, event) {
                    c.conn.handle_event(back);
                }
            }
            self.check_confirmed(now, ch);
            while let Some(event) = self.conns.get_mut(&ch).and_then(|c| c.conn.poll()) {
                progressed = true;
                self.on_app_event(now, ch, event);
            }
            if !progressed {
                break;
            }
        }
        if drained {
            if let Some(c) = self.conns.get(&ch) {
                if !matches!(c.state, State::Closed) {
                    self.on_lost(now, ch, ConnectionError::LocallyClosed);
                }
            }
            self.conns.remove(&ch);
            return;
        }
        self.mark_for_transmit(ch);
    }

    fn on_app_event(&mut self, now: Instant, ch: ConnectionHandle, event: Event) {
        match event {
            Event::HandshakeDataReady | Event::DatagramsUnblocked => {}
            Event::Connected => self.on_connected(now, ch),
            Event::ConnectionLost { reason } => self.on_lost(now, ch, reason),
            Event::Stream(StreamEvent::Opened { dir: Dir::Uni }) => {
                while let Some(id) = self
                    .conns
                    .get_mut(&ch)
                    .and_then(|c| c.conn.streams().accept(Dir::Uni))
                {
                    if let Some(c) = self.conns.get_mut(&ch) {
                        c.reading.insert(id, Vec::new());
                    }
                    self.read_stream(now, ch, id);
                }
            }
            // We allow no bidirectional streams; quinn-proto enforces it.
            Event::Stream(StreamEvent::Opened { dir: Dir::Bi }) => {}
            Event::Stream(StreamEvent::Readable { id }) => self.read_stream(now, ch, id),
            Event::Stream(StreamEvent::Writable { id }) => {
                if let Some(c) = self.conns.get_mut(&ch) {
                    write_stream(c, id, &mut self.stats.drops);
                }
            }
            Event::Stream(StreamEvent::Finished { .. }) => {}
            Event::Stream(StreamEvent::Stopped { id, .. }) => {
                if let Some(c) = self.conns.get_mut(&ch) {
                    if let Some(rest) = c.writing.remove(&id) {
                        c.pending_bytes = c.pending_bytes.saturating_sub(rest.len());
                    }
                    self.stats.drops.messages_stopped_by_peer += 1;
                }
            }
            Event::Stream(StreamEvent::Available { dir: Dir::Uni }) => self.open_streams(ch),
            Event::Stream(StreamEvent::Available { dir: Dir::Bi }) => {}
            Event::DatagramReceived => {
                let peer = self.authenticated_peer(now, ch);
                let Some(c) = self.conns.get_mut(&ch) else {
                    return;
                };
                while let Some(bytes) = c.conn.datagrams().recv() {
                    match peer {
                        Some(peer) => {
                            self.stats.datagrams_in += 1;
                            self.events
                                .push_back(TransportEvent::Datagram { peer, bytes });
                        }
                        None => self.stats.drops.unauthenticated += 1,
                    }
                }
            }
        }
    }

    /// The peer of `ch` if data from it may be delivered; a client still waiting for
    /// HANDSHAKE_DONE is confirmed by the data itself (the server sends data only after it has
    /// accepted us).
    fn authenticated_peer(&mut self, now: Instant, ch: ConnectionHandle) -> Option<PeerId> {
        let c = self.conns.get(&ch)?;
        match c.state {
            State::Confirming { peer } => {
                self.establish(now, ch, peer);
                self.conns.get(&ch)?.peer()
            }
            State::Established { peer, .. } | State::Retiring { peer, .. } => Some(peer),
            State::Handshaking | State::Closed => None,
        }
    }

    /// Client: the handshake is confirmed once HANDSHAKE_DONE arrived.
    fn check_confirmed(&mut self, now: Instant, ch: ConnectionHandle) {
        let Some(c) = self.conns.get(&ch) else {
            return;
        };
        if let State::Confirming { peer } = c.state {
            if c.conn.stats().frame_rx.handshake_done > 0 {
                self.establish(now, ch, peer);
            }
        }
    }

    fn on_connected(&mut self, now: Instant, ch: ConnectionHandle) {
        let Some(c) = self.conns.get_mut(&ch) else {
            return;
        };
        // The verifiers already refused anything else; this is defence in depth.
        let Some(peer) = peer_of(&c.conn) else {
            self.fail_handshake(
                now,
                ch,
                HandshakeFailure::Other("no peer certificate after the handshake".into()),
            );
            return;
        };
        if peer == self.local {
            self.fail_handshake(
                now,
                ch,
                HandshakeFailure::Rejected(CertRejection::OwnIdentity),
            );
            return;
        }
        if c.inbound {
            self.establish(now, ch, peer);
        } else {
            c.state = State::Confirming { peer };
            self.check_confirmed(now, ch);
        }
    }

    /// The handshake of `ch` is done and `peer` authenticated: use the connection, or keep the
    /// better of two connections to the same peer (see the module documentation).
    fn establish(&mut self, now: Instant, ch: ConnectionHandle, peer: PeerId) {
        let Some(c) = self.conns.get_mut(&ch) else {
            return;
        };
        self.stats.handshakes_ok += 1;
        let new_inbound = c.inbound;
        let new_addr = c.conn.remote_address();
        let new_id = c.id;
        let existing = self.by_peer.get(&peer).copied().filter(|o| *o != ch);
        let Some(old) = existing else {
            c.state = State::Established { peer, since: now };
            self.by_peer.insert(peer, ch);
            self.events.push_back(TransportEvent::Connected {
                peer,
                addr: new_addr,
                inbound: new_inbound,
                conn: new_id,
            });
            return;
        };
        let (old_inbound, old_since) = match self.conns.get(&old).map(|c| &**c) {
            Some(Conn {
                inbound,
                state: State::Established { since, .. },
                ..
            }) => (*inbound, *since),
            _ => (new_inbound, now),
        };
        let initiator = |inbound: bool| if inbound { peer } else { self.local };
        let simultaneous = now.saturating_duration_since(old_since) <= SIMULTANEOUS_WINDOW
            && initiator(new_inbound) != initiator(old_inbound);
        let keep_new = if simultaneous {
            initiator(new_inbound) == self.local.min(peer)
        } else {
            true
        };
        let (winner, loser) = if keep_new { (ch, old) } else { (old, ch) };
        let mut moved = VecDeque::new();
        if let Some(l) = self.conns.get_mut(&loser) {
            let since = match l.state {
                State::Established { since, .. } => since,
                _ => now,
            };
            l.state = State::Retiring {
                peer,
                since,
                until: now + RETIRE_GRACE,
            };
            moved = mem::take(&mut l.queued);
            l.pending_bytes = l
                .pending_bytes
                .saturating_sub(moved.iter().map(Bytes::len).sum::<usize>());
        }
        if let Some(w) = self.conns.get_mut(&winner) {
            if winner == ch {
                w.state = State::Established { peer, since: now };
            }
            w.pending_bytes += moved.iter().map(Bytes::len).sum::<usize>();
            w.queued.extend(moved);
        }
        self.by_peer.insert(peer, winner);
        log::debug!("duplicate connection to {peer}: keeping {winner:?}, retiring {loser:?}");
        self.open_streams(winner);
        self.mark_for_transmit(winner);
    }

    /// Closes a connection whose handshake failed and reports it.
    fn fail_handshake(&mut self, now: Instant, ch: ConnectionHandle, reason: HandshakeFailure) {
        let Some(c) = self.conns.get_mut(&ch) else {
            return;
        };
        c.conn.close(
            now,
            VarInt::from_u32(CLOSE_HANDSHAKE),
            Bytes::from_static(b"handshake failed"),
        );
        c.state = State::Closed;
        self.stats.handshakes_failed += 1;
        if c.inbound {
            log::debug!("handshake from {} failed: {reason}", c.addr);
        } else {
            self.events.push_back(TransportEvent::HandshakeFailed {
                conn: c.id,
                addr: c.addr,
                reason,
            });
        }
    }

    fn on_lost(&mut self, now: Instant, ch: ConnectionHandle, reason: ConnectionError) {
        let Some(c) = self.conns.get_mut(&ch) else {
            return;
        };
        match mem::replace(&mut c.state, State::Closed) {
            previous @ (State::Handshaking | State::Confirming { .. }) => {
                // The peer retired this connection in favour of another one already in use.
                let superseded = matches!(&reason, ConnectionError::ApplicationClosed(a)
                    if a.error_code == VarInt::from_u32(CLOSE_DUPLICATE))
                    && matches!(previous, State::Confirming { peer } if self.by_peer.contains_key(&peer));
                self.stats.handshakes_failed += 1;
                let failure = failure_reason(&c.probe, reason);
                if c.inbound {
                    log::debug!("handshake from {} failed: {failure}", c.addr);
                } else if !superseded {
                    self.events.push_back(TransportEvent::HandshakeFailed {
                        conn: c.id,
                        addr: c.addr,
                        reason: failure,
                    });
                }
            }
            State::Established { peer, .. } => {
                if self.by_peer.get(&peer) == Some(&ch) {
                    self.by_peer.remove(&peer);
                    if !self.promote_retiring(now, peer) {
                        self.events.push_back(TransportEvent::Disconnected {
                            peer,
                            reason: DisconnectReason::from(reason),
                        });
                    }
                }
            }
            State::Retiring { .. } | State::Closed => {}
        }
    }

    /// After losing the connection in use, switch back to a retiring duplicate if one is alive.
    fn promote_retiring(&mut self, now: Instant, peer: PeerId) -> bool {
        let found = self.conns.iter_mut().find(|(_, c)| {
            matches!(c.state, State::Retiring { peer: p, .. } if p == peer) && !c.conn.is_closed()
        });
        let Some((ch, c)) = found else {
            return false;
        };
        let since = match c.state {
            State::Retiring { since, .. } => since,
            _ => now,
        };
        c.state = State::Established { peer, since };
        let ch = *ch;
        self.by_peer.insert(peer, ch);
        true
    }

    /// Moves queued messages onto new streams while the peer allows more.
    fn open_streams(&mut self, ch: ConnectionHandle) {
        let Some(c) = self.conns.get_mut(&ch) else {
            return;
        };
        while !c.queued.is_empty() {
            let Some(id) = c.conn.streams().open(Dir::Uni) else {
                break;
            };
            if let Some(message) = c.queued.pop_front() {
                c.writing.insert(id, message);
                write_stream(c, id, &mut self.stats.drops);
            }
        }
    }

    /// Reads what arrived on stream `id`; delivers the message once the stream is finished.
    fn read_stream(&mut self, now: Instant, ch: ConnectionHandle, id: StreamId) {
        let max = self.settings.max_message_size;
        let Some(c) = self.conns.get_mut(&ch) else {
            return;
        };
        let Some(buf) = c.reading.get_mut(&id) else {
            return;
        };
        let mut recv = c.conn.recv_stream(id);
        let Ok(mut chunks) = recv.read(true) else {
            c.reading.remove(&id);
            return;
        };
        enum Outcome {
            Pending,
            Finished,
            TooLarge,
            Reset,
        }
        let mut outcome = Outcome::Pending;
        loop {
            match chunks.next(usize::MAX) {
                Ok(Some(chunk)) => {
                    if buf.len().saturating_add(chunk.bytes.len()) > max {
                        outcome = Outcome::TooLarge;
                        break;
                    }
                    // Grown by a quarter, not doubled: a node holds a buffer per message in
                    // flight to it (up to `max_concurrent_streams` per peer).
                    if buf.capacity() - buf.len() < chunk.bytes.len() {
                        buf.reserve_exact(chunk.bytes.len().max(buf.len() / 4));
                    }
                    buf.extend_from_slice(&chunk.bytes);
                }
                Ok(None) => {
                    outcome = Outcome::Finished;
                    break;
                }
                Err(ReadError::Blocked) => break,
                Err(ReadError::Reset(_)) => {
                    outcome = Outcome::Reset;
                    break;
                }
            }
        }
        // Flow-control credit goes out with the next packet.
        let _ = chunks.finalize();
        match outcome {
            Outcome::Pending => {}
            Outcome::TooLarge => {
                c.reading.remove(&id);
                let _ = c
                    .conn
                    .recv_stream(id)
                    .stop(VarInt::from_u32(STOP_TOO_LARGE));
                self.stats.drops.oversize_messages += 1;
                log::debug!("dropped a message over {max} bytes from {:?}", c.peer());
            }
            Outcome::Reset => {
                c.reading.remove(&id);
                self.stats.drops.reset_messages += 1;
            }
            Outcome::Finished => {
                let mut message = c.reading.remove(&id).unwrap_or_default();
                // Delivered messages may wait in the event queue: hold what they hold.
                message.shrink_to_fit();
                match self.authenticated_peer(now, ch) {
                    Some(peer) => {
                        self.stats.messages_in += 1;
                        self.events.push_back(TransportEvent::Message {
                            peer,
                            bytes: Bytes::from(message),
                        });
                    }
                    None => self.stats.drops.unauthenticated += 1,
                }
            }
        }
    }

    /// Tests: send this SNI instead of our ticket (to replay another network's ticket).
    #[cfg(test)]
    pub(crate) fn set_sni_override(&mut self, name: Option<String>) {
        self.tls.sni_override = name;
    }
}

/// Writes as much of stream `id`'s message as QUIC takes; finishes the stream when done.
fn write_stream(c: &mut Conn, id: StreamId, drops: &mut DropStats) {
    let Some(data) = c.writing.get_mut(&id) else {
        return;
    };
    loop {
        if data.is_empty() {
            let _ = c.conn.send_stream(id).finish();
            c.writing.remove(&id);
            return;
        }
        // Handed over as it is (no copy): QUIC keeps the written part until it is acknowledged,
        // `data` keeps the rest.
        match c
            .conn
            .send_stream(id)
            .write_chunks(std::slice::from_mut(data))
        {
            Ok(written) => {
                c.pending_bytes = c.pending_bytes.saturating_sub(written.bytes);
            }
            Err(WriteError::Blocked) => return,
            Err(WriteError::Stopped(_) | WriteError::ClosedStream) => {
                c.pending_bytes = c.pending_bytes.saturating_sub(data.len());
                c.writing.remove(&id);
                drops.messages_stopped_by_peer += 1;
                return;
            }
        }
    }
}

/// The authenticated peer id of a connection: the key of the certificate it presented.
fn peer_of(conn: &quinn_proto::Connection) -> Option<PeerId> {
    let chain = conn
        .crypto_session()
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    let first = chain.first()?;
    cert::parse(first).ok().map(|f| f.peer)
}

/// A typed reason for a failed handshake: what our verifier refused, else what the connection
/// error says.
fn failure_reason(probe: &HandshakeProbe, error: ConnectionError) -> HandshakeFailure {
    if let Some(rejection) = probe.rejection() {
        return HandshakeFailure::Rejected(rejection);
    }
    let crypto_alert = |code: u64| (0x100..0x200).contains(&code).then(|| (code - 0x100) as u8);
    match error {
        ConnectionError::TimedOut => HandshakeFailure::TimedOut,
        ConnectionError::ConnectionClosed(close) => HandshakeFailure::Refused {
            tls_alert: crypto_alert(u64::from(close.error_code)),
        },
        ConnectionError::ApplicationClosed(_) => HandshakeFailure::Refused { tls_alert: None },
        ConnectionError::TransportError(e) if probe.ticket_refused() => {
            HandshakeFailure::Other(format!("no valid ticket in the ClientHello: {e}"))
        }
        other => HandshakeFailure::Other(other.to_string()),
    }
}
