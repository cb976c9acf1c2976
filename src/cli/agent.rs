//! `kairos-p2p agent`: load the configuration, bring the node up and run the event loop.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use super::args::AgentArgs;
use super::{EXIT_FAILURE, EXIT_USAGE, load_config};
use crate::api::trust::BEARER_TOKEN_FILE;
use crate::cluster::{Cluster, ClusterSettings};
use crate::config::Config;
use crate::dns::DnsSettings;
use crate::driver::api::ApiSettings;
use crate::driver::dns::DnsDriverSettings;
use crate::driver::tun::TunSettings;
use crate::driver::{self, DriverSettings};
use crate::identity::{self, Identity, PeerId};
use crate::ledger::Ledger;
use crate::node::bootstrap::{BootstrapHost, BootstrapPeer};
use crate::node::{Node, NodeSettings};
use crate::token::NetworkToken;
use crate::vpn::VpnSettings;
use crate::{host, logging};

/// The ledger snapshot in the state directory.
pub const LEDGER_FILE: &str = "ledger.snapshot";
/// The API's unix socket in the state directory.
pub const API_SOCKET: &str = "api.sock";

/// QUIC packets per batch the transport may build for the driver's UDP GSO sends: 32 packets
/// of at most 1452 bytes (the transport's `initial_mtu`) make 46 KiB, within UDP's 64 KiB.
/// Measured against 16 (issue 16): about 15 % less CPU per GB and more throughput; 64 would
/// overflow a UDP datagram at 1452-byte packets.
pub(super) const GSO_BATCH: usize = 32;

