//! Two sites that find each other late, with real agents in network namespaces (issue 13): each
//! site a LAN of two nodes behind its own NAT router (one a home router with a stateful firewall,
//! one plain MASQUERADE), plus a node with a public address that is the only entry in
//! `p2p.bootstrap_peers`, started after the sites. Every node has the same cloud-config
//! (defaults otherwise: `minimum_nodes` 2, no HA) and runs the k3s stand-in under its own root.
//!
//! - `late_bootstrap_node_gives_one_cluster`: two runs. The public node starts 10 s after the
//!   sites (within the discovery gate's bound: one election), then 35 s after them (past it:
//!   each site elects its own master, and the merge, `p2p.auto.merge_window` 600 s by default,
//!   must fold the younger cluster into the older one). Every time: one master, and exactly one
//!   k3s cluster (one stand-in `init: new` server still running; the other, in the second run,
//!   stopped by the merge with its server data moved aside), every node with a role.
//! - `a_split_older_than_the_merge_window_stays`: `p2p.auto.merge_window: 5` and the public node
//!   started 35 s after the sites (past the discovery gate's 20 s bound: each site elects its own
//!   master): once the sites meet, every node shows the second master in `/api/summary`, both
//!   k3s servers keep running, and it stays so.
//! - `a_wan_outage_heals_into_one_cluster`: every node up at once (one cluster), then site B's
//!   WAN link is cut (its router forwards nothing) for 20 s, twice `p2p.liveness_timeout` (10 s
//!   here), so each side counts the other dead and may elect its own master. Within 30 s of the
//!   link coming back the sites talk over the VPN again, and the young split is merged: one
//!   master, one running k3s cluster, every node with a role.

mod common;
mod standin;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{
    Host, Lab, NatKind, generate_token, pings, sh, unix_get, vpn_addr, wait_for, write_config,
};
use standin::{Record, STANDIN, read_log};

/// One agent host.
struct Node {
    host: Host,
    uuid: String,
}

impl Node {
    fn root(&self) -> PathBuf {
        self.host.dir.join("root")
    }

    fn summary(&self) -> Option<serde_json::Value> {
        let body = unix_get(&self.host.dir.join("state/api.sock"), "/api/summary");
        serde_json::from_str(&body).ok()
    }

    fn role(&self) -> String {
        self.summary()
            .and_then(|s| s["Role"].as_str().map(str::to_string))
            .unwrap_or_default()
    }

    fn second_masters(&self) -> Vec<String> {
        self.summary()
            .and_then(|s| {
                s["SecondMasters"].as_array().map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(str::to_string))
                        .collect()
                })
            })
            .unwrap_or_default()
    }

    /// Stand-in servers of a new cluster (`init: new`) that are still running.
    fn running_new_servers(&self) -> Vec<Record> {
        let running = standin::running(&self.root());
        read_log(&self.root())
            .into_iter()
            .filter(|r| r.created_cluster() && running.contains(&r.pid()))
            .collect()
    }

    /// Stand-in servers of a new cluster ever started here.
    fn new_servers_ever(&self) -> usize {
        read_log(&self.root())
            .iter()
            .filter(|r| r.created_cluster())
            .count()
    }

    fn log_has(&self, needle: &str) -> bool {
        std::fs::read_to_string(self.host.dir.join("agent.log"))
            .unwrap_or_default()
            .contains(needle)
    }
}

/// The lab: two NATed sites of two nodes and a public bootstrap node.
struct Sites {
    lab: Lab,
    config: String,
    public: Node,
    nodes: Vec<Node>,
    /// Site B's NAT router: where its WAN link is cut.
    router_b: Host,
}

impl Sites {
    fn new(test: &str, p2p_extra: &str) -> Sites {
        let mut lab = Lab::new(test);
        let public = lab.add_host(1, "192.0.2.100/24");
        let site_a = lab.add_nat_site(2, "192.0.2.11/24", "10.1.1.1/24", NatKind::HomeRouter);
        let site_b = lab.add_nat_site(3, "192.0.2.12/24", "10.1.2.1/24", NatKind::PlainMasquerade);
        let router_b = site_b.router.clone();
        let hosts = [
            lab.add_host_behind(&site_a, 4, "10.1.1.2/24"),
            lab.add_host_behind(&site_a, 5, "10.1.1.3/24"),
            lab.add_host_behind(&site_b, 6, "10.1.2.2/24"),
            lab.add_host_behind(&site_b, 7, "10.1.2.3/24"),
        ];
        let config = write_config(
            &lab.dir,
            "config.yaml",
            &format!(
                "#cloud-config\np2p:\n  network_token: \"{}\"\n  bootstrap_peers: \
                 [\"192.0.2.100:7120\"]\n{p2p_extra}",
                generate_token()
            ),
        );
        let name = lab.name.clone();
        let node = |host: Host, what: &str| Node {
            uuid: format!("{name}-{what}"),
            host,
        };
        let nodes = hosts
            .into_iter()
            .zip(["a1", "a2", "b1", "b2"])
            .map(|(h, w)| node(h, w))
            .collect();
        Sites {
            public: node(public, "public"),
            config: config.to_str().unwrap().to_string(),
            lab,
            nodes,
            router_b,
        }
    }

