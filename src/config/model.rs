//! The typed configuration, every default resolved, and the resolution of merged file settings
//! into it.

use crate::node::bootstrap::BootstrapPeer;
use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::str::FromStr;

use super::diag::Diagnostics;
use super::effective;
use super::layer::{K3sLayer, Layer};
use super::vpn_env::VpnSettings;
use crate::token::NetworkToken;

/// Default `p2p.network_id`: the ledger bucket of the cluster.
pub const DEFAULT_NETWORK_ID: &str = "kairos";
/// Effective `p2p.minimum_nodes` when it is 0 or unset.
pub const DEFAULT_MINIMUM_NODES: u32 = 2;
/// Effective `p2p.liveness_timeout` (seconds) when it is 0 or unset.
pub const DEFAULT_LIVENESS_TIMEOUT_SECS: u64 = 60;
/// `p2p.auto.merge_window` (seconds) when unset: splits younger than this are merged.
pub const DEFAULT_MERGE_WINDOW_SECS: u64 = 600;
/// Default `kubevip.image`.
pub const DEFAULT_KUBEVIP_IMAGE: &str = "ghcr.io/kube-vip/kube-vip";

/// The effective configuration read from the cloud-config files. `Debug` never shows the
/// token's secrets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The files read, in order (later ones override earlier ones).
    pub sources: Vec<PathBuf>,
    /// The `p2p` block (with the legacy `kairos.network_token`).
    pub p2p: P2pConfig,
    /// The `kubevip` block.
    pub kubevip: KubeVipConfig,
    /// The `k3s` block (server nodes).
    pub k3s: K3sConfig,
    /// The `k3s-agent` block (agent nodes).
    pub k3s_agent: K3sConfig,
    /// Things worth telling the user that do not stop the agent, one message each.
    pub warnings: Vec<String>,
}

/// The `p2p` block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct P2pConfig {
    /// The decoded network token; `None` when p2p (automatic mode) is off.
    pub network_token: Option<NetworkToken>,
    /// Names the cluster (ledger bucket); several clusters may share one token.
    pub network_id: String,
    /// The role this node asks for.
    pub role: Role,
    /// LAN-only discovery: no DHT.
    pub disable_dht: bool,
    /// `p2p.bootstrap_peers` (ours): DHT bootstrap peers, added to `EDGEVPNBOOTSTRAPPEERS`.
    pub bootstrap_peers: Vec<BootstrapPeer>,
    /// Nodes to wait for before forming the cluster (0 in the file means 2).
    pub minimum_nodes: u32,
    /// Let the leader change roles after they are set.
    pub dynamic_roles: bool,
    /// `p2p.liveness_timeout`: seconds after which a node that stopped answering (last heard by
    /// its connections) counts as dead (default 60; 0 means the default; see
    /// `cluster::liveness`).
    pub liveness_timeout: u64,
    /// Serve DNS for the VPN.
    pub dns: bool,
    /// Agent log level.
    pub loglevel: LogLevel,
    /// `p2p.vpn`.
    pub vpn: VpnConfig,
    /// `p2p.auto`.
    pub auto: AutoConfig,
}

impl P2pConfig {
    /// Whether p2p is on: a network token is set.
    pub fn is_enabled(&self) -> bool {
        self.network_token.is_some()
    }

    /// Where the DNS service listens: `DNSADDRESS`, else `127.0.0.1:53` with `p2p.dns: true`
    /// (what Kairos sets), else nowhere.
    pub fn dns_listen(&self) -> Option<std::net::SocketAddr> {
        self.vpn.settings.dns_address.or_else(|| {
            self.dns
                .then(|| std::net::SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, 53)))
        })
    }
}

/// `p2p.vpn`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VpnConfig {
    /// Create the VPN.
    pub create: bool,
    /// Use the VPN for k3s (only when it is created).
    pub use_vpn: bool,
    /// `p2p.vpn.env`, typed.
    pub settings: VpnSettings,
}

/// `p2p.auto`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AutoConfig {
    /// Automatic role assignment.
    pub enable: bool,
    /// `p2p.auto.merge_window`: seconds; two clusters that both formed within this window of
    /// each other's discovery are merged automatically (the one committed first wins); 0 never
    /// merges. Default [`DEFAULT_MERGE_WINDOW_SECS`].
    pub merge_window: u64,
    /// `p2p.auto.ha` (or its alias `p2p.ha`).
    pub ha: HaConfig,
}

