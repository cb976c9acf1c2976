//! The k3s layer: turns the role the cluster gave this node into a running k3s server or agent,
//! and publishes the master's join data in the ledger.
//!
//! - [`plan`]: the k3s command line and environment, pure functions of the configuration, the
//!   role and ledger facts.
//! - [`controller`]: the event-loop side. Every loop turn it reads the role, the VPN address and
//!   the master's published data from the cluster layer, sends the worker what it wants, applies
//!   the worker's reports (ledger writes are done here, never by the worker).
//! - [`worker`]: the one thread that performs the blocking steps (files, `systemctl`/`rc-service`
//!   or the supervised child, the wait for the API) and answers through a channel and a
//!   [`mio::Waker`].
//! - [`init`], [`supervise`], [`marker`], [`kubevip`], [`publish`]: the pieces it uses.
//!
//! Every system path goes through a [`Root`] (env [`ROOT_ENV`], default `/`), so tests and the
//! demo run with a temporary root.

pub mod controller;
pub mod files;
pub mod init;
pub mod kubevip;
pub mod marker;
pub mod plan;
pub mod publish;
pub mod supervise;
pub mod value;
pub mod worker;

use std::fmt;
use std::path::{Path, PathBuf};

pub use controller::{K3s, K3sSettings};

/// Environment variable: the root prefix of every system path the agent reads or writes.
pub const ROOT_ENV: &str = "KAIROS_P2P_ROOT";
/// Environment variable: the k3s binary (else `k3s` on `PATH`).
pub const K3S_BIN_ENV: &str = "KAIROS_P2P_K3S";

/// k3s' kubeconfig (points at `https://127.0.0.1:6443`).
pub const K3S_YAML: &str = "/etc/rancher/k3s/k3s.yaml";
/// The server's node token (the join secret).
pub const NODE_TOKEN_FILE: &str = "/var/lib/rancher/k3s/server/node-token";
/// Manifests k3s applies at start and on change (KubeVIP RBAC and DaemonSet).
pub const MANIFESTS_DIR: &str = "/var/lib/rancher/k3s/server/manifests";
/// Static pods the kubelet runs (KubeVIP with `static_pod`).
pub const POD_MANIFESTS_DIR: &str = "/var/lib/rancher/k3s/agent/pod-manifests";
/// k3s' data directory when `--data-dir` is not given.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/rancher/k3s";
/// The k3s API port.
pub const API_PORT: u16 = 6443;

/// The k3s role of this node, from the cluster's role string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum K3sRole {
    /// `master`: the only server of a cluster without HA.
    Master,
    /// `master/clusterinit`: the first server of an HA cluster.
    ClusterInit,
    /// `master/ha`: an additional server joining the first.
    HaMaster,
    /// `worker`: a k3s agent.
    Worker,
}

impl K3sRole {
    /// The role for a ledger role string (`None` for anything else).
    pub fn parse(role: &str) -> Option<Self> {
        match role.trim() {
            "master" => Some(K3sRole::Master),
            "master/clusterinit" => Some(K3sRole::ClusterInit),
            "master/ha" => Some(K3sRole::HaMaster),
            "worker" => Some(K3sRole::Worker),
            _ => None,
        }
    }

    /// The ledger role string.
    pub fn as_str(self) -> &'static str {
        match self {
            K3sRole::Master => "master",
            K3sRole::ClusterInit => "master/clusterinit",
            K3sRole::HaMaster => "master/ha",
            K3sRole::Worker => "worker",
        }
    }

    /// Runs `k3s server`.
    pub fn is_server(self) -> bool {
        self != K3sRole::Worker
    }

    /// Publishes the join data (node token, address, kubeconfig).
    pub fn publishes(self) -> bool {
        matches!(self, K3sRole::Master | K3sRole::ClusterInit)
    }

    /// Joins another server: needs the master's address and node token first.
    pub fn joins(self) -> bool {
        matches!(self, K3sRole::HaMaster | K3sRole::Worker)
    }

    /// The service name (`k3s` or `k3s-agent`).
    pub fn service(self) -> &'static str {
        if self.is_server() { "k3s" } else { "k3s-agent" }
    }
}

