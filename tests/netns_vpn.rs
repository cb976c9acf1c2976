//! The VPN of real agents in network namespaces: three agents with allocated addresses and a
//! `bridge` with its static one reach each other over their TUN interfaces; a 50 MB TCP stream
//! arrives intact; a packet with a spoofed inner source is dropped and counted; an agent killed
//! and restarted is reachable again at the same address.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{
    Host, Lab, generate_token, metric, pings, unix_get, vpn_addr, wait_for, write_config,
};

/// Runs python3 `code` with `args` inside the host's namespace; its stdout, trimmed.
fn python(host: &Host, code: &str, args: &[&str]) -> std::process::Child {
    Command::new("ip")
        .args(["netns", "exec", &host.ns, "python3", "-c", code])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3")
}

fn output(child: std::process::Child) -> String {
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "python3 failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Receives one TCP stream on `addr:port`, prints its length and SHA-256.
const TCP_SINK: &str = r#"
import hashlib, socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1); s.settimeout(60)
c, _ = s.accept(); c.settimeout(60)
h = hashlib.sha256(); n = 0
while True:
    b = c.recv(1 << 16)
    if not b: break
    h.update(b); n += len(b)
print(n, h.hexdigest())
"#;

/// Sends `size` pseudo-random bytes to `addr:port`, prints their length and SHA-256.
const TCP_SOURCE: &str = r#"
import hashlib, random, socket, sys, time
size = int(sys.argv[3]); rng = random.Random(7); h = hashlib.sha256()
for attempt in range(50):
    try:
        c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=60); break
    except OSError:
        time.sleep(0.2)
sent = 0
while sent < size:
    b = rng.randbytes(min(1 << 16, size - sent))
    c.sendall(b); h.update(b); sent += len(b)
c.close()
print(sent, h.hexdigest())
"#;

/// Sends one ICMP echo request from `src` (not ours) to `dst` through the routing table.
const SPOOF: &str = r#"
import socket, struct, sys
def csum(b):
    if len(b) % 2: b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b)); s = (s >> 16) + (s & 0xffff); s += s >> 16
    return ~s & 0xffff
src, dst = socket.inet_aton(sys.argv[1]), socket.inet_aton(sys.argv[2])
icmp = struct.pack("!BBHHH", 8, 0, 0, 0x4b50, 1) + b"spoofed"
icmp = icmp[:2] + struct.pack("!H", csum(icmp)) + icmp[4:]
ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 1, 0, 64, 1, 0, src, dst)
ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
for _ in range(5): s.sendto(ip + icmp, (sys.argv[2], 0))
print("sent")
"#;

fn api_socket(host: &Host, bridge: bool) -> PathBuf {
    let state = host.dir.join("state");
    let state = if bridge { state.join("bridge") } else { state };
    state.join("api.sock")
}

#[test]
fn three_agents_and_a_bridge_reach_each_other_over_the_vpn() {
    let mut lab = Lab::new("vpn");
    let token = generate_token();
    let config = write_config(
        &lab.dir,
        "config.yaml",
        &format!("#cloud-config\np2p:\n  network_token: \"{token}\"\n  disable_dht: true\n"),
    );
    let config = config.to_str().unwrap().to_string();
    let hosts: Vec<Host> = (1..=4)
        .map(|i| lab.add_host(i, &format!("10.79.0.{i}/24")))
        .collect();
    let agent_args = ["agent", "--config", config.as_str()];
    let mut children = Vec::new();
    for (i, h) in hosts.iter().take(3).enumerate() {
        let uuid = format!("netns-vpn-node-{}", i + 1);
        children.push(lab.spawn_with_env(h, &agent_args, &[("UUID", uuid.as_str())]));
    }
    lab.spawn_with_env(&hosts[3], &["bridge"], &[("NETWORK_TOKEN", &token)]);

    // Every agent gets an address; the bridge has its static one.
    let mut addrs: Vec<String> = Vec::new();
    for h in &hosts[..3] {
        let got = wait_for(Duration::from_secs(20), || {
            vpn_addr(h, "edgevpn0").is_some()
        });
        assert!(got.is_some(), "{} got no VPN address", h.ns);
        addrs.push(vpn_addr(h, "edgevpn0").unwrap());
    }
    let bridge_up = wait_for(Duration::from_secs(20), || {
        vpn_addr(&hosts[3], "kairos0").as_deref() == Some("10.1.0.254")
    });
    assert!(bridge_up.is_some(), "bridge has 10.1.0.254 on kairos0");
    addrs.push("10.1.0.254".to_string());
    let mut sorted = addrs.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), 4, "distinct addresses: {addrs:?}");

    // Every ordered pair pings.
    for (i, from) in hosts.iter().enumerate() {
        for (j, to) in addrs.iter().enumerate() {
            if i != j {
                let ok = wait_for(Duration::from_secs(20), || pings(from, to));
                assert!(ok.is_some(), "{} cannot ping {to} over the VPN", from.ns);
            }
        }
    }

    // 50 MB over TCP from agent 1 to agent 2, intact.
    let size = (50 * 1024 * 1024).to_string();
    let sink = python(&hosts[1], TCP_SINK, &[&addrs[1], "5001"]);
    let source = python(&hosts[0], TCP_SOURCE, &[&addrs[1], "5001", &size]);
    let sent = output(source);
    let received = output(sink);
    assert!(sent.starts_with(&size), "sent {sent}");
    assert_eq!(received, sent, "the stream arrived intact");

    // A packet from agent 1 claiming agent 2's address never leaves agent 1, and is counted.
    let metrics = |h: &Host| unix_get(&api_socket(h, false), "/metrics");
    let spoof_counter = "kairos_p2p_vpn_dropped_total{direction=\"out\",reason=\"not_our_source\"}";
    let before = metric(&metrics(&hosts[0]), spoof_counter);
    let in_before = metric(
        &metrics(&hosts[2]),
        "kairos_p2p_vpn_packets_total{direction=\"in\"}",
    );
    assert_eq!(
        output(python(&hosts[0], SPOOF, &[&addrs[1], &addrs[2]])),
        "sent"
    );
    let counted = wait_for(Duration::from_secs(5), || {
        metric(&metrics(&hosts[0]), spoof_counter) >= before + 5
    });
    assert!(
        counted.is_some(),
        "spoofed packets counted: {}",
        metrics(&hosts[0])
    );
    let in_after = metric(
        &metrics(&hosts[2]),
        "kairos_p2p_vpn_packets_total{direction=\"in\"}",
    );
    assert!(
        in_after < in_before + 5,
        "spoofed packets reached agent 3 ({in_before} → {in_after})"
    );

    // Agent 3 killed and restarted: reachable again at the same address.
    lab.kill(children[2]);
    assert!(
        wait_for(Duration::from_secs(5), || !pings(&hosts[0], &addrs[2])).is_some(),
        "agent 3 is gone"
    );
    lab.spawn_with_env(&hosts[2], &agent_args, &[("UUID", "netns-vpn-node-3")]);
    let back = wait_for(Duration::from_secs(30), || pings(&hosts[0], &addrs[2]));
    assert!(back.is_some(), "agent 3 reachable again at {}", addrs[2]);
    assert_eq!(
        vpn_addr(&hosts[2], "edgevpn0").as_deref(),
        Some(addrs[2].as_str())
    );
    assert!(pings(&hosts[3], &addrs[2]), "the bridge reaches it too");
}
