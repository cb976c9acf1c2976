//! Who may write which key: the ownership rule every node applies where entries are merged
//! ([`Ledger::apply`](super::Ledger::apply) and local writes alike), so that an entry from the
//! wrong writer never takes effect on any node, whichever API or peer it came through.
//!
//! # Bindings
//! A node's uuid is bound to the peer id that wrote its announcement `<uuid>-uuid` (in any bucket
//! but the three network-wide ones). The first announcement a ledger stores binds the uuid;
//! another peer's announcement of a bound uuid is refused, except when the bound peer has been
//! silent (its own heartbeat `healthcheck/<uuid>` judged as `cluster::liveness` does) for the liveness timeout: a
//! node whose state directory was wiped comes back with a new peer id under its old uuid, and
//! takes it over once its old identity has been silent that long (until then its entries are
//! refused and anti-entropy offers them again). A member can thus take over the uuid of a node
//! that is gone for good, never that of a live one.
//!
//! # Families
//! - `<uuid>-*` in any bucket (`-uuid`, `-ip`, `-vote`, `-ballot`, anything under a bound uuid),
//!   `healthcheck/<uuid>`, `dhcp/<uuid>`: the bound peer of `<uuid>`.
//! - `<uuid>-role`: the bound peer of `<uuid>` (a node taking its own manual role, a node keeping
//!   the role it applied), or the *leader of record* of the bucket: the peer bound to the uuid
//!   `leader-auto` names, or, until the leader writes `leader-auto`, the peer bound to the
//!   committed ballot's proposer (it writes the master's role with the commit). Before anybody
//!   leads, a role for a uuid nobody announced yet (Kairos' `role set` before the node joins) may
//!   be written by any member. Anything else is refused; from a writer not known as a member yet,
//!   or while nobody leads, it waits. Kairos' `role set <uuid>` through another node's API
//!   becomes a request in a key that node owns, which the leader or the target applies (see
//!   [`crate::cluster::requests`]); a new leader signs its predecessor's roles again, so that a
//!   node learning them later takes them from the leader it knows. Once a master is committed,
//!   `master`/`master/clusterinit` go to the committed master only, whoever writes them; before,
//!   only a node itself may take them (manual roles, `auto.enable: false`).
//! - `leader-auto` (any bucket): the peer bound to the uuid it names, when that uuid is announced
//!   in the bucket as taking part in elections (not `p2p.role: none`) and nobody holds
//!   `leader-auto`, it holds it already, it outranks the holder (the view's leader rule: highest
//!   FNV-32a, then uuid) or the holder has been silent for the liveness timeout. A
//!   member can thus lead only where the election rule makes it the leader.
//! - `machines/<ip>`: a value must name its writer as `PeerID` (the VPN routes the address to that
//!   peer); a deletion comes from the writer of the entry it deletes.
//! - In the node's own cluster bucket: `ip-master`, `token-nodetoken`, `master-kubeconfig` and
//!   `control-plane-*` by the bound peer of the committed master; `master-commit` by the bound
//!   peer of the ballot's proposer or of the master it names, and only with at least [`Authority::quorum_floor`] votes in the
//!   ledger accepting exactly that ballot and candidate (the proof of the quorum; one, when the
//!   proposer names itself, as a lone master does, unless a commit naming another master is
//!   held: a member's own vote never replaces the master).
//! - Everything else (free-form buckets and keys written through the API) is open to members.
//!
//! What a member can still do, by design: ask for any non-master role for any node (Kairos'
//! `role set` as root through any node), since the leader applies requests whoever signed them
//! (the request names its writer; the leader logs it); publish `machines/<ip>` naming itself
//! for an address it does not hold (see [`crate::vpn::routes`]); lead where the election rule
//! makes it the leader.
//!
//! An entry whose owner cannot be known yet (its uuid is not announced here yet, no master is
//! committed yet, the votes proving a commit have not arrived) is *deferred*: kept aside (at most
//! [`MAX_DEFERRED`]) and merged again when the ledger learns what decides it. Entries refused as
//! not the owner's are counted ([`Counters::not_owner`](super::Counters::not_owner)).

use super::names;
use super::{Entry, Ledger};
use crate::cluster::election::{BALLOT_SUFFIX, Commit, MASTER_COMMIT, VOTE_SUFFIX, Vote};
use crate::cluster::fnv32a;
use crate::cluster::liveness::{Liveness, Suspicions};
use crate::cluster::view::Announcement;
use crate::config::Role;
use crate::identity::PeerId;

