//! Bootstrap peers as users write them: `host:port`, `ip` alone, or the libp2p multiaddr forms
//! edgevpn users already hold (`/ip4/<ip>/udp/<port>/quic-v1/p2p/<peer id>`).

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use crate::identity::PeerId;

/// The overlay's default UDP port (QUIC and DHT), used when an entry names no port.
pub const DEFAULT_OVERLAY_PORT: u16 = 7120;

/// Longest entry accepted.
const MAX_ENTRY_LEN: usize = 512;

/// One bootstrap peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootstrapPeer {
    /// Where it listens: a numeric address, or a host name for the driver to resolve.
    pub host: BootstrapHost,
    /// Its UDP port.
    pub port: u16,
    /// Its peer id, when the entry gives one (then the handshake must prove it).
    pub peer: Option<PeerId>,
}

/// The host part of a bootstrap entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootstrapHost {
    /// A numeric address.
    Ip(IpAddr),
    /// A DNS name (resolved by the driver; static builds need a resolvable name or an IP).
    Name(String),
}

impl BootstrapPeer {
    /// The socket address, when the host is numeric.
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        match &self.host {
            BootstrapHost::Ip(ip) => Some(SocketAddr::new(*ip, self.port)),
            BootstrapHost::Name(_) => None,
        }
    }
}

impl fmt::Display for BootstrapPeer {
    /// `host:port`, or the multiaddr form when the entry names a peer id (both parse back).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.host, &self.peer) {
            (BootstrapHost::Ip(ip), None) => write!(f, "{}", SocketAddr::new(*ip, self.port)),
            (BootstrapHost::Name(name), None) => write!(f, "{name}:{}", self.port),
            (host, Some(peer)) => {
                match host {
                    BootstrapHost::Ip(IpAddr::V4(ip)) => write!(f, "/ip4/{ip}")?,
                    BootstrapHost::Ip(IpAddr::V6(ip)) => write!(f, "/ip6/{ip}")?,
                    BootstrapHost::Name(name) => write!(f, "/dns/{name}")?,
                }
                write!(f, "/udp/{}/quic-v1/p2p/{peer}", self.port)
            }
        }
    }
}

/// Why a bootstrap entry did not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootstrapError {
    /// The entry as written.
    pub entry: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl fmt::Display for BootstrapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "bootstrap peer {:?}: {}", self.entry, self.reason)
    }
}

impl std::error::Error for BootstrapError {}

/// Parses one entry.
pub fn parse(entry: &str) -> Result<BootstrapPeer, BootstrapError> {
    let entry = entry.trim();
    let fail = |reason| BootstrapError {
        entry: entry.chars().take(80).collect(),
        reason,
    };
    if entry.is_empty() {
        return Err(fail("empty"));
    }
    if entry.len() > MAX_ENTRY_LEN {
        return Err(fail("too long"));
    }
    if entry.starts_with('/') {
        return parse_multiaddr(entry).map_err(fail);
    }
    if let Ok(addr) = entry.parse::<SocketAddr>() {
        return Ok(BootstrapPeer {
            host: BootstrapHost::Ip(addr.ip()),
            port: addr.port(),
            peer: None,
        });
    }
    if let Ok(ip) = entry
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
    {
        return Ok(BootstrapPeer {
            host: BootstrapHost::Ip(ip),
            port: DEFAULT_OVERLAY_PORT,
            peer: None,
        });
    }
    let (host, port) = match entry.rsplit_once(':') {
        Some((host, port)) => (
            host,
            port.parse::<u16>()
                .map_err(|_| fail("port is not a number 1-65535"))?,
        ),
        None => (entry, DEFAULT_OVERLAY_PORT),
    };
    if port == 0 {
        return Err(fail("port is not a number 1-65535"));
    }
    if !is_host_name(host) {
        return Err(fail("not an address, host:port or multiaddr"));
    }
    Ok(BootstrapPeer {
        host: BootstrapHost::Name(host.to_string()),
        port,
        peer: None,
    })
}

