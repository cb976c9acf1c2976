//! Malformed configurations: one row each, the message names the file, the line where it can be
//! located, and the key path. Nothing panics; every problem of a file is listed.

mod common;

use std::path::{Path, PathBuf};

use base64::Engine;
use common::TempDir;
use kairos_p2p::config::{self, ConfigErrors, HostFacts};

fn host() -> HostFacts {
    HostFacts {
        machine_id: "f0e1d2c3b4a5968778695a4b3c2d1e0f".to_owned(),
        hostname: "node1".to_owned(),
    }
}

fn b64(s: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

fn errors(files: &[(&str, &str)]) -> Vec<String> {
    let files: Vec<(&Path, &str)> = files.iter().map(|(n, t)| (Path::new(*n), *t)).collect();
    match config::parse(&files, &host()) {
        Ok(_) => Vec::new(),
        Err(ConfigErrors(errors)) => errors.iter().map(|e| e.to_string()).collect(),
    }
}

/// Each expected message is exact, or a prefix when it ends with `*`.
fn check(name: &str, got: &[String], expected: &[&str]) {
    let ok = got.len() == expected.len()
        && got
            .iter()
            .zip(expected)
            .all(|(g, e)| match e.strip_suffix('*') {
                Some(prefix) => g.starts_with(prefix),
                None => g == e,
            });
    assert!(ok, "{name}:\n got: {got:#?}\nwant: {expected:#?}");
}

#[test]
fn malformed_single_files() {
    let not_yaml_token = b64(b"\x00\x01 ]]] not: [yaml");
    let token_rows = [
        "p2p:\n  network_token: not*base64!\n".to_owned(),
        format!("p2p:\n  dns: true\n  network_token: \"{not_yaml_token}\"\n"),
    ];
    let rows: &[(&str, &str, &[&str])] = &[
        (
            "bad YAML",
            "#cloud-config\np2p:\n  role: [master\n",
            &["x.yaml: not valid YAML: did not find expected ',' or ']' at line 4 column 1*"],
        ),
        (
            "duplicate key",
            "p2p:\n  role: master\n  role: worker\n",
            &["x.yaml: not valid YAML: p2p: duplicate entry with key \"role\" at line 2 column 3"],
        ),
        (
            "two documents",
            "p2p: {}\n---\np2p: {}\n",
            &[
                "x.yaml: not valid YAML: deserializing from YAML containing more than one document is not supported",
            ],
        ),
        (
            "not a mapping",
            "#cloud-config\n- p2p\n",
            &["x.yaml: expected a mapping of blocks, found a list"],
        ),
        (
            "bool as string",
            "#cloud-config\np2p:\n  vpn:\n    create: \"maybe\"\n",
            &["x.yaml:4: p2p.vpn.create: expected a boolean, found string \"maybe\""],
        ),
        (
            "int as string",
            "p2p:\n  minimum_nodes: \"3\"\n",
            &["x.yaml:2: p2p.minimum_nodes: expected an integer, found string \"3\""],
        ),
        (
            "negative int",
            "p2p:\n  auto:\n    ha:\n      master_nodes: -1\n",
            &["x.yaml:4: p2p.auto.ha.master_nodes: must not be negative, found -1"],
        ),
        (
            "list where map expected",
            "p2p:\n  auto: [enable]\n",
            &["x.yaml:2: p2p.auto: expected a mapping, found a list"],
        ),
        (
            "map where string expected",
            "p2p:\n  role:\n    name: master\n",
            &["x.yaml:2: p2p.role: expected a string, found a mapping"],
        ),
        (
            "block of the wrong type",
            "kubevip: true\n",
            &["x.yaml:1: kubevip: expected a mapping, found boolean true"],
        ),
        (
            "non-string key",
            "p2p:\n  1: x\n",
            &["x.yaml:1: p2p: keys must be strings, found integer 1"],
        ),
        (
            "unknown key close to master_nodes",
            "#cloud-config\np2p:\n  auto:\n    ha:\n      master_node: 2\n",
            &["x.yaml:5: p2p.auto.ha.master_node: unknown key, did you mean master_nodes?"],
        ),
        (
            "unknown key close to network_id",
            "p2p:\n  netwrok_id: foo\n",
            &["x.yaml:2: p2p.netwrok_id: unknown key, did you mean network_id?"],
        ),
        (
            "unknown key far from anything",
            "kubevip:\n  banana: 1\n",
            &[
                "x.yaml:2: kubevip.banana: unknown key (known keys: eip, enable, interface, manifest_url, static_pod, version, image)",
            ],
        ),
        (
            "unknown key in the p2p.ha alias",
            "p2p:\n  ha:\n    enabled: true\n",
            &["x.yaml:3: p2p.ha.enabled: unknown key, did you mean enable?"],
        ),
        (
            "bad role and log level",
            "p2p:\n  role: mastr\n  loglevel: verbose\n",
            &[
                "x.yaml:2: p2p.role: expected master, master/clusterinit, master/ha, worker, none or \"\" (automatic), found \"mastr\"",
                "x.yaml:3: p2p.loglevel: expected trace, debug, info, warn, error or fatal, found \"verbose\"",
            ],
        ),
        (
            "network id with a slash",
            "p2p:\n  network_id: a/b\n",
            &[
                "x.yaml:2: p2p.network_id: must not contain '/', blanks or control characters, found \"a/b\"",
            ],
        ),
        (
            "ADDRESS not CIDR",
            "p2p:\n  vpn:\n    env:\n      ADDRESS: 10.1.0.5\n",
            &[
                "x.yaml:4: p2p.vpn.env.ADDRESS: expected an IPv4 address with a prefix length like 10.1.0.1/24, found \"10.1.0.5\"",
            ],
        ),
        (
            "MTU not a number",
            "p2p:\n  vpn:\n    env:\n      EDGEVPNMTU: abc\n",
            &["x.yaml:4: p2p.vpn.env.EDGEVPNMTU: expected a number, found \"abc\""],
        ),
        (
            "MTU out of range",
            "p2p:\n  vpn:\n    env:\n      EDGEVPNMTU: 70000\n",
            &["x.yaml:4: p2p.vpn.env.EDGEVPNMTU: MTU 70000 is outside 576..=9000"],
        ),
        (
            "IFACE too long",
            "p2p:\n  vpn:\n    env:\n      IFACE: averyverylongname0\n",
            &[
                "x.yaml:4: p2p.vpn.env.IFACE: interface name \"averyverylongname0\" is longer than 15 bytes",
            ],
        ),
        (
            "DHCP not a boolean",
            "p2p:\n  vpn:\n    env:\n      DHCP: perhaps\n",
            &[
                "x.yaml:4: p2p.vpn.env.DHCP: expected true/false (or yes/no, on/off, 1/0), found \"perhaps\"",
            ],
        ),
        (
            "empty bootstrap peer",
            "p2p:\n  vpn:\n    env:\n      EDGEVPNBOOTSTRAPPEERS: \"/ip4/1.2.3.4/udp/1,,/ip4/5.6.7.8/udp/1\"\n",
            &["x.yaml:4: p2p.vpn.env.EDGEVPNBOOTSTRAPPEERS: entry 2 of the list is empty"],
        ),
        (
            "API on every interface",
            "p2p:\n  vpn:\n    env:\n      APILISTEN: \"0.0.0.0:8080\"\n",
            &[
                "x.yaml:4: p2p.vpn.env.APILISTEN: 0.0.0.0:8080 is not a loopback address; the API is plain HTTP (inspection for anyone who reaches it, its bearer token in clear), use 127.0.0.1:8080",
            ],
        ),
        (
            "env value that is a list",
            "p2p:\n  vpn:\n    env:\n      ADDRESS: [10.1.0.1/24]\n",
            &["x.yaml:4: p2p.vpn.env.ADDRESS: expected a string, found a list"],
        ),
        (
            "unknown template function",
            "#cloud-config\np2p:\n  network_id: \"{{ foo .MachineID }}\"\n",
            &[
                "x.yaml:3: p2p.network_id: template: unknown function \"foo\" (known: trunc, upper, lower)",
            ],
        ),
        (
            "unknown key holding a template: the key is the problem",
            "p2p:\n  netwrok_id: \"{{ nope }}\"\n",
            &["x.yaml:2: p2p.netwrok_id: unknown key, did you mean network_id?"],
        ),
        (
            "template in a boolean",
            "p2p:\n  dns: \"{{ trunc 3 .Hostname }}\"\n",
            &["x.yaml:2: p2p.dns: expected a boolean, found string \"nod\""],
        ),
        (
            "unknown template field in a list",
            "k3s:\n  args:\n  - --a\n  - \"--node-name={{ .Host }}\"\n",
            &[
                "x.yaml:4: k3s.args[1]: template: unknown field .Host (known: .MachineID, .Hostname)",
            ],
        ),
        (
            "KubeVIP enabled without an EIP",
            "kubevip:\n  enable: true\n",
            &["x.yaml:2: kubevip.enable: KubeVIP is enabled but kubevip.eip is not set"],
        ),
        (
            "EIP not an IP address",
            "kubevip:\n  eip: vip.example\n",
            &["x.yaml:2: kubevip.eip: expected an IP address, found \"vip.example\""],
        ),
        (
            "manifest URL without scheme",
            "kubevip:\n  eip: 10.0.0.1\n  manifest_url: example.org/m.yaml\n",
            &[
                "x.yaml:3: kubevip.manifest_url: expected an http:// or https:// URL, found \"example.org/m.yaml\"",
            ],
        ),
        (
            "k3s args not a list, env with a map value",
            "k3s-agent:\n  args: --foo\n  env:\n    A: {b: c}\n",
            &[
                "x.yaml:2: k3s-agent.args: expected a list of strings, found string \"--foo\"",
                "x.yaml:4: k3s-agent.env.A: expected a string, found a mapping",
            ],
        ),
        (
            "flow style: the line of the enclosing key",
            "#cloud-config\np2p: {vpn: {create: maybe}}\n",
            &["x.yaml:2: p2p.vpn.create: expected a boolean, found string \"maybe\""],
        ),
        (
            "every problem of a file is listed",
            "p2p:\n  dns: 1\n  dynamic_roles: x\n  vpn:\n    use: []\n    creat: true\n",
            &[
                "x.yaml:2: p2p.dns: expected a boolean, found integer 1",
                "x.yaml:3: p2p.dynamic_roles: expected a boolean, found string \"x\"",
                "x.yaml:5: p2p.vpn.use: expected a boolean, found a list",
                "x.yaml:6: p2p.vpn.creat: unknown key, did you mean create?",
            ],
        ),
        (
            "deep nesting",
            &deep(),
            &["x.yaml:65: not accepted: nested more than 64 collections deep"],
        ),
        (
            "alias bomb",
            "a: &a [x,x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\nd: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\ne: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\nf: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]\ng: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]\n",
            &[
                "x.yaml:6: not accepted: more than 100000 values once aliases are expanded (an alias bomb?)",
            ],
        ),
        (
            "control characters",
            "p2p:\n  role: \u{1}\u{2}\n",
            &["x.yaml: not valid YAML: control characters are not allowed*"],
        ),
        (
            "bad merge key",
            "p2p:\n  <<: 5\n",
            &[
                "x.yaml: not valid YAML: expected a mapping or list of mappings for merging, but found scalar",
            ],
        ),
    ];
    for (name, text, expected) in rows {
        check(name, &errors(&[("x.yaml", text)]), expected);
    }
    check(
        "token not base64",
        &errors(&[("x.yaml", &token_rows[0])]),
        &["x.yaml:2: p2p.network_token: network token is not valid base64: *"],
    );
    check(
        "token: base64 of something that is not a token",
        &errors(&[("x.yaml", &token_rows[1])]),
        &["x.yaml:3: p2p.network_token: network token does not hold valid YAML: *"],
    );
    let legacy = format!("kairos:\n  network_token: {not_yaml_token}\n");
    check(
        "legacy token is checked too",
        &errors(&[("x.yaml", &legacy)]),
        &["x.yaml:2: kairos.network_token: network token does not hold valid YAML: *"],
    );
}

fn deep() -> String {
    let mut s = String::from("p2p:\n");
    for i in 1..200 {
        s.push_str(&" ".repeat(i));
        s.push_str("k:\n");
    }
    s
}

#[test]
fn token_never_appears_in_messages() {
    let secret = b64(b"otp: [this is not a token but looks secret]");
    for text in [
        format!("p2p:\n  network_token: {secret}\n"),
        format!("p2p:\n  network_tokn: {secret}\n"),
        format!("kairos: {secret}\n"),
        format!("p2p: {secret}\n"),
        format!("p2p:\n  network_token: [{secret}]\n"),
    ] {
        let got = errors(&[("x.yaml", &text)]);
        assert!(!got.is_empty(), "{text}");
        for e in got {
            assert!(!e.contains(&secret[..40]), "{e}");
        }
    }
}

#[test]
fn errors_of_several_files_in_file_order() {
    let got = errors(&[
        ("a.yaml", "p2p:\n  dns: maybe\n"),
        ("b.yaml", "p2p: [\n"),
        ("c.yaml", "#cloud-config\nk3s:\n  enabled: true\n"),
        ("d.yaml", "k3s:\n  enable: true\n"),
    ]);
    check(
        "several files",
        &got,
        &[
            "a.yaml:2: p2p.dns: expected a boolean, found string \"maybe\"",
            "b.yaml: not valid YAML: *",
            "d.yaml:2: k3s.enable: unknown key, did you mean enabled?",
        ],
    );
}

#[test]
fn a_pathological_file_lists_at_most_fifty_errors() {
    let mut text = String::from("p2p:\n");
    for i in 0..10_000 {
        text.push_str(&format!("  unknown_{i}: 1\n"));
    }
    let got = errors(&[("x.yaml", &text)]);
    assert_eq!(got.len(), 51);
    assert!(got[0].starts_with("x.yaml:2: p2p.unknown_0: unknown key"));
    assert_eq!(got[50], "x.yaml: 9950 more errors not shown");
}

#[test]
fn accepted_edge_cases() {
    for (name, text) in [
        ("empty file", ""),
        ("only the header", "#cloud-config\n"),
        ("only blanks and comments", "\n  \n# nothing\n"),
        ("no header", "p2p:\n  network_id: x\n"),
        ("empty blocks", "p2p:\nkubevip: ~\nk3s: {}\n"),
        ("BOM", "\u{feff}#cloud-config\np2p:\n  dns: on\n"),
        (
            "templates in ignored blocks",
            "hostname: \"{{ nope .X }}\"\nstages: {boot: [{commands: [\"{{\"]}]}\n",
        ),
        (
            "unknown top-level blocks of any shape",
            "install: [1, {2: 3}]\n5: x\ntrue: [y]\n? [a]\n: b\n",
        ),
        (
            "merge keys",
            "base: &b {network_id: x, dns: true}\np2p:\n  <<: *b\n  dns: false\n",
        ),
    ] {
        let got = errors(&[("x.yaml", text)]);
        assert!(got.is_empty(), "{name}: {got:#?}");
    }
    let c = config::parse(
        &[(
            Path::new("x.yaml"),
            "base: &b {network_id: x, dns: true}\np2p:\n  <<: *b\n  dns: false\n",
        )],
        &host(),
    )
    .unwrap();
    assert_eq!(c.p2p.network_id, "x");
    assert!(!c.p2p.dns);
}

fn load_errors(paths: &[PathBuf]) -> Vec<String> {
    match config::load(paths, &host()) {
        Ok(_) => Vec::new(),
        Err(e) => e.0.iter().map(|e| e.to_string()).collect(),
    }
}

#[test]
fn file_level_errors() {
    let dir = TempDir::new("errors");
    let big = dir.0.join("big.yaml");
    let file = std::fs::File::create(&big).unwrap();
    file.set_len(10 * 1024 * 1024).unwrap();
    let latin1 = dir.0.join("latin1.yaml");
    std::fs::write(&latin1, b"#cloud-config\np2p:\n  network_id: caf\xe9\n").unwrap();
    let missing = dir.0.join("missing.yaml");
    let good = dir.0.join("good.yaml");
    std::fs::write(&good, "p2p:\n  dns: true\n").unwrap();

    let got = load_errors(&[
        good.clone(),
        big.clone(),
        latin1.clone(),
        missing.clone(),
        dir.0.clone(),
    ]);
    let d = |p: &Path| p.display().to_string();
    assert_eq!(
        got,
        [
            format!(
                "{}: file is 10485760 bytes, larger than the 4 MiB limit",
                d(&big)
            ),
            format!("{}:3: not valid UTF-8 (byte offset 36)", d(&latin1)),
            format!("{}: cannot read: no such file", d(&missing)),
            format!("{}: cannot read: is a directory", d(&dir.0)),
        ]
    );

    // Exactly at the limit is fine (the file is all blanks: an empty configuration).
    let edge = dir.0.join("edge.yaml");
    std::fs::write(&edge, vec![b' '; config::MAX_FILE_SIZE as usize]).unwrap();
    assert_eq!(load_errors(&[edge]), Vec::<String>::new());
}

#[cfg(unix)]
#[test]
fn unreadable_file() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new("perm");
    let path = dir.0.join("secret.yaml");
    std::fs::write(&path, "p2p: {}\n").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o000)).unwrap();
    if std::fs::read(&path).is_ok() {
        return; // running as root: permissions are not enforced
    }
    assert_eq!(
        load_errors(std::slice::from_ref(&path)),
        [format!(
            "{}: cannot read: permission denied",
            path.display()
        )]
    );
}
