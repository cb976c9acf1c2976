//! A deterministic simulator: many real [`Node`]s in one process over a virtual network, on a
//! virtual clock, with every random choice drawn from one seeded [`Rng`].
//!
//! # Model
//!
//! - [`net`]: subnets (LAN broadcast domains) behind one router, hosts with IPv4 addresses,
//!   per-link latency, jitter, loss, duplication and reordering, partitions, NAT boxes.
//! - Nodes: a host may run a [`Node`] of one network (token). Its overlay socket is
//!   `ip:`[`OVERLAY_PORT`] and, when LAN discovery is on, it also listens on
//!   `ip:`[`BEACON_PORT`]; beacons ([`Destination::LanBroadcast`]) go to every other host of
//!   the subnet from `ip:BEACON_PORT`, as the mio driver sends them.
//! - Clock: one base [`Instant`] captured at creation plus a virtual offset; a node's wall clock
//!   is [`SimConfig::start_unix`] plus the offset plus its own skew ([`Sim::set_clock_skew`]).
//! - Identities come from the simulator's generator ([`Identity::from_seed`]); a restarted node
//!   keeps its identity and gets fresh randomness for everything else.
//!
//! # Loop
//!
//! A priority queue holds packet deliveries, node wake-ups ([`Node::poll_timeout`]) and
//! scheduled [`Action`]s, ordered by (time, insertion order). [`Sim::step`] pops the earliest,
//! advances the clock, hands it to the node, then drains that node's transmits (each routed
//! through the network into new deliveries) and events, and schedules its next wake-up. A node
//! that keeps asking to be woken at the same instant more than
//! [`SimConfig::max_wakes_per_instant`] times stops the run with [`SimError::BusyLoop`].
//!
//! # Determinism
//!
//! The same seed and the same calls replay the same run. [`Sim::trace`] hashes every delivered
//! packet (time, sender, receiver, length, kind, and the bytes of non-QUIC packets), every node
//! event and every start and stop. QUIC payloads are left out of the hash because rustls draws
//! its handshake randomness from the OS: their bytes change from run to run, never their sizes
//! or timing.
//!
//! # Invariants
//!
//! Checked after every step of a node: a member table or connection never holds a peer of
//! another network (or one the simulator does not know), and member tables stay within
//! `max_members`. [`Sim::check_invariants`] sweeps every node at once. A panic inside a node
//! propagates to the caller; [`seed::run_seeded`] turns it into a message with the replay
//! command.
//!
//! # Convergence
//!
//! After each step that changed a node's members (and whenever a node of its network starts or
//! stops), the simulator checks whether the node knows every running member of its network, and
//! keeps [`NodeMetrics::first_knew_all`] and [`NodeMetrics::knows_all_since`];
//! [`Sim::run_until_converged`] runs until every running node does.

pub mod idle;
pub mod metrics;
pub mod net;
pub mod scale;
pub mod seed;
pub mod trace;

use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use crate::cluster::{Cluster, ClusterEvent, ClusterSettings};
use crate::discovery::lan::BEACON_PORT;
use crate::identity::{Identity, PeerId};
use crate::ledger::disk::{DiscardDisk, LedgerDisk, MemoryDisk};
use crate::ledger::{Ledger, LedgerError, Limits, names};
use crate::node::bootstrap::DEFAULT_OVERLAY_PORT;
use crate::node::{Destination, Node, NodeEvent, NodeSettings};
use crate::overlay::TransportError;
use crate::rng::Rng;
use crate::token::{NEVER_ROTATE, NetworkToken};

pub use metrics::{NodeMetrics, PacketKind, Traffic};
pub use net::{HostId, LinkParams, NatKind, NatSettings, NetStats, PartitionId, SubnetId};
use net::{Leg, Network, Target, nanos};
pub use trace::Trace;

/// UDP port of every simulated node's overlay socket.
pub const OVERLAY_PORT: u16 = DEFAULT_OVERLAY_PORT;

/// Tunables of a simulation.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Seeds every random choice.
    pub seed: u64,
    /// Wall-clock time (Unix seconds) at virtual time zero.
    pub start_unix: u64,
    /// The router between subnets, as a link (default 10 ms ± 2 ms).
    pub router: LinkParams,
    /// Rotation interval of generated tokens (default: never rotate).
    pub token_interval: u64,
    /// A node woken more often than this at one instant is a busy loop (default 1000).
    pub max_wakes_per_instant: u32,
    /// Keep node events for [`Sim::events`] (default false: large runs make millions).
    pub record_events: bool,
    /// Keep the last this many trace records in words (default 0).
    pub trace_tail: usize,
    /// Most packets kept by mirrors and by hosts without a node (default 100 000).
    pub capture_limit: usize,
    /// A second node taking a master role is counted ([`Sim::second_masters_taken`]) instead of
    /// stopping the run: for scenarios where splits form and `p2p.auto.merge_window` merges
    /// them, whose tests check what is left after the merge (default false).
    pub allow_second_masters: bool,
    /// Keep the bytes of every node's ledger saves on its virtual disk, so that a restart loads
    /// them (default true). Off, saves are encoded as usual but their bytes dropped, and
    /// restarting a node that saved is an error: for large runs that restart nobody (a node's
    /// snapshot and journal reach a few MB at 1,000 nodes).
    pub keep_disks: bool,
}

impl SimConfig {
    /// Defaults with `seed`.
    #[must_use]
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            // 2026-01-01T00:00:00Z.
            start_unix: 1_767_225_600,
            router: LinkParams::new(Duration::from_millis(10))
                .with_jitter(Duration::from_millis(2)),
            token_interval: NEVER_ROTATE,
            max_wakes_per_instant: 1000,
            record_events: false,
            trace_tail: 0,
            capture_limit: 100_000,
            allow_second_masters: false,
            keep_disks: true,
        }
    }
}

