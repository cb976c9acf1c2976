//! Control messages between members, carried one per QUIC stream.
//!
//! Layout: protocol version (1 byte), message type (1 byte), then the body in the shared
//! [`wire`](crate::wire) encoding. Lists are capped so a message can never ask us to hold more than
//! the caps below, whatever `max_message_size` allows.

use std::net::SocketAddr;
use std::time::Duration;

use crate::identity::PeerId;
use crate::wire::{Reader, WireError, Writer};

/// Version of the control protocol this build speaks.
pub const CONTROL_VERSION: u8 = 2;
/// Addresses per member entry.
pub const MAX_MEMBER_ADDRS: usize = 8;
/// Member entries per message.
pub const MAX_MEMBERS_PER_MESSAGE: usize = 4096;

const TYPE_HELLO: u8 = 1;
const TYPE_MEMBERS: u8 = 2;
const TYPE_PUNCH_REQUEST: u8 = 3;
const TYPE_PUNCH_NOTIFY: u8 = 4;
const TYPE_LEDGER: u8 = 5;

/// What one member tells another about a third (or about itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberInfo {
    /// The member.
    pub peer: PeerId,
    /// Where it is reachable.
    pub addrs: Vec<SocketAddr>,
    /// How long ago the sender last had first-hand news of it (zero for itself): ages only grow
    /// as news travels, so a member that left ages out everywhere.
    pub age: Duration,
    /// Its cluster ([`cluster_tag`] of its `network_id`), 0 when not known: members keep some
    /// connections within their cluster, whose ledger bucket only its members exchange.
    pub cluster: u32,
}

/// The tag of the cluster whose bucket is `network_bucket` in [`MemberInfo::cluster`]: a
/// 32-bit FNV-1a, never 0 (0 means "not known"). Two clusters whose tags collide only lose the
/// preference for each other's members when choosing neighbours.
#[must_use]
pub fn cluster_tag(network_bucket: &str) -> u32 {
    crate::cluster::fnv32a(network_bucket).max(1)
}

/// A control message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    /// First message on a new connection, both ways.
    Hello {
        /// The sender's listen addresses.
        listen: Vec<SocketAddr>,
        /// The address the sender sees the receiver at (its public address behind NAT).
        observed: SocketAddr,
        /// Members the sender knows.
        members: Vec<MemberInfo>,
    },
    /// Members that are new or changed, or a periodic full list.
    Members(Vec<MemberInfo>),
    /// To a member connected to both: "tell `target` and me to dial each other now".
    PunchRequest {
        /// The member the sender cannot reach directly.
        target: PeerId,
    },
    /// From that member: "dial `peer` at `addr` now" (the address it sees `peer` at); both ends
    /// get one at the same moment, so their NATs open for each other.
    PunchNotify {
        /// The member to dial.
        peer: PeerId,
        /// Its address as the coordinator sees it.
        addr: SocketAddr,
    },
    /// A ledger sync message, decoded (with the ledger's limits) by the cluster layer.
    Ledger(Vec<u8>),
}

impl Control {
    /// Bytes a [`Control::Ledger`] message adds to its payload (version and type).
    pub const LEDGER_HEADER_LEN: usize = 2;

    /// Encodes into `buf` (cleared first).
    pub fn encode(&self, buf: &mut Vec<u8>) -> Result<(), WireError> {
        buf.clear();
        let mut w = Writer::new(buf);
        w.u8(CONTROL_VERSION);
        match self {
            Control::Hello {
                listen,
                observed,
                members,
            } => {
                w.u8(TYPE_HELLO);
                write_addrs(&mut w, listen)?;
                w.socket_addr(observed);
                write_members(&mut w, members)?;
            }
            Control::Members(members) => {
                w.u8(TYPE_MEMBERS);
                write_members(&mut w, members)?;
            }
            Control::PunchRequest { target } => {
                w.u8(TYPE_PUNCH_REQUEST).peer_id(target);
            }
            Control::PunchNotify { peer, addr } => {
                w.u8(TYPE_PUNCH_NOTIFY).peer_id(peer).socket_addr(addr);
            }
            Control::Ledger(bytes) => {
                w.u8(TYPE_LEDGER).bytes(bytes);
            }
        }
        Ok(())
    }

    /// Decodes one whole message.
    pub fn decode(bytes: &[u8]) -> Result<Control, WireError> {
        let mut r = Reader::new(bytes);
        let version = r.u8()?;
        if version != CONTROL_VERSION {
            return Err(WireError::UnsupportedVersion(version));
        }
        let msg = match r.u8()? {
            TYPE_HELLO => Control::Hello {
                listen: read_addrs(&mut r)?,
                observed: r.socket_addr()?,
                members: read_members(&mut r)?,
            },
            TYPE_MEMBERS => Control::Members(read_members(&mut r)?),
            TYPE_PUNCH_REQUEST => Control::PunchRequest {
                target: r.peer_id()?,
            },
            TYPE_PUNCH_NOTIFY => Control::PunchNotify {
                peer: r.peer_id()?,
                addr: r.socket_addr()?,
            },
            TYPE_LEDGER => Control::Ledger(r.rest().to_vec()),
            tag => {
                return Err(WireError::UnknownTag {
                    field: "control message type",
                    tag,
                });
            }
        };
        r.finish()?;
        Ok(msg)
    }
}

