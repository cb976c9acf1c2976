//! Benchmark (issue 13): cluster formation across two NATed sites with real agents in network
//! namespaces (the lab of `tests/netns_sites.rs`: two sites of two nodes behind their own NAT
//! routers, a public node that is the only bootstrap peer, the k3s stand-in). From the sites'
//! agents started until one cluster holds (every node has a role and runs k3s, exactly one
//! new-cluster server runs, one node holds a master role), with the public node started
//!
//! - with the sites (0 s late): the discovery gate's cost when every path is there at boot,
//! - 10 s after them: within the gate's bound (one election, the gate waits for the bootstrap
//!   peer),
//! - 35 s after them: past the bound (each site elects its own master; the merge folds the
//!   younger cluster into the older one, `p2p.auto.merge_window` 600 s by default).
//!
//! Median, min and max over runs, each with fresh namespaces, roots and state. Needs root;
//! skips with a message otherwise. Asserts nothing: a failed run prints why and the others
//! continue. `KAIROS_BENCH_SITES_RUNS`: runs per case (default 3).

#[path = "../common/mod.rs"]
mod common;
#[path = "../sites/mod.rs"]
mod sites;
#[path = "../standin/mod.rs"]
mod standin;

use std::time::{Duration, Instant};

use common::{is_root, wait_for};
use sites::{Sites, one_cluster};

const DEFAULT_RUNS: usize = 3;
/// How late the public node starts, per case.
const LATE: [Duration; 3] = [
    Duration::from_secs(0),
    Duration::from_secs(10),
    Duration::from_secs(35),
];
/// A run that has not formed this long after the public node started failed.
const LIMIT: Duration = Duration::from_secs(90);

fn runs() -> usize {
    std::env::var("KAIROS_BENCH_SITES_RUNS")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(DEFAULT_RUNS)
}

/// One run: the time from the sites' start until one cluster holds.
fn one_run(case: usize, run: usize, late: Duration) -> Result<Duration, String> {
    let mut sites = Sites::new(&format!("bsites{case}{run}"), "");
    let t0 = Instant::now();
    sites.start_sites();
    if !late.is_zero() {
        std::thread::sleep(late);
    }
    sites.start_public();
    match wait_for(LIMIT, || one_cluster(&sites)) {
        Some(_) => Ok(t0.elapsed()),
        None => {
            sites.dump();
            Err(format!(
                "no single cluster within {LIMIT:?} of the public node's start"
            ))
        }
    }
}

fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

fn main() {
    if !is_root() {
        println!("skipped: the sites benchmark needs root (it makes network namespaces)");
        return;
    }
    let runs = runs();
    let began = Instant::now();
    let mut rows = Vec::new();
    for (case, late) in LATE.into_iter().enumerate() {
        let mut ok = Vec::new();
        for run in 0..runs {
            match one_run(case, run, late) {
                Ok(t) => {
                    println!(
                        "public node {} late, run {}: {}",
                        secs(late),
                        run + 1,
                        secs(t)
                    );
                    ok.push(t);
                }
                Err(why) => println!(
                    "public node {} late, run {}: FAILED: {why}",
                    secs(late),
                    run + 1
                ),
            }
        }
        rows.push((late, ok));
    }
    println!();
    println!(
        "| Formation across two NATed sites (real agents, k3s stand-in), from the sites' start | median | min | max | runs ok |"
    );
    println!("|---|---|---|---|---|");
    for (late, mut ok) in rows {
        let what = format!("public bootstrap node {} late", secs(late));
        if ok.is_empty() {
            println!("| {what} | no run formed | | | 0/{runs} |");
            continue;
        }
        ok.sort();
        println!(
            "| {what} | {} | {} | {} | {}/{runs} |",
            secs(ok[ok.len() / 2]),
            secs(ok[0]),
            secs(ok[ok.len() - 1]),
            ok.len()
        );
    }
    println!("(bench took {})", secs(began.elapsed()));
}
