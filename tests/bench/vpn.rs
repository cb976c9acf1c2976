//! Benchmark: the VPN data path against the raw link and two userspace WireGuard implementations
//! (boringtun-cli, wireguard-go), between two network namespaces joined by a veth pair. For each
//! row: iperf3 TCP throughput with 1 and 4 streams, ping RTT (avg/min over 50 pings), and the CPU
//! time of the tunnel processes of both ends (utime+stime) per GB carried. Then the peak RSS of
//! an agent with 10 peers pushing traffic at it. Prints tables, ratios and goals; asserts nothing.
//!
//! Needs root. Missing tools are installed by `tests/bench/setup-tools.sh` (`make bench` runs it;
//! the bench runs it too when something is missing). Namespaces are named after the process id
//! and removed on exit, on panic and on SIGINT/SIGTERM (children killed by pid).
//!
//! Environment:
//! - `KAIROS_BENCH_SECS`: seconds per iperf3 run (default 10).
//! - `KAIROS_BENCH_ROWS`: a comma-separated subset of
//!   `raw,ours,ours-plain,ours-maxmtu,baseline,boringtun,wireguard-go` (`ours-plain`: ours with
//!   the TUN offloads off; `ours-maxmtu`: ours at the largest VPN MTU a 1500-byte path carries;
//!   `baseline`: an older build of the agent, see `KAIROS_BENCH_BASELINE`).
//! - `KAIROS_BENCH_BASELINE`: path of an older `kairos-p2p` binary (e.g. built from main at the
//!   branch point) measured in the same run as the `baseline` row; CPU and throughput goals
//!   that compare against "today" use it.
//! - `KAIROS_BENCH_HUB=0`: skips the 10-peer memory part.
//! - `KAIROS_BENCH_BT_MTU`: boringtun's TUN MTU (default 1420 as wg-quick sets; `default` keeps
//!   the 1500 boringtun-cli leaves).
//! - `BORINGTUN_CLI`: path of boringtun-cli (default `<target>/bench-tools/bin`, then `PATH`).

#[path = "../common/mod.rs"]
mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{Lab, is_root, wait_for, write_config};

/// Prefix of the pair's namespaces: `kpbvpn<pid>-a`, `kpbvpn<pid>-b`.
const PREFIX: &str = "kpbvpn";
/// Underlay (veth) addresses of the two ends.
const VETH: [&str; 2] = ["10.77.0.1", "10.77.0.2"];
/// Inner addresses, the same for every tunnel.
const INNER: [&str; 2] = ["10.1.0.1", "10.1.0.2"];
const WG_PORT: &str = "51820";
const PINGS: &str = "50";
const PING_INTERVAL: &str = "0.02";
const OURS_TIMEOUT: Duration = Duration::from_secs(30);
const HUB_PEERS: usize = 10;
const HUB_TIMEOUT: Duration = Duration::from_secs(60);
/// Issue 16, goal 1: one TCP stream at least 5x boringtun-cli's in the same run.
const GOAL_TPUT_VS_BORINGTUN: f64 = 5.0;
/// Issue 16, goal 1: CPU per Gbit/s at most half the baseline's.
const GOAL_CPU_VS_BASELINE: f64 = 0.5;
/// Issue 16, goal 5: peak RSS of an agent with 10 peers pushing traffic.
const GOAL_RSS_MB: f64 = 10.0;
/// The largest VPN MTU a direct connection over a 1500-byte path carries: the transport's
/// `initial_mtu` (1452) less what quinn-proto reserves per datagram (38).
const MAX_PATH_MTU_VPN: &str = "1414";

// ---------------------------------------------------------------------------------------------
// Cleanup registry: namespaces this process made, removed (with every process inside, by pid)
// on SIGINT/SIGTERM/SIGHUP. Normal exit and panics clean up through `Drop`.

static NAMESPACES: Mutex<Vec<String>> = Mutex::new(Vec::new());
static SOCKETS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn register(ns: &str) {
    NAMESPACES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(ns.to_string());
}

fn unregister(ns: &str) {
    NAMESPACES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|n| n != ns);
}

/// Kills every process inside namespace `ns` (by pid) and deletes it.
fn remove_namespace(ns: &str) {
    for pid in netns_pids(ns) {
        // SAFETY: kill(2) on a pid listed by `ip netns pids` for a namespace we made.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGKILL);
        }
    }
    let _ = Command::new("ip").args(["netns", "del", ns]).output();
}

fn netns_pids(ns: &str) -> Vec<u32> {
    Command::new("ip")
        .args(["netns", "pids", ns])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Blocks the termination signals in every thread and cleans up from a dedicated thread when
/// one arrives. Call before any other thread starts.
fn install_signal_cleanup() {
    // SAFETY: plain sigset manipulation; the mask is set before other threads exist.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            let mut old: libc::sigaction = std::mem::zeroed();
            libc::sigaction(sig, std::ptr::null(), &mut old);
            if old.sa_sigaction == libc::SIG_IGN {
                if sig == libc::SIGHUP {
                    // nohup: the caller wants us to outlive the terminal.
                    continue;
                }
                // A shell starts background jobs with SIGINT ignored, and an ignored signal
                // never reaches sigwait: a Ctrl-C or `kill -INT` should still clean up.
                libc::signal(sig, libc::SIG_DFL);
            }
            libc::sigaddset(&mut set, sig);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        std::thread::spawn(move || {
            let mut sig = 0;
            libc::sigwait(&set, &mut sig);
            eprintln!("vpn bench: signal {sig}, removing namespaces and stopping children");
            let namespaces = NAMESPACES.lock().unwrap_or_else(|e| e.into_inner()).clone();
            for ns in namespaces.iter().rev() {
                remove_namespace(ns);
            }
            for sock in SOCKETS.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                let _ = fs::remove_file(sock);
            }
            std::process::exit(128 + sig);
        });
    }
}

