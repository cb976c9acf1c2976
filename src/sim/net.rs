//! The virtual network: subnets (LAN broadcast domains) joined by one router, hosts with IPv4
//! addresses, link characteristics, partitions and NAT boxes.
//!
//! # Addresses
//!
//! Subnet `s` (0 to 254) holds `10.s.0.0/16`; its hosts get `10.s.0.1`, `10.s.0.2`, ... in
//! creation order. A subnet behind a NAT box keeps those addresses private: they are reachable
//! from the same subnet only, and the NAT's public address is `100.64.s.1`. Every other subnet
//! is public: any host can reach its hosts through the router.
//!
//! # Paths
//!
//! - Same subnet: the subnet's LAN link.
//! - Between subnets: the source subnet's uplink, the router, the destination subnet's uplink.
//!
//! Every link on the path applies its latency plus a uniform jitter, may lose the packet, may
//! duplicate it (each copy with its own delay) and may hold it back by a random extra delay
//! (reordering). Partitions drop packets between chosen sets of hosts, one way or both.
//!
//! # NAT
//!
//! A NAT box translates packets leaving its subnet for another subnet: the source becomes
//! `public_ip:port` from a mapping created by the first outbound packet of a flow and refreshed
//! by traffic either way; mappings idle for the mapping timeout expire.
//!
//! - [`NatKind::Cone`]: endpoint-independent mapping (one public port per internal address and
//!   port, whatever the destination) with port-restricted filtering (an inbound packet passes
//!   only from an address and port the internal host has sent to through that mapping).
//! - [`NatKind::Symmetric`]: endpoint-dependent mapping (one public port per internal address
//!   and destination) that accepts packets from that destination only.
//!
//! Inbound filtering is decided when a packet reaches the NAT, outbound mapping when it leaves
//! the sender. Not modelled: hairpinning (a host sending to its own NAT's public address: the
//! packet is dropped as unroutable), port preservation, ICMP.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use crate::rng::Rng;

/// Latency, jitter, loss, duplication and reordering of one link.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkParams {
    /// One-way delay.
    pub latency: Duration,
    /// Extra delay drawn uniformly from `0..=jitter` per packet.
    pub jitter: Duration,
    /// Probability that a packet is lost (0 to 1).
    pub loss: f64,
    /// Probability that a packet is delivered twice.
    pub duplicate: f64,
    /// Probability that a packet is held back by up to `reorder_delay` more.
    pub reorder: f64,
    /// Largest extra delay of a held-back packet.
    pub reorder_delay: Duration,
}

impl LinkParams {
    /// A perfect link with this latency.
    #[must_use]
    pub const fn new(latency: Duration) -> Self {
        Self {
            latency,
            jitter: Duration::ZERO,
            loss: 0.0,
            duplicate: 0.0,
            reorder: 0.0,
            reorder_delay: Duration::ZERO,
        }
    }

    /// A switched LAN: 200 µs ± 100 µs.
    #[must_use]
    pub const fn lan() -> Self {
        Self::new(Duration::from_micros(200)).with_jitter(Duration::from_micros(100))
    }

    /// An access link to the Internet: 5 ms ± 1 ms.
    #[must_use]
    pub const fn uplink() -> Self {
        Self::new(Duration::from_millis(5)).with_jitter(Duration::from_millis(1))
    }

    /// With this jitter.
    #[must_use]
    pub const fn with_jitter(mut self, jitter: Duration) -> Self {
        self.jitter = jitter;
        self
    }

    /// With this loss probability.
    #[must_use]
    pub const fn with_loss(mut self, loss: f64) -> Self {
        self.loss = loss;
        self
    }

    /// With this duplication probability.
    #[must_use]
    pub const fn with_duplicate(mut self, duplicate: f64) -> Self {
        self.duplicate = duplicate;
        self
    }

    /// Holding back packets with probability `p` by up to `delay`.
    #[must_use]
    pub const fn with_reorder(mut self, p: f64, delay: Duration) -> Self {
        self.reorder = p;
        self.reorder_delay = delay;
        self
    }

    /// One traversal: `None` when lost, else the delay in nanoseconds.
    fn sample(&self, rng: &mut Rng) -> Option<u64> {
        if self.loss > 0.0 && rng.chance(self.loss) {
            return None;
        }
        Some(self.sample_delay(rng))
    }

