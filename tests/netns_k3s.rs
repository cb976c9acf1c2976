//! k3s set-up end to end: real agents in network namespaces, each with its own root
//! (`KAIROS_P2P_ROOT`) and the k3s stand-in (`KAIROS_P2P_K3S=tests/k3s-standin`), which logs
//! what the agents asked of k3s. From one identical cloud-config: exactly one `k3s server`, the
//! others `k3s agent` pointed at it with its node token; HA with KubeVIP and with an external
//! datastore; forced roles, a late joiner, two `network_id`s on one token; every agent killed
//! mid-formation and restarted; the cluster on LAN addresses without the VPN.
//!
//! The contract these tests hold the agent to (issue 6): the master's `k3s server` writes
//! `<root>/var/lib/rancher/k3s/server/node-token` and `<root>/etc/rancher/k3s/k3s.yaml` and
//! listens on `<node ip>:6443`; the agent then publishes `ip-master`, the node token and
//! `master-kubeconfig` in the ledger, and the workers (`k3s agent`, `K3S_URL`, `K3S_TOKEN`,
//! `--with-node-id`) and HA masters (`k3s server --server URL`, `K3S_TOKEN`) start; with the VPN
//! every k3s gets `--node-ip <VPN address>` and `--flannel-iface edgevpn0`.

mod common;
mod standin;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{Host, Lab, generate_token, unix_get, wait_for, write_config};
use standin::{Record, STANDIN, read_log, secret_of};

/// How long a cluster may take to form (roles, k3s started everywhere).
const FORM_WITHIN: Duration = Duration::from_secs(60);
/// The VPN interface k3s is told to use.
const VPN_IFACE: &str = "edgevpn0";
/// Whether KubeVIP manifests are expected on every server (HA masters too), not only on the
/// cluster-init one (provider-kairos deploys them in its master set-up, HA or not).
const KUBEVIP_ON_EVERY_SERVER: bool = true;

/// The scenarios share two cores: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// One agent host of a test cluster.
struct Node {
    host: Host,
    uuid: String,
    /// Config files, in order (the shared one, then this node's own, if any).
    configs: Vec<String>,
    /// Lab child indices of this node's agent runs.
    runs: Vec<usize>,
    /// Stand-in log lines written before the current run.
    log_skip: usize,
}

impl Node {
    /// The node's root (`KAIROS_P2P_ROOT`): where its k3s writes.
    fn root(&self) -> PathBuf {
        self.host.dir.join("root")
    }

    /// The stand-in log, every run.
    fn standin_all(&self) -> Vec<Record> {
        read_log(&self.root())
    }

    /// The stand-in log of the current agent run.
    fn standin(&self) -> Vec<Record> {
        let mut all = self.standin_all();
        all.split_off(self.log_skip.min(all.len()))
    }

    /// The latest `ready` line of the current run (k3s up: server listening, agent joined).
    fn ready(&self) -> Option<Record> {
        self.standin().into_iter().rfind(|r| r.event() == "ready")
    }

    /// `/api/summary` of the node's agent (`Role`, `Address`, `UUID`, ...), if it answers.
    fn summary(&self) -> Option<serde_json::Value> {
        let body = unix_get(&self.host.dir.join("state/api.sock"), "/api/summary");
        serde_json::from_str(&body).ok()
    }

    fn summary_field(&self, key: &str) -> String {
        self.summary()
            .and_then(|s| s.get(key)?.as_str().map(str::to_string))
            .unwrap_or_default()
    }

    fn role(&self) -> String {
        self.summary_field("Role")
    }

    fn vpn_address(&self) -> String {
        self.summary_field("Address")
    }

    fn metrics(&self) -> String {
        unix_get(&self.host.dir.join("state/api.sock"), "/metrics")
    }
}

/// Agents in namespaces on one bridge, sharing one token.
struct Cluster {
    lab: Lab,
    token: String,
    subnet: String,
    shared_config: String,
    nodes: Vec<Node>,
    /// Hosts without an agent (a bridge), with their lab child index.
    others: Vec<(Host, usize)>,
}