/// Removes pair namespaces left by an earlier run that was killed outright (its pid is gone).
fn sweep_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let ns = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = ns.strip_prefix(PREFIX) else {
            continue;
        };
        let Some((pid, side)) = rest.split_once('-') else {
            continue;
        };
        if (side == "a" || side == "b")
            && pid.parse::<u32>().is_ok()
            && !Path::new(&format!("/proc/{pid}")).exists()
        {
            println!("removing stale namespace {ns} (pid {pid} is gone)");
            remove_namespace(ns);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Small process helpers.

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn text(out: &Output) -> String {
    let mut s = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if s.is_empty() {
        s = String::from_utf8_lossy(&out.stdout).trim().to_string();
    }
    s
}

/// `ip netns exec <ns> <args>`, returning the output whatever the exit status.
fn ns_output(ns: &str, args: &[&str]) -> Result<Output, String> {
    Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("ip netns exec {ns} {}: {e}", args.join(" ")))
}

/// `ip netns exec <ns> <args>`, failing with its stderr.
fn ns_run(ns: &str, args: &[&str]) -> Result<String, String> {
    let out = ns_output(ns, args)?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!("{}: {}", args.join(" "), text(&out)))
    }
}

fn run(args: &[&str]) -> Result<String, String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!("{}: {}", args.join(" "), text(&out)))
    }
}

/// utime + stime of a process (all its threads), in seconds.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start at field 3 (state).
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some(ticks as f64 / hz)
}

