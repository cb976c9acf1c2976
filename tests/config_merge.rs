//! Merging several files, the legacy token, the `p2p.ha` alias, templates, directory sources,
//! warnings, and robustness against arbitrary input.

mod common;

use std::path::{Path, PathBuf};

use base64::Engine;
use common::TempDir;
use kairos_p2p::config::{self, Config, HostFacts, Role};

fn token(room: &str) -> String {
    let yaml = format!(
        "otp:\n  dht:\n    interval: 9000\n    key: Zk3qP7sX2mV9bT4wL8cN1rH6yD5gJ0aE\n    length: 32\n  crypto:\n    interval: 9000\n    key: Qw8eR7tY6uI5oP4aS3dF2gH1jK0lZxCv\n    length: 32\nroom: {room}\nrendezvous: Hy7uJ6iK5oL4pM3nB2vC1xZ0aS9dF8gT\nmdns: Mq2wE3rT4yU5iO6pA7sD8fG9hJ0kL1zX\nmax_message_size: 20971520\n"
    );
    base64::engine::general_purpose::STANDARD.encode(yaml)
}

fn host() -> HostFacts {
    HostFacts {
        machine_id: "f0e1d2c3b4a5968778695a4b3c2d1e0f".to_owned(),
        hostname: "Node-1".to_owned(),
    }
}

