//! LAN discovery: a sans-IO state machine that broadcasts sealed [`Beacon`]s and turns the ones
//! it hears into [`LanEvent`]s.
//!
//! Nodes on one LAN find each other in about a second with no configuration; with
//! `p2p.disable_dht: true` this is the only discovery there is.
//!
//! # Driver contract
//!
//! No sockets, no clock: every call takes `now` (monotonic) and `unix_secs` (wall clock), and
//! randomness comes from the [`Rng`] given to [`LanDiscovery::new`].
//!
//! 1. [`new`](LanDiscovery::new), [`set_local_addrs`](LanDiscovery::set_local_addrs) with the
//!    QUIC listen addresses (`0.0.0.0:port` / `[::]:port` for a wildcard bind: receivers use the
//!    datagram's source IP), then [`handle_timeout`](LanDiscovery::handle_timeout) once to start.
//! 2. Every loop turn: feed each datagram received on [`BEACON_PORT`] to
//!    [`handle_beacon`](LanDiscovery::handle_beacon) (log and count errors, never stop on them),
//!    call `handle_timeout` when [`poll_timeout`](LanDiscovery::poll_timeout) has passed, then
//!    drain [`poll_transmit`](LanDiscovery::poll_transmit) and
//!    [`poll_event`](LanDiscovery::poll_event).
//! 3. Send each transmit to `255.255.255.255:BEACON_PORT`, to the directed broadcast address of
//!    each IPv4 interface (when it differs in link), and to
//!    `[BEACON_MULTICAST_V6%iface]:BEACON_PORT` on each IPv6 interface. Sending from the overlay
//!    socket makes the source address the QUIC address. Receive on a socket bound to
//!    `BEACON_PORT` with `SO_REUSEADDR` (several agents on one host all get broadcasts), joined to
//!    [`BEACON_MULTICAST_V6`] on each interface. Own beacons loop back and are ignored.
//!
//! # Schedule
//!
//! - Burst: a beacon as soon as addresses are known, then after ~200 ms, ~500 ms and ~1 s (gaps
//!   of 200, 300 and 500 ms, each ±20 %), so a LAN meshes within a second even when one beacon is
//!   lost. A new set of local addresses restarts the burst.
//! - Steady: every [`STEADY_INTERVAL`] ±20 % (16 to 24 s), or every [`LONELY_INTERVAL`] ±20 %
//!   while no peer is known.
//! - Answer: a beacon from a peer we did not know makes us send one extra beacon 20 to 120 ms
//!   later (jitter spreads the answers of a whole LAN), unless a scheduled beacon goes out first;
//!   at most one answer per [`ANSWER_MIN_GAP`]. A newcomer thus learns everyone from their
//!   answers to its first beacon instead of waiting up to 24 s.
//! - Idle cost: a beacon is [`SEALED_LEN`](super::beacon::SEALED_LEN) = 245 bytes of UDP payload,
//!   273 bytes as an IPv4 packet and 293 as an IPv6 one. With one IPv4 broadcast and one IPv6
//!   multicast per 20 s on average: (273 + 293) / 20 ≈ 28 bytes/s sent per node (≈ 42 B/s with
//!   both 255.255.255.255 and a directed broadcast). A node on a LAN of N agents receives
//!   about N × 28 B/s: 2.8 KB/s for a hundred. The steady interval was 10 s: once members are
//!   connected, beacons only find newcomers (who burst, and are answered at once) and members
//!   that restarted (who burst too), so halving them costs nothing in discovery time and halves
//!   what every node of a LAN receives.
//! - Expiry: a peer silent for [`PEER_EXPIRY`] (75 s, three maximal intervals plus margin: two
//!   lost beacons in a row do not expire a peer) is reported as [`LanEvent::PeerExpired`].
//!
//! # Freshness and replays
//!
//! Beacons are sealed under the token's rotating beacon key, so only members can make them, but
//! anyone on the LAN can record and resend them (with any source address, which matters for
//! wildcard addresses). A beacon is accepted when all of these hold:
//!
//! 1. It opens: right token, a key window the receiver accepts (its own ± 1), not modified.
//! 2. It is not our own.
//! 3. Rotating tokens (interval below `NEVER_ROTATE`): `sent_at_unix_ms` is within
//!    ±[`FRESHNESS`] (10 min) of the receiver's clock. Such networks need clocks within 10 min
//!    of each other (and within one rotation interval, for the key windows): boxes that boot
//!    without NTP are often minutes off. A node further off is reported as
//!    [`BeaconError::Stale`] and logged.
//! 4. `(peer, nonce)` is not in the cache of the last [`REPLAY_CACHE`] accepted beacons.
//! 5. `sent_at_unix_ms` is greater than that of the last beacon accepted from the same peer, or
//!    that last beacon is older than [`RESTART_GRACE`] (25 s). Senders keep their timestamps
//!    strictly increasing (ms resolution, +1 ms when the clock has not moved).
//!
//! Rule 5 is what protects `NEVER_ROTATE` networks, whose boards may have no RTC and clocks
//! anywhere from 1970 to now: it only compares a peer's timestamps with each other, never with
//! the receiver's clock. The grace exists because a sender's clock can go back: a board without
//! RTC reboots to 1970 (a reboot takes longer than the grace, so it is seen at once), or NTP steps
//! the clock back (senders keep increasing by 1 ms over steps of up to 10 s and restart from the
//! clock after larger ones; receivers then wait out the grace). Limits, all bounded to "a stale
//! hint", never impersonation (the QUIC handshake authenticates peer ids and membership):
//!
//! - A recorded beacon of a peer that has been silent for longer than the grace (gone, or
//!   rebooting) and has left the replay cache is accepted again: without rotation forever, with
//!   rotation only within the freshness window. The cache holds every beacon accepted in the
//!   last 10 min (the window) as long as the LAN has at most [`REPLAY_CACHE`] × 8 s / 10 min ≈ 54
//!   agents beaconing at the fastest steady pace; on larger LANs a recorded beacon may leave the
//!   cache before the window closes. The peer then looks alive for up to [`PEER_EXPIRY`] more,
//!   at addresses it really announced.
//! - After a peer's clock went back, an attacker holding its beacons from before can replay them
//!   (newer timestamps) and so keep its new beacons out of order for a while.
//! - The tables are bounded ([`MAX_PEERS`], [`REPLAY_CACHE`]); a flood of distinct members beyond
//!   them evicts the oldest state, which re-opens the two cases above for the evicted peers.
//!
//! The windows accepted (current ± 1) also bound replays to two rotation intervals.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::time::{Duration, Instant};

use super::beacon::{Beacon, BeaconError, MAX_ADDRS};
use crate::identity::PeerId;
use crate::rng::Rng;
use crate::token::KeySchedule;

