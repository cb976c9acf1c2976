//! Sites that find each other late, in the deterministic simulator, over the full stack (QUIC
//! overlay, LAN beacons, DHT, ledger replication, election): the discovery gate must keep every
//! site from electing a master of its own before it has met the others.
//!
//! Every scenario: two sites, each a LAN (fast links) of 1 to 5 nodes behind its own NAT box,
//! with 20% loss on each site's uplink (the WAN), and a node with a public address that is the
//! only bootstrap peer. That node is either a member of the network (its own cluster layer, as in
//! a user's set-up) or a plain DHT node of another network ("DHT only": it can relay nothing and
//! read no record; the sites are then behind cone NATs, which they can cross by themselves).
//! Every node has the default cluster settings (`minimum_nodes` 2, no HA).
//!
//! - `a_site_started_late_joins_the_first_one`: the second site boots 0 to 60 s after the first.
//! - `a_bootstrap_node_started_late_is_waited_for`: both sites boot at once, the bootstrap node
//!   0 to 15 s later (within the gate's bound, `DISCOVERY_WAIT`, minus a margin for 20% loss).
//! - `a_site_whose_uplink_comes_up_late_joins`: a site's uplink is cut at boot and restored 0 to
//!   60 s later: within the gate's bound the sites form one cluster at once; past it each site
//!   of two nodes or more elects its own master, and the merge (`p2p.auto.merge_window`, 600 s)
//!   must fold the younger cluster into the older one.
//! - `a_split_older_than_the_window_stays`: the same cut, 30 to 40 s, with a merge window of 5 s:
//!   a split that formed is not merged; both masters keep their role and every node raises the
//!   second-master alarm.
//!
//! Properties: a second master may form (a site cut off past the gate's bound), but within the
//! merge window every node ends in one cluster, with exactly one node holding a master role (so
//! never two masters whose k3s both stay running past the merge), and every master role taken by
//! a second node was given up again by leaving its cluster (the k3s layer then stops the k3s
//! server and moves its data aside); past the window, nothing is merged and the alarm stays. Seeds: `SIM_SEED=<n>` replays one (a failure prints the command); `SIM_SEEDS=<count>`
//! sets how many run: 3 per scenario in debug builds (the plain `cargo test` pass) and 1,000 in
//! optimised ones (`make sim-properties`, `--profile sim`).

use std::time::Duration;

use kairos_p2p::cluster::ClusterSettings;
use kairos_p2p::node::NodeSettings;
use kairos_p2p::sim::seed::run_seeded;
use kairos_p2p::sim::{
    Action, HostId, LinkParams, NatKind, NatSettings, NetId, Sim, SimConfig, SubnetId,
};

const TARGET: &str = env!("CARGO_CRATE_NAME");

