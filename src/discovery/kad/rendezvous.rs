//! The rendezvous of one network: publish our sealed record under the current window's key,
//! look up the accepted windows' keys, open what we find and report the other members.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::records::{self, RendezvousRecord, open_record, seal_record};
use super::{Command, Kad, KadEvent, Publication};
use crate::identity::PeerId;
use crate::token::{KeySchedule, Window};

/// Rendezvous members remembered (for deduplicating `MemberFound`).
const MAX_MEMBERS: usize = 1024;

/// Wait after the first rendezvous lookup while none has found another member, doubled after
/// each such lookup up to `rendezvous_interval`: a node that starts with (or before) the rest of
/// its network finds them in seconds, not after a whole interval, and a node that stays alone
/// soon costs one lookup per interval again.
const LONELY_LOOKUP_WAIT: Duration = Duration::from_secs(5);

/// Lookups on the short schedule after a bootstrap peer is reached (5, 10 and 20 s apart): other
/// sites may reach the DHT at the same moment, and one lookup could miss their records.
const CATCH_UP_LOOKUPS: u32 = 3;

pub(super) struct Rendezvous {
    keys: KeySchedule,
    addrs: Vec<SocketAddr>,
    window: Option<Window>,
    /// (window, rendezvous key) of the accepted windows.
    window_keys: Vec<(Window, [u8; 32])>,
    next_lookup: Option<Instant>,
    /// Wait before the next lookup while no other member has been found.
    lonely_wait: Duration,
    dirty: bool,
    members: BTreeMap<PeerId, (u64, Vec<SocketAddr>)>,
    /// Lookups left on the short schedule (see [`CATCH_UP_LOOKUPS`]).
    catch_up: u32,
    /// Keys of the running round still being looked up, and when that round started.
    round_keys: BTreeSet<[u8; 32]>,
    round_started: Option<Instant>,
    /// When the last round whose lookups all finished started.
    round_done: Option<Instant>,
    /// When our record was last stored on another node.
    stored_at: Option<Instant>,
}

impl Rendezvous {
    /// When the rendezvous needs a tick: at once (`now`) when it never ran or our record
    /// changed, else at the next lookup.
    pub(super) fn wake_at(&self, now: Option<Instant>) -> Option<Instant> {
        if self.dirty || self.next_lookup.is_none() {
            now
        } else {
            self.next_lookup
        }
    }
}

impl Kad {
    /// Joins the rendezvous of the network whose key schedule is `keys`: publishes a sealed
    /// record of (our peer id, `addrs`) under the current DHT window's key, re-published every
    /// TTL/2 and on window change, and looks up the previous, current and next windows' keys
    /// every `rendezvous_interval` (sooner while no other member was found: 5 s, doubling),
    /// reporting other members as [`KadEvent::MemberFound`]. A lookup reads one page of records
    /// from each node holding the key, from a random record on: with more members than a page
    /// holds (about a dozen), each lookup finds a random sample of them (up to about k pages'
    /// worth), enough to reach the network, whose own gossip names the rest.
    /// At most [`records::MAX_RECORD_ADDRS`] addresses are kept.
    pub fn set_rendezvous(&mut self, keys: KeySchedule, addrs: Vec<SocketAddr>) {
        self.clear_rendezvous();
        self.wake = true;
        self.rendezvous = Some(Rendezvous {
            keys,
            addrs: Vec::new(),
            window: None,
            window_keys: Vec::new(),
            next_lookup: None,
            lonely_wait: LONELY_LOOKUP_WAIT,
            dirty: true,
            members: BTreeMap::new(),
            catch_up: 0,
            round_keys: BTreeSet::new(),
            round_started: None,
            round_done: None,
            stored_at: None,
        });
        self.set_rendezvous_addrs(addrs);
    }

    /// Members of our network found so far (peer id, addresses from its newest record).
    pub fn rendezvous_members(&self) -> impl Iterator<Item = (&PeerId, &[SocketAddr])> {
        self.rendezvous
            .iter()
            .flat_map(|rv| rv.members.iter().map(|(p, (_, a))| (p, a.as_slice())))
    }

    /// True once the rendezvous has done what it can: our record was stored on another node
    /// after the last bootstrap peer was reached, and a whole round of lookups (every accepted
    /// window's key) started after that and finished. Of two members that publish at about the
    /// same time, the one whose record was stored last then finds the other's (the DHT holds it
    /// by then), whatever the order of their lookups.
    pub fn rendezvous_converged(&self) -> bool {
        let Some(rv) = &self.rendezvous else {
            return false;
        };
        let Some(stored) = rv.stored_at else {
            return false;
        };
        if self.bootstrap_reached_at().is_some_and(|b| stored < b) {
            return false;
        }
        rv.round_done.is_some_and(|t| t >= stored)
    }

    /// Our rendezvous record was stored on at least one other node: unless a round started
    /// since, look up again at once (see [`Kad::rendezvous_converged`]).
    pub(super) fn rendezvous_stored(&mut self, now: Instant) {
        let converged = self.rendezvous_converged();
        if let Some(rv) = &mut self.rendezvous {
            rv.stored_at = Some(now);
            if !converged {
                rv.next_lookup = Some(now);
                self.wake = true;
            }
        }
    }

    /// Publishes our record again and looks the rendezvous up at once, then a few more times on
    /// the short schedule (a bootstrap peer was just reached).
    pub(super) fn rendezvous_restart(&mut self) {
        if let Some(rv) = &mut self.rendezvous {
            rv.dirty = true;
            rv.next_lookup = self.last_now;
            rv.lonely_wait = LONELY_LOOKUP_WAIT;
            rv.catch_up = CATCH_UP_LOOKUPS;
        }
    }

