//! The only code that touches the OS for the overlay: one thread, one `mio::Poll`, the UDP
//! sockets, the timers and the shutdown signal, feeding the sans-IO [`Node`].

pub mod api;
pub mod dns;
pub mod interfaces;
pub mod signal;
pub mod socket;
pub mod tokens;
pub mod tun;

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mio::net::UdpSocket;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll};

use crate::chunks::ChunkPool;
use crate::config::Ipv4Cidr;
use crate::discovery::lan::{BEACON_BROADCAST_V4, BEACON_MULTICAST_V6, BEACON_PORT};
use crate::node::{Destination, Node, NodeEvent};
use signal::ShutdownSignal;
use socket::{SocketOptions, bind_udp};
use tun::{TunDevice, TunError, TunSettings};

use tokens::{BEACON_V4, BEACON_V6, K3S, OVERLAY, SIGNAL, TUN};

/// Datagrams (or TUN packets) read from one source per turn before the others get theirs; a
/// source left with more to read is read again on the next turn without waiting.
const MAX_READS_PER_WAKE: usize = 256;
/// Longest pause of TUN reads while the transport's datagram queues are backlogged (see
/// `Backlog::backlogged_since`).
const MAX_TUN_PAUSE: Duration = Duration::from_millis(20);
/// How often interface addresses are re-read (DHCP renewals, cables plugged in).
const INTERFACE_REFRESH: Duration = Duration::from_secs(2);
/// Largest UDP payload we receive.
const RECV_BUF: usize = 65_536;
/// Size of each buffer overlay datagrams are received into (and quinn-proto keeps slices of).
const RECV_POOL_CHUNK: usize = 128 * 1024;
/// Full receive buffers kept for reuse: a turn's datagrams (up to [`MAX_READS_PER_WAKE`], about
/// one 64 KiB GRO read per buffer) wait for the next turn's TUN write.
const KEEP_RECV_CHUNKS: usize = 4;

/// How the driver binds and what it may use.
#[derive(Debug, Clone)]
pub struct DriverSettings {
    /// The overlay socket (QUIC and DHT), e.g. `0.0.0.0:7120`.
    pub listen: SocketAddr,
    /// Receive and send LAN beacons.
    pub lan: bool,
    /// Interfaces never announced nor used for beacons (our own TUN device).
    pub exclude_interfaces: Vec<String>,
    /// Where the ledger snapshot is kept (`None`: not persisted).
    pub ledger_path: Option<PathBuf>,
    /// Where the local HTTP API is served, and its bearer token.
    pub api: api::ApiSettings,
    /// The VPN's TUN interface (`None`: no VPN interface, `vpn.create: false`).
    pub tun: Option<TunSettings>,
    /// Print one line to stdout once the node is connected and sees other VPN nodes (`bridge`).
    pub report_connected: bool,
    /// Set up and run k3s for the node's role (`None`: no k3s, e.g. `bridge`, `role: none`).
    pub k3s: Option<crate::k3s::K3sSettings>,
    /// Serve DNS (`None`: `DNSADDRESS` unset and `p2p.dns` off).
    pub dns: Option<dns::DnsDriverSettings>,
}

/// After a failed ledger save, the next attempt waits this long (a full disk must not spin).
const SAVE_RETRY: Duration = Duration::from_secs(5);
/// First wait before the TUN interface is made again after it went away; doubled on each
/// failure in a row.
const TUN_RETRY_MIN: Duration = Duration::from_millis(250);
/// Longest wait between two attempts to make the TUN interface again.
const TUN_RETRY_MAX: Duration = Duration::from_secs(4);
/// After the TUN interface refused its address, the next attempt waits this long.
const ADDRESS_RETRY: Duration = Duration::from_secs(1);
/// A TUN interface that lived this long before failing starts the back-off over.
const TUN_STABLE: Duration = Duration::from_secs(30);

/// Local failures the driver lived through, served as `kairos_p2p_errors_total{kind}`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LocalErrors {
    /// Ledger snapshots that could not be written (disk full, read-only, permissions).
    pub ledger_save: u64,
    /// Times the TUN interface went away (deleted, or its file descriptor failed).
    pub tun_lost: u64,
    /// Failed attempts to make the TUN interface again.
    pub tun_open: u64,
    /// Packets read from the TUN interface with an error that did not lose it.
    pub tun_read: u64,
    /// VPN packets the TUN interface refused, or that arrived while it was gone.
    pub tun_write: u64,
    /// Failed attempts to give the TUN interface its address.
    pub tun_address: u64,
    /// API connections that could not be accepted (out of file descriptors).
    pub api_accept: u64,
    /// UDP receives that failed other than for an ICMP report (out of memory, ...).
    pub socket_recv: u64,
    /// UDP datagrams the kernel would not send (full buffer, no route, firewall).
    pub socket_send: u64,
}

