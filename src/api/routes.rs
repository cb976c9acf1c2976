//! The endpoints of the local API, answered from an [`ApiState`] snapshot.
//!
//! # edgevpn compatibility
//! Shapes follow edgevpn's `api/api.go`, `api/types/*.go`, `pkg/types/*.go` and
//! `pkg/blockchain/{block,data,ledger}.go` (github.com/mudler/edgevpn): JSON with Go's PascalCase
//! field names, a newline after each document, `{"message": ...}` errors.
//!
//! | route | body |
//! |---|---|
//! | `GET /api/summary` | `types.Summary`, plus this node's `UUID`, `Hostname`, `Role`, `Address`, `NetworkID`, `Version`, `UptimeSeconds`, `K3s` |
//! | `GET /api/machines` | `[api/types.Machine]`: the `machines` bucket with `Connected`, `OnChain`, `Online`, plus `Role` |
//! | `GET /api/nodes` | `[api/types.Peer]` (`ID`, `Online`) of the online nodes, plus `UUID`, `Hostname`, `Role`, `Addresses`, `Connected`, `Relayed`, `RttMs`, `BytesIn`, `BytesOut` |
//! | `GET /api/peerstore` | `[api/types.Peer]` of every member known |
//! | `GET /api/users`, `/api/services`, `/api/files` | the `users`, `services`, `files` buckets decoded as `types.User`, `types.Service`, `types.File` |
//! | `GET /api/blockchain` | a `blockchain.Block` of `SignedData` entries, as v0.35's ownership mode (see Deviations) |
//! | `GET /api/ledger` | `{"bucket": {"key": "value"}}`, live values only |
//! | `GET /api/ledger/:bucket` | `{"key": "value"}`, or `null` for a bucket without live values |
//! | `GET /api/ledger/:bucket/:key` | `"value"`, or `""` when absent |
//! | `PUT /api/ledger/:bucket/:key/:value` | `{"State": "Announcing"}`; stores `value` as edgevpn does |
//! | `DELETE /api/ledger/:bucket[/:key]` | `{"State": "Announcing"}`; deletes the live keys |
//! | `GET /api/dns` | `[api/types.DNS]` of the `dns` bucket (see [`dns`]) |
//! | `POST /api/dns` | `{"State": "Announcing"}`; stores an `api/types.DNS` record set |
//! | `GET /api/metrics` | libp2p's bandwidth `Stats` (`TotalIn`, `TotalOut`) |
//! | `GET /api/metrics/peer[/:peer]` | the same per connected peer |
//! | `GET /metrics` | Prometheus text (ours) |
//! | `GET /` | the status page (ours) |
//!
//! Values are edgevpn's `blockchain.Data` as a JSON string, made by [`data::data`] from the
//! stored bytes (bytes that are not UTF-8 read as U+FFFD, as Go's encoder does). A `PUT` stores
//! the decoded path segment as a JSON string literal (`PUT .../k/hello` stores `"hello"`, quotes
//! included), exactly what edgevpn's `Ledger.Persist` stores, and shown as stored, so edgevpn's Go
//! client (`Put`, then `GetBucketKey`) round-trips; the agents' own plain values are shown as
//! the Go client would have stored them (see [`data`]).
//!
//! # Deviations
//! - Online means: this node, a connected peer, or a cluster node the ledger counts as live
//!   (`cluster::liveness`)
//!   (edgevpn: a `healthcheck` entry younger than 10 to 20 minutes). `OnChain` (edgevpn: subscribed
//!   to the gossip topic) means a known member; `Peers` in the summary counts the known members
//!   (edgevpn: the libp2p peerstore, DHT strangers included) and `OnChainNodes` the connected ones.
//! - Entries of `machines`, `users`, `services` and `files` that are not JSON objects of the
//!   expected shape are left out (edgevpn lists them with empty fields).
//! - Deleting a key or bucket writes tombstones only for keys held here, as edgevpn does; a PUT
//!   of the value already held writes nothing.
//! - There are no blocks. `/api/blockchain` gives `Index` = ledger entries stored since start
//!   (also the summary's `BlockChain`), `Timestamp` = the newest entry's version time in Go's
//!   `time.Time.String()` form, `Storage` = every entry (tombstones too) as a `SignedData`
//!   (`Value`, `Owner` = writer, `Version` = hybrid-logical version, `UpdatedAt` = its unix
//!   seconds, `Deleted`, `Sig` = our Ed25519 signature, over our signing message, not edgevpn's
//!   canonical bytes), `Hash` = SHA-256 (hex) of `Storage`'s JSON (equal on nodes holding equal
//!   entries) and an empty `PrevHash`.
//! - `RateIn`/`RateOut` are left out of the bandwidth stats (no rates are measured).
//! - `/api/peergate` (no peer gater), `/api/metrics/protocol` (no libp2p protocols) and pprof
//!   are not served (404).
//! - Requests whose `Host` is a DNS name other than `localhost` get 403 (DNS-rebinding defence:
//!   the ledger holds the cluster's kubeconfig and join token).
//! - Trust levels ([`trust`]): below [`Access::Full`] every method but `GET`/`HEAD` gets 403, a
//!   secret key's value 403, and collections leave secret keys out. At every level, deleting a
//!   reserved key or a bucket that holds one gets 403.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::data::{self, civil_from_days};
use super::dns;
use super::http::{CONTENT_TYPE_PROMETHEUS, Method, Request, Response, Status};
use super::metrics::{Metrics, render_prometheus};
use super::page;
use super::trust::{self, Access};
use crate::cluster::Write;
use crate::identity::PeerId;
use crate::ledger::{Ledger, MAX_BUCKET_LEN, MAX_KEY_LEN, names};

/// Largest value a `PUT` carries (the decoded path segment).
pub const MAX_PUT_VALUE: usize = 64 * 1024;

/// This node, as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    /// Its peer id.
    pub peer_id: PeerId,
    /// Its Kairos node uuid.
    pub uuid: String,
    /// Its hostname.
    pub hostname: String,
    /// The k3s role it holds, if any.
    pub role: Option<String>,
    /// Its VPN address, once settled.
    pub vpn_address: Option<Ipv4Addr>,
    /// `p2p.network_id` (the cluster bucket).
    pub network_id: String,
    /// This build's version.
    pub version: &'static str,
    /// Time since the agent started.
    pub uptime: Duration,
    /// Where this node's k3s stands (`None`: no k3s layer, e.g. a bridge).
    pub k3s: Option<String>,
    /// Nodes other than the chosen master holding a master role (a second k3s cluster).
    pub second_masters: Vec<String>,
}

/// How packets reach a connected peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerPath {
    /// Straight to its address.
    Direct,
    /// Through another member.
    Relayed {
        /// The member forwarding the packets.
        via: PeerId,
    },
}

/// A connected peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStatus {
    /// Its peer id.
    pub peer_id: PeerId,
    /// Where its packets go (for a relayed peer, the relay's address).
    pub address: SocketAddr,
    /// Direct or relayed.
    pub path: PeerPath,
    /// Smoothed round-trip time, when measured.
    pub rtt: Option<Duration>,
    /// Bytes received on its connection.
    pub bytes_in: u64,
    /// Bytes sent on its connection.
    pub bytes_out: u64,
}

/// A member this node knows of (connected or not).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberStatus {
    /// Its peer id.
    pub peer_id: PeerId,
    /// Where it is reachable.
    pub addresses: Vec<SocketAddr>,
    /// Age of the freshest news of it.
    pub age: Duration,
}

/// A node of this cluster (`network_id`), from the ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterNode {
    /// Its Kairos uuid.
    pub uuid: String,
    /// Its peer id.
    pub peer_id: PeerId,
    /// Its hostname.
    pub hostname: String,
    /// Its k3s role, if any.
    pub role: Option<String>,
    /// The ledger counts it as live (`cluster::liveness`).
    pub live: bool,
}

/// What the handlers read; the driver implements it over the node and the cluster.
pub trait ApiState {
    /// This node.
    fn node_info(&self) -> NodeInfo;
    /// Connected peers.
    fn peers(&self) -> Vec<PeerStatus>;
    /// Known members.
    fn members(&self) -> Vec<MemberStatus>;
    /// The nodes of this cluster, this one included.
    fn cluster_nodes(&self) -> Vec<ClusterNode>;
    /// The replicated ledger.
    fn ledger(&self) -> &Ledger;
    /// Counters for `/metrics`.
    fn metrics(&self) -> Metrics;
    /// The wall clock, in unix milliseconds.
    fn unix_ms(&self) -> u64;
}