/// `p2p.auto.ha`. `Debug` hides the credentials of `external_db`.
#[derive(Clone, PartialEq, Eq)]
pub struct HaConfig {
    /// HA control plane; on by default when `master_nodes` > 0.
    pub enable: bool,
    /// Masters in addition to the cluster-init one.
    pub master_nodes: u32,
    /// External datastore endpoint, instead of embedded etcd.
    pub external_db: Option<String>,
}

/// The `kubevip` block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeVipConfig {
    /// Deploy KubeVIP; on by default when `eip` is set.
    pub enable: bool,
    /// The virtual IP of the control plane.
    pub eip: Option<IpAddr>,
    /// Interface for the VIP; `None`: KubeVIP's choice.
    pub interface: Option<String>,
    /// Manifest to download; `None`: the built-in one.
    pub manifest_url: Option<String>,
    /// Run KubeVIP as a static pod instead of a DaemonSet.
    pub static_pod: bool,
    /// KubeVIP version; `None`: the agent's default.
    pub version: Option<String>,
    /// KubeVIP image.
    pub image: String,
}

/// The `k3s` and `k3s-agent` blocks. `Debug` hides secret values (`K3S_TOKEN`, `--token`,
/// datastore credentials) as the printed effective configuration does.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct K3sConfig {
    /// Run k3s without p2p (standalone Kairos).
    pub enabled: bool,
    /// Extra arguments (appended, or replacing ours with `replace_args`).
    pub args: Vec<String>,
    /// Extra environment (added, or replacing ours with `replace_env`).
    pub env: BTreeMap<String, String>,
    /// `args` replace the arguments kairos-p2p computes.
    pub replace_args: bool,
    /// `env` replaces the environment kairos-p2p computes.
    pub replace_env: bool,
    /// Enable k3s' embedded registry mirror.
    pub embedded_registry: bool,
}

impl fmt::Debug for HaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HaConfig")
            .field("enable", &self.enable)
            .field("master_nodes", &self.master_nodes)
            .field(
                "external_db",
                &self.external_db.as_deref().map(effective::redact_dsn),
            )
            .finish()
    }
}

impl fmt::Debug for K3sConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let env: BTreeMap<&str, String> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), effective::redact_value(k, v)))
            .collect();
        f.debug_struct("K3sConfig")
            .field("enabled", &self.enabled)
            .field("args", &effective::redact_args(&self.args))
            .field("env", &env)
            .field("replace_args", &self.replace_args)
            .field("replace_env", &self.replace_env)
            .field("embedded_registry", &self.embedded_registry)
            .finish()
    }
}

/// The role a node asks for (`p2p.role`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Role {
    /// No role asked for (`""`, unset or `auto`): the leader decides.
    #[default]
    Auto,
    /// A k3s server.
    Master,
    /// A k3s agent.
    Worker,
    /// Neither: the node only joins the VPN.
    None,
}

impl Role {
    /// The role as written in configs (`auto` for [`Role::Auto`]).
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Auto => "auto",
            Role::Master => "master",
            Role::Worker => "worker",
            Role::None => "none",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;

    /// The roles Kairos' P2P mode runs, as it spells them (lower case): `master`,
    /// `master/clusterinit` and `master/ha` (both a server: the election places it, see the
    /// README), `worker`, `none`, or `""`/`auto`.
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "" | "auto" => Ok(Role::Auto),
            "master" | "master/clusterinit" | "master/ha" => Ok(Role::Master),
            "worker" => Ok(Role::Worker),
            "none" => Ok(Role::None),
            _ => {
                let lower = s.trim().to_ascii_lowercase();
                let hint = if lower != s.trim() && Role::from_str(&lower).is_ok() {
                    " (roles are lower case: Kairos runs no role for it either)"
                } else {
                    ""
                };
                Err(format!(
                    "expected master, master/clusterinit, master/ha, worker, none or \"\" \
                     (automatic), found {}{hint}",
                    super::read::quote(s)
                ))
            }
        }
    }
}

/// The agent's log level (`p2p.loglevel`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum LogLevel {
    /// Everything.
    Trace,
    /// Debugging detail.
    Debug,
    /// Normal operation (default).
    #[default]
    Info,
    /// Problems that do not stop the agent.
    Warn,
    /// Errors.
    Error,
    /// Errors (Kairos' `fatal`, logged as errors).
    Fatal,
}

