//! The members of our network this node knows about, with how fresh that knowledge is.
//!
//! Knowledge comes first-hand (a LAN beacon, a DHT record, a live connection) or second-hand
//! through gossip. Every entry remembers when its freshest first-hand news dates from; gossip
//! carries that as an age which only grows from hop to hop (plus a small penalty per hop), so a
//! member that left ages out everywhere instead of being kept alive by nodes repeating each
//! other.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::control::{MAX_MEMBER_ADDRS, MemberInfo};
use crate::identity::PeerId;

/// Staleness added per gossip hop, so repetition can never make news fresher.
pub const HOP_PENALTY: Duration = Duration::from_millis(250);

/// How a member was learned of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A LAN beacon.
    Lan,
    /// A DHT rendezvous record.
    Dht,
    /// Another member told us.
    Gossip,
    /// A live, authenticated connection.
    Connection,
}

/// One known member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Where it is reachable.
    pub addrs: Vec<SocketAddr>,
    /// When our freshest news of it dates from.
    pub fresh_at: Instant,
    /// When we first heard of it.
    pub first_seen: Instant,
    /// How we last learned of it.
    pub source: Source,
    /// Its cluster tag, 0 until some member said ([`MemberInfo::cluster`]).
    pub cluster: u32,
}

/// What [`MemberTable::observe`] changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// A member we did not know.
    New,
    /// A known member with new addresses.
    AddrsChanged,
    /// Only its freshness (or nothing) changed.
    Unchanged,
    /// Refused: ourselves, or the table is full of fresher members.
    Ignored,
}

/// The member table, bounded.
#[derive(Debug)]
pub struct MemberTable {
    me: PeerId,
    members: BTreeMap<PeerId, Member>,
    capacity: usize,
    ttl: Duration,
}

impl MemberTable {
    /// An empty table holding at most `capacity` members, forgetting those with no news for
    /// `ttl`.
    pub fn new(me: PeerId, capacity: usize, ttl: Duration) -> Self {
        Self {
            me,
            members: BTreeMap::new(),
            capacity,
            ttl,
        }
    }

    /// Number of members known.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// True when no member is known.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// One member.
    pub fn get(&self, peer: &PeerId) -> Option<&Member> {
        self.members.get(peer)
    }

    /// Every member, by peer id.
    pub fn iter(&self) -> impl Iterator<Item = (&PeerId, &Member)> {
        self.members.iter()
    }

    /// Marks a known member fresh at `now` without news of its addresses: its cluster's ledger
    /// counts it live (see [`crate::cluster::liveness`]). Unknown peers are left out.
    pub fn vouch(&mut self, now: Instant, peer: &PeerId) {
        if let Some(m) = self.members.get_mut(peer) {
            m.fresh_at = m.fresh_at.max(now);
        }
    }

    /// Records news of `peer`, `age` old at `now`. Empty `addrs` keep the known ones.
    pub fn observe(
        &mut self,
        now: Instant,
        peer: PeerId,
        addrs: &[SocketAddr],
        age: Duration,
        source: Source,
    ) -> Change {
        if peer == self.me || age >= self.ttl {
            return Change::Ignored;
        }
        let fresh_at = now.checked_sub(age).unwrap_or(now);
        // At most MAX_MEMBER_ADDRS, repeats in a row dropped; compared before any allocation
        // (this runs for every gossip entry received).
        let addrs = &addrs[..addrs.len().min(MAX_MEMBER_ADDRS)];
        let normalized = || {
            addrs
                .iter()
                .enumerate()
                .filter(|(i, a)| *i == 0 || addrs[i - 1] != **a)
                .map(|(_, a)| *a)
        };
        if let Some(m) = self.members.get_mut(&peer) {
            let fresher = fresh_at > m.fresh_at;
            if fresher {
                m.fresh_at = fresh_at;
                m.source = source;
            }
            // Addresses follow the freshest news, or fill in when we had none.
            if !addrs.is_empty()
                && (fresher || m.addrs.is_empty())
                && !normalized().eq(m.addrs.iter().copied())
            {
                m.addrs = normalized().collect();
                return Change::AddrsChanged;
            }
            return Change::Unchanged;
        }
        let addrs: Vec<SocketAddr> = normalized().collect();
        if self.members.len() >= self.capacity && !self.evict_stalest(fresh_at) {
            return Change::Ignored;
        }
        self.members.insert(
            peer,
            Member {
                addrs,
                fresh_at,
                first_seen: now,
                source,
                cluster: 0,
            },
        );
        Change::New
    }

    /// Records the cluster tag a member's gossip gave `peer` (0 tells nothing).
    pub fn set_cluster(&mut self, peer: &PeerId, cluster: u32) {
        if let Some(m) = self.members.get_mut(peer).filter(|_| cluster != 0) {
            m.cluster = cluster;
        }
    }

    fn evict_stalest(&mut self, than: Instant) -> bool {
        let stalest = self
            .members
            .iter()
            .min_by_key(|(_, m)| m.fresh_at)
            .map(|(p, m)| (*p, m.fresh_at));
        match stalest {
            Some((peer, at)) if at < than => {
                self.members.remove(&peer);
                true
            }
            _ => false,
        }
    }