/// A network (one token) in the simulation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NetId(pub usize);

/// Something to do at a virtual time ([`Sim::schedule`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Start the host's node (again, after a crash: same identity, fresh state).
    Start(HostId),
    /// Drop the node without a word (power loss, kill -9).
    Crash(HostId),
    /// Close its connections, send the closes, then drop it.
    Shutdown(HostId),
    /// Heal a partition.
    Heal(PartitionId),
}

/// Why a run stopped.
#[derive(Debug)]
pub enum SimError {
    /// A node asked to be woken at one instant over and over.
    BusyLoop {
        /// Virtual time.
        at: Duration,
        /// The node.
        host: HostId,
        /// Wake-ups at that instant.
        wakes: u32,
    },
    /// An invariant broke.
    Invariant {
        /// Virtual time.
        at: Duration,
        /// The node where it was seen.
        host: HostId,
        /// What broke.
        what: String,
    },
    /// A node could not be created.
    NodeCreate {
        /// The host.
        host: HostId,
        /// Why.
        error: TransportError,
    },
    /// A call did not fit the topology (unknown host, too many subnets, ...).
    Config(String),
}

impl fmt::Display for SimError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BusyLoop { at, host, wakes } => {
                write!(
                    f,
                    "busy loop: host {} woken {wakes} times at {at:?}",
                    host.0
                )
            }
            Self::Invariant { at, host, what } => {
                write!(f, "invariant broken at {at:?} on host {}: {what}", host.0)
            }
            Self::NodeCreate { host, error } => {
                write!(f, "node on host {} not created: {error}", host.0)
            }
            Self::Config(what) => f.write_str(what),
        }
    }
}

impl std::error::Error for SimError {}

/// A packet seen by a mirror or received by a host without a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Captured {
    /// Virtual time.
    pub at: Duration,
    /// The host that sent it.
    pub src_host: HostId,
    /// Its source address (as sent, before any NAT for mirrors; as received for inboxes).
    pub from: SocketAddr,
    /// Where it was going.
    pub to: Destination,
    /// Its kind.
    pub kind: PacketKind,
    /// The payload.
    pub bytes: Vec<u8>,
}

struct Packet {
    src_host: HostId,
    target: Target,
    from: SocketAddr,
    dst: SocketAddr,
    bytes: Vec<u8>,
}

enum Item {
    Deliver(Box<Packet>),
    Wake { host: HostId, incarnation: u64 },
    Act(Action),
}

struct Scheduled {
    at: u64,
    seq: u64,
    item: Item,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}

impl Eq for Scheduled {}

impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Scheduled {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

/// A host's virtual disk ([`SimConfig::keep_disks`]).
#[derive(Debug)]
enum SimDisk {
    /// The bytes of the saves.
    Kept(MemoryDisk),
    /// Only whether anything was saved.
    Discarded(DiscardDisk),
}

impl SimDisk {
    fn new(keep: bool) -> Self {
        if keep {
            SimDisk::Kept(MemoryDisk::default())
        } else {
            SimDisk::Discarded(DiscardDisk::default())
        }
    }

    /// The ledger a restart finds (an unused disk: an empty one).
    fn load(&self, limits: Limits) -> Result<Ledger, String> {
        match self {
            SimDisk::Kept(disk) => disk.load(limits),
            SimDisk::Discarded(disk) if !disk.saved() => MemoryDisk::default().load(limits),
            SimDisk::Discarded(_) => {
                Err("this disk kept no bytes (SimConfig::keep_disks is off)".to_string())
            }
        }
    }
}

impl LedgerDisk for SimDisk {
    fn write_snapshot(&mut self, bytes: Vec<u8>) -> Result<(), LedgerError> {
        match self {
            SimDisk::Kept(disk) => disk.write_snapshot(bytes),
            SimDisk::Discarded(disk) => disk.write_snapshot(bytes),
        }
    }

    fn remove_journal(&mut self) -> Result<(), LedgerError> {
        match self {
            SimDisk::Kept(disk) => disk.remove_journal(),
            SimDisk::Discarded(disk) => disk.remove_journal(),
        }
    }

    fn append_journal(&mut self, fresh: bool, records: &[u8]) -> Result<u64, (LedgerError, bool)> {
        match self {
            SimDisk::Kept(disk) => disk.append_journal(fresh, records),
            SimDisk::Discarded(disk) => disk.append_journal(fresh, records),
        }
    }
}

struct NodeSlot {
    net: NetId,
    identity_seed: [u8; 32],
    peer: PeerId,
    settings: NodeSettings,
    cluster: Option<ClusterSettings>,
    /// The ledger's snapshot and journal bytes as last saved (what a restart finds in the state
    /// directory).
    disk: SimDisk,
    node: Option<Box<Node>>,
    incarnation: u64,
    wake_at: Option<u64>,
    skew: i64,
    wake_instant: u64,
    wakes_at_instant: u32,
    knows_all: bool,
    metrics: NodeMetrics,
}

#[derive(Default)]
struct HostState {
    slot: Option<NodeSlot>,
    inbox: Vec<Captured>,
}

struct NetState {
    token: NetworkToken,
    running: BTreeSet<HostId>,
}

/// Trace record tags.
const TAG_DELIVER: u64 = 1;
const TAG_EVENT: u64 = 2;
const TAG_START: u64 = 3;
const TAG_STOP: u64 = 4;

/// The simulator (see the module documentation).
pub struct Sim {
    config: SimConfig,
    base: Instant,
    now: u64,
    seq: u64,
    rng: Rng,
    net: Network,
    queue: BinaryHeap<Reverse<Scheduled>>,
    hosts: Vec<HostState>,
    nets: Vec<NetState>,
    peers: BTreeMap<PeerId, HostId>,
    trace: Trace,
    events: Vec<(Duration, HostId, NodeEvent)>,
    mirrored: BTreeSet<SubnetId>,
    captured: Vec<Captured>,
    running: usize,
    converged: usize,
    steps: u64,
    legs: Vec<Leg>,
    buf: Vec<u8>,
    node_events: Vec<NodeEvent>,
    masters: BTreeMap<String, String>,
    second_masters_taken: u64,
}

impl fmt::Debug for Sim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sim")
            .field("now", &self.now())
            .field("hosts", &self.hosts.len())
            .field("running", &self.running)
            .field("queued", &self.queue.len())
            .finish_non_exhaustive()
    }
}

