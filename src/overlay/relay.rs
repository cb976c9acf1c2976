//! Relayed paths: a QUIC connection between two members carried, packet by packet, inside
//! DATAGRAM frames of the connections both have with a third member (the relay).
//!
//! The relay forwards opaque QUIC packets of a connection whose keys only the two ends hold,
//! so it learns who talks to whom and how much, never what. The transport addresses such a path
//! by a *virtual* socket address in a private IPv6 range that never appears on a real network;
//! the node maps each virtual address to (peer, relay) and wraps or unwraps the packets.
//!
//! Sizes: a direct connection with the default `initial_mtu` of 1452 carries datagrams of up to
//! 1414 bytes; the relay header takes [`RELAY_HEADER_LEN`] bytes, so relayed QUIC packets are at
//! most [`RELAYED_MTU`] bytes, whose own datagrams (VPN packets) carry up to about 1340 bytes.

use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};

use crate::identity::PeerId;
use crate::wire::{Reader, WireError, Writer};

/// First bytes of every virtual relay address: `fd6b:7032:7072::/48` ("kp2pr" in a ULA prefix).
const RELAY_PREFIX: [u16; 3] = [0xfd6b, 0x7032, 0x7072];
/// UDP payload size of QUIC packets on relayed paths.
pub const RELAYED_MTU: u16 = 1380;
/// Bytes a relay frame adds in front of the QUIC packet (kind + peer id).
pub const RELAY_HEADER_LEN: usize = 33;

/// Datagram kind: "forward this packet to the peer named" (sender to relay).
const KIND_FORWARD: u8 = 0x01;
/// Datagram kind: "this packet comes from the peer named" (relay to receiver).
const KIND_FORWARDED: u8 = 0x02;

/// The virtual address of relayed path number `slot`.
pub fn relay_addr(slot: u32) -> SocketAddr {
    let [a, b, c] = RELAY_PREFIX;
    let ip = Ipv6Addr::new(a, b, c, 0, 0, 0, (slot >> 16) as u16, slot as u16);
    SocketAddr::V6(SocketAddrV6::new(ip, 1, 0, 0))
}

/// True for a virtual relay address.
pub fn is_relay_addr(addr: &SocketAddr) -> bool {
    match addr {
        SocketAddr::V6(a) => a.ip().segments()[..3] == RELAY_PREFIX,
        SocketAddr::V4(_) => false,
    }
}

/// A relay frame, carried as a QUIC DATAGRAM between a member and its relay. VPN datagrams
/// (IP packets) start with 0x4_ or 0x6_, so the first byte tells the two apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayFrame<'a> {
    /// From a member to the relay: pass `packet` on to `to`.
    Forward {
        /// The final receiver.
        to: PeerId,
        /// The QUIC packet.
        packet: &'a [u8],
    },
    /// From the relay to a member: `packet` was sent by `from`.
    Forwarded {
        /// The original sender (the relay vouches for it; QUIC authenticates it end to end).
        from: PeerId,
        /// The QUIC packet.
        packet: &'a [u8],
    },
}

impl<'a> RelayFrame<'a> {
    /// True when a datagram is a relay frame (and not a VPN packet).
    pub fn is_relay_frame(datagram: &[u8]) -> bool {
        matches!(datagram.first(), Some(&KIND_FORWARD | &KIND_FORWARDED))
    }

    /// Decodes a relay frame.
    pub fn decode(datagram: &'a [u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(datagram);
        let kind = r.u8()?;
        let peer = r.peer_id()?;
        let packet = r.rest();
        if packet.is_empty() {
            return Err(WireError::Invalid("empty relayed packet"));
        }
        match kind {
            KIND_FORWARD => Ok(Self::Forward { to: peer, packet }),
            KIND_FORWARDED => Ok(Self::Forwarded { from: peer, packet }),
            tag => Err(WireError::UnknownTag {
                field: "relay frame kind",
                tag,
            }),
        }
    }

    /// Encodes into `buf` (cleared first).
    pub fn encode(&self, buf: &mut Vec<u8>) {
        buf.clear();
        let mut w = Writer::new(buf);
        let (kind, peer, packet) = match self {
            Self::Forward { to, packet } => (KIND_FORWARD, to, packet),
            Self::Forwarded { from, packet } => (KIND_FORWARDED, from, packet),
        };
        w.u8(kind).peer_id(peer).bytes(packet);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtual_addresses_are_recognised_and_distinct() {
        assert!(is_relay_addr(&relay_addr(0)));
        assert!(is_relay_addr(&relay_addr(u32::MAX)));
        assert_ne!(relay_addr(1), relay_addr(65_536));
        assert!(!is_relay_addr(&"[fd6b:7032:7073::1]:1".parse().unwrap()));
        assert!(!is_relay_addr(&"10.0.0.1:1".parse().unwrap()));
    }

    #[test]
    fn frames_round_trip_and_bad_ones_are_typed_errors() {
        let mut buf = Vec::new();
        for frame in [
            RelayFrame::Forward {
                to: PeerId([3; 32]),
                packet: b"quic",
            },
            RelayFrame::Forwarded {
                from: PeerId([4; 32]),
                packet: b"quic!",
            },
        ] {
            frame.encode(&mut buf);
            assert!(RelayFrame::is_relay_frame(&buf));
            assert_eq!(RelayFrame::decode(&buf), Ok(frame));
            assert_eq!(buf.len(), RELAY_HEADER_LEN + frame_packet_len(&frame));
        }
        assert!(RelayFrame::decode(&[1; 10]).is_err());
        assert_eq!(
            RelayFrame::decode(&[1; 33]),
            Err(WireError::Invalid("empty relayed packet"))
        );
        assert!(
            !RelayFrame::is_relay_frame(&[0x45, 0, 0]),
            "an IPv4 packet is not a relay frame"
        );
    }

    fn frame_packet_len(frame: &RelayFrame<'_>) -> usize {
        match frame {
            RelayFrame::Forward { packet, .. } | RelayFrame::Forwarded { packet, .. } => {
                packet.len()
            }
        }
    }
}
