//! The local HTTP API served inside the driver's event loop: a loopback TCP listener
//! (`APILISTEN`) and a unix socket in the state directory (mode 0600), at most
//! [`MAX_CONNECTIONS`] connections at once, each a sans-IO [`Connection`] fed from a
//! non-blocking stream. Ledger writes a request asks for are applied to the cluster before its
//! response is sent.

use std::io::{self, Read, Write as _};
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use mio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use mio::{Interest, Registry, Token};

use super::LocalErrors;
use crate::api::{
    ApiState, ClusterNode, Connection, DiscoveryState, MAX_FEED, MemberStatus, Metrics, NodeInfo,
    PeerPath, PeerStatus, handle,
};
use crate::api::{Response, Status};
use crate::cluster::Cluster;
use crate::ledger::{Ledger, LedgerError};
use crate::node::{Node, WriteError};

/// Most API connections open at once; more are closed on accept.
pub const MAX_CONNECTIONS: usize = 32;

const TCP_LISTENER: Token = Token(16);
const UNIX_LISTENER: Token = Token(17);
/// Connection `i` has token `FIRST_CONN + i` (`i < MAX_CONNECTIONS`).
const FIRST_CONN: usize = 32;

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }

    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }

    fn register(
        &mut self,
        registry: &Registry,
        token: Token,
        interest: Interest,
    ) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => registry.register(s, token, interest),
            Stream::Unix(s) => registry.register(s, token, interest),
        }
    }

    fn reregister(
        &mut self,
        registry: &Registry,
        token: Token,
        interest: Interest,
    ) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => registry.reregister(s, token, interest),
            Stream::Unix(s) => registry.reregister(s, token, interest),
        }
    }

    fn deregister(&mut self, registry: &Registry) {
        let _ = match self {
            Stream::Tcp(s) => registry.deregister(s),
            Stream::Unix(s) => registry.deregister(s),
        };
    }
}

struct Client {
    stream: Stream,
    conn: Connection,
    /// WRITABLE interest is registered.
    writable: bool,
    /// The socket failed: close it.
    broken: bool,
    /// The answer to a write, held until the ledger is saved; no further request of this
    /// connection is read meanwhile (answers keep their order).
    awaiting_save: Option<crate::api::Response>,
}

/// The API's listeners and connections.
pub struct Api {
    tcp: Option<TcpListener>,
    unix: Option<(UnixListener, PathBuf)>,
    clients: Vec<Option<Client>>,
    started: Instant,
    /// Served when the node has no cluster layer.
    empty: Ledger,
    buf: Vec<u8>,
}

impl Api {
    /// Binds the listeners that are configured and registers them. A listener that cannot be
    /// bound is a warning: the other one still serves.
    pub fn bind(
        registry: &Registry,
        tcp: Option<SocketAddr>,
        unix: Option<&Path>,
        started: Instant,
    ) -> Api {
        let mut api = Api {
            tcp: None,
            unix: None,
            clients: (0..MAX_CONNECTIONS).map(|_| None).collect(),
            started,
            empty: Ledger::new(Default::default()),
            buf: vec![0; MAX_FEED],
        };
        let mut where_ = Vec::new();
        if let Some(addr) = tcp {
            match TcpListener::bind(addr).and_then(|mut l| {
                registry.register(&mut l, TCP_LISTENER, Interest::READABLE)?;
                Ok(l)
            }) {
                Ok(l) => {
                    where_.push(l.local_addr().map_or(addr.to_string(), |a| a.to_string()));
                    api.tcp = Some(l);
                }
                Err(e) => log::warn!("API: cannot listen on TCP {addr}: {e} (APILISTEN)"),
            }
        }
        if let Some(path) = unix {
            match bind_unix(registry, path) {
                Ok(l) => {
                    where_.push(path.display().to_string());
                    api.unix = Some((l, path.to_path_buf()));
                }
                Err(e) => log::warn!("API: cannot listen on {}: {e}", path.display()),
            }
        }
        if !where_.is_empty() {
            log::info!("API on {}", where_.join(" and "));
        }
        api
    }

