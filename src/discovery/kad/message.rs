//! DHT wire messages: one message per plain UDP datagram on the overlay socket.
//!
//! ```text
//! offset  size  field
//! 0       1     packet type 0x21 (bit 0x40 clear: never a QUIC packet; beacons use 0x11)
//! 1       1     protocol version (1)
//! 2       1     kind: 1 PING, 2 PONG, 3 FIND_NODE, 4 NODES, 5 PUT, 6 PUT_ACK, 7 GET, 8 VALUE
//! 3       8     transaction id (u64; a reply echoes the request's)
//! 11      32    sender peer id (ed25519 public key)
//! 43      7|19  replies only: the address the replier saw the request come from
//!               (family tag 4|6, address, port)
//! ..            body:
//!   PING, PONG       (empty)
//!   FIND_NODE        target [32]
//!   NODES            count u16 (≤ 20), count × (peer id [32], address)
//!   PUT              key [32], ttl u32 seconds (≤ 3600), record: len u16 (1..=1024) + bytes
//!   PUT_ACK          status u8: 0 stored, 1 rate limited, 2 store full
//!   GET              key [32], offset u16 (index of the first record wanted)
//!   VALUE            total u16 (records the replier holds for the key), count u16 (≤ 64),
//!                    count × record (len u16 + bytes), then a NODES list (closer peers)
//! ```
//!
//! Integers are big-endian; every datagram is at most [`MAX_DATAGRAM`] bytes, so it never
//! fragments on any path with the IPv6 minimum MTU (1280). Decoding rejects trailing bytes,
//! unknown kinds and versions, oversize counts and lengths with a typed [`MessageError`].
//!
//! # Trust
//!
//! Messages are not authenticated, as in every public DHT: any node may serve the DHT for many
//! networks without holding their tokens. What that allows and what protects us:
//! - Off-path spoofing is limited by the 64-bit random transaction id: a reply is accepted only
//!   from the address the request went to, with the id it carried.
//! - A peer may lie about its id (Sybil) and a node may answer lookups with bad peers, drop or
//!   replay records (eclipse, poisoning). Records are sealed and authenticated with keys derived
//!   from the network token ([`super::records`]), so a DHT node can neither read nor forge them:
//!   the worst it can do is hide records or replay old ones from the same window. Routing
//!   entries are kept least-recently-seen-first and only replaced after a failed ping, so
//!   flooding fresh ids does not evict live peers. Disjoint lookup paths (S/Kademlia) are out of
//!   scope: a node eclipsed by an attacker who surrounds a rendezvous key still finds members
//!   on the LAN and through configured bootstrap peers.
//! - The `observed` address is what one peer claims; the consumer corroborates it.
//! - A GET answered with a full VALUE amplifies about 15× toward a spoofed source; the per-source
//!   request rate limit bounds what one forged address can draw.

use std::fmt;
use std::net::SocketAddr;

use crate::identity::PeerId;
use crate::wire::{Reader, WireError, Writer};

/// First byte of every DHT datagram (DHT protocol family, bit 0x40 clear).
pub const PACKET_TYPE: u8 = 0x21;
/// Protocol version this build speaks.
pub const VERSION: u8 = 1;
/// Largest datagram sent or accepted.
pub const MAX_DATAGRAM: usize = 1200;
/// Largest number of node entries in a NODES or VALUE message.
pub const MAX_NODES: usize = 20;
/// Largest sealed record, in bytes.
pub const MAX_RECORD_LEN: usize = 1024;
/// Largest record lifetime a PUT may ask for (one hour).
pub const MAX_TTL_SECS: u32 = 3600;
/// Largest number of records in one VALUE message (the datagram cap bounds it first).
pub const MAX_VALUE_RECORDS: usize = 64;

/// Bytes of the fixed header (type, version, kind, transaction id, sender).
pub const HEADER_LEN: usize = 43;

