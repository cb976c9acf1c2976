//! The network token decoder (cloud-config values, `--network-token`, `$EDGEVPNTOKEN`).
#![no_main]

use kairos_p2p::token::NetworkToken;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = NetworkToken::decode(&String::from_utf8_lossy(data));
});
