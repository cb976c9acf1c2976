//! The cluster layer: the replicated ledger gossiped between members, liveness, the master
//! election, role assignment and VPN address allocation. Sans-IO like the rest of the core: the
//! [`Node`](crate::node::Node) feeds it connections, sync messages and time, and sends what it
//! asks; the driver persists the ledger when [`Cluster::save_due`] says so.
//!
//! Every change (an entry learned, a timer) runs one [`Cluster::update`] pass: read the view,
//! vote ([`election::accept`]), lead (run the election, then [`roles::assign`]), follow our own
//! role, allocate the address, and write what that asks for. Events tell the VPN and k3s layers
//! what changed.

pub mod election;
pub mod ipam;
pub mod liveness;
mod relevance;
pub mod replication;
pub mod requests;
pub mod roles;
#[cfg(test)]
#[path = "tests.rs"]
mod scenario_tests;
pub mod view;

use std::collections::{BTreeSet, VecDeque};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use crate::config::{P2pConfig, Role};
use crate::identity::{Identity, PeerId};
use crate::ledger::authority::Authority;
use crate::ledger::{
    Clock, Entry, Hlc, Ledger, LedgerError, LedgerEvent, Limits, SyncLimits, names,
};

use election::{Proposer, Tally};
use liveness::{Liveness, Suspicion, Suspicions};
use replication::{Replication, ReplicationStats};
use roles::RolePolicy;
use view::{Announcement, View};

/// How long a leader's view must stay unchanged before it starts the first election, and how
/// long a node that cannot sync with anybody waits before acting alone.
pub const DEFAULT_SETTLE: Duration = Duration::from_millis(1500);
/// How long a node that asked for `master` and knows of no other node waits before it forms a
/// cluster alone (see [`ClusterSettings::lone_master_wait`]): well beyond what finding a
/// neighbour takes (LAN beacons every 2 s while alone, the first DHT lookups at 5 s and 10 s),
/// so that masters booted together meet first and elect one of them.
pub const LONE_MASTER_WAIT: Duration = Duration::from_secs(30);
/// A ledger holding only new heartbeats is saved at most this often (flash wear).
pub const LAZY_SAVE: Duration = Duration::from_secs(600);
/// How long news waits for more news before an update pass reads them all: the pass reads the
/// whole cluster bucket, and a burst of entries (a node joining a big network learns thousands)
/// must not cost one pass each.
pub const UPDATE_DELAY: Duration = Duration::from_millis(5);
/// Bounds on update passes per input (each pass may write and trigger the next).
const MAX_PASSES: usize = 4;

/// How a node takes part in its cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSettings {
    /// `p2p.network_id`: the cluster's ledger bucket.
    pub network_id: String,
    /// This node's uuid.
    pub uuid: String,
    /// This node's hostname.
    pub hostname: String,
    /// `p2p.role`.
    pub role: Role,
    /// `p2p.auto.enable`: elect and assign roles automatically.
    pub auto: bool,
    /// `p2p.minimum_nodes`, resolved (0 means 2).
    pub minimum_nodes: usize,
    /// HA and dynamic roles.
    pub roles: RolePolicy,
    /// Nodes not heard from for this long are dead (see [`liveness`]).
    pub liveness_timeout: Duration,
    /// See [`DEFAULT_SETTLE`].
    pub settle: Duration,
    /// A node that asked for `master` (`p2p.role: master`, the docs' single-node example) and
    /// has known of no other eligible node for this long since it started forms the cluster
    /// alone, whatever `minimum_nodes` says, as Kairos applies a static role; see
    /// [`LONE_MASTER_WAIT`] and the README for what this keeps of the one-master guarantee.
    pub lone_master_wait: Duration,
    /// `p2p.auto.merge_window`: two clusters that meet while the one chosen first is younger
    /// than this are merged into it (see [`Cluster::merge_split`]); zero never merges.
    pub merge_window: Duration,
    /// VPN address allocation (`None`: no address, e.g. `vpn.create: false`).
    pub ipam: Option<ipam::IpamSettings>,
    /// Ledger bounds.
    pub ledger_limits: Limits,
    /// Largest sync message (the token's `max_message_size`).
    pub max_message_bytes: usize,
}

impl ClusterSettings {
    /// The settings of the `p2p` block for the node `uuid` on `hostname`.
    pub fn from_config(p2p: &P2pConfig, uuid: &str, hostname: &str, max_message: u64) -> Self {
        let max_message_bytes = usize::try_from(max_message).unwrap_or(usize::MAX);
        let ha = &p2p.auto.ha;
        let ipam = p2p.vpn.create.then(|| ipam::IpamSettings {
            network: p2p.vpn.settings.address,
            static_address: (!p2p.vpn.settings.dhcp).then_some(p2p.vpn.settings.address.addr),
            settle: DEFAULT_SETTLE,
            hostname: hostname.to_string(),
        });
        Self {
            network_id: names::network_bucket(&p2p.network_id).to_string(),
            uuid: uuid.to_string(),
            hostname: hostname.to_string(),
            role: p2p.role,
            auto: p2p.auto.enable,
            minimum_nodes: p2p.minimum_nodes.max(1) as usize,
            roles: RolePolicy {
                ha_masters: if ha.enable {
                    ha.master_nodes as usize
                } else {
                    0
                },
                dynamic: p2p.dynamic_roles,
            },
            liveness_timeout: Duration::from_secs(p2p.liveness_timeout.max(1)),
            settle: DEFAULT_SETTLE,
            lone_master_wait: LONE_MASTER_WAIT,
            merge_window: Duration::from_secs(p2p.auto.merge_window),
            ipam,
            ledger_limits: Limits::for_max_message_size(max_message),
            max_message_bytes,
        }
    }

    /// Kairos' defaults for node `uuid`: network `kairos`, automatic roles, `minimum_nodes` 2,
    /// no HA, a 60 s liveness timeout and DHCP addresses in 10.1.0.0/24.
    pub fn defaults(uuid: &str) -> Self {
        let max_message = 20 * 1024 * 1024;
        Self {
            network_id: names::DEFAULT_NETWORK_ID.to_string(),
            uuid: uuid.to_string(),
            hostname: uuid.to_string(),
            role: Role::Auto,
            auto: true,
            minimum_nodes: crate::config::DEFAULT_MINIMUM_NODES as usize,
            roles: RolePolicy {
                ha_masters: 0,
                dynamic: false,
            },
            liveness_timeout: Duration::from_secs(crate::config::DEFAULT_LIVENESS_TIMEOUT_SECS),
            settle: DEFAULT_SETTLE,
            lone_master_wait: LONE_MASTER_WAIT,
            merge_window: Duration::from_secs(crate::config::DEFAULT_MERGE_WINDOW_SECS),
            ipam: Some(ipam::IpamSettings {
                network: crate::config::DEFAULT_ADDRESS,
                static_address: None,
                settle: DEFAULT_SETTLE,
                hostname: uuid.to_string(),
            }),
            ledger_limits: Limits::for_max_message_size(max_message),
            max_message_bytes: max_message as usize,
        }
    }

    /// How often a node that gave way to another node with its uuid checks again whether that
    /// one is still live (a quarter of the liveness timeout, 0.25 to 15 s).
    fn recheck_interval(&self) -> Duration {
        (self.liveness_timeout / 4).clamp(Duration::from_millis(250), Duration::from_secs(15))
    }
}

