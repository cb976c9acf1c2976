//! Kairos users' configs through the real binary's `validate`: what upstream accepts is accepted,
//! what it refuses is refused, and where kairos-p2p differs the output says so.

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::TempDir;

/// `validate --config FILE` on `text`: (exit code, stdout, stderr).
fn validate(text: &str) -> (i32, String, String) {
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    let dir = TempDir::new(&format!("habits{}", RUNS.fetch_add(1, Ordering::Relaxed)));
    let path = dir.write("c.yaml", text);
    let out = Command::new(env!("CARGO_BIN_EXE_kairos-p2p"))
        .arg("validate")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn token() -> String {
    common::generate_token()
}

#[test]
fn an_empty_network_token_warns_with_kairos_behaviour() {
    let (code, _, err) = validate("#cloud-config\np2p:\n  network_token: \"\"\n");
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("p2p.network_token: empty: P2P is off here")
            && err.contains("Kairos refuses this configuration (\"No network token provided\")"),
        "{err}"
    );
}

#[test]
fn a_top_level_network_token_is_named() {
    let (code, _, err) = validate(&format!(
        "network_token: {}\np2p:\n  role: worker\n",
        token()
    ));
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains(":1: network_token: not read (by Kairos either)")
            && err.contains("p2p.network_token"),
        "{err}"
    );
}

#[test]
fn p2p_ha_gets_a_note_and_keeps_its_intent() {
    let text = format!(
        "p2p:\n  network_token: {}\n  ha:\n    master_nodes: 2\n",
        token()
    );
    let (code, out, err) = validate(&text);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("p2p.ha: note: Kairos reads only p2p.auto.ha"),
        "{err}"
    );
    assert!(out.contains("master_nodes: 2"), "{out}");
}

#[test]
fn what_upstream_accepts_is_accepted() {
    let t = token();
    for (extra, note) in [
        (
            "  role: master/ha\n",
            Some("p2p.role: note: read as master"),
        ),
        (
            "  role: master/clusterinit\n",
            Some("p2p.role: note: read as master"),
        ),
        ("  vpn:\n    auto: true\n", Some("p2p.vpn.auto: not read")),
        // yaml.v3 takes the YAML 1.1 words into a bool, quoted or not.
        ("  disable_dht: \"yes\"\n", None),
        ("  disable_dht: off\n", None),
    ] {
        let (code, out, err) = validate(&format!("p2p:\n  network_token: {t}\n{extra}"));
        assert_eq!(code, 0, "{extra}: {err}");
        match note {
            Some(note) => assert!(err.contains(note), "{extra}: {err}"),
            None => assert!(err.is_empty(), "{extra}: {err}"),
        }
        if extra.contains("role") {
            assert!(out.contains("role: \"master\""), "{out}");
        }
    }
}

#[test]
fn what_upstream_refuses_is_refused() {
    let t = token();
    for (extra, message) in [
        (
            "  disable_dht: \"true\"\n",
            "p2p.disable_dht: expected a boolean, found string \"true\" (a string: write it \
             without quotes; Kairos refuses it too)",
        ),
        ("  role: Master\n", "found \"Master\" (roles are lower case"),
        ("  role: master/worker\n", "found \"master/worker\""),
        ("  dynamic_roles: \"1\"\n", "found string \"1\""),
    ] {
        let (code, _, err) = validate(&format!("p2p:\n  network_token: {t}\n{extra}"));
        assert_eq!(code, 2, "{extra}: {err}");
        assert!(err.contains(message), "{extra}: {err}");
    }
}