/// The answer to a request, and the ledger writes it asks for (apply them, then send the
/// response).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The response.
    pub response: Response,
    /// Ledger writes to sign and gossip.
    pub writes: Vec<Write>,
}

impl From<Response> for Outcome {
    fn from(response: Response) -> Self {
        Outcome {
            response,
            writes: Vec::new(),
        }
    }
}

/// The endpoint a path names.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Route {
    /// A read-only resource (`GET`, `HEAD`).
    Read(Resource),
    /// `/api/ledger/:bucket` (`GET`, `HEAD`, `DELETE`).
    Bucket(String),
    /// `/api/ledger/:bucket/:key` (`GET`, `HEAD`, `DELETE`).
    Key(String, String),
    /// `/api/ledger/:bucket/:key/:value` (`PUT`).
    KeyValue(String, String, String),
    /// `/api/dns` (`GET`, `HEAD`, `POST`: a write).
    Dns,
}

/// What a `GET` reads.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Resource {
    StatusPage,
    Prometheus,
    Summary,
    Machines,
    Nodes,
    Peerstore,
    Users,
    Services,
    Files,
    Blockchain,
    Ledger,
    Bucket(String),
    Value(String, String),
    Bandwidth,
    BandwidthByPeer,
    BandwidthOfPeer(String),
}

impl Route {
    fn parse(segments: &[String]) -> Option<Route> {
        let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
        let resource = match segments.as_slice() {
            [] => Resource::StatusPage,
            ["metrics"] => Resource::Prometheus,
            ["api", "summary"] => Resource::Summary,
            ["api", "machines"] => Resource::Machines,
            ["api", "nodes"] => Resource::Nodes,
            ["api", "peerstore"] => Resource::Peerstore,
            ["api", "users"] => Resource::Users,
            ["api", "services"] => Resource::Services,
            ["api", "files"] => Resource::Files,
            ["api", "blockchain"] => Resource::Blockchain,
            ["api", "ledger"] => Resource::Ledger,
            ["api", "metrics"] => Resource::Bandwidth,
            ["api", "metrics", "peer"] => Resource::BandwidthByPeer,
            ["api", "metrics", "peer", peer] => Resource::BandwidthOfPeer(peer.to_string()),
            ["api", "dns"] => return Some(Route::Dns),
            ["api", "ledger", bucket] => return Some(Route::Bucket(bucket.to_string())),
            ["api", "ledger", bucket, key] => {
                return Some(Route::Key(bucket.to_string(), key.to_string()));
            }
            ["api", "ledger", bucket, key, value] => {
                return Some(Route::KeyValue(
                    bucket.to_string(),
                    key.to_string(),
                    value.to_string(),
                ));
            }
            _ => return None,
        };
        Some(Route::Read(resource))
    }

    /// The `Allow` header of the route.
    fn allow(&self) -> &'static str {
        match self {
            Route::Read(_) => "GET, HEAD",
            Route::Bucket(_) | Route::Key(..) => "GET, HEAD, DELETE",
            Route::KeyValue(..) => "PUT",
            Route::Dns => "GET, HEAD, POST",
        }
    }
}

/// Answers `request` from `state` for a client with `access` (see [`trust`]): every method but
/// `GET` and `HEAD` needs [`Access::Full`], and secrets are hidden from [`Access::Inspect`].
pub fn handle(request: &Request, state: &dyn ApiState, access: Access) -> Outcome {
    if !host_is_local(request.host.as_deref()) {
        return Response::error(Status::Forbidden, "Host must be localhost or an IP address")
            .into();
    }
    if access < Access::Full && !matches!(request.method, Method::Get | Method::Head) {
        return trust::write_needs_full().into();
    }
    let segments = match request.segments() {
        Ok(segments) => segments,
        Err(e) => return Response::error(Status::BadRequest, &e.to_string()).into(),
    };
    let Some(route) = Route::parse(&segments) else {
        return Response::error(Status::NotFound, "Not Found").into();
    };
    let ledger = state.ledger();
    match (request.method, route) {
        (Method::Get | Method::Head, Route::Read(resource)) => read(resource, state, access).into(),
        (Method::Get | Method::Head, Route::Bucket(bucket)) => {
            read(Resource::Bucket(bucket), state, access).into()
        }
        (Method::Get | Method::Head, Route::Key(bucket, key)) => {
            if access < Access::Full && trust::is_secret_key(&key) {
                return trust::secret_needs_full(&key).into();
            }
            read(Resource::Value(bucket, key), state, access).into()
        }
        (Method::Delete, Route::Bucket(bucket)) => delete_bucket(ledger, &bucket),
        (Method::Delete, Route::Key(bucket, key)) => delete_key(ledger, &bucket, &key),
        (Method::Put, Route::KeyValue(bucket, key, value)) => put(ledger, &bucket, &key, &value),
        (Method::Get | Method::Head, Route::Dns) => dns::list(ledger).into(),
        (Method::Post, Route::Dns) => dns::post(ledger, &request.body),
        (_, route) => {
            let mut response = Response::error(Status::MethodNotAllowed, "Method Not Allowed");
            response.allow = Some(route.allow());
            response.into()
        }
    }
}

/// Answers a `GET` (or `HEAD`); collections leave secrets out below [`Access::Full`].
fn read(resource: Resource, state: &dyn ApiState, access: Access) -> Response {
    let ledger = state.ledger();
    let now_ms = state.unix_ms();
    match resource {
        Resource::StatusPage => page::status_page(),
        Resource::Prometheus => Response::content(
            CONTENT_TYPE_PROMETHEUS,
            render_prometheus(&state.metrics()).into_bytes(),
        ),
        Resource::Summary => Response::json(Status::Ok, &summary(state)),
        Resource::Machines => Response::json(Status::Ok, &machines(state)),
        Resource::Nodes => Response::json(Status::Ok, &nodes(state)),
        Resource::Peerstore => Response::json(Status::Ok, &peerstore(state)),
        Resource::Users => Response::json(Status::Ok, &decode_bucket::<User>(ledger, USERS)),
        Resource::Services => {
            Response::json(Status::Ok, &decode_bucket::<Service>(ledger, SERVICES))
        }
        Resource::Files => Response::json(Status::Ok, &decode_bucket::<File>(ledger, FILES)),
        Resource::Blockchain => Response::json(Status::Ok, &Block::of(ledger, now_ms, access)),
        Resource::Ledger => Response::json(Status::Ok, &storage(ledger, now_ms, access)),
        Resource::Bucket(bucket) => {
            Response::json(Status::Ok, &bucket_values(ledger, now_ms, &bucket, access))
        }
        Resource::Value(bucket, key) => {
            let value = ledger
                .get(&bucket, &key)
                .map(|stored| data::data(ledger, now_ms, &bucket, &key, stored));
            Response::json(Status::Ok, &value.unwrap_or_default())
        }
        Resource::Bandwidth => {
            let metrics = state.metrics();
            let totals = Bandwidth {
                total_in: metrics.bytes_in,
                total_out: metrics.bytes_out,
            };
            Response::json(Status::Ok, &totals)
        }
        Resource::BandwidthByPeer => {
            let by_peer: BTreeMap<String, Bandwidth> = state
                .peers()
                .iter()
                .map(|p| (p.peer_id.to_string(), Bandwidth::of(p)))
                .collect();
            Response::json(Status::Ok, &by_peer)
        }
        Resource::BandwidthOfPeer(id) => {
            let stats = state
                .peers()
                .iter()
                .find(|p| p.peer_id.to_string() == id)
                .map(Bandwidth::of)
                .unwrap_or_default();
            Response::json(Status::Ok, &stats)
        }
    }
}

/// edgevpn's answer to every write: it announces the change until the ledger holds it.
#[derive(Serialize)]
struct Announcing {
    #[serde(rename = "State")]
    state: &'static str,
}

pub(super) fn announcing(writes: Vec<Write>) -> Outcome {
    Outcome {
        response: Response::json(
            Status::Ok,
            &Announcing {
                state: "Announcing",
            },
        ),
        writes,
    }
}

