//! Just enough IP header parsing to route a packet: version, source, destination, and a total
//! length that matches the bytes held.
//!
//! The IPv4 header checksum is not verified: the packet came from the local kernel (TUN) or over
//! an authenticated QUIC connection, and the receiving kernel checks it anyway. Options and
//! extension headers are not looked at. Every length is checked before it is used: any input
//! gives a header or a [`PacketError`], never a panic.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

/// Smallest IPv4 header (no options).
pub const IPV4_MIN_HEADER_LEN: usize = 20;
/// The fixed IPv6 header.
pub const IPV6_HEADER_LEN: usize = 40;

/// Why bytes are not a well-formed IP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PacketError {
    /// Shorter than the header its version needs (`need` is 1 for an empty packet).
    TooShort {
        /// Bytes held.
        len: usize,
        /// Bytes needed.
        need: usize,
    },
    /// The version nibble is neither 4 nor 6.
    BadVersion(u8),
    /// IPv4 header length field (IHL, in 32-bit words) below 5.
    BadHeaderLength(u8),
    /// The length the header declares is not the number of bytes held (IPv6 jumbograms
    /// included: they never fit a VPN MTU).
    LengthMismatch {
        /// Total length from the header.
        declared: usize,
        /// Bytes held.
        actual: usize,
    },
}

impl fmt::Display for PacketError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooShort { len, need } => {
                write!(f, "IP packet of {len} bytes, at least {need} needed")
            }
            Self::BadVersion(v) => write!(f, "IP version {v}"),
            Self::BadHeaderLength(ihl) => write!(f, "IPv4 header length {ihl} words, below 5"),
            Self::LengthMismatch { declared, actual } => {
                write!(
                    f,
                    "IP header declares {declared} bytes, packet has {actual}"
                )
            }
        }
    }
}

impl std::error::Error for PacketError {}

/// The addresses of a well-formed IP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpHeader {
    /// An IPv4 packet.
    V4 {
        /// Source address.
        source: Ipv4Addr,
        /// Destination address.
        destination: Ipv4Addr,
    },
    /// An IPv6 packet.
    V6 {
        /// Source address.
        source: Ipv6Addr,
        /// Destination address.
        destination: Ipv6Addr,
    },
}

impl IpHeader {
    /// Parses the header of `packet`, which must hold exactly one IP packet.
    pub fn parse(packet: &[u8]) -> Result<Self, PacketError> {
        let Some(&first) = packet.first() else {
            return Err(PacketError::TooShort { len: 0, need: 1 });
        };
        match first >> 4 {
            4 => parse_v4(packet),
            6 => parse_v6(packet),
            version => Err(PacketError::BadVersion(version)),
        }
    }
}

fn parse_v4(packet: &[u8]) -> Result<IpHeader, PacketError> {
    let header: &[u8; IPV4_MIN_HEADER_LEN] = fixed_header(packet)?;
    let ihl = header[0] & 0x0f;
    if ihl < 5 {
        return Err(PacketError::BadHeaderLength(ihl));
    }
    let declared = usize::from(u16::from_be_bytes([header[2], header[3]]));
    check_length(declared, packet.len())?;
    // The options must fit in the packet too.
    let header_len = usize::from(ihl) * 4;
    if header_len > packet.len() {
        return Err(PacketError::TooShort {
            len: packet.len(),
            need: header_len,
        });
    }
    Ok(IpHeader::V4 {
        source: Ipv4Addr::new(header[12], header[13], header[14], header[15]),
        destination: Ipv4Addr::new(header[16], header[17], header[18], header[19]),
    })
}

fn parse_v6(packet: &[u8]) -> Result<IpHeader, PacketError> {
    let header: &[u8; IPV6_HEADER_LEN] = fixed_header(packet)?;
    let payload_len = usize::from(u16::from_be_bytes([header[4], header[5]]));
    check_length(IPV6_HEADER_LEN + payload_len, packet.len())?;
    let address = |at: usize| {
        let mut octets = [0u8; 16];
        octets.copy_from_slice(&header[at..at + 16]);
        Ipv6Addr::from(octets)
    };
    Ok(IpHeader::V6 {
        source: address(8),
        destination: address(24),
    })
}

/// The first `N` bytes of `packet`, or `TooShort`.
fn fixed_header<const N: usize>(packet: &[u8]) -> Result<&[u8; N], PacketError> {
    packet.first_chunk::<N>().ok_or(PacketError::TooShort {
        len: packet.len(),
        need: N,
    })
}