/// True when `datagram` is a DHT message (the caller's demultiplexer looks at the first byte).
#[must_use]
pub fn is_dht_packet(datagram: &[u8]) -> bool {
    datagram.first() == Some(&PACKET_TYPE)
}

/// A peer as carried in NODES lists.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct NodeInfo {
    /// Its identity (its node id is SHA-256 of it).
    pub peer: PeerId,
    /// Where the replier reaches it.
    pub addr: SocketAddr,
}

/// Outcome of a PUT, as reported by the storing node.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum PutStatus {
    /// The record is stored.
    Stored,
    /// The sender put too often; nothing stored.
    RateLimited,
    /// The store is at its memory cap; nothing stored.
    Full,
}

/// The body of a message, by kind.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Body {
    /// Liveness probe.
    Ping,
    /// Answer to [`Body::Ping`].
    Pong {
        /// Where the request came from, as the replier saw it.
        observed: SocketAddr,
    },
    /// Asks for the peers closest to `target`.
    FindNode {
        /// The id looked up.
        target: [u8; 32],
    },
    /// Closest peers the replier knows (answer to FIND_NODE, and to GET when it holds nothing).
    Nodes {
        /// Where the request came from, as the replier saw it.
        observed: SocketAddr,
        /// Up to [`MAX_NODES`] peers.
        nodes: Vec<NodeInfo>,
    },
    /// Asks the receiver to store `record` under `key` for `ttl_secs`.
    Put {
        /// The DHT key.
        key: [u8; 32],
        /// Requested lifetime (≤ [`MAX_TTL_SECS`]).
        ttl_secs: u32,
        /// Opaque sealed bytes (1..=[`MAX_RECORD_LEN`]).
        record: Vec<u8>,
    },
    /// Answer to [`Body::Put`].
    PutAck {
        /// Where the request came from, as the replier saw it.
        observed: SocketAddr,
        /// What happened.
        status: PutStatus,
    },
    /// Asks for the records stored under `key`, from the `offset`-th on.
    Get {
        /// The DHT key.
        key: [u8; 32],
        /// Index of the first record wanted (pages through long lists).
        offset: u16,
    },
    /// Records stored under the key of a GET, plus closer peers.
    Value {
        /// Where the request came from, as the replier saw it.
        observed: SocketAddr,
        /// How many records the replier holds for the key in all.
        total: u16,
        /// This page of records.
        records: Vec<Vec<u8>>,
        /// Closest peers the replier knows (on the first page).
        nodes: Vec<NodeInfo>,
    },
}

impl Body {
    fn kind(&self) -> u8 {
        match self {
            Body::Ping => 1,
            Body::Pong { .. } => 2,
            Body::FindNode { .. } => 3,
            Body::Nodes { .. } => 4,
            Body::Put { .. } => 5,
            Body::PutAck { .. } => 6,
            Body::Get { .. } => 7,
            Body::Value { .. } => 8,
        }
    }

    /// True for PING, FIND_NODE, PUT and GET.
    #[must_use]
    pub fn is_request(&self) -> bool {
        self.kind() % 2 == 1
    }

    /// The observed address a reply carries.
    #[must_use]
    pub fn observed(&self) -> Option<SocketAddr> {
        match self {
            Body::Pong { observed }
            | Body::Nodes { observed, .. }
            | Body::PutAck { observed, .. }
            | Body::Value { observed, .. } => Some(*observed),
            _ => None,
        }
    }
}

/// One DHT message.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Message {
    /// Transaction id: random in a request, echoed in its reply.
    pub txid: u64,
    /// The sender's peer id (unauthenticated, see the module doc).
    pub sender: PeerId,
    /// Kind and fields.
    pub body: Body,
}

/// Why a datagram is not a valid DHT message (or a message could not be encoded).
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum MessageError {
    /// The first byte is not [`PACKET_TYPE`] (or the datagram is empty).
    NotDht,
    /// Over [`MAX_DATAGRAM`] bytes.
    Oversize(usize),
    /// A field did not decode or encode (truncated, too long, unknown tag or version...).
    Wire(WireError),
}

