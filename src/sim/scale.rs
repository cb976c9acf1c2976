//! The scale scenario of issue 16: many nodes of one token, split into several clusters
//! (`network_id`s), started within a second, on subnets of 100 hosts joined through the DHT from
//! one bootstrap node. Shared by the simulator benchmark (1,000 nodes) and the `sim_scale` test
//! (200 nodes).
//!
//! Node `i` sits on subnet `i / 100` and belongs to cluster `i % clusters`, so every cluster
//! spans every subnet and must be found beyond its LAN. VPN addresses are network-wide: the
//! scenario gives the token a /20 ([`VPN_NETWORK`]), as a network of 1,000 nodes needs (the
//! default /24 holds 254).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use crate::cluster::ClusterSettings;
use crate::cluster::replication::ReplicationStats;
use crate::config::Ipv4Cidr;
use crate::ledger::names;

use super::idle::IdleTraffic;
use super::{Action, HostId, LinkParams, Sim, SimConfig, SimError};

/// The VPN network of the scenario's token (`vpn.address`).
pub const VPN_NETWORK: Ipv4Cidr = Ipv4Cidr {
    addr: Ipv4Addr::new(10, 1, 0, 1),
    prefix_len: 20,
};

/// Hosts per subnet (one LAN broadcast domain).
pub const HOSTS_PER_SUBNET: usize = 100;

/// The shape of a scale run.
#[derive(Debug, Clone, Copy)]
pub struct ScaleSpec {
    /// Seeds the run.
    pub seed: u64,
    /// Clusters (`network_id`s) sharing the token.
    pub clusters: usize,
    /// Nodes per cluster.
    pub per_cluster: usize,
    /// Nodes start at random within this (after the bootstrap node).
    pub start_spread: Duration,
    /// A run that has not formed by then (virtual time) stops.
    pub limit: Duration,
}

impl ScaleSpec {
    /// `clusters` × `per_cluster` nodes started within a second, 60 virtual seconds at most.
    #[must_use]
    pub fn new(seed: u64, clusters: usize, per_cluster: usize) -> Self {
        Self {
            seed,
            clusters,
            per_cluster,
            start_spread: Duration::from_secs(1),
            limit: Duration::from_secs(60),
        }
    }

    /// Total nodes.
    #[must_use]
    pub fn nodes(&self) -> usize {
        self.clusters * self.per_cluster
    }
}

/// One cluster's state at the end of a run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterOutcome {
    /// Nodes of the cluster.
    pub nodes: usize,
    /// Nodes holding a role.
    pub with_role: usize,
    /// Nodes holding a master role (`master`, `master/clusterinit`).
    pub masters: usize,
}

/// A scale run: the simulator with every node added and scheduled.
pub struct ScaleRun {
    /// The simulator.
    pub sim: Sim,
    /// Every node.
    pub hosts: Vec<HostId>,
    /// Each host's `network_id`.
    pub network_ids: Vec<String>,
    spec: ScaleSpec,
}

/// The `network_id` of cluster `c`.
#[must_use]
pub fn network_id(c: usize) -> String {
    format!("cluster-{c}")
}

impl ScaleRun {
    /// Builds the network of `spec` (nothing runs yet but the bootstrap node's start).
    pub fn new(spec: ScaleSpec) -> Result<Self, SimError> {
        let nodes = spec.nodes();
        let subnets = nodes.div_ceil(HOSTS_PER_SUBNET).max(1);
        // Nobody restarts: the ledgers' saves are encoded, their bytes not kept.
        let mut sim = Sim::new(SimConfig {
            keep_disks: false,
            ..SimConfig::new(spec.seed)
        });
        let net = sim.add_network();
        let lans = (0..subnets)
            .map(|_| sim.add_subnet(LinkParams::lan(), LinkParams::uplink()))
            .collect::<Result<Vec<_>, _>>()?;
        let mut settings = sim.default_settings(net)?;
        settings.dht = subnets > 1;
        let mut hosts = Vec::with_capacity(nodes);
        let mut network_ids = Vec::with_capacity(nodes);
        for i in 0..nodes {
            let h = sim.add_node(lans[i / HOSTS_PER_SUBNET], net, settings.clone())?;
            let mut cluster = ClusterSettings::defaults(&format!("node-{i:04}"));
            cluster.network_id = network_id(i % spec.clusters.max(1));
            if let Some(ipam) = &mut cluster.ipam {
                ipam.network = VPN_NETWORK;
            }
            network_ids.push(cluster.network_id.clone());
            sim.set_cluster(h, cluster);
            if i == 0 && subnets > 1 {
                sim.start(h)?;
                settings.bootstrap = vec![(
                    sim.addr(h)
                        .ok_or_else(|| SimError::Config("bootstrap address".into()))?,
                    sim.peer_id(h),
                )];
            } else {
                let spread = u64::try_from(spec.start_spread.as_millis())
                    .unwrap_or(1)
                    .max(1);
                let at = Duration::from_millis(sim.rng().below(spread));
                sim.schedule(at, Action::Start(h));
            }
            hosts.push(h);
        }
        Ok(Self {
            sim,
            hosts,
            network_ids,
            spec,
        })
    }

