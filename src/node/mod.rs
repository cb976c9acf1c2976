//! The node: one sans-IO state machine that owns the QUIC transport, LAN discovery, the DHT and
//! the member table, and decides whom to connect to.
//!
//! Call order for a driver (the mio loop or the simulator), each turn:
//! 1. [`Node::handle_datagram`] for every UDP payload received (overlay or beacon socket);
//! 2. [`Node::handle_timeout`] when [`Node::poll_timeout`] has passed;
//! 3. drain [`Node::poll_transmit`] (send each packet) and [`Node::poll_event`];
//! 4. sleep until [`Node::poll_timeout`].
//!
//! Time comes in as `now` (monotonic) and `unix_ms` (wall clock: key windows, ledger versions);
//! randomness from the seed given to [`Node::new`].
//!
//! Connections: a node keeps about [`NodeSettings::neighbours`] connections to other members
//! (LAN peers first, plus [`REMOTE_NEIGHBOURS`] outside the LAN when any are known), over which
//! members gossip what they know: news of a member goes to every connected member at once; the
//! whole member list goes to a couple of them now and then ([`SYNC_FANOUT`]). A connection on
//! which nothing was sent for a [`KEEP_ALIVE_INTERVAL`] gets a QUIC PING from its end with the
//! smaller peer id, which keeps it open. Of two members that find each other, the one with the smaller
//! peer id dials at once and the other only after [`DIAL_DEFER`], so they rarely dial each other
//! simultaneously (the transport resolves it when they do).

pub mod bootstrap;
pub mod control;
pub mod held;
pub mod members;
pub mod relay;
#[cfg(test)]
mod vpn_tests;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::cluster::{Cluster, ClusterEvent, Write};
use crate::discovery::beacon::looks_like_beacon;
use crate::discovery::kad::{self, Kad, KadEvent, KadSettings};
use crate::discovery::lan::{LanDiscovery, LanEvent};
use crate::identity::{Identity, PeerId};
use crate::overlay::relay::{RELAY_HEADER_LEN, RelayFrame, is_relay_addr};
use crate::overlay::{
    ConnId, ConnectError, DisconnectReason, Transport, TransportError, TransportEvent,
    TransportSettings, is_quic_packet,
};
use crate::rng::Rng;
use crate::token::{KeySchedule, NetworkToken, Window};
use crate::vpn::{self, Vpn, VpnSettings};
pub use control::{Control, MemberInfo, cluster_tag};
use held::HeldPackets;
use members::{Change, MemberTable, Source};
use relay::RelayPaths;

/// Largest control-message encode buffer a node keeps between messages (bigger ones, member
/// lists of large networks, are encoded into a buffer freed after the copy).
const MAX_KEPT_SCRATCH: usize = 16 * 1024;

/// How long the member with the larger peer id waits before dialling one it discovered.
pub const DIAL_DEFER: Duration = Duration::from_millis(1500);
/// [`DIAL_DEFER`] for a member heard on our LAN: the other side's dial, if it makes one (it
/// does not once it has its neighbours), is up in a few milliseconds there, and a LAN member
/// not connected holds the discovery gate.
pub const LAN_DIAL_DEFER: Duration = Duration::from_millis(250);
/// Batching delay of gossip about new or changed members.
pub const PUSH_DELAY: Duration = Duration::from_millis(100);
/// Keep-alive rounds come this often: a connection to which this node sent nothing since the
/// previous round gets a QUIC PING (one ack-eliciting packet, answered by an ACK), from its end
/// with the smaller peer id only: the other end's ACK keeps its own idle timer and NAT mapping
/// fresh. So a connection hears something at least every two rounds (20 s), within the transport's
/// 30 s idle timeout, and a busy one (ledger heartbeats, gossip) costs nothing more. (An empty
/// member list from both ends every 20 s did the same for a stream frame, a flow-control update
/// and twice the packets.)
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// Once per tenth of the member ttl (60 s by default), a sync round sends the whole member list
/// to this many random connected members. Any member's list is about as
/// fresh as any other's, so a couple per period keep ages well under the ttl everywhere; the
/// whole list to every connection every 20 s made idle traffic grow with members × connections
/// (7 KB/s per node at 200 members, 37 KB/s at 1,000).
pub const SYNC_FANOUT: usize = 2;
/// Housekeeping period (dialling).
pub const MAINTAIN_INTERVAL: Duration = Duration::from_millis(500);
/// How often first-hand knowledge (connections, LAN beacons) refreshes the member table and
/// silent members are forgotten: each pass costs O(members), and freshness only matters on the
/// scale of the member ttl.
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(5);
/// Connections kept to members outside our LAN when any are known, on top of LAN neighbours if
/// need be: without them, subnets full of LAN peers would gossip only among themselves.
pub const REMOTE_NEIGHBOURS: usize = 2;
/// Connections kept to members of our own cluster (`network_id`) when any are known, on top of
/// the others if need be (see [`Node::dial_cluster_neighbours`]).
pub const CLUSTER_NEIGHBOURS: usize = 4;
/// Longest back-off between dial attempts to one member: sites cut apart (a WAN outage) dial
/// each other again within this long of the path coming back (with the bootstrap retry's
/// [`MAX_BOOTSTRAP_RETRY`](crate::discovery::kad::MAX_BOOTSTRAP_RETRY) before it when the members
/// were forgotten meanwhile: within 30 s in all, handshakes included). A dial to a member that
/// stays away costs one QUIC Initial per path per period.
pub const MAX_DIAL_BACKOFF: Duration = Duration::from_secs(10);
/// The discovery gate's bound (see [`Node::discovery_settled`]): how long a node waits, from its
/// start, for bootstrap peers that do not answer and for a first complete rendezvous round, and,
/// from the moment it learns of a member, for a connection to it. A site that reaches the others
/// (a bootstrap peer, or the DHT) within this long of starting takes part in their election
/// instead of holding its own.
pub const DISCOVERY_WAIT: Duration = Duration::from_secs(20);
/// How long a member outside our LAN (found in the DHT rendezvous or through gossip: a member of
/// another site, typically) but not connected holds the discovery gate, from when it was found: longer than
/// [`RENDEZVOUS_INTERVAL`], so that when both sites sit behind NATs that only a simultaneous dial
/// crosses, the other site's next rendezvous lookup finds us and dials back while we still dial.
/// A site electing a master of its own while it knows of members it cannot reach yet would
/// knowingly start a second cluster. (A stale record of a member that is gone costs this wait
/// once, before the first election only.)
pub const UNREACHED_SITE_WAIT: Duration = Duration::from_secs(150);
/// No member may have been discovered for this long before the gate opens: news of a member
/// brings its connection, the members it knows and its ledger within a few round trips.
pub const DISCOVERY_SETTLE: Duration = Duration::from_millis(1500);
/// How long a dial may take before the next address (or a relay) is tried.
pub const DIRECT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(4);
/// How long a punch may take before the relay is tried.
pub const PUNCH_WAIT: Duration = Duration::from_secs(5);
/// How often a node looks up its network's rendezvous in the DHT (see [`NodeSettings::kad`]).
pub const RENDEZVOUS_INTERVAL: Duration = Duration::from_secs(120);
/// Relayed paths tracked (each is a virtual address and a few bytes).
pub const MAX_RELAY_PATHS: usize = 1024;
/// VPN packets accepted from peers and not yet taken by [`Node::poll_vpn_packet`]; more are
/// dropped (the driver drains them after every input, so this only bounds a stalled TUN).
pub const MAX_VPN_QUEUE: usize = 4096;

/// Why [`Node::write`] did not make a write.
#[derive(Debug)]
pub enum WriteError {
    /// This node has no cluster layer (no ledger).
    NoCluster,
    /// The ledger refused it (not the owner, full, too large, bad name).
    Refused(crate::ledger::LedgerError),
}