impl fmt::Display for K3sRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where this node's k3s stands.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum K3sState {
    /// No role yet (or `role: none`).
    #[default]
    WaitingForRole,
    /// A role, but not yet the address k3s must use (the VPN address is not settled).
    WaitingForAddress,
    /// HA master or worker waiting for the master's node token and address in the ledger.
    WaitingForMaster,
    /// Being set up or started, or waiting for its API.
    Starting,
    /// Supervised by the agent and running (the child's pid).
    Running {
        /// The k3s process id.
        pid: u32,
    },
    /// Set up and handed to the init system (systemd or OpenRC), API up for servers.
    Deployed,
    /// Something failed; retried periodically.
    Failed(String),
}

impl K3sState {
    /// Every state name, as the `state` label of `kairos_p2p_k3s_state`.
    pub const NAMES: [&'static str; 7] = [
        "waiting-for-role",
        "waiting-for-address",
        "waiting-for-master",
        "starting",
        "running",
        "deployed",
        "failed",
    ];

    /// The state's name (one of [`K3sState::NAMES`]).
    pub fn name(&self) -> &'static str {
        match self {
            K3sState::WaitingForRole => "waiting-for-role",
            K3sState::WaitingForAddress => "waiting-for-address",
            K3sState::WaitingForMaster => "waiting-for-master",
            K3sState::Starting => "starting",
            K3sState::Running { .. } => "running",
            K3sState::Deployed => "deployed",
            K3sState::Failed(_) => "failed",
        }
    }
}

impl fmt::Display for K3sState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            K3sState::Running { pid } => write!(f, "running (pid {pid})"),
            K3sState::Failed(why) => write!(f, "failed: {why}"),
            other => f.write_str(other.name()),
        }
    }
}

/// The root prefix of every system path (`KAIROS_P2P_ROOT`, default `/`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Root(PathBuf);

impl Root {
    /// The root at `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Root(dir.into())
    }

    /// The root named by `KAIROS_P2P_ROOT`'s value (unset or empty: `/`).
    pub fn from_env(value: Option<String>) -> Self {
        match value.filter(|v| !v.is_empty()) {
            Some(v) => Root(PathBuf::from(v)),
            None => Root(PathBuf::from("/")),
        }
    }

    /// The root directory.
    pub fn dir(&self) -> &Path {
        &self.0
    }

    /// Whether this is the real root `/`.
    pub fn is_real(&self) -> bool {
        self.0 == Path::new("/")
    }

    /// The system path `abs` (e.g. `/etc/rancher/k3s/k3s.yaml`) under this root.
    pub fn path(&self, abs: impl AsRef<Path>) -> PathBuf {
        let abs = abs.as_ref();
        let relative = abs.strip_prefix("/").unwrap_or(abs);
        self.0.join(relative)
    }
}

/// k3s' data directory for the server's arguments `args` (`k3s.args`): the last `--data-dir` /
/// `-d` value, else [`DEFAULT_DATA_DIR`]. A relative or empty value is ignored (k3s would read it
/// relative to its working directory, which kairos-p2p cannot know).
pub fn data_dir(args: &[String]) -> PathBuf {
    let mut found: Option<&str> = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let a = a.trim();
        let value = if let Some(v) = a
            .strip_prefix("--data-dir=")
            .or_else(|| a.strip_prefix("-d="))
        {
            Some(v)
        } else if a == "--data-dir" || a == "-d" {
            it.next().map(|v| v.trim())
        } else {
            None
        };
        if let Some(v) = value.filter(|v| v.starts_with('/')) {
            found = Some(v);
        }
    }
    PathBuf::from(found.unwrap_or(DEFAULT_DATA_DIR))
}