    /// Whether `token` is one of the API's.
    pub fn owns(token: Token) -> bool {
        token == TCP_LISTENER
            || token == UNIX_LISTENER
            || (FIRST_CONN..FIRST_CONN + MAX_CONNECTIONS).contains(&token.0)
    }

    /// The earliest connection deadline.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.clients
            .iter()
            .flatten()
            .filter_map(|c| c.conn.poll_timeout())
            .min()
    }

    /// Handles readiness of one of the API's tokens.
    pub fn ready(
        &mut self,
        registry: &Registry,
        token: Token,
        node: &mut Node,
        errors: &mut LocalErrors,
    ) {
        match token {
            TCP_LISTENER => self.accept_tcp(registry, errors),
            UNIX_LISTENER => self.accept_unix(registry, errors),
            Token(t) => self.serve(registry, t.wrapping_sub(FIRST_CONN), node, errors),
        }
    }

    /// Fires the connections' timers that are due.
    pub fn handle_timeouts(&mut self, registry: &Registry, node: &mut Node, errors: &LocalErrors) {
        let now = Instant::now();
        for i in 0..self.clients.len() {
            let due = self.clients[i]
                .as_ref()
                .and_then(|c| c.conn.poll_timeout())
                .is_some_and(|t| t <= now);
            if due {
                if let Some(c) = self.clients[i].as_mut() {
                    c.conn.handle_timeout(now);
                }
                self.serve(registry, i, node, errors);
            }
        }
    }

    fn accept_tcp(&mut self, registry: &Registry, errors: &mut LocalErrors) {
        self.accept_each(registry, errors, |api| {
            let listener = api.tcp.as_ref()?;
            Some(listener.accept().map(|(stream, _)| {
                let _ = stream.set_nodelay(true);
                Stream::Tcp(stream)
            }))
        });
    }

    fn accept_unix(&mut self, registry: &Registry, errors: &mut LocalErrors) {
        self.accept_each(registry, errors, |api| {
            let (listener, _) = api.unix.as_ref()?;
            Some(listener.accept().map(|(stream, _)| Stream::Unix(stream)))
        });
    }

    /// Takes every connection `accept` yields until the listener is empty (or absent: `None`).
    fn accept_each(
        &mut self,
        registry: &Registry,
        errors: &mut LocalErrors,
        accept: impl Fn(&Self) -> Option<io::Result<Stream>>,
    ) {
        while let Some(accepted) = accept(self) {
            match accepted {
                Ok(stream) => self.add(registry, stream),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                // Interrupted, or a client gone before it was accepted: take the next one.
                Err(e) if accept_again(&e) => {}
                // Out of file descriptors or memory: the connection stays queued until the next
                // one arrives (edge-triggered readiness: no busy loop meanwhile).
                Err(e) => return accept_failed(errors, &e),
            }
        }
    }

    /// Takes a new connection into a free slot, or closes it at once when there is none.
    fn add(&mut self, registry: &Registry, mut stream: Stream) {
        let Some(i) = self.clients.iter().position(Option::is_none) else {
            log::debug!("API: {MAX_CONNECTIONS} connections open, refusing another");
            return;
        };
        if let Err(e) = stream.register(registry, Token(FIRST_CONN + i), Interest::READABLE) {
            log::debug!("API register: {e}");
            return;
        }
        self.clients[i] = Some(Client {
            stream,
            conn: Connection::new(Instant::now()),
            writable: false,
            broken: false,
            awaiting_save: None,
        });
    }

    /// True when an answer waits for the ledger to be saved.
    pub fn awaits_save(&self) -> bool {
        self.clients
            .iter()
            .flatten()
            .any(|c| c.awaiting_save.is_some())
    }

    /// The ledger is saved (`Ok`) or its save failed: sends the answers held for it (a failure
    /// says the write is made and gossiped but not on disk).
    pub fn release_saved(
        &mut self,
        registry: &Registry,
        node: &mut Node,
        errors: &LocalErrors,
        saved: &Result<(), String>,
    ) {
        for i in 0..self.clients.len() {
            let Some(client) = self.clients[i].as_mut() else {
                continue;
            };
            let Some(response) = client.awaiting_save.take() else {
                continue;
            };
            client.conn.respond(match saved {
                Ok(()) => response,
                Err(e) => Response::error(
                    Status::InternalServerError,
                    &format!("written and sent to the peers, but not saved here: {e}"),
                ),
            });
            self.serve(registry, i, node, errors);
        }
    }

    /// Moves bytes both ways on connection `i`, answers its requests, and closes it when done.
    fn serve(&mut self, registry: &Registry, i: usize, node: &mut Node, errors: &LocalErrors) {
        let Some(Some(client)) = self.clients.get_mut(i) else {
            return;
        };
        let state_parts = (self.started, &self.empty, errors);
        pump(client, &mut self.buf, node, state_parts);
        if client.broken || client.conn.is_finished() {
            client.stream.deregister(registry);
            self.clients[i] = None;
            return;
        }
        let want_write = !client.conn.pending_output().is_empty();
        if want_write != client.writable {
            let interest = if want_write {
                Interest::READABLE | Interest::WRITABLE
            } else {
                Interest::READABLE
            };
            match client
                .stream
                .reregister(registry, Token(FIRST_CONN + i), interest)
            {
                Ok(()) => client.writable = want_write,
                Err(e) => {
                    log::debug!("API reregister: {e}");
                    client.stream.deregister(registry);
                    self.clients[i] = None;
                }
            }
        }
    }
}

