//! A small network lab for end-to-end tests: network namespaces made by the test, joined by a
//! bridge, each running real agents. Everything is named after the test process id and removed
//! on drop (children killed by pid, namespaces deleted by name).

#![allow(dead_code)] // Each test binary uses part of the lab.

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Runs a command, failing with its stderr when it does not succeed.
pub fn sh(args: &[&str]) -> io::Result<()> {
    let out = Command::new(args[0]).args(&args[1..]).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "{}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Whether this machine lets us build namespaces (root with iproute2). Tests that need them
/// say so and fail when it does not: CI runs as root.
pub fn require_netns() {
    static PROBES: AtomicUsize = AtomicUsize::new(0);
    let probe = format!(
        "kp-probe-{}-{}",
        std::process::id(),
        PROBES.fetch_add(1, Ordering::Relaxed)
    );
    sh(&["ip", "netns", "add", &probe]).expect("these tests need root and iproute2 (ip netns)");
    sh(&["ip", "netns", "del", &probe]).expect("ip netns del");
}

/// A lab: one hub namespace with a bridge, hosts attached to it.
pub struct Lab {
    pub name: String,
    pub dir: PathBuf,
    hub: String,
    namespaces: Vec<String>,
    children: Vec<Child>,
}

/// How a NAT site's router translates and filters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NatKind {
    /// Port-preserving MASQUERADE plus a stateful firewall that drops unsolicited packets: the
    /// usual home router (endpoint-independent mapping, address-dependent filtering).
    HomeRouter,
    /// MASQUERADE alone: the router answers unsolicited packets itself, and whether a punch
    /// works depends on which packet creates the conntrack entry first.
    PlainMasquerade,
    /// MASQUERADE with a random port per destination plus the firewall: a symmetric NAT, where
    /// the port a third peer observes is useless to anyone else.
    Symmetric,
}

/// A NAT router and the private network behind it.
#[derive(Clone, Debug)]
pub struct Site {
    pub router: Host,
    pub gateway: String,
}

/// One host of the lab.
#[derive(Clone, Debug)]
pub struct Host {
    pub ns: String,
    pub ip: String,
    pub dir: PathBuf,
}

impl Lab {
    /// A fresh lab named after the test and this process.
    pub fn new(test: &str) -> Lab {
        require_netns();
        static LABS: AtomicUsize = AtomicUsize::new(0);
        let lab_id = LABS.fetch_add(1, Ordering::Relaxed);
        let name = format!("kp{}x{lab_id}{}", std::process::id() % 100_000, short(test));
        let hub = format!("{name}-hub");
        let dir = std::env::temp_dir().join(format!("kairos-p2p-lab-{name}"));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        sh(&["ip", "netns", "add", &hub]).unwrap();
        let lab = Lab {
            name,
            dir,
            hub: hub.clone(),
            namespaces: vec![hub.clone()],
            children: Vec::new(),
        };
        lab.exec_ok(&hub, &["ip", "link", "add", "br0", "type", "bridge"]);
        lab.exec_ok(&hub, &["ip", "link", "set", "br0", "up"]);
        lab.exec_ok(&hub, &["ip", "link", "set", "lo", "up"]);
        lab
    }

    /// Runs a command inside a namespace, panicking on failure.
    pub fn exec_ok(&self, ns: &str, args: &[&str]) {
        let mut full = vec!["ip", "netns", "exec", ns];
        full.extend_from_slice(args);
        sh(&full).unwrap();
    }

    /// Adds host `index` with address `cidr` on the lab bridge.
    pub fn add_host(&mut self, index: usize, cidr: &str) -> Host {
        let hub = self.hub.clone();
        self.attach_host(index, cidr, &hub, "br0", None)
    }

