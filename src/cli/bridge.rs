//! `kairos-p2p bridge`: a workstation joins the network as a VPN peer without a cluster role
//! (TUN `kairos0`, address `10.1.0.254/24`, API on `127.0.0.1:8080`, as Kairos' bridge).
//!
//! The bridge is a node like the others with `p2p.role: none`: it follows the ledger (so
//! `get-kubeconfig` and `role list` work through its API), announces its static VPN address in
//! `machines` (so nodes route to it and accept its packets), and is never elected nor given a
//! role. Its key and ledger live in `<state dir>/bridge`, apart from an agent's on the same
//! machine, so it keeps its peer id, and its address, across restarts.

use std::path::PathBuf;
use std::process::ExitCode;

use super::agent::{API_SOCKET, LEDGER_FILE, run_driver, start_node};
use super::args::BridgeArgs;
use super::{EXIT_FAILURE, EXIT_USAGE};
use crate::cluster::ipam::IpamSettings;
use crate::cluster::{ClusterSettings, DEFAULT_SETTLE};
use crate::config::{MTU_RANGE, Role};
use crate::driver::DriverSettings;
use crate::driver::tun::TunSettings;
use crate::identity::{self, Identity};
use crate::ledger::names;
use crate::node::NodeSettings;
use crate::token::NetworkToken;
use crate::vpn::VpnSettings;
use crate::{host, logging};

/// Environment variables the token is read from when `--network-token` is not given, in order.
pub const TOKEN_ENV: [&str; 2] = ["NETWORK_TOKEN", "EDGEVPNTOKEN"];
/// Subdirectory of the state directory holding the bridge's key and ledger.
pub const BRIDGE_STATE_SUBDIR: &str = "bridge";