/// A `/proc/<pid>/status` value in kB (e.g. `VmHWM`).
fn status_kb(pid: u32, key: &str) -> Option<u64> {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn comm(pid: u32) -> String {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// The MTU of interface `dev` in namespace `ns`.
fn mtu(ns: &str, dev: &str) -> String {
    ns_run(ns, &["ip", "-o", "link", "show", "dev", dev])
        .ok()
        .and_then(|s| {
            let mut words = s.split_whitespace();
            words.find(|w| *w == "mtu")?;
            words.next().map(str::to_string)
        })
        .unwrap_or_else(|| "?".into())
}

fn ping_once(ns: &str, addr: &str) -> bool {
    ns_output(ns, &["ping", "-c1", "-W1", "-q", addr]).is_ok_and(|o| o.status.success())
}

/// Waits until TCP `port` listens in `ns` (up to 5 s).
fn wait_listening(ns: &str, port: u16) -> bool {
    let filter = format!("sport = :{port}");
    wait_for(Duration::from_secs(5), || {
        ns_run(ns, &["ss", "-Hltn", &filter]).is_ok_and(|s| !s.trim().is_empty())
    })
    .is_some()
}

fn tail(path: &Path, lines: usize) -> String {
    let s = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = s.lines().collect();
    all[all.len().saturating_sub(lines)..].join(" | ")
}

/// A child process stopped by pid when dropped (SIGTERM, then SIGKILL after 3 s).
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(ns: &str, args: &[&str], env: &[(&str, &str)], log: PathBuf) -> Result<Proc, String> {
        let file = fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let err = file.try_clone().map_err(|e| e.to_string())?;
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("{}: {e}", args.join(" ")))?;
        Ok(Proc { child, log })
    }

    /// The pid (`ip netns exec` execs the command, so it is the command's own).
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(format!("exited ({status}): {}", tail(&self.log, 3))),
            _ => None,
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill(2) on our own child's pid, which has not been reaped yet.
            unsafe {
                libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
            }
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(3) {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// The pair: two namespaces joined by a veth pair.

struct Pair {
    ns: [String; 2],
    dir: PathBuf,
    veth: [String; 2],
}

impl Pair {
    fn new() -> Result<Pair, String> {
        let pid = std::process::id();
        let ns = [format!("{PREFIX}{pid}-a"), format!("{PREFIX}{pid}-b")];
        let veth = [format!("kv{pid}a"), format!("kv{pid}b")];
        let dir = std::env::temp_dir().join(format!("kairos-p2p-bench-vpn-{pid}"));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        for n in &ns {
            register(n);
            run(&["ip", "netns", "add", n])?;
        }
        let pair = Pair { ns, dir, veth };
        run(&[
            "ip",
            "-n",
            &pair.ns[0],
            "link",
            "add",
            &pair.veth[0],
            "type",
            "veth",
            "peer",
            "name",
            &pair.veth[1],
            "netns",
            &pair.ns[1],
        ])?;
        for ((ns, dev), addr) in pair.ns.iter().zip(&pair.veth).zip(VETH) {
            let cidr = format!("{addr}/24");
            ns_run(ns, &["ip", "link", "set", "lo", "up"])?;
            ns_run(ns, &["ip", "addr", "add", &cidr, "dev", dev])?;
            ns_run(ns, &["ip", "link", "set", dev, "up"])?;
            // LAN beacons go to 255.255.255.255: they need a route out of the link.
            ns_run(ns, &["ip", "route", "add", "default", "dev", dev])?;
        }
        Ok(pair)
    }

    fn log(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.log"))
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        for ns in &self.ns {
            remove_namespace(ns);
            unregister(ns);
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------------------------------------
// Measurements.

#[derive(Clone, Copy)]
struct Rtt {
    avg: f64,
    min: f64,
}

#[derive(Clone, Copy)]
struct Transfer {
    gbps: f64,
    /// CPU seconds of the tunnel processes (both ends) per GB received; None without daemons.
    cpu_per_gb: Option<f64>,
}

struct Measured {
    mtu: String,
    rtt: Result<Rtt, String>,
    /// 1 stream, 4 streams.
    tcp: [Result<Transfer, String>; 2],
}

struct Row {
    name: &'static str,
    result: Result<Measured, String>,
}

fn ping_rtt(ns: &str, target: &str) -> Result<Rtt, String> {
    let out = ns_run(
        ns,
        &[
            "ping",
            "-q",
            "-c",
            PINGS,
            "-i",
            PING_INTERVAL,
            "-W",
            "1",
            target,
        ],
    )?;
    // "rtt min/avg/max/mdev = 0.030/0.045/0.101/0.010 ms"
    let line = out
        .lines()
        .find(|l| l.contains("min/avg/max"))
        .ok_or_else(|| format!("no rtt line in ping output: {out}"))?;
    let nums: Vec<f64> = line
        .split('=')
        .nth(1)
        .unwrap_or("")
        .split_whitespace()
        .next()
        .unwrap_or("")
        .split('/')
        .filter_map(|v| v.parse().ok())
        .collect();
    match nums[..] {
        [min, avg, ..] => Ok(Rtt { avg, min }),
        _ => Err(format!("cannot parse: {line}")),
    }
}

fn iperf(
    pair: &Pair,
    target: &str,
    streams: usize,
    daemons: &[u32],
    secs: u64,
    port: u16,
) -> Result<Transfer, String> {
    let port_s = port.to_string();
    let _server = Proc::spawn(
        &pair.ns[1],
        &["iperf3", "-s", "-1", "-p", &port_s],
        &[],
        pair.log(&format!("iperf3-server-{port}")),
    )?;
    if !wait_listening(&pair.ns[1], port) {
        return Err("iperf3 server did not listen".into());
    }
    let cpu = || -> Option<f64> { daemons.iter().map(|&p| cpu_seconds(p)).sum() };
    let before = cpu();
    let out = ns_output(
        &pair.ns[0],
        &[
            "iperf3",
            "-c",
            target,
            "-p",
            &port_s,
            "-t",
            &secs.to_string(),
            "-P",
            &streams.to_string(),
            "-J",
        ],
    )?;
    let after = cpu();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("iperf3 output is not JSON ({e}): {}", text(&out)))?;
    if let Some(err) = json.get("error").and_then(|e| e.as_str()) {
        return Err(format!("iperf3: {err}"));
    }
    let sum = &json["end"]["sum_received"];
    let bps = sum["bits_per_second"]
        .as_f64()
        .ok_or("iperf3 JSON has no end.sum_received.bits_per_second")?;
    let bytes = sum["bytes"].as_f64().unwrap_or(0.0);
    let cpu_per_gb = match (daemons.is_empty(), before, after) {
        (true, _, _) => None,
        (false, Some(b), Some(a)) if bytes > 0.0 => Some((a - b) / (bytes / 1e9)),
        _ => return Err("a tunnel process exited during the run".into()),
    };
    Ok(Transfer {
        gbps: bps / 1e9,
        cpu_per_gb,
    })
}

/// Ping first (idle link), then 1 and 4 TCP streams.
fn measure(pair: &Pair, target: &str, daemons: &[u32], mtu: String, secs: u64) -> Measured {
    static PORT: Mutex<u16> = Mutex::new(5201);
    let next_port = || {
        let mut p = PORT.lock().unwrap_or_else(|e| e.into_inner());
        *p += 1;
        *p
    };
    // One ping first so neither ARP nor a tunnel handshake lands in the sample.
    ping_once(&pair.ns[0], target);
    let rtt = ping_rtt(&pair.ns[0], target);
    let one = iperf(pair, target, 1, daemons, secs, next_port());
    let four = iperf(pair, target, 4, daemons, secs, next_port());
    Measured {
        mtu,
        rtt,
        tcp: [one, four],
    }
}

fn raw_row(pair: &Pair, secs: u64) -> Result<Measured, String> {
    let mtu = mtu(&pair.ns[0], &pair.veth[0]);
    Ok(measure(pair, VETH[1], &[], mtu, secs))
}

#[derive(Clone, Copy, PartialEq)]
enum Wg {
    Boringtun,
    WireguardGo,
}

/// Where boringtun-cli is: `BORINGTUN_CLI`, the bench tools of this target dir, then `PATH`.
fn boringtun_path() -> Option<String> {
    if let Ok(p) = std::env::var("BORINGTUN_CLI") {
        return Some(p);
    }
    let local = target_dir().join("bench-tools/bin/boringtun-cli");
    if local.exists() {
        return Some(local.to_string_lossy().into_owned());
    }
    have("boringtun-cli").then(|| "boringtun-cli".to_string())
}

/// The cargo target directory this bench was built in.
fn target_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(dir);
    }
    // <target>/<profile>/deps/vpn-<hash>
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.ancestors().nth(3).map(Path::to_path_buf))
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
}

fn wg_row(pair: &Pair, kind: Wg, secs: u64) -> Result<Measured, String> {
    let (tag, binary) = match kind {
        Wg::Boringtun => (
            "kb",
            boringtun_path().ok_or("boringtun-cli not found (tests/bench/setup-tools.sh)")?,
        ),
        Wg::WireguardGo => ("kg", "wireguard-go".to_string()),
    };
    // boringtun-cli leaves its TUN at 1500, so every full-size packet would fragment on the
    // 1500-byte link; wg-quick (and wireguard-go by itself) use 1420.
    let bt_mtu = std::env::var("KAIROS_BENCH_BT_MTU").unwrap_or_else(|_| "1420".into());
    let pid = std::process::id();
    let iface = [format!("{tag}{pid}a"), format!("{tag}{pid}b")];
    let mut keys = Vec::new();
    for side in 0..2 {
        let private = run(&["wg", "genkey"])?.trim().to_string();
        let path = pair.dir.join(format!("{tag}-{side}.key"));
        fs::write(&path, format!("{private}\n")).map_err(|e| e.to_string())?;
        let public = Command::new("sh")
            .args(["-c", "wg pubkey < \"$1\"", "sh", path.to_str().unwrap()])
            .output()
            .map_err(|e| e.to_string())?;
        keys.push((
            path,
            String::from_utf8_lossy(&public.stdout).trim().to_string(),
        ));
    }
    let mut daemons = Vec::new();
    for (side, dev) in iface.iter().enumerate() {
        let sock = PathBuf::from(format!("/var/run/wireguard/{dev}.sock"));
        SOCKETS.lock().unwrap_or_else(|e| e.into_inner()).push(sock);
        let args: Vec<&str> = match kind {
            Wg::Boringtun => vec![&binary, "-f", "--disable-drop-privileges", dev],
            Wg::WireguardGo => vec![&binary, "-f", dev],
        };
        let env = [
            ("WG_SUDO", "1"),
            ("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1"),
            ("LOG_LEVEL", "error"),
        ];
        daemons.push(Proc::spawn(
            &pair.ns[side],
            &args,
            &env,
            pair.log(&format!("{tag}-{side}")),
        )?);
    }
    let result = (|| {
        for side in 0..2 {
            let sock = format!("/var/run/wireguard/{}.sock", iface[side]);
            if wait_for(Duration::from_secs(10), || Path::new(&sock).exists()).is_none() {
                let why = daemons[side]
                    .exited()
                    .unwrap_or_else(|| "no UAPI socket within 10 s".into());
                return Err(format!("{binary}: {why}"));
            }
        }
        for side in 0..2 {
            let (ns, dev, other) = (&pair.ns[side], iface[side].as_str(), 1 - side);
            let endpoint = format!("{}:{WG_PORT}", VETH[other]);
            let allowed = format!("{}/32", INNER[other]);
            ns_run(
                ns,
                &[
                    "wg",
                    "set",
                    dev,
                    "listen-port",
                    WG_PORT,
                    "private-key",
                    keys[side].0.to_str().unwrap(),
                    "peer",
                    &keys[other].1,
                    "endpoint",
                    &endpoint,
                    "allowed-ips",
                    &allowed,
                ],
            )?;
            let cidr = format!("{}/24", INNER[side]);
            ns_run(ns, &["ip", "addr", "add", &cidr, "dev", dev])?;
            if kind == Wg::Boringtun && bt_mtu != "default" {
                ns_run(ns, &["ip", "link", "set", "dev", dev, "mtu", &bt_mtu])?;
            }
            ns_run(ns, &["ip", "link", "set", dev, "up"])?;
        }
        if wait_for(Duration::from_secs(10), || ping_once(&pair.ns[0], INNER[1])).is_none() {
            return Err(format!("no ping reply over {binary} within 10 s"));
        }
        let pids: Vec<u32> = daemons.iter().map(Proc::pid).collect();
        let mtu = mtu(&pair.ns[0], &iface[0]);
        Ok(measure(pair, INNER[1], &pids, mtu, secs))
    })();
    drop(daemons);
    for dev in &iface {
        let _ = fs::remove_file(format!("/var/run/wireguard/{dev}.sock"));
    }
    result
}

fn kairos(args: &[&str]) -> Result<String, String> {
    let mut full = vec![env!("CARGO_BIN_EXE_kairos-p2p")];
    full.extend_from_slice(args);
    run(&full)
}

/// A cloud-config with a static VPN address (VPN only: no k3s).
fn agent_config(token: &str, address: &str) -> String {
    format!(
        "#cloud-config\np2p:\n  network_token: \"{token}\"\n  disable_dht: true\n  role: none\n  \
         vpn:\n    env:\n      ADDRESS: \"{address}\"\n"
    )
}

/// How an agent row runs.
struct AgentRun<'a> {
    binary: &'a str,
    env: &'a [(&'a str, &'a str)],
    mtu: Option<&'a str>,
}

