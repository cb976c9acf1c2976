//! Benchmark: real agents in network namespaces on one LAN (bridge), default cluster settings
//! (`minimum_nodes` 2, DHCP addresses). Prints the time from start until every agent holds a
//! role (and until every agent also has its VPN address), median and max over runs, for 3 and
//! 10 agents, and the idle traffic per node of a formed cluster. Needs root (it makes its own
//! namespaces); skips with a message otherwise.
//!
//! Each size runs twice: with an IPv4 broadcast address on eth0 (as DHCP clients set it), and as
//! `Lab::add_host` leaves it (`ip addr add` without `brd`: the driver then derives the directed
//! broadcast address from the netmask).
//!
//! `KAIROS_BENCH_IDLE_NODES=<n>` runs only the idle measurement of issue 16 (goal 3): one
//! formation of `n` agents, 40 s of settling after every agent holds its role, then the bytes
//! sent (and sent + received) on eth0 per node per second over 60 s.

#[path = "../common/mod.rs"]
mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::{Host, Lab, eth0_bytes, is_root, lan_config, log_lines, wait_for};

const SIZES: [usize; 2] = [3, 10];
const RUNS: usize = 3;
const LIMIT: Duration = Duration::from_secs(60);
const IDLE: Duration = Duration::from_secs(60);
const GOAL: Duration = Duration::from_secs(3);

/// The last value logged after `needle`.
fn last(h: &Host, needle: &str) -> Option<String> {
    log_lines(h, needle)
        .pop()
        .and_then(|l| l.split(needle).nth(1).map(|v| v.trim().to_string()))
}

struct RunResult {
    roles: Option<Duration>,
    addresses: Option<Duration>,
    /// Idle bytes per node per second on eth0: sent + received, and sent.
    idle_bps: Option<(f64, f64)>,
}

/// Bytes sent on the host's eth0.
fn eth0_tx_bytes(h: &Host) -> u64 {
    let out = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &h.ns,
            "cat",
            "/sys/class/net/eth0/statistics/tx_bytes",
        ])
        .output()
        .expect("ip netns exec");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

/// Gives the host's eth0 address an IPv4 broadcast address (`brd +`), as DHCP clients do.
fn set_broadcast(lab: &Lab, h: &Host, cidr: &str) {
    lab.exec_ok(&h.ns, &["ip", "addr", "del", cidr, "dev", "eth0"]);
    lab.exec_ok(
        &h.ns,
        &["ip", "addr", "add", cidr, "brd", "+", "dev", "eth0"],
    );
    // Deleting the address took the default route with it.
    lab.exec_ok(&h.ns, &["ip", "route", "replace", "default", "dev", "eth0"]);
}

fn one_run(nodes: usize, run: usize, broadcast: bool, measure_idle: Option<Duration>) -> RunResult {
    // A one-letter name: veth names (pid, lab number, name, host) must fit in 15 bytes.
    let mut lab = Lab::new("r");
    let config = lan_config(&lab.dir, "config.yaml");
    let subnet = nodes * 10 + run + if broadcast { 100 } else { 0 };
    let mut hosts = Vec::new();
    for i in 1..=nodes {
        let cidr = format!("10.91.{subnet}.{i}/24");
        let h = lab.add_host(i, &cidr);
        if broadcast {
            set_broadcast(&lab, &h, &cidr);
        }
        hosts.push(h);
    }
    // Links are up well before an agent starts on a real board.
    std::thread::sleep(Duration::from_secs(1));
    let start = Instant::now();
    for (i, h) in hosts.iter().enumerate() {
        let uuid = format!("bench-roles-{}-{nodes}-{run}-{i}", u8::from(broadcast));
        lab.spawn_with_env(
            h,
            &["agent", "--config", config.to_str().unwrap()],
            &[("UUID", &uuid)],
        );
    }
    let roles = wait_for(LIMIT, || {
        hosts
            .iter()
            .all(|h| !log_lines(h, "role assigned: ").is_empty())
    })
    .map(|_| start.elapsed());
    let addresses = roles
        .and_then(|_| {
            wait_for(LIMIT, || {
                hosts
                    .iter()
                    .all(|h| !log_lines(h, "VPN address 10.").is_empty())
            })
        })
        .map(|_| start.elapsed());

    // Sanity: one master, one master uuid, distinct addresses, no role or address changes.
    let role_of: Vec<Option<String>> = hosts.iter().map(|h| last(h, "role assigned: ")).collect();
    let masters = role_of
        .iter()
        .filter(|r| r.as_deref() == Some("master"))
        .count();
    let elected: BTreeSet<String> = hosts
        .iter()
        .flat_map(|h| log_lines(h, "master elected: "))
        .filter_map(|l| l.split("master elected: ").nth(1).map(str::to_string))
        .collect();
    let addrs: BTreeSet<String> = hosts
        .iter()
        .filter_map(|h| last(h, "VPN address 10."))
        .collect();
    let mut problems = Vec::new();
    if masters != 1 {
        problems.push(format!("{masters} masters"));
    }
    if elected.len() != 1 {
        problems.push(format!("master elected: {elected:?}"));
    }
    if addrs.len() != nodes {
        problems.push(format!("{} distinct addresses", addrs.len()));
    }
    for h in &hosts {
        for needle in [" WARN ", " ERROR ", "VPN address changed"] {
            for l in log_lines(h, needle) {
                problems.push(format!("{}: {l}", h.ns));
            }
        }
        if log_lines(h, "role assigned: ").len() > 1 {
            problems.push(format!("{}: {:?}", h.ns, log_lines(h, "role assigned: ")));
        }
    }

    let fmt = |t: Option<Duration>| {
        t.map_or("not within 60 s".into(), |t| {
            format!("{:.2} s", t.as_secs_f64())
        })
    };
    println!(
        "{nodes} agents, {}, run {run}: every agent holds a role {}; every agent has its address {}{}",
        if broadcast { "brd set" } else { "no brd" },
        fmt(roles),
        fmt(addresses),
        if problems.is_empty() {
            String::new()
        } else {
            format!("\n  PROBLEMS:\n  {}", problems.join("\n  "))
        }
    );

    let idle_bps = measure_idle.filter(|_| roles.is_some()).map(|settle| {
        std::thread::sleep(settle);
        let before: u64 = hosts.iter().map(eth0_bytes).sum();
        let sent_before: u64 = hosts.iter().map(eth0_tx_bytes).sum();
        std::thread::sleep(IDLE);
        let after: u64 = hosts.iter().map(eth0_bytes).sum();
        let sent_after: u64 = hosts.iter().map(eth0_tx_bytes).sum();
        let per_node = |bytes: u64| bytes as f64 / IDLE.as_secs_f64() / nodes as f64;
        (per_node(after - before), per_node(sent_after - sent_before))
    });
    for i in 0..nodes {
        let _ = lab.stop(i);
    }
    RunResult {
        roles,
        addresses,
        idle_bps,
    }
}

