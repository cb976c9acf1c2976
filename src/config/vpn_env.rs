//! The edgevpn environment of `p2p.vpn.env`, typed.
//!
//! Kairos passes `p2p.vpn.env` to edgevpn as environment variables; kairos-p2p reads the ones it
//! uses into [`VpnSettings`], starting from edgevpn's defaults (user values win). A value that
//! does not parse is an error, never a silent default. Other variables are kept in
//! [`VpnSettings::extra`] and reported as warnings.
//!
//! Rules: `DHCP` defaults to true unless `ADDRESS` is set (as Kairos does); an explicit `ADDRESS`
//! with DHCP off is a static address. `APILISTEN` defaults to `127.0.0.1:8080` (edgevpn's own
//! default is `:8080`, every interface) and must be a loopback address: the API has no
//! authentication. `p2p.disable_dht: true` turns the DHT off whatever `EDGEVPNDHT` says.
//! DNS (edgevpn's `dns` service): `DNSADDRESS` (where to listen, empty: off; `p2p.dns: true`
//! makes it `127.0.0.1:53` when unset, as Kairos does), `DNSFORWARD` (forward the names the
//! ledger does not hold, default true), `DNSFORWARDSERVER` (comma-separated `IP:PORT` list,
//! default `8.8.8.8:53,1.1.1.1:53`), `DNSCACHESIZE` (forwarded answers kept, default 200).

use crate::node::bootstrap::{self, BootstrapPeer};
use std::collections::BTreeMap;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::ops::RangeInclusive;
use std::str::FromStr;

use serde_yaml::Value;

use super::diag::{Ctx, Diagnostics, Sourced};
use super::keypath::KeyPath;
use super::{read, schema};

/// Default VPN address and prefix (`ADDRESS`).
pub const DEFAULT_ADDRESS: Ipv4Cidr = Ipv4Cidr {
    addr: Ipv4Addr::new(10, 1, 0, 1),
    prefix_len: 24,
};
/// Default TUN interface name (`IFACE`).
pub const DEFAULT_IFACE: &str = "edgevpn0";
/// Default VPN MTU (`EDGEVPNMTU`).
pub const DEFAULT_MTU: u16 = 1200;
/// Accepted VPN MTUs.
pub const MTU_RANGE: RangeInclusive<u16> = 576..=9000;
/// Accepted VPN prefix lengths: at least two hosts, at most a /8.
pub const PREFIX_RANGE: RangeInclusive<u8> = 8..=30;
/// Default DNS forward servers (`DNSFORWARDSERVER`), edgevpn's.
pub const DEFAULT_DNS_FORWARD_SERVERS: [SocketAddr; 2] = [
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(8, 8, 8, 8), 53)),
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(1, 1, 1, 1), 53)),
];
/// Default DNS cache size (`DNSCACHESIZE`), edgevpn's.
pub const DEFAULT_DNS_CACHE_SIZE: usize = 200;
/// Largest `DNSCACHESIZE` accepted (entries hold at most 512-byte answers).
pub const MAX_DNS_CACHE_SIZE: usize = 100_000;
/// Most `DNSFORWARDSERVER` entries accepted.
pub const MAX_DNS_FORWARD_SERVERS: usize = 8;
/// Default API listen address (`APILISTEN`).
pub const DEFAULT_API_LISTEN: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8080));

/// An IPv4 address with a prefix length, as in `ADDRESS=10.1.0.1/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ipv4Cidr {
    /// The address.
    pub addr: Ipv4Addr,
    /// The prefix length, 0 to 32.
    pub prefix_len: u8,
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

impl FromStr for Ipv4Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let wanted = || {
            format!(
                "expected an IPv4 address with a prefix length like 10.1.0.1/24, found {}",
                read::quote(s)
            )
        };
        let (addr, prefix) = s.trim().split_once('/').ok_or_else(wanted)?;
        let addr = addr.parse().map_err(|_| wanted())?;
        let prefix_len = prefix
            .parse()
            .ok()
            .filter(|p| *p <= 32)
            .ok_or_else(wanted)?;
        Ok(Ipv4Cidr { addr, prefix_len })
    }
}

