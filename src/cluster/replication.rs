//! Ledger replication between connected members.
//!
//! - When a connection comes up, both ends send their [`Digest`]: each catches up with the other
//!   in one round trip (see the anti-entropy steps in [`crate::ledger`]).
//! - Every [`ANTI_ENTROPY_INTERVAL`] a node checks with one connected member in turn, which
//!   repairs whatever a lost push missed: it sends a *brief* digest (the buckets' counts and
//!   hashes, without the version vector, which grows with the number of writers), and a member
//!   whose buckets differ answers with its full digest, which runs the exchange above the other
//!   way; one whose buckets match answers nothing. So a quiet cluster's checks cost the same
//!   whatever its size.
//! - Entries that are new to a node are pushed, as a [`Batch`] without requests, to every
//!   connected member that is not known to hold them already. A node's own writes go at once. What
//!   it learns from a member waits [`NEWS_BATCH_DELAY`] (drawn between half and one and a half of
//!   it) with the rest of what it learns meanwhile: every member then gets one message instead of
//!   one per message received, and the members that sent the same entries meanwhile get none of
//!   them. Before this every fresh entry crossed every connection in both directions when both
//!   ends learned it at about the same time (at 300 nodes each node received each entry ~10
//!   times and sent 13 k messages while the clusters formed); the random delay lets one end of
//!   a connection go first, so the other learns it holds the entry and sends it nothing.
//! - Relayed news goes in full to [`EAGER_FANOUT`] members drawn at random and is *announced*
//!   to the others (bucket, key, version and a hash tag: ~60 bytes instead of an entry's ~300
//!   with its signature). A member that lacks an announced entry asks for it ([`Request`]) if
//!   no full copy came within [`LAZY_WAIT`], from the next member that announced it after
//!   [`ASK_TIMEOUT`]; one that holds it is known to, and gets none of it. The full copies
//!   spread as an epidemic of fanout 3, which reaches nearly every member in a few hops; the
//!   announcements make sure of the rest (the lazy push of epidemic broadcast trees, without
//!   the tree). At 200 simulated nodes in 10 clusters this cut the bytes sent while the clusters
//!   formed from 208 to 93 MB and the stale copies received from 8.2 to 3.0 per fresh entry, for
//!   0.75 s more to form (4.15 s virtual). A node's own writes still go in full to every member
//!   at once.
//! - Heartbeats are news like any other entry: a node writes one only when it starts, when it is
//!   suspected, and every few minutes (see [`super::liveness`]), so an idle cluster sends none.
//!   (Before, every node beat every 15 s and every node learned every beat: the heartbeats were
//!   two thirds of what an idle cluster sent, and grew with its size.)
//!
//! Idle cost per node: one brief digest per [`ANTI_ENTROPY_INTERVAL`] (and, with several
//! clusters on one token, a full one every [`FULL_DIGEST_EVERY`] of them); see the README's idle
//! traffic section.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use crate::identity::PeerId;
use crate::ledger::{
    Announced, Applied, Batch, Entry, KeyId, Ledger, Request, Scope, SyncLimits, SyncMessage,
};
use crate::rng::Rng;

/// How often a node runs a digest exchange with one connected member (pushes carry the news;
/// this repairs what a lost connection missed, and a connection that comes up runs one at
/// once).
pub const ANTI_ENTROPY_INTERVAL: Duration = Duration::from_secs(60);
/// Every this many periodic exchanges, one with a member of another cluster sends a full digest
/// instead of a brief one ([`crate::ledger::Digest::brief`]).
pub const FULL_DIGEST_EVERY: usize = 10;
/// Wait before a digest goes again to a connected member whose first exchange has not completed.
pub const FIRST_EXCHANGE_RETRY: Duration = Duration::from_secs(2);
/// Mean wait of relayed news before it goes on (see the module documentation): longer than a
/// link's latency, so that a member that sends the same entry meanwhile is seen to hold it, and
/// short against the election's and the allocator's waits (a few hops add a fraction of a
/// second). At 300 simulated nodes 60 ms formed the clusters sooner than 20 ms (3.5 s virtual
/// against 4.65), with half the messages.
pub const NEWS_BATCH_DELAY: Duration = Duration::from_millis(60);
/// Members a batch of relayed news goes to in full; the others get its announcement (see the
/// module documentation).
pub const EAGER_FANOUT: usize = 3;
/// How long an announced entry may take to arrive in full from another member before it is
/// asked for: about two news delays, the time another member's full copy takes.
pub const LAZY_WAIT: Duration = Duration::from_millis(120);
/// How long an asked-for entry may take before the next member that announced it is asked.
pub const ASK_TIMEOUT: Duration = Duration::from_secs(1);
/// Most announced entries waited for at once; further announcements are ignored until room is
/// made (the periodic exchange brings whatever is missed).
pub const MAX_WANTED: usize = 4096;
/// Members remembered per announced entry (asked in turn).
pub const MAX_ANNOUNCERS: usize = 3;

