//! libFuzzer target `config`: see `bodies::config` in tests/fuzz/bodies.rs.
#![no_main]

#[path = "../bodies.rs"]
#[allow(dead_code)] // Each target uses one of the shared bodies.
mod bodies;

libfuzzer_sys::fuzz_target!(|data: &[u8]| bodies::config(data));
