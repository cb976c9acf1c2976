//! Command-line arguments (argh). Every option documents its default in its help line.

use std::net::SocketAddr;
use std::path::PathBuf;

use argh::FromArgs;

use crate::config::Ipv4Cidr;

/// kairos-p2p: a k3s cluster from one cloud-config, over an encrypted peer-to-peer network.
/// Also answers to the name `kairosctl`.
#[derive(FromArgs, Debug)]
#[argh(
    note = "kairosctl's spellings work too: `g` for generate-token, `c` for create-config, \
`--version` or `-v` for version."
)]
pub struct Cli {
    /// state directory holding the node key and ledger (default: $KAIROS_P2P_STATE_DIR, else
    /// /usr/local/.kairos-p2p)
    #[argh(option)]
    pub state_dir: Option<PathBuf>,

    #[argh(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(FromArgs, Debug)]
#[argh(subcommand)]
pub enum Command {
    /// `generate-token`
    GenerateToken(GenerateTokenArgs),
    /// `create-config`
    CreateConfig(CreateConfigArgs),
    /// `validate`
    Validate(ValidateArgs),
    /// `agent`
    Agent(AgentArgs),
    /// `bridge`
    Bridge(BridgeArgs),
    /// `version`
    Version(VersionArgs),
    /// `get-kubeconfig`
    GetKubeconfig(GetKubeconfigArgs),
    /// `role`
    Role(RoleArgs),
    /// `status`
    Status(StatusArgs),
}

/// Print a new network token (edgevpn/Kairos format) made with the system's secure random
/// generator. Alias: g.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "generate-token")]
pub struct GenerateTokenArgs {
    /// rotate the derived keys every SECONDS, given as the argument (kairosctl's way) or with
    /// --interval (default: never, as Kairos does, because boards without a real-time clock
    /// boot with a wrong time)
    #[argh(positional, arg_name = "seconds")]
    pub seconds: Option<u64>,

    /// the same as the SECONDS argument
    #[argh(option)]
    pub interval: Option<u64>,
}

/// Print a minimal #cloud-config with a new network token; give the same file to every node.
/// Alias: c.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "create-config")]
pub struct CreateConfigArgs {
    /// rotate the derived keys every SECONDS, given as the argument or with --interval
    /// (default: never)
    #[argh(positional, arg_name = "seconds")]
    pub seconds: Option<u64>,

    /// the same as the SECONDS argument
    #[argh(option)]
    pub interval: Option<u64>,
}

/// Print the effective configuration with every default resolved (exit 0), or every error found
/// (exit 2).
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "validate")]
pub struct ValidateArgs {
    /// cloud-config files or http(s) URLs (as kairosctl takes them); later ones override
    /// earlier ones key by key. A URL is downloaded (at most 4 MiB, 30 s).
    #[argh(positional, arg_name = "file-or-url")]
    pub sources: Vec<String>,

    /// a cloud-config file; repeat for several, later files override earlier ones key by key
    /// (default: the files in /oem and /usr/local/cloud-config, in lexical order)
    #[argh(option)]
    pub config: Vec<PathBuf>,
}

/// Run the node: join the network of p2p.network_token and stay in it (until SIGINT/SIGTERM).
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "agent")]
pub struct AgentArgs {
    /// a cloud-config file; repeat for several (default: the files in /oem and
    /// /usr/local/cloud-config)
    #[argh(option)]
    pub config: Vec<PathBuf>,

    /// UDP address of the overlay, QUIC and DHT (default: 0.0.0.0:7120)
    #[argh(option, default = "default_listen()")]
    pub listen: SocketAddr,
}

/// Join the network from a workstation: a VPN interface and the local API, no cluster role.
/// Needs root (or CAP_NET_ADMIN) for the VPN interface.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "bridge")]
pub struct BridgeArgs {
    /// the network token. Prefer --token-file, $NETWORK_TOKEN or standard input: a token given
    /// here is scrubbed from the command line at start, but other users may see it until then
    #[argh(option)]
    pub token: Option<String>,

    /// the same as --token (its older name, in Kairos' docs)
    #[argh(option)]
    pub network_token: Option<String>,

    /// read the network token from this file ("-": standard input). Without any token option,
    /// the token comes from $NETWORK_TOKEN, else $EDGEVPNTOKEN, else standard input
    #[argh(option)]
    pub token_file: Option<PathBuf>,

    /// take a free VPN address from the network's allocator (as nodes without a static address
    /// do; leases in the ledger's dhcp bucket) instead of --address, whose prefix stays the VPN
    /// network
    #[argh(switch)]
    pub dhcp: bool,

    /// where the bridge keeps its key, ledger and so its address lease, which it takes again on
    /// the next start (default: <state dir>/bridge)
    #[argh(option)]
    pub lease_dir: Option<PathBuf>,

