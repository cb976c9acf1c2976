//! UDP sockets with the options the overlay needs, made non-blocking for mio.

use std::io;
use std::mem;
use std::net::{SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};

use crate::chunks::ChunkPool;

/// Receive and send buffer size asked for (the kernel doubles it for its bookkeeping).
const SOCKET_BUFFER: libc::c_int = 4 << 20;
/// Most segments one UDP GSO send may carry (the kernel's `UDP_MAX_SEGMENTS`).
pub const MAX_GSO_SEGMENTS: usize = 64;

/// How a socket is set up before `bind`.
#[derive(Debug, Clone, Copy, Default)]
pub struct SocketOptions {
    /// `SO_REUSEADDR` + `SO_REUSEPORT`: several agents on one host share the beacon port.
    pub reuse: bool,
    /// `SO_BROADCAST`: the socket may send to broadcast addresses.
    pub broadcast: bool,
}

/// Creates, configures and binds a non-blocking UDP socket.
pub fn bind_udp(addr: SocketAddr, options: SocketOptions) -> io::Result<UdpSocket> {
    let family = match addr {
        SocketAddr::V4(_) => libc::AF_INET,
        SocketAddr::V6(_) => libc::AF_INET6,
    };
    // SAFETY: plain socket(2) call; the result is checked and owned right away.
    let fd = cvt(unsafe {
        libc::socket(
            family,
            libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    })?;
    // SAFETY: `fd` is a fresh socket that nothing else owns.
    let socket = unsafe { UdpSocket::from_raw_fd(fd) };
    let raw = socket.as_raw_fd();
    if options.reuse {
        set_int(raw, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
        set_int(raw, libc::SOL_SOCKET, libc::SO_REUSEPORT, 1)?;
    }
    if options.broadcast {
        set_int(raw, libc::SOL_SOCKET, libc::SO_BROADCAST, 1)?;
    }
    if family == libc::AF_INET6 {
        // Dual-stack sockets would make the v4/v6 beacon pair collide on one port.
        set_int(raw, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 1)?;
    }
    // Large buffers absorb bursts of VPN traffic between two loop turns: past the system's
    // rmem_max/wmem_max when we may (root), else up to them.
    for (forced, opt) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        if set_int(raw, libc::SOL_SOCKET, forced, SOCKET_BUFFER).is_err() {
            let _ = set_int(raw, libc::SOL_SOCKET, opt, SOCKET_BUFFER);
        }
    }
    let (storage, len) = sockaddr(&addr);
    // SAFETY: `storage` holds a valid sockaddr of `len` bytes for this family.
    cvt(unsafe { libc::bind(raw, (&raw const storage).cast(), len) })?;
    Ok(socket)
}

/// Sends `payload` to `to` as datagrams of `segment` bytes each (the last may be shorter) in one
/// system call, with UDP generic segmentation offload (`UDP_SEGMENT`, Linux 4.18+).
pub fn send_segments(
    socket: &impl AsRawFd,
    payload: &[u8],
    segment: u16,
    to: SocketAddr,
) -> io::Result<usize> {
    send_with_cmsg(
        socket,
        payload,
        to,
        libc::SOL_UDP,
        libc::UDP_SEGMENT,
        segment,
    )
}

/// Sends one IPv4 datagram out of interface `ifindex` (`IP_PKTINFO`), whatever the routing
/// table says: how the limited broadcast `255.255.255.255` reaches every interface's link.
pub fn send_on_interface(
    socket: &impl AsRawFd,
    payload: &[u8],
    to: SocketAddrV4,
    ifindex: u32,
) -> io::Result<usize> {
    let info = libc::in_pktinfo {
        ipi_ifindex: ifindex as libc::c_int,
        ipi_spec_dst: libc::in_addr { s_addr: 0 },
        ipi_addr: libc::in_addr { s_addr: 0 },
    };
    let to = SocketAddr::V4(to);
    send_with_cmsg(
        socket,
        payload,
        to,
        libc::IPPROTO_IP,
        libc::IP_PKTINFO,
        info,
    )
}

/// One `sendmsg` of `payload` to `to` with one control message (`level`, `kind`, `data`).
fn send_with_cmsg<T: Copy>(
    socket: &impl AsRawFd,
    payload: &[u8],
    to: SocketAddr,
    level: libc::c_int,
    kind: libc::c_int,
    data: T,
) -> io::Result<usize> {
    let (mut addr, addr_len) = sockaddr(&to);
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr().cast_mut().cast(),
        iov_len: payload.len(),
    };
    // u64 words keep the control buffer aligned for cmsghdr; 64 bytes hold any one used here.
    let mut control = [0u64; 8];
    // SAFETY: CMSG_SPACE only computes a length.
    let space = unsafe { libc::CMSG_SPACE(mem::size_of::<T>() as u32) } as usize;
    if space > mem::size_of_val(&control) {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    // SAFETY: an all-zero msghdr is valid; every pointer set below outlives the sendmsg call,
    // and the control buffer was checked above to be large enough for one cmsg carrying a T.
    unsafe {
        let mut msg: libc::msghdr = mem::zeroed();
        msg.msg_name = (&raw mut addr).cast();
        msg.msg_namelen = addr_len;
        msg.msg_iov = &raw mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        let cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
        (*cmsg).cmsg_level = level;
        (*cmsg).cmsg_type = kind;
        (*cmsg).cmsg_len = libc::CMSG_LEN(mem::size_of::<T>() as u32) as _;
        libc::CMSG_DATA(cmsg).cast::<T>().write_unaligned(data);
        let sent = libc::sendmsg(socket.as_raw_fd(), &raw const msg, 0);
        if sent < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(sent as usize)
        }
    }
}

