//! The cloud-config loader: YAML, templates, typed values, located errors.
#![no_main]

use std::path::Path;

use kairos_p2p::config::{self, HostFacts};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let host = HostFacts {
        machine_id: "0123456789abcdef".to_string(),
        hostname: "fuzz".to_string(),
    };
    let text = String::from_utf8_lossy(data);
    // Two files, as `--config a --config b`: the input split at its first NUL (if any).
    let (a, b) = text.split_once('\0').unwrap_or((&text, ""));
    let _ = config::parse(&[(Path::new("a.yaml"), a), (Path::new("b.yaml"), b)], &host);
});
