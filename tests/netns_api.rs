//! The local HTTP API of real agents in network namespaces, over their unix sockets (which the
//! test process reaches directly: unix sockets are not network-namespaced).

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{Host, Lab, generate_token, peer_id_of, wait_for, write_config};

fn socket(host: &Host) -> PathBuf {
    host.dir.join("state").join("api.sock")
}

/// Sends `raw` on a fresh connection and returns everything the agent sent back.
fn exchange(path: &Path, raw: &[u8]) -> String {
    let mut stream = UnixStream::connect(path).expect("connect to the API socket");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream.write_all(raw).unwrap();
    let mut out = Vec::new();
    stream.read_to_end(&mut out).expect("response");
    String::from_utf8_lossy(&out).into_owned()
}

/// `(status line, headers, body)` of one request with `Connection: close`.
fn request(path: &Path, method: &str, target: &str) -> (String, String, String) {
    let raw = format!(
        "{method} {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    );
    let response = exchange(path, raw.as_bytes());
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or((response.as_str(), ""));
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    (status.to_string(), headers.to_string(), body.to_string())
}

fn get_json(path: &Path, target: &str) -> serde_json::Value {
    let (status, headers, body) = request(path, "GET", target);
    assert_eq!(status, "HTTP/1.1 200 OK", "{target}");
    assert!(
        headers.to_ascii_lowercase().contains("application/json"),
        "{target}: {headers}"
    );
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{target}: {e}: {body}"))
}

#[test]
fn two_agents_serve_the_api_on_their_unix_sockets() {
    let mut lab = Lab::new("api2");
    let token = generate_token();
    let config = write_config(
        &lab.dir,
        "config.yaml",
        &format!("#cloud-config\np2p:\n  network_token: \"{token}\"\n  disable_dht: true\n"),
    );
    let config = config.to_str().unwrap().to_string();
    let hosts: Vec<Host> = (1..=2)
        .map(|i| lab.add_host(i, &format!("10.78.0.{i}/24")))
        .collect();
    for (i, h) in hosts.iter().enumerate() {
        let uuid = format!("netns-api-node-{}", i + 1);
        lab.spawn_with_env(h, &["agent", "--config", &config], &[("UUID", &uuid)]);
    }
    let (a, b) = (socket(&hosts[0]), socket(&hosts[1]));
    assert!(
        wait_for(Duration::from_secs(10), || a.exists() && b.exists()).is_some(),
        "API sockets created"
    );
    for s in [&a, &b] {
        let mode = std::fs::metadata(s).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", s.display());
    }

    // Summary: this node's peer id.
    let me = peer_id_of(&hosts[0]);
    let summary = get_json(&a, "/api/summary");
    assert_eq!(summary["NodeID"].as_str(), Some(me.as_str()), "{summary}");

    // Machines: both, once addresses are assigned.
    let both = wait_for(Duration::from_secs(20), || {
        get_json(&a, "/api/machines")
            .as_array()
            .is_some_and(|m| m.len() == 2)
    });
    assert!(
        both.is_some(),
        "both machines listed: {}",
        get_json(&a, "/api/machines")
    );

    // A write on one agent reaches the other.
    let (status, _, _) = request(&a, "PUT", "/api/ledger/test/hello/world");
    assert_eq!(status, "HTTP/1.1 200 OK");
    let value = |path: &Path| get_json(path, "/api/ledger/test/hello");
    assert!(value(&a).as_str().unwrap_or_default().contains("world"));
    assert!(
        wait_for(Duration::from_secs(5), || {
            value(&b).as_str().unwrap_or_default().contains("world")
        })
        .is_some(),
        "value gossiped: {}",
        value(&b)
    );
    let (status, _, _) = request(&a, "DELETE", "/api/ledger/test/hello");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(
        wait_for(Duration::from_secs(5), || {
            value(&a).as_str() == Some("") && value(&b).as_str() == Some("")
        })
        .is_some(),
        "value deleted everywhere: {} {}",
        value(&a),
        value(&b)
    );

    // Prometheus metrics and the status page.
    let (status, headers, body) = request(&a, "GET", "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(headers.contains("text/plain"), "{headers}");
    assert!(body.contains("kairos_p2p_"), "{body}");
    assert!(body.contains("kairos_p2p_uptime_seconds"), "{body}");
    let (status, headers, body) = request(&a, "GET", "/");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(headers.contains("text/html"), "{headers}");
    assert!(body.to_ascii_lowercase().contains("<html"), "{body}");

    // A malformed request: 4xx, and the agent keeps serving.
    let response = exchange(&a, b"NONSENSE\r\n\r\n");
    let code: u16 = response
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    assert!((400..500).contains(&code), "{response}");
    let summary = get_json(&a, "/api/summary");
    assert_eq!(summary["NodeID"].as_str(), Some(me.as_str()));

    // A clean stop removes the socket.
    assert!(lab.stop(0).success(), "clean stop");
    assert!(!a.exists(), "socket removed on shutdown");
    assert!(lab.stop(1).success(), "clean stop");
}