/// Most entries kept aside until their owner is known; the oldest go first (anti-entropy offers
/// them again).
pub const MAX_DEFERRED: usize = 1024;

/// Prefix of the control-plane keys the committed master publishes (KubeVIP, HA).
pub const CONTROL_PLANE_PREFIX: &str = "control-plane-";

/// The settings of the ownership rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authority {
    /// The cluster bucket of this node's `network_id`: where the master's keys are checked.
    pub network_bucket: String,
    /// Votes that must prove a `master-commit` (`minimum_nodes`, at least 1).
    pub quorum_floor: usize,
    /// When a node counts as silent; a bound peer silent for the liveness timeout lets another
    /// announce its uuid.
    pub liveness: Liveness,
}

/// What the rule says of an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Its writer may write it.
    Allowed,
    /// Its writer may not (why).
    NotOwner(&'static str),
    /// Its owner is not known yet.
    Unsettled,
}

/// The uuid an announcement key names, if it is one (in a bucket that may hold them).
pub(crate) fn announced_uuid<'a>(bucket: &str, key: &'a str) -> Option<&'a str> {
    if names::is_network_wide(bucket) {
        return None;
    }
    key.strip_suffix(names::UUID_SUFFIX)
        .filter(|u| !u.is_empty())
}

impl Ledger {
    /// The peer bound to `uuid`, if it announced itself here.
    pub fn bound_peer(&self, uuid: &str) -> Option<PeerId> {
        self.bindings.get(uuid).map(|(p, _)| *p)
    }

    /// The timing of liveness this ledger judges silence by (`None` without an ownership rule).
    pub fn liveness(&self) -> Option<Liveness> {
        self.authority.as_ref().map(|a| a.liveness)
    }

    /// The uuids bound to `peer` (one, but for a node that changed its uuid).
    pub fn uuids_bound_to(&self, peer: &PeerId) -> Vec<String> {
        if !self.is_member(peer) {
            return Vec::new();
        }
        self.bindings
            .iter()
            .filter(|(_, (p, _))| p == peer)
            .map(|(uuid, _)| uuid.clone())
            .collect()
    }

    /// True when `peer` is bound to some uuid (a cluster member, bridge included).
    fn is_member(&self, peer: &PeerId) -> bool {
        self.bound_peers.get(peer).is_some_and(|n| *n > 0)
    }

    /// What the ownership rule says of `entry` at hybrid time `now` (`None`: no time, accept
    /// rebinding as the snapshot did).
    pub(crate) fn authorize(&self, entry: &Entry, now: Option<u64>) -> Verdict {
        let Some(auth) = &self.authority else {
            return Verdict::Allowed;
        };
        let (bucket, key, writer) = (entry.bucket.as_str(), entry.key.as_str(), &entry.writer);
        match bucket {
            names::HEALTHCHECK | names::DHCP | names::SUSPECTS => {
                return self.owner_is(key, writer);
            }
            names::MACHINES => return self.machine_writer(entry),
            _ => {}
        }
        if let Some(uuid) = announced_uuid(bucket, key) {
            return self.announcement(auth, uuid, writer, now);
        }
        if bucket == auth.network_bucket {
            if key == MASTER_COMMIT {
                return self.commit_proof(auth, entry);
            }
            if matches!(
                key,
                names::IP_MASTER | names::NODE_TOKEN | names::KUBECONFIG
            ) || key.starts_with(CONTROL_PLANE_PREFIX)
            {
                return match self.committed_master(bucket) {
                    None => Verdict::Unsettled,
                    Some(master) => self.owner_is(&master, writer),
                };
            }
        }
        if key == names::LEADER_AUTO {
            return self.leader_auto(entry, now);
        }
        if let Some(uuid) = key.strip_suffix(names::ROLE_SUFFIX) {
            return self.role(auth, bucket, uuid, entry);
        }
        for suffix in [names::IP_SUFFIX, VOTE_SUFFIX, BALLOT_SUFFIX] {
            if let Some(uuid) = key.strip_suffix(suffix).filter(|u| !u.is_empty()) {
                return self.owner_is(uuid, writer);
            }
        }
        // Any other key under a bound uuid (`<uuid>-anything`): the longest bound prefix.
        let owner = key
            .match_indices('-')
            .rev()
            .find_map(|(i, _)| self.bound_peer(&key[..i]));
        match owner {
            Some(p) if p == *writer => Verdict::Allowed,
            Some(_) => Verdict::NotOwner("another node's key"),
            None => Verdict::Allowed,
        }
    }