impl Cluster {
    /// A lab with `count` hosts at `<subnet>.<i>/24` and one cloud-config for all:
    /// a fresh token, `disable_dht: true`, `p2p_extra` (lines indented under `p2p:`), then
    /// `top_extra` (top-level blocks such as `kubevip:`).
    fn new(test: &str, subnet: &str, count: usize, p2p_extra: &str, top_extra: &str) -> Cluster {
        let lab = Lab::new(test);
        let token = generate_token();
        let config = write_config(
            &lab.dir,
            "config.yaml",
            &format!(
                "#cloud-config\np2p:\n  network_token: \"{token}\"\n  disable_dht: true\n\
                 {p2p_extra}{top_extra}"
            ),
        );
        let mut cluster = Cluster {
            lab,
            token,
            subnet: subnet.to_string(),
            shared_config: config.to_str().unwrap().to_string(),
            nodes: Vec::new(),
            others: Vec::new(),
        };
        for _ in 0..count {
            cluster.add_node(None);
        }
        cluster
    }

    /// Adds an agent host (not started); `own` is a cloud-config body merged over the shared
    /// one for this node only.
    fn add_node(&mut self, own: Option<&str>) -> usize {
        let i = self.nodes.len() + 1;
        let host = self.lab.add_host(i, &format!("{}.{i}/24", self.subnet));
        std::fs::create_dir_all(host.dir.join("root")).unwrap();
        let mut configs = vec![self.shared_config.clone()];
        if let Some(body) = own {
            let path = write_config(&self.lab.dir, &format!("node{i}.yaml"), body);
            configs.push(path.to_str().unwrap().to_string());
        }
        self.nodes.push(Node {
            host,
            uuid: format!("netns-k3s-{}-node-{i}", self.lab.name),
            configs,
            runs: Vec::new(),
            log_skip: 0,
        });
        i - 1
    }

    /// Gives node `i` its own cloud-config on top of the shared one (before it starts).
    fn set_own_config(&mut self, i: usize, body: &str) {
        let path = write_config(&self.lab.dir, &format!("node{}.yaml", i + 1), body);
        self.nodes[i].configs = vec![
            self.shared_config.clone(),
            path.to_str().unwrap().to_string(),
        ];
    }

