//! VPN address allocation over the replicated ledger, in Kairos's vocabulary.
//!
//! # Ledger layout
//! - Bucket [`DHCP`], key = node uuid, value = `10.1.0.7` (dynamic) or `10.1.0.7 static`.
//! - Bucket [`MACHINES`], key = address, value = edgevpn's machine JSON (peer id, hostname, OS,
//!   arch, version, address), written by the node owning the address.
//!
//! # Ownership
//! Every node computes it from the ledger alone, so all agree once their ledgers are equal. Among
//! the claims naming one address, a static claim beats a dynamic one, then the lowest entry
//! version wins, then the lowest writer id (first come, first served: a lease is never lost to a
//! newcomer). Claims that do not parse, dynamic claims outside the usable hosts and static claims
//! outside the prefix are ignored and counted ([`Ipam::ignored_claims`]).
//!
//! # Allocation
//! - Dynamic: keep this uuid's claim when it is in the ledger (persisted, or learned from peers
//!   after a wiped state directory) and we own it. Otherwise, once the ledger is synced, probe
//!   from slot `fnv32a(uuid) % hosts` for an address no claim names and claim it. A fresh claim is
//!   only written once synced, so that an old lease the peers still hold can be found first.
//! - Static: claim the address with ` static` at once and keep it whatever other static claims
//!   say (reported as [`IpamEvent::Clash`]).
//!
//! # Settling
//! An address is reported ([`IpamEvent::Assigned`], later [`IpamEvent::Changed`]) only once our
//! claim has been held for [`IpamSettings::settle`] (a lease found at start counts from start),
//! still wins (static: always) and the caller says the ledger is synced. Conflicts thus resolve
//! before anybody uses an address.
//!
//! # Driver contract
//! Call [`Ipam::update`] after every ledger change, when `synced` changes and at
//! [`Ipam::poll_timeout`]; apply the writes it returns to the ledger before the next call.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use super::{Write, fnv32a};
use crate::config::Ipv4Cidr;
use crate::identity::PeerId;
use crate::ledger::names::{DHCP, MACHINES};
use crate::ledger::{Entry, Hlc, Ledger};

/// Suffix of a static claim's value.
const STATIC_SUFFIX: &str = "static";

/// What the allocator needs from the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpamSettings {
    /// `ADDRESS` as configured (e.g. `10.1.0.1/24`); its prefix is the VPN network.
    pub network: Ipv4Cidr,
    /// A fixed address for this node (`ADDRESS` with DHCP off), or `None` to allocate one.
    pub static_address: Option<Ipv4Addr>,
    /// How long a claim must be held before it is reported.
    pub settle: Duration,
    /// This node's hostname, for the `machines` entry.
    pub hostname: String,
}

/// What the allocator reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IpamEvent {
    /// This node's first settled address.
    Assigned {
        /// The address.
        addr: Ipv4Addr,
        /// The VPN prefix length.
        prefix_len: u8,
    },
    /// The settled address moved: an older claim on `old` showed up (a healed partition).
    Changed {
        /// The address used so far.
        old: Ipv4Addr,
        /// The address to use now.
        new: Ipv4Addr,
        /// The VPN prefix length.
        prefix_len: u8,
    },
    /// Another node claims our static address statically too (reported once per other node).
    Clash {
        /// Our static address.
        addr: Ipv4Addr,
        /// The other node's uuid.
        other_uuid: String,
    },
    /// No free address is left in the prefix (reported once; retried on every update).
    Exhausted,
}

/// The claim this node holds or is settling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Lease {
    addr: Ipv4Addr,
    /// Since when it counts as held.
    since: Instant,
}

/// The VPN allocator of one node (see the module documentation).
#[derive(Debug)]
pub struct Ipam {
    uuid: String,
    peer: PeerId,
    pool: Pool,
    static_address: Option<Ipv4Addr>,
    settle: Duration,
    hostname: String,
    started: Instant,
    lease: Option<Lease>,
    /// The address last reported by `Assigned` or `Changed`.
    settled: Option<Ipv4Addr>,
    /// When the settle period of `lease` ends, if `update` has to run then.
    deadline: Option<Instant>,
    /// `Exhausted` was reported and no lease was taken since.
    exhausted: bool,
    /// Uuids already reported in a `Clash`.
    clashes: BTreeSet<String>,
    ignored_claims: usize,
    lost_claims: u64,
    /// The claims as of the last update.
    claims: Claims,
}

impl Ipam {
    /// An allocator for node `uuid` (ledger writer `peer`), started at `now`. A static address
    /// outside the network's prefix is refused with a warning: the node allocates one instead.
    pub fn new(now: Instant, uuid: String, peer: PeerId, settings: IpamSettings) -> Self {
        let pool = Pool::new(settings.network);
        let static_address = settings.static_address.filter(|&a| {
            let inside = pool.contains(a);
            if !inside {
                log::warn!(
                    "ipam: static address {a} is outside the VPN network {}; allocating one instead",
                    settings.network
                );
            }
            inside
        });
        Self {
            uuid,
            peer,
            pool,
            static_address,
            settle: settings.settle,
            hostname: settings.hostname,
            started: now,
            lease: None,
            settled: None,
            deadline: None,
            exhausted: false,
            clashes: BTreeSet::new(),
            ignored_claims: 0,
            lost_claims: 0,
            claims: Claims::default(),
        }
    }

    /// Reads the `dhcp` claims changed since the last call and acts; call after every ledger
    /// change and at `poll_timeout`, always with the same ledger.
    /// `synced`: the ledger has exchanged with a peer, or the node has been alone long enough.
    pub fn update(
        &mut self,
        now: Instant,
        ledger: &Ledger,
        synced: bool,
        writes: &mut Vec<Write>,
        events: &mut Vec<IpamEvent>,
    ) {
        let mut claims = std::mem::take(&mut self.claims);
        claims.refresh(ledger, Some(&self.pool));
        let ignored = claims.ignored();
        if ignored != self.ignored_claims && ignored > 0 {
            log::warn!(
                "ipam: ignoring {ignored} malformed or out-of-network claims in the {DHCP} bucket"
            );
        }
        self.ignored_claims = ignored;
        match self.static_address {
            Some(addr) => self.hold_static(now, addr, &claims, writes, events),
            None => self.hold_dynamic(now, &claims, synced, writes, events),
        }
        self.settle_lease(now, ledger, synced, writes, events);
        if let Some(addr) = self.settled {
            if claims.owner(addr).is_some_and(|c| c.uuid == self.uuid) {
                self.publish_machine(ledger, addr, writes);
            }
        }
        self.claims = claims;
        self.deadline = match self.lease {
            Some(lease) if self.settled != Some(lease.addr) => lease
                .since
                .checked_add(self.settle)
                .filter(|&end| end > now),
            _ => None,
        };
    }

