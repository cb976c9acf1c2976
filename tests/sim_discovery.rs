//! Discovery scenarios in the deterministic simulator.

use std::time::Duration;

use kairos_p2p::sim::seed::run_seeded;
use kairos_p2p::sim::{Action, LinkParams, Sim, SimConfig};

const TARGET: &str = env!("CARGO_CRATE_NAME");

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn ms(m: u64) -> Duration {
    Duration::from_millis(m)
}

#[test]
fn fifty_nodes_on_one_lan() {
    run_seeded(TARGET, "fifty_nodes_on_one_lan", &[1], |seed| {
        let mut sim = Sim::new(SimConfig::new(seed));
        let net = sim.add_network();
        let lan = sim
            .add_subnet(LinkParams::lan(), LinkParams::uplink())
            .unwrap();
        let mut settings = sim.default_settings(net).unwrap();
        settings.dht = false;
        let mut last_start = Duration::ZERO;
        let mut hosts = Vec::new();
        for _ in 0..50 {
            let h = sim.add_node(lan, net, settings.clone()).unwrap();
            let at = ms(sim.rng().below(3000));
            last_start = last_start.max(at);
            sim.schedule(at, Action::Start(h));
            hosts.push(h);
        }
        let t0 = std::time::Instant::now();
        let converged = sim.run_until_converged(last_start + secs(10)).unwrap();
        eprintln!(
            "converged {converged:?} last start {last_start:?} steps {} wall {:?}",
            sim.steps(),
            t0.elapsed()
        );
        sim.run_for(secs(30)).unwrap();
        eprintln!(
            "steps {} wall {:?} {:?}",
            sim.steps(),
            t0.elapsed(),
            sim.net_stats()
        );
        for h in &hosts[..3] {
            let n = sim.node(*h).unwrap();
            eprintln!(
                "{:?} members {} connected {} {:?} {:?}",
                h,
                n.members().len(),
                n.connected().len(),
                n.stats(),
                sim.metrics(*h).unwrap()
            );
        }
        sim.check_invariants().unwrap();
    });
}

#[test]
fn explore_dht() {
    let n_subnets: usize = std::env::var("SUBNETS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let per: usize = std::env::var("PER")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40);
    run_seeded(TARGET, "explore_dht", &[1], |seed| {
        let mut sim = Sim::new(SimConfig::new(seed));
        let net = sim.add_network();
        let core = sim
            .add_subnet(LinkParams::lan(), LinkParams::uplink())
            .unwrap();
        let boot = sim
            .add_node(core, net, sim.default_settings(net).unwrap())
            .unwrap();
        sim.start(boot).unwrap();
        let mut settings = sim.default_settings(net).unwrap();
        settings.bootstrap = vec![(sim.addr(boot).unwrap(), sim.peer_id(boot))];
        let mut last_start = Duration::ZERO;
        for _ in 0..n_subnets {
            let s = sim
                .add_subnet(LinkParams::lan(), LinkParams::uplink())
                .unwrap();
            for _ in 0..per {
                let h = sim.add_node(s, net, settings.clone()).unwrap();
                let at = ms(sim.rng().below(5000));
                last_start = last_start.max(at);
                sim.schedule(at, Action::Start(h));
            }
        }
        let t0 = std::time::Instant::now();
        sim.run_until(last_start).unwrap();
        let mut t = last_start;
        loop {
            t += secs(5);
            let c = sim.run_until_converged(t).unwrap();
            let conns: usize = sim
                .running_hosts()
                .map(|h| sim.node(h).unwrap().connected().len())
                .sum();
            let minm = sim
                .running_hosts()
                .map(|h| sim.node(h).unwrap().members().len())
                .min()
                .unwrap();
            eprintln!(
                "t={:?} converged {} of {} min members {minm} conns {conns} steps {} wall {:?}",
                sim.now(),
                sim.converged_count(),
                sim.running_hosts().count(),
                sim.steps(),
                t0.elapsed()
            );
            if c.is_some() || t > secs(200) {
                break;
            }
        }
        let b = sim.node(boot).unwrap();
        eprintln!(
            "boot: connected {} {:?} {:?}",
            b.connected().len(),
            b.stats(),
            b.kad().unwrap().stats()
        );
        eprintln!("{:?}", sim.net_stats());
    });
}
