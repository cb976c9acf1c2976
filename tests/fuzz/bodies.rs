//! What each fuzz target does with one input, shared by the libFuzzer targets
//! (`tests/fuzz/fuzz_targets/*.rs`, `make fuzz`) and the stable regression test
//! (`tests/fuzz_regressions.rs`, part of `cargo test`), which replays the kept inputs in
//! `tests/fuzz/seeds/` and `tests/fuzz/regressions/` through the same functions.
//!
//! Every function must return normally for every input: a panic is a bug in the code under test.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use kairos_p2p::api::trust::Access;
use kairos_p2p::api::{
    ApiState, ClusterNode, Connection, MemberStatus, Metrics, NodeInfo, PeerStatus, handle,
};
use kairos_p2p::cluster::{Cluster, ClusterSettings};
use kairos_p2p::config::{self, DEFAULT_ADDRESS, HostFacts, budget};
use kairos_p2p::discovery::beacon::Beacon;
use kairos_p2p::discovery::kad::message::Message;
use kairos_p2p::identity::Identity;
use kairos_p2p::ledger::{Clock, Ledger, Limits, SyncLimits, SyncMessage};
use kairos_p2p::node::control::Control;
use kairos_p2p::node::{Node, NodeSettings};
use kairos_p2p::overlay::relay::RelayFrame;
use kairos_p2p::token::{NEVER_ROTATE, NetworkToken};
use kairos_p2p::vpn::VpnSettings;
use kairos_p2p::vpn::packet::IpHeader;

/// What a fuzz target does with one input.
pub type Body = fn(&[u8]);

/// The fuzz targets by name, as `make fuzz` and the regression test know them.
pub const TARGETS: &[(&str, Body)] = &[
    ("token", token),
    ("config", config),
    ("wire", wire),
    ("http", http),
    ("node", node),
];

/// The network token decoder (cloud-config values, `--network-token`, `$EDGEVPNTOKEN`); the
/// input is also checked as a token's YAML body against the token's budget (see
/// [`assert_within_budget`]).
pub fn token(data: &[u8]) {
    let _ = NetworkToken::decode(&String::from_utf8_lossy(data));
    assert_within_budget(data, budget::TOKEN_BUDGET);
}

/// The cloud-config loader (YAML, templates, typed values, located errors) on two files, as
/// `--config a --config b`: the input split at its first NUL (if any). Each file is also checked
/// against the config budget (see [`assert_within_budget`]).
pub fn config(data: &[u8]) {
    let host = HostFacts {
        machine_id: "0123456789abcdef".to_string(),
        hostname: "fuzz".to_string(),
    };
    let text = String::from_utf8_lossy(data);
    let (a, b) = text.split_once('\0').unwrap_or((&text, ""));
    let _ = config::parse(&[(Path::new("a.yaml"), a), (Path::new("b.yaml"), b)], &host);
    for file in [a, b] {
        assert_within_budget(file.as_bytes(), budget::CONFIG_BUDGET);
    }
}

/// The YAML budget's promise: whatever the pre-scan accepts, serde_yaml loads into a value no
/// larger than the budget (nodes and scalar bytes with aliases expanded, nesting depth), so the
/// time and memory of every load are bounded by the budget, whatever the input.
fn assert_within_budget(data: &[u8], budget: budget::Budget) {
    if budget::check(data, budget).is_err() {
        return;
    }
    let Ok(value) = serde_yaml::from_slice::<serde_yaml::Value>(data) else {
        return;
    };
    let size = yaml_size(&value, 1);
    assert!(
        size.nodes <= budget.max_nodes
            && size.scalar_bytes <= budget.max_scalar_bytes
            && size.depth <= budget.max_depth,
        "accepted by the budget {budget:?}, loaded as {size:?}"
    );
}

/// Nodes, string bytes and collection depth of a loaded YAML value.
#[derive(Debug, Default)]
struct YamlSize {
    nodes: u64,
    scalar_bytes: u64,
    depth: usize,
}

