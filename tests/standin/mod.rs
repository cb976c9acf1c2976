//! Reading what the k3s stand-in (`tests/k3s-standin`) was asked to do: its JSON-lines log at
//! `<root>/var/log/k3s-standin.log` (one object per event, every field on every line; the
//! fields are described at the top of the script), and stopping stray stand-in processes by pid.

#![allow(dead_code)] // Each test binary uses part of it.

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::Value;

/// The stand-in, as `KAIROS_P2P_K3S` for the agents.
pub const STANDIN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/k3s-standin");

/// The stand-in's log under a node's root.
pub fn log_path(root: &Path) -> PathBuf {
    root.join("var/log/k3s-standin.log")
}

/// The node token a server wrote under `root`, if any.
pub fn node_token(root: &Path) -> Option<String> {
    fs::read_to_string(root.join("var/lib/rancher/k3s/server/node-token"))
        .ok()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
}

/// The kubeconfig a server wrote under `root`, if any.
pub fn kubeconfig(root: &Path) -> Option<String> {
    fs::read_to_string(root.join("etc/rancher/k3s/k3s.yaml")).ok()
}

/// The secret part of a k3s token (`K10<ca hash>::<user>:<secret>`), or the token itself.
pub fn secret_of(token: &str) -> &str {
    match token.strip_prefix("K10").and_then(|t| t.split_once("::")) {
        Some((_, rest)) => rest.rsplit(':').next().unwrap_or(rest),
        None => token,
    }
}

/// One line of the stand-in's log.
#[derive(Debug, Clone)]
pub struct Record(pub Value);

impl Record {
    fn text(&self, key: &str) -> &str {
        self.0.get(key).and_then(Value::as_str).unwrap_or("")
    }

    /// `server`, `agent`, `version` or `unknown`.
    pub fn mode(&self) -> &str {
        self.text("mode")
    }

    /// `start`, `ready`, `error`, `stop` or `version`.
    pub fn event(&self) -> &str {
        self.text("event")
    }

    pub fn outcome(&self) -> &str {
        self.text("outcome")
    }

    /// A server's start kind on its `ready` line: `cluster-init`, `new`, `join` or `restart`.
    pub fn init(&self) -> Option<&str> {
        self.0.get("init").and_then(Value::as_str)
    }

    pub fn pid(&self) -> u32 {
        self.0
            .get("pid")
            .and_then(Value::as_u64)
            .and_then(|p| u32::try_from(p).ok())
            .unwrap_or(0)
    }

    /// The error message of an `error` line.
    pub fn message(&self) -> &str {
        self.text("message")
    }

    pub fn argv(&self) -> Vec<String> {
        self.0
            .get("argv")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// A `K3S_*` variable the process was started with.
    pub fn env(&self, name: &str) -> Option<&str> {
        self.0.get("env")?.get(name)?.as_str()
    }

    /// Whether flag `--name` was given (switch or value).
    pub fn has_flag(&self, name: &str) -> bool {
        self.0.get("flags").and_then(|f| f.get(name)).is_some()
    }

    /// Every value of flag `--name` (repeatable flags and comma lists give several).
    pub fn flag_values(&self, name: &str) -> Vec<String> {
        match self.0.get("flags").and_then(|f| f.get(name)) {
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect(),
            Some(Value::Bool(true)) => vec![String::new()],
            _ => Vec::new(),
        }
    }

    /// The single value of flag `--name`.
    pub fn flag(&self, name: &str) -> Option<String> {
        self.flag_values(name).pop()
    }

    /// The server URL: `--server`, else `K3S_URL`.
    pub fn server_url(&self) -> Option<String> {
        self.flag("server")
            .or_else(|| self.env("K3S_URL").map(str::to_string))
            .filter(|u| !u.is_empty())
    }

    /// The token: `--token`, else `K3S_TOKEN`.
    pub fn token(&self) -> Option<String> {
        self.flag("token")
            .or_else(|| self.env("K3S_TOKEN").map(str::to_string))
            .filter(|t| !t.is_empty())
    }

    /// Whether this line is a server that created a new cluster (`cluster-init` or `new`).
    pub fn created_cluster(&self) -> bool {
        self.mode() == "server"
            && self.event() == "ready"
            && matches!(self.init(), Some("cluster-init" | "new"))
    }
}

/// Every line of the stand-in log under `root` (none when it does not exist yet).
pub fn read_log(root: &Path) -> Vec<Record> {
    fs::read_to_string(log_path(root))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .map(Record)
        .collect()
}

/// A short, readable account of a stand-in log, for failure messages.
pub fn describe(records: &[Record]) -> String {
    records
        .iter()
        .map(|r| {
            let args: Vec<String> = r.argv().into_iter().skip(1).collect();
            let mut line = format!(
                "  pid {} {} {} {} [{}]",
                r.pid(),
                r.mode(),
                r.event(),
                r.outcome(),
                args.join(" ")
            );
            for var in ["K3S_URL", "K3S_TOKEN"] {
                if let Some(v) = r.env(var) {
                    line.push_str(&format!(" {var}={v}"));
                }
            }
            if !r.message().is_empty() {
                line.push_str(&format!(" message: {}", r.message()));
            }
            line
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Whether `pid` is a stand-in process started under `root` (checked in /proc, so a recycled
/// pid is never taken for one).
pub fn is_standin_under(pid: u32, root: &Path) -> bool {
    let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let Ok(environ) = fs::read(format!("/proc/{pid}/environ")) else {
        return false;
    };
    let wanted = format!("KAIROS_P2P_ROOT={}", root.display());
    String::from_utf8_lossy(&cmdline).contains("k3s-standin")
        && environ.split(|b| *b == 0).any(|v| v == wanted.as_bytes())
}

/// Pids of stand-in processes under `root` that are still running.
pub fn running(root: &Path) -> Vec<u32> {
    let mut pids: Vec<u32> = read_log(root).iter().map(Record::pid).collect();
    pids.sort_unstable();
    pids.dedup();
    pids.retain(|&p| p != 0 && is_standin_under(p, root));
    pids
}

/// Kills (SIGKILL) every stand-in process still running under `root`, by pid.
pub fn kill_all(root: &Path) {
    for pid in running(root) {
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
    }
}
