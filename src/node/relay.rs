//! The relayed paths this node uses or serves, by virtual address (see
//! [`crate::overlay::relay`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;

use crate::identity::PeerId;
use crate::overlay::relay::relay_addr;

/// A relayed path: QUIC packets for `peer` travel through `relay`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayPath {
    /// The member at the other end.
    pub peer: PeerId,
    /// The member forwarding the packets.
    pub relay: PeerId,
}

/// Virtual addresses of relayed paths, both ways, bounded.
#[derive(Debug)]
pub struct RelayPaths {
    next_slot: u32,
    by_addr: BTreeMap<SocketAddr, RelayPath>,
    by_path: BTreeMap<(PeerId, PeerId), SocketAddr>,
    capacity: usize,
}

impl RelayPaths {
    /// An empty table of at most `capacity` paths.
    pub fn new(capacity: usize) -> Self {
        Self {
            next_slot: 0,
            by_addr: BTreeMap::new(),
            by_path: BTreeMap::new(),
            capacity,
        }
    }

    /// The virtual address of the path to `peer` through `relay`, made on first use; `None` when
    /// the table is full.
    pub fn addr_for(&mut self, peer: PeerId, relay: PeerId) -> Option<SocketAddr> {
        if let Some(addr) = self.by_path.get(&(peer, relay)) {
            return Some(*addr);
        }
        if self.by_addr.len() >= self.capacity {
            return None;
        }
        let addr = relay_addr(self.next_slot);
        self.next_slot = self.next_slot.wrapping_add(1);
        self.by_addr.insert(addr, RelayPath { peer, relay });
        self.by_path.insert((peer, relay), addr);
        Some(addr)
    }

    /// The path behind a virtual address.
    pub fn get(&self, addr: &SocketAddr) -> Option<RelayPath> {
        self.by_addr.get(addr).copied()
    }

    /// Forgets every path through `relay` (it went away); returns how many.
    pub fn remove_relay(&mut self, relay: &PeerId) -> usize {
        let gone: Vec<SocketAddr> = self
            .by_addr
            .iter()
            .filter(|(_, p)| p.relay == *relay)
            .map(|(a, _)| *a)
            .collect();
        for addr in &gone {
            if let Some(path) = self.by_addr.remove(addr) {
                self.by_path.remove(&(path.peer, path.relay));
            }
        }
        gone.len()
    }

    /// Number of paths.
    pub fn len(&self) -> usize {
        self.by_addr.len()
    }

    /// True when there is no path.
    pub fn is_empty(&self) -> bool {
        self.by_addr.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::overlay::relay::is_relay_addr;

    #[test]
    fn paths_get_stable_distinct_virtual_addresses_and_are_bounded() {
        let (a, b, r, s) = (
            PeerId([1; 32]),
            PeerId([2; 32]),
            PeerId([8; 32]),
            PeerId([9; 32]),
        );
        let mut paths = RelayPaths::new(3);
        let ar = paths.addr_for(a, r).unwrap();
        assert!(is_relay_addr(&ar));
        assert_eq!(paths.addr_for(a, r), Some(ar));
        let br = paths.addr_for(b, r).unwrap();
        let as_ = paths.addr_for(a, s).unwrap();
        assert!(ar != br && br != as_ && ar != as_);
        assert_eq!(paths.get(&br), Some(RelayPath { peer: b, relay: r }));
        assert_eq!(paths.addr_for(b, s), None, "full");
        assert_eq!(paths.remove_relay(&r), 2);
        assert_eq!(paths.get(&ar), None);
        assert_eq!(paths.len(), 1);
        assert!(paths.addr_for(b, s).is_some());
    }
}
