//! The configuration examples of the Kairos P2P documentation (and a few more realistic ones)
//! load, with the expected effective values; and the effective configuration renders them.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use kairos_p2p::config::{self, Config, HostFacts, LogLevel, Role};
use kairos_p2p::token::{NEVER_ROTATE, NetworkToken};

/// A freshly generated network token, as `kairos-p2p generate-token` would print it.
fn token() -> String {
    static TOKEN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TOKEN
        .get_or_init(|| NetworkToken::generate(NEVER_ROTATE).unwrap().encode())
        .clone()
}

fn host() -> HostFacts {
    HostFacts {
        machine_id: "f0e1d2c3b4a5968778695a4b3c2d1e0f".to_owned(),
        hostname: "Node-1".to_owned(),
    }
}

fn fixture(name: &str) -> (PathBuf, String) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/config")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap();
    (path, text.replace("YOUR_TOKEN_GOES_HERE", &token()))
}

fn load_fixture(name: &str) -> Config {
    let (path, text) = fixture(name);
    config::parse(&[(&path, &text)], &host()).unwrap_or_else(|e| panic!("{name}:\n{e}"))
}

/// The effective values a row asserts.
#[derive(Debug, PartialEq)]
struct Expected {
    p2p: bool,
    role: Role,
    network_id: &'static str,
    minimum_nodes: u32,
    auto: bool,
    ha_enable: bool,
    master_nodes: u32,
    external_db: Option<&'static str>,
    vpn_create: bool,
    vpn_use: bool,
    dht: bool,
    kubevip_enable: bool,
    eip: Option<&'static str>,
    interface: Option<&'static str>,
    manifest_url: Option<&'static str>,
    warnings: usize,
}

fn actual(c: &Config) -> Expected {
    Expected {
        p2p: c.p2p.is_enabled(),
        role: c.p2p.role,
        network_id: leak(&c.p2p.network_id),
        minimum_nodes: c.p2p.minimum_nodes,
        auto: c.p2p.auto.enable,
        ha_enable: c.p2p.auto.ha.enable,
        master_nodes: c.p2p.auto.ha.master_nodes,
        external_db: c.p2p.auto.ha.external_db.as_deref().map(leak),
        vpn_create: c.p2p.vpn.create,
        vpn_use: c.p2p.vpn.use_vpn,
        dht: c.p2p.vpn.settings.dht,
        kubevip_enable: c.kubevip.enable,
        eip: c.kubevip.eip.map(|ip| leak(&ip.to_string())),
        interface: c.kubevip.interface.as_deref().map(leak),
        manifest_url: c.kubevip.manifest_url.as_deref().map(leak),
        warnings: c.warnings.len(),
    }
}

fn leak(s: &str) -> &'static str {
    Box::leak(s.to_owned().into_boxed_str())
}

const DEFAULTS: Expected = Expected {
    p2p: true,
    role: Role::Auto,
    network_id: "kairos",
    minimum_nodes: 2,
    auto: true,
    ha_enable: false,
    master_nodes: 0,
    external_db: None,
    vpn_create: true,
    vpn_use: true,
    dht: true,
    kubevip_enable: false,
    eip: None,
    interface: None,
    manifest_url: None,
    warnings: 0,
};

#[test]
fn documentation_examples() {
    let rows = [
        // P2P "KubeVIP" page, minimal: hostname (a template) and users are the OS's business.
        ("docs-kubevip-minimal.yaml", DEFAULTS),
        // P2P "KubeVIP" page, every option: install/hostname ignored, HA with external DB.
        (
            "docs-kubevip-full.yaml",
            Expected {
                ha_enable: true,
                master_nodes: 2,
                external_db: Some("external-db-string"),
                vpn_create: false,
                vpn_use: false,
                dht: false,
                kubevip_enable: true,
                eip: Some("192.168.1.110"),
                interface: Some("ens18"),
                ..DEFAULTS
            },
        ),
        // P2P "HA" page: `ha` directly under p2p; HA on because master_nodes > 0 (a note:
        // Kairos reads only p2p.auto.ha).
        (
            "docs-ha-alias.yaml",
            Expected {
                ha_enable: true,
                master_nodes: 2,
                warnings: 1,
                vpn_create: false,
                vpn_use: false,
                kubevip_enable: true,
                eip: Some("192.168.1.110"),
                ..DEFAULTS
            },
        ),
        // Older releases: kairos.network_token (a deprecation warning).
        (
            "legacy-kairos-block.yaml",
            Expected {
                warnings: 1,
                ..DEFAULTS
            },
        ),
        // Static address, custom network id (template), role, unused env var (a warning).
        (
            "static-address.yaml",
            Expected {
                role: Role::Master,
                network_id: "edge-1e0f",
                minimum_nodes: 3,
                warnings: 1,
                ..DEFAULTS
            },
        ),
    ];
    for (name, expected) in rows {
        let c = load_fixture(name);
        assert_eq!(actual(&c), expected, "{name}: {:#?}", c.warnings);
        assert_eq!(c.sources.len(), 1);
    }
}