    /// Starts node `i`'s agent with its root and the stand-in.
    fn start(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        node.log_skip = read_log(&node.root()).len();
        let mut args = vec!["agent".to_string()];
        for c in &node.configs {
            args.extend(["--config".to_string(), c.clone()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let root = node.root();
        let root = root.to_str().unwrap();
        let index = self.lab.spawn_with_env(
            &node.host,
            &args,
            &[
                ("UUID", node.uuid.as_str()),
                ("KAIROS_P2P_ROOT", root),
                ("KAIROS_P2P_K3S", STANDIN),
            ],
        );
        node.runs.push(index);
    }

    fn start_all(&mut self) {
        for i in 0..self.nodes.len() {
            self.start(i);
        }
    }

    /// Node `i` crashes: its agent and its k3s killed with SIGKILL (a power cut).
    fn crash(&mut self, i: usize) {
        if let Some(&run) = self.nodes[i].runs.last() {
            self.lab.kill(run);
        }
        standin::kill_all(&self.nodes[i].root());
    }

    /// Waits until every node in `which` has a role and a running k3s (its stand-in `ready`
    /// in this run); panics with every node's state if that takes longer than `FORM_WITHIN`.
    fn wait_formed(&self, which: &[usize]) -> Duration {
        let formed = wait_for(FORM_WITHIN, || {
            which.iter().all(|&i| {
                let n = &self.nodes[i];
                n.ready().is_some() && !n.role().is_empty()
            })
        });
        formed.unwrap_or_else(|| {
            self.dump();
            panic!("the cluster did not form within {FORM_WITHIN:?} (state above)")
        })
    }

    /// Index of the only node whose current run is a `k3s server` without `--server`.
    fn master(&self) -> usize {
        let masters: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| {
                self.nodes[i]
                    .ready()
                    .is_some_and(|r| r.mode() == "server" && r.server_url().is_none())
            })
            .collect();
        if masters.len() != 1 {
            self.dump();
        }
        assert_eq!(masters.len(), 1, "exactly one first k3s server");
        masters[0]
    }

    /// Starts a `kairos-p2p bridge` in a new namespace; returns its host.
    fn start_bridge(&mut self) -> Host {
        let i = self.nodes.len() + self.others.len() + 1;
        let host = self.lab.add_host(i, &format!("{}.{i}/24", self.subnet));
        let token = self.token.clone();
        let index = self
            .lab
            .spawn_with_env(&host, &["bridge"], &[("NETWORK_TOKEN", &token)]);
        self.others.push((host.clone(), index));
        host
    }

    /// Every node's role, addresses, k3s stand-in log and agent log tail, on stderr.
    fn dump(&self) {
        for n in &self.nodes {
            let metrics = n.metrics();
            let k3s_metrics: Vec<&str> = metrics
                .lines()
                .filter(|l| l.starts_with("kairos_p2p_k3s") || l.starts_with("kairos_p2p_role"))
                .collect();
            let log = std::fs::read_to_string(n.host.dir.join("agent.log")).unwrap_or_default();
            let tail: Vec<&str> = log
                .lines()
                .filter(|l| {
                    l.contains(" INFO ")
                        || l.contains(" WARN ")
                        || l.contains(" ERROR ")
                        || l.contains("k3s")
                })
                .collect();
            let tail = &tail[tail.len().saturating_sub(40)..];
            eprintln!(
                "=== {} ({}) lan {} role {:?} vpn {:?}\n--- metrics\n{}\n--- stand-in log\n{}\n\
                 --- agent log (tail)\n{}",
                n.host.ns,
                n.uuid,
                n.host.ip,
                n.role(),
                n.vpn_address(),
                k3s_metrics.join("\n"),
                standin::describe(&n.standin_all()),
                tail.join("\n")
            );
        }
    }

    /// `kairos-p2p <args>` inside `host`'s namespace.
    fn run_in(host: &Host, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &host.ns, env!("CARGO_BIN_EXE_kairos-p2p")])
            .args(args)
            // The host's state and root, as its agent's: the client finds their socket and token.
            .envs(common::client_env(host))
            .output()
            .unwrap()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Agents first (so none restarts its k3s), then the k3s they left, by pid.
        for n in &self.nodes {
            for &run in &n.runs {
                self.lab.kill(run);
            }
        }
        for n in &self.nodes {
            standin::kill_all(&n.root());
        }
    }
}

/// The URL of a k3s API server at `ip`.
fn url(ip: &str) -> String {
    format!("https://{ip}:6443")
}

/// Checks that the current run of node `i` is a k3s agent of the server at `master_ip` whose
/// node token is `token`, on `node_ip` (and the VPN interface when `vpn`).
fn assert_agent_of(c: &Cluster, i: usize, master_ip: &str, token: &str, node_ip: &str, vpn: bool) {
    let n = &c.nodes[i];
    let r = n.ready().unwrap();
    let what = format!(
        "{} ({})",
        n.host.ns,
        standin::describe(std::slice::from_ref(&r))
    );
    assert_eq!(r.mode(), "agent", "{what}: runs k3s agent");
    assert_eq!(r.outcome(), "joined", "{what}");
    assert_eq!(
        r.server_url(),
        Some(url(master_ip)),
        "{what}: K3S_URL is the master"
    );
    let given = r.token().unwrap_or_default();
    assert_eq!(
        secret_of(&given),
        secret_of(token),
        "{what}: K3S_TOKEN is the master's node token"
    );
    assert!(r.has_flag("with-node-id"), "{what}: --with-node-id");
    assert_eq!(
        r.flag("node-ip").as_deref(),
        Some(node_ip),
        "{what}: --node-ip"
    );
    if vpn {
        assert_eq!(
            r.flag("flannel-iface").as_deref(),
            Some(VPN_IFACE),
            "{what}: --flannel-iface"
        );
    }
}

/// Every stand-in line of every node, every run.
fn all_records(c: &Cluster) -> Vec<(usize, Record)> {
    c.nodes
        .iter()
        .enumerate()
        .flat_map(|(i, n)| n.standin_all().into_iter().map(move |r| (i, r)))
        .collect()
}