/// The edgevpn settings kairos-p2p uses, defaults resolved. `Debug` hides secret values among
/// the unused variables (an `EDGEVPNTOKEN` left in `p2p.vpn.env`).
#[derive(Clone, PartialEq, Eq)]
pub struct VpnSettings {
    /// `ADDRESS`: this node's VPN address and the VPN prefix.
    pub address: Ipv4Cidr,
    /// Whether `ADDRESS` was set by the user (with DHCP off it is a static address).
    pub address_explicit: bool,
    /// `IFACE`: the TUN interface name.
    pub iface: String,
    /// `DHCP`: addresses are allocated by the network.
    pub dhcp: bool,
    /// `EDGEVPNMTU`: the TUN MTU.
    pub mtu: u16,
    /// `EDGEVPNDHT` (and not `p2p.disable_dht`): discovery through the DHT.
    pub dht: bool,
    /// `EDGEVPNMDNS`: discovery on the local network.
    pub mdns: bool,
    /// `EDGEVPNBOOTSTRAPPEERS`: bootstrap peers (`host:port` or multiaddr), in order.
    pub bootstrap_peers: Vec<BootstrapPeer>,
    /// `APILISTEN`: where the local API listens (always loopback).
    pub api_listen: SocketAddr,
    /// `DNSADDRESS`: where the DNS service listens (`None`: not set).
    pub dns_address: Option<SocketAddr>,
    /// `DNSFORWARD`: forward names the ledger does not hold.
    pub dns_forward: bool,
    /// `DNSFORWARDSERVER`: where they are forwarded, in order.
    pub dns_forward_servers: Vec<SocketAddr>,
    /// `DNSCACHESIZE`: forwarded answers kept.
    pub dns_cache_size: usize,
    /// Other variables, kept but not used.
    pub extra: BTreeMap<String, String>,
}

impl fmt::Debug for VpnSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let extra: BTreeMap<&str, String> = self
            .extra
            .iter()
            .map(|(k, v)| (k.as_str(), super::effective::redact_value(k, v)))
            .collect();
        f.debug_struct("VpnSettings")
            .field("address", &self.address)
            .field("address_explicit", &self.address_explicit)
            .field("iface", &self.iface)
            .field("dhcp", &self.dhcp)
            .field("mtu", &self.mtu)
            .field("dht", &self.dht)
            .field("mdns", &self.mdns)
            .field("bootstrap_peers", &self.bootstrap_peers)
            .field("api_listen", &self.api_listen)
            .field("dns_address", &self.dns_address)
            .field("dns_forward", &self.dns_forward)
            .field("dns_forward_servers", &self.dns_forward_servers)
            .field("dns_cache_size", &self.dns_cache_size)
            .field("extra", &extra)
            .finish()
    }
}

impl VpnSettings {
    /// Whether this node uses a fixed address: `ADDRESS` given explicitly and DHCP off.
    pub fn is_static(&self) -> bool {
        self.address_explicit && !self.dhcp
    }
}

impl Default for VpnSettings {
    fn default() -> Self {
        VpnSettings {
            address: DEFAULT_ADDRESS,
            address_explicit: false,
            iface: DEFAULT_IFACE.to_owned(),
            dhcp: true,
            mtu: DEFAULT_MTU,
            dht: true,
            mdns: true,
            bootstrap_peers: Vec::new(),
            api_listen: DEFAULT_API_LISTEN,
            dns_address: None,
            dns_forward: true,
            dns_forward_servers: DEFAULT_DNS_FORWARD_SERVERS.to_vec(),
            dns_cache_size: DEFAULT_DNS_CACHE_SIZE,
            extra: BTreeMap::new(),
        }
    }
}

