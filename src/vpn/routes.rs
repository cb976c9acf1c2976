//! The VPN routing table: which peer owns each VPN address, read from the ledger.
//!
//! # Source
//! Bucket [`MACHINES`]: key = address (`10.1.0.7`), value = edgevpn's machine JSON, whose
//! `PeerID` names the owner. Every member may write any key, so an entry counts only when its
//! writer (the key that signed it) is the peer it names: a member can publish its own address,
//! never point one at another member. Entries that do not parse, that name an address outside
//! the prefix's hosts, or whose writer is not their `PeerID` are ignored and counted
//! ([`Routes::ignored`]).
//!
//! # Only to the address's lease holder
//! An entry also counts only when its writer holds the address's lease: the peer of the winning
//! `dhcp` claim on it ([`Ipam::lease_holders`]: the peer bound to the claim's uuid, which
//! follows a node whose state directory was wiped, else the claim's writer). So a member can
//! publish the address it leased, never another node's. An address nobody claims in `dhcp` is
//! routed on the `machines` entry alone (nobody holds it to be taken from).
//!
//! # Cost
//! [`Routes::update`] rebuilds the table (call it after `machines` changes, not per packet);
//! [`Routes::owner`] is a `BTreeMap` lookup: O(log n), no allocation.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use serde::Deserialize;

use crate::cluster::ipam::Ipam;
use crate::config::Ipv4Cidr;
use crate::identity::PeerId;
use crate::ledger::Ledger;
use crate::ledger::names::MACHINES;

/// Largest `machines` value read (edgevpn's JSON is about 200 bytes); larger ones are ignored.
pub const MAX_MACHINE_JSON: usize = 4096;

/// An IPv4 prefix: its network address and length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subnet {
    network: u32,
    prefix_len: u8,
}

impl Subnet {
    /// The prefix of `cidr` (host bits cleared; lengths above 32 read as 32).
    pub fn new(cidr: Ipv4Cidr) -> Self {
        let prefix_len = cidr.prefix_len.min(32);
        Self {
            network: u32::from(cidr.addr) & mask(prefix_len),
            prefix_len,
        }
    }

    /// True for any address of the prefix, network and broadcast addresses included.
    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        u32::from(addr) & mask(self.prefix_len) == self.network
    }

    /// True for the network and broadcast addresses of a prefix of at most /30 (a /31 or /32
    /// has neither, RFC 3021).
    pub fn is_network_or_broadcast(&self, addr: Ipv4Addr) -> bool {
        if self.prefix_len > 30 || !self.contains(addr) {
            return false;
        }
        let host = u32::from(addr) & !mask(self.prefix_len);
        host == 0 || host == !mask(self.prefix_len)
    }

    /// True for an address a member may hold: in the prefix, not its network or broadcast.
    pub fn is_host(&self, addr: Ipv4Addr) -> bool {
        self.contains(addr) && !self.is_network_or_broadcast(addr)
    }
}

fn mask(prefix_len: u8) -> u32 {
    u32::MAX
        .checked_shl(32 - u32::from(prefix_len))
        .unwrap_or(0)
}

/// `machines` entries left out of the table at the last update, by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IgnoredEntries {
    /// The key is not an IPv4 address, the value is not the machine JSON (or too large), the
    /// `PeerID` does not parse, or `Address` differs from the key.
    pub malformed: usize,
    /// The address is outside the prefix, or is its network or broadcast address.
    pub outside_prefix: usize,
    /// The entry was written by another peer than the `PeerID` it names.
    pub writer_mismatch: usize,
    /// The address is leased (`dhcp`) to another peer than the entry's writer.
    pub not_lease_holder: usize,
}

/// The fields of edgevpn's machine JSON that routing reads.
#[derive(Deserialize)]
struct Machine<'a> {
    #[serde(rename = "PeerID", borrow)]
    peer_id: Cow<'a, str>,
    #[serde(rename = "Address", borrow, default)]
    address: Option<Cow<'a, str>>,
}

/// VPN address → owning peer (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routes {
    subnet: Subnet,
    owners: BTreeMap<Ipv4Addr, PeerId>,
    ignored: IgnoredEntries,
}

impl Routes {
    /// An empty table for the VPN prefix of `prefix` (e.g. `10.1.0.7/24`).
    pub fn new(prefix: Ipv4Cidr) -> Self {
        Self {
            subnet: Subnet::new(prefix),
            owners: BTreeMap::new(),
            ignored: IgnoredEntries::default(),
        }
    }

    /// The table read from `ledger` for the VPN prefix of `prefix`.
    pub fn from_ledger(ledger: &Ledger, prefix: Ipv4Cidr) -> Self {
        let mut routes = Self::new(prefix);
        routes.update(ledger);
        routes
    }

