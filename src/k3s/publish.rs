//! The master's join data: when its k3s API is ready, what it publishes in the ledger and how
//! the other nodes read it back.
//!
//! Keys of the cluster bucket `<network_id>`, as provider-kairos names them (its edgevpn client
//! writes `<uuid>-<thing>`): `token-nodetoken` (the node token), `ip-master`, `master-kubeconfig`
//! (k3s.yaml, base64url without padding) and, for every node, `<uuid>-ip` (its node address).
//! This agent stores the plain text; readers go through
//! [`edgevpn::text`](crate::ledger::edgevpn::text), so values written by Kairos' Go client read
//! the same, and the API shows them in the Go client's encoding
//! ([`api::data`](crate::api::data)).
//!
//! # `ip-master` and where nodes join
//! As with Kairos (`guessIP`), `ip-master` is the KubeVIP EIP when KubeVIP is on (`kubevip.eip`
//! set and not disabled), else the master's node address: what `get-kubeconfig` (ours and
//! kairosctl's) puts in the kubeconfig, so clients go through the VIP. The EIP only answers
//! once kube-vip runs on a server, and kube-vip runs only once k3s is up, so joining nodes
//! (workers, HA servers) do not use it: they join the master's own address, its `<uuid>-ip`
//! (the node holding `master` or `master/clusterinit` in `<uuid>-role`), which answers as soon
//! as k3s does; the EIP is in the servers' certificate (`--tls-san`) and joined agents learn
//! every server from k3s itself. A master that wrote no `<uuid>-ip` (a Kairos node: it writes
//! its `<uuid>-ip` only with the same EIP) is joined at `ip-master`. Kairos writes the EIP as
//! every node's `<uuid>-ip` when it is set; this agent writes each node's own address there.

use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use super::files;
use super::value::{self, K3sToken};
use super::{API_PORT, K3S_YAML, NODE_TOKEN_FILE, Root};
use crate::cluster::Write;
use crate::ledger::{Ledger, edgevpn, names};

/// What a ready master publishes.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinData {
    /// The node token (trimmed).
    pub node_token: String,
    /// The contents of k3s.yaml.
    pub kubeconfig: Vec<u8>,
    /// The address other nodes join (`ip-master`).
    pub address: String,
}

impl std::fmt::Debug for JoinData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinData")
            .field("address", &self.address)
            .field("kubeconfig_bytes", &self.kubeconfig.len())
            .finish_non_exhaustive()
    }
}

/// Why the API is not ready yet (for the log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotReady {
    /// No node-token file yet (k3s has not created its datastore).
    NoNodeToken(String),
    /// Nothing answers TCP on the API port.
    NoApi(String),
}

impl std::fmt::Display for NotReady {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotReady::NoNodeToken(why) | NotReady::NoApi(why) => f.write_str(why),
        }
    }
}

/// Readiness of a server: `<root>/var/lib/rancher/k3s/server/node-token` exists and is not
/// empty, and a TCP connection to `<node_ip>:6443` succeeds within `timeout`.
pub fn ready(root: &Root, node_ip: IpAddr, timeout: Duration) -> Result<(), NotReady> {
    let token = root.path(NODE_TOKEN_FILE);
    match files::read(&token) {
        Ok(Some(b)) if !b.trim_ascii().is_empty() => {}
        Ok(Some(_)) => {
            return Err(NotReady::NoNodeToken(format!(
                "{} is empty",
                token.display()
            )));
        }
        Ok(None) => {
            return Err(NotReady::NoNodeToken(format!(
                "{} does not exist yet",
                token.display()
            )));
        }
        Err(e) => return Err(NotReady::NoNodeToken(e.to_string())),
    }
    let addr = SocketAddr::new(node_ip, API_PORT);
    TcpStream::connect_timeout(&addr, timeout)
        .map(drop)
        .map_err(|e| NotReady::NoApi(format!("the k3s API at {addr} does not answer: {e}")))
}

