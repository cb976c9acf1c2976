//! The k3s command line and environment of a node: pure functions of the configuration, the
//! role and what the ledger says about the master.
//!
//! As provider-kairos, with two deliberate differences: `external_db` keeps the VPN and KubeVIP
//! flags (Kairos drops them), and the `k3s-agent` block applies to workers whether or not its
//! `enabled` is set. `--cluster-init` is given to the first HA server only until its datastore
//! exists ([`Facts::cluster_initialised`]); k3s finds its etcd data by itself afterwards.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use sha2::{Digest, Sha256};

use super::value::{self, K3sToken, ValueError};
use super::{API_PORT, K3sRole};
use crate::config::{Config, K3sConfig};

/// What the plan depends on besides the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Facts {
    /// This node's role.
    pub role: K3sRole,
    /// The address k3s uses (`--node-ip`): the VPN address with `vpn.use`, else the LAN one.
    pub node_ip: IpAddr,
    /// The interface flannel uses (`--flannel-iface`): the VPN interface with `vpn.use`, else
    /// the LAN one.
    pub iface: String,
    /// The master's address from the ledger (`ip-master`, parsed), for nodes that join.
    pub master: Option<IpAddr>,
    /// The master's node token from the ledger (`token-nodetoken`, parsed), for nodes that join.
    pub node_token: Option<K3sToken>,
    /// The cluster-init server already created its datastore once (marker in the state dir).
    pub cluster_initialised: bool,
}

/// The k3s invocation of a node.
#[derive(Clone, PartialEq, Eq)]
pub struct Plan {
    /// The role it is for.
    pub role: K3sRole,
    /// `server` or `agent` followed by the flags.
    pub args: Vec<String>,
    /// The environment (K3S_URL, K3S_TOKEN and the user's).
    pub env: BTreeMap<String, String>,
}