    /// Every cluster's outcome, by `network_id`.
    #[must_use]
    pub fn outcomes(&self) -> BTreeMap<String, ClusterOutcome> {
        let mut out: BTreeMap<String, ClusterOutcome> = BTreeMap::new();
        for (h, id) in self.hosts.iter().zip(&self.network_ids) {
            let o = out.entry(id.clone()).or_default();
            o.nodes += 1;
            let role = self
                .sim
                .node(*h)
                .and_then(|n| n.cluster())
                .and_then(|c| c.role());
            if let Some(role) = role {
                o.with_role += 1;
                if role == names::ROLE_MASTER || role == names::ROLE_MASTER_CLUSTERINIT {
                    o.masters += 1;
                }
            }
        }
        out
    }

    /// Ledger replication counters summed over the running nodes.
    #[must_use]
    pub fn replication_stats(&self) -> ReplicationStats {
        let mut sum = ReplicationStats::default();
        for s in self
            .hosts
            .iter()
            .filter_map(|h| self.sim.node(*h).and_then(|n| n.cluster()))
            .map(crate::cluster::Cluster::replication_stats)
        {
            sum.messages_in += s.messages_in;
            sum.messages_out += s.messages_out;
            sum.bytes_in += s.bytes_in;
            sum.bytes_out += s.bytes_out;
            sum.rejected += s.rejected;
            sum.entries_announced += s.entries_announced;
            sum.entries_asked += s.entries_asked;
            sum.entries_fresh += s.entries_fresh;
            sum.entries_stale += s.entries_stale;
            sum.entries_refused += s.entries_refused;
        }
        sum
    }

    /// What the running nodes' ledgers hold, summed.
    #[must_use]
    pub fn ledger_holdings(&self) -> LedgerHoldings {
        let mut sum = LedgerHoldings::default();
        let clusters: std::collections::BTreeSet<&str> =
            self.network_ids.iter().map(String::as_str).collect();
        for (h, id) in self.hosts.iter().zip(&self.network_ids) {
            let Some(ledger) = self
                .sim
                .node(*h)
                .and_then(|n| n.cluster())
                .map(|c| c.ledger())
            else {
                continue;
            };
            sum.nodes += 1;
            sum.entries += ledger.len() as u64;
            sum.bytes += ledger.total_bytes() as u64;
            sum.dhcp_claims += ledger.bucket(names::DHCP).count() as u64;
            for e in ledger.entries() {
                if e.bucket != *id && clusters.contains(e.bucket.as_str()) {
                    sum.other_clusters += 1;
                    if !e.key.ends_with(names::UUID_SUFFIX) {
                        sum.other_clusters_not_announcements += 1;
                    }
                }
            }
        }
        sum
    }

    /// Every node holds a role.
    #[must_use]
    pub fn all_have_roles(&self) -> bool {
        self.hosts.iter().all(|h| {
            self.sim
                .node(*h)
                .and_then(|n| n.cluster())
                .is_some_and(|c| c.role().is_some())
        })
    }

    /// Runs until every node holds a role (checked every 50 virtual ms) or the spec's limit;
    /// returns the virtual time of formation.
    pub fn run_until_formed(&mut self) -> Result<Option<Duration>, SimError> {
        let step = Duration::from_millis(50);
        while self.sim.now() < self.spec.limit {
            self.sim.run_for(step)?;
            if self.all_have_roles() {
                return Ok(Some(self.sim.now()));
            }
        }
        Ok(None)
    }

    /// Bytes sent per node per second over `idle` of virtual time from now, by what they carry.
    pub fn idle_bytes_per_node(&mut self, idle: Duration) -> Result<IdleTraffic, SimError> {
        super::idle::measure(&mut self.sim, &self.hosts, idle)
    }
}

/// Ledger contents summed over the running nodes ([`ScaleRun::ledger_holdings`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LedgerHoldings {
    /// Nodes counted.
    pub nodes: u64,
    /// Entries held (tombstones included).
    pub entries: u64,
    /// Bytes held, as the ledgers count them against their limit.
    pub bytes: u64,
    /// Entries held in another cluster's bucket (a `network_id` not the node's own).
    pub other_clusters: u64,
    /// Of those, the ones that are not a node's announcement (`<uuid>-uuid`, which every
    /// cluster exchanges: see `ledger::Scope`).
    pub other_clusters_not_announcements: u64,
    /// Address claims held (the `dhcp` bucket, network-wide).
    pub dhcp_claims: u64,
}

/// What a scale formation measured.
#[derive(Debug, Clone)]
pub struct ScaleReport {
    /// Virtual time from the first start until every node held a role (`None`: not by the
    /// limit).
    pub formed_at: Option<Duration>,
    /// Wall time of the run.
    pub wall: Duration,
    /// Simulator steps.
    pub steps: u64,
    /// Each cluster's outcome.
    pub clusters: BTreeMap<String, ClusterOutcome>,
    /// Ledger replication, summed over the nodes.
    pub replication: ReplicationStats,
    /// Ledger contents when formed (or at the limit), summed over the nodes.
    pub ledgers: LedgerHoldings,
}

/// Builds and runs `spec` until formed.
pub fn formation(spec: ScaleSpec) -> Result<(ScaleRun, ScaleReport), SimError> {
    let wall = Instant::now();
    let mut run = ScaleRun::new(spec)?;
    let formed_at = run.run_until_formed()?;
    let report = ScaleReport {
        formed_at,
        wall: wall.elapsed(),
        steps: run.sim.steps(),
        clusters: run.outcomes(),
        replication: run.replication_stats(),
        ledgers: run.ledger_holdings(),
    };
    Ok((run, report))
}