    /// Forgets members with no news for the table's ttl; returns them.
    pub fn expire(&mut self, now: Instant) -> Vec<PeerId> {
        let ttl = self.ttl;
        let gone: Vec<PeerId> = self
            .members
            .iter()
            .filter(|(_, m)| now.saturating_duration_since(m.fresh_at) >= ttl)
            .map(|(p, _)| *p)
            .collect();
        for p in &gone {
            self.members.remove(p);
        }
        gone
    }

    /// When the next member would expire.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.members.values().map(|m| m.fresh_at + self.ttl).min()
    }

    /// Gossip entries for `peers` (or all members), with their ages plus one hop's penalty.
    pub fn gossip(&self, now: Instant, peers: Option<&[PeerId]>) -> Vec<MemberInfo> {
        let entry = |(peer, m): (&PeerId, &Member)| MemberInfo {
            peer: *peer,
            addrs: m.addrs.clone(),
            age: now.saturating_duration_since(m.fresh_at) + HOP_PENALTY,
            cluster: m.cluster,
        };
        match peers {
            Some(list) => list
                .iter()
                .filter_map(|p| self.members.get_key_value(p))
                .map(entry)
                .collect(),
            None => self.members.iter().map(entry).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(n: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, n], 7120))
    }

    #[test]
    fn news_is_kept_by_freshness_and_ages_out() {
        let t0 = Instant::now();
        let mut table = MemberTable::new(PeerId([0; 32]), 10, Duration::from_secs(60));
        let p = PeerId([1; 32]);
        assert_eq!(
            table.observe(t0, p, &[addr(1)], Duration::ZERO, Source::Lan),
            Change::New
        );
        // Older news with other addresses does not override fresher news.
        assert_eq!(
            table.observe(t0, p, &[addr(2)], Duration::from_secs(5), Source::Gossip),
            Change::Unchanged
        );
        assert_eq!(table.get(&p).unwrap().addrs, vec![addr(1)]);
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(
            table.observe(t1, p, &[addr(2)], Duration::ZERO, Source::Dht),
            Change::AddrsChanged
        );
        assert!(table.expire(t1 + Duration::from_secs(59)).is_empty());
        assert_eq!(table.expire(t1 + Duration::from_secs(60)), vec![p]);
        assert!(table.is_empty());
    }

    #[test]
    fn gossip_cannot_keep_a_departed_member_alive() {
        let t0 = Instant::now();
        let ttl = Duration::from_secs(60);
        let p = PeerId([9; 32]);
        let mut a = MemberTable::new(PeerId([1; 32]), 10, ttl);
        let mut b = MemberTable::new(PeerId([2; 32]), 10, ttl);
        a.observe(t0, p, &[addr(9)], Duration::ZERO, Source::Lan);
        // a and b keep telling each other about p every second; p never speaks again.
        let mut now = t0;
        for _ in 0..120 {
            now += Duration::from_secs(1);
            for info in a.gossip(now, None) {
                b.observe(now, info.peer, &info.addrs, info.age, Source::Gossip);
            }
            for info in b.gossip(now, None) {
                a.observe(now, info.peer, &info.addrs, info.age, Source::Gossip);
            }
            a.expire(now);
            b.expire(now);
        }
        assert!(a.get(&p).is_none() && b.get(&p).is_none());
    }

    #[test]
    fn a_member_the_ledger_vouches_for_stays_and_unknown_peers_are_not_added() {
        let t0 = Instant::now();
        let ttl = Duration::from_secs(60);
        let (p, stranger) = (PeerId([9; 32]), PeerId([8; 32]));
        let mut table = MemberTable::new(PeerId([1; 32]), 10, ttl);
        table.observe(t0, p, &[addr(9)], Duration::ZERO, Source::Gossip);
        let later = t0 + Duration::from_secs(50);
        table.vouch(later, &p);
        table.vouch(later, &stranger);
        assert!(table.expire(t0 + ttl).is_empty(), "vouched for at 50 s");
        assert!(table.get(&stranger).is_none());
        assert_eq!(table.get(&p).map(|m| m.addrs.clone()), Some(vec![addr(9)]));
        assert_eq!(table.expire(later + ttl), vec![p]);
    }

    #[test]
    fn self_is_ignored_and_capacity_evicts_the_stalest() {
        let t0 = Instant::now();
        let mut table = MemberTable::new(PeerId([0; 32]), 2, Duration::from_secs(60));
        assert_eq!(
            table.observe(t0, PeerId([0; 32]), &[], Duration::ZERO, Source::Lan),
            Change::Ignored
        );
        table.observe(
            t0,
            PeerId([1; 32]),
            &[],
            Duration::from_secs(30),
            Source::Gossip,
        );
        table.observe(
            t0,
            PeerId([2; 32]),
            &[],
            Duration::from_secs(10),
            Source::Gossip,
        );
        assert_eq!(
            table.observe(
                t0,
                PeerId([3; 32]),
                &[],
                Duration::from_secs(40),
                Source::Gossip
            ),
            Change::Ignored
        );
        assert_eq!(
            table.observe(t0, PeerId([3; 32]), &[], Duration::ZERO, Source::Lan),
            Change::New
        );
        assert!(table.get(&PeerId([1; 32])).is_none());
        assert_eq!(table.len(), 2);
    }
}