    fn sample_delay(&self, rng: &mut Rng) -> u64 {
        let mut delay = nanos(self.latency);
        let jitter = nanos(self.jitter);
        if jitter > 0 {
            delay += rng.below(jitter + 1);
        }
        if self.reorder > 0.0 && rng.chance(self.reorder) {
            delay += rng.below(nanos(self.reorder_delay) + 1);
        }
        delay
    }

    fn duplicates(&self, rng: &mut Rng) -> bool {
        self.duplicate > 0.0 && rng.chance(self.duplicate)
    }
}

/// Nanoseconds of a duration, saturating.
pub(crate) fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// A subnet (LAN broadcast domain).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SubnetId(pub usize);

/// A host on a subnet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostId(pub usize);

/// A partition made by [`Sim::partition`](super::Sim::partition).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PartitionId(pub usize);

/// How a NAT box maps and filters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatKind {
    /// Endpoint-independent mapping, port-restricted filtering.
    Cone,
    /// Endpoint-dependent mapping and filtering.
    Symmetric,
}

/// A NAT box in front of a subnet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NatSettings {
    /// Mapping and filtering behaviour.
    pub kind: NatKind,
    /// A mapping with no traffic for this long is removed (default 120 s).
    pub mapping_timeout: Duration,
    /// First public port handed out (default 40000); ports are allocated in sequence.
    pub first_port: u16,
}

impl NatSettings {
    /// Defaults for `kind`.
    #[must_use]
    pub const fn new(kind: NatKind) -> Self {
        Self {
            kind,
            mapping_timeout: Duration::from_secs(120),
            first_port: 40000,
        }
    }
}

/// Packets dropped or delivered by the network, by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Packets handed to the network (a broadcast counts once per receiver).
    pub sent: u64,
    /// Packets that reached a host with a listening socket.
    pub delivered: u64,
    /// Lost on a link.
    pub lost: u64,
    /// Extra copies made by duplication.
    pub duplicated: u64,
    /// Dropped by a partition.
    pub partitioned: u64,
    /// Dropped by NAT filtering (no mapping, expired, or a sender the mapping does not allow).
    pub nat_filtered: u64,
    /// No route: a private address of another subnet, an unknown address, IPv6, hairpinning,
    /// or NAT ports exhausted.
    pub unroutable: u64,
    /// Reached a host that was down or had no socket on that port.
    pub no_listener: u64,
}

#[derive(Debug)]
struct Mapping {
    internal: SocketAddr,
    flow: (SocketAddr, Option<SocketAddr>),
    /// Remote addresses the internal host has sent to through this mapping.
    permitted: BTreeSet<SocketAddr>,
    last_used: u64,
}

/// State of one NAT box.
#[derive(Debug)]
struct Nat {
    settings: NatSettings,
    public_ip: Ipv4Addr,
    next_port: u16,
    by_flow: BTreeMap<(SocketAddr, Option<SocketAddr>), u16>,
    by_port: BTreeMap<u16, Mapping>,
}

impl Nat {
    fn new(settings: NatSettings, public_ip: Ipv4Addr) -> Self {
        Self {
            settings,
            public_ip,
            next_port: settings.first_port.max(1),
            by_flow: BTreeMap::new(),
            by_port: BTreeMap::new(),
        }
    }

    fn expired(&self, m: &Mapping, now: u64) -> bool {
        now.saturating_sub(m.last_used) > nanos(self.settings.mapping_timeout)
    }

    fn remove(&mut self, port: u16) {
        if let Some(m) = self.by_port.remove(&port) {
            self.by_flow.remove(&m.flow);
        }
    }

    /// The public source address of a packet from `internal` to `remote`, or `None` when no
    /// port is free.
    fn outbound(
        &mut self,
        now: u64,
        internal: SocketAddr,
        remote: SocketAddr,
    ) -> Option<SocketAddr> {
        let flow = match self.settings.kind {
            NatKind::Cone => (internal, None),
            NatKind::Symmetric => (internal, Some(remote)),
        };
        if let Some(&port) = self.by_flow.get(&flow) {
            let expired = self.by_port.get(&port).is_none_or(|m| self.expired(m, now));
            if expired {
                self.remove(port);
            } else if let Some(m) = self.by_port.get_mut(&port) {
                m.last_used = now;
                m.permitted.insert(remote);
                return Some(SocketAddr::from((self.public_ip, port)));
            }
        }
        let port = self.allocate(now)?;
        let mut permitted = BTreeSet::new();
        permitted.insert(remote);
        self.by_flow.insert(flow, port);
        self.by_port.insert(
            port,
            Mapping {
                internal,
                flow,
                permitted,
                last_used: now,
            },
        );
        Some(SocketAddr::from((self.public_ip, port)))
    }

