//! The VPN path through whole nodes in the simulator: addresses from the cluster layer, a packet
//! carried as a datagram and handed out for the TUN interface, and a member that bypasses its
//! own source check (a modified or compromised node) caught by the receiver.

use std::net::Ipv4Addr;
use std::time::Duration;

use bytes::Bytes;

use crate::cluster::ClusterSettings;
use crate::config::DEFAULT_ADDRESS;
use crate::sim::{Action, HostId, LinkParams, Sim, SimConfig};
use crate::vpn::packet::tests::ipv4;
use crate::vpn::{self, VpnSettings};

/// Three nodes on one LAN with settled addresses and the VPN attached; their addresses.
fn three_nodes(seed: u64) -> (Sim, Vec<HostId>, Vec<Ipv4Addr>) {
    let mut sim = Sim::new(SimConfig::new(seed));
    let net = sim.add_network();
    let lan = sim
        .add_subnet(LinkParams::lan(), LinkParams::uplink())
        .unwrap();
    let mut hosts = Vec::new();
    for i in 0..3 {
        let mut settings = sim.default_settings(net).unwrap();
        settings.dht = false;
        let h = sim.add_node(lan, net, settings).unwrap();
        sim.set_cluster(h, ClusterSettings::defaults(&format!("vpn-node-{i}")));
        sim.schedule(Duration::ZERO, Action::Start(h));
        hosts.push(h);
    }
    sim.run_for(Duration::from_secs(10)).unwrap();
    let mut addrs = Vec::new();
    for &h in &hosts {
        let addr = sim
            .with_node(h, |node, _, _| {
                node.attach_vpn(VpnSettings {
                    local: DEFAULT_ADDRESS,
                    mtu: 1200,
                });
                node.vpn().map(|v| v.local().addr)
            })
            .unwrap()
            .flatten()
            .expect("node running with a VPN");
        addrs.push(addr);
    }
    let mut distinct = addrs.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 3, "settled, distinct addresses: {addrs:?}");
    (sim, hosts, addrs)
}

#[test]
fn a_packet_crosses_and_a_spoofed_one_is_caught_by_the_receiver() {
    let (mut sim, hosts, addrs) = three_nodes(11);
    let (a, b) = (hosts[0], hosts[1]);
    let b_peer = sim.with_node(b, |n, _, _| n.peer_id()).unwrap().unwrap();

    let packet = Bytes::from(ipv4(addrs[0], addrs[1], 300));
    let sent = sim
        .with_node(a, |n, now, _| n.send_vpn_packet(now, packet.clone()))
        .unwrap()
        .unwrap();
    assert_eq!(sent, Ok(b_peer));
    sim.run_for(Duration::from_millis(100)).unwrap();
    let got = sim.with_node(b, |n, _, _| n.poll_vpn_packet()).unwrap();
    assert_eq!(got, Some(Some(packet)), "delivered for the TUN interface");

    // A's own path refuses another member's source address...
    let spoofed = Bytes::from(ipv4(addrs[2], addrs[1], 300));
    let refused = sim
        .with_node(a, |n, now, _| n.send_vpn_packet(now, spoofed.clone()))
        .unwrap()
        .unwrap();
    assert_eq!(refused, Err(vpn::Drop::NotOurSource));
    // ...and when a member bypasses it, the receiver drops and counts the packet.
    sim.with_node(a, |n, _, _| n.transport.send_datagram(&b_peer, spoofed))
        .unwrap()
        .unwrap()
        .expect("datagram queued");
    sim.run_for(Duration::from_millis(100)).unwrap();
    let (next, spoofs) = sim
        .with_node(b, |n, _, _| {
            let spoofs = n
                .vpn()
                .unwrap()
                .stats()
                .dropped_in
                .get(vpn::Drop::SpoofedSource);
            (n.poll_vpn_packet(), spoofs)
        })
        .unwrap()
        .unwrap();
    assert_eq!(next, None, "nothing for the TUN interface");
    assert_eq!(spoofs, 1);
}

#[test]
fn unknown_destinations_and_outsiders_are_counted_not_sent() {
    let (mut sim, hosts, addrs) = three_nodes(12);
    let cases = [
        (Ipv4Addr::new(10, 1, 0, 200), vpn::Drop::UnknownDestination),
        (Ipv4Addr::new(192, 168, 1, 1), vpn::Drop::OutsidePrefix),
        (Ipv4Addr::new(10, 1, 0, 255), vpn::Drop::Broadcast),
    ];
    for (dst, reason) in cases {
        let packet = Bytes::from(ipv4(addrs[0], dst, 100));
        let r = sim
            .with_node(hosts[0], |n, now, _| n.send_vpn_packet(now, packet))
            .unwrap()
            .unwrap();
        assert_eq!(r, Err(reason), "{dst}");
    }
    let out = sim
        .with_node(hosts[0], |n, _, _| {
            n.vpn().unwrap().stats().dropped_out.total()
        })
        .unwrap()
        .unwrap();
    assert_eq!(out, 3);
}

#[test]
fn a_packet_to_a_member_not_connected_waits_for_the_connection() {
    let (mut sim, hosts, addrs) = three_nodes(13);
    let (a, b) = (hosts[0], hosts[1]);
    let b_peer = sim.with_node(b, |n, _, _| n.peer_id()).unwrap().unwrap();
    sim.with_node(a, |n, now, _| n.transport.close(now, &b_peer))
        .unwrap()
        .unwrap();
    sim.run_for(Duration::from_millis(20)).unwrap();
    let connected = sim
        .with_node(a, |n, _, _| n.connected().contains_key(&b_peer))
        .unwrap()
        .unwrap();
    assert!(!connected, "closed");

    let packet = Bytes::from(ipv4(addrs[0], addrs[1], 300));
    let sent = sim
        .with_node(a, |n, now, _| n.send_vpn_packet(now, packet.clone()))
        .unwrap()
        .unwrap();
    assert_eq!(
        sent,
        Ok(b_peer),
        "routed, held while the connection is made"
    );
    sim.run_for(Duration::from_millis(200)).unwrap();
    let got = sim.with_node(b, |n, _, _| n.poll_vpn_packet()).unwrap();
    assert_eq!(got, Some(Some(packet)), "delivered once connected");
    let dropped = sim
        .with_node(a, |n, _, _| n.stats().vpn_held_dropped)
        .unwrap()
        .unwrap();
    assert_eq!(dropped, 0);
}
