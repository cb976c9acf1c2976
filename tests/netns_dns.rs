//! `p2p.dns`: two real agents in network namespaces serve DNS as edgevpn does. A record set
//! posted to one agent's `/api/dns` is resolved by `dig` (bind9-dnsutils) on the other node,
//! through the VPN and from its own service; other names are forwarded to a DNS server this
//! test runs in a third namespace (a few lines of Python answering every A query), cached, and
//! SERVFAIL once that server is gone and nothing is cached.

mod common;

use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::{Host, api_exchange, api_request, api_socket, lab_with_hosts, wait_for};

/// The upstream server: answers every A question with 192.0.2.77, TTL 300.
const UPSTREAM: &str = r#"
import socket, struct
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 53))
while True:
    q, a = s.recvfrom(4096)
    i = 12
    while q[i] != 0:
        i += q[i] + 1
    question = q[12:i + 5]
    head = q[:2] + b"\x81\x80" + b"\x00\x01\x00\x01\x00\x00\x00\x00"
    answer = b"\xc0\x0c\x00\x01\x00\x01" + struct.pack(">I", 300) + b"\x00\x04" + bytes([192, 0, 2, 77])
    s.sendto(head + question + answer, a)
"#;

/// `dig` inside `host`'s namespace: one try, one second.
fn dig(host: &Host, server: &str, name: &str, qtype: &str) -> Output {
    Command::new("ip")
        .args(["netns", "exec", &host.ns, "dig", "+time=1", "+tries=1"])
        .arg(format!("@{server}"))
        .args([name, qtype])
        .output()
        .expect("dig (bind9-dnsutils) runs")
}

/// The answer section of `dig`'s output, as `name type value` lines, and the status.
fn answers(out: &Output) -> (String, Vec<String>) {
    let text = String::from_utf8_lossy(&out.stdout);
    let status = text
        .split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or("")
        .to_string();
    let mut lines = Vec::new();
    let mut in_answer = false;
    for line in text.lines() {
        if line.starts_with(";; ANSWER SECTION") {
            in_answer = true;
        } else if line.trim().is_empty() {
            in_answer = false;
        } else if in_answer {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() >= 5 {
                lines.push(format!("{} {} {}", f[0], f[3], f[4..].join(" ")));
            }
        }
    }
    (status, lines)
}

struct Upstream(Child);

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn records_resolve_across_the_vpn_and_the_rest_is_forwarded_and_cached() {
    let extra = "  dns: true\n  vpn:\n    env:\n      DNSADDRESS: \":53\"\n      \
                 DNSFORWARDSERVER: \"10.81.0.3:53\"\n      DNSCACHESIZE: \"10\"\n";
    let (mut lab, config, hosts) = lab_with_hosts("dns", "10.81.0", 3, extra);
    let upstream = Command::new("ip")
        .args(["netns", "exec", &hosts[2].ns, "python3", "-c", UPSTREAM])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let mut upstream = Some(Upstream(upstream));
    for (i, h) in hosts[..2].iter().enumerate() {
        let uuid = format!("netns-dns-node-{}", i + 1);
        lab.spawn_with_env(h, &["agent", "--config", &config], &[("UUID", &uuid)]);
    }
    let (a, b) = (&hosts[0], &hosts[1]);
    let vpn_of = |h: &Host| -> String {
        let (_, _, body) = api_request(&api_socket(h), "GET", "/api/summary");
        serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|s| s["Address"].as_str().map(str::to_string))
            .unwrap_or_default()
    };
    let up = wait_for(Duration::from_secs(20), || {
        api_socket(a).exists() && !vpn_of(a).is_empty() && !vpn_of(b).is_empty()
    });
    assert!(up.is_some(), "both agents have VPN addresses");
    let a_vpn = vpn_of(a);

    // A record set on node a.
    let body = r#"{"Regex":"^web\\.vpn\\.$","Records":{"A":"10.81.9.9","TXT":"hello"}}"#;
    let raw = format!(
        "POST /api/dns HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let response = api_exchange(&api_socket(a), raw.as_bytes());
    assert!(response.contains("Announcing"), "{response}");

    // Resolved from node b, through the VPN by node a's service and by b's own.
    for server in [a_vpn.as_str(), "127.0.0.1"] {
        let resolved = wait_for(Duration::from_secs(10), || {
            answers(&dig(b, server, "web.vpn", "A")).1 == ["web.vpn. A 10.81.9.9"]
        });
        assert!(
            resolved.is_some(),
            "web.vpn via {server}: {}",
            String::from_utf8_lossy(&dig(b, server, "web.vpn", "A").stdout)
        );
    }
    let (status, txt) = answers(&dig(b, &a_vpn, "WEB.VPN", "TXT"));
    assert_eq!(
        (status.as_str(), txt),
        ("NOERROR", vec!["WEB.VPN. TXT \"hello\"".to_string()])
    );
    let (status, none) = answers(&dig(b, &a_vpn, "web.vpn", "AAAA"));
    assert_eq!(
        (status.as_str(), none.len()),
        ("NOERROR", 0),
        "the name exists, not the type"
    );
    let listed = api_request(&api_socket(b), "GET", "/api/dns").2;
    assert!(listed.contains(r#""A":"10.81.9.9""#), "{listed}");

    // Other names: forwarded to the upstream server, then served from the cache.
    let (status, fwd) = answers(&dig(b, &a_vpn, "example.org", "A"));
    assert_eq!(
        (status.as_str(), fwd),
        ("NOERROR", vec!["example.org. A 192.0.2.77".to_string()])
    );
    drop(upstream.take());
    let (_, cached) = answers(&dig(b, &a_vpn, "example.org", "A"));
    assert_eq!(cached, ["example.org. A 192.0.2.77"], "from the cache");
    // Nothing cached and no server: SERVFAIL (after the forward timeout).
    let out = Command::new("ip")
        .args(["netns", "exec", &b.ns, "dig", "+time=4", "+tries=1"])
        .arg(format!("@{a_vpn}"))
        .args(["other.org", "A"])
        .output()
        .unwrap();
    assert_eq!(
        answers(&out).0,
        "SERVFAIL",
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    drop(lab);
}