impl Drop for Api {
    fn drop(&mut self) {
        if let Some((_, path)) = &self.unix {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The answer to a write the node refused.
fn refusal(e: &WriteError) -> Response {
    let status = match e {
        WriteError::Refused(LedgerError::NotOwner { .. }) => Status::Forbidden,
        WriteError::Refused(LedgerError::ValueTooLarge { .. } | LedgerError::OverQuota { .. }) => {
            Status::ContentTooLarge
        }
        WriteError::Refused(LedgerError::InvalidName { .. }) => Status::BadRequest,
        _ => Status::InternalServerError,
    };
    Response::error(status, &e.to_string())
}

/// Whether accept failed for this one call or this one client only.
fn accept_again(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
    ) || e.raw_os_error() == Some(libc::EPROTO)
}

/// Logs and counts a failed accept.
fn accept_failed(errors: &mut LocalErrors, e: &io::Error) {
    errors.api_accept += 1;
    log::warn!("API: cannot accept a connection: {e}");
}

/// Binds the unix socket at `path` (a stale file there is removed first), readable and
/// writable by the owner only, and never otherwise: it is bound inside a fresh 0700 directory
/// beside `path`, made 0600 there and only then moved to `path` (bound directly, it would carry
/// the umask's mode, up to 0777, until the chmod). The staging path `<dir>/.s<pid>/s` is at most
/// three bytes longer than `<dir>/api.sock`.
fn bind_unix(registry: &Registry, path: &Path) -> io::Result<UnixListener> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let staging = path
        .parent()
        .unwrap_or(Path::new("."))
        .join(format!(".s{}", std::process::id()));
    // Left over from a crash of a predecessor with our pid.
    let _ = std::fs::remove_file(staging.join("s"));
    let _ = std::fs::remove_dir(&staging);
    std::fs::DirBuilder::new().mode(0o700).create(&staging)?;
    let staged = staging.join("s");
    let bound = UnixListener::bind(&staged).and_then(|listener| {
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&staged, path)?;
        Ok(listener)
    });
    let _ = std::fs::remove_file(&staged);
    let _ = std::fs::remove_dir(&staging);
    let mut listener = bound?;
    registry.register(&mut listener, UNIX_LISTENER, Interest::READABLE)?;
    Ok(listener)
}