/// Moves the server part of k3s' data directory (`<data_dir>/server`: datastore, certificates,
/// tokens) under `root` aside to `<data_dir>/server.left-<unix_secs>` (a suffix `-2`, `-3`...
/// when taken), keeping it. `Ok(None)` when there is none.
pub fn move_server_data_aside(
    root: &Root,
    data_dir: &Path,
    unix_secs: u64,
) -> Result<Option<PathBuf>, String> {
    let server = root.path(data_dir.join("server"));
    if std::fs::symlink_metadata(&server).is_err() {
        return Ok(None);
    }
    let base = root.path(data_dir.join(format!("server.left-{unix_secs}")));
    let mut target = base.clone();
    let mut n = 1;
    while std::fs::symlink_metadata(&target).is_ok() {
        n += 1;
        if n > 1000 {
            return Err(format!("no free name next to {}", base.display()));
        }
        target = PathBuf::from(format!("{}-{n}", base.display()));
    }
    std::fs::rename(&server, &target).map_err(|e| {
        format!(
            "cannot move {} aside to {}: {e}",
            server.display(),
            target.display()
        )
    })?;
    Ok(Some(target))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_dir_from_args() {
        let a = |v: &[&str]| data_dir(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(a(&[]), Path::new(DEFAULT_DATA_DIR));
        assert_eq!(a(&["--data-dir=/srv/k3s"]), Path::new("/srv/k3s"));
        assert_eq!(a(&["--node-label", "x=y", "-d", "/d"]), Path::new("/d"));
        assert_eq!(a(&["--data-dir", "relative"]), Path::new(DEFAULT_DATA_DIR));
    }

    #[test]
    fn server_data_is_moved_aside_and_kept() {
        let dir = std::env::temp_dir().join(format!("kp2p-aside-{}", std::process::id()));
        let root = Root::new(&dir);
        let data = Path::new(DEFAULT_DATA_DIR);
        assert_eq!(move_server_data_aside(&root, data, 7).unwrap(), None);
        let token = root.path(NODE_TOKEN_FILE);
        std::fs::create_dir_all(token.parent().unwrap()).unwrap();
        std::fs::write(&token, "K10x").unwrap();
        let first = move_server_data_aside(&root, data, 7).unwrap().unwrap();
        assert!(
            first.ends_with("var/lib/rancher/k3s/server.left-7"),
            "{first:?}"
        );
        assert!(first.join("node-token").exists() && !token.exists());
        std::fs::create_dir_all(token.parent().unwrap()).unwrap();
        let second = move_server_data_aside(&root, data, 7).unwrap().unwrap();
        assert!(second.ends_with("server.left-7-2"), "{second:?}");
        assert!(first.join("node-token").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn roles_round_trip() {
        for role in [
            K3sRole::Master,
            K3sRole::ClusterInit,
            K3sRole::HaMaster,
            K3sRole::Worker,
        ] {
            assert_eq!(K3sRole::parse(role.as_str()), Some(role));
        }
        assert_eq!(K3sRole::parse("none"), None);
        assert_eq!(K3sRole::parse(""), None);
        assert_eq!(K3sRole::Worker.service(), "k3s-agent");
        assert_eq!(K3sRole::HaMaster.service(), "k3s");
    }

    #[test]
    fn root_prefixes_paths() {
        let root = Root::from_env(Some("/tmp/r".into()));
        assert_eq!(
            root.path(K3S_YAML),
            Path::new("/tmp/r/etc/rancher/k3s/k3s.yaml")
        );
        let real = Root::from_env(None);
        assert!(real.is_real());
        assert_eq!(real.path(NODE_TOKEN_FILE), Path::new(NODE_TOKEN_FILE));
        assert_eq!(Root::from_env(Some(String::new())), real);
    }

    #[test]
    fn state_names_are_listed() {
        for s in [
            K3sState::WaitingForRole,
            K3sState::WaitingForAddress,
            K3sState::WaitingForMaster,
            K3sState::Starting,
            K3sState::Running { pid: 1 },
            K3sState::Deployed,
            K3sState::Failed("x".into()),
        ] {
            assert!(K3sState::NAMES.contains(&s.name()));
        }
        assert_eq!(K3sState::Running { pid: 7 }.to_string(), "running (pid 7)");
    }
}