    /// When the current claim's settle period ends, if `update` is waiting for it.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.deadline
    }

    /// The settled address: the last one reported by `Assigned` or `Changed`.
    pub fn address(&self) -> Option<Ipv4Addr> {
        self.settled
    }

    /// The VPN prefix length.
    pub fn prefix_len(&self) -> u8 {
        self.pool.prefix_len
    }

    /// Claims in the `dhcp` bucket ignored at the last update (unparsable or out of the network).
    pub fn ignored_claims(&self) -> usize {
        self.ignored_claims
    }

    /// How many times one of our dynamic claims lost to an older one.
    pub fn lost_claims(&self) -> u64 {
        self.lost_claims
    }

    /// The uuid owning `addr` by the ownership rule, among the claims that parse (whatever the
    /// prefix: the ledger does not know it).
    pub fn owner_of(ledger: &Ledger, addr: Ipv4Addr) -> Option<String> {
        Claims::read(ledger, None)
            .owner(addr)
            .map(|c| c.uuid.clone())
    }

    /// The peer holding each leased address: for the winning claim on it (the rule above), the
    /// peer bound to the claim's uuid (see [`Ledger::bound_peer`]), else the claim's writer. The
    /// VPN routes an address only to its holder (`vpn::routes`), so that a member cannot publish
    /// another node's address as its own. O(claims · log claims).
    pub fn lease_holders(ledger: &Ledger) -> BTreeMap<Ipv4Addr, PeerId> {
        let claims = Claims::read(ledger, None);
        claims
            .by_addr
            .keys()
            .filter_map(|&addr| claims.owner(addr))
            .map(|c| (c.addr, ledger.bound_peer(&c.uuid).unwrap_or(c.writer)))
            .collect()
    }

    /// Static mode: keeps `addr ... static` in the ledger and reports other static claims on it.
    fn hold_static(
        &mut self,
        now: Instant,
        addr: Ipv4Addr,
        claims: &Claims,
        writes: &mut Vec<Write>,
        events: &mut Vec<IpamEvent>,
    ) {
        let in_ledger = claims
            .of(&self.uuid)
            .is_some_and(|c| c.is_static && c.addr == addr);
        if !in_ledger {
            writes.push(Write::put(
                DHCP,
                &self.uuid,
                format!("{addr} {STATIC_SUFFIX}"),
            ));
        }
        if self.lease.is_none() {
            let since = if in_ledger { self.started } else { now };
            self.lease = Some(Lease { addr, since });
        }
        for other in claims
            .on(addr)
            .filter(|c| c.is_static && c.uuid != self.uuid)
        {
            if self.clashes.insert(other.uuid.clone()) {
                log::warn!(
                    "ipam: node {} also claims the static address {addr}; keeping it as configured",
                    other.uuid
                );
                events.push(IpamEvent::Clash {
                    addr,
                    other_uuid: other.uuid.to_owned(),
                });
            }
        }
    }

    /// Dynamic mode: keeps our owned claim, or picks and writes a free address once synced.
    fn hold_dynamic(
        &mut self,
        now: Instant,
        claims: &Claims,
        synced: bool,
        writes: &mut Vec<Write>,
        events: &mut Vec<IpamEvent>,
    ) {
        let ours = claims.of(&self.uuid).filter(|c| !c.is_static);
        let owned = ours
            .filter(|c| claims.owner(c.addr).is_some_and(|o| o.uuid == self.uuid))
            .map(|c| c.addr);
        if let Some(addr) = owned {
            if self.lease.map(|l| l.addr) != Some(addr) {
                // Found in the ledger: at start it counts from start, later from now.
                let first = self.lease.is_none() && self.settled.is_none();
                let since = if first { self.started } else { now };
                self.lease = Some(Lease { addr, since });
            }
            self.exhausted = false;
            return;
        }
        if let (Some(lease), Some(claim)) = (self.lease, ours) {
            if claim.addr == lease.addr {
                self.lost_claims += 1;
                let owner = claims.owner(lease.addr).map_or("?", |o| o.uuid.as_str());
                log::info!(
                    "ipam: {} belongs to {owner} (an older claim); picking another address",
                    lease.addr
                );
            }
        }
        if !synced {
            self.lease = None;
            return;
        }
        match self.pick(claims) {
            Some(addr) => {
                let since = match self.lease {
                    Some(l) if l.addr == addr => l.since,
                    _ => now,
                };
                writes.push(Write::put(DHCP, &self.uuid, addr.to_string()));
                self.lease = Some(Lease { addr, since });
                self.exhausted = false;
            }
            None => {
                self.lease = None;
                if !self.exhausted {
                    self.exhausted = true;
                    log::warn!(
                        "ipam: no free address left in {}/{}",
                        Ipv4Addr::from(self.pool.network),
                        self.pool.prefix_len
                    );
                    events.push(IpamEvent::Exhausted);
                }
            }
        }
    }

    /// The first address from our hash slot on that no claim but ours names.
    fn pick(&self, claims: &Claims) -> Option<Ipv4Addr> {
        let count = self.pool.host_count();
        if count == 0 {
            return None;
        }
        // Among named + 1 distinct hosts at least one is free: no need to look further.
        let tries = u32::try_from(claims.named_by_others(&self.uuid))
            .unwrap_or(u32::MAX)
            .saturating_add(1)
            .min(count);
        let slot = fnv32a(&self.uuid) % count;
        (0..tries)
            .map(|i| {
                let index = if i < count - slot {
                    slot + i
                } else {
                    i - (count - slot)
                };
                self.pool.host(index)
            })
            .find(|a| !claims.named_by_other(*a, &self.uuid))
    }

    /// Reports the lease once it has settled.
    fn settle_lease(
        &mut self,
        now: Instant,
        ledger: &Ledger,
        synced: bool,
        writes: &mut Vec<Write>,
        events: &mut Vec<IpamEvent>,
    ) {
        let Some(lease) = self.lease else { return };
        if self.settled == Some(lease.addr)
            || !synced
            || now.saturating_duration_since(lease.since) < self.settle
        {
            return;
        }
        let prefix_len = self.pool.prefix_len;
        match self.settled.replace(lease.addr) {
            None => {
                log::info!("ipam: VPN address {}/{prefix_len}", lease.addr);
                events.push(IpamEvent::Assigned {
                    addr: lease.addr,
                    prefix_len,
                });
            }
            Some(old) => {
                log::info!("ipam: VPN address moves from {old} to {}", lease.addr);
                events.push(IpamEvent::Changed {
                    old,
                    new: lease.addr,
                    prefix_len,
                });
                self.retire_machine(ledger, old, writes);
            }
        }
    }

    /// Writes our `machines` entry for `addr` unless the ledger already holds it.
    fn publish_machine(&self, ledger: &Ledger, addr: Ipv4Addr, writes: &mut Vec<Write>) {
        let key = addr.to_string();
        let value = serde_json::json!({
            "PeerID": self.peer.to_string(),
            "Hostname": self.hostname,
            "OS": std::env::consts::OS,
            "Arch": std::env::consts::ARCH,
            "Address": key,
            "Version": env!("CARGO_PKG_VERSION"),
        })
        .to_string();
        if ledger.get(MACHINES, &key) != Some(value.as_bytes()) {
            writes.push(Write::put(MACHINES, &key, value));
        }
    }

    /// Deletes the `machines` entry of an address we left, if it is still ours.
    fn retire_machine(&self, ledger: &Ledger, addr: Ipv4Addr, writes: &mut Vec<Write>) {
        let key = addr.to_string();
        let Some(entry) = ledger.entry(MACHINES, &key) else {
            return;
        };
        let Some(value) = entry.value.as_deref() else {
            return;
        };
        let names_us = serde_json::from_slice::<serde_json::Value>(value)
            .ok()
            .and_then(|v| {
                v.get("PeerID")?
                    .as_str()
                    .map(|p| p == self.peer.to_string())
            })
            .unwrap_or(false);
        if entry.writer == self.peer || names_us {
            writes.push(Write::delete(MACHINES, &key));
        }
    }
}