/// What replication has done since the node started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplicationStats {
    /// Sync messages received.
    pub messages_in: u64,
    /// Sync messages sent.
    pub messages_out: u64,
    /// Bytes of sync messages received.
    pub bytes_in: u64,
    /// Bytes of sync messages sent.
    pub bytes_out: u64,
    /// Of those, digest exchanges (digests, summaries and the batches that answer them).
    pub exchange_bytes_out: u64,
    /// Entries announced to members instead of sent in full.
    pub entries_announced: u64,
    /// Announced entries asked for (not received in full in time).
    pub entries_asked: u64,
    /// Sync messages that did not decode.
    pub rejected: u64,
    /// Entries that were new here (stored or replacing an older one).
    pub entries_fresh: u64,
    /// Entries received that changed nothing.
    pub entries_stale: u64,
    /// Entries refused (bad signature, invalid, too far in the future, ledger full).
    pub entries_refused: u64,
}

/// Why a sync message goes out (for [`ReplicationStats`]).
#[derive(Debug, Clone, Copy)]
enum Sent {
    /// A push of news.
    News,
    /// Part of a digest exchange.
    Exchange,
}

/// An announced entry this node lacks.
#[derive(Debug)]
struct Wanted {
    /// The newest announced.
    item: Announced,
    /// Members that announced it and were not asked yet.
    from: Vec<PeerId>,
    /// When to ask.
    due: Instant,
}

/// What replication knows of one connected member.
#[derive(Debug, Default)]
struct Peer {
    /// An exchange with it has completed.
    synced: bool,
    /// Its cluster bucket, from its digest (see [`Scope`]).
    cluster: Option<String>,
}

/// Replication state of one node.
#[derive(Debug)]
pub struct Replication {
    limits: SyncLimits,
    /// This node's cluster bucket: exchanged only with members of the same cluster.
    cluster: String,
    /// Connected members.
    peers: BTreeMap<PeerId, Peer>,
    out: VecDeque<(PeerId, Vec<u8>)>,
    next_round: Option<Instant>,
    turn: usize,
    synced: bool,
    /// Relayed news waiting for the next batch, by bucket and key: the newest version, and the
    /// members known to hold it already (its writer, and whoever sent it to us meanwhile).
    pending_news: BTreeMap<(String, String), (Entry, BTreeSet<PeerId>)>,
    /// When the waiting news goes.
    news_at: Option<Instant>,
    /// Announced entries not held yet, by bucket and key.
    wanted: BTreeMap<(String, String), Wanted>,
    /// When the first of them is due.
    wanted_at: Option<Instant>,
    /// Draws the news delays and the members relayed news goes to in full.
    rng: Rng,
    stats: ReplicationStats,
}

impl Replication {
    /// Replication with messages bounded by `limits` for a node of the cluster whose bucket is
    /// `cluster`; `seed` seeds its random choices.
    pub fn new(limits: SyncLimits, cluster: &str, seed: u64) -> Self {
        Self {
            limits,
            cluster: cluster.to_string(),
            peers: BTreeMap::new(),
            out: VecDeque::new(),
            next_round: None,
            turn: 0,
            synced: false,
            pending_news: BTreeMap::new(),
            news_at: None,
            wanted: BTreeMap::new(),
            wanted_at: None,
            rng: Rng::from_seed(seed),
            stats: ReplicationStats::default(),
        }
    }

