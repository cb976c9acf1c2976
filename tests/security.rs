//! Security promises of issue 7 and the tests that hold them. Each promise has at least one
//! test that fails when the promise breaks; this file holds the simulator and file checks
//! (unprivileged), `tests/netns_security.rs` the ones that need real agents (root).
//!
//! | Promise | Tests |
//! |---|---|
//! | A non-member cannot handshake | `overlay::tests::non_member_cannot_connect_and_never_sees_a_certificate`, `overlay::tests::member_dialling_a_non_member_learns_nothing_either`, `sim_discovery::a_node_with_another_token_never_gets_in`, `netns_overlay::an_agent_with_another_token_never_connects`, here `a_non_member_writes_nothing_into_any_member` |
//! | A non-member cannot decode beacons | `discovery::beacon::tests::another_token_cannot_open_and_sees_no_identity_or_address`, `sim_discovery::a_node_with_another_token_never_gets_in` (`beacons_rejected` on both sides) |
//! | A non-member cannot decode (or forge) DHT records | `discovery::kad::records::tests::wrong_token_wrong_window_tampering_and_garbage_fail`, here `records_planted_by_a_non_member_are_never_accepted` |
//! | A non-member cannot make a member write anything: ledger | here `a_non_member_writes_nothing_into_any_member` |
//! | … nor a DHT record a member accepts | here `records_planted_by_a_non_member_are_never_accepted` (`records_rejected` counted, metric `dropped_total{reason="dht_record_rejected"}`) |
//! | … nor files | `netns_security::e2e_no_secret_in_any_log_and_every_secret_file_private` (the outsider's peer id and uuid appear in no member file) |
//! | A member's entries for keys it does not own (the master's keys, another node's role, announcement, lease or address, `leader-auto`, a commit without the quorum) take effect on no node (dropped and counted as `not_owner`) | `cluster::scenario_tests::forged_entries_of_every_family_take_effect_nowhere`, `netns_forgery::a_member_forging_entries_changes_nothing_on_any_node` (real agents, the k3s stand-in: no k3s restart) |
//! | A member's entry signed by another key is dropped (and counted) | `ledger::tests::bad_signatures_and_invalid_entries_are_refused_and_counted`, here `forged_ledger_entries_from_a_member_are_dropped_and_counted` |
//! | Replayed control frames are ignored | `sim_discovery::replayed_and_tampered_packets_are_dropped`, `overlay::tests::replayed_ticket_shows_a_certificate_but_cannot_join`, here `replayed_traffic_and_replayed_ledger_messages_change_nothing` |
//! | Replayed beacons are ignored | `discovery::lan::tests::exact_replay_is_dropped`, `discovery::lan::tests::stale_beacon_is_dropped_when_keys_rotate_but_not_without_rotation`, `discovery::lan::tests::replay_cache_is_bounded`, `sim_discovery::replayed_and_tampered_packets_are_dropped`, here `replayed_traffic_and_replayed_ledger_messages_change_nothing` (`beacons_rejected`) |
//! | The API refuses a non-loopback address unless configured | `config::vpn_env::tests` (`APILISTEN`), `cli::bridge::tests` (`--api-allow-remote`), here `a_non_loopback_api_is_refused_unless_allowed`; the default TCP API unreachable from the LAN: netns e2e (there is no per-client address filter: the listener is on loopback) |
//! | The API socket is 0600 | `netns_security::e2e_no_secret_in_any_log_and_every_secret_file_private` (stat of every agent's `api.sock`, agents started under umask 000) |
//! | Local non-root users inspect the API but read no k3s secret and change nothing (agent and bridge) | `api::trust::tests`, `api::routes::tests::inspect_level_reads_all_but_secrets_and_writes_nothing`, `api::routes::tests::reserved_buckets_and_keys_cannot_be_deleted_at_any_level`, `netns_trust::nobody_inspects_and_root_controls_the_api` (as `nobody` via `setpriv`; also with the socket loosened: `SO_PEERCRED`), `netns_trust::a_bridge_scrubs_its_token_from_its_command_line` (a bridge's API) |
//! | No unprivileged client locks root out of the API | `driver::api::tests::pools_split_the_slots_by_listener_and_privilege`, `netns_trust::slow_connections_from_nobody_do_not_lock_root_out` (1,200 slow connections from `nobody`) |
//! | Kairos' API socket and the API bearer token are 0600; a live socket is never taken over | `driver::api::tests::bearer_token_is_kept_0600_and_a_loose_one_replaced`, `driver::api::tests::a_live_socket_is_never_taken_and_a_stale_one_is_replaced`, `netns_trust::nobody_inspects_and_root_controls_the_api` |
//! | A bridge's network token does not stay on its command line | `cli::bridge::tests::argv_is_scrubbed_in_place`, `netns_trust::a_bridge_scrubs_its_token_from_its_command_line` (`/proc/PID/cmdline`, `ps`) |
//! | Key files are 0600 | `identity::tests::key_is_created_once_private_and_reloaded`, here `secret_files_are_private_under_umask_000`, netns e2e (every file of every state dir) |
//! | Kubeconfig copies are 0600 | `get-kubeconfig` writes no file (stdout only); the ledger snapshot that holds the kubeconfig and the k3s token: here `secret_files_are_private_under_umask_000` and the netns e2e |
//! | k3s env files with `K3S_TOKEN`, the cluster-init marker are 0600 | here `secret_files_are_private_under_umask_000`, `k3s::init::tests::systemd_files` / `openrc_files` |
//! | No secret appears in logs at any level | `k3s::plan::tests::secret_flags_are_hidden_in_logs`, `token::keys::tests::debug_is_redacted`, `config_errors::token_never_appears_in_messages`, here `debug_of_a_configuration_shows_no_secret` (k3s env/args, HA datastore, `EDGEVPNTOKEN`) and `debug_of_ledger_writes_and_entries_shows_no_value`, `netns_security::e2e_no_secret_in_any_log_and_every_secret_file_private` (trace logs of 3 agents, a bridge, an outsider, get-kubeconfig, grepped for the token, its keys, node keys, k3s token, kubeconfig key) |

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use kairos_p2p::cluster::{ClusterSettings, Write};
use kairos_p2p::discovery::kad::message::{Body, Message};
use kairos_p2p::discovery::kad::{RendezvousRecord, seal_record};
use kairos_p2p::identity::{Identity, PeerId};
use kairos_p2p::k3s::files::{self, PRIVATE};
use kairos_p2p::k3s::init::{InitSystem, service_files};
use kairos_p2p::k3s::marker::{CLUSTER_INIT, Markers};
use kairos_p2p::k3s::plan::Plan;
use kairos_p2p::k3s::{K3sRole, Root};
use kairos_p2p::ledger::{Batch, Clock, Entry, Hlc, Ledger, Limits, SyncLimits, SyncMessage};
use kairos_p2p::node::{Control, Destination, Node};
use kairos_p2p::rng::Rng;
use kairos_p2p::sim::seed::run_seeded;
use kairos_p2p::sim::{Action, HostId, LinkParams, NetId, PacketKind, Sim, SimConfig, SubnetId};
use kairos_p2p::token::KeySchedule;

