//! Benchmark (issue 16, goals 4 and 3): 1,000 simulated nodes of one token in 10 clusters
//! (`network_id`s) of 100 (see `kairos_p2p::sim::scale`): the virtual time until every cluster
//! has formed (every node holds a role, one master each), the wall time and the process's peak
//! RSS for it, replication counters, then the idle traffic per node after formation (one
//! cluster of 11 and one of 100 nodes). Prints numbers; asserts nothing.
//!
//! `cargo bench --bench scale`; `SIM_SEED` picks the seed, `SIM_BENCH_SCALE_NODES` the big
//! run's nodes per cluster (default 100; 30 and 50 give 300 and 500 nodes), and
//! `SIM_BENCH_IDLE_SECS` the idle measurement (default 60 virtual seconds). The big run runs
//! only with `SIM_BENCH_SCALE_BIG=1`: every node holds the network-wide buckets, one entry or
//! more per node of the whole token, so the work grows with nodes² (300 nodes form in 3.7 s
//! virtual but take ~1.8 min of CPU and 0.7 GB, 500 nodes ~4.6 min and 1.9 GB; see the README's
//! bench section), which `make bench` must not spend by default.

use std::time::{Duration, Instant};

use kairos_p2p::sim::scale::{ScaleRun, ScaleSpec, formation};
use kairos_p2p::sim::seed::seeds;

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The process's peak resident set size in MB (`VmHWM`), if Linux says.
fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// CPU time of the calling thread (the simulation runs on one), if the clock answers.
fn thread_cpu() -> Option<Duration> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the call to fill.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    (rc == 0).then(|| {
        Duration::new(
            u64::try_from(ts.tv_sec).unwrap_or(0),
            u32::try_from(ts.tv_nsec).unwrap_or(0),
        )
    })
}

fn idle_line(run: &mut ScaleRun, idle: Duration) -> String {
    match run.idle_bytes_per_node(idle) {
        Ok(traffic) => traffic.to_string(),
        Err(e) => format!("failed: {e}"),
    }
}

/// Formation of `clusters` x `per_cluster` nodes, then the idle traffic; prints as it goes.
fn scale(seed: u64, clusters: usize, per_cluster: usize, idle: Duration, rss: bool) {
    let spec = ScaleSpec::new(seed, clusters, per_cluster);
    let nodes = spec.nodes();
    let wall = Instant::now();
    let cpu = thread_cpu();
    let (mut run, report) = match formation(spec) {
        Ok(r) => r,
        Err(e) => {
            println!("{nodes} nodes: simulation failed: {e}");
            return;
        }
    };
    let formed = report
        .clusters
        .values()
        .filter(|c| c.with_role == c.nodes && c.masters == 1);
    let cpu = match (cpu, thread_cpu()) {
        (Some(a), Some(b)) => format!("{:.1} s", b.saturating_sub(a).as_secs_f64()),
        _ => "unknown".to_string(),
    };
    println!(
        "{nodes} nodes ({clusters} x {per_cluster}): formed {} | {} of {clusters} clusters with \
         every role and one master | {:.1} s wall (goal < 120), {cpu} of CPU | {} steps",
        match report.formed_at {
            Some(t) => format!("at {:.2} s virtual (goal < 10)", t.as_secs_f64()),
            None => format!("NOT within {:?} virtual", spec.limit),
        },
        formed.count(),
        wall.elapsed().as_secs_f64(),
        report.steps,
    );
    if rss {
        match peak_rss_mb() {
            Some(mb) => println!("  peak RSS of the process: {mb:.0} MB (goal < 2048)"),
            None => println!("  peak RSS: unknown (no /proc/self/status)"),
        }
    }
    let r = report.replication;
    let n = nodes.max(1) as f64;
    println!(
        "  replication per node until formed: {:.0} messages sent, {:.1} KB sent, {:.0} entries \
         fresh, {:.0} stale (redundancy {:.1}x), {:.0} announced, {:.0} asked for",
        r.messages_out as f64 / n,
        r.bytes_out as f64 / n / 1e3,
        r.entries_fresh as f64 / n,
        r.entries_stale as f64 / n,
        r.entries_stale as f64 / (r.entries_fresh.max(1)) as f64,
        r.entries_announced as f64 / n,
        r.entries_asked as f64 / n,
    );
    let l = report.ledgers;
    let held = l.nodes.max(1) as f64;
    println!(
        "  ledger per node when formed: {:.0} entries, {:.0} KB ({:.0} % of the entries in other \
         clusters' buckets)",
        l.entries as f64 / held,
        l.bytes as f64 / held / 1e3,
        100.0 * l.other_clusters as f64 / (l.entries.max(1)) as f64,
    );
    if report.formed_at.is_some() {
        // Settle (the last roles and addresses, DHT refreshes), then measure.
        if let Err(e) = run.sim.run_for(Duration::from_secs(20)) {
            println!("  idle: simulation failed: {e}");
            return;
        }
        println!(
            "  idle after formation, over {idle:?}: {}",
            idle_line(&mut run, idle)
        );
    }
}

fn main() {
    // `cargo bench` passes `--bench`; ignore arguments.
    let seed = seeds(&[1])[0];
    let per_cluster = env_num("SIM_BENCH_SCALE_NODES", 100) as usize;
    let idle = Duration::from_secs(env_num("SIM_BENCH_IDLE_SECS", 60));
    println!("simulator scale benchmark, seed {seed}");
    // The big run first: the peak RSS printed is its own.
    if env_num("SIM_BENCH_SCALE_BIG", 0) == 1 {
        scale(seed, 10, per_cluster, idle, true);
    } else {
        println!(
            "{} nodes (10 x {per_cluster}): skipped (SIM_BENCH_SCALE_BIG=1 runs it; work grows \
             with nodes², 500 nodes take ~4.6 min of CPU and 1.9 GB)",
            10 * per_cluster
        );
    }
    scale(seed, 1, 11, idle, false);
    scale(seed, 1, 100, idle, false);
}