/// The VPN prefix and its usable host addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pool {
    network: u32,
    prefix_len: u8,
}

impl Pool {
    fn new(cidr: Ipv4Cidr) -> Self {
        let prefix_len = cidr.prefix_len.min(32);
        Self {
            network: u32::from(cidr.addr) & Self::mask(prefix_len),
            prefix_len,
        }
    }

    fn mask(prefix_len: u8) -> u32 {
        u32::MAX
            .checked_shl(32 - u32::from(prefix_len))
            .unwrap_or(0)
    }

    /// True for any address of the prefix, network and broadcast included.
    fn contains(&self, addr: Ipv4Addr) -> bool {
        u32::from(addr) & Self::mask(self.prefix_len) == self.network
    }

    /// The first usable host: the network address itself for /31 and /32.
    fn first_host(&self) -> u32 {
        if self.prefix_len <= 30 {
            self.network + 1
        } else {
            self.network
        }
    }

    /// Addresses dynamic allocation may hand out: all but the network and broadcast addresses;
    /// both addresses of a /31 (RFC 3021); none of a /32 (static only).
    fn host_count(&self) -> u32 {
        match self.prefix_len {
            0..=30 => (u32::MAX >> self.prefix_len) - 1,
            31 => 2,
            _ => 0,
        }
    }

    /// True for an address dynamic allocation may hand out.
    fn is_host(&self, addr: Ipv4Addr) -> bool {
        self.contains(addr) && u32::from(addr).wrapping_sub(self.first_host()) < self.host_count()
    }

    /// Host number `index` (below `host_count`).
    fn host(&self, index: u32) -> Ipv4Addr {
        Ipv4Addr::from(self.first_host().wrapping_add(index))
    }
}

/// One valid claim of the `dhcp` bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Claim {
    uuid: String,
    addr: Ipv4Addr,
    is_static: bool,
    version: Hlc,
    writer: PeerId,
}

/// The order of claims on one address: lowest wins (see [`Claim::rank`]).
type Rank = (bool, Hlc, PeerId, String);

impl Claim {
    /// Lowest wins: static first, then oldest version, then lowest writer (then uuid, so that
    /// the order is total).
    fn rank(&self) -> Rank {
        (
            !self.is_static,
            self.version,
            self.writer,
            self.uuid.clone(),
        )
    }
}

/// The valid claims of the `dhcp` bucket and how many were ignored, indexed by uuid and by
/// address. The allocator keeps one between updates and reads only the claims changed since
/// ([`Ledger::changed_since`], when the ledger [follows](Ledger::follow) the bucket, as the
/// cluster layer's does): a pass costs O(changes), not O(claims) (every node of a network
/// claims an address, so re-reading the bucket at every pass cost each node O(nodes) per pass).
#[derive(Debug, Default)]
struct Claims {
    /// The ledger change read up to (`None`: nothing read yet).
    seen: Option<u64>,
    by_uuid: BTreeMap<String, Claim>,
    /// The claims naming each address, best first (sorted; nearly always one, and a vector of
    /// one costs a tenth of a set's first node, for every address of the network on every node).
    by_addr: BTreeMap<Ipv4Addr, Vec<Rank>>,
    /// Uuids whose claim does not parse or lies outside the pool.
    ignored: BTreeSet<String>,
}

impl Claims {
    /// Reads the whole `dhcp` bucket; with a pool, drops the claims outside it.
    fn read(ledger: &Ledger, pool: Option<&Pool>) -> Self {
        let mut claims = Self::default();
        claims.refresh(ledger, pool);
        claims
    }

