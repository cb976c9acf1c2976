//! Bucket and key names Kairos uses (FACTS §3), so its tools and its users' habits keep working.
//!
//! - Bucket `<network_id>` (default [`DEFAULT_NETWORK_ID`]) with per-node keys `<uuid>-uuid`
//!   (liveness), `<uuid>-role`, `<uuid>-ip` and the cluster keys [`LEADER_AUTO`], [`IP_MASTER`],
//!   [`NODE_TOKEN`], [`KUBECONFIG`].
//! - Network-wide buckets [`MACHINES`], [`HEALTHCHECK`], [`DHCP`], and ours [`SUSPECTS`].

/// `p2p.network_id` when unset: the name of the cluster bucket.
pub const DEFAULT_NETWORK_ID: &str = "kairos";

/// Network-wide bucket: VPN address -> machine (peer, hostname, OS, arch, version).
pub const MACHINES: &str = "machines";
/// Network-wide bucket of health checks.
pub const HEALTHCHECK: &str = "healthcheck";
/// Network-wide bucket of VPN address leases.
pub const DHCP: &str = "dhcp";
/// Network-wide bucket (ours) of the nodes each node suspects dead, under its own uuid (see
/// `cluster::liveness`).
pub const SUSPECTS: &str = "suspects";

/// True for the buckets every cluster of a network shares ([`MACHINES`], [`HEALTHCHECK`],
/// [`DHCP`], [`SUSPECTS`]): never a cluster's own, whatever a `network_id` is called.
#[must_use]
pub fn is_network_wide(bucket: &str) -> bool {
    matches!(bucket, MACHINES | HEALTHCHECK | DHCP | SUSPECTS)
}

/// Key of the automatic leader's choice.
pub const LEADER_AUTO: &str = "leader-auto";
/// Key of the master's address.
pub const IP_MASTER: &str = "ip-master";
/// Key of the k3s node token.
pub const NODE_TOKEN: &str = "token-nodetoken";
/// Key of the master's kubeconfig (base64url of k3s.yaml).
pub const KUBECONFIG: &str = "master-kubeconfig";

/// Suffix of a node's liveness key.
pub const UUID_SUFFIX: &str = "-uuid";
/// Suffix of a node's role key.
pub const ROLE_SUFFIX: &str = "-role";
/// Suffix of a node's address key.
pub const IP_SUFFIX: &str = "-ip";

/// Role: the k3s server of a non-HA cluster.
pub const ROLE_MASTER: &str = "master";
/// Role: the first k3s server of an HA cluster (`--cluster-init`).
pub const ROLE_MASTER_CLUSTERINIT: &str = "master/clusterinit";
/// Role: an additional k3s server of an HA cluster.
pub const ROLE_MASTER_HA: &str = "master/ha";
/// Role: a k3s agent.
pub const ROLE_WORKER: &str = "worker";
/// Every role string, in the order above.
pub const ROLES: [&str; 4] = [
    ROLE_MASTER,
    ROLE_MASTER_CLUSTERINIT,
    ROLE_MASTER_HA,
    ROLE_WORKER,
];

/// The cluster bucket of a network: its `network_id`, or [`DEFAULT_NETWORK_ID`] when empty.
#[must_use]
pub fn network_bucket(network_id: &str) -> &str {
    if network_id.is_empty() {
        DEFAULT_NETWORK_ID
    } else {
        network_id
    }
}

/// `<uuid>-uuid`.
#[must_use]
pub fn uuid_key(uuid: &str) -> String {
    format!("{uuid}{UUID_SUFFIX}")
}

/// `<uuid>-role`.
#[must_use]
pub fn role_key(uuid: &str) -> String {
    format!("{uuid}{ROLE_SUFFIX}")
}

/// `<uuid>-ip`.
#[must_use]
pub fn ip_key(uuid: &str) -> String {
    format!("{uuid}{IP_SUFFIX}")
}

/// Infix of a role request: `<requester uuid>-role-request-<8 hex digits of the target uuid's
/// FNV-32a>` (see `cluster::requests`).
pub const ROLE_REQUEST_INFIX: &str = "-role-request-";

/// The key of `requester`'s request for `target`'s role.
#[must_use]
pub fn role_request_key(requester: &str, target: &str) -> String {
    format!(
        "{requester}{ROLE_REQUEST_INFIX}{:08x}",
        crate::cluster::fnv32a(target)
    )
}

/// Which per-node key a key is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeKey<'a> {
    /// `<uuid>-uuid`.
    Uuid(&'a str),
    /// `<uuid>-role`.
    Role(&'a str),
    /// `<uuid>-ip`.
    Ip(&'a str),
}

/// Splits a per-node key into its kind and uuid; `None` for any other key (or an empty uuid).
#[must_use]
pub fn parse_node_key(key: &str) -> Option<NodeKey<'_>> {
    let split = |suffix: &str| key.strip_suffix(suffix).filter(|u| !u.is_empty());
    split(UUID_SUFFIX)
        .map(NodeKey::Uuid)
        .or_else(|| split(ROLE_SUFFIX).map(NodeKey::Role))
        .or_else(|| split(IP_SUFFIX).map(NodeKey::Ip))
}

/// True for one of the four role strings.
#[must_use]
pub fn is_role(value: &str) -> bool {
    ROLES.contains(&value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_kairos() {
        let uuid = "0123abcd-node1";
        assert_eq!(uuid_key(uuid), "0123abcd-node1-uuid");
        assert_eq!(role_key(uuid), "0123abcd-node1-role");
        assert_eq!(ip_key(uuid), "0123abcd-node1-ip");
        assert_eq!(parse_node_key(&role_key(uuid)), Some(NodeKey::Role(uuid)));
        assert_eq!(parse_node_key(&uuid_key(uuid)), Some(NodeKey::Uuid(uuid)));
        assert_eq!(parse_node_key(&ip_key(uuid)), Some(NodeKey::Ip(uuid)));
        assert_eq!(parse_node_key(LEADER_AUTO), None);
        assert_eq!(parse_node_key("-role"), None);
        assert_eq!(network_bucket(""), "kairos");
        assert_eq!(network_bucket("prod"), "prod");
        assert!(is_role("master/clusterinit") && !is_role("none"));
    }
}