impl LocalErrors {
    /// `(kind, count)` pairs for [`crate::api::Metrics::errors`].
    fn as_metrics(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("ledger_save", self.ledger_save),
            ("tun_lost", self.tun_lost),
            ("tun_open", self.tun_open),
            ("tun_read", self.tun_read),
            ("tun_write", self.tun_write),
            ("tun_address", self.tun_address),
            ("api_accept", self.api_accept),
            ("socket_recv", self.socket_recv),
            ("socket_send", self.socket_send),
        ]
    }
}

/// Exponential back-off for a resource that keeps failing: `min`, doubled on every failure,
/// capped at `max`, back to `min` once the resource worked for `stable`.
#[derive(Debug, Clone)]
struct Backoff {
    min: Duration,
    max: Duration,
    stable: Duration,
    next: Duration,
    working_since: Option<Instant>,
}

impl Backoff {
    fn new(min: Duration, max: Duration, stable: Duration) -> Self {
        Self {
            min,
            max,
            stable,
            next: min,
            working_since: None,
        }
    }

    /// The resource works again from `now`.
    fn succeeded(&mut self, now: Instant) {
        self.working_since = Some(now);
    }

    /// The resource failed at `now`: how long to wait before trying again.
    fn failed(&mut self, now: Instant) -> Duration {
        if self
            .working_since
            .take()
            .is_some_and(|t| now.saturating_duration_since(t) >= self.stable)
        {
            self.next = self.min;
        }
        let wait = self.next;
        self.next = self.next.saturating_mul(2).min(self.max);
        wait
    }
}

/// Saves the ledger when the cluster layer asks, before anything it wrote is sent.
struct Persister {
    path: Option<PathBuf>,
    retry_at: Option<Instant>,
    /// The error of the last failed save, while saves fail.
    failure: Option<String>,
}

impl Persister {
    /// Saves when due (or `force`); returns whether everything written is on disk (`Ok`, also
    /// when nothing persists), or why not.
    fn run(
        &mut self,
        node: &mut Node,
        now: Instant,
        force: bool,
        errors: &mut LocalErrors,
    ) -> Result<(), String> {
        let (Some(path), Some(cluster)) = (&self.path, node.cluster_mut()) else {
            return Ok(());
        };
        if !(force || cluster.save_due(now)) {
            return Ok(());
        }
        if self.retry_at.is_some_and(|t| now < t) {
            return Err(self.failure.clone().unwrap_or_default());
        }
        match cluster.persist(path) {
            Ok(_) => {
                if self.retry_at.take().is_some() {
                    log::info!("ledger snapshot {} saved again", path.display());
                }
                self.failure = None;
                Ok(())
            }
            Err(e) => {
                errors.ledger_save += 1;
                log::error!(
                    "{e}; the agent keeps running on the ledger in memory and tries again in {} s",
                    SAVE_RETRY.as_secs()
                );
                self.retry_at = Some(now + SAVE_RETRY);
                self.failure = Some(e.to_string());
                Err(e.to_string())
            }
        }
    }
}

/// The VPN's TUN interface, made again with a back-off whenever it goes away.
struct Tun {
    settings: TunSettings,
    device: Option<TunDevice>,
    /// When the device is gone: when to try to make it again.
    retry_at: Option<Instant>,
    backoff: Backoff,
    /// When the device refused its address: when to try again.
    address_retry_at: Option<Instant>,
}

impl Tun {
    fn open(settings: &TunSettings, registry: &mio::Registry) -> Result<Self, DriverError> {
        let device = TunDevice::open(settings).map_err(DriverError::Tun)?;
        registry
            .register(&mut SourceFd(&device.as_raw_fd()), TUN, Interest::READABLE)
            .map_err(DriverError::Os)?;
        log::info!("VPN interface {} created", device.name());
        let mut backoff = Backoff::new(TUN_RETRY_MIN, TUN_RETRY_MAX, TUN_STABLE);
        backoff.succeeded(Instant::now());
        Ok(Self {
            settings: settings.clone(),
            device: Some(device),
            retry_at: None,
            backoff,
            address_retry_at: None,
        })
    }

    /// When the driver must wake up for the device (to make it again, or set its address).
    fn next_attempt(&self) -> Option<Instant> {
        self.retry_at.into_iter().chain(self.address_retry_at).min()
    }

    /// Gives the device the address the cluster settled on (again after it was made again),
    /// and moves it when it changes.
    fn follow_address(&mut self, node: &Node, now: Instant, errors: &mut LocalErrors) {
        // A wait that is over is forgotten: it must not keep the event loop awake.
        if self.address_retry_at.is_some_and(|t| now >= t) {
            self.address_retry_at = None;
        }
        let (Some(device), Some(addr), Some(vpn)) = (
            &mut self.device,
            node.cluster().and_then(|c| c.address()),
            node.vpn(),
        ) else {
            return;
        };
        let wanted = Ipv4Cidr {
            addr,
            prefix_len: vpn.local().prefix_len,
        };
        if device.address() == Some(wanted) || self.address_retry_at.is_some() {
            return;
        }
        match device.set_address(wanted) {
            Ok(()) => {
                self.address_retry_at = None;
                log::info!("VPN address {wanted} on {}", device.name());
            }
            Err(e) => {
                errors.tun_address += 1;
                self.address_retry_at = Some(now + ADDRESS_RETRY);
                log::error!("{e}; trying again in {} s", ADDRESS_RETRY.as_secs());
            }
        }
    }

