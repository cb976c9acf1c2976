//! The local HTTP API of real agents in network namespaces, over their unix sockets (which the
//! test process reaches directly: unix sockets are not network-namespaced).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use common::{
    api_exchange, api_get_json as get_json, api_request as request, api_socket as socket,
    lab_with_hosts, peer_id_of, wait_for,
};

use kairos_p2p::api::{MAX_BODY_BYTES, MAX_HEADER_BYTES};

/// The status code of a raw response (0 when there is none).
fn status_code(response: &str) -> u16 {
    response
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

#[test]
fn two_agents_serve_the_api_on_their_unix_sockets() {
    let (mut lab, config, hosts) = lab_with_hosts("api2", "10.78.0", 2, "");
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

    // Every other edgevpn endpoint answers JSON.
    for target in [
        "/api/users",
        "/api/services",
        "/api/blockchain",
        "/api/ledger",
        "/api/ledger/kairos",
        "/api/metrics",
        "/api/nodes",
    ] {
        get_json(&a, target);
    }
    let (status, _, _) = request(&a, "PUT", "/api/ledger/gone/k1/v");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(get_json(&a, "/api/ledger/gone")["k1"], "\"v\"");
    let (status, _, _) = request(&a, "DELETE", "/api/ledger/gone");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(get_json(&a, "/api/ledger/gone"), serde_json::Value::Null);

    // Malformed and oversize requests: 4xx, and the agent keeps serving.
    let big_header = format!(
        "GET / HTTP/1.1\r\nX-Big: {}\r\n\r\n",
        "a".repeat(MAX_HEADER_BYTES)
    );
    let big_body = format!(
        "PUT /api/ledger/b/k/v HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
        MAX_BODY_BYTES + 1
    );
    let long_value = format!(
        "PUT /api/ledger/b/k/{} HTTP/1.1\r\nConnection: close\r\n\r\n",
        "v".repeat(65 * 1024)
    );
    let cases: [(&str, &[u8]); 8] = [
        ("garbage", b"NONSENSE\r\n\r\n"),
        ("binary", b"\x00\xff\x16\x03\x01\r\n\r\n"),
        ("bad method", b"BREW /api/summary HTTP/1.1\r\n\r\n"),
        ("wrong method", b"POST /api/summary HTTP/1.1\r\n\r\n"),
        ("bad path", b"GET /api/ledger/%zz HTTP/1.1\r\n\r\n"),
        ("header too large", big_header.as_bytes()),
        ("body too large", big_body.as_bytes()),
        ("value too large", long_value.as_bytes()),
    ];
    for (what, raw) in cases {
        let response = api_exchange(&a, raw);
        let code = status_code(&response);
        // An unknown method gets 501 Not Implemented (RFC 9110 15.6.2); the rest 4xx.
        let allowed = if what == "bad method" {
            400..502
        } else {
            400..500
        };
        assert!(allowed.contains(&code), "{what}: {response}");
        let summary = get_json(&a, "/api/summary");
        assert_eq!(
            summary["NodeID"].as_str(),
            Some(me.as_str()),
            "after {what}"
        );
    }

    // A clean stop removes the socket.
    assert!(lab.stop(0).success(), "clean stop");
    assert!(!a.exists(), "socket removed on shutdown");
    assert!(lab.stop(1).success(), "clean stop");
}