    fn owner_is(&self, uuid: &str, writer: &PeerId) -> Verdict {
        match self.bound_peer(uuid) {
            None => Verdict::Unsettled,
            Some(p) if p == *writer => Verdict::Allowed,
            Some(_) => Verdict::NotOwner("another node's key"),
        }
    }

    /// A deletion or change by the writer of what is held (or of nothing held).
    fn same_writer(&self, entry: &Entry) -> Verdict {
        match self.entry(&entry.bucket, &entry.key) {
            Some(held) if held.writer != entry.writer => Verdict::NotOwner("written by another"),
            _ => Verdict::Allowed,
        }
    }

    fn announcement(
        &self,
        auth: &Authority,
        uuid: &str,
        writer: &PeerId,
        now: Option<u64>,
    ) -> Verdict {
        let Some(bound) = self.bound_peer(uuid) else {
            return Verdict::Allowed;
        };
        if bound == *writer {
            return Verdict::Allowed;
        }
        let Some(now) = now else {
            return Verdict::Allowed;
        };
        if self.silent_for(uuid, now) >= auth.liveness.timeout_ms {
            Verdict::Allowed
        } else {
            Verdict::NotOwner("uuid bound to a live peer")
        }
    }

    fn machine_writer(&self, entry: &Entry) -> Verdict {
        let Some(value) = &entry.value else {
            return self.same_writer(entry);
        };
        let named = serde_json::from_slice::<serde_json::Value>(value)
            .ok()
            .and_then(|v| v.get("PeerID")?.as_str().map(str::to_string));
        if named.as_deref() == Some(entry.writer.to_string().as_str()) {
            Verdict::Allowed
        } else {
            Verdict::NotOwner("machine entry naming another peer")
        }
    }

    fn role(&self, auth: &Authority, bucket: &str, uuid: &str, entry: &Entry) -> Verdict {
        let own = self.bound_peer(uuid).is_some_and(|p| p == entry.writer);
        if !own {
            match self.leader_of_record(bucket) {
                Some(leader) if leader == entry.writer => {}
                // Maybe a member whose announcement, or the leader whose `leader-auto`, has not
                // arrived yet.
                _ if !self.is_member(&entry.writer) => return Verdict::Unsettled,
                // Kairos' `role set` before the node joins and before anybody leads: any member
                // (the leader signs it again once it leads).
                None if self.bound_peer(uuid).is_none() => {}
                None => return Verdict::Unsettled,
                Some(_) => {
                    return Verdict::NotOwner("role written by neither the node nor the leader");
                }
            }
        }
        let text = entry
            .value
            .as_deref()
            .map(|v| super::edgevpn::text(&String::from_utf8_lossy(v)));
        let master_role = matches!(
            text.as_deref(),
            Some(names::ROLE_MASTER | names::ROLE_MASTER_CLUSTERINIT)
        );
        if !master_role || bucket != auth.network_bucket {
            return Verdict::Allowed;
        }
        match self.committed_master(bucket) {
            // Without `auto` nobody commits: a node takes the role it asks for itself.
            None if own => Verdict::Allowed,
            None => Verdict::Unsettled,
            Some(m) if m == uuid => Verdict::Allowed,
            Some(_) => Verdict::NotOwner("master role for a node not committed"),
        }
    }

    /// The peer that assigns roles in `bucket`: the peer bound to the uuid `leader-auto` names,
    /// else (the commit was just written) the committed ballot's proposer.
    pub fn leader_of_record(&self, bucket: &str) -> Option<PeerId> {
        match self.get(bucket, names::LEADER_AUTO) {
            Some(v) => self.bound_peer(&String::from_utf8_lossy(v)),
            None => {
                let raw = self.get(bucket, MASTER_COMMIT)?;
                let commit = serde_json::from_slice::<Commit>(raw).ok()?;
                self.bound_peer(&commit.ballot.proposer)
            }
        }
    }

