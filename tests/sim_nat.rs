//! Nodes behind NAT boxes in the deterministic simulator: what works today.
//!
//! A public bootstrap node and two public members; three members behind a cone NAT, two behind
//! another cone NAT, three behind a symmetric NAT, all with the DHT and LAN beacons on. The test
//! asserts what must hold (everyone reaches the bootstrap node, learns its public address and
//! every member; members behind one NAT connect over their LAN) and prints how the other pairs
//! connect: directly (including after a coordinated punch) or through a relay.

use std::time::Duration;

use kairos_p2p::node::{NodeEvent, NodeSettings};
use kairos_p2p::overlay::relay::is_relay_addr;
use kairos_p2p::sim::seed::run_seeded;
use kairos_p2p::sim::{Action, HostId, LinkParams, NatKind, NatSettings, Sim, SimConfig};

const TARGET: &str = env!("CARGO_CRATE_NAME");

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// How the members of `a` and `b` are connected: (direct pairs, relayed pairs, unconnected).
fn links(sim: &Sim, a: &[HostId], b: &[HostId]) -> (usize, usize, usize) {
    let mut out = (0, 0, 0);
    for x in a {
        for y in b {
            if x == y {
                continue;
            }
            let peer = sim.peer_id(*y).unwrap();
            match sim.node(*x).unwrap().connected().get(&peer) {
                Some(addr) if is_relay_addr(addr) => out.1 += 1,
                Some(_) => out.0 += 1,
                None => out.2 += 1,
            }
        }
    }
    out
}

#[test]
fn nodes_behind_cone_and_symmetric_nats_join_through_a_public_bootstrap() {
    run_seeded(
        TARGET,
        "nodes_behind_cone_and_symmetric_nats_join_through_a_public_bootstrap",
        &[1],
        |seed| {
            let mut config = SimConfig::new(seed);
            config.record_events = true;
            let mut sim = Sim::new(config);
            let net = sim.add_network();
            let public = sim
                .add_subnet(LinkParams::lan(), LinkParams::uplink())
                .unwrap();
            let cone = sim
                .add_nat_subnet(
                    NatSettings::new(NatKind::Cone),
                    LinkParams::lan(),
                    LinkParams::uplink(),
                )
                .unwrap();
            let cone2 = sim
                .add_nat_subnet(
                    NatSettings::new(NatKind::Cone),
                    LinkParams::lan(),
                    LinkParams::uplink(),
                )
                .unwrap();
            let symmetric = sim
                .add_nat_subnet(
                    NatSettings::new(NatKind::Symmetric),
                    LinkParams::lan(),
                    LinkParams::uplink(),
                )
                .unwrap();
            let boot = sim
                .add_node(public, net, sim.default_settings(net).unwrap())
                .unwrap();
            sim.start(boot).unwrap();
            let mut settings: NodeSettings = sim.default_settings(net).unwrap();
            settings.bootstrap = vec![(sim.addr(boot).unwrap(), sim.peer_id(boot))];
            let add = |sim: &mut Sim, subnet, n: usize| -> Vec<HostId> {
                (0..n)
                    .map(|i| {
                        let h = sim.add_node(subnet, net, settings.clone()).unwrap();
                        sim.schedule(
                            secs(1) + Duration::from_millis(300 * i as u64),
                            Action::Start(h),
                        );
                        h
                    })
                    .collect()
            };
            let publics = add(&mut sim, public, 2);
            let cones = add(&mut sim, cone, 3);
            let cones2 = add(&mut sim, cone2, 2);
            let symmetrics = add(&mut sim, symmetric, 3);
            sim.run_until(secs(2)).unwrap();
            let converged = sim.run_until_converged(secs(60)).unwrap();
            sim.run_until(secs(90)).unwrap();
            sim.check_invariants().unwrap();
            assert!(
                converged.is_some(),
                "members behind NATs did not all learn each other"
            );

            // Every NATed node reached the bootstrap node and learned its public address.
            let boot_peer = sim.peer_id(boot).unwrap();
            for h in cones.iter().chain(&cones2).chain(&symmetrics) {
                let reached = sim.events().iter().any(|(_, who, e)| {
                    who == h
                        && matches!(e, NodeEvent::PeerConnected { peer, .. } if *peer == boot_peer)
                });
                assert!(
                    reached,
                    "node {} never connected to the bootstrap node",
                    h.0
                );
                let observed = sim.node(*h).unwrap().observed_addr().map(|a| a.ip());
                let nat_ip = sim.nat_public_ip(sim.subnet_of(*h).unwrap()).unwrap();
                assert_eq!(
                    observed,
                    Some(nat_ip.into()),
                    "node {} does not know its public address",
                    h.0
                );
            }
            let everyone: Vec<HostId> = [vec![boot], publics.clone()].concat();
            let report = [
                ("public-public", links(&sim, &everyone, &everyone)),
                ("cone-public", links(&sim, &cones, &everyone)),
                ("symmetric-public", links(&sim, &symmetrics, &everyone)),
                ("cone-cone, one NAT", links(&sim, &cones, &cones)),
                ("cone-cone, two NATs", links(&sim, &cones, &cones2)),
                ("cone-symmetric", links(&sim, &cones, &symmetrics)),
                (
                    "symmetric-symmetric, one NAT",
                    links(&sim, &symmetrics, &symmetrics),
                ),
            ];
            for (what, (direct, relayed, none)) in report {
                eprintln!(
                    "seed {seed}: {what}: {direct} direct, {relayed} relayed, {none} not connected"
                );
            }
            // Members behind one NAT use their LAN addresses, not the NAT's (no hairpinning).
            assert_eq!(
                links(&sim, &cones, &cones).1,
                0,
                "relayed connections inside one LAN"
            );
            let stats = sim.net_stats();
            eprintln!(
                "seed {seed}: converged at {:?}; NAT filtered {} packets; {} cone and {} symmetric mappings",
                converged.unwrap_or_default(),
                stats.nat_filtered,
                sim.nat_mappings(cone),
                sim.nat_mappings(symmetric)
            );
        },
    );
}