/// What the cluster layer reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterEvent {
    /// This node's role is set or changed (`master`, `master/clusterinit`, `master/ha`,
    /// `worker`).
    RoleAssigned {
        /// The role.
        role: String,
    },
    /// This node's role was taken away (`dynamic_roles` after it was presumed dead).
    RoleRemoved,
    /// This node asked for `master` but the cluster has its master and no free HA slot.
    MasterRefused,
    /// The leader changed (`None`: no live eligible node).
    LeaderChanged {
        /// Its uuid.
        leader: Option<String>,
    },
    /// This node asked for `master`, found no other node within
    /// [`ClusterSettings::lone_master_wait`] and elects itself alone.
    FormingAlone {
        /// How long it looked for others.
        waited: Duration,
    },
    /// The master was chosen.
    MasterElected {
        /// Its uuid.
        uuid: String,
    },
    /// The master has not been heard from for the liveness timeout. It is not replaced: a
    /// second master would be a second cluster.
    MasterLost {
        /// Its uuid.
        uuid: String,
    },
    /// The lost master is back.
    MasterRecovered {
        /// Its uuid.
        uuid: String,
    },
    /// A VPN address was allocated or changed, or a static address clashes.
    Address(ipam::IpamEvent),
    /// Nodes other than the chosen master hold a master role: a second k3s cluster (groups that
    /// elected before they met, a partition longer than the liveness timeout, wiped state). An
    /// empty list: there is none any more. Reported once per change.
    SecondMaster {
        /// The chosen master.
        master: String,
        /// The other nodes with a master role.
        others: Vec<String>,
    },
    /// Two clusters met while the one chosen first was younger than `p2p.auto.merge_window`,
    /// and this node's k3s server belongs to the other: it gives up its role (its k3s server
    /// stops and its data directory is moved aside) and takes the role the winner's leader
    /// gives it.
    LeavingCluster {
        /// The master of the cluster this node leaves.
        lost: String,
        /// The master of the cluster kept.
        winner: String,
    },
    /// Two clusters met too late to be merged automatically (the one chosen first is older than
    /// `p2p.auto.merge_window`, or merging is off): the second-master alarm stays.
    SplitTooOld {
        /// The master of the cluster chosen first.
        winner: String,
        /// Its age when the split was seen.
        age: Duration,
    },
    /// Another running node uses this node's uuid; this node takes no part in the cluster.
    DuplicateUuid {
        /// The uuid.
        uuid: String,
        /// The other node's peer id.
        peer: PeerId,
    },
}

impl ClusterEvent {
    /// Something an operator must look at (logged as a warning).
    pub fn is_alarm(&self) -> bool {
        matches!(
            self,
            ClusterEvent::MasterLost { .. }
                | ClusterEvent::MasterRefused
                | ClusterEvent::RoleRemoved
                | ClusterEvent::DuplicateUuid { .. }
                | ClusterEvent::LeavingCluster { .. }
                | ClusterEvent::SplitTooOld { .. }
                | ClusterEvent::Address(ipam::IpamEvent::Clash { .. } | ipam::IpamEvent::Exhausted)
        ) || matches!(self, ClusterEvent::SecondMaster { others, .. } if !others.is_empty())
    }
}

impl std::fmt::Display for ClusterEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use ipam::IpamEvent;
        match self {
            ClusterEvent::RoleAssigned { role } => write!(f, "role assigned: {role}"),
            ClusterEvent::RoleRemoved => write!(f, "role removed (this node was presumed dead)"),
            ClusterEvent::MasterRefused => write!(
                f,
                "p2p.role is master but the cluster has its master and no free HA slot: no role"
            ),
            ClusterEvent::LeaderChanged { leader: Some(l) } => write!(f, "leader is {l}"),
            ClusterEvent::LeaderChanged { leader: None } => write!(f, "no leader (no live node)"),
            ClusterEvent::FormingAlone { waited } => write!(
                f,
                "no other node of this network found in {} s: forming the cluster alone, as \
                 p2p.role: master asks (nodes that come later join it)",
                waited.as_secs()
            ),
            ClusterEvent::MasterElected { uuid } => write!(f, "master elected: {uuid}"),
            ClusterEvent::MasterLost { uuid } => write!(
                f,
                "MASTER LOST: {uuid} silent for the liveness timeout; not replaced (a second \
                 master would start a second cluster): bring it back"
            ),
            ClusterEvent::MasterRecovered { uuid } => write!(f, "master {uuid} is back"),
            ClusterEvent::SecondMaster { master, others } if others.is_empty() => {
                write!(f, "no second master any more: {master} is the only master")
            }
            ClusterEvent::SecondMaster { master, others } => write!(
                f,
                "SECOND MASTER: {} also hold a master role besides the chosen master {master}: \
                 two k3s clusters; reset the other side's nodes (see the README, \"Second master\")",
                others.join(", ")
            ),
            ClusterEvent::Address(IpamEvent::Assigned { addr, prefix_len }) => {
                write!(f, "VPN address {addr}/{prefix_len}")
            }
            ClusterEvent::Address(IpamEvent::Changed {
                old,
                new,
                prefix_len,
            }) => write!(
                f,
                "VPN address changed from {old} to {new}/{prefix_len} (an older lease won)"
            ),
            ClusterEvent::Address(IpamEvent::Clash { addr, other_uuid }) => write!(
                f,
                "static VPN address {addr} is also configured on {other_uuid}: fix ADDRESS on one"
            ),
            ClusterEvent::LeavingCluster { lost, winner } => write!(
                f,
                "MERGING: this node's k3s server belongs to the cluster of {lost}, which met the \
                 older cluster of {winner} within p2p.auto.merge_window: stopping k3s, moving its \
                 data directory aside (kept) and joining {winner}'s cluster"
            ),
            ClusterEvent::SplitTooOld { winner, age } => write!(
                f,
                "two clusters met but the older one (master {winner}) is {} s old, past \
                 p2p.auto.merge_window: not merged automatically (see the README, \"Second master\")",
                age.as_secs()
            ),
            ClusterEvent::DuplicateUuid { uuid, peer } => write!(
                f,
                "node {peer} uses this node's uuid {uuid} too (cloned disk?): set $UUID or \
                 regenerate /etc/machine-id; this node takes no part in the cluster meanwhile"
            ),
            ClusterEvent::Address(IpamEvent::Exhausted) => {
                write!(f, "no free VPN address left in the prefix")
            }
        }
    }
}

/// Persistence bookkeeping.
#[derive(Debug, Default)]
struct SaveState {
    urgent: bool,
    lazy_since: Option<Instant>,
}