    /// The device failed with `error`: closes it and plans the next attempt.
    fn lost(
        &mut self,
        registry: &mio::Registry,
        now: Instant,
        error: &io::Error,
        e: &mut LocalErrors,
    ) {
        if let Some(device) = self.device.take() {
            let _ = registry.deregister(&mut SourceFd(&device.as_raw_fd()));
        }
        e.tun_lost += 1;
        let wait = self.backoff.failed(now);
        self.retry_at = Some(now + wait);
        log::error!(
            "VPN interface {} is gone ({error}); VPN traffic is dropped until it is made again in {:.2} s",
            self.settings.name,
            wait.as_secs_f64()
        );
    }

    /// Makes the device again when it is gone and its back-off has passed.
    fn reopen(&mut self, registry: &mio::Registry, now: Instant, e: &mut LocalErrors) {
        if self.device.is_some() || self.retry_at.is_some_and(|t| now < t) {
            return;
        }
        let opened = TunDevice::open(&self.settings).and_then(|device| {
            registry
                .register(&mut SourceFd(&device.as_raw_fd()), TUN, Interest::READABLE)
                .map_err(|err| {
                    TunError::Os(
                        format!("VPN interface {}: event loop", self.settings.name),
                        err,
                    )
                })?;
            Ok(device)
        });
        match opened {
            Ok(device) => {
                log::info!("VPN interface {} made again", device.name());
                self.backoff.succeeded(now);
                self.device = Some(device);
                self.retry_at = None;
                self.address_retry_at = None;
            }
            Err(err) => {
                e.tun_open += 1;
                let wait = self.backoff.failed(now);
                self.retry_at = Some(now + wait);
                log::error!("{err}; trying again in {:.2} s", wait.as_secs_f64());
            }
        }
    }
}

/// Why the driver stopped with an error.
#[derive(Debug)]
pub enum DriverError {
    /// A socket could not be bound.
    Bind(SocketAddr, io::Error),
    /// The poller or the signal pipe failed.
    Os(io::Error),
    /// The TUN interface could not be set up.
    Tun(TunError),
}