/// Runs the agent until a signal stops it.
pub(super) fn run(args: &AgentArgs, state_dir: Option<PathBuf>) -> ExitCode {
    let (cfg, host_facts) = match load_config(args.config.clone()) {
        Ok(loaded) => loaded,
        Err(code) => return code,
    };
    logging::init(logging::effective_level(
        cfg.p2p.loglevel.level_filter(),
        std::env::var(logging::LOG_ENV).ok().as_deref(),
    ));
    let Some(token) = cfg.p2p.network_token.clone() else {
        log::info!("p2p.network_token is not set: nothing to do (P2P is off)");
        return ExitCode::SUCCESS;
    };
    let state_dir =
        identity::resolve_state_dir(state_dir, std::env::var(identity::STATE_DIR_ENV).ok());
    let identity = match Identity::load_or_create(&state_dir) {
        Ok(identity) => identity,
        Err(e) => {
            log::error!("{e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let uuid = host::node_uuid(std::env::var("UUID").ok(), &host_facts);
    log::info!("node {uuid} in network {:?}", cfg.p2p.network_id);

    let mut settings = NodeSettings::for_token(&token);
    settings.lan = cfg.p2p.vpn.settings.mdns;
    settings.dht = cfg.p2p.vpn.settings.dht;
    settings.bootstrap = resolve_bootstrap(&cfg);
    if settings.dht && settings.bootstrap.is_empty() {
        log::info!("DHT on without bootstrap peers: it grows from the LAN neighbours found");
    }
    let cluster_settings = ClusterSettings::from_config(
        &cfg.p2p,
        &uuid,
        &host_facts.hostname,
        token.max_message_size,
    );
    let ledger_path = state_dir.join(LEDGER_FILE);
    let mut node = match start_node(&identity, &token, settings, cluster_settings, &ledger_path) {
        Ok(node) => node,
        Err(code) => return code,
    };
    let vpn = &cfg.p2p.vpn;
    if vpn.create {
        node.attach_vpn(VpnSettings {
            local: vpn.settings.address,
            mtu: vpn.settings.mtu,
        });
    } else {
        log::info!("p2p.vpn.create is false: no VPN interface (the overlay and the API run)");
    }
    let driver_settings = DriverSettings {
        listen: args.listen,
        lan: vpn.settings.mdns,
        exclude_interfaces: vec![vpn.settings.iface.clone()],
        ledger_path: Some(ledger_path),
        api: api_settings(vpn.settings.api_listen, &state_dir),
        tun: vpn.create.then(|| TunSettings {
            name: vpn.settings.iface.clone(),
            mtu: vpn.settings.mtu,
            offload: crate::driver::tun::offload_from_env(),
        }),
        report_connected: false,
        k3s: crate::k3s::K3sSettings::from_env(&cfg, &uuid, &state_dir),
        dns: cfg.p2p.dns_listen().map(|listen| DnsDriverSettings {
            listen,
            service: DnsSettings {
                forward: vpn.settings.dns_forward,
                servers: vpn.settings.dns_forward_servers.clone(),
                cache_size: vpn.settings.dns_cache_size,
            },
        }),
    };
    run_driver(node, &driver_settings)
}

/// The API on loopback TCP at `tcp`, on the state directory's socket and on Kairos' socket
/// (under `KAIROS_P2P_ROOT`), with the bearer token kept in the state directory.
pub(super) fn api_settings(tcp: SocketAddr, state_dir: &Path) -> ApiSettings {
    let kairos_socket = super::client::kairos_socket();
    // `/run` exists; a test's root may not have it yet.
    if let Some(dir) = kairos_socket.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    ApiSettings {
        tcp: Some(tcp),
        socket: Some(state_dir.join(API_SOCKET)),
        kairos_socket: Some(kairos_socket),
        token_file: Some(state_dir.join(BEARER_TOKEN_FILE)),
    }
}

/// A node with its cluster layer, the ledger loaded from `ledger_path` (empty if unreadable).
pub(super) fn start_node(
    identity: &Identity,
    token: &NetworkToken,
    settings: NodeSettings,
    cluster_settings: ClusterSettings,
    ledger_path: &Path,
) -> Result<Node, ExitCode> {
    let seed = getrandom::u64().map_err(|e| {
        log::error!("system random generator failed: {e}");
        ExitCode::from(EXIT_FAILURE)
    })?;
    let mut settings = settings;
    // The driver sends the transport's batches with UDP GSO (one system call per batch).
    settings.transport.max_gso_segments = GSO_BATCH;
    settings.watch_liveness(cluster_settings.liveness_timeout);
    let mut node = Node::new(identity, token, settings, seed).map_err(|e| {
        log::error!("cannot start the overlay: {e}");
        ExitCode::from(EXIT_USAGE)
    })?;
    let stale = Ledger::remove_stale_temporaries(ledger_path);
    if stale > 0 {
        log::info!("removed {stale} temporary ledger file(s) left by an interrupted save");
    }
    let ledger = match Ledger::load(ledger_path, cluster_settings.ledger_limits) {
        Ok(ledger) => ledger,
        Err(e) => {
            // Nothing is lost that the peers do not hold: start empty and catch up from them.
            log::warn!("{e}; starting from an empty ledger (peers will resend it)");
            Ledger::new(cluster_settings.ledger_limits)
        }
    };
    log::info!(
        "ledger: {} entries from {}",
        ledger.len(),
        ledger_path.display()
    );
    node.attach_cluster(Cluster::new(
        identity,
        cluster_settings,
        ledger,
        seed ^ 0x5eed,
    ));
    Ok(node)
}

/// Runs the event loop until a signal; a failure is logged and becomes the exit status.
pub(super) fn run_driver(node: Node, settings: &DriverSettings) -> ExitCode {
    match driver::run(node, settings) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// Bootstrap peers from `p2p.bootstrap_peers` and `EDGEVPNBOOTSTRAPPEERS`; host names are
/// resolved once here (a static build resolves through /etc/hosts and DNS servers only where
/// glibc can without NSS modules: prefer addresses).
fn resolve_bootstrap(cfg: &Config) -> Vec<(SocketAddr, Option<PeerId>)> {
    let entries = cfg
        .p2p
        .bootstrap_peers
        .iter()
        .chain(&cfg.p2p.vpn.settings.bootstrap_peers);
    let mut out = Vec::new();
    for entry in entries {
        match resolve(entry) {
            Ok(addrs) => out.extend(addrs.into_iter().map(|a| (a, entry.peer))),
            Err(e) => log::warn!("bootstrap peer {entry}: {e}"),
        }
    }
    out.sort();
    out.dedup();
    out
}

fn resolve(entry: &BootstrapPeer) -> std::io::Result<Vec<SocketAddr>> {
    match &entry.host {
        BootstrapHost::Ip(ip) => Ok(vec![SocketAddr::new(*ip, entry.port)]),
        BootstrapHost::Name(name) => Ok((name.as_str(), entry.port).to_socket_addrs()?.collect()),
    }
}