impl std::fmt::Display for WriteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WriteError::NoCluster => f.write_str("this node keeps no ledger"),
            WriteError::Refused(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for WriteError {}

/// Tunables of a node. [`Default`] gives the documented values.
#[derive(Debug, Clone)]
pub struct NodeSettings {
    /// LAN beacons (edgevpn's mDNS switch, `EDGEVPNMDNS`).
    pub lan: bool,
    /// The DHT (off with `p2p.disable_dht` or `EDGEVPNDHT=false`).
    pub dht: bool,
    /// Bootstrap peers for the DHT, with their peer id when known.
    pub bootstrap: Vec<(SocketAddr, Option<PeerId>)>,
    /// Connections to keep to other members (default 8).
    pub neighbours: usize,
    /// Members with no news for this long are forgotten (default 10 min).
    pub member_ttl: Duration,
    /// Most members tracked (default 8192).
    pub max_members: usize,
    /// QUIC transport settings.
    pub transport: TransportSettings,
    /// DHT settings.
    pub kad: KadSettings,
}

impl NodeSettings {
    /// The defaults for a network token.
    pub fn for_token(token: &NetworkToken) -> Self {
        Self {
            lan: true,
            dht: true,
            bootstrap: Vec::new(),
            neighbours: 8,
            member_ttl: Duration::from_secs(600),
            max_members: 8192,
            transport: TransportSettings {
                // A member that answers at all answers within a second; a shorter handshake
                // timeout moves on to the next address or a relay sooner.
                handshake_timeout: DIRECT_HANDSHAKE_TIMEOUT,
                ..TransportSettings::for_token(token)
            },
            kad: KadSettings {
                // Members announce themselves over their connections (gossip), so polling the
                // rendezvous only helps islands that never met: every 2 min halves the steady
                // DHT traffic of the default 60 s (≈ 280 B/s per node on a small LAN).
                rendezvous_interval: RENDEZVOUS_INTERVAL,
                ..KadSettings::default()
            },
        }
    }
}

impl NodeSettings {
    /// Makes the connections report a peer lost after the
    /// [`watch_timeout`](crate::cluster::liveness::watch_timeout) of `liveness_timeout`: its
    /// members judge a node's liveness by them (see [`crate::cluster::liveness`]).
    pub fn watch_liveness(&mut self, liveness_timeout: Duration) {
        self.transport.idle_timeout = crate::cluster::liveness::watch_timeout(liveness_timeout);
    }
}

/// Where a packet from [`Node::poll_transmit`] goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    /// One address, from the overlay socket.
    Addr(SocketAddr),
    /// Every LAN broadcast/multicast target, to the beacon port.
    LanBroadcast,
}

/// A packet to send, written to the caller's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeTransmit {
    /// Where it goes.
    pub destination: Destination,
    /// Bytes in the buffer.
    pub len: usize,
    /// GSO segment size when the buffer holds several packets.
    pub segment_size: Option<usize>,
}

/// What the node reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeEvent {
    /// A member of our network we did not know.
    MemberDiscovered {
        /// Its peer id.
        peer: PeerId,
        /// Where it says it is.
        addrs: Vec<SocketAddr>,
        /// How we learned of it.
        source: Source,
    },
    /// A member we have had no news of for the member ttl.
    MemberLost {
        /// Its peer id.
        peer: PeerId,
    },
    /// An authenticated connection to a member is up.
    PeerConnected {
        /// Its peer id.
        peer: PeerId,
        /// Its address.
        addr: SocketAddr,
        /// True if it dialled us.
        inbound: bool,
    },
    /// A connection went away.
    PeerDisconnected {
        /// Its peer id.
        peer: PeerId,
        /// Why, in words.
        reason: String,
    },
    /// Other nodes see us at this address (our public address behind NAT).
    ObservedAddr(SocketAddr),
    /// Roles, leader, master and address news from the cluster layer.
    Cluster(ClusterEvent),
}

/// Inputs the node dropped, by reason (the transport counts its own).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodeStats {
    /// Packets of no known kind.
    pub unknown_packets: u64,
    /// Beacons that did not open or were stale, replayed or out of order.
    pub beacons_rejected: u64,
    /// DHT packets that did not decode or were refused.
    pub dht_rejected: u64,
    /// Control messages that did not decode.
    pub control_rejected: u64,
    /// Datagrams received while nothing consumes them (no VPN).
    pub datagrams_unused: u64,
    /// VPN packets dropped because the queue to the TUN interface was full.
    pub vpn_queue_full: u64,
    /// VPN packets routed to a peer whose connection refused them (send buffer, closing).
    pub vpn_send_failed: u64,
    /// VPN packets held for a member being connected (see [`held`]) and dropped: too many, or
    /// the connection did not come in time.
    pub vpn_held_dropped: u64,
    /// QUIC packets this node forwarded for two other members.
    pub relayed: u64,
    /// Relay frames dropped (malformed, receiver not connected, queue full).
    pub relay_dropped: u64,
    /// Punch requests this node sent.
    pub punch_requests: u64,
    /// Punches coordinated for two other members.
    pub punches_coordinated: u64,
    /// DHT lookups finished (rendezvous lookups included).
    pub dht_lookups: u64,
    /// Sum over those lookups of their longest referral chain (divide by `dht_lookups` for the
    /// mean).
    pub dht_lookup_hops: u64,
    /// Longest referral chain of any lookup.
    pub dht_lookup_max_hops: u32,
    /// Requests those lookups sent.
    pub dht_lookup_messages: u64,
    /// Dial attempts.
    pub dials: u64,
    /// Dial attempts that failed.
    pub dials_failed: u64,
    /// Bytes of member lists sent (encoded control messages).
    pub members_bytes_out: u64,
    /// PINGs sent to keep a quiet connection open.
    pub keep_alives_out: u64,
    /// Bytes of ledger sync messages sent (encoded control messages).
    pub ledger_bytes_out: u64,
}

#[derive(Debug)]
struct Dial {
    pending: Option<ConnId>,
    failures: u32,
    next_attempt: Instant,
    /// The pending connection was started by a punch notice (its failure is not counted again).
    punched: bool,
}

/// The overlay node.
pub struct Node {
    me: PeerId,
    keys: KeySchedule,
    settings: NodeSettings,
    rng: Rng,
    transport: Transport,
    lan: Option<LanDiscovery>,
    kad: Option<Kad>,
    members: MemberTable,
    dials: BTreeMap<PeerId, Dial>,
    connected: BTreeMap<PeerId, SocketAddr>,
    relays: RelayPaths,
    pending_gossip: BTreeSet<PeerId>,
    push_at: Option<Instant>,
    sync_at: Option<Instant>,
    full_sync_at: Option<Instant>,
    /// Connected members sent a message since the last keep-alive round.
    sent_since_keep_alive: BTreeSet<PeerId>,
    maintain_at: Option<Instant>,
    refresh_at: Option<Instant>,
    /// A dial round is due (a member was discovered).
    dial_at: Option<Instant>,
    ticket_window: Option<Window>,
    local_addrs: Vec<SocketAddr>,
    observed: Option<SocketAddr>,
    out: VecDeque<(Destination, Vec<u8>)>,
    events: VecDeque<NodeEvent>,
    stats: NodeStats,
    scratch: Vec<u8>,
    cluster: Option<Cluster>,
    vpn: Option<Vpn>,
    /// The cluster's `machines` generation the VPN routes were read at.
    vpn_routes_at: Option<u64>,
    /// Accepted VPN packets for the TUN interface.
    vpn_in: VecDeque<Bytes>,
    /// VPN packets waiting for the connection to their member.
    vpn_held: HeldPackets,
    /// Where k3s stands (set by the driver's k3s layer; `None`: no k3s on this node).
    k3s_state: Option<crate::k3s::K3sState>,
    /// The wall clock of the last input, in unix milliseconds.
    unix_ms: u64,
    /// The first `handle_timeout` (the node's start).
    started_at: Option<Instant>,
    /// The last time a member was discovered (the discovery gate's settle).
    discovery_changed_at: Option<Instant>,
    /// The discovery gate as last told to the cluster layer.
    discovery_settled: bool,
    /// When the discovery gate is checked next: its settle's end, or right away after a
    /// connection (rather than at the next housekeeping pass).
    gate_check_at: Option<Instant>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("me", &self.me)
            .field("members", &self.members.len())
            .field("connected", &self.connected.len())
            .finish_non_exhaustive()
    }
}

