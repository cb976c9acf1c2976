//! The VPN's TUN interface: created by name with its MTU, given its address once the cluster
//! allocates one, read and written without blocking from the event loop.
//!
//! Packets read are cut from a shared 64 KiB buffer ([`bytes::BytesMut`]): a packet handed to
//! the transport keeps its part of the buffer alive without a copy or an allocation of its own;
//! a new buffer is allocated once per ~50 full-size packets.

use std::fmt;
use std::io::{self, ErrorKind};
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsRawFd, RawFd};

use bytes::{Bytes, BytesMut};
use tun::AbstractDevice;

use crate::config::Ipv4Cidr;

/// Size of each receive buffer packets are cut from.
const POOL_CHUNK: usize = 64 * 1024;

/// What the TUN interface is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunSettings {
    /// Interface name (`IFACE`, e.g. `edgevpn0`).
    pub name: String,
    /// Its MTU (`EDGEVPNMTU`).
    pub mtu: u16,
}

/// Why the TUN interface could not be set up.
#[derive(Debug)]
pub enum TunError {
    /// Creating a TUN interface needs root or CAP_NET_ADMIN.
    Permission(String),
    /// Any other failure, with what was being done.
    Os(String, io::Error),
}

impl fmt::Display for TunError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Permission(name) => write!(
                f,
                "cannot create the TUN interface {name}: permission denied; the VPN needs root \
                 (or CAP_NET_ADMIN): run as root (an agent can also run without a VPN: \
                 p2p.vpn.create: false)"
            ),
            Self::Os(what, e) => write!(f, "{what}: {e}"),
        }
    }
}

impl std::error::Error for TunError {}

/// An open TUN interface.
pub struct TunDevice {
    device: tun::Device,
    name: String,
    mtu: usize,
    address: Option<Ipv4Cidr>,
    pool: BytesMut,
}

impl fmt::Debug for TunDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TunDevice")
            .field("name", &self.name)
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

impl TunDevice {
    /// Creates the interface (up, no address yet, IPv6 off) in non-blocking mode.
    pub fn open(settings: &TunSettings) -> Result<Self, TunError> {
        let mut config = tun::Configuration::default();
        config.tun_name(&settings.name).mtu(settings.mtu).up();
        let device = tun::create(&config).map_err(|e| match e {
            tun::Error::Io(io) if io.kind() == ErrorKind::PermissionDenied => {
                TunError::Permission(settings.name.clone())
            }
            other => TunError::Os(
                format!("cannot create the TUN interface {}", settings.name),
                io::Error::other(other.to_string()),
            ),
        })?;
        device.set_nonblock().map_err(|e| {
            TunError::Os(
                format!("TUN interface {}: non-blocking mode", settings.name),
                e,
            )
        })?;
        // The VPN carries IPv4 only: without IPv6 the kernel sends no router solicitations or
        // MLD reports to the interface (best effort: IPv6 may be off or absent already).
        let _ = std::fs::write(
            format!("/proc/sys/net/ipv6/conf/{}/disable_ipv6", settings.name),
            "1",
        );
        Ok(Self {
            device,
            name: settings.name.clone(),
            mtu: usize::from(settings.mtu),
            address: None,
            pool: BytesMut::new(),
        })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The address set so far.
    pub fn address(&self) -> Option<Ipv4Cidr> {
        self.address
    }

    /// Gives the interface `cidr` (address and prefix: the kernel adds the prefix route).
    pub fn set_address(&mut self, cidr: Ipv4Cidr) -> Result<(), TunError> {
        let os = |what: &str, e: tun::Error| {
            TunError::Os(
                format!("TUN interface {}: {what} {cidr}", self.name),
                io::Error::other(e.to_string()),
            )
        };
        let mask = prefix_mask(cidr.prefix_len);
        self.device
            .set_address(IpAddr::V4(cidr.addr))
            .map_err(|e| os("cannot set address", e))?;
        self.device
            .set_netmask(IpAddr::V4(mask))
            .map_err(|e| os("cannot set netmask of", e))?;
        self.device
            .enabled(true)
            .map_err(|e| os("cannot bring up with", e))?;
        self.address = Some(cidr);
        Ok(())
    }

    /// The next packet, `None` when there is none now.
    pub fn read_packet(&mut self) -> io::Result<Option<Bytes>> {
        if self.pool.capacity() < self.mtu {
            self.pool.reserve(POOL_CHUNK.max(self.mtu));
        }
        self.pool.resize(self.mtu, 0);
        loop {
            match self.device.recv(&mut self.pool) {
                Ok(n) => {
                    self.pool.truncate(n);
                    return Ok(Some(self.pool.split().freeze()));
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    self.pool.clear();
                    return Ok(None);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    self.pool.clear();
                    return Err(e);
                }
            }
        }
    }

    /// Writes one packet; an error when the kernel refused it (the packet is lost, as on a
    /// link; see [`device_gone`] for whether the interface is still there).
    pub fn write_packet(&self, packet: &[u8]) -> io::Result<()> {
        loop {
            match self.device.send(packet) {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

impl AsRawFd for TunDevice {
    fn as_raw_fd(&self) -> RawFd {
        self.device.as_raw_fd()
    }
}

/// Whether a read or write error means the interface is gone (deleted with `ip link del`,
/// its namespace removed, the driver unloaded) rather than one packet lost.
pub fn device_gone(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EBADFD | libc::EBADF | libc::ENODEV | libc::ENXIO | libc::EIO | libc::EPIPE)
    )
}

/// The netmask of a prefix length (clamped to 32).
fn prefix_mask(prefix_len: u8) -> Ipv4Addr {
    let bits = u32::from(prefix_len.min(32));
    Ipv4Addr::from(u32::MAX.checked_shl(32 - bits).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lost_interfaces_are_told_from_lost_packets() {
        for gone in [libc::EBADFD, libc::ENODEV, libc::EIO, libc::ENXIO] {
            assert!(device_gone(&io::Error::from_raw_os_error(gone)), "{gone}");
        }
        for transient in [libc::ENOBUFS, libc::EAGAIN, libc::EINVAL, libc::ENOMEM] {
            assert!(
                !device_gone(&io::Error::from_raw_os_error(transient)),
                "{transient}"
            );
        }
        assert!(!device_gone(&io::Error::other("no errno")));
    }

    #[test]
    fn prefix_masks() {
        for (len, mask) in [
            (0, "0.0.0.0"),
            (8, "255.0.0.0"),
            (24, "255.255.255.0"),
            (31, "255.255.255.254"),
            (32, "255.255.255.255"),
            (40, "255.255.255.255"),
        ] {
            assert_eq!(
                prefix_mask(len),
                mask.parse::<Ipv4Addr>().unwrap(),
                "/{len}"
            );
        }
    }
}