    /// Makes namespace `<lab>-h<index>` with `eth0` at `cidr`, whose veth peer joins `bridge` in
    /// namespace `bridge_ns`; the default route goes via `gateway`, or straight out of `eth0`.
    fn attach_host(
        &mut self,
        index: usize,
        cidr: &str,
        bridge_ns: &str,
        bridge: &str,
        gateway: Option<&str>,
    ) -> Host {
        let ns = format!("{}-h{index}", self.name);
        sh(&["ip", "netns", "add", &ns]).unwrap();
        self.namespaces.push(ns.clone());
        let outer = format!("v{}h{index}", self.name.trim_start_matches("kp"));
        sh(&[
            "ip", "link", "add", &outer, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ])
        .unwrap();
        sh(&["ip", "link", "set", &outer, "netns", bridge_ns]).unwrap();
        self.exec_ok(
            bridge_ns,
            &["ip", "link", "set", &outer, "master", bridge, "up"],
        );
        self.exec_ok(&ns, &["ip", "link", "set", "lo", "up"]);
        self.exec_ok(&ns, &["ip", "addr", "add", cidr, "dev", "eth0"]);
        self.exec_ok(&ns, &["ip", "link", "set", "eth0", "up"]);
        match gateway {
            Some(gw) => self.exec_ok(&ns, &["ip", "route", "add", "default", "via", gw]),
            // Broadcast beacons to 255.255.255.255 need a route out of eth0.
            None => self.exec_ok(&ns, &["ip", "route", "add", "default", "dev", "eth0"]),
        }
        let dir = self.dir.join(format!("h{index}"));
        fs::create_dir_all(&dir).unwrap();
        Host {
            ns,
            ip: cidr.split('/').next().unwrap().to_string(),
            dir,
        }
    }

