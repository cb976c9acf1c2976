//! Benchmark: real agents in network namespaces on one LAN (bridge), beacons only.
//! Prints the time until every agent is connected to every other (median and max over runs),
//! and the idle traffic per node once meshed. Needs root (it makes its own namespaces).

#[path = "../common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::{Host, Lab, eth0_bytes, lan_config, log_lines, peer_id_of, wait_for};

const NODES: usize = 10;
const RUNS: usize = 3;
const IDLE: Duration = Duration::from_secs(60);

fn one_run(run: usize, measure_idle: bool) -> (Duration, Option<f64>) {
    let mut lab = Lab::new(&format!("bl{run}"));
    let config = lan_config(&lab.dir, "config.yaml");
    let hosts: Vec<Host> = (1..=NODES)
        .map(|i| lab.add_host(i, &format!("10.90.{run}.{i}/24")))
        .collect();
    // Links are up well before an agent starts on a real board.
    std::thread::sleep(Duration::from_secs(1));
    let start = Instant::now();
    for h in &hosts {
        lab.spawn(h, &["agent", "--config", config.to_str().unwrap()]);
    }
    let ids: Vec<String> = hosts.iter().map(peer_id_of).collect();
    let all_pairs = |needle: &str| {
        hosts.iter().enumerate().all(|(i, h)| {
            let lines = log_lines(h, needle);
            ids.iter()
                .enumerate()
                .all(|(j, id)| i == j || lines.iter().any(|l| l.contains(id.as_str())))
        })
    };
    let known =
        wait_for(Duration::from_secs(60), || all_pairs("discovered")).map(|_| start.elapsed());
    let meshed =
        wait_for(Duration::from_secs(20), || all_pairs("connected ")).map(|_| start.elapsed());
    println!(
        "run {run}: every agent knows every other {:.2} s after start; every pair connected: {}",
        known.unwrap_or(Duration::MAX).as_secs_f64(),
        meshed.map_or("not within 20 s".into(), |t| format!(
            "{:.2} s",
            t.as_secs_f64()
        ))
    );
    let meshed = known.unwrap_or(Duration::MAX);
    let idle = measure_idle.then(|| {
        std::thread::sleep(Duration::from_secs(5));
        let before: u64 = hosts.iter().map(eth0_bytes).sum();
        std::thread::sleep(IDLE);
        let after: u64 = hosts.iter().map(eth0_bytes).sum();
        (after - before) as f64 / IDLE.as_secs_f64() / NODES as f64
    });
    (meshed, idle)
}

fn main() {
    let mut times = Vec::new();
    let mut idle = None;
    for run in 0..RUNS {
        let (t, i) = one_run(run, run == 0);
        times.push(t);
        idle = idle.or(i);
    }
    times.sort();
    println!();
    println!("| LAN discovery, {NODES} real agents | measured | goal |");
    println!("|---|---|---|");
    println!(
        "| every agent knows every other, median of {RUNS} | {:.2} s | 2 s |",
        times[RUNS / 2].as_secs_f64()
    );
    println!(
        "| the same, max | {:.2} s | |",
        times[RUNS - 1].as_secs_f64()
    );
    if let Some(bps) = idle {
        println!(
            "| idle traffic per node (rx+tx on eth0, {} s) | {:.0} B/s | < 1000 B/s |",
            IDLE.as_secs(),
            bps
        );
    }
}
