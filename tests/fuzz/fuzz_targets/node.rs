//! The node core fed arbitrary datagrams on its sockets (QUIC, beacons, DHT), with the cluster
//! layer and the VPN attached, and its outputs drained.
#![no_main]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use kairos_p2p::cluster::{Cluster, ClusterSettings};
use kairos_p2p::config::DEFAULT_ADDRESS;
use kairos_p2p::identity::Identity;
use kairos_p2p::ledger::Ledger;
use kairos_p2p::node::{Node, NodeSettings};
use kairos_p2p::token::{NEVER_ROTATE, NetworkToken};
use kairos_p2p::vpn::VpnSettings;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let token = NetworkToken::generate_with(NEVER_ROTATE, &mut |b| b.fill(3));
    let identity = Identity::from_seed([5; 32]);
    let Ok(mut node) = Node::new(&identity, &token, NodeSettings::for_token(&token), 1) else {
        return;
    };
    let settings = ClusterSettings::defaults("fuzz");
    let ledger = Ledger::new(settings.ledger_limits);
    node.attach_cluster(Cluster::new(&identity, settings, ledger, 2));
    node.attach_vpn(VpnSettings {
        local: DEFAULT_ADDRESS,
        mtu: 1200,
    });
    let start = Instant::now();
    let unix = 1_700_000_000_000;
    node.handle_timeout(start, unix);
    let from: SocketAddr = "192.0.2.7:7120".parse().unwrap();
    let mut out = Vec::new();
    // Datagrams are the input cut at each 0xFF byte (so one input holds several).
    for (i, datagram) in data.split(|&b| b == 0xff).enumerate() {
        let now = start + Duration::from_millis(i as u64);
        node.handle_datagram(now, unix + i as u64, from, None, datagram);
        while node.poll_transmit(now, &mut out).is_some() {}
        while node.poll_event().is_some() {}
        while node.poll_vpn_packet().is_some() {}
    }
    node.handle_timeout(start + Duration::from_secs(1), unix + 1000);
});