    /// Brings the index up to date with `ledger` (the same ledger and pool at every call):
    /// reads the claims changed since the last call, or the whole bucket when the ledger
    /// cannot list them.
    fn refresh(&mut self, ledger: &Ledger, pool: Option<&Pool>) {
        let now = ledger.change_seq();
        if self.seen == Some(now) {
            return;
        }
        match self.seen.and_then(|seen| ledger.changed_since(DHCP, seen)) {
            Some(changes) => {
                for (uuid, entry) in changes {
                    self.set(uuid, entry, pool);
                }
            }
            None => {
                self.by_uuid.clear();
                self.by_addr.clear();
                self.ignored.clear();
                for (uuid, _) in ledger.bucket(DHCP) {
                    self.set(uuid, ledger.entry(DHCP, uuid), pool);
                }
            }
        }
        self.seen = Some(now);
    }

    /// Replaces the claim of `uuid` with what `entry` (its `dhcp` entry now) says.
    fn set(&mut self, uuid: &str, entry: Option<&Entry>, pool: Option<&Pool>) {
        self.ignored.remove(uuid);
        if let Some(old) = self.by_uuid.remove(uuid) {
            if let Some(on_addr) = self.by_addr.get_mut(&old.addr) {
                if let Ok(at) = on_addr.binary_search(&old.rank()) {
                    on_addr.remove(at);
                }
                if on_addr.is_empty() {
                    self.by_addr.remove(&old.addr);
                }
            }
        }
        let Some((entry, value)) = entry.and_then(|e| e.value.as_deref().map(|v| (e, v))) else {
            return;
        };
        let claim = parse_claim(value).filter(|&(addr, is_static)| {
            pool.is_none_or(|p| {
                if is_static {
                    p.contains(addr)
                } else {
                    p.is_host(addr)
                }
            })
        });
        let Some((addr, is_static)) = claim else {
            self.ignored.insert(uuid.to_owned());
            return;
        };
        let claim = Claim {
            uuid: uuid.to_owned(),
            addr,
            is_static,
            version: entry.version,
            writer: entry.writer,
        };
        let on_addr = self
            .by_addr
            .entry(addr)
            .or_insert_with(|| Vec::with_capacity(1));
        let rank = claim.rank();
        if let Err(at) = on_addr.binary_search(&rank) {
            on_addr.insert(at, rank);
        }
        self.by_uuid.insert(claim.uuid.clone(), claim);
    }

    /// How many claims were ignored.
    fn ignored(&self) -> usize {
        self.ignored.len()
    }

    /// The claim of `uuid`, if valid.
    fn of(&self, uuid: &str) -> Option<&Claim> {
        self.by_uuid.get(uuid)
    }

    /// The winning claim on `addr`.
    fn owner(&self, addr: Ipv4Addr) -> Option<&Claim> {
        let best = self.by_addr.get(&addr)?.first()?;
        self.by_uuid.get(&best.3)
    }

    /// The claims naming `addr`, best first.
    fn on(&self, addr: Ipv4Addr) -> impl Iterator<Item = &Claim> {
        self.by_addr
            .get(&addr)
            .into_iter()
            .flatten()
            .filter_map(|rank| self.by_uuid.get(&rank.3))
    }

    /// Whether a claim of another uuid than `uuid` names `addr`.
    fn named_by_other(&self, addr: Ipv4Addr, uuid: &str) -> bool {
        self.by_addr
            .get(&addr)
            .is_some_and(|on| on.iter().any(|rank| rank.3 != uuid))
    }

    /// How many addresses claims of other uuids than `uuid` name.
    fn named_by_others(&self, uuid: &str) -> usize {
        let own_alone = self
            .of(uuid)
            .is_some_and(|c| !self.named_by_other(c.addr, uuid));
        self.by_addr.len() - usize::from(own_alone)
    }
}