    /// True once an exchange with some member completed: the ledger holds what the network held
    /// then.
    pub fn is_synced(&self) -> bool {
        self.synced
    }

    /// True when an exchange completed with every member connected now.
    pub fn all_peers_synced(&self) -> bool {
        self.peers.values().all(|p| p.synced)
    }

    /// Members currently connected.
    pub fn peer_count(&self) -> usize {
        self.peers.len()
    }

    /// Counters.
    pub fn stats(&self) -> ReplicationStats {
        self.stats
    }

    /// A connection to `peer` is up: start an exchange.
    pub fn connected(&mut self, now: Instant, unix_ms: u64, ledger: &Ledger, peer: PeerId) {
        self.peers.insert(peer, Peer::default());
        self.send_digest(unix_ms, ledger, peer);
        let retry = now + FIRST_EXCHANGE_RETRY;
        self.next_round = Some(self.next_round.map_or(retry, |t| t.min(retry)));
    }

    /// The connection to `peer` went away.
    pub fn disconnected(&mut self, peer: &PeerId) {
        self.peers.remove(peer);
        self.out.retain(|(p, _)| p != peer);
    }

    /// Handles a sync message from `from`; returns the entries that were fresh here (queued to
    /// be pushed on to the others).
    pub fn handle_message(
        &mut self,
        now: Instant,
        unix_ms: u64,
        ledger: &mut Ledger,
        from: PeerId,
        bytes: &[u8],
    ) -> Vec<Entry> {
        self.stats.messages_in += 1;
        self.stats.bytes_in += bytes.len() as u64;
        let msg = match SyncMessage::decode(bytes, &self.limits) {
            Ok(m) => m,
            Err(e) => {
                self.stats.rejected += 1;
                log::debug!("ledger message from {from} dropped: {e}");
                return Vec::new();
            }
        };
        let mut fresh = Vec::new();
        match msg {
            SyncMessage::Digest(digest) => {
                if let Some(peer) = self.peers.get_mut(&from) {
                    peer.cluster.clone_from(&digest.cluster);
                }
                let scope = Scope {
                    mine: Some(&self.cluster),
                    theirs: digest.cluster.as_deref(),
                };
                if digest.brief {
                    ledger.note_contact(unix_ms);
                    if ledger.differs_from(&digest, scope) {
                        self.send_digest(unix_ms, ledger, from);
                    }
                    return Vec::new();
                }
                let mut summary = ledger.summary_for(&digest, scope, &self.limits, unix_ms);
                summary.cluster = Some(self.cluster.clone());
                self.send(from, &SyncMessage::Summary(summary), Sent::Exchange);
            }
            SyncMessage::Summary(summary) => {
                if let (Some(peer), Some(cluster)) = (self.peers.get_mut(&from), &summary.cluster) {
                    peer.cluster = Some(cluster.clone());
                }
                fresh = self.apply(
                    ledger,
                    unix_ms,
                    from,
                    summary.entries.iter().map(Cow::Borrowed),
                );
                let batch = ledger.reconcile(&summary, self.scope(&from), &self.limits, unix_ms);
                if !batch.entries.is_empty() || !batch.requests.is_empty() {
                    self.send(from, &SyncMessage::Batch(batch), Sent::Exchange);
                }
                if let Some(peer) = self.peers.get_mut(&from) {
                    peer.synced = true;
                }
                self.synced = true;
            }
            SyncMessage::Batch(batch) => {
                fresh = self.apply(
                    ledger,
                    unix_ms,
                    from,
                    batch.entries.into_iter().map(Cow::Owned),
                );
                if !batch.requests.is_empty() {
                    let answer = ledger.answer(&batch.requests, self.scope(&from), &self.limits);
                    self.send(from, &SyncMessage::Batch(answer), Sent::Exchange);
                }
            }
            SyncMessage::Announce(items) => self.on_announce(now, ledger, from, items),
        }
        self.push(now, &fresh, Some(from));
        fresh
    }

