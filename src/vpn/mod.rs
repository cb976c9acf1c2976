//! The VPN packet path, sans-IO: which peer an IP packet read from the TUN interface goes to,
//! and whether a packet a peer sent may be written to it.
//!
//! - [`packet`]: bounded IPv4/IPv6 header parsing.
//! - [`routes`]: VPN address → owning peer, from the ledger's `machines` bucket.
//! - [`Vpn`]: the checks both ways, and counters for `/metrics` ([`VpnStats`]).
//!
//! The driver reads a packet from the TUN interface, asks [`Vpn::route_outgoing`] for the peer
//! and sends the packet as one QUIC DATAGRAM to it; a datagram that is not a relay frame goes to
//! [`Vpn::accept_incoming`] and, if accepted, to the TUN interface. After `machines` changes it
//! calls [`Vpn::update_routes`], after an address change [`Vpn::set_local`].
//!
//! # What is dropped on purpose
//! - IPv6 packets, both ways ([`Drop::Ipv6`]). Members hold IPv4 VPN addresses only, so no IPv6
//!   destination has an owner, and no IPv6 source can be checked against the sender: accepting
//!   them would let any member inject packets from any address. The kernel still sends some to
//!   the interface (router and neighbour solicitations, MLD from its link-local address); they
//!   are counted apart so they do not read as errors.
//! - Broadcast and multicast destinations, both ways ([`Drop::Broadcast`]): the prefix's
//!   broadcast and network addresses, 255.255.255.255 and 224.0.0.0/4. The overlay is made of
//!   point-to-point connections: a broadcast would cost one datagram per member and let one
//!   packet fan out to the whole network. What runs over the VPN (k3s, flannel's VXLAN) is
//!   unicast.
//!
//! # MTU
//! A VPN packet travels as one QUIC DATAGRAM frame and is never fragmented: quinn-proto refuses a
//! datagram over its `max_datagram_size`, the connection's current path MTU (UDP payload size of
//! its QUIC packets) less what it reserves for the frame ([`DATAGRAM_OVERHEAD`]):
//!
//! | per QUIC packet                              | on the wire | quinn reserves |
//! |----------------------------------------------|-------------|----------------|
//! | short header flags                           | 1           | 1              |
//! | destination connection id (the transport's `HashedConnectionIdGenerator`) | 8 | 8 |
//! | packet number                                | 1 to 4      | 4              |
//! | DATAGRAM frame type                          | 1           | 1              |
//! | DATAGRAM length (varint, 64 to 16383 bytes)  | 2           | 8              |
//! | AEAD tag (AES-GCM or ChaCha20-Poly1305)      | 16          | 16             |
//! | total                                        | at most 32  | 38             |
//!
//! Below QUIC come UDP (8 bytes) and IPv4 (20) or IPv6 (40): 28 or 48 bytes.
//!
//! - Direct path: the transport's `initial_mtu` is 1452 (1500 − 48): datagrams of up to
//!   1452 − 38 = 1414 bytes; a full QUIC packet is 1500 bytes on IPv6, 1480 on IPv4.
//! - Relayed path: inner QUIC packets of at most `RELAYED_MTU` = 1380 bytes carry datagrams of
//!   up to 1380 − 38 = 1342; with the 33-byte relay header an inner packet is a 1413-byte
//!   datagram on the two outer connections, within their 1414.
//! - Narrower paths (PPPoE 1492, 1460 on Google Cloud, 1450 under VXLAN, 1420 under WireGuard)
//!   lose or fragment the 1452-byte packets; quinn-proto's black-hole detection then falls back
//!   to the transport's `min_mtu` for the rest of the connection (MTU discovery is off). QUIC's
//!   own floor would be 1200 ([`QUIC_MIN_UDP_PAYLOAD`]), whose datagrams carry only
//!   1200 − 38 = 1162 bytes; the transport sets `min_mtu` to [`MIN_PATH_MTU`] = 1200 + 38 = 1238
//!   instead, so a fallen-back connection still carries a full [`DEFAULT_MTU`] packet.
//!
//! [`DEFAULT_MTU`] is Kairos' `EDGEVPNMTU` default, 1200, kept: alone in its QUIC packet a
//! 1200-byte VPN packet makes at most 1200 + 32 = 1232 bytes of UDP payload (quinn reserves 6
//! bytes more than it needs: 1238), 1266 bytes on IPv4 and 1286 on IPv6. It crosses every IPv4
//! path of 1266 bytes or more and every IPv6 path but one of exactly 1280 to 1285 bytes, without
//! fragmentation, whatever the path. (A relayed path whose outer connection fell back carries
//! nothing at all: an inner QUIC packet is at least 1200 bytes, 1233 with its relay header. That
//! is for the transport to handle, not the VPN MTU.)
//!
//! With a larger MTU configured, [`Vpn::route_outgoing`] refuses the packets the peer's
//! connection cannot take and counts them.