impl fmt::Display for MessageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotDht => f.write_str("not a DHT datagram"),
            Self::Oversize(n) => write!(f, "DHT message of {n} bytes is over {MAX_DATAGRAM}"),
            Self::Wire(e) => write!(f, "DHT message: {e}"),
        }
    }
}

impl std::error::Error for MessageError {}

impl From<WireError> for MessageError {
    fn from(e: WireError) -> Self {
        Self::Wire(e)
    }
}

/// Encoded size of an address.
#[must_use]
pub fn addr_len(addr: &SocketAddr) -> usize {
    match addr {
        SocketAddr::V4(_) => 7,
        SocketAddr::V6(_) => 19,
    }
}

/// Encoded size of a node entry.
#[must_use]
pub fn node_len(node: &NodeInfo) -> usize {
    32 + addr_len(&node.addr)
}

impl Message {
    /// Encoded size in bytes.
    #[must_use]
    pub fn encoded_len(&self) -> usize {
        let nodes = |n: &[NodeInfo]| 2 + n.iter().map(node_len).sum::<usize>();
        HEADER_LEN
            + self.body.observed().as_ref().map_or(0, addr_len)
            + match &self.body {
                Body::Ping | Body::Pong { .. } => 0,
                Body::FindNode { .. } => 32,
                Body::Nodes { nodes: n, .. } => nodes(n),
                Body::Put { record, .. } => 32 + 4 + 2 + record.len(),
                Body::PutAck { .. } => 1,
                Body::Get { .. } => 34,
                Body::Value {
                    records, nodes: n, ..
                } => 4 + records.iter().map(|r| 2 + r.len()).sum::<usize>() + nodes(n),
            }
    }

    /// Appends the encoded message to `buf`. On error `buf` is left as it was.
    pub fn encode(&self, buf: &mut Vec<u8>) -> Result<(), MessageError> {
        let start = buf.len();
        let res = self
            .encode_inner(buf)
            .and_then(|()| match buf.len() - start {
                n if n > MAX_DATAGRAM => Err(MessageError::Oversize(n)),
                _ => Ok(()),
            });
        if res.is_err() {
            buf.truncate(start);
        }
        res
    }

    /// The encoded message in a new buffer.
    pub fn to_bytes(&self) -> Result<Vec<u8>, MessageError> {
        let mut buf = Vec::with_capacity(self.encoded_len().min(MAX_DATAGRAM));
        self.encode(&mut buf)?;
        Ok(buf)
    }

    fn encode_inner(&self, buf: &mut Vec<u8>) -> Result<(), MessageError> {
        let mut w = Writer::new(buf);
        w.u8(PACKET_TYPE)
            .u8(VERSION)
            .u8(self.body.kind())
            .u64(self.txid)
            .peer_id(&self.sender);
        if let Some(observed) = self.body.observed() {
            w.socket_addr(&observed);
        }
        match &self.body {
            Body::Ping | Body::Pong { .. } => {}
            Body::FindNode { target } => {
                w.bytes(target);
            }
            Body::Nodes { nodes, .. } => write_nodes(&mut w, nodes)?,
            Body::Put {
                key,
                ttl_secs,
                record,
            } => {
                if *ttl_secs > MAX_TTL_SECS {
                    return Err(WireError::Invalid("ttl over one hour").into());
                }
                if record.is_empty() {
                    return Err(WireError::Invalid("empty record").into());
                }
                w.bytes(key).u32(*ttl_secs);
                w.bytes_u16("record", MAX_RECORD_LEN, record)?;
            }
            Body::PutAck { status, .. } => {
                w.u8(match status {
                    PutStatus::Stored => 0,
                    PutStatus::RateLimited => 1,
                    PutStatus::Full => 2,
                });
            }
            Body::Get { key, offset } => {
                w.bytes(key).u16(*offset);
            }
            Body::Value {
                total,
                records,
                nodes,
                ..
            } => {
                w.u16(*total);
                w.count("records", MAX_VALUE_RECORDS, records.len())?;
                for r in records {
                    w.bytes_u16("record", MAX_RECORD_LEN, r)?;
                }
                write_nodes(&mut w, nodes)?;
            }
        }
        Ok(())
    }