fn yaml_size(value: &serde_yaml::Value, level: usize) -> YamlSize {
    use serde_yaml::Value;
    let mut size = YamlSize {
        nodes: 1,
        ..YamlSize::default()
    };
    let mut add = |child: YamlSize| {
        size.nodes += child.nodes;
        size.scalar_bytes += child.scalar_bytes;
        size.depth = size.depth.max(child.depth);
    };
    match value {
        Value::String(s) => size.scalar_bytes = s.len() as u64,
        Value::Sequence(items) => {
            items.iter().for_each(|v| add(yaml_size(v, level + 1)));
            size.depth = size.depth.max(level);
        }
        Value::Mapping(map) => {
            for (k, v) in map {
                add(yaml_size(k, level + 1));
                add(yaml_size(v, level + 1));
            }
            size.depth = size.depth.max(level);
        }
        // A tag is part of its node's event, not a node of its own.
        Value::Tagged(tagged) => return yaml_size(&tagged.value, level),
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
    size
}

/// Every wire decoder: control frames, relay frames, DHT messages, ledger sync messages, sealed
/// beacons and VPN packet headers; the first byte picks the decoder.
pub fn wire(data: &[u8]) {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    match which % 6 {
        0 => drop(Control::decode(rest)),
        1 => drop(RelayFrame::decode(rest)),
        2 => drop(Message::decode(rest)),
        3 => {
            let limits = SyncLimits::for_ledger(&Limits::for_max_message_size(1 << 20), 1 << 20);
            drop(SyncMessage::decode(rest, &limits));
        }
        4 => {
            let token = NetworkToken::generate_with(NEVER_ROTATE, &mut |b| b.fill(7));
            drop(Beacon::open(&token.key_schedule(), 1_700_000_000, rest));
        }
        _ => drop(IpHeader::parse(rest)),
    }
}

/// The local API: arbitrary bytes in arbitrary pieces through the HTTP/1.1 connection, every
/// request it yields answered by the router against a small ledger, and the ledger writes the
/// router asks for applied (arbitrary buckets, keys and values reach the ledger's checks). The
/// first byte sets the piece size, as reads of a socket would cut the stream.
pub fn http(data: &[u8]) {
    let Some((&size, rest)) = data.split_first() else {
        return;
    };
    let now = Instant::now();
    // The size byte's high bit picks the trust level: both paths are fuzzed.
    let access = if size & 0x80 == 0 {
        Access::Full
    } else {
        Access::Inspect
    };
    let mut state = FuzzApi::new();
    let mut conn = Connection::new(now);
    let serve = |conn: &mut Connection, state: &mut FuzzApi| {
        while let Some(request) = conn.poll_request() {
            let outcome = handle(&request, state, access);
            state.apply(&outcome.writes);
            conn.respond(outcome.response);
            let pending = conn.pending_output().len();
            conn.consume_output(pending);
        }
    };
    for piece in rest.chunks(usize::from(size).max(1)) {
        conn.feed(now, piece);
        serve(&mut conn, &mut state);
    }
    conn.handle_eof();
    serve(&mut conn, &mut state);
}

/// The node core fed arbitrary datagrams on its sockets (QUIC, beacons, DHT), with the cluster
/// layer and the VPN attached, and its outputs drained. Datagrams are the input cut at each
/// 0xFF byte (so one input holds several).
pub fn node(data: &[u8]) {
    let token = NetworkToken::generate_with(NEVER_ROTATE, &mut |b| b.fill(3));
    let identity = Identity::from_seed([5; 32]);
    let Ok(mut node) = Node::new(&identity, &token, NodeSettings::for_token(&token), 1) else {
        return;
    };
    let settings = ClusterSettings::defaults("fuzz");
    let ledger = Ledger::new(settings.ledger_limits);
    node.attach_cluster(Cluster::new(&identity, settings, ledger, 2));
    node.attach_vpn(VpnSettings {
        local: DEFAULT_ADDRESS,
        mtu: 1200,
    });
    let start = Instant::now();
    let unix = 1_700_000_000_000;
    node.handle_timeout(start, unix);
    let from = SocketAddr::from(([192, 0, 2, 7], 7120));
    let mut out = Vec::new();
    for (i, datagram) in data.split(|&b| b == 0xff).enumerate() {
        let now = start + Duration::from_millis(i as u64);
        node.handle_datagram(now, unix + i as u64, from, None, datagram);
        while node.poll_transmit(now, &mut out).is_some() {}
        while node.poll_event().is_some() {}
        while node.poll_vpn_packet().is_some() {}
    }
    node.handle_timeout(start + Duration::from_secs(1), unix + 1000);
}

/// The API's view of a node for the `http` target: one identity, an empty peer list and a
/// ledger that takes the router's writes.
struct FuzzApi {
    identity: Identity,
    clock: Clock,
    ledger: Ledger,
}

const FUZZ_UNIX_MS: u64 = 1_760_000_000_000;

impl FuzzApi {
    fn new() -> Self {
        let identity = Identity::from_seed([9; 32]);
        let mut api = FuzzApi {
            identity,
            clock: Clock::new(),
            ledger: Ledger::new(Limits::for_max_message_size(1 << 20)),
        };
        api.apply(&[kairos_p2p::cluster::Write::put(
            "machines",
            "fuzz",
            "{\"Address\":\"10.1.0.1\"}",
        )]);
        api
    }

    fn apply(&mut self, writes: &[kairos_p2p::cluster::Write]) {
        for w in writes {
            // Refusals (sizes, names) are answers, not failures.
            let _ = match &w.value {
                Some(value) => self.ledger.put(
                    &self.identity,
                    &mut self.clock,
                    &w.bucket,
                    &w.key,
                    value,
                    FUZZ_UNIX_MS,
                ),
                None => self.ledger.delete(
                    &self.identity,
                    &mut self.clock,
                    &w.bucket,
                    &w.key,
                    FUZZ_UNIX_MS,
                ),
            };
        }
    }
}

impl ApiState for FuzzApi {
    fn node_info(&self) -> NodeInfo {
        NodeInfo {
            peer_id: self.identity.peer_id(),
            uuid: "fuzz".to_string(),
            hostname: "fuzz".to_string(),
            role: Some("master".to_string()),
            vpn_address: Some(DEFAULT_ADDRESS.addr),
            network_id: String::new(),
            version: "0",
            uptime: Duration::from_secs(1),
            k3s: None,
            second_masters: Vec::new(),
        }
    }
    fn peers(&self) -> Vec<PeerStatus> {
        Vec::new()
    }
    fn members(&self) -> Vec<MemberStatus> {
        Vec::new()
    }
    fn cluster_nodes(&self) -> Vec<ClusterNode> {
        Vec::new()
    }
    fn ledger(&self) -> &Ledger {
        &self.ledger
    }
    fn metrics(&self) -> Metrics {
        Metrics::default()
    }
    fn unix_ms(&self) -> u64 {
        0
    }
}
