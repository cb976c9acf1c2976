//! Kademlia-lite: a small sans-IO DHT that lets members of a network find each other through
//! any DHT node, without those nodes reading or forging what members publish (sealed records).
//! DHT nodes do see senders' peer ids and source addresses, and which of them use which
//! (opaque, token-derived) rendezvous key: see the README's overlay section.
//!
//! No sockets and no clocks: every mutator takes `now` (and `unix_secs` where wall time
//! matters), randomness comes from the [`Rng`] given at construction, so the same seed replays
//! the same trace. DHT messages are plain UDP datagrams on the overlay socket, outside QUIC,
//! because a node serves the DHT for networks whose token it does not hold; their first byte is
//! [`PACKET_TYPE`] (0x21, bit 0x40 clear, so never a QUIC packet). See [`message`] for the wire
//! layout and the trust model, [`records`] for sealed rendezvous records and the store,
//! [`routing`] for ids and k-buckets.
//!
//! # Driving it
//!
//! Build with [`Kad::new`], add bootstrap peers ([`Kad::add_bootstrap`]) and LAN neighbours
//! ([`Kad::add_peer`]), optionally [`Kad::set_rendezvous`], then call [`Kad::handle_timeout`]
//! once to start. Then loop: feed every datagram whose first byte is [`PACKET_TYPE`] to
//! [`Kad::handle_packet`], call [`Kad::handle_timeout`] when [`Kad::poll_timeout`] is reached,
//! and after each call drain [`Kad::poll_transmit`] and [`Kad::poll_event`]. Commands
//! ([`Kad::find_node`], [`Kad::lookup`], [`Kad::publish`], `add_*`) only queue work; they make
//! `poll_timeout` return the last `now` seen, so the next `handle_timeout` starts them.
//!
//! # Parameters
//!
//! - k = 8 ([`DEFAULT_K`], see there), alpha = 3 parallel requests per lookup, per-request
//!   timeout 1 s with up to 3 attempts (a LAN or Internet round trip is well under 1 s; three
//!   attempts keep the miss rate under 1% at 10% loss each way), at most 8 lookups at once, a
//!   lookup stops when its k closest live candidates have answered, or after 30 s or 128
//!   messages.
//! - Records live 15 min by default (capped at 1 h) and are re-published every TTL/2, so one
//!   lost republish never lets a record lapse, and a member that vanishes is forgotten within
//!   15 min. Buckets not looked up for 15 min are refreshed.
//! - Rendezvous: publish under the current DHT window's key (and again on window change), look
//!   up the previous, current and next windows' keys every 60 s. A rendezvous lookup reads one
//!   VALUE page from each node holding records, from a random record on (a sample: at most about
//!   k datagrams of records per lookup whatever the members, so a member's idle upkeep grows
//!   with the lookups' O(log n) hops only); [`Kad::lookup`] reads every page (up to 8 per node).
//!
//! # Memory bound
//!
//! Per node, whatever the peers send: routing table ≤ 256 × (k + 1) entries (≈ 480 KiB at
//! k = 20, a few KiB in practice); record store ≤ 4 MiB accounted ([`records::StoreLimits`]);
//! pending requests ≤ 256 + one eviction ping per bucket + k PUTs per publication round, each
//! keeping its ≤ 1200-byte datagram for retransmission (< 1 MiB); ≤ 8 lookups of ≤ 4k
//! candidates and ≤ 256 record digests each; ≤ 64 queued commands; ≤ 32 own publications of
//! ≤ 1 KiB; rate-limit tables of 1,024 sources each; ≤ 1,024 queued datagrams (≈ 1.2 MiB) and
//! 1,024 queued events (most carry one datagram's records; dropped and counted beyond); ≤ 1,024
//! rendezvous members remembered. About 8 MiB in the worst case, well within a 512 MB board.
//!
//! # Trust
//!
//! DHT messages are unauthenticated, as in public DHTs; what that allows (Sybil ids, eclipse,
//! dropped or replayed records) and what still holds (records sealed and authenticated under
//! token keys, so DHT nodes can neither read nor forge them) is written down in [`message`] and
//! [`records`].

mod limit;
mod lookup;
pub mod message;
pub mod records;
mod rendezvous;
pub mod routing;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

pub use limit::Rate;
use lookup::{Goal, Lookup, State};
pub use message::{
    Body, MAX_DATAGRAM, MAX_RECORD_LEN, Message, MessageError, NodeInfo, PACKET_TYPE, PutStatus,
    is_dht_packet,
};
pub use records::{RecordError, RendezvousRecord, Store, StoreLimits, open_record, seal_record};
use rendezvous::Rendezvous;
pub use routing::{DEFAULT_K, Entry, Insert, MAX_K, NodeId, RoutingTable};

use crate::identity::PeerId;
use crate::rng::Rng;
use crate::token::Window;