/// Reads until the socket would block (or the connection wants no more), answers the requests,
/// writes until the socket would block, and goes round again while anything moved.
fn pump(
    client: &mut Client,
    buf: &mut [u8],
    node: &mut Node,
    (started, empty, errors): (Instant, &Ledger, &LocalErrors),
) {
    loop {
        let mut progress = false;
        while client.conn.wants_input() {
            match client.stream.read(buf) {
                Ok(0) => {
                    client.conn.handle_eof();
                    break;
                }
                Ok(n) => {
                    client
                        .conn
                        .feed(Instant::now(), buf.get(..n).unwrap_or_default());
                    progress = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    client.broken = true;
                    return;
                }
            }
        }
        while client.awaiting_save.is_none() {
            let Some(request) = client.conn.poll_request() else {
                break;
            };
            let outcome = {
                let state = State::new(node, started, empty, errors);
                handle(&request, &state)
            };
            if outcome.writes.is_empty() {
                client.conn.respond(outcome.response);
                continue;
            }
            let (now, unix_ms) = super::clocks();
            match node.write(now, unix_ms, outcome.writes) {
                // Answered once the ledger is saved (see `Api::saved`).
                Ok(()) => client.awaiting_save = Some(outcome.response),
                Err(e) => client.conn.respond(refusal(&e)),
            }
        }
        while !client.conn.pending_output().is_empty() {
            match client.stream.write(client.conn.pending_output()) {
                Ok(0) => {
                    client.broken = true;
                    return;
                }
                Ok(n) => {
                    client.conn.consume_output(n);
                    progress = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    client.broken = true;
                    return;
                }
            }
        }
        if !progress || client.conn.is_finished() {
            return;
        }
    }
}

/// What the routes read: the node and its cluster, now.
struct State<'a> {
    node: &'a Node,
    cluster: Option<&'a Cluster>,
    ledger: &'a Ledger,
    started: Instant,
    now: Instant,
    errors: &'a LocalErrors,
}

impl<'a> State<'a> {
    fn new(
        node: &'a Node,
        started: Instant,
        empty: &'a Ledger,
        errors: &'a LocalErrors,
    ) -> State<'a> {
        let cluster = node.cluster();
        State {
            node,
            cluster,
            ledger: cluster.map_or(empty, Cluster::ledger),
            started,
            now: Instant::now(),
            errors,
        }
    }
}