    /// Adds a NAT router `index`: its public side on the lab bridge at `public_cidr`, a private
    /// bridge behind it with gateway `gateway_cidr`, and IPv4 masquerading (Linux NAT:
    /// endpoint-independent mapping, port-preserving when it can). With `firewall`, the router
    /// also drops unsolicited packets from outside, as home routers do.
    pub fn add_nat_site(
        &mut self,
        index: usize,
        public_cidr: &str,
        gateway_cidr: &str,
        nat: NatKind,
    ) -> Site {
        let router = self.add_host(index, public_cidr);
        let ns = router.ns.clone();
        self.exec_ok(&ns, &["ip", "link", "add", "br1", "type", "bridge"]);
        self.exec_ok(&ns, &["ip", "addr", "add", gateway_cidr, "dev", "br1"]);
        self.exec_ok(&ns, &["ip", "link", "set", "br1", "up"]);
        self.exec_ok(&ns, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        let mut masquerade = vec![
            "iptables",
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-o",
            "eth0",
            "-j",
            "MASQUERADE",
        ];
        if nat == NatKind::Symmetric {
            masquerade.push("--random-fully");
        }
        self.exec_ok(&ns, &masquerade);
        if nat != NatKind::PlainMasquerade {
            let drop_new = [
                "-i",
                "eth0",
                "-m",
                "conntrack",
                "--ctstate",
                "NEW",
                "-j",
                "DROP",
            ];
            for chain in ["INPUT", "FORWARD"] {
                let mut args = vec!["iptables", "-A", chain];
                args.extend_from_slice(&drop_new);
                self.exec_ok(&ns, &args);
            }
        }
        Site {
            router,
            gateway: gateway_cidr.split('/').next().unwrap().to_string(),
        }
    }

    /// Adds host `index` at `cidr` behind a NAT site.
    pub fn add_host_behind(&mut self, site: &Site, index: usize, cidr: &str) -> Host {
        self.attach_host(
            index,
            cidr,
            &site.router.ns.clone(),
            "br1",
            Some(&site.gateway.clone()),
        )
    }

    /// Starts `kairos-p2p <args>` inside the host's namespace, logging to `<dir>/agent.log`.
    pub fn spawn(&mut self, host: &Host, args: &[&str]) -> usize {
        self.spawn_with_env(host, args, &[])
    }

    /// [`spawn`](Self::spawn) with extra environment variables (e.g. `UUID`).
    pub fn spawn_with_env(&mut self, host: &Host, args: &[&str], env: &[(&str, &str)]) -> usize {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(host.dir.join("agent.log"))
            .unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &host.ns, env!("CARGO_BIN_EXE_kairos-p2p")])
            .args(args)
            // System paths (k3s files, init system, Kairos' API socket) under the host's own
            // root: a test never touches this machine's k3s, services or /run.
            .envs(client_env(host))
            .env("KAIROS_P2P_LOG", "debug")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.children.push(child);
        self.children.len() - 1
    }

    /// Stops child `index` with SIGTERM and waits for it.
    pub fn stop(&mut self, index: usize) -> std::process::ExitStatus {
        let child = &mut self.children[index];
        let _ = sh(&["kill", "-TERM", &child.id().to_string()]);
        child.wait().unwrap()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        for ns in self.namespaces.iter().rev() {
            let _ = sh(&["ip", "netns", "del", ns]);
        }
        // The agents' logs stay for a failed test to be read.
        if !std::thread::panicking() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// A lab of `count` hosts at `<subnet>.<i>/24` (i from 1) and the path of one cloud-config for
/// all of them: a fresh token, LAN discovery only, then `p2p_extra` (lines indented under `p2p:`).
pub fn lab_with_hosts(
    test: &str,
    subnet: &str,
    count: usize,
    p2p_extra: &str,
) -> (Lab, String, Vec<Host>) {
    let mut lab = Lab::new(test);
    let token = generate_token();
    let config = write_config(
        &lab.dir,
        "config.yaml",
        &format!(
            "#cloud-config\np2p:\n  network_token: \"{token}\"\n  disable_dht: true\n{p2p_extra}"
        ),
    );
    let config = config.to_str().unwrap().to_string();
    let hosts = (1..=count)
        .map(|i| lab.add_host(i, &format!("{subnet}.{i}/24")))
        .collect();
    (lab, config, hosts)
}

/// The environment that puts a command on `host`'s state directory and root: an agent there,
/// or a client command finding that agent's sockets and bearer token.
pub fn client_env(host: &Host) -> [(&'static str, PathBuf); 2] {
    [
        ("KAIROS_P2P_STATE_DIR", host.dir.join("state")),
        ("KAIROS_P2P_ROOT", host.dir.join("root")),
    ]
}

/// Kairos' API socket of `host`'s agent (or bridge): `/run/edgevpn-kairos.sock` under its root.
pub fn kairos_socket(host: &Host) -> PathBuf {
    host.dir.join("root/run/edgevpn-kairos.sock")
}

/// The agent's API unix socket (the test process reaches it directly: unix sockets are not
/// network-namespaced).
pub fn api_socket(host: &Host) -> PathBuf {
    host.dir.join("state").join("api.sock")
}

/// Sends `raw` on a fresh API connection and returns everything the agent sent back.
pub fn api_exchange(path: &Path, raw: &[u8]) -> String {
    let mut stream = UnixStream::connect(path).expect("connect to the API socket");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    // The agent may answer and close before reading everything (oversize requests).
    let _ = stream.write_all(raw);
    let mut out = Vec::new();
    let _ = stream.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// `(status line, headers, body)` of one API request with `Connection: close`.
pub fn api_request(path: &Path, method: &str, target: &str) -> (String, String, String) {
    let raw = format!(
        "{method} {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    );
    let response = api_exchange(path, raw.as_bytes());
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or((response.as_str(), ""));
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    (status.to_string(), headers.to_string(), body.to_string())
}

/// `GET target` as JSON, asserting a 200 with a JSON content type.
pub fn api_get_json(path: &Path, target: &str) -> serde_json::Value {
    let (status, headers, body) = api_request(path, "GET", target);
    assert_eq!(status, "HTTP/1.1 200 OK", "{target}");
    assert!(
        headers.to_ascii_lowercase().contains("application/json"),
        "{target}: {headers}"
    );
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{target}: {e}: {body}"))
}

/// Writes a cloud-config for a test.
pub fn write_config(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(name);
    fs::write(&path, body).unwrap();
    path
}

/// A fresh network token from the binary under test.
pub fn generate_token() -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_kairos-p2p"))
        .arg("generate-token")
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Polls `check` until it holds or `limit` passes; returns how long it took.
pub fn wait_for(limit: Duration, mut check: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if check() {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// The peer id an agent logged at start (waits up to 10 s for it).
pub fn peer_id_of(host: &Host) -> String {
    wait_for(Duration::from_secs(10), || {
        !log_lines(host, "peer id ").is_empty()
    })
    .expect("agent started");
    let line = log_lines(host, "peer id ").remove(0);
    line.split("peer id ")
        .nth(1)
        .unwrap()
        .split(',')
        .next()
        .unwrap()
        .to_string()
}

/// Lines of a host's agent log containing `needle`.
pub fn log_lines(host: &Host, needle: &str) -> Vec<String> {
    fs::read_to_string(host.dir.join("agent.log"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_string)
        .collect()
}

fn short(test: &str) -> String {
    test.chars()
        .filter(char::is_ascii_alphanumeric)
        .take(4)
        .collect()
}

/// A scratch directory, removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("kairos-config-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    /// Writes `text` to `name` inside the directory (parents made as needed).
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(&path, text).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Bytes received + sent on the host's eth0 (for traffic measurements).
pub fn eth0_bytes(h: &Host) -> u64 {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &h.ns,
            "cat",
            "/sys/class/net/eth0/statistics/rx_bytes",
            "/sys/class/net/eth0/statistics/tx_bytes",
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse::<u64>().ok())
        .sum()
}

impl Lab {
    /// Kills child `index` with SIGKILL (no clean shutdown) and waits for it.
    pub fn kill(&mut self, index: usize) {
        let child = &mut self.children[index];
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// The body of `GET target` from an agent's API unix socket (`<state dir>/api.sock`).
pub fn unix_get(socket: &Path, target: &str) -> String {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::os::unix::net::UnixStream::connect(socket) else {
        return String::new();
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let request = format!("GET {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return String::new();
    }
    let mut out = Vec::new();
    let _ = stream.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    text.split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default()
}

/// The value of one Prometheus sample (`name{labels}` exactly as rendered), 0 when absent.
pub fn metric(metrics: &str, sample: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix(sample)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// Whether this process runs as root (benchmarks skip their namespace parts otherwise).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Writes `<dir>/<name>`: a cloud-config with a new network token and the DHT off (LAN only),
/// the configuration most labs give every agent.
pub fn lan_config(dir: &Path, name: &str) -> PathBuf {
    write_config(
        dir,
        name,
        &format!(
            "#cloud-config\np2p:\n  network_token: \"{}\"\n  disable_dht: true\n",
            generate_token()
        ),
    )
}

impl Lab {
    /// The process id of child `index` (`ip netns exec` execs the agent: it is the agent's).
    pub fn pid(&self, index: usize) -> u32 {
        self.children[index].id()
    }

    /// Whether child `index` is still running.
    pub fn running(&mut self, index: usize) -> bool {
        matches!(self.children[index].try_wait(), Ok(None))
    }
}

/// The IPv4 address of `dev` in the host's namespace, if it has one.
pub fn vpn_addr(host: &Host, dev: &str) -> Option<String> {
    let out = Command::new("ip")
        .args(["-n", &host.ns, "-4", "-o", "addr", "show", "dev", dev])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let cidr = text
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)?;
    Some(cidr.split('/').next()?.to_string())
}

/// Whether one ping from the host's namespace to `to` is answered within a second.
pub fn pings(from: &Host, to: &str) -> bool {
    Command::new("ip")
        .args(["netns", "exec", &from.ns, "ping", "-c1", "-W1", "-q", to])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}