fn put(ledger: &Ledger, bucket: &str, key: &str, value: &str) -> Outcome {
    if let Err(message) = check_names(bucket, key) {
        return Response::error(Status::BadRequest, &message).into();
    }
    if value.len() > MAX_PUT_VALUE {
        return Response::error(Status::ContentTooLarge, "value over 64 KiB").into();
    }
    // What edgevpn's Ledger.Persist stores: the value marshalled as JSON.
    let stored = match serde_json::to_string(value) {
        Ok(stored) => stored,
        Err(_) => return Response::error(Status::BadRequest, "value is not storable").into(),
    };
    if stored.len() > ledger.limits().max_value_bytes {
        return Response::error(Status::ContentTooLarge, "value over the ledger's limit").into();
    }
    if ledger.get(bucket, key) == Some(stored.as_bytes()) {
        return announcing(Vec::new());
    }
    announcing(vec![Write::put(bucket, key, stored)])
}

fn delete_key(ledger: &Ledger, bucket: &str, key: &str) -> Outcome {
    if let Err(message) = check_names(bucket, key) {
        return Response::error(Status::BadRequest, &message).into();
    }
    if let Some(refusal) = trust::delete_key_refusal(bucket, key) {
        return Response::error(Status::Forbidden, &refusal).into();
    }
    let held = ledger.get(bucket, key).is_some();
    announcing(
        held.then(|| Write::delete(bucket, key))
            .into_iter()
            .collect(),
    )
}

fn delete_bucket(ledger: &Ledger, bucket: &str) -> Outcome {
    if let Some(problem) = name_problem(bucket, MAX_BUCKET_LEN) {
        return Response::error(Status::BadRequest, &format!("bucket name {problem}")).into();
    }
    if let Some(refusal) =
        trust::delete_bucket_refusal(bucket, ledger.bucket(bucket).map(|(key, _)| key))
    {
        return Response::error(Status::Forbidden, &refusal).into();
    }
    let writes = ledger
        .bucket(bucket)
        .map(|(key, _)| Write::delete(bucket, key))
        .collect();
    announcing(writes)
}

/// The ledger's rules for names: not empty, not too long, no control character.
fn name_problem(name: &str, max: usize) -> Option<&'static str> {
    if name.is_empty() {
        Some("is empty")
    } else if name.len() > max {
        Some("is too long")
    } else if name.chars().any(char::is_control) {
        Some("holds a control character")
    } else {
        None
    }
}

fn check_names(bucket: &str, key: &str) -> Result<(), String> {
    if let Some(problem) = name_problem(bucket, MAX_BUCKET_LEN) {
        return Err(format!("bucket name {problem}"));
    }
    if let Some(problem) = name_problem(key, MAX_KEY_LEN) {
        return Err(format!("key {problem}"));
    }
    Ok(())
}

/// True for requests a browser can only send from a page served by this machine: no `Host`, an
/// IP address (any port), `localhost` or a name under `.localhost`.
fn host_is_local(host: Option<&str>) -> bool {
    let Some(host) = host else {
        return true;
    };
    if host.is_empty() {
        return true;
    }
    if let Some(rest) = host.strip_prefix('[') {
        return rest
            .split_once(']')
            .is_some_and(|(ip, _)| ip.parse::<Ipv6Addr>().is_ok());
    }
    if host.parse::<IpAddr>().is_ok() {
        return true;
    }
    let name = host.rsplit_once(':').map_or(host, |(name, _)| name);
    if name.parse::<Ipv4Addr>().is_ok() {
        return true;
    }
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    name == "localhost" || name.ends_with(".localhost")
}

// ---- edgevpn's bucket names and shapes ----

/// edgevpn's `protocol.UsersLedgerKey`.
const USERS: &str = "users";
/// edgevpn's `protocol.ServicesLedgerKey`.
const SERVICES: &str = "services";
/// edgevpn's `protocol.FilesLedgerKey`.
const FILES: &str = "files";

/// edgevpn's `types.Summary`, with this node's details added after its fields.
#[derive(Serialize)]
struct Summary {
    #[serde(rename = "Files")]
    files: usize,
    #[serde(rename = "Machines")]
    machines: usize,
    #[serde(rename = "Users")]
    users: usize,
    #[serde(rename = "Services")]
    services: usize,
    /// edgevpn: the number of blocks; here the ledger entries stored since start.
    #[serde(rename = "BlockChain")]
    blockchain: u64,
    #[serde(rename = "OnChainNodes")]
    on_chain_nodes: usize,
    #[serde(rename = "Peers")]
    peers: usize,
    #[serde(rename = "NodeID")]
    node_id: String,
    #[serde(rename = "UUID")]
    uuid: String,
    #[serde(rename = "Hostname")]
    hostname: String,
    #[serde(rename = "Role")]
    role: String,
    #[serde(rename = "Address")]
    address: String,
    #[serde(rename = "NetworkID")]
    network_id: String,
    #[serde(rename = "Version")]
    version: &'static str,
    #[serde(rename = "UptimeSeconds")]
    uptime_seconds: u64,
    /// Where this node's k3s stands (`""`: no k3s layer).
    #[serde(rename = "K3s")]
    k3s: String,
    /// Nodes other than the chosen master holding a master role: a second k3s cluster.
    #[serde(rename = "SecondMasters")]
    second_masters: Vec<String>,
}

fn summary(state: &dyn ApiState) -> Summary {
    let ledger = state.ledger();
    let node = state.node_info();
    let count = |bucket: &str| ledger.bucket(bucket).count();
    Summary {
        files: count(FILES),
        machines: count(names::MACHINES),
        users: count(USERS),
        services: count(SERVICES),
        blockchain: block_index(ledger),
        on_chain_nodes: state.peers().len(),
        peers: state.members().len(),
        node_id: node.peer_id.to_string(),
        uuid: node.uuid,
        hostname: node.hostname,
        role: node.role.unwrap_or_default(),
        address: node.vpn_address.map(|a| a.to_string()).unwrap_or_default(),
        network_id: node.network_id,
        version: node.version,
        uptime_seconds: node.uptime.as_secs(),
        k3s: node.k3s.unwrap_or_default(),
        second_masters: node.second_masters,
    }
}

/// edgevpn's `types.Machine`, as stored in the `machines` bucket (missing fields read as empty).
#[derive(Serialize, Deserialize, Default)]
#[serde(default)]
struct MachineRecord {
    #[serde(rename = "PeerID")]
    peer_id: String,
    #[serde(rename = "Hostname")]
    hostname: String,
    #[serde(rename = "OS")]
    os: String,
    #[serde(rename = "Arch")]
    arch: String,
    #[serde(rename = "Address")]
    address: String,
    #[serde(rename = "Version")]
    version: String,
}

/// edgevpn's `api/types.Machine` (the record and three flags), plus the peer's cluster role.
#[derive(Serialize)]
struct Machine {
    #[serde(flatten)]
    record: MachineRecord,
    #[serde(rename = "Connected")]
    connected: bool,
    #[serde(rename = "OnChain")]
    on_chain: bool,
    #[serde(rename = "Online")]
    online: bool,
    #[serde(rename = "Role")]
    role: String,
}

/// Who is connected, known and online, by printed peer id.
struct Presence {
    me: NodeInfo,
    peers: BTreeMap<String, PeerStatus>,
    members: BTreeMap<String, MemberStatus>,
    nodes: BTreeMap<String, ClusterNode>,
}

impl Presence {
    fn of(state: &dyn ApiState) -> Presence {
        Presence {
            me: state.node_info(),
            peers: state
                .peers()
                .into_iter()
                .map(|p| (p.peer_id.to_string(), p))
                .collect(),
            members: state
                .members()
                .into_iter()
                .map(|m| (m.peer_id.to_string(), m))
                .collect(),
            nodes: state
                .cluster_nodes()
                .into_iter()
                .map(|n| (n.peer_id.to_string(), n))
                .collect(),
        }
    }

    fn is_me(&self, id: &str) -> bool {
        self.me.peer_id.to_string() == id
    }

    fn connected(&self, id: &str) -> bool {
        self.peers.contains_key(id)
    }

    fn known(&self, id: &str) -> bool {
        self.connected(id) || self.members.contains_key(id)
    }

    fn online(&self, id: &str) -> bool {
        self.is_me(id) || self.connected(id) || self.nodes.get(id).is_some_and(|n| n.live)
    }

    fn role(&self, id: &str) -> String {
        if self.is_me(id) {
            return self.me.role.clone().unwrap_or_default();
        }
        self.nodes
            .get(id)
            .and_then(|n| n.role.clone())
            .unwrap_or_default()
    }
}

fn machines(state: &dyn ApiState) -> Vec<Machine> {
    let presence = Presence::of(state);
    state
        .ledger()
        .bucket(names::MACHINES)
        .filter_map(|(_, value)| serde_json::from_slice::<MachineRecord>(value).ok())
        .map(|record| Machine {
            connected: presence.connected(&record.peer_id),
            on_chain: presence.known(&record.peer_id),
            online: presence.online(&record.peer_id),
            role: presence.role(&record.peer_id),
            record,
        })
        .collect()
}