/// The variables one file sets.
#[derive(Debug, Default)]
pub(super) struct EnvLayer {
    address: Option<Ipv4Cidr>,
    iface: Option<String>,
    dhcp: Option<Sourced<bool>>,
    mtu: Option<u16>,
    dht: Option<bool>,
    mdns: Option<bool>,
    bootstrap_peers: Option<Vec<BootstrapPeer>>,
    api_listen: Option<SocketAddr>,
    dns_address: Option<Option<SocketAddr>>,
    dns_forward: Option<bool>,
    dns_forward_servers: Option<Vec<SocketAddr>>,
    dns_cache_size: Option<usize>,
    extra: BTreeMap<String, String>,
}

impl EnvLayer {
    /// Reads `p2p.vpn.env` of one file.
    pub(super) fn read(ctx: &mut Ctx<'_>, v: &Value, path: &KeyPath) -> EnvLayer {
        let mut out = EnvLayer::default();
        for read::EnvEntry {
            name,
            value,
            path: p,
        } in read::env_map(ctx, v, path, read::text)
        {
            match name.as_str() {
                "ADDRESS" => out.address = ctx.check(&p, parse_address(&value)),
                "IFACE" => out.iface = ctx.check(&p, interface_name(&value)),
                "DHCP" => {
                    out.dhcp = ctx
                        .check(&p, parse_bool(&value))
                        .map(|b| ctx.sourced(&p, b));
                }
                "EDGEVPNMTU" => out.mtu = ctx.check(&p, parse_mtu(&value)),
                "EDGEVPNDHT" => out.dht = ctx.check(&p, parse_bool(&value)),
                "EDGEVPNMDNS" => out.mdns = ctx.check(&p, parse_bool(&value)),
                "EDGEVPNBOOTSTRAPPEERS" => {
                    out.bootstrap_peers = ctx.check(&p, parse_peers(&value));
                }
                "APILISTEN" => out.api_listen = ctx.check(&p, parse_api_listen(&value)),
                "DNSADDRESS" => out.dns_address = ctx.check(&p, parse_dns_address(&value)),
                "DNSFORWARD" => out.dns_forward = ctx.check(&p, parse_bool(&value)),
                "DNSFORWARDSERVER" => {
                    out.dns_forward_servers = ctx.check(&p, parse_dns_servers(&value));
                }
                "DNSCACHESIZE" => out.dns_cache_size = ctx.check(&p, parse_cache_size(&value)),
                _ => {
                    let hint = schema::suggest(&name, schema::VPN_ENV)
                        .map(|s| format!("; did you mean {s}?"))
                        .unwrap_or_default();
                    ctx.warn(&p, format!("not used by kairos-p2p, ignored{hint}"));
                    out.extra.insert(name, value);
                }
            }
        }
        out
    }

    /// Applies a later file's variables over these, one by one.
    pub(super) fn overlay(&mut self, later: EnvLayer) {
        super::layer::set(&mut self.address, later.address);
        super::layer::set(&mut self.iface, later.iface);
        super::layer::set(&mut self.dhcp, later.dhcp);
        super::layer::set(&mut self.mtu, later.mtu);
        super::layer::set(&mut self.dht, later.dht);
        super::layer::set(&mut self.mdns, later.mdns);
        super::layer::set(&mut self.bootstrap_peers, later.bootstrap_peers);
        super::layer::set(&mut self.api_listen, later.api_listen);
        super::layer::set(&mut self.dns_address, later.dns_address);
        super::layer::set(&mut self.dns_forward, later.dns_forward);
        super::layer::set(&mut self.dns_forward_servers, later.dns_forward_servers);
        super::layer::set(&mut self.dns_cache_size, later.dns_cache_size);
        self.extra.extend(later.extra);
    }