pub mod offload;
pub mod packet;
pub mod routes;

use std::fmt;
use std::net::Ipv4Addr;

use crate::config::Ipv4Cidr;
use crate::identity::PeerId;
use crate::ledger::Ledger;
use crate::overlay::MIN_PATH_MTU;

use packet::IpHeader;
use routes::Routes;

/// The smallest UDP payload every QUIC path must carry (RFC 9000, section 14), and the path MTU
/// quinn-proto falls back to when larger packets are lost.
pub const QUIC_MIN_UDP_PAYLOAD: u16 = 1200;

/// Short header flags byte.
const SHORT_HEADER_FLAGS_LEN: u16 = 1;
/// Connection id length of the transport's `HashedConnectionIdGenerator`.
const CONNECTION_ID_LEN: u16 = 8;
/// Longest packet number, which quinn-proto assumes for datagram sizes.
const MAX_PACKET_NUMBER_LEN: u16 = 4;
/// AEAD tag of every QUIC cipher suite.
const AEAD_TAG_LEN: u16 = 16;
/// DATAGRAM frame type and length as quinn-proto bounds them (1 + an 8-byte varint).
const DATAGRAM_FRAME_BOUND: u16 = 1 + 8;

/// Bytes quinn-proto reserves in a QUIC packet besides the data of one DATAGRAM frame:
/// `max_datagram_size` is the path MTU less this (see the module documentation).
pub const DATAGRAM_OVERHEAD: u16 = SHORT_HEADER_FLAGS_LEN
    + CONNECTION_ID_LEN
    + MAX_PACKET_NUMBER_LEN
    + AEAD_TAG_LEN
    + DATAGRAM_FRAME_BOUND;

/// The default VPN MTU, Kairos' 1200: the largest packet a direct connection carries whatever
/// its path, given the transport's [`MIN_PATH_MTU`] (see the module documentation).
pub const DEFAULT_MTU: u16 = MIN_PATH_MTU - DATAGRAM_OVERHEAD;

/// Why a packet was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Drop {
    /// Not a well-formed IP packet (see [`packet::PacketError`]).
    Malformed,
    /// An IPv6 packet: the VPN carries IPv4 only (see the module documentation).
    Ipv6,
    /// To a broadcast or multicast address, or the prefix's network address (see the module
    /// documentation).
    Broadcast,
    /// Outgoing: the source is not our VPN address.
    NotOurSource,
    /// Outgoing: the destination is outside the VPN prefix.
    OutsidePrefix,
    /// Outgoing: no member owns the destination.
    UnknownDestination,
    /// Outgoing: larger than the VPN MTU.
    OverMtu,
    /// Outgoing: the owner is not connected and cannot be dialled now (not a member we know an
    /// address of, or its dials back off), or its connection takes no datagrams (our own
    /// address's route ends here too). A member being dialled takes the packet: it waits for
    /// the connection (`node::held`).
    Unreachable,
    /// Outgoing: larger than the owner's connection carries now.
    OverDatagramLimit,
    /// Incoming: the destination is not our VPN address.
    NotForUs,
    /// Incoming: no member owns the source address (not learned yet, or not a VPN address).
    UnknownSource,
    /// Incoming: the source address belongs to another member than the sender.
    SpoofedSource,
}

