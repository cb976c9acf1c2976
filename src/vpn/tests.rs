//! Decisions of the VPN path both ways, its counters, the MTU arithmetic against quinn-proto,
//! and random input.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::packet::tests::{ipv4, ipv6};
use super::routes::tests::{Writers, identity};
use super::*;
use crate::overlay::relay::{RELAY_HEADER_LEN, RELAYED_MTU, relay_addr};
use crate::overlay::{Transport, TransportSettings};
use crate::rng::Rng;
use crate::token::{NEVER_ROTATE, NetworkToken};

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

/// Us (identity 1) at 10.1.0.5/24 with the default MTU; peers 2 at .6 and 3 at .7 (from
/// their own entries), and .8 claimed by 3 for 2 (refused).
fn setup() -> (Vpn, Writers) {
    let mut w = Writers::new();
    w.publish(&identity(1), "10.1.0.5");
    w.publish(&identity(2), "10.1.0.6");
    w.publish(&identity(3), "10.1.0.7");
    let json = routes::tests::machine_json(&identity(2).peer_id(), "10.1.0.8");
    w.write(&identity(3), "10.1.0.8", Some(&json));
    let mut vpn = Vpn::new(VpnSettings {
        local: "10.1.0.5/24".parse().unwrap(),
        mtu: DEFAULT_MTU,
    });
    assert!(vpn.update_routes(&w.ledger));
    assert_eq!(vpn.routes().len(), 3);
    (vpn, w)
}

const MTU: usize = DEFAULT_MTU as usize;

