//! The local HTTP API served inside the driver's event loop, on up to three listeners:
//! loopback TCP (`APILISTEN`, inspection for every local user, everything with the bearer
//! token), the state directory's unix socket and Kairos' `/run/edgevpn-kairos.sock` (both mode
//! 0600: root's, with the peer's uid checked by `SO_PEERCRED`). Each listener has its own
//! connection budget, and a unix socket's unprivileged peers a separate one, so no client of
//! one level can fill the slots of another (see [`POOLS`]); in a full budget, a new connection
//! takes the slot of the one idle longest, and is served at once. Each connection is a sans-IO
//! [`Connection`] fed from a non-blocking stream; ledger writes a request asks for are applied
//! to the cluster before its response is sent.

use std::io::{self, Read, Write as _};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{
    DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _, PermissionsExt,
};
use std::path::{Path, PathBuf};
use std::time::Instant;

use mio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use mio::{Interest, Registry, Token};

use super::LocalErrors;
use crate::api::trust::{self, Access, BEARER_TOKEN_BYTES, BearerToken};
use crate::api::{
    ApiState, ClusterNode, Connection, DiscoveryState, MAX_FEED, MemberStatus, Metrics, NodeInfo,
    PeerPath, PeerStatus, handle,
};
use crate::api::{Response, Status};
use crate::cluster::Cluster;
use crate::ledger::{Ledger, LedgerError};
use crate::node::{Node, WriteError};

/// Where the API is served.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApiSettings {
    /// Loopback TCP (`APILISTEN`; `None`: not served on TCP).
    pub tcp: Option<SocketAddr>,
    /// The state directory's unix socket (`None`: none).
    pub socket: Option<PathBuf>,
    /// Kairos' socket, `/run/edgevpn-kairos.sock` (`None`: none). Shared by every agent and
    /// bridge of the machine: a live server's socket there is never taken over.
    pub kairos_socket: Option<PathBuf>,
    /// The bearer token's file (mode 0600), made on first start (`None`: TCP clients never get
    /// full access).
    pub token_file: Option<PathBuf>,
}

/// A connection budget: the listener it serves, whether its peers are privileged, and how many
/// connections it holds at most.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pool {
    listener: Token,
    privileged: bool,
    /// Most connections open at once; a new one beyond takes the slot of the one idle longest.
    pub max: usize,
}

use super::tokens::{
    API_FIRST_CONNECTION as FIRST_CONN, API_KAIROS_SOCKET as KAIROS_SOCKET,
    API_STATE_SOCKET as STATE_SOCKET, API_TCP as TCP_LISTENER,
};

/// Most TCP connections open at once (every local user can open them).
pub const MAX_TCP_CONNECTIONS: usize = 32;
/// Most connections from privileged peers (root, the agent's user) on each unix socket.
pub const MAX_UNIX_CONNECTIONS: usize = 16;
/// Most connections from other peers on each unix socket (they exist only where the socket's
/// mode was loosened by hand).
pub const MAX_UNPRIVILEGED_UNIX_CONNECTIONS: usize = 4;

/// The connection budgets, in slot order.
pub const POOLS: [Pool; 5] = [
    Pool {
        listener: TCP_LISTENER,
        privileged: false,
        max: MAX_TCP_CONNECTIONS,
    },
    Pool {
        listener: STATE_SOCKET,
        privileged: true,
        max: MAX_UNIX_CONNECTIONS,
    },
    Pool {
        listener: STATE_SOCKET,
        privileged: false,
        max: MAX_UNPRIVILEGED_UNIX_CONNECTIONS,
    },
    Pool {
        listener: KAIROS_SOCKET,
        privileged: true,
        max: MAX_UNIX_CONNECTIONS,
    },
    Pool {
        listener: KAIROS_SOCKET,
        privileged: false,
        max: MAX_UNPRIVILEGED_UNIX_CONNECTIONS,
    },
];

/// Every connection slot of every pool.
const MAX_CONNECTIONS: usize =
    MAX_TCP_CONNECTIONS + 2 * (MAX_UNIX_CONNECTIONS + MAX_UNPRIVILEGED_UNIX_CONNECTIONS);