/// Reads the join data of a ready server under `root`.
pub fn read_join_data(root: &Root, address: &str) -> Result<JoinData, String> {
    let token_path = root.path(NODE_TOKEN_FILE);
    let token = files::read(&token_path)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("{} does not exist", token_path.display()))?;
    let node_token =
        String::from_utf8(token).map_err(|_| format!("{} is not text", token_path.display()))?;
    // Published only if every node will accept it (the same parse as the joining side).
    let node_token = K3sToken::parse(&node_token)
        .map_err(|e| format!("{}: {e}", token_path.display()))?
        .expose()
        .to_string();
    let yaml_path = root.path(K3S_YAML);
    let kubeconfig = files::read(&yaml_path)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("{} does not exist", yaml_path.display()))?;
    if kubeconfig.trim_ascii().is_empty() {
        return Err(format!("{} is empty", yaml_path.display()));
    }
    Ok(JoinData {
        node_token,
        kubeconfig,
        address: address.to_string(),
    })
}

/// The ledger writes that publish `data` in `bucket`, leaving out values the ledger already
/// holds (by their text, whoever wrote them).
pub fn writes(ledger: &Ledger, bucket: &str, data: &JoinData) -> Vec<Write> {
    let wanted = [
        (names::NODE_TOKEN, data.node_token.clone()),
        (names::KUBECONFIG, URL_SAFE_NO_PAD.encode(&data.kubeconfig)),
        (names::IP_MASTER, data.address.clone()),
    ];
    wanted
        .into_iter()
        .filter(|(key, value)| read(ledger, bucket, key).as_deref() != Some(value.as_str()))
        .map(|(key, value)| Write::put(bucket, key, value))
        .collect()
}

/// The address `ip-master` announces: the KubeVIP EIP when KubeVIP is on, else `node_ip`.
#[must_use]
pub fn ip_master(node_ip: IpAddr, kubevip_eip: Option<IpAddr>) -> String {
    kubevip_eip.unwrap_or(node_ip).to_string()
}

/// The write of this node's `<uuid>-ip` (its node address), unless the ledger holds it already.
pub fn node_ip_write(ledger: &Ledger, bucket: &str, uuid: &str, node_ip: IpAddr) -> Option<Write> {
    let key = names::ip_key(uuid);
    let value = node_ip.to_string();
    (read(ledger, bucket, &key).as_deref() != Some(value.as_str()))
        .then(|| Write::put(bucket, &key, value))
}

/// The address joining nodes reach the master at: the `<uuid>-ip` of the node holding
/// `master/clusterinit` or `master` (in that order of preference; the lowest uuid among
/// several), else `ip-master`. `None` while neither is known.
pub fn join_address(ledger: &Ledger, bucket: &str) -> Option<String> {
    let mut masters: Vec<(u8, &str)> = ledger
        .bucket(bucket)
        .filter_map(|(key, value)| {
            let uuid = key.strip_suffix(names::ROLE_SUFFIX)?;
            let role = edgevpn::text(&String::from_utf8_lossy(value));
            match role.trim() {
                names::ROLE_MASTER_CLUSTERINIT => Some((0, uuid)),
                names::ROLE_MASTER => Some((1, uuid)),
                _ => None,
            }
        })
        .collect();
    masters.sort_unstable();
    masters
        .iter()
        .filter_map(|(_, uuid)| read(ledger, bucket, &names::ip_key(uuid)))
        .find(|ip| ip.parse::<IpAddr>().is_ok())
        .or_else(|| read(ledger, bucket, names::IP_MASTER))
}

/// The text of `bucket/key` (as written by us or by Kairos' Go client), trimmed; `None` when
/// absent or empty.
pub fn read(ledger: &Ledger, bucket: &str, key: &str) -> Option<String> {
    let raw = ledger.get(bucket, key)?;
    let text = edgevpn::text(&String::from_utf8_lossy(raw));
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_string())
}

