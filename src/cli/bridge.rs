//! `kairos-p2p bridge`: a workstation joins the network as a VPN peer without a cluster role
//! (TUN `kairos0`, address `10.1.0.254/24`, API on `127.0.0.1:8080`, as Kairos' bridge).
//!
//! The bridge is a node like the others with `p2p.role: none`: it follows the ledger (so
//! `get-kubeconfig` and `role list` work through its API), announces its static VPN address in
//! `machines` (so nodes route to it and accept its packets), and is never elected nor given a
//! role. Its key and ledger live in `<state dir>/bridge`, apart from an agent's on the same
//! machine, so it keeps its peer id, and its address, across restarts.

use std::io::{self, BufRead as _, IsTerminal as _, Read as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use super::agent::{LEDGER_FILE, api_settings, run_driver, start_node};
use super::args::BridgeArgs;
use super::{EXIT_FAILURE, EXIT_USAGE};
use crate::cluster::ipam::IpamSettings;
use crate::cluster::{ClusterSettings, DEFAULT_SETTLE};
use crate::config::{LogLevel, MTU_RANGE, Role};
use crate::driver::DriverSettings;
use crate::driver::tun::TunSettings;
use crate::identity::{self, Identity};
use crate::ledger::names;
use crate::node::NodeSettings;
use crate::token::{MAX_TOKEN_LEN, NetworkToken};
use crate::vpn::VpnSettings;
use crate::{host, logging};

/// Environment variables the token is read from when no token option is given, in order.
pub const TOKEN_ENV: [&str; 2] = ["NETWORK_TOKEN", "EDGEVPNTOKEN"];
/// Subdirectory of the state directory holding the bridge's key and ledger.
pub const BRIDGE_STATE_SUBDIR: &str = "bridge";

/// Runs the bridge until a signal stops it.
pub(super) fn run(args: &BridgeArgs, state_dir: Option<PathBuf>) -> ExitCode {
    let level = match log_level(
        args.log_level.as_deref(),
        std::env::var(logging::LOG_ENV).ok(),
    ) {
        Ok(level) => level,
        Err(message) => {
            crate::errln!("bridge: {message}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    logging::init(level);
    if let Some(on_argv) = args.token.as_deref().or(args.network_token.as_deref()) {
        match scrub_argv(on_argv) {
            Ok(n) => log::debug!("network token scrubbed from {n} place(s) of the command line"),
            Err(e) => log::warn!("cannot scrub the network token from the command line: {e}"),
        }
        log::warn!(
            "the network token was given on the command line, where other users could read it \
             until it was scrubbed: prefer --token-file FILE, $NETWORK_TOKEN or standard input"
        );
    }
    let stdin_usable = !std::io::stdin().is_terminal();
    let token = match token_text(args, |k| std::env::var(k).ok(), stdin_usable, read_secret) {
        Ok(text) => match NetworkToken::decode(&text) {
            Ok(token) => token,
            Err(e) => {
                crate::errln!("bridge: the network token is not valid: {e}");
                return ExitCode::from(EXIT_USAGE);
            }
        },
        Err(message) => {
            crate::errln!("bridge: {message}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if let Err(message) = check_args(args) {
        crate::errln!("bridge: {message}");
        return ExitCode::from(EXIT_USAGE);
    }
    if !args.api.ip().is_loopback() {
        log::warn!(
            "the API listens on {}, which is not loopback: anyone who reaches it can inspect \
             the network (writes and secrets need the bearer token)",
            args.api
        );
    }
    let state_dir = match &args.lease_dir {
        Some(dir) => dir.clone(),
        None => identity::resolve_state_dir(state_dir, std::env::var(identity::STATE_DIR_ENV).ok())
            .join(BRIDGE_STATE_SUBDIR),
    };
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
    // The driver sends the transport's batches with UDP GSO, as an agent's.
    settings.transport.max_gso_segments = super::agent::GSO_BATCH;
    let mut cluster = ClusterSettings::defaults(&uuid);
    cluster.network_id = names::network_bucket(&args.network_id).to_string();
    cluster.hostname = hostname.clone();
    cluster.role = Role::None;
    cluster.ipam = Some(IpamSettings {
        network: args.address,
        static_address: (!args.dhcp).then_some(args.address.addr),
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
    let vpn_address = if args.dhcp {
        format!(
            "address allocated in the /{} of {}",
            args.address.prefix_len, args.address.addr
        )
    } else {
        args.address.to_string()
    };
    crate::errln!(
        "bridge: joining the network as {uuid} ({}), VPN {vpn_address} on {} (MTU {}), API \
         http://{} (keys and lease in {})",
        identity.peer_id(),
        args.interface,
        args.mtu,
        args.api,
        state_dir.display()
    );
    let driver_settings = DriverSettings {
        listen: args.listen,
        lan: true,
        exclude_interfaces: vec![args.interface.clone()],
        ledger_path: Some(ledger_path),
        api: api_settings(args.api, &state_dir),
        tun: Some(TunSettings {
            name: args.interface.clone(),
            mtu: args.mtu,
            offload: crate::driver::tun::offload_from_env(),
        }),
        report_connected: true,
        k3s: None,
        dns: None,
    };
    run_driver(node, &driver_settings)
}

/// The bridge's log level: `--log-level`, else a valid `$KAIROS_P2P_LOG`, else info.
fn log_level(flag: Option<&str>, env: Option<String>) -> Result<log::LevelFilter, String> {
    match flag {
        Some(flag) => flag
            .parse::<LogLevel>()
            .map(LogLevel::level_filter)
            .map_err(|e| format!("--log-level: {e}")),
        None => Ok(logging::effective_level(
            log::LevelFilter::Info,
            env.as_deref(),
        )),
    }
}

/// The token text: `--token` (or `--network-token`), else `--token-file` (`-`: standard input),
/// else the first non-empty variable of [`TOKEN_ENV`], else standard input when it is not a
/// terminal. `read` reads a file, or standard input for `None`, bounded by [`MAX_TOKEN_LEN`].
fn token_text(
    args: &BridgeArgs,
    env: impl Fn(&str) -> Option<String>,
    stdin_usable: bool,
    read: impl Fn(Option<&Path>) -> io::Result<String>,
) -> Result<String, String> {
    let given = [
        args.token.is_some(),
        args.network_token.is_some(),
        args.token_file.is_some(),
    ];
    if given.iter().filter(|g| **g).count() > 1 {
        return Err("give the token once: --token, --network-token or --token-file".to_string());
    }
    let nonempty = |t: String| Some(t.trim().to_string()).filter(|t| !t.is_empty());
    let none = "no network token: pass --token-file FILE (or \"-\" for standard input), set \
                NETWORK_TOKEN, or pipe it in (the p2p.network_token of the nodes' cloud-config)";
    if let Some(t) = args.token.as_ref().or(args.network_token.as_ref()) {
        return nonempty(t.clone()).ok_or_else(|| "--token is empty".to_string());
    }
    if let Some(file) = &args.token_file {
        let source = (file != Path::new("-")).then_some(file.as_path());
        let text = read(source).map_err(|e| format!("--token-file {}: {e}", file.display()))?;
        return nonempty(text)
            .ok_or_else(|| format!("--token-file {}: no token in it", file.display()));
    }
    if let Some(t) = TOKEN_ENV.iter().filter_map(|k| env(k)).find_map(nonempty) {
        return Ok(t);
    }
    if !stdin_usable {
        return Err(none.to_string());
    }
    let text = read(None).map_err(|e| format!("standard input: {e}"))?;
    nonempty(text).ok_or_else(|| none.to_string())
}

/// Reads a secret from `path` (its first line from standard input for `None`), at most
/// [`MAX_TOKEN_LEN`] bytes.
fn read_secret(path: Option<&Path>) -> io::Result<String> {
    let limit = MAX_TOKEN_LEN as u64 + 1;
    let mut text = String::new();
    match path {
        Some(path) => std::fs::File::open(path)?
            .take(limit)
            .read_to_string(&mut text)?,
        // One line: a pipe or a terminal paste ends with a newline, not necessarily EOF.
        None => {
            crate::errln!("bridge: reading the network token from standard input (one line)");
            std::io::stdin().lock().take(limit).read_line(&mut text)?
        }
    };
    if text.len() > MAX_TOKEN_LEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("longer than a token can be ({MAX_TOKEN_LEN} bytes)"),
        ));
    }
    Ok(text)
}

/// Overwrites every copy of `secret` in this process's command line (the argv strings the
/// kernel serves as `/proc/self/cmdline` and `ps` shows) with `*`; returns how many.
fn scrub_argv(secret: &str) -> io::Result<usize> {
    let (start, end) =
        argv_span(&std::fs::read_to_string("/proc/self/stat")?).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "no argv span in /proc/self/stat",
            )
        })?;
    if secret.is_empty() || end <= start || end - start > MAX_ARGV_SPAN {
        return Ok(0);
    }
    // SAFETY: [arg_start, arg_end) holds this process's argv strings, on the initial stack:
    // mapped and writable for the whole life of the process. No Rust reference points into it
    // (std copies the strings out when asked for them), and the bridge is single-threaded here.
    let argv = unsafe { std::slice::from_raw_parts_mut(start as *mut u8, end - start) };
    Ok(scrub(argv, secret.as_bytes()))
}

/// Most bytes of command line scrubbed (Linux allows far more, but never for our flags).
const MAX_ARGV_SPAN: usize = 4 << 20;

/// `arg_start` and `arg_end`, fields 48 and 49 of `/proc/<pid>/stat` (Linux 3.5+).
fn argv_span(stat: &str) -> Option<(usize, usize)> {
    // The command name (field 2) may hold spaces and parentheses: count after its last ')'.
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace().skip(48 - 3);
    let start = fields.next()?.parse().ok()?;
    let end = fields.next()?.parse().ok()?;
    Some((start, end))
}

/// Overwrites each occurrence of `secret` in `bytes` with `*`; returns how many.
fn scrub(bytes: &mut [u8], secret: &[u8]) -> usize {
    let mut count = 0;
    let mut i = 0;
    while i + secret.len() <= bytes.len() {
        if bytes[i..i + secret.len()] == *secret {
            bytes[i..i + secret.len()].fill(b'*');
            count += 1;
            i += secret.len();
        } else {
            i += 1;
        }
    }
    count
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
            "--api {} is not a loopback address: anyone who reaches it can inspect the network \
             (writes and secrets need the bearer token, sent in clear over HTTP): use \
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
    fn token_comes_from_flag_file_environment_then_stdin() {
        let env = |k: &str| match k {
            "NETWORK_TOKEN" => Some("from-network-token".to_string()),
            "EDGEVPNTOKEN" => Some("from-edgevpn".to_string()),
            _ => None,
        };
        let only_edgevpn = |k: &str| (k == "EDGEVPNTOKEN").then(|| "from-edgevpn".to_string());
        let blank = |k: &str| (k == "NETWORK_TOKEN").then(|| "  ".to_string());
        let no_env = |_: &str| None;
        let read = |p: Option<&Path>| match p {
            Some(p) if p == Path::new("/t") => Ok("from-file\n".to_string()),
            Some(_) => Err(io::Error::from(io::ErrorKind::NotFound)),
            None => Ok(" from-stdin\n".to_string()),
        };
        type Env<'a> = &'a dyn Fn(&str) -> Option<String>;
        type Case<'a> = (&'a [&'a str], Env<'a>, bool, Result<&'a str, &'a str>);
        let cases: [Case; 11] = [
            (&["--token", "flag"], &env, true, Ok("flag")),
            (&["--network-token", "old"], &env, true, Ok("old")),
            (&["--token-file", "/t"], &env, true, Ok("from-file")),
            (&["--token-file", "-"], &env, false, Ok("from-stdin")),
            (
                &["--token-file", "/missing"],
                &env,
                true,
                Err("--token-file /missing"),
            ),
            (&[], &env, true, Ok("from-network-token")),
            (&[], &only_edgevpn, true, Ok("from-edgevpn")),
            (&[], &blank, true, Ok("from-stdin")),
            (&[], &no_env, false, Err("no network token")),
            (&["--token", " "], &no_env, true, Err("empty")),
            (
                &["--token", "a", "--token-file", "/t"],
                &env,
                true,
                Err("once"),
            ),
        ];
        for (flags, env, stdin, want) in cases {
            let got = token_text(&parse(flags), env, stdin, read);
            match (got, want) {
                (Ok(got), Ok(want)) => assert_eq!(got, want, "{flags:?}"),
                (Err(e), Err(want)) => assert!(e.contains(want), "{flags:?}: {e}"),
                (got, want) => panic!("{flags:?}: {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn argv_is_scrubbed_in_place() {
        let mut argv = b"kairos-p2p\0bridge\0--token\0SECRET\0--x\0SECRETSECRET\0".to_vec();
        assert_eq!(scrub(&mut argv, b"SECRET"), 3);
        assert_eq!(
            argv,
            b"kairos-p2p\0bridge\0--token\0******\0--x\0************\0".to_vec()
        );
        let stat = "42 (a (b) c) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 \
                    24 25 26 27 28 29 30 31 32 33 34 35 36 37 38 39 40 41 42 43 44 100 200 \
                    300 400 0";
        assert_eq!(argv_span(stat), Some((100, 200)));
        assert_eq!(argv_span("1 (x) S 2"), None);
    }

    /// The kernel serves this process's own span. (qemu-user synthesizes `/proc/self/stat`
    /// with 44 fields, so `make cross-test` skips this one: see `CROSS_UNIT_ARGS`.)
    #[test]
    fn own_argv_span_is_served_by_the_kernel() {
        let own = argv_span(&std::fs::read_to_string("/proc/self/stat").unwrap()).unwrap();
        assert!(own.1 > own.0);
    }

    #[test]
    fn log_level_from_flag_then_environment() {
        use log::LevelFilter;
        assert_eq!(log_level(Some("debug"), None), Ok(LevelFilter::Debug));
        assert_eq!(
            log_level(Some("warn"), Some("trace".into())),
            Ok(LevelFilter::Warn)
        );
        assert_eq!(
            log_level(None, Some("error".into())),
            Ok(LevelFilter::Error)
        );
        assert_eq!(log_level(None, None), Ok(LevelFilter::Info));
        assert!(
            log_level(Some("loud"), None)
                .unwrap_err()
                .contains("--log-level")
        );
    }

    #[test]
    fn dhcp_and_lease_dir_parse() {
        let a = parse(&["--dhcp", "--lease-dir", "/var/lib/lease", "--mtu", "1400"]);
        assert!(a.dhcp);
        assert_eq!(a.lease_dir.as_deref(), Some(Path::new("/var/lib/lease")));
        assert_eq!(a.mtu, 1400);
        assert_eq!(parse(&[]).mtu, 1200);
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