    fn allocate(&mut self, now: u64) -> Option<u16> {
        let first = self.settings.first_port.max(1);
        let span = u32::from(u16::MAX - first) + 1;
        for _ in 0..span {
            let port = self.next_port;
            self.next_port = if port == u16::MAX { first } else { port + 1 };
            match self.by_port.get(&port) {
                None => return Some(port),
                Some(m) if self.expired(m, now) => {
                    self.remove(port);
                    return Some(port);
                }
                Some(_) => {}
            }
        }
        None
    }

    /// The internal address a packet from `from` to public `port` goes to, if the NAT lets it
    /// in.
    fn inbound(&mut self, now: u64, from: SocketAddr, port: u16) -> Option<SocketAddr> {
        let m = self.by_port.get(&port)?;
        if self.expired(m, now) {
            self.remove(port);
            return None;
        }
        let m = self.by_port.get_mut(&port)?;
        if !m.permitted.contains(&from) {
            return None;
        }
        m.last_used = now;
        Some(m.internal)
    }
}

#[derive(Debug)]
struct Subnet {
    index: u8,
    lan: LinkParams,
    uplink: LinkParams,
    nat: Option<Nat>,
    hosts: Vec<HostId>,
}

#[derive(Debug)]
struct Host {
    ip: Ipv4Addr,
    subnet: SubnetId,
}

#[derive(Debug)]
struct Partition {
    from: BTreeSet<HostId>,
    to: BTreeSet<HostId>,
    both_ways: bool,
    active: bool,
}

/// Where a packet in flight goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Target {
    /// Straight to a host.
    Host(HostId),
    /// To the public side of a subnet's NAT box (filtered on arrival).
    Nat(SubnetId),
}

/// One copy of a packet on its way.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Leg {
    pub target: Target,
    /// Source address as the receiver sees it.
    pub from: SocketAddr,
    pub delay: u64,
}

/// Why the network dropped a packet at the sender's side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dropped {
    Lost,
    Partitioned,
    Unroutable,
}

/// The topology and its state.
#[derive(Debug)]
pub(crate) struct Network {
    subnets: Vec<Subnet>,
    hosts: Vec<Host>,
    by_ip: BTreeMap<Ipv4Addr, HostId>,
    nat_by_ip: BTreeMap<Ipv4Addr, SubnetId>,
    partitions: Vec<Partition>,
    active_partitions: usize,
    pub router: LinkParams,
    pub stats: NetStats,
}

/// Most subnets (one per value of the second address byte, 255 reserved).
pub const MAX_SUBNETS: usize = 255;
/// Most hosts per subnet.
pub const MAX_HOSTS_PER_SUBNET: usize = 65_000;

impl Network {
    pub fn new(router: LinkParams) -> Self {
        Self {
            subnets: Vec::new(),
            hosts: Vec::new(),
            by_ip: BTreeMap::new(),
            nat_by_ip: BTreeMap::new(),
            partitions: Vec::new(),
            active_partitions: 0,
            router,
            stats: NetStats::default(),
        }
    }

    pub fn add_subnet(
        &mut self,
        lan: LinkParams,
        uplink: LinkParams,
        nat: Option<NatSettings>,
    ) -> Option<SubnetId> {
        if self.subnets.len() >= MAX_SUBNETS {
            return None;
        }
        let id = SubnetId(self.subnets.len());
        let index = u8::try_from(id.0).ok()?;
        let nat = nat.map(|settings| {
            let public_ip = Ipv4Addr::new(100, 64, index, 1);
            self.nat_by_ip.insert(public_ip, id);
            Nat::new(settings, public_ip)
        });
        self.subnets.push(Subnet {
            index,
            lan,
            uplink,
            nat,
            hosts: Vec::new(),
        });
        Some(id)
    }

