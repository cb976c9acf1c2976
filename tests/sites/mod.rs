//! The two-sites lab of `tests/netns_sites.rs` and `cargo bench --bench sites`: two sites, each
//! a LAN of two nodes behind its own NAT router (site A a home router with a stateful firewall,
//! site B plain MASQUERADE), plus a node with a public address that is the only entry in
//! `p2p.bootstrap_peers`. Every node has the same cloud-config (defaults otherwise:
//! `minimum_nodes` 2, no HA) and runs the k3s stand-in under its own root.

#![allow(dead_code)] // The test and the bench use different parts.

use std::path::PathBuf;

use crate::common::{Host, Lab, NatKind, generate_token, unix_get, write_config};
use crate::standin::{self, Record, STANDIN, read_log};

/// One agent host.
pub struct Node {
    pub host: Host,
    pub uuid: String,
}

impl Node {
    pub fn root(&self) -> PathBuf {
        self.host.dir.join("root")
    }

    pub fn summary(&self) -> Option<serde_json::Value> {
        let body = unix_get(&self.host.dir.join("state/api.sock"), "/api/summary");
        serde_json::from_str(&body).ok()
    }

    pub fn role(&self) -> String {
        self.summary()
            .and_then(|s| s["Role"].as_str().map(str::to_string))
            .unwrap_or_default()
    }

    pub fn second_masters(&self) -> Vec<String> {
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
    pub fn running_new_servers(&self) -> Vec<Record> {
        let running = standin::running(&self.root());
        read_log(&self.root())
            .into_iter()
            .filter(|r| r.created_cluster() && running.contains(&r.pid()))
            .collect()
    }

    /// Stand-in servers of a new cluster ever started here.
    pub fn new_servers_ever(&self) -> usize {
        read_log(&self.root())
            .iter()
            .filter(|r| r.created_cluster())
            .count()
    }

    pub fn log_has(&self, needle: &str) -> bool {
        std::fs::read_to_string(self.host.dir.join("agent.log"))
            .unwrap_or_default()
            .contains(needle)
    }
}

/// The lab: two NATed sites of two nodes and a public bootstrap node.
pub struct Sites {
    pub lab: Lab,
    pub config: String,
    pub public: Node,
    pub nodes: Vec<Node>,
    /// Site B's NAT router: where its WAN link is cut.
    pub router_b: Host,
    /// Running agents: uuid and the lab's child index.
    agents: Vec<(String, usize)>,
}

impl Sites {
    pub fn new(test: &str, p2p_extra: &str) -> Sites {
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
            agents: Vec::new(),
        }
    }

    pub fn start(&mut self, node: &Node) {
        let root = node.root();
        let index = self.lab.spawn_with_env(
            &node.host,
            &["agent", "--config", &self.config],
            &[
                ("UUID", node.uuid.as_str()),
                ("KAIROS_P2P_ROOT", root.to_str().unwrap()),
                ("KAIROS_P2P_K3S", STANDIN),
            ],
        );
        self.agents.push((node.uuid.clone(), index));
    }

    /// Stops the agent of `uuid` (SIGTERM: it stops its supervised k3s too).
    pub fn stop(&mut self, uuid: &str) {
        let Some(at) = self.agents.iter().rposition(|(u, _)| u == uuid) else {
            return;
        };
        let (_, index) = self.agents.remove(at);
        self.lab.stop(index);
    }

    /// The node of `uuid`.
    pub fn node(&self, uuid: &str) -> Option<&Node> {
        self.all().find(|n| n.uuid == uuid)
    }

    pub fn start_sites(&mut self) {
        let nodes = std::mem::take(&mut self.nodes);
        for n in &nodes {
            self.start(n);
        }
        self.nodes = nodes;
    }

    pub fn start_public(&mut self) {
        let public = Node {
            host: self.public.host.clone(),
            uuid: self.public.uuid.clone(),
        };
        self.start(&public);
    }

    pub fn all(&self) -> impl Iterator<Item = &Node> {
        std::iter::once(&self.public).chain(&self.nodes)
    }

    pub fn running_new_servers(&self) -> Vec<(String, Record)> {
        self.all()
            .flat_map(|n| {
                n.running_new_servers()
                    .into_iter()
                    .map(|r| (n.uuid.clone(), r))
            })
            .collect()
    }

    pub fn dump(&self) {
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

/// Whether one cluster holds: every node has a role and runs k3s, exactly one new-cluster server
/// runs, and one node holds a master role.
pub fn one_cluster(sites: &Sites) -> bool {
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