impl fmt::Debug for Plan {
    /// Never shows the environment's values (K3S_TOKEN is a secret).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Plan")
            .field("role", &self.role)
            .field("args", &self.args)
            .field("env", &self.env.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Plan {
    /// The service name (`k3s` or `k3s-agent`).
    pub fn service(&self) -> &'static str {
        self.role.service()
    }

    /// A hash of everything the plan runs (role, arguments, environment), hex: recorded in the
    /// deployed marker to know whether a node already runs this plan.
    pub fn hash(&self) -> String {
        let mut h = Sha256::new();
        h.update(self.role.as_str().as_bytes());
        for a in &self.args {
            h.update([0u8]);
            h.update(a.as_bytes());
        }
        for (k, v) in &self.env {
            h.update([1u8]);
            h.update(k.as_bytes());
            h.update([b'=']);
            h.update(v.as_bytes());
        }
        h.finalize()
            .iter()
            .take(16)
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// The arguments without the values of secret flags (`--token`), for logs.
    pub fn shown_args(&self) -> String {
        let mut out = Vec::with_capacity(self.args.len());
        let mut hide_next = false;
        for a in &self.args {
            if hide_next {
                out.push("<hidden>".to_string());
                hide_next = false;
            } else if let Some((flag, _)) = a.split_once('=').filter(|(f, _)| is_secret_flag(f)) {
                out.push(format!("{flag}=<hidden>"));
            } else {
                hide_next = is_secret_flag(a);
                out.push(a.clone());
            }
        }
        out.join(" ")
    }
}

fn is_secret_flag(flag: &str) -> bool {
    matches!(
        flag,
        "--token" | "-t" | "--agent-token" | "--datastore-endpoint"
    )
}

/// Why no plan can be made yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlanError {
    /// A joining node without the master's address.
    NoMasterAddress,
    /// A joining node without the node token.
    NoNodeToken,
    /// An argument or environment value (from the configuration) that cannot be written safely.
    Unsafe(ValueError),
}

impl fmt::Display for PlanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PlanError::NoMasterAddress => {
                write!(
                    f,
                    "the master's address (ip-master) is not in the ledger yet"
                )
            }
            PlanError::NoNodeToken => {
                write!(
                    f,
                    "the master's node token (token-nodetoken) is not in the ledger yet"
                )
            }
            PlanError::Unsafe(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for PlanError {}

/// The URL nodes join: `https://<master>:6443` (IPv6 bracketed).
pub fn server_url(master: IpAddr) -> String {
    match master {
        IpAddr::V6(v6) => format!("https://[{v6}]:{API_PORT}"),
        IpAddr::V4(v4) => format!("https://{v4}:{API_PORT}"),
    }
}

/// The plan of a node with `facts` under `cfg`. Every argument and environment entry is checked
/// to be free of control characters (the configuration refuses them already; this is the last
/// gate before command lines and unit files).
pub fn plan(cfg: &Config, facts: &Facts) -> Result<Plan, PlanError> {
    let plan = unchecked_plan(cfg, facts)?;
    for (i, arg) in plan.args.iter().enumerate() {
        value::check_text(|| format!("k3s argument {i}"), arg).map_err(PlanError::Unsafe)?;
    }
    for (name, v) in &plan.env {
        value::check_text(|| "a k3s environment variable name".to_string(), name)
            .map_err(PlanError::Unsafe)?;
        value::check_text(|| format!("k3s environment variable {name}"), v)
            .map_err(PlanError::Unsafe)?;
    }
    Ok(plan)
}

fn unchecked_plan(cfg: &Config, facts: &Facts) -> Result<Plan, PlanError> {
    let join = if facts.role.joins() {
        let master = facts.master.ok_or(PlanError::NoMasterAddress)?;
        let token = facts.node_token.as_ref().ok_or(PlanError::NoNodeToken)?;
        Some((server_url(master), token.expose().to_string()))
    } else {
        None
    };
    let node_ip = format!("--node-ip={}", facts.node_ip);
    let iface = format!("--flannel-iface={}", facts.iface);
    let (ours_args, ours_env, user): (Vec<String>, BTreeMap<String, String>, &K3sConfig) = if facts
        .role
        .is_server()
    {
        let mut args = vec!["server".to_string(), node_ip, iface];
        if cfg.kubevip.enable {
            if let Some(eip) = cfg.kubevip.eip {
                args.push(format!("--tls-san={eip}"));
            }
        }
        if cfg.k3s.embedded_registry {
            args.push("--embedded-registry".to_string());
        }
        let external_db = cfg.p2p.auto.ha.external_db.as_deref();
        if let Some(db) = external_db {
            args.push(format!("--datastore-endpoint={db}"));
        }
        if facts.role == K3sRole::ClusterInit && external_db.is_none() && !facts.cluster_initialised
        {
            args.push("--cluster-init".to_string());
        }
        let mut env = BTreeMap::new();
        if let Some((url, token)) = join {
            args.push(format!("--server={url}"));
            env.insert("K3S_TOKEN".to_string(), token);
        }
        (args, env, &cfg.k3s)
    } else {
        let args = vec![
            "agent".to_string(),
            "--with-node-id".to_string(),
            node_ip,
            iface,
        ];
        let mut env = BTreeMap::new();
        if let Some((url, token)) = join {
            env.insert("K3S_URL".to_string(), url);
            env.insert("K3S_TOKEN".to_string(), token);
        }
        (args, env, &cfg.k3s_agent)
    };
    let args = if user.replace_args {
        let mut args = vec![ours_args[0].clone()];
        args.extend(user.args.iter().cloned());
        args
    } else {
        let mut args = ours_args;
        args.extend(user.args.iter().cloned());
        args
    };
    let env = if user.replace_env {
        user.env.clone()
    } else {
        let mut env = ours_env;
        env.extend(user.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        env
    };
    Ok(Plan {
        role: facts.role,
        args,
        env,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{self, HostFacts};
    use std::path::Path;

    fn cfg(extra: &str) -> Config {
        let text = format!("#cloud-config\np2p:\n  network_id: test\n{extra}");
        config::parse(&[(Path::new("t.yaml"), &text)], &HostFacts::default())
            .unwrap_or_else(|e| panic!("{e}\n{text}"))
    }

    fn facts(role: K3sRole) -> Facts {
        Facts {
            role,
            node_ip: "10.1.0.5".parse().unwrap(),
            iface: "edgevpn0".to_string(),
            master: Some("10.1.0.1".parse().unwrap()),
            node_token: Some(K3sToken::parse("K10abc::server:def\n").unwrap()),
            cluster_initialised: false,
        }
    }

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// (name, config lines, role, expected args, expected env).
    type Case<'a> = (
        &'a str,
        &'a str,
        K3sRole,
        Vec<&'a str>,
        Vec<(&'a str, &'a str)>,
    );

    #[test]
    fn plans() {
        use K3sRole::*;
        let base = ["--node-ip=10.1.0.5", "--flannel-iface=edgevpn0"];
        let join = [("K3S_TOKEN", "K10abc::server:def")];
        let worker_env = [
            ("K3S_TOKEN", "K10abc::server:def"),
            ("K3S_URL", "https://10.1.0.1:6443"),
        ];
        let kubevip = "kubevip:\n  eip: 192.168.1.50\n";
        let ha = "  auto:\n    ha:\n      master_nodes: 2\n";
        let db = "  auto:\n    ha:\n      master_nodes: 2\n      external_db: mysql://u:p@tcp(db:3306)/k3s\n";
        let k3s_user = "k3s:\n  args: [--disable=traefik]\n  env: {K3S_KUBECONFIG_MODE: '0644'}\n";
        let replace = "k3s:\n  args: [--disable=traefik]\n  replace_args: true\n  env: {A: b}\n  replace_env: true\n";
        let agent_user = "k3s-agent:\n  args: [--node-label=x=y]\n  env: {K3S_NODE_NAME: n1}\n";
        let db_vip = format!("{db}{kubevip}");
        let both_users = format!("{k3s_user}{agent_user}");
        let cases: Vec<Case> = vec![
            (
                "plain master",
                "",
                Master,
                [&["server"][..], &base].concat(),
                vec![],
            ),
            (
                "cluster-init",
                ha,
                ClusterInit,
                [&["server"][..], &base, &["--cluster-init"]].concat(),
                vec![],
            ),
            (
                "ha master joins",
                ha,
                HaMaster,
                [&["server"][..], &base, &["--server=https://10.1.0.1:6443"]].concat(),
                join.to_vec(),
            ),
            (
                "kubevip master",
                kubevip,
                Master,
                [&["server"][..], &base, &["--tls-san=192.168.1.50"]].concat(),
                vec![],
            ),
            (
                "external db keeps vpn and kubevip flags, no cluster-init",
                &db_vip,
                ClusterInit,
                [
                    &["server"][..],
                    &base,
                    &[
                        "--tls-san=192.168.1.50",
                        "--datastore-endpoint=mysql://u:p@tcp(db:3306)/k3s",
                    ],
                ]
                .concat(),
                vec![],
            ),
            (
                "external db ha master",
                db,
                HaMaster,
                [
                    &["server"][..],
                    &base,
                    &[
                        "--datastore-endpoint=mysql://u:p@tcp(db:3306)/k3s",
                        "--server=https://10.1.0.1:6443",
                    ],
                ]
                .concat(),
                join.to_vec(),
            ),
            (
                "user args and env appended",
                k3s_user,
                Master,
                [&["server"][..], &base, &["--disable=traefik"]].concat(),
                vec![("K3S_KUBECONFIG_MODE", "0644")],
            ),
            (
                "replace_args and replace_env",
                replace,
                HaMaster,
                vec!["server", "--disable=traefik"],
                vec![("A", "b")],
            ),
            (
                "worker",
                "",
                Worker,
                [&["agent", "--with-node-id"][..], &base].concat(),
                worker_env.to_vec(),
            ),
            (
                "worker ignores the k3s block, takes k3s-agent",
                &both_users,
                Worker,
                [
                    &["agent", "--with-node-id"][..],
                    &base,
                    &["--node-label=x=y"],
                ]
                .concat(),
                [&worker_env[..], &[("K3S_NODE_NAME", "n1")]].concat(),
            ),
            (
                "embedded registry",
                "k3s:\n  embedded_registry: true\n",
                Master,
                [&["server"][..], &base, &["--embedded-registry"]].concat(),
                vec![],
            ),
        ];
        for (name, extra, role, args, want_env) in cases {
            let c = cfg(extra);
            let p = plan(&c, &facts(role)).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(p.args, args, "{name}");
            assert_eq!(p.env, env(&want_env), "{name}");
            assert_eq!(p.role, role, "{name}");
        }
    }

    #[test]
    fn lan_facts_and_initialised_cluster() {
        let c = cfg("  vpn:\n    use: false\n  auto:\n    ha:\n      master_nodes: 1\n");
        let f = Facts {
            node_ip: "192.168.1.7".parse().unwrap(),
            iface: "eth0".into(),
            cluster_initialised: true,
            ..facts(K3sRole::ClusterInit)
        };
        let p = plan(&c, &f).unwrap();
        assert_eq!(
            p.args,
            ["server", "--node-ip=192.168.1.7", "--flannel-iface=eth0"]
        );
    }

    #[test]
    fn joining_needs_master_data() {
        let c = cfg("");
        for role in [K3sRole::HaMaster, K3sRole::Worker] {
            let f = Facts {
                master: None,
                ..facts(role)
            };
            assert_eq!(plan(&c, &f), Err(PlanError::NoMasterAddress));
            let f = Facts {
                node_token: None,
                ..facts(role)
            };
            assert_eq!(plan(&c, &f), Err(PlanError::NoNodeToken));
        }
        // Masters need neither.
        let f = Facts {
            master: None,
            node_token: None,
            ..facts(K3sRole::Master)
        };
        assert!(plan(&c, &f).is_ok());
    }

    #[test]
    fn ipv6_urls_and_hashes() {
        assert_eq!(
            server_url("fd00::1".parse().unwrap()),
            "https://[fd00::1]:6443"
        );
        assert_eq!(
            server_url("10.1.0.1".parse().unwrap()),
            "https://10.1.0.1:6443"
        );
        let c = cfg("");
        let a = plan(&c, &facts(K3sRole::Worker)).unwrap();
        let mut b = a.clone();
        assert_eq!(a.hash(), b.hash());
        assert_eq!(a.hash().len(), 32);
        b.env.insert("K3S_TOKEN".into(), "other".into());
        assert_ne!(a.hash(), b.hash());
        assert!(!format!("{a:?}").contains("K10abc"));
    }

    /// The configuration refuses control characters in k3s args and env; a plan refuses them too
    /// (the last gate), whatever put them in the configuration.
    #[test]
    fn control_characters_never_reach_a_plan() {
        let refused = [
            "k3s:\n  args: [\"--node-label=a\\rExecStart=/bin/sh\"]\n",
            "k3s-agent:\n  env: {K3S_NODE_NAME: \"n\\nExecStart=/bin/sh\"}\n",
            "p2p:\n  auto:\n    ha:\n      external_db: \"db\\r\"\n",
            "kubevip:\n  eip: 10.0.0.9\n  image: \"img\\n\"\n",
            "kubevip:\n  eip: 10.0.0.9\n  version: \"v1\\u0085\"\n",
        ];
        for extra in refused {
            let text =
                format!("p2p:\n  network_id: t\n{extra}").replacen("p2p:\n  auto", "  auto", 1);
            let e = config::parse(&[(Path::new("t.yaml"), &text)], &HostFacts::default())
                .expect_err(extra);
            assert!(e.to_string().contains("control characters"), "{extra}: {e}");
        }
        let mut c = cfg("");
        c.k3s_agent.args.push("--x=\r".into());
        let e = plan(&c, &facts(K3sRole::Worker)).unwrap_err();
        assert!(matches!(e, PlanError::Unsafe(_)), "{e}");
        let mut c = cfg("");
        c.k3s.env.insert("A".into(), "\n".into());
        assert!(matches!(
            plan(&c, &facts(K3sRole::Master)),
            Err(PlanError::Unsafe(_))
        ));
    }

    #[test]
    fn secret_flags_are_hidden_in_logs() {
        let p = Plan {
            role: K3sRole::Master,
            args: vec![
                "server".into(),
                "--token".into(),
                "s3cret".into(),
                "--datastore-endpoint=postgres://u:pw@db".into(),
                "--node-ip=1.2.3.4".into(),
            ],
            env: BTreeMap::new(),
        };
        let shown = p.shown_args();
        assert!(
            !shown.contains("s3cret") && !shown.contains("pw@"),
            "{shown}"
        );
        assert!(shown.contains("--node-ip=1.2.3.4"));
    }
}
