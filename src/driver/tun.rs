//! The VPN's TUN interface: created by name with its MTU, given its address once the cluster
//! allocates one, read and written without blocking from the event loop.
//!
//! Packets read are cut from shared buffers ([`ChunkPool`]): a packet handed to the transport
//! keeps its part of a buffer alive without an allocation of its own, and a buffer is used
//! again once its packets are sent.
//!
//! # Offloads
//! Where the kernel offers them (Linux 2.6.27+ for `IFF_VNET_HDR`, `TUNSETOFFLOAD`), the interface
//! is opened with a virtio-net header and TCP segmentation offload (`TUN_F_CSUM | TUN_F_TSO4`):
//! one read returns up to 64 KiB of one TCP flow, split into MTU-sized packets in user space,
//! and received in-order TCP segments are merged into one write ([`crate::vpn::offload`]). When
//! the kernel (or the `tun` crate) refuses either, the interface is opened again without them
//! and carries one packet per read and write, as before; `KAIROS_P2P_TUN_OFFLOAD=off` asks for
//! that plain mode. The packets sent to peers are the same in both modes.

use std::fmt;
use std::io::{self, ErrorKind, IoSlice};
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsRawFd, RawFd};

use bytes::Bytes;
use tun::AbstractDevice;

use crate::chunks::ChunkPool;
use crate::config::Ipv4Cidr;
use crate::vpn::offload::{
    self, Coalescer, MAX_MERGED_SEGMENTS, MAX_SUPER_PACKET, SEGMENT_POOL_CHUNK, VNET_HDR_LEN,
};

/// Size of each receive buffer packets are cut from.
const POOL_CHUNK: usize = 64 * 1024;
/// Full read buffers kept for reuse: packets read wait in a peer's datagram queue (reads
/// pause past half of its 1 MiB) until sent, about eight 128 KiB buffers' worth.
const KEEP_SEGMENT_CHUNKS: usize = 8;
/// Environment variable that turns TUN offloads off (`off`, `0`, `false`, `no`).
pub const OFFLOAD_ENV: &str = "KAIROS_P2P_TUN_OFFLOAD";
/// The offloads asked of the kernel: checksums and TCP segmentation over IPv4 (see
/// [`crate::vpn::offload`] for why not IPv6 or UDP).
const OFFLOADS: libc::c_uint = libc::TUN_F_CSUM | libc::TUN_F_TSO4;

/// What the TUN interface is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunSettings {
    /// Interface name (`IFACE`, e.g. `edgevpn0`).
    pub name: String,
    /// Its MTU (`EDGEVPNMTU`).
    pub mtu: u16,
    /// Use TCP segmentation offload and receive coalescing where the kernel offers them (see
    /// the module documentation).
    pub offload: bool,
}

/// Whether the environment leaves TUN offloads on ([`OFFLOAD_ENV`]; on unless told otherwise).
pub fn offload_from_env() -> bool {
    std::env::var(OFFLOAD_ENV).map_or(true, |v| {
        !matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "off" | "0" | "false" | "no"
        )
    })
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
    pool: ChunkPool,
    /// With offloads: the read buffer (virtio header + up to 64 KiB) and the receive coalescer.
    offload: Option<Offload>,
}

struct Offload {
    read_buf: Vec<u8>,
    coalescer: Coalescer,
}

impl fmt::Debug for TunDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TunDevice")
            .field("name", &self.name)
            .field("address", &self.address)
            .field("offload", &self.offload.is_some())
            .finish_non_exhaustive()
    }
}

impl TunDevice {
    /// Creates the interface (up, no address yet, IPv6 off) in non-blocking mode, with offloads
    /// when asked and the kernel offers them.
    pub fn open(settings: &TunSettings) -> Result<Self, TunError> {
        if settings.offload {
            match Self::create(settings, true) {
                Ok(device) => match set_offload(&device) {
                    Ok(()) => return Self::finish(settings, device, true),
                    Err(e) => log::info!(
                        "TUN interface {}: no segmentation offload ({e}); one packet per read",
                        settings.name
                    ),
                },
                Err(TunError::Permission(name)) => return Err(TunError::Permission(name)),
                Err(e) => log::info!("{e} with a virtio header; trying without"),
            }
        }
        let device = Self::create(settings, false)?;
        Self::finish(settings, device, false)
    }

    fn create(settings: &TunSettings, vnet_hdr: bool) -> Result<tun::Device, TunError> {
        let mut config = tun::Configuration::default();
        config.tun_name(&settings.name).mtu(settings.mtu).up();
        config.platform_config(|p| {
            p.vnet_hdr(vnet_hdr);
        });
        tun::create(&config).map_err(|e| match e {
            tun::Error::Io(io) if io.kind() == ErrorKind::PermissionDenied => {
                TunError::Permission(settings.name.clone())
            }
            other => TunError::Os(
                format!("cannot create the TUN interface {}", settings.name),
                io::Error::other(other.to_string()),
            ),
        })
    }