    pub fn add_host(&mut self, subnet: SubnetId) -> Option<HostId> {
        let s = self.subnets.get_mut(subnet.0)?;
        if s.hosts.len() >= MAX_HOSTS_PER_SUBNET {
            return None;
        }
        let n = s.hosts.len() + 1;
        let ip = Ipv4Addr::new(
            10,
            s.index,
            u8::try_from(n >> 8).ok()?,
            u8::try_from(n & 0xff).ok()?,
        );
        let id = HostId(self.hosts.len());
        s.hosts.push(id);
        self.hosts.push(Host { ip, subnet });
        self.by_ip.insert(ip, id);
        Some(id)
    }

    pub fn ip(&self, host: HostId) -> Option<Ipv4Addr> {
        self.hosts.get(host.0).map(|h| h.ip)
    }

    pub fn subnet_of(&self, host: HostId) -> Option<SubnetId> {
        self.hosts.get(host.0).map(|h| h.subnet)
    }

    pub fn hosts_on(&self, subnet: SubnetId) -> &[HostId] {
        self.subnets
            .get(subnet.0)
            .map_or(&[], |s| s.hosts.as_slice())
    }

    pub fn nat_public_ip(&self, subnet: SubnetId) -> Option<Ipv4Addr> {
        self.subnets
            .get(subnet.0)?
            .nat
            .as_ref()
            .map(|n| n.public_ip)
    }

    pub fn set_lan(&mut self, subnet: SubnetId, lan: LinkParams) {
        if let Some(s) = self.subnets.get_mut(subnet.0) {
            s.lan = lan;
        }
    }

    pub fn set_uplink(&mut self, subnet: SubnetId, uplink: LinkParams) {
        if let Some(s) = self.subnets.get_mut(subnet.0) {
            s.uplink = uplink;
        }
    }

    pub fn partition(&mut self, from: &[HostId], to: &[HostId], both_ways: bool) -> PartitionId {
        self.partitions.push(Partition {
            from: from.iter().copied().collect(),
            to: to.iter().copied().collect(),
            both_ways,
            active: true,
        });
        self.active_partitions += 1;
        PartitionId(self.partitions.len() - 1)
    }

    pub fn heal(&mut self, id: PartitionId) {
        if let Some(p) = self.partitions.get_mut(id.0) {
            if p.active {
                p.active = false;
                self.active_partitions -= 1;
            }
        }
    }

    fn blocked(&self, a: HostId, b: HostId) -> bool {
        self.active_partitions > 0
            && self.partitions.iter().any(|p| {
                p.active
                    && ((p.from.contains(&a) && p.to.contains(&b))
                        || (p.both_ways && p.from.contains(&b) && p.to.contains(&a)))
            })
    }

    /// Copies of a broadcast from `src` to the other hosts of its subnet.
    pub fn broadcast(&mut self, rng: &mut Rng, src: HostId, from: SocketAddr, out: &mut Vec<Leg>) {
        let Some(subnet) = self.subnet_of(src) else {
            return;
        };
        let Some(s) = self.subnets.get(subnet.0) else {
            return;
        };
        let lan = s.lan;
        for i in 0..s.hosts.len() {
            let Some(dst) = self
                .subnets
                .get(subnet.0)
                .and_then(|s| s.hosts.get(i))
                .copied()
            else {
                break;
            };
            if dst == src {
                continue;
            }
            self.stats.sent += 1;
            if self.blocked(src, dst) {
                self.stats.partitioned += 1;
                continue;
            }
            if !self.legs_over(rng, &[lan], Target::Host(dst), from, out) {
                self.stats.lost += 1;
            }
        }
    }

    /// Copies of a unicast packet from host `src` (source address `from`, possibly spoofed) to
    /// `dst`, or why it was dropped at once.
    pub fn unicast(
        &mut self,
        rng: &mut Rng,
        now: u64,
        src: HostId,
        from: SocketAddr,
        dst: SocketAddr,
        out: &mut Vec<Leg>,
    ) -> Result<(), Dropped> {
        self.stats.sent += 1;
        let result = self.plan_unicast(rng, now, src, from, dst, out);
        match result {
            Err(Dropped::Lost) => self.stats.lost += 1,
            Err(Dropped::Partitioned) => self.stats.partitioned += 1,
            Err(Dropped::Unroutable) => self.stats.unroutable += 1,
            Ok(()) => {}
        }
        result
    }