const OURS: AgentRun<'static> = AgentRun {
    binary: env!("CARGO_BIN_EXE_kairos-p2p"),
    env: &[],
    mtu: None,
};

fn ours_row(pair: &Pair, secs: u64) -> Result<Measured, String> {
    agent_row(pair, secs, &OURS)
}

fn ours_plain_row(pair: &Pair, secs: u64) -> Result<Measured, String> {
    let run = AgentRun {
        env: &[("KAIROS_P2P_TUN_OFFLOAD", "off")],
        ..OURS
    };
    agent_row(pair, secs, &run)
}

fn ours_maxmtu_row(pair: &Pair, secs: u64) -> Result<Measured, String> {
    let run = AgentRun {
        mtu: Some(MAX_PATH_MTU_VPN),
        ..OURS
    };
    agent_row(pair, secs, &run)
}

fn baseline_row(pair: &Pair, secs: u64) -> Result<Measured, String> {
    let binary = std::env::var("KAIROS_BENCH_BASELINE")
        .map_err(|_| "not measured: KAIROS_BENCH_BASELINE is not set".to_string())?;
    let run = AgentRun {
        binary: &binary,
        ..OURS
    };
    agent_row(pair, secs, &run)
}

fn agent_row(pair: &Pair, secs: u64, run: &AgentRun<'_>) -> Result<Measured, String> {
    let token = kairos(&["generate-token"])?.trim().to_string();
    let pid = std::process::id();
    let mut agents = Vec::new();
    for side in 0..2 {
        let mut body = agent_config(&token, &format!("{}/24", INNER[side]));
        if let Some(mtu) = run.mtu {
            body.push_str(&format!("      EDGEVPNMTU: \"{mtu}\"\n"));
        }
        let config = write_config(&pair.dir, &format!("ours-{side}.yaml"), &body);
        let state = pair.dir.join(format!("state-{side}"));
        let _ = fs::remove_dir_all(&state);
        let listen = format!("{}:7120", VETH[side]);
        let uuid = format!("bench-vpn-{pid}-{side}");
        let mut env = vec![
            ("UUID", uuid.as_str()),
            ("KAIROS_P2P_STATE_DIR", state.to_str().unwrap()),
            ("KAIROS_P2P_LOG", "info"),
        ];
        env.extend_from_slice(run.env);
        agents.push(Proc::spawn(
            &pair.ns[side],
            &[
                run.binary,
                "agent",
                "--config",
                config.to_str().unwrap(),
                "--listen",
                &listen,
            ],
            &env,
            pair.log(&format!("agent-{side}")),
        )?);
    }
    let mut exited = None;
    let up = wait_for(OURS_TIMEOUT, || {
        exited = agents.iter_mut().find_map(Proc::exited);
        exited.is_some() || ping_once(&pair.ns[0], INNER[1])
    });
    if let Some(why) = exited {
        return Err(format!("not available: agent {why}"));
    }
    if up.is_none() {
        let iface = if ns_run(&pair.ns[0], &["ip", "link", "show", "dev", "edgevpn0"]).is_ok() {
            "present"
        } else {
            "absent"
        };
        return Err(format!(
            "not available: no ping reply from {} over the VPN within {} s (edgevpn0 {iface})",
            INNER[1],
            OURS_TIMEOUT.as_secs()
        ));
    }
    let pids: Vec<u32> = agents.iter().map(Proc::pid).collect();
    let mtu = mtu(&pair.ns[0], "edgevpn0");
    Ok(measure(pair, INNER[1], &pids, mtu, secs))
}

