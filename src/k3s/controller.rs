//! The event-loop side of the k3s layer: a few cheap reads of the cluster layer per loop turn
//! (at most every [`CHECK_EVERY`]), a message to the worker thread when what it should run
//! changes, and the worker's reports applied: its state shown by the node, the master's join
//! data written to the ledger (ledger writes happen on this thread only).

use std::io;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mio::{Registry, Token, Waker};

use super::init;
use super::plan::Facts;
use super::publish::{self, JoinData};
use super::worker::{Command, Report, Timing, Want, Worker, WorkerSettings};
use super::{K3S_BIN_ENV, K3sRole, K3sState, ROOT_ENV, Root};
use crate::cluster::Cluster;
use crate::config::{Config, Role};
use crate::ledger::names;
use crate::node::Node;

/// How often the cluster layer is read for changes (reports are applied at once).
pub const CHECK_EVERY: Duration = Duration::from_millis(250);
/// How long a refused publication waits before it is tried again.
const PUBLISH_RETRY: Duration = Duration::from_secs(5);
/// How long a LAN address lookup is reused.
const LAN_CACHE: Duration = Duration::from_secs(5);

/// How this node runs k3s.
#[derive(Debug, Clone)]
pub struct K3sSettings {
    /// The worker's settings.
    pub worker: WorkerSettings,
    /// This node's uuid.
    pub uuid: String,
    /// The cluster bucket (`p2p.network_id`).
    pub bucket: String,
    /// `p2p.vpn.use`: k3s runs over the VPN.
    pub use_vpn: bool,
    /// The VPN interface (`IFACE`).
    pub vpn_iface: String,
}

impl K3sSettings {
    /// The settings for an agent with `cfg`, from the environment (`KAIROS_P2P_ROOT`,
    /// `KAIROS_P2P_K3S`, `PATH`); `None` when this node runs no k3s (`p2p.role: none`).
    pub fn from_env(cfg: &Config, uuid: &str, state_dir: &Path) -> Option<Self> {
        if cfg.p2p.role == Role::None {
            return None;
        }
        let root = Root::from_env(std::env::var(ROOT_ENV).ok());
        let init = init::detect(&root);
        log::info!(
            "k3s: init system {init}, system paths under {}",
            root.dir().display()
        );
        Some(Self {
            worker: WorkerSettings {
                config: cfg.clone(),
                state_dir: state_dir.to_path_buf(),
                root,
                init,
                binary: std::env::var_os(K3S_BIN_ENV)
                    .filter(|v| !v.is_empty())
                    .map(Into::into),
                path: std::env::var_os("PATH"),
                timing: Timing::default(),
            },
            uuid: uuid.to_string(),
            bucket: names::network_bucket(&cfg.p2p.network_id).to_string(),
            use_vpn: cfg.p2p.vpn.use_vpn && cfg.p2p.vpn.create,
            vpn_iface: cfg.p2p.vpn.settings.iface.clone(),
        })
    }
}

/// The k3s layer as the event loop holds it. Dropping it stops the worker (and a supervised
/// k3s) and waits for the thread.
pub struct K3s {
    settings: K3sSettings,
    commands: Sender<Command>,
    reports: Receiver<Report>,
    thread: Option<JoinHandle<()>>,
    state: K3sState,
    sent: Option<Want>,
    next_check: Option<Instant>,
    /// When the loop must wake for the next check (see [`K3s::poll_timeout`]).
    wake_at: Option<Instant>,
    lan: Option<(Instant, Option<(String, IpAddr)>)>,
    /// What this master publishes (the worker's last report): kept, and written again whenever
    /// the ledger lost it (a deletion, a wiped peer's stale view).
    published: Option<JoinData>,
    /// The last refusal of a publication, logged once.
    publish_note: Option<String>,
    /// After a refusal, the next attempt.
    publish_after: Option<Instant>,
    role_note: Option<String>,
    /// [`Cluster::left_clusters`] as last acted on.
    left_seen: u64,
}

impl K3s {
    /// Starts the worker thread; it wakes the loop through a [`Waker`] on `token`.
    pub fn start(settings: K3sSettings, registry: &Registry, token: Token) -> io::Result<Self> {
        let waker = Arc::new(Waker::new(registry, token)?);
        let (commands, worker_rx) = mpsc::channel();
        let (worker_tx, reports) = mpsc::channel();
        let worker = Worker::new(settings.worker.clone(), worker_tx, waker);
        let thread = std::thread::Builder::new()
            .name("k3s".to_string())
            .spawn(move || worker.run(worker_rx))?;
        Ok(Self {
            settings,
            commands,
            reports,
            thread: Some(thread),
            state: K3sState::WaitingForRole,
            sent: None,
            next_check: None,
            wake_at: None,
            lan: None,
            published: None,
            publish_note: None,
            publish_after: None,
            role_note: None,
            left_seen: 0,
        })
    }