impl Sim {
    /// An empty simulation.
    #[must_use]
    pub fn new(config: SimConfig) -> Self {
        Self {
            base: Instant::now(),
            now: 0,
            seq: 0,
            rng: Rng::from_seed(config.seed),
            net: Network::new(config.router),
            queue: BinaryHeap::new(),
            hosts: Vec::new(),
            nets: Vec::new(),
            peers: BTreeMap::new(),
            trace: Trace::new(config.trace_tail),
            events: Vec::new(),
            mirrored: BTreeSet::new(),
            captured: Vec::new(),
            running: 0,
            converged: 0,
            steps: 0,
            legs: Vec::new(),
            buf: Vec::with_capacity(65_536),
            node_events: Vec::new(),
            masters: BTreeMap::new(),
            second_masters_taken: 0,
            config,
        }
    }

    // ---- topology ----

    /// Adds a network with a token generated from the simulation's generator.
    pub fn add_network(&mut self) -> NetId {
        let rng = &mut self.rng;
        let token =
            NetworkToken::generate_with(self.config.token_interval, &mut |buf| rng.fill(buf));
        self.add_network_with(token)
    }

    /// Adds a network with this token.
    pub fn add_network_with(&mut self, token: NetworkToken) -> NetId {
        self.nets.push(NetState {
            token,
            running: BTreeSet::new(),
        });
        NetId(self.nets.len() - 1)
    }

    /// The token of a network.
    #[must_use]
    pub fn token(&self, net: NetId) -> Option<&NetworkToken> {
        self.nets.get(net.0).map(|n| &n.token)
    }

    /// Default node settings for a network (LAN and DHT on, no bootstrap).
    pub fn default_settings(&self, net: NetId) -> Result<NodeSettings, SimError> {
        let token = self
            .token(net)
            .ok_or_else(|| SimError::Config(format!("no network {}", net.0)))?;
        Ok(NodeSettings::for_token(token))
    }

    /// Adds a public subnet.
    pub fn add_subnet(
        &mut self,
        lan: LinkParams,
        uplink: LinkParams,
    ) -> Result<SubnetId, SimError> {
        self.net
            .add_subnet(lan, uplink, None)
            .ok_or_else(|| SimError::Config("too many subnets".into()))
    }

    /// Adds a subnet behind a NAT box.
    pub fn add_nat_subnet(
        &mut self,
        nat: NatSettings,
        lan: LinkParams,
        uplink: LinkParams,
    ) -> Result<SubnetId, SimError> {
        self.net
            .add_subnet(lan, uplink, Some(nat))
            .ok_or_else(|| SimError::Config("too many subnets".into()))
    }

    /// Changes a subnet's LAN link.
    pub fn set_lan_link(&mut self, subnet: SubnetId, lan: LinkParams) {
        self.net.set_lan(subnet, lan);
    }

    /// Changes a subnet's uplink.
    pub fn set_uplink(&mut self, subnet: SubnetId, uplink: LinkParams) {
        self.net.set_uplink(subnet, uplink);
    }

    /// Changes the router link.
    pub fn set_router(&mut self, router: LinkParams) {
        self.net.router = router;
    }

    /// Adds a host without a node (an adversary, a bystander): it keeps what it receives
    /// ([`Sim::inbox`]).
    pub fn add_host(&mut self, subnet: SubnetId) -> Result<HostId, SimError> {
        let id = self
            .net
            .add_host(subnet)
            .ok_or_else(|| SimError::Config(format!("cannot add a host to subnet {}", subnet.0)))?;
        self.hosts.push(HostState::default());
        Ok(id)
    }

    /// Adds a host with a node of `net` (not started: see [`Sim::start`], [`Sim::schedule`]).
    pub fn add_node(
        &mut self,
        subnet: SubnetId,
        net: NetId,
        settings: NodeSettings,
    ) -> Result<HostId, SimError> {
        if net.0 >= self.nets.len() {
            return Err(SimError::Config(format!("no network {}", net.0)));
        }
        let host = self.add_host(subnet)?;
        let mut identity_seed = [0u8; 32];
        self.rng.fill(&mut identity_seed);
        let peer = Identity::from_seed(identity_seed).peer_id();
        self.peers.insert(peer, host);
        self.hosts[host.0].slot = Some(NodeSlot {
            net,
            identity_seed,
            peer,
            settings,
            cluster: None,
            disk: SimDisk::new(self.config.keep_disks),
            node: None,
            incarnation: 0,
            wake_at: None,
            skew: 0,
            wake_instant: 0,
            wakes_at_instant: 0,
            knows_all: false,
            metrics: NodeMetrics::default(),
        });
        Ok(host)
    }

    /// Replaces a node's settings (effective at its next start).
    pub fn set_settings(&mut self, host: HostId, settings: NodeSettings) {
        if let Some(slot) = self.slot_mut(host) {
            slot.settings = settings;
        }
    }

    /// Gives a node the cluster layer (effective at its next start). Its ledger is saved to a
    /// virtual disk whenever the node asks, so a restart finds it (see [`Sim::wipe_state`]).
    pub fn set_cluster(&mut self, host: HostId, settings: ClusterSettings) {
        if let Some(slot) = self.slot_mut(host) {
            slot.cluster = Some(settings);
        }
    }

