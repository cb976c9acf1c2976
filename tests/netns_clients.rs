//! The client commands (`get-kubeconfig`, `role`, `status`) run inside a network namespace
//! against a real agent's API on its configured TCP address (`p2p.vpn.env.APILISTEN`).

mod common;

use std::process::{Command, Output};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::{Host, api_request, api_socket, lab_with_hosts, wait_for};
use kairos_p2p::ledger::edgevpn::client_segment;

const API: &str = "http://127.0.0.1:18080";

const K3S_YAML: &str = "apiVersion: v1\nclusters:\n- cluster:\n    certificate-authority-data: LS0tLS1CRUdJTg==\n    server: https://127.0.0.1:6443\n  name: default\ncontexts:\n- context:\n    cluster: default\n    user: default\n  name: default\ncurrent-context: default\nkind: Config\n";

/// `kairos-p2p <args>` inside the host's namespace.
fn run(host: &Host, args: &[&str]) -> Output {
    Command::new("ip")
        .args(["netns", "exec", &host.ns, env!("CARGO_BIN_EXE_kairos-p2p")])
        .args(args)
        // The host's state and root, as its agent's: the client finds their socket and token.
        .envs(common::client_env(host))
        .output()
        .unwrap()
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

/// The cluster whose published keys the test writes by hand: not the agents' own `kairos`, where
/// the ledger takes `master-kubeconfig` and `ip-master` only from the committed master's peer
/// (`ledger::authority`); a node holds other networks' buckets without judging their keys.
const OTHER: &str = "clients-elsewhere";

/// Stores `value` under `<OTHER>/<key>` as provider-kairos does (edgevpn's Go client).
fn put_like_kairos(host: &Host, key: &str, value: &str) {
    let target = format!("/api/ledger/{OTHER}/{key}/{}", client_segment(value));
    let (status, _, body) = api_request(&api_socket(host), "PUT", &target);
    assert_eq!(status, "HTTP/1.1 200 OK", "{body}");
}

#[test]
fn clients_read_and_write_through_a_real_agent() {
    let extra = "  vpn:\n    env:\n      APILISTEN: \"127.0.0.1:18080\"\n";
    let (mut lab, config, hosts) = lab_with_hosts("clients", "10.77.0", 2, extra);
    for (i, h) in hosts.iter().enumerate() {
        let uuid = format!("netns-clients-node-{}", i + 1);
        lab.spawn_with_env(h, &["agent", "--config", &config], &[("UUID", &uuid)]);
    }
    let h = &hosts[0];
    let up = wait_for(Duration::from_secs(10), || {
        run(h, &["status", "--api", API]).status.success()
    });
    assert!(
        up.is_some(),
        "API up on APILISTEN: {:?}",
        run(h, &["status", "--api", API])
    );

    // Nothing listens there: a clear error naming the URL, exit 1.
    let out = run(h, &["get-kubeconfig", "--api", "http://127.0.0.1:1"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("cannot reach the API at http://127.0.0.1:1/"),
        "{err}"
    );
    assert!(err.contains("kairos-p2p bridge"), "{err}");

    // No master has published a kubeconfig yet.
    let out = run(h, &["get-kubeconfig", "--api", API, "--network-id", OTHER]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("no kubeconfig in the ledger yet"), "{err}");

    // A master's kubeconfig and address, stored as provider-kairos stores them.
    put_like_kairos(h, "master-kubeconfig", &URL_SAFE_NO_PAD.encode(K3S_YAML));
    let out = run(h, &["get-kubeconfig", "--api", API, "--network-id", OTHER]);
    assert_eq!(out.status.code(), Some(1), "no address yet");
    assert!(
        text(&out.stderr).contains("ip-master"),
        "{}",
        text(&out.stderr)
    );
    put_like_kairos(h, "ip-master", "10.1.0.1");
    let out = run(h, &["get-kubeconfig", "--api", API, "--network-id", OTHER]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        K3S_YAML.replace("https://127.0.0.1:6443", "https://10.1.0.1:6443")
    );
    // The other node reads it too, once the ledger has spread it.
    let spread = wait_for(Duration::from_secs(10), || {
        run(
            &hosts[1],
            &["get-kubeconfig", "--api", API, "--network-id", OTHER],
        )
        .status
        .success()
    });
    assert!(spread.is_some(), "kubeconfig gossiped to the second node");

    // A value that is not base64.
    put_like_kairos(h, "master-kubeconfig", "not base64!");
    let out = run(h, &["get-kubeconfig", "--api", API, "--network-id", OTHER]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("cannot be decoded"),
        "{}",
        text(&out.stderr)
    );

    // role set: refused names (exit 2, nothing written), then a node that has not joined yet.
    for (role, says) in [("boss", "unknown role"), ("none", "p2p.role")] {
        let out = run(h, &["role", "set", "future-node", role, "--api", API]);
        assert_eq!(out.status.code(), Some(2), "{role}");
        assert!(text(&out.stderr).contains(says), "{}", text(&out.stderr));
    }
    let out = run(
        h,
        &["role", "set", "future-node", "master/ha", "--api", API],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let line = |list: &str, uuid: &str| -> Vec<String> {
        list.lines()
            .find(|l| l.starts_with(uuid))
            .map(|l| l.split_whitespace().map(str::to_string).collect())
            .unwrap_or_default()
    };
    let out = run(h, &["role", "list", "--api", API]);
    let list = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(list.starts_with("UUID "), "{list}");
    assert_eq!(
        line(&list, "future-node"),
        ["future-node", "-", "master/ha", "no"],
        "{list}"
    );
    // Both agents are listed, online, and get their roles (one master, one worker).
    let roles = wait_for(Duration::from_secs(30), || {
        let list = text(&run(h, &["role", "list", "--api", API]).stdout);
        let mut got: Vec<String> = (1..=2)
            .map(|i| line(&list, &format!("netns-clients-node-{i}")))
            .filter(|cells| cells.len() == 4 && cells[3] == "yes")
            .map(|cells| cells[2].clone())
            .collect();
        got.sort();
        got == ["master", "worker"]
    });
    assert!(
        roles.is_some(),
        "{}",
        text(&run(h, &["role", "list", "--api", API]).stdout)
    );

    // status: this node and the other one.
    let out = run(h, &["status", "--api", API]);
    let status = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(status.contains("(netns-clients-node-1)"), "{status}");
    assert!(status.contains("netns-clients-node-2"), "{status}");
    assert!(status.contains("HOSTNAME"), "{status}");

    for i in 0..hosts.len() {
        assert!(lab.stop(i).success(), "clean stop");
    }
}