/// Runs the bridge until a signal stops it.
pub(super) fn run(args: &BridgeArgs, state_dir: Option<PathBuf>) -> ExitCode {
    logging::init(logging::effective_level(
        log::LevelFilter::Info,
        std::env::var(logging::LOG_ENV).ok().as_deref(),
    ));
    let token = match token_text(args.network_token.as_deref(), |k| std::env::var(k).ok()) {
        Some(text) => match NetworkToken::decode(&text) {
            Ok(token) => token,
            Err(e) => {
                crate::errln!("bridge: the network token is not valid: {e}");
                return ExitCode::from(EXIT_USAGE);
            }
        },
        None => {
            crate::errln!(
                "bridge: no network token: pass --network-token TOKEN or set NETWORK_TOKEN \
                 (the p2p.network_token of the nodes' cloud-config)"
            );
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if let Err(message) = check_args(args) {
        crate::errln!("bridge: {message}");
        return ExitCode::from(EXIT_USAGE);
    }
    if !args.api.ip().is_loopback() {
        log::warn!(
            "the API listens on {}, which is not loopback: anyone who reaches it can read and \
             write the network's ledger",
            args.api
        );
    }
    let state_dir =
        identity::resolve_state_dir(state_dir, std::env::var(identity::STATE_DIR_ENV).ok())
            .join(BRIDGE_STATE_SUBDIR);
    let identity = match Identity::load_or_create(&state_dir) {
        Ok(identity) => identity,
        Err(e) => {
            crate::errln!("bridge: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let peer = identity.peer_id().to_string();
    let uuid = format!(
        "bridge-{}",
        peer.get(peer.len().saturating_sub(8)..).unwrap_or(&peer)
    );
    let hostname = host::read_host_facts().map_or_else(|_| uuid.clone(), |h| h.hostname);

    let mut settings = NodeSettings::for_token(&token);
    settings.dht = !args.disable_dht;
    let mut cluster = ClusterSettings::defaults(&uuid);
    cluster.network_id = names::network_bucket(&args.network_id).to_string();
    cluster.hostname = hostname.clone();
    cluster.role = Role::None;
    cluster.ipam = Some(IpamSettings {
        network: args.address,
        static_address: Some(args.address.addr),
        settle: DEFAULT_SETTLE,
        hostname,
    });
    cluster.max_message_bytes = usize::try_from(token.max_message_size).unwrap_or(usize::MAX);
    cluster.ledger_limits = crate::ledger::Limits::for_max_message_size(token.max_message_size);
    let ledger_path = state_dir.join(LEDGER_FILE);
    let mut node = match start_node(&identity, &token, settings, cluster, &ledger_path) {
        Ok(node) => node,
        Err(code) => return code,
    };
    node.attach_vpn(VpnSettings {
        local: args.address,
        mtu: args.mtu,
    });
    crate::errln!(
        "bridge: joining the network as {uuid} ({}), VPN {} on {}, API http://{}",
        identity.peer_id(),
        args.address,
        args.interface,
        args.api
    );
    let driver_settings = DriverSettings {
        listen: args.listen,
        lan: true,
        exclude_interfaces: vec![args.interface.clone()],
        ledger_path: Some(ledger_path),
        api_listen: Some(args.api),
        api_socket: Some(state_dir.join(API_SOCKET)),
        tun: Some(TunSettings {
            name: args.interface.clone(),
            mtu: args.mtu,
        }),
        report_connected: true,
        k3s: None,
    };
    run_driver(node, &driver_settings)
}

/// The token: the flag, else the first non-empty variable of [`TOKEN_ENV`].
fn token_text(flag: Option<&str>, env: impl Fn(&str) -> Option<String>) -> Option<String> {
    flag.map(str::to_string)
        .into_iter()
        .chain(TOKEN_ENV.iter().filter_map(|k| env(k)))
        .map(|t| t.trim().to_string())
        .find(|t| !t.is_empty())
}

/// Checks the flags that can be wrong.
fn check_args(args: &BridgeArgs) -> Result<(), String> {
    if !MTU_RANGE.contains(&args.mtu) {
        return Err(format!(
            "--mtu {} is outside {}..={}",
            args.mtu,
            MTU_RANGE.start(),
            MTU_RANGE.end()
        ));
    }
    if !args.api.ip().is_loopback() && !args.api_allow_remote {
        return Err(format!(
            "--api {} is not a loopback address; the API has no authentication: use \
             127.0.0.1:PORT, or add --api-allow-remote if you really want it reachable",
            args.api
        ));
    }
    let name = &args.interface;
    if name.is_empty() || name.len() > 15 || name.contains(['/', ' ']) {
        return Err(format!(
            "--interface {name:?} is not a valid interface name (1 to 15 characters)"
        ));
    }
    if args.address.prefix_len > 30 {
        return Err(format!(
            "--address {}: the VPN prefix must hold other nodes (at most /30)",
            args.address
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use argh::FromArgs;

    fn parse(extra: &[&str]) -> BridgeArgs {
        BridgeArgs::from_args(&["bridge"], extra).expect("arguments parse")
    }

    #[test]
    fn defaults_are_kairos_bridge_defaults() {
        let a = parse(&[]);
        assert_eq!(a.interface, "kairos0");
        assert_eq!(a.address.to_string(), "10.1.0.254/24");
        assert_eq!(a.api.to_string(), "127.0.0.1:8080");
        assert_eq!(a.network_id, "kairos");
        assert!(check_args(&a).is_ok());
    }

    #[test]
    fn token_comes_from_flag_then_environment() {
        let env = |k: &str| match k {
            "NETWORK_TOKEN" => Some("from-network-token".to_string()),
            "EDGEVPNTOKEN" => Some("from-edgevpn".to_string()),
            _ => None,
        };
        let only_edgevpn = |k: &str| (k == "EDGEVPNTOKEN").then(|| "from-edgevpn".to_string());
        let blank = |k: &str| (k == "NETWORK_TOKEN").then(|| "  ".to_string());
        type Env<'a> = &'a dyn Fn(&str) -> Option<String>;
        let cases: [(Option<&str>, Env, Option<&str>); 5] = [
            (Some("flag"), &env, Some("flag")),
            (None, &env, Some("from-network-token")),
            (None, &only_edgevpn, Some("from-edgevpn")),
            (None, &blank, None),
            (Some(""), &|_: &str| None, None),
        ];
        for (flag, env, want) in cases {
            assert_eq!(token_text(flag, env).as_deref(), want, "{flag:?}");
        }
    }

    #[test]
    fn bad_flags_are_named() {
        let cases: [(&[&str], &str); 4] = [
            (&["--mtu", "100"], "--mtu 100"),
            (&["--api", "0.0.0.0:8080"], "--api-allow-remote"),
            (
                &["--interface", "a-very-long-interface-name"],
                "--interface",
            ),
            (&["--address", "10.1.0.1/31"], "at most /30"),
        ];
        for (flags, needle) in cases {
            let err = check_args(&parse(flags)).expect_err(needle);
            assert!(err.contains(needle), "{err}");
        }
        assert!(check_args(&parse(&["--api", "0.0.0.0:8080", "--api-allow-remote"])).is_ok());
    }
}