    /// Deletes a node's saved state (its ledger): the next start begins empty.
    pub fn wipe_state(&mut self, host: HostId) {
        let keep = self.config.keep_disks;
        if let Some(slot) = self.slot_mut(host) {
            slot.disk = SimDisk::new(keep);
        }
    }

    /// The chosen masters so far, by `network_id`, as uuids (one each, unless the election is
    /// broken: the simulator stops with an invariant error the moment a second one appears).
    pub fn masters(&self) -> &BTreeMap<String, String> {
        &self.masters
    }

    /// Master roles taken by a node other than the first master of its network (only with
    /// [`SimConfig::allow_second_masters`]; otherwise the first one stops the run).
    pub fn second_masters_taken(&self) -> u64 {
        self.second_masters_taken
    }

    /// Sets how far a node's wall clock is off, in seconds (either way).
    pub fn set_clock_skew(&mut self, host: HostId, secs: i64) {
        if let Some(slot) = self.slot_mut(host) {
            slot.skew = secs;
        }
    }

    /// Blocks packets from hosts in `from` to hosts in `to` (and back when `both_ways`) until
    /// [`Sim::heal`].
    pub fn partition(&mut self, from: &[HostId], to: &[HostId], both_ways: bool) -> PartitionId {
        self.net.partition(from, to, both_ways)
    }

    /// Lifts a partition.
    pub fn heal(&mut self, id: PartitionId) {
        self.net.heal(id);
    }

    /// Keeps a copy of every packet sent by a host of `subnet` (a mirror port), up to
    /// [`SimConfig::capture_limit`].
    pub fn mirror(&mut self, subnet: SubnetId) {
        self.mirrored.insert(subnet);
    }

    // ---- lifecycle ----

    /// Runs `action` at virtual time `at` (at once if `at` has passed).
    pub fn schedule(&mut self, at: Duration, action: Action) {
        let at = nanos(at).max(self.now);
        self.push(at, Item::Act(action));
    }

    /// Starts a node now: `handle_timeout` once, then `set_local_addrs` with its address.
    pub fn start(&mut self, host: HostId) -> Result<(), SimError> {
        self.act(Action::Start(host))
    }

    /// Crashes a node now.
    pub fn crash(&mut self, host: HostId) -> Result<(), SimError> {
        self.act(Action::Crash(host))
    }

    /// Shuts a node down cleanly now.
    pub fn shutdown(&mut self, host: HostId) -> Result<(), SimError> {
        self.act(Action::Shutdown(host))
    }

    /// Sends a raw packet from `host` with source address `from` (which may be spoofed), as if
    /// its socket sent it.
    pub fn send_raw(&mut self, host: HostId, from: SocketAddr, to: Destination, bytes: &[u8]) {
        self.route(host, from, to, bytes);
    }

    /// Calls `f` with a running node, its `now` and wall clock, then drains what it produced.
    /// `None` if the node is not running.
    pub fn with_node<R>(
        &mut self,
        host: HostId,
        f: impl FnOnce(&mut Node, Instant, u64) -> R,
    ) -> Result<Option<R>, SimError> {
        let now = self.instant();
        let unix = self.unix_ms(host);
        let Some(node) = self.slot_mut(host).and_then(|s| s.node.as_deref_mut()) else {
            return Ok(None);
        };
        let r = f(node, now, unix);
        self.after_input(host)?;
        Ok(Some(r))
    }

    // ---- running ----

    /// Processes the next queued item; false when the queue is empty.
    pub fn step(&mut self) -> Result<bool, SimError> {
        let Some(Reverse(next)) = self.queue.pop() else {
            return Ok(false);
        };
        self.now = self.now.max(next.at);
        self.steps += 1;
        match next.item {
            Item::Deliver(packet) => self.deliver(*packet)?,
            Item::Wake { host, incarnation } => self.wake(host, incarnation)?,
            Item::Act(action) => self.act(action)?,
        }
        Ok(true)
    }

    /// Runs every item due up to virtual time `until`, then sets the clock to it.
    pub fn run_until(&mut self, until: Duration) -> Result<(), SimError> {
        let until = nanos(until);
        while self.queue.peek().is_some_and(|Reverse(s)| s.at <= until) {
            self.step()?;
        }
        self.now = self.now.max(until);
        Ok(())
    }

    /// Runs for `d` of virtual time.
    pub fn run_for(&mut self, d: Duration) -> Result<(), SimError> {
        self.run_until(self.now() + d)
    }

    /// Runs until every running node knows every running member of its network, or until
    /// `deadline`; returns the virtual time of convergence, `None` at the deadline.
    pub fn run_until_converged(
        &mut self,
        deadline: Duration,
    ) -> Result<Option<Duration>, SimError> {
        let deadline = nanos(deadline);
        loop {
            if self.all_converged() {
                return Ok(Some(self.now()));
            }
            if self.queue.peek().is_none_or(|Reverse(s)| s.at > deadline) {
                self.now = self.now.max(deadline);
                return Ok(None);
            }
            self.step()?;
        }
    }

    // ---- getters ----

    /// Virtual time.
    #[must_use]
    pub fn now(&self) -> Duration {
        Duration::from_nanos(self.now)
    }

    /// The `Instant` nodes see now.
    #[must_use]
    pub fn instant(&self) -> Instant {
        self.base + self.now()
    }

    /// Wall clock of `host` now (with its skew), in unix milliseconds.
    #[must_use]
    pub fn unix_ms(&self, host: HostId) -> u64 {
        let skew_ms = self.slot(host).map_or(0, |s| s.skew.saturating_mul(1000));
        let t = self
            .config
            .start_unix
            .saturating_mul(1000)
            .saturating_add(self.now / 1_000_000);
        t.saturating_add_signed(skew_ms)
    }