/// Turns on UDP generic receive offload (`UDP_GRO`, Linux 5.0+): one read may return several
/// datagrams of one sender, of equal size but the last (see [`recv_segments`]). False when the
/// kernel refuses it.
pub fn enable_gro(socket: &impl AsRawFd) -> bool {
    set_int(socket.as_raw_fd(), libc::SOL_UDP, libc::UDP_GRO, 1).is_ok()
}

/// One datagram, or with GRO a run of datagrams from one sender, read into `buf`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    /// Bytes read.
    pub len: usize,
    /// The sender.
    pub from: SocketAddr,
    /// With several datagrams: the size of each (the last may be shorter).
    pub segment_size: Option<usize>,
}

/// Reads one datagram or GRO run (see [`enable_gro`]) without blocking.
pub fn recv_segments(socket: &impl AsRawFd, buf: &mut [u8]) -> io::Result<Received> {
    // SAFETY: `buf` is writable for its whole length.
    unsafe { recv_raw(socket, buf.as_mut_ptr(), buf.len()) }
}

/// [`recv_segments`] appended to `pool`'s buffer (with at least `room` bytes of spare capacity;
/// see [`ChunkPool::room`]): split what was read off [`ChunkPool::current`].
pub fn recv_segments_into(
    socket: &impl AsRawFd,
    pool: &mut ChunkPool,
    room: usize,
) -> io::Result<Received> {
    let buf = pool.room(room);
    let spare = buf.spare_capacity_mut();
    // SAFETY: the spare capacity is writable for its length; recvmsg writes only bytes.
    let received = unsafe { recv_raw(socket, spare.as_mut_ptr().cast(), spare.len())? };
    // SAFETY: the kernel initialised the first `received.len` bytes of the spare capacity.
    unsafe { buf.set_len(buf.len() + received.len) };
    Ok(received)
}