    /// Where k3s stands.
    pub fn state(&self) -> &K3sState {
        &self.state
    }

    /// One loop turn: applies the worker's reports, and (at most every [`CHECK_EVERY`]) tells
    /// the worker what to run when that changed.
    pub fn turn(&mut self, node: &mut Node, now: Instant) {
        let mut news = false;
        loop {
            match self.reports.try_recv() {
                Ok(Report::State(s)) => {
                    self.state = s;
                    news = true;
                }
                Ok(Report::Publish(data)) => {
                    self.published = Some(data);
                    news = true;
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    if !matches!(self.state, K3sState::Failed(_)) {
                        self.state = K3sState::Failed("the k3s worker thread ended".into());
                        news = true;
                    }
                    break;
                }
            }
        }
        if !news && self.next_check.is_some_and(|t| now < t) {
            return;
        }
        self.next_check = Some(now + CHECK_EVERY);
        self.wake_at = None;
        self.publish(node, now);
        let Some(cluster) = node.cluster() else {
            return;
        };
        if cluster.left_clusters() > self.left_seen {
            // Sent before any new role's want: the worker handles its commands in order.
            self.left_seen = cluster.left_clusters();
            if self.commands.send(Command::LeaveCluster).is_ok() {
                self.sent = None;
                self.published = None;
                self.state = K3sState::WaitingForRole;
            }
        }
        // This node's `<uuid>-ip`, written through the node's one write path below.
        let mut ip_write = None;
        // Two clusters being merged: the committed master may flip meanwhile; k3s keeps the
        // master it joined until the loser's servers have left.
        let hold = cluster.merging() && self.sent.is_some();
        match self.want(cluster, now) {
            Ok(_) | Err(_) if hold => {}
            Ok(want) => {
                self.role_note = None;
                let bucket = &self.settings.bucket;
                let ip = want.facts.node_ip;
                ip_write =
                    publish::node_ip_write(cluster.ledger(), bucket, &self.settings.uuid, ip);
                if self.sent.as_ref() != Some(&want) {
                    log::info!(
                        "k3s: {} on {} ({})",
                        want.facts.role,
                        want.facts.node_ip,
                        want.facts.iface
                    );
                    if self.commands.send(Command::Apply(want.clone())).is_ok() {
                        self.sent = Some(want);
                    }
                }
            }
            Err(waiting) if self.sent.is_none() => self.state = waiting,
            Err(waiting) => {
                // k3s is set up already: roles are sticky, nothing is undone.
                let note = waiting.to_string();
                if self.role_note.as_ref() != Some(&note) {
                    log::warn!("k3s keeps running as set up, although now: {note}");
                    self.role_note = Some(note);
                }
            }
        }
        if let Some(w) = ip_write {
            let unix_ms = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
            if let Err(e) = node.write(now, unix_ms, vec![w]) {
                log::debug!(
                    "k3s: {} not written: {e}",
                    names::ip_key(&self.settings.uuid)
                );
            }
        }
        if node.k3s_state() != Some(&self.state) {
            node.set_k3s_state(Some(self.state.clone()));
        }
        // The master's join data or our address comes as ledger entries, with no event: look
        // again at the next check while waiting for them.
        if matches!(
            self.state,
            K3sState::WaitingForAddress | K3sState::WaitingForMaster
        ) {
            self.wake_at = self.next_check;
        }
    }

    /// The cluster layer has news (a role, a master, an address): the next loop turn checks
    /// what k3s should run, without waiting for [`CHECK_EVERY`].
    pub fn check_soon(&mut self, now: Instant) {
        self.next_check = Some(now);
        self.wake_at = Some(now);
    }

