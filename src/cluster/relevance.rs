//! Which ledger changes an update pass must read. One token carries every cluster (`network_id`)
//! of a network, so a node learns every other cluster's announcements, roles, votes and
//! heartbeats; before this filter each of them ran an update pass that re-read the node's own
//! cluster bucket and the address claims (at 1,000 nodes in 10 clusters, nine changes in ten
//! concerned another cluster, and every node's routine heartbeat ran a pass on every node).
//!
//! A change concerns this node's cluster when it is in its cluster bucket, in the address
//! buckets (`dhcp`, `machines`: addresses are network-wide), a suspicion (see
//! [`super::liveness`]), or is the heartbeat of a node of this cluster that the last view did
//! not count as live (one coming back, or a first beat). The heartbeat of a live node (a
//! renewal, or the answer to a suspicion) changes nothing a pass decides now: the pass that
//! runs at that node's expiry time ([`View::next_expiry_ms`]) reads its latest heartbeat then.

use crate::ledger::{Entry, names};

use super::view::View;

/// True when an update pass must read `entry` (see the module documentation); `network_bucket`
/// is this node's cluster bucket, `uuid` its own uuid.
pub(crate) fn concerns(view: &View, network_bucket: &str, uuid: &str, entry: &Entry) -> bool {
    match entry.bucket.as_str() {
        b if b == network_bucket => true,
        names::DHCP | names::MACHINES | names::SUSPECTS => true,
        names::HEALTHCHECK => {
            entry.key == uuid || view.nodes.get(&entry.key).is_none_or(|n| !n.live)
        }
        _ => false,
    }
}