/// Nodes that ever created a new k3s cluster (a `cluster-init` or a first sqlite/external-db
/// server), with the line.
fn cluster_creations(c: &Cluster) -> Vec<(usize, Record)> {
    all_records(c)
        .into_iter()
        .filter(|(_, r)| r.created_cluster())
        .collect()
}

/// The `/api/summary` role and VPN address of every node.
fn roles_and_addresses(c: &Cluster) -> Vec<(String, String)> {
    c.nodes
        .iter()
        .map(|n| (n.role(), n.vpn_address()))
        .collect()
}

#[test]
fn one_master_three_workers_from_one_config_and_kubeconfig_through_a_bridge() {
    let _serial = serial();
    let mut c = Cluster::new("k3s1m3w", "10.84.0", 4, "", "");
    let started = Instant::now();
    c.start_all();
    let took = c.wait_formed(&[0, 1, 2, 3]);
    eprintln!("formed in {took:?}");

    let m = c.master();
    let master = &c.nodes[m];
    let server = master.ready().unwrap();
    let master_ip = master.vpn_address();
    assert!(!master_ip.is_empty(), "the master has a VPN address");
    assert_eq!(
        master.role(),
        "master",
        "the k3s server is the elected master"
    );
    assert_eq!(
        server.init(),
        Some("new"),
        "a single master: no --cluster-init"
    );
    assert!(!server.has_flag("cluster-init"));
    assert_eq!(server.flag("node-ip"), Some(master_ip.clone()), "--node-ip");
    assert_eq!(server.flag("flannel-iface").as_deref(), Some(VPN_IFACE));
    let token = standin::node_token(&master.root()).expect("the master's node-token");
    for i in (0..4).filter(|&i| i != m) {
        assert_eq!(c.nodes[i].role(), "worker", "{}", c.nodes[i].host.ns);
        let own = c.nodes[i].vpn_address();
        assert_agent_of(&c, i, &master_ip, &token, &own, true);
        let servers: Vec<Record> = c.nodes[i]
            .standin_all()
            .into_iter()
            .filter(|r| r.mode() == "server")
            .collect();
        assert!(
            servers.is_empty(),
            "{}: a worker never ran k3s server: {}",
            c.nodes[i].host.ns,
            standin::describe(&servers)
        );
    }
    let addresses: BTreeSet<String> = c.nodes.iter().map(Node::vpn_address).collect();
    assert_eq!(addresses.len(), 4, "distinct VPN addresses: {addresses:?}");

    // The kubeconfig through a bridge in a fifth namespace: the master's, with its address.
    let master_root = master.root();
    let bridge = c.start_bridge();
    let expected = standin::kubeconfig(&master_root)
        .expect("k3s.yaml written")
        .replace("https://127.0.0.1:6443", &url(&master_ip));
    let mut last = None;
    let got = wait_for(Duration::from_secs(30), || {
        let out = Cluster::run_in(&bridge, &["get-kubeconfig"]);
        let ok = out.status.success();
        last = Some(out);
        ok
    });
    let out = last.unwrap();
    assert!(
        got.is_some(),
        "get-kubeconfig through the bridge: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        expected,
        "the master's kubeconfig with the master's address"
    );
    eprintln!(
        "kubeconfig through the bridge {:?} after start",
        started.elapsed()
    );
}

/// HA set-up shared by the embedded-etcd and external-datastore scenarios: 3 servers (one
/// first, two joining it), 1 worker; returns the cluster and the index of the first server.
fn ha_cluster(test: &str, subnet: &str, p2p_extra: &str, top_extra: &str) -> (Cluster, usize) {
    let mut c = Cluster::new(test, subnet, 4, p2p_extra, top_extra);
    c.start_all();
    let took = c.wait_formed(&[0, 1, 2, 3]);
    eprintln!("formed in {took:?}");
    let m = c.master();
    (c, m)
}