impl std::fmt::Display for DriverError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Bind(addr, e) => write!(f, "cannot bind UDP {addr}: {e}"),
            Self::Os(e) => write!(f, "event loop: {e}"),
            Self::Tun(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for DriverError {}

struct Sockets {
    overlay: UdpSocket,
    beacon_v4: Option<UdpSocket>,
    beacon_v6: Option<UdpSocket>,
    /// UDP GSO works on the overlay socket (cleared after the kernel refused it once).
    gso: std::cell::Cell<bool>,
}

/// Runs `node` until SIGINT or SIGTERM, then closes its connections and returns.
pub fn run(mut node: Node, settings: &DriverSettings) -> Result<(), DriverError> {
    let mut poll = Poll::new().map_err(DriverError::Os)?;
    let mut sockets = bind_sockets(settings)?;
    let registry = poll.registry();
    registry
        .register(&mut sockets.overlay, OVERLAY, Interest::READABLE)
        .map_err(DriverError::Os)?;
    if let Some(s) = &mut sockets.beacon_v4 {
        registry
            .register(s, BEACON_V4, Interest::READABLE)
            .map_err(DriverError::Os)?;
    }
    if let Some(s) = &mut sockets.beacon_v6 {
        registry
            .register(s, BEACON_V6, Interest::READABLE)
            .map_err(DriverError::Os)?;
    }
    let mut tun = match &settings.tun {
        Some(t) => Some(Tun::open(t, registry)?),
        None => None,
    };
    let mut errors = LocalErrors::default();
    let mut shutdown = ShutdownSignal::install().map_err(DriverError::Os)?;
    registry
        .register(
            &mut SourceFd(&shutdown.raw_fd()),
            SIGNAL,
            Interest::READABLE,
        )
        .map_err(DriverError::Os)?;

    let port = sockets
        .overlay
        .local_addr()
        .map_err(DriverError::Os)?
        .port();
    log::info!(
        "peer id {}, overlay on UDP {}:{port}",
        node.peer_id(),
        settings.listen.ip()
    );
    let mut api = api::Api::bind(poll.registry(), &settings.api, Instant::now());
    // Dropped on return: stops the worker thread and a supervised k3s.
    let mut k3s = match &settings.k3s {
        Some(s) => {
            Some(crate::k3s::K3s::start(s.clone(), poll.registry(), K3S).map_err(DriverError::Os)?)
        }
        None => None,
    };
    let mut dns = settings.dns.as_ref().map(|d| {
        let seed = getrandom::u64().unwrap_or_else(|_| clocks().1);
        dns::DnsServer::start(d, seed, poll.registry(), Instant::now())
    });
    let mut events = Events::with_capacity(64);
    let mut buf = vec![0u8; RECV_BUF];
    let mut rx_pool = ChunkPool::new(RECV_POOL_CHUNK, KEEP_RECV_CHUNKS);
    let mut out = Vec::with_capacity(RECV_BUF);
    let mut targets = Vec::new();
    let mut next_refresh = Instant::now();
    let (now, unix) = clocks();
    node.handle_timeout(now, unix);
    let mut persister = Persister {
        path: settings.ledger_path.clone(),
        retry_at: None,
        failure: None,
    };
    // Sources read up to MAX_READS_PER_WAKE last turn with more left: mio only reports new
    // readiness, so they are read again without waiting.
    let mut backlog = Backlog::default();
    let mut reported = !settings.report_connected;

    loop {
        let now = Instant::now();
        if now >= next_refresh {
            let addrs = interfaces::list(&exclude(settings)).unwrap_or_else(|e| {
                log::warn!("cannot list interfaces: {e}");
                Vec::new()
            });
            targets = beacon_targets(&addrs, &sockets);
            node.set_local_addrs(now, announced(&addrs, settings.listen, port));
            next_refresh = now + INTERFACE_REFRESH;
        }
        if let Some(k) = &mut k3s {
            k.turn(&mut node, now);
        }
        if let Some(d) = &mut dns {
            d.turn(poll.registry(), now);
        }
        // VPN packets first: they are what someone waits for.
        if let Some(t) = &mut tun {
            t.reopen(poll.registry(), now, &mut errors);
            write_vpn_packets(&mut node, t, poll.registry(), now, &mut errors);
        }
        // Saved before anything written leaves, and before a write's answer.
        let saved = persister.run(&mut node, now, false, &mut errors);
        if api.awaits_save() {
            api.release_saved(poll.registry(), &mut node, &errors, &saved);
        }
        flush(&mut node, &sockets, &targets, &mut out, &mut errors);
        if drain_events(&mut node) {
            if let Some(k) = &mut k3s {
                k.check_soon(now);
            }
        }
        if let Some(t) = &mut tun {
            t.follow_address(&node, now, &mut errors);
        }
        if !reported {
            reported = report_connected(&node);
        }
        let timeout = node
            .poll_timeout()
            .map(|t| t.saturating_duration_since(Instant::now()))
            .unwrap_or(INTERFACE_REFRESH)
            .min(next_refresh.saturating_duration_since(Instant::now()))
            .min(api.poll_timeout().map_or(INTERFACE_REFRESH, |t| {
                t.saturating_duration_since(Instant::now())
            }))
            .min(
                dns.as_ref()
                    .and_then(dns::DnsServer::poll_timeout)
                    .map_or(INTERFACE_REFRESH, |t| {
                        t.saturating_duration_since(Instant::now())
                    }),
            )
            .min(
                k3s.as_ref()
                    .and_then(crate::k3s::K3s::poll_timeout)
                    .map_or(INTERFACE_REFRESH, |t| {
                        t.saturating_duration_since(Instant::now())
                    }),
            )
            .min(
                tun.as_ref()
                    .and_then(Tun::next_attempt)
                    .map_or(INTERFACE_REFRESH, |t| {
                        t.saturating_duration_since(Instant::now())
                    }),
            );
        // What the flush above sent may have made room: paused TUN reads go on without waiting.
        if !node.vpn_backlogged() {
            backlog.backlogged_since = None;
            if std::mem::take(&mut backlog.tun_paused) {
                backlog.tun = true;
            }
        }
        let timeout = if backlog.any() {
            Duration::ZERO
        } else {
            backlog.pause_ends().map_or(timeout, |t| {
                timeout.min(t.saturating_duration_since(Instant::now()))
            })
        };
        if let Err(e) = poll.poll(&mut events, Some(timeout)) {
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(DriverError::Os(e));
            }
        }
        let (now, unix) = clocks();
        if backlog.pause_ends().is_some_and(|t| t <= now) {
            backlog.tun_paused = false;
            backlog.tun = true;
        }
        if std::mem::take(&mut backlog.overlay) {
            backlog.overlay = read_overlay(
                &mut node,
                &sockets.overlay,
                &mut rx_pool,
                now,
                unix,
                &mut errors,
            );
        }
        if let Some(t) = &mut tun {
            if std::mem::take(&mut backlog.tun) {
                backlog.tun = read_tun(
                    &mut node,
                    t,
                    &mut backlog,
                    poll.registry(),
                    now,
                    &mut errors,
                );
            }
        }
        for event in &events {
            match event.token() {
                OVERLAY => {
                    backlog.overlay = read_overlay(
                        &mut node,
                        &sockets.overlay,
                        &mut rx_pool,
                        now,
                        unix,
                        &mut errors,
                    )
                }
                TUN => {
                    if let Some(t) = &mut tun {
                        backlog.tun = read_tun(
                            &mut node,
                            t,
                            &mut backlog,
                            poll.registry(),
                            now,
                            &mut errors,
                        );
                    }
                }
                // Beacons are few: whatever is left waits for the next one.
                BEACON_V4 | BEACON_V6 => {
                    let socket = if event.token() == BEACON_V4 {
                        &sockets.beacon_v4
                    } else {
                        &sockets.beacon_v6
                    };
                    if let Some(s) = socket {
                        read_all(&mut node, s, &mut buf, (now, unix), &mut errors);
                    }
                }
                SIGNAL => {
                    if let Some(signal) = shutdown.take() {
                        log::info!("signal {signal}: closing connections and stopping");
                        node.shutdown(now);
                        let _ = persister.run(&mut node, now, true, &mut errors);
                        flush(&mut node, &sockets, &targets, &mut out, &mut errors);
                        return Ok(());
                    }
                }
                token if api::Api::owns(token) => {
                    api.ready(poll.registry(), token, &mut node, &mut errors)
                }
                token if dns::DnsServer::owns(token) => {
                    if let Some(d) = &mut dns {
                        d.ready(token, &node, now, &mut buf);
                    }
                }
                _ => {}
            }
        }
        api.handle_timeouts(poll.registry(), &mut node, &errors);
        if node.poll_timeout().is_some_and(|t| t <= now) {
            node.handle_timeout(now, unix);
        }
    }
}