/// Reads one datagram or GRO run into `len` bytes at `data`.
///
/// # Safety
/// `data` must be valid for writes of `len` bytes.
unsafe fn recv_raw(socket: &impl AsRawFd, data: *mut u8, len: usize) -> io::Result<Received> {
    // SAFETY: an all-zero sockaddr_storage is a valid value.
    let mut addr: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let mut iov = libc::iovec {
        iov_base: data.cast(),
        iov_len: len,
    };
    let mut control = [0u64; 8];
    // SAFETY: every pointer in `msg` points to a live buffer of the length given; the kernel
    // writes at most those lengths; cmsgs are walked with the libc macros within msg_controllen.
    unsafe {
        let mut msg: libc::msghdr = mem::zeroed();
        msg.msg_name = (&raw mut addr).cast();
        msg.msg_namelen = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        msg.msg_iov = &raw mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = mem::size_of_val(&control) as _;
        let n = libc::recvmsg(socket.as_raw_fd(), &raw mut msg, 0);
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut segment_size = None;
        let mut cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_UDP && (*cmsg).cmsg_type == libc::UDP_GRO {
                let size = libc::CMSG_DATA(cmsg).cast::<libc::c_int>().read_unaligned();
                segment_size = usize::try_from(size).ok().filter(|s| *s > 0);
            }
            cmsg = libc::CMSG_NXTHDR(&raw const msg, cmsg);
        }
        let from = socket_addr(&addr)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "unknown address family"))?;
        Ok(Received {
            len: n as usize,
            from,
            segment_size,
        })
    }
}

/// Whether a UDP GSO send failed because the kernel or the device cannot segment (old
/// kernels: `EINVAL`/`ENOPROTOOPT`; devices without checksum offload: `EIO`), rather than for
/// the network's sake (no route, a firewall, a full buffer): only then is GSO given up.
pub fn gso_unsupported(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EINVAL | libc::EIO | libc::ENOPROTOOPT | libc::EOPNOTSUPP)
    )
}

/// Whether a receive error is one the kernel queued for an ICMP message about an earlier send
/// (port or host unreachable, packet too big): reported once, the socket is fine.
pub fn peer_reported(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(
            libc::ECONNREFUSED
                | libc::EHOSTUNREACH
                | libc::ENETUNREACH
                | libc::EHOSTDOWN
                | libc::ENETDOWN
                | libc::EMSGSIZE
                | libc::EPROTO
        )
    )
}

