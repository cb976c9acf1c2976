//! Iterative lookups (FIND_NODE or GET): the state of one lookup (candidates sorted by distance
//! to the target, each fresh, in flight, answered or failed), how [`Kad`] drives it, and the PUT
//! round that follows a publication lookup.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::message::{self, Body, Message, NodeInfo, PutStatus};
use super::routing::{Distance, Entry, NodeId};
use super::{
    Command, Expect, FIRST_REPUBLISH, Kad, KadEvent, LOOKUP_DEADLINE, MAX_LOOKUP_MESSAGES,
    MAX_PAGES, MAX_SEEN_RECORDS, Purpose, PutBatch,
};
use crate::identity::PeerId;

/// What the lookup is for.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Goal {
    /// Find the k closest nodes; `report` emits `ClosestPeers` at the end.
    FindNode { report: bool },
    /// Collect the records under the target key (GET).
    Get,
    /// Find the k closest nodes to the key, then PUT the published record to them.
    Publish,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum State {
    Fresh,
    InFlight,
    Responded,
    Failed,
}

#[derive(Clone, Debug)]
pub(super) struct Candidate {
    pub node: NodeInfo,
    pub id: NodeId,
    pub dist: Distance,
    pub state: State,
    /// Hops from us: 1 for peers from our own table, n + 1 for peers a depth-n node named.
    pub depth: u32,
    /// VALUE pages fetched from this node.
    pub pages: u32,
}

#[derive(Debug)]
pub(super) struct Lookup {
    pub target: NodeId,
    pub goal: Goal,
    /// Closest first; at most `cap` entries.
    pub candidates: Vec<Candidate>,
    pub cap: usize,
    /// Requests sent, retries and pages included.
    pub messages: u32,
    pub deadline: Instant,
    /// Digests of the records already reported (GET).
    pub seen: BTreeSet<[u8; 32]>,
    /// A sampling GET (the rendezvous): each holder is asked for one VALUE page, starting at a
    /// random record, instead of every page. Holders of one key hold about the same records in
    /// about the same order, so k holders then give up to k different pages, and members that
    /// look up the same key see different samples: the reply bytes per lookup stay at most k
    /// datagrams whatever the number of records, where reading every page costs as many
    /// datagrams per holder as the key has records per page (up to [`MAX_PAGES`]).
    pub sample: bool,
    /// Offsets a sampling GET draws its first record from: `total - records + 1` of the largest
    /// full page seen so far (0 until a holder answered: ask from the start).
    pub spread: u16,
}

impl Lookup {
    pub fn new(
        target: NodeId,
        goal: Goal,
        seeds: &[Entry],
        cap: usize,
        deadline: Instant,
    ) -> Lookup {
        let mut l = Lookup {
            target,
            goal,
            candidates: Vec::with_capacity(cap),
            cap,
            messages: 0,
            deadline,
            seen: BTreeSet::new(),
            sample: false,
            spread: 0,
        };
        for e in seeds {
            l.add(
                NodeInfo {
                    peer: e.peer,
                    addr: e.addr,
                },
                1,
                None,
            );
        }
        l
    }

    /// Adds a peer some node told us about (ignored when known, ourselves, or too far).
    pub fn add(&mut self, node: NodeInfo, depth: u32, me: Option<&PeerId>) {
        // Ourselves, or an address no one can be reached at (a NODES list from a hostile node
        // must not make us send to port 0 or to the unspecified address).
        if me == Some(&node.peer) || node.addr.port() == 0 || node.addr.ip().is_unspecified() {
            return;
        }
        let id = NodeId::of_peer(&node.peer);
        let dist = id.distance(&self.target);
        let pos = match self.candidates.binary_search_by(|c| c.dist.cmp(&dist)) {
            Ok(_) => return,
            Err(pos) => pos,
        };
        if pos >= self.cap {
            return;
        }
        self.candidates.insert(
            pos,
            Candidate {
                node,
                id,
                dist,
                state: State::Fresh,
                depth,
                pages: 0,
            },
        );
        self.candidates.truncate(self.cap);
    }