/// Requests sent by one lookup at most (retries and pages included).
const MAX_LOOKUP_MESSAGES: u32 = 128;
/// A lookup gives up after this long.
const LOOKUP_DEADLINE: Duration = Duration::from_secs(30);
/// First republish delay after a record is published (doubling up to TTL/2).
const FIRST_REPUBLISH: Duration = Duration::from_secs(30);
/// VALUE pages fetched from one node in one lookup.
const MAX_PAGES: u32 = 8;
/// Record digests remembered per GET lookup (to report each record once).
const MAX_SEEN_RECORDS: usize = 256;
/// Commands waiting for a lookup slot.
const MAX_QUEUED: usize = 64;
/// Records this node publishes itself.
const MAX_PUBLISHED: usize = 32;
/// Bootstrap addresses remembered.
const MAX_BOOTSTRAP: usize = 64;
/// Datagrams waiting for `poll_transmit`.
const MAX_TRANSMITS: usize = 1024;
/// Events waiting for `poll_event`.
const MAX_EVENTS: usize = 1024;
/// Observed-address reports remembered for the vote.
const OBSERVED_REPORTS: usize = 16;
/// Wait before a bootstrap peer that did not answer is pinged again, during the first
/// [`EAGER_BOOTSTRAP`] after the first ping (while the node's discovery gate may still be
/// waiting for it); then doubled after each unanswered round up to [`MAX_BOOTSTRAP_RETRY`].
const FIRST_BOOTSTRAP_RETRY: Duration = Duration::from_secs(2);
/// See [`FIRST_BOOTSTRAP_RETRY`].
const EAGER_BOOTSTRAP: Duration = Duration::from_secs(20);
/// Longest wait between pings of a bootstrap peer that does not answer. Such a peer is retried
/// for as long as it does not answer (one ping and its two retransmits per period): a site that
/// booted with its uplink down, or before the bootstrap node, reaches the DHT within this long
/// of the path coming up (then members dial within `MAX_DIAL_BACKOFF`, 10 s: a site cut off
/// finds the others within 30 s of its path coming back, handshakes included).
pub const MAX_BOOTSTRAP_RETRY: Duration = Duration::from_secs(10);

/// Tunables; [`Default`] gives the values argued for in the module doc.
#[derive(Clone, Debug)]
pub struct KadSettings {
    /// Bucket size and replication factor (clamped to 1..=[`MAX_K`]).
    pub k: usize,
    /// Parallel requests per lookup (at least 1).
    pub alpha: usize,
    /// Time to wait for a reply before retrying.
    pub request_timeout: Duration,
    /// Sends per request, first one included (at least 1).
    pub max_attempts: u32,
    /// Lifetime of records we publish (capped at one hour); re-published every half of it.
    pub record_ttl: Duration,
    /// Buckets not looked up for this long are refreshed.
    pub refresh_interval: Duration,
    /// How often the rendezvous keys are looked up.
    pub rendezvous_interval: Duration,
    /// Retry delay for bootstrap pings and for publications no remote node stored.
    pub retry_interval: Duration,
    /// Requests in flight (eviction pings come on top, at most one per bucket).
    pub max_pending: usize,
    /// Lookups running at once.
    pub max_lookups: usize,
    /// Inbound request rate per source IP.
    pub request_rate: Rate,
    /// Source IPs tracked by the request rate limit.
    pub max_request_sources: usize,
    /// Caps of the record store.
    pub store: StoreLimits,
}

impl Default for KadSettings {
    fn default() -> Self {
        KadSettings {
            k: DEFAULT_K,
            alpha: 3,
            request_timeout: Duration::from_secs(1),
            max_attempts: 3,
            record_ttl: Duration::from_secs(15 * 60),
            refresh_interval: Duration::from_secs(15 * 60),
            rendezvous_interval: Duration::from_secs(60),
            retry_interval: Duration::from_secs(30),
            max_pending: 256,
            max_lookups: 8,
            request_rate: Rate {
                burst: 100,
                per_minute: 1200,
            },
            max_request_sources: 1024,
            store: StoreLimits::default(),
        }
    }
}

/// What the DHT reports to its owner.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum KadEvent {
    /// Peers report seeing us at this address (reported when it changes, once two distinct
    /// peers agree, or the only peer that answered says so). Unauthenticated: corroborate.
    ObservedAddr(SocketAddr),
    /// Records found under `key` by a lookup (each record reported once per lookup).
    Records {
        /// The key looked up.
        key: [u8; 32],
        /// Sealed records, as stored.
        records: Vec<Vec<u8>>,
    },
    /// A [`Kad::lookup`] (or a rendezvous lookup) finished.
    LookupDone {
        /// The key looked up.
        key: [u8; 32],
        /// Longest referral chain to an answering node.
        hops: u32,
        /// Requests sent.
        messages: u32,
    },
    /// A [`Kad::find_node`] finished.
    ClosestPeers {
        /// The id looked up.
        target: NodeId,
        /// The k closest peers that answered, closest first.
        peers: Vec<NodeInfo>,
        /// Longest referral chain to an answering node.
        hops: u32,
        /// Requests sent.
        messages: u32,
    },
    /// A publication round finished.
    Published {
        /// The key published under.
        key: [u8; 32],
        /// Nodes that stored the record, this node included when it is among the k closest.
        replicas: usize,
    },
    /// Another member of our network announced itself under a rendezvous key.
    MemberFound {
        /// Its peer id (to be proven by the overlay handshake).
        peer: PeerId,
        /// Where it says it is reachable.
        addrs: Vec<SocketAddr>,
    },
}