/// Name, packet, the largest datagram the peer takes, and the peer chosen (identity number).
type OutgoingCase = (&'static str, Vec<u8>, Option<usize>, Result<u8, Drop>);
/// Name, sender (identity number), packet, and the outcome.
type IncomingCase = (&'static str, u8, Vec<u8>, Result<(), Drop>);

#[test]
fn outgoing_decisions() {
    let me = ip("10.1.0.5");
    let v6 = ipv6("fe80::1".parse().unwrap(), "ff02::2".parse().unwrap(), 56);
    let mut bad_version = ipv4(me, ip("10.1.0.6"), 40);
    bad_version[0] = 0x55;
    let table: Vec<OutgoingCase> = vec![
        (
            "to peer 2",
            ipv4(me, ip("10.1.0.6"), 100),
            Some(1414),
            Ok(2),
        ),
        (
            "to peer 3",
            ipv4(me, ip("10.1.0.7"), 100),
            Some(1414),
            Ok(3),
        ),
        (
            "exactly the MTU",
            ipv4(me, ip("10.1.0.6"), MTU),
            Some(MTU),
            Ok(2),
        ),
        ("empty", vec![], Some(1414), Err(Drop::Malformed)),
        (
            "truncated",
            ipv4(me, ip("10.1.0.6"), 100)[..50].to_vec(),
            Some(1414),
            Err(Drop::Malformed),
        ),
        ("bad version", bad_version, Some(1414), Err(Drop::Malformed)),
        ("ipv6", v6, Some(1414), Err(Drop::Ipv6)),
        (
            "over the MTU",
            ipv4(me, ip("10.1.0.6"), MTU + 1),
            Some(9000),
            Err(Drop::OverMtu),
        ),
        (
            "not our source",
            ipv4(ip("10.1.0.6"), ip("10.1.0.7"), 100),
            Some(1414),
            Err(Drop::NotOurSource),
        ),
        (
            "unspecified source",
            ipv4(ip("0.0.0.0"), ip("10.1.0.6"), 100),
            Some(1414),
            Err(Drop::NotOurSource),
        ),
        (
            "prefix broadcast",
            ipv4(me, ip("10.1.0.255"), 100),
            Some(1414),
            Err(Drop::Broadcast),
        ),
        (
            "network address",
            ipv4(me, ip("10.1.0.0"), 100),
            Some(1414),
            Err(Drop::Broadcast),
        ),
        (
            "limited broadcast",
            ipv4(me, ip("255.255.255.255"), 100),
            Some(1414),
            Err(Drop::Broadcast),
        ),
        (
            "multicast",
            ipv4(me, ip("224.0.0.251"), 100),
            Some(1414),
            Err(Drop::Broadcast),
        ),
        (
            "outside the prefix",
            ipv4(me, ip("10.1.1.6"), 100),
            Some(1414),
            Err(Drop::OutsidePrefix),
        ),
        (
            "unknown destination",
            ipv4(me, ip("10.1.0.9"), 100),
            Some(1414),
            Err(Drop::UnknownDestination),
        ),
        (
            "claimed for another",
            ipv4(me, ip("10.1.0.8"), 100),
            Some(1414),
            Err(Drop::UnknownDestination),
        ),
        (
            "not connected",
            ipv4(me, ip("10.1.0.6"), 100),
            None,
            Err(Drop::Unreachable),
        ),
        (
            "over the path",
            ipv4(me, ip("10.1.0.6"), MTU),
            Some(MTU - 1),
            Err(Drop::OverDatagramLimit),
        ),
    ];
    let (mut vpn, _) = setup();
    let mut want_stats = VpnStats::default();
    for (name, packet, max, want) in table {
        let want = want.map(|n| identity(n).peer_id());
        let mut asked = None;
        let got = vpn.route_outgoing(&packet, |peer| {
            asked = Some(*peer);
            max
        });
        assert_eq!(got, want, "{name}");
        if let Some(asked) = asked {
            assert!(
                [2, 3].map(|n| identity(n).peer_id()).contains(&asked),
                "{name}"
            );
        }
        match want {
            Ok(_) => {
                want_stats.packets_out += 1;
                want_stats.bytes_out += packet.len() as u64;
            }
            Err(reason) => want_stats.dropped_out.add(reason),
        }
        assert_eq!(*vpn.stats(), want_stats, "{name}");
    }
    assert_eq!(vpn.stats().dropped_out.get(Drop::Broadcast), 4);
}

#[test]
fn incoming_decisions() {
    let me = ip("10.1.0.5");
    let v6 = ipv6("fd00::6".parse().unwrap(), "fd00::5".parse().unwrap(), 80);
    let table: Vec<IncomingCase> = vec![
        ("from 2", 2, ipv4(ip("10.1.0.6"), me, 100), Ok(())),
        ("from 3", 3, ipv4(ip("10.1.0.7"), me, MTU), Ok(())),
        (
            "larger than our MTU",
            2,
            ipv4(ip("10.1.0.6"), me, 1400),
            Ok(()),
        ),
        ("empty", 2, vec![], Err(Drop::Malformed)),
        (
            "trailing bytes",
            2,
            [ipv4(ip("10.1.0.6"), me, 100), vec![0]].concat(),
            Err(Drop::Malformed),
        ),
        ("ipv6", 2, v6, Err(Drop::Ipv6)),
        (
            "prefix broadcast",
            2,
            ipv4(ip("10.1.0.6"), ip("10.1.0.255"), 100),
            Err(Drop::Broadcast),
        ),
        (
            "multicast",
            2,
            ipv4(ip("10.1.0.6"), ip("239.1.2.3"), 100),
            Err(Drop::Broadcast),
        ),
        (
            "for another member",
            2,
            ipv4(ip("10.1.0.6"), ip("10.1.0.7"), 100),
            Err(Drop::NotForUs),
        ),
        (
            "outside the prefix",
            2,
            ipv4(ip("10.1.0.6"), ip("192.168.1.5"), 100),
            Err(Drop::NotForUs),
        ),
        (
            "spoofs 3",
            2,
            ipv4(ip("10.1.0.7"), me, 100),
            Err(Drop::SpoofedSource),
        ),
        ("spoofs us", 2, ipv4(me, me, 100), Err(Drop::SpoofedSource)),
        (
            "source claimed for it by another",
            2,
            ipv4(ip("10.1.0.8"), me, 100),
            Err(Drop::UnknownSource),
        ),
        (
            "unknown source",
            2,
            ipv4(ip("10.1.0.9"), me, 100),
            Err(Drop::UnknownSource),
        ),
        (
            "not a member address",
            4,
            ipv4(ip("172.16.0.1"), me, 100),
            Err(Drop::UnknownSource),
        ),
    ];
    let (mut vpn, _) = setup();
    let mut want_stats = VpnStats::default();
    for (name, from, packet, want) in table {
        let got = vpn.accept_incoming(identity(from).peer_id(), &packet);
        assert_eq!(got, want, "{name}");
        match want {
            Ok(()) => {
                want_stats.packets_in += 1;
                want_stats.bytes_in += packet.len() as u64;
            }
            Err(reason) => want_stats.dropped_in.add(reason),
        }
        assert_eq!(*vpn.stats(), want_stats, "{name}");
    }
}

#[test]
fn routes_and_address_changes_reach_the_decisions() {
    let (mut vpn, mut w) = setup();
    let me = ip("10.1.0.5");
    let to_six = ipv4(me, ip("10.1.0.6"), 100);
    let connected = |_: &PeerId| Some(1414);
    assert_eq!(
        vpn.route_outgoing(&to_six, connected),
        Ok(identity(2).peer_id())
    );

    // 2 leaves .6 and 3 takes it over.
    w.write(&identity(2), "10.1.0.6", None);
    assert!(vpn.update_routes(&w.ledger));
    assert_eq!(
        vpn.route_outgoing(&to_six, connected),
        Err(Drop::UnknownDestination)
    );
    w.publish(&identity(3), "10.1.0.6");
    assert!(vpn.update_routes(&w.ledger));
    assert_eq!(
        vpn.route_outgoing(&to_six, connected),
        Ok(identity(3).peer_id())
    );
    let from_six = ipv4(ip("10.1.0.6"), me, 100);
    assert_eq!(
        vpn.accept_incoming(identity(2).peer_id(), &from_six),
        Err(Drop::SpoofedSource)
    );
    assert_eq!(
        vpn.accept_incoming(identity(3).peer_id(), &from_six),
        Ok(())
    );

    // Our address moves within the prefix: the old one is no longer ours.
    let moved: Ipv4Cidr = "10.1.0.9/24".parse().unwrap();
    vpn.set_local(moved, &w.ledger);
    assert_eq!(vpn.local(), moved);
    assert_eq!(
        vpn.route_outgoing(&to_six, connected),
        Err(Drop::NotOurSource)
    );
    let now_ours = ipv4(moved.addr, ip("10.1.0.6"), 100);
    assert_eq!(
        vpn.route_outgoing(&now_ours, connected),
        Ok(identity(3).peer_id())
    );
    assert_eq!(
        vpn.accept_incoming(identity(3).peer_id(), &from_six),
        Err(Drop::NotForUs)
    );

    // A new prefix re-reads the routes: .6 is outside a /30 at 10.1.0.9.
    vpn.set_local("10.1.0.9/30".parse().unwrap(), &w.ledger);
    assert!(
        vpn.routes().is_empty(),
        "10.1.0.8/30 has hosts .9 and .10, published by nobody"
    );
    assert_eq!(
        vpn.route_outgoing(&now_ours, connected),
        Err(Drop::OutsidePrefix)
    );
    assert_eq!(vpn.mtu(), DEFAULT_MTU);
}

#[test]
fn drop_reasons_are_listed_once_with_distinct_names() {
    let mut names = std::collections::BTreeSet::new();
    for (i, reason) in Drop::ALL.into_iter().enumerate() {
        assert_eq!(reason as usize, i, "{reason:?}");
        assert!(names.insert(reason.name()), "{reason:?}");
        assert_eq!(reason.to_string(), reason.name());
    }
    let mut counts = DropCounts::default();
    counts.add(Drop::SpoofedSource);
    counts.add(Drop::SpoofedSource);
    counts.add(Drop::Ipv6);
    assert_eq!(counts.total(), 3);
    let listed: Vec<(Drop, u64)> = counts.iter().filter(|(_, n)| *n > 0).collect();
    assert_eq!(listed, [(Drop::Ipv6, 1), (Drop::SpoofedSource, 2)]);
}

#[test]
fn mtu_arithmetic() {
    assert_eq!(DATAGRAM_OVERHEAD, 38);
    assert_eq!(DEFAULT_MTU, 1200);
    assert_eq!(
        DEFAULT_MTU,
        crate::config::DEFAULT_MTU,
        "Kairos' EDGEVPNMTU default"
    );
    assert_eq!(QUIC_MIN_UDP_PAYLOAD - DATAGRAM_OVERHEAD, 1162);
    let direct = TransportSettings::default().initial_mtu;
    assert_eq!(direct, 1500 - 40 - 8, "a 1500-byte IPv6 path");
    assert_eq!(direct - DATAGRAM_OVERHEAD, 1414);
    assert_eq!(RELAYED_MTU - DATAGRAM_OVERHEAD, 1342);
    // A relayed QUIC packet fits a direct connection's datagram, with a byte to spare.
    assert_eq!(
        usize::from(direct - DATAGRAM_OVERHEAD) - usize::from(RELAYED_MTU) - RELAY_HEADER_LEN,
        1
    );
    // Alone in a QUIC packet (4-byte packet number, 2-byte length), Kairos' 1200-byte default
    // makes an IPv6 packet of exactly IPv6's minimum link MTU.
    assert_eq!(1200 + 1 + 8 + 4 + 1 + 2 + 16 + 8 + 40, 1280);
}

/// Two transports of one network connected with `initial_mtu`, directly or over a relayed
/// (virtual) path; the largest datagram each takes towards the other.
fn measured_max_datagram(initial_mtu: u16, relayed: bool) -> (usize, usize) {
    let mut rng = Rng::from_seed(11);
    let token = NetworkToken::generate_with(NEVER_ROTATE, &mut |buf| rng.fill(buf));
    let keys = token.key_schedule();
    let settings = TransportSettings {
        initial_mtu,
        min_mtu: initial_mtu.min(crate::overlay::MIN_PATH_MTU),
        ..TransportSettings::default()
    };
    let (ia, ib) = (identity(1), identity(2));
    let mut a = Transport::new(&ia, &keys, settings.clone(), [1; 32]).unwrap();
    let mut b = Transport::new(&ib, &keys, settings, [2; 32]).unwrap();
    // How each sees the other.
    let (b_at, a_at): (SocketAddr, SocketAddr) = if relayed {
        (relay_addr(0), relay_addr(1))
    } else {
        (
            "192.0.2.2:4000".parse().unwrap(),
            "192.0.2.1:4000".parse().unwrap(),
        )
    };
    let mut now = Instant::now();
    a.connect(now, b_at, Some(ib.peer_id())).unwrap();
    let mut buf = Vec::new();
    for _ in 0..1000 {
        while a.poll_transmit(now, &mut buf).is_some() {
            b.handle_datagram(now, a_at, None, &buf);
        }
        while b.poll_transmit(now, &mut buf).is_some() {
            a.handle_datagram(now, b_at, None, &buf);
        }
        if let (Some(ab), Some(ba)) = (
            a.max_datagram_size(&ib.peer_id()),
            b.max_datagram_size(&ia.peer_id()),
        ) {
            return (ab, ba);
        }
        now += Duration::from_millis(1);
        a.handle_timeout(now);
        b.handle_timeout(now);
    }
    panic!("no connection");
}

#[test]
fn quinn_datagram_limits_match_the_arithmetic() {
    let direct = TransportSettings::default().initial_mtu;
    let table = [
        (
            "direct, transport default",
            direct,
            false,
            direct - DATAGRAM_OVERHEAD,
        ),
        (
            "direct, QUIC floor",
            QUIC_MIN_UDP_PAYLOAD,
            false,
            QUIC_MIN_UDP_PAYLOAD - DATAGRAM_OVERHEAD,
        ),
        (
            "direct, fallen back to the transport's floor",
            crate::overlay::MIN_PATH_MTU,
            false,
            DEFAULT_MTU,
        ),
        ("relayed", direct, true, RELAYED_MTU - DATAGRAM_OVERHEAD),
    ];
    for (name, initial_mtu, relayed, want) in table {
        let want = usize::from(want);
        assert_eq!(
            measured_max_datagram(initial_mtu, relayed),
            (want, want),
            "{name}"
        );
    }
}

/// 100,000 random packets each way: no panic, and every packet is either passed or counted
/// once. Half are patched into IPv4 headers with consistent lengths and addresses from a small
/// set, so that the checks past parsing run too.
#[test]
fn random_packets_never_panic() {
    const ROUNDS: u64 = 100_000;
    let (mut vpn, _) = setup();
    let mut rng = Rng::from_seed(0x5eed);
    let addresses = [
        "10.1.0.5",
        "10.1.0.6",
        "10.1.0.7",
        "10.1.0.8",
        "10.1.0.9",
        "10.1.0.255",
        "224.0.0.1",
        "10.2.0.1",
    ]
    .map(ip);
    let mut buf = vec![0u8; 1600];
    for _ in 0..ROUNDS {
        let len = usize::try_from(rng.below(1600)).unwrap();
        let packet = &mut buf[..len];
        rng.fill(packet);
        if len >= 20 && rng.chance(0.5) {
            let mut pick = || addresses[usize::try_from(rng.below(8)).unwrap()].octets();
            let (source, destination) = (pick(), pick());
            packet[0] = 0x45;
            packet[2..4].copy_from_slice(&u16::try_from(len).unwrap().to_be_bytes());
            packet[12..16].copy_from_slice(&source);
            packet[16..20].copy_from_slice(&destination);
        } else if len >= 40 && rng.chance(0.2) {
            packet[0] = 0x60;
            packet[4..6].copy_from_slice(&u16::try_from(len - 40).unwrap().to_be_bytes());
        }
        let max = usize::try_from(rng.below(1500)).unwrap();
        let reachable = rng.chance(0.9);
        let _ = vpn.route_outgoing(packet, |_| reachable.then_some(max));
        let from = identity(1 + u8::try_from(rng.below(4)).unwrap()).peer_id();
        let _ = vpn.accept_incoming(from, packet);
    }
    let stats = vpn.stats();
    assert_eq!(stats.packets_out + stats.dropped_out.total(), ROUNDS);
    assert_eq!(stats.packets_in + stats.dropped_in.total(), ROUNDS);
    assert!(stats.packets_out > 0 && stats.packets_in > 0, "{stats:?}");
    let outgoing = [
        Drop::Malformed,
        Drop::Ipv6,
        Drop::Broadcast,
        Drop::NotOurSource,
        Drop::OutsidePrefix,
        Drop::UnknownDestination,
        Drop::OverMtu,
        Drop::Unreachable,
        Drop::OverDatagramLimit,
    ];
    for reason in outgoing {
        assert!(stats.dropped_out.get(reason) > 0, "{reason:?}: {stats:?}");
    }
    let incoming = [
        Drop::Malformed,
        Drop::Ipv6,
        Drop::Broadcast,
        Drop::NotForUs,
        Drop::UnknownSource,
        Drop::SpoofedSource,
    ];
    for reason in incoming {
        assert!(stats.dropped_in.get(reason) > 0, "{reason:?}: {stats:?}");
    }
}
