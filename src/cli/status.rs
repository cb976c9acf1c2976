//! `status`: what the status page shows, as text: this node, then every node with its address,
//! role, online state, link and traffic (from `/api/summary`, `/api/nodes`, `/api/machines`).

use std::collections::BTreeMap;

use serde::Deserialize;

use super::table;

/// `GET /api/summary` (the fields shown).
#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
pub struct Summary {
    pub machines: u64,
    pub on_chain_nodes: u64,
    pub peers: u64,
    #[serde(rename = "NodeID")]
    pub node_id: String,
    #[serde(rename = "UUID")]
    pub uuid: String,
    pub hostname: String,
    pub role: String,
    pub address: String,
    #[serde(rename = "NetworkID")]
    pub network_id: String,
    pub version: String,
    pub uptime_seconds: u64,
    /// Where this node's k3s stands (empty: no k3s layer).
    pub k3s: String,
    /// Nodes other than the chosen master holding a master role (a second k3s cluster).
    pub second_masters: Vec<String>,
}

/// One entry of `GET /api/nodes` (online nodes).
#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
pub struct Node {
    #[serde(rename = "ID")]
    pub id: String,
    #[serde(rename = "UUID")]
    pub uuid: String,
    pub hostname: String,
    pub role: String,
    pub addresses: Vec<String>,
    pub connected: bool,
    pub relayed: bool,
    pub rtt_ms: Option<f64>,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

/// One entry of `GET /api/machines` (every machine with a VPN address).
#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
pub struct Machine {
    #[serde(rename = "PeerID")]
    pub peer_id: String,
    pub hostname: String,
    pub address: String,
    pub online: bool,
    pub role: String,
}

/// `GET /api/metrics` (libp2p's bandwidth totals).
#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
pub struct Bandwidth {
    pub total_in: u64,
    pub total_out: u64,
}

/// The summary text.
pub fn render(
    summary: &Summary,
    nodes: &[Node],
    machines: &[Machine],
    traffic: &Bandwidth,
) -> String {
    let or_dash = |s: &str| {
        if s.is_empty() {
            "-".to_string()
        } else {
            s.to_string()
        }
    };
    let mut out = format!(
        "This node   {} ({})\n\
         Peer ID     {}\n\
         Role        {}\n\
         k3s         {}\n\
         VPN address {}\n\
         Network     {}: {} machines, {} peers connected, {} members known\n\
         Traffic     in {}, out {}\n\
         Version     {}, up {}\n\n",
        or_dash(&summary.hostname),
        or_dash(&summary.uuid),
        summary.node_id,
        or_dash(&summary.role),
        or_dash(&summary.k3s),
        or_dash(&summary.address),
        summary.network_id,
        summary.machines,
        summary.on_chain_nodes,
        summary.peers,
        bytes(traffic.total_in),
        bytes(traffic.total_out),
        or_dash(&summary.version),
        duration(summary.uptime_seconds),
    );
    if !summary.second_masters.is_empty() {
        out.push_str(&format!(
            "SECOND MASTER: {} also hold a master role (two k3s clusters; see the README, \
             \"Second master\")\n\n",
            summary.second_masters.join(", ")
        ));
    }
    let vpn: BTreeMap<&str, &Machine> = machines.iter().map(|m| (m.peer_id.as_str(), m)).collect();
    let mut rows: Vec<Vec<String>> = nodes
        .iter()
        .filter(|n| n.id != summary.node_id)
        .map(|n| {
            let link = match (n.connected, n.relayed) {
                (false, _) => "-",
                (true, false) => "direct",
                (true, true) => "relayed",
            };
            vec![
                or_dash(&n.hostname),
                or_dash(&n.uuid),
                or_dash(vpn.get(n.id.as_str()).map_or("", |m| m.address.as_str())),
                or_dash(&n.role),
                "yes".to_string(),
                link.to_string(),
                n.rtt_ms.map_or("-".to_string(), |ms| format!("{ms:.1} ms")),
                bytes(n.bytes_in),
                bytes(n.bytes_out),
                or_dash(&n.addresses.join(" ")),
            ]
        })
        .collect();
    // Machines not online: known from the ledger only.
    for m in machines {
        let listed = m.peer_id == summary.node_id || nodes.iter().any(|n| n.id == m.peer_id);
        if !listed {
            let online = if m.online { "yes" } else { "no" };
            let cells = [
                &m.hostname,
                "",
                &m.address,
                &m.role,
                online,
                "",
                "",
                "",
                "",
                "",
            ];
            rows.push(cells.iter().map(|c| or_dash(c)).collect());
        }
    }
    if rows.is_empty() {
        out.push_str("No other node yet.\n");
    } else {
        let headers = [
            "HOSTNAME",
            "UUID",
            "VPN",
            "ROLE",
            "ONLINE",
            "LINK",
            "RTT",
            "IN",
            "OUT",
            "ADDRESSES",
        ];
        out.push_str(&table::render(&headers, &rows));
    }
    out
}

/// `1536` → `1.5 KiB`.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// `3725` → `1h 02m`.
fn duration(seconds: u64) -> String {
    let (d, h, m, s) = (
        seconds / 86_400,
        seconds / 3600 % 24,
        seconds / 60 % 60,
        seconds % 60,
    );
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s:02}s"),
        (0, _, _) => format!("{h}h {m:02}m"),
        _ => format!("{d}d {h:02}h"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn units() {
        for (n, text) in [
            (0, "0 B"),
            (1023, "1023 B"),
            (1536, "1.5 KiB"),
            (5 << 30, "5.0 GiB"),
        ] {
            assert_eq!(bytes(n), text);
        }
        for (s, text) in [
            (0, "0s"),
            (59, "59s"),
            (61, "1m 01s"),
            (3725, "1h 02m"),
            (90_000, "1d 01h"),
        ] {
            assert_eq!(duration(s), text);
        }
    }

    #[test]
    fn status_text() {
        let summary: Summary = serde_json::from_value(json!({
            "Machines": 3, "OnChainNodes": 1, "Peers": 2, "NodeID": "12D3me",
            "UUID": "u1", "Hostname": "node1", "Role": "master", "Address": "10.1.0.1",
            "NetworkID": "kairos", "Version": "0.1.0", "UptimeSeconds": 3725, "Files": 0,
            "K3s": "running (pid 42)"
        }))
        .unwrap();
        let nodes: Vec<Node> = serde_json::from_value(json!([
            {"ID": "12D3me", "Online": true, "UUID": "u1", "Hostname": "node1"},
            {"ID": "12D3two", "Online": true, "UUID": "u2", "Hostname": "node2",
             "Role": "worker", "Addresses": ["10.78.0.2:7120"], "Connected": true,
             "Relayed": false, "RttMs": 1.25, "BytesIn": 2048, "BytesOut": 100},
        ]))
        .unwrap();
        let machines: Vec<Machine> = serde_json::from_value(json!([
            {"PeerID": "12D3me", "Address": "10.1.0.1", "Online": true},
            {"PeerID": "12D3two", "Hostname": "node2", "Address": "10.1.0.2", "Online": true},
            {"PeerID": "12D3three", "Hostname": "node3", "Address": "10.1.0.3", "Online": false,
             "Role": "worker"},
        ]))
        .unwrap();
        let traffic = Bandwidth {
            total_in: 4096,
            total_out: 10,
        };
        let text = render(&summary, &nodes, &machines, &traffic);
        assert_eq!(
            text,
            "This node   node1 (u1)\n\
             Peer ID     12D3me\n\
             Role        master\n\
             k3s         running (pid 42)\n\
             VPN address 10.1.0.1\n\
             Network     kairos: 3 machines, 1 peers connected, 2 members known\n\
             Traffic     in 4.0 KiB, out 10 B\n\
             Version     0.1.0, up 1h 02m\n\n\
             HOSTNAME  UUID  VPN       ROLE    ONLINE  LINK    RTT     IN       OUT    ADDRESSES\n\
             node2     u2    10.1.0.2  worker  yes     direct  1.2 ms  2.0 KiB  100 B  10.78.0.2:7120\n\
             node3     -     10.1.0.3  worker  no      -       -       -        -      -\n"
        );
        let alone = render(&summary, &nodes[..1], &machines[..1], &traffic);
        assert!(alone.ends_with("No other node yet.\n"), "{alone}");
    }
}