/// The cluster layer of one node.
pub struct Cluster {
    identity: Identity,
    me: PeerId,
    settings: ClusterSettings,
    ledger: Ledger,
    clock: Clock,
    replication: Replication,
    proposer: Proposer,
    ipam: Option<ipam::Ipam>,
    started: Option<Instant>,
    heartbeat_at: Option<Instant>,
    check_at: Option<Instant>,
    update_at: Option<Instant>,
    unix_ms: u64,
    live_set: BTreeSet<String>,
    view_changed_at: Option<Instant>,
    view: View,
    leader: Option<String>,
    my_role: Option<String>,
    master: Option<String>,
    master_lost: bool,
    refused: bool,
    /// [`ClusterEvent::FormingAlone`] was reported.
    forming_alone: bool,
    /// Times another peer id announced our uuid (see [`Cluster::pass`]).
    foreign_announcements: u32,
    /// The version of the rival's release this node announced again after.
    rival_released: Option<crate::ledger::Hlc>,
    /// Another live node holds our uuid in the network: this node gives way meanwhile.
    rival_aside: bool,
    events: VecDeque<ClusterEvent>,
    save: SaveState,
    /// Bumped whenever what the VPN's routes are read from changes: the `machines` and `dhcp`
    /// buckets and the uuid announcements (bindings).
    routes_generation: u64,
    /// The node's discovery gate is open (see [`Cluster::set_discovery_settled`]).
    discovery_settled: bool,
    /// Nodes other than the chosen master that hold a master role.
    second_masters: Vec<String>,
    /// Times this node left a cluster in a merge (the k3s layer resets k3s at each).
    left_clusters: u64,
    /// The split last reported as too old to merge (its winner), reported once.
    split_reported: Option<String>,
    /// Two clusters are being merged (see [`Cluster::merging`]).
    merging: bool,
    /// The cluster this node left last in a merge: a master role under its commit (a leader
    /// that has not seen the winner's commit yet) is not taken again.
    left: Option<election::Commit>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("uuid", &self.settings.uuid)
            .field("entries", &self.ledger.len())
            .field("role", &self.my_role)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// The cluster layer for `identity`, starting from `ledger` (the persisted one, or empty).
    pub fn new(
        identity: &Identity,
        settings: ClusterSettings,
        mut ledger: Ledger,
        seed: u64,
    ) -> Self {
        ledger.set_authority(Authority {
            network_bucket: settings.network_id.clone(),
            quorum_floor: settings.minimum_nodes.max(1),
            liveness: Liveness::for_timeout(settings.liveness_timeout),
        });
        // The address allocator reads the claims changed since its last pass.
        ledger.follow(names::DHCP);
        let limits = SyncLimits::for_ledger(&settings.ledger_limits, settings.max_message_bytes);
        let me = identity.peer_id();
        Self {
            identity: Identity::from_seed(identity.signing_key().to_bytes()),
            me,
            proposer: Proposer::new(&settings.uuid),
            replication: Replication::new(
                limits,
                &settings.network_id,
                seed ^ 0x6e65_7773_6e65_7773,
            ),
            ipam: None,
            started: None,
            heartbeat_at: None,
            check_at: None,
            update_at: None,
            unix_ms: 0,
            live_set: BTreeSet::new(),
            view_changed_at: None,
            view: View::default(),
            leader: None,
            my_role: None,
            master: None,
            master_lost: false,
            refused: false,
            forming_alone: false,
            foreign_announcements: 0,
            rival_released: None,
            rival_aside: false,
            events: VecDeque::new(),
            save: SaveState::default(),
            routes_generation: 0,
            discovery_settled: true,
            second_masters: Vec::new(),
            left_clusters: 0,
            split_reported: None,
            merging: false,
            left: None,
            ledger,
            clock: Clock::new(),
            settings,
        }
    }

    // ---- getters ----

    /// The ledger.
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// The settings.
    pub fn settings(&self) -> &ClusterSettings {
        &self.settings
    }

    /// The last view of the cluster.
    pub fn view(&self) -> &View {
        &self.view
    }

    /// This node's role, if it has one.
    pub fn role(&self) -> Option<&str> {
        self.my_role.as_deref()
    }

    /// The current leader's uuid.
    pub fn leader(&self) -> Option<&str> {
        self.leader.as_deref()
    }

    /// The chosen master's uuid.
    pub fn master(&self) -> Option<&str> {
        self.master.as_deref()
    }

    /// Nodes other than the chosen master that hold a master role (a second k3s cluster);
    /// empty when all is well.
    pub fn second_masters(&self) -> &[String] {
        &self.second_masters
    }

    /// How many times this node left its cluster in a merge of two clusters (see
    /// [`ClusterEvent::LeavingCluster`]): each time, the k3s layer stops k3s and moves its data
    /// aside before it applies the next role.
    pub fn left_clusters(&self) -> u64 {
        self.left_clusters
    }

    /// Two clusters met within `p2p.auto.merge_window` and are being merged: the committed
    /// master may flip until the loser's servers have left, so joining nodes keep the master
    /// they joined meanwhile.
    pub fn merging(&self) -> bool {
        self.merging
    }

    /// The chosen master has not been heard from for the liveness timeout.
    pub fn master_lost(&self) -> bool {
        self.master_lost
    }

    /// This node's settled VPN address.
    pub fn address(&self) -> Option<Ipv4Addr> {
        self.ipam.as_ref().and_then(ipam::Ipam::address)
    }

    /// A number that changes whenever what the VPN's routes are read from changes (`machines`,
    /// `dhcp`, uuid announcements).
    pub fn routes_generation(&self) -> u64 {
        self.routes_generation
    }

    /// Replication counters.
    pub fn replication_stats(&self) -> ReplicationStats {
        self.replication.stats()
    }

    /// True when the ledger holds changes that must reach the disk before anything this node
    /// wrote is sent (votes, roles, leases), or heartbeats that waited long enough.
    pub fn save_due(&self, now: Instant) -> bool {
        self.save.urgent || self.save.lazy_since.is_some_and(|t| now >= t + LAZY_SAVE)
    }

    /// The driver saved the ledger.
    pub fn saved(&mut self) {
        self.save = SaveState::default();
    }

    /// Saves what changed in the ledger since the last save (appended to its journal, or a
    /// compacted snapshot; see [`crate::ledger::journal`]) and, when that worked, marks it saved.
    pub fn persist(
        &mut self,
        path: &std::path::Path,
    ) -> Result<crate::ledger::journal::Persisted, LedgerError> {
        let persisted = self.ledger.persist(path)?;
        self.saved();
        Ok(persisted)
    }

    /// [`persist`](Self::persist) to any disk (the simulator's virtual one; see
    /// [`Ledger::persist_to`]).
    pub fn persist_to<D: crate::ledger::disk::LedgerDisk>(
        &mut self,
        disk: &mut D,
    ) -> Result<crate::ledger::journal::Persisted, LedgerError> {
        let persisted = self.ledger.persist_to(disk)?;
        self.saved();
        Ok(persisted)
    }

    // ---- inputs ----

    /// Whether the node's discovery has converged (bootstrap peers, DHT rendezvous and members
    /// tried; see [`Node::discovery_settled`](crate::node::Node::discovery_settled)). Until it
    /// has, and until the ledger is synced with every connected member, this node neither votes
    /// nor leads an election: a group that has not met the rest of its network yet would
    /// otherwise see a quorum of itself. True by default (a cluster layer driven without a node).
    pub fn set_discovery_settled(&mut self, now: Instant, settled: bool) {
        if settled != self.discovery_settled {
            self.discovery_settled = settled;
            if self.started.is_some() {
                self.update_at = Some(self.update_at.map_or(now, |t| t.min(now)));
            }
        }
    }

    /// Closes the discovery gate until [`Cluster::set_discovery_settled`] opens it (the node
    /// does when it attaches the cluster layer).
    pub(crate) fn close_discovery_gate(&mut self) {
        self.discovery_settled = false;
    }

    /// True while the discovery gate lets this node take part in an election.
    pub fn election_gate_open(&self) -> bool {
        self.discovery_settled && self.replication.all_peers_synced()
    }

    /// A connection to `peer` is up.
    pub fn peer_connected(&mut self, now: Instant, unix_ms: u64, peer: PeerId) {
        self.unix_ms = unix_ms;
        self.replication.connected(now, unix_ms, &self.ledger, peer);
    }