    /// Decodes one datagram. Never panics, whatever the input.
    pub fn decode(datagram: &[u8]) -> Result<Message, MessageError> {
        if datagram.len() > MAX_DATAGRAM {
            return Err(MessageError::Oversize(datagram.len()));
        }
        if !is_dht_packet(datagram) {
            return Err(MessageError::NotDht);
        }
        let mut r = Reader::new(datagram);
        r.u8()?;
        let version = r.u8()?;
        if version != VERSION {
            return Err(WireError::UnsupportedVersion(version).into());
        }
        let kind = r.u8()?;
        let txid = r.u64()?;
        let sender = r.peer_id()?;
        let body = match kind {
            1 => Body::Ping,
            2 => Body::Pong {
                observed: r.socket_addr()?,
            },
            3 => Body::FindNode { target: r.array()? },
            4 => {
                let observed = r.socket_addr()?;
                Body::Nodes {
                    observed,
                    nodes: read_nodes(&mut r)?,
                }
            }
            5 => {
                let key = r.array()?;
                let ttl_secs = r.u32()?;
                if ttl_secs > MAX_TTL_SECS {
                    return Err(WireError::Invalid("ttl over one hour").into());
                }
                let record = r.bytes_u16("record", MAX_RECORD_LEN)?.to_vec();
                if record.is_empty() {
                    return Err(WireError::Invalid("empty record").into());
                }
                Body::Put {
                    key,
                    ttl_secs,
                    record,
                }
            }
            6 => {
                let observed = r.socket_addr()?;
                let status = match r.u8()? {
                    0 => PutStatus::Stored,
                    1 => PutStatus::RateLimited,
                    2 => PutStatus::Full,
                    tag => {
                        return Err(WireError::UnknownTag {
                            field: "put status",
                            tag,
                        }
                        .into());
                    }
                };
                Body::PutAck { observed, status }
            }
            7 => Body::Get {
                key: r.array()?,
                offset: r.u16()?,
            },
            8 => {
                let observed = r.socket_addr()?;
                let total = r.u16()?;
                let count = r.count("records", MAX_VALUE_RECORDS)?;
                let mut records = Vec::with_capacity(count.min(8));
                for _ in 0..count {
                    records.push(r.bytes_u16("record", MAX_RECORD_LEN)?.to_vec());
                }
                Body::Value {
                    observed,
                    total,
                    records,
                    nodes: read_nodes(&mut r)?,
                }
            }
            tag => {
                return Err(WireError::UnknownTag {
                    field: "message kind",
                    tag,
                }
                .into());
            }
        };
        r.finish()?;
        Ok(Message { txid, sender, body })
    }
}

fn write_nodes(w: &mut Writer<'_>, nodes: &[NodeInfo]) -> Result<(), MessageError> {
    w.count("nodes", MAX_NODES, nodes.len())?;
    for n in nodes {
        w.peer_id(&n.peer).socket_addr(&n.addr);
    }
    Ok(())
}