    /// The settings with defaults filled in.
    pub(super) fn resolve(self, disable_dht: bool, diags: &mut Diagnostics) -> VpnSettings {
        let address_explicit = self.address.is_some();
        if let Some(dhcp) = &self.dhcp {
            if !dhcp.value && !address_explicit {
                diags.warn(
                    dhcp.origin.clone(),
                    format!(
                        "DHCP is off and ADDRESS is not set: every node would use {DEFAULT_ADDRESS}"
                    ),
                );
            }
        }
        VpnSettings {
            address: self.address.unwrap_or(DEFAULT_ADDRESS),
            address_explicit,
            iface: self.iface.unwrap_or_else(|| DEFAULT_IFACE.to_owned()),
            dhcp: self.dhcp.map_or(!address_explicit, |d| d.value),
            mtu: self.mtu.unwrap_or(DEFAULT_MTU),
            dht: !disable_dht && self.dht.unwrap_or(true),
            mdns: self.mdns.unwrap_or(true),
            bootstrap_peers: self.bootstrap_peers.unwrap_or_default(),
            api_listen: self.api_listen.unwrap_or(DEFAULT_API_LISTEN),
            dns_address: self.dns_address.flatten(),
            dns_forward: self.dns_forward.unwrap_or(true),
            dns_forward_servers: self
                .dns_forward_servers
                .unwrap_or_else(|| DEFAULT_DNS_FORWARD_SERVERS.to_vec()),
            dns_cache_size: self.dns_cache_size.unwrap_or(DEFAULT_DNS_CACHE_SIZE),
            extra: self.extra,
        }
    }
}

fn parse_address(s: &str) -> Result<Ipv4Cidr, String> {
    let cidr: Ipv4Cidr = s.parse()?;
    if !PREFIX_RANGE.contains(&cidr.prefix_len) {
        return Err(format!(
            "prefix length /{} is outside /{}../{}",
            cidr.prefix_len,
            PREFIX_RANGE.start(),
            PREFIX_RANGE.end()
        ));
    }
    Ok(cidr)
}

/// Checks a Linux network interface name: 1 to 15 bytes, no `/`, `:`, blanks or control
/// characters, not `.` or `..`.
pub(super) fn interface_name(s: &str) -> Result<String, String> {
    let problem = if s.is_empty() {
        "must not be empty"
    } else if s.len() > 15 {
        "is longer than 15 bytes"
    } else if s.contains(|c: char| c == '/' || c == ':' || c.is_whitespace() || c.is_control()) {
        "must not contain '/', ':', blanks or control characters"
    } else if s == "." || s == ".." {
        "must not be \".\" or \"..\""
    } else {
        return Ok(s.to_owned());
    };
    Err(format!("interface name {} {problem}", read::quote(s)))
}

fn parse_bool(s: &str) -> Result<bool, String> {
    read::bool_word(s).ok_or_else(|| {
        format!(
            "expected true/false (or yes/no, on/off, 1/0), found {}",
            read::quote(s)
        )
    })
}

fn parse_mtu(s: &str) -> Result<u16, String> {
    let n: u64 = s
        .trim()
        .parse()
        .map_err(|_| format!("expected a number, found {}", read::quote(s)))?;
    u16::try_from(n)
        .ok()
        .filter(|m| MTU_RANGE.contains(m))
        .ok_or_else(|| {
            format!(
                "MTU {n} is outside {}..={}",
                MTU_RANGE.start(),
                MTU_RANGE.end()
            )
        })
}

/// A comma- and/or blank-separated list; empty entries (`a,,b`, a trailing comma) are errors.
fn parse_peers(s: &str) -> Result<Vec<BootstrapPeer>, String> {
    if s.trim().is_empty() {
        return Ok(Vec::new());
    }
    let mut peers = Vec::new();
    for (i, part) in s.split(',').enumerate() {
        let before = peers.len();
        for entry in part.split_whitespace() {
            peers.push(bootstrap::parse(entry).map_err(|e| e.to_string())?);
        }
        if peers.len() == before {
            return Err(format!("entry {} of the list is empty", i + 1));
        }
    }
    Ok(peers)
}