/// The monotonic clock and the wall clock in unix milliseconds.
pub(crate) fn clocks() -> (Instant, u64) {
    let unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    (Instant::now(), unix)
}

fn exclude(settings: &DriverSettings) -> Vec<&str> {
    settings
        .exclude_interfaces
        .iter()
        .map(String::as_str)
        .collect()
}

fn bind_sockets(settings: &DriverSettings) -> Result<Sockets, DriverError> {
    let overlay = bind_udp(
        settings.listen,
        SocketOptions {
            reuse: false,
            broadcast: false,
        },
    )
    .map_err(|e| DriverError::Bind(settings.listen, e))?;
    if !socket::enable_gro(&overlay) {
        log::debug!("UDP GRO unavailable: one datagram per read");
    }
    let mut sockets = Sockets {
        overlay: UdpSocket::from_std(overlay),
        beacon_v4: None,
        beacon_v6: None,
        gso: std::cell::Cell::new(true),
    };
    if settings.lan {
        let opts = SocketOptions {
            reuse: true,
            broadcast: true,
        };
        let v4 = SocketAddr::from((Ipv4Addr::UNSPECIFIED, BEACON_PORT));
        sockets.beacon_v4 = Some(UdpSocket::from_std(
            bind_udp(v4, opts).map_err(|e| DriverError::Bind(v4, e))?,
        ));
        // IPv6 is optional: hosts with it disabled still discover over IPv4.
        let v6 = SocketAddr::from((Ipv6Addr::UNSPECIFIED, BEACON_PORT));
        match bind_udp(v6, opts) {
            Ok(s) => sockets.beacon_v6 = Some(UdpSocket::from_std(s)),
            Err(e) => log::debug!("no IPv6 beacons: {e}"),
        }
    }
    Ok(sockets)
}

/// Where a beacon goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum BeaconTarget {
    /// The limited broadcast out of one IPv4 interface (`IP_PKTINFO`): every host on the link
    /// takes it, also one whose address was added without a broadcast address (`ip addr add`
    /// without `brd`), which drops the directed broadcast as a unicast not its own. The
    /// directed broadcast is the fallback where the kernel refuses the interface.
    V4 {
        /// The interface index.
        ifindex: u32,
        /// The interface's directed broadcast address.
        directed: Ipv4Addr,
    },
    /// The IPv6 group, scoped to one interface.
    V6(SocketAddr),
}

/// Where beacons go: out of each IPv4 interface with a broadcast address, and the IPv6 group on
/// each interface with a link-local address.
fn beacon_targets(addrs: &[interfaces::InterfaceAddr], sockets: &Sockets) -> Vec<BeaconTarget> {
    let mut targets: Vec<BeaconTarget> = Vec::new();
    for a in addrs {
        if let Some(directed) = a.broadcast {
            targets.push(BeaconTarget::V4 {
                ifindex: a.index,
                directed,
            });
        }
        if let (IpAddr::V6(ip), Some(s)) = (a.ip, &sockets.beacon_v6) {
            if is_link_local_v6(&ip) {
                // Joining again after a refresh fails harmlessly (EADDRINUSE).
                let _ = s.join_multicast_v6(&BEACON_MULTICAST_V6, a.index);
                targets.push(BeaconTarget::V6(SocketAddr::V6(
                    std::net::SocketAddrV6::new(BEACON_MULTICAST_V6, BEACON_PORT, 0, a.index),
                )));
            }
        }
    }
    targets.sort();
    targets.dedup();
    targets
}