// ---------------------------------------------------------------------------------------------
// The hub: one agent, 10 peers pushing traffic at it; peak RSS.

struct Hub {
    peers_up: usize,
    gbps: f64,
    hub_idle_kb: Option<u64>,
    hub_peak_kb: Option<u64>,
    max_peak_kb: Option<u64>,
    errors: Vec<String>,
}

fn hub(secs: u64) -> Result<Hub, String> {
    let mut lab = Lab::new("h");
    let nodes = HUB_PEERS + 1;
    // The lab removes its namespaces when dropped; these names are for the signal path.
    let names: Vec<String> = std::iter::once(format!("{}-hub", lab.name))
        .chain((1..=nodes).map(|i| format!("{}-h{i}", lab.name)))
        .collect();
    names.iter().for_each(|n| register(n));
    let token = kairos(&["generate-token"])?.trim().to_string();
    let hosts: Vec<_> = (1..=nodes)
        .map(|i| lab.add_host(i, &format!("10.92.0.{i}/24")))
        .collect();
    for (i, h) in hosts.iter().enumerate() {
        let config = write_config(
            &lab.dir,
            &format!("c{i}.yaml"),
            &agent_config(&token, &format!("10.1.0.{}/24", i + 1)),
        );
        let uuid = format!("bench-vpn-hub-{}-{i}", std::process::id());
        lab.spawn_with_env(
            h,
            &["agent", "--config", config.to_str().unwrap()],
            &[("UUID", &uuid), ("KAIROS_P2P_LOG", "info")],
        );
    }
    let agent_pid = |ns: &str| {
        netns_pids(ns)
            .into_iter()
            .find(|&p| comm(p) == "kairos-p2p")
    };
    wait_for(Duration::from_secs(5), || {
        hosts.iter().all(|h| agent_pid(&h.ns).is_some())
    });
    let pids: Vec<Option<u32>> = hosts.iter().map(|h| agent_pid(&h.ns)).collect();
    let hub_pid = pids[0].ok_or("the hub agent did not start")?;
    let hub_ns = hosts[0].ns.clone();
    let hub_addr = INNER[0];

    // Servers on the hub, one port per peer.
    let mut servers = Vec::new();
    for i in 1..=HUB_PEERS {
        let port = (5300 + i).to_string();
        servers.push(Proc::spawn(
            &hub_ns,
            &["iperf3", "-s", "-1", "-p", &port],
            &[],
            lab.dir.join(format!("iperf3-server-{i}.log")),
        )?);
    }
    let mut up = vec![false; nodes];
    wait_for(HUB_TIMEOUT, || {
        for i in 1..nodes {
            if !up[i] {
                up[i] = ping_once(&hosts[i].ns, hub_addr);
            }
        }
        up[1..].iter().all(|u| *u)
    });
    let peers_up = up.iter().filter(|u| **u).count();
    if peers_up == 0 {
        return Err(format!(
            "not available: no peer reached {hub_addr} over the VPN within {} s",
            HUB_TIMEOUT.as_secs()
        ));
    }
    for i in 1..=HUB_PEERS {
        wait_listening(&hub_ns, 5300 + i as u16);
    }
    let hub_idle_kb = status_kb(hub_pid, "VmHWM");
    let clients: Vec<(usize, Child)> = (1..nodes)
        .filter(|&i| up[i])
        .filter_map(|i| {
            Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &hosts[i].ns,
                    "iperf3",
                    "-J",
                    "-c",
                    hub_addr,
                ])
                .args(["-p", &(5300 + i).to_string(), "-t", &secs.to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .ok()
                .map(|c| (i, c))
        })
        .collect();
    let mut bps = 0.0;
    let mut errors = Vec::new();
    for (i, c) in clients {
        let parsed = c
            .wait_with_output()
            .map_err(|e| e.to_string())
            .and_then(|o| {
                serde_json::from_slice::<serde_json::Value>(&o.stdout).map_err(|e| e.to_string())
            });
        match parsed {
            Ok(j) => match j["end"]["sum_received"]["bits_per_second"].as_f64() {
                Some(v) => bps += v,
                None => errors.push(format!("peer {i}: {}", j["error"])),
            },
            Err(e) => errors.push(format!("peer {i}: {e}")),
        }
    }
    let hub_peak_kb = status_kb(hub_pid, "VmHWM");
    let max_peak_kb = pids
        .iter()
        .flatten()
        .filter_map(|&p| status_kb(p, "VmHWM"))
        .max();
    drop(servers);
    let dir = lab.dir.clone();
    drop(lab);
    let _ = fs::remove_dir_all(dir);
    names.iter().for_each(|n| unregister(n));
    Ok(Hub {
        peers_up,
        gbps: bps / 1e9,
        hub_idle_kb,
        hub_peak_kb,
        max_peak_kb,
        errors,
    })
}

