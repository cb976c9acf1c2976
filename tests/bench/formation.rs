//! Benchmark (issue 6): cluster formation time with real agents in network namespaces on one
//! LAN (bridge) and `tests/k3s-standin` as k3s, each node under its own `KAIROS_P2P_ROOT`. One
//! config for all (a token from `kairos-p2p generate-token`, `disable_dht: true`). For 4 and 10
//! nodes, from the agents started until:
//!
//! - every node holds a role (`role assigned:` in its log),
//! - the master's `k3s server` is ready (its stand-in logged `ready`),
//! - every node's k3s step is done (formed): every node holds a role and its stand-in logged
//!   `ready` in the mode of that role (`server` for masters, `agent` for workers),
//!
//! and the k3s phase alone (every role held -> formed) and the workers' part of it (the master's
//! k3s ready -> formed). Median, min and max over runs, each run with fresh namespaces, roots and
//! state. Needs root (it makes its own namespaces); skips with a message otherwise. Asserts
//! nothing: a failed run prints why and the others continue.
//!
//! `KAIROS_BENCH_FORMATION_RUNS`: runs per size (default 5). Times are polled every 20 ms.

#[path = "../common/mod.rs"]
mod common;
#[path = "../standin/mod.rs"]
mod standin;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{Host, Lab, is_root, lan_config, log_lines};
use standin::{STANDIN, read_log};

const SIZES: [usize; 2] = [4, 10];
const DEFAULT_RUNS: usize = 5;
/// A run that has not formed by then failed.
const LIMIT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(20);
const GOAL: Duration = Duration::from_secs(5);

fn runs() -> usize {
    std::env::var("KAIROS_BENCH_FORMATION_RUNS")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(DEFAULT_RUNS)
}

struct Node {
    host: Host,
    root: PathBuf,
}

impl Node {
    /// The last role the agent logged.
    fn role(&self) -> Option<String> {
        log_lines(&self.host, "role assigned: ")
            .pop()
            .and_then(|l| {
                l.split("role assigned: ")
                    .nth(1)
                    .map(|r| r.trim().to_string())
            })
    }

    /// Whether the stand-in logged `ready` in the k3s mode of `role`.
    fn ready_as(&self, role: &str) -> bool {
        let mode = if role.starts_with("master") {
            "server"
        } else {
            "agent"
        };
        read_log(&self.root)
            .iter()
            .any(|r| r.event() == "ready" && r.mode() == mode)
    }
}