impl Drop {
    /// Every reason, in declaration order.
    pub const ALL: [Drop; 12] = [
        Drop::Malformed,
        Drop::Ipv6,
        Drop::Broadcast,
        Drop::NotOurSource,
        Drop::OutsidePrefix,
        Drop::UnknownDestination,
        Drop::OverMtu,
        Drop::Unreachable,
        Drop::OverDatagramLimit,
        Drop::NotForUs,
        Drop::UnknownSource,
        Drop::SpoofedSource,
    ];

    /// A short snake_case name, for metric labels.
    pub fn name(self) -> &'static str {
        match self {
            Drop::Malformed => "malformed",
            Drop::Ipv6 => "ipv6",
            Drop::Broadcast => "broadcast",
            Drop::NotOurSource => "not_our_source",
            Drop::OutsidePrefix => "outside_prefix",
            Drop::UnknownDestination => "unknown_destination",
            Drop::OverMtu => "over_mtu",
            Drop::Unreachable => "unreachable",
            Drop::OverDatagramLimit => "over_datagram_limit",
            Drop::NotForUs => "not_for_us",
            Drop::UnknownSource => "unknown_source",
            Drop::SpoofedSource => "spoofed_source",
        }
    }
}

impl fmt::Display for Drop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Packets dropped, per reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DropCounts([u64; Drop::ALL.len()]);

impl DropCounts {
    /// Packets dropped for `reason`.
    pub fn get(&self, reason: Drop) -> u64 {
        self.0[reason as usize]
    }

    /// Packets dropped for any reason.
    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }

    /// Every reason with its count, in [`Drop::ALL`] order.
    pub fn iter(&self) -> impl Iterator<Item = (Drop, u64)> + '_ {
        Drop::ALL
            .into_iter()
            .map(|reason| (reason, self.get(reason)))
    }

    fn add(&mut self, reason: Drop) {
        self.0[reason as usize] += 1;
    }
}

/// What the VPN path has done since it was created; never reset.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VpnStats {
    /// Packets routed to a peer.
    pub packets_out: u64,
    /// Bytes of those packets.
    pub bytes_out: u64,
    /// Packets accepted from peers.
    pub packets_in: u64,
    /// Bytes of those packets.
    pub bytes_in: u64,
    /// Packets from the TUN interface dropped, by reason.
    pub dropped_out: DropCounts,
    /// Packets from peers dropped, by reason.
    pub dropped_in: DropCounts,
}

/// What the VPN path needs to know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VpnSettings {
    /// Our VPN address and the VPN prefix (e.g. `10.1.0.7/24`).
    pub local: Ipv4Cidr,
    /// The TUN interface's MTU: larger packets are dropped ([`DEFAULT_MTU`] is recommended).
    pub mtu: u16,
}

/// The VPN packet path of one node (see the module documentation).
#[derive(Debug, Clone)]
pub struct Vpn {
    local: Ipv4Cidr,
    mtu: u16,
    routes: Routes,
    stats: VpnStats,
}

impl Vpn {
    /// A VPN path with an empty routing table (fill it with [`update_routes`](Self::update_routes)).
    pub fn new(settings: VpnSettings) -> Self {
        Self {
            local: settings.local,
            mtu: settings.mtu,
            routes: Routes::new(settings.local),
            stats: VpnStats::default(),
        }
    }

    /// Our VPN address and prefix.
    pub fn local(&self) -> Ipv4Cidr {
        self.local
    }

    /// The MTU in force.
    pub fn mtu(&self) -> u16 {
        self.mtu
    }

    /// The routing table.
    pub fn routes(&self) -> &Routes {
        &self.routes
    }

    /// Counters since creation.
    pub fn stats(&self) -> &VpnStats {
        &self.stats
    }