/// Why a datagram was not processed (the driver logs and counts these and goes on).
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum KadError {
    /// Not a valid DHT message.
    Decode(MessageError),
    /// The source sent more requests than its rate allows.
    RateLimited,
    /// The message claims our own peer id.
    OwnId,
    /// A reply to no request of ours (late, duplicate or forged).
    UnknownTransaction,
    /// A reply with a known transaction id from another address than the request went to.
    WrongSource {
        /// Where the request went.
        expected: SocketAddr,
    },
    /// A reply of the wrong kind for its request.
    UnexpectedReply,
    /// The reply came from another peer than the one we asked (treated as its failure).
    WrongPeer,
}

impl fmt::Display for KadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Decode(e) => write!(f, "{e}"),
            Self::RateLimited => f.write_str("DHT request rate limit exceeded"),
            Self::OwnId => f.write_str("DHT message claims our own peer id"),
            Self::UnknownTransaction => f.write_str("DHT reply to no pending request"),
            Self::WrongSource { expected } => {
                write!(f, "DHT reply from another address than {expected}")
            }
            Self::UnexpectedReply => f.write_str("DHT reply of the wrong kind"),
            Self::WrongPeer => f.write_str("DHT reply from another peer than asked"),
        }
    }
}

impl std::error::Error for KadError {}

/// Why a command was refused.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum CommandError {
    /// Too many commands are waiting; try again later.
    QueueFull,
    /// The record is empty or over [`MAX_RECORD_LEN`] bytes.
    BadRecordLength(usize),
    /// This node already publishes the maximum number of keys.
    TooManyPublications,
}

impl fmt::Display for CommandError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::QueueFull => f.write_str("DHT command queue is full"),
            Self::BadRecordLength(n) => {
                write!(f, "record of {n} bytes (1..={MAX_RECORD_LEN} allowed)")
            }
            Self::TooManyPublications => write!(f, "at most {MAX_PUBLISHED} keys can be published"),
        }
    }
}

impl std::error::Error for CommandError {}