    pub fn candidate_mut(&mut self, id: &NodeId) -> Option<&mut Candidate> {
        let dist = id.distance(&self.target);
        let pos = self
            .candidates
            .binary_search_by(|c| c.dist.cmp(&dist))
            .ok()?;
        self.candidates.get_mut(pos)
    }

    fn in_flight(&self) -> usize {
        self.candidates
            .iter()
            .filter(|c| c.state == State::InFlight)
            .count()
    }

    /// The k closest candidates that have not failed.
    fn top(&self, k: usize) -> impl Iterator<Item = &Candidate> {
        self.candidates
            .iter()
            .filter(|c| c.state != State::Failed)
            .take(k)
    }

    /// Index of the next candidate to query: the closest fresh one among the k closest live
    /// ones, when fewer than `alpha` requests are in flight and the message budget allows.
    pub fn next_to_query(&self, k: usize, alpha: usize, max_messages: u32) -> Option<usize> {
        if self.in_flight() >= alpha || self.messages >= max_messages {
            return None;
        }
        let next = self.top(k).find(|c| c.state == State::Fresh)?;
        self.candidates.iter().position(|c| c.id == next.id)
    }

    /// Done when the k closest live candidates have all answered, or nothing is left to wait
    /// for.
    pub fn is_done(&self, k: usize, max_messages: u32) -> bool {
        if self.top(k).all(|c| c.state == State::Responded) {
            return true;
        }
        self.in_flight() == 0
            && (self.messages >= max_messages || self.top(k).all(|c| c.state != State::Fresh))
    }

    /// The k closest candidates that answered.
    pub fn closest_responded(&self, k: usize) -> Vec<NodeInfo> {
        self.candidates
            .iter()
            .filter(|c| c.state == State::Responded)
            .take(k)
            .map(|c| c.node)
            .collect()
    }

    /// Longest chain of referrals that led to an answering node.
    pub fn hops(&self) -> u32 {
        self.candidates
            .iter()
            .filter(|c| c.state == State::Responded)
            .map(|c| c.depth)
            .max()
            .unwrap_or(0)
    }
}

impl Kad {
    pub(super) fn start_queued(&mut self, now: Instant) {
        while self.lookups.len() < self.settings.max_lookups {
            let Some(cmd) = self.queued.pop_front() else {
                break;
            };
            let (target, goal) = cmd.target();
            self.routing.touch(&target, now);
            let seeds = self.routing.closest(&target, self.settings.k);
            let cap = (4 * self.settings.k).max(16);
            let mut lookup = Lookup::new(target, goal, &seeds, cap, now + LOOKUP_DEADLINE);
            lookup.sample = matches!(cmd, Command::Get { sample: true, .. });
            let id = self.next_lookup_id;
            self.next_lookup_id += 1;
            if goal == Goal::Get {
                // Our own store counts as one of the nodes asked.
                let local: Vec<Vec<u8>> = self
                    .store
                    .get(now, &target.0)
                    .map(|r| r.record.clone())
                    .collect();
                let fresh = remember_records(&mut lookup, local);
                self.lookups.insert(id, lookup);
                self.report_records(target.0, fresh);
            } else {
                self.lookups.insert(id, lookup);
            }
            self.drive(id, now);
        }
    }

    /// Sends what the lookup may send now, or finishes it.
    pub(super) fn drive(&mut self, id: u64, now: Instant) {
        let (k, alpha) = (self.settings.k, self.settings.alpha);
        loop {
            let Some(l) = self.lookups.get_mut(&id) else {
                return;
            };
            if l.is_done(k, MAX_LOOKUP_MESSAGES) {
                self.finish_lookup(id, now);
                return;
            }
            if self.pending.len() >= self.settings.max_pending {
                return;
            }
            let Some(i) = l.next_to_query(k, alpha, MAX_LOOKUP_MESSAGES) else {
                return;
            };
            let Some(c) = l.candidates.get_mut(i) else {
                return;
            };
            c.state = State::InFlight;
            let (node, cid, target, goal) = (c.node, c.id, l.target, l.goal);
            l.messages += 1;
            let offset = if l.sample && l.spread > 1 {
                u16::try_from(self.rng.below(u64::from(l.spread))).unwrap_or(0)
            } else {
                0
            };
            let (body, expect) = match goal {
                Goal::Get => (
                    Body::Get {
                        key: target.0,
                        offset,
                    },
                    Expect::NodesOrValue,
                ),
                _ => (Body::FindNode { target: target.0 }, Expect::Nodes),
            };
            let purpose = Purpose::Lookup {
                lookup: id,
                node: cid,
                offset,
            };
            if !self.send_request(
                now,
                node.addr,
                Some(node.peer),
                body,
                purpose,
                expect,
                false,
            ) {
                if let Some(c) = self
                    .lookups
                    .get_mut(&id)
                    .and_then(|l| l.candidate_mut(&cid))
                {
                    c.state = State::Failed;
                }
            }
        }
    }

