//! Real faults on real agents in network namespaces, each followed by a measured recovery:
//! 20% random packet loss, a link cut for longer than the liveness timeout, kill -9 of the
//! master and of a worker, a full state disk (with a kill -9 there), and the TUN interface
//! deleted under the agent (once freely, once with its name taken by another interface), and
//! the agent out of file descriptors.
//! Every scenario prints `fault: <name>: converged again in X.XX s`; the bounds asserted are
//! generous (these are tests, not benchmarks).

mod common;

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{
    Host, api_request, api_socket, is_root, lab_with_hosts, log_lines, metric, pings, sh, unix_get,
    vpn_addr, wait_for,
};

/// Generous bound for any convergence after a fault.
const CONVERGE: Duration = Duration::from_secs(30);
/// The liveness timeout the agents run with (seconds), short so that a cut outlasts it quickly.
const LIVENESS_SECS: u64 = 4;

/// Waits until every ordered pair of hosts pings over the VPN; how long it took.
fn all_pairs_ping(hosts: &[Host], addrs: &[String], limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    for (i, from) in hosts.iter().enumerate() {
        for (j, to) in addrs.iter().enumerate() {
            if i != j {
                let left = limit.saturating_sub(start.elapsed());
                wait_for(left, || pings(from, to))?;
            }
        }
    }
    Some(start.elapsed())
}

/// Every agent's VPN address, waiting up to `limit` for them.
fn vpn_addrs(hosts: &[Host], limit: Duration) -> Vec<String> {
    hosts
        .iter()
        .map(|h| {
            wait_for(limit, || vpn_addr(h, "edgevpn0").is_some())
                .unwrap_or_else(|| panic!("{} got no VPN address", h.ns));
            vpn_addr(h, "edgevpn0").unwrap()
        })
        .collect()
}

fn summary(host: &Host) -> serde_json::Value {
    serde_json::from_str(&unix_get(&api_socket(host), "/api/summary"))
        .unwrap_or(serde_json::Value::Null)
}