/// The socket address in `storage` (IPv4 or IPv6).
fn socket_addr(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match libc::c_int::from(storage.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in, which it is aligned for.
            let sin =
                unsafe { &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            let ip = std::net::Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes());
            Some(SocketAddr::from((ip, u16::from_be(sin.sin_port))))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6, which it is aligned for.
            let sin6 = unsafe {
                &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
            };
            Some(SocketAddr::V6(std::net::SocketAddrV6::new(
                std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

fn set_int(fd: RawFd, level: libc::c_int, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: `value` lives across the call and its size is passed.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&raw const value).cast(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(drop)
}

fn sockaddr(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: an all-zero sockaddr_storage is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { (&raw mut storage).cast::<libc::sockaddr_in>().write(sin) };
            mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { (&raw mut storage).cast::<libc::sockaddr_in6>().write(sin6) };
            mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_reuse_sockets_share_a_port_and_exchange_datagrams() {
        let opts = SocketOptions {
            reuse: true,
            broadcast: true,
        };
        let a = bind_udp("127.0.0.1:0".parse().unwrap(), opts).unwrap();
        let port = a.local_addr().unwrap().port();
        let b = bind_udp(SocketAddr::from(([127, 0, 0, 1], port)), opts).unwrap();
        let c = bind_udp("127.0.0.1:0".parse().unwrap(), SocketOptions::default()).unwrap();
        c.send_to(b"hi", a.local_addr().unwrap()).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let mut buf = [0u8; 8];
        let got = [&a, &b]
            .iter()
            .filter_map(|s| s.recv_from(&mut buf).ok())
            .count();
        assert_eq!(
            got, 1,
            "a unicast datagram reaches exactly one of the sharing sockets"
        );
    }

    #[test]
    fn gso_batches_arrive_as_datagrams_or_gro_runs() {
        let rx = bind_udp("127.0.0.1:0".parse().unwrap(), SocketOptions::default()).unwrap();
        let tx = bind_udp("127.0.0.1:0".parse().unwrap(), SocketOptions::default()).unwrap();
        let gro = enable_gro(&rx);
        let payload: Vec<u8> = (0..2500u32).map(|i| i as u8).collect();
        match send_segments(&tx, &payload, 1000, rx.local_addr().unwrap()) {
            Ok(n) => assert_eq!(n, payload.len()),
            // Kernels without UDP GSO: the driver falls back to single sends.
            Err(e) => return eprintln!("no UDP GSO here: {e}"),
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
        let mut buf = vec![0u8; 65_536];
        let mut got = Vec::new();
        while got.len() < payload.len() {
            let r = recv_segments(&rx, &mut buf).unwrap();
            assert_eq!(r.from, tx.local_addr().unwrap());
            if let Some(size) = r.segment_size {
                assert!(gro, "runs only with GRO on");
                assert_eq!(size, 1000);
            } else {
                assert!(r.len <= 1000);
            }
            got.extend_from_slice(&buf[..r.len]);
        }
        assert_eq!(got, payload);
    }

    #[test]
    fn datagrams_are_received_into_the_spare_room_of_a_shared_buffer() {
        let rx = bind_udp("127.0.0.1:0".parse().unwrap(), SocketOptions::default()).unwrap();
        let tx = bind_udp("127.0.0.1:0".parse().unwrap(), SocketOptions::default()).unwrap();
        for payload in [&b"first"[..], b"second", b"third"] {
            tx.send_to(payload, rx.local_addr().unwrap()).unwrap();
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
        let mut pool = ChunkPool::new(2048, 2);
        let first = recv_segments_into(&rx, &mut pool, 1000).unwrap();
        assert_eq!((first.len, &pool.current()[..]), (5, &b"first"[..]));
        assert!(
            pool.current().capacity() >= 2048,
            "a new buffer when there was no room"
        );
        let taken = pool.current().split().freeze();
        // The next datagram lands in the same allocation, after the first.
        recv_segments_into(&rx, &mut pool, 1000).unwrap();
        assert_eq!(&pool.current()[..], b"second");
        assert_eq!(pool.current().as_ptr(), taken.as_ptr().wrapping_add(5));
        pool.current().clear();
        // Less room left than asked for: another buffer, the taken packet untouched.
        recv_segments_into(&rx, &mut pool, 4000).unwrap();
        assert_eq!(&pool.current()[..], b"third");
        assert_eq!(&taken[..], b"first");
        let err = recv_segments_into(&rx, &mut pool, 1000).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn network_errors_do_not_turn_gso_off() {
        for unsupported in [libc::EINVAL, libc::EIO, libc::ENOPROTOOPT] {
            assert!(gso_unsupported(&io::Error::from_raw_os_error(unsupported)));
        }
        for network in [libc::EPERM, libc::ENETUNREACH, libc::ENOBUFS, libc::EAGAIN] {
            assert!(!gso_unsupported(&io::Error::from_raw_os_error(network)));
        }
    }

    #[test]
    fn icmp_errors_are_told_from_socket_failures() {
        for reported in [libc::ECONNREFUSED, libc::EHOSTUNREACH, libc::EMSGSIZE] {
            assert!(peer_reported(&io::Error::from_raw_os_error(reported)));
        }
        for failure in [libc::ENOMEM, libc::ENOBUFS, libc::EBADF] {
            assert!(!peer_reported(&io::Error::from_raw_os_error(failure)));
        }
    }

    #[test]
    fn an_icmp_error_is_read_once_and_the_socket_goes_on() {
        let socket = bind_udp("127.0.0.1:0".parse().unwrap(), SocketOptions::default()).unwrap();
        let closed = bind_udp("127.0.0.1:0".parse().unwrap(), SocketOptions::default()).unwrap();
        let to = closed.local_addr().unwrap();
        drop(closed);
        // Connected-less sockets get ICMP errors on Linux only with IP_RECVERR; a connected
        // one gets port unreachable as ECONNREFUSED on its next receive.
        socket.connect(to).unwrap();
        socket.send(b"anyone?").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let mut buf = [0u8; 16];
        let first = recv_segments(&socket, &mut buf).unwrap_err();
        assert!(peer_reported(&first), "{first}");
        let second = recv_segments(&socket, &mut buf).unwrap_err();
        assert_eq!(second.kind(), io::ErrorKind::WouldBlock, "reported once");
    }

    #[test]
    fn a_taken_port_without_reuse_is_an_error() {
        let a = bind_udp("127.0.0.1:0".parse().unwrap(), SocketOptions::default()).unwrap();
        let err = bind_udp(a.local_addr().unwrap(), SocketOptions::default()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
    }
}