/// UDP port beacons are sent to (the overlay's QUIC port is separate; beacons may be sent from
/// it).
pub const BEACON_PORT: u16 = 7121;
/// IPv4 destination for beacons (plus each interface's directed broadcast address).
pub const BEACON_BROADCAST_V4: Ipv4Addr = Ipv4Addr::BROADCAST;
/// IPv6 link-local multicast group for beacons: `ff02::114`, the group id IANA sets aside for
/// private use ("any private experiment"), so no registered service is disturbed, and switches
/// with MLD snooping deliver it only to hosts that joined (unlike `ff02::1`, all nodes).
pub const BEACON_MULTICAST_V6: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 0x114);
/// Gaps between the beacons of a burst (each ±20 %): beacons at ~0, ~200 ms, ~500 ms, ~1 s.
pub const BURST_GAPS: [Duration; 3] = [
    Duration::from_millis(200),
    Duration::from_millis(300),
    Duration::from_millis(500),
];
/// Mean time between beacons after the burst (±20 % jitter: 16 to 24 s).
pub const STEADY_INTERVAL: Duration = Duration::from_secs(20);
/// Mean time between beacons after the burst while no peer is known (±20 %): a node whose
/// first beacons were lost (a link still coming up at boot, a switch port still learning) keeps
/// looking at this pace instead of waiting for the steady interval.
pub const LONELY_INTERVAL: Duration = Duration::from_secs(2);
/// Jitter applied to every scheduled gap, in percent either side.
pub const JITTER_PERCENT: u64 = 20;
/// Shortest and longest delay of an answer to a new peer.
pub const ANSWER_DELAY: (Duration, Duration) =
    (Duration::from_millis(20), Duration::from_millis(120));
/// Minimum time between two answers.
pub const ANSWER_MIN_GAP: Duration = Duration::from_millis(500);
/// A beacon that follows the previous one of its peer by less than this is off the steady
/// schedule (16 to 24 s): one of a burst (the peer started, restarted or changed addresses) or
/// an answer to a newcomer. See [`LanDiscovery::heard_early`].
pub const EARLY_BEACON: Duration = Duration::from_secs(4);
/// Silence after which a peer is reported expired.
pub const PEER_EXPIRY: Duration = Duration::from_secs(75);
/// With rotating tokens, how far `sent_at` may be from the receiver's clock, either way: the
/// clock disagreement between members that LAN discovery tolerates. Boxes without NTP at boot
/// are often minutes off, and members that do not hear each other's beacons elect separate
/// masters; the replay cache and the per-peer timestamp order, not this window, are what stop
/// replays of live peers (see the module doc for what the window bounds).
pub const FRESHNESS: Duration = Duration::from_secs(600);
/// Silence after which a peer's timestamps may go back (restart with an earlier clock).
pub const RESTART_GRACE: Duration = Duration::from_secs(25);
/// Largest backward clock step a sender hides by counting on from its last timestamp.
pub const CLOCK_STEP_BACK: Duration = Duration::from_secs(10);
/// Most peers tracked; the one silent longest is evicted (and reported expired) for a new one.
pub const MAX_PEERS: usize = 4096;
/// Accepted `(peer, nonce)` pairs remembered for replay detection.
pub const REPLAY_CACHE: usize = 4096;
/// Most events queued before the oldest are dropped (a driver that never polls).
pub const MAX_EVENTS: usize = 2 * MAX_PEERS;

/// What LAN discovery learned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LanEvent {
    /// A peer appeared, or announced different addresses. `addrs` are its QUIC addresses as
    /// announced, with wildcard IPs replaced by the beacon's source IP (link-local IPv6 ones get
    /// the receiving interface's scope); multicast, broadcast and port-0 entries are dropped.
    PeerSeen {
        /// The peer.
        peer: PeerId,
        /// Where it listens.
        addrs: Vec<SocketAddr>,
    },
    /// No beacon from the peer for [`PEER_EXPIRY`] (or it was evicted from a full table).
    PeerExpired {
        /// The peer.
        peer: PeerId,
    },
}

#[derive(Debug)]
struct PeerEntry {
    addrs: Vec<SocketAddr>,
    /// When its last beacon was accepted.
    last_seen: Instant,
    /// When the one before was (`None`: the last was its first).
    previous_seen: Option<Instant>,
    /// `sent_at_unix_ms` of that beacon.
    last_sent_at: u64,
}

/// Bounded set of recently accepted `(peer, nonce)` pairs, oldest forgotten first.
#[derive(Debug)]
struct ReplayCache {
    set: HashSet<(PeerId, u64)>,
    order: VecDeque<(PeerId, u64)>,
}

impl ReplayCache {
    fn new() -> Self {
        Self {
            set: HashSet::new(),
            order: VecDeque::new(),
        }
    }

    fn contains(&self, key: &(PeerId, u64)) -> bool {
        self.set.contains(key)
    }

    fn insert(&mut self, key: (PeerId, u64)) {
        if !self.set.insert(key) {
            return;
        }
        self.order.push_back(key);
        while self.order.len() > REPLAY_CACHE {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.order.len()
    }
}

/// The LAN discovery state machine (see the module doc for the driver contract and the rules).
#[derive(Debug)]
pub struct LanDiscovery {
    me: PeerId,
    keys: KeySchedule,
    rng: Rng,
    /// The token rotates its crypto keys, so wall clocks must agree (freshness check).
    rotating: bool,
    local_addrs: Vec<SocketAddr>,
    /// Latest `now` seen.
    last_now: Option<Instant>,
    /// Start a burst at the next `handle_timeout`.
    burst_pending: bool,
    /// Next scheduled beacon (None while there are no local addresses).
    next_beacon: Option<Instant>,
    /// Burst gaps used so far.
    burst_step: usize,
    answer_at: Option<Instant>,
    last_answer: Option<Instant>,
    /// Timestamp of our last beacon (kept strictly increasing).
    last_sent_at: u64,
    peers: HashMap<PeerId, PeerEntry>,
    /// Peers by `last_seen`, oldest first: expiry and eviction.
    by_seen: BTreeSet<(Instant, PeerId)>,
    replay: ReplayCache,
    transmit: Option<Vec<u8>>,
    events: VecDeque<LanEvent>,
}

impl LanDiscovery {
    /// A node `me` in the network of `keys`; `rng` supplies jitter and beacon nonces.
    #[must_use]
    pub fn new(me: PeerId, keys: KeySchedule, rng: Rng) -> Self {
        let rotating = keys.crypto_rotates();
        Self {
            me,
            keys,
            rng,
            rotating,
            local_addrs: Vec::new(),
            last_now: None,
            burst_pending: false,
            next_beacon: None,
            burst_step: 0,
            answer_at: None,
            last_answer: None,
            last_sent_at: 0,
            peers: HashMap::new(),
            by_seen: BTreeSet::new(),
            replay: ReplayCache::new(),
            transmit: None,
            events: VecDeque::new(),
        }
    }

    // ---- getters ----

    /// This node's peer id.
    #[must_use]
    pub fn me(&self) -> PeerId {
        self.me
    }

    /// The addresses announced in our beacons.
    #[must_use]
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.local_addrs
    }

    /// Number of peers currently known on the LAN.
    #[must_use]
    pub fn peer_count(&self) -> usize {
        self.peers.len()
    }

    /// The peers currently known and their addresses (as in their last [`LanEvent::PeerSeen`]).
    pub fn peers(&self) -> impl Iterator<Item = (&PeerId, &[SocketAddr])> {
        self.peers.iter().map(|(p, e)| (p, e.addrs.as_slice()))
    }

    /// When the last beacon of `peer` was accepted, if it is known.
    pub fn last_seen(&self, peer: &PeerId) -> Option<Instant> {
        self.peers.get(peer).map(|e| e.last_seen)
    }