/// edgevpn's `api/types.Peer`, plus what this node knows of it.
#[derive(Serialize)]
struct Node {
    #[serde(rename = "ID")]
    id: String,
    #[serde(rename = "Online")]
    online: bool,
    #[serde(rename = "UUID")]
    uuid: String,
    #[serde(rename = "Hostname")]
    hostname: String,
    #[serde(rename = "Role")]
    role: String,
    /// Where it is reachable: the connection's address first, then the other known ones.
    #[serde(rename = "Addresses")]
    addresses: Vec<String>,
    #[serde(rename = "Connected")]
    connected: bool,
    #[serde(rename = "Relayed")]
    relayed: bool,
    /// Round-trip time in milliseconds (`null` when not connected or not measured).
    #[serde(rename = "RttMs")]
    rtt_ms: Option<f64>,
    #[serde(rename = "BytesIn")]
    bytes_in: u64,
    #[serde(rename = "BytesOut")]
    bytes_out: u64,
}

/// The online nodes, this one included, ordered by id (edgevpn lists only online ones too).
fn nodes(state: &dyn ApiState) -> Vec<Node> {
    let presence = Presence::of(state);
    let me = presence.me.peer_id.to_string();
    let ids: BTreeSet<&String> = std::iter::once(&me)
        .chain(presence.peers.keys())
        .chain(presence.nodes.keys())
        .filter(|id| presence.online(id))
        .collect();
    ids.into_iter()
        .map(|id| {
            let peer = presence.peers.get(id);
            let node = presence.nodes.get(id);
            let mut addresses: Vec<String> =
                peer.map(|p| p.address.to_string()).into_iter().collect();
            for addr in presence.members.get(id).map_or(&[][..], |m| &m.addresses) {
                let addr = addr.to_string();
                if !addresses.contains(&addr) {
                    addresses.push(addr);
                }
            }
            let (uuid, hostname) = if presence.is_me(id) {
                (presence.me.uuid.clone(), presence.me.hostname.clone())
            } else {
                node.map(|n| (n.uuid.clone(), n.hostname.clone()))
                    .unwrap_or_default()
            };
            Node {
                id: id.clone(),
                online: true,
                uuid,
                hostname,
                role: presence.role(id),
                addresses,
                connected: peer.is_some(),
                relayed: peer.is_some_and(|p| matches!(p.path, PeerPath::Relayed { .. })),
                rtt_ms: peer
                    .and_then(|p| p.rtt)
                    .map(|rtt| rtt.as_secs_f64() * 1000.0),
                bytes_in: peer.map_or(0, |p| p.bytes_in),
                bytes_out: peer.map_or(0, |p| p.bytes_out),
            }
        })
        .collect()
}

/// edgevpn's `api/types.Peer` for the peerstore listing.
#[derive(Serialize)]
struct PeerEntry {
    #[serde(rename = "ID")]
    id: String,
    #[serde(rename = "Online")]
    online: bool,
}

/// Every member known or connected (edgevpn: the libp2p peerstore, which leaves `Online` false).
fn peerstore(state: &dyn ApiState) -> Vec<PeerEntry> {
    let presence = Presence::of(state);
    let ids: BTreeSet<&String> = presence
        .members
        .keys()
        .chain(presence.peers.keys())
        .collect();
    ids.into_iter()
        .map(|id| PeerEntry {
            id: id.clone(),
            online: presence.online(id),
        })
        .collect()
}

/// edgevpn's `types.User`.
#[derive(Serialize, Deserialize)]
struct User {
    #[serde(rename = "PeerID", default)]
    peer_id: String,
    #[serde(rename = "Timestamp", default)]
    timestamp: String,
}

/// edgevpn's `types.Service`.
#[derive(Serialize, Deserialize)]
struct Service {
    #[serde(rename = "PeerID", default)]
    peer_id: String,
    #[serde(rename = "Name", default)]
    name: String,
}

/// edgevpn's `types.File`.
#[derive(Serialize, Deserialize)]
struct File {
    #[serde(rename = "PeerID", default)]
    peer_id: String,
    #[serde(rename = "Name", default)]
    name: String,
}

/// The live values of `bucket` that decode as `T`, in key order.
fn decode_bucket<T: DeserializeOwned>(ledger: &Ledger, bucket: &str) -> Vec<T> {
    ledger
        .bucket(bucket)
        .filter_map(|(_, value)| serde_json::from_slice(value).ok())
        .collect()
}

/// One bucket's live values as edgevpn's `map[string]blockchain.Data`.
type BucketValues<'a> = BTreeMap<&'a str, Cow<'a, str>>;

/// The live values of `bucket` (secrets left out below [`Access::Full`]); `None` when empty.
fn bucket_values<'a>(
    ledger: &'a Ledger,
    now_ms: u64,
    bucket: &str,
    access: Access,
) -> Option<BucketValues<'a>> {
    let values: BucketValues<'a> = ledger
        .bucket(bucket)
        .filter(|(key, _)| access == Access::Full || !trust::is_secret_key(key))
        .map(|(key, value)| (key, data::data(ledger, now_ms, bucket, key, value)))
        .collect();
    (!values.is_empty()).then_some(values)
}

/// The whole ledger as edgevpn's `CurrentData()`: buckets without live values are left out.
fn storage(ledger: &Ledger, now_ms: u64, access: Access) -> BTreeMap<&str, BucketValues<'_>> {
    ledger
        .buckets()
        .filter_map(|bucket| Some((bucket, bucket_values(ledger, now_ms, bucket, access)?)))
        .collect()
}

/// edgevpn's `blockchain.Block`, standing for a ledger without blocks (see the module
/// documentation).
#[derive(Serialize)]
struct Block<'a> {
    #[serde(rename = "Index")]
    index: u64,
    #[serde(rename = "Timestamp")]
    timestamp: String,
    #[serde(rename = "Storage")]
    storage: BTreeMap<&'a str, BTreeMap<&'a str, SignedData<'a>>>,
    #[serde(rename = "Hash")]
    hash: String,
    #[serde(rename = "PrevHash")]
    prev_hash: String,
}

/// edgevpn's `blockchain.SignedData` (v0.35, ownership on: every entry signed by its owner),
/// standing for one ledger entry, tombstones included.
#[derive(Serialize)]
struct SignedData<'a> {
    /// The value as `/api/ledger` shows it (`""` for a tombstone).
    #[serde(rename = "Value")]
    value: Cow<'a, str>,
    /// The writer's peer id.
    #[serde(rename = "Owner")]
    owner: String,
    /// The entry's hybrid-logical version (monotonic per key, as edgevpn's).
    #[serde(rename = "Version")]
    version: u64,
    /// The version's wall-clock part, unix seconds.
    #[serde(rename = "UpdatedAt")]
    updated_at: u64,
    #[serde(rename = "Deleted")]
    deleted: bool,
    /// The writer's Ed25519 signature over this ledger's signing message (not edgevpn's
    /// canonical bytes), base64 as Go marshals a `[]byte`.
    #[serde(rename = "Sig")]
    sig: String,
}

impl<'a> Block<'a> {
    fn of(ledger: &'a Ledger, now_ms: u64, access: Access) -> Block<'a> {
        let mut storage: BTreeMap<&str, BTreeMap<&str, SignedData<'_>>> = BTreeMap::new();
        let shown = ledger
            .entries()
            .filter(|entry| access == Access::Full || !trust::is_secret_key(&entry.key));
        for entry in shown {
            let value = entry.value.as_deref().map_or(Cow::Borrowed(""), |stored| {
                data::data(ledger, now_ms, &entry.bucket, &entry.key, stored)
            });
            let signed = SignedData {
                value,
                owner: entry.writer.to_string(),
                version: entry.version.0,
                updated_at: entry.version.millis() / 1000,
                deleted: entry.is_tombstone(),
                sig: STANDARD.encode(entry.signature),
            };
            storage
                .entry(entry.bucket.as_str())
                .or_default()
                .insert(entry.key.as_str(), signed);
        }
        let digest = Sha256::digest(serde_json::to_vec(&storage).unwrap_or_default());
        Block {
            index: block_index(ledger),
            timestamp: go_time_string(ledger.max_version().millis()),
            storage,
            hash: digest.iter().map(|b| format!("{b:02x}")).collect(),
            prev_hash: String::new(),
        }
    }
}

/// What stands for edgevpn's block count.
fn block_index(ledger: &Ledger) -> u64 {
    ledger.counters().applied
}

/// A unix time in milliseconds as Go's `time.Time.String()` prints a UTC time:
/// `2006-01-02 15:04:05.999 +0000 UTC` (trailing zeros of the fraction dropped).
fn go_time_string(unix_ms: u64) -> String {
    let seconds = unix_ms / 1000;
    let (year, month, day) = civil_from_days(seconds / 86_400);
    let of_day = seconds % 86_400;
    let mut fraction = format!(".{:03}", unix_ms % 1000);
    while fraction.ends_with('0') {
        fraction.pop();
    }
    if fraction == "." {
        fraction.clear();
    }
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}{fraction} +0000 UTC",
        of_day / 3600,
        of_day % 3600 / 60,
        of_day % 60,
    )
}

