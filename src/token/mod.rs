//! The edgevpn/Kairos network token and the key schedule derived from it.