    /// log level: trace, debug, info, warn, error or fatal (default: info, or $KAIROS_P2P_LOG)
    #[argh(option)]
    pub log_level: Option<String>,

    /// the VPN interface to create (default: kairos0)
    #[argh(option, default = "String::from(\"kairos0\")")]
    pub interface: String,

    /// this workstation's VPN address and the VPN prefix (default: 10.1.0.254/24)
    #[argh(option, default = "default_bridge_address()")]
    pub address: Ipv4Cidr,

    /// the VPN interface's MTU (default: 1200, as the nodes')
    #[argh(option, default = "crate::config::DEFAULT_MTU")]
    pub mtu: u16,

    /// where the local HTTP API listens (default: 127.0.0.1:8080)
    #[argh(option, default = "SocketAddr::from(([127, 0, 0, 1], 8080))")]
    pub api: SocketAddr,

    /// allow a non-loopback --api address (anyone who reaches it can inspect the network;
    /// writes and secrets still need the bearer token)
    #[argh(switch)]
    pub api_allow_remote: bool,

    /// the cluster (p2p.network_id) whose ledger the bridge reads (default: kairos)
    #[argh(
        option,
        default = "String::from(crate::ledger::names::DEFAULT_NETWORK_ID)"
    )]
    pub network_id: String,

    /// UDP address of the overlay (default: 0.0.0.0:0, any free port)
    #[argh(option, default = "SocketAddr::from(([0, 0, 0, 0], 0))")]
    pub listen: SocketAddr,

    /// find nodes on the local network only (no DHT)
    #[argh(switch)]
    pub disable_dht: bool,
}

fn default_bridge_address() -> Ipv4Cidr {
    Ipv4Cidr {
        addr: std::net::Ipv4Addr::new(10, 1, 0, 254),
        prefix_len: 24,
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], crate::node::bootstrap::DEFAULT_OVERLAY_PORT))
}

/// Print the version.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "version")]
pub struct VersionArgs {}

/// Print the cluster's kubeconfig from the ledger, pointed at the master's address.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "get-kubeconfig")]
pub struct GetKubeconfigArgs {
    /// the cluster's p2p.network_id (default: $EDGEVPN_NETWORK_ID, else kairos)
    #[argh(option)]
    pub network_id: Option<String>,

    /// the agent's API: unix:///PATH or http://HOST:PORT (default: $EDGEVPN_API, else
    /// unix:///run/edgevpn-kairos.sock when it answers, else http://127.0.0.1:8080)
    #[argh(option)]
    pub api: Option<String>,
}

/// List or set node roles.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "role")]
pub struct RoleArgs {
    #[argh(subcommand)]
    pub command: RoleCommand,
}

/// The `role` subcommands.
#[derive(FromArgs, Debug)]
#[argh(subcommand)]
pub enum RoleCommand {
    /// `role list`
    List(RoleListArgs),
    /// `role set`
    Set(RoleSetArgs),
}

/// List the cluster's nodes with their roles.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "list")]
pub struct RoleListArgs {
    /// the cluster's p2p.network_id (default: $EDGEVPN_NETWORK_ID, else kairos)
    #[argh(option)]
    pub network_id: Option<String>,

    /// the agent's API: unix:///PATH or http://HOST:PORT (default: $EDGEVPN_API, else
    /// unix:///run/edgevpn-kairos.sock when it answers, else http://127.0.0.1:8080)
    #[argh(option)]
    pub api: Option<String>,
}

/// Set a node's role (master, master/clusterinit, master/ha or worker); set it before the node
/// joins, as with Kairos.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "set")]
pub struct RoleSetArgs {
    /// the node's uuid (as `role list` shows it)
    #[argh(positional)]
    pub uuid: String,

    /// the role
    #[argh(positional)]
    pub role: String,

    /// the cluster's p2p.network_id (default: $EDGEVPN_NETWORK_ID, else kairos)
    #[argh(option)]
    pub network_id: Option<String>,

    /// the agent's API: unix:///PATH or http://HOST:PORT (default: $EDGEVPN_API, else
    /// unix:///run/edgevpn-kairos.sock when it answers, else http://127.0.0.1:8080)
    #[argh(option)]
    pub api: Option<String>,
}

/// Print what the status page shows: this node and every other with address, role, online state
/// and traffic.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "status")]
pub struct StatusArgs {
    /// the agent's API: unix:///PATH or http://HOST:PORT (default: $EDGEVPN_API, else
    /// unix:///run/edgevpn-kairos.sock when it answers, else http://127.0.0.1:8080)
    #[argh(option)]
    pub api: Option<String>,
}
