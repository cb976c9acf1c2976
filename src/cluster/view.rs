//! What a node knows of its cluster (one `network_id`), read from the ledger: who the nodes are,
//! which are alive, which role each holds and who leads.
//!
//! Each node announces itself under `<network_id>/<uuid>-uuid` (its asked-for role and hostname;
//! the entry's writer is its peer id) and beats under `healthcheck/<uuid>`. A node is *live* when
//! the time it was last known alive ([`super::liveness`]: its heartbeat, renewed rarely, unless
//! a suspicion it did not answer says otherwise) is less than the liveness timeout older than
//! this node's hybrid-logical time (the highest of its wall clock and every version it has
//! seen). Versions and suspicion times are stamped by their writers, so the age needs no clock
//! synchronisation beyond what the HLC already gives, and an entry learned late through
//! anti-entropy still shows its true age.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::config::Role;
use crate::identity::PeerId;
use crate::ledger::{Ledger, edgevpn, names};

use super::fnv32a;
use super::liveness::{self, Liveness, Suspicions};

/// Key suffix of a node's announcement.
pub const UUID_SUFFIX: &str = names::UUID_SUFFIX;

/// The value of `<network_id>/<uuid>-uuid`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announcement {
    /// The role the node asks for (`auto`, `master`, `worker`, `none`).
    #[serde(rename = "Role")]
    pub role: String,
    /// Its hostname.
    #[serde(rename = "Hostname")]
    pub hostname: String,
}

impl Announcement {
    /// The announcement of a node asking for `role`.
    pub fn new(role: Role, hostname: &str) -> Self {
        Self {
            role: role.as_str().to_string(),
            hostname: hostname.to_string(),
        }
    }

    /// The asked-for role; unknown words read as `auto`.
    pub fn asked(&self) -> Role {
        match self.role.as_str() {
            "master" => Role::Master,
            "worker" => Role::Worker,
            "none" => Role::None,
            _ => Role::Auto,
        }
    }

    /// The JSON value.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// A role value, also as Kairos' tools store it (`kairosctl role set`, through the API);
/// `None` when it is not one of the four roles.
fn parse_role(value: &[u8]) -> Option<String> {
    let role = edgevpn::text(&String::from_utf8_lossy(value));
    names::is_role(&role).then_some(role)
}

/// The role `<uuid>-role` holds in `bucket`, whether or not the node is announced.
pub fn role_of(ledger: &Ledger, bucket: &str, uuid: &str) -> Option<String> {
    ledger
        .get(bucket, &names::role_key(uuid))
        .and_then(parse_role)
}

/// One node of the cluster as seen from here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    /// Its peer id (the writer of its announcement).
    pub peer: PeerId,
    /// The role it asks for.
    pub asked: Role,
    /// Its hostname.
    pub hostname: String,
    /// Known alive within the liveness timeout.
    pub live: bool,
    /// How long ago it was last known alive, in milliseconds (0 while it is; `None`: never
    /// heard).
    pub silent_ms: Option<u64>,
    /// Its role in the ledger (`<uuid>-role`), if any.
    pub role: Option<String>,
    /// FNV-32a of its uuid (the leader is the live node with the highest).
    pub rank: u32,
}

impl NodeView {
    /// Takes part in elections and counts towards `minimum_nodes` (`p2p.role: none` does not).
    pub fn eligible(&self) -> bool {
        self.asked != Role::None
    }
}

/// The cluster of one `network_id` as seen from one node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct View {
    /// Nodes by uuid.
    pub nodes: BTreeMap<String, NodeView>,
    /// The leader: the live eligible node with the highest rank (then uuid).
    pub leader: Option<String>,
}

impl View {
    /// Reads the view of `network_id` from `ledger` at hybrid-logical time `hlc_now_ms`.
    pub fn read(ledger: &Ledger, network_id: &str, hlc_now_ms: u64, liveness: &Liveness) -> View {
        let timeout_ms = liveness.timeout_ms;
        let suspicions = Suspicions::read(ledger);
        let bucket = names::network_bucket(network_id);
        let mut nodes = BTreeMap::new();
        let mut roles: BTreeMap<String, String> = BTreeMap::new();
        for (key, value) in ledger.bucket(bucket) {
            if let Some(uuid) = key.strip_suffix(names::ROLE_SUFFIX) {
                if let Some(role) = parse_role(value) {
                    roles.insert(uuid.to_string(), role);
                }
                continue;
            }
            let Some(uuid) = key.strip_suffix(UUID_SUFFIX) else {
                continue;
            };
            let Some(entry) = ledger.entry(bucket, key) else {
                continue;
            };
            let Ok(ann) = serde_json::from_slice::<Announcement>(value) else {
                continue;
            };
            let age = liveness::heard_ms(ledger, &suspicions, liveness, uuid)
                .map(|heard| hlc_now_ms.saturating_sub(heard));
            nodes.insert(
                uuid.to_string(),
                NodeView {
                    peer: entry.writer,
                    asked: ann.asked(),
                    hostname: ann.hostname,
                    live: age.is_some_and(|a| a < timeout_ms),
                    silent_ms: age,
                    role: None,
                    rank: fnv32a(uuid),
                },
            );
        }
        for (uuid, role) in roles {
            if let Some(n) = nodes.get_mut(&uuid) {
                n.role = Some(role);
            }
        }
        let leader = nodes
            .iter()
            .filter(|(_, n)| n.live && n.eligible())
            .max_by(|(a, na), (b, nb)| na.rank.cmp(&nb.rank).then_with(|| a.cmp(b)))
            .map(|(u, _)| u.clone());
        View { nodes, leader }
    }

    /// Uuids of the live eligible nodes.
    pub fn live_eligible(&self) -> impl Iterator<Item = (&String, &NodeView)> {
        self.nodes.iter().filter(|(_, n)| n.live && n.eligible())
    }

    /// How many live eligible nodes there are.
    pub fn live_eligible_count(&self) -> usize {
        self.live_eligible().count()
    }

    /// Milliseconds until the next live node may count as dead, at the latest (for the timer):
    /// the soonest a suspicion's grace or a lease runs out.
    pub fn next_expiry_ms(
        &self,
        ledger: &Ledger,
        hlc_now_ms: u64,
        liveness: &Liveness,
    ) -> Option<u64> {
        let suspicions = Suspicions::read(ledger);
        self.nodes
            .iter()
            .filter(|(_, n)| n.live)
            .filter_map(|(uuid, _)| liveness::heard_ms(ledger, &suspicions, liveness, uuid))
            .map(|heard| {
                heard
                    .saturating_add(liveness.timeout_ms)
                    .saturating_sub(hlc_now_ms)
            })
            .min()
    }
}