use common::TempDir;

const TARGET: &str = env!("CARGO_CRATE_NAME");
const SEEDS: &[u64] = &[1];

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// A new simulation with one network on one LAN and `n` members on it (no DHT).
fn members_on_one_lan(seed: u64, n: usize) -> (Sim, SubnetId, Vec<HostId>) {
    let mut sim = Sim::new(SimConfig::new(seed));
    let net = sim.add_network();
    let lan = sim
        .add_subnet(LinkParams::lan(), LinkParams::uplink())
        .unwrap();
    let hosts = members(&mut sim, lan, net, n, false);
    (sim, lan, hosts)
}

/// A LAN of `n` members (DHT as asked), each with a cluster (ledger) and started in the first
/// second.
fn members(sim: &mut Sim, lan: SubnetId, net: NetId, n: usize, dht: bool) -> Vec<HostId> {
    let mut settings = sim.default_settings(net).unwrap();
    settings.dht = dht;
    (0..n)
        .map(|i| {
            let h = sim.add_node(lan, net, settings.clone()).unwrap();
            sim.set_cluster(h, ClusterSettings::defaults(&format!("security-{i}")));
            let at = Duration::from_millis(sim.rng().below(1000));
            sim.schedule(at, Action::Start(h));
            h
        })
        .collect()
}

fn node(sim: &Sim, h: HostId) -> &Node {
    sim.node(h).unwrap()
}

fn cluster(sim: &Sim, h: HostId) -> &kairos_p2p::cluster::Cluster {
    node(sim, h).cluster().unwrap()
}

fn ledger(sim: &Sim, h: HostId) -> &Ledger {
    node(sim, h).cluster().unwrap().ledger()
}

/// Runs past every scheduled start (all in the first second), then until every member knows
/// every other.
fn converge(sim: &mut Sim, within: Duration) {
    sim.run_until(secs(2)).unwrap();
    let until = sim.now() + within;
    assert!(
        sim.run_until_converged(until).unwrap().is_some(),
        "members did not converge"
    );
}

/// Writes `bucket/key = value` through `h`'s cluster, as the API would.
fn write(sim: &mut Sim, h: HostId, bucket: &str, key: &str, value: &str) {
    sim.with_node(h, |n, now, unix| {
        n.write(now, unix, vec![Write::put(bucket, key, value)])
            .unwrap();
    })
    .unwrap();
}

/// Sends `msg` as a ledger control message from member `from` to member `to`.
fn send_ledger(sim: &mut Sim, from: HostId, to: HostId, msg: &SyncMessage) {
    let mut bytes = Vec::new();
    msg.encode(&SyncLimits::default(), &mut bytes).unwrap();
    let peer = sim.peer_id(to).unwrap();
    sim.with_node(from, |n, _, _| {
        n.send_control(&peer, &Control::Ledger(bytes))
    })
    .unwrap();
}