    /// Whether `uuid` may take `leader-auto` in `bucket` at hybrid time `now` (`None`: the
    /// holder counts as silent): `uuid` is announced there as taking part in elections, and
    /// nobody holds it, `uuid` holds it, `uuid` outranks the holder as the view's leader rule
    /// ranks nodes, or the holder has been silent for the liveness timeout.
    pub fn may_lead(&self, bucket: &str, uuid: &str, now: Option<u64>) -> bool {
        let Some(auth) = &self.authority else {
            return true;
        };
        if !self.takes_part(bucket, uuid) {
            return false;
        }
        let Some(held) = self.get(bucket, names::LEADER_AUTO) else {
            return true;
        };
        let holder = String::from_utf8_lossy(held).to_string();
        if holder == uuid {
            return true;
        }

        let rank = |u: &str| (fnv32a(u), u.to_string());
        if rank(uuid) > rank(&holder) {
            return true;
        }
        match now {
            None => true,
            Some(now) => self.silent_for(&holder, now) >= auth.liveness.timeout_ms,
        }
    }

    /// Whether `uuid` is announced in `bucket` as taking part in elections (`p2p.role: none`
    /// does not): only such a node leads.
    fn takes_part(&self, bucket: &str, uuid: &str) -> bool {
        self.get(bucket, &names::uuid_key(uuid))
            .and_then(|v| serde_json::from_slice::<Announcement>(v).ok())
            .is_some_and(|a| a.asked() != Role::None)
    }

    /// Milliseconds since `uuid`'s bound peer was last known alive (its own heartbeat judged
    /// as `cluster::liveness` does, else its announcement's version), at hybrid time `now`.
    fn silent_for(&self, uuid: &str, now: u64) -> u64 {
        let bound = self.bound_peer(uuid);
        let now = now.max(self.max_version().millis());
        let beat = self
            .entry(names::HEALTHCHECK, uuid)
            .filter(|e| Some(e.writer) == bound && e.value.is_some())
            .map(|e| e.version);
        match (beat, &self.authority) {
            (Some(beat), Some(auth)) => {
                let suspected = Suspicions::read(self).of(uuid, beat);
                auth.liveness.silence_ms(now, beat, suspected)
            }
            (Some(beat), None) => now.saturating_sub(beat.millis()),
            (None, _) => {
                let announced = self.bindings.get(uuid).map_or(0, |(_, v)| *v);
                now.saturating_sub(announced)
            }
        }
    }

    fn leader_auto(&self, entry: &Entry, now: Option<u64>) -> Verdict {
        let Some(value) = &entry.value else {
            return self.same_writer(entry);
        };
        let uuid = String::from_utf8_lossy(value);
        match self.owner_is(&uuid, &entry.writer) {
            Verdict::Allowed if self.may_lead(&entry.bucket, &uuid, now) => Verdict::Allowed,
            Verdict::Allowed if !self.takes_part(&entry.bucket, &uuid) => {
                Verdict::NotOwner("leader-auto for a node that takes no part in elections")
            }
            Verdict::Allowed => Verdict::NotOwner("leader-auto while a higher leader is live"),
            other => other,
        }
    }

    /// True when an entry of `writer` for `held`'s key takes its place even if older: `held`
    /// is no longer its writer's to hold (the master's keys after another commit won, roles
    /// after another leader took over: see [`Verdict::NotOwner`]), or `held` is a `leader-auto`
    /// claim and `writer` is bound to a live node that outranks its claimant (who leads is
    /// decided by rank, not by who claimed last: a site that elected its own leader while cut
    /// off holds a newer claim than the real leader's). Otherwise the held entry would keep the
    /// key here for good, and anti-entropy would offer it at every exchange to nodes that
    /// refuse it.
    pub(crate) fn displaced_by(&self, held: &Entry, writer: &PeerId, now: Option<u64>) -> bool {
        if held.writer == *writer || self.authority.is_none() {
            return false;
        }
        if matches!(self.authorize(held, now), Verdict::NotOwner(_)) {
            return true;
        }
        held.key == names::LEADER_AUTO && self.outranking_claimant(held, writer, now)
    }

    /// `writer` is bound to a node taking part in elections in `held`'s bucket that outranks
    /// the node `held` (a `leader-auto` claim) names and has not been silent for
    /// the liveness timeout.
    fn outranking_claimant(&self, held: &Entry, writer: &PeerId, now: Option<u64>) -> bool {
        let (Some(auth), Some(value)) = (&self.authority, &held.value) else {
            return false;
        };
        let holder = String::from_utf8_lossy(value);
        let rank = |u: &str| (fnv32a(u), u.to_string());
        let holder_rank = rank(&holder);
        self.bindings
            .iter()
            .filter(|(_, (peer, _))| peer == writer)
            .any(|(uuid, _)| {
                rank(uuid) > holder_rank
                    && self.takes_part(&held.bucket, uuid)
                    && now.is_none_or(|now| self.silent_for(uuid, now) < auth.liveness.timeout_ms)
            })
    }

