//! Bounded binary encoding shared by every wire format (control frames, beacons, DHT messages).
//!
//! Integers are big-endian. Every read checks the remaining length first and returns a typed
//! [`WireError`]; nothing here can panic on input from the network.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::identity::PeerId;

/// Why bytes from the network did not decode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WireError {
    /// The input ended before a field of `needed` bytes.
    Truncated {
        /// Bytes the field needed.
        needed: usize,
        /// Bytes that were left.
        remaining: usize,
    },
    /// A length-prefixed field or a count is over its limit.
    TooLong {
        /// What was too long.
        field: &'static str,
        /// Its announced length or count.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Bytes were left after a complete message.
    Trailing(usize),
    /// A tag byte names no known variant.
    UnknownTag {
        /// What the tag selects.
        field: &'static str,
        /// The tag read.
        tag: u8,
    },
    /// A message of a protocol version this build does not speak.
    UnsupportedVersion(u8),
    /// A field whose value is not allowed (reason given).
    Invalid(&'static str),
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Truncated { needed, remaining } => {
                write!(f, "truncated: needed {needed} bytes, {remaining} left")
            }
            Self::TooLong { field, len, max } => {
                write!(f, "{field}: length {len} over the limit {max}")
            }
            Self::Trailing(n) => write!(f, "{n} unexpected bytes after the message"),
            Self::UnknownTag { field, tag } => write!(f, "{field}: unknown tag {tag:#04x}"),
            Self::UnsupportedVersion(v) => write!(f, "unsupported protocol version {v}"),
            Self::Invalid(why) => write!(f, "invalid: {why}"),
        }
    }
}

impl std::error::Error for WireError {}