fn value(sim: &Sim, h: HostId, bucket: &str, key: &str) -> Option<String> {
    ledger(sim, h)
        .get(bucket, key)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

#[test]
fn a_non_member_writes_nothing_into_any_member() {
    run_seeded(
        TARGET,
        "a_non_member_writes_nothing_into_any_member",
        SEEDS,
        |seed| {
            let mut sim = Sim::new(SimConfig::new(seed));
            let net = sim.add_network();
            let other = sim.add_network();
            let lan = sim
                .add_subnet(LinkParams::lan(), LinkParams::uplink())
                .unwrap();
            let hosts = members(&mut sim, lan, net, 6, false);
            // The outsider runs the same software with its own token and cluster, on the LAN.
            let mut settings = sim.default_settings(other).unwrap();
            settings.dht = false;
            let outsider = sim.add_node(lan, other, settings).unwrap();
            sim.set_cluster(outsider, ClusterSettings::defaults("security-outsider"));
            sim.schedule(Duration::from_millis(300), Action::Start(outsider));
            converge(&mut sim, secs(10));
            write(
                &mut sim,
                outsider,
                "kairos",
                "outsider-key",
                "outsider-value",
            );
            for round in 0..3 {
                for m in &hosts {
                    let addr = sim.addr(*m).unwrap();
                    sim.with_node(outsider, |n, now, _| {
                        let _ = n.dial_addr(now, addr);
                    })
                    .unwrap();
                }
                sim.run_for(secs(5 + round)).unwrap();
            }
            sim.run_for(secs(5)).unwrap();
            sim.check_invariants().unwrap();

            let outsider_id = sim.peer_id(outsider).unwrap();
            let member_ids: BTreeSet<PeerId> =
                hosts.iter().map(|h| sim.peer_id(*h).unwrap()).collect();
            assert!(node(&sim, outsider).connected().is_empty());
            assert_eq!(
                ledger(&sim, outsider).get("kairos", "outsider-key"),
                Some(&b"outsider-value"[..]),
                "the outsider did write its own ledger"
            );
            let mut refused = 0;
            for h in &hosts {
                let n = node(&sim, *h);
                assert!(!n.connected().contains_key(&outsider_id));
                assert!(n.members().iter().all(|(p, _)| *p != outsider_id));
                refused += n.transport().stats().drops.tickets_refused;
                let l = ledger(&sim, *h);
                assert!(
                    !l.is_empty(),
                    "member {} has a ledger (its own writes)",
                    h.0
                );
                for e in l.entries() {
                    assert!(
                        member_ids.contains(&e.writer),
                        "member {} holds {}/{} written by {} (not a member)",
                        h.0,
                        e.bucket,
                        e.key,
                        e.writer
                    );
                }
                assert_eq!(l.get("kairos", "outsider-key"), None);
                let c = l.counters();
                assert_eq!(
                    (c.bad_signature, c.invalid),
                    (0, 0),
                    "no entry from the outsider even reached member {}",
                    h.0
                );
                let r = n.cluster().unwrap().replication_stats();
                assert_eq!(r.rejected, 0);
                assert_eq!(r.entries_refused, 0);
            }
            assert!(
                refused >= 6,
                "members refused {refused} handshakes from the outsider"
            );
        },
    );
}

#[test]
fn records_planted_by_a_non_member_are_never_accepted() {
    run_seeded(
        TARGET,
        "records_planted_by_a_non_member_are_never_accepted",
        SEEDS,
        |seed| {
            let mut sim = Sim::new(SimConfig::new(seed));
            let net = sim.add_network();
            let other = sim.add_network();
            // Members on two subnets meet only through the DHT (beacons stay on their subnet).
            let lans: Vec<SubnetId> = (0..2)
                .map(|_| {
                    sim.add_subnet(LinkParams::lan(), LinkParams::uplink())
                        .unwrap()
                })
                .collect();
            let boot = sim
                .add_node(lans[0], net, sim.default_settings(net).unwrap())
                .unwrap();
            sim.start(boot).unwrap();
            let mut settings = sim.default_settings(net).unwrap();
            settings.bootstrap = vec![(sim.addr(boot).unwrap(), sim.peer_id(boot))];
            let mut hosts = vec![boot];
            for (i, lan) in lans.iter().enumerate() {
                for _ in 0..3 {
                    let h = sim.add_node(*lan, net, settings.clone()).unwrap();
                    sim.schedule(Duration::from_millis(200 * i as u64), Action::Start(h));
                    hosts.push(h);
                }
            }
            let mut outsider_settings = sim.default_settings(other).unwrap();
            outsider_settings.bootstrap = settings.bootstrap.clone();
            let outsider = sim.add_node(lans[1], other, outsider_settings).unwrap();
            sim.schedule(Duration::from_millis(100), Action::Start(outsider));
            converge(&mut sim, secs(60));

            // The outsider learns the members' rendezvous key (it travels in clear in GETs and
            // PUTs; here taken from the token) and plants, at every member, garbage and a record
            // sealed with its own token naming a peer id no member has.
            let members_keys = KeySchedule::new(sim.token(net).unwrap());
            let outsider_keys = KeySchedule::new(sim.token(other).unwrap());
            let unix = sim.unix(outsider);
            let window = members_keys.dht_window(unix);
            let key = members_keys.rendezvous_key(window);
            let fake = Identity::from_seed([7; 32]).peer_id();
            let outsider_addr = sim.addr(outsider).unwrap();
            let mut rng = Rng::from_seed(seed);
            let sealed = seal_record(
                &outsider_keys,
                outsider_keys.dht_window(unix),
                &RendezvousRecord {
                    peer: fake,
                    addrs: vec![outsider_addr],
                    published_at: unix,
                },
                &mut rng,
            )
            .unwrap();
            let mut garbage = vec![0u8; 120];
            rng.fill(&mut garbage);
            let outsider_id = sim.peer_id(outsider).unwrap();
            let rejected_before: u64 = hosts
                .iter()
                .map(|h| node(&sim, *h).kad().unwrap().stats().records_rejected)
                .sum();
            for (i, h) in hosts.iter().enumerate() {
                let to = sim.addr(*h).unwrap();
                for (j, record) in [&sealed, &garbage].into_iter().enumerate() {
                    let msg = Message {
                        txid: (i * 2 + j) as u64 + 1,
                        sender: outsider_id,
                        body: Body::Put {
                            key,
                            ttl_secs: 3600,
                            record: record.clone(),
                        },
                    };
                    sim.send_raw(
                        outsider,
                        outsider_addr,
                        Destination::Addr(to),
                        &msg.to_bytes().unwrap(),
                    );
                }
            }
            // Long enough for every member's rendezvous lookup to come round (every 60 s).
            sim.run_for(secs(150)).unwrap();
            sim.check_invariants().unwrap();

            let now = sim.instant();
            let stored: usize = hosts
                .iter()
                .map(|h| {
                    node(&sim, *h)
                        .kad()
                        .unwrap()
                        .store()
                        .get(now, &key)
                        .filter(|r| r.record == sealed || r.record == garbage)
                        .count()
                })
                .sum();
            assert!(
                stored > 0,
                "the planted records reached the members' DHT stores (opaque bytes)"
            );
            let rejected: u64 = hosts
                .iter()
                .map(|h| node(&sim, *h).kad().unwrap().stats().records_rejected)
                .sum::<u64>()
                - rejected_before;
            assert!(
                rejected >= 2,
                "members' lookups met the planted records and refused them ({rejected})"
            );
            let member_ids: BTreeSet<PeerId> =
                hosts.iter().map(|h| sim.peer_id(*h).unwrap()).collect();
            for h in &hosts {
                let n = node(&sim, *h);
                for (p, _) in n.members().iter() {
                    assert!(
                        member_ids.contains(p),
                        "member {} took {p} (planted) as a member",
                        h.0
                    );
                }
                assert!(!n.connected().contains_key(&outsider_id));
                assert!(!n.connected().contains_key(&fake));
            }
            eprintln!(
                "seed {seed}: {stored} planted records stored, {rejected} refused by lookups"
            );
        },
    );
}

/// `e` with a newer version (so it would win if accepted), signature kept.
fn newer(e: &Entry) -> Entry {
    let mut f = e.clone();
    f.version = Hlc(e.version.0 + 1);
    f
}

#[test]
fn forged_ledger_entries_from_a_member_are_dropped_and_counted() {
    run_seeded(
        TARGET,
        "forged_ledger_entries_from_a_member_are_dropped_and_counted",
        SEEDS,
        |seed| {
            let (mut sim, _, hosts) = members_on_one_lan(seed, 4);
            let (a, b, c, d) = (hosts[0], hosts[1], hosts[2], hosts[3]);
            converge(&mut sim, secs(10));
            write(&mut sim, b, "security", "from-b", "genuine");
            sim.run_for(secs(5)).unwrap();
            for h in &hosts {
                assert_eq!(
                    value(&sim, *h, "security", "from-b").as_deref(),
                    Some("genuine")
                );
            }
            let genuine = ledger(&sim, b).entry("security", "from-b").unwrap().clone();
            // 1. B's signature, claiming C wrote it.
            let mut claims_c = newer(&genuine);
            claims_c.writer = sim.peer_id(c).unwrap();
            // 2. B's entry with another value under B's signature.
            let mut changed = newer(&genuine);
            changed.value = Some(b"forged".to_vec());
            // 3. A new key in C's name, signed by a key that is not C's (A's or any other).
            let mut new_key = changed.clone();
            new_key.key = "forged-new".to_string();
            new_key.writer = sim.peer_id(c).unwrap();
            let forged = vec![claims_c, changed, new_key];

            let before: Vec<(u64, u64)> = hosts
                .iter()
                .map(|h| {
                    (
                        ledger(&sim, *h).counters().bad_signature,
                        node(&sim, *h)
                            .cluster()
                            .unwrap()
                            .replication_stats()
                            .entries_refused,
                    )
                })
                .collect();
            send_ledger(
                &mut sim,
                a,
                d,
                &SyncMessage::Batch(Batch {
                    entries: forged.clone(),
                    requests: Vec::new(),
                }),
            );
            sim.run_for(secs(10)).unwrap();
            sim.check_invariants().unwrap();

            let bad = ledger(&sim, d).counters().bad_signature - before[3].0;
            let refused = node(&sim, d)
                .cluster()
                .unwrap()
                .replication_stats()
                .entries_refused
                - before[3].1;
            assert_eq!(bad, 3, "D counted every forged entry as a bad signature");
            assert_eq!(refused, 3, "D's replication counted them refused");
            for (i, h) in hosts.iter().enumerate() {
                assert_eq!(
                    value(&sim, *h, "security", "from-b").as_deref(),
                    Some("genuine"),
                    "member {}",
                    h.0
                );
                assert_eq!(value(&sim, *h, "security", "forged-new"), None);
                let e = ledger(&sim, *h).entry("security", "from-b").unwrap();
                assert_eq!(e, &genuine, "member {} holds B's entry unchanged", h.0);
                if *h != d {
                    // D never passed them on.
                    assert_eq!(ledger(&sim, *h).counters().bad_signature, before[i].0);
                }
            }
            // The members stay connected: a forged entry is dropped, not a reason to fight.
            assert_eq!(node(&sim, d).connected().len(), 3);
        },
    );
}

#[test]
fn replayed_traffic_and_replayed_ledger_messages_change_nothing() {
    run_seeded(
        TARGET,
        "replayed_traffic_and_replayed_ledger_messages_change_nothing",
        SEEDS,
        |seed| {
            let (mut sim, lan, hosts) = members_on_one_lan(seed, 4);
            let adversary = sim.add_host(lan).unwrap();
            sim.mirror(lan);
            converge(&mut sim, secs(10));
            // Capture everything from the start (handshakes, beacons) until key k is written as
            // v1 and gossiped, then overwrite it.
            write(&mut sim, hosts[0], "security", "k", "v1");
            sim.run_for(secs(5)).unwrap();
            let old = ledger(&sim, hosts[0])
                .entry("security", "k")
                .unwrap()
                .clone();
            let recorded: Vec<_> = sim
                .captured()
                .iter()
                .filter(|c| {
                    c.src_host != adversary
                        && matches!(c.kind, PacketKind::Beacon | PacketKind::Quic)
                })
                .cloned()
                .collect();
            write(&mut sim, hosts[1], "security", "k", "v2");
            sim.run_for(secs(5)).unwrap();
            for h in &hosts {
                assert_eq!(value(&sim, *h, "security", "k").as_deref(), Some("v2"));
            }
            let beacons = recorded
                .iter()
                .filter(|c| c.kind == PacketKind::Beacon)
                .count() as u64;
            let quic = recorded.len() as u64 - beacons;
            assert!(
                beacons > 0 && quic > 0,
                "captured {beacons} beacons, {quic} QUIC packets"
            );
            let sum = |sim: &Sim, f: &dyn Fn(&Node) -> u64| -> u64 {
                hosts.iter().map(|h| f(node(sim, *h))).sum()
            };
            let beacons_before = sum(&sim, &|n| n.stats().beacons_rejected);
            let handshakes_before = sum(&sim, &|n| n.transport().stats().handshakes_ok);
            let fresh_before = sum(&sim, &|n| {
                n.cluster().unwrap().replication_stats().entries_fresh
            });
            let stale_before: Vec<u64> = hosts
                .iter()
                .map(|h| ledger(&sim, *h).counters().stale)
                .collect();

            // 1. The captured packets (QUIC packets carrying the v1 write's ledger frames, and
            // beacons) replayed as they were, to their receiver and to every other member.
            let addrs: Vec<SocketAddr> = hosts.iter().map(|h| sim.addr(*h).unwrap()).collect();
            for c in &recorded {
                sim.send_raw(adversary, c.from, c.to, &c.bytes);
                if c.kind == PacketKind::Quic {
                    for a in &addrs {
                        if Destination::Addr(*a) != c.to {
                            sim.send_raw(adversary, c.from, Destination::Addr(*a), &c.bytes);
                        }
                    }
                }
                sim.run_for(Duration::from_millis(5)).unwrap();
            }
            sim.run_for(secs(5)).unwrap();
            let replayed_beacons = sum(&sim, &|n| n.stats().beacons_rejected) - beacons_before;
            assert!(
                replayed_beacons >= beacons * (hosts.len() as u64 - 1),
                "{replayed_beacons} rejections for {beacons} replayed beacons"
            );
            assert_eq!(
                sum(&sim, &|n| n.transport().stats().handshakes_ok),
                handshakes_before,
                "no replayed handshake completed"
            );
            assert_eq!(sum(&sim, &|n| n.stats().control_rejected), 0);

            // 2. A member replays the old v1 entry (a ledger frame it once received) to every
            // other member.
            for h in &hosts[1..] {
                send_ledger(
                    &mut sim,
                    hosts[0],
                    *h,
                    &SyncMessage::Batch(Batch {
                        entries: vec![old.clone()],
                        requests: Vec::new(),
                    }),
                );
            }
            sim.run_for(secs(5)).unwrap();
            sim.check_invariants().unwrap();
            for (i, h) in hosts.iter().enumerate() {
                assert_eq!(
                    value(&sim, *h, "security", "k").as_deref(),
                    Some("v2"),
                    "member {} went back to the replayed value",
                    h.0
                );
                if i > 0 {
                    assert!(
                        ledger(&sim, *h).counters().stale > stale_before[i],
                        "member {} counted the replayed entry stale",
                        h.0
                    );
                }
            }
            let fresh = sum(&sim, &|n| {
                n.cluster().unwrap().replication_stats().entries_fresh
            }) - fresh_before;
            // Heartbeats keep flowing; none of the fresh entries is the replayed one.
            eprintln!(
                "seed {seed}: replayed {beacons} beacons ({replayed_beacons} rejections) and \
                 {quic} QUIC packets; {fresh} fresh entries since (heartbeats)"
            );
        },
    );
}

/// `umask 000` for this process: files the code under test creates get exactly the mode it
/// asks for, so a missing mode shows as 0666 or 0777 instead of hiding behind 022.
fn permissive_umask() {
    // SAFETY: umask has no preconditions; every test of this binary wants umask 000.
    unsafe {
        libc::umask(0);
    }
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

#[test]
fn secret_files_are_private_under_umask_000() {
    permissive_umask();
    let dir = TempDir::new("security-files");
    let state = dir.0.join("var/lib/state");

    // The node key and its directory, missing parents included.
    let identity = Identity::load_or_create(&state).unwrap();
    assert_eq!(mode(&state.join(kairos_p2p::identity::KEY_FILE)), 0o600);
    for d in [dir.0.join("var"), dir.0.join("var/lib"), state.clone()] {
        assert_eq!(mode(&d), 0o700, "{}", d.display());
    }

    // The ledger snapshot (it holds the k3s token and the kubeconfig).
    let mut l = Ledger::new(Limits::default());
    l.put(
        &identity,
        &mut Clock::new(),
        "kairos",
        "master-kubeconfig",
        b"secret",
        1_700_000_000_000,
    )
    .unwrap();
    let snapshot = state.join("ledger.snapshot");
    l.save(&snapshot).unwrap();
    assert_eq!(mode(&snapshot), 0o600);

    // The cluster-init marker.
    let markers = Markers::new(&state);
    markers.set_cluster_initialised(1).unwrap();
    assert_eq!(mode(&state.join(CLUSTER_INIT)), 0o600);

    // The init system's files with K3S_TOKEN, written as the k3s worker writes them; an older
    // world-readable copy is tightened.
    let root = Root::new(dir.0.join("root"));
    let plan = Plan {
        role: K3sRole::Worker,
        args: vec!["agent".to_string()],
        env: [("K3S_TOKEN".to_string(), "K10abc::server:s3cret".to_string())]
            .into_iter()
            .collect(),
    };
    let bin = Path::new("/usr/local/bin/k3s");
    for init in [InitSystem::Systemd, InitSystem::OpenRc] {
        let written = service_files(init, &root, &plan, bin).unwrap();
        let with_token: Vec<_> = written
            .iter()
            .filter(|f| f.contents.contains("s3cret"))
            .collect();
        assert!(
            !with_token.is_empty(),
            "{init:?} writes the token somewhere"
        );
        for f in &written {
            if f.contents.contains("s3cret") {
                assert_eq!(f.mode, PRIVATE, "{}", f.path.display());
            }
            if let Some(parent) = f.path.parent() {
                std::fs::create_dir_all(parent).unwrap();
            }
            std::fs::write(&f.path, &f.contents).unwrap();
            std::fs::set_permissions(&f.path, std::fs::Permissions::from_mode(0o644)).unwrap();
            files::write(&f.path, f.contents.as_bytes(), f.mode).unwrap();
            assert_eq!(mode(&f.path), f.mode, "{}", f.path.display());
        }
        for f in with_token {
            let _ = std::fs::remove_file(&f.path);
            files::write(&f.path, f.contents.as_bytes(), f.mode).unwrap();
            assert_eq!(mode(&f.path), 0o600, "{} (fresh)", f.path.display());
        }
    }
}

/// Runs the binary with `args` and the state and root in `state`; returns (exit code,
/// stderr). A run still going after 20 s is killed and reported as `None` (an agent that
/// started although it should have refused).
fn run(args: &[&str], state: &Path) -> (Option<i32>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kairos-p2p"))
        .args(args)
        .env("KAIROS_P2P_STATE_DIR", state)
        .env("KAIROS_P2P_ROOT", state.join("root"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let exited = common::wait_for(Duration::from_secs(20), || {
        matches!(child.try_wait(), Ok(Some(_)))
    });
    if exited.is_none() {
        let _ = child.kill();
    }
    let out = child.wait_with_output().unwrap();
    let code = exited.and(out.status.code());
    (code, String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn a_non_loopback_api_is_refused_unless_allowed() {
    let dir = TempDir::new("security-api");
    let state = dir.0.join("state");
    let token = common::generate_token();
    for listen in ["0.0.0.0:8080", "10.1.2.3:8080", "[::]:8080"] {
        let config = common::write_config(
            &dir.0,
            "config.yaml",
            &format!(
                "#cloud-config\np2p:\n  network_token: \"{token}\"\n  disable_dht: true\n  \
                 vpn:\n    env:\n      APILISTEN: \"{listen}\"\n"
            ),
        );
        let (code, err) = run(&["agent", "--config", config.to_str().unwrap()], &state);
        assert!(
            code.is_some_and(|c| c != 0),
            "agent with APILISTEN={listen}: exit {code:?}: {err}"
        );
        assert!(
            err.contains("APILISTEN") && err.contains("not a loopback address"),
            "APILISTEN={listen}: {err}"
        );
        assert!(
            !state.join("api.sock").exists(),
            "the agent refused before serving anything"
        );
    }
    let (code, err) = run(
        &["bridge", "--network-token", &token, "--api", "0.0.0.0:8080"],
        &state,
    );
    assert!(code.is_some_and(|c| c != 0), "bridge: exit {code:?}: {err}");
    assert!(err.contains("--api-allow-remote"), "{err}");
}

#[test]
fn debug_of_a_configuration_shows_no_secret() {
    let token = common::generate_token();
    let text = format!(
        "#cloud-config\np2p:\n  network_token: \"{token}\"\n  auto:\n    ha:\n      enable: true\n      \
         master_nodes: 1\n      external_db: \"postgres://k3s:db-pa55word@db:5432/k3s\"\n  \
         vpn:\n    env:\n      EDGEVPNTOKEN: \"{token}\"\nk3s:\n  args:\n  - --token=arg-t0ken-secret\n  \
         - --agent-token\n  - agent-t0ken-secret\n  env:\n    K3S_TOKEN: env-t0ken-secret\n\
         k3s-agent:\n  env:\n    K3S_TOKEN: agent-env-t0ken-secret\n"
    );
    let host = kairos_p2p::config::HostFacts {
        machine_id: "f0e1d2c3b4a5968778695a4b3c2d1e0f".to_owned(),
        hostname: "node1".to_owned(),
    };
    let config = kairos_p2p::config::parse(&[(Path::new("x.yaml"), &text)], &host)
        .unwrap_or_else(|e| panic!("{e}"));
    let parsed: kairos_p2p::token::NetworkToken = token.parse().unwrap();
    let shown = format!("{config:?} {config:#?}");
    for secret in [
        token.as_str(),
        &parsed.otp.dht.key,
        &parsed.otp.crypto.key,
        &parsed.room,
        &parsed.rendezvous,
        &parsed.mdns,
        "db-pa55word",
        "arg-t0ken-secret",
        "agent-t0ken-secret",
        "env-t0ken-secret",
    ] {
        assert!(!shown.contains(secret), "{secret} in {shown}");
    }
    // The rest is still there to debug with.
    for visible in ["db:5432/k3s", "K3S_TOKEN", "--agent-token", "EDGEVPNTOKEN"] {
        assert!(shown.contains(visible), "{visible} missing from {shown}");
    }
}

#[test]
fn debug_of_ledger_writes_and_entries_shows_no_value() {
    let secret = "K10cafe::server:ledger-value-s3cret";
    let write = Write::put("kairos", "token-nodetoken", secret);
    let identity = Identity::from_seed([9; 32]);
    let mut l = Ledger::new(Limits::default());
    let entry = l
        .put(
            &identity,
            &mut Clock::new(),
            "kairos",
            "token-nodetoken",
            secret.as_bytes(),
            1_700_000_000_000,
        )
        .unwrap();
    let batch = SyncMessage::Batch(Batch {
        entries: vec![entry.clone()],
        requests: Vec::new(),
    });
    // As text or as the byte list a derived Debug of a Vec<u8> prints.
    let as_bytes = format!("{:?}", b"s3cret");
    let as_bytes = as_bytes.trim_matches(['[', ']']);
    for shown in [
        format!("{write:?}"),
        format!("{entry:?}"),
        format!("{batch:?}"),
    ] {
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(!shown.contains(as_bytes), "{shown}");
        assert!(shown.contains("token-nodetoken"), "{shown}");
    }
}

/// Issue 14, item 1: a member (a valid identity of the network, signing with its own key)
/// forges entries of every family owned by others and sends them to every other member: none
/// takes effect on any node, each is counted as `not_owner`, and the cluster keeps its master.
#[test]
fn a_member_forging_others_keys_changes_nothing_anywhere() {
    run_seeded(
        TARGET,
        "a_member_forging_others_keys_changes_nothing_anywhere",
        SEEDS,
        |seed| {
            let (mut sim, _, hosts) = members_on_one_lan(seed, 4);
            converge(&mut sim, secs(10));
            sim.run_for(secs(10)).unwrap();
            let master = cluster(&sim, hosts[0])
                .master()
                .expect("a master")
                .to_string();
            let uuid_of = |i: usize| format!("security-{i}");
            let forger_i = (0..4).find(|i| uuid_of(*i) != master).unwrap();
            let victim_i = (0..4)
                .find(|i| *i != forger_i && uuid_of(*i) != master)
                .unwrap();
            let (forger, victim) = (hosts[forger_i], uuid_of(victim_i));
            let identity = sim.identity(forger).unwrap();
            let victim_addr = value(&sim, hosts[0], "dhcp", &victim).expect("a lease");
            let victim_peer = sim.peer_id(hosts[victim_i]).unwrap();
            let snapshot = |sim: &Sim, h: HostId| -> Vec<(String, String, Option<Vec<u8>>)> {
                ledger(sim, h)
                    .entries()
                    .filter(|e| e.bucket != "healthcheck")
                    .map(|e| (e.bucket.clone(), e.key.clone(), e.value.clone()))
                    .collect()
            };
            let commit = format!(
                "{{\"ballot\":{{\"round\":99,\"proposer\":\"{}\"}},\"candidate\":\"{}\"}}",
                uuid_of(forger_i),
                uuid_of(forger_i)
            );
            let machine = format!("{{\"PeerID\":\"{victim_peer}\",\"Address\":\"{victim_addr}\"}}");
            let forged: Vec<(&str, String, Option<String>)> = vec![
                (
                    "kairos",
                    format!("{victim}-uuid"),
                    Some("{\"Role\":\"none\",\"Hostname\":\"x\"}".into()),
                ),
                ("kairos", format!("{victim}-ip"), Some("10.66.66.66".into())),
                ("kairos", format!("{victim}-vote"), Some("{}".into())),
                (
                    "kairos",
                    format!("{victim}-ballot"),
                    Some("{\"round\":100}".into()),
                ),
                ("kairos", format!("{victim}-role"), Some("master".into())),
                ("kairos", "ip-master".into(), Some("10.66.66.66".into())),
                ("kairos", "token-nodetoken".into(), Some("K10forged".into())),
                (
                    "kairos",
                    "master-kubeconfig".into(),
                    Some("Zm9yZ2Vk".into()),
                ),
                (
                    "kairos",
                    "control-plane-vip".into(),
                    Some("10.66.66.66".into()),
                ),
                ("kairos", "master-commit".into(), None),
                ("kairos", "master-commit".into(), Some(commit)),
                ("kairos", "leader-auto".into(), Some(victim.clone())),
                ("healthcheck", victim.clone(), None),
                ("dhcp", victim.clone(), Some("10.1.0.200".into())),
                ("machines", victim_addr.clone(), Some(machine)),
            ];
            let before: Vec<_> = hosts.iter().map(|h| snapshot(&sim, *h)).collect();
            let refused_before: Vec<u64> = hosts
                .iter()
                .map(|h| ledger(&sim, *h).counters().not_owner)
                .collect();
            // Versions just ahead of everything held, so that none loses on age alone.
            let at = ledger(&sim, hosts[0]).max_version().millis() + 1_000;
            let entries: Vec<Entry> = forged
                .iter()
                .enumerate()
                .map(|(i, (b, k, v))| {
                    Entry::sign(
                        &identity,
                        b,
                        k,
                        v.as_deref().map(str::as_bytes),
                        Hlc::new(at + i as u64, 0),
                    )
                    .unwrap()
                })
                .collect();
            for h in &hosts {
                if *h != forger {
                    send_ledger(
                        &mut sim,
                        forger,
                        *h,
                        &SyncMessage::Batch(Batch {
                            entries: entries.clone(),
                            requests: Vec::new(),
                        }),
                    );
                }
            }
            sim.run_for(secs(10)).unwrap();
            sim.check_invariants().unwrap();
            for (i, h) in hosts.iter().enumerate() {
                if *h == forger {
                    continue;
                }
                let now = snapshot(&sim, *h);
                for (b, k, _) in &forged {
                    let held = ledger(&sim, *h).entry(b, k).map(|e| e.writer);
                    assert_ne!(held, Some(identity.peer_id()), "member {i} took {b}/{k}");
                    let was = before[i].iter().find(|(bb, kk, _)| bb == b && kk == k);
                    let is = now.iter().find(|(bb, kk, _)| bb == b && kk == k);
                    assert_eq!(is, was, "member {i}: {b}/{k} changed");
                }
                let refused = ledger(&sim, *h).counters().not_owner - refused_before[i];
                assert!(
                    refused >= forged.len() as u64 - 1,
                    "member {i}: {refused} refused"
                );
                assert_eq!(cluster(&sim, *h).master(), Some(master.as_str()));
            }
        },
    );
}