    /// Re-reads the `machines` bucket; returns true when a route was added, removed or moved.
    pub fn update(&mut self, ledger: &Ledger) -> bool {
        let mut owners = BTreeMap::new();
        let mut ignored = IgnoredEntries::default();
        let holders = Ipam::lease_holders(ledger);
        for (key, value) in ledger.bucket(MACHINES) {
            let Some(writer) = ledger.entry(MACHINES, key).map(|e| e.writer) else {
                continue;
            };
            match self.read_entry(key, value, writer) {
                Ok((addr, peer)) if holders.get(&addr).is_some_and(|h| *h != peer) => {
                    ignored.not_lease_holder += 1;
                }
                Ok((addr, peer)) => {
                    owners.insert(addr, peer);
                }
                Err(Ignored::Malformed) => ignored.malformed += 1,
                Err(Ignored::OutsidePrefix) => ignored.outside_prefix += 1,
                Err(Ignored::WriterMismatch) => ignored.writer_mismatch += 1,
            }
        }
        if ignored.writer_mismatch > self.ignored.writer_mismatch {
            log::warn!(
                "vpn: ignoring {} {MACHINES} entries written by another peer than the one they name",
                ignored.writer_mismatch
            );
        }
        if ignored.not_lease_holder > self.ignored.not_lease_holder {
            log::warn!(
                "vpn: ignoring {} {MACHINES} entries for addresses leased to another peer",
                ignored.not_lease_holder
            );
        }
        self.ignored = ignored;
        let changed = owners != self.owners;
        self.owners = owners;
        changed
    }

    /// The peer owning `addr`, if any.
    pub fn owner(&self, addr: Ipv4Addr) -> Option<PeerId> {
        self.owners.get(&addr).copied()
    }

    /// The VPN prefix.
    pub fn subnet(&self) -> Subnet {
        self.subnet
    }

    /// Addresses routed.
    pub fn len(&self) -> usize {
        self.owners.len()
    }

    /// True when no address is routed.
    pub fn is_empty(&self) -> bool {
        self.owners.is_empty()
    }

    /// Entries left out at the last update (a gauge: each update recounts).
    pub fn ignored(&self) -> IgnoredEntries {
        self.ignored
    }

    /// The route one `machines` entry gives, or why it gives none.
    fn read_entry(
        &self,
        key: &str,
        value: &[u8],
        writer: PeerId,
    ) -> Result<(Ipv4Addr, PeerId), Ignored> {
        let addr: Ipv4Addr = key.parse().map_err(|_| Ignored::Malformed)?;
        if value.len() > MAX_MACHINE_JSON {
            return Err(Ignored::Malformed);
        }
        let machine: Machine<'_> = serde_json::from_slice(value).map_err(|_| Ignored::Malformed)?;
        let peer: PeerId = machine.peer_id.parse().map_err(|_| Ignored::Malformed)?;
        if machine.address.is_some_and(|a| a != key) {
            return Err(Ignored::Malformed);
        }
        if !self.subnet.is_host(addr) {
            return Err(Ignored::OutsidePrefix);
        }
        if writer != peer {
            return Err(Ignored::WriterMismatch);
        }
        Ok((addr, peer))
    }
}

/// Why a `machines` entry gives no route.
enum Ignored {
    Malformed,
    OutsidePrefix,
    WriterMismatch,
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::identity::Identity;
    use crate::ledger::Clock;
    use crate::ledger::names::DHCP;

    const T0_MS: u64 = 1_760_000_000_000;

    /// A ledger written by several identities.
    pub(crate) struct Writers {
        pub(crate) ledger: Ledger,
        clock: Clock,
        unix_ms: u64,
    }

    impl Writers {
        pub(crate) fn new() -> Self {
            Self {
                ledger: Ledger::default(),
                clock: Clock::new(),
                unix_ms: T0_MS,
            }
        }

        /// `writer` puts `machines/key = value` (or deletes it).
        pub(crate) fn write(&mut self, writer: &Identity, key: &str, value: Option<&str>) {
            self.unix_ms += 1;
            let (clock, now) = (&mut self.clock, self.unix_ms);
            match value {
                Some(v) => self
                    .ledger
                    .put(writer, clock, MACHINES, key, v.as_bytes(), now),
                None => self.ledger.delete(writer, clock, MACHINES, key, now),
            }
            .unwrap();
        }

        /// `writer` claims `addr` for `uuid` in `dhcp`, the way the allocator does.
        pub(crate) fn lease(&mut self, writer: &Identity, uuid: &str, addr: &str) {
            self.unix_ms += 1;
            let (clock, now) = (&mut self.clock, self.unix_ms);
            self.ledger
                .put(writer, clock, DHCP, uuid, addr.as_bytes(), now)
                .unwrap();
        }