impl Node {
    /// A node for `identity` in the network of `token`; `seed` fixes every random choice.
    pub fn new(
        identity: &Identity,
        token: &NetworkToken,
        settings: NodeSettings,
        seed: u64,
    ) -> Result<Self, TransportError> {
        let me = identity.peer_id();
        let keys = token.key_schedule();
        let mut rng = Rng::from_seed(seed);
        let mut transport_seed = [0u8; 32];
        rng.fill(&mut transport_seed);
        let transport =
            Transport::new(identity, &keys, settings.transport.clone(), transport_seed)?;
        let lan = settings
            .lan
            .then(|| LanDiscovery::new(me, keys.clone(), rng.fork()));
        let kad = settings.dht.then(|| {
            let mut kad = Kad::new(me, rng.fork(), settings.kad.clone());
            for (addr, peer) in &settings.bootstrap {
                kad.add_bootstrap(*addr, *peer);
            }
            kad.set_rendezvous(keys.clone(), Vec::new());
            kad
        });
        let members = MemberTable::new(me, settings.max_members, settings.member_ttl);
        Ok(Self {
            me,
            keys,
            settings,
            rng,
            transport,
            lan,
            kad,
            members,
            dials: BTreeMap::new(),
            connected: BTreeMap::new(),
            relays: RelayPaths::new(MAX_RELAY_PATHS),
            pending_gossip: BTreeSet::new(),
            push_at: None,
            sync_at: None,
            full_sync_at: None,
            sent_since_keep_alive: BTreeSet::new(),
            maintain_at: None,
            refresh_at: None,
            dial_at: None,
            ticket_window: None,
            local_addrs: Vec::new(),
            observed: None,
            out: VecDeque::new(),
            events: VecDeque::new(),
            stats: NodeStats::default(),
            scratch: Vec::new(),
            cluster: None,
            vpn: None,
            vpn_routes_at: None,
            vpn_in: VecDeque::new(),
            vpn_held: HeldPackets::default(),
            k3s_state: None,
            unix_ms: 0,
            started_at: None,
            discovery_changed_at: None,
            discovery_settled: false,
            gate_check_at: None,
        })
    }

    /// Adds the cluster layer (ledger, roles, addresses); without it the node is overlay only.
    pub fn attach_cluster(&mut self, mut cluster: Cluster) {
        self.discovery_settled = false;
        cluster.close_discovery_gate();
        self.cluster = Some(cluster);
    }

    /// The cluster layer, if attached.
    pub fn cluster(&self) -> Option<&Cluster> {
        self.cluster.as_ref()
    }

    /// The one entry point for ledger writes made on this node's behalf (API requests, k3s
    /// publishing): the writes pass the ownership rule every node applies to entries from peers
    /// (see [`crate::ledger::authority`]), and their gossip is queued on the connections at once,
    /// to leave with the driver's next flush, after the ledger is saved.
    pub fn write(
        &mut self,
        now: Instant,
        unix_ms: u64,
        writes: Vec<Write>,
    ) -> Result<(), WriteError> {
        self.unix_ms = unix_ms;
        let cluster = self.cluster.as_mut().ok_or(WriteError::NoCluster)?;
        let result = cluster.write(now, unix_ms, writes);
        self.pump(now);
        result.map_err(WriteError::Refused)
    }

    /// The cluster layer, mutably (saves).
    pub fn cluster_mut(&mut self) -> Option<&mut Cluster> {
        self.cluster.as_mut()
    }

    /// Adds the VPN packet path; its routes come from the cluster layer's `machines` bucket, its
    /// address from the cluster's allocator (or the static one in `settings`).
    pub fn attach_vpn(&mut self, settings: VpnSettings) {
        self.vpn = Some(Vpn::new(settings));
        self.vpn_routes_at = None;
        self.sync_vpn();
    }

    /// The VPN packet path, if attached.
    pub fn vpn(&self) -> Option<&Vpn> {
        self.vpn.as_ref()
    }

    /// Where this node's k3s stands (`None`: this node runs no k3s).
    pub fn k3s_state(&self) -> Option<&crate::k3s::K3sState> {
        self.k3s_state.as_ref()
    }

    /// Records where this node's k3s stands (the driver's k3s layer), for the API.
    pub fn set_k3s_state(&mut self, state: Option<crate::k3s::K3sState>) {
        self.k3s_state = state;
    }

    // ---- getters ----