    /// Wall clock of `host` now (with its skew).
    #[must_use]
    pub fn unix(&self, host: HostId) -> u64 {
        let skew = self.slot(host).map_or(0, |s| s.skew);
        let t = self
            .config
            .start_unix
            .saturating_add(self.now / 1_000_000_000);
        t.saturating_add_signed(skew)
    }

    /// The simulation's generator (scenarios draw their random choices from it too).
    pub fn rng(&mut self) -> &mut Rng {
        &mut self.rng
    }

    /// The configuration.
    #[must_use]
    pub fn config(&self) -> &SimConfig {
        &self.config
    }

    /// The trace so far.
    #[must_use]
    pub fn trace(&self) -> &Trace {
        &self.trace
    }

    /// Items processed so far.
    #[must_use]
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Network counters.
    #[must_use]
    pub fn net_stats(&self) -> NetStats {
        self.net.stats
    }

    /// A host's IPv4 address.
    #[must_use]
    pub fn ip(&self, host: HostId) -> Option<Ipv4Addr> {
        self.net.ip(host)
    }

    /// A host's overlay socket address.
    #[must_use]
    pub fn addr(&self, host: HostId) -> Option<SocketAddr> {
        self.ip(host).map(|ip| SocketAddr::from((ip, OVERLAY_PORT)))
    }

    /// The subnet of a host.
    #[must_use]
    pub fn subnet_of(&self, host: HostId) -> Option<SubnetId> {
        self.net.subnet_of(host)
    }

    /// The public address of a subnet's NAT.
    #[must_use]
    pub fn nat_public_ip(&self, subnet: SubnetId) -> Option<Ipv4Addr> {
        self.net.nat_public_ip(subnet)
    }

    /// Active mappings in a subnet's NAT.
    #[must_use]
    pub fn nat_mappings(&self, subnet: SubnetId) -> usize {
        self.net.nat_mappings(subnet)
    }

    /// Hosts on a subnet.
    #[must_use]
    pub fn hosts_on(&self, subnet: SubnetId) -> &[HostId] {
        self.net.hosts_on(subnet)
    }

