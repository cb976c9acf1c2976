//! Real agents in network namespaces made by the test: discovery and encrypted connections over
//! real sockets.

mod common;

use std::time::Duration;

use common::{Lab, generate_token, lan_config, log_lines, peer_id_of, wait_for, write_config};

#[test]
fn three_agents_on_one_lan_find_and_connect_to_each_other_without_dht() {
    let mut lab = Lab::new("lan3");
    let token = generate_token();
    let config = write_config(
        &lab.dir,
        "config.yaml",
        &format!("#cloud-config\np2p:\n  network_token: \"{token}\"\n  disable_dht: true\n"),
    );
    let hosts: Vec<_> = (1..=3)
        .map(|i| lab.add_host(i, &format!("10.77.0.{i}/24")))
        .collect();
    for h in &hosts {
        lab.spawn(h, &["agent", "--config", config.to_str().unwrap()]);
    }
    let ids: Vec<String> = hosts.iter().map(peer_id_of).collect();
    let meshed = wait_for(Duration::from_secs(20), || {
        hosts.iter().enumerate().all(|(i, h)| {
            let connected = log_lines(h, "connected ");
            ids.iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .all(|(_, id)| connected.iter().any(|l| l.contains(id.as_str())))
        })
    });
    let elapsed = meshed.unwrap_or_else(|| {
        for h in &hosts {
            eprintln!(
                "--- {} ---\n{}",
                h.ns,
                std::fs::read_to_string(h.dir.join("agent.log")).unwrap_or_default()
            );
        }
        panic!("the three agents did not all connect to each other");
    });
    eprintln!("3 agents meshed {elapsed:?} after their peer ids appeared");
    for (i, h) in hosts.iter().enumerate() {
        let discovered = log_lines(h, "discovered");
        for (j, id) in ids.iter().enumerate() {
            let found = discovered.iter().any(|l| l.contains(id.as_str()));
            assert_eq!(found, i != j, "{}: member {id} discovered", h.ns);
        }
        assert!(log_lines(h, " ERROR ").is_empty(), "{}: no errors", h.ns);
    }
    // A clean stop on SIGTERM.
    for i in 0..hosts.len() {
        assert!(lab.stop(i).success());
    }
}

/// IPv4 beacons reach a host whose address was added without a broadcast address (`ip addr add`
/// without `brd`, as here), which drops a directed broadcast as a unicast not its own: beacons
/// go out as the limited broadcast on each interface. With IPv6 off, nothing else finds the
/// members (no DHT, no bootstrap peer).
#[test]
fn agents_without_ipv6_and_without_brd_find_each_other_on_the_lan() {
    let mut lab = Lab::new("nobrd");
    let token = generate_token();
    let config = write_config(
        &lab.dir,
        "config.yaml",
        &format!("#cloud-config\np2p:\n  network_token: \"{token}\"\n  disable_dht: true\n"),
    );
    let hosts: Vec<_> = (1..=2)
        .map(|i| lab.add_host(i, &format!("10.77.1.{i}/24")))
        .collect();
    for h in &hosts {
        lab.exec_ok(
            &h.ns,
            &["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"],
        );
        lab.exec_ok(
            &h.ns,
            &["sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"],
        );
        lab.exec_ok(
            &h.ns,
            &["sysctl", "-qw", "net.ipv6.conf.eth0.disable_ipv6=1"],
        );
    }
    for h in &hosts {
        lab.spawn(h, &["agent", "--config", config.to_str().unwrap()]);
    }
    let ids: Vec<String> = hosts.iter().map(peer_id_of).collect();
    let found = wait_for(Duration::from_secs(20), || {
        hosts.iter().zip(ids.iter().rev()).all(|(h, other)| {
            log_lines(h, "discovered (Lan)")
                .iter()
                .any(|l| l.contains(other.as_str()))
        })
    });
    if found.is_none() {
        for h in &hosts {
            eprintln!(
                "--- {} ---\n{}",
                h.ns,
                std::fs::read_to_string(h.dir.join("agent.log")).unwrap_or_default()
            );
        }
        panic!("the two agents did not hear each other's beacons");
    }
    for i in 0..hosts.len() {
        assert!(lab.stop(i).success());
    }
}

#[test]
fn an_agent_with_another_token_never_connects() {
    let mut lab = Lab::new("tok");
    let good = lan_config(&lab.dir, "good.yaml");
    let bad = lan_config(&lab.dir, "bad.yaml");
    let a = lab.add_host(1, "10.78.0.1/24");
    let b = lab.add_host(2, "10.78.0.2/24");
    let outsider = lab.add_host(3, "10.78.0.3/24");
    lab.spawn(&a, &["agent", "--config", good.to_str().unwrap()]);
    lab.spawn(&b, &["agent", "--config", good.to_str().unwrap()]);
    lab.spawn(&outsider, &["agent", "--config", bad.to_str().unwrap()]);
    wait_for(Duration::from_secs(20), || {
        !log_lines(&a, "connected ").is_empty() && !log_lines(&b, "connected ").is_empty()
    })
    .expect("the two members connect");
    // Give the outsider several beacon rounds.
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        log_lines(&outsider, "connected ").is_empty(),
        "the outsider connected to someone"
    );
    assert!(
        log_lines(&outsider, "discovered").is_empty(),
        "the outsider decoded a beacon"
    );
    let outsider_id = peer_id_of(&outsider);
    for member in [&a, &b] {
        assert!(
            log_lines(member, &outsider_id).is_empty(),
            "{} heard of the outsider",
            member.ns
        );
    }
}