    /// Pushes entries that are new here to the connected members (but not back to `source`):
    /// at once when this node wrote them (no `source`), else with the next news batch.
    pub fn push(&mut self, now: Instant, entries: &[Entry], source: Option<PeerId>) {
        if entries.is_empty() {
            return;
        }
        let Some(source) = source else {
            let targets: Vec<PeerId> = self.peers.keys().copied().collect();
            let news: Vec<&Entry> = entries.iter().collect();
            for peer in targets {
                self.send_entries(peer, &news, Sent::News);
            }
            return;
        };
        for e in entries {
            let holders = [e.writer, source].into_iter().collect();
            let slot = (e.bucket.clone(), e.key.clone());
            match self.pending_news.get_mut(&slot) {
                Some(waiting) if waiting.0.version >= e.version => {}
                Some(waiting) => *waiting = (e.clone(), holders),
                None => {
                    self.pending_news.insert(slot, (e.clone(), holders));
                }
            }
        }
        if self.news_at.is_none() {
            let half = NEWS_BATCH_DELAY / 2;
            let jitter = self.rng.below(NEWS_BATCH_DELAY.as_micros() as u64 + 1);
            self.news_at = Some(now + half + Duration::from_micros(jitter));
        }
    }

    /// Sends the waiting news to every member, each what it is not known to hold and is in its
    /// [`Scope`] (the timer does when due): in full to [`EAGER_FANOUT`] of them drawn at
    /// random, announced to the others.
    pub(crate) fn flush_news(&mut self) {
        self.news_at = None;
        let news = std::mem::take(&mut self.pending_news);
        let news: Vec<&(Entry, BTreeSet<PeerId>)> = news.values().collect();
        // Each peer's batch, as indices into `news`.
        let mut batches: Vec<(PeerId, Vec<usize>)> = self
            .peers
            .keys()
            .map(|peer| {
                let scope = self.scope(peer);
                let batch = (0..news.len())
                    .filter(|&i| {
                        let (e, holders) = news[i];
                        !holders.contains(peer) && scope.shares(&e.bucket, &e.key)
                    })
                    .collect::<Vec<usize>>();
                (*peer, batch)
            })
            .filter(|(_, batch)| !batch.is_empty())
            .collect();
        for i in 0..batches.len().min(EAGER_FANOUT) {
            let j = i + self.rng.below((batches.len() - i) as u64) as usize;
            batches.swap(i, j);
        }
        // An entry's announcement (its hash above all) is made once, not once per peer.
        let mut announced: Vec<Option<Announced>> = vec![None; news.len()];
        for (n, (peer, batch)) in batches.into_iter().enumerate() {
            if n < EAGER_FANOUT {
                let entries: Vec<&Entry> = batch.iter().map(|&i| &news[i].0).collect();
                self.send_entries(peer, &entries, Sent::News);
            } else {
                let items: Vec<Announced> = batch
                    .iter()
                    .map(|&i| {
                        announced[i]
                            .get_or_insert_with(|| Announced::of(&news[i].0))
                            .clone()
                    })
                    .collect();
                self.announce(peer, items);
            }
        }
    }

    /// Announces `items` (in `peer`'s [`Scope`]: [`Self::flush_news`] picked them) to `peer`.
    fn announce(&mut self, peer: PeerId, items: Vec<Announced>) {
        self.stats.entries_announced += items.len() as u64;
        for msg in SyncMessage::announcements(items, &self.limits) {
            self.send(peer, &msg, Sent::News);
        }
    }

    /// Notes the announced entries this node lacks, to ask for them if they do not come in full
    /// within [`LAZY_WAIT`]; the sender of one this node holds holds what it would pass on.
    fn on_announce(&mut self, now: Instant, ledger: &Ledger, from: PeerId, items: Vec<Announced>) {
        let items: Vec<Announced> = {
            let scope = self.scope(&from);
            items
                .into_iter()
                .filter(|item| scope.shares(&item.bucket, &item.key))
                .collect()
        };
        let due = now + LAZY_WAIT;
        for item in items {
            let slot = (item.bucket.clone(), item.key.clone());
            if ledger
                .entry(&item.bucket, &item.key)
                .is_some_and(|held| item.is_covered_by(held))
            {
                if let Some((p, holders)) = self.pending_news.get_mut(&slot) {
                    if p.version <= item.version {
                        holders.insert(from);
                    }
                }
                continue;
            }
            if let Some(w) = self.wanted.get_mut(&slot) {
                if item.version > w.item.version {
                    w.item = item;
                    w.from.clear();
                }
                if w.from.len() < MAX_ANNOUNCERS && !w.from.contains(&from) {
                    w.from.push(from);
                }
            } else if self.wanted.len() < MAX_WANTED {
                self.wanted.insert(
                    slot,
                    Wanted {
                        item,
                        from: vec![from],
                        due,
                    },
                );
                self.wanted_at = Some(self.wanted_at.map_or(due, |t| t.min(due)));
            }
        }
    }

