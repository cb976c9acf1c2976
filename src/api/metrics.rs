//! The node's counters and their Prometheus text exposition (format 0.0.4), served at `/metrics`.
//! [`Metrics`] is plain data the driver fills from the node, the transport and the cluster.

use std::fmt::Write as _;
use std::time::Duration;

use crate::vpn::VpnStats;

/// Where one discovery mechanism stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DiscoveryState {
    /// Off by configuration.
    #[default]
    Disabled,
    /// On, and nothing found through it yet (LAN: no beacon heard; DHT: routing table empty).
    Searching,
    /// On and working (LAN: beacons heard; DHT: routing table holds peers).
    Active,
}

impl DiscoveryState {
    const ALL: [DiscoveryState; 3] = [
        DiscoveryState::Disabled,
        DiscoveryState::Searching,
        DiscoveryState::Active,
    ];

    /// Its name, as the `state` label.
    fn as_str(self) -> &'static str {
        match self {
            DiscoveryState::Disabled => "disabled",
            DiscoveryState::Searching => "searching",
            DiscoveryState::Active => "active",
        }
    }
}

/// A snapshot of the node's counters and gauges.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metrics {
    /// Time since the agent started.
    pub uptime: Duration,
    /// The k3s role this node holds (`master`, `master/ha`, `worker`, ...), if any.
    pub role: Option<String>,
    /// Whether this node leads the cluster (runs elections and assigns roles).
    pub leader: bool,
    /// Peers with an established connection.
    pub peers_connected: u64,
    /// Of those, peers reached through a relay.
    pub peers_relayed: u64,
    /// Members known (connected or not).
    pub members_known: u64,
    /// Cluster nodes whose heartbeat is fresh, this one included.
    pub cluster_nodes_live: u64,
    /// Nodes other than the chosen master holding a master role (0 when all is well).
    pub second_masters: u64,
    /// UDP bytes received on the overlay socket.
    pub bytes_in: u64,
    /// UDP bytes sent.
    pub bytes_out: u64,
    /// UDP packets received.
    pub packets_in: u64,
    /// UDP packets sent.
    pub packets_out: u64,
    /// Handshakes completed.
    pub handshakes_ok: u64,
    /// Handshakes failed.
    pub handshakes_failed: u64,
    /// Inputs dropped, as `(reason, count)` with distinct reasons (e.g. `("not_quic", 3)`).
    pub drops: Vec<(&'static str, u64)>,
    /// Local failures the agent lived through (disk full, TUN interface gone, ...), as
    /// `(kind, count)` with distinct kinds (e.g. `("ledger_save", 2)`).
    pub errors: Vec<(&'static str, u64)>,
    /// LAN beacons.
    pub lan_discovery: DiscoveryState,
    /// The DHT.
    pub dht_discovery: DiscoveryState,
    /// Ledger entries held, tombstones included.
    pub ledger_entries: u64,
    /// Ledger bytes held.
    pub ledger_bytes: u64,
    /// Ledger entries stored since start (new or replacing, local writes included).
    pub ledger_applied: u64,
    /// The VPN packet path's counters (`None`: no VPN).
    pub vpn: Option<VpnStats>,
    /// Where k3s stands ([`K3sState::name`](crate::k3s::K3sState::name); `None`: no k3s).
    pub k3s_state: Option<&'static str>,
}

/// Renders `metrics` in the Prometheus text format 0.0.4: every family has `# HELP` and
/// `# TYPE` lines, names start with `kairos_p2p_`, label values are escaped.
#[must_use]
pub fn render_prometheus(metrics: &Metrics) -> String {
    let mut out = String::with_capacity(4096);
    let m = metrics;
    family(
        &mut out,
        "uptime_seconds",
        "gauge",
        "Seconds since the agent started.",
    );
    sample(&mut out, "uptime_seconds", &[], m.uptime.as_secs_f64());

    family(
        &mut out,
        "role",
        "gauge",
        "The k3s role this node holds (none: no role yet).",
    );
    let role = m.role.as_deref().unwrap_or("none");
    sample(&mut out, "role", &[("role", role)], 1);

    if let Some(state) = m.k3s_state {
        family(
            &mut out,
            "k3s_state",
            "gauge",
            "1 for the state this node's k3s is in (see the README's k3s section).",
        );
        for name in crate::k3s::K3sState::NAMES {
            sample(
                &mut out,
                "k3s_state",
                &[("state", name)],
                u8::from(name == state),
            );
        }
    }

    family(
        &mut out,
        "leader",
        "gauge",
        "1 when this node leads the cluster.",
    );
    sample(&mut out, "leader", &[], u8::from(m.leader));

    family(
        &mut out,
        "peers_connected",
        "gauge",
        "Peers with an established connection.",
    );
    sample(&mut out, "peers_connected", &[], m.peers_connected);
    family(
        &mut out,
        "peers_relayed",
        "gauge",
        "Connected peers reached through a relay.",
    );
    sample(&mut out, "peers_relayed", &[], m.peers_relayed);
    family(
        &mut out,
        "members_known",
        "gauge",
        "Members known, connected or not.",
    );
    sample(&mut out, "members_known", &[], m.members_known);
    family(
        &mut out,
        "cluster_nodes_live",
        "gauge",
        "Cluster nodes with a fresh heartbeat, this one included.",
    );
    sample(&mut out, "cluster_nodes_live", &[], m.cluster_nodes_live);
    family(
        &mut out,
        "second_masters",
        "gauge",
        "Nodes other than the chosen master holding a master role: a second k3s cluster when > 0.",
    );
    sample(&mut out, "second_masters", &[], m.second_masters);

    family(
        &mut out,
        "received_bytes_total",
        "counter",
        "UDP bytes received on the overlay.",
    );
    sample(&mut out, "received_bytes_total", &[], m.bytes_in);
    family(
        &mut out,
        "sent_bytes_total",
        "counter",
        "UDP bytes sent on the overlay.",
    );
    sample(&mut out, "sent_bytes_total", &[], m.bytes_out);
    family(
        &mut out,
        "received_packets_total",
        "counter",
        "UDP packets received on the overlay.",
    );
    sample(&mut out, "received_packets_total", &[], m.packets_in);
    family(
        &mut out,
        "sent_packets_total",
        "counter",
        "UDP packets sent on the overlay.",
    );
    sample(&mut out, "sent_packets_total", &[], m.packets_out);

    family(
        &mut out,
        "handshakes_total",
        "counter",
        "Overlay handshakes by result.",
    );
    sample(
        &mut out,
        "handshakes_total",
        &[("result", "ok")],
        m.handshakes_ok,
    );
    sample(
        &mut out,
        "handshakes_total",
        &[("result", "failed")],
        m.handshakes_failed,
    );

    family(
        &mut out,
        "dropped_total",
        "counter",
        "Inputs dropped, by reason.",
    );
    for (reason, count) in &m.drops {
        sample(&mut out, "dropped_total", &[("reason", *reason)], count);
    }
    family(
        &mut out,
        "errors_total",
        "counter",
        "Local failures the agent kept running through (and retries with back-off), by kind.",
    );
    for (kind, count) in &m.errors {
        sample(&mut out, "errors_total", &[("kind", *kind)], count);
    }

    family(
        &mut out,
        "discovery_state",
        "gauge",
        "Discovery mechanisms: 1 for the state each one is in.",
    );
    for (mechanism, state) in [("lan", m.lan_discovery), ("dht", m.dht_discovery)] {
        for candidate in DiscoveryState::ALL {
            let labels = [("mechanism", mechanism), ("state", candidate.as_str())];
            sample(
                &mut out,
                "discovery_state",
                &labels,
                u8::from(state == candidate),
            );
        }
    }

    family(
        &mut out,
        "ledger_entries",
        "gauge",
        "Ledger entries held, tombstones included.",
    );
    sample(&mut out, "ledger_entries", &[], m.ledger_entries);
    family(&mut out, "ledger_bytes", "gauge", "Ledger bytes held.");
    sample(&mut out, "ledger_bytes", &[], m.ledger_bytes);
    family(
        &mut out,
        "ledger_applied_total",
        "counter",
        "Ledger entries stored since start, local writes included.",
    );
    sample(&mut out, "ledger_applied_total", &[], m.ledger_applied);
    if let Some(vpn) = &m.vpn {
        render_vpn(&mut out, vpn);
    }
    out
}

/// The VPN families: packets and bytes each way, drops by direction and reason.
fn render_vpn(out: &mut String, vpn: &VpnStats) {
    family(
        out,
        "vpn_packets_total",
        "counter",
        "VPN packets carried, by direction (out: read from the TUN interface and sent).",
    );
    sample(
        out,
        "vpn_packets_total",
        &[("direction", "out")],
        vpn.packets_out,
    );
    sample(
        out,
        "vpn_packets_total",
        &[("direction", "in")],
        vpn.packets_in,
    );
    family(
        out,
        "vpn_bytes_total",
        "counter",
        "Bytes of the VPN packets carried, by direction.",
    );
    sample(
        out,
        "vpn_bytes_total",
        &[("direction", "out")],
        vpn.bytes_out,
    );
    sample(out, "vpn_bytes_total", &[("direction", "in")], vpn.bytes_in);
    family(
        out,
        "vpn_dropped_total",
        "counter",
        "VPN packets dropped, by direction and reason.",
    );
    for (direction, drops) in [("out", &vpn.dropped_out), ("in", &vpn.dropped_in)] {
        for (reason, count) in drops.iter() {
            let labels = [("direction", direction), ("reason", reason.name())];
            sample(out, "vpn_dropped_total", &labels, count);
        }
    }
}

/// The `# HELP` and `# TYPE` lines of a family (help texts are constants without `\` or newline).
fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP kairos_p2p_{name} {help}");
    let _ = writeln!(out, "# TYPE kairos_p2p_{name} {kind}");
}

