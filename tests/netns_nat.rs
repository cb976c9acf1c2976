//! Two sites, each behind its own NAT router (iptables MASQUERADE), plus one public node: the
//! nodes behind NAT find each other through the DHT and connect, directly when the NATs can be
//! punched and through the relay when they cannot.

mod common;

use std::time::Duration;

use common::{Host, Lab, NatKind, generate_token, log_lines, peer_id_of, wait_for, write_config};

fn dump(hosts: &[&Host]) {
    for h in hosts {
        let log = std::fs::read_to_string(h.dir.join("agent.log")).unwrap_or_default();
        let interesting: Vec<&str> = log
            .lines()
            .filter(|l| l.contains(" INFO ") || l.contains(" WARN "))
            .collect();
        eprintln!("--- {} ---\n{}", h.ns, interesting.join("\n"));
    }
}

/// How the two NATed nodes ended up connected.
#[derive(Debug, PartialEq, Eq)]
enum Path {
    Direct,
    Relayed,
}

#[test]
fn behind_home_router_nats_the_nodes_connect_directly() {
    assert_eq!(
        connect_across_nats("natfw", NatKind::HomeRouter),
        Path::Direct
    );
}

#[test]
fn behind_symmetric_nats_the_nodes_connect_through_the_relay() {
    // Each router picks a new random port per destination: the address the public node
    // observes is not the one the other site would have to reach, so no punch can work.
    assert_eq!(
        connect_across_nats("natsym", NatKind::Symmetric),
        Path::Relayed
    );
}

#[test]
fn behind_plain_masquerade_nats_the_nodes_connect() {
    // Without a firewall the router answers the other site's first packet itself; whether the
    // punch wins depends on which packet reaches it first (direct on some kernels and timings,
    // relayed on others). Either way the nodes must connect.
    connect_across_nats("nat", NatKind::PlainMasquerade);
}

fn connect_across_nats(name: &str, nat: NatKind) -> Path {
    let mut lab = Lab::new(name);
    let public = lab.add_host(1, "192.0.2.100/24");
    let site_a = lab.add_nat_site(2, "192.0.2.11/24", "10.1.1.1/24", nat);
    let site_b = lab.add_nat_site(3, "192.0.2.12/24", "10.1.2.1/24", nat);
    let a = lab.add_host_behind(&site_a, 4, "10.1.1.2/24");
    let b = lab.add_host_behind(&site_b, 5, "10.1.2.2/24");
    let config = write_config(
        &lab.dir,
        "config.yaml",
        &format!(
            "#cloud-config\np2p:\n  network_token: \"{}\"\n  bootstrap_peers: [\"192.0.2.100:7120\"]\n",
            generate_token()
        ),
    );
    for h in [&public, &a, &b] {
        lab.spawn(h, &["agent", "--config", config.to_str().unwrap()]);
    }
    let (id_a, id_b) = (peer_id_of(&a), peer_id_of(&b));
    let connected = wait_for(Duration::from_secs(60), || {
        log_lines(&a, "connected ")
            .iter()
            .any(|l| l.contains(&id_b))
            && log_lines(&b, "connected ")
                .iter()
                .any(|l| l.contains(&id_a))
    });
    let Some(took) = connected else {
        dump(&[&public, &a, &b]);
        panic!("the two NATed nodes never connected to each other");
    };
    let line = log_lines(&a, "connected ")
        .into_iter()
        .find(|l| l.contains(&id_b))
        .unwrap();
    let path = if line.contains("fd6b:7032:7072") {
        Path::Relayed
    } else {
        Path::Direct
    };
    eprintln!("NATed nodes ({nat:?}) connected {path:?} after {took:?}: {line}");
    // Each learned its public address from the others.
    assert!(!log_lines(&a, "peers see this node at 192.0.2.11").is_empty());
    assert!(!log_lines(&b, "peers see this node at 192.0.2.12").is_empty());
    path
}