    fn finish(
        settings: &TunSettings,
        device: tun::Device,
        offload: bool,
    ) -> Result<Self, TunError> {
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
            pool: if offload {
                ChunkPool::new(SEGMENT_POOL_CHUNK, KEEP_SEGMENT_CHUNKS)
            } else {
                ChunkPool::new(
                    POOL_CHUNK.max(usize::from(settings.mtu)),
                    KEEP_SEGMENT_CHUNKS,
                )
            },
            offload: offload.then(|| Offload {
                read_buf: vec![0; VNET_HDR_LEN + MAX_SUPER_PACKET],
                coalescer: Coalescer::new(),
            }),
        })
    }

    /// Whether the interface runs with offloads.
    pub fn offloads(&self) -> bool {
        self.offload.is_some()
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

    /// Reads once and hands the packet(s) read to `emit` (one, or with offloads the segments of
    /// a super-packet); how many, `None` when there was nothing to read.
    pub fn read_packets(&mut self, mut emit: impl FnMut(Bytes)) -> io::Result<Option<usize>> {
        let Some(offload) = &mut self.offload else {
            return Ok(self.read_packet()?.map(|p| {
                emit(p);
                1
            }));
        };
        let n = loop {
            match self.device.recv(&mut offload.read_buf) {
                Ok(n) => break n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        };
        let mut count = 0;
        let read = offload.read_buf.get(..n).unwrap_or_default();
        if let Err(e) = offload::split(read, &mut self.pool, |p| {
            count += 1;
            emit(p);
        }) {
            // What the kernel wrote does not parse: lost like a malformed packet.
            log::debug!("TUN interface {}: {e}", self.name);
        }
        Ok(Some(count))
    }

    /// The next packet (no offloads), `None` when there is none now.
    fn read_packet(&mut self) -> io::Result<Option<Bytes>> {
        let buf = self.pool.room(self.mtu);
        buf.resize(self.mtu, 0);
        loop {
            match self.device.recv(buf) {
                Ok(n) => {
                    buf.truncate(n);
                    return Ok(Some(buf.split().freeze()));
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    buf.clear();
                    return Ok(None);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    buf.clear();
                    return Err(e);
                }
            }
        }
    }

    /// Queues a packet for the interface: written now without offloads, at the next
    /// [`flush`](Self::flush) (merged with the segments of its TCP flow) with them. Gives the
    /// number of packets the kernel refused (lost, as on a link), or the error that says the
    /// interface is gone ([`device_gone`]).
    pub fn queue_packet(&mut self, packet: Bytes) -> io::Result<u64> {
        let full = match &self.offload {
            None => return count_refused(self.write_packet(&packet)),
            Some(o) => o.coalescer.is_full(),
        };
        let refused = if full { self.flush()? } else { 0 };
        if let Some(o) = &mut self.offload {
            o.coalescer.push(packet);
        }
        Ok(refused)
    }

    /// Writes what [`queue_packet`](Self::queue_packet) queued; as it, the number of packets
    /// refused or the error that says the interface is gone.
    pub fn flush(&mut self) -> io::Result<u64> {
        let Some(offload) = &mut self.offload else {
            return Ok(0);
        };
        let mut refused = 0;
        let fd = self.device.as_raw_fd();
        offload.coalescer.flush(|header, parts| {
            refused += count_refused(write_parts(fd, header, parts))?;
            Ok::<(), io::Error>(())
        })?;
        Ok(refused)
    }

    fn write_packet(&self, packet: &[u8]) -> io::Result<()> {
        write_parts(self.device.as_raw_fd(), &[], &[IoSlice::new(packet)])
    }
}

/// 0 when written, 1 when the kernel refused the packet, the error when the interface is gone.
fn count_refused(result: io::Result<()>) -> io::Result<u64> {
    match result {
        Ok(()) => Ok(0),
        Err(e) if device_gone(&e) => Err(e),
        Err(e) => {
            log::trace!("TUN write: {e}");
            Ok(1)
        }
    }
}

/// Writes `header` and `parts` as one packet (one `writev`).
fn write_parts(fd: RawFd, header: &[u8], parts: &[IoSlice<'_>]) -> io::Result<()> {
    let mut iov = [IoSlice::new(&[]); MAX_MERGED_SEGMENTS + 2];
    let n = parts.len().min(MAX_MERGED_SEGMENTS + 1);
    iov[0] = IoSlice::new(header);
    iov[1..=n].copy_from_slice(&parts[..n]);
    let iov = &iov[..=n];
    loop {
        // SAFETY: `IoSlice` is ABI-compatible with `iovec` on Unix; every slice is live for the
        // call and writev only reads them.
        let written =
            unsafe { libc::writev(fd, iov.as_ptr().cast::<libc::iovec>(), iov.len() as _) };
        if written >= 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Turns on checksum and TCP segmentation offload (`TUNSETOFFLOAD`) for a device opened with
/// `IFF_VNET_HDR`.
fn set_offload(device: &tun::Device) -> io::Result<()> {
    // SAFETY: TUNSETOFFLOAD takes its flags by value; the fd is the open TUN device.
    let ret = unsafe {
        libc::ioctl(
            device.as_raw_fd(),
            libc::TUNSETOFFLOAD as _,
            libc::c_ulong::from(OFFLOADS),
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
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