/// One sample line.
fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
    let _ = write!(out, "kairos_p2p_{name}");
    if !labels.is_empty() {
        out.push('{');
        for (i, (label, value)) in labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(label);
            out.push_str("=\"");
            escape_label_value(out, value);
            out.push('"');
        }
        out.push('}');
    }
    let _ = writeln!(out, " {value}");
}

/// Escapes a label value as the text format requires: `\` → `\\`, `"` → `\"`, newline → `\n`.
fn escape_label_value(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_metrics() -> Metrics {
        Metrics {
            uptime: Duration::from_millis(12_500),
            role: Some("master/ha".to_string()),
            leader: true,
            peers_connected: 3,
            peers_relayed: 1,
            members_known: 5,
            cluster_nodes_live: 4,
            second_masters: 1,
            bytes_in: 1000,
            bytes_out: 2000,
            packets_in: 10,
            packets_out: 20,
            handshakes_ok: 7,
            handshakes_failed: 2,
            drops: vec![("not_quic", 3), ("tickets_refused", 0)],
            errors: vec![("ledger_save", 2), ("tun_lost", 0)],
            lan_discovery: DiscoveryState::Active,
            dht_discovery: DiscoveryState::Searching,
            ledger_entries: 42,
            ledger_bytes: 4096,
            ledger_applied: 50,
            vpn: Some(VpnStats {
                packets_out: 11,
                bytes_out: 1100,
                packets_in: 12,
                bytes_in: 1200,
                ..VpnStats::default()
            }),
            k3s_state: Some("running"),
        }
    }

    #[test]
    fn k3s_state_is_one_of_the_names() {
        let text = render_prometheus(&sample_metrics());
        assert_well_formed(&text);
        assert!(
            text.contains("kairos_p2p_k3s_state{state=\"running\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("kairos_p2p_k3s_state{state=\"failed\"} 0\n"));
        let none = render_prometheus(&Metrics::default());
        assert!(!none.contains("k3s_state"), "no k3s, no family");
    }

    /// Every line is a comment or `name{labels} value`, and every family has HELP and TYPE
    /// before its samples.
    fn assert_well_formed(text: &str) {
        assert!(text.ends_with('\n'));
        let mut typed = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                assert!(["gauge", "counter"].contains(&kind), "{line}");
                typed.push(name.to_string());
            } else if line.starts_with("# HELP kairos_p2p_") {
            } else {
                let name_end = line.find(['{', ' ']).unwrap();
                let name = &line[..name_end];
                assert!(name.starts_with("kairos_p2p_"), "{line}");
                assert!(
                    name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'),
                    "{line}"
                );
                assert_eq!(typed.last().map(String::as_str), Some(name), "{line}");
                let value = line.rsplit(' ').next().unwrap();
                assert!(value.parse::<f64>().is_ok(), "{line}");
            }
        }
    }

    #[test]
    fn prometheus_text_is_well_formed_and_complete() {
        let text = render_prometheus(&sample_metrics());
        assert_well_formed(&text);
        for expected in [
            "kairos_p2p_uptime_seconds 12.5\n",
            "kairos_p2p_role{role=\"master/ha\"} 1\n",
            "kairos_p2p_leader 1\n",
            "kairos_p2p_peers_connected 3\n",
            "kairos_p2p_peers_relayed 1\n",
            "kairos_p2p_members_known 5\n",
            "kairos_p2p_cluster_nodes_live 4\n",
            "kairos_p2p_second_masters 1\n",
            "kairos_p2p_received_bytes_total 1000\n",
            "kairos_p2p_sent_bytes_total 2000\n",
            "kairos_p2p_received_packets_total 10\n",
            "kairos_p2p_sent_packets_total 20\n",
            "kairos_p2p_handshakes_total{result=\"ok\"} 7\n",
            "kairos_p2p_handshakes_total{result=\"failed\"} 2\n",
            "kairos_p2p_dropped_total{reason=\"not_quic\"} 3\n",
            "kairos_p2p_dropped_total{reason=\"tickets_refused\"} 0\n",
            "kairos_p2p_errors_total{kind=\"ledger_save\"} 2\n",
            "kairos_p2p_errors_total{kind=\"tun_lost\"} 0\n",
            "# TYPE kairos_p2p_errors_total counter\n",
            "kairos_p2p_discovery_state{mechanism=\"lan\",state=\"active\"} 1\n",
            "kairos_p2p_discovery_state{mechanism=\"lan\",state=\"searching\"} 0\n",
            "kairos_p2p_discovery_state{mechanism=\"dht\",state=\"searching\"} 1\n",
            "kairos_p2p_discovery_state{mechanism=\"dht\",state=\"disabled\"} 0\n",
            "kairos_p2p_ledger_entries 42\n",
            "kairos_p2p_ledger_bytes 4096\n",
            "kairos_p2p_ledger_applied_total 50\n",
            "kairos_p2p_vpn_packets_total{direction=\"out\"} 11\n",
            "kairos_p2p_vpn_packets_total{direction=\"in\"} 12\n",
            "kairos_p2p_vpn_bytes_total{direction=\"out\"} 1100\n",
            "kairos_p2p_vpn_bytes_total{direction=\"in\"} 1200\n",
            "kairos_p2p_vpn_dropped_total{direction=\"in\",reason=\"spoofed_source\"} 0\n",
            "kairos_p2p_vpn_dropped_total{direction=\"out\",reason=\"unreachable\"} 0\n",
            "# HELP kairos_p2p_handshakes_total Overlay handshakes by result.\n",
            "# TYPE kairos_p2p_handshakes_total counter\n",
            "# TYPE kairos_p2p_peers_connected gauge\n",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in\n{text}");
        }
    }

    #[test]
    fn defaults_render_without_role_or_drops() {
        let text = render_prometheus(&Metrics::default());
        assert_well_formed(&text);
        assert!(text.contains("kairos_p2p_role{role=\"none\"} 1\n"));
        assert!(text.contains("kairos_p2p_uptime_seconds 0\n"));
        assert!(text.contains("# TYPE kairos_p2p_dropped_total counter\n"));
        assert!(!text.contains("kairos_p2p_dropped_total{"));
    }

    #[test]
    fn label_values_are_escaped() {
        let metrics = Metrics {
            role: Some("a\"b\\c\nd".to_string()),
            drops: vec![("quote\"d", 1)],
            ..Metrics::default()
        };
        let text = render_prometheus(&metrics);
        assert!(
            text.contains("kairos_p2p_role{role=\"a\\\"b\\\\c\\nd\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("kairos_p2p_dropped_total{reason=\"quote\\\"d\"} 1\n"));
        // The newline inside the value did not split the line.
        assert!(
            text.lines()
                .all(|l| l.starts_with('#') || l.starts_with("kairos_p2p_"))
        );
    }
}
