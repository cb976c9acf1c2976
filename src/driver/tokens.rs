//! Every mio token of the event loop in one place, so no two sources can share one (the API's
//! Kairos socket and the DNS listener once both took 18, and DNS queries went to the API).

use mio::Token;

/// The overlay's UDP socket.
pub const OVERLAY: Token = Token(0);
/// LAN beacons over IPv4 broadcast.
pub const BEACON_V4: Token = Token(1);
/// LAN beacons over IPv6 multicast.
pub const BEACON_V6: Token = Token(2);
/// SIGINT/SIGTERM.
pub const SIGNAL: Token = Token(3);
/// The TUN device.
pub const TUN: Token = Token(4);
/// The k3s worker thread's waker (see `crate::k3s`).
pub const K3S: Token = Token(15);
/// The API's TCP listener.
pub const API_TCP: Token = Token(16);
/// The API's socket in the state directory.
pub const API_STATE_SOCKET: Token = Token(17);
/// The API's Kairos socket (`/run/edgevpn-kairos.sock`).
pub const API_KAIROS_SOCKET: Token = Token(18);
/// The DNS service's listener.
pub const DNS_LISTENER: Token = Token(19);
/// The DNS service's socket towards the forward servers.
pub const DNS_UPSTREAM: Token = Token(20);
/// API connection `i` has token `API_FIRST_CONNECTION + i`: above every fixed token.
pub const API_FIRST_CONNECTION: usize = 32;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_tokens_are_distinct_and_below_the_connections() {
        let fixed = [
            OVERLAY,
            BEACON_V4,
            BEACON_V6,
            SIGNAL,
            TUN,
            K3S,
            API_TCP,
            API_STATE_SOCKET,
            API_KAIROS_SOCKET,
            DNS_LISTENER,
            DNS_UPSTREAM,
        ];
        let distinct: std::collections::BTreeSet<usize> = fixed.iter().map(|t| t.0).collect();
        assert_eq!(distinct.len(), fixed.len());
        assert!(distinct.iter().all(|t| *t < API_FIRST_CONNECTION));
    }
}