    pub(super) fn on_lookup_reply(
        &mut self,
        now: Instant,
        id: u64,
        node: NodeId,
        offset: u16,
        msg: Message,
    ) {
        let me = self.me;
        let Some(l) = self.lookups.get_mut(&id) else {
            return;
        };
        let (goal, sample) = (l.goal, l.sample);
        let Some(c) = l.candidate_mut(&node) else {
            return;
        };
        let depth = c.depth;
        let (nodes, records, total) = match msg.body {
            Body::Nodes { nodes, .. } => (nodes, Vec::new(), 0),
            Body::Value {
                nodes,
                records,
                total,
                ..
            } => (nodes, records, total),
            _ => return,
        };
        let received = usize::from(offset) + records.len();
        let more = goal == Goal::Get
            && !sample
            && !records.is_empty()
            && received < usize::from(total)
            && c.pages + 1 < MAX_PAGES;

        if more {
            c.pages += 1;
        } else {
            c.state = State::Responded;
        }
        let peer_addr = c.node;
        if sample && !records.is_empty() {
            // Every start from 0 to `total - records` gives a full page.
            let starts = usize::from(total).saturating_sub(records.len()) + 1;
            l.spread = l.spread.max(u16::try_from(starts).unwrap_or(u16::MAX));
        }
        for n in nodes {
            l.add(n, depth + 1, Some(&me));
        }
        let target = l.target;
        let fresh = remember_records(l, records);
        if more {
            l.messages += 1;
            let offset = u16::try_from(received).unwrap_or(u16::MAX);
            let purpose = Purpose::Lookup {
                lookup: id,
                node,
                offset,
            };
            let body = Body::Get {
                key: target.0,
                offset,
            };
            if !self.send_request(
                now,
                peer_addr.addr,
                Some(peer_addr.peer),
                body,
                purpose,
                Expect::NodesOrValue,
                false,
            ) {
                if let Some(c) = self
                    .lookups
                    .get_mut(&id)
                    .and_then(|l| l.candidate_mut(&node))
                {
                    c.state = State::Responded;
                }
            }
        }
        self.report_records(target.0, fresh);
    }

    pub(super) fn finish_lookup(&mut self, id: u64, now: Instant) {
        let Some(l) = self.lookups.remove(&id) else {
            return;
        };
        let (k, hops, messages) = (self.settings.k, l.hops(), l.messages);
        match l.goal {
            Goal::FindNode { report } => {
                if report {
                    let peers = l.closest_responded(k);
                    self.push_event(KadEvent::ClosestPeers {
                        target: l.target,
                        peers,
                        hops,
                        messages,
                    });
                }
                if l.target == self.my_id && !self.joined && !self.routing.is_empty() {
                    // Joined: now refresh every bucket farther than our closest neighbour.
                    self.joined = true;
                    self.refresh(now);
                }
            }
            Goal::Get => {
                self.rendezvous_lookup_done(&l.target.0);
                self.push_event(KadEvent::LookupDone {
                    key: l.target.0,
                    hops,
                    messages,
                });
            }
            Goal::Publish => self.put_to_closest(&l, now),
        }
    }