/// Counters for logs and metrics.
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
pub struct KadStats {
    /// Requests sent (retries included).
    pub requests_sent: u64,
    /// Requests answered.
    pub requests_served: u64,
    /// Requests that got no reply after every attempt.
    pub timeouts: u64,
    /// Datagrams that did not decode.
    pub malformed: u64,
    /// Requests dropped by the per-source rate limit.
    pub rate_limited: u64,
    /// Replies matching no pending request.
    pub unsolicited: u64,
    /// Datagrams dropped because the transmit queue was full.
    pub transmits_dropped: u64,
    /// Events dropped because the event queue was full.
    pub events_dropped: u64,
    /// Records found under one of our rendezvous keys that did not open: planted by a DHT node
    /// without the token, sealed for another window, or tampered with.
    pub records_rejected: u64,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Expect {
    Pong,
    Nodes,
    NodesOrValue,
    PutAck,
}

impl Expect {
    fn matches(self, body: &Body) -> bool {
        matches!(
            (self, body),
            (Expect::Pong, Body::Pong { .. })
                | (Expect::Nodes | Expect::NodesOrValue, Body::Nodes { .. })
                | (Expect::NodesOrValue, Body::Value { .. })
                | (Expect::PutAck, Body::PutAck { .. })
        )
    }
}

#[derive(Clone, Copy, Debug)]
enum Purpose {
    BootstrapPing,
    EvictionPing,
    Lookup {
        lookup: u64,
        node: NodeId,
        offset: u16,
    },
    Put {
        batch: u64,
    },
}

#[derive(Debug)]
struct Pending {
    to: SocketAddr,
    peer: Option<PeerId>,
    deadline: Instant,
    attempts: u32,
    bytes: Vec<u8>,
    purpose: Purpose,
    expect: Expect,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Command {
    FindNode {
        target: NodeId,
        report: bool,
    },
    /// A GET; `sample` reads one VALUE page per holder at a random offset (see
    /// [`lookup::Lookup::sample`]) instead of every page.
    Get {
        key: [u8; 32],
        sample: bool,
    },
    Publish {
        key: [u8; 32],
    },
}

impl Command {
    fn target(&self) -> (NodeId, Goal) {
        match *self {
            Command::FindNode { target, report } => (target, Goal::FindNode { report }),
            Command::Get { key, .. } => (NodeId(key), Goal::Get),
            Command::Publish { key } => (NodeId(key), Goal::Publish),
        }
    }
}

#[derive(Debug)]
struct Publication {
    record: Vec<u8>,
    ttl: Duration,
    /// When to publish again; `None` while a round is running.
    next: Option<Instant>,
    /// Set for our rendezvous record: it is re-sealed before every round.
    window: Option<Window>,
    /// Rounds done with this record; the first republishes come sooner (see `finish_batch`).
    rounds: u32,
}

#[derive(Debug)]
struct PutBatch {
    key: [u8; 32],
    outstanding: usize,
    stored: usize,
    remote: usize,
}

/// The Kademlia-lite state machine of one node (see the module doc for the call order).
pub struct Kad {
    me: PeerId,
    my_id: NodeId,
    rng: Rng,
    settings: KadSettings,
    routing: RoutingTable,
    store: Store,
    requests: limit::Limiter<IpAddr>,
    pending: BTreeMap<u64, Pending>,
    deadlines: BTreeSet<(Instant, u64)>,
    lookups: BTreeMap<u64, Lookup>,
    next_lookup_id: u64,
    queued: VecDeque<Command>,
    batches: BTreeMap<u64, PutBatch>,
    next_batch_id: u64,
    published: BTreeMap<[u8; 32], Publication>,
    bootstrap: Vec<(SocketAddr, Option<PeerId>)>,
    next_bootstrap: Option<Instant>,
    /// Wait before the next ping of the bootstrap peers that have not answered.
    bootstrap_retry: Duration,
    /// When a bootstrap peer last answered for the first time (or again after it was dropped
    /// from the routing table): the DHT this node sees grew, so earlier rendezvous rounds do not
    /// count as converged any more.
    bootstrap_reached_at: Option<Instant>,
    /// The first bootstrap ping (or the first after a bootstrap peer was lost).
    bootstrap_first_ping: Option<Instant>,
    /// Bootstrap addresses that answered a request of ours.
    bootstrap_answered: BTreeSet<SocketAddr>,
    joined: bool,
    next_refresh: Option<Instant>,
    to_ping: Vec<Entry>,
    rendezvous: Option<Rendezvous>,
    observed: VecDeque<(IpAddr, SocketAddr)>,
    observed_reported: Option<SocketAddr>,
    transmits: VecDeque<(SocketAddr, Vec<u8>)>,
    events: VecDeque<KadEvent>,
    last_now: Option<Instant>,
    last_unix: u64,
    wake: bool,
    timer: Option<Instant>,
    stats: KadStats,
}

impl fmt::Debug for Kad {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Kad")
            .field("me", &self.me)
            .field("peers", &self.routing.len())
            .field("records", &self.store.len())
            .field("pending", &self.pending.len())
            .field("lookups", &self.lookups.len())
            .finish_non_exhaustive()
    }
}

impl Kad {
    /// A node with identity `me`, drawing randomness from `rng`.
    #[must_use]
    pub fn new(me: PeerId, rng: Rng, settings: KadSettings) -> Kad {
        let mut settings = settings;
        settings.k = settings.k.clamp(1, MAX_K);
        settings.alpha = settings.alpha.max(1);
        settings.max_attempts = settings.max_attempts.max(1);
        settings.max_lookups = settings.max_lookups.max(1);
        // Zero intervals would make `poll_timeout` fire at once forever.
        let second = Duration::from_secs(1);
        let max_ttl = Duration::from_secs(u64::from(message::MAX_TTL_SECS));
        settings.store.max_ttl = settings.store.max_ttl.clamp(second, max_ttl);
        settings.record_ttl = settings.record_ttl.clamp(second, settings.store.max_ttl);
        settings.request_timeout = settings.request_timeout.max(Duration::from_millis(10));
        settings.refresh_interval = settings.refresh_interval.max(second);
        settings.rendezvous_interval = settings.rendezvous_interval.max(second);
        settings.retry_interval = settings.retry_interval.max(second);
        let my_id = NodeId::of_peer(&me);
        Kad {
            me,
            my_id,
            rng,
            routing: RoutingTable::new(my_id, settings.k),
            store: Store::new(settings.store),
            requests: limit::Limiter::new(settings.request_rate, settings.max_request_sources),
            settings,
            pending: BTreeMap::new(),
            deadlines: BTreeSet::new(),
            lookups: BTreeMap::new(),
            next_lookup_id: 0,
            queued: VecDeque::new(),
            batches: BTreeMap::new(),
            next_batch_id: 0,
            published: BTreeMap::new(),
            bootstrap: Vec::new(),
            next_bootstrap: None,
            bootstrap_retry: FIRST_BOOTSTRAP_RETRY,
            bootstrap_reached_at: None,
            bootstrap_answered: BTreeSet::new(),
            bootstrap_first_ping: None,
            joined: false,
            next_refresh: None,
            to_ping: Vec::new(),
            rendezvous: None,
            observed: VecDeque::new(),
            observed_reported: None,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            last_now: None,
            last_unix: 0,
            wake: true,
            timer: None,
            stats: KadStats::default(),
        }
    }

    // ---- getters ----

    /// Our peer id.
    #[must_use]
    pub fn peer_id(&self) -> PeerId {
        self.me
    }

    /// Our node id.
    #[must_use]
    pub fn node_id(&self) -> NodeId {
        self.my_id
    }

    /// The routing table.
    #[must_use]
    pub fn routing_table(&self) -> &RoutingTable {
        &self.routing
    }

    /// The records held for others.
    #[must_use]
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Counters.
    #[must_use]
    pub fn stats(&self) -> KadStats {
        self.stats
    }

    /// True once the first self-lookup finished (the node knows its neighbourhood).
    #[must_use]
    pub fn is_joined(&self) -> bool {
        self.joined
    }

    /// Configured bootstrap peers, and how many of them are in the routing table now (they
    /// answered and were not dropped since).
    #[must_use]
    pub fn bootstrap_reached(&self) -> (usize, usize) {
        let reached = self
            .bootstrap
            .iter()
            .filter(|(addr, _)| self.bootstrap_is_reached(addr))
            .count();
        (reached, self.bootstrap.len())
    }