fn read_nodes(r: &mut Reader<'_>) -> Result<Vec<NodeInfo>, MessageError> {
    let count = r.count("nodes", MAX_NODES)?;
    let mut nodes = Vec::with_capacity(count);
    for _ in 0..count {
        nodes.push(NodeInfo {
            peer: r.peer_id()?,
            addr: r.socket_addr()?,
        });
    }
    Ok(nodes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn v4(n: u8) -> SocketAddr {
        SocketAddr::from(([192, 0, 2, n], 7120))
    }

    fn v6(n: u16) -> SocketAddr {
        SocketAddr::from(([0x2001, 0xdb8, 0, 0, 0, 0, 0, n], 443))
    }

    fn node(n: u8, addr: SocketAddr) -> NodeInfo {
        NodeInfo {
            peer: PeerId([n; 32]),
            addr,
        }
    }

    fn samples() -> Vec<Message> {
        let bodies = vec![
            Body::Ping,
            Body::Pong { observed: v4(1) },
            Body::Pong { observed: v6(1) },
            Body::FindNode { target: [7; 32] },
            Body::Nodes {
                observed: v4(2),
                nodes: vec![],
            },
            Body::Nodes {
                observed: v6(2),
                nodes: (0..20).map(|i| node(i, v6(u16::from(i)))).collect(),
            },
            Body::Put {
                key: [1; 32],
                ttl_secs: 900,
                record: vec![9; 1024],
            },
            Body::Put {
                key: [1; 32],
                ttl_secs: MAX_TTL_SECS,
                record: vec![9],
            },
            Body::PutAck {
                observed: v4(3),
                status: PutStatus::Stored,
            },
            Body::PutAck {
                observed: v4(3),
                status: PutStatus::RateLimited,
            },
            Body::PutAck {
                observed: v4(3),
                status: PutStatus::Full,
            },
            Body::Get {
                key: [2; 32],
                offset: 0,
            },
            Body::Get {
                key: [2; 32],
                offset: 17,
            },
            Body::Value {
                observed: v4(4),
                total: 30,
                records: vec![vec![1; 100], vec![2; 200]],
                nodes: (0..8).map(|i| node(i, v4(i))).collect(),
            },
            Body::Value {
                observed: v6(4),
                total: 1,
                records: vec![vec![3; 1024]],
                nodes: vec![],
            },
        ];
        bodies
            .into_iter()
            .enumerate()
            .map(|(i, body)| Message {
                txid: i as u64 * 0x0101_0101_0101,
                sender: PeerId([0xaa; 32]),
                body,
            })
            .collect()
    }

    #[test]
    fn every_kind_round_trips_with_the_predicted_length() {
        for msg in samples() {
            let bytes = msg.to_bytes().unwrap();
            assert_eq!(bytes.len(), msg.encoded_len(), "{msg:?}");
            assert!(bytes.len() <= MAX_DATAGRAM);
            assert_eq!(bytes[0], PACKET_TYPE);
            assert_eq!(bytes[0] & 0x40, 0, "never looks like QUIC");
            assert_eq!(Message::decode(&bytes), Ok(msg.clone()));
            assert_eq!(msg.body.is_request(), msg.body.observed().is_none());
        }
    }

    #[test]
    fn every_truncation_and_extension_is_a_typed_error() {
        for msg in samples() {
            let bytes = msg.to_bytes().unwrap();
            for cut in 0..bytes.len() {
                assert!(
                    Message::decode(&bytes[..cut]).is_err(),
                    "{msg:?} cut at {cut}"
                );
            }
            let mut longer = bytes.clone();
            longer.push(0);
            let want = if longer.len() > MAX_DATAGRAM {
                MessageError::Oversize(longer.len())
            } else {
                MessageError::Wire(WireError::Trailing(1))
            };
            assert_eq!(Message::decode(&longer), Err(want));
        }
    }

    #[test]
    fn malformed_fields_table() {
        let good = Message {
            txid: 1,
            sender: PeerId([1; 32]),
            body: Body::Get {
                key: [0; 32],
                offset: 0,
            },
        }
        .to_bytes()
        .unwrap();
        let with = |i: usize, v: u8| {
            let mut b = good.clone();
            b[i] = v;
            b
        };
        let rows: Vec<(&str, Vec<u8>, MessageError)> = vec![
            ("empty", vec![], MessageError::NotDht),
            ("quic long header", with(0, 0xc0), MessageError::NotDht),
            ("beacon", with(0, 0x11), MessageError::NotDht),
            (
                "future version",
                with(1, 2),
                MessageError::Wire(WireError::UnsupportedVersion(2)),
            ),
            (
                "kind 0",
                with(2, 0),
                MessageError::Wire(WireError::UnknownTag {
                    field: "message kind",
                    tag: 0,
                }),
            ),
            (
                "kind 9",
                with(2, 9),
                MessageError::Wire(WireError::UnknownTag {
                    field: "message kind",
                    tag: 9,
                }),
            ),
            (
                "oversize",
                vec![PACKET_TYPE; MAX_DATAGRAM + 1],
                MessageError::Oversize(MAX_DATAGRAM + 1),
            ),
        ];
        for (name, bytes, want) in rows {
            assert_eq!(Message::decode(&bytes), Err(want), "{name}");
        }
        // A NODES list announcing 21 entries, a VALUE with a 2000-byte record, a 2-hour TTL.
        let mut nodes = good[..HEADER_LEN].to_vec();
        nodes[2] = 4;
        nodes.extend_from_slice(&[4, 1, 2, 3, 4, 0, 1, 0, 21]);
        assert!(matches!(
            Message::decode(&nodes),
            Err(MessageError::Wire(WireError::TooLong { len: 21, .. }))
        ));
        let mut value = good[..HEADER_LEN].to_vec();
        value[2] = 8;
        value.extend_from_slice(&[4, 1, 2, 3, 4, 0, 1, 0, 1, 0, 1, 0x07, 0xd0]);
        assert!(matches!(
            Message::decode(&value),
            Err(MessageError::Wire(WireError::TooLong { len: 2000, .. }))
        ));
        let put = Message {
            txid: 1,
            sender: PeerId([1; 32]),
            body: Body::Put {
                key: [0; 32],
                ttl_secs: 7200,
                record: vec![1],
            },
        };
        assert!(put.to_bytes().is_err());
        let mut bytes = Message {
            body: Body::Put {
                key: [0; 32],
                ttl_secs: 60,
                record: vec![1],
            },
            ..put
        }
        .to_bytes()
        .unwrap();
        bytes[HEADER_LEN + 32..HEADER_LEN + 36].copy_from_slice(&7200u32.to_be_bytes());
        assert_eq!(
            Message::decode(&bytes),
            Err(MessageError::Wire(WireError::Invalid("ttl over one hour")))
        );
    }

    #[test]
    fn oversize_messages_do_not_encode() {
        let msg = Message {
            txid: 1,
            sender: PeerId([1; 32]),
            body: Body::Value {
                observed: v6(1),
                total: 2,
                records: vec![vec![1; 1000], vec![2; 200]],
                nodes: vec![],
            },
        };
        let mut buf = vec![0xee];
        assert_eq!(
            msg.encode(&mut buf),
            Err(MessageError::Oversize(msg.encoded_len()))
        );
        assert_eq!(buf, [0xee], "buffer restored");
    }

    #[test]
    fn random_and_mutated_buffers_never_panic() {
        let mut rng = Rng::from_seed(0xd47);
        let encoded: Vec<Vec<u8>> = samples().iter().map(|m| m.to_bytes().unwrap()).collect();
        let mut accepted = 0;
        for i in 0..5000 {
            let buf = if i % 2 == 0 {
                let len = rng.below(1300) as usize;
                let mut b = vec![0u8; len];
                rng.fill(&mut b);
                if let Some(first) = b.first_mut() {
                    *first = PACKET_TYPE;
                }
                if let Some(v) = b.get_mut(1) {
                    *v = VERSION;
                }
                b
            } else {
                let mut b = encoded[rng.below(encoded.len() as u64) as usize].clone();
                for _ in 0..=rng.below(4) {
                    let at = rng.below(b.len() as u64) as usize;
                    if let Some(byte) = b.get_mut(at) {
                        *byte = rng.next_u64() as u8;
                    }
                }
                b
            };
            if let Ok(msg) = Message::decode(&buf) {
                accepted += 1;
                // Whatever decodes re-encodes to the same bytes.
                assert_eq!(msg.to_bytes().unwrap(), buf);
            }
        }
        assert!(accepted > 0);
    }
}