/// The role each agent holds (`""`: none yet, or its API does not answer).
fn roles(hosts: &[Host]) -> Vec<String> {
    hosts
        .iter()
        .map(|h| summary(h)["Role"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// Every agent holds a role and exactly one holds `master`.
fn one_master(hosts: &[Host]) -> bool {
    let r = roles(hosts);
    r.iter().all(|r| !r.is_empty()) && r.iter().filter(|r| *r == "master").count() == 1
}

/// Every `master elected: <uuid>` line any agent logged names the same node.
fn masters_ever_elected(hosts: &[Host]) -> Vec<String> {
    let mut all: Vec<String> = hosts
        .iter()
        .flat_map(|h| log_lines(h, "master elected: "))
        .filter_map(|l| Some(l.split("master elected: ").nth(1)?.trim().to_string()))
        .collect();
    all.sort();
    all.dedup();
    all
}

/// Stores `bucket/key = value` through the host's API; returns the status line and the body.
fn put(host: &Host, bucket: &str, key: &str, value: &str) -> (String, String) {
    let (status, _, body) = api_request(
        &api_socket(host),
        "PUT",
        &format!("/api/ledger/{bucket}/{key}/{value}"),
    );
    (status, body)
}

/// Whether the host's ledger holds `bucket/key` with `value`.
fn holds(host: &Host, bucket: &str, key: &str, value: &str) -> bool {
    unix_get(&api_socket(host), &format!("/api/ledger/{bucket}/{key}")).contains(value)
}

fn metrics(host: &Host) -> String {
    unix_get(&api_socket(host), "/metrics")
}

/// CPU time (user + system) the process has used so far.
fn cpu_time(pid: u32) -> Duration {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) close with ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks: u64 = fields
        .get(11..13)
        .unwrap_or_default()
        .iter()
        .filter_map(|f| f.parse::<u64>().ok())
        .sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_millis(ticks * 1000 / hz)
}

/// CPU the process used over `window`, as a fraction of one core.
fn cpu_share(pid: u32, window: Duration) -> f64 {
    let before = cpu_time(pid);
    std::thread::sleep(window);
    (cpu_time(pid) - before).as_secs_f64() / window.as_secs_f64()
}

fn report(name: &str, took: Duration) {
    eprintln!(
        "fault: {name}: converged again in {:.2} s",
        took.as_secs_f64()
    );
}

/// Prints the agents' warnings and errors (for a failed scenario).
fn dump(hosts: &[Host]) {
    for h in hosts {
        let lines = log_lines(h, " WARN ")
            .into_iter()
            .chain(log_lines(h, " ERROR "))
            .collect::<Vec<_>>();
        eprintln!("--- {} ---\n{}", h.ns, lines.join("\n"));
    }
}

fn iptables(host: &Host, op: &str, chain: &str, rule: &[&str]) {
    let mut args = vec!["ip", "netns", "exec", &host.ns, "iptables", op, chain];
    args.extend_from_slice(rule);
    sh(&args).unwrap();
}

const LOSS_RULE: [&str; 10] = [
    "-i",
    "eth0",
    "-m",
    "statistic",
    "--mode",
    "random",
    "--probability",
    "0.2",
    "-j",
    "DROP",
];

#[test]
fn the_cluster_converges_again_after_packet_loss_a_cut_link_and_kill_9() {
    if !is_root() {
        eprintln!("skipped: needs root (network namespaces)");
        return;
    }
    let (mut lab, config, hosts) = lab_with_hosts(
        "faults",
        "10.79.0",
        4,
        &format!("  liveness_timeout: {LIVENESS_SECS}\n"),
    );
    let uuids: Vec<String> = (1..=4).map(|i| format!("netns-faults-node-{i}")).collect();
    let args = ["agent", "--config", config.as_str()];

    // 1. 20% of the packets every agent receives are dropped, from before the start.
    for h in &hosts {
        iptables(h, "-A", "INPUT", &LOSS_RULE);
    }
    let start = Instant::now();
    let mut children: Vec<usize> = hosts
        .iter()
        .zip(&uuids)
        .map(|(h, u)| lab.spawn_with_env(h, &args, &[("UUID", u.as_str())]))
        .collect();
    let addrs = vpn_addrs(&hosts, CONVERGE);
    let mut sorted = addrs.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), hosts.len(), "distinct addresses: {addrs:?}");
    if all_pairs_ping(&hosts, &addrs, CONVERGE).is_none() {
        dump(&hosts);
        panic!("with 20% loss, not every pair pings over the VPN");
    }
    assert!(
        wait_for(CONVERGE, || one_master(&hosts)).is_some(),
        "roles with 20% loss: {:?}",
        roles(&hosts)
    );
    let (status, body) = put(&hosts[0], "faults", "lossy", "written-under-loss");
    assert_eq!(status, "HTTP/1.1 200 OK", "PUT on {}: {body}", hosts[0].ns);
    let spread = wait_for(CONVERGE, || {
        hosts
            .iter()
            .all(|h| holds(h, "faults", "lossy", "written-under-loss"))
    });
    assert!(spread.is_some(), "a ledger write reaches every agent");
    report(
        "20% packet loss (start to VPN, roles, ledger)",
        start.elapsed(),
    );
    for h in &hosts {
        iptables(h, "-D", "INPUT", &LOSS_RULE);
    }
    let took = all_pairs_ping(&hosts, &addrs, CONVERGE).expect("pings after the loss ends");
    report("loss removed", took);

    let before_roles = roles(&hosts);
    let master = before_roles
        .iter()
        .position(|r| r == "master")
        .expect("a master");
    let worker = (master + 1) % hosts.len();

    // 2. The master's link is cut (its veth in the hub goes down) for longer than the liveness
    // timeout, then restored.
    let hub = format!("{}-hub", lab.name);
    let outer = format!("v{}h{}", lab.name.trim_start_matches("kp"), master + 1);
    sh(&["ip", "-n", &hub, "link", "set", &outer, "down"]).unwrap();
    let others: Vec<Host> = hosts
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != master)
        .map(|(_, h)| h.clone())
        .collect();
    assert!(
        wait_for(Duration::from_secs(5), || !pings(
            &others[0],
            &addrs[master]
        ))
        .is_some(),
        "the cut master is unreachable"
    );
    std::thread::sleep(Duration::from_secs(LIVENESS_SECS + 2));
    sh(&["ip", "-n", &hub, "link", "set", &outer, "up"]).unwrap();
    let took = all_pairs_ping(&hosts, &addrs, CONVERGE);
    if took.is_none() {
        dump(&hosts);
        panic!("the master did not rejoin after its link came back");
    }
    report("master's link cut and restored", took.unwrap());
    for line in metrics(&hosts[master]).lines() {
        if line.starts_with("kairos_p2p_errors_total{") && !line.ends_with(" 0") {
            eprintln!("master after the cut: {line}");
        }
    }
    assert_eq!(roles(&hosts), before_roles, "same roles after the cut");
    assert_eq!(
        masters_ever_elected(&hosts),
        [uuids[master].clone()],
        "never a second master"
    );

    // 3. kill -9 of the master, then of a worker; each restarted on its state directory.
    for (victim, name) in [
        (master, "kill -9 of the master"),
        (worker, "kill -9 of a worker"),
    ] {
        lab.kill(children[victim]);
        assert!(
            wait_for(Duration::from_secs(5), || !pings(
                &hosts[(victim + 1) % hosts.len()],
                &addrs[victim]
            ))
            .is_some(),
            "{name}: the agent is gone"
        );
        let start = Instant::now();
        children[victim] =
            lab.spawn_with_env(&hosts[victim], &args, &[("UUID", uuids[victim].as_str())]);
        let back = all_pairs_ping(&hosts, &addrs, CONVERGE);
        if back.is_none() {
            dump(&hosts);
            panic!("{name}: not every pair pings again");
        }
        assert!(
            wait_for(CONVERGE, || roles(&hosts) == before_roles).is_some(),
            "{name}: roles {:?}, before {before_roles:?}",
            roles(&hosts)
        );
        report(name, start.elapsed());
        assert_eq!(
            vpn_addr(&hosts[victim], "edgevpn0").as_deref(),
            Some(addrs[victim].as_str()),
            "{name}: same VPN address"
        );
    }
    assert_eq!(
        masters_ever_elected(&hosts),
        [uuids[master].clone()],
        "never a second master"
    );
    for (h, &c) in hosts.iter().zip(&children) {
        assert!(lab.running(c), "{} still running", h.ns);
    }
    let alarms: Vec<String> = hosts
        .iter()
        .flat_map(|h| log_lines(h, "MASTER LOST"))
        .collect();
    for line in &alarms {
        eprintln!("alarm logged: {line}");
    }
    assert!(
        !alarms.is_empty(),
        "the cut outlasted the liveness timeout: the others noticed the master was gone"
    );
}

