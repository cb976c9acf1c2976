//! The sockets of the DNS service ([`crate::dns`]): the listener on `DNSADDRESS` and one
//! ephemeral socket for forwarded queries, both in the event loop. An address that cannot be
//! bound yet (the VPN address before the TUN has it) is a warning, retried every
//! [`BIND_RETRY`].

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use mio::net::UdpSocket;
use mio::{Interest, Registry, Token};

use super::socket::{SocketOptions, bind_udp};
use crate::dns::{Dns, DnsSettings, Via, wire};
use crate::node::Node;

use super::tokens::{DNS_LISTENER as LISTENER, DNS_UPSTREAM as UPSTREAM};
/// How often a listener that could not be bound is tried again.
pub const BIND_RETRY: Duration = Duration::from_secs(5);
/// Datagrams read from one socket per wake-up.
const MAX_READS: usize = 64;

/// Where and how the DNS service runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsDriverSettings {
    /// `DNSADDRESS`.
    pub listen: SocketAddr,
    /// Forwarding and cache.
    pub service: DnsSettings,
}

/// The DNS service and its sockets.
pub struct DnsServer {
    listen: SocketAddr,
    listener: Option<UdpSocket>,
    upstream: Option<UdpSocket>,
    dns: Dns,
    retry_at: Option<Instant>,
    warned: bool,
}

impl DnsServer {
    /// Binds what can be bound now; the rest is retried in [`DnsServer::turn`].
    pub fn start(
        settings: &DnsDriverSettings,
        seed: u64,
        registry: &Registry,
        now: Instant,
    ) -> Self {
        let mut server = DnsServer {
            listen: settings.listen,
            listener: None,
            upstream: None,
            dns: Dns::new(settings.service.clone(), seed),
            retry_at: Some(now),
            warned: false,
        };
        if settings.service.forward && !settings.service.servers.is_empty() {
            let any = match settings.service.servers[0] {
                SocketAddr::V4(_) => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
                SocketAddr::V6(_) => SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0),
            };
            match bind(any, registry, UPSTREAM) {
                Ok(s) => server.upstream = Some(s),
                Err(e) => log::warn!("dns: cannot open the forwarding socket: {e}"),
            }
        }
        server.turn(registry, now);
        server
    }

    /// Whether `token` is one of ours.
    #[must_use]
    pub fn owns(token: Token) -> bool {
        token == LISTENER || token == UPSTREAM
    }

    /// Binds the listener when due, runs timeouts.
    pub fn turn(&mut self, registry: &Registry, now: Instant) {
        if self.retry_at.is_some_and(|t| t <= now) {
            match bind(self.listen, registry, LISTENER) {
                Ok(s) => {
                    log::info!("dns: serving on UDP {}", self.listen);
                    self.listener = Some(s);
                    self.retry_at = None;
                }
                Err(e) => {
                    if !self.warned {
                        log::warn!(
                            "dns: cannot listen on {} yet ({e}); trying again every {}s",
                            self.listen,
                            BIND_RETRY.as_secs()
                        );
                        self.warned = true;
                    }
                    self.retry_at = Some(now + BIND_RETRY);
                }
            }
        }
        if self.dns.poll_timeout().is_some_and(|t| t <= now) {
            self.dns.handle_timeout(now);
        }
        self.flush();
    }

    /// When [`DnsServer::turn`] is next due.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        match (self.retry_at, self.dns.poll_timeout()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Reads what `token`'s socket has (bounded), answers, forwards.
    pub fn ready(&mut self, token: Token, node: &Node, now: Instant, buf: &mut [u8]) {
        let limit = buf.len().min(wire::MAX_MESSAGE + 1);
        for _ in 0..MAX_READS {
            let socket = if token == LISTENER {
                self.listener.as_ref()
            } else {
                self.upstream.as_ref()
            };
            let Some(socket) = socket else {
                return;
            };
            let (n, from) = match socket.recv_from(&mut buf[..limit]) {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::debug!("dns: receive: {e}");
                    break;
                }
            };
            if token == LISTENER {
                match node.cluster() {
                    Some(cluster) => self
                        .dns
                        .handle_query(now, from, &buf[..n], cluster.ledger()),
                    None => return,
                }
            } else {
                self.dns.handle_upstream(now, from, &buf[..n]);
            }
        }
        self.flush();
    }

    fn flush(&mut self) {
        while let Some(t) = self.dns.poll_transmit() {
            let socket = match t.via {
                Via::Listener => self.listener.as_ref(),
                Via::Upstream => self.upstream.as_ref(),
            };
            if let Some(s) = socket {
                // UDP: a full buffer drops the answer; the client asks again.
                if let Err(e) = s.send_to(&t.payload, t.to) {
                    log::debug!("dns: send to {}: {e}", t.to);
                }
            }
        }
    }
}

fn bind(addr: SocketAddr, registry: &Registry, token: Token) -> io::Result<UdpSocket> {
    let mut socket = UdpSocket::from_std(bind_udp(
        addr,
        SocketOptions {
            reuse: false,
            broadcast: false,
        },
    )?);
    registry.register(&mut socket, token, Interest::READABLE)?;
    Ok(socket)
}