#[test]
fn documentation_example_details() {
    let c = load_fixture("docs-kubevip-full.yaml");
    assert_eq!(
        c.kubevip.eip,
        Some("192.168.1.110".parse::<IpAddr>().unwrap())
    );
    assert_eq!(c.kubevip.image, "ghcr.io/kube-vip/kube-vip");
    assert!(!c.kubevip.static_pod);
    assert!(c.p2p.disable_dht);
    assert_eq!(c.p2p.loglevel, LogLevel::Info);

    let c = load_fixture("static-address.yaml");
    let s = &c.p2p.vpn.settings;
    assert!(s.is_static());
    assert_eq!(s.address.to_string(), "10.2.0.30/24");
    assert_eq!(s.mtu, 1400);
    let peers: Vec<String> = s.bootstrap_peers.iter().map(ToString::to_string).collect();
    assert_eq!(peers, ["192.0.2.1:4001", "seed.example:4001"]);
    assert_eq!(
        s.extra.get("EDGEVPNLOWLEVEL").map(String::as_str),
        Some("true")
    );
    assert_eq!(c.p2p.loglevel, LogLevel::Debug);
    assert_eq!(c.k3s_agent.env["K3S_NODE_NAME"], "Node-1");
    assert!(c.warnings[0].ends_with(
        "static-address.yaml:15: p2p.vpn.env.EDGEVPNLOWLEVEL: not used by kairos-p2p, ignored"
    ));

    let c = load_fixture("legacy-kairos-block.yaml");
    assert_eq!(c.k3s.args, ["--node-label=zone=node-1"]);
    assert!(c.warnings[0].ends_with(
        "legacy-kairos-block.yaml:4: kairos.network_token: the kairos block is deprecated, move the token to p2p.network_token"
    ));
}

#[test]
fn effective_output_resolves_defaults_and_redacts_the_token() {
    let c = load_fixture("docs-kubevip-full.yaml");
    assert_eq!(
        c.p2p.network_token,
        Some(NetworkToken::decode(&token()).unwrap())
    );
    assert!(!format!("{c:?}").contains(&c.p2p.network_token.as_ref().unwrap().room));
    let out = c.render_effective();
    assert!(!out.contains(&token()));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "#cloud-config");
    assert!(lines[2].starts_with("# Sources, later override earlier: \""));
    assert!(lines[2].ends_with("docs-kubevip-full.yaml\""));
    for expected in [
        "  network_token: \"<redacted>\"",
        "  role: \"auto\"",
        "  minimum_nodes: 2",
        "    use: false",
        "      EDGEVPNDHT: \"false\"",
        "      enable: true",
        "      master_nodes: 2",
        "      external_db: \"external-db-string\"",
        "  eip: \"192.168.1.110\"",
        "  interface: \"ens18\"",
        "  manifest_url: \"\"",
    ] {
        assert!(lines.contains(&expected), "missing {expected:?} in\n{out}");
    }
}

#[test]
fn effective_output_of_an_empty_configuration() {
    let c = config::parse(&[], &host()).unwrap();
    assert_eq!(
        c.render_effective(),
        r#"#cloud-config
# Effective kairos-p2p configuration: every key with its resolved value, secrets redacted.
# Sources: none (all defaults).
p2p:
  network_token: ""  # not set: p2p is off
  network_id: "kairos"
  role: "auto"
  disable_dht: false
  bootstrap_peers: []
  minimum_nodes: 2
  dynamic_roles: false
  liveness_timeout: 60
  dns: false
  loglevel: "info"
  vpn:
    create: true
    use: true
    env:
      ADDRESS: "10.1.0.1/24"  # default, not set explicitly
      IFACE: "edgevpn0"
      DHCP: "true"
      EDGEVPNMTU: "1200"
      EDGEVPNDHT: "true"
      EDGEVPNMDNS: "true"
      EDGEVPNBOOTSTRAPPEERS: ""
      APILISTEN: "127.0.0.1:8080"
      DNSADDRESS: ""  # no DNS service
      DNSFORWARD: "true"
      DNSFORWARDSERVER: "8.8.8.8:53,1.1.1.1:53"
      DNSCACHESIZE: "200"
  auto:
    enable: true
    merge_window: 600
    ha:
      enable: false
      master_nodes: 0
      external_db: ""
kubevip:
  enable: false
  eip: ""
  interface: ""
  manifest_url: ""
  static_pod: false
  version: ""
  image: "ghcr.io/kube-vip/kube-vip"
k3s:
  enabled: false
  args: []
  env: {}
  replace_args: false
  replace_env: false
  embedded_registry: false
k3s-agent:
  enabled: false
  args: []
  env: {}
  replace_args: false
  replace_env: false
  embedded_registry: false
"#
    );
}

#[test]
fn effective_output_reads_back_as_the_same_configuration() {
    let text = r##"#cloud-config
p2p:
  network_id: 'id-"quoted"#x\n'
  role: worker
  dns: true
  loglevel: warning
  ha:
    master_nodes: 1
    external_db: "postgres://db:5432/k3s"
  vpn:
    use: false
    env:
      ADDRESS: 10.9.0.7/16
      IFACE: vpn0
      EDGEVPNMDNS: "no"
      EDGEVPNBOOTSTRAPPEERS: "a b,c"
      APILISTEN: "[::1]:9999"
      "weird: name": "line\nbreak"
kubevip:
  eip: "fd00::10"
  interface: eth0
  static_pod: true
  version: v0.8.0
  image: example.org/kube-vip
  manifest_url: https://example.org/m.yaml
k3s:
  enabled: true
  args: ["--disable=traefik", "with \"quotes\""]
  env: {A_B: "x: y # z"}
  replace_env: true
k3s-agent:
  replace_args: true
  embedded_registry: true
"##;
    let first = config::parse(&[(Path::new("in.yaml"), text)], &host()).unwrap();
    let rendered = first.render_effective();
    let second = config::parse(&[(Path::new("effective.yaml"), &rendered)], &host())
        .unwrap_or_else(|e| panic!("{e}\n{rendered}"));
    assert_eq!(second.p2p, first.p2p);
    assert_eq!(second.kubevip, first.kubevip);
    assert_eq!(second.k3s, first.k3s);
    assert_eq!(second.k3s_agent, first.k3s_agent);
    assert_eq!(
        second
            .render_effective()
            .lines()
            .skip(3)
            .collect::<Vec<_>>(),
        rendered.lines().skip(3).collect::<Vec<_>>()
    );
}