/// A tmpfs mounted by the test, unmounted when dropped (a failed test included).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        fs::create_dir_all(dir).unwrap();
        let options = format!("size={size},mode=0700");
        sh(&[
            "mount",
            "-t",
            "tmpfs",
            "-o",
            &options,
            "tmpfs",
            dir.to_str().unwrap(),
        ])
        .unwrap();
        Tmpfs(dir.to_path_buf())
    }

    /// Fills the file system with `<dir>/filler` until it is full.
    fn fill(&self) -> PathBuf {
        let path = self.0.join("filler");
        let mut file = fs::File::create(&path).unwrap();
        let block = vec![0u8; 16 * 1024];
        while file.write_all(&block).is_ok() {}
        let _ = file.sync_all();
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = sh(&["umount", "-l", self.0.to_str().unwrap()]);
    }
}

#[test]
fn an_agent_lives_through_a_full_state_disk_and_a_deleted_tun_interface() {
    if !is_root() {
        eprintln!("skipped: needs root (network namespaces, tmpfs)");
        return;
    }
    let (mut lab, config, hosts) = lab_with_hosts("diskfull", "10.79.1", 2, "");
    // Dropped before the lab: unmounted before the lab removes its directory.
    let state = Tmpfs::mount(&hosts[0].dir.join("state"), "1m");
    let args = ["agent", "--config", config.as_str()];
    let children: Vec<usize> = hosts
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let uuid = format!("netns-diskfull-node-{}", i + 1);
            lab.spawn_with_env(h, &args, &[("UUID", uuid.as_str())])
        })
        .collect();
    let addrs = vpn_addrs(&hosts, CONVERGE);
    all_pairs_ping(&hosts, &addrs, CONVERGE).expect("the VPN works");
    let snapshot = state.0.join("ledger.snapshot");
    assert!(
        wait_for(CONVERGE, || snapshot.is_file()).is_some(),
        "ledger saved"
    );

    // 4. The state disk fills up: writes fail, the agent keeps running and forwarding.
    let filler = state.fill();
    // A write is answered once saved. Small journal appends may still fit in the file's last
    // page; once one does not, the answer says the write is made and gossiped but not saved.
    let mut refused = None;
    for i in 0..500 {
        let key = format!("nospace-key-{i:03}");
        let (status, body) = put(&hosts[0], "faults", &key, "written-on-a-full-disk");
        if status == "HTTP/1.1 500 Internal Server Error" {
            assert!(body.contains("not saved"), "{body}");
            refused = Some(key);
            break;
        }
        assert_eq!(status, "HTTP/1.1 200 OK", "{body}");
    }
    let key = refused.expect("a write on the full disk is answered 'not saved'");
    let on_disk = |path: &std::path::Path| {
        fs::read(path).is_ok_and(|b| b.windows(key.len()).any(|w| w == key.as_bytes()))
    };
    let journal = state.0.join("ledger.snapshot.journal");
    let errors = wait_for(Duration::from_secs(10), || {
        metric(
            &metrics(&hosts[0]),
            "kairos_p2p_errors_total{kind=\"ledger_save\"}",
        ) >= 1
    });
    assert!(errors.is_some(), "the failed save is counted");
    let logged = log_lines(&hosts[0], "No space left on device");
    assert!(
        logged
            .iter()
            .any(|l| l.contains(" ERROR ") && l.contains(snapshot.to_str().unwrap())),
        "a clear error naming the file: {logged:?}"
    );
    assert!(
        wait_for(Duration::from_secs(10), || holds(
            &hosts[1],
            "faults",
            &key,
            "written-on-a-full-disk"
        ))
        .is_some(),
        "the write still replicates"
    );
    let pid = lab.pid(children[0]);
    let share = cpu_share(pid, Duration::from_secs(4));
    eprintln!("full disk: agent CPU {:.1}% of a core", share * 100.0);
    assert!(
        share < 0.25,
        "no busy loop on a full disk: {share:.2} of a core"
    );
    let saves = metric(
        &metrics(&hosts[0]),
        "kairos_p2p_errors_total{kind=\"ledger_save\"}",
    );
    eprintln!("full disk: {saves} failed save(s) so far");
    assert!(
        saves <= 4,
        "saves retried with a back-off, not {saves} times"
    );
    assert!(
        !on_disk(&snapshot) && !on_disk(&journal),
        "nothing could be saved on the full disk"
    );
    assert!(pings(&hosts[1], &addrs[0]), "the VPN works on a full disk");
    assert!(lab.running(children[0]), "the agent runs on a full disk");

    // kill -9 on the full disk, and a restart there: it comes back with its address.
    lab.kill(children[0]);
    let restarted = Instant::now();
    let agent = lab.spawn_with_env(&hosts[0], &args, &[("UUID", "netns-diskfull-node-1")]);
    let back = wait_for(CONVERGE, || {
        vpn_addr(&hosts[0], "edgevpn0").as_deref() == Some(addrs[0].as_str())
            && pings(&hosts[1], &addrs[0])
    });
    if back.is_none() {
        dump(&hosts);
        panic!("the agent did not come back on a full disk");
    }
    report(
        "kill -9 and restart on the full state disk",
        restarted.elapsed(),
    );
    assert!(
        wait_for(Duration::from_secs(10), || holds(
            &hosts[0],
            "faults",
            &key,
            "written-on-a-full-disk"
        ))
        .is_some(),
        "the write made before the crash came back from the peer"
    );
    let pid = lab.pid(agent);

    // Space comes back: the snapshot is written again, with the write made meanwhile.
    fs::remove_file(&filler).unwrap();
    let freed = Instant::now();
    let persisted = wait_for(CONVERGE, || on_disk(&snapshot) || on_disk(&journal));
    assert!(
        persisted.is_some(),
        "the ledger is saved again once space is freed"
    );
    report(
        "state disk full, then freed (to saved again)",
        freed.elapsed(),
    );

    // 5. The TUN interface is deleted under the agent: it makes it again, with its address.
    let lost_before = metric(
        &metrics(&hosts[0]),
        "kairos_p2p_errors_total{kind=\"tun_lost\"}",
    );
    sh(&["ip", "-n", &hosts[0].ns, "link", "del", "edgevpn0"]).unwrap();
    let deleted = Instant::now();
    let back = wait_for(CONVERGE, || {
        vpn_addr(&hosts[0], "edgevpn0").as_deref() == Some(addrs[0].as_str())
            && pings(&hosts[1], &addrs[0])
    });
    if back.is_none() {
        dump(&hosts);
        panic!("the VPN interface was not made again");
    }
    report("TUN interface deleted", deleted.elapsed());
    all_pairs_ping(&hosts, &addrs, CONVERGE).expect("both ways");
    assert!(
        metric(
            &metrics(&hosts[0]),
            "kairos_p2p_errors_total{kind=\"tun_lost\"}"
        ) > lost_before,
        "the lost interface is counted"
    );
    assert!(
        !log_lines(&hosts[0], "VPN interface edgevpn0 is gone").is_empty(),
        "a clear error"
    );

    // 6. Deleted, and its name taken at once by another kind of interface: making it again
    // fails until the name is free, with a growing back-off and without a busy loop.
    let count = |kind: &str| {
        metric(
            &metrics(&hosts[0]),
            &format!("kairos_p2p_errors_total{{kind=\"{kind}\"}}"),
        )
    };
    let (lost_before, open_before) = (count("tun_lost"), count("tun_open"));
    let squat = "ip link del edgevpn0 && ip link add edgevpn0 type bridge";
    sh(&["ip", "netns", "exec", &hosts[0].ns, "sh", "-c", squat]).unwrap();
    let squatted = Instant::now();
    assert!(
        wait_for(Duration::from_secs(5), || count("tun_lost") > lost_before).is_some(),
        "the loss is noticed"
    );
    let share = cpu_share(pid, Duration::from_secs(3));
    eprintln!("TUN name taken: agent CPU {:.1}% of a core", share * 100.0);
    assert!(
        share < 0.25,
        "no busy loop while the TUN cannot be made: {share:.2}"
    );
    let failed = count("tun_open") - open_before;
    eprintln!(
        "TUN name taken: {failed} failed attempt(s) in {:.1} s",
        squatted.elapsed().as_secs_f64()
    );
    assert!(
        (1..=6).contains(&failed),
        "attempts back off (0.25, 0.5, 1, 2, 4 s): {failed} in {:?}",
        squatted.elapsed()
    );
    assert!(
        lab.running(agent),
        "the agent runs on while its TUN cannot be made"
    );
    sh(&["ip", "-n", &hosts[0].ns, "link", "del", "edgevpn0"]).unwrap();
    let freed = Instant::now();
    let back = wait_for(CONVERGE, || {
        vpn_addr(&hosts[0], "edgevpn0").as_deref() == Some(addrs[0].as_str())
            && pings(&hosts[1], &addrs[0])
    });
    if back.is_none() {
        dump(&hosts);
        panic!("the VPN interface was not made again once its name was free");
    }
    report("TUN name taken, then freed (from freed)", freed.elapsed());
    assert!(lab.running(agent), "the agent runs on");

    // 7. Out of file descriptors: API connections cannot be accepted; the agent logs it, stays
    // idle and keeps forwarding, and serves again once descriptors are back.
    let fds = fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count();
    let pid_arg = pid.to_string();
    let limit = |soft: &str| {
        let nofile = format!("--nofile={soft}:");
        sh(&["prlimit", "--pid", &pid_arg, &nofile]).unwrap();
    };
    limit(&fds.to_string());
    let queued = std::os::unix::net::UnixStream::connect(api_socket(&hosts[0])).unwrap();
    let refused = wait_for(Duration::from_secs(5), || {
        !log_lines(&hosts[0], "API: cannot accept a connection").is_empty()
    });
    let share = cpu_share(pid, Duration::from_secs(2));
    let forwarding = pings(&hosts[1], &addrs[0]);
    limit("1024");
    assert!(refused.is_some(), "the failed accept is logged");
    eprintln!("out of fds: agent CPU {:.1}% of a core", share * 100.0);
    assert!(share < 0.25, "no busy loop out of fds: {share:.2}");
    assert!(forwarding, "the VPN works out of fds");
    drop(queued);
    let restored = Instant::now();
    let serves = wait_for(Duration::from_secs(10), || {
        metric(
            &metrics(&hosts[0]),
            "kairos_p2p_errors_total{kind=\"api_accept\"}",
        ) >= 1
    });
    assert!(
        serves.is_some(),
        "the API serves again and counted the failure"
    );
    report("out of file descriptors, then restored", restored.elapsed());
    assert!(lab.running(agent), "the agent runs on");
    for line in log_lines(&hosts[0], " ERROR ") {
        eprintln!("agent 1 logged: {line}");
    }
    drop(state);
}