fn median_max(mut times: Vec<Duration>) -> (f64, f64) {
    times.sort();
    let secs = |d: Duration| {
        if d == Duration::MAX {
            f64::INFINITY
        } else {
            d.as_secs_f64()
        }
    };
    (secs(times[times.len() / 2]), secs(times[times.len() - 1]))
}

fn main() {
    if !is_root() {
        println!("skipped: the roles benchmark needs root (it makes network namespaces)");
        return;
    }
    if let Some(nodes) = std::env::var("KAIROS_BENCH_IDLE_NODES")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    {
        let r = one_run(nodes, 0, true, Some(Duration::from_secs(40)));
        match r.idle_bps {
            Some((both, sent)) => println!(
                "idle traffic per node, {nodes} agents with roles, 40 s after, over {} s: \
                 {sent:.0} B/s sent on eth0 (goal < 400), {both:.0} B/s sent + received",
                IDLE.as_secs()
            ),
            None => println!("{nodes} agents: no roles within {LIMIT:?}"),
        }
        return;
    }
    let mut rows = Vec::new();
    let mut idle = None;
    for broadcast in [true, false] {
        for nodes in SIZES {
            let mut roles = Vec::new();
            let mut addresses = Vec::new();
            for run in 0..RUNS {
                let measure = broadcast && nodes == 10 && run == 0;
                let r = one_run(
                    nodes,
                    run,
                    broadcast,
                    measure.then(|| Duration::from_secs(5)),
                );
                roles.push(r.roles.unwrap_or(Duration::MAX));
                addresses.push(r.addresses.unwrap_or(Duration::MAX));
                idle = idle.or(r.idle_bps.map(|(both, _)| (nodes, both)));
            }
            rows.push((broadcast, nodes, median_max(roles), median_max(addresses)));
        }
    }
    println!();
    println!("| Roles, real agents on one LAN | median of {RUNS} | max | goal |");
    println!("|---|---|---|---|");
    for (broadcast, nodes, (rm, rx), (am, ax)) in rows {
        let lan = if broadcast {
            "eth0 with broadcast address"
        } else {
            "eth0 without broadcast address (derived from the netmask)"
        };
        let goal = if nodes == 10 {
            format!("< {} s", GOAL.as_secs())
        } else {
            String::new()
        };
        let verdict = if nodes != 10 {
            ""
        } else if rx < GOAL.as_secs_f64() {
            " (met)"
        } else if rm < GOAL.as_secs_f64() {
            " (median met, max not)"
        } else {
            " (NOT met)"
        };
        println!(
            "| {nodes} agents, {lan}: every agent holds a role | {rm:.2} s | {rx:.2} s | {goal}{verdict} |"
        );
        println!(
            "| {nodes} agents, {lan}: every agent has its VPN address | {am:.2} s | {ax:.2} s | |"
        );
    }
    if let Some((nodes, bps)) = idle {
        println!(
            "| idle traffic per node, {nodes} agents with roles (rx+tx on eth0, {} s) | {bps:.0} B/s | | |",
            IDLE.as_secs()
        );
    }
}