/// Times of one run, from the agents started.
struct Times {
    roles: Duration,
    master_ready: Duration,
    formed: Duration,
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

/// One formation of `nodes` agents in a fresh lab; `Err` says why it failed.
fn one_run(nodes: usize, run: usize) -> Result<Times, String> {
    // A one-letter name: veth names (pid, lab number, name, host) must fit in 15 bytes.
    let mut lab = Lab::new("f");
    let config = lan_config(&lab.dir, "config.yaml");
    let config = config.to_str().unwrap().to_string();
    let cluster: Vec<Node> = (1..=nodes)
        .map(|i| {
            let host = lab.add_host(i, &format!("10.92.{nodes}.{i}/24"));
            let root = host.dir.join("root");
            std::fs::create_dir_all(&root).unwrap();
            Node { host, root }
        })
        .collect();
    // Links are up well before an agent starts on a real board.
    std::thread::sleep(Duration::from_secs(1));

    let start = Instant::now();
    for (i, n) in cluster.iter().enumerate() {
        let uuid = format!("bench-formation-{nodes}-{run}-{i}");
        lab.spawn_with_env(
            &n.host,
            &["agent", "--config", &config],
            &[
                ("UUID", uuid.as_str()),
                ("KAIROS_P2P_ROOT", n.root.to_str().unwrap()),
                ("KAIROS_P2P_K3S", STANDIN),
                // Info is enough here; debug logs cost the two cores time to write and read.
                ("KAIROS_P2P_LOG", "info"),
            ],
        );
    }

    let (mut roles, mut master_ready, mut formed) = (None, None, None);
    while formed.is_none() && start.elapsed() < LIMIT {
        std::thread::sleep(POLL);
        let now = start.elapsed();
        let role_of: Vec<Option<String>> = cluster.iter().map(Node::role).collect();
        if roles.is_none() && role_of.iter().all(Option::is_some) {
            roles = Some(now);
        }
        if master_ready.is_none()
            && cluster.iter().zip(&role_of).any(|(n, r)| {
                r.as_deref().is_some_and(|r| r.starts_with("master")) && n.ready_as("master")
            })
        {
            master_ready = Some(now);
        }
        if roles.is_some()
            && cluster
                .iter()
                .zip(&role_of)
                .all(|(n, r)| r.as_deref().is_some_and(|r| n.ready_as(r)))
        {
            formed = Some(now);
        }
    }

    // What went wrong or looks odd, for the run's line.
    let mut problems = Vec::new();
    let role_of: Vec<Option<String>> = cluster.iter().map(Node::role).collect();
    let masters = role_of
        .iter()
        .filter(|r| r.as_deref().is_some_and(|r| r.starts_with("master")))
        .count();
    if masters != 1 {
        problems.push(format!("{masters} masters"));
    }
    let created: usize = cluster
        .iter()
        .map(|n| {
            read_log(&n.root)
                .iter()
                .filter(|r| r.created_cluster())
                .count()
        })
        .sum();
    if formed.is_some() && created != 1 {
        problems.push(format!("{created} k3s clusters created"));
    }
    for (n, role) in cluster.iter().zip(&role_of) {
        let ns = &n.host.ns;
        match role {
            None => problems.push(format!("{ns}: no role")),
            Some(r) if !n.ready_as(r) => {
                let log = read_log(&n.root);
                problems.push(format!(
                    "{ns}: role {r}, k3s not ready; stand-in log:\n{}",
                    if log.is_empty() {
                        "  (empty)".to_string()
                    } else {
                        standin::describe(&log)
                    }
                ));
            }
            Some(_) => {}
        }
        if log_lines(&n.host, "role assigned: ").len() > 1 {
            problems.push(format!("{ns}: {:?}", log_lines(&n.host, "role assigned: ")));
        }
        for needle in [" WARN ", " ERROR "] {
            for l in log_lines(&n.host, needle) {
                problems.push(format!("{ns}: {l}"));
            }
        }
    }

    // Agents first (so none restarts its k3s), then any stand-in left, by pid; the lab then
    // deletes its namespaces and directory.
    for i in 0..nodes {
        lab.kill(i);
    }
    for n in &cluster {
        standin::kill_all(&n.root);
    }

    let fmt = |t: Option<Duration>| t.map_or_else(|| format!("not within {LIMIT:?}"), secs);
    println!(
        "{nodes} nodes, run {}: roles {}; master's k3s ready {}; formed {}{}",
        run + 1,
        fmt(roles),
        fmt(master_ready),
        fmt(formed),
        if problems.is_empty() {
            String::new()
        } else {
            format!("\n  PROBLEMS:\n  {}", problems.join("\n  "))
        }
    );
    match (roles, master_ready, formed) {
        (Some(roles), Some(master_ready), Some(formed)) => Ok(Times {
            roles,
            master_ready,
            formed,
        }),
        _ => Err(problems.join("; ")),
    }
}

/// `(median, min, max)` in seconds.
fn stats(mut times: Vec<Duration>) -> (f64, f64, f64) {
    times.sort();
    let s = |d: Duration| d.as_secs_f64();
    (
        s(times[times.len() / 2]),
        s(times[0]),
        s(times[times.len() - 1]),
    )
}

fn main() {
    if !is_root() {
        println!("skipped: the formation benchmark needs root (it makes network namespaces)");
        return;
    }
    let runs = runs();
    let began = Instant::now();
    let mut results = Vec::new();
    for nodes in SIZES {
        let mut ok = Vec::new();
        for run in 0..runs {
            match one_run(nodes, run) {
                Ok(t) => ok.push(t),
                Err(why) => println!("{nodes} nodes, run {}: FAILED: {why}", run + 1),
            }
        }
        results.push((nodes, ok));
    }

    println!();
    println!(
        "| Formation, real agents on one LAN, k3s stand-in | median | min | max | runs ok | goal | Kairos |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (nodes, ok) in &results {
        if ok.is_empty() {
            println!("| {nodes} nodes | no run formed | | | 0/{runs} | | |");
            continue;
        }
        let count = format!("{}/{runs}", ok.len());
        let rows: [(&str, Vec<Duration>); 5] = [
            (
                "every node holds a role",
                ok.iter().map(|t| t.roles).collect(),
            ),
            (
                "the master's k3s server ready",
                ok.iter().map(|t| t.master_ready).collect(),
            ),
            (
                "k3s phase alone (every role held -> formed)",
                ok.iter().map(|t| t.formed - t.roles).collect(),
            ),
            (
                "workers' k3s after the master's (master's k3s ready -> formed)",
                ok.iter()
                    .map(|t| t.formed.saturating_sub(t.master_ready))
                    .collect(),
            ),
            (
                "**formed**: every node's k3s ready",
                ok.iter().map(|t| t.formed).collect(),
            ),
        ];
        for (what, times) in rows {
            let (med, min, max) = stats(times);
            let (goal, kairos) = if what.starts_with("**formed**") {
                let verdict = if max < GOAL.as_secs_f64() {
                    "met"
                } else if med < GOAL.as_secs_f64() {
                    "median met, max not"
                } else {
                    "NOT met"
                };
                (
                    format!("< {} s with the stand-in ({verdict})", GOAL.as_secs()),
                    "users report > 5 minutes",
                )
            } else {
                (String::new(), "")
            };
            println!(
                "| {nodes} nodes: {what} | {med:.2} s | {min:.2} s | {max:.2} s | {count} | {goal} | {kairos} |"
            );
        }
    }
    println!();
    println!(
        "From the agents started (namespaces already up); times polled every {} ms; whole benchmark {:.0} s.",
        POLL.as_millis(),
        began.elapsed().as_secs_f64()
    );
}