fn parse_multiaddr(text: &str) -> Result<BootstrapPeer, &'static str> {
    let mut parts = text.split('/').skip(1);
    let mut host = None;
    let mut port = None;
    let mut peer = None;
    while let Some(protocol) = parts.next() {
        match protocol {
            "ip4" | "ip6" => {
                let value = parts.next().ok_or("address missing after /ip4 or /ip6")?;
                let ip: IpAddr = value.parse().map_err(|_| "bad IP address")?;
                if (protocol == "ip4") != ip.is_ipv4() {
                    return Err("address family does not match /ip4 or /ip6");
                }
                host = Some(BootstrapHost::Ip(ip));
            }
            "dns" | "dns4" | "dns6" => {
                let value = parts.next().ok_or("name missing after /dns")?;
                if !is_host_name(value) {
                    return Err("bad DNS name");
                }
                host = Some(BootstrapHost::Name(value.to_string()));
            }
            "udp" => {
                let value = parts.next().ok_or("port missing after /udp")?;
                port = Some(
                    value
                        .parse::<u16>()
                        .ok()
                        .filter(|&p| p != 0)
                        .ok_or("bad UDP port")?,
                );
            }
            "tcp" => {
                return Err("a TCP multiaddr: kairos-p2p speaks QUIC over UDP, give /udp/<port>");
            }
            "p2p" | "ipfs" => {
                let value = parts.next().ok_or("peer id missing after /p2p")?;
                peer = Some(
                    value
                        .parse::<PeerId>()
                        .map_err(|_| "bad peer id (expected 12D3KooW...)")?,
                );
            }
            "quic" | "quic-v1" => {}
            "" => return Err("empty component"),
            _ => return Err("unsupported multiaddr component"),
        }
    }
    Ok(BootstrapPeer {
        host: host.ok_or("no /ip4, /ip6 or /dns component")?,
        port: port.unwrap_or(DEFAULT_OVERLAY_PORT),
        peer,
    })
}

fn is_host_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;

    #[test]
    fn accepted_forms() {
        let id = Identity::from_seed([1; 32]).peer_id();
        let with_id = format!("/ip4/192.0.2.7/udp/4000/quic-v1/p2p/{id}");
        let ip = |s: &str| BootstrapHost::Ip(s.parse().unwrap());
        let cases: Vec<(&str, BootstrapHost, u16, Option<PeerId>)> = vec![
            ("192.0.2.1:7000", ip("192.0.2.1"), 7000, None),
            ("192.0.2.1", ip("192.0.2.1"), DEFAULT_OVERLAY_PORT, None),
            ("[2001:db8::1]:9", ip("2001:db8::1"), 9, None),
            ("2001:db8::1", ip("2001:db8::1"), DEFAULT_OVERLAY_PORT, None),
            (
                "seed.example.org:7120",
                BootstrapHost::Name("seed.example.org".into()),
                7120,
                None,
            ),
            (
                "seed",
                BootstrapHost::Name("seed".into()),
                DEFAULT_OVERLAY_PORT,
                None,
            ),
            (
                "/ip4/192.0.2.7/udp/4000/quic-v1",
                ip("192.0.2.7"),
                4000,
                None,
            ),
            (&with_id, ip("192.0.2.7"), 4000, Some(id)),
            ("/ip6/2001:db8::2/udp/5/quic", ip("2001:db8::2"), 5, None),
            (
                "/dns4/seed.example.org/udp/7",
                BootstrapHost::Name("seed.example.org".into()),
                7,
                None,
            ),
            ("  10.0.0.1:1  ", ip("10.0.0.1"), 1, None),
        ];
        for (entry, host, port, peer) in cases {
            assert_eq!(
                parse(entry),
                Ok(BootstrapPeer { host, port, peer }),
                "{entry}"
            );
        }
    }

    #[test]
    fn printed_forms_parse_back() {
        let id = Identity::from_seed([2; 32]).peer_id();
        for entry in [
            "192.0.2.1:7000",
            "[2001:db8::1]:9",
            "seed.example.org:7120",
            &format!("/ip6/2001:db8::3/udp/5/quic-v1/p2p/{id}"),
            &format!("/dns/seed/udp/5/quic-v1/p2p/{id}"),
        ] {
            let peer = parse(entry).unwrap();
            assert_eq!(parse(&peer.to_string()).unwrap(), peer, "{entry}");
        }
    }

    #[test]
    fn rejected_forms_say_why() {
        let cases = [
            ("", "empty"),
            ("host:0", "port is not a number 1-65535"),
            ("host:99999", "port is not a number 1-65535"),
            ("bad host!", "not an address, host:port or multiaddr"),
            (
                "/ip4/1.2.3.4/tcp/4001",
                "a TCP multiaddr: kairos-p2p speaks QUIC over UDP, give /udp/<port>",
            ),
            (
                "/ip4/::1/udp/1",
                "address family does not match /ip4 or /ip6",
            ),
            (
                "/ip4/1.2.3.4/udp/1/p2p/QmNotEd25519",
                "bad peer id (expected 12D3KooW...)",
            ),
            ("/udp/1", "no /ip4, /ip6 or /dns component"),
            ("/ip4", "address missing after /ip4 or /ip6"),
            ("/ip4/1.2.3.4/ws", "unsupported multiaddr component"),
            ("/ip4/1.2.3.4//udp/1", "empty component"),
        ];
        for (entry, reason) in cases {
            assert_eq!(parse(entry).unwrap_err().reason, reason, "{entry}");
        }
        assert_eq!(parse(&"a".repeat(600)).unwrap_err().reason, "too long");
    }
}
