//! The host's interface addresses: where beacons go and which addresses we announce.

use std::ffi::CStr;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// One address of one interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceAddr {
    /// Interface name (`eth0`).
    pub name: String,
    /// Interface index (for IPv6 scope ids and multicast).
    pub index: u32,
    /// The address.
    pub ip: IpAddr,
    /// The IPv4 broadcast address, when the interface has one.
    pub broadcast: Option<Ipv4Addr>,
}

/// Lists the addresses of interfaces that are up, skipping loopback and the interfaces named in
/// `exclude` (our own TUN device, so the overlay never announces addresses inside itself).
pub fn list(exclude: &[&str]) -> io::Result<Vec<InterfaceAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cursor = head;
    while !cursor.is_null() {
        // SAFETY: `cursor` is a node of the list getifaddrs returned, alive until freeifaddrs.
        let ifa = unsafe { &*cursor };
        cursor = ifa.ifa_next;
        let flags = ifa.ifa_flags;
        if ifa.ifa_addr.is_null()
            || flags & libc::IFF_UP as u32 == 0
            || flags & libc::IFF_LOOPBACK as u32 != 0
        {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated C string owned by the list.
        let name = unsafe { CStr::from_ptr(ifa.ifa_name) }
            .to_string_lossy()
            .into_owned();
        if exclude.contains(&name.as_str()) {
            continue;
        }
        // SAFETY: ifa_name is a valid C string.
        let index = unsafe { libc::if_nametoindex(ifa.ifa_name) };
        // SAFETY: ifa_addr is non-null and points to a sockaddr of its sa_family.
        let Some(ip) = (unsafe { sockaddr_ip(ifa.ifa_addr) }) else {
            continue;
        };
        let broadcast = if flags & libc::IFF_BROADCAST as u32 != 0 && !ifa.ifa_ifu.is_null() {
            // SAFETY: with IFF_BROADCAST, ifa_ifu is the broadcast sockaddr.
            let set = match unsafe { sockaddr_ip(ifa.ifa_ifu) } {
                Some(IpAddr::V4(b)) if !b.is_unspecified() => Some(b),
                _ => None,
            };
            // An address added without `brd` has 0.0.0.0 here: derive it from the netmask.
            let netmask = if ifa.ifa_netmask.is_null() {
                None
            } else {
                // SAFETY: ifa_netmask is non-null and points to a sockaddr.
                unsafe { sockaddr_ip(ifa.ifa_netmask) }
            };
            set.or_else(|| match (ip, netmask) {
                (IpAddr::V4(ip), Some(IpAddr::V4(mask))) => directed_broadcast(ip, mask),
                _ => None,
            })
        } else {
            None
        };
        out.push(InterfaceAddr {
            name,
            index,
            ip,
            broadcast,
        });
    }
    // SAFETY: `head` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// The directed broadcast address of `ip` in the network of `mask` (none for /31 and /32, which
/// have no broadcast address).
fn directed_broadcast(ip: Ipv4Addr, mask: Ipv4Addr) -> Option<Ipv4Addr> {
    let mask = u32::from(mask);
    (mask.leading_ones() <= 30 && mask.count_ones() == mask.leading_ones())
        .then(|| Ipv4Addr::from(u32::from(ip) | !mask))
}

/// Reads the IP of a sockaddr of family AF_INET or AF_INET6.
///
/// # Safety
/// `sa` must point to a valid sockaddr whose real size matches its family.
unsafe fn sockaddr_ip(sa: *const libc::sockaddr) -> Option<IpAddr> {
    // SAFETY: the caller guarantees `sa` is valid.
    match i32::from(unsafe { (*sa).sa_family }) {
        libc::AF_INET => {
            // SAFETY: family AF_INET means a sockaddr_in.
            let sin = unsafe { &*sa.cast::<libc::sockaddr_in>() };
            Some(IpAddr::V4(Ipv4Addr::from(
                sin.sin_addr.s_addr.to_ne_bytes(),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: family AF_INET6 means a sockaddr_in6.
            let sin6 = unsafe { &*sa.cast::<libc::sockaddr_in6>() };
            Some(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_without_loopback_and_honours_exclusions() {
        let all = list(&[]).unwrap();
        assert!(all.iter().all(|a| !a.ip.is_loopback()));
        if let Some(first) = all.first() {
            let name = first.name.clone();
            assert!(
                list(&[name.as_str()])
                    .unwrap()
                    .iter()
                    .all(|a| a.name != name)
            );
        }
    }

    #[test]
    fn directed_broadcast_from_the_netmask() {
        let table = [
            ("10.66.0.3", "255.255.255.0", Some("10.66.0.255")),
            ("192.168.7.9", "255.255.252.0", Some("192.168.7.255")),
            ("10.0.0.1", "255.255.255.252", Some("10.0.0.3")),
            ("10.0.0.1", "255.255.255.254", None),
            ("10.0.0.1", "255.255.255.255", None),
            ("10.0.0.1", "255.0.255.0", None),
        ];
        for (ip, mask, want) in table {
            let got = directed_broadcast(ip.parse().unwrap(), mask.parse().unwrap());
            assert_eq!(got, want.map(|w| w.parse().unwrap()), "{ip}/{mask}");
        }
    }
}