/// `DNSADDRESS`: `IP:PORT`, `:PORT` (every interface, as Go reads it) or empty (off).
fn parse_dns_address(s: &str) -> Result<Option<SocketAddr>, String> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(None);
    }
    let addr = match s.strip_prefix(':') {
        Some(port) => port
            .parse()
            .ok()
            .map(|p| SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, p))),
        None => s.parse().ok(),
    };
    match addr {
        Some(a) if a.port() != 0 => Ok(Some(a)),
        _ => Err(format!(
            "expected an address like 127.0.0.1:53 or :53, found {}",
            read::quote(s)
        )),
    }
}

/// `DNSFORWARDSERVER`: a comma-separated list of `IP:PORT`.
fn parse_dns_servers(s: &str) -> Result<Vec<SocketAddr>, String> {
    let servers: Vec<SocketAddr> = s
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.parse::<SocketAddr>().map_err(|_| {
                format!(
                    "expected IP:PORT entries like 8.8.8.8:53, found {}",
                    read::quote(p)
                )
            })
        })
        .collect::<Result<_, _>>()?;
    if servers.len() > MAX_DNS_FORWARD_SERVERS {
        return Err(format!("at most {MAX_DNS_FORWARD_SERVERS} servers"));
    }
    Ok(servers)
}

/// `DNSCACHESIZE`: 1 to [`MAX_DNS_CACHE_SIZE`] entries.
fn parse_cache_size(s: &str) -> Result<usize, String> {
    s.trim()
        .parse::<usize>()
        .ok()
        .filter(|n| (1..=MAX_DNS_CACHE_SIZE).contains(n))
        .ok_or_else(|| {
            format!(
                "expected a number of entries from 1 to {MAX_DNS_CACHE_SIZE}, found {}",
                read::quote(s)
            )
        })
}