    /// When a bootstrap peer last joined the routing table.
    #[must_use]
    pub fn bootstrap_reached_at(&self) -> Option<Instant> {
        self.bootstrap_reached_at
    }

    /// The bootstrap peer at `addr` answered us and is in the routing table.
    fn bootstrap_is_reached(&self, addr: &SocketAddr) -> bool {
        self.bootstrap_answered.contains(addr) && self.in_routing(addr)
    }

    /// Requests waiting for a reply.
    #[must_use]
    pub fn pending_requests(&self) -> usize {
        self.pending.len()
    }

    // ---- commands ----

    /// Adds a bootstrap peer (a configured address, with its peer id when known). The node
    /// pings it whenever the routing table is empty.
    pub fn add_bootstrap(&mut self, addr: SocketAddr, peer: Option<PeerId>) {
        if peer == Some(self.me) {
            return;
        }
        if let Some(known) = self.bootstrap.iter_mut().find(|(a, _)| *a == addr) {
            known.1 = peer.or(known.1);
        } else if self.bootstrap.len() < MAX_BOOTSTRAP {
            self.bootstrap.push((addr, peer));
        }
        if let Some(peer) = peer {
            self.add_peer(peer, addr);
        }
        self.next_bootstrap = None;
        self.wake = true;
    }

    /// Adds a peer learned elsewhere (a LAN beacon, an overlay connection).
    pub fn add_peer(&mut self, peer: PeerId, addr: SocketAddr) {
        if let Insert::PingOldest { oldest } = self.routing.insert(peer, addr) {
            self.to_ping.push(oldest);
        }
        self.wake = true;
    }

    /// Starts an iterative FIND_NODE for `target`; ends with [`KadEvent::ClosestPeers`].
    pub fn find_node(&mut self, target: NodeId) -> Result<(), CommandError> {
        self.command(Command::FindNode {
            target,
            report: true,
        })
    }

    /// Starts an iterative GET for `key`; reports [`KadEvent::Records`] as they arrive, then
    /// [`KadEvent::LookupDone`].
    pub fn lookup(&mut self, key: [u8; 32]) -> Result<(), CommandError> {
        self.command(Command::Get { key, sample: false })
    }

    /// Publishes `record` under `key` on the k closest nodes, and again every TTL/2 until
    /// [`Kad::unpublish`]. A new record for the same key replaces the previous one.
    pub fn publish(&mut self, key: [u8; 32], record: Vec<u8>) -> Result<(), CommandError> {
        if record.is_empty() || record.len() > MAX_RECORD_LEN {
            return Err(CommandError::BadRecordLength(record.len()));
        }
        if !self.published.contains_key(&key) && self.published.len() >= MAX_PUBLISHED {
            return Err(CommandError::TooManyPublications);
        }
        self.command(Command::Publish { key })?;
        let ttl = self.settings.record_ttl;
        self.published.insert(
            key,
            Publication {
                record,
                ttl,
                next: None,
                window: None,
                rounds: 0,
            },
        );
        Ok(())
    }

    /// Stops re-publishing `key` (stored copies expire with their TTL). True if it was published.
    pub fn unpublish(&mut self, key: &[u8; 32]) -> bool {
        self.published.remove(key).is_some()
    }

    /// Queues a command from the owner: the next `handle_timeout` (due at once) starts it.
    fn command(&mut self, cmd: Command) -> Result<(), CommandError> {
        self.wake = true;
        self.enqueue(cmd)
    }

    fn enqueue(&mut self, cmd: Command) -> Result<(), CommandError> {
        let (target, goal) = cmd.target();
        let running = self
            .lookups
            .values()
            .any(|l| l.target == target && l.goal == goal);
        if running || self.queued.contains(&cmd) {
            return Ok(());
        }
        if self.queued.len() >= MAX_QUEUED {
            return Err(CommandError::QueueFull);
        }
        self.queued.push_back(cmd);
        Ok(())
    }

    // ---- handle_* ----

    /// Processes one datagram from `from` (its first byte is [`PACKET_TYPE`]). Errors are for
    /// logging and counting; the state stays consistent whatever the input.
    pub fn handle_packet(
        &mut self,
        now: Instant,
        unix_secs: u64,
        from: SocketAddr,
        datagram: &[u8],
    ) -> Result<(), KadError> {
        self.last_now = Some(now);
        self.last_unix = unix_secs;
        let res = match Message::decode(datagram) {
            Err(e) => {
                self.stats.malformed += 1;
                Err(KadError::Decode(e))
            }
            Ok(msg) if msg.sender == self.me => Err(KadError::OwnId),
            Ok(msg) if msg.body.is_request() => self.serve(now, from, msg),
            Ok(msg) => self.on_reply(now, from, msg),
        };
        self.progress(now);
        res
    }

