//! Facts about this machine that the configuration and the node uuid depend on.

use std::fs;
use std::io;

use crate::config::HostFacts;

/// Where the machine id is read from, in order (the second is the D-Bus copy on older images).
const MACHINE_ID_FILES: [&str; 2] = ["/etc/machine-id", "/var/lib/dbus/machine-id"];
const HOSTNAME_FILE: &str = "/proc/sys/kernel/hostname";

/// Reads the machine id and the hostname of this machine.
pub fn read_host_facts() -> io::Result<HostFacts> {
    let machine_id = MACHINE_ID_FILES
        .iter()
        .find_map(|path| read_trimmed(path).ok().filter(|id| !id.is_empty()))
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                "no machine id in /etc/machine-id or /var/lib/dbus/machine-id",
            )
        })?;
    let hostname = read_trimmed(HOSTNAME_FILE)?;
    Ok(HostFacts {
        machine_id,
        hostname,
    })
}

fn read_trimmed(path: &str) -> io::Result<String> {
    let mut text = fs::read_to_string(path)?;
    text.truncate(text.trim_end().len());
    Ok(text.trim_start().to_string())
}

/// The node uuid Kairos uses as the ledger key prefix: `$UUID` when set and not empty,
/// otherwise `<machine-id>-<hostname>`.
pub fn node_uuid(uuid_env: Option<String>, host: &HostFacts) -> String {
    match uuid_env {
        Some(uuid) if !uuid.trim().is_empty() => uuid.trim().to_string(),
        _ => format!("{}-{}", host.machine_id, host.hostname),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_uuid_follows_kairos() {
        let host = HostFacts {
            machine_id: "0123abcd".into(),
            hostname: "kairos-node".into(),
        };
        let cases: [(Option<&str>, &str); 4] = [
            (None, "0123abcd-kairos-node"),
            (Some(""), "0123abcd-kairos-node"),
            (Some("  "), "0123abcd-kairos-node"),
            (Some("custom-uuid"), "custom-uuid"),
        ];
        for (env, expected) in cases {
            assert_eq!(
                node_uuid(env.map(String::from), &host),
                expected,
                "UUID={env:?}"
            );
        }
    }

    #[test]
    fn this_machine_has_host_facts() {
        let facts = read_host_facts().unwrap();
        assert!(!facts.hostname.is_empty());
        assert!(!facts.machine_id.contains('\n'));
    }
}