/// Reads fields from a byte slice, front to back.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    /// Starts reading `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    /// Succeeds only when every byte has been read.
    pub fn finish(self) -> Result<(), WireError> {
        match self.buf.len() {
            0 => Ok(()),
            n => Err(WireError::Trailing(n)),
        }
    }

    /// The next `n` bytes.
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if n > self.buf.len() {
            return Err(WireError::Truncated {
                needed: n,
                remaining: self.buf.len(),
            });
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    /// Everything not read yet.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    /// The next `N` bytes as an array.
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.bytes(N)?);
        Ok(out)
    }

    /// One byte.
    pub fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.array::<1>()?[0])
    }

    /// A big-endian u16.
    pub fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    /// A big-endian u32.
    pub fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    /// A big-endian u64.
    pub fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    /// A byte string with a u16 length prefix, at most `max` bytes.
    pub fn bytes_u16(&mut self, field: &'static str, max: usize) -> Result<&'a [u8], WireError> {
        let len = usize::from(self.u16()?);
        if len > max {
            return Err(WireError::TooLong { field, len, max });
        }
        self.bytes(len)
    }

    /// A byte string with a u32 length prefix, at most `max` bytes.
    pub fn bytes_u32(&mut self, field: &'static str, max: usize) -> Result<&'a [u8], WireError> {
        let len = usize::try_from(self.u32()?).unwrap_or(usize::MAX);
        if len > max {
            return Err(WireError::TooLong { field, len, max });
        }
        self.bytes(len)
    }

    /// A UTF-8 string with a u16 length prefix, at most `max` bytes.
    pub fn str_u16(&mut self, field: &'static str, max: usize) -> Result<&'a str, WireError> {
        std::str::from_utf8(self.bytes_u16(field, max)?).map_err(|_| WireError::Invalid(field))
    }

    /// A count prefix (u16) for a list of at most `max` items.
    pub fn count(&mut self, field: &'static str, max: usize) -> Result<usize, WireError> {
        let len = usize::from(self.u16()?);
        if len > max {
            return Err(WireError::TooLong { field, len, max });
        }
        Ok(len)
    }

    /// A peer id (32-byte public key).
    pub fn peer_id(&mut self) -> Result<PeerId, WireError> {
        Ok(PeerId(self.array()?))
    }

    /// A socket address: tag 4 or 6, the address bytes, then the port.
    pub fn socket_addr(&mut self) -> Result<SocketAddr, WireError> {
        let ip = match self.u8()? {
            4 => IpAddr::V4(Ipv4Addr::from(self.array::<4>()?)),
            6 => IpAddr::V6(Ipv6Addr::from(self.array::<16>()?)),
            tag => {
                return Err(WireError::UnknownTag {
                    field: "address family",
                    tag,
                });
            }
        };
        Ok(SocketAddr::new(ip, self.u16()?))
    }
}

/// Appends fields to a caller-owned buffer (the mirror of [`Reader`]).
#[derive(Debug)]
pub struct Writer<'a> {
    buf: &'a mut Vec<u8>,
}

impl<'a> Writer<'a> {
    /// Appends to `buf` (existing contents are kept).
    pub fn new(buf: &'a mut Vec<u8>) -> Self {
        Self { buf }
    }

    /// Bytes in the buffer so far.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// True when nothing has been written to the buffer.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Raw bytes.
    pub fn bytes(&mut self, bytes: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(bytes);
        self
    }

    /// One byte.
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.buf.push(v);
        self
    }

    /// A big-endian u16.
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.bytes(&v.to_be_bytes())
    }

    /// A big-endian u32.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.bytes(&v.to_be_bytes())
    }

    /// A big-endian u64.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.bytes(&v.to_be_bytes())
    }

    /// A byte string with a u16 length prefix; fails if it is over `max` (or over u16).
    pub fn bytes_u16(
        &mut self,
        field: &'static str,
        max: usize,
        bytes: &[u8],
    ) -> Result<&mut Self, WireError> {
        let len = u16::try_from(bytes.len())
            .ok()
            .filter(|&l| usize::from(l) <= max)
            .ok_or(WireError::TooLong {
                field,
                len: bytes.len(),
                max: max.min(usize::from(u16::MAX)),
            })?;
        Ok(self.u16(len).bytes(bytes))
    }

    /// A byte string with a u32 length prefix; fails if it is over `max` (or over u32).
    pub fn bytes_u32(
        &mut self,
        field: &'static str,
        max: usize,
        bytes: &[u8],
    ) -> Result<&mut Self, WireError> {
        let len = u32::try_from(bytes.len())
            .ok()
            .filter(|_| bytes.len() <= max)
            .ok_or(WireError::TooLong {
                field,
                len: bytes.len(),
                max,
            })?;
        Ok(self.u32(len).bytes(bytes))
    }

    /// A list count (u16); fails if over `max`.
    pub fn count(
        &mut self,
        field: &'static str,
        max: usize,
        count: usize,
    ) -> Result<&mut Self, WireError> {
        let len = u16::try_from(count)
            .ok()
            .filter(|&l| usize::from(l) <= max)
            .ok_or(WireError::TooLong {
                field,
                len: count,
                max,
            })?;
        Ok(self.u16(len))
    }

    /// A peer id.
    pub fn peer_id(&mut self, id: &PeerId) -> &mut Self {
        self.bytes(id.as_bytes())
    }

    /// A socket address (see [`Reader::socket_addr`]).
    pub fn socket_addr(&mut self, addr: &SocketAddr) -> &mut Self {
        match addr.ip() {
            IpAddr::V4(ip) => self.u8(4).bytes(&ip.octets()),
            IpAddr::V6(ip) => self.u8(6).bytes(&ip.octets()),
        };
        self.u16(addr.port())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_round_trip() {
        let addrs: [SocketAddr; 2] = [
            "10.1.0.7:7120".parse().unwrap(),
            "[fe80::1]:9".parse().unwrap(),
        ];
        let mut buf = Vec::new();
        let mut w = Writer::new(&mut buf);
        w.u8(1)
            .u16(2)
            .u32(3)
            .u64(u64::MAX)
            .peer_id(&PeerId([9; 32]));
        w.bytes_u16("name", 10, b"kairos").unwrap();
        w.count("addrs", 4, addrs.len()).unwrap();
        for a in &addrs {
            w.socket_addr(a);
        }
        w.bytes_u32("blob", 100, &[7; 40]).unwrap();
        let mut r = Reader::new(&buf);
        assert_eq!(
            (r.u8(), r.u16(), r.u32(), r.u64()),
            (Ok(1), Ok(2), Ok(3), Ok(u64::MAX))
        );
        assert_eq!(r.peer_id(), Ok(PeerId([9; 32])));
        assert_eq!(r.str_u16("name", 10), Ok("kairos"));
        let n = r.count("addrs", 4).unwrap();
        let read: Vec<_> = (0..n).map(|_| r.socket_addr().unwrap()).collect();
        assert_eq!(read, addrs);
        assert_eq!(r.bytes_u32("blob", 100).unwrap(), &[7; 40][..]);
        r.finish().unwrap();
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let mut buf = Vec::new();
        Writer::new(&mut buf)
            .u64(1)
            .socket_addr(&"[::1]:1".parse().unwrap());
        for cut in 0..buf.len() {
            let mut r = Reader::new(&buf[..cut]);
            let res = r.u64().and_then(|_| r.socket_addr());
            assert!(
                matches!(res, Err(WireError::Truncated { .. })),
                "cut at {cut}: {res:?}"
            );
        }
    }

    #[test]
    fn limits_are_enforced_both_ways() {
        let mut buf = Vec::new();
        let err = Writer::new(&mut buf)
            .bytes_u16("name", 3, b"toolong")
            .unwrap_err();
        assert_eq!(
            err,
            WireError::TooLong {
                field: "name",
                len: 7,
                max: 3
            }
        );
        Writer::new(&mut buf).u16(500).bytes(&[0; 500]);
        assert!(matches!(
            Reader::new(&buf).bytes_u16("name", 100),
            Err(WireError::TooLong { len: 500, .. })
        ));
        let huge = [0xff, 0xff, 0xff, 0xff];
        assert!(matches!(
            Reader::new(&huge).bytes_u32("blob", 1 << 20),
            Err(WireError::TooLong { .. })
        ));
        assert!(matches!(
            Reader::new(&[5, 0]).socket_addr(),
            Err(WireError::UnknownTag { tag: 5, .. })
        ));
        assert_eq!(Reader::new(&[1, 2]).finish(), Err(WireError::Trailing(2)));
        assert_eq!(
            Reader::new(&[0, 1, 0xff]).str_u16("s", 9),
            Err(WireError::Invalid("s"))
        );
    }
}