    /// Runs timers: retries and request timeouts, record expiry, bootstrap, bucket refresh,
    /// republishing, rendezvous, and queued commands.
    pub fn handle_timeout(&mut self, now: Instant, unix_secs: u64) {
        self.last_now = Some(now);
        self.last_unix = unix_secs;
        self.wake = false;
        self.expire_requests(now);
        self.store.expire(now);
        self.requests.prune(now, Duration::from_secs(600));
        // Lookups past their deadline.
        let late: Vec<u64> = self
            .lookups
            .iter()
            .filter(|(_, l)| l.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in late {
            self.finish_lookup(id, now);
        }
        if self.routing.is_empty() {
            // Alone again: join afresh (self-lookup, refresh) once someone answers.
            self.joined = false;
        }
        // Bootstrap peers that are not in the routing table are pinged again and again (capped
        // back-off), even when LAN neighbours fill the table: they are the way out of the LAN.
        if self.bootstrap_wanted() && self.next_bootstrap.is_none_or(|t| t <= now) {
            self.ping_bootstrap(now);
        }
        if self.joined && self.next_refresh.is_none_or(|t| t <= now) {
            self.refresh(now);
        }
        let due: Vec<[u8; 32]> = self
            .published
            .iter()
            .filter(|(_, p)| p.window.is_none() && p.next.is_some_and(|t| t <= now))
            .map(|(k, _)| *k)
            .collect();
        for key in due {
            if self.enqueue(Command::Publish { key }).is_ok() {
                if let Some(p) = self.published.get_mut(&key) {
                    p.next = None;
                }
            }
        }
        self.rendezvous_tick(now, unix_secs);
        self.progress(now);
    }

    // ---- poll_* ----

    /// When [`Kad::handle_timeout`] should next run.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.wake {
            if let Some(now) = self.last_now {
                return Some(now);
            }
        }
        self.timer
    }

    /// The next datagram to send.
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<(SocketAddr, Vec<u8>)> {
        self.transmits.pop_front()
    }