    /// Asks for the announced entries still missing when due, each from the next member that
    /// announced it (the timer does when due).
    pub(crate) fn ask_wanted(&mut self, now: Instant, ledger: &Ledger) {
        let mut asks: BTreeMap<PeerId, Vec<Request>> = BTreeMap::new();
        let mut next: Option<Instant> = None;
        let peers = &self.peers;
        self.wanted.retain(|(bucket, key), w| {
            if ledger
                .entry(bucket, key)
                .is_some_and(|held| w.item.is_covered_by(held))
            {
                return false;
            }
            if w.due > now {
                next = Some(next.map_or(w.due, |t| t.min(w.due)));
                return true;
            }
            w.from.retain(|p| peers.contains_key(p));
            if w.from.is_empty() {
                return false;
            }
            let peer = w.from.remove(0);
            asks.entry(peer).or_default().push(Request {
                bucket: bucket.clone(),
                key: KeyId::of(key),
            });
            w.due = now + ASK_TIMEOUT;
            next = Some(next.map_or(w.due, |t| t.min(w.due)));
            true
        });
        self.wanted_at = next;
        for (peer, requests) in asks {
            self.stats.entries_asked += requests.len() as u64;
            for chunk in requests.chunks(self.limits.max_entries.max(1)) {
                let msg = SyncMessage::Batch(Batch {
                    entries: Vec::new(),
                    requests: chunk.to_vec(),
                });
                self.send(peer, &msg, Sent::Exchange);
            }
        }
    }