    /// The connection to `peer` went away; `lost` when it did not close it on purpose (idle
    /// timeout, reset, a close or error from its side): then this node suspects the nodes bound
    /// to `peer` that count as live (see [`liveness`]).
    pub fn peer_disconnected(&mut self, now: Instant, unix_ms: u64, peer: &PeerId, lost: bool) {
        self.unix_ms = unix_ms;
        self.replication.disconnected(peer);
        if !lost || self.started.is_none() || self.stepped_aside() {
            return;
        }
        let hlc_now = self.hlc_now_ms();
        let l = self.liveness();
        let held = Suspicions::read(&self.ledger);
        let mut mine = self.own_suspicions();
        let before = mine.len();
        for uuid in self.ledger.uuids_bound_to(peer) {
            if uuid == self.settings.uuid {
                continue;
            }
            let Some(beat) = self
                .ledger
                .entry(names::HEALTHCHECK, &uuid)
                .filter(|e| e.writer == *peer && e.value.is_some())
                .map(|e| e.version)
            else {
                continue;
            };
            let suspected = held.of(&uuid, beat);
            if suspected.is_some() || l.silence_ms(hlc_now, beat, None) >= l.timeout_ms {
                continue;
            }
            log::info!("lost the connection to {uuid} ({peer}): suspecting it until it answers");
            mine.push(Suspicion {
                uuid,
                beat,
                at: hlc_now,
            });
        }
        if mine.len() != before {
            if mine.len() > liveness::MAX_SUSPICIONS {
                mine.drain(..mine.len() - liveness::MAX_SUSPICIONS);
            }
            let write = Write::put(
                names::SUSPECTS,
                &self.settings.uuid,
                liveness::encode(&mine),
            );
            let _ = self.write_all(now, vec![write]);
            self.update_at.get_or_insert(now + UPDATE_DELAY);
        }
    }

    /// The peers of every node of the network the ledger counts as live (see [`liveness`]).
    pub fn live_peers(&self) -> Vec<PeerId> {
        let l = self.liveness();
        let hlc_now = self.hlc_now_ms();
        let suspicions = Suspicions::read(&self.ledger);
        self.ledger
            .bucket(names::HEALTHCHECK)
            .filter_map(|(uuid, _)| {
                let e = self.ledger.entry(names::HEALTHCHECK, uuid)?;
                let silence = l.silence_ms(hlc_now, e.version, suspicions.of(uuid, e.version));
                (silence < l.timeout_ms).then_some(e.writer)
            })
            .collect()
    }

    /// The suspicions in our own `suspects` entry.
    fn own_suspicions(&self) -> Vec<Suspicion> {
        self.ledger
            .entry(names::SUSPECTS, &self.settings.uuid)
            .filter(|e| e.writer == self.me)
            .and_then(|e| e.value.as_deref())
            .map(liveness::decode)
            .unwrap_or_default()
    }

    /// Our suspicions that still stand: the node did not beat since, and its heartbeat's lease
    /// has not run out anyway (then it is dead without them). The others are dropped from our
    /// entry (deleted when none is left).
    fn prune_suspicions(&self, hlc_now: u64, writes: &mut Vec<Write>) {
        let mine = self.own_suspicions();
        if mine.is_empty() {
            return;
        }
        let l = self.liveness();
        let standing: Vec<Suspicion> = mine
            .iter()
            .filter(|s| {
                self.ledger
                    .entry(names::HEALTHCHECK, &s.uuid)
                    .filter(|e| e.value.is_some())
                    .is_some_and(|e| {
                        e.version <= s.beat && l.silence_ms(hlc_now, e.version, None) < l.timeout_ms
                    })
            })
            .cloned()
            .collect();
        if standing.len() == mine.len() {
            return;
        }
        writes.push(if standing.is_empty() {
            Write::delete(names::SUSPECTS, &self.settings.uuid)
        } else {
            Write::put(
                names::SUSPECTS,
                &self.settings.uuid,
                liveness::encode(&standing),
            )
        });
    }

    /// A ledger sync message from `from`.
    pub fn handle_message(&mut self, now: Instant, unix_ms: u64, from: PeerId, bytes: &[u8]) {
        self.unix_ms = unix_ms;
        let was_synced = self.replication.is_synced();
        let was_all_synced = self.replication.all_peers_synced();
        let rival_before = self.ledger.rival(&self.settings.uuid);
        let fresh = self
            .replication
            .handle_message(now, unix_ms, &mut self.ledger, from, bytes);
        // A new sign of another node using our uuid is news for the next pass.
        if self.ledger.rival(&self.settings.uuid) != rival_before {
            self.update_at.get_or_insert(now + UPDATE_DELAY);
        }
        // Becoming synced lets this node vote and claim an address. Updates are batched: every
        // entry that arrives within UPDATE_DELAY is read by one pass; entries that concern
        // another cluster, or heartbeats of live nodes, run none (see `relevance`).
        let (bucket, me) = (&self.settings.network_id, &self.settings.uuid);
        let concerns = fresh
            .iter()
            .any(|e| relevance::concerns(&self.view, bucket, me, e));
        if !fresh.is_empty() {
            self.note_changes(now);
        }
        if concerns
            || was_synced != self.replication.is_synced()
            || was_all_synced != self.replication.all_peers_synced()
        {
            self.note_changes(now);
            self.update_at.get_or_insert(now + UPDATE_DELAY);
        }
    }

    /// Runs timers; call at [`poll_timeout`](Self::poll_timeout).
    pub fn handle_timeout(&mut self, now: Instant, unix_ms: u64) {
        self.unix_ms = unix_ms;
        let started = *self.started.get_or_insert(now);
        if self.ipam.is_none() {
            if let Some(s) = &self.settings.ipam {
                self.ipam = Some(ipam::Ipam::new(
                    now,
                    self.settings.uuid.clone(),
                    self.me,
                    s.clone(),
                ));
            }
        }
        self.replication.handle_timeout(now, unix_ms, &self.ledger);
        if self.heartbeat_at.is_none_or(|t| t <= now)
            || self.own_heartbeat_looks_stale()
            || self.suspected()
        {
            let renew = Duration::from_millis(self.liveness().renew_ms);
            self.heartbeat_at = Some(now + renew);
            let mut writes = Vec::new();
            if now == started {
                let ann = Announcement::new(self.settings.role, &self.settings.hostname);
                let key = names::uuid_key(&self.settings.uuid);
                let bucket = self.settings.network_id.clone();
                let current = self.ledger.entry(&bucket, &key);
                if current.is_none_or(|e| {
                    e.writer != self.me || e.value.as_deref() != Some(&ann.to_json()[..])
                }) {
                    writes.push(Write::put(&bucket, &key, ann.to_json()));
                }
            }
            if !self.stepped_aside() {
                writes.push(Write::put(
                    names::HEALTHCHECK,
                    &self.settings.uuid,
                    (unix_ms / 1000).to_string(),
                ));
            }
            // Refusals of our own heartbeat or announcement are logged inside.
            let _ = self.write_all(now, writes);
        }
        self.update(now);
    }

    /// Writes `writes` (the API's and the k3s layer's, through [`Node::write`](crate::node::Node::write)),
    /// under the same ownership rule as entries from peers, and queues their gossip. Returns the
    /// first write refused (the others are made).
    pub fn write(
        &mut self,
        now: Instant,
        unix_ms: u64,
        writes: Vec<Write>,
    ) -> Result<(), LedgerError> {
        self.unix_ms = unix_ms;
        let bucket = self.settings.network_id.clone();
        let me = requests::Me {
            uuid: &self.settings.uuid,
            peer: self.me,
        };
        let writes = writes
            .into_iter()
            .map(|w| requests::route(&self.ledger, &bucket, &me, w))
            .collect::<Result<Vec<Write>, LedgerError>>()?;
        let result = self.write_all(now, writes);
        // Somebody waits for these to be on disk (an API client's answer).
        self.save.urgent = true;
        self.update(now);
        result
    }