fn check_length(declared: usize, actual: usize) -> Result<(), PacketError> {
    if declared == actual {
        Ok(())
    } else {
        Err(PacketError::LengthMismatch { declared, actual })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A well-formed IPv4 packet from `source` to `destination` of `len` bytes (at least 20).
    pub(crate) fn ipv4(source: Ipv4Addr, destination: Ipv4Addr, len: usize) -> Vec<u8> {
        let mut p = vec![0u8; len];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&u16::try_from(len).unwrap().to_be_bytes());
        p[8] = 64;
        p[9] = 17;
        p[12..16].copy_from_slice(&source.octets());
        p[16..20].copy_from_slice(&destination.octets());
        p
    }

    /// A well-formed IPv6 packet of `len` bytes (at least 40).
    pub(crate) fn ipv6(source: Ipv6Addr, destination: Ipv6Addr, len: usize) -> Vec<u8> {
        let mut p = vec![0u8; len];
        p[0] = 0x60;
        p[4..6].copy_from_slice(&u16::try_from(len - 40).unwrap().to_be_bytes());
        p[6] = 17;
        p[7] = 64;
        p[8..24].copy_from_slice(&source.octets());
        p[24..40].copy_from_slice(&destination.octets());
        p
    }

    fn a4(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn a6(s: &str) -> Ipv6Addr {
        s.parse().unwrap()
    }

    #[test]
    fn well_formed_packets_parse() {
        let (s4, d4) = (a4("10.1.0.7"), a4("10.1.0.9"));
        let (s6, d6) = (a6("fd00::1"), a6("fe80::2"));
        let v4 = IpHeader::V4 {
            source: s4,
            destination: d4,
        };
        let v6 = IpHeader::V6 {
            source: s6,
            destination: d6,
        };
        let mut with_options = ipv4(s4, d4, 60);
        with_options[0] = 0x4f; // 60-byte header, no payload
        let table: [(&str, Vec<u8>, IpHeader); 5] = [
            ("ipv4 header only", ipv4(s4, d4, 20), v4),
            ("ipv4 with payload", ipv4(s4, d4, 1200), v4),
            ("ipv4 all options", with_options, v4),
            ("ipv6 header only", ipv6(s6, d6, 40), v6),
            ("ipv6 with payload", ipv6(s6, d6, 1280), v6),
        ];
        for (name, packet, want) in table {
            assert_eq!(IpHeader::parse(&packet), Ok(want), "{name}");
        }
    }

    #[test]
    fn malformed_packets_are_typed_errors() {
        let (s4, d4) = (a4("10.1.0.7"), a4("10.1.0.9"));
        let (s6, d6) = (a6("fd00::1"), a6("fd00::2"));
        let edit = |mut p: Vec<u8>, f: fn(&mut Vec<u8>)| {
            f(&mut p);
            p
        };
        let table: [(&str, Vec<u8>, PacketError); 14] = [
            ("empty", vec![], PacketError::TooShort { len: 0, need: 1 }),
            (
                "ipv4 truncated header",
                ipv4(s4, d4, 40)[..19].to_vec(),
                PacketError::TooShort { len: 19, need: 20 },
            ),
            (
                "ipv4 version nibble only",
                vec![0x45],
                PacketError::TooShort { len: 1, need: 20 },
            ),
            (
                "ipv6 truncated header",
                ipv6(s6, d6, 60)[..39].to_vec(),
                PacketError::TooShort { len: 39, need: 40 },
            ),
            ("version 0", vec![0x05; 40], PacketError::BadVersion(0)),
            ("version 5", vec![0x55; 40], PacketError::BadVersion(5)),
            ("version 15", vec![0xff; 40], PacketError::BadVersion(15)),
            (
                "ihl 4",
                edit(ipv4(s4, d4, 40), |p| p[0] = 0x44),
                PacketError::BadHeaderLength(4),
            ),
            (
                "ihl 0",
                edit(ipv4(s4, d4, 40), |p| p[0] = 0x40),
                PacketError::BadHeaderLength(0),
            ),
            (
                "ipv4 options past the end",
                edit(ipv4(s4, d4, 40), |p| p[0] = 0x4b),
                PacketError::TooShort { len: 40, need: 44 },
            ),
            (
                "ipv4 truncated payload",
                ipv4(s4, d4, 100)[..99].to_vec(),
                PacketError::LengthMismatch {
                    declared: 100,
                    actual: 99,
                },
            ),
            (
                "ipv4 trailing bytes",
                edit(ipv4(s4, d4, 100), |p| p.push(0)),
                PacketError::LengthMismatch {
                    declared: 100,
                    actual: 101,
                },
            ),
            (
                "ipv6 truncated payload",
                ipv6(s6, d6, 100)[..90].to_vec(),
                PacketError::LengthMismatch {
                    declared: 100,
                    actual: 90,
                },
            ),
            (
                "ipv6 jumbogram (payload length 0)",
                edit(ipv6(s6, d6, 100), |p| p[4..6].fill(0)),
                PacketError::LengthMismatch {
                    declared: 40,
                    actual: 100,
                },
            ),
        ];
        for (name, packet, want) in table {
            assert_eq!(IpHeader::parse(&packet), Err(want), "{name}");
            assert!(!want.to_string().is_empty());
        }
    }
}
