//! libFuzzer target `token`: see `bodies::token` in tests/fuzz/bodies.rs.
#![no_main]

#[path = "../bodies.rs"]
#[allow(dead_code)] // Each target uses one of the shared bodies.
mod bodies;

libfuzzer_sys::fuzz_target!(|data: &[u8]| bodies::token(data));