/// libp2p's bandwidth `metrics.Stats`, without the rates.
#[derive(Serialize, Default)]
struct Bandwidth {
    #[serde(rename = "TotalIn")]
    total_in: u64,
    #[serde(rename = "TotalOut")]
    total_out: u64,
}

impl Bandwidth {
    fn of(peer: &PeerStatus) -> Bandwidth {
        Bandwidth {
            total_in: peer.bytes_in,
            total_out: peer.bytes_out,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::http::{CONTENT_TYPE_HTML, CONTENT_TYPE_JSON, Connection};
    use crate::api::metrics::DiscoveryState;
    use crate::identity::Identity;
    use crate::ledger::Clock;
    use serde_json::{Value, json};
    use std::time::Instant;

    const NOW_MS: u64 = 1_760_000_000_000;

    fn peer(seed: u8) -> PeerId {
        Identity::from_seed([seed; 32]).peer_id()
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    struct FakeState {
        ledger: Ledger,
        clock: Clock,
        me: NodeInfo,
        peers: Vec<PeerStatus>,
        members: Vec<MemberStatus>,
        nodes: Vec<ClusterNode>,
        metrics: Metrics,
    }

    impl ApiState for FakeState {
        fn node_info(&self) -> NodeInfo {
            self.me.clone()
        }
        fn peers(&self) -> Vec<PeerStatus> {
            self.peers.clone()
        }
        fn members(&self) -> Vec<MemberStatus> {
            self.members.clone()
        }
        fn cluster_nodes(&self) -> Vec<ClusterNode> {
            self.nodes.clone()
        }
        fn ledger(&self) -> &Ledger {
            &self.ledger
        }
        fn metrics(&self) -> Metrics {
            self.metrics.clone()
        }
        fn unix_ms(&self) -> u64 {
            0
        }
    }

    impl FakeState {
        fn put(&mut self, bucket: &str, key: &str, value: &[u8]) {
            let writer = Identity::from_seed([1; 32]);
            self.ledger
                .put(&writer, &mut self.clock, bucket, key, value, NOW_MS)
                .unwrap();
        }

        fn apply(&mut self, writes: &[Write]) {
            let writer = Identity::from_seed([1; 32]);
            for w in writes {
                match &w.value {
                    Some(v) => self.put(&w.bucket, &w.key, v),
                    None => {
                        self.ledger
                            .delete(&writer, &mut self.clock, &w.bucket, &w.key, NOW_MS)
                            .unwrap();
                    }
                }
            }
        }
    }

    fn machine(peer: PeerId, hostname: &str, address: &str) -> Vec<u8> {
        json!({
            "PeerID": peer.to_string(), "Hostname": hostname, "OS": "linux",
            "Arch": "arm64", "Address": address, "Version": "0.1.0",
        })
        .to_string()
        .into_bytes()
    }

    /// Me (1); 2 connected direct, live worker; 3 connected through 2; 4 known, offline, a
    /// machine; 5 a live cluster node not connected; a machine record for 1, 2 and 4.
    fn state() -> FakeState {
        let mut s = FakeState {
            ledger: Ledger::default(),
            clock: Clock::new(),
            me: NodeInfo {
                peer_id: peer(1),
                uuid: "uuid-1".to_string(),
                hostname: "node1".to_string(),
                role: Some("master".to_string()),
                vpn_address: Some(Ipv4Addr::new(10, 1, 0, 1)),
                network_id: "kairos".to_string(),
                version: "0.1.0",
                uptime: Duration::from_secs(125),
                k3s: Some("running (pid 42)".to_string()),
                second_masters: Vec::new(),
            },
            peers: vec![
                PeerStatus {
                    peer_id: peer(2),
                    address: addr("192.168.1.2:7120"),
                    path: PeerPath::Direct,
                    rtt: Some(Duration::from_micros(1500)),
                    bytes_in: 1000,
                    bytes_out: 2000,
                },
                PeerStatus {
                    peer_id: peer(3),
                    address: addr("192.168.1.2:7120"),
                    path: PeerPath::Relayed { via: peer(2) },
                    rtt: None,
                    bytes_in: 10,
                    bytes_out: 20,
                },
            ],
            members: vec![
                MemberStatus {
                    peer_id: peer(2),
                    addresses: vec![addr("192.168.1.2:7120"), addr("[fe80::2]:7120")],
                    age: Duration::from_secs(1),
                },
                MemberStatus {
                    peer_id: peer(4),
                    addresses: vec![addr("192.168.1.4:7120")],
                    age: Duration::from_secs(300),
                },
            ],
            nodes: vec![
                ClusterNode {
                    uuid: "uuid-1".to_string(),
                    peer_id: peer(1),
                    hostname: "node1".to_string(),
                    role: Some("master".to_string()),
                    live: true,
                },
                ClusterNode {
                    uuid: "uuid-2".to_string(),
                    peer_id: peer(2),
                    hostname: "node2".to_string(),
                    role: Some("worker".to_string()),
                    live: true,
                },
                ClusterNode {
                    uuid: "uuid-4".to_string(),
                    peer_id: peer(4),
                    hostname: "node4".to_string(),
                    role: Some("worker".to_string()),
                    live: false,
                },
                ClusterNode {
                    uuid: "uuid-5".to_string(),
                    peer_id: peer(5),
                    hostname: "node5".to_string(),
                    role: None,
                    live: true,
                },
            ],
            metrics: Metrics {
                bytes_in: 5000,
                bytes_out: 6000,
                lan_discovery: DiscoveryState::Active,
                ..Metrics::default()
            },
        };
        s.put(
            "machines",
            "10.1.0.1",
            &machine(peer(1), "node1", "10.1.0.1"),
        );
        s.put(
            "machines",
            "10.1.0.2",
            &machine(peer(2), "node2", "10.1.0.2"),
        );
        s.put(
            "machines",
            "10.1.0.4",
            &machine(peer(4), "node4", "10.1.0.4"),
        );
        s.put("machines", "10.1.0.9", b"not json");
        s.put("kairos", "uuid-1-role", b"master");
        s.put(
            "users",
            "u1",
            br#"{"PeerID":"12D3KooWx","Timestamp":"2025-10-09"}"#,
        );
        s.put("users", "u2", b"\"a string\"");
        s.put("services", "s1", br#"{"PeerID":"12D3KooWy","Name":"web"}"#);
        s.put("binary", "k", b"a\xffb");
        s.put("gone", "k", b"v");
        let writer = Identity::from_seed([1; 32]);
        s.ledger
            .delete(&writer, &mut s.clock, "gone", "k", NOW_MS)
            .unwrap();
        s
    }

    fn request(method: Method, path: &str) -> Request {
        Request {
            method,
            path: path.to_string(),
            query: None,
            host: Some("127.0.0.1:8080".to_string()),
            authorization: None,
            body: Vec::new(),
        }
    }

    fn call(state: &FakeState, method: Method, path: &str) -> Outcome {
        handle(&request(method, path), state, Access::Full)
    }

    fn call_as(state: &FakeState, access: Access, method: Method, path: &str) -> Outcome {
        handle(&request(method, path), state, access)
    }

    /// A `GET` that must succeed with JSON; its parsed body.
    fn get_json(state: &FakeState, path: &str) -> Value {
        let outcome = call(state, Method::Get, path);
        assert_eq!(outcome.response.status, Status::Ok, "{path}");
        assert_eq!(outcome.response.content_type, CONTENT_TYPE_JSON, "{path}");
        assert!(outcome.response.body.ends_with(b"\n"), "{path}");
        assert!(outcome.writes.is_empty());
        serde_json::from_slice(&outcome.response.body).unwrap()
    }

    fn body_text(outcome: &Outcome) -> String {
        String::from_utf8(outcome.response.body.clone()).unwrap()
    }

    #[test]
    fn summary_has_edgevpn_fields_in_order_and_ours_after() {
        let s = state();
        let outcome = call(&s, Method::Get, "/api/summary");
        let text = body_text(&outcome);
        let order = [
            "\"Files\"",
            "\"Machines\"",
            "\"Users\"",
            "\"Services\"",
            "\"BlockChain\"",
            "\"OnChainNodes\"",
            "\"Peers\"",
            "\"NodeID\"",
            "\"UUID\"",
        ];
        let positions: Vec<usize> = order.iter().map(|f| text.find(f).unwrap()).collect();
        assert!(positions.windows(2).all(|w| w[0] < w[1]), "{text}");
        let v = get_json(&s, "/api/summary");
        assert_eq!(v["Files"], 0);
        assert_eq!(v["Machines"], 4);
        assert_eq!(v["Users"], 2);
        assert_eq!(v["Services"], 1);
        assert_eq!(v["BlockChain"], s.ledger.counters().applied);
        assert_eq!(v["OnChainNodes"], 2);
        assert_eq!(v["Peers"], 2);
        assert_eq!(v["NodeID"], peer(1).to_string());
        assert_eq!(v["UUID"], "uuid-1");
        assert_eq!(v["Hostname"], "node1");
        assert_eq!(v["Role"], "master");
        assert_eq!(v["Address"], "10.1.0.1");
        assert_eq!(v["NetworkID"], "kairos");
        assert_eq!(v["Version"], "0.1.0");
        assert_eq!(v["UptimeSeconds"], 125);
        assert_eq!(v["K3s"], "running (pid 42)");
    }

    #[test]
    fn machines_carry_edgevpn_flags() {
        let s = state();
        let v = get_json(&s, "/api/machines");
        let list = v.as_array().unwrap();
        assert_eq!(list.len(), 3, "the entry that is not JSON is left out");
        let by_host = |h: &str| list.iter().find(|m| m["Hostname"] == h).unwrap().clone();
        assert_eq!(
            by_host("node2"),
            json!({
                "PeerID": peer(2).to_string(), "Hostname": "node2", "OS": "linux",
                "Arch": "arm64", "Address": "10.1.0.2", "Version": "0.1.0",
                "Connected": true, "OnChain": true, "Online": true, "Role": "worker",
            })
        );
        let me = by_host("node1");
        assert_eq!(
            (&me["Connected"], &me["OnChain"], &me["Online"], &me["Role"]),
            (&json!(false), &json!(false), &json!(true), &json!("master"))
        );
        let offline = by_host("node4");
        assert_eq!(
            (
                &offline["Connected"],
                &offline["OnChain"],
                &offline["Online"]
            ),
            (&json!(false), &json!(true), &json!(false))
        );
        // Go field order.
        let text = body_text(&call(&s, Method::Get, "/api/machines"));
        let first = &text[..text.find('}').unwrap()];
        let fields = [
            "PeerID",
            "Hostname",
            "OS",
            "Arch",
            "Address",
            "Version",
            "Connected",
            "OnChain",
            "Online",
        ];
        let positions: Vec<usize> = fields.iter().map(|f| first.find(f).unwrap()).collect();
        assert!(positions.windows(2).all(|w| w[0] < w[1]), "{first}");
    }

    #[test]
    fn nodes_lists_the_online_ones_with_details() {
        let s = state();
        let v = get_json(&s, "/api/nodes");
        let list = v.as_array().unwrap();
        let ids: BTreeSet<String> = list
            .iter()
            .map(|n| n["ID"].as_str().unwrap().to_string())
            .collect();
        let expected: BTreeSet<String> = [1, 2, 3, 5].map(|i| peer(i).to_string()).into();
        assert_eq!(ids, expected, "4 is offline");
        assert!(list.iter().all(|n| n["Online"] == true));
        let sorted: Vec<&str> = list.iter().map(|n| n["ID"].as_str().unwrap()).collect();
        assert!(sorted.windows(2).all(|w| w[0] < w[1]));
        let find = |i: u8| {
            list.iter()
                .find(|n| n["ID"] == peer(i).to_string())
                .unwrap()
                .clone()
        };
        assert_eq!(
            find(2),
            json!({
                "ID": peer(2).to_string(), "Online": true, "UUID": "uuid-2",
                "Hostname": "node2", "Role": "worker",
                "Addresses": ["192.168.1.2:7120", "[fe80::2]:7120"],
                "Connected": true, "Relayed": false, "RttMs": 1.5,
                "BytesIn": 1000, "BytesOut": 2000,
            })
        );
        let relayed = find(3);
        assert_eq!(relayed["Relayed"], true);
        assert_eq!(relayed["RttMs"], Value::Null);
        let me = find(1);
        assert_eq!(
            (&me["Hostname"], &me["Connected"]),
            (&json!("node1"), &json!(false))
        );
        let silent = find(5);
        assert_eq!(
            (&silent["Role"], &silent["Connected"]),
            (&json!(""), &json!(false))
        );
    }

    #[test]
    fn peerstore_lists_every_known_member() {
        let s = state();
        let v = get_json(&s, "/api/peerstore");
        let list: Vec<(String, bool)> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (p["ID"].as_str().unwrap().to_string(), p["Online"] == true))
            .collect();
        let mut expected = vec![
            (peer(2).to_string(), true),
            (peer(3).to_string(), true),
            (peer(4).to_string(), false),
        ];
        expected.sort();
        assert_eq!(list, expected);
    }

    #[test]
    fn users_services_files_decode_their_buckets() {
        let s = state();
        assert_eq!(
            get_json(&s, "/api/users"),
            json!([{"PeerID": "12D3KooWx", "Timestamp": "2025-10-09"}])
        );
        assert_eq!(
            get_json(&s, "/api/services"),
            json!([{"PeerID": "12D3KooWy", "Name": "web"}])
        );
        assert_eq!(get_json(&s, "/api/files"), json!([]));
    }

    #[test]
    fn ledger_reads_match_edgevpn() {
        let s = state();
        let all = get_json(&s, "/api/ledger");
        // This agent's plain values, as Kairos' Go client would have stored them (api::data).
        let role = json!({"uuid-1-role": "\"Im1hc3RlciI=\""});
        assert_eq!(all["kairos"], role);
        let binary = all["binary"]["k"].to_string();
        let read = crate::api::data::go_client::get(binary.as_bytes()).unwrap();
        assert_eq!(read, "a\u{fffd}b", "lossy like Go");
        assert!(
            all.get("gone").is_none(),
            "a bucket of tombstones is left out"
        );
        let names: Vec<&String> = all.as_object().unwrap().keys().collect();
        assert_eq!(names, ["binary", "kairos", "machines", "services", "users"]);
        assert_eq!(get_json(&s, "/api/ledger/kairos"), role);
        assert_eq!(get_json(&s, "/api/ledger/gone"), Value::Null);
        assert_eq!(get_json(&s, "/api/ledger/nothing"), Value::Null);
        assert_eq!(
            get_json(&s, "/api/ledger/kairos/uuid-1-role"),
            role["uuid-1-role"]
        );
        assert_eq!(get_json(&s, "/api/ledger/kairos/absent"), json!(""));
        assert_eq!(get_json(&s, "/api/ledger/gone/k"), json!(""));
        let machine = get_json(&s, "/api/ledger/machines/10.1.0.2");
        let decoded: Value = serde_json::from_str(machine.as_str().unwrap()).unwrap();
        assert_eq!(decoded["Hostname"], "node2");
    }

    #[test]
    fn put_stores_a_json_string_like_edgevpn() {
        let mut s = state();
        let outcome = call(
            &s,
            Method::Put,
            "/api/ledger/my%20bucket/a%2Fkey/hello%20world",
        );
        assert_eq!(outcome.response.status, Status::Ok);
        assert_eq!(body_text(&outcome), "{\"State\":\"Announcing\"}\n");
        assert_eq!(
            outcome.writes,
            vec![Write::put("my bucket", "a/key", "\"hello world\"")]
        );
        s.apply(&outcome.writes);
        assert_eq!(
            get_json(&s, "/api/ledger/my%20bucket/a%2Fkey"),
            json!("\"hello world\"")
        );
        // The same value again writes nothing.
        let again = call(
            &s,
            Method::Put,
            "/api/ledger/my%20bucket/a%2Fkey/hello%20world",
        );
        assert_eq!(again.response.status, Status::Ok);
        assert!(again.writes.is_empty());

        // edgevpn's Go client: Put marshals to JSON, base64url-encodes into the path;
        // GetBucketKey decodes the JSON string twice, then the base64.
        let client_value = "eyJhIjoxfQ=="; // base64url of {"a":1}
        let put = call(&s, Method::Put, &format!("/api/ledger/b/k/{client_value}"));
        s.apply(&put.writes);
        let body = get_json(&s, "/api/ledger/b/k");
        let once: String = serde_json::from_value(body).unwrap();
        let twice: String = serde_json::from_str(&once).unwrap();
        assert_eq!(twice, client_value);
    }

    #[test]
    fn put_checks_names_and_sizes() {
        let s = state();
        let long_key = "k".repeat(MAX_KEY_LEN + 1);
        let long_bucket = "b".repeat(MAX_BUCKET_LEN + 1);
        let big = "v".repeat(MAX_PUT_VALUE + 1);
        let cases = [
            (format!("/api/ledger/b/{long_key}/v"), Status::BadRequest),
            (format!("/api/ledger/{long_bucket}/k/v"), Status::BadRequest),
            ("/api/ledger/b/%0A/v".to_string(), Status::BadRequest),
            ("/api/ledger/b/k/%zz".to_string(), Status::BadRequest),
            ("/api/ledger/b/k/%ff".to_string(), Status::BadRequest),
            (format!("/api/ledger/b/k/{big}"), Status::ContentTooLarge),
            (
                format!("/api/ledger/b/k/{}", "v".repeat(MAX_PUT_VALUE)),
                Status::Ok,
            ),
        ];
        for (path, status) in cases {
            let outcome = call(&s, Method::Put, &path);
            assert_eq!(
                outcome.response.status,
                status,
                "{}",
                &path[..path.len().min(60)]
            );
            assert_eq!(outcome.writes.is_empty(), status != Status::Ok);
        }
        // The ledger's own value limit applies to the stored JSON.
        let mut small = state();
        small.ledger = Ledger::new(crate::ledger::Limits {
            max_value_bytes: 10,
            ..crate::ledger::Limits::default()
        });
        let outcome = call(&small, Method::Put, "/api/ledger/b/k/123456789");
        assert_eq!(outcome.response.status, Status::ContentTooLarge);
    }

    #[test]
    fn deletes_write_tombstones_for_held_keys() {
        let mut s = state();
        s.put("free", "a", b"1");
        s.put("free", "b", b"2");
        let outcome = call(&s, Method::Delete, "/api/ledger/free");
        assert_eq!(body_text(&outcome), "{\"State\":\"Announcing\"}\n");
        let keys: Vec<&str> = outcome.writes.iter().map(|w| w.key.as_str()).collect();
        assert_eq!(keys, ["a", "b"]);
        assert!(
            outcome
                .writes
                .iter()
                .all(|w| w.value.is_none() && w.bucket == "free")
        );
        s.apply(&outcome.writes);
        assert_eq!(get_json(&s, "/api/ledger/free"), Value::Null);

        let outcome = call(&s, Method::Delete, "/api/ledger/binary/k");
        assert_eq!(outcome.writes, vec![Write::delete("binary", "k")]);
        for absent in [
            "/api/ledger/kairos/absent",
            "/api/ledger/gone/k",
            "/api/ledger/nothing",
        ] {
            let outcome = call(&s, Method::Delete, absent);
            assert_eq!(outcome.response.status, Status::Ok, "{absent}");
            assert!(outcome.writes.is_empty(), "{absent}");
        }
    }

    #[test]
    fn reserved_buckets_and_keys_cannot_be_deleted_at_any_level() {
        let mut s = state();
        s.put("kairos", "ip-master", b"10.1.0.1");
        for (method, path, needle) in [
            (Method::Delete, "/api/ledger/machines", "kept by the nodes"),
            (Method::Delete, "/api/ledger/kairos", "ip-master"),
            (Method::Delete, "/api/ledger/kairos/ip-master", "reserved"),
            (Method::Delete, "/api/ledger/kairos/uuid-1-role", "reserved"),
            (Method::Delete, "/api/ledger/dhcp/uuid-1", "reserved"),
        ] {
            let outcome = call(&s, method, path);
            assert_eq!(outcome.response.status, Status::Forbidden, "{path}");
            assert!(outcome.writes.is_empty(), "{path}");
            assert!(
                body_text(&outcome).contains(needle),
                "{path}: {}",
                body_text(&outcome)
            );
        }
        // Writes are the ownership rule's to judge (kairosctl's `role set`, Kairos' publishing).
        let outcome = call(&s, Method::Put, "/api/ledger/kairos/uuid-9-role/worker");
        assert_eq!(outcome.response.status, Status::Ok);
        assert_eq!(outcome.writes.len(), 1);
    }

    #[test]
    fn inspect_level_reads_all_but_secrets_and_writes_nothing() {
        let mut s = state();
        s.put("kairos", "token-nodetoken", b"K10secret::server:abc");
        s.put("kairos", "master-kubeconfig", b"a2NvbmZpZw");
        s.put("kairos", "control-plane-kubeconfig", b"a2NvbmZpZw");
        s.put("kairos", "ip-master", b"10.1.0.1");
        let inspect = |method, path: &str| call_as(&s, Access::Inspect, method, path);
        for key in [
            "token-nodetoken",
            "master-kubeconfig",
            "control-plane-kubeconfig",
        ] {
            let outcome = inspect(Method::Get, &format!("/api/ledger/kairos/{key}"));
            assert_eq!(outcome.response.status, Status::Forbidden, "{key}");
            assert!(body_text(&outcome).contains("secret"), "{key}");
            let full = call(&s, Method::Get, &format!("/api/ledger/kairos/{key}"));
            assert_eq!(full.response.status, Status::Ok, "{key}");
        }
        for path in ["/api/ledger", "/api/ledger/kairos", "/api/blockchain"] {
            let shown = body_text(&inspect(Method::Get, path));
            assert!(shown.contains("ip-master"), "{path}: {shown}");
            assert!(
                !shown.contains("secret") && !shown.contains("a2NvbmZpZw"),
                "{path}: {shown}"
            );
            assert!(
                !shown.contains("kubeconfig") && !shown.contains("token-"),
                "{path}"
            );
            let full = body_text(&call(&s, Method::Get, path));
            assert!(
                full.contains("token-nodetoken") && full.contains("master-kubeconfig"),
                "{path}"
            );
        }
        // Non-secret values read the same at both levels (in edgevpn's encoding, api::data).
        let ip = inspect(Method::Get, "/api/ledger/kairos/ip-master");
        assert_eq!(ip.response.status, Status::Ok);
        assert_eq!(
            body_text(&ip),
            body_text(&call(&s, Method::Get, "/api/ledger/kairos/ip-master"))
        );
        for path in [
            "/",
            "/metrics",
            "/api/summary",
            "/api/machines",
            "/api/nodes",
        ] {
            assert_eq!(
                inspect(Method::Get, path).response.status,
                Status::Ok,
                "{path}"
            );
        }
        for (method, path) in [
            (Method::Put, "/api/ledger/test/hello/world"),
            (Method::Delete, "/api/ledger/binary/k"),
            (Method::Delete, "/api/ledger/binary"),
            (Method::Post, "/api/summary"),
        ] {
            let outcome = inspect(method, path);
            assert_eq!(outcome.response.status, Status::Forbidden, "{path}");
            assert!(body_text(&outcome).contains("needs root"), "{path}");
            assert!(outcome.writes.is_empty(), "{path}");
        }
    }

    #[test]
    fn blockchain_shows_signed_entries_as_edgevpn_ownership_mode() {
        let mut s = state();
        s.put("gone", "k", b"v");
        s.apply(&[Write::delete("gone", "k")]);
        let block = get_json(&s, "/api/blockchain");
        assert_eq!(block["Index"], s.ledger.counters().applied);
        assert_eq!(block["PrevHash"], "");
        let hash = block["Hash"].as_str().unwrap();
        assert_eq!(hash.len(), 64);
        assert!(hash.bytes().all(|b| b.is_ascii_hexdigit()));
        let timestamp = block["Timestamp"].as_str().unwrap();
        assert!(timestamp.starts_with("2025-10-09 08:53:20"), "{timestamp}");
        assert!(timestamp.ends_with(" +0000 UTC"));

        // Every entry, as a SignedData object whose Value is what /api/ledger shows.
        let ledger = get_json(&s, "/api/ledger");
        for entry in s.ledger.entries() {
            let signed = &block["Storage"][&entry.bucket][&entry.key];
            assert_eq!(signed["Owner"], entry.writer.to_string(), "{signed}");
            assert_eq!(signed["Version"], entry.version.0);
            assert_eq!(signed["UpdatedAt"], entry.version.millis() / 1000);
            assert_eq!(signed["Deleted"], entry.is_tombstone());
            let sig = STANDARD.decode(signed["Sig"].as_str().unwrap()).unwrap();
            assert_eq!(sig, entry.signature);
            if entry.is_tombstone() {
                assert_eq!(signed["Value"], "");
            } else {
                assert_eq!(signed["Value"], ledger[&entry.bucket][&entry.key]);
            }
        }
        assert_eq!(block["Storage"]["gone"]["k"]["Deleted"], true);

        // The same entries, merged in another order: the same hash.
        let mut other = FakeState {
            ledger: Ledger::default(),
            clock: Clock::new(),
            ..state()
        };
        let mut entries: Vec<_> = s.ledger.entries().cloned().collect();
        entries.reverse();
        for e in entries {
            other.ledger.apply(e, NOW_MS).unwrap();
        }
        assert_eq!(get_json(&other, "/api/blockchain")["Hash"], block["Hash"]);
        other.put("extra", "k", b"v");
        assert_ne!(get_json(&other, "/api/blockchain")["Hash"], block["Hash"]);
    }

    #[test]
    fn edgevpn_routes_not_served_are_404() {
        let s = state();
        for (method, path) in [
            (Method::Get, "/api/peergate"),
            (Method::Put, "/api/peergate/enable"),
            (Method::Get, "/api/metrics/protocol"),
            (Method::Get, "/api/metrics/protocol/%2Fedgevpn%2F0.1"),
            (Method::Get, "/debug/pprof/heap"),
        ] {
            let outcome = call(&s, method, path);
            assert_eq!(outcome.response.status, Status::NotFound, "{path}");
            assert!(outcome.writes.is_empty());
        }
    }

    #[test]
    fn go_time_strings() {
        for (ms, expected) in [
            (0, "1970-01-01 00:00:00 +0000 UTC"),
            (1_760_000_000_000, "2025-10-09 08:53:20 +0000 UTC"),
            (951_782_401_234, "2000-02-29 00:00:01.234 +0000 UTC"),
            (1_709_164_800_500, "2024-02-29 00:00:00.5 +0000 UTC"),
            (4_102_444_799_990, "2099-12-31 23:59:59.99 +0000 UTC"),
        ] {
            assert_eq!(go_time_string(ms), expected);
        }
    }

    #[test]
    fn bandwidth_metrics_like_libp2p() {
        let s = state();
        assert_eq!(
            get_json(&s, "/api/metrics"),
            json!({"TotalIn": 5000, "TotalOut": 6000})
        );
        let by_peer = get_json(&s, "/api/metrics/peer");
        assert_eq!(
            by_peer[peer(2).to_string()],
            json!({"TotalIn": 1000, "TotalOut": 2000})
        );
        assert_eq!(by_peer.as_object().unwrap().len(), 2);
        assert_eq!(
            get_json(&s, &format!("/api/metrics/peer/{}", peer(3))),
            json!({"TotalIn": 10, "TotalOut": 20})
        );
        assert_eq!(
            get_json(&s, "/api/metrics/peer/unknown"),
            json!({"TotalIn": 0, "TotalOut": 0})
        );
    }

    #[test]
    fn prometheus_and_status_page() {
        let s = state();
        let outcome = call(&s, Method::Get, "/metrics");
        assert_eq!(outcome.response.content_type, CONTENT_TYPE_PROMETHEUS);
        let text = body_text(&outcome);
        assert!(text.contains("kairos_p2p_received_bytes_total 5000\n"));
        assert!(
            text.contains("kairos_p2p_discovery_state{mechanism=\"lan\",state=\"active\"} 1\n")
        );

        let page = call(&s, Method::Get, "/");
        assert_eq!(page.response.status, Status::Ok);
        assert_eq!(page.response.content_type, CONTENT_TYPE_HTML);
        assert_eq!(page.response.body, page::STATUS_PAGE.as_bytes());
    }

    #[test]
    fn unknown_paths_and_wrong_methods() {
        let s = state();
        for path in [
            "/api",
            "/api/nope",
            "/api/ledger/a/b/c/d",
            "/metrics/x",
            "/index.html",
        ] {
            let outcome = call(&s, Method::Get, path);
            assert_eq!(outcome.response.status, Status::NotFound, "{path}");
            assert_eq!(body_text(&outcome), "{\"message\":\"Not Found\"}\n");
        }
        let cases = [
            (Method::Post, "/api/summary", "GET, HEAD"),
            (Method::Delete, "/api/machines", "GET, HEAD"),
            (Method::Put, "/", "GET, HEAD"),
            (Method::Put, "/api/ledger/b", "GET, HEAD, DELETE"),
            (Method::Put, "/api/ledger/b/k", "GET, HEAD, DELETE"),
            (Method::Options, "/api/ledger/b/k", "GET, HEAD, DELETE"),
            (Method::Get, "/api/ledger/b/k/v", "PUT"),
            (Method::Delete, "/api/ledger/b/k/v", "PUT"),
            (Method::Patch, "/api/ledger/b/k/v", "PUT"),
        ];
        for (method, path, allow) in cases {
            let outcome = call(&s, method, path);
            assert_eq!(outcome.response.status, Status::MethodNotAllowed, "{path}");
            assert_eq!(outcome.response.allow, Some(allow), "{path}");
            assert!(outcome.writes.is_empty());
        }
        let head = call(&s, Method::Head, "/api/summary");
        assert_eq!(head.response.status, Status::Ok);
        let bad = call(&s, Method::Get, "/api/ledger/%zz");
        assert_eq!(bad.response.status, Status::BadRequest);
    }

    #[test]
    fn only_local_host_names_are_served() {
        let s = state();
        for (host, allowed) in [
            (None, true),
            (Some(""), true),
            (Some("127.0.0.1"), true),
            (Some("127.0.0.1:8080"), true),
            (Some("10.1.0.1:8080"), true),
            (Some("[::1]:8080"), true),
            (Some("[::1]"), true),
            (Some("::1"), true),
            (Some("localhost"), true),
            (Some("LocalHost:8080"), true),
            (Some("localhost.:8080"), true),
            (Some("api.localhost:8080"), true),
            (Some("evil.example"), false),
            (Some("evil.example:8080"), false),
            (Some("127.0.0.1.nip.io:8080"), false),
            (Some("localhost.evil.example"), false),
            (Some("[not-an-ip]:8080"), false),
        ] {
            let mut r = request(Method::Get, "/api/ledger");
            r.host = host.map(str::to_string);
            let outcome = handle(&r, &s, Access::Full);
            let expected = if allowed {
                Status::Ok
            } else {
                Status::Forbidden
            };
            assert_eq!(outcome.response.status, expected, "{host:?}");
        }
        let mut put = request(Method::Put, "/api/ledger/b/k/v");
        put.host = Some("rebound.example:8080".to_string());
        assert!(handle(&put, &s, Access::Full).writes.is_empty());
    }

    /// Bytes in, bytes out: the connection and the routes together.
    #[test]
    fn connection_and_routes_end_to_end() {
        let mut s = state();
        let now = Instant::now();
        let mut conn = Connection::new(now);
        conn.feed(
            now,
            b"PUT /api/ledger/b/k/v HTTP/1.1\r\nHost: localhost:8080\r\n\r\n\
              GET /api/ledger/b/k HTTP/1.1\r\nHost: localhost:8080\r\n\r\n\
              HEAD /api/summary HTTP/1.1\r\nHost: localhost:8080\r\nConnection: close\r\n\r\n",
        );
        let mut statuses = Vec::new();
        while let Some(request) = conn.poll_request() {
            let outcome = handle(&request, &s, Access::Full);
            s.apply(&outcome.writes);
            statuses.push(outcome.response.status);
            conn.respond(outcome.response);
        }
        assert_eq!(statuses, [Status::Ok; 3]);
        let out = String::from_utf8(conn.pending_output().to_vec()).unwrap();
        assert!(out.contains("\r\n\r\n{\"State\":\"Announcing\"}\n"));
        assert!(
            out.contains("\r\n\r\n\"\\\"v\\\"\"\nHTTP/1.1 200 OK\r\n"),
            "{out}"
        );
        assert!(out.ends_with("Connection: close\r\n\r\n"), "HEAD: no body");
        conn.consume_output(out.len());
        assert!(conn.is_finished());
    }
}