    /// A GET lookup of `key` finished.
    pub(super) fn rendezvous_lookup_done(&mut self, key: &[u8; 32]) {
        if let Some(rv) = &mut self.rendezvous {
            if rv.round_keys.remove(key) && rv.round_keys.is_empty() {
                rv.round_done = rv.round_started;
            }
        }
    }

    /// Changes the addresses announced in our rendezvous record (re-published at once).
    pub fn set_rendezvous_addrs(&mut self, addrs: Vec<SocketAddr>) {
        let mut unique: Vec<SocketAddr> = Vec::with_capacity(addrs.len());
        for a in addrs {
            if !unique.contains(&a) {
                unique.push(a);
            }
        }
        let mut addrs = unique;
        addrs.truncate(records::MAX_RECORD_ADDRS);
        if let Some(rv) = &mut self.rendezvous {
            if rv.addrs != addrs {
                rv.addrs = addrs;
                rv.dirty = true;
                self.wake = true;
            }
        }
    }

    /// Leaves the rendezvous (our record expires with its TTL).
    pub fn clear_rendezvous(&mut self) {
        self.rendezvous = None;
        self.published.retain(|_, p| p.window.is_none());
    }

    pub(super) fn rendezvous_tick(&mut self, now: Instant, unix_secs: u64) {
        if !self.joined {
            return;
        }
        let Some(rv) = &mut self.rendezvous else {
            return;
        };
        let window = rv.keys.dht_window(unix_secs);
        let mut publish = None;
        if rv.window != Some(window) {
            rv.window = Some(window);
            rv.window_keys = rv
                .keys
                .dht_windows_in_use(window)
                .map(|w| (w, rv.keys.rendezvous_key(w)))
                .collect();
            rv.next_lookup = Some(now);
            rv.dirty = true;
        }
        let key = rv.keys.rendezvous_key(window);
        let due = self
            .published
            .get(&key)
            .is_none_or(|p| p.next.is_some_and(|t| t <= now));
        let changed = rv.dirty;
        if rv.dirty || due {
            let record = RendezvousRecord {
                peer: self.me,
                addrs: rv.addrs.clone(),
                published_at: unix_secs,
            };
            match seal_record(&rv.keys, window, &record, &mut self.rng) {
                Ok(sealed) => publish = Some(sealed),
                Err(e) => log::warn!("rendezvous record not sealed: {e}"),
            }
            rv.dirty = false;
        }
        let lookups: Vec<[u8; 32]> = if rv.next_lookup.is_none_or(|t| t <= now) {
            let wait = if rv.members.is_empty() || rv.catch_up > 0 {
                rv.catch_up = rv.catch_up.saturating_sub(1);
                let wait = rv.lonely_wait.min(self.settings.rendezvous_interval);
                rv.lonely_wait = rv.lonely_wait.saturating_mul(2);
                wait
            } else {
                self.settings.rendezvous_interval
            };
            rv.next_lookup = Some(now + wait);
            rv.round_keys = rv.window_keys.iter().map(|(_, k)| *k).collect();
            rv.round_started = Some(now);
            rv.window_keys.iter().map(|(_, k)| *k).collect()
        } else {
            Vec::new()
        };
        if let Some(sealed) = publish {
            self.published
                .retain(|k, p| p.window.is_none() || *k == key);
            // A periodic re-seal keeps the schedule; a changed record starts it again.
            let rounds = match self.published.get(&key) {
                Some(p) if !changed => p.rounds,
                _ => 0,
            };
            let ttl = self.settings.record_ttl;
            self.published.insert(
                key,
                Publication {
                    record: sealed,
                    ttl,
                    next: None,
                    window: Some(window),
                    rounds,
                },
            );
            if self.enqueue(Command::Publish { key }).is_err() {
                if let Some(p) = self.published.get_mut(&key) {
                    p.next = Some(now + self.settings.retry_interval);
                }
            }
        }
        for key in lookups {
            let _ = self.enqueue(Command::Get { key, sample: true });
        }
    }

    pub(super) fn report_records(&mut self, key: [u8; 32], records: Vec<Vec<u8>>) {
        if records.is_empty() {
            return;
        }
        let mut found = Vec::new();
        if let Some(rv) = &mut self.rendezvous {
            if let Some(&(window, _)) = rv.window_keys.iter().find(|(_, k)| *k == key) {
                for sealed in &records {
                    let Ok(rec) = open_record(&rv.keys, window, sealed) else {
                        self.stats.records_rejected += 1;
                        continue;
                    };
                    if rec.peer == self.me {
                        continue;
                    }
                    match rv.members.get_mut(&rec.peer) {
                        Some((at, addrs)) => {
                            if rec.published_at > *at {
                                *at = rec.published_at;
                                if *addrs != rec.addrs {
                                    addrs.clone_from(&rec.addrs);
                                    found.push((rec.peer, rec.addrs));
                                }
                            }
                        }
                        None => {
                            if rv.members.len() >= MAX_MEMBERS {
                                let oldest = rv
                                    .members
                                    .iter()
                                    .min_by_key(|(_, (at, _))| *at)
                                    .map(|(p, _)| *p);
                                if let Some(oldest) = oldest {
                                    rv.members.remove(&oldest);
                                }
                            }
                            rv.members
                                .insert(rec.peer, (rec.published_at, rec.addrs.clone()));
                            found.push((rec.peer, rec.addrs));
                        }
                    }
                }
            }
        }
        self.push_event(KadEvent::Records { key, records });
        for (peer, addrs) in found {
            self.push_event(KadEvent::MemberFound { peer, addrs });
        }
    }
}