    /// Whether `peer`'s last beacon came within [`EARLY_BEACON`] of the one before (or was its
    /// first): a burst, so the peer may just have restarted; steady beacons are not.
    #[must_use]
    pub fn heard_early(&self, peer: &PeerId) -> bool {
        self.peers.get(peer).is_some_and(|e| {
            e.previous_seen
                .is_none_or(|p| e.last_seen.saturating_duration_since(p) < EARLY_BEACON)
        })
    }

    /// True when the token rotates keys, so beacons must be fresh by the wall clock.
    #[must_use]
    pub fn checks_wall_clock(&self) -> bool {
        self.rotating
    }

    // ---- handlers ----

    /// Sets the QUIC listen addresses to announce: duplicates removed, at most [`MAX_ADDRS`]
    /// kept (the first ones: order by preference). A changed non-empty set starts a new burst
    /// (due immediately: see [`poll_timeout`](Self::poll_timeout)); an empty set stops sending.
    pub fn set_local_addrs(&mut self, addrs: impl IntoIterator<Item = SocketAddr>) {
        let mut list: Vec<SocketAddr> = Vec::new();
        for a in addrs {
            if !list.contains(&a) {
                if list.len() == MAX_ADDRS {
                    log::debug!("lan discovery: announcing only the first {MAX_ADDRS} addresses");
                    break;
                }
                list.push(a);
            }
        }
        if list == self.local_addrs {
            return;
        }
        self.local_addrs = list;
        self.next_beacon = None;
        self.answer_at = None;
        self.burst_pending = !self.local_addrs.is_empty();
    }

    /// Runs what is due at `now`: starts a pending burst, expires silent peers, and queues a
    /// beacon (sealed with timestamp `unix_secs`) when one is scheduled or an answer is due.
    /// Calling it early is harmless.
    pub fn handle_timeout(&mut self, now: Instant, unix_secs: u64) {
        self.observe(now);
        if self.burst_pending {
            self.burst_pending = false;
            self.burst_step = 0;
            self.next_beacon = Some(now);
        }
        self.expire(now);
        let beacon_due = self.next_beacon.is_some_and(|t| t <= now);
        let answer_due = self.answer_at.is_some_and(|t| t <= now);
        if self.local_addrs.is_empty() {
            self.next_beacon = None;
            self.answer_at = None;
            return;
        }
        if !(beacon_due || answer_due) {
            return;
        }
        if answer_due && !beacon_due {
            self.last_answer = Some(now);
        }
        // Any beacon sent now also serves as the answer.
        self.answer_at = None;
        if beacon_due {
            let gap = self.next_gap();
            self.next_beacon = now.checked_add(gap);
        }
        self.queue_beacon(unix_secs);
    }

    /// Handles a datagram received on the beacon port from `from`, at `now` / `unix_secs`.
    /// Accepted beacons update the peer table and may queue a [`LanEvent`] and an answer; the
    /// error says why anything else was dropped (see the module doc for the rules).
    pub fn handle_beacon(
        &mut self,
        now: Instant,
        unix_secs: u64,
        from: SocketAddr,
        bytes: &[u8],
    ) -> Result<(), BeaconError> {
        self.observe(now);
        let beacon = Beacon::open(&self.keys, unix_secs, bytes)?;
        if beacon.peer == self.me {
            return Err(BeaconError::SelfBeacon);
        }
        let sent_at = beacon.sent_at_unix_ms;
        if self.rotating {
            let now_ms = unix_secs.saturating_mul(1000);
            if u128::from(sent_at.abs_diff(now_ms)) > FRESHNESS.as_millis() {
                return Err(BeaconError::Stale {
                    sent_at_unix_ms: sent_at,
                    now_unix_ms: now_ms,
                });
            }
        }
        let key = (beacon.peer, beacon.nonce);
        if self.replay.contains(&key) {
            return Err(BeaconError::Replay);
        }
        if let Some(entry) = self.peers.get(&beacon.peer) {
            let restarted = now.saturating_duration_since(entry.last_seen) >= RESTART_GRACE;
            if sent_at <= entry.last_sent_at && !restarted {
                return Err(BeaconError::OutOfOrder {
                    sent_at_unix_ms: sent_at,
                    last_unix_ms: entry.last_sent_at,
                });
            }
        }
        self.replay.insert(key);
        let addrs = resolve_addrs(&beacon.addrs, from);
        self.accept(now, beacon.peer, sent_at, addrs);
        Ok(())
    }

    // ---- polls ----

    /// When [`handle_timeout`](Self::handle_timeout) should next be called: the next beacon,
    /// answer or expiry. A changed address set makes it the latest `now` seen (due at once).
    /// `None` before the first call with a `now`, or when nothing is scheduled.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        let burst = if self.burst_pending {
            self.last_now
        } else {
            None
        };
        let expiry = self
            .by_seen
            .first()
            .and_then(|(t, _)| t.checked_add(PEER_EXPIRY));
        [burst, self.next_beacon, self.answer_at, expiry]
            .into_iter()
            .flatten()
            .min()
    }

    /// A sealed beacon to send to the broadcast and multicast targets. At most one is queued: a
    /// newer beacon replaces one not yet taken.
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.transmit.take()
    }

    /// The next discovery event.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<LanEvent> {
        self.events.pop_front()
    }

    // ---- internals ----

    fn observe(&mut self, now: Instant) {
        self.last_now = Some(self.last_now.map_or(now, |t| t.max(now)));
    }

    /// The gap to the next scheduled beacon: the burst's, then the steady interval, jittered.
    fn next_gap(&mut self) -> Duration {
        let base = match BURST_GAPS.get(self.burst_step) {
            Some(&gap) => {
                self.burst_step += 1;
                gap
            }
            None if self.peers.is_empty() => LONELY_INTERVAL,
            None => STEADY_INTERVAL,
        };
        let ms = u64::try_from(base.as_millis()).unwrap_or(u64::MAX);
        let spread = ms * JITTER_PERCENT / 100;
        Duration::from_millis(ms - spread + self.rng.below(2 * spread + 1))
    }

    fn queue_beacon(&mut self, unix_secs: u64) {
        let wall = unix_secs.saturating_mul(1000);
        let step_back = u128::from(self.last_sent_at.saturating_sub(wall));
        self.last_sent_at = if wall > self.last_sent_at || step_back > CLOCK_STEP_BACK.as_millis() {
            wall
        } else {
            self.last_sent_at.saturating_add(1)
        };
        let beacon = Beacon {
            peer: self.me,
            addrs: self.local_addrs.clone(),
            sent_at_unix_ms: self.last_sent_at,
            nonce: self.rng.next_u64(),
        };
        match beacon.seal(&self.keys) {
            Ok(bytes) => self.transmit = Some(bytes),
            // Unreachable: set_local_addrs keeps at most MAX_ADDRS.
            Err(e) => log::warn!("lan discovery: cannot seal beacon: {e}"),
        }
    }

    fn accept(&mut self, now: Instant, peer: PeerId, sent_at: u64, addrs: Vec<SocketAddr>) {
        if let Some(entry) = self.peers.get_mut(&peer) {
            self.by_seen.remove(&(entry.last_seen, peer));
            self.by_seen.insert((now, peer));
            entry.previous_seen = Some(entry.last_seen);
            entry.last_seen = now;
            entry.last_sent_at = sent_at;
            if entry.addrs != addrs {
                entry.addrs.clone_from(&addrs);
                self.push_event(LanEvent::PeerSeen { peer, addrs });
            }
            return;
        }
        while self.peers.len() >= MAX_PEERS {
            let Some((_, oldest)) = self.by_seen.pop_first() else {
                break;
            };
            self.peers.remove(&oldest);
            self.push_event(LanEvent::PeerExpired { peer: oldest });
        }
        self.by_seen.insert((now, peer));
        self.peers.insert(
            peer,
            PeerEntry {
                addrs: addrs.clone(),
                last_seen: now,
                previous_seen: None,
                last_sent_at: sent_at,
            },
        );
        self.push_event(LanEvent::PeerSeen { peer, addrs });
        self.schedule_answer(now);
    }

    /// Plans one extra beacon soon after a new peer appeared, unless one is already planned or a
    /// scheduled beacon leaves first; at most one answer per `ANSWER_MIN_GAP`.
    fn schedule_answer(&mut self, now: Instant) {
        if self.answer_at.is_some() || self.local_addrs.is_empty() {
            return;
        }
        let (min, max) = ANSWER_DELAY;
        let span = u64::try_from((max - min).as_millis()).unwrap_or(0);
        let delay = min + Duration::from_millis(self.rng.below(span + 1));
        let mut at = now.checked_add(delay).unwrap_or(now);
        if let Some(earliest) = self.last_answer.and_then(|t| t.checked_add(ANSWER_MIN_GAP)) {
            at = at.max(earliest);
        }
        let beacon_first = self.burst_pending || self.next_beacon.is_some_and(|t| t <= at);
        if !beacon_first {
            self.answer_at = Some(at);
        }
    }

    fn expire(&mut self, now: Instant) {
        while let Some(&(seen, peer)) = self.by_seen.first() {
            if seen.checked_add(PEER_EXPIRY).is_none_or(|t| t > now) {
                break;
            }
            self.by_seen.pop_first();
            self.peers.remove(&peer);
            self.push_event(LanEvent::PeerExpired { peer });
        }
    }

    fn push_event(&mut self, event: LanEvent) {
        if self.events.len() >= MAX_EVENTS {
            log::warn!("lan discovery: event queue full, dropping the oldest event");
            self.events.pop_front();
        }
        self.events.push_back(event);
    }
}