    /// Every host with a node, running or not.
    pub fn node_hosts(&self) -> impl Iterator<Item = HostId> + '_ {
        self.hosts
            .iter()
            .enumerate()
            .filter(|(_, h)| h.slot.is_some())
            .map(|(i, _)| HostId(i))
    }

    /// Hosts whose node runs.
    pub fn running_hosts(&self) -> impl Iterator<Item = HostId> + '_ {
        self.node_hosts().filter(|h| self.is_running(*h))
    }

    /// The node's peer id (also while it is down).
    #[must_use]
    pub fn peer_id(&self, host: HostId) -> Option<PeerId> {
        self.slot(host).map(|s| s.peer)
    }

    /// The node's identity (its signing key: tests forge entries a member could sign).
    #[must_use]
    pub fn identity(&self, host: HostId) -> Option<Identity> {
        self.slot(host)
            .map(|s| Identity::from_seed(s.identity_seed))
    }

    /// The host of a peer id.
    #[must_use]
    pub fn host_of(&self, peer: &PeerId) -> Option<HostId> {
        self.peers.get(peer).copied()
    }

    /// The network of a node.
    #[must_use]
    pub fn net_of(&self, host: HostId) -> Option<NetId> {
        self.slot(host).map(|s| s.net)
    }

    /// Whether the node runs.
    #[must_use]
    pub fn is_running(&self, host: HostId) -> bool {
        self.slot(host).is_some_and(|s| s.node.is_some())
    }

    /// The running node of a host.
    #[must_use]
    pub fn node(&self, host: HostId) -> Option<&Node> {
        self.slot(host).and_then(|s| s.node.as_deref())
    }

    /// What a node's ledger saves left on its host's virtual disk (the snapshot and journal
    /// bytes a restart loads).
    #[must_use]
    pub fn disk(&self, host: HostId) -> Option<&MemoryDisk> {
        match &self.slot(host)?.disk {
            SimDisk::Kept(disk) => Some(disk),
            SimDisk::Discarded(_) => None,
        }
    }

    /// Metrics of a node's host.
    #[must_use]
    pub fn metrics(&self, host: HostId) -> Option<&NodeMetrics> {
        self.slot(host).map(|s| &s.metrics)
    }

    /// Node events so far, when [`SimConfig::record_events`] is set.
    #[must_use]
    pub fn events(&self) -> &[(Duration, HostId, NodeEvent)] {
        &self.events
    }

    /// Packets copied by mirrors.
    #[must_use]
    pub fn captured(&self) -> &[Captured] {
        &self.captured
    }

    /// Packets received by a host without a node.
    #[must_use]
    pub fn inbox(&self, host: HostId) -> &[Captured] {
        self.hosts.get(host.0).map_or(&[], |h| h.inbox.as_slice())
    }

    /// True when at least one node runs and every running node knows every running member of
    /// its network.
    #[must_use]
    pub fn all_converged(&self) -> bool {
        self.running > 0 && self.converged == self.running
    }

    /// Running nodes that know every running member of their network.
    #[must_use]
    pub fn converged_count(&self) -> usize {
        self.converged
    }

    /// Checks every invariant on every running node (the per-step checks look only at the node
    /// that stepped).
    pub fn check_invariants(&self) -> Result<(), SimError> {
        for host in self.running_hosts() {
            let (Some(slot), Some(node)) = (self.slot(host), self.node(host)) else {
                continue;
            };
            for (peer, _) in node.members().iter() {
                self.check_same_net(host, slot.net, peer, "member table")?;
            }
            for peer in node.connected().keys() {
                self.check_same_net(host, slot.net, peer, "connected")?;
            }
            self.check_bounds(host, slot, node)?;
        }
        Ok(())
    }

    // ---- internals ----

    fn slot(&self, host: HostId) -> Option<&NodeSlot> {
        self.hosts.get(host.0).and_then(|h| h.slot.as_ref())
    }

    fn slot_mut(&mut self, host: HostId) -> Option<&mut NodeSlot> {
        self.hosts.get_mut(host.0).and_then(|h| h.slot.as_mut())
    }

    fn push(&mut self, at: u64, item: Item) {
        self.seq += 1;
        self.queue.push(Reverse(Scheduled {
            at,
            seq: self.seq,
            item,
        }));
    }

    fn invariant(&self, host: HostId, what: String) -> SimError {
        SimError::Invariant {
            at: self.now(),
            host,
            what,
        }
    }

    fn check_same_net(
        &self,
        host: HostId,
        net: NetId,
        peer: &PeerId,
        place: &str,
    ) -> Result<(), SimError> {
        match self.peers.get(peer).and_then(|h| self.slot(*h)) {
            Some(other) if other.net == net => Ok(()),
            Some(other) => Err(self.invariant(
                host,
                format!(
                    "{place}: peer {peer} of network {} in network {}",
                    other.net.0, net.0
                ),
            )),
            None => Err(self.invariant(host, format!("{place}: unknown peer {peer}"))),
        }
    }

    fn check_bounds(&self, host: HostId, slot: &NodeSlot, node: &Node) -> Result<(), SimError> {
        let members = node.members().len();
        if members > slot.settings.max_members {
            return Err(self.invariant(
                host,
                format!(
                    "{members} members, over the bound of {}",
                    slot.settings.max_members
                ),
            ));
        }
        Ok(())
    }

    fn act(&mut self, action: Action) -> Result<(), SimError> {
        match action {
            Action::Start(host) => self.start_node(host),
            Action::Crash(host) => self.stop_node(host, false),
            Action::Shutdown(host) => self.stop_node(host, true),
            Action::Heal(id) => {
                self.net.heal(id);
                Ok(())
            }
        }
    }

    fn start_node(&mut self, host: HostId) -> Result<(), SimError> {
        let addr = self
            .addr(host)
            .ok_or_else(|| SimError::Config(format!("no host {}", host.0)))?;
        let node_seed = self.rng.next_u64();
        let Some(slot) = self.hosts.get(host.0).and_then(|h| h.slot.as_ref()) else {
            return Err(SimError::Config(format!("host {} has no node", host.0)));
        };
        if slot.node.is_some() {
            return Ok(());
        }
        let net = slot.net;
        let token = &self.nets[net.0].token;
        let identity = Identity::from_seed(slot.identity_seed);
        let mut node_settings = slot.settings.clone();
        if let Some(cluster) = &slot.cluster {
            node_settings.watch_liveness(cluster.liveness_timeout);
        }
        let mut node = Node::new(&identity, token, node_settings, node_seed)
            .map_err(|error| SimError::NodeCreate { host, error })?;
        if let Some(settings) = &slot.cluster {
            // Read back through the agent's own decoding (snapshot, then journal replay).
            let ledger =
                slot.disk
                    .load(settings.ledger_limits)
                    .map_err(|reason| SimError::Invariant {
                        at: self.now(),
                        host,
                        what: format!("the saved ledger does not load: {reason}"),
                    })?;
            let cluster = Cluster::new(&identity, settings.clone(), ledger, node_seed ^ 0x5eed);
            node.attach_cluster(cluster);
        }
        let now = self.instant();
        let unix = self.unix_ms(host);
        let slot = self
            .slot_mut(host)
            .ok_or_else(|| SimError::Config("slot vanished".into()))?;
        let node = slot.node.insert(Box::new(node));
        slot.incarnation += 1;
        slot.wake_at = None;
        slot.metrics.starts += 1;
        node.handle_timeout(now, unix);
        node.set_local_addrs(now, vec![addr]);
        self.nets[net.0].running.insert(host);
        self.running += 1;
        let t = self.now;
        self.trace.record(&[TAG_START, t, host.0 as u64], || {
            format!("{t} start {}", host.0)
        });
        self.after_input(host)?;
        self.recheck_net(net);
        Ok(())
    }

    fn stop_node(&mut self, host: HostId, graceful: bool) -> Result<(), SimError> {
        if !self.is_running(host) {
            return Ok(());
        }
        if graceful {
            let now = self.instant();
            if let Some(node) = self.slot_mut(host).and_then(|s| s.node.as_deref_mut()) {
                node.shutdown(now);
            }
            self.after_input(host)?;
            // The driver saves once more on the way out.
            let at = self.now();
            if let Some(slot) = self.slot_mut(host) {
                if let Some(cluster) = slot.node.as_mut().and_then(|n| n.cluster_mut()) {
                    cluster
                        .persist_to(&mut slot.disk)
                        .map_err(|e| SimError::Invariant {
                            at,
                            host,
                            what: format!("saving the ledger: {e}"),
                        })?;
                }
            }
        }
        let Some(slot) = self.slot_mut(host) else {
            return Ok(());
        };
        slot.node = None;
        slot.wake_at = None;
        let was_converged = std::mem::take(&mut slot.knows_all);
        slot.metrics.knows_all_since = None;
        let net = slot.net;
        if was_converged {
            self.converged -= 1;
        }
        self.running -= 1;
        self.nets[net.0].running.remove(&host);
        let t = self.now;
        self.trace
            .record(&[TAG_STOP, t, host.0 as u64, u64::from(graceful)], || {
                format!("{t} stop {} graceful={graceful}", host.0)
            });
        self.recheck_net(net);
        Ok(())
    }

    fn wake(&mut self, host: HostId, incarnation: u64) -> Result<(), SimError> {
        let now_ns = self.now;
        let max = self.config.max_wakes_per_instant;
        let Some(slot) = self.slot_mut(host) else {
            return Ok(());
        };
        if slot.incarnation != incarnation || slot.wake_at != Some(now_ns) || slot.node.is_none() {
            return Ok(());
        }
        slot.wake_at = None;
        if slot.wake_instant == now_ns {
            slot.wakes_at_instant += 1;
        } else {
            slot.wake_instant = now_ns;
            slot.wakes_at_instant = 1;
        }
        if slot.wakes_at_instant > max {
            let wakes = slot.wakes_at_instant;
            return Err(SimError::BusyLoop {
                at: self.now(),
                host,
                wakes,
            });
        }
        let now = self.instant();
        let unix = self.unix_ms(host);
        if let Some(node) = self.slot_mut(host).and_then(|s| s.node.as_deref_mut()) {
            node.handle_timeout(now, unix);
        }
        self.after_input(host)
    }

    fn deliver(&mut self, packet: Packet) -> Result<(), SimError> {
        let Packet {
            src_host,
            target,
            from,
            dst,
            bytes,
        } = packet;
        let (host, dst) = match target {
            Target::Host(h) => (h, dst),
            Target::Nat(subnet) => match self.net.nat_inbound(self.now, subnet, from, dst) {
                Some(x) => x,
                None => return Ok(()),
            },
        };
        let kind = PacketKind::of(&bytes);
        let Some(state) = self.hosts.get_mut(host.0) else {
            return Ok(());
        };
        let listening = match &state.slot {
            None => true,
            Some(slot) => {
                slot.node.is_some()
                    && (dst.port() == OVERLAY_PORT
                        || (dst.port() == BEACON_PORT && slot.settings.lan))
            }
        };
        if !listening {
            self.net.stats.no_listener += 1;
            return Ok(());
        }
        self.net.stats.delivered += 1;
        let t = self.now;
        let content = if kind == PacketKind::Quic {
            0
        } else {
            trace::hash_bytes(&bytes)
        };
        let len = bytes.len();
        self.trace.record(
            &[
                TAG_DELIVER,
                t,
                src_host.0 as u64,
                host.0 as u64,
                len as u64,
                kind.index() as u64,
                content,
            ],
            || {
                format!(
                    "{t} deliver {} -> {} {len} {kind:?} {content:x}",
                    src_host.0, host.0
                )
            },
        );
        let limit = self.config.capture_limit;
        let Some(slot) = state.slot.as_mut() else {
            if state.inbox.len() < limit {
                let to = Destination::Addr(dst);
                state.inbox.push(Captured {
                    at: Duration::from_nanos(t),
                    src_host,
                    from,
                    to,
                    kind,
                    bytes,
                });
            }
            return Ok(());
        };
        slot.metrics.count_received(kind, len);
        let now = self.base + Duration::from_nanos(t);
        let unix = self.unix_ms(host);
        if let Some(node) = self.slot_mut(host).and_then(|s| s.node.as_deref_mut()) {
            node.handle_datagram(now, unix, from, None, &bytes);
        }
        self.after_input(host)
    }

    /// Drains a node's transmits and events, checks it, and schedules its next wake-up.
    fn after_input(&mut self, host: HostId) -> Result<(), SimError> {
        let now = self.instant();
        let Some(mut node) = self.slot_mut(host).and_then(|s| s.node.take()) else {
            return Ok(());
        };
        let Some(src_ip) = self.net.ip(host) else {
            return Ok(());
        };
        // Saved before anything is sent, as the driver does.
        if let Some(cluster) = node.cluster_mut() {
            if cluster.save_due(now) {
                let at = self.now();
                if let Some(slot) = self.slot_mut(host) {
                    if let Err(e) = cluster.persist_to(&mut slot.disk) {
                        slot.node = Some(node);
                        return Err(SimError::Invariant {
                            at,
                            host,
                            what: format!("saving the ledger: {e}"),
                        });
                    }
                }
            }
        }
        let mut buf = std::mem::take(&mut self.buf);
        while let Some(t) = node.poll_transmit(now, &mut buf) {
            let payload = buf.get(..t.len).unwrap_or(&buf);
            match (t.destination, t.segment_size) {
                (Destination::Addr(_), Some(size)) if size > 0 && size < payload.len() => {
                    for segment in payload.chunks(size) {
                        self.send(host, src_ip, t.destination, segment);
                    }
                }
                _ => self.send(host, src_ip, t.destination, payload),
            }
        }
        self.buf = buf;
        let mut events = std::mem::take(&mut self.node_events);
        events.extend(std::iter::from_fn(|| node.poll_event()));
        let next = node.poll_timeout();
        let members = node.members().len();
        let incarnation = {
            let Some(slot) = self.slot_mut(host) else {
                return Ok(());
            };
            slot.node = Some(node);
            slot.incarnation
        };
        let mut result = Ok(());
        let mut members_changed = false;
        for event in events.drain(..) {
            members_changed |= matches!(
                event,
                NodeEvent::MemberDiscovered { .. } | NodeEvent::MemberLost { .. }
            );
            if result.is_ok() {
                result = self.on_event(host, event);
            }
        }
        self.node_events = events;
        result?;
        if let (Some(slot), Some(node)) = (self.slot(host), self.node(host)) {
            if members > slot.settings.max_members {
                return self.check_bounds(host, slot, node);
            }
        }
        if members_changed {
            self.recheck(host);
        }
        if let Some(t) = next {
            let at = nanos(t.saturating_duration_since(self.base)).max(self.now);
            let Some(slot) = self.slot_mut(host) else {
                return Ok(());
            };
            if slot.wake_at != Some(at) {
                slot.wake_at = Some(at);
                self.push(at, Item::Wake { host, incarnation });
            }
        }
        Ok(())
    }

    fn on_event(&mut self, host: HostId, event: NodeEvent) -> Result<(), SimError> {
        let Some(net) = self.slot(host).map(|s| s.net) else {
            return Ok(());
        };
        let (variant, peer) = match &event {
            NodeEvent::MemberDiscovered { peer, .. } => (1, Some(*peer)),
            NodeEvent::MemberLost { peer } => (2, Some(*peer)),
            NodeEvent::PeerConnected { peer, .. } => (3, Some(*peer)),
            NodeEvent::PeerDisconnected { peer, .. } => (4, Some(*peer)),
            NodeEvent::ObservedAddr(_) => (5, None),
            NodeEvent::Cluster(_) => (6, None),
        };
        let peer_word = peer.map_or(0, |p| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&p.0[..8]);
            u64::from_le_bytes(w)
        });
        let t = self.now;
        self.trace
            .record(&[TAG_EVENT, t, host.0 as u64, variant, peer_word], || {
                format!("{t} event {} {event:?}", host.0)
            });
        if let NodeEvent::Cluster(ClusterEvent::RoleAssigned { role }) = &event {
            if role == names::ROLE_MASTER || role == names::ROLE_MASTER_CLUSTERINIT {
                self.check_single_master(host)?;
            }
        }
        match &event {
            NodeEvent::MemberDiscovered { peer, .. } => {
                self.check_same_net(host, net, peer, "member discovered")?
            }
            NodeEvent::PeerConnected { peer, .. } => {
                self.check_same_net(host, net, peer, "peer connected")?
            }
            _ => {}
        }
        if let Some(slot) = self.slot_mut(host) {
            let m = &mut slot.metrics;
            match &event {
                NodeEvent::MemberDiscovered { .. } => m.members_discovered += 1,
                NodeEvent::MemberLost { .. } => m.members_lost += 1,
                NodeEvent::PeerConnected { .. } => m.connections += 1,
                NodeEvent::PeerDisconnected { .. } => m.disconnections += 1,
                NodeEvent::ObservedAddr(_) | NodeEvent::Cluster(_) => {}
            }
        }
        if self.config.record_events {
            self.events.push((self.now(), host, event));
        }
        Ok(())
    }

    /// A node took a master role: no other node of its `network_id` may ever have.
    fn check_single_master(&mut self, host: HostId) -> Result<(), SimError> {
        let Some(settings) = self.slot(host).and_then(|s| s.cluster.as_ref()) else {
            return Ok(());
        };
        let (id, uuid) = (settings.network_id.clone(), settings.uuid.clone());
        match self.masters.get(&id) {
            Some(m) if *m != uuid && self.config.allow_second_masters => {
                self.second_masters_taken += 1;
                Ok(())
            }
            Some(m) if *m != uuid => Err(SimError::Invariant {
                at: self.now(),
                host,
                what: format!("second master in network_id {id}: {uuid} after {m}"),
            }),
            _ => {
                self.masters.insert(id, uuid);
                Ok(())
            }
        }
    }

    /// Whether `host` knows every running member of its network; updates the counters.
    fn recheck(&mut self, host: HostId) {
        let Some(slot) = self.slot(host) else {
            return;
        };
        let knows = match slot.node.as_deref() {
            None => return,
            Some(node) => {
                let running = &self.nets[slot.net.0].running;
                let members = node.members();
                members.len() + 1 >= running.len()
                    && running.iter().all(|h| {
                        *h == host
                            || self
                                .slot(*h)
                                .is_some_and(|s| members.get(&s.peer).is_some())
                    })
            }
        };
        let now = self.now();
        let Some(slot) = self.slot_mut(host) else {
            return;
        };
        if knows == slot.knows_all {
            return;
        }
        slot.knows_all = knows;
        if knows {
            slot.metrics.knows_all_since = Some(now);
            slot.metrics.first_knew_all.get_or_insert(now);
            self.converged += 1;
        } else {
            slot.metrics.knows_all_since = None;
            self.converged -= 1;
        }
    }

    fn recheck_net(&mut self, net: NetId) {
        let hosts: Vec<HostId> = self.nets[net.0].running.iter().copied().collect();
        for host in hosts {
            self.recheck(host);
        }
    }

    /// Sends one packet from a node's socket.
    fn send(&mut self, host: HostId, src_ip: Ipv4Addr, to: Destination, payload: &[u8]) {
        let kind = PacketKind::of(payload);
        if let Some(slot) = self.slot_mut(host) {
            slot.metrics.count_sent(kind, payload);
        }
        let port = match to {
            Destination::Addr(_) => OVERLAY_PORT,
            Destination::LanBroadcast => BEACON_PORT,
        };
        self.route(host, SocketAddr::from((src_ip, port)), to, payload);
    }

    /// Puts a packet on the network.
    fn route(&mut self, host: HostId, from: SocketAddr, to: Destination, payload: &[u8]) {
        if self
            .net
            .subnet_of(host)
            .is_some_and(|s| self.mirrored.contains(&s))
            && self.captured.len() < self.config.capture_limit
        {
            self.captured.push(Captured {
                at: self.now(),
                src_host: host,
                from,
                to,
                kind: PacketKind::of(payload),
                bytes: payload.to_vec(),
            });
        }
        let mut legs = std::mem::take(&mut self.legs);
        legs.clear();
        let dst = match to {
            Destination::Addr(dst) => {
                // Dropped packets are counted in the network stats.
                let _ = self
                    .net
                    .unicast(&mut self.rng, self.now, host, from, dst, &mut legs);
                dst
            }
            Destination::LanBroadcast => {
                self.net.broadcast(&mut self.rng, host, from, &mut legs);
                SocketAddr::from((Ipv4Addr::BROADCAST, BEACON_PORT))
            }
        };
        for leg in legs.drain(..) {
            let packet = Packet {
                src_host: host,
                target: leg.target,
                from: leg.from,
                dst,
                bytes: payload.to_vec(),
            };
            self.push(
                self.now.saturating_add(leg.delay),
                Item::Deliver(Box::new(packet)),
            );
        }
        self.legs = legs;
    }
}
