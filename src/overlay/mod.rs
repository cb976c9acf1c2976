//! The encrypted overlay transport: QUIC (quinn-proto) with mutual TLS 1.3 between token
//! members, sans-IO.
//!
//! - [`cert`]: the node certificate (self-signed Ed25519, carries the membership proof).
//! - [`tls`]: rustls configurations: member-only verifiers, the SNI ticket that keeps
//!   non-members from even seeing a certificate, cipher-suite choice per CPU.
//! - [`transport`]: [`Transport`], one quinn-proto endpoint and one connection per peer:
//!   control messages on unidirectional streams, VPN packets as QUIC DATAGRAM frames.
//! - [`relay`]: virtual addresses and frames for connections relayed through a third member.
//!
//! Nothing here opens a socket, reads a clock or spawns a thread: every call takes `now`, and
//! randomness comes from the seed given to [`Transport::new`].

pub mod cert;
pub mod relay;
pub mod tls;
pub mod transport;

#[cfg(test)]
mod tests;

pub use tls::{ALPN, CertRejection, CipherPreference};
pub use transport::{
    ConnId, ConnectError, DisconnectReason, DropStats, HandshakeFailure, MIN_PATH_MTU, PeerInfo,
    SendError, Transmit, Transport, TransportError, TransportEvent, TransportSettings,
    TransportStats,
};

/// True when a UDP payload starting with `first_byte` may be QUIC.
///
/// The transport disables QUIC-bit greasing (RFC 9287), so every QUIC packet it sends or accepts
/// has the fixed bit (0x40) set. The node multiplexes its other packets (LAN beacons, DHT) on the
/// same socket with that bit clear, and hands only packets for which this returns true to
/// [`Transport::handle_datagram`].
#[must_use]
pub fn is_quic_packet(first_byte: u8) -> bool {
    first_byte & 0x40 != 0
}
