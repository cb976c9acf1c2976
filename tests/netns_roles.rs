//! Real agents in network namespaces: master election, role assignment and VPN addresses over
//! real sockets, and the same roles and addresses again after every agent restarts from its
//! saved ledger.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::{Host, Lab, lab_with_hosts, wait_for};

/// How long a run may take to give every agent its role and address.
const ROLES_WITHIN: Duration = Duration::from_secs(30);

/// Lines of the host's log from line `skip` on (the lines of one run) containing `needle`.
fn lines_since(host: &Host, skip: usize, needle: &str) -> Vec<String> {
    std::fs::read_to_string(host.dir.join("agent.log"))
        .unwrap_or_default()
        .lines()
        .skip(skip)
        .filter(|l| l.contains(needle))
        .map(str::to_string)
        .collect()
}

/// Number of lines in the host's log so far.
fn log_len(host: &Host) -> usize {
    std::fs::read_to_string(host.dir.join("agent.log"))
        .unwrap_or_default()
        .lines()
        .count()
}

/// What follows `needle` on each matching line of the run.
fn values(host: &Host, skip: usize, needle: &str) -> Vec<String> {
    lines_since(host, skip, needle)
        .iter()
        .filter_map(|l| l.split(needle).nth(1))
        .map(|v| v.trim().to_string())
        .collect()
}

/// The cluster state one agent reported in one run.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Outcome {
    role: String,
    master: String,
    address: String,
}

fn outcome(host: &Host, skip: usize) -> Option<Outcome> {
    Some(Outcome {
        role: values(host, skip, "role assigned: ").pop()?,
        master: values(host, skip, "master elected: ").pop()?,
        // "VPN address A/24" (the cluster's lease) and "VPN address A/24 on edgevpn0" (the
        // TUN set up) come in either order: the address is the first word of both.
        address: values(host, skip, "VPN address ")
            .into_iter()
            .rfind(|v| v.starts_with("10.1.0."))?
            .split_whitespace()
            .next()?
            .to_string(),
    })
}

fn dump(hosts: &[Host], skip: &[usize]) {
    for (h, &s) in hosts.iter().zip(skip) {
        let log = std::fs::read_to_string(h.dir.join("agent.log")).unwrap_or_default();
        let interesting: Vec<&str> = log
            .lines()
            .skip(s)
            .filter(|l| l.contains(" INFO ") || l.contains(" WARN ") || l.contains(" ERROR "))
            .collect();
        eprintln!("--- {} ---\n{}", h.ns, interesting.join("\n"));
    }
}

/// Starts one agent per host, waits until each reported a role, the master and an address, and
/// returns what they reported and how long it took.
fn run(
    lab: &mut Lab,
    hosts: &[Host],
    uuids: &[String],
    config: &str,
    skip: &[usize],
) -> (Vec<Outcome>, Duration) {
    let start = Instant::now();
    for (h, uuid) in hosts.iter().zip(uuids) {
        lab.spawn_with_env(h, &["agent", "--config", config], &[("UUID", uuid)]);
    }
    let done = wait_for(ROLES_WITHIN, || {
        hosts
            .iter()
            .zip(skip)
            .all(|(h, &s)| outcome(h, s).is_some())
    });
    if done.is_none() {
        dump(hosts, skip);
        panic!("not every agent got a role, the master and an address within {ROLES_WITHIN:?}");
    }
    let elapsed = start.elapsed();
    let outcomes = hosts
        .iter()
        .zip(skip)
        .map(|(h, &s)| outcome(h, s).unwrap())
        .collect();
    (outcomes, elapsed)
}

/// Checks one run: one master, the others workers, one master uuid everywhere, distinct
/// addresses, and no agent that changed its mind or logged an error.
fn check_run(hosts: &[Host], uuids: &[String], skip: &[usize], outcomes: &[Outcome]) {
    let masters = outcomes.iter().filter(|o| o.role == "master").count();
    let workers = outcomes.iter().filter(|o| o.role == "worker").count();
    let elected: BTreeSet<&str> = outcomes.iter().map(|o| o.master.as_str()).collect();
    let addresses: BTreeSet<&str> = outcomes.iter().map(|o| o.address.as_str()).collect();
    let ok = masters == 1
        && workers == hosts.len() - 1
        && elected.len() == 1
        && addresses.len() == hosts.len();
    if !ok {
        dump(hosts, skip);
        panic!("unexpected cluster: {outcomes:#?}");
    }
    let master = elected.into_iter().next().unwrap();
    let master_index = outcomes.iter().position(|o| o.role == "master").unwrap();
    assert_eq!(
        uuids[master_index], master,
        "the node with the master role is the elected one"
    );
    for (h, &s) in hosts.iter().zip(skip) {
        let roles = values(h, s, "role assigned: ");
        assert_eq!(roles.len(), 1, "{}: one role per run, got {roles:?}", h.ns);
        let changed = lines_since(h, s, "VPN address changed");
        assert!(changed.is_empty(), "{}: address changed: {changed:?}", h.ns);
        let errors = lines_since(h, s, " ERROR ");
        assert!(errors.is_empty(), "{}: errors: {errors:?}", h.ns);
        let warnings = lines_since(h, s, " WARN ");
        if !warnings.is_empty() {
            eprintln!("{}: warnings:\n{}", h.ns, warnings.join("\n"));
        }
    }
}

#[test]
fn three_agents_elect_one_master_and_keep_roles_and_addresses_across_a_restart() {
    let (mut lab, config, hosts) = lab_with_hosts("roles3", "10.79.0", 3, "");
    let uuids: Vec<String> = (1..=3).map(|i| format!("netns-roles-node-{i}")).collect();

    // First start, empty state.
    let skip = vec![0; hosts.len()];
    let (first, took) = run(&mut lab, &hosts, &uuids, &config, &skip);
    eprintln!("first start: every agent had its role and address {took:?} after start");
    eprintln!("first run: {first:#?}");
    check_run(&hosts, &uuids, &skip, &first);

    // Let the last writes (address leases) reach every ledger, then stop all three.
    std::thread::sleep(Duration::from_millis(500));
    for (i, h) in hosts.iter().enumerate() {
        assert!(lab.stop(i).success(), "{}: clean stop", h.ns);
    }
    for h in &hosts {
        assert!(
            h.dir.join("state").join("ledger.snapshot").is_file(),
            "{}: ledger saved",
            h.ns
        );
    }

    // Restart with the same state: same roles and addresses.
    let skip: Vec<usize> = hosts.iter().map(log_len).collect();
    let (second, took) = run(&mut lab, &hosts, &uuids, &config, &skip);
    eprintln!("restart: every agent had its role and address {took:?} after start");
    check_run(&hosts, &uuids, &skip, &second);
    if first != second {
        dump(&hosts, &skip);
    }
    assert_eq!(first, second, "roles, master and addresses after a restart");

    // Never a second master, over both runs.
    let ever: BTreeSet<String> = hosts
        .iter()
        .flat_map(|h| values(h, 0, "master elected: "))
        .collect();
    assert_eq!(ever.len(), 1, "master uuids seen: {ever:?}");
    let lost: Vec<String> = hosts
        .iter()
        .flat_map(|h| lines_since(h, 0, "MASTER LOST"))
        .collect();
    assert!(lost.is_empty(), "master lost: {lost:?}");

    for i in hosts.len()..2 * hosts.len() {
        assert!(lab.stop(i).success(), "clean stop after the restart");
    }
}