    /// The next event.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<KadEvent> {
        self.events.pop_front()
    }

    // ---- internals ----

    /// Work that follows any input: eviction pings, joining, queued commands, lookups, timer.
    fn progress(&mut self, now: Instant) {
        for oldest in std::mem::take(&mut self.to_ping) {
            self.send_request(
                now,
                oldest.addr,
                Some(oldest.peer),
                Body::Ping,
                Purpose::EvictionPing,
                Expect::Pong,
                true,
            );
        }
        if !self.joined && !self.routing.is_empty() {
            let target = self.my_id;
            let _ = self.enqueue(Command::FindNode {
                target,
                report: false,
            });
        }
        self.start_queued(now);
        let ids: Vec<u64> = self.lookups.keys().copied().collect();
        for id in ids {
            self.drive(id, now);
        }
        self.recompute_timer();
    }

    fn recompute_timer(&mut self) {
        let mut t: Option<Instant> = None;
        let mut fold = |x: Option<Instant>| {
            if let Some(x) = x {
                t = Some(t.map_or(x, |t| t.min(x)));
            }
        };
        fold(self.deadlines.first().map(|(d, _)| *d));
        fold(self.lookups.values().map(|l| l.deadline).min());
        fold(self.store.next_expiry());
        if self.bootstrap_wanted() {
            fold(self.next_bootstrap);
        }
        if self.joined {
            fold(self.next_refresh);
        }
        // Our rendezvous record is re-published by the rendezvous tick, which waits for the
        // node to have joined (folding it in before would wake us at once, over and over).
        fold(
            self.published
                .values()
                .filter(|p| p.window.is_none() || self.joined)
                .filter_map(|p| p.next)
                .min(),
        );
        if let Some(rv) = &self.rendezvous {
            if self.joined {
                fold(rv.wake_at(self.last_now));
            }
        }
        if !self.queued.is_empty() && self.lookups.len() < self.settings.max_lookups {
            fold(self.last_now);
        }
        self.timer = t;
    }

    fn push_transmit(&mut self, to: SocketAddr, bytes: Vec<u8>) {
        if self.transmits.len() >= MAX_TRANSMITS {
            self.stats.transmits_dropped += 1;
        } else {
            self.transmits.push_back((to, bytes));
        }
    }

    fn push_event(&mut self, event: KadEvent) {
        if self.events.len() >= MAX_EVENTS {
            self.stats.events_dropped += 1;
        } else {
            self.events.push_back(event);
        }
    }

    /// Sends a request and tracks it. False when it could not be sent (cap reached or the
    /// message does not encode); the caller treats that as a failure.
    #[allow(clippy::too_many_arguments)]
    fn send_request(
        &mut self,
        now: Instant,
        to: SocketAddr,
        peer: Option<PeerId>,
        body: Body,
        purpose: Purpose,
        expect: Expect,
        over_cap: bool,
    ) -> bool {
        if !over_cap && self.pending.len() >= self.settings.max_pending {
            return false;
        }
        let mut txid = self.rng.next_u64();
        while self.pending.contains_key(&txid) {
            txid = self.rng.next_u64();
        }
        let Ok(bytes) = (Message {
            txid,
            sender: self.me,
            body,
        })
        .to_bytes() else {
            return false;
        };
        let deadline = now + self.settings.request_timeout;
        self.push_transmit(to, bytes.clone());
        self.stats.requests_sent += 1;
        self.pending.insert(
            txid,
            Pending {
                to,
                peer,
                deadline,
                attempts: 1,
                bytes,
                purpose,
                expect,
            },
        );
        self.deadlines.insert((deadline, txid));
        true
    }

    fn send_reply(&mut self, to: SocketAddr, txid: u64, body: Body) {
        if let Ok(bytes) = (Message {
            txid,
            sender: self.me,
            body,
        })
        .to_bytes()
        {
            self.stats.requests_served += 1;
            self.push_transmit(to, bytes);
        }
    }

    fn expire_requests(&mut self, now: Instant) {
        while let Some(&(deadline, txid)) = self.deadlines.first() {
            if deadline > now {
                break;
            }
            self.deadlines.remove(&(deadline, txid));
            let Some(p) = self.pending.get_mut(&txid) else {
                continue;
            };
            if p.attempts < self.settings.max_attempts {
                p.attempts += 1;
                p.deadline = now + self.settings.request_timeout;
                let (to, bytes, deadline, purpose) = (p.to, p.bytes.clone(), p.deadline, p.purpose);
                self.deadlines.insert((deadline, txid));
                self.push_transmit(to, bytes);
                self.stats.requests_sent += 1;
                if let Purpose::Lookup { lookup, .. } = purpose {
                    if let Some(l) = self.lookups.get_mut(&lookup) {
                        l.messages += 1;
                    }
                }
            } else if let Some(p) = self.pending.remove(&txid) {
                self.stats.timeouts += 1;
                self.fail(p, now);
            }
        }
    }

    /// A request got no (acceptable) answer.
    fn fail(&mut self, p: Pending, now: Instant) {
        match p.purpose {
            Purpose::BootstrapPing => {}
            Purpose::EvictionPing => {
                if let Some(peer) = p.peer {
                    self.routing.remove(&peer);
                }
            }
            Purpose::Lookup { lookup, node, .. } => {
                if let Some(peer) = p.peer {
                    self.forget_if_at(&peer, p.to);
                }
                if let Some(c) = self
                    .lookups
                    .get_mut(&lookup)
                    .and_then(|l| l.candidate_mut(&node))
                {
                    c.state = State::Failed;
                }
            }
            Purpose::Put { batch } => self.put_resolved(batch, None, now),
        }
    }

    /// Removes `peer` from the routing table if it is stored with address `addr`.
    fn forget_if_at(&mut self, peer: &PeerId, addr: SocketAddr) {
        if self.routing.get(peer).is_some_and(|e| e.addr == addr) {
            self.routing.remove(peer);
        }
    }

    fn note_seen(&mut self, peer: PeerId, addr: SocketAddr) {
        if let Insert::PingOldest { oldest } = self.routing.insert(peer, addr) {
            self.to_ping.push(oldest);
        }
    }

    fn closest_nodes(&self, target: &NodeId, exclude: &PeerId) -> Vec<NodeInfo> {
        self.routing
            .closest(target, self.settings.k + 1)
            .into_iter()
            .filter(|e| e.peer != *exclude)
            .take(self.settings.k)
            .map(|e| NodeInfo {
                peer: e.peer,
                addr: e.addr,
            })
            .collect()
    }

    fn serve(&mut self, now: Instant, from: SocketAddr, msg: Message) -> Result<(), KadError> {
        if !self.requests.allow(from.ip(), now) {
            self.stats.rate_limited += 1;
            return Err(KadError::RateLimited);
        }
        self.note_seen(msg.sender, from);
        let observed = from;
        let body = match msg.body {
            Body::Ping => Body::Pong { observed },
            Body::FindNode { target } => Body::Nodes {
                observed,
                nodes: self.closest_nodes(&NodeId(target), &msg.sender),
            },
            Body::Put {
                key,
                ttl_secs,
                record,
            } => {
                let ttl = Duration::from_secs(u64::from(ttl_secs));
                let status = self.store.put(now, from.ip(), msg.sender, key, record, ttl);
                Body::PutAck { observed, status }
            }
            Body::Get { key, offset } => {
                self.value_page(now, observed, key, offset, &msg.sender, msg.txid)
            }
            _ => return Err(KadError::UnexpectedReply),
        };
        self.send_reply(from, msg.txid, body);
        Ok(())
    }

    /// The reply to a GET: a VALUE page, or NODES when we hold nothing for the key.
    fn value_page(
        &self,
        now: Instant,
        observed: SocketAddr,
        key: [u8; 32],
        offset: u16,
        asker: &PeerId,
        txid: u64,
    ) -> Body {
        let all: Vec<&[u8]> = self
            .store
            .get(now, &key)
            .map(|r| r.record.as_slice())
            .collect();
        let mut nodes = if offset == 0 {
            self.closest_nodes(&NodeId(key), asker)
        } else {
            Vec::new()
        };
        if all.is_empty() {
            return Body::Nodes { observed, nodes };
        }
        let total = u16::try_from(all.len()).unwrap_or(u16::MAX);
        let rest: Vec<&[u8]> = all.into_iter().skip(usize::from(offset)).collect();
        // Make room for at least the first record, at the expense of node entries.
        let base = |nodes: &[NodeInfo]| {
            Message {
                txid,
                sender: self.me,
                body: Body::Value {
                    observed,
                    total,
                    records: Vec::new(),
                    nodes: nodes.to_vec(),
                },
            }
            .encoded_len()
        };
        if let Some(first) = rest.first() {
            while !nodes.is_empty() && base(&nodes) + 2 + first.len() > MAX_DATAGRAM {
                nodes.pop();
            }
        }
        let mut len = base(&nodes);
        let mut records = Vec::new();
        for r in rest {
            if records.len() >= message::MAX_VALUE_RECORDS || len + 2 + r.len() > MAX_DATAGRAM {
                break;
            }
            len += 2 + r.len();
            records.push(r.to_vec());
        }
        Body::Value {
            observed,
            total,
            records,
            nodes,
        }
    }

    fn on_reply(&mut self, now: Instant, from: SocketAddr, msg: Message) -> Result<(), KadError> {
        let Some(p) = self.pending.get(&msg.txid) else {
            self.stats.unsolicited += 1;
            return Err(KadError::UnknownTransaction);
        };
        if p.to != from {
            self.stats.unsolicited += 1;
            return Err(KadError::WrongSource { expected: p.to });
        }
        if !p.expect.matches(&msg.body) {
            return Err(KadError::UnexpectedReply);
        }
        let Some(p) = self.pending.remove(&msg.txid) else {
            return Err(KadError::UnknownTransaction);
        };
        self.deadlines.remove(&(p.deadline, msg.txid));
        if p.peer.is_some_and(|expected| expected != msg.sender) {
            // Another node now answers at that address: the one we asked is gone.
            self.note_seen(msg.sender, from);
            self.fail(p, now);
            return Err(KadError::WrongPeer);
        }
        if let Some(observed) = msg.body.observed() {
            self.vote_observed(from.ip(), observed);
        }
        let is_bootstrap = self.bootstrap.iter().any(|(a, _)| *a == from);
        let was_reached = is_bootstrap && self.bootstrap_is_reached(&from);
        self.note_seen(msg.sender, from);
        if is_bootstrap {
            self.bootstrap_answered.insert(from);
        }
        if is_bootstrap && !was_reached && self.bootstrap_is_reached(&from) {
            self.on_bootstrap_reached(now);
        }
        match p.purpose {
            Purpose::BootstrapPing | Purpose::EvictionPing => {}
            Purpose::Lookup {
                lookup,
                node,
                offset,
            } => self.on_lookup_reply(now, lookup, node, offset, msg),
            Purpose::Put { batch } => {
                let status = match msg.body {
                    Body::PutAck { status, .. } => Some(status),
                    _ => None,
                };
                self.put_resolved(batch, status, now);
            }
        }
        Ok(())
    }

    fn vote_observed(&mut self, reporter: IpAddr, addr: SocketAddr) {
        self.observed.retain(|(r, _)| *r != reporter);
        if self.observed.len() >= OBSERVED_REPORTS {
            self.observed.pop_front();
        }
        self.observed.push_back((reporter, addr));
        if self.observed_reported == Some(addr) {
            return;
        }
        let agree = self.observed.iter().filter(|(_, a)| *a == addr).count();
        if agree >= 2.min(self.observed.len()) {
            self.observed_reported = Some(addr);
            self.push_event(KadEvent::ObservedAddr(addr));
        }
    }

    /// Some bootstrap peer is not in the routing table (one added with its peer id is, until a
    /// request to it fails).
    fn bootstrap_wanted(&self) -> bool {
        self.bootstrap
            .iter()
            .any(|(addr, _)| !self.in_routing(addr))
    }

    fn in_routing(&self, addr: &SocketAddr) -> bool {
        self.routing.iter().any(|e| e.addr == *addr)
    }

    /// A bootstrap peer answered and joined the routing table: the DHT beyond our LAN may have
    /// just become reachable. Look up our own id through it (learning the wider neighbourhood),
    /// publish our rendezvous record again (it may so far sit on LAN nodes only) and look the
    /// rendezvous up again soon, a few times, as the other sites may be doing the same now.
    fn on_bootstrap_reached(&mut self, now: Instant) {
        log::debug!("DHT: a bootstrap peer answered");
        self.bootstrap_reached_at = Some(now);
        self.bootstrap_retry = FIRST_BOOTSTRAP_RETRY;
        self.bootstrap_first_ping = None;
        let target = self.my_id;
        let _ = self.enqueue(Command::FindNode {
            target,
            report: false,
        });
        self.rendezvous_restart();
        self.wake = true;
    }

    fn ping_bootstrap(&mut self, now: Instant) {
        let wanted: Vec<(SocketAddr, Option<PeerId>)> = self
            .bootstrap
            .iter()
            .filter(|(addr, _)| {
                !self.in_routing(addr)
                    && !self
                        .pending
                        .values()
                        .any(|p| p.to == *addr && matches!(p.purpose, Purpose::BootstrapPing))
            })
            .copied()
            .collect();
        for (addr, peer) in wanted {
            self.send_request(
                now,
                addr,
                peer,
                Body::Ping,
                Purpose::BootstrapPing,
                Expect::Pong,
                false,
            );
        }
        let first = *self.bootstrap_first_ping.get_or_insert(now);
        self.next_bootstrap = Some(now + self.bootstrap_retry);
        if now >= first + EAGER_BOOTSTRAP {
            self.bootstrap_retry = (self.bootstrap_retry * 2)
                .min(MAX_BOOTSTRAP_RETRY)
                .min(self.settings.retry_interval);
        }
    }
}