fn parse(files: &[(&str, &str)]) -> Config {
    let files: Vec<(&Path, &str)> = files.iter().map(|(n, t)| (Path::new(*n), *t)).collect();
    config::parse(&files, &host()).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn a_later_file_overrides_one_nested_key_only() {
    let c = parse(&[
        (
            "90_custom.yaml",
            "#cloud-config\np2p:\n  network_id: prod\n  auto:\n    ha:\n      master_nodes: 2\n      external_db: db\n  vpn:\n    env:\n      EDGEVPNMTU: 1300\n      IFACE: vpn0\nk3s:\n  args: [--a, --b]\n  env: {A: '1', B: '2'}\n",
        ),
        (
            "99_override.yaml",
            "#cloud-config\np2p:\n  auto:\n    ha:\n      master_nodes: 4\n  vpn:\n    env:\n      EDGEVPNMTU: 1400\nk3s:\n  args: [--c]\n  env: {B: '3'}\n",
        ),
    ]);
    assert_eq!(c.p2p.network_id, "prod");
    assert_eq!(c.p2p.auto.ha.master_nodes, 4);
    assert_eq!(c.p2p.auto.ha.external_db.as_deref(), Some("db"));
    assert!(c.p2p.auto.ha.enable);
    assert_eq!(c.p2p.vpn.settings.mtu, 1400);
    assert_eq!(c.p2p.vpn.settings.iface, "vpn0");
    // Lists replace, maps merge entry by entry.
    assert_eq!(c.k3s.args, ["--c"]);
    assert_eq!(
        c.k3s
            .env
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>(),
        ["A=1", "B=3"]
    );
    assert_eq!(
        c.sources,
        [
            PathBuf::from("90_custom.yaml"),
            PathBuf::from("99_override.yaml")
        ]
    );
}

#[test]
fn null_leaves_a_value_and_empty_string_resets_it() {
    let c = parse(&[
        (
            "a.yaml",
            "p2p:\n  network_id: prod\n  role: master\n  loglevel: debug\n",
        ),
        (
            "b.yaml",
            "p2p:\n  network_id: \"\"\n  role:\n  loglevel: \"\"\n",
        ),
    ]);
    assert_eq!(c.p2p.network_id, "kairos");
    assert_eq!(c.p2p.role, Role::Master);
    assert_eq!(c.p2p.loglevel, config::LogLevel::Info);
}

#[test]
fn legacy_kairos_token() {
    let (a, b) = (token("room-a"), token("room-b"));
    let c = parse(&[("a.yaml", &format!("kairos:\n  network_token: {a}\n"))]);
    assert!(c.p2p.is_enabled());
    assert_eq!(c.warnings.len(), 1);

    // p2p.network_token wins, from any file.
    let c = parse(&[
        ("a.yaml", &format!("p2p:\n  network_token: {a}\n")),
        ("b.yaml", &format!("kairos:\n  network_token: {b}\n")),
    ]);
    assert!(c.p2p.is_enabled());
    assert_eq!(
        c.warnings,
        ["b.yaml:2: kairos.network_token: ignored: p2p.network_token is set"]
    );

    // An empty p2p.network_token counts as unset.
    let c = parse(&[(
        "a.yaml",
        &format!("p2p:\n  network_token: \"\"\nkairos:\n  network_token: {b}\n"),
    )]);
    assert!(c.p2p.is_enabled());

    // A later empty token turns p2p off.
    let c = parse(&[
        ("a.yaml", &format!("p2p:\n  network_token: {a}\n")),
        ("b.yaml", "p2p:\n  network_token: \"\"\n"),
    ]);
    assert!(!c.p2p.is_enabled());
}

#[test]
fn ha_alias_and_auto_ha() {
    // In one file p2p.auto.ha wins key by key; the alias fills the rest.
    let c = parse(&[(
        "a.yaml",
        "p2p:\n  ha:\n    master_nodes: 5\n    external_db: alias-db\n    enable: false\n  auto:\n    ha:\n      master_nodes: 1\n",
    )]);
    assert_eq!(c.p2p.auto.ha.master_nodes, 1);
    assert_eq!(c.p2p.auto.ha.external_db.as_deref(), Some("alias-db"));
    assert!(!c.p2p.auto.ha.enable);

    // Across files, the later file wins whichever spelling it uses.
    let c = parse(&[
        ("a.yaml", "p2p:\n  auto:\n    ha:\n      master_nodes: 1\n"),
        ("b.yaml", "p2p:\n  ha:\n    master_nodes: 3\n"),
    ]);
    assert_eq!(c.p2p.auto.ha.master_nodes, 3);
    assert!(c.p2p.auto.ha.enable);

    // master_nodes: 0 does not turn HA on; enable does.
    let c = parse(&[("a.yaml", "p2p:\n  ha:\n    master_nodes: 0\n")]);
    assert!(!c.p2p.auto.ha.enable);
    let c = parse(&[("a.yaml", "p2p:\n  auto:\n    ha:\n      enable: yes\n")]);
    assert!(c.p2p.auto.ha.enable);
    assert_eq!(c.p2p.auto.ha.master_nodes, 0);
}

#[test]
fn templates_use_the_host_facts() {
    let c = parse(&[(
        "a.yaml",
        "hostname: \"kubevip-{{ trunc 4 .MachineID }}\"\np2p:\n  network_id: \"c-{{ trunc 4 .MachineID }}\"\n  vpn:\n    env:\n      IFACE: \"{{ lower .Hostname }}\"\nkubevip:\n  eip: 10.0.0.1\n  version: \"{{.Hostname | upper}}\"\nk3s:\n  args:\n  - \"--node-name={{ .Hostname }}\"\n  - \"--x={{- trunc -4 .MachineID -}}\"\n",
    )]);
    assert_eq!(c.p2p.network_id, "c-f0e1");
    assert_eq!(c.p2p.vpn.settings.iface, "node-1");
    assert_eq!(c.kubevip.version.as_deref(), Some("NODE-1"));
    assert_eq!(c.k3s.args, ["--node-name=Node-1", "--x=1e0f"]);
}

#[test]
fn vpn_settings_rules() {
    // DHCP defaults to on, unless ADDRESS is given.
    let c = parse(&[(
        "a.yaml",
        "p2p:\n  vpn:\n    env:\n      ADDRESS: 10.5.0.9/24\n",
    )]);
    let s = &c.p2p.vpn.settings;
    assert!(s.address_explicit && !s.dhcp && s.is_static());
    let c = parse(&[(
        "a.yaml",
        "p2p:\n  vpn:\n    env:\n      ADDRESS: 10.5.0.9/24\n      DHCP: true\n",
    )]);
    assert!(c.p2p.vpn.settings.dhcp && !c.p2p.vpn.settings.is_static());
    // disable_dht wins over EDGEVPNDHT; numbers and booleans are accepted as strings.
    let c = parse(&[(
        "a.yaml",
        "p2p:\n  disable_dht: true\n  vpn:\n    env:\n      EDGEVPNDHT: true\n      EDGEVPNMDNS: 0\n      EDGEVPNMTU: 9000\n",
    )]);
    let s = &c.p2p.vpn.settings;
    assert!(!s.dht && !s.mdns);
    assert_eq!(s.mtu, 9000);
    // use matters only if create.
    let c = parse(&[("a.yaml", "p2p:\n  vpn:\n    create: false\n")]);
    assert!(!c.p2p.vpn.use_vpn);
    // minimum_nodes 0 means 2; other values are kept.
    let c = parse(&[("a.yaml", "p2p:\n  minimum_nodes: 0\n")]);
    assert_eq!(c.p2p.minimum_nodes, 2);
    let c = parse(&[("a.yaml", "p2p:\n  minimum_nodes: 1\n")]);
    assert_eq!(c.p2p.minimum_nodes, 1);
}

#[test]
fn warnings() {
    let c = parse(&[(
        "w.yaml",
        "#cloud-config\nk3s_agent: {}\nk0s: {}\nkairos:\n  role: master\n  netwrok_token: x\np2p:\n  vpn:\n    create: false\n    use: true\n    env:\n      DHCP: \"off\"\n      EDGEVPNMUT: 1300\n",
    )]);
    assert_eq!(
        c.warnings,
        [
            "w.yaml:2: k3s_agent: not read by kairos-p2p; did you mean k3s-agent?",
            "w.yaml:5: kairos.role: not read by kairos-p2p; use p2p.role",
            "w.yaml:6: kairos.netwrok_token: unknown key, did you mean network_token?",
            "w.yaml:13: p2p.vpn.env.EDGEVPNMUT: not used by kairos-p2p, ignored; did you mean EDGEVPNMTU?",
            "w.yaml:10: p2p.vpn.use: has no effect: p2p.vpn.create is false",
            "w.yaml:12: p2p.vpn.env.DHCP: DHCP is off and ADDRESS is not set: every node would use 10.1.0.1/24",
        ]
    );
}

#[test]
fn directory_sources() {
    let oem = TempDir::new("oem");
    let local = TempDir::new("local");
    let b = oem.write(
        "90_b.yaml",
        "#cloud-config\np2p:\n  network_id: from-b\n  dns: true\n",
    );
    let a = oem.write(
        "10_a.yml",
        "#cloud-config   \r\np2p:\n  network_id: from-a\n",
    );
    oem.write("20_no_header.yaml", "p2p:\n  network_id: ignored\n");
    oem.write(
        "30_text.txt",
        "#cloud-config\np2p:\n  network_id: ignored\n",
    );
    oem.write(
        "40_late_header.yaml",
        "\n#cloud-config\np2p: {network_id: ignored}\n",
    );
    oem.write(
        "sub/50_nested.yaml",
        "#cloud-config\np2p: {network_id: ignored}\n",
    );
    oem.write("60_dir.yaml/x.yaml", "#cloud-config\n");
    let legacy = oem.write("70_legacy.yaml", "#node-config\nk3s: {enabled: true}\n");
    let c = local.write("00_c.yaml", "#cloud-config\np2p:\n  network_id: from-c\n");
    let missing = local.0.join("does-not-exist");

    let sources = config::sources_in(&[&oem.0, &missing, &local.0]);
    assert_eq!(sources, [a, legacy, b, c]);

    let config = config::load(&sources, &host()).unwrap();
    assert_eq!(config.p2p.network_id, "from-c");
    assert!(config.p2p.dns);
    assert!(config.k3s.enabled);
    assert_eq!(config.sources, sources);
    assert!(config.render_effective().contains("00_c.yaml\""));

    // Named explicitly, a file without header is read.
    let no_header = oem.0.join("20_no_header.yaml");
    let config = config::load(&[no_header], &host()).unwrap();
    assert_eq!(config.p2p.network_id, "ignored");
}

#[test]
fn default_sources_use_the_kairos_directories() {
    assert_eq!(config::DEFAULT_DIRS, ["/oem", "/usr/local/cloud-config"]);
    // Whatever this machine has there, only YAML files are listed.
    for path in config::default_sources() {
        assert!(path.extension().is_some_and(|e| e == "yaml" || e == "yml"));
    }
}

/// A small deterministic PRNG (xorshift64*), so failures replay.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[test]
fn arbitrary_input_never_panics() {
    let seeds: [&str; 4] = [
        include_str!("data/config/docs-kubevip-full.yaml"),
        include_str!("data/config/static-address.yaml"),
        include_str!("data/config/docs-ha-alias.yaml"),
        "p2p: {vpn: {env: {ADDRESS: \"{{ trunc 4 .MachineID }}\"}}, ha: [1, {a: *x}]}\nk3s: &x {args: ['{{', \"}}\"]}\n",
    ];
    let alphabet: &[&str] = &[
        " ",
        "  ",
        "\n",
        "- ",
        ":",
        ": ",
        "{",
        "}",
        "[",
        "]",
        "\"",
        "'",
        "#",
        "&a ",
        "*a",
        "!t ",
        "|",
        ">",
        "{{",
        "}}",
        "{{ trunc -2 .MachineID }}",
        "p2p",
        "vpn",
        "env",
        "ha",
        "auto",
        "k3s",
        "kubevip",
        "eip",
        "<<",
        "~",
        "-1",
        "99999999999999999999",
        "é",
        "\u{0}",
        "\t",
        "\r",
        "?",
        ",",
        "%",
        "@",
        "`",
        "\u{feff}",
    ];
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for round in 0..3000 {
        let mut text: String = seeds[round % seeds.len()].to_owned();
        for _ in 0..1 + rng.below(6) {
            let mut at = rng.below(text.len() + 1);
            while !text.is_char_boundary(at) {
                at -= 1;
            }
            match rng.below(3) {
                0 => text.insert_str(at, alphabet[rng.below(alphabet.len())]),
                1 => {
                    let mut end = (at + 1 + rng.below(8)).min(text.len());
                    while !text.is_char_boundary(end) {
                        end -= 1;
                    }
                    text.replace_range(at..end, "");
                }
                _ => {
                    let mut end = (at + rng.below(40)).min(text.len());
                    while !text.is_char_boundary(end) {
                        end -= 1;
                    }
                    let copy = text[at..end].to_owned();
                    text.insert_str(at, &copy);
                }
            }
        }
        let result = config::parse(&[(Path::new("fuzz.yaml"), &text)], &host());
        if let Err(errors) = result {
            assert!(!errors.0.is_empty());
            for e in &errors.0 {
                let line = e.to_string();
                assert!(line.starts_with("fuzz.yaml"), "{line}");
            }
        }
    }
    // Random bytes (as lossy text) too.
    for _ in 0..500 {
        let len = rng.below(300);
        let bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        let text = String::from_utf8_lossy(&bytes);
        let _ = config::parse(&[(Path::new("junk.yaml"), &text)], &host());
    }
}
