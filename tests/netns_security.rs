//! Security promises that need real agents (root, network namespaces); the map of every promise
//! to its tests is the module documentation of `tests/security.rs`.
//!
//! One end-to-end run, under umask 000 and at trace level: three agents form a k3s cluster
//! (k3s stand-in), an outsider with another token sits on the same LAN, a bridge joins and
//! `get-kubeconfig` fetches the kubeconfig through it. Then:
//! - every agent's API socket is a 0600 socket, its TCP API unreachable from the LAN, every
//!   state directory 0700, every file in it private, and every file under a host that holds a
//!   secret private;
//! - no log line of any agent, the bridge, the outsider or `get-kubeconfig` holds the network
//!   token, its decoded secrets, a derived key, a node key, the k3s token or the kubeconfig's
//!   client key;
//! - nothing of the outsider (its peer id, its uuid) reached any member's files.
//!
//! Skips (passes with a note) when not run as root.

mod common;
mod standin;

use std::fs;
use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};
use kairos_p2p::token::{KeySchedule, NetworkToken};

use common::{
    Host, Lab, api_socket, generate_token, is_root, metric, peer_id_of, unix_get, wait_for,
    write_config,
};
use standin::STANDIN;

/// Every way a secret's bytes could be printed.
fn encodings(name: &str, bytes: &[u8]) -> Vec<(String, String)> {
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let mut out = vec![
        (format!("{name} (hex)"), hex.clone()),
        (format!("{name} (HEX)"), hex.to_uppercase()),
        (format!("{name} (base64)"), STANDARD_NO_PAD.encode(bytes)),
        (format!("{name} (base64url)"), URL_SAFE_NO_PAD.encode(bytes)),
        (format!("{name} (debug bytes)"), format!("{bytes:?}")),
    ];
    out.retain(|(_, v)| v.len() >= 16);
    out
}

/// Every file under `dir` (recursively), sockets included.
fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        match e.file_type() {
            Ok(t) if t.is_dir() => walk(&path, out),
            Ok(_) => out.push(path),
            Err(_) => {}
        }
    }
}