    fn plan_unicast(
        &mut self,
        rng: &mut Rng,
        now: u64,
        src: HostId,
        from: SocketAddr,
        dst: SocketAddr,
        out: &mut Vec<Leg>,
    ) -> Result<(), Dropped> {
        let IpAddr::V4(dst_ip) = dst.ip() else {
            return Err(Dropped::Unroutable);
        };
        let src_subnet = self.subnet_of(src).ok_or(Dropped::Unroutable)?;
        // Same subnet: the LAN link.
        if let Some(&dst_host) = self.by_ip.get(&dst_ip) {
            if self.subnet_of(dst_host) == Some(src_subnet) {
                if self.blocked(src, dst_host) {
                    return Err(Dropped::Partitioned);
                }
                let lan = self.subnets[src_subnet.0].lan;
                return if self.legs_over(rng, &[lan], Target::Host(dst_host), from, out) {
                    Ok(())
                } else {
                    Err(Dropped::Lost)
                };
            }
        }
        // Through the router: find the destination side first.
        let (target, dst_subnet, dst_host) = if let Some(&subnet) = self.nat_by_ip.get(&dst_ip) {
            (Target::Nat(subnet), subnet, None)
        } else if let Some(&host) = self.by_ip.get(&dst_ip) {
            let subnet = self.subnet_of(host).ok_or(Dropped::Unroutable)?;
            if self.subnets[subnet.0].nat.is_some() {
                // A private address of another subnet.
                return Err(Dropped::Unroutable);
            }
            (Target::Host(host), subnet, Some(host))
        } else {
            return Err(Dropped::Unroutable);
        };
        if dst_subnet == src_subnet {
            // Hairpinning through our own NAT.
            return Err(Dropped::Unroutable);
        }
        if let Some(dst_host) = dst_host {
            if self.blocked(src, dst_host) {
                return Err(Dropped::Partitioned);
            }
        }
        let from = match &mut self.subnets[src_subnet.0].nat {
            Some(nat) => nat.outbound(now, from, dst).ok_or(Dropped::Unroutable)?,
            None => from,
        };
        let links = [
            self.subnets[src_subnet.0].uplink,
            self.router,
            self.subnets[dst_subnet.0].uplink,
        ];
        if self.legs_over(rng, &links, target, from, out) {
            Ok(())
        } else {
            Err(Dropped::Lost)
        }
    }

    /// Samples the path over `links`: false when lost, else one or two legs pushed to `out`.
    fn legs_over(
        &mut self,
        rng: &mut Rng,
        links: &[LinkParams],
        target: Target,
        from: SocketAddr,
        out: &mut Vec<Leg>,
    ) -> bool {
        let mut delay = 0u64;
        let mut duplicate = false;
        for link in links {
            match link.sample(rng) {
                Some(d) => delay = delay.saturating_add(d),
                None => return false,
            }
            duplicate |= link.duplicates(rng);
        }
        out.push(Leg {
            target,
            from,
            delay,
        });
        if duplicate {
            let second: u64 = links
                .iter()
                .map(|l| l.sample_delay(rng))
                .fold(0, u64::saturating_add);
            self.stats.duplicated += 1;
            out.push(Leg {
                target,
                from,
                delay: second,
            });
        }
        true
    }

    /// Passes a packet that reached the public side of `subnet`'s NAT: the internal host and
    /// destination address, or `None` when filtered.
    pub fn nat_inbound(
        &mut self,
        now: u64,
        subnet: SubnetId,
        from: SocketAddr,
        dst: SocketAddr,
    ) -> Option<(HostId, SocketAddr)> {
        let nat = self.subnets.get_mut(subnet.0)?.nat.as_mut()?;
        let internal = nat.inbound(now, from, dst.port());
        let Some(internal) = internal else {
            self.stats.nat_filtered += 1;
            return None;
        };
        let IpAddr::V4(ip) = internal.ip() else {
            self.stats.unroutable += 1;
            return None;
        };
        match self.by_ip.get(&ip) {
            Some(&host) => Some((host, internal)),
            None => {
                self.stats.unroutable += 1;
                None
            }
        }
    }