/// The slots of the pool serving `listener`'s peers of that privilege.
fn pool_slots(listener: Token, privileged: bool) -> std::ops::Range<usize> {
    let mut start = 0;
    for pool in POOLS {
        if pool.listener == listener && pool.privileged == privileged {
            return start..start + pool.max;
        }
        start += pool.max;
    }
    0..0
}

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

    /// What the connection may do before any bearer token: TCP inspects, a unix peer by uid.
    fn access(&self) -> Access {
        match self {
            Stream::Tcp(_) => Access::Inspect,
            // SAFETY: geteuid cannot fail.
            Stream::Unix(s) => Access::of_unix_peer(peer_uid(s), unsafe { libc::geteuid() }),
        }
    }
}

/// The uid of a unix socket's peer, by `SO_PEERCRED` (`None` when the kernel does not say).
fn peer_uid(stream: &UnixStream) -> Option<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: u32::MAX,
        gid: u32::MAX,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes of a `ucred`, the size `len` says.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (rc == 0 && len as usize == std::mem::size_of::<libc::ucred>()).then_some(cred.uid)
}

struct Client {
    stream: Stream,
    conn: Connection,
    /// What the connection may do before any bearer token.
    access: Access,
    /// When bytes last moved either way (or it was accepted).
    last_progress: Instant,
    /// WRITABLE interest is registered.
    writable: bool,
    /// The socket failed: close it.
    broken: bool,
    /// The answer to a write, held until the ledger is saved; no further request of this
    /// connection is read meanwhile (answers keep their order).
    awaiting_save: Option<crate::api::Response>,
}

/// A bound listener.
enum Listener {
    Tcp(TcpListener),
    /// A unix socket and its path (removed on drop).
    Unix(UnixListener, PathBuf),
}

/// The API's listeners and connections.
pub struct Api {
    listeners: Vec<(Token, Listener)>,
    clients: Vec<Option<Client>>,
    bearer: Option<BearerToken>,
    started: Instant,
    /// Served when the node has no cluster layer.
    empty: Ledger,
    buf: Vec<u8>,
}