    /// Re-reads the routes from the ledger; true when a route changed.
    pub fn update_routes(&mut self, ledger: &Ledger) -> bool {
        self.routes.update(ledger)
    }

    /// Our address changed; with a new prefix the routes are re-read from `ledger`.
    pub fn set_local(&mut self, local: Ipv4Cidr, ledger: &Ledger) {
        if routes::Subnet::new(local) != self.routes.subnet() {
            self.routes = Routes::from_ledger(ledger, local);
        }
        self.local = local;
    }

    /// The peer to send `packet` (read from the TUN interface) to, or why it is dropped.
    /// `max_datagram` gives the largest datagram the connection to a peer takes now
    /// (`Transport::max_datagram_size`), `None` when there is none.
    pub fn route_outgoing(
        &mut self,
        packet: &[u8],
        max_datagram: impl FnOnce(&PeerId) -> Option<usize>,
    ) -> Result<PeerId, Drop> {
        let routed = self.outgoing(packet, max_datagram);
        match routed {
            Ok(_) => {
                self.stats.packets_out += 1;
                self.stats.bytes_out += packet.len() as u64;
            }
            Err(reason) => self.stats.dropped_out.add(reason),
        }
        routed
    }

    /// Whether `packet`, a datagram from `from`, may be written to the TUN interface.
    pub fn accept_incoming(&mut self, from: PeerId, packet: &[u8]) -> Result<(), Drop> {
        let accepted = self.incoming(from, packet);
        match accepted {
            Ok(()) => {
                self.stats.packets_in += 1;
                self.stats.bytes_in += packet.len() as u64;
            }
            Err(reason) => self.stats.dropped_in.add(reason),
        }
        accepted
    }

    fn outgoing(
        &self,
        packet: &[u8],
        max_datagram: impl FnOnce(&PeerId) -> Option<usize>,
    ) -> Result<PeerId, Drop> {
        let (source, destination) = ipv4_addresses(packet)?;
        if packet.len() > usize::from(self.mtu) {
            return Err(Drop::OverMtu);
        }
        if source != self.local.addr {
            return Err(Drop::NotOurSource);
        }
        if self.is_broadcast(destination) {
            return Err(Drop::Broadcast);
        }
        if !self.routes.subnet().contains(destination) {
            return Err(Drop::OutsidePrefix);
        }
        let peer = self
            .routes
            .owner(destination)
            .ok_or(Drop::UnknownDestination)?;
        let max = max_datagram(&peer).ok_or(Drop::Unreachable)?;
        if packet.len() > max {
            return Err(Drop::OverDatagramLimit);
        }
        Ok(peer)
    }

    fn incoming(&self, from: PeerId, packet: &[u8]) -> Result<(), Drop> {
        let (source, destination) = ipv4_addresses(packet)?;
        if self.is_broadcast(destination) {
            return Err(Drop::Broadcast);
        }
        if destination != self.local.addr {
            return Err(Drop::NotForUs);
        }
        match self.routes.owner(source) {
            Some(owner) if owner == from => Ok(()),
            Some(_) => Err(Drop::SpoofedSource),
            None => Err(Drop::UnknownSource),
        }
    }

    /// Broadcast, multicast, or the prefix's network or broadcast address.
    fn is_broadcast(&self, addr: Ipv4Addr) -> bool {
        addr.is_broadcast()
            || addr.is_multicast()
            || self.routes.subnet().is_network_or_broadcast(addr)
    }
}

/// Source and destination of an IPv4 packet.
fn ipv4_addresses(packet: &[u8]) -> Result<(Ipv4Addr, Ipv4Addr), Drop> {
    match IpHeader::parse(packet) {
        Ok(IpHeader::V4 {
            source,
            destination,
        }) => Ok((source, destination)),
        Ok(IpHeader::V6 { .. }) => Err(Drop::Ipv6),
        Err(_) => Err(Drop::Malformed),
    }
}

#[cfg(test)]
mod tests;