    fn start(&mut self, node: &Node) {
        let root = node.root();
        self.lab.spawn_with_env(
            &node.host,
            &["agent", "--config", &self.config],
            &[
                ("UUID", node.uuid.as_str()),
                ("KAIROS_P2P_ROOT", root.to_str().unwrap()),
                ("KAIROS_P2P_K3S", STANDIN),
            ],
        );
    }

    fn start_sites(&mut self) {
        let nodes = std::mem::take(&mut self.nodes);
        for n in &nodes {
            self.start(n);
        }
        self.nodes = nodes;
    }

    fn start_public(&mut self) {
        let public = Node {
            host: self.public.host.clone(),
            uuid: self.public.uuid.clone(),
        };
        self.start(&public);
    }

    fn all(&self) -> impl Iterator<Item = &Node> {
        std::iter::once(&self.public).chain(&self.nodes)
    }

    fn running_new_servers(&self) -> Vec<(String, Record)> {
        self.all()
            .flat_map(|n| {
                n.running_new_servers()
                    .into_iter()
                    .map(|r| (n.uuid.clone(), r))
            })
            .collect()
    }

    fn dump(&self) {
        for n in self.all() {
            let log = std::fs::read_to_string(n.host.dir.join("agent.log")).unwrap_or_default();
            let lines: Vec<&str> = log
                .lines()
                .filter(|l| !l.contains(" DEBUG ") && !l.contains(" TRACE "))
                .collect();
            eprintln!(
                "--- {} ({}) role {:?} ---\n{}\n  stand-in:\n{}",
                n.uuid,
                n.host.ns,
                n.role(),
                lines.join("\n"),
                standin::describe(&read_log(&n.root()))
            );
        }
    }
}

/// One run: the sites boot, the public node `late` later; one master and one k3s cluster, after a
/// merge when `merged` (each site elects its own master before they meet).
fn one_cluster_with_a_late_bootstrap_node(run: usize, late: Duration, merged: bool) -> Duration {
    let mut sites = Sites::new(&format!("sites{run}"), "");
    let t0 = Instant::now();
    sites.start_sites();
    if merged {
        let split = wait_for(late, || sites.running_new_servers().len() == 2);
        if split.is_none() {
            sites.dump();
            panic!("run {run}: each site should have formed its own cluster first");
        }
    }
    std::thread::sleep(late.saturating_sub(t0.elapsed()));
    sites.start_public();
    // Every node holds a role and runs k3s, and exactly one new-cluster server runs.
    let formed = wait_for(Duration::from_secs(60), || {
        sites
            .all()
            .all(|n| !n.role().is_empty() && !standin::running(&n.root()).is_empty())
            && sites.running_new_servers().len() == 1
    });
    if formed.is_none() {
        sites.dump();
        panic!("run {run}: no single cluster within 60 s of the public node's start");
    }
    let took = t0.elapsed();
    // It holds: still one running server a few seconds later, every node under its master.
    std::thread::sleep(Duration::from_secs(3));
    let servers = sites.running_new_servers();
    if servers.len() != 1 {
        sites.dump();
        panic!("run {run}: {} new-cluster servers running", servers.len());
    }
    let master = servers[0].0.clone();
    let masters: Vec<&str> = sites
        .all()
        .filter(|n| matches!(n.role().as_str(), "master" | "master/clusterinit"))
        .map(|n| n.uuid.as_str())
        .collect();
    assert_eq!(masters, vec![master.as_str()], "run {run}: one master");
    let was_split = merged;
    let merged: Vec<&str> = sites
        .all()
        .filter(|n| n.new_servers_ever() > n.running_new_servers().len())
        .map(|n| n.uuid.as_str())
        .collect();
    for n in sites.all() {
        if merged.contains(&n.uuid.as_str()) {
            // A site elected alone before it met the other: its server was stopped by the
            // merge and its data moved aside (kept).
            assert!(
                n.log_has("left the cluster"),
                "{}: merged without leaving",
                n.uuid
            );
            let data = n.root().join("var/lib/rancher/k3s");
            let kept = std::fs::read_dir(&data)
                .into_iter()
                .flatten()
                .filter_map(Result::ok)
                .any(|e| {
                    e.file_name().to_string_lossy().starts_with("server.left-")
                        && e.path().join("node-token").exists()
                });
            assert!(kept, "{}: no server.left-* with the old data", n.uuid);
        }
    }
    if was_split {
        assert_eq!(merged.len(), 1, "run {run}: one master left its cluster");
    }
    eprintln!(
        "run {run}: one cluster (master {master}) {:.1} s after the sites started, {:.1} s \
         after the public node; servers stopped by a merge: {merged:?}",
        took.as_secs_f64(),
        took.as_secs_f64() - late.as_secs_f64()
    );
    took
}

