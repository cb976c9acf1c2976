//! kairos-p2p: zero-touch k3s clusters over an encrypted peer-to-peer overlay.
//!
//! The library holds every module; `src/main.rs` is only the command-line front end.

pub mod api;
pub mod chunks;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod console;
pub mod discovery;
pub mod dns;
pub mod download;
pub mod driver;
pub mod host;
pub mod identity;
pub mod k3s;
pub mod ledger;
pub mod logging;
pub mod node;
pub mod overlay;
pub mod rng;
pub mod sim;
pub mod token;
pub mod vpn;
pub mod wire;