    pub(super) fn refresh(&mut self, now: Instant) {
        for bucket in self
            .routing
            .stale_buckets(now, self.settings.refresh_interval)
        {
            let target = self.my_id.random_in_bucket(bucket, &mut self.rng);
            if self
                .enqueue(Command::FindNode {
                    target,
                    report: false,
                })
                .is_err()
            {
                break;
            }
            // Counted as refreshed even while queued, so it is not queued twice.
            self.routing.touch(&target, now);
        }
        let step = (self.settings.refresh_interval / 4).max(Duration::from_secs(1));
        self.next_refresh = Some(now + step);
    }

    // ---- publishing ----

    pub(super) fn put_to_closest(&mut self, l: &Lookup, now: Instant) {
        let key = l.target.0;
        let Some(p) = self.published.get(&key) else {
            return;
        };
        let (record, ttl) = (p.record.clone(), p.ttl);
        let k = self.settings.k;
        let closest = l.closest_responded(k);
        let mine = self.my_id.distance(&l.target);
        let self_is_close = closest.len() < k
            || closest
                .last()
                .is_some_and(|n| mine < NodeId::of_peer(&n.peer).distance(&l.target));
        let mut stored = 0;
        if self_is_close
            && self.store.put_local(now, self.me, key, record.clone(), ttl) == PutStatus::Stored
        {
            stored += 1;
        }
        let batch = self.next_batch_id;
        self.next_batch_id += 1;
        self.batches.insert(
            batch,
            PutBatch {
                key,
                outstanding: closest.len(),
                stored,
                remote: 0,
            },
        );
        let ttl_secs = u32::try_from(ttl.as_secs())
            .unwrap_or(message::MAX_TTL_SECS)
            .min(message::MAX_TTL_SECS);
        for n in &closest {
            let body = Body::Put {
                key,
                ttl_secs,
                record: record.clone(),
            };
            if !self.send_request(
                now,
                n.addr,
                Some(n.peer),
                body,
                Purpose::Put { batch },
                Expect::PutAck,
                true,
            ) {
                self.put_resolved(batch, None, now);
            }
        }
        if closest.is_empty() {
            self.finish_batch(batch, now);
        }
    }

    pub(super) fn put_resolved(&mut self, batch: u64, status: Option<PutStatus>, now: Instant) {
        let Some(b) = self.batches.get_mut(&batch) else {
            return;
        };
        b.outstanding = b.outstanding.saturating_sub(1);
        if status == Some(PutStatus::Stored) {
            b.stored += 1;
            b.remote += 1;
        }
        if b.outstanding == 0 {
            self.finish_batch(batch, now);
        }
    }

    pub(super) fn finish_batch(&mut self, batch: u64, now: Instant) {
        let Some(b) = self.batches.remove(&batch) else {
            return;
        };
        let rendezvous = self
            .published
            .get(&b.key)
            .is_some_and(|p| p.window.is_some());
        if rendezvous && b.remote > 0 {
            self.rendezvous_stored(now);
        }
        if let Some(p) = self.published.get_mut(&b.key) {
            // Early rounds run while routing tables are still filling (a young network, or we
            // just joined), so the nodes they reached may not be the true k closest: republish
            // after 30 s, 1, 2, 4 min... before settling at every TTL/2.
            let steady = p.ttl / 2;
            let wait = if b.remote == 0 {
                self.settings.retry_interval
            } else {
                FIRST_REPUBLISH
                    .checked_mul(1 << p.rounds.min(16))
                    .map_or(steady, |w| w.min(steady))
            };
            p.rounds = p.rounds.saturating_add(1);
            p.next = Some(now + wait);
        }
        self.push_event(KadEvent::Published {
            key: b.key,
            replicas: b.stored,
        });
    }
}

/// Keeps the records `lookup` has not reported yet (remembering at most
/// [`MAX_SEEN_RECORDS`] digests) and returns them.
fn remember_records(lookup: &mut Lookup, records: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
    let mut fresh = Vec::new();
    for r in records {
        let digest: [u8; 32] = Sha256::digest(&r).into();
        if lookup.seen.contains(&digest) || lookup.seen.len() >= MAX_SEEN_RECORDS {
            continue;
        }
        lookup.seen.insert(digest);
        fresh.push(r);
    }
    fresh
}
