//! The keys kairos-p2p knows, and "did you mean" suggestions for the ones it does not.

/// Top-level blocks read by kairos-p2p; every other top-level key belongs to the OS and is ignored.
pub(super) const BLOCKS: &[&str] = &["p2p", "kubevip", "k3s", "k3s-agent", "kairos"];
/// Top-level blocks of other Kairos components that look like misspellings of ours.
pub(super) const OTHER_BLOCKS: &[&str] = &["k0s", "k0s-worker"];
/// Keys of `p2p` (`ha` is an alias of `auto.ha`).
pub(super) const P2P: &[&str] = &[
    "network_token",
    "network_id",
    "role",
    "disable_dht",
    "bootstrap_peers",
    "minimum_nodes",
    "dynamic_roles",
    "liveness_timeout",
    "dns",
    "loglevel",
    "vpn",
    "auto",
    "ha",
];
/// Keys of `p2p.vpn`.
pub(super) const VPN: &[&str] = &["create", "use", "env"];
/// Keys of `p2p.auto`.
pub(super) const AUTO: &[&str] = &["enable", "merge_window", "ha"];
/// Keys of `p2p.auto.ha` and `p2p.ha`.
pub(super) const HA: &[&str] = &["enable", "master_nodes", "external_db"];
/// Keys of `kubevip`.
pub(super) const KUBEVIP: &[&str] = &[
    "eip",
    "enable",
    "interface",
    "manifest_url",
    "static_pod",
    "version",
    "image",
];
/// Keys of `k3s` and `k3s-agent`.
pub(super) const K3S: &[&str] = &[
    "enabled",
    "args",
    "env",
    "replace_args",
    "replace_env",
    "embedded_registry",
];
/// Keys of the legacy `kairos` block that kairos-p2p reads.
pub(super) const KAIROS: &[&str] = &["network_token"];
/// Keys of the legacy `kairos` block that older Kairos versions read and kairos-p2p does not.
pub(super) const KAIROS_LEGACY: &[&str] = &["network_id", "role", "dns", "loglevel", "hybrid"];
/// The edgevpn environment variables of `p2p.vpn.env` that kairos-p2p uses.
pub(super) const VPN_ENV: &[&str] = &[
    "ADDRESS",
    "IFACE",
    "DHCP",
    "EDGEVPNMTU",
    "EDGEVPNDHT",
    "EDGEVPNMDNS",
    "EDGEVPNBOOTSTRAPPEERS",
    "APILISTEN",
    "DNSADDRESS",
    "DNSFORWARD",
    "DNSFORWARDSERVER",
    "DNSCACHESIZE",
];

/// The message for an unknown key: with the closest known key when it is close enough.
pub(super) fn unknown_key(key: &str, known: &[&str]) -> String {
    match suggest(key, known) {
        Some(s) => format!("unknown key, did you mean {s}?"),
        None => format!("unknown key (known keys: {})", known.join(", ")),
    }
}

/// The known word closest to `word` (ignoring case), if within a third of its length (at least
/// one edit).
pub(super) fn suggest<'a>(word: &str, known: &[&'a str]) -> Option<&'a str> {
    let word: Vec<char> = word.chars().flat_map(char::to_lowercase).collect();
    known
        .iter()
        .filter_map(|k| {
            let k_chars: Vec<char> = k.chars().flat_map(char::to_lowercase).collect();
            let limit = (k_chars.len() / 3).max(1);
            let d = distance(&word, &k_chars, limit)?;
            Some((d, *k))
        })
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

/// Optimal string alignment distance (insertions, deletions, substitutions and transpositions
/// of adjacent characters each cost 1), or `None` when it is larger than `limit`.
fn distance(a: &[char], b: &[char], limit: usize) -> Option<usize> {
    if a.len().abs_diff(b.len()) > limit {
        return None;
    }
    // Three rolling rows of the (a.len()+1) x (b.len()+1) table.
    let mut before: Vec<usize> = vec![0; b.len() + 1];
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur: Vec<usize> = vec![0; b.len() + 1];
    for (i, &ca) in a.iter().enumerate() {
        cur[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let mut d = (prev[j + 1] + 1)
                .min(cur[j] + 1)
                .min(prev[j] + usize::from(ca != cb));
            if i > 0 && j > 0 && a[i - 1] == cb && ca == b[j - 1] {
                d = d.min(before[j - 1] + 1);
            }
            cur[j + 1] = d;
        }
        std::mem::swap(&mut before, &mut prev);
        std::mem::swap(&mut prev, &mut cur);
    }
    let d = prev[b.len()];
    (d <= limit).then_some(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(a: &str, b: &str) -> Option<usize> {
        let a: Vec<char> = a.chars().collect();
        let b: Vec<char> = b.chars().collect();
        distance(&a, &b, 5)
    }

    #[test]
    fn distances() {
        assert_eq!(d("netwrok_id", "network_id"), Some(1));
        assert_eq!(d("master_node", "master_nodes"), Some(1));
        assert_eq!(d("ab", "ba"), Some(1));
        assert_eq!(d("", "abc"), Some(3));
        assert_eq!(d("abc", "abc"), Some(0));
        assert_eq!(d("kitten", "sitting"), Some(3));
        assert_eq!(d("abcdef", "badcfe"), Some(3));
        assert_eq!(d("abcdefgh", "ab"), None);
        assert_eq!(d("zzzzzz", "aaaaaa"), None);
    }

    #[test]
    fn suggestions() {
        assert_eq!(suggest("master_node", HA), Some("master_nodes"));
        assert_eq!(suggest("netwrok_id", P2P), Some("network_id"));
        assert_eq!(suggest("Network_ID", P2P), Some("network_id"));
        assert_eq!(suggest("edgevpnmtu", VPN_ENV), Some("EDGEVPNMTU"));
        assert_eq!(suggest("k3s_agent", BLOCKS), Some("k3s-agent"));
        assert_eq!(suggest("banana", P2P), None);
        assert_eq!(suggest("xyz", P2P), None);
    }

    #[test]
    fn unknown_key_messages() {
        assert_eq!(
            unknown_key("master_node", HA),
            "unknown key, did you mean master_nodes?"
        );
        assert_eq!(
            unknown_key("zzz", VPN),
            "unknown key (known keys: create, use, env)"
        );
    }
}
