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
//!   WAN link is cut (its router forwards nothing) for 40 s: past the overlay's 30 s idle
//!   timeout (the connections between the sites close; discovery must find the other site
//!   again) and four times `p2p.liveness_timeout` (10 s here: each side counts the other dead).
//!   Within 30 s of the link coming back the sites talk over the VPN again, and one master and
//!   one running k3s cluster hold, every node with a role (a committed master is never
//!   re-elected, so the outage splits nothing; were there a split, it would be young and merged).

mod common;
mod sites;
mod standin;

use std::time::{Duration, Instant};

use common::{pings, sh, vpn_addr, wait_for};
use sites::{Node, Sites, one_cluster};

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
            // Its containers stopped too: k3s-killall.sh (here the stand-in's) ran.
            assert!(
                standin::read_log(&n.root())
                    .iter()
                    .any(|r| r.event() == "killall"),
                "{}: k3s-killall.sh did not run when it left its cluster",
                n.uuid
            );
        }
    }
    if was_split {
        assert_eq!(merged.len(), 1, "run {run}: one master left its cluster");
    }
    // A node whose k3s agent joined two clusters (a worker of the losing one) stopped the old
    // one's pods (k3s-killall.sh, here the stand-in's) before joining the other.
    let mut rejoined = Vec::new();
    for n in sites.all() {
        let log = standin::read_log(&n.root());
        let mut clusters: Vec<String> = log
            .iter()
            .filter(|r| r.mode() == "agent")
            .filter_map(|r| r.token())
            .map(|t| t.split("::").next().unwrap_or_default().to_string())
            .collect();
        clusters.dedup();
        if clusters.len() > 1 {
            assert!(
                log.iter().any(|r| r.event() == "killall"),
                "run {run}: {} joined {} clusters without k3s-killall.sh",
                n.uuid,
                clusters.len()
            );
            rejoined.push(n.uuid.clone());
        }
    }
    eprintln!(
        "run {run}: one cluster (master {master}) {:.1} s after the sites started, {:.1} s \
         after the public node; servers stopped by a merge: {merged:?}; agents that joined \
         both clusters: {rejoined:?}",
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
    the_readme_s_manual_fix(&mut sites);
}

/// The README's manual fix of a split past the window ("Second master"): on the listed master
/// and the nodes whose k3s joined it, stop the agent (and so k3s), move the listed master's
/// `server` directory aside, make it a worker with `role set` as root on another node, start
/// the agents again: the alarm clears everywhere and one cluster holds.
fn the_readme_s_manual_fix(sites: &mut Sites) {
    let listed = sites.nodes[0].second_masters();
    assert_eq!(listed.len(), 1, "one other master listed: {listed:?}");
    let other = listed[0].clone();
    let other_node = sites.node(&other).expect("the listed master is a lab node");
    let other_ip = vpn_addr(&other_node.host, "edgevpn0").expect("its VPN address");
    let other_root = other_node.root();
    let joined_other = |n: &Node| {
        standin::read_log(&n.root())
            .iter()
            .rev()
            .find(|r| r.mode() == "agent" && r.event() == "ready")
            .and_then(|r| r.server_url())
            .is_some_and(|url| url.contains(&format!("//{other_ip}:")))
    };
    let leaving: Vec<String> = sites
        .all()
        .filter(|n| n.uuid == other || joined_other(n))
        .map(|n| n.uuid.clone())
        .collect();
    let keeper = sites
        .all()
        .find(|n| !leaving.contains(&n.uuid))
        .expect("a node of the kept cluster")
        .host
        .clone();
    for uuid in &leaving {
        sites.stop(uuid);
    }
    let data = other_root.join("var/lib/rancher/k3s");
    std::fs::rename(data.join("server"), data.join("server.manual"))
        .expect("move the listed master's server data aside");
    let out = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &keeper.ns,
            env!("CARGO_BIN_EXE_kairos-p2p"),
        ])
        .args(["role", "set", &other, "worker"])
        .envs(common::client_env(&keeper))
        .output()
        .expect("run role set");
    assert!(
        out.status.success(),
        "role set {other} worker: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for uuid in &leaving {
        let node = Node {
            host: sites.node(uuid).expect("a lab node").host.clone(),
            uuid: uuid.clone(),
        };
        sites.start(&node);
    }
    let fixed = wait_for(Duration::from_secs(60), || {
        one_cluster(sites) && sites.all().all(|n| n.second_masters().is_empty())
    });
    if fixed.is_none() {
        sites.dump();
        panic!("the manual fix ({leaving:?} reset, {other} made a worker) left no single cluster");
    }
    eprintln!(
        "manual fix: {leaving:?} stopped, {other} made a worker: one cluster {:.1} s after the \
         agents started again",
        fixed.unwrap().as_secs_f64()
    );
}

/// How long site B's WAN link is cut: past the overlay's idle timeout (30 s).
const OUTAGE: Duration = Duration::from_secs(40);

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
    std::thread::sleep(OUTAGE);
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
        "outage of {OUTAGE:?}: the sites talk again {:.1} s and form one cluster {:.1} s after the \
         link came back",
        talk.unwrap().as_secs_f64(),
        healed.as_secs_f64()
    );
}