fn seeds() -> Vec<u64> {
    let count = std::env::var("SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(if cfg!(debug_assertions) { 3 } else { 1000 });
    (1..=count).collect()
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn ms(m: u64) -> Duration {
    Duration::from_millis(m)
}

/// Loss on each site's uplink.
const WAN_LOSS: f64 = 0.2;

/// What the public bootstrap node is.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Bootstrap {
    /// A member of the network, with the cluster layer (it may be elected, it relays).
    Member,
    /// A DHT node of another network.
    DhtOnly,
}

/// Two sites and a public bootstrap node.
struct Lab {
    sim: Sim,
    boot: HostId,
    sites: [Vec<HostId>; 2],
    site_nets: [SubnetId; 2],
    /// Every node with the cluster layer, with its uuid.
    members: Vec<(HostId, String)>,
}

impl Lab {
    fn new(seed: u64, bootstrap: Bootstrap) -> Self {
        Self::with_sizes(seed, bootstrap, None, None)
    }

    /// Two sites of `sizes` nodes (random, 1 to 5, when `None`), with `cluster` settings changed
    /// by `tune` on every member.
    fn with_sizes(
        seed: u64,
        bootstrap: Bootstrap,
        sizes: Option<[usize; 2]>,
        tune: Option<fn(&mut ClusterSettings)>,
    ) -> Self {
        let mut config = SimConfig::new(seed);
        config.record_events = std::env::var_os("SIM_EVENTS").is_some();
        config.allow_second_masters = true;
        let mut sim = Sim::new(config);
        let net = sim.add_network();
        let public = sim
            .add_subnet(LinkParams::lan(), LinkParams::uplink())
            .unwrap();
        let wan = LinkParams::uplink().with_loss(WAN_LOSS);
        // With a member to relay through, one site may be behind a symmetric NAT.
        let second_nat = if bootstrap == Bootstrap::Member && sim.rng().below(2) == 0 {
            NatKind::Symmetric
        } else {
            NatKind::Cone
        };
        // Without one, two sites behind port-restricted NATs only meet when both dial at once,
        // which nothing coordinates: the second site has a public address then.
        let second_site = match bootstrap {
            Bootstrap::Member => {
                sim.add_nat_subnet(NatSettings::new(second_nat), LinkParams::lan(), wan)
            }
            Bootstrap::DhtOnly => sim.add_subnet(LinkParams::lan(), wan),
        };
        let site_nets = [
            sim.add_nat_subnet(NatSettings::new(NatKind::Cone), LinkParams::lan(), wan)
                .unwrap(),
            second_site.unwrap(),
        ];
        let mut members = Vec::new();
        let boot = match bootstrap {
            Bootstrap::Member => {
                let h = sim
                    .add_node(public, net, sim.default_settings(net).unwrap())
                    .unwrap();
                let mut cluster = ClusterSettings::defaults("public");
                if let Some(tune) = tune {
                    tune(&mut cluster);
                }
                sim.set_cluster(h, cluster);
                members.push((h, "public".to_string()));
                h
            }
            Bootstrap::DhtOnly => {
                let other = sim.add_network();
                sim.add_node(public, other, sim.default_settings(other).unwrap())
                    .unwrap()
            }
        };
        let mut lab = Self {
            sim,
            boot,
            sites: [Vec::new(), Vec::new()],
            site_nets,
            members,
        };
        for site in 0..2 {
            let size = match sizes {
                Some(s) => s[site],
                None => 1 + lab.sim.rng().below(5) as usize,
            };
            for i in 0..size {
                lab.add_site_node(net, site, i, tune);
            }
        }
        lab
    }

    fn add_site_node(
        &mut self,
        net: NetId,
        site: usize,
        i: usize,
        tune: Option<fn(&mut ClusterSettings)>,
    ) {
        let mut settings: NodeSettings = self.sim.default_settings(net).unwrap();
        settings.bootstrap = vec![(self.sim.addr(self.boot).unwrap(), None)];
        let h = self
            .sim
            .add_node(self.site_nets[site], net, settings)
            .unwrap();
        let uuid = format!("site{site}-{i}");
        let mut cluster = ClusterSettings::defaults(&uuid);
        if let Some(tune) = tune {
            tune(&mut cluster);
        }
        self.sim.set_cluster(h, cluster);
        self.sites[site].push(h);
        self.members.push((h, uuid));
    }

    /// Starts the nodes of `site` within 500 ms after `at` (LAN neighbours boot together).
    fn start_site(&mut self, site: usize, at: Duration) {
        for h in self.sites[site].clone() {
            let jitter = ms(self.sim.rng().below(500));
            self.sim.schedule(at + jitter, Action::Start(h));
        }
    }

    fn run_until(&mut self, until: Duration) {
        if let Err(e) = self.sim.run_until(until) {
            self.dump();
            panic!("{e} (SIM_EVENTS=1 prints the cluster events)");
        }
    }

    fn dump(&self) {
        for (t, h, event) in self.sim.events() {
            if let kairos_p2p::node::NodeEvent::Cluster(c) = event {
                eprintln!("{t:?} host {}: {c}", h.0);
            }
        }
        for (h, uuid) in &self.members {
            let c = self.sim.node(*h).and_then(|n| n.cluster());
            eprintln!(
                "host {} {uuid}: running {} role {:?} leader {:?} master {:?} live {:?} \
                 connected {:?}",
                h.0,
                self.sim.is_running(*h),
                c.and_then(|c| c.role()),
                c.and_then(|c| c.leader()),
                c.and_then(|c| c.master()),
                c.map(|c| c.view().live_eligible_count()),
                self.sim.node(*h).map(|n| n.connected().len()),
            );
            if let Some(c) = c {
                for (k, v) in c.ledger().bucket("kairos") {
                    if k.ends_with("-cluster") || k == "master-commit" || k.ends_with("-role") {
                        eprintln!("  {k} = {}", String::from_utf8_lossy(v));
                    }
                }
            }
            if let Some(n) = self.sim.node(*h) {
                let members: Vec<String> = n
                    .members()
                    .iter()
                    .map(|(p, m)| {
                        format!(
                            "{}:{:?}:{}",
                            self.sim.host_of(p).map_or(usize::MAX, |h| h.0),
                            m.source,
                            n.connected().contains_key(p)
                        )
                    })
                    .collect();
                eprintln!(
                    "  members {members:?} bootstrap {:?} rendezvous converged {:?} gate {:?} \
                     settled {}",
                    n.kad().map(|k| k.bootstrap_reached()),
                    n.kad().map(|k| k.rendezvous_converged()),
                    n.cluster().map(|c| c.election_gate_open()),
                    n.discovery_settled(self.sim.instant()),
                );
            }
        }
    }

    /// The master every running member agrees on, once each holds a role and no other member
    /// holds a master role.
    fn one_cluster(&self) -> Option<String> {
        let mut master = None;
        for (h, _) in &self.members {
            let c = self.sim.node(*h)?.cluster()?;
            c.role()?;
            let m = c.master()?;
            if master.get_or_insert(m) != &m {
                return None;
            }
        }
        let master = master?;
        let masters = self.master_holders();
        (masters.len() == 1 && masters[0] == master).then(|| master.to_string())
    }

    /// The members holding `master` or `master/clusterinit` (their k3s server runs).
    fn master_holders(&self) -> Vec<String> {
        self.members
            .iter()
            .filter(|(h, _)| {
                self.sim
                    .node(*h)
                    .and_then(|n| n.cluster())
                    .and_then(|c| c.role())
                    .is_some_and(|r| r == "master" || r == "master/clusterinit")
            })
            .map(|(_, u)| u.clone())
            .collect()
    }

    /// Times members left their cluster in a merge.
    fn clusters_left(&self) -> u64 {
        self.members
            .iter()
            .filter_map(|(h, _)| self.sim.node(*h).and_then(|n| n.cluster()))
            .map(|c| c.left_clusters())
            .sum()
    }

    /// Runs until every member holds a role under one master, or panics at `until`.
    fn run_until_one_cluster(&mut self, until: Duration) -> Duration {
        loop {
            if self.one_cluster().is_some() {
                return self.sim.now();
            }
            if self.sim.now() >= until {
                self.dump();
                panic!(
                    "not one cluster at {:?} (sites of {} and {} nodes)",
                    self.sim.now(),
                    self.sites[0].len(),
                    self.sites[1].len()
                );
            }
            let next = (self.sim.now() + ms(250)).min(until);
            self.run_until(next);
        }
    }

    fn finish(&mut self, formed: Duration) {
        self.run_until(formed + secs(10));
        if self.sim.config().record_events {
            self.dump();
        }
        assert!(self.one_cluster().is_some(), "the cluster came apart");
        self.sim.check_invariants().unwrap();
        // Every master role a second node took was given up by leaving (k3s reset).
        assert_eq!(
            self.clusters_left(),
            self.sim.second_masters_taken(),
            "second masters taken vs clusters left"
        );
    }
}

fn bootstrap_kind(seed: u64) -> Bootstrap {
    if seed % 2 == 0 {
        Bootstrap::Member
    } else {
        Bootstrap::DhtOnly
    }
}

#[test]
fn a_site_started_late_joins_the_first_one() {
    run_seeded(
        TARGET,
        "a_site_started_late_joins_the_first_one",
        &seeds(),
        |seed| {
            let mut lab = Lab::new(seed, bootstrap_kind(seed));
            lab.sim.schedule(Duration::ZERO, Action::Start(lab.boot));
            let delay = ms(lab.sim.rng().below(60_000));
            lab.start_site(0, ms(100));
            lab.start_site(1, delay);
            let formed = lab.run_until_one_cluster(delay + secs(240));
            lab.finish(formed);
        },
    );
}

#[test]
fn a_bootstrap_node_started_late_is_waited_for() {
    run_seeded(
        TARGET,
        "a_bootstrap_node_started_late_is_waited_for",
        &seeds(),
        |seed| {
            let mut lab = Lab::new(seed, bootstrap_kind(seed));
            let delay = ms(lab.sim.rng().below(12_000));
            lab.start_site(0, ms(100));
            lab.start_site(1, ms(100));
            lab.sim.schedule(delay, Action::Start(lab.boot));
            let formed = lab.run_until_one_cluster(delay + secs(240));
            lab.finish(formed);
        },
    );
}

#[test]
fn a_site_whose_uplink_comes_up_late_joins() {
    run_seeded(
        TARGET,
        "a_site_whose_uplink_comes_up_late_joins",
        &seeds(),
        |seed| {
            let mut lab = Lab::new(seed, bootstrap_kind(seed));
            lab.sim.schedule(Duration::ZERO, Action::Start(lab.boot));
            let cut_site = lab.sim.rng().below(2) as usize;
            let others: Vec<HostId> = lab
                .sim
                .node_hosts()
                .filter(|h| !lab.sites[cut_site].contains(h))
                .collect();
            let cut = lab.sim.partition(&lab.sites[cut_site], &others, true);
            let delay = ms(lab.sim.rng().below(60_000));
            lab.start_site(0, ms(100));
            lab.start_site(1, ms(100));
            lab.sim.schedule(delay, Action::Heal(cut));
            let formed = lab.run_until_one_cluster(delay + secs(240));
            lab.finish(formed);
        },
    );
}

#[test]
fn a_split_older_than_the_window_stays() {
    run_seeded(
        TARGET,
        "a_split_older_than_the_window_stays",
        &seeds(),
        |seed| {
            let sizes = [2, 2];
            let tune: fn(&mut ClusterSettings) = |c| c.merge_window = secs(5);
            let mut lab = Lab::with_sizes(seed, bootstrap_kind(seed), Some(sizes), Some(tune));
            lab.sim.schedule(Duration::ZERO, Action::Start(lab.boot));
            let others: Vec<HostId> = lab
                .sim
                .node_hosts()
                .filter(|h| !lab.sites[0].contains(h))
                .collect();
            let cut = lab.sim.partition(&lab.sites[0], &others, true);
            let delay = ms(30_000 + lab.sim.rng().below(10_000));
            lab.start_site(0, ms(100));
            lab.start_site(1, ms(100));
            lab.sim.schedule(delay, Action::Heal(cut));
            lab.run_until(delay);
            // Until every member raises the alarm (the sites met), or they form one cluster
            // (they met before either elected: nothing to merge).
            let alarm_everywhere = |lab: &Lab| {
                lab.members.iter().all(|(h, _)| {
                    lab.sim
                        .node(*h)
                        .and_then(|n| n.cluster())
                        .is_some_and(|c| !c.second_masters().is_empty())
                })
            };
            let until = delay + secs(120);
            while !alarm_everywhere(&lab) && lab.one_cluster().is_none() {
                if lab.sim.now() >= until {
                    lab.dump();
                    panic!("neither the alarm on every node nor one cluster at {until:?}");
                }
                let next = (lab.sim.now() + ms(250)).min(until);
                lab.run_until(next);
            }
            // It stays.
            let settled = lab.sim.now();
            lab.run_until(settled + secs(10));
            let masters = lab.master_holders();
            assert_eq!(lab.clusters_left(), 0, "nothing merged past the window");
            if lab.sim.second_masters_taken() == 0 {
                assert!(lab.one_cluster().is_some(), "masters {masters:?}");
                return;
            }
            assert_eq!(
                masters.len(),
                2,
                "both masters keep their role: {masters:?}"
            );
            for (h, uuid) in &lab.members {
                let c = lab.sim.node(*h).and_then(|n| n.cluster()).unwrap();
                assert!(
                    !c.second_masters().is_empty(),
                    "{uuid}: the second-master alarm is not on (masters {masters:?})"
                );
            }
        },
    );
}

/// Median and max of `times`, in seconds.
fn median_max(mut times: Vec<Duration>) -> (f64, f64) {
    times.sort();
    let median = times[times.len() / 2].as_secs_f64();
    let max = times.last().map_or(0.0, Duration::as_secs_f64);
    (median, max)
}

/// Prints how long a cluster takes to form (every node holds a role under one master), in
/// virtual time from the first start, over 20 seeds: 4 nodes on one LAN with the DHT off and on
/// (no bootstrap peer), and two NATed sites of 2 nodes with a public member as bootstrap peer,
/// without loss and with 20% loss on the WAN. The discovery gate's cost shows in these numbers;
/// `make bench` measures real agents.
#[test]
fn formation_times() {
    let runs: u64 = if cfg!(debug_assertions) { 5 } else { 20 };
    let one_lan = |seed: u64, dht: bool| {
        let mut sim = Sim::new(SimConfig::new(seed));
        let net = sim.add_network();
        let lan = sim
            .add_subnet(LinkParams::lan(), LinkParams::uplink())
            .unwrap();
        let mut members = Vec::new();
        for i in 0..4 {
            let mut settings = sim.default_settings(net).unwrap();
            settings.dht = dht;
            let h = sim.add_node(lan, net, settings).unwrap();
            sim.set_cluster(h, ClusterSettings::defaults(&format!("n{i}")));
            let at = ms(sim.rng().below(500));
            sim.schedule(at, Action::Start(h));
            members.push((h, format!("n{i}")));
        }
        let mut lab = Lab {
            sim,
            boot: members[0].0,
            sites: [Vec::new(), Vec::new()],
            site_nets: [lan, lan],
            members,
        };
        lab.run_until_one_cluster(secs(120))
    };
    let sites = |seed: u64, loss: bool| {
        let mut lab = Lab::new(seed, Bootstrap::Member);
        if !loss {
            for s in lab.site_nets {
                lab.sim.set_uplink(s, LinkParams::uplink());
            }
        }
        lab.sim.schedule(Duration::ZERO, Action::Start(lab.boot));
        lab.start_site(0, Duration::ZERO);
        lab.start_site(1, Duration::ZERO);
        lab.run_until_one_cluster(secs(240))
    };
    let cases: [(&str, &dyn Fn(u64) -> Duration); 4] = [
        ("one LAN, 4 nodes, DHT off", &|s| one_lan(s, false)),
        ("one LAN, 4 nodes, DHT on", &|s| one_lan(s, true)),
        ("two NATed sites + public bootstrap", &|s| sites(s, false)),
        ("two NATed sites + public bootstrap, 20% WAN loss", &|s| {
            sites(s, true)
        }),
    ];
    for (name, case) in cases {
        let times: Vec<Duration> = (1..=runs).map(case).collect();
        let (median, max) = median_max(times);
        println!("formation, {name}: median {median:.1} s, max {max:.1} s over {runs} seeds");
    }
}

/// On one LAN with more nodes than a node keeps neighbours (so connections keep coming after
/// every member is known), the gate opens [`DISCOVERY_SETTLE`] after the last member was found:
/// connections to known members are no news and do not hold it again. The cluster forms a
/// couple of election round trips later (virtual time).
#[test]
fn on_one_lan_the_gate_waits_for_members_not_for_connections() {
    use kairos_p2p::node::{DISCOVERY_SETTLE, NodeEvent};
    run_seeded(
        TARGET,
        "on_one_lan_the_gate_waits_for_members_not_for_connections",
        &seeds()[..seeds().len().min(50)],
        |seed| {
            let mut config = SimConfig::new(seed);
            config.record_events = true;
            let mut sim = Sim::new(config);
            let net = sim.add_network();
            let lan = sim
                .add_subnet(LinkParams::lan(), LinkParams::uplink())
                .unwrap();
            let mut hosts = Vec::new();
            let nodes = sim.default_settings(net).unwrap().neighbours + 4;
            for i in 0..nodes {
                let mut settings = sim.default_settings(net).unwrap();
                settings.dht = false;
                let h = sim.add_node(lan, net, settings).unwrap();
                sim.set_cluster(h, ClusterSettings::defaults(&format!("n{i}")));
                let at = ms(sim.rng().below(500));
                sim.schedule(at, Action::Start(h));
                hosts.push(h);
            }
            let mut formed = None;
            while formed.is_none() && sim.now() < secs(30) {
                let next = sim.now() + ms(10);
                sim.run_until(next).unwrap();
                let all = hosts.iter().all(|h| {
                    sim.node(*h)
                        .and_then(|n| n.cluster())
                        .is_some_and(|c| c.role().is_some())
                });
                formed = all.then(|| sim.now());
            }
            let formed = formed.expect("one cluster within 30 s");
            let last_found = sim
                .events()
                .iter()
                .filter(|(_, _, e)| matches!(e, NodeEvent::MemberDiscovered { .. }))
                .map(|(t, _, _)| *t)
                .max()
                .unwrap();
            let last_connected = sim
                .events()
                .iter()
                .filter(|(t, _, e)| *t < formed && matches!(e, NodeEvent::PeerConnected { .. }))
                .map(|(t, _, _)| *t)
                .max()
                .unwrap();
            assert!(
                formed <= last_found + DISCOVERY_SETTLE + ms(500),
                "formed at {formed:?}: the last member was found at {last_found:?}, the last \
                 connection before forming at {last_connected:?}"
            );
        },
    );
}