/// `10.1.0.7` (dynamic) or `10.1.0.7 static`; surrounding whitespace is tolerated.
fn parse_claim(value: &[u8]) -> Option<(Ipv4Addr, bool)> {
    let text = std::str::from_utf8(value).ok()?.trim();
    let (addr, is_static) = match text.split_once(' ') {
        Some((addr, kind)) if kind.trim() == STATIC_SUFFIX => (addr, true),
        Some(_) => return None,
        None => (text, false),
    };
    Some((addr.parse().ok()?, is_static))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;
    use crate::ledger::{Clock, Entry};
    use crate::rng::Rng;

    const T0_MS: u64 = 1_760_000_000_000;
    const SETTLE: Duration = Duration::from_secs(1);

    fn cidr(s: &str) -> Ipv4Cidr {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn settings(network: &str, static_address: Option<&str>) -> IpamSettings {
        IpamSettings {
            network: cidr(network),
            static_address: static_address.map(ip),
            settle: SETTLE,
            hostname: "host".to_owned(),
        }
    }

    /// One node: its allocator, ledger and writer identity, and every event it reported.
    struct Node {
        uuid: String,
        ipam: Ipam,
        ledger: Ledger,
        identity: Identity,
        clock: Clock,
        events: Vec<IpamEvent>,
        /// Ledger writes made so far.
        writes: usize,
    }

    impl Node {
        fn new(seed: u8, uuid: &str, start: Instant, settings: IpamSettings) -> Self {
            let identity = Identity::from_seed([seed; 32]);
            Node {
                uuid: uuid.to_owned(),
                ipam: Ipam::new(start, uuid.to_owned(), identity.peer_id(), settings),
                ledger: Ledger::default(),
                identity,
                clock: Clock::new(),
                events: Vec::new(),
                writes: 0,
            }
        }

        /// Updates, applies the writes, and again until nothing more is written.
        fn step(&mut self, t0: Instant, now: Instant, synced: bool) -> Vec<IpamEvent> {
            let mut events = Vec::new();
            for _ in 0..8 {
                let mut writes = Vec::new();
                self.ipam
                    .update(now, &self.ledger, synced, &mut writes, &mut events);
                if writes.is_empty() {
                    break;
                }
                self.writes += writes.len();
                for w in writes {
                    self.write(&w.bucket, &w.key, w.value.as_deref(), ms(t0, now));
                }
            }
            self.events.extend(events.iter().cloned());
            events
        }

        fn write(&mut self, bucket: &str, key: &str, value: Option<&[u8]>, unix_ms: u64) {
            let (id, clock) = (&self.identity, &mut self.clock);
            match value {
                Some(v) => self.ledger.put(id, clock, bucket, key, v, unix_ms),
                None => self.ledger.delete(id, clock, bucket, key, unix_ms),
            }
            .unwrap();
        }

        fn learn(&mut self, entries: &[Entry], unix_ms: u64) {
            for e in entries {
                self.ledger.apply(e.clone(), unix_ms).unwrap();
            }
        }

        fn entries(&self) -> Vec<Entry> {
            self.ledger.entries().cloned().collect()
        }

        fn assigned(&self) -> usize {
            self.events
                .iter()
                .filter(|e| matches!(e, IpamEvent::Assigned { .. }))
                .count()
        }
    }

    fn ms(t0: Instant, now: Instant) -> u64 {
        T0_MS + u64::try_from(now.duration_since(t0).as_millis()).unwrap()
    }

    /// Both nodes end with the union of their ledgers.
    fn exchange(nodes: &mut [Node], a: usize, b: usize, unix_ms: u64) {
        let (ea, eb) = (nodes[a].entries(), nodes[b].entries());
        nodes[a].learn(&eb, unix_ms);
        nodes[b].learn(&ea, unix_ms);
    }

    /// The dynamic address `uuid` tries first in `pool`.
    fn slot_address(pool: &Pool, uuid: &str) -> Ipv4Addr {
        pool.host(fnv32a(uuid) % pool.host_count())
    }

    #[test]
    fn host_range_per_prefix() {
        // (ADDRESS, network, first host, host count, last host)
        let table = [
            (
                "10.1.0.1/24",
                "10.1.0.0",
                "10.1.0.1",
                254,
                Some("10.1.0.254"),
            ),
            ("10.1.0.1/30", "10.1.0.0", "10.1.0.1", 2, Some("10.1.0.2")),
            ("10.1.0.7/31", "10.1.0.6", "10.1.0.6", 2, Some("10.1.0.7")),
            ("10.1.0.9/32", "10.1.0.9", "10.1.0.9", 0, None),
            (
                "192.168.7.200/25",
                "192.168.7.128",
                "192.168.7.129",
                126,
                Some("192.168.7.254"),
            ),
            (
                "10.0.0.0/8",
                "10.0.0.0",
                "10.0.0.1",
                16_777_214,
                Some("10.255.255.254"),
            ),
        ];
        for (address, network, first, count, last) in table {
            let pool = Pool::new(cidr(address));
            assert_eq!(Ipv4Addr::from(pool.network), ip(network), "{address}");
            assert_eq!(pool.host_count(), count, "{address}");
            assert_eq!(pool.host(0), ip(first), "{address}");
            assert!(pool.contains(ip(address.split('/').next().unwrap())));
            if let Some(last) = last {
                assert_eq!(pool.host(count - 1), ip(last), "{address}");
                assert!(
                    pool.is_host(ip(first)) && pool.is_host(ip(last)),
                    "{address}"
                );
                let after = Ipv4Addr::from(u32::from(ip(last)) + 1);
                assert!(!pool.is_host(after), "{address}");
            }
        }
        let pool = Pool::new(cidr("10.1.0.1/24"));
        for (addr, contains, host) in [
            ("10.1.0.0", true, false),
            ("10.1.0.255", true, false),
            ("10.1.0.128", true, true),
            ("10.1.1.1", false, false),
            ("10.0.255.255", false, false),
        ] {
            assert_eq!(pool.contains(ip(addr)), contains, "{addr}");
            assert_eq!(pool.is_host(ip(addr)), host, "{addr}");
        }
        let single = Pool::new(cidr("10.1.0.9/32"));
        assert!(single.contains(ip("10.1.0.9")) && !single.is_host(ip("10.1.0.9")));
        assert!(!single.contains(ip("10.1.0.8")));
    }

    #[test]
    fn kept_claims_match_a_fresh_read_after_every_change() {
        let ids: Vec<Identity> = (1..=3).map(|n| Identity::from_seed([n; 32])).collect();
        let mut clock = Clock::new();
        let mut rng = Rng::from_seed(11);
        let pool = Pool::new(cidr("10.1.0.0/29"));
        let mut ledger = Ledger::default();
        ledger.follow(DHCP);
        let mut kept = Claims::default();
        let values = [
            "10.1.0.1",
            "10.1.0.2",
            "10.1.0.3 static",
            "10.1.0.0",
            "10.9.0.1",
            "x",
        ];
        for step in 0..400u64 {
            let id = &ids[rng.below(3) as usize];
            let key = format!("n{}", rng.below(8));
            let ms = T0_MS + step * 10;
            if rng.chance(0.2) {
                ledger.delete(id, &mut clock, DHCP, &key, ms).unwrap();
            } else {
                let v = values[rng.below(values.len() as u64) as usize];
                ledger
                    .put(id, &mut clock, DHCP, &key, v.as_bytes(), ms)
                    .unwrap();
            }
            if step % 50 == 49 {
                ledger.expire(ms + 2 * 24 * 3_600_000);
            }
            if rng.chance(0.5) {
                kept.refresh(&ledger, Some(&pool));
                let fresh = Claims::read(&ledger, Some(&pool));
                assert_eq!(kept.by_uuid, fresh.by_uuid, "step {step}");
                assert_eq!(kept.by_addr, fresh.by_addr, "step {step}");
                assert_eq!(kept.ignored, fresh.ignored, "step {step}");
                for uuid in (0..8).map(|n| format!("n{n}")) {
                    assert_eq!(kept.named_by_others(&uuid), fresh.named_by_others(&uuid));
                }
            }
        }
    }

    #[test]
    fn claim_values_parse() {
        let table = [
            ("10.1.0.7", Some(("10.1.0.7", false))),
            ("10.1.0.7 static", Some(("10.1.0.7", true))),
            (" 10.1.0.7 static\n", Some(("10.1.0.7", true))),
            ("10.1.0.7 dynamic", None),
            ("10.1.0.7 static static", None),
            ("10.1.0.300", None),
            ("10.1.0.7/24", None),
            ("static", None),
            ("", None),
        ];
        for (value, want) in table {
            let want = want.map(|(a, s)| (ip(a), s));
            assert_eq!(parse_claim(value.as_bytes()), want, "{value:?}");
        }
        assert_eq!(parse_claim(b"\xff\xfe"), None);
    }

    #[test]
    fn single_node_gets_an_address_after_settle_when_synced() {
        let t0 = Instant::now();
        let mut n = Node::new(1, "m1-node1", t0, settings("10.1.0.1/24", None));
        // Not synced: nothing is written, nothing reported.
        assert!(n.step(t0, t0, false).is_empty());
        assert!(n.ledger.get(DHCP, "m1-node1").is_none());
        assert_eq!(n.ipam.poll_timeout(), None);

        let t1 = t0 + Duration::from_millis(300);
        assert!(n.step(t0, t1, true).is_empty());
        let want = slot_address(&n.ipam.pool, "m1-node1");
        assert_eq!(
            n.ledger.get(DHCP, "m1-node1"),
            Some(want.to_string().as_bytes())
        );
        assert_eq!(n.ipam.poll_timeout(), Some(t1 + SETTLE));
        assert_eq!(n.ipam.address(), None);

        assert!(n.step(t0, t1 + SETTLE / 2, true).is_empty());
        // Settled but not synced: still waiting, and no timer to spin on.
        assert!(n.step(t0, t1 + SETTLE, false).is_empty());
        assert_eq!(n.ipam.poll_timeout(), None);
        let events = n.step(t0, t1 + SETTLE, true);
        assert_eq!(
            events,
            [IpamEvent::Assigned {
                addr: want,
                prefix_len: 24
            }]
        );
        assert_eq!(n.ipam.address(), Some(want));
        assert_eq!(n.ipam.poll_timeout(), None);
        assert!(n.step(t0, t1 + 10 * SETTLE, true).is_empty());
        assert_eq!(Ipam::owner_of(&n.ledger, want).as_deref(), Some("m1-node1"));
    }

    #[test]
    fn machines_entry_names_this_peer() {
        let t0 = Instant::now();
        let mut n = Node::new(1, "m1-node1", t0, settings("10.1.0.1/24", None));
        n.step(t0, t0, true);
        n.step(t0, t0 + SETTLE, true);
        let addr = n.ipam.address().unwrap();
        let raw = n.ledger.get(MACHINES, &addr.to_string()).unwrap();
        let v: serde_json::Value = serde_json::from_slice(raw).unwrap();
        assert_eq!(v["PeerID"], n.identity.peer_id().to_string());
        assert_eq!(v["Hostname"], "host");
        assert_eq!(v["OS"], std::env::consts::OS);
        assert_eq!(v["Arch"], std::env::consts::ARCH);
        assert_eq!(v["Version"], env!("CARGO_PKG_VERSION"));
        assert_eq!(v["Address"], addr.to_string());
        // Written once: a later update finds it in place.
        let mut writes = Vec::new();
        n.ipam.update(
            t0 + 2 * SETTLE,
            &n.ledger,
            true,
            &mut writes,
            &mut Vec::new(),
        );
        assert!(writes.is_empty());
    }

    /// A uuid other than `uuid` whose first choice in `pool` is the same address.
    fn colliding_uuid(pool: &Pool, uuid: &str) -> String {
        let want = slot_address(pool, uuid);
        (0..100_000)
            .map(|i| format!("m{i}-other"))
            .find(|u| slot_address(pool, u) == want)
            .unwrap()
    }

    #[test]
    fn concurrent_claims_on_one_address_leave_one_owner() {
        let t0 = Instant::now();
        let s = settings("10.1.0.1/24", None);
        let pool = Pool::new(s.network);
        let other = colliding_uuid(&pool, "m1-a");
        let mut nodes = vec![
            Node::new(1, "m1-a", t0, s.clone()),
            Node::new(2, &other, t0, s),
        ];
        // Both alone and synced: both claim the same address at the same moment.
        for n in &mut nodes {
            n.step(t0, t0, true);
        }
        let same = slot_address(&pool, "m1-a");
        for n in &nodes {
            assert_eq!(
                n.ledger.get(DHCP, &n.uuid),
                Some(same.to_string().as_bytes())
            );
        }
        let t1 = t0 + SETTLE / 10;
        exchange(&mut nodes, 0, 1, ms(t0, t1));
        for n in &mut nodes {
            assert!(n.step(t0, t1, true).is_empty());
        }
        let owner = Ipam::owner_of(&nodes[0].ledger, same).unwrap();
        let (winner, loser) = if owner == nodes[0].uuid {
            (0, 1)
        } else {
            (1, 0)
        };
        assert_eq!(nodes[loser].ipam.lost_claims(), 1);
        assert_eq!(nodes[winner].ipam.lost_claims(), 0);
        exchange(&mut nodes, 0, 1, ms(t0, t1));

        // The winner settles on time; the loser's new claim is younger and waits its turn.
        assert_eq!(
            nodes[winner].step(t0, t0 + SETTLE, true),
            [IpamEvent::Assigned {
                addr: same,
                prefix_len: 24
            }]
        );
        assert!(nodes[loser].step(t0, t0 + SETTLE, true).is_empty());
        let events = nodes[loser].step(t0, t1 + SETTLE, true);
        let [IpamEvent::Assigned { addr, .. }] = events[..] else {
            panic!("{events:?}");
        };
        assert_ne!(addr, same);
        exchange(&mut nodes, 0, 1, ms(t0, t1 + SETTLE));
        for n in &mut nodes {
            assert!(n.step(t0, t1 + 5 * SETTLE, true).is_empty());
            assert_eq!(n.assigned(), 1);
            let mine = n.ipam.address().unwrap();
            assert_eq!(
                Ipam::owner_of(&n.ledger, mine).as_deref(),
                Some(&n.uuid[..])
            );
        }
    }

    #[test]
    fn kept_lease_survives_a_restart() {
        let t0 = Instant::now();
        let mut n = Node::new(1, "m1-node1", t0, settings("10.1.0.1/24", None));
        n.step(t0, t0, true);
        n.step(t0, t0 + SETTLE, true);
        let addr = n.ipam.address().unwrap();

        let t1 = t0 + 100 * SETTLE;
        let peer = n.identity.peer_id();
        n.ipam = Ipam::new(t1, n.uuid.clone(), peer, settings("10.1.0.1/24", None));
        let before = n.ledger.len();
        let mut writes = Vec::new();
        let mut events = Vec::new();
        n.ipam.update(t1, &n.ledger, true, &mut writes, &mut events);
        assert!(writes.is_empty() && events.is_empty());
        assert_eq!(n.ipam.poll_timeout(), Some(t1 + SETTLE));
        assert_eq!(
            n.step(t0, t1 + SETTLE, true),
            [IpamEvent::Assigned {
                addr,
                prefix_len: 24
            }]
        );
        // Nothing rewritten: neither the claim nor the machines entry.
        assert_eq!(n.ledger.len(), before);
    }

    #[test]
    fn lease_recovered_after_a_wiped_state() {
        let t0 = Instant::now();
        let s = settings("10.1.0.1/24", None);
        let pool = Pool::new(s.network);
        let other = colliding_uuid(&pool, "m1-me");
        let mut nodes = vec![
            Node::new(1, &other, t0, s.clone()),
            Node::new(2, "m1-me", t0, s.clone()),
        ];
        // The other node takes our first choice, so we end up on the next address.
        nodes[0].step(t0, t0, true);
        exchange(&mut nodes, 0, 1, T0_MS);
        nodes[1].step(t0, t0, true);
        let ours = nodes[1]
            .ledger
            .get(DHCP, "m1-me")
            .map(<[u8]>::to_vec)
            .unwrap();
        assert_ne!(ours, slot_address(&pool, "m1-me").to_string().into_bytes());
        exchange(&mut nodes, 0, 1, T0_MS);
        // The other node leaves: our first choice is free again.
        let t1 = t0 + 10 * SETTLE;
        nodes[0].write(DHCP, &other, None, ms(t0, t1));

        // Our state directory is wiped: new identity, empty ledger.
        let t2 = t0 + 20 * SETTLE;
        let mut me = Node::new(3, "m1-me", t2, s);
        assert!(me.step(t0, t2, false).is_empty());
        assert!(me.ledger.is_empty());
        me.learn(&nodes[0].entries(), ms(t0, t2));
        let t3 = t2 + SETTLE / 2;
        assert!(me.step(t0, t3, true).is_empty());
        assert_eq!(me.ledger.get(DHCP, "m1-me"), Some(&ours[..]));
        let events = me.step(t0, t2 + SETTLE, true);
        let want: Ipv4Addr = std::str::from_utf8(&ours).unwrap().parse().unwrap();
        assert_eq!(
            events,
            [IpamEvent::Assigned {
                addr: want,
                prefix_len: 24
            }]
        );
        // The claim is still the one the old identity wrote.
        let entry = me.ledger.entry(DHCP, "m1-me").unwrap();
        assert_eq!(entry.writer, nodes[1].identity.peer_id());
    }

    #[test]
    fn static_address_is_claimed_and_beats_dynamic() {
        let t0 = Instant::now();
        let mut nodes = vec![Node::new(1, "m1-dyn", t0, settings("10.1.0.1/24", None))];
        nodes[0].step(t0, t0, true);
        nodes[0].step(t0, t0 + SETTLE, true);
        let taken = nodes[0].ipam.address().unwrap();

        // A static node configured with that very address joins later.
        let t1 = t0 + 5 * SETTLE;
        let s = settings(&format!("{taken}/24"), Some(&taken.to_string()));
        nodes.push(Node::new(2, "m2-static", t1, s));
        nodes[1].step(t0, t1, false);
        let want = format!("{taken} static");
        assert_eq!(
            nodes[1].ledger.get(DHCP, "m2-static"),
            Some(want.as_bytes())
        );
        exchange(&mut nodes, 0, 1, ms(t0, t1));
        assert_eq!(
            Ipam::owner_of(&nodes[0].ledger, taken).as_deref(),
            Some("m2-static")
        );
        let t2 = t1 + SETTLE;
        assert_eq!(
            nodes[1].step(t0, t2, true),
            [IpamEvent::Assigned {
                addr: taken,
                prefix_len: 24
            }]
        );
        assert!(nodes[0].step(t0, t1, true).is_empty());
        assert_eq!(nodes[0].ipam.lost_claims(), 1);
        let events = nodes[0].step(t0, t2, true);
        let [IpamEvent::Changed { old, new, .. }] = events[..] else {
            panic!("{events:?}");
        };
        assert_eq!(old, taken);
        assert_ne!(new, taken);
        // The dynamic node removed its own machines entry, not the static node's.
        exchange(&mut nodes, 0, 1, ms(t0, t2));
        for n in &mut nodes {
            n.step(t0, t2, true);
        }
        exchange(&mut nodes, 0, 1, ms(t0, t2));
        let raw = nodes[0].ledger.get(MACHINES, &taken.to_string()).unwrap();
        let v: serde_json::Value = serde_json::from_slice(raw).unwrap();
        assert_eq!(v["PeerID"], nodes[1].identity.peer_id().to_string());
        assert!(nodes[0].ledger.get(MACHINES, &new.to_string()).is_some());
    }

    #[test]
    fn two_static_claims_clash_and_both_keep() {
        let t0 = Instant::now();
        let s = settings("10.1.0.9/24", Some("10.1.0.9"));
        let mut nodes = vec![
            Node::new(1, "m1-a", t0, s.clone()),
            Node::new(2, "m2-b", t0, s),
        ];
        for n in &mut nodes {
            n.step(t0, t0, true);
        }
        exchange(&mut nodes, 0, 1, T0_MS);
        for round in 0..3 {
            let now = t0 + SETTLE * round;
            for n in &mut nodes {
                n.step(t0, now, true);
            }
            exchange(&mut nodes, 0, 1, ms(t0, now));
        }
        for (i, n) in nodes.iter().enumerate() {
            let other = nodes[1 - i].uuid.clone();
            let clashes: Vec<_> = n
                .events
                .iter()
                .filter(|e| matches!(e, IpamEvent::Clash { .. }))
                .collect();
            assert_eq!(
                clashes,
                [&IpamEvent::Clash {
                    addr: ip("10.1.0.9"),
                    other_uuid: other
                }]
            );
            assert_eq!(n.assigned(), 1);
            assert_eq!(n.ipam.address(), Some(ip("10.1.0.9")));
        }
        // Only the owner (the older static claim) writes the machines entry.
        let owner = Ipam::owner_of(&nodes[0].ledger, ip("10.1.0.9")).unwrap();
        let o = nodes.iter().find(|n| n.uuid == owner).unwrap();
        let entry = nodes[0].ledger.entry(MACHINES, "10.1.0.9").unwrap();
        assert_eq!(entry.writer, o.identity.peer_id());
    }

    #[test]
    fn a_slash_30_runs_out_for_the_third_node() {
        let t0 = Instant::now();
        let s = settings("10.1.0.1/30", None);
        let mut nodes: Vec<Node> = (0..3)
            .map(|i| Node::new(i + 1, &format!("m{i}-node"), t0, s.clone()))
            .collect();
        for i in 0..3 {
            if i > 0 {
                exchange(&mut nodes, i - 1, i, T0_MS);
            }
            nodes[i].step(t0, t0, true);
        }
        assert_eq!(nodes[2].events, [IpamEvent::Exhausted]);
        assert!(nodes[2].ledger.get(DHCP, "m2-node").is_none());
        // Reported once, retried at every update.
        assert!(nodes[2].step(t0, t0 + SETTLE, true).is_empty());
        // The first node leaves: the third one gets its address.
        let freed = nodes[0]
            .ledger
            .get(DHCP, "m0-node")
            .map(<[u8]>::to_vec)
            .unwrap();
        nodes[0].write(DHCP, "m0-node", None, T0_MS + 10);
        let entries = nodes[0].entries();
        nodes[2].learn(&entries, T0_MS + 10);
        nodes[2].step(t0, t0 + SETTLE, true);
        let events = nodes[2].step(t0, t0 + 2 * SETTLE, true);
        let want: Ipv4Addr = std::str::from_utf8(&freed).unwrap().parse().unwrap();
        assert_eq!(
            events,
            [IpamEvent::Assigned {
                addr: want,
                prefix_len: 30
            }]
        );
        // A /32 has no address to hand out.
        let mut single = Node::new(9, "m9-node", t0, settings("10.1.0.1/32", None));
        assert_eq!(single.step(t0, t0, true), [IpamEvent::Exhausted]);
    }

    #[test]
    fn garbage_claims_are_ignored_and_counted() {
        let t0 = Instant::now();
        let mut n = Node::new(1, "m1-node", t0, settings("10.1.0.1/24", None));
        let first = slot_address(&n.ipam.pool, "m1-node").to_string();
        let garbage = [
            ("g1", "not an address".to_owned()),
            ("g2", "10.2.0.5".to_owned()),
            ("g3", "10.1.0.0".to_owned()),
            ("g4", format!("{first} later")),
            ("g5", "10.1.1.9 static".to_owned()),
        ];
        for (key, value) in &garbage {
            n.write(DHCP, key, Some(value.as_bytes()), T0_MS);
        }
        n.step(t0, t0, true);
        assert_eq!(n.ipam.ignored_claims(), garbage.len());
        // A malformed value naming our first choice does not block it.
        assert_eq!(n.ledger.get(DHCP, "m1-node"), Some(first.as_bytes()));
        n.step(t0, t0 + SETTLE, true);
        assert_eq!(n.ipam.address(), Some(ip(&first)));
        assert_eq!(
            Ipam::owner_of(&n.ledger, ip("10.2.0.5")).as_deref(),
            Some("g2")
        );
        assert_eq!(Ipam::owner_of(&n.ledger, ip("10.1.0.77")), None);
    }

    #[test]
    fn a_static_address_outside_the_network_falls_back_to_allocation() {
        let t0 = Instant::now();
        let mut n = Node::new(1, "m1-node", t0, settings("10.1.0.1/24", Some("10.9.0.1")));
        n.step(t0, t0, true);
        let want = slot_address(&n.ipam.pool, "m1-node").to_string();
        assert_eq!(n.ledger.get(DHCP, "m1-node"), Some(want.as_bytes()));
    }

    /// 50 nodes updating, exchanging and syncing in a random order all end with distinct
    /// addresses that they own, each reported once as `Assigned` (then maybe `Changed`).
    #[test]
    fn fifty_nodes_end_with_unique_addresses() {
        let mut lost = 0;
        for seed in 0..3 {
            let mut rng = Rng::from_seed(seed);
            let t0 = Instant::now();
            // A /26 (62 hosts) for 50 nodes: first choices collide a lot.
            let s = settings("10.1.0.1/26", None);
            let mut nodes: Vec<Node> = (0..50u8)
                .map(|i| Node::new(i + 1, &format!("m{seed}{i:02}-node"), t0, s.clone()))
                .collect();
            let mut now = t0;
            for _ in 0..3000 {
                now += Duration::from_millis(rng.below(20));
                let a = usize::try_from(rng.below(50)).unwrap();
                if rng.chance(0.5) {
                    let synced = rng.chance(0.8);
                    nodes[a].step(t0, now, synced);
                } else {
                    let b = usize::try_from(rng.below(50)).unwrap();
                    if a != b {
                        exchange(&mut nodes, a, b, ms(t0, now));
                    }
                }
            }
            // Heal everything: gossip until every ledger is equal and nobody writes.
            let mut healed = false;
            for _ in 0..20 {
                for i in 1..nodes.len() {
                    exchange(&mut nodes, 0, i, ms(t0, now));
                }
                for i in 1..nodes.len() {
                    exchange(&mut nodes, 0, i, ms(t0, now));
                }
                now += SETTLE;
                let before: usize = nodes.iter().map(|n| n.writes).sum();
                for n in &mut nodes {
                    n.step(t0, now, true);
                }
                let quiet = nodes.iter().map(|n| n.writes).sum::<usize>() == before;
                if quiet && nodes.iter().all(|n| n.ipam.poll_timeout().is_none()) {
                    healed = true;
                    break;
                }
            }
            assert!(healed, "seed {seed}: still writing");
            lost += nodes.iter().map(|n| n.ipam.lost_claims()).sum::<u64>();
            let mut seen = BTreeSet::new();
            for n in &nodes {
                let addr = n.ipam.address().unwrap_or_else(|| panic!("{}", n.uuid));
                assert!(seen.insert(addr), "seed {seed}: {addr} twice");
                assert_eq!(
                    Ipam::owner_of(&nodes[0].ledger, addr).as_deref(),
                    Some(&n.uuid[..])
                );
                assert_eq!(n.assigned(), 1, "{}", n.uuid);
                assert!(!n.events.contains(&IpamEvent::Exhausted));
            }
        }
        // The interleavings did make claims collide.
        assert!(lost > 0);
    }
}