    /// Active mappings of `subnet`'s NAT.
    pub fn nat_mappings(&self, subnet: SubnetId) -> usize {
        self.subnets
            .get(subnet.0)
            .and_then(|s| s.nat.as_ref())
            .map_or(0, |n| n.by_port.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(ip: [u8; 4], port: u16) -> SocketAddr {
        SocketAddr::from((ip, port))
    }

    #[test]
    fn cone_nat_maps_per_source_and_filters_by_remote() {
        let mut nat = Nat::new(
            NatSettings::new(NatKind::Cone),
            Ipv4Addr::new(100, 64, 1, 1),
        );
        let inside = addr([10, 1, 0, 1], 7120);
        let a = addr([10, 0, 0, 1], 7120);
        let b = addr([10, 0, 0, 2], 7120);
        let pa = nat.outbound(0, inside, a).unwrap();
        let pb = nat.outbound(1, inside, b).unwrap();
        assert_eq!(pa, pb, "endpoint-independent mapping");
        assert_eq!(nat.inbound(2, a, pa.port()), Some(inside));
        assert_eq!(
            nat.inbound(2, addr([10, 0, 0, 3], 7120), pa.port()),
            None,
            "filtered"
        );
        assert_eq!(
            nat.inbound(2, addr([10, 0, 0, 1], 9), pa.port()),
            None,
            "port-restricted"
        );
        let timeout = nanos(NatSettings::new(NatKind::Cone).mapping_timeout);
        assert_eq!(nat.inbound(3 + timeout, a, pa.port()), None, "expired");
    }

    #[test]
    fn symmetric_nat_maps_per_destination() {
        let mut nat = Nat::new(
            NatSettings::new(NatKind::Symmetric),
            Ipv4Addr::new(100, 64, 1, 1),
        );
        let inside = addr([10, 1, 0, 1], 7120);
        let a = addr([10, 0, 0, 1], 7120);
        let b = addr([10, 0, 0, 2], 7120);
        let pa = nat.outbound(0, inside, a).unwrap();
        let pb = nat.outbound(0, inside, b).unwrap();
        assert_ne!(pa, pb);
        assert_eq!(nat.inbound(1, b, pa.port()), None);
        assert_eq!(nat.inbound(1, b, pb.port()), Some(inside));
    }

    #[test]
    fn routing_respects_subnets_nat_and_partitions() {
        let mut rng = Rng::from_seed(1);
        let mut net = Network::new(LinkParams::new(Duration::from_millis(10)));
        let public = net
            .add_subnet(LinkParams::lan(), LinkParams::uplink(), None)
            .unwrap();
        let private = net
            .add_subnet(
                LinkParams::lan(),
                LinkParams::uplink(),
                Some(NatSettings::new(NatKind::Cone)),
            )
            .unwrap();
        let p1 = net.add_host(public).unwrap();
        let p2 = net.add_host(public).unwrap();
        let n1 = net.add_host(private).unwrap();
        let sock = |h: HostId, net: &Network| SocketAddr::from((net.ip(h).unwrap(), 7120));
        let mut out = Vec::new();
        // Public to private address: unroutable.
        let r = net.unicast(&mut rng, 0, p1, sock(p1, &net), sock(n1, &net), &mut out);
        assert_eq!(r, Err(Dropped::Unroutable));
        // Private to public: translated.
        net.unicast(&mut rng, 0, n1, sock(n1, &net), sock(p1, &net), &mut out)
            .unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].target, Target::Host(p1));
        assert_eq!(
            out[0].from.ip(),
            IpAddr::V4(net.nat_public_ip(private).unwrap())
        );
        assert!(out[0].delay >= 20_000_000);
        let mapped = out[0].from;
        // The answer passes the NAT; another public host is filtered.
        assert_eq!(
            net.nat_inbound(1, private, sock(p1, &net), mapped),
            Some((n1, sock(n1, &net)))
        );
        assert_eq!(net.nat_inbound(1, private, sock(p2, &net), mapped), None);
        // A one-way partition.
        let part = net.partition(&[p1], &[p2], false);
        out.clear();
        assert_eq!(
            net.unicast(&mut rng, 2, p1, sock(p1, &net), sock(p2, &net), &mut out),
            Err(Dropped::Partitioned)
        );
        net.unicast(&mut rng, 2, p2, sock(p2, &net), sock(p1, &net), &mut out)
            .unwrap();
        net.heal(part);
        out.clear();
        net.unicast(&mut rng, 3, p1, sock(p1, &net), sock(p2, &net), &mut out)
            .unwrap();
        assert_eq!(out.len(), 1);
    }
}