    /// When the event loop must turn for this controller (`None`: only on its other wake-ups).
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.wake_at
    }

    /// Writes what this master publishes wherever the ledger does not hold it (the first time,
    /// and again after any loss), through the node's one write path.
    fn publish(&mut self, node: &mut Node, now: Instant) {
        if self.publish_after.is_some_and(|t| now < t) {
            return;
        }
        let (Some(data), Some(cluster)) = (&self.published, node.cluster()) else {
            return;
        };
        let writes = publish::writes(cluster.ledger(), &self.settings.bucket, data);
        if writes.is_empty() {
            return;
        }
        log::info!(
            "k3s: publishing {} of the node token, the kubeconfig and ip-master {} in {}",
            writes.len(),
            data.address,
            self.settings.bucket
        );
        let unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        match node.write(now, unix_ms, writes) {
            Ok(()) => {
                self.publish_note = None;
                self.publish_after = None;
            }
            Err(e) => {
                let note = e.to_string();
                if self.publish_note.as_ref() != Some(&note) {
                    log::warn!("k3s: cannot publish the join data: {note}");
                    self.publish_note = Some(note);
                }
                // Not ours to publish (yet: the commit may still be on its way).
                self.publish_after = Some(now + PUBLISH_RETRY);
            }
        }
    }

    /// What the worker should run, or the state that says what is missing.
    fn want(&mut self, cluster: &Cluster, now: Instant) -> Result<Want, K3sState> {
        let role = cluster
            .role()
            .and_then(K3sRole::parse)
            .ok_or(K3sState::WaitingForRole)?;
        let kv = self.settings.worker.config.kubevip.clone();
        let needs_lan = !self.settings.use_vpn || kv.enable;
        let lan = if needs_lan {
            self.lan(now, kv.interface.clone())
        } else {
            None
        };
        let (node_ip, iface) = if self.settings.use_vpn {
            let ip = cluster.address().ok_or(K3sState::WaitingForAddress)?;
            (IpAddr::V4(ip), self.settings.vpn_iface.clone())
        } else {
            let (name, ip) = lan.clone().ok_or(K3sState::WaitingForAddress)?;
            (ip, name)
        };
        let (master, node_token) = if role.joins() {
            let ledger = cluster.ledger();
            let bucket = &self.settings.bucket;
            // Parsed before anything reaches k3s: a value that is not an address or a token is
            // refused (and read again at the next check), never written into a unit file.
            match publish::read_join(ledger, bucket) {
                Ok(Some((master, token))) => (Some(master), Some(token)),
                Ok(None) => return Err(K3sState::WaitingForMaster),
                Err(e) => {
                    return Err(K3sState::Failed(format!("ledger join data refused: {e}")));
                }
            }
        } else {
            (None, None)
        };
        // ip-master is the EIP when KubeVIP is on, as with Kairos; nodes join the master's own
        // address (publish::join_address, see the publish module).
        let eip = if kv.enable { kv.eip } else { None };
        let publish_address = publish::ip_master(node_ip, eip);
        Ok(Want {
            facts: Facts {
                role,
                node_ip,
                iface,
                master,
                node_token,
                cluster_initialised: false,
            },
            publish_address,
            lan_iface: lan.map(|(n, _)| n).unwrap_or_default(),
        })
    }

    /// The LAN interface and address (cached for a few seconds).
    fn lan(&mut self, now: Instant, wanted: Option<String>) -> Option<(String, IpAddr)> {
        if let Some((at, found)) = &self.lan {
            if now < *at + LAN_CACHE {
                return found.clone();
            }
        }
        let found = lan_address(&self.settings.vpn_iface, wanted.as_deref());
        self.lan = Some((now, found.clone()));
        found
    }
}

impl Drop for K3s {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Stop);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                log::warn!("the k3s worker thread panicked");
            }
        }
    }
}

/// The LAN interface k3s uses without the VPN: `wanted` (`kubevip.interface`) if given, else
/// the interface of the default route, else the first interface with an IPv4 address; with its
/// first IPv4 address.
pub fn lan_address(vpn_iface: &str, wanted: Option<&str>) -> Option<(String, IpAddr)> {
    let addrs = match crate::driver::interfaces::list(&[vpn_iface]) {
        Ok(a) => a,
        Err(e) => {
            log::warn!("k3s: cannot list interfaces: {e}");
            return None;
        }
    };
    let name = wanted.map(str::to_string).or_else(|| {
        std::fs::read_to_string("/proc/net/route")
            .ok()
            .and_then(|t| default_route_iface(&t))
    });
    let on = |n: &str| addrs.iter().find(|a| a.name == n && a.ip.is_ipv4());
    name.as_deref()
        .and_then(on)
        .or_else(|| addrs.iter().find(|a| a.ip.is_ipv4()))
        .map(|a| (a.name.clone(), a.ip))
}

/// The interface of the IPv4 default route in `/proc/net/route`'s text.
pub fn default_route_iface(route_table: &str) -> Option<String> {
    route_table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.as_slice() {
            [iface, "00000000", _, _, _, _, _, "00000000", ..] => Some(iface.to_string()),
            _ => None,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_route_from_proc() {
        let table = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                     eth1\t0010A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
                     eth0\t00000000\t0101A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n";
        assert_eq!(default_route_iface(table).as_deref(), Some("eth0"));
        assert_eq!(default_route_iface("Iface\n"), None);
        assert_eq!(default_route_iface(""), None);
    }
}