fn write_addrs(w: &mut Writer<'_>, addrs: &[SocketAddr]) -> Result<(), WireError> {
    w.count("addresses", MAX_MEMBER_ADDRS, addrs.len())?;
    for a in addrs {
        w.socket_addr(a);
    }
    Ok(())
}

fn read_addrs(r: &mut Reader<'_>) -> Result<Vec<SocketAddr>, WireError> {
    let n = r.count("addresses", MAX_MEMBER_ADDRS)?;
    (0..n).map(|_| r.socket_addr()).collect()
}

fn write_members(w: &mut Writer<'_>, members: &[MemberInfo]) -> Result<(), WireError> {
    w.count("members", MAX_MEMBERS_PER_MESSAGE, members.len())?;
    for m in members {
        w.peer_id(&m.peer);
        w.u32(u32::try_from(m.age.as_millis()).unwrap_or(u32::MAX));
        w.u32(m.cluster);
        write_addrs(w, &m.addrs)?;
    }
    Ok(())
}

fn read_members(r: &mut Reader<'_>) -> Result<Vec<MemberInfo>, WireError> {
    let n = r.count("members", MAX_MEMBERS_PER_MESSAGE)?;
    // Each entry is at least 42 bytes: refuse counts the message cannot hold before allocating.
    if n.saturating_mul(42) > r.remaining() {
        return Err(WireError::Truncated {
            needed: n * 42,
            remaining: r.remaining(),
        });
    }
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let peer = r.peer_id()?;
        let age = Duration::from_millis(u64::from(r.u32()?));
        let cluster = r.u32()?;
        out.push(MemberInfo {
            peer,
            addrs: read_addrs(r)?,
            age,
            cluster,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn sample() -> Vec<Control> {
        let m = |b: u8| MemberInfo {
            peer: PeerId([b; 32]),
            addrs: vec![
                SocketAddr::from(([10, 0, 0, b], 7120)),
                "[2001:db8::1]:9".parse().unwrap(),
            ],
            age: Duration::from_millis(u64::from(b) * 100),
            cluster: u32::from(b) * 7,
        };
        vec![
            Control::Hello {
                listen: vec!["192.0.2.1:7120".parse().unwrap()],
                observed: "198.51.100.2:40000".parse().unwrap(),
                members: vec![m(1), m(2)],
            },
            Control::Members(vec![m(3)]),
            Control::Members(vec![]),
            Control::PunchRequest {
                target: PeerId([7; 32]),
            },
            Control::PunchNotify {
                peer: PeerId([8; 32]),
                addr: "203.0.113.9:7120".parse().unwrap(),
            },
        ]
    }

    #[test]
    fn messages_round_trip() {
        let mut buf = Vec::new();
        for msg in sample() {
            msg.encode(&mut buf).unwrap();
            assert_eq!(Control::decode(&buf).unwrap(), msg);
        }
    }

    #[test]
    fn ledger_payload_is_carried_as_is() {
        let mut buf = Vec::new();
        for payload in [vec![], vec![1, 2, 3]] {
            Control::Ledger(payload.clone()).encode(&mut buf).unwrap();
            assert_eq!(buf.len(), Control::LEDGER_HEADER_LEN + payload.len());
            assert_eq!(Control::decode(&buf).unwrap(), Control::Ledger(payload));
        }
    }

    #[test]
    fn bad_input_is_a_typed_error() {
        let mut buf = Vec::new();
        for msg in sample() {
            msg.encode(&mut buf).unwrap();
            for cut in 0..buf.len() {
                assert!(Control::decode(&buf[..cut]).is_err(), "cut {cut}");
            }
            let mut longer = buf.clone();
            longer.push(0);
            assert_eq!(Control::decode(&longer), Err(WireError::Trailing(1)));
        }
        assert_eq!(
            Control::decode(&[9, 1]),
            Err(WireError::UnsupportedVersion(9))
        );
        assert!(matches!(
            Control::decode(&[CONTROL_VERSION, 77]),
            Err(WireError::UnknownTag { tag: 77, .. })
        ));
        // A count far beyond what the bytes hold is refused before allocating.
        assert!(matches!(
            Control::decode(&[CONTROL_VERSION, 2, 0x0f, 0xff]),
            Err(WireError::Truncated { .. })
        ));
        let mut rng = Rng::from_seed(11);
        for _ in 0..5000 {
            let len = rng.below(200) as usize;
            let mut junk = vec![0u8; len];
            rng.fill(&mut junk);
            if let Some(b) = junk.first_mut() {
                *b = CONTROL_VERSION;
            }
            let _ = Control::decode(&junk);
        }
    }

    #[test]
    fn oversize_lists_are_refused_when_encoding() {
        let many = vec!["10.0.0.1:1".parse().unwrap(); MAX_MEMBER_ADDRS + 1];
        let msg = Control::Hello {
            listen: many,
            observed: "10.0.0.2:2".parse().unwrap(),
            members: vec![],
        };
        assert!(matches!(
            msg.encode(&mut Vec::new()),
            Err(WireError::TooLong { .. })
        ));
    }
}