impl ApiState for State<'_> {
    fn node_info(&self) -> NodeInfo {
        let settings = self.cluster.map(Cluster::settings);
        NodeInfo {
            peer_id: self.node.peer_id(),
            uuid: settings.map(|s| s.uuid.clone()).unwrap_or_default(),
            hostname: settings.map(|s| s.hostname.clone()).unwrap_or_default(),
            role: self.cluster.and_then(Cluster::role).map(str::to_string),
            vpn_address: self.cluster.and_then(Cluster::address),
            network_id: settings.map(|s| s.network_id.clone()).unwrap_or_default(),
            version: env!("CARGO_PKG_VERSION"),
            uptime: self.now.saturating_duration_since(self.started),
            k3s: self.node.k3s_state().map(ToString::to_string),
        }
    }

    fn peers(&self) -> Vec<PeerStatus> {
        let connected = self.node.connected();
        self.node
            .transport()
            .peers()
            .map(|p| {
                let via = self.node.relay_via(&p.addr);
                PeerStatus {
                    peer_id: p.peer,
                    address: via
                        .and_then(|v| connected.get(&v).copied())
                        .unwrap_or(p.addr),
                    path: via.map_or(PeerPath::Direct, |via| PeerPath::Relayed { via }),
                    rtt: Some(p.rtt),
                    bytes_in: p.bytes_in,
                    bytes_out: p.bytes_out,
                }
            })
            .collect()
    }

    fn members(&self) -> Vec<MemberStatus> {
        self.node
            .members()
            .iter()
            .map(|(peer, m)| MemberStatus {
                peer_id: *peer,
                addresses: m.addrs.clone(),
                age: self.now.saturating_duration_since(m.fresh_at),
            })
            .collect()
    }

    fn cluster_nodes(&self) -> Vec<ClusterNode> {
        let Some(cluster) = self.cluster else {
            return Vec::new();
        };
        cluster
            .view()
            .nodes
            .iter()
            .map(|(uuid, n)| ClusterNode {
                uuid: uuid.clone(),
                peer_id: n.peer,
                hostname: n.hostname.clone(),
                role: n.role.clone(),
                live: n.live,
            })
            .collect()
    }

    fn ledger(&self) -> &Ledger {
        self.ledger
    }

    fn metrics(&self) -> Metrics {
        let t = self.node.transport().stats();
        let n = self.node.stats();
        let l = self.ledger.counters();
        let r = self
            .cluster
            .map(Cluster::replication_stats)
            .unwrap_or_default();
        let uuid = self.cluster.map(|c| c.settings().uuid.as_str());
        let relayed = self
            .node
            .connected()
            .values()
            .filter(|a| self.node.relay_via(a).is_some())
            .count();
        let discovery = |count: Option<usize>| match count {
            None => DiscoveryState::Disabled,
            Some(0) => DiscoveryState::Searching,
            Some(_) => DiscoveryState::Active,
        };
        let drops = vec![
            ("not_quic", t.drops.not_quic),
            ("over_connection_limit", t.drops.over_connection_limit),
            ("handshake_rate_limited", t.drops.handshake_rate_limited),
            ("ticket_refused", t.drops.tickets_refused),
            ("cert_rejected", t.drops.certs_rejected),
            ("oversize_message", t.drops.oversize_messages),
            ("reset_message", t.drops.reset_messages),
            ("message_stopped_by_peer", t.drops.messages_stopped_by_peer),
            ("unauthenticated", t.drops.unauthenticated),
            ("unknown_packet", n.unknown_packets),
            ("beacon_rejected", n.beacons_rejected),
            ("dht_rejected", n.dht_rejected),
            (
                "dht_record_rejected",
                self.node.kad().map_or(0, |k| k.stats().records_rejected),
            ),
            ("control_rejected", n.control_rejected),
            ("datagram_unused", n.datagrams_unused),
            ("relay_dropped", n.relay_dropped),
            ("vpn_queue_full", n.vpn_queue_full),
            ("vpn_send_failed", n.vpn_send_failed),
            ("sync_rejected", r.rejected),
            ("ledger_bad_signature", l.bad_signature),
            ("ledger_invalid", l.invalid),
            ("ledger_full", l.rejected_full),
            ("ledger_future", l.rejected_future),
            ("not_owner", l.not_owner),
            ("ledger_quota", l.rejected_quota),
        ];
        Metrics {
            uptime: self.now.saturating_duration_since(self.started),
            role: self.cluster.and_then(Cluster::role).map(str::to_string),
            leader: uuid.is_some() && self.cluster.and_then(Cluster::leader) == uuid,
            peers_connected: self.node.connected().len() as u64,
            peers_relayed: relayed as u64,
            members_known: self.node.members().len() as u64,
            cluster_nodes_live: self
                .cluster
                .map_or(0, |c| c.view().nodes.values().filter(|n| n.live).count())
                as u64,
            bytes_in: t.bytes_in,
            bytes_out: t.bytes_out,
            packets_in: t.packets_in,
            packets_out: t.packets_out,
            handshakes_ok: t.handshakes_ok,
            handshakes_failed: t.handshakes_failed,
            drops,
            errors: self.errors.as_metrics(),
            lan_discovery: discovery(self.node.lan_peer_count()),
            dht_discovery: discovery(self.node.kad().map(|k| k.routing_table().len())),
            ledger_entries: self.ledger.len() as u64,
            ledger_bytes: self.ledger.total_bytes() as u64,
            ledger_applied: l.applied,
            vpn: self.node.vpn().map(|v| *v.stats()),
            k3s_state: self.node.k3s_state().map(crate::k3s::K3sState::name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_one_clients_failure_lets_accept_go_on() {
        for again in [libc::EINTR, libc::ECONNABORTED, libc::EPROTO] {
            assert!(
                accept_again(&io::Error::from_raw_os_error(again)),
                "{again}"
            );
        }
        for stop in [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM] {
            assert!(!accept_again(&io::Error::from_raw_os_error(stop)), "{stop}");
        }
    }
}