/// A loopback socket address; `localhost:PORT` is `127.0.0.1:PORT`.
fn parse_api_listen(s: &str) -> Result<SocketAddr, String> {
    let s = s.trim();
    let addr = match s.strip_prefix("localhost:") {
        Some(port) => port
            .parse()
            .ok()
            .map(|p| SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, p))),
        None => s.parse().ok(),
    }
    .ok_or_else(|| {
        format!(
            "expected an address like 127.0.0.1:8080, found {}",
            read::quote(s)
        )
    })?;
    if addr.port() == 0 {
        return Err("port must not be 0".to_owned());
    }
    if !addr.ip().is_loopback() {
        return Err(format!(
            "{addr} is not a loopback address; the API is plain HTTP (inspection for anyone who reaches it, its bearer token in clear), use {}",
            SocketAddr::new(DEFAULT_API_LISTEN.ip(), addr.port())
        ));
    }
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(
            parse_address("10.2.0.30/24"),
            Ok(Ipv4Cidr {
                addr: Ipv4Addr::new(10, 2, 0, 30),
                prefix_len: 24
            })
        );
        assert_eq!(DEFAULT_ADDRESS.to_string(), "10.1.0.1/24");
        assert!(
            parse_address("10.2.0.30")
                .unwrap_err()
                .contains("prefix length like")
        );
        assert!(parse_address("10.2.0/24").is_err());
        assert!(parse_address("10.2.0.1/33").is_err());
        assert_eq!(
            parse_address("10.2.0.1/31").unwrap_err(),
            "prefix length /31 is outside /8../30"
        );
        assert!(parse_address("10.2.0.1/4").is_err());
    }

    #[test]
    fn interface_names() {
        assert_eq!(interface_name("edgevpn0").as_deref(), Ok("edgevpn0"));
        assert_eq!(
            interface_name("a23456789012345").as_deref(),
            Ok("a23456789012345")
        );
        assert!(
            interface_name("a234567890123456")
                .unwrap_err()
                .contains("longer than 15")
        );
        for bad in ["", "a/b", "a:b", "a b", ".", "..", "a\u{7}"] {
            assert!(interface_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn mtus_bools_peers() {
        assert_eq!(parse_mtu(" 1400 "), Ok(1400));
        assert_eq!(
            parse_mtu("abc"),
            Err("expected a number, found \"abc\"".to_owned())
        );
        assert_eq!(
            parse_mtu("70000"),
            Err("MTU 70000 is outside 576..=9000".to_owned())
        );
        assert_eq!(
            parse_mtu("575"),
            Err("MTU 575 is outside 576..=9000".to_owned())
        );
        assert_eq!(
            parse_mtu("99999999999999999999").unwrap_err(),
            "expected a number, found \"99999999999999999999\""
        );
        assert_eq!(parse_bool("YES"), Ok(true));
        assert_eq!(parse_bool("0"), Ok(false));
        assert!(parse_bool("perhaps").is_err());
        let peers: Vec<String> = parse_peers("1.2.3.4:1, /dns/x/udp/2  /ip6/::1/udp/3")
            .unwrap()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(peers, ["1.2.3.4:1", "x:2", "[::1]:3"]);
        assert!(
            parse_peers("/ip4/1.2.3.4/tcp/1")
                .unwrap_err()
                .contains("TCP multiaddr")
        );
        assert_eq!(parse_peers("").unwrap().len(), 0);
        assert_eq!(parse_peers("  "), Ok(vec![]));
        assert_eq!(
            parse_peers("a,,b"),
            Err("entry 2 of the list is empty".to_owned())
        );
        assert_eq!(
            parse_peers("a,"),
            Err("entry 2 of the list is empty".to_owned())
        );
    }

    #[test]
    fn dns_variables() {
        let sa = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert_eq!(parse_dns_address(""), Ok(None));
        assert_eq!(parse_dns_address(":53"), Ok(Some(sa("0.0.0.0:53"))));
        assert_eq!(
            parse_dns_address("10.1.0.1:5353"),
            Ok(Some(sa("10.1.0.1:5353")))
        );
        assert_eq!(parse_dns_address("[::1]:53"), Ok(Some(sa("[::1]:53"))));
        for bad in ["53", "x:53", "127.0.0.1:0", "127.0.0.1"] {
            assert!(parse_dns_address(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_dns_servers("8.8.8.8:53, 10.0.0.1:5353"),
            Ok(vec![sa("8.8.8.8:53"), sa("10.0.0.1:5353")])
        );
        assert!(
            parse_dns_servers("8.8.8.8")
                .unwrap_err()
                .contains("8.8.8.8")
        );
        let many = ["1.1.1.1:53"; MAX_DNS_FORWARD_SERVERS + 1].join(",");
        assert!(parse_dns_servers(&many).is_err());
        assert_eq!(parse_cache_size("10"), Ok(10));
        for bad in ["0", "-1", "x", "100001"] {
            assert!(parse_cache_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn api_listen() {
        assert_eq!(
            parse_api_listen("127.0.0.1:9090"),
            Ok("127.0.0.1:9090".parse().unwrap())
        );
        assert_eq!(
            parse_api_listen("[::1]:8080"),
            Ok("[::1]:8080".parse().unwrap())
        );
        assert_eq!(
            parse_api_listen("localhost:8081"),
            Ok("127.0.0.1:8081".parse().unwrap())
        );
        assert_eq!(
            parse_api_listen("0.0.0.0:8080"),
            Err("0.0.0.0:8080 is not a loopback address; the API is plain HTTP (inspection for anyone who reaches it, its bearer token in clear), use 127.0.0.1:8080".to_owned())
        );
        assert!(parse_api_listen(":8080").is_err());
        assert!(parse_api_listen("127.0.0.1:0").is_err());
    }

    #[test]
    fn defaults_and_dht() {
        let mut diags = Diagnostics::default();
        let settings = EnvLayer::default().resolve(true, &mut diags);
        assert_eq!(
            settings,
            VpnSettings {
                dht: false,
                ..VpnSettings::default()
            }
        );
        assert!(!settings.is_static());
    }
}
