//! Per-node traffic and discovery metrics the simulator keeps.

use std::time::Duration;

use crate::discovery::beacon::looks_like_beacon;
use crate::discovery::kad::is_dht_packet;
use crate::overlay::is_quic_packet;

/// What a UDP payload is, by its first byte (as the node demultiplexes it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PacketKind {
    /// QUIC (the fixed bit 0x40 set).
    Quic,
    /// A LAN beacon.
    Beacon,
    /// A DHT message.
    Dht,
    /// Anything else.
    Other,
}

impl PacketKind {
    /// Every kind, in [`index`](Self::index) order.
    pub const ALL: [PacketKind; 4] = [Self::Quic, Self::Beacon, Self::Dht, Self::Other];

    /// Classifies a payload.
    #[must_use]
    pub fn of(bytes: &[u8]) -> Self {
        match bytes.first() {
            Some(&b) if is_quic_packet(b) => Self::Quic,
            Some(_) if looks_like_beacon(bytes) => Self::Beacon,
            Some(_) if is_dht_packet(bytes) => Self::Dht,
            _ => Self::Other,
        }
    }

    /// Position in per-kind arrays.
    #[must_use]
    pub fn index(self) -> usize {
        match self {
            Self::Quic => 0,
            Self::Beacon => 1,
            Self::Dht => 2,
            Self::Other => 3,
        }
    }
}

/// A DHT message's kind, by its third byte (see [`crate::discovery::kad::message`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DhtKind {
    /// PING.
    Ping,
    /// PONG.
    Pong,
    /// FIND_NODE.
    FindNode,
    /// NODES.
    Nodes,
    /// PUT.
    Put,
    /// PUT_ACK.
    PutAck,
    /// GET.
    Get,
    /// VALUE.
    Value,
}

impl DhtKind {
    /// Number of kinds.
    pub const COUNT: usize = 8;
    /// Every kind, in [`index`](Self::index) order.
    pub const ALL: [DhtKind; Self::COUNT] = [
        Self::Ping,
        Self::Pong,
        Self::FindNode,
        Self::Nodes,
        Self::Put,
        Self::PutAck,
        Self::Get,
        Self::Value,
    ];

    /// The kind of a DHT datagram, if its kind byte is a known one.
    #[must_use]
    pub fn of(datagram: &[u8]) -> Option<Self> {
        let kind = usize::from(*datagram.get(2)?);
        Self::ALL.get(kind.checked_sub(1)?).copied()
    }

    /// Position in per-kind arrays.
    #[must_use]
    pub fn index(self) -> usize {
        self as usize
    }
}

/// Packets and bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Packets.
    pub packets: u64,
    /// UDP payload bytes.
    pub bytes: u64,
}

impl Traffic {
    fn add(&mut self, len: usize) {
        self.packets += 1;
        self.bytes += len as u64;
    }
}

impl std::ops::Add for Traffic {
    type Output = Traffic;

    fn add(self, o: Traffic) -> Traffic {
        Traffic {
            packets: self.packets + o.packets,
            bytes: self.bytes + o.bytes,
        }
    }
}

/// What the simulator measured for one host, across restarts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeMetrics {
    /// Sent, by [`PacketKind::index`] (a LAN broadcast counts once).
    pub sent: [Traffic; 4],
    /// Received (delivered to a listening socket), by [`PacketKind::index`].
    pub received: [Traffic; 4],
    /// DHT messages sent, by message kind ([`DhtKind::index`]).
    pub dht_sent: [Traffic; DhtKind::COUNT],
    /// `PeerConnected` events.
    pub connections: u64,
    /// `PeerDisconnected` events.
    pub disconnections: u64,
    /// `MemberDiscovered` events.
    pub members_discovered: u64,
    /// `MemberLost` events.
    pub members_lost: u64,
    /// Times the node was started (restarts included).
    pub starts: u64,
    /// Virtual time since which the node has known every running member of its network
    /// (`None` while it does not).
    pub knows_all_since: Option<Duration>,
    /// First virtual time at which it knew every running member of its network.
    pub first_knew_all: Option<Duration>,
}

impl NodeMetrics {
    pub(crate) fn count_sent(&mut self, kind: PacketKind, payload: &[u8]) {
        self.sent[kind.index()].add(payload.len());
        if kind == PacketKind::Dht {
            if let Some(k) = DhtKind::of(payload) {
                self.dht_sent[k.index()].add(payload.len());
            }
        }
    }

    pub(crate) fn count_received(&mut self, kind: PacketKind, len: usize) {
        self.received[kind.index()].add(len);
    }

    /// Everything sent.
    #[must_use]
    pub fn total_sent(&self) -> Traffic {
        self.sent.iter().fold(Traffic::default(), |a, b| a + *b)
    }

    /// Everything received.
    #[must_use]
    pub fn total_received(&self) -> Traffic {
        self.received.iter().fold(Traffic::default(), |a, b| a + *b)
    }
}

/// The sum of `metrics`' traffic, sent and received, by kind.
#[must_use]
pub fn total_traffic<'a>(
    metrics: impl IntoIterator<Item = &'a NodeMetrics>,
) -> ([Traffic; 4], [Traffic; 4]) {
    let mut sent = [Traffic::default(); 4];
    let mut received = [Traffic::default(); 4];
    for m in metrics {
        for i in 0..4 {
            sent[i] = sent[i] + m.sent[i];
            received[i] = received[i] + m.received[i];
        }
    }
    (sent, received)
}