    /// After the committed master of `bucket` changed: removes the master's keys and master
    /// roles held from a writer that no longer owns them (the previous master's join data),
    /// without a tombstone, so that the new master's entries, older or not, take their place
    /// (anti-entropy brings them: this ledger now lacks the keys).
    pub(crate) fn drop_disowned_master_keys(&mut self, bucket: &str, now: Option<u64>) {
        let Some(auth) = &self.authority else { return };
        if bucket != auth.network_bucket {
            return;
        }
        let disowned: Vec<String> = self
            .buckets
            .get(bucket)
            .into_iter()
            .flat_map(|b| b.entries.iter())
            .filter(|(key, _)| {
                matches!(
                    key.as_str(),
                    names::IP_MASTER | names::NODE_TOKEN | names::KUBECONFIG
                ) || key.starts_with(CONTROL_PLANE_PREFIX)
                    || key.ends_with(names::ROLE_SUFFIX)
            })
            .filter(|(_, s)| matches!(self.authorize(&s.entry, now), Verdict::NotOwner(_)))
            .map(|(key, _)| key.clone())
            .collect();
        for key in disowned {
            log::debug!(
                "ledger: {bucket}/{key} is no longer its writer's (another master committed)"
            );
            self.remove(bucket, &key);
            self.counters.not_owner += 1;
            self.push_event(super::LedgerEvent::Changed {
                bucket: bucket.to_string(),
                key,
            });
        }
    }

    /// The committed master's uuid in `bucket`.
    pub(crate) fn committed_master(&self, bucket: &str) -> Option<String> {
        let raw = self.get(bucket, MASTER_COMMIT)?;
        serde_json::from_slice::<Commit>(raw)
            .ok()
            .map(|c| c.candidate)
    }

    fn commit_proof(&self, auth: &Authority, entry: &Entry) -> Verdict {
        let Some(value) = &entry.value else {
            return self.same_writer(entry);
        };
        let Ok(commit) = serde_json::from_slice::<Commit>(value) else {
            return Verdict::NotOwner("master-commit does not parse");
        };
        // The proposer, or the master it names: the master re-asserts its cluster's commit when
        // two clusters meet and its own was chosen first (`Cluster::merge_split`); the votes
        // below prove it all the same.
        match self.owner_is(&commit.ballot.proposer, &entry.writer) {
            Verdict::Allowed => {}
            _ if self.owner_is(&commit.candidate, &entry.writer) == Verdict::Allowed => {}
            other => return other,
        }
        let votes = self
            .bucket(&entry.bucket)
            .filter(|(k, _)| k.ends_with(VOTE_SUFFIX))
            .filter_map(|(_, v)| serde_json::from_slice::<Vote>(v).ok())
            .filter(|v| {
                v.accepted
                    .as_ref()
                    .is_some_and(|a| a.ballot == commit.ballot && a.candidate == commit.candidate)
            })
            .count();
        // A node that formed the cluster alone (a lone `role: master`, see
        // `cluster::LONE_MASTER_WAIT`) proves its commit with its own vote: a commit that names
        // its proposer as the master needs one vote. That lets a member make only itself master,
        // which members are trusted with; it never lets one name another node.
        // Never to replace a commit naming another master, though: that takes a quorum.
        let held = self.committed_master(&entry.bucket);
        let alone = commit.candidate == commit.ballot.proposer
            && held.as_ref().is_none_or(|m| *m == commit.candidate);
        let needed = if alone { 1 } else { auth.quorum_floor.max(1) };
        if votes >= needed {
            Verdict::Allowed
        } else {
            Verdict::Unsettled
        }
    }

    /// Entries whose arrival may settle deferred ones.
    pub(crate) fn settles_others(entry: &Entry) -> bool {
        announced_uuid(&entry.bucket, &entry.key).is_some()
            || entry.key == MASTER_COMMIT
            || entry.key == names::LEADER_AUTO
            || entry.key.ends_with(VOTE_SUFFIX)
    }
}
