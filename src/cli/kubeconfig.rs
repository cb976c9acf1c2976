//! `get-kubeconfig`: the master's kubeconfig from the ledger, pointed at the master.
//!
//! provider-kairos' master stores `/etc/rancher/k3s/k3s.yaml` base64url-encoded (no padding)
//! under `<network_id>/master-kubeconfig` and its address under `<network_id>/ip-master`, both
//! through edgevpn's Go client; newer releases use `control-plane-kubeconfig` and
//! `ip-control-plane`. The reader replaces `127.0.0.1` (where k3s.yaml points) by that address.

use std::fmt;
use std::net::IpAddr;

use crate::ledger::{edgevpn, names};

/// `(kubeconfig key, address key)` pairs, tried in order.
pub const KEYS: [(&str, &str); 2] = [
    (names::KUBECONFIG, names::IP_MASTER),
    ("control-plane-kubeconfig", "ip-control-plane"),
];

/// Why there is no kubeconfig to print.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KubeconfigError {
    /// The ledger holds no kubeconfig yet.
    NotYet,
    /// The kubeconfig is there but not the master's address.
    NoMasterAddress,
    /// The address is not an IP address.
    BadMasterAddress(String),
    /// The stored value is not base64 of UTF-8 text.
    Undecodable(String),
}

impl fmt::Display for KubeconfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KubeconfigError::NotYet => write!(
                f,
                "no kubeconfig in the ledger yet: the cluster has no master, or k3s on the \
                 master has not published it (see `kairos-p2p role list`)"
            ),
            KubeconfigError::NoMasterAddress => {
                write!(
                    f,
                    "the kubeconfig is there but not the master's address (ip-master) yet"
                )
            }
            KubeconfigError::BadMasterAddress(value) => {
                write!(
                    f,
                    "the master's address in the ledger is not an IP address: {value:?}"
                )
            }
            KubeconfigError::Undecodable(why) => {
                write!(f, "the kubeconfig in the ledger cannot be decoded: {why}")
            }
        }
    }
}

impl std::error::Error for KubeconfigError {}

/// The kubeconfig to print, from the texts of the two ledger values ("" when absent).
pub fn kubeconfig(stored: &str, master_address: &str) -> Result<String, KubeconfigError> {
    if stored.trim().is_empty() {
        return Err(KubeconfigError::NotYet);
    }
    let yaml = decode(stored)?;
    let address = master_address.trim();
    if address.is_empty() {
        return Err(KubeconfigError::NoMasterAddress);
    }
    let ip: IpAddr = address
        .parse()
        .map_err(|_| KubeconfigError::BadMasterAddress(address.chars().take(64).collect()))?;
    Ok(point_at(&yaml, ip))
}

/// The YAML a stored kubeconfig encodes.
fn decode(stored: &str) -> Result<String, KubeconfigError> {
    let bytes = edgevpn::decode_base64(stored)
        .map_err(|e| KubeconfigError::Undecodable(format!("not base64 ({e})")))?;
    String::from_utf8(bytes).map_err(|_| KubeconfigError::Undecodable("not UTF-8 text".to_string()))
}

/// `yaml` with every `127.0.0.1` replaced by `ip` (bracketed for IPv6, as URLs want).
fn point_at(yaml: &str, ip: IpAddr) -> String {
    let host = match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    };
    yaml.replace("127.0.0.1", &host)
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};

    const K3S_YAML: &str = "apiVersion: v1\nclusters:\n- cluster:\n    certificate-authority-data: LS0t\n    server: https://127.0.0.1:6443\n  name: default\nkind: Config\n";

    #[test]
    fn kubeconfigs() {
        let kairos = URL_SAFE_NO_PAD.encode(K3S_YAML);
        let padded = STANDARD.encode(K3S_YAML);
        let pointed = K3S_YAML.replace("127.0.0.1", "10.1.0.1");
        let not_utf8 = URL_SAFE_NO_PAD.encode([0xff, 0xfe]);
        let cases: [(&str, &str, Result<String, KubeconfigError>); 9] = [
            (&kairos, "10.1.0.1", Ok(pointed.clone())),
            (&padded, " 10.1.0.1\n", Ok(pointed)),
            (
                &kairos,
                "fd00::1",
                Ok(K3S_YAML.replace("127.0.0.1", "[fd00::1]")),
            ),
            ("", "10.1.0.1", Err(KubeconfigError::NotYet)),
            (" ", "", Err(KubeconfigError::NotYet)),
            (&kairos, "", Err(KubeconfigError::NoMasterAddress)),
            (
                &kairos,
                "master.local",
                Err(KubeconfigError::BadMasterAddress("master.local".into())),
            ),
            (
                "apiVersion: v1",
                "10.1.0.1",
                Err(KubeconfigError::Undecodable(String::new())),
            ),
            (
                &not_utf8,
                "10.1.0.1",
                Err(KubeconfigError::Undecodable("not UTF-8 text".into())),
            ),
        ];
        for (stored, address, expected) in cases {
            let got = kubeconfig(stored, address);
            match (&got, &expected) {
                (Err(KubeconfigError::Undecodable(_)), Err(KubeconfigError::Undecodable(w)))
                    if w.is_empty() => {}
                _ => assert_eq!(got, expected, "{stored:?} {address:?}"),
            }
        }
    }

    #[test]
    fn errors_say_what_is_missing() {
        assert!(
            KubeconfigError::NotYet
                .to_string()
                .contains("no kubeconfig")
        );
        assert!(
            KubeconfigError::NoMasterAddress
                .to_string()
                .contains("ip-master")
        );
    }
}