impl Api {
    /// Binds the listeners that are configured and registers them. A listener that cannot be
    /// bound is a warning: the others still serve.
    pub fn bind(registry: &Registry, settings: &ApiSettings, started: Instant) -> Api {
        let mut api = Api {
            listeners: Vec::new(),
            clients: (0..MAX_CONNECTIONS).map(|_| None).collect(),
            bearer: None,
            started,
            empty: Ledger::new(Default::default()),
            buf: vec![0; MAX_FEED],
        };
        let mut where_ = Vec::new();
        if let Some(addr) = settings.tcp {
            match TcpListener::bind(addr).and_then(|mut l| {
                registry.register(&mut l, TCP_LISTENER, Interest::READABLE)?;
                Ok(l)
            }) {
                Ok(l) => {
                    where_.push(l.local_addr().map_or(addr.to_string(), |a| a.to_string()));
                    api.listeners.push((TCP_LISTENER, Listener::Tcp(l)));
                }
                Err(e) => log::warn!("API: cannot listen on TCP {addr}: {e} (APILISTEN)"),
            }
        }
        for (token, path) in [
            (STATE_SOCKET, &settings.socket),
            (KAIROS_SOCKET, &settings.kairos_socket),
        ] {
            let Some(path) = path else { continue };
            match bind_unix(registry, path, token) {
                Ok(l) => {
                    where_.push(path.display().to_string());
                    api.listeners
                        .push((token, Listener::Unix(l, path.to_path_buf())));
                }
                Err(e) => log::warn!("API: cannot listen on {}: {e}", path.display()),
            }
        }
        if let Some(path) = &settings.token_file {
            match load_or_create_bearer(path) {
                Ok(token) => api.bearer = Some(token),
                Err(e) => log::warn!(
                    "API: no bearer token ({}: {e}); TCP clients can only inspect",
                    path.display()
                ),
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
            || token == STATE_SOCKET
            || token == KAIROS_SOCKET
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
        if self.listeners.iter().any(|(t, _)| *t == token) {
            self.accept_each(registry, token, node, errors);
        } else {
            self.serve(registry, token.0.wrapping_sub(FIRST_CONN), node, errors);
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

    /// Takes every connection the listener of `token` has queued.
    fn accept_each(
        &mut self,
        registry: &Registry,
        token: Token,
        node: &mut Node,
        errors: &mut LocalErrors,
    ) {
        loop {
            let Some((_, listener)) = self.listeners.iter().find(|(t, _)| *t == token) else {
                return;
            };
            let accepted = match listener {
                Listener::Tcp(l) => l.accept().map(|(stream, _)| {
                    let _ = stream.set_nodelay(true);
                    Stream::Tcp(stream)
                }),
                Listener::Unix(l, _) => l.accept().map(|(stream, _)| Stream::Unix(stream)),
            };
            match accepted {
                Ok(stream) => {
                    // Served at once: a request already sent is answered before the next
                    // accept of a burst can take the slot back (see `add`).
                    if let Some(i) = self.add(registry, token, stream) {
                        self.serve(registry, i, node, errors);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                // Interrupted, or a client gone before it was accepted: take the next one.
                Err(e) if accept_again(&e) => {}
                // Out of file descriptors or memory: the connection stays queued until the next
                // one arrives (edge-triggered readiness: no busy loop meanwhile).
                Err(e) => return accept_failed(errors, &e),
            }
        }
    }

    /// Takes a new connection into a free slot of its pool; in a full pool, the connection that
    /// moved no byte for the longest is closed to make room (a slow client holding slots loses
    /// them to clients that talk, instead of locking them out). Returns its slot.
    fn add(&mut self, registry: &Registry, listener: Token, mut stream: Stream) -> Option<usize> {
        let access = stream.access();
        let privileged = listener != TCP_LISTENER && access == Access::Full;
        let slots = pool_slots(listener, privileged);
        let free = slots.clone().find(|&i| self.clients[i].is_none());
        let i = match free {
            Some(i) => i,
            None => {
                let stalest = slots
                    .clone()
                    .min_by_key(|&i| self.clients[i].as_ref().map(|c| c.last_progress))?;
                log::debug!(
                    "API: {} connections open on {listener:?} (privileged: {privileged}), \
                     closing the one idle longest",
                    slots.len()
                );
                if let Some(mut old) = self.clients[stalest].take() {
                    old.stream.deregister(registry);
                }
                stalest
            }
        };
        if let Err(e) = stream.register(registry, Token(FIRST_CONN + i), Interest::READABLE) {
            log::debug!("API register: {e}");
            return None;
        }
        let now = Instant::now();
        self.clients[i] = Some(Client {
            stream,
            conn: Connection::new(now),
            access,
            last_progress: now,
            writable: false,
            broken: false,
            awaiting_save: None,
        });
        Some(i)
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
        let state_parts = (self.started, &self.empty, errors, self.bearer.as_ref());
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
        for (_, listener) in &self.listeners {
            if let Listener::Unix(_, path) = listener {
                let _ = std::fs::remove_file(path);
            }
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

/// Binds the unix socket at `path`, readable and writable by the owner only, and never
/// otherwise: it is bound inside a fresh 0700 directory beside `path`, made 0600 there and only
/// then moved to `path` (bound directly, it would carry the umask's mode, up to 0777, until the
/// chmod). The staging path `<dir>/.s<pid>/s` is at most three bytes longer than
/// `<dir>/api.sock`. A socket left at `path` by a process that is gone is replaced; one that a
/// live server answers on is left alone (an error): two agents never steal each other's socket.
fn bind_unix(registry: &Registry, path: &Path, token: Token) -> io::Result<UnixListener> {
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            "another server answers on it (another agent or bridge?); left to it",
        ));
    }
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
    registry.register(&mut listener, token, Interest::READABLE)?;
    Ok(listener)
}

/// The bearer token kept at `path`: read back when it is ours, mode 0600 and well formed; else
/// a new one from the system's random generator, written 0600 beside it and renamed into place
/// (a token that others could read may have leaked: it is replaced).
pub fn load_or_create_bearer(path: &Path) -> io::Result<BearerToken> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        // SAFETY: geteuid cannot fail.
        let ours = meta.uid() == unsafe { libc::geteuid() };
        if meta.is_file() && ours && meta.mode() & 0o077 == 0 {
            let text = std::fs::read_to_string(path)?;
            if let Some(token) = BearerToken::parse(&text) {
                return Ok(token);
            }
        }
        log::warn!(
            "API: replacing the bearer token at {} (not a 0600 file of ours holding a token)",
            path.display()
        );
    }
    let mut secret = [0u8; BEARER_TOKEN_BYTES];
    getrandom::fill(&mut secret).map_err(|e| io::Error::other(e.to_string()))?;
    let token = BearerToken::from_bytes(&secret);
    let staged = path.with_extension(format!("tmp{}", std::process::id()));
    let _ = std::fs::remove_file(&staged);
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&staged)
        .and_then(|mut f| {
            f.write_all(format!("{}\n", token.as_str()).as_bytes())?;
            f.sync_all()
        })
        .and_then(|()| std::fs::rename(&staged, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&staged);
    }
    written.map(|()| token)
}

/// Reads until the socket would block (or the connection wants no more), answers the requests,
/// writes until the socket would block, and goes round again while anything moved.
fn pump(
    client: &mut Client,
    buf: &mut [u8],
    node: &mut Node,
    (started, empty, errors, bearer): (Instant, &Ledger, &LocalErrors, Option<&BearerToken>),
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
            let outcome = match trust::request_access(client.access, &request, bearer) {
                Ok(access) => {
                    let state = State::new(node, started, empty, errors);
                    handle(&request, &state, access)
                }
                Err(refusal) => refusal.into(),
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
        if progress {
            client.last_progress = Instant::now();
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
            second_masters: self
                .cluster
                .map(|c| c.second_masters().to_vec())
                .unwrap_or_default(),
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

    fn unix_ms(&self) -> u64 {
        super::clocks().1
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
            ("vpn_held_dropped", n.vpn_held_dropped),
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
            second_masters: self.cluster.map_or(0, |c| c.second_masters().len() as u64),
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

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("kp-api-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn bearer_token_is_kept_0600_and_a_loose_one_replaced() {
        let dir = scratch("bearer");
        let path = dir.join(trust::BEARER_TOKEN_FILE);
        let first = load_or_create_bearer(&path).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert_eq!(
            load_or_create_bearer(&path).unwrap(),
            first,
            "kept across starts"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let second = load_or_create_bearer(&path).unwrap();
        assert_ne!(second, first, "a token others could read is replaced");
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        std::fs::write(&path, "not a token").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_ne!(load_or_create_bearer(&path).unwrap(), second);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_live_socket_is_never_taken_and_a_stale_one_is_replaced() {
        let dir = scratch("sock");
        let path = dir.join("edgevpn-kairos.sock");
        let poll = mio::Poll::new().unwrap();
        let live = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let e = bind_unix(poll.registry(), &path, KAIROS_SOCKET).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse, "{e}");
        assert!(
            std::os::unix::net::UnixStream::connect(&path).is_ok(),
            "still the live one's"
        );
        drop(live); // Its file stays: stale.
        let _ours = bind_unix(poll.registry(), &path, KAIROS_SOCKET).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        assert!(std::os::unix::net::UnixStream::connect(&path).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn pools_split_the_slots_by_listener_and_privilege() {
        let tcp = pool_slots(TCP_LISTENER, false);
        let root = pool_slots(STATE_SOCKET, true);
        let other = pool_slots(STATE_SOCKET, false);
        let kairos_root = pool_slots(KAIROS_SOCKET, true);
        assert_eq!(tcp.len(), MAX_TCP_CONNECTIONS);
        assert_eq!(root.len(), MAX_UNIX_CONNECTIONS);
        assert_eq!(other.len(), MAX_UNPRIVILEGED_UNIX_CONNECTIONS);
        assert_eq!(pool_slots(KAIROS_SOCKET, false).end, MAX_CONNECTIONS);
        for (a, b) in [(&tcp, &root), (&root, &other), (&other, &kairos_root)] {
            assert_eq!(a.end, b.start, "contiguous, disjoint");
        }
        assert!(
            pool_slots(TCP_LISTENER, true).is_empty(),
            "TCP has no privileged pool"
        );
    }

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