    // ---- outputs ----

    /// The next sync message to send.
    pub fn poll_message(&mut self) -> Option<(PeerId, Vec<u8>)> {
        self.replication.poll_message()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<ClusterEvent> {
        self.events.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) must run next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.started?;
        [
            self.replication.poll_timeout(),
            self.heartbeat_at,
            self.check_at,
            self.update_at,
            self.ipam
                .as_ref()
                .filter(|_| !self.stepped_aside())
                .and_then(ipam::Ipam::poll_timeout),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    // ---- internals ----

    /// Another running node has our uuid and we gave way (see [`Cluster::pass`]).
    fn stepped_aside(&self) -> bool {
        self.foreign_announcements >= 2 || self.rival_aside
    }

    fn hlc_now_ms(&self) -> u64 {
        self.unix_ms.max(self.ledger.max_version().millis())
    }

    /// The timing of liveness (see [`liveness`]).
    fn liveness(&self) -> Liveness {
        Liveness::for_timeout(self.settings.liveness_timeout)
    }

    /// Our own heartbeat, if we wrote it.
    fn own_heartbeat(&self) -> Option<Hlc> {
        self.ledger
            .entry(names::HEALTHCHECK, &self.settings.uuid)
            .filter(|e| e.writer == self.me && e.value.is_some())
            .map(|e| e.version)
    }

    /// Our last heartbeat is due for renewal by the hybrid time the cluster now shows: the
    /// renewal period passed, or our wall clock was behind the others' (minutes, on a box
    /// without NTP) and their versions just pulled our hybrid clock up. Every other node already
    /// judges that heartbeat by the same newer time, so we would look dead a liveness timeout
    /// later; beating at once keeps us live. The new heartbeat carries the pulled-up version,
    /// so this fires once per jump.
    fn own_heartbeat_looks_stale(&self) -> bool {
        let renew_ms = self.liveness().renew_ms;
        self.own_heartbeat()
            .is_some_and(|beat| self.hlc_now_ms().saturating_sub(beat.millis()) >= renew_ms)
    }

    /// Somebody suspects our current heartbeat (see [`liveness`]): a new one answers it.
    fn suspected(&self) -> bool {
        self.own_heartbeat().is_some_and(|beat| {
            liveness::Suspicions::read(&self.ledger)
                .of(&self.settings.uuid, beat)
                .is_some()
        })
    }

    /// When this node may form the cluster alone (`None`: never): it asked for `master` and
    /// `view` holds no other eligible node (a bridge does not count; a node seen once, dead or
    /// alive, does: then this is a multi-node network and the usual quorum applies).
    fn lone_master_at(&self, view: &View) -> Option<Instant> {
        let s = &self.settings;
        let alone = view
            .nodes
            .iter()
            .all(|(uuid, n)| *uuid == s.uuid || !n.eligible());
        (s.role == Role::Master && alone)
            .then(|| self.started.map(|t| t + s.lone_master_wait))
            .flatten()
    }

    /// Ready to vote and lead: synced with a peer, or alone for the settle time with a view in
    /// which no other node is silent. A node whose ledger holds others silent (a restart after
    /// the liveness timeout) waits for a sync instead: its view is stale until then, and
    /// leading on it would hand out roles that live nodes hold (a second HA master, a role
    /// taken from a live node).
    fn ready(&self, now: Instant, view: &View) -> bool {
        let me = self.settings.uuid.as_str();
        self.replication.is_synced()
            || (view.nodes.iter().all(|(uuid, n)| uuid == me || n.live)
                && self
                    .started
                    .is_some_and(|t| now >= t + self.settings.settle))
    }

    /// As the leader of record: the roles held here from a former leader (neither from their
    /// node nor from us; with `ours`, from us too), signed again under our name so that nodes
    /// that learn them later take them from the leader they know (see
    /// [`crate::ledger::authority`]); `skip` are written anyway.
    fn resign_roles(&self, bucket: &str, skip: &[Write], ours: bool) -> Vec<Write> {
        self.ledger
            .bucket(bucket)
            .filter_map(|(key, value)| {
                let uuid = key.strip_suffix(names::ROLE_SUFFIX)?;
                let entry = self.ledger.entry(bucket, key)?;
                let foreign = (ours || entry.writer != self.me)
                    && self.ledger.bound_peer(uuid) != Some(entry.writer);
                (foreign && !skip.iter().any(|w| w.key == key))
                    .then(|| Write::put(bucket, key, value))
            })
            .collect()
    }

    /// Signs, stores and gossips `writes`; returns the first refusal (each is logged).
    fn write_all(&mut self, now: Instant, writes: Vec<Write>) -> Result<(), LedgerError> {
        let mut first_error = None;
        let mut fresh: Vec<Entry> = Vec::new();
        for w in writes {
            let res = match &w.value {
                Some(v) => self.ledger.put(
                    &self.identity,
                    &mut self.clock,
                    &w.bucket,
                    &w.key,
                    v,
                    self.unix_ms,
                ),
                None => self.ledger.delete(
                    &self.identity,
                    &mut self.clock,
                    &w.bucket,
                    &w.key,
                    self.unix_ms,
                ),
            };
            match res {
                Ok(e) => fresh.push(e),
                Err(e) => {
                    log::warn!("ledger write {}/{} failed: {e}", w.bucket, w.key);
                    first_error.get_or_insert(e);
                }
            }
        }
        self.note_changes(now);
        self.replication.push(now, &fresh, None);
        first_error.map_or(Ok(()), Err)
    }

    fn note_changes(&mut self, now: Instant) -> bool {
        let mut any = false;
        while let Some(ev) = self.ledger.poll_event() {
            any = true;
            match ev {
                LedgerEvent::Changed { bucket, .. } if bucket == names::HEALTHCHECK => {
                    self.save.lazy_since.get_or_insert(now);
                }
                // What routes are read from, or a resync (which may hide any of it).
                LedgerEvent::Changed { bucket, key }
                    if bucket == names::MACHINES
                        || bucket == names::DHCP
                        || key.ends_with(names::UUID_SUFFIX) =>
                {
                    self.routes_generation += 1;
                    self.save.urgent = true;
                }
                LedgerEvent::Resync => {
                    self.routes_generation += 1;
                    self.save.urgent = true;
                }
                LedgerEvent::Changed { .. } => {
                    self.save.urgent = true;
                }
            }
        }
        any
    }

    /// One or more update passes until nothing more is written.
    fn update(&mut self, now: Instant) {
        self.update_at = None;
        self.note_changes(now);
        for _ in 0..MAX_PASSES {
            let writes = self.pass(now);
            if writes.is_empty() {
                return;
            }
            // Refusals of the layer's own writes are logged inside.
            let _ = self.write_all(now, writes);
        }
        // Still writing (a lone node runs a whole election by itself, one step per pass): go on
        // at the next timeout rather than wait for a message or the next heartbeat.
        self.update_at.get_or_insert(now + UPDATE_DELAY);
    }

    /// The clusters this ledger shows: the committed one, and the one every master recorded
    /// in its own `<uuid>-cluster` (the commit naming it). `<uuid>-cluster` is written by the
    /// node itself, so no rule refuses it where the other cluster's master role is refused (a
    /// master role is taken only from the committed master). `None` while there is at most one.
    /// The winner is the one chosen first ([`election::Commit::merge_key`]): every node computes
    /// the same from the same entries.
    fn split(&self, tally: &Tally, recorded: &[election::Commit], hlc_now: u64) -> Option<Split> {
        let mut clusters: Vec<election::Commit> = tally.commit.iter().cloned().collect();
        for c in recorded {
            if !clusters.iter().any(|k| k.same_cluster(c)) {
                clusters.push(c.clone());
            }
        }
        if clusters.len() < 2 {
            return None;
        }
        let winner = clusters
            .into_iter()
            .min_by(|a, b| a.merge_key().cmp(&b.merge_key()))?;
        let age_ms = hlc_now.saturating_sub(winner.at_ms);
        let window = u64::try_from(self.settings.merge_window.as_millis()).unwrap_or(u64::MAX);
        Some(Split {
            merge: window > 0 && age_ms < window,
            winner,
            age_ms,
        })
    }

    /// The clusters masters recorded: every `<uuid>-cluster` whose commit names `<uuid>`.
    fn recorded_masters(&self) -> Vec<election::Commit> {
        self.ledger
            .bucket(&self.settings.network_id)
            .filter_map(|(k, v)| {
                let uuid = k.strip_suffix(election::CLUSTER_SUFFIX)?;
                let c: election::Commit = serde_json::from_slice(v).ok()?;
                (c.candidate == uuid).then_some(c)
            })
            .collect()
    }

    /// The cluster `uuid`'s k3s server belongs to (its `<uuid>-cluster`).
    fn cluster_of(&self, uuid: &str) -> Option<election::Commit> {
        let key = format!("{uuid}{}", election::CLUSTER_SUFFIX);
        let raw = self.ledger.get(&self.settings.network_id, &key)?;
        serde_json::from_slice(raw).ok()
    }

    /// This node holds a k3s server role (`master`, `master/clusterinit`, `master/ha`).
    fn holds_server_role(&self) -> bool {
        matches!(
            self.my_role.as_deref(),
            Some(names::ROLE_MASTER | names::ROLE_MASTER_CLUSTERINIT | names::ROLE_MASTER_HA)
        )
    }

    /// A server records the cluster it belongs to (`<uuid>-cluster`) once it holds its role
    /// under a commit: the master under its own, an HA master under the one it joined. A node
    /// without a server role (a worker now, after a manual fix) deletes its record.
    fn record_cluster(&self, tally: &Tally, writes: &mut Vec<Write>) {
        let me = &self.settings.uuid;
        let key = format!("{me}{}", election::CLUSTER_SUFFIX);
        let recorded = self.cluster_of(me).is_some();
        if !self.holds_server_role() {
            if recorded && self.my_role.is_some() {
                writes.push(Write::delete(&self.settings.network_id, &key));
            }
            return;
        }
        let Some(commit) = &tally.commit else { return };
        if recorded {
            return;
        }
        let own_master_role = self.my_role.as_deref() != Some(names::ROLE_MASTER_HA);
        if own_master_role && commit.candidate != *me {
            // A master role under another commit: the other cluster's commit won the ledger
            // before this node recorded its own; its cluster is unknown (the alarm stays).
            return;
        }
        let value = serde_json::to_vec(commit).unwrap_or_default();
        writes.push(Write::put(&self.settings.network_id, &key, value));
    }

    /// Merges two clusters that met (see [`Split`]): within `p2p.auto.merge_window` of the
    /// winner's commit, the winner's master writes its commit again if the ledger names the
    /// other (its proof, the votes, is still there; the newer write wins everywhere), and every
    /// server of another cluster leaves it: it deletes its role and its `<uuid>-cluster`, and
    /// the k3s layer stops k3s and moves its data aside ([`Cluster::left_clusters`]); the
    /// leader then gives it a role in the winner's cluster. Past the window nothing is done
    /// (reported once): the second-master alarm stays until a person acts.
    fn merge_split(&mut self, tally: &Tally, split: &Split, writes: &mut Vec<Write>) {
        let bucket = self.settings.network_id.clone();
        let me = self.settings.uuid.clone();
        let winner = &split.winner;
        let committed = tally.commit.as_ref();
        // The committed master left its cluster already (its record is gone): the winner takes
        // the commit back whatever the window says.
        let committed_left = committed.is_some_and(|c| {
            self.cluster_of(&c.candidate)
                .is_none_or(|r| !r.same_cluster(c))
        });
        let mine = self.cluster_of(&me);
        let i_am_winner = winner.candidate == me
            && self.holds_server_role()
            && mine.as_ref().is_some_and(|c| c.same_cluster(winner));
        if i_am_winner
            && committed.is_some_and(|c| !c.same_cluster(winner))
            && (split.merge || committed_left)
        {
            log::info!(
                "two clusters met; this node's was chosen first ({} s ago): writing its \
                 master-commit again",
                split.age_ms / 1000
            );
            let value = serde_json::to_vec(winner).unwrap_or_default();
            writes.push(Write::put(&bucket, election::MASTER_COMMIT, value));
        }
        if !split.merge {
            if self.split_reported.as_ref() != Some(&winner.candidate) {
                self.split_reported = Some(winner.candidate.clone());
                self.events.push_back(ClusterEvent::SplitTooOld {
                    winner: winner.candidate.clone(),
                    age: Duration::from_millis(split.age_ms),
                });
            }
            return;
        }
        // Our record says our k3s server belongs to the other cluster, whatever role the
        // ledger shows now (a leader that could not see our master role may have written
        // another over it while this node was down).
        let Some(mine) = mine else {
            return;
        };
        if mine.same_cluster(winner) {
            return;
        }
        writes.push(Write::delete(&bucket, &names::role_key(&me)));
        writes.push(Write::delete(
            &bucket,
            &format!("{me}{}", election::CLUSTER_SUFFIX),
        ));
        self.my_role = None;
        self.left_clusters += 1;
        self.events.push_back(ClusterEvent::LeavingCluster {
            lost: mine.candidate.clone(),
            winner: winner.candidate.clone(),
        });
        self.left = Some(mine);
    }

    fn pass(&mut self, now: Instant) -> Vec<Write> {
        let s = &self.settings;
        let bucket = s.network_id.clone();
        let me = s.uuid.clone();
        let liveness = self.liveness();
        let view = View::read(&self.ledger, &bucket, self.hlc_now_ms(), &liveness);
        let mut writes = Vec::new();
        self.prune_suspicions(self.hlc_now_ms(), &mut writes);

        // Our announcement is gone (deleted, or expired with a tombstone): announce again, or
        // the others stop counting this node and it cannot see its own role in the view.
        // Another running node uses our uuid (a cloned disk: same machine-id and hostname, or
        // our old identity before a wiped state directory), and a peer relays its entries under
        // our uuid: that peer bound the uuid to it (each node binds a uuid to whoever announced
        // it first). While that node is live we give way and delete our announcement, which
        // frees the uuid wherever we held it; the other announces again so that every node binds
        // the uuid to it. Once it has been silent for the liveness timeout we come back. A member
        // forging our announcement cannot trigger this: honest peers refuse to store it.
        let timeout_ms = u64::try_from(s.liveness_timeout.as_millis()).unwrap_or(u64::MAX);
        let announcement_key = names::uuid_key(&me);
        let hlc_now = self.hlc_now_ms();
        let rival = self.ledger.rival(&me);
        let suspicions = Suspicions::read(&self.ledger);
        let rival_live = rival.filter(|r| {
            !r.released
                && liveness.silence_ms(hlc_now, r.version, suspicions.of(&me, r.version))
                    < timeout_ms
        });
        if let Some(r) = rival_live {
            if !self.rival_aside {
                self.rival_aside = true;
                self.events.push_back(ClusterEvent::DuplicateUuid {
                    uuid: me.clone(),
                    peer: r.peer,
                });
                self.view = view;
                self.my_role = None;
                self.check_at = Some(now + s.recheck_interval());
                return vec![Write::delete(&bucket, &announcement_key)];
            }
        } else if self.rival_aside {
            log::info!("the other node with uuid {me} is silent: taking part again");
            self.rival_aside = false;
        }
        if self.stepped_aside() {
            self.check_at = self.rival_aside.then(|| now + s.recheck_interval());
            self.view = view;
            self.my_role = None;
            return Vec::new();
        }
        if let Some(r) = rival.filter(|r| r.released) {
            if self.rival_released != Some(r.version) {
                self.rival_released = Some(r.version);
                let ann = Announcement::new(s.role, &s.hostname);
                writes.push(Write::put(&bucket, &announcement_key, ann.to_json()));
            }
        }
        if self.ledger.get(&bucket, &announcement_key).is_none() {
            let ann = Announcement::new(s.role, &s.hostname);
            writes.push(Write::put(&bucket, &announcement_key, ann.to_json()));
        }

        // Our uuid announced by another peer id: a stale announcement of ours from before a
        // wiped state (announce again, once), or a second running node with our uuid (a cloned
        // disk: same machine-id and hostname). The second time, step aside loudly.
        if let Some(other) = view
            .nodes
            .get(&me)
            .map(|n| n.peer)
            .filter(|p| *p != self.me)
        {
            self.foreign_announcements += 1;
            if self.foreign_announcements == 1 {
                let ann = Announcement::new(s.role, &s.hostname);
                writes.push(Write::put(&bucket, &names::uuid_key(&me), ann.to_json()));
            } else if self.foreign_announcements == 2 {
                self.events.push_back(ClusterEvent::DuplicateUuid {
                    uuid: me,
                    peer: other,
                });
            }
            if self.stepped_aside() {
                self.view = view;
                self.check_at = None;
                self.my_role = None;
                return Vec::new();
            }
            return writes;
        }

        let live: BTreeSet<String> = view.live_eligible().map(|(u, _)| u.clone()).collect();
        if live != self.live_set || self.view_changed_at.is_none() {
            self.live_set = live;
            self.view_changed_at = Some(now);
        }
        if view.leader != self.leader {
            self.leader = view.leader.clone();
            self.events.push_back(ClusterEvent::LeaderChanged {
                leader: self.leader.clone(),
            });
        }

        let tally = Tally::read(&self.ledger, &bucket);
        if let Some(commit) = &tally.commit {
            if self.master.as_ref() != Some(&commit.candidate) {
                self.master = Some(commit.candidate.clone());
                self.events.push_back(ClusterEvent::MasterElected {
                    uuid: commit.candidate.clone(),
                });
            }
        }
        // One scan of the bucket for the masters' records, used below twice.
        let recorded = self.recorded_masters();
        let split = self.split(&tally, &recorded, hlc_now);
        self.merging = split.as_ref().is_some_and(|sp| sp.merge);
        let eligible = s.role != Role::None;
        let mut leading = false;
        let ready = self.ready(now, &view);
        let stable_at = self.view_changed_at.map(|t| t + s.settle);
        let lone_at = self.lone_master_at(&view);
        // A lone master forms alone: its own vote is the quorum (see `lone_master_wait`).
        let alone = lone_at.is_some_and(|t| now >= t) && tally.commit.is_none();
        let minimum_nodes = if alone { 1 } else { s.minimum_nodes };
        if alone && s.minimum_nodes > 1 && !self.forming_alone {
            self.forming_alone = true;
            self.events.push_back(ClusterEvent::FormingAlone {
                waited: s.lone_master_wait,
            });
        }
        let mut settle_wait = None;
        // Before a master is chosen, only once discovery has converged (see
        // `set_discovery_settled`); afterwards the leader assigns roles to whoever joins.
        let gate_open = tally.commit.is_some()
            || (self.discovery_settled && self.replication.all_peers_synced());
        if s.auto && eligible && ready && !gate_open {
            self.proposer.stand_down();
        }
        if s.auto && eligible && ready && gate_open {
            if let Some(w) = election::accept(&tally, &bucket, &me) {
                writes.push(w);
            }
            if self.leader.as_deref() == Some(me.as_str()) {
                match &tally.commit {
                    None => {
                        let live_count = view.live_eligible_count();
                        let stable = stable_at.is_some_and(|t| now >= t);
                        if live_count >= minimum_nodes && stable {
                            let quorum = election::quorum(minimum_nodes, live_count);
                            let pick = pick_candidate(&view);
                            let step = self.proposer.step(
                                &tally,
                                &bucket,
                                quorum,
                                pick.as_deref(),
                                s.roles.master_role(),
                                hlc_now,
                            );
                            writes.extend(step.writes);
                        } else {
                            self.proposer.stand_down();
                            if live_count >= minimum_nodes {
                                settle_wait = stable_at;
                            }
                        }
                    }
                    // Two clusters being merged: no role is handed out until the loser's
                    // servers have left (they would get their master role back).
                    Some(_) if split.as_ref().is_some_and(|sp| sp.merge) => {}
                    Some(commit) => {
                        // Declaring others dead on stale news (a leader just restarted and
                        // not yet synced) would take live nodes' roles away.
                        let policy = RolePolicy {
                            dynamic: s.roles.dynamic && self.replication.is_synced(),
                            ..s.roles
                        };
                        // The ownership rule takes roles for others only from the leader of
                        // record: claim `leader-auto` first (in the same batch, so peers learn
                        // it before the roles), unless a higher leader still holds it here.
                        if self.ledger.may_lead(&bucket, &me, Some(hlc_now)) {
                            let held = self.ledger.entry(&bucket, names::LEADER_AUTO);
                            // Another node claimed the lead after our claim, and we refused it:
                            // the nodes that took it follow that node. Claim again, newer, and
                            // sign every role again so that they take ours.
                            let refused = self.ledger.refused_claim(&bucket);
                            let outbid =
                                held.is_some_and(|e| refused.is_some_and(|v| v > e.version));
                            if let Some(v) = refused.filter(|_| outbid) {
                                // Our claim must be newer than the one the others took.
                                self.clock.advance(v);
                            }
                            if outbid
                                || held.and_then(|e| e.value.as_deref()) != Some(me.as_bytes())
                            {
                                writes.push(Write::put(&bucket, names::LEADER_AUTO, me.clone()));
                            }
                            let a = roles::assign(&view, &bucket, &commit.candidate, policy);
                            writes.extend(self.resign_roles(&bucket, &a.writes, outbid));
                            writes.extend(a.writes);
                            leading = true;
                        }
                    }
                }
            } else {
                self.proposer.stand_down();
            }
        }
        if !s.auto && matches!(s.role, Role::Master | Role::Worker) {
            // Manual mode: the asked-for role, as Kairos does without `auto`.
            let role = if s.role == Role::Master {
                names::ROLE_MASTER
            } else {
                names::ROLE_WORKER
            };
            if view.nodes.get(&me).and_then(|n| n.role.as_deref()) != Some(role) {
                writes.push(Write::put(&bucket, &names::role_key(&me), role));
            }
        }

        // `role set` requests: apply them as the leader or their target, drop ours once done.
        let me_req = requests::Me {
            uuid: &me,
            peer: self.me,
        };
        let applied = requests::pending(&self.ledger, &bucket, &me_req, leading);
        writes.retain(|w| {
            !applied
                .iter()
                .any(|a| a.key == w.key && a.bucket == w.bucket)
        });
        writes.extend(applied);

        // Our own role: follow the ledger; without dynamic roles, keep what was applied. Read
        // from the ledger itself, not the view: the view lists announced nodes only, and a node
        // whose announcement was deleted would rewrite its role in every pass without ever
        // seeing it (the write storm of issue 14).
        let ledger_role = view::role_of(&self.ledger, &bucket, &me).filter(|r| {
            let left_cluster = self
                .left
                .as_ref()
                .is_some_and(|l| tally.commit.as_ref().is_some_and(|c| c.same_cluster(l)));
            !(left_cluster
                && matches!(
                    r.as_str(),
                    names::ROLE_MASTER | names::ROLE_MASTER_CLUSTERINIT
                ))
        });
        match (&self.my_role, &ledger_role) {
            (Some(applied), other) if other.as_ref() != Some(applied) && !s.roles.dynamic => {
                writes.push(Write::put(&bucket, &names::role_key(&me), applied.clone()));
            }
            (_, Some(role)) if self.my_role.as_ref() != Some(role) => {
                self.my_role = Some(role.clone());
                self.events
                    .push_back(ClusterEvent::RoleAssigned { role: role.clone() });
            }
            (Some(_), None) => {
                self.my_role = None;
                self.events.push_back(ClusterEvent::RoleRemoved);
            }
            _ => {}
        }
        if s.auto && eligible && ready {
            if let Some(sp) = &split {
                self.merge_split(&tally, sp, &mut writes);
            } else {
                self.split_reported = None;
            }
            self.record_cluster(&tally, &mut writes);
        }
        let s = &self.settings;

        let refused = self.my_role.is_none()
            && s.role == Role::Master
            && self.master.as_ref().is_some_and(|m| *m != me)
            && view
                .nodes
                .values()
                .filter(|n| n.role.as_deref() == Some(names::ROLE_MASTER_HA))
                .count()
                >= s.roles.ha_masters;
        if refused && !self.refused {
            self.events.push_back(ClusterEvent::MasterRefused);
        }
        self.refused = refused;

        if let Some(master) = self.master.clone() {
            // Judged on fresh news only: a restarted node's view holds every other node silent
            // until its first sync (or, with nobody to sync with, the liveness timeout).
            let fresh = self.replication.is_synced()
                || self
                    .started
                    .is_some_and(|t| now >= t + self.settings.liveness_timeout);
            let lost = fresh && master != me && view.nodes.get(&master).is_some_and(|n| !n.live);
            if lost != self.master_lost {
                self.master_lost = lost;
                self.events.push_back(if lost {
                    ClusterEvent::MasterLost { uuid: master }
                } else {
                    ClusterEvent::MasterRecovered { uuid: master }
                });
            }
        }

        let others: Vec<String> = match &self.master {
            Some(master) => {
                // Master roles in the view, and masters that recorded another cluster than the
                // committed one (their master role is refused here: it is not the committed
                // master's, and a leader may have written another role over it).
                let mut others: BTreeSet<String> = view
                    .nodes
                    .iter()
                    .filter(|(uuid, n)| {
                        *uuid != master
                            && matches!(
                                n.role.as_deref(),
                                Some(names::ROLE_MASTER | names::ROLE_MASTER_CLUSTERINIT)
                            )
                    })
                    .map(|(uuid, _)| uuid.clone())
                    .collect();
                others.extend(
                    recorded
                        .iter()
                        .filter(|c| c.candidate != *master)
                        .map(|c| c.candidate.clone()),
                );
                others.into_iter().collect()
            }
            None => Vec::new(),
        };
        if others != self.second_masters {
            self.second_masters = others.clone();
            if let Some(master) = self.master.clone() {
                self.events
                    .push_back(ClusterEvent::SecondMaster { master, others });
            }
        }

        if let Some(ipam) = &mut self.ipam {
            let synced = ready;
            let mut events = Vec::new();
            ipam.update(now, &self.ledger, synced, &mut writes, &mut events);
            self.events
                .extend(events.into_iter().map(ClusterEvent::Address));
        }

        // Next check: settle ends, the alone-wait ends, or a live node may expire.
        let expiry = view
            .next_expiry_ms(&self.ledger, self.hlc_now_ms(), &self.liveness())
            .map(|ms| now + Duration::from_millis(ms.saturating_add(1)));
        let alone = (!ready)
            .then(|| self.started.map(|t| t + self.settings.settle))
            .flatten();
        let lone_wait = lone_at.filter(|_| self.master.is_none());
        self.check_at = [settle_wait, expiry, alone, lone_wait]
            .into_iter()
            .flatten()
            .filter(|t| *t > now)
            .min();
        self.view = view;
        writes
    }
}

/// Two clusters (or more) seen in one ledger: see [`Cluster::split`].
#[derive(Debug, Clone)]
struct Split {
    /// The cluster chosen first: the one kept.
    winner: election::Commit,
    /// Its age is within `p2p.auto.merge_window`: the others are merged into it now.
    merge: bool,
    /// Its age.
    age_ms: u64,
}

/// The master candidate a leader proposes when nobody accepted one yet: the live node that asked
/// for `master` with the highest rank, else the live `auto` node with the highest rank.
fn pick_candidate(view: &View) -> Option<String> {
    let best = |role: Role| {
        view.live_eligible()
            .filter(|(_, n)| n.asked == role)
            .max_by(|(a, na), (b, nb)| na.rank.cmp(&nb.rank).then_with(|| a.cmp(b)))
            .map(|(u, _)| u.clone())
    };
    best(Role::Master).or_else(|| best(Role::Auto))
}

/// A ledger write a component asks for; the cluster layer signs, stores and gossips it.
/// `Debug` shows the value's length only, as [`Entry`]'s does: values include the k3s token
/// and the kubeconfig.
#[derive(Clone, PartialEq, Eq)]
pub struct Write {
    /// The bucket.
    pub bucket: String,
    /// The key.
    pub key: String,
    /// The new value, or `None` to delete.
    pub value: Option<Vec<u8>>,
}

impl std::fmt::Debug for Write {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Write")
            .field("bucket", &self.bucket)
            .field("key", &self.key)
            .field("value_len", &self.value.as_ref().map(Vec::len))
            .finish()
    }
}

impl Write {
    /// `bucket/key = value`.
    pub fn put(bucket: &str, key: &str, value: impl Into<Vec<u8>>) -> Self {
        Self {
            bucket: bucket.to_string(),
            key: key.to_string(),
            value: Some(value.into()),
        }
    }

    /// Deletes `bucket/key`.
    pub fn delete(bucket: &str, key: &str) -> Self {
        Self {
            bucket: bucket.to_string(),
            key: key.to_string(),
            value: None,
        }
    }
}

/// FNV-32a of a string: Kairos picks its leader by the highest hash of the node uuid.
pub fn fnv32a(s: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in s.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv32a_matches_the_reference_vectors() {
        // From the FNV reference test suite.
        assert_eq!(fnv32a(""), 0x811c_9dc5);
        assert_eq!(fnv32a("a"), 0xe40c_292c);
        assert_eq!(fnv32a("foobar"), 0xbf9c_f968);
    }
}