#[test]
fn ha_with_kubevip_one_cluster_init_two_joining_servers() {
    let _serial = serial();
    let eip = "10.85.0.200";
    let (c, m) = ha_cluster(
        "k3sha",
        "10.85.0",
        "  auto:\n    ha:\n      master_nodes: 2\n",
        &format!("kubevip:\n  eip: {eip}\n"),
    );
    let master = &c.nodes[m];
    let first = master.ready().unwrap();
    let master_ip = master.vpn_address();
    let token = standin::node_token(&master.root()).unwrap();
    assert_eq!(master.role(), "master/clusterinit");
    assert_eq!(first.init(), Some("cluster-init"), "the first server inits");
    assert!(first.has_flag("cluster-init"), "--cluster-init");

    let mut servers = vec![m];
    let mut workers = Vec::new();
    for i in (0..4).filter(|&i| i != m) {
        let n = &c.nodes[i];
        let r = n.ready().unwrap();
        let what = format!(
            "{}: {}",
            n.host.ns,
            standin::describe(std::slice::from_ref(&r))
        );
        if r.mode() == "server" {
            assert_eq!(n.role(), "master/ha", "{what}");
            assert_eq!(r.init(), Some("join"), "{what}: joins, no cluster-init");
            assert!(!r.has_flag("cluster-init"), "{what}");
            assert_eq!(r.server_url(), Some(url(&master_ip)), "{what}: --server");
            assert_eq!(
                r.env("K3S_TOKEN").map(secret_of),
                Some(secret_of(&token)),
                "{what}: K3S_TOKEN"
            );
            assert_eq!(r.flag("node-ip"), Some(n.vpn_address()), "{what}");
            servers.push(i);
        } else {
            assert_eq!(n.role(), "worker", "{what}");
            assert_agent_of(&c, i, &master_ip, &token, &n.vpn_address(), true);
            workers.push(i);
        }
    }
    assert_eq!(servers.len(), 3, "one cluster-init and two HA servers");
    assert_eq!(workers.len(), 1, "one worker");
    assert_eq!(cluster_creations(&c).len(), 1, "one cluster created");

    // KubeVIP: the EIP is a TLS SAN of every server and its manifests are in place.
    for &i in &servers {
        let n = &c.nodes[i];
        let r = n.ready().unwrap();
        assert!(
            r.flag_values("tls-san").iter().any(|s| s == eip),
            "{}: --tls-san {eip}: {}",
            n.host.ns,
            standin::describe(std::slice::from_ref(&r))
        );
        assert_eq!(r.flag("flannel-iface").as_deref(), Some(VPN_IFACE));
        if i != m && !KUBEVIP_ON_EVERY_SERVER {
            continue;
        }
        let dir = n.root().join("var/lib/rancher/k3s/server/manifests");
        let with_eip: Vec<String> = std::fs::read_dir(&dir)
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter(|e| std::fs::read_to_string(e.path()).is_ok_and(|t| t.contains(eip)))
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        assert!(
            !with_eip.is_empty(),
            "{}: a KubeVIP manifest with {eip} in {}",
            n.host.ns,
            dir.display()
        );
    }
}

#[test]
fn ha_with_an_external_datastore_never_inits_and_keeps_every_flag() {
    let _serial = serial();
    let db = "postgres://k3s:secret@10.86.0.250:5432/k3s";
    let (c, m) = ha_cluster(
        "k3sdb",
        "10.86.0",
        &format!("  auto:\n    ha:\n      master_nodes: 2\n      external_db: \"{db}\"\n"),
        "",
    );
    let servers: Vec<usize> = (0..4)
        .filter(|&i| c.nodes[i].ready().is_some_and(|r| r.mode() == "server"))
        .collect();
    assert_eq!(servers.len(), 3, "three servers");
    assert!(servers.contains(&m));
    for &i in &servers {
        let n = &c.nodes[i];
        let r = n.ready().unwrap();
        let what = format!(
            "{}: {}",
            n.host.ns,
            standin::describe(std::slice::from_ref(&r))
        );
        assert!(!r.has_flag("cluster-init"), "{what}: no --cluster-init");
        assert_ne!(r.init(), Some("cluster-init"), "{what}");
        assert_eq!(
            r.flag("datastore-endpoint").as_deref(),
            Some(db),
            "{what}: --datastore-endpoint"
        );
        // The Kairos bug this avoids: flannel and node-ip flags dropped with external_db.
        assert_eq!(
            r.flag("node-ip"),
            Some(n.vpn_address()),
            "{what}: --node-ip"
        );
        assert_eq!(
            r.flag("flannel-iface").as_deref(),
            Some(VPN_IFACE),
            "{what}: --flannel-iface"
        );
    }
    let no_init: Vec<(usize, Record)> = all_records(&c)
        .into_iter()
        .filter(|(_, r)| r.init() == Some("cluster-init"))
        .collect();
    assert!(no_init.is_empty(), "no cluster-init with external_db");
    let worker = (0..4).find(|i| !servers.contains(i)).unwrap();
    let token = standin::node_token(&c.nodes[m].root()).unwrap();
    let master_ip = c.nodes[m].vpn_address();
    let own = c.nodes[worker].vpn_address();
    assert_agent_of(&c, worker, &master_ip, &token, &own, true);
}