    /// Sends the waiting news, asks for announced entries that did not come and runs the
    /// periodic exchange when due.
    pub fn handle_timeout(&mut self, now: Instant, unix_ms: u64, ledger: &Ledger) {
        if self.news_at.is_some_and(|t| t <= now) {
            self.flush_news();
        }
        if self.wanted_at.is_some_and(|t| t <= now) {
            self.ask_wanted(now, ledger);
        }
        if self.next_round.is_none_or(|t| t > now) {
            return;
        }
        self.next_round = Some(now + ANTI_ENTROPY_INTERVAL);
        if self.peers.is_empty() {
            return;
        }
        // A first exchange that did not complete (its digest went out on a connection that a
        // simultaneous dial replaced, say) is tried again soon: the election waits for it.
        let unsynced: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(_, p)| !p.synced)
            .map(|(p, _)| *p)
            .collect();
        if !unsynced.is_empty() {
            self.next_round = Some(now + FIRST_EXCHANGE_RETRY);
            for peer in unsynced {
                self.send_digest(unix_ms, ledger, peer);
            }
            return;
        }
        self.turn = self.turn.wrapping_add(1);
        let peer = self.peers.keys().nth(self.turn % self.peers.len()).copied();
        if let Some(peer) = peer {
            // A member of another cluster gets a full digest now and then: a brief one leaves
            // out the cluster buckets each holds a part of.
            let other_cluster = self
                .peers
                .get(&peer)
                .is_some_and(|p| p.cluster.as_deref() != Some(self.cluster.as_str()));
            if other_cluster && self.turn % FULL_DIGEST_EVERY == 0 {
                self.send_digest(unix_ms, ledger, peer);
            } else {
                let mut digest = ledger.brief_digest(&self.limits, unix_ms);
                digest.cluster = Some(self.cluster.clone());
                self.send(peer, &SyncMessage::Digest(digest), Sent::Exchange);
            }
        }
    }

    /// When [`handle_timeout`](Self::handle_timeout) must run next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        [self.next_round, self.news_at, self.wanted_at]
            .into_iter()
            .flatten()
            .min()
    }

    /// The next message to send: the peer and the encoded sync message.
    pub fn poll_message(&mut self) -> Option<(PeerId, Vec<u8>)> {
        self.out.pop_front()
    }

    /// Applies received entries (borrowed ones are copied only when fresh here).
    fn apply<'e>(
        &mut self,
        ledger: &mut Ledger,
        unix_ms: u64,
        from: PeerId,
        entries: impl IntoIterator<Item = Cow<'e, Entry>>,
    ) -> Vec<Entry> {
        let mut fresh = Vec::new();
        for e in entries {
            match ledger.apply_from(&e, unix_ms, &from) {
                Ok(Applied::New | Applied::Replaced) => {
                    self.stats.entries_fresh += 1;
                    fresh.push(e.into_owned());
                }
                Ok(Applied::Stale) => {
                    self.stats.entries_stale += 1;
                    // The sender holds news that waits here for the next batch.
                    if !self.pending_news.is_empty() {
                        let slot = (e.bucket.clone(), e.key.clone());
                        if let Some((p, holders)) = self.pending_news.get_mut(&slot) {
                            if p.version <= e.version {
                                holders.insert(from);
                            }
                        }
                    }
                }
                Err(err) => {
                    self.stats.entries_refused += 1;
                    log::debug!("ledger entry refused: {err}");
                }
            }
            // Entries that waited for this one's owner to be known are news too.
            for e in ledger.take_settled() {
                self.stats.entries_fresh += 1;
                fresh.push(e);
            }
        }
        fresh
    }

    /// What this node and `peer` exchange (everything until the peer's digest said its cluster).
    fn scope(&self, peer: &PeerId) -> Scope<'_> {
        Scope {
            mine: Some(&self.cluster),
            theirs: self.peers.get(peer).and_then(|p| p.cluster.as_deref()),
        }
    }

    /// Those of `entries` that go to `peer` ([`Scope`]).
    fn in_scope<'e>(&self, peer: &PeerId, entries: &[&'e Entry]) -> Vec<&'e Entry> {
        let scope = self.scope(peer);
        entries
            .iter()
            .filter(|e| scope.shares(&e.bucket, &e.key))
            .copied()
            .collect()
    }

    fn send_digest(&mut self, unix_ms: u64, ledger: &Ledger, peer: PeerId) {
        let mut digest = ledger.digest(&self.limits, unix_ms);
        digest.cluster = Some(self.cluster.clone());
        self.send(peer, &SyncMessage::Digest(digest), Sent::Exchange);
    }

    /// Sends entries (those in its [`Scope`]) in as many batches as their size needs.
    fn send_entries(&mut self, peer: PeerId, entries: &[&Entry], kind: Sent) {
        // Half the message limit per batch leaves room for the framing.
        let budget = self.limits.max_message_bytes / 2;
        let entries = self.in_scope(&peer, entries);
        let mut batch = Vec::new();
        let mut size = 0;
        for e in entries {
            let len = e.encoded_len();
            if !batch.is_empty() && (size + len > budget || batch.len() >= self.limits.max_entries)
            {
                self.send_batch(peer, std::mem::take(&mut batch), kind);
                size = 0;
            }
            size += len;
            batch.push((*e).clone());
        }
        if !batch.is_empty() {
            self.send_batch(peer, batch, kind);
        }
    }

    fn send_batch(&mut self, peer: PeerId, entries: Vec<Entry>, kind: Sent) {
        let msg = SyncMessage::Batch(Batch {
            entries,
            requests: Vec::new(),
        });
        self.send(peer, &msg, kind);
    }

    fn send(&mut self, peer: PeerId, msg: &SyncMessage, kind: Sent) {
        let mut buf = Vec::new();
        match msg.encode(&self.limits, &mut buf) {
            Ok(()) => {
                self.stats.messages_out += 1;
                self.stats.bytes_out += buf.len() as u64;
                if let Sent::Exchange = kind {
                    self.stats.exchange_bytes_out += buf.len() as u64;
                }
                self.out.push_back((peer, buf));
            }
            Err(e) => log::warn!("ledger message to {peer} not encodable: {e}"),
        }
    }
}