fn is_link_local_v6(ip: &Ipv6Addr) -> bool {
    ip.segments()[0] & 0xffc0 == 0xfe80
}

/// Addresses to announce: the listen address if specific, else every IPv4 and global IPv6
/// interface address, with the overlay port.
fn announced(
    addrs: &[interfaces::InterfaceAddr],
    listen: SocketAddr,
    port: u16,
) -> Vec<SocketAddr> {
    if !listen.ip().is_unspecified() {
        return vec![SocketAddr::new(listen.ip(), port)];
    }
    let mut out: Vec<SocketAddr> = addrs
        .iter()
        .filter(|a| match a.ip {
            IpAddr::V4(_) => listen.is_ipv4(),
            IpAddr::V6(ip) => listen.is_ipv6() && !is_link_local_v6(&ip),
        })
        .map(|a| SocketAddr::new(a.ip, port))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Reads datagrams until the socket is empty or the turn's budget is spent (then true).
fn read_all(
    node: &mut Node,
    socket: &UdpSocket,
    buf: &mut [u8],
    (now, unix): (Instant, u64),
    errors: &mut LocalErrors,
) -> bool {
    for _ in 0..MAX_READS_PER_WAKE {
        match socket.recv_from(buf) {
            Ok((n, from)) => {
                if let Some(bytes) = buf.get(..n) {
                    node.handle_datagram(now, unix, from, None, bytes);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(e) if !recv_failed(&e, errors) => {}
            Err(_) => return false,
        }
    }
    true
}

/// Reads the overlay socket (datagrams or GRO runs of them) until it is empty or the turn's
/// budget is spent (then true).
fn read_overlay(
    node: &mut Node,
    socket: &UdpSocket,
    pool: &mut ChunkPool,
    now: Instant,
    unix: u64,
    errors: &mut LocalErrors,
) -> bool {
    // Counted in datagrams, not reads (a GRO run holds up to 64): the turn's budget bounds the
    // VPN packets queued for the TUN interface before they are written.
    // Datagrams are read into shared buffers and handed over without a copy (see
    // `Node::handle_packet`).
    let mut read = 0;
    while read < MAX_READS_PER_WAKE {
        match socket::recv_segments_into(socket, pool, RECV_BUF) {
            Ok(r) => {
                let mut data = pool.current().split();
                let size = r.segment_size.unwrap_or(r.len).max(1);
                while !data.is_empty() {
                    read += 1;
                    let datagram = data.split_to(size.min(data.len()));
                    node.handle_packet(now, unix, r.from, None, datagram);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(e) if !recv_failed(&e, errors) => {}
            Err(_) => return false,
        }
    }
    true
}

/// Sorts a receive error: true when the socket failed (counted, logged at 1, 2, 4, 8, ...
/// failures; reading stops until the next readiness, so a lasting failure cannot spin), false
/// when it only reported an ICMP message or an interrupted call (reading goes on).
fn recv_failed(e: &io::Error, errors: &mut LocalErrors) -> bool {
    if e.kind() == io::ErrorKind::Interrupted {
        return false;
    }
    if socket::peer_reported(e) {
        // Port or host unreachable: the peer's problem, not ours.
        log::trace!("recv: {e}");
        return false;
    }
    errors.socket_recv += 1;
    if errors.socket_recv.is_power_of_two() {
        log::warn!(
            "receiving on UDP: {e} ({} failure(s) so far)",
            errors.socket_recv
        );
    }
    true
}

/// Sources with more to read than one turn took.
#[derive(Debug, Default)]
struct Backlog {
    overlay: bool,
    tun: bool,
    /// TUN reads pause while the transport's datagram queues are backlogged
    /// ([`Node::vpn_backlogged`]); they go on at the first turn they are not.
    tun_paused: bool,
    /// Since when the queues are backlogged: past [`MAX_TUN_PAUSE`] TUN reads go on all the
    /// same (a peer that stopped answering must not stall the VPN to the others; its queue
    /// then drops its oldest packets).
    backlogged_since: Option<Instant>,
}

impl Backlog {
    /// Whether TUN reads may pause now (the queues are backlogged at `now`).
    fn may_pause(&mut self, now: Instant) -> bool {
        now < *self.backlogged_since.get_or_insert(now) + MAX_TUN_PAUSE
    }

    /// When a paused TUN must be read again whatever the queues.
    fn pause_ends(&self) -> Option<Instant> {
        self.backlogged_since
            .filter(|_| self.tun_paused)
            .map(|t| t + MAX_TUN_PAUSE)
    }
}

impl Backlog {
    /// Whether a source is to be read without waiting.
    fn any(&self) -> bool {
        self.overlay || self.tun
    }
}

/// Reads packets from the TUN interface into the node until none is left or the turn's budget
/// is spent (then true).
fn read_tun(
    node: &mut Node,
    tun: &mut Tun,
    backlog: &mut Backlog,
    registry: &mio::Registry,
    now: Instant,
    errors: &mut LocalErrors,
) -> bool {
    let Some(device) = &mut tun.device else {
        return false;
    };
    let mut read = 0;
    while read < MAX_READS_PER_WAKE {
        if node.vpn_backlogged() && backlog.may_pause(now) {
            backlog.tun_paused = true;
            return false;
        }
        // Drops are counted by the VPN path (see /metrics).
        match device.read_packets(|packet| {
            let _ = node.send_vpn_packet(now, packet);
        }) {
            // A super-packet counts as the packets it carries: the turn's budget bounds what
            // waits in the transport's datagram queue before the next flush.
            Ok(Some(n)) => read += n.max(1),
            Ok(None) => return false,
            Err(e) if tun::device_gone(&e) => {
                tun.lost(registry, now, &e, errors);
                return false;
            }
            Err(e) => {
                errors.tun_read += 1;
                log::warn!("reading the VPN interface {}: {e}", device.name());
                return false;
            }
        }
    }
    true
}

/// Writes the VPN packets peers sent us to the TUN interface (dropped and counted while it is
/// gone).
fn write_vpn_packets(
    node: &mut Node,
    tun: &mut Tun,
    registry: &mio::Registry,
    now: Instant,
    errors: &mut LocalErrors,
) {
    while let Some(packet) = node.poll_vpn_packet() {
        let Some(device) = &mut tun.device else {
            errors.tun_write += 1;
            continue;
        };
        let written = device.queue_packet(packet);
        tun_written(tun, written, registry, now, errors);
    }
    if let Some(device) = &mut tun.device {
        let written = device.flush();
        tun_written(tun, written, registry, now, errors);
    }
}

/// Counts the packets the TUN interface refused, or closes it when it is gone.
fn tun_written(
    tun: &mut Tun,
    written: io::Result<u64>,
    registry: &mio::Registry,
    now: Instant,
    errors: &mut LocalErrors,
) {
    match written {
        Ok(refused) => errors.tun_write += refused,
        Err(e) => tun.lost(registry, now, &e, errors),
    }
}

/// Prints one line once this node is connected to a member and knows another VPN node's
/// address; true once printed.
fn report_connected(node: &Node) -> bool {
    let Some(vpn) = node.vpn() else {
        return true;
    };
    let others = vpn.routes().len().saturating_sub(usize::from(
        vpn.routes().owner(vpn.local().addr) == Some(node.peer_id()),
    ));
    if node.connected().is_empty() || others == 0 {
        return false;
    }
    crate::outln!(
        "connected: {} peer(s) online, {others} VPN node(s) reachable; this node is {}",
        node.connected().len(),
        vpn.local()
    );
    true
}

fn flush(
    node: &mut Node,
    sockets: &Sockets,
    targets: &[BeaconTarget],
    out: &mut Vec<u8>,
    errors: &mut LocalErrors,
) {
    let now = Instant::now();
    while let Some(t) = node.poll_transmit(now, out) {
        let Some(payload) = out.get(..t.len) else {
            continue;
        };
        match t.destination {
            Destination::Addr(addr) => match t.segment_size {
                Some(size) if size > 0 && payload.len() > size => {
                    send_batch(sockets, payload, size, addr, errors)
                }
                _ => send(&sockets.overlay, payload, addr, errors),
            },
            Destination::LanBroadcast => {
                for target in targets {
                    match (*target, &sockets.beacon_v4, &sockets.beacon_v6) {
                        (BeaconTarget::V4 { ifindex, directed }, Some(s), _) => {
                            let limited = SocketAddrV4::new(BEACON_BROADCAST_V4, BEACON_PORT);
                            if socket::send_on_interface(s, payload, limited, ifindex).is_err() {
                                send(s, payload, (directed, BEACON_PORT).into(), errors);
                            }
                        }
                        (BeaconTarget::V6(addr), _, Some(s)) => send(s, payload, addr, errors),
                        _ => {}
                    }
                }
            }
        }
    }
}

/// Sends a batch of equal-size datagrams with one GSO call, or one by one where GSO fails.
fn send_batch(
    sockets: &Sockets,
    payload: &[u8],
    size: usize,
    to: SocketAddr,
    errors: &mut LocalErrors,
) {
    if sockets.gso.get() {
        match socket::send_segments(&sockets.overlay, payload, size as u16, to) {
            Ok(_) => return,
            // A full buffer drops the batch, as it drops single packets; QUIC retransmits.
            Err(e) if socket::gso_unsupported(&e) => {
                log::info!("UDP GSO unavailable ({e}); sending datagrams one by one");
                sockets.gso.set(false);
            }
            // No route, a firewall: the batch is lost as one datagram would be, and GSO
            // stays on.
            Err(e) => return send_failed(to, &e, errors),
        }
    }
    payload
        .chunks(size)
        .for_each(|p| send(&sockets.overlay, p, to, errors));
}

fn send(socket: &UdpSocket, payload: &[u8], to: SocketAddr, errors: &mut LocalErrors) {
    // A full socket buffer drops the packet, as the network would; QUIC retransmits. So do a
    // missing route or a firewall.
    if let Err(e) = socket.send_to(payload, to) {
        send_failed(to, &e, errors);
    }
}

/// Counts a datagram the kernel would not send. Not a warning: it happens in normal operation
/// (IPv6 beacons before the link-local address is ready, a peer's address family without a
/// route, a link down) and the network layer above copes, as with a lost packet.
fn send_failed(to: SocketAddr, e: &io::Error, errors: &mut LocalErrors) {
    errors.socket_send += 1;
    if errors.socket_send.is_power_of_two() {
        log::debug!(
            "sending on UDP to {to}: {e} ({} send(s) failed so far)",
            errors.socket_send
        );
    } else {
        log::trace!("send to {to}: {e}");
    }
}

/// Logs the node's events; true when the cluster layer had news.
fn drain_events(node: &mut Node) -> bool {
    let mut cluster_news = false;
    while let Some(event) = node.poll_event() {
        cluster_news |= matches!(event, NodeEvent::Cluster(_));
        match event {
            NodeEvent::MemberDiscovered {
                peer,
                addrs,
                source,
            } => {
                log::info!("member {peer} discovered ({source:?}) at {addrs:?}");
            }
            NodeEvent::MemberLost { peer } => log::info!("member {peer} lost"),
            NodeEvent::PeerConnected {
                peer,
                addr,
                inbound,
            } => {
                let way = if inbound { "from" } else { "to" };
                log::info!("connected {way} {peer} at {addr}");
            }
            NodeEvent::PeerDisconnected { peer, reason } => {
                log::info!("disconnected from {peer}: {reason}")
            }
            NodeEvent::ObservedAddr(addr) => log::info!("peers see this node at {addr}"),
            // A second master is the one alarm logged as an error: two k3s clusters run.
            NodeEvent::Cluster(event @ crate::cluster::ClusterEvent::SecondMaster { .. })
                if event.is_alarm() =>
            {
                log::error!("{event}")
            }
            NodeEvent::Cluster(event) if event.is_alarm() => log::warn!("{event}"),
            NodeEvent::Cluster(event) => log::info!("{event}"),
        }
    }
    cluster_news
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap_and_restarts_after_a_stable_run() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(250), ms(4000), Duration::from_secs(30));
        let t0 = Instant::now();
        b.succeeded(t0);
        let waits: Vec<Duration> = (0..7).map(|i| b.failed(t0 + ms(i))).collect();
        assert_eq!(
            waits,
            [250, 500, 1000, 2000, 4000, 4000, 4000].map(ms),
            "doubles, capped"
        );
        // Working again, but failing again soon after: the back-off keeps its length.
        b.succeeded(t0 + ms(10));
        assert_eq!(b.failed(t0 + ms(20)), ms(4000));
        // Working for longer than the stable time: back to the first wait.
        b.succeeded(t0 + ms(100));
        assert_eq!(b.failed(t0 + ms(100) + Duration::from_secs(30)), ms(250));
        assert_eq!(b.failed(t0 + Duration::from_secs(31)), ms(500));
    }

    #[test]
    fn tun_reads_pause_for_a_backlog_at_most_max_tun_pause() {
        let t0 = Instant::now();
        let mut b = Backlog::default();
        assert!(b.may_pause(t0));
        b.tun_paused = true;
        assert_eq!(b.pause_ends(), Some(t0 + MAX_TUN_PAUSE));
        assert!(!b.any(), "a paused TUN does not spin the loop");
        assert!(
            b.may_pause(t0 + MAX_TUN_PAUSE / 2),
            "still backlogged, same pause"
        );
        assert!(!b.may_pause(t0 + MAX_TUN_PAUSE), "then read all the same");
        // The backlog cleared: a later one may pause again.
        b.backlogged_since = None;
        let t1 = t0 + Duration::from_secs(1);
        assert!(b.may_pause(t1));
        assert_eq!(b.pause_ends(), Some(t1 + MAX_TUN_PAUSE));
    }

    #[test]
    fn every_local_error_kind_is_exported_once() {
        let errors = LocalErrors {
            ledger_save: 1,
            tun_lost: 2,
            tun_open: 3,
            tun_read: 4,
            tun_write: 5,
            tun_address: 6,
            api_accept: 7,
            socket_recv: 8,
            socket_send: 9,
        };
        let exported = errors.as_metrics();
        let mut kinds: Vec<&str> = exported.iter().map(|(k, _)| *k).collect();
        kinds.sort_unstable();
        kinds.dedup();
        assert_eq!(kinds.len(), exported.len(), "distinct kinds");
        let mut counts: Vec<u64> = exported.iter().map(|(_, c)| *c).collect();
        counts.sort_unstable();
        assert_eq!(counts, [1, 2, 3, 4, 5, 6, 7, 8, 9], "every field exported");
    }
}