impl LogLevel {
    /// The level's name.
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Trace => "trace",
            LogLevel::Debug => "debug",
            LogLevel::Info => "info",
            LogLevel::Warn => "warn",
            LogLevel::Error => "error",
            LogLevel::Fatal => "fatal",
        }
    }

    /// The `log` crate filter for this level.
    pub fn level_filter(self) -> log::LevelFilter {
        match self {
            LogLevel::Trace => log::LevelFilter::Trace,
            LogLevel::Debug => log::LevelFilter::Debug,
            LogLevel::Info => log::LevelFilter::Info,
            LogLevel::Warn => log::LevelFilter::Warn,
            LogLevel::Error | LogLevel::Fatal => log::LevelFilter::Error,
        }
    }
}

impl fmt::Display for LogLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for LogLevel {
    type Err = String;

    /// trace, debug, info, warn/warning, error, fatal (any case); `""` is `info`.
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "trace" => Ok(LogLevel::Trace),
            "debug" => Ok(LogLevel::Debug),
            "" | "info" => Ok(LogLevel::Info),
            "warn" | "warning" => Ok(LogLevel::Warn),
            "error" => Ok(LogLevel::Error),
            "fatal" => Ok(LogLevel::Fatal),
            _ => Err(format!(
                "expected trace, debug, info, warn, error or fatal, found {}",
                super::read::quote(s)
            )),
        }
    }
}

/// The configuration of the merged `layer`, defaults filled in; cross-field problems are
/// recorded in `diags`.
pub(super) fn resolve(layer: Layer, sources: Vec<PathBuf>, diags: &mut Diagnostics) -> Config {
    let Layer {
        p2p,
        kairos_token,
        kubevip,
        k3s,
        k3s_agent,
    } = layer;

    let network_token = match (p2p.network_token.flatten(), kairos_token) {
        (Some(token), Some(legacy)) => {
            if legacy.value.is_some() {
                diags.warn(legacy.origin, "ignored: p2p.network_token is set");
            }
            Some(token)
        }
        (None, Some(legacy)) => {
            if legacy.value.is_some() {
                diags.warn(
                    legacy.origin,
                    "the kairos block is deprecated, move the token to p2p.network_token",
                );
            }
            legacy.value
        }
        (token, None) => token,
    };

    let create = p2p.vpn_create.unwrap_or(true);
    let use_vpn = match p2p.vpn_use {
        Some(u) => {
            if u.value && !create {
                diags.warn(u.origin, "has no effect: p2p.vpn.create is false");
            }
            u.value && create
        }
        None => create,
    };
    let disable_dht = p2p.disable_dht.unwrap_or(false);
    let master_nodes = p2p.ha.master_nodes.unwrap_or(0);

    let eip = kubevip.eip.flatten();
    let kubevip_enable = match kubevip.enable {
        Some(e) => {
            if e.value && eip.is_none() {
                diags.error(e.origin, "KubeVIP is enabled but kubevip.eip is not set");
            }
            e.value
        }
        None => eip.is_some(),
    };

    Config {
        sources,
        p2p: P2pConfig {
            network_token,
            network_id: non_empty(p2p.network_id).unwrap_or_else(|| DEFAULT_NETWORK_ID.to_owned()),
            role: p2p.role.unwrap_or_default(),
            disable_dht,
            bootstrap_peers: p2p.bootstrap_peers.unwrap_or_default(),
            minimum_nodes: match p2p.minimum_nodes.unwrap_or(0) {
                0 => DEFAULT_MINIMUM_NODES,
                n => n,
            },
            dynamic_roles: p2p.dynamic_roles.unwrap_or(false),
            liveness_timeout: match p2p.liveness_timeout.unwrap_or(0) {
                0 => DEFAULT_LIVENESS_TIMEOUT_SECS,
                n => u64::from(n),
            },
            dns: p2p.dns.unwrap_or(false),
            loglevel: p2p.loglevel.unwrap_or_default(),
            vpn: VpnConfig {
                create,
                use_vpn,
                settings: p2p.vpn_env.resolve(disable_dht, diags),
            },
            auto: AutoConfig {
                enable: p2p.auto_enable.unwrap_or(true),
                merge_window: p2p
                    .merge_window
                    .map_or(DEFAULT_MERGE_WINDOW_SECS, u64::from),
                ha: HaConfig {
                    enable: p2p.ha.enable.unwrap_or(master_nodes > 0),
                    master_nodes,
                    external_db: non_empty(p2p.ha.external_db),
                },
            },
        },
        kubevip: KubeVipConfig {
            enable: kubevip_enable,
            eip,
            interface: non_empty(kubevip.interface),
            manifest_url: non_empty(kubevip.manifest_url),
            static_pod: kubevip.static_pod.unwrap_or(false),
            version: non_empty(kubevip.version),
            image: non_empty(kubevip.image).unwrap_or_else(|| DEFAULT_KUBEVIP_IMAGE.to_owned()),
        },
        k3s: resolve_k3s(k3s),
        k3s_agent: resolve_k3s(k3s_agent),
        warnings: Vec::new(),
    }
}

