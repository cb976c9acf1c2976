//! Peer discovery: how a node finds the other members of its network.
//!
//! - [`lan`]: sealed UDP broadcast/multicast beacons on the local link; nodes on one LAN find each
//!   other in about a second, and with `p2p.disable_dht: true` this is all there is. The beacon
//!   format is in [`beacon`].
//! - [`kad`]: a Kademlia-lite DHT with sealed rendezvous records, for members beyond the LAN.
//!
//! Both are sans-IO state machines: time and randomness come in from the caller, datagrams go
//! out through `poll_transmit`, and what they learn comes out of `poll_event`.

pub mod beacon;
pub mod kad;
pub mod lan;