#[test]
fn forced_roles_and_a_late_joiner() {
    let _serial = serial();
    let mut c = Cluster::new("k3sforce", "10.87.0", 3, "", "");
    // Node 3 asks to be the master, node 1 to be a worker, node 2 leaves it to the election.
    let own = |role: &str| format!("#cloud-config\np2p:\n  role: {role}\n");
    c.set_own_config(2, &own("master"));
    c.set_own_config(0, &own("worker"));
    c.start_all();
    c.wait_formed(&[0, 1, 2]);
    let m = c.master();
    assert_eq!(m, 2, "the node asking for master runs the k3s server");
    assert_eq!(c.nodes[2].role(), "master");
    let master_ip = c.nodes[2].vpn_address();
    let node_token = standin::node_token(&c.nodes[2].root()).unwrap();
    for i in [0, 1] {
        let own = c.nodes[i].vpn_address();
        assert_agent_of(&c, i, &master_ip, &node_token, &own, true);
    }

    // A node that comes later becomes a worker of the same master.
    let late = c.add_node(None);
    c.start(late);
    c.wait_formed(&[late]);
    assert_eq!(c.nodes[late].role(), "worker", "the late joiner");
    let own = c.nodes[late].vpn_address();
    assert_agent_of(&c, late, &master_ip, &node_token, &own, true);
    assert_eq!(cluster_creations(&c).len(), 1, "still one cluster");
}

#[test]
fn two_network_ids_on_one_token_form_two_clusters() {
    let _serial = serial();
    let mut c = Cluster::new("k3snetid", "10.88.0", 4, "", "");
    let ids = ["alpha", "alpha", "beta", "beta"];
    for (i, id) in ids.iter().enumerate() {
        c.set_own_config(i, &format!("#cloud-config\np2p:\n  network_id: {id}\n"));
    }
    c.start_all();
    c.wait_formed(&[0, 1, 2, 3]);
    let created = cluster_creations(&c);
    assert_eq!(created.len(), 2, "two clusters");
    for pair in [[0, 1], [2, 3]] {
        let servers: Vec<usize> = pair
            .into_iter()
            .filter(|&i| c.nodes[i].ready().unwrap().mode() == "server")
            .collect();
        assert_eq!(servers.len(), 1, "one server in {}", ids[pair[0]]);
        let s = servers[0];
        let w = if pair[0] == s { pair[1] } else { pair[0] };
        let master_ip = c.nodes[s].vpn_address();
        let node_token = standin::node_token(&c.nodes[s].root()).unwrap();
        let own = c.nodes[w].vpn_address();
        assert_agent_of(&c, w, &master_ip, &node_token, &own, true);
    }
    let secrets: BTreeSet<String> = created
        .iter()
        .map(|(i, _)| {
            let t = standin::node_token(&c.nodes[*i].root()).unwrap();
            secret_of(&t).to_string()
        })
        .collect();
    assert_eq!(secrets.len(), 2, "two distinct cluster tokens");
}