/// The announced addresses as dialable ones: wildcard IPs become the source IP, IPv4-mapped IPv6
/// becomes IPv4, link-local IPv6 gets the receiving scope; port 0, multicast, broadcast and
/// unspecified results are dropped, duplicates removed.
fn resolve_addrs(announced: &[SocketAddr], from: SocketAddr) -> Vec<SocketAddr> {
    let mut out = Vec::with_capacity(announced.len());
    for a in announced {
        let port = a.port();
        let ip = if a.ip().is_unspecified() {
            from.ip()
        } else {
            a.ip()
        }
        .to_canonical();
        let usable = port != 0
            && !ip.is_unspecified()
            && !ip.is_multicast()
            && ip != IpAddr::V4(Ipv4Addr::BROADCAST);
        if !usable {
            continue;
        }
        let addr = match (ip, from) {
            (IpAddr::V6(v6), SocketAddr::V6(src)) if is_link_local_v6(&v6) => {
                SocketAddr::V6(SocketAddrV6::new(v6, port, 0, src.scope_id()))
            }
            _ => SocketAddr::new(ip, port),
        };
        if !out.contains(&addr) {
            out.push(addr);
        }
    }
    out
}

fn is_link_local_v6(ip: &Ipv6Addr) -> bool {
    ip.segments()[0] & 0xffc0 == 0xfe80
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::beacon::SEALED_LEN;
    use crate::token::{NEVER_ROTATE, NetworkToken};

    /// A key schedule from a token generated with a seeded generator.
    fn keys(seed: u64, interval: u64) -> KeySchedule {
        let mut rng = Rng::from_seed(seed);
        NetworkToken::generate_with(interval, &mut |b: &mut [u8]| rng.fill(b)).key_schedule()
    }

    const UNIX0: u64 = 1_750_000_000;

    fn peer(i: u32) -> PeerId {
        let mut b = [0u8; 32];
        b[..4].copy_from_slice(&i.to_be_bytes());
        b[31] = 0x5a;
        PeerId(b)
    }

    fn sealed(
        ks: &KeySchedule,
        who: PeerId,
        addrs: &[&str],
        sent_at_unix_ms: u64,
        nonce: u64,
    ) -> Vec<u8> {
        let addrs = addrs.iter().map(|a| a.parse().unwrap()).collect();
        Beacon {
            peer: who,
            addrs,
            sent_at_unix_ms,
            nonce,
        }
        .seal(ks)
        .unwrap()
    }

    fn from(ip: &str) -> SocketAddr {
        SocketAddr::new(ip.parse().unwrap(), 7120)
    }

    fn events(lan: &mut LanDiscovery) -> Vec<LanEvent> {
        std::iter::from_fn(|| lan.poll_event()).collect()
    }

    fn node(me: PeerId, ks: &KeySchedule, seed: u64) -> LanDiscovery {
        let mut lan = LanDiscovery::new(me, ks.clone(), Rng::from_seed(seed));
        lan.set_local_addrs(["0.0.0.0:7120".parse().unwrap()]);
        lan
    }

    // ---- a fake broadcast medium with a virtual clock ----

    struct SimNode {
        lan: LanDiscovery,
        ip: IpAddr,
        start: Duration,
        started: bool,
        stop: Duration,
        /// Offset of this node's wall clock, in seconds.
        skew: i64,
        sent: Vec<Duration>,
        seen: HashMap<PeerId, Duration>,
        expired: Vec<(PeerId, Duration)>,
    }

    struct Sim {
        t0: Instant,
        now: Duration,
        nodes: Vec<SimNode>,
        /// (delivery time, sender index, bytes)
        wire: Vec<(Duration, usize, Vec<u8>)>,
        rng: Rng,
        loss: f64,
        /// Every packet sent, in order (determinism check).
        trace: Vec<Vec<u8>>,
        errors: HashMap<&'static str, usize>,
    }

    impl Sim {
        fn new(n: usize, seed: u64, ks: &KeySchedule, start_spread_ms: u64) -> Sim {
            let mut rng = Rng::from_seed(seed);
            let nodes = (0..n)
                .map(|i| {
                    let idx = u32::try_from(i).unwrap();
                    let lan = node(peer(idx), ks, rng.next_u64());
                    let start = Duration::from_millis(rng.below(start_spread_ms + 1));
                    SimNode {
                        lan,
                        ip: IpAddr::V4(Ipv4Addr::new(10, 0, (idx >> 8) as u8, idx as u8 + 1)),
                        start,
                        started: false,
                        stop: Duration::MAX,
                        skew: 0,
                        sent: Vec::new(),
                        seen: HashMap::new(),
                        expired: Vec::new(),
                    }
                })
                .collect();
            Sim {
                t0: Instant::now(),
                now: Duration::ZERO,
                nodes,
                wire: Vec::new(),
                rng,
                loss: 0.0,
                trace: Vec::new(),
                errors: HashMap::new(),
            }
        }

        fn up(&self, i: usize) -> bool {
            let n = &self.nodes[i];
            n.start <= self.now && self.now < n.stop
        }

        fn unix(&self, i: usize) -> u64 {
            (UNIX0 + self.now.as_secs()).saturating_add_signed(self.nodes[i].skew)
        }

        fn next_time(&self) -> Option<Duration> {
            let mut times: Vec<Duration> = self.wire.iter().map(|w| w.0).collect();
            for (i, n) in self.nodes.iter().enumerate() {
                if self.now < n.start {
                    times.push(n.start);
                } else if self.up(i) && !n.started {
                    times.push(self.now);
                } else if self.up(i) {
                    if let Some(t) = n.lan.poll_timeout() {
                        times.push(t.saturating_duration_since(self.t0).max(self.now));
                    }
                }
                if self.now < n.stop && n.stop != Duration::MAX {
                    times.push(n.stop);
                }
            }
            times.into_iter().min()
        }

        fn run_until(&mut self, end: Duration) {
            let mut steps = 0u64;
            while let Some(t) = self.next_time() {
                if t > end {
                    break;
                }
                steps += 1;
                assert!(
                    steps < 5_000_000,
                    "simulation does not make progress at {t:?}"
                );
                self.now = t;
                let at = self.t0 + t;
                // Deliver due packets to every node that is up, the sender included.
                let (due, later): (Vec<_>, Vec<_>) = self.wire.drain(..).partition(|w| w.0 <= t);
                self.wire = later;
                for (_, sender, bytes) in due {
                    let src = SocketAddr::new(self.nodes[sender].ip, 7120);
                    for i in 0..self.nodes.len() {
                        if !self.up(i) || (i != sender && self.rng.chance(self.loss)) {
                            continue;
                        }
                        let unix = self.unix(i);
                        if let Err(e) = self.nodes[i].lan.handle_beacon(at, unix, src, &bytes) {
                            let name = match e {
                                BeaconError::SelfBeacon => "self",
                                BeaconError::Replay => "replay",
                                _ => "other",
                            };
                            *self.errors.entry(name).or_default() += 1;
                        }
                    }
                }
                for i in 0..self.nodes.len() {
                    if !self.up(i) {
                        continue;
                    }
                    let unix = self.unix(i);
                    let n = &mut self.nodes[i];
                    if !n.started || n.lan.poll_timeout().is_some_and(|d| d <= at) {
                        n.started = true;
                        n.lan.handle_timeout(at, unix);
                        if let Some(next) = n.lan.poll_timeout() {
                            assert!(
                                next > at,
                                "node {i}: poll_timeout not in the future after handle_timeout"
                            );
                        }
                    }
                    while let Some(bytes) = n.lan.poll_transmit() {
                        n.sent.push(t);
                        self.trace.push(bytes.clone());
                        let latency = Duration::from_micros(300 + self.rng.below(2000));
                        self.wire.push((t + latency, i, bytes));
                    }
                    while let Some(ev) = n.lan.poll_event() {
                        match ev {
                            LanEvent::PeerSeen { peer, addrs } => {
                                assert!(!addrs.is_empty());
                                n.seen.entry(peer).or_insert(t);
                            }
                            LanEvent::PeerExpired { peer } => n.expired.push((peer, t)),
                        }
                    }
                }
            }
            self.now = end;
        }

        /// Latest time, over all ordered pairs, at which a node first saw another, measured from
        /// the later of the two starts.
        fn worst_discovery(&self) -> Duration {
            let mut worst = Duration::ZERO;
            for (i, a) in self.nodes.iter().enumerate() {
                for (j, b) in self.nodes.iter().enumerate() {
                    if i == j {
                        continue;
                    }
                    let seen = a
                        .seen
                        .get(&b.lan.me())
                        .unwrap_or_else(|| panic!("{i} never saw {j}"));
                    worst = worst.max(seen.saturating_sub(a.start.max(b.start)));
                }
            }
            worst
        }
    }

    // ---- scenarios ----

    #[test]
    fn two_nodes_see_each_other_within_a_second() {
        let ks = keys(10, 9000);
        let mut sim = Sim::new(2, 1, &ks, 300);
        sim.run_until(Duration::from_secs(3));
        assert!(
            sim.worst_discovery() <= Duration::from_secs(1),
            "{:?}",
            sim.worst_discovery()
        );
        // The announced wildcard became the sender's source address.
        let (_, addrs) = sim.nodes[0].lan.peers().next().unwrap();
        assert_eq!(addrs, [SocketAddr::new(sim.nodes[1].ip, 7120)]);
        assert!(
            sim.errors.get("self").is_some_and(|&n| n > 0),
            "own beacons looped back and were ignored"
        );
    }

    #[test]
    fn ten_nodes_mesh_within_a_second_over_many_seeds() {
        for seed in 0..20 {
            let ks = keys(seed, 9000);
            let mut sim = Sim::new(10, seed, &ks, 800);
            sim.run_until(Duration::from_secs(3));
            let worst = sim.worst_discovery();
            assert!(
                worst <= Duration::from_millis(1100),
                "seed {seed}: {worst:?}"
            );
            assert!(sim.nodes.iter().all(|n| n.lan.peer_count() == 9));
        }
    }

    #[test]
    fn with_twenty_percent_loss_most_pairs_mesh_within_a_second_and_all_later() {
        let (mut fast, mut total) = (0, 0);
        for seed in 0..10 {
            let ks = keys(seed, NEVER_ROTATE);
            let mut sim = Sim::new(10, seed, &ks, 500);
            sim.loss = 0.2;
            sim.run_until(Duration::from_secs(90));
            // Panics if a pair never met: the steady beacons repair what the burst missed.
            sim.worst_discovery();
            for a in &sim.nodes {
                for b in &sim.nodes {
                    if let Some(&seen) = a.seen.get(&b.lan.me()) {
                        total += 1;
                        fast += usize::from(
                            seen.saturating_sub(a.start.max(b.start))
                                <= Duration::from_millis(1100),
                        );
                    }
                }
            }
        }
        assert_eq!(total, 900);
        assert!(fast >= 873, "{fast} of {total} pairs within 1.1 s");
    }

    #[test]
    fn late_joiner_is_answered_within_a_fraction_of_a_second() {
        let ks = keys(11, 9000);
        let mut sim = Sim::new(11, 11, &ks, 300);
        sim.nodes[10].start = Duration::from_secs(60);
        sim.run_until(Duration::from_secs(62));
        let joiner = &sim.nodes[10];
        for n in &sim.nodes[..10] {
            let seen = joiner.seen[&n.lan.me()];
            assert!(
                seen - joiner.start <= Duration::from_millis(200),
                "{seen:?}"
            );
            assert!(n.seen[&joiner.lan.me()] - joiner.start <= Duration::from_millis(10));
        }
        // One answer each (the joiner's burst beacons are not new peers any more).
        for n in &sim.nodes[..10] {
            let answers = n
                .sent
                .iter()
                .filter(|&&t| t >= joiner.start && t < joiner.start + Duration::from_secs(1));
            assert!(answers.count() <= 2, "an answer, and maybe a steady beacon");
        }
    }

    #[test]
    fn schedule_is_a_burst_then_a_beacon_every_two_seconds_while_lonely() {
        for seed in 0..20 {
            let ks = keys(12, 9000);
            let mut sim = Sim::new(1, seed, &ks, 0);
            sim.run_until(Duration::from_secs(60));
            let sent = &sim.nodes[0].sent;
            let idle = sent
                .iter()
                .filter(|&&t| t >= Duration::from_secs(30))
                .count();
            assert!(
                (12..=19).contains(&idle),
                "seed {seed}: {idle} in 30 lonely seconds"
            );
            for pair in sent.windows(2).skip(4) {
                let gap = pair[1] - pair[0];
                assert!(
                    gap >= Duration::from_millis(1600) && gap <= Duration::from_millis(2400),
                    "{gap:?}"
                );
            }
        }
    }

    #[test]
    fn schedule_is_a_burst_then_a_beacon_every_twenty_seconds() {
        let mut idle_total = 0;
        for seed in 0..20 {
            let ks = keys(12, 9000);
            let mut sim = Sim::new(2, seed, &ks, 0);
            sim.run_until(Duration::from_secs(120));
            let sent = &sim.nodes[0].sent;
            let in_range = |a: u64, b: u64| {
                sent.iter()
                    .filter(|&&t| t >= Duration::from_millis(a) && t < Duration::from_millis(b))
                    .count()
            };
            // The burst, plus at most one answer to the other node.
            assert!(
                (4..=5).contains(&in_range(0, 2000)),
                "seed {seed}: {sent:?}"
            );
            assert_eq!(
                sent.first(),
                Some(&Duration::ZERO),
                "first beacon immediately"
            );
            assert_eq!(
                in_range(750, 1250),
                1,
                "the burst ends around 1 s: {sent:?}"
            );
            let idle = in_range(60_000, 120_000);
            assert!(
                (2..=4).contains(&idle),
                "seed {seed}: {idle} in an idle minute"
            );
            idle_total += idle;
            for pair in sent.windows(2).skip(4) {
                let gap = pair[1] - pair[0];
                assert!(
                    gap >= Duration::from_secs(16) && gap <= Duration::from_secs(24),
                    "{gap:?}"
                );
            }
        }
        let mean = idle_total as f64 / 20.0;
        assert!(
            (2.7..=3.4).contains(&mean),
            "mean beacons per idle minute {mean}"
        );
        // The idle cost in the module doc: one IPv4 broadcast and one IPv6 multicast per beacon.
        let bytes_per_sec = ((SEALED_LEN + 28) + (SEALED_LEN + 48)) as f64 * mean / 60.0;
        assert!(bytes_per_sec < 50.0, "{bytes_per_sec} B/s");
    }

    #[test]
    fn answers_are_rate_limited() {
        let ks = keys(13, 9000);
        let mut lan = node(peer(0), &ks, 13);
        let t0 = Instant::now();
        lan.handle_timeout(t0, UNIX0);
        let mut now = t0;
        // Drain the burst first.
        while now < t0 + Duration::from_secs(2) {
            now += Duration::from_millis(10);
            lan.handle_timeout(now, UNIX0 + 2);
            let _ = lan.poll_transmit();
        }
        // Then a new peer every 50 ms for 5 s.
        let mut sent = 0;
        for i in 1..=100u32 {
            now += Duration::from_millis(50);
            let b = sealed(
                &ks,
                peer(i),
                &["0.0.0.0:7120"],
                (UNIX0 + 3) * 1000,
                u64::from(i),
            );
            lan.handle_beacon(now, UNIX0 + 3, from("10.0.0.9"), &b)
                .unwrap();
            lan.handle_timeout(now, UNIX0 + 3);
            sent += usize::from(lan.poll_transmit().is_some());
        }
        assert!(
            (9..=11).contains(&sent),
            "{sent} beacons in 5 s with 100 newcomers"
        );
    }

    #[test]
    fn peer_expires_after_silence_and_not_while_alive() {
        let ks = keys(14, 9000);
        let mut sim = Sim::new(3, 14, &ks, 0);
        sim.nodes[2].stop = Duration::from_secs(100);
        sim.run_until(Duration::from_secs(300));
        let gone = sim.nodes[2].lan.me();
        let last_beacon = *sim.nodes[2].sent.last().unwrap();
        for n in &sim.nodes[..2] {
            assert_eq!(
                n.expired.len(),
                1,
                "only the stopped node expires: {:?}",
                n.expired
            );
            let (who, at) = n.expired[0];
            assert_eq!(who, gone);
            let silence = at - last_beacon;
            assert!(
                silence >= PEER_EXPIRY && silence <= PEER_EXPIRY + Duration::from_millis(10),
                "{silence:?}"
            );
            assert_eq!(n.lan.peer_count(), 1);
        }
    }

    #[test]
    fn own_beacons_are_ignored() {
        let ks = keys(15, 9000);
        let mut lan = node(peer(1), &ks, 15);
        let now = Instant::now();
        lan.handle_timeout(now, UNIX0);
        let own = lan.poll_transmit().unwrap();
        assert_eq!(
            lan.handle_beacon(now, UNIX0, from("10.0.0.1"), &own),
            Err(BeaconError::SelfBeacon)
        );
        assert_eq!(lan.peer_count(), 0);
        assert!(events(&mut lan).is_empty());
    }

    #[test]
    fn exact_replay_is_dropped() {
        let ks = keys(16, NEVER_ROTATE);
        let mut lan = node(peer(0), &ks, 16);
        let now = Instant::now();
        let b = sealed(&ks, peer(1), &["10.0.0.2:7120"], 5_000, 1);
        assert_eq!(lan.handle_beacon(now, 0, from("10.0.0.2"), &b), Ok(()));
        let later = now + Duration::from_secs(30);
        assert_eq!(
            lan.handle_beacon(later, 30, from("10.6.6.6"), &b),
            Err(BeaconError::Replay)
        );
        assert_eq!(events(&mut lan).len(), 1);
        let (_, addrs) = lan.peers().next().unwrap();
        assert_eq!(addrs, ["10.0.0.2:7120".parse().unwrap()]);
    }

    #[test]
    fn beacons_of_a_burst_are_early_steady_ones_are_not() {
        let ks = keys(17, NEVER_ROTATE);
        let mut lan = node(peer(0), &ks, 17);
        let t = Instant::now();
        let p = peer(1);
        let beacon = |n: u64| sealed(&ks, p, &["0.0.0.0:7120"], UNIX0 * 1000 + n * 1000, n);
        lan.handle_beacon(t, 5, from("10.0.0.2"), &beacon(1))
            .unwrap();
        assert!(lan.heard_early(&p), "a first beacon");
        let steady = t + STEADY_INTERVAL;
        lan.handle_beacon(steady, 15, from("10.0.0.2"), &beacon(2))
            .unwrap();
        assert!(!lan.heard_early(&p), "on the steady schedule");
        // It restarts: a burst, 200 ms apart.
        let burst = steady + Duration::from_secs(6);
        lan.handle_beacon(burst, 21, from("10.0.0.2"), &beacon(3))
            .unwrap();
        assert!(!lan.heard_early(&p), "6 s after the last one");
        let second = burst + Duration::from_millis(200);
        lan.handle_beacon(second, 21, from("10.0.0.2"), &beacon(4))
            .unwrap();
        assert!(lan.heard_early(&p), "the burst's second beacon");
        assert!(!lan.heard_early(&peer(2)), "an unknown peer");
    }

    #[test]
    fn older_beacon_is_out_of_order_until_the_restart_grace() {
        // NEVER_ROTATE: a board without RTC at 2025, then rebooted to 1970.
        let ks = keys(17, NEVER_ROTATE);
        let mut lan = node(peer(0), &ks, 17);
        let t = Instant::now();
        let new = sealed(&ks, peer(1), &["0.0.0.0:7120"], UNIX0 * 1000, 1);
        let old = sealed(&ks, peer(1), &["0.0.0.0:7120"], UNIX0 * 1000 - 30_000, 2);
        lan.handle_beacon(t, 5, from("10.0.0.2"), &new).unwrap();
        assert!(matches!(
            lan.handle_beacon(t + Duration::from_secs(1), 6, from("10.0.0.2"), &old),
            Err(BeaconError::OutOfOrder { .. })
        ));
        let rebooted = sealed(&ks, peer(1), &["0.0.0.0:7120"], 3_000, 3);
        assert!(matches!(
            lan.handle_beacon(t + Duration::from_secs(20), 25, from("10.0.0.2"), &rebooted),
            Err(BeaconError::OutOfOrder { .. })
        ));
        let rebooted = sealed(&ks, peer(1), &["0.0.0.0:7120"], 8_000, 4);
        assert_eq!(
            lan.handle_beacon(t + RESTART_GRACE, 30, from("10.0.0.2"), &rebooted),
            Ok(())
        );
        // From then on its new timeline is the reference.
        let next = sealed(&ks, peer(1), &["0.0.0.0:7120"], 18_000, 5);
        assert_eq!(
            lan.handle_beacon(t + RESTART_GRACE * 2, 40, from("10.0.0.2"), &next),
            Ok(())
        );
        assert!(matches!(
            lan.handle_beacon(t + RESTART_GRACE * 2, 40, from("10.0.0.2"), &new),
            Err(BeaconError::Replay)
        ));
    }

    #[test]
    fn stale_beacon_is_dropped_when_keys_rotate_but_not_without_rotation() {
        let ks = keys(18, 9000);
        let mut lan = node(peer(0), &ks, 18);
        assert!(lan.checks_wall_clock());
        let now = Instant::now();
        let old = sealed(&ks, peer(1), &["0.0.0.0:7120"], (UNIX0 - 601) * 1000, 1);
        assert_eq!(
            lan.handle_beacon(now, UNIX0, from("10.0.0.2"), &old),
            Err(BeaconError::Stale {
                sent_at_unix_ms: (UNIX0 - 601) * 1000,
                now_unix_ms: UNIX0 * 1000
            })
        );
        let future = sealed(&ks, peer(1), &["0.0.0.0:7120"], (UNIX0 + 601) * 1000, 2);
        assert!(matches!(
            lan.handle_beacon(now, UNIX0, from("10.0.0.2"), &future),
            Err(BeaconError::Stale { .. })
        ));
        // Clocks minutes apart (no NTP at boot) still hear each other, either way.
        let behind = sealed(&ks, peer(1), &["0.0.0.0:7120"], (UNIX0 - 300) * 1000, 3);
        assert_eq!(
            lan.handle_beacon(now, UNIX0, from("10.0.0.2"), &behind),
            Ok(())
        );
        let ahead = sealed(&ks, peer(2), &["0.0.0.0:7120"], (UNIX0 + 600) * 1000, 4);
        assert_eq!(
            lan.handle_beacon(now, UNIX0, from("10.0.0.3"), &ahead),
            Ok(())
        );

        let fixed = keys(18, NEVER_ROTATE);
        let mut lan = node(peer(0), &fixed, 18);
        assert!(!lan.checks_wall_clock());
        let ancient = sealed(&fixed, peer(1), &["0.0.0.0:7120"], 42_000, 1);
        assert_eq!(
            lan.handle_beacon(now, UNIX0, from("10.0.0.2"), &ancient),
            Ok(())
        );
    }

    #[test]
    fn a_peer_minutes_ahead_is_heard_and_its_beacons_still_cannot_be_replayed() {
        let ks = keys(25, 9000);
        let mut lan = node(peer(0), &ks, 25);
        let now = Instant::now();
        let ahead_ms = (UNIX0 + 300) * 1000;
        let first = sealed(&ks, peer(1), &["0.0.0.0:7120"], ahead_ms, 1);
        let second = sealed(&ks, peer(1), &["0.0.0.0:7120"], ahead_ms + 10_000, 2);
        assert_eq!(
            lan.handle_beacon(now, UNIX0, from("10.0.0.2"), &first),
            Ok(())
        );
        assert_eq!(lan.peer_count(), 1);
        assert_eq!(
            lan.handle_beacon(now, UNIX0, from("10.0.0.9"), &first),
            Err(BeaconError::Replay)
        );
        let later = now + Duration::from_secs(10);
        assert_eq!(
            lan.handle_beacon(later, UNIX0 + 10, from("10.0.0.2"), &second),
            Ok(())
        );
        // Sent before the last one accepted: refused even once the cache has forgotten it.
        let older = sealed(&ks, peer(1), &["0.0.0.0:7120"], ahead_ms + 5_000, 3);
        assert!(matches!(
            lan.handle_beacon(later, UNIX0 + 10, from("10.0.0.9"), &older),
            Err(BeaconError::OutOfOrder { .. })
        ));
    }

    #[test]
    fn beacon_from_the_previous_window_is_accepted() {
        // 100 s windows, UNIX0 starts one: sent at the end of window w, received in w + 1.
        let ks = keys(19, 100);
        assert_eq!(ks.crypto_window(UNIX0 - 1) + 1, ks.crypto_window(UNIX0));
        let mut lan = node(peer(0), &ks, 19);
        let b = sealed(&ks, peer(1), &["0.0.0.0:7120"], UNIX0 * 1000 - 1, 1);
        assert_eq!(
            lan.handle_beacon(Instant::now(), UNIX0, from("10.0.0.2"), &b),
            Ok(())
        );
        assert_eq!(lan.peer_count(), 1);
    }

    #[test]
    fn events_only_for_new_peers_and_changed_addresses() {
        let ks = keys(20, NEVER_ROTATE);
        let mut lan = node(peer(0), &ks, 20);
        let t = Instant::now();
        let src = from("192.168.1.20");
        let b1 = sealed(&ks, peer(1), &["0.0.0.0:7120", "[fd00::20]:7120"], 1_000, 1);
        lan.handle_beacon(t, 0, src, &b1).unwrap();
        let want: Vec<SocketAddr> = vec![
            "192.168.1.20:7120".parse().unwrap(),
            "[fd00::20]:7120".parse().unwrap(),
        ];
        assert_eq!(
            events(&mut lan),
            [LanEvent::PeerSeen {
                peer: peer(1),
                addrs: want.clone()
            }]
        );
        for i in 2..6 {
            let same = sealed(
                &ks,
                peer(1),
                &["0.0.0.0:7120", "[fd00::20]:7120"],
                1_000 * i,
                i,
            );
            lan.handle_beacon(t + Duration::from_secs(i), 0, src, &same)
                .unwrap();
        }
        assert!(
            events(&mut lan).is_empty(),
            "no event for an unchanged peer"
        );
        let moved = sealed(&ks, peer(1), &["0.0.0.0:7200"], 9_000, 9);
        lan.handle_beacon(t + Duration::from_secs(9), 0, src, &moved)
            .unwrap();
        assert_eq!(
            events(&mut lan),
            [LanEvent::PeerSeen {
                peer: peer(1),
                addrs: vec!["192.168.1.20:7200".parse().unwrap()]
            }]
        );
    }

    #[test]
    fn announced_addresses_are_made_dialable() {
        let src_v6 = SocketAddr::V6(SocketAddrV6::new("fe80::9".parse().unwrap(), 7120, 0, 3));
        let announced: Vec<SocketAddr> = [
            "0.0.0.0:7120",
            "[::]:7121",
            "[fe80::9]:7120",
            "[::ffff:10.1.2.3]:7120",
            "10.1.2.3:7120",
            "255.255.255.255:7120",
            "[ff02::1]:7120",
            "10.9.9.9:0",
        ]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
        let got = resolve_addrs(&announced, src_v6);
        let link_local = SocketAddr::V6(SocketAddrV6::new("fe80::9".parse().unwrap(), 7120, 0, 3));
        let link_local_b =
            SocketAddr::V6(SocketAddrV6::new("fe80::9".parse().unwrap(), 7121, 0, 3));
        assert_eq!(
            got,
            [link_local, link_local_b, "10.1.2.3:7120".parse().unwrap()]
        );
    }

    #[test]
    fn peer_table_is_bounded_and_evicts_the_longest_silent() {
        let ks = keys(21, NEVER_ROTATE);
        let mut lan = node(peer(0), &ks, 21);
        let t = Instant::now();
        for i in 1..=MAX_PEERS as u32 + 10 {
            let b = sealed(&ks, peer(i), &["10.0.0.2:7120"], 1_000, u64::from(i));
            lan.handle_beacon(
                t + Duration::from_millis(u64::from(i)),
                0,
                from("10.0.0.2"),
                &b,
            )
            .unwrap();
        }
        assert_eq!(lan.peer_count(), MAX_PEERS);
        assert!(lan.replay.len() <= REPLAY_CACHE);
        let expired: Vec<_> = events(&mut lan)
            .into_iter()
            .filter_map(|e| match e {
                LanEvent::PeerExpired { peer } => Some(peer),
                LanEvent::PeerSeen { .. } => None,
            })
            .collect();
        assert_eq!(expired, (1..=10).map(peer).collect::<Vec<_>>());
    }

    #[test]
    fn replay_cache_is_bounded() {
        let mut cache = ReplayCache::new();
        for n in 0..(REPLAY_CACHE as u64 * 3) {
            cache.insert((peer(1), n));
        }
        assert_eq!(cache.len(), REPLAY_CACHE);
        assert_eq!(cache.set.len(), REPLAY_CACHE);
        assert!(!cache.contains(&(peer(1), 0)));
        assert!(cache.contains(&(peer(1), REPLAY_CACHE as u64 * 3 - 1)));
    }

    #[test]
    fn nothing_is_sent_without_addresses_and_new_addresses_restart_the_burst() {
        let ks = keys(22, 9000);
        let mut lan = LanDiscovery::new(peer(0), ks, Rng::from_seed(22));
        assert_eq!(lan.poll_timeout(), None);
        let t = Instant::now();
        lan.handle_timeout(t, UNIX0);
        assert_eq!(lan.poll_transmit(), None);
        assert_eq!(lan.poll_timeout(), None);

        let count_sent = |lan: &mut LanDiscovery, from: Instant, secs: u64| {
            let mut n = 0;
            let mut now = from;
            while now < from + Duration::from_secs(secs) {
                if lan.poll_timeout().is_some_and(|d| d <= now) {
                    lan.handle_timeout(now, UNIX0);
                }
                n += usize::from(lan.poll_transmit().is_some());
                now += Duration::from_millis(5);
            }
            n
        };
        lan.set_local_addrs(["10.0.0.1:7120".parse().unwrap()]);
        assert_eq!(lan.poll_timeout(), Some(t), "due at once");
        // A burst, then a beacon every 2 s ±20 % while lonely.
        let lonely = count_sent(&mut lan, t, 30);
        assert!((4 + 12..=4 + 18).contains(&lonely), "{lonely}");
        let t2 = t + Duration::from_secs(30);
        lan.set_local_addrs(["10.0.0.1:7120".parse().unwrap()]);
        // At most the one lonely beacon due in those 2 s.
        assert!(
            count_sent(&mut lan, t2, 2) <= 1,
            "same addresses: no new burst"
        );
        let t3 = t2 + Duration::from_secs(2);
        lan.set_local_addrs([
            "10.0.0.1:7120".parse().unwrap(),
            "10.0.0.7:7120".parse().unwrap(),
        ]);
        let burst = count_sent(&mut lan, t3, 2);
        assert!(
            (4..=5).contains(&burst),
            "new addresses: new burst, {burst}"
        );
        lan.set_local_addrs([]);
        assert_eq!(count_sent(&mut lan, t3 + Duration::from_secs(2), 30), 0);
    }

    #[test]
    fn local_addresses_are_deduplicated_and_capped() {
        let ks = keys(23, 9000);
        let mut lan = LanDiscovery::new(peer(0), ks, Rng::from_seed(23));
        let many =
            (1..20u16).flat_map(|p| [SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), p); 2]);
        lan.set_local_addrs(many);
        assert_eq!(lan.local_addrs().len(), MAX_ADDRS);
        lan.handle_timeout(Instant::now(), UNIX0);
        assert!(lan.poll_transmit().is_some());
    }

    #[test]
    fn sender_timestamps_increase_and_survive_small_clock_steps() {
        let ks = keys(24, 9000);
        let mut lan = node(peer(0), &ks, 24);
        let mut stamps = Vec::new();
        let t = Instant::now();
        // Same second, a 5 s step back, then a 1 h step back.
        for (i, unix) in [UNIX0, UNIX0, UNIX0 - 5, UNIX0 - 3600]
            .into_iter()
            .enumerate()
        {
            lan.burst_pending = true;
            lan.handle_timeout(t + Duration::from_secs(i as u64), unix);
            let bytes = lan.poll_transmit().unwrap();
            stamps.push(Beacon::open(&ks, unix, &bytes).unwrap().sent_at_unix_ms);
        }
        let base = UNIX0 * 1000;
        assert_eq!(stamps, [base, base + 1, base + 2, (UNIX0 - 3600) * 1000]);
    }

    #[test]
    fn same_seed_same_trace() {
        let ks = keys(25, 9000);
        let run = || {
            let mut sim = Sim::new(5, 25, &ks, 500);
            sim.loss = 0.1;
            sim.run_until(Duration::from_secs(30));
            sim.trace
        };
        assert_eq!(run(), run());
    }

    #[test]
    fn rotation_is_detected_from_the_key_schedule() {
        for interval in [1, 100, 9000, NEVER_ROTATE - 1] {
            assert!(
                LanDiscovery::new(peer(0), keys(26, interval), Rng::from_seed(0))
                    .checks_wall_clock()
            );
        }
        assert!(
            !LanDiscovery::new(peer(0), keys(26, NEVER_ROTATE), Rng::from_seed(0))
                .checks_wall_clock()
        );
    }
}