#[test]
fn late_bootstrap_node_gives_one_cluster() {
    let within_gate = one_cluster_with_a_late_bootstrap_node(0, Duration::from_secs(10), false);
    let merged = one_cluster_with_a_late_bootstrap_node(1, Duration::from_secs(35), true);
    eprintln!("formation times: {within_gate:?} (one election), {merged:?} (split, merged)");
}

#[test]
fn a_split_older_than_the_merge_window_stays() {
    let mut sites = Sites::new("oldsplit", "  auto:\n    merge_window: 5\n");
    sites.start_sites();
    // Past the discovery gate's bound, each site elects its own master.
    let split = wait_for(Duration::from_secs(40), || {
        sites.running_new_servers().len() == 2
    });
    if split.is_none() {
        sites.dump();
        panic!("each site should have formed its own cluster without the bootstrap node");
    }
    std::thread::sleep(Duration::from_secs(6));
    sites.start_public();
    let everyone: Vec<&Node> = sites.nodes.iter().collect();
    let alarm = wait_for(Duration::from_secs(60), || {
        everyone.iter().all(|n| !n.second_masters().is_empty())
    });
    if alarm.is_none() {
        sites.dump();
        panic!("the second-master alarm never showed on every site node");
    }
    // It stays: both servers keep running, nothing was merged.
    std::thread::sleep(Duration::from_secs(5));
    let servers = sites.running_new_servers();
    if servers.len() != 2 || everyone.iter().any(|n| n.second_masters().is_empty()) {
        sites.dump();
        panic!("the split should stay: {} servers running", servers.len());
    }
    for n in &everyone {
        assert!(
            !n.log_has("left the cluster"),
            "{}: merged past the window",
            n.uuid
        );
    }
    assert!(
        everyone
            .iter()
            .any(|n| n.log_has("past p2p.auto.merge_window")),
        "the too-old split is reported"
    );
}

/// Whether one cluster holds: every node has a role and runs k3s, exactly one new-cluster server
/// runs, and one node holds a master role.
fn one_cluster(sites: &Sites) -> bool {
    sites
        .all()
        .all(|n| !n.role().is_empty() && !standin::running(&n.root()).is_empty())
        && sites.running_new_servers().len() == 1
        && sites
            .all()
            .filter(|n| matches!(n.role().as_str(), "master" | "master/clusterinit"))
            .count()
            == 1
}

#[test]
fn a_wan_outage_heals_into_one_cluster() {
    const VPN_IFACE: &str = "edgevpn0";
    let mut sites = Sites::new("wancut", "  liveness_timeout: 10\n");
    sites.start_public();
    sites.start_sites();
    if wait_for(Duration::from_secs(60), || one_cluster(&sites)).is_none() {
        sites.dump();
        panic!("no single cluster before the outage");
    }
    let addr = |n: &Node| vpn_addr(&n.host, VPN_IFACE).expect("a VPN address");
    let (a1, a2, b1, b2) = (
        &sites.nodes[0],
        &sites.nodes[1],
        &sites.nodes[2],
        &sites.nodes[3],
    );
    let (a2_vpn, b1_vpn) = (addr(a2), addr(b1));
    assert!(
        wait_for(Duration::from_secs(10), || pings(&a1.host, &b1_vpn)).is_some(),
        "site A reaches site B over the VPN before the outage"
    );

    // The outage: site B's router forwards nothing to or from its WAN side.
    let router = sites.router_b.ns.clone();
    let rule = |op: &str, dir: &str| {
        let dir = format!("-{dir}");
        sh(&[
            "ip", "netns", "exec", &router, "iptables", op, "FORWARD", &dir, "eth0", "-j", "DROP",
        ])
        .unwrap()
    };
    rule("-I", "i");
    rule("-I", "o");
    assert!(
        wait_for(Duration::from_secs(5), || !pings(&a1.host, &b1_vpn)).is_some(),
        "the cut stops the VPN between the sites"
    );
    std::thread::sleep(Duration::from_secs(20));
    rule("-D", "i");
    rule("-D", "o");
    let restored = Instant::now();

    // Within 30 s of the path coming back, the sites talk over the VPN again.
    let talk = wait_for(Duration::from_secs(30), || {
        pings(&a1.host, &b1_vpn) && pings(&b2.host, &a2_vpn)
    });
    if talk.is_none() {
        sites.dump();
        panic!("the sites did not find each other within 30 s of the link coming back");
    }
    // And one cluster again (a split during the outage is young: it is merged).
    if wait_for(Duration::from_secs(60), || one_cluster(&sites)).is_none() {
        sites.dump();
        panic!("not one cluster after the outage");
    }
    let healed = restored.elapsed();
    std::thread::sleep(Duration::from_secs(3));
    if !one_cluster(&sites) {
        sites.dump();
        panic!("one cluster did not hold after the outage");
    }
    eprintln!(
        "outage of 20 s: the sites talk again {:.1} s and form one cluster {:.1} s after the \
         link came back",
        talk.unwrap().as_secs_f64(),
        healed.as_secs_f64()
    );
}