#[test]
fn every_agent_killed_mid_formation_restarts_into_the_same_cluster() {
    let _serial = serial();
    let mut c = Cluster::new("k3srestart", "10.89.0", 4, "", "");
    c.start_all();
    // Mid-formation: roles and addresses given, the master's k3s server up, the workers
    // possibly not yet started.
    let mid = wait_for(FORM_WITHIN, || {
        c.nodes
            .iter()
            .all(|n| !n.role().is_empty() && !n.vpn_address().is_empty())
            && c.nodes
                .iter()
                .any(|n| n.ready().is_some_and(|r| r.mode() == "server"))
    });
    if mid.is_none() {
        c.dump();
        panic!("no master k3s server within {FORM_WITHIN:?}");
    }
    let before = roles_and_addresses(&c);
    for i in 0..c.nodes.len() {
        c.crash(i);
    }
    c.start_all();
    c.wait_formed(&[0, 1, 2, 3]);
    let after = roles_and_addresses(&c);
    assert_eq!(after, before, "roles and addresses after the restart");

    let m = c.master();
    let created = cluster_creations(&c);
    assert_eq!(
        created.len(),
        1,
        "one cluster creation over both runs: {}",
        standin::describe(&created.into_iter().map(|(_, r)| r).collect::<Vec<_>>())
    );
    let first = c.nodes[m].ready().unwrap();
    assert_eq!(first.init(), Some("restart"), "the master's k3s resumed");
    let master_ip = c.nodes[m].vpn_address();
    let node_token = standin::node_token(&c.nodes[m].root()).unwrap();
    for i in (0..4).filter(|&i| i != m) {
        let own = c.nodes[i].vpn_address();
        assert_agent_of(&c, i, &master_ip, &node_token, &own, true);
    }
    // No node ever ran a server except the master.
    let servers: BTreeSet<usize> = all_records(&c)
        .into_iter()
        .filter(|(_, r)| r.mode() == "server")
        .map(|(i, _)| i)
        .collect();
    assert_eq!(
        servers,
        BTreeSet::from([m]),
        "k3s server only on the master"
    );
}

#[test]
fn without_the_vpn_kubevip_cluster_on_lan_addresses() {
    let _serial = serial();
    let eip = "10.90.0.200";
    let mut c = Cluster::new(
        "k3slan",
        "10.90.0",
        3,
        "  vpn:\n    create: false\n    use: false\n",
        &format!("kubevip:\n  eip: {eip}\n"),
    );
    c.start_all();
    c.wait_formed(&[0, 1, 2]);
    let m = c.master();
    let master = &c.nodes[m];
    let server = master.ready().unwrap();
    let what = standin::describe(std::slice::from_ref(&server));
    assert_eq!(
        server.flag("node-ip").as_deref(),
        Some(master.host.ip.as_str()),
        "--node-ip is the LAN address: {what}"
    );
    assert_eq!(
        server.flag("flannel-iface").as_deref(),
        Some("eth0"),
        "--flannel-iface is the LAN interface without the VPN: {what}"
    );
    assert!(
        server.flag_values("tls-san").iter().any(|s| s == eip),
        "--tls-san {eip}: {what}"
    );
    let token = standin::node_token(&master.root()).unwrap();
    for i in (0..3).filter(|&i| i != m) {
        let lan = c.nodes[i].host.ip.clone();
        assert_agent_of(&c, i, &master.host.ip, &token, &lan, false);
        let r = c.nodes[i].ready().unwrap();
        assert_eq!(
            r.flag("flannel-iface").as_deref(),
            Some("eth0"),
            "{}",
            c.nodes[i].host.ns
        );
    }
    for n in &c.nodes {
        let vpn = Command::new("ip")
            .args(["-n", &n.host.ns, "link", "show", VPN_IFACE])
            .output()
            .unwrap();
        assert!(!vpn.status.success(), "{}: no {VPN_IFACE}", n.host.ns);
    }
}