fn resolve_k3s(k: K3sLayer) -> K3sConfig {
    K3sConfig {
        enabled: k.enabled.unwrap_or(false),
        args: k.args.unwrap_or_default(),
        env: k.env,
        replace_args: k.replace_args.unwrap_or(false),
        replace_env: k.replace_env.unwrap_or(false),
        embedded_registry: k.embedded_registry.unwrap_or(false),
    }
}

/// `s` unless it is empty (an empty string in a file means "the default").
fn non_empty(s: Option<String>) -> Option<String> {
    s.filter(|s| !s.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles() {
        assert_eq!("".parse(), Ok(Role::Auto));
        assert_eq!("master".parse(), Ok(Role::Master));
        assert_eq!("master/ha".parse(), Ok(Role::Master));
        assert_eq!("master/clusterinit".parse(), Ok(Role::Master));
        assert_eq!(
            "Master".parse::<Role>(),
            Err(
                "expected master, master/clusterinit, master/ha, worker, none or \"\" \
                 (automatic), found \"Master\" (roles are lower case: Kairos runs no role for \
                 it either)"
                    .to_owned()
            )
        );
        assert_eq!("worker".parse(), Ok(Role::Worker));
        assert_eq!("none".parse(), Ok(Role::None));
        assert_eq!("auto".parse(), Ok(Role::Auto));
        assert_eq!(
            "mastr".parse::<Role>(),
            Err(
                "expected master, master/clusterinit, master/ha, worker, none or \"\" \
                 (automatic), found \"mastr\""
                    .to_owned()
            )
        );
        assert_eq!(Role::None.to_string(), "none");
    }

    #[test]
    fn log_levels() {
        for (s, l) in [
            ("trace", LogLevel::Trace),
            ("DEBUG", LogLevel::Debug),
            ("", LogLevel::Info),
            ("Warning", LogLevel::Warn),
            ("warn", LogLevel::Warn),
            ("error", LogLevel::Error),
            ("fatal", LogLevel::Fatal),
        ] {
            assert_eq!(s.parse(), Ok(l));
        }
        assert!("verbose".parse::<LogLevel>().is_err());
        assert_eq!(LogLevel::Fatal.level_filter(), log::LevelFilter::Error);
        assert_eq!(LogLevel::default().to_string(), "info");
    }

    #[test]
    fn empty_layer_gives_documented_defaults() {
        let mut diags = Diagnostics::default();
        let c = resolve(Layer::default(), Vec::new(), &mut diags);
        assert_eq!(diags.finish(&[]), (vec![], vec![]));
        assert!(!c.p2p.is_enabled());
        assert_eq!(c.p2p.network_id, "kairos");
        assert_eq!(c.p2p.role, Role::Auto);
        assert_eq!(c.p2p.minimum_nodes, 2);
        assert_eq!(c.p2p.loglevel, LogLevel::Info);
        assert!(c.p2p.vpn.create && c.p2p.vpn.use_vpn);
        assert_eq!(c.p2p.vpn.settings, VpnSettings::default());
        assert!(c.p2p.auto.enable);
        assert_eq!(
            c.p2p.auto.ha,
            HaConfig {
                enable: false,
                master_nodes: 0,
                external_db: None
            }
        );
        assert!(!c.kubevip.enable);
        assert_eq!(c.kubevip.image, DEFAULT_KUBEVIP_IMAGE);
        assert_eq!(c.k3s, K3sConfig::default());
        assert!(format!("{:?}", c.p2p).contains("network_token: None"));
    }
}
