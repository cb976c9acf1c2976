//! VPN packets held for a member while the connection to it is being made, as a router holds
//! packets while it resolves a neighbour (Linux's `unres_qlen`): the first packets of a flow to
//! a member we are not connected to yet (a k3s agent's first SYN to its server, on a LAN larger
//! than the neighbours a node keeps) go out when the connection is up, a few milliseconds on a
//! LAN, instead of being dropped and resent by TCP a second later.
//!
//! Bounds: [`MAX_HELD_PER_PEER`] packets per member (the oldest gives way), [`MAX_HELD_BYTES`]
//! in all (a packet that does not fit is dropped), [`MAX_HELD_AGE`] per packet.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::identity::PeerId;

/// Packets held per member.
pub const MAX_HELD_PER_PEER: usize = 32;
/// Bytes held for all members together.
pub const MAX_HELD_BYTES: usize = 256 * 1024;
/// How long a packet is held: past this, the connection is slow to come (a punch, a relay) and
/// the sender's own retransmission carries the data.
pub const MAX_HELD_AGE: Duration = Duration::from_secs(3);

/// Packets waiting for their member's connection (see the module documentation).
#[derive(Debug, Default)]
pub struct HeldPackets {
    by_peer: HashMap<PeerId, VecDeque<(Instant, Bytes)>>,
    bytes: usize,
}

impl HeldPackets {
    /// Holds `packet` for `peer`; the number of packets dropped to keep the bounds (the oldest
    /// of `peer`'s, or `packet` itself when the bytes are used up).
    pub fn hold(&mut self, now: Instant, peer: PeerId, packet: Bytes) -> u64 {
        if self.bytes + packet.len() > MAX_HELD_BYTES {
            return 1;
        }
        let queue = self.by_peer.entry(peer).or_default();
        let mut dropped = 0;
        if queue.len() >= MAX_HELD_PER_PEER {
            if let Some((_, old)) = queue.pop_front() {
                self.bytes -= old.len();
                dropped += 1;
            }
        }
        self.bytes += packet.len();
        queue.push_back((now, packet));
        dropped
    }

    /// Takes `peer`'s packets, oldest first: those still young enough, and how many were too
    /// old.
    pub fn release(&mut self, now: Instant, peer: &PeerId) -> (Vec<Bytes>, u64) {
        let Some(queue) = self.by_peer.remove(peer) else {
            return (Vec::new(), 0);
        };
        let mut expired = 0;
        let mut packets = Vec::with_capacity(queue.len());
        for (at, packet) in queue {
            self.bytes -= packet.len();
            if now.saturating_duration_since(at) < MAX_HELD_AGE {
                packets.push(packet);
            } else {
                expired += 1;
            }
        }
        (packets, expired)
    }

    /// Drops packets held [`MAX_HELD_AGE`] or longer; how many.
    pub fn expire(&mut self, now: Instant) -> u64 {
        let mut expired = 0;
        let mut freed = 0;
        self.by_peer.retain(|_, queue| {
            while queue
                .front()
                .is_some_and(|(at, _)| now.saturating_duration_since(*at) >= MAX_HELD_AGE)
            {
                if let Some((_, p)) = queue.pop_front() {
                    freed += p.len();
                    expired += 1;
                }
            }
            !queue.is_empty()
        });
        self.bytes -= freed;
        expired
    }

    /// Bytes held now.
    #[must_use]
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(n: u8) -> PeerId {
        PeerId([n; 32])
    }

    #[test]
    fn packets_wait_for_their_member_and_go_out_in_order() {
        let t0 = Instant::now();
        let mut held = HeldPackets::default();
        assert_eq!(held.hold(t0, peer(1), Bytes::from_static(b"syn")), 0);
        assert_eq!(held.hold(t0, peer(2), Bytes::from_static(b"other")), 0);
        assert_eq!(held.hold(t0, peer(1), Bytes::from_static(b"data")), 0);
        let (packets, expired) = held.release(t0 + Duration::from_millis(5), &peer(1));
        assert_eq!(
            packets,
            vec![Bytes::from_static(b"syn"), Bytes::from_static(b"data")]
        );
        assert_eq!(expired, 0);
        assert_eq!(held.bytes(), 5, "the other member's packet stays");
        assert!(held.release(t0, &peer(1)).0.is_empty(), "released once");
    }

    #[test]
    fn bounds_hold_per_member_in_bytes_and_in_age() {
        let t0 = Instant::now();
        let mut held = HeldPackets::default();
        let mut dropped = 0;
        for i in 0..MAX_HELD_PER_PEER + 3 {
            dropped += held.hold(t0, peer(1), Bytes::from(vec![i as u8; 10]));
        }
        assert_eq!(dropped, 3, "the oldest give way");
        let (packets, _) = held.release(t0, &peer(1));
        assert_eq!(packets.len(), MAX_HELD_PER_PEER);
        assert_eq!(packets[0][0], 3, "the newest are kept");

        let big = Bytes::from(vec![0; 60 * 1024]);
        let mut dropped = 0;
        for n in 0..8 {
            dropped += held.hold(t0, peer(n), big.clone());
        }
        assert!(held.bytes() <= MAX_HELD_BYTES);
        assert_eq!(dropped, 4, "{} bytes held", held.bytes());

        let late = t0 + MAX_HELD_AGE;
        assert_eq!(held.expire(late), 4);
        assert_eq!(held.bytes(), 0);
        held.hold(t0, peer(9), big.clone());
        assert_eq!(
            held.release(late, &peer(9)),
            (Vec::new(), 1),
            "too old to send"
        );
        assert_eq!(held.bytes(), 0);
    }
}