    /// This node's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.me
    }

    /// The members known, by peer id.
    pub fn members(&self) -> &MemberTable {
        &self.members
    }

    /// Members with an established connection, and their addresses.
    pub fn connected(&self) -> &BTreeMap<PeerId, SocketAddr> {
        &self.connected
    }

    /// Our public address as other nodes report it, once known.
    pub fn observed_addr(&self) -> Option<SocketAddr> {
        self.observed
    }

    /// Drop counters of the node.
    pub fn stats(&self) -> NodeStats {
        self.stats
    }

    /// The transport (for its statistics and peer list).
    pub fn transport(&self) -> &Transport {
        &self.transport
    }

    /// For a relayed connection's address, the member forwarding its packets.
    pub fn relay_via(&self, addr: &SocketAddr) -> Option<PeerId> {
        self.relays.get(addr).map(|path| path.relay)
    }

    /// Members heard through LAN beacons (`None`: LAN discovery is off).
    pub fn lan_peer_count(&self) -> Option<usize> {
        self.lan.as_ref().map(LanDiscovery::peer_count)
    }

    /// The DHT, when enabled.
    pub fn kad(&self) -> Option<&Kad> {
        self.kad.as_ref()
    }

    // ---- inputs ----

    /// Sets the addresses this node is reachable at (interface addresses with the overlay port),
    /// announced in beacons, DHT records and gossip.
    pub fn set_local_addrs(&mut self, now: Instant, addrs: Vec<SocketAddr>) {
        if addrs == self.local_addrs {
            return;
        }
        self.local_addrs = addrs;
        if let Some(lan) = &mut self.lan {
            lan.set_local_addrs(self.local_addrs.iter().copied());
        }
        let announced = self.announced_addrs();
        if let Some(kad) = &mut self.kad {
            kad.set_rendezvous_addrs(announced);
        }
        self.schedule_push(now, self.me);
    }

    /// Adds a DHT bootstrap peer found after start (e.g. a resolved host name).
    pub fn add_bootstrap(&mut self, addr: SocketAddr, peer: Option<PeerId>) {
        if let Some(kad) = &mut self.kad {
            kad.add_bootstrap(addr, peer);
        }
    }

    /// Dials `addr` outside discovery (a static peer, an operator's request, a test). The
    /// connection is kept if the other side proves membership and reported as
    /// [`NodeEvent::PeerConnected`]; a failure only counts in [`NodeStats::dials_failed`].
    pub fn dial_addr(&mut self, now: Instant, addr: SocketAddr) -> Result<ConnId, ConnectError> {
        self.stats.dials += 1;
        let result = self.transport.connect(now, addr, None);
        if result.is_err() {
            self.stats.dials_failed += 1;
        }
        result
    }

    /// Handles one UDP payload received from `from` on either socket.
    pub fn handle_datagram(
        &mut self,
        now: Instant,
        unix_ms: u64,
        from: SocketAddr,
        local_ip: Option<IpAddr>,
        bytes: &[u8],
    ) {
        self.unix_ms = unix_ms;
        let unix_secs = unix_ms / 1000;
        let Some(&first) = bytes.first() else {
            self.stats.unknown_packets += 1;
            return;
        };
        if is_quic_packet(first) {
            self.transport.handle_datagram(now, from, local_ip, bytes);
        } else if looks_like_beacon(bytes) {
            match &mut self.lan {
                Some(lan) => match lan.handle_beacon(now, unix_secs, from, bytes) {
                    Ok(()) => self.on_lan_beacon(now),
                    Err(e) => {
                        self.stats.beacons_rejected += 1;
                        log::trace!("beacon from {from} dropped: {e}");
                    }
                },
                None => self.stats.unknown_packets += 1,
            }
        } else if first == kad::message::PACKET_TYPE {
            match &mut self.kad {
                Some(kad) => {
                    if let Err(e) = kad.handle_packet(now, unix_secs, from, bytes) {
                        self.stats.dht_rejected += 1;
                        log::trace!("DHT packet from {from} dropped: {e}");
                    }
                }
                None => self.stats.unknown_packets += 1,
            }
        } else {
            self.stats.unknown_packets += 1;
        }
        self.pump(now);
    }

    /// [`handle_datagram`](Self::handle_datagram) for a payload the driver received into a
    /// buffer of its own: a QUIC packet goes to the transport without a copy.
    pub fn handle_packet(
        &mut self,
        now: Instant,
        unix_ms: u64,
        from: SocketAddr,
        local_ip: Option<IpAddr>,
        packet: BytesMut,
    ) {
        if !packet.first().is_some_and(|&b| is_quic_packet(b)) {
            return self.handle_datagram(now, unix_ms, from, local_ip, &packet);
        }
        self.unix_ms = unix_ms;
        self.transport.handle_packet(now, from, local_ip, packet);
        self.pump(now);
    }

    /// Runs timers that are due.
    pub fn handle_timeout(&mut self, now: Instant, unix_ms: u64) {
        self.unix_ms = unix_ms;
        let unix_secs = unix_ms / 1000;
        let window = self.keys.crypto_window(unix_secs);
        if self.ticket_window != Some(window) {
            self.ticket_window = Some(window);
            self.transport.set_ticket_window(window);
        }
        self.transport.handle_timeout(now);
        // Each only when due (or before its first run): the DHT's timer work scans its tables.
        if let Some(lan) = &mut self.lan {
            if lan.poll_timeout().is_none_or(|t| t <= now) {
                lan.handle_timeout(now, unix_secs);
            }
        }
        if let Some(kad) = &mut self.kad {
            if kad.poll_timeout().is_none_or(|t| t <= now) {
                kad.handle_timeout(now, unix_secs);
            }
        }
        self.pump(now);
        self.started_at.get_or_insert(now);
        let gate_due = self.gate_check_at.is_some_and(|t| t <= now);
        if self.maintain_at.is_none_or(|t| t <= now) {
            self.dial_at = None;
            self.maintain(now);
            self.maintain_at = Some(now + MAINTAIN_INTERVAL);
            self.update_discovery_gate(now);
        } else if gate_due {
            self.update_discovery_gate(now);
        }
        if self.dial_at.is_some_and(|t| t <= now) {
            self.dial_at = None;
            self.dial_neighbours(now);
        }
        if self.push_at.is_some_and(|t| t <= now) {
            self.push_gossip(now);
        }
        if let Some(cluster) = &mut self.cluster {
            if cluster.poll_timeout().is_none_or(|t| t <= now) {
                cluster.handle_timeout(now, unix_ms);
                self.pump(now);
            }
        }
        if self.sync_at.is_none_or(|t| t <= now) {
            let keep_alive = KEEP_ALIVE_INTERVAL.min(self.settings.transport.idle_timeout / 3);
            let mut next = now + keep_alive;
            if let Some(full_every) = self.full_sync_interval() {
                if self.full_sync_at.is_none_or(|t| t <= now) {
                    self.sync_round(now);
                    self.full_sync_at = Some(now + full_every);
                }
                next = next.min(now + full_every);
            }
            self.keep_alive_round();
            self.sync_at = Some(next);
        }
    }

    /// Sends `packet`, read from the TUN interface, to the member owning its destination as one
    /// QUIC datagram. When the owner is a member we are not connected to, a connection is started
    /// and the packet waits for it (see [`held`]), as a router holds packets while it resolves a
    /// neighbour.
    pub fn send_vpn_packet(&mut self, now: Instant, packet: Bytes) -> Result<PeerId, vpn::Drop> {
        let Some(vpn) = &mut self.vpn else {
            return Err(vpn::Drop::Unreachable);
        };
        let (transport, members, dials, me) =
            (&mut self.transport, &self.members, &self.dials, self.me);
        // A member we may dial now (or are dialling) takes the packet, held until connected;
        // its size is checked against the connection then.
        let dialable = |peer: &PeerId| {
            *peer != me
                && members.get(peer).is_some()
                && dials
                    .get(peer)
                    .is_none_or(|d| d.pending.is_some() || d.next_attempt <= now)
        };
        let routed = vpn.route_outgoing(&packet, |peer| {
            transport
                .max_datagram_size(peer)
                .or_else(|| dialable(peer).then_some(usize::MAX))
        });
        let peer = routed?;
        if self.connected.contains_key(&peer) {
            if self.transport.send_datagram(&peer, packet).is_err() {
                self.stats.vpn_send_failed += 1;
            }
        } else {
            self.connect_on_demand(now, peer);
            self.stats.vpn_held_dropped += self.vpn_held.hold(now, peer, packet);
        }
        Ok(peer)
    }

    /// Sends the VPN packets held for `peer`, now connected.
    fn release_held(&mut self, now: Instant, peer: &PeerId) {
        let (packets, expired) = self.vpn_held.release(now, peer);
        self.stats.vpn_held_dropped += expired;
        for packet in packets {
            if self.transport.send_datagram(peer, packet).is_err() {
                self.stats.vpn_send_failed += 1;
            }
        }
    }

    /// Whether VPN packets wait in a connection's datagram queue beyond half its size: the
    /// driver then stops reading the TUN interface until they are sent (the kernel holds the
    /// rest, and TCP inside slows down) rather than have the oldest dropped.
    pub fn vpn_backlogged(&mut self) -> bool {
        self.transport.datagrams_backlogged()
    }

    /// Sends a control message to a connected member.
    pub fn send_control(&mut self, peer: &PeerId, msg: &Control) {
        // A ledger message is encoded into a buffer of its exact size, handed to the transport
        // as it is; the others (small) go through the reused scratch buffer and are copied.
        let (mut buf, exact) = match msg {
            Control::Ledger(payload) => (
                Vec::with_capacity(Control::LEDGER_HEADER_LEN + payload.len()),
                true,
            ),
            _ => (std::mem::take(&mut self.scratch), false),
        };
        if let Err(e) = msg.encode(&mut buf) {
            log::warn!("control message to {peer} not encodable: {e}");
            return;
        }
        match msg {
            Control::Members(_) => self.stats.members_bytes_out += buf.len() as u64,
            Control::Ledger(_) => self.stats.ledger_bytes_out += buf.len() as u64,
            _ => {}
        }
        let wire = if exact {
            Bytes::from(buf)
        } else {
            let wire = Bytes::copy_from_slice(&buf);
            // A node keeps a small buffer, not the largest member list it ever sent.
            if buf.capacity() <= MAX_KEPT_SCRATCH {
                self.scratch = buf;
            }
            wire
        };
        match self.transport.send_message(peer, wire) {
            Ok(()) => {
                self.sent_since_keep_alive.insert(*peer);
            }
            Err(e) => log::debug!("control message to {peer} not sent: {e}"),
        }
    }

    /// Closes every connection (clean shutdown); keep polling transmits to send the closes.
    pub fn shutdown(&mut self, now: Instant) {
        self.transport.close_all(now);
    }

    // ---- outputs ----

    /// The next packet to send, written to `buf` (cleared first).
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> Option<NodeTransmit> {
        if let Some((destination, bytes)) = self.out.pop_front() {
            buf.clear();
            buf.extend_from_slice(&bytes);
            return Some(NodeTransmit {
                destination,
                len: bytes.len(),
                segment_size: None,
            });
        }
        loop {
            let t = self.transport.poll_transmit(now, buf)?;
            if !is_relay_addr(&t.destination) {
                return Some(NodeTransmit {
                    destination: Destination::Addr(t.destination),
                    len: t.len,
                    segment_size: t.segment_size,
                });
            }
            // A packet of a relayed connection: into a datagram to the relay, then go on.
            let Some(path) = self.relays.get(&t.destination) else {
                continue;
            };
            let size = t.segment_size.unwrap_or(t.len).max(1);
            for packet in buf.get(..t.len).unwrap_or_default().chunks(size) {
                let mut frame = Vec::with_capacity(packet.len() + RELAY_HEADER_LEN);
                RelayFrame::Forward {
                    to: path.peer,
                    packet,
                }
                .encode(&mut frame);
                if self
                    .transport
                    .send_datagram(&path.relay, Bytes::from(frame))
                    .is_err()
                {
                    self.stats.relay_dropped += 1;
                }
            }
        }
    }

    /// When [`handle_timeout`](Self::handle_timeout) must run next (`None` only before the first
    /// call to it, which a driver makes right after creating the node).
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        let mut next = [
            self.transport.poll_timeout(),
            self.lan.as_ref().and_then(LanDiscovery::poll_timeout),
            self.kad.as_ref().and_then(Kad::poll_timeout),
            self.push_at,
            self.sync_at,
            self.maintain_at,
            self.dial_at,
            self.gate_check_at,
            self.cluster.as_ref().and_then(Cluster::poll_timeout),
        ];
        next.sort();
        next.into_iter().flatten().next()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<NodeEvent> {
        self.events.pop_front()
    }

    /// The next VPN packet to write to the TUN interface (checked: it comes from the member
    /// owning its source address and is addressed to us).
    pub fn poll_vpn_packet(&mut self) -> Option<Bytes> {
        self.vpn_in.pop_front()
    }

    /// The discovery gate: true once what this node can learn about its network has been tried,
    /// so an election it takes part in is not one of a group that has not met the rest yet.
    /// All of:
    /// - no member discovered for [`DISCOVERY_SETTLE`] (a connection to a known member is not
    ///   news: the members it names and the ledger it syncs are, and hold the gate as they come);
    /// - every member known is connected, or was learned [`DISCOVERY_WAIT`] ago or more
    ///   ([`UNREACHED_SITE_WAIT`] for one not heard on our LAN), or the node has all the neighbours
    ///   it keeps;
    /// - with the DHT (unless there is nobody to ask: no bootstrap peer, no DHT neighbour):
    ///   every bootstrap peer answered, or [`DISCOVERY_WAIT`] passed since the start; and our
    ///   rendezvous record was stored on another node since the last one was reached and a
    ///   rendezvous round started after that has finished ([`Kad::rendezvous_converged`]), or
    ///   [`DISCOVERY_WAIT`] passed since the start or that reach, whichever is later.
    ///
    /// With the DHT off (one LAN), this is the LAN gate: beacons find the members in well under
    /// a second and the first condition does the rest.
    pub fn discovery_settled(&self, now: Instant) -> bool {
        let Some(started) = self.started_at else {
            return false;
        };
        if self
            .discovery_changed_at
            .is_some_and(|t| now < t + DISCOVERY_SETTLE)
        {
            return false;
        }
        if self.connected.len() < self.settings.neighbours {
            let unreached = self.members.iter().any(|(peer, m)| {
                if self.connected.contains_key(peer) {
                    return false;
                }
                let on_lan = self
                    .lan
                    .as_ref()
                    .is_some_and(|lan| lan.last_seen(peer).is_some());
                let wait = if on_lan {
                    DISCOVERY_WAIT
                } else {
                    UNREACHED_SITE_WAIT
                };
                now < m.first_seen + wait
            });
            if unreached {
                return false;
            }
        }
        if let Some(kad) = &self.kad {
            let (reached, total) = kad.bootstrap_reached();
            let nobody_to_ask = total == 0 && kad.routing_table().is_empty();
            if !nobody_to_ask {
                if reached < total && now < started + DISCOVERY_WAIT {
                    return false;
                }
                // The rendezvous gets its own bound from the last bootstrap peer reached: a
                // bootstrap node that comes up late is then used, not raced.
                let since = kad
                    .bootstrap_reached_at()
                    .map_or(started, |t| t.max(started));
                if !kad.rendezvous_converged() && now < since + DISCOVERY_WAIT {
                    return false;
                }
            }
        }
        true
    }

    /// Tells the cluster layer whether discovery has converged (it elects only then). Once the
    /// cluster has its master the gate stays open: joining an existing cluster needs no gate.
    fn update_discovery_gate(&mut self, now: Instant) {
        self.gate_check_at = None;
        let Some(has_master) = self.cluster.as_ref().map(|c| c.master().is_some()) else {
            return;
        };
        let settled = has_master || self.discovery_settled(now);
        if !settled {
            // The settle's end is checked then; longer waits on the maintain tick.
            self.gate_check_at = self
                .discovery_changed_at
                .map(|t| t + DISCOVERY_SETTLE)
                .filter(|&t| t > now);
        }
        if settled != self.discovery_settled {
            self.discovery_settled = settled;
            if settled {
                log::debug!("discovery settled: taking part in elections");
            }
            if let Some(cluster) = &mut self.cluster {
                cluster.set_discovery_settled(now, settled);
            }
        }
    }

    /// Checks the discovery gate at the next timer turn (before the first master only).
    fn check_gate_now(&mut self, now: Instant) {
        if self.cluster.as_ref().is_some_and(|c| c.master().is_none()) {
            self.gate_check_at = Some(self.gate_check_at.map_or(now, |t| t.min(now)));
        }
    }

    /// A member was discovered: the discovery gate settles again.
    fn discovery_changed(&mut self, now: Instant) {
        self.discovery_changed_at = Some(now);
        if self.cluster.as_ref().is_some_and(|c| c.master().is_none()) {
            self.gate_check_at = Some(now + DISCOVERY_SETTLE);
        }
        if self.discovery_settled && self.cluster.as_ref().is_some_and(|c| c.master().is_none()) {
            self.discovery_settled = false;
            if let Some(cluster) = &mut self.cluster {
                cluster.set_discovery_settled(now, false);
            }
        }
    }

    // ---- internals ----

    fn announced_addrs(&self) -> Vec<SocketAddr> {
        let mut addrs = self.local_addrs.clone();
        if let Some(observed) = self.observed {
            if !addrs.contains(&observed) {
                addrs.insert(0, observed);
            }
        }
        addrs.truncate(control::MAX_MEMBER_ADDRS);
        addrs
    }

    /// Moves the sub-machines' outputs and events into the node.
    fn pump(&mut self, now: Instant) {
        if let Some(lan) = &mut self.lan {
            while let Some(beacon) = lan.poll_transmit() {
                self.out.push_back((Destination::LanBroadcast, beacon));
            }
        }
        if let Some(kad) = &mut self.kad {
            while let Some((addr, bytes)) = kad.poll_transmit() {
                self.out.push_back((Destination::Addr(addr), bytes));
            }
        }
        while let Some(event) = self.lan.as_mut().and_then(LanDiscovery::poll_event) {
            match event {
                LanEvent::PeerSeen { peer, addrs } => {
                    if let (Some(kad), Some(addr)) = (&mut self.kad, addrs.first()) {
                        kad.add_peer(peer, *addr);
                    }
                    self.learn(now, peer, &addrs, Duration::ZERO, Source::Lan);
                }
                // The member table ages it out unless other news keeps it.
                LanEvent::PeerExpired { peer } => log::debug!("no beacon from {peer} for a while"),
            }
        }
        while let Some(event) = self.kad.as_mut().and_then(Kad::poll_event) {
            match event {
                KadEvent::MemberFound { peer, addrs } => {
                    self.learn(now, peer, &addrs, Duration::ZERO, Source::Dht)
                }
                KadEvent::ObservedAddr(addr) => self.set_observed(addr),
                KadEvent::LookupDone { hops, messages, .. } => {
                    self.stats.dht_lookups += 1;
                    self.stats.dht_lookup_hops += u64::from(hops);
                    self.stats.dht_lookup_max_hops = self.stats.dht_lookup_max_hops.max(hops);
                    self.stats.dht_lookup_messages += u64::from(messages);
                }
                other => log::trace!("dht: {other:?}"),
            }
        }
        while let Some(event) = self.transport.poll_event() {
            self.on_transport_event(now, event);
        }
        self.pump_cluster();
        // Transport events may have produced DHT or beacon output.
        if let Some(kad) = &mut self.kad {
            while let Some((addr, bytes)) = kad.poll_transmit() {
                self.out.push_back((Destination::Addr(addr), bytes));
            }
        }
    }

    /// Sends the cluster layer's messages and moves its events out.
    fn pump_cluster(&mut self) {
        let Some(cluster) = &mut self.cluster else {
            return;
        };
        let mut messages = Vec::new();
        while let Some(m) = cluster.poll_message() {
            messages.push(m);
        }
        while let Some(e) = cluster.poll_event() {
            self.events.push_back(NodeEvent::Cluster(e));
        }
        for (peer, bytes) in messages {
            self.send_control(&peer, &Control::Ledger(bytes));
        }
        self.sync_vpn();
    }

    /// Brings the VPN's address and routes in line with the cluster layer.
    fn sync_vpn(&mut self) {
        let (Some(vpn), Some(cluster)) = (&mut self.vpn, &self.cluster) else {
            return;
        };
        if let Some(addr) = cluster.address() {
            if addr != vpn.local().addr {
                let local = crate::config::Ipv4Cidr {
                    addr,
                    ..vpn.local()
                };
                vpn.set_local(local, cluster.ledger());
            }
        }
        let generation = cluster.routes_generation();
        if self.vpn_routes_at != Some(generation) {
            self.vpn_routes_at = Some(generation);
            vpn.update_routes(cluster.ledger());
        }
    }

    /// A VPN packet wants `peer`, a member we have no connection to: dial it now unless a dial
    /// is under way or backing off.
    fn connect_on_demand(&mut self, now: Instant, peer: PeerId) {
        if peer == self.me || self.connected.contains_key(&peer) {
            return;
        }
        let idle = self
            .dials
            .get(&peer)
            .is_none_or(|d| d.pending.is_none() && d.next_attempt <= now);
        if idle && self.members.get(&peer).is_some() {
            self.dial(now, peer);
        }
    }

    /// A datagram that is not a relay frame: a VPN packet.
    fn on_vpn_datagram(&mut self, peer: PeerId, bytes: Bytes) {
        let Some(vpn) = &mut self.vpn else {
            self.stats.datagrams_unused += 1;
            return;
        };
        if vpn.accept_incoming(peer, &bytes).is_ok() {
            if self.vpn_in.len() >= MAX_VPN_QUEUE {
                self.stats.vpn_queue_full += 1;
            } else {
                self.vpn_in.push_back(bytes);
            }
        }
    }

    fn on_transport_event(&mut self, now: Instant, event: TransportEvent) {
        match event {
            TransportEvent::Connected {
                peer,
                addr,
                inbound,
                ..
            } => {
                self.connected.insert(peer, addr);
                self.dials.remove(&peer);
                // A connection is no news in itself: what it brings is (members in its
                // `Hello`, ledger entries in its sync), and those hold the gate when they come.
                // It may complete the gate's "every member connected", so check it again.
                self.check_gate_now(now);
                self.release_held(now, &peer);
                // An address we dialled is known to work; one a peer came from may be a NAT's.
                let addrs = if inbound || is_relay_addr(&addr) {
                    Vec::new()
                } else {
                    vec![addr]
                };
                self.learn(now, peer, &addrs, Duration::ZERO, Source::Connection);
                let mut members = self.members.gossip(now, None);
                members.push(self.self_info());
                // Over a relay we do not see the peer's address.
                let observed = if is_relay_addr(&addr) {
                    SocketAddr::from(([0, 0, 0, 0], 0))
                } else {
                    addr
                };
                let hello = Control::Hello {
                    listen: self.announced_addrs(),
                    observed,
                    members,
                };
                self.send_control(&peer, &hello);
                if let Some(cluster) = &mut self.cluster {
                    cluster.peer_connected(now, self.unix_ms, peer);
                }
                self.events.push_back(NodeEvent::PeerConnected {
                    peer,
                    addr,
                    inbound,
                });
            }
            TransportEvent::Disconnected { peer, reason } => {
                self.connected.remove(&peer);
                self.relays.remove_relay(&peer);
                if let Some(cluster) = &mut self.cluster {
                    let lost = reason != DisconnectReason::ClosedLocally;
                    cluster.peer_disconnected(now, self.unix_ms, &peer, lost);
                }
                self.events.push_back(NodeEvent::PeerDisconnected {
                    peer,
                    reason: reason.to_string(),
                });
            }
            TransportEvent::Message { peer, bytes } => match Control::decode(&bytes) {
                Ok(msg) => self.on_control(now, peer, msg),
                Err(e) => {
                    self.stats.control_rejected += 1;
                    log::debug!("control message from {peer} dropped: {e}");
                }
            },
            TransportEvent::Datagram { peer, bytes } if RelayFrame::is_relay_frame(&bytes) => {
                self.on_relay_frame(now, peer, &bytes);
            }
            TransportEvent::Datagram { peer, bytes } => self.on_vpn_datagram(peer, bytes),
            TransportEvent::HandshakeFailed { conn, addr, reason } => {
                self.stats.dials_failed += 1;
                log::debug!("handshake with {addr} failed: {reason}");
                let found = self.dials.iter_mut().find(|(_, d)| d.pending == Some(conn));
                if let Some((peer, dial)) = found {
                    let paths = self.members.get(peer).map_or(1, |m| m.addrs.len() + 2);
                    dial.pending = None;
                    if !std::mem::take(&mut dial.punched) {
                        dial.failures += 1;
                        dial.next_attempt = now + dial_backoff(dial.failures, paths);
                    }
                }
            }
        }
    }

    fn on_control(&mut self, now: Instant, from: PeerId, msg: Control) {
        match msg {
            Control::Hello {
                listen,
                observed,
                members,
            } => {
                if !listen.is_empty() {
                    self.learn(now, from, &listen, Duration::ZERO, Source::Connection);
                }
                if observed.port() != 0 && !observed.ip().is_unspecified() {
                    self.set_observed(observed);
                }
                self.learn_gossip(now, members);
            }
            Control::Members(members) => self.learn_gossip(now, members),
            Control::PunchRequest { target } => self.coordinate_punch(from, target),
            Control::PunchNotify { peer, addr } => self.punch(now, peer, addr),
            Control::Ledger(bytes) => match &mut self.cluster {
                Some(cluster) => cluster.handle_message(now, self.unix_ms, from, &bytes),
                None => self.stats.control_rejected += 1,
            },
        }
    }

    /// Forwards a relay frame (we are the relay) or hands a relayed QUIC packet to the transport
    /// (we are its receiver).
    fn on_relay_frame(&mut self, now: Instant, from: PeerId, datagram: &[u8]) {
        match RelayFrame::decode(datagram) {
            Ok(RelayFrame::Forward { to, packet })
                if to != self.me && self.connected.contains_key(&to) =>
            {
                let mut frame = Vec::with_capacity(datagram.len());
                RelayFrame::Forwarded { from, packet }.encode(&mut frame);
                match self.transport.send_datagram(&to, Bytes::from(frame)) {
                    Ok(()) => self.stats.relayed += 1,
                    Err(_) => self.stats.relay_dropped += 1,
                }
            }
            Ok(RelayFrame::Forwarded {
                from: origin,
                packet,
            }) if origin != self.me => match self.relays.addr_for(origin, from) {
                Some(addr) => self.transport.handle_datagram(now, addr, None, packet),
                None => self.stats.relay_dropped += 1,
            },
            Ok(_) | Err(_) => self.stats.relay_dropped += 1,
        }
    }

    /// `from` cannot reach `target`: if both are connected to us over real paths, tell each to
    /// dial the other at the address we see it at, at the same moment.
    fn coordinate_punch(&mut self, from: PeerId, target: PeerId) {
        let (Some(&from_addr), Some(&target_addr)) =
            (self.connected.get(&from), self.connected.get(&target))
        else {
            return;
        };
        if from == target || is_relay_addr(&from_addr) || is_relay_addr(&target_addr) {
            return;
        }
        self.stats.punches_coordinated += 1;
        self.send_control(
            &target,
            &Control::PunchNotify {
                peer: from,
                addr: from_addr,
            },
        );
        self.send_control(
            &from,
            &Control::PunchNotify {
                peer: target,
                addr: target_addr,
            },
        );
    }

    /// Dials `peer` at `addr` now, as a coordinator asked (the other side does the same).
    fn punch(&mut self, now: Instant, peer: PeerId, addr: SocketAddr) {
        if peer == self.me || self.connected.contains_key(&peer) || is_relay_addr(&addr) {
            return;
        }
        if self.dials.get(&peer).is_some_and(|d| d.pending.is_some()) {
            return;
        }
        self.stats.dials += 1;
        log::debug!("hole punching: dialling {peer} at {addr} while it dials us");
        match self.transport.connect(now, addr, Some(peer)) {
            Ok(conn) => {
                let dial = self.dials.entry(peer).or_insert(Dial {
                    pending: None,
                    failures: 0,
                    next_attempt: now,
                    punched: false,
                });
                dial.pending = Some(conn);
                dial.punched = true;
            }
            Err(e) => log::debug!("cannot punch to {peer} at {addr}: {e}"),
        }
    }

    /// A connected member to relay through to reach `peer`: one we dialled ourselves (so it is
    /// reachable from outside), rotating with each failed attempt.
    fn relay_for(&self, peer: &PeerId, attempt: u32) -> Option<PeerId> {
        let candidates: Vec<PeerId> = self
            .transport
            .peers()
            .filter(|p| !p.inbound && p.peer != *peer && !is_relay_addr(&p.addr))
            .map(|p| p.peer)
            .collect();
        candidates
            .get(attempt as usize % candidates.len().max(1))
            .copied()
    }

    fn learn_gossip(&mut self, now: Instant, members: Vec<MemberInfo>) {
        for m in members {
            self.learn(now, m.peer, &m.addrs, m.age, Source::Gossip);
            self.members.set_cluster(&m.peer, m.cluster);
        }
    }

    /// The members heard on our LAN.
    fn lan_peer_ids(&self) -> BTreeSet<PeerId> {
        self.lan
            .iter()
            .flat_map(|lan| lan.peers().map(|(p, _)| *p))
            .collect()
    }

    /// Our cluster's tag ([`cluster_tag`]), 0 without the cluster layer.
    fn cluster_tag(&self) -> u32 {
        self.cluster
            .as_ref()
            .map_or(0, |c| cluster_tag(&c.settings().network_id))
    }

    fn learn(
        &mut self,
        now: Instant,
        peer: PeerId,
        addrs: &[SocketAddr],
        age: Duration,
        source: Source,
    ) {
        match self.members.observe(now, peer, addrs, age, source) {
            Change::New => {
                self.discovery_changed(now);
                self.events.push_back(NodeEvent::MemberDiscovered {
                    peer,
                    addrs: addrs.to_vec(),
                    source,
                });
                self.schedule_push(now, peer);
                // Dial a new member right away when we need neighbours (a dial round only: the
                // whole housekeeping costs O(members), too much to run per new member).
                self.dial_at = Some(now);
            }
            Change::AddrsChanged => self.schedule_push(now, peer),
            Change::Unchanged | Change::Ignored => {}
        }
    }

    /// A member just sent a LAN beacon: it is up. Known members' beacons make no [`LanEvent`],
    /// yet the beacon may be the first of a member that restarted: its old connection to us is
    /// dead on its side but stays up here until we next send it something (or the idle timeout),
    /// and its dials to us may be backing off. Meanwhile a member whose state was wiped knows
    /// nobody until it hears our steady beacons (16 to 24 s), and could meet only another wiped
    /// member and take it for a new cluster. So: when the beacon is one of a burst
    /// ([`LanDiscovery::heard_early`]), a connection to it is probed with a PING (a
    /// restarted member answers with a stateless reset, the connection goes and the next dial
    /// round redials), and a dial back-off ends now (the failure count is kept, so a member that
    /// beacons but cannot be reached is retried once per beacon, its back-off still growing).
    fn on_lan_beacon(&mut self, now: Instant) {
        let Some(lan) = &self.lan else {
            return;
        };
        let heard = |peer: &PeerId| lan.last_seen(peer) == Some(now);
        // Only beacons of a burst: a restarted member bursts (four beacons within a second), and
        // steady beacons (every 16 to 24 s from every LAN member) would cost a PING and its ACK
        // per member and beacon on every connection, most of an idle LAN's QUIC traffic.
        let probe: Vec<PeerId> = self
            .connected
            .keys()
            .filter(|p| heard(p) && lan.heard_early(p))
            .copied()
            .collect();
        let mut due = false;
        for (peer, dial) in &mut self.dials {
            if dial.pending.is_none() && dial.next_attempt > now && heard(peer) {
                dial.next_attempt = now;
                due = true;
            }
        }
        for peer in &probe {
            self.transport.ping(peer);
        }
        if due {
            self.dial_at = Some(now);
        }
    }

    fn set_observed(&mut self, addr: SocketAddr) {
        if self.observed == Some(addr) || self.local_addrs.contains(&addr) {
            return;
        }
        self.observed = Some(addr);
        self.events.push_back(NodeEvent::ObservedAddr(addr));
        let announced = self.announced_addrs();
        if let Some(kad) = &mut self.kad {
            kad.set_rendezvous_addrs(announced);
        }
        self.pending_gossip.insert(self.me);
    }

    fn schedule_push(&mut self, now: Instant, peer: PeerId) {
        self.pending_gossip.insert(peer);
        self.push_at.get_or_insert(now + PUSH_DELAY);
    }

    fn self_info(&self) -> MemberInfo {
        MemberInfo {
            peer: self.me,
            addrs: self.announced_addrs(),
            age: Duration::ZERO,
            cluster: self.cluster_tag(),
        }
    }

    /// Sends gossip about members that are new or changed to every neighbour.
    fn push_gossip(&mut self, now: Instant) {
        self.push_at = None;
        if self.pending_gossip.is_empty() || self.connected.is_empty() {
            return;
        }
        let pending: Vec<PeerId> = std::mem::take(&mut self.pending_gossip)
            .into_iter()
            .collect();
        let mut entries = self.members.gossip(now, Some(&pending));
        if pending.contains(&self.me) {
            entries.push(self.self_info());
        }
        self.broadcast_members(entries);
    }

    /// How often the whole member list goes out ([`Self::sync_round`]): a tenth of the member
    /// ttl, so that ages stay well under it everywhere. Never with a cluster layer: its ledger
    /// keeps the live members fresh ([`Self::refresh`]) and learns of deaths, news of members
    /// is pushed as it happens, and every connection starts with both whole lists (the hello),
    /// so an idle node sends no list whatever the number of members.
    fn full_sync_interval(&self) -> Option<Duration> {
        self.cluster
            .is_none()
            .then(|| (self.settings.member_ttl / 10).max(Duration::from_secs(1)))
    }

    /// Sends the whole member list to [`SYNC_FANOUT`] random connected members.
    fn sync_round(&mut self, now: Instant) {
        if self.connected.is_empty() {
            return;
        }
        let mut order: Vec<(u64, PeerId)> = Vec::with_capacity(self.connected.len());
        for peer in self.connected.keys() {
            order.push((self.rng.next_u64(), *peer));
        }
        order.sort_unstable();
        let mut entries = self.members.gossip(now, None);
        entries.push(self.self_info());
        let messages: Vec<Control> = entries
            .chunks(control::MAX_MEMBERS_PER_MESSAGE)
            .map(|chunk| Control::Members(chunk.to_vec()))
            .collect();
        for (_, peer) in order.iter().take(SYNC_FANOUT) {
            for msg in &messages {
                self.send_control(peer, msg);
            }
        }
    }

    /// PINGs the connections this node keeps alive (those to members with a larger peer id) that
    /// it sent nothing on since the previous round (see [`KEEP_ALIVE_INTERVAL`]).
    fn keep_alive_round(&mut self) {
        let sent = std::mem::take(&mut self.sent_since_keep_alive);
        let quiet: Vec<PeerId> = self
            .connected
            .keys()
            .filter(|p| self.me < **p && !sent.contains(*p))
            .copied()
            .collect();
        for peer in quiet {
            self.transport.ping(&peer);
            self.stats.keep_alives_out += 1;
        }
    }

    fn broadcast_members(&mut self, entries: Vec<MemberInfo>) {
        let peers: Vec<PeerId> = self.connected.keys().copied().collect();
        for chunk in entries.chunks(control::MAX_MEMBERS_PER_MESSAGE) {
            let msg = Control::Members(chunk.to_vec());
            for peer in &peers {
                self.send_control(peer, &msg);
            }
        }
    }

    /// Refreshes first-hand knowledge, forgets silent members and dials neighbours.
    fn maintain(&mut self, now: Instant) {
        self.stats.vpn_held_dropped += self.vpn_held.expire(now);
        if self.refresh_at.is_none_or(|t| t <= now) {
            self.refresh_at = Some(now + REFRESH_INTERVAL.min(self.settings.member_ttl / 4));
            self.refresh(now);
        }
        self.dial_neighbours(now);
        self.dial_cluster_neighbours(now);
    }

    /// Keeps [`CLUSTER_NEIGHBOURS`] connections (up or under way) to members of our own cluster
    /// when such members are known, going over [`NodeSettings::neighbours`] for them: only they
    /// exchange the cluster's ledger bucket (see [`crate::ledger::Scope`]), and neighbours
    /// chosen before their clusters were known (LAN beacons and DHT records do not say) may hold
    /// none of them when a token carries several clusters. The other neighbours stay chosen
    /// without regard to clusters, so the network-wide buckets cross between clusters. Runs
    /// with the housekeeping (it costs O(members)), not per member discovered.
    fn dial_cluster_neighbours(&mut self, now: Instant) {
        let mine = self.cluster_tag();
        if mine == 0 {
            return;
        }
        let in_cluster = |p: &PeerId| self.members.get(p).is_some_and(|m| m.cluster == mine);
        let busy = self.connected.keys().filter(|p| in_cluster(p)).count()
            + self
                .dials
                .iter()
                .filter(|(p, d)| {
                    d.pending.is_some() && !self.connected.contains_key(p) && in_cluster(p)
                })
                .count();
        let wanted = CLUSTER_NEIGHBOURS.saturating_sub(busy);
        if wanted == 0 {
            return;
        }
        let lan = self.lan_peer_ids();
        let mut candidates: Vec<(u64, PeerId)> = self
            .members
            .iter()
            .filter(|(peer, m)| {
                let defer = if lan.contains(peer) {
                    LAN_DIAL_DEFER
                } else {
                    DIAL_DEFER
                };
                m.cluster == mine
                    && !m.addrs.is_empty()
                    && !self.connected.contains_key(peer)
                    && self
                        .dials
                        .get(peer)
                        .is_none_or(|d| d.pending.is_none() && d.next_attempt <= now)
                    && (self.me < **peer || now >= m.first_seen + defer)
            })
            .map(|(peer, _)| (0, *peer))
            .collect();
        for c in &mut candidates {
            c.0 = self.rng.next_u64();
        }
        candidates.sort_unstable();
        for (_, peer) in candidates.into_iter().take(wanted) {
            self.dial(now, peer);
        }
    }

    /// Refreshes first-hand knowledge and forgets silent members. The members the cluster's
    /// ledger counts as live stay fresh too: the ledger learns of deaths (see
    /// [`crate::cluster::liveness`]), so they need no periodic gossip to stay known.
    fn refresh(&mut self, now: Instant) {
        let live: Vec<PeerId> = self.connected.keys().copied().collect();
        for peer in live {
            self.members
                .observe(now, peer, &[], Duration::ZERO, Source::Connection);
        }
        if let Some(cluster) = &self.cluster {
            for peer in cluster.live_peers() {
                self.members.vouch(now, &peer);
            }
        }
        let lan_peers: Vec<(PeerId, Vec<SocketAddr>)> = self
            .lan
            .iter()
            .flat_map(|lan| lan.peers().map(|(p, a)| (*p, a.to_vec())))
            .collect();
        for (peer, addrs) in lan_peers {
            self.members
                .observe(now, peer, &addrs, Duration::ZERO, Source::Lan);
        }
        for peer in self.members.expire(now) {
            self.dials.remove(&peer);
            self.events.push_back(NodeEvent::MemberLost { peer });
        }
    }

    /// Dials members until [`NodeSettings::neighbours`] connections are up or under way, LAN
    /// peers first, and keeps [`REMOTE_NEIGHBOURS`] of them to members outside our LAN when any
    /// are known (going over `neighbours` for them if need be).
    fn dial_neighbours(&mut self, now: Instant) {
        let pending = self.dials.values().filter(|d| d.pending.is_some()).count();
        let lan_count = self.lan.as_ref().map_or(0, LanDiscovery::peer_count);
        let full = self.settings.neighbours + REMOTE_NEIGHBOURS;
        let busy = self.connected.len() + pending;
        // Cheap exits first: this runs for every member discovered.
        if busy >= full || (busy >= self.settings.neighbours && self.members.len() <= lan_count) {
            return;
        }
        let lan = self.lan_peer_ids();
        let remote = self.connected.keys().filter(|p| !lan.contains(p)).count()
            + self
                .dials
                .iter()
                .filter(|(p, d)| d.pending.is_some() && !lan.contains(p))
                .count();
        let mut wanted = self.settings.neighbours.saturating_sub(busy);
        // Every member a LAN peer (the common small case): no remote candidate to look for.
        let wanted_remote = if self.members.len() > lan.len() {
            REMOTE_NEIGHBOURS
                .min(self.settings.neighbours)
                .saturating_sub(remote)
        } else {
            0
        };
        if wanted == 0 && wanted_remote == 0 {
            return;
        }
        // (remote, random, peer): LAN peers first, in random order.
        let mut deferred_until: Option<Instant> = None;
        let mut candidates: Vec<(bool, u64, PeerId)> = self
            .members
            .iter()
            .filter(|(peer, m)| {
                if self.connected.contains_key(peer)
                    || m.addrs.is_empty()
                    || self
                        .dials
                        .get(peer)
                        .is_some_and(|d| d.pending.is_some() || d.next_attempt > now)
                {
                    return false;
                }
                let defer = if lan.contains(peer) {
                    LAN_DIAL_DEFER
                } else {
                    DIAL_DEFER
                };
                let due = m.first_seen + defer;
                if self.me < **peer || now >= due {
                    return true;
                }
                deferred_until = Some(deferred_until.map_or(due, |t| t.min(due)));
                false
            })
            .map(|(peer, _)| (!lan.contains(peer), 0, *peer))
            .collect();
        // A deferred dial is made when due, not at the next housekeeping pass.
        if let Some(due) = deferred_until {
            self.dial_at = Some(self.dial_at.map_or(due, |t| t.min(due)));
        }
        for c in &mut candidates {
            c.1 = self.rng.next_u64();
        }
        candidates.sort_unstable();
        let (mut remote_candidates, lan_candidates): (Vec<_>, Vec<_>) =
            candidates.into_iter().partition(|c| c.0);
        let take = wanted_remote.min(remote_candidates.len());
        let mut chosen: Vec<PeerId> = remote_candidates.drain(..take).map(|c| c.2).collect();
        wanted = wanted.saturating_sub(chosen.len());
        chosen.extend(
            lan_candidates
                .iter()
                .chain(&remote_candidates)
                .take(wanted)
                .map(|c| c.2),
        );
        for peer in chosen {
            self.dial(now, peer);
        }
    }

    fn dial(&mut self, now: Instant, peer: PeerId) {
        let Some(known) = self.members.get(&peer).map(|m| m.addrs.clone()) else {
            return;
        };
        // The addresses its LAN beacons announce first: members behind one NAT announce their
        // public mapping first, which most NATs do not hairpin.
        let mut addrs: Vec<SocketAddr> = self
            .lan
            .iter()
            .flat_map(|lan| lan.peers().filter(|(p, _)| **p == peer))
            .flat_map(|(_, a)| a.iter().copied())
            .collect();
        for a in known {
            if !addrs.contains(&a) {
                addrs.push(a);
            }
        }
        let failures = self.dials.get(&peer).map_or(0, |d| d.failures);
        // A round of attempts: each direct address, a coordinated punch, then a relay (for NATs
        // that cannot be punched).
        let direct = addrs.len().max(1) as u32;
        let step = failures % (direct + 2);
        let round = failures / (direct + 2);
        if step == direct {
            // Ask a member both ends reach to have both dial at once (hole punching).
            if let Some(coordinator) = self.relay_for(&peer, round) {
                self.stats.punch_requests += 1;
                self.send_control(&coordinator, &Control::PunchRequest { target: peer });
            }
            let backoff = PUNCH_WAIT.max(dial_backoff(failures + 1, addrs.len() + 2));
            self.dials.insert(
                peer,
                Dial {
                    pending: None,
                    failures: failures + 1,
                    next_attempt: now + backoff,
                    punched: false,
                },
            );
            return;
        }
        let relayed = (step == direct + 1)
            .then(|| self.relay_for(&peer, round))
            .flatten()
            .and_then(|relay| self.relays.addr_for(peer, relay));
        let Some(addr) =
            relayed.or_else(|| addrs.get(failures as usize % addrs.len().max(1)).copied())
        else {
            return;
        };
        self.stats.dials += 1;
        match self.transport.connect(now, addr, Some(peer)) {
            Ok(conn) => {
                self.dials.insert(
                    peer,
                    Dial {
                        pending: Some(conn),
                        failures,
                        next_attempt: now,
                        punched: false,
                    },
                );
            }
            Err(e) => {
                log::debug!("cannot dial {peer} at {addr}: {e}");
                self.stats.dials_failed += 1;
                let backoff = dial_backoff(failures + 1, addrs.len() + 2);
                self.dials.insert(
                    peer,
                    Dial {
                        pending: None,
                        failures: failures + 1,
                        next_attempt: now + backoff,
                        punched: false,
                    },
                );
            }
        }
    }
}

/// Wait before the next dial of a member after `failures` failed attempts, when a round of
/// attempts covers `paths` paths (its addresses and a relay): quick within the first round,
/// then exponential up to [`MAX_DIAL_BACKOFF`].
fn dial_backoff(failures: u32, paths: usize) -> Duration {
    let rounds = failures / u32::try_from(paths.max(1)).unwrap_or(u32::MAX);
    match rounds {
        0 => Duration::from_millis(250),
        n => Duration::from_secs(1u64 << n.min(6)).min(MAX_DIAL_BACKOFF),
    }
}