/// A hostile `ip-master` (a line end and a second `ExecStart=`, as a percent-encoded PUT
/// delivers it) written through a worker's own API never reaches k3s: the worker's k3s is not
/// restarted and every k3s it ran joined the real master. Whichever gate stops it (the value is
/// not an address, or the ledger drops a write to `ip-master` from a non-master), it takes no
/// effect.
#[test]
fn a_hostile_ip_master_never_reaches_k3s() {
    let _serial = serial();
    let mut c = Cluster::new("k3shostile", "10.87.9", 2, "", "");
    let own = |role: &str| format!("#cloud-config\np2p:\n  role: {role}\n");
    c.set_own_config(0, &own("master"));
    c.set_own_config(1, &own("worker"));
    c.start_all();
    c.wait_formed(&[0, 1]);
    let master_ip = c.nodes[0].vpn_address();
    let starts = |c: &Cluster| {
        c.nodes[1]
            .standin_all()
            .iter()
            .filter(|r| r.event() == "start")
            .count()
    };
    let before = starts(&c);
    let socket = c.nodes[1].host.dir.join("state/api.sock");
    let (status, _, body) = common::api_request(
        &socket,
        "PUT",
        "/api/ledger/kairos/ip-master/10.66.66.66%0D%0AExecStart=%2Fbin%2Fsh%20-c%20id",
    );
    // Give the worker several checks (every 1 s) to act on it.
    std::thread::sleep(Duration::from_secs(6));
    let records = c.nodes[1].standin_all();
    assert_eq!(
        starts(&c),
        before,
        "k3s restarted after the PUT ({status} {body}):\n{}",
        standin::describe(&records)
    );
    for r in &records {
        if let Some(server) = r.server_url() {
            assert_eq!(server, url(&master_ip), "{}", standin::describe(&records));
        }
    }
    let log = std::fs::read_to_string(c.nodes[1].host.dir.join("agent.log")).unwrap_or_default();
    assert!(
        !log.contains('\r') && !log.lines().any(|l| l.starts_with("ExecStart")),
        "the value reached the log raw"
    );
    // Where the ledger took the write, the worker either read the value and refused it, or
    // never read it: joining nodes take the master's own `<uuid>-ip` first (k3s::publish).
    let (_, _, stored) = common::api_request(&socket, "GET", "/api/ledger/kairos/ip-master");
    if stored.contains("10.66.66.66")
        && !log.contains("ledger join data refused: ip-master is not a unicast IP address")
    {
        let (_, _, bucket) = common::api_request(&socket, "GET", "/api/ledger/kairos");
        assert!(
            bucket.contains(&format!("{}-ip", c.nodes[0].uuid)),
            "neither refused nor bypassed: {stored}"
        );
    }
    assert!(c.nodes[1].ready().is_some(), "the worker's k3s still runs");
}

/// The Kairos documentation's single-node example (`p2p.role: master`, `disable_dht: true`, no
/// `minimum_nodes`), unchanged but for the token: one node finds nobody, forms the cluster alone
/// after the lone-master wait, gets its VPN address and runs a first `k3s server` on it.
#[test]
fn the_docs_single_node_example_forms_alone() {
    let _serial = serial();
    let mut c = Cluster::new("k3ssolo", "10.89.0", 1, "", "");
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/config/docs-single-node.yaml");
    let text = std::fs::read_to_string(fixture)
        .unwrap()
        .replace("YOUR_TOKEN_GOES_HERE", &c.token);
    let config = write_config(&c.lab.dir, "single-node.yaml", &text);
    c.nodes[0].configs = vec![config.to_str().unwrap().to_string()];
    c.start(0);
    let took = c.wait_formed(&[0]);
    eprintln!("formed alone in {took:?}");
    let node = &c.nodes[0];
    assert_eq!(node.role(), "master");
    let vpn = node.vpn_address();
    assert!(!vpn.is_empty(), "a VPN address");
    let server = node.ready().unwrap();
    assert_eq!(server.mode(), "server");
    assert_eq!(server.init(), Some("new"), "a new single-server cluster");
    assert!(server.server_url().is_none(), "joins nobody");
    assert_eq!(server.flag("node-ip"), Some(vpn));
    assert_eq!(c.master(), 0);
    assert!(
        !common::log_lines(&node.host, "forming the cluster alone").is_empty(),
        "the agent says why it formed alone"
    );
    // It waited for others first (the lone-master wait), and not much longer.
    let wait = kairos_p2p::cluster::LONE_MASTER_WAIT;
    assert!(
        took >= wait,
        "formed after {took:?}, before the {wait:?} wait"
    );
}