// ---------------------------------------------------------------------------------------------
// Output.

fn cell<T>(r: &Result<T, String>, f: impl Fn(&T) -> String) -> String {
    match r {
        Ok(v) => f(v),
        Err(_) => "failed".into(),
    }
}

fn tput(m: Option<&Measured>, i: usize) -> Option<&Transfer> {
    m.and_then(|m| m.tcp[i].as_ref().ok())
}

fn rtt(m: Option<&Measured>) -> Option<&Rtt> {
    m.and_then(|m| m.rtt.as_ref().ok())
}

fn print_rows(rows: &[Row], secs: u64) {
    println!();
    println!(
        "| veth pair, iperf3 {secs} s per run | MTU | TCP 1 stream | TCP 4 streams | CPU s/GB, 1 stream | CPU s/GB, 4 streams | RTT avg | RTT min |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let mut notes = Vec::new();
    for row in rows {
        match &row.result {
            Err(why) => println!("| {} | {why} | | | | | | |", row.name),
            Ok(m) => {
                let gbps = |t: &Transfer| format!("{:.2} Gbit/s", t.gbps);
                let cpu = |t: &Transfer| t.cpu_per_gb.map_or("-".into(), |c| format!("{c:.2}"));
                let rtt = |f: fn(&Rtt) -> f64| cell(&m.rtt, |r| format!("{:.3} ms", f(r)));
                println!(
                    "| {} | {} | {} | {} | {} | {} | {} | {} |",
                    row.name,
                    m.mtu,
                    cell(&m.tcp[0], gbps),
                    cell(&m.tcp[1], gbps),
                    cell(&m.tcp[0], cpu),
                    cell(&m.tcp[1], cpu),
                    rtt(|r| r.avg),
                    rtt(|r| r.min),
                );
                for (what, e) in [
                    ("ping", m.rtt.as_ref().err()),
                    ("1 stream", m.tcp[0].as_ref().err()),
                    ("4 streams", m.tcp[1].as_ref().err()),
                ] {
                    if let Some(e) = e {
                        notes.push(format!("{} {what}: {e}", row.name));
                    }
                }
            }
        }
    }
    for n in notes {
        println!("  failed: {n}");
    }
    if rows.iter().any(|r| r.name == ROW_BT) {
        println!(
            "  boringtun-cli leaves its TUN at MTU 1500 (full-size packets then fragment on the \
             1500-byte veth); the bench sets 1420 as wg-quick does (KAIROS_BENCH_BT_MTU=default \
             keeps 1500). CPU: utime+stime of the tunnel processes of both ends."
        );
    }

    let get = |name: &str| {
        rows.iter()
            .find(|r| r.name == name)
            .and_then(|r| r.result.as_ref().ok())
    };
    let (raw, ours, bt, base) = (get(ROW_RAW), get(ROW_OURS), get(ROW_BT), get(ROW_BASELINE));
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    let verdict = |ok: Option<bool>| match ok {
        Some(true) => "met",
        Some(false) => "NOT met",
        None => "n/a",
    };
    let x = |v: Option<f64>| v.map_or("n/a".into(), |v| format!("{v:.2}x"));
    let ms = |v: Option<f64>| v.map_or("n/a".into(), |v| format!("{v:+.3} ms"));

    println!();
    println!("| tunnel vs raw veth | 1 stream | 4 streams | RTT overhead (avg) |");
    println!("|---|---|---|---|");
    for row in rows.iter().filter(|r| r.name != ROW_RAW) {
        let m = row.result.as_ref().ok();
        let r = |i: usize| ratio(tput(m, i).map(|t| t.gbps), tput(raw, i).map(|t| t.gbps));
        let over = match (rtt(m), rtt(raw)) {
            (Some(a), Some(b)) => format!("{:+.3} ms", a.avg - b.avg),
            _ => "n/a".into(),
        };
        println!("| {} | {} | {} | {over} |", row.name, x(r(0)), x(r(1)));
    }

    let gbps = |m: Option<&Measured>, i: usize| tput(m, i).map(|t| t.gbps);
    let cpu = |m: Option<&Measured>, i: usize| tput(m, i).and_then(|t| t.cpu_per_gb);
    let t1 = ratio(gbps(ours, 0), gbps(bt, 0));
    let t4 = ratio(gbps(ours, 1), gbps(bt, 1));
    let streams = ratio(gbps(ours, 1), gbps(ours, 0));
    let c1 = ratio(cpu(ours, 0), cpu(base, 0));
    let c4 = ratio(cpu(ours, 1), cpu(base, 1));
    let over = |m: Option<&Measured>| match (rtt(m), rtt(raw)) {
        (Some(a), Some(b)) => Some(a.avg - b.avg),
        _ => None,
    };
    let (over_ours, over_bt) = (over(ours), over(bt));
    println!();
    println!("| ours vs goals (issue 16) | measured | goal | |");
    println!("|---|---|---|---|");
    println!(
        "| TCP 1 stream, ours / boringtun | {} | >= {GOAL_TPUT_VS_BORINGTUN}x | {} |",
        x(t1),
        verdict(t1.map(|v| v >= GOAL_TPUT_VS_BORINGTUN))
    );
    println!("| TCP 4 streams, ours / boringtun | {} | | |", x(t4));
    println!(
        "| TCP 4 streams / 1 stream, ours | {} | >= 1x | {} |",
        x(streams),
        verdict(streams.map(|v| v >= 1.0))
    );
    println!(
        "| CPU per Gbit/s (1 stream), ours / baseline | {} | <= {GOAL_CPU_VS_BASELINE}x | {} |",
        x(c1),
        verdict(c1.map(|v| v <= GOAL_CPU_VS_BASELINE))
    );
    println!(
        "| CPU per Gbit/s (4 streams), ours / baseline | {} | <= {GOAL_CPU_VS_BASELINE}x | {} |",
        x(c4),
        verdict(c4.map(|v| v <= GOAL_CPU_VS_BASELINE))
    );
    println!(
        "| TCP 1 stream, ours / baseline | {} | | |",
        x(ratio(gbps(ours, 0), gbps(base, 0)))
    );
    println!(
        "| CPU per GB (1 stream), ours / boringtun | {} | | |",
        x(ratio(cpu(ours, 0), cpu(bt, 0)))
    );
    println!(
        "| TCP 1 stream, ours / raw veth | {} | | |",
        x(ratio(gbps(ours, 0), gbps(raw, 0)))
    );
    println!(
        "| RTT overhead over raw veth (avg), ours vs boringtun | {} vs {} | <= boringtun's | {} |",
        ms(over_ours),
        ms(over_bt),
        verdict(match (over_ours, over_bt) {
            (Some(o), Some(b)) => Some(o <= b),
            _ => None,
        })
    );
    println!("| largest VPN MTU over a 1500-byte path (direct) | {MAX_PATH_MTU_VPN} | | |");
}

fn print_hub(result: &Result<Hub, String>, secs: u64) {
    println!();
    println!(
        "| one agent, {HUB_PEERS} peers pushing iperf3 at it ({secs} s) | measured | goal | |"
    );
    println!("|---|---|---|---|");
    match result {
        Err(why) => println!("| peak RSS | {why} | < {GOAL_RSS_MB} MB | n/a |"),
        Ok(h) => {
            let mb = |kb: Option<u64>| kb.map(|kb| kb as f64 * 1024.0 / 1e6);
            let show = |v: Option<f64>| v.map_or("?".into(), |v| format!("{v:.1} MB"));
            let verdict = |v: Option<f64>| match v {
                Some(v) if v < GOAL_RSS_MB => "met",
                Some(_) => "NOT met",
                None => "n/a",
            };
            println!(
                "| peers with a working VPN | {}/{HUB_PEERS} | | |",
                h.peers_up
            );
            println!("| aggregate TCP into the hub | {:.2} Gbit/s | | |", h.gbps);
            println!(
                "| hub agent VmHWM before traffic | {} | | |",
                show(mb(h.hub_idle_kb))
            );
            println!(
                "| hub agent VmHWM after traffic | {} | < {GOAL_RSS_MB} MB | {} |",
                show(mb(h.hub_peak_kb)),
                verdict(mb(h.hub_peak_kb))
            );
            println!(
                "| max VmHWM over all {} agents | {} | < {GOAL_RSS_MB} MB | {} |",
                HUB_PEERS + 1,
                show(mb(h.max_peak_kb)),
                verdict(mb(h.max_peak_kb))
            );
            for e in &h.errors {
                println!("  failed: {e}");
            }
        }
    }
}

const ROW_RAW: &str = "raw veth";
const ROW_OURS: &str = "kairos-p2p (ours)";
const ROW_BT: &str = "boringtun-cli";
const ROW_OURS_PLAIN: &str = "kairos-p2p, TUN offloads off";
const ROW_OURS_MAXMTU: &str = "kairos-p2p, MTU 1414";
const ROW_BASELINE: &str = "kairos-p2p baseline (KAIROS_BENCH_BASELINE)";
const ROW_WGGO: &str = "wireguard-go";

fn main() {
    if !is_root() {
        println!("skipped: the vpn benchmark needs root (it makes network namespaces)");
        return;
    }
    install_signal_cleanup();
    sweep_stale();
    let started = Instant::now();
    let secs: u64 = std::env::var("KAIROS_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let wanted = std::env::var("KAIROS_BENCH_ROWS").unwrap_or_default();
    let want = |key: &str| wanted.is_empty() || wanted.split(',').any(|w| w.trim() == key);
    let hub_on = std::env::var("KAIROS_BENCH_HUB").map_or(true, |v| v != "0");

    let tools_ok = ["iperf3", "ping", "wg", "wireguard-go", "ss"]
        .iter()
        .all(|t| have(t))
        && boringtun_path().is_some();
    if !tools_ok {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/bench/setup-tools.sh");
        println!("installing the benchmark tools ({})", script.display());
        let status = Command::new("bash").arg(&script).arg(target_dir()).status();
        if !status.is_ok_and(|s| s.success()) {
            println!("setup-tools.sh failed; rows whose tool is missing will say so");
        }
    }

    let mut rows = Vec::new();
    match Pair::new() {
        Err(e) => println!("cannot build the namespace pair: {e}"),
        Ok(pair) => {
            type RowFn = fn(&Pair, u64) -> Result<Measured, String>;
            let all: [(&str, &'static str, RowFn); 7] = [
                ("raw", ROW_RAW, raw_row),
                ("ours", ROW_OURS, ours_row),
                ("ours-plain", ROW_OURS_PLAIN, ours_plain_row),
                ("ours-maxmtu", ROW_OURS_MAXMTU, ours_maxmtu_row),
                ("baseline", ROW_BASELINE, baseline_row),
                ("boringtun", ROW_BT, |p, s| wg_row(p, Wg::Boringtun, s)),
                ("wireguard-go", ROW_WGGO, |p, s| {
                    wg_row(p, Wg::WireguardGo, s)
                }),
            ];
            for (key, name, f) in all {
                if !want(key) {
                    continue;
                }
                let t = Instant::now();
                let result =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&pair, secs)))
                        .unwrap_or_else(|_| Err("panicked (see above)".into()));
                match &result {
                    Ok(_) => println!("{name}: measured in {:.0} s", t.elapsed().as_secs_f64()),
                    Err(e) => println!("{name}: {e}"),
                }
                rows.push(Row { name, result });
            }
        }
    }
    print_rows(&rows, secs);

    let ours_failed = rows
        .iter()
        .find(|r| r.name == ROW_OURS)
        .and_then(|r| r.result.as_ref().err().cloned());
    let hub_result = if !hub_on {
        Err("skipped (KAIROS_BENCH_HUB=0)".into())
    } else if let Some(why) = ours_failed {
        Err(format!("skipped: the pair test says {why}"))
    } else {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| hub(secs)))
            .unwrap_or_else(|_| Err("panicked (see above)".into()))
    };
    print_hub(&hub_result, secs);
    println!();
    println!("vpn bench took {:.0} s", started.elapsed().as_secs_f64());
}