        /// `writer` publishes `addr` as its own, the way the allocator does.
        pub(crate) fn publish(&mut self, writer: &Identity, addr: &str) {
            let json = machine_json(&writer.peer_id(), addr);
            self.write(writer, addr, Some(&json));
        }
    }

    pub(crate) fn machine_json(peer: &PeerId, addr: &str) -> String {
        serde_json::json!({
            "PeerID": peer.to_string(),
            "Hostname": "host",
            "OS": "linux",
            "Arch": "amd64",
            "Version": "0.1.0",
            "Address": addr,
        })
        .to_string()
    }

    pub(crate) fn identity(n: u8) -> Identity {
        Identity::from_seed([n; 32])
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn cidr(s: &str) -> Ipv4Cidr {
        s.parse().unwrap()
    }

    #[test]
    fn subnet_membership() {
        let table = [
            // (prefix, address, contains, network or broadcast)
            ("10.1.0.7/24", "10.1.0.1", true, false),
            ("10.1.0.7/24", "10.1.0.0", true, true),
            ("10.1.0.7/24", "10.1.0.255", true, true),
            ("10.1.0.7/24", "10.1.1.1", false, false),
            ("10.1.0.7/24", "255.255.255.255", false, false),
            ("10.1.0.7/30", "10.1.0.4", true, true),
            ("10.1.0.7/30", "10.1.0.7", true, true),
            ("10.1.0.7/30", "10.1.0.6", true, false),
            ("10.1.0.7/31", "10.1.0.6", true, false),
            ("10.1.0.7/31", "10.1.0.7", true, false),
            ("10.1.0.7/32", "10.1.0.7", true, false),
            ("10.1.0.7/32", "10.1.0.6", false, false),
            ("10.1.0.7/0", "192.0.2.1", true, false),
        ];
        for (prefix, addr, contains, special) in table {
            let s = Subnet::new(cidr(prefix));
            assert_eq!(s.contains(ip(addr)), contains, "{prefix} {addr}");
            assert_eq!(
                s.is_network_or_broadcast(ip(addr)),
                special,
                "{prefix} {addr}"
            );
            assert_eq!(s.is_host(ip(addr)), contains && !special, "{prefix} {addr}");
        }
    }

    #[test]
    fn entries_route_only_when_written_by_the_peer_they_name() {
        let (a, b, c) = (identity(1), identity(2), identity(3));
        let mut w = Writers::new();
        w.publish(&a, "10.1.0.5");
        w.publish(&b, "10.1.0.6");
        // c points 10.1.0.7 at b, and tries to take 10.1.0.5 for a (both refused).
        w.write(
            &c,
            "10.1.0.7",
            Some(&machine_json(&b.peer_id(), "10.1.0.7")),
        );
        let routes = Routes::from_ledger(&w.ledger, cidr("10.1.0.1/24"));
        assert_eq!(routes.owner(ip("10.1.0.7")), None);
        w.write(
            &c,
            "10.1.0.5",
            Some(&machine_json(&a.peer_id(), "10.1.0.5")),
        );
        let routes = Routes::from_ledger(&w.ledger, cidr("10.1.0.1/24"));

        assert_eq!(routes.owner(ip("10.1.0.5")), None, "c overwrote a's entry");
        assert_eq!(routes.owner(ip("10.1.0.6")), Some(b.peer_id()));
        assert_eq!(routes.owner(ip("10.1.0.7")), None);
        assert_eq!(routes.len(), 1);
        assert_eq!(
            routes.ignored(),
            IgnoredEntries {
                writer_mismatch: 2,
                ..IgnoredEntries::default()
            }
        );
    }

    #[test]
    fn an_address_routes_only_to_the_peer_holding_its_lease() {
        let (a, b, c) = (identity(1), identity(2), identity(3));
        let mut w = Writers::new();
        w.lease(&a, "node-a", "10.1.0.5");
        w.publish(&a, "10.1.0.5");
        w.lease(&b, "node-b", "10.1.0.6");
        // c publishes a's leased address as its own, and an address nobody leased.
        w.publish(&c, "10.1.0.5");
        w.publish(&c, "10.1.0.9");
        let routes = Routes::from_ledger(&w.ledger, cidr("10.1.0.1/24"));
        assert_eq!(
            routes.owner(ip("10.1.0.5")),
            None,
            "c's entry overwrote a's"
        );
        assert_eq!(routes.owner(ip("10.1.0.9")), Some(c.peer_id()), "unleased");
        assert_eq!(routes.ignored().not_lease_holder, 1);
        // a publishes again: routed to a; b's lease alone routes nothing.
        w.publish(&a, "10.1.0.5");
        let routes = Routes::from_ledger(&w.ledger, cidr("10.1.0.1/24"));
        assert_eq!(routes.owner(ip("10.1.0.5")), Some(a.peer_id()));
        assert_eq!(routes.owner(ip("10.1.0.6")), None);
        assert_eq!(routes.ignored(), IgnoredEntries::default());
        // A later claim of c on the same address loses to a's older one (the allocator's rule).
        w.lease(&c, "node-c", "10.1.0.5");
        w.publish(&c, "10.1.0.5");
        let routes = Routes::from_ledger(&w.ledger, cidr("10.1.0.1/24"));
        assert_eq!(routes.owner(ip("10.1.0.5")), None);
        assert_eq!(routes.ignored().not_lease_holder, 1);
    }

    #[test]
    fn malformed_and_outside_entries_are_ignored_and_counted() {
        let a = identity(1);
        let peer = a.peer_id().to_string();
        let mut w = Writers::new();
        let huge = format!(
            r#"{{"PeerID":"{peer}","Address":"10.1.0.9","Pad":"{}"}}"#,
            "x".repeat(MAX_MACHINE_JSON)
        );
        let malformed: [(&str, String); 8] = [
            ("not-an-ip", machine_json(&a.peer_id(), "not-an-ip")),
            ("10.1.0.300", machine_json(&a.peer_id(), "10.1.0.300")),
            ("10.1.0.2", "not json".to_owned()),
            ("10.1.0.3", r#"{"Address":"10.1.0.3"}"#.to_owned()),
            (
                "10.1.0.4",
                r#"{"PeerID":"12D3KooWnope","Address":"10.1.0.4"}"#.to_owned(),
            ),
            ("10.1.0.5", machine_json(&a.peer_id(), "10.1.0.6")),
            ("10.1.0.8", format!(r#"{{"PeerId":"{peer}"}}"#)),
            ("10.1.0.9", huge),
        ];
        for (key, value) in &malformed {
            w.write(&a, key, Some(value));
        }
        for key in ["10.1.0.0", "10.1.0.255", "10.1.1.7", "192.168.0.1"] {
            w.publish(&a, key);
        }
        // Accepted: the Address field is optional, and so are the fields routing does not read.
        w.write(&a, "10.1.0.10", Some(&format!(r#"{{"PeerID":"{peer}"}}"#)));
        w.publish(&a, "10.1.0.11");
        // Deleted entries are no routes.
        w.publish(&a, "10.1.0.12");
        w.write(&a, "10.1.0.12", None);

        let mut routes = Routes::from_ledger(&w.ledger, cidr("10.1.0.1/24"));
        assert_eq!(
            routes.ignored(),
            IgnoredEntries {
                malformed: malformed.len(),
                outside_prefix: 4,
                ..IgnoredEntries::default()
            }
        );
        assert_eq!(routes.len(), 2);
        for addr in ["10.1.0.10", "10.1.0.11"] {
            assert_eq!(routes.owner(ip(addr)), Some(a.peer_id()), "{addr}");
        }
        // Another prefix reads the same ledger differently.
        let wide = Routes::from_ledger(&w.ledger, cidr("10.1.0.1/16"));
        assert_eq!(wide.ignored().outside_prefix, 2);
        assert_eq!(wide.owner(ip("10.1.1.7")), Some(a.peer_id()));
        assert!(!routes.update(&w.ledger), "nothing changed");
    }

    #[test]
    fn routes_follow_an_address_that_moves() {
        let (a, b) = (identity(1), identity(2));
        let mut w = Writers::new();
        let mut routes = Routes::new(cidr("10.1.0.1/24"));
        assert!(routes.is_empty());
        assert!(!routes.update(&w.ledger));

        w.publish(&a, "10.1.0.5");
        assert!(routes.update(&w.ledger));
        assert_eq!(routes.owner(ip("10.1.0.5")), Some(a.peer_id()));

        // a loses 10.1.0.5 to b's older claim: a moves to .9 and retires .5, b publishes .5.
        w.publish(&a, "10.1.0.9");
        w.write(&a, "10.1.0.5", None);
        assert!(routes.update(&w.ledger));
        assert_eq!(routes.owner(ip("10.1.0.5")), None);
        assert_eq!(routes.owner(ip("10.1.0.9")), Some(a.peer_id()));
        w.publish(&b, "10.1.0.5");
        assert!(routes.update(&w.ledger));
        assert_eq!(routes.owner(ip("10.1.0.5")), Some(b.peer_id()));
        assert_eq!(routes.owner(ip("10.1.0.9")), Some(a.peer_id()));

        // The winner overwriting the loser's entry before it is retired works the same.
        w.publish(&b, "10.1.0.9");
        assert!(routes.update(&w.ledger));
        assert_eq!(routes.owner(ip("10.1.0.9")), Some(b.peer_id()));
        assert!(!routes.update(&w.ledger));
        assert_eq!(routes.len(), 2);
    }
}
