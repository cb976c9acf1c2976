//! The local HTTP API, compatible with edgevpn's: the JSON endpoints Kairos users and tools call
//! (`/api/summary`, `/api/machines`, `/api/ledger/...`, ...), Prometheus metrics at `/metrics` and
//! a status page at `/`. Sans-IO like the rest of the core: [`Connection`] turns bytes into
//! [`Request`]s and [`Response`]s into bytes, [`handle`] answers a request from an [`ApiState`]
//! snapshot and returns the ledger [`Write`](crate::cluster::Write)s a `PUT` or `DELETE` asks for.
//! The driver owns the sockets, the clock and the cluster.
//!
//! # Driver loop (one TCP connection)
//! 1. On accept: `Connection::new(now)`.
//! 2. While [`Connection::wants_input`]: read at most [`MAX_FEED`] bytes and
//!    [`Connection::feed`] them (on end of stream, [`Connection::handle_eof`]).
//! 3. While [`Connection::poll_request`] gives a request: [`handle`] it, apply the outcome's
//!    writes to the cluster, and [`Connection::respond`] with its response.
//! 4. Write [`Connection::pending_output`] to the socket and [`Connection::consume_output`] what
//!    was written; go back to 3 (pipelined requests wait while much output is pending).
//! 5. Close the socket when [`Connection::is_finished`]. Call [`Connection::handle_timeout`] at
//!    [`Connection::poll_timeout`].

pub mod data;
pub mod dns;
pub mod http;
pub mod metrics;
pub mod page;
pub mod routes;
pub mod trust;

pub use http::{
    Connection, MAX_BODY_BYTES, MAX_FEED, MAX_HEADER_BYTES, MAX_HEADERS, MAX_TARGET_LEN, Method,
    PathError, Request, Response, Status,
};
pub use metrics::{DiscoveryState, Metrics, render_prometheus};
pub use routes::{
    ApiState, ClusterNode, MemberStatus, NodeInfo, Outcome, PeerPath, PeerStatus, handle,
};