fn mode(path: &Path) -> u32 {
    fs::symlink_metadata(path)
        .map(|m| m.permissions().mode() & 0o7777)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `kairos-p2p <args>` inside `host`'s namespace at trace level: (success, stdout, stderr).
fn run_in(host: &Host, args: &[&str]) -> (bool, String, String) {
    let out = Command::new("ip")
        .args(["netns", "exec", &host.ns, env!("CARGO_BIN_EXE_kairos-p2p")])
        .args(args)
        // The host's state and root, as its agent's: the client finds their socket and token.
        .envs(common::client_env(host))
        .env("KAIROS_P2P_LOG", "trace")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn e2e_no_secret_in_any_log_and_every_secret_file_private() {
    if !is_root() {
        eprintln!("skipped: needs root (network namespaces)");
        return;
    }
    let started = Instant::now();
    // The agents inherit it: a file or socket created without an explicit mode shows up.
    // SAFETY: umask has no preconditions.
    unsafe {
        libc::umask(0);
    }
    let mut lab = Lab::new("security");
    let token = generate_token();
    let config = write_config(
        &lab.dir,
        "config.yaml",
        &format!("#cloud-config\np2p:\n  network_token: \"{token}\"\n  disable_dht: true\n"),
    );
    let outsider_token = generate_token();
    let outsider_config = write_config(
        &lab.dir,
        "outsider.yaml",
        &format!(
            "#cloud-config\np2p:\n  network_token: \"{outsider_token}\"\n  disable_dht: true\n"
        ),
    );
    let hosts: Vec<Host> = (1..=5)
        .map(|i| lab.add_host(i, &format!("10.87.0.{i}/24")))
        .collect();
    let (members, rest) = hosts.split_at(3);
    let (outsider, bridge) = (&rest[0], &rest[1]);
    let trace = ("KAIROS_P2P_LOG", "trace");
    let k3s = ("KAIROS_P2P_K3S", STANDIN);
    let uuids: Vec<String> = (1..=3).map(|i| format!("security-node-{i}")).collect();
    for (h, uuid) in members.iter().zip(&uuids) {
        fs::create_dir_all(h.dir.join("root")).unwrap();
        lab.spawn_with_env(
            h,
            &["agent", "--config", config.to_str().unwrap()],
            &[("UUID", uuid), trace, k3s],
        );
    }
    let outsider_uuid = "security-outsider-f00d";
    fs::create_dir_all(outsider.dir.join("root")).unwrap();
    lab.spawn_with_env(
        outsider,
        &["agent", "--config", outsider_config.to_str().unwrap()],
        &[("UUID", outsider_uuid), trace, k3s],
    );

    // Every member runs k3s (so the k3s token went to the workers), then a bridge fetches the
    // kubeconfig.
    let roots: Vec<PathBuf> = members.iter().map(|h| h.dir.join("root")).collect();
    let formed = wait_for(Duration::from_secs(60), || {
        roots.iter().all(|r| {
            standin::read_log(r)
                .iter()
                .any(|rec| rec.event() == "ready")
        })
    });
    assert!(formed.is_some(), "the cluster did not form within 60 s");
    lab.spawn_with_env(bridge, &["bridge"], &[trace, ("NETWORK_TOKEN", &token)]);
    let mut fetched = (false, String::new(), String::new());
    let got = wait_for(Duration::from_secs(30), || {
        fetched = run_in(bridge, &["get-kubeconfig"]);
        fetched.0
    });
    assert!(got.is_some(), "get-kubeconfig: {}", fetched.2);
    let kubeconfig = fetched.1.clone();

    // The API sockets while the agents run.
    let bridge_socket = bridge.dir.join("state/bridge/api.sock");
    for sock in members
        .iter()
        .chain([outsider])
        .map(api_socket)
        .chain([bridge_socket])
    {
        let meta = fs::symlink_metadata(&sock).unwrap();
        assert!(meta.file_type().is_socket(), "{}", sock.display());
        assert_eq!(mode(&sock), 0o600, "{}", sock.display());
    }
    // The TCP API (default APILISTEN 127.0.0.1:8080) answers on the member's loopback and is
    // not reachable from the LAN.
    let (local, _, err) = run_in(&members[0], &["status", "--api", "http://127.0.0.1:8080"]);
    assert!(local, "status on the member's loopback: {err}");
    let remote = format!("http://{}:8080", members[0].ip);
    let (reached, out, _) = run_in(bridge, &["status", "--api", &remote]);
    assert!(
        !reached,
        "the member's API answered {remote} from the LAN: {out}"
    );
    // The outsider was there all along: every member heard its beacons and could not open
    // them (the positive control for "nothing of the outsider" below).
    for h in members {
        let metrics = unix_get(&api_socket(h), "/metrics");
        let rejected = metric(
            &metrics,
            "kairos_p2p_dropped_total{reason=\"beacon_rejected\"}",
        );
        assert!(rejected > 0, "{}: no outsider beacon rejected", h.ns);
    }
    let outsider_id = peer_id_of(outsider);
    for i in (0..5).rev() {
        lab.stop(i);
    }

    // The secrets.
    let parsed: NetworkToken = token.parse().unwrap();
    let keys = KeySchedule::new(&parsed);
    let mut secrets: Vec<(String, String)> = vec![
        ("network token".into(), token.clone()),
        ("otp.dht.key".into(), parsed.otp.dht.key.clone()),
        ("otp.crypto.key".into(), parsed.otp.crypto.key.clone()),
        ("room".into(), parsed.room.clone()),
        ("rendezvous".into(), parsed.rendezvous.clone()),
        ("mdns".into(), parsed.mdns.clone()),
    ];
    // The token as printed wrapped or cut: any 40-character piece of it.
    for (i, piece) in token.as_bytes().chunks(40).enumerate() {
        if piece.len() == 40 {
            secrets.push((
                format!("network token piece {i}"),
                String::from_utf8_lossy(piece).into_owned(),
            ));
        }
    }
    secrets.extend(encodings("membership key", &keys.membership_key()));
    let crypto = keys.crypto_window(0);
    secrets.extend(encodings("beacon key", &keys.beacon_key(crypto)));
    for (h, name) in hosts
        .iter()
        .zip(["node 1", "node 2", "node 3", "outsider", "bridge"])
    {
        if let Ok(key) = fs::read(h.dir.join("state").join(kairos_p2p::identity::KEY_FILE)) {
            secrets.extend(encodings(&format!("{name} node key"), &key));
        }
    }
    let node_token = roots
        .iter()
        .find_map(|r| standin::node_token(r))
        .expect("the master's node token");
    secrets.push(("k3s node token".into(), node_token.clone()));
    secrets.push((
        "k3s token secret".into(),
        standin::secret_of(&node_token).to_string(),
    ));
    secrets.extend(encodings("k3s node token", node_token.as_bytes()));
    let client_key = kubeconfig
        .lines()
        .find_map(|l| l.trim().strip_prefix("client-key-data:"))
        .map(|v| v.trim().to_string())
        .expect("the kubeconfig has a client key");
    secrets.push(("kubeconfig client key".into(), client_key.clone()));
    let stored = URL_SAFE_NO_PAD.encode(
        roots
            .iter()
            .find_map(|r| standin::kubeconfig(r))
            .unwrap()
            .as_bytes(),
    );
    let mid = stored.len() / 2;
    secrets.push((
        "kubeconfig as stored in the ledger (a piece)".into(),
        stored[mid..mid + 48].to_string(),
    ));
    secrets.retain(|(_, v)| v.len() >= 12);

    // The k3s token did reach every member's k3s (so it went through the agents), and the
    // secrets are what the kubeconfig printed holds.
    for r in &roots {
        let standin_log = fs::read_to_string(standin::log_path(r)).unwrap_or_default();
        assert!(
            standin_log.contains(standin::secret_of(&node_token)),
            "{}: the k3s token reached this member's k3s",
            r.display()
        );
    }
    assert!(kubeconfig.contains(&client_key));

    // 1. No secret in any log.
    let mut logs: Vec<(String, String)> = hosts
        .iter()
        .map(|h| {
            (
                h.ns.clone(),
                fs::read_to_string(h.dir.join("agent.log")).unwrap_or_default(),
            )
        })
        .collect();
    logs.push(("get-kubeconfig (stderr)".into(), fetched.2.clone()));
    let total_lines: usize = logs.iter().map(|(_, l)| l.lines().count()).sum();
    let trace_lines: usize = logs
        .iter()
        .map(|(_, l)| l.lines().filter(|x| x.contains(" TRACE ")).count())
        .sum();
    assert!(
        trace_lines > 0,
        "the agents logged at trace level ({total_lines} lines)"
    );
    let mut leaks = Vec::new();
    for (who, log) in &logs {
        for line in log.lines() {
            for (name, secret) in &secrets {
                if line.contains(secret.as_str()) {
                    leaks.push(format!("{who}: {name}: {line}"));
                }
            }
        }
    }
    assert!(
        leaks.is_empty(),
        "secrets in the logs:\n{}",
        leaks.join("\n")
    );

    // 2. Private files: state directories 0700 and everything in them private; any file under
    // a host that holds a secret private too (the test's own agent.log and config aside).
    let secret_values: Vec<&str> = [
        token.as_str(),
        node_token.as_str(),
        standin::secret_of(&node_token),
        client_key.as_str(),
        stored.as_str(),
    ]
    .into_iter()
    .collect();
    let mut holding = Vec::new();
    for h in members.iter().chain([outsider, bridge]) {
        let state = h.dir.join("state");
        assert_eq!(mode(&state), 0o700, "{}", state.display());
        let mut files = Vec::new();
        walk(&state, &mut files);
        for f in &files {
            assert_eq!(mode(f) & 0o077, 0, "{} is not private", f.display());
        }
        let mut all = Vec::new();
        walk(&h.dir, &mut all);
        // The logs are the test's (agent.log) and the stand-in's (which records the tokens it
        // was given, as a positive control below), not files the agent writes.
        let ours = |f: &&PathBuf| !f.ends_with("agent.log") && !f.ends_with("k3s-standin.log");
        for f in all.iter().filter(ours) {
            let text = String::from_utf8_lossy(&fs::read(f).unwrap_or_default()).into_owned();
            if let Some(s) = secret_values.iter().find(|s| text.contains(**s)) {
                holding.push(f.clone());
                assert_eq!(
                    mode(f) & 0o077,
                    0,
                    "{} holds a secret ({}...) and is mode {:o}",
                    f.display(),
                    &s[..8],
                    mode(f)
                );
            }
        }
    }

    // The check above saw the files that hold secrets (the ledger snapshots, k3s' own files).
    eprintln!("files holding a secret, all private: {holding:?}");
    for h in members.iter().chain([bridge]) {
        assert!(
            holding.iter().any(|f| f.starts_with(h.dir.join("state"))),
            "{}: no file of the state holds a secret (the check would see nothing)",
            h.ns
        );
    }

    // 3. Nothing of the outsider in any member's files.
    for h in members {
        let mut all = Vec::new();
        walk(&h.dir, &mut all);
        for f in all.iter().filter(|f| !f.ends_with("agent.log")) {
            let bytes = fs::read(f).unwrap_or_default();
            let text = String::from_utf8_lossy(&bytes);
            assert!(
                !text.contains(&outsider_id) && !text.contains(outsider_uuid),
                "{} mentions the outsider",
                f.display()
            );
            let raw: Vec<u8> = outsider_id
                .parse::<kairos_p2p::identity::PeerId>()
                .map(|p| p.0.to_vec())
                .unwrap_or_default();
            assert!(
                raw.is_empty() || !bytes.windows(raw.len()).any(|w| w == raw.as_slice()),
                "{} holds the outsider's peer id",
                f.display()
            );
        }
    }
    eprintln!(
        "{} secrets checked in {total_lines} log lines ({trace_lines} at trace); {:?}",
        secrets.len(),
        started.elapsed()
    );
}