/// What a joining node reads in `bucket`: the master's address ([`join_address`]) and node
/// token, both parsed ([`value::master_address`], [`K3sToken::parse`]); `Ok(None)` while either
/// is missing. A value that does not parse is an error and never reaches a plan.
pub fn read_join(
    ledger: &Ledger,
    bucket: &str,
) -> Result<Option<(IpAddr, K3sToken)>, value::ValueError> {
    let master = join_address(ledger, bucket);
    let token = read(ledger, bucket, names::NODE_TOKEN);
    let (Some(master), Some(token)) = (master, token) else {
        return Ok(None);
    };
    Ok(Some((
        value::master_address(&master)?,
        K3sToken::parse(&token)?,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::kubeconfig;
    use crate::identity::Identity;
    use crate::ledger::{Clock, Limits};

    const K3S_YAML_TEXT: &str = "apiVersion: v1\nclusters:\n- cluster:\n    certificate-authority-data: LS0tLS1CRUdJTi==\n    server: https://127.0.0.1:6443\n  name: default\nkind: Config\n";

    fn root(name: &str) -> Root {
        let d = std::env::temp_dir().join(format!("kp2p-publish-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        Root::new(d)
    }

    fn apply(ledger: &mut Ledger, writes: &[Write]) {
        let id = Identity::from_seed([7; 32]);
        let mut clock = Clock::new();
        for w in writes {
            let v = w.value.as_deref().unwrap();
            ledger
                .put(&id, &mut clock, &w.bucket, &w.key, v, 1_700_000_000_000)
                .unwrap();
        }
    }

    #[test]
    fn readiness_needs_the_token_file_and_the_api() {
        let r = root("ready");
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let t = Duration::from_millis(500);
        let e = ready(&r, lo, t).unwrap_err();
        assert!(matches!(e, NotReady::NoNodeToken(_)), "{e}");
        files::write(&r.path(NODE_TOKEN_FILE), b"K10abc::server:xyz\n", 0o600).unwrap();
        // Nothing on 127.0.0.1:6443 in the test environment (unless a real k3s runs there).
        if TcpStream::connect_timeout(&SocketAddr::new(lo, API_PORT), t).is_err() {
            assert!(matches!(ready(&r, lo, t), Err(NotReady::NoApi(_))));
        }
        std::fs::remove_dir_all(r.dir()).unwrap();
    }

    #[test]
    fn published_values_read_back_through_get_kubeconfig() {
        let r = root("values");
        files::write(&r.path(NODE_TOKEN_FILE), b"K10abc::server:xyz\n", 0o600).unwrap();
        files::write(&r.path(K3S_YAML), K3S_YAML_TEXT.as_bytes(), 0o600).unwrap();
        let data = read_join_data(&r, "10.1.0.1").unwrap();
        assert_eq!(data.node_token, "K10abc::server:xyz");
        assert!(!format!("{data:?}").contains("K10abc"));

        let mut ledger = Ledger::new(Limits::for_max_message_size(20 * 1024 * 1024));
        let w = writes(&ledger, "kairos", &data);
        assert_eq!(w.len(), 3);
        apply(&mut ledger, &w);
        assert!(
            writes(&ledger, "kairos", &data).is_empty(),
            "published once"
        );

        // What get-kubeconfig does with the two values.
        let stored = read(&ledger, "kairos", names::KUBECONFIG).unwrap();
        let address = read(&ledger, "kairos", names::IP_MASTER).unwrap();
        let yaml = kubeconfig::kubeconfig(&stored, &address).unwrap();
        assert_eq!(yaml, K3S_YAML_TEXT.replace("127.0.0.1", "10.1.0.1"));
        // What a joining node reads.
        assert_eq!(
            read(&ledger, "kairos", names::NODE_TOKEN).as_deref(),
            Some("K10abc::server:xyz")
        );

        // Values Kairos' Go client wrote read the same.
        let go = |s: &str| serde_json::to_string(&edgevpn::client_segment(s)).unwrap();
        let mut kairos = Ledger::new(Limits::for_max_message_size(20 * 1024 * 1024));
        apply(
            &mut kairos,
            &[
                Write::put("kairos", names::NODE_TOKEN, go("K10abc::server:xyz")),
                Write::put("kairos", names::IP_MASTER, go("10.1.0.1")),
                Write::put(
                    "kairos",
                    names::KUBECONFIG,
                    go(&URL_SAFE_NO_PAD.encode(K3S_YAML_TEXT)),
                ),
            ],
        );
        assert!(writes(&kairos, "kairos", &data).is_empty(), "same values");
        std::fs::remove_dir_all(r.dir()).unwrap();
    }

    /// Hostile `ip-master` or `token-nodetoken` values (plain, or as Kairos' Go client encodes
    /// them) are refused; good ones read back parsed.
    #[test]
    fn join_data_in_the_ledger_is_parsed() {
        let go = |s: &str| serde_json::to_string(&edgevpn::client_segment(s)).unwrap();
        let ledger_with = |ip: &str, token: &str| {
            let mut l = Ledger::new(Limits::for_max_message_size(1 << 20));
            apply(
                &mut l,
                &[
                    Write::put("kairos", names::IP_MASTER, ip.to_string()),
                    Write::put("kairos", names::NODE_TOKEN, token.to_string()),
                ],
            );
            l
        };
        let empty = Ledger::new(Limits::for_max_message_size(1 << 20));
        assert_eq!(read_join(&empty, "kairos"), Ok(None));
        let good = read_join(&ledger_with("10.1.0.1", "K10abc::server:xyz"), "kairos")
            .unwrap()
            .unwrap();
        assert_eq!(good.0, "10.1.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(good.1.expose(), "K10abc::server:xyz");
        let via_go = read_join(
            &ledger_with(&go("fd00::1"), &go("K10abc::server:xyz")),
            "kairos",
        );
        assert!(matches!(via_go, Ok(Some(_))), "{via_go:?}");
        for (ip, token) in [
            ("10.1.0.1\r\nExecStart=/bin/sh -c id", "K10abc::server:xyz"),
            ("10.1.0.1\rExecStart=/bin/sh", "K10abc::server:xyz"),
            ("evil.example", "K10abc::server:xyz"),
            ("10.1.0.1", "K10abc\r\nExecStart=/bin/sh"),
            ("10.1.0.1", "K10 abc"),
        ] {
            for (ip, token) in [(ip.to_string(), token.to_string()), (go(ip), go(token))] {
                let got = read_join(&ledger_with(&ip, &token), "kairos");
                assert!(got.is_err(), "{ip:?} {token:?}: {got:?}");
            }
        }
    }

    #[test]
    fn ip_master_is_the_eip_and_nodes_join_the_master_address() {
        let node: IpAddr = "10.1.0.1".parse().unwrap();
        let eip: IpAddr = "192.168.1.50".parse().unwrap();
        assert_eq!(ip_master(node, None), "10.1.0.1");
        assert_eq!(ip_master(node, Some(eip)), "192.168.1.50");

        let mut ledger = Ledger::new(Limits::for_max_message_size(1 << 20));
        assert_eq!(join_address(&ledger, "kairos"), None);
        apply(
            &mut ledger,
            &[Write::put("kairos", names::IP_MASTER, "192.168.1.50")],
        );
        assert_eq!(
            join_address(&ledger, "kairos").as_deref(),
            Some("192.168.1.50"),
            "no master address known: ip-master"
        );
        let go = |s: &str| serde_json::to_string(&edgevpn::client_segment(s)).unwrap();
        apply(
            &mut ledger,
            &[
                Write::put("kairos", "m1-role", go("master")),
                Write::put("kairos", "w1-role", "worker"),
                Write::put("kairos", "w1-ip", "10.1.0.3"),
            ],
        );
        assert_eq!(
            join_address(&ledger, "kairos").as_deref(),
            Some("192.168.1.50"),
            "the master wrote no <uuid>-ip"
        );
        let w = node_ip_write(&ledger, "kairos", "m1", node).unwrap();
        apply(&mut ledger, &[w]);
        assert_eq!(node_ip_write(&ledger, "kairos", "m1", node), None, "once");
        assert_eq!(join_address(&ledger, "kairos").as_deref(), Some("10.1.0.1"));
        // HA: the cluster-init server is the one joined.
        apply(
            &mut ledger,
            &[
                Write::put("kairos", "a0-role", "master/clusterinit"),
                Write::put("kairos", "a0-ip", "10.1.0.9"),
            ],
        );
        assert_eq!(join_address(&ledger, "kairos").as_deref(), Some("10.1.0.9"));
    }

    #[test]
    fn missing_files_are_named() {
        let r = root("missing");
        let e = read_join_data(&r, "10.1.0.1").unwrap_err();
        assert!(e.contains("node-token"), "{e}");
        files::write(&r.path(NODE_TOKEN_FILE), b"tok", 0o600).unwrap();
        let e = read_join_data(&r, "10.1.0.1").unwrap_err();
        assert!(e.contains("k3s.yaml"), "{e}");
        std::fs::remove_dir_all(r.dir()).unwrap();
    }
}
